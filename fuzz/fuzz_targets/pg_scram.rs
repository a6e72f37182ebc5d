//! Any server-first and server-final message through the proxy's SCRAM-SHA-256 client
//! (`postgres::scram`), with each channel binding, against a server written here from
//! RFC 5802 that holds the password; any bytes as a certificate for
//! `tls-server-end-point`.
//!
//! Properties: the client answers only a server-first-message libpq would answer
//! (`r=<its nonce extended>,s=<base64>,i=<1..=1000000>`, nothing else), and then with a
//! client-final-message (`c=<GS2 header and binding>,r=<that nonce>,p=<proof>`) whose
//! proof the server accepts; it accepts only the server's own signature as the
//! server-final-message (`v=<signature>`), and none before it has answered; a server
//! error is reported cut to 100 characters; the end-point hash is SHA-256, -384 or -512.
#![no_main]

use std::num::NonZeroU32;
use std::sync::OnceLock;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use portcullis::config::Secret;
use portcullis::postgres::scram::{server_end_point, Binding, Exchange, KeyCache, ScramError};

const PASSWORD: &str = "pencil";
const CLIENT_NONCE: &str = "fuzznonce";
/// Above this iteration count an input is skipped: each is a PBKDF2 derivation.
const CHEAP_ITERATIONS: u32 = 64;

struct World {
    rt: tokio::runtime::Runtime,
    cache: KeyCache,
    password: Secret,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| World {
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt"),
        cache: KeyCache::default(),
        password: Secret::new(PASSWORD),
    })
}

/// Bytes below 4 in a message stand for well-formed attributes, so that the fuzzer
/// reaches the answers.
fn splice(text: &str, pieces: [&str; 3]) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '\u{1}'..='\u{3}' => out.push_str(pieces[c as usize - 1]),
            c => out.push(c),
        }
    }
    out
}

/// What the server holds for `PASSWORD`: StoredKey and ServerKey (RFC 5802 §3).
fn server_keys(salt: &[u8], iterations: NonZeroU32) -> ([u8; 32], [u8; 32]) {
    let mut salted = [0u8; 32];
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, salt, PASSWORD.as_bytes(), &mut salted);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let mut stored = [0u8; 32];
    stored.copy_from_slice(digest::digest(&digest::SHA256, client_key.as_ref()).as_ref());
    let mut server = [0u8; 32];
    server.copy_from_slice(hmac::sign(&key, b"Server Key").as_ref());
    (stored, server)
}

fn hmac256(key: &[u8], msg: &str) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg.as_bytes()).as_ref().to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if let Some(hash) = server_end_point(rest) {
        assert!(matches!(hash.len(), 32 | 48 | 64), "{}", hash.len());
    }
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (first, last) = text.split_once('\0').unwrap_or((text, ""));
    let nonce = format!("r={CLIENT_NONCE}srv");
    let server_first = splice(first, [&nonce, "s=c2FsdA==", "i=16"]);
    let costly = server_first.split(',').any(|a| {
        a.strip_prefix("i=")
            .and_then(|i| i.parse::<u32>().ok())
            .is_some_and(|i| i > CHEAP_ITERATIONS)
    });
    if costly {
        return;
    }
    let binding = match mode % 3 {
        0 => Binding::None,
        1 => Binding::NotOffered,
        _ => Binding::ServerEndPoint(vec![0xab; 32]),
    };
    let (gs2, cbind): (&str, &[u8]) = match &binding {
        Binding::None => ("n,,", &[]),
        Binding::NotOffered => ("y,,", &[]),
        Binding::ServerEndPoint(h) => ("p=tls-server-end-point,,", &h[..]),
    };
    let w = world();
    let mut exchange = Exchange::with_nonce(CLIENT_NONCE.into(), binding.clone());
    assert_eq!(exchange.client_first(), format!("{gs2}n=,r={CLIENT_NONCE}"));

    // Before an answer, no server-final-message is accepted.
    let unanswered = Exchange::with_nonce(CLIENT_NONCE.into(), binding.clone());
    assert!(unanswered.verify_server_final(&splice(last, ["v=", "v=", "v="])).is_err());

    let answer = w.rt.block_on(exchange.client_final(&server_first, &w.password, &w.cache));
    let Ok(client_final) = answer else {
        if let Some(e) = last.strip_prefix("e=") {
            let got = exchange.verify_server_final(last);
            assert_eq!(got, Err(ScramError::ServerError(e.chars().take(100).collect())));
        } else {
            assert!(exchange.verify_server_final(last).is_err());
        }
        return;
    };

    // The server-first-message is exactly what libpq answers.
    let attrs: Vec<&str> = server_first.split(',').collect();
    let [r, s, i] = attrs[..] else { panic!("answered {server_first:?}") };
    let (Some(r), Some(s), Some(i)) =
        (r.strip_prefix("r="), s.strip_prefix("s="), i.strip_prefix("i="))
    else {
        panic!("answered {server_first:?}")
    };
    assert!(r.starts_with(CLIENT_NONCE) && r.len() > CLIENT_NONCE.len(), "{server_first:?}");
    let salt = B64.decode(s).unwrap_or_else(|_| panic!("answered {server_first:?}"));
    let iterations = i.parse::<NonZeroU32>().unwrap_or_else(|_| panic!("{server_first:?}"));

    // The client-final-message, and its proof as the server checks it.
    let mut binding_data = gs2.as_bytes().to_vec();
    binding_data.extend_from_slice(cbind);
    let without_proof = format!("c={},r={r}", B64.encode(&binding_data));
    let proof = client_final
        .strip_prefix(&format!("{without_proof},p="))
        .unwrap_or_else(|| panic!("{client_final:?}"));
    let proof = B64.decode(proof).expect("proof is base64");
    assert_eq!(proof.len(), 32);
    let (stored, server_key) = server_keys(&salt, iterations);
    let auth = format!("n=,r={CLIENT_NONCE},{server_first},{without_proof}");
    let client_key: Vec<u8> =
        proof.iter().zip(hmac256(&stored, &auth)).map(|(p, s)| p ^ s).collect();
    assert_eq!(digest::digest(&digest::SHA256, &client_key).as_ref(), stored, "proof refused");

    // Only the server's own signature is accepted, and only as `v=<signature>`.
    let signature = format!("v={}", B64.encode(hmac256(&server_key, &auth)));
    let server_final = splice(last, [&signature, &signature, &signature]);
    if exchange.verify_server_final(&server_final).is_ok() {
        assert_eq!(server_final, signature);
    }
});
