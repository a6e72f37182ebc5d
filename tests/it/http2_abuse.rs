//! HTTP/2 abuse the server refuses at the frame level, before any request reaches the
//! proxy: the refusal must leave a trace in the audit log, as a malformed HTTP/1 head does.

use std::time::Duration;

use serde_json::Value;

use crate::forwarding::tls_alpn;
use crate::support::*;

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
    let mut events = Vec::new();
    for _ in 0..100 {
        events = w
            .events()
            .into_iter()
            .filter(|e: &Value| e["kind"] == "http" && e["client_addr"] == addr.as_str())
            .collect();
        if !events.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
