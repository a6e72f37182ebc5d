//! Sealed cookie values: AES-256-GCM (aws-lc-rs) with a random 96-bit nonce, a key id,
//! and a purpose bound in as associated data, so a sign-in cookie can never be opened
//! as a session cookie (or the reverse).
//!
//! Format: `1` (version) followed by base64url(no pad) of `key_id[4] || nonce[12] ||
//! ciphertext || tag[16]`. The key id is the first 4 bytes of SHA-256 of the key, so
//! opening picks its key directly instead of trying the rotation list.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;

const VERSION: char = '1';
const KEY_ID_LEN: usize = 4;

/// Which key of the rotation list sealed a value: the first bytes of the key's SHA-256.
pub type KeyId = [u8; KEY_ID_LEN];
const TAG_LEN: usize = 16;
/// Refuse to decode anything larger (8 chunks of a 4 KB cookie).
pub const MAX_SEALED_LEN: usize = 32 * 1024;

/// What a sealed value is for; bound into the AEAD so values cannot be swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Session,
    Login,
}

impl Purpose {
    fn aad(self) -> &'static [u8] {
        match self {
            Purpose::Session => b"portcullis session v1",
            Purpose::Login => b"portcullis login v1",
        }
    }
}

/// The key rotation list: the first key seals, every key opens.
pub struct Sealer {
    keys: Vec<([u8; KEY_ID_LEN], LessSafeKey)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("keys", &self.keys.len()).finish()
    }
}

/// Why a value did not open. Deliberately coarse: the caller logs only the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a sealed value")]
    Malformed,
    #[error("sealed with a key that is not in the rotation list")]
    UnknownKey,
    #[error("authentication failed (tampered or another purpose)")]
    Tampered,
}

// === impl Sealer ===

impl Sealer {
    /// Parse the key list: base64 (standard or url-safe) 32-byte keys, separated by
    /// newlines, commas or spaces; `#` starts a comment line. Errors never echo a key.
    pub fn from_text(text: &str) -> Result<Sealer, String> {
        let mut keys = Vec::new();
        for (n, item) in text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split([',', ' ', '\t']))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let raw = STANDARD
                .decode(item)
                .or_else(|_| URL_SAFE.decode(item))
                .or_else(|_| URL_SAFE_NO_PAD.decode(item))
                .map_err(|_| format!("session key #{} is not base64", n + 1))?;
            if raw.len() != 32 {
                return Err(format!(
                    "session key #{} is {} bytes; AES-256 keys are 32 bytes (`openssl rand -base64 32`)",
                    n + 1,
                    raw.len()
                ));
            }
            keys.push(Self::key(&raw)?);
        }
        if keys.is_empty() {
            return Err("no session keys".into());
        }
        Ok(Sealer { keys })
    }

    /// A sealer from raw 32-byte keys (tests, benches, the demo).
    pub fn from_keys(raw: &[[u8; 32]]) -> Result<Sealer, String> {
        if raw.is_empty() {
            return Err("no session keys".into());
        }
        Ok(Sealer { keys: raw.iter().map(|k| Self::key(k)).collect::<Result<_, _>>()? })
    }

    fn key(raw: &[u8]) -> Result<([u8; KEY_ID_LEN], LessSafeKey), String> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        let key = UnboundKey::new(&AES_256_GCM, raw).map_err(|_| "bad AES-256 key".to_string())?;
        Ok((id, LessSafeKey::new(key)))
    }

    /// The key that seals (the first).
    pub fn sealing_key(&self) -> Option<KeyId> {
        self.keys.first().map(|(id, _)| *id)
    }

    /// Whether the key `id` is still in the rotation list (so what it sealed opens).
    pub fn knows(&self, id: &KeyId) -> bool {
        self.keys.iter().any(|(k, _)| k == id)
    }

    /// Encrypt and authenticate `plain` with the first key.
    pub fn seal(&self, purpose: Purpose, plain: &[u8]) -> Result<String, String> {
        let (id, key) = self.keys.first().ok_or("no session keys")?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| "no randomness")?;
        let mut buf = Vec::with_capacity(KEY_ID_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        buf.extend_from_slice(id);
        buf.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(purpose.aad()),
            &mut body,
        )
        .map_err(|_| "seal failed")?;
        buf.extend_from_slice(&body);
        let mut out = String::with_capacity(1 + buf.len() * 4 / 3 + 4);
        out.push(VERSION);
        URL_SAFE_NO_PAD.encode_string(&buf, &mut out);
        Ok(out)
    }

    /// Authenticate and decrypt a value sealed by any key of the list.
    pub fn open(&self, purpose: Purpose, sealed: &str) -> Result<Vec<u8>, OpenError> {
        self.open_keyed(purpose, sealed).map(|(plain, _)| plain)
    }

    /// [`Sealer::open`], and which key of the list opened it.
    pub fn open_keyed(
        &self,
        purpose: Purpose,
        sealed: &str,
    ) -> Result<(Vec<u8>, KeyId), OpenError> {
        if sealed.len() > MAX_SEALED_LEN {
            return Err(OpenError::Malformed);
        }
        let b64 = sealed.strip_prefix(VERSION).ok_or(OpenError::Malformed)?;
        let mut buf = URL_SAFE_NO_PAD.decode(b64).map_err(|_| OpenError::Malformed)?;
        if buf.len() < KEY_ID_LEN + NONCE_LEN + TAG_LEN {
            return Err(OpenError::Malformed);
        }
        let (id, key) = self
            .keys
            .iter()
            .find(|(id, _)| buf[..KEY_ID_LEN] == id[..])
            .ok_or(OpenError::UnknownKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&buf[KEY_ID_LEN..KEY_ID_LEN + NONCE_LEN]);
        let body = &mut buf[KEY_ID_LEN + NONCE_LEN..];
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(purpose.aad()), body)
            .map_err(|_| OpenError::Tampered)?;
        Ok((plain.to_vec(), *id))
    }
}

/// 32 random bytes, base64url: state, nonce, PKCE verifier, session ids.
pub fn random_token() -> Result<String, String> {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| "no randomness".to_string())?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

/// Constant-time comparison for state values.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}
