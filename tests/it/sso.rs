//! Browser SSO end to end through the proxy, with a cookie-keeping client and the dev
//! issuer's sign-in (`dev::login`): redirect, callback, session reuse, refresh (single
//! flight), expiry, logout, tampering, CSRF state, code replay, nonce, open redirects,
//! cookie + bearer, a second replica with the same key, logs free of secrets, the
//! chooser of a route with two sign-in issuers, RFC 9207 `iss`, `max_age` /
//! `prompt=login` against `auth_time`, unframable pages, and answers to a session kept
//! from shared caches.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, StatusCode};

use crate::support::*;

/// A cookie jar and a way to click through the dev sign-in.
struct Browser {
    jar: BTreeMap<String, String>,
    html: bool,
}

fn location(r: &Resp) -> String {
    r.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

fn set_cookies(r: &Resp) -> Vec<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

impl Browser {
    fn new() -> Browser {
        Browser { jar: BTreeMap::new(), html: true }
    }

    fn cookie_header(&self) -> String {
        self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    fn absorb(&mut self, r: &Resp) {
        for c in set_cookies(r) {
            let first = c.split(';').next().unwrap_or_default();
            let Some((n, v)) = first.split_once('=') else { continue };
            if c.contains("Max-Age=0") {
                self.jar.remove(n);
            } else {
                self.jar.insert(n.to_string(), v.to_string());
            }
        }
    }

    async fn request(
        &mut self,
        w: &World,
        method: Method,
        url: &str,
        extra: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        let cookie = self.cookie_header();
        let mut h: Vec<(&str, &str)> = extra.to_vec();
        if self.html {
            h.push(("accept", "text/html,application/xhtml+xml"));
        }
        if !cookie.is_empty() {
            h.push(("cookie", &cookie));
        }
        if method == Method::POST {
            h.push(("content-type", "application/x-www-form-urlencoded"));
        }
        let r = send_with(&w.client, method, url, &h, Bytes::from(body.to_string())).await;
        self.absorb(&r);
        r
    }

    async fn get(&mut self, w: &World, url: &str) -> Resp {
        self.request(w, Method::GET, url, &[], "").await
    }

    /// From a protected URL to the provider's form, submit it, and stop at the
    /// callback URL (not yet followed).
    async fn through_provider(
        &mut self,
        w: &World,
        path: &str,
        user: &str,
        groups: &[&str],
    ) -> String {
        let r = self.get(w, &w.url(path)).await;
        assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
        let authorize = location(&r);
        assert!(authorize.starts_with(&w.urls["corp"]), "{authorize}");
        let form = self.get(w, &authorize).await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.text());
        let mut body = format!("username={user}");
        for g in groups {
            body.push_str(&format!("&groups={g}"));
        }
        let r = self.request(w, Method::POST, &authorize, &[], &body).await;
        assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
        location(&r)
    }

    /// The whole sign-in; returns the final response of the protected URL.
    async fn sign_in(&mut self, w: &World, path: &str, user: &str, groups: &[&str]) -> Resp {
        let callback = self.through_provider(w, path, user, groups).await;
        let r = self.get(w, &callback).await;
        assert_eq!(r.status, StatusCode::FOUND, "callback: {}", r.text());
        let back = location(&r);
        assert_eq!(back, w.url(path));
        self.get(w, &back).await
    }

    fn session_cookie(&self) -> Option<&String> {
        self.jar.get("__Host-_portcullis")
    }
}

async fn sso_world(session: &str) -> World {
    World::with(Setup { sso: Some(session.to_string()), ..Setup::default() }).await
}

/// [`sso_world`] whose issuer's `login` ends with `extra` (`", extra_params = { … }"`).
async fn login_world(extra: &str) -> World {
    World::with(Setup { sso: Some(String::new()), login_extra: extra.into(), ..Setup::default() })
        .await
}

fn login(w: &World) -> &portcullis::dev::login::DevLogin {
    w.login.as_ref().unwrap_or_else(|| panic!("no dev login"))
}

#[tokio::test]
async fn browser_signs_in_and_reuses_the_session() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let r = b.get(&w, &w.url("/app/page?x=1")).await;
    assert_eq!(r.status, StatusCode::FOUND);
    let to = location(&r);
    for p in [
        "response_type=code",
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "nonce=",
        "scope=openid",
    ] {
        assert!(to.contains(p), "{p} in {to}");
    }
    assert!(
        to.contains(&format!(
            "redirect_uri=https%3A%2F%2Flocalhost%3A{}%2F.portcullis%2Fcallback",
            w.https.port()
        )),
        "{to}"
    );
    let login_cookie = set_cookies(&r).join("\n");
    assert!(login_cookie.starts_with("__Host-_portcullis_login_"), "{login_cookie}");
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=600"] {
        assert!(login_cookie.contains(attr), "{attr}: {login_cookie}");
    }

    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/app/page?x=1", "alice", &["engineering"]).await;
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert_eq!(location(&r), w.url("/app/page?x=1"));
    let cookies = set_cookies(&r).join("\n");
    assert!(cookies.contains("__Host-_portcullis=1"), "{cookies}");
    assert!(cookies.contains("Secure; HttpOnly; SameSite=Lax"), "{cookies}");
    assert!(
        !b.jar.keys().any(|k| k.starts_with("__Host-_portcullis_login_")),
        "login cookie cleared"
    );

    let r = b.get(&w, &w.url("/app/page?x=1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("alice"));
    assert_eq!(r.upstream_header("x-portcullis-kind").as_deref(), Some("human"));
    assert_eq!(r.upstream_header("x-portcullis-email").as_deref(), Some("alice@example.test"));
    // The proxy's cookies never reach the upstream.
    assert!(!r.text().contains("_portcullis"), "{}", r.text());
    // Reuse: no further code exchange, the cookie alone is enough.
    for _ in 0..3 {
        let r = b.get(&w, &w.url("/app/other")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(login(&w).code_exchanges(), 1);
    let e = w.last_event().await;
    assert_eq!(e["identity"]["issuer"], "corp");
    assert_eq!(e["identity"]["subject"], "alice");
}

/// A deep link whose path holds an encoded space (a file name, a wiki page:
/// `/docs/Q3%20report.pdf`; a no-break or ideographic space, U+3000, common in Japanese
/// file names) comes back to itself after sign-in.
/// The return target's decoded path was refused for the space, at the callback, after
/// the person had typed their password: `invalid-redirect` and no session, on every try.
#[tokio::test]
async fn a_deep_link_with_an_encoded_space_in_its_path_survives_sign_in() {
    let w = sso_world("").await;
    for path in [
        "/docs/Q3%20report.pdf?v=2",
        "/wiki/Caf%C3%A9%20menu",
        "/files/%E8%B3%87%E6%96%99%E3%80%802024.pdf",
        "/notes/a%C2%A0b",
    ] {
        let mut b = Browser::new();
        let r = b.sign_in(&w, path, "alice", &["engineering"]).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert!(b.session_cookie().is_some(), "{path}: signed in");
    }
}

/// A deep link the return-target check would refuse (here an encoded C1 control in its
/// path, which the path check lets through) signs in and lands on the host's root,
/// as an overlong one does, instead of failing at the callback after the password.
#[tokio::test]
async fn a_deep_link_that_cannot_be_returned_to_still_signs_in_to_the_root() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/a%C2%85b?x=1", "alice", &["engineering"]).await;
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert_eq!(location(&r), w.url("/"));
    assert!(b.session_cookie().is_some(), "signed in");
}

/// A cookie with a UTF-8 value beside the proxy's (set by the application, or tossed by
/// a sibling host with `Domain=`: browsers send its bytes as they are, in the one
/// `Cookie` header that carries the session too) hid the session and the sign-in
/// cookie: the browser was sent to sign in, and every callback failed.
#[tokio::test]
async fn a_cookie_with_a_utf8_value_does_not_hide_the_session_or_the_sign_in() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    b.jar.insert("name".into(), "Jos\u{e9}".into());
    let r = b.sign_in(&w, "/app", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("alice"));
    // The application's cookie reaches it as sent; the session does not.
    assert_eq!(r.upstream_header("cookie").as_deref(), Some("name=Jos\u{e9}"));
    let r = b.get(&w, &w.url("/app/again")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// A browser's cached `Basic` credentials for the host (the upstream's own login) reach
/// the upstream beside the session's identity, as they do beside a token sent in
/// `Proxy-Authorization` (docs/sso.md, "What a request meets"); the event names the
/// session's person.
#[tokio::test]
async fn a_browsers_basic_credentials_reach_the_upstream_beside_the_sessions_identity() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/app", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let basic = [("authorization", "Basic Ym9iOmh1bnRlcjI=")];
    let r = b.request(&w, Method::GET, &w.url("/app/basic"), &basic, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("authorization").as_deref(), Some("Basic Ym9iOmh1bnRlcjI="));
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("alice"));
    assert!(r.upstream_header("x-portcullis-assertion").is_some(), "{}", r.text());
    let mut e = serde_json::Value::Null;
    for _ in 0..200 {
        if let Some(found) = w.events().into_iter().find(|e| e["path"] == "/app/basic") {
            e = found;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(e["identity"]["subject"], "alice", "{e}");
}

/// A JSON Web Token in `Authorization` under another scheme than `Bearer` (`JWT`, a bare
/// token) is no credential for the proxy, but an upstream that verifies tokens itself
/// takes it for its caller's: beside the session, the upstream would act as the token's
/// holder while the proxy authorized and audited the session's person. Ambiguous, as a
/// bearer token beside a session is; `Basic` still passes (above).
#[tokio::test]
async fn a_token_under_another_scheme_beside_a_session_is_ambiguous() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/app", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let other = w.token("corp", &["sub=mallory"]);
    for value in [format!("JWT {other}"), other.clone()] {
        let h = [("authorization", value.as_str())];
        let r = b.request(&w, Method::GET, &w.url("/app/jwt"), &h, "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert!(r.text().contains("ambiguous-credentials"), "{}", r.text());
        assert_eq!(r.upstream_header("authorization"), None);
    }
}

#[tokio::test]
async fn api_requests_get_401_and_browsers_get_html_rejections() {
    let w = sso_world("").await;
    // No Accept: text/html → 401 JSON, never a redirect.
    let r = w.get("/api", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "login-required");
    // Every 401 challenges (RFC 9110 §11.6.1); the route takes bearer tokens too.
    assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="portcullis""#);
    // A POST from a browser is not redirected either (its body would be lost).
    let mut b = Browser::new();
    let r = b.request(&w, Method::POST, &w.url("/form"), &[], "a=1").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="portcullis""#);
    assert!(r.headers["content-type"].to_str().unwrap_or_default().starts_with("text/html"));
    assert!(
        r.text().contains("login-required") && r.text().contains("/.portcullis/sign_in?rd="),
        "{}",
        r.text()
    );
    // Signed in without the required group: a small HTML 403 with the reason code.
    let r = b.sign_in(&w, "/x", "bob", &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let text = r.text();
    assert!(text.contains("<code>policy-denied</code>") && text.contains("Request id"), "{text}");
    // It says who is signed in and offers a way out, not another sign-in as the same person.
    assert!(
        text.contains("signed in as <strong>bob@example.test</strong> (<code>corp</code>)"),
        "{text}"
    );
    assert!(text.contains("href=\"/.portcullis/logout\""), "{text}");
    assert!(!text.contains("/.portcullis/sign_in"), "{text}");
    assert!(!text.contains("denied by policy"), "no internal cause: {text}");
    // Bearer tokens keep their JSON behaviour.
    let r = w.get("/x", Some(&w.token("corp", &[]))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn tampered_tossed_or_unknown_key_cookies_are_refused() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let good = b.session_cookie().cloned().unwrap_or_default();
    // Flip one character in the middle.
    let mut bytes = good.clone().into_bytes();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap_or_default();
    let (client, url) = (w.client.clone(), w.url("/"));
    let api = |c: String| {
        let (client, url) = (client.clone(), url.clone());
        async move { send_with(&client, Method::GET, &url, &[("cookie", &c)], Bytes::new()).await }
    };
    let r = api(format!("__Host-_portcullis={tampered}")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid-session");
    assert!(set_cookies(&r)
        .iter()
        .any(|c| c.starts_with("__Host-_portcullis=;") && c.contains("Max-Age=0")));
    // Two cookies of the session's own name (a browser holds one `__Host-` cookie per
    // host, so not a tossed one): not guessed at, and cleared, host-only.
    let r = api(format!("__Host-_portcullis={good}; __Host-_portcullis={good}")).await;
    assert_eq!(r.json()["error"], "invalid-session");
    let clears = set_cookies(&r);
    assert!(
        clears.iter().any(|c| c.starts_with("__Host-_portcullis=;") && !c.contains("Domain")),
        "{clears:?}"
    );
    // A browser with a bad cookie is sent to sign in again.
    let mut b2 = Browser::new();
    b2.jar.insert("__Host-_portcullis".into(), tampered);
    let r = b2.get(&w, &w.url("/")).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert!(location(&r).starts_with(&w.urls["corp"]));
    // The login cookie's sealed value is not a session (purpose-bound AEAD).
    let r =
        api(format!("__Host-_portcullis={}", "1AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))
            .await;
    assert_eq!(r.json()["error"], "invalid-session");
    let e = w.last_event().await;
    assert!(
        e["detail"].as_str().unwrap_or_default().contains("unknown key")
            || e["reason"] == "invalid-session"
    );
}

/// atk-11b/01: cookie tossing. A page on a sibling host (`evil.example.com`) can plant
/// cookies for the parent domain, but a browser refuses any `__Host-` cookie with a
/// `Domain` or from another host: what it can plant is the bare `_portcullis` (or
/// `_portcullis_login_…`), carrying the attacker's own sealed session (or sign-in).
/// Beside the victim's cookie, alone, or as a sign-in cookie: never the victim's
/// identity, never a session for the attacker.
#[tokio::test]
async fn cookies_tossed_from_a_sibling_host_neither_fixate_a_session_nor_sign_in() {
    let w = sso_world("").await;
    let mut victim = Browser::new();
    assert_eq!(victim.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let mut attacker = Browser::new();
    assert_eq!(attacker.sign_in(&w, "/", "mallory", &["engineering"]).await.status, StatusCode::OK);
    let v = victim.session_cookie().cloned().unwrap_or_default();
    let m = attacker.session_cookie().cloned().unwrap_or_default();
    assert!(!v.is_empty() && !m.is_empty());
    let get = |cookie: String, accept: &'static str| {
        let (client, url) = (w.client.clone(), w.url("/"));
        async move {
            send_with(
                &client,
                Method::GET,
                &url,
                &[("cookie", &cookie), ("accept", accept)],
                Bytes::new(),
            )
            .await
        }
    };
    // The attacker's value is a working session under the proxy's own name: what keeps
    // it out below is the name a sibling host can give it, nothing else.
    let r = get(format!("__Host-_portcullis={m}"), "application/json").await;
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("mallory"));

    // 1. The victim's browser sends its own cookie and the tossed one, in either order:
    //    the request is the victim's, and nothing is cleared (no copy to win later).
    for cookie in [
        format!("_portcullis={m}; __Host-_portcullis={v}"),
        format!("__Host-_portcullis={v}; _portcullis={m}"),
    ] {
        let r = get(cookie, "application/json").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("alice"));
        assert!(set_cookies(&r).iter().all(|c| !c.contains("Max-Age=0")), "{:?}", set_cookies(&r));
        assert!(!r.text().contains("_portcullis"), "forwarded upstream: {}", r.text());
    }
    // 2. Only the tossed cookie (a victim not signed in, or after any clear): no session,
    //    not the attacker's. An API gets 401 login-required; a browser is sent to sign in.
    let r = get(format!("_portcullis={m}"), "application/json").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "login-required");
    let r = get(format!("_portcullis={m}"), "text/html").await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert!(location(&r).starts_with(&w.urls["corp"]), "{}", location(&r));
    let e = w.last_event().await;
    assert!(e["identity"].is_null(), "{e}");

    // 3. Login CSRF: the attacker starts a sign-in, stops at its callback (their code),
    //    tosses its sign-in cookie under the name a sibling host can set, and sends the
    //    victim to the callback. No session is made, and the code is not even spent.
    let mut started = Browser::new();
    let callback = started.through_provider(&w, "/", "mallory", &["engineering"]).await;
    let (name, sealed) = started
        .jar
        .iter()
        .find(|(k, _)| k.starts_with("__Host-_portcullis_login_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap_or_else(|| panic!("no login cookie: {:?}", started.jar));
    let tossed = name.trim_start_matches("__Host-").to_string();
    let exchanges = login(&w).code_exchanges();
    let mut target = Browser::new();
    target.jar.insert(tossed, sealed.clone());
    let r = target.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(target.session_cookie().is_none(), "{:?}", target.jar);
    assert!(set_cookies(&r).iter().all(|c| c.contains("Max-Age=0")), "{:?}", set_cookies(&r));
    assert_eq!(login(&w).code_exchanges(), exchanges);
    // The same cookie under the proxy's name completes that sign-in: the refusal above
    // was the name alone.
    let mut own = Browser::new();
    own.jar.insert(name, sealed);
    let r = own.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert!(own.session_cookie().is_some());
}

/// Upgrading to the prefixed names: a browser still holding the session cookie of the
/// version before (same key, bare `_portcullis`) is not signed in by it, signs in once,
/// and the sign-in deletes the old cookie (it would only take room in every request).
#[tokio::test]
async fn a_session_cookie_from_before_the_prefix_needs_one_sign_in_and_is_deleted() {
    let w = sso_world("").await;
    let mut before = Browser::new();
    assert_eq!(before.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let sealed = before.session_cookie().cloned().unwrap_or_default();
    let mut b = Browser::new();
    b.jar.insert("_portcullis".into(), sealed);
    let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(login(&w).code_exchanges(), 2, "the old cookie did not sign in");
    assert!(b.session_cookie().is_some(), "{:?}", b.jar);
    assert!(!b.jar.contains_key("_portcullis"), "the old cookie is kept: {:?}", b.jar.keys());
}

/// F6: every file the configuration names is watched; rotating the session keys file
/// ("rotate the key to sign everyone out") takes effect without a SIGHUP.
#[tokio::test]
async fn rotating_the_session_keys_file_signs_everyone_out_through_the_watcher() {
    let w = World::with(Setup { sso: Some(String::new()), watch: true, ..Setup::default() }).await;
    let files = w.server().shared.runtime.load().config.files.clone();
    let dir = w.dir.path();
    for f in [dir.join("session-keys"), dir.join("client-secret"), w.pki.ca_path()] {
        assert!(files.contains(&f), "{} is not watched: {files:?}", f.display());
    }
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let cookie = format!("__Host-_portcullis={}", b.session_cookie().cloned().unwrap_or_default());
    let (url, headers) = (w.url("/"), [("cookie", cookie.as_str())]);
    let api = || send_with(&w.client, Method::GET, &url, &headers, Bytes::new());
    assert_eq!(api().await.status, StatusCode::OK);

    write(&dir.join("session-keys"), "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=\n");
    let start = std::time::Instant::now();
    let mut r = api().await;
    while r.status == StatusCode::OK && start.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        r = api().await;
    }
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the old key still opens sessions");
    assert_eq!(r.json()["error"], "invalid-session");
}

/// Round 10: a WebSocket a browser session opened ends when a reload takes the key that
/// sealed its cookie out of the session keys (`[session] keys_file`; "rotating the keys
/// signs everyone out"), as the cookie itself would be refused; a reload that keeps the key
/// keeps it open.
#[tokio::test]
async fn rotating_the_session_keys_ends_the_tunnels_their_sessions_opened() {
    use crate::forwarding::{echo_once, tunnel_end_event, ws_connect_with};
    let w = World::with(Setup { sso: Some(String::new()), ..Setup::default() }).await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let cookie = format!("__Host-_portcullis={}", b.session_cookie().cloned().unwrap_or_default());
    let mut ws = ws_connect_with(&w, "/ws", &[("cookie", &cookie)])
        .await
        .unwrap_or_else(|e| panic!("ws with a session: {e}"));
    assert!(echo_once(&mut ws).await);
    let keys = w.dir.path().join("session-keys");
    let old = std::fs::read_to_string(&keys).unwrap_or_default();

    // A new key first in the list, the old one still there: sessions stay signed in.
    let new = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    write(&keys, &format!("{new}\n{old}"));
    assert!(w.server().reload().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echo_once(&mut ws).await, "a reload that keeps the session's key ended its tunnel");

    // The old key dropped: the cookie no longer opens, and the tunnel ends with it.
    write(&keys, &format!("{new}\n"));
    assert!(w.server().reload().await);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(ended.is_ok(), "the tunnel outlived the rotation that signed its session out");
    assert!(!echo_once(&mut ws).await, "the signed-out tunnel still relays");
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(e["reason"], "access-revoked", "{e}");
}

#[tokio::test]
async fn wrong_state_missing_login_cookie_and_replayed_code_fail() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
    // Forged state (CSRF): the callback's state has no sign-in cookie.
    let forged = callback.replace("state=", "state=AAAAAAAAAAAAAAAAAAAA");
    let r = b.get(&w, &forged).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("login-failed"), "{}", r.text());
    // Another browser (no login cookie) cannot complete this sign-in.
    let mut other = Browser::new();
    let r = other.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(other.session_cookie().is_none());
    // The real one works once...
    let saved = b.jar.clone();
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    // ...and a replay with the same login cookie fails at the provider (single-use code).
    let mut replay = Browser { jar: saved, html: true };
    let r = replay.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(replay.session_cookie().is_none());
    let e = w.last_event().await;
    assert_eq!(e["reason"], "login-failed");
    assert!(e["detail"].as_str().unwrap_or_default().contains("invalid_grant"), "{e}");
}

/// The Back button after signing in returns to the provider's page of that sign-in,
/// which (the provider's own session still open) answers the callback again: same
/// `state`, a new code. That sign-in has ended, so its cookie is gone, and the person,
/// signed in, got a `login-failed` page. A browser whose session is valid goes on to
/// this host's root instead, with no code exchanged and its session unchanged; one
/// without a session still gets `login-failed`.
#[tokio::test]
async fn a_callback_for_an_ended_sign_in_sends_a_signed_in_browser_on() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/app/x", "alice", &["engineering"]).await;
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let session = b.session_cookie().cloned();
    assert!(session.is_some());
    let exchanges = login(&w).code_exchanges();
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert_eq!(location(&r), w.url("/"));
    assert_eq!(b.session_cookie(), session.as_ref(), "the session is kept");
    assert_eq!(login(&w).code_exchanges(), exchanges, "no code exchanged");
    let e = w.last_event().await;
    assert_eq!(e["identity"]["subject"], "alice", "{e}");
    let r = b.get(&w, &w.url("/app/x")).await;
    assert_eq!(r.status, StatusCode::OK);
    // Without a session, the same callback is a failed sign-in.
    let mut other = Browser::new();
    let r = other.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("login-failed"), "{}", r.text());
}

#[tokio::test]
async fn nonce_mismatch_creates_no_session() {
    let w = sso_world("").await;
    login(&w).set_nonce_override(Some("not-the-nonce"));
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(b.session_cookie().is_none());
    let e = w.last_event().await;
    assert!(e["detail"].as_str().unwrap_or_default().contains("nonce"), "{e}");
}

/// A provider (compromised, or confused between its clients or tenants) whose token
/// endpoint answers with an ID token for another client, from another issuer, naming
/// another authorized party, or for this client and others it does not trust (OIDC Core
/// §3.1.3.7 steps 2–5): no session, each refusal audited with its cause.
#[tokio::test]
async fn an_id_token_for_another_client_or_from_another_issuer_creates_no_session() {
    let w = sso_world("").await;
    let cases = [
        (serde_json::json!({ "aud": "another-client" }), "audience"),
        (serde_json::json!({ "aud": ["portcullis", "another-client"] }), "audience"),
        (serde_json::json!({ "azp": "another-client" }), "authorized-party"),
        (serde_json::json!({ "iss": "https://evil.example" }), "issuer"),
        (serde_json::json!({ "aud": null }), "ID token"),
    ];
    for (claims, cause) in cases {
        let serde_json::Value::Object(claims) = claims else { unreachable!() };
        login(&w).set_claim_overrides(claims.clone());
        let mut b = Browser::new();
        let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
        let r = b.get(&w, &callback).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{claims:?}");
        assert!(b.session_cookie().is_none(), "{claims:?}: a session");
        let e = w.last_event().await;
        assert_eq!(e["reason"], "login-failed", "{claims:?}");
        assert!(e["detail"].as_str().unwrap_or_default().contains(cause), "{claims:?}: {e}");
    }
    login(&w).set_claim_overrides(serde_json::Map::new());
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
    b.get(&w, &callback).await;
    assert!(b.session_cookie().is_some(), "the same sign-in without the overrides failed");
}

/// A token response whose `token_type` is not `Bearer`, or whose `expires_in` is
/// negative or beyond any time: the proxy never presents the access token (it only
/// checks `at_hash` against it), so another `token_type` changes nothing; a negative
/// `expires_in` is not a number of seconds, and the answer is refused as malformed; an
/// enormous one is only the access token's business, and the session keeps its own
/// lifetimes.
#[tokio::test]
async fn a_token_response_with_an_odd_token_type_or_expires_in() {
    let w = sso_world("").await;
    let cases = [
        (serde_json::json!({ "token_type": "N_A" }), true),
        (serde_json::json!({ "token_type": "DPoP" }), true),
        (serde_json::json!({ "expires_in": u64::MAX }), true),
        (serde_json::json!({ "expires_in": -1 }), false),
        (serde_json::json!({ "token_type": null }), false),
    ];
    for (members, signs_in) in cases {
        let serde_json::Value::Object(members) = members else { unreachable!() };
        login(&w).set_response_overrides(members.clone());
        let mut b = Browser::new();
        let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
        let r = b.get(&w, &callback).await;
        assert_eq!(b.session_cookie().is_some(), signs_in, "{members:?}: {}", r.status);
        if !signs_in {
            let e = w.last_event().await;
            assert_eq!(e["reason"], "login-failed", "{members:?}");
            assert!(
                e["detail"].as_str().unwrap_or_default().contains("did not parse"),
                "{members:?}: {e}"
            );
        }
    }
}

/// The issuer's `algorithms` (V4: RS256 by default, `HS*` never) hold for the ID token a
/// sign-in gets, as for its bearer tokens. The sign-in used whatever the provider's
/// discovery document advertised, HS256 keyed by the client secret among them.
#[tokio::test]
async fn a_sign_in_id_token_is_held_to_the_issuers_algorithms() {
    let w = sso_world("").await;
    let algs = serde_json::json!(["RS256", "HS256"]);
    w.issuer.set_discovery_member("/human", "id_token_signing_alg_values_supported", algs);
    login(&w).set_hs256(true);
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(b.session_cookie().is_none(), "an HS256 ID token signed in");
    let e = w.last_event().await;
    assert_eq!(e["reason"], "login-failed", "{e}");
    assert!(e["detail"].as_str().unwrap_or_default().contains("ID token"), "{e}");
    login(&w).set_hs256(false);
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
}

/// `max_age` and `prompt=login` ask the provider to authenticate the person again. One
/// that does not implement them, or a person at an unlocked browser who
/// deletes them from the authorization URL, answers with the provider's old session:
/// the ID token's `auth_time` shows it, and the sign-in fails instead of creating a
/// session no one re-authenticated for.
#[tokio::test]
async fn max_age_and_prompt_login_are_held_to_the_id_tokens_auth_time() {
    for (extra, asked) in [
        (", extra_params = { max_age = \"300\" }", "max_age=300"),
        (", extra_params = { prompt = \"login consent\" }", "prompt=login"),
    ] {
        let w = login_world(extra).await;
        let mut b = Browser::new();
        let r = b.get(&w, &w.url("/")).await;
        assert!(location(&r).contains(asked), "{asked}: {}", location(&r));
        // Authenticated an hour ago (past `max_age`, and before this sign-in began).
        login(&w).set_auth_time_age(Some(3600));
        let mut b = Browser::new();
        let callback = b.through_provider(&w, "/", "alice", &[]).await;
        let r = b.get(&w, &callback).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{asked}: {}", r.text());
        assert!(r.text().contains("login-failed"), "{}", r.text());
        assert!(b.session_cookie().is_none(), "{asked}: a session without re-authentication");
        let e = w.last_event().await;
        assert!(e["detail"].as_str().unwrap_or_default().contains("auth_time"), "{e}");
        // No `auth_time` at all: nothing shows a new authentication either.
        login(&w).set_auth_time_age(None);
        login(&w).set_no_auth_time(true);
        let mut b = Browser::new();
        let callback = b.through_provider(&w, "/", "alice", &[]).await;
        assert_eq!(b.get(&w, &callback).await.status, StatusCode::BAD_REQUEST, "{asked}");
        assert!(b.session_cookie().is_none());
        // Authenticated just now: signed in.
        login(&w).set_no_auth_time(false);
        let mut b = Browser::new();
        let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
        assert_eq!(r.status, StatusCode::OK, "{asked}: {}", r.text());
    }
    // Without them, an old authentication is the provider's business: signed in.
    let w = sso_world("").await;
    login(&w).set_auth_time_age(Some(3600));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
}

/// `acr_values` is a request the provider may satisfy with another class or ignore,
/// and anyone at the browser can delete from the authorization URL: the callback holds
/// the ID token's `acr` to the classes asked for, exactly, and refuses a session
/// otherwise.
#[tokio::test]
async fn acr_values_are_held_to_the_id_tokens_acr() {
    let w = login_world(", extra_params = { acr_values = \"phr  urn:example:mfa\" }").await;
    let mut b = Browser::new();
    let r = b.get(&w, &w.url("/")).await;
    assert!(location(&r).contains("acr_values=phr"), "{}", location(&r));
    // No `acr`, another class, a class that only starts like one asked for: no session.
    for (acr, why) in
        [(None, "no `acr`"), (Some("pwd"), "not one of"), (Some("phrx"), "not one of")]
    {
        login(&w).set_acr(acr);
        let mut b = Browser::new();
        let callback = b.through_provider(&w, "/", "alice", &[]).await;
        let r = b.get(&w, &callback).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{acr:?}: {}", r.text());
        assert!(r.text().contains("login-failed"), "{}", r.text());
        assert!(b.session_cookie().is_none(), "{acr:?}: a session without the class asked for");
        let e = w.last_event().await;
        assert!(e["detail"].as_str().unwrap_or_default().contains(why), "{acr:?}: {e}");
    }
    // Either class asked for: signed in.
    for acr in ["phr", "urn:example:mfa"] {
        login(&w).set_acr(Some(acr));
        let mut b = Browser::new();
        let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
        assert_eq!(r.status, StatusCode::OK, "{acr}: {}", r.text());
    }
    // Without `acr_values`, the provider's `acr` is not looked at.
    let w = sso_world("").await;
    login(&w).set_acr(Some("pwd"));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
}

/// The `acr_values` a login demands hold the issuer's bearer ID tokens too: a person
/// barred from a session without the class asked for is not let in by sending a
/// password-only ID token of the same issuer as a bearer token. Without an `acr`, or
/// with another class: 401 (`acr-mismatch` in the log, `invalid-token` to the client).
#[tokio::test]
async fn a_bearer_id_token_is_held_to_the_acr_values_of_its_issuers_login() {
    let w = login_world(", extra_params = { acr_values = \"phr urn:example:mfa\" }").await;
    for (acr, why) in [
        (None, "no `acr`"),
        (Some("acr=pwd"), "not one of"),
        (Some("acr=phrx"), "not one of"),
        (Some("acr=PHR"), "not one of"),
    ] {
        let token = w.token("corp", acr.as_slice());
        let r = w.get("/", Some(&token)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{acr:?}: {}", r.text());
        assert!(r.text().contains("invalid-token"), "{acr:?}: {}", r.text());
        let e = w.last_event().await;
        assert_eq!(e["reason"], "acr-mismatch", "{acr:?}: {e}");
        assert!(e["detail"].as_str().unwrap_or_default().contains(why), "{acr:?}: {e}");
    }
    // An `acr` that is no string is a malformed claim (V21).
    let r = w.get("/", Some(&w.token("corp", &["acr:=2"]))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(w.last_event().await["reason"], "invalid-claims");
    // Either class asked for: in, as the browser would be.
    for acr in ["acr=phr", "acr=urn:example:mfa"] {
        let r = w.get("/", Some(&w.token("corp", &[acr]))).await;
        assert_eq!(r.status, StatusCode::OK, "{acr}: {}", r.text());
    }
    // A CI token is no person's ID token: the login's classes do not apply to it.
    let r = w.get("/", Some(&w.token("gh", &[]))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Without `acr_values`, a bearer ID token's `acr` is not looked at.
    let w = sso_world("").await;
    let r = w.get("/", Some(&w.token("corp", &[]))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// The `acr_values` a login asks for hold each request of a session, as they hold each
/// bearer ID token: a session whose sign-in showed none of the classes asked for now (a
/// reload added or changed them) signs in again, instead of keeping its access until its
/// absolute lifetime (a refresh does not ask the provider for the context again).
#[tokio::test]
async fn a_session_is_held_to_the_acr_values_a_reload_brings() {
    let w = login_world(", extra_params = { acr_values = \"phr\" }").await;
    login(&w).set_acr(Some("phr"));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK, "the class asked for");
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let reload = |from: &str, to: &str| {
        assert!(config.contains(from), "{config}");
        write(&w.config_path(), &config.replace(from, to));
    };
    reload("acr_values = \"phr\"", "acr_values = \"urn:example:mfa\"");
    reloaded_session_expires(&w, &mut b, "acr").await;
    // Signed in with the class asked for now: in.
    login(&w).set_acr(Some("urn:example:mfa"));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK);
    // A login that asks for no class any more does not look at the session's.
    reload("acr_values = \"phr\"", "prompt = \"consent\"");
    assert!(w.server().reload().await);
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK);
}

/// A WebSocket a session opened is held to the login's `acr_values` as reloaded, as the
/// session's next request is: a reload asking for classes its sign-in did not show ends
/// it; one that keeps the class the sign-in showed keeps it open.
#[tokio::test]
async fn a_reload_asking_for_another_acr_ends_the_tunnels_of_sessions_without_it() {
    use crate::forwarding::{echo_once, tunnel_end_event, ws_connect_with};
    let w = login_world(", extra_params = { acr_values = \"phr\" }").await;
    login(&w).set_acr(Some("phr"));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let cookie = format!("__Host-_portcullis={}", b.session_cookie().cloned().unwrap_or_default());
    let mut ws = ws_connect_with(&w, "/ws", &[("cookie", &cookie)])
        .await
        .unwrap_or_else(|e| panic!("ws with a session: {e}"));
    assert!(echo_once(&mut ws).await);
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let reload = |to: &str| write(&w.config_path(), &config.replace("acr_values = \"phr\"", to));

    reload("acr_values = \"urn:example:mfa phr\"");
    assert!(w.server().reload().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echo_once(&mut ws).await, "a reload still asking for the sign-in's class ended it");

    reload("acr_values = \"urn:example:mfa\"");
    assert!(w.server().reload().await);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(ended.is_ok(), "the tunnel outlived the reload that refuses its session");
    assert!(!echo_once(&mut ws).await, "the tunnel still relays");
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(e["reason"], "access-revoked", "{e}");
    assert!(e["detail"].as_str().unwrap_or_default().contains("acr"), "{e}");
}

/// Reloads `w` (its configuration file already changed) and checks that `b`'s session
/// is refused at once for `setting`: 401 `session-expired` naming it to a client without
/// a browser's `Accept`, and a browser sent to sign in again.
async fn reloaded_session_expires(w: &World, b: &mut Browser, setting: &str) {
    assert!(w.server().reload().await);
    let cookie = b.cookie_header();
    let headers = [("cookie", cookie.as_str())];
    let r = send_with(&w.client, Method::GET, &w.url("/"), &headers, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let e = w.last_event().await;
    assert_eq!(e["reason"], "session-expired", "{e}");
    assert!(e["detail"].as_str().unwrap_or_default().contains(setting), "{e}");
    let r = b.get(w, &w.url("/")).await;
    assert_eq!(r.status, StatusCode::FOUND, "a browser is sent to sign in: {}", r.text());
}

/// The issuer's configuration with `line` added to the section of the issuer browsers
/// sign in with (after its `login`).
fn with_issuer_line(config: &str, line: &str) -> String {
    let Some(at) = config.find("login = {") else { panic!("no login: {config}") };
    let end = at + config[at..].find('\n').unwrap_or(0) + 1;
    format!("{}{line}\n{}", &config[..end], &config[end..])
}

/// A reload that gives the issuer a `hosted_domain` holds every session to it on its
/// next request, as it holds the same person's bearer ID token: a session whose sign-in
/// had that `hd` stays; one of another Workspace is sent to sign in again at once, not
/// at its next refresh (which would have refused it).
#[tokio::test]
async fn a_session_is_held_to_the_hosted_domain_a_reload_brings() {
    let w = World::with(Setup { sso: Some(String::new()), ..Setup::default() }).await;
    login(&w).set_hd(Some("example.test"));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    write(&w.config_path(), &with_issuer_line(&config, "hosted_domain = \"example.test\""));
    assert!(w.server().reload().await);
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK, "the session's own domain");

    write(&w.config_path(), &with_issuer_line(&config, "hosted_domain = \"acme.example\""));
    reloaded_session_expires(&w, &mut b, "hosted_domain").await;
    // Signed in in that Workspace: in.
    login(&w).set_hd(Some("acme.example"));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK);
}

/// A session's groups were read where the issuer's `groups_claim` said at its sign-in:
/// a reload that moves it (say away from a claim users can edit) refuses the session at
/// once, as a bearer token is read at once from the new claim, not at its next refresh.
/// A reload that leaves it where it was keeps the session.
#[tokio::test]
async fn a_reload_moving_groups_claim_sends_sessions_to_sign_in_again() {
    let w = World::with(Setup { sso: Some(String::new()), ..Setup::default() }).await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    write(&w.config_path(), &with_issuer_line(&config, "groups_claim = \"groups\""));
    assert!(w.server().reload().await);
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK, "the same claim");

    write(&w.config_path(), &with_issuer_line(&config, "groups_claim = \"roles\""));
    reloaded_session_expires(&w, &mut b, "groups_claim").await;
}

/// A WebSocket a session opened is held to the issuer's `hosted_domain` as reloaded, as
/// the session's next request is.
#[tokio::test]
async fn a_reload_bringing_another_hosted_domain_ends_the_tunnels_of_sessions_outside_it() {
    use crate::forwarding::{echo_once, tunnel_end_event, ws_connect_with};
    let w = World::with(Setup { sso: Some(String::new()), ..Setup::default() }).await;
    login(&w).set_hd(Some("example.test"));
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let cookie = format!("__Host-_portcullis={}", b.session_cookie().cloned().unwrap_or_default());
    let mut ws = ws_connect_with(&w, "/ws", &[("cookie", &cookie)])
        .await
        .unwrap_or_else(|e| panic!("ws with a session: {e}"));
    assert!(echo_once(&mut ws).await);
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();

    write(&w.config_path(), &with_issuer_line(&config, "hosted_domain = \"example.test\""));
    assert!(w.server().reload().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echo_once(&mut ws).await, "a reload pinning the session's own domain ended it");

    write(&w.config_path(), &with_issuer_line(&config, "hosted_domain = \"acme.example\""));
    assert!(w.server().reload().await);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(ended.is_ok(), "the tunnel outlived the reload that refuses its session");
    assert!(!echo_once(&mut ws).await, "the tunnel still relays");
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(e["reason"], "access-revoked", "{e}");
    assert!(e["detail"].as_str().unwrap_or_default().contains("hosted_domain"), "{e}");
}

/// A browser session is of the kind its issuer is configured with (`kind`), as the
/// issuer's bearer ID tokens are: the audit log and `X-Portcullis-Kind` say the same for
/// one person either way (a session was always `human`).
#[tokio::test]
async fn a_session_is_of_its_issuers_kind_as_its_bearer_tokens_are() {
    let setup = Setup {
        sso: Some(String::new()),
        issuer_extra: "kind = \"service\"".into(),
        ..Setup::default()
    };
    let w = World::with(setup).await;
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-kind").as_deref(), Some("service"));
    let e = last_event_at(&w, "/").await;
    assert_eq!(e["identity"]["kind"], "service", "{e}");
    let signed_in = last_event_at(&w, "/.portcullis/callback").await;
    assert_eq!(signed_in["identity"]["kind"], "service", "{signed_in}");
    // The same person's bearer ID token.
    let r = w.get("/", Some(&w.token("corp", &["sub=alice"]))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-kind").as_deref(), Some("service"));
}

/// RFC 9207: a provider that advertises `authorization_response_iss_parameter_supported`
/// names itself in every authorization response, so one without `iss` (or with two) is
/// not its own (the mix-up attack: another provider's code sent back with this sign-in's
/// state) and creates no session. A provider that does not advertise it is unchanged.
#[tokio::test]
async fn an_authorization_response_without_the_iss_its_provider_promises_fails() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &[]).await;
    assert!(callback.contains("iss="), "{callback}");
    // Two `iss`, the right one among them: not guessed at.
    let twice = format!("{callback}&iss={}", urlencode(&w.urls["corp"]));
    let r = b.get(&w, &twice).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(b.session_cookie().is_none());
    let e = w.last_event().await;
    assert!(e["detail"].as_str().unwrap_or_default().contains("`iss` repeated"), "{e}");
    login(&w).set_no_iss(true);
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &[]).await;
    assert!(!callback.contains("iss="), "{callback}");
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(r.text().contains("login-failed"), "{}", r.text());
    assert!(b.session_cookie().is_none(), "a response without the promised `iss` signed in");
    let e = w.last_event().await;
    assert!(e["detail"].as_str().unwrap_or_default().contains("RFC 9207"), "{e}");
    assert_eq!(login(&w).code_exchanges(), 0, "the code was sent to the provider");

    // A provider that does not promise it: a response without `iss` signs in.
    let w = sso_world("").await;
    w.issuer.set_discovery_member(
        "/human",
        "authorization_response_iss_parameter_supported",
        serde_json::Value::Bool(false),
    );
    login(&w).set_no_iss(true);
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
}

/// The keys a sign-in verifies its ID token with pass the checks a bearer token's key
/// passes: a key its issuer published for something else than verifying (here
/// `key_ops: ["encrypt"]`; `use: enc`, an RSA modulus under 2048 bits, a point off its
/// curve alike: `session::oidc::tests`) verifies no sign-in. `openidconnect`, which
/// verifies sign-in ID tokens, reads no `key_ops` and takes RSA keys of any size.
#[tokio::test]
async fn a_sign_in_id_token_is_verified_only_with_keys_fit_for_verifying() {
    let w = sso_world("").await;
    let mut jwks = portcullis::dev::signer::jwks(&[&w.signer]);
    jwks["keys"][0]["key_ops"] = serde_json::json!(["encrypt"]);
    w.issuer.set_jwks("/human", jwks);
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(b.session_cookie().is_none(), "an ID token signed with an encryption key signed in");
    let e = w.last_event().await;
    assert_eq!(e["reason"], "login-failed", "{e}");

    // The same key published for verifying signs in.
    let w = sso_world("").await;
    let mut jwks = portcullis::dev::signer::jwks(&[&w.signer]);
    jwks["keys"][0]["key_ops"] = serde_json::json!(["verify"]);
    w.issuer.set_jwks("/human", jwks);
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The proxy's own pages are never shown in another site's frame, where a page laid
/// over them could trick a click on their button (the cross-site sign-out
/// confirmation above all): `frame-ancestors 'none'` for current browsers, and
/// `X-Frame-Options: DENY` for those that predate it.
#[tokio::test]
async fn the_proxys_own_pages_cannot_be_framed() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let confirm = b
        .request(
            &w,
            Method::GET,
            &w.url("/.portcullis/logout"),
            &[("sec-fetch-site", "cross-site")],
            "",
        )
        .await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm.text().contains("Sign out?"), "{}", confirm.text());
    let refused = b.get(&w, &w.url("/.portcullis/sign_in?rd=https%3A%2F%2Fevil.example%2F")).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    for r in [&confirm, &refused] {
        let h = |n: &str| r.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(h("content-security-policy").contains("frame-ancestors 'none'"), "{:?}", r.headers);
        assert_eq!(h("x-frame-options"), "DENY", "{:?}", r.headers);
        assert_eq!(h("x-content-type-options"), "nosniff", "{:?}", r.headers);
        assert_eq!(h("cache-control"), "no-store", "{:?}", r.headers);
    }
}

#[tokio::test]
async fn open_redirect_attempts_are_refused() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    for rd in [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example/",
        "%2F%2Fevil.example/",
        "/%2F/evil.example/",
        "/%5Cevil.example",
        "%252F%252Fevil.example",
        "https://localhost@evil.example/",
        "javascript:alert(1)",
        "http://localhost/",
        "/\tx",
    ] {
        let enc = percent_encoding::utf8_percent_encode(rd, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
        let r = b.get(&w, &w.url(&format!("/.portcullis/sign_in?rd={enc}"))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "sign_in rd={rd}");
        assert!(r.text().contains("invalid-redirect"), "{rd}: {}", r.text());
        let r = b.get(&w, &w.url(&format!("/.portcullis/logout?rd={enc}"))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "logout rd={rd}");
    }
    // A path on this host, or this host in full, is fine.
    let r = b.get(&w, &w.url("/.portcullis/sign_in?rd=%2Fok%3Fa%3D1")).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let own =
        percent_encoding::utf8_percent_encode(&w.url("/ok"), percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let r = b.get(&w, &w.url(&format!("/.portcullis/sign_in?rd={own}"))).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
}

#[tokio::test]
async fn cookie_and_bearer_together_are_ambiguous() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let token = w.token("corp", &[]);
    let r = b
        .request(&w, Method::GET, &w.url("/"), &[("authorization", &format!("Bearer {token}"))], "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let e = w.last_event().await;
    assert_eq!(e["reason"], "ambiguous-credentials");
}

#[tokio::test]
async fn refresh_is_single_flight_and_failure_means_sign_in_again() {
    // ID tokens live 100 s and the proxy refreshes 200 s before expiry: due at once.
    let w = sso_world("refresh_before = \"200s\"").await;
    login(&w).set_id_token_ttl(100);
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The first request already refreshed (its response set the new cookie).
    assert_eq!(login(&w).refreshes(), 1);
    assert!(!set_cookies(&r).is_empty());
    // Now many parallel requests with a due session: one refresh between them.
    login(&w).set_id_token_ttl(100);
    let cookie = b.cookie_header();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url, cookie) = (w.client.clone(), w.url("/"), cookie.clone());
        tasks.push(tokio::spawn(async move {
            send_with(&c, Method::GET, &url, &[("cookie", &cookie)], Bytes::new()).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(
            set_cookies(&r).iter().any(|c| c.starts_with("__Host-_portcullis=1")),
            "new session cookie"
        );
    }
    assert_eq!(login(&w).refreshes(), 2, "one refresh for eight parallel requests");
    let m = w.admin_get("/metrics").await.text();
    let refreshed = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("portcullis_session_refreshes_total{issuer=\"corp\",outcome=\"ok\"} ")
        })
        .and_then(|v| v.parse::<u64>().ok());
    assert!(refreshed.is_some_and(|n| n >= 2), "refreshes counted:\n{m}");
    // The provider refuses the refresh: the browser signs in again, an API gets 401.
    login(&w).set_fail_refresh(true);
    let r =
        send_with(&w.client, Method::GET, &w.url("/"), &[("cookie", &cookie)], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "the old cookie's refresh result is reused briefly");
    let mut c = Browser::new();
    assert_eq!(c.sign_in(&w, "/", "carol", &["engineering"]).await.status, StatusCode::FOUND);
    assert!(c.session_cookie().is_none(), "refresh failed: no session");
}

#[tokio::test]
async fn idle_and_token_expiry_end_the_session() {
    let w =
        sso_world("idle_lifetime = \"2s\"\nabsolute_lifetime = \"1h\"\nrefresh_before = \"0s\"")
            .await;
    login(&w).set_no_refresh_tokens(true);
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = send_with(
        &w.client,
        Method::GET,
        &w.url("/"),
        &[("cookie", &b.cookie_header())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "session-expired");

    // No refresh token and an ID token that has expired: sign in again.
    // `exp` is whole seconds (`floor(now) + ttl`): start just after a second begins so
    // the token lives about `ttl` seconds, not anywhere between ttl - 1 and ttl (a 1 s
    // token issued at x.99 s was already expired at the callback on a slow CI machine).
    // The proxy checks an ID token's `exp` at the callback without leeway.
    const TTL: u64 = 3;
    login(&w).set_id_token_ttl(TTL);
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from(1010 - into_second.min(1000)))).await;
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK);
    // exp <= issue time + TTL <= now + TTL.
    tokio::time::sleep(Duration::from_millis(TTL * 1000 + 200)).await;
    let r = b.get(&w, &w.url("/")).await;
    assert_eq!(r.status, StatusCode::FOUND, "back to the provider");
    assert!(b.session_cookie().is_none(), "cleared");
    let e = w.last_event().await;
    assert_eq!(e["reason"], "login-required");
}

#[tokio::test]
async fn logout_clears_the_session_and_uses_the_end_session_endpoint() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    // Logout CSRF: a sign-out link planted on another site only asks; the session stays.
    for from in ["cross-site", "same-site"] {
        let logout = w.url("/.portcullis/logout?rd=%2F");
        let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", from)], "").await;
        assert_eq!(r.status, StatusCode::OK, "{from}");
        assert!(r.text().contains("href=\"/.portcullis/logout?rd=%2F\""), "{}", r.text());
        assert!(b.session_cookie().is_some(), "signed out by a {from} request");
        assert!(r.headers.get("set-cookie").is_none(), "{from}");
    }
    // A browser without Fetch Metadata: another origin named in `Origin` (a form POST
    // from there) or `Referer` (a link) is asked too, `http://` on this very host and
    // port included (another scheme is another origin).
    let logout = w.url("/.portcullis/logout");
    let plain = w.url("/").replacen("https://", "http://", 1);
    for h in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("referer", "https://evil.example/x"),
        ("origin", plain.trim_end_matches('/')),
        ("referer", plain.as_str()),
    ] {
        let r = b.request(&w, Method::POST, &logout, &[h], "").await;
        assert_eq!(r.status, StatusCode::OK, "{h:?}");
        assert!(r.text().contains("href=\"/.portcullis/logout\""), "{h:?}: {}", r.text());
        assert!(r.headers.get("set-cookie").is_none(), "{h:?}");
        assert!(b.session_cookie().is_some(), "signed out by {h:?}");
    }
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK, "still signed in");
    // A prefetch of the sign-out link (speculation rules on a page of the site, the person
    // only pointing at the link) signs nobody out: declined, the session untouched.
    let logout = w.url("/.portcullis/logout");
    for (name, purpose) in [
        ("sec-purpose", "prefetch"),
        ("sec-purpose", "prefetch;anonymous-client-ip"),
        // Older browsers: Chrome before `Sec-Purpose`, Firefox's `<link rel=prefetch>`.
        ("purpose", "prefetch"),
        ("x-moz", "prefetch"),
    ] {
        let h = [("sec-fetch-site", "same-origin"), (name, purpose)];
        let r = b.request(&w, Method::GET, &logout, &h, "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{purpose}: {}", r.text());
        assert!(r.headers.get("set-cookie").is_none(), "{purpose}");
        assert!(b.session_cookie().is_some(), "{purpose}");
    }
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK, "still signed in");
    // From the proxy's own page (same-origin), or typed in (none, or no header): signed out.
    // Spelt with an escape for an unreserved character, it is the same path (routed and
    // answered by its canonical form): it was served as a failed callback instead.
    let logout = w.url("/.portcullis/%6Cogout");
    let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", "same-origin")], "").await;
    assert_eq!(r.status, StatusCode::FOUND);
    let to = location(&r);
    assert!(to.starts_with(&format!("{}/logout?client_id=", w.urls["corp"])), "{to}");
    let back =
        percent_encoding::utf8_percent_encode(&w.url("/"), percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    assert!(to.contains(&format!("post_logout_redirect_uri={back}")), "{to}");
    assert!(b.session_cookie().is_none());
    let r = b.get(&w, &to).await;
    assert_eq!(location(&r), w.url("/"));
    let r = b.get(&w, &w.url("/")).await;
    assert_eq!(r.status, StatusCode::FOUND, "signed out: sign in again");
    let e = w
        .event_for(
            &w.events()
                .iter()
                .rev()
                .find(|e| e["path"] == "/.portcullis/logout")
                .map(|e| e["request_id"].as_str().unwrap_or_default().to_string())
                .unwrap_or_default(),
        )
        .await;
    assert_eq!(e["identity"]["subject"], "alice");
}

/// `/.portcullis/userinfo`: the session's identity as JSON (no-store, audited), on any
/// host a route serves; a JSON 401 without a session, or with a tampered one.
#[tokio::test]
async fn userinfo_tells_a_signed_in_browser_who_it_is() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    b.html = false;
    let r = b.get(&w, &w.url("/.portcullis/userinfo")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "login-required");
    assert_eq!(r.headers["cache-control"], "no-store");
    let refused = last_event_at(&w, "/.portcullis/userinfo").await;
    assert_eq!(refused["decision"], "deny", "{refused}");

    b.html = true;
    let r = b.sign_in(&w, "/", "alice", &["engineering", "sre"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    b.html = false;
    let before = std::time::SystemTime::now();
    let r = b.get(&w, &w.url("/.portcullis/userinfo")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["content-type"], "application/json");
    let info = r.json();
    assert_eq!(info["issuer"], "corp", "{info}");
    assert_eq!(info["subject"], "alice", "{info}");
    assert_eq!(info["email"], "alice@example.test", "{info}");
    assert_eq!(info["email_verified"], true, "{info}");
    assert_eq!(info["groups"], serde_json::json!(["engineering", "sre"]), "{info}");
    assert!(info.get("groups_unknown").is_none(), "{info}");
    let ends = humantime::parse_rfc3339(info["expires_at"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("expires_at: {e}: {info}"));
    assert!(ends > before, "{info}");
    let event = last_event_at(&w, "/.portcullis/userinfo").await;
    assert_eq!(event["decision"], "allow", "{event}");
    assert_eq!(event["identity"]["subject"], "alice", "{event}");
    // Never forwarded: the upstream (an echo) did not see it.
    assert!(event.get("upstream").is_none(), "{event}");

    // A tampered cookie: refused (and cleared), never read.
    let mut tampered = Browser::new();
    tampered.html = false;
    for (k, v) in &b.jar {
        let mut v = v.clone();
        if k == "__Host-_portcullis" {
            let mid = v.len() / 2;
            let c = if v.as_bytes()[mid] == b'A' { "B" } else { "A" };
            v.replace_range(mid..=mid, c);
        }
        tampered.jar.insert(k.clone(), v);
    }
    let r = tampered.get(&w, &w.url("/.portcullis/userinfo")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid-session");
    // Only GET (and HEAD).
    let r = b.request(&w, Method::POST, &w.url("/.portcullis/userinfo"), &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// The last HTTP event of `path` (each is written when its response ends).
async fn last_event_at(w: &World, path: &str) -> serde_json::Value {
    for _ in 0..100 {
        let events = w.events();
        if let Some(e) = events.iter().rev().find(|e| e["kind"] == "http" && e["path"] == path) {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no event for {path}");
}

/// A person's events say which groups they came with (what a `groups_any` rule decided
/// on), and signing in and out have their own reasons, not the proxy's `internal`.
#[tokio::test]
async fn people_are_audited_with_their_groups_and_sign_in_and_out_by_name() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "alice", &["engineering", "sre"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let logout = w.url("/.portcullis/logout");
    let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", "same-origin")], "").await;
    assert_eq!(r.status, StatusCode::FOUND);
    let signed_in = last_event_at(&w, "/.portcullis/callback").await;
    assert_eq!(signed_in["reason"], "signed-in", "{signed_in}");
    assert_eq!(signed_in["decision"], "allow", "{signed_in}");
    assert_eq!(signed_in["identity"]["groups"], serde_json::json!(["engineering", "sre"]));
    let allowed = last_event_at(&w, "/").await;
    assert_eq!(allowed["reason"], "allowed", "{allowed}");
    assert_eq!(allowed["rule"]["id"], "engineers", "{allowed}");
    assert_eq!(allowed["identity"]["groups"], serde_json::json!(["engineering", "sre"]));
    assert!(allowed["identity"].get("groups_truncated").is_none(), "{allowed}");
    let signed_out = last_event_at(&w, "/.portcullis/logout").await;
    assert_eq!(signed_out["reason"], "signed-out", "{signed_out}");
    assert_eq!(signed_out["identity"]["subject"], "alice", "{signed_out}");
    // And /metrics counts the sign-in, says which version runs and when keys last loaded.
    let m = w.admin_get("/metrics").await.text();
    let value = |series: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let sign_ins = value("portcullis_sign_ins_total{issuer=\"corp\",outcome=\"ok\"}");
    assert!(sign_ins.is_some_and(|n| n >= 1), "{m}");
    let version = format!("portcullis_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&version), Some(1), "{m}");
    let keys = value("portcullis_jwks_last_success_timestamp_seconds{issuer=\"corp\"}");
    let now = portcullis::util::unix_now();
    assert!(keys.is_some_and(|t| t <= now && t + 3600 > now), "{m}");
}

#[tokio::test]
async fn a_second_replica_with_the_same_key_accepts_the_session() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let (second, port, _) = replica(&w).await;
    let r = send_with(
        &w.client,
        Method::GET,
        &format!("https://localhost:{port}/replica"),
        &[("cookie", &b.cookie_header())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("alice"));
    second.shutdown().await;
}

/// With `[redis]`, a sign-out on one replica ends the session on every replica: on one
/// running (published), and on one started later (read back before it is ready).
#[tokio::test]
async fn a_sign_out_ends_the_session_on_every_replica_sharing_redis() {
    let Some(redis) = RedisServer::start("sign-out across replicas").await else { return };
    let w =
        World::with(Setup { sso: Some(String::new()), redis: redis.config(), ..Setup::default() })
            .await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let copy = b.cookie_header();
    let (second, port, sink) = replica(&w).await;
    let at = |port: u16| {
        let copy = copy.clone();
        let client = &w.client;
        async move {
            let url = format!("https://localhost:{port}/replica");
            send_with(client, Method::GET, &url, &[("cookie", &copy)], Bytes::new()).await
        }
    };
    assert_eq!(at(port).await.status, StatusCode::OK, "the copy works on the second replica");
    let logout = w.url("/.portcullis/logout");
    let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", "same-origin")], "").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let mut refused = at(port).await;
    for _ in 0..100 {
        if refused.status != StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        refused = at(port).await;
    }
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.text());
    assert_eq!(refused.json()["error"], "login-required");
    let found = sink
        .lines()
        .into_iter()
        .any(|l| l.contains(&request_id(&refused)) && l.contains("\"reason\":\"session-revoked\""));
    assert!(found, "the second replica audits the copy as session-revoked");
    // A replica started after the sign-out refuses the copy from its first request.
    let (third, port3, _) = replica(&w).await;
    assert_eq!(at(port3).await.status, StatusCode::UNAUTHORIZED);
    second.shutdown().await;
    third.shutdown().await;
}

/// A copy of `cookie` sent to the replica on `port`.
async fn copy_at(w: &World, port: u16, cookie: &str) -> Resp {
    let url = format!("https://localhost:{port}/replica");
    send_with(&w.client, Method::GET, &url, &[("cookie", cookie)], Bytes::new()).await
}

/// Asks the replica on `port` with `cookie` until it refuses it, for up to `within`.
async fn refused_within(w: &World, port: u16, cookie: &str, within: Duration) -> Resp {
    let started = std::time::Instant::now();
    loop {
        let r = copy_at(w, port, cookie).await;
        if r.status != StatusCode::OK || started.elapsed() > within {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sign_out(w: &World, b: &mut Browser) {
    let logout = w.url("/.portcullis/logout");
    let r = b.request(w, Method::GET, &logout, &[("sec-fetch-site", "same-origin")], "").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
}

/// Fail closed across replicas: a sign-out Redis could not take when it was made is
/// kept and shared once Redis is back, so the other replicas refuse the cookie too
/// (not only until the session's lifetime ends).
#[tokio::test]
async fn a_sign_out_made_while_redis_is_down_reaches_the_other_replicas_once_it_is_back() {
    let Some(mut redis) = RedisServer::start("sign-out during a Redis outage").await else {
        return;
    };
    let w =
        World::with(Setup { sso: Some(String::new()), redis: redis.config(), ..Setup::default() })
            .await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let copy = b.cookie_header();
    let (second, port, sink) = replica(&w).await;
    assert_eq!(copy_at(&w, port, &copy).await.status, StatusCode::OK);
    let redis_port = redis.port;
    redis.stop();
    sign_out(&w, &mut b).await;
    assert_eq!(copy_at(&w, w.https.port(), &copy).await.status, StatusCode::UNAUTHORIZED);
    // While Redis is down the second replica cannot know.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(copy_at(&w, port, &copy).await.status, StatusCode::OK);
    let metrics = w.admin_get("/metrics").await.text();
    assert!(!metrics.contains("portcullis_redis_sign_outs_unshared 0\n"), "{metrics}");
    let _redis = RedisServer::start_on("sign-out during a Redis outage, Redis back", redis_port)
        .await
        .unwrap_or_else(|| panic!("redis-server ran a moment ago"));
    // Both sides back off at most 5 s between attempts.
    let refused = refused_within(&w, port, &copy, Duration::from_secs(20)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.text());
    assert_eq!(refused.json()["error"], "login-required");
    let found = sink
        .lines()
        .into_iter()
        .any(|l| l.contains(&request_id(&refused)) && l.contains("\"reason\":\"session-revoked\""));
    assert!(found, "the second replica audits the copy as session-revoked");
    // Stored, not only published: a replica started now reads it back.
    let (third, port3, _) = replica(&w).await;
    assert_eq!(copy_at(&w, port3, &copy).await.status, StatusCode::UNAUTHORIZED);
    second.shutdown().await;
    third.shutdown().await;
}

/// Waits (at most `within`) until `list` refuses the session `key` signed in at
/// `created`: another replica's sign-out has reached it.
async fn hears_of(
    list: &portcullis::session::revoke::Revocations,
    key: [u8; 16],
    created: u64,
    within: Duration,
) {
    let deadline = std::time::Instant::now() + within;
    while list.refused(&key, created).is_none() {
        assert!(std::time::Instant::now() < deadline, "the other replica never heard of it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request still in flight when a shutdown begins may sign out (its connection is
/// drained, not cut): that sign-out is shared before the replica exits.
#[tokio::test]
async fn a_sign_out_made_during_a_shutdown_drain_is_still_shared() {
    use portcullis::session::revoke::Revoked;
    let Some(redis) = RedisServer::start("sign-out during a drain").await else { return };
    let w =
        World::with(Setup { sso: Some(String::new()), redis: redis.config(), ..Setup::default() })
            .await;
    let (first, first_port, _) = replica(&w).await;
    let (second, _, _) = replica(&w).await;
    let ours = first.shared.runtime.load().revocations.clone();
    let theirs = second.shared.runtime.load().revocations.clone();
    // A connection the drain waits for (up to the 5 s grace), accepted (and holding its
    // slot) before the shutdown stops the accept loop.
    let held = accepted_mid_handshake(&w.pki, first_port).await;
    let now = portcullis::util::unix_now();
    let (key, created) = ([42u8; 16], now - 10);
    let during_drain = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ours.revoke(key, created, 3600, now), Revoked::Recorded);
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
    };
    let started = std::time::Instant::now();
    tokio::join!(first.shutdown(), during_drain);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(600), "the drain waited for the connection: {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    hears_of(&theirs, key, created, Duration::from_secs(5)).await;
    second.shutdown().await;
}

/// A replica shut down while Redis is unreachable after a long outage (its retries
/// backed off to 5 s) still shares its waiting sign-outs when Redis comes back during
/// the shutdown's last attempts.
#[tokio::test]
async fn a_replica_shut_down_during_an_outage_shares_its_sign_outs_if_redis_comes_back_in_time() {
    use portcullis::session::revoke::Revoked;
    let Some(mut redis) = RedisServer::start("sign-out shared at shutdown").await else { return };
    let w =
        World::with(Setup { sso: Some(String::new()), redis: redis.config(), ..Setup::default() })
            .await;
    let (first, _, _) = replica(&w).await;
    let (second, _, _) = replica(&w).await;
    let ours = first.shared.runtime.load().revocations.clone();
    let theirs = second.shared.runtime.load().revocations.clone();
    let redis_port = redis.port;
    redis.stop();
    let now = portcullis::util::unix_now();
    let (key, created) = ([43u8; 16], now - 10);
    assert_eq!(ours.revoke(key, created, 3600, now), Revoked::Recorded);
    // Long enough for the retries to back off to 5 s apart.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let back_soon = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        RedisServer::start_on("sign-out shared at shutdown, Redis back", redis_port).await
    };
    let ((), back) = tokio::join!(first.shutdown(), back_soon);
    let _back = back.unwrap_or_else(|| panic!("redis-server ran a moment ago"));
    hears_of(&theirs, key, created, Duration::from_secs(10)).await;
    second.shutdown().await;
}

/// `key_prefix` may hold characters `SCAN … MATCH` reads as a pattern: the stored
/// sign-outs are read back all the same.
#[tokio::test]
async fn stored_sign_outs_are_read_back_whatever_characters_the_key_prefix_holds() {
    let Some(redis) = RedisServer::start("key prefix with pattern characters").await else {
        return;
    };
    let config = format!("{}key_prefix = 'dep[1]?\\:'\n", redis.config());
    let w =
        World::with(Setup { sso: Some(String::new()), redis: config, ..Setup::default() }).await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let copy = b.cookie_header();
    sign_out(&w, &mut b).await;
    // Stored and published before the replica below starts: only its read-back can
    // tell it.
    let mut stored = 0;
    for _ in 0..200 {
        stored = redis.stored_sign_outs().await;
        if stored > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored, 1, "the sign-out was not stored in Redis");
    let (late, port, _) = replica(&w).await;
    let r = copy_at(&w, port, &copy).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    late.shutdown().await;
}

#[tokio::test]
async fn group_overage_fails_closed() {
    let w = sso_world("").await;
    login(&w).set_groups_overage(true);
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let e = w.last_event().await;
    assert_eq!(e["reason"], "groups-unknown");
}

#[tokio::test]
async fn large_sessions_are_chunked_and_reassembled() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    // A 64-character user name gives a normal session; chunking is covered with many
    // groups in the unit tests. Here: chunks sent in any order are reassembled.
    assert_eq!(
        b.sign_in(&w, "/", "alice", &["engineering", "sre", "admins", "release-managers"])
            .await
            .status,
        StatusCode::OK
    );
    let r = b.get(&w, &w.url("/")).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn nothing_secret_reaches_the_audit_log() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let callback = b.through_provider(&w, "/", "alice", &["engineering"]).await;
    let login_cookie = b.jar.values().next().cloned().unwrap_or_default();
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(b.get(&w, &w.url("/")).await.status, StatusCode::OK);
    let q = |name: &str| {
        callback
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap_or("x")
            .to_string()
    };
    let (code, state) = (q("code"), q("state"));
    let session = b.session_cookie().cloned().unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = w.sink.lines().join("\n");
    assert!(!log.is_empty());
    for secret in [&code, &state, &session, &login_cookie] {
        assert!(secret.len() > 10);
        assert!(!log.contains(secret.as_str()), "a secret is in the audit log");
        assert!(!log.contains(&secret[..12]), "part of a secret is in the audit log");
    }
}

/// Allows people of either human issuer.
const PEOPLE_OF_BOTH: &str = r#"
[[rule]]
id = "people"
effect = "allow"
issuer = ["corp", "partner"]
"#;

/// The `href`s of the chooser page's links, unescaped.
fn chooser_links(html: &str) -> Vec<(String, String)> {
    html.split("<a class=\"button\" href=\"")
        .skip(1)
        .filter_map(|rest| {
            let (href, rest) = rest.split_once("\">")?;
            let (label, _) = rest.split_once("</a>")?;
            Some((label.to_string(), href.replace("&amp;", "&")))
        })
        .collect()
}

/// Two issuers people sign in with (`corp` and `partner`), both let in by the policy.
async fn two_logins_world() -> World {
    World::with(Setup {
        sso: Some(String::new()),
        second_login: true,
        policies: vec![("api".into(), PEOPLE_OF_BOTH.into())],
        ..Setup::default()
    })
    .await
}

fn partner(w: &World) -> &portcullis::dev::login::DevLogin {
    w.login2.as_ref().unwrap_or_else(|| panic!("no second dev login"))
}

#[tokio::test]
async fn two_issuers_with_login_get_the_chooser_and_either_signs_in() {
    let w = two_logins_world().await;
    let partner = partner(&w);
    let mut b = Browser::new();

    // A protected page sends the browser to the chooser, not to one provider.
    let r = b.get(&w, &w.url("/app/page?x=1")).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let chooser = location(&r);
    assert!(chooser.starts_with("/.portcullis/sign_in?rd="), "{chooser}");
    assert!(b.jar.is_empty(), "no login is started before a choice: {:?}", b.jar);

    // The chooser lists both issuers, each link carrying the return target.
    let r = b.get(&w, &w.url(&chooser)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ct = r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(ct.starts_with("text/html"), "{ct}");
    let links = chooser_links(&r.text());
    let labels: Vec<&str> = links.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels, ["Sign in with corp", "Sign in with partner"], "{}", r.text());
    assert!(b.jar.is_empty(), "showing the chooser starts no login: {:?}", b.jar);
    let rd = chooser.trim_start_matches("/.portcullis/sign_in?");

    // Each link starts the sign-in with its own provider: state, nonce and PKCE.
    let mut authorize = BTreeMap::new();
    for ((_, href), issuer) in links.iter().zip(["corp", "partner"]) {
        assert_eq!(href, &format!("/.portcullis/sign_in?issuer={issuer}&{rd}"));
        let r = b.get(&w, &w.url(href)).await;
        assert_eq!(r.status, StatusCode::FOUND, "{issuer}: {}", r.text());
        let to = location(&r);
        assert!(to.starts_with(&format!("{}/authorize?", w.urls[issuer])), "{issuer}: {to}");
        for p in [
            "response_type=code",
            "code_challenge_method=S256",
            "code_challenge=",
            "state=",
            "nonce=",
            "scope=openid",
        ] {
            assert!(to.contains(p), "{issuer}: {p} in {to}");
        }
        assert!(
            set_cookies(&r).iter().any(|c| c.starts_with("__Host-_portcullis_login_")),
            "{issuer}: a login cookie binds the state"
        );
        authorize.insert(issuer, to);
    }
    assert_ne!(authorize["corp"], authorize["partner"]);

    // Choosing the second issuer completes a sign-in whose identity names it.
    let to = &authorize["partner"];
    let form = b.get(&w, to).await;
    assert_eq!(form.status, StatusCode::OK, "{}", form.text());
    let r = b.request(&w, Method::POST, to, &[], "username=carol&groups=partners").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let callback = location(&r);
    assert!(callback.contains("/.portcullis/callback?"), "{callback}");
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "callback: {}", r.text());
    assert_eq!(location(&r), w.url("/app/page?x=1"));
    assert!(b.session_cookie().is_some(), "{:?}", b.jar);
    let r = b.get(&w, &w.url("/app/page?x=1")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-issuer").as_deref(), Some("partner"));
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("carol"));
    let e = w.last_event().await;
    assert_eq!(e["identity"]["issuer"], "partner", "{e}");
    assert_eq!(e["identity"]["subject"], "carol", "{e}");
    assert_eq!(partner.code_exchanges(), 1);
    assert_eq!(login(&w).code_exchanges(), 0, "the first issuer was never asked for a code");
}

/// The mix-up attack (RFC 9207 §2): a sign-in started with one provider (`partner`,
/// here the malicious one) that sends the browser on to the honest provider with this
/// sign-in's state gets the honest provider's code back, naming it in `iss`. The
/// callback refuses it before the code goes anywhere: not to the token endpoint of the
/// provider the sign-in began with (which would get the code and the PKCE verifier),
/// nor to the honest one.
#[tokio::test]
async fn a_code_from_another_provider_than_the_sign_in_began_with_goes_nowhere() {
    let w = two_logins_world().await;
    let partner = partner(&w);
    let mut b = Browser::new();
    let rd = format!("rd={}", urlencode(&w.url("/app/page")));
    let r = b.get(&w, &w.url(&format!("/.portcullis/sign_in?issuer=partner&{rd}"))).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let to_partner = location(&r);
    assert!(to_partner.starts_with(&w.urls["partner"]), "{to_partner}");
    // The malicious provider forwards the request, state and all, to the honest one.
    let to_corp = to_partner.replacen(&w.urls["partner"], &w.urls["corp"], 1);
    let form = b.get(&w, &to_corp).await;
    assert_eq!(form.status, StatusCode::OK, "{}", form.text());
    let r = b.request(&w, Method::POST, &to_corp, &[], "username=alice").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let callback = location(&r);
    assert!(callback.contains(&format!("iss={}", urlencode(&w.urls["corp"]))), "{callback}");
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(b.session_cookie().is_none(), "a mixed-up code signed in");
    let e = w.last_event().await;
    assert_eq!(e["reason"], "login-failed", "{e}");
    assert!(e["detail"].as_str().unwrap_or_default().contains("another issuer"), "{e}");
    assert_eq!(partner.code_exchanges(), 0, "the code went to the provider the sign-in began with");
    assert_eq!(login(&w).code_exchanges(), 0);
}

/// A valid session from an issuer one route does not accept is not cleared there: it
/// still works on the routes that do (a link to the other route must not sign anyone out).
#[tokio::test]
async fn a_session_is_kept_on_a_route_that_does_not_accept_its_issuer() {
    let routes = "[[routes]]\nname = \"partners-only\"\nmatch = { path_prefix = \"/partners\" }\nupstream = \"http://{echo}\"\npolicy = \"api\"\nissuers = [\"partner\"]\n".to_string();
    let w = World::with(Setup {
        sso: Some(String::new()),
        second_login: true,
        routes,
        policies: vec![("api".into(), PEOPLE_OF_BOTH.into())],
        ..Setup::default()
    })
    .await;
    let mut b = Browser::new();
    // Signed in with corp through the default route (which accepts both issuers).
    let r = b.get(&w, &w.url("/app")).await;
    let chooser = location(&r);
    let r = b.get(&w, &w.url(&format!("{chooser}&issuer=corp"))).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let to = location(&r);
    let _ = b.get(&w, &to).await;
    let r = b.request(&w, Method::POST, &to, &[], "username=alice&groups=engineering").await;
    let r = b.get(&w, &location(&r)).await;
    assert_eq!(r.status, StatusCode::FOUND, "callback: {}", r.text());
    let session = b.session_cookie().map(|c| c.to_string());
    assert!(session.is_some());
    assert_eq!(b.get(&w, &w.url("/app")).await.status, StatusCode::OK);

    // The partners-only route sends the browser to sign in with partner, and keeps the
    // corp session in the jar.
    let r = b.get(&w, &w.url("/partners/x")).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert!(
        !set_cookies(&r).iter().any(|c| c.starts_with("__Host-_portcullis=")),
        "the session was cleared: {:?}",
        set_cookies(&r)
    );
    assert_eq!(b.session_cookie().map(|c| c.to_string()), session);
    assert_eq!(b.get(&w, &w.url("/app")).await.status, StatusCode::OK, "signed out elsewhere");
}

#[tokio::test]
async fn sign_ins_in_progress_are_capped_oldest_first_and_a_long_deep_link_still_signs_in() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    let pending = |b: &Browser| -> Vec<String> {
        b.jar.keys().filter(|k| k.starts_with("__Host-_portcullis_login_")).cloned().collect()
    };
    // Ten tabs sent to sign in, none finishing (a page re-navigating a window): the
    // browser never holds more than three sign-ins, and keeps the newest.
    let mut started = Vec::new();
    for i in 0..10 {
        let before = pending(&b);
        let r = b.get(&w, &w.url(&format!("/app/{i}"))).await;
        assert_eq!(r.status, StatusCode::FOUND);
        let new: Vec<String> = pending(&b).into_iter().filter(|k| !before.contains(k)).collect();
        assert_eq!(new.len(), 1, "one new sign-in per navigation");
        started.extend(new);
        assert!(pending(&b).len() <= 3, "{} pending after {i}", pending(&b).len());
    }
    let mut newest: Vec<String> = started[7..].to_vec();
    newest.sort();
    assert_eq!(pending(&b), newest, "the three newest are kept");
    // A fetch() asking for HTML is not a navigation: 401, no redirect, no login cookie.
    let r = b.request(&w, Method::GET, &w.url("/app/xhr"), &[("sec-fetch-mode", "cors")], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(set_cookies(&r).is_empty(), "{:?}", set_cookies(&r));
    let r =
        b.request(&w, Method::GET, &w.url("/app/tab"), &[("sec-fetch-mode", "navigate")], "").await;
    assert_eq!(r.status, StatusCode::FOUND);

    // A deep link longer than a return target may be signs in and lands on its path.
    let mut b = Browser::new();
    let long = format!("/app/deep?q={}", "a".repeat(2100));
    let callback = b.through_provider(&w, &long, "alice", &["engineering"]).await;
    let r = b.get(&w, &callback).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert_eq!(location(&r), w.url("/app/deep"));
    assert!(b.session_cookie().is_some());
}

/// A deep link whose query holds an encoded space or backslash (a search, a Windows
/// path) signs in and lands on it: the query does not choose the destination, so it is
/// not held to the checks of the path (anyone could send such a link to make a
/// victim's sign-in fail after the provider).
#[tokio::test]
async fn a_deep_link_with_an_encoded_space_or_backslash_in_its_query_signs_in() {
    let w = sso_world("").await;
    for deep in ["/app/search?q=hello%20world", "/app/f?p=C%3A%5Ctmp"] {
        let mut b = Browser::new();
        let callback = b.through_provider(&w, deep, "alice", &["engineering"]).await;
        let r = b.get(&w, &callback).await;
        assert_eq!(r.status, StatusCode::FOUND, "{deep}: {}", r.text());
        assert_eq!(location(&r), w.url(deep));
        assert!(b.session_cookie().is_some(), "{deep}");
    }
    // The path still is: an encoded backslash there is refused at the start.
    let mut b = Browser::new();
    let r = b.get(&w, &w.url("/.portcullis/sign_in?rd=/%255Cevil.example%3Fq%3D1")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

/// `Host: localhost:` (an empty port, read as `localhost`) signs in with the callback
/// and the return address on `localhost`, never on `localhost:`.
#[tokio::test]
async fn a_host_with_an_empty_port_signs_in_at_the_host_without_a_port() {
    let w = sso_world("").await;
    let request = "GET /app/page HTTP/1.1\r\nHost: localhost:\r\nAccept: text/html\r\nConnection: close\r\n\r\n";
    let resp = crate::forwarding::raw_exchange(&w, request).await;
    assert!(resp.starts_with("HTTP/1.1 302 "), "{resp}");
    let to = resp
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().starts_with("location:").then(|| l[9..].trim().to_string())
        })
        .unwrap_or_default();
    assert!(to.contains("redirect_uri=https%3A%2F%2Flocalhost%2F.portcullis%2Fcallback"), "{to}");
    assert!(!to.contains("localhost%3A%2F"), "{to}");
}

/// A raw upstream that answers every request with `Connection: close` and the head
/// `answer(path)` gives, then `ok`.
async fn raw_upstream(
    answer: fn(&str) -> &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    raw_answering(move |head| {
        let path = head.split(' ').nth(1).unwrap_or_default();
        format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 2\r\nConnection: close\r\n\r\nok",
            answer(path)
        )
    })
    .await
}

/// The proxy's renewed session cookie rides on an upstream answer the upstream made
/// publicly cacheable (a stylesheet): the answer becomes the browser's alone, so no
/// shared cache in front can keep it and hand the session to the next visitor. The
/// browser keeps its `max-age`; an answer without the proxy's cookie is left alone.
#[tokio::test]
async fn a_response_carrying_a_renewed_session_is_never_shared_cacheable() {
    let (addr, upstream) = raw_upstream(|path| match path {
        "/cache/none" => "",
        "/cache/private" => "Cache-Control: private, max-age=60\r\n",
        _ => "Cache-Control: public, max-age=3600, s-maxage=86400\r\nCDN-Cache-Control: max-age=86400\r\nExpires: Thu, 01 Jan 2099 00:00:00 GMT\r\n",
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"cache\"\nmatch = {{ path_prefix = \"/cache\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup {
        sso: Some("refresh_before = \"200s\"".into()),
        routes,
        ..Setup::default()
    })
    .await;
    // ID tokens live 100 s and are refreshed 200 s before expiry: every request renews.
    login(&w).set_id_token_ttl(100);
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "alice", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let cache_control = |r: &Resp| {
        r.headers
            .get_all("cache-control")
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    for (path, want) in [
        ("/cache/style.css", "max-age=3600, private"),
        ("/cache/none", "private"),
        ("/cache/private", "private, max-age=60"),
    ] {
        let r = b.get(&w, &w.url(path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert!(
            set_cookies(&r).iter().any(|c| c.starts_with("__Host-_portcullis=")),
            "{path}: the session was renewed"
        );
        assert_eq!(cache_control(&r), want, "{path}");
        assert!(r.headers.get("cdn-cache-control").is_none(), "{path}");
    }
    // A bearer request gets no cookie: the upstream's caching is its own business.
    let t = w.token("corp", &[r#"groups:=["engineering"]"#]);
    let r = w.get("/cache/style.css", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(set_cookies(&r).is_empty());
    assert_eq!(cache_control(&r), "public, max-age=3600, s-maxage=86400");
    assert!(r.headers.get("cdn-cache-control").is_some());
    upstream.abort();
}

/// An answer the session cookie was let in for is that person's. A shared cache in front
/// of the proxy (a CDN that caches `.pdf` and `.css` whatever the request's cookies, or
/// gives an answer without `Cache-Control` heuristic freshness) stored it and served it to
/// anyone asking for the URL, the proxy never asked: it is made `private`, unless the
/// upstream decided (`private`, `no-store`, `no-cache`, or shared on purpose with
/// `public` / `s-maxage` / a CDN's own field, as RFC 9111 §3.5 lets it for
/// `Authorization`). Bearer requests are left to RFC 9111 §3.5.
#[tokio::test]
async fn a_session_authenticated_answer_is_not_left_shared_cacheable() {
    let (addr, upstream) = raw_upstream(|path| match path {
        "/cache/none" => "Last-Modified: Thu, 01 Jan 2015 00:00:00 GMT\r\n",
        "/cache/max-age" => "Cache-Control: max-age=600\r\n",
        "/cache/public" => "Cache-Control: public, max-age=600\r\n",
        "/cache/no-cache" => "Cache-Control: no-cache\r\n",
        "/cache/cdn" => "CDN-Cache-Control: max-age=60\r\n",
        "/cache/split" => "Cache-Control: max-age=600\r\nCache-Control: no-cache\r\n",
        "/cache/field-private" => "Cache-Control: max-age=600, private=\"Set-Cookie\"\r\n",
        "/cache/field-no-cache" => "Cache-Control: no-cache=\"Set-Cookie\", max-age=600\r\n",
        "/cache/must-understand" => "Cache-Control: no-store, must-understand, max-age=600\r\n",
        _ => "Cache-Control: no-store\r\n",
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"cache\"\nmatch = {{ path_prefix = \"/cache\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { sso: Some(String::new()), routes, ..Setup::default() }).await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let cache_control = |r: &Resp| {
        r.headers
            .get_all("cache-control")
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    for (path, want) in [
        ("/cache/none", "private"),
        ("/cache/max-age", "max-age=600, private"),
        ("/cache/public", "public, max-age=600"),
        ("/cache/no-cache", "no-cache"),
        ("/cache/cdn", ""),
        ("/cache/no-store", "no-store"),
        ("/cache/split", "max-age=600 | no-cache"),
        // Field-limited: a shared cache may store and serve the rest (RFC 9111 §5.2.2.4,
        // §5.2.2.7); `no-store` is ignored by a cache that understands the status.
        ("/cache/field-private", "max-age=600, private=\"Set-Cookie\", private"),
        ("/cache/field-no-cache", "no-cache=\"Set-Cookie\", max-age=600, private"),
        ("/cache/must-understand", "no-store, must-understand, max-age=600, private"),
    ] {
        let r = b.get(&w, &w.url(path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert!(set_cookies(&r).is_empty(), "{path}: not a renewal");
        assert_eq!(cache_control(&r), want, "{path}");
    }
    // A bearer request: RFC 9111 §3.5 already keeps shared caches from storing it.
    let t = w.token("corp", &[r#"groups:=["engineering"]"#]);
    let r = w.get("/cache/none", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(cache_control(&r), "");
    upstream.abort();
}

/// A deny on an ID-token claim (`claims = { name = ... }`), for the human issuer.
const NO_MALLORY: &str = r#"
[[rule]]
id = "no-mallory"
effect = "deny"
issuer = "corp"
claims = { name = "mallory" }
"#;

/// The session keeps the ID-token claims the policies name: a deny on `name` stops the
/// browser session of the person it stops as a bearer ID token (it used to see only
/// sub/email/groups, and let her in).
#[tokio::test]
async fn a_deny_on_an_id_token_claim_applies_to_browser_sessions() {
    let w = World::with(Setup {
        sso: Some(String::new()),
        policies: vec![("api".into(), format!("{ALLOW_ALL_PRESETS}{NO_MALLORY}"))],
        ..Setup::default()
    })
    .await;
    let token = w.token("corp", &["sub=mallory", "name=mallory", "groups:=[\"engineering\"]"]);
    assert_eq!(w.get("/", Some(&token)).await.status, StatusCode::FORBIDDEN);

    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "mallory", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let e = w.last_event().await;
    assert_eq!(e["identity"]["subject"], "mallory");
    assert_eq!((&e["reason"], &e["rule"]["id"]), (&"denied-by-rule".into(), &"no-mallory".into()));
    assert_eq!(e["detail"], "denied by policy", "{e}");
    assert_eq!(b.get(&w, &w.url("/app")).await.status, StatusCode::FORBIDDEN);

    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
}

/// A deny on a claim added by a reload after the sign-in: the session did not keep the
/// claim, so the deny applies to it (fail closed) and the audit says why; signing in
/// again keeps the claim, and the rule then decides on its value.
#[tokio::test]
async fn a_claim_deny_added_after_sign_in_applies_until_the_session_signs_in_again() {
    let w = sso_world("").await;
    let mut mallory = Browser::new();
    assert_eq!(mallory.sign_in(&w, "/", "mallory", &["engineering"]).await.status, StatusCode::OK);
    let mut alice = Browser::new();
    assert_eq!(alice.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);

    write(&w.policy_path("api"), &format!("{ALLOW_ALL_PRESETS}{NO_MALLORY}"));
    assert!(w.server().reload().await);
    let detail = "claim `name` not kept by the session: deny applies; sign in again";
    for b in [&mut mallory, &mut alice] {
        let r = b.get(&w, &w.url("/app")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
        let e = w.last_event().await;
        assert_eq!(e["reason"], "denied-by-rule", "{e}");
        assert_eq!(e["rule"]["id"], "no-mallory", "{e}");
        assert_eq!(e["detail"], detail, "{e}");
    }

    // Signed in again: the session keeps `name`; alice is let in, mallory is not.
    let mut alice = Browser::new();
    assert_eq!(alice.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let mut mallory = Browser::new();
    let r = mallory.sign_in(&w, "/", "mallory", &["engineering"]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let e = w.last_event().await;
    assert_eq!(
        (&e["rule"]["id"], &e["detail"]),
        (&"no-mallory".into(), &"denied by policy".into())
    );
}

/// A refresh that brings a new ID token keeps the claims the policies name now: a
/// deny on a claim added by reload decides on the claim's value from then on.
#[tokio::test]
async fn a_refresh_keeps_the_claims_a_reload_added() {
    // ID tokens live 100 s and the proxy refreshes 200 s before expiry: every request.
    let w = sso_world("refresh_before = \"200s\"").await;
    login(&w).set_id_token_ttl(100);
    let mut mallory = Browser::new();
    assert_eq!(mallory.sign_in(&w, "/", "mallory", &["engineering"]).await.status, StatusCode::OK);
    let mut alice = Browser::new();
    assert_eq!(alice.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let before = login(&w).refreshes();

    write(&w.policy_path("api"), &format!("{ALLOW_ALL_PRESETS}{NO_MALLORY}"));
    assert!(w.server().reload().await);
    assert_eq!(alice.get(&w, &w.url("/app")).await.status, StatusCode::OK);
    let r = mallory.get(&w, &w.url("/app")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let e = w.last_event().await;
    assert_eq!(
        (&e["rule"]["id"], &e["detail"]),
        (&"no-mallory".into(), &"denied by policy".into())
    );
    assert!(login(&w).refreshes() >= before + 2, "the sessions were refreshed");
}

/// A session renewed on a request the policy refuses still reaches the browser: the
/// refusal carries the renewed cookie (a refresh may have rotated the provider's refresh
/// token, and the browser's old cookie would then sign it out).
#[tokio::test]
async fn a_refused_request_still_carries_the_renewed_session() {
    let w = sso_world("idle_lifetime = \"8s\"").await;
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "bob", &["sales"]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let before = b.session_cookie().cloned().unwrap_or_else(|| panic!("no session"));
    // Past the touch interval (an eighth of idle_lifetime, at least 1 s).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = b.get(&w, &w.url("/")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let renewed = set_cookies(&r);
    assert!(
        renewed.iter().any(|c| c.starts_with("__Host-_portcullis=") && !c.contains("Max-Age=0")),
        "{renewed:?}"
    );
    assert_ne!(b.session_cookie(), Some(&before), "the browser keeps the renewed session");
    assert_eq!(r.headers.get("cache-control").map(|v| v.as_bytes()), Some(&b"no-store"[..]));
}

/// A route's `claim_headers` reach the upstream from a browser session as from a bearer
/// token: the session keeps the claims they name (no policy names `name`), a client's
/// own copy goes. (A claim too large to keep sends no header: `src/session/tests.rs`,
/// the dev sign-in takes no such claim.)
#[tokio::test]
async fn a_browser_session_forwards_the_claims_a_route_names() {
    let w = World::with(Setup {
        sso: Some(String::new()),
        route_extra: r#"claim_headers = { "X-Name" = "name", "X-Groups" = "groups" }"#.into(),
        ..Setup::default()
    })
    .await;
    let mut b = Browser::new();
    let r = b.sign_in(&w, "/", "alice", &["engineering", "sre"]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-name").as_deref(), Some("alice"), "{}", r.text());
    assert_eq!(r.upstream_header("x-groups").as_deref(), Some("engineering,sre"));
    let forged = [("x-name", "mallory"), ("X_Name", "mallory"), ("x-groups", "admins")];
    let r = b.request(&w, Method::GET, &w.url("/app"), &forged, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let h = &r.json()["headers"];
    assert_eq!(h["x-name"], serde_json::json!(["alice"]), "{h}");
    assert_eq!(h["x-groups"], serde_json::json!(["engineering,sre"]), "{h}");
    assert!(h.get("x_name").is_none(), "{h}");
}

/// Cross-site WebSocket hijacking: a page on a sibling host (`evil.example.com` is the
/// same site as `app.example.com`, so `SameSite=Lax` sends the session cookie with its
/// WebSocket handshake, and no CORS check keeps it from reading the tunnel) opens a
/// tunnel as the signed-in user. Only a page of the proxy's own origin may; a client
/// without `Origin` is no browser, and a bearer token is never sent by a browser on its
/// own.
#[tokio::test]
async fn a_websocket_from_a_page_of_another_origin_does_not_ride_the_session() {
    use crate::forwarding::{echo_once, ws_connect_with};
    use tokio_tungstenite::tungstenite::Error;
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let cookie = format!("__Host-_portcullis={}", b.session_cookie().cloned().unwrap_or_default());
    let port = w.https.port();
    let other_port = format!("https://localhost:{}", port.wrapping_add(1));
    let plain = format!("http://localhost:{port}");
    let with_path = format!("https://localhost:{port}/x");
    for origin in [
        "https://evil.localhost",
        "https://localhost.evil.example",
        "null",
        other_port.as_str(),
        plain.as_str(),
        with_path.as_str(),
    ] {
        match ws_connect_with(&w, "/ws", &[("cookie", &cookie), ("origin", origin)]).await {
            Err(Error::Http(r)) => assert_eq!(r.status(), StatusCode::FORBIDDEN, "{origin}"),
            Err(e) => panic!("{origin}: {e}"),
            Ok(_) => panic!("a page of {origin} opened a tunnel with the session"),
        }
        let ev = w.last_event().await;
        assert_eq!(ev["reason"], "cross-origin", "{origin}: {ev}");
        assert_eq!(ev["decision"], "deny", "{origin}: {ev}");
        assert_eq!(ev["identity"]["subject"], "alice", "{origin}: {ev}");
    }
    // The proxy's own pages may, and so may a client that sends no Origin.
    let own = format!("https://localhost:{port}");
    for headers in
        [vec![("cookie", cookie.as_str()), ("origin", own.as_str())], vec![("cookie", &cookie)]]
    {
        let mut ws = ws_connect_with(&w, "/ws", &headers)
            .await
            .unwrap_or_else(|e| panic!("{headers:?}: {e}"));
        assert!(echo_once(&mut ws).await, "{headers:?}");
    }
    // A bearer token is the client's own doing, from any origin.
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let mut ws = ws_connect_with(
        &w,
        "/ws",
        &[("authorization", &auth), ("origin", "https://evil.localhost")],
    )
    .await
    .unwrap_or_else(|e| panic!("bearer: {e}"));
    assert!(echo_once(&mut ws).await);
}

// --- Sign-out ends the session, not only its cookie in one browser ---

/// The first audit event `pred` picks (waiting for the writer a moment).
async fn event_where(w: &World, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..500 {
        if let Some(e) = w.events().into_iter().find(|e| e["kind"] == "http" && pred(e)) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no such event in {:?}", w.events());
}

/// A request carrying only `cookie` (a copy of a session cookie in a tool).
async fn with_cookie(w: &World, path: &str, cookie: &str) -> Resp {
    send_with(&w.client, Method::GET, &w.url(path), &[("cookie", cookie)], Bytes::new()).await
}

fn renews_the_session(r: &Resp) -> bool {
    set_cookies(r).iter().any(|c| c.starts_with("__Host-_portcullis=") && !c.contains("Max-Age=0"))
}

fn clears_the_session(r: &Resp) -> bool {
    set_cookies(r).iter().any(|c| c.starts_with("__Host-_portcullis=") && c.contains("Max-Age=0"))
}

/// A copy of a session's cookie (stolen, another browser profile, a tool) stops working
/// when the session signs out, whichever way the sign-out came: confirmed after a link
/// from another site, or direct. It is treated as no session (a tool gets 401
/// `login-required`, a browser is sent to sign in, `/.portcullis/userinfo` says 401), the
/// cookie is cleared, and the log says `session-revoked`. The same person's other
/// session is not touched.
#[tokio::test]
async fn signing_out_refuses_every_copy_of_the_session_cookie() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let mut other = Browser::new();
    assert_eq!(other.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let value = b.session_cookie().cloned().unwrap_or_default();
    let copy = format!("__Host-_portcullis={value}");
    assert_eq!(with_cookie(&w, "/", &copy).await.status, StatusCode::OK);

    // Asked from another site, a sign-out only asks to be confirmed: nothing ends yet.
    let logout = w.url("/.portcullis/logout?rd=%2F");
    let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", "cross-site")], "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(with_cookie(&w, "/", &copy).await.status, StatusCode::OK, "ended unconfirmed");
    // Confirmed (the page's button is same-origin): the session ends everywhere.
    let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", "same-origin")], "").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert!(b.session_cookie().is_none());
    let out = event_where(&w, |e| e["reason"] == "signed-out").await;
    assert_eq!(out["detail"], "signed out; session revoked; RP-initiated logout at the provider");
    assert_eq!(out["identity"]["subject"], "alice", "{out}");

    // The copy in a tool: 401 as without a session, the cookie cleared, the cause logged.
    let r = with_cookie(&w, "/", &copy).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "login-required");
    assert!(clears_the_session(&r) && !renews_the_session(&r), "{:?}", set_cookies(&r));
    let e = w.event_for(&request_id(&r)).await;
    assert_eq!(e["reason"], "session-revoked", "{e}");
    assert_eq!(e["detail"], "session signed out at /.portcullis/logout", "{e}");
    assert!(e.get("identity").is_none(), "a signed-out session is no identity: {e}");
    let r = with_cookie(&w, "/.portcullis/userinfo", &copy).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "login-required");
    assert_eq!(w.event_for(&request_id(&r)).await["reason"], "session-revoked");
    // The copy in another browser: sent to sign in, the cookie deleted.
    let mut thief = Browser::new();
    thief.jar.insert("__Host-_portcullis".into(), value);
    let r = thief.get(&w, &w.url("/deep/link")).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert!(location(&r).starts_with(&w.urls["corp"]), "{}", location(&r));
    assert!(thief.session_cookie().is_none(), "{:?}", thief.jar);
    let e = event_where(&w, |e| e["path"] == "/deep/link").await;
    assert_eq!((&e["reason"], &e["status"]), (&"session-revoked".into(), &302.into()), "{e}");

    // The same person's other session goes on; signed out directly (no Fetch Metadata:
    // typed in, or a tool), its copies end too.
    assert_eq!(other.get(&w, &w.url("/")).await.status, StatusCode::OK);
    let other_copy =
        format!("__Host-_portcullis={}", other.session_cookie().cloned().unwrap_or_default());
    let r = other.get(&w, &w.url("/.portcullis/logout")).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let r = with_cookie(&w, "/", &other_copy).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(w.event_for(&request_id(&r)).await["reason"], "session-revoked");
    // A new sign-in is a new session.
    let mut again = Browser::new();
    assert_eq!(again.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);

    let m = w.admin_get("/metrics").await.text();
    let revoked = m
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_sessions_revoked_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(revoked.is_some_and(|n| n >= 2), "{m}");
    assert!(
        m.lines().any(|l| l.starts_with("portcullis_requests_total{")
            && l.contains("reason=\"session-revoked\",status=\"401\"")),
        "{m}"
    );
}

/// Renewal does not bring a signed-out session back: every renewal keeps the session's
/// id, so a cookie from before a renewal is refused as the latest is, and a request that
/// would refresh the session (its ID token due) is refused before the refresh token is
/// used: no exchange at the provider, no renewed cookie.
#[tokio::test]
async fn a_signed_out_session_is_not_renewed_by_a_refresh() {
    // ID tokens live 100 s and the proxy refreshes 200 s before expiry: every request.
    let w = sso_world("refresh_before = \"200s\"").await;
    login(&w).set_id_token_ttl(100);
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let before_renewal = b.cookie_header();
    let r = b.get(&w, &w.url("/")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(renews_the_session(&r), "refreshed: a new cookie, a rotated refresh token");
    let latest = b.cookie_header();
    assert_ne!(latest, before_renewal);
    let logout = w.url("/.portcullis/logout");
    let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", "same-origin")], "").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());

    let exchanges = login(&w).refreshes();
    // The latest copy would refresh at the provider; the older one would get the
    // refresh result still kept for late requests with its refresh token.
    for (what, cookie) in
        [("the latest copy", &latest), ("a copy from before a renewal", &before_renewal)]
    {
        let r = with_cookie(&w, "/", cookie).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
        assert!(!renews_the_session(&r), "{what} renewed: {:?}", set_cookies(&r));
        assert_eq!(w.event_for(&request_id(&r)).await["reason"], "session-revoked", "{what}");
    }
    assert_eq!(login(&w).refreshes(), exchanges, "a signed-out session was refreshed");
}

/// A sign-out that lands while the session's refresh is at the provider: the refreshed
/// session is the same session, refused as well; the request that refreshed it gets no
/// renewed cookie. (The hook signs out as `/.portcullis/logout` does, through
/// `Sessions::revoke`, from inside the provider's token endpoint.)
#[tokio::test]
async fn a_sign_out_during_a_refresh_refuses_the_refreshed_session() {
    let w = sso_world("refresh_before = \"200s\"").await;
    login(&w).set_id_token_ttl(100);
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let value = b.session_cookie().cloned().unwrap_or_default();
    let sessions = w.server().shared.runtime.load().sessions.clone();
    let signed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (flag, sealed) = (signed_out.clone(), value.clone());
    login(&w).set_on_refresh(Some(std::sync::Arc::new(move || {
        let Some(s) = &sessions else { return };
        if let Ok(Some(data)) = s.open_session(&[(s.cookie_name(), sealed.as_str())]) {
            s.revoke(&data, portcullis::util::unix_now());
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })));
    let r = with_cookie(&w, "/", &format!("__Host-_portcullis={value}")).await;
    login(&w).set_on_refresh(None);
    assert!(signed_out.load(std::sync::atomic::Ordering::SeqCst), "no refresh happened");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert!(!renews_the_session(&r), "{:?}", set_cookies(&r));
    assert_eq!(w.event_for(&request_id(&r)).await["reason"], "session-revoked");
}

/// Reloads keep the signed-out sessions: one that changes nothing, one that rotates the
/// session keys (the old key kept, so old cookies still open), and one that takes
/// `[session]` away and brings it back (every signed-in session opens again after that,
/// but not the signed-out ones).
#[tokio::test]
async fn a_reload_keeps_the_signed_out_sessions() {
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let mut other = Browser::new();
    assert_eq!(other.sign_in(&w, "/", "bob", &["engineering"]).await.status, StatusCode::OK);
    let copy = b.cookie_header();
    let logout = w.url("/.portcullis/logout");
    let r = b.request(&w, Method::GET, &logout, &[("sec-fetch-site", "same-origin")], "").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    assert_eq!(with_cookie(&w, "/", &copy).await.status, StatusCode::UNAUTHORIZED);

    let keys = w.dir.path().join("session-keys");
    let new = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let without_session = {
        let start = config.find("[session]").unwrap_or(0);
        let end = config[start..].find("\n\n").map_or(config.len(), |e| start + e);
        let mut c = format!("{}{}", &config[..start], &config[end..]);
        c = c.replace("login = {", "# login = {");
        c
    };
    for what in ["a reload", "a key rotation", "[session] removed", "[session] back"] {
        match what {
            "a key rotation" => write(&keys, &format!("{new}\n{SSO_KEY}\n")),
            "[session] removed" => write(&w.config_path(), &without_session),
            "[session] back" => write(&w.config_path(), &config),
            _ => {}
        }
        assert!(w.server().reload().await, "{what}");
        if what == "[session] removed" {
            assert!(w.server().shared.runtime.load().sessions.is_none(), "{what}");
            continue;
        }
        let r = with_cookie(&w, "/", &copy).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text());
        assert_eq!(w.event_for(&request_id(&r)).await["reason"], "session-revoked", "{what}");
        assert_eq!(other.get(&w, &w.url("/")).await.status, StatusCode::OK, "{what}");
    }
}

/// A WebSocket tunnel a browser session opened ends when that session is signed out (as
/// a new upgrade with its cookie would be refused), not at its own end; a tunnel of the
/// same person's other session, and one a bearer token opened, go on.
#[tokio::test]
async fn signing_out_ends_the_websocket_tunnels_the_session_opened() {
    use crate::forwarding::{echo_once, ws_connect_with};
    let w = sso_world("").await;
    let mut b = Browser::new();
    assert_eq!(b.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let mut other = Browser::new();
    assert_eq!(other.sign_in(&w, "/", "alice", &["engineering"]).await.status, StatusCode::OK);
    let cookie_of = |b: &Browser| {
        format!("__Host-_portcullis={}", b.session_cookie().cloned().unwrap_or_default())
    };
    let (mine, theirs) = (cookie_of(&b), cookie_of(&other));
    let open = |cookie: String| {
        let w = &w;
        async move {
            ws_connect_with(w, "/ws", &[("cookie", &cookie)])
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let mut ws = open(mine.clone()).await;
    let mut copy = open(mine).await;
    let mut kept = open(theirs).await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let mut bearer = ws_connect_with(&w, "/ws", &[("authorization", &auth)])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for t in [&mut ws, &mut copy, &mut kept, &mut bearer] {
        assert!(echo_once(t).await);
    }

    let r = b.get(&w, &w.url("/.portcullis/logout")).await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    for t in [&mut ws, &mut copy] {
        let ended = tokio::time::timeout(Duration::from_secs(5), t.next()).await;
        assert!(ended.is_ok(), "the tunnel outlived the sign-out of its session");
        assert!(!echo_once(t).await, "a signed-out session's tunnel still relays");
    }
    assert!(echo_once(&mut kept).await, "another session's tunnel was ended");
    assert!(echo_once(&mut bearer).await, "a bearer token's tunnel was ended");
    // Each end is audited as its relay stops, which may be after the client saw it.
    let mut ends = Vec::new();
    for _ in 0..250 {
        ends = w.events().into_iter().filter(|e| e["kind"] == "websocket").collect();
        if ends.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ends.len(), 2, "{ends:#?}");
    for e in &ends {
        assert_eq!(e["reason"], "access-revoked", "{e}");
        assert_eq!(e["detail"], "session signed out at /.portcullis/logout", "{e}");
        assert_eq!(e["identity"]["subject"], "alice", "{e}");
    }
}
