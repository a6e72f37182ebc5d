//! What admitted an identity, kept by what outlives the request that admitted it — a
//! WebSocket tunnel, a database session — and checked again at every reload: the
//! connection stays open only while its credential would still admit a new request.
//!
//! A token's payload is checked again against the issuer as reloaded (`iss`, `aud`, the
//! times with its leeway and `max_token_age`, the profile checks: [`super::verify`]),
//! so a narrower issuer ends the connections it no longer admits and a wider one (an
//! audience added) ends none. What cannot be checked again without the token — its
//! signature and header — is covered by [`Trust`]: a reload that changes where the
//! issuer's keys come from or how a header is checked ends them, as the verifier then
//! drops the keys it had; and by the key that verified it ([`super::SigningKey`]): once
//! the issuer's key set no longer holds it (a key rotation after a compromise), they
//! end too — checked at every reload and whenever a key set drops a key
//! ([`super::Verifier::key_removals`]). A browser session is admitted again as its cookie would be:
//! while the issuer still has `login`, the key that sealed the cookie is still among the
//! session keys (`[session] keys_file`/`keys_env`; rotating them signs everyone out) and
//! its absolute lifetime, as reloaded, is not reached, its sign-in's `acr` is one of the
//! login's `acr_values` (when it asks for them), its `hd` is the issuer's
//! `hosted_domain` (when it has one, [`crate::session::sign_in_refused`]), and it was not signed out (checked
//! at every sign-out too, see [`crate::session::revoke`]).

use std::path::PathBuf;
use std::sync::Arc;

use super::{Algorithm, Identity, IssuerSettings, TokenType};
use crate::config::Config;
use crate::reason::Reason;

/// How the identity was presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A bearer token (`Authorization`, `Proxy-Authorization`, a database password),
    /// verified by this key ([`super::Verifier::signing_key`]; `None`: the issuer's set
    /// no longer held it when the connection opened, which the first check ends).
    Token(Option<super::SigningKey>),
    /// A browser session cookie, sealed with this one of the session keys
    /// (`[session] keys_file`/`keys_env`), of the session the sign-out list knows by
    /// `revocation`, signed in as `sign_in` (held to the login's `acr_values` and the
    /// issuer's `hosted_domain`). Boxed: most credentials are tokens.
    Session {
        key: crate::session::seal::KeyId,
        revocation: [u8; 16],
        sign_in: Box<crate::session::SignIn>,
    },
}

/// An identity and what admitted it.
#[derive(Debug, Clone)]
pub struct Admission {
    pub identity: Arc<Identity>,
    credential: Credential,
    /// The issuer's, when the identity was admitted (`None`: it was not configured,
    /// which a verified identity's always is; the first reload ends it).
    trust: Option<Trust>,
}

/// What a token's signature and header were checked with: where the issuer's keys come
/// from and with which trust (what [`crate::identity::Verifier::adopt_keys_from`] keeps
/// keys across a reload for), the algorithm allowlist and the token type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trust {
    issuer: String,
    discovery_url: String,
    ca_file: Option<PathBuf>,
    insecure_http: bool,
    algorithms: Vec<Algorithm>,
    token_type: TokenType,
}

// === impl Admission ===

impl Admission {
    /// Whether a browser session admitted the identity: then a sign-out can end what
    /// it admitted, besides a reload.
    pub fn is_session(&self) -> bool {
        matches!(self.credential, Credential::Session { .. })
    }

    /// `identity`, admitted by `credential` under `config` (the configuration whose
    /// verifier or sessions verified it).
    pub fn new(identity: Arc<Identity>, credential: Credential, config: &Config) -> Self {
        let trust = config.issuer(identity.issuer.as_str()).map(Trust::of);
        Admission { identity, credential, trust }
    }

    /// Whether `config` (a reload's) and `verifier` (its keys as now fetched) still
    /// admit the identity as they would admit a new request with the same credential,
    /// as far as that can be told without the token: the identity as `config` sees it
    /// (its groups, its end: policies are evaluated on it), or why not. Route and policy
    /// are the caller's to check.
    pub fn recheck(
        &self,
        config: &Config,
        verifier: &super::Verifier,
        sessions: Option<&crate::session::Sessions>,
        now: u64,
    ) -> Result<Arc<Identity>, String> {
        let name = &self.identity.issuer;
        let Some(issuer) = config.issuer(name.as_str()) else {
            return Err(format!("issuer `{name}` removed"));
        };
        match &self.credential {
            Credential::Session { key, revocation, sign_in } => {
                let Some(login) = config.login(name) else {
                    return Err(format!("issuer `{name}` no longer has login configured"));
                };
                // As each request of the session is.
                if let Some(why) = crate::session::sign_in_refused(issuer, login, sign_in) {
                    return Err(format!("issuer `{name}` as reloaded: {why}"));
                }
                let Some(sessions) = sessions else {
                    return Err("browser sessions are no longer configured".into());
                };
                let created = self.identity.issued_at.unwrap_or(0);
                sessions.still_admits(key, created, now).map_err(str::to_string)?;
                if let Some(why) = sessions.revocations().refused(revocation, created) {
                    return Err(why.to_string());
                }
                Ok(self.identity.clone())
            }
            Credential::Token(key) => {
                if Some(Trust::of(issuer)) != self.trust {
                    return Err(format!(
                        "issuer `{name}` changed where its keys come from or how tokens are checked \
                         (issuer, discovery_url, ca, insecure_http, algorithms or token_type)"
                    ));
                }
                match key {
                    Some(k) if verifier.holds(k) => {}
                    Some(k) => {
                        return Err(format!(
                            "{}: the key that verified the token (kid `{}`) is no longer in \
                             issuer `{name}`'s key set",
                            Reason::UnknownKey.code(),
                            k.kid().escape_debug()
                        ))
                    }
                    None => {
                        return Err(format!(
                            "{}: the key that verified the token was no longer in issuer \
                             `{name}`'s key set when the connection opened",
                            Reason::UnknownKey.code()
                        ))
                    }
                }
                super::verify::recheck(issuer, &self.identity, now).map(Arc::new).map_err(|e| {
                    format!("{} under issuer `{name}` as reloaded: {}", e.reason.code(), e.detail)
                })
            }
        }
    }
}

// === impl Trust ===

impl Trust {
    fn of(s: &IssuerSettings) -> Self {
        // The allowlist is a set: the same algorithms in another order trust the same.
        let mut algorithms = s.algorithms.clone();
        algorithms.sort_unstable();
        algorithms.dedup();
        Trust {
            issuer: s.issuer.clone(),
            discovery_url: s.discovery_url.clone(),
            ca_file: s.ca_file.clone(),
            insecure_http: s.insecure_http,
            algorithms,
            token_type: s.token_type,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Algorithm, Trust};
    use crate::identity::tests::settings;
    use crate::identity::Preset;

    /// The allowlist is a set: a reload that reorders it (or repeats an entry) trusts
    /// the same tokens and ends no connection; one that drops an algorithm does.
    #[test]
    fn the_algorithm_allowlist_is_compared_as_a_set() {
        let with = |algorithms: &[Algorithm]| {
            let mut s = settings("corp", Preset::Oidc, "https://idp.example.com", "portcullis");
            s.algorithms = algorithms.to_vec();
            Trust::of(&s)
        };
        let (es, rs) = (Algorithm::ES256, Algorithm::RS256);
        assert_eq!(with(&[es, rs]), with(&[rs, es]));
        assert_eq!(with(&[es, rs]), with(&[rs, es, rs]));
        assert_ne!(with(&[es, rs]), with(&[rs]));
    }
}
