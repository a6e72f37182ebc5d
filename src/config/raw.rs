//! Raw configuration as written in `portcullis.toml`: serde types that reject unknown
//! keys and keep spans on everything resolved later, so a diagnostic can point at it.

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub https: Option<S<String>>,
    /// Plain HTTP, for deployments behind a TLS-terminating load balancer.
    pub insecure_http: Option<S<String>>,
    pub admin: Option<S<String>>,
    /// Addresses (CIDR) whose `X-Forwarded-*` headers are trusted. None by default.
    pub trusted_proxies: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: S<String>,
    pub key: S<String>,
    #[serde(default)]
    pub sni: Vec<Sni>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sni {
    pub server_names: S<Vec<S<String>>>,
    pub cert: S<String>,
    pub key: S<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub shutdown_grace: Option<S<String>>,
    pub watch: Option<bool>,
    pub policy_dir: Option<S<String>>,
    pub max_connections: Option<S<i64>>,
    pub max_connections_per_client: Option<S<i64>>,
    pub idle_timeout: Option<S<String>>,
    pub token_cache_entries: Option<S<i64>>,
    pub header_timeout: Option<S<String>>,
    pub send_timeout: Option<S<String>>,
    pub max_header_size: Option<S<toml::Value>>,
}

/// `[redis]`: the store replicas share (sign-outs, single-use tokens).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub url: S<String>,
    pub username: Option<S<String>>,
    pub password_env: Option<S<String>>,
    pub password_file: Option<S<String>>,
    pub ca: Option<S<String>>,
    pub key_prefix: Option<S<String>>,
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    pub issuer: Option<S<String>>,
    pub ttl: Option<S<String>>,
    pub key: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    pub output: Option<S<String>>,
    pub on_failure: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    pub preset: Option<S<String>>,
    pub issuer: S<String>,
    pub discovery_url: Option<S<String>>,
    pub audiences: S<Vec<S<String>>>,
    pub algorithms: Option<S<Vec<S<String>>>>,
    pub leeway: Option<S<String>>,
    pub max_token_age: Option<S<String>>,
    pub kind: Option<S<String>>,
    pub token_type: Option<S<String>>,
    pub client_id: Option<S<String>>,
    pub hosted_domain: Option<S<String>>,
    pub groups_claim: Option<S<String>>,
    pub ca: Option<S<String>>,
    pub insecure_http: Option<bool>,
    pub stale_window: Option<S<String>>,
    pub refresh_cooldown: Option<S<String>>,
    /// Browser login (OpenID Connect authorization code + PKCE) with this issuer.
    pub login: Option<S<Login>>,
}

/// `[issuers.NAME] login = { ... }`: the proxy as an OpenID relying party.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub client_id: S<String>,
    /// Accepted only to say why it is refused: secrets never live in the config file.
    pub client_secret: Option<S<String>>,
    pub client_secret_env: Option<S<String>>,
    pub client_secret_file: Option<S<String>>,
    pub scopes: Option<S<Vec<S<String>>>>,
    pub redirect_path: Option<S<String>>,
    /// Extra authorization request parameters (Google `access_type = "offline"`, ...).
    pub extra_params: Option<S<std::collections::BTreeMap<String, S<String>>>>,
    /// Where the provider sends the browser after RP-initiated logout (default `/` on
    /// the host the logout came from).
    pub post_logout_redirect: Option<S<String>>,
}

/// `[session]`: sealed browser session cookies.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub cookie_name: Option<S<String>>,
    pub cookie_domain: Option<S<String>>,
    pub keys_env: Option<S<String>>,
    pub keys_file: Option<S<String>>,
    pub absolute_lifetime: Option<S<String>>,
    pub idle_lifetime: Option<S<String>>,
    pub refresh_before: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: S<String>,
    /// Absent: every host and path, as each of its keys' defaults (the docs give them).
    #[serde(rename = "match", default)]
    pub matcher: Match,
    pub upstream: S<String>,
    pub upstream_ca: Option<S<String>>,
    pub policy: S<String>,
    pub shadow_policy: Option<S<String>>,
    pub forward_token: Option<bool>,
    pub identity_assertion: Option<bool>,
    pub timeout: Option<S<String>>,
    /// The longest the upstream may send nothing of its response body.
    pub read_timeout: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub max_request_body: Option<S<toml::Value>>,
    pub preserve_host: Option<bool>,
    pub strip_headers: Option<Vec<S<String>>>,
    /// Header name → claim name: verified claims forwarded as plain headers. Keys are
    /// spanned so a bad header name is reported where it is written.
    pub claim_headers: Option<S<std::collections::BTreeMap<S<String>, S<String>>>>,
    pub single_use_tokens: Option<bool>,
    /// Forward CORS preflights (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`, no credential) without authentication.
    pub cors_preflight: Option<bool>,
    /// Remove `match.path_prefix` from the forwarded path (spanned: `check` warns at it
    /// on a route whose prefix is `/`).
    pub strip_prefix: Option<S<bool>>,
    /// With `strip_prefix`: put the prefix back into the upstream's redirects and cookie
    /// paths (spanned: `check` warns at it on a route without `strip_prefix`).
    pub restore_prefix: Option<S<bool>>,
    /// Issuers whose credentials this route accepts (all when absent); the human ones
    /// are offered on the sign-in page.
    pub issuers: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub methods: Option<S<Vec<S<String>>>>,
}

/// `[[databases]]`: a PostgreSQL route (see `docs/postgres.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: S<String>,
    pub listen: S<String>,
    pub upstream: S<String>,
    pub upstream_tls: Option<S<String>>,
    pub upstream_ca: Option<S<String>>,
    pub upstream_user: S<String>,
    pub password_env: Option<S<String>>,
    pub password_file: Option<S<String>>,
    /// Extra upstream roles a policy rule may grant with `upstream_role`.
    pub upstream_roles: Option<S<std::collections::BTreeMap<String, UpstreamRole>>>,
    pub policy: S<String>,
    pub max_session: Option<S<String>>,
    pub startup_timeout: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    /// Startup parameters forwarded beyond the default allow-list.
    pub startup_parameters: Option<S<Vec<S<String>>>>,
    /// Append the session id to the `application_name` the server sees.
    pub session_id_in_application_name: Option<S<bool>>,
}

/// `[databases.upstream_roles.NAME]`: where that role's password comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamRole {
    pub password_env: Option<S<String>>,
    pub password_file: Option<S<String>>,
}
