//! Browser single sign-on: the proxy as an OpenID Connect relying party.
//!
//! ```text
//! browser ─GET /app──> no session ─302──> provider /authorize (PKCE S256, state, nonce)
//!         <──────────── sign-in ─────────  sealed `__Host-_portcullis_login_<state>` cookie
//! browser ─GET /.portcullis/callback?code&state──> check state, exchange code, verify
//!         ID token ──> sealed session cookie ──302──> /app (only to a host we serve)
//! browser ─GET /app + session cookie──> open (AES-256-GCM) ──> Identity ──> policy
//! ```
//!
//! No server-side store: the session is a sealed cookie holding only what policy and
//! headers need, so every replica with the same key serves every user. Per request
//! the cost is opening the cookie (one AEAD), never JWT verification.
//!
//! - [`seal`]: AES-256-GCM with a key rotation list (first key seals, all open).
//! - [`cookie`]: request cookies, `Set-Cookie`, chunking over 4 KB.
//! - [`oidc`]: discovery, authorization URL, code exchange, refresh, ID-token checks.
//! - [`redirect`]: where a browser may be sent back to (open-redirect defence).
//! - [`pages`]: the small HTML pages (rejection, sign-in chooser, signed out).
//! - [`revoke`]: the sessions signed out at `/.portcullis/logout`, refused from then on
//!   whichever copy of their cookie comes back (per process).

pub mod cookie;
pub mod oidc;
pub mod pages;
pub mod redirect;
pub mod revoke;
pub mod seal;
/// Whether an `Origin` or `Referer` value names a page of this origin: `https://`, the
/// host and the port of `authority` (the request's `host[:port]`, 443 when it has none).
/// An origin is scheme, host and port: `http://` on the same host is another origin (a
/// page anyone on the path can write), and `http://host` is port 80, never 443. The
/// scheme is `https` on either listener: browser sign-in works only over HTTPS as the
/// browser sees it (the redirect URI is `https://`, the cookies `Secure`), and a plain
/// listener (`listen.insecure_http`) serves browsers through a TLS-terminating balancer.
/// `null`, an opaque origin, is not this origin, nor is a value with userinfo.
pub fn of_this_origin(value: &[u8], authority: &str) -> bool {
    let Some(at) = value.windows(3).position(|w| w == b"://") else { return false };
    if !value[..at].eq_ignore_ascii_case(b"https") {
        return false;
    }
    let rest = &value[at + 3..];
    let end = rest.iter().position(|b| matches!(b, b'/' | b'?' | b'#')).unwrap_or(rest.len());
    let page = &rest[..end];
    if page.contains(&b'@') {
        return false;
    }
    let parse = |a: &[u8]| {
        let a = std::str::from_utf8(a).ok()?.parse::<http::uri::Authority>().ok()?;
        let port = crate::http::authority::https_port(&a)?;
        Some((a.host().trim_end_matches('.').to_ascii_lowercase(), port))
    };
    match (parse(page), parse(authority.as_bytes())) {
        (Some(page), Some(own)) => page == own,
        _ => false,
    }
}

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use self::oidc::Provider;
use self::revoke::{Revocations, Revoked, SessionId};
use self::seal::{Purpose, Sealer};
use crate::config::{Config, LoginSettings, RouteSettings, SessionSettings};
use crate::http::body::ProxyBody;
use crate::identity::{Identity, IssuerId, IssuerSettings, PrincipalKind};
use crate::reason::Reason;

/// The sign-in chooser (and start of a login with `?issuer=`).
pub const SIGN_IN_PATH: &str = "/.portcullis/sign_in";
pub const LOGOUT_PATH: &str = "/.portcullis/logout";
/// Who the session is (JSON), as oauth2-proxy's `/oauth2/userinfo`; 401 without one.
pub const USERINFO_PATH: &str = "/.portcullis/userinfo";
/// Every proxy endpoint lives under this prefix, served before routing.
pub const PREFIX: &str = "/.portcullis/";
/// Prefix of the per-login cookie (`__Host-_portcullis_login_<first 16 chars of
/// state>`). Always host-only, so always `__Host-`: no sibling host can plant a sign-in
/// in progress (login CSRF by cookie tossing).
pub const LOGIN_COOKIE: &str = "__Host-_portcullis_login_";
/// How long a browser has to come back from the provider.
const LOGIN_TTL: u64 = 600;
/// Sign-ins in progress one browser may hold (one per tab sent to sign in). Each is a
/// cookie of up to ~3 KB; unbounded, a page re-navigating a window could pile up enough
/// of them to make every request to the host too large to serve (431) for 10 minutes.
const MAX_PENDING_LOGINS: usize = 3;
/// A refresh result is reused this long for requests still carrying the old cookie.
const FLIGHT_TTL: Duration = Duration::from_secs(120);

/// What a session cookie holds: only what policy and identity headers need.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionData {
    #[serde(rename = "i")]
    pub issuer: String,
    #[serde(rename = "s")]
    pub subject: String,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(rename = "v", default)]
    pub email_verified: bool,
    #[serde(rename = "g", default)]
    pub groups: Vec<String>,
    /// False after Entra group overage: group rules fail closed (`groups-unknown`).
    #[serde(rename = "k")]
    pub groups_known: bool,
    /// Unix seconds: sign-in time (absolute lifetime), last use (idle lifetime),
    /// expiry of the ID token (refresh before it).
    #[serde(rename = "c")]
    pub created: u64,
    #[serde(rename = "l")]
    pub last_seen: u64,
    #[serde(rename = "x")]
    pub expires: u64,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
    /// The ID-token claims (by name) the session keeps beside [`BASE_CLAIMS`]: those
    /// the loaded policies' rules for its issuer name under `claims.*` and those the
    /// `claim_headers` of routes accepting its issuer forward, present in the token or
    /// not ([`SessionData::keep_claims`], [`claims_named`]). `None`: sealed before sessions kept
    /// claims, so it knows [`BASE_CLAIMS`] only. A `claims.*` condition on any other
    /// name fails closed ([`crate::identity::Claims::is_kept`]).
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<Vec<String>>,
    /// Values of kept claims as the ID token had them, where they differ from what the
    /// fields above give (`null`: absent from the token). Bounded ([`MAX_KEPT_BYTES`]).
    #[serde(rename = "m", default, skip_serializing_if = "Map::is_empty")]
    pub claims: Map<String, Value>,
    /// [`BASE_CLAIMS`] the session does not know after all: the token's value differs
    /// from the one the fields above give and was too large to keep (a `groups` claim
    /// beside another `groups_claim`).
    #[serde(rename = "u", default, skip_serializing_if = "Vec::is_empty")]
    pub not_kept: Vec<String>,
    /// Which session this is: drawn at sign-in, kept by every renewal, so sign-out can
    /// refuse every copy of the cookie ([`revoke`]). None (all zero) in a cookie sealed
    /// before sessions had one, and kept so: such a session is known by its issuer,
    /// subject and sign-in time ([`SessionData::revocation_key`]).
    #[serde(rename = "d", default, skip_serializing_if = "SessionId::is_none")]
    pub id: SessionId,
    /// The sign-in ID token's `acr` (at most [`MAX_ACR_BYTES`]), kept by every renewal:
    /// the authentication context of the sign-in, which the login's `acr_values` hold
    /// on every request ([`Sessions::authenticate`]), as they hold each bearer ID token.
    /// `None`: the token had none, or the cookie was sealed before sessions kept it.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    /// The ID token's Google Workspace domain, `hd` (at most [`MAX_ACR_BYTES`]), from the
    /// sign-in or the latest refresh that had one: the issuer's `hosted_domain` holds it
    /// on every request ([`sign_in_refused`]), as it holds each bearer ID token (V24).
    /// `None`: the token had none, or the cookie was sealed before sessions kept it.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub hd: Option<String>,
    /// What the session's identity was read under ([`identity_source`]), at the sign-in
    /// or the latest refresh that re-read it: a reload that re-points the issuer, moves
    /// its `groups_claim` or changes the login's `client_id` refuses the session at once
    /// ([`sign_in_refused`]), as it would read a bearer token differently at once.
    /// `None`: sealed before sessions kept it; such a session gets it at its next
    /// refresh, and is not refused for it until then.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What a session keeps of its sign-in that the issuer's settings as now loaded hold it
/// to, on every request ([`Sessions::authenticate`]) and at every reload for what the
/// session opened that outlives a request (a WebSocket tunnel,
/// [`crate::identity::Admission::recheck`]): a reload that tightens them refuses the session at
/// once, as it refuses a bearer ID token of the same person, not at its next refresh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignIn {
    /// The sign-in's `acr` ([`SessionData::acr`]).
    pub acr: Option<Arc<str>>,
    /// The ID token's `hd` ([`SessionData::hd`]).
    pub hd: Option<Arc<str>>,
    /// Whether the session's email is verified ([`SessionData::email_verified`]).
    pub email_verified: bool,
    /// What its identity was read under ([`SessionData::source`]).
    pub source: Option<Arc<str>>,
}

/// What an ID token of the issuer is read under: the provider (its `issuer` URL), the
/// client its tokens are issued to (the login's `client_id`) and where its groups are
/// (`groups_claim`); 8 bytes of their SHA-256, in hex (a cookie holds it).
pub fn identity_source(settings: &IssuerSettings, login: &LoginSettings) -> String {
    let text = format!("{}\n{}\n{}", settings.issuer, login.client_id, settings.groups_claim);
    crate::util::sha256(text.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the issuer `settings` with `login` no longer admits a session signed in as
/// `sign_in`, or `None`. Each request is held to what the issuer asks for now, as each
/// bearer ID token of the issuer is; a refresh does not ask the provider for the
/// sign-in's context again, so the session signs in again instead:
/// - the login asks for `acr_values` and the sign-in showed none of them (signed in
///   before a reload added or changed them, or sealed before sessions kept `acr`);
/// - the issuer has `hosted_domain` and the session's `hd` is another (or none: signed
///   in before a reload added it, or sealed before sessions kept `hd`), or its email is
///   not verified (V24);
/// - the session's identity was read under another `issuer` URL, login `client_id` or
///   `groups_claim` ([`identity_source`]): its groups, or the person, may not be those a
///   token of the issuer as loaded gives.
pub fn sign_in_refused(
    settings: &IssuerSettings,
    login: &LoginSettings,
    sign_in: &SignIn,
) -> Option<&'static str> {
    if let Some(mut asked) = login.acr_values() {
        if !sign_in.acr.as_deref().is_some_and(|acr| asked.any(|a| a == acr)) {
            return Some(
                "the session's sign-in showed no `acr` of the login's `acr_values`: sign in again",
            );
        }
    }
    if let Some(domain) = &settings.hosted_domain {
        if sign_in.hd.as_deref() != Some(domain.as_str()) || !sign_in.email_verified {
            return Some(
                "the session's `hd` is not the issuer's `hosted_domain`, or its email is not verified: sign in again",
            );
        }
    }
    if sign_in.source.as_deref().is_some_and(|s| s != identity_source(settings, login)) {
        return Some(
            "the issuer's `issuer`, `groups_claim` or login `client_id` changed since the session's identity was read: sign in again",
        );
    }
    None
}

/// At most this many bytes of the sign-in's `acr` (or `hd`) are kept (a longer one is
/// not kept, and a login asking for `acr_values` (an issuer with `hosted_domain`) then
/// refuses the session).
pub const MAX_ACR_BYTES: usize = 256;

/// Claims every session knows, from its own fields (as sessions always have).
pub const BASE_CLAIMS: [&str; 4] = ["sub", "email", "email_verified", "groups"];
/// At most this many bytes of one kept claim (its name and JSON value): a larger one
/// is not kept, and rules naming it fail closed. Sessions are cookies (8 chunks).
pub const MAX_KEPT_CLAIM_BYTES: usize = 1024;
/// At most this many bytes of kept claims (names and JSON values) in all; claims (in
/// name order) past it are not kept.
pub const MAX_KEPT_BYTES: usize = 4096;

/// What `/.portcullis/userinfo` answers.
#[derive(Debug, Serialize)]
struct UserInfo<'a> {
    issuer: &'a str,
    subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    email_verified: bool,
    groups: &'a [String],
    /// Only when `true`: the provider signalled group overage, so `groups` is empty
    /// and group rules fail closed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    groups_unknown: bool,
    /// When the session ends at the latest (RFC 3339, UTC), unless it goes idle first.
    expires_at: String,
}

/// A sign-in in progress, sealed into the `__Host-_portcullis_login_*` cookie.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoginState {
    #[serde(rename = "i")]
    issuer: String,
    #[serde(rename = "s")]
    state: String,
    #[serde(rename = "n")]
    nonce: String,
    #[serde(rename = "p")]
    pkce: String,
    /// Where to go afterwards (absolute, already checked once).
    #[serde(rename = "r")]
    return_to: String,
    #[serde(rename = "u")]
    redirect_uri: String,
    #[serde(rename = "x")]
    expires: u64,
    /// When it started, in Unix nanoseconds, strictly increasing within a process:
    /// orders sign-ins started close together (the oldest are ended first). Cookies
    /// sealed before it existed read as 0, the oldest.
    #[serde(rename = "t", default)]
    started_ns: u64,
}

/// The result of looking at a request's session cookie.
#[derive(Debug)]
pub enum Lookup {
    /// No session cookie.
    None,
    Valid {
        identity: Arc<Identity>,
        set_cookie: Vec<HeaderValue>,
        /// The key that sealed the browser's cookie (after `set_cookie`, if any): what
        /// outlives the request (a WebSocket tunnel) holds while that key is in use.
        key: seal::KeyId,
        /// How the sign-out list knows the session ([`SessionData::revocation_key`]):
        /// what outlives the request ends when the session is signed out.
        revocation: [u8; 16],
        /// What the session keeps of its sign-in ([`SessionData::sign_in`]): what
        /// outlives the request ends when a reload's issuer no longer admits it. Boxed:
        /// the request's future holds the lookup (its size: `http::proxy`).
        sign_in: Box<SignIn>,
        /// Unix seconds when the session ends at the latest without a new sign-in: its
        /// absolute lifetime, or its ID token's expiry when there is no refresh token
        /// (the idle lifetime can end it sooner).
        ends_at: u64,
    },
    /// A session cookie that cannot be used; `clear` deletes it.
    Invalid { reason: Reason, detail: &'static str, clear: Vec<HeaderValue> },
}

/// What an endpoint (`/.portcullis/...`) answered, for the access log.
#[derive(Debug)]
pub struct Answer {
    pub response: Response<ProxyBody>,
    pub reason: Reason,
    pub detail: Cow<'static, str>,
    pub identity: Option<Arc<Identity>>,
}

/// One refresh in flight (or just done), shared by requests with the same token.
type Flight = (Instant, Arc<tokio::sync::OnceCell<Option<SessionData>>>);

/// Session state of one configuration generation.
pub struct Sessions {
    pub settings: SessionSettings,
    /// The session cookie's wire name: `cookie_name` behind `__Host-` (host-only) or
    /// `__Secure-` (with `cookie_domain`); see [`cookie::session_name`].
    cookie_name: String,
    sealer: Sealer,
    providers: Vec<Arc<Provider>>,
    /// Per login issuer: the claims its sessions keep ([`claims_named`]).
    kept_claims: HashMap<IssuerId, Vec<Arc<str>>>,
    flights: Mutex<HashMap<[u8; 32], Flight>>,
    /// Refresh-token exchanges made (tests assert single flight with it).
    pub refreshes: AtomicU64,
    /// Sessions signed out: the process's list, handed from generation to generation.
    revocations: Arc<Revocations>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("providers", &self.providers).finish()
    }
}

/// Now in Unix nanoseconds, and never the same value twice in this process (two sign-ins
/// started within a clock tick still have an order).
fn login_started_ns() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let previous = LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
        Some(now.max(last.saturating_add(1)))
    });
    now.max(previous.unwrap_or(0).saturating_add(1))
}

/// Whether a request is a browser navigation that may be redirected to sign in: GET or
/// HEAD, no `Authorization`, and an `Accept` that asks for HTML.
/// A browser that says what it is doing (`Sec-Fetch-Mode`) must say `navigate`: a
/// `fetch()` or XHR asking for HTML gets a 401, not a redirect and a login cookie.
pub fn is_navigation(method: &Method, headers: &HeaderMap) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && !headers.contains_key(header::AUTHORIZATION)
        && headers.get("sec-fetch-mode").is_none_or(|m| m.as_bytes() == b"navigate")
        && crate::http::reject::wants_html(headers)
}

/// `/.portcullis/sign_in?rd=<url>`.
pub fn sign_in_link(return_to: &str) -> String {
    format!("{SIGN_IN_PATH}?rd={}", encode(return_to))
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let q = query?;
    let mut found = None;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            if found.is_some() {
                // A repeated parameter is ambiguous; refuse to pick one.
                return None;
            }
            let v = v.replace('+', " ");
            found = Some(percent_encoding::percent_decode_str(&v).decode_utf8_lossy().into_owned());
        }
    }
    found
}

/// Whether `name` is in the query at all (once or more; [`query_param`] refuses more).
fn has_param(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|p| p.split_once('=').map_or(p, |(k, _)| k) == name))
}

fn redirect(location: &str, cookies: Vec<HeaderValue>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::empty());
    *r.status_mut() = StatusCode::FOUND;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        h.append(header::SET_COOKIE, c);
    }
    r
}

// === impl SessionData ===

impl SessionData {
    /// What the revocation list knows the session by: its [`SessionId`], or for a cookie
    /// sealed before sessions had one, a digest of its issuer, subject and sign-in time
    /// (so two such sessions of one person signed in within the same second are signed
    /// out together). Computed without allocating.
    pub fn revocation_key(&self) -> [u8; 16] {
        if !self.id.is_none() {
            return self.id.0;
        }
        #[cfg(test)]
        tests::LEGACY_KEY_DIGESTS.with(|n| n.set(n.get() + 1));
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"portcullis session without id\0");
        ctx.update(self.issuer.as_bytes());
        ctx.update(b"\0");
        ctx.update(self.subject.as_bytes());
        ctx.update(b"\0");
        ctx.update(&self.created.to_be_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&ctx.finish().as_ref()[..16]);
        key
    }

    /// The claims the session's own fields give ([`BASE_CLAIMS`]).
    fn base_claims(&self) -> Map<String, Value> {
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::String(self.subject.clone()));
        if let Some(e) = &self.email {
            claims.insert("email".into(), Value::String(e.clone()));
        }
        claims.insert("email_verified".into(), Value::Bool(self.email_verified));
        claims.insert(
            "groups".into(),
            Value::Array(self.groups.iter().cloned().map(Value::String).collect()),
        );
        claims
    }

    /// Keeps, of the ID token's claims `token`, those named in `wanted` (with what the
    /// fields already give, the [`BASE_CLAIMS`]), within [`MAX_KEPT_CLAIM_BYTES`] each
    /// and [`MAX_KEPT_BYTES`] in all. Replaces what was kept before.
    pub fn keep_claims(&mut self, token: &Map<String, Value>, wanted: &[Arc<str>]) {
        let base = self.base_claims();
        let mut kept = Vec::new();
        let mut values = Map::new();
        let mut not_kept = Vec::new();
        let mut budget = MAX_KEPT_BYTES;
        let mut wanted: Vec<&str> = wanted.iter().map(|n| &**n).collect();
        wanted.sort_unstable();
        wanted.dedup();
        // What the provider put elsewhere (`_claim_names`, Entra's `hasgroups`) has no
        // value here: not kept, so rules naming it fail closed as for a token.
        for name in wanted {
            let in_base = BASE_CLAIMS.contains(&name);
            if crate::identity::held_elsewhere(token, name) {
                if in_base {
                    not_kept.push(name.to_string());
                }
                continue;
            }
            let value = token.get(name);
            if in_base && value == base.get(name) {
                continue;
            }
            let size = name.len()
                + value.map_or(0, |v| serde_json::to_string(v).map_or(usize::MAX, |t| t.len()));
            if size > MAX_KEPT_CLAIM_BYTES || size > budget {
                // The name is the configuration's; the value is never logged.
                tracing::warn!(
                    issuer = %self.issuer,
                    claim = name,
                    bytes = size,
                    "the session does not keep this ID-token claim (over its size limit): rules naming it fail closed, and claim headers naming it are not sent"
                );
                if in_base {
                    not_kept.push(name.to_string());
                }
                continue;
            }
            budget -= size;
            match value {
                Some(v) => {
                    values.insert(name.to_string(), v.clone());
                }
                // Absent from the token, but the fields give a value: say it is absent.
                None if in_base => {
                    values.insert(name.to_string(), Value::Null);
                }
                None => {}
            }
            if !in_base {
                kept.push(name.to_string());
            }
        }
        self.kept = Some(kept);
        self.claims = values;
        self.not_kept = not_kept;
    }

    /// What the session keeps of its sign-in, which the issuer as loaded holds it to.
    pub fn sign_in(&self) -> SignIn {
        SignIn {
            acr: self.acr.as_deref().map(Arc::from),
            hd: self.hd.as_deref().map(Arc::from),
            email_verified: self.email_verified,
            source: self.source.as_deref().map(Arc::from),
        }
    }

    /// The identity policy sees. `claims` holds only what the session keeps, and knows
    /// which names those are. `kind` is the issuer's configured `kind`, as a bearer ID
    /// token of the issuer gets (audit and identity headers say the same either way).
    pub fn identity(&self, issuer: IssuerId, kind: PrincipalKind, expires_at: u64) -> Identity {
        let mut claims = self.base_claims();
        let kept: Vec<&str> = BASE_CLAIMS
            .iter()
            .copied()
            .filter(|b| !self.not_kept.iter().any(|n| n == b))
            .chain(self.kept.iter().flatten().map(String::as_str))
            .collect();
        for name in &self.not_kept {
            claims.remove(name);
        }
        for (name, value) in &self.claims {
            if !kept.contains(&name.as_str()) {
                continue;
            }
            match value {
                Value::Null => claims.remove(name),
                v => claims.insert(name.clone(), v.clone()),
            };
        }
        Identity {
            issuer,
            subject: self.subject.clone(),
            kind,
            email: self.email.clone(),
            email_verified: self.email_verified,
            groups: self.groups.clone(),
            groups_known: self.groups_known,
            expires_at,
            issued_at: Some(self.created),
            ci: None,
            claims: crate::identity::Claims::kept_only(claims, kept),
            audit: Default::default(),
        }
    }
}

/// A string claim of an ID token that the session keeps of its sign-in ([`SignIn`]):
/// at most [`MAX_ACR_BYTES`], else not kept (and a setting asking for it refuses the
/// session).
fn sign_in_claim(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).filter(|v| v.len() <= MAX_ACR_BYTES).map(str::to_owned)
}

/// The claim names that sessions of `issuer` need, sorted: those rules for `issuer`
/// use (`claims.NAME`), in every policy of `config` (routes, shadow policies,
/// databases), and those the `claim_headers` of routes accepting `issuer` forward. A
/// rule matches only the issuers it names, so rules for other issuers are left out; for
/// policies the routes are not looked at: a session cookie serves every route of its
/// host (of `cookie_domain`), and which issuers a route accepts changes by reload as
/// policies do.
pub fn claims_named(config: &Config, issuer: &IssuerId) -> Vec<Arc<str>> {
    let policies = config
        .routes
        .iter()
        .flat_map(|r| std::iter::once(&r.policy).chain(r.shadow_policy.as_ref()))
        .chain(config.databases.iter().map(|d| &d.policy));
    let forwarded = config
        .routes
        .iter()
        .filter(|r| r.accepts(issuer))
        .flat_map(|r| r.claim_headers.iter().map(|c| c.claim.clone()));
    let mut names: Vec<Arc<str>> = policies
        .flat_map(|p| p.rules())
        .filter(|r| r.issuers().contains(issuer))
        .flat_map(|r| r.conditions().filter_map(|c| c.claim_name().cloned()))
        .chain(forwarded)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

// === impl Sessions ===

impl Sessions {
    /// Sessions for a configuration: `None` when no issuer has `login`. Reads the
    /// session keys and client secrets (errors name the source, never the value).
    /// `revocations`: the process's signed-out sessions, which outlive a reload.
    pub fn build(
        config: &Config,
        revocations: Arc<Revocations>,
    ) -> Result<Option<Sessions>, String> {
        let Some(settings) = config.session.clone() else { return Ok(None) };
        let keys = settings.keys.read().map_err(|e| format!("[session] keys: {e}"))?;
        let sealer = Sealer::from_text(&keys).map_err(|e| format!("[session] keys: {e}"))?;
        let mut providers = Vec::new();
        let mut kept_claims = HashMap::new();
        for login in &config.logins {
            kept_claims.insert(login.issuer.clone(), claims_named(config, &login.issuer));
            let Some(issuer) = config.issuer(login.issuer.as_str()) else { continue };
            let mut issuer = issuer.clone();
            // azp/aud of the login's ID tokens name the login client.
            issuer.client_id = Some(login.client_id.clone());
            providers.push(Arc::new(Provider::new(issuer, login.clone())?));
        }
        Ok(Some(Sessions {
            cookie_name: cookie::session_name(
                &settings.cookie_name,
                settings.cookie_domain.as_deref(),
            ),
            settings,
            sealer,
            providers,
            kept_claims,
            flights: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
            revocations,
        }))
    }

    /// A sessions value from parts (tests and benches; no providers).
    pub fn with_sealer(settings: SessionSettings, sealer: Sealer) -> Sessions {
        Sessions {
            cookie_name: cookie::session_name(
                &settings.cookie_name,
                settings.cookie_domain.as_deref(),
            ),
            settings,
            sealer,
            providers: Vec::new(),
            kept_claims: HashMap::new(),
            flights: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
            revocations: Arc::default(),
        }
    }

    /// The signed-out sessions these sessions refuse.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Signs `data` out for good: every copy of its cookie is refused from now on (until
    /// the session would have ended anyway). A full list refuses more rather than
    /// forgetting ([`Revocations::revoke`]): that is logged and counted.
    pub fn revoke(&self, data: &SessionData, now: u64) -> Revoked {
        let lifetime = self.settings.absolute_lifetime.as_secs();
        let outcome = self.revocations.revoke(data.revocation_key(), data.created, lifetime, now);
        let m = crate::metrics::global();
        match outcome {
            Revoked::Recorded => {
                m.sessions_revoked.fetch_add(1, Ordering::Relaxed);
            }
            Revoked::Overflow { floor } => {
                m.sessions_revoked.fetch_add(1, Ordering::Relaxed);
                m.session_revocation_overflows.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    entries = self.revocations.len(),
                    floor = %humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(floor)
                    ),
                    "the signed-out session list is full: every session signed in at or before \
                     the floor is refused from now on (those users sign in again)"
                );
            }
            Revoked::Already | Revoked::Ended => {}
        }
        m.session_revocation_entries.store(self.revocations.len() as u64, Ordering::Relaxed);
        outcome
    }

    /// The claims sessions of `issuer` keep: those the loaded policies name and the
    /// routes accepting it forward ([`claims_named`]).
    pub fn kept_claims(&self, issuer: &IssuerId) -> &[Arc<str>] {
        self.kept_claims.get(issuer).map_or(&[], Vec::as_slice)
    }

    fn provider(&self, id: &str) -> Option<&Arc<Provider>> {
        self.providers.iter().find(|p| p.settings.id.as_str() == id)
    }

    /// Whether `path` is one of the proxy's own endpoints.
    pub fn is_endpoint(&self, path: &str) -> bool {
        path == SIGN_IN_PATH
            || path == LOGOUT_PATH
            || path == USERINFO_PATH
            || self.providers.iter().any(|p| p.login.redirect_path == path)
    }

    /// The session cookie's name on the wire (`__Host-_portcullis` by default).
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// The request carries a session cookie (or a chunk of one). A cookie without the
    /// prefix (from before it, or tossed from a sibling host) is not one.
    pub fn cookie_present(&self, headers: &HeaderMap) -> bool {
        cookie::present(&cookie::parse(headers), &self.cookie_name)
    }

    /// Deletes a session cookie from before the prefixes (the bare `cookie_name`, with
    /// the attributes it was set with) when the request still carries one: it no longer
    /// signs anyone in, and would only take room in every request head.
    fn clear_unprefixed(&self, cookies: &[(&str, &str)]) -> Vec<HeaderValue> {
        let old = &self.settings.cookie_name;
        if !cookie::present(cookies, old) {
            return Vec::new();
        }
        cookie::clear(cookies, old, self.settings.cookie_domain.as_deref())
    }

    fn attrs(&self, max_age: u64) -> cookie::Attrs<'_> {
        cookie::Attrs { domain: self.settings.cookie_domain.as_deref(), max_age }
    }

    /// Seal a session into its `Set-Cookie` headers (chunked when large).
    pub fn seal_session(
        &self,
        data: &SessionData,
        request_cookies: &[(&str, &str)],
    ) -> Result<Vec<HeaderValue>, String> {
        let json = serde_json::to_vec(data).map_err(|e| e.to_string())?;
        let sealed = self.sealer.seal(Purpose::Session, &json)?;
        let deadline = data.created + self.settings.absolute_lifetime.as_secs();
        let max_age = deadline.saturating_sub(crate::util::unix_now()).max(1);
        cookie::write(request_cookies, &self.cookie_name, &sealed, &self.attrs(max_age))
            .ok_or_else(|| "session too large for cookies (over 8 chunks)".to_string())
    }

    /// Open the session cookie, without any lifetime checks.
    pub fn open_session(
        &self,
        cookies: &[(&str, &str)],
    ) -> Result<Option<SessionData>, &'static str> {
        self.open_keyed(cookies).map(|o| o.map(|(data, _)| data))
    }

    /// [`Sessions::open_session`], and the key that sealed the cookie.
    fn open_keyed(
        &self,
        cookies: &[(&str, &str)],
    ) -> Result<Option<(SessionData, seal::KeyId)>, &'static str> {
        let sealed = match cookie::read(cookies, &self.cookie_name) {
            None => return Ok(None),
            Some(Err(())) => return Err("duplicate or incomplete session cookie"),
            Some(Ok(s)) => s,
        };
        let (plain, key) =
            self.sealer.open_keyed(Purpose::Session, &sealed).map_err(|e| match e {
                seal::OpenError::Malformed => "session cookie is malformed",
                seal::OpenError::UnknownKey => "session cookie sealed with an unknown key",
                seal::OpenError::Tampered => "session cookie failed authentication",
            })?;
        let data = serde_json::from_slice(&plain).map_err(|_| "session cookie content")?;
        Ok(Some((data, key)))
    }

    /// Whether a browser session opened at `created` and sealed with `key` would still be
    /// let in by these settings at `now`, as far as that can be told without its cookie:
    /// its key still in the rotation list (rotating the keys signs everyone out), its
    /// absolute lifetime not reached. For what outlives the request that admitted it.
    pub fn still_admits(
        &self,
        key: &seal::KeyId,
        created: u64,
        now: u64,
    ) -> Result<(), &'static str> {
        if !self.sealer.knows(key) {
            return Err("the session's key is no longer in [session] keys");
        }
        if now >= created.saturating_add(self.settings.absolute_lifetime.as_secs()) {
            return Err("absolute session lifetime reached");
        }
        Ok(())
    }

    /// The session of a request, checked, refreshed when due, for `route`.
    pub async fn authenticate(
        &self,
        route: &RouteSettings,
        headers: &HeaderMap,
        now: u64,
    ) -> Lookup {
        self.check(Some(route), headers, now).await
    }

    /// [`Sessions::authenticate`]; without a route (the proxy's own endpoints), a
    /// session of any issuer with `login` configured.
    async fn check(&self, route: Option<&RouteSettings>, headers: &HeaderMap, now: u64) -> Lookup {
        let cookies = cookie::parse(headers);
        let name = &self.cookie_name;
        if !cookie::present(&cookies, name) {
            return Lookup::None;
        }
        // A duplicate fails closed (no guessing which is ours), and the clear below
        // deletes it. Host-only, the name is `__Host-`: a browser holds one such cookie
        // per host (no `Domain`, `Path=/` only), set by this host, so the clear leaves
        // no copy behind, least of all a tossed one (a sibling host can only plant names
        // this never reads). With `cookie_domain` a sibling host under the domain
        // shares the cookie and can replace it: not a boundary (docs/sso.md).
        let invalid = |reason, detail| Lookup::Invalid {
            reason,
            detail,
            clear: cookie::clear(&cookies, name, self.settings.cookie_domain.as_deref()),
        };
        let (mut data, mut key) = match self.open_keyed(&cookies) {
            Ok(Some(d)) => d,
            Ok(None) => {
                return invalid(Reason::SessionInvalid, "session cookie chunks without their head")
            }
            Err(detail) => return invalid(Reason::SessionInvalid, detail),
        };
        // Signed out (this copy of the cookie or another): as if there were none. Before
        // anything else, a refresh least of all: it would renew the session.
        // Computed once: for a cookie without a session id it is a SHA-256.
        let mut revocation = data.revocation_key();
        if let Some(detail) = self.revocations.refused(&revocation, data.created) {
            return invalid(Reason::SessionRevoked, detail);
        }
        let Some(provider) = self.provider(&data.issuer).cloned() else {
            return invalid(
                Reason::SessionInvalid,
                "session issuer no longer has login configured",
            );
        };
        if route.is_some_and(|r| !r.accepts(&provider.settings.id)) {
            // Valid, just not here: kept for the routes that accept it (clearing it would
            // sign the browser out everywhere, from any link to such a route). A sign-in
            // here replaces it.
            return Lookup::Invalid {
                reason: Reason::SessionInvalid,
                detail: "the route does not accept the session's issuer",
                clear: Vec::new(),
            };
        }
        if let Some(detail) = sign_in_refused(&provider.settings, &provider.login, &data.sign_in())
        {
            return invalid(Reason::SessionExpired, detail);
        }
        let s = &self.settings;
        let deadline = data.created.saturating_add(s.absolute_lifetime.as_secs());
        if now >= deadline {
            return invalid(Reason::SessionExpired, "absolute session lifetime reached");
        }
        if now >= data.last_seen.saturating_add(s.idle_lifetime.as_secs()) {
            return invalid(Reason::SessionExpired, "idle session lifetime reached");
        }
        let mut changed = false;
        if now.saturating_add(s.refresh_before.as_secs()) >= data.expires {
            match &data.refresh {
                Some(_) => match self.refresh(&provider, &data, now).await {
                    // Signed out while the refresh was at the provider: the renewed
                    // session is the same session (its id is kept), so it is refused too.
                    Some(new) => {
                        let renewed = new.revocation_key();
                        if let Some(detail) = self.revocations.refused(&renewed, new.created) {
                            return invalid(Reason::SessionRevoked, detail);
                        }
                        (data, revocation, changed) = (new, renewed, true);
                    }
                    None => return invalid(Reason::SessionExpired, "refresh failed"),
                },
                None if now >= data.expires => {
                    return invalid(
                        Reason::SessionExpired,
                        "ID token expired and there is no refresh token",
                    )
                }
                None => {}
            }
        }
        // Idle tracking costs a Set-Cookie now and then, not on every request.
        let touch = (s.idle_lifetime.as_secs() / 8).clamp(1, 300);
        if now.saturating_sub(data.last_seen) >= touch {
            data.last_seen = now;
            changed = true;
        }
        let set_cookie = if changed {
            match (self.seal_session(&data, &cookies), self.sealer.sealing_key()) {
                (Ok(c), Some(sealed_with)) => {
                    key = sealed_with;
                    c
                }
                _ => return invalid(Reason::SessionInvalid, "cannot re-seal the session"),
            }
        } else {
            Vec::new()
        };
        let expires_at = data.expires.min(deadline);
        let ends_at = if data.refresh.is_some() { deadline } else { expires_at };
        Lookup::Valid {
            sign_in: Box::new(data.sign_in()),
            identity: Arc::new(data.identity(
                provider.settings.id.clone(),
                provider.settings.kind,
                expires_at,
            )),
            set_cookie,
            key,
            revocation,
            ends_at,
        }
    }

    /// One refresh per session at a time: requests carrying the same refresh token
    /// share one exchange and its result (kept briefly for late requests with the old
    /// cookie, since providers that rotate refresh tokens refuse the old one).
    async fn refresh(
        &self,
        provider: &Arc<Provider>,
        data: &SessionData,
        now: u64,
    ) -> Option<SessionData> {
        let rt = data.refresh.as_deref()?;
        let cell = {
            let mut flights = self.flights.lock();
            flights.retain(|_, (at, _)| at.elapsed() < FLIGHT_TTL);
            flights
                .entry(crate::util::sha256(rt.as_bytes()))
                .or_insert_with(|| (Instant::now(), Arc::new(tokio::sync::OnceCell::new())))
                .1
                .clone()
        };
        cell.get_or_init(|| async {
            self.refreshes.fetch_add(1, Ordering::Relaxed);
            let new = self.refresh_exchange(provider, data, rt, now).await;
            let outcome = if new.is_some() { "ok" } else { "error" };
            crate::metrics::global()
                .session_refreshes
                .inc(&(provider.settings.id.0.clone(), outcome));
            new
        })
        .await
        .clone()
    }

    /// One refresh-token exchange, and the session it renews (`None`: refused).
    async fn refresh_exchange(
        &self,
        provider: &Arc<Provider>,
        data: &SessionData,
        rt: &str,
        now: u64,
    ) -> Option<SessionData> {
        {
            let v = match provider.refresh(rt).await {
                Ok(v) => v,
                Err(e) => {
                    // Escaped: the error can quote the provider's certificate names.
                    let error = crate::diag::Visible(&e.0);
                    tracing::info!(issuer = %provider.settings.id, %error, "session refresh failed");
                    return None;
                }
            };
            let mut new = data.clone();
            new.expires = v.id_token_exp;
            new.refresh = v.refresh_token;
            new.last_seen = now;
            if !v.claims.is_empty() {
                // Google sends `hd` on a refresh too; a token without one keeps the
                // sign-in's (the account's domain does not change).
                if let Some(hd) = sign_in_claim(&v.claims, "hd") {
                    new.hd = Some(hd);
                }
                let id = match crate::identity::verify::identity_from_verified(
                    &provider.settings,
                    v.claims,
                ) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::info!(issuer = %provider.settings.id, reason = %e.reason, "refreshed ID token refused");
                        return None;
                    }
                };
                if id.subject != data.subject {
                    tracing::warn!(issuer = %provider.settings.id, "refreshed ID token names another subject");
                    return None;
                }
                new.email = id.email;
                new.email_verified = id.email_verified;
                new.groups = id.groups;
                new.groups_known = id.groups_known;
                new.source = Some(identity_source(&provider.settings, &provider.login));
                // What this configuration's policies name (a reload may have added
                // claims since the sign-in), from the fresh ID token.
                new.keep_claims(id.claims.map(), self.kept_claims(&provider.settings.id));
            }
            Some(new)
        }
    }

    /// Start a sign-in with `issuer`: a sealed login cookie and a 302 to the provider,
    /// ending the oldest sign-ins in progress the request carries (`headers`) beyond
    /// `MAX_PENDING_LOGINS`.
    pub async fn start_login(
        &self,
        issuer: &IssuerId,
        authority: &str,
        return_to: &str,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, (Reason, String)> {
        let provider = self
            .provider(issuer.as_str())
            .ok_or_else(|| (Reason::BadRequest, format!("issuer {issuer} has no login")))?;
        let redirect_uri = format!("https://{authority}{}", provider.login.redirect_path);
        let auth = provider
            .authorize(&redirect_uri)
            .await
            .map_err(|e| (Reason::IssuerUnavailable, format!("sign-in with {issuer}: {}", e.0)))?;
        let state = LoginState {
            issuer: issuer.as_str().to_string(),
            state: auth.state.clone(),
            nonce: auth.nonce,
            pkce: auth.pkce_verifier,
            return_to: return_to.to_string(),
            redirect_uri,
            expires: crate::util::unix_now() + LOGIN_TTL,
            started_ns: login_started_ns(),
        };
        let json =
            serde_json::to_vec(&state).map_err(|e| (Reason::InternalError, e.to_string()))?;
        let sealed =
            self.sealer.seal(Purpose::Login, &json).map_err(|e| (Reason::InternalError, e))?;
        let name = format!("{LOGIN_COOKIE}{}", &auth.state[..16]);
        // Host-only (no Domain): the callback comes back to this host.
        let c =
            cookie::set_cookie(&name, &sealed, &cookie::Attrs { domain: None, max_age: LOGIN_TTL })
                .ok_or_else(|| (Reason::InternalError, "login cookie".to_string()))?;
        let mut set = vec![c];
        set.extend(self.end_oldest_logins(headers));
        Ok(redirect(&auth.url, set))
    }

    /// `Set-Cookie`s deleting the oldest login cookies in `headers`, so that with the one
    /// being started at most [`MAX_PENDING_LOGINS`] remain. One that does not open (stale
    /// key, tampered) counts as the oldest.
    fn end_oldest_logins(&self, headers: &HeaderMap) -> Vec<HeaderValue> {
        let cookies = cookie::parse(headers);
        let mut pending: Vec<(u64, &str)> = cookies
            .iter()
            .filter(|(n, _)| {
                n.strip_prefix(LOGIN_COOKIE).is_some_and(|s| {
                    s.len() == 16
                        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
            })
            .map(|(n, v)| {
                let started = self
                    .sealer
                    .open(Purpose::Login, v)
                    .ok()
                    .and_then(|p| serde_json::from_slice::<LoginState>(&p).ok())
                    .map_or(0, |l| l.started_ns);
                (started, *n)
            })
            .collect();
        pending.sort_unstable();
        pending.dedup_by(|a, b| a.1 == b.1);
        let excess = (pending.len() + 1).saturating_sub(MAX_PENDING_LOGINS);
        let deleted = cookie::Attrs { domain: None, max_age: 0 };
        pending[..excess.min(pending.len())]
            .iter()
            .filter_map(|(_, n)| cookie::set_cookie(n, "", &deleted))
            .collect()
    }

    /// The human issuers a browser may pick from for a return target.
    fn choices<'a>(&'a self, cfg: &'a Config, return_to: &str) -> Vec<&'a Arc<Provider>> {
        let route = http::Uri::try_from(return_to).ok().and_then(|u| {
            let host = u.host()?.to_ascii_lowercase();
            cfg.routes.iter().find(|r| r.matches(&host, u.path(), &Method::GET)).cloned()
        });
        self.providers
            .iter()
            .filter(|p| route.as_ref().is_none_or(|r| r.accepts(&p.settings.id)))
            .collect()
    }

    /// Serve `/.portcullis/sign_in`, `/.portcullis/logout` and the callback. `path` is
    /// the canonical path ([`crate::http::path::normalize`]), the one
    /// [`Sessions::is_endpoint`] chose by: `/.portcullis/%6Cogout` is the sign-out.
    #[allow(clippy::too_many_arguments)]
    pub async fn endpoint(
        &self,
        cfg: &Config,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        authority: &str,
        rid: &str,
    ) -> Answer {
        let fail = |reason: Reason, detail: Cow<'static, str>, clear: Vec<HeaderValue>| {
            let mut response =
                crate::http::reject::html_response(reason, rid, Some(&sign_in_link("/")), None);
            for c in clear {
                response.headers_mut().append(header::SET_COOKIE, c);
            }
            Answer { response, reason, detail, identity: None }
        };
        if path == USERINFO_PATH {
            return self.userinfo(method, headers, rid).await;
        }
        if path == LOGOUT_PATH {
            if method != Method::GET && method != Method::POST {
                return fail(Reason::BadRequest, "logout is GET or POST".into(), vec![]);
            }
            return self.logout(cfg, query, headers, authority, rid).await;
        }
        if method != Method::GET && method != Method::HEAD {
            return fail(Reason::BadRequest, "sign-in endpoints are GET".into(), vec![]);
        }
        if path == SIGN_IN_PATH {
            let rd = query_param(query, "rd").unwrap_or_else(|| "/".into());
            let return_to = match redirect::check(&rd, authority, cfg) {
                Ok(r) => r,
                Err(why) => return fail(Reason::InvalidRedirect, why.into(), vec![]),
            };
            let choices = self.choices(cfg, &return_to);
            let picked = match query_param(query, "issuer") {
                Some(i) => choices.iter().find(|p| p.settings.id.as_str() == i).copied(),
                None if choices.len() == 1 => choices.first().copied(),
                None => None,
            };
            if let Some(p) = picked {
                return match self.start_login(&p.settings.id, authority, &return_to, headers).await
                {
                    Ok(response) => Answer {
                        response,
                        reason: Reason::LoginRequired,
                        detail: "redirected to the provider".into(),
                        identity: None,
                    },
                    Err((reason, detail)) => fail(reason, detail.into(), vec![]),
                };
            }
            if choices.is_empty() {
                return fail(
                    Reason::BadRequest,
                    "no issuer to sign in with for this target".into(),
                    vec![],
                );
            }
            let links: Vec<(String, String)> = choices
                .iter()
                .map(|p| {
                    (
                        format!("Sign in with {}", p.settings.id),
                        format!(
                            "{SIGN_IN_PATH}?issuer={}&rd={}",
                            encode(p.settings.id.as_str()),
                            encode(&return_to)
                        ),
                    )
                })
                .collect();
            return Answer {
                response: crate::http::reject::page(StatusCode::OK, pages::chooser(&links)),
                reason: Reason::Internal,
                detail: "sign-in chooser".into(),
                identity: None,
            };
        }
        let mut issuer = None;
        let a = self.callback(cfg, path, query, headers, authority, rid, &mut issuer).await;
        // `portcullis_sign_ins_total`: by the sign-in's issuer, empty when the callback
        // did not get as far as knowing it (no, forged or expired sign-in state).
        let outcome = if a.reason == Reason::SignedIn { "ok" } else { "error" };
        let issuer = issuer.map_or_else(|| Arc::from(""), |i: IssuerId| i.0.clone());
        crate::metrics::global().sign_ins.inc(&(issuer, outcome));
        a
    }

    /// The callback; `issuer` is set once the sign-in's issuer is known.
    #[allow(clippy::too_many_arguments)]
    async fn callback(
        &self,
        cfg: &Config,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        authority: &str,
        rid: &str,
        issuer: &mut Option<IssuerId>,
    ) -> Answer {
        let cookies = cookie::parse(headers);
        let mut clear = Vec::new();
        let fail = |detail: Cow<'static, str>, clear: Vec<HeaderValue>| {
            let mut response = crate::http::reject::html_response(
                Reason::LoginFailed,
                rid,
                Some(&sign_in_link("/")),
                None,
            );
            for c in clear {
                response.headers_mut().append(header::SET_COOKIE, c);
            }
            Answer { response, reason: Reason::LoginFailed, detail, identity: None }
        };
        let Some(state) = query_param(query, "state") else {
            return fail("callback without state".into(), clear);
        };
        if state.len() < 16
            || !state.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return fail("callback state is malformed".into(), clear);
        }
        let cookie_name = format!("{LOGIN_COOKIE}{}", &state[..16]);
        clear.extend(cookie::set_cookie(
            &cookie_name,
            "",
            &cookie::Attrs { domain: None, max_age: 0 },
        ));
        let sealed: Vec<&str> =
            cookies.iter().filter(|(n, _)| *n == cookie_name).map(|(_, v)| *v).collect();
        let [sealed] = sealed.as_slice() else {
            // The Back button after a sign-in returns to the provider's page of it, which
            // (its own session open) answers this callback again with the ended sign-in's
            // state. A browser signed in meanwhile goes on to this host's root rather than
            // to an error page: no code is exchanged, nothing about its session changes.
            if sealed.is_empty() {
                let now = crate::util::unix_now();
                if let Lookup::Valid { identity, set_cookie, .. } =
                    self.check(None, headers, now).await
                {
                    let mut set = set_cookie;
                    set.extend(clear);
                    return Answer {
                        response: redirect(&format!("https://{authority}/"), set),
                        reason: Reason::Internal,
                        detail: "callback of a sign-in no longer in progress, from a signed-in \
                                 browser (Back button): sent to /"
                            .into(),
                        identity: Some(identity),
                    };
                }
            }
            return fail(
                "no sign-in in progress for this state (forged, replayed or expired)".into(),
                clear,
            );
        };
        let Ok(plain) = self.sealer.open(Purpose::Login, sealed) else {
            return fail("sign-in cookie failed authentication".into(), clear);
        };
        let Ok(login) = serde_json::from_slice::<LoginState>(&plain) else {
            return fail("sign-in cookie content".into(), clear);
        };
        if !seal::same(&login.state, &state) {
            return fail("state does not match the sign-in in progress".into(), clear);
        }
        if crate::util::unix_now() >= login.expires {
            return fail("sign-in took longer than 10 minutes".into(), clear);
        }
        let Some(provider) = self.provider(&login.issuer).cloned() else {
            return fail("issuer of the sign-in is no longer configured".into(), clear);
        };
        *issuer = Some(provider.settings.id.clone());
        if provider.login.redirect_path != path
            || login.redirect_uri != format!("https://{authority}{path}")
        {
            return fail("callback on another path or host than the sign-in started".into(), clear);
        }
        if let Some(err) = query_param(query, "error") {
            let code = oidc::error_code(&err);
            return fail(format!("provider answered error `{code}`").into(), clear);
        }
        // RFC 9207: when the provider names itself, it must be the one we asked; when it
        // says it names itself in every response, a response without `iss` is not its
        // own (a mix-up: another provider's code and this sign-in's state). A repeated
        // `iss` is not guessed at.
        match query_param(query, "iss") {
            Some(iss) if iss != provider.settings.issuer => {
                return fail("`iss` of the authorization response is another issuer".into(), clear);
            }
            Some(_) => {}
            None if has_param(query, "iss") => {
                return fail("`iss` repeated in the authorization response".into(), clear);
            }
            None => match provider.names_itself().await {
                Ok(false) => {}
                Ok(true) => {
                    return fail(
                        "authorization response without `iss` from a provider that advertises \
                         authorization_response_iss_parameter_supported (RFC 9207)"
                            .into(),
                        clear,
                    )
                }
                Err(e) => return fail(e.0.into(), clear),
            },
        }
        // Checked again before any session exists (the config may have changed).
        let return_to = match redirect::check(&login.return_to, authority, cfg) {
            Ok(r) => r,
            Err(why) => {
                let mut a = fail(format!("return target refused: {why}").into(), clear);
                a.reason = Reason::InvalidRedirect;
                return a;
            }
        };
        let Some(code) = query_param(query, "code").filter(|c| !c.is_empty()) else {
            return fail("callback without code".into(), clear);
        };
        let started = login.expires.saturating_sub(LOGIN_TTL);
        let verified = match provider
            .exchange(code, login.pkce, &login.nonce, &login.redirect_uri, started)
            .await
        {
            Ok(v) => v,
            Err(e) => return fail(e.0.into(), clear),
        };
        let acr = sign_in_claim(&verified.claims, "acr");
        let hd = sign_in_claim(&verified.claims, "hd");
        let identity = match crate::identity::verify::identity_from_verified(
            &provider.settings,
            verified.claims,
        ) {
            Ok(id) => id,
            Err(e) => return fail(format!("ID token refused: {}", e.reason).into(), clear),
        };
        let now = crate::util::unix_now();
        let mut data = SessionData {
            issuer: login.issuer.clone(),
            subject: identity.subject.clone(),
            email: identity.email.clone(),
            email_verified: identity.email_verified,
            groups: identity.groups.clone(),
            groups_known: identity.groups_known,
            created: now,
            last_seen: now,
            expires: verified.id_token_exp,
            refresh: verified.refresh_token,
            kept: None,
            claims: Map::new(),
            not_kept: Vec::new(),
            id: match SessionId::random() {
                Ok(id) => id,
                Err(e) => return fail(e.into(), clear),
            },
            acr,
            hd,
            source: Some(identity_source(&provider.settings, &provider.login)),
        };
        data.keep_claims(identity.claims.map(), self.kept_claims(&provider.settings.id));
        let mut set = match self.seal_session(&data, &cookies) {
            Ok(c) => c,
            Err(e) => return fail(e.into(), clear),
        };
        set.extend(clear);
        set.extend(self.clear_unprefixed(&cookies));
        let deadline = now + self.settings.absolute_lifetime.as_secs();
        Answer {
            response: redirect(&return_to, set),
            reason: Reason::SignedIn,
            detail: "signed in".into(),
            identity: Some(Arc::new(data.identity(
                provider.settings.id.clone(),
                provider.settings.kind,
                data.expires.min(deadline),
            ))),
        }
    }

    /// `/.portcullis/userinfo`: the session's identity as JSON, for a page or script of
    /// the signed-in browser (who am I, which groups, until when). No session, or one
    /// that cannot be used: a JSON 401, as an API call gets.
    async fn userinfo(&self, method: &Method, headers: &HeaderMap, rid: &str) -> Answer {
        let refuse = |reason: Reason, detail: &'static str, clear: Vec<HeaderValue>| {
            let mut response = crate::http::reject::response(reason, rid);
            for c in clear {
                response.headers_mut().append(header::SET_COOKIE, c);
            }
            Answer { response, reason, detail: detail.into(), identity: None }
        };
        if method != Method::GET && method != Method::HEAD {
            return refuse(Reason::BadRequest, "userinfo is GET", vec![]);
        }
        let (identity, set_cookie, ends_at) = match self
            .check(None, headers, crate::util::unix_now())
            .await
        {
            Lookup::Valid { identity, set_cookie, ends_at, .. } => (identity, set_cookie, ends_at),
            Lookup::Invalid { reason, detail, clear } => return refuse(reason, detail, clear),
            Lookup::None => {
                return refuse(Reason::LoginRequired, "userinfo without a session", vec![])
            }
        };
        let body = UserInfo {
            issuer: identity.issuer.as_str(),
            subject: &identity.subject,
            email: identity.email.as_deref(),
            email_verified: identity.email_verified,
            groups: &identity.groups,
            groups_unknown: !identity.groups_known,
            expires_at: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(ends_at),
            )
            .to_string(),
        };
        let json = match serde_json::to_vec(&body) {
            Ok(j) => j,
            Err(_) => return refuse(Reason::InternalError, "userinfo serialization", vec![]),
        };
        let mut response = Response::new(ProxyBody::full(json));
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // Never read as anything but JSON (a `<script src>` or a sniffed page).
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        for c in set_cookie {
            h.append(header::SET_COOKIE, c);
        }
        Answer {
            response,
            reason: Reason::Internal,
            detail: "userinfo".into(),
            identity: Some(identity),
        }
    }

    async fn logout(
        &self,
        cfg: &Config,
        query: Option<&str>,
        headers: &HeaderMap,
        authority: &str,
        rid: &str,
    ) -> Answer {
        // A prefetch (`Sec-Purpose: prefetch`: speculation rules, with which a site may
        // prefetch every same-origin link hovered, or `<link rel=prefetch>`) is a guess at
        // a click: signing out then would end the session when the person points at a
        // "Sign out" link. Declined; a prefetch answered with an error is dropped, and
        // the click, if it comes, is an ordinary navigation. Older browsers name it
        // `Purpose: prefetch` (Chrome before `Sec-Purpose`) or `X-Moz: prefetch` (Firefox).
        let prefetch = ["sec-purpose", "purpose", "x-moz"].iter().any(|n| {
            headers
                .get_all(*n)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split([',', ';']).any(|t| t.trim().eq_ignore_ascii_case("prefetch")))
        });
        if prefetch {
            return Answer {
                response: crate::http::reject::response(Reason::BadRequest, rid),
                reason: Reason::BadRequest,
                detail: "a prefetch of the sign-out (Sec-Purpose): declined, a guess at a click \
                         signs nobody out"
                    .into(),
                identity: None,
            };
        }
        // Fetch Metadata: a browser says where the request came from. A sign-out from
        // another site (an <img> or link planted there) is confirmed first. A browser
        // without it (Safari before 16.4) still names the page in `Origin` (every POST)
        // or `Referer`: another origin there is confirmed too.
        let elsewhere = match headers.get("sec-fetch-site").map(HeaderValue::as_bytes) {
            Some(from) => from != b"same-origin" && from != b"none",
            None => [header::ORIGIN, header::REFERER]
                .iter()
                .filter_map(|h| headers.get(h))
                .any(|v| !of_this_origin(v.as_bytes(), authority)),
        };
        if elsewhere {
            let link = match query {
                Some(q) => format!("{LOGOUT_PATH}?{q}"),
                None => LOGOUT_PATH.to_string(),
            };
            return Answer {
                response: crate::http::reject::page(StatusCode::OK, pages::confirm_sign_out(&link)),
                reason: Reason::Internal,
                detail: "sign-out from another site: asked to confirm".into(),
                identity: None,
            };
        }
        let cookies = cookie::parse(headers);
        let mut clear =
            cookie::clear(&cookies, &self.cookie_name, self.settings.cookie_domain.as_deref());
        clear.extend(self.clear_unprefixed(&cookies));
        let session = self.open_session(&cookies).ok().flatten();
        // Ended here, not only in this browser: a copy of the cookie (stolen, another
        // profile, a tool) is refused from now on. Before the target is checked: a
        // refused target still clears the cookie, so it signs out all the same.
        let revoked = session.as_ref().map(|s| self.revoke(s, crate::util::unix_now()));
        let what = match revoked {
            Some(Revoked::Overflow { .. }) => {
                "signed out; session revoked (the revocation list was full: older sessions \
                 are refused too)"
            }
            Some(Revoked::Ended) => "signed out (the session had reached its absolute lifetime)",
            Some(Revoked::Recorded | Revoked::Already) => "signed out; session revoked",
            None => "signed out (no session)",
        };
        let provider = session.as_ref().and_then(|s| self.provider(&s.issuer)).cloned();
        let target = query_param(query, "rd")
            .or_else(|| provider.as_ref().and_then(|p| p.login.post_logout_redirect.clone()))
            .unwrap_or_else(|| "/".into());
        let target = match redirect::check(&target, authority, cfg) {
            Ok(t) => t,
            Err(why) => {
                let mut response =
                    crate::http::reject::html_response(Reason::InvalidRedirect, rid, None, None);
                for c in clear {
                    response.headers_mut().append(header::SET_COOKIE, c);
                }
                let detail = match revoked {
                    Some(_) => format!("{why}; the session was signed out all the same").into(),
                    None => why.into(),
                };
                return Answer {
                    response,
                    reason: Reason::InvalidRedirect,
                    detail,
                    identity: None,
                };
            }
        };
        let identity = session
            .as_ref()
            .zip(provider.as_ref())
            .map(|(s, p)| Arc::new(s.identity(p.settings.id.clone(), p.settings.kind, s.expires)));
        if let Some(p) = &provider {
            if let Some(end) = p.end_session_endpoint().await {
                let sep = if end.contains('?') { '&' } else { '?' };
                let url = format!(
                    "{end}{sep}client_id={}&post_logout_redirect_uri={}",
                    encode(&p.login.client_id),
                    encode(&target)
                );
                return Answer {
                    response: redirect(&url, clear),
                    reason: Reason::SignedOut,
                    detail: format!("{what}; RP-initiated logout at the provider").into(),
                    identity,
                };
            }
        }
        let mut response =
            crate::http::reject::page(StatusCode::OK, pages::signed_out(&sign_in_link(&target)));
        for c in clear {
            response.headers_mut().append(header::SET_COOKIE, c);
        }
        Answer { response, reason: Reason::SignedOut, detail: what.into(), identity }
    }
}
