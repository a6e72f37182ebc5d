//! Strict compact-JWS parsing and the issuer-independent header checks.
//!
//! Everything here runs before any key is looked up, so a malformed or hostile token
//! costs a few microseconds of parsing and never a signature operation. Nothing parsed
//! here is trusted; it is only used to *reject* (RFC 8725 §3.10).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{Algorithm, AuthError};
use crate::reason::Reason;

/// Largest token accepted anywhere (V1). Real ID and CI tokens are 1–4 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Longest `kid` accepted (V7); it is only ever a map key.
pub const MAX_KID_LEN: usize = 256;

/// A compact JWS split and decoded, not yet verified.
#[derive(Debug)]
pub(crate) struct Parsed<'t> {
    /// `b64(header).b64(payload)`: the bytes the signature covers.
    pub signing_input: &'t str,
    pub header: Map<String, Value>,
    pub payload: Map<String, Value>,
    /// The decoded payload JSON `payload` was parsed from, kept for [`super::Claims`].
    pub payload_json: Box<str>,
    pub signature: Vec<u8>,
}

/// The header members the verifier acts on, after the issuer-independent checks.
#[derive(Debug)]
pub(crate) struct JoseHeader<'h> {
    pub alg: Algorithm,
    pub kid: &'h str,
    pub typ: Option<&'h Value>,
}

fn malformed(detail: &'static str) -> AuthError {
    AuthError::new(Reason::MalformedToken, detail)
}

/// V1–V3: size cap, exactly three base64url segments without padding, each of
/// header and payload a JSON object without duplicate member names.
pub(crate) fn parse(token: &str) -> Result<Parsed<'_>, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed("token larger than 16 KiB"));
    }
    // Checking the alphabet first rejects the JSON serialization and anything with
    // whitespace or padding before any decoding work.
    if !is_compact_alphabet(token.as_bytes()) {
        return Err(malformed("token is not compact JWS (characters outside base64url)"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        // Five segments would be a JWE (V2, V10): never accepted.
        return Err(malformed("token does not have exactly three segments"));
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(malformed("empty JWS segment"));
    }
    let (header, _) = decode_object(h, "header")?;
    let (payload, payload_json) = decode_object(p, "payload")?;
    // serde_json rejected invalid UTF-8 anywhere in the text, so this cannot fail.
    let payload_json = String::from_utf8(payload_json)
        .map_err(|_| malformed("payload is not UTF-8"))?
        .into_boxed_str();
    // The no-padding engine also rejects non-canonical trailing bits, so one token has
    // exactly one encoding.
    let signature =
        URL_SAFE_NO_PAD.decode(s).map_err(|_| malformed("signature is not base64url"))?;
    Ok(Parsed {
        signing_input: &token[..h.len() + 1 + p.len()],
        header,
        payload,
        payload_json,
        signature,
    })
}

/// Whether every byte is base64url or `.` (a compact JWS). Runs over every new token, a
/// kilobyte or more, so it is written to vectorize: lane-wise range checks folded without
/// an early exit, a chunk at a time (a byte-wise `all` cost ≈ 10 instructions a byte).
fn is_compact_alphabet(bytes: &[u8]) -> bool {
    let ok = |b: u8| {
        let letter = (b | 0x20).wrapping_sub(b'a') < 26;
        let digit = b.wrapping_sub(b'0') < 10;
        letter | digit | (b == b'-') | (b == b'_') | (b == b'.')
    };
    bytes.chunks(64).all(|chunk| chunk.iter().fold(true, |all, &b| all & ok(b)))
}

/// The object and the decoded JSON bytes it was parsed from.
fn decode_object(
    segment: &str,
    what: &'static str,
) -> Result<(Map<String, Value>, Vec<u8>), AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| {
        malformed(if what == "header" {
            "header is not base64url"
        } else {
            "payload is not base64url"
        })
    })?;
    match parse_strict_json(&bytes) {
        Ok(Value::Object(map)) => Ok((map, bytes)),
        Ok(_) => Err(malformed(if what == "header" {
            "header is not a JSON object"
        } else {
            "payload is not a JSON object"
        })),
        Err(StrictJsonError::Duplicate) => Err(malformed("duplicate JSON member name")),
        Err(StrictJsonError::Syntax) => Err(malformed(if what == "header" {
            "header is not JSON"
        } else {
            "payload is not JSON"
        })),
    }
}

/// V4 (global part), V7, V8, V9, V10. The per-issuer parts (alg allowlist, `typ`)
/// need the issuer and are checked by the verifier.
pub(crate) fn check_header(header: &Map<String, Value>) -> Result<JoseHeader<'_>, AuthError> {
    // V8: keys come only from the configured jwks_uri, never from the token.
    for name in ["jku", "x5u", "jwk", "x5c"] {
        if header.contains_key(name) {
            return Err(AuthError::new(
                Reason::ForbiddenHeader,
                format!("header carries `{name}`; keys come only from the issuer's JWKS"),
            ));
        }
    }
    // V9: the proxy understands no extension, so any `crit` (even `[]`) is fatal.
    if header.contains_key("crit") {
        return Err(AuthError::new(Reason::ForbiddenHeader, "header carries `crit`"));
    }
    // V10: no nested JWTs or other content types.
    if header.contains_key("cty") {
        return Err(AuthError::new(Reason::ForbiddenHeader, "header carries `cty`"));
    }
    // V4: exact, case-sensitive; `none` and `HS*` are not representable.
    let alg = match header.get("alg") {
        Some(Value::String(s)) => Algorithm::parse(s).ok_or_else(|| {
            AuthError::new(Reason::DisallowedAlgorithm, "algorithm is not supported")
        })?,
        Some(_) => return Err(malformed("`alg` is not a string")),
        None => return Err(malformed("header has no `alg`")),
    };
    // V7: required, bounded, opaque.
    let kid = match header.get("kid") {
        Some(Value::String(s)) if s.is_empty() => return Err(malformed("`kid` is empty")),
        Some(Value::String(s)) if s.len() > MAX_KID_LEN => {
            return Err(malformed("`kid` longer than 256 bytes"))
        }
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(malformed("`kid` is not a string")),
        None => return Err(malformed("header has no `kid`")),
    };
    Ok(JoseHeader { alg, kid, typ: header.get("typ") })
}

// === strict JSON ===

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StrictJsonError {
    Syntax,
    Duplicate,
}

/// Parse JSON like serde_json, but fail on duplicate member names at any depth
/// (RFC 7515 §5.2; RFC 8725 §3.7): two parsers that pick different duplicates would
/// disagree about what a token says.
pub(crate) fn parse_strict_json(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict::deserialize(&mut de).map_err(|e| {
        if e.to_string().starts_with(DUPLICATE) {
            StrictJsonError::Duplicate
        } else {
            StrictJsonError::Syntax
        }
    })?;
    de.end().map_err(|_| StrictJsonError::Syntax)?;
    Ok(value.0)
}

const DUPLICATE: &str = "duplicate member name";

struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        // Keys are compared after unescaping, so `"\u0061lg"` duplicates `"alg"`. One
        // lookup per member: the vacant entry found by the duplicate check takes the value.
        while let Some(key) = map.next_key::<String>()? {
            let serde_json::map::Entry::Vacant(slot) = out.entry(key) else {
                return Err(de::Error::custom(DUPLICATE));
            };
            let Strict(v) = map.next_value()?;
            slot.insert(v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_json_rejects_duplicates_at_any_depth_and_trailing_data() {
        assert_eq!(parse_strict_json(br#"{"a":1,"a":1}"#), Err(StrictJsonError::Duplicate));
        assert_eq!(parse_strict_json(br#"{"x":{"b":1,"b":2}}"#), Err(StrictJsonError::Duplicate));
        assert_eq!(parse_strict_json(br#"[{"b":1,"\u0062":2}]"#), Err(StrictJsonError::Duplicate));
        assert_eq!(parse_strict_json(br#"{"a":1} x"#), Err(StrictJsonError::Syntax));
        assert_eq!(parse_strict_json(b"{\"a\":\"\xff\"}"), Err(StrictJsonError::Syntax));
        let ok = parse_strict_json(br#"{"a":[1,-2,3.5,"s",null,true,{"b":{}}]}"#);
        assert_eq!(ok, Ok(serde_json::json!({"a":[1,-2,3.5,"s",null,true,{"b":{}}]})));
    }

    #[test]
    fn the_vectorized_alphabet_check_agrees_with_a_byte_table() {
        let table = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        // Every byte, alone and at every position of a chunk boundary.
        for b in 0..=255u8 {
            assert_eq!(is_compact_alphabet(&[b]), table(b), "byte {b:#04x}");
            for len in [63usize, 64, 65, 130] {
                for at in [0, len / 2, len - 1] {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(is_compact_alphabet(&s), table(b), "{b:#04x} at {at}/{len}");
                }
            }
        }
    }

    #[test]
    fn parse_rejects_padding_bad_alphabet_and_wrong_segment_counts() {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k"}"#);
        let p = URL_SAFE_NO_PAD.encode(br#"{"iss":"x"}"#);
        assert!(parse(&format!("{h}.{p}.c2ln")).is_ok());
        for bad in [
            format!("{h}.{p}.c2ln="),
            format!("{h}.{p}"),
            format!("{h}.{p}.c2ln.x.y"),
            format!("{h}.{p}.c2l+"),
            format!("{h}..c2ln"),
            format!("{h}.{p}.cx"), // non-canonical trailing bits
            String::from("{\"payload\":\"x\"}"),
        ] {
            let err = parse(&bad).err().map(|e| e.reason);
            assert_eq!(err, Some(Reason::MalformedToken), "{bad}");
        }
    }
}
