//! Policy review through the real proxy and the real binary: shadow policies counted
//! and logged but never enforced, the policy revision in audit events (hash and git
//! forms) and the reload event's changed routes, and `portcullis policy ...` as a
//! pipeline runs it (exit codes, a token verified against a live issuer).

use std::path::{Path, PathBuf};
use std::process::Command;

use http::StatusCode;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const BB_REPO: &str = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}";

/// The proposed policy: Bitbucket on main only (no release branches, no admin ban),
/// people still allowed, but not on /admin.
const CANDIDATE: &str = r#"
[[rule]]
id = "bb-main-only"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = "main" }

[[rule]]
id = "engineers"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]

[[rule]]
id = "no-admin-for-people"
effect = "deny"
issuer = "corp"
paths = ["/admin/**"]
"#;

/// The audit event of an allowed request, by the request id the upstream received.
async fn allowed_event(w: &World, r: &Resp) -> serde_json::Value {
    let id = r.upstream_header("x-portcullis-request-id").unwrap_or_default();
    assert!(!id.is_empty(), "no request id upstream: {}", r.text());
    w.event_for(&id).await
}

async fn shadow_count(w: &World) -> u64 {
    let m = w.admin_get("/metrics").await.text();
    m.lines()
        .find_map(|l| l.strip_prefix("portcullis_shadow_disagreements_total{route=\"api\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn shadow_policy_is_counted_and_logged_but_never_enforced() {
    let w = World::with(Setup {
        route_extra: "shadow_policy = \"candidate\"".into(),
        policies: vec![
            ("api".into(), ALLOW_ALL_PRESETS.into()),
            ("candidate".into(), CANDIDATE.into()),
        ],
        ..Setup::default()
    })
    .await;
    let before = shadow_count(&w).await;

    // Both allow: no disagreement, no `shadow` field.
    let main = w.token("bb", &[]);
    let r = w.get("/x", Some(&main)).await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = allowed_event(&w, &r).await;
    assert_eq!(ev["rule"]["id"], "bb-main");
    assert!(ev.get("shadow").is_none(), "{ev}");
    assert_eq!(shadow_count(&w).await, before);

    // Live allows, shadow denies: the request goes through (live is enforced), and
    // the disagreement is counted and logged with the shadow's decision.
    let release = w.token("bb", &["branchName=release/1.0"]);
    let r = w.get("/deploy", Some(&release)).await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = allowed_event(&w, &r).await;
    assert_eq!(ev["decision"], "allow");
    assert_eq!(ev["shadow"]["decision"], "deny", "{ev}");
    assert_eq!(ev["shadow"]["reason"], "policy-denied");
    assert_eq!(shadow_count(&w).await, before + 1);

    let engineer = w.token("corp", &[]);
    let r = w.get("/admin/users", Some(&engineer)).await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = allowed_event(&w, &r).await;
    assert_eq!(ev["shadow"]["rule"]["id"], "no-admin-for-people", "{ev}");
    assert_eq!(shadow_count(&w).await, before + 2);

    // Live denies, shadow allows: still denied.
    let r = w.get("/admin/x", Some(&main)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["rule"]["id"], "no-admin-from-ci");
    assert_eq!(ev["shadow"]["decision"], "allow", "{ev}");
    assert_eq!(ev["shadow"]["rule"]["id"], "bb-main-only");
    assert_eq!(shadow_count(&w).await, before + 3);
    let m = w.admin_get("/metrics").await.text();
    assert!(m.contains("# TYPE portcullis_shadow_disagreements_total counter"), "{m}");
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("git: {e}"));
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn reload_events(w: &World) -> Vec<serde_json::Value> {
    w.events().into_iter().filter(|e| e["kind"] == "reload" && e["outcome"] == "loaded").collect()
}

#[tokio::test]
async fn audit_events_carry_the_policy_revision_and_reloads_name_changed_routes() {
    let w = World::with(Setup {
        routes: "[[routes]]\nname = \"docs\"\nmatch = { path_prefix = \"/docs\" }\nupstream = \"http://{echo}\"\npolicy = \"docs\"\n".into(),
        policies: vec![("api".into(), ALLOW_ALL_PRESETS.into()), ("docs".into(), ALLOW_ALL_PRESETS.into())],
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK);
    let hashed =
        allowed_event(&w, &r).await["policy_revision"].as_str().unwrap_or_default().to_string();
    assert!(hashed.starts_with("sha256:") && hashed.len() == "sha256:".len() + 12, "{hashed}");

    // The directory becomes a git checkout: the revision is the commit.
    let dir = w.dir.path();
    git(dir, &["init", "-q"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "policies"]);
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"]);
    assert!(w.server().reload().await);
    let ev = reload_events(&w).pop().unwrap_or_default();
    assert_eq!(ev["old_policy_revision"], hashed.as_str());
    assert_eq!(ev["new_policy_revision"], format!("git:{commit}"));
    assert_eq!(ev["routes_changed"], serde_json::json!([]), "nothing about access changed: {ev}");
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(allowed_event(&w, &r).await["policy_revision"], format!("git:{commit}"));

    // An uncommitted change to one route's access: `+dirty`, and only that route.
    let docs = w.policy_path("docs");
    let text = std::fs::read_to_string(&docs).unwrap_or_default();
    write(&docs, &text.replace("branch = [\"main\", \"release/*\"]", "branch = \"main\""));
    assert!(w.server().reload().await);
    let ev = reload_events(&w).pop().unwrap_or_default();
    let rev = ev["new_policy_revision"].as_str().unwrap_or_default();
    assert!(rev.starts_with(&format!("git:{commit}+dirty.")), "{ev}");
    assert_eq!(ev["routes_changed"], serde_json::json!(["docs"]), "{ev}");

    // A comment is not an access change.
    let api = w.policy_path("api");
    let text = std::fs::read_to_string(&api).unwrap_or_default();
    write(&api, &format!("# reviewed\n{text}"));
    assert!(w.server().reload().await);
    let ev = reload_events(&w).pop().unwrap_or_default();
    assert_eq!(ev["routes_changed"], serde_json::json!([]), "{ev}");
    assert_ne!(ev["old_policy_revision"], ev["new_policy_revision"]);
}

/// Two route blocks swapped change which route (and policy) serves the requests they
/// share: the reload names both. Swapped routes that share no request are no change.
#[tokio::test]
async fn a_reload_that_swaps_routes_sharing_requests_names_them_as_changed() {
    let block = |name: &str, matcher: &str, policy: &str| {
        format!("[[routes]]\nname = \"{name}\"\nmatch = {{ {matcher} }}\nupstream = \"http://{{echo}}\"\npolicy = \"{policy}\"\n\n")
    };
    let writes = block("writes", "path_prefix = \"/w\", methods = [\"POST\"]", "docs");
    let all = block("all-w", "path_prefix = \"/w/\"", "api");
    let reads = block("reads", "path_prefix = \"/w\", methods = [\"GET\"]", "docs");
    let (o, p) =
        (block("o", "path_prefix = \"/o\"", "api"), block("p", "path_prefix = \"/p\"", "api"));
    let w = World::with(Setup {
        routes: format!("{writes}{all}{reads}{o}{p}"),
        policies: vec![
            ("api".into(), ALLOW_ALL_PRESETS.into()),
            ("docs".into(), ALLOW_ALL_PRESETS.into()),
        ],
        ..Setup::default()
    })
    .await;
    let config = std::fs::read_to_string(w.config_path()).unwrap_or_default();
    let echo = |b: &str| b.replace("{echo}", &w.echo.addr().to_string());
    let (writes, all, reads, o, p) = (echo(&writes), echo(&all), echo(&reads), echo(&o), echo(&p));
    let before = format!("{writes}{all}{reads}{o}{p}");
    assert!(config.contains(&before), "{config}");
    let changed = |w: &World| {
        let ev = reload_events(w).pop().unwrap_or_default();
        let mut names: Vec<String> =
            serde_json::from_value(ev["routes_changed"].clone()).unwrap_or_default();
        names.sort();
        names
    };

    // `all-w` now comes first: it takes the POSTs `writes` took (whose policy no longer
    // applies). `reads` still comes after both (GET is `writes`'s no more than before).
    write(&w.config_path(), &config.replace(&before, &format!("{all}{writes}{reads}{o}{p}")));
    assert!(w.server().reload().await);
    assert_eq!(changed(&w), ["all-w", "writes"]);

    // `o` and `p` share no request: their order is no change.
    write(&w.config_path(), &config.replace(&before, &format!("{all}{writes}{reads}{p}{o}")));
    assert!(w.server().reload().await);
    assert_eq!(changed(&w), Vec::<String>::new());

    // `reads` and `writes` share no method: swapping them is no change either; `reads`
    // before `all-w` is.
    write(&w.config_path(), &config.replace(&before, &format!("{all}{reads}{writes}{p}{o}")));
    assert!(w.server().reload().await);
    assert_eq!(changed(&w), Vec::<String>::new());
    write(&w.config_path(), &config.replace(&before, &format!("{reads}{all}{writes}{p}{o}")));
    assert!(w.server().reload().await);
    assert_eq!(changed(&w), ["all-w", "reads"]);
}

// === the binary ===

async fn run(args: Vec<String>) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).output())
        .await
        .unwrap_or_else(|e| panic!("join: {e}"))
        .unwrap_or_else(|e| panic!("run: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policy-review")
}

#[tokio::test]
async fn policy_commands_exit_with_0_1_2() {
    let cfg = example().join("portcullis.toml");
    let cfg = cfg.to_string_lossy().to_string();
    let extra = example().join("security-tests").to_string_lossy().to_string();

    let (code, out, err) = run(args(&["check", "-c", &cfg])).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(args(&["policy", "test", "-c", &cfg, "--tests", &extra])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 failed (3 test file(s))"), "{out}");

    // A copy whose security test now fails: exit 1; a broken test file: exit 2.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sec = dir.path().join("sec");
    std::fs::create_dir_all(&sec).ok();
    write(
        &sec.join("deploy-api.toml"),
        "[[test]]\nname = \"people cannot deploy\"\nidentity = { issuer = \"corp\", groups = [\"release-managers\"] }\nrequest = \"POST /deploy/1\"\nexpect = \"deny\"\n",
    );
    let sec_s = sec.to_string_lossy().to_string();
    let (code, out, _) =
        run(args(&["policy", "test", "-c", &cfg, "--tests", &sec_s, "--format", "json"])).await;
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(v["failed"], 1);
    assert_eq!(v["results"].as_array().map(|r| r.len()), Some(7));
    write(&sec.join("deploy-api.toml"), "[[test]]\nname = \"x\"\nexpect = \"maybe\"\n");
    let (code, _, err) = run(args(&["policy", "test", "-c", &cfg, "--tests", &sec_s])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("deploy-api.toml:3:10: unknown expect `maybe`"), "{err}");

    let (code, out, _) = run(args(&[
        "policy",
        "who",
        "-c",
        &cfg,
        "--route",
        "admin-console",
        "--format",
        "markdown",
    ]))
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("### Route `admin-console`"), "{out}");
    assert!(
        out.contains("whose verified email domain is `acme.example` and groups include `sre`"),
        "{out}"
    );
    let (code, _, err) = run(args(&["policy", "who", "-c", &cfg, "--route", "nope"])).await;
    assert_eq!(code, 2);
    assert!(err.contains("no route `nope` (routes: deploy-api, admin-console)"), "{err}");

    let (code, out, _) = run(args(&[
        "policy",
        "explain",
        "-c",
        &cfg,
        "--preset",
        "github-actions",
        "--claim",
        "repository_owner_id=4242",
        "--request",
        "DELETE https://deploy.internal.example.com/status/1",
        "--expect",
        "deny",
    ]))
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("decision: deny (denied-by-rule) by rule `no-deletes-from-ci`"), "{out}");
    let (code, _, _) = run(args(&["policy", "explain", "-c", &cfg, "--request", "GET /"])).await;
    assert_eq!(code, 2, "no caller is bad input");
}

#[tokio::test]
async fn explain_verifies_a_token_against_the_live_issuer() {
    let w = World::start().await;
    let cfg = w.config_path().to_string_lossy().to_string();
    let url = "GET https://localhost/admin/x".to_string();
    let token = w.token("bb", &[]);
    let (code, out, err) =
        run(args(&["policy", "explain", "-c", &cfg, "--token", &token, "--request", &url])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("signature verified against the issuer's keys"), "{out}");
    assert!(out.contains("decision: deny (denied-by-rule) by rule `no-admin-from-ci`"), "{out}");
    assert!(!out.contains(&token) && !err.contains(&token), "the token is never printed");

    // A token signed by someone else: the verifier rejects it, and says why.
    let other = portcullis::dev::signer::DevSigner::generate_rs256("test-key-1")
        .unwrap_or_else(|e| panic!("{e}"));
    let (h, p) = w.parts("bb", &[]);
    let forged = other.sign(&h, &p);
    let (code, out, _) =
        run(args(&["policy", "explain", "-c", &cfg, "--token", &forged, "--request", &url])).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("token REJECTED by the verifier (invalid-signature)"), "{out}");
    assert!(out.contains("decision: deny (invalid-signature)"), "{out}");

    // --no-verify explains the claims and says so.
    let (_, out, _) = run(args(&[
        "policy",
        "explain",
        "-c",
        &cfg,
        "--token",
        &forged,
        "--no-verify",
        "--request",
        &url,
        "--format",
        "json",
    ]))
    .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(v["verified"], false, "{out}");
    assert_eq!(v["deciding_rule"]["id"], "no-admin-from-ci");
    assert_eq!(v["identity"]["ci"]["repository"], BB_REPO);
}

#[tokio::test]
async fn diff_comments_on_a_pull_request() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = dir.path();
    let copy = |rel: &str| {
        let text = std::fs::read_to_string(example().join(rel)).unwrap_or_default();
        write(
            &root.join(rel),
            &text.replace("../../certs/", &format!("{}/certs/", env!("CARGO_MANIFEST_DIR"))),
        );
    };
    std::fs::create_dir_all(root.join("policies")).ok();
    for f in ["portcullis.toml", "policies/deploy-api.toml", "policies/admin-console.toml"] {
        copy(f);
    }
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    git(root, &["add", "-A"]);
    git(root, &["commit", "-q", "-m", "base"]);
    git(root, &["checkout", "-q", "-b", "widen"]);
    let p = root.join("policies/admin-console.toml");
    let text = std::fs::read_to_string(&p).unwrap_or_default();
    write(&p, &text.replace("groups_any = [\"sre\"]", "groups_any = [\"sre\", \"support\"]"));
    git(root, &["commit", "-q", "-am", "let support in"]);

    let cfg = root.join("portcullis.toml").to_string_lossy().to_string();
    let (code, out, err) = run(args(&["policy", "diff", "-c", &cfg, "--format", "markdown"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("## Policy access changes: `"), "{out}");
    assert!(out.contains("### Route `admin-console` (changed)"), "{out}");
    assert!(out.contains(":unlock: **Access gained**"), "{out}");
    assert!(out.contains("groups include any of `sre` or `support`"), "{out}");
    assert!(!out.contains("deploy-api"), "unchanged routes are not listed: {out}");
    let (code, out, _) =
        run(args(&["policy", "diff", "main", "HEAD", "-c", &cfg, "--format", "json"])).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(v["routes"][0]["rules"][0]["kind"], "widened", "{out}");
    let (code, _, _) = run(args(&["policy", "diff", "nope", "-c", &cfg])).await;
    assert_eq!(code, 2);
}

/// A pull request against `examples/policy-review` that the diff cannot judge, run as
/// its Bitbucket pipeline runs it (`policy diff origin/main HEAD --format markdown`):
/// `check` on the checkout passes (so `serve` would run it), and the diff fails with
/// exit 2 naming why, never a comment saying less than `serve` does. The policy is a
/// symbolic link (git holds the link's text, `serve` reads its target), then a path
/// that leaves the repository (git was asked for a decoy inside it).
#[tokio::test]
async fn diff_refuses_a_pull_request_it_cannot_judge() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = dir.path().join("repo");
    let copy = |rel: &str| {
        let text = std::fs::read_to_string(example().join(rel)).unwrap_or_default();
        write(
            &root.join(rel),
            &text.replace("../../certs/", &format!("{}/certs/", env!("CARGO_MANIFEST_DIR"))),
        );
    };
    std::fs::create_dir_all(root.join("policies")).ok();
    for f in ["portcullis.toml", "policies/deploy-api.toml", "policies/admin-console.toml"] {
        copy(f);
    }
    git(&root, &["init", "-q"]);
    git(&root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "base"]);
    let open = "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\nissuer = \"corp\"\n";
    let cfg = root.join("portcullis.toml").to_string_lossy().to_string();
    let diff = |cfg: String| async move {
        run(args(&["policy", "diff", "main", "HEAD", "-c", &cfg, "--format", "markdown"])).await
    };

    // 1. `policies/admin-console.toml` -> `#x` (a TOML comment as git holds it).
    git(&root, &["checkout", "-q", "-b", "link"]);
    write(&root.join("policies/#x"), open);
    let console = root.join("policies/admin-console.toml");
    std::fs::remove_file(&console).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink("#x", &console).unwrap_or_else(|e| panic!("{e}"));
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "tidy"]);
    let (code, out, err) = run(args(&["check", "-c", &cfg])).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = diff(cfg.clone()).await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("policies/admin-console.toml") && err.contains("symbolic link"), "{err}");

    // 2. `policy = "../repo/policies/open.toml"`, a decoy at `repo/policies/open.toml`.
    git(&root, &["checkout", "-q", "main"]);
    git(&root, &["checkout", "-q", "-b", "escape"]);
    write(&root.join("policies/open.toml"), open);
    let console =
        std::fs::read_to_string(root.join("policies/admin-console.toml")).unwrap_or_default();
    std::fs::create_dir_all(root.join("repo/policies")).ok();
    write(&root.join("repo/policies/open.toml"), &console);
    let config = std::fs::read_to_string(&cfg).unwrap_or_default();
    let moved =
        config.replace("policy = \"admin-console\"", "policy = \"../repo/policies/open.toml\"");
    assert_ne!(moved, config);
    write(Path::new(&cfg), &moved);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "move"]);
    let (code, out, err) = run(args(&["check", "-c", &cfg])).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = diff(cfg.clone()).await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("outside the repository"), "{err}");
}

/// `examples/postgres`: the review commands on a `[[databases]]` route.
#[tokio::test]
async fn policy_commands_cover_the_postgres_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/postgres");
    let cfg = dir.join("portcullis.toml").to_string_lossy().to_string();

    let (code, out, err) = run(args(&["check", "-c", &cfg])).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(args(&["policy", "test", "-c", &cfg, "-v"])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("orders-db.toml:29: ok: main runs migrations as migrator"), "{out}");
    assert!(out.contains("ok: 4 passed, 0 failed (1 test file(s))"), "{out}");

    let (code, out, err) = run(args(&["policy", "who", "-c", &cfg, "--route", "orders"])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("database route `orders`: PostgreSQL sessions on 0.0.0.0:6432 to orders-db.internal.example.com:5432, as upstream role `readonly` unless the deciding rule grants `migrator`"), "{out}");
    assert!(out.contains("requests to databases named `orders` as roles named `migrations`; as upstream role `migrator`"), "{out}");
    assert!(
        out.contains("`no-superuser` (") && out.contains("requests as roles named `postgres`"),
        "{out}"
    );

    let ci = [
        "--preset",
        "bitbucket-pipelines",
        "--claim",
        "workspaceUuid={0c0ffee0-1234-4abc-8def-0123456789ab}",
        "--claim",
        &format!("repositoryUuid={BB_REPO}"),
    ];
    let explain = |branch: &str, role: &str, expect: &str| {
        let mut a = args(&["policy", "explain", "-c", &cfg]);
        a.extend(args(&ci));
        a.extend(args(&["--claim", &format!("branchName={branch}")]));
        a.extend(args(&["--database", "orders", "--role", role, "--route", "orders"]));
        a.extend(args(&["--expect", expect]));
        a
    };
    let (code, out, err) = run(explain("main", "migrations", "allow")).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("decision: allow (allowed) by rule `main-pipelines-migrate`"), "{out}");
    assert!(out.contains("upstream role: `migrator`"), "{out}");
    let (code, out, err) = run(explain("feature/x", "migrations", "allow")).await;
    assert_eq!(code, 1, "a feature branch is denied: {out}{err}");
    assert!(out.contains("decision: deny (policy-denied)"), "{out}");
    let (code, _, err) = run(args(&[
        "policy",
        "explain",
        "-c",
        &cfg,
        "--preset",
        "human",
        "--database",
        "orders",
        "--role",
        "x",
        "--route",
        "nope",
    ]))
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("no database route `nope`"), "{err}");

    // `check` runs the tests of database policies too: a copy whose test is wrong fails.
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = tmp.path();
    let certs = format!("{}/certs/", env!("CARGO_MANIFEST_DIR"));
    for f in ["portcullis.toml", "secrets/readonly.password", "secrets/migrator.password"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        std::fs::create_dir_all(root.join(f).parent().unwrap_or(root)).ok();
        write(&root.join(f), &text.replace("../../certs/", &certs));
    }
    let policy = std::fs::read_to_string(dir.join("policies/orders-db.toml")).unwrap_or_default();
    std::fs::create_dir_all(root.join("policies")).ok();
    write(
        &root.join("policies/orders-db.toml"),
        &policy.replacen("expect = \"deny\"", "expect = \"allow\"", 1),
    );
    let copy = root.join("portcullis.toml").to_string_lossy().to_string();
    let (code, out, err) = run(args(&["check", "-c", &copy])).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("a feature branch cannot migrate")
            || out.contains("a feature branch cannot migrate"),
        "{out}{err}"
    );
    let (code, out, _) = run(args(&["policy", "test", "-c", &copy])).await;
    assert_eq!(code, 1, "{out}");
}

/// Policy CI runs where neither the certificates nor the upstream passwords exist: the
/// shipped policy-review and postgres examples, copied without `../../certs` and
/// `secrets/` (and with a password variable that is not set), pass every `policy`
/// command and `check --policy-only`; plain `check` still refuses the broken deploy.
#[tokio::test]
async fn policy_ci_needs_no_certificates_or_secrets() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Two levels down, so `../../certs` does not reach any certificates.
    let root = tmp.path().join("a/b");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = [
        "policy-review/portcullis.toml",
        "policy-review/policies/deploy-api.toml",
        "policy-review/policies/admin-console.toml",
        "policy-review/security-tests/deploy-api.toml",
        "postgres/portcullis.toml",
        "postgres/policies/orders-db.toml",
    ];
    for f in files {
        let text = std::fs::read_to_string(repo.join("examples").join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        let text = text.replace(
            "password_file = \"secrets/migrator.password\"",
            "password_env = \"PORTCULLIS_TEST_NEVER_SET\"",
        );
        std::fs::create_dir_all(root.join(f).parent().unwrap_or(&root)).ok();
        write(&root.join(f), &text);
    }
    git(&root, &["init", "-q"]);
    git(&root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "base"]);

    let review = root.join("policy-review/portcullis.toml").to_string_lossy().to_string();
    let tests = root.join("policy-review/security-tests").to_string_lossy().to_string();
    let pg = root.join("postgres/portcullis.toml").to_string_lossy().to_string();
    let ok = |(code, out, err): (i32, String, String), what: &str| {
        assert_eq!(code, 0, "{what}: {out}{err}");
        assert!(!err.contains("does not exist") && !err.contains("cannot read"), "{what}: {err}");
    };
    ok(run(args(&["policy", "test", "-c", &review, "--tests", &tests])).await, "test");
    ok(run(args(&["policy", "test", "-c", &pg])).await, "test pg");
    ok(run(args(&["check", "--policy-only", "-c", &review])).await, "check --policy-only");
    ok(run(args(&["check", "--policy-only", "-c", &pg])).await, "check --policy-only pg");
    ok(run(args(&["policy", "who", "-c", &review, "--route", "deploy-api"])).await, "who");
    ok(run(args(&["policy", "who", "-c", &pg, "--route", "orders"])).await, "who pg");
    let explain = args(&[
        "policy",
        "explain",
        "-c",
        &pg,
        "--preset",
        "human",
        "--claim",
        "groups:=[\"engineering\"]",
        "--database",
        "orders",
        "--role",
        "readonly",
        "--expect",
        "allow",
    ]);
    ok(run(explain).await, "explain pg");
    let diff = args(&["policy", "diff", "main", "-c", &review, "--tests", &tests]);
    ok(run(diff).await, "diff");
    ok(run(args(&["policy", "diff", "main", "-c", &pg])).await, "diff pg");

    // Plain `check` is still the deploy gate: each missing file or secret, once.
    let (code, _, err) = run(args(&["check", "-c", &pg])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("portcullis.toml:11:8: file `"), "{err}");
    assert!(err.contains("certs/dev/server.pem` does not exist"), "{err}");
    assert!(err.contains("cannot read `"), "{err}");
    assert!(err.contains("secrets/readonly.password`"), "{err}");
    assert!(err.contains("`PORTCULLIS_TEST_NEVER_SET` is not set"), "{err}");
    assert!(!err.contains("no credentials for it"), "migrator is declared: {err}");
    let (code, _, err) = run(args(&["check", "-c", &review])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("portcullis.toml:16:8: file `"), "{err}");
}

/// A configuration loaded for policy review has no certificates checked and no upstream
/// passwords read (they would be empty): it never serves.
#[tokio::test]
async fn a_policy_only_load_cannot_serve() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/portcullis.toml");
    let text = std::fs::read_to_string(&dir).unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(tmp.path().join("policies")).ok();
    for f in std::fs::read_dir(dir.with_file_name("policies")).into_iter().flatten().flatten() {
        std::fs::copy(f.path(), tmp.path().join("policies").join(f.file_name())).ok();
    }
    let cfg = tmp.path().join("portcullis.toml");
    // Real certificates: without the refusal, this would serve.
    let certs = format!("{}/certs/", env!("CARGO_MANIFEST_DIR"));
    write(&cfg, &text.replace("../../certs/", &certs));
    let mode = portcullis::config::LoadMode::PolicyOnly;
    let mut c = portcullis::config::Config::load_with(&cfg, mode)
        .unwrap_or_else(|e| panic!("policy-only load: {e}"));
    c.listen.https = Some(([127, 0, 0, 1], 0).into());
    c.listen.admin = None;
    let err = portcullis::server::Server::start(c, Default::default()).await.err();
    assert_eq!(
        err.as_deref(),
        Some("this configuration was loaded for policy review only; not serving")
    );
}
