//! Configuration: `portcullis.toml` parsed into [`raw`] types, then compiled into
//! typed values that cannot be invalid. Every problem is reported at once as
//! `file:line:col: message`; nothing is applied partially.

mod database;
pub mod raw;
mod redis;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::diag::{Diagnostic, Diagnostics, LoadError, Source};
use crate::http::path;
use crate::identity::{
    Algorithm, ClaimPath, IssuerId, IssuerSettings, Preset, PrincipalKind, TokenType,
};
use crate::policy::{Catalog, Policy};

pub use database::{DatabaseSettings, Secret, UpstreamTls};
pub use redis::RedisSettings;

/// The compiled configuration. Cheap to clone (`Arc`s inside).
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: Listen,
    pub tls: Option<TlsSettings>,
    pub server: ServerSettings,
    pub assertion: AssertionSettings,
    pub audit: AuditOutput,
    /// What requests get while audit events are not being written (`[audit] on_failure`).
    pub audit_on_failure: AuditOnFailure,
    pub issuers: Vec<IssuerSettings>,
    pub routes: Vec<Arc<RouteSettings>>,
    /// PostgreSQL routes (`[[databases]]`), in configuration order.
    pub databases: Vec<Arc<DatabaseSettings>>,
    /// Every file this configuration was built from or names for the server to read
    /// (config, policies, certificates and keys, CAs, the assertion key, session keys,
    /// client-secret and password files), each once: the reload watcher polls them.
    pub files: Vec<PathBuf>,
    /// SHA-256 of the configuration text as it was read (with the policies' own
    /// digests, what [`Config::read_digests`] returns).
    pub sha256: [u8; 32],
    /// Policy lint warnings (errors fail the load); printed by `check` and at start-up.
    pub warnings: Vec<Diagnostic>,
    /// `[session]`: present whenever an issuer has `login`.
    pub session: Option<SessionSettings>,
    /// Issuers the proxy can sign browsers in with (`[issuers.NAME] login = {...}`).
    pub logins: Vec<LoginSettings>,
    /// `[redis]`: the store replicas share, if any ([`crate::store`]).
    pub redis: Option<RedisSettings>,
    /// What the load read besides the configuration and its policies; a server starts
    /// only from a [`LoadMode::Serve`] load.
    pub mode: LoadMode,
    /// The failing policy tests, once run ([`Config::failing_policy_tests`]); shared by
    /// clones, which have the same policies.
    policy_test_failures: Arc<std::sync::OnceLock<Vec<crate::policy::TestOutcome>>>,
}

/// What a load reads besides the configuration text and the policies it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadMode {
    /// Everything `serve` needs: the certificate, key and CA files it names must exist
    /// and the upstream passwords (`password_env`, `password_file`) are read, so a
    /// broken deployment fails `check`, not the first connection.
    #[default]
    Serve,
    /// The configuration and its policies only (`policy` subcommands, `check
    /// --policy-only`): files and environment variables the server reads at serve time
    /// are named but never opened, so policy CI needs neither certificates nor secrets.
    /// Every other problem is still reported. Upstream passwords are left empty: such a
    /// configuration cannot serve ([`crate::server::Server::start`] refuses it).
    PolicyOnly,
}

/// One load of a configuration ([`Config::attempt`]): its result, and every file it
/// read or tried to read.
#[derive(Debug)]
pub struct Attempt {
    pub result: Result<Config, LoadError>,
    /// The configuration file and, as far as it compiled, every file it names: the
    /// policies (also one that is missing or does not compile), certificates, keys,
    /// CAs and secret files. When it loaded, [`Config::files`].
    pub files: Vec<PathBuf>,
}

/// Where a secret comes from. Read when a server starts; a [`LoadMode::Serve`] load
/// (`check`) also reads a variable, and a file that is there, to refuse one `serve`
/// could not use; `check --policy-only` reads neither (CI without the secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

/// How an environment variable's name is shown in a diagnostic (which reaches the log
/// and, for a refused reload, the audit trail): quoted when it reads like a variable name
/// (`OKTA_CLIENT_SECRET`: capitals, digits, at least one `_`), otherwise not at all: a
/// value that does not read like one may be the secret itself, pasted into `*_env` by
/// mistake.
pub(crate) fn env_name_shown(name: &str) -> String {
    let conventional = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.contains('_')
        && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if conventional {
        format!("environment variable `{name}`")
    } else {
        "the environment variable the configuration names (not shown: it does not read like a name; \
         `*_env` takes a variable's name, never the secret)"
            .to_string()
    }
}

/// Whether a value set where a path or a variable's name belongs reads like a secret
/// pasted there by mistake, so that it is shown nowhere (diagnostics reach the log and
/// a refused reload's audit event; `policy diff` reaches a pull request): whitespace or
/// a PEM marker, or a `/`-separated part that is long and mixes character classes as
/// generated secrets do (capitals, small letters and digits; or `+`, `=` or `~`, as in
/// base64 and Entra client secrets; or 24+ letters and digits without a `.`). A short
/// password that reads like a file name is not told apart.
pub(crate) fn reads_like_secret(value: &str) -> bool {
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) || value.contains("-----") {
        return true;
    }
    value.split('/').any(|part| {
        let has = |f: fn(&char) -> bool| part.chars().any(|c| f(&c));
        let (upper, lower, digit) = (
            has(char::is_ascii_uppercase),
            has(char::is_ascii_lowercase),
            has(char::is_ascii_digit),
        );
        (part.len() >= 20 && upper && lower && digit)
            || (part.len() >= 16 && part.contains(['+', '=', '~']))
            || (part.len() >= 24 && !part.contains('.') && digit && (upper || lower))
    })
}

/// How a file path is shown in a diagnostic: quoted, unless it reads like a secret
/// ([`reads_like_secret`]), which may be the secret itself pasted into a `*_file` key.
pub(crate) fn file_shown(p: &Path) -> String {
    let text = p.to_string_lossy();
    if reads_like_secret(&text) {
        "the file the configuration names (path not shown: it reads like a secret; `*_file` \
         takes the path of a file holding the secret, never the secret)"
            .to_string()
    } else {
        format!("`{}`", p.display())
    }
}

impl SecretSource {
    /// The secret's text, trimmed. The error names the source, never the value.
    pub fn read(&self) -> Result<String, String> {
        let v = match self {
            SecretSource::Env(name) => {
                std::env::var(name).map_err(|_| format!("{} is not set", env_name_shown(name)))?
            }
            SecretSource::File(p) => {
                crate::util::read_bounded_text(p, crate::util::MAX_SECRET_FILE, true)
                    .map_err(|e| format!("secret file {}: {e}", file_shown(p)))?
            }
        };
        let v = v.trim().to_string();
        if v.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(v)
    }
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Env(name) => env_name_shown(name),
            SecretSource::File(p) => format!("secret file {}", file_shown(p)),
        }
    }
}

/// The proxy as an OpenID relying party of one issuer.
#[derive(Debug, Clone)]
pub struct LoginSettings {
    pub issuer: IssuerId,
    pub client_id: String,
    pub client_secret: SecretSource,
    /// Always contains `openid`.
    pub scopes: Vec<String>,
    /// The callback path on every host (default `/.portcullis/callback`).
    pub redirect_path: String,
    pub extra_params: Vec<(String, String)>,
    pub post_logout_redirect: Option<String>,
}

impl LoginSettings {
    /// `max_age` of `extra_params` (seconds; checked a number at load): the person must
    /// have authenticated at the provider within it, which the callback checks by the
    /// ID token's `auth_time` (OIDC Core §3.1.2.1, §3.1.3.7 step 13).
    pub fn max_age(&self) -> Option<u64> {
        self.extra_param("max_age").and_then(|v| v.parse().ok())
    }

    /// `prompt` of `extra_params` asks for `login`: the person authenticates again at
    /// every sign-in, which the callback checks by the ID token's `auth_time`.
    pub fn prompts_login(&self) -> bool {
        self.extra_param("prompt").is_some_and(|p| p.split(' ').any(|p| p == "login"))
    }

    /// `acr_values` of `extra_params` (space-separated, in the provider's order of
    /// preference; checked non-empty at load): the ID token's `acr` must be one of them,
    /// which the callback checks (OIDC Core §3.1.2.1 makes the request voluntary for the
    /// provider, so the request alone would be no control).
    pub fn acr_values(&self) -> Option<impl Iterator<Item = &str>> {
        self.extra_param("acr_values").map(|v| v.split(' ').filter(|a| !a.is_empty()))
    }

    fn extra_param(&self, name: &str) -> Option<&str> {
        self.extra_params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// `[session]`, compiled.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Starts with `_portcullis`, so header hygiene strips it before forwarding. The
    /// base name: on the wire it is `__Host-<name>` (host-only), or `__Secure-<name>`
    /// with `cookie_domain` (`session::cookie::session_name`).
    pub cookie_name: String,
    /// Share the session with this domain's subdomains: then `__Host-` is impossible,
    /// and any host under the domain can replace the cookie.
    pub cookie_domain: Option<String>,
    /// Base64 AES-256 keys, one per line or comma-separated; the first seals.
    pub keys: SecretSource,
    pub absolute_lifetime: Duration,
    pub idle_lifetime: Duration,
    pub refresh_before: Duration,
}

/// The default callback path; under `/.portcullis/` with the other endpoints.
pub const DEFAULT_REDIRECT_PATH: &str = "/.portcullis/callback";

#[derive(Debug, Clone, Default)]
pub struct Listen {
    pub https: Option<SocketAddr>,
    pub insecure_http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub sni: Vec<SniCert>,
}

#[derive(Debug, Clone)]
pub struct SniCert {
    pub server_names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How long SIGTERM waits for in-flight requests before closing connections.
    pub shutdown_grace: Duration,
    /// Poll config and policy files and reload on change (SIGHUP always works).
    pub watch: bool,
    pub policy_dir: PathBuf,
    pub max_connections: usize,
    /// Connections (and database sessions) one client may have open at once, counted
    /// per IPv4 address or IPv6 /64, `listen.trusted_proxies` not counted; 0: no limit.
    pub max_connections_per_client: usize,
    /// A connection with no request in flight for this long is closed (HTTP/2 with a
    /// GOAWAY), including one that never sent a request.
    pub idle_timeout: Duration,
    /// Verified tokens kept (each ≈ 5 KB with its identity); 0 verifies every request.
    pub token_cache_entries: usize,
    /// How long a client has to finish a request head once it has started one.
    pub header_timeout: Duration,
    /// How long a client may take nothing of what the server has for it (a response it
    /// does not read, an HTTP/2 window it keeps closed) before the connection is closed.
    pub send_timeout: Duration,
    /// The most a request head (request line and headers; HTTP/2: the header list) may
    /// take, and so the read buffer each HTTP/1 connection may grow to.
    pub max_header_size: usize,
}

#[derive(Debug, Clone)]
pub struct AssertionSettings {
    /// `iss` of the signed identity assertion sent upstream.
    pub issuer: String,
    pub ttl: Duration,
    /// PKCS#8 PEM of a P-256 key; generated at start-up when absent (then each replica
    /// has its own key, which upstreams discover through the JWKS endpoint).
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
}

/// `[audit] on_failure`: while the audit output fails, stalls or overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditOnFailure {
    /// Requests are served as usual; `/readyz` and the metrics say the audit is failing.
    #[default]
    Serve,
    /// New HTTP requests and database sessions are refused with 503 `audit-unavailable`
    /// (fail closed: no access that leaves no trace).
    Reject,
}

/// Where a route forwards to.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Prefix prepended to the forwarded path ("" when the URL has none).
    pub base_path: String,
    /// HTTP/2 with prior knowledge over plain TCP (`h2c://`).
    pub h2c: bool,
    pub ca: Option<PathBuf>,
    /// The URL as written, for logs.
    pub display: Arc<str>,
}

/// Which requests a route takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` → `.example.com`: one or more labels before the suffix.
    Suffix(String),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.get(host.len() - s.len()..).is_some_and(|t| t.eq_ignore_ascii_case(s))
            }
        }
    }
    /// Higher is more specific; routes are tried most specific first.
    pub fn specificity(&self) -> usize {
        match self {
            HostMatch::Any => 0,
            HostMatch::Suffix(s) => 1 + s.len(),
            HostMatch::Exact(h) => 10_000 + h.len(),
        }
    }
}

#[derive(Debug)]
pub struct RouteSettings {
    pub name: Arc<str>,
    pub host: HostMatch,
    /// Always starts with `/`; matches on a segment boundary.
    pub path_prefix: String,
    pub methods: Option<Vec<Method>>,
    pub upstream: Upstream,
    pub policy: Arc<Policy>,
    pub shadow_policy: Option<Arc<Policy>>,
    pub forward_token: bool,
    /// Send the signed `X-Portcullis-Assertion` (default). Off, the upstream gets the
    /// plain identity headers only, and a new identity costs no ES256 signature.
    pub identity_assertion: bool,
    /// Until the upstream's response head.
    pub timeout: Duration,
    /// The longest the upstream may send nothing while its response body is relayed
    /// (time spent waiting on the client does not count).
    pub read_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_request_body: u64,
    pub preserve_host: bool,
    /// Client headers removed before forwarding, besides every `X-Portcullis-*`: the
    /// configured `strip_headers`, then every `claim_headers` name of this route and of
    /// every other (so a client's own copy never reaches an upstream, whether the
    /// caller's claim is sent or not, through whichever route).
    pub strip_headers: Vec<HeaderName>,
    /// Verified claims sent as plain headers (`claim_headers`), in header-name order;
    /// empty on most routes, which then pay nothing for them.
    pub claim_headers: Box<[ClaimHeader]>,
    pub single_use_tokens: bool,
    /// Forward a CORS preflight that carries no credential without authentication
    /// (browsers never send one on a preflight); off by default.
    pub cors_preflight: bool,
    /// Remove `path_prefix` from the path before the upstream's base path is prepended
    /// ([`RouteSettings::forwarded_path`]); off by default. Policies still see the
    /// client's path.
    pub strip_prefix: bool,
    /// On a `strip_prefix` route, put the prefix back into the answer's `Location`,
    /// `Content-Location` and `Set-Cookie` paths ([`crate::http::prefix`]); on by default.
    pub restore_prefix: bool,
    /// Issuers whose credentials the route accepts; `None`: every issuer.
    pub issuers: Option<Vec<IssuerId>>,
}

/// One `claim_headers` entry: the header `header` carries the claim `claim`
/// ([`crate::http::headers::claim_headers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHeader {
    pub header: HeaderName,
    pub claim: Arc<str>,
}

impl RouteSettings {
    /// Whether the route takes credentials from this issuer.
    pub fn accepts(&self, issuer: &IssuerId) -> bool {
        self.issuers.as_ref().is_none_or(|list| list.contains(issuer))
    }

    /// What of the canonical `path` this route matched goes upstream (before the
    /// upstream's base path), and the prefix removed from it, if any: `path` itself
    /// without `strip_prefix`; with it, `path` less `path_prefix` as the route matched
    /// it ([`path_has_prefix`]: a trailing `/` of the prefix does not count), so
    /// `/billing/x` is `/x` for `/billing` and `/billing/` alike, and `/billing` and
    /// `/billing/` are `/`. The prefix is given without its trailing `/` (for
    /// `X-Forwarded-Prefix`); a prefix of `/` removes nothing. `None` when `path` is not
    /// under the prefix of a `strip_prefix` route (never so for a path the route
    /// matched; without `strip_prefix` the path is not looked at again).
    pub fn forwarded_path<'p>(&self, path: &'p str) -> Option<(&'p str, Option<&str>)> {
        let prefix = self.path_prefix.strip_suffix('/').unwrap_or(&self.path_prefix);
        if !self.strip_prefix || prefix.is_empty() {
            return Some((path, None));
        }
        match path.strip_prefix(prefix)? {
            "" => Some(("/", Some(prefix))),
            rest if rest.starts_with('/') => Some((rest, Some(prefix))),
            _ => None,
        }
    }
}

impl HostMatch {
    /// Whether some request's host matches both.
    pub fn overlaps(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Any, _) | (_, HostMatch::Any) => true,
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a == b,
            (HostMatch::Exact(h), s @ HostMatch::Suffix(_))
            | (s @ HostMatch::Suffix(_), HostMatch::Exact(h)) => s.matches(h),
            (HostMatch::Suffix(a), HostMatch::Suffix(b)) => a.ends_with(&**b) || b.ends_with(&**a),
        }
    }
}

impl RouteSettings {
    /// Whether some request matches both routes: hosts that can be the same name, path
    /// prefixes one of which covers the other, and methods both admit.
    pub fn overlaps(&self, other: &RouteSettings) -> bool {
        let admits = |ms: &Option<Vec<Method>>, m: &Method| {
            ms.as_ref().is_none_or(|ms| crate::policy::methods_admit(ms, m))
        };
        let methods = match (&self.methods, &other.methods) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) => {
                a.iter().any(|m| admits(&other.methods, m))
                    || b.iter().any(|m| admits(&self.methods, m))
            }
        };
        self.host.overlaps(&other.host)
            && (path_has_prefix(&self.path_prefix, &other.path_prefix)
                || path_has_prefix(&other.path_prefix, &self.path_prefix))
            && methods
    }

    pub fn matches(&self, host: &str, path: &str, method: &Method) -> bool {
        self.host.matches(host)
            && path_has_prefix(path, &self.path_prefix)
            // `GET` also takes `HEAD`, as in policies: a `HEAD` runs the `GET` handler
            // upstream, so it must not fall through to another route and its policy.
            && self.methods.as_ref().is_none_or(|m| crate::policy::methods_admit(m, method))
    }
}

/// A route host (lower-cased) that a request's host can equal: dot-separated, non-empty
/// labels of the bytes a request's name may hold (`http::authority::host_label_byte`),
/// 253 bytes at most.
fn route_host_name(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(crate::http::authority::host_label_byte)
        })
}

/// Whether `earlier`, tried first, takes every request `later` matches: the same host
/// (as written, case aside), the same path prefix (`/api` and `/api/` are the same,
/// [`path_has_prefix`]) and no method filter, or one that admits all of `later`'s.
fn takes_all_of(earlier: &RouteSettings, later: &RouteSettings) -> bool {
    let methods = match (&earlier.methods, &later.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => !l.is_empty() && l.iter().all(|m| crate::policy::methods_admit(e, m)),
    };
    earlier.host == later.host
        && earlier.path_prefix.trim_end_matches('/') == later.path_prefix.trim_end_matches('/')
        && methods
}

/// A compiled route and its place in the configuration.
type Placed = PlacedAs<RouteSettings>;

/// Each route (in routing order) that an earlier one [`takes_all_of`], with the first
/// such earlier route. Only routes with the same host and prefix can take all of each
/// other's requests, so a route is compared with those alone ([`SameMatch`]): one pass
/// over thousands of routes instead of every pair.
fn never_reached(routes: &[Placed]) -> Vec<(&Placed, &Placed)> {
    never_reached_by(routes, takes_all_of)
}

/// A route (compiled, or shared as in [`Config::routes`]) and its place in the
/// configuration.
type PlacedAs<R> = (usize, R);

/// [`never_reached`], with `takes` for [`takes_all_of`] (a test counts the comparisons).
fn never_reached_by<R: std::borrow::Borrow<RouteSettings>>(
    routes: &[PlacedAs<R>],
    mut takes: impl FnMut(&RouteSettings, &RouteSettings) -> bool,
) -> Vec<(&PlacedAs<R>, &PlacedAs<R>)> {
    let mut same_match: HashMap<(&HostMatch, &str), SameMatch<'_, R>> = HashMap::new();
    let mut dead = Vec::new();
    for (at, later) in routes.iter().enumerate() {
        let r = later.1.borrow();
        let key = (&r.host, r.path_prefix.trim_end_matches('/'));
        let group = same_match.entry(key).or_insert_with(SameMatch::new);
        match group.first_taker(r, &mut takes) {
            Some(earlier) => dead.push((later, earlier)),
            None => group.add(at, later),
        }
    }
    dead
}

/// The routes of one host and prefix that no earlier route takes all of, in routing
/// order, indexed by the methods they admit. A route taken by an earlier one is never
/// the first to take a later route (its taker, earlier still, takes that one too), so
/// only these are compared with: routes differing only in methods (`[PROPFIND]`,
/// `[MKCOL]`, … on one prefix) are compared with those admitting their rarest method,
/// not with every earlier one.
struct SameMatch<'a, R> {
    /// The first route with no method filter, which takes every later one.
    any: Option<(usize, &'a PlacedAs<R>)>,
    /// Routes with a method filter, with their place in routing order.
    filtered: Vec<(usize, &'a PlacedAs<R>)>,
    /// Each method a route of `filtered` admits (`HEAD` for `GET` too) → those routes
    /// (indices into `filtered`, in routing order).
    admitting: HashMap<Method, Vec<usize>>,
}

impl<'a, R: std::borrow::Borrow<RouteSettings>> SameMatch<'a, R> {
    fn new() -> Self {
        SameMatch { any: None, filtered: Vec::new(), admitting: HashMap::new() }
    }

    /// The first route of the group that takes all of `later`, by `takes`.
    fn first_taker(
        &self,
        later: &RouteSettings,
        takes: &mut impl FnMut(&RouteSettings, &RouteSettings) -> bool,
    ) -> Option<&'a PlacedAs<R>> {
        // Only a route admitting every method of `later` can take it: those admitting
        // its rarest method are enough to look at. No method, or no filter: only `any`.
        let rarest = later.methods.as_ref().filter(|l| !l.is_empty()).and_then(|l| {
            l.iter()
                .map(|m| self.admitting.get(m))
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .min_by_key(|list| list.len())
        });
        let filtered = rarest.and_then(|list| {
            list.iter()
                .filter_map(|&i| self.filtered.get(i).copied())
                .find(|(_, e)| takes(e.1.borrow(), later))
        });
        let any = self.any.filter(|(_, e)| takes(e.1.borrow(), later));
        match (any, filtered) {
            (Some(a), Some(f)) => Some(if a.0 < f.0 { a.1 } else { f.1 }),
            (a, f) => a.or(f).map(|(_, e)| e),
        }
    }

    /// `route`, at `at` in routing order, which no earlier route of the group takes.
    fn add(&mut self, at: usize, route: &'a PlacedAs<R>) {
        let Some(methods) = &route.1.borrow().methods else {
            self.any.get_or_insert((at, route));
            return;
        };
        let i = self.filtered.len();
        self.filtered.push((at, route));
        let implied = methods.contains(&Method::GET).then_some(Method::HEAD);
        for m in methods.iter().cloned().chain(implied) {
            let list = self.admitting.entry(m).or_default();
            if list.last() != Some(&i) {
                list.push(i);
            }
        }
    }
}

/// How specific a route's `path_prefix` is, for routing order: its length without a
/// trailing `/` (`/` is 0, `/api` and `/api/` both 4), since both spellings match the
/// same paths.
pub fn prefix_rank(prefix: &str) -> usize {
    prefix.trim_end_matches('/').len()
}

/// `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let p = prefix.strip_suffix('/').unwrap_or(prefix);
    path.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// An IPv4 or IPv6 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(IpNet { addr, prefix })
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// A request head may take this much by default: nginx's `large_client_header_buffers`
/// allow 32 KiB; hyper's own default (≈ 400 KiB per connection) let 1 500 unfinished
/// heads hold 600 MB.
pub const DEFAULT_MAX_HEADER_SIZE: usize = 64 * 1024;
const MIN_HEADER_SIZE: u64 = 8 * 1024;
/// What a request head needs with the largest session cookie and room for the rest.
const SESSION_HEADER_ROOM: usize = 40 * 1024;
const MAX_HEADER_SIZE: u64 = 1024 * 1024;
const DEFAULT_BODY_LIMIT: u64 = 10 * 1024 * 1024;
/// The longest `leeway` (V19).
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Defaults of the durations that bound how long access lasts, as the load applies them
/// when a setting is not written (`policy diff` reads them to say what a change does).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// An issuer's `stale_window`.
pub const DEFAULT_STALE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// `[session] absolute_lifetime`.
pub const DEFAULT_ABSOLUTE_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// `[session] idle_lifetime`.
pub const DEFAULT_IDLE_LIFETIME: Duration = Duration::from_secs(3600);
/// `[assertion] ttl`.
pub const DEFAULT_ASSERTION_TTL: Duration = Duration::from_secs(60);
/// The shortest `refresh_cooldown`: an unknown `kid` needs no valid signature, so the
/// cooldown is all that stands between junk tokens and a JWKS fetch per request (an
/// unauthenticated amplifier towards the identity provider, which may rate-limit us).
/// One second bounds that to one fetch per second per issuer, whatever the request
/// rate; the cooldown also runs from the end of a fetch, so requests queued behind a
/// slow one do not each start another.
const MIN_REFRESH_COOLDOWN: Duration = Duration::from_secs(1);
/// The longest duration any setting takes: a hundred years is "never" for every one of
/// them, and keeps every deadline computed from it (`Instant` + it, Unix seconds + it)
/// far from overflowing. `"18446744073709551615s"` as an `idle_timeout` passed `check`
/// and then panicked on every connection the server accepted.
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600); // `"100y"`
/// The most `max_connections` may be: far above what one process's descriptors allow
/// (two per connection), and within what the slot semaphore can count (a larger value
/// passed `check` and made `serve` panic at start).
const MAX_CONNECTIONS: i64 = 1_000_000;
const TOP_LEVEL: &[&str] = &[
    "listen",
    "tls",
    "server",
    "assertion",
    "audit",
    "session",
    "redis",
    "issuers",
    "routes",
    "databases",
];

impl Config {
    /// Loads and compiles a configuration and every policy it names, as `serve` does.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        Self::attempt(path).result
    }

    /// [`Config::load`] reading only what `mode` reads.
    pub fn load_with(path: &Path, mode: LoadMode) -> Result<Config, LoadError> {
        Self::attempt_with(path, mode).result
    }

    /// [`Config::load`], and the files the load read or tried to read, also when it
    /// failed: a refused version still names the files a fix may be written to.
    pub fn attempt(path: &Path) -> Attempt {
        Self::attempt_with(path, LoadMode::Serve)
    }

    fn attempt_with(path: &Path, mode: LoadMode) -> Attempt {
        match Source::read(path) {
            Ok(source) => Self::compile_attempt(&source, mode),
            Err(d) => Attempt { result: Err(LoadError(vec![d])), files: vec![path.to_path_buf()] },
        }
    }

    /// The failing `[[test]]` cases of the policies this configuration enforces or
    /// shadows (HTTP and database routes; each file once), in file order. What `check`
    /// reports (exit 1), and what keeps a version from serving: `serve` does not start
    /// and a reload is refused while one fails.
    ///
    /// Run once per load, however often asked: `serve` asks before it starts
    /// ([`crate::server::load_or_report`], to print every failure) and
    /// [`crate::server::Server::start`] asks again (it serves no configuration whose
    /// tests fail, whoever calls it); the outcome for one load cannot change.
    pub fn failing_policy_tests(&self) -> Vec<crate::policy::TestOutcome> {
        self.policy_test_failures.get_or_init(|| self.run_policy_tests()).clone()
    }

    fn run_policy_tests(&self) -> Vec<crate::policy::TestOutcome> {
        let mut seen = HashSet::new();
        let mut cases = 0;
        let http = self
            .routes
            .iter()
            .flat_map(|r| std::iter::once(&r.policy).chain(r.shadow_policy.as_ref()));
        let failures: Vec<_> = http
            .chain(self.databases.iter().map(|d| &d.policy))
            .filter(|p| seen.insert(p.file().to_path_buf()))
            .flat_map(|p| {
                let preflight = |path: &str| self.forwards_preflight(p, path);
                let outcomes =
                    crate::policy::run_cases_with(p, p.file_arc(), p.tests(), &preflight);
                cases += outcomes.len();
                outcomes.into_iter().filter(|o| !o.passed())
            })
            .collect();
        tracing::debug!(
            target: "portcullis::config",
            cases,
            failed = failures.len(),
            files = seen.len(),
            "policy tests run"
        );
        failures
    }

    /// Whether a route that uses `policy` (live or shadow) forwards a CORS preflight to
    /// `path` without consulting it: `cors_preflight = true`, `path` under its
    /// `path_prefix`, and its method filter (if any) takes `OPTIONS`. How a `[[test]]`
    /// of an anonymous `OPTIONS` is decided ([`crate::policy::decide_case`]).
    pub fn forwards_preflight(&self, policy: &Policy, path: &str) -> bool {
        self.routes.iter().any(|r| {
            let uses = r.policy.file() == policy.file()
                || r.shadow_policy.as_ref().is_some_and(|s| s.file() == policy.file());
            r.cors_preflight
                && uses
                && path_has_prefix(path, &r.path_prefix)
                && r.methods
                    .as_ref()
                    .is_none_or(|m| crate::policy::methods_admit(m, &Method::OPTIONS))
        })
    }

    /// Compiles configuration text. Policies and certificates are read relative to the
    /// configuration file's directory.
    pub fn compile(source: &Source) -> Result<Config, LoadError> {
        Self::compile_attempt(source, LoadMode::Serve).result
    }

    fn compile_attempt(source: &Source, mode: LoadMode) -> Attempt {
        let mut diags = Diagnostics::default();
        let mut compiler = Compiler {
            source,
            diags: &mut diags,
            base: base_dir(&source.path),
            named_files: Vec::new(),
            mode,
        };
        let cfg = compiler.run();
        let named = std::mem::take(&mut compiler.named_files);
        let files = |c: Option<&Config>| match c {
            Some(c) => c.files.clone(),
            // Not even TOML: it names nothing yet.
            None => std::iter::once(source.path.to_path_buf()).chain(named).collect(),
        };
        match cfg {
            Some(c) if diags.is_empty() => Attempt { files: files(Some(&c)), result: Ok(c) },
            c => Attempt { files: files(c.as_ref()), result: Err(LoadError(diags.into_sorted())) },
        }
    }

    /// The route for a request: most specific host first, then longest path prefix,
    /// then configuration order.
    pub fn route(&self, host: &str, path: &str, method: &Method) -> Option<&Arc<RouteSettings>> {
        self.route_at(host, path, method).map(|(_, r)| r)
    }

    /// The names of the routes tried before the route `name` that can take some of the
    /// same requests ([`RouteSettings::overlaps`]) and that `other` has too, sorted: what
    /// a reload compares to tell a change of routing order that matters (which of them
    /// comes first among themselves is their own business).
    pub fn routes_tried_before(&self, name: &str, other: &Config) -> Vec<&str> {
        let Some(route) = self.routes.iter().find(|r| &*r.name == name) else {
            return Vec::new();
        };
        let mut names: Vec<&str> = self
            .routes
            .iter()
            .take_while(|r| &*r.name != name)
            .filter(|r| r.overlaps(route) && other.routes.iter().any(|o| o.name == r.name))
            .map(|r| &*r.name)
            .collect();
        names.sort_unstable();
        names
    }

    /// [`Config::route`] and its index in `routes`. The one route matching of the proxy
    /// (requests, and open WebSocket tunnels at every reload) and of `explain`.
    pub fn route_at(
        &self,
        host: &str,
        path: &str,
        method: &Method,
    ) -> Option<(usize, &Arc<RouteSettings>)> {
        self.routes.iter().enumerate().find(|(_, r)| r.matches(host, path, method))
    }

    /// What this configuration read of its own file and of each policy it enforces or
    /// shadows: path → SHA-256 of the bytes read. The watcher compares the files on disk
    /// with these, so a write that lands after the load read a file is never taken for
    /// what was loaded.
    pub fn read_digests(&self) -> BTreeMap<PathBuf, [u8; 32]> {
        let http = self
            .routes
            .iter()
            .flat_map(|r| std::iter::once(&r.policy).chain(r.shadow_policy.as_ref()));
        http.chain(self.databases.iter().map(|d| &d.policy))
            .map(|p| (p.file().to_path_buf(), p.sha256()))
            .chain(std::iter::once((self.path.clone(), self.sha256)))
            .collect()
    }

    pub fn issuer(&self, id: &str) -> Option<&IssuerSettings> {
        self.issuers.iter().find(|i| i.id.as_str() == id)
    }

    /// The login settings of an issuer, if browsers can sign in with it.
    pub fn login(&self, id: &IssuerId) -> Option<&LoginSettings> {
        self.logins.iter().find(|l| &l.issuer == id)
    }

    /// The issuers a browser may sign in with on a route, in configuration order.
    pub fn login_issuers(&self, route: &RouteSettings) -> Vec<&LoginSettings> {
        self.logins.iter().filter(|l| route.accepts(&l.issuer)).collect()
    }
}

fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

struct Compiler<'a> {
    source: &'a Source,
    diags: &'a mut Diagnostics,
    base: PathBuf,
    /// Every file the configuration names for the server to read (certificates, keys,
    /// CAs, secret files): they go into [`Config::files`], so the watcher reloads when
    /// one changes.
    named_files: Vec<PathBuf>,
    mode: LoadMode,
}

impl Compiler<'_> {
    fn err(&mut self, span: std::ops::Range<usize>, msg: impl Into<String>) {
        let d = self.source.error(Some(span), msg);
        self.diags.push(d);
    }

    /// Deserializes one section on its own, so a mistake in one issuer or route does not
    /// hide the mistakes in the others.
    fn section<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>) -> Option<T> {
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(v) => Some(v),
            Err(e) => {
                let d = self.source.toml_error(&e);
                self.diags.push(d);
                None
            }
        }
    }

    fn run(&mut self) -> Option<Config> {
        let text = self.source.text.clone();
        let (doc, errors) = DeTable::parse_recoverable(&text);
        if !errors.is_empty() {
            for d in self.source.toml_errors(&errors) {
                self.diags.push(d);
            }
            return None;
        }
        let mut listen = raw::Listen::default();
        let mut tls = None;
        let mut server = raw::Server::default();
        let mut assertion = raw::Assertion::default();
        let mut audit = raw::Audit::default();
        let mut redis = None;
        let mut session: Option<(std::ops::Range<usize>, raw::Session)> = None;
        let mut issuers: Vec<(Spanned<String>, raw::Issuer)> = Vec::new();
        let mut broken_issuers: Vec<(String, Preset)> = Vec::new();
        let mut routes: Vec<raw::Route> = Vec::new();
        let mut saw_routes = false;
        let mut databases: Vec<raw::Database> = Vec::new();

        for (key, value) in doc.into_inner() {
            let span = key.span();
            match key.get_ref().as_ref() {
                "listen" => listen = self.section(value).unwrap_or_default(),
                "tls" => tls = self.section::<raw::Tls>(value),
                "server" => server = self.section(value).unwrap_or_default(),
                "assertion" => assertion = self.section(value).unwrap_or_default(),
                "audit" => audit = self.section(value).unwrap_or_default(),
                "redis" => redis = self.section::<raw::Redis>(value).and_then(|r| self.redis(r)),
                "session" => {
                    let vspan = value.span();
                    session = self.section(value).map(|s| (vspan, s));
                }
                "issuers" => {
                    let vspan = value.span();
                    match value.into_inner() {
                        DeValue::Table(t) => {
                            for (name, v) in t {
                                let name = Spanned::new(name.span(), name.get_ref().to_string());
                                let preset = match v.get_ref() {
                                    DeValue::Table(t) => t
                                        .iter()
                                        .find(|(k, _)| k.get_ref() == "preset")
                                        .and_then(|(_, p)| match p.get_ref() {
                                            DeValue::String(s) => Preset::parse(s),
                                            _ => None,
                                        }),
                                    _ => None,
                                };
                                match self.section::<raw::Issuer>(v) {
                                    Some(i) => issuers.push((name, i)),
                                    // Still declared: policies naming it are checked
                                    // without a second error per mention.
                                    None => broken_issuers
                                        .push((name.into_inner(), preset.unwrap_or(Preset::Oidc))),
                                }
                            }
                        }
                        _ => self.err(vspan, "`issuers` must be a table of [issuers.NAME]"),
                    }
                }
                "routes" => {
                    saw_routes = true;
                    let vspan = value.span();
                    match value.into_inner() {
                        DeValue::Array(a) => {
                            for v in a {
                                if let Some(r) = self.section::<raw::Route>(v) {
                                    routes.push(r);
                                }
                            }
                        }
                        _ => self.err(vspan, "`routes` must be an array of [[routes]]"),
                    }
                }
                "databases" => {
                    let vspan = value.span();
                    match value.into_inner() {
                        DeValue::Array(a) => {
                            for v in a {
                                if let Some(d) = self.section::<raw::Database>(v) {
                                    databases.push(d);
                                }
                            }
                        }
                        _ => self.err(vspan, "`databases` must be an array of [[databases]]"),
                    }
                }
                other => self.err(
                    span,
                    format!("unknown key `{other}`, expected one of: {}", TOP_LEVEL.join(", ")),
                ),
            }
        }
        if !saw_routes && databases.is_empty() {
            self.err(0..0, "no [[routes]]: a proxy with no routes rejects everything");
        }

        let listen = self.listen(listen);
        let (tls, tls_warnings) = match tls.map(|t| self.tls(t)) {
            Some((t, w)) => (Some(t), w),
            None => (None, Vec::new()),
        };
        if listen.https.is_some() && tls.is_none() {
            self.err(0..0, "`listen.https` is set but there is no [tls] section");
        }
        // A configuration with only database routes needs no HTTP listener.
        if listen.https.is_none() && listen.insecure_http.is_none() && databases.is_empty() {
            self.err(0..0, "no listener: set `listen.https` (or `listen.insecure_http`)");
        }
        if saw_routes && listen.https.is_none() && listen.insecure_http.is_none() {
            self.err(
                0..0,
                "[[routes]] need a listener: set `listen.https` (or `listen.insecure_http`)",
            );
        }
        if !databases.is_empty() && tls.is_none() {
            self.err(
                databases[0].name.span(),
                "[[databases]] need a [tls] section: clients send their token as a password, so only over TLS",
            );
        }
        let header_size_span = server.max_header_size.as_ref().map(|v| v.span());
        let server = self.server(server);
        let assertion = self.assertion(assertion);
        let audit_on_failure = match &audit.on_failure {
            None => AuditOnFailure::Serve,
            Some(v) => match v.get_ref().as_str() {
                "serve" => AuditOnFailure::Serve,
                "reject" => AuditOnFailure::Reject,
                other => {
                    self.err(
                        v.span(),
                        format!("unknown on_failure `{other}`, expected serve or reject"),
                    );
                    AuditOnFailure::Serve
                }
            },
        };
        let audit = match audit.output {
            None => AuditOutput::Stdout,
            Some(o) if o.get_ref() == "stdout" => AuditOutput::Stdout,
            Some(o) => {
                // What `serve` opens for appending at start: refused here, where written,
                // rather than there (nothing is created by a load).
                let p = self.path(o.get_ref());
                if o.get_ref().is_empty() {
                    self.err(o.span(), "`output` is \"stdout\" or the path of a file to append to");
                } else if self.mode == LoadMode::Serve && p.is_dir() {
                    self.err(
                        o.span(),
                        format!(
                            "{} is a directory: `output` is the file events are appended to",
                            file_shown(&p)
                        ),
                    );
                } else if self.mode == LoadMode::Serve
                    && !p.parent().is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
                {
                    self.err(
                        o.span(),
                        format!("the directory of {} does not exist", file_shown(&p)),
                    );
                }
                AuditOutput::File(p)
            }
        };

        let mut seen = HashSet::new();
        let mut compiled_issuers = Vec::new();
        // Every declared issuer goes into the catalog, even one with errors of its own,
        // so its policies are still checked (and not drowned in "not declared" noise).
        let mut catalog = Catalog::default();
        for (name, preset) in &broken_issuers {
            catalog.declare(name, *preset);
        }
        let mut logins = Vec::new();
        let mut first_login_span = None;
        for (name, mut raw) in issuers {
            if !seen.insert(name.get_ref().clone()) {
                self.err(name.span(), format!("duplicate issuer `{}`", name.get_ref()));
            }
            let preset = raw
                .preset
                .as_ref()
                .and_then(|p| Preset::parse(p.get_ref()))
                .unwrap_or(Preset::Oidc);
            // The authentication context the login demands holds the issuer's bearer
            // ID tokens to it too: one person, one bar, whichever way they come in.
            let mut acr_values = Vec::new();
            if let Some(login) = raw.login.take() {
                first_login_span.get_or_insert(login.span());
                if let Some(l) = self.login(&name, preset, login) {
                    acr_values = l.acr_values().into_iter().flatten().map(str::to_owned).collect();
                    logins.push(l);
                }
            }
            match self.issuer(&name, raw) {
                Some(mut i) => {
                    i.acr_values = acr_values;
                    catalog.insert(i.clone());
                    compiled_issuers.push(i);
                }
                None => catalog.declare(name.get_ref(), preset),
            }
        }
        let session = match (session, first_login_span) {
            (Some((span, s)), _) => self.session(span, s),
            (None, Some(span)) => {
                self.err(span, "`login` needs a [session] section (cookie keys, lifetimes)");
                None
            }
            (None, None) => None,
        };

        let mut files = vec![self.source.path.to_path_buf()];
        let mut warnings = tls_warnings;
        // A signed-in browser sends up to 8 session-cookie chunks of 3.8 KB.
        if let (Some(_), Some(span)) = (&session, header_size_span) {
            if server.max_header_size < SESSION_HEADER_ROOM {
                warnings.push(self.source.error(
                    Some(span),
                    "session cookies can take 30 KB of a request head (8 chunks of 3.8 KB): \
                     below 40KiB, browsers with large sessions get 431",
                ));
            }
        }
        let mut policies: BTreeMap<PathBuf, Option<Arc<Policy>>> = BTreeMap::new();
        let mut compiled_routes = Vec::new();
        let mut route_names = HashSet::new();
        // Where each route is named, by configuration order (for warnings about it).
        let mut route_at = Vec::new();
        for (order, r) in routes.into_iter().enumerate() {
            route_at.push(r.name.span());
            if !route_names.insert(r.name.get_ref().clone()) {
                self.err(r.name.span(), format!("duplicate route name `{}`", r.name.get_ref()));
            }
            if let Some(route) =
                self.route(r, &server.policy_dir, &catalog, &mut policies, &mut warnings)
            {
                compiled_routes.push((order, route));
            }
        }
        // Every route removes a client's copy of every `claim_headers` name, not only the
        // routes that set it: an application reached through two routes (a signed-in one
        // that sends `X-Team`, a public webhook one that does not) must not take a
        // client's `X-Team` from the other.
        let claim_names: Vec<HeaderName> = compiled_routes
            .iter()
            .flat_map(|(_, r): &(usize, RouteSettings)| r.claim_headers.iter())
            .map(|c| c.header.clone())
            .collect();
        for (_, r) in &mut compiled_routes {
            for n in &claim_names {
                if !r.strip_headers.contains(n) {
                    r.strip_headers.push(n.clone());
                }
            }
        }
        // A browser refuses a cookie whose `Domain` does not cover the host that set it:
        // on a sign-in route outside `cookie_domain`, every sign-in ends without a
        // session and starts again.
        if let Some(domain) = session.as_ref().and_then(|s| s.cookie_domain.as_deref()) {
            for (order, r) in &compiled_routes {
                let host = match &r.host {
                    HostMatch::Any => continue,
                    HostMatch::Exact(h) => h.as_str(),
                    HostMatch::Suffix(s) => s.trim_start_matches('.'),
                };
                let covered = host.eq_ignore_ascii_case(domain)
                    || host.len() > domain.len()
                        && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
                        && host.as_bytes()[host.len() - domain.len() - 1] == b'.';
                if !covered && logins.iter().any(|l| r.accepts(&l.issuer)) {
                    warnings.push(self.source.error(
                        route_at.get(*order).cloned(),
                        format!(
                            "route `{}` offers browser sign-in on a host outside `cookie_domain` \
                             `{domain}`: browsers refuse its session cookie, so sign-in never \
                             completes there",
                            r.name
                        ),
                    ));
                }
            }
        }
        let mut compiled_databases = Vec::new();
        let mut db_names = HashSet::new();
        let mut db_listens: Vec<SocketAddr> =
            [listen.https, listen.insecure_http, listen.admin].into_iter().flatten().collect();
        for d in databases {
            if !db_names.insert(d.name.get_ref().clone()) {
                self.err(
                    d.name.span(),
                    format!("duplicate database route name `{}`", d.name.get_ref()),
                );
            }
            let listen_span = d.listen.span();
            if let Some(db) =
                self.database(d, &server.policy_dir, &catalog, &mut policies, &mut warnings)
            {
                if db_listens.iter().any(|l| same_socket(*l, db.listen)) {
                    self.err(
                        listen_span,
                        format!("`{}` is already used by another listener", db.listen),
                    );
                }
                db_listens.push(db.listen);
                compiled_databases.push(Arc::new(db));
            }
        }
        files.append(&mut self.named_files);
        let mut seen_files = HashSet::new();
        files.retain(|f| seen_files.insert(f.clone()));
        // Most specific host first, then longest prefix, then configuration order. A
        // prefix's trailing `/` does not count: `/api` and `/api/` match the same paths
        // ([`path_has_prefix`]), so neither outranks the other by its spelling.
        compiled_routes.sort_by(|(oa, a), (ob, b)| {
            (b.host.specificity(), prefix_rank(&b.path_prefix), *oa).cmp(&(
                a.host.specificity(),
                prefix_rank(&a.path_prefix),
                *ob,
            ))
        });
        // A route an earlier one takes every request of is dead: its policy never
        // applies, and whoever reads the file believes it does.
        for ((order, route), (earlier_order, earlier)) in never_reached(&compiled_routes) {
            let line = self.source.error(route_at.get(*earlier_order).cloned(), "").line;
            let methods = if earlier.methods.is_some() { " and methods" } else { "" };
            warnings.push(self.source.error(
                route_at.get(*order).cloned(),
                format!(
                    "route `{}` is never reached: route `{}` (line {line}) is tried first and takes every request it matches (the same host and path_prefix{methods}); remove one, or give them different `match`es",
                    route.name, earlier.name
                ),
            ));
        }
        Some(Config {
            path: self.source.path.to_path_buf(),
            listen,
            tls,
            server,
            assertion,
            audit,
            audit_on_failure,
            issuers: compiled_issuers,
            routes: compiled_routes.into_iter().map(|(_, r)| Arc::new(r)).collect(),
            databases: compiled_databases,
            files,
            sha256: crate::util::sha256(self.source.text.as_bytes()),
            warnings,
            session,
            logins,
            redis,
            mode: self.mode,
            policy_test_failures: Arc::default(),
        })
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn addr(&mut self, s: &Spanned<String>) -> Option<SocketAddr> {
        match s.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(s.span(), format!("`{}` is not an IP:port address", s.get_ref()));
                None
            }
        }
    }

    fn duration(&mut self, s: &Spanned<String>) -> Option<Duration> {
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d > MAX_DURATION => {
                self.err(s.span(), format!("`{}` is longer than 100 years", s.get_ref()));
                None
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.err(s.span(), format!("`{}` is not a duration (e.g. \"30s\")", s.get_ref()));
                None
            }
        }
    }

    fn listen(&mut self, l: raw::Listen) -> Listen {
        let mut out = Listen {
            https: l.https.as_ref().and_then(|a| self.addr(a)),
            insecure_http: l.insecure_http.as_ref().and_then(|a| self.addr(a)),
            // Loopback by default so /metrics and /readyz exist without exposing them;
            // `admin = "off"` turns the listener off.
            admin: match &l.admin {
                None => Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
                Some(a) if a.get_ref() == "off" => None,
                Some(a) => self.addr(a),
            },
            trusted_proxies: Vec::new(),
        };
        // Two listeners on one socket: `serve` would fail at start ("Address already in
        // use"), so `check` says so where the second one is written.
        let named = [
            ("https", l.https.as_ref(), out.https),
            ("insecure_http", l.insecure_http.as_ref(), out.insecure_http),
            ("admin", l.admin.as_ref(), out.admin),
        ];
        for (i, (_, written, addr)) in named.iter().enumerate() {
            let Some(addr) = addr else { continue };
            for (first, first_written, other) in &named[..i] {
                if !other.is_some_and(|o| same_socket(o, *addr)) {
                    continue;
                }
                match written {
                    Some(w) => self.err(
                        w.span(),
                        format!("`{addr}` is already used by another listener (`{first}`)"),
                    ),
                    // The admin listener by default: point at the one written.
                    None => {
                        if let Some(w) = first_written {
                            self.err(
                                w.span(),
                                format!(
                                    "`{addr}` is also the admin listener's address (by default): \
                                     set `admin` to another one, or \"off\""
                                ),
                            );
                        }
                    }
                }
                break;
            }
        }
        for p in l.trusted_proxies.unwrap_or_default() {
            match IpNet::parse(p.get_ref()) {
                Some(n) => out.trusted_proxies.push(n),
                None => self.err(p.span(), format!("`{}` is not an IP or CIDR", p.get_ref())),
            }
        }
        out
    }

    /// A file the server reads (certificate, key, CA); it is watched. It must exist
    /// unless the load is [`LoadMode::PolicyOnly`].
    fn existing_file(&mut self, s: &Spanned<String>) -> PathBuf {
        let p = self.path(s.get_ref());
        if self.mode == LoadMode::Serve && !p.is_file() {
            self.err(s.span(), format!("file {} does not exist", file_shown(&p)));
        }
        self.named_files.push(p.clone());
        p
    }

    /// `[tls]`, and a warning for each certificate that has expired or expires within
    /// [`crate::tls::EXPIRY_WARNING_DAYS`].
    fn tls(&mut self, t: raw::Tls) -> (TlsSettings, Vec<Diagnostic>) {
        let mut warnings = Vec::new();
        let cert = self.existing_file(&t.cert);
        self.expiry_warning(&t.cert, &cert, &mut warnings);
        let key = self.existing_file(&t.key);
        self.usable_pair((&t.cert, &cert), (&t.key, &key));
        let mut sni = Vec::new();
        let mut names_seen = HashSet::new();
        for s in t.sni {
            // As the listener will key them: `serve` refused a bad or repeated name at start.
            for n in s.server_names.get_ref() {
                match crate::tls::server_name_key(n.get_ref()) {
                    Err(e) => self.err(n.span(), e.to_string()),
                    Ok(key) => {
                        if !names_seen.insert(key) {
                            let name = n.get_ref().clone();
                            let e = crate::tls::TlsError::DuplicateServerName { name };
                            self.err(n.span(), e.to_string());
                        }
                    }
                }
            }
            let cert = self.existing_file(&s.cert);
            self.expiry_warning(&s.cert, &cert, &mut warnings);
            if s.server_names.get_ref().is_empty() {
                self.err(s.server_names.span(), "`server_names` must not be empty");
            }
            let key = self.existing_file(&s.key);
            self.usable_pair((&s.cert, &cert), (&s.key, &key));
            sni.push(SniCert {
                server_names: s
                    .server_names
                    .into_inner()
                    .into_iter()
                    .map(|n| n.into_inner().to_ascii_lowercase())
                    .collect(),
                cert,
                key,
            });
        }
        (TlsSettings { cert, key, sni }, warnings)
    }

    /// A CA file ([`Self::existing_file`]) that, when serving, must hold certificates
    /// rustls takes as roots, as the client that uses it will: `check` looked for the
    /// file only, and `serve` refused a file of anything else at start.
    fn existing_ca(&mut self, s: &Spanned<String>) -> PathBuf {
        let p = self.existing_file(s);
        if self.mode == LoadMode::Serve && p.is_file() {
            if let Err(e) = crate::tls::client_config(Some(&p), false) {
                self.err(s.span(), format!("CA file: {e}"));
            }
        }
        p
    }

    /// When serving, a certificate and key that exist must load as the listener loads
    /// them (a chain, a private key, the two a pair): `check` passed a key file given as
    /// `cert`, or another certificate's key, and `serve` then refused to start. The
    /// problem is reported where the file at fault is named; never its contents.
    fn usable_pair(&mut self, cert: (&Spanned<String>, &Path), key: (&Spanned<String>, &Path)) {
        if self.mode != LoadMode::Serve || !cert.1.is_file() || !key.1.is_file() {
            return;
        }
        if let Err(e) = crate::tls::load_certified_key(cert.1, key.1) {
            use crate::tls::TlsError;
            let at = match e {
                TlsError::NoPrivateKey { .. }
                | TlsError::UnsupportedKey { .. }
                | TlsError::KeyMismatch { .. } => key.0.span(),
                TlsError::Missing { ref path }
                | TlsError::Read { ref path, .. }
                | TlsError::Pem { ref path, .. }
                    if path == key.1 =>
                {
                    key.0.span()
                }
                _ => cert.0.span(),
            };
            self.err(at, e.to_string());
        }
    }

    /// Warns when the leaf of the certificate file `path` (named at `at`) has expired,
    /// expires soon, or has a notAfter that cannot be read. Only when serving; a file
    /// that cannot be read or parsed is left to the TLS load, which names what is wrong
    /// with it.
    fn expiry_warning(&self, at: &Spanned<String>, path: &Path, out: &mut Vec<Diagnostic>) {
        if self.mode != LoadMode::Serve || !path.is_file() {
            return;
        }
        let Ok(chain) = crate::tls::read_certs(path) else { return };
        let Some(leaf) = chain.first() else { return };
        let shown = file_shown(path);
        let warning = match crate::tls::not_after(leaf) {
            Some(not_after) => crate::tls::expiry_warning(not_after, crate::util::unix_now())
                .map(|w| format!("certificate {shown} {w}")),
            // rustls serves it without reading its dates: it could expire unannounced.
            None => Some(format!(
                "certificate {shown}: its expiry date (notAfter) cannot be read, so it is served with no expiry warning and no `portcullis_tls_certificate_expiry_timestamp_seconds` series; check it (`openssl x509 -noout -enddate`) and watch its expiry some other way, or replace it"
            )),
        };
        if let Some(w) = warning {
            out.push(self.source.error(Some(at.span()), w));
        }
    }

    fn server(&mut self, s: raw::Server) -> ServerSettings {
        // `max_connections_per_client` is compared with a valid `max_connections` only:
        // one mistake, one diagnostic.
        let max_valid =
            s.max_connections.as_ref().is_none_or(|m| (1..=MAX_CONNECTIONS).contains(m.get_ref()));
        let max_connections = match s.max_connections {
            Some(m) if *m.get_ref() < 1 => {
                self.err(m.span(), "`max_connections` must be at least 1");
                1
            }
            Some(m) if *m.get_ref() > MAX_CONNECTIONS => {
                self.err(m.span(), format!("`max_connections` must be at most {MAX_CONNECTIONS}"));
                MAX_CONNECTIONS as usize
            }
            Some(m) => usize::try_from(*m.get_ref()).unwrap_or(usize::MAX),
            None => 10_000,
        };
        let max_connections_per_client = match &s.max_connections_per_client {
            Some(m) if *m.get_ref() < 0 => {
                self.err(m.span(), "`max_connections_per_client` must be 0 (no limit) or more");
                0
            }
            Some(m)
                if max_valid
                    && usize::try_from(*m.get_ref()).is_ok_and(|n| n > max_connections) =>
            {
                self.err(
                    m.span(),
                    format!(
                        "`max_connections_per_client` ({}) must not exceed `max_connections` ({max_connections}): \
                         0 turns the limit off",
                        m.get_ref()
                    ),
                );
                0
            }
            Some(m) => usize::try_from(*m.get_ref()).unwrap_or(0),
            // Off: behind a NAT gateway, a TCP balancer or a Kubernetes Service that
            // rewrites addresses, many clients share one (docs/configuration.md).
            None => 0,
        };
        let token_cache_entries = match s.token_cache_entries {
            Some(m) if *m.get_ref() < 0 => {
                self.err(m.span(), "`token_cache_entries` must be 0 (no cache) or more");
                0
            }
            Some(m) => usize::try_from(*m.get_ref()).unwrap_or(usize::MAX),
            None => crate::identity::DEFAULT_TOKEN_CACHE_ENTRIES,
        };
        ServerSettings {
            shutdown_grace: s
                .shutdown_grace
                .as_ref()
                .and_then(|d| self.duration(d))
                .unwrap_or(Duration::from_secs(30)),
            watch: s.watch.unwrap_or(true),
            policy_dir: self.path(s.policy_dir.as_ref().map_or("policies", |p| p.get_ref())),
            max_connections,
            max_connections_per_client,
            idle_timeout: self.timeout_of_a_second_or_more(&s.idle_timeout, "idle_timeout", 75),
            token_cache_entries,
            header_timeout: self.timeout_of_a_second_or_more(
                &s.header_timeout,
                "header_timeout",
                // hyper also runs it between requests on a keep-alive connection: as
                // long as `idle_timeout`, above load balancers' 60 s idle timeout.
                75,
            ),
            // nginx's `send_timeout`.
            send_timeout: self.timeout_of_a_second_or_more(&s.send_timeout, "send_timeout", 60),
            max_header_size: self.max_header_size(&s.max_header_size),
        }
    }

    /// `server.max_header_size`: 8 KiB (hyper's smallest read buffer) to 1 MiB.
    fn max_header_size(&mut self, value: &Option<Spanned<toml::Value>>) -> usize {
        let Some(v) = value else { return DEFAULT_MAX_HEADER_SIZE };
        match parse_size(v.get_ref()) {
            Some(n) if (MIN_HEADER_SIZE..=MAX_HEADER_SIZE).contains(&n) => n as usize,
            Some(_) => {
                self.err(v.span(), "`max_header_size` must be between 8KiB and 1MiB");
                DEFAULT_MAX_HEADER_SIZE
            }
            None => {
                self.err(v.span(), "`max_header_size` is bytes (integer) or a size like \"64KiB\"");
                DEFAULT_MAX_HEADER_SIZE
            }
        }
    }

    /// A duration setting that must be at least a second; `default_s` when absent.
    fn timeout_of_a_second_or_more(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        default_s: u64,
    ) -> Duration {
        match value.as_ref().map(|d| (d, self.duration(d))) {
            Some((d, Some(t))) if t < Duration::from_secs(1) => {
                self.err(d.span(), format!("`{key}` must be at least 1s"));
                t
            }
            Some((_, Some(t))) => t,
            _ => Duration::from_secs(default_s),
        }
    }

    /// A duration setting that must be longer than zero (a zero timeout fails every
    /// request it bounds); `default` when absent.
    pub(crate) fn positive_duration(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        match value.as_ref().map(|d| (d, self.duration(d))) {
            Some((d, Some(t))) if t.is_zero() => {
                self.err(d.span(), format!("`{key}` must be longer than zero"));
                default
            }
            Some((_, Some(t))) => t,
            _ => default,
        }
    }

    fn assertion(&mut self, a: raw::Assertion) -> AssertionSettings {
        let settings = AssertionSettings {
            issuer: a.issuer.map_or_else(|| "portcullis".to_string(), |s| s.into_inner()),
            // JWT times are whole seconds: a shorter assertion expires as it is signed.
            ttl: self.timeout_of_a_second_or_more(&a.ttl, "ttl", DEFAULT_ASSERTION_TTL.as_secs()),
            key_file: a.key.as_ref().map(|k| self.existing_file(k)),
        };
        // A key file `serve` cannot sign with fails `check` too, where it is named (its
        // errors are the signer's own words, never a line of the file).
        if let (Some(k), Some(path)) = (&a.key, &settings.key_file) {
            if self.mode == LoadMode::Serve && path.is_file() {
                if let Err(e) = crate::http::assertion::AssertionSigner::new(&settings) {
                    self.err(k.span(), e.to_string());
                }
            }
        }
        settings
    }

    fn issuer(&mut self, name: &Spanned<String>, r: raw::Issuer) -> Option<IssuerSettings> {
        let start = self.diags.len();
        // The name goes into headers, the assertion, metric labels and the audit log.
        if !is_name(name.get_ref()) {
            self.err(name.span(), "issuer names use letters, digits, `-`, `_` and `.`");
        }
        let preset = match &r.preset {
            None => Preset::Oidc,
            Some(p) => Preset::parse(p.get_ref()).unwrap_or_else(|| {
                self.err(
                    p.span(),
                    format!(
                        "unknown preset `{}`, expected bitbucket-pipelines, github-actions, gitlab-ci or oidc",
                        p.get_ref()
                    ),
                );
                Preset::Oidc
            }),
        };
        let issuer = r.issuer.get_ref().clone();
        let insecure_http = r.insecure_http.unwrap_or(false);
        self.check_url(&r.issuer, insecure_http);
        // A CI provider's issuer read with another preset (`oidc` when the key is
        // left out) has no CI claims required, no CI context and no V22 pin lints:
        // any repository on the platform that asks for the audience gets in.
        // (An unknown preset has its error already.)
        let preset_known = r.preset.as_ref().is_none_or(|p| Preset::parse(p.get_ref()).is_some());
        if let Some(needs) =
            ci_issuer_preset(&issuer).filter(|needs| *needs != preset && preset_known)
        {
            let at = r.preset.as_ref().map_or(r.issuer.span(), Spanned::span);
            self.err(
                at,
                format!(
                    "`{issuer}` issues {} tokens, which anyone on the platform can have minted with this audience: it needs `preset = \"{}\"` (its CI claims are then required and every allow must pin a repository or owner id, V22)",
                    if needs == Preset::GithubActions { "GitHub Actions" } else { "Bitbucket Pipelines" },
                    needs.name()
                ),
            );
        }
        if issuer.ends_with('/') && preset != Preset::Oidc {
            self.err(r.issuer.span(), "issuer must not end with `/`: `iss` is compared exactly");
        }
        let discovery_url = match &r.discovery_url {
            Some(u) => {
                self.check_url(u, insecure_http);
                u.get_ref().clone()
            }
            None => format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/')),
        };
        if r.audiences.get_ref().is_empty() {
            self.err(r.audiences.span(), "`audiences` must name at least one audience (V14)");
        }
        for a in r.audiences.get_ref() {
            if a.get_ref().trim().is_empty() {
                self.err(a.span(), "empty audience");
            }
            if preset == Preset::BitbucketPipelines
                && a.get_ref().starts_with("ari:cloud:bitbucket::")
            {
                self.err(
                    a.span(),
                    "the Bitbucket workspace ARI is shared by every OIDC consumer in the workspace; \
                     configure a proxy-specific audience (step `oidc: audiences:`) instead (V23)",
                );
            }
        }
        let mut algorithms = Vec::new();
        match &r.algorithms {
            None => algorithms.push(Algorithm::RS256),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.err(list.span(), "`algorithms` must not be empty");
                }
                for a in list.get_ref() {
                    match Algorithm::parse(a.get_ref()) {
                        Some(alg) => algorithms.push(alg),
                        None if a.get_ref().eq_ignore_ascii_case("none")
                            || a.get_ref().to_ascii_uppercase().starts_with("HS") =>
                        {
                            self.err(
                                a.span(),
                                format!("algorithm `{}` is never allowed: `none` and HMAC algorithms let anyone forge tokens (V4)", a.get_ref()),
                            )
                        }
                        None => self.err(
                            a.span(),
                            format!("unknown algorithm `{}` (names are case-sensitive: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)", a.get_ref()),
                        ),
                    }
                }
            }
        }
        let leeway = r.leeway.as_ref().and_then(|d| self.duration(d)).unwrap_or(DEFAULT_LEEWAY);
        if leeway > MAX_LEEWAY {
            if let Some(l) = &r.leeway {
                self.err(l.span(), "`leeway` is capped at 300s (V19)");
            }
        }
        let refresh_cooldown = r
            .refresh_cooldown
            .as_ref()
            .and_then(|d| self.duration(d))
            .unwrap_or(Duration::from_secs(30));
        if refresh_cooldown < MIN_REFRESH_COOLDOWN {
            if let Some(c) = &r.refresh_cooldown {
                self.err(
                    c.span(),
                    "`refresh_cooldown` must be at least 1s: every token with an unknown `kid`, \
                     signed or not, may cost the issuer a JWKS fetch once per cooldown",
                );
            }
        }
        let kind = match &r.kind {
            None => preset.default_kind(),
            Some(k) => match k.get_ref().as_str() {
                "human" => PrincipalKind::Human,
                "pipeline" => PrincipalKind::Pipeline,
                "service" => PrincipalKind::Service,
                other => {
                    self.err(
                        k.span(),
                        format!("unknown kind `{other}`, expected human, pipeline or service"),
                    );
                    preset.default_kind()
                }
            },
        };
        let token_type = match &r.token_type {
            None => TokenType::Id,
            Some(t) => match t.get_ref().as_str() {
                "id" => TokenType::Id,
                "access" => TokenType::Access,
                other => {
                    self.err(
                        t.span(),
                        format!("unknown token_type `{other}`, expected id or access"),
                    );
                    TokenType::Id
                }
            },
        };
        let groups_claim = match &r.groups_claim {
            None => ClaimPath::default(),
            Some(c) => ClaimPath::parse(c.get_ref()).unwrap_or_else(|e| {
                self.err(
                    c.span(),
                    format!(
                        "`groups_claim` {e}: write a top-level claim's name as it is \
                         (`groups`, `https://example.com/groups`), or a JSON Pointer to a \
                         nested one (`/realm_access/roles`)"
                    ),
                );
                ClaimPath::default()
            }),
        };
        let settings = IssuerSettings {
            id: IssuerId(Arc::from(name.get_ref().as_str())),
            preset,
            issuer,
            discovery_url,
            audiences: r.audiences.into_inner().into_iter().map(Spanned::into_inner).collect(),
            algorithms,
            leeway: leeway.min(MAX_LEEWAY),
            max_token_age: r.max_token_age.as_ref().and_then(|d| self.duration(d)),
            kind,
            token_type,
            client_id: r.client_id.map(Spanned::into_inner),
            // Set from the issuer's `login`, compiled beside it.
            acr_values: Vec::new(),
            hosted_domain: r.hosted_domain.map(Spanned::into_inner),
            groups_claim,
            ca_file: r.ca.as_ref().map(|c| self.existing_ca(c)),
            insecure_http,
            stale_window: r
                .stale_window
                .as_ref()
                .and_then(|d| self.duration(d))
                .unwrap_or(DEFAULT_STALE_WINDOW),
            refresh_cooldown,
        };
        (self.diags.len() == start).then_some(settings)
    }

    /// When serving, a secret file that is there, and a variable, must be usable: `check`
    /// passed a session-keys file of anything and an empty client-secret file, and a
    /// `*_env` variable unset, empty or holding no keys, which `serve` refused at start.
    /// (A file not there yet is left to `serve`, as before; a [`LoadMode::PolicyOnly`]
    /// load reads neither.) Errors name the source, never the value.
    fn readable_secret(
        &mut self,
        source: Option<&SecretSource>,
        at: Option<std::ops::Range<usize>>,
        usable: impl Fn(&str) -> Result<(), String>,
    ) {
        let (Some(source), Some(at)) = (source, at) else { return };
        if self.mode != LoadMode::Serve {
            return;
        }
        if let SecretSource::File(path) = source {
            if !path.is_file() {
                return;
            }
        }
        if let Err(e) = source.read().and_then(|v| usable(&v)) {
            self.err(at, e);
        }
    }

    fn secret(
        &mut self,
        what: &str,
        span: std::ops::Range<usize>,
        env: Option<&Spanned<String>>,
        file: Option<&Spanned<String>>,
    ) -> Option<SecretSource> {
        match (env, file) {
            (Some(e), None) => {
                let name = e.get_ref();
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    // Not quoted: a value that is no variable name may be the secret.
                    self.err(
                        e.span(),
                        "not an environment variable name (letters, digits and `_`): `*_env` \
                         takes the name of a variable holding the secret, never the secret",
                    );
                }
                Some(SecretSource::Env(name.clone()))
            }
            (None, Some(f)) => {
                let p = self.path(f.get_ref());
                self.named_files.push(p.clone());
                Some(SecretSource::File(p))
            }
            (Some(e), Some(_)) => {
                self.err(e.span(), format!("set one of `{what}_env` and `{what}_file`, not both"));
                None
            }
            (None, None) => {
                self.err(span, format!("missing `{what}_env` or `{what}_file`"));
                None
            }
        }
    }

    fn login(
        &mut self,
        name: &Spanned<String>,
        preset: Preset,
        login: Spanned<raw::Login>,
    ) -> Option<LoginSettings> {
        let start = self.diags.len();
        let span = login.span();
        let l = login.into_inner();
        if preset != Preset::Oidc {
            self.err(
                span.clone(),
                "`login` is for OpenID providers people sign in with, not CI presets",
            );
        }
        if l.client_id.get_ref().trim().is_empty() {
            self.err(l.client_id.span(), "empty `client_id`");
        }
        if let Some(inline) = &l.client_secret {
            self.err(
                inline.span(),
                "client secrets never go into the config file (it lives in git): use `client_secret_env` or `client_secret_file`",
            );
        }
        let client_secret = self.secret(
            "client_secret",
            span.clone(),
            l.client_secret_env.as_ref(),
            l.client_secret_file.as_ref(),
        );
        let at = l.client_secret_env.as_ref().or(l.client_secret_file.as_ref()).map(|s| s.span());
        self.readable_secret(client_secret.as_ref(), at, |_| Ok(()));
        let scopes: Vec<String> = match &l.scopes {
            None => vec!["openid".into(), "email".into(), "profile".into()],
            Some(list) => {
                let v: Vec<String> = list.get_ref().iter().map(|s| s.get_ref().clone()).collect();
                if !v.iter().any(|s| s == "openid") {
                    self.err(list.span(), "`scopes` must include \"openid\"");
                }
                for s in list.get_ref() {
                    if s.get_ref().is_empty()
                        || s.get_ref().chars().any(|c| c.is_whitespace() || c == '"' || c == '\\')
                    {
                        self.err(s.span(), "a scope is one token without spaces or quotes");
                    }
                }
                v
            }
        };
        let redirect_path = match &l.redirect_path {
            None => DEFAULT_REDIRECT_PATH.to_string(),
            Some(p) => {
                let v = p.get_ref();
                if !v.starts_with("/.portcullis/")
                    || v.contains("..")
                    || v.contains(['?', '#', '%', '\\'])
                    || path::check_pattern(v, path::Syntax::Literal).is_err()
                {
                    self.err(p.span(), "`redirect_path` is a literal path under `/.portcullis/` (e.g. \"/.portcullis/callback\")");
                }
                v.clone()
            }
        };
        let mut extra_params = Vec::new();
        if let Some(extra) = &l.extra_params {
            for (k, v) in extra.get_ref() {
                const RESERVED: &[&str] = &[
                    "response_type",
                    "client_id",
                    "redirect_uri",
                    "scope",
                    "state",
                    "nonce",
                    "code_challenge",
                    "code_challenge_method",
                ];
                if RESERVED.contains(&k.as_str()) {
                    self.err(
                        extra.span(),
                        format!("`{k}` is set by the proxy and cannot be overridden"),
                    );
                }
                if k == "max_age" && v.get_ref().parse::<u64>().is_err() {
                    self.err(
                        v.span(),
                        "`max_age` is a number of seconds (\"300\"): the proxy checks the ID token's `auth_time` against it",
                    );
                }
                if k == "acr_values" && v.get_ref().split(' ').all(str::is_empty) {
                    self.err(
                        v.span(),
                        "`acr_values` lists the authentication context classes to accept, separated by spaces (\"phr phrh\"): the ID token's `acr` must be one of them",
                    );
                }
                // The callback reads the code from its query string: `form_post` or
                // `fragment` would leave every sign-in unable to complete.
                if k == "response_mode" && v.get_ref() != "query" {
                    self.err(
                        v.span(),
                        "`response_mode` can only be \"query\": the callback reads the authorization response from its query string",
                    );
                }
                extra_params.push((k.clone(), v.get_ref().clone()));
            }
        }
        if let Some(p) = &l.post_logout_redirect {
            let ok = p.get_ref().starts_with("https://")
                || (p.get_ref().starts_with('/') && !p.get_ref().starts_with("//"));
            if !ok {
                self.err(
                    p.span(),
                    "`post_logout_redirect` is an https URL or a path starting with `/`",
                );
            }
        }
        let settings = LoginSettings {
            issuer: IssuerId(Arc::from(name.get_ref().as_str())),
            client_id: l.client_id.get_ref().clone(),
            client_secret: client_secret?,
            scopes,
            redirect_path,
            extra_params,
            post_logout_redirect: l.post_logout_redirect.map(Spanned::into_inner),
        };
        (self.diags.len() == start).then_some(settings)
    }

    fn session(
        &mut self,
        span: std::ops::Range<usize>,
        s: raw::Session,
    ) -> Option<SessionSettings> {
        let start = self.diags.len();
        let cookie_name = match &s.cookie_name {
            None => "_portcullis".to_string(),
            Some(n) => {
                let v = n.get_ref();
                if !v.starts_with("_portcullis")
                    || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    self.err(
                        n.span(),
                        "`cookie_name` starts with `_portcullis` (so it is never forwarded upstream) and uses letters, digits, `_`, `-`; the proxy adds the `__Host-` / `__Secure-` prefix itself",
                    );
                }
                if v.starts_with("_portcullis_login") {
                    self.err(
                        n.span(),
                        "`_portcullis_login*` is the sign-in cookie; pick another name",
                    );
                }
                v.clone()
            }
        };
        let cookie_domain = s.cookie_domain.as_ref().map(|d| {
            let v = d.get_ref().trim_start_matches('.').to_ascii_lowercase();
            if v.is_empty()
                || !v.contains('.') && v != "localhost"
                || v.contains(['/', ':', ' ', ';', '*'])
            {
                self.err(
                    d.span(),
                    "`cookie_domain` is a DNS name like `example.com` (covers its subdomains)",
                );
            }
            v
        });
        let keys = self.secret("keys", span, s.keys_env.as_ref(), s.keys_file.as_ref());
        let at = s.keys_env.as_ref().or(s.keys_file.as_ref()).map(|k| k.span());
        self.readable_secret(keys.as_ref(), at, |k| {
            crate::session::seal::Sealer::from_text(k).map(|_| ())
        });
        let dur = |c: &mut Self, d: &Option<Spanned<String>>, default: Duration| {
            d.as_ref().and_then(|d| c.duration(d)).unwrap_or(default)
        };
        let absolute_lifetime = dur(self, &s.absolute_lifetime, DEFAULT_ABSOLUTE_LIFETIME);
        let idle_lifetime = dur(self, &s.idle_lifetime, DEFAULT_IDLE_LIFETIME);
        let refresh_before = dur(self, &s.refresh_before, Duration::from_secs(60));
        if idle_lifetime > absolute_lifetime {
            if let Some(i) = &s.idle_lifetime {
                self.err(i.span(), "`idle_lifetime` is longer than `absolute_lifetime`");
            }
        }
        if absolute_lifetime.is_zero() || idle_lifetime.is_zero() {
            if let Some(a) = s.absolute_lifetime.as_ref().or(s.idle_lifetime.as_ref()) {
                self.err(a.span(), "session lifetimes must be longer than zero");
            }
        }
        let settings = SessionSettings {
            cookie_name,
            cookie_domain,
            keys: keys?,
            absolute_lifetime,
            idle_lifetime,
            refresh_before,
        };
        (self.diags.len() == start).then_some(settings)
    }

    /// HTTPS only; `http://` only when the issuer opts in and the host is loopback.
    /// An issuer or discovery URL. The value is never quoted back (it may hold a
    /// credential by mistake); the span points at it.
    fn check_url(&mut self, u: &Spanned<String>, insecure_http: bool) {
        let Ok(uri) = u.get_ref().parse::<http::Uri>() else {
            self.err(u.span(), "not a URL");
            return;
        };
        if u.get_ref().contains('@') {
            self.err(
                u.span(),
                "issuer and discovery URLs must not carry credentials (user:password@)",
            );
        }
        if uri.query().is_some() || u.get_ref().contains('#') {
            self.err(u.span(), "issuer URLs must not have a query or fragment");
        }
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if insecure_http && is_loopback_host(uri.host().unwrap_or("")) => {}
            Some("http") => self.err(
                u.span(),
                "issuer and discovery URLs must be https (`insecure_http = true` allows http on loopback only)",
            ),
            _ => self.err(u.span(), "not an https URL"),
        }
    }

    fn route(
        &mut self,
        r: raw::Route,
        policy_dir: &Path,
        catalog: &Catalog,
        policies: &mut BTreeMap<PathBuf, Option<Arc<Policy>>>,
        warnings: &mut Vec<Diagnostic>,
    ) -> Option<RouteSettings> {
        let start = self.diags.len();
        let name = r.name.get_ref().clone();
        let name_span = r.name.span();
        if !is_name(&name) {
            self.err(r.name.span(), "route names use letters, digits, `-`, `_` and `.`");
        }
        let host = match &r.matcher.host {
            None => HostMatch::Any,
            Some(h) => {
                let v = h.get_ref().to_ascii_lowercase();
                // Spelt as a request's host is read (lower case, no port, no trailing
                // dot, `proxy::authority`): a host no request can have would leave the
                // route dead and send its requests to a broader route and its policy.
                let dead = |name: &str| -> Option<String> {
                    if let Some(trimmed) = name.strip_suffix('.') {
                        return Some(format!(
                            "write `{trimmed}`: a request's trailing dot is removed before routing, so this host never matches"
                        ));
                    }
                    (!route_host_name(name)).then(|| {
                        "`host` is a DNS name (dot-separated labels of letters, digits, `-` and `_`; an IDN in its `xn--` form) without port, `*.suffix`, or `*`: no request's host is spelt otherwise, so this route would never match".to_string()
                    })
                };
                if v == "*" {
                    HostMatch::Any
                } else if let Some(s) = v.strip_prefix("*.") {
                    if s.is_empty() || s.contains('*') {
                        self.err(h.span(), "a wildcard host is `*.example.com`");
                    } else if let Some(why) = dead(s) {
                        self.err(h.span(), why);
                    }
                    HostMatch::Suffix(format!(".{s}"))
                } else {
                    if let Some(why) = dead(&v) {
                        self.err(h.span(), why);
                    }
                    HostMatch::Exact(v)
                }
            }
        };
        let path_prefix = match &r.matcher.path_prefix {
            None => "/".to_string(),
            Some(p) => {
                let v = p.get_ref();
                if !v.starts_with('/') || v.contains('*') || v.to_ascii_uppercase().contains("%2A")
                {
                    self.err(
                        p.span(),
                        "`path_prefix` is a literal path starting with `/` (no `*`)",
                    );
                } else if let Err(e) = path::check_pattern(v, path::Syntax::Literal) {
                    // Matched against the canonical path: spelt otherwise (`%40`, `%3a`), it
                    // would never match, and requests would go to a broader route.
                    self.err(p.span(), format!("`path_prefix`: {}", e.message(v)));
                }
                v.clone()
            }
        };
        let methods = r.matcher.methods.as_ref().map(|ms| {
            // No method at all: a route no request reaches, whose requests go to a
            // broader route and its policy instead.
            if ms.get_ref().is_empty() {
                self.err(
                    ms.span(),
                    "`match.methods` must name at least one method (or be left out)",
                );
            }
            ms.get_ref()
                .iter()
                .filter_map(|m| match Method::from_bytes(m.get_ref().as_bytes()) {
                    Ok(method) if m.get_ref().chars().all(|c| c.is_ascii_uppercase()) => {
                        Some(method)
                    }
                    _ => {
                        self.err(
                            m.span(),
                            format!("`{}` is not an HTTP method (upper case)", m.get_ref()),
                        );
                        None
                    }
                })
                .collect::<Vec<_>>()
        });
        let upstream = self.upstream(&r.upstream, r.upstream_ca.as_ref());
        let policy = self.policy(&r.policy, policy_dir, catalog, policies, warnings);
        let shadow_policy = r
            .shadow_policy
            .as_ref()
            .map(|s| self.policy(s, policy_dir, catalog, policies, warnings));
        let max_request_body = match &r.max_request_body {
            None => DEFAULT_BODY_LIMIT,
            Some(v) => parse_size(v.get_ref()).unwrap_or_else(|| {
                self.err(
                    v.span(),
                    "`max_request_body` is bytes (integer) or a size like \"10MiB\"",
                );
                DEFAULT_BODY_LIMIT
            }),
        };
        let mut strip_headers = Vec::new();
        for h in r.strip_headers.unwrap_or_default() {
            match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                Ok(n) => strip_headers.push(n),
                Err(_) => self.err(h.span(), format!("`{}` is not a header name", h.get_ref())),
            }
        }
        // Its names join `strip_headers` with every other route's, once all are compiled.
        let claim_headers = self.claim_headers(r.claim_headers.as_ref());
        // `email` as the token has it, verified or not: an upstream that takes the header
        // for the person (as `X-Portcullis-Email`, which is sent verified only) can be
        // handed any address a user may write into their profile (V21).
        for (header, claim) in r.claim_headers.iter().flat_map(|m| m.get_ref().iter()) {
            if claim.get_ref() == "email" {
                warnings.push(self.source.error(
                    Some(claim.span()),
                    format!(
                        "route `{name}`: `claim_headers` sends `email` as `{}` whether or not the address is verified (`email_verified` false or absent, as Entra sends it); the verified address reaches the upstream as `X-Portcullis-Email`",
                        header.get_ref()
                    ),
                ));
            }
        }
        // A deny that covers `OPTIONS` does not apply to a CORS preflight: the route
        // forwards it without consulting the policy.
        if let (Some(true), Some(p)) = (r.cors_preflight, &policy) {
            for rule in p.rules().iter().filter(|x| {
                x.effect() == crate::policy::Effect::Deny && x.may_match_method(&Method::OPTIONS)
            }) {
                warnings.push(self.source.error(
                    Some(name_span.clone()),
                    format!(
                        "route `{name}` has `cors_preflight = true`, and deny rule `{}` ({}:{}) covers OPTIONS: a CORS preflight is forwarded without consulting the policy: this deny does not apply to it (OPTIONS with Origin and Access-Control-Request-Method, without a credential)",
                        rule.id(),
                        p.file().display(),
                        rule.line()
                    ),
                ));
            }
        }
        // Nothing to strip: the setting reads as if it did something.
        if let Some(strip) = r.strip_prefix.as_ref().filter(|s| *s.get_ref()) {
            if path_prefix == "/" {
                warnings.push(self.source.error(
                    Some(strip.span()),
                    format!(
                        "route `{name}` has `strip_prefix = true` and `path_prefix` `/`: there is no prefix to strip, every path is forwarded as it is; set a `match.path_prefix`, or remove `strip_prefix`"
                    ),
                ));
            } else if let Some(p) = &policy {
                // A deny written against the application's paths (as nginx's
                // `location /billing/ { proxy_pass http://b/; }` let it be) never applies:
                // policies see the client's path, prefix and all.
                for rule in p.rules().iter().filter(|x| {
                    x.effect() == crate::policy::Effect::Deny && !x.may_match_under(&path_prefix)
                }) {
                    warnings.push(self.source.error(
                        Some(strip.span()),
                        format!(
                            "route `{name}` strips `{}` before forwarding, but policies match the client's path: deny rule `{}` ({}:{}) has no `paths` under `{}`, so it never applies on this route; write its paths as clients send them (`{}/…`)",
                            path_prefix.trim_end_matches('/'),
                            rule.id(),
                            p.file().display(),
                            rule.line(),
                            path_prefix,
                            path_prefix.trim_end_matches('/'),
                        ),
                    ));
                }
            }
        }
        // Only a prefix that was stripped is put back.
        let strips = r.strip_prefix.as_ref().is_some_and(|s| *s.get_ref()) && path_prefix != "/";
        if let Some(restore) = r.restore_prefix.as_ref().filter(|_| !strips) {
            warnings.push(self.source.error(
                Some(restore.span()),
                format!(
                    "route `{name}` sets `restore_prefix` but strips no prefix (`strip_prefix = true` with a `match.path_prefix` other than `/`): it has no effect"
                ),
            ));
        }
        // A public rule on every path: what it opens depends on this route's match.
        let host_shown = match &host {
            HostMatch::Any => "any host".to_string(),
            HostMatch::Exact(h) => format!("host {h}"),
            HostMatch::Suffix(s) => format!("hosts *{s}"),
        };
        let live = policy.as_ref().map(|p| (p, false));
        let shadow = shadow_policy.as_ref().and_then(Option::as_ref).map(|p| (p, true));
        for (p, shadow) in live.into_iter().chain(shadow) {
            let scope = crate::policy::RouteScope {
                name: &name,
                host: &host_shown,
                path_prefix: &path_prefix,
                shadow,
            };
            warnings.extend(
                crate::policy::public_everywhere(p, scope).into_iter().map(|l| l.into_labelled()),
            );
        }
        let route = RouteSettings {
            name: Arc::from(name.as_str()),
            host,
            path_prefix,
            methods,
            upstream: upstream?,
            policy: policy?,
            shadow_policy: match shadow_policy {
                Some(Some(p)) => Some(p),
                Some(None) => return None,
                None => None,
            },
            forward_token: r.forward_token.unwrap_or(false),
            identity_assertion: r.identity_assertion.unwrap_or(true),
            timeout: self.positive_duration(&r.timeout, "timeout", Duration::from_secs(30)),
            read_timeout: self.positive_duration(
                &r.read_timeout,
                "read_timeout",
                Duration::from_secs(60),
            ),
            connect_timeout: self.positive_duration(
                &r.connect_timeout,
                "connect_timeout",
                Duration::from_secs(5),
            ),
            max_request_body,
            preserve_host: r.preserve_host.unwrap_or(false),
            strip_headers,
            claim_headers,
            single_use_tokens: r.single_use_tokens.unwrap_or(false),
            cors_preflight: r.cors_preflight.unwrap_or(false),
            strip_prefix: r.strip_prefix.as_ref().is_some_and(|s| *s.get_ref()),
            restore_prefix: r.restore_prefix.as_ref().is_none_or(|s| *s.get_ref()),
            issuers: r.issuers.as_ref().map(|list| {
                if list.get_ref().is_empty() {
                    self.err(
                        list.span(),
                        "`issuers` must name at least one issuer (or be left out)",
                    );
                }
                list.get_ref()
                    .iter()
                    .filter_map(|i| {
                        if catalog.settings(i.get_ref()).is_none() {
                            self.err(
                                i.span(),
                                format!("issuer `{}` is not declared in [issuers]", i.get_ref()),
                            );
                            return None;
                        }
                        Some(IssuerId(Arc::from(i.get_ref().as_str())))
                    })
                    .collect()
            }),
        };
        (self.diags.len() == start).then_some(route)
    }

    /// A route's `claim_headers`: each name a header the proxy may set
    /// ([`crate::http::headers::claim_header_refusal`]), none twice in any spelling of
    /// case and `-`/`_` (a CGI/WSGI server merges `X-Team` and `x_team`), each claim
    /// named.
    fn claim_headers(
        &mut self,
        raw: Option<&Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    ) -> Box<[ClaimHeader]> {
        let Some(raw) = raw else { return Box::default() };
        // In file order, so a duplicate is reported where it is written the second time.
        let mut entries: Vec<(&Spanned<String>, &Spanned<String>)> = raw.get_ref().iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let mut out: Vec<ClaimHeader> = Vec::with_capacity(entries.len());
        for (k, claim) in entries {
            let header = match HeaderName::from_bytes(k.get_ref().as_bytes()) {
                Ok(h) => h,
                Err(_) => {
                    self.err(
                        k.span(),
                        format!(
                            "`claim_headers`: `{}` is not a header name (a token: letters, digits and !#$%&'*+-.^_`|~)",
                            k.get_ref().escape_debug()
                        ),
                    );
                    continue;
                }
            };
            if let Some(why) = crate::http::headers::claim_header_refusal(&header) {
                self.err(
                    k.span(),
                    format!("`claim_headers`: `{}` cannot carry a claim: {why}", k.get_ref()),
                );
                continue;
            }
            if let Some(first) = out.iter().find(|c| {
                crate::http::headers::cgi_eq(
                    c.header.as_str().as_bytes(),
                    header.as_str().as_bytes(),
                )
            }) {
                self.err(
                    k.span(),
                    format!(
                        "`claim_headers`: `{}` is the same header as `{}` (names ignore case, and CGI/WSGI servers read `-` and `_` alike)",
                        k.get_ref(),
                        first.header
                    ),
                );
                continue;
            }
            if claim.get_ref().is_empty() {
                self.err(claim.span(), "`claim_headers`: the claim name is empty");
                continue;
            }
            out.push(ClaimHeader { header, claim: Arc::from(claim.get_ref().as_str()) });
        }
        out.sort_by(|a, b| a.header.as_str().cmp(b.header.as_str()));
        out.into_boxed_slice()
    }

    fn upstream(&mut self, u: &Spanned<String>, ca: Option<&Spanned<String>>) -> Option<Upstream> {
        // The value is never quoted back: a mistyped one may hold a credential, and the
        // span already points at it.
        let bad = |c: &mut Self, msg: &str| {
            c.err(u.span(), format!("upstream: {msg}"));
            None
        };
        let Ok(uri) = u.get_ref().parse::<http::Uri>() else {
            return bad(self, "not a URL");
        };
        let (scheme, h2c) = match uri.scheme_str() {
            Some("http") => (http::uri::Scheme::HTTP, false),
            Some("https") => (http::uri::Scheme::HTTPS, false),
            Some("h2c") => (http::uri::Scheme::HTTP, true),
            _ => return bad(self, "scheme must be http, https or h2c"),
        };
        let Some(authority) = uri.authority().cloned() else {
            return bad(self, "missing host");
        };
        if authority.port_u16() == Some(0) {
            return bad(self, "port 0 is no port to connect to");
        }
        if uri.query().is_some() {
            return bad(self, "must not have a query");
        }
        // Any `@`, not only one in the parsed authority: `http://u:pa/ss@host` parses as
        // host `u` and path `/ss@host`, yet holds a credential all the same. It would be
        // logged with every request.
        if u.get_ref().contains(['@', '#']) {
            return bad(self, "must not carry credentials (user:password@) or a fragment");
        }
        let ca = ca.map(|c| self.existing_ca(c));
        if ca.is_some() && scheme != http::uri::Scheme::HTTPS {
            self.err(u.span(), "`upstream_ca` only applies to https upstreams");
        }
        Some(Upstream {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_string(),
            h2c,
            ca,
            display: Arc::from(u.get_ref().as_str()),
        })
    }

    /// `policy = "deploy-api"` → `<policy_dir>/deploy-api.toml`; a value with `/` or
    /// ending in `.toml` is a path relative to the configuration file.
    fn policy(
        &mut self,
        p: &Spanned<String>,
        policy_dir: &Path,
        catalog: &Catalog,
        policies: &mut BTreeMap<PathBuf, Option<Arc<Policy>>>,
        warnings: &mut Vec<Diagnostic>,
    ) -> Option<Arc<Policy>> {
        let v = p.get_ref();
        let path = if v.contains('/') || v.ends_with(".toml") {
            self.path(v)
        } else {
            policy_dir.join(format!("{v}.toml"))
        };
        if let Some(done) = policies.get(&path) {
            return done.clone();
        }
        // Watched whether or not it compiles (or exists): a reload refused for it is
        // retried once it is fixed or written.
        self.named_files.push(path.clone());
        if !path.is_file() {
            self.err(p.span(), format!("policy file `{}` does not exist", path.display()));
            policies.insert(path, None);
            return None;
        }
        let loaded = match Policy::load(&path, catalog) {
            Ok(policy) => {
                warnings.extend(policy.warnings().iter().cloned());
                Some(Arc::new(policy))
            }
            Err(d) => {
                self.diags.extend(d);
                None
            }
        };
        policies.insert(path, loaded.clone());
        loaded
    }
}

/// The preset an issuer URL needs when it is a CI provider's own, known by its URL:
/// GitHub Actions' (`https://token.actions.githubusercontent.com`, with or without an
/// enterprise's slug after it, or a GitHub Enterprise Server's `…/_services/token`)
/// and Bitbucket Pipelines' (`https://api.bitbucket.org/2.0/workspaces/W/pipelines-config/identity/oidc`).
/// Not gitlab.com: it is also an OpenID provider people sign in with, and a
/// self-managed GitLab's URL is the instance's own.
fn ci_issuer_preset(issuer: &str) -> Option<Preset> {
    let uri = issuer.parse::<http::Uri>().ok()?;
    let host = uri.host()?.trim_end_matches('.').to_ascii_lowercase();
    let path = uri.path().trim_end_matches('/');
    if host == "token.actions.githubusercontent.com" || path.ends_with("/_services/token") {
        Some(Preset::GithubActions)
    } else if host == "api.bitbucket.org" && path.ends_with("/pipelines-config/identity/oidc") {
        Some(Preset::BitbucketPipelines)
    } else {
        None
    }
}

/// Whether binding `b` fails while `a` is bound (Linux): the same port (not 0, which
/// picks a free one each time) on the same address, or on a wildcard address that
/// covers the other (`0.0.0.0` every IPv4 address, `[::]` every address: the listener
/// does not set `IPV6_V6ONLY`).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    let covers =
        |w: SocketAddr, x: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || x.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `1048576`, `"512KiB"`, `"10MiB"`, `"1GiB"`, `"10MB"`.
pub fn parse_size(v: &toml::Value) -> Option<u64> {
    match v {
        toml::Value::Integer(i) => u64::try_from(*i).ok(),
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: u64 = num.parse().ok()?;
            let mult: u64 = match unit.trim() {
                "" | "B" => 1,
                "KB" => 1000,
                "KiB" => 1 << 10,
                "MB" => 1_000_000,
                "MiB" => 1 << 20,
                "GB" => 1_000_000_000,
                "GiB" => 1 << 30,
                _ => return None,
            };
            n.checked_mul(mult)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;

/// A route, database or issuer name: letters, digits, `-`, `_` and `.`.
pub(crate) fn is_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}
