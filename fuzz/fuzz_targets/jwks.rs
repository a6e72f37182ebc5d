//! What an issuer serves for its keys: the key set document (JWKS), the discovery
//! document naming it, and the `Cache-Control` that bounds how long it is kept.
//!
//! A key set is drawn from the bytes, key by key: each member (`kty`; the RSA modulus and
//! exponent, the curve and coordinates; `kid`, `use`, `key_ops`, `alg`, a private member)
//! one of a few pieces, valid or not in one known way (a 1024- or 8200-bit modulus, an
//! even one, an empty one, an exponent of 1, 2 or 2³³+1, a point off its curve, a
//! coordinate of the wrong length, ...), padded with junk to the 100-key cap or past it;
//! or any bytes as the document. Under an algorithm allowlist drawn from the bytes:
//!
//! - the bearer path's reading ([`portcullis::identity::verify::read_key_set`]) keeps the
//!   keys, with the algorithms, a naive reference written from §11.5 keeps (a key only
//!   without private members, with a `kid` of 1–256 bytes, `use` absent or `sig`,
//!   `key_ops` absent or listing `verify`, a supported `kty`, `alg` absent or
//!   allowlisted and of the key's type, RSA of 2048–8192 bits with an odd modulus and an
//!   odd exponent 3 ≤ e < 2³³, EC on P-256/P-384 with coordinates of its size and on the
//!   curve, Ed25519 of 32 bytes; the first of each `kid`; the whole set refused over 100
//!   entries or with nothing kept). For any bytes, what it keeps has a usable `kid` and
//!   only allowlisted algorithms of one key type;
//! - the browser sign-in's reading ([`portcullis::session::oidc::sign_in_key_ids`])
//!   keeps the same keys, and besides them only the ones without a `kid`;
//! - a discovery document gives a `jwks_uri` only when it names exactly the configured
//!   issuer, and only an https one without credentials (plain http to a loopback host
//!   with `insecure_http`);
//! - a key set's freshness is within 5 minutes – 24 hours whatever the `Cache-Control`.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use portcullis::dev::signer::DevSigner;
use portcullis::identity::verify::{key_set_ttl, read_discovery, read_key_set};
use portcullis::identity::{Algorithm, MAX_KID_LEN};
use portcullis::session::oidc::sign_in_key_ids;
use serde_json::{json, Map, Value};

const ALL: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

const ISSUER: &str = "https://issuer.fuzz.test/realm";

/// Valid key material, made once.
struct Material {
    n2048: Vec<u8>,
    e: Vec<u8>,
    p256: (Vec<u8>, Vec<u8>),
    p384: (Vec<u8>, Vec<u8>),
    ed: Vec<u8>,
}

fn material() -> &'static Material {
    static M: OnceLock<Material> = OnceLock::new();
    M.get_or_init(|| {
        let member = |s: &DevSigner, name: &str| {
            B64.decode(s.public_jwk()[name].as_str().expect("member")).expect("base64")
        };
        let rsa = DevSigner::generate(Algorithm::RS256, "r").expect("rsa");
        let p256 = DevSigner::generate(Algorithm::ES256, "p").expect("p256");
        let p384 = DevSigner::generate(Algorithm::ES384, "q").expect("p384");
        let ed = DevSigner::generate(Algorithm::EdDSA, "e").expect("ed");
        Material {
            n2048: member(&rsa, "n"),
            e: member(&rsa, "e"),
            p256: (member(&p256, "x"), member(&p256, "y")),
            p384: (member(&p384, "x"), member(&p384, "y")),
            ed: member(&ed, "x"),
        }
    })
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
}

fn b64(b: &[u8]) -> Value {
    Value::String(B64.encode(b))
}

/// An odd number of `bits` bits (top and bottom bit set).
fn odd_number(bits: usize) -> Vec<u8> {
    let mut n = vec![0x5au8; bits.div_ceil(8)];
    let top = bits - (n.len() - 1) * 8; // bits used in the first byte, 1..=8
    n[0] = (n[0] & ((1u16 << top) - 1) as u8) | (1 << (top - 1));
    if let Some(last) = n.last_mut() {
        *last |= 1;
    }
    n
}

/// One key drawn from 8 bytes, and whether the reference finds its material usable
/// (with the algorithm its curve fixes, for EC and OKP).
struct Drawn {
    jwk: Map<String, Value>,
    /// `kty` when it is one of the three supported, and its material is usable.
    usable: Option<&'static str>,
    /// The algorithm an EC or OKP key's curve fixes.
    curve_alg: Option<Algorithm>,
}

fn draw_key(b: &mut Bytes<'_>) -> Drawn {
    let m = material();
    let (kty, mat, extra, kid, use_, ops, alg, private) =
        (b.byte(), b.byte(), b.byte(), b.byte(), b.byte(), b.byte(), b.byte(), b.byte());
    let mut jwk = Map::new();
    let mut usable = None;
    let mut curve_alg = None;
    match kty % 7 {
        0 => {
            jwk.insert("kty".into(), json!("RSA"));
            let n_ok = match mat % 9 {
                0 => {
                    jwk.insert("n".into(), b64(&m.n2048));
                    true
                }
                1 => {
                    // Padded with a zero byte, as some publishers do.
                    jwk.insert("n".into(), b64(&[&[0u8][..], &m.n2048].concat()));
                    true
                }
                2 => {
                    jwk.insert("n".into(), json!(""));
                    false
                }
                3 => {
                    jwk.insert("n".into(), b64(&[0]));
                    false
                }
                4 => {
                    jwk.insert("n".into(), b64(&odd_number(1024)));
                    false
                }
                5 => {
                    jwk.insert("n".into(), b64(&odd_number(8200)));
                    false
                }
                6 => {
                    let mut even = m.n2048.clone();
                    if let Some(last) = even.last_mut() {
                        *last &= 0xfe;
                    }
                    jwk.insert("n".into(), b64(&even));
                    false
                }
                7 => {
                    jwk.insert("n".into(), json!("!!"));
                    false
                }
                _ => false,
            };
            let e_ok = match extra % 10 {
                0 => {
                    jwk.insert("e".into(), b64(&m.e));
                    true
                }
                1 => {
                    jwk.insert("e".into(), b64(&[3]));
                    true
                }
                2 => {
                    jwk.insert("e".into(), b64(&[2]));
                    false
                }
                3 => {
                    jwk.insert("e".into(), b64(&[1]));
                    false
                }
                4 => {
                    jwk.insert("e".into(), b64(&[0, 1, 0, 1]));
                    true
                }
                5 => {
                    // 2^33 - 1: the largest the verifier takes.
                    jwk.insert("e".into(), b64(&[1, 0xff, 0xff, 0xff, 0xff]));
                    true
                }
                6 => {
                    jwk.insert("e".into(), b64(&[2, 0, 0, 0, 1]));
                    false
                }
                7 => {
                    jwk.insert("e".into(), b64(&[1, 0, 0, 0, 0, 0, 0, 0, 1]));
                    false
                }
                8 => {
                    jwk.insert("e".into(), json!(""));
                    false
                }
                _ => false,
            };
            if n_ok && e_ok {
                usable = Some("RSA");
            }
        }
        1 => {
            jwk.insert("kty".into(), json!("EC"));
            let crv = match mat % 6 {
                0 => Some(Algorithm::ES256),
                1 => Some(Algorithm::ES384),
                _ => None,
            };
            match mat % 6 {
                0 => jwk.insert("crv".into(), json!("P-256")),
                1 => jwk.insert("crv".into(), json!("P-384")),
                2 => jwk.insert("crv".into(), json!("P-521")),
                3 => None,
                4 => jwk.insert("crv".into(), json!("p-256")),
                _ => jwk.insert("crv".into(), json!(256)),
            };
            let fits = match extra % 6 {
                0 => {
                    jwk.insert("x".into(), b64(&m.p256.0));
                    jwk.insert("y".into(), b64(&m.p256.1));
                    Some(Algorithm::ES256)
                }
                1 => {
                    jwk.insert("x".into(), b64(&m.p384.0));
                    jwk.insert("y".into(), b64(&m.p384.1));
                    Some(Algorithm::ES384)
                }
                2 => {
                    // Off the curve.
                    let mut y = m.p256.1.clone();
                    if let Some(last) = y.last_mut() {
                        *last ^= 1;
                    }
                    jwk.insert("x".into(), b64(&m.p256.0));
                    jwk.insert("y".into(), b64(&y));
                    None
                }
                3 => {
                    jwk.insert("x".into(), b64(&m.p256.0[1..]));
                    jwk.insert("y".into(), b64(&m.p256.1));
                    None
                }
                4 => {
                    jwk.insert("x".into(), b64(&m.p256.0));
                    None
                }
                _ => {
                    jwk.insert("x".into(), b64(&m.p256.0));
                    jwk.insert("y".into(), b64(&m.p384.1));
                    None
                }
            };
            if crv.is_some() && crv == fits {
                usable = Some("EC");
                curve_alg = crv;
            }
        }
        2 => {
            jwk.insert("kty".into(), json!("OKP"));
            let crv_ok = match mat % 4 {
                0 => {
                    jwk.insert("crv".into(), json!("Ed25519"));
                    true
                }
                1 => {
                    jwk.insert("crv".into(), json!("Ed448"));
                    false
                }
                2 => {
                    jwk.insert("crv".into(), json!("X25519"));
                    false
                }
                _ => false,
            };
            let x_ok = match extra % 4 {
                0 => {
                    jwk.insert("x".into(), b64(&m.ed));
                    true
                }
                1 => {
                    jwk.insert("x".into(), b64(&m.ed[1..]));
                    false
                }
                2 => {
                    jwk.insert("x".into(), b64(&[&m.ed[..], &[0]].concat()));
                    false
                }
                _ => false,
            };
            if crv_ok && x_ok {
                usable = Some("OKP");
                curve_alg = Some(Algorithm::EdDSA);
            }
        }
        3 => {
            jwk.insert("kty".into(), json!("oct"));
        }
        4 => {}
        5 => {
            jwk.insert("kty".into(), json!("rsa"));
            jwk.insert("n".into(), b64(&m.n2048));
            jwk.insert("e".into(), b64(&m.e));
        }
        _ => {
            jwk.insert("kty".into(), json!(1));
        }
    }
    match kid % 8 {
        0 => None,
        1 => jwk.insert("kid".into(), json!("")),
        2 => jwk.insert("kid".into(), json!("k1")),
        3 => jwk.insert("kid".into(), json!("k2")),
        4 => jwk.insert("kid".into(), json!("k3")),
        5 => jwk.insert("kid".into(), json!("x".repeat(MAX_KID_LEN))),
        6 => jwk.insert("kid".into(), json!("x".repeat(MAX_KID_LEN + 1))),
        _ => jwk.insert("kid".into(), json!(1)),
    };
    match use_ % 5 {
        0 => None,
        1 => jwk.insert("use".into(), json!("sig")),
        2 => jwk.insert("use".into(), json!("enc")),
        3 => jwk.insert("use".into(), json!("SIG")),
        _ => jwk.insert("use".into(), json!(1)),
    };
    match ops % 7 {
        0 => None,
        1 => jwk.insert("key_ops".into(), json!(["verify"])),
        2 => jwk.insert("key_ops".into(), json!(["sign"])),
        3 => jwk.insert("key_ops".into(), json!([])),
        4 => jwk.insert("key_ops".into(), json!("verify")),
        5 => jwk.insert("key_ops".into(), json!(["sign", "verify"])),
        _ => jwk.insert("key_ops".into(), json!([1])),
    };
    match alg % 13 {
        0 => None,
        i @ 1..=9 => jwk.insert("alg".into(), json!(ALL[usize::from(i) - 1].name())),
        10 => jwk.insert("alg".into(), json!("HS256")),
        11 => jwk.insert("alg".into(), json!("none")),
        _ => jwk.insert("alg".into(), json!(256)),
    };
    match private % 10 {
        0 => jwk.insert("d".into(), json!("AQAB")),
        1 => jwk.insert("p".into(), json!("AQAB")),
        2 => jwk.insert("k".into(), json!("AQAB")),
        3 => jwk.insert("oth".into(), json!([])),
        4 => jwk.insert("dq".into(), json!("AQAB")),
        _ => None,
    };
    Drawn { jwk, usable, curve_alg }
}

/// The reference reading of one key: `None` when it is refused, else the algorithms it
/// verifies (in the allowlist's order). `need_kid`: the bearer path's reading; the
/// sign-in's reads a key without a `kid` as if it had one.
fn reference(d: &Drawn, allowlist: &[Algorithm], need_kid: bool) -> Option<Vec<Algorithm>> {
    let jwk = &d.jwk;
    const PRIVATE: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
    if PRIVATE.iter().any(|m| jwk.contains_key(*m)) {
        return None;
    }
    match jwk.get("kid") {
        None if !need_kid => {}
        Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KID_LEN => {}
        _ => return None,
    }
    match jwk.get("use") {
        None => {}
        Some(u) if u == "sig" => {}
        Some(_) => return None,
    }
    match jwk.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|o| o == "verify") => {}
        Some(_) => return None,
    }
    let named = match jwk.get("alg") {
        None => None,
        Some(Value::String(a)) => match ALL.iter().find(|x| x.name() == a) {
            Some(a) if allowlist.contains(a) => Some(*a),
            _ => return None,
        },
        Some(_) => return None,
    };
    let kty = d.usable?;
    let candidates: Vec<Algorithm> = allowlist
        .iter()
        .copied()
        .filter(|a| a.key_type() == kty && named.is_none_or(|n| n == *a))
        .collect();
    let algs = match d.curve_alg {
        None => candidates,
        Some(c) => candidates.into_iter().filter(|a| *a == c).collect(),
    };
    (!algs.is_empty()).then_some(algs)
}

/// The discovery document's `jwks_uri` pieces, and whether the key fetch takes each
/// without and with `insecure_http`.
const URIS: &[(&str, bool, bool)] = &[
    ("https://issuer.fuzz.test/jwks", true, true),
    ("https://issuer.fuzz.test:8443/k?x=1", true, true),
    ("HTTPS://issuer.fuzz.test/jwks", true, true),
    ("http://127.0.0.1:9/jwks", false, true),
    ("http://127.1.2.3/", false, true),
    ("http://localhost/jwks", false, true),
    ("http://LOCALHOST:80/jwks", false, true),
    ("http://[::1]:9/jwks", false, true),
    ("http://[::ffff:127.0.0.1]/", false, false),
    ("http://0x7f.1/", false, false),
    ("http://localhost.evil.test/", false, false),
    ("http://example.com/jwks", false, false),
    ("https://user:pw@issuer.fuzz.test/jwks", false, false),
    ("https://issuer.fuzz.test@evil.test/jwks", false, false),
    ("http://user@localhost/jwks", false, false),
    ("/jwks", false, false),
    ("//issuer.fuzz.test/jwks", false, false),
    ("ftp://issuer.fuzz.test/jwks", false, false),
    ("https://", false, false),
    ("", false, false),
];

fn check_discovery(b: &mut Bytes<'_>, insecure: bool, raw: &[u8]) {
    let (iss, uri, shape) = (b.byte(), b.byte(), b.byte());
    let mut doc = Map::new();
    let iss_ok = match iss % 6 {
        0 => {
            doc.insert("issuer".into(), json!(ISSUER));
            true
        }
        1 => {
            doc.insert("issuer".into(), json!(format!("{ISSUER}/")));
            false
        }
        2 => {
            doc.insert("issuer".into(), json!(ISSUER.to_uppercase()));
            false
        }
        3 => false,
        4 => {
            doc.insert("issuer".into(), json!([ISSUER]));
            false
        }
        _ => {
            doc.insert("issuer".into(), json!(format!("{ISSUER} ")));
            false
        }
    };
    let pick = usize::from(uri) % (URIS.len() + 2);
    let expected_uri = match URIS.get(pick) {
        Some((u, plain, with_insecure)) => {
            doc.insert("jwks_uri".into(), json!(u));
            Some(if insecure { *with_insecure } else { *plain })
        }
        None if pick == URIS.len() => {
            doc.insert("jwks_uri".into(), json!(null));
            Some(false)
        }
        // Any text: only the general property below.
        None => {
            doc.insert("jwks_uri".into(), json!(String::from_utf8_lossy(raw)));
            None
        }
    };
    let body = match shape % 4 {
        0 => serde_json::to_vec(&doc).expect("json"),
        1 => serde_json::to_vec(&json!([doc])).expect("json"),
        // Another issuer named first: the document's last member is the one read (as
        // by serde), so only a document without the duplicate is checked exactly.
        2 => {
            let text = serde_json::to_string(&doc).expect("json");
            format!("{{\"issuer\":\"https://evil.test\",{}", text.get(1..).unwrap_or("}"))
                .into_bytes()
        }
        _ => raw.to_vec(),
    };
    let got = read_discovery(&body, ISSUER, insecure);
    if let Ok(u) = &got {
        let parsed: http::Uri = u.parse().expect("the jwks_uri given back parses");
        let authority = parsed.authority().expect("an authority");
        assert!(!authority.as_str().contains('@'), "credentials in {u:?}");
        match parsed.scheme_str() {
            Some("https") => {}
            Some("http") if insecure => {
                let host = authority.host().trim_start_matches('[').trim_end_matches(']');
                assert!(
                    host.eq_ignore_ascii_case("localhost")
                        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()),
                    "plain http to {host:?}"
                );
            }
            _ => panic!("jwks_uri {u:?} taken"),
        }
    }
    let exact = match shape % 4 {
        0 => expected_uri.map(|u| iss_ok && u),
        1 => Some(false),
        2 if doc.contains_key("issuer") => expected_uri.map(|u| iss_ok && u),
        2 => Some(false),
        _ => None,
    };
    if let Some(ok) = exact {
        assert_eq!(got.is_ok(), ok, "discovery {} gave {got:?}", String::from_utf8_lossy(&body));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let mask = u16::from_le_bytes([b.byte(), b.byte()]) & 0x1ff;
    let allowlist: Vec<Algorithm> = if mask == 0 {
        ALL.to_vec()
    } else {
        ALL.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, a)| *a).collect()
    };
    let flags = b.byte();
    let insecure = flags & 1 != 0;
    let raw_mode = flags & 2 != 0;

    // The Cache-Control values: the bytes after the last 0xff, cut at 0xfe.
    let (head, tail) = match b.0.iter().rposition(|&x| x == 0xff) {
        Some(i) => (&b.0[..i], &b.0[i + 1..]),
        None => (b.0, &[][..]),
    };
    let mut headers = http::HeaderMap::new();
    for v in tail.split(|&x| x == 0xfe) {
        if let Ok(v) = http::HeaderValue::from_bytes(v) {
            headers.append(http::header::CACHE_CONTROL, v);
        }
    }
    let ttl = key_set_ttl(&headers);
    assert!(
        (Duration::from_secs(300)..=Duration::from_secs(86_400)).contains(&ttl),
        "ttl {ttl:?} for {headers:?}"
    );
    let mut b = Bytes(head);

    let (body, expected, expected_sign_in) = if raw_mode {
        // The same bytes as a discovery document and as a key set.
        let control = [b.byte(), b.byte(), b.byte()];
        check_discovery(&mut Bytes(&control), insecure, b.0);
        (b.0.to_vec(), None, None)
    } else {
        let (shape, count) = (b.byte(), b.byte());
        check_discovery(&mut b, insecure, &[]);
        let drawn: Vec<Drawn> = (0..count % 6).map(|_| draw_key(&mut b)).collect();
        let mut entries: Vec<Value> = drawn.iter().map(|d| Value::Object(d.jwk.clone())).collect();
        match (shape >> 2) % 4 {
            0 => {}
            1 => entries.push(json!("junk")),
            2 => entries.resize(100.max(entries.len()), json!(null)),
            _ => entries.resize(101.max(entries.len()), json!(1)),
        }
        let too_many = entries.len() > 100;
        let doc = match shape % 4 {
            1 => json!({ "keys": {} }),
            2 => json!({ "key": entries }),
            _ => json!({ "keys": entries }),
        };
        let has_array = !matches!(shape % 4, 1 | 2);
        // The bearer path: the first usable key of each kid.
        let mut kept: Vec<(String, Vec<Algorithm>)> = Vec::new();
        // The sign-in: every usable key, kid-less ones too, the first of each kid.
        let mut sign_in: Vec<Option<String>> = Vec::new();
        for d in &drawn {
            let kid = d.jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
            if let Some(algs) = reference(d, &allowlist, true) {
                let kid = kid.clone().expect("a kept key has a kid");
                if !kept.iter().any(|(k, _)| *k == kid) {
                    kept.push((kid, algs));
                }
            }
            if reference(d, &allowlist, false).is_some()
                && (kid.is_none() || !sign_in.iter().any(|k| *k == kid))
            {
                sign_in.push(kid);
            }
        }
        kept.sort();
        let bearer_ok = has_array && !too_many && !kept.is_empty();
        let sign_in_ok = has_array && !too_many;
        (
            serde_json::to_vec(&doc).expect("json"),
            Some(bearer_ok.then_some(kept)),
            Some(sign_in_ok.then_some(sign_in)),
        )
    };

    let got = read_key_set(&body, &allowlist);
    if let Ok(keys) = &got {
        assert!(!keys.is_empty() && keys.len() <= 100);
        for (kid, algs) in keys {
            assert!(!kid.is_empty() && kid.len() <= MAX_KID_LEN);
            assert!(!algs.is_empty() && algs.iter().all(|a| allowlist.contains(a)), "{algs:?}");
            assert!(algs.iter().all(|a| a.key_type() == algs[0].key_type()), "{algs:?}");
        }
    }
    if let Some(expected) = &expected {
        assert_eq!(
            got.as_ref().ok(),
            expected.as_ref(),
            "bearer keys of {}",
            String::from_utf8_lossy(&body)
        );
    }

    let sign_in = sign_in_key_ids(&body, &allowlist);
    if let Some(expected) = &expected_sign_in {
        assert_eq!(
            sign_in.as_ref().ok(),
            expected.as_ref(),
            "sign-in keys of {}",
            String::from_utf8_lossy(&body)
        );
    }
    // Whatever the document: the sign-in verifies with the keys the bearer path keeps,
    // and besides them only ones without a kid.
    if let (Ok(bearer), Ok(sign_in)) = (&got, &sign_in) {
        let named: Vec<&str> = sign_in.iter().flatten().map(String::as_str).collect();
        let mut sorted = named.clone();
        sorted.sort_unstable();
        let bearer: Vec<&str> = bearer.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(sorted, bearer, "sign-in and bearer keys of {}", String::from_utf8_lossy(&body));
    }
});
