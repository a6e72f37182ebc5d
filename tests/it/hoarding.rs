//! Connection hoarding by a client that takes nothing of what it is sent (`send_timeout`):
//! an HTTP/2 client that keeps its flow-control windows closed (and pings, so its socket
//! is never quiet), an HTTP/1.1 client that pipelines and never reads, and an HTTP/2
//! client that never finishes a graceful close. Each must lose its `max_connections`
//! slot within a bound, fresh clients must be served meanwhile, and each request cut
//! short is audited once. Slow but steady readers must not be cut.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::forwarding::tls_alpn;
use crate::support::*;

/// A request with a token on a new connection of its own.
async fn fresh(w: &World, path: &str, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    send_with(
        &client(&w.pki, false),
        Method::GET,
        &w.url(path),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await
}

/// A process-wide counter from `/metrics` (other tests only add to it).
async fn counter(w: &World, name: &str) -> u64 {
    let m = w.admin_get("/metrics").await.text();
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// The HTTP events of one client address, once `n` of them are written (at most 10 s).
async fn events_of(w: &World, addr: &str, n: usize) -> Vec<Value> {
    let of = || -> Vec<Value> {
        w.events().into_iter().filter(|e| e["kind"] == "http" && e["client_addr"] == addr).collect()
    };
    for _ in 0..500 {
        if of().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    of()
}

/// Proves `n` slots free at once: `n` TLS connections all handshaken and held together
/// (the proxy handshakes a connection only once it has its slot).
async fn hold_slots(w: &World, n: usize, within: Duration) {
    let mut held = Vec::new();
    for i in 0..n {
        match tokio::time::timeout(within, tls_alpn(w, b"http/1.1")).await {
            Ok(s) => held.push(s),
            Err(_) => panic!("only {i} of {n} slots free after {within:?}"),
        }
    }
}

/// Each event once: no request id twice.
fn assert_once(events: &[Value]) {
    let mut ids: Vec<&str> = events.iter().filter_map(|e| e["request_id"].as_str()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "a request logged twice: {events:?}");
}

/// F1 (HTTP/2): one connection opening many token-less streams with a zero stream
/// window held every slot it could (the connection's, and one per stream beyond the
/// first) for as long as it stayed, and pinging kept its socket busy.
#[tokio::test]
async fn an_http2_client_that_keeps_its_windows_closed_cannot_hold_the_slots() {
    let send_timeout = Duration::from_secs(2);
    let w = World::with(Setup {
        server_extra: "max_connections = 4\nsend_timeout = \"2s\"".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let tls = tls_alpn(&w, b"h2").await;
    let addr = tls.get_ref().0.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.initial_stream_window_size(0)
        .adaptive_window(false)
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(200))
        .keep_alive_while_idle(true);
    let (send, conn) =
        b.handshake::<_, Empty<Bytes>>(TokioIo::new(tls)).await.unwrap_or_else(|e| panic!("{e}"));
    let conn = tokio::spawn(conn);
    let streams: Vec<_> = (0..20)
        .map(|i| {
            let mut send = send.clone();
            let req = http::Request::get(format!("https://localhost:{}/hoard/{i}", w.https.port()))
                .body(Empty::new())
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::spawn(async move { send.send_request(req).await })
        })
        .collect();
    // Every head arrives (HEADERS are not flow-controlled); no body can.
    let mut held = Vec::new();
    for s in streams {
        let r = tokio::time::timeout(Duration::from_secs(5), s)
            .await
            .unwrap_or_else(|_| panic!("no response head"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(r.status().as_u16(), 401 | 503), "{}", r.status());
        held.push(r);
    }

    // Meanwhile a fresh client is served at once: a refusal gives its stream's slot back
    // with its head, so the connection holds one slot, not four.
    let r = tokio::time::timeout(Duration::from_millis(1500), fresh(&w, "/x", &t)).await;
    assert_eq!(r.map(|r| r.status).ok(), Some(StatusCode::OK), "a fresh client was not served");
    assert!(!conn.is_finished(), "the test meant the hoarder to be still connected");

    // Within send_timeout of its last response part it is closed, pings or not.
    let ended = tokio::time::timeout(send_timeout + Duration::from_secs(3), conn).await;
    assert!(ended.is_ok(), "the connection still held its slot after {send_timeout:?}");
    drop(held);

    // Every slot is back: four connections held at once.
    hold_slots(&w, 4, Duration::from_secs(3)).await;

    // Each of the 20 requests logged once, as undelivered, its answer kept in the detail.
    let events = events_of(&w, &addr, 20).await;
    assert_eq!(events.len(), 20, "{events:?}");
    assert_once(&events);
    for e in &events {
        assert_eq!(e["reason"], "send-timeout", "{e}");
        let detail = e["detail"].as_str().unwrap_or_default();
        match e["status"].as_u64() {
            Some(401) => assert!(detail.contains("(the answer: missing-token)"), "{e}"),
            Some(503) => assert!(detail.contains("(the answer: overloaded)"), "{e}"),
            _ => panic!("{e}"),
        }
    }
    assert!(counter(&w, "portcullis_stalled_connections_closed_total").await >= 1);
}

/// F1 (HTTP/1.1): connections that pipeline thousands of token-less requests with a
/// small receive buffer and never read kept their slots: the idle timer fired, but the
/// graceful close waited on the blocked write forever.
#[tokio::test]
async fn http1_clients_that_pipeline_and_never_read_cannot_hold_the_slots() {
    let w = World::with(Setup {
        listen_extra: "insecure_http = \"127.0.0.1:0\"".into(),
        server_extra: "max_connections = 2\nsend_timeout = \"2s\"".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let plain = w.server().bound().insecure_http.unwrap_or_else(|| panic!("no plain listener"));
    let before = counter(&w, "portcullis_stalled_connections_closed_total").await;
    let mut hoarders = Vec::new();
    for _ in 0..2 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
        sock.set_recv_buffer_size(4096).unwrap_or_else(|e| panic!("{e}"));
        let s = sock.connect(plain).await.unwrap_or_else(|e| panic!("{e}"));
        let addr = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let (read, mut write) = s.into_split();
        let requests = "GET /hoard HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(20_000);
        // Blocks once the proxy stops reading; the read half is never read.
        let writer = tokio::spawn(async move {
            let _ = write.write_all(requests.as_bytes()).await;
            write
        });
        hoarders.push((addr, read, writer));
    }
    // Both slots are taken until the proxy gives up on the hoarders: a fresh client is
    // served within send_timeout of their writes blocking (answering thousands of
    // requests first takes a few seconds in a debug build).
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), fresh(&w, "/x", &t)).await;
    assert_eq!(r.map(|r| r.status).ok(), Some(StatusCode::OK), "a fresh client was not served");
    eprintln!("fresh client served after {:?}", start.elapsed());
    // Both slots are back (reading a hoarder not yet dropped would let it go on).
    hold_slots(&w, 2, Duration::from_secs(10)).await;
    eprintln!("both slots free after {:?}", start.elapsed());
    // What was buffered for them, then the end.
    for (_, read, writer) in &mut hoarders {
        let mut buf = vec![0u8; 64 * 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a hoarder is still connected");
        writer.abort();
    }
    assert!(counter(&w, "portcullis_stalled_connections_closed_total").await >= before + 2);

    // Every request the proxy took is logged once: refused, or undelivered if its body
    // was still being handed over when the connection was closed.
    for (addr, _, _) in &hoarders {
        let events = events_of(&w, addr, 1).await;
        assert!(!events.is_empty(), "no event for {addr}");
        assert_once(&events);
        for e in &events {
            assert!(e["reason"] == "missing-token" || e["reason"] == "send-timeout", "{e}");
            assert_eq!(e["status"], 401, "{e}");
        }
    }
}

/// An HTTP/2 connection closed as idle waits for the client's answer to the GOAWAY's
/// PING before it ends; a client that never answers (nor reads) kept its slot forever.
#[tokio::test]
async fn a_closing_connection_the_client_never_lets_end_is_dropped() {
    let _idle = IDLE_CLOSES.lock().await;
    let w = World::with(Setup {
        server_extra: "max_connections = 1\nidle_timeout = \"1s\"".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let mut s = tls_alpn(&w, b"h2").await;
    // The preface and an empty SETTINGS frame, then nothing: no ACK, no PING answer.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    // Idle after 1 s, then 5 s to finish closing; a margin for the debug build.
    let r = tokio::time::timeout(Duration::from_secs(10), fresh(&w, "/x", &t)).await;
    assert_eq!(r.map(|r| r.status).ok(), Some(StatusCode::OK), "the slot was never given back");
    assert!(start.elapsed() >= Duration::from_millis(900), "served before the slot was free?");
    drop(s);
}

/// Slow but steady readers are not clients holding the connection up: a large download
/// read a little at a time, with pauses shorter than `send_timeout`, gets through whole,
/// over HTTP/2 (a small window, so the proxy's pace is the reader's) and HTTP/1.1.
#[tokio::test]
async fn slow_but_steady_readers_of_a_large_download_are_not_cut() {
    const SIZE: usize = 1 << 20;
    // An HTTP/2 upstream: its body's next part is ready whenever the proxy asks, so the
    // proxy's pace is the client's alone.
    let routes = "[[routes]]\nname = \"h2c\"\nmatch = { path_prefix = \"/stream\" }\nupstream = \"h2c://{echo}\"\npolicy = \"api\"\n";
    let w = World::with(Setup {
        server_extra: "send_timeout = \"1s\"".into(),
        routes: routes.into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);

    // HTTP/2: a 64 KiB window, 64 KiB every 300 ms: about 5 s, five times send_timeout.
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .adaptive_window(false);
    let (mut send, conn) = b
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tls_alpn(&w, b"h2").await))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost:{}/stream/{SIZE}", w.https.port()))
        .header("authorization", format!("Bearer {t}"))
        .body(Empty::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let resp = send.send_request(req).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let (mut got, mut since_pause) = (0, 0);
    while let Some(f) = body.frame().await {
        let f = f.unwrap_or_else(|e| panic!("HTTP/2 download cut after {got} bytes: {e}"));
        if let Some(d) = f.data_ref() {
            got += d.len();
            since_pause += d.len();
            if since_pause >= 64 * 1024 {
                since_pause = 0;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    assert_eq!(got, SIZE);
    assert!(start.elapsed() > Duration::from_secs(3), "not slow: {:?}", start.elapsed());

    // HTTP/1.1: 32 KiB every 300 ms.
    let mut s = tls_alpn(&w, b"http/1.1").await;
    let req = format!(
        "GET /stream/{SIZE} HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n",
        w.https.port()
    );
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut all = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap_or_else(|e| panic!("HTTP/1.1 download cut: {e}"));
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(300 * n as u64 / buf.len() as u64)).await;
    }
    let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
    assert!(all.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&all[..head_end]));
    assert!(
        all.len() - head_end >= SIZE,
        "HTTP/1.1 download cut at {} bytes",
        all.len() - head_end
    );

    let ok: Vec<Value> = w
        .events()
        .into_iter()
        .filter(|e| e["path"].as_str().is_some_and(|p| p.starts_with("/stream/")))
        .collect();
    assert_eq!(ok.len(), 2, "{ok:?}");
    for e in &ok {
        assert_eq!(e["reason"], "allowed", "{e}");
        assert_eq!(e["route"], "h2c", "{e}");
        assert_eq!(e["bytes_out"], SIZE as u64, "{e}");
    }
}
