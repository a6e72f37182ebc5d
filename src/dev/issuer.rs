//! An embedded development OpenID issuer: discovery documents and JWK Sets for any
//! number of issuers on one listener, each under its own path (`/bitbucket`,
//! `/github`, `/human`, ...), so `portcullis demo` and the tests exercise the real
//! discovery + JWKS path of the verifier without the Internet.
//!
//! Test hooks change an issuer's behaviour at run time: replace its keys
//! ([`DevIssuer::set_keys`]), make its endpoints fail ([`DevIssuer::set_failure`]),
//! change the `Cache-Control` it sends, lie about its `issuer`, and count fetches.
//! The server stops when the [`DevIssuer`] is dropped.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::RwLock;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::signer::{self, DevSigner};

/// The `Cache-Control` the JWKS endpoint sends unless a test sets another.
pub const DEFAULT_JWKS_CACHE_CONTROL: &str = "max-age=300";

/// Request bodies the extra handlers may receive (a login form post).
const MAX_BODY: usize = 64 * 1024;

/// How an issuer's endpoints misbehave, to test the verifier's failure handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failure {
    /// Serve normally.
    #[default]
    None,
    /// Answer 500 on discovery and JWKS.
    ServerError,
    /// Close the connection without an answer.
    Close,
    /// Answer normally, after this long (an issuer that is slow or hangs until the
    /// fetcher's timeout).
    Slow(std::time::Duration),
}

/// A request as an extra handler sees it.
#[derive(Debug)]
pub struct DevRequest {
    pub method: Method,
    /// Path and query, as sent.
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A synchronous handler for extra endpoints (the demo's login form, a token
/// endpoint). Returning `None` passes the request on (to a 404).
pub type Handler = Arc<dyn Fn(&DevRequest) -> Option<Response<Full<Bytes>>> + Send + Sync>;

/// The running dev issuer server. Dropping it stops the server and every connection.
pub struct DevIssuer {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// Fetch counters of one issuer path.
#[derive(Debug, Default)]
struct Counters {
    discovery: AtomicU64,
    jwks: AtomicU64,
}

struct IssuerState {
    url: String,
    jwks: Value,
    failure: Failure,
    cache_control: Option<String>,
    /// What discovery says `issuer` is, when a test wants it to lie.
    advertised_issuer: Option<String>,
    /// Members merged into the discovery document (login endpoints, for example).
    discovery_extra: serde_json::Map<String, Value>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Shared {
    issuers: RwLock<HashMap<String, IssuerState>>,
    handlers: RwLock<Vec<(String, Handler)>>,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer").field("addr", &self.addr).field("scheme", &self.scheme).finish()
    }
}

// === impl DevIssuer ===

impl DevIssuer {
    /// Bind `addr` (port 0 picks one) and serve, over TLS when `tls` is given (its
    /// ALPN should offer `h2` and `http/1.1`).
    pub async fn start(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<DevIssuer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Ok(DevIssuer { addr, scheme, shared, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `{scheme}://{addr}`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Register (or reset) an issuer at `path` (e.g. `/github`) publishing `signers`,
    /// and return its issuer URL `{scheme}://{addr}{path}`.
    pub fn add_issuer(&self, path: &str, signers: &[&DevSigner]) -> String {
        let path = normalize(path);
        let url = format!("{}{path}", self.base_url());
        let state = IssuerState {
            url: url.clone(),
            jwks: signer::jwks(signers),
            failure: Failure::None,
            cache_control: Some(DEFAULT_JWKS_CACHE_CONTROL.to_owned()),
            advertised_issuer: None,
            discovery_extra: serde_json::Map::new(),
            counters: Arc::default(),
        };
        self.shared.issuers.write().insert(path, state);
        url
    }

    /// The issuer URL of a registered path.
    pub fn issuer_url(&self, path: &str) -> Option<String> {
        self.shared.issuers.read().get(&normalize(path)).map(|s| s.url.clone())
    }

    /// Replace the published key set (rotation: add the new key, later drop the old).
    pub fn set_keys(&self, path: &str, signers: &[&DevSigner]) {
        self.set_jwks(path, signer::jwks(signers));
    }

    /// Publish an arbitrary JWK Set document, to test how odd entries are handled.
    pub fn set_jwks(&self, path: &str, jwks: Value) {
        self.update(path, |s| s.jwks = jwks);
    }

    /// Make discovery and JWKS of this issuer fail (or serve again with `Failure::None`).
    pub fn set_failure(&self, path: &str, failure: Failure) {
        self.update(path, |s| s.failure = failure);
    }

    /// The JWKS `Cache-Control` header; `None` sends none.
    pub fn set_cache_control(&self, path: &str, value: Option<&str>) {
        self.update(path, |s| s.cache_control = value.map(str::to_owned));
    }

    /// Make the discovery document name another `issuer` than the real URL.
    pub fn set_advertised_issuer(&self, path: &str, issuer: Option<&str>) {
        self.update(path, |s| s.advertised_issuer = issuer.map(str::to_owned));
    }

    /// Add members to the discovery document (`authorization_endpoint`, ...).
    pub fn set_discovery_extra(&self, path: &str, extra: serde_json::Map<String, Value>) {
        self.update(path, |s| s.discovery_extra = extra);
    }

    /// Set one member of the discovery document, keeping the others.
    pub fn set_discovery_member(&self, path: &str, name: &str, value: Value) {
        self.update(path, |s| {
            s.discovery_extra.insert(name.to_owned(), value);
        });
    }

    /// Serve requests under `prefix` with `handler` before the 404 fallback.
    pub fn add_handler(&self, prefix: &str, handler: Handler) {
        self.shared.handlers.write().push((prefix.to_owned(), handler));
    }

    /// For tests of the key fetchers: serves `jwks` under `/elsewhere/` three ways —
    /// `moved` (302 to `jwks.json`), `jwks.json` itself (each request counted in the
    /// returned counter) and `big` (the same JSON padded with `padding` spaces). A fetcher
    /// that follows no redirect and reads a bounded body loads only `jwks.json`.
    #[cfg(test)]
    pub(crate) fn serve_jwks_elsewhere(
        &self,
        jwks: String,
        padding: usize,
    ) -> Arc<std::sync::atomic::AtomicUsize> {
        let target = format!("{}/elsewhere/jwks.json", self.base_url());
        let followed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = followed.clone();
        let handler: Handler = Arc::new(move |req| {
            let answer = |status: StatusCode, body: String| {
                Response::builder()
                    .status(status)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::LOCATION, target.as_str())
                    .body(Full::new(Bytes::from(body)))
                    .ok()
            };
            match req.uri.path() {
                "/elsewhere/moved" => answer(StatusCode::FOUND, String::new()),
                "/elsewhere/jwks.json" => {
                    counter.fetch_add(1, Ordering::SeqCst);
                    answer(StatusCode::OK, jwks.clone())
                }
                // Valid JSON, padded past a limit.
                "/elsewhere/big" => {
                    answer(StatusCode::OK, format!("{jwks}{}", " ".repeat(padding)))
                }
                _ => None,
            }
        });
        self.add_handler("/elsewhere/", handler);
        followed
    }

    /// Discovery documents requested from this issuer so far (failed ones included).
    pub fn discovery_fetches(&self, path: &str) -> u64 {
        self.counters(path).map_or(0, |c| c.discovery.load(Ordering::SeqCst))
    }

    /// JWK Sets requested from this issuer so far (failed ones included).
    pub fn jwks_fetches(&self, path: &str) -> u64 {
        self.counters(path).map_or(0, |c| c.jwks.load(Ordering::SeqCst))
    }

    fn counters(&self, path: &str) -> Option<Arc<Counters>> {
        self.shared.issuers.read().get(&normalize(path)).map(|s| s.counters.clone())
    }

    fn update(&self, path: &str, f: impl FnOnce(&mut IssuerState)) {
        if let Some(state) = self.shared.issuers.write().get_mut(&normalize(path)) {
            f(state);
        }
    }
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connections, so this ends them all.
        self.task.abort();
    }
}

/// `github`, `/github/` → `/github`; the root issuer is the empty path.
fn normalize(path: &str) -> String {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let mut connections = JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "dev issuer accept failed");
                    continue;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "dev issuer TLS handshake failed");
                        return;
                    }
                },
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "dev issuer connection ended");
            }
        });
    }
}

/// The error a service returns to make hyper drop the connection unanswered.
#[derive(Debug, thiserror::Error)]
#[error("dev issuer closes the connection on purpose")]
struct CloseOnPurpose;

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, CloseOnPurpose> {
    let path = req.uri().path().to_owned();
    if req.method() == Method::GET {
        if let Some((answer, delay)) = serve_issuer(&shared, &path) {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            return answer;
        }
    }
    let handlers: Vec<Handler> = shared
        .handlers
        .read()
        .iter()
        .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(_, h)| h.clone())
        .collect();
    if handlers.is_empty() {
        return Ok(plain(StatusCode::NOT_FOUND, "not found"));
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = Limited::new(body, MAX_BODY).collect().await.map(|b| b.to_bytes()) else {
        return Ok(plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
    };
    let dev_req = DevRequest { method: parts.method, uri: parts.uri, headers: parts.headers, body };
    Ok(handlers
        .iter()
        .find_map(|h| h(&dev_req))
        .unwrap_or_else(|| plain(StatusCode::NOT_FOUND, "not found")))
}

/// Discovery or JWKS for a registered issuer path, and how long to wait before
/// answering; `None` if `path` is neither.
#[allow(clippy::type_complexity)]
fn serve_issuer(
    shared: &Shared,
    path: &str,
) -> Option<(Result<Response<Full<Bytes>>, CloseOnPurpose>, Option<std::time::Duration>)> {
    let (issuer_path, is_discovery) =
        if let Some(p) = path.strip_suffix("/.well-known/openid-configuration") {
            (p, true)
        } else {
            (path.strip_suffix("/jwks.json")?, false)
        };
    let issuers = shared.issuers.read();
    let state = issuers.get(issuer_path)?;
    let counter = if is_discovery { &state.counters.discovery } else { &state.counters.jwks };
    counter.fetch_add(1, Ordering::SeqCst);
    let delay = match state.failure {
        Failure::None => None,
        Failure::Slow(d) => Some(d),
        Failure::ServerError => {
            return Some((Ok(plain(StatusCode::INTERNAL_SERVER_ERROR, "injected failure")), None))
        }
        Failure::Close => return Some((Err(CloseOnPurpose), None)),
    };
    let response = if is_discovery {
        json_response(&discovery_document(state), None)
    } else {
        json_response(&state.jwks, state.cache_control.as_deref())
    };
    Some((Ok(response), delay))
}

fn discovery_document(state: &IssuerState) -> Value {
    let mut doc = json!({
        "issuer": state.advertised_issuer.as_deref().unwrap_or(&state.url),
        "jwks_uri": format!("{}/jwks.json", state.url),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "scopes_supported": ["openid"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "email", "groups"],
    });
    if let Value::Object(map) = &mut doc {
        map.extend(state.discovery_extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    doc
}

fn json_response(body: &Value, cache_control: Option<&str>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    if let Some(value) = cache_control.and_then(|v| header::HeaderValue::from_str(v).ok()) {
        headers.insert(header::CACHE_CONTROL, value);
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A bare HTTP/1.1 GET, to test the server without the verifier's client.
    async fn get(addr: SocketAddr, path: &str) -> io::Result<String> {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: dev\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut out = String::new();
        tcp.read_to_string(&mut out).await?;
        Ok(out)
    }

    fn body_json(response: &str) -> Value {
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    #[tokio::test]
    async fn serves_discovery_and_jwks_per_issuer_path_with_hooks(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dev = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), None).await?;
        let k1 = DevSigner::generate_es256("k1")?;
        let url = dev.add_issuer("github", &[&k1]);
        assert_eq!(url, format!("http://{}/github", dev.local_addr()));
        assert_eq!(dev.issuer_url("/github/").as_deref(), Some(url.as_str()));

        let disco = get(dev.local_addr(), "/github/.well-known/openid-configuration").await?;
        let doc = body_json(&disco);
        assert_eq!(doc["issuer"].as_str(), Some(url.as_str()));
        assert_eq!(doc["jwks_uri"].as_str(), Some(format!("{url}/jwks.json").as_str()));

        let jwks = get(dev.local_addr(), "/github/jwks.json").await?;
        assert!(jwks.to_ascii_lowercase().contains("cache-control: max-age=300"));
        assert_eq!(body_json(&jwks)["keys"][0]["kid"].as_str(), Some("k1"));

        let k2 = DevSigner::generate_es256("k2")?;
        dev.set_keys("/github", &[&k2]);
        dev.set_cache_control("/github", Some("max-age=7"));
        let jwks = get(dev.local_addr(), "/github/jwks.json").await?;
        assert!(jwks.to_ascii_lowercase().contains("cache-control: max-age=7"));
        assert_eq!(body_json(&jwks)["keys"][0]["kid"].as_str(), Some("k2"));

        dev.set_failure("/github", Failure::ServerError);
        assert!(get(dev.local_addr(), "/github/jwks.json").await?.starts_with("HTTP/1.1 500"));
        dev.set_failure("/github", Failure::Close);
        assert_eq!(get(dev.local_addr(), "/github/jwks.json").await.unwrap_or_default(), "");

        dev.set_failure("/github", Failure::None);
        dev.set_advertised_issuer("/github", Some("https://elsewhere"));
        let doc =
            body_json(&get(dev.local_addr(), "/github/.well-known/openid-configuration").await?);
        assert_eq!(doc["issuer"].as_str(), Some("https://elsewhere"));

        assert_eq!(dev.discovery_fetches("/github"), 2);
        assert_eq!(dev.jwks_fetches("/github"), 4);
        assert!(get(dev.local_addr(), "/other/jwks.json").await?.starts_with("HTTP/1.1 404"));
        Ok(())
    }

    #[tokio::test]
    async fn extra_handlers_answer_and_drop_stops_the_server(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dev = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), None).await?;
        dev.add_handler(
            "/login",
            Arc::new(|req: &DevRequest| {
                (req.uri.path() == "/login").then(|| plain(StatusCode::OK, "login form"))
            }),
        );
        let addr = dev.local_addr();
        assert!(get(addr, "/login").await?.ends_with("login form"));
        assert!(get(addr, "/login/x").await?.starts_with("HTTP/1.1 404"));
        drop(dev);
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(get(addr, "/login").await.is_err());
        Ok(())
    }
}
