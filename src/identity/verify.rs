//! Bearer-token verification: the V1–V27 checklist of jwt-validation.md §10, ordered
//! so that everything that can reject a token without a key runs first.
//!
//! ```text
//! cache hit? ── yes ─> Identity (no parse, no signature)
//!   │ no
//! V1 size ─ V2/V3 strict parse ─ V8/V9/V10/V4/V7 header ─ V6 iss lookup (no fetch)
//!   ─ V4 allowlist ─ V11 typ ─ V16–V19 times ─ V14 aud
//!   ─ key by kid (one single-flight refresh per cooldown) ─ V5 key↔alg ─ V12 signature
//!   ─ login's acr_values ─ V15 azp ─ V20 profile ─ V21 claim types ─ V24 hd ─ V25 overage
//!   ─> Identity
//! ```
//!
//! Claims are used unverified only to reject; an Identity is built only from a
//! payload whose signature verified.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;

use super::cache::{self, Entry, TokenCache};
#[cfg(test)]
pub(crate) use super::jwks::DOCUMENTS_READ;
pub(crate) use super::jwks::{
    chain, check_fetch_url, check_key_count, fit_for_verifying, issuer_tls, off_the_runtime,
    url_for_log, url_str_for_log,
};
use super::jwks::{IssuerKeys, Removals, Timing};
use super::token::{self, MAX_TOKEN_LEN};
use super::{AuthError, Claims, Identity, IssuerId, IssuerSettings, Preset, TokenType};
use crate::reason::Reason;

/// The largest leeway an issuer may configure (V19).
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Verifies bearer tokens against the configured issuers. Cheap to share in an `Arc`;
/// background key refresh runs after [`Verifier::start`] and ends when it is dropped.
pub struct Verifier {
    issuers: Vec<Arc<IssuerKeys>>,
    /// Exact `iss` string → index into `issuers` (V6).
    by_iss: HashMap<String, usize>,
    cache: TokenCache,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Signatures checked, so tests can prove a cache hit or an early rejection
    /// did no signature work.
    signature_checks: AtomicU64,
    /// Sent when an issuer's new key set drops a key ([`Verifier::key_removals`]).
    removals: Arc<Removals>,
}

/// The key that verified a token: its issuer, `kid` and key material. What keeps an open
/// WebSocket tunnel or database session admitted besides the token's claims: once the
/// issuer's key set no longer holds it ([`Verifier::holds`]), a new request with the
/// token is refused, and the connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    issuer: IssuerId,
    kid: Arc<str>,
    material: [u8; 32],
}

impl SigningKey {
    /// The configured name of the issuer whose key set held the key.
    pub fn issuer(&self) -> &IssuerId {
        &self.issuer
    }

    /// The key's `kid` (bounded by [`super::MAX_KID_LEN`]; from the issuer's JWKS).
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("issuers", &self.issuer_status()).finish()
    }
}

/// Which header carried the bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Authorization,
    ProxyAuthorization,
}

/// The bearer token of a request (V1). `Ok(None)`: no credential for the proxy.
///
/// `Authorization: Bearer` or `Proxy-Authorization: Bearer` (scheme case-insensitive).
/// Both, or either header repeated, is ambiguous. `Proxy-Authorization` is addressed to
/// the proxy, so any other scheme there is malformed; another `Authorization` scheme
/// (e.g. `Basic`) belongs to the application and is ignored.
pub fn extract_bearer(
    headers: &http::HeaderMap,
) -> Result<Option<(&str, CredentialSource)>, AuthError> {
    let single = |name: http::HeaderName| -> Result<Option<&http::HeaderValue>, AuthError> {
        let mut values = headers.get_all(&name).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(AuthError::new(
                Reason::AmbiguousCredentials,
                format!("`{name}` header repeated"),
            ));
        }
        Ok(first)
    };
    let authorization = single(AUTHORIZATION)?.map(bearer).transpose()?.flatten();
    let proxy = match single(PROXY_AUTHORIZATION)? {
        None => None,
        Some(value) => Some(bearer(value)?.ok_or_else(|| {
            AuthError::new(Reason::MalformedToken, "Proxy-Authorization is not Bearer")
        })?),
    };
    if authorization.is_none() && proxy.is_some() && authorization_holds_a_token(headers) {
        return Err(AuthError::new(
            Reason::AmbiguousCredentials,
            "a JSON Web Token in Authorization (under another scheme than Bearer, or none) beside a Proxy-Authorization bearer token",
        ));
    }
    match (authorization, proxy) {
        (Some(_), Some(_)) => Err(AuthError::new(
            Reason::AmbiguousCredentials,
            "bearer tokens in both Authorization and Proxy-Authorization",
        )),
        (Some(t), None) => Ok(Some((t, CredentialSource::Authorization))),
        (None, Some(t)) => Ok(Some((t, CredentialSource::ProxyAuthorization))),
        (None, None) => Ok(None),
    }
}

/// Whether `Authorization` carries a JSON Web Token outside the `Bearer` scheme: a bare
/// token (`Authorization: eyJ…`), one under a scheme of the application's naming (`JWT`,
/// `Token`, Rails' `Token token="…"`) or an element of a list (`Basic x, Bearer eyJ…`).
///
/// Such a header is not a credential for the proxy, but upstreams that verify tokens
/// themselves read it as one: Go's `strings.TrimPrefix(h, "Bearer ")` and JavaScript's
/// `h.replace("Bearer ", "")` return a bare token whole, and djangorestframework-jwt,
/// Flask-JWT and many configurations of djangorestframework-simplejwt take `JWT <token>`.
/// Beside a bearer token the proxy verified (in `Proxy-Authorization`, or a session), the
/// upstream would act on the other token while the proxy authorized and audited the
/// first, as with `Bearer<TAB>token`. The application's own credentials (`Basic`,
/// `Digest`, `Negotiate`, AWS signatures) are not three or five base64url segments joined
/// by dots beginning with an encoded JSON object, so they are not taken for one.
pub fn authorization_holds_a_token(headers: &http::HeaderMap) -> bool {
    headers.get_all(AUTHORIZATION).iter().any(|value| {
        value.as_bytes().split(|b| matches!(b, b' ' | b'\t' | b',')).any(|element| {
            // `token="eyJ…"` (an auth-param): its value. base64url has no `=`.
            let value = match element.iter().position(|b| *b == b'=') {
                Some(i) => &element[i + 1..],
                None => element,
            };
            let value = value.strip_prefix(b"\"").unwrap_or(value);
            let value = value.strip_suffix(b"\"").unwrap_or(value);
            compact_jose(value)
        })
    })
}

/// Three (JWS) or five (JWE) base64url segments joined by dots, the first a JSON object
/// (`eyJ`, base64url of `{"`, as every issuer writes its header) and the second not empty.
fn compact_jose(s: &[u8]) -> bool {
    let b64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    let segments = s.split(|b| *b == b'.');
    let count = segments.clone().count();
    matches!(count, 3 | 5)
        && s.starts_with(b"eyJ")
        && segments.clone().nth(1).is_some_and(|payload| !payload.is_empty())
        && segments.into_iter().all(|seg| seg.iter().all(b64url))
}

/// `Bearer <token68>` → the token; another scheme → `None`.
fn bearer(value: &http::HeaderValue) -> Result<Option<&str>, AuthError> {
    let malformed = |d: &'static str| AuthError::new(Reason::MalformedToken, d);
    // Byte-wise: the token check below admits only ASCII, so the whole header is read
    // once (this runs on every request).
    let bytes = value.as_bytes();
    // A tab separates too (RFC 9110 says one space, but upstreams' parsers split on any
    // whitespace): `Bearer<TAB>token` read as another scheme would pass it upstream
    // unverified, beside a Proxy-Authorization the proxy did verify.
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let (scheme, rest) = match bytes.iter().position(blank) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return match value.to_str() {
            Ok(_) => Ok(None),
            Err(_) => Err(malformed("credentials are not visible ASCII")),
        };
    }
    let start = rest.iter().position(|b| !blank(b)).unwrap_or(rest.len());
    let token = &rest[start..];
    if token.is_empty() {
        return Err(malformed("empty bearer token"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed("bearer token larger than 16 KiB"));
    }
    // The alphabet is the verifier's to check, and only for a token it has not verified
    // before (`token::parse` admits base64url and `.` alone, stricter than token68): a
    // cache hit is these very bytes, checked when they were verified.
    std::str::from_utf8(token).map(Some).map_err(|_| malformed("bearer token is not token68"))
}

/// Checked claims that go into the cache entry.
struct Window {
    valid_from: u64,
    valid_until: u64,
    /// When the identity stops being valid (no leeway): `exp`, or `iat + max_token_age`
    /// when sooner. Tunnels, database sessions and assertions end there.
    ends_at: u64,
    iat: Option<u64>,
}

// === impl Verifier ===

impl Verifier {
    /// Build the verifier. No network; fails on a bad issuer setting (unreadable
    /// `ca_file`, non-https discovery URL, duplicate `issuer`, leeway over 300 s, ...).
    pub fn new(issuers: Vec<IssuerSettings>) -> Result<Verifier, String> {
        Self::with_timing(issuers, Timing::default())
    }

    pub(crate) fn with_timing(
        issuers: Vec<IssuerSettings>,
        timing: Timing,
    ) -> Result<Verifier, String> {
        let mut by_iss = HashMap::new();
        let mut keys = Vec::with_capacity(issuers.len());
        let removals = Arc::new(tokio::sync::watch::channel(()).0);
        for settings in issuers {
            check_settings(&settings)?;
            if by_iss.insert(settings.issuer.clone(), keys.len()).is_some() {
                return Err(format!(
                    "issuer {}: `{}` is configured twice; `iss` must pick one issuer",
                    settings.id, settings.issuer
                ));
            }
            keys.push(Arc::new(IssuerKeys::new(settings, timing, removals.clone())?));
        }
        Ok(Verifier {
            issuers: keys,
            by_iss,
            cache: TokenCache::new(cache::DEFAULT_CAPACITY),
            tasks: Mutex::new(Vec::new()),
            signature_checks: AtomicU64::new(0),
            removals,
        })
    }

    /// Keep at most `entries` verified tokens (0: verify every request). Before
    /// [`Verifier::start`]; a new verifier starts with an empty cache.
    #[must_use]
    pub fn with_token_cache(mut self, entries: usize) -> Self {
        self.cache = TokenCache::new(entries);
        self
    }

    #[cfg(test)]
    pub(crate) fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Spawn one discovery + JWKS task per issuer (needs a tokio runtime). The tasks
    /// are aborted when the verifier is dropped. Calling it twice does nothing.
    pub fn start(self: &Arc<Self>) {
        let mut tasks = self.tasks.lock();
        if !tasks.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("Verifier::start called outside a tokio runtime; keys will not load");
            return;
        };
        tasks.extend(self.issuers.iter().map(|issuer| runtime.spawn(issuer.clone().run())));
    }

    /// Verify a bearer token now.
    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        self.verify_at(token, crate::util::unix_now()).await
    }

    /// Verify a bearer token now, presented on a connection whose last token is `last`
    /// (its cache key is then not computed again; everything else is as [`Verifier::verify`]).
    pub async fn verify_on(
        &self,
        token: &str,
        last: &super::LastToken,
    ) -> Result<Arc<Identity>, AuthError> {
        self.verify_hashed(token, last.hash(token), crate::util::unix_now()).await
    }

    /// Verify a bearer token as of `now` (Unix seconds).
    pub async fn verify_at(&self, token: &str, now: u64) -> Result<Arc<Identity>, AuthError> {
        self.verify_hashed(token, cache::hash(token), now).await
    }

    async fn verify_hashed(
        &self,
        token: &str,
        hash: cache::TokenHash,
        now: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        let result = self.verify_inner(token, hash, now).await;
        let code = match &result {
            Ok(_) => Reason::Allowed.code(),
            Err(e) => e.reason.code(),
        };
        crate::metrics::global().token_verifications.inc(&code);
        result
    }

    /// The key that verified `token`, a token [`Verifier::verify`] accepted just before:
    /// the one its cache entry names, or (no entry: the cache is off or let it go) the
    /// issuer's key by its `kid` that verifies its signature now. `None` when no key in
    /// the issuer's set does any more. Run once by what a token opens for longer than a
    /// request (a WebSocket tunnel, a database session), never per request.
    pub fn signing_key(&self, token: &str) -> Option<SigningKey> {
        let of = |issuer: &IssuerKeys, kid: Arc<str>, material: [u8; 32]| SigningKey {
            issuer: issuer.settings.id.clone(),
            kid,
            material,
        };
        if let Some(hit) = self.cache.get(&cache::hash(token), crate::util::unix_now()) {
            let issuer = self.issuers.get(hit.issuer)?;
            if issuer.holds(&hit.kid, &hit.key_material) {
                return Some(of(issuer, hit.kid, hit.key_material));
            }
        }
        let parsed = token::parse(token).ok()?;
        let header = token::check_header(&parsed.header).ok()?;
        let iss = parsed.payload.get("iss").and_then(Value::as_str)?;
        let issuer = self.issuers.get(*self.by_iss.get(iss)?)?;
        if !issuer.settings.algorithms.contains(&header.alg) {
            return None;
        }
        let set = issuer.usable()?;
        let (kid, key) = set.get(header.kid)?;
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        key.for_alg(header.alg)?
            .verify_sig(parsed.signing_input.as_bytes(), &parsed.signature)
            .ok()?;
        Some(of(issuer, kid.clone(), key.material))
    }

    /// Whether the key set of `key`'s issuer (as last fetched) still holds `key`: the
    /// same `kid` with the same material. A verifier of a reload that removed or
    /// renamed the issuer holds none of its keys.
    pub fn holds(&self, key: &SigningKey) -> bool {
        self.issuers
            .iter()
            .find(|i| i.settings.id == key.issuer)
            .is_some_and(|i| i.holds(&key.kid, &key.material))
    }

    /// Changes each time one of the issuers' key sets drops a key (a refresh without
    /// the `kid`, or with new material under it; not one that only adds keys). A new
    /// verifier (a reload) has its own: subscribe again to the runtime's.
    pub fn key_removals(&self) -> tokio::sync::watch::Receiver<()> {
        self.removals.subscribe()
    }

    /// Every issuer has a usable key set.
    pub fn ready(&self) -> bool {
        self.issuers.iter().all(|i| i.usable().is_some())
    }

    /// Each issuer and whether it has a usable key set.
    pub fn issuer_status(&self) -> Vec<(IssuerId, bool)> {
        self.issuers.iter().map(|i| (i.settings.id.clone(), i.usable().is_some())).collect()
    }

    /// Wait until [`Verifier::ready`], at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let start = tokio::time::Instant::now();
        loop {
            if self.ready() {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// On reload, take over the key state of issuers that fetch the same keys from
    /// the same place with the same trust, so a reload neither refetches nor has a
    /// window without keys. Call before [`Verifier::start`].
    pub fn adopt_keys_from(&self, old: &Verifier) {
        for new in &self.issuers {
            let same = old.issuers.iter().find(|o| new.same_source(o));
            if let Some(old) = same {
                new.adopt(old);
            }
        }
    }

    pub fn issuers(&self) -> impl Iterator<Item = &IssuerSettings> {
        self.issuers.iter().map(|i| &i.settings)
    }

    /// Load an issuer's keys from a JWKS document instead of fetching them (benches,
    /// tests, offline tools). Returns how many keys are usable.
    pub fn install_jwks(
        &self,
        issuer: &IssuerId,
        jwks: &Value,
        ttl: Duration,
    ) -> Result<usize, String> {
        let keys = self
            .issuers
            .iter()
            .find(|i| &i.settings.id == issuer)
            .ok_or_else(|| format!("no issuer {issuer}"))?;
        keys.install(jwks, ttl)
    }

    async fn verify_inner(
        &self,
        token: &str,
        hash: cache::TokenHash,
        now: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        match self.cached(&hash, now) {
            Some(identity) => Ok(identity),
            // Boxed: the full check's future (a key refresh may be awaited) is large, and
            // only a cache miss, which verifies a signature anyway, should carry it.
            None => Box::pin(self.verify_uncached(token, hash, now)).await,
        }
    }

    /// A verified identity for this token hash from the cache, if its key is still the
    /// one that verified it.
    fn cached(&self, hash: &cache::TokenHash, now: u64) -> Option<Arc<Identity>> {
        let hit = self.cache.get(hash, now)?;
        // The key that verified the token must still be published and usable, and
        // still be the same key (not new material under the old kid).
        let issuer = self.issuers.get(hit.issuer);
        let live = issuer.and_then(|i| i.usable()).is_some_and(|s| {
            s.get(&hit.kid).is_some_and(|(_, key)| key.material == hit.key_material)
        });
        if live {
            crate::metrics::global().token_cache_hits.fetch_add(1, Ordering::Relaxed);
            return Some(hit.identity);
        }
        self.cache.remove(hash);
        None
    }

    async fn verify_uncached(
        &self,
        token: &str,
        hash: cache::TokenHash,
        now: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        // V1–V3 (the alphabet first). A hit above was checked when it was verified.
        let parsed = token::parse(token)?;
        // V8, V9, V10, V4 (supported at all), V7.
        let header = token::check_header(&parsed.header)?;
        // V6: exact iss; an unknown issuer never causes a fetch.
        let iss = match parsed.payload.get("iss") {
            Some(Value::String(iss)) => iss,
            Some(_) => return Err(claims("`iss` is not a string")),
            None => return Err(claims("token has no `iss`")),
        };
        let Some(&index) = self.by_iss.get(iss.as_str()) else {
            return Err(AuthError::new(Reason::UnknownIssuer, "`iss` is not a configured issuer"));
        };
        let issuer = &self.issuers[index];
        let settings = &issuer.settings;
        // V4: per-issuer allowlist.
        if !settings.algorithms.contains(&header.alg) {
            return Err(AuthError::new(
                Reason::DisallowedAlgorithm,
                format!("{} is not allowed for issuer {}", header.alg.name(), settings.id),
            ));
        }
        check_typ(header.typ, settings.token_type)?;
        // V16–V19.
        let window = check_times(&parsed.payload, settings, now)?;
        // V14.
        let audiences = audiences(&parsed.payload)?;
        let audience_count = audiences.len();
        if !audiences.iter().any(|a| settings.audiences.iter().any(|c| c == a)) {
            return Err(AuthError::new(
                Reason::AudienceMismatch,
                "`aud` has no configured audience",
            ));
        }

        // Keys: fail closed when the issuer has no usable set (§11.7).
        let Some(set) = issuer.usable() else {
            return Err(AuthError::new(
                Reason::IssuerUnavailable,
                format!("no usable keys for issuer {}", settings.id),
            ));
        };
        let found = set.get(header.kid).map(|(k, v)| (k.clone(), v.clone()));
        drop(set);
        let (kid, key) = match found {
            Some(found) => found,
            None => issuer.refresh_for_kid(header.kid).await.ok_or_else(|| {
                AuthError::new(Reason::UnknownKey, "no key with the token's `kid`")
            })?,
        };
        // V5: the key must be for exactly this algorithm.
        let Some(public) = key.for_alg(header.alg) else {
            return Err(AuthError::new(
                Reason::DisallowedAlgorithm,
                "the key named by `kid` is not for the header's `alg`",
            ));
        };
        // V12: from here on the payload is the issuer's word.
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        public
            .verify_sig(parsed.signing_input.as_bytes(), &parsed.signature)
            .map_err(|_| AuthError::new(Reason::InvalidSignature, "signature does not verify"))?;

        check_acr(settings, &parsed.payload)?;
        let claims = super::Claims::from_verified_json(parsed.payload_json);
        let identity =
            Arc::new(build_identity(settings, &parsed.payload, claims, audience_count, &window)?);
        let entry = Entry {
            identity: identity.clone(),
            issuer: index,
            kid,
            key_material: key.material,
            valid_from: window.valid_from,
            valid_until: window.valid_until,
        };
        self.cache.insert(hash, entry);
        Ok(identity)
    }

    #[cfg(test)]
    pub(crate) fn fetches(&self, issuer: usize) -> u64 {
        self.issuers.get(issuer).map_or(0, |i| i.fetches.load(Ordering::SeqCst))
    }

    #[cfg(test)]
    pub(crate) fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::SeqCst)
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

fn check_settings(s: &IssuerSettings) -> Result<(), String> {
    let id = &s.id;
    if s.leeway > MAX_LEEWAY {
        return Err(format!("issuer {id}: leeway over 300 s"));
    }
    if s.algorithms.is_empty() {
        return Err(format!("issuer {id}: empty algorithm allowlist"));
    }
    if s.audiences.is_empty() {
        return Err(format!("issuer {id}: no audiences"));
    }
    // V23: the default Bitbucket audience is shared by every consumer in the workspace.
    if s.preset == Preset::BitbucketPipelines
        && s.audiences.iter().any(|a| a.starts_with("ari:cloud:bitbucket::workspace/"))
    {
        return Err(format!(
            "issuer {id}: the workspace ARI is shared by every consumer; configure a proxy-specific audience"
        ));
    }
    Ok(())
}

fn claims(detail: &'static str) -> AuthError {
    AuthError::new(Reason::InvalidClaims, detail)
}

/// V11: ID and CI tokens: `typ` absent or `JWT`; access tokens: `at+jwt`.
fn check_typ(typ: Option<&Value>, expected: TokenType) -> Result<(), AuthError> {
    let typ = match typ {
        None => None,
        Some(Value::String(t)) => {
            // RFC 7515 §4.1.9: the "application/" prefix may be omitted.
            let t = t.as_str();
            let bare = match t.get(..12) {
                Some(p) if p.eq_ignore_ascii_case("application/") => &t[12..],
                _ => t,
            };
            Some(bare)
        }
        Some(_) => return Err(AuthError::new(Reason::WrongTokenType, "`typ` is not a string")),
    };
    let ok = match expected {
        TokenType::Id => typ.is_none_or(|t| t.eq_ignore_ascii_case("jwt")),
        TokenType::Access => typ.is_some_and(|t| t.eq_ignore_ascii_case("at+jwt")),
    };
    if ok {
        Ok(())
    } else {
        Err(AuthError::new(Reason::WrongTokenType, "`typ` does not fit the issuer's token type"))
    }
}

/// A NumericDate (V21): a JSON number, never a string.
fn numeric_date(
    payload: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<f64>, AuthError> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| claims("bad NumericDate")),
        Some(_) => Err(AuthError::new(
            Reason::InvalidClaims,
            format!("`{name}` is not a NumericDate number"),
        )),
    }
}

/// Seconds as u64 for a finite NumericDate (negative → 0, huge → u64::MAX).
fn secs(v: f64) -> u64 {
    if v <= 0.0 {
        0
    } else if v >= u64::MAX as f64 {
        u64::MAX
    } else {
        v as u64
    }
}

/// Whether the issuer's tokens must carry `iat` (V18): CI tokens must say when they
/// were minted; so must any token whose age matters (`max_token_age`).
pub fn iat_required(s: &IssuerSettings) -> bool {
    s.preset != Preset::Oidc || s.max_token_age.is_some()
}

/// V16 exp, V17 nbf, V18 iat/max age, with the issuer's leeway (V19).
fn check_times(
    payload: &Map<String, Value>,
    s: &IssuerSettings,
    now: u64,
) -> Result<Window, AuthError> {
    let leeway = s.leeway.min(MAX_LEEWAY).as_secs();
    let exp = numeric_date(payload, "exp")?.ok_or_else(|| claims("token has no `exp`"))?;
    let nbf = numeric_date(payload, "nbf")?;
    let iat = numeric_date(payload, "iat")?;
    let (nowf, leewayf) = (now as f64, leeway as f64);
    if nowf >= exp + leewayf {
        return Err(AuthError::new(Reason::TokenExpired, "token expired"));
    }
    let mut valid_from = 0u64;
    let mut valid_until = secs(exp).saturating_add(leeway);
    if let Some(nbf) = nbf {
        if nowf < nbf - leewayf {
            return Err(AuthError::new(Reason::TokenNotYetValid, "`nbf` is in the future"));
        }
        valid_from = valid_from.max(secs((nbf - leewayf).ceil()));
    }
    if iat.is_none() && iat_required(s) {
        return Err(AuthError::new(Reason::TokenIssuedAt, "token has no `iat`"));
    }
    if let Some(iat) = iat {
        if iat > nowf + leewayf {
            return Err(AuthError::new(Reason::TokenIssuedAt, "`iat` is in the future"));
        }
        valid_from = valid_from.max(secs((iat - leewayf).ceil()));
        if let Some(max_age) = s.max_token_age {
            let max_age = max_age.as_secs() as f64;
            if nowf - iat > max_age + leewayf {
                return Err(AuthError::new(Reason::TokenIssuedAt, "token older than max age"));
            }
            valid_until = valid_until.min(secs((iat + max_age + leewayf).floor()) + 1);
        }
    }
    let mut ends_at = secs(exp);
    if let (Some(iat), Some(max_age)) = (iat, s.max_token_age) {
        ends_at = ends_at.min(secs(iat).saturating_add(max_age.as_secs()));
    }
    Ok(Window { valid_from, valid_until, ends_at, iat: iat.map(secs) })
}

/// V14: `aud` is a string or a non-empty array of strings.
fn audiences(payload: &Map<String, Value>) -> Result<Vec<&str>, AuthError> {
    match payload.get("aud") {
        Some(Value::String(a)) => Ok(vec![a.as_str()]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| claims("`aud` holds a non-string")))
            .collect(),
        Some(_) => Err(claims("`aud` is neither a string nor an array of strings")),
        None => Err(AuthError::new(Reason::AudienceMismatch, "token has no `aud`")),
    }
}

/// The checks of [`Verifier::verify`] that need only a verified payload, against
/// `settings`: `iss`, the times (with the issuer's leeway and `max_token_age`), `aud`,
/// and the profile checks that build the identity (`azp`, `hd`, the preset's claims,
/// the groups claim). For an identity a token admitted earlier, when a reload changed
/// its issuer ([`super::Admission`]); the signature and the header (`alg`, `typ`, `kid`)
/// cannot be checked again. The identity as `settings` see it, or why they refuse it.
pub(crate) fn recheck(
    settings: &IssuerSettings,
    identity: &Identity,
    now: u64,
) -> Result<Identity, AuthError> {
    let payload = identity.claims.map();
    match payload.get("iss") {
        Some(Value::String(iss)) if *iss == settings.issuer => {}
        _ => {
            return Err(AuthError::new(Reason::UnknownIssuer, "`iss` is not the issuer's any more"))
        }
    }
    let window = check_times(payload, settings, now)?;
    let audiences = audiences(payload)?;
    if !audiences.iter().any(|a| settings.audiences.iter().any(|c| c == a)) {
        return Err(AuthError::new(Reason::AudienceMismatch, "`aud` has no configured audience"));
    }
    check_acr(settings, payload)?;
    build_identity(settings, payload, identity.claims.clone(), audiences.len(), &window)
}

/// What the key set document `body` yields for an issuer whose `algorithms` are
/// `allowlist`, read as a fetched one is: each key kept, by `kid`, with the algorithms
/// it verifies (sorted by `kid`), or why the whole set is refused. For the `jwks` fuzz
/// target; the verifier installs the keys it fetches itself.
pub fn read_key_set(
    body: &[u8],
    allowlist: &[super::Algorithm],
) -> Result<Vec<(String, Vec<super::Algorithm>)>, String> {
    let keys = super::jwks::read_jwks(body, allowlist, "-")?;
    let mut out: Vec<_> =
        keys.iter().map(|(kid, key)| (kid.to_string(), key.algorithms())).collect();
    out.sort();
    Ok(out)
}

/// The `jwks_uri` a discovery document `body` gives for `issuer` (as the key fetch
/// reads it: the document names exactly `issuer`, the URI is https, or plain http to a
/// loopback host with `insecure_http`), or why it is refused. For the `jwks` fuzz target.
pub fn read_discovery(body: &[u8], issuer: &str, insecure_http: bool) -> Result<String, String> {
    super::jwks::read_discovery(body, issuer, insecure_http).map(|uri| uri.to_string())
}

/// How long a key set fetched with the response headers `headers` is fresh: its
/// `Cache-Control: max-age`, clamped to 5 minutes – 24 hours, or 10 minutes without one.
/// For the `jwks` fuzz target.
pub fn key_set_ttl(headers: &http::HeaderMap) -> Duration {
    super::jwks::ttl(headers, &Timing::default())
}

/// The identity the verifier would build from `payload` after the signature and the
/// time and audience checks, **without** those checks: for a policy's `[[test]]`
/// identities, which must decide as a token with their claims would, and for
/// `portcullis policy explain --no-verify`, which explains claims and says that they
/// were not verified. Never use it to admit a request.
pub fn unverified_identity(
    settings: &IssuerSettings,
    payload: Map<String, Value>,
) -> Result<Identity, AuthError> {
    // The types the verifier checks before the rest (V21 times, V14 `aud`), and `iat`
    // where it must be there (V18): a claim set it would refuse for them is refused here
    // too, not read as some other token.
    let exp = numeric_date(&payload, "exp")?.map_or(u64::MAX, secs);
    numeric_date(&payload, "nbf")?;
    let iat = numeric_date(&payload, "iat")?.map(secs);
    if iat.is_none() && iat_required(settings) {
        return Err(AuthError::new(Reason::TokenIssuedAt, "token has no `iat`"));
    }
    let window = Window { valid_from: 0, valid_until: exp, ends_at: exp, iat };
    let audience_count = match payload.get("aud") {
        None => 1,
        Some(_) => audiences(&payload)?.len(),
    };
    check_acr(settings, &payload)?;
    build_identity(settings, &payload, Claims::default(), audience_count, &window)
        .map(|id| Identity { claims: payload.into(), ..id })
}

/// The Identity of an ID token whose signature, `iss`, `aud`, `azp`, nonce and `exp`
/// were verified by the browser login (`session::oidc`): the same profile checks as a
/// bearer ID token (V15, V20, V21, V24, V25), so a session and a bearer token of one
/// person give one identity.
pub(crate) fn identity_from_verified(
    s: &IssuerSettings,
    payload: Map<String, Value>,
) -> Result<Identity, AuthError> {
    let audience_count = audiences(&payload)?.len();
    let exp =
        numeric_date(&payload, "exp")?.map(secs).ok_or_else(|| claims("token has no `exp`"))?;
    let iat = numeric_date(&payload, "iat")?.map(secs);
    let window = Window { valid_from: 0, valid_until: exp, ends_at: exp, iat };
    build_identity(s, &payload, Claims::default(), audience_count, &window)
        .map(|id| Identity { claims: payload.into(), ..id })
}

/// Google's issuer, in its modern and legacy spellings.
const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];

/// Whether the issuer is authoritative for `email`: always, except Google's, which
/// vouches for an address only when it hosts it (a `@gmail.com` or `@googlemail.com`
/// address, Gmail's two domains, or a Workspace account, `hd` set). A consumer Google account may be made with any address its
/// creator could read mail at once (an employee's work address, kept after they
/// leave), and its `email_verified` stays `true`.
fn google_hosts(s: &IssuerSettings, payload: &Map<String, Value>, email: Option<&str>) -> bool {
    if !GOOGLE_ISSUERS.contains(&s.issuer.as_str()) {
        return true;
    }
    let gmail = email.and_then(|e| e.rsplit_once('@')).is_some_and(|(_, domain)| {
        domain.eq_ignore_ascii_case("gmail.com") || domain.eq_ignore_ascii_case("googlemail.com")
    });
    gmail || matches!(payload.get("hd"), Some(Value::String(hd)) if !hd.is_empty())
}

/// Whether the issuer's tokens are a person's ID tokens (an `oidc` issuer whose
/// `token_type` is `id`), held to the checks of the ID tokens a browser signs in with
/// (V15 `azp`, V20, the login's `acr_values`).
fn human_id_tokens(s: &IssuerSettings) -> bool {
    s.preset == Preset::Oidc && s.token_type == TokenType::Id
}

/// The authentication context of a person's ID token: when the issuer's `login` asks
/// for `acr_values`, the token's `acr` must be one of them, compared exactly, as the
/// sign-in callback holds the browser's ID token (`session::oidc`). Otherwise the
/// context the login demands (phishing-resistant MFA, say) would bar a person from a
/// session and not from the same routes with a password-only ID token of the same
/// issuer sent as a bearer token (from a CLI's client, or the provider's own session).
/// Not for a session's refreshed ID token, which providers may send without `acr`: the
/// context is that of the sign-in.
fn check_acr(s: &IssuerSettings, payload: &Map<String, Value>) -> Result<(), AuthError> {
    if s.acr_values.is_empty() || !human_id_tokens(s) {
        return Ok(());
    }
    match payload.get("acr") {
        Some(Value::String(acr)) if s.acr_values.iter().any(|a| a == acr) => Ok(()),
        Some(Value::String(_)) => Err(AuthError::new(
            Reason::AcrMismatch,
            "`acr` is not one of the `acr_values` the issuer's login asks for",
        )),
        Some(_) => Err(claims("`acr` is not a string")),
        None => Err(AuthError::new(
            Reason::AcrMismatch,
            "token has no `acr`, though the issuer's login asks for `acr_values`",
        )),
    }
}

/// After the signature: profile checks (V15, V20, V21, V24, V25) and the Identity.
fn build_identity(
    s: &IssuerSettings,
    payload: &Map<String, Value>,
    all_claims: Claims,
    audience_count: usize,
    window: &Window,
) -> Result<Identity, AuthError> {
    let human_id_token = human_id_tokens(s);
    if human_id_token {
        // V15: azp names the client the token was issued to.
        let expected = s.client_id.as_deref();
        match payload.get("azp") {
            Some(Value::String(azp)) => {
                let fits = match expected {
                    Some(client) => azp == client,
                    None => s.audiences.iter().any(|a| a == azp),
                };
                if !fits {
                    return Err(AuthError::new(
                        Reason::AuthorizedPartyMismatch,
                        "`azp` is not our client",
                    ));
                }
            }
            Some(_) => return Err(claims("`azp` is not a string")),
            None if audience_count > 1 => {
                return Err(AuthError::new(
                    Reason::AuthorizedPartyMismatch,
                    "several audiences but no `azp`",
                ))
            }
            None => {}
        }
        // V20: access-token markers on an ID-token issuer (Okta `cid`/`scp`, Entra
        // `scp`), and Keycloak's payload `typ`.
        if payload.contains_key("scp") || payload.contains_key("cid") {
            return Err(AuthError::new(
                Reason::WrongTokenType,
                "access-token claims (`scp`/`cid`) on an ID-token issuer",
            ));
        }
        if payload.get("typ").is_some_and(|t| t.as_str() != Some("ID")) {
            return Err(AuthError::new(Reason::WrongTokenType, "payload `typ` is not \"ID\""));
        }
    }

    // V21: every claim the proxy acts on has its documented type.
    let subject = match payload.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        Some(Value::String(_)) | None => return Err(claims("token has no `sub`")),
        Some(_) => return Err(claims("`sub` is not a string")),
    };
    let email = super::ci::string_claim(payload, "email")?;
    let email_verified = match payload.get("email_verified") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(claims("`email_verified` is not a boolean")),
    };
    let email_verified = email_verified && google_hosts(s, payload, email.as_deref());
    // V24: `hd` is authoritative only together with a verified email.
    if let Some(domain) = &s.hosted_domain {
        let hd = super::ci::string_claim(payload, "hd")?;
        if hd.as_deref() != Some(domain.as_str()) || !email_verified {
            return Err(claims("hosted domain or email_verified does not match"));
        }
    }
    // V25: overage means membership is unknown; `_claim_sources` is never fetched.
    let overage = payload.get("hasgroups").is_some_and(|v| *v != Value::Bool(false))
        || payload.get("_claim_names").and_then(Value::as_object).is_some_and(|names| {
            names.contains_key(s.groups_claim.top()) || names.contains_key("groups")
        });
    let groups = match s.groups_claim.lookup(payload)? {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|g| g.as_str().map(str::to_owned).ok_or_else(|| claims("a group is not a string")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(claims("groups claim is not an array")),
    };
    // V20 for CI presets: the provider's repository id must be there.
    let ci = super::ci::normalize(s.preset, payload)?;
    Ok(Identity {
        issuer: s.id.clone(),
        subject,
        kind: s.kind,
        email,
        email_verified,
        groups: if overage { Vec::new() } else { groups },
        groups_known: !overage,
        expires_at: window.ends_at,
        issued_at: window.iat,
        ci,
        claims: all_claims,
        audit: Default::default(),
    })
}
