//! `[[databases]]`: PostgreSQL routes, compiled with the same diagnostics as `[[routes]]`.
//!
//! Upstream passwords never appear in the file: each comes from an environment variable
//! (`password_env`) or a file (`password_file`), read at load and held in a [`Secret`]
//! whose `Debug` is redacted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::{raw, Compiler, LoadMode};
use crate::diag::Diagnostic;
use crate::policy::{Catalog, Policy};

/// A credential: shown as `[redacted]` by `Debug`, never serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(s: impl Into<Arc<str>>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How portcullis talks to the upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plain TCP (loopback or a trusted network only).
    Disable,
    /// TLS without certificate verification (libpq's `sslmode=require`): protects against
    /// passive eavesdropping only. Logged as a warning at start-up.
    Require,
    /// TLS, chain verified against `upstream_ca` (or the public roots), name checked.
    VerifyFull,
}

/// A compiled `[[databases]]` entry.
#[derive(Debug)]
pub struct DatabaseSettings {
    pub name: Arc<str>,
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
    /// `host:port`, for logs.
    pub upstream_display: Arc<str>,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
    /// The role used when the deciding rule grants no `upstream_role`.
    pub upstream_user: String,
    pub password: Secret,
    /// Roles rules may grant, with their passwords.
    pub upstream_roles: BTreeMap<String, Secret>,
    pub policy: Arc<Policy>,
    /// Sessions end after this long whatever the token's lifetime.
    pub max_session: Option<Duration>,
    /// From TCP accept to an authenticated session (TLS, startup, token, upstream auth).
    pub startup_timeout: Duration,
    pub connect_timeout: Duration,
    /// Startup parameters forwarded beyond `postgres::startup::DEFAULT_FORWARDED`,
    /// lowercase.
    pub startup_parameters: Vec<String>,
    /// The server sees `application_name` with the session id appended
    /// (`psql (portcullis 0123…)`), so `pg_stat_activity` leads to the audit events.
    pub session_id_in_application_name: bool,
}

impl DatabaseSettings {
    /// The upstream role a session gets: the one the deciding rule grants with
    /// `upstream_role`, else the route's `upstream_user`.
    pub fn granted_role(&self, rule: Option<&crate::policy::RuleRef>) -> String {
        rule.and_then(|r| self.policy.rules().iter().find(|x| *x.id() == *r.id))
            .and_then(|r| r.upstream_role())
            .unwrap_or(&self.upstream_user)
            .to_string()
    }

    /// The password of an upstream role, if this route holds one.
    pub fn password_for(&self, role: &str) -> Option<&Secret> {
        if role == self.upstream_user {
            Some(&self.password)
        } else {
            self.upstream_roles.get(role)
        }
    }

    /// How `now` (this route as a reload compiled it) would connect to the upstream
    /// differently from `self` (as a session opened under it connected): another server
    /// (`upstream` host or port) or other transport security (`upstream_tls`,
    /// `upstream_ca`). A sentence for the audit, or `None` when a session's connection
    /// is still the one the route describes (`upstream` written otherwise, the same
    /// host and port, is no change).
    pub fn upstream_change(&self, now: &DatabaseSettings) -> Option<String> {
        let mut changed = Vec::new();
        if (&self.host, self.port) != (&now.host, now.port) {
            changed
                .push(format!("upstream `{}` → `{}`", self.upstream_display, now.upstream_display));
        }
        if self.upstream_tls != now.upstream_tls {
            changed.push(format!(
                "upstream_tls `{}` → `{}`",
                self.upstream_tls.as_str(),
                now.upstream_tls.as_str()
            ));
        }
        if self.upstream_ca != now.upstream_ca {
            let shown = |p: &Option<PathBuf>| {
                p.as_ref().map_or_else(|| "(none)".to_string(), |p| format!("`{}`", p.display()))
            };
            changed.push(format!(
                "upstream_ca {} → {}",
                shown(&self.upstream_ca),
                shown(&now.upstream_ca)
            ));
        }
        (!changed.is_empty()).then(|| changed.join(", "))
    }
}

impl UpstreamTls {
    /// As `upstream_tls` is written.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamTls::Disable => "disable",
            UpstreamTls::Require => "require",
            UpstreamTls::VerifyFull => "verify-full",
        }
    }
}

/// What is wrong with a `host[:port]`.
pub(super) enum HostPortError {
    BadPort,
    NoHost,
}

/// `host[:port]` (an IPv6 host in brackets) of a URL's authority; `default` when there is
/// no port. A port must be 1–65535.
pub(super) fn host_port(authority: &str, default: u16) -> Result<(String, u16), HostPortError> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h, p),
            _ => return Err(HostPortError::BadPort),
        },
        _ => (authority, default),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(HostPortError::NoHost);
    }
    Ok((host.to_string(), port))
}

impl Compiler<'_> {
    pub(super) fn database(
        &mut self,
        d: raw::Database,
        policy_dir: &Path,
        catalog: &Catalog,
        policies: &mut BTreeMap<PathBuf, Option<Arc<Policy>>>,
        warnings: &mut Vec<Diagnostic>,
    ) -> Option<DatabaseSettings> {
        let start = self.diags.len();
        let name = d.name.get_ref().clone();
        if !super::is_name(&name) {
            self.err(d.name.span(), "database route names use letters, digits, `-`, `_` and `.`");
        }
        let listen = self.addr(&d.listen);
        let (host, port) = self.pg_upstream(&d.upstream).unwrap_or_default();
        let upstream_tls = match d.upstream_tls.as_ref().map(|t| (t, t.get_ref().as_str())) {
            None | Some((_, "disable")) => UpstreamTls::Disable,
            Some((_, "require")) => UpstreamTls::Require,
            Some((_, "verify-full")) => UpstreamTls::VerifyFull,
            Some((t, other)) => {
                self.err(
                    t.span(),
                    format!(
                        "unknown upstream_tls `{other}`, expected disable, require or verify-full"
                    ),
                );
                UpstreamTls::Disable
            }
        };
        let upstream_ca = d.upstream_ca.as_ref().map(|c| {
            if upstream_tls != UpstreamTls::VerifyFull {
                self.err(
                    c.span(),
                    "`upstream_ca` only applies with upstream_tls = \"verify-full\"",
                );
            }
            self.existing_ca(c)
        });
        let user = d.upstream_user.get_ref().clone();
        if user.is_empty() || user.contains('\0') {
            self.err(d.upstream_user.span(), "`upstream_user` must be a role name");
        }
        let password =
            self.database_secret(&d.name, d.password_env.as_ref(), d.password_file.as_ref());
        let mut upstream_roles = BTreeMap::new();
        // Declared, whether or not its password could be read: a role whose secret is
        // missing is reported once, at its password, not again at each rule granting it.
        let mut declared_roles = std::collections::BTreeSet::new();
        if let Some(roles) = &d.upstream_roles {
            for (role, r) in roles.get_ref() {
                declared_roles.insert(role.as_str());
                if role.is_empty() || role.contains('\0') {
                    self.err(roles.span(), format!("`{role}` is not a role name"));
                }
                let s = self.database_secret(
                    &d.name,
                    r.password_env.as_ref(),
                    r.password_file.as_ref(),
                );
                if let Some(s) = s {
                    upstream_roles.insert(role.clone(), s);
                }
            }
        }
        let policy = self.policy(&d.policy, policy_dir, catalog, policies, warnings);
        if let Some(p) = &policy {
            for rule in p.rules() {
                if let Some(role) = rule.upstream_role() {
                    if role != user && !declared_roles.contains(role) {
                        self.err(
                            d.policy.span(),
                            format!(
                                "rule `{}` ({}:{}) grants upstream_role `{role}`, but database route `{name}` has no credentials for it: add [databases.upstream_roles.{role}]",
                                rule.id(),
                                p.file().display(),
                                rule.line(),
                            ),
                        );
                    }
                }
            }
        }
        let mut startup_parameters: Vec<String> = Vec::new();
        for p in d.startup_parameters.iter().flat_map(|l| l.get_ref()) {
            let lower = p.get_ref().to_ascii_lowercase();
            if let Some(why) = crate::postgres::startup::extra_name_error(p.get_ref()) {
                self.err(p.span(), format!("startup_parameters: {why}"));
            } else if startup_parameters.contains(&lower) {
                self.err(p.span(), format!("startup_parameters: `{}` listed twice", p.get_ref()));
            } else {
                startup_parameters.push(lower);
            }
        }
        let settings = DatabaseSettings {
            name: Arc::from(name.as_str()),
            listen: listen?,
            upstream_display: Arc::from(format!("{host}:{port}")),
            host,
            port,
            upstream_tls,
            upstream_ca,
            upstream_user: user,
            password: password?,
            upstream_roles,
            policy: policy?,
            max_session: d.max_session.as_ref().and_then(|m| {
                let t = self.duration(m)?;
                if t.is_zero() {
                    self.err(m.span(), "`max_session` must be longer than zero");
                }
                Some(t)
            }),
            startup_timeout: self.positive_duration(
                &d.startup_timeout,
                "startup_timeout",
                Duration::from_secs(10),
            ),
            connect_timeout: self.positive_duration(
                &d.connect_timeout,
                "connect_timeout",
                Duration::from_secs(5),
            ),
            startup_parameters,
            session_id_in_application_name: d
                .session_id_in_application_name
                .as_ref()
                .is_some_and(|b| *b.get_ref()),
        };
        (self.diags.len() == start).then_some(settings)
    }

    /// `postgres://host:port` (or `postgresql://`); no user, password, path or query: the
    /// database comes from the client, the credentials from `password_env`/`password_file`.
    fn pg_upstream(&mut self, u: &Spanned<String>) -> Option<(String, u16)> {
        let v = u.get_ref();
        let Some(rest) = v.strip_prefix("postgres://").or_else(|| v.strip_prefix("postgresql://"))
        else {
            self.err(u.span(), "upstream: expected postgres://host:port");
            return None;
        };
        if rest.contains('@') {
            self.err(
                u.span(),
                "upstream URLs must not carry credentials: use upstream_user with password_env or password_file",
            );
            return None;
        }
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('?') {
            self.err(u.span(), "upstream: no path or query (the client names the database)");
            return None;
        }
        match host_port(authority, 5432) {
            Ok(hp) => Some(hp),
            Err(HostPortError::BadPort) => {
                self.err(u.span(), "upstream: bad port");
                None
            }
            Err(HostPortError::NoHost) => {
                self.err(u.span(), "upstream: missing host");
                None
            }
        }
    }

    /// Exactly one of `password_env` / `password_file`, read now (so a missing secret fails
    /// the load, not the first session) unless the load is [`LoadMode::PolicyOnly`],
    /// which reads neither and leaves the password empty. Diagnostics never contain the
    /// value.
    pub(super) fn database_secret(
        &mut self,
        at: &Spanned<String>,
        env: Option<&Spanned<String>>,
        file: Option<&Spanned<String>>,
    ) -> Option<Secret> {
        let value = match (env, file) {
            (Some(_), Some(f)) => {
                self.err(f.span(), "set either `password_env` or `password_file`, not both");
                return None;
            }
            (None, None) => {
                self.err(
                    at.span(),
                    "no upstream password: set `password_env` or `password_file` (never inline)",
                );
                return None;
            }
            (_, Some(f)) if self.mode == LoadMode::PolicyOnly => {
                self.named_files.push(self.path(f.get_ref()));
                return Some(Secret::new(""));
            }
            (Some(_), None) if self.mode == LoadMode::PolicyOnly => return Some(Secret::new("")),
            (Some(e), None) => match std::env::var(e.get_ref()) {
                Ok(v) => v,
                Err(_) => {
                    self.err(
                        e.span(),
                        format!("{} is not set", super::env_name_shown(e.get_ref())),
                    );
                    return None;
                }
            },
            (None, Some(f)) => {
                let p = self.path(f.get_ref());
                // Watched even when unreadable: a reload refused for it is retried
                // once it is written.
                self.named_files.push(p.clone());
                match crate::util::read_bounded_text(&p, crate::util::MAX_SECRET_FILE, true) {
                    Ok(v) => v.trim_end_matches(['\r', '\n']).to_string(),
                    Err(e) => {
                        self.err(f.span(), format!("cannot read {}: {e}", super::file_shown(&p)));
                        return None;
                    }
                }
            }
        };
        if value.is_empty() || value.contains('\0') {
            let span = env.or(file).map_or(at.span(), Spanned::span);
            self.err(span, "the upstream password is empty or contains NUL");
            return None;
        }
        Some(Secret::new(value))
    }
}
