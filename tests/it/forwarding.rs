//! What reaches the upstream, and how: header hygiene, identity headers and the signed
//! assertion, streaming bodies, WebSocket, HTTP/2, timeouts and upstream failures.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};

use crate::support::*;

#[tokio::test]
async fn spoofed_identity_and_hop_by_hop_headers_never_reach_the_upstream() {
    let w = World::with(Setup {
        route_extra: "strip_headers = [\"X-User\"]".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    let r = w
        .send(
            Method::GET,
            "/h",
            &[
                ("authorization", auth.as_str()),
                ("x-portcullis-subject", "admin"),
                ("X-Portcullis-Groups", "root"),
                ("x-portcullis-assertion", "forged"),
                ("x-user", "admin"),
                // CGI/WSGI servers read these as X-Portcullis-Email, X-User, X-Forwarded-For.
                ("x_portcullis_email", "ceo@example.com"),
                ("X_User", "admin"),
                ("x_forwarded_for", "6.6.6.6"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-host", "evil.test"),
                ("x-forwarded-port", "80"),
                ("forwarded", "for=6.6.6.6"),
                ("connection", "x-drop-me"),
                ("x-drop-me", "1"),
                (
                    "cookie",
                    "_portcullis=sess; _portcullis_1=chunk; __Host-_portcullis=s; \
                     __Host-_portcullis_0=c; __Secure-_portcullis=d; app=1",
                ),
                ("x-app", "kept"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let j = r.json();
    let h = &j["headers"];
    assert!(h.get("authorization").is_none(), "the caller's token is not forwarded by default");
    assert!(h.get("x-user").is_none());
    for underscored in ["x_portcullis_email", "x_user", "x_forwarded_for"] {
        assert!(h.get(underscored).is_none(), "{underscored} reached the upstream: {h}");
    }
    assert!(h.get("forwarded").is_none());
    assert!(h.get("x-drop-me").is_none());
    assert_eq!(h["x-portcullis-subject"].as_array().map(|a| a.len()), Some(1));
    assert_ne!(r.upstream_header("x-portcullis-subject").as_deref(), Some("admin"));
    assert_eq!(
        r.upstream_header("x-portcullis-groups"),
        None,
        "pipelines have no groups; the spoofed one is gone"
    );
    assert_ne!(r.upstream_header("x-portcullis-assertion").as_deref(), Some("forged"));
    assert_eq!(r.upstream_header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.upstream_header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(r.upstream_header("x-forwarded-host").as_deref(), Some("localhost"));
    // The port the client connected to, never the one it claims.
    let port = w.https.port().to_string();
    assert_eq!(r.upstream_header("x-forwarded-port"), Some(port));
    assert_eq!(h["x-forwarded-port"].as_array().map(|a| a.len()), Some(1), "{h}");
    assert_eq!(r.upstream_header("cookie").as_deref(), Some("app=1"));
    assert_eq!(r.upstream_header("x-app").as_deref(), Some("kept"));
    assert_eq!(r.upstream_header("x-portcullis-ci-branch").as_deref(), Some("main"));
    assert_eq!(r.upstream_header("x-portcullis-kind").as_deref(), Some("pipeline"));
}

/// Applications read the client's address from more headers than `X-Forwarded-For` and
/// the CDN ones: the widespread PHP idiom checks `HTTP_CLIENT_IP` first (before
/// `HTTP_X_FORWARDED_FOR`), django-ipware and npm `request-ip` read `X-Forwarded` and
/// `Forwarded-For`, `request-ip` Fastly's, App Engine's and Cloudflare's pseudo-IPv4 one,
/// WebLogic takes `WL-Proxy-Client-IP` as the remote address behind its plug-in. A caller
/// (with a token, or on a public path) sending them forged its address to such an
/// upstream: an IP allow-list passed, its log and rate limit fooled.
#[tokio::test]
async fn every_client_address_header_an_upstream_may_read_is_the_proxys_alone() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    let forged = [
        "client-ip",
        "x-forwarded",
        "forwarded-for",
        "fastly-client-ip",
        "x-appengine-user-ip",
        "cf-pseudo-ipv4",
        "proxy-client-ip",
        "wl-proxy-client-ip",
        // and in the spelling a CGI/WSGI server merges with the dashed one
        "client_ip",
        "x_forwarded",
        "wl_proxy_client_ip",
    ];
    let mut headers: Vec<(&str, &str)> = forged.iter().map(|n| (*n, "10.0.0.1")).collect();
    headers.push(("authorization", &auth));
    headers.push(("x-app", "kept"));
    let r = w.send(Method::GET, "/h", &headers, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let h = &r.json()["headers"];
    for name in forged {
        assert!(h.get(name).is_none(), "a client's `{name}` reached the upstream: {h}");
    }
    assert_eq!(r.upstream_header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.upstream_header("x-app").as_deref(), Some("kept"));
}

/// The test tokens are minted as `portcullis dev token --claim` mints them: a pipeline
/// token for another repository or ref says so in its `sub` too, as the provider's would,
/// so what the upstream is told is one consistent identity.
#[tokio::test]
async fn an_overridden_claim_rebuilds_the_subject_as_the_provider_does() {
    let w = World::start().await;
    let t = w.token("gh", &["repository=acme/api"]);
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.upstream_header("x-portcullis-subject").as_deref(),
        Some("repo:acme/api:ref:refs/heads/main")
    );
    // An explicit `sub` wins.
    let (_, claims) = w.parts("gh", &["repository=acme/api", "sub=repo:x/y:ref:z"]);
    assert_eq!(claims["sub"], "repo:x/y:ref:z");
}

/// A claim with a space at its edge or beside a list comma reaches the upstream with the
/// space encoded: an HTTP parser drops such whitespace (RFC 9110 §5.5, §5.6.1), and would
/// hand the application a group `admin` and a subject `root` the token never held.
#[tokio::test]
async fn spaces_in_claims_reach_the_upstream_encoded() {
    let w = World::start().await;
    let t = w.token("corp", &[r#"groups:=["engineering", " admin", "ops "]"#, "sub= root "]);
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.upstream_header("x-portcullis-groups").as_deref(),
        Some("engineering,%20admin,ops%20")
    );
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("%20root%20"));
}

#[tokio::test]
async fn a_route_may_send_the_identity_headers_without_the_signed_assertion() {
    let w =
        World::with(Setup { route_extra: "identity_assertion = false".into(), ..Setup::default() })
            .await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    let r = w
        .send(
            Method::GET,
            "/h",
            &[("authorization", &auth), ("x-portcullis-assertion", "forged")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-kind").as_deref(), Some("pipeline"));
    assert_eq!(r.upstream_header("x-portcullis-assertion"), None, "none, and never the client's");
}

#[tokio::test]
async fn routes_may_opt_in_to_forwarding_the_token() {
    let w =
        World::with(Setup { route_extra: "forward_token = true".into(), ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let r = w.get("/h", Some(&t)).await;
    assert_eq!(r.upstream_header("authorization"), Some(format!("Bearer {t}")));
}

#[tokio::test]
async fn the_signed_assertion_verifies_with_the_published_key() {
    let w = World::start().await;
    let r = w.get("/h", Some(&w.token("corp", &[]))).await;
    let jwt = r.upstream_header("x-portcullis-assertion").unwrap_or_default();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let jwks = w.get("/.well-known/portcullis/jwks.json", None).await.json();
    let k = &jwks["keys"][0];
    let mut point = vec![4u8];
    for c in ["x", "y"] {
        point.extend(URL_SAFE_NO_PAD.decode(k[c].as_str().unwrap_or_default()).unwrap_or_default());
    }
    let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap_or_default();
    let ok = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        &point,
    )
    .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
    .is_ok();
    assert!(ok, "assertion signature verifies against the JWKS");
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap_or_default())
            .unwrap_or_default();
    assert_eq!(claims["sub"], "corp/demo-user");
    assert_eq!(claims["aud"], "api");
    assert_eq!(claims["email"], "dev@demo.example");
    assert_eq!(claims["groups"][0], "engineering");
    let now = portcullis::util::unix_now();
    let exp = claims["exp"].as_u64().unwrap_or(0);
    assert!(exp > now && exp <= now + 61, "short-lived: {exp} vs {now}");
}

#[tokio::test]
async fn a_fresh_token_for_the_same_principal_gets_the_same_assertion_another_principal_its_own() {
    let w = World::start().await;
    let assertion = |r: &Resp| r.upstream_header("x-portcullis-assertion");
    // Two tokens (different jti and lifetime), one principal: one signature.
    let a = w.get("/h", Some(&w.token("corp", &["jti=one"]))).await;
    let b = w.get("/h", Some(&w.token("corp", &["jti=two", "exp:=4000000000"]))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(assertion(&a).is_some());
    assert_eq!(assertion(&a), assertion(&b));
    // Other groups: another assertion, saying so.
    let c = w
        .get("/h", Some(&w.token("corp", &["jti=three", r#"groups:=["engineering","ops"]"#])))
        .await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text());
    assert_ne!(assertion(&a), assertion(&c));
    let payload = assertion(&c).unwrap_or_default();
    let payload = payload.split('.').nth(1).unwrap_or_default();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap_or_default())
            .unwrap_or_default();
    assert_eq!(claims["groups"], serde_json::json!(["engineering", "ops"]));
    assert_eq!(c.upstream_header("x-portcullis-groups").as_deref(), Some("engineering,ops"));
    // A token that expires sooner never gets the longer-lived assertion.
    let soon = portcullis::util::unix_now() + 20;
    let d = w.get("/h", Some(&w.token("corp", &["jti=four", &format!("exp:={soon}")]))).await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text());
    assert_ne!(assertion(&a), assertion(&d));
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let w = World::with(Setup {
        route_extra: "max_request_body = \"64MiB\"".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    // 32 MiB up and back, produced lazily: the proxy never holds it whole.
    const CHUNK: usize = 64 * 1024;
    const N: usize = 512;
    let chunks = futures_util::stream::iter((0..N).map(|i| {
        Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![(i % 251) as u8; CHUNK])))
    }));
    let body = StreamBody::new(chunks);
    let client: hyper_util::client::legacy::Client<_, StreamBody<_>> = {
        let tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(w.pki.root_store()).with_no_client_auth())
            .unwrap_or_else(|e| panic!("{e}"));
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(conn)
    };
    let req = http::Request::post(w.url("/echo-body"))
        .header("authorization", format!("Bearer {t}"))
        .body(body)
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = client.request(req).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut total = 0usize;
    let mut ok = true;
    while let Some(f) = body.frame().await {
        let f = f.unwrap_or_else(|e| panic!("{e}"));
        if let Some(d) = f.data_ref() {
            for (j, b) in d.iter().enumerate() {
                ok &= *b == (((total + j) / CHUNK) % 251) as u8;
            }
            total += d.len();
        }
    }
    assert_eq!(total, CHUNK * N);
    assert!(ok, "bytes arrive intact and in order");
    let ev = w.last_event().await;
    assert_eq!(ev["bytes_in"], (CHUNK * N) as u64);
    assert_eq!(ev["bytes_out"], (CHUNK * N) as u64);
}

#[tokio::test]
async fn request_size_limit_is_enforced() {
    let w = World::with(Setup {
        route_extra: "max_request_body = \"1KiB\"".into(),
        ..Setup::default()
    })
    .await;
    let t = format!("Bearer {}", w.token("bb", &[]));
    let r = w
        .send(Method::POST, "/echo-body", &[("authorization", &t)], Bytes::from(vec![0u8; 2048]))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"], "payload-too-large");
    let r = w
        .send(Method::POST, "/echo-body", &[("authorization", &t)], Bytes::from(vec![0u8; 512]))
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Opens TLS to the proxy (HTTP/1.1 only, as WebSocket needs) and does the handshake.
pub async fn ws_connect(
    w: &World,
    token: Option<&str>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    ws_connect_at(w, "/ws", token).await
}

/// [`ws_connect`] to another path.
async fn ws_connect_at(
    w: &World,
    path: &str,
    token: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
    ws_connect_with(w, path, &headers).await
}

/// [`ws_connect`] to `path` with these request headers (a session cookie).
pub async fn ws_connect_with(
    w: &World,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = tls_h1(w).await;
    let mut req = format!("wss://localhost:{}{path}", w.https.port()).into_client_request()?;
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        req.headers_mut().insert(name, value.parse().unwrap_or_else(|e| panic!("{e:?}")));
    }
    tokio_tungstenite::client_async(req, stream).await.map(|(ws, resp)| {
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws
    })
}

#[tokio::test]
async fn websocket_is_tunnelled_after_101() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let mut ws = ws_connect(&w, Some(&t)).await.unwrap_or_else(|e| panic!("ws connect: {e}"));
    for msg in ["hello", "again"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.ok().flatten();
        let text = m.and_then(|m| m.ok()).and_then(|m| m.into_text().ok()).map(|t| t.to_string());
        assert_eq!(text.as_deref(), Some(msg));
    }
    // Without a token the handshake is refused before reaching the upstream.
    let err = ws_connect(&w, None).await.err();
    assert!(
        matches!(err, Some(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == StatusCode::UNAUTHORIZED),
        "{err:?}"
    );
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// One message echoed through the tunnel; false once the tunnel is gone.
pub async fn echo_once(ws: &mut Ws) -> bool {
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("hi")).await.is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await,
            Ok(Some(Ok(Message::Text(_))))
        )
}

#[tokio::test]
async fn websocket_tunnels_end_when_idle_and_when_the_credential_expires() {
    use tokio_tungstenite::tungstenite::Message;
    let w = World::with(Setup { server_extra: "idle_timeout = \"1s\"".into(), ..Setup::default() })
        .await;
    // Quiet after one exchange: ended after about the idle timeout.
    let mut ws = ws_connect(&w, Some(&w.token("bb", &[]))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await);
    let start = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), ws.next()).await;
    assert!(matches!(ended, Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))), "{ended:?}");
    assert!(start.elapsed() >= Duration::from_millis(900), "ended too early");

    // Busy, but the token expires in 3 s: ended then, not later.
    let exp = portcullis::util::unix_now() + 3;
    let t = w.token("bb", &[&format!("exp:={exp}")]);
    let mut ws = ws_connect(&w, Some(&t)).await.unwrap_or_else(|e| panic!("{e}"));
    let start = std::time::Instant::now();
    while echo_once(&mut ws).await {
        assert!(start.elapsed() < Duration::from_secs(8), "the tunnel outlived the token");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Not before `exp` (a bound on the time since the connect could not say so: a
    // connect slowed by load leaves less than 2 s of the token).
    assert!(portcullis::util::unix_now() >= exp, "ended before the token expired");

    // This world's tunnels by their end events; the metrics are the process's (other
    // tests' tunnels add to them).
    assert_eq!(tunnel_ends(&w, 2).await, ["idle", "credential-expired"]);
    for reason in ["idle", "credential-expired"] {
        assert!(tunnels_closed(&w, reason).await >= 1, "{reason}");
    }
}

/// Why each of this world's tunnels ended, in order, from their audit events, once at
/// least `n` are written (a tunnel's event follows the end its client saw; at most 10 s).
async fn tunnel_ends(w: &World, n: usize) -> Vec<String> {
    let ends = || {
        let ends = w.events().into_iter().filter(|e| e["kind"] == "websocket");
        ends.map(|e| e["reason"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>()
    };
    for _ in 0..200 {
        if ends().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ends()
}

/// The process-wide count of tunnels closed for `reason`.
async fn tunnels_closed(w: &World, reason: &str) -> u64 {
    let m = w.admin_get("/metrics").await.text();
    let prefix = format!("portcullis_websocket_tunnels_closed_total{{reason=\"{reason}\"}} ");
    m.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_reload_that_revokes_access_ends_open_websocket_tunnels_and_only_those() {
    let w = World::start().await;
    let main = w.token("bb", &[]);
    let mut ws = ws_connect(&w, Some(&main)).await.unwrap_or_else(|e| panic!("{e}"));
    let mut gh = ws_connect(&w, Some(&w.token("gh", &[]))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await && echo_once(&mut gh).await);

    // A reload that leaves both allowed (same policy, touched file): both tunnels go on.
    write(&w.policy_path("api"), &format!("{ALLOW_ALL_PRESETS}\n# reviewed\n"));
    assert!(w.server().reload().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echo_once(&mut ws).await && echo_once(&mut gh).await, "ended by a harmless reload");

    // Bitbucket's rule is removed: its tunnel ends, GitHub's goes on.
    let only_gh = "[[rule]]\nid = \"gh-main\"\neffect = \"allow\"\nissuer = \"gh\"\nci = { workspace_id = \"1001\", ref = \"refs/heads/main\" }\n";
    write(&w.policy_path("api"), only_gh);
    assert!(w.server().reload().await);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(matches!(ended, Ok(None | Some(Err(_)) | Some(Ok(_)))), "{ended:?}");
    assert!(!echo_once(&mut ws).await, "the revoked tunnel still relays");
    assert!(echo_once(&mut gh).await, "the still-allowed tunnel was ended");
    assert_eq!(tunnel_ends(&w, 1).await, ["access-revoked"]);
    assert!(tunnels_closed(&w, "access-revoked").await >= 1);
    // The event says why: the default deny, as no rule allows Bitbucket any more.
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(e["detail"], "policy-denied (no rule allows it)", "{e}");
    let open = w.events().into_iter().filter(|e| e["kind"] == "websocket").count();
    assert_eq!(open, 1, "one close event, for the revoked tunnel only");
}

/// The configuration with every issuer's `audiences` replaced by `audiences`, and the
/// routes `extra` appended.
pub fn with_audiences(config: &str, audiences: &str, extra: &str) -> String {
    config.replace(&format!("audiences = [{AUD:?}]"), &format!("audiences = [{audiences}]")) + extra
}

/// Round 10: a reload whose issuer no longer accepts an open tunnel's token (its
/// `audiences` changed) ends the tunnel, as a new upgrade with that token is refused;
/// a reload that changes nothing the token relies on (another route, an audience added)
/// leaves it open.
#[tokio::test]
async fn a_reload_that_stops_trusting_a_tunnels_token_ends_the_tunnel() {
    let w = World::start().await;
    let token = w.token("bb", &[]);
    let mut ws = ws_connect(&w, Some(&token)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await);
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let other = format!(
        "\n[[routes]]\nname = \"other\"\nmatch = {{ path_prefix = \"/other\" }}\nupstream = \"http://{}\"\npolicy = \"api\"\n",
        w.echo.addr()
    );

    write(&w.config_path(), &with_audiences(&config, &format!("{AUD:?}, \"another\""), &other));
    assert!(w.server().reload().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echo_once(&mut ws).await, "ended by a reload that does not concern its token");

    write(&w.config_path(), &with_audiences(&config, "\"another\"", &other));
    assert!(w.server().reload().await);
    assert_eq!(w.get("/ws", Some(&token)).await.status, StatusCode::UNAUTHORIZED);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(ended.is_ok(), "the tunnel outlived the reload that stopped trusting its token");
    assert!(!echo_once(&mut ws).await, "the untrusted tunnel still relays");
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(e["reason"], "access-revoked", "{e}");
    let detail = e["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("audience-mismatch") && detail.contains("as reloaded"), "{e}");
}

/// A token of `issuer` (`gl`, ...) signed by `signer` under `kid`.
pub fn token_by(
    w: &World,
    issuer: &str,
    signer: &portcullis::dev::signer::DevSigner,
    kid: &str,
) -> String {
    let (mut h, p) = w.parts(issuer, &[]);
    h["kid"] = serde_json::json!(kid);
    signer.sign_raw(&h.to_string(), &p.to_string())
}

/// Makes the proxy fetch `path`'s JWKS again now: a token with a `kid` it has never
/// seen, after the issuers' 1 s `refresh_cooldown` since the last such refresh.
pub async fn refresh_keys(w: &World, issuer: &str) {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let never = token_by(w, issuer, &w.signer, "never-seen");
    assert_eq!(w.get("/x", Some(&never)).await.status, StatusCode::UNAUTHORIZED);
}

/// Session 14 (identity attack round): an open tunnel ends when the issuer's key set
/// drops the key that verified its token (a rotation after a key compromise: a forged
/// token with a far-off `exp` kept its tunnel open until then), as a new upgrade with
/// that token is refused. A refresh that only adds a key ends nothing, and tunnels whose
/// key is still published (the new key of the same issuer, another issuer's) go on.
#[tokio::test]
async fn a_key_set_that_drops_a_tunnels_signing_key_ends_the_tunnel() {
    let w = World::start().await;
    let old = w.token("gl", &[]);
    let mut ws = ws_connect_at(&w, "/ws", Some(&old)).await.unwrap_or_else(|e| panic!("{e}"));
    let gh = w.token("gh", &[]);
    let mut other = ws_connect_at(&w, "/ws", Some(&gh)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await && echo_once(&mut other).await);

    // The issuer publishes a second key: fetched on first sight, nothing ends.
    let next = portcullis::dev::signer::DevSigner::generate_rs256("test-key-2")
        .unwrap_or_else(|e| panic!("{e}"));
    w.issuer.set_keys("/gitlab", &[&w.signer, &next]);
    let new = token_by(&w, "gl", &next, "test-key-2");
    let mut kept = ws_connect_at(&w, "/ws", Some(&new)).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echo_once(&mut ws).await, "ended by a refresh that only added a key");

    // The issuer retires the old key; the next refresh drops it.
    w.issuer.set_keys("/gitlab", &[&next]);
    refresh_keys(&w, "gl").await;
    assert_eq!(w.get("/x", Some(&old)).await.status, StatusCode::UNAUTHORIZED);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(ended.is_ok(), "the tunnel outlived the key that verified its token");
    assert!(!echo_once(&mut ws).await, "the tunnel of the dropped key still relays");
    assert!(echo_once(&mut kept).await, "the tunnel of the issuer's new key was ended");
    assert!(echo_once(&mut other).await, "another issuer's tunnel was ended");
    // The first upgrade to `/ws` is the old key's tunnel.
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(e["reason"], "access-revoked", "{e}");
    let detail = e["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("unknown-key")
            && detail.contains("`test-key-1`")
            && detail.contains("`gl`"),
        "{e}"
    );
    assert_eq!(tunnel_ends(&w, 1).await, ["access-revoked"], "only the dropped key's tunnel ended");
}

#[tokio::test]
async fn websocket_tunnels_work_through_the_shutdown_grace_period_then_end() {
    let mut w = World::start().await; // shutdown_grace = 5s
    let mut ws = ws_connect(&w, Some(&w.token("bb", &[]))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await);
    let server = w.server.take().unwrap_or_else(|| panic!("server"));
    let start = std::time::Instant::now();
    let drained = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(echo_once(&mut ws).await, "the tunnel ended before the grace period");
    let done = tokio::time::timeout(Duration::from_secs(10), drained).await;
    assert!(done.is_ok(), "shutdown did not finish");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(4500) && took < Duration::from_secs(8), "{took:?}");
    assert!(!echo_once(&mut ws).await, "the tunnel outlived the shutdown");
}

/// The `websocket` `close` event of the tunnel opened at `path` (the upgrade's `http`
/// event gives its request id), once written.
pub async fn tunnel_end_event(w: &World, path: &str) -> serde_json::Value {
    for _ in 0..200 {
        let events = w.events();
        let upgrade =
            events.iter().find(|e| e["kind"] == "http" && e["path"] == path && e["status"] == 101);
        if let Some(rid) = upgrade.map(|e| e["request_id"].clone()) {
            if let Some(e) =
                events.iter().find(|e| e["kind"] == "websocket" && e["request_id"] == rid)
            {
                return e.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serde_json::Value::Null
}

/// F3: an open tunnel is routed again at every reload, as a new request would be.
#[tokio::test]
async fn a_reload_that_routes_a_tunnels_path_elsewhere_or_nowhere_ends_the_tunnel() {
    let only_gh = "[[rule]]\nid = \"gh-main\"\neffect = \"allow\"\nissuer = \"gh\"\nci = { workspace_id = \"1001\", ref = \"refs/heads/main\" }\n";
    let w = World::with(Setup {
        policies: vec![
            ("api".into(), ALLOW_ALL_PRESETS.into()),
            ("gh-only".into(), only_gh.into()),
        ],
        ..Setup::default()
    })
    .await;
    let (bb, gh) = (w.token("bb", &[]), w.token("gh", &[]));
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let route = |name: &str, prefix: &str| {
        format!(
            "\n[[routes]]\nname = \"{name}\"\nmatch = {{ path_prefix = \"{prefix}\" }}\nupstream = \"http://{}\"\npolicy = \"gh-only\"\n",
            w.echo.addr()
        )
    };
    let mut ws = ws_connect(&w, Some(&bb)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await);

    // A route elsewhere changes nothing for the tunnel.
    write(&w.config_path(), &format!("{config}{}", route("other", "/other")));
    assert!(w.server().reload().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(echo_once(&mut ws).await, "ended by a reload that does not concern it");

    // A more specific route for `/ws`, whose policy refuses Bitbucket: a new upgrade
    // there is 403, and the open tunnel ends.
    write(&w.config_path(), &format!("{config}{}", route("secret", "/ws")));
    assert!(w.server().reload().await);
    assert_eq!(w.get("/ws", Some(&bb)).await.status, StatusCode::FORBIDDEN);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(ended.is_ok(), "the re-routed tunnel still relays");
    assert!(!echo_once(&mut ws).await, "the re-routed tunnel still relays");
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(
        (e["reason"].as_str(), e["route"].as_str()),
        (Some("access-revoked"), Some("api")),
        "{e}"
    );
    assert_eq!(
        e["detail"], "the upgrade request goes to route `secret` since the reload (was `api`)",
        "{e}"
    );

    // GitHub may use `secret`; then every route is narrowed away from `/ws` (the default
    // one to `/public`): a new upgrade is 404, and the open tunnel ends.
    let mut ws = ws_connect(&w, Some(&gh)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await);
    write(&w.config_path(), &config.replace("path_prefix = \"/\"", "path_prefix = \"/public\""));
    assert!(w.server().reload().await);
    assert_eq!(w.get("/ws", Some(&gh)).await.status, StatusCode::NOT_FOUND);
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(ended.is_ok(), "the unrouted tunnel still relays");
    assert!(!echo_once(&mut ws).await, "the unrouted tunnel still relays");
    assert_eq!(tunnel_ends(&w, 2).await, ["access-revoked", "access-revoked"]);
}

/// F5: every tunnel's end is audited: its upgrade's request id, route, identity, the
/// bytes each way, how long it lasted and why it ended.
#[tokio::test]
async fn a_tunnels_end_is_audited_with_its_bytes_duration_and_reason() {
    let w = World::start().await;
    let mut ws = ws_connect(&w, Some(&w.token("bb", &[]))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await && echo_once(&mut ws).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    drop(ws);
    let e = tunnel_end_event(&w, "/ws").await;
    assert_eq!(e["event"], "close", "{e}");
    assert_eq!(e["route"], "api");
    // The host as the upgrade's `http` event shows it (as sent, port included).
    let upgrade = w
        .events()
        .into_iter()
        .find(|u| u["kind"] == "http" && u["request_id"] == e["request_id"])
        .unwrap_or_default();
    assert_eq!(e["host"], format!("localhost:{}", w.https.port()), "{e}");
    assert_eq!(e["host"], upgrade["host"], "{upgrade}");
    assert_eq!(e["reason"], "closed");
    assert_eq!(e["decision"], "closed");
    // The client sent the close frame; the echo server closed its connection first.
    assert_eq!(e["ended_by"], "client", "{e}");
    assert_eq!(e["identity"]["issuer"], "bb");
    assert_eq!(e["ci"]["branch"], "main");
    assert_eq!(e["upstream"].as_str(), Some(format!("http://{}", w.echo.addr()).as_str()));
    // Two masked frames of "hi" (8 bytes each) and the close frame from the client; two
    // unmasked ones (4 bytes each) and the close back.
    let (i, o) = (e["bytes_in"].as_u64().unwrap_or(0), e["bytes_out"].as_u64().unwrap_or(0));
    assert!(i >= 16 && o >= 8, "{e}");
    assert!(e["duration_ms"].as_f64().unwrap_or(0.0) >= 200.0, "{e}");
    assert!(e["policy_revision"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
}

/// F7: the tunnels' grace at shutdown is the drain's, as the server started: a reload
/// that changes `shutdown_grace` applies to neither (and says so).
#[tokio::test]
async fn a_reload_changes_neither_the_drains_nor_the_tunnels_shutdown_grace() {
    let mut w = World::start().await; // shutdown_grace = 5s
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    write(&w.config_path(), &config.replace("shutdown_grace = \"5s\"", "shutdown_grace = \"60s\""));
    assert!(w.server().reload().await);
    let reload = w.events().into_iter().find(|e| e["kind"] == "reload").unwrap_or_default();
    assert_eq!(reload["restart_required"], serde_json::json!(["server.shutdown_grace"]));
    let mut ws = ws_connect(&w, Some(&w.token("bb", &[]))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await);
    let server = w.server.take().unwrap_or_else(|| panic!("server"));
    let start = std::time::Instant::now();
    let drained = tokio::spawn(server.shutdown());
    let done = tokio::time::timeout(Duration::from_secs(20), drained).await;
    assert!(done.is_ok(), "shutdown did not finish");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(4500) && took < Duration::from_secs(8), "{took:?}");
    assert!(!echo_once(&mut ws).await, "the tunnel outlived the drain");
    assert_eq!(tunnel_end_event(&w, "/ws").await["reason"], "shutting-down");
}

#[tokio::test]
async fn a_websocket_tunnel_keeps_its_connection_slot() {
    let w =
        World::with(Setup { server_extra: "max_connections = 1".into(), ..Setup::default() }).await;
    let mut ws = ws_connect(&w, Some(&w.token("bb", &[]))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(echo_once(&mut ws).await);
    // The upgraded connection was handed over to the tunnel, which still holds the one
    // slot: a second client waits for it (its TLS handshake is not answered).
    let tcp = tokio::net::TcpStream::connect(w.https).await.unwrap_or_else(|e| panic!("{e}"));
    let roots = w.pki.root_store();
    let waiting = tokio::spawn(async move {
        let mut tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|e| panic!("{e}"));
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name =
            rustls_pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "a second connection was served beside the tunnel");
    // The tunnel ends: the slot frees and the waiting client is served.
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    drop(ws);
    let served = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(matches!(served, Ok(Ok(Ok(_)))), "the slot was not released");
}

/// A route `/h2c` to the echo server over HTTP/2 with prior knowledge.
const H2C_ROUTE: &str = r#"
[[routes]]
name = "h2c"
match = { path_prefix = "/h2c" }
upstream = "h2c://{echo}"
policy = "api"
"#;

#[tokio::test]
async fn http2_clients_and_h2c_upstreams() {
    let w = World::with(Setup { routes: H2C_ROUTE.into(), ..Setup::default() }).await;
    let c = client(&w.pki, true);
    let t = format!("Bearer {}", w.token("bb", &[]));
    let r =
        send_with(&c, Method::GET, &w.url("/h2c/x"), &[("authorization", &t)], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0", "h2c upstream");
    let r =
        send_with(&c, Method::GET, &w.url("/plain"), &[("authorization", &t)], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    let ev = w.last_event().await;
    assert_eq!(ev["status"], 200);
}

#[tokio::test]
async fn upstream_failures_are_502_and_504() {
    let routes = r#"
[[routes]]
name = "down"
match = { path_prefix = "/down" }
upstream = "http://127.0.0.1:9"
policy = "api"
"#;
    let w = World::with(Setup {
        routes: routes.into(),
        route_extra: "timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let r = w.get("/down/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream-unavailable");
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["decision"], "error");
    assert!(
        ev["detail"].as_str().unwrap_or("").contains("upstream"),
        "the precise cause is logged: {ev}"
    );
    let r = w.get("/slow/2000", Some(&t)).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"], "upstream-timeout");
    let r = w.get("/close", Some(&t)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
}

/// An HTTPS upstream on loopback with a private CA, offering `alpn`: each answer's body
/// is `answer(connection number from 1, request)`, with status 200, or 403 for a path
/// holding `/deny` (its body read first, so the connection stays usable). Returns its
/// address, its PKI (the CA to trust), the directory holding it and its accept task.
async fn https_upstream(
    alpn: Vec<Vec<u8>>,
    answer: fn(usize, &http::Request<hyper::body::Incoming>) -> String,
) -> (std::net::SocketAddr, portcullis::tls::DevPki, tempfile::TempDir, tokio::task::JoinHandle<()>)
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pki =
        portcullis::tls::DevPki::load_or_create(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let tls = portcullis::tls::server_config_with_alpn(pki.key_source(), vec![], alpn)
        .unwrap_or_else(|e| panic!("{e}"));
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let server = tokio::spawn(async move {
        let mut conns = 0;
        while let Ok((s, _)) = listener.accept().await {
            conns += 1;
            let (acceptor, id) = (acceptor.clone(), conns);
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(s).await else { return };
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let text = answer(id, &req);
                        // `/deny…` is refused (after its body was read: the proxy cannot tell).
                        let status = if req.uri().path().contains("/deny") {
                            StatusCode::FORBIDDEN
                        } else {
                            StatusCode::OK
                        };
                        let _ = req.into_body().collect().await;
                        let mut resp =
                            http::Response::new(http_body_util::Full::new(Bytes::from(text)));
                        *resp.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, pki, dir, server)
}

/// The proxy with a route `/tls` to an HTTPS upstream that speaks HTTP/1.1 only and
/// answers each request with its connection's number ([`https_upstream`]).
pub(crate) async fn world_with_http1_tls_upstream(
) -> (World, tempfile::TempDir, tokio::task::JoinHandle<()>) {
    let (addr, pki, dir, server) =
        https_upstream(vec![b"http/1.1".to_vec()], |id, _| id.to_string()).await;
    let routes = format!(
        "[[routes]]\nname = \"tls-up\"\nmatch = {{ path_prefix = \"/tls\" }}\nupstream = \"https://localhost:{}\"\nupstream_ca = {:?}\npolicy = \"api\"\n",
        addr.port(),
        pki.ca_path().to_string_lossy(),
    );
    (World::with(Setup { routes, ..Setup::default() }).await, dir, server)
}

/// An HTTPS upstream with a private CA: the proxy verifies it with `upstream_ca` and
/// negotiates HTTP/2 by ALPN.
#[tokio::test]
async fn https_upstreams_use_their_ca_and_alpn() {
    let (addr, pki, _dir, server) =
        https_upstream(vec![b"h2".to_vec(), b"http/1.1".to_vec()], |_, req| {
            format!("{:?}", req.version())
        })
        .await;
    let routes = format!(
        "[[routes]]\nname = \"tls-up\"\nmatch = {{ path_prefix = \"/tls\" }}\nupstream = \"https://localhost:{}\"\nupstream_ca = {:?}\npolicy = \"api\"\n\n[[routes]]\nname = \"tls-untrusted\"\nmatch = {{ path_prefix = \"/untrusted\" }}\nupstream = \"https://localhost:{}\"\npolicy = \"api\"\n",
        addr.port(),
        pki.ca_path().to_string_lossy(),
        addr.port()
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let r = w.get("/tls/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "HTTP/2.0");
    // Without the CA the upstream's certificate is not trusted: 502, never a silent downgrade.
    let r = w.get("/untrusted/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    server.abort();
}

/// An HTTPS upstream (HTTP/1.1 by ALPN) that declines an upgrade: the connection that
/// carried it is not handed to the next request, whose answer could otherwise come from
/// a careless upstream that switched protocols anyway.
#[tokio::test]
async fn a_declined_upgrade_to_an_https_upstream_leaves_its_connection_unused() {
    // Every answer says which connection it came on; an upgrade gets a 200.
    let (w, _dir, server) = world_with_http1_tls_upstream().await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    let first = w.get("/tls/a", Some(&t)).await;
    assert_eq!((first.status, first.text()), (StatusCode::OK, "1".to_string()));
    let upgrade = w
        .send(
            Method::GET,
            "/tls/ws",
            &[
                ("authorization", &auth),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
            Bytes::new(),
        )
        .await;
    let declined_on = upgrade.text();
    for _ in 0..3 {
        let r = w.get("/tls/b", Some(&t)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_ne!(r.text(), declined_on, "served on the connection of the declined upgrade");
    }
    assert_eq!(declined_on, "2", "the upgrade went on a connection of its own");
    server.abort();
}

/// An HTTPS upstream (HTTP/1.1 by ALPN) that refuses a request with a body: the proxy
/// cannot tell whether it read that body (an upstream that did not would read it next as
/// a request, and its answer would reach the next client), so that connection is not
/// reused; requests without a body and successes keep their connection.
#[tokio::test]
async fn an_https_upstream_connection_whose_request_body_was_refused_is_not_reused() {
    let (w, _dir, server) = world_with_http1_tls_upstream().await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    let post = |path: &'static str, body: &'static [u8]| {
        let (w, auth) = (&w, &auth);
        async move {
            w.send(Method::POST, path, &[("authorization", auth)], Bytes::from_static(body)).await
        }
    };
    // Pooling stays on: a GET, a refused GET, a POST answered 200, an empty POST refused.
    let r = w.get("/tls/a", Some(&t)).await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, "1".to_string()));
    let r = w.get("/tls/deny", Some(&t)).await;
    assert_eq!((r.status, r.text()), (StatusCode::FORBIDDEN, "1".to_string()));
    let r = post("/tls/upload", b"hello").await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, "1".to_string()));
    let r = post("/tls/deny", b"").await;
    assert_eq!((r.status, r.text()), (StatusCode::FORBIDDEN, "1".to_string()));
    // A body refused: its connection is not handed to anyone again.
    let r = post("/tls/deny", b"GET /smug HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!((r.status, r.text()), (StatusCode::FORBIDDEN, "1".to_string()));
    for _ in 0..3 {
        let r = w.get("/tls/b", Some(&t)).await;
        assert_eq!((r.status, r.text()), (StatusCode::OK, "2".to_string()));
    }
    server.abort();
}

/// The listener picks the certificate by SNI, and the request then routes by Host.
#[tokio::test]
async fn sni_selects_the_certificate_and_the_route() {
    use hyper_util::rt::TokioIo;
    let extra = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let other =
        portcullis::tls::DevPki::load_or_create(extra.path(), &["api.example.test".to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
    let routes = "[[routes]]\nname = \"named\"\nmatch = { host = \"api.example.test\" }\nupstream = \"http://{echo}/named\"\npolicy = \"api\"\n";
    let mut setup = Setup { routes: routes.into(), ..Setup::default() };
    // [[tls.sni]] must follow [tls]; the harness puts listen_extra before [tls], so the
    // SNI table is appended through the route text instead.
    setup.routes.push_str(&format!(
        "\n[[tls.sni]]\nserver_names = [\"api.example.test\"]\ncert = {:?}\nkey = {:?}\n",
        other.cert_path().to_string_lossy(),
        other.key_path().to_string_lossy()
    ));
    let w = World::with(setup).await;
    let handshake = |name: &'static str, roots: rustls::RootCertStore| {
        let addr = w.https;
        async move {
            let mut cfg = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .unwrap_or_else(|e| panic!("{e}"));
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
            let sn = rustls_pki_types::ServerName::try_from(name).unwrap_or_else(|e| panic!("{e}"));
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(sn, tcp).await
        }
    };
    // The default certificate does not cover api.example.test; the SNI one does.
    assert!(
        handshake("api.example.test", w.pki.root_store()).await.is_err(),
        "default cert is not served for the SNI name"
    );
    let tls = handshake("api.example.test", other.root_store())
        .await
        .unwrap_or_else(|e| panic!("SNI cert: {e}"));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(conn);
    let req = http::Request::get("/x")
        .header("host", "api.example.test")
        .header("authorization", format!("Bearer {}", w.token("bb", &[])))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send.send_request(req).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(v["path"], "/named/x", "routed by Host to the named route");
}

/// HTTP/2 connection coalescing: a browser reuses a connection made for one name (SNI
/// `localhost`) for another name its certificate covers and resolving to the same address,
/// sending that name as `:authority`. The proxy answers 421 (the browser retries on a
/// connection of its own, RFC 9113 §9.1.2), never serves the other route on it, and keeps
/// the connection for the name it was made for; a `host` header that contradicts
/// `:authority` is refused too (the proxy routes by one, an upstream might by the other).
#[tokio::test]
async fn an_http2_connection_serves_only_the_name_it_was_made_for() {
    let routes = "[[routes]]\nname = \"other\"\nmatch = { host = \"api.example.test\" }\nupstream = \"http://{echo}/other\"\npolicy = \"api\"\n";
    let w = World::with(Setup { routes: routes.into(), ..Setup::default() }).await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let port = w.https.port();
    let exchange = |authority: String, host: Option<&'static str>| {
        let (mut send, auth) = (send.clone(), auth.clone());
        async move {
            let mut req =
                http::Request::get(format!("https://{authority}/x")).header("authorization", auth);
            if let Some(h) = host {
                req = req.header("host", h);
            }
            let req = req.body(()).unwrap_or_else(|e| panic!("{e}"));
            send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
            let (resp, _) = send.send_request(req, true).unwrap_or_else(|e| panic!("{e}"));
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .unwrap_or_else(|_| panic!("no answer"))
                .unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status();
            let mut body = resp.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap_or_else(|e| panic!("{e}"));
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let (status, body) = exchange(format!("api.example.test:{port}"), None).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    assert!(!body.contains("/other/x"), "the other route served on this connection: {body}");
    // The connection still serves its own name.
    let (status, body) = exchange(format!("localhost:{port}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"/x\""), "{body}");
    let (status, body) = exchange(format!("localhost:{port}"), Some("api.example.test")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

/// Forwarded headers from a configured trusted proxy are kept and appended to.
#[tokio::test]
async fn trusted_proxies_keep_their_forwarded_headers() {
    let w = World::with(Setup {
        listen_extra: "trusted_proxies = [\"127.0.0.0/8\"]".into(),
        ..Setup::default()
    })
    .await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let r = w
        .send(
            Method::GET,
            "/x",
            &[
                ("authorization", &auth),
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.upstream_header("x-forwarded-for").as_deref(), Some("203.0.113.7, 127.0.0.1"));
    // No port given: the proxy's listener's.
    let port = w.https.port().to_string();
    assert_eq!(r.upstream_header("x-forwarded-port"), Some(port.clone()));
    // The trusted proxy's port (its own listener's, say 443) is kept; one that is not a
    // port number is replaced.
    for (given, want) in [("443", "443"), ("443, 8443", port.as_str()), ("https", port.as_str())] {
        let r = w
            .send(
                Method::GET,
                "/x",
                &[("authorization", &auth), ("x-forwarded-port", given)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.upstream_header("x-forwarded-port").as_deref(), Some(want), "{given}");
    }
}

/// Behind a trusted proxy that passes its client's `X-Forwarded-Host` and `Forwarded`
/// through (nginx's `proxy_pass` without `proxy_set_header`), a client routed and
/// authorized for one host named another to the upstream, which an upstream serving
/// both by that header served. The upstream is now told the routed host, in both.
#[tokio::test]
async fn a_trusted_proxy_cannot_pass_on_a_host_the_request_was_not_routed_by() {
    let w = World::with(Setup {
        listen_extra: "trusted_proxies = [\"127.0.0.0/8\"]".into(),
        ..Setup::default()
    })
    .await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    for h2 in [false, true] {
        let c = client(&w.pki, h2);
        let r = send_with(
            &c,
            Method::GET,
            &w.url("/x"),
            &[
                ("authorization", &auth),
                ("x-forwarded-host", "admin.example.com"),
                ("x-forwarded-proto", "https"),
                ("forwarded", "for=203.0.113.7;host=admin.example.com;proto=https"),
            ],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let h = &r.json()["headers"];
        assert_eq!(h["x-forwarded-host"], serde_json::json!(["localhost"]), "h2: {h2}");
        assert_eq!(
            h["forwarded"],
            serde_json::json!(["for=203.0.113.7;host=\"localhost\";proto=https"]),
            "h2: {h2}"
        );
        // The rest of what the trusted proxy says is kept.
        assert_eq!(h["x-forwarded-proto"], serde_json::json!(["https"]), "h2: {h2}");
    }
}

/// `Host` is what a request is routed and authorized by, and `X-Forwarded-Host` the
/// proxy's own; but applications read the host from other headers too: `X-Original-Host`
/// (Azure Application Gateway and Front Door, IIS ARR, ngrok's `--host-header`, PHP and
/// Django middleware), `X-Host`, `X-Forwarded-Server` (Apache `mod_proxy`'s, read as the
/// host by PHP and Rails code and by Jetty with `forwardedProxyAsAuthority`),
/// `X-HTTP-Host-Override`, `X-Proxy-Host`. A client authorized for `app` sent one naming
/// `admin` to an upstream that serves both by it. None reaches the upstream, from any
/// peer (a trusted proxy passes its client's copy through), in either spelling.
#[tokio::test]
async fn host_override_headers_never_reach_the_upstream_from_any_peer() {
    let overrides = [
        "x-original-host",
        "x-host",
        "x-forwarded-server",
        "x-http-host-override",
        "x-proxy-host",
        "x-host-override",
        "x-real-host",
        "x-origin-host",
        // and in the spelling a CGI/WSGI server merges with the dashed one
        "x_original_host",
        "x_host",
        "x_forwarded_server",
        "x_http_host_override",
        "x_proxy_host",
    ];
    for trusted in [false, true] {
        let listen_extra =
            if trusted { "trusted_proxies = [\"127.0.0.0/8\"]".into() } else { String::new() };
        let w = World::with(Setup { listen_extra, ..Setup::default() }).await;
        let auth = format!("Bearer {}", w.token("bb", &[]));
        let mut headers: Vec<(&str, &str)> =
            overrides.iter().map(|n| (*n, "admin.example.com")).collect();
        headers.push(("authorization", &auth));
        headers.push(("x-app", "kept"));
        for h2 in [false, true] {
            let c = client(&w.pki, h2);
            let r = send_with(&c, Method::GET, &w.url("/x"), &headers, Bytes::new()).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            let h = &r.json()["headers"];
            for name in overrides {
                assert!(
                    h.get(name).is_none(),
                    "a client's `{name}` reached the upstream (trusted: {trusted}, h2: {h2}): {h}"
                );
            }
            assert_eq!(h["x-forwarded-host"], serde_json::json!(["localhost"]), "{h}");
            assert_eq!(r.upstream_header("x-app").as_deref(), Some("kept"));
        }
    }
}

#[tokio::test]
async fn preserve_host_forwards_the_clients_authority_for_http1_and_http2() {
    let w =
        World::with(Setup { route_extra: "preserve_host = true".into(), ..Setup::default() }).await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let want = format!("localhost:{}", w.https.port());
    let r = w.send(Method::GET, "/x", &[("authorization", &auth)], Bytes::new()).await;
    assert_eq!(r.upstream_header("host"), Some(want.clone()));
    let c = client(&w.pki, true);
    let r =
        send_with(&c, Method::GET, &w.url("/x"), &[("authorization", &auth)], Bytes::new()).await;
    assert_eq!(r.upstream_header("host"), Some(want));
}

/// A client's `Connection` option cannot remove a header the proxy routes, authorizes or
/// sets by: with `Connection: host` a `preserve_host` upstream still gets the name the
/// request was routed and authorized by (not its own address, another virtual host), and
/// `Connection: x-forwarded-for` does not drop a trusted proxy's chain. Other listed
/// headers still go.
#[tokio::test]
async fn connection_options_cannot_remove_host_or_the_forwarding_chain() {
    let w = World::with(Setup {
        route_extra: "preserve_host = true".into(),
        listen_extra: "trusted_proxies = [\"127.0.0.0/8\"]".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    for connection in ["host, x-drop-me", "Host, x-forwarded-for, x-drop-me", "x-drop-me, HOST"] {
        let req = format!(
            "GET /x HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nConnection: {connection}\r\nConnection: close\r\nX-Forwarded-For: 203.0.113.7\r\nX-Drop-Me: 1\r\n\r\n"
        );
        let resp = raw_exchange(&w, &req).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{connection}: {resp}");
        let echo = echo_in(&resp);
        let h = &echo["headers"];
        assert_eq!(h["host"][0], format!("localhost:{port}"), "{connection}: {echo}");
        assert_eq!(h["x-forwarded-host"][0], "localhost", "{connection}: {echo}");
        assert_eq!(h["x-forwarded-for"][0], "203.0.113.7, 127.0.0.1", "{connection}: {echo}");
        assert!(h.get("x-drop-me").is_none(), "{connection}: {echo}");
    }
}

/// A TLS connection to the proxy offering only HTTP/1.1.
async fn tls_h1(w: &World) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_alpn(w, b"http/1.1").await
}

/// Sends `req` as written on a new HTTP/1.1 TLS connection and reads what comes back
/// until the proxy closes it (at most 5 s).
async fn raw_h1_exchange(w: &World, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_h1(w).await;
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

pub(crate) async fn tls_alpn(
    w: &World,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(w.pki.root_store()).with_no_client_auth())
        .unwrap_or_else(|e| panic!("{e}"));
    tls.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(w.https).await.unwrap_or_else(|e| panic!("{e}"));
    let name =
        rustls_pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One raw HTTP/1.1 exchange over TLS: exactly these bytes, then everything the proxy
/// sends until it closes the connection (or 10 s pass).
pub(crate) async fn raw_exchange(w: &World, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_h1(w).await;
    s.write_all(request.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the proxy kept the connection open: {}", String::from_utf8_lossy(&out));
    String::from_utf8_lossy(&out).into_owned()
}

/// Userinfo in the Host or in an absolute-form target is refused (400), and the
/// audit event of the refusal names the host without it: `user:password@` is a
/// password, which no log line may hold. The event's `host` quoted it as sent
/// (`"host":"user:hunter2@localhost:…"`) until tested.
#[tokio::test]
async fn userinfo_in_the_authority_never_reaches_the_audit_log() {
    let w = World::start().await;
    let port = w.https.port();
    let cases = [
        ("Host", format!("GET /x HTTP/1.1\r\nHost: alice:hunter2@localhost:{port}\r\n\r\n")),
        (
            "absolute-form target",
            format!("GET https://alice:hunter2@localhost:{port}/x HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
        ),
        ("target without Host", format!("GET https://hunter2@localhost:{port}/x HTTP/1.1\r\n\r\n")),
    ];
    for (what, request) in cases {
        let resp = raw_exchange(&w, &request).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{what}: {resp}");
        let id = resp
            .split("\"request_id\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("{what}: no request id: {resp}"));
        let ev = w.event_for(id).await;
        assert_eq!(ev["reason"], "bad-request", "{what}: {ev}");
        assert!(!ev.to_string().contains("hunter2"), "{what}: the password was logged: {ev}");
        assert_eq!(ev["host"], format!("***@localhost:{port}"), "{what}: {ev}");
    }
}

#[tokio::test]
async fn ambiguous_authority_is_refused_and_framing_is_never_forwarded_ambiguously() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let auth = format!("Authorization: Bearer {t}\r\n");
    let cases = [
        (
            "two Host headers",
            format!(
                "GET /x HTTP/1.1\r\nHost: localhost:{port}\r\nHost: other.example\r\n{auth}\r\n"
            ),
        ),
        (
            "userinfo in Host",
            format!("GET /x HTTP/1.1\r\nHost: user@localhost:{port}\r\n{auth}\r\n"),
        ),
        (
            "absolute-form target and Host differ",
            format!("GET https://other.example/x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}\r\n"),
        ),
        (
            "userinfo in an absolute-form target without Host",
            format!("GET https://evil@localhost:{port}/x HTTP/1.1\r\n{auth}\r\n"),
        ),
        (
            "a list in Host (frameworks read the first element)",
            format!("GET /x HTTP/1.1\r\nHost: evil.example,localhost:{port}\r\n{auth}\r\n"),
        ),
        (
            "other punctuation in Host",
            format!("GET /x HTTP/1.1\r\nHost: evil.example;localhost:{port}\r\n{auth}\r\n"),
        ),
    ];
    for (what, request) in cases {
        let resp = raw_exchange(&w, &request).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{what}: {resp}");
        assert!(resp.contains("\"error\":\"bad-request\""), "{what}: {resp}");
        // One response only: nothing after it was read as a second request.
        assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{what}: {resp}");
        assert!(!resp.contains(&t), "{what}: the token was echoed");
    }
    // Content-Length beside Transfer-Encoding: framed by Transfer-Encoding alone, and the
    // upstream is sent that framing only, so the two hops cannot disagree on where the
    // body ends; and the connection is closed after the response (RFC 9112 §6.1), so
    // nothing after the chunked body is read as a request.
    let resp = raw_exchange(
        &w,
        &format!("POST /x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    let echo_start = resp.find("{\"method\"").unwrap_or_else(|| panic!("no echo: {resp}"));
    let echo_end =
        echo_start + resp[echo_start..].find("}\r\n").map_or(resp.len() - echo_start, |e| e + 1);
    let echo: serde_json::Value =
        serde_json::from_str(&resp[echo_start..echo_end]).unwrap_or_else(|e| panic!("{e}: {resp}"));
    assert_eq!(echo["body_bytes"], 3, "{echo}");
    assert!(echo["headers"].get("content-length").is_none(), "{echo}");
    assert_eq!(echo["headers"]["transfer-encoding"][0], "chunked", "{echo}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "a trailing request was served: {resp}");
    // TRACE would have the upstream reflect the identity headers and the signed
    // assertion back to the caller: refused on every route, before authentication.
    let resp = raw_exchange(
        &w,
        &format!("TRACE /x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}Connection: close\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 405 "), "{resp}");
    assert!(resp.contains("\"error\":\"method-not-allowed\""), "{resp}");
    assert!(!resp.to_ascii_lowercase().contains("x-portcullis-assertion"), "{resp}");
    // Methods not in upper case: frameworks upper-case them, so `delete` would pass a
    // deny on `DELETE` and run as one, and `trace` would pass the TRACE ban.
    for method in ["delete", "Delete", "trace", "gEt"] {
        let resp = raw_exchange(
            &w,
            &format!(
                "{method} /x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}Connection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{method}: {resp}");
        assert!(resp.contains("\"error\":\"bad-request\""), "{method}: {resp}");
    }
    let ev = w.last_event().await;
    assert_eq!(ev["method"], "gEt");
    assert!(ev["detail"].as_str().is_some_and(|d| d.contains("upper case")), "{ev}");
    // The unambiguous forms still work: absolute-form agreeing with Host, and origin-form.
    for request in [
        format!("GET https://localhost:{port}/x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}Connection: close\r\n\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: LOCALHOST:{port}\r\n{auth}Connection: close\r\n\r\n"),
    ] {
        let resp = raw_exchange(&w, &request).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{request}: {resp}");
    }
    let wanted = [
        "more than one Host header",
        "Host carries userinfo",
        "Host differs from the request target's authority",
    ];
    // Events are written as bodies end, which may be after the client has read them.
    let mut reasons = Vec::new();
    for _ in 0..250 {
        reasons = w
            .events()
            .iter()
            .filter(|e| e["reason"] == "bad-request")
            .filter_map(|e| e["detail"].as_str().map(String::from))
            .collect();
        if wanted.iter().all(|d| reasons.iter().any(|r| r == d)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for detail in wanted {
        assert!(reasons.iter().any(|r| r == detail), "{detail} not in {reasons:?}");
    }
}

/// One HTTP/1.1 response with a Content-Length body; its head.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(limit, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no complete response"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no content-length: {text}"));
            if got.len() >= end + 4 + len {
                return text[..end].to_string();
            }
        }
    }
}

/// Reads until the proxy closes the connection; how long that took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Duration {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(limit, s.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the connection was still open after {limit:?}");
    start.elapsed()
}

#[tokio::test]
async fn idle_connections_are_closed_but_never_with_a_request_in_flight() {
    use tokio::io::AsyncWriteExt;
    let _alone = IDLE_CLOSES.lock().await;
    let w = World::with(Setup { server_extra: "idle_timeout = \"1s\"".into(), ..Setup::default() })
        .await;
    let before = idle_closes(&w).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let limit = Duration::from_secs(6);

    // Handshake done, no request ever sent: the slot must not be held forever.
    let mut silent = tls_h1(&w).await;
    let took = closed_within(&mut silent, limit).await;
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");

    // Keep-alive after a request, and a request slower than the idle timeout on the same
    // connection: the slow one completes, then the connection is closed once idle.
    let mut s = tls_h1(&w).await;
    let req = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\n\r\n"
        )
    };
    s.write_all(req("/slow/2500").as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let head = read_response(&mut s, limit).await;
    assert!(head.starts_with("HTTP/1.1 200"), "the in-flight request was cut off: {head}");
    // Busy for 2.5 s of a 1 s idle timeout, idle for none of it: still open.
    s.write_all(req("/again").as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let head = read_response(&mut s, limit).await;
    assert!(head.starts_with("HTTP/1.1 200"), "closed while not idle: {head}");
    let took = closed_within(&mut s, limit).await;
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");

    // HTTP/2 with no stream open: GOAWAY, then the connection ends.
    let io = hyper_util::rt::TokioIo::new(tls_alpn(&w, b"h2").await);
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let conn = tokio::spawn(conn);
    let r = http::Request::get(format!("https://localhost:{port}/h2"))
        .header("authorization", format!("Bearer {t}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send.send_request(r).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    let ended = tokio::time::timeout(limit, conn).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection was still open after {limit:?}");

    // The process's count: only this test adds to it now ([`IDLE_CLOSES`]).
    assert_eq!(idle_closes(&w).await - before, 3);
}

/// The process-wide `portcullis_idle_connections_closed_total`.
async fn idle_closes(w: &World) -> u64 {
    let metrics = w.admin_get("/metrics").await.text();
    let closed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_idle_connections_closed_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    closed.unwrap_or_else(|| panic!("no idle_connections_closed_total:\n{metrics}"))
}

#[tokio::test]
async fn override_headers_are_refused_so_the_authorized_method_and_path_are_the_ones_run() {
    // Only GET is allowed; a framework honouring an override would run DELETE, or route
    // to the path named in X-Original-URL instead of the one authorized.
    let w = World::with(Setup {
        policies: vec![(
            "api".into(),
            "[[rule]]\nid = \"read-only\"\neffect = \"allow\"\nissuer = \"bb\"\nci = { repository = \"{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}\" }\nmethods = [\"GET\"]\n"
                .into(),
        )],
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let bearer = format!("Bearer {t}");
    let ok = w.send(Method::GET, "/items/1", &[("authorization", &bearer)], Bytes::new()).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    // Underscore spellings too: wsgiref and older gunicorn/Puma read them as the dashed
    // name (`HTTP_X_HTTP_METHOD_OVERRIDE`), and the framework honours them.
    for name in [
        "X-HTTP-Method-Override",
        "x-http-method",
        "X-Method-Override",
        "X_HTTP_Method_Override",
        "x_http-method",
        "X-Original-URL",
        "X_Original_URL",
        "x_rewrite_url",
    ] {
        let r = w
            .send(
                Method::GET,
                "/items/1",
                &[("authorization", &bearer), (name, "DELETE")],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(r.json()["error"], "bad-request", "{name}");
        let e = w.event_for(&request_id(&r)).await;
        assert_eq!(e["reason"], "bad-request");
        assert!(e["detail"].as_str().is_some_and(|d| d.contains("never overridden")), "{e}");
        assert!(e.get("upstream_status").is_none_or(|s| s.is_null()), "forwarded: {e}");
    }
    // The same through the query (Express `methodOverride('_method')`, Symfony/Laravel).
    for target in
        ["/items/1?_method=DELETE", "/items/1?a=1&%5Fmethod=DELETE", "/items/1?.method=PUT"]
    {
        let r = w.send(Method::GET, target, &[("authorization", &bearer)], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{target}");
        let e = w.event_for(&request_id(&r)).await;
        assert!(e["detail"].as_str().is_some_and(|d| d.contains("`_method`")), "{e}");
    }
    let r = w
        .send(
            Method::GET,
            "/items/1?method=x&a=_method",
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "an ordinary query passes");
}

#[tokio::test]
async fn an_upstream_cannot_plant_or_clear_the_proxys_session_cookies() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let r = w.get("/set-cookie/app,_portcullis,_portcullis_login,__Host-_portcullis,__Host-_portcullis_0,__Host-_portcullis_login_0123456789abcdef,__Secure-_portcullis,other", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let set: Vec<&str> =
        r.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).collect();
    assert_eq!(set, ["app=upstream; Path=/", "other=upstream; Path=/"]);
}

/// h2c smuggling: a WebSocket upgrade that also offers `Upgrade: h2c`, to an upstream
/// that switches to h2c. The upstream is offered only `websocket`, and a 101 to anything
/// else is refused, so no HTTP/2 connection runs past per-request policy.
#[tokio::test]
async fn only_a_websocket_upgrade_is_offered_upstream_and_tunnelled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let upstream = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let heads_tx = heads_tx.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else { return };
                let _ = heads_tx.send(head.to_ascii_lowercase());
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    .await;
                let _ = s.read(&mut [0u8; 64]).await;
            });
        }
    });
    let routes = format!(
        "[[routes]]\nname = \"h2c\"\nmatch = {{ path_prefix = \"/smuggle\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let mut s = tls_h1(&w).await;
    let req = format!(
        "GET /smuggle HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: websocket\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 502"), "tunnelled or not refused: {answer}");
    let head = heads.recv().await.unwrap_or_default();
    let offered: Vec<&str> =
        head.lines().filter_map(|l| l.strip_prefix("upgrade:")).map(str::trim).collect();
    assert_eq!(offered, ["websocket"], "{head}");
    assert!(!head.contains("http2-settings"), "{head}");
    upstream.abort();
}

/// A caller that hangs up while the upstream works still leaves its event: an
/// authorized request may already have had its effect upstream.
#[tokio::test]
async fn a_request_abandoned_before_its_response_is_still_audited() {
    use tokio::io::AsyncWriteExt;
    let w = World::start().await;
    let t = w.token("bb", &[]);
    for (alpn, path) in [(&b"http/1.1"[..], "/slow/3000"), (&b"h2"[..], "/slow/3001")] {
        let mut s = tls_alpn(&w, alpn).await;
        if alpn == b"h2" {
            // An HTTP/2 client: send the request, then drop the connection.
            let (mut h2, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(s),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            let task = tokio::spawn(conn);
            let req = http::Request::get(format!("https://localhost{path}"))
                .header("authorization", format!("Bearer {t}"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap_or_else(|e| panic!("{e}"));
            let pending = tokio::spawn(async move { h2.send_request(req).await.map(|_| ()) });
            tokio::time::sleep(Duration::from_millis(400)).await;
            pending.abort();
            task.abort();
        } else {
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
            tokio::time::sleep(Duration::from_millis(400)).await;
            drop(s);
        }
        let mut found = serde_json::Value::Null;
        for _ in 0..100 {
            if let Some(e) = w.events().into_iter().find(|e| e["path"] == path) {
                found = e;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(found["reason"], "client-closed", "no event for {path}: {found}");
        assert_eq!(found["decision"], "allow", "{found}");
        assert_eq!(found["status"], 499, "{found}");
        assert!(found["rule"]["id"].is_string(), "{found}");
        assert_eq!(found["ci"]["branch"], "main", "{found}");
        assert_eq!(found["route"], "api", "{found}");
        let same: Vec<serde_json::Value> =
            w.events().into_iter().filter(|e| e["path"] == path).collect();
        assert_eq!(same.len(), 1, "exactly one event: {same:?}");
    }
}

/// Requests the HTTP/1 server refuses before the proxy sees them still leave an event.
#[tokio::test]
async fn requests_the_http_server_refuses_are_audited_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start().await;
    let many_headers: String = (0..150).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let cases = [
        ("GET /a b c HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(), 400),
        (format!("GET / HTTP/1.1\r\nHost: localhost\r\n{many_headers}\r\n"), 431),
    ];
    let observed = |m: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix("portcullis_request_duration_seconds_count{route=\"-\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    for (request, want) in cases {
        let latencies = observed(&w.admin_get("/metrics").await.text());
        let before = w.events().iter().filter(|e| e["method"] == "-").count();
        let mut s = tls_h1(&w).await;
        s.write_all(request.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer).to_string();
        assert!(answer.starts_with(&format!("HTTP/1.1 {want}")), "{answer}");
        let mut events = Vec::new();
        for _ in 0..100 {
            events = w.events().into_iter().filter(|e| e["method"] == "-").collect();
            if events.len() > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(events.len(), before + 1, "one event for the refused request: {events:?}");
        let e = &events[before];
        assert_eq!(e["status"], want, "{e}");
        assert_eq!(e["reason"], "bad-request", "{e}");
        assert_eq!(e["decision"], "error", "{e}");
        assert_eq!(e["tls"]["version"], "TLSv1.3", "{e}");
        // Counted in the latency histogram as in requests_total.
        let now = observed(&w.admin_get("/metrics").await.text());
        assert!(now > latencies, "not in the latency histogram: {now} after {latencies}");
    }
}

/// A request head left unfinished is closed after `header_timeout`, and audited (408).
#[tokio::test]
async fn an_unfinished_request_head_is_closed_after_header_timeout_and_audited() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w =
        World::with(Setup { server_extra: "header_timeout = \"1s\"".into(), ..Setup::default() })
            .await;
    let mut s = tls_h1(&w).await;
    s.write_all(b"GET /slowloris HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "still open after 6 s");
    assert!(start.elapsed() >= Duration::from_millis(900), "closed too early");
    let mut event = serde_json::Value::Null;
    for _ in 0..100 {
        if let Some(e) = w.events().into_iter().find(|e| e["status"] == 408) {
            event = e;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(event["method"], "-", "no 408 event: {event}");
    assert_eq!(event["reason"], "request-timeout", "{event}");

    // hyper runs the same timer between requests on a keep-alive connection: an idle
    // connection is closed after it too, but no request was cut short, so no event
    // (found by a walkthrough: every idle keep-alive connection logged a false 408).
    let t = w.token("bb", &[]);
    let mut s = tls_h1(&w).await;
    let request =
        format!("GET /keepalive HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "an idle keep-alive connection still open after 6 s");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200 "));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let timeouts = w.events().into_iter().filter(|e| e["status"] == 408).count();
    assert_eq!(timeouts, 1, "a false 408 for an idle keep-alive connection");
}

/// A client that closes its connection part-way through a request head (here, a bearer
/// token sent, the blank line never) leaves an event, 499 `client-closed`, as one cut by
/// `header_timeout` does; a connection closed between requests, or after a request cut
/// mid-body (that request has its own event), or an HTTP/2 connection without a request,
/// adds none (found by probing: a partial head closed by the client, with or without TLS
/// `close_notify`, left no trace at all).
#[tokio::test]
async fn a_request_head_the_client_abandons_is_audited_once() {
    use tokio::io::AsyncWriteExt;
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let mut s = tls_h1(&w).await;
    let partial =
        format!("GET /abandoned-head HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n");
    s.write_all(partial.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    s.flush().await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
    drop(s);
    let mut event = serde_json::Value::Null;
    for _ in 0..100 {
        if let Some(e) = w.events().into_iter().find(|e| e["status"] == 499) {
            event = e;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(event["method"], "-", "no event for the abandoned head: {event}");
    assert_eq!(event["path"], "-", "{event}");
    assert_eq!(event["reason"], "client-closed", "{event}");
    assert_eq!(event["decision"], "error", "{event}");
    assert!(!event.to_string().contains(&t), "the token reached the log: {event}");
    // The same, the client gone without TLS `close_notify` (a crash, a reset).
    let mut s = tls_h1(&w).await;
    s.write_all(partial.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    s.flush().await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    for _ in 0..100 {
        if w.events().iter().filter(|e| e["status"] == 499).count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A keep-alive connection closed after its answered request, and one closed
    // mid-body, each with and without `close_notify`: one event each, for its request.
    for clean in [true, false] {
        let answered = format!("/answered-{clean}");
        let request = format!(
            "GET {answered} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\r\n"
        );
        let mut s = tls_h1(&w).await;
        s.write_all(request.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let _ = read_response(&mut s, Duration::from_secs(5)).await;
        if clean {
            s.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        }
        drop(s);
        let cut_path = format!("/cut-body-{clean}");
        let cut = format!("POST {cut_path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nContent-Length: 100\r\n\r\nabc");
        let mut s = tls_h1(&w).await;
        s.write_all(cut.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        if clean {
            s.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        }
        drop(s);
        for _ in 0..100 {
            if w.events().iter().any(|e| e["path"] == cut_path.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // An HTTP/2 connection's frames after its preface (SETTINGS, a PING) begin no
    // request: one dropped without a GOAWAY adds no event.
    let mut s = tls_alpn(&w, b"h2").await;
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    s.write_all(&frames).await.unwrap_or_else(|e| panic!("{e}"));
    s.flush().await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    // Nor does one whose ALPN chose h2 and that sends its preface a byte at a time, then
    // leaves: it began no HTTP/1 head (the first read's preface check missed it, and it
    // was audited 499 `client-closed`).
    let mut s = tls_alpn(&w, b"h2").await;
    for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        s.write_all(&[*b]).await.unwrap_or_else(|e| panic!("{e}"));
        s.flush().await.unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = w.events();
    let count = |path: &str| events.iter().filter(|e| e["path"] == path).count();
    for clean in [true, false] {
        assert_eq!(count(&format!("/answered-{clean}")), 1, "{events:?}");
        assert_eq!(count(&format!("/cut-body-{clean}")), 1, "{events:?}");
    }
    assert_eq!(count("-"), 2, "one event for each abandoned head alone: {events:?}");
}

/// Client trailers never reach the upstream: header hygiene only sees the head, and an
/// HTTP/2 upstream takes an identity or credential from a trailer as it would from a
/// header (found by probing: `X-Portcullis-Email` in a chunked trailer arrived at an
/// h2c upstream beside the proxy's own).
#[tokio::test]
async fn client_trailers_are_not_forwarded() {
    let w = World::with(Setup { routes: H2C_ROUTE.into(), ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    for path in ["/h2c/t", "/plain/t"] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\nTrailer: X-Portcullis-Email, Authorization, X-Checksum\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Portcullis-Email: ceo@example.com\r\nAuthorization: Bearer forged\r\nX-Checksum: abc\r\n\r\n"
        );
        let resp = raw_exchange(&w, &request).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{path}: {resp}");
        let json = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
        // The echo's body may arrive chunked: take the JSON object itself.
        let json = &json[json.find('{').unwrap_or(0)..=json.rfind('}').unwrap_or(0)];
        let echo: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{path}: {e}: {resp}"));
        assert_eq!(echo["body_bytes"], 5, "{path}: the body itself arrives");
        assert_eq!(echo["trailers"], serde_json::json!({}), "{path}: {echo}");
        assert_ne!(echo["headers"]["x-portcullis-email"][0], "ceo@example.com", "{path}");
    }
}

/// A request head may take `server.max_header_size` (64 KiB by default): hyper's own
/// limit (≈ 400 KiB of read buffer per connection) let 1 500 unfinished heads hold 600 MB.
#[tokio::test]
async fn request_heads_are_bounded_by_max_header_size() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    // Eight 7 KiB headers (≈ 57 KiB) pass; ten (≈ 71 KiB) do not.
    let filler = |n: usize| -> String {
        (0..n).map(|i| format!("X-Filler-{i}: {}\r\n", "a".repeat(7 * 1024))).collect()
    };
    let head = |n: usize| {
        format!(
            "GET /big HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\n{}Connection: close\r\n\r\n",
            filler(n)
        )
    };
    let resp = raw_exchange(&w, &head(8)).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{}", &resp[..resp.len().min(300)]);
    let resp = raw_exchange(&w, &head(10)).await;
    assert!(resp.starts_with("HTTP/1.1 431 "), "{}", &resp[..resp.len().min(300)]);

    // Configurable, within 8 KiB – 1 MiB.
    let w = World::with(Setup {
        server_extra: "max_header_size = \"16KiB\"".into(),
        ..Setup::default()
    })
    .await;
    let resp = raw_exchange(&w, &head(3)).await;
    assert!(resp.starts_with("HTTP/1.1 431 "), "{}", &resp[..resp.len().min(300)]);
}

/// The first event `pred` takes, once written.
async fn event_where(w: &World, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..200 {
        if let Some(e) = w.events().into_iter().find(|e| pred(e)) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    serde_json::Value::Null
}

/// A request may carry at most 100 header fields over HTTP/1.1 and HTTP/2 alike (431
/// beyond). HTTP/1.1 heads were held to hyper's 100 while HTTP/2 header lists were bounded
/// only by `max_header_size`: 101 fields, refused over one protocol, reached the upstream
/// over the other. A `cookie` split in crumbs, as browsers send it over HTTP/2, counts
/// once, as the one `Cookie` line of HTTP/1.1. (The echo upstream has hyper's limit too,
/// so "let through" is read from the event's decision, not the status.)
#[tokio::test]
async fn a_request_may_carry_100_header_fields_over_either_protocol() {
    let w = World::start().await;
    let t = format!("Bearer {}", w.token("bb", &[]));
    let port = w.https.port();
    // HTTP/1.1: Host, Authorization and Connection, plus fillers.
    let head = |path: &str, fillers: usize| {
        let fill: String = (0..fillers).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: {t}\r\n{fill}Connection: close\r\n\r\n"
        )
    };
    let _ = raw_exchange(&w, &head("/h1-100", 97)).await;
    let e = event_where(&w, |e| e["path"] == "/h1-100").await;
    assert_eq!(e["decision"], "allow", "{e}");
    let resp = raw_exchange(&w, &head("/h1-101", 98)).await;
    assert!(resp.starts_with("HTTP/1.1 431 "), "{}", &resp[..resp.len().min(300)]);

    // HTTP/2: Authorization plus fillers (the authority is a pseudo-header field).
    let c = client(&w.pki, true);
    let names: Vec<String> = (0..150).map(|i| format!("x-filler-{i}")).collect();
    let fields = |fillers: usize| {
        let mut h = vec![("authorization", t.as_str())];
        h.extend(names[..fillers].iter().map(|n| (n.as_str(), "1")));
        h
    };
    let _ = send_with(&c, Method::GET, &w.url("/h2-100"), &fields(99), Bytes::new()).await;
    let e = event_where(&w, |e| e["path"] == "/h2-100").await;
    assert_eq!(e["decision"], "allow", "{e}");
    let r = send_with(&c, Method::GET, &w.url("/h2-101"), &fields(100), Bytes::new()).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.json()["error"], "bad-request", "{:?}", r.body);
    assert!(r.json()["request_id"].is_string(), "{:?}", r.body);
    let rid = r.json()["request_id"].clone();
    let e = event_where(&w, |e| e["request_id"] == rid).await;
    assert_eq!(e["status"], 431, "{e}");
    assert_eq!(e["reason"], "bad-request", "{e}");
    assert_eq!(e["detail"], "101 request header fields, more than 100", "{e}");
    assert!(e["identity"].is_null(), "refused before authentication: {e}");
    // A browser gets the HTML page every other refusal gives it, not JSON.
    let mut html = fields(100);
    html.push(("accept", "text/html,application/xhtml+xml,*/*;q=0.8"));
    html.remove(1);
    let r = send_with(&c, Method::GET, &w.url("/h2-101-html"), &html, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let ct = r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(ct.starts_with("text/html"), "{ct}: {}", r.text());
    assert!(r.text().contains("431") && r.text().contains("bad-request"), "{}", r.text());

    // 150 cookie crumbs are one field.
    let crumbs: Vec<String> = (0..150).map(|i| format!("c{i}=v")).collect();
    let mut h = vec![("authorization", t.as_str())];
    h.extend(crumbs.iter().map(|c| ("cookie", c.as_str())));
    let _ = send_with(&c, Method::GET, &w.url("/h2-crumbs"), &h, Bytes::new()).await;
    let e = event_where(&w, |e| e["path"] == "/h2-crumbs").await;
    assert_eq!(e["decision"], "allow", "{e}");
}

/// HTTP/2 multiplexing cannot hold more upstream sockets than `max_connections`: a
/// stream beyond a connection's first takes a slot of its own while in flight, and
/// without one it is answered 503 `overloaded` (found by probing: 30 connections × 250
/// streams to a silent upstream held 7 553 descriptors).
#[tokio::test]
async fn concurrent_http2_streams_count_against_max_connections() {
    let w =
        World::with(Setup { server_extra: "max_connections = 4".into(), ..Setup::default() }).await;
    let c = client(&w.pki, true);
    let t = format!("Bearer {}", w.token("bb", &[]));
    // Four slots: one this connection takes, three for its concurrent streams (the
    // listener holds none while it waits for clients). Five slow streams: four run.
    let slow: Vec<_> = (0..5)
        .map(|i| {
            let (c, t, url) = (c.clone(), t.clone(), w.url(&format!("/slow/1500?{i}")));
            tokio::spawn(async move {
                send_with(&c, Method::GET, &url, &[("authorization", &t)], Bytes::new()).await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for h in slow {
        statuses.push(h.await.unwrap_or_else(|e| panic!("{e}")).status.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 200, 503], "{statuses:?}");
    let overloaded: Vec<_> =
        w.events().into_iter().filter(|e| e["reason"] == "overloaded").collect();
    assert_eq!(overloaded.len(), 1, "{overloaded:?}");
    assert_eq!(overloaded[0]["status"], 503);
    // The slots came back: the same connection runs four at once again.
    let r = send_with(&c, Method::GET, &w.url("/x"), &[("authorization", &t)], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// `max_connections` counts client connections only: the listeners' accept loops hold no
/// slot while they wait (each used to keep one, so with HTTPS and plain-HTTP listeners
/// two slots went unused, here all of them).
#[tokio::test]
async fn every_max_connections_slot_serves_a_client_whatever_the_number_of_listeners() {
    let w = World::with(Setup {
        listen_extra: "insecure_http = \"127.0.0.1:0\"".into(),
        server_extra: "max_connections = 2".into(),
        ..Setup::default()
    })
    .await;
    let t = format!("Bearer {}", w.token("bb", &[]));
    // Two clients on the HTTPS listener, each on its own connection, both in flight.
    let (first, second) = (client(&w.pki, false), client(&w.pki, false));
    let slow = {
        let (url, t) = (w.url("/slow/3000"), t.clone());
        tokio::spawn(async move {
            send_with(&first, Method::GET, &url, &[("authorization", &t)], Bytes::new()).await
        })
    };
    assert!(w.echo.slow_arrived(1, Duration::from_secs(20)).await, "the request never arrived");
    let beside = tokio::time::timeout(
        Duration::from_secs(2),
        send_with(&second, Method::GET, &w.url("/x"), &[("authorization", &t)], Bytes::new()),
    )
    .await;
    assert_eq!(beside.map(|r| r.status).ok(), Some(StatusCode::OK), "the second slot was not free");
    let slow = slow.await.map(|r| r.status).ok();
    assert_eq!(slow, Some(StatusCode::OK));
}

/// The echo upstream's JSON in a raw HTTP/1.1 response.
fn echo_in(resp: &str) -> serde_json::Value {
    let start = resp.find("{\"method\"").unwrap_or_else(|| panic!("no echo: {resp}"));
    let end = start + resp[start..].find("}\r\n").map_or(resp.len() - start, |e| e + 1);
    serde_json::from_str(&resp[start..end]).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

/// A world with a `preserve_host` route `kept` for host `localhost`, prefix `/kept`, and
/// an `Authorization` header line (with its CRLF) the route's policy allows.
async fn preserve_host_world() -> (World, String) {
    let routes = r#"
[[routes]]
name = "kept"
match = { host = "localhost", path_prefix = "/kept" }
upstream = "http://{echo}"
policy = "api"
preserve_host = true
"#;
    let w = World::with(Setup { routes: routes.into(), ..Setup::default() }).await;
    let auth = format!("Authorization: Bearer {}\r\n", w.token("bb", &[]));
    (w, auth)
}

/// `Host: name:` (an empty port, RFC 3986) is the name without a port, as nginx reads
/// it: routed by `name`, and the upstream is told `name` in X-Forwarded-Host and, with
/// `preserve_host`, in Host; never the trailing `:`. Nothing else about the name gets
/// looser.
#[tokio::test]
async fn a_host_with_an_empty_port_is_the_host_without_a_port() {
    let (w, auth) = preserve_host_world().await;
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
    };
    // The exact-host route matches `localhost:` (and the case-insensitive `LOCALHOST:`);
    // its upstream gets the name the request was routed by.
    for host in ["localhost:", "LOCALHOST:"] {
        let resp = raw_exchange(&w, &get("/kept/x", host)).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{host}: {resp}");
        let echo = echo_in(&resp);
        assert_eq!(echo["path"], "/kept/x", "{host}: {echo}");
        assert_eq!(echo["headers"]["host"][0], host.trim_end_matches(':'), "{echo}");
        assert_eq!(echo["headers"]["x-forwarded-host"][0], "localhost", "{echo}");
    }
    let ev = w.last_event().await;
    assert_eq!(ev["route"], "kept", "{ev}");
    // A route that sets the upstream's own Host: X-Forwarded-Host names the routed host.
    let resp = raw_exchange(&w, &get("/x", "localhost:")).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    let echo = echo_in(&resp);
    assert_eq!(echo["headers"]["x-forwarded-host"][0], "localhost", "{echo}");
    assert_eq!(echo["headers"]["host"][0], w.echo.addr().to_string(), "{echo}");
    // An absolute-form target with an empty port, and the same Host: one name.
    let resp = raw_exchange(&w, &get("https://localhost:/kept/y", "localhost:")).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    assert_eq!(echo_in(&resp)["headers"]["host"][0], "localhost");
    // Still refused: the name another one than the TLS connection's (421), a Host that
    // differs from the target in writing (400), and anything but one empty port (400).
    let resp = raw_exchange(&w, &get("/kept/x", "evil.example:")).await;
    assert!(resp.starts_with("HTTP/1.1 421 "), "{resp}");
    let resp = raw_exchange(&w, &get("https://localhost:/kept/x", "localhost")).await;
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    for host in ["localhost::", ":", "localhost:,evil.example", "evil.example,localhost:"] {
        let resp = raw_exchange(&w, &get("/kept/x", host)).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{host}: {resp}");
        assert!(resp.contains("\"error\":\"bad-request\""), "{host}: {resp}");
    }
}

/// `Host: name.` (a fully qualified name) is routed as `name`, and the upstream is told
/// `name` in X-Forwarded-Host and, with `preserve_host`, in Host: an upstream that does
/// not drop the dot itself (Go's `ServeMux`, Envoy by default) would otherwise
/// choose another virtual host, or its default one, than the route authorized.
#[tokio::test]
async fn a_host_with_a_trailing_dot_reaches_the_upstream_as_the_name_it_was_routed_by() {
    let (w, auth) = preserve_host_world().await;
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
    };
    let port = w.https.port();
    for (host, upstream_host) in [
        ("localhost.".to_string(), "localhost".to_string()),
        ("LOCALHOST..".to_string(), "LOCALHOST".to_string()),
        ("localhost.:".to_string(), "localhost".to_string()),
        (format!("localhost.:{port}"), format!("localhost:{port}")),
    ] {
        let resp = raw_exchange(&w, &get("/kept/x", &host)).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{host}: {resp}");
        let echo = echo_in(&resp);
        assert_eq!(echo["headers"]["host"][0], upstream_host.as_str(), "{host}: {echo}");
        assert_eq!(echo["headers"]["x-forwarded-host"][0], "localhost", "{host}: {echo}");
        assert_eq!(w.last_event().await["route"], "kept");
    }
    // An absolute-form target naming the same: one name.
    let resp = raw_exchange(&w, &get("https://localhost./kept/y", "localhost.")).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    assert_eq!(echo_in(&resp)["headers"]["host"][0], "localhost");
}

/// `Expect: 100-continue` is the proxy's own business: its server answers the client
/// `100 Continue`, and the upstream never sees `Expect`, so it cannot answer early (a 417
/// without reading the content) and then read the content as a second, unauthorized
/// request. The request and its body still go through end to end.
#[tokio::test]
async fn expect_100_continue_is_answered_by_the_proxy_and_never_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let body = "GET /smuggled HTTP/1.1\r\nHost: internal\r\nX-Portcullis-Subject: admin\r\nContent-Length: 0\r\n\r\n";
    let mut s = tls_h1(&w).await;
    let head = format!(
        "POST /expect HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap_or_else(|e| panic!("no 100 Continue: {e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n"), "{interim}");
    s.write_all(body.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
        if out.ends_with(b"}") {
            break;
        }
    }
    let resp = String::from_utf8_lossy(&out).to_string();
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    let start = resp.find("{\"method\"").unwrap_or_else(|| panic!("no echo: {resp}"));
    let echo: serde_json::Value =
        serde_json::from_str(&resp[start..]).unwrap_or_else(|e| panic!("{e}: {resp}"));
    assert!(echo["headers"].get("expect").is_none(), "Expect reached the upstream: {echo}");
    assert_eq!(echo["body_bytes"], body.len(), "{echo}");
    assert_eq!(echo["path"], "/expect", "{echo}");
    let ev = w.last_event().await;
    assert_eq!(
        (ev["status"].as_u64(), ev["reason"].as_str()),
        (Some(200), Some("allowed")),
        "{ev}"
    );
}

/// The one event of the request to `path`, once written.
async fn event_at(w: &World, path: &str) -> serde_json::Value {
    for _ in 0..500 {
        let same: Vec<serde_json::Value> =
            w.events().into_iter().filter(|e| e["path"] == path).collect();
        if let [one] = same.as_slice() {
            return one.clone();
        }
        assert!(same.len() < 2, "more than one event: {same:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serde_json::Value::Null
}

/// An authorized client that hangs up while sending its body (Content-Length or chunked,
/// or after a half-close) is `client-closed` (499), not an upstream failure.
#[tokio::test]
async fn a_client_gone_mid_request_body_is_client_closed_not_an_upstream_failure() {
    use tokio::io::AsyncWriteExt;
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let cases = [
        ("/midbody-cl", "Content-Length: 100\r\n\r\nabc", false),
        ("/midbody-chunked", "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", false),
        ("/midbody-halfclose", "Content-Length: 100\r\n\r\nabc", true),
    ];
    for (path, rest, half_close) in cases {
        let mut s = tls_h1(&w).await;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n{rest}"
        );
        s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        if half_close {
            let _ = s.shutdown().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(s);
        let ev = event_at(&w, path).await;
        assert_eq!(ev["reason"], "client-closed", "{path}: {ev}");
        assert_eq!(ev["status"], 499, "{path}: {ev}");
        assert_eq!(ev["decision"], "allow", "{path}: {ev}");
        assert_eq!(ev["bytes_in"], 3, "{path}: {ev}");
        assert_eq!(ev["bytes_out"], 0, "{path}: nothing reached the client: {ev}");
    }
}

/// A malformed chunked body (a bad chunk size, a bare LF, a size that overflows) is the
/// client's fault: 400 `bad-request`, not 502 `upstream-unavailable`.
#[tokio::test]
async fn a_malformed_request_body_is_a_bad_request_not_an_upstream_failure() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let cases = [
        ("/bad-chunk-size", "3\r\nabc\r\nzz\r\n"),
        ("/bare-lf", "3\r\nabc\r\n3\nabc\r\n"),
        ("/overflow", "3\r\nabc\r\nfffffffffffffffffff\r\n"),
    ];
    for (path, body) in cases {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let resp = raw_h1_exchange(&w, &req).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{path}: {resp}");
        let ev = event_at(&w, path).await;
        assert_eq!(ev["reason"], "bad-request", "{path}: {ev}");
        assert_eq!(ev["status"], 400, "{path}: {ev}");
        assert_eq!(ev["decision"], "allow", "{path}: {ev}");
        assert!(
            ev["detail"].as_str().is_some_and(|d| d.starts_with("malformed request body")),
            "{path}: {ev}"
        );
    }
}

/// A response whose upstream body breaks off after the head was relayed (a reset, a close
/// before the end of a chunked body, fewer bytes than `Content-Length`) reaches the client
/// truncated: its event keeps the status sent but says `upstream-aborted`, with the bytes
/// actually sent, never `allowed` as if it were complete.
#[tokio::test]
async fn an_upstream_body_cut_short_is_audited_as_upstream_aborted() {
    use tokio::io::AsyncWriteExt;
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let upstream = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else { return };
                let answer: &[u8] = if head.starts_with("GET /cut/short ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort"
                } else if head.starts_with("GET /cut/chunked ") {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nreset"
                };
                let _ = s.write_all(answer).await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                if head.starts_with("GET /cut/reset ") {
                    // An RST instead of a FIN.
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
                drop(s);
            });
        }
    });
    let routes = format!(
        "[[routes]]\nname = \"cut\"\nmatch = {{ path_prefix = \"/cut\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    for path in ["/cut/short", "/cut/chunked", "/cut/reset"] {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\r\n");
        let resp = raw_h1_exchange(&w, &req).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{path}: {resp}");
        let ev = event_at(&w, path).await;
        assert_eq!(ev["reason"], "upstream-aborted", "{path}: {ev}");
        assert_eq!(ev["status"], 200, "{path}: the status sent: {ev}");
        assert_eq!(ev["decision"], "allow", "{path}: {ev}");
        assert_eq!(ev["bytes_out"], 5, "{path}: {ev}");
        assert!(ev["detail"].is_string(), "{path}: {ev}");
    }
    let m = w.admin_get("/metrics").await.text();
    assert!(m.contains("reason=\"upstream-aborted\""), "{m}");
    upstream.abort();
}

/// A client that hangs up while a response body streams to it: the event says
/// `client-closed` with the status sent and the bytes it got, not a complete success.
#[tokio::test]
async fn a_client_gone_mid_response_body_is_client_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let path = "/stream/100000000";
    let mut s = tls_h1(&w).await;
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 "));
    drop(s);
    let ev = event_at(&w, path).await;
    assert_eq!(ev["reason"], "client-closed", "{ev}");
    assert_eq!(ev["status"], 200, "the status sent: {ev}");
    assert_eq!(ev["decision"], "allow", "{ev}");
    let out = ev["bytes_out"].as_u64().unwrap_or(u64::MAX);
    assert!(out < 100_000_000, "{ev}");
}

/// An upstream answer framed by `Transfer-Encoding: chunked` that also carries a
/// `Content-Length`: the client gets the body the chunks carried, framed anew, and no
/// length promise the body does not keep (RFC 9112 §6.3: an intermediary removes it).
#[tokio::test]
async fn an_upstream_content_length_beside_transfer_encoding_is_dropped() {
    let (addr, upstream) = raw_answering(|head| {
        if head.starts_with("GET /te/long") {
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into()
        }
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"te\"\nmatch = {{ path_prefix = \"/te\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    for (path, body) in [("/te/long", "hello"), ("/te/empty", "")] {
        let r = w.get(path, Some(&t)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(r.text(), body, "{path}");
        let length = r.headers.get("content-length").and_then(|v| v.to_str().ok());
        assert!(length.is_none_or(|l| l == body.len().to_string()), "{path}: {length:?}");
        let ev = w.last_event().await;
        assert_eq!(ev["path"], path, "{ev}");
        assert_eq!(ev["status"], 200, "{ev}");
        assert_eq!(ev["bytes_out"], body.len(), "{ev}");
    }
    upstream.abort();
}

/// An upstream answer whose `Transfer-Encoding` holds a coding besides a final `chunked`
/// (`gzip, chunked`), or is not `chunked` alone: the proxy decodes only the chunks, so the
/// client would get gzip bytes with nothing saying so, logged as a success. It is a bad
/// upstream answer instead: 502 `upstream-unavailable`, the cause in the event, and
/// nothing of the body passed on. A plain `chunked` answer still goes through.
#[tokio::test]
async fn an_upstream_transfer_coding_other_than_chunked_is_a_bad_gateway() {
    let (addr, upstream) = raw_answering(|head| {
        let coding = if head.starts_with("GET /tc/gzip ") {
            "gzip, chunked"
        } else if head.starts_with("GET /tc/trailing ") {
            "chunked,"
        } else {
            "chunked"
        };
        format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n6\r\nsecret\r\n0\r\n\r\n")
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"tc\"\nmatch = {{ path_prefix = \"/tc\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    for (path, coding) in [("/tc/gzip", "gzip, chunked"), ("/tc/trailing", "chunked,")] {
        let r = w.get(path, Some(&t)).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "upstream-unavailable", "{path}: {}", r.text());
        assert!(!r.text().contains("secret"), "{path}: {}", r.text());
        let ev = event_at(&w, path).await;
        assert_eq!(ev["reason"], "upstream-unavailable", "{path}: {ev}");
        assert_eq!(ev["status"], 502, "{path}: {ev}");
        let detail = ev["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("Transfer-Encoding") && detail.contains(coding), "{path}: {ev}");
    }
    let r = w.get("/tc/plain", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "secret");
    upstream.abort();
}
