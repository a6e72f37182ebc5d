//! Per-issuer key state: OIDC discovery, JWKS fetching, parsing, caching and refresh
//! (jwt-validation.md §11).
//!
//! Keys are parsed once per fetch into [`ParsedPublicKey`]s and kept by `kid`. A
//! refresh replaces the whole set, so a key the provider removes stops verifying.
//! Reads are lock-free (`ArcSwap`); fetches are single-flight behind an async mutex.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use aws_lc_rs::signature::{self, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value};

use super::token::MAX_KID_LEN;
use super::{Algorithm, IssuerSettings};

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Timings and limits of the key machinery. The defaults are §11's; tests shrink
/// them so the stale window can be crossed in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// JWKS `Cache-Control: max-age` is clamped to `[min_ttl, max_ttl]`.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// TTL when the response has no max-age (panva/jose's 10 min).
    pub default_ttl: Duration,
    /// Whole request, connect to last body byte (jose's 5 s).
    pub fetch_timeout: Duration,
    pub max_body: usize,
    /// Retry backoff after failed fetches: doubles from `retry_min` to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(5 * 60),
            max_ttl: Duration::from_secs(24 * 60 * 60),
            default_ttl: Duration::from_secs(10 * 60),
            fetch_timeout: Duration::from_secs(5),
            max_body: 1024 * 1024,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// One JWK, parsed for each algorithm it may be used with (V5: one key, one
/// algorithm when the JWK names it; otherwise the allowlisted ones of its type).
pub(crate) struct VerifyKey {
    by_alg: Vec<(Algorithm, ParsedPublicKey)>,
    /// SHA-256 of the key material: a cached token stays valid only while its `kid`
    /// still names this very key (an issuer may publish new material under an old kid).
    pub material: [u8; 32],
}

impl VerifyKey {
    pub fn for_alg(&self, alg: Algorithm) -> Option<&ParsedPublicKey> {
        self.by_alg.iter().find(|(a, _)| *a == alg).map(|(_, k)| k)
    }

    /// The algorithms the key verifies, in the allowlist's order.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.by_alg.iter().map(|(a, _)| *a).collect()
    }
}

/// A complete key set as fetched at one time.
pub(crate) struct KeySet {
    pub keys: HashMap<Arc<str>, Arc<VerifyKey>>,
    pub fetched_at: Instant,
    pub ttl: Duration,
}

impl KeySet {
    pub fn get(&self, kid: &str) -> Option<(&Arc<str>, &Arc<VerifyKey>)> {
        self.keys.get_key_value(kid)
    }
}

/// The live key state of one configured issuer.
pub(crate) struct IssuerKeys {
    pub settings: IssuerSettings,
    label: Arc<str>,
    client: HttpClient,
    timing: Timing,
    /// From discovery; cleared when a JWKS fetch fails so the next try rediscovers.
    jwks_uri: Mutex<Option<Uri>>,
    keys: ArcSwapOption<KeySet>,
    /// Single flight: at most one fetch per issuer at a time.
    refresh_lock: tokio::sync::Mutex<()>,
    /// When an unknown `kid` last caused a fetch (§11.3 cooldown).
    last_kid_refresh: Mutex<Option<Instant>>,
    /// Fetch attempts (discovery + JWKS as one), for tests and logs.
    pub fetches: AtomicU64,
    /// Told when a new set drops a key the previous one had (the verifier's
    /// [`Removals`], shared by its issuers).
    removals: Arc<Removals>,
}

/// Announces key sets that dropped a key: open WebSocket tunnels and database sessions
/// admitted with a token that key verified then end (a token cache entry of it is dead
/// already, checked on every hit). Not sent for a refresh that only adds keys, so the
/// regular refresh wakes nothing.
pub(crate) type Removals = tokio::sync::watch::Sender<()>;

fn same_set(a: &[Algorithm], b: &[Algorithm]) -> bool {
    a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x))
}

/// Whether `new` lacks a key of `old`: a `kid` gone, or new material under it.
fn drops_a_key(old: &KeySet, new: &KeySet) -> bool {
    old.keys.iter().any(|(kid, key)| new.keys.get(kid).is_none_or(|k| k.material != key.material))
}

// === impl IssuerKeys ===

impl IssuerKeys {
    /// No network: only the TLS client is built (reading `ca_file`) and URLs checked.
    pub fn new(
        settings: IssuerSettings,
        timing: Timing,
        removals: Arc<Removals>,
    ) -> Result<Self, String> {
        let id = settings.id.clone();
        check_fetch_url(&settings.discovery_url, settings.insecure_http)
            .map_err(|e| format!("issuer {id}: discovery_url {e}"))?;
        let client = http_client(&settings).map_err(|e| format!("issuer {id}: {e}"))?;
        if settings.insecure_http {
            tracing::warn!(issuer = %id, "insecure_http: discovery/JWKS may use plain http on loopback");
        }
        Ok(Self {
            label: id.0.clone(),
            settings,
            client,
            timing,
            jwks_uri: Mutex::new(None),
            keys: ArcSwapOption::empty(),
            refresh_lock: tokio::sync::Mutex::new(()),
            last_kid_refresh: Mutex::new(None),
            fetches: AtomicU64::new(0),
            removals,
        })
    }

    /// Installs `set` in place of the current one; announces it when it drops a key.
    fn store(&self, set: KeySet) {
        let new = Arc::new(set);
        let old = self.keys.swap(Some(new.clone()));
        if let Some(old) = old {
            if drops_a_key(&old, &new) {
                tracing::info!(
                    issuer = %self.label,
                    "JWKS dropped a key: connections admitted with a token it verified end"
                );
                self.removals.send_replace(());
            }
        }
    }

    /// Whether the issuer's current key set (as last fetched, stale or not) holds the
    /// key `kid` with `material`.
    pub fn holds(&self, kid: &str, material: &[u8; 32]) -> bool {
        self.keys
            .load()
            .as_deref()
            .is_some_and(|s| s.get(kid).is_some_and(|(_, k)| k.material == *material))
    }

    /// Whether `self` may take over `old`'s keys on reload: the same keys would be
    /// fetched from the same place with the same trust.
    pub fn same_source(&self, old: &IssuerKeys) -> bool {
        let (a, b) = (&self.settings, &old.settings);
        a.issuer == b.issuer
            && a.discovery_url == b.discovery_url
            && a.ca_file == b.ca_file
            && a.insecure_http == b.insecure_http
            // Keys are filtered and parsed against the allowlist, a set: the same
            // algorithms in another order parse the same keys (and an open tunnel or
            // session, which a reordered allowlist does not end, keeps its key).
            && same_set(&a.algorithms, &b.algorithms)
    }

    pub fn adopt(&self, old: &IssuerKeys) {
        self.keys.store(old.keys.load_full());
        *self.jwks_uri.lock() = old.jwks_uri.lock().clone();
    }

    /// The key set if it may be used now: loaded, and not older than its TTL plus
    /// the stale window (§11.7). After that the issuer fails closed.
    pub fn usable(&self) -> Option<Arc<KeySet>> {
        let set = self.keys.load_full()?;
        // Saturating: a configured stale window of "forever" must not overflow.
        let grace = set.ttl.saturating_add(self.settings.stale_window);
        let usable = set.fetched_at.checked_add(grace).is_none_or(|end| Instant::now() < end);
        usable.then_some(set)
    }

    pub fn loaded(&self) -> bool {
        self.keys.load().is_some()
    }

    /// On an unknown `kid`: one single-flight fetch at most once per cooldown, then
    /// the key if it appeared (§11.3).
    pub async fn refresh_for_kid(&self, kid: &str) -> Option<(Arc<str>, Arc<VerifyKey>)> {
        let _flight = self.refresh_lock.lock().await;
        // Whoever held the lock before may just have fetched the key.
        let lookup = |set: Option<Arc<KeySet>>| {
            set.and_then(|s| s.get(kid).map(|(k, v)| (k.clone(), v.clone())))
        };
        if let Some(found) = lookup(self.usable()) {
            return Some(found);
        }
        {
            let mut last = self.last_kid_refresh.lock();
            if last.is_some_and(|t| t.elapsed() < self.settings.refresh_cooldown) {
                return None;
            }
            *last = Some(Instant::now());
        }
        tracing::debug!(issuer = %self.label, "unknown kid: refreshing JWKS");
        let _ = self.fetch_and_install().await;
        // The cooldown runs from the end of the fetch too: requests queued on the lock
        // behind a slow or failed fetch (an issuer that hangs until the timeout) see a
        // fresh refresh and give up, instead of each starting one more fetch in turn.
        *self.last_kid_refresh.lock() = Some(Instant::now());
        lookup(self.usable())
    }

    /// Background loop: load, then refresh when the TTL runs out; retry with backoff
    /// while fetches fail (forever, so a recovered issuer comes back by itself).
    pub async fn run(self: Arc<Self>) {
        let mut backoff = self.timing.retry_min;
        loop {
            if let Some(set) = self.keys.load_full() {
                tokio::time::sleep_until((set.fetched_at + set.ttl).into()).await;
            }
            let result = {
                let _flight = self.refresh_lock.lock().await;
                // An unknown-kid refresh may have run meanwhile; then wait for its TTL.
                match self.keys.load_full() {
                    Some(set) if set.fetched_at + set.ttl > Instant::now() => continue,
                    _ => self.fetch_and_install().await,
                }
            };
            match result {
                Ok(()) => backoff = self.timing.retry_min,
                Err(()) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.timing.retry_max);
                }
            }
        }
    }

    /// One fetch (discovery when needed, then JWKS); installs the set on success.
    /// Callers hold `refresh_lock`.
    async fn fetch_and_install(&self) -> Result<(), ()> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let metrics = &crate::metrics::global().jwks_refreshes;
        match self.fetch().await {
            Ok(set) => {
                tracing::debug!(issuer = %self.label, keys = set.keys.len(), ttl = ?set.ttl, "JWKS loaded");
                self.store(set);
                metrics.inc(&(self.label.clone(), "ok"));
                crate::metrics::global()
                    .jwks_last_success
                    .set(&self.label, crate::util::unix_now());
                Ok(())
            }
            Err((url, e)) => {
                let stale = self.loaded();
                // Escaped: the error can quote the provider's text, such as the names of
                // its TLS certificate (rustls's "certificate not valid for name …").
                let e = crate::diag::Visible(&e);
                tracing::warn!(issuer = %self.label, url = %url, error = %e, serving_stale = stale, "JWKS refresh failed");
                metrics.inc(&(self.label.clone(), "error"));
                Err(())
            }
        }
    }

    /// The key set, or the URL that failed (as [`url_for_log`] shows it) and why.
    async fn fetch(&self) -> Result<KeySet, (String, String)> {
        let cached = self.jwks_uri.lock().clone();
        let jwks_uri = match cached {
            Some(uri) => uri,
            None => {
                let uri = self
                    .discover()
                    .await
                    .map_err(|e| (url_str_for_log(&self.settings.discovery_url), e))?;
                *self.jwks_uri.lock() = Some(uri.clone());
                uri
            }
        };
        let result = async {
            let (body, headers) = self.get(&jwks_uri).await?;
            let (allowlist, label) = (self.settings.algorithms.clone(), self.label.clone());
            let keys = off_the_runtime(move || read_jwks(&body, &allowlist, &label)).await?;
            Ok(KeySet { keys, fetched_at: Instant::now(), ttl: ttl(&headers, &self.timing) })
        }
        .await;
        if result.is_err() {
            // The jwks_uri may have moved: ask discovery again next time.
            *self.jwks_uri.lock() = None;
        }
        result.map_err(|e| (url_for_log(&jwks_uri), e))
    }

    /// §11.1: the document must name exactly our issuer; its jwks_uri must be https.
    async fn discover(&self) -> Result<Uri, String> {
        let url = check_fetch_url(&self.settings.discovery_url, self.settings.insecure_http)?;
        let (body, _) = self.get(&url).await?;
        let (issuer, insecure_http) = (self.settings.issuer.clone(), self.settings.insecure_http);
        off_the_runtime(move || read_discovery(&body, &issuer, insecure_http)).await
    }

    /// A bare GET: no cookies, no credentials, no redirects followed, bounded in time
    /// and size (§11.6).
    async fn get(&self, uri: &Uri) -> Result<(Bytes, http::HeaderMap), String> {
        let request = Request::get(uri.clone())
            .header(header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let max = self.timing.max_body;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| chain(&e))?;
            if response.status() != StatusCode::OK {
                return Err(format!("answered {}", response.status()));
            }
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, max)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((body, parts.headers))
        };
        tokio::time::timeout(self.timing.fetch_timeout, exchange)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    /// Install a key set from a JWKS document without fetching (tests, benches).
    pub fn install(&self, doc: &Value, ttl: Duration) -> Result<usize, String> {
        let keys = parse_jwks(doc, &self.settings.algorithms, &self.label)?;
        let n = keys.len();
        self.store(KeySet { keys, fetched_at: Instant::now(), ttl });
        Ok(n)
    }
}

/// A URL fetched from an issuer, as logs and errors show it: scheme, host, port and
/// path. A query (which could carry a tenant's secret) is shown only as `?…`; userinfo
/// never gets this far ([`check_fetch_url`] refuses it), and is left out all the same.
pub(crate) fn url_for_log(uri: &Uri) -> String {
    let mut out = String::new();
    if let Some(scheme) = uri.scheme_str() {
        out.push_str(scheme);
        out.push_str("://");
    }
    if let Some(a) = uri.authority() {
        out.push_str(a.host());
        if let Some(port) = a.port_u16() {
            out.push(':');
            out.push_str(&port.to_string());
        }
    }
    out.push_str(uri.path());
    if uri.query().is_some() {
        out.push_str("?…");
    }
    out
}

/// [`url_for_log`] of a configured URL string; one that does not parse is shown as
/// nothing more than that.
pub(crate) fn url_str_for_log(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(uri) if uri.authority().is_some_and(|a| !a.as_str().contains('@')) => url_for_log(&uri),
        _ => "(not a usable URL)".to_string(),
    }
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// https anywhere; plain http only with `insecure_http` and a loopback host. No
/// userinfo: credentials never travel to an issuer.
pub(crate) fn check_fetch_url(url: &str, insecure_http: bool) -> Result<Uri, String> {
    // Quoted in errors only once it is known to carry no credentials.
    let uri: Uri = url.parse().map_err(|_| "is not a URL".to_string())?;
    let Some(authority) = uri.authority() else {
        return Err("has no host".to_string());
    };
    if authority.as_str().contains('@') {
        return Err("carries credentials (user:password@)".to_string());
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if insecure_http && is_loopback(authority.host()) => Ok(uri),
        Some("http") if insecure_http => {
            Err(format!("`{url}`: insecure_http only allows loopback hosts"))
        }
        _ => Err(format!("`{url}` is not https")),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Public web PKI roots plus the issuer's `ca_file`; aws-lc-rs as the provider.
fn http_client(settings: &IssuerSettings) -> Result<HttpClient, String> {
    let tls = issuer_tls(settings)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The client TLS configuration for talking to an issuer (discovery, JWKS, and the
/// browser login's token endpoint).
pub(crate) fn issuer_tls(settings: &IssuerSettings) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.ca_file {
        let shown = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("ca_file {shown}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("ca_file {shown}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("ca_file {shown}: no certificates"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("ca_file {shown}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Runs `read` (reading what a provider sent: a key set, JSON then every key's parse; a
/// discovery document) on the blocking pool. The provider chooses how costly it is — a
/// key set of 100 RSA keys takes a few milliseconds of CPU, a 1 MiB discovery document
/// of a million tiny members tens of them — and on a runtime thread it held up every
/// request that thread serves (all of them on a one-CPU host, whose runtime is
/// current-thread), at each refresh and at each refetch a junk token's unknown `kid`
/// brings (each failed key fetch brings a rediscovery too).
pub(crate) async fn off_the_runtime<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| format!("reading the provider's answer: {e}"))?
}

/// §11.1: the `jwks_uri` of a discovery document, which must name exactly `issuer`; the
/// URI must be https ([`check_fetch_url`]). Run by [`off_the_runtime`].
pub(crate) fn read_discovery(
    body: &[u8],
    issuer: &str,
    insecure_http: bool,
) -> Result<Uri, String> {
    #[cfg(test)]
    DOCUMENTS_READ.with(|n| n.set(n.get() + 1));
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("discovery is not JSON: {e}"))?;
    match doc.get("issuer") {
        Some(Value::String(iss)) if iss == issuer => {}
        _ => return Err("discovery `issuer` differs from the configured issuer".into()),
    }
    let Some(Value::String(jwks_uri)) = doc.get("jwks_uri") else {
        return Err("discovery has no `jwks_uri` string".into());
    };
    check_fetch_url(jwks_uri, insecure_http).map_err(|e| format!("jwks_uri {e}"))
}

/// A fetched key set document, read: JSON, then [`parse_jwks`]. Run by
/// [`off_the_runtime`].
pub(crate) fn read_jwks(
    body: &[u8],
    allowlist: &[Algorithm],
    issuer: &str,
) -> Result<HashMap<Arc<str>, Arc<VerifyKey>>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    parse_jwks(&doc, allowlist, issuer)
}

/// `Cache-Control: max-age` clamped (§11.2); the default when absent.
pub(crate) fn ttl(headers: &http::HeaderMap, timing: &Timing) -> Duration {
    let max_age = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|directive| {
            let (name, value) = directive.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("max-age") {
                return None;
            }
            value.trim().trim_matches('"').parse::<u64>().ok()
        });
    max_age.map_or(timing.default_ttl, |s| {
        Duration::from_secs(s).clamp(timing.min_ttl, timing.max_ttl)
    })
}

/// The most entries a key set may hold, usable or not. Providers publish 2 to 10 (the
/// current key, the next and the last few, per algorithm); a set over this is refused
/// whole, never cut to some of its keys: which keys a cut kept would be the order's
/// choice, the key signing today's tokens among the dropped ones as likely as not (and a
/// dropped key ends the tunnels and sessions it admitted). Refused, the previous set
/// serves on (within `stale_window`) and the refresh counts as failed, with a warning.
pub(crate) const MAX_JWKS_KEYS: usize = 100;

/// Refuses a key set of more than [`MAX_JWKS_KEYS`] entries, before any is read.
pub(crate) fn check_key_count(entries: usize) -> Result<(), String> {
    if entries > MAX_JWKS_KEYS {
        return Err(format!(
            "JWKS holds {entries} keys, more than the {MAX_JWKS_KEYS} taken: refused whole"
        ));
    }
    Ok(())
}

/// §11.5: keep only signing keys with a `kid`, a supported `kty` and an allowlisted
/// algorithm. Fails when nothing usable is left, or when the set holds more than
/// [`MAX_JWKS_KEYS`] entries, so a broken publication keeps the last good set (within
/// the stale window) instead of wiping it.
pub(crate) fn parse_jwks(
    doc: &Value,
    allowlist: &[Algorithm],
    issuer: &str,
) -> Result<HashMap<Arc<str>, Arc<VerifyKey>>, String> {
    let Some(Value::Array(entries)) = doc.get("keys") else {
        return Err("JWKS has no `keys` array".into());
    };
    check_key_count(entries.len())?;
    let mut keys = HashMap::new();
    for entry in entries {
        let Value::Object(jwk) = entry else { continue };
        match parse_jwk(jwk, allowlist) {
            Ok((kid, key)) => {
                if keys.contains_key(kid.as_str()) {
                    // Debug: the provider's text, escaped (a newline in it would start a log
                    // line of its own in the text log).
                    tracing::warn!(issuer, kid = ?kid, "JWKS repeats a kid; keeping the first");
                    continue;
                }
                keys.insert(Arc::from(kid), Arc::new(key));
            }
            Err(PRIVATE_PART) => {
                // The provider's signing key is public: every token it signed may be forged.
                let kid = jwk.get("kid").and_then(Value::as_str).filter(|k| k.len() <= MAX_KID_LEN);
                let kid = kid.unwrap_or_default();
                tracing::warn!(issuer, kid = ?kid, "JWKS publishes a private key; it verifies nothing");
            }
            Err(why) => tracing::debug!(issuer, why, "JWK skipped"),
        }
    }
    if keys.is_empty() {
        return Err("JWKS holds no usable signing key".into());
    }
    Ok(keys)
}

/// Whether `jwk` passes the checks a bearer token's key passes ([`parse_jwk`]: `use`,
/// `key_ops`, an allowlisted `alg`, RSA of 2048–8192 bits, EC points on their curve), a
/// `kid` aside: the browser sign-in verifies its ID tokens with `openidconnect`, which
/// takes a lone key without one, and would otherwise take any key it can parse.
pub(crate) fn fit_for_verifying(
    jwk: &Map<String, Value>,
    allowlist: &[Algorithm],
) -> Result<(), &'static str> {
    if jwk.contains_key("kid") {
        return parse_jwk(jwk, allowlist).map(|_| ());
    }
    let mut named = jwk.clone();
    named.insert("kid".into(), Value::String("-".into()));
    parse_jwk(&named, allowlist).map(|_| ())
}

/// Why [`parse_jwk`] refuses a key published with its private part: logged as a warning,
/// not as a routine skip.
const PRIVATE_PART: &str = "the JWK carries private key material: anyone who fetched the \
                            JWKS can sign with it";

/// The JWK members that hold private key material: `d` of EC (RFC 7518 §6.2.2), RSA
/// (§6.3.2, with its CRT members) and OKP keys (RFC 8037 §2), and a symmetric key's `k`
/// (§6.4). A key set is public: a key published with one of these is known to everyone.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

#[cfg(test)]
thread_local! {
    /// Keys read ([`parse_jwk`]) on this thread: a test's current-thread runtime must
    /// read none of a fetched key set itself.
    pub(crate) static KEYS_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Discovery documents read on this thread (the bearer path's and the sign-in's):
    /// as for [`KEYS_READ`], a test's runtime thread must read none.
    pub(crate) static DOCUMENTS_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn parse_jwk(
    jwk: &Map<String, Value>,
    allowlist: &[Algorithm],
) -> Result<(String, VerifyKey), &'static str> {
    #[cfg(test)]
    KEYS_READ.with(|n| n.set(n.get() + 1));
    if PRIVATE_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return Err(PRIVATE_PART);
    }
    let text = |name: &str| match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err("member is not a string"),
    };
    let kid = match text("kid")? {
        Some(k) if !k.is_empty() && k.len() <= MAX_KID_LEN => k.to_owned(),
        _ => return Err("no usable kid"),
    };
    if text("use")?.is_some_and(|u| u != "sig") {
        return Err("use is not sig");
    }
    // RFC 7517 §4.3: a key whose operations are listed may be used for those only.
    match jwk.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|op| op == "verify") => {}
        Some(_) => return Err("key_ops does not list verify"),
    }
    let named = match text("alg")? {
        Some(a) => Some(Algorithm::parse(a).ok_or("alg not supported")?),
        None => None,
    };
    if named.is_some_and(|a| !allowlist.contains(&a)) {
        return Err("alg not in the allowlist");
    }
    let bytes = |name: &str| -> Result<Vec<u8>, &'static str> {
        URL_SAFE_NO_PAD
            .decode(text(name)?.ok_or("missing key member")?)
            .map_err(|_| "bad base64url")
    };
    let kty = text("kty")?.ok_or("no kty")?;
    // The algorithms this key may serve: the one it names, else the allowlisted ones
    // its type and curve fit (V5).
    let candidates: Vec<Algorithm> = allowlist
        .iter()
        .copied()
        .filter(|a| a.key_type() == kty && named.is_none_or(|n| n == *a))
        .collect();
    let mut by_alg = Vec::new();
    let mut material = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    material.update(kty.as_bytes());
    match kty {
        "RSA" => {
            let (n, e) = (bytes("n")?, bytes("e")?);
            let components = RsaPublicKeyComponents { n: strip_zeros(&n), e: strip_zeros(&e) };
            // Refused here rather than at every verification, so /readyz and the audit
            // reason tell the truth about a key that could never verify anything.
            // Zeros stripped, the first byte is not 0; an empty (or all-zero) modulus
            // has no bits, not a size below zero.
            let bits = components
                .n
                .first()
                .map_or(0, |b| components.n.len() * 8 - b.leading_zeros() as usize);
            if !(2048..=8192).contains(&bits) {
                return Err("RSA modulus outside 2048–8192 bits");
            }
            if components.n.last().is_none_or(|b| b % 2 == 0) {
                return Err("RSA modulus is even");
            }
            // aws-lc verifies with 3 ≤ e < 2^33 only; odd, as any RSA exponent.
            let e_value = components
                .e
                .iter()
                .try_fold(0u64, |acc, b| acc.checked_mul(256).map(|v| v + u64::from(*b)));
            if !e_value.is_some_and(|e| e >= 3 && e % 2 == 1 && e < (1 << 33)) {
                return Err("RSA public exponent unusable");
            }
            material.update(components.n);
            material.update(b"|");
            material.update(components.e);
            for alg in candidates {
                let params = rsa_params(alg).ok_or("not an RSA algorithm")?;
                let key = components.to_parsed_public_key(params).map_err(|_| "bad RSA key")?;
                by_alg.push((alg, key));
            }
        }
        "EC" => {
            let (alg, verify, len): (_, &'static signature::EcdsaVerificationAlgorithm, _) =
                match text("crv")? {
                    Some("P-256") => (Algorithm::ES256, &signature::ECDSA_P256_SHA256_FIXED, 32),
                    Some("P-384") => (Algorithm::ES384, &signature::ECDSA_P384_SHA384_FIXED, 48),
                    _ => return Err("EC curve not supported"),
                };
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != len || y.len() != len {
                return Err("EC coordinates of the wrong length");
            }
            material.update(&x);
            material.update(&y);
            if candidates.contains(&alg) {
                let point = [&[4u8][..], &x, &y].concat();
                by_alg.push((alg, ParsedPublicKey::new(verify, point).map_err(|_| "bad EC key")?));
            }
        }
        "OKP" => {
            if text("crv")? != Some("Ed25519") {
                return Err("OKP curve not supported");
            }
            let x = bytes("x")?;
            if x.len() != 32 {
                return Err("Ed25519 key of the wrong length");
            }
            material.update(&x);
            if candidates.contains(&Algorithm::EdDSA) {
                let key =
                    ParsedPublicKey::new(&signature::ED25519, x).map_err(|_| "bad Ed25519 key")?;
                by_alg.push((Algorithm::EdDSA, key));
            }
        }
        _ => return Err("kty not supported"),
    }
    if by_alg.is_empty() {
        return Err("no allowlisted algorithm fits this key");
    }
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(material.finish().as_ref());
    Ok((kid, VerifyKey { by_alg, material: fingerprint }))
}

/// JWK integers are minimal big-endian, but some publishers pad; aws-lc wants none.
fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

fn rsa_params(alg: Algorithm) -> Option<&'static RsaParameters> {
    // 2048 bits minimum: smaller RSA keys are refused at verification.
    Some(match alg {
        Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::signer::{self, DevSigner};
    use serde_json::json;

    #[test]
    fn ttl_honours_max_age_within_bounds() {
        let t = Timing::default();
        let mut h = http::HeaderMap::new();
        assert_eq!(ttl(&h, &t), Duration::from_secs(600));
        h.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("public, max-age=3600"));
        assert_eq!(ttl(&h, &t), Duration::from_secs(3600));
        h.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("max-age=10"));
        assert_eq!(ttl(&h, &t), Duration::from_secs(300));
        h.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("MAX-AGE=999999"));
        assert_eq!(ttl(&h, &t), Duration::from_secs(86_400));
        // A provider asking for no caching at all gets the floor, not a fetch per token;
        // one that asks for ever, or for what no integer holds, the ceiling or default.
        for (header, secs) in [
            ("max-age=0", 300),
            ("no-store", 600),
            ("no-cache, max-age=0, must-revalidate", 300),
            ("max-age=18446744073709551615", 86_400),
            ("max-age=18446744073709551616", 600),
            ("max-age=-1", 600),
        ] {
            h.insert(header::CACHE_CONTROL, http::HeaderValue::from_static(header));
            assert_eq!(ttl(&h, &t), Duration::from_secs(secs), "{header}");
        }
    }

    #[test]
    fn fetch_urls_must_be_https_unless_insecure_loopback() {
        assert!(check_fetch_url("https://idp.example/x", false).is_ok());
        assert!(check_fetch_url("http://idp.example/x", false).is_err());
        assert!(check_fetch_url("http://idp.example/x", true).is_err());
        assert!(check_fetch_url("http://127.0.0.1:9/x", true).is_ok());
        assert!(check_fetch_url("http://[::1]:9/x", true).is_ok());
        assert!(check_fetch_url("http://localhost:9/x", true).is_ok());
        assert!(check_fetch_url("http://127.0.0.1:9/x", false).is_err());
        assert!(check_fetch_url("https://user:pw@idp.example/x", false).is_err());
        assert!(check_fetch_url("file:///etc/passwd", true).is_err());
    }

    #[test]
    fn jwks_parsing_skips_unusable_entries() -> Result<(), Box<dyn std::error::Error>> {
        let rsa = DevSigner::generate_rs256("rsa")?;
        let ec = DevSigner::generate_es256("ec")?;
        let mut no_kid = rsa.public_jwk();
        no_kid.as_object_mut().map(|m| m.remove("kid"));
        let mut enc = rsa.public_jwk();
        enc["use"] = json!("enc");
        enc["kid"] = json!("enc");
        let mut hs = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hs", "alg": "HS256"});
        hs["use"] = json!("sig");
        let mut no_alg = rsa.public_jwk();
        no_alg.as_object_mut().map(|m| m.remove("alg"));
        no_alg["kid"] = json!("no-alg");
        let doc = json!({"keys": [rsa.public_jwk(), ec.public_jwk(), no_kid, enc, hs, no_alg]});

        let only_rs = parse_jwks(&doc, &[Algorithm::RS256], "t")?;
        let mut kids: Vec<&str> = only_rs.keys().map(|k| &**k).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["no-alg", "rsa"]);
        let both = parse_jwks(&doc, &[Algorithm::RS256, Algorithm::PS256, Algorithm::ES256], "t")?;
        assert_eq!(both.len(), 3);
        // A JWK naming RS256 serves only RS256; one naming nothing serves its family.
        let named = both.get("rsa").map(|k| {
            (k.for_alg(Algorithm::RS256).is_some(), k.for_alg(Algorithm::PS256).is_some())
        });
        assert_eq!(named, Some((true, false)));
        let unnamed = both.get("no-alg").map(|k| k.for_alg(Algorithm::PS256).is_some());
        assert_eq!(unnamed, Some(true));
        assert!(parse_jwks(&signer::jwks(&[&ec]), &[Algorithm::RS256], "t").is_err());
        assert!(parse_jwks(&json!({"keys": {}}), &[Algorithm::RS256], "t").is_err());
        Ok(())
    }

    /// A key set of more than 100 entries is refused whole, whatever the entries are:
    /// the count bounds what is parsed and held, so unusable entries count too; 100
    /// entries are read as usual.
    #[test]
    fn a_key_set_of_more_than_100_entries_is_refused_whole(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let ec = DevSigner::generate_es256("ec")?;
        let entries = |n: usize| -> Vec<Value> {
            (0..n)
                .map(|i| {
                    let mut k = ec.public_jwk();
                    k["kid"] = json!(format!("k{i}"));
                    k
                })
                .collect()
        };
        let at_cap = parse_jwks(&json!({ "keys": entries(100) }), &[Algorithm::ES256], "t")?;
        assert_eq!(at_cap.len(), 100);
        let over = parse_jwks(&json!({ "keys": entries(101) }), &[Algorithm::ES256], "t");
        assert!(
            over.as_ref().is_err_and(|e| e.contains("101 keys")),
            "{:?}",
            over.map(|k| k.len())
        );
        let mut junk = entries(1);
        junk.extend(std::iter::repeat_n(json!("not a key"), 100));
        assert!(parse_jwks(&json!({ "keys": junk }), &[Algorithm::ES256], "t").is_err());
        Ok(())
    }

    /// An RSA JWK whose modulus is empty, or nothing but zero bytes (`"n": ""`,
    /// `"n": "AA"`): refused as outside 2048–8192 bits, for bearer tokens and sign-ins
    /// alike. Reading its size subtracted from zero: a panic where arithmetic is checked
    /// (a debug build, the fuzz build), a wrapped size refused by luck in a release build
    /// (found by the `jwks` fuzz target).
    #[test]
    fn an_rsa_key_with_an_empty_modulus_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let rsa = DevSigner::generate_rs256("rsa")?;
        for n in ["", "AA", "AAAA"] {
            let mut jwk = rsa.public_jwk();
            jwk["n"] = json!(n);
            let Value::Object(map) = &jwk else { unreachable!() };
            assert_eq!(
                parse_jwk(map, &[Algorithm::RS256]).err(),
                Some("RSA modulus outside 2048–8192 bits"),
                "n = {n:?}"
            );
            assert!(fit_for_verifying(map, &[Algorithm::RS256]).is_err(), "n = {n:?}");
            assert!(parse_jwks(&json!({ "keys": [jwk] }), &[Algorithm::RS256], "t").is_err());
        }
        Ok(())
    }

    /// A provider publishing two keys under one `kid` (a botched rotation, or a planted
    /// second key): the first is kept, whatever the second is, so a token naming that
    /// `kid` is checked against one key, never each in turn.
    #[test]
    fn of_keys_repeating_a_kid_only_the_first_is_kept() -> Result<(), Box<dyn std::error::Error>> {
        let first = DevSigner::generate_rs256("dup")?;
        let second = DevSigner::generate_rs256("dup")?;
        let alone = |s: &DevSigner| -> Result<[u8; 32], String> {
            let keys = parse_jwks(&signer::jwks(&[s]), &[Algorithm::RS256], "t")?;
            keys.get("dup").map(|k| k.material).ok_or_else(|| "no dup".into())
        };
        for (doc, kept) in [
            (signer::jwks(&[&first, &second]), alone(&first)?),
            (signer::jwks(&[&second, &first]), alone(&second)?),
        ] {
            let keys = parse_jwks(&doc, &[Algorithm::RS256], "t")?;
            assert_eq!(keys.len(), 1);
            assert_eq!(keys.get("dup").map(|k| k.material), Some(kept));
        }
        Ok(())
    }

    /// A JWKS entry carrying private key material (RFC 7518 §6.2.2, §6.3.2, §6.4, RFC
    /// 8037 `d`; RSA's CRT members; a symmetric `k`): whoever fetched the public JWKS can
    /// sign with that key, so it verifies nothing, for bearer tokens and sign-ins alike.
    /// A provider that published a whole key pair (an exported private JWK pasted into the
    /// set) had tokens anyone could forge accepted.
    #[test]
    fn a_key_published_with_its_private_part_verifies_nothing(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let rsa = DevSigner::generate_rs256("rsa")?;
        let ec = DevSigner::generate_es256("ec")?;
        let some = json!(URL_SAFE_NO_PAD.encode([7u8; 32]));
        let mut entries = vec![rsa.public_jwk(), ec.public_jwk()];
        for member in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            for (i, base) in [rsa.public_jwk(), ec.public_jwk()].into_iter().enumerate() {
                let mut jwk = base;
                jwk["kid"] = json!(format!("{member}-{i}"));
                jwk[member] = if member == "oth" { json!([]) } else { some.clone() };
                let Value::Object(map) = &jwk else { unreachable!() };
                assert!(
                    fit_for_verifying(map, &[Algorithm::RS256, Algorithm::ES256]).is_err(),
                    "`{member}`: a sign-in would verify with it"
                );
                entries.push(jwk);
            }
        }
        let keys =
            parse_jwks(&json!({ "keys": entries }), &[Algorithm::RS256, Algorithm::ES256], "t")?;
        let mut kids: Vec<&str> = keys.keys().map(|k| &**k).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["ec", "rsa"]);
        Ok(())
    }

    /// A JWK that says it is not for verifying signatures (`use` other than `sig`, or
    /// `key_ops` without `verify`) verifies nothing; neither does an EC point off its
    /// curve or a P-256 point labelled P-384.
    #[test]
    fn keys_not_meant_for_verification_or_off_their_curve_are_skipped(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let ec = DevSigner::generate_es256("ec")?;
        let jwk = ec.public_jwk();
        let with = |kid: &str, member: &str, value: Value| {
            let mut j = jwk.clone();
            j["kid"] = json!(kid);
            j[member] = value;
            j
        };
        let mut y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap_or_default())?;
        if let Some(last) = y.last_mut() {
            *last ^= 1;
        }
        let doc = json!({"keys": [
            jwk.clone(),
            with("ops-verify", "key_ops", json!(["sign", "verify"])),
            with("ops-encrypt", "key_ops", json!(["encrypt"])),
            with("ops-empty", "key_ops", json!([])),
            with("ops-string", "key_ops", json!("verify")),
            with("use-enc", "use", json!("enc")),
            with("off-curve", "y", json!(URL_SAFE_NO_PAD.encode(&y))),
            with("other-curve", "crv", json!("P-384")),
        ]});
        let keys = parse_jwks(&doc, &[Algorithm::ES256, Algorithm::ES384], "t")?;
        let mut kids: Vec<&str> = keys.keys().map(|k| &**k).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["ec", "ops-verify"]);
        Ok(())
    }

    #[test]
    fn rsa_keys_that_could_never_verify_are_skipped_at_parse(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let rsa = DevSigner::generate_rs256("rsa")?;
        let jwk = rsa.public_jwk();
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap_or_default())?;
        let with = |kid: &str, n: &[u8], e: &[u8]| {
            let mut j = jwk.clone();
            j["kid"] = json!(kid);
            j["n"] = json!(URL_SAFE_NO_PAD.encode(n));
            j["e"] = json!(URL_SAFE_NO_PAD.encode(e));
            j
        };
        let mut even = n.clone();
        if let Some(last) = even.last_mut() {
            *last &= 0xfe;
        }
        // 16 384 bits, odd: each forged token would cost a verification with it.
        let mut huge = vec![0xffu8; 2048];
        huge[2047] = 0x01;
        let doc = json!({"keys": [
            with("ok", &n, &[1, 0, 1]),
            with("small", &n[..128], &[1, 0, 1]),
            with("huge", &huge, &[1, 0, 1]),
            with("e1", &n, &[1]),
            with("e2", &n, &[2]),
            with("e-huge", &n, &[1, 0, 0, 0, 0, 1]),
            with("even", &even, &[1, 0, 1]),
        ]});
        let keys = parse_jwks(&doc, &[Algorithm::RS256], "t")?;
        let kids: Vec<&str> = keys.keys().map(|k| &**k).collect();
        assert_eq!(kids, ["ok"]);
        // Same material, same fingerprint; another key, another.
        let again = parse_jwks(&doc, &[Algorithm::RS256], "t")?;
        let other = DevSigner::generate_rs256("ok")?;
        let other = parse_jwks(&signer::jwks(&[&other]), &[Algorithm::RS256], "t")?;
        let material = |k: &HashMap<Arc<str>, Arc<VerifyKey>>| k.get("ok").map(|k| k.material);
        assert_eq!(material(&keys), material(&again));
        assert_ne!(material(&keys), material(&other));
        Ok(())
    }
}
