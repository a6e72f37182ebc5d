//! Any bytes as a bearer token: the verifier must answer (never panic, never hang) and
//! never accept something that was not signed by the issuer's key.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use portcullis::dev::signer::DevSigner;
use portcullis::identity::{
    Algorithm, IssuerId, IssuerSettings, Preset, PrincipalKind, TokenType, Verifier,
};

struct World {
    rt: tokio::runtime::Runtime,
    verifier: Verifier,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let settings = IssuerSettings {
            id: IssuerId(Arc::from("bb")),
            preset: Preset::BitbucketPipelines,
            issuer: "https://issuer.fuzz.test/bb".into(),
            discovery_url: "https://issuer.fuzz.test/bb/.well-known/openid-configuration".into(),
            audiences: vec!["fuzz".into()],
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway: Duration::from_secs(60),
            max_token_age: None,
            kind: PrincipalKind::Pipeline,
            token_type: TokenType::Id,
            client_id: None,
            acr_values: Vec::new(),
            hosted_domain: None,
            groups_claim: portcullis::identity::ClaimPath::default(),
            ca_file: None,
            insecure_http: false,
            stale_window: Duration::from_secs(3600),
            refresh_cooldown: Duration::from_secs(3600),
        };
        let verifier = Verifier::new(vec![settings]).expect("verifier");
        let signer = DevSigner::generate_rs256("k1").expect("key");
        let jwks = portcullis::dev::signer::jwks(&[&signer]);
        verifier
            .install_jwks(&IssuerId(Arc::from("bb")), &jwks, Duration::from_secs(3600))
            .expect("jwks");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        World { rt, verifier }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let w = world();
    // Nothing the fuzzer makes is signed by `k1`, so nothing may be accepted.
    let r = w.rt.block_on(w.verifier.verify_at(token, 1_767_225_700));
    assert!(r.is_err());
});
