//! The signed identity assertion sent upstream (`X-Portcullis-Assertion`): a short-lived
//! ES256 JWT an upstream can verify against `/.well-known/portcullis/jwks.json`, so it
//! need not trust plain headers (which anyone who reaches the upstream directly could
//! send).
//!
//! Signing costs tens of microseconds, so an assertion is reused on a route until half
//! its lifetime has passed, for the same verified token and for any other token that
//! says the same thing upstream (same issuer, subject, kind, verified email, groups and
//! CI context: [`forwards_the_same`]), as long as it does not outlive that token. A
//! pipeline's repeated calls, and a job minting a fresh token per call, pay for one
//! signature, not one per request. The plain identity headers are cached in the same
//! entry ([`Forward`]), so a repeated call percent-encodes nothing either.

use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use parking_lot::Mutex;
use serde::Serialize;

use crate::bounded::BoundedMap;
use crate::identity::{CiContext, Identity, PrincipalKind};

const CACHE_LIMIT: usize = 65_536;

/// Signs assertions; holds the proxy's ES256 key.
pub struct AssertionSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    issuer: String,
    ttl: Duration,
    jwks: Bytes,
    header_b64: String,
    cache: Mutex<Cache>,
    /// Keys the identity fingerprints, so nobody can pick claims that collide.
    fingerprint: std::collections::hash_map::RandomState,
    /// Tests make every fingerprint collide, to show a collision is never a match.
    #[cfg(test)]
    all_collide: bool,
}

/// Two views of one set of entries: by token (the identity `Arc` a verified token maps
/// to: a repeated call hashes nothing) and by what is forwarded (a fresh token for the
/// same principal: hashed once, then found by token).
struct Cache {
    by_token: BoundedMap<(usize, usize), Cached>,
    by_principal: BoundedMap<(u64, usize), Cached>,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSigner").field("kid", &self.kid).finish()
    }
}

#[derive(Clone)]
struct Cached {
    // Holding the Arcs keeps the pointers in the key from being reused by another
    // identity, or by a route of a later configuration (another audience); the identity
    // also tells a fingerprint collision from a match.
    identity: Arc<Identity>,
    _route: Arc<str>,
    forward: Arc<Forward>,
    /// The assertion's `exp`: another token may take this entry only if it lives as long.
    exp: u64,
    refresh_after: u64,
}

/// Whether two identities put the same plain headers and the same assertion claims on
/// the wire ([`super::headers::identity_headers`], [`Claims`]): everything either
/// forwards, and nothing else. A field added to either must be added here.
fn forwards_the_same(a: &Identity, b: &Identity) -> bool {
    a.issuer == b.issuer
        && a.subject == b.subject
        && a.kind == b.kind
        && forwarded_email(a) == forwarded_email(b)
        && a.groups == b.groups
        && a.ci == b.ci
}

fn forwarded_email(id: &Identity) -> Option<&str> {
    id.email.as_deref().filter(|_| id.email_verified)
}

/// Everything the proxy adds upstream for one verified identity on one route, ready to
/// clone into a request (`HeaderValue` clones share their bytes).
#[derive(Debug)]
pub struct Forward {
    /// The plain `X-Portcullis-*` identity headers ([`super::headers::identity_headers`]).
    pub identity_headers: Box<[(HeaderName, HeaderValue)]>,
    /// The signed `X-Portcullis-Assertion`; `None` on a route with
    /// `identity_assertion = false`.
    pub assertion: Option<HeaderValue>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: String,
    iat: u64,
    exp: u64,
    issuer: &'a str,
    kind: PrincipalKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    ci: Option<&'a CiContext>,
}

#[derive(Debug, thiserror::Error)]
pub enum AssertionKeyError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("cannot generate the assertion key")]
    Generate,
}

impl AssertionSigner {
    /// A fresh P-256 key (each replica then has its own; upstreams fetch the JWKS).
    pub fn generate(issuer: String, ttl: Duration) -> Result<Self, AssertionKeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| AssertionKeyError::Generate)?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|_| AssertionKeyError::Generate)?;
        Ok(Self::with_key(key, issuer, ttl))
    }

    /// A P-256 key from a PKCS#8 PEM file, so replicas can share one key.
    pub fn from_file(
        path: &Path,
        issuer: String,
        ttl: Duration,
    ) -> Result<Self, AssertionKeyError> {
        use rustls_pki_types::pem::PemObject;
        let err = |msg: String| AssertionKeyError::File { path: path.display().to_string(), msg };
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
            .map_err(|e| err(format!("no PKCS#8 private key: {e}")))?;
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_pkcs8_der())
                .map_err(|e| err(format!("not a P-256 key: {e}")))?;
        Ok(Self::with_key(key, issuer, ttl))
    }

    fn with_key(key: EcdsaKeyPair, issuer: String, ttl: Duration) -> Self {
        let point = key.public_key().as_ref();
        // Uncompressed point: 0x04 || X (32) || Y (32).
        let (x, y) = match point.get(1..33).zip(point.get(33..65)) {
            Some((x, y)) => (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y)),
            None => (String::new(), String::new()),
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, point);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"
        }]});
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        Self {
            key,
            rng: SystemRandom::new(),
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
            kid,
            issuer,
            ttl,
            jwks: Bytes::from(jwks.to_string()),
            cache: Mutex::new(Cache {
                by_token: BoundedMap::new(CACHE_LIMIT),
                by_principal: BoundedMap::new(CACHE_LIMIT),
            }),
            fingerprint: Default::default(),
            #[cfg(test)]
            all_collide: false,
        }
    }

    /// The JWKS document served at `/.well-known/portcullis/jwks.json`.
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The assertion for `identity` on `route` (audience = route name), reused while
    /// more than half of its lifetime remains.
    pub fn assertion(&self, identity: &Arc<Identity>, route: &Arc<str>, now: u64) -> HeaderValue {
        self.forward(identity, route, now, true)
            .assertion
            .clone()
            .unwrap_or_else(|| HeaderValue::from_static(""))
    }

    /// The assertion (if `signed`) and the plain identity headers for `identity` on
    /// `route`, built together and reused while more than half of the assertion's
    /// lifetime remains. `signed` is fixed per route, so it is not part of the key.
    pub fn forward(
        &self,
        identity: &Arc<Identity>,
        route: &Arc<str>,
        now: u64,
        signed: bool,
    ) -> Arc<Forward> {
        let route_key = Arc::as_ptr(route) as *const u8 as usize;
        let token_key = (Arc::as_ptr(identity) as usize, route_key);
        // Never outlive the credential it vouches for.
        let lifetime_cap = identity.expires_at.max(now + 1);
        let (principal_key, previous) = {
            let mut cache = self.cache.lock();
            if let Some(c) = cache.by_token.get(&token_key) {
                if now < c.refresh_after {
                    return c.forward.clone();
                }
            }
            let principal_key = (self.fingerprint_of(identity), route_key);
            match cache.by_principal.get(&principal_key) {
                Some(c) if forwards_the_same(&c.identity, identity) => {
                    if now < c.refresh_after && c.exp <= lifetime_cap {
                        // Keyed by this identity's address, so it must hold this
                        // identity: were it freed, another could be allocated there and
                        // be handed this principal's assertion.
                        let c = Cached { identity: identity.clone(), ..c.clone() };
                        let forward = c.forward.clone();
                        cache.by_token.insert(token_key, c);
                        return forward;
                    }
                    // Same principal: only the assertion needs re-signing.
                    (principal_key, Some(c.forward.clone()))
                }
                _ => (principal_key, None),
            }
        };
        let ttl = self.ttl.as_secs().max(1);
        let exp = (now + ttl).min(lifetime_cap);
        let forward = Arc::new(Forward {
            identity_headers: match previous {
                Some(p) => p.identity_headers.clone(),
                None => super::headers::identity_headers(identity).into_boxed_slice(),
            },
            assertion: signed.then(|| self.sign(identity, route, now, exp)),
        });
        let entry = Cached {
            identity: identity.clone(),
            _route: route.clone(),
            forward: forward.clone(),
            exp,
            refresh_after: now + (exp - now) / 2,
        };
        let mut cache = self.cache.lock();
        // One cut short by its token's expiry is that token's alone: shared, it would
        // hand the principal's later tokens an assertion with seconds to live.
        if exp == now + ttl {
            cache.by_principal.insert(principal_key, entry.clone());
        }
        cache.by_token.insert(token_key, entry);
        forward
    }

    fn fingerprint_of(&self, id: &Identity) -> u64 {
        #[cfg(test)]
        if self.all_collide {
            return 0;
        }
        self.fingerprint.hash_one((
            &id.issuer,
            &id.subject,
            id.kind,
            forwarded_email(id),
            &id.groups,
            &id.ci,
        ))
    }

    fn sign(&self, id: &Identity, route: &str, now: u64, exp: u64) -> HeaderValue {
        let claims = Claims {
            iss: &self.issuer,
            aud: route,
            sub: id.principal(),
            iat: now,
            exp,
            issuer: id.issuer.as_str(),
            kind: id.kind,
            email: forwarded_email(id),
            groups: &id.groups,
            ci: id.ci.as_ref(),
        };
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let mut jwt = String::with_capacity(self.header_b64.len() + payload.len() * 2 + 100);
        jwt.push_str(&self.header_b64);
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut jwt);
        match self.key.sign(&self.rng, jwt.as_bytes()) {
            Ok(sig) => {
                jwt.push('.');
                URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut jwt);
                HeaderValue::from_str(&jwt).unwrap_or_else(|_| HeaderValue::from_static(""))
            }
            Err(_) => HeaderValue::from_static(""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IssuerId;
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    fn identity() -> Arc<Identity> {
        Arc::new(Identity {
            issuer: IssuerId(Arc::from("corp")),
            subject: "alice".into(),
            kind: PrincipalKind::Human,
            email: Some("alice@example.com".into()),
            email_verified: true,
            groups: vec!["sre".into()],
            groups_known: true,
            expires_at: 2_000_000_000,
            issued_at: None,
            ci: None,
            claims: Default::default(),
            audit: Default::default(),
        })
    }

    #[test]
    fn assertion_verifies_against_the_published_jwks_and_is_reused() {
        let s = AssertionSigner::generate("portcullis".into(), Duration::from_secs(60));
        let s = match s {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let id = identity();
        let route: Arc<str> = Arc::from("api");
        let a = s.assertion(&id, &route, 1_000);
        let b = s.assertion(&id, &route, 1_010);
        assert_eq!(a, b, "reused within half the lifetime");
        let c = s.assertion(&id, &route, 1_031);
        assert_ne!(a, c, "re-signed after half the lifetime");

        let jwt = a.to_str().unwrap_or_default();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let jwks: serde_json::Value = serde_json::from_slice(&s.jwks()).unwrap_or_default();
        let k = &jwks["keys"][0];
        let x = URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap_or_default()).unwrap_or_default();
        let y = URL_SAFE_NO_PAD.decode(k["y"].as_str().unwrap_or_default()).unwrap_or_default();
        let mut point = vec![4u8];
        point.extend(x);
        point.extend(y);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap_or_default();
        let msg = format!("{}.{}", parts[0], parts[1]);
        assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(msg.as_bytes(), &sig)
            .is_ok());
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(claims["sub"], "corp/alice");
        assert_eq!(claims["aud"], "api");
        assert_eq!(claims["exp"], 1_060);
        assert_eq!(claims["groups"][0], "sre");
    }

    #[test]
    fn an_unsigned_route_gets_headers_only_and_a_route_is_never_mistaken_for_another() {
        let s = AssertionSigner::generate("portcullis".into(), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        let id = identity();
        let plain: Arc<str> = Arc::from("plain");
        let f = s.forward(&id, &plain, 1_000, false);
        assert!(f.assertion.is_none());
        assert!(f
            .identity_headers
            .iter()
            .any(|(n, v)| n == "x-portcullis-subject" && v == "alice"));
        // A route of a later configuration never gets a cached entry of an earlier one,
        // even if its name were allocated where the old one was: the cache holds the
        // old route's name, so that address cannot be reused while the entry lives.
        drop(plain);
        let next: Arc<str> = Arc::from("signed");
        let f = s.forward(&id, &next, 1_001, true);
        let jwt = f.assertion.as_ref().and_then(|a| a.to_str().ok()).unwrap_or_default();
        let payload = jwt.split('.').nth(1).unwrap_or_default();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(claims["aud"], "signed");
    }

    fn claims_of(f: &Forward) -> serde_json::Value {
        let jwt = f.assertion.as_ref().and_then(|a| a.to_str().ok()).unwrap_or_default();
        let payload = jwt.split('.').nth(1).unwrap_or_default();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap_or_default())
            .unwrap_or_default()
    }

    fn pipeline(branch: &str) -> Identity {
        Identity {
            kind: PrincipalKind::Pipeline,
            email: None,
            groups: vec![],
            ci: Some(CiContext {
                provider: "bitbucket",
                repository: Some("{repo}".into()),
                branch: Some(branch.into()),
                step: Some("{step}".into()),
                ..Default::default()
            }),
            ..(*identity()).clone()
        }
    }

    #[test]
    fn a_fresh_token_for_the_same_principal_reuses_the_assertion_but_never_outlives_it() {
        let s = AssertionSigner::generate("portcullis".into(), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        let route: Arc<str> = Arc::from("api");
        let first = Arc::new(pipeline("main"));
        let a = s.forward(&first, &route, 1_000, true);
        // Another token (another Arc, another expiry and raw claims), same principal.
        let second = Arc::new(Identity { expires_at: 2_000_000_100, ..pipeline("main") });
        let b = s.forward(&second, &route, 1_010, true);
        assert!(Arc::ptr_eq(&a, &b), "one signature for both tokens");
        // The entry found by `second`'s address holds `second` itself: its address cannot
        // be freed and reused by another identity while the entry lives.
        assert_eq!(Arc::strong_count(&second), 2, "held by the test and by the cache");
        // ... and found by token from then on.
        assert!(Arc::ptr_eq(&s.forward(&second, &route, 1_011, true), &a));

        // A token that expires before the cached assertion gets its own, capped at its expiry.
        let short = Arc::new(Identity { expires_at: 1_020, ..pipeline("main") });
        let c = s.forward(&short, &route, 1_012, true);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(claims_of(&c)["exp"], 1_020);
        assert_eq!(claims_of(&a)["exp"], 1_060);

        // The short one was not shared: a later token of the principal gets the full one.
        let third = Arc::new(pipeline("main"));
        assert!(Arc::ptr_eq(&s.forward(&third, &route, 1_013, true), &a));

        // Past half its lifetime, the entry is re-signed for the next token.
        let later = Arc::new(pipeline("main"));
        let d = s.forward(&later, &route, 1_031, true);
        assert!(!Arc::ptr_eq(&a, &d) && !Arc::ptr_eq(&c, &d));
        assert_eq!(claims_of(&d)["iat"], 1_031);
        assert_eq!(d.identity_headers.len(), a.identity_headers.len());
    }

    #[test]
    fn anything_forwarded_that_differs_gets_its_own_assertion_and_headers() {
        for all_collide in [false, true] {
            let mut s = AssertionSigner::generate("portcullis".into(), Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{e}"));
            s.all_collide = all_collide;
            differing_identities_are_told_apart(&s);
        }
    }

    fn differing_identities_are_told_apart(s: &AssertionSigner) {
        let route: Arc<str> = Arc::from("api");
        let base = Arc::new(pipeline("main"));
        let a = s.forward(&base, &route, 1_000, true);
        let human = |f: fn(&mut Identity)| {
            let mut id = (*identity()).clone();
            f(&mut id);
            id
        };
        let variants: Vec<(Identity, &str)> = vec![
            (pipeline("feature/x"), "branch"),
            (Identity { subject: "bob".into(), ..pipeline("main") }, "subject"),
            (Identity { issuer: IssuerId(Arc::from("other")), ..pipeline("main") }, "issuer"),
            (Identity { kind: PrincipalKind::Service, ..pipeline("main") }, "kind"),
            (Identity { groups: vec!["sre".into()], ..pipeline("main") }, "groups"),
            (
                Identity { email: Some("a@x".into()), email_verified: true, ..pipeline("main") },
                "email",
            ),
            (Identity { ci: None, ..pipeline("main") }, "ci"),
        ];
        for (id, field) in variants {
            let f = s.forward(&Arc::new(id), &route, 1_001, true);
            assert!(!Arc::ptr_eq(&a, &f), "{field} differs, yet the assertion was shared");
            assert_ne!(a.assertion, f.assertion, "{field}");
        }
        // An unverified email is not forwarded, so it does not tell identities apart;
        // a verified one does.
        let unverified = human(|id| id.email_verified = false);
        let verified = human(|_| {});
        assert!(forwards_the_same(
            &unverified,
            &human(|id| {
                id.email_verified = false;
                id.email = Some("mallory@example.com".into());
            })
        ));
        assert!(!forwards_the_same(&unverified, &verified));
        let g = s.forward(&Arc::new(verified), &route, 1_001, true);
        assert_eq!(claims_of(&g)["email"], "alice@example.com");
        let u = s.forward(&Arc::new(unverified), &route, 1_001, true);
        assert!(claims_of(&u).get("email").is_none());
        // Another route is another audience.
        let other: Arc<str> = Arc::from("other");
        let o = s.forward(&Arc::new(pipeline("main")), &other, 1_001, true);
        assert_eq!(claims_of(&o)["aud"], "other");
    }
}
