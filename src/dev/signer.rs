//! A JWS signer for development and tests: the private half of what the dev issuer
//! publishes, able to sign exactly the bytes it is given.
//!
//! [`DevSigner::sign_raw`] signs header and payload JSON *as written*, so tests can
//! craft tokens that a JSON serializer would never produce (duplicate members, odd
//! whitespace, a `typ` in the wrong case) and check that the verifier rejects them.
//! Never used for anything but the dev issuer, `portcullis dev token` and tests.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::identity::Algorithm;

/// Why a signer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("the private key does not fit algorithm {0}")]
    KeyRejected(&'static str),
    #[error("key generation failed for {0}")]
    Generate(&'static str),
}

/// A private key with its `kid` and the one algorithm it signs with (RFC 8725 §3.1:
/// one key, one algorithm).
pub struct DevSigner {
    kid: String,
    alg: Algorithm,
    key: Key,
    pkcs8: Vec<u8>,
}

enum Key {
    Rsa(RsaKeyPair),
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl std::fmt::Debug for DevSigner {
    // Never print key material, even in tests.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevSigner").field("kid", &self.kid).field("alg", &self.alg).finish()
    }
}

/// A JWK Set (`{"keys": [...]}`) holding the public halves of `signers`.
pub fn jwks(signers: &[&DevSigner]) -> Value {
    json!({ "keys": signers.iter().map(|s| s.public_jwk()).collect::<Vec<_>>() })
}

// === impl DevSigner ===

impl DevSigner {
    /// A fresh RSA 2048 key for RS256.
    pub fn generate_rs256(kid: impl Into<String>) -> Result<Self, SignerError> {
        Self::generate(Algorithm::RS256, kid)
    }

    /// A fresh P-256 key for ES256.
    pub fn generate_es256(kid: impl Into<String>) -> Result<Self, SignerError> {
        Self::generate(Algorithm::ES256, kid)
    }

    /// A fresh key of the type `alg` needs (RSA 2048 for RS*/PS*, P-256/P-384, Ed25519).
    pub fn generate(alg: Algorithm, kid: impl Into<String>) -> Result<Self, SignerError> {
        let fail = || SignerError::Generate(alg.name());
        let pkcs8 = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => RsaKeyPair::generate(KeySize::Rsa2048)
                .and_then(|k| k.as_der())
                .map_err(|_| fail())?
                .as_ref()
                .to_vec(),
            Algorithm::ES256 | Algorithm::ES384 => {
                EcdsaKeyPair::generate(ecdsa_alg(alg).ok_or_else(fail)?)
                    .and_then(|k| k.to_pkcs8v1())
                    .map_err(|_| fail())?
                    .as_ref()
                    .to_vec()
            }
            Algorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| fail())?
                .as_ref()
                .to_vec(),
        };
        Self::from_pkcs8_der(alg, kid, &pkcs8)
    }

    /// Load a key persisted with [`DevSigner::pkcs8_der`].
    pub fn from_pkcs8_der(
        alg: Algorithm,
        kid: impl Into<String>,
        der: &[u8],
    ) -> Result<Self, SignerError> {
        let rejected = |_| SignerError::KeyRejected(alg.name());
        let key = match alg.key_type() {
            "RSA" => Key::Rsa(RsaKeyPair::from_pkcs8(der).map_err(rejected)?),
            "EC" => {
                let curve = ecdsa_alg(alg).ok_or(SignerError::KeyRejected(alg.name()))?;
                Key::Ecdsa(EcdsaKeyPair::from_pkcs8(curve, der).map_err(rejected)?)
            }
            _ => Key::Ed25519(Ed25519KeyPair::from_pkcs8(der).map_err(rejected)?),
        };
        Ok(Self { kid: kid.into(), alg, key, pkcs8: der.to_vec() })
    }

    /// The PKCS#8 v1 DER of the private key, to persist between runs.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        self.pkcs8.clone()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// The public JWK: `kty` with `n`/`e`, `crv`/`x`/`y` or `crv`/`x`, plus `kid`,
    /// `alg` and `use: sig`.
    pub fn public_jwk(&self) -> Value {
        let mut jwk = match &self.key {
            Key::Rsa(k) => {
                let public = k.public_key();
                json!({
                    "kty": "RSA",
                    "n": B64.encode(public.modulus().big_endian_without_leading_zero()),
                    "e": B64.encode(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Key::Ecdsa(k) => {
                // Uncompressed SEC1 point: 0x04 || x || y, coordinates of equal length.
                let point = k.public_key().as_ref();
                let coords = point.get(1..).unwrap_or_default();
                let (x, y) = coords.split_at(coords.len() / 2);
                let crv = if self.alg == Algorithm::ES384 { "P-384" } else { "P-256" };
                json!({ "kty": "EC", "crv": crv, "x": B64.encode(x), "y": B64.encode(y) })
            }
            Key::Ed25519(k) => {
                json!({ "kty": "OKP", "crv": "Ed25519", "x": B64.encode(k.public_key().as_ref()) })
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.alg.name());
        jwk["use"] = json!("sig");
        jwk
    }

    /// A compact JWS over exactly these bytes: `b64url(header).b64url(payload).sig`.
    /// Nothing is checked or normalized, so tests can build malformed tokens.
    pub fn sign_raw(&self, header_json: &str, payload_json: &str) -> String {
        let mut out =
            String::with_capacity((header_json.len() + payload_json.len()) * 4 / 3 + 16 + 700);
        B64.encode_string(header_json, &mut out);
        out.push('.');
        B64.encode_string(payload_json, &mut out);
        let sig = self.signature(out.as_bytes());
        out.push('.');
        B64.encode_string(sig, &mut out);
        out
    }

    /// A compact JWS of `header` and `payload` serialized by serde_json.
    pub fn sign(&self, header: &Value, payload: &Value) -> String {
        self.sign_raw(&header.to_string(), &payload.to_string())
    }

    /// The signature over `input`. A failure here would be a bug in the crypto library
    /// with a key it generated itself; an empty signature then makes a token that no
    /// verifier accepts, which is the safe way to fail in a dev tool.
    fn signature(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        let sig = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                rsa_encoding(self.alg)
                    .and_then(|enc| k.sign(enc, &rng, input, &mut sig).ok())
                    .map(|()| sig)
            }
            Key::Ecdsa(k) => k.sign(&rng, input).ok().map(|s| s.as_ref().to_vec()),
            Key::Ed25519(k) => Some(k.sign(input).as_ref().to_vec()),
        };
        sig.unwrap_or_else(|| {
            tracing::error!(kid = %self.kid, alg = self.alg.name(), "dev signer failed to sign");
            Vec::new()
        })
    }
}

fn ecdsa_alg(alg: Algorithm) -> Option<&'static signature::EcdsaSigningAlgorithm> {
    match alg {
        Algorithm::ES256 => Some(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
        Algorithm::ES384 => Some(&signature::ECDSA_P384_SHA384_FIXED_SIGNING),
        _ => None,
    }
}

fn rsa_encoding(alg: Algorithm) -> Option<&'static dyn signature::RsaEncoding> {
    Some(match alg {
        Algorithm::RS256 => &signature::RSA_PKCS1_SHA256,
        Algorithm::RS384 => &signature::RSA_PKCS1_SHA384,
        Algorithm::RS512 => &signature::RSA_PKCS1_SHA512,
        Algorithm::PS256 => &signature::RSA_PSS_SHA256,
        Algorithm::PS384 => &signature::RSA_PSS_SHA384,
        Algorithm::PS512 => &signature::RSA_PSS_SHA512,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ParsedPublicKey, RsaPublicKeyComponents};

    fn split(token: &str) -> (String, Vec<u8>) {
        let (input, sig) = token.rsplit_once('.').unwrap_or_default();
        (input.to_owned(), B64.decode(sig).unwrap_or_default())
    }

    fn b64_field(jwk: &Value, name: &str) -> Vec<u8> {
        B64.decode(jwk[name].as_str().unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn rs256_signature_verifies_with_published_jwk() -> Result<(), SignerError> {
        let signer = DevSigner::generate_rs256("k1")?;
        let token = signer.sign_raw(r#"{"alg":"RS256","kid":"k1"}"#, r#"{"a":1,"a":2}"#);
        assert_eq!(token.split('.').count(), 3);
        let jwk = signer.public_jwk();
        assert_eq!((jwk["kty"].as_str(), jwk["kid"].as_str()), (Some("RSA"), Some("k1")));
        assert_eq!((jwk["use"].as_str(), jwk["alg"].as_str()), (Some("sig"), Some("RS256")));
        let (n, e) = (b64_field(&jwk, "n"), b64_field(&jwk, "e"));
        let key = RsaPublicKeyComponents { n: &n, e: &e }
            .to_parsed_public_key(&signature::RSA_PKCS1_2048_8192_SHA256)
            .map_err(|_| SignerError::KeyRejected("RS256"))?;
        let (input, sig) = split(&token);
        assert!(key.verify_sig(input.as_bytes(), &sig).is_ok());
        assert!(key.verify_sig(b"other", &sig).is_err());
        Ok(())
    }

    #[test]
    fn es256_signature_verifies_and_survives_pkcs8_round_trip() -> Result<(), SignerError> {
        let signer = DevSigner::generate_es256("e1")?;
        let again = DevSigner::from_pkcs8_der(Algorithm::ES256, "e1", &signer.pkcs8_der())?;
        assert_eq!(signer.public_jwk(), again.public_jwk());
        let jwk = again.public_jwk();
        assert_eq!(jwk["crv"].as_str(), Some("P-256"));
        let mut point = vec![4u8];
        point.extend(b64_field(&jwk, "x"));
        point.extend(b64_field(&jwk, "y"));
        assert_eq!(point.len(), 65);
        let key = ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
            .map_err(|_| SignerError::KeyRejected("ES256"))?;
        let token = again.sign(&json!({"alg": "ES256"}), &json!({"sub": "x"}));
        let (input, sig) = split(&token);
        assert!(key.verify_sig(input.as_bytes(), &sig).is_ok());
        Ok(())
    }

    #[test]
    fn pkcs8_of_another_key_type_is_rejected_and_jwks_lists_every_key() -> Result<(), SignerError> {
        let ec = DevSigner::generate_es256("e1")?;
        assert!(DevSigner::from_pkcs8_der(Algorithm::RS256, "x", &ec.pkcs8_der()).is_err());
        let ed = DevSigner::generate(Algorithm::EdDSA, "d1")?;
        let set = jwks(&[&ec, &ed]);
        let kids: Vec<_> = set["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k["kid"].as_str())
            .collect();
        assert_eq!(kids, ["e1", "d1"]);
        assert!(!format!("{ec:?}").contains("pkcs8"));
        Ok(())
    }
}
