//! Criterion benches of the request hot path (issue #2): token verification (cold,
//! cached, early rejections), policy evaluation, the identity assertion, the audit
//! event, and the whole request path in-process.
//!
//! `cargo bench --bench hot_path` measures (about two minutes); `cargo test --benches`
//! runs every bench once as a smoke test. Keys come from `DevSigner` and are loaded
//! with `Verifier::install_jwks`: nothing here touches the network except loopback
//! connections of the in-process upstream.
//!
//! `request/in_process` drives the real per-connection service (`http::stack::service`:
//! sensitive-header layers, access log, proxy phases) with real `Request<Incoming>`s
//! parsed by hyper from an in-memory duplex pipe, and forwards over loopback TCP to a
//! tiny hyper upstream in the same runtime. Everything runs on one current-thread
//! runtime, so a figure covers client + proxy + upstream hyper work together; the
//! accept loop and the kernel's client-side TCP are not included.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use portcullis::audit::{AuditSink, HttpEvent};
use portcullis::dev::signer::{jwks, DevSigner};
use portcullis::dev::token::{apply_overrides, preset_claims};
use portcullis::diag::Source;
use portcullis::http::assertion::AssertionSigner;
use portcullis::http::proxy::Shared;
use portcullis::http::ConnInfo;
use portcullis::identity::{
    Algorithm, Identity, IssuerId, IssuerSettings, PrincipalKind, TokenType, Verifier,
};
use portcullis::policy::{Catalog, Policy, RequestFacts};
use portcullis::server::Runtime;

const ISSUER_URL: &str = "https://issuer.bench.test/bitbucket";
const AUD: &str = "portcullis-bench";
const KID: &str = "bench-key-1";
const WORKSPACE: &str = "{0c0ffee0-1234-4abc-8def-0123456789ab}";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn settings() -> IssuerSettings {
    IssuerSettings {
        id: IssuerId(Arc::from("bb")),
        preset: portcullis::identity::Preset::BitbucketPipelines,
        issuer: ISSUER_URL.into(),
        discovery_url: format!("{ISSUER_URL}/.well-known/openid-configuration"),
        audiences: vec![AUD.into()],
        algorithms: vec![Algorithm::RS256],
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
        refresh_cooldown: Duration::from_secs(60),
    }
}

/// A Bitbucket-shaped token as `portcullis dev token` mints it, with overrides.
fn token(signer: &DevSigner, overrides: &[&str]) -> String {
    let now = portcullis::util::unix_now();
    let (mut header, mut payload) =
        preset_claims("bitbucket-pipelines", ISSUER_URL, AUD, now, 3600).unwrap();
    header["kid"] = Value::String(KID.into());
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    apply_overrides(&mut payload, &o).unwrap();
    signer.sign(&header, &payload)
}

fn verifier(signer: &DevSigner) -> Verifier {
    let v = Verifier::new(vec![settings()]).unwrap();
    v.install_jwks(&IssuerId(Arc::from("bb")), &jwks(&[signer]), Duration::from_secs(86_400))
        .unwrap();
    v
}

fn bench_verify(c: &mut Criterion, signer: &DevSigner) {
    let rt = rt();
    let now = portcullis::util::unix_now();
    let mut g = c.benchmark_group("verify");

    // Cold: a verifier with an empty cache for every token, so each iteration parses,
    // checks claims and verifies one RS256 signature. The setup (building the verifier,
    // parsing its key) is not timed.
    let pool: Vec<String> = (0..64).map(|_| token(signer, &[])).collect();
    let mut i = 0usize;
    g.bench_function("cold", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % pool.len();
                (verifier(signer), pool[i].clone())
            },
            |(v, t)| {
                let r = rt.block_on(v.verify_at(&t, now));
                assert!(r.is_ok());
                (v, r)
            },
            BatchSize::SmallInput,
        )
    });

    let v = verifier(signer);
    let t = token(signer, &[]);
    rt.block_on(v.verify_at(&t, now)).unwrap();
    g.bench_function("cached", |b| b.iter(|| rt.block_on(v.verify_at(&t, now)).unwrap()));

    // Rejections must cost no signature: compare with `cold`.
    let rejects = [
        ("reject_malformed", "eyJhbGciOiJSUzI1NiJ9.not*base64.x".to_string()),
        ("reject_expired", token(signer, &[&format!("exp:={}", now - 3600), "iat:=1"])),
        (
            "reject_wrong_alg",
            // RS384 is a supported algorithm but not on this issuer's allowlist.
            signer.sign(
                &json!({"alg": "RS384", "kid": KID}),
                &serde_json::from_str::<Value>(&payload_of(&token(signer, &[]))).unwrap(),
            ),
        ),
    ];
    for (name, t) in &rejects {
        assert!(rt.block_on(v.verify_at(t, now)).is_err(), "{name} must be rejected");
        g.bench_function(*name, |b| b.iter(|| rt.block_on(v.verify_at(t, now)).is_err()));
    }
    g.finish();
}

fn payload_of(token: &str) -> String {
    use base64::Engine as _;
    let p = token.split('.').nth(1).unwrap();
    String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

/// A realistic 20-rule policy: 3 denies, 17 allows for different repositories; rule
/// `repo-N` allows repository N on main/release branches.
fn policy_text() -> String {
    let mut p = String::new();
    p.push_str(
        "[[rule]]\nid = \"no-admin-from-ci\"\neffect = \"deny\"\nissuer = \"bb\"\npaths = [\"/admin/**\"]\n\n",
    );
    p.push_str(&format!(
        "[[rule]]\nid = \"no-deletes\"\neffect = \"deny\"\nissuer = \"bb\"\nmethods = [\"DELETE\"]\nci = {{ workspace_id = \"{WORKSPACE}\" }}\n\n"
    ));
    p.push_str(&format!(
        "[[rule]]\nid = \"no-feature-deploys\"\neffect = \"deny\"\nissuer = \"bb\"\npaths = [\"/deploy/**\"]\nci = {{ workspace_id = \"{WORKSPACE}\", branch = \"feature/*\" }}\n\n"
    ));
    for n in 1..=17 {
        p.push_str(&format!(
            "[[rule]]\nid = \"repo-{n}\"\neffect = \"allow\"\nissuer = \"bb\"\nmethods = [\"GET\", \"POST\", \"PUT\"]\npaths = [\"/api/**\", \"/deploy/*\"]\nci = {{ workspace_id = \"{WORKSPACE}\", repository = \"{}\", branch = [\"main\", \"release/*\"] }}\n\n",
            repo(n)
        ));
    }
    p
}

fn repo(n: u32) -> String {
    format!("{{7f3c1e2a-5b4d-4c8e-9a1f-{n:012}}}")
}

fn bench_policy(c: &mut Criterion, signer: &DevSigner) {
    let rt = rt();
    let mut catalog = Catalog::default();
    catalog.declare("bb", portcullis::identity::Preset::BitbucketPipelines);
    let policy = Policy::parse(&Source::new("bench.toml", policy_text()), &catalog)
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(policy.rules().len(), 20);
    let v = verifier(signer);
    let id_for = |n: u32| -> Arc<Identity> {
        let r = format!("repositoryUuid={}", repo(n));
        rt.block_on(v.verify(&token(signer, &[&r]))).unwrap()
    };
    let method = http::Method::POST;
    let facts = RequestFacts::http(&method, "/deploy/42");
    let mut g = c.benchmark_group("policy/evaluate");
    // Allow rules start at position 4 in the file (after the 3 denies).
    for (name, n) in [("allow_at_rule_4", 1), ("allow_at_rule_12", 9), ("allow_at_rule_20", 17)] {
        let id = id_for(n);
        assert!(policy.evaluate(&id, &facts).allowed);
        g.bench_function(name, |b| b.iter(|| policy.evaluate(&id, &facts)));
    }
    let stranger = id_for(99);
    assert!(!policy.evaluate(&stranger, &facts).allowed);
    g.bench_function("default_deny", |b| b.iter(|| policy.evaluate(&stranger, &facts)));
    g.finish();
}

fn bench_assertion(c: &mut Criterion, signer: &DevSigner) {
    let rt = rt();
    let v = verifier(signer);
    let id = rt.block_on(v.verify(&token(signer, &[]))).unwrap();
    let s = AssertionSigner::generate("https://proxy.bench.test".into(), Duration::from_secs(60))
        .unwrap();
    let route: Arc<str> = Arc::from("api");
    let mut g = c.benchmark_group("assertion");
    // A new `now` past half the lifetime each time: always re-signed.
    let mut now = 1_000_000u64;
    g.bench_function("sign", |b| {
        b.iter(|| {
            now += 31;
            s.assertion(&id, &route, now)
        })
    });
    let now = portcullis::util::unix_now();
    s.assertion(&id, &route, now);
    g.bench_function("cached", |b| b.iter(|| s.assertion(&id, &route, now)));
    g.finish();
}

fn bench_audit(c: &mut Criterion, signer: &DevSigner) {
    let rt = rt();
    let v = verifier(signer);
    let id = rt.block_on(v.verify(&token(signer, &[]))).unwrap();
    let sink = AuditSink::file(std::path::Path::new("/dev/null")).unwrap();
    c.bench_function("audit/emit", |b| {
        b.iter(|| {
            // The same event the access log builds for an allowed request (the identity's
            // fields are serialized once per identity, as in the proxy).
            let (identity, ci) = id.audit_fields();
            let ev = HttpEvent {
                ts: portcullis::audit::now_rfc3339(),
                request_id: "5c0ffee000000000002a",
                kind: "http",
                client_addr: "127.0.0.1:40000",
                tls: None,
                method: "GET",
                host: "127.0.0.1:18100",
                path: "/api/items",
                route: Some("demo"),
                decision: "allow",
                reason: "allowed",
                detail: None,
                rule: None,
                shadow: None,
                policy_revision: Some("sha256:0123456789ab"),
                identity: Some(identity),
                ci,
                upstream: Some("http://127.0.0.1:9000"),
                upstream_path: None,
                status: 200,
                bytes_in: 0,
                bytes_out: 2,
                duration_ms: 0.123,
            };
            sink.emit_http(&ev)
        })
    });
    sink.flush();
}

/// A tiny upstream: `200 ok` for everything, HTTP/1.1 keep-alive.
async fn upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn bench_request(c: &mut Criterion, signer: &DevSigner) {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let up = rt.block_on(upstream());
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("api.toml"), policy_text()).unwrap();
    let config = format!(
        "[listen]\ninsecure_http = \"127.0.0.1:0\"\n\n[server]\nwatch = false\n\n\
         [issuers.bb]\npreset = \"bitbucket-pipelines\"\nissuer = \"{ISSUER_URL}\"\naudiences = [\"{AUD}\"]\n\n\
         [[routes]]\nname = \"api\"\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"http://{up}\"\npolicy = \"api\"\n"
    );
    let path: PathBuf = dir.path().join("portcullis.toml");
    std::fs::write(&path, config).unwrap();
    let config = portcullis::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));

    // A Runtime like `Runtime::build` makes, minus the background JWKS fetch.
    let verifier = Verifier::new(config.issuers.clone()).unwrap();
    verifier
        .install_jwks(&IssuerId(Arc::from("bb")), &jwks(&[signer]), Duration::from_secs(86_400))
        .unwrap();
    let clients = config
        .routes
        .iter()
        .map(|r| portcullis::http::upstream::client_for(r))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let runtime = Runtime {
        config,
        verifier: Arc::new(verifier),
        clients,
        revision: Arc::from("sha256:bench"),
        generation: 1,
        sessions: None,
        revocations: Arc::default(),
        signer: Arc::new(
            AssertionSigner::generate("https://proxy.bench.test".into(), Duration::from_secs(300))
                .unwrap(),
        ),
        tls_certificates: Vec::new(),
    };
    let sink = AuditSink::file(std::path::Path::new("/dev/null")).unwrap();
    let shared = Arc::new(Shared {
        runtime: ArcSwap::from_pointee(runtime),
        replay: Default::default(),
        store: None,
        reloads: tokio::sync::watch::channel(1).0,
        grace_over: tokio::sync::watch::channel(false).1,
        sink: sink.clone(),
    });
    let conn = ConnInfo::new(
        ([127, 0, 0, 1], 40_000).into(),
        Some(8443),
        None,
        false,
        portcullis::http::activity::Activity::new(None, None, None),
    );

    // One keep-alive client connection over an in-memory pipe.
    let mut sender = rt.block_on(async {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let svc = portcullis::http::stack::service(shared, sink.clone(), conn);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(
                    TokioIo::new(server_io),
                    hyper_util::service::TowerToHyperService::new(svc),
                )
                .await;
        });
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(client_io)).await.unwrap();
        tokio::spawn(conn);
        sender
    });

    let bearer = format!("Bearer {}", token(signer, &[&format!("repositoryUuid={}", repo(17))]));
    let mut send = |auth: Option<&str>, path: &str| {
        let mut b = http::Request::get(path).header("host", "api.bench.test");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let req = b.body(Empty::<Bytes>::new()).unwrap();
        rt.block_on(async {
            sender.ready().await.unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            status
        })
    };
    assert_eq!(send(Some(&bearer), "/api/items"), http::StatusCode::OK);
    assert_eq!(send(None, "/api/items"), http::StatusCode::UNAUTHORIZED);

    let mut g = c.benchmark_group("request/in_process");
    g.bench_function("allowed_cached_token", |b| b.iter(|| send(Some(&bearer), "/api/items")));
    g.bench_function("denied_no_token", |b| b.iter(|| send(None, "/api/items")));
    g.finish();
    sink.flush();
}

fn benches(c: &mut Criterion) {
    let signer = DevSigner::generate_rs256(KID).unwrap();
    bench_verify(c, &signer);
    bench_policy(c, &signer);
    bench_assertion(c, &signer);
    bench_audit(c, &signer);
    bench_request(c, &signer);
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = benches
}
criterion_main!(hot_path);
