//! `strip_prefix = true`: a route forwards the client's path less its `path_prefix`
//! (then the upstream's base path), while routing, policies and the audit event's `path`
//! keep the client's; the upstream learns the prefix from `X-Forwarded-Prefix`, which no
//! untrusted client can set. Over HTTP/1.1, HTTP/2 (to an HTTP/1.1 and an h2c upstream)
//! and WebSocket upgrades, and across a reload. The answer's redirects and cookie paths
//! get the prefix back (`restore_prefix`).

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::forwarding::{echo_once, tunnel_end_event, ws_connect_with};
use crate::support::*;

/// `/billing` stripped to the echo's root; `/billing-v2/` (trailing `/`) stripped and
/// sent under the upstream's `/v2`; `/h2billing` stripped towards an h2c upstream;
/// `/chat` stripped, for the echo's WebSocket at `/ws`; `/kept` not stripped. The
/// default route (`/`) takes the rest, `/billingx` included.
const ROUTES: &str = r#"
[[routes]]
name = "billing"
match = { path_prefix = "/billing" }
upstream = "http://{echo}"
policy = "api"
strip_prefix = true

[[routes]]
name = "billing-v2"
match = { path_prefix = "/billing-v2/" }
upstream = "http://{echo}/v2"
policy = "api"
strip_prefix = true

[[routes]]
name = "h2billing"
match = { path_prefix = "/h2billing" }
upstream = "h2c://{echo}"
policy = "api"
strip_prefix = true

[[routes]]
name = "chat"
match = { path_prefix = "/chat" }
upstream = "http://{echo}"
policy = "api"
strip_prefix = true

[[routes]]
name = "kept"
match = { path_prefix = "/kept" }
upstream = "http://{echo}"
policy = "api"
strip_prefix = false
"#;

async fn world() -> World {
    World::with(Setup { routes: ROUTES.into(), ..Setup::default() }).await
}

/// What the echo upstream received: its path, its query, and how many
/// `X-Forwarded-Prefix` fields with what first value.
fn received(r: &Resp) -> (String, Option<String>, Option<String>) {
    let j = r.json();
    let path = j["path"].as_str().unwrap_or("?").to_string();
    let query = j["query"].as_str().map(str::to_string);
    (path, query, r.upstream_header("x-forwarded-prefix"))
}

#[tokio::test]
async fn a_strip_prefix_route_forwards_the_path_less_its_prefix_and_the_query_untouched() {
    let w = world().await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let get = |path: &'static str| {
        let h = [("authorization", auth.as_str())];
        let w = &w;
        async move { w.send(Method::GET, path, &h, Bytes::new()).await }
    };
    let billing = Some("/billing".to_string());
    for (sent, path, query) in [
        ("/billing/invoices/42", "/invoices/42", None),
        ("/billing/invoices/", "/invoices/", None),
        ("/billing/invoices?x=1&y=%2F..%2f", "/invoices", Some("x=1&y=%2F..%2f")),
        // The exact prefix, with and without its slash: the upstream's root.
        ("/billing", "/", None),
        ("/billing/", "/", None),
        ("/billing?page=2", "/", Some("page=2")),
        // Cut from the canonical path the route matched, not from the bytes sent.
        ("/%62illing//invoices", "/invoices", None),
        ("/billing/caf%c3%a9", "/caf%C3%A9", None),
    ] {
        let r = get(sent).await;
        assert_eq!(r.status, StatusCode::OK, "{sent}: {}", r.text());
        let want = (path.to_string(), query.map(str::to_string), billing.clone());
        assert_eq!(received(&r), want, "{sent}");
    }
    // A prefix written with its trailing slash matches and strips the same, then the
    // upstream's base path goes in front.
    let v2 = Some("/billing-v2".to_string());
    for (sent, path) in [
        ("/billing-v2/invoices", "/v2/invoices"),
        ("/billing-v2", "/v2/"),
        ("/billing-v2/", "/v2/"),
    ] {
        let r = get(sent).await;
        assert_eq!(r.status, StatusCode::OK, "{sent}: {}", r.text());
        assert_eq!(received(&r), (path.to_string(), None, v2.clone()), "{sent}");
    }
    // Not under the prefix (no segment boundary): the default route, unchanged.
    let r = get("/billingx/invoices").await;
    assert_eq!(received(&r), ("/billingx/invoices".to_string(), None, None));
    // `strip_prefix = false`: as without it.
    let r = get("/kept/invoices?x=1").await;
    assert_eq!(received(&r), ("/kept/invoices".to_string(), Some("x=1".into()), None));

    // The audit event keeps the client's path; what went upstream beside it, when it
    // differs.
    let r = get("/billing-v2/invoices?x=1").await;
    let ev = w.event_for(&r.upstream_header("x-portcullis-request-id").unwrap_or_default()).await;
    assert_eq!(ev["path"], "/billing-v2/invoices", "{ev}");
    assert_eq!(ev["upstream_path"], "/v2/invoices", "{ev}");
    assert_eq!(ev["route"], "billing-v2", "{ev}");
    let r = get("/kept/invoices").await;
    let ev = w.event_for(&r.upstream_header("x-portcullis-request-id").unwrap_or_default()).await;
    assert_eq!(ev["path"], "/kept/invoices", "{ev}");
    assert!(ev.get("upstream_path").is_none(), "the same path: not repeated: {ev}");
    // A refused request went nowhere: no upstream path either.
    let r = w.send(Method::GET, "/billing/invoices", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["path"], "/billing/invoices", "{ev}");
    assert!(ev.get("upstream_path").is_none(), "{ev}");
}

/// Policies are written against the client's URL: on a route that strips `/billing`, a
/// rule on `/billing/invoices/**` decides, one written for the forwarded `/reports/**`
/// matches nothing, and a deny on `/billing/admin/**` holds.
#[tokio::test]
async fn policies_match_the_clients_path_not_the_stripped_one() {
    let policy = r#"
[[rule]]
id = "invoices"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}" }
paths = ["/billing/invoices/**", "/billing/admin/**"]

[[rule]]
id = "stripped-reports"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}" }
paths = ["/reports/**"]

[[rule]]
id = "no-admin"
effect = "deny"
issuer = "bb"
paths = ["/billing/admin/**"]
"#;
    let routes = r#"
[[routes]]
name = "billing"
match = { path_prefix = "/billing" }
upstream = "http://{echo}"
policy = "billing"
strip_prefix = true
"#;
    let w = World::with(Setup {
        routes: routes.into(),
        policies: vec![("api".into(), ALLOW_ALL_PRESETS.into()), ("billing".into(), policy.into())],
        ..Setup::default()
    })
    .await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let h = [("authorization", auth.as_str())];
    let r = w.send(Method::GET, "/billing/invoices/7", &h, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/invoices/7");
    let ev = w.event_for(&r.upstream_header("x-portcullis-request-id").unwrap_or_default()).await;
    assert_eq!(ev["rule"]["id"], "invoices", "{ev}");
    assert_eq!(ev["path"], "/billing/invoices/7", "{ev}");

    // `/reports/**` is what the upstream would get, never what the policy sees.
    let r = w.send(Method::GET, "/billing/reports/7", &h, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["reason"], "policy-denied", "no allow matches: {ev}");
    assert_eq!(ev["path"], "/billing/reports/7", "{ev}");

    let r = w.send(Method::GET, "/billing/admin/users", &h, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["rule"]["id"], "no-admin", "{ev}");
}

/// The upstream learns the stripped prefix from `X-Forwarded-Prefix`; one a client sends
/// (in either spelling) never reaches it, on a stripping route or any other. From a
/// trusted proxy, its own is kept (and ours appended when a prefix is stripped).
#[tokio::test]
async fn x_forwarded_prefix_is_the_stripped_prefix_and_never_the_clients() {
    let w = world().await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let forged = [
        ("authorization", auth.as_str()),
        ("x-forwarded-prefix", "/admin"),
        ("x_forwarded_prefix", "/admin"),
    ];
    let prefixes = |r: &Resp| {
        let h = &r.json()["headers"];
        (h["x-forwarded-prefix"].clone(), h.get("x_forwarded_prefix").cloned())
    };
    let r = w.send(Method::GET, "/billing/x", &forged, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(prefixes(&r), (serde_json::json!(["/billing"]), None));
    let r = w.send(Method::GET, "/billing-v2/x", &forged, Bytes::new()).await;
    assert_eq!(prefixes(&r), (serde_json::json!(["/billing-v2"]), None));
    for not_stripping in ["/kept/x", "/other"] {
        let r = w.send(Method::GET, not_stripping, &forged, Bytes::new()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(prefixes(&r), (serde_json::Value::Null, None), "{not_stripping}");
    }

    let trusted = World::with(Setup {
        routes: ROUTES.into(),
        listen_extra: "trusted_proxies = [\"127.0.0.0/8\"]".into(),
        ..Setup::default()
    })
    .await;
    let auth = format!("Bearer {}", trusted.token("bb", &[]));
    let from_proxy = [("authorization", auth.as_str()), ("x-forwarded-prefix", "/app")];
    let r = trusted.send(Method::GET, "/billing/x", &from_proxy, Bytes::new()).await;
    assert_eq!(r.json()["path"], "/x");
    assert_eq!(prefixes(&r), (serde_json::json!(["/app, /billing"]), None));
    let r = trusted.send(Method::GET, "/kept/x", &from_proxy, Bytes::new()).await;
    assert_eq!(prefixes(&r), (serde_json::json!(["/app"]), None));
    let r =
        trusted.send(Method::GET, "/billing/x", &[("authorization", &auth)], Bytes::new()).await;
    assert_eq!(prefixes(&r), (serde_json::json!(["/billing"]), None));
}

/// HTTP/2 clients get the same rewrite, to an HTTP/1.1 upstream and an h2c one.
#[tokio::test]
async fn http2_requests_are_forwarded_less_the_prefix_too() {
    let w = world().await;
    let c = client(&w.pki, true);
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let h = [("authorization", auth.as_str())];
    for (sent, path, query, version, prefix) in [
        ("/billing/invoices?x=1", "/invoices", Some("x=1"), "HTTP/1.1", "/billing"),
        ("/billing-v2/invoices", "/v2/invoices", None, "HTTP/1.1", "/billing-v2"),
        ("/h2billing/invoices?x=1", "/invoices", Some("x=1"), "HTTP/2.0", "/h2billing"),
        ("/h2billing", "/", None, "HTTP/2.0", "/h2billing"),
    ] {
        let r = send_with(&c, Method::GET, &w.url(sent), &h, Bytes::new()).await;
        assert_eq!(r.status, StatusCode::OK, "{sent}: {}", r.text());
        assert_eq!(r.json()["version"], version, "{sent}");
        let want = (path.to_string(), query.map(str::to_string), Some(prefix.to_string()));
        assert_eq!(received(&r), want, "{sent}");
    }
    let ev = w.last_event().await;
    assert_eq!((&ev["path"], &ev["upstream_path"]), (&"/h2billing".into(), &"/".into()), "{ev}");
}

/// A WebSocket upgrade goes to the stripped path: the echo upstream speaks WebSocket at
/// `/ws` only, so `/chat/ws` opens a tunnel only if it arrives as `/ws`. Both events keep
/// the client's path and give the upstream's beside it.
#[tokio::test]
async fn a_websocket_upgrade_is_forwarded_less_the_prefix() {
    let w = world().await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let mut ws = ws_connect_with(&w, "/chat/ws", &[("authorization", &auth)])
        .await
        .unwrap_or_else(|e| panic!("ws connect to /chat/ws: {e}"));
    assert!(echo_once(&mut ws).await, "the tunnel echoes");
    let _ = ws.close(None).await;
    drop(ws);
    let end = tunnel_end_event(&w, "/chat/ws").await;
    assert_eq!(end["path"], "/chat/ws", "{end}");
    assert_eq!(end["upstream_path"], "/ws", "{end}");
    assert_eq!(end["route"], "chat", "{end}");
    let upgrade = w
        .events()
        .into_iter()
        .find(|e| e["kind"] == "http" && e["request_id"] == end["request_id"])
        .unwrap_or_default();
    assert_eq!(upgrade["status"], 101, "{upgrade}");
    assert_eq!(upgrade["path"], "/chat/ws", "{upgrade}");
    assert_eq!(upgrade["upstream_path"], "/ws", "{upgrade}");
}

/// A reload that turns `strip_prefix` off or on applies to the next request: nothing
/// keeps the old target.
#[tokio::test]
async fn a_reload_turns_strip_prefix_off_and_on() {
    let w = world().await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let h = [("authorization", auth.as_str())];
    let path = |r: &Resp| r.json()["path"].as_str().unwrap_or("?").to_string();
    let r = w.send(Method::GET, "/billing/x", &h, Bytes::new()).await;
    assert_eq!(
        (path(&r), r.upstream_header("x-forwarded-prefix")),
        ("/x".into(), Some("/billing".into()))
    );
    let text = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let billing =
        "name = \"billing\"\nmatch = { path_prefix = \"/billing\" }\nupstream = \"http://";
    assert!(text.contains(billing), "{text}");
    let off = text.replacen(
        "policy = \"api\"\nstrip_prefix = true",
        "policy = \"api\"\nstrip_prefix = false",
        1,
    );
    assert_ne!(off, text);
    replace(&w.config_path(), &off);
    assert!(w.server().reload().await, "reload with strip_prefix off");
    let r = w.send(Method::GET, "/billing/x", &h, Bytes::new()).await;
    assert_eq!((path(&r), r.upstream_header("x-forwarded-prefix")), ("/billing/x".into(), None));
    replace(&w.config_path(), &text);
    assert!(w.server().reload().await, "reload with strip_prefix on again");
    let r = w.send(Method::GET, "/billing/x", &h, Bytes::new()).await;
    assert_eq!(
        (path(&r), r.upstream_header("x-forwarded-prefix")),
        ("/x".into(), Some("/billing".into()))
    );
}

/// An application that knows nothing of the prefix: it redirects to its own root by
/// path, by URL of the Host it was sent (`/by-url`) or of the forwarded host and port
/// (`/by-forwarded`), elsewhere (`/elsewhere`), or under the prefix already
/// (`/prefixed`, as one reading `X-Forwarded-Prefix` does), and sets cookies for its
/// root, for a path, with no path, and one of the proxy's own.
fn unaware_app(head: &str) -> String {
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let location = match head.split(' ').nth(1).unwrap_or("/") {
        "/by-url" => format!("http://{}/login?x=1", header("host")),
        "/by-forwarded" => {
            format!("https://{}:{}/login", header("x-forwarded-host"), header("x-forwarded-port"))
        }
        "/elsewhere" => "//evil.example/x".into(),
        "/prefixed" => "/app/login".into(),
        _ => "/login".into(),
    };
    format!(
        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-location: /doc/1\r\n\
         set-cookie: a=1; Path=/\r\nset-cookie: b=2; Path=/x; HttpOnly\r\nset-cookie: c=3\r\n\
         set-cookie: _portcullis=forged; Path=/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
}

/// A `strip_prefix` route puts its prefix back into the answer: `Location` and
/// `Content-Location` paths and URLs of this application, and `Set-Cookie` paths (`/` is
/// the prefix itself); another host, or a path already under the prefix, is left as it
/// is. `restore_prefix = false` and a route without `strip_prefix` pass the answer as sent.
#[tokio::test]
async fn redirects_and_cookie_paths_get_the_stripped_prefix_back() {
    let (raw, _task) = raw_answering(unaware_app).await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\nmatch = {{ path_prefix = \"/app\" }}\nupstream = \"http://{raw}\"\npolicy = \"api\"\nstrip_prefix = true\n\n\
         [[routes]]\nname = \"as-is\"\nmatch = {{ path_prefix = \"/as-is\" }}\nupstream = \"http://{raw}\"\npolicy = \"api\"\nstrip_prefix = true\nrestore_prefix = false\n\n\
         [[routes]]\nname = \"kept\"\nmatch = {{ path_prefix = \"/kept\" }}\nupstream = \"http://{raw}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let answer = |path: &'static str| {
        let h = [("authorization", auth.as_str())];
        let w = &w;
        async move {
            let r = w.send(Method::GET, path, &h, Bytes::new()).await;
            assert_eq!(r.status, StatusCode::FOUND, "{path}: {}", r.text());
            let all = |name: &str| -> Vec<String> {
                r.headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .collect()
            };
            (all("location").join(" "), all("content-location").join(" "), all("set-cookie"))
        }
    };
    let restored = ["a=1; Path=/app", "b=2; Path=/app/x; HttpOnly", "c=3"];
    assert_eq!(
        answer("/app/").await,
        ("/app/login".into(), "/app/doc/1".into(), restored.map(String::from).to_vec())
    );
    assert_eq!(answer("/app/by-url").await.0, "/app/login?x=1");
    assert_eq!(answer("/app/by-forwarded").await.0, w.url("/app/login"));
    assert_eq!(answer("/app/elsewhere").await.0, "//evil.example/x");
    assert_eq!(answer("/app/prefixed").await.0, "/app/login");
    let as_sent = ["a=1; Path=/", "b=2; Path=/x; HttpOnly", "c=3"].map(String::from).to_vec();
    for path in ["/as-is/", "/kept/"] {
        assert_eq!(
            answer(path).await,
            ("/login".into(), "/doc/1".into(), as_sent.clone()),
            "{path}"
        );
    }
}
