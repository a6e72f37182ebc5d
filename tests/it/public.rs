//! Requests let through without a credential: CORS preflights on a route that opts in
//! (`cors_preflight = true`), and what a policy's `public = true` rules admit. Everything
//! else about such a request still goes through the proxy's hygiene, and no identity
//! header or assertion reaches the upstream.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

const PREFLIGHT: &[(&str, &str)] = &[
    ("origin", "https://app.example.com"),
    ("access-control-request-method", "POST"),
    ("access-control-request-headers", "authorization, content-type"),
];

/// The default policy plus public health and webhook paths, and a deny on part of a
/// public tree.
fn public_policy() -> String {
    format!(
        r#"{ALLOW_ALL_PRESETS}
[[rule]]
id = "health"
effect = "allow"
public = true
methods = ["GET"]
paths = ["/healthz"]

[[rule]]
id = "webhooks"
effect = "allow"
public = true
methods = ["POST"]
paths = ["/webhooks/**"]

[[rule]]
id = "docs"
effect = "allow"
public = true
methods = ["GET"]
paths = ["/docs/**"]

[[rule]]
id = "no-internal-docs-for-bb"
effect = "deny"
issuer = "bb"
paths = ["/docs/internal/**"]
"#
    )
}

async fn public_world() -> World {
    World::with(Setup { policies: vec![("api".into(), public_policy())], ..Setup::default() }).await
}

/// No identity header and no assertion reached the upstream, forged ones included.
fn assert_no_identity(r: &Resp) {
    let j = r.json();
    let Some(h) = j["headers"].as_object() else { panic!("not an echo: {}", r.text()) };
    for name in h.keys() {
        assert!(
            !name.starts_with("x-portcullis-") || name == "x-portcullis-request-id",
            "{name} reached the upstream: {}",
            r.text()
        );
        assert!(!name.starts_with("x_portcullis"), "{name} reached the upstream");
    }
}

/// The content of every answer of [`method_blind_upstream`].
const CONTENT: &str = "the resource itself: no preflight's to read";

/// A raw upstream that answers every request as a handler that does not check the
/// method does (a PHP script, a Go `HandleFunc`, a Django function view, a Spring
/// `@RequestMapping` without `method`): 200 with the resource's content, CORS headers
/// as a CORS middleware adds them, the resource's other headers (`Location`,
/// `X-Total-Count`, a cookie), and the request head it received (base64url, in
/// `Access-Control-X-Echo`, a name a preflight's answer keeps: the head is what tests
/// read, since neither the content nor the resource's headers reach a preflight).
pub(crate) async fn method_blind_upstream() -> std::net::SocketAddr {
    let (addr, _) = raw_answering(|head| {
        format!(
            "HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: https://app.example.com\r\nAccess-Control-Allow-Methods: POST\r\nAccess-Control-Max-Age: 600\r\nVary: Origin\r\nLocation: /admin/users/42\r\nX-Total-Count: 1337\r\nSet-Cookie: app_csrf=s3cr3t; Path=/\r\nAccess-Control-X-Echo: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{CONTENT}",
            URL_SAFE_NO_PAD.encode(head),
            CONTENT.len()
        )
    })
    .await;
    addr
}

/// The request head [`method_blind_upstream`] received, and the values of one of its
/// header fields (`name` in lower case).
pub(crate) fn echoed(r: &Resp) -> String {
    let echo = r.headers.get("access-control-x-echo").map(|v| v.as_bytes()).unwrap_or_default();
    let head = URL_SAFE_NO_PAD.decode(echo).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    String::from_utf8_lossy(&head).into_owned()
}

pub(crate) fn field(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// A world whose route `pf` (`/pf…`) lets CORS preflights through to `upstream`.
async fn preflight_world(upstream: std::net::SocketAddr, extra: &str) -> World {
    let routes = format!(
        "[[routes]]\nname = \"pf\"\nmatch = {{ path_prefix = \"/pf\" }}\nupstream = \"http://{upstream}\"\npolicy = \"api\"\ncors_preflight = true\n{extra}\n"
    );
    World::with(Setup { routes, ..Setup::default() }).await
}

/// A browser reads nothing of a preflight's answer but its status and headers (Fetch,
/// "CORS-preflight fetch"), and nothing of its URL's query decides a CORS answer. Yet
/// the preflight reached every path of the route without a credential, query and all,
/// and its answer came back whole: to an upstream whose handlers do not check the method,
/// anyone could read any resource of the route (`OPTIONS /pf/admin/users.php` with an
/// `Origin` and an `Access-Control-Request-Method`) and hand it input in the query
/// (`?delete=42`). The preflight now goes without its query, and its answer without
/// its body; a request with a credential is unchanged.
#[tokio::test]
async fn a_preflight_reaches_the_upstream_without_its_query_and_its_answer_without_a_body() {
    let w = preflight_world(method_blind_upstream().await, "").await;
    let r = w.send(Method::OPTIONS, "/pf/admin/users.php?delete=42", PREFLIGHT, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "", "the answer's content reached a caller without a credential");
    assert_eq!(
        r.headers.get("access-control-allow-origin").map(|v| v.as_bytes()),
        Some(&b"https://app.example.com"[..]),
        "the CORS answer is the upstream's"
    );
    let head = echoed(&r);
    assert!(head.starts_with("OPTIONS /pf/admin/users.php HTTP/1.1\r\n"), "{head}");
    assert_eq!(w.last_event().await["reason"], "cors-preflight");
    // With a credential it is an authenticated request like any other.
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let mut with_token = PREFLIGHT.to_vec();
    with_token.push(("authorization", auth.as_str()));
    let r =
        w.send(Method::OPTIONS, "/pf/admin/users.php?delete=42", &with_token, Bytes::new()).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, CONTENT.to_string()));
    assert!(echoed(&r).starts_with("OPTIONS /pf/admin/users.php?delete=42 HTTP/1.1\r\n"));
}

/// A browser reads only the status and the `Access-Control-*` headers of a preflight's
/// answer (Fetch, "CORS-preflight fetch"), yet the upstream's whole header section came
/// back to a caller without a credential: what a handler that does not check the method
/// says of the resource (`Location`, `X-Total-Count`, a `Set-Cookie` with a CSRF token).
/// Only `Access-Control-*` and `Vary` come back now; with a credential, everything.
#[tokio::test]
async fn a_preflights_answer_keeps_only_the_headers_a_browser_reads_of_it() {
    let w = preflight_world(method_blind_upstream().await, "").await;
    let r = w.send(Method::OPTIONS, "/pf/admin/users.php", PREFLIGHT, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for (name, want) in [
        ("access-control-allow-origin", "https://app.example.com"),
        ("access-control-allow-methods", "POST"),
        ("access-control-max-age", "600"),
        ("vary", "Origin"),
    ] {
        assert_eq!(r.headers.get(name).map(|v| v.as_bytes()), Some(want.as_bytes()), "{name}");
    }
    for name in ["location", "x-total-count", "set-cookie", "content-type"] {
        assert!(r.headers.get(name).is_none(), "{name} reached a caller without a credential");
    }
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let mut with_token = PREFLIGHT.to_vec();
    with_token.push(("authorization", auth.as_str()));
    let r = w.send(Method::OPTIONS, "/pf/admin/users.php", &with_token, Bytes::new()).await;
    for name in ["location", "x-total-count", "set-cookie", "content-type"] {
        assert!(r.headers.get(name).is_some(), "{name} of an authenticated answer");
    }
}

#[tokio::test]
async fn a_cors_preflight_is_forwarded_without_a_credential_when_the_route_opts_in() {
    let w = preflight_world(method_blind_upstream().await, "").await;
    let mut headers = PREFLIGHT.to_vec();
    headers.extend([
        ("x-portcullis-subject", "admin"),
        ("x-portcullis-assertion", "forged"),
        ("x_portcullis_email", "ceo@example.com"),
        ("x-forwarded-for", "6.6.6.6"),
        ("connection", "x-drop-me"),
        ("x-drop-me", "1"),
    ]);
    let r = w.send(Method::OPTIONS, "/pf/items", &headers, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let head = echoed(&r);
    assert!(head.starts_with("OPTIONS /pf/items HTTP/1.1\r\n"), "{head}");
    // No identity header and no assertion reached the upstream, forged ones included.
    for line in head.lines().skip(1) {
        let name = line.split(':').next().unwrap_or_default().to_ascii_lowercase();
        assert!(
            !name.starts_with("x-portcullis-") || name == "x-portcullis-request-id",
            "{name} reached the upstream: {head}"
        );
        assert!(!name.starts_with("x_portcullis"), "{name} reached the upstream: {head}");
    }
    assert_eq!(field(&head, "x-drop-me"), Vec::<String>::new(), "hop-by-hop hygiene still applies");
    assert_eq!(field(&head, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(field(&head, "origin"), ["https://app.example.com"]);
    assert_eq!(field(&head, "access-control-request-method"), ["POST"]);
    let rid = field(&head, "x-portcullis-request-id").concat();
    let ev = w.event_for(&rid).await;
    assert_eq!(ev["decision"], "allow", "{ev}");
    assert_eq!(ev["reason"], "cors-preflight", "{ev}");
    assert!(ev.get("identity").is_none_or(|i| i.is_null()), "{ev}");
    assert!(ev.get("rule").is_none_or(|i| i.is_null()), "{ev}");
    assert_eq!(w.events().iter().filter(|e| e["request_id"] == rid.as_str()).count(), 1);

    // Still the proxy's path checks: an ambiguous path is refused before anything.
    let r = w.send(Method::OPTIONS, "/pf/..%2Fadmin", PREFLIGHT, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

#[tokio::test]
async fn a_cors_preflight_needs_a_credential_on_a_route_that_does_not_opt_in() {
    let w = World::start().await;
    let r = w.send(Method::OPTIONS, "/api/items", PREFLIGHT, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "missing-token");
}

#[tokio::test]
async fn only_a_real_preflight_passes_without_a_credential() {
    let w = World::with(Setup { route_extra: "cors_preflight = true".into(), ..Setup::default() })
        .await;
    // OPTIONS without Access-Control-Request-Method is no preflight.
    let r = w
        .send(Method::OPTIONS, "/api", &[("origin", "https://app.example.com")], Bytes::new())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    // Nor without Origin.
    let r = w
        .send(Method::OPTIONS, "/api", &[("access-control-request-method", "POST")], Bytes::new())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    // Nor another method with the preflight's headers.
    let r = w.send(Method::DELETE, "/api", PREFLIGHT, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    // A preflight carrying a credential is authenticated as any request: a bad token
    // is refused, whatever else it looks like.
    let mut with_token = PREFLIGHT.to_vec();
    with_token.push(("authorization", "Bearer not-a-token"));
    let r = w.send(Method::OPTIONS, "/api", &with_token, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid-token");
    // Nor one with a body (browsers send none): a handler that does not check the method
    // would run on it.
    let r = w.send(Method::OPTIONS, "/api", PREFLIGHT, Bytes::from_static(b"rm -rf /")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let port = w.https.port();
    let chunked = format!(
        "OPTIONS /api HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let resp = crate::forwarding::raw_exchange(&w, &chunked).await;
    assert!(resp.starts_with("HTTP/1.1 401 "), "a chunked preflight: {resp}");
    // Another scheme in Authorization is no preflight either (a browser sends none).
    let mut basic = PREFLIGHT.to_vec();
    basic.push(("authorization", "Basic YTpi"));
    let r = w.send(Method::OPTIONS, "/api", &basic, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    // A good token on a preflight: authenticated, and the identity goes upstream.
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let mut good = PREFLIGHT.to_vec();
    good.push(("authorization", auth.as_str()));
    let r = w.send(Method::OPTIONS, "/api", &good, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-issuer").as_deref(), Some("bb"));
    let ev = w.event_for(&r.upstream_header("x-portcullis-request-id").unwrap_or_default()).await;
    assert_eq!(ev["reason"], "allowed", "{ev}");
}

#[tokio::test]
async fn a_public_path_is_served_without_a_credential_and_without_identity_headers() {
    let w = public_world().await;
    let r = w
        .send(
            Method::GET,
            "/healthz",
            &[
                ("x-portcullis-subject", "admin"),
                ("X-Portcullis-Groups", "root"),
                ("x-portcullis-assertion", "forged"),
                ("x_portcullis_email", "ceo@example.com"),
                ("x-forwarded-host", "evil.test"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/healthz");
    assert_no_identity(&r);
    assert_eq!(r.upstream_header("x-forwarded-host").as_deref(), Some("localhost"));
    let rid = r.upstream_header("x-portcullis-request-id").unwrap_or_default();
    let ev = w.event_for(&rid).await;
    assert_eq!(ev["decision"], "allow", "{ev}");
    assert_eq!(ev["reason"], "public", "{ev}");
    assert_eq!(ev["rule"]["id"], "health", "{ev}");
    assert!(ev["rule"]["line"].as_u64().unwrap_or(0) > 0, "{ev}");
    assert!(ev["rule"]["file"].as_str().unwrap_or("").ends_with("api.toml"), "{ev}");
    assert!(ev.get("identity").is_none_or(|i| i.is_null()), "{ev}");

    // `GET` covers `HEAD`; a webhook takes its POST.
    let r = w.send(Method::POST, "/webhooks/github", &[], Bytes::from_static(b"{}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_no_identity(&r);

    // A browser navigation to a public path is served, not sent to sign in.
    let r = w.send(Method::GET, "/healthz", &[("accept", "text/html")], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn only_the_public_paths_and_methods_need_no_credential() {
    let w = public_world().await;
    for (method, path) in [
        (Method::GET, "/deploy"),
        (Method::GET, "/healthz/x"),
        (Method::POST, "/healthz"),
        (Method::DELETE, "/webhooks/github"),
        (Method::GET, "/webhooks/github"),
    ] {
        let r = w.send(method.clone(), path, &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"], "missing-token");
    }
}

#[tokio::test]
async fn a_credential_on_a_public_path_is_still_verified() {
    let w = public_world().await;
    // A bad token is never read as no token.
    let r = w.get("/healthz", Some("not-a-token")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["error"], "invalid-token");
    let expired = w.token("bb", &["exp:=1000"]);
    let r = w.get("/healthz", Some(&expired)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    // A good one is authenticated, and its identity goes upstream as on any path; a
    // caller no other rule admits is admitted by the public one.
    let outsider = w.token("corp", &["groups:=[\"sales\"]"]);
    assert_eq!(w.get("/deploy", Some(&outsider)).await.status, StatusCode::FORBIDDEN);
    let r = w.get("/healthz", Some(&outsider)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-issuer").as_deref(), Some("corp"));
    let ev = w.event_for(&r.upstream_header("x-portcullis-request-id").unwrap_or_default()).await;
    assert_eq!(ev["reason"], "public", "{ev}");
    assert_eq!(ev["rule"]["id"], "health", "{ev}");
    assert_eq!(ev["identity"]["issuer"], "corp", "{ev}");
}

#[tokio::test]
async fn a_deny_wins_over_a_public_rule() {
    let w = public_world().await;
    let r = w.get("/docs/intro", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The deny names `bb` callers, but a caller without a credential could be one: it
    // applies to them too, so the public tree has a hole no one gets through anonymously.
    let r = w.get("/docs/internal/plan", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let r = w.get("/docs/internal/plan", Some(&w.token("bb", &[]))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let ev = w.last_event().await;
    assert_eq!(ev["reason"], "denied-by-rule", "{ev}");
    // A caller the deny does not name gets the public page with a credential.
    let r = w.get("/docs/internal/plan", Some(&w.token("gh", &[]))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// An output that takes nothing while held, like a pipe whose reader has fallen behind.
#[derive(Clone, Default)]
struct HeldOutput(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl HeldOutput {
    fn hold(&self, on: bool) {
        if let Ok(mut held) = self.0 .0.lock() {
            *held = on;
        }
        self.0 .1.notify_all();
    }
}

impl std::io::Write for HeldOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut held = self.0 .0.lock().map_err(|_| std::io::Error::other("poisoned"))?;
        while *held {
            held = self.0 .1.wait(held).map_err(|_| std::io::Error::other("poisoned"))?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Anyone can send requests a `public` rule lets through, as fast as they like, while the
/// audit output is read slowly: their events (no identity, `decision: allow`) take half
/// the queue at most, as refusals do, so their flood never refuses an authenticated
/// caller nor takes the replica out of rotation (`/readyz`); with `on_failure = "reject"`
/// the public requests themselves are refused once their half is nearly full, so none
/// reaches the upstream without its event.
#[tokio::test]
async fn on_failure_reject_refuses_public_requests_while_their_half_of_the_queue_is_full() {
    let out = HeldOutput::default();
    let sink = portcullis::audit::AuditSink::writer(Box::new(out.clone()), 64 * 1024);
    let w = World::with(Setup {
        sink: Some(sink),
        policies: vec![("api".into(), public_policy())],
        routes: "[audit]\non_failure = \"reject\"\n".into(),
        ..Setup::default()
    })
    .await;
    let token = w.token("bb", &[]);
    assert_eq!(w.get("/deploy", Some(&token)).await.status, StatusCode::OK);
    out.hold(true);
    let long = format!("/docs/{}", "p".repeat(1900));
    let mut refused = None;
    for i in 0..40 {
        let r = w.get(&long, None).await;
        if r.status != StatusCode::OK {
            refused = Some((i, r));
            break;
        }
    }
    let Some((i, r)) = refused else { panic!("40 public requests, none refused") };
    assert!(i > 0, "the first public request was refused");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.json()["error"], "audit-unavailable", "{}", r.text());
    // The authenticated caller is still served, and the replica still ready.
    let r = w.get("/deploy", Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ready = w.admin_get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    out.hold(false);
}

/// A WebSocket is never opened without a credential, even where a `public` rule admits
/// the path and method of its handshake: a tunnel is re-checked against its credential
/// (expiry, revocation, reloads) for as long as it lives, and there would be none. The
/// handshake is asked for one (401) and never reaches the upstream; the same path
/// without the upgrade is public, and a token opens the tunnel.
#[tokio::test]
async fn a_public_path_opens_no_websocket_without_a_credential() {
    let policy = format!(
        "{ALLOW_ALL_PRESETS}\n[[rule]]\nid = \"live\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/ws\"]\n"
    );
    let w = World::with(Setup { policies: vec![("api".into(), policy)], ..Setup::default() }).await;
    let refused = crate::forwarding::ws_connect_with(&w, "/ws", &[]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        Err(e) => panic!("not refused with a status: {e}"),
        Ok(_) => panic!("a WebSocket was opened without a credential"),
    }
    let ev = w.last_event().await;
    assert_eq!(
        (ev["status"].as_u64(), ev["reason"].as_str()),
        (Some(401), Some("missing-token")),
        "{ev}"
    );
    let r = w.get("/ws", None).await;
    assert_ne!(r.status, StatusCode::UNAUTHORIZED, "the path is public: {}", r.text());
    assert_eq!(w.last_event().await["reason"], "public");
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let opened = crate::forwarding::ws_connect_with(&w, "/ws", &[("authorization", &auth)]).await;
    assert!(opened.is_ok(), "{:?}", opened.err());
}
