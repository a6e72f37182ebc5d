//! A real browser, a real OpenID provider: headless Debian Chromium (driven by npm
//! `playwright-core`, tests/e2e/browser.mjs) signs in through the proxy at npm
//! `oidc-provider` (OpenID Certified, tests/node/provider.mjs) with the authorization
//! code flow + PKCE, consents, sees the protected page, and signs out (RP-initiated
//! logout). The signed-in page is saved as `target/sso-signed-in.png`.
//!
//! Needs `/usr/bin/chromium` and `npm ci --prefix tests/node` (tests/setup.sh installs
//! both). Without them the test says so and passes, unless `PORTCULLIS_REQUIRE_INTEROP=1`
//! (set by the test command), where it fails.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use portcullis::config::Config;
use portcullis::server::{Options, Server};

use crate::support::*;

#[tokio::test]
async fn chromium_signs_in_at_oidc_provider_and_signs_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !interop_available("browser SSO", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pki =
        portcullis::tls::DevPki::load_or_create(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    // The proxy's port first: the provider must know the redirect URI. Provider and
    // proxy get different host names (127.0.0.1 vs localhost): cookies ignore ports.
    let port = free_port();
    let provider = start_provider(
        &pki,
        &[
            "--public-host".into(),
            "127.0.0.1".into(),
            "--redirect-uri".into(),
            format!("https://localhost:{port}/.portcullis/callback"),
        ],
    );
    let issuer = provider.issuer.clone();

    let echo = portcullis::dev::echo::EchoServer::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(dir.path().join("policies")).ok();
    write(
        &dir.path().join("policies/web.toml"),
        "[[rule]]\nid = \"engineers\"\neffect = \"allow\"\nissuer = \"op\"\ngroups_any = [\"engineering\"]\n",
    );
    write(&dir.path().join("client-secret"), "web-secret\n");
    write(&dir.path().join("session-keys"), &format!("{SSO_KEY}\n"));
    let q = |p: &Path| format!("{:?}", p.to_string_lossy());
    let cfg = format!(
        r#"
[listen]
https = "127.0.0.1:{port}"
admin = "127.0.0.1:0"
[tls]
cert = {cert}
key = {key}
[server]
watch = false
[session]
keys_file = {keys}
[issuers.op]
issuer = {issuer:?}
audiences = ["portcullis-web"]
ca = {ca}
login = {{ client_id = "portcullis-web", client_secret_file = {secret}, scopes = ["openid", "email", "groups", "profile"] }}
[[routes]]
name = "web"
upstream = "http://{echo}"
policy = "web"
issuers = ["op"]
match = {{}}
"#,
        cert = q(&pki.cert_path()),
        key = q(&pki.key_path()),
        ca = q(&pki.ca_path()),
        keys = q(&dir.path().join("session-keys")),
        secret = q(&dir.path().join("client-secret")),
        echo = echo.addr(),
    );
    let path = dir.path().join("portcullis.toml");
    write(&path, &cfg);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let sink = portcullis::audit::AuditSink::memory();
    let server = Server::start(config, Options { sink: Some(sink.clone()) })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(server.shared.runtime.load().verifier.wait_ready(Duration::from_secs(15)).await);

    let shot = root.join("target/sso-signed-in.png");
    let node = tokio::process::Command::new("node")
        .arg(root.join("tests/e2e/browser.mjs"))
        .args(["--url", &format!("https://localhost:{port}/dashboard")])
        .args(["--screenshot", &shot.to_string_lossy()])
        .args(["--user-data-dir", &dir.path().join("chromium").to_string_lossy()])
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), node)
        .await
        .unwrap_or_else(|_| panic!("browser run timed out"))
        .unwrap_or_else(|e| panic!("node: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("browser.mjs printed no result: {stdout}"));
    drop(provider);
    server.shutdown().await;

    assert!(result["error"].is_null(), "browser: {result}");
    assert_eq!(result["signedIn"], true, "{result}");
    let body = result["body"].as_str().unwrap_or_default();
    assert!(body.contains("alice@example.test"), "{body}");
    assert!(body.contains("\"x-portcullis-issuer\""), "{body}");
    assert!(!body.contains("_portcullis"), "session cookie forwarded: {body}");
    assert!(shot.is_file(), "screenshot saved");
    let after = result["afterLogout"].as_str().unwrap_or_default();
    assert!(after.starts_with(&issuer), "signed out, back at the provider's login: {after}");
    let events: Vec<serde_json::Value> =
        sink.lines().iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        events.iter().any(|e| e["decision"] == "allow"
            && e["identity"]["subject"] == "alice"
            && e["path"] == "/dashboard"),
        "audit: allow for alice"
    );
    assert!(events.iter().any(|e| e["path"] == "/.portcullis/logout"));
}
