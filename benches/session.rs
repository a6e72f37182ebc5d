//! The per-request cost of browser sessions: reading and opening the sealed cookie
//! (AES-256-GCM via aws-lc-rs, then JSON), against sealing a new one (refresh, idle
//! touch, sign-in). `cargo bench --bench session`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderValue, COOKIE};
use portcullis::config::{SecretSource, SessionSettings};
use portcullis::session::seal::Sealer;
use portcullis::session::{cookie, SessionData, Sessions};

fn session(groups: usize) -> SessionData {
    let now = portcullis::util::unix_now();
    SessionData {
        issuer: "corp".into(),
        subject: "00u1abcdEFGHijklMNOP".into(),
        email: Some("alice@example.com".into()),
        email_verified: true,
        groups: (0..groups).map(|i| format!("group-{i:03}")).collect(),
        groups_known: true,
        created: now,
        last_seen: now,
        expires: now + 3600,
        refresh: Some("a".repeat(64)),
        kept: None,
        claims: Default::default(),
        not_kept: Vec::new(),
        id: portcullis::session::revoke::SessionId::random().unwrap_or_default(),
        acr: None,
        hd: None,
        source: None,
    }
}

fn bench(c: &mut Criterion) {
    let settings = SessionSettings {
        cookie_name: "_portcullis".into(),
        cookie_domain: None,
        keys: SecretSource::Env("UNUSED".into()),
        absolute_lifetime: Duration::from_secs(12 * 3600),
        idle_lifetime: Duration::from_secs(3600),
        refresh_before: Duration::from_secs(60),
    };
    let sealer = match Sealer::from_keys(&[[3; 32], [4; 32]]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let s = Sessions::with_sealer(settings, sealer);
    for groups in [5, 100] {
        let data = session(groups);
        let set = match s.seal_session(&data, &[]) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        let cookie_line = set
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .collect::<Vec<_>>()
            .join("; ");
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_str(&format!("app=1; {cookie_line}"))
                .unwrap_or(HeaderValue::from_static("")),
        );
        let bytes = cookie_line.len();
        c.bench_function(&format!("open session cookie ({groups} groups, {bytes} B)"), |b| {
            b.iter(|| {
                let cookies = cookie::parse(black_box(&headers));
                black_box(s.open_session(&cookies).ok().flatten())
            })
        });
        c.bench_function(&format!("seal session cookie ({groups} groups)"), |b| {
            b.iter(|| black_box(s.seal_session(black_box(&data), &[]).ok()))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
