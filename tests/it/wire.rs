//! The wire between a client, the proxy and a raw upstream: request methods and framings
//! the proxy must not carry, and upstream answers it must not misread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::forwarding::tls_alpn;
use crate::support::*;

/// A raw upstream that hands each connection it accepts to `serve` with the count of
/// request heads read so far on any connection.
async fn raw_upstream<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, Arc<AtomicUsize>) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let heads = Arc::new(AtomicUsize::new(0));
    let counted = heads.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s, counted.clone()));
        }
    });
    (addr, heads)
}

/// A world whose route `q` (`/q…`) goes to `addr`.
async fn world_to(addr: std::net::SocketAddr) -> World {
    let routes = format!(
        "[[routes]]\nname = \"q\"\nmatch = {{ path_prefix = \"/q\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    World::with(Setup { routes, ..Setup::default() }).await
}

/// `req` as written on a new HTTP/1.1 TLS connection, and everything the proxy sends
/// back until it closes the connection (or 5 s pass).
async fn exchange(w: &World, req: &str) -> String {
    let mut s = tls_alpn(w, b"http/1.1").await;
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `CONNECT` asks an intermediary for a tunnel, which a reverse proxy never offers (only
/// a WebSocket upgrade is tunnelled). An HTTP/1.1 `CONNECT /q/rpc` (origin form, which
/// hyper accepts) was authorized and forwarded; an upstream answering it with a 2xx (Go's
/// net/rpc does, for `CONNECT /_goRPC_`) had both HTTP layers take the exchange for a
/// tunnel, so the client got nothing at all while the event said `200 allowed`. It is
/// refused like TRACE, before anything reaches the upstream, over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn connect_is_refused_and_never_reaches_the_upstream() {
    let (addr, heads) = raw_upstream(|mut s, heads| async move {
        while read_head(&mut s).await.is_some() {
            heads.fetch_add(1, Ordering::SeqCst);
            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
        }
    })
    .await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let resp = exchange(
        &w,
        &format!("CONNECT /q/rpc HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 405 "), "{resp}");
    assert!(resp.contains("\"error\":\"method-not-allowed\""), "{resp}");
    let ev = w.last_event().await;
    assert_eq!(
        (ev["method"].as_str(), ev["status"].as_u64()),
        (Some("CONNECT"), Some(405)),
        "{ev}"
    );
    assert_eq!(ev["reason"], "method-not-allowed", "{ev}");

    // HTTP/2: a plain CONNECT (`:authority` only).
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("localhost:{port}"))
        .header("authorization", format!("Bearer {t}"))
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, _) = send.send_request(req, true).unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::METHOD_NOT_ALLOWED);

    // The route itself works, so the refusals were the method's.
    let r = w.get("/q/plain", Some(&t)).await;
    assert_eq!(r.text(), "ok");
    assert_eq!(heads.load(Ordering::SeqCst), 1, "a CONNECT reached the upstream");
}
