//! Any `Cookie` header, spliced from arbitrary bytes and pieces of real cookies, as a
//! browser request's session; any text as a sealed value.
//!
//! Properties: a session opens only if it was sealed for sessions by a key of the
//! rotation list (never one sealed by an unknown key, nor a sign-in value, nor anything
//! made up), and then it is one of the sessions sealed; a sealed value opens only as
//! itself; a value written to cookies (chunked or not) reads back the same.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, COOKIE};
use libfuzzer_sys::fuzz_target;
use portcullis::config::{SecretSource, SessionSettings};
use portcullis::session::cookie::{self, Attrs};
use portcullis::session::revoke::SessionId;
use portcullis::session::seal::{Purpose, Sealer};
use portcullis::session::{SessionData, Sessions};

struct World {
    sessions: Sessions,
    /// The rotation list of `sessions`.
    sealer: Sealer,
    /// Sessions that may open: sealed by either key of the list.
    genuine: Vec<SessionData>,
    /// Values that open as themselves, and for which purpose.
    sealed: Vec<(Purpose, String)>,
    /// `name=value` pieces of cookies the fuzzer splices in: byte `i` (1..) is piece `i-1`.
    pieces: Vec<String>,
}

fn data(subject: &str, groups: usize) -> SessionData {
    SessionData {
        issuer: "corp".into(),
        subject: subject.into(),
        email: None,
        email_verified: false,
        groups: (0..groups).map(|i| format!("group-{i:04}")).collect(),
        groups_known: true,
        created: 1_767_225_600,
        last_seen: 1_767_225_600,
        expires: 1_767_229_200,
        refresh: None,
        kept: None,
        claims: Default::default(),
        not_kept: Vec::new(),
        id: SessionId([7; 16]),
        acr: None,
        hd: None,
        source: None,
    }
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let settings = SessionSettings {
            cookie_name: "_portcullis".into(),
            cookie_domain: None,
            keys: SecretSource::Env("UNUSED".into()),
            absolute_lifetime: Duration::from_secs(3600),
            idle_lifetime: Duration::from_secs(600),
            refresh_before: Duration::from_secs(60),
        };
        let keys = [[7; 32], [8; 32]];
        let sessions = Sessions::with_sealer(settings, Sealer::from_keys(&keys).expect("keys"));
        let sealer = Sealer::from_keys(&keys).expect("keys");
        let old = Sealer::from_keys(&keys[1..]).expect("old key");
        let stranger = Sealer::from_keys(&[[9; 32]]).expect("unknown key");
        let name = sessions.cookie_name().to_string();
        let (alice, bob, carol, mallory) =
            (data("alice", 2), data("bob", 600), data("carol", 1), data("mallory", 1));
        let json = |d: &SessionData| serde_json::to_vec(d).expect("json");
        let seal = |s: &Sealer, p, d| s.seal(p, &json(d)).expect("seal");
        let carol_sealed = seal(&old, Purpose::Session, &carol);
        let mallory_login = seal(&sealer, Purpose::Login, &mallory);
        let mut pieces = Vec::new();
        let mut sealed = Vec::new();
        for d in [&alice, &bob] {
            let set = sessions.seal_session(d, &[]).expect("seal");
            let pairs = cookie_pairs(&set);
            let value = cookie::read(&cookie::parse(&cookie_header(&pairs)), &name);
            sealed.push((Purpose::Session, value.expect("sealed").expect("read back")));
            pieces.extend(pairs.into_iter().map(str::to_string));
        }
        assert!(pieces.len() > 3, "bob's session is chunked");
        pieces.push(format!("{name}={carol_sealed}"));
        pieces.push(format!("{name}={}", seal(&stranger, Purpose::Session, &mallory)));
        pieces.push(format!("{name}={mallory_login}"));
        sealed.extend([(Purpose::Session, carol_sealed), (Purpose::Login, mallory_login)]);
        World { sessions, sealer, genuine: vec![alice, bob, carol], sealed, pieces }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    check_header(w, data);
    if let Ok(text) = std::str::from_utf8(data) {
        for purpose in [Purpose::Session, Purpose::Login] {
            if w.sealer.open(purpose, text).is_ok() {
                assert!(w.sealed.iter().any(|(p, s)| *p == purpose && s == text), "{text:?}");
            }
        }
        check_round_trip(text);
    }
});

/// The input as a `Cookie` header, bytes below the number of pieces replaced by them.
fn check_header(w: &World, data: &[u8]) {
    let mut header = Vec::new();
    for &b in data {
        match w.pieces.get(usize::from(b).wrapping_sub(1)) {
            Some(piece) => header.extend_from_slice(piece.as_bytes()),
            None => header.push(b),
        }
    }
    let Ok(value) = HeaderValue::from_bytes(&header) else { return };
    let mut headers = HeaderMap::new();
    headers.insert(COOKIE, value);
    let cookies = cookie::parse(&headers);
    if let Ok(Some(session)) = w.sessions.open_session(&cookies) {
        assert!(w.genuine.contains(&session), "opened {:?}", session.subject);
    }
}

/// A sealed-looking value (`1` then base64url) written to cookies reads back the same.
fn check_round_trip(text: &str) {
    let value: String = std::iter::once('1')
        .chain(text.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        .collect();
    let attrs = Attrs { domain: None, max_age: 60 };
    let Some(set) = cookie::write(&[], "__Host-_portcullis", &value, &attrs) else {
        assert!(value.len() > cookie::CHUNK * cookie::MAX_CHUNKS);
        return;
    };
    let headers = cookie_header(&cookie_pairs(&set));
    let cookies = cookie::parse(&headers);
    assert_eq!(cookie::read(&cookies, "__Host-_portcullis"), Some(Ok(value)));
}

/// The `name=value` pairs a browser stores from `Set-Cookie` headers (deletions left out).
fn cookie_pairs(set: &[HeaderValue]) -> Vec<&str> {
    set.iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.contains("Max-Age=0"))
        .filter_map(|v| v.split(';').next())
        .collect()
}

/// The `Cookie` header a browser sends with `pairs`.
fn cookie_header(pairs: &[&str]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).expect("cookie header"));
    headers
}
