//! Single-use tokens for sensitive routes (V27): a token seen once is refused after,
//! until it expires. Keyed by the SHA-256 of the token (Bitbucket tokens carry no `jti`).

use std::collections::HashMap;

use parking_lot::Mutex;

const LIMIT: usize = 1 << 20;

/// Seen-token set, pruned of expired entries as it grows.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<[u8; 32], u64>>,
}

impl ReplayCache {
    /// True the first time a token is presented; false on every later use before `exp`.
    /// Fails closed when full of unexpired entries.
    pub fn first_use(&self, token: &str, exp: u64) -> bool {
        self.first_use_at(token, exp, crate::util::unix_now())
    }

    pub fn first_use_at(&self, token: &str, exp: u64, now: u64) -> bool {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(d.as_ref());
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
    use super::*;

    #[test]
    fn second_use_is_refused_until_expiry() {
        let c = ReplayCache::default();
        assert!(c.first_use_at("t1", 100, 10));
        assert!(!c.first_use_at("t1", 100, 20));
        assert!(c.first_use_at("t2", 100, 20));
        assert!(c.first_use_at("t1", 200, 101), "expired entries may be reused");
    }
}
