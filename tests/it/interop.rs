//! Interop with a real, OpenID Certified provider: npm `oidc-provider` (tests/node),
//! issuing RFC 9068 JWT access tokens by client credentials. The proxy must accept them
//! through discovery + JWKS alone, and follow a key rotation at the provider.
//!
//! Needs `npm ci --prefix tests/node` (the test command does it). Without it the test
//! says so and passes, unless `PORTCULLIS_REQUIRE_INTEROP=1` (set by the test command),
//! where it fails: CI can never skip it silently.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use portcullis::config::Config;
use portcullis::server::{Options, Server};

use crate::support::*;

#[tokio::test]
async fn oidc_provider_access_tokens_and_key_rotation() {
    if !interop_available("oidc-provider interop", false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pki =
        portcullis::tls::DevPki::load_or_create(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let mut provider =
        start_provider(&pki, &["--audience".into(), "https://portcullis.interop".into()]);
    let issuer = provider.issuer.clone();

    let echo = portcullis::dev::echo::EchoServer::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(dir.path().join("policies")).ok();
    write(
        &dir.path().join("policies/api.toml"),
        r#"
[[rule]]
id = "ci-client-writes"
effect = "allow"
issuer = "op"
subject = "ci-client"
claims = { scope = "*api:write*" }
"#,
    );
    let cfg = format!(
        r#"
[listen]
https = "127.0.0.1:0"
admin = "127.0.0.1:0"
[tls]
cert = {cert:?}
key = {key:?}
[server]
watch = false
[issuers.op]
issuer = {issuer:?}
audiences = ["https://portcullis.interop"]
token_type = "access"
kind = "service"
ca = {ca:?}
refresh_cooldown = "1s"
[[routes]]
name = "api"
upstream = "http://{echo}"
policy = "api"
match = {{}}
"#,
        cert = pki.cert_path().to_string_lossy(),
        key = pki.key_path().to_string_lossy(),
        ca = pki.ca_path().to_string_lossy(),
        echo = echo.addr(),
    );
    let path = dir.path().join("portcullis.toml");
    write(&path, &cfg);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let sink = portcullis::audit::AuditSink::memory();
    let server = Server::start(config, Options { sink: Some(sink.clone()) })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        server.shared.runtime.load().verifier.wait_ready(Duration::from_secs(15)).await,
        "discovery + JWKS from oidc-provider"
    );
    let proxy = format!("https://localhost:{}/api/x", server.bound().https.map_or(0, |a| a.port()));
    let c = client(&pki, false);

    let token = || async {
        let r = send_with(
            &c,
            Method::POST,
            &format!("{issuer}/token"),
            &[("authorization", "Basic Y2ktY2xpZW50OmNpLXNlY3JldA=="), ("content-type", "application/x-www-form-urlencoded")],
            Bytes::from("grant_type=client_credentials&scope=api:read%20api:write&resource=https%3A%2F%2Fportcullis.interop"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "token endpoint: {}", r.text());
        r.json()["access_token"].as_str().unwrap_or_default().to_string()
    };

    let t1 = token().await;
    let r = send_with(
        &c,
        Method::GET,
        &proxy,
        &[("authorization", &format!("Bearer {t1}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("ci-client"));
    assert_eq!(r.upstream_header("x-portcullis-kind").as_deref(), Some("service"));

    // Rotate and retire the old key at the provider: a token under the new kid is
    // accepted after one JWKS refetch.
    if let Some(stdin) = provider.stdin.as_mut() {
        writeln!(stdin, "rotate-retire").ok();
        stdin.flush().ok();
    }
    // The provider prints notices too; wait for the answer to the command.
    let answered = std::iter::from_fn(|| provider.lines.recv_timeout(Duration::from_secs(30)).ok())
        .any(|l| l.starts_with("keys "));
    assert!(answered, "the provider answered the rotation");
    let t2 = token().await;
    assert_ne!(t1.split('.').next(), t2.split('.').next(), "new kid in the header");
    let r = send_with(
        &c,
        Method::GET,
        &proxy,
        &[("authorization", &format!("Bearer {t2}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "after rotation: {}", r.text());

    drop(provider);
    server.shutdown().await;
    for line in sink.lines() {
        assert!(!line.contains(t1.split('.').nth(2).unwrap_or("x")));
    }
}
