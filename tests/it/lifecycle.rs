//! Reload (explicit and by file watcher), graceful drain, readiness.

use std::time::Duration;

use http::StatusCode;

use crate::support::*;

const ONLY_MAIN: &str = r#"
[[rule]]
id = "bb-main-only"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = "main" }
"#;

const FEATURE_TOO: &str = r#"
[[rule]]
id = "bb-any-branch"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = ["main", "feature/*"] }
"#;

#[tokio::test]
async fn reload_applies_a_good_policy_and_rejects_a_bad_one() {
    let w =
        World::with(Setup { policies: vec![("api".into(), ONLY_MAIN.into())], ..Setup::default() })
            .await;
    let feature = w.token("bb", &["branchName=feature/x"]);
    assert_eq!(w.get("/x", Some(&feature)).await.status, StatusCode::FORBIDDEN);

    write(&w.policy_path("api"), FEATURE_TOO);
    assert!(w.server().reload().await);
    let r = w.get("/x", Some(&feature)).await;
    assert_eq!(r.status, StatusCode::OK);
    let reload_ev = w.events().into_iter().find(|e| e["kind"] == "reload").unwrap_or_default();
    assert_eq!(reload_ev["routes_changed"][0], "api");
    assert_ne!(reload_ev["old_policy_revision"], reload_ev["new_policy_revision"]);

    // A broken policy (unknown key, bad glob) is refused; the last good one keeps serving.
    write(
        &w.policy_path("api"),
        "[[rule]]\nid = \"x\"\neffect = \"allow\"\nissuer = \"bb\"\naudiance = \"oops\"\n",
    );
    assert!(!w.server().reload().await);
    assert_eq!(w.get("/x", Some(&feature)).await.status, StatusCode::OK);
    // So is a broken config.
    let good_config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    write(&w.config_path(), &format!("{good_config}\n[bogus]\n"));
    assert!(!w.server().reload().await);
    assert_eq!(w.get("/x", Some(&feature)).await.status, StatusCode::OK);
    let m = w.admin_get("/metrics").await.text();
    assert!(m.contains("portcullis_config_reloads_total{outcome=\"error\"}"));
    // Each attempt is in the audit trail: one loaded, two rejected with where they failed.
    let reloads: Vec<_> = w.events().into_iter().filter(|e| e["kind"] == "reload").collect();
    let outcomes: Vec<_> =
        reloads.iter().map(|e| e["outcome"].as_str().unwrap_or_default()).collect();
    assert_eq!(outcomes, ["loaded", "rejected", "rejected"], "{reloads:?}");
    let bad_key = reloads[1]["errors"].to_string();
    assert!(bad_key.contains("api.toml:5:1") && bad_key.contains("audiance"), "{bad_key}");
    assert!(reloads[2]["errors"].to_string().contains("bogus"), "{}", reloads[2]);
    assert_eq!(
        reloads[2]["policy_revision"], reloads[0]["new_policy_revision"],
        "what still serves"
    );
}

/// A `[[test]]` that holds for [`ONLY_MAIN`] and fails for [`FEATURE_TOO`].
const FEATURE_DENIED: &str = r#"
[[test]]
name = "feature branches are refused"
identity = { issuer = "bb", preset = "bitbucket-pipelines", claims = { repositoryUuid = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branchName = "feature/x" } }
request = "GET /x"
expect = "deny"
"#;

/// The process-wide count of reloads with this outcome (metrics are global: other
/// tests running meanwhile only add to it).
async fn reloads(w: &World, outcome: &str) -> u64 {
    let m = w.admin_get("/metrics").await.text();
    let prefix = format!("portcullis_config_reloads_total{{outcome=\"{outcome}\"}} ");
    m.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_version_whose_policy_tests_fail_is_not_loaded() {
    let passing = format!("{ONLY_MAIN}{FEATURE_DENIED}");
    let w =
        World::with(Setup { policies: vec![("api".into(), passing)], ..Setup::default() }).await;
    let feature = w.token("bb", &["branchName=feature/x"]);
    assert_eq!(w.get("/x", Some(&feature)).await.status, StatusCode::FORBIDDEN);

    // The new version compiles, but its own test says feature branches stay out: refused,
    // counted as a failed reload, and the last good version keeps serving.
    let errors = reloads(&w, "error").await;
    write(&w.policy_path("api"), &format!("{FEATURE_TOO}{FEATURE_DENIED}"));
    assert!(!w.server().reload().await, "a version failing its own tests was loaded");
    assert_eq!(w.get("/x", Some(&feature)).await.status, StatusCode::FORBIDDEN);
    assert!(reloads(&w, "error").await > errors);
    // Audited as an attempt, with the failing test, and nothing loaded.
    let reloads: Vec<_> = w.events().into_iter().filter(|e| e["kind"] == "reload").collect();
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    assert_eq!(reloads[0]["outcome"], "rejected", "{}", reloads[0]);
    assert_eq!(reloads[0]["stage"], "policy-tests", "{}", reloads[0]);
    assert_eq!(reloads[0]["problems"], 1, "{}", reloads[0]);
    let first = reloads[0]["errors"][0].as_str().unwrap_or_default();
    assert!(first.contains("test failed: feature branches are refused"), "{}", reloads[0]);
    // Nor does a server start with it.
    let config = portcullis::config::Config::load(&w.config_path())
        .unwrap_or_else(|e| panic!("the version compiles: {e}"));
    let refused = portcullis::server::Server::start(config, Default::default()).await;
    let why = refused.err().unwrap_or_default();
    assert!(why.contains("api.toml:8: test failed: feature branches are refused"), "{why}");

    // With its test brought in line, the same rules load.
    let fixed = FEATURE_DENIED.replace("are refused", "may call").replace("\"deny\"", "\"allow\"");
    write(&w.policy_path("api"), &format!("{FEATURE_TOO}{fixed}"));
    assert!(w.server().reload().await);
    assert_eq!(w.get("/x", Some(&feature)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn in_flight_requests_finish_during_a_reload_and_a_drain() {
    let mut w = World::start().await;
    let t = w.token("bb", &[]);
    let url = w.url("/slow/800");
    let c = w.client.clone();
    let auth = format!("Bearer {t}");
    let slow = tokio::spawn(async move {
        send_with(&c, http::Method::GET, &url, &[("authorization", &auth)], bytes::Bytes::new())
            .await
    });
    assert!(w.echo.slow_arrived(1, Duration::from_secs(20)).await, "the request never arrived");
    assert!(w.server().reload().await, "reload while a request is in flight");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let server = w.server.take().unwrap_or_else(|| panic!("server"));
    let drained = tokio::spawn(server.shutdown());
    let r = slow.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, StatusCode::OK, "the in-flight request completes");
    tokio::time::timeout(Duration::from_secs(10), drained).await.ok();
    // After shutdown nothing listens any more.
    let refused = tokio::net::TcpStream::connect(w.https).await;
    assert!(refused.is_err(), "listener closed after drain");
}

/// The drain is visible where load balancers look: while a request is still in flight
/// after SIGTERM's shutdown began, the admin listener answers, `/readyz` with 503 and
/// `"draining": true`, `/healthz` with 200; the request completes; once the drain is
/// over the admin listener is closed too.
#[tokio::test]
async fn readyz_answers_draining_while_in_flight_requests_finish() {
    let mut w = World::start().await;
    let t = w.token("bb", &[]);
    let url = w.url("/slow/2000");
    let c = w.client.clone();
    let auth = format!("Bearer {t}");
    let slow = tokio::spawn(async move {
        send_with(&c, http::Method::GET, &url, &[("authorization", &auth)], bytes::Bytes::new())
            .await
    });
    assert!(w.echo.slow_arrived(1, Duration::from_secs(20)).await, "the request never arrived");
    let ready = w.admin_get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    let server = w.server.take().unwrap_or_else(|| panic!("server"));
    let drained = tokio::spawn(server.shutdown());
    // The shutdown task runs when the runtime gets to it: asked until it has begun.
    let readyz = || async {
        tokio::time::timeout(Duration::from_secs(2), w.admin_get("/readyz"))
            .await
            .unwrap_or_else(|_| panic!("/readyz unanswered during the drain"))
    };
    let mut during = readyz().await;
    for _ in 0..100 {
        if during.status != StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        during = readyz().await;
    }
    assert!(!slow.is_finished(), "the slow request ended before /readyz was asked");
    assert_eq!(during.status, StatusCode::SERVICE_UNAVAILABLE, "{}", during.text());
    assert_eq!(during.json()["draining"], true, "{}", during.text());
    assert_eq!(during.json()["ready"], false, "{}", during.text());
    assert_eq!(w.admin_get("/healthz").await.status, StatusCode::OK);
    assert!(w.admin_get("/metrics").await.text().contains("portcullis_requests_total"));
    let r = slow.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, StatusCode::OK, "the in-flight request completes");
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .unwrap_or_else(|_| panic!("the drain did not end"))
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = tokio::net::TcpStream::connect(w.admin).await;
    assert!(refused.is_err(), "admin listener still open after the drain");
}

#[tokio::test]
async fn readiness_reflects_issuer_keys() {
    let w = World::start().await;
    let r = w.admin_get("/readyz").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["issuers_keys_loaded"]["bb"], true);
    assert_eq!(w.admin_get("/healthz").await.status, StatusCode::OK);
    assert_eq!(w.admin_get("/nope").await.status, StatusCode::NOT_FOUND);
}

/// An attacker holding far more silent admin connections than are served at once (64)
/// does not delay the kubelet's probes: the listener keeps accepting, a new connection
/// takes the place of the oldest silent one, and a silent one is closed after 2 s
/// anyway (here `idle_timeout` is the default 75 s).
#[tokio::test]
async fn probes_are_answered_promptly_while_silent_admin_connections_are_held() {
    use tokio::io::AsyncReadExt;
    let w = World::start().await;
    let mut silent = Vec::new();
    for round in 0..3 {
        for _ in 0..100 {
            let s = tokio::net::TcpStream::connect(w.admin).await;
            silent.push(s.unwrap_or_else(|e| panic!("{e}")));
        }
        let probe = tokio::time::timeout(Duration::from_secs(3), w.admin_get("/healthz")).await;
        let status = probe.map(|r| r.status).ok();
        assert_eq!(status, Some(StatusCode::OK), "probe {round} starved behind silent sockets");
    }
    // The most recent silent connection is closed by the first-request deadline.
    let last = silent.last_mut().unwrap_or_else(|| panic!("no connection"));
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(6), last.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
}

#[tokio::test]
async fn silent_admin_connections_are_closed_and_cannot_starve_the_probes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::with(Setup { server_extra: "idle_timeout = \"1s\"".into(), ..Setup::default() })
        .await;
    // More silent connections than the admin listener serves at once (64).
    let mut silent = Vec::new();
    for _ in 0..80 {
        silent
            .push(tokio::net::TcpStream::connect(w.admin).await.unwrap_or_else(|e| panic!("{e}")));
    }
    // A probe still gets its answer once they have been closed, after about a second.
    let probe = tokio::time::timeout(Duration::from_secs(8), w.admin_get("/healthz")).await;
    assert_eq!(probe.map(|r| r.status).ok(), Some(StatusCode::OK), "the probe was starved");
    // Each silent connection reads end-of-stream: closed, not just left waiting.
    for s in &mut silent {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(8), s.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    }
    // One request per connection: the answer says so and the connection ends.
    let mut s = tokio::net::TcpStream::connect(w.admin).await.unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection stayed open after its answer");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200") && answer.contains("connection: close"), "{answer}");
}

/// With `[audit] on_failure = "reject"`, nothing passes while the audit output fails:
/// requests get 503 `audit-unavailable`, a new database session `FATAL 57P03`, and
/// `/readyz` says why; once writes succeed again, requests pass again.
#[tokio::test]
async fn on_failure_reject_refuses_requests_while_audit_writes_fail() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    struct Output(Arc<AtomicBool>);
    impl std::io::Write for Output {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("no space left on device"));
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let failing = Arc::new(AtomicBool::new(false));
    let out = Box::new(Output(failing.clone()));
    // A database route whose upstream is never reached: the refusal comes first.
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let password = secrets.path().join("app");
    write(&password, "pw\n");
    let database = format!(
        "[[databases]]\nname = \"appdb\"\nlisten = \"127.0.0.1:0\"\nupstream = \"postgres://127.0.0.1:1\"\nupstream_user = \"app\"\npassword_file = {:?}\npolicy = \"pg\"\n\n",
        password.to_string_lossy()
    );
    let w = World::with(Setup {
        sink: Some(portcullis::audit::AuditSink::writer(out, portcullis::audit::QUEUE_BYTES)),
        routes: format!("{database}[audit]\non_failure = \"reject\"\n"),
        policies: vec![
            ("api".into(), ALLOW_ALL_PRESETS.into()),
            (
                "pg".into(),
                "[[rule]]\nid = \"app\"\neffect = \"allow\"\nissuer = \"bb\"\nci = { repository = \"{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}\" }\ndatabases = [\"appdb\"]\nroles = [\"app\"]\n".into(),
            ),
        ],
        ..Setup::default()
    })
    .await;
    let db = w.server().bound().databases.first().map(|d| d.1);
    let db = db.unwrap_or_else(|| panic!("no database listener"));
    let token = w.token("bb", &[]);
    assert_eq!(w.get("/a", Some(&token)).await.status, StatusCode::OK);
    failing.store(true, Ordering::Relaxed);
    // The next event's write fails: from then on the sink is unhealthy.
    w.get("/b", Some(&token)).await;
    let mut ready = w.admin_get("/readyz").await;
    for _ in 0..100 {
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = w.admin_get("/readyz").await;
    }
    assert_eq!(ready.json()["audit"], "write-failing", "{}", ready.text());
    let refused = w.get("/c", Some(&token)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["error"], "audit-unavailable", "{}", refused.text());
    let mut session = tokio::net::TcpStream::connect(db).await.unwrap_or_else(|e| panic!("{e}"));
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut session, &mut answer),
    )
    .await;
    assert!(read.is_ok(), "the session was not refused at once");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("57P03") && answer.contains("audit-unavailable"), "{answer}");
    // Writes work again (the writer retries within a second): requests pass again.
    failing.store(false, Ordering::Relaxed);
    let mut again = w.get("/d", Some(&token)).await;
    for _ in 0..100 {
        if again.status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        again = w.get("/d", Some(&token)).await;
    }
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(w.admin_get("/readyz").await.status, StatusCode::OK);
}

/// A world signing its assertions with the key in `assertion.pem` (key A, returned).
async fn with_assertion_key(watch: bool) -> (World, tempfile::TempDir, std::path::PathBuf) {
    let keys = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let key = keys.path().join("assertion.pem");
    write(&key, &p256_pem());
    let assertion = format!("key = {:?}\nttl = \"60s\"", key.to_string_lossy());
    let w = World::with(Setup { assertion, watch, ..Setup::default() }).await;
    (w, keys, key)
}

/// The `kid` of the assertion the upstream received for a fresh request by `token`,
/// verified against the JWKS served now (by the proxy and the admin listener alike), and
/// the assertion itself.
async fn signed_by(w: &World, token: &str) -> (String, String) {
    let r = w.get("/h", Some(token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let jwt = r.upstream_header("x-portcullis-assertion").unwrap_or_default();
    let jwks = same_jwks(w).await;
    let kid = verified_kid(&jwt, &jwks).unwrap_or_else(|| panic!("does not verify: {jwt}"));
    (kid, jwt)
}

/// The JWKS the proxy and the admin listener both serve. Asked of each in turn: with the
/// file watcher on, a reload can land between the two answers (seen under load: the
/// admin listener already had the new key), so a differing pair is asked again, and a
/// pair that never agrees fails.
async fn same_jwks(w: &World) -> serde_json::Value {
    let path = "/.well-known/portcullis/jwks.json";
    let mut pair = (serde_json::Value::Null, serde_json::Value::Null);
    for _ in 0..5 {
        pair = (w.get(path, None).await.json(), w.admin_get(path).await.json());
        if pair.0 == pair.1 {
            break;
        }
    }
    assert_eq!(pair.0, pair.1, "the proxy and the admin listener serve different key sets");
    pair.0
}

/// `[assertion] key` rotates on reload: new assertions carry the new `kid` at once, the
/// JWKS keeps the old key beside it (so assertions in flight and upstreams holding them
/// still verify), and a key file that cannot be used rejects the reload, the last good
/// key signing on.
#[tokio::test]
async fn a_reload_rotates_the_assertion_key_and_the_jwks_keeps_the_old_one() {
    let (w, _keys, key) = with_assertion_key(false).await;
    let token = w.token("corp", &[]);
    let (a, by_a) = signed_by(&w, &token).await;
    let jwks = w.get("/.well-known/portcullis/jwks.json", None).await.json();
    assert_eq!(jwks_kids(&jwks), [a.as_str()]);

    replace(&key, &p256_pem());
    assert!(w.server().reload().await, "a reload with a new key applies");
    // The same token (its assertion cached before the reload) and a fresh one of the
    // same principal: both signed with the new key.
    let (b, _) = signed_by(&w, &token).await;
    assert_ne!(b, a, "the new key signs at once");
    assert_eq!(signed_by(&w, &w.token("corp", &[])).await.0, b);
    let jwks = w.get("/.well-known/portcullis/jwks.json", None).await.json();
    assert_eq!(jwks_kids(&jwks), [b.clone(), a.clone()], "the old key is still published");
    assert_eq!(verified_kid(&by_a, &jwks), Some(a.clone()), "an assertion in flight verifies");
    let reload = w.events().into_iter().find(|e| e["kind"] == "reload").unwrap_or_default();
    assert_eq!(reload["old_assertion_kid"], a.as_str(), "{reload}");
    assert_eq!(reload["new_assertion_kid"], b.as_str(), "{reload}");
    assert_eq!(reload["restart_required"], serde_json::json!([]), "nothing waits for a restart");

    // Not a P-256 PKCS#8 key: the whole reload is refused, B keeps signing.
    for bad in ["not a key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"] {
        replace(&key, bad);
        assert!(!w.server().reload().await, "a reload with a bad key was applied: {bad}");
        assert_eq!(signed_by(&w, &token).await.0, b, "the last good key signs");
        let jwks = w.get("/.well-known/portcullis/jwks.json", None).await.json();
        assert_eq!(jwks_kids(&jwks), [b.clone(), a.clone()]);
    }
    let outcomes: Vec<_> = w
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "reload")
        .map(|e| e["outcome"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(outcomes, ["loaded", "rejected", "rejected"]);
}

/// The watcher already polls the key file; a new key there is now loaded, not only
/// warned about.
#[tokio::test]
async fn the_watcher_loads_a_new_assertion_key() {
    let (w, _keys, key) = with_assertion_key(true).await;
    let token = w.token("corp", &[]);
    let (a, _) = signed_by(&w, &token).await;
    replace(&key, &p256_pem());
    let mut rotated = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (kid, _) = signed_by(&w, &token).await;
        if kid != a {
            rotated = Some(kid);
            break;
        }
    }
    let b = rotated.unwrap_or_else(|| panic!("the watcher did not rotate the key"));
    let jwks = w.get("/.well-known/portcullis/jwks.json", None).await.json();
    assert_eq!(jwks_kids(&jwks), [b, a]);
}

/// Writes `text` as editors and `kubectl` do: a temporary file in the same directory,
/// renamed over the old one.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write(&tmp, text);
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {}: {e}", tmp.display()));
}

/// Polls `f` every 100 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f().await
}

/// A world whose default route's policy allows feature branches, with the file watcher;
/// a feature-branch token; and the configuration with that route moved to `policy`.
async fn watched_world() -> (World, String, impl Fn(&str) -> String) {
    let w = World::with(Setup {
        policies: vec![("api".into(), FEATURE_TOO.into())],
        watch: true,
        ..Setup::default()
    })
    .await;
    let feature = w.token("bb", &["branchName=feature/x"]);
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let moved_to =
        move |policy: &str| config.replace("policy = \"api\"", &format!("policy = {policy:?}"));
    (w, feature, moved_to)
}

/// Until the version naming the policy `name` was refused (its files are then watched).
async fn refused_naming(w: &World, name: &str) -> bool {
    let file = w.policy_path(name);
    eventually(Duration::from_secs(10), || async { w.server().watched_files().contains(&file) })
        .await
}

/// Round 10: a version the watcher refused for a file the configuration in force does
/// not read (a route moved to a new policy, written with a typo) is loaded by the
/// watcher alone once that file is fixed. No SIGHUP: the last version written is the
/// one loaded in the end.
#[tokio::test]
async fn the_watcher_loads_a_fix_to_a_policy_only_a_refused_version_reads() {
    let (w, feature, moved_to) = watched_world().await;
    let status = || async { w.get("/x", Some(&feature)).await.status };
    assert_eq!(status().await, StatusCode::OK);

    // The route moves to a new, stricter policy with a typo: refused, `api` still serves.
    write_atomically(&w.policy_path("strict"), &ONLY_MAIN.replace("branch =", "branchh ="));
    write_atomically(&w.config_path(), &moved_to("strict"));
    assert!(refused_naming(&w, "strict").await, "the refused version's policy is not watched");
    assert_eq!(status().await, StatusCode::OK);

    // The typo is fixed (`check` would say ok): the watcher loads it, feature branches
    // are refused.
    write_atomically(&w.policy_path("strict"), ONLY_MAIN);
    let loaded =
        eventually(Duration::from_secs(10), || async { status().await == StatusCode::FORBIDDEN })
            .await;
    assert!(loaded, "the fixed policy was never loaded by the watcher");
}

/// Round 10: a version naming a policy that does not exist yet is refused; writing the
/// policy afterwards loads it, through the watcher alone.
#[tokio::test]
async fn the_watcher_loads_a_policy_written_after_the_version_naming_it_was_refused() {
    let (w, feature, moved_to) = watched_world().await;
    let status = || async { w.get("/x", Some(&feature)).await.status };
    write_atomically(&w.config_path(), &moved_to("later"));
    assert!(refused_naming(&w, "later").await, "the missing policy is not watched");
    assert_eq!(status().await, StatusCode::OK);
    write_atomically(&w.policy_path("later"), ONLY_MAIN);
    let loaded =
        eventually(Duration::from_secs(10), || async { status().await == StatusCode::FORBIDDEN })
            .await;
    assert!(loaded, "the policy written after the refusal was never loaded by the watcher");
}

/// `/metrics` gives each served certificate's notAfter; a reload that adds an
/// `[[tls.sni]]` certificate adds its series, one that removes it drops it.
#[tokio::test]
async fn certificate_expiry_series_follow_the_served_certificates() {
    let w = World::start().await;
    let series = "portcullis_tls_certificate_expiry_timestamp_seconds";
    let samples = |m: &str| -> Vec<String> {
        m.lines().filter(|l| l.starts_with(&format!("{series}{{"))).map(str::to_string).collect()
    };
    let m = w.admin_get("/metrics").await.text();
    assert!(m.contains(&format!("# TYPE {series} gauge")), "{m}");
    let default = samples(&m);
    assert_eq!(default.len(), 1, "{m}");
    let prefix =
        format!("{series}{{cert=\"{}\",server_names=\"default\"}} ", w.pki.cert_path().display());
    let not_after = default[0].strip_prefix(&prefix).and_then(|v| v.parse::<u64>().ok());
    let now = portcullis::util::unix_now();
    assert!(not_after.is_some_and(|t| t > now + 14 * 86_400), "{default:?}");

    // 2031-01-01T00:00:00Z.
    let at = 1_924_992_000;
    let mut params = match rcgen::CertificateParams::new(vec!["other.example.com".to_string()]) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    params.not_after = match time::OffsetDateTime::from_unix_timestamp(at) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let key = match rcgen::KeyPair::generate() {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    };
    let cert = match params.self_signed(&key) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let (cert_path, key_path) =
        (w.dir.path().join("other.pem"), w.dir.path().join("other-key.pem"));
    write(&cert_path, &cert.pem());
    write(&key_path, &key.serialize_pem());
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let sni = format!(
        "\n[[tls.sni]]\nserver_names = [\"other.example.com\", \"*.other.example.com\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    write(&w.config_path(), &format!("{config}{sni}"));
    assert!(w.server().reload().await);
    let both = samples(&w.admin_get("/metrics").await.text());
    let added = format!(
        "{series}{{cert=\"{}\",server_names=\"other.example.com,*.other.example.com\"}} {at}",
        cert_path.display()
    );
    assert_eq!(both, [default[0].clone(), added], "default first, then [[tls.sni]] in order");

    write(&w.config_path(), &config);
    assert!(w.server().reload().await);
    assert_eq!(samples(&w.admin_get("/metrics").await.text()), default);
}

/// DNS rebinding: a page on `evil.example` whose name then resolves to 127.0.0.1 reaches
/// the loopback admin listener with `Host: evil.example` and could read what it answers.
/// Such a `Host` gets 421 and nothing of `/metrics` or `/readyz`, and so does a one-label
/// name (LLMNR, mDNS); an address or `localhost` (what probes and scrapes send) is served.
#[tokio::test]
async fn a_loopback_admin_listener_serves_no_page_named_by_another_host() {
    use bytes::Bytes;
    use http::Method;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let w = World::with(Setup::default()).await;
    let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let port = w.admin.port();
    for path in ["/metrics", "/readyz", "/healthz"] {
        let url = format!("http://{}{path}", w.admin);
        // A one-label name is one LLMNR or mDNS lets any host on the local network answer.
        for host in [
            "evil.example".to_string(),
            format!("127.0.0.1.nip.io:{port}"),
            "metrics".to_string(),
            format!("wpad:{port}"),
        ] {
            let r = send_with(&c, Method::GET, &url, &[("host", &host)], Bytes::new()).await;
            assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST, "{host}{path}");
            assert!(!r.text().contains("portcullis_"), "{host}{path}: {}", r.text());
        }
        for host in [format!("localhost:{port}"), w.admin.to_string()] {
            let r = send_with(&c, Method::GET, &url, &[("host", &host)], Bytes::new()).await;
            assert_eq!(r.status, StatusCode::OK, "{host}{path}");
        }
    }
}
