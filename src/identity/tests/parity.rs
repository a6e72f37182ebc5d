//! `serve` and `check` decide alike. Security reviewers trust a policy's `[[test]]`s as
//! they trust code, so a `[[test]]` identity with a token's claims must get the decision
//! the verifier's identity of that token gets (or be refused where the token is).
//! Each case here once decided differently.

use http::Method;

use super::*;
use crate::diag::Source;
use crate::policy::{decide_case, Catalog, Policy, RequestFacts};

/// Two allows on the same issuer: one by group, one by a verified email's domain.
const RULES: &str = r#"
[[rule]]
id = "admins"
effect = "allow"
issuer = "corp"
groups_any = ["admins"]

[[rule]]
id = "acme-staff"
effect = "allow"
issuer = "corp"
email_domain = "acme.example"
"#;

/// What the proxy does with a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allowed,
    Denied(Reason),
    /// The token is refused before any policy (401); for `check`, the test identity is
    /// an error ("not a token the proxy would accept").
    Refused,
}

fn verdict(d: crate::policy::Decision) -> Verdict {
    if d.allowed {
        Verdict::Allowed
    } else {
        Verdict::Denied(d.reason)
    }
}

/// The issuer `corp` of these cases: `settings` as changed by `tweak`.
fn corp(tweak: impl FnOnce(&mut IssuerSettings)) -> IssuerSettings {
    let mut s = settings("corp", Preset::Oidc, "https://idp.example.com", "portcullis");
    tweak(&mut s);
    s
}

/// What `serve` decides for a `GET /x` with a token of `claims` from issuer `s`, and
/// what `check` decides for a `[[test]]` of the same request whose identity has the
/// same claims, both against [`RULES`].
async fn verdicts(s: &IssuerSettings, claims: &Value) -> (Verdict, Verdict) {
    let mut catalog = Catalog::default();
    catalog.insert(s.clone());
    let policy = Policy::parse(&Source::new("p.toml", RULES), &catalog).unwrap();
    let get = Method::GET;
    let request = RequestFacts::http(&get, "/x");

    // The registered claims a case does not give are those of a token valid now.
    let mut payload = claims.clone();
    for (name, value) in [
        ("iss", json!(s.issuer)),
        ("aud", json!(s.audiences[0])),
        ("iat", json!(NOW - 100)),
        ("exp", json!(NOW + 3600)),
    ] {
        if payload.get(name).is_none() {
            payload[name] = value;
        }
    }
    let token = rsa().sign(&json!({"alg": "RS256", "kid": "rsa-1"}), &payload);
    let serve = match offline(vec![s.clone()]).verify_at(&token, NOW).await {
        Ok(identity) => verdict(policy.decide(Some(&identity), &request)),
        Err(_) => Verdict::Refused,
    };

    let case = json!({ "test": [{
        "name": "t", "request": "GET /x", "expect": "allow",
        "identity": { "issuer": "corp", "claims": claims },
    }]});
    let text = format!("{RULES}\n{}", toml::to_string(&case).unwrap());
    let check = match Policy::parse(&Source::new("p.toml", text.as_str()), &catalog) {
        Ok(p) => verdict(decide_case(&p, &p.tests()[0], &|_| false)),
        Err(d) => {
            let d: Vec<String> = d.into_sorted().iter().map(ToString::to_string).collect();
            let refused = |m: &String| {
                m.contains("would accept")
                    || m.contains("test identity claim")
                    || m.contains("the proxy would refuse")
            };
            assert!(d.iter().all(refused), "{text}\n{d:#?}");
            Verdict::Refused
        }
    };
    (serve, check)
}

/// `serve` gives `want`, and `check` agrees.
async fn agree(what: &str, s: &IssuerSettings, claims: Value, want: Verdict) {
    let (serve, check) = verdicts(s, &claims).await;
    assert_eq!(serve, want, "{what}: serve");
    assert_eq!(check, serve, "{what}: check decides otherwise than serve for {claims}");
}

/// The groups are where the issuer's `groups_claim` says, for a test as for a token;
/// so is the overage marker naming that claim (V25).
#[tokio::test]
async fn a_test_identity_reads_groups_from_the_issuers_groups_claim() {
    let roles = corp(|s| s.groups_claim = claim_path("roles"));
    let admin = json!({ "sub": "alice", "roles": ["admins"] });
    agree("groups in the configured claim", &roles, admin, Verdict::Allowed).await;
    let elsewhere = json!({ "sub": "alice", "groups": ["admins"] });
    let denied = Verdict::Denied(Reason::PolicyDenied);
    agree("groups in another claim", &roles, elsewhere, denied).await;
    let overage =
        json!({ "sub": "alice", "roles": ["admins"], "_claim_names": { "roles": "src1" } });
    agree(
        "overage of the configured claim",
        &roles,
        overage,
        Verdict::Denied(Reason::GroupsUnknown),
    )
    .await;
}

/// On Google's issuer an address Google does not host is not verified, for a test as
/// for a token (threat model: "a Google account with someone else's domain").
#[tokio::test]
async fn a_test_identity_on_google_follows_the_google_rule() {
    let google = corp(|s| s.issuer = "https://accounts.google.com".into());
    let consumer = json!({ "sub": "1", "email": "jane@acme.example", "email_verified": true });
    agree(
        "a consumer account's work address",
        &google,
        consumer.clone(),
        Verdict::Denied(Reason::PolicyDenied),
    )
    .await;
    let workspace = with(consumer, "hd", json!("acme.example"));
    agree("a Workspace account", &google, workspace, Verdict::Allowed).await;
}

/// Claims the verifier refuses (V15, V20, V21, V24) make a test identity an error, not
/// a caller that the test then admits or denies.
#[tokio::test]
async fn a_test_identity_the_verifier_would_refuse_is_an_error() {
    let plain = corp(|_| {});
    let admin = json!({ "sub": "alice", "groups": ["admins"] });
    agree("the baseline", &plain, admin.clone(), Verdict::Allowed).await;
    for (what, claims) in [
        ("a group that is not a string", with(admin.clone(), "groups", json!(["admins", 7]))),
        ("groups that are not a list", with(admin.clone(), "groups", json!("admins"))),
        ("a `sub` that is not a string", with(admin.clone(), "sub", json!(42))),
        ("an empty `sub`", with(admin.clone(), "sub", json!(""))),
        ("an `email` that is not a string", with(admin.clone(), "email", json!(7))),
        ("`email_verified` as a string", with(admin.clone(), "email_verified", json!("true"))),
        ("another client's `azp`", with(admin.clone(), "azp", json!("someone-else"))),
        ("an access token's `scp`", with(admin.clone(), "scp", json!(["read"]))),
        ("Keycloak's access-token `typ`", with(admin.clone(), "typ", json!("Bearer"))),
        ("an `exp` that is not a number", with(admin.clone(), "exp", json!("soon"))),
        ("an `iat` that is not a number", with(admin.clone(), "iat", json!(true))),
        ("an `aud` that is not a string", with(admin.clone(), "aud", json!(5))),
        ("an empty `aud`", with(admin.clone(), "aud", json!([]))),
        ("another audience", with(admin.clone(), "aud", json!("someone-else"))),
    ] {
        agree(what, &plain, claims, Verdict::Refused).await;
    }
    // The authentication context the issuer's login asks for (`acr_values`).
    let mfa = corp(|s| s.acr_values = vec!["phr".into()]);
    agree("no `acr` where the login asks for one", &mfa, admin.clone(), Verdict::Refused).await;
    let pwd = with(admin.clone(), "acr", json!("pwd"));
    agree("another `acr`", &mfa, pwd, Verdict::Refused).await;
    agree("the `acr` asked for", &mfa, with(admin.clone(), "acr", json!("phr")), Verdict::Allowed)
        .await;
    let workspace = corp(|s| s.hosted_domain = Some("acme.example".into()));
    let staff = json!({ "sub": "1", "email": "jane@acme.example", "email_verified": true });
    agree("no `hd` where `hosted_domain` is set", &workspace, staff.clone(), Verdict::Refused)
        .await;
    let hd = with(staff, "hd", json!("acme.example"));
    agree("the Workspace's `hd`", &workspace, hd, Verdict::Allowed).await;
}

/// Keycloak's roles in nested claims (`groups_claim` a JSON Pointer, a client id with a
/// dot included) and Okta's and Auth0's namespaced claims (dots and slashes in one
/// top-level name) are read alike by `serve` and `check`; a member on the way that is
/// not an object, or a role that is not a string, refuses the token in both.
#[tokio::test]
async fn a_test_identity_reads_groups_through_a_claim_path() {
    let denied = Verdict::Denied(Reason::PolicyDenied);
    let realm = corp(|s| s.groups_claim = claim_path("/realm_access/roles"));
    let roles = |r: Value| json!({ "sub": "jdoe", "realm_access": { "roles": r } });
    agree("a realm role", &realm, roles(json!(["offline_access", "admins"])), Verdict::Allowed)
        .await;
    agree("other realm roles", &realm, roles(json!(["offline_access"])), denied).await;
    let beside = json!({ "sub": "jdoe", "groups": ["admins"] });
    agree("a top-level `groups` claim", &realm, beside, denied).await;
    let flat = json!({ "sub": "jdoe", "realm_access": ["admins"] });
    agree("`realm_access` that is not an object", &realm, flat, Verdict::Refused).await;
    agree("a role that is not a string", &realm, roles(json!(["admins", 1])), Verdict::Refused)
        .await;
    let overage = with(roles(json!(["admins"])), "_claim_names", json!({ "realm_access": "s" }));
    agree("`realm_access` held elsewhere", &realm, overage, Verdict::Denied(Reason::GroupsUnknown))
        .await;

    let client = corp(|s| s.groups_claim = claim_path("/resource_access/edge.proxy/roles"));
    let client_roles =
        json!({ "sub": "jdoe", "resource_access": { "edge.proxy": { "roles": ["admins"] } } });
    agree("a client role", &client, client_roles, Verdict::Allowed).await;

    let namespaced = corp(|s| s.groups_claim = claim_path("https://example.com/groups"));
    let okta = json!({ "sub": "jdoe", "https://example.com/groups": ["admins"] });
    agree("a namespaced top-level claim", &namespaced, okta, Verdict::Allowed).await;
    let nested = json!({ "sub": "jdoe", "https://example": { "com/groups": ["admins"] } });
    agree("a namespaced claim is no path", &namespaced, nested, denied).await;
}
