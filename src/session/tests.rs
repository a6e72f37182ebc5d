use std::time::Duration;

use super::*;
use crate::config::SecretSource;

thread_local! {
    /// Digests [`SessionData::revocation_key`] made on this thread (for a cookie without a
    /// session id), so a test can count them.
    pub(super) static LEGACY_KEY_DIGESTS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

fn settings() -> SessionSettings {
    SessionSettings {
        cookie_name: "_portcullis".into(),
        cookie_domain: Some("example.com".into()),
        keys: SecretSource::Env("UNUSED".into()),
        absolute_lifetime: Duration::from_secs(3600),
        idle_lifetime: Duration::from_secs(600),
        refresh_before: Duration::from_secs(60),
    }
}

fn data(groups: usize) -> SessionData {
    SessionData {
        issuer: "corp".into(),
        subject: "alice".into(),
        email: Some("alice@example.com".into()),
        email_verified: true,
        groups: (0..groups).map(|i| format!("00000000-0000-4000-8000-{i:012}")).collect(),
        groups_known: true,
        created: crate::util::unix_now(),
        last_seen: crate::util::unix_now(),
        expires: crate::util::unix_now() + 300,
        refresh: Some("rt".into()),
        kept: None,
        claims: Default::default(),
        not_kept: Vec::new(),
        id: revoke::SessionId::random().unwrap_or_default(),
        acr: None,
        hd: None,
        source: None,
    }
}

fn headers(set_cookies: &[HeaderValue]) -> HeaderMap {
    let cookie = set_cookies
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.contains("Max-Age=0"))
        .filter_map(|v| v.split(';').next())
        .collect::<Vec<_>>()
        .join("; ");
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::COOKIE, v);
    }
    h
}

#[test]
fn seal_and_open_with_rotation_and_purpose_binding() -> Result<(), String> {
    let old = Sealer::from_keys(&[[1; 32]])?;
    let rotated = Sealer::from_keys(&[[2; 32], [1; 32]])?;
    let sealed_old = old.seal(Purpose::Session, b"hello")?;
    // New key seals, old keys still open.
    assert_eq!(rotated.open(Purpose::Session, &sealed_old).ok(), Some(b"hello".to_vec()));
    let sealed_new = rotated.seal(Purpose::Session, b"hello")?;
    assert_eq!(old.open(Purpose::Session, &sealed_new), Err(seal::OpenError::UnknownKey));
    // Which key opened a value: what a tunnel's session holds on to across reloads.
    let key = |s: &Sealer, v: &str| s.open_keyed(Purpose::Session, v).ok().map(|(_, k)| k);
    assert_eq!(key(&rotated, &sealed_old), old.sealing_key());
    assert_eq!(key(&rotated, &sealed_new), rotated.sealing_key());
    assert_ne!(old.sealing_key(), rotated.sealing_key());
    let dropped = Sealer::from_keys(&[[2; 32]])?;
    assert!(rotated.knows(&old.sealing_key().unwrap_or_default()));
    assert!(!dropped.knows(&old.sealing_key().unwrap_or_default()));
    // A login value is not a session value.
    assert_eq!(rotated.open(Purpose::Login, &sealed_new), Err(seal::OpenError::Tampered));
    // Any flipped bit fails.
    let mut b = sealed_new.clone().into_bytes();
    let i = b.len() - 5;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(b).map_err(|e| e.to_string())?;
    assert!(rotated.open(Purpose::Session, &flipped).is_err());
    assert_eq!(rotated.open(Purpose::Session, "2abc"), Err(seal::OpenError::Malformed));
    assert_eq!(rotated.open(Purpose::Session, ""), Err(seal::OpenError::Malformed));
    // Nonces are random: the same plaintext seals differently.
    assert_ne!(rotated.seal(Purpose::Session, b"x")?, rotated.seal(Purpose::Session, b"x")?);
    Ok(())
}

#[test]
fn key_text_parsing_rejects_bad_keys_without_echoing_them() {
    assert!(Sealer::from_text("# comment\nMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").is_ok());
    let e = Sealer::from_text("c2hvcnQ=").err().unwrap_or_default();
    assert!(e.contains("32 bytes") && !e.contains("c2hvcnQ"), "{e}");
    let e = Sealer::from_text("not base64 !!").err().unwrap_or_default();
    assert!(e.contains("not base64"), "{e}");
    assert!(Sealer::from_text("\n# only a comment\n").is_err());
}

#[test]
fn large_sessions_are_chunked_and_reassembled() -> Result<(), String> {
    let s = Sessions::with_sealer(settings(), Sealer::from_keys(&[[7; 32]])?);
    // 200 Entra-style group GUIDs: about 9 KB sealed.
    let big = data(200);
    let set = s.seal_session(&big, &[])?;
    assert!(set.len() > 2, "chunked into {} cookies", set.len());
    for v in &set {
        let v = v.to_str().map_err(|e| e.to_string())?;
        assert!(v.len() < 4096, "each cookie under 4 KB");
        for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Domain=example.com", "Path=/"] {
            assert!(v.contains(attr), "{attr} in {v}");
        }
    }
    let h = headers(&set);
    let back = s.open_session(&cookie::parse(&h)).map_err(str::to_string)?;
    assert_eq!(back.as_ref(), Some(&big));
    // Going back to one cookie deletes the stale chunks.
    let small = s.seal_session(&data(1), &cookie::parse(&h))?;
    let deleted =
        small.iter().filter_map(|v| v.to_str().ok()).filter(|v| v.contains("Max-Age=0")).count();
    assert_eq!(deleted, set.len() - 1);
    // A missing chunk is refused, not half-read.
    let mut partial = h.clone();
    let text =
        partial.get(header::COOKIE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let without: Vec<&str> =
        text.split("; ").filter(|c| !c.starts_with("__Secure-_portcullis_1=")).collect();
    partial.insert(
        header::COOKIE,
        HeaderValue::from_str(&without.join("; ")).map_err(|e| e.to_string())?,
    );
    assert!(s.open_session(&cookie::parse(&partial)).is_err());
    Ok(())
}

fn host_only() -> SessionSettings {
    SessionSettings { cookie_domain: None, ..settings() }
}

fn set_cookie_texts(set: &[HeaderValue]) -> Vec<String> {
    set.iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect()
}

#[test]
fn host_only_session_cookies_are_host_prefixed_with_the_attributes_it_requires(
) -> Result<(), String> {
    let s = Sessions::with_sealer(host_only(), Sealer::from_keys(&[[7; 32]])?);
    assert_eq!(s.cookie_name(), "__Host-_portcullis");
    // One cookie, and a session large enough for chunks: every name is `__Host-`, and
    // each cookie is what a browser keeps under that prefix (Secure, Path=/, no Domain).
    for groups in [1, 200] {
        let set = set_cookie_texts(&s.seal_session(&data(groups), &[])?);
        assert!(!set.is_empty());
        for c in &set {
            assert!(c.starts_with("__Host-_portcullis"), "{c}");
            assert!(c.contains("; Secure") && c.contains("; Path=/;"), "{c}");
            assert!(!c.to_ascii_lowercase().contains("domain="), "{c}");
        }
        let sealed = s.seal_session(&data(groups), &[])?;
        let back = s.open_session(&cookie::parse(&headers(&sealed))).map_err(str::to_string)?;
        assert_eq!(back.map(|d| d.groups.len()), Some(groups));
    }
    // With `cookie_domain`, `__Host-` is impossible: `__Secure-` and the Domain.
    let shared = Sessions::with_sealer(settings(), Sealer::from_keys(&[[7; 32]])?);
    assert_eq!(shared.cookie_name(), "__Secure-_portcullis");
    for c in set_cookie_texts(&shared.seal_session(&data(1), &[])?) {
        assert!(c.starts_with("__Secure-_portcullis=") && c.contains("; Secure"), "{c}");
        assert!(c.contains("; Domain=example.com"), "{c}");
    }
    // The sign-in cookie is always host-only.
    assert!(LOGIN_COOKIE.starts_with(cookie::HOST_PREFIX));
    Ok(())
}

#[test]
fn a_cookie_without_the_prefix_is_no_session() -> Result<(), String> {
    let s = Sessions::with_sealer(host_only(), Sealer::from_keys(&[[7; 32]])?);
    let mut victim = data(1);
    victim.subject = "alice".into();
    let mut attacker = data(1);
    attacker.subject = "mallory".into();
    let sealed = |d: &SessionData| -> Result<String, String> {
        let set = s.seal_session(d, &[])?;
        let h = headers(&set);
        let text = h.get(header::COOKIE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        Ok(text.split_once('=').map(|(_, v)| v.to_string()).unwrap_or_default())
    };
    let (v, m) = (sealed(&victim)?, sealed(&attacker)?);
    let open = |cookie: String| -> Result<Option<String>, String> {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&cookie).map_err(|e| e.to_string())?);
        Ok(s.open_session(&cookie::parse(&h)).map_err(str::to_string)?.map(|d| d.subject))
    };
    // What a sibling host can plant (the bare name, a `Domain=` cookie; a browser
    // refuses it `__Host-`), beside the victim's own cookie or alone: never read.
    for tossed in ["_portcullis", "_portcullis_0", "__Secure-_portcullis", "__host-_portcullis"] {
        assert_eq!(
            open(format!("{tossed}={m}; __Host-_portcullis={v}"))?.as_deref(),
            Some("alice")
        );
        assert_eq!(
            open(format!("__Host-_portcullis={v}; {tossed}={m}"))?.as_deref(),
            Some("alice")
        );
        assert_eq!(open(format!("{tossed}={m}"))?, None, "{tossed}");
    }
    // Two cookies of the prefixed name: refused, not guessed at.
    assert!(open(format!("__Host-_portcullis={v}; __Host-_portcullis={m}")).is_err());
    Ok(())
}

#[test]
fn proxy_cookie_names_with_and_without_prefix() {
    for n in [
        "_portcullis",
        "_portcullis_3",
        "_portcullis_login_0123456789abcdef",
        "__Host-_portcullis",
        "__Host-_portcullis_login_0123456789abcdef",
        "__Secure-_portcullis_0",
        "__HOST-_portcullis",
        "__secure-_portcullis",
    ] {
        assert!(cookie::is_proxy_cookie(n.as_bytes()), "{n}");
    }
    for n in
        ["app", "__Host-app", "__Secure-", "__Host-", "x_portcullis", "__Host-x_portcullis", ""]
    {
        assert!(!cookie::is_proxy_cookie(n.as_bytes()), "{n}");
    }
    assert_eq!(cookie::session_name("_portcullis", None), "__Host-_portcullis");
    assert_eq!(
        cookie::session_name("_portcullis_a", Some("example.com")),
        "__Secure-_portcullis_a"
    );
}

/// `cookie::read` reads a chunked value only as `cookie::write` lays it out: a count
/// spelt another way (`c+2`, `c02`), one that needs no chunks (`c1`), or chunks cut
/// elsewhere than every `CHUNK` bytes are refused, not reassembled.
#[test]
fn chunked_cookies_are_read_only_in_the_layout_they_are_written_in() {
    let value = "A".repeat(cookie::CHUNK + 10);
    let attrs = cookie::Attrs { domain: None, max_age: 60 };
    let set = cookie::write(&[], "s", &value, &attrs).unwrap_or_default();
    let written: Vec<(String, String)> = set
        .iter()
        .filter_map(|h| h.to_str().ok()?.split(';').next()?.split_once('='))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    assert_eq!(written.len(), 3, "{written:?}");
    let read = |pairs: &[(String, String)]| {
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        cookie::read(&refs, "s")
    };
    assert_eq!(read(&written), Some(Ok(value.clone())));
    for head in ["c+2", "c02", "c1", "c0", "c9", "c", "c2 ", "c-2"] {
        let mut pairs = written.clone();
        pairs[0].1 = head.to_string();
        assert_eq!(read(&pairs), Some(Err(())), "{head}");
    }
    // The same value cut elsewhere, or with an empty last chunk.
    let (a, b) = value.split_at(10);
    for (first, second) in [(a, b), (&value[..cookie::CHUNK], "")] {
        let mut pairs = written.clone();
        pairs[1].1 = first.to_string();
        pairs[2].1 = second.to_string();
        assert_eq!(read(&pairs), Some(Err(())), "{} + {}", first.len(), second.len());
    }
}

#[test]
fn cookie_parsing_finds_chunks_but_not_lookalikes() {
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        HeaderValue::from_static("app=1; _portcullis_login_abc=x; _portcullisx=1"),
    );
    let c = cookie::parse(&h);
    assert!(!cookie::present(&c, "_portcullis"));
    h.insert(header::COOKIE, HeaderValue::from_static("app=1; _portcullis_3=x"));
    assert!(cookie::present(&cookie::parse(&h), "_portcullis"));
    // A pair that is not ASCII is skipped alone, not with the header around it.
    let utf8 = HeaderValue::from_str("name=Jos\u{e9}; __Host-_portcullis=1abc; l=\u{fc}")
        .unwrap_or_else(|e| panic!("{e}"));
    h.insert(header::COOKIE, utf8);
    assert_eq!(cookie::parse(&h), [("__Host-_portcullis", "1abc")]);
    let latin1 = HeaderValue::from_bytes(b"a=\xe9; b=2").unwrap_or_else(|e| panic!("{e}"));
    h.insert(header::COOKIE, latin1);
    assert_eq!(cookie::parse(&h), [("b", "2")]);
}

#[test]
fn navigation_detection() {
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT, HeaderValue::from_static("text/html,application/xhtml+xml"));
    assert!(is_navigation(&Method::GET, &h));
    assert!(is_navigation(&Method::HEAD, &h));
    assert!(!is_navigation(&Method::POST, &h));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic eDp5"));
    assert!(!is_navigation(&Method::GET, &h));
    let mut api = HeaderMap::new();
    api.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    assert!(!is_navigation(&Method::GET, &api));
    assert!(!is_navigation(&Method::GET, &HeaderMap::new()));
}

#[test]
fn query_params_decode_and_refuse_repeats() {
    assert_eq!(query_param(Some("rd=%2Fa%3Fb%3D1&x=2"), "rd").as_deref(), Some("/a?b=1"));
    assert_eq!(query_param(Some("state=a&state=b"), "state"), None);
    assert_eq!(query_param(None, "rd"), None);
    assert!(has_param(Some("code=1&iss=a&iss=b"), "iss"));
    assert!(has_param(Some("iss"), "iss"));
    assert!(!has_param(Some("code=1&issuer=a"), "iss"));
}

#[test]
fn redirect_targets() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.path().join("policies")).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.path().join("policies/p.toml"),
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"x\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let text = "[listen]\ninsecure_http = \"127.0.0.1:1\"\n[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"a\"]\n\
[[routes]]\nname = \"a\"\nmatch = { host = \"app.example.com\" }\nupstream = \"http://127.0.0.1:2\"\npolicy = \"p\"\n\
[[routes]]\nname = \"b\"\nmatch = { host = \"*.internal.example.com\" }\nupstream = \"http://127.0.0.1:2\"\npolicy = \"p\"\n\
[[routes]]\nname = \"c\"\nmatch = { host = \"*\" }\nupstream = \"http://127.0.0.1:2\"\npolicy = \"p\"\n";
    let src = crate::diag::Source::new(dir.path().join("portcullis.toml"), text.to_string());
    let cfg = Config::compile(&src).map_err(|e| e.to_string())?;
    let here = "app.example.com:8443";
    let ok = |t: &str| redirect::check(t, here, &cfg);
    assert_eq!(ok("/x?y=1").as_deref(), Ok("https://app.example.com:8443/x?y=1"));
    assert_eq!(
        ok("https://grafana.internal.example.com:8443/d").as_deref(),
        Ok("https://grafana.internal.example.com:8443/d")
    );
    assert_eq!(ok("https://APP.example.com:8443").as_deref(), Ok("https://app.example.com:8443/"));
    // A deep link's query may hold anything encoded: it does not choose the destination.
    for deep in
        ["/search?q=hello%20world", "/f?p=C%3A%5Ctmp", "/x?u=%2F%2Fevil.example", "/x#a%20b"]
    {
        assert_eq!(ok(deep), Ok(format!("https://app.example.com:8443{deep}")), "{deep}");
    }
    // An encoded space in a deep link's path (a file name) is a path like any other.
    assert_eq!(
        ok("https://app.example.com:8443/docs/Q3%20report.pdf?v=2").as_deref(),
        Ok("https://app.example.com:8443/docs/Q3%20report.pdf?v=2")
    );
    for spaced in ["/a%20b", "/a%C2%A0b", "/%E8%B3%87%E6%96%99%E3%80%802024.pdf"] {
        assert_eq!(ok(spaced), Ok(format!("https://app.example.com:8443{spaced}")), "{spaced}");
    }
    assert_eq!(
        ok("https://app.example.com:8443/s?q=a%20b").as_deref(),
        Ok("https://app.example.com:8443/s?q=a%20b")
    );
    let on_443 = |t: &str| redirect::check(t, "app.example.com", &cfg);
    assert_eq!(
        on_443("https://app.example.com:443/x").as_deref(),
        Ok("https://app.example.com:443/x")
    );
    assert_eq!(
        on_443("https://grafana.internal.example.com/").as_deref(),
        Ok("https://grafana.internal.example.com/")
    );
    assert!(on_443("https://app.example.com:8443/").is_err(), "another port");
    for bad in [
        "https://evil.example/",
        "https://app.example.com/",
        "https://app.example.com:1/x",
        "https://grafana.internal.example.com/d",
        "//evil.example",
        "/\\evil.example",
        "/%5Cevil.example",
        "%2F%2Fevil.example",
        "%252F%252Fevil.example",
        "https://app.example.com@evil.example/",
        "https://evil.example\\@app.example.com/",
        "http://app.example.com/",
        "javascript:alert(1)",
        "/a\nb",
        "/a?b\nc",
        "/a?b c",
        "/%2F%2Fevil.example?q=1",
        "/%5Cevil.example#x",
        "https://evil.example?@app.example.com:8443/",
        "https://evil.example#@app.example.com:8443/",
        "https://internal.example.com.evil.example/",
        "https://a%20b.internal.example.com:8443/",
        "https://evil.example%2F.internal.example.com:8443/",
        "/a%09/evil.example",
        "/a%0A/b",
        "/a%C2%85b",
        "",
    ] {
        assert!(ok(bad).is_err(), "{bad} must be refused");
    }
    Ok(())
}

#[test]
fn html_pages_escape_everything() {
    let p = pages::rejection(
        403,
        "Access denied",
        "policy-denied",
        "<script>",
        Some("/x?a=\"b\""),
        None,
    );
    assert!(!p.contains("<script>") && p.contains("&lt;script&gt;") && p.contains("&quot;b&quot;"));
    let c = pages::chooser(&[("Sign in with <b>".into(), "/s?issuer=a&rd=b".into())]);
    assert!(c.contains("&lt;b&gt;") && c.contains("issuer=a&amp;rd=b"));
}

#[test]
fn a_return_target_too_long_to_keep_is_cut_to_its_path_then_its_root() {
    let short = "https://app.example.com/a?b=c";
    assert_eq!(redirect::shorten(short), short);
    let long_query = format!("https://app.example.com/a/b?q={}", "x".repeat(3000));
    assert_eq!(redirect::shorten(&long_query), "https://app.example.com/a/b");
    let long_path = format!("https://app.example.com/{}?q=1", "p".repeat(3000));
    assert_eq!(redirect::shorten(&long_path), "https://app.example.com/");
    assert!(redirect::shorten(&"y".repeat(3000)).len() <= redirect::MAX_LEN);
}

/// An ID token whose `groups` (or another claim a policy names) the provider put
/// elsewhere (`_claim_names`, Entra's `hasgroups`) gives the session no value for it:
/// the session must not keep it as absent, or a deny on `claims.groups` would let the
/// person through the browser where `groups_any` fails closed.
#[test]
fn a_claim_the_provider_holds_elsewhere_is_not_kept_by_the_session() {
    let wanted: Vec<Arc<str>> = ["groups", "wids", "name"].iter().map(|n| Arc::from(*n)).collect();
    for token in [
        serde_json::json!({ "sub": "alice", "name": "Alice", "_claim_names": { "groups": "src1", "wids": "src1" } }),
        serde_json::json!({ "sub": "alice", "name": "Alice", "hasgroups": true, "_claim_names": { "wids": "src1" } }),
    ] {
        let token = token.as_object().cloned().unwrap_or_default();
        let mut d = data(1);
        d.keep_claims(&token, &wanted);
        let id = d.identity(IssuerId(Arc::from("corp")), PrincipalKind::Human, 0);
        assert!(!id.claims.is_kept("groups"), "{token:?}");
        assert!(!id.claims.is_kept("wids"), "{token:?}");
        assert!(id.claims.is_kept("name") && id.claims.get("name").is_some(), "{token:?}");
    }
    // Near miss: a token that carries its groups keeps them.
    let token = serde_json::json!({ "sub": "alice", "groups": ["g"], "hasgroups": false });
    let token = token.as_object().cloned().unwrap_or_default();
    let mut d = data(1);
    d.keep_claims(&token, &wanted);
    let id = d.identity(IssuerId(Arc::from("corp")), PrincipalKind::Human, 0);
    assert!(id.claims.is_kept("groups") && id.claims.is_kept("wids"));
}

/// Sign-in keeps the ID-token claims the policies name (bounded), the identity knows
/// which ones it has, and a session sealed before claims were kept knows the four it
/// always had.
#[test]
fn sessions_keep_the_claims_policies_name_and_know_which() -> Result<(), String> {
    let token = serde_json::json!({
        "sub": "alice",
        "email": "alice@example.com",
        "email_verified": true,
        "groups": ["00000000-0000-4000-8000-000000000000"],
        "name": "Alice",
        "acct": 1,
        "tid": "t".repeat(MAX_KEPT_CLAIM_BYTES),
        "roles": ["a", "b"],
    });
    let token = token.as_object().cloned().unwrap_or_default();
    let wanted: Vec<Arc<str>> = ["name", "acct", "tid", "idp", "groups", "sub", "name"]
        .iter()
        .map(|n| Arc::from(*n))
        .collect();
    let mut d = data(1);
    d.keep_claims(&token, &wanted);
    // Names outside the base, present or absent in the token; not the oversized `tid`.
    assert_eq!(d.kept.as_deref(), Some(&["acct".to_string(), "idp".into(), "name".into()][..]));
    // Only values the fields do not give already: `groups` and `sub` are not repeated.
    assert_eq!(
        d.claims,
        serde_json::json!({ "acct": 1, "name": "Alice" }).as_object().cloned().unwrap_or_default()
    );
    let s = Sessions::with_sealer(host_only(), Sealer::from_keys(&[[7; 32]])?);
    let back = s
        .open_session(&cookie::parse(&headers(&s.seal_session(&d, &[])?)))
        .map_err(str::to_string)?;
    assert_eq!(back.as_ref(), Some(&d));
    let id = d.identity(IssuerId(Arc::from("corp")), PrincipalKind::Human, 0);
    assert_eq!(id.claims.get("name"), Some(&Value::String("Alice".into())));
    assert_eq!(id.claims.get("acct"), Some(&serde_json::json!(1)));
    assert_eq!(id.claims.get("sub"), Some(&Value::String("alice".into())));
    for known in ["sub", "email", "email_verified", "groups", "name", "acct", "idp"] {
        assert!(id.claims.is_kept(known), "{known}");
    }
    assert_eq!(id.claims.get("idp"), None, "kept as absent");
    for unknown in ["tid", "roles"] {
        assert!(!id.claims.is_kept(unknown), "{unknown}");
        assert_eq!(id.claims.get(unknown), None);
    }

    // A base claim the token lacks where the fields give a value reads as absent, as
    // for the token; one whose value differs and is too large is not kept at all.
    let mut token = token;
    token.remove("email_verified");
    token.insert("groups".into(), Value::String("g".repeat(MAX_KEPT_CLAIM_BYTES)));
    let wanted: Vec<Arc<str>> =
        ["email_verified", "groups"].iter().map(|n| Arc::from(*n)).collect();
    d.keep_claims(&token, &wanted);
    let id = d.identity(IssuerId(Arc::from("corp")), PrincipalKind::Human, 0);
    assert!(id.claims.is_kept("email_verified") && id.claims.get("email_verified").is_none());
    assert!(!id.claims.is_kept("groups") && id.claims.get("groups").is_none());
    assert_eq!(id.groups.len(), 1, "group rules still read the session's groups");

    // Sealed before sessions kept claims: the four the session always had.
    let old = serde_json::json!({
        "i": "corp", "s": "alice", "e": "alice@example.com", "v": true, "g": ["eng"],
        "k": true, "c": 1, "l": 1, "x": 2
    });
    let old: SessionData = serde_json::from_value(old).map_err(|e| e.to_string())?;
    assert_eq!(old.kept, None);
    let id = old.identity(IssuerId(Arc::from("corp")), PrincipalKind::Human, 0);
    for known in BASE_CLAIMS {
        assert!(id.claims.is_kept(known), "{known}");
    }
    assert!(!id.claims.is_kept("name"));
    Ok(())
}

/// Sessions keep the claims policies name and those the `claim_headers` of routes
/// accepting the issuer forward; a route that does not accept the issuer adds none.
#[test]
fn sessions_keep_the_claims_routes_forward_as_headers() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.path().join("policies")).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.path().join("policies/p.toml"),
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = [\"corp\", \"partner\"]\nclaims = { acct = \"1\" }\n",
    )
    .map_err(|e| e.to_string())?;
    let issuer = |name: &str| {
        format!("[issuers.{name}]\nissuer = \"https://{name}.example.com\"\naudiences = [\"a\"]\n")
    };
    let route = |name: &str, extra: &str| {
        format!("[[routes]]\nname = \"{name}\"\nmatch = {{ path_prefix = \"/{name}\" }}\nupstream = \"http://127.0.0.1:2\"\npolicy = \"p\"\n{extra}\n")
    };
    let text = [
        "[listen]\ninsecure_http = \"127.0.0.1:1\"\n".to_string(),
        issuer("corp"),
        issuer("partner"),
        route("a", "claim_headers = { \"X-Team\" = \"team\", \"X-Acct\" = \"acct\" }"),
        route("b", "issuers = [\"partner\"]\nclaim_headers = { \"X-Tenant\" = \"tenant\" }"),
    ]
    .concat();
    let src = crate::diag::Source::new(dir.path().join("portcullis.toml"), text);
    let cfg = Config::compile(&src).map_err(|e| e.to_string())?;
    let names = |issuer: &str| -> Vec<String> {
        claims_named(&cfg, &IssuerId(Arc::from(issuer))).iter().map(|n| n.to_string()).collect()
    };
    assert_eq!(names("corp"), ["acct", "team"]);
    assert_eq!(names("partner"), ["acct", "team", "tenant"]);

    // What the session kept is what the route's headers carry; a claim too large to keep
    // sends no header, and nobody is refused for it.
    let route = cfg.routes.iter().find(|r| &*r.name == "a").ok_or("no route a")?;
    let headers_of = |team: String| {
        let token = serde_json::json!({ "sub": "alice", "team": team, "acct": "1" });
        let mut d = data(1);
        d.keep_claims(token.as_object().ok_or("not an object")?, &names_arc(&cfg));
        let id = d.identity(IssuerId(Arc::from("corp")), PrincipalKind::Human, 0);
        let got: Vec<String> = crate::http::headers::claim_headers(&id, &route.claim_headers)
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
            .collect();
        Ok::<_, String>(got)
    };
    assert_eq!(headers_of("red".into())?, ["x-acct: 1", "x-team: red"]);
    assert_eq!(headers_of("t".repeat(MAX_KEPT_CLAIM_BYTES))?, ["x-acct: 1"]);
    Ok(())
}

fn names_arc(cfg: &Config) -> Vec<Arc<str>> {
    claims_named(cfg, &IssuerId(Arc::from("corp")))
}

/// The sign-out list knows a session by its id, which every renewal keeps; a cookie
/// sealed before sessions had an id (no `d`) still opens, and is known by its issuer,
/// subject and sign-in time. Opening a signed-out session is refused before anything
/// else (here before the missing provider would be noticed).
#[tokio::test]
async fn sessions_are_revoked_by_id_or_without_one_by_issuer_subject_and_sign_in_time(
) -> Result<(), String> {
    let s = Sessions::with_sealer(host_only(), Sealer::from_keys(&[[7; 32]])?);
    let now = crate::util::unix_now();
    let reason = |lookup: Lookup| match lookup {
        Lookup::Invalid { reason, detail, .. } => (reason, detail),
        other => panic!("{other:?}"),
    };
    let with_id = data(1);
    assert!(!with_id.id.is_none());
    let sealed = s.seal_session(&with_id, &[])?;
    // A renewal (last use, refresh) keeps the id; every copy names the same session.
    let mut renewed = with_id.clone();
    renewed.last_seen += 1;
    renewed.refresh = Some("rotated".into());
    let renewed_sealed = s.seal_session(&renewed, &[])?;
    let back = s.open_session(&cookie::parse(&headers(&renewed_sealed))).map_err(str::to_string)?;
    assert_eq!(back.map(|d| d.id), Some(with_id.id));

    // Sealed before sessions had an id: no `d` in the cookie, and it still opens.
    let mut legacy = data(1);
    legacy.id = revoke::SessionId::default();
    let json = serde_json::to_string(&legacy).map_err(|e| e.to_string())?;
    assert!(!json.contains("\"d\""), "{json}");
    let legacy_sealed = s.seal_session(&legacy, &[])?;
    let opened =
        s.open_session(&cookie::parse(&headers(&legacy_sealed))).map_err(str::to_string)?;
    assert_eq!(opened.as_ref(), Some(&legacy));
    // Another old session of the same person, signed in at another time.
    let mut legacy_other = legacy.clone();
    legacy_other.created -= 5;
    let legacy_other_sealed = s.seal_session(&legacy_other, &[])?;

    for set in [&sealed, &renewed_sealed, &legacy_sealed, &legacy_other_sealed] {
        let (r, _) = reason(s.check(None, &headers(set), now).await);
        assert_eq!(r, Reason::SessionInvalid, "not revoked yet (and no provider here)");
    }
    assert_eq!(s.revoke(&renewed, now), Revoked::Recorded);
    assert_eq!(s.revoke(&legacy, now), Revoked::Recorded);
    for set in [&sealed, &renewed_sealed, &legacy_sealed] {
        let (r, detail) = reason(s.check(None, &headers(set), now).await);
        assert_eq!((r, detail), (Reason::SessionRevoked, revoke::SIGNED_OUT));
    }
    let (r, _) = reason(s.check(None, &headers(&legacy_other_sealed), now).await);
    assert_eq!(r, Reason::SessionInvalid, "another session of the same person");
    // An id that is not 16 bytes of base64url: the cookie does not open.
    let bad = json.replacen('{', "{\"d\":\"short\",", 1);
    assert!(serde_json::from_str::<SessionData>(&bad).is_err());
    Ok(())
}

/// A request with a cookie sealed before sessions had an id hashes its revocation key
/// once: the sign-out check and the key the proxy keeps (for the tunnel's and the
/// sign-out's re-checks) are the same digest.
#[tokio::test]
async fn a_session_without_an_id_hashes_its_revocation_key_once_per_request() -> Result<(), String>
{
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let d = dir.path();
    std::fs::create_dir_all(d.join("policies")).map_err(|e| e.to_string())?;
    std::fs::write(
        d.join("policies/p.toml"),
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(d.join("keys"), "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(d.join("secret"), "s").map_err(|e| e.to_string())?;
    let text = "[listen]\ninsecure_http = \"127.0.0.1:1\"\n\n[session]\nkeys_file = \"keys\"\n\n\
        [issuers.corp]\nissuer = \"https://corp.example.com\"\naudiences = [\"a\"]\n\
        login = { client_id = \"a\", client_secret_file = \"secret\" }\n\n\
        [[routes]]\nname = \"r\"\nupstream = \"http://127.0.0.1:2\"\npolicy = \"p\"\n";
    let cfg = Config::compile(&crate::diag::Source::new(d.join("portcullis.toml"), text))
        .map_err(|e| e.to_string())?;
    let s = Sessions::build(&cfg, Arc::default())?.ok_or("no sessions")?;
    let mut legacy = data(1);
    legacy.id = revoke::SessionId::default();
    let h = headers(&s.seal_session(&legacy, &[])?);
    LEGACY_KEY_DIGESTS.with(|n| n.set(0));
    let revocation = match s.check(None, &h, crate::util::unix_now()).await {
        Lookup::Valid { revocation, .. } => revocation,
        other => panic!("{other:?}"),
    };
    assert_eq!(LEGACY_KEY_DIGESTS.with(std::cell::Cell::get), 1);
    assert_eq!(revocation, legacy.revocation_key());
    Ok(())
}

/// A full sign-out list forgets no sign-out: the floor it raises refuses the oldest
/// sessions, signed out or not, and leaves newer ones alone; counted and rendered.
#[tokio::test]
async fn sessions_revoked_past_the_cap_are_still_refused_and_the_overflow_counted(
) -> Result<(), String> {
    let s = Sessions {
        revocations: Arc::new(Revocations::with_capacity(1)),
        ..Sessions::with_sealer(host_only(), Sealer::from_keys(&[[7; 32]])?)
    };
    let now = crate::util::unix_now();
    let session = |age: u64| {
        let mut d = data(1);
        d.created = now - age;
        d
    };
    let (older_unrevoked, first, second, newer_unrevoked) =
        (session(30), session(20), session(10), session(0));
    let overflows =
        || crate::metrics::global().session_revocation_overflows.load(Ordering::Relaxed);
    let before = overflows();
    assert_eq!(s.revoke(&first, now), Revoked::Recorded);
    assert_eq!(s.revoke(&second, now), Revoked::Overflow { floor: now - 20 });
    assert!(overflows() > before);
    assert_eq!(s.revocations().len(), 1);
    let out = crate::metrics::global().render();
    assert!(out.lines().any(|l| l.starts_with("portcullis_session_revocation_overflows_total ")));
    assert!(out.lines().any(|l| l.starts_with("portcullis_session_revocations ")));
    let sessions = &s;
    let refused = |d: &SessionData| {
        let set = sessions.seal_session(d, &[]).unwrap_or_default();
        let h = headers(&set);
        async move {
            match sessions.check(None, &h, now).await {
                Lookup::Invalid { reason: Reason::SessionRevoked, detail, .. } => Some(detail),
                _ => None,
            }
        }
    };
    assert_eq!(refused(&first).await, Some(revoke::BELOW_FLOOR));
    assert_eq!(refused(&second).await, Some(revoke::SIGNED_OUT));
    assert_eq!(refused(&older_unrevoked).await, Some(revoke::BELOW_FLOOR));
    assert_eq!(refused(&newer_unrevoked).await, None);
    Ok(())
}

/// `Origin`/`Referer` of a browser without Fetch Metadata: `https://` with this host and
/// port (443 written or not), whatever the path, is this origin; another scheme, host or
/// port, `null`, userinfo or no scheme is not.
///
/// Attack (round 14): only the host and port were compared, as text, so `http://` on
/// this host (a page anyone on the path can write, and port 80 besides) counted as this
/// origin, and a sign-out planted there went through unconfirmed.
#[test]
fn an_origin_or_referer_names_this_origin_by_its_scheme_host_and_port() {
    use super::of_this_origin;
    for v in [
        "https://app.example.com",
        "https://APP.example.com/x?y",
        "HTTPS://app.example.com#f",
        "https://app.example.com:443/",
        "https://app.example.com./",
    ] {
        assert!(of_this_origin(v.as_bytes(), "app.example.com"), "{v}");
    }
    for v in [
        "http://app.example.com",
        "http://app.example.com/logout",
        "http://app.example.com:443",
        "ws://app.example.com",
        "https://evil.example",
        "https://app.example.com:8443",
        "https://user@app.example.com/",
        "null",
        "app.example.com",
        "https://app.example.com.evil.example/",
    ] {
        assert!(!of_this_origin(v.as_bytes(), "app.example.com"), "{v}");
    }
    assert!(of_this_origin(b"https://127.0.0.1:8443/", "127.0.0.1:8443"));
    assert!(of_this_origin(b"https://app.example.com", "app.example.com:443"));
    assert!(!of_this_origin(b"http://127.0.0.1:8443/", "127.0.0.1:8443"));
    assert!(!of_this_origin(b"https://127.0.0.1/", "127.0.0.1:8443"));
    // A port that is no number is no port 443 (found by the `origin` fuzz target).
    assert!(!of_this_origin(b"https://app.example.com:844A/", "app.example.com"));
    assert!(!of_this_origin(b"https://app.example.com:99999", "app.example.com"));
    assert!(!of_this_origin(b"https://app.example.com", "app.example.com:-8443"));
}
