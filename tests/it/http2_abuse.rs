//! HTTP/2 abuse the server refuses at the frame level, before any request reaches the
//! proxy: the refusal must leave a trace in the audit log, as a malformed HTTP/1 head does.

use std::time::Duration;

use serde_json::Value;

use crate::forwarding::tls_alpn;
use crate::support::*;

/// The events of the connection from `addr` once one has come (at most 10 s).
async fn events_from(w: &World, addr: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for _ in 0..500 {
        events = w
            .events()
            .into_iter()
            .filter(|e: &Value| e["kind"] == "http" && e["client_addr"] == addr)
            .collect();
        if !events.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    events
}

/// Rapid reset (CVE-2023-44487): streams opened and cancelled at once, faster than they
/// are served. The server closes the connection with `ENHANCE_YOUR_CALM`; none of the
/// streams reached the proxy, and the one event of the connection says what happened.
#[tokio::test]
async fn a_rapid_reset_flood_is_refused_and_audited() {
    let w = World::start().await;
    let tls = tls_alpn(&w, b"h2").await;
    let addr = tls.get_ref().0.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    let conn = tokio::spawn(conn);
    for _ in 0..10_000 {
        let req = http::Request::get(format!("https://localhost:{}/v1/x", w.https.port()))
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let Ok(ready) = send.ready().await else { break };
        send = ready;
        let Ok((_, mut stream)) = send.send_request(req, false) else { break };
        stream.send_reset(h2::Reason::CANCEL);
    }
    // The server closes the connection (the client may still be writing: a broken pipe
    // rather than the GOAWAY's reason).
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok_and(|r| r.is_ok_and(|r| r.is_err())), "the connection stayed open");
    let events = events_from(&w, &addr).await;
    let refusal: Vec<&Value> = events
        .iter()
        .filter(|e| e["detail"].as_str().is_some_and(|d| d.contains("GOAWAY")))
        .collect();
    assert_eq!(refusal.len(), 1, "{events:?}");
    assert_eq!(refusal[0]["reason"], "bad-request");
    assert_eq!(refusal[0]["status"], 400);
    assert!(
        refusal[0]["detail"].as_str().is_some_and(|d| d.contains("ENHANCE_YOUR_CALM")),
        "{refusal:?}"
    );
}

/// "MadeYouReset" (CVE-2025-8671): the client never resets a stream itself, so the rapid
/// reset bound above does not count it; each stream is malformed (more DATA than its
/// `content-length`) so that the server resets it, and the work of every stream opened
/// is done again without end. The `h2` server counts the streams it resets for a
/// client's errors, and those reset before they were accepted, and closes the connection
/// with `ENHANCE_YOUR_CALM` (with both bounds lifted, the connection stayed open through
/// all 10 000); the connection's one refusal event says what happened.
#[tokio::test]
async fn streams_the_server_must_reset_itself_are_bounded_and_audited() {
    let w = World::start().await;
    let tls = tls_alpn(&w, b"h2").await;
    let addr = tls.get_ref().0.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    let conn = tokio::spawn(conn);
    let token = w.token("bb", &[]);
    for _ in 0..10_000 {
        let req = http::Request::post(format!("https://localhost:{}/v1/x", w.https.port()))
            .header("authorization", format!("Bearer {token}"))
            .header("content-length", "1")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        let Ok(ready) = send.ready().await else { break };
        send = ready;
        let Ok((_, mut stream)) = send.send_request(req, false) else { break };
        if stream.send_data(bytes::Bytes::from_static(b"too long"), true).is_err() {
            break;
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok_and(|r| r.is_ok_and(|r| r.is_err())), "the connection stayed open");
    let events = events_from(&w, &addr).await;
    let refusal: Vec<&Value> = events
        .iter()
        .filter(|e| e["detail"].as_str().is_some_and(|d| d.contains("ENHANCE_YOUR_CALM")))
        .collect();
    assert_eq!(refusal.len(), 1, "{events:?}");
    assert_eq!(
        (refusal[0]["reason"].as_str(), refusal[0]["status"].as_u64()),
        (Some("bad-request"), Some(400))
    );
}
