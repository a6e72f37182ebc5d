//! Verifier tests.
//!
//! Rule tests: each token breaks exactly one rule of jwt-validation.md §10 (V-number in
//! the test name) and must be rejected with exactly that reason; keys are installed
//! offline so these run without a network. Preset tests: the claim shapes of
//! `shared/reference/tokens/*.json`. JWKS tests: discovery + JWKS from a real
//! [`DevIssuer`] on loopback (HTTPS with a private CA, or `insecure_http`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};

use super::jwks::Timing;
use super::*;
use crate::dev::issuer::{DevIssuer, Failure};
use crate::dev::signer::{self, DevSigner};
use crate::reason::Reason;

/// 100 s after the reference tokens' `iat`.
const NOW: u64 = 1_767_225_700;
const OKTA: &str = "https://acme.okta.com/oauth2/default";
const OKTA_CLIENT: &str = "0oaexampleclientid123";

fn rsa() -> &'static DevSigner {
    static K: OnceLock<DevSigner> = OnceLock::new();
    K.get_or_init(|| DevSigner::generate_rs256("rsa-1").unwrap())
}
fn ec() -> &'static DevSigner {
    static K: OnceLock<DevSigner> = OnceLock::new();
    K.get_or_init(|| DevSigner::generate_es256("ec-1").unwrap())
}
/// Another RSA key under the same `kid` as [`rsa`]: a forger's key.
fn forger() -> &'static DevSigner {
    static K: OnceLock<DevSigner> = OnceLock::new();
    K.get_or_init(|| DevSigner::generate_rs256("rsa-1").unwrap())
}

/// An issuer's settings with the defaults tests start from (also the session tests').
pub(crate) fn settings(id: &str, preset: Preset, issuer: &str, audience: &str) -> IssuerSettings {
    IssuerSettings {
        issuer: issuer.to_owned(),
        discovery_url: format!("{issuer}/.well-known/openid-configuration"),
        audiences: vec![audience.to_owned()],
        algorithms: vec![Algorithm::RS256, Algorithm::ES256],
        stale_window: Duration::from_secs(3600),
        refresh_cooldown: Duration::from_secs(60),
        ..IssuerSettings::declared(id, preset)
    }
}

/// A `groups_claim` as configured.
pub(crate) fn claim_path(text: &str) -> ClaimPath {
    ClaimPath::parse(text).unwrap()
}

fn okta_settings() -> IssuerSettings {
    let mut s = settings("corp", Preset::Oidc, OKTA, OKTA_CLIENT);
    s.client_id = Some(OKTA_CLIENT.into());
    s
}

/// A verifier whose issuers already hold the [`rsa`] and [`ec`] keys.
fn offline(issuers: Vec<IssuerSettings>) -> Verifier {
    let ids: Vec<IssuerId> = issuers.iter().map(|s| s.id.clone()).collect();
    let v = Verifier::new(issuers).unwrap();
    for id in ids {
        let n = v.install_jwks(&id, &signer::jwks(&[rsa(), ec()]), Duration::from_secs(600));
        assert_eq!(n, Ok(2));
    }
    v
}

fn okta_header() -> Value {
    json!({"alg": "RS256", "kid": "rsa-1"})
}

/// `reference/tokens/okta.json`.
fn okta_payload() -> Value {
    json!({
        "ver": 1, "sub": "00uid4BxXw6I6TV4m0g3", "iss": OKTA, "aud": OKTA_CLIENT,
        "iat": 1767225600, "exp": 1767229200, "jti": "ID.4eAWJOCMB3SX8XewDfVR",
        "amr": ["pwd", "mfa"], "idp": "00ok1u7AsAkrwdZL3z0g3", "nonce": "n-0S6_WzA2Mj",
        "auth_time": 1767225590, "at_hash": "cpqKfdQA5eH891Ff5oJr_Q", "name": "Jane Doe",
        "preferred_username": "jane.doe@acme.example", "email": "jane.doe@acme.example",
        "email_verified": true, "groups": ["Everyone", "platform-admins", "sre"]
    })
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

async fn reason(v: &Verifier, token: &str) -> Option<Reason> {
    v.verify_at(token, NOW).await.err().map(|e| e.reason)
}

/// An okta token with `header` / `payload` changed; must fail with `expected` and,
/// for pre-signature rules, without any signature work.
async fn rejects(header: Value, payload: Value, expected: Reason) {
    let v = offline(vec![okta_settings()]);
    let token = rsa().sign(&header, &payload);
    assert_eq!(reason(&v, &token).await, Some(expected), "{header} {payload}");
    let after_signature = matches!(
        expected,
        Reason::InvalidSignature
            | Reason::AuthorizedPartyMismatch
            | Reason::WrongTokenType
            | Reason::InvalidClaims
    );
    if !after_signature {
        assert_eq!(v.signature_checks(), 0, "{expected:?} must cost no signature");
    }
}

// === the baseline ===

#[test]
fn verifier_and_its_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let v = offline(vec![okta_settings()]);
    send_sync(&v);
    send(&v.verify_at("t", NOW));
    send(&v.wait_ready(Duration::ZERO));
}

#[tokio::test]
async fn okta_human_id_token_is_accepted() {
    let v = offline(vec![okta_settings()]);
    let token = rsa().sign(&okta_header(), &okta_payload());
    let id = v.verify_at(&token, NOW).await.unwrap();
    assert_eq!(id.issuer.as_str(), "corp");
    assert_eq!(id.subject, "00uid4BxXw6I6TV4m0g3");
    assert_eq!(id.kind, PrincipalKind::Human);
    assert_eq!(id.email.as_deref(), Some("jane.doe@acme.example"));
    assert!(id.email_verified && id.groups_known);
    assert_eq!(id.groups, ["Everyone", "platform-admins", "sre"]);
    assert_eq!((id.expires_at, id.issued_at), (1767229200, Some(1767225600)));
    assert!(id.ci.is_none());
    // The cached identity holds the verified JSON text; the map is built on first use
    // and equals the payload exactly.
    assert!(id.claims.parsed.get().is_none(), "claims parsed before any matcher asked");
    assert_eq!(id.claims.get("ver"), Some(&json!(1)));
    assert_eq!(Value::Object(id.claims.map().clone()), okta_payload());
    assert_eq!(v.signature_checks(), 1);
}

// === V1: credential extraction ===

fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn v1_bearer_extraction() {
    use CredentialSource::*;
    // The alphabet is the verifier's to check (on a token-cache miss): see
    // `v1_the_verifier_refuses_a_token_outside_the_jws_alphabet`.
    let extract = |h: &http::HeaderMap| -> Result<Option<(String, CredentialSource)>, Reason> {
        let found = extract_bearer(h).map_err(|e| e.reason)?;
        Ok(found.map(|(token, source)| (token.to_owned(), source)))
    };
    let ok = |pairs: &[(&str, &str)]| extract(&headers(pairs));
    let some = |t: &str, s| Ok(Some((t.to_owned(), s)));
    let err = |pairs: &[(&str, &str)]| extract(&headers(pairs)).err();
    assert_eq!(ok(&[]), Ok(None));
    assert_eq!(ok(&[("authorization", "Bearer a.b.c")]), some("a.b.c", Authorization));
    assert_eq!(ok(&[("authorization", "bEaReR a.b.c")]), some("a.b.c", Authorization));
    assert_eq!(ok(&[("proxy-authorization", "Bearer a.b.c")]), some("a.b.c", ProxyAuthorization));
    // The application's own Authorization stays the application's.
    assert_eq!(ok(&[("authorization", "Basic dXNlcjpwdw==")]), Ok(None));
    assert_eq!(
        ok(&[("authorization", "Basic dXNlcjpwdw=="), ("proxy-authorization", "Bearer t")]),
        some("t", ProxyAuthorization)
    );
    let ambiguous = Some(Reason::AmbiguousCredentials);
    assert_eq!(
        err(&[("authorization", "Bearer a"), ("proxy-authorization", "Bearer b")]),
        ambiguous
    );
    assert_eq!(err(&[("authorization", "Bearer a"), ("authorization", "Bearer a")]), ambiguous);
    assert_eq!(err(&[("authorization", "Basic x"), ("authorization", "Bearer a")]), ambiguous);
    assert_eq!(
        err(&[("proxy-authorization", "Bearer a"), ("proxy-authorization", "Bearer b")]),
        ambiguous
    );
    let malformed = Some(Reason::MalformedToken);
    assert_eq!(err(&[("authorization", "Bearer ")]), malformed);
    assert_eq!(err(&[("proxy-authorization", "Basic x")]), malformed);
    let big = format!("Bearer {}", "a".repeat(token::MAX_TOKEN_LEN + 1));
    assert_eq!(err(&[("authorization", big.as_str())]), malformed);
    let max = format!("Bearer {}", "a".repeat(token::MAX_TOKEN_LEN));
    assert!(ok(&[("authorization", max.as_str())]).is_ok());
    // Padding only at the end; several spaces after the scheme; nothing but padding.
    assert_eq!(
        ok(&[("authorization", "Bearer   a.b-c_~+/==")]),
        some("a.b-c_~+/==", Authorization)
    );
    // A tab after the scheme (or among the spaces) separates as a space does: read as
    // another scheme, `Bearer<TAB>token` would be passed upstream unverified beside a
    // verified Proxy-Authorization.
    assert_eq!(ok(&[("authorization", "Bearer\ta.b.c")]), some("a.b.c", Authorization));
    assert_eq!(ok(&[("authorization", "Bearer \t a.b.c")]), some("a.b.c", Authorization));
    assert_eq!(
        err(&[("authorization", "Bearer\ta"), ("proxy-authorization", "Bearer b")]),
        ambiguous
    );
    // Bytes outside visible ASCII in a bearer token or any other scheme.
    let raw = |v: &[u8]| {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, http::HeaderValue::from_bytes(v).expect("opaque"));
        extract(&h).map(|t| t.map(|(t, _)| t))
    };
    assert_eq!(raw(b"Bearer \xff"), Err(Reason::MalformedToken));
    assert_eq!(raw(b"Basic \xff"), Err(Reason::MalformedToken));
    assert_eq!(raw(b"Bearer abc"), Ok(Some("abc".to_owned())));
    // A token under another scheme, or none, beside a Proxy-Authorization bearer token:
    // an upstream that verifies tokens itself acts on it (`TrimPrefix(h, "Bearer ")`
    // returns a bare token whole; `JWT <token>` is djangorestframework-jwt's scheme).
    for app in [
        "JWT eyJh.eyJi.c",
        "Token eyJh.eyJi.c",
        "eyJh.eyJi.c",
        "Token token=\"eyJh.eyJi.c\"",
        "Basic x, Bearer eyJh.eyJi.c",
        "jwe eyJh.b.c.d.e",
        "JWT\teyJh.b-_.",
    ] {
        assert_eq!(
            err(&[("authorization", app), ("proxy-authorization", "Bearer t")]),
            ambiguous,
            "{app}"
        );
        // Alone it is no credential for the proxy.
        assert_eq!(ok(&[("authorization", app)]), Ok(None), "{app}");
    }
    // The application's own credentials are no token: they pass beside it.
    for app in [
        "Basic dXNlcjpwdw==",
        "Digest username=\"u\", realm=\"r\", nonce=\"n.o.n\", uri=\"/\", response=\"x\"",
        "Negotiate YIIB+w==",
        "AWS4-HMAC-SHA256 Credential=AKIA/20261127/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=abc",
        "Token abc",
        "eyJh.b",
        "eyJh..c",
        "a.b.c",
    ] {
        assert_eq!(
            ok(&[("authorization", app), ("proxy-authorization", "Bearer t")]),
            some("t", ProxyAuthorization),
            "{app}"
        );
    }
}

#[tokio::test]
async fn v1_the_verifier_refuses_a_token_outside_the_jws_alphabet() {
    // Extraction leaves the alphabet to the verifier, which checks it on a cache miss:
    // base64url and `.` only (no padding, space, tab or non-ASCII), before any decoding.
    let v = offline(vec![okta_settings()]);
    let token = rsa().sign(&okta_header(), &okta_payload());
    assert_eq!(reason(&v, &token).await, None, "the token itself verifies");
    let (head, rest) = token.split_once('.').unwrap_or_default();
    for bad in [
        format!("{head} .{rest}"),
        format!("{head}\t.{rest}"),
        format!("{head}=.{rest}"),
        format!("{head}é.{rest}"),
        format!("{token}=="),
        "a b".to_string(),
        "===".to_string(),
    ] {
        assert_eq!(reason(&v, &bad).await, Some(Reason::MalformedToken), "{bad:?}");
    }
    // And so does the proxy: what extraction lets through, the verifier refuses.
    let mut h = http::HeaderMap::new();
    h.insert(http::header::AUTHORIZATION, http::HeaderValue::from_static("Bearer a=b"));
    let found = extract_bearer(&h).ok().flatten().map(|(t, _)| t.to_owned());
    assert_eq!(found.as_deref(), Some("a=b"));
    assert_eq!(reason(&v, "a=b").await, Some(Reason::MalformedToken));
}

#[tokio::test]
async fn v1_oversized_token_is_rejected_before_parsing() {
    let v = offline(vec![okta_settings()]);
    let padded = with(okta_payload(), "pad", json!("x".repeat(token::MAX_TOKEN_LEN)));
    let token = rsa().sign(&okta_header(), &padded);
    assert_eq!(reason(&v, &token).await, Some(Reason::MalformedToken));
}

// === V2, V3: format ===

#[tokio::test]
async fn v2_only_compact_jws_with_three_segments() {
    let v = offline(vec![okta_settings()]);
    let good = rsa().sign(&okta_header(), &okta_payload());
    let (hp, _) = good.rsplit_once('.').unwrap();
    let jwe = format!("{good}.AAAA.BBBB");
    let json_serialization = json!({"payload": "x", "signatures": []}).to_string();
    for bad in [hp.to_owned(), jwe, json_serialization, format!("{good}.")] {
        assert_eq!(reason(&v, &bad).await, Some(Reason::MalformedToken), "{bad}");
    }
}

#[tokio::test]
async fn v3_duplicate_members_in_header_are_rejected() {
    let v = offline(vec![okta_settings()]);
    let payload = okta_payload().to_string();
    let token = rsa().sign_raw(r#"{"alg":"RS256","kid":"rsa-1","kid":"rsa-1"}"#, &payload);
    assert_eq!(reason(&v, &token).await, Some(Reason::MalformedToken));
}

#[tokio::test]
async fn v3_duplicate_members_in_payload_are_rejected() {
    let v = offline(vec![okta_settings()]);
    // A second `aud` a lenient parser might pick: must not matter which.
    let payload = okta_payload().to_string();
    let dup = payload.replacen('{', r#"{"aud":"someone-else","#, 1);
    let token = rsa().sign_raw(&okta_header().to_string(), &dup);
    assert_eq!(reason(&v, &token).await, Some(Reason::MalformedToken));
}

#[tokio::test]
async fn v3_non_object_roots_bad_json_and_padding_are_rejected() {
    let v = offline(vec![okta_settings()]);
    let h = okta_header().to_string();
    for payload in ["[1,2]", "\"s\"", "{\"iss\":", "{} {}"] {
        let token = rsa().sign_raw(&h, payload);
        assert_eq!(reason(&v, &token).await, Some(Reason::MalformedToken), "{payload}");
    }
    let token = rsa().sign_raw("[]", &okta_payload().to_string());
    assert_eq!(reason(&v, &token).await, Some(Reason::MalformedToken));
    // Same bytes, standard-alphabet padding appended to the header segment.
    let good = rsa().sign(&okta_header(), &okta_payload());
    let (h64, rest) = good.split_once('.').unwrap();
    let padded = format!("{h64}==.{rest}");
    assert_eq!(reason(&v, &padded).await, Some(Reason::MalformedToken));
}

// === V4, V5: algorithms ===

#[tokio::test]
async fn v4_alg_none_hs256_and_wrong_case_are_rejected() {
    for alg in ["none", "HS256", "rs256", "RS256 ", ""] {
        rejects(
            with(okta_header(), "alg", json!(alg)),
            okta_payload(),
            Reason::DisallowedAlgorithm,
        )
        .await;
    }
}

#[tokio::test]
async fn v4_alg_outside_the_issuer_allowlist_is_rejected() {
    let mut only_rs = okta_settings();
    only_rs.algorithms = vec![Algorithm::RS256];
    let v = Verifier::new(vec![only_rs]).unwrap();
    v.install_jwks(&IssuerId("corp".into()), &signer::jwks(&[rsa()]), Duration::from_secs(600))
        .unwrap();
    let token = ec().sign(&json!({"alg": "ES256", "kid": "ec-1"}), &okta_payload());
    assert_eq!(reason(&v, &token).await, Some(Reason::DisallowedAlgorithm));
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn v5_key_is_bound_to_its_algorithm() {
    // ES256 is allowlisted, but kid rsa-1 is an RSA key: no cross-type use.
    let header = json!({"alg": "ES256", "kid": "rsa-1"});
    let v = offline(vec![okta_settings()]);
    let token = ec().sign(&header, &okta_payload());
    assert_eq!(reason(&v, &token).await, Some(Reason::DisallowedAlgorithm));
    // PS256 allowlisted, but the JWK says alg RS256: one key, one algorithm.
    let mut ps = okta_settings();
    ps.algorithms.push(Algorithm::PS256);
    let v = offline(vec![ps]);
    let ps_signer =
        DevSigner::from_pkcs8_der(Algorithm::PS256, "rsa-1", &rsa().pkcs8_der()).unwrap();
    let token = ps_signer.sign(&json!({"alg": "PS256", "kid": "rsa-1"}), &okta_payload());
    assert_eq!(reason(&v, &token).await, Some(Reason::DisallowedAlgorithm));
    assert_eq!(v.signature_checks(), 0);
}

// === V6, V13: issuer ===

#[tokio::test]
async fn v6_unknown_or_near_miss_issuer_is_rejected() {
    for iss in [
        "https://evil.example",
        "https://acme.okta.com/oauth2/default/",
        "HTTPS://acme.okta.com/oauth2/default",
    ] {
        rejects(okta_header(), with(okta_payload(), "iss", json!(iss)), Reason::UnknownIssuer)
            .await;
    }
    rejects(okta_header(), with(okta_payload(), "iss", json!(1)), Reason::InvalidClaims).await;
}

// === V7, V8, V9, V10, V11: header ===

#[tokio::test]
async fn v7_kid_is_required_and_bounded() {
    rejects(without(okta_header(), "kid"), okta_payload(), Reason::MalformedToken).await;
    rejects(with(okta_header(), "kid", json!("")), okta_payload(), Reason::MalformedToken).await;
    rejects(with(okta_header(), "kid", json!(7)), okta_payload(), Reason::MalformedToken).await;
    let long = "k".repeat(token::MAX_KID_LEN + 1);
    rejects(with(okta_header(), "kid", json!(long)), okta_payload(), Reason::MalformedToken).await;
    // At the cap it is merely unknown (and only looked up, never used as a path).
    let at_cap = "../".repeat(85) + "k";
    rejects(with(okta_header(), "kid", json!(at_cap)), okta_payload(), Reason::UnknownKey).await;
}

#[tokio::test]
async fn v8_token_supplied_keys_and_key_urls_are_rejected() {
    let jwk = rsa().public_jwk();
    for (name, value) in [
        ("jku", json!("https://evil.example/jwks.json")),
        ("x5u", json!("https://evil.example/cert.pem")),
        ("jwk", jwk),
        ("x5c", json!(["MIIB"])),
    ] {
        rejects(with(okta_header(), name, value), okta_payload(), Reason::ForbiddenHeader).await;
    }
}

#[tokio::test]
async fn v9_any_crit_is_rejected_even_empty() {
    for crit in [json!(["exp"]), json!([]), json!("b64")] {
        rejects(with(okta_header(), "crit", crit), okta_payload(), Reason::ForbiddenHeader).await;
    }
}

#[tokio::test]
async fn v10_nested_jwt_cty_is_rejected() {
    rejects(with(okta_header(), "cty", json!("JWT")), okta_payload(), Reason::ForbiddenHeader)
        .await;
}

#[tokio::test]
async fn v11_typ_must_fit_the_token_type() {
    for typ in ["at+jwt", "application/at+jwt", "JOSE", "secevent+jwt"] {
        rejects(with(okta_header(), "typ", json!(typ)), okta_payload(), Reason::WrongTokenType)
            .await;
    }
    let v = offline(vec![okta_settings()]);
    for typ in ["JWT", "jwt", "application/JWT"] {
        let token = rsa().sign(&with(okta_header(), "typ", json!(typ)), &okta_payload());
        assert!(v.verify_at(&token, NOW).await.is_ok(), "{typ}");
    }
    // An RFC 9068 access-token issuer requires at+jwt.
    let mut access = okta_settings();
    access.token_type = TokenType::Access;
    access.client_id = None;
    let v = offline(vec![access]);
    let plain = rsa().sign(&with(okta_header(), "typ", json!("JWT")), &okta_payload());
    assert_eq!(reason(&v, &plain).await, Some(Reason::WrongTokenType));
    let at = rsa().sign(&with(okta_header(), "typ", json!("at+jwt")), &okta_payload());
    assert!(v.verify_at(&at, NOW).await.is_ok());
}

// === V12: signature ===

#[tokio::test]
async fn v12_signature_must_verify_with_the_issuers_key() {
    let v = offline(vec![okta_settings()]);
    let forged = forger().sign(&okta_header(), &okta_payload());
    assert_eq!(reason(&v, &forged).await, Some(Reason::InvalidSignature));
    // A valid signature moved onto other claims.
    let good = rsa().sign(&okta_header(), &okta_payload());
    let other = rsa().sign(&okta_header(), &with(okta_payload(), "sub", json!("admin")));
    let (hp, _) = other.rsplit_once('.').unwrap();
    let (_, sig) = good.rsplit_once('.').unwrap();
    assert_eq!(reason(&v, &format!("{hp}.{sig}")).await, Some(Reason::InvalidSignature));
}

// === V14, V15: audience and authorized party ===

#[tokio::test]
async fn v14_audience_must_contain_a_configured_one() {
    let other = with(okta_payload(), "aud", json!("another-client"));
    rejects(okta_header(), other, Reason::AudienceMismatch).await;
    rejects(okta_header(), without(okta_payload(), "aud"), Reason::AudienceMismatch).await;
    let empty = with(okta_payload(), "aud", json!([]));
    rejects(okta_header(), empty, Reason::InvalidClaims).await;
    let mixed = with(okta_payload(), "aud", json!([OKTA_CLIENT, 5]));
    rejects(okta_header(), mixed, Reason::InvalidClaims).await;
}

#[tokio::test]
async fn v15_azp_must_be_our_client() {
    let wrong = with(okta_payload(), "azp", json!("another-client"));
    rejects(okta_header(), wrong, Reason::AuthorizedPartyMismatch).await;
    let multi = with(okta_payload(), "aud", json!([OKTA_CLIENT, "another-client"]));
    rejects(okta_header(), multi.clone(), Reason::AuthorizedPartyMismatch).await;
    let v = offline(vec![okta_settings()]);
    let token = rsa().sign(&okta_header(), &with(multi, "azp", json!(OKTA_CLIENT)));
    assert!(v.verify_at(&token, NOW).await.is_ok());
}

// === V16–V19: time ===

#[tokio::test]
async fn v16_exp_is_required_and_enforced_with_leeway() {
    let expired = with(okta_payload(), "exp", json!(NOW - 61));
    rejects(okta_header(), expired, Reason::TokenExpired).await;
    rejects(okta_header(), without(okta_payload(), "exp"), Reason::InvalidClaims).await;
    let v = offline(vec![okta_settings()]);
    let in_leeway = rsa().sign(&okta_header(), &with(okta_payload(), "exp", json!(NOW - 59)));
    assert!(v.verify_at(&in_leeway, NOW).await.is_ok());
    // now >= exp + leeway is expired: the boundary itself is out.
    let boundary = rsa().sign(&okta_header(), &with(okta_payload(), "exp", json!(NOW - 60)));
    assert_eq!(reason(&v, &boundary).await, Some(Reason::TokenExpired));
}

#[tokio::test]
async fn v17_nbf_in_the_future_is_rejected_but_nbf_before_iat_is_fine() {
    let future = with(okta_payload(), "nbf", json!(NOW + 61));
    rejects(okta_header(), future, Reason::TokenNotYetValid).await;
    let v = offline(vec![okta_settings()]);
    let github_like = rsa().sign(&okta_header(), &with(okta_payload(), "nbf", json!(1767225000)));
    assert!(v.verify_at(&github_like, NOW).await.is_ok());
}

#[tokio::test]
async fn v18_iat_in_the_future_or_too_old_is_rejected() {
    let future = with(okta_payload(), "iat", json!(NOW + 61));
    rejects(okta_header(), future, Reason::TokenIssuedAt).await;

    let mut aged = okta_settings();
    aged.max_token_age = Some(Duration::from_secs(30));
    let v = offline(vec![aged]);
    let token = rsa().sign(&okta_header(), &okta_payload()); // iat = NOW - 100
    assert_eq!(reason(&v, &token).await, Some(Reason::TokenIssuedAt));
    let id = v.verify_at(&token, NOW - 10).await.unwrap();
    // The identity ends at iat + max age, not at exp: tunnels and database sessions
    // opened with it close there.
    assert_eq!(id.expires_at, NOW - 100 + 30);
    assert!(id.expires_at < okta_payload()["exp"].as_u64().unwrap_or(0));
    // Max age also bounds the cached entry.
    assert_eq!(reason(&v, &token).await, Some(Reason::TokenIssuedAt));
    // Without a max age, exp.
    let v = offline(vec![okta_settings()]);
    let id = v.verify_at(&token, NOW).await.unwrap();
    assert_eq!(Some(id.expires_at), okta_payload()["exp"].as_u64());
}

#[test]
fn v19_leeway_is_capped() {
    let mut s = okta_settings();
    s.leeway = Duration::from_secs(301);
    assert!(Verifier::new(vec![s]).is_err());
}

// === V20, V21: profiles and claim types ===

#[tokio::test]
async fn v20_access_token_markers_on_an_id_token_issuer_are_rejected() {
    for (name, value) in [("scp", json!(["openid"])), ("cid", json!(OKTA_CLIENT))] {
        rejects(okta_header(), with(okta_payload(), name, value), Reason::WrongTokenType).await;
    }
    // Keycloak: payload typ "Bearer" is an access token.
    rejects(okta_header(), with(okta_payload(), "typ", json!("Bearer")), Reason::WrongTokenType)
        .await;
}

/// The `acr_values` of the issuer's `login` hold its bearer ID tokens as they hold the
/// browser's: `acr` one of them, exactly; an access-token issuer and a CI issuer are
/// not held to them; and an issuer without them does not look at `acr`.
#[tokio::test]
async fn a_human_id_token_needs_an_acr_the_issuers_login_asks_for() {
    let mfa = || IssuerSettings { acr_values: vec!["phr".into(), "mfa".into()], ..okta_settings() };
    let v = offline(vec![mfa()]);
    for acr in ["phr", "mfa"] {
        let token = rsa().sign(&okta_header(), &with(okta_payload(), "acr", json!(acr)));
        assert!(v.verify_at(&token, NOW).await.is_ok(), "{acr}");
    }
    for (payload, want) in [
        (okta_payload(), Reason::AcrMismatch),
        (with(okta_payload(), "acr", json!("pwd")), Reason::AcrMismatch),
        (with(okta_payload(), "acr", json!("Phr")), Reason::AcrMismatch),
        (with(okta_payload(), "acr", json!("phr mfa")), Reason::AcrMismatch),
        (with(okta_payload(), "acr", json!(["phr"])), Reason::InvalidClaims),
    ] {
        let token = rsa().sign(&okta_header(), &payload);
        assert_eq!(reason(&v, &token).await, Some(want), "{payload}");
    }
    // Without `acr_values`, `acr` is not looked at.
    let plain = offline(vec![okta_settings()]);
    assert!(plain.verify_at(&rsa().sign(&okta_header(), &okta_payload()), NOW).await.is_ok());
    // The same check for a `[[test]]` identity and for an admitted one after a reload.
    let Value::Object(claims) = okta_payload() else { panic!("an object") };
    let refused = unverified_identity(&mfa(), claims.clone()).err().map(|e| e.reason);
    assert_eq!(refused, Some(Reason::AcrMismatch));
    let admitted = unverified_identity(&okta_settings(), claims).unwrap();
    let refused = verify::recheck(&mfa(), &admitted, NOW).err().map(|e| e.reason);
    assert_eq!(refused, Some(Reason::AcrMismatch));
    // Not a person's ID token: an access-token issuer, a CI issuer.
    let access = IssuerSettings { token_type: TokenType::Access, ..mfa() };
    let Value::Object(claims) = okta_payload() else { panic!("an object") };
    assert!(unverified_identity(&access, claims).is_ok());
    let ci = IssuerSettings { acr_values: vec!["phr".into()], ..github_settings() };
    let ci_verifier = offline(vec![ci]);
    assert!(ci_verifier
        .verify_at(&rsa().sign(&github_header(), &github_payload()), NOW)
        .await
        .is_ok());
}

/// A `[[test]]` identity (or `policy explain --no-verify`) is built only from claims
/// of the types the verifier checks first: a time that is no number, an `aud` that is
/// no string or non-empty list of strings, is refused as the verifier refuses it.
#[test]
fn an_unverified_identity_has_the_verifiers_time_and_audience_types() {
    let build = |name: &str, value: Value| {
        let Value::Object(claims) = with(okta_payload(), name, value) else { panic!("object") };
        unverified_identity(&okta_settings(), claims).err().map(|e| e.reason)
    };
    for (name, value) in [
        ("exp", json!("soon")),
        ("nbf", json!([1])),
        ("iat", json!(true)),
        ("aud", json!(5)),
        ("aud", json!([])),
        ("aud", json!([OKTA_CLIENT, 5])),
    ] {
        assert_eq!(build(name, value.clone()), Some(Reason::InvalidClaims), "{name} = {value}");
    }
    assert_eq!(build("exp", json!(1767229200.5)), None);
    let Value::Object(claims) = without(okta_payload(), "aud") else { panic!("object") };
    assert!(unverified_identity(&okta_settings(), claims).is_ok(), "a test need not say `aud`");
}

#[tokio::test]
async fn v20_ci_tokens_need_their_provider_claims() {
    let v = offline(vec![github_settings()]);
    let token = rsa().sign(&github_header(), &without(github_payload(), "repository_id"));
    assert_eq!(reason(&v, &token).await, Some(Reason::InvalidClaims));
}

#[tokio::test]
async fn v21_claims_are_type_checked_never_coerced() {
    for (name, value) in [
        ("exp", json!("1767229200")),
        ("nbf", json!("0")),
        ("iat", json!(true)),
        ("sub", json!(42)),
        ("email", json!(["jane@acme.example"])),
        ("email_verified", json!("true")),
        ("groups", json!(["sre", 7])),
        ("groups", json!("sre")),
        ("azp", json!([OKTA_CLIENT])),
    ] {
        rejects(okta_header(), with(okta_payload(), name, value), Reason::InvalidClaims).await;
    }
    let v = offline(vec![github_settings()]);
    let token = rsa().sign(&github_header(), &with(github_payload(), "repository_id", json!(74)));
    assert_eq!(reason(&v, &token).await, Some(Reason::InvalidClaims));
}

#[test]
fn v23_bitbucket_workspace_ari_is_not_a_proxy_audience() {
    let ari = "ari:cloud:bitbucket::workspace/7baee083-4f25-4a97-8a9a-0fde1b623b45";
    let s = settings("bb", Preset::BitbucketPipelines, BITBUCKET, ari);
    assert!(Verifier::new(vec![s]).is_err());
}

#[tokio::test]
async fn v24_hosted_domain_needs_hd_and_verified_email() {
    let v = offline(vec![google_settings()]);
    let ok = rsa().sign(&google_header(), &google_payload());
    assert!(v.verify_at(&ok, NOW).await.unwrap().email_verified);
    for payload in [
        with(google_payload(), "hd", json!("evil.example")),
        without(google_payload(), "hd"),
        with(google_payload(), "email_verified", json!(false)),
    ] {
        let token = rsa().sign(&google_header(), &payload);
        assert_eq!(reason(&v, &token).await, Some(Reason::InvalidClaims));
    }
}

#[tokio::test]
async fn v25_group_overage_makes_groups_unknown() {
    let v = offline(vec![okta_settings()]);
    let hasgroups = with(okta_payload(), "hasgroups", json!(true));
    let id = v.verify_at(&rsa().sign(&okta_header(), &hasgroups), NOW).await.unwrap();
    assert!(!id.groups_known && id.groups.is_empty());
}

#[tokio::test]
async fn unrelated_issuers_do_not_share_keys_or_tokens() {
    // A token for okta presented at a verifier that only knows GitHub.
    let v = offline(vec![github_settings()]);
    let token = rsa().sign(&okta_header(), &okta_payload());
    assert_eq!(reason(&v, &token).await, Some(Reason::UnknownIssuer));
}

#[test]
fn duplicate_issuer_and_bad_urls_are_config_errors() {
    assert!(Verifier::new(vec![okta_settings(), okta_settings()]).is_err());
    let mut http = okta_settings();
    http.discovery_url = "http://acme.okta.com/.well-known/openid-configuration".into();
    assert!(Verifier::new(vec![http]).is_err());
    let mut ca = okta_settings();
    ca.ca_file = Some("/nonexistent/ca.pem".into());
    assert!(Verifier::new(vec![ca]).is_err());
    let mut empty = okta_settings();
    empty.algorithms.clear();
    assert!(Verifier::new(vec![empty]).is_err());
}

// === presets: reference claim shapes ===

const BITBUCKET: &str =
    "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc";
const GITHUB: &str = "https://token.actions.githubusercontent.com";
const GITLAB: &str = "https://gitlab.example.com";
const ENTRA: &str = "https://login.microsoftonline.com/9122040d-6c67-4c5b-b112-36a304b66dad/v2.0";
const GOOGLE: &str = "https://accounts.google.com";
const KEYCLOAK: &str = "https://sso.acme.example/realms/acme";
const PROXY: &str = "https://proxy.example.com";

fn github_settings() -> IssuerSettings {
    settings("github", Preset::GithubActions, GITHUB, PROXY)
}
fn github_header() -> Value {
    json!({"typ": "JWT", "alg": "RS256", "x5t": "synthetic-x5t-thumbprint", "kid": "rsa-1"})
}
fn github_payload() -> Value {
    json!({
        "jti": "6f4762ed-0758-4ccb-808d-ee3af5d723a8", "sub": "repo:acme/api:environment:production",
        "aud": PROXY, "iss": GITHUB, "nbf": 1767225000, "iat": 1767225600, "exp": 1767225900,
        "environment": "production", "ref": "refs/heads/main", "ref_type": "branch",
        "sha": "714a629c0b401fdce83e847fc9589983fc6f46bc", "repository": "acme/api",
        "repository_id": "74", "repository_owner": "acme", "repository_owner_id": "65",
        "repository_visibility": "private", "actor": "octocat", "actor_id": "12",
        "run_id": "9876543210", "run_number": "10", "run_attempt": "1",
        "runner_environment": "github-hosted", "workflow": "deploy",
        "workflow_ref": "acme/api/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_ref": "acme/automation/.github/workflows/oidc.yml@refs/heads/main",
        "head_ref": "", "base_ref": "", "event_name": "workflow_dispatch",
        "enterprise": "acme-corp", "enterprise_id": "2"
    })
}

fn google_settings() -> IssuerSettings {
    let client = "1234987819200.apps.googleusercontent.com";
    let mut s = settings("google", Preset::Oidc, GOOGLE, client);
    s.client_id = Some(client.into());
    s.hosted_domain = Some("acme.example".into());
    s
}
fn google_header() -> Value {
    json!({"alg": "RS256", "kid": "rsa-1"})
}
fn google_payload() -> Value {
    json!({
        "iss": GOOGLE, "azp": "1234987819200.apps.googleusercontent.com",
        "aud": "1234987819200.apps.googleusercontent.com", "sub": "10769150350006150715113082367",
        "at_hash": "HK6E_P6Dh8Y93mRNtsDB1Q", "hd": "acme.example", "email": "jane.doe@acme.example",
        "email_verified": true, "name": "Jane Doe", "iat": 1767225600, "exp": 1767229200,
        "nonce": "0394852-3190485-2490358"
    })
}

#[tokio::test]
async fn preset_bitbucket_with_audience_array() {
    let v = offline(vec![settings("bb", Preset::BitbucketPipelines, BITBUCKET, PROXY)]);
    let payload = json!({
        "iss": BITBUCKET,
        "aud": ["ari:cloud:bitbucket::workspace/7baee083-4f25-4a97-8a9a-0fde1b623b45", PROXY],
        "sub": "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}:{5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}:{9f8e7d6c-2222-4b3a-8d2c-1f0e9d8c7b6a}",
        "iat": 1767225600, "exp": 1767229200,
        "workspaceUuid": "{7baee083-4f25-4a97-8a9a-0fde1b623b45}",
        "repositoryUuid": "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}",
        "pipelineUuid": "{0a1b2c3d-3333-4c4d-8e5f-6a7b8c9d0e1f}",
        "pipelineRunUuid": "{1b2c3d4e-4444-4d5e-9f60-7a8b9c0d1e2f}",
        "stepUuid": "{9f8e7d6c-2222-4b3a-8d2c-1f0e9d8c7b6a}",
        "deploymentEnvironmentUuid": "{5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}",
        "branchName": "main"
    });
    let token = rsa().sign(&json!({"alg": "RS256", "kid": "rsa-1"}), &payload);
    let id = v.verify_at(&token, NOW).await.unwrap();
    assert_eq!(id.kind, PrincipalKind::Pipeline);
    let ci = id.ci.clone().unwrap();
    assert_eq!(ci.provider, "bitbucket");
    assert_eq!(ci.field("repository_id"), Some("{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}"));
    assert_eq!(ci.field("workspace_id"), Some("{7baee083-4f25-4a97-8a9a-0fde1b623b45}"));
    assert_eq!((ci.field("branch"), ci.field("ref")), (Some("main"), Some("refs/heads/main")));
    assert_eq!(ci.field("run"), Some("{1b2c3d4e-4444-4d5e-9f60-7a8b9c0d1e2f}"));
    assert_eq!(ci.field("step"), Some("{9f8e7d6c-2222-4b3a-8d2c-1f0e9d8c7b6a}"));
    // V18: CI tokens must carry iat.
    let token = rsa().sign(&json!({"alg": "RS256", "kid": "rsa-1"}), &without(payload, "iat"));
    assert_eq!(reason(&v, &token).await, Some(Reason::TokenIssuedAt));
}

#[tokio::test]
async fn preset_github_actions() {
    let v = offline(vec![github_settings()]);
    let id = v.verify_at(&rsa().sign(&github_header(), &github_payload()), NOW).await.unwrap();
    let ci = id.ci.clone().unwrap();
    assert_eq!(ci.provider, "github");
    assert_eq!((ci.field("branch"), ci.field("tag")), (Some("main"), None));
    assert_eq!(ci.field("ref"), Some("refs/heads/main"));
    assert_eq!(ci.field("run"), Some("9876543210-1"));
    assert_eq!(ci.field("repository"), Some("acme/api"));
    assert_eq!((ci.field("workspace"), ci.field("workspace_id")), (Some("acme"), Some("65")));
    assert_eq!(ci.field("environment"), Some("production"));
    assert_eq!(ci.field("commit"), Some("714a629c0b401fdce83e847fc9589983fc6f46bc"));
    assert_eq!(ci.field("actor"), Some("octocat"));
    assert_eq!(id.principal(), "github/repo:acme/api:environment:production");
    // GitHub tokens live 5 minutes: 301 s after iat plus leeway they are gone.
    let late = rsa().sign(&github_header(), &github_payload());
    assert_eq!(
        v.verify_at(&late, 1767225900 + 60).await.err().map(|e| e.reason),
        Some(Reason::TokenExpired)
    );
}

#[tokio::test]
async fn preset_gitlab_ci() {
    let v = offline(vec![settings("gitlab", Preset::GitlabCi, GITLAB, PROXY)]);
    let payload = json!({
        "iss": GITLAB, "aud": PROXY, "sub": "project_path:acme/platform/api:ref_type:branch:ref:main",
        "jti": "235b3a54-b797-45c7-ae9a-f72d7bc6ef5b", "iat": 1767225600, "nbf": 1767225595,
        "exp": 1767229200, "namespace_id": "72", "namespace_path": "acme/platform",
        "project_id": "20", "project_path": "acme/platform/api", "user_id": "1",
        "user_login": "sample-user", "user_email": "sample-user@example.com",
        "user_identities": [{"provider": "github", "extern_uid": "2435223452345"}],
        "pipeline_id": "574", "pipeline_source": "push", "job_id": "302", "ref": "main",
        "ref_type": "branch", "ref_path": "refs/heads/main", "ref_protected": "true",
        "groups_direct": ["acme/platform", "acme/security"], "environment": "production",
        "environment_protected": "true", "runner_id": 1, "runner_environment": "gitlab-hosted",
        "sha": "714a629c0b401fdce83e847fc9589983fc6f46bc", "project_visibility": "private",
        "ci_config_ref_uri": "gitlab.example.com/acme/platform/api//.gitlab-ci.yml@refs/heads/main",
        "ci_config_sha": "714a629c0b401fdce83e847fc9589983fc6f46bc"
    });
    let header = json!({"kid": "rsa-1", "typ": "JWT", "alg": "RS256"});
    let id = v.verify_at(&rsa().sign(&header, &payload), NOW).await.unwrap();
    let ci = id.ci.clone().unwrap();
    assert_eq!(ci.provider, "gitlab");
    assert_eq!((ci.field("branch"), ci.field("ref")), (Some("main"), Some("refs/heads/main")));
    assert_eq!(
        (ci.field("repository"), ci.field("repository_id")),
        (Some("acme/platform/api"), Some("20"))
    );
    assert_eq!(
        (ci.field("workspace"), ci.field("workspace_id")),
        (Some("acme/platform"), Some("72"))
    );
    assert_eq!((ci.field("run"), ci.field("step")), (Some("574"), Some("302")));
    assert_eq!(ci.field("actor"), Some("sample-user"));
    // The raw string boolean stays a string for claim matchers; never coerced.
    assert_eq!(id.claims.get("ref_protected"), Some(&json!("true")));
}

#[tokio::test]
async fn preset_entra_overage_leaves_groups_unknown() {
    let client = "6cb04018-a3f5-46a7-b995-940c78f5aef3";
    let v = offline(vec![settings("entra", Preset::Oidc, ENTRA, client)]);
    let payload = json!({
        "aud": client, "iss": ENTRA, "iat": 1767225600, "nbf": 1767225600, "exp": 1767229500,
        "name": "Jane Doe", "oid": "00000000-0000-0000-66f3-3332eca7ea81",
        "preferred_username": "jane.doe@acme.example", "roles": ["Proxy.Admin"],
        "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        "tid": "9122040d-6c67-4c5b-b112-36a304b66dad", "ver": "2.0",
        "_claim_names": {"groups": "src1"},
        "_claim_sources": {"src1": {"endpoint": "https://graph.windows.net/x/getMemberObjects"}}
    });
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": "rsa-1"});
    let id = v.verify_at(&rsa().sign(&header, &payload), NOW).await.unwrap();
    assert!(!id.groups_known);
    assert!(id.groups.is_empty());
    assert_eq!(id.kind, PrincipalKind::Human);
}

#[tokio::test]
async fn preset_google_hosted_domain() {
    let v = offline(vec![google_settings()]);
    let id = v.verify_at(&rsa().sign(&google_header(), &google_payload()), NOW).await.unwrap();
    assert_eq!(id.claims.get("hd"), Some(&json!("acme.example")));
    assert!(id.groups_known && id.groups.is_empty());
}

#[tokio::test]
async fn preset_keycloak_id_token_with_payload_typ() {
    let mut s = settings("kc", Preset::Oidc, KEYCLOAK, "edge-proxy");
    s.client_id = Some("edge-proxy".into());
    let v = offline(vec![s]);
    let payload = json!({
        "exp": 1767225900, "iat": 1767225600, "iss": KEYCLOAK, "aud": "edge-proxy",
        "sub": "6cd55704-eb42-4697-b55e-59046efc7b46", "typ": "ID", "azp": "edge-proxy",
        "email_verified": true, "email": "jane.doe@acme.example",
        "groups": ["/engineering/sre", "/engineering/platform"]
    });
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": "ec-1"});
    let id = v.verify_at(&ec().sign(&header, &payload), NOW).await.unwrap();
    assert_eq!(id.groups, ["/engineering/sre", "/engineering/platform"]);
}

// === verified-token cache ===

#[tokio::test]
async fn cache_hit_skips_signature_and_honours_exp() {
    let v = offline(vec![okta_settings()]);
    let token = rsa().sign(&okta_header(), &okta_payload());
    let hits =
        || crate::metrics::global().token_cache_hits.load(std::sync::atomic::Ordering::SeqCst);
    let first = v.verify_at(&token, NOW).await.unwrap();
    let before = hits();
    let second = v.verify_at(&token, NOW + 1).await.unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(v.signature_checks(), 1);
    assert!(hits() > before);
    // Past exp + leeway the entry is not honoured and the full check says expired.
    assert_eq!(
        v.verify_at(&token, 1767229200 + 60).await.err().map(|e| e.reason),
        Some(Reason::TokenExpired)
    );
    // Before nbf/iat - leeway (a clock going backwards) neither.
    assert_eq!(
        v.verify_at(&token, 1767225600 - 61).await.err().map(|e| e.reason),
        Some(Reason::TokenIssuedAt)
    );
    let allowed = crate::metrics::global().token_verifications.get(&"allowed");
    assert!(allowed >= 2);
}

#[tokio::test]
async fn a_token_cache_of_zero_entries_verifies_every_request_and_a_small_one_is_bounded() {
    let token = rsa().sign(&okta_header(), &okta_payload());
    let none = offline(vec![okta_settings()]).with_token_cache(0);
    for i in 0..3 {
        assert!(none.verify_at(&token, NOW + i).await.is_ok());
    }
    assert_eq!(none.signature_checks(), 3);
    assert_eq!(none.cached_tokens(), 0);

    let small = offline(vec![okta_settings()]).with_token_cache(2);
    for sub in ["a", "b", "c", "d"] {
        let mut p = okta_payload();
        p["sub"] = json!(sub);
        assert!(small.verify_at(&rsa().sign(&okta_header(), &p), NOW).await.is_ok());
    }
    assert_eq!(small.cached_tokens(), 2);
    assert!(small.verify_at(&token, NOW).await.is_ok());
    assert!(small.verify_at(&token, NOW + 1).await.is_ok());
    assert_eq!(small.signature_checks(), 5, "the fifth token is verified once, then a hit");
}

/// Session 14: what keeps an open tunnel or database session admitted besides its
/// token's claims is the key that verified the token — its cache entry's, or with the
/// cache off the one that verifies it again — while the issuer's set holds it. A set
/// that drops it (or puts other material under its `kid`) announces a removal; one that
/// changes nothing or only adds a key does not.
#[tokio::test]
async fn the_key_that_verified_a_token_and_the_key_sets_that_drop_it() {
    let now = crate::util::unix_now();
    let payload = with(with(okta_payload(), "iat", json!(now)), "exp", json!(now + 3600));
    let token = rsa().sign(&okta_header(), &payload);
    let corp = IssuerId("corp".into());
    let install = |v: &Verifier, keys: &[&DevSigner]| {
        assert!(v.install_jwks(&corp, &signer::jwks(keys), Duration::from_secs(600)).is_ok());
    };
    for (entries, signatures) in [(16, 1), (0, 2)] {
        let v = offline(vec![okta_settings()]).with_token_cache(entries);
        assert!(v.verify_at(&token, now).await.is_ok());
        let key = v.signing_key(&token).unwrap_or_else(|| panic!("no key ({entries})"));
        assert_eq!((key.issuer().as_str(), key.kid()), ("corp", "rsa-1"));
        assert_eq!(v.signature_checks(), signatures, "cache of {entries}");
        assert!(v.holds(&key));
        // A token the issuer's keys do not verify has no key.
        assert!(v.signing_key(&forger().sign(&okta_header(), &payload)).is_none());

        let mut removals = v.key_removals();
        install(&v, &[rsa(), ec()]);
        install(&v, &[ec(), rsa(), forger_kid_2()]);
        assert!(!removals.has_changed().unwrap_or(true), "no key dropped");
        assert!(v.holds(&key));
        install(&v, &[ec(), forger()]);
        assert!(removals.has_changed().unwrap_or(false), "new material under the kid");
        assert!(!v.holds(&key), "other material under the same kid is another key");
        assert!(v.signing_key(&token).is_none());
        removals.borrow_and_update();
        install(&v, &[ec()]);
        assert!(removals.has_changed().unwrap_or(false), "a kid dropped");
        // A reload's verifier whose issuer is another holds none of its keys.
        let other = offline(vec![settings("other", Preset::Oidc, OKTA, OKTA_CLIENT)]);
        assert!(!other.holds(&key));
    }
}

/// A reload that only reorders an issuer's `algorithms` (which ends no open tunnel or
/// session: the allowlist is a set) adopts its keys, so what they admitted keeps its key.
#[test]
fn a_reordered_allowlist_keeps_the_issuers_keys_across_a_reload() {
    let now = crate::util::unix_now();
    let payload = with(with(okta_payload(), "iat", json!(now)), "exp", json!(now + 3600));
    let token = rsa().sign(&okta_header(), &payload);
    let v = offline(vec![okta_settings()]);
    let key = v.signing_key(&token).unwrap_or_else(|| panic!("no key"));
    let mut reordered = okta_settings();
    reordered.algorithms.reverse();
    let reloaded = Verifier::new(vec![reordered]).unwrap();
    reloaded.adopt_keys_from(&v);
    assert!(reloaded.holds(&key));
}

/// One more RSA key under its own `kid`.
fn forger_kid_2() -> &'static DevSigner {
    static K: OnceLock<DevSigner> = OnceLock::new();
    K.get_or_init(|| DevSigner::generate_rs256("rsa-2").unwrap())
}

// === JWKS over the network ===

fn fast_timing() -> Timing {
    Timing {
        min_ttl: Duration::ZERO,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        ..Timing::default()
    }
}

async fn dev_issuer() -> DevIssuer {
    DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), None).await.unwrap()
}

/// Okta-like settings for an issuer served by `dev` at `path`, over plain loopback http.
fn dev_settings(dev: &DevIssuer, path: &str) -> IssuerSettings {
    let url = dev.issuer_url(path).unwrap();
    let mut s = okta_settings();
    s.id = IssuerId(path.trim_start_matches('/').into());
    s.discovery_url = format!("{url}/.well-known/openid-configuration");
    s.issuer = url;
    s.insecure_http = true;
    s
}

fn token_for(signer: &DevSigner, issuer: &str) -> String {
    let header = json!({"alg": signer.alg().name(), "kid": signer.kid()});
    signer.sign(&header, &with(okta_payload(), "iss", json!(issuer)))
}

#[tokio::test]
async fn jwks_over_https_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &*ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let dev =
        DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), Some(Arc::new(tls))).await.unwrap();
    let url = dev.add_issuer("/human", &[rsa()]);
    assert!(url.starts_with("https://"));

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut s = dev_settings(&dev, "/human");
    s.insecure_http = false;
    s.ca_file = Some(ca_file);
    let v = Arc::new(Verifier::new(vec![s.clone()]).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(10)).await);
    assert!(v.verify_at(&token_for(rsa(), &url), NOW).await.is_ok());
    assert_eq!((dev.discovery_fetches("/human"), dev.jwks_fetches("/human")), (1, 1));

    // Without the private CA the issuer's certificate is not trusted.
    s.ca_file = None;
    let untrusted = Arc::new(Verifier::new(vec![s]).unwrap());
    untrusted.start();
    assert!(!untrusted.wait_ready(Duration::from_millis(300)).await);
    assert_eq!(reason(&untrusted, &token_for(rsa(), &url)).await, Some(Reason::IssuerUnavailable));
}

#[tokio::test]
async fn unknown_kid_refreshes_once_per_cooldown_even_when_concurrent() {
    let dev = dev_issuer().await;
    let k1 = DevSigner::generate_es256("k1").unwrap();
    let url = dev.add_issuer("/human", &[&k1]);
    let v =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    assert_eq!(dev.jwks_fetches("/human"), 1);

    // Rotation: the provider publishes k2 and starts using it.
    let k2 = DevSigner::generate_es256("k2").unwrap();
    dev.set_keys("/human", &[&k1, &k2]);
    let token = token_for(&k2, &url);
    let results = futures_util::future::join_all((0..8).map(|_| v.verify_at(&token, NOW))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(dev.jwks_fetches("/human"), 2, "concurrent unknown kids share one fetch");

    // Within the cooldown another unknown kid costs no fetch.
    let k3 = DevSigner::generate_es256("k3").unwrap();
    dev.set_keys("/human", &[&k1, &k2, &k3]);
    for _ in 0..3 {
        assert_eq!(reason(&v, &token_for(&k3, &url)).await, Some(Reason::UnknownKey));
    }
    assert_eq!(dev.jwks_fetches("/human"), 2);
}

#[tokio::test]
async fn requests_queued_behind_a_slow_refresh_do_not_each_fetch_again() {
    let dev = dev_issuer().await;
    let k1 = DevSigner::generate_es256("k1").unwrap();
    let url = dev.add_issuer("/human", &[&k1]);
    let mut s = dev_settings(&dev, "/human");
    // A fetch (400 ms) outlasts the cooldown (200 ms), as a hanging issuer's 5 s fetch
    // timeout outlasts a short cooldown.
    s.refresh_cooldown = Duration::from_millis(200);
    let v = Arc::new(Verifier::with_timing(vec![s], fast_timing()).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    let fetched = dev.jwks_fetches("/human");

    // Junk tokens naming kids the issuer never published, all at once, while it is slow.
    dev.set_failure("/human", Failure::Slow(Duration::from_millis(400)));
    let junk: Vec<String> = (0..4)
        .map(|i| token_for(&DevSigner::generate_es256(format!("junk{i}")).unwrap(), &url))
        .collect();
    let started = tokio::time::Instant::now();
    let results = futures_util::future::join_all(junk.iter().map(|t| reason(&v, t))).await;
    assert!(results.iter().all(|r| *r == Some(Reason::UnknownKey)), "{results:?}");
    assert_eq!(
        dev.jwks_fetches("/human") - fetched,
        1,
        "the requests queued behind the fetch see it as the latest, and fetch nothing"
    );
    assert!(started.elapsed() < Duration::from_millis(1200), "they waited for one fetch, not four");
}

/// A verifier of an issuer at `/human` publishing `keys`, whose JWKS it refetches every
/// 100 ms (`max-age=0`) but never early for an unknown kid; and the issuer's URL.
async fn refreshing_verifier(dev: &DevIssuer, keys: &[&DevSigner]) -> (Arc<Verifier>, String) {
    let url = dev.add_issuer("/human", keys);
    dev.set_cache_control("/human", Some("max-age=0"));
    let mut s = dev_settings(dev, "/human");
    s.refresh_cooldown = Duration::from_secs(3600);
    let timing = Timing { min_ttl: Duration::from_millis(100), ..fast_timing() };
    let v = Arc::new(Verifier::with_timing(vec![s], timing).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    (v, url)
}

/// Polls until `token` is refused for `want` (accepted meanwhile is fine, any other
/// refusal is not), for at most 5 s.
async fn until_refused(v: &Verifier, token: &str, want: Reason) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match reason(v, token).await {
            Some(r) if r == want => return,
            other => assert_eq!(other, None, "only success or {want:?} expected"),
        }
        assert!(tokio::time::Instant::now() < deadline, "still accepted after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rotation_removes_keys_on_refresh() {
    let dev = dev_issuer().await;
    let k1 = DevSigner::generate_es256("k1").unwrap();
    let k2 = DevSigner::generate_es256("k2").unwrap();
    let (v, url) = refreshing_verifier(&dev, &[&k1, &k2]).await;
    let old = token_for(&k1, &url);
    assert!(v.verify_at(&old, NOW).await.is_ok());

    dev.set_keys("/human", &[&k2]);
    until_refused(&v, &old, Reason::UnknownKey).await;
    // The cached identity of the old token went with its key; k2 still works.
    assert!(v.verify_at(&token_for(&k2, &url), NOW).await.is_ok());
}

#[tokio::test]
async fn new_material_under_an_old_kid_ends_the_tokens_cached_under_it() {
    let dev = dev_issuer().await;
    let k1 = DevSigner::generate_es256("k1").unwrap();
    let (v, url) = refreshing_verifier(&dev, &[&k1]).await;
    let old = token_for(&k1, &url);
    assert!(v.verify_at(&old, NOW).await.is_ok());
    let checks = v.signature_checks();
    assert!(v.verify_at(&old, NOW).await.is_ok());
    assert_eq!(v.signature_checks(), checks, "cached");

    // The issuer replaces the key (say, after a compromise) but keeps its kid.
    let replaced = DevSigner::generate_es256("k1").unwrap();
    dev.set_keys("/human", &[&replaced]);
    until_refused(&v, &old, Reason::InvalidSignature).await;
    assert!(v.verify_at(&token_for(&replaced, &url), NOW).await.is_ok());
}

#[tokio::test]
async fn stale_window_then_fail_closed_then_recover() {
    let dev = dev_issuer().await;
    let k1 = DevSigner::generate_es256("k1").unwrap();
    let url = dev.add_issuer("/human", &[&k1]);
    dev.set_cache_control("/human", Some("max-age=0"));
    let mut s = dev_settings(&dev, "/human");
    s.stale_window = Duration::from_millis(1500);
    let timing = Timing { min_ttl: Duration::from_millis(200), ..fast_timing() };
    let v = Arc::new(Verifier::with_timing(vec![s], timing).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    let token = token_for(&k1, &url);
    assert!(v.verify_at(&token, NOW).await.is_ok());

    dev.set_failure("/human", Failure::ServerError);
    let failing_since = tokio::time::Instant::now();
    let fetched = dev.jwks_fetches("/human");
    // Past the 200 ms TTL, refreshes fail, yet the last good set still serves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(dev.jwks_fetches("/human") > fetched, "refreshes were attempted");
    assert!(v.verify_at(&token, NOW).await.is_ok(), "stale keys serve within the window");
    // The last success was less than one TTL before the failure began, so the set
    // must stay usable for at least the stale window, then fail closed (cache too).
    loop {
        match reason(&v, &token).await {
            None => {}
            Some(r) => {
                assert_eq!(r, Reason::IssuerUnavailable);
                break;
            }
        }
        assert!(failing_since.elapsed() < Duration::from_secs(5), "never failed closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failing_since.elapsed() >= Duration::from_millis(1400), "failed closed too early");
    assert!(!v.ready());
    assert_eq!(v.issuer_status(), vec![(IssuerId("human".into()), false)]);

    dev.set_failure("/human", Failure::Close);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!v.ready());
    dev.set_failure("/human", Failure::None);
    assert!(v.wait_ready(Duration::from_secs(5)).await, "recovers once the issuer answers");
    assert!(v.verify_at(&token, NOW).await.is_ok());
}

#[tokio::test]
async fn discovery_issuer_mismatch_is_rejected() {
    let dev = dev_issuer().await;
    let url = dev.add_issuer("/human", &[rsa()]);
    dev.set_advertised_issuer("/human", Some("https://evil.example"));
    let v =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    v.start();
    assert!(!v.wait_ready(Duration::from_millis(300)).await);
    assert!(dev.discovery_fetches("/human") >= 1);
    assert_eq!(dev.jwks_fetches("/human"), 0, "no JWKS from an issuer that is not ours");
    assert_eq!(reason(&v, &token_for(rsa(), &url)).await, Some(Reason::IssuerUnavailable));
}

#[tokio::test]
async fn unknown_issuer_causes_no_fetch_and_adoption_reuses_keys() {
    let dev = dev_issuer().await;
    let url = dev.add_issuer("/human", &[rsa()]);
    let other = dev.add_issuer("/other", &[rsa()]);
    let v =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    let before = (dev.discovery_fetches("/human"), dev.jwks_fetches("/human"));
    for _ in 0..5 {
        assert_eq!(reason(&v, &token_for(rsa(), &other)).await, Some(Reason::UnknownIssuer));
    }
    assert_eq!((dev.discovery_fetches("/other"), dev.jwks_fetches("/other")), (0, 0));
    assert_eq!((dev.discovery_fetches("/human"), dev.jwks_fetches("/human")), before);
    assert_eq!(v.fetches(0), 1);

    // Reload with the same source: keys carry over, nothing is fetched.
    let reloaded =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    reloaded.adopt_keys_from(&v);
    assert!(reloaded.ready());
    drop(v);
    reloaded.start();
    assert!(reloaded.verify_at(&token_for(rsa(), &url), NOW).await.is_ok());
    assert_eq!(dev.jwks_fetches("/human"), before.1);
    assert_eq!(reloaded.issuers().count(), 1);
    // A different trust setting is a different source.
    let mut changed = dev_settings(&dev, "/human");
    changed.ca_file = None;
    changed.discovery_url.push_str("?v=2");
    let fresh = Verifier::with_timing(vec![changed], fast_timing()).unwrap();
    fresh.adopt_keys_from(&reloaded);
    assert!(!fresh.ready());
}

/// Round 10: an identity a token admitted, checked again against its issuer as a reload
/// left it ([`verify::recheck`]): what narrows the issuer refuses it, what widens it or
/// does not concern the token keeps it, and the identity is the one the new settings
/// build (its end, its groups).
#[test]
fn a_reloaded_issuer_checks_an_admitted_tokens_claims_again() {
    let iss = "https://idp.example.com";
    let now = 1_700_000_000u64;
    let admitted = settings("corp", Preset::Oidc, iss, "portcullis");
    let payload = json!({
        "iss": iss, "aud": "portcullis", "sub": "alice", "iat": now - 600, "exp": now + 3000,
        "groups": ["sre"], "teams": ["blue"],
    });
    let Value::Object(payload) = payload else { panic!("an object") };
    let identity = unverified_identity(&admitted, payload).unwrap_or_else(|e| panic!("{e:?}"));
    let with = |f: &dyn Fn(&mut IssuerSettings)| {
        let mut s = admitted.clone();
        f(&mut s);
        verify::recheck(&s, &identity, now)
    };
    let refused = |r: Result<Identity, AuthError>| r.err().map(|e| e.reason);
    assert_eq!(refused(with(&|_| {})), None);
    assert_eq!(refused(with(&|s| s.audiences.push("another".into()))), None, "widened");
    assert_eq!(
        refused(with(&|s| s.audiences = vec!["another".into()])),
        Some(Reason::AudienceMismatch)
    );
    assert_eq!(
        refused(with(&|s| s.issuer = "https://other.example.com".into())),
        Some(Reason::UnknownIssuer)
    );
    assert!(refused(with(&|s| s.max_token_age = Some(Duration::from_secs(60)))).is_some());
    assert!(refused(with(&|s| s.hosted_domain = Some("example.com".into()))).is_some());
    // A shorter max_token_age not yet reached brings the identity's end forward.
    let sooner = with(&|s| s.max_token_age = Some(Duration::from_secs(900)));
    assert_eq!(sooner.map(|i| i.expires_at).ok(), Some(now - 600 + 900));
    // Policies see the groups the reloaded issuer reads.
    let teams = with(&|s| s.groups_claim = claim_path("teams"));
    assert_eq!(teams.map(|i| i.groups).ok(), Some(vec!["blue".to_string()]));
}

/// A log line a test can read: `tracing` output of this thread, without colour.
#[derive(Clone, Default)]
struct LogBuf(Arc<parking_lot::Mutex<Vec<u8>>>);

impl LogBuf {
    /// A buffer, and the guard that writes this thread's warnings (and worse) to it
    /// until it is dropped.
    fn capture() -> (LogBuf, tracing::subscriber::DefaultGuard) {
        let buf = LogBuf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }
}

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_key_fetch_names_the_url_without_its_query() {
    let (buf, _guard) = LogBuf::capture();
    // Nothing listens there: the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let mut s = okta_settings();
    s.id = IssuerId("corp".into());
    s.issuer = format!("http://127.0.0.1:{port}/t");
    s.discovery_url =
        format!("http://127.0.0.1:{port}/t/.well-known/openid-configuration?tenant_secret=hunter2");
    s.insecure_http = true;
    let keys =
        super::jwks::IssuerKeys::new(s, fast_timing(), Arc::new(tokio::sync::watch::channel(()).0))
            .unwrap();
    assert!(keys.refresh_for_kid("k1").await.is_none());
    let log = String::from_utf8_lossy(&buf.0.lock()).into_owned();
    assert!(log.contains("JWKS refresh failed"), "{log}");
    assert!(
        log.contains(&format!("url=http://127.0.0.1:{port}/t/.well-known/openid-configuration?…")),
        "{log}"
    );
    assert!(!log.contains("hunter2") && !log.contains("tenant_secret"), "{log}");
}

#[test]
fn fetch_urls_are_shown_without_query_or_userinfo() {
    use super::verify::{url_for_log, url_str_for_log};
    let uri: http::Uri = "https://idp.example.com:8443/keys?sig=abc".parse().unwrap();
    assert_eq!(url_for_log(&uri), "https://idp.example.com:8443/keys?…");
    let uri: http::Uri = "https://idp.example.com/keys".parse().unwrap();
    assert_eq!(url_for_log(&uri), "https://idp.example.com/keys");
    let shown = url_str_for_log("https://u:pw@idp.example.com/keys");
    assert!(!shown.contains("pw"), "{shown}");
}

/// Google is authoritative for an address only when it hosts it: a `@gmail.com`
/// address, or a Workspace account (`hd` set). A consumer Google account created with
/// another address (an employee's work address, kept after they leave; any address
/// its creator once read mail at) says `email_verified: true` for it all the same, so
/// without `hosted_domain` an allow on `email_domain = "acme.example"` admitted it.
/// Such an address is now unverified: allows that need a verified email do not match
/// it, denies still read it, `X-Portcullis-Email` is not sent.
#[tokio::test]
async fn a_google_address_google_does_not_host_is_not_verified() {
    let mut s = google_settings();
    s.hosted_domain = None;
    let v = offline(vec![s]);
    let consumer = without(google_payload(), "hd");
    let id = v.verify_at(&rsa().sign(&google_header(), &consumer), NOW).await.unwrap();
    assert_eq!(id.email.as_deref(), Some("jane.doe@acme.example"));
    assert!(!id.email_verified, "a consumer account's non-Google address");
    // The legacy issuer spelling is Google too.
    let mut legacy = google_settings();
    legacy.hosted_domain = None;
    legacy.issuer = "accounts.google.com".into();
    let v_legacy = offline(vec![legacy]);
    let token =
        rsa().sign(&google_header(), &with(consumer.clone(), "iss", json!("accounts.google.com")));
    assert!(!v_legacy.verify_at(&token, NOW).await.unwrap().email_verified);
    // Near misses: Workspace (`hd` set) and Gmail addresses are Google's own.
    let workspace =
        v.verify_at(&rsa().sign(&google_header(), &google_payload()), NOW).await.unwrap();
    assert!(workspace.email_verified);
    let gmail = with(consumer.clone(), "email", json!("Jane.Doe@GMail.com"));
    assert!(v.verify_at(&rsa().sign(&google_header(), &gmail), NOW).await.unwrap().email_verified);
    // Gmail's other domain (accounts opened in Germany and the UK): Google hosts it too.
    let googlemail = with(consumer.clone(), "email", json!("jane.doe@googlemail.com"));
    assert!(
        v.verify_at(&rsa().sign(&google_header(), &googlemail), NOW).await.unwrap().email_verified,
        "a @googlemail.com address is Gmail's"
    );
    let lookalike = with(consumer, "email", json!("jane@gmail.com.evil.example"));
    assert!(
        !v.verify_at(&rsa().sign(&google_header(), &lookalike), NOW).await.unwrap().email_verified
    );
    // Another provider's verified address is its word, as before.
    let okta = offline(vec![okta_settings()]);
    let id = okta.verify_at(&rsa().sign(&okta_header(), &okta_payload()), NOW).await.unwrap();
    assert_eq!(id.email_verified, okta_payload()["email_verified"] == json!(true));
}

mod parity;

/// The key fetcher follows no redirect (a `jwks_uri` answering 302 to wherever, an
/// internal address among them, is a failure, not a second request) and reads no more
/// than `max_body` of a JWKS: one over it is a failure, not memory spent. The same
/// document served directly and within the limit loads, so the refusals are the
/// redirect's and the size's.
#[tokio::test]
async fn a_jwks_that_redirects_or_is_too_large_is_not_taken() {
    let dev = dev_issuer().await;
    let url = dev.add_issuer("/human", &[rsa()]);
    let jwks = signer::jwks(&[rsa()]).to_string();
    let followed = dev.serve_jwks_elsewhere(jwks, 1_100_000);
    let token = token_for(rsa(), &url);
    let loads = |path: &str| {
        dev.set_discovery_member("/human", "jwks_uri", json!(format!("{}{path}", dev.base_url())));
        let v = Arc::new(
            Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap(),
        );
        v.start();
        async move { (v.wait_ready(Duration::from_millis(600)).await, v) }
    };

    let (ready, v) = loads("/elsewhere/moved").await;
    assert!(!ready, "a redirected JWKS was taken");
    assert_eq!(reason(&v, &token).await, Some(Reason::IssuerUnavailable));
    assert_eq!(followed.load(std::sync::atomic::Ordering::SeqCst), 0, "the redirect was followed");

    let (ready, v) = loads("/elsewhere/big").await;
    assert!(!ready, "a JWKS over the size limit was taken");
    assert_eq!(reason(&v, &token).await, Some(Reason::IssuerUnavailable));

    let (ready, v) = loads("/elsewhere/jwks.json").await;
    assert!(ready, "the same JWKS served directly did not load");
    assert!(v.verify_at(&token, NOW).await.is_ok());
}

/// A GitHub Actions and a GitLab CI issuer, and one policy over both: what the case
/// tests below decide tokens with.
struct GithubAndGitlab {
    verifier: Verifier,
    policy: crate::policy::Policy,
}

impl GithubAndGitlab {
    fn with_policy(toml: &str) -> Self {
        use crate::policy::{Catalog, Policy};
        let verifier =
            offline(vec![github_settings(), settings("gitlab", Preset::GitlabCi, GITLAB, PROXY)]);
        let mut catalog = Catalog::default();
        catalog.declare("github", Preset::GithubActions);
        catalog.declare("gitlab", Preset::GitlabCi);
        let policy = Policy::parse(&crate::diag::Source::new("p.toml", toml), &catalog)
            .unwrap_or_else(|e| panic!("{e:?}"));
        Self { verifier, policy }
    }

    /// Whether `GET /x` with `token` is allowed, and by (or against) which rule.
    async fn decide(&self, token: String) -> (bool, String) {
        let id = self.verifier.verify_at(&token, NOW).await.unwrap_or_else(|e| panic!("{e:?}"));
        let d =
            self.policy.evaluate(&id, &crate::policy::RequestFacts::http(&http::Method::GET, "/x"));
        (d.allowed, d.rule.map(|r| r.id.to_string()).unwrap_or_default())
    }
}

/// A GitLab CI token of project `acme/api` (id 20) in group `acme` (id 72) on branch
/// `main`, with `claims` set over those.
fn gitlab_token(claims: Value) -> String {
    let mut payload = json!({
        "iss": GITLAB, "aud": PROXY, "sub": "project_path:acme/api:ref_type:branch:ref:main",
        "iat": 1767225600, "exp": 1767229200, "namespace_id": "72", "namespace_path": "acme",
        "project_id": "20", "project_path": "acme/api", "ref": "main", "ref_type": "branch",
    });
    if let (Some(p), Value::Object(extra)) = (payload.as_object_mut(), claims) {
        p.extend(extra);
    }
    rsa().sign(&json!({"kid": "rsa-1", "typ": "JWT", "alg": "RS256"}), &payload)
}

/// GitHub and GitLab names are case-insensitive: `Acme/Legacy` and `acme/legacy` are one
/// repository, and the token spells it as its admins last renamed it (a case-only rename
/// is allowed). A deny written in another case than the token's missed it, so a denied
/// repository left its deny by renaming `legacy` to `Legacy`.
#[tokio::test]
async fn a_deny_on_a_repository_or_owner_name_holds_whatever_its_case() {
    let world = GithubAndGitlab::with_policy(
        r#"
[[rule]]
id = "org"
effect = "allow"
issuer = "github"
methods = "GET"
claims = { repository_owner_id = "65" }

[[rule]]
id = "group"
effect = "allow"
issuer = "gitlab"
methods = "GET"
claims = { namespace_id = "72" }

[[rule]]
id = "no-legacy"
effect = "deny"
issuer = "github"
ci = { repository = "acme/legacy" }

[[rule]]
id = "no-contractors"
effect = "deny"
issuer = ["github", "gitlab"]
ci = { workspace = ["acme-contractors", "acme/contractors"] }

[[rule]]
id = "no-old-api"
effect = "deny"
issuer = "gitlab"
ci = { repository = "acme/platform/old-api" }
"#,
    );
    let decide = |token: String| world.decide(token);
    let github = |repository: &str, owner: &str| {
        let p = with(github_payload(), "repository", json!(repository));
        rsa().sign(&github_header(), &with(p, "repository_owner", json!(owner)))
    };
    let gitlab = |project: &str, namespace: &str| {
        gitlab_token(json!({
            "sub": format!("project_path:{project}:ref_type:branch:ref:main"),
            "namespace_path": namespace, "project_path": project,
        }))
    };
    // As written, and in every other case.
    for (token, rule) in [
        (github("acme/legacy", "acme"), "no-legacy"),
        (github("Acme/Legacy", "Acme"), "no-legacy"),
        (github("ACME/LEGACY", "ACME"), "no-legacy"),
        (github("Acme-Contractors/api", "Acme-Contractors"), "no-contractors"),
        (gitlab("Acme/Platform/Old-API", "Acme/Platform"), "no-old-api"),
        (gitlab("ACME/Contractors/x", "ACME/Contractors"), "no-contractors"),
    ] {
        assert_eq!(decide(token).await, (false, rule.to_string()));
    }
    // Other names are still other names.
    assert_eq!(decide(github("acme/legacy2", "acme")).await, (true, "org".to_string()));
    assert_eq!(
        decide(gitlab("acme/platform/api", "acme/platform")).await,
        (true, "group".to_string())
    );
}

/// A pipeline of the named repository that is not on the branch: a tag named like it
/// (GitHub `refs/tags/main`; GitLab `ref = "main"` with `ref_type = "tag"`, with or
/// without `ref_path`; a Bitbucket tag pipeline, which has no `branchName`), a pull
/// request (`refs/pull/1/merge`, whose `head_ref` is `main`) or a merge-queue run
/// (`refs/heads/gh-readonly-queue/main/…`). Each provider's genuine token shape, through
/// the verifier: none is `ci.branch = "main"` or `ci.ref = "refs/heads/main"`.
#[tokio::test]
async fn a_tag_pull_request_or_merge_queue_run_named_like_the_branch_is_not_on_it() {
    use crate::diag::Source;
    use crate::policy::{Catalog, Policy, RequestFacts};
    let v = offline(vec![
        github_settings(),
        settings("gitlab", Preset::GitlabCi, GITLAB, PROXY),
        settings("bb", Preset::BitbucketPipelines, BITBUCKET, PROXY),
    ]);
    let mut catalog = Catalog::default();
    catalog.declare("github", Preset::GithubActions);
    catalog.declare("gitlab", Preset::GitlabCi);
    catalog.declare("bb", Preset::BitbucketPipelines);
    let mut text = String::new();
    for (issuer, pin) in [
        ("github", "claims = { repository_id = \"74\" }"),
        ("gitlab", "claims = { project_id = \"20\" }"),
        ("bb", "ci = { repository = \"{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}\" }"),
    ] {
        for (id, on) in [("branch", "branch = \"main\""), ("ref", "ref = \"refs/heads/main\"")] {
            let on = if pin.starts_with("ci") {
                pin.replace(" }", &format!(", {on} }}"))
            } else {
                format!("{pin}\nci = {{ {on} }}")
            };
            text.push_str(&format!("[[rule]]\nid = \"{issuer}-{id}\"\neffect = \"allow\"\nissuer = \"{issuer}\"\nmethods = \"GET\"\n{on}\n\n"));
        }
    }
    let policy =
        Policy::parse(&Source::new("p.toml", text), &catalog).unwrap_or_else(|e| panic!("{e:?}"));
    let get = http::Method::GET;
    let request = RequestFacts::http(&get, "/x");
    let github = |changes: &[(&str, Value)]| {
        let p = changes.iter().fold(github_payload(), |p, (k, val)| with(p, k, val.clone()));
        rsa().sign(&github_header(), &p)
    };
    let gitlab = |changes: &[(&str, Value)]| {
        let base = json!({
            "iss": GITLAB, "aud": PROXY, "sub": "project_path:acme/api:ref_type:branch:ref:main",
            "iat": 1767225600, "exp": 1767229200, "namespace_id": "72", "namespace_path": "acme",
            "project_id": "20", "project_path": "acme/api", "ref": "main", "ref_type": "branch",
            "ref_path": "refs/heads/main", "ref_protected": "true", "pipeline_source": "push"
        });
        let p = changes.iter().fold(base, |p, (k, val)| with(p, k, val.clone()));
        rsa().sign(&json!({"kid": "rsa-1", "typ": "JWT", "alg": "RS256"}), &p)
    };
    let bitbucket = |branch: Option<&str>| {
        let mut p = json!({
            "iss": BITBUCKET, "aud": PROXY, "iat": 1767225600, "exp": 1767229200,
            "sub": "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}:{9f8e7d6c-2222-4b3a-8d2c-1f0e9d8c7b6a}",
            "workspaceUuid": "{7baee083-4f25-4a97-8a9a-0fde1b623b45}",
            "repositoryUuid": "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}",
            "pipelineUuid": "{0a1b2c3d-3333-4c4d-8e5f-6a7b8c9d0e1f}",
            "stepUuid": "{9f8e7d6c-2222-4b3a-8d2c-1f0e9d8c7b6a}"
        });
        if let Some(b) = branch {
            p = with(p, "branchName", json!(b));
        }
        rsa().sign(&json!({"alg": "RS256", "kid": "rsa-1"}), &p)
    };
    let decide = |token: String| {
        let (v, policy) = (&v, &policy);
        async move {
            let id = v.verify_at(&token, NOW).await.unwrap_or_else(|e| panic!("{e:?}"));
            let d = policy.evaluate(&id, &request);
            (d.allowed, d.rule.map(|r| r.id.to_string()).unwrap_or_default())
        }
    };
    let off_branch = [
        ("github tag", github(&[("ref", json!("refs/tags/main")), ("ref_type", json!("tag"))])),
        (
            "github pull request",
            github(&[
                ("ref", json!("refs/pull/1/merge")),
                ("head_ref", json!("main")),
                ("base_ref", json!("main")),
                ("event_name", json!("pull_request")),
            ]),
        ),
        (
            "github merge queue",
            github(&[
                ("ref", json!("refs/heads/gh-readonly-queue/main/pr-1-714a629c0b401fdce83e847fc9589983fc6f46bc")),
                ("event_name", json!("merge_group")),
            ]),
        ),
        (
            "gitlab tag",
            gitlab(&[("ref_type", json!("tag")), ("ref_path", json!("refs/tags/main"))]),
        ),
        ("gitlab tag without ref_path", gitlab(&[("ref_type", json!("tag")), ("ref_path", Value::Null)])),
        ("bitbucket tag", bitbucket(None)),
    ];
    for (what, token) in off_branch {
        assert_eq!(decide(token).await, (false, String::new()), "{what}");
    }
    assert_eq!(decide(github(&[])).await, (true, "github-branch".to_string()));
    assert_eq!(decide(gitlab(&[])).await, (true, "gitlab-branch".to_string()));
    assert_eq!(decide(bitbucket(Some("main"))).await, (true, "bb-branch".to_string()));
}

/// GitHub environment names are case-insensitive (`environment: Production` runs in the
/// environment `production`, under its protection rules), and the token's `environment`
/// claim need not be in the case the policy author wrote (pypi/warehouse lower-cases it
/// for that reason). A deny on `ci.environment = "production"` missed a job that said
/// `Production`. GitLab's environments are case-sensitive (`Production` may be another,
/// unprotected one), so there `ci.environment` keeps matching exactly — in a rule that
/// names both providers too, where the one pattern is read each provider's way.
#[tokio::test]
async fn a_github_environment_matches_whatever_its_case_and_a_gitlab_one_exactly() {
    let world = GithubAndGitlab::with_policy(
        r#"
[[rule]]
id = "gh-staging"
effect = "allow"
issuer = "github"
methods = "GET"
claims = { repository_owner_id = "65" }
ci = { environment = "Staging" }

[[rule]]
id = "gl-staging"
effect = "allow"
issuer = "gitlab"
methods = "GET"
claims = { namespace_id = "72", environment_protected = "true" }
ci = { environment = "Staging" }

[[rule]]
id = "no-prod"
effect = "deny"
issuer = ["github", "gitlab"]
ci = { environment = "Production" }
"#,
    );
    let decide = |token: String| world.decide(token);
    let github = |env: &str| {
        rsa().sign(&github_header(), &with(github_payload(), "environment", json!(env)))
    };
    let gitlab =
        |env: &str| gitlab_token(json!({"environment": env, "environment_protected": "true"}));
    let deny = (false, "no-prod".to_string());
    for env in ["production", "Production", "PRODUCTION"] {
        assert_eq!(decide(github(env)).await, deny, "github {env}");
    }
    for env in ["Staging", "staging", "STAGING"] {
        assert_eq!(decide(github(env)).await, (true, "gh-staging".to_string()), "github {env}");
    }
    // GitLab: exact, in the same rule.
    assert_eq!(decide(gitlab("Production")).await, deny);
    assert_eq!(decide(gitlab("production")).await, (false, String::new()));
    assert_eq!(decide(gitlab("Staging")).await, (true, "gl-staging".to_string()));
    assert_eq!(decide(gitlab("staging")).await, (false, String::new()));
}

// === A hostile or broken identity provider: the fetch side ===

/// An issuer whose key endpoint accepts the request and then hangs (a provider down
/// behind a load balancer that keeps connections open): the background refresh waits
/// for its whole fetch timeout, and meanwhile tokens whose key is already held verify
/// at once and the issuer stays ready. Only a token naming an unknown `kid` waits for
/// that refresh (`requests_queued_behind_a_slow_refresh_do_not_each_fetch_again`).
#[tokio::test]
async fn a_hung_key_refresh_blocks_neither_verification_with_held_keys_nor_readiness() {
    let dev = dev_issuer().await;
    let k1 = DevSigner::generate_es256("k1").unwrap();
    let url = dev.add_issuer("/human", &[&k1]);
    // Every answer is stale at once, so the background task refetches right away.
    dev.set_cache_control("/human", Some("max-age=0"));
    let timing = Timing { fetch_timeout: Duration::from_secs(600), ..fast_timing() };
    let v = Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], timing).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    dev.set_failure("/human", Failure::Slow(Duration::from_secs(600)));
    // Wait until a refresh is at the hanging endpoint (it holds the refresh lock).
    let asked = dev.jwks_fetches("/human");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dev.jwks_fetches("/human") == asked {
        assert!(tokio::time::Instant::now() < deadline, "no refresh started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let verified =
        tokio::time::timeout(Duration::from_secs(30), v.verify_at(&token_for(&k1, &url), NOW))
            .await
            .expect("verification with a held key waited for the hung refresh");
    assert!(verified.is_ok(), "{verified:?}");
    assert!(v.ready(), "a refresh in flight made the issuer unready");
}

/// Serves on loopback, as a provider that dribbles: the answer's status line and
/// headers one byte at a time, or a body under the size cap one byte at a time; counts
/// the connections and the ones the client closed before the answer was complete.
async fn dribbling_server(headers_too: bool) -> (String, Arc<(AtomicU64, AtomicU64)>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let seen = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.0.fetch_add(1, SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
                let (slow, fast): (&[u8], &[u8]) =
                    if headers_too { (head, b"") } else { (b"", head) };
                if s.write_all(fast).await.is_err() {
                    return;
                }
                for b in slow.iter().chain(std::iter::repeat_n(&b' ', 1000)) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
                        seen.1.fetch_add(1, SeqCst);
                        return;
                    }
                }
            });
        }
    });
    (url, counts)
}

/// A key endpoint that dribbles its headers, or a body under the size cap, a byte at a
/// time never finishes a fetch: the fetch timeout bounds the whole exchange, connect to
/// last byte (not each read), so the fetch is given up with the answer unfinished, the
/// connection closed, and the issuer tried again.
#[tokio::test]
async fn a_key_endpoint_that_dribbles_its_answer_is_given_up_at_the_fetch_timeout() {
    for headers_too in [true, false] {
        let dev = dev_issuer().await;
        let url = dev.add_issuer("/human", &[rsa()]);
        let (jwks_uri, counts) = dribbling_server(headers_too).await;
        dev.set_discovery_member("/human", "jwks_uri", json!(jwks_uri));
        let timing = Timing { fetch_timeout: Duration::from_millis(300), ..fast_timing() };
        let v =
            Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], timing).unwrap());
        v.start();
        // Each answer takes 20 s to dribble out: seeing a second connection means the
        // first fetch was given up long before.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while counts.1.load(SeqCst) < 1 || counts.0.load(SeqCst) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "headers_too {headers_too}: the dribbled fetch was not given up and retried"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!v.ready(), "headers_too {headers_too}: a dribbled answer was taken");
        assert_eq!(reason(&v, &token_for(rsa(), &url)).await, Some(Reason::IssuerUnavailable));
    }
}

/// A key endpoint whose answer's head is huge — 200 headers, or one header of 1 MiB —
/// is refused as soon as hyper's client limits are passed (HTTP/1: 100 headers, about
/// 400 KiB of head), not read on until the fetch times out: nothing is held beyond them.
#[tokio::test]
async fn a_key_endpoint_answering_with_huge_headers_is_refused_at_once() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    for many in [true, false] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let jwks_uri = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let mut head =
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n".to_vec();
                    if many {
                        for i in 0..200 {
                            head.extend_from_slice(format!("X-Pad-{i}: a\r\n").as_bytes());
                        }
                    } else {
                        head.extend_from_slice(b"X-Pad: ");
                        head.extend(std::iter::repeat_n(b'a', 1 << 20));
                        head.extend_from_slice(b"\r\n");
                    }
                    // Then the head is never finished: only the limits can end the fetch.
                    let _ = s.write_all(&head).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        let dev = dev_issuer().await;
        dev.add_issuer("/human", &[rsa()]);
        dev.set_discovery_member("/human", "jwks_uri", json!(jwks_uri));
        let timing = Timing { fetch_timeout: Duration::from_secs(60), ..fast_timing() };
        let removals = Arc::new(tokio::sync::watch::channel(()).0);
        let keys =
            super::jwks::IssuerKeys::new(dev_settings(&dev, "/human"), timing, removals).unwrap();
        let refreshed = tokio::time::timeout(Duration::from_secs(20), keys.refresh_for_kid("k1"))
            .await
            .unwrap_or_else(|_| panic!("many {many}: read on until the fetch timeout"));
        assert!(refreshed.is_none() && !keys.loaded(), "many {many}: a key set was taken");
    }
}

/// A provider's `kid` is its text: a key set repeating a `kid` holding a newline wrote
/// a log line of the provider's making into the text log ("JWKS repeats a kid"). Every
/// `kid` a key-set warning names is written escaped, on the warning's own line.
#[test]
fn a_kid_in_a_key_set_warning_cannot_start_a_log_line() {
    let (buf, _guard) = LogBuf::capture();
    let forged = "k\n2026-11-27T12:00:00.000000Z  INFO portcullis: FORGED";
    let mut first = rsa().public_jwk();
    first["kid"] = json!(forged);
    let mut second = forger().public_jwk();
    second["kid"] = json!(forged);
    let mut private = forger_kid_2().public_jwk();
    private["kid"] = json!(format!("{forged} private"));
    private["d"] = json!("AQAB");
    let doc = json!({ "keys": [first, second, private] });
    let keys = super::jwks::parse_jwks(&doc, &[Algorithm::RS256], "corp").unwrap();
    assert_eq!(keys.len(), 1);
    let log = String::from_utf8_lossy(&buf.0.lock()).into_owned();
    assert!(log.contains("JWKS repeats a kid"), "{log}");
    assert!(log.contains("JWKS publishes a private key"), "{log}");
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.lines().all(|l| l.contains(" WARN ")), "{log}");
}

/// A discovery document whose `jwks_uri` carries credentials, names another scheme, is
/// plain http to a host that is not loopback, or is not a string at all, or whose
/// `issuer` is not a string: no key set is fetched, and the issuer stays unavailable
/// (fail closed) instead of taking keys from wherever the document points.
#[tokio::test]
async fn a_discovery_document_with_an_unusable_jwks_uri_or_issuer_fetches_no_keys() {
    let dev = dev_issuer().await;
    let url = dev.add_issuer("/human", &[rsa()]);
    let own = format!("{url}/jwks.json");
    let with_userinfo = own.replacen("http://", "http://user:pw@", 1);
    let cases = [
        ("jwks_uri", json!(with_userinfo)),
        ("jwks_uri", json!(own.replacen("http://", "ftp://", 1))),
        ("jwks_uri", json!(own.replacen("http://127.0.0.1", "http://idp.example", 1))),
        ("jwks_uri", json!("file:///etc/passwd")),
        ("jwks_uri", json!(5)),
        ("jwks_uri", json!([own])),
        ("jwks_uri", Value::Null),
        ("issuer", json!([url])),
        ("issuer", json!(5)),
    ];
    let token = token_for(rsa(), &url);
    for (member, value) in cases {
        dev.set_discovery_member("/human", member, value.clone());
        let v = Arc::new(
            Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap(),
        );
        v.start();
        assert!(!v.wait_ready(Duration::from_millis(300)).await, "{member} = {value}: ready");
        assert_eq!(reason(&v, &token).await, Some(Reason::IssuerUnavailable), "{member} = {value}");
        assert_eq!(dev.jwks_fetches("/human"), 0, "{member} = {value}: keys fetched");
    }
    // The document's own values again: keys load.
    dev.set_discovery_member("/human", "jwks_uri", json!(own));
    dev.set_discovery_member("/human", "issuer", json!(url));
    let v =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    assert!(v.verify_at(&token, NOW).await.is_ok());
}

/// A key set as large as is taken (100 keys) costs one signature check per token: a
/// token must name its key by `kid`, and no key is tried in turn.
#[tokio::test]
async fn a_key_set_of_thousands_of_keys_costs_one_signature_check_per_token() {
    let mut keys: Vec<Value> = (0..super::jwks::MAX_JWKS_KEYS - 1)
        .map(|i| {
            let mut k = ec().public_jwk();
            k["kid"] = json!(format!("decoy-{i}"));
            k
        })
        .collect();
    keys.push(rsa().public_jwk());
    let mut s = okta_settings();
    s.algorithms = vec![Algorithm::RS256, Algorithm::ES256];
    let v = Verifier::new(vec![s]).unwrap().with_token_cache(0);
    v.install_jwks(&IssuerId("corp".into()), &json!({ "keys": keys }), Duration::from_secs(600))
        .unwrap();
    let good = rsa().sign(&okta_header(), &okta_payload());
    assert!(v.verify_at(&good, NOW).await.is_ok());
    assert_eq!(v.signature_checks(), 1);
    // A forgery naming a decoy: one check, refused.
    let forger = DevSigner::generate_es256("decoy-7").unwrap();
    let forged = forger.sign(&json!({"alg": "ES256", "kid": "decoy-7"}), &okta_payload());
    assert_eq!(reason(&v, &forged).await, Some(Reason::InvalidSignature));
    assert_eq!(v.signature_checks(), 2);
}

/// A provider (or whoever answers for it) publishing more keys than any provider needs
/// (100; they publish 2 to 10), each to be parsed and held: the whole set is refused,
/// not cut to some of its keys. The previous set serves on (its key still verifies, the
/// issuer stays ready), a key only the oversized set holds verifies nothing, and the
/// refresh is a failure that says why.
#[tokio::test]
async fn a_key_set_of_more_than_100_keys_is_refused_whole_and_the_previous_one_serves_on() {
    let (buf, _guard) = LogBuf::capture();
    let dev = dev_issuer().await;
    let k1 = DevSigner::generate_es256("k1").unwrap();
    let k2 = DevSigner::generate_es256("k2").unwrap();
    let url = dev.add_issuer("/human", &[&k1]);
    let v =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    assert!(v.verify_at(&token_for(&k1, &url), NOW).await.is_ok());

    let mut keys: Vec<Value> = vec![k1.public_jwk(), k2.public_jwk()];
    keys.extend((keys.len()..=super::jwks::MAX_JWKS_KEYS).map(|i| {
        let mut k = ec().public_jwk();
        k["kid"] = json!(format!("decoy-{i}"));
        k
    }));
    assert_eq!(keys.len(), 101);
    dev.set_jwks("/human", json!({ "keys": keys }));
    let asked = dev.jwks_fetches("/human");
    // k2 is unknown: its token brings a refetch, which gets the oversized set.
    assert_eq!(reason(&v, &token_for(&k2, &url)).await, Some(Reason::UnknownKey));
    assert_eq!(dev.jwks_fetches("/human"), asked + 1, "no refetch for the unknown kid");
    assert!(v.verify_at(&token_for(&k1, &url), NOW).await.is_ok(), "the previous set was lost");
    assert!(v.ready());
    let log = String::from_utf8_lossy(&buf.0.lock()).into_owned();
    assert!(log.contains("JWKS refresh failed"), "{log}");
    assert!(log.contains("JWKS holds 101 keys, more than the 100 taken"), "{log}");
}

/// A key fetch asks for no compression and decompresses nothing: a provider cannot send
/// a small gzip bomb that inflates past the 1 MiB cap; a compressed answer is not JSON.
#[tokio::test]
async fn a_key_fetch_asks_for_no_compression_and_takes_no_compressed_answer() {
    let dev = dev_issuer().await;
    let url = dev.add_issuer("/human", &[rsa()]);
    let asked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = asked.clone();
    let handler: crate::dev::issuer::Handler = Arc::new(move |req| {
        seen.lock().push(req.headers.get(http::header::ACCEPT_ENCODING).cloned());
        http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_ENCODING, "gzip")
            // A gzip member's header: what a compressed key set starts with.
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03",
            )))
            .ok()
    });
    dev.add_handler("/gzip/", handler);
    dev.set_discovery_member("/human", "jwks_uri", json!(format!("{}/gzip/jwks", dev.base_url())));
    let v =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    v.start();
    assert!(!v.wait_ready(Duration::from_millis(300)).await, "a compressed key set was taken");
    assert_eq!(reason(&v, &token_for(rsa(), &url)).await, Some(Reason::IssuerUnavailable));
    let asked = asked.lock();
    assert!(!asked.is_empty(), "the key set was never asked for");
    assert!(asked.iter().all(Option::is_none), "asked for an encoding: {asked:?}");
}

/// A browser sign-in client of the issuer `settings` describe, its secret written in `dir`.
fn sign_in_provider(
    mut settings: IssuerSettings,
    dir: &std::path::Path,
) -> crate::session::oidc::Provider {
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    settings.audiences = vec!["portcullis".into()];
    let login = crate::config::LoginSettings {
        issuer: settings.id.clone(),
        client_id: "portcullis".into(),
        client_secret: crate::config::SecretSource::File(secret),
        scopes: vec!["openid".into()],
        redirect_path: "/.portcullis/callback".into(),
        extra_params: Vec::new(),
        post_logout_redirect: None,
    };
    crate::session::oidc::Provider::new(settings, login).unwrap()
}

/// rustls quotes a certificate's names as they are when none fits the host asked for
/// ("certificate not valid for name …; certificate is only valid for DnsName(\"…\")"),
/// and a certificate a private CA signed (or any CA that signs what it is sent) can hold
/// a newline followed by a line of the log's shape, an ANSI escape or a bidi override.
/// The key fetch's and the sign-in's failures write that text escaped, each on its own
/// line.
#[tokio::test]
async fn a_tls_error_quoting_a_certificates_names_reaches_the_log_escaped() {
    let (buf, _guard) = LogBuf::capture();
    let odd = crate::tls::odd_names::odd_names();
    let dev = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), Some(odd.server.clone()))
        .await
        .unwrap();
    dev.add_issuer("/human", &[rsa()]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &odd.ca_pem).unwrap();
    let mut s = dev_settings(&dev, "/human");
    s.insecure_http = false;
    s.ca_file = Some(ca_file);
    let removals = Arc::new(tokio::sync::watch::channel(()).0);
    let keys = super::jwks::IssuerKeys::new(s.clone(), fast_timing(), removals).unwrap();
    assert!(keys.refresh_for_kid("k1").await.is_none());
    let provider = sign_in_provider(s, dir.path());
    assert!(provider.metadata(false).await.is_err());

    let log = String::from_utf8_lossy(&buf.0.lock()).into_owned();
    assert!(log.contains("JWKS refresh failed"), "{log}");
    assert!(log.contains("provider metadata fetch failed"), "{log}");
    assert_eq!(log.lines().count(), 2, "{log}");
    let forged = format!("x\\u000A{}", crate::tls::odd_names::FORGED);
    for line in log.lines() {
        assert!(line.contains(" WARN "), "{log}");
        assert!(line.contains("certificate not valid for name"), "{log}");
        assert!(line.contains(&forged), "{log}");
        assert!(line.contains("y\\u001B[2K") && line.contains("z\\u202Elmth"), "{log}");
    }
    assert!(!log.contains('\u{1b}') && !log.contains('\u{202e}'), "{log}");
}

/// What a provider sends is the provider's to make costly: a 1 MiB key set is some
/// 2 500 RSA keys to parse (a tenth of a second of CPU; more than 100 keys are refused
/// whole, but only once read as JSON), and a 1 MiB discovery document of a million tiny
/// members takes tens of milliseconds to read, and as much again for a sign-in, which
/// reads it into its client. Both are read on the blocking pool, never on a runtime
/// thread (here the test's, current-thread, as the proxy's runtime is on a one-CPU
/// host), where they held up every request that thread serves, at each refresh and at
/// each refetch a junk token's unknown `kid` brings (each failed key fetch brings a
/// rediscovery too). The bearer path's fetch and the browser sign-in's alike.
#[tokio::test]
async fn a_fetched_key_set_and_discovery_document_are_read_off_the_runtime_thread() {
    let dev = dev_issuer().await;
    let signer = DevSigner::generate_rs256("k1").unwrap();
    let url = dev.add_issuer("/human", &[&signer]);
    crate::dev::login::DevLogin::install(&dev, "/human", &signer, "portcullis", "s3cret").unwrap();
    let v =
        Arc::new(Verifier::with_timing(vec![dev_settings(&dev, "/human")], fast_timing()).unwrap());
    v.start();
    assert!(v.wait_ready(Duration::from_secs(5)).await);
    assert!(v.verify_at(&token_for(&signer, &url), NOW).await.is_ok());
    assert_eq!(dev.discovery_fetches("/human"), 1);
    let keys_here = || super::jwks::KEYS_READ.with(|n| n.get());
    let documents_here = || super::verify::DOCUMENTS_READ.with(|n| n.get());
    assert_eq!(keys_here(), 0, "a key set read on the runtime thread");
    assert_eq!(documents_here(), 0, "a discovery document read on the runtime thread");

    let dir = tempfile::tempdir().unwrap();
    let provider = sign_in_provider(dev_settings(&dev, "/human"), dir.path());
    assert!(provider.metadata(false).await.is_ok());
    assert_eq!(dev.discovery_fetches("/human"), 2);
    assert_eq!(keys_here(), 0, "a sign-in's key set read on the runtime thread");
    assert_eq!(documents_here(), 0, "a sign-in's discovery document read on the runtime thread");
}
