//! The proxy's phases, in the order every request meets them. Each phase either hands
//! the request on or returns a rejection; nothing is forwarded unless every phase said
//! yes (fail closed).
//!
//! 1. own endpoints (`/.well-known/portcullis/jwks.json`)
//! 2. authority + path: one Host that agrees with the target/`:authority`, no transfer
//!    coding but `chunked` alone (else 400, and the connection closed), no
//!    TRACE/TRACK/CONNECT (405), no method/path-override header (400),
//!    SNI/Host agreement (421), canonical
//!    path (ambiguous → 400)
//! 3. route: host + path (+ method) → 404
//! 4. authenticate: bearer token or session cookie → verified identity → 401 (a
//!    browser without a session is sent to sign in instead; cookie + bearer → 400).
//!    A request with no credential at all goes on without one only as a CORS preflight
//!    on a `cors_preflight` route, or when a `public = true` rule admits it (its
//!    decision made here: no deny's request conditions hold).
//!    The sign-in endpoints (`/.portcullis/...`) are served here, before routing. A
//!    WebSocket handshake a session cookie authenticates must come from a page of this
//!    origin (else 403 `cross-origin`).
//! 5. authorize: the route's policy → 403 (a shadow policy is evaluated alongside)
//! 6. forward: header hygiene, identity headers + signed assertion, streaming, timeouts

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use tower::Service;

use super::body::{ClientBody, ProxyBody, RequestBody, RequestBodyError};
use super::{authority, headers, path, reject, ConnInfo, RequestId};
use crate::identity::{
    authorization_holds_a_token, extract_bearer, Admission, Credential, CredentialSource, Identity,
};
use crate::policy::{Decision, RequestFacts, RuleRef};
use crate::reason::Reason;
use crate::server::Runtime;

/// The path of the assertion JWKS, served on every host before routing.
pub const JWKS_PATH: &str = "/.well-known/portcullis/jwks.json";

/// What the proxy decided, handed to the access log through response extensions, or
/// for a forwarded answer through the request's [`Parked`] slot.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The client's canonical path: what was routed and authorized.
    pub path: Option<String>,
    /// The path sent upstream, when it differs from `path` (a `strip_prefix` route, an
    /// upstream with a base path).
    pub upstream_path: Option<String>,
    pub route: Option<Arc<str>>,
    pub reason: Reason,
    pub detail: Option<Cow<'static, str>>,
    pub rule: Option<Arc<RuleRef>>,
    pub shadow: Option<Decision>,
    pub identity: Option<Arc<Identity>>,
    pub upstream: Option<Arc<str>>,
    pub revision: Option<Arc<str>>,
    pub bytes_in: Arc<AtomicU64>,
    /// Whether the request reached the upstream (allow) or was refused (deny) or
    /// failed on the way (error).
    pub decision: &'static str,
}

impl Outcome {
    fn new(revision: Option<Arc<str>>) -> Self {
        Self {
            path: None,
            upstream_path: None,
            route: None,
            reason: Reason::InternalError,
            detail: None,
            rule: None,
            shadow: None,
            identity: None,
            upstream: None,
            revision,
            bytes_in: Arc::new(AtomicU64::new(0)),
            decision: "error",
        }
    }

    /// What is known of a request whose client went away before its response head:
    /// everything decided so far (parked by [`Parked::park`]), or nothing.
    pub(crate) fn client_closed(parked: Option<Outcome>) -> Self {
        let mut o = parked.unwrap_or_else(|| Outcome::new(None));
        // Authorized (and perhaps already at the upstream): the decision stays `allow`.
        o.decision = if o.reason.is_allow() { "allow" } else { "error" };
        o.reason = Reason::ClientClosed;
        o.detail = Some(Cow::Borrowed("the client went away before the response"));
        o
    }

    /// A request without its response head yet when the shutdown's grace period ended.
    pub(crate) fn shutting_down(parked: Option<Outcome>) -> Self {
        let mut o = Self::client_closed(parked);
        o.reason = Reason::ShuttingDown;
        o.detail = Some(Cow::Borrowed(
            "the shutdown's grace period ended before the response; the connection was closed",
        ));
        o
    }

    /// A request without its response head yet when its connection was closed because
    /// the client took nothing of another response for `send_timeout`.
    pub(crate) fn connection_abandoned(parked: Option<Outcome>) -> Self {
        let mut o = Self::client_closed(parked);
        o.reason = Reason::SendTimeout;
        o.detail = Some(Cow::Borrowed(
            "the connection was closed before the response: the client took nothing of \
             what it was sent for server.send_timeout",
        ));
        o
    }
}

/// Where a request's [`Outcome`] waits while the proxy waits on the upstream, so the
/// access log can still write the event (identity, rule, upstream) if the client goes
/// away meanwhile and the request's future is dropped; and where a forwarded answer's
/// outcome is left for the access log (an answer of the proxy's own carries it in its
/// extensions).
#[derive(Clone, Default)]
pub struct Parked(Arc<parking_lot::Mutex<Option<Outcome>>>);

impl Parked {
    /// Parks `out` while the caller awaits the upstream; [`Parked::take`] hands it
    /// back. (Two plain calls rather than an `async fn` wrapping the awaited future: that
    /// wrapper held the future twice over, 2 KB more to move per request.)
    fn park(&self, out: Outcome) {
        *self.0.lock() = Some(out);
    }

    /// Takes the parked outcome back (the proxy, after the upstream answered), or for
    /// the access log's drop guard, once the request's future is gone.
    pub(crate) fn take(&self) -> Option<Outcome> {
        self.0.lock().take()
    }
}

/// State shared by every connection; the runtime is swapped atomically on reload.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub replay: super::replay::ReplayCache,
    /// The store replicas share (`[redis]`): single-use tokens are checked there too.
    pub store: Option<Arc<crate::store::Store>>,
    /// The generation of the last reload, sent after `runtime` is swapped; open database
    /// sessions and WebSocket tunnels re-check their authorization on every change.
    pub reloads: tokio::sync::watch::Sender<u64>,
    /// Turns true when a shutdown's grace period (`server.shutdown_grace` as the server
    /// started with it) is over and the drain closes the connections still open: WebSocket
    /// tunnels end then too (the drain waits for their connection slots).
    pub grace_over: tokio::sync::watch::Receiver<bool>,
    /// Where WebSocket tunnels write their end event.
    pub sink: crate::audit::AuditSink,
}

impl Shared {
    /// Whether the other replicas' sign-outs were read back from the shared store once
    /// (true without one): `/readyz` and [`crate::server::Server::is_ready`] wait for it.
    pub fn sign_outs_loaded(&self) -> bool {
        self.store.as_ref().is_none_or(|s| s.synced())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

/// The innermost service: runs the phases for one request.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    conn: ConnInfo,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>, conn: ConnInfo) -> Self {
        Self { shared, conn }
    }
}

impl Service<Request<ClientBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let shared = self.shared.clone();
        let conn = self.conn.clone();
        // `map`, not an `async` block around `handle`: the block would hold the
        // handler's future a second time (twice the bytes to move into the box).
        Box::pin(handle(shared, conn, req).map(Ok))
    }
}

fn finish(mut resp: Response<ProxyBody>, outcome: Outcome) -> Response<ProxyBody> {
    resp.extensions_mut().insert(outcome);
    resp
}

/// How to word a rejection for this request.
struct RejectCtx {
    rid: Arc<str>,
    /// The client is a browser (`Accept: text/html`): an HTML page instead of JSON.
    html: bool,
    /// This request's URL, when sessions are configured: a browser's rejection page links
    /// to sign-in and back here (the link is built only for such a page).
    here: Option<Arc<str>>,
    /// The identity of a valid session cookie: a browser's rejection page says who is
    /// signed in and offers to sign out instead of signing in.
    session: Option<Arc<crate::identity::Identity>>,
    /// The renewed session cookie (a refresh, or a touch of its idle time), sent with
    /// whatever answers the request, a refusal too: after a refresh the provider may
    /// have rotated its refresh token, so the browser's old cookie would sign it out.
    set_cookies: Vec<HeaderValue>,
}

impl RejectCtx {
    /// This request's URL (empty without sessions, where nothing uses it).
    fn here(&self) -> &str {
        self.here.as_deref().unwrap_or_default()
    }
}

/// Whether `token` is used here for the first time, on this replica and, with a shared
/// store, on every other. Known by issuer and `jti`, or by what was signed: never by the
/// signature, which ECDSA lets anyone re-make (`s` → `n − s`). The store is asked first,
/// so a request it cannot check (503) leaves the token unused here.
async fn first_use(
    shared: &Shared,
    token: &str,
    identity: &Identity,
) -> Result<(), (Reason, &'static str)> {
    let key = super::replay::ReplayKey::of(token, identity);
    if let Some(store) = &shared.store {
        let until = super::replay::remembered_until(identity.expires_at);
        match store.first_use(&key.digest(), until, crate::util::unix_now()).await {
            Ok(true) => {}
            Ok(false) => {
                return Err((Reason::TokenReplayed, "token already used (shared store)"));
            }
            Err(e) => {
                crate::metrics::global().redis_errors.inc(&"replay");
                tracing::warn!(server = %store.shown(), error = %e, "single-use check failed");
                return Err((Reason::ReplayCheckUnavailable, "the shared store did not answer"));
            }
        }
    }
    if !shared.replay.first_use(key, identity.expires_at) {
        return Err((Reason::TokenReplayed, "token already used on a single-use route"));
    }
    Ok(())
}

fn rejection(
    outcome: Outcome,
    reason: Reason,
    detail: impl Into<Cow<'static, str>>,
    rc: &RejectCtx,
) -> Response<ProxyBody> {
    rejection_as(reason.status(), outcome, reason, detail, rc)
}

/// [`rejection`] with a status other than the reason's own.
fn rejection_as(
    status: StatusCode,
    mut outcome: Outcome,
    reason: Reason,
    detail: impl Into<Cow<'static, str>>,
    rc: &RejectCtx,
) -> Response<ProxyBody> {
    outcome.reason = reason;
    outcome.detail = Some(detail.into());
    outcome.decision = match reason.status() {
        s if s.is_server_error() => "error",
        _ => "deny",
    };
    let mut resp = if rc.html {
        let sign_in = rc.here.as_deref().map(crate::session::sign_in_link);
        let signed_in = rc.session.as_deref().map(|id| crate::session::pages::SignedIn {
            who: id.email.as_deref().unwrap_or(&id.subject),
            issuer: id.issuer.as_str(),
            sign_out: crate::session::LOGOUT_PATH,
        });
        reject::html_response_as(status, reason, &rc.rid, sign_in.as_deref(), signed_in)
    } else {
        reject::response(reason, &rc.rid)
    };
    *resp.status_mut() = status;
    // Answers carrying a session are `no-store` already: no shared cache keeps them.
    for c in &rc.set_cookies {
        resp.headers_mut().append(header::SET_COOKIE, c.clone());
    }
    finish(resp, outcome)
}

/// The override header a request carries, if any: one pass over its header names (a
/// length compare rejects nearly all of them), so the underscore spellings cost no
/// hashed lookups.
fn override_header(h: &http::HeaderMap) -> Option<(&'static str, &'static str)> {
    h.keys().find_map(|k| {
        let k = k.as_str().as_bytes();
        super::headers::OVERRIDES
            .iter()
            .copied()
            .find(|(name, _)| super::headers::cgi_eq(k, name.as_bytes()))
    })
}

/// Whether a query string names a `_method` parameter, which Express
/// (`methodOverride('_method')`), Symfony and Laravel (HTTP method parameter override)
/// run instead of the request's method. Names are compared as a framework reads them:
/// percent-decoded, case-insensitively, and as PHP registers them (leading spaces
/// dropped, cut at a NUL, ` ` and `.` — and an unmatched leading `[` — read as `_`);
/// `_method[…]` (an array or map) counts too.
fn query_overrides_method(query: &str) -> bool {
    const NAME: &[u8] = b"_method";
    // Every spelling has a `_`, an escape, a `.` or a `[`.
    if !query.bytes().any(|b| matches!(b, b'_' | b'%' | b'.' | b'[')) {
        return false;
    }
    query.split(['&', ';']).any(|pair| {
        let raw = pair.split('=').next().unwrap_or_default().as_bytes();
        // NAME and the byte after it are all a comparison needs.
        let (mut name, mut len) = ([0u8; NAME.len() + 1], 0);
        let mut i = 0;
        while i < raw.len() && len < name.len() {
            let escaped = (raw[i] == b'%')
                .then(|| Some(path::hex(*raw.get(i + 1)?)? << 4 | path::hex(*raw.get(i + 2)?)?))
                .flatten();
            let b = match (escaped, raw[i]) {
                (Some(b), _) => {
                    i += 2;
                    b
                }
                (None, b'+') => b' ',
                (None, b) => b,
            };
            i += 1;
            match b {
                0 => break,                   // PHP ends the name at a NUL
                b' ' if len == 0 => continue, // and drops leading spaces
                b' ' | b'.' => name[len] = b'_',
                b'[' if len == 0 => name[len] = b'_',
                b => name[len] = b.to_ascii_lowercase(),
            }
            len += 1;
        }
        name[..len].strip_prefix(NAME).is_some_and(|rest| rest.is_empty() || rest == b"[")
    })
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    mut req: Request<ClientBody>,
) -> Response<ProxyBody> {
    let rt = shared.runtime.load_full();
    let (rid, parked, over_limit) = match req.extensions().get::<RequestId>() {
        Some(r) => (r.id.clone(), r.parked.clone(), r.over_limit),
        None => (super::next_request_id(), Parked::default(), false),
    };
    let mut out = Outcome::new(Some(rt.revision.clone()));
    let sessions = rt.sessions.clone();
    let mut rc = RejectCtx {
        rid: rid.clone(),
        html: reject::wants_html(req.headers()),
        here: None,
        session: None,
        set_cookies: Vec::new(),
    };

    if over_limit {
        return rejection(
            out,
            Reason::Overloaded,
            "concurrent request on a connection while every max_connections slot is taken",
            &rc,
        );
    }

    // HTTP/1.1 heads of more fields are refused by the HTTP server (431); HTTP/2 header
    // lists only by size (`max_header_size`): the same rule for both.
    if req.headers().len() > headers::MAX_HEADER_FIELDS {
        let fields = headers::field_count(req.headers());
        if fields > headers::MAX_HEADER_FIELDS {
            // A browser gets the HTML page, as for every other refusal.
            let detail =
                format!("{fields} request header fields, more than {}", headers::MAX_HEADER_FIELDS);
            let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            return rejection_as(status, out, Reason::BadRequest, detail, &rc);
        }
    }

    // 1. Our own endpoints.
    if req.uri().path() == JWKS_PATH && req.method() == http::Method::GET {
        out.reason = Reason::Internal;
        out.decision = "allow";
        out.path = Some(JWKS_PATH.to_string());
        let mut resp = Response::new(ProxyBody::full(rt.signer.jwks(crate::util::unix_now())));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
        return finish(resp, out);
    }

    // 2. Authority: what every hop must read the same way (RFC 9112 §3.2). Ambiguous
    //    requests are refused and the connection closed, never forwarded.
    if let Err(detail) = authority::unambiguous(&req) {
        let mut resp = rejection(out, Reason::BadRequest, detail, &rc);
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    // The HTTP server decodes the `chunked` framing alone, and the body goes upstream
    // framed anew without the client's Transfer-Encoding (hop-by-hop): another coding
    // (`gzip, chunked`, `chunked` twice) would reach the upstream still applied, taken
    // for the content with nothing saying so. Refused, as nginx refuses it (501).
    if let Some(codings) = headers::unsupported_transfer_coding(req.headers()) {
        let detail = format!("request Transfer-Encoding `{codings}` is not `chunked` alone");
        let mut resp = rejection(out, Reason::BadRequest, detail, &rc);
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    // Methods are case-sensitive (RFC 9110 §9.1) but frameworks upper-case them
    // (Werkzeug, Rails, Express routing), so `delete` would pass a rule on `DELETE`
    // and run as one. Refused as nginx does: no client sends them.
    if !req.method().as_str().bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
        return rejection(
            out,
            Reason::BadRequest,
            "method is not upper case: policies match methods as sent, frameworks upper-case them",
            &rc,
        );
    }
    if super::never_forwarded(req.method().as_str()) {
        // An HTTP/1.1 `CONNECT /path` reached the upstream, whose 2xx (Go's net/rpc
        // answers `CONNECT /_goRPC_` so) both HTTP layers took for a tunnel: the client
        // got nothing at all while the event said 200. Only WebSocket upgrades are
        // tunnelled.
        let detail = format!("{} is never forwarded", req.method());
        return rejection(out, Reason::MethodNotAllowed, detail, &rc);
    }
    if let Some((name, what)) = override_header(req.headers()) {
        // Policies authorize the request's method and path; an upstream framework that
        // honours an override would run another (GET authorized, DELETE executed).
        return rejection(
            out,
            Reason::BadRequest,
            format!("`{name}` present: the {what} is authorized as sent, never overridden"),
            &rc,
        );
    }
    if req.uri().query().is_some_and(query_overrides_method) {
        return rejection(
            out,
            Reason::BadRequest,
            "`_method` in the query: the method is authorized as sent, never overridden",
            &rc,
        );
    }
    let Some(host) = authority::host(&req) else {
        return rejection(out, Reason::BadRequest, "missing or invalid Host", &rc);
    };
    if let Some(sni) = conn.tls.as_ref().and_then(|t| t.sni.as_deref()) {
        // A client must not use a connection made for one name to reach another route.
        if !sni.eq_ignore_ascii_case(&host) {
            return rejection(out, Reason::MisdirectedRequest, "TLS SNI and Host differ", &rc);
        }
    }
    let norm = match path::normalize(req.uri().path()) {
        Ok(p) => p,
        Err(e) => return rejection(out, Reason::AmbiguousPath, e.detail(), &rc),
    };
    out.path = Some(norm.to_string());
    // The authority as written and this request's URL serve only browser sign-in: the
    // sign-in endpoints, and a browser's redirect or rejection page (a navigation asks
    // for HTML too). For anything else (a pipeline's call) they stay empty and cost no
    // formatting or allocation.
    let endpoint = sessions.as_deref().filter(|s| s.is_endpoint(&norm));
    let full_authority = if endpoint.is_some() || (sessions.is_some() && rc.html) {
        let full_authority = authority::authority_with_port(&req).unwrap_or_else(|| host.clone());
        rc.here = Some(match req.uri().query() {
            Some(q) => format!("https://{full_authority}{norm}?{q}").into(),
            None => format!("https://{full_authority}{norm}").into(),
        });
        full_authority
    } else {
        String::new()
    };

    // 3a. Sign-in endpoints, on any host a route serves.
    if let Some(s) = endpoint {
        if !rt.config.routes.iter().any(|r| r.host.matches(&host)) {
            return rejection(out, Reason::NoRoute, "no route for host", &rc);
        }
        // Boxed, as the other sign-in steps below: a browser's rare paths should not
        // grow the future every request carries.
        let a = Box::pin(s.endpoint(
            &rt.config,
            req.method(),
            &norm,
            req.uri().query(),
            req.headers(),
            &full_authority,
            &rid,
        ))
        .await;
        out.reason = a.reason;
        out.detail = Some(a.detail);
        out.identity = a.identity;
        out.decision = if a.response.status().is_client_error() {
            "deny"
        } else if a.response.status().is_server_error() {
            "error"
        } else {
            "allow"
        };
        return finish(a.response, out);
    }

    // 3. Route.
    let Some((idx, route)) = rt.config.route_at(&host, &norm, req.method()) else {
        return rejection(out, Reason::NoRoute, "no route for host and path", &rc);
    };
    let route: Arc<crate::config::RouteSettings> = route.clone();
    // Not read past the route's limit, even to be discarded.
    req.body().limit_to(route.max_request_body);
    out.route = Some(route.name.clone());
    out.upstream = Some(route.upstream.display.clone());

    // 4. Authenticate: a bearer token or a session cookie, never both.
    let bearer = match extract_bearer(req.headers()) {
        Ok(b) => b,
        Err(e) => return rejection(out, e.reason, e.detail, &rc),
    };
    let has_session = sessions.as_deref().is_some_and(|s| s.cookie_present(req.headers()));
    // A browser on a route people sign in to is sent to the provider, not refused.
    let can_sign_in = sessions.is_some() && !rt.config.login_issuers(&route).is_empty();
    let navigation = can_sign_in && crate::session::is_navigation(req.method(), req.headers());
    // Boxed: a session's credential is carried across every await of the request, and
    // most requests have none (the future's size: `future_size` below).
    let mut session_key: Option<Box<_>> = None;
    let mut source = None;
    // `None` once past this step: a request let through without any credential, as a
    // CORS preflight or by a `public` rule (its decision is then already made).
    let identity: Option<Arc<Identity>> =
        match (bearer, sessions.as_deref().filter(|_| has_session)) {
            (Some(_), Some(_)) => {
                return rejection(
                    out,
                    Reason::AmbiguousCredentials,
                    "both a session cookie and a bearer token",
                    &rc,
                )
            }
            // A token the upstream may read as its caller's, beside the session's
            // identity (`authorization_holds_a_token`).
            (None, Some(_)) if authorization_holds_a_token(req.headers()) => {
                return rejection(
                    out,
                    Reason::AmbiguousCredentials,
                    "both a session cookie and a JSON Web Token in Authorization",
                    &rc,
                )
            }
            (Some((token, src)), None) => {
                let identity = match rt.verifier.verify_on(token, &conn.last_token).await {
                    Ok(id) => id,
                    Err(e) => return rejection(out, e.reason, e.detail, &rc),
                };
                out.identity = Some(identity.clone());
                if !route.accepts(&identity.issuer) {
                    return rejection(
                        out,
                        Reason::UnknownIssuer,
                        "the route does not accept this issuer",
                        &rc,
                    );
                }
                if route.single_use_tokens {
                    if let Err((reason, detail)) = first_use(&shared, token, &identity).await {
                        return rejection(out, reason, detail, &rc);
                    }
                }
                source = Some(src);
                Some(identity)
            }
            (None, Some(s)) => {
                match Box::pin(s.authenticate(&route, req.headers(), crate::util::unix_now())).await
                {
                    crate::session::Lookup::Valid {
                        identity,
                        set_cookie,
                        key,
                        revocation,
                        sign_in,
                        ..
                    } => {
                        rc.set_cookies = set_cookie;
                        session_key = Some(Box::new((key, revocation, sign_in)));
                        rc.session = Some(identity.clone());
                        // The browser sends the cookie with a WebSocket handshake from any
                        // page of the same site, and nothing like CORS keeps that page from
                        // reading the tunnel: only a page of this origin may open one.
                        if is_websocket(&req) {
                            let domain = s.settings.cookie_domain.as_deref();
                            if let Err(detail) = websocket_origin(&req, &host, domain) {
                                out.identity = Some(identity);
                                return rejection(out, Reason::CrossOrigin, detail, &rc);
                            }
                        }
                        Some(identity)
                    }
                    crate::session::Lookup::Invalid { reason, detail, clear } => {
                        let mut resp = if navigation {
                            // A signed-out session that comes back keeps its own code in
                            // the log (a copy of the cookie at work), sent to sign in
                            // all the same; an ended one is routine: `login-required`.
                            out.reason = if reason == Reason::SessionRevoked {
                                reason
                            } else {
                                Reason::LoginRequired
                            };
                            out.detail = Some(Cow::Owned(format!("{detail}; sent to sign in")));
                            out.decision = "deny";
                            finish(
                                sign_in_redirect(s, &rt.config, &route, &full_authority, &rc, &req)
                                    .await,
                                out,
                            )
                        } else {
                            rejection(out, reason, detail, &rc)
                        };
                        for c in clear {
                            resp.headers_mut().append(header::SET_COOKIE, c);
                        }
                        return resp;
                    }
                    crate::session::Lookup::None => {
                        return rejection(
                            out,
                            Reason::InternalError,
                            "session cookie vanished",
                            &rc,
                        )
                    }
                }
            }
            (None, None) if anonymous_allowed(&route, &req, &norm, &mut out) => {
                // Its event has half the audit queue (anyone can send such requests as
                // fast as they like): failing closed, it is not let through without it.
                if rt.config.audit_on_failure == crate::config::AuditOnFailure::Reject {
                    let status = shared.sink.health().present_unattributed();
                    if status != crate::audit::AuditStatus::Ok {
                        let detail = format!(
                            "refused: the audit log is {} for requests without a credential \
                             (on_failure = \"reject\")",
                            status.as_str()
                        );
                        let mut resp = rejection(out, Reason::AuditUnavailable, detail, &rc);
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                        return resp;
                    }
                }
                None
            }
            (None, None) => {
                if navigation {
                    if let Some(s) = sessions.as_deref() {
                        out.reason = Reason::LoginRequired;
                        out.detail = Some(Cow::Borrowed("no session; sent to sign in"));
                        out.decision = "deny";
                        return finish(
                            sign_in_redirect(s, &rt.config, &route, &full_authority, &rc, &req)
                                .await,
                            out,
                        );
                    }
                }
                let reason = if can_sign_in { Reason::LoginRequired } else { Reason::MissingToken };
                return rejection(out, reason, "no bearer token or session", &rc);
            }
        };
    // 5. Authorize the canonical path: the same string that is forwarded (less the
    //    route's prefix on a `strip_prefix` route: policies are written against the
    //    client's URL). (A request without a credential was decided in step 4.)
    if let Some(identity) = &identity {
        out.identity = Some(identity.clone());
        let facts = RequestFacts { method: req.method(), path: &norm, database: None, role: None };
        let decision = authorize(&route, Some(identity), &facts, &mut out);
        out.rule = decision.rule.clone();
        if !decision.allowed {
            return rejection(out, decision.reason, decision.detail(), &rc);
        }
        out.reason = decision.reason;
    }

    // 6. Forward.
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > route.max_request_body {
            return rejection(
                out,
                Reason::PayloadTooLarge,
                "content-length over the route's limit",
                &rc,
            );
        }
    }
    // The canonical path, as authorized, less the route's prefix if it strips it, after
    // the upstream's base path; the query as sent. Built before the request is taken
    // apart: `norm` borrows its path when the client sent it canonical already.
    let Some((rest, stripped)) = route.forwarded_path(&norm) else {
        return rejection(out, Reason::InternalError, "path is not under the route's prefix", &rc);
    };
    let base = &route.upstream.base_path;
    let mut target = String::with_capacity(base.len() + rest.len() + 64);
    target.push_str(base);
    target.push_str(rest);
    if !base.is_empty() || stripped.is_some() {
        out.upstream_path = Some(target.clone());
    }
    // A CORS preflight admitted without a credential goes without its query, and its
    // answer without its body (below): a browser reads only the answer's status and
    // headers (Fetch, "CORS-preflight fetch"), and no CORS answer depends on the query.
    // An upstream handler that does not check the method (a PHP script, a Go
    // `HandleFunc`, a Django function view) runs on the preflight all the same: the
    // query would be input of anyone's choosing, the body the resource given to anyone.
    let preflight = identity.is_none() && out.reason == Reason::CorsPreflight;
    if let Some(q) = req.uri().query().filter(|_| !preflight) {
        target.push('?');
        target.push_str(q);
    }
    let websocket = is_websocket(&req);
    // A service worker's script (browsers fetch it with `Service-Worker: script`): its
    // path decides the scope the worker may take, kept inside the route below.
    let sw_script = req.headers().get(&headers::SERVICE_WORKER).is_some_and(|v| v == "script");
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    // What the tunnel re-checks at reloads (the request itself goes upstream), and the
    // host as the upgrade's `http` event shows it (as sent, with its port) for the
    // tunnel's `close` event. Boxed: every request's future holds the variable.
    let upgrade =
        websocket.then(|| Box::new((req.method().clone(), super::access_log::shown_host(&req))));
    // The key that verified a tunnel's token: the tunnel ends once the issuer's key set
    // drops it. Only for an upgrade (boxed: every request's future holds the variable).
    let tunnel_key = match (websocket, source) {
        (true, Some(_)) => extract_bearer(req.headers())
            .ok()
            .flatten()
            .and_then(|(token, _)| rt.verifier.signing_key(token))
            .map(Box::new),
        _ => None,
    };

    let uri = match super::upstream::origin_form(target) {
        Ok(u) => u,
        Err(_) => return rejection(out, Reason::BadRequest, "cannot build the upstream URI", &rc),
    };
    let Some(client) = rt.clients.get(idx) else {
        return rejection(out, Reason::InternalError, "no client for route", &rc);
    };

    // For a `preserve_host` route, the authority the request was routed and authorized by:
    // the client's Host (equal to an absolute-form target's authority, see `unambiguous`),
    // or HTTP/2 `:authority`, less an empty port and a trailing dot, so the upstream reads the name
    // X-Forwarded-Host gives, not `example.com:`. Taken before the headers are cleaned:
    // what reaches the upstream is this, never whatever Host is left afterwards. A
    // `strip_prefix` route needs it too, to put its prefix back into the answer's
    // redirects to this host (`http::prefix`).
    let restore = stripped.filter(|_| route.restore_prefix);
    let client_host = (route.preserve_host || restore.is_some())
        .then(|| authority::routed_authority(&req))
        .flatten();
    let (mut parts, body) = req.into_parts();
    let h = &mut parts.headers;
    let host_sent = match &client_host {
        Some(h) if route.preserve_host => h.clone(),
        _ => client.host().clone(),
    };
    let upstream_host = restore.is_some().then(|| host_sent.clone());
    headers::clean_request(
        h,
        &headers::Hop {
            websocket,
            strip_headers: &route.strip_headers,
            drop_authorization: source == Some(CredentialSource::Authorization)
                && !route.forward_token,
            peer: &conn.peer_ip,
            trusted: conn.trusted_peer,
            proto: conn.proto(),
            host: &host,
            port: conn.local_port.as_ref(),
            prefix: stripped,
        },
        host_sent,
    );
    // Identity headers, claim headers and assertion come prebuilt, cached per identity
    // and route. A request without a credential gets none of them: only its request id
    // (a client's own copies of them all went above, with `strip_headers`).
    match &identity {
        Some(identity) => {
            let (now, signed) = (crate::util::unix_now(), route.identity_assertion);
            // The generation's signer: after a key rotation, never one with the retired key.
            let claims = &route.claim_headers;
            let forward = rt.signer.forward(identity, &route.name, now, signed, claims);
            headers::add_identity(h, &forward.identity_headers, &forward.claim_headers, &rid);
            if let Some(assertion) = &forward.assertion {
                h.insert(headers::ASSERTION.clone(), assertion.clone());
            }
        }
        None => headers::add_identity(h, &[], &[], &rid),
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let body = RequestBody::new(body, out.bytes_in.clone());
    let upload = body.progress();
    let upstream_req = Request::from_parts(parts, body);

    parked.park(out);
    let result = tokio::time::timeout(route.timeout, client.send(upstream_req)).await;
    // Nothing else takes it while this future lives.
    let mut out = parked.take().unwrap_or_else(|| Outcome::new(Some(rt.revision.clone())));
    let mut resp = match result {
        Err(_) if upload.waiting_on_client() => {
            // The upstream (as most do) waited for a body that stopped coming: the
            // client's doing, not the upstream's (a slow upload, or one held open on
            // purpose). Authorized and sent upstream, so still `allow`. A body the
            // upstream stopped taking is the upstream's (504 below).
            let detail = "the request body was still awaited from the client when the route's timeout passed";
            let mut resp = rejection(out, Reason::RequestTimeout, detail, &rc);
            if let Some(o) = resp.extensions_mut().get_mut::<Outcome>() {
                o.decision = "allow";
            }
            return resp;
        }
        Err(_) => {
            return rejection(out, Reason::UpstreamTimeout, "upstream response timed out", &rc)
        }
        Ok(Err(e)) => {
            let too_large =
                out.bytes_in.load(std::sync::atomic::Ordering::Relaxed) > route.max_request_body;
            if too_large {
                return rejection(
                    out,
                    Reason::PayloadTooLarge,
                    "request body over the route's limit",
                    &rc,
                );
            }
            // The client's body broke off or did not parse: the client's doing, not the
            // upstream's. The request was authorized and its head went upstream, so the
            // decision stays `allow` (as for a client gone before the response).
            if let Some(body) = RequestBodyError::behind(&e) {
                let mut resp = if body.is_malformed() {
                    let detail = format!("malformed request body: {body}{}", source_chain(body));
                    rejection(out, Reason::BadRequest, detail, &rc)
                } else {
                    let detail = "the client went away while sending the request body";
                    rejection(out, Reason::ClientClosed, detail, &rc)
                };
                if let Some(o) = resp.extensions_mut().get_mut::<Outcome>() {
                    o.decision = "allow";
                }
                return resp;
            }
            let detail = format!("upstream request failed: {e}{}", source_chain(&e));
            return rejection(out, Reason::UpstreamUnavailable, detail, &rc);
        }
        Ok(Ok(r)) => r,
    };

    if let Some(codings) = headers::unsupported_transfer_coding(resp.headers()) {
        // Its body cannot be passed on as it was meant (dropping it closes the connection).
        let detail = format!("upstream sent unknown Transfer-Encoding `{codings}`");
        return rejection(out, Reason::UpstreamUnavailable, detail, &rc);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let to_websocket = resp
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
        match client_upgrade {
            Some(_) if !to_websocket => {
                // Only a WebSocket was authorized; any other protocol (h2c) would carry
                // requests past per-request policy.
                return rejection(
                    out,
                    Reason::UpstreamUnavailable,
                    "upstream switched to a protocol other than websocket",
                    &rc,
                );
            }
            Some(client_upgrade) => {
                // Never so: a request without a credential is no WebSocket
                // ([`anonymous_allowed`]), and a tunnel is re-checked against its credential.
                let Some(identity) = identity else {
                    return rejection(
                        out,
                        Reason::InternalError,
                        "a tunnel without a credential",
                        &rc,
                    );
                };
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let (method, shown_host) = upgrade.map(|u| *u).unwrap_or_default();
                let grant = super::tunnel::Grant {
                    shared: shared.clone(),
                    route: route.name.clone(),
                    admission: Admission::new(
                        identity,
                        match source {
                            Some(_) => Credential::Token(tunnel_key.map(|k| *k)),
                            // No key (never so): a key no list holds, ended at a reload.
                            None => {
                                let (key, revocation, sign_in) =
                                    session_key.as_deref().cloned().unwrap_or_default();
                                Credential::Session { key, revocation, sign_in }
                            }
                        },
                        &rt.config,
                    ),
                    method,
                    host: host.clone(),
                    shown_host,
                    path: out.path.clone().unwrap_or_default(),
                    idle: rt.config.server.idle_timeout,
                    generation: rt.generation,
                    request_id: rid.clone(),
                    client_addr: conn.peer_text.clone(),
                    tls: conn.tls.clone(),
                    upstream: route.upstream.display.clone(),
                    upstream_path: out.upstream_path.clone(),
                    revoked_because: Default::default(),
                };
                // The tunnel keeps the connection's `max_connections` slot.
                let slot = conn.activity.clone();
                tokio::spawn(async move {
                    super::tunnel::run(client_upgrade, upstream_upgrade, grant).await;
                    drop(slot);
                });
            }
            None => {
                return rejection(
                    out,
                    Reason::UpstreamUnavailable,
                    "upstream switched protocols unasked",
                    &rc,
                );
            }
        }
    }
    let keep_upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = resp.into_parts();
    // hyper read the body by its Transfer-Encoding; a Content-Length beside it describes
    // nothing and is removed (RFC 9112 §6.3), or the client would be promised a length
    // the body does not have (a truncated or missing answer, logged as a success).
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    // hyper's client takes `02` and the list `2, 2` as 2; the client (or a cache or
    // balancer in front) is told 2, not a spelling it may read otherwise.
    headers::canonical_content_length(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers, keep_upgrade);
    headers::strip_proxy_set_cookies(&mut parts.headers);
    headers::strip_upstream_directives(&mut parts.headers);
    if let (Some(prefix), Some(upstream_host)) = (restore, &upstream_host) {
        let restore = super::prefix::Restore {
            prefix,
            base: &route.upstream.base_path,
            client_host: client_host.as_ref().map(HeaderValue::as_bytes),
            upstream_host: upstream_host.as_bytes(),
        };
        restore.apply(&mut parts.headers);
    }
    let script = out.path.as_deref().filter(|_| sw_script);
    headers::confine_service_worker_scope(&mut parts.headers, &route.path_prefix, script);
    // A refreshed or touched session goes back to the browser with the response, which
    // then is the browser's alone: no shared cache may keep it with the session.
    if !rc.set_cookies.is_empty() {
        headers::keep_from_shared_caches(&mut parts.headers);
    } else if (session_key.is_some() || source == Some(CredentialSource::ProxyAuthorization))
        && !keep_upgrade
    {
        // An answer the session cookie (or a `Proxy-Authorization` token) was let in for
        // is that person's: a shared cache in front that stored it would serve it to
        // anyone asking for the URL, no credential needed (RFC 9111 §3.5 keeps shared
        // caches from storing answers to `Authorization`, not to cookies, nor to
        // `Proxy-Authorization`: Varnish's built-in rules pass only the first two).
        headers::private_unless_shared_on_purpose(&mut parts.headers);
    }
    for c in std::mem::take(&mut rc.set_cookies) {
        parts.headers.append(header::SET_COOKIE, c);
    }
    out.decision = "allow";
    if preflight {
        // Dropped unread (the upstream connection is not reused then), with every header
        // a browser does not read of a preflight's answer.
        drop(body);
        headers::keep_preflight_answer(&mut parts.headers);
        return finish(Response::from_parts(parts, ProxyBody::empty()), out);
    }
    let body = ProxyBody::upstream(body, Some(route.read_timeout));
    // A forwarded answer's outcome goes back where it waited for the upstream, for the
    // access log to take there ([`Parked`]): no extension map and box to allocate, hash
    // and free on the path every forwarded request takes.
    parked.park(out);
    Response::from_parts(parts, body)
}

/// Whether a request that carries no credential at all (no bearer token, no session
/// cookie) is let through without one, recording why in `out`:
///
/// - a CORS preflight ([`is_cors_preflight`]) on a `cors_preflight = true` route
///   (anything else that looks like one is authenticated as usual). Only that: the
///   route's policy is not consulted;
/// - a request a `public = true` rule of the route's policy admits, with no deny whose
///   request conditions hold (deny wins, whoever the deny names). Never a WebSocket
///   upgrade: a tunnel is re-checked against its credential, and there is none.
///
/// Otherwise the caller is asked for a credential as before (401, or sent to sign in).
fn anonymous_allowed(
    route: &crate::config::RouteSettings,
    req: &Request<ClientBody>,
    norm: &str,
    out: &mut Outcome,
) -> bool {
    if is_websocket(req) {
        return false;
    }
    if route.cors_preflight && is_cors_preflight(req) {
        out.reason = Reason::CorsPreflight;
        out.detail = Some(Cow::Borrowed("CORS preflight without a credential"));
        return true;
    }
    let shadow_public = route.shadow_policy.as_ref().is_some_and(|s| s.has_public_rules());
    if !route.policy.has_public_rules() && !shadow_public {
        return false;
    }
    let facts = RequestFacts { method: req.method(), path: norm, database: None, role: None };
    let decision = authorize(route, None, &facts, out);
    if !decision.allowed {
        return false;
    }
    out.rule = decision.rule;
    out.reason = decision.reason;
    out.detail = Some(Cow::Borrowed("no credential; admitted by a public rule"));
    true
}

/// The route policy's decision for a caller or, with `None`, for one without any
/// credential; its shadow policy's goes into `out` (and the metric) when it differs.
fn authorize(
    route: &crate::config::RouteSettings,
    identity: Option<&Identity>,
    facts: &RequestFacts<'_>,
    out: &mut Outcome,
) -> crate::policy::Decision {
    let decision = route.policy.decide(identity, facts);
    if let Some(shadow) = &route.shadow_policy {
        let s = shadow.decide(identity, facts);
        if s.allowed != decision.allowed {
            crate::metrics::global().shadow_disagreements.inc(&route.name);
            out.shadow = Some(s);
        }
    }
    decision
}

/// A CORS preflight as a browser sends it (Fetch standard, "CORS-preflight request"):
/// `OPTIONS` with `Origin` and `Access-Control-Request-Method`, never a credential, and
/// no body.
fn is_cors_preflight(req: &Request<ClientBody>) -> bool {
    use http_body::Body as _;
    let h = req.headers();
    req.method() == http::Method::OPTIONS
        && h.contains_key(header::ORIGIN)
        && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        && !h.contains_key(header::AUTHORIZATION)
        && !h.contains_key(header::PROXY_AUTHORIZATION)
        && !h.contains_key(header::COOKIE)
        // Browsers never send a body with a preflight; one with a body (a length, chunks,
        // or HTTP/2 DATA to come) is an OPTIONS request that handlers not checking the
        // method would run, with input of the caller's choosing: it is authenticated.
        && !h.contains_key(header::TRANSFER_ENCODING)
        && h.get(header::CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0")
        && req.body().is_end_stream()
}

/// Whether a WebSocket handshake that a session cookie authenticates may use it: sent
/// by a page of this very origin (`https://` + the request's host and port), or, with
/// `cookie_domain`, of an `https://` host under that domain (which shares the cookie by
/// the operator's choice). A browser always sends `Origin` with a WebSocket handshake
/// (RFC 6455 §4.1), and `SameSite=Lax` lets the cookie ride one from any page of the same
/// site (`evil.example.com` against `app.example.com`, whatever its port or scheme to
/// browsers without schemeful same-site), which could then read and write the tunnel as
/// the signed-in user: cross-site WebSocket hijacking. No `Origin` is a client that is
/// not a browser (one holding the cookie is its user), let through.
pub fn websocket_origin<B>(
    req: &Request<B>,
    host: &str,
    cookie_domain: Option<&str>,
) -> Result<(), &'static str> {
    let mut origins = req.headers().get_all(header::ORIGIN).iter();
    let Some(origin) = origins.next() else { return Ok(()) };
    if origins.next().is_some() {
        return Err("WebSocket handshake with more than one Origin");
    }
    let refused = "WebSocket handshake with a session cookie from a page of another origin";
    // `scheme://host[:port]`, as browsers serialize it: nothing else (`null`, a path,
    // userinfo, another scheme) is a page of this host.
    let Some(rest) = origin.as_bytes().strip_prefix(b"https://") else { return Err(refused) };
    // A host name or IP literal, as a browser serializes it: the `http` crate parses
    // more (`a.com.P[&]b.example.com`), which a `cookie_domain` suffix could match.
    if !authority::is_host_and_port(rest) {
        return Err(refused);
    }
    let Some(page) =
        std::str::from_utf8(rest).ok().and_then(|a| a.parse::<http::uri::Authority>().ok())
    else {
        return Err(refused);
    };
    let page_host = page.host().trim_end_matches('.').to_ascii_lowercase();
    let Some(page_port) = authority::https_port(&page) else { return Err(refused) };
    let own_port = authority::authority_with_port(req)
        .and_then(|a| a.parse::<http::uri::Authority>().ok())
        .and_then(|a| authority::https_port(&a));
    if page_host == host && Some(page_port) == own_port {
        return Ok(());
    }
    let shared = cookie_domain.is_some_and(|d| {
        page_host == d || page_host.strip_suffix(d).is_some_and(|sub| sub.ends_with('.'))
    });
    if shared {
        return Ok(());
    }
    Err(refused)
}

/// Where a browser without a usable session goes: straight to the provider when the
/// route has one human issuer, to the chooser when it has several.
async fn sign_in_redirect(
    s: &crate::session::Sessions,
    config: &crate::config::Config,
    route: &crate::config::RouteSettings,
    authority: &str,
    rc: &RejectCtx,
    req: &Request<ClientBody>,
) -> Response<ProxyBody> {
    let here = crate::session::redirect::shorten(rc.here());
    // A URL the callback's check of the return target would refuse (an encoded control
    // character in its path) returns to the host's root, as an overlong one does,
    // rather than failing at the callback after the person has signed in.
    let here: std::borrow::Cow<'_, str> =
        if crate::session::redirect::check(&here, authority, config).is_ok() {
            here
        } else {
            format!("https://{authority}/").into()
        };
    let issuers = config.login_issuers(route);
    if let [only] = issuers.as_slice() {
        // Boxed: the provider's metadata fetch is large, and this future sits in every
        // request's (see `the_request_future_stays_small`).
        let start = Box::pin(s.start_login(&only.issuer, authority, &here, req.headers()));
        if let Ok(resp) = start.await {
            return resp;
        }
    }
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(&crate::session::sign_in_link(&here)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn is_websocket(req: &Request<ClientBody>) -> bool {
    let h = req.headers();
    let upgrade = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let conn_upgrade = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    upgrade && conn_upgrade && req.version() == http::Version::HTTP_11
}

#[cfg(test)]
mod tests {
    use super::{query_overrides_method, websocket_origin};

    /// An `Origin` whose port is no number is no page of this host's port 443, and one
    /// whose host is no host name is under no `cookie_domain` (both found by the `origin`
    /// fuzz target).
    #[test]
    fn a_websocket_origin_that_is_no_host_and_port_is_refused() {
        let handshake = |host: &str, origin: &str| {
            http::Request::builder()
                .header(http::header::HOST, host)
                .header(http::header::ORIGIN, origin)
                .body(())
                .unwrap_or_default()
        };
        let ok = handshake("app.example.com", "https://app.example.com");
        assert!(websocket_origin(&ok, "app.example.com", None).is_ok());
        for (host, origin) in [
            ("app.example.com", "https://app.example.com:844A"),
            ("app.example.com", "https://app.example.com:99999"),
            ("app.example.com:-8443", "https://app.example.com"),
        ] {
            let req = handshake(host, origin);
            assert!(websocket_origin(&req, "app.example.com", None).is_err(), "{origin}");
        }
        // Under `cookie_domain`, only a host name is a host under it: the `http` crate
        // parses `a.com.P[&]b.example.com` as an authority, no browser as an origin.
        let shared = handshake("app.example.com", "https://other.example.com");
        assert!(websocket_origin(&shared, "app.example.com", Some("example.com")).is_ok());
        let odd = handshake("app.example.com", "https://a.com.P[&]b.example.com");
        assert!(websocket_origin(&odd, "app.example.com", Some("example.com")).is_err());
    }

    #[test]
    fn a_method_override_in_the_query_is_found_however_it_is_spelled() {
        for q in [
            "_method=DELETE",
            "a=1&_method=PUT",
            "a=1;_method=PUT",
            "%5Fmethod=DELETE",
            "%5fMETHOD=DELETE",
            "_%6Dethod=DELETE",
            ".method=DELETE",
            "[method=DELETE",
            "_method",
            "_method[]=DELETE",
            "_method%5B0%5D=DELETE",
            // PHP: leading spaces dropped, the name cut at a NUL.
            "%20_method=PUT",
            "+_method=PUT",
            "++%20_method=PUT",
            "_method%00=PUT",
            "_method%00x=PUT",
        ] {
            assert!(query_overrides_method(q), "{q}");
        }
        for q in [
            "",
            "method=DELETE",
            "x_method=1",
            "_methods=1",
            "_method_x=1",
            // PHP drops leading spaces: these are `method`, not `_method`.
            "+method=DELETE",
            "%20method=DELETE",
            "a=_method",
            "q=%5Fmethod",
            "%5",
            "%zz_method=1",
        ] {
            assert!(!query_overrides_method(q), "{q}");
        }
    }
}

#[cfg(test)]
mod future_size {
    fn size_of_output<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every request's future is boxed and moved; its size is what the handler keeps
    /// across its awaits. Rare paths (sign-in, a token-cache miss, a new upstream
    /// connection) are boxed so they do not grow it: 6.7 KB before, 3.6 KB now; each KB costs
    /// memory copies on every request.
    #[test]
    fn the_request_future_stays_small() {
        let size = size_of_output(super::handle);
        assert!(size <= 4096, "handle's future is {size} bytes: box the path that grew it");
    }
}
