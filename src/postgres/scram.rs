//! The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, on
//! aws-lc-rs (HMAC, PBKDF2, SHA-256), and the legacy md5 response.
//!
//! Over TLS, when the server offers `SCRAM-SHA-256-PLUS`, the exchange is bound to the
//! TLS channel (`tls-server-end-point`, RFC 5929: a hash of the server's certificate), as
//! libpq's `channel_binding=prefer` does: a man in the middle that terminates TLS with
//! another certificate (possible with `upstream_tls = "require"`, which checks none)
//! makes the server refuse the proof instead of relaying a session to it. Without TLS
//! the exchange says `n` (no binding); over TLS with no `-PLUS` offered, `y` (so a
//! server that does support it detects a downgrade). The salted password is the
//! expensive part (PBKDF2, 4096 iterations by default); [`KeyCache`] keeps the derived
//! client and server keys per (password, salt, iterations), as a connection pooler
//! would, so a session set-up costs two HMACs instead of ~8000; a miss derives them on a
//! blocking thread.

use std::collections::HashMap;
use std::num::NonZeroU32;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use parking_lot::Mutex;

use crate::config::Secret;

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
    #[error("the SCRAM key derivation did not complete")]
    Derivation,
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

    /// The keys for (password, salt, iterations). A miss derives them on a blocking
    /// thread: the upstream picks the iteration count (up to a million, ~0.3 s), and on a
    /// runtime thread that would stall every other connection it serves (all of them on a
    /// one-CPU host, where the runtime is current-thread). A hit costs a hash.
    pub async fn keys(
        &self,
        password: &Secret,
        salt: Vec<u8>,
        iterations: NonZeroU32,
    ) -> Result<Keys, ScramError> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&(password.expose().len() as u64).to_be_bytes());
        ctx.update(password.expose().as_bytes());
        ctx.update(&salt);
        ctx.update(&iterations.get().to_be_bytes());
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.finish().as_ref());
        if let Some(k) = self.map.lock().get(&id) {
            return Ok(k.clone());
        }
        // The task's own handle on the shared secret: no copy of the password is made.
        let password = password.clone();
        let k = tokio::task::spawn_blocking(move || derive(password.expose(), &salt, iterations))
            .await
            .map_err(|_| ScramError::Derivation)?;
        let mut map = self.map.lock();
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(id, k.clone());
        Ok(k)
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
    #[cfg(test)]
    tests::DERIVATIONS.with(|n| n.set(n.get() + 1));
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

/// How an exchange uses channel binding (the GS2 header of RFC 5802 §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// `n`: no TLS, nothing to bind to.
    None,
    /// `y`: over TLS, but the server offered no `-PLUS` mechanism.
    NotOffered,
    /// `p=tls-server-end-point`: bound to this hash of the server's certificate.
    ServerEndPoint(Vec<u8>),
}

impl Binding {
    fn gs2_header(&self) -> &'static str {
        match self {
            Binding::None => "n,,",
            Binding::NotOffered => "y,,",
            Binding::ServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }
}

/// One exchange, from client-first to the verified server-final.
pub struct Exchange {
    client_first_bare: String,
    nonce: String,
    binding: Binding,
    expected_server_signature: Option<[u8; 32]>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scram::Exchange")
    }
}

impl Exchange {
    /// A new exchange with a random 18-byte nonce.
    pub fn new(binding: Binding) -> Self {
        let mut raw = [0u8; 18];
        let _ = aws_lc_rs::rand::fill(&mut raw);
        Self::with_nonce(B64.encode(raw), binding)
    }

    pub fn with_nonce(nonce: String, binding: Binding) -> Self {
        // PostgreSQL ignores the SCRAM user name and uses the startup packet's.
        Exchange {
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            binding,
            expected_server_signature: None,
        }
    }

    pub const MECHANISM: &'static str = "SCRAM-SHA-256";
    pub const MECHANISM_PLUS: &'static str = "SCRAM-SHA-256-PLUS";

    /// The mechanism name to put in SASLInitialResponse.
    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            Binding::ServerEndPoint(_) => Self::MECHANISM_PLUS,
            _ => Self::MECHANISM,
        }
    }

    pub fn client_first(&self) -> String {
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare)
    }

    /// Answers the server-first-message with the client-final-message.
    pub async fn client_final(
        &mut self,
        server_first: &str,
        password: &Secret,
        cache: &KeyCache,
    ) -> Result<String, ScramError> {
        let (nonce, salt, iterations) =
            read_server_first(server_first).ok_or(ScramError::ServerFirst)?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let iterations = NonZeroU32::new(iterations)
            .filter(|i| i.get() <= MAX_ITERATIONS)
            .ok_or(ScramError::Iterations)?;
        let keys = cache.keys(password, salt, iterations).await?;
        // c=: the GS2 header, then (for `p`) the channel binding data, base64.
        let mut cbind = self.binding.gs2_header().as_bytes().to_vec();
        if let Binding::ServerEndPoint(hash) = &self.binding {
            cbind.extend_from_slice(hash);
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
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
        // `v=` and nothing else, as libpq reads it.
        let v = server_final
            .strip_prefix("v=")
            .filter(|v| !v.contains(','))
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::ServerFinal)?;
        let expected = self.expected_server_signature.ok_or(ScramError::ServerFinal)?;
        if aws_lc_rs::constant_time::verify_slices_are_equal(&v, &expected).is_err() {
            return Err(ScramError::ServerSignature);
        }
        Ok(())
    }
}

/// The nonce, salt and iteration count of a server-first-message, read as libpq reads
/// it: `r=…,s=…,i=…` in this order and nothing after (a reserved `m=` extension, which
/// RFC 5802 §5.1 says must fail, is refused with the rest). A lax reading would answer
/// messages no PostgreSQL server sends, picking one of duplicated attributes.
fn read_server_first(server_first: &str) -> Option<(&str, Vec<u8>, u32)> {
    let mut attrs = server_first.split(',');
    let nonce = attrs.next()?.strip_prefix("r=")?;
    let salt = B64.decode(attrs.next()?.strip_prefix("s=")?).ok()?;
    let iterations = attrs.next()?.strip_prefix("i=")?.parse::<u32>().ok()?;
    attrs.next().is_none().then_some((nonce, salt, iterations))
}

/// `tls-server-end-point` data (RFC 5929 §4.1): the certificate hashed with the hash of
/// its signature algorithm, SHA-256 for MD5 and SHA-1; `None` when that algorithm has no
/// single hash (RSASSA-PSS, Ed25519), as PostgreSQL cannot bind those either.
pub fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let algorithm = match signature_oid(cert_der)? {
        // md5WithRSA, sha1WithRSA, ecdsa-with-SHA1: upgraded to SHA-256.
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04 | 0x05]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01] => &digest::SHA256,
        // sha256/384/512/224WithRSAEncryption.
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b] => &digest::SHA256,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c] => &digest::SHA384,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d] => &digest::SHA512,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e] => &digest::SHA224,
        // ecdsa-with-SHA224/256/384/512.
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01] => &digest::SHA224,
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] => &digest::SHA256,
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => &digest::SHA384,
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(algorithm, cert_der).as_ref().to_vec())
}

/// The OID (content bytes) of a DER certificate's `signatureAlgorithm`:
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }`.
fn signature_oid(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = der_element(der, 0x30)?;
    let (_tbs, rest) = der_element(cert, 0x30)?;
    let (algorithm, _) = der_element(rest, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    Some(oid)
}

/// One DER element with tag `tag` at the start of `b`: its contents and what follows.
fn der_element(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, b) = b.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let (bytes, rest) = b.split_at(n);
        b = rest;
        bytes.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x))
    };
    (b.len() >= len).then(|| b.split_at(len))
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

    thread_local! {
        /// Key derivations run on this thread.
        pub(super) static DERIVATIONS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    #[tokio::test]
    async fn the_gs2_header_and_c_attribute_carry_the_binding() {
        let server_first = "r=abcdef,s=QSXCR+Q6sek8bf92,i=4096";
        let cases = [
            (Binding::None, "n,,", "SCRAM-SHA-256", B64.encode("n,,")),
            (Binding::NotOffered, "y,,", "SCRAM-SHA-256", B64.encode("y,,")),
            (
                Binding::ServerEndPoint(vec![1, 2, 3]),
                "p=tls-server-end-point,,",
                "SCRAM-SHA-256-PLUS",
                B64.encode(b"p=tls-server-end-point,,\x01\x02\x03"),
            ),
        ];
        for (binding, gs2, mechanism, c) in cases {
            let mut x = Exchange::with_nonce("abc".into(), binding);
            assert_eq!(x.client_first(), format!("{gs2}n=,r=abc"));
            assert_eq!(x.mechanism(), mechanism);
            let fin = x.client_final(server_first, &Secret::new("pw"), &KeyCache::default()).await;
            let fin = fin.unwrap_or_else(|e| panic!("{e}"));
            assert!(fin.starts_with(&format!("c={c},r=abcdef,p=")), "{fin}");
        }
        assert_eq!(B64.encode("n,,"), "biws");
    }

    #[test]
    fn server_end_point_hashes_with_the_certificates_signature_hash() {
        // rcgen's default: ECDSA P-256 with SHA-256.
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let der = cert.der().to_vec();
        let want = digest::digest(&digest::SHA256, &der).as_ref().to_vec();
        assert_eq!(server_end_point(&der), Some(want));
        // P-384 signs with SHA-384.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap_or_else(|e| panic!("{e}"));
        let params = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let der = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}")).der().to_vec();
        let want = digest::digest(&digest::SHA384, &der).as_ref().to_vec();
        assert_eq!(server_end_point(&der), Some(want));
        // Ed25519 has no separate hash: not bindable, like PostgreSQL.
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap_or_else(|e| panic!("{e}"));
        let params = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let der = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}")).der().to_vec();
        assert_eq!(server_end_point(&der), None);
        // Garbage and truncations never panic.
        assert_eq!(server_end_point(b""), None);
        assert_eq!(server_end_point(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        for cut in 0..der.len() {
            let _ = server_end_point(&der[..cut]);
        }
    }

    /// RFC 7677 §3: user "user", password "pencil".
    #[tokio::test]
    async fn rfc7677_test_vector() {
        let mut x = Exchange::with_nonce("rOprNGfwEbeRWgbNEkqO".into(), Binding::None);
        // The RFC's client-first carries `n=user`; PostgreSQL's carries `n=`. Use the RFC's
        // bare message so the vector applies.
        x.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let cache = KeyCache::default();
        let fin = x.client_final(server_first, &Secret::new("pencil"), &cache).await;
        let fin = fin.unwrap_or_default();
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

    #[tokio::test]
    async fn hostile_server_first_messages_are_rejected() {
        let cache = KeyCache::default();
        let mut x = Exchange::with_nonce("abc".into(), Binding::None);
        let p = Secret::new("p");
        let cases = [
            ("r=xyz,s=AAAA,i=4096", ScramError::Nonce),
            ("r=abc,s=AAAA,i=4096", ScramError::Nonce),
            ("r=abcd,s=AAAA,i=0", ScramError::Iterations),
            ("r=abcd,s=AAAA,i=99999999", ScramError::Iterations),
            ("r=abcd,i=1", ScramError::ServerFirst),
        ];
        for (server_first, want) in cases {
            assert_eq!(x.client_final(server_first, &p, &cache).await, Err(want), "{server_first}");
        }
        assert_eq!(x.verify_server_final("v=AAAA"), Err(ScramError::ServerFinal));
    }

    /// libpq (`fe-auth-scram.c`) reads `r`, `s` and `i` in this order and nothing after
    /// them, and `v` alone: a message in any other shape is refused (RFC 5802 §5.1: an
    /// `m` attribute, reserved, must fail), not read for whichever attributes it holds.
    #[tokio::test]
    async fn server_messages_are_read_in_libpqs_shape_only() {
        let cache = KeyCache::default();
        let mut x = Exchange::with_nonce("abc".into(), Binding::None);
        let p = Secret::new("p");
        for server_first in [
            "s=AAAA,r=abcd,i=1",
            "i=1,s=AAAA,r=abcd",
            "m=ext,r=abcd,s=AAAA,i=1",
            "r=abcd,s=AAAA,i=1,x=y",
            "r=abcd,s=AAAA,i=1,r=abcde",
            "r=xyz,r=abcd,s=AAAA,i=1",
        ] {
            let got = x.client_final(server_first, &p, &cache).await;
            assert_eq!(got, Err(ScramError::ServerFirst), "{server_first}");
        }
        let fin = x.client_final("r=abcd,s=AAAA,i=1", &p, &cache).await;
        assert!(fin.is_ok(), "{fin:?}");
        let signature = x.expected_server_signature.map(|s| B64.encode(s)).unwrap_or_default();
        let v = format!("v={signature}");
        assert_eq!(x.verify_server_final(&v), Ok(()));
        for server_final in [format!("x=1,{v}"), format!("{v},x=1"), format!("{v},v=AAAA")] {
            let got = x.verify_server_final(&server_final);
            assert_eq!(got, Err(ScramError::ServerFinal), "{server_final}");
        }
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

    #[tokio::test]
    async fn the_cache_returns_the_same_keys() {
        let cache = KeyCache::default();
        let it = NonZeroU32::new(16).unwrap_or(NonZeroU32::MIN);
        let (pw, pw2) = (Secret::new("pw"), Secret::new("pw2"));
        let keys = |pw| cache.keys(pw, b"salt".to_vec(), it);
        let a = keys(&pw).await.unwrap_or_else(|e| panic!("{e}"));
        let b = keys(&pw).await.unwrap_or_else(|e| panic!("{e}"));
        let c = keys(&pw2).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.client_key, b.client_key);
        assert_ne!(a.client_key, c.client_key);
    }

    /// The iteration count is the upstream's to choose (up to a million): a derivation
    /// must not run on the runtime's thread (here the test's, current-thread), where it
    /// would hold up every other connection.
    #[tokio::test]
    async fn a_key_derivation_runs_off_the_runtime_thread() {
        let cache = KeyCache::default();
        let pw = Secret::new("pw");
        let it = NonZeroU32::new(MAX_ITERATIONS).unwrap_or(NonZeroU32::MIN);
        let mut x = Exchange::with_nonce("abc".into(), Binding::None);
        let server_first = format!("r=abcdef,s={},i={MAX_ITERATIONS}", B64.encode("salt"));
        let fin = x.client_final(&server_first, &pw, &cache).await;
        assert!(fin.is_ok(), "{fin:?}");
        let cached = cache.keys(&pw, b"salt".to_vec(), it).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(DERIVATIONS.with(|n| n.get()), 0, "derived on the runtime thread");
        // The blocking thread's keys are the right ones, and the cache kept them.
        assert_eq!(cached.client_key, derive("pw", b"salt", it).client_key);
    }
}
