//! Routing, authentication, authorization, rejection responses and audit events.

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

#[tokio::test]
async fn no_token_is_401_with_a_bearer_challenge_and_fixed_body() {
    let w = World::start().await;
    let r = w.get("/hello", None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="portcullis""#);
    assert_eq!(r.json()["error"], "missing-token");
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["decision"], "deny");
    assert_eq!(ev["reason"], "missing-token");
    assert_eq!(ev["status"], 401);
    assert_eq!(ev["route"], "api");
}

#[tokio::test]
async fn each_preset_reaches_the_upstream_with_its_identity() {
    let w = World::start().await;
    for (issuer, rule, subject_has) in [
        ("bb", "bb-main", "{7f3c1e2a"),
        ("gh", "gh-main", "repo:demo-org/demo-api"),
        ("gl", "gl-main", "project_path:demo-group"),
        ("corp", "engineers", "demo-user"),
    ] {
        let r = w.get("/hello?x=1", Some(&w.token(issuer, &[]))).await;
        assert_eq!(r.status, StatusCode::OK, "{issuer}: {}", r.text());
        assert_eq!(r.upstream_header("x-portcullis-issuer").as_deref(), Some(issuer));
        let sub = r.upstream_header("x-portcullis-subject").unwrap_or_default();
        assert!(
            sub.contains(&subject_has.replace('{', "%7B")) || sub.contains(subject_has),
            "{sub}"
        );
        let rid = r.upstream_header("x-portcullis-request-id").unwrap_or_default();
        let ev = w.event_for(&rid).await;
        assert_eq!(ev["decision"], "allow", "{ev}");
        assert_eq!(ev["reason"], "allowed");
        assert_eq!(ev["rule"]["id"], rule);
        assert!(ev["rule"]["line"].as_u64().unwrap_or(0) > 0);
        assert!(ev["rule"]["file"].as_str().unwrap_or("").ends_with("api.toml"));
        assert_eq!(ev["identity"]["issuer"], issuer);
        assert_eq!(ev["path"], "/hello", "the query string is never logged");
        assert_eq!(ev["tls"]["version"], "TLSv1.3");
        assert_eq!(ev["tls"]["sni"], "localhost");
        assert!(ev["bytes_out"].as_u64().unwrap_or(0) > 0);
        assert!(ev["policy_revision"].as_str().unwrap_or("").starts_with("sha256:"));
    }
}

#[tokio::test]
async fn pipeline_events_carry_the_ci_context() {
    let w = World::start().await;
    let r = w
        .get("/deploy", Some(&w.token("bb", &["pipelineRunUuid={run-1}", "stepUuid={step-1}"])))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = w.last_event().await;
    assert_eq!(ev["ci"]["provider"], "bitbucket");
    assert_eq!(ev["ci"]["repository"], "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}");
    assert_eq!(ev["ci"]["branch"], "main");
    assert_eq!(ev["ci"]["run"], "{run-1}");
    assert_eq!(ev["ci"]["step"], "{step-1}");
    assert_eq!(ev["identity"]["kind"], "pipeline");
}

#[tokio::test]
async fn feature_branch_is_403_with_the_reason_code() {
    let w = World::start().await;
    let r = w.get("/hello", Some(&w.token("bb", &["branchName=feature/x"]))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "policy-denied");
    assert!(r.headers.get("www-authenticate").is_none());
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["reason"], "policy-denied");
    assert_eq!(ev["ci"]["branch"], "feature/x");
    // release/* is allowed by glob.
    let r = w.get("/hello", Some(&w.token("bb", &["branchName=release/1.2"]))).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn deny_rules_win_and_name_their_rule() {
    let w = World::start().await;
    let r = w.get("/admin/users", Some(&w.token("gh", &[]))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["reason"], "denied-by-rule");
    assert_eq!(ev["rule"]["id"], "no-admin-from-ci");
    // A human is not covered by the deny rule.
    let r = w.get("/admin/users", Some(&w.token("corp", &[]))).await;
    assert_eq!(r.status, StatusCode::OK);
    // `//admin` is the same path after normalization: still denied.
    let r = w.get("//admin//users", Some(&w.token("gh", &[]))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn humans_outside_the_group_are_denied() {
    let w = World::start().await;
    let r = w.get("/x", Some(&w.token("corp", &["groups:=[\"sales\"]"]))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = w.get("/x", Some(&w.token("corp", &["groups:=[\"sales\",\"engineering\"]"]))).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Keycloak puts roles in nested claims (`realm_access.roles`): `groups_claim` reads them
/// through a JSON Pointer, and the policy's own `[[test]]`s, run before the proxy serves,
/// read them (and write the `groups` shortcut) there too. The value there must be a list
/// of strings, as a `groups` claim must: anything else on the way refuses the token.
#[tokio::test]
async fn groups_in_nested_claims_are_read_through_a_json_pointer() {
    let policy = r#"
[[rule]]
id = "platform-admins"
effect = "allow"
issuer = "corp"
groups_any = ["platform-admin"]

[[test]]
name = "a realm role admits"
identity = { issuer = "corp", claims = { realm_access = { roles = ["offline_access", "platform-admin"] } } }
request = "GET /x"
expect = "allow"
rule = "platform-admins"

[[test]]
name = "the groups shortcut is a realm role"
identity = { issuer = "corp", groups = ["platform-admin"] }
request = "GET /x"
expect = "allow"

[[test]]
name = "a top-level groups claim is not where the roles are"
identity = { issuer = "corp", claims = { groups = ["platform-admin"], realm_access = { roles = ["offline_access"] } } }
request = "GET /x"
expect = "deny"
"#;
    let w = World::with(Setup {
        policies: vec![("api".into(), policy.into())],
        issuer_extra: "groups_claim = \"/realm_access/roles\"".into(),
        ..Setup::default()
    })
    .await;
    let roles = |r: &str| format!("realm_access:={{\"roles\":[{r}]}}");
    let admin = w.token("corp", &[&roles("\"offline_access\",\"platform-admin\"")]);
    assert_eq!(w.get("/x", Some(&admin)).await.status, StatusCode::OK);
    let other = w.token("corp", &[&roles("\"offline_access\""), "groups:=[\"platform-admin\"]"]);
    assert_eq!(w.get("/x", Some(&other)).await.status, StatusCode::FORBIDDEN);
    let malformed = w.token("corp", &["realm_access:=[\"platform-admin\"]"]);
    assert_eq!(w.get("/x", Some(&malformed)).await.status, StatusCode::UNAUTHORIZED);
}

/// The audit event says whether the address it records was verified by the issuer: a
/// token claiming `ceo@…` with `email_verified: false` must not read as the CEO's.
#[tokio::test]
async fn an_unverified_email_is_recorded_as_unverified() {
    let w = World::start().await;
    let claimed = ["email=ceo@acme.example", "email_verified:=false"];
    for (overrides, verified) in [(&claimed[..], false), (&claimed[..1], true)] {
        let r = w.get("/x", Some(&w.token("corp", overrides))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let rid = r.upstream_header("x-portcullis-request-id").unwrap_or_default();
        let ev = w.event_for(&rid).await;
        assert_eq!(ev["identity"]["email"], "ceo@acme.example", "{ev}");
        assert_eq!(ev["identity"]["email_verified"], verified, "{ev}");
        let forwarded = r.upstream_header("x-portcullis-email");
        assert_eq!(forwarded.is_some(), verified, "{forwarded:?}");
    }
}

#[tokio::test]
async fn routes_match_host_path_and_method_most_specific_first() {
    let routes = r#"
[[routes]]
name = "reports"
match = { host = "localhost", path_prefix = "/reports", methods = ["GET"] }
upstream = "http://{echo}/base"
policy = "open-humans"

[[routes]]
name = "wild"
match = { host = "*.example.test", path_prefix = "/" }
upstream = "http://{echo}"
policy = "open-humans"
"#;
    let humans = r#"
[[rule]]
id = "any-engineer"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]
"#;
    let w = World::with(Setup {
        routes: routes.into(),
        policies: vec![
            ("api".into(), ALLOW_ALL_PRESETS.into()),
            ("open-humans".into(), humans.into()),
        ],
        ..Setup::default()
    })
    .await;
    let t = w.token("corp", &[]);
    let r = w.get("/reports/q1", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["path"], "/base/reports/q1", "upstream base path is prepended");
    assert_eq!(w.last_event().await["route"], "reports");
    // Same prefix, other method: falls through to the catch-all route.
    let r = w
        .send(
            Method::POST,
            "/reports/q1",
            &[("authorization", &format!("Bearer {t}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["path"], "/reports/q1");
    // `/reportsx` is not under `/reports`.
    let r = w.get("/reportsx", Some(&t)).await;
    assert_eq!(r.json()["path"], "/reportsx");
}

#[tokio::test]
async fn no_route_is_404() {
    let routes = r#"
[[routes]]
name = "only"
match = { host = "api.example.test", path_prefix = "/v1" }
upstream = "http://{echo}"
policy = "api"
"#;
    let w = World::with(Setup { routes: routes.into(), default_route: false, ..Setup::default() })
        .await;
    let r = w.get("/v1/x", Some(&w.token("bb", &[]))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "no-route");
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["reason"], "no-route");
    assert!(ev.get("identity").is_none(), "routing happens before authentication");
}

#[tokio::test]
async fn ambiguous_paths_are_400_before_anything_else() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    for p in [
        "/a/%2e%2e/admin",
        "/a/..;/admin",
        "/admin;x/secret",
        "/a;jsessionid=1",
        "/admin%3Bx/secret",
        "/a%2fb",
        "/a/../b",
        "/x%5cy",
        "/a/%2E/b",
        // Overlong UTF-8 for `..` and `/`: what a lenient decoder (old IIS, Tomcat,
        // JBoss) reads as the characters refused above.
        "/public/%c0%ae%c0%ae/admin",
        "/public%C0%AFadmin",
        "/%E0%80%AE%E0%80%AE/admin",
        // A letter encoded twice: `admin` to a second decoding hop, past the deny on
        // `/admin/**` that a path it reads as `/%2561dmin/x` never matched.
        "/%2561dmin/x",
    ] {
        let r = w.get(p, Some(&t)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{p}");
        assert_eq!(r.json()["error"], "ambiguous-path");
    }
}

/// `:`, `@` and the other characters frameworks decode are decoded by the proxy too,
/// before routing and authorizing, and forwarded so: `%3A` cannot dodge a rule written
/// with `:`, nor `%40` a route's `path_prefix` written with `@`.
#[tokio::test]
async fn encoded_reserved_characters_are_authorized_and_forwarded_decoded() {
    let policy = format!(
        "{ALLOW_ALL_PRESETS}\n[[rule]]\nid = \"no-revoke\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = [\"/v1/keys/*:revoke\", \"/users/@me/**\"]\n"
    );
    let routes = r#"
[[routes]]
name = "ops"
match = { path_prefix = "/team/@ops" }
upstream = "http://{echo}/ops"
policy = "api"
"#;
    let w = World::with(Setup {
        routes: routes.into(),
        policies: vec![("api".into(), policy)],
        ..Setup::default()
    })
    .await;
    let t = w.token("corp", &[]);
    let auth = format!("Bearer {t}");
    let headers = [("authorization", auth.as_str())];
    let post = |path: &'static str| w.send(Method::POST, path, &headers, Bytes::new());
    for path in ["/v1/keys/k1:revoke", "/v1/keys/k1%3Arevoke", "/v1/keys/k1%3arevoke"] {
        let r = post(path).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text());
        let ev = w.event_for(&request_id(&r)).await;
        assert_eq!(ev["rule"]["id"], "no-revoke", "{path}");
        assert_eq!(ev["path"], "/v1/keys/k1:revoke", "{path}");
    }
    for path in ["/users/@me/tokens", "/users/%40me/tokens", "/users/%40me"] {
        let r = w.get(path, Some(&t)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text());
    }
    // Allowed: the upstream receives the decoded path, the one authorized; what stays
    // escaped goes with upper-case hex, and `+` as `%2B`.
    let r = post("/v1/keys/k1%3Aread%2C%21").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/v1/keys/k1:read,!");
    let r = w.get("/users/%40you/a%3fb+c%2bd%c3%a9", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/users/@you/a%3Fb%2Bc%2Bd%C3%A9");
    // Route selection sees the same path: `%40ops` is the `@ops` route.
    for path in ["/team/@ops/x", "/team/%40ops/x"] {
        let r = w.get(path, Some(&t)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(r.json()["path"], "/ops/team/@ops/x", "{path}");
        let rid = r.upstream_header("x-portcullis-request-id").unwrap_or_default();
        assert_eq!(w.event_for(&rid).await["route"], "ops", "{path}");
    }
}

#[tokio::test]
async fn sni_and_host_must_agree() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    // Connect with SNI `localhost` but ask for another host.
    let r = w
        .send(
            Method::GET,
            "/x",
            &[("authorization", &format!("Bearer {t}")), ("host", "other.example.test")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
}

#[tokio::test]
async fn tokens_in_the_url_are_never_accepted() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let r = w.get(&format!("/x?access_token={t}"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn proxy_authorization_carries_the_token_and_authorization_stays_the_apps() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let r = w
        .send(
            Method::GET,
            "/x",
            &[
                ("proxy-authorization", &format!("Bearer {t}")),
                ("authorization", "Basic YXBwOnNlY3JldA=="),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("authorization").as_deref(), Some("Basic YXBwOnNlY3JldA=="));
    assert_eq!(r.upstream_header("proxy-authorization"), None);
    // RFC 9111 §3.5 keeps shared caches from storing answers to `Authorization` only
    // (Varnish's built-in rules pass requests with it or a cookie, not with this one):
    // the answer is the token holder's.
    let cache_control: Vec<_> = r.headers.get_all("cache-control").iter().collect();
    assert_eq!(cache_control, ["private"]);
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers.get("cache-control"), None, "left to RFC 9111 §3.5");
    // Two bearer credentials are ambiguous.
    let r = w
        .send(
            Method::GET,
            "/x",
            &[
                ("proxy-authorization", &format!("Bearer {t}")),
                ("authorization", &format!("Bearer {t}")),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// A token the proxy verified in `Proxy-Authorization` beside another in `Authorization`
/// under a scheme of the application's naming (`JWT`, `Token`, Rails' `Token token="…"`),
/// none (a bare token, which Go's `strings.TrimPrefix(h, "Bearer ")` returns whole) or in
/// a list: the upstream, verifying tokens itself, would act as the second token's holder
/// while the proxy authorized and audited the first. Refused as ambiguous (400), nothing
/// forwarded; the application's own `Basic` credentials still pass (above).
#[tokio::test]
async fn a_second_token_under_another_scheme_beside_proxy_authorization_is_ambiguous() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let other = w.token("bb", &["branchName=feature/x"]);
    let proxy = format!("Bearer {t}");
    for value in [
        format!("JWT {other}"),
        format!("Token {other}"),
        other.clone(),
        format!("Token token=\"{other}\""),
        format!("Basic eDp5, Bearer {other}"),
    ] {
        let headers = [("proxy-authorization", proxy.as_str()), ("authorization", value.as_str())];
        let r = w.send(Method::GET, "/x", &headers, Bytes::new()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{value}: {}", r.text());
        assert_eq!(r.json()["error"], "ambiguous-credentials", "{}", r.text());
        assert_eq!(r.upstream_header("authorization"), None);
    }
    // Without a token of the proxy's, such a header is not a credential: 401.
    let r = w
        .send(Method::GET, "/x", &[("authorization", &format!("JWT {other}"))], Bytes::new())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
}

#[tokio::test]
async fn the_assertion_jwks_is_served() {
    let w = World::start().await;
    let r = w.get("/.well-known/portcullis/jwks.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["keys"][0]["alg"], "ES256");
    let a = w.admin_get("/.well-known/portcullis/jwks.json").await;
    assert_eq!(a.json(), r.json());
}

#[tokio::test]
async fn no_token_or_cookie_value_ever_reaches_a_log_line() {
    let w = World::start().await;
    let good = w.token("bb", &[]);
    let bad_branch = w.token("bb", &["branchName=feature/x"]);
    let expired = w.token("bb", &["exp:=1000", "iat:=900"]);
    let (h, p) = w.parts("bb", &[]);
    let forged = {
        let t = w.signer.sign(&h, &p);
        let mut parts: Vec<&str> = t.split('.').collect();
        let fake_sig = "A".repeat(parts[2].len());
        parts[2] = &fake_sig;
        parts.join(".")
    };
    let cookie = "_portcullis=c2VjcmV0LWNvb2tpZS12YWx1ZQ; app_session=topsecretcookievalue";
    for t in [&good, &bad_branch, &expired, &forged] {
        w.send(
            Method::GET,
            "/x?token=querysecretvalue",
            &[("authorization", &format!("Bearer {t}")), ("cookie", cookie)],
            Bytes::new(),
        )
        .await;
    }
    w.send(
        Method::GET,
        "/x",
        &[("authorization", "Bearer not.a.jwt"), ("cookie", cookie)],
        Bytes::new(),
    )
    .await;
    let lines = w.sink.lines();
    assert!(lines.len() >= 5);
    for line in &lines {
        for t in [&good, &bad_branch, &expired, &forged] {
            for part in t.split('.') {
                assert!(!line.contains(part), "token material in log line: {line}");
            }
        }
        for secret in
            ["c2VjcmV0LWNvb2tpZS12YWx1ZQ", "topsecretcookievalue", "querysecretvalue", "not.a.jwt"]
        {
            assert!(!line.contains(secret), "secret in log line: {line}");
        }
    }
}

#[tokio::test]
async fn metrics_count_requests_decisions_and_verifications() {
    let w = World::start().await;
    let t = w.token("gl", &[]);
    w.get("/m", Some(&t)).await;
    w.get("/m", Some(&t)).await;
    w.get("/m", None).await;
    let m = w.admin_get("/metrics").await.text();
    assert!(m.contains("portcullis_requests_total{route=\"api\",decision=\"allow\",reason=\"allowed\",status=\"200\"}"), "{m}");
    assert!(m.contains("reason=\"missing-token\",status=\"401\""));
    assert!(m.contains("portcullis_token_cache_hits_total"));
    assert!(m.contains("portcullis_request_duration_seconds_bucket{route=\"api\",le=\"+Inf\"}"));
    assert!(m.contains("portcullis_jwks_refreshes_total{issuer=\"gl\",outcome=\"ok\"}"));
    assert!(m.contains("portcullis_token_verifications_total{result=\"allowed\"}"));
}

/// The audit event of the next request `send` makes (a HEAD or allowed response has
/// no body to carry its request id).
async fn event_of<F: std::future::Future<Output = Resp>>(
    w: &World,
    send: F,
) -> (Resp, serde_json::Value) {
    let before = w.events().len();
    let r = send.await;
    for _ in 0..100 {
        let events = w.events();
        if events.len() > before {
            return (r, events[before].clone());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (r, serde_json::Value::Null)
}

/// `GET` in a policy's `methods` also covers `HEAD` (the upstream runs its `GET`
/// handler for it): a deny of `GET` denies `HEAD`, an allow of `GET` allows it, and a
/// route for `GET` takes `HEAD` rather than letting it fall through to another route.
#[tokio::test]
async fn head_is_covered_by_get_in_denies_allows_and_routes() {
    let routes = r#"
[[routes]]
name = "vault-reads"
match = { path_prefix = "/vault", methods = ["GET"] }
upstream = "http://{echo}"
policy = "nobody"
"#;
    let policy = r#"
[[rule]]
id = "engineers-health"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]
methods = ["GET"]
paths = ["/health/**"]

[[rule]]
id = "engineers-secret"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]
paths = ["/secret/**", "/vault/**"]

[[rule]]
id = "no-secret-reads"
effect = "deny"
issuer = "corp"
methods = ["GET"]
paths = ["/secret/**"]
"#;
    let w = World::with(Setup {
        routes: routes.into(),
        policies: vec![("api".into(), policy.into()), ("nobody".into(), String::new())],
        ..Setup::default()
    })
    .await;
    let auth = format!("Bearer {}", w.token("corp", &[]));
    let h = [("authorization", auth.as_str())];
    let send = |m: Method, path: &'static str| w.send(m, path, &h, Bytes::new());
    for (m, path, status, route, rule) in [
        (Method::GET, "/secret/payroll", StatusCode::FORBIDDEN, "api", "no-secret-reads"),
        (Method::HEAD, "/secret/payroll", StatusCode::FORBIDDEN, "api", "no-secret-reads"),
        // Near miss: the deny names GET only.
        (Method::POST, "/secret/payroll", StatusCode::OK, "api", "engineers-secret"),
        (Method::GET, "/health/x", StatusCode::OK, "api", "engineers-health"),
        (Method::HEAD, "/health/x", StatusCode::OK, "api", "engineers-health"),
        // Near miss: the allow names GET only.
        (Method::POST, "/health/x", StatusCode::FORBIDDEN, "api", ""),
        // The GET route (default deny) takes HEAD; POST goes on to `api`.
        (Method::HEAD, "/vault/x", StatusCode::FORBIDDEN, "vault-reads", ""),
        (Method::POST, "/vault/x", StatusCode::OK, "api", "engineers-secret"),
    ] {
        let case = format!("{m} {path}");
        let (r, ev) = event_of(&w, send(m, path)).await;
        assert_eq!(r.status, status, "{case}: {}", r.text());
        assert_eq!(ev["route"], route, "{case}: {ev}");
        if rule.is_empty() {
            assert!(ev["rule"].is_null(), "{case}: {ev}");
        } else {
            assert_eq!(ev["rule"]["id"], rule, "{case}: {ev}");
        }
    }
}

/// A deny on `email_domain` applies whether or not the email is verified (absent
/// `email_verified`, as Entra sends, or `false`); an allow still needs it verified.
#[tokio::test]
async fn email_denies_apply_to_unverified_emails() {
    let policy = r#"
[[rule]]
id = "engineers"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]

[[rule]]
id = "verified-contractor-docs"
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
"#;
    let w =
        World::with(Setup { policies: vec![("api".into(), policy.into())], ..Setup::default() })
            .await;
    // Bob is in `engineering` (the preset's groups), so only the deny keeps him out.
    let bob = "email=bob@contractors.example";
    let engineer = "groups:=[\"engineering\"]";
    let contractor = "groups:=[\"contractors\"]";
    for (verified, groups, path, status, rule) in [
        (
            "email_verified:=true",
            engineer,
            "/secret/x",
            StatusCode::FORBIDDEN,
            "no-contractor-secrets",
        ),
        (
            "email_verified:=false",
            engineer,
            "/secret/x",
            StatusCode::FORBIDDEN,
            "no-contractor-secrets",
        ),
        (
            "email_verified:=null",
            engineer,
            "/secret/x",
            StatusCode::FORBIDDEN,
            "no-contractor-secrets",
        ),
        // Near miss: elsewhere, the engineers' allow decides.
        ("email_verified:=null", engineer, "/other", StatusCode::OK, "engineers"),
        // An allow on the same domain still needs the email verified.
        ("email_verified:=false", contractor, "/docs/x", StatusCode::FORBIDDEN, ""),
        ("email_verified:=true", contractor, "/docs/x", StatusCode::OK, "verified-contractor-docs"),
    ] {
        let case = format!("{verified} {groups} {path}");
        let t = w.token("corp", &[bob, verified, groups]);
        let (r, ev) = event_of(&w, w.get(path, Some(&t))).await;
        assert_eq!(r.status, status, "{case}: {}", r.text());
        if rule.is_empty() {
            assert_eq!(ev["reason"], "policy-denied", "{case}: {ev}");
        } else {
            assert_eq!(ev["rule"]["id"], rule, "{case}: {ev}");
        }
    }
    // Near miss: an engineer of another domain, unverified, is not denied.
    let t = w.token("corp", &["email=eve@acme.example", "email_verified:=false"]);
    let r = w.get("/secret/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}
