//! Single-use tokens for sensitive routes (V27): a token seen once is refused after,
//! until it expires.
//!
//! What is remembered is what the issuer signed, never the signature: an ECDSA
//! signature `(r, s)` is as valid as `(r, n − s)`, so anyone holding a used ES256 token
//! can make another valid one with the same claims. A token is therefore known by its
//! issuer and `jti` when it has one (V27), otherwise (Bitbucket sends no `jti`) by its
//! signing input, `header.payload`.

use std::collections::HashMap;

use aws_lc_rs::digest::{Context, SHA256};
use parking_lot::Mutex;

use crate::identity::Identity;

const LIMIT: usize = 1 << 20;

/// What makes two tokens the same token for replay purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayKey<'a> {
    /// The issuer (its configured name) and the token's `jti`.
    Jti { issuer: &'a str, jti: &'a str },
    /// `header.payload` of a token without a `jti`: what its signature covers.
    SigningInput(&'a str),
}

/// Seen-token set, pruned of expired entries as it grows.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<[u8; 32], u64>>,
}

// === impl ReplayKey ===

impl<'a> ReplayKey<'a> {
    /// The key of a verified `token` whose identity is `identity`.
    pub fn of(token: &'a str, identity: &'a Identity) -> Self {
        match identity.claims.get("jti").and_then(serde_json::Value::as_str) {
            Some(jti) if !jti.is_empty() => {
                ReplayKey::Jti { issuer: identity.issuer.as_str(), jti }
            }
            // A verified compact JWS has two dots; the signature follows the last.
            _ => ReplayKey::SigningInput(token.rsplit_once('.').map_or(token, |(input, _)| input)),
        }
    }

    /// SHA-256 over a tag and length-prefixed parts, so no key of one kind can equal
    /// one of the other, nor an issuer's name run into a `jti`.
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = Context::new(&SHA256);
        let mut part = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        match self {
            ReplayKey::Jti { issuer, jti } => {
                part(b"jti");
                part(issuer.as_bytes());
                part(jti.as_bytes());
            }
            ReplayKey::SigningInput(input) => {
                part(b"signing-input");
                part(input.as_bytes());
            }
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }
}

/// Until when a token whose identity expires at `exp` must be remembered: the verifier
/// accepts it until `exp` plus the issuer's leeway (V19, at most
/// [`MAX_LEEWAY`](crate::identity::verify::MAX_LEEWAY)), so forgotten at `exp` it could
/// be replayed for that long.
pub fn remembered_until(exp: u64) -> u64 {
    exp.saturating_add(crate::identity::verify::MAX_LEEWAY.as_secs() + 1)
}

// === impl ReplayCache ===

impl ReplayCache {
    /// True the first time a token is presented; false on every later use while it
    /// could still be accepted ([`remembered_until`]). Fails closed when full of
    /// unexpired entries.
    pub fn first_use(&self, key: ReplayKey<'_>, exp: u64) -> bool {
        self.first_use_at(key, exp, crate::util::unix_now())
    }

    pub fn first_use_at(&self, key: ReplayKey<'_>, exp: u64, now: u64) -> bool {
        let key = key.digest();
        let exp = remembered_until(exp);
        let mut seen = self.seen.lock();
        if seen.len() >= LIMIT {
            seen.retain(|_, e| *e > now);
            if seen.len() >= LIMIT {
                return false;
            }
        }
        match seen.get(&key) {
            Some(e) if *e > now => false,
            _ => {
                seen.insert(key, exp);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::identity::PrincipalKind;

    fn identity(issuer: &str, claims: Value) -> Identity {
        let claims = match claims {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        Identity {
            expires_at: 100,
            claims: claims.into(),
            ..Identity::test(issuer, "alice", PrincipalKind::Human)
        }
    }

    #[test]
    fn second_use_is_refused_until_expiry_and_the_longest_leeway() {
        let c = ReplayCache::default();
        let (t1, t2) = (ReplayKey::SigningInput("h.p1"), ReplayKey::SigningInput("h.p2"));
        assert!(c.first_use_at(t1, 100, 10));
        assert!(!c.first_use_at(t1, 100, 20));
        assert!(c.first_use_at(t2, 100, 20));
        // The verifier still accepts it within its leeway after `exp`.
        assert!(!c.first_use_at(t1, 100, 160), "60 s after exp");
        assert!(!c.first_use_at(t1, 100, 400), "300 s after exp: the longest leeway");
        assert!(c.first_use_at(t1, 200, 402), "forgotten once no verifier accepts it");
    }

    #[test]
    fn a_token_is_known_by_what_was_signed_not_by_its_signature() {
        let id = identity("corp", json!({ "sub": "alice" }));
        // `s` and `n - s`: two valid ES256 signatures over the same signing input.
        let (a, b) = ("eyJh.eyJz.c2lnLXM", "eyJh.eyJz.c2lnLW4tcw");
        assert_eq!(ReplayKey::of(a, &id), ReplayKey::SigningInput("eyJh.eyJz"));
        let c = ReplayCache::default();
        assert!(c.first_use_at(ReplayKey::of(a, &id), 100, 10));
        assert!(!c.first_use_at(ReplayKey::of(b, &id), 100, 10), "another signature, same token");
        // Near miss: another payload is another token.
        assert!(c.first_use_at(ReplayKey::of("eyJh.eyJ0.c2lnLXM", &id), 100, 10));
    }

    #[test]
    fn a_token_with_a_jti_is_known_by_issuer_and_jti() {
        let id = identity("gh", json!({ "jti": "6f47", "sub": "repo:a/b" }));
        assert_eq!(ReplayKey::of("h.p.s", &id), ReplayKey::Jti { issuer: "gh", jti: "6f47" });
        let c = ReplayCache::default();
        assert!(c.first_use_at(ReplayKey::of("h.p.s", &id), 100, 10));
        // The same jti re-signed under another header (another `kid`, `typ`): the same.
        assert!(!c.first_use_at(ReplayKey::of("h2.p.s2", &id), 100, 10));
        // Near misses: another jti, or the same jti from another issuer.
        let other_jti = identity("gh", json!({ "jti": "6f48" }));
        assert!(c.first_use_at(ReplayKey::of("h.p.s", &other_jti), 100, 10));
        let other_issuer = identity("gl", json!({ "jti": "6f47" }));
        assert!(c.first_use_at(ReplayKey::of("h.p.s", &other_issuer), 100, 10));
    }

    #[test]
    fn an_empty_or_non_string_jti_falls_back_to_the_signing_input() {
        for jti in [json!(""), json!(42), json!(null)] {
            let id = identity("gh", json!({ "jti": jti }));
            assert_eq!(ReplayKey::of("h.p.s", &id), ReplayKey::SigningInput("h.p"), "{jti}");
        }
    }

    #[test]
    fn keys_of_the_two_kinds_and_their_parts_never_collide() {
        let keys = [
            ReplayKey::Jti { issuer: "ab", jti: "c" },
            ReplayKey::Jti { issuer: "a", jti: "bc" },
            ReplayKey::SigningInput("abc"),
            ReplayKey::SigningInput("jti"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a.digest(), b.digest(), "{a:?} vs {b:?}");
            }
        }
    }
}
