//! `[redis]`: the optional store replicas share (docs/configuration.md, *Redis*): sign-outs
//! reach every replica, and a single-use token is refused on every replica after its
//! first use anywhere.
//!
//! Like the database upstreams, the password never sits in the file (`password_env` or
//! `password_file`), and the URL may not carry one.

use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::database::{host_port, HostPortError, Secret};
use super::{raw, Compiler};

/// A compiled `[redis]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub host: String,
    pub port: u16,
    /// `rediss://`: TLS, verified against the Mozilla roots plus `ca`.
    pub tls: bool,
    pub ca: Option<PathBuf>,
    /// The database number (`SELECT`), the URL's path.
    pub db: u32,
    /// For Redis 6 ACLs (`AUTH username password`); `AUTH password` without it.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Put before every key and the sign-out channel, so replicas of several
    /// deployments can share one server.
    pub key_prefix: String,
    /// Bounds each command from when it is asked (waiting for the connection and
    /// connecting included); a single-use check that takes longer fails closed.
    pub timeout: Duration,
}

impl RedisSettings {
    /// The server as logs name it: scheme, host, port and database, never a credential.
    pub fn shown(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{}:{}/{}", self.host, self.port, self.db)
    }
}

impl Compiler<'_> {
    pub(super) fn redis(&mut self, r: raw::Redis) -> Option<RedisSettings> {
        let start = self.diags.len();
        let url = self.redis_url(&r.url);
        let password = match (&r.password_env, &r.password_file) {
            (None, None) => None,
            (env, file) => self.database_secret(&r.url, env.as_ref(), file.as_ref()),
        };
        if let (Some(u), None) = (&r.username, &password) {
            self.err(u.span(), "`username` needs a password (`password_env` or `password_file`)");
        }
        let ca = r.ca.as_ref().map(|c| self.existing_ca(c));
        if let (Some(c), Some((_, _, false, _))) = (&r.ca, &url) {
            self.err(c.span(), "`ca` only applies to rediss:// (TLS) URLs");
        }
        let key_prefix = match r.key_prefix {
            None => "portcullis:".to_string(),
            Some(p) => {
                let ok = !p.get_ref().is_empty()
                    && p.get_ref().len() <= 64
                    && p.get_ref().bytes().all(|b| b.is_ascii_graphic() && b != b'*');
                if !ok {
                    self.err(
                        p.span(),
                        "`key_prefix` is 1 to 64 printable ASCII characters without spaces or `*`",
                    );
                }
                p.into_inner()
            }
        };
        let timeout = self.positive_duration(&r.timeout, "timeout", Duration::from_millis(500));
        let (host, port, tls, db) = url?;
        (self.diags.len() == start).then_some(RedisSettings {
            host,
            port,
            tls,
            ca,
            db,
            username: r.username.map(Spanned::into_inner),
            password,
            key_prefix,
            timeout,
        })
    }

    /// `redis://HOST[:PORT][/DB]` or `rediss://…`: host, port, TLS, database.
    fn redis_url(&mut self, u: &Spanned<String>) -> Option<(String, u16, bool, u32)> {
        let text = u.get_ref();
        let (tls, rest) = if let Some(rest) = text.strip_prefix("rediss://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("redis://") {
            (false, rest)
        } else {
            self.err(u.span(), "`url` must start with redis:// or rediss:// (TLS)");
            return None;
        };
        if rest.contains('@') {
            self.err(
                u.span(),
                "the Redis URL must not carry credentials: use `username` with `password_env` or `password_file`",
            );
            return None;
        }
        if rest.contains(['?', '#']) {
            self.err(u.span(), "the Redis URL takes no query or fragment");
            return None;
        }
        let (authority, db) = match rest.split_once('/') {
            None => (rest, 0),
            Some((a, "")) => (a, 0),
            Some((a, db)) => match db.parse::<u32>() {
                Ok(n) => (a, n),
                Err(_) => {
                    self.err(u.span(), "the URL's path is the database number (`/0`)");
                    return None;
                }
            },
        };
        match host_port(authority, 6379) {
            Ok((host, port)) => Some((host, port, tls, db)),
            Err(HostPortError::BadPort) => {
                self.err(u.span(), "the Redis URL has a bad port");
                None
            }
            Err(HostPortError::NoHost) => {
                self.err(u.span(), "the Redis URL names no host");
                None
            }
        }
    }
}
