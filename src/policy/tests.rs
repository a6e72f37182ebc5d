//! Table-driven tests: evaluation, every diagnostic and lint, `[[test]]` runner.

use super::*;
use crate::identity::{CiContext, IssuerId, PrincipalKind};
use serde_json::{json, Map, Value};

const BB_REPO: &str = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}";

fn catalog() -> Catalog {
    let mut catalog = Catalog::default();
    catalog.declare("bitbucket", Preset::BitbucketPipelines);
    catalog.declare("github", Preset::GithubActions);
    catalog.declare("gitlab", Preset::GitlabCi);
    catalog.declare("corp", Preset::Oidc);
    catalog
}

fn parse(text: &str) -> Result<Policy, Vec<String>> {
    let source = Source::new("p.toml", text);
    Policy::parse(&source, &catalog())
        .map_err(|d| d.into_sorted().iter().map(|d| d.to_string()).collect())
}

fn must_parse(text: &str) -> Policy {
    match parse(text) {
        Ok(p) => p,
        Err(e) => panic!("policy should compile:\n{}", e.join("\n")),
    }
}

// === identities ===

fn identity(issuer: &str, preset: Preset, claims: Value) -> Identity {
    let mut claims: Map<String, Value> = match claims {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // The verifier requires each CI preset's repository id (V20); tests that do not
    // care about it get a placeholder.
    if let Some(required) = crate::identity::ci::required_claim(preset) {
        claims.entry(required).or_insert_with(|| Value::String("1".into()));
    }
    let str_claim = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
    Identity {
        issuer: IssuerId(Arc::from(issuer)),
        subject: str_claim("sub").unwrap_or_else(|| "someone".into()),
        kind: preset.default_kind(),
        email: str_claim("email"),
        email_verified: claims.get("email_verified") == Some(&Value::Bool(true)),
        groups: claims
            .get("groups")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default(),
        groups_known: claims.get("_overage").is_none(),
        expires_at: u64::MAX,
        issued_at: None,
        ci: crate::identity::ci::normalize(preset, &claims).ok().flatten(),
        claims: claims.into(),
        audit: Default::default(),
    }
}

fn human(claims: Value) -> Identity {
    identity("corp", Preset::Oidc, claims)
}

fn bitbucket(repo: &str, branch: &str) -> Identity {
    identity(
        "bitbucket",
        Preset::BitbucketPipelines,
        json!({ "sub": format!("{repo}:{{step}}"), "repositoryUuid": repo, "workspaceUuid": "{ws}", "branchName": branch }),
    )
}

fn gitlab(claims: Value) -> Identity {
    identity("gitlab", Preset::GitlabCi, claims)
}

fn github(claims: Value) -> Identity {
    identity("github", Preset::GithubActions, claims)
}

// === evaluation ===

const EVAL_POLICY: &str = r#"
[[rule]]
id = "humans-read"
effect = "allow"
issuer = "corp"
email_domain = ["acme.example"]
methods = ["GET", "HEAD"]

[[rule]]
id = "sre-all"
effect = "allow"
issuer = "corp"
groups_any = ["sre"]

[[rule]]
id = "release-managers"
effect = "allow"
issuer = "corp"
groups_all = ["release", "oncall"]
paths = ["/release/**"]

[[rule]]
id = "contractor-docs"
effect = "allow"
issuer = "corp"
email = "*@contractors.example"
paths = ["/docs/*"]

[[rule]]
id = "alice"
effect = "allow"
issuer = "corp"
subject = "00u-alice"
paths = ["/alice/**"]

[[rule]]
id = "bb-deploy"
effect = "allow"
issuer = "bitbucket"
methods = ["POST"]
paths = ["/deploy/*"]
ci = { repository = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branch = ["main", "release/*"] }

[[rule]]
id = "gl-protected"
effect = "allow"
issuer = "gitlab"
claims = { namespace_id = "72", ref_protected = "true", runner_id = 1 }
paths = ["/gitlab/**"]

[[rule]]
id = "gh-production"
effect = "allow"
issuer = "github"
claims = { repository_owner_id = ["65", "66"] }
ci = { environment = "production" }
paths = ["/gh/**"]

[[rule]]
id = "no-deletes-from-ci"
effect = "deny"
issuer = ["bitbucket", "github", "gitlab"]
methods = ["DELETE"]

[[rule]]
id = "no-admin-for-interns"
effect = "deny"
issuer = "corp"
groups_any = ["interns"]
paths = ["/admin/**"]

[[rule]]
id = "db-migrate"
effect = "allow"
issuer = "bitbucket"
databases = ["app*"]
roles = ["migrator"]
ci = { repository = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branch = "main" }
upstream_role = "migrator"
"#;

enum Req {
    Http(&'static str, &'static str),
    Db(&'static str, Option<&'static str>),
}

#[test]
fn evaluation_table() {
    let policy = must_parse(EVAL_POLICY);
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    let acme = |extra: Value| {
        let mut base =
            json!({ "sub": "00u-jane", "email": "jane@acme.example", "email_verified": true });
        if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
            b.extend(e);
        }
        human(base)
    };
    use Reason::{Allowed, DeniedByRule, GroupsUnknown, PolicyDenied};
    use Req::{Db, Http};
    #[rustfmt::skip]
    let cases: Vec<(&str, Identity, Req, Reason, Option<&str>)> = vec![
        ("verified domain may read", acme(json!({})), Http("GET", "/x"), Allowed, Some("humans-read")),
        ("HEAD is listed too", acme(json!({})), Http("HEAD", "/x"), Allowed, Some("humans-read")),
        ("but may not write", acme(json!({})), Http("POST", "/x"), PolicyDenied, None),
        ("unverified email never matches", acme(json!({ "email_verified": false })), Http("GET", "/x"), PolicyDenied, None),
        ("email_verified must be a real boolean", acme(json!({ "email_verified": "true" })), Http("GET", "/x"), PolicyDenied, None),
        ("email_domain is exact", acme(json!({ "email": "jane@sub.acme.example" })), Http("GET", "/x"), PolicyDenied, None),
        ("email_domain ignores ASCII case", acme(json!({ "email": "jane@ACME.example" })), Http("GET", "/x"), Allowed, Some("humans-read")),
        ("groups_any", acme(json!({ "groups": ["x", "sre"] })), Http("POST", "/x"), Allowed, Some("sre-all")),
        ("groups_all needs every group", acme(json!({ "groups": ["release"] })), Http("POST", "/release/1"), PolicyDenied, None),
        ("groups_all satisfied", acme(json!({ "groups": ["oncall", "release"] })), Http("POST", "/release/1/x"), Allowed, Some("release-managers")),
        ("overage: allow without groups still matches", acme(json!({ "_overage": true })), Http("GET", "/x"), Allowed, Some("humans-read")),
        ("overage: allow with groups is skipped", acme(json!({ "_overage": true, "groups": ["sre"] })), Http("POST", "/x"), GroupsUnknown, Some("sre-all")),
        ("overage: deny with groups applies", acme(json!({ "_overage": true })), Http("GET", "/admin/users"), DeniedByRule, Some("no-admin-for-interns")),
        ("deny wins over an earlier allow", acme(json!({ "groups": ["sre", "interns"] })), Http("GET", "/admin/users"), DeniedByRule, Some("no-admin-for-interns")),
        ("deny needs its other conditions", acme(json!({ "groups": ["sre", "interns"] })), Http("GET", "/adminx"), Allowed, Some("humans-read")),
        ("a deny on /admin/** covers /admin itself", acme(json!({ "groups": ["sre", "interns"] })), Http("GET", "/admin"), DeniedByRule, Some("no-admin-for-interns")),
        ("email glob", human(json!({ "email": "bob@contractors.example", "email_verified": true })), Http("PUT", "/docs/a"), Allowed, Some("contractor-docs")),
        ("email glob, * stops at /", human(json!({ "email": "bob@contractors.example", "email_verified": true })), Http("PUT", "/docs/a/b"), PolicyDenied, None),
        ("email glob, unverified", human(json!({ "email": "bob@contractors.example" })), Http("PUT", "/docs/a"), PolicyDenied, None),
        ("subject exact", human(json!({ "sub": "00u-alice" })), Http("DELETE", "/alice/a/b"), Allowed, Some("alice")),
        ("subject exact, not prefix", human(json!({ "sub": "00u-alicex" })), Http("DELETE", "/alice/a/b"), PolicyDenied, None),
        ("bitbucket main deploys", bitbucket(BB_REPO, "main"), Http("POST", "/deploy/42"), Allowed, Some("bb-deploy")),
        ("bitbucket release/* deploys", bitbucket(BB_REPO, "release/1.2"), Http("POST", "/deploy/42"), Allowed, Some("bb-deploy")),
        ("bitbucket release/a/b does not", bitbucket(BB_REPO, "release/a/b"), Http("POST", "/deploy/42"), PolicyDenied, None),
        ("bitbucket feature branch does not", bitbucket(BB_REPO, "feature/x"), Http("POST", "/deploy/42"), PolicyDenied, None),
        ("other repository does not", bitbucket("{other}", "main"), Http("POST", "/deploy/42"), PolicyDenied, None),
        ("method must match", bitbucket(BB_REPO, "main"), Http("GET", "/deploy/42"), PolicyDenied, None),
        ("path * is one segment", bitbucket(BB_REPO, "main"), Http("POST", "/deploy/42/x"), PolicyDenied, None),
        ("CI deletes are denied", bitbucket(BB_REPO, "main"), Http("DELETE", "/deploy/42"), DeniedByRule, Some("no-deletes-from-ci")),
        ("a human is not a pipeline", human(json!({ "sub": "x", "repositoryUuid": BB_REPO, "branchName": "main" })), Http("POST", "/deploy/42"), PolicyDenied, None),
        ("typed claims: string, string, integer", gitlab(json!({ "namespace_id": "72", "ref_protected": "true", "runner_id": 1 })), Http("GET", "/gitlab/x"), Allowed, Some("gl-protected")),
        ("typed claims: true is not \"true\"", gitlab(json!({ "namespace_id": "72", "ref_protected": true, "runner_id": 1 })), Http("GET", "/gitlab/x"), PolicyDenied, None),
        ("typed claims: \"1\" is not 1", gitlab(json!({ "namespace_id": "72", "ref_protected": "true", "runner_id": "1" })), Http("GET", "/gitlab/x"), PolicyDenied, None),
        ("typed claims: 72 is not \"72\"", gitlab(json!({ "namespace_id": 72, "ref_protected": "true", "runner_id": 1 })), Http("GET", "/gitlab/x"), PolicyDenied, None),
        ("absent claim never matches", gitlab(json!({ "namespace_id": "72", "runner_id": 1 })), Http("GET", "/gitlab/x"), PolicyDenied, None),
        ("claim list is any-of", github(json!({ "repository_owner_id": "66", "environment": "production" })), Http("POST", "/gh/x"), Allowed, Some("gh-production")),
        ("claim list, none matches", github(json!({ "repository_owner_id": "67", "environment": "production" })), Http("POST", "/gh/x"), PolicyDenied, None),
        ("absent ci field never matches", github(json!({ "repository_owner_id": "65" })), Http("POST", "/gh/x"), PolicyDenied, None),
        ("database and role", bitbucket(BB_REPO, "main"), Db("app_prod", Some("migrator")), Allowed, Some("db-migrate")),
        ("database glob", bitbucket(BB_REPO, "main"), Db("other", Some("migrator")), PolicyDenied, None),
        ("role must match", bitbucket(BB_REPO, "main"), Db("app", Some("admin")), PolicyDenied, None),
        ("role required when the rule names roles", bitbucket(BB_REPO, "main"), Db("app", None), PolicyDenied, None),
        ("HTTP rules never match database sessions", acme(json!({})), Db("app", Some("reader")), PolicyDenied, None),
        ("database rules never match HTTP", bitbucket(BB_REPO, "main"), Http("POST", "/app"), PolicyDenied, None),
        ("rules without request conditions match databases", acme(json!({ "groups": ["sre"] })), Db("app", Some("x")), Allowed, Some("sre-all")),
    ];
    for (name, id, req, reason, rule) in cases {
        let method;
        let facts = match req {
            Http(m, path) => {
                method = http::Method::from_bytes(m.as_bytes()).unwrap_or_default();
                RequestFacts::http(&method, path)
            }
            Db(db, role) => RequestFacts::database(db, role),
        };
        let d = policy.evaluate(&id, &facts);
        assert_eq!(d.reason, reason, "{name}");
        assert_eq!(d.allowed, reason == Allowed, "{name}");
        assert_eq!(d.rule.as_ref().map(|r| &*r.id), rule, "{name}");
        // explain agrees with evaluate and covers every rule.
        let e = policy.explain(&id, &facts);
        assert_eq!(e.decision, d, "{name}");
        assert_eq!(e.rules.len(), policy.rules().len(), "{name}");
    }
}

// === GET admits HEAD ===

const METHODS_POLICY: &str = r#"
[[rule]]
id = "read-status"
effect = "allow"
issuer = "corp"
methods = ["GET"]
paths = ["/status/**"]

[[rule]]
id = "probe-only"
effect = "allow"
issuer = "corp"
methods = ["HEAD"]
paths = ["/probe/**"]

[[rule]]
id = "everything-else"
effect = "allow"
issuer = "corp"
paths = ["/secret/**", "/quiet/**"]

[[rule]]
id = "no-secret-reads"
effect = "deny"
issuer = "corp"
methods = ["GET"]
paths = ["/secret/**"]

[[rule]]
id = "no-quiet-probes"
effect = "deny"
issuer = "corp"
methods = ["HEAD"]
paths = ["/quiet/**"]
"#;

/// `GET` in `methods` also matches `HEAD` (frameworks run `HEAD` through the `GET`
/// handler), in allows and denies alike; nothing else is implied.
#[test]
fn get_in_methods_also_matches_head() {
    let p = must_parse(METHODS_POLICY);
    let id = human(json!({}));
    use Reason::{Allowed, DeniedByRule, PolicyDenied};
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, Reason, Option<&str>)] = &[
        ("a deny of GET denies GET", "GET", "/secret/payroll", DeniedByRule, Some("no-secret-reads")),
        ("a deny of GET denies HEAD", "HEAD", "/secret/payroll", DeniedByRule, Some("no-secret-reads")),
        ("near miss: a deny of GET leaves POST", "POST", "/secret/payroll", Allowed, Some("everything-else")),
        ("near miss: a deny of GET leaves OPTIONS", "OPTIONS", "/secret/payroll", Allowed, Some("everything-else")),
        ("an allow of GET allows GET", "GET", "/status/x", Allowed, Some("read-status")),
        ("an allow of GET allows HEAD", "HEAD", "/status/x", Allowed, Some("read-status")),
        ("near miss: an allow of GET does not allow POST", "POST", "/status/x", PolicyDenied, None),
        ("HEAD does not imply GET in an allow", "GET", "/probe/x", PolicyDenied, None),
        ("an allow of HEAD allows HEAD", "HEAD", "/probe/x", Allowed, Some("probe-only")),
        ("HEAD does not imply GET in a deny", "GET", "/quiet/x", Allowed, Some("everything-else")),
        ("a deny of HEAD denies HEAD", "HEAD", "/quiet/x", DeniedByRule, Some("no-quiet-probes")),
    ];
    for (name, method, path, reason, rule) in cases {
        let m = http::Method::from_bytes(method.as_bytes()).unwrap_or_default();
        let facts = RequestFacts::http(&m, path);
        let d = p.evaluate(&id, &facts);
        assert_eq!((d.reason, d.rule.as_ref().map(|r| &*r.id)), (*reason, *rule), "{name}");
        assert_eq!(p.explain(&id, &facts).decision, d, "{name}: explain agrees");
    }
    // Never onto a database session.
    let d = p.evaluate(&id, &RequestFacts::database("secret", Some("x")));
    assert_eq!(d.reason, PolicyDenied);
    // The rule in words says so; a list that names HEAD itself is left as written.
    let words = |id: &str| {
        let rule = p.rules().iter().find(|r| r.id() == id);
        rule.map(|r| r.summary(&catalog()).what_phrase()).unwrap_or_default()
    };
    assert_eq!(words("no-secret-reads"), "`GET` or `HEAD` requests to paths matching `/secret/**`");
    assert_eq!(words("probe-only"), "`HEAD` requests to paths matching `/probe/**`");
    let both = must_parse(
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = [\"POST\", \"GET\", \"HEAD\"]\n",
    );
    assert_eq!(
        both.rules()[0].summary(&catalog()).what_phrase(),
        "`POST`, `GET` or `HEAD` requests"
    );
}

/// A `[[test]]` of `HEAD` sees what the proxy does: a policy whose only test is for
/// `GET` no longer hides a `HEAD` that gets through.
#[test]
fn policy_tests_run_head_through_get_rules() {
    let text = format!(
        "{METHODS_POLICY}\n[[test]]\nname = \"no HEAD of secrets\"\nidentity = {{ issuer = \"corp\" }}\nrequest = \"HEAD /secret/payroll\"\nexpect = \"deny\"\nrule = \"no-secret-reads\"\n\n[[test]]\nname = \"curl -I of status\"\nidentity = {{ issuer = \"corp\" }}\nrequest = \"HEAD /status/x\"\nexpect = \"allow\"\nrule = \"read-status\"\n"
    );
    let p = must_parse(&text);
    let failures: Vec<String> =
        run_tests(&p).iter().filter(|o| !o.passed()).map(ToString::to_string).collect();
    assert!(failures.is_empty(), "{failures:?}");
}

/// A deny that covers an allow's `HEAD` through `GET` makes that allow dead.
#[test]
fn an_allow_of_head_is_shadowed_by_a_deny_of_get() {
    let p = must_parse(
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = [\"HEAD\"]\npaths = \"/x/*\"\n[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"corp\"\nmethods = [\"GET\"]\npaths = \"/x/**\"\n",
    );
    let warnings: Vec<String> = p.warnings().iter().map(ToString::to_string).collect();
    assert!(
        warnings.iter().any(|w| w.contains("allow rule `a` can never match: deny rule `d`")),
        "{warnings:?}"
    );
    // Near miss: a deny of HEAD does not cover an allow of GET.
    let p = must_parse(
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = [\"GET\"]\npaths = \"/x/*\"\n[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"corp\"\nmethods = [\"HEAD\"]\npaths = \"/x/**\"\n",
    );
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

// === email conditions in denies ===

const EMAIL_DENY_POLICY: &str = r#"
[[rule]]
id = "staff"
effect = "allow"
issuer = "corp"
paths = ["/secret/**"]

[[rule]]
id = "verified-contractors"
effect = "allow"
issuer = "corp"
email_domain = "contractors.example"
paths = ["/docs/**"]

[[rule]]
id = "no-contractor-secrets"
effect = "deny"
issuer = "corp"
email_domain = "contractors.example"
paths = ["/secret/**"]

[[rule]]
id = "no-bob"
effect = "deny"
issuer = "corp"
email = "bob@*"
paths = ["/secret/bob/**"]
"#;

/// A deny on `email`/`email_domain` reads the email the token claims, verified or
/// not (fail closed); an allow still needs a verified one.
#[test]
fn email_denies_apply_to_unverified_emails() {
    let p = must_parse(EMAIL_DENY_POLICY);
    let who = |email: Option<&str>, verified: Option<Value>| {
        let mut c = json!({ "sub": "bob-contractor" });
        if let (Some(m), Some(e)) = (c.as_object_mut(), email) {
            m.insert("email".into(), json!(e));
        }
        if let (Some(m), Some(v)) = (c.as_object_mut(), verified) {
            m.insert("email_verified".into(), v);
        }
        human(c)
    };
    let get = http::Method::GET;
    let at = |path| RequestFacts::http(&get, path);
    let bob = "bob@contractors.example";
    use Reason::{Allowed, DeniedByRule, PolicyDenied};
    #[rustfmt::skip]
    let cases: Vec<(&str, Identity, &str, Reason, Option<&str>)> = vec![
        ("verified contractor denied", who(Some(bob), Some(json!(true))), "/secret/x", DeniedByRule, Some("no-contractor-secrets")),
        ("unverified contractor denied", who(Some(bob), Some(json!(false))), "/secret/x", DeniedByRule, Some("no-contractor-secrets")),
        ("email_verified absent (Entra): denied", who(Some(bob), None), "/secret/x", DeniedByRule, Some("no-contractor-secrets")),
        ("email_verified a string: denied", who(Some(bob), Some(json!("false"))), "/secret/x", DeniedByRule, Some("no-contractor-secrets")),
        ("domain in upper case, unverified: denied", who(Some("bob@CONTRACTORS.example"), None), "/secret/x", DeniedByRule, Some("no-contractor-secrets")),
        ("near miss: a subdomain is another domain", who(Some("bob@x.contractors.example"), None), "/secret/x", Allowed, Some("staff")),
        ("near miss: another domain, unverified", who(Some("bob@acme.example"), None), "/secret/x", Allowed, Some("staff")),
        ("no email claim at all: the deny does not apply", who(None, None), "/secret/x", Allowed, Some("staff")),
        ("email glob deny, unverified", who(Some("Bob@acme.example"), Some(json!(false))), "/secret/bob/1", DeniedByRule, Some("no-bob")),
        ("near miss: email glob deny, other user", who(Some("rob@acme.example"), Some(json!(false))), "/secret/bob/1", Allowed, Some("staff")),
        ("an allow still needs a verified email", who(Some(bob), Some(json!(false))), "/docs/a", PolicyDenied, None),
        ("an allow with email_verified absent", who(Some(bob), None), "/docs/a", PolicyDenied, None),
        ("an allow with a verified email", who(Some(bob), Some(json!(true))), "/docs/a", Allowed, Some("verified-contractors")),
    ];
    for (name, id, path, reason, rule) in cases {
        let d = p.evaluate(&id, &at(path));
        assert_eq!((d.reason, d.rule.as_ref().map(|r| &*r.id)), (reason, rule), "{name}");
        assert_eq!(p.explain(&id, &at(path)).decision, d, "{name}: explain agrees");
    }

    // explain: the deny matched; the allow says why an unverified email did not count,
    // and a deny that did not match says it read the unverified email anyway.
    let e = p.explain(&who(Some(bob), None), &at("/docs/a"));
    let trace = |id: &str| e.rules.iter().find(|t| &*t.rule.id == id).map(|t| t.outcome.clone());
    match trace("verified-contractors") {
        Some(TraceOutcome::NotMatched { first, .. }) => {
            assert_eq!(first.condition, "email_domain");
            assert_eq!(
                first.actual,
                "\"bob@contractors.example\" (not verified: an allow reads only a verified email)"
            );
        }
        other => panic!("{other:?}"),
    }
    let e = p.explain(&who(Some("bob@acme.example"), None), &at("/secret/x"));
    match e.rules.iter().find(|t| &*t.rule.id == "no-contractor-secrets").map(|t| &t.outcome) {
        Some(TraceOutcome::NotMatched { first, .. }) => {
            assert_eq!(first.actual, "\"bob@acme.example\" (not verified, which a deny reads too)");
        }
        other => panic!("{other:?}"),
    }
    let e = p.explain(&who(Some(bob), None), &at("/secret/x"));
    assert!(e.to_string().contains("deny  `no-contractor-secrets`: matched"), "{e}");

    // `who` words: the deny's email is any email, the allow's a verified one.
    let words = |id: &str| {
        let rule = p.rules().iter().find(|r| r.id() == id);
        rule.map(|r| r.summary(&catalog()).who_phrase()).unwrap_or_default()
    };
    assert_eq!(
        words("no-contractor-secrets"),
        "people and services of `corp` (oidc) whose email (verified or not) domain is `contractors.example`"
    );
    assert_eq!(
        words("verified-contractors"),
        "people and services of `corp` (oidc) whose verified email domain is `contractors.example`"
    );
}

/// `[[test]]` identities get the same treatment: `email_verified = false` is denied.
#[test]
fn policy_tests_see_email_denies_on_unverified_emails() {
    let text = format!(
        "{EMAIL_DENY_POLICY}\n[[test]]\nname = \"unverified contractor\"\nidentity = {{ issuer = \"corp\", email = \"bob@contractors.example\", email_verified = false }}\nrequest = \"GET /secret/x\"\nexpect = \"deny\"\nrule = \"no-contractor-secrets\"\n"
    );
    let p = must_parse(&text);
    let failures: Vec<String> =
        run_tests(&p).iter().filter(|o| !o.passed()).map(ToString::to_string).collect();
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn default_deny_with_no_rules() {
    let p = must_parse("");
    let d = p.evaluate(&human(json!({})), &RequestFacts::http(&http::Method::GET, "/"));
    assert_eq!((d.allowed, d.reason, d.rule), (false, Reason::PolicyDenied, None));
}

#[test]
fn first_matching_allow_decides() {
    let p = must_parse(
        r#"
[[rule]]
id = "a"
effect = "allow"
issuer = "corp"
paths = ["/x/**"]

[[rule]]
id = "b"
effect = "allow"
issuer = "corp"
"#,
    );
    let id = human(json!({}));
    let get = http::Method::GET;
    assert_eq!(
        p.evaluate(&id, &RequestFacts::http(&get, "/x/1")).rule.map(|r| r.id.clone()),
        Some("a".into())
    );
    assert_eq!(
        p.evaluate(&id, &RequestFacts::http(&get, "/y")).rule.map(|r| r.id.clone()),
        Some("b".into())
    );
}

#[test]
fn rule_refs_carry_file_and_line_and_serialize() {
    let p = must_parse(EVAL_POLICY);
    let id = bitbucket(BB_REPO, "main");
    let post = http::Method::POST;
    let d = p.evaluate(&id, &RequestFacts::http(&post, "/deploy/1"));
    let r = d.rule.clone().unwrap_or_else(|| {
        Arc::new(RuleRef { id: "".into(), file: Arc::from(Path::new("")), line: 0 })
    });
    assert_eq!((&*r.id, r.line), ("bb-deploy", 36));
    assert_eq!(r.file.to_str(), Some("p.toml"));
    let json = serde_json::to_value(&d).unwrap_or_default();
    assert_eq!(
        json,
        json!({ "allowed": true, "reason": "allowed", "rule": { "id": "bb-deploy", "file": "p.toml", "line": 36 } })
    );
}

#[test]
fn explain_names_every_failed_condition() {
    let p = must_parse(EVAL_POLICY);
    let id = bitbucket(BB_REPO, "feature/x");
    let post = http::Method::POST;
    let e = p.explain(&id, &RequestFacts::http(&post, "/deploy/42"));
    let outcome = |e: &Explanation, id: &str| {
        e.rules.iter().find(|t| &*t.rule.id == id).map(|t| t.outcome.clone())
    };
    let branch = FailedCondition {
        condition: "ci.branch".into(),
        line: 42,
        col: 63,
        expected: "ci.branch = [\"main\", \"release/*\"]".into(),
        actual: "\"feature/x\"".into(),
    };
    match outcome(&e, "bb-deploy") {
        Some(TraceOutcome::NotMatched { first, failed }) => {
            assert_eq!(first, branch);
            assert_eq!(failed, vec![branch.clone()]);
        }
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    assert!(text.starts_with("decision: deny (policy-denied)"), "{text}");
    assert!(
        text.contains(
            "p.toml:36: allow `bb-deploy`: no match at 42:63: ci.branch = [\"main\", \"release/*\"], got \"feature/x\"\n"
        ),
        "{text}"
    );

    // Two conditions fail: both are named, in file order, so one run says everything
    // to change; the first the proxy stops at stays in `first`.
    let get = http::Method::GET;
    let e = p.explain(&id, &RequestFacts::http(&get, "/deploy/42"));
    match outcome(&e, "bb-deploy") {
        Some(TraceOutcome::NotMatched { first, failed }) => {
            let labels: Vec<&str> = failed.iter().map(|c| c.condition.as_str()).collect();
            assert_eq!(labels, ["methods", "ci.branch"]);
            assert_eq!(failed[0].actual, "\"GET\"");
            assert_eq!(failed[1], branch);
            assert!(failed.contains(&first), "{first:?}");
        }
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains(concat!(
            "  p.toml:36: allow `bb-deploy`: no match on 2 conditions:\n",
            "      at 40:11: methods = [\"POST\"], got \"GET\"\n",
            "      at 42:63: ci.branch = [\"main\", \"release/*\"], got \"feature/x\"\n",
        )),
        "{text}"
    );
    let json = serde_json::to_value(&e).unwrap_or_default();
    let bb =
        json["rules"].as_array().and_then(|r| r.iter().find(|t| t["rule"]["id"] == "bb-deploy"));
    let bb = bb.cloned().unwrap_or_default();
    assert_eq!(bb["outcome"]["result"], "not-matched", "{bb}");
    assert_eq!(bb["outcome"]["failed"][1]["condition"], "ci.branch", "{bb}");
    assert!(bb["outcome"]["condition"].is_string(), "the first stays flattened: {bb}");

    // Another issuer's rule: only the issuer is named, not every condition that a
    // token of that issuer would have to meet.
    match outcome(&e, "sre-all") {
        Some(TraceOutcome::NotMatched { failed, .. }) => {
            let labels: Vec<&str> = failed.iter().map(|c| c.condition.as_str()).collect();
            assert_eq!(labels, ["issuer"]);
        }
        other => panic!("{other:?}"),
    }

    // Groups known: a failed group condition is named beside the others.
    let alice = human(json!({ "groups": ["release"] }));
    let e = p.explain(&alice, &RequestFacts::http(&get, "/x"));
    match outcome(&e, "release-managers") {
        Some(TraceOutcome::NotMatched { failed, .. }) => {
            let labels: Vec<&str> = failed.iter().map(|c| c.condition.as_str()).collect();
            assert_eq!(labels, ["groups_all", "paths"]);
        }
        other => panic!("{other:?}"),
    }
    // Overage: the group conditions cannot be judged, the others still are.
    let id = human(json!({ "_overage": true }));
    let e = p.explain(&id, &RequestFacts::http(&post, "/x"));
    assert!(matches!(outcome(&e, "sre-all"), Some(TraceOutcome::GroupsUnknown)));
    assert_eq!(e.decision.reason, Reason::GroupsUnknown);
    match outcome(&e, "release-managers") {
        Some(TraceOutcome::NotMatched { failed, .. }) => {
            let labels: Vec<&str> = failed.iter().map(|c| c.condition.as_str()).collect();
            assert_eq!(labels, ["paths"]);
        }
        other => panic!("{other:?}"),
    }
}

/// A browser session's identity knows which claims it kept: a deny on a `claims.*`
/// condition it did not keep applies (fail closed, as for unknown groups), an allow on
/// one does not match, and the decision, its detail and `explain` say why.
#[test]
fn a_claim_the_session_did_not_keep_fails_closed() {
    let p = must_parse(
        r#"
[[rule]]
id = "engineering"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]

[[rule]]
id = "no-guest-admin"
effect = "deny"
issuer = "corp"
paths = ["/admin/**"]
claims = { acct = 1 }

[[rule]]
id = "no-mallory"
effect = "deny"
issuer = "corp"
claims = { name = "mallory" }

[[rule]]
id = "contractors-read"
effect = "allow"
issuer = "corp"
methods = ["GET"]
claims = { acct = 1 }
"#,
    );
    let get = http::Method::GET;
    let get_x = RequestFacts::http(&get, "/x");
    let session = |kept: &[&str], claims: Value| {
        let mut id = human(claims);
        let map = id.claims.map().clone();
        id.claims = crate::identity::Claims::kept_only(map, kept.iter().copied());
        id
    };
    let base = ["sub", "email", "email_verified", "groups"];
    // A token (every claim known): the deny matches on the value only.
    let token = human(json!({ "sub": "mallory", "name": "mallory", "groups": ["engineering"] }));
    assert_eq!(p.evaluate(&token, &get_x).reason, Reason::DeniedByRule);
    let token = human(json!({ "sub": "alice", "groups": ["engineering"] }));
    let d = p.evaluate(&token, &get_x);
    assert!(d.allowed && d.claim_not_kept.is_none(), "{d:?}");

    // A session that kept `name`: the same decisions as for the token.
    let mallory = session(
        &[&base[..], &["name"]].concat(),
        json!({ "sub": "mallory", "name": "mallory", "groups": ["engineering"] }),
    );
    let d = p.evaluate(&mallory, &get_x);
    assert_eq!((d.reason, d.claim_not_kept.as_deref()), (Reason::DeniedByRule, None));
    assert_eq!(d.detail(), "denied by policy");
    let alice = session(
        &[&base[..], &["name"]].concat(),
        json!({ "sub": "alice", "name": "alice", "groups": ["engineering"] }),
    );
    assert!(p.evaluate(&alice, &get_x).allowed);

    // A session that did not keep `name` (sealed before the rule, or before the
    // upgrade): the deny applies to everyone it could be, and says why.
    let unkept = session(&base, json!({ "sub": "alice", "groups": ["engineering"] }));
    let d = p.evaluate(&unkept, &get_x);
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::DeniedByRule);
    assert_eq!(d.rule.as_ref().map(|r| &*r.id), Some("no-mallory"));
    assert_eq!(d.claim_not_kept.as_deref(), Some("name"));
    assert_eq!(d.detail(), "claim `name` not kept by the session: deny applies; sign in again");
    let json = serde_json::to_value(&d).unwrap_or_default();
    assert_eq!(json["claim_not_kept"], "name");
    let text = p.explain(&unkept, &get_x).to_string();
    assert!(
        text.contains(
            "deny  `no-mallory`: matched: claim `name` (19:12) not kept by the session: deny applies; sign in again"
        ),
        "{text}"
    );

    // An allow on a claim the session did not keep does not match (default deny),
    // and the detail says which claim; kept and present, it matches.
    let contractor = session(&[&base[..], &["name"]].concat(), json!({ "sub": "c", "name": "c" }));
    let d = p.evaluate(&contractor, &get_x);
    assert_eq!((d.allowed, d.reason, d.rule.is_none()), (false, Reason::PolicyDenied, true));
    assert_eq!(d.claim_not_kept.as_deref(), Some("acct"));
    assert!(d.detail().starts_with("claim `acct` not kept by the session"), "{}", d.detail());
    let e = p.explain(&contractor, &get_x);
    let skipped = e.rules.iter().find(|t| &*t.rule.id == "contractors-read").map(|t| &t.outcome);
    assert!(
        matches!(skipped, Some(TraceOutcome::ClaimNotKept { condition, .. }) if condition == "claims.acct"),
        "{skipped:?}"
    );
    assert!(e.to_string().contains("skipped: claim `acct`"), "{e}");
    let kept = session(
        &[&base[..], &["name", "acct"]].concat(),
        json!({ "sub": "c", "name": "c", "acct": 1 }),
    );
    assert_eq!(p.evaluate(&kept, &get_x).rule.as_ref().map(|r| &*r.id), Some("contractors-read"));
    // Kept but absent from the token: an ordinary non-match, no detail.
    let absent =
        session(&[&base[..], &["name", "acct"]].concat(), json!({ "sub": "c", "name": "c" }));
    let d = p.evaluate(&absent, &get_x);
    assert_eq!((d.reason, d.claim_not_kept), (Reason::PolicyDenied, None));
    // A deny whose other conditions do not hold does not apply; one that matches
    // outright decides before one that applies for a claim not kept.
    let admin = RequestFacts::http(&get, "/admin/x");
    assert!(p.evaluate(&alice, &get_x).allowed, "`no-guest-admin` covers /admin only");
    let d = p.evaluate(&alice, &admin);
    assert_eq!(d.rule.as_ref().map(|r| &*r.id), Some("no-guest-admin"));
    assert_eq!(d.claim_not_kept.as_deref(), Some("acct"));
    let d = p.evaluate(&mallory, &admin);
    assert_eq!(d.rule.as_ref().map(|r| &*r.id), Some("no-mallory"));
    assert_eq!(d.claim_not_kept, None);
}

#[test]
fn accessors() {
    let p = must_parse(EVAL_POLICY);
    assert_eq!(p.name(), "p");
    assert_eq!(p.file(), Path::new("p.toml"));
    assert_eq!(p.rules().len(), 11);
    let db = &p.rules()[10];
    assert_eq!(
        (db.id(), db.effect(), db.upstream_role()),
        ("db-migrate", Effect::Allow, Some("migrator"))
    );
    assert_eq!(db.issuers(), &[IssuerId(Arc::from("bitbucket"))]);
    let hash = p.content_hash();
    assert_eq!(hash.len(), 64);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        must_parse("").content_hash(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
}

// === diagnostics ===

/// Each case: a policy, and one `file:line:col: message` that must be among its errors.
#[test]
fn every_error_points_at_its_cause() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("toml syntax",
         "[[rule]\nid = 1\n",
         "p.toml:1:8: "),
        ("unknown key with suggestion",
         "[[rule]]\nid = \"a\"\nefect = \"allow\"\neffect = \"allow\"\nissuer = \"corp\"\n",
         "p.toml:3:1: unknown key `efect` in rule; did you mean `effect`?"),
        ("unknown top-level key",
         "[[rules]]\nid = \"a\"\n",
         "p.toml:1:3: unknown key `rules`: a policy file holds `[[rule]]` and `[[test]]` tables; did you mean `[[rule]]`?"),
        ("rule as a single table",
         "[rule]\nid = \"a\"\n",
         "p.toml:1:2: `rule` must be an array of tables: write `[[rule]]`"),
        ("wrong value type",
         "[[rule]]\nid = \"a\"\neffect = 1\nissuer = \"corp\"\n",
         "p.toml:3:10: invalid type: integer `1`, expected a string"),
        ("missing id",
         "[[rule]]\neffect = \"allow\"\nissuer = \"corp\"\n",
         "p.toml:1:1: rule is missing `id`"),
        ("missing effect",
         "[[rule]]\nid = \"a\"\nissuer = \"corp\"\n",
         "p.toml:1:1: rule is missing `effect` (\"allow\" or \"deny\")"),
        ("missing issuer",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\n",
         "p.toml:1:1: rule is missing `issuer` (a name from `[issuers.NAME]`)"),
        ("bad id",
         "[[rule]]\nid = \"a b\"\neffect = \"deny\"\nissuer = \"corp\"\n",
         "p.toml:2:6: rule id `a b` must be non-empty and use only letters, digits, `-`, `_` and `.`"),
        ("duplicate id",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\n[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\n",
         "p.toml:6:6: duplicate rule id `a` (first defined on line 2)"),
        ("unknown effect",
         "[[rule]]\nid = \"a\"\neffect = \"permit\"\nissuer = \"corp\"\n",
         "p.toml:3:10: unknown effect `permit`: expected \"allow\" or \"deny\""),
        ("undeclared issuer",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = [\"corp\", \"corpp\"]\n",
         "p.toml:4:19: issuer `corpp` is not declared in the configuration; did you mean `corp`? (declared: bitbucket, corp, github, gitlab)"),
        ("empty glob",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nsubject = [\"\"]\n",
         "p.toml:5:12: bad pattern \"\" in `subject`: empty pattern"),
        ("triple star",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = \"/a/***\"\n",
         "p.toml:5:9: bad pattern \"/a/***\" in `paths`: `***` is not a pattern"),
        ("unknown ci field",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"bitbucket\"\nci = { branchName = \"main\" }\n",
         "p.toml:5:8: unknown ci field `branchName`; did you mean `branch`?"),
        ("lower-case method",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nmethods = [\"GET\", \"post\"]\n",
         "p.toml:5:19: unknown HTTP method `post`; methods are upper case: `POST`"),
        ("unknown method",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nmethods = \"PSOT\"\n",
         "p.toml:5:11: unknown HTTP method `PSOT`; did you mean `POST`?"),
        ("relative path",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = [\"deploy/*\"]\n",
         "p.toml:5:10: path `deploy/*` must start with `/`"),
        ("empty list",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\ngroups_all = []\n",
         "p.toml:5:14: `groups_all` is an empty list: remove it or give at least one value"),
        ("empty claims table",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nclaims = {}\n",
         "p.toml:5:10: `claims` is empty"),
        ("float claim",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nclaims = { ver = 1.0 }\n",
         "p.toml:5:18: `claims.ver` must be a string, boolean, integer or a list of them, not float"),
        ("email_domain with @",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nemail_domain = [\"@acme.example\"]\n",
         "p.toml:5:17: `email_domain` takes a domain, not an address: write `acme.example`"),
        ("test: bad request",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\" }\nrequest = \"/deploy\"\nexpect = \"deny\"\n",
         "p.toml:4:11: bad request \"/deploy\": expected \"METHOD /path\""),
        ("test: bad method",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\" }\nrequest = \"FETCH /x\"\nexpect = \"deny\"\n",
         "p.toml:4:11: bad request \"FETCH /x\": unknown HTTP method `FETCH`"),
        ("test: unknown expect",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\" }\nrequest = \"GET /\"\nexpect = \"denied\"\n",
         "p.toml:5:10: unknown expect `denied`: expected \"allow\" or \"deny\""),
        ("test: unknown rule",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\n[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\" }\nrequest = \"GET /\"\nexpect = \"deny\"\nrule = \"b\"\n",
         "p.toml:10:8: test expects rule `b`, which the policy it tests does not define"),
        ("test: unknown identity key",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\", claim = {} }\nrequest = \"GET /\"\nexpect = \"deny\"\n",
         "p.toml:3:31: unknown key `claim` in test identity; did you mean `claims`?"),
        ("test: undeclared issuer",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"nope\" }\nrequest = \"GET /\"\nexpect = \"deny\"\n",
         "p.toml:3:23: issuer `nope` is not declared in the configuration"),
        ("test: preset mismatch",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\", preset = \"gitlab-ci\" }\nrequest = \"GET /\"\nexpect = \"deny\"\n",
         "p.toml:3:40: issuer `corp` has preset `oidc`, not `gitlab-ci`"),
        ("test: a claim set the verifier would reject",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"github\", claims = { repository_owner_id = \"1\" } }\nrequest = \"GET /\"\nexpect = \"deny\"\n",
         "p.toml:3:12: test identity is not a github-actions token the proxy would accept: github-actions token without `repository_id`"),
        ("test: missing request",
         "[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\" }\nexpect = \"deny\"\n",
         "p.toml:1:1: test is missing `request = \"METHOD /path\"` (or `database = ...`)"),
        // Lints that are errors.
        ("V22: shared issuer without a pin",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"bitbucket\"\nmethods = \"GET\"\n",
         "p.toml:4:10: allow rule `a` does not pin a repository or owner, so any bitbucket-pipelines token with this audience matches (issuer `bitbucket` is shared)"),
        ("V22: a glob is not a pin",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"github\"\nmethods = \"GET\"\nclaims = { repository_owner_id = \"*\" }\n",
         "p.toml:4:10: allow rule `a` does not pin a repository or owner"),
        ("V22: subject without an owner is not a pin",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"github\"\nmethods = \"GET\"\nsubject = \"repo:*\"\n",
         "p.toml:4:10: allow rule `a` does not pin a repository or owner"),
        ("unknown claim with suggestion",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"bitbucket\"\nclaims = { branch_name = \"main\" }\n",
         "p.toml:5:12: `branch_name` is not a claim of bitbucket-pipelines tokens (issuer `bitbucket`); did you mean `branchName`?"),
        ("claim of another provider",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"bitbucket\"\nclaims = { repository_owner_id = \"1\" }\n",
         "p.toml:5:12: `repository_owner_id` is not a claim of bitbucket-pipelines tokens"),
        ("contradiction: HTTP and database",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = \"GET\"\ndatabases = \"app\"\n",
         "p.toml:6:13: allow rule `a` can never match: `methods` applies to HTTP requests and `databases` to database sessions"),
        ("contradiction: branch and tag",
         "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"gitlab\"\nci = { branch = \"main\", tag = \"v1\" }\n",
         "p.toml:5:25: deny rule `a` can never match: a ref is either a branch or a tag"),
        ("contradiction: ci on a human issuer",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nci = { branch = \"main\" }\n",
         "p.toml:5:8: allow rule `a` can never match: `ci.branch` needs a CI token"),
        ("contradiction: email outside email_domain",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nemail = \"*@a.example\"\nemail_domain = \"b.example\"\n",
         "p.toml:5:9: allow rule `a` can never match: no `email` pattern is in any `email_domain`"),
    ];
    // Collect every miss so one run shows them all.
    let mut misses = Vec::new();
    for (name, text, want) in cases {
        match parse(text) {
            Ok(_) => misses.push(format!("{name}: compiled, expected {want}")),
            Err(errors) if !errors.iter().any(|e| e.starts_with(want)) => {
                misses.push(format!("{name}: want {want:?}, got:\n{}", errors.join("\n")))
            }
            Err(_) => {}
        }
    }
    assert!(misses.is_empty(), "{}", misses.join("\n\n"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[[rule]]
id = "a"
effect = "alow"
issuer = "corp"
methds = ["GET"]

[[rule]]
id = "b"
effect = "allow"
issuer = "nope"
paths = ["x"]

[[rule]]
id = "c"
effect = "allow"
issuer = "bitbucket"

[[test]]
name = "t"
identity = { issuer = "corp" }
request = "GET"
expect = "maybe"
"#;
    let errors = parse(text).err().unwrap_or_default();
    let locs: Vec<&str> = errors.iter().filter_map(|e| e.split(": ").next()).collect();
    assert_eq!(
        locs,
        [
            "p.toml:4:10",
            "p.toml:6:1",
            "p.toml:11:10",
            "p.toml:12:10",
            "p.toml:17:10",
            "p.toml:22:11",
            "p.toml:23:10"
        ],
        "{}",
        errors.join("\n")
    );
}

#[test]
fn clean_files_have_no_diagnostics() {
    // Each near-miss of a case above, written correctly.
    #[rustfmt::skip]
    let clean = [
        "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nmethods = [\"GET\", \"POST\"]\npaths = [\"/deploy/**\"]\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"bitbucket\"\nmethods = \"GET\"\nci = { repository = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"bitbucket\"\nmethods = \"GET\"\nclaims = { workspaceUuid = \"{7baee083-4f25-4a97-8a9a-0fde1b623b45}\" }\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"github\"\nmethods = \"GET\"\nsubject = \"repo:acme@65/*\"\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"github\"\nmethods = \"GET\"\nci = { workspace_id = \"65\", repository = \"acme/*\" }\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"gitlab\"\nmethods = \"GET\"\nclaims = { namespace_id = \"72\", project_id = \"20\" }\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"gitlab\"\nclaims = { namespace_id = \"72\", ref_protected = \"true\" }\n",
        "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"bitbucket\"\nmethods = \"DELETE\"\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nemail = \"*@a.example\"\nemail_domain = \"A.example\"\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nclaims = { anything = true, n = [1, 2], s = \"x*\" }\n",
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\ndatabases = \"app\"\nroles = [\"r*\"]\nupstream_role = \"r\"\n",
        "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\ngroups_any = \"x\"\n[[rule]]\nid = \"b\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = \"y\"\n",
        EVAL_POLICY,
    ];
    for text in clean {
        match parse(text) {
            Ok(p) => assert!(p.warnings().is_empty(), "{text}\n{:?}", p.warnings()),
            Err(e) => panic!("{text}\n{}", e.join("\n")),
        }
    }
}

#[test]
fn warnings_do_not_fail_the_load() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("deploy-style allow without a branch restriction",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"bitbucket\"\nmethods = [\"GET\", \"POST\"]\nci = { repository = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }\n",
         "p.toml:5:11: warning: allow rule `a` lets bitbucket-pipelines tokens (issuer `bitbucket`) use write methods from any branch"),
        ("no method restriction at all",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"github\"\nclaims = { repository_owner_id = \"65\" }\n",
         "p.toml:2:6: warning: allow rule `a` lets github-actions tokens (issuer `github`) use any method from any branch"),
        ("a branch of `**` restricts nothing",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"gitlab\"\nclaims = { project_id = \"1\" }\nci = { branch = \"**\" }\n",
         "p.toml:2:6: warning: allow rule `a` lets gitlab-ci tokens"),
        ("allow shadowed by a broader deny",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = \"DELETE\"\npaths = \"/x/*\"\n[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = [\"corp\", \"github\"]\npaths = \"/x/**\"\n",
         "p.toml:2:6: warning: allow rule `a` can never match: deny rule `d` (line 7) matches every request it does, and deny wins"),
        ("shadowed through groups",
         "[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"corp\"\ngroups_any = [\"x\", \"y\"]\n[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_all = [\"y\", \"z\"]\n",
         "p.toml:7:6: warning: allow rule `a` can never match: deny rule `d` (line 1)"),
        ("CONNECT is refused on every route before any policy",
         "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = [\"GET\", \"CONNECT\"]\n",
         "p.toml:5:11: warning: allow rule `a` lists `CONNECT` in `methods`, which never reaches a policy: the proxy refuses CONNECT (405 method-not-allowed) on every route; that entry is dead"),
        ("a deny on TRACE alone decides nothing",
         "[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"corp\"\nmethods = \"TRACE\"\n",
         "p.toml:5:11: warning: deny rule `d` lists `TRACE` in `methods`, which never reaches a policy: the proxy refuses TRACE (405 method-not-allowed) on every route; the rule never decides anything"),
    ];
    for (name, text, want) in cases {
        match parse(text) {
            Err(e) => panic!("{name}: {}", e.join("\n")),
            Ok(p) => {
                let warnings: Vec<String> = p.warnings().iter().map(|d| d.to_string()).collect();
                assert!(
                    warnings.iter().any(|w| w.starts_with(want)),
                    "{name}: want {want:?}, got {warnings:?}"
                );
                // `lint` reports the same with a severity.
                let lints = lint(&p, &catalog());
                assert!(lints.iter().all(|l| l.severity == Severity::Warning), "{name}");
                assert!(lints.iter().any(|l| l.to_string().starts_with(want)), "{name}: {lints:?}");
            }
        }
    }
}

#[test]
fn not_shadowed_when_the_deny_is_narrower() {
    let p = must_parse(
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\npaths = \"/x/**\"\n[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = \"/x/*\"\n",
    );
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

// === [[test]] ===

const TESTED: &str = r#"
[[rule]]
id = "main-deploys"
effect = "allow"
issuer = "bitbucket"
methods = ["POST"]
ci = { repository = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branch = "main" }

[[rule]]
id = "no-deletes"
effect = "deny"
issuer = "bitbucket"
methods = ["DELETE"]

[[test]]
name = "main deploys"
identity = { issuer = "bitbucket", claims = { repositoryUuid = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branchName = "main" } }
request = "POST /deploy/42"
expect = "allow"
rule = "main-deploys"

[[test]]
name = "preset plus overrides"
identity = { preset = "bitbucket-pipelines", claims = { repositoryUuid = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branchName = "feature/x" } }
request = "POST /deploy/42"
expect = "deny"

[[test]]
name = "wrong expectation"
identity = { issuer = "bitbucket", claims = { repositoryUuid = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branchName = "main" } }
request = "POST /deploy/42"
expect = "deny"

[[test]]
name = "wrong rule"
identity = { issuer = "bitbucket", claims = { repositoryUuid = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}", branchName = "main" } }
request = "DELETE /deploy/42"
expect = "deny"
rule = "main-deploys"

[[test]]
name = "database test"
identity = { issuer = "corp", groups = ["dba"], groups_known = false, email = "a@b", email_verified = true }
database = "app"
role = "migrator"
expect = "deny"
"#;

#[test]
fn run_tests_reports_passes_and_failures() {
    let p = must_parse(TESTED);
    let outcomes = run_tests(&p);
    let summary: Vec<(&str, u32, bool)> =
        outcomes.iter().map(|o| (o.name.as_str(), o.line, o.passed())).collect();
    assert_eq!(
        summary,
        [
            ("main deploys", 15, true),
            ("preset plus overrides", 22, true),
            ("wrong expectation", 28, false),
            ("wrong rule", 34, false),
            ("database test", 41, true),
        ]
    );
    assert_eq!(
        outcomes[2].to_string(),
        "p.toml:28: FAILED: wrong expectation: expected deny, got allow (allowed) by rule `main-deploys` (p.toml:2) for POST /deploy/42"
    );
    assert_eq!(
        outcomes[3].to_string(),
        "p.toml:34: FAILED: wrong rule: expected rule `main-deploys` to decide, but deny was decided by rule `no-deletes` (p.toml:9)"
    );
    assert_eq!(outcomes[0].to_string(), "p.toml:15: ok: main deploys");
    // The test identity is built like a verified one.
    let Some(t) = &p.tests()[1].identity else { panic!("a test identity") };
    assert_eq!(t.kind, PrincipalKind::Pipeline);
    let ci = t.ci.clone().unwrap_or_default();
    assert_eq!(
        (ci.field("branch"), ci.field("ref")),
        (Some("feature/x"), Some("refs/heads/feature/x"))
    );
    assert_eq!(ci.field("workspace_id"), Some("{00000000-0000-4000-8000-000000000010}"));
    let Some(h) = &p.tests()[4].identity else { panic!("a test identity") };
    assert_eq!((h.groups_known, h.email_verified, h.ci.is_none()), (false, true, true));
    let _ = CiContext::FIELDS;
}

// === shipped policies ===

#[test]
fn demo_policy_compiles_cleanly_and_its_tests_pass() {
    let mut catalog = Catalog::default();
    catalog.declare("demo-bitbucket", Preset::BitbucketPipelines);
    catalog.declare("demo-github", Preset::GithubActions);
    catalog.declare("demo-gitlab", Preset::GitlabCi);
    catalog.declare("demo-human", Preset::Oidc);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/demo.toml");
    let policy = match Policy::load(&path, &catalog) {
        Ok(p) => p,
        Err(d) => panic!(
            "{}",
            d.into_sorted().iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n")
        ),
    };
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    assert!(lint(&policy, &catalog).is_empty());
    let outcomes = run_tests(&policy);
    assert!(outcomes.len() >= 10);
    for o in &outcomes {
        assert!(o.passed(), "{o}");
    }
    assert!(outcomes.iter().any(|o| o.name.contains("feature/x") && !o.decision.allowed));
}

#[test]
fn load_reports_an_unreadable_file() {
    let err = Policy::load(Path::new("/nonexistent/p.toml"), &catalog()).err();
    let msgs: Vec<String> =
        err.map(|d| d.into_sorted().iter().map(|d| d.to_string()).collect()).unwrap_or_default();
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].starts_with("/nonexistent/p.toml:1:1: cannot read file"), "{msgs:?}");
}

#[test]
fn email_patterns_match_in_lower_case_like_email_domain() {
    let p = must_parse(
        "[[rule]]\nid = \"staff\"\neffect = \"allow\"\nissuer = \"corp\"\nemail_domain = [\"acme.example\", \"contractors.acme.example\"]\n\n\
         [[rule]]\nid = \"no-contractors\"\neffect = \"deny\"\nissuer = \"corp\"\nemail = \"*@contractors.acme.example\"\n",
    );
    let get = RequestFacts::http(&http::Method::GET, "/");
    for email in [
        "eve@contractors.acme.example",
        "eve@Contractors.acme.example",
        "EVE@CONTRACTORS.ACME.EXAMPLE",
    ] {
        let d = p.evaluate(&human(json!({ "email": email, "email_verified": true })), &get);
        assert!(!d.allowed, "{email} passed the contractors deny");
        assert_eq!(d.rule.map(|r| r.id.to_string()).as_deref(), Some("no-contractors"), "{email}");
    }
    let d =
        p.evaluate(&human(json!({ "email": "Jane@acme.example", "email_verified": true })), &get);
    assert!(d.allowed);
    // A pattern in upper case could never match: refused, with the fix.
    let errs = parse("[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nemail = \"*@Contractors.acme.example\"\n")
        .err()
        .unwrap_or_default();
    assert!(errs.iter().any(|e| e.contains("write `*@contractors.acme.example`")), "{errs:?}");
}

// === path patterns ===

/// A `paths` pattern is matched against the canonical request path: spelt otherwise it
/// would never match (a deny that never denies), so it is an error that says how to
/// write it; each case has a near miss, its canonical spelling, that loads.
#[test]
fn path_patterns_must_be_in_canonical_form() {
    let deny = |pattern: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = [\"/x\", {pattern:?}]\n")
    };
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("/caf%c3%a9/**", "escapes have upper-case hex (`%C3`); write `/caf%C3%A9/**`", "/caf%C3%A9/**"),
        ("/%61dmin/**", "`%61` is decoded to `a`; write `/admin/**`", "/admin/**"),
        ("/v1/keys/*%3Arevoke", "`%3A` is decoded to `:`; write `/v1/keys/*:revoke`", "/v1/keys/*:revoke"),
        ("/v1/keys/*%3arevoke", "`%3a` is decoded to `:`; write `/v1/keys/*:revoke`", "/v1/keys/*:revoke"),
        ("/users/%40me/**", "`%40` is decoded to `@`; write `/users/@me/**`", "/users/@me/**"),
        ("/a%21%24%26%27%28%29%2C%3D", "`%21` is decoded to `!`; write `/a!$&'(),=`", "/a!$&'(),="),
        ("/c++/**", "`+` is sent as `%2B` (a plus to every upstream); write `/c%2B%2B/**`", "/c%2B%2B/**"),
        ("/api/{id}", "`{` is escaped (`%7B`); write `/api/%7Bid%7D`", "/api/%7Bid%7D"),
        ("/a//b/**", "`//` is merged into `/`; write `/a/b/**`", "/a/b/**"),
        ("/a%2A/**", "`%2A` is `*` in requests, and a pattern cannot match a literal `*` apart from its wildcard, which matches it as it matches any run of characters within a segment: write `/a*/**`", "/a*/**"),
        ("/a/../admin/**", "can never match: requests for it are refused (400 ambiguous-path: `.` or `..` segment in path)", "/a/.../admin/**"),
        ("/a%2Fb", "can never match: requests for it are refused (400 ambiguous-path: encoded slash or backslash in path)", "/a%25b"),
        ("/admin;x/**", "can never match: requests for it are refused (400 ambiguous-path: `;` (path parameter) in path)", "/admin,x/**"),
        ("/100%", "can never match: requests for it are refused (400 ambiguous-path: invalid percent-escape in path)", "/100%25"),
    ];
    let mut misses = Vec::new();
    for (bad, message, near_miss) in cases {
        match parse(&deny(bad)) {
            Ok(_) => misses.push(format!("{bad}: compiled")),
            Err(errors) => {
                // Line 5, the column of the second pattern in `paths = ["/x", ...]`.
                let want = format!("p.toml:5:16: path `{bad}`");
                if !errors.iter().any(|e| e.starts_with(&want) && e.ends_with(message)) {
                    misses
                        .push(format!("{bad}: want {want}…{message}, got:\n{}", errors.join("\n")));
                }
            }
        }
        if let Err(errors) = parse(&deny(near_miss)) {
            misses.push(format!("{near_miss} should load:\n{}", errors.join("\n")));
        }
    }
    assert!(misses.is_empty(), "{}", misses.join("\n\n"));
    // Non-ASCII: written percent-encoded, the exact spelling given.
    let errors = parse(&deny("/caf\u{e9}/**")).err().unwrap_or_default();
    assert!(
        errors.iter().any(|e| e.starts_with("p.toml:5:16: path `/caf\\u{e9}/**` is not ASCII")
            && e.ends_with("`/caf%C3%A9/**`")),
        "{errors:?}"
    );
}

/// The policy sees the canonical path of a request, however it was encoded, and so do
/// the policy's `[[test]]`s.
#[test]
fn path_rules_see_the_canonical_path() {
    let text = r#"
[[rule]]
id = "engineers"
effect = "allow"
issuer = "corp"

[[rule]]
id = "no-revoke"
effect = "deny"
issuer = "corp"
paths = ["/v1/keys/*:revoke", "/users/@me/**", "/c%2B%2B/**"]

[[test]]
name = "an encoded colon is a colon"
identity = { issuer = "corp" }
request = "POST /v1/keys/k1%3arevoke"
expect = "deny"
rule = "no-revoke"

[[test]]
name = "an encoded at sign is an at sign"
identity = { issuer = "corp" }
request = "GET /users/%40me/tokens"
expect = "deny"

[[test]]
name = "a raw plus is an encoded plus"
identity = { issuer = "corp" }
request = "GET /c++/x"
expect = "deny"

[[test]]
name = "another key is allowed"
identity = { issuer = "corp" }
request = "POST /v1/keys/k1%3Aread"
expect = "allow"
"#;
    let p = must_parse(text);
    let failed: Vec<String> =
        run_tests(&p).iter().filter(|o| !o.passed()).map(|o| o.to_string()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let id = human(json!({}));
    for (raw, denied) in [
        ("/v1/keys/k1:revoke", true),
        ("/v1/keys/k1%3Arevoke", true),
        ("/v1/keys/k1%3arevoke", true),
        ("/users/%40me/tokens", true),
        ("/users/%40me", true),
        ("/c%2b%2b/x", true),
        ("/v1/keys/k1%3Aread", false),
        ("/users/me/tokens", false),
    ] {
        let path = crate::http::path::normalize(raw).unwrap_or_else(|e| panic!("{raw}: {e:?}"));
        let d = p.evaluate(&id, &RequestFacts::http(&http::Method::POST, &path));
        assert_eq!(!d.allowed, denied, "{raw} ({path})");
    }
    // A test request the proxy would refuse is an error, not a test of the rules.
    let bad = format!(
        "{text}\n[[test]]\nname = \"dots\"\nidentity = {{ issuer = \"corp\" }}\nrequest = \"GET /a/../v1/keys/k1:revoke\"\nexpect = \"deny\"\n"
    );
    let errors = parse(&bad).err().unwrap_or_default();
    assert!(
        errors.iter().any(|e| e.contains("the proxy refuses this path before any rule")),
        "{errors:?}"
    );
}

// === public rules ===

const PUBLIC: &str = r#"
[[rule]]
id = "health"
effect = "allow"
public = true
methods = ["GET"]
paths = ["/healthz"]

[[rule]]
id = "docs"
effect = "allow"
public = true
methods = "GET"
paths = ["/docs/**"]

[[rule]]
id = "engineers"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]

[[rule]]
id = "no-internal-docs-for-contractors"
effect = "deny"
issuer = "corp"
groups_any = ["contractors"]
paths = ["/docs/internal/**"]

[[rule]]
id = "no-db-for-contractors"
effect = "deny"
issuer = "corp"
groups_any = ["contractors"]
databases = ["**"]
"#;

/// Name, method, path, caller (`None`: no credential), allowed, reason, deciding rule.
type Case<'a> =
    (&'a str, &'a http::Method, &'a str, Option<Identity>, bool, Reason, Option<&'a str>);

#[test]
fn public_rules_admit_callers_without_a_credential_on_their_requests_only() {
    let p = must_parse(PUBLIC);
    let (get, post, head) = (http::Method::GET, http::Method::POST, http::Method::HEAD);
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        ("anonymous on the public path", &get, "/healthz", None, true, Reason::Public, Some("health")),
        ("GET covers HEAD", &head, "/healthz", None, true, Reason::Public, Some("health")),
        ("another method", &post, "/healthz", None, false, Reason::PolicyDenied, None),
        ("below an exact path", &get, "/healthz/x", None, false, Reason::PolicyDenied, None),
        ("another path", &get, "/deploy", None, false, Reason::PolicyDenied, None),
        ("a public tree", &get, "/docs/a/b", None, true, Reason::Public, Some("docs")),
        // A deny's identity conditions cannot be shown false for a caller without a
        // credential: it applies whenever its request conditions hold.
        ("deny wins for anonymous", &get, "/docs/internal/x", None, false, Reason::DeniedByRule,
         Some("no-internal-docs-for-contractors")),
        ("a caller the deny names", &get, "/docs/internal/x",
         Some(human(json!({"groups": ["contractors"]}))), false, Reason::DeniedByRule,
         Some("no-internal-docs-for-contractors")),
        ("a caller it does not name", &get, "/docs/internal/x",
         Some(human(json!({"groups": ["sales"]}))), true, Reason::Public, Some("docs")),
        ("a public rule admits callers with a credential too", &get, "/healthz",
         Some(bitbucket(BB_REPO, "feature/x")), true, Reason::Public, Some("health")),
        ("the first matching allow decides, public or not", &get, "/deploy",
         Some(human(json!({"groups": ["engineering"]}))), true, Reason::Allowed, Some("engineers")),
    ];
    for (name, method, path, who, allowed, reason, rule) in cases {
        let facts = RequestFacts::http(method, path);
        let d = match who {
            Some(id) => p.evaluate(id, &facts),
            None => p.decide(None, &facts),
        };
        assert_eq!(d.allowed, *allowed, "{name}: {d:?}");
        assert_eq!(d.reason, *reason, "{name}: {d:?}");
        assert_eq!(d.rule.as_ref().map(|r| &*r.id), *rule, "{name}: {d:?}");
        // `explain` agrees, and says why a rule about the caller did not match.
        let e = p.explain_caller(who.as_ref(), &facts);
        assert_eq!(e.decision, d, "{name}");
    }
    let e = p.explain_caller(None, &RequestFacts::http(&get, "/deploy"));
    let text = e.to_string();
    assert!(text.contains("issuer = [\"corp\"], got no credential (anonymous)"), "{text}");
    // A public rule never admits a database session (it must name paths).
    let d = p.decide(None, &RequestFacts::database("app", Some("app")));
    assert!(!d.allowed, "{d:?}");
    assert!(p.has_public_rules());
    assert!(!must_parse(TESTED).has_public_rules());
}

#[test]
fn a_public_rule_says_nothing_about_the_caller_and_lists_its_requests() {
    let public = "[[rule]]\nid = \"p\"\neffect = \"allow\"\npublic = true\n";
    let req = "methods = [\"GET\"]\npaths = [\"/healthz\"]\n";
    #[rustfmt::skip]
    let cases: Vec<(&str, String, &str)> = vec![
        ("an issuer", format!("{public}{req}issuer = \"corp\"\n"),
         "p.toml:7:10: `issuer` in a public rule: `public = true` admits callers without any credential, who have no identity to match; remove `issuer`, or `public` to require a credential"),
        ("a group", format!("{public}{req}groups_any = [\"eng\"]\n"),
         "p.toml:7:14: `groups_any` in a public rule"),
        ("a claim", format!("{public}{req}claims = {{ sub = \"x\" }}\n"),
         "p.toml:7:10: `claims` in a public rule"),
        ("a ci field", format!("{public}{req}ci = {{ branch = \"main\" }}\n"),
         "p.toml:7:6: `ci` in a public rule"),
        ("an email", format!("{public}{req}email_domain = \"acme.example\"\n"),
         "p.toml:7:16: `email_domain` in a public rule"),
        ("a subject", format!("{public}{req}subject = \"x\"\n"),
         "p.toml:7:11: `subject` in a public rule"),
        ("a database", format!("{public}{req}databases = [\"app\"]\n"),
         "p.toml:7:13: `databases` in a public rule: database sessions always need a credential"),
        ("an upstream role", format!("{public}{req}upstream_role = \"ro\"\n"),
         "p.toml:7:17: `upstream_role` in a public rule"),
        ("no paths", format!("{public}methods = [\"GET\"]\n"),
         "p.toml:4:10: a public rule must list its `paths`"),
        ("no methods", format!("{public}paths = [\"/healthz\"]\n"),
         "p.toml:4:10: a public rule must list its `methods`"),
        ("a public deny", "[[rule]]\nid = \"p\"\neffect = \"deny\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/x\"]\n".into(),
         "p.toml:4:10: `public` is for allow rules"),
        ("not a boolean", "[[rule]]\nid = \"p\"\neffect = \"allow\"\npublic = \"yes\"\nmethods = [\"GET\"]\npaths = [\"/x\"]\n".into(),
         "p.toml:4:10: invalid type: string \"yes\", expected a boolean"),
        ("public = false still needs an issuer", "[[rule]]\nid = \"p\"\neffect = \"allow\"\npublic = false\nmethods = [\"GET\"]\npaths = [\"/x\"]\n".into(),
         "p.toml:1:1: rule is missing `issuer`"),
        ("a test identity that is neither", format!("{public}{req}[[test]]\nname = \"t\"\nidentity = \"nobody\"\nrequest = \"GET /healthz\"\nexpect = \"allow\"\n"),
         "p.toml:9:12: test identity \"nobody\": write a table of claims"),
    ];
    for (name, text, want) in &cases {
        match parse(text) {
            Ok(_) => panic!("{name}: should not compile:\n{text}"),
            Err(e) => {
                assert!(e.iter().any(|d| d.starts_with(want)), "{name}: want {want:?}, got {e:?}")
            }
        }
    }
    // The identity table of a test keeps its own error messages.
    let bad = format!("{public}{req}[[test]]\nname = \"t\"\nidentity = {{ issuer = \"corp\", groups = \"eng\" }}\nrequest = \"GET /healthz\"\nexpect = \"allow\"\n");
    let e = parse(&bad).err().unwrap_or_default();
    assert!(
        e.iter().any(|d| d.contains("invalid type: string \"eng\", expected a sequence")),
        "{e:?}"
    );
}

#[test]
fn public_rules_on_every_path_or_under_a_deny_are_flagged() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("a deny whose request conditions cover it, whatever its issuer",
         "[[rule]]\nid = \"p\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/status/**\"]\n[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"corp\"\ngroups_any = [\"x\"]\npaths = [\"/status/**\"]\n",
         "p.toml:2:6: warning: public rule `p` never admits a caller without a credential: deny rule `d` (line 7)"),
    ];
    for (name, text, want) in cases {
        match parse(text) {
            Err(e) => panic!("{name}: {}", e.join("\n")),
            Ok(p) => {
                let lints: Vec<String> =
                    lint(&p, &catalog()).iter().map(|l| l.to_string()).collect();
                assert!(
                    lints.iter().any(|l| l.starts_with(want)),
                    "{name}: want {want:?}, got {lints:?}"
                );
            }
        }
    }
    // A narrow public rule beside a deny elsewhere: nothing to say.
    let p = must_parse(PUBLIC);
    assert_eq!(lint(&p, &catalog()), Vec::new(), "{:?}", lint(&p, &catalog()));
}

/// What a public rule on every path opens depends on the route's `path_prefix`: all a
/// route on `/` takes, only `/status` and below on a route on `/status` (where
/// `/status/**` opens the whole route as well). The policy alone says nothing.
#[test]
fn a_public_rule_on_every_path_is_flagged_per_route_with_what_it_opens() {
    let text = |paths: &str| {
        format!("[[rule]]\nid = \"p\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/healthz\", {paths}]\n")
    };
    let flagged = |paths: &str, prefix: &str| -> Vec<String> {
        let p = must_parse(&text(paths));
        assert!(!lint(&p, &catalog()).iter().any(|l| l.to_string().contains("opens every path")));
        let scope = RouteScope {
            name: "web",
            host: "host a.example.com",
            path_prefix: prefix,
            shadow: false,
        };
        public_everywhere(&p, scope).iter().map(ToString::to_string).collect()
    };
    assert_eq!(
        flagged("\"/**\"", "/"),
        ["p.toml:6:9: warning: public rule `p` opens every path of route `web` (`/**`; its path_prefix is `/`: every path on host a.example.com that no route with a longer path_prefix takes) to callers without any credential: list the paths that must be public (`/healthz`, `/webhooks/**`)"]
    );
    let status = ["p.toml:6:9: warning: public rule `p` opens every path of route `web` (`/**`; its path_prefix is `/status`: `/status` and every path under `/status/` on host a.example.com that no route with a longer path_prefix takes) to callers without any credential: list the paths that must be public (`/status/healthz`, `/status/webhooks/**`)"];
    assert_eq!(flagged("\"/**\"", "/status"), status);
    assert_eq!(
        flagged("\"/**\"", "/status/"),
        [status[0].replace("prefix is `/status`", "prefix is `/status/`")]
    );
    let own = flagged("\"/status/**\"", "/status");
    assert_eq!(own, [status[0].replace("(`/**`;", "(`/status/**`;")]);
    // Narrower than the route: nothing to say.
    assert_eq!(flagged("\"/status/**\"", "/"), Vec::<String>::new());
    assert_eq!(flagged("\"/status/public/**\"", "/status"), Vec::<String>::new());
    // A shadow policy opens nothing yet; it would once enforced.
    let p = must_parse(&text("\"/**\""));
    let scope = RouteScope { name: "web", host: "any host", path_prefix: "/", shadow: true };
    let w = public_everywhere(&p, scope).iter().map(ToString::to_string).collect::<Vec<_>>();
    assert!(w[0].contains("public rule `p` would open every path of route `web`"), "{w:?}");
    assert!(
        w[0].contains("without any credential once this shadow policy is enforced: list"),
        "{w:?}"
    );
}

#[test]
fn policy_tests_can_ask_for_a_caller_without_a_credential() {
    let text = format!(
        "{PUBLIC}
[[test]]
name = \"health is public\"
identity = \"anonymous\"
request = \"GET /healthz\"
expect = \"allow\"
rule = \"health\"

[[test]]
name = \"internal docs are not\"
identity = \"anonymous\"
request = \"GET /docs/internal/plan\"
expect = \"deny\"
rule = \"no-internal-docs-for-contractors\"

[[test]]
name = \"deploys are not public\"
identity = \"anonymous\"
request = \"POST /deploy\"
expect = \"allow\"
"
    );
    let p = must_parse(&text);
    assert!(p.tests().iter().all(|t| t.identity.is_none()));
    let outcomes = run_tests(&p);
    let passed: Vec<bool> = outcomes.iter().map(TestOutcome::passed).collect();
    assert_eq!(passed, [true, true, false]);
    assert!(
        outcomes[2].to_string().ends_with(
            "FAILED: deploys are not public: expected allow, got deny (policy-denied) by no rule for POST /deploy"
        ),
        "{}",
        outcomes[2]
    );
}

#[test]
fn a_claim_value_of_a_type_the_platform_never_sends_is_an_error() {
    // GitLab sends `ref_protected` as "true"/"false" and ids as strings, `runner_id` as
    // an integer; GitHub and Bitbucket send every custom claim as a string. A value of
    // another type never matches: in an allow the rule is dead, in a deny it is a hole
    // a reviewer reads as closed, and a `[[test]]` written with the same type passes.
    #[rustfmt::skip]
    let dead = [
        ("deny", "gitlab", "claims = { ref_protected = false }", "p.toml:5:12: `claims.ref_protected = false` never matches gitlab-ci tokens (issuer `gitlab`), which carry `ref_protected` as a string, not a boolean: write `\"false\"`"),
        ("deny", "gitlab", "claims = { environment_protected = [true, \"x\"] }", "p.toml:5:12: `claims.environment_protected = true` never matches gitlab-ci tokens (issuer `gitlab`), which carry `environment_protected` as a string, not a boolean: write `\"true\"`"),
        ("deny", "github", "claims = { repository_id = 74 }", "p.toml:5:12: `claims.repository_id = 74` never matches github-actions tokens (issuer `github`), which carry `repository_id` as a string, not an integer: write `\"74\"`"),
        ("allow", "gitlab", "claims = { namespace_id = 72 }", "p.toml:5:12: `claims.namespace_id = 72` never matches gitlab-ci tokens (issuer `gitlab`), which carry `namespace_id` as a string, not an integer: write `\"72\"`"),
        ("deny", "gitlab", "claims = { runner_id = \"7\" }", "p.toml:5:12: `claims.runner_id = \"7\"` never matches gitlab-ci tokens (issuer `gitlab`), which carry `runner_id` as an integer, not a string: write `7`"),
        ("deny", "bitbucket", "claims = { branchName = true }", "p.toml:5:12: `claims.branchName = true` never matches bitbucket-pipelines tokens (issuer `bitbucket`), which carry `branchName` as a string, not a boolean: write `\"true\"`"),
        ("deny", "gitlab", "claims = { groups_direct = 5 }", "p.toml:5:12: `claims.groups_direct = 5` never matches gitlab-ci tokens (issuer `gitlab`), which carry `groups_direct` as a list of strings, not an integer: write `\"5\"`"),
    ];
    let mut misses = Vec::new();
    for (effect, issuer, claims, want) in dead {
        let pin = if effect == "allow" { "\nci = { repository_id = \"1\" }" } else { "" };
        let text = format!(
            "[[rule]]\nid = \"a\"\neffect = \"{effect}\"\nissuer = \"{issuer}\"\n{claims}{pin}\n"
        );
        match parse(&text) {
            Ok(_) => misses.push(format!("{claims}: compiled, expected {want}")),
            Err(errors) if !errors.iter().any(|e| e == want) => {
                misses.push(format!("{claims}: want {want:?}, got:\n{}", errors.join("\n")))
            }
            Err(_) => {}
        }
    }
    assert!(misses.is_empty(), "{}", misses.join("\n\n"));

    // The types each platform does send compile, on an `oidc` issuer anything does.
    for claims in [
        "claims = { ref_protected = \"false\", runner_id = 7, groups_direct = \"acme/*\" }",
        "claims = { environment_protected = [\"true\", \"false\"], iat = 1 }",
    ] {
        must_parse(&format!(
            "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"gitlab\"\n{claims}\n"
        ));
    }
    must_parse("[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"corp\"\nclaims = { ref_protected = false }\n");

    // A `[[test]]` identity is a token the platform could send: a boolean
    // `ref_protected` would make a test of the rule pass where no real token matches.
    let test = "[[rule]]\nid = \"a\"\neffect = \"deny\"\nissuer = \"gitlab\"\nclaims = { ref_protected = \"false\" }\n\
        [[test]]\nname = \"t\"\nidentity = { issuer = \"gitlab\", preset = \"gitlab-ci\", claims = { ref_protected = false } }\nrequest = \"GET /\"\nexpect = \"allow\"\n";
    let errors = parse(test).err().unwrap_or_default();
    assert_eq!(
        errors,
        ["p.toml:8:82: test identity claim `ref_protected` is a boolean, but gitlab-ci tokens carry it as a string"],
    );
}

#[test]
fn a_name_does_not_pin_a_github_or_gitlab_repository() {
    // GitHub and GitLab names are freed by a rename or deletion and can be registered
    // by anyone, who then mints tokens whose `repository`, `repository_owner`,
    // `project_path` and name-form `sub` read exactly as the old owner's (V22 asks for
    // an id; GitHub added `repo:OWNER@ID/REPO@ID` subjects for this very attack).
    #[rustfmt::skip]
    let by_name = [
        ("github", "ci = { repository = \"acme/api\" }", "`ci.repository`"),
        ("github", "ci = { workspace = \"acme\", branch = \"main\" }", "`ci.workspace`"),
        ("github", "subject = \"repo:acme/*\"", "`subject`"),
        ("github", "subject = [\"repo:acme@65/*\", \"repo:acme/**\"]", "`subject`"),
        ("gitlab", "ci = { repository = \"acme/platform/api\" }", "`ci.repository`"),
        ("gitlab", "subject = \"project_path:acme/api:ref_type:branch:ref:main\"", "`subject`"),
    ];
    let mut misses = Vec::new();
    for (issuer, pin, named) in by_name {
        let text = format!(
            "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"GET\"\n{pin}\n"
        );
        let want = format!(
            "p.toml:4:10: allow rule `a` pins a repository or owner by name only ({named})"
        );
        match parse(&text) {
            Ok(_) => misses.push(format!("{pin}: compiled, expected {want}")),
            Err(errors) if !errors.iter().any(|e| e.starts_with(&want)) => {
                misses.push(format!("{pin}: want {want:?}, got:\n{}", errors.join("\n")))
            }
            Err(_) => {}
        }
    }
    assert!(misses.is_empty(), "{}", misses.join("\n\n"));

    // Ids pin: GitHub's immutable subject, the id claims and `ci` fields, and on
    // Bitbucket `ci.repository` and `ci.workspace`, which are its UUIDs.
    for (issuer, pin) in [
        ("github", "subject = \"repo:acme@65/*\""),
        ("github", "subject = [\"repo:acme@65/**\", \"repo:acme@65/api@74:*\"]"),
        ("github", "ci = { repository = \"acme/api\", repository_id = \"74\" }"),
        ("github", "claims = { repository_owner_id = \"65\" }"),
        ("gitlab", "ci = { workspace_id = \"72\", repository = \"acme/platform/api\" }"),
        ("bitbucket", "ci = { workspace = \"{7baee083-4f25-4a97-8a9a-0fde1b623b45}\" }"),
    ] {
        must_parse(&format!(
            "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"GET\"\n{pin}\n"
        ));
    }
}

/// Express (its default, non-strict routing), Rails, ASP.NET Core and Spring MVC before
/// 6 route `/admin/` to the `/admin` handler: a deny written `/admin` must not let
/// `GET /admin/` (or `/admin//`, which is the same canonical path) through. An allow is
/// not widened (fail closed).
#[test]
fn a_deny_on_a_path_covers_it_with_or_without_a_trailing_slash() {
    let text = r#"
[[rule]]
id = "engineers"
effect = "allow"
issuer = "corp"

[[rule]]
id = "no-admin"
effect = "deny"
issuer = "corp"
paths = ["/admin", "/users/*", "/billing/", "/api/*/keys/"]

[[test]]
name = "a trailing slash does not escape the deny"
identity = { issuer = "corp" }
request = "GET /admin/"
expect = "deny"
rule = "no-admin"
"#;
    let p = must_parse(text);
    let failed: Vec<String> =
        run_tests(&p).iter().filter(|o| !o.passed()).map(|o| o.to_string()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let id = human(json!({}));
    use Reason::{Allowed, DeniedByRule, PolicyDenied};
    for (path, reason) in [
        ("/admin", DeniedByRule),
        ("/admin/", DeniedByRule),
        ("/users/42", DeniedByRule),
        ("/users/42/", DeniedByRule),
        ("/billing/", DeniedByRule),
        ("/billing", DeniedByRule),
        ("/api/v1/keys/", DeniedByRule),
        ("/api/v1/keys", DeniedByRule),
        // Near misses: the deny names these paths only, not what is below them.
        ("/admin/x", Allowed),
        ("/administrator", Allowed),
        ("/users/42/x", Allowed),
        ("/billing/x", Allowed),
        ("/", Allowed),
    ] {
        let facts = RequestFacts::http(&http::Method::GET, path);
        let d = p.evaluate(&id, &facts);
        assert_eq!(d.reason, reason, "{path}");
        assert_eq!(p.explain(&id, &facts).decision, d, "{path}: explain agrees");
        // A caller without a credential meets the same deny.
        let anonymous = p.decide(None, &facts);
        assert!(!anonymous.allowed, "{path}");
    }
    let anonymous = p.decide(None, &RequestFacts::http(&http::Method::GET, "/admin/"));
    assert_eq!(anonymous.reason, DeniedByRule);

    // An allow of `/status` does not open `/status/`.
    let allow = must_parse(
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\npaths = [\"/status\"]\n",
    );
    for (path, reason) in [("/status", Allowed), ("/status/", PolicyDenied)] {
        let d = allow.evaluate(&id, &RequestFacts::http(&http::Method::GET, path));
        assert_eq!(d.reason, reason, "{path}");
    }

    // The deny in words says so.
    let rule = p.rules().iter().find(|r| r.id() == "no-admin");
    let words = rule.map(|r| r.summary(&catalog()).what_phrase()).unwrap_or_default();
    assert_eq!(
        words,
        "requests to paths matching `/admin`, `/users/*`, `/billing/` or `/api/*/keys/`, with or without a trailing `/`"
    );
}

/// A claim the provider put elsewhere (OIDC Core §5.6.2 distributed claims: Entra's
/// group overage names `groups` in `_claim_names`, or says `hasgroups: true`) has no
/// value in the token: a deny on `claims.groups` read it as absent and let the caller
/// through, where `groups_any` fails closed. Such a claim is unknown, as a claim a
/// session did not keep: a deny naming it applies, an allow naming it is skipped.
#[test]
fn a_claim_the_provider_holds_elsewhere_fails_closed() {
    let p = must_parse(
        r#"
[[rule]]
id = "everyone"
effect = "allow"
issuer = "corp"
methods = ["GET"]

[[rule]]
id = "no-contractors"
effect = "deny"
issuer = "corp"
claims = { groups = "contractors" }

[[rule]]
id = "admins-write"
effect = "allow"
issuer = "corp"
methods = ["POST"]
claims = { wids = "admin-role" }
"#,
    );
    let (get, post) = (http::Method::GET, http::Method::POST);
    let get_x = RequestFacts::http(&get, "/x");
    let overage = json!({ "src1": { "endpoint": "https://graph.microsoft.com/v1.0/users/x/getMemberObjects" } });
    for token in [
        json!({ "_claim_names": { "groups": "src1" }, "_claim_sources": overage }),
        json!({ "hasgroups": true }),
    ] {
        let id = human(token.clone());
        let d = p.evaluate(&id, &get_x);
        assert_eq!(
            (d.reason, d.rule.as_ref().map(|r| &*r.id)),
            (Reason::DeniedByRule, Some("no-contractors")),
            "{token}"
        );
        assert_eq!(
            d.detail(),
            "claim `groups` is held elsewhere by the provider (`_claim_names`, `hasgroups`), so its value is unknown: deny applies"
        );
        assert_eq!(p.explain(&id, &get_x).decision, d, "explain agrees");
    }
    // An allow on a claim held elsewhere is skipped, whatever the token says beside it.
    let id = human(json!({ "wids": "admin-role", "_claim_names": { "wids": "src1" } }));
    let d = p.evaluate(&id, &RequestFacts::http(&post, "/x"));
    assert_eq!(d.reason, Reason::PolicyDenied);
    assert!(d.detail().ends_with("an allow naming it cannot match"), "{}", d.detail());
    // Near misses: groups in the token, or `hasgroups: false`, decide as written.
    let id = human(json!({ "groups": ["engineering"], "hasgroups": false }));
    assert_eq!(p.evaluate(&id, &get_x).reason, Reason::Allowed);
    let id = human(json!({ "groups": ["contractors"] }));
    assert_eq!(p.evaluate(&id, &get_x).reason, Reason::DeniedByRule);
    assert_eq!(p.evaluate(&id, &get_x).detail(), "denied by policy");
    let id = human(json!({ "wids": "admin-role", "_claim_names": { "other": "src1" } }));
    assert_eq!(p.evaluate(&id, &RequestFacts::http(&post, "/x")).reason, Reason::Allowed);
}

/// GitHub's immutable subject claims (`repo:OWNER@ID/REPO@ID:…`, the default for
/// repositories created or renamed since July 2026, and an opt-in any repository admin
/// may take) never match a subject pattern that names the owner: a deny written
/// `subject = "repo:acme/playground:*"` stops applying the day the denied repository's
/// own admins opt in. Such a deny is flagged; near misses are not.
#[test]
fn a_github_deny_by_subject_name_is_flagged() {
    let deny = |subject: &str| {
        format!(
            "[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"github\"\nsubject = {subject}\n"
        )
    };
    for subject in ["\"repo:acme/playground:*\"", "[\"repo:acme@65/**\", \"repo:acme/**\"]"] {
        let p = must_parse(&deny(subject));
        let warnings: Vec<String> = p.warnings().iter().map(|d| d.to_string()).collect();
        let want = "p.toml:5:11: warning: deny rule `d` matches GitHub subjects by name (`repo:acme/`): a repository with immutable subject claims (`repo:OWNER@ID/REPO@ID:…`) never matches it";
        assert!(warnings.iter().any(|w| w.starts_with(want)), "{subject}: {warnings:?}");
    }
    for subject in ["\"repo:acme@65/**\"", "\"repo:*\"", "\"repo:acme@*/**\""] {
        let p = must_parse(&deny(subject));
        assert!(p.warnings().is_empty(), "{subject}: {:?}", p.warnings());
    }
    // On an `oidc` issuer a `repo:` subject is whatever that provider means by it.
    let p = must_parse(
        "[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"corp\"\nsubject = \"repo:acme/*\"\n",
    );
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

/// A `[[test]]` identity whose claims say the groups overflowed (`hasgroups`, or
/// `groups` in `_claim_names`) has unknown groups, as the verifier gives such a token:
/// before, only `groups_known = false` said so, and a test of an overage token passed
/// through a group allow that no real one gets through.
#[test]
fn a_test_identity_with_overage_claims_has_unknown_groups() {
    let text = r#"
[[rule]]
id = "admins"
effect = "allow"
issuer = "corp"
groups_any = ["admins"]

[[test]]
name = "an overage token is not known to be an admin"
identity = { issuer = "corp", groups = ["admins"], claims = { hasgroups = true } }
request = "GET /"
expect = "deny"

[[test]]
name = "distributed groups are not known either"
identity = { issuer = "corp", groups = ["admins"], claims = { _claim_names = { groups = "src1" } } }
request = "GET /"
expect = "deny"

[[test]]
name = "hasgroups false is a complete list"
identity = { issuer = "corp", groups = ["admins"], claims = { hasgroups = false } }
request = "GET /"
expect = "allow"
"#;
    let p = must_parse(text);
    let failed: Vec<String> =
        run_tests(&p).iter().filter(|o| !o.passed()).map(|o| o.to_string()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

/// On GitLab any developer's pipeline, from any branch, may name `environment:
/// production`; only a protected environment (`environment_protected = "true"`) or a
/// protected ref tells the real deployment apart. An allow that can write and trusts the
/// environment's name alone is flagged, as one trusting a branch alone is.
#[test]
fn a_gitlab_allow_trusting_an_environment_name_alone_is_flagged() {
    let allow = |extra: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"gitlab\"\nmethods = \"POST\"\nclaims = {{ namespace_id = \"72\", project_id = \"20\"{extra} }}\nci = {{ environment = \"production\" }}\n")
    };
    let want = "p.toml:7:8: warning: allow rule `a` trusts a GitLab environment name alone (issuer `gitlab`)";
    let p = must_parse(&allow(""));
    let warnings: Vec<String> = p.warnings().iter().map(|d| d.to_string()).collect();
    assert!(warnings.iter().any(|w| w.starts_with(want)), "{warnings:?}");
    for extra in [", environment_protected = \"true\"", ", ref_protected = \"true\""] {
        let p = must_parse(&allow(extra));
        assert!(p.warnings().is_empty(), "{extra}: {:?}", p.warnings());
    }
    // Read-only rules are not flagged.
    let p = must_parse(&allow("").replace("\"POST\"", "\"GET\""));
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

/// A policy file's key of more than 80 dotted parts (`recursion limit` in the `toml`
/// crate, which gives no position) is reported at the key, not at `1:1`.
#[test]
fn a_too_deeply_dotted_key_in_a_policy_is_reported_at_the_key() {
    let deep = vec!["\"a.b\""; 81].join(" . ");
    let e = parse(&format!("# a comment.with.dots\n[[rule]]\nid = \"x.y.z\"\n{deep} = 1\n"))
        .err()
        .unwrap_or_default();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("p.toml:4:1: recursion limit"), "{e:?}");
}

/// The proxy refuses `CONNECT` and `TRACE` on every route before any policy (405).
/// Attack (round 14): `check` passed a `[[test]]` of `CONNECT /x` expecting `allow`
/// (and `policy explain` would say allowed) while `serve` refuses every such request,
/// and a rule naming either reads in review as admitting something. A test request
/// with one is an error, as a path the proxy refuses is; a rule naming one is warned.
#[test]
fn methods_the_proxy_never_forwards_are_flagged() {
    let never = |l: &String| l.contains("never forwards");
    for m in ["CONNECT", "TRACE"] {
        let rule = format!(
            "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = [\"GET\", \"{m}\"]\n"
        );
        let test = format!(
            "\n[[test]]\nname = \"t\"\nidentity = {{ issuer = \"corp\" }}\nrequest = \"{m} /x\"\nexpect = \"allow\"\n"
        );
        let errors = parse(&format!("{rule}{test}")).err().unwrap_or_default();
        assert!(errors.iter().any(|e| never(e) && e.contains(m)), "{m}: {errors:?}");
        let lints: Vec<String> =
            lint(&must_parse(&rule), &catalog()).iter().map(|l| l.to_string()).collect();
        let dead = |l: &String| l.contains("never reaches a policy") && l.contains(m);
        assert!(lints.iter().any(dead), "{m}: {lints:?}");
    }
    // Near miss: the methods the proxy forwards.
    let rule = "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\nmethods = [\"GET\", \"OPTIONS\"]\n\n[[test]]\nname = \"t\"\nidentity = { issuer = \"corp\" }\nrequest = \"OPTIONS /x\"\nexpect = \"allow\"\n";
    let lints: Vec<String> =
        lint(&must_parse(rule), &catalog()).iter().map(|l| l.to_string()).collect();
    assert!(!lints.iter().any(|l| l.contains("never reaches a policy")), "{lints:?}");
}

/// A `[[test]]` identity of a CI issuer says when its token was minted, as every CI
/// token the verifier accepts does (V18): the preset's template and a test written with
/// `issuer` alone get the fixed `iat`, one the `claims` give is kept, and a claim set
/// without one is what `policy explain --claims` refuses, as `serve` does.
#[test]
fn ci_test_identities_carry_the_iat_serve_requires() {
    let policy = |identity: &str| {
        format!("[[rule]]\nid = \"ci\"\neffect = \"allow\"\nissuer = \"github\"\nci = {{ repository_id = \"1\" }}\n\n[[test]]\nname = \"t\"\nidentity = {identity}\nrequest = \"GET /\"\nexpect = \"allow\"\n")
    };
    let issued_at = |identity: &str| {
        let p = must_parse(&policy(identity));
        p.tests()[0].identity.as_ref().and_then(|i| i.issued_at)
    };
    let fixed = Some(claims::TEST_IAT);
    assert_eq!(issued_at("{ preset = \"github-actions\" }"), fixed);
    assert_eq!(issued_at("{ issuer = \"github\", claims = { repository_id = \"1\" } }"), fixed);
    let own = "{ issuer = \"github\", claims = { repository_id = \"1\", iat = 1700000000 } }";
    assert_eq!(issued_at(own), Some(1_700_000_000));
    let settings = crate::identity::IssuerSettings::declared("github", Preset::GithubActions);
    let mut no_iat = claims::template(Preset::GithubActions);
    no_iat.remove("iat");
    let refused = crate::identity::unverified_identity(&settings, no_iat).err();
    assert_eq!(refused.map(|e| e.reason), Some(crate::reason::Reason::TokenIssuedAt));
}

/// GitLab's `ref` claim is the bare name of a branch *or* a tag (`ref_type` tells which),
/// so `claims.ref = "main"` also matches a pipeline of a tag named `main`, which any
/// developer of the project can push where tags are not protected (GitLab protects none
/// by default). Round 17: `claims = { project_id = "20", ref = "main", pipeline_source =
/// "push" }` passed every lint (`pipeline_source` silences "branch alone") and let a tag
/// push deploy as `main`. An allow naming `claims.ref` must say which kind of ref.
#[test]
fn a_gitlab_allow_on_the_bare_ref_claim_must_say_branch_or_tag() {
    let allow = |extra: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"gitlab\"\nmethods = \"POST\"\nclaims = {{ namespace_id = \"72\", project_id = \"20\", ref = \"main\", pipeline_source = \"push\"{extra} }}\n")
    };
    let want = "p.toml:6:52: allow rule `a` reads GitLab's `ref` claim without `ref_type`";
    let errors = parse(&allow("")).err().unwrap_or_default();
    assert!(errors.iter().any(|e| e.starts_with(want)), "{errors:?}");
    // What it let through: a tag named `main`.
    let tag = gitlab(
        json!({"namespace_id": "72", "project_id": "20", "ref": "main", "ref_type": "tag", "pipeline_source": "push"}),
    );
    let branch = gitlab(
        json!({"namespace_id": "72", "project_id": "20", "ref": "main", "ref_type": "branch", "pipeline_source": "push"}),
    );
    let post = http::Method::POST;
    let request = RequestFacts::http(&post, "/deploy");
    let p = must_parse(&allow(", ref_type = \"branch\""));
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    assert!(!p.evaluate(&tag, &request).allowed);
    assert!(p.evaluate(&branch, &request).allowed);
    // Saying the kind otherwise is enough; a deny naming `ref` (wider) is fine.
    for other in
        [", ref_path = \"refs/heads/main\" }\nci = { branch = \"main\"", " }\nci = { tag = \"v*\""]
    {
        let text = allow(other);
        assert!(parse(&text).is_ok(), "{text}: {:?}", parse(&text).err());
    }
    assert!(parse(&allow("").replace("\"allow\"", "\"deny\"")).is_ok());
}

/// Bitbucket sends its UUIDs braced and in lower case (`{2e9e429c-…}`), in the claims and
/// so in the `ci` fields read from them. A deny written with the UUID as another tool
/// shows it — without braces, or in upper case — never matched: a hole that compiled.
/// `ci.environment` (and the pipeline, run and step ids) in upper case, and any UUID
/// claim without braces or in upper case, are errors now, as an unbraced `ci` field was.
/// (`ci.repository` and `ci.workspace` match in any case.)
#[test]
fn a_bitbucket_uuid_written_unbraced_or_in_upper_case_is_an_error() {
    let deny = |cond: &str| {
        format!("[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"bitbucket\"\n{cond}\n")
    };
    for cond in [
        "claims = { repositoryUuid = \"2e9e429c-7b8b-404f-8648-8c40c27c9ebd\" }",
        "claims = { workspaceUuid = [\"{7baee083-4f25-4a97-8a9a-0fde1b623b45}\", \"{7BAEE083-4F25-4A97-8A9A-0FDE1B623B45}\"] }",
        "claims = { deploymentEnvironmentUuid = \"{5C1F3D0A-1111-4A2B-9C3D-0E1F2A3B4C5D}\" }",
        "ci = { environment = \"{5C1F3D0A-1111-4A2B-9C3D-0E1F2A3B4C5D}\" }",
        "ci = { step = \"{9F8E7D6C-*\" }",
    ] {
        let errors = parse(&deny(cond)).err().unwrap_or_default();
        assert!(
            errors.iter().any(|e| e.contains("can never match") && e.contains("lower-case")),
            "{cond}: {errors:?}"
        );
    }
    for cond in [
        "claims = { repositoryUuid = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }",
        "claims = { deploymentEnvironmentUuid = [\"{5c1f3d0a-*\", \"*\"] }",
        "ci = { environment = \"{5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}\" }",
        "ci = { repository = \"{2E9E429C-7B8B-404F-8648-8C40C27C9EBD}\" }",
        "claims = { branchName = \"Main\" }",
    ] {
        assert!(parse(&deny(cond)).is_ok(), "{cond}: {:?}", parse(&deny(cond)).err());
    }
    // The upper-case repository matches the token's lower-case UUID.
    let p = must_parse(&deny("ci = { repository = \"{2E9E429C-7B8B-404F-8648-8C40C27C9EBD}\" }"));
    let get = http::Method::GET;
    let d = p.evaluate(&bitbucket(BB_REPO, "main"), &RequestFacts::http(&get, "/"));
    assert_eq!(d.reason, Reason::DeniedByRule);
}

/// A braced, lower-case value that is not a UUID's shape (`{repo}`, a group short, a
/// digit too many, a letter past `f`) passed `check`, yet Bitbucket sends UUIDs only, so
/// it never matched: a deny written so let the repository through. It is an error at
/// the condition, as an unbraced or upper-case one is; a pattern that can still match
/// some UUID (`{5c1f3d0a-*`, `{????????-*}`) is not.
#[test]
fn a_bitbucket_uuid_look_alike_is_an_error() {
    let deny = |cond: &str| {
        format!("[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"bitbucket\"\n{cond}\n")
    };
    for cond in [
        "claims = { repositoryUuid = \"{repo}\" }",
        "claims = { repositoryUuid = \"{2e9e429c-7b8b-404f-8648}\" }",
        "claims = { workspaceUuid = \"{7baee083-4f25-4a97-8a9a-0fde1b623b450}\" }",
        "claims = { stepUuid = \"{7baee083-4f25-4a97-8a9a-0fde1b623g45}\" }",
        "claims = { deploymentEnvironmentUuid = [\"{5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}\", \"{production}\"] }",
        "ci = { repository = \"{ACME-API}\" }",
        "ci = { environment = \"{5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}*x\" }",
        "ci = { workspace_id = \"{7baee083-4f25-4a97-8a9a-0fde1b623b45}}\" }",
        "ci = { pipeline = \"{*}-\" }",
    ] {
        let errors = parse(&deny(cond)).err().unwrap_or_default();
        assert!(
            errors.iter().any(|e| e.starts_with("p.toml:5:")
                && e.contains("can never match")
                && e.contains("braced lower-case UUID")),
            "{cond}: {errors:?}"
        );
    }
    for cond in [
        "claims = { repositoryUuid = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }",
        "claims = { deploymentEnvironmentUuid = [\"{5c1f3d0a-*\", \"*\"] }",
        "claims = { stepUuid = \"{????????-*}\" }",
        "claims = { pipelineUuid = \"*-8c40c27c9ebd}\" }",
        "ci = { repository = \"{2E9E429C-7B8B-404F-8648-8C40C27C9EBD}\" }",
        "ci = { run = \"**\" }",
    ] {
        assert!(parse(&deny(cond)).is_ok(), "{cond}: {:?}", parse(&deny(cond)).err());
    }
}

/// `ref_protected` and `environment_protected` tell a protected ref or environment from
/// one any developer's pipeline may name only when the rule asks for `"true"`: a
/// malicious policy change writing `ref_protected = "*"` (or `["true", "false"]`, or
/// `"false"`) read in review as a pin, silenced the GitLab branch-alone and
/// environment-alone warnings, and matched the unprotected fork branch or environment
/// as well. Only a condition that holds for `"true"` alone counts as the pin.
#[test]
fn a_gitlab_protection_pin_counts_only_when_it_asks_for_true() {
    let rule = |cond: &str, ci: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"gitlab\"\nmethods = \"POST\"\nclaims = {{ namespace_id = \"72\", project_id = \"20\"{cond} }}\nci = {{ {ci} }}\n")
    };
    let warned = |text: &str, what: &str| {
        let p = must_parse(text);
        p.warnings().iter().any(|d| d.to_string().contains(what))
    };
    for value in ["\"*\"", "[\"true\", \"false\"]", "\"false\"", "\"t*\""] {
        for claim in ["ref_protected", "environment_protected"] {
            let cond = format!(", {claim} = {value}");
            let text = rule(&cond, "branch = \"main\"");
            assert!(warned(&text, "trusts a GitLab branch alone"), "{cond}");
            let text = rule(&cond, "environment = \"production\"");
            assert!(warned(&text, "trusts a GitLab environment name alone"), "{cond}");
        }
    }
    for claim in ["ref_protected", "environment_protected"] {
        let cond = format!(", {claim} = \"true\"");
        for ci in ["branch = \"main\"", "environment = \"production\""] {
            let p = must_parse(&rule(&cond, ci));
            assert!(p.warnings().is_empty(), "{cond} {ci}: {:?}", p.warnings());
        }
    }
}

/// A `ci.branch` of wildcards only (`**`, `?**`) already counted as no restriction for
/// the "from any branch" warning, but the same in `claims` did not: `claims.ref = "**"`,
/// `branchName = "?**"`, `environment = "*"` or `ref_protected = "*"` silenced it while
/// every branch matched (a malicious policy change that reads as a restriction).
#[test]
fn a_ref_claim_of_wildcards_only_restricts_no_branch() {
    let any_branch = |issuer: &str, claims: &str| {
        let text = format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"POST\"\nclaims = {{ {claims} }}\n");
        let p = must_parse(&text);
        p.warnings().iter().any(|d| d.to_string().contains("from any branch"))
    };
    for (issuer, claims) in [
        ("github", "repository_owner_id = \"65\", ref = \"**\""),
        ("github", "repository_owner_id = \"65\", environment = [\"*\", \"prod\"]"),
        (
            "bitbucket",
            "repositoryUuid = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\", branchName = \"?**\"",
        ),
        ("gitlab", "project_id = \"20\", ref_protected = \"*\""),
        ("gitlab", "project_id = \"20\", environment_protected = [\"true\", \"false\"]"),
    ] {
        assert!(any_branch(issuer, claims), "{issuer}: {claims}");
    }
    for (issuer, claims) in [
        ("github", "repository_owner_id = \"65\", ref = \"refs/heads/main\""),
        ("github", "repository_owner_id = \"65\", environment = \"prod*\""),
        ("bitbucket", "repositoryUuid = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\", branchName = \"release/*\""),
        ("gitlab", "project_id = \"20\", ref_protected = \"true\""),
    ] {
        assert!(!any_branch(issuer, claims), "{issuer}: {claims}");
    }
}

/// The GitHub and GitLab branch-alone warnings took any condition on a pinning claim
/// or `ci` field for the pin: `claims.event_name = "*"`, `claims.job_workflow_ref =
/// "**"` or `ci.environment = "*"` beside `ci.branch = "main"` silenced the warning and
/// still matched a `pull_request_target` run carrying `main`. A pattern of wildcards
/// only pins nothing, as it restricts no branch.
#[test]
fn a_branch_alone_pin_of_wildcards_only_pins_nothing() {
    let rule = |issuer: &str, pin: &str, more: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"POST\"\nclaims = {{ {pin}{more} }}\nci = {{ branch = \"main\" }}\n")
    };
    let warned = |text: &str| {
        must_parse(text).warnings().iter().any(|d| d.to_string().contains("branch alone"))
    };
    let gh = "repository_owner_id = \"65\"";
    let gl = "project_id = \"20\"";
    for (issuer, pin, more) in [
        ("github", gh, ", event_name = \"*\""),
        ("github", gh, ", job_workflow_ref = \"**\""),
        ("github", gh, ", environment = [\"production\", \"?**\"]"),
        ("gitlab", gl, ", pipeline_source = \"**\""),
    ] {
        assert!(warned(&rule(issuer, pin, more)), "{issuer}: {more}");
    }
    let text = rule("github", gh, "")
        .replace("branch = \"main\"", "branch = \"main\", environment = \"*\"");
    assert!(warned(&text), "{text}");
    for (issuer, pin, more) in [
        ("github", gh, ", event_name = \"push\""),
        ("github", gh, ", workflow_ref = \"acme/deploy/.github/workflows/d.yml@refs/heads/main\""),
        ("gitlab", gl, ", pipeline_source = \"push\""),
    ] {
        assert!(!warned(&rule(issuer, pin, more)), "{issuer}: {more}");
    }
}

/// `claims.job_workflow_ref` silenced the GitHub branch-alone warning, yet for a job of
/// a reusable workflow it names the called workflow (`acme/automation/.github/workflows/
/// deploy.yml@refs/heads/main`), whatever workflow and event called it: a
/// `pull_request_target` workflow of the same repository that calls it gets a token
/// with `ref = refs/heads/main` and that `job_workflow_ref`. The caller is
/// `workflow_ref`, which still pins; the warning says why the other does not.
#[test]
fn a_called_workflow_pin_does_not_pin_the_caller() {
    let rule = |pin: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"github\"\nmethods = \"POST\"\nclaims = {{ repository_owner_id = \"65\", {pin} }}\nci = {{ branch = \"main\" }}\n")
    };
    let called = "acme/automation/.github/workflows/deploy.yml@refs/heads/main";
    let policy = must_parse(&rule(&format!("job_workflow_ref = \"{called}\"")));
    let warning = policy
        .warnings()
        .iter()
        .map(ToString::to_string)
        .find(|d| d.contains("branch alone"))
        .unwrap_or_default();
    assert!(warning.contains("claims.workflow_ref"), "{warning}");
    assert!(
        warning.contains("`claims.job_workflow_ref` names the workflow the job runs"),
        "{warning}"
    );
    let caller = must_parse(&rule(&format!("workflow_ref = \"{called}\"")));
    assert!(
        !caller.warnings().iter().any(|d| d.to_string().contains("branch alone")),
        "{:?}",
        caller.warnings()
    );
}

/// Patterns that read like a pin but match every repository of a shared issuer (or
/// every owner) are none (V22): a star for the whole value, a star on each side of the
/// owner's `/`, a glob on the owner or on the start of an id or UUID, and a list with
/// one such item beside a real pin. Pins what was sound; seen failing with `pins`
/// taking any pattern.
#[test]
fn a_wildcard_shaped_like_a_pin_pins_nothing() {
    for (issuer, cond) in [
        ("bitbucket", "ci = { repository = \"*\" }"),
        ("bitbucket", "ci = { repository = \"**\" }"),
        ("bitbucket", "ci = { workspace = \"{*}\" }"),
        ("bitbucket", "ci = { repository = \"{2e9e*\" }"),
        ("bitbucket", "claims = { repositoryUuid = \"{?**\" }"),
        ("bitbucket", "subject = \"{*}:**\""),
        ("github", "ci = { repository_id = \"*\" }"),
        ("github", "ci = { repository_id = \"*/*\" }"),
        ("github", "ci = { workspace_id = \"6*\" }"),
        ("github", "claims = { repository_owner_id = [\"65\", \"*\"] }"),
        ("github", "claims = { repository_id = \"??\" }"),
        ("github", "subject = \"repo:*@65/**\""),
        ("github", "subject = \"repo:acme@*/**\""),
        ("gitlab", "ci = { workspace_id = \"**\" }"),
        ("gitlab", "claims = { project_id = \"2*\" }"),
    ] {
        let text = format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"GET\"\n{cond}\n");
        let errors = parse(&text).err().unwrap_or_default();
        assert!(
            errors.iter().any(|e| e.contains("does not pin a repository or owner")),
            "{issuer}: {cond}: {errors:?}"
        );
    }
}

/// A subject whose literal part ends at `:ref:` or `:environment:` names no ref or
/// environment (`repo:acme@65/api@74:ref:**` matches every branch and tag), yet it
/// counted as one: it silenced the "from any branch" warning, and `…:environment:*`
/// the GitHub branch-alone one. Only a subject that fixes something after the marker
/// restricts.
#[test]
fn a_subject_ending_at_its_ref_or_environment_marker_restricts_nothing() {
    let rule = |subject: &str, more: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"github\"\nmethods = \"POST\"\nsubject = \"{subject}\"\n{more}")
    };
    let warns = |text: &str, what: &str| {
        must_parse(text).warnings().iter().any(|d| d.to_string().contains(what))
    };
    for subject in ["repo:acme@65/api@74:ref:**", "repo:acme@65/api@74:environment:*"] {
        assert!(warns(&rule(subject, ""), "from any branch"), "{subject}");
    }
    let branch = "ci = { branch = \"main\" }\n";
    assert!(warns(&rule("repo:acme@65/api@74:environment:*", branch), "branch alone"));
    for subject in
        ["repo:acme@65/api@74:ref:refs/heads/main", "repo:acme@65/api@74:environment:prod*"]
    {
        assert!(!warns(&rule(subject, ""), "from any branch"), "{subject}");
    }
    assert!(!warns(&rule("repo:acme@65/api@74:environment:prod", branch), "branch alone"));
    // GitLab: a subject ending at `:ref:` does not take the environment warning's place.
    let gitlab = |subject: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"gitlab\"\nmethods = \"POST\"\nsubject = \"{subject}\"\nclaims = {{ project_id = \"20\" }}\nci = {{ environment = \"production\" }}\n")
    };
    let alone = "trusts a GitLab environment name alone";
    assert!(warns(&gitlab("project_path:acme/api:ref_type:branch:ref:*"), alone));
    assert!(!warns(&gitlab("project_path:acme/api:ref_type:branch:ref:main"), alone));
}

/// A GitHub or GitLab deny on a repository or owner *name* (`ci.repository`,
/// `ci.workspace`, `claims.repository`, `claims.project_path`, …) is left by a rename,
/// which the denied repository's own admins may make: the token then carries the new
/// name. Warned, as a deny on a name-form GitHub subject is; an id is what holds.
#[test]
fn a_github_or_gitlab_deny_by_name_is_flagged() {
    let deny = |issuer: &str, cond: &str| {
        format!("[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"{issuer}\"\n{cond}\n")
    };
    let warned = |text: &str| {
        must_parse(text).warnings().iter().any(|d| {
            let d = d.to_string();
            d.starts_with("p.toml:5:") && d.contains("a rename takes the repository out of it")
        })
    };
    for (issuer, cond) in [
        ("github", "ci = { repository = \"acme/legacy\" }"),
        ("github", "ci = { workspace = \"contractors\" }"),
        ("github", "claims = { repository = \"acme/legacy\" }"),
        ("github", "claims = { repository_owner = \"contractors\" }"),
        ("gitlab", "ci = { repository = \"acme/old-api\" }"),
        ("gitlab", "claims = { project_path = \"acme/old-api\" }"),
        ("gitlab", "claims = { namespace_path = \"acme/contractors\" }"),
    ] {
        assert!(warned(&deny(issuer, cond)), "{issuer}: {cond}");
    }
    for (issuer, cond) in [
        ("github", "ci = { repository_id = \"74\" }"),
        ("github", "claims = { repository_owner_id = \"65\" }"),
        ("gitlab", "claims = { project_id = \"20\" }"),
        // Bitbucket's `repository` is its UUID.
        ("bitbucket", "ci = { repository = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }"),
    ] {
        assert!(!warned(&deny(issuer, cond)), "{issuer}: {cond}");
    }
}

/// `claims.event_name` (GitHub) and `claims.pipeline_source` (GitLab) pin what an
/// outsider cannot choose only when they name no event an outsider can set off: a
/// `pull_request_target`, `workflow_run`, `issue_comment` (…) run carries the base
/// branch's ref, and a GitLab merge-request pipeline (`merge_request_event`, and the
/// `parent_pipeline` children of one) from a fork carries the fork's branch name.
/// `event_name = "pull_request_target"`, `["push", "workflow_run"]` or `"pull_request*"`
/// beside `ci.branch = "main"` silenced the branch-alone warning while admitting
/// exactly the runs it warns about.
#[test]
fn a_branch_alone_pin_naming_an_outsiders_event_pins_nothing() {
    let rule = |issuer: &str, pin: &str, more: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"POST\"\nclaims = {{ {pin}{more} }}\nci = {{ branch = \"main\" }}\n")
    };
    let warned = |text: &str| {
        must_parse(text).warnings().iter().any(|d| {
            let d = d.to_string();
            d.contains("branch alone") && d.contains("an outsider can set off")
        })
    };
    let gh = "repository_id = \"74\"";
    let gl = "project_id = \"20\"";
    for (issuer, pin, more) in [
        ("github", gh, ", event_name = \"pull_request_target\""),
        ("github", gh, ", event_name = [\"push\", \"workflow_run\"]"),
        ("github", gh, ", event_name = \"issue_comment\""),
        ("github", gh, ", event_name = \"pull_request*\""),
        ("github", gh, ", event_name = \"workflow_?un\""),
        ("gitlab", gl, ", pipeline_source = \"merge_request_event\""),
        ("gitlab", gl, ", pipeline_source = [\"push\", \"parent_pipeline\"]"),
        ("gitlab", gl, ", pipeline_source = \"merge_request*\""),
        ("gitlab", gl, ", pipeline_source = \"external_pull_request_event\""),
    ] {
        assert!(warned(&rule(issuer, pin, more)), "{issuer}: {more}");
    }
    for (issuer, pin, more) in [
        ("github", gh, ", event_name = \"push\""),
        ("github", gh, ", event_name = [\"push\", \"workflow_dispatch\", \"schedule\"]"),
        ("github", gh, ", event_name = \"release\""),
        ("gitlab", gl, ", pipeline_source = [\"push\", \"web\"]"),
        // A protected ref pins it whatever else the rule says.
        ("gitlab", gl, ", pipeline_source = \"merge_request_event\", ref_protected = \"true\""),
    ] {
        let text = rule(issuer, pin, more);
        let p = must_parse(&text);
        assert!(
            !p.warnings().iter().any(|d| d.to_string().contains("branch alone")),
            "{issuer}: {more}"
        );
    }
}

/// GitHub and GitLab ids are decimal numbers sent as strings (`"74"`): a value that
/// cannot be one (GitHub's GraphQL `node_id` `R_kgDO…`, GitLab's global id
/// `gid://gitlab/Project/20`, a name in an id field, full-width digits, a space, a
/// leading zero) never matches, and a deny written so is dead: the repository it names
/// went through. Like a Bitbucket UUID's spelling, a load error.
#[test]
fn a_github_or_gitlab_id_that_is_not_a_decimal_number_is_an_error() {
    let deny = |issuer: &str, cond: &str| {
        format!("[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"{issuer}\"\n{cond}\n")
    };
    for (issuer, cond) in [
        ("github", "claims = { repository_id = \"R_kgDOGx1234\" }"),
        ("github", "claims = { repository_owner_id = [\"65\", \"MDEyOk9yZ2FuaXphdGlvbjY1\"] }"),
        ("github", "claims = { repository_owner_id = \"\u{ff16}\u{ff15}\" }"),
        ("github", "claims = { repository_id = \" 74\" }"),
        ("github", "claims = { repository_id = \"074\" }"),
        ("github", "ci = { repository_id = \"acme/legacy\" }"),
        ("github", "ci = { workspace_id = \"acme\" }"),
        ("gitlab", "claims = { project_id = \"gid://gitlab/Project/20\" }"),
        ("gitlab", "claims = { namespace_id = \"acme/*\" }"),
        ("gitlab", "ci = { repository_id = \"acme/api\" }"),
    ] {
        let errors = parse(&deny(issuer, cond)).err().unwrap_or_default();
        assert!(
            errors.iter().any(|e| e.starts_with("p.toml:5:")
                && e.contains("can never match")
                && e.contains("decimal")),
            "{issuer}: {cond}: {errors:?}"
        );
    }
    for (issuer, cond) in [
        ("github", "claims = { repository_id = \"74\" }"),
        ("github", "claims = { repository_owner_id = [\"65\", \"1*\"] }"),
        ("github", "ci = { repository_id = \"7?\" }"),
        ("github", "ci = { workspace_id = \"**\" }"),
        ("gitlab", "claims = { project_id = \"20\", namespace_id = \"72\" }"),
        ("gitlab", "ci = { workspace_id = \"72\" }"),
        // Bitbucket's ids are its UUIDs.
        ("bitbucket", "ci = { repository_id = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }"),
    ] {
        assert!(
            parse(&deny(issuer, cond)).is_ok(),
            "{issuer}: {cond}: {:?}",
            parse(&deny(issuer, cond)).err()
        );
    }
}

/// Bitbucket tokens name no tag, commit or actor, and their `ci.ref` is always
/// `refs/heads/` + the branch: a Bitbucket deny on `ci.tag = "v*"`, `ci.ref =
/// "refs/tags/**"`, `ci.commit` or `ci.actor` never matched, so the tag pipelines (or
/// the commit, the person) it was written against went through.
#[test]
fn a_ci_field_bitbucket_never_sets_is_an_error() {
    let deny = |cond: &str| {
        format!("[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"bitbucket\"\nmethods = \"POST\"\n{cond}\n")
    };
    for cond in [
        "ci = { tag = \"v*\" }",
        "ci = { ref = \"refs/tags/**\" }",
        "ci = { ref = [\"refs/heads/main\", \"refs/tags/v*\"] }",
        "ci = { commit = \"714a629c0b401fdce83e847fc9589983fc6f46bc\" }",
        "ci = { actor = \"mallory\" }",
    ] {
        let errors = parse(&deny(cond)).err().unwrap_or_default();
        assert!(
            errors.iter().any(|e| e.starts_with("p.toml:6:")
                && e.contains("can never match")
                && e.contains("Bitbucket")),
            "{cond}: {errors:?}"
        );
    }
    for cond in [
        "ci = { ref = \"refs/heads/release/*\" }",
        "ci = { ref = \"refs/*/main\" }",
        "ci = { ref = \"**\" }",
        "ci = { branch = \"main\" }",
    ] {
        assert!(parse(&deny(cond)).is_ok(), "{cond}: {:?}", parse(&deny(cond)).err());
    }
    // Beside another provider, the field is that one's.
    let both = "[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = [\"bitbucket\", \"github\"]\nci = { tag = \"v*\" }\n";
    assert!(parse(both).is_ok(), "{:?}", parse(both).err());
}

/// A GitHub repository or GitLab project keeps its id when its admins transfer it to
/// another account, organization or group (GitHub lets a repository's admins do so by
/// default), where its new owner's pipelines mint tokens carrying that id: an allow
/// pinning the repository id alone went on admitting it, the former admin's own account
/// included. Pinning the owner id too (or GitHub's immutable subject, which names both)
/// ends that at the transfer.
#[test]
fn a_repository_id_pinned_without_its_owner_is_flagged() {
    let rule = |issuer: &str, cond: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"GET\"\n{cond}\n")
    };
    let warned = |text: &str| {
        must_parse(text).warnings().iter().any(|d| {
            let d = d.to_string();
            d.starts_with("p.toml:6:") && d.contains("transfer")
        })
    };
    for (issuer, cond) in [
        ("github", "claims = { repository_id = \"74\" }"),
        ("github", "ci = { repository_id = \"74\" }"),
        ("github", "claims = { repository_id = \"74\", repository_owner_id = \"6*\" }"),
        ("gitlab", "claims = { project_id = \"20\" }"),
        ("gitlab", "ci = { repository_id = \"20\", workspace = \"acme\" }"),
    ] {
        assert!(warned(&rule(issuer, cond)), "{issuer}: {cond}");
    }
    for (issuer, cond) in [
        ("github", "claims = { repository_owner_id = \"65\", repository_id = \"74\" }"),
        ("github", "ci = { workspace_id = \"65\", repository_id = \"74\" }"),
        ("github", "claims = { repository_owner_id = \"65\" }"),
        ("github", "subject = \"repo:acme@65/api@74:**\""),
        ("gitlab", "claims = { namespace_id = \"72\", project_id = \"20\" }"),
        ("bitbucket", "ci = { repository = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }"),
    ] {
        let text = rule(issuer, cond);
        assert!(!warned(&text), "{issuer}: {cond}");
        assert!(parse(&text).is_ok(), "{issuer}: {cond}");
    }
    // A deny on the repository id alone is the narrower deny, rightly.
    let deny = "[[rule]]\nid = \"d\"\neffect = \"deny\"\nissuer = \"github\"\nclaims = { repository_id = \"74\" }\n";
    assert!(must_parse(deny).warnings().is_empty());
}

/// Bitbucket lets a step on any branch name a deployment environment (`deployment:
/// production`) unless the environment's deployment permissions, a Premium feature,
/// restrict branches: any developer pushing a branch could deploy through an allow
/// that trusts the environment alone, as a GitLab one that trusts an unprotected
/// environment (already warned about). `check` said nothing.
#[test]
fn a_bitbucket_allow_trusting_a_deployment_environment_alone_is_flagged() {
    let env = "{5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}";
    let rule = |methods: &str, more: &str| {
        format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"bitbucket\"\nmethods = {methods}\nci = {{ repository = \"{BB_REPO}\"{more} }}\n")
    };
    let warned = |text: &str| {
        must_parse(text).warnings().iter().any(|d| {
            let d = d.to_string();
            d.starts_with("p.toml:6:") && d.contains("deployment environment alone")
        })
    };
    for (methods, more) in [
        ("\"POST\"", format!(", environment = \"{env}\"")),
        ("[\"GET\", \"PUT\"]", format!(", environment = \"{env}\", branch = \"**\"")),
    ] {
        assert!(warned(&rule(methods, &more)), "{methods} {more}");
    }
    let claim = format!("[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"bitbucket\"\nmethods = \"POST\"\nclaims = {{ repositoryUuid = \"{BB_REPO}\", deploymentEnvironmentUuid = \"{env}\" }}\n");
    assert!(warned(&claim), "{claim}");
    for (methods, more) in [
        ("\"POST\"", format!(", environment = \"{env}\", branch = \"main\"")),
        ("\"POST\"", format!(", environment = \"{env}\", ref = \"refs/heads/main\"")),
        ("\"GET\"", format!(", environment = \"{env}\"")),
    ] {
        assert!(!warned(&rule(methods, &more)), "{methods} {more}");
    }
}
