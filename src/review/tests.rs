//! The review commands against real files: lints (one policy that must trigger each,
//! one that must not), `policy test`, `explain`, `who`, and `diff` on a temporary git
//! repository with real commits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::diff::{Access, DiffArgs};
use super::explain::{Caller, ExplainArgs, Target};
use super::snapshot::{Snapshot, Tree};
use super::test::TestArgs;
use super::who::WhoArgs;
use super::*;
use crate::config::Config;
use crate::diag::Source;
use crate::policy::{Catalog, Effect, Policy};

const REPO: &str = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}";

const CONFIG: &str = r#"[listen]
insecure_http = "127.0.0.1:0"

[issuers.corp]
issuer = "https://idp.example.com"
audiences = ["portcullis"]

[issuers.bb]
preset = "bitbucket-pipelines"
issuer = "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc"
audiences = ["https://proxy.example.com"]

[issuers.gh]
preset = "github-actions"
issuer = "https://token.actions.githubusercontent.com"
audiences = ["https://proxy.example.com"]

[[routes]]
name = "api"
match = { host = "api.example.com" }
upstream = "http://127.0.0.1:1"
policy = "api"
"#;

/// Line numbers matter: `explain` and `test` output is checked against them.
const API: &str = r#"[[rule]]
id = "engineers"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]

[[rule]]
id = "deploys"
effect = "allow"
issuer = "bb"
methods = ["POST"]
paths = ["/deploy/*"]
ci = { repository = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branch = ["main", "release/*"] }

[[rule]]
id = "no-deletes-from-ci"
effect = "deny"
issuer = ["bb", "gh"]
methods = ["DELETE"]

[[test]]
name = "main deploys"
identity = { preset = "bitbucket-pipelines", claims = { repositoryUuid = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branchName = "main" } }
request = "POST /deploy/1"
expect = "allow"
rule = "deploys"
"#;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

/// A configuration with the `api` policy `policy` in a fresh directory.
fn setup(policy: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    write(&dir.path().join("portcullis.toml"), CONFIG);
    write(&dir.path().join("policies/api.toml"), policy);
    let cfg = dir.path().join("portcullis.toml");
    (dir, cfg)
}

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.declare("corp", crate::identity::Preset::Oidc);
    c.declare("bb", crate::identity::Preset::BitbucketPipelines);
    c.declare("gh", crate::identity::Preset::GithubActions);
    c.declare("gl", crate::identity::Preset::GitlabCi);
    c
}

// === lints ===

/// Every message a policy produces: errors, then warnings.
fn policy_messages(text: &str) -> Vec<String> {
    match Policy::parse(&Source::new("p.toml", text), &catalog()) {
        Ok(p) => p.warnings().iter().map(ToString::to_string).collect(),
        Err(d) => d.into_sorted().iter().map(ToString::to_string).collect(),
    }
}

fn rule(effect: &str, id: &str, body: &str) -> String {
    format!("[[rule]]\nid = \"{id}\"\neffect = \"{effect}\"\n{body}\n\n")
}

#[test]
fn each_policy_lint_triggers_and_has_a_near_miss() {
    let pin = format!("ci = {{ repository = \"{REPO}\", branch = \"main\" }}");
    #[rustfmt::skip]
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("V22: GitHub rule without an owner pin",
            rule("allow", "a", "issuer = \"gh\"\nci = { branch = \"main\" }"),
            rule("allow", "a", "issuer = \"gh\"\nclaims = { repository_owner_id = \"42\" }\nci = { branch = \"main\" }"),
            "does not pin a repository or owner"),
        ("Bitbucket environment by name",
            rule("deny", "a", "issuer = \"bb\"\nci = { environment = \"production\" }"),
            rule("deny", "a", "issuer = \"bb\"\nci = { environment = \"{7c1b2d3e-0000-4000-8000-000000000001}\" }"),
            "never matches"),
        ("GitHub branch without an event or environment",
            rule("allow", "a", "issuer = \"gh\"\nclaims = { repository_owner_id = \"42\" }\nci = { branch = \"main\" }"),
            rule("allow", "a", "issuer = \"gh\"\nclaims = { repository_owner_id = \"42\", event_name = \"push\" }\nci = { branch = \"main\" }"),
            "trusts a GitHub branch alone"),
        ("GitLab branch without a protected ref",
            rule("allow", "a", "issuer = \"gl\"\nclaims = { namespace_id = \"7\" }\nci = { branch = \"main\" }"),
            rule("allow", "a", "issuer = \"gl\"\nclaims = { namespace_id = \"7\", ref_protected = \"true\" }\nci = { branch = \"main\" }"),
            "trusts a GitLab branch alone"),
        ("GitLab branch named by the subject, without a protected ref",
            rule("allow", "a", "issuer = \"gl\"\nsubject = \"project_path:acme/api:ref_type:branch:ref:main\"\nclaims = { project_id = \"20\" }"),
            rule("allow", "a", "issuer = \"gl\"\nsubject = \"project_path:acme/api:ref_type:branch:ref:main\"\nclaims = { project_id = \"20\", environment_protected = \"true\" }"),
            "trusts a GitLab branch alone"),
        ("GitLab branch alone, on a rule that cannot write",
            rule("allow", "a", "issuer = \"gl\"\nclaims = { namespace_id = \"7\" }\nmethods = [\"POST\"]\nci = { branch = \"main\" }"),
            rule("allow", "a", "issuer = \"gl\"\nclaims = { namespace_id = \"7\" }\nmethods = [\"GET\"]\nci = { branch = \"main\" }"),
            "trusts a GitLab branch alone"),
        ("claims.email takes unverified addresses",
            rule("allow", "a", "issuer = \"corp\"\nclaims = { email = \"*@acme.example\" }"),
            rule("allow", "a", "issuer = \"corp\"\nemail = \"*@acme.example\""),
            "includes unverified addresses"),
        ("V22: one owner-id pin across GitHub and GitLab",
            rule("allow", "a", "issuer = [\"gh\", \"gl\"]\nci = { workspace_id = \"4242\", branch = \"main\" }"),
            rule("allow", "a", "issuer = \"gh\"\nci = { workspace_id = \"4242\", branch = \"main\" }"),
            "write one allow rule per issuer"),
        ("V22: gitlab.com rule without a namespace pin",
            rule("allow", "a", "issuer = \"gl\"\nci = { branch = \"main\" }"),
            rule("allow", "a", "issuer = \"gl\"\nclaims = { namespace_id = \"7\" }\nci = { branch = \"main\" }"),
            "does not pin a repository or owner"),
        ("V22: Bitbucket rule without a repository or workspace pin",
            rule("allow", "a", "issuer = \"bb\"\nci = { branch = \"main\" }"),
            rule("allow", "a", &format!("issuer = \"bb\"\n{pin}")),
            "does not pin a repository or owner"),
        ("unknown claim name for the preset",
            rule("allow", "a", &format!("issuer = \"bb\"\n{pin}\nclaims = {{ branch_name = \"main\" }}")),
            rule("allow", "a", &format!("issuer = \"bb\"\n{pin}\nclaims = {{ branchName = \"main\" }}")),
            "is not a claim of bitbucket-pipelines tokens"),
        ("contradiction: HTTP and database conditions",
            rule("allow", "a", "issuer = \"corp\"\npaths = [\"/x\"]\ndatabases = [\"app\"]"),
            rule("allow", "a", "issuer = \"corp\"\npaths = [\"/x\"]"),
            "can never match"),
        ("contradiction: branch and tag",
            rule("allow", "a", &format!("issuer = \"bb\"\nci = {{ repository = \"{REPO}\", branch = \"main\", tag = \"v1\" }}")),
            rule("allow", "a", &format!("issuer = \"bb\"\nci = {{ repository = \"{REPO}\", branch = \"main\" }}")),
            "can never match"),
        ("contradiction: CI condition on a human issuer",
            rule("allow", "a", "issuer = \"corp\"\nci = { branch = \"main\" }"),
            rule("allow", "a", "issuer = \"corp\"\nsubject = \"00u-alice\""),
            "can never match"),
        ("contradiction: email outside email_domain",
            rule("allow", "a", "issuer = \"corp\"\nemail = \"bob@other.example\"\nemail_domain = \"acme.example\""),
            rule("allow", "a", "issuer = \"corp\"\nemail = \"bob@acme.example\"\nemail_domain = \"acme.example\""),
            "can never match"),
        ("allow shadowed by an earlier deny",
            rule("deny", "d", "issuer = \"corp\"\npaths = [\"/admin/**\"]") + &rule("allow", "a", "issuer = \"corp\"\npaths = [\"/admin/users\"]"),
            rule("deny", "d", "issuer = \"corp\"\npaths = [\"/admin/secrets\"]") + &rule("allow", "a", "issuer = \"corp\"\npaths = [\"/admin/**\"]"),
            "deny wins"),
        ("allow covered by an earlier allow",
            rule("allow", "broad", "issuer = \"corp\"\ngroups_any = [\"sre\"]") + &rule("allow", "a", "issuer = \"corp\"\ngroups_any = [\"sre\"]\nmethods = [\"GET\"]"),
            rule("allow", "narrow", "issuer = \"corp\"\ngroups_any = [\"sre\"]\nmethods = [\"GET\"]") + &rule("allow", "a", "issuer = \"corp\"\ngroups_any = [\"sre\"]"),
            "never decides: the earlier allow rule `broad`"),
        ("deploy-style rule reachable from any branch",
            rule("allow", "a", &format!("issuer = \"bb\"\nmethods = [\"POST\"]\nci = {{ repository = \"{REPO}\" }}")),
            rule("allow", "a", &format!("issuer = \"bb\"\nmethods = [\"POST\"]\n{pin}")),
            "from any branch"),
        ("duplicate rule ids",
            rule("allow", "a", "issuer = \"corp\"\nmethods = [\"GET\"]") + &rule("allow", "a", "issuer = \"corp\"\nmethods = [\"POST\"]"),
            rule("allow", "a", "issuer = \"corp\"\nmethods = [\"GET\"]") + &rule("allow", "b", "issuer = \"corp\"\nmethods = [\"POST\"]"),
            "duplicate rule id `a`"),
    ];
    for (name, bad, good, needle) in cases {
        let got = policy_messages(&bad);
        assert!(got.iter().any(|m| m.contains(needle)), "{name}: expected {needle:?} in {got:#?}");
        let got = policy_messages(&good);
        assert!(!got.iter().any(|m| m.contains(needle)), "{name}: near miss triggers: {got:#?}");
    }
}

#[test]
fn each_configuration_lint_triggers_and_has_a_near_miss() {
    let ari = "ari:cloud:bitbucket::workspace/7baee083-4f25-4a97-8a9a-0fde1b623b45";
    #[rustfmt::skip]
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("Bitbucket issuer whose only audience is the workspace ARI",
            CONFIG.replace("audiences = [\"https://proxy.example.com\"]\n\n[issuers.gh]", &format!("audiences = [\"{ari}\"]\n\n[issuers.gh]")),
            CONFIG.to_string(),
            "workspace ARI"),
        ("route with no policy",
            CONFIG.replace("policy = \"api\"\n", ""),
            CONFIG.to_string(),
            "missing field `policy`"),
    ];
    for (name, bad, good, needle) in cases {
        let dir = tempdir();
        write(&dir.path().join("policies/api.toml"), API);
        let load = |text: &str| -> Vec<String> {
            let path = dir.path().join("portcullis.toml");
            write(&path, text);
            match Config::load(&path) {
                Ok(c) => c.warnings.iter().map(ToString::to_string).collect(),
                Err(e) => e.0.iter().map(ToString::to_string).collect(),
            }
        };
        let got = load(&bad);
        assert!(got.iter().any(|m| m.contains(needle)), "{name}: expected {needle:?} in {got:#?}");
        assert!(load(&good).is_empty(), "{name}: near miss has problems: {:#?}", load(&good));
    }
}

// === policy test ===

fn test_args(cfg: &Path, tests: Vec<PathBuf>, format: Format) -> TestArgs {
    TestArgs { config: cfg.to_path_buf(), tests, format, verbose: true }
}

#[test]
fn policy_test_passes_and_fails_with_file_line_and_deciding_rule() {
    let (_dir, cfg) = setup(API);
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(r.stdout.contains("policies/api.toml:21: ok: main deploys"), "{}", r.stdout);
    assert!(r.stdout.contains("1 passed, 0 failed"), "{}", r.stdout);

    let failing = format!(
        "{API}
[[test]]
name = \"feature deploys\"
identity = {{ preset = \"bitbucket-pipelines\", claims = {{ repositoryUuid = \"{REPO}\", branchName = \"feature/x\" }} }}
request = \"POST /deploy/1\"
expect = \"allow\"

[[test]]
name = \"wrong rule\"
identity = {{ preset = \"bitbucket-pipelines\", claims = {{ repositoryUuid = \"{REPO}\", branchName = \"main\" }} }}
request = \"DELETE /deploy/1\"
expect = \"deny\"
rule = \"deploys\"
"
    );
    let (_dir, cfg) = setup(&failing);
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    // The failing test's file:line, the decision, and the deciding rule's file:line.
    assert!(
        r.stdout.contains("policies/api.toml:28: FAILED: feature deploys: expected allow, got deny (policy-denied) by no rule"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("policies/api.toml:34: FAILED: wrong rule: expected rule `deploys` to decide, but deny was decided by rule `no-deletes-from-ci`"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("policies/api.toml:15)"), "deciding rule's line: {}", r.stdout);
    assert!(r.stdout.contains("1 passed, 2 failed"), "{}", r.stdout);

    let r = test::run(&test_args(&cfg, vec![], Format::Json));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(
        (v["ok"].as_bool(), v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(false), Some(1), Some(2))
    );
    assert_eq!(v["results"][2]["decision"]["rule"]["id"], "no-deletes-from-ci");
    assert_eq!(v["results"][2]["decision"]["rule"]["line"], 15);
}

#[test]
fn policy_test_runs_extra_test_files_named_after_their_policy() {
    let (dir, cfg) = setup(API);
    let extra = dir.path().join("security");
    write(
        &extra.join("api.toml"),
        "[[test]]\nname = \"other repository\"\nidentity = { preset = \"bitbucket-pipelines\", claims = { repositoryUuid = \"{99999999-9999-4999-8999-999999999999}\", branchName = \"main\" } }\nrequest = \"POST /deploy/1\"\nexpect = \"allow\"\n",
    );
    let r = test::run(&test_args(&cfg, vec![extra.clone()], Format::Text));
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    assert!(r.stdout.contains("security/api.toml:1: FAILED: other repository"), "{}", r.stdout);
    assert!(r.stdout.contains("1 passed, 1 failed (2 test file(s))"), "{}", r.stdout);

    // A rule id the policy does not define, a rule in a test file, an unknown name:
    // bad input, each with its file:line.
    write(&extra.join("api.toml"), "[[test]]\nname = \"x\"\nidentity = { issuer = \"corp\" }\nrequest = \"GET /\"\nexpect = \"deny\"\nrule = \"nope\"\n\n[[rule]]\nid = \"r\"\neffect = \"allow\"\nissuer = \"corp\"\n");
    write(&extra.join("nothing-by-this-name.toml"), "");
    let r = test::run(&test_args(&cfg, vec![extra.clone()], Format::Text));
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(r.stderr.contains("security/api.toml:6:8: test expects rule `nope`"), "{}", r.stderr);
    assert!(
        r.stderr.contains("security/api.toml:8:1: a test file holds only `[[test]]`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("nothing-by-this-name.toml:1:1: no policy or route is named"),
        "{}",
        r.stderr
    );

    let r = test::run(&test_args(&cfg, vec![dir.path().join("missing")], Format::Text));
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    let r = test::run(&test_args(&dir.path().join("nope.toml"), vec![], Format::Json));
    assert_eq!(r.code, EXIT_BAD_INPUT);
    assert!(r.stdout.contains("\"ok\":false"), "{}", r.stdout);
}

// === explain ===

fn explain_args(cfg: &Path, caller: Caller, request: &str) -> ExplainArgs {
    ExplainArgs {
        config: cfg.to_path_buf(),
        caller,
        issuer: None,
        target: Target::Http(request.into()),
        no_verify: false,
        expect: None,
        format: Format::Text,
        verify_timeout: Duration::from_secs(2),
    }
}

fn preset(name: &str, overrides: &[&str]) -> Caller {
    Caller::Preset {
        name: name.into(),
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn explain_names_every_rule_with_its_line_and_every_failed_condition() {
    let (_dir, cfg) = setup(API);
    let caller =
        preset("bitbucket-pipelines", &[&format!("repositoryUuid={REPO}"), "branchName=feature/x"]);
    let r = explain::run(&explain_args(&cfg, caller, "POST https://api.example.com/deploy/1"));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    let o = &r.stdout;
    assert!(o.contains("signature NOT verified: claims built from preset"), "{o}");
    assert!(o.contains("route: `api`"), "{o}");
    assert!(o.contains("decision: deny (policy-denied)"), "{o}");
    assert!(
        o.contains(
            "api.toml:1: allow `engineers`: no match at 4:10: issuer = [\"corp\"], got \"bb\""
        ),
        "{o}"
    );
    assert!(o.contains("api.toml:7: allow `deploys`: no match at 13:63: ci.branch = [\"main\", \"release/*\"], got \"feature/x\""), "{o}");
    assert!(o.contains("api.toml:15: deny  `no-deletes-from-ci`: no match at 19:11: methods = [\"DELETE\"], got \"POST\""), "{o}");

    // A feature branch on the wrong path: both conditions to change, in one run.
    let caller =
        preset("bitbucket-pipelines", &[&format!("repositoryUuid={REPO}"), "branchName=feature/x"]);
    let r = explain::run(&explain_args(&cfg, caller, "POST https://api.example.com/release/1"));
    assert!(
        r.stdout.contains(concat!(
            "api.toml:7: allow `deploys`: no match on 2 conditions:\n",
            "      at 12:9: paths = [\"/deploy/*\"], got \"/release/1\"\n",
            "      at 13:63: ci.branch = [\"main\", \"release/*\"], got \"feature/x\"\n",
        )),
        "{}",
        r.stdout
    );

    let caller = preset("bitbucket-pipelines", &[&format!("repositoryUuid={REPO}")]);
    let mut args = explain_args(&cfg, caller, "POST https://api.example.com/deploy/1");
    args.expect = Some(Effect::Allow);
    let r = explain::run(&args);
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(r.stdout.contains("decision: allow (allowed) by rule `deploys` at"), "{}", r.stdout);
    assert!(r.stdout.contains("api.toml:7"), "{}", r.stdout);
    args.expect = Some(Effect::Deny);
    assert_eq!(explain::run(&args).code, EXIT_FAILED);

    // People, from a claims file; JSON for tools.
    let dir = tempdir();
    let claims = dir.path().join("alice.json");
    write(
        &claims,
        r#"{"iss": "https://idp.example.com", "aud": "portcullis", "sub": "alice", "groups": ["engineering"]}"#,
    );
    let mut args =
        explain_args(&cfg, Caller::Claims(claims), "DELETE https://api.example.com/anything");
    args.format = Format::Json;
    let r = explain::run(&args);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(v["decision"]["allowed"], true, "{}", r.stdout);
    assert_eq!(v["deciding_rule"]["id"], "engineers");
    assert_eq!(v["deciding_rule"]["line"], 1);
    assert_eq!(v["verified"], false);
    assert_eq!(v["rules"][0]["outcome"]["result"], "matched");
    assert_eq!(v["rules"][1]["outcome"]["condition"], "issuer");
    assert_eq!(v["rules"][1]["outcome"]["actual"], "\"corp\"");

    // No route, bad request, unknown preset: said plainly.
    let r =
        explain::run(&explain_args(&cfg, preset("human", &[]), "GET https://other.example.com/"));
    assert!(r.stdout.contains("decision: deny (no-route)"), "{}", r.stdout);
    let r = explain::run(&explain_args(
        &cfg,
        preset("human", &[]),
        "GET https://api.example.com/a/../admin",
    ));
    assert_eq!(r.code, EXIT_BAD_INPUT);
    assert!(r.stderr.contains("ambiguous-path"), "{}", r.stderr);
    assert_eq!(
        explain::run(&explain_args(&cfg, preset("nope", &[]), "GET /")).code,
        EXIT_BAD_INPUT
    );
}

/// `--preset human` on an issuer whose login asks for `acr_values` (and that pins a
/// `hosted_domain`) explains a token that issuer accepts: the first class asked for, the
/// Workspace's `hd`; `--claim` still overrides them, and the refusal is then explained.
#[test]
fn explain_preset_human_fits_the_issuers_acr_values_and_hosted_domain() {
    let (dir, cfg) = setup(API);
    write(&dir.path().join("keys"), "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n");
    let corp = "audiences = [\"portcullis\"]\n";
    let login = "hosted_domain = \"acme.example\"\nlogin = { client_id = \"portcullis\", client_secret_env = \"S\", extra_params = { acr_values = \"phr mfa\" } }\n";
    let config = CONFIG.replacen(corp, &format!("{corp}{login}"), 1);
    write(&cfg, &format!("{config}\n[session]\nkeys_file = \"keys\"\n"));
    let request = "GET https://api.example.com/";
    let r = explain::run(&explain_args(&cfg, preset("human", &[]), request));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(r.stdout.contains("decision: allow (allowed) by rule `engineers`"), "{}", r.stdout);
    let r = explain::run(&explain_args(&cfg, preset("human", &["acr=pwd"]), request));
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(r.stderr.contains("acr-mismatch"), "{}", r.stderr);
    let r = explain::run(&explain_args(&cfg, preset("human", &["hd=evil.example"]), request));
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(r.stderr.contains("hosted domain"), "{}", r.stderr);
}

#[test]
fn explain_decodes_a_token_but_never_prints_it() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let (_dir, cfg) = setup(API);
    let enc = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let payload = serde_json::json!({
        "iss": "https://idp.example.com", "aud": "portcullis", "sub": "alice",
        "exp": 4_000_000_000u64, "groups": ["engineering"]
    });
    let token =
        format!("{}.{}.{}", enc(serde_json::json!({"alg": "RS256"})), enc(payload), "c2lnbmF0dXJl");
    let mut args = explain_args(&cfg, Caller::Token(token.clone()), "GET https://api.example.com/");
    args.no_verify = true;
    let r = explain::run(&args);
    assert!(r.stdout.contains("signature NOT verified: --no-verify"), "{}", r.stdout);
    assert!(r.stdout.contains("decision: allow (allowed) by rule `engineers`"), "{}", r.stdout);
    assert!(!r.stdout.contains(&token) && !r.stderr.contains(&token));
    assert!(!format!("{:?}", args.caller).contains(&token));

    // Without --no-verify the issuer (example.com) is unreachable here: said so.
    args.no_verify = false;
    args.verify_timeout = Duration::from_millis(300);
    let r = explain::run(&args);
    assert!(
        r.stdout.contains("signature NOT verified: the keys of issuer `corp` could not be fetched"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains(&token));

    let r = explain::run(&explain_args(&cfg, Caller::Token("not-a-jwt".into()), "GET /"));
    assert_eq!(r.code, EXIT_BAD_INPUT);
}

/// A request written as a `[[test]]` writes it, `POST /deploy/1`, has no host, so it
/// reaches only a route for any host: `explain` and `who` say so and how to name the
/// host, rather than a bare `no-route` that reads as if the policy had no such path.
#[test]
fn a_request_without_a_host_is_told_to_name_one_when_no_route_takes_it() {
    let (_dir, cfg) = setup(API);
    let hint = "a request without a host (\"METHOD /path\") reaches only a route for any host; name it: \"METHOD https://HOST/path\"";
    let caller = preset("bitbucket-pipelines", &[&format!("repositoryUuid={REPO}")]);
    let r = explain::run(&explain_args(&cfg, caller, "POST /deploy/1"));
    assert!(r.stdout.contains("decision: deny (no-route)"), "{}", r.stdout);
    assert!(r.stdout.contains(hint), "{}", r.stdout);
    let r = explain::run(&explain_args(&cfg, Caller::Anonymous, "GET /"));
    assert!(r.stdout.contains(hint), "{}", r.stdout);
    // With a host, no such hint: the host is the one asked for.
    let r = explain::run(&explain_args(&cfg, Caller::Anonymous, "GET https://other.example.com/"));
    assert!(
        r.stdout.contains("decision: deny (no-route)") && !r.stdout.contains(hint),
        "{}",
        r.stdout
    );

    let who = |request: &str| {
        who::run(&WhoArgs {
            config: cfg.clone(),
            route: None,
            request: Some(request.into()),
            format: Format::Text,
        })
    };
    let r = who("POST /deploy/1");
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(r.stderr.contains(hint), "{r:?}");
    let r = who("GET https://nowhere.example/");
    assert!(!r.stderr.contains(hint), "{r:?}");
}

// === who ===

#[test]
fn who_summarizes_each_rule_in_words() {
    let (_dir, cfg) = setup(API);
    let args = |route: Option<&str>, request: Option<&str>, format| WhoArgs {
        config: cfg.clone(),
        route: route.map(str::to_string),
        request: request.map(str::to_string),
        format,
    };
    let r = who::run(&args(Some("api"), None, Format::Text));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    let o = &r.stdout;
    assert!(o.contains("route `api`: host api.example.com, paths under /, any method"), "{o}");
    assert!(o.contains("`engineers` (") && o.contains("api.toml:1): people and services of `corp` (oidc) whose groups include `engineering`; any request"), "{o}");
    assert!(o.contains("api.toml:7): pipelines of `bb` (bitbucket-pipelines) whose CI branch is `main` or matches `release/*` and CI repository is `{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}`; `POST` requests to paths matching `/deploy/*`"), "{o}");
    assert!(o.contains("always denied"), "{o}");
    assert!(o.contains("api.toml:15): all pipelines of `bb` (bitbucket-pipelines) or pipelines of `gh` (github-actions); `DELETE` requests"), "{o}");

    // For one request, only the rules that apply to it.
    let r = who::run(&args(None, Some("GET https://api.example.com/deploy/1"), Format::Text));
    assert!(r.stdout.contains("`engineers`") && !r.stdout.contains("`deploys`"), "{}", r.stdout);
    assert!(!r.stdout.contains("no-deletes-from-ci"), "{}", r.stdout);

    let r = who::run(&args(Some("api"), None, Format::Json));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(v[0]["allow"][1]["rule"]["id"], "deploys");
    assert_eq!(v[0]["deny"][0]["what"][0], "`DELETE` requests");

    assert_eq!(who::run(&args(Some("nope"), None, Format::Text)).code, EXIT_BAD_INPUT);
    assert_eq!(
        who::run(&args(None, Some("GET https://nowhere.example/"), Format::Text)).code,
        EXIT_BAD_INPUT
    );
}

/// `cors_preflight = true`: `who` says that anyone, without a credential, reaches the
/// upstream with a CORS preflight, as `explain` does; not for a request it does not
/// concern, nor for a route without it.
#[test]
fn who_says_cors_preflights_reach_the_upstream_without_the_policy() {
    let (dir, cfg) = setup(API);
    let args = |request: Option<&str>, format| WhoArgs {
        config: cfg.clone(),
        route: request.is_none().then(|| "api".to_string()),
        request: request.map(str::to_string),
        format,
    };
    let text = |request: Option<&str>| who::run(&args(request, Format::Text)).stdout;
    let note = "ANYONE, without any credential, can send a CORS preflight: this route has `cors_preflight = true`: a CORS preflight without a credential (OPTIONS with Origin and Access-Control-Request-Method; no Authorization, Proxy-Authorization or Cookie; no body) is forwarded on this route without consulting the policy";
    assert!(!text(None).contains("preflight"), "{}", text(None));

    write(&cfg, &CONFIG.replace("policy = \"api\"", "policy = \"api\"\ncors_preflight = true"));
    let o = text(None);
    assert!(o.contains(&format!("\n  {note}\n")), "{o}");
    assert!(
        o.contains("everyone else: denied (default deny), but for CORS preflights (above)"),
        "{o}"
    );
    let o = text(Some("OPTIONS https://api.example.com/deploy/1"));
    assert!(o.contains(note), "{o}");
    let o = text(Some("GET https://api.example.com/deploy/1"));
    assert!(!o.contains("preflight"), "{o}");
    let md = who::run(&args(None, Format::Markdown)).stdout;
    assert!(md.contains("**ANYONE, without any credential, can send a CORS preflight**: this route has `cors_preflight = true`"), "{md}");
    let v: serde_json::Value =
        serde_json::from_str(&who::run(&args(None, Format::Json)).stdout).unwrap_or_default();
    assert_eq!(v[0]["cors_preflight"]["forwarded_without_policy"], true, "{v}");

    // A method filter without OPTIONS: the route never takes a preflight.
    let get_only =
        CONFIG.replace("policy = \"api\"", "policy = \"api\"\ncors_preflight = true").replace(
            "host = \"api.example.com\" }",
            "host = \"api.example.com\", methods = [\"GET\"] }",
        );
    write(&cfg, &get_only);
    let o = text(None);
    assert!(!o.contains("can send a CORS preflight"), "{o}");
    drop(dir);
}

// === diff ===

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

fn commit(dir: &Path, msg: &str) -> String {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", msg]);
    git(dir, &["rev-parse", "HEAD"])
}

fn diff_of(cfg: &Path, from: Option<&str>, to: Option<&str>) -> diff::PolicyDiff {
    let args = DiffArgs {
        config: cfg.to_path_buf(),
        from: from.map(str::to_string),
        to: to.map(str::to_string),
        tests: vec![],
        format: Format::Text,
    };
    match diff::compute(&args) {
        Ok(d) => d,
        Err(e) => panic!("diff: {e:?}"),
    }
}

fn changes(d: &diff::PolicyDiff) -> Vec<(String, Access, &'static str, String)> {
    d.routes
        .iter()
        .flat_map(|r| {
            r.rules.iter().map(|c| {
                let id = c.after.as_ref().or(c.before.as_ref()).map(|s| s.rule.id.to_string());
                (r.route.clone(), c.access, c.kind, id.unwrap_or_default())
            })
        })
        .collect()
}

/// A pull request that edits only `portcullis.toml` can widen access as surely as one
/// that edits a policy: re-point an issuer, add an audience, read groups from another
/// claim, move a route to another upstream. Each is reported, naming the routes whose
/// rules trust the issuer; timeouts and cache settings are not access.
#[test]
fn diff_reports_issuer_and_route_settings_that_change_access() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");

    let moved = CONFIG
        .replace("issuer = \"https://idp.example.com\"\naudiences = [\"portcullis\"]", "issuer = \"https://idp.attacker.example\"\naudiences = [\"portcullis\", \"other-app\"]\ngroups_claim = \"nickname\"\nrefresh_cooldown = \"5m\"")
        .replace("upstream = \"http://127.0.0.1:1\"", "upstream = \"http://admin-backend:8080\"\nforward_token = true\nstrip_prefix = true\ntimeout = \"90s\"");
    write(&cfg, &moved);
    let c2 = commit(root, "re-point corp, move api");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert!(!d.is_empty());
    assert_eq!(d.issuers.len(), 1, "{:?}", d.issuers);
    let corp = &d.issuers[0];
    assert_eq!((corp.issuer.as_str(), corp.status), ("corp", "changed"));
    assert_eq!(corp.routes, vec!["api".to_string()], "the rule `engineers` names corp");
    let settings: Vec<&str> = corp.settings_changed.iter().map(|c| c.setting.as_str()).collect();
    assert_eq!(settings, ["audiences", "groups_claim", "issuer"], "refresh_cooldown is not access");
    assert_eq!(corp.settings_changed[1].before, None);
    assert_eq!(corp.settings_changed[1].after.as_deref(), Some("\"nickname\""));
    assert_eq!(d.routes.len(), 1, "{:?}", d.routes);
    let api = &d.routes[0];
    assert!(api.rules.is_empty());
    let settings: Vec<(&str, Option<&str>)> =
        api.settings_changed.iter().map(|c| (c.setting.as_str(), c.after.as_deref())).collect();
    assert_eq!(
        settings,
        [
            ("forward_token", Some("true")),
            ("strip_prefix", Some("true")),
            ("upstream", Some("\"http://admin-backend:8080\""))
        ],
        "timeout is not access; strip_prefix changes what the upstream is told"
    );
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("issuer `corp` (changed)"), "{text}");
    assert!(
        text.contains("issuer: \"https://idp.example.com\" -> \"https://idp.attacker.example\""),
        "{text}"
    );
    assert!(
        text.contains("setting upstream: \"http://127.0.0.1:1\" -> \"http://admin-backend:8080\""),
        "{text}"
    );
    let md = diff::render(&d, Format::Markdown);
    assert!(!md.contains("No access changes"), "{md}");
    assert!(md.contains("### Issuer `corp` (changed)"), "{md}");
    assert!(md.contains("| groups_claim | *(not set)* | \"nickname\" |"), "{md}");

    // A secret-looking value is never shown, only that it changed; Markdown cells
    // cannot open HTML or a new cell.
    let secret = moved.replace(
        "groups_claim = \"nickname\"",
        "groups_claim = \"a|b<!--\"\nlogin = { client_id = \"x\", client_secret = \"hunter2\" }",
    );
    write(&cfg, &secret);
    let c3 = commit(root, "secret");
    let d = diff_of(&cfg, Some(&c2), Some(&c3));
    let md = diff::render(&d, Format::Markdown);
    assert!(!md.contains("hunter2") && !md.contains("<!--") && md.contains("a\\|b&lt;!--"), "{md}");
    assert!(md.contains("\"client_secret\": (hidden, "), "{md}");
    // Round 11D: a key pasted into `*_env` is hidden too; a variable's name is shown.
    // Nested keys are quoted, so `{a=b, c=d}` and `{a="b, c=d"}` never read alike.
    let pasted = format!("{secret}\n[session]\nkeys_env = \"9f86d081884c7d659a2feaa0c55ad015\"\nkeys_file = \"Q8a8Q~abcDEFghiJKLmnoPQRstuVWXyz0123.4\"\n");
    let pasted = pasted.replace(
        "client_secret = \"hunter2\" }",
        "client_secret = \"hunter2\", extra_params = { acr_values = \"mfa\", prompt = \"login\" } }",
    );
    write(&cfg, &pasted);
    let c4 = commit(root, "pasted");
    let md = diff::render(&diff_of(&cfg, Some(&c3), Some(&c4)), Format::Markdown);
    assert!(!md.contains("9f86d081884c7d659a2feaa0c55ad015"), "{md}");
    assert!(md.contains("| keys_env | *(not set)* | (hidden, "), "{md}");
    assert!(!md.contains("Q8a8Q~") && md.contains("| keys_file | *(not set)* | (hidden, "), "{md}");
    assert!(
        md.contains("\"extra_params\": {\"acr_values\": \"mfa\", \"prompt\": \"login\"}"),
        "{md}"
    );
    let named = pasted.replace("9f86d081884c7d659a2feaa0c55ad015", "PORTCULLIS_SESSION_KEYS");
    write(&cfg, &named);
    let c5 = commit(root, "named");
    let md = diff::render(&diff_of(&cfg, Some(&c4), Some(&c5)), Format::Markdown);
    assert!(md.contains("\"PORTCULLIS_SESSION_KEYS\""), "{md}");

    // Unchanged settings: nothing to report.
    assert!(diff_of(&cfg, Some(&c5), Some(&c5)).is_empty());

    // A route added: its settings are listed with the rules it brings.
    let added = format!(
        "{named}\n[[routes]]\nname = \"any\"\nmatch = {{ host = \"*.example.com\" }}\nupstream = \"http://127.0.0.1:2\"\npolicy = \"api\"\nforward_token = true\n"
    );
    write(&cfg, &added);
    let c6 = commit(root, "wildcard route");
    let d = diff_of(&cfg, Some(&c5), Some(&c6));
    let any = d.routes.iter().find(|r| r.route == "any").unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(any.status, "added");
    let settings: Vec<(&str, Option<&str>)> =
        any.settings_changed.iter().map(|c| (c.setting.as_str(), c.after.as_deref())).collect();
    assert_eq!(
        settings,
        [("forward_token", Some("true")), ("upstream", Some("\"http://127.0.0.1:2\""))]
    );
    assert!(diff::render(&d, Format::Text).contains("setting forward_token: (not set) -> true"));
}

/// Round 11C: what a change to the top-level sections does (a session key file the
/// change itself commits, a `cookie_domain`, wider `trusted_proxies`) applies to every
/// route; and two route blocks for the same host and prefix swapped hand requests to
/// the other's policy. Both are reported; limits and timeouts are not.
#[test]
fn diff_reports_top_level_sections_and_a_swap_of_routes_that_match_alike() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    write(
        &root.join("policies/open.toml"),
        "[[rule]]\nid = \"all\"\neffect = \"allow\"\nissuer = \"corp\"\n",
    );
    let two = |locked_first: bool| {
        let block = |name: &str, policy: &str| {
            format!("\n[[routes]]\nname = \"{name}\"\nmatch = {{ host = \"admin.example.com\" }}\nupstream = \"http://127.0.0.1:3\"\npolicy = \"{policy}\"\n")
        };
        let (a, b) = (block("locked", "api"), block("open", "open"));
        let (x, y) = if locked_first { (a, b) } else { (b, a) };
        format!("{CONFIG}{x}{y}\n[session]\nkeys_file = \"/etc/portcullis/session-keys\"\n\n[server]\nidle_timeout = \"75s\"\n")
    };
    write(&cfg, &two(true));
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");

    let changed = two(false)
        .replace(
            "keys_file = \"/etc/portcullis/session-keys\"",
            "keys_file = \"committed-keys\"\ncookie_domain = \"example.com\"",
        )
        .replace("idle_timeout = \"75s\"", "idle_timeout = \"300s\"")
        .replace("[listen]\n", "[listen]\ntrusted_proxies = [\"0.0.0.0/0\"]\n");
    write(&cfg, &changed);
    let c2 = commit(root, "swap, session, proxies");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let sections: Vec<(&str, Vec<&str>)> = d
        .sections
        .iter()
        .map(|s| {
            (s.section.as_str(), s.settings_changed.iter().map(|c| c.setting.as_str()).collect())
        })
        .collect();
    assert_eq!(
        sections,
        [("listen", vec!["trusted_proxies"]), ("session", vec!["cookie_domain", "keys_file"])],
        "idle_timeout is a limit, not access"
    );
    for (name, before, after) in
        [("locked", vec![], vec!["open"]), ("open", vec!["locked"], vec![])]
    {
        let r =
            d.routes.iter().find(|r| r.route == name).unwrap_or_else(|| panic!("{name}: {d:?}"));
        let strings = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
        assert_eq!(r.order_changed, Some((strings(before), strings(after))), "{name}");
    }
    // The `api` route (another host) is tried before neither: not concerned.
    assert!(d.routes.iter().all(|r| r.route != "api"), "{d:?}");
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("settings `[session]` changed (every route):"), "{text}");
    assert!(text.contains("routing order changed"), "{text}");
    let md = diff::render(&d, Format::Markdown);
    assert!(md.contains("### Settings `[session]` (every route)"), "{md}");
    assert!(md.contains("Routing order changed"), "{md}");
    assert!(diff_of(&cfg, Some(&c2), Some(&c2)).is_empty());

    // Round 11D: `/admin` and `/admin/` match the same paths, so respelling one route's
    // prefix changes nothing in the order (file order decides), and the diff says so.
    let with_prefix = |text: &str, name: &str, prefix: &str| {
        text.replace(
            &format!("name = \"{name}\"\nmatch = {{ host = \"admin.example.com\" }}"),
            &format!("name = \"{name}\"\nmatch = {{ host = \"admin.example.com\", path_prefix = \"{prefix}\" }}"),
        )
    };
    let prefixed = with_prefix(&with_prefix(&changed, "locked", "/admin"), "open", "/admin");
    assert_ne!(prefixed, changed);
    write(&cfg, &prefixed);
    let c3 = commit(root, "prefixes");
    let slashed = with_prefix(&with_prefix(&changed, "locked", "/admin/"), "open", "/admin");
    write(&cfg, &slashed);
    let c4 = commit(root, "a trailing slash on the second");
    let d = diff_of(&cfg, Some(&c3), Some(&c4));
    assert!(d.routes.iter().all(|r| r.order_changed.is_none()), "{d:?}");
    let loaded = Config::load(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let first = loaded.route("admin.example.com", "/admin/x", &http::Method::GET);
    assert_eq!(first.map(|r| r.name.to_string()).as_deref(), Some("open"), "file order decides");
}

#[test]
fn diff_follows_real_commits() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let api = root.join("policies/api.toml");

    // 1. A rule added: access gained.
    let added = format!("{API}\n[[rule]]\nid = \"sre\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"sre\"]\n");
    write(&api, &added);
    let c2 = commit(root, "add sre");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert_eq!(changes(&d), vec![("api".into(), Access::Gained, "added", "sre".into())]);
    assert_eq!(d.from, git(root, &["rev-parse", "--short=12", &c1]));

    // 2. A rule narrowed (release branches dropped): access lost, and the test of a
    // release branch flips.
    let narrowed = added.replace("branch = [\"main\", \"release/*\"]", "branch = [\"main\"]")
        + &format!("\n[[test]]\nname = \"release deploys\"\nidentity = {{ preset = \"bitbucket-pipelines\", claims = {{ repositoryUuid = \"{REPO}\", branchName = \"release/1\" }} }}\nrequest = \"POST /deploy/1\"\nexpect = \"deny\"\n");
    write(&api, &narrowed);
    let c3 = commit(root, "narrow deploys");
    let d = diff_of(&cfg, Some(&c2), Some(&c3));
    assert_eq!(changes(&d), vec![("api".into(), Access::Lost, "narrowed", "deploys".into())]);
    let flips = &d.routes[0].flipped_tests;
    assert_eq!(flips.len(), 1, "{flips:?}");
    assert_eq!(flips[0].name, "release deploys");
    assert!(flips[0].before.allowed && !flips[0].after.allowed);
    assert_eq!(flips[0].before.rule.as_ref().map(|r| r.id.to_string()), Some("deploys".into()));
    let md = diff::render(&d, Format::Markdown);
    assert!(md.contains(":lock: **Access lost**"), "{md}");
    assert!(md.contains("| release deploys (`policies/api.toml:"), "{md}");
    assert!(
        md.contains("| allow (`deploys`, policies/api.toml:7) | deny (policy-denied) |"),
        "{md}"
    );

    // 3. A rule removed: access lost; the deny removed: access gained.
    let removed = narrowed.replace("[[rule]]\nid = \"engineers\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"engineering\"]\n", "")
        .replace("[[rule]]\nid = \"no-deletes-from-ci\"\neffect = \"deny\"\nissuer = [\"bb\", \"gh\"]\nmethods = [\"DELETE\"]\n", "");
    write(&api, &removed);
    let c4 = commit(root, "remove engineers and the delete ban");
    let mut got = changes(&diff_of(&cfg, Some(&c3), Some(&c4)));
    got.sort_by(|a, b| a.3.cmp(&b.3));
    assert_eq!(
        got,
        vec![
            ("api".into(), Access::Lost, "removed", "engineers".into()),
            ("api".into(), Access::Gained, "removed", "no-deletes-from-ci".into()),
        ]
    );

    // 4. The policy file renamed (and the route pointed at it): the same route, no
    // access change, the rename reported.
    git(root, &["mv", "policies/api.toml", "policies/public-api.toml"]);
    write(&cfg, &CONFIG.replace("policy = \"api\"", "policy = \"public-api\""));
    let c5 = commit(root, "rename");
    let d = diff_of(&cfg, Some(&c4), Some(&c5));
    assert_eq!(d.routes.len(), 1, "{d:?}");
    assert!(d.routes[0].rules.is_empty() && d.routes[0].flipped_tests.is_empty(), "{d:?}");
    assert_eq!(d.routes[0].policy_after.as_deref(), Some(Path::new("policies/public-api.toml")));
    assert!(diff::render(&d, Format::Text)
        .contains("policy file renamed: policies/api.toml -> policies/public-api.toml"));

    // Nothing changed between a revision and itself; the working tree is the default
    // TO, read without committing; the default FROM is the merge-base with main.
    assert!(diff_of(&cfg, Some(&c5), Some(&c5)).routes.is_empty());
    git(root, &["checkout", "-q", "-b", "feature"]);
    let renamed = root.join("policies/public-api.toml");
    let text = std::fs::read_to_string(&renamed).unwrap_or_default();
    write(&renamed, &text.replace("groups_any = [\"sre\"]", "groups_any = [\"sre\", \"interns\"]"));
    let d = diff_of(&cfg, None, None);
    assert_eq!(d.to, "working tree");
    assert_eq!(d.from, git(root, &["rev-parse", "--short=12", &c5]));
    assert_eq!(changes(&d), vec![("api".into(), Access::Gained, "widened", "sre".into())]);
    // Nothing was checked out over the work in progress.
    assert!(std::fs::read_to_string(&renamed).unwrap_or_default().contains("interns"));

    // Bad input: an unknown revision, a directory outside git.
    let r = diff::run(&DiffArgs {
        config: cfg.clone(),
        from: Some("no-such-rev".into()),
        to: None,
        tests: vec![],
        format: Format::Text,
    });
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    let (_other, outside) = setup(API);
    let r = diff::run(&DiffArgs {
        config: outside,
        from: Some("HEAD".into()),
        to: None,
        tests: vec![],
        format: Format::Json,
    });
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
}

/// A security team's test file guards a deny by naming it (`rule = ...`). A pull request
/// that deletes the deny must still get its diff, with that test flipping: the case a
/// reviewer most needs to see. `policy test` still calls the missing rule an error.
#[test]
fn diff_still_compares_when_a_change_deletes_a_rule_a_security_test_names() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    let guard = "[[test]]\nname = \"pipelines never delete\"\nidentity = { preset = \"bitbucket-pipelines\", claims = { repositoryUuid = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\", branchName = \"main\" } }\nrequest = \"DELETE /deploy/1\"\nexpect = \"deny\"\nrule = \"no-deletes-from-ci\"\n";
    write(&root.join("security-tests/api.toml"), guard);
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let without_deny = API.replace(
        "[[rule]]\nid = \"no-deletes-from-ci\"\neffect = \"deny\"\nissuer = [\"bb\", \"gh\"]\nmethods = [\"DELETE\"]\n",
        "[[rule]]\nid = \"ci-may-do-anything\"\neffect = \"allow\"\nissuer = \"bb\"\nci = { repository = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }\n",
    );
    assert_ne!(without_deny, API);
    write(&root.join("policies/api.toml"), &without_deny);
    let c2 = commit(root, "drop the delete ban");

    let r = diff::run(&DiffArgs {
        config: cfg.clone(),
        from: Some(c1.clone()),
        to: Some(c2.clone()),
        tests: vec![root.join("security-tests")],
        format: Format::Text,
    });
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(
        r.stdout.contains("removed deny `no-deletes-from-ci`")
            || r.stdout.contains("no-deletes-from-ci"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("tests whose decision flips"), "{}", r.stdout);
    assert!(r.stdout.contains("\"pipelines never delete\""), "{}", r.stdout);

    // `policy test` on the new revision's files: the test names a rule the policy no
    // longer has, which is still an error there (a typo must not pass quietly).
    let snap = Snapshot::load(&Tree::disk(root), Path::new("portcullis.toml"), "t".into())
        .unwrap_or_else(|e| panic!("{e:?}"));
    let strict = snap.test_sets(&Tree::disk(root), &[PathBuf::from("security-tests")], false);
    let errs = strict.err().unwrap_or_default();
    assert!(errs.iter().any(|e| e.contains("test expects rule `no-deletes-from-ci`")), "{errs:?}");
}

/// `policy diff` builds each revision's `[[test]]` identities with that revision's issuer
/// settings, as `check` and `serve` do: with `groups_claim = "/realm_access/roles"`, a
/// test whose roles are in `realm_access` shows the allow a change adds. Read from the
/// default `groups` claim, its caller had no groups, and the widening flipped nothing.
#[test]
fn policy_diff_reads_test_groups_where_the_issuer_puts_them() {
    let test = |expect: &str| {
        format!("\n[[test]]\nname = \"platform admins\"\nidentity = {{ issuer = \"corp\", claims = {{ realm_access = {{ roles = [\"platform-admin\"] }} }} }}\nrequest = \"GET /admin\"\nexpect = \"{expect}\"\n")
    };
    let (dir, cfg) = setup(&format!("{API}{}", test("deny")));
    let root = dir.path();
    let pointer = "audiences = [\"portcullis\"]\ngroups_claim = \"/realm_access/roles\"\n";
    write(&cfg, &CONFIG.replacen("audiences = [\"portcullis\"]\n", pointer, 1));
    git(root, &["init", "-q"]);
    let c1 = commit(root, "initial");
    let rule = "\n[[rule]]\nid = \"platform\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"platform-admin\"]\n";
    write(&root.join("policies/api.toml"), &format!("{API}{rule}{}", test("allow")));
    let c2 = commit(root, "platform admins");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let flips = &d.routes[0].flipped_tests;
    assert!(
        flips.iter().any(|f| f.name == "platform admins" && !f.before.allowed && f.after.allowed),
        "{flips:?}"
    );
}

/// A pull request that widens deploys while rewriting the test that would have caught
/// it, with a description crafted to forge or hide lines of the report: the old version
/// of the test still shows as flipping, and the Markdown carries no HTML from the file.
#[test]
fn a_rewritten_test_or_a_crafted_description_cannot_hide_a_widening() {
    let feature_test = |repo: &str| {
        format!("\n[[test]]\nname = \"feature branches cannot deploy\"\nidentity = {{ preset = \"bitbucket-pipelines\", claims = {{ repositoryUuid = \"{repo}\", branchName = \"feature/x\" }} }}\nrequest = \"POST /deploy/1\"\nexpect = \"deny\"\n")
    };
    let (dir, cfg) = setup(&format!("{API}{}", feature_test(REPO)));
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let other_repo = REPO.replace("2e9e", "2e9f");
    let widened = API.replace("branch = [\"main\", \"release/*\"]", "branch = [\"main\", \"release/*\", \"?**\"]")
        + "\n[[rule]]\nid = \"docs-read\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = [\"GET\"]\npaths = [\"/docs/**\"]\ndescription = \"Release managers may read the docs. <!--\"\n"
        + &feature_test(&other_repo);
    write(&root.join("policies/api.toml"), &widened);
    let c2 = commit(root, "docs for release managers");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let flips = &d.routes[0].flipped_tests;
    assert!(
        flips.iter().any(|f| f.name == "feature branches cannot deploy"
            && !f.before.allowed
            && f.after.allowed),
        "the old version of the rewritten test flips: {flips:?}"
    );
    let md = diff::render(&d, Format::Markdown);
    assert!(!md.contains("<!--") && md.contains("&lt;!--"), "{md}");
    // The widening itself is linted: a wildcards-only branch pattern is no restriction.
    let msgs = policy_messages(&widened);
    assert!(msgs.iter().any(|m| m.contains("from any branch")), "{msgs:?}");
    // A description cannot hold a line break or a bidirectional override.
    for bad in ["one\\nNo other access changes.", "a \\u202e b"] {
        let text = rule(
            "allow",
            "d",
            &format!("issuer = \"corp\"\ngroups_any = [\"x\"]\ndescription = \"{bad}\""),
        );
        let msgs = policy_messages(&text);
        assert!(msgs.iter().any(|m| m.contains("`description` is one line")), "{bad}: {msgs:?}");
    }
    // Paths are ASCII (requests are matched percent-encoded), and no pattern may hide
    // characters.
    let msgs = policy_messages(&rule("deny", "x", "paths = [\"/\u{0430}dmin/**\"]"));
    assert!(msgs.iter().any(|m| m.contains("is not ASCII")), "{msgs:?}");
    let msgs = policy_messages(&rule("deny", "x", "paths = [\"/admin\\u200b/**\"]"));
    assert!(msgs.iter().any(|m| m.contains("invisible")), "{msgs:?}");
    // Plain (non-pattern) values too: a group that reads `sre` but is not.
    let msgs =
        policy_messages(&rule("allow", "x", "issuer = \"corp\"\ngroups_any = [\"sre\\u200d\"]"));
    assert!(msgs.iter().any(|m| m.contains("invisible")), "{msgs:?}");
}

/// Every range of the hidden set (default-ignorable characters, controls, separators,
/// unusual spaces, U+2800) is refused in a value, a pattern and a description, with a
/// message that names it.
#[test]
fn the_policy_loader_refuses_every_hidden_character() {
    for &c in crate::policy::HIDDEN_SAMPLES {
        let esc = format!("\\U{:08X}", c as u32);
        for body in [
            format!("issuer = \"corp\"\ngroups_any = [\"sre{esc}\"]"),
            format!("issuer = \"gh\"\nci = {{ branch = \"main{esc}\" }}"),
            format!("issuer = \"corp\"\ngroups_any = [\"sre\"]\ndescription = \"a{esc}b\""),
        ] {
            let msgs = policy_messages(&rule("allow", "x", &body));
            assert!(
                msgs.iter()
                    .any(|m| m.contains("invisible, bidirectional-override or non-ASCII space")
                        || m.contains("`description` is one line")),
                "U+{:04X} in {body}: {msgs:?}",
                c as u32
            );
        }
    }
}

/// A test identity's shortcuts (`email`, `email_verified`, `subject`, `groups`) are in
/// its claims too, as in a real token: a `claims = { email = … }` rule matches an
/// unverified address, and the test that said otherwise now fails, as it should.
#[test]
fn test_shortcuts_are_claims_too_so_a_test_cannot_pass_for_a_reason_no_token_has() {
    let policy = r#"[[rule]]
id = "acme"
effect = "allow"
issuer = "corp"
claims = { email = "*@acme.example" }

[[test]]
name = "an unverified acme email is not enough"
identity = { issuer = "corp", email = "mallory@acme.example", email_verified = false }
request = "GET /x"
expect = "deny"
"#;
    let (_dir, cfg) = setup(policy);
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    assert!(
        r.stdout
            .contains("FAILED: an unverified acme email is not enough: expected deny, got allow"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("0 passed, 1 failed"), "{}", r.stdout);
}

#[test]
fn every_matcher_example_in_the_reference_compiles() {
    let readme = include_str!("../../policies/README.md");
    let start = readme.find("### Every matcher, by example").unwrap_or(0);
    let end = readme[start..].find("### `claims`").map_or(readme.len(), |e| start + e);
    let mut catalog = Catalog::default();
    for (name, preset) in [
        ("corp", crate::identity::Preset::Oidc),
        ("bitbucket", crate::identity::Preset::BitbucketPipelines),
        ("github", crate::identity::Preset::GithubActions),
        ("gitlab", crate::identity::Preset::GitlabCi),
    ] {
        catalog.declare(name, preset);
    }
    let blocks: Vec<&str> = readme[start..end]
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(blocks.len() >= 11, "one example per matcher: {}", blocks.len());
    for b in blocks {
        if let Err(d) = Policy::parse(&Source::new("README.md", b), &catalog) {
            panic!("{b}\n{:?}", d.into_sorted());
        }
    }
}

// === database routes ===

/// `policies/orders.toml`: line numbers are checked below.
const ORDERS: &str = r#"[[rule]]
id = "migrate"
effect = "allow"
issuer = "bb"
ci = { repository = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branch = "main" }
databases = ["orders"]
roles = ["migrations"]
upstream_role = "migrator"

[[rule]]
id = "engineers-read"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]
databases = ["orders"]

[[rule]]
id = "no-superuser"
effect = "deny"
issuer = ["bb", "corp"]
roles = ["postgres"]

[[test]]
name = "main migrates"
identity = { preset = "bitbucket-pipelines", claims = { repositoryUuid = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branchName = "main" } }
database = "orders"
role = "migrations"
expect = "allow"
rule = "migrate"
"#;

/// [`CONFIG`] plus a `[[databases]]` route `orders` with policy `orders`.
fn setup_db(orders: &str) -> (tempfile::TempDir, PathBuf) {
    let (dir, cfg) = setup(API);
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev");
    let config = format!(
        "{CONFIG}\n[tls]\ncert = {:?}\nkey = {:?}\n\n[[databases]]\nname = \"orders\"\nlisten = \"127.0.0.1:16432\"\nupstream = \"postgres://db.internal.example.com:5432\"\nupstream_user = \"readonly\"\npassword_file = \"secrets/readonly\"\npolicy = \"orders\"\n\n[databases.upstream_roles.migrator]\npassword_file = \"secrets/migrator\"\n",
        certs.join("server.pem"),
        certs.join("server-key.pem"),
    );
    write(&cfg, &config);
    write(&dir.path().join("secrets/readonly"), "ro-password\n");
    write(&dir.path().join("secrets/migrator"), "mig-password\n");
    write(&dir.path().join("policies/orders.toml"), orders);
    (dir, cfg)
}

fn explain_db(
    cfg: &Path,
    caller: Caller,
    route: Option<&str>,
    database: &str,
    role: &str,
) -> ExplainArgs {
    ExplainArgs {
        target: Target::Database {
            route: route.map(str::to_string),
            database: database.into(),
            role: role.into(),
        },
        ..explain_args(cfg, caller, "GET /")
    }
}

#[test]
fn who_describes_a_database_route_with_databases_roles_and_upstream_roles() {
    let (_dir, cfg) = setup_db(ORDERS);
    if let Err(e) = Config::load(&cfg) {
        panic!("config: {e:?}");
    }
    let args = |format| WhoArgs {
        config: cfg.clone(),
        route: Some("orders".into()),
        request: None,
        format,
    };
    let r = who::run(&args(Format::Text));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    let o = &r.stdout;
    assert!(o.contains("database route `orders`: PostgreSQL sessions on 127.0.0.1:16432 to db.internal.example.com:5432, as upstream role `readonly` unless the deciding rule grants `migrator`"), "{o}");
    assert!(o.contains("orders.toml:1): pipelines of `bb` (bitbucket-pipelines) whose CI branch is `main` and CI repository is `{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}`; requests to databases named `orders` as roles named `migrations`; as upstream role `migrator`"), "{o}");
    assert!(o.contains("orders.toml:10): people and services of `corp` (oidc) whose groups include `engineering`; requests to databases named `orders`; as upstream role `readonly` (the route's default)"), "{o}");
    assert!(o.contains("orders.toml:17): all pipelines of `bb` (bitbucket-pipelines) or people and services of `corp` (oidc); requests as roles named `postgres`"), "{o}");

    let r = who::run(&args(Format::Json));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(v[0]["kind"], "database");
    assert_eq!(v[0]["database"]["upstream_roles"][0], "migrator");
    assert_eq!(v[0]["allow"][0]["upstream_role"], "migrator");
    assert_eq!(v[0]["allow"][1]["upstream_role"], "readonly");

    // Every route: the HTTP route and the database route.
    let r = who::run(&WhoArgs { route: None, ..args(Format::Markdown) });
    assert!(r.stdout.contains("### Route `api`"), "{}", r.stdout);
    assert!(r.stdout.contains("### Database route `orders`"), "{}", r.stdout);
}

#[test]
fn explain_a_database_session_decision_and_its_upstream_role() {
    let (_dir, cfg) = setup_db(ORDERS);
    let main =
        preset("bitbucket-pipelines", &[&format!("repositoryUuid={REPO}"), "branchName=main"]);
    let r = explain::run(&explain_db(&cfg, main.clone(), Some("orders"), "orders", "migrations"));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    let o = &r.stdout;
    assert!(
        o.contains("request: PostgreSQL session: database \"orders\" as role \"migrations\""),
        "{o}"
    );
    assert!(o.contains("database route: `orders`"), "{o}");
    assert!(o.contains("decision: allow (allowed) by rule `migrate` at "), "{o}");
    assert!(
        o.contains("upstream role: `migrator` (granted by the deciding rule's `upstream_role`)"),
        "{o}"
    );

    // The only database route is found without --route; an engineer gets the default.
    let eng = Caller::Preset {
        name: "human".into(),
        overrides: vec!["groups:=[\"engineering\"]".into()],
    };
    let mut args = explain_db(&cfg, eng.clone(), None, "orders", "alice");
    args.issuer = Some("corp".into());
    args.format = Format::Json;
    let r = explain::run(&args);
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(v["kind"], "database");
    assert_eq!(v["route"], "orders");
    assert_eq!(v["decision"]["allowed"], true);
    assert_eq!(v["deciding_rule"]["id"], "engineers-read");
    assert_eq!(v["upstream_role"], "readonly");

    // Deny wins for the postgres role, with --expect failing on allow.
    let mut args = explain_db(&cfg, eng, Some("orders"), "orders", "postgres");
    args.issuer = Some("corp".into());
    args.expect = Some(Effect::Allow);
    let r = explain::run(&args);
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    assert!(
        r.stdout.contains("decision: deny (denied-by-rule) by rule `no-superuser`"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("upstream role:"), "{}", r.stdout);

    // Another database on the same route: no allow names it.
    let r = explain::run(&explain_db(&cfg, main.clone(), None, "billing", "migrations"));
    assert!(r.stdout.contains("decision: deny (policy-denied)"), "{}", r.stdout);

    // An unknown database route is bad input, naming the routes there are.
    let r = explain::run(&explain_db(&cfg, main, Some("nope"), "orders", "migrations"));
    assert_eq!(r.code, EXIT_BAD_INPUT);
    assert!(
        r.stderr.contains("no database route `nope` (database routes: orders)"),
        "{}",
        r.stderr
    );
}

#[test]
fn policy_test_runs_the_tests_of_database_policies() {
    let (dir, cfg) = setup_db(ORDERS);
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(r.stdout.contains("policies/orders.toml:23: ok: main migrates"), "{}", r.stdout);
    assert!(r.stdout.contains("2 passed, 0 failed (2 test file(s))"), "{}", r.stdout);

    // A wrong expectation in the database policy fails the run.
    write(
        &dir.path().join("policies/orders.toml"),
        &ORDERS.replace("expect = \"allow\"", "expect = \"deny\""),
    );
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    assert!(r.stdout.contains("FAILED: main migrates"), "{}", r.stdout);

    // Extra test files may be named after the database route.
    write(&dir.path().join("policies/orders.toml"), ORDERS);
    write(&dir.path().join("sec/orders.toml"), "[[test]]\nname = \"feature branches do not migrate\"\nidentity = { preset = \"bitbucket-pipelines\", claims = { repositoryUuid = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\", branchName = \"feature/x\" } }\ndatabase = \"orders\"\nrole = \"migrations\"\nexpect = \"deny\"\n");
    let r = test::run(&test_args(&cfg, vec![dir.path().join("sec")], Format::Text));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(r.stdout.contains("ok: feature branches do not migrate"), "{}", r.stdout);
}

/// Swapping two allows changes which grants the upstream role (the first match does),
/// though neither rule changed: `diff` says so.
#[test]
fn diff_reports_reordered_allows_on_a_route_that_grants_upstream_roles() {
    let (dir, cfg) = setup_db(ORDERS);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let migrate_end = ORDERS.find("[[rule]]\nid = \"engineers-read\"").unwrap_or(0);
    let read_end = ORDERS.find("[[rule]]\nid = \"no-superuser\"").unwrap_or(0);
    let swapped = format!(
        "{}{}{}",
        &ORDERS[migrate_end..read_end],
        &ORDERS[..migrate_end],
        &ORDERS[read_end..]
    );
    assert_ne!(swapped, ORDERS);
    write(&root.join("policies/orders.toml"), &swapped);
    let c2 = commit(root, "reorder");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert_eq!(
        changes(&d),
        vec![("orders".into(), Access::Changed, "reordered", "engineers-read".into())]
    );
    // Reordering on an API route (no upstream roles) changes nothing.
    let (dir, cfg) = setup(API);
    let root = dir.path();
    git(root, &["init", "-q"]);
    let c1 = commit(root, "initial");
    let split = API.find("[[rule]]\nid = \"deploys\"").unwrap_or(0);
    let end = API.find("[[rule]]\nid = \"no-deletes").unwrap_or(0);
    let swapped = format!("{}{}{}", &API[split..end], &API[..split], &API[end..]);
    write(&root.join("policies/api.toml"), &swapped);
    let c2 = commit(root, "reorder");
    assert!(diff_of(&cfg, Some(&c1), Some(&c2)).routes.is_empty());
}

#[test]
fn diff_includes_database_routes() {
    let (dir, cfg) = setup_db(ORDERS);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");

    // Release branches may migrate too: access gained on the database route, and
    // the test of a release branch flips.
    let widened = ORDERS.replace("branch = \"main\"", "branch = [\"main\", \"release/*\"]")
        + &format!("\n[[test]]\nname = \"release migrates\"\nidentity = {{ preset = \"bitbucket-pipelines\", claims = {{ repositoryUuid = \"{REPO}\", branchName = \"release/1\" }} }}\ndatabase = \"orders\"\nrole = \"migrations\"\nexpect = \"allow\"\n");
    write(&root.join("policies/orders.toml"), &widened);
    let c2 = commit(root, "release branches migrate");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert_eq!(changes(&d), vec![("orders".into(), Access::Gained, "widened", "migrate".into())]);
    assert_eq!(d.routes[0].kind, "database");
    assert_eq!(d.routes[0].flipped_tests.len(), 1, "{:?}", d.routes[0].flipped_tests);
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("database route `orders` (changed)"), "{text}");

    // A new upstream role for the route is a match change.
    let config = std::fs::read_to_string(&cfg).unwrap_or_default()
        + "\n[databases.upstream_roles.reporter]\npassword_file = \"secrets/readonly\"\n";
    write(&cfg, &config);
    let d = diff_of(&cfg, Some(&c2), None);
    assert_eq!(d.routes.len(), 1, "{d:?}");
    let (before, after) = d.routes[0].match_changed.clone().unwrap_or_default();
    assert!(
        before.ends_with("grants `migrator`") && after.ends_with("grants `migrator` or `reporter`"),
        "{before} -> {after}"
    );

    // A database route removed: its allows are access lost.
    let c3 = commit(root, "reporter");
    let cut = config.split("[[databases]]").next().unwrap_or_default().to_string();
    write(&cfg, &cut);
    let c4 = commit(root, "drop orders");
    let d = diff_of(&cfg, Some(&c3), Some(&c4));
    assert_eq!(d.routes.len(), 1, "{d:?}");
    assert_eq!((d.routes[0].route.as_str(), d.routes[0].status), ("orders", "removed"));
    assert!(d.routes[0].rules.iter().any(|c| c.access == Access::Lost), "{:?}", d.routes[0].rules);
}

/// Opening paths to callers without a credential is a widening of access like any
/// other, and said so in words; so is turning a rule public, or a public rule's paths
/// growing; a route's `cors_preflight` is a route setting that changes access.
#[test]
fn diff_reports_public_rules_and_cors_preflight_as_access_gained() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let api = root.join("policies/api.toml");

    // 1. A public rule added, with an anonymous test: access gained.
    let public = "[[rule]]\nid = \"health\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/healthz\"]\n";
    let anon_test = "[[test]]\nname = \"status is not public\"\nidentity = \"anonymous\"\nrequest = \"GET /status\"\nexpect = \"deny\"\n";
    write(&api, &format!("{API}\n{public}\n{anon_test}"));
    let c2 = commit(root, "public health");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert_eq!(changes(&d), vec![("api".into(), Access::Gained, "added", "health".into())]);
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("ANYONE, without any credential (public)"), "{text}");
    let json = diff::render(&d, Format::Json);
    assert!(json.contains("\"public\": true"), "{json}");

    // 2. Its paths widened: widened, access gained; the anonymous test flips.
    let wider = public.replace("[\"/healthz\"]", "[\"/healthz\", \"/status\"]");
    write(&api, &format!("{API}\n{wider}\n{anon_test}"));
    let c3 = commit(root, "public status");
    let d = diff_of(&cfg, Some(&c2), Some(&c3));
    assert_eq!(changes(&d), vec![("api".into(), Access::Gained, "widened", "health".into())]);
    let flips = &d.routes[0].flipped_tests;
    assert_eq!(flips.len(), 1, "{flips:?}");
    assert_eq!(flips[0].caller, "anonymous (no credential)");
    assert!(!flips[0].before.allowed && flips[0].after.allowed);

    // 3. A rule that needed a credential made public: widened, access gained.
    let engineers = "[[rule]]\nid = \"engineers\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"engineering\"]\n";
    let opened = API.replace(
        engineers,
        "[[rule]]\nid = \"engineers\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/**\"]\n",
    );
    assert_ne!(opened, API);
    write(&api, &opened);
    let c4 = commit(root, "everything public");
    let d = diff_of(&cfg, Some(&c1), Some(&c4));
    assert_eq!(changes(&d), vec![("api".into(), Access::Changed, "changed", "engineers".into())]);
    let restricted = API.replace(engineers, "[[rule]]\nid = \"engineers\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"engineering\"]\nmethods = [\"GET\"]\npaths = [\"/**\"]\n");
    write(&api, &restricted);
    let c5 = commit(root, "engineers read only");
    write(&api, &opened);
    let c6 = commit(root, "reads public");
    let d = diff_of(&cfg, Some(&c5), Some(&c6));
    assert_eq!(changes(&d), vec![("api".into(), Access::Gained, "widened", "engineers".into())]);
    let d = diff_of(&cfg, Some(&c6), Some(&c5));
    assert_eq!(changes(&d), vec![("api".into(), Access::Lost, "narrowed", "engineers".into())]);

    // 4. `cors_preflight` on the route: a route setting, reported.
    write(&cfg, &CONFIG.replace("policy = \"api\"", "policy = \"api\"\ncors_preflight = true"));
    let c7 = commit(root, "preflights");
    let d = diff_of(&cfg, Some(&c6), Some(&c7));
    let settings: Vec<(&str, Option<&str>, Option<&str>)> = d.routes[0]
        .settings_changed
        .iter()
        .map(|c| (c.setting.as_str(), c.before.as_deref(), c.after.as_deref()))
        .collect();
    assert_eq!(settings, [("cors_preflight", None, Some("true"))]);
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("setting cors_preflight: (not set) -> true"), "{text}");
    // ... and access gained: unauthenticated OPTIONS, whatever the policy says.
    assert_eq!(d.routes[0].cors_preflight, Some(Access::Gained), "{d:?}");
    assert!(
        text.contains("  access gained:\n    cors_preflight on: ANYONE, without any credential, can send OPTIONS"),
        "{text}"
    );
    let md = diff::render(&d, Format::Markdown);
    assert!(
        md.contains(
            ":unlock: **Access gained**\n\n- cors_preflight on: ANYONE, without any credential"
        ),
        "{md}"
    );
    assert!(diff::render(&d, Format::Json).contains("\"cors_preflight\": \"gained\""));
    // Turned off again: access lost.
    let d = diff_of(&cfg, Some(&c7), Some(&c6));
    assert_eq!(d.routes[0].cors_preflight, Some(Access::Lost), "{d:?}");
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("  access lost:\n    cors_preflight off:"), "{text}");
    let md = diff::render(&d, Format::Markdown);
    assert!(md.contains(":lock: **Access lost**\n\n- cors_preflight off:"), "{md}");
}

/// A route added with `cors_preflight = true` gains unauthenticated OPTIONS, and an
/// anonymous OPTIONS test of its policy flips when the setting is turned on.
#[test]
fn diff_reports_an_added_cors_preflight_route_and_flips_an_anonymous_options_test() {
    let options_test = "[[test]]\nname = \"no anonymous OPTIONS\"\nidentity = \"anonymous\"\nrequest = \"OPTIONS /admin/x\"\nexpect = \"deny\"\n";
    let (dir, cfg) = setup(&format!("{API}\n{options_test}"));
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    write(&cfg, &CONFIG.replace("policy = \"api\"", "policy = \"api\"\ncors_preflight = true"));
    let c2 = commit(root, "preflights");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let flips = &d.routes[0].flipped_tests;
    assert_eq!(flips.len(), 1, "{flips:?}");
    assert!(!flips[0].before.allowed && flips[0].after.allowed, "{flips:?}");
    assert_eq!(flips[0].after.reason, crate::reason::Reason::CorsPreflight);

    let extra = "\n[[routes]]\nname = \"spa\"\nmatch = { host = \"spa.example.com\" }\nupstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\ncors_preflight = true\n";
    write(&cfg, &format!("{CONFIG}{extra}"));
    let c3 = commit(root, "spa route");
    let d = diff_of(&cfg, Some(&c1), Some(&c3));
    let spa = d.routes.iter().find(|r| r.route == "spa").unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!((spa.status, spa.cors_preflight), ("added", Some(Access::Gained)), "{d:?}");
}

const ADMIN_DENY: &str =
    "[[rule]]\nid = \"no-admin\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = [\"/admin/**\"]\n";
const ANON_OPTIONS_TEST: &str = "[[test]]\nname = \"nobody without a credential reaches /admin\"\nidentity = \"anonymous\"\nrequest = \"OPTIONS /admin/delete-everything\"\nexpect = \"deny\"\n";

/// On a `cors_preflight = true` route a CORS preflight is forwarded without the policy:
/// `policy test`, `check` (its tests and its warnings) and `explain` say so, instead of
/// "deny" for an OPTIONS the proxy lets through.
#[test]
fn the_review_tools_model_a_cors_preflight_route() {
    let (dir, cfg) = setup(&format!("{API}\n{ADMIN_DENY}\n{ANON_OPTIONS_TEST}"));
    let preflight_cfg =
        CONFIG.replace("policy = \"api\"", "policy = \"api\"\ncors_preflight = true");
    // Near miss: without `cors_preflight`, the policy decides the OPTIONS (deny).
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    let c = Config::load(&cfg).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(c.failing_policy_tests().is_empty());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let args = explain_args(&cfg, Caller::Anonymous, "OPTIONS https://api.example.com/admin/x");
    let r = explain::run(&args);
    assert!(!r.stdout.contains("preflight"), "{}", r.stdout);

    write(&cfg, &preflight_cfg);
    // `policy test`: the anonymous OPTIONS is the preflight, allowed: the test fails.
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    assert!(
        r.stdout.contains("expected deny, got allow (cors-preflight) by no rule for OPTIONS /admin/delete-everything"),
        "{}",
        r.stdout
    );
    // `check` and `serve` run the same tests, and `check` warns about the deny.
    let c = Config::load(&cfg).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.failing_policy_tests().len(), 1);
    let warnings: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("deny rule `no-admin`"), "{warnings:?}");
    assert!(
        warnings[0].contains("a CORS preflight is forwarded without consulting the policy: this deny does not apply to it"),
        "{warnings:?}"
    );

    // `explain --anonymous` of an OPTIONS: allowed as a preflight, and says why.
    let mut args = explain_args(&cfg, Caller::Anonymous, "OPTIONS https://api.example.com/admin/x");
    args.expect = Some(Effect::Deny);
    let r = explain::run(&args);
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    assert!(
        r.stdout.contains("is forwarded on this route without consulting the policy"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("decision: allow (cors-preflight)"), "{}", r.stdout);
    let r = explain::run(&ExplainArgs { format: Format::Json, ..args });
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(j["decision"]["reason"], "cors-preflight", "{j}");
    assert_eq!(j["cors_preflight"]["forwarded_without_policy"], true, "{j}");
    // Another method, anonymous: the policy decides, and the preflight is mentioned.
    let args = explain_args(&cfg, Caller::Anonymous, "GET https://api.example.com/admin/x");
    let r = explain::run(&args);
    assert!(r.stdout.contains("decision: deny (denied-by-rule)"), "{}", r.stdout);
    assert!(r.stdout.contains("cors_preflight = true"), "{}", r.stdout);
    drop(dir);
}

/// `explain --anonymous` and `policy test` with `identity = "anonymous"`: what a caller
/// without a credential gets, rule by rule.
#[test]
fn explain_and_test_a_caller_without_a_credential() {
    let policy = format!(
        "{API}
[[rule]]
id = \"health\"
effect = \"allow\"
public = true
methods = [\"GET\"]
paths = [\"/healthz\"]

[[test]]
name = \"health is public\"
identity = \"anonymous\"
request = \"GET /healthz\"
expect = \"allow\"
rule = \"health\"

[[test]]
name = \"deploys need a credential\"
identity = \"anonymous\"
request = \"POST /deploy/1\"
expect = \"deny\"
"
    );
    let (_dir, cfg) = setup(&policy);
    let r = test::run(&test_args(&cfg, vec![], Format::Text));
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(r.stdout.contains("3 passed, 0 failed"), "{}", r.stdout);

    let mut args = explain_args(&cfg, Caller::Anonymous, "GET https://api.example.com/healthz");
    args.expect = Some(Effect::Allow);
    let r = explain::run(&args);
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(r.stdout.contains("caller: anonymous (no token, no session)"), "{}", r.stdout);
    assert!(r.stdout.contains("decision: allow (public) by rule `health`"), "{}", r.stdout);
    assert!(
        r.stdout.contains("allow `engineers`: no match at 4:10: issuer = [\"corp\"], got no credential (anonymous)"),
        "{}",
        r.stdout
    );

    let args = explain_args(&cfg, Caller::Anonymous, "DELETE https://api.example.com/deploy/1");
    let r = explain::run(&ExplainArgs { format: Format::Json, ..args });
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(j["anonymous"], true, "{j}");
    assert_eq!(j["identity"], serde_json::Value::Null, "{j}");
    // The deny names `bb` and `gh`, but nothing shows an anonymous caller is neither.
    assert_eq!(j["decision"]["reason"], "denied-by-rule", "{j}");
}

/// `policy explain --request` and `policy who --request` say what `serve` does with a
/// method it never forwards: refused before any rule, never "allowed by rule …".
#[test]
fn a_request_line_with_a_method_never_forwarded_is_refused() {
    for m in ["CONNECT", "TRACE", "TRACK"] {
        let got = super::explain::RequestLine::parse(&format!("{m} https://app.example.com/x"));
        let err = got.err().unwrap_or_default();
        assert!(err.contains("never forwards") && err.contains("405"), "{m}: {err}");
    }
    assert!(super::explain::RequestLine::parse("OPTIONS https://app.example.com/x").is_ok());
}

// === policy review evasion ===

/// A pull request that commits the policy as a symbolic link: `serve` (and `check`, on
/// the checked-out tree) read the file it points at, but `git show REV:path` gives the
/// link's own text, its target. A target that reads as TOML (`#x` is a comment: an empty
/// policy) made the diff compare the old rules with no rules at all: "access lost" for
/// every allow, while the route now runs the permissive file the link points at. So is
/// the configuration itself. A link at a revision is refused, naming it.
#[test]
fn diff_refuses_a_policy_or_configuration_committed_as_a_symbolic_link() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let api = root.join("policies/api.toml");
    write(
        &root.join("policies/#x"),
        "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\nissuer = \"corp\"\n",
    );
    std::fs::remove_file(&api).unwrap_or_else(|e| panic!("rm: {e}"));
    std::os::unix::fs::symlink("#x", &api).unwrap_or_else(|e| panic!("symlink: {e}"));
    // What `serve` reads: the permissive file.
    assert!(std::fs::read_to_string(&api).unwrap_or_default().contains("everyone"));
    let c2 = commit(root, "tidy the api policy");
    let args = |to: &str| DiffArgs {
        config: cfg.clone(),
        from: Some(c1.clone()),
        to: Some(to.to_string()),
        tests: vec![],
        format: Format::Markdown,
    };
    let r = diff::run(&args(&c2));
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(r.stderr.contains("policies/api.toml") && r.stderr.contains("symbolic link"), "{r:?}");
    // The working tree, read as `serve` reads it, shows the access gained.
    let d = diff_of(&cfg, Some(&c1), None);
    assert!(changes(&d).contains(&("api".into(), Access::Gained, "added", "everyone".into())));

    // The configuration as a link.
    git(root, &["checkout", "-q", &c1]);
    // `#cfg.toml` as the link's text is a TOML comment: a configuration without routes.
    let real = root.join("#cfg.toml");
    write(&real, &CONFIG.replace("policy = \"api\"", "policy = \"other\""));
    write(
        &root.join("policies/other.toml"),
        "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\nissuer = \"corp\"\n",
    );
    std::fs::remove_file(&cfg).unwrap_or_else(|e| panic!("rm: {e}"));
    std::os::unix::fs::symlink("#cfg.toml", &cfg).unwrap_or_else(|e| panic!("symlink: {e}"));
    let c3 = commit(root, "move the config");
    let r = diff::run(&args(&c3));
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(r.stderr.contains("portcullis.toml") && r.stderr.contains("symbolic link"), "{r:?}");
}

/// The flipped-tests table of the Markdown report wrote a test's name, caller and
/// request as the files spell them: a test named `… <!--` opened an HTML comment that
/// hid the rest of the pull-request comment (the access gained on every route listed
/// after it), a backtick in a test identity's subject closed its code span, and in the
/// terminal report a subject could carry an ANSI escape. Each is escaped now, and a
/// test's name is one visible line, as a rule's description is.
#[test]
fn a_test_name_or_caller_cannot_forge_or_hide_the_report() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let engineers = "[[rule]]\nid = \"engineers\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"engineering\"]\n";
    let changed = API.replace(engineers, "")
        + "\n[[test]]\nname = \"engineers keep reading | <!--\"\nidentity = { issuer = \"corp\", subject = \"al`ice <!-- \\u001b[2K\", groups = [\"engineering\"] }\nrequest = \"GET /x\"\nexpect = \"deny\"\n";
    write(&root.join("policies/api.toml"), &changed);
    let c2 = commit(root, "engineers read elsewhere");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert_eq!(d.routes[0].flipped_tests.len(), 1, "{d:?}");
    let md = diff::render(&d, Format::Markdown);
    assert!(!md.contains("<!--") && !md.contains("al`ice"), "{md}");
    assert!(!md.contains('\u{1b}'), "{md}");
    let row = md.lines().find(|l| l.starts_with("| engineers keep reading")).unwrap_or_default();
    // Six cell separators, not one more: no cell was split.
    assert_eq!(row.matches(" | ").count() + 2, 6, "{row}");
    let text = diff::render(&d, Format::Text);
    assert!(!text.contains('\u{1b}') && text.contains("\\u001B"), "{text}");

    // A test name is one visible line.
    for bad in ["one\\n\\nNo access changes.", "a \\u202e b", "a\\u001b[2Kb"] {
        let text = format!("{API}\n[[test]]\nname = \"{bad}\"\nidentity = {{ issuer = \"corp\", groups = [\"engineering\"] }}\nrequest = \"GET /x\"\nexpect = \"allow\"\n");
        let msgs = policy_messages(&text);
        assert!(msgs.iter().any(|m| m.contains("test `name` is one line")), "{bad}: {msgs:?}");
    }
}

/// A deny's value respelt with a look-alike letter (a Cyrillic `о` in `mallory`) no
/// longer matches the caller it names, but the report's before and after read the same,
/// so the change looked like a no-op reformat. Every character outside ASCII in a rule's
/// conditions is shown as its escape in the report (`\u043E`), so the two differ on the
/// page as they do to the proxy.
#[test]
fn a_look_alike_letter_in_a_changed_rule_shows_in_the_report() {
    let deny = "\n[[rule]]\nid = \"no-mallory\"\neffect = \"deny\"\nissuer = \"corp\"\nemail = \"mallory@acme.example\"\n";
    let (dir, cfg) = setup(&format!("{API}{deny}"));
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    write(
        &root.join("policies/api.toml"),
        &format!("{API}{}", deny.replace("mallory@", "mall\u{043e}ry@")),
    );
    let c2 = commit(root, "normalize the deny");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert_eq!(changes(&d), vec![("api".into(), Access::Changed, "changed", "no-mallory".into())]);
    for format in [Format::Text, Format::Markdown] {
        let out = diff::render(&d, format);
        assert!(out.contains("mall\\u043Ery@acme.example") && !out.contains('\u{043e}'), "{out}");
    }
}

/// Routes are matched by name, so removing a route (or narrowing its match) read as
/// "access lost: removed allow …": but its requests do not stop, they go to the next
/// route that matches them, and that route's policy decides them now. Deleting a
/// strict `/admin` route in front of a catch-all whose policy lets every engineer in
/// opened `/admin` to every engineer, and the report said only "access lost". The
/// routes that now take such requests are named, as access gained.
#[test]
fn diff_names_the_route_that_takes_the_requests_of_a_removed_or_narrowed_route() {
    let admin_route = "\n[[routes]]\nname = \"admin\"\nmatch = { host = \"api.example.com\", path_prefix = \"/admin\" }\nupstream = \"http://127.0.0.1:1\"\npolicy = \"admin\"\n";
    let (dir, cfg) = setup(API);
    let root = dir.path();
    write(&cfg, &format!("{CONFIG}{admin_route}"));
    write(
        &root.join("policies/admin.toml"),
        "[[rule]]\nid = \"admins\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"admins\"]\n",
    );
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    write(&cfg, CONFIG);
    let c2 = commit(root, "drop the admin route");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let admin = d.routes.iter().find(|r| r.route == "admin").unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(admin.status, "removed");
    assert_eq!(admin.taken_over_by, vec!["api".to_string()], "{d:?}");
    let text = diff::render(&d, Format::Text);
    let gained = text.split("access gained:").nth(1).unwrap_or_default();
    assert!(gained.contains("now go to route `api`"), "{text}");
    let md = diff::render(&d, Format::Markdown);
    assert!(md.contains(":unlock: **Access gained**"), "{md}");

    // Narrowed to `POST`: its `GET`s go to `api` too. Widened: nothing leaves it.
    write(
        &cfg,
        &format!(
            "{CONFIG}{}",
            admin_route.replace(
                "path_prefix = \"/admin\" }",
                "path_prefix = \"/admin\", methods = [\"POST\"] }"
            )
        ),
    );
    let c3 = commit(root, "admin route for writes only");
    let d = diff_of(&cfg, Some(&c1), Some(&c3));
    let admin = d.routes.iter().find(|r| r.route == "admin").unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(admin.taken_over_by, vec!["api".to_string()], "{d:?}");
    let d = diff_of(&cfg, Some(&c3), Some(&c1));
    let admin = d.routes.iter().find(|r| r.route == "admin").unwrap_or_else(|| panic!("{d:?}"));
    assert!(admin.taken_over_by.is_empty(), "{d:?}");
}

/// `policy = "../repo/policies/open.toml"`, in a repository checked out as `repo`, is
/// `policies/open.toml` to `serve`; the diff normalized the path to `../repo/…` and git
/// was asked for `repo/policies/open.toml` (the `..` dropped): a decoy the pull request
/// commits there, a copy of the old rules, so the report showed a rename and no access
/// change while the route ran the permissive file. An absolute path did the same. A
/// policy outside the repository is refused: the diff cannot judge it.
#[test]
fn diff_refuses_a_policy_path_that_leaves_the_repository() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    write(
        &root.join("policies/open.toml"),
        "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\nissuer = \"corp\"\n",
    );
    write(&root.join(&name).join("policies/open.toml"), API);
    let escaping = format!("../{name}/policies/open.toml");
    write(&cfg, &CONFIG.replace("policy = \"api\"", &format!("policy = \"{escaping}\"")));
    // `serve` reads the permissive file.
    let config = Config::load(&cfg).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(config.routes[0].policy.rules().iter().any(|r| r.id() == "everyone"));
    let c2 = commit(root, "move the api policy");
    for to in [Some(c2.as_str()), None] {
        let r = diff::run(&DiffArgs {
            config: cfg.clone(),
            from: Some(c1.clone()),
            to: to.map(str::to_string),
            tests: vec![],
            format: Format::Text,
        });
        assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
        assert!(r.stderr.contains("outside the repository"), "{r:?}");
    }
    // An absolute path too.
    let abs = root.join("policies/open.toml");
    write(
        &cfg,
        &CONFIG.replace("policy = \"api\"", &format!("policy = {:?}", abs.display().to_string())),
    );
    let c3 = commit(root, "absolute");
    let r = diff::run(&DiffArgs {
        config: cfg.clone(),
        from: Some(c1.clone()),
        to: Some(c3),
        tests: vec![],
        format: Format::Text,
    });
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(r.stderr.contains("outside the repository"), "{r:?}");
}

/// A route added in front of an existing one takes some of its requests, and with
/// them out of reach of that route's denies: a new `/admin` route whose policy allows
/// every engineer, in front of a catch-all whose deny kept contractors (engineers too)
/// out of `/admin`, reported only "route `admin` added: engineers", which they already
/// were. The routing order of the catch-all only counted routes both sides have, so the
/// deny that no longer applies went unsaid. An added route tried first is named.
#[test]
fn diff_names_an_added_route_that_is_tried_before_an_existing_one() {
    let deny = "\n[[rule]]\nid = \"no-contractors-on-admin\"\neffect = \"deny\"\nissuer = \"corp\"\ngroups_any = [\"contractors\"]\npaths = [\"/admin/**\"]\n";
    let (dir, cfg) = setup(&format!("{API}{deny}"));
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    write(&cfg, &format!("{CONFIG}\n[[routes]]\nname = \"admin\"\nmatch = {{ host = \"api.example.com\", path_prefix = \"/admin\" }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"admin\"\n"));
    write(
        &root.join("policies/admin.toml"),
        "[[rule]]\nid = \"engineers\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"engineering\"]\n",
    );
    let c2 = commit(root, "an admin route for engineers");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let api = d.routes.iter().find(|r| r.route == "api").unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(api.order_changed, Some((vec![], vec!["admin".to_string()])), "{d:?}");
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("routing order changed"), "{text}");
}

/// A setting's key or value in the Markdown report shows a hidden character as its
/// escape, as the text report and diagnostics do: a bidirectional override in a value
/// (JSON escapes controls, not U+202E) reorders the cell it is in.
#[test]
fn markdown_settings_show_hidden_characters_as_escapes() {
    let d = diff::PolicyDiff {
        from: "a".into(),
        to: "b".into(),
        sections: vec![diff::SectionDiff {
            section: "session".into(),
            settings_changed: vec![diff::SettingChange {
                setting: "cookie_domain".into(),
                before: None,
                after: Some("\"x\u{202e}moc.elpmaxe\"".into()),
                reach: None,
            }],
        }],
        issuers: vec![],
        routes: vec![],
    };
    let md = diff::render(&d, Format::Markdown);
    assert!(!md.contains('\u{202e}') && md.contains("x\\u202Emoc"), "{md}");
}

/// An allow narrowed by a condition while its `upstream_role` moves to a stronger role
/// was filed under "access lost" (narrowed): the callers it still admits now get
/// another database role, which is access gained. A rule whose upstream role changes
/// is never "narrowed": it may gain and lose access.
#[test]
fn diff_never_files_a_changed_upstream_role_under_access_lost() {
    let (dir, cfg) = setup_db(ORDERS);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let escalated = ORDERS.replace(
        "groups_any = [\"engineering\"]\ndatabases = [\"orders\"]\n",
        "groups_any = [\"engineering\"]\ndatabases = [\"orders\"]\nroles = [\"reporting\"]\nupstream_role = \"migrator\"\n",
    );
    assert_ne!(escalated, ORDERS);
    write(&root.join("policies/orders.toml"), &escalated);
    let c2 = commit(root, "engineers read as reporting only");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    assert_eq!(
        changes(&d),
        vec![("orders".into(), Access::Changed, "changed", "engineers-read".into())]
    );
}

/// `policy who --format markdown` (a Markdown format is for pull-request comments)
/// wrote each rule as the policy spells it: an allow whose description ends in `<!--`
/// hid every allow listed after it, and with them who else gets in. Its bullets are
/// escaped and shown in printable ASCII as `policy diff`'s are.
#[test]
fn who_markdown_cannot_hide_the_allows_after_a_crafted_description() {
    let crafted = API.replace(
        "groups_any = [\"engineering\"]\n",
        "groups_any = [\"engineering\"]\ndescription = \"Engineers. <!--\"\n",
    );
    let (_dir, cfg) = setup(&format!(
        "{crafted}\n[[rule]]\nid = \"everyone\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"\u{0435}ngineering\"]\n"
    ));
    let r = who::run(&WhoArgs {
        config: cfg,
        route: Some("api".into()),
        request: None,
        format: Format::Markdown,
    });
    assert_eq!(r.code, EXIT_OK, "{r:?}");
    assert!(!r.stdout.contains("<!--") && r.stdout.contains("&lt;!--"), "{}", r.stdout);
    assert!(r.stdout.contains("`\\u0435ngineering`"), "{}", r.stdout);
}

/// Both versions of an edited test are checked, but a flip was listed once per name,
/// request and caller: a pull request that rewrote a test (same name, request and
/// subject, other claims) so that its new version flips the other way had only that
/// version listed, "allow -> deny", and the old version's "deny -> allow" (the access
/// gained) went unsaid. Two flips are one only when they decide alike.
#[test]
fn a_rewritten_test_flipping_the_other_way_does_not_hide_the_old_flip() {
    let deny = "\n[[rule]]\nid = \"no-contractors\"\neffect = \"deny\"\nissuer = \"corp\"\ngroups_any = [\"contractors\"]\npaths = [\"/admin/**\"]\n";
    let test = |groups: &str, claims: &str, expect: &str| {
        format!("\n[[test]]\nname = \"alice on admin\"\nidentity = {{ issuer = \"corp\", subject = \"alice\", groups = [{groups}]{claims} }}\nrequest = \"GET /admin/x\"\nexpect = \"{expect}\"\n")
    };
    let before = format!(
        "{API}{deny}{}",
        test("\"engineering\", \"contractors\"", ", claims = { team = \"x\" }", "deny")
    );
    let (dir, cfg) = setup(&before);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let after = API.replace(
        "groups_any = [\"engineering\"]\n",
        "groups_any = [\"engineering\"]\nclaims = { team = \"x\" }\n",
    ) + &test("\"engineering\"", "", "deny");
    write(&root.join("policies/api.toml"), &after);
    let c2 = commit(root, "engineers of team x");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let flips = &d.routes[0].flipped_tests;
    assert!(flips.iter().any(|f| !f.before.allowed && f.after.allowed), "{flips:?}");
    assert!(flips.iter().any(|f| f.before.allowed && !f.after.allowed), "{flips:?}");
}

/// An extra test file runs against the policy named after it: `security/api.toml`
/// against `policies/api.toml`. A pull request that adds a route, ranked first, with a
/// policy of the same name elsewhere (`decoy/api.toml`, written to pass every case) had
/// the security team's file run against the decoy, so `policy test` stayed green while
/// the real policy was never tested. A name that is more than one policy (or a policy
/// and another policy's route) is refused.
#[test]
fn policy_test_refuses_a_test_file_whose_name_is_more_than_one_policy() {
    let (dir, cfg) = setup(API);
    let extra = dir.path().join("security");
    write(
        &extra.join("api.toml"),
        "[[test]]\nname = \"people cannot deploy\"\nidentity = { issuer = \"corp\", groups = [\"engineering\"] }\nrequest = \"DELETE /deploy/1\"\nexpect = \"deny\"\n",
    );
    // The real policy fails the security team's case.
    let r = test::run(&test_args(&cfg, vec![extra.clone()], Format::Text));
    assert_eq!(r.code, EXIT_FAILED, "{r:?}");
    write(
        &cfg,
        &format!("{CONFIG}\n[[routes]]\nname = \"decoy\"\nmatch = {{ host = \"zz.api.example.com\" }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"decoy/api.toml\"\n"),
    );
    write(&dir.path().join("decoy/api.toml"), "[[rule]]\nid = \"ci\"\neffect = \"allow\"\nissuer = \"bb\"\nci = { repository = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\", branch = \"main\" }\n");
    let r = test::run(&test_args(&cfg, vec![extra.clone()], Format::Text));
    assert_eq!(r.code, EXIT_BAD_INPUT, "{r:?}");
    assert!(
        r.stderr.contains("security/api.toml:1:1") && r.stderr.contains("more than one"),
        "{r:?}"
    );
}

/// The value of `setting` in the `settings_changed` of the JSON report's `list` entry
/// whose `field` is `name`: `(before, after, reach.access)`.
fn json_setting(
    v: &serde_json::Value,
    list: &str,
    field: &str,
    name: &str,
    setting: &str,
) -> (Option<String>, Option<String>, Option<String>) {
    let text = |x: &serde_json::Value| x.as_str().map(str::to_string);
    v[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e[field] == name)
        .flat_map(|e| e["settings_changed"].as_array().into_iter().flatten())
        .find(|c| c["setting"] == setting)
        .map(|c| (text(&c["before"]), text(&c["after"]), text(&c["reach"]["access"])))
        .unwrap_or_else(|| panic!("no {setting} for {list} {name}: {v:#}"))
}

/// How long access lasts and which upstream identity a database route logs in as were
/// missing from the report: `stale_window` and `max_session` were filed as availability,
/// an upstream role's credentials were not compared, and a `password_file`'s path was
/// hidden like a password. Each is a setting line now, followed by whether access widened
/// or narrowed where that is decidable (longer is wider; not set is no limit for
/// `max_token_age` and `max_session`, the default for the others), in every format; the
/// password files themselves are never read.
#[test]
fn diff_reports_how_long_access_lasts_and_which_credentials_a_database_route_uses() {
    let (dir, cfg) = setup_db(ORDERS);
    let root = dir.path();
    let initial = std::fs::read_to_string(&cfg)
        .unwrap_or_default()
        .replace(
            "audiences = [\"portcullis\"]",
            "audiences = [\"portcullis\"]\nmax_token_age = \"1h\"",
        )
        .replace("policy = \"orders\"\n", "policy = \"orders\"\nmax_session = \"8h\"\n")
        .replace("policy = \"api\"\n", "policy = \"api\"\nsingle_use_tokens = true\n")
        + "\n[session]\nkeys_env = \"PORTCULLIS_SESSION_KEYS\"\n";
    write(&cfg, &initial);
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    write(&root.join("secrets/admin"), "admin-password\n");
    let longer = initial
        .replace("max_token_age = \"1h\"", "stale_window = \"30d\"")
        .replace("max_session = \"8h\"", "max_session = \"24h\"")
        .replace("password_file = \"secrets/readonly\"", "password_file = \"secrets/admin\"")
        .replace(
            "[databases.upstream_roles.migrator]\npassword_file = \"secrets/migrator\"",
            "[databases.upstream_roles.migrator]\npassword_env = \"ORDERS_MIGRATOR_PASSWORD\"",
        )
        .replace("single_use_tokens = true\n", "")
        .replace(
            "PORTCULLIS_SESSION_KEYS\"\n",
            "PORTCULLIS_SESSION_KEYS\"\nabsolute_lifetime = \"7d\"\n",
        );
    assert_eq!(longer.matches("secrets/admin").count(), 1, "{longer}");
    write(&cfg, &longer);
    let c2 = commit(root, "longer, other credentials");

    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    let text = diff::render(&d, Format::Text);
    for line in [
        "  stale_window: (not set) -> \"30d\"\n    access widened: how long the issuer's last fetched keys stay trusted while it cannot be reached (one it has withdrawn meanwhile included): 24h (default) -> 30d\n",
        "  max_token_age: \"1h\" -> (not set)\n    access widened: how long after it was issued a token is accepted, and what it opened (a WebSocket tunnel, a database session, its assertion) goes on: 1h -> no limit (not set)\n",
        "  setting max_session: \"8h\" -> \"24h\"\n    access widened: how long a database session may stay open, whatever its token's lifetime: 8h -> 24h\n",
        "  setting password_file: \"secrets/readonly\" -> \"secrets/admin\"\n",
        "  setting upstream_roles.migrator: {\"password_file\": \"secrets/migrator\"} -> {\"password_env\": \"ORDERS_MIGRATOR_PASSWORD\"}\n",
        "  setting single_use_tokens: true -> (not set)\n    access widened: single_use_tokens off: a token may be presented again (replayed) for as long as it is valid\n",
        "  absolute_lifetime: (not set) -> \"7d\"\n    access widened: how long a browser session lasts before its user signs in again: 12h (default) -> 7d\n",
    ] {
        assert!(text.contains(line), "{line}\n---\n{text}");
    }
    let md = diff::render(&d, Format::Markdown);
    for line in [
        "| max_session | \"8h\" | \"24h\" |\n| password_file | \"secrets/readonly\" | \"secrets/admin\" |\n| upstream_roles.migrator | {\"password_file\": \"secrets/migrator\"} | {\"password_env\": \"ORDERS_MIGRATOR_PASSWORD\"} |\n\n- :unlock: **Access widened**: how long a database session may stay open, whatever its token's lifetime: 8h → 24h\n",
        "- :unlock: **Access widened**: how long the issuer's last fetched keys stay trusted while it cannot be reached (one it has withdrawn meanwhile included): 24h (default) → 30d\n",
        "- :unlock: **Access widened**: single_use_tokens off: a token may be presented again (replayed) for as long as it is valid\n",
        "- :unlock: **Access widened**: how long a browser session lasts before its user signs in again: 12h (default) → 7d\n",
    ] {
        assert!(md.contains(line), "{line}\n---\n{md}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&diff::render(&d, Format::Json)).unwrap_or_default();
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        json_setting(&json, "routes", "route", "orders", "max_session"),
        (some("\"8h\""), some("\"24h\""), some("widened"))
    );
    assert_eq!(
        json_setting(&json, "issuers", "issuer", "corp", "stale_window"),
        (None, some("\"30d\""), some("widened"))
    );
    assert_eq!(
        json_setting(&json, "routes", "route", "orders", "upstream_roles.migrator"),
        (
            some("{\"password_file\": \"secrets/migrator\"}"),
            some("{\"password_env\": \"ORDERS_MIGRATOR_PASSWORD\"}"),
            None
        )
    );
    for report in [&text, &md, &json.to_string()] {
        for password in ["ro-password", "mig-password", "admin-password"] {
            assert!(!report.contains(password), "{password}: {report}");
        }
    }

    // The other way: every one narrowed.
    let d = diff_of(&cfg, Some(&c2), Some(&c1));
    let text = diff::render(&d, Format::Text);
    for line in [
        "    access narrowed: how long the issuer's last fetched keys stay trusted while it cannot be reached (one it has withdrawn meanwhile included): 30d -> 24h (default)\n",
        "    access narrowed: how long after it was issued a token is accepted, and what it opened (a WebSocket tunnel, a database session, its assertion) goes on: no limit (not set) -> 1h\n",
        "    access narrowed: how long a database session may stay open, whatever its token's lifetime: 24h -> 8h\n",
        "    access narrowed: single_use_tokens on: a token seen before is refused on the route (no replay)\n",
        "    access narrowed: how long a browser session lasts before its user signs in again: 7d -> 12h (default)\n",
    ] {
        assert!(text.contains(line), "{line}\n---\n{text}");
    }
    assert!(!text.contains("access widened"), "{text}");
    let md = diff::render(&d, Format::Markdown);
    assert!(
        md.contains("- :lock: **Access narrowed**: how long a database session may stay open, whatever its token's lifetime: 24h → 8h\n"),
        "{md}"
    );

    // A role written as a value instead of a table may be its password: never shown.
    let inline = initial.replace(
        "[databases.upstream_roles.migrator]\n",
        "[databases.upstream_roles]\nreporter = \"hunter2-inline\"\n\n[databases.upstream_roles.migrator]\n",
    );
    assert_ne!(inline, initial);
    write(&cfg, &inline);
    let d = diff_of(&cfg, Some(&c1), None);
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("  setting upstream_roles.reporter: (not set) -> (hidden, "), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    // The same length respelt: a setting line, no direction.
    write(&cfg, &initial.replace("max_session = \"8h\"", "max_session = \"480m\""));
    let d = diff_of(&cfg, Some(&c1), None);
    let text = diff::render(&d, Format::Text);
    assert!(text.contains("  setting max_session: \"8h\" -> \"480m\"\n"), "{text}");
    assert!(!text.contains("access widened") && !text.contains("access narrowed"), "{text}");
}

/// A value under a key of an array of tables (`[[tls.sni]]`'s `key`) was printed as JSON
/// without being judged: a private key pasted there by mistake, in an old revision,
/// reached the pull-request comment. Each table of an array is judged as any other. A
/// credential key's path or variable name (`password_file`, `password_env`) is shown, so
/// a reviewer sees which credential is used, unless it reads like the secret itself.
#[test]
fn diff_never_shows_a_secret_pasted_in_an_array_of_tables_or_a_credential_key() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    // The start of a PEM private key (cut, no key at all), its armour spelt at run time so
    // that scans for committed keys do not take this file for one.
    let kind = "PRIVATE";
    let pem = format!(
        "-----BEGIN {kind} KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END {kind} KEY-----"
    );
    let config = format!(
        "{CONFIG}\n[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server-key.pem\"\n\n[[tls.sni]]\nserver_names = [\"api.example.com\"]\ncert = \"certs/api.pem\"\nkey = \"\"\"{pem}\"\"\"\n\n[redis]\nurl = \"redis://127.0.0.1\"\nusername = \"portcullis\"\npassword_file = \"/run/secrets/redis\"\n\n[issuers.corp.login]\nclient_id = \"portcullis\"\nclient_secret_env = \"hunter2hunter2\"\n"
    );
    write(&cfg, &config);
    let c2 = commit(root, "tls, redis, login");
    let d = diff_of(&cfg, Some(&c1), Some(&c2));
    for format in [Format::Text, Format::Markdown, Format::Json] {
        let report = diff::render(&d, format);
        assert!(!report.contains("MIGHAgEA") && !report.contains("BEGIN"), "{report}");
        assert!(!report.contains("hunter2"), "{report}");
        assert!(report.contains("certs/api.pem"), "the array is listed: {report}");
        assert!(report.contains("/run/secrets/redis"), "a file's path is shown: {report}");
        assert!(report.contains("(hidden, "), "{report}");
    }
}

/// A credential written into a URL (`user:password@` in a route's or a database route's
/// upstream, an issuer's discovery URL, the Redis URL; a password in a PostgreSQL URL's
/// query) is refused at load and never quoted by a diagnostic, but `policy diff` printed
/// it as the setting's or the database route's value, into the pull-request comment. It
/// is shown as a digest, as every secret is.
#[test]
fn diff_never_shows_a_credential_written_into_a_url() {
    let (dir, cfg) = setup_db(ORDERS);
    let root = dir.path();
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let initial = std::fs::read_to_string(&cfg).unwrap_or_default();
    let urls = initial
        .replace("http://127.0.0.1:1", "http://admin:S3cretHttp@127.0.0.1:1")
        .replace(
            "audiences = [\"portcullis\"]",
            "audiences = [\"portcullis\"]\ndiscovery_url = \"https://svc:S3cretIdp/x@idp.example.com/.well-known/openid-configuration\"",
        )
        .replace("postgres://db.internal", "postgres://app:S3cretPg@db.internal")
        + "\n[redis]\nurl = \"redis://u:S3cretRedis@127.0.0.1\"\n";
    write(&cfg, &urls);
    let d = diff_of(&cfg, Some(&c1), None);
    for format in [Format::Text, Format::Markdown, Format::Json] {
        let report = diff::render(&d, format);
        assert!(!report.contains("S3cret"), "{report}");
        for what in ["upstream", "discovery_url", "url", "to (hidden, "] {
            assert!(report.contains(what), "{what}: {report}");
        }
    }
    let query = initial.replace(":5432\"", ":5432/app?sslmode=disable&password=S3cretQuery\"");
    assert_ne!(query, initial);
    write(&cfg, &query);
    let report = diff::render(&diff_of(&cfg, Some(&c1), None), Format::Text);
    assert!(!report.contains("S3cret") && report.contains("to (hidden, "), "{report}");
}

/// The settings that decide whose tokens count say which way they moved, where that is
/// decidable: an issuer's `audiences` or `algorithms` grown (widened) or shrunk
/// (narrowed), its `hosted_domain` or `client_id` check removed (widened) or added
/// (narrowed), a route's `issuers` grown, shrunk, or removed (every issuer: widened).
/// Another set, or another value, is a setting line alone.
#[test]
fn diff_says_whether_an_issuers_checks_or_a_routes_issuers_widened_or_narrowed() {
    let (dir, cfg) = setup(API);
    let root = dir.path();
    let initial = CONFIG
        .replace(
            "audiences = [\"portcullis\"]",
            "audiences = [\"portcullis\"]\nhosted_domain = \"example.com\"",
        )
        .replace("policy = \"api\"\n", "policy = \"api\"\nissuers = [\"corp\", \"bb\"]\n");
    write(&cfg, &initial);
    git(root, &["init", "-q"]);
    git(root, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let c1 = commit(root, "initial");
    let wider = initial
        .replace(
            "audiences = [\"portcullis\"]\nhosted_domain = \"example.com\"",
            "audiences = [\"portcullis\", \"other-app\"]\nalgorithms = [\"RS256\", \"ES256\"]\nclient_id = \"portcullis\"",
        )
        .replace("issuers = [\"corp\", \"bb\"]\n", "");
    write(&cfg, &wider);
    let c2 = commit(root, "wider");
    let text = diff::render(&diff_of(&cfg, Some(&c1), Some(&c2)), Format::Text);
    for line in [
        "  algorithms: (not set) -> [\"RS256\",\"ES256\"]\n    access widened: the algorithms a token may be signed with: added \"ES256\"\n",
        "  audiences: [\"portcullis\"] -> [\"portcullis\",\"other-app\"]\n    access widened: the audiences a token may be issued for: added \"other-app\"\n",
        "  client_id: (not set) -> \"portcullis\"\n    access narrowed: client_id set: a token's authorized party (azp), when present, must be this client\n",
        "  hosted_domain: \"example.com\" -> (not set)\n    access widened: hosted_domain removed: a Google token need no longer carry the Workspace domain (hd) nor a verified email\n",
        "  setting issuers: [\"corp\",\"bb\"] -> (not set)\n    access widened: the issuers whose tokens and sessions the route accepts: every one (not set), was \"bb\", \"corp\"\n",
    ] {
        assert!(text.contains(line), "{line}\n---\n{text}");
    }
    let md = diff::render(&diff_of(&cfg, Some(&c2), Some(&c1)), Format::Markdown);
    for line in [
        "- :lock: **Access narrowed**: the algorithms a token may be signed with: removed \"ES256\"\n",
        "- :lock: **Access narrowed**: the audiences a token may be issued for: removed \"other-app\"\n",
        "- :unlock: **Access widened**: client_id removed: a token issued to another client (azp) is accepted\n",
        "- :lock: **Access narrowed**: hosted_domain set: a Google token must carry this Workspace domain (hd) and a verified email\n",
        "- :lock: **Access narrowed**: the issuers whose tokens and sessions the route accepts: only \"bb\", \"corp\", was every one (not set)\n",
    ] {
        assert!(md.contains(line), "{line}\n---\n{md}");
    }

    // Another audience instead of one, one route issuer for another: no direction.
    let other = initial
        .replace("audiences = [\"portcullis\"]", "audiences = [\"other-app\"]")
        .replace("issuers = [\"corp\", \"bb\"]", "issuers = [\"corp\", \"gh\"]");
    write(&cfg, &other);
    let text = diff::render(&diff_of(&cfg, Some(&c1), None), Format::Text);
    assert!(text.contains("  audiences: [\"portcullis\"] -> [\"other-app\"]\n"), "{text}");
    assert!(text.contains("  setting issuers: [\"corp\",\"bb\"] -> [\"corp\",\"gh\"]\n"), "{text}");
    assert!(!text.contains("access widened") && !text.contains("access narrowed"), "{text}");
}
