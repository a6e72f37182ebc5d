//! A route's `claim_headers`: verified claims reach the upstream as plain headers
//! (strings as they are, numbers and booleans as JSON text, lists joined with `,`,
//! objects never), and a client's own copy of every configured name is removed on every
//! path: with or without the claim, anonymous (public rules, CORS preflights), HTTP/2,
//! and from a browser session's kept claims.

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

const CLAIM_HEADERS: &str = r#"claim_headers = { "X-Team" = "team", "X-Tenant" = "tenant_id", "X-Admin" = "is_admin", "X-Teams" = "teams", "X-Org" = "org", "X-Nested" = "nested", "X-Missing" = "nothing" }"#;

/// What a client sends to forge every configured claim header, in both spellings a
/// CGI/WSGI server reads as the same variable.
const FORGED: &[(&str, &str)] = &[
    ("x-team", "forged"),
    ("x_team", "forged"),
    ("X-Tenant", "forged"),
    ("x-admin", "true"),
    ("x-teams", "forged"),
    ("x-org", "forged"),
    ("x-nested", "forged"),
    ("x-missing", "forged"),
    ("X_Missing", "forged"),
];

/// The default route with every kind of claim configured, a public `/healthz`, and
/// CORS preflights let through.
async fn world() -> World {
    let policy = format!(
        "{ALLOW_ALL_PRESETS}\n[[rule]]\nid = \"health\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/healthz\"]\n"
    );
    World::with(Setup {
        route_extra: format!("{CLAIM_HEADERS}\ncors_preflight = true"),
        policies: vec![("api".into(), policy)],
        ..Setup::default()
    })
    .await
}

/// A GitHub Actions token with a claim of every shape.
fn full_token(w: &World) -> String {
    w.token(
        "gh",
        &[
            "team=plat form",
            "tenant_id:=42",
            "is_admin:=false",
            r#"teams:=["red", "b,c", 7, true]"#,
            r#"org:={"id": 1}"#,
            r#"nested:=[["a"], "b"]"#,
        ],
    )
}

/// What the echo upstream received of every configured header name and its underscore
/// spelling: (name, values).
fn received(r: &Resp) -> Vec<(String, Vec<String>)> {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let j = r.json();
    let Some(h) = j["headers"].as_object() else { panic!("not an echo: {}", r.text()) };
    let mut got = Vec::new();
    for (name, values) in h {
        let configured = ["team", "tenant", "admin", "teams", "org", "nested", "missing"];
        let bare = name.strip_prefix("x-").or_else(|| name.strip_prefix("x_"));
        if bare.is_some_and(|b| configured.contains(&b)) {
            let values = values
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).map(str::to_string).collect())
                .unwrap_or_default();
            got.push((name.clone(), values));
        }
    }
    got.sort();
    got
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, Vec<String>)> {
    let mut v: Vec<(String, Vec<String>)> =
        expected.iter().map(|(n, v)| (n.to_string(), vec![v.to_string()])).collect();
    v.sort();
    v
}

/// The headers a [`full_token`] gets upstream, and nothing else under those names.
fn full_expected() -> Vec<(String, Vec<String>)> {
    pairs(&[
        ("x-team", "plat%20form"),
        ("x-tenant", "42"),
        ("x-admin", "false"),
        ("x-teams", "red,b%2Cc,7,true"),
    ])
}

async fn with_token(w: &World, token: &str, extra: &[(&str, &str)]) -> Resp {
    let auth = format!("Bearer {token}");
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(extra);
    w.send(Method::GET, "/claims", &h, Bytes::new()).await
}

#[tokio::test]
async fn claims_of_every_shape_are_forwarded_and_forged_copies_removed() {
    let w = world().await;
    let t = full_token(&w);
    // Strings as they are (encoded as the identity headers are), numbers and booleans as
    // JSON text, lists joined; the object, the nested list and the missing claim: none.
    assert_eq!(received(&with_token(&w, &t, &[]).await), full_expected());
    assert_eq!(received(&with_token(&w, &t, FORGED).await), full_expected());
    // The same token again (a cache hit: verified identity and forwarded headers reused)
    // gives the same headers.
    assert_eq!(received(&with_token(&w, &t, FORGED).await), full_expected());
}

#[tokio::test]
async fn a_caller_without_the_claims_gets_none_and_its_forged_copies_are_removed() {
    let w = world().await;
    let t = w.token("gh", &[]);
    let r = with_token(&w, &t, FORGED).await;
    assert_eq!(received(&r), vec![]);
    // The identity is still forwarded.
    assert!(r.upstream_header("x-portcullis-subject").is_some(), "{}", r.text());
}

#[tokio::test]
async fn forged_claim_headers_are_removed_from_public_requests_and_cors_preflights() {
    let w = world().await;
    let r = w.send(Method::GET, "/healthz", FORGED, Bytes::new()).await;
    assert_eq!(received(&r), vec![]);
    let e = w.last_event().await;
    assert_eq!(e["rule"]["id"], "health", "{e}");

    // A preflight's answer comes without its body: what the upstream received is read
    // from the head a raw upstream sends back.
    let upstream = crate::public::method_blind_upstream().await;
    let routes = format!(
        "[[routes]]\nname = \"pf\"\nmatch = {{ path_prefix = \"/pf\" }}\nupstream = \"http://{upstream}\"\npolicy = \"api\"\ncors_preflight = true\n{CLAIM_HEADERS}\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let mut preflight =
        vec![("origin", "https://app.example.com"), ("access-control-request-method", "POST")];
    preflight.extend_from_slice(FORGED);
    let r = w.send(Method::OPTIONS, "/pf/claims", &preflight, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let head = crate::public::echoed(&r);
    for (name, _) in FORGED {
        assert_eq!(crate::public::field(&head, name), Vec::<String>::new(), "{name}: {head}");
    }
    assert_eq!(w.last_event().await["reason"], "cors-preflight");
}

#[tokio::test]
async fn claim_headers_over_http2_are_the_tokens_alone() {
    let w = world().await;
    let c = client(&w.pki, true);
    let send = |token: String| {
        let c = c.clone();
        let url = w.url("/claims");
        async move {
            let auth = format!("Bearer {token}");
            let mut h = vec![("authorization", auth.as_str())];
            h.extend_from_slice(FORGED);
            send_with(&c, Method::GET, &url, &h, Bytes::new()).await
        }
    };
    // `client(…, true)` speaks HTTP/2 only.
    assert_eq!(received(&send(full_token(&w)).await), full_expected());
    assert_eq!(received(&send(w.token("gh", &[])).await), vec![]);
}

/// A fresh token of the same principal shares the principal's assertion, never the
/// claim headers of the token before it.
#[tokio::test]
async fn each_token_of_a_principal_forwards_its_own_claims() {
    let w = world().await;
    let red = w.token("gh", &["team=red", "jti=1"]);
    let blue = w.token("gh", &["team=blue", "jti=2"]);
    let none = w.token("gh", &["jti=3"]);
    for _ in 0..2 {
        let r = with_token(&w, &red, FORGED).await;
        assert_eq!(received(&r), pairs(&[("x-team", "red")]));
        let assertion = r.upstream_header("x-portcullis-assertion");
        let r = with_token(&w, &blue, FORGED).await;
        assert_eq!(received(&r), pairs(&[("x-team", "blue")]));
        assert_eq!(r.upstream_header("x-portcullis-assertion"), assertion, "shared assertion");
        assert_eq!(received(&with_token(&w, &none, FORGED).await), vec![]);
    }
}

/// Names that cannot carry a claim are refused at load, each where it is written.
#[tokio::test]
async fn bad_claim_header_names_are_refused_with_their_position() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    std::fs::create_dir_all(dir.path().join("policies")).ok();
    write(
        &dir.path().join("policies/p.toml"),
        "[[rule]]\nid = \"gh\"\neffect = \"allow\"\nissuer = \"gh\"\nci = { workspace_id = \"1\" }\n",
    );
    let config = r#"[listen]
insecure_http = "127.0.0.1:0"

[issuers.gh]
preset = "github-actions"
audiences = ["x"]

[[routes]]
name = "api"
match = { path_prefix = "/" }
upstream = "http://127.0.0.1:9"
policy = "p"
claim_headers = { "X-Team" = "team", "x_team" = "team2", "X-Portcullis-Team" = "t", "Bad Name" = "t" }

[[routes]]
name = "b"
match = { path_prefix = "/b" }
upstream = "http://127.0.0.1:9"
policy = "p"

[routes.claim_headers]
Authorization = "t"
X-Forwarded-User = "t"
Content-Type = "t"
Connection = "t"
X-Ok = ""
"#;
    let path = dir.path().join("portcullis.toml");
    write(&path, config);
    let err = match portcullis::config::Config::load(&path) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    let file = path.display().to_string();
    for (line, col, says) in [
        (13, 38, "`x_team` is the same header as `x-team`"),
        (
            13,
            58,
            "`X-Portcullis-Team` cannot carry a claim: `X-Portcullis-*` names are the proxy's own",
        ),
        (13, 85, "`Bad Name` is not a header name"),
        (22, 1, "`Authorization` cannot carry a claim"),
        (23, 1, "`X-Forwarded-User` cannot carry a claim"),
        (24, 1, "`Content-Type` cannot carry a claim"),
        (25, 1, "`Connection` cannot carry a claim: a hop-by-hop header"),
        (26, 8, "the claim name is empty"),
    ] {
        let at = format!("{file}:{line}:{col}: `claim_headers`: {says}");
        assert!(err.lines().any(|l| l.starts_with(&at)), "no {at:?} in\n{err}");
    }
    assert_eq!(err.lines().filter(|l| l.contains("claim_headers")).count(), 8, "{err}");
}

/// A WebSocket upgrade goes upstream with the token's claim headers and none of the
/// client's.
#[tokio::test]
async fn a_websocket_upgrade_carries_the_tokens_claim_headers_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let upstream = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let Some(head) = read_head(&mut s).await else { continue };
            let _ = heads_tx.send(head.to_ascii_lowercase());
            let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n").await;
        }
    });
    let routes = format!(
        "[[routes]]\nname = \"ws\"\nmatch = {{ path_prefix = \"/ws\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n{CLAIM_HEADERS}\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("gh", &["team=red"]);
    let mut s = crate::forwarding::tls_alpn(&w, b"http/1.1").await;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Team: forged\r\nX_Team: forged\r\nX-Tenant: forged\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut answer = vec![0u8; 4096];
    let n = s.read(&mut answer).await.unwrap_or_else(|e| panic!("{e}"));
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let head = heads.recv().await.unwrap_or_default();
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "not an upgrade: {head}");
    let ours: Vec<&str> = head
        .lines()
        .filter(|l| ["x-team", "x_team", "x-tenant"].iter().any(|n| l.starts_with(n)))
        .collect();
    assert_eq!(ours, ["x-team: red"], "{head}");
    upstream.abort();
}

/// One application behind two routes: `/app` sends the caller's `X-Team`, the default
/// route (a public webhook path, and token callers) sends no claim headers. A client's
/// `X-Team` sent through the default route must not reach the application either, which
/// takes `X-Team` for the `/app` route's verified claim.
#[tokio::test]
async fn a_claim_header_name_is_removed_on_the_routes_that_do_not_send_it_too() {
    let policy = format!(
        "{ALLOW_ALL_PRESETS}\n[[rule]]\nid = \"hooks\"\neffect = \"allow\"\npublic = true\nmethods = [\"POST\"]\npaths = [\"/hooks/**\"]\n"
    );
    let w = World::with(Setup {
        routes: "[[routes]]\nname = \"app\"\nmatch = { path_prefix = \"/app\" }\nupstream = \"http://{echo}\"\npolicy = \"api\"\nstrip_prefix = true\nclaim_headers = { \"X-Team\" = \"team\" }\n".into(),
        policies: vec![("api".into(), policy)],
        ..Setup::default()
    })
    .await;
    let forged: &[(&str, &str)] = &[("x-team", "admins"), ("x_team", "admins")];
    let r = w.send(Method::POST, "/hooks/billing", forged, Bytes::new()).await;
    assert_eq!(w.last_event().await["rule"]["id"], "hooks");
    assert_eq!(received(&r), vec![]);
    let t = w.token("gh", &["team=red"]);
    let auth = format!("Bearer {t}");
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(forged);
    assert_eq!(received(&w.send(Method::GET, "/other", &h, Bytes::new()).await), vec![]);
    // The route that sends it sends the token's.
    let r = w.send(Method::GET, "/app/x", &h, Bytes::new()).await;
    assert_eq!(received(&r), pairs(&[("x-team", "red")]));
}
