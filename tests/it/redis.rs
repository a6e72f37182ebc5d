//! The store replicas share (`[redis]`), against a real `redis-server`: a single-use
//! token is refused on every replica after its first use anywhere, and fails closed
//! while Redis cannot be asked. (Sign-outs across replicas: `sso.rs`.)

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use portcullis::audit::AuditSink;
use serde_json::Value;

use crate::support::*;

async fn single_use_world(redis: &RedisServer) -> World {
    World::with(Setup {
        route_extra: "single_use_tokens = true".into(),
        redis: redis.config(),
        ..Setup::default()
    })
    .await
}

async fn get_at(w: &World, port: u16, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    let url = format!("https://localhost:{port}/x");
    send_with(&w.client, Method::GET, &url, &[("authorization", &auth)], Bytes::new()).await
}

/// The event of `r` in `sink`, waiting for the audit writer.
async fn event_in(sink: &AuditSink, r: &Resp) -> Value {
    let id = request_id(r);
    for _ in 0..100 {
        let found = sink
            .lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["request_id"] == id.as_str());
        if let Some(e) = found {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no event for {id}");
}

#[tokio::test]
async fn a_single_use_token_is_refused_on_every_replica_after_its_first_use() {
    let Some(redis) = RedisServer::start("shared single-use tokens").await else { return };
    let w = single_use_world(&redis).await;
    let (second, port, sink) = replica(&w).await;
    // Bitbucket's tokens have no `jti` (known by what was signed), GitHub's have one.
    for issuer in ["bb", "gh"] {
        let t = w.token(issuer, &[]);
        assert_eq!(w.get("/x", Some(&t)).await.status, StatusCode::OK, "{issuer}");
        let r = get_at(&w, port, &t).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{issuer}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid-token", "{issuer}");
        let e = event_in(&sink, &r).await;
        assert_eq!(e["reason"], "token-replayed", "{issuer}: {e}");
        assert_eq!(e["detail"], "token already used (shared store)", "{issuer}");
        // And the other way round.
        let t = w.token(issuer, &[]);
        assert_eq!(get_at(&w, port, &t).await.status, StatusCode::OK, "{issuer}");
        let r = w.get("/x", Some(&t)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{issuer}");
        assert_eq!(w.event_for(&request_id(&r)).await["reason"], "token-replayed");
    }
    second.shutdown().await;
}

#[tokio::test]
async fn a_single_use_route_fails_closed_while_redis_is_down_and_recovers() {
    let Some(mut redis) = RedisServer::start("single-use check without Redis").await else {
        return;
    };
    let w = single_use_world(&redis).await;
    let port = redis.port;
    redis.stop();
    let t = w.token("bb", &[]);
    let r = w.get("/x", Some(&t)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.json()["error"], "replay-check-unavailable");
    let e = w.event_for(&request_id(&r)).await;
    assert_eq!(e["reason"], "replay-check-unavailable", "{e}");
    assert_eq!(e["decision"], "error", "{e}");
    assert_eq!(r.upstream_header("x-portcullis-subject"), None, "never forwarded");
    let metrics = w.admin_get("/metrics").await.text();
    assert!(!metrics.contains("portcullis_redis_errors_total{op=\"replay\"} 0"), "{metrics}");
    // Redis back on the same port: the refused attempt did not count as a use.
    let _redis = RedisServer::start_on("single-use check, Redis back", port).await;
    assert_eq!(w.get("/x", Some(&t)).await.status, StatusCode::OK);
    assert_eq!(w.get("/x", Some(&t)).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_wrong_redis_password_fails_closed_and_keeps_the_replica_unready() {
    let Some(redis) = RedisServer::start("wrong Redis password").await else { return };
    let w = single_use_world(&redis).await;
    write(&redis.password_file, "not-the-password\n");
    // Read at load: a second replica of the changed file cannot authenticate.
    let (second, port, sink) = replica_unready(&w).await;
    let r = get_at(&w, port, &w.token("bb", &[])).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(event_in(&sink, &r).await["reason"], "replay-check-unavailable");
    let all = sink.lines().join("\n");
    assert!(!all.contains("not-the-password") && !all.contains(RedisServer::PASSWORD));
    // It never read the other replicas' sign-outs back: not ready.
    assert!(!second.is_ready());
    second.shutdown().await;
}
