//! The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, on
//! aws-lc-rs (HMAC, PBKDF2, SHA-256), and the legacy md5 response.
//!
//! Channel binding is not used (`n,,`): the upstream leg is authenticated by the TLS
//! certificate check when `upstream_tls = "verify-full"`. The salted password is the
//! expensive part (PBKDF2, 4096 iterations by default); [`KeyCache`] keeps the derived
//! client and server keys per (password, salt, iterations), as a connection pooler
//! would, so a session set-up costs two HMACs instead of ~8000.

use std::collections::HashMap;
use std::num::NonZeroU32;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use parking_lot::Mutex;

/// Upper bound on the iteration count an upstream may ask for (cost of a hostile server).
const MAX_ITERATIONS: u32 = 1_000_000;

/// Why the exchange failed. Messages never contain key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed server-first-message")]
    ServerFirst,
    #[error("server nonce does not extend the client nonce")]
    Nonce,
    #[error("iteration count out of range")]
    Iterations,
    #[error("malformed server-final-message")]
    ServerFinal,
    #[error("server reported an error: {0}")]
    ServerError(String),
    #[error("server signature does not verify: the upstream does not know the password")]
    ServerSignature,
}

/// Derived keys for one (password, salt, iterations).
#[derive(Clone)]
pub struct Keys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

/// Derived keys by SHA-256(password ‖ salt ‖ iterations); bounded.
#[derive(Default)]
pub struct KeyCache {
    map: Mutex<HashMap<[u8; 32], Keys>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCache")
    }
}

impl KeyCache {
    const MAX: usize = 1024;

    pub fn keys(&self, password: &str, salt: &[u8], iterations: NonZeroU32) -> Keys {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&(password.len() as u64).to_be_bytes());
        ctx.update(password.as_bytes());
        ctx.update(salt);
        ctx.update(&iterations.get().to_be_bytes());
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.finish().as_ref());
        if let Some(k) = self.map.lock().get(&id) {
            return k.clone();
        }
        let k = derive(password, salt, iterations);
        let mut map = self.map.lock();
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(id, k.clone());
        k
    }

    pub fn clear(&self) {
        self.map.lock().clear();
    }
}

/// SASLprep (RFC 4013), exactly as PostgreSQL applies it when it stores a SCRAM secret
/// and as libpq applies it when it logs in: the identity on ASCII; a password that is not
/// valid SASLprep input (a prohibited or unassigned character) is used as its UTF-8 bytes.
fn prepare(password: &str) -> std::borrow::Cow<'_, str> {
    if password.is_ascii() {
        return std::borrow::Cow::Borrowed(password);
    }
    stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password))
}

fn derive(password: &str, salt: &[u8], iterations: NonZeroU32) -> Keys {
    let password = prepare(password);
    let mut salted = [0u8; 32];
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, salt, password.as_bytes(), &mut salted);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let mut client_key = [0u8; 32];
    client_key.copy_from_slice(hmac::sign(&key, b"Client Key").as_ref());
    let mut server_key = [0u8; 32];
    server_key.copy_from_slice(hmac::sign(&key, b"Server Key").as_ref());
    Keys { client_key, server_key }
}

/// One exchange, from client-first to the verified server-final.
pub struct Exchange {
    client_first_bare: String,
    nonce: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scram::Exchange")
    }
}

impl Exchange {
    /// A new exchange with a random 18-byte nonce.
    pub fn new() -> Self {
        let mut raw = [0u8; 18];
        let _ = aws_lc_rs::rand::fill(&mut raw);
        Self::with_nonce(B64.encode(raw))
    }

    pub fn with_nonce(nonce: String) -> Self {
        // PostgreSQL ignores the SCRAM user name and uses the startup packet's.
        Exchange {
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            expected_server_signature: None,
        }
    }

    /// The mechanism name to put in SASLInitialResponse.
    pub const MECHANISM: &'static str = "SCRAM-SHA-256";

    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers the server-first-message with the client-final-message.
    pub fn client_final(
        &mut self,
        server_first: &str,
        password: &str,
        cache: &KeyCache,
    ) -> Result<String, ScramError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = B64.decode(v).ok(),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(ScramError::ServerFirst);
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let iterations = NonZeroU32::new(iterations)
            .filter(|i| i.get() <= MAX_ITERATIONS)
            .ok_or(ScramError::Iterations)?;
        let keys = cache.keys(password, &salt, iterations);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key = digest::digest(&digest::SHA256, &keys.client_key);
        let client_sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let mut proof = keys.client_key;
        for (p, s) in proof.iter_mut().zip(client_sig.as_ref()) {
            *p ^= s;
        }
        let server_sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &keys.server_key),
            auth_message.as_bytes(),
        );
        let mut expected = [0u8; 32];
        expected.copy_from_slice(server_sig.as_ref());
        self.expected_server_signature = Some(expected);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message: the server proves it knows the password too.
    pub fn verify_server_final(&self, server_final: &str) -> Result<(), ScramError> {
        if let Some(e) = server_final.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.chars().take(100).collect()));
        }
        let v = server_final
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::ServerFinal)?;
        let expected = self.expected_server_signature.ok_or(ScramError::ServerFinal)?;
        if aws_lc_rs::constant_time::verify_slices_are_equal(&v, &expected).is_err() {
            return Err(ScramError::ServerSignature);
        }
        Ok(())
    }
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}

/// PostgreSQL's md5 response: `"md5" + md5hex(md5hex(password ‖ user) ‖ salt)`.
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    use md5::{Digest, Md5};
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    let inner = hex(&h.finalize());
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 §3: user "user", password "pencil".
    #[test]
    fn rfc7677_test_vector() {
        let mut x = Exchange::with_nonce("rOprNGfwEbeRWgbNEkqO".into());
        // The RFC's client-first carries `n=user`; PostgreSQL's carries `n=`. Use the RFC's
        // bare message so the vector applies.
        x.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let cache = KeyCache::default();
        let fin = x.client_final(server_first, "pencil", &cache).unwrap_or_default();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(x.verify_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Ok(()));
        assert_eq!(
            x.verify_server_final("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::ServerSignature)
        );
        assert!(matches!(
            x.verify_server_final("e=invalid-proof"),
            Err(ScramError::ServerError(_))
        ));
    }

    #[test]
    fn hostile_server_first_messages_are_rejected() {
        let cache = KeyCache::default();
        let mut x = Exchange::with_nonce("abc".into());
        assert_eq!(x.client_final("r=xyz,s=AAAA,i=4096", "p", &cache), Err(ScramError::Nonce));
        assert_eq!(x.client_final("r=abc,s=AAAA,i=4096", "p", &cache), Err(ScramError::Nonce));
        assert_eq!(x.client_final("r=abcd,s=AAAA,i=0", "p", &cache), Err(ScramError::Iterations));
        assert_eq!(
            x.client_final("r=abcd,s=AAAA,i=99999999", "p", &cache),
            Err(ScramError::Iterations)
        );
        assert_eq!(x.client_final("r=abcd,i=1", "p", &cache), Err(ScramError::ServerFirst));
        assert_eq!(x.verify_server_final("v=AAAA"), Err(ScramError::ServerFinal));
    }

    #[test]
    fn passwords_are_saslprepped_like_postgres_does() {
        // RFC 4013 §3 examples: soft hyphen maps to nothing, U+00AA to "a" (NFKC), and
        // non-ASCII spaces to a space; ASCII is untouched.
        assert_eq!(prepare("I\u{00AD}X"), "IX");
        assert_eq!(prepare("\u{00AA}"), "a");
        assert_eq!(prepare("a\u{00A0}b"), "a b");
        assert_eq!(prepare("user"), "user");
        // Not valid SASLprep input (a prohibited control character): the raw bytes.
        assert_eq!(prepare("\u{0007}pw\u{00E9}"), "\u{0007}pw\u{00E9}");
        // And the keys follow: two spellings SASLprep unifies derive the same keys.
        let salt = b"salt";
        let it = NonZeroU32::new(16).unwrap_or(NonZeroU32::MIN);
        assert_eq!(derive("I\u{00AD}X", salt, it).client_key, derive("IX", salt, it).client_key);
        assert_ne!(derive("IY", salt, it).client_key, derive("IX", salt, it).client_key);
    }

    #[test]
    fn md5_matches_postgres() {
        // md5(md5('secret' || 'alice') || salt 01020304), as PostgreSQL's pg_md5_encrypt.
        assert_eq!(
            md5_response("alice", "secret", [1, 2, 3, 4]),
            "md598a0412b9c31436fc53776e863350083"
        );
        assert_ne!(
            md5_response("alice", "secret", [1, 2, 3, 5]),
            md5_response("alice", "secret", [1, 2, 3, 4])
        );
    }

    #[test]
    fn the_cache_returns_the_same_keys() {
        let cache = KeyCache::default();
        let it = NonZeroU32::new(16).unwrap_or(NonZeroU32::MIN);
        let a = cache.keys("pw", b"salt", it);
        let b = cache.keys("pw", b"salt", it);
        let c = cache.keys("pw2", b"salt", it);
        assert_eq!(a.client_key, b.client_key);
        assert_ne!(a.client_key, c.client_key);
    }
}
