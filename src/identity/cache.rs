//! Verified-token cache: a token seen before is answered with its [`Identity`]
//! without parsing JSON or verifying a signature again.
//!
//! Keyed by the SHA-256 of the whole token, so a hit requires the exact bytes that
//! were verified. An entry is honoured only inside the time window in which the token
//! itself was valid (exp/nbf/iat with leeway), and only while the issuer still
//! publishes the key that signed it (checked by the verifier on every hit).

use std::sync::Arc;

use parking_lot::RwLock;

use super::Identity;
use crate::bounded::BoundedMap;

/// Bounded so a flood of distinct valid tokens cannot grow memory without limit; each
/// insert into a full cache evicts a few old entries (`BoundedMap`), never a bulk.
pub const DEFAULT_CAPACITY: usize = 65_536;

pub(crate) type TokenHash = [u8; 32];

pub(crate) fn hash(token: &str) -> TokenHash {
    crate::util::sha256(token.as_bytes())
}

/// The last token a connection presented, with its hash: a pipeline's repeated calls on
/// one keep-alive connection compare the token's bytes (a `memcmp`) instead of hashing
/// them again. Only the hash is remembered; the cache lookup, its validity window and the
/// key check run on every request as before.
#[derive(Debug, Default)]
pub struct LastToken(parking_lot::Mutex<Option<(Box<str>, TokenHash)>>);

/// Longer tokens are hashed every time, so a connection holds at most this much.
const LAST_TOKEN_MAX: usize = 4096;

impl LastToken {
    /// `hash(token)`, remembered for the next call.
    pub(crate) fn hash(&self, token: &str) -> TokenHash {
        if let Some((last, hash)) = &*self.0.lock() {
            // In constant time: behind a proxy that multiplexes several people onto one
            // HTTP/2 connection, the time of an early-exit compare would tell how much of
            // another person's token a guess matched.
            let same = aws_lc_rs::constant_time::verify_slices_are_equal(
                last.as_bytes(),
                token.as_bytes(),
            );
            if same.is_ok() {
                return *hash;
            }
        }
        let hash = hash(token);
        if token.len() <= LAST_TOKEN_MAX {
            *self.0.lock() = Some((token.into(), hash));
        }
        hash
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub identity: Arc<Identity>,
    /// Index of the issuer in the verifier, and the key that verified the token.
    pub issuer: usize,
    pub kid: Arc<str>,
    /// [`super::jwks::VerifyKey::material`] of that key: new material under the same
    /// kid is another key, and the entry is dead.
    pub key_material: [u8; 32],
    /// The token is valid for `valid_from <= now < valid_until` (Unix seconds,
    /// leeway and max token age already applied).
    pub valid_from: u64,
    pub valid_until: u64,
}

#[derive(Debug)]
pub(crate) struct TokenCache {
    map: RwLock<BoundedMap<TokenHash, Entry>>,
    /// Capacity 0: nothing is kept, every token is verified.
    enabled: bool,
}

// === impl TokenCache ===

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        Self { map: RwLock::new(BoundedMap::new(capacity)), enabled: capacity > 0 }
    }

    /// The entry for `key` if the token is still inside its validity window at `now`.
    pub fn get(&self, key: &TokenHash, now: u64) -> Option<Entry> {
        let map = self.map.read();
        let entry = map.get(key)?;
        (entry.valid_from <= now && now < entry.valid_until).then(|| entry.clone())
    }

    pub fn insert(&self, key: TokenHash, entry: Entry) {
        if self.enabled {
            self.map.write().insert(key, entry);
        }
    }

    pub fn remove(&self, key: &TokenHash) {
        self.map.write().remove(key);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IssuerId, PrincipalKind};

    fn entry(from: u64, until: u64) -> Entry {
        let identity = Identity {
            issuer: IssuerId("i".into()),
            subject: "s".into(),
            kind: PrincipalKind::Human,
            email: None,
            email_verified: false,
            groups: vec![],
            groups_known: true,
            expires_at: until,
            issued_at: None,
            ci: None,
            claims: Default::default(),
            audit: Default::default(),
        };
        Entry {
            identity: Arc::new(identity),
            issuer: 0,
            kid: "k".into(),
            key_material: [0; 32],
            valid_from: from,
            valid_until: until,
        }
    }

    #[test]
    fn a_connections_last_token_hashes_as_the_token_does() {
        let last = LastToken::default();
        for t in ["a.b.c", "a.b.c", "a.b.d", "a.b.c", ""] {
            assert_eq!(last.hash(t), hash(t), "{t}");
        }
        let long = "x".repeat(LAST_TOKEN_MAX + 1);
        assert_eq!(last.hash(&long), hash(&long));
        assert_eq!(last.hash("a.b.c"), hash("a.b.c"));
    }

    #[test]
    fn honours_the_validity_window_and_stays_bounded() {
        let cache = TokenCache::new(16);
        let key = hash("a.b.c");
        assert_ne!(key, hash("a.b.d"));
        cache.insert(key, entry(100, 200));
        assert!(cache.get(&key, 99).is_none());
        assert!(cache.get(&key, 100).is_some());
        assert!(cache.get(&key, 199).is_some());
        assert!(cache.get(&key, 200).is_none());

        for i in 0..100u32 {
            cache.insert(hash(&i.to_string()), entry(0, 1_000));
            assert!(cache.len() <= 16);
        }
        // Eviction is oldest first (a read gives an entry one more round).
        let cache = TokenCache::new(2);
        cache.insert(hash("old"), entry(0, 10));
        cache.insert(hash("live"), entry(0, 1_000));
        cache.insert(hash("new"), entry(0, 1_000));
        assert!(cache.get(&hash("live"), 50).is_some());
        assert!(cache.get(&hash("new"), 50).is_some());
        cache.remove(&hash("new"));
        assert!(cache.get(&hash("new"), 50).is_none());
    }
}
