//! The token validation checklist (`shared/reference/jwt-validation.md`, V1–V27), end to
//! end: each case is a token crafted to break exactly one rule, sent through the proxy
//! over TLS; the client must get 401 (or the stated status) and the audit event the
//! precise reason. The verifier's unit tests cover the same rules in isolation.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::*;

fn b64(v: &str) -> String {
    URL_SAFE_NO_PAD.encode(v.as_bytes())
}

/// Sends `token` and asserts the status, the public error and the logged reason.
async fn expect(w: &World, case: &str, token: &str, status: StatusCode, reason: &str) {
    let r = w.get("/x", Some(token)).await;
    assert_eq!(r.status, status, "{case}: {}", r.text());
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["reason"], reason, "{case}: {ev}");
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(
            r.json()["error"],
            "invalid-token",
            "{case}: public code never reveals the check"
        );
        assert_eq!(
            r.headers["www-authenticate"], r#"Bearer realm="portcullis", error="invalid_token""#,
            "{case}"
        );
    }
}

fn raw(w: &World, header: &Value, payload: &Value) -> String {
    w.signer.sign_raw(&header.to_string(), &payload.to_string())
}

#[tokio::test]
async fn format_rules_v1_to_v3() {
    let w = World::start().await;
    let (h, p) = w.parts("bb", &[]);
    let good = raw(&w, &h, &p);
    let s: Vec<&str> = good.split('.').collect();
    let u = StatusCode::UNAUTHORIZED;
    // V1: size cap.
    let huge = w.token("bb", &[&format!("pad={}", "x".repeat(20_000))]);
    expect(&w, "V1 oversized", &huge, u, "malformed-token").await;
    // V2: compact JWS only.
    expect(&w, "V2 two segments", &format!("{}.{}", s[0], s[1]), u, "malformed-token").await;
    expect(&w, "V2 five segments (JWE)", &format!("{good}.a.b"), u, "malformed-token").await;
    let json_serialization =
        b64(&json!({"payload": s[1], "signatures": [{"protected": s[0], "signature": s[2]}]})
            .to_string());
    expect(&w, "V2 JSON serialization", &json_serialization, u, "malformed-token").await;
    expect(&w, "V2 bad characters", &format!("{}.{}+.{}", s[0], s[1], s[2]), u, "malformed-token")
        .await;
    // V3: strict base64url, JSON object roots, no duplicate members.
    expect(&w, "V3 padding", &format!("{}=.{}.{}", s[0], s[1], s[2]), u, "malformed-token").await;
    let dup = w
        .signer
        .sign_raw(&h.to_string(), &p.to_string().replacen('{', r#"{"branchName":"feature/x","#, 1));
    expect(&w, "V3 duplicate member", &dup, u, "malformed-token").await;
    let arr = w.signer.sign_raw(&h.to_string(), "[1,2]");
    expect(&w, "V3 array root", &arr, u, "malformed-token").await;
    let notjson = w.signer.sign_raw(&h.to_string(), "not json");
    expect(&w, "V3 not JSON", &notjson, u, "malformed-token").await;
}

#[tokio::test]
async fn header_rules_v4_to_v11() {
    let w = World::start().await;
    let (h, p) = w.parts("bb", &[]);
    let u = StatusCode::UNAUTHORIZED;
    let with = |k: &str, v: Value| {
        let mut h = h.clone();
        h[k] = v;
        raw(&w, &h, &p)
    };
    // V4: exact allowlist; none / HS* / case games.
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": w.signer.kid()}).to_string()),
        b64(&p.to_string())
    );
    expect(&w, "V4 alg none, no signature", &unsigned, u, "malformed-token").await;
    expect(
        &w,
        "V4 alg none, signed anyway",
        &with("alg", json!("none")),
        u,
        "disallowed-algorithm",
    )
    .await;
    expect(&w, "V4 alg noNE", &with("alg", json!("noNE")), u, "disallowed-algorithm").await;
    expect(&w, "V4 alg HS256", &with("alg", json!("HS256")), u, "disallowed-algorithm").await;
    expect(&w, "V4 alg rs256", &with("alg", json!("rs256")), u, "disallowed-algorithm").await;
    expect(
        &w,
        "V4 alg not in issuer allowlist",
        &with("alg", json!("RS512")),
        u,
        "disallowed-algorithm",
    )
    .await;
    // V7: kid is an opaque, bounded key.
    expect(&w, "V7 path kid", &with("kid", json!("../../../etc/passwd")), u, "unknown-key").await;
    expect(&w, "V7 huge kid", &with("kid", json!("k".repeat(1000))), u, "malformed-token").await;
    // V8: no key material or URLs from the token.
    expect(&w, "V8 jku", &with("jku", json!("https://evil.test/jwks")), u, "forbidden-header")
        .await;
    expect(&w, "V8 x5u", &with("x5u", json!("https://evil.test/cert")), u, "forbidden-header")
        .await;
    expect(&w, "V8 jwk", &with("jwk", w.signer.public_jwk()), u, "forbidden-header").await;
    expect(&w, "V8 x5c", &with("x5c", json!(["MIIB"])), u, "forbidden-header").await;
    // V9: crit, even empty.
    expect(&w, "V9 crit", &with("crit", json!(["exp"])), u, "forbidden-header").await;
    expect(&w, "V9 crit empty", &with("crit", json!([])), u, "forbidden-header").await;
    // V10: nested JWTs.
    expect(&w, "V10 cty JWT", &with("cty", json!("JWT")), u, "forbidden-header").await;
    // V11: an access token is not a CI/ID token.
    expect(&w, "V11 typ at+jwt", &with("typ", json!("at+jwt")), u, "wrong-token-type").await;
    expect(
        &w,
        "V11 typ application/at+jwt",
        &with("typ", json!("application/at+jwt")),
        u,
        "wrong-token-type",
    )
    .await;
    // Absent and `JWT` (any case) are fine.
    let ok = with("typ", json!("jwt"));
    assert_eq!(w.get("/x", Some(&ok)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn signature_and_key_rules_v5_v6_v12_v13() {
    let w = World::start().await;
    let (h, p) = w.parts("bb", &[]);
    let u = StatusCode::UNAUTHORIZED;
    // V12: another key under our kid.
    let attacker = portcullis::dev::signer::DevSigner::generate_rs256(w.signer.kid())
        .unwrap_or_else(|e| panic!("{e}"));
    let forged = attacker.sign(&h, &p);
    expect(&w, "V12 foreign key", &forged, u, "invalid-signature").await;
    // V12: a valid signature over other claims.
    let good = raw(&w, &h, &p);
    let mut p2 = p.clone();
    p2["branchName"] = json!("main-but-edited");
    let s: Vec<&str> = good.split('.').collect();
    let spliced = format!("{}.{}.{}", s[0], b64(&p2.to_string()), s[2]);
    expect(&w, "V12 spliced payload", &spliced, u, "invalid-signature").await;
    // V6/V13: unknown issuer (also a lookalike) and no fetch to it.
    let evil_url = w.issuer.add_issuer("/evil", &[&attacker]);
    let mut pe = p.clone();
    pe["iss"] = json!(evil_url);
    expect(&w, "V6 unknown issuer", &attacker.sign(&h, &pe), u, "unknown-issuer").await;
    assert_eq!(w.issuer.discovery_fetches("/evil"), 0, "never fetch for an unknown issuer");
    assert_eq!(w.issuer.jwks_fetches("/evil"), 0);
    let mut ps = p.clone();
    ps["iss"] = json!(format!("{}/", w.urls["bb"]));
    expect(&w, "V13 trailing slash", &raw(&w, &h, &ps), u, "unknown-issuer").await;
    // V5: the key must fit the algorithm: an ES256 header naming the RSA key.
    let es = portcullis::dev::signer::DevSigner::generate_es256(w.signer.kid())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut he = h.clone();
    he["alg"] = json!("ES256");
    let t = es.sign(&he, &p);
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, u, "V5: ES256 token with an RSA kid");
}

#[tokio::test]
async fn claim_rules_v14_to_v21() {
    let w = World::start().await;
    let u = StatusCode::UNAUTHORIZED;
    let now = portcullis::util::unix_now();
    let t = |iss: &str, o: &[&str]| w.token(iss, o);
    // V14: audience.
    expect(&w, "V14 no aud", &t("gh", &["aud:=null"]), u, "audience-mismatch").await;
    expect(
        &w,
        "V14 other aud",
        &t("gh", &["aud=https://github.com/demo-org"]),
        u,
        "audience-mismatch",
    )
    .await;
    expect(
        &w,
        "V14 array without ours",
        &t("bb", &["aud:=[\"ari:cloud:bitbucket::workspace/x\"]"]),
        u,
        "audience-mismatch",
    )
    .await;
    // V15: azp on human ID tokens.
    expect(&w, "V15 other azp", &t("corp", &["azp=someone-else"]), u, "authorized-party-mismatch")
        .await;
    expect(
        &w,
        "V15 several aud, no azp",
        &t("corp", &["azp:=null", &format!("aud:=[\"{AUD}\",\"other\"]")]),
        u,
        "authorized-party-mismatch",
    )
    .await;
    // V16/V19: exp, with 60 s leeway.
    expect(&w, "V16 expired", &t("gh", &[&format!("exp:={}", now - 120)]), u, "token-expired")
        .await;
    expect(&w, "V16 no exp", &t("gh", &["exp:=null"]), u, "invalid-claims").await;
    expect(
        &w,
        "V16 string exp",
        &t("gh", &[&format!("exp=\"{}\"", now + 100)]),
        u,
        "invalid-claims",
    )
    .await;
    assert_eq!(
        w.get("/x", Some(&t("gh", &[&format!("exp:={}", now - 30)]))).await.status,
        StatusCode::OK,
        "V19 within leeway"
    );
    // V17: nbf in the future; GitHub's nbf = iat - 600 is fine (checked by the default preset token).
    expect(
        &w,
        "V17 nbf future",
        &t("gh", &[&format!("nbf:={}", now + 600)]),
        u,
        "token-not-yet-valid",
    )
    .await;
    // V18: iat required for CI tokens, never in the future.
    expect(&w, "V18 iat future", &t("gl", &[&format!("iat:={}", now + 600)]), u, "token-issued-at")
        .await;
    expect(&w, "V18 no iat", &t("bb", &["iat:=null"]), u, "token-issued-at").await;
    // V20: CI profiles require their provider claims; ID-token issuers refuse access tokens.
    expect(
        &w,
        "V20 bitbucket without repositoryUuid",
        &t("bb", &["repositoryUuid:=null"]),
        u,
        "invalid-claims",
    )
    .await;
    expect(
        &w,
        "V20 github without repository_id",
        &t("gh", &["repository_id:=null"]),
        u,
        "invalid-claims",
    )
    .await;
    expect(&w, "V20 human token with scp", &t("corp", &["scp=read"]), u, "wrong-token-type").await;
    expect(&w, "V20 keycloak access token", &t("corp", &["typ=Bearer"]), u, "wrong-token-type")
        .await;
    // V21: typed claims, never coerced.
    expect(
        &w,
        "V21 string email_verified",
        &t("corp", &["email_verified=true"]),
        u,
        "invalid-claims",
    )
    .await;
    expect(&w, "V21 groups not a list", &t("corp", &["groups=engineering"]), u, "invalid-claims")
        .await;
    expect(
        &w,
        "V21 numeric repository_id",
        &t("gh", &["repository_id:=1002"]),
        u,
        "invalid-claims",
    )
    .await;
}

#[tokio::test]
async fn max_token_age_v18() {
    let w =
        World::with(Setup { issuer_extra: "max_token_age = \"5m\"".into(), ..Setup::default() })
            .await;
    let now = portcullis::util::unix_now();
    let old = w.token("gl", &[&format!("iat:={}", now - 1800), &format!("nbf:={}", now - 1800)]);
    expect(&w, "V18 older than max age", &old, StatusCode::UNAUTHORIZED, "token-issued-at").await;
    assert_eq!(w.get("/x", Some(&w.token("gl", &[]))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn group_overage_fails_closed_v25() {
    let w = World::start().await;
    let t = w.token(
        "corp",
        &[
            "groups:=null",
            r#"_claim_names:={"groups":"src1"}"#,
            r#"_claim_sources:={"src1":{"endpoint":"https://graph.evil.test/x"}}"#,
        ],
    );
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let ev = w.event_for(&request_id(&r)).await;
    assert_eq!(ev["reason"], "groups-unknown");
}

#[tokio::test]
async fn single_use_routes_refuse_replays_v27() {
    let w =
        World::with(Setup { route_extra: "single_use_tokens = true".into(), ..Setup::default() })
            .await;
    let t = w.token("bb", &[]);
    assert_eq!(w.get("/x", Some(&t)).await.status, StatusCode::OK);
    expect(&w, "V27 replay", &t, StatusCode::UNAUTHORIZED, "token-replayed").await;
    assert_eq!(
        w.get("/x", Some(&w.token("bb", &[]))).await.status,
        StatusCode::OK,
        "a fresh token is fine"
    );
}

/// A token is accepted until `exp` plus the leeway (V19), so it must be remembered
/// that long: forgotten at `exp`, it could be replayed for the leeway's 60 s.
#[tokio::test]
async fn single_use_routes_refuse_replays_within_the_leeway_after_exp_v27() {
    let w =
        World::with(Setup { route_extra: "single_use_tokens = true".into(), ..Setup::default() })
            .await;
    let now = portcullis::util::unix_now();
    for (issuer, id) in [("bb", "stepUuid"), ("gh", "jti")] {
        let t = w.token(issuer, &[&format!("exp:={}", now - 30), &format!("{id}=leeway-{issuer}")]);
        assert_eq!(w.get("/x", Some(&t)).await.status, StatusCode::OK, "{issuer}: within leeway");
        expect(&w, issuer, &t, StatusCode::UNAUTHORIZED, "token-replayed").await;
    }
}

#[tokio::test]
async fn unknown_kid_refreshes_once_then_rejects() {
    let w = World::start().await;
    let before = w.issuer.jwks_fetches("/github");
    let (mut h, p) = w.parts("gh", &[]);
    h["kid"] = json!("rotated-away");
    let t = raw(&w, &h, &p);
    let (a, b, c) =
        tokio::join!(w.get("/x", Some(&t)), w.get("/x", Some(&t)), w.get("/x", Some(&t)));
    for r in [a, b, c] {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let after = w.issuer.jwks_fetches("/github");
    assert!(after - before <= 1, "concurrent unknown kids share one refresh ({before} → {after})");
    // Within the cooldown, no further fetch.
    w.get("/x", Some(&t)).await;
    assert_eq!(w.issuer.jwks_fetches("/github"), after);
}

#[tokio::test]
async fn key_rotation_at_the_issuer_is_picked_up() {
    let w = World::start().await;
    let next = portcullis::dev::signer::DevSigner::generate_rs256("test-key-2")
        .unwrap_or_else(|e| panic!("{e}"));
    w.issuer.set_keys("/gitlab", &[&next]);
    let (mut h, p) = w.parts("gl", &[]);
    h["kid"] = json!("test-key-2");
    let t = next.sign(&h, &p);
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "new kid fetched on first sight: {}", r.text());
    // The old key was removed from the set: after the cooldown a token signed with it fails.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (mut h, p) = w.parts("gl", &[]);
    h["kid"] = json!("never-seen");
    let _ = w.get("/x", Some(&raw(&w, &h, &p))).await; // forces a refresh that replaces the set
    let old = w.token("gl", &[]);
    let r = w.get("/x", Some(&old)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a removed key stops verifying");
    let _ = w.send(Method::GET, "/", &[], Bytes::new()).await;
}

/// The P-256 group order `n`, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// The same ES256 token with its signature's `s` replaced by `n − s`: another valid
/// signature over the same header and payload (ECDSA signatures are malleable).
fn malleate_es256(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap_or_else(|| panic!("not a JWS: {token}"));
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap_or_else(|e| panic!("signature: {e}"));
    assert_eq!(sig.len(), 64, "ES256 signatures are r || s, 32 bytes each");
    // n − s over 32-byte big-endian numbers, borrowing from the right; 0 < s < n.
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(P256_N[i]) - i16::from(sig[32 + i]) - borrow;
        borrow = i16::from(d < 0);
        sig[32 + i] = (d + 256 * borrow) as u8;
    }
    assert_eq!(borrow, 0, "s < n");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig))
}

/// V27 against ECDSA malleability: `s` → `n − s` makes a different, valid token with
/// the same claims, so a single-use route must know a token by what was signed (its
/// issuer and `jti`, or its header and payload), not by its bytes.
#[tokio::test]
async fn single_use_routes_refuse_a_malleated_es256_replay_v27() {
    let w = World::with(Setup {
        route_extra: "single_use_tokens = true".into(),
        issuer_extra: "algorithms = [\"RS256\", \"ES256\"]".into(),
        ..Setup::default()
    })
    .await;
    let es = portcullis::dev::signer::DevSigner::generate_es256("es-key-1")
        .unwrap_or_else(|e| panic!("{e}"));
    for (issuer, path) in [("corp", "/human"), ("gh", "/github")] {
        w.issuer.set_keys(path, &[&w.signer, &es]);
        let (mut h, p) = w.parts(issuer, &[]);
        // `corp` tokens carry no `jti` (keyed by header and payload), GitHub's do.
        assert_eq!(p.get("jti").is_some(), issuer == "gh", "{issuer}: {p}");
        h["alg"] = json!("ES256");
        h["kid"] = json!("es-key-1");
        let t = es.sign(&h, &p);
        let t2 = malleate_es256(&t);
        assert_ne!(t, t2);
        let r = w.get("/x", Some(&t)).await;
        assert_eq!(r.status, StatusCode::OK, "{issuer}: first use: {}", r.text());
        expect(
            &w,
            &format!("{issuer}: exact replay"),
            &t,
            StatusCode::UNAUTHORIZED,
            "token-replayed",
        )
        .await;
        expect(
            &w,
            &format!("{issuer}: malleated replay"),
            &t2,
            StatusCode::UNAUTHORIZED,
            "token-replayed",
        )
        .await;
        // Near miss: a route without single use takes the malleated token as the same caller.
        let fresh = w.token(issuer, &[]);
        assert_eq!(w.get("/x", Some(&fresh)).await.status, StatusCode::OK, "{issuer}: fresh token");
    }
}
