//! HTTP/2 requests the proxy answers itself (401, 403, 400, …) while their body is still
//! arriving: the client gets the answer, and the stream is not reset under it (curl 7.88
//! turned such a reset into `(92) Stream error in the HTTP/2 framing layer`, no status).
//! What is left of the body is read and discarded, but only so much and so long: an
//! endless or trickling body is reset after the bound.

use std::future::poll_fn;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::forwarding::tls_alpn;
use crate::support::*;

/// A raw HTTP/2 connection to the proxy (the `h2` crate: it shows a reset as it comes).
async fn connect(w: &World) -> h2::client::SendRequest<Bytes> {
    let tls = tls_alpn(w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A POST whose body is still open: its answer, and the stream to send the rest on.
async fn open_post(
    w: &World,
    send: &mut h2::client::SendRequest<Bytes>,
    path_and_headers: (&str, &[(&str, &str)]),
    method: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let (path, headers) = path_and_headers;
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost:{}{path}", w.https.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(()).unwrap_or_else(|e| panic!("{e}"));
    let mut ready = send.clone().ready().await.unwrap_or_else(|e| panic!("{e}"));
    let r = ready.send_request(req, false).unwrap_or_else(|e| panic!("{e}"));
    *send = ready;
    r
}

/// The status and the whole body of a response.
async fn read(resp: h2::client::ResponseFuture) -> (StatusCode, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap_or_else(|_| panic!("no answer"))
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    let status = resp.status();
    let mut body = resp.into_body();
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("the answer's body broke off: {e}"));
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    (status, Bytes::from(all))
}

/// Sends `data` as it fits the stream's window; `Err` with the reset's reason if the
/// proxy reset the stream meanwhile.
async fn send_body(
    stream: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), String> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let cap = poll_fn(|cx| {
            if let std::task::Poll::Ready(r) = stream.poll_reset(cx) {
                return std::task::Poll::Ready(Err(format!("reset: {r:?}")));
            }
            stream.poll_capacity(cx).map(|c| match c {
                Some(Ok(c)) => Ok(c),
                Some(Err(e)) => Err(format!("{e}")),
                None => Err("stream closed".into()),
            })
        })
        .await?;
        let piece = data.split_to(cap.min(data.len()));
        stream.send_data(piece, false).map_err(|e| format!("{e}"))?;
    }
    if end {
        stream.send_data(Bytes::new(), true).map_err(|e| format!("{e}"))?;
    }
    Ok(())
}

/// The reset of `stream`, if the proxy sends one within `wait`.
async fn reset_within(stream: &mut h2::SendStream<Bytes>, wait: Duration) -> Option<String> {
    let r = tokio::time::timeout(wait, poll_fn(|cx| stream.poll_reset(cx))).await;
    r.ok().map(|r| format!("{r:?}"))
}

/// A request the proxy refuses: method, path, headers, status and error code.
type Refusal<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16, &'a str);

/// What several self-answered refusals look like over HTTP/2 when the body is still
/// arriving: part of the body sent, the full answer read, then (after time enough for
/// a reset to come) the rest of the body sent and the stream ended, never reset.
#[tokio::test]
async fn a_refused_http2_request_is_answered_while_its_body_arrives_and_not_reset() {
    let w = World::start().await;
    let feature = format!("Bearer {}", w.token("bb", &["branchName=feature/x"]));
    let cases: [Refusal; 4] = [
        ("POST", "/deploy", &[], 401, "missing-token"),
        ("POST", "/deploy", &[("authorization", &feature)], 403, "policy-denied"),
        ("POST", "/a/%2e%2e/b", &[], 400, "ambiguous-path"),
        ("TRACE", "/deploy", &[], 405, "method-not-allowed"),
    ];
    let mut send = connect(&w).await;
    for (method, path, headers, status, code) in cases {
        let (resp, mut stream) = open_post(&w, &mut send, (path, headers), method).await;
        // More than one DATA frame's worth (16 KiB), the answer coming meanwhile.
        send_body(&mut stream, Bytes::from(vec![b'x'; 40_000]), false)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: the first part of the body: {e}"));
        let (got, body) = read(resp).await;
        assert_eq!(got.as_u16(), status, "{method} {path}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(json["error"], code, "{method} {path}: {}", String::from_utf8_lossy(&body));
        assert!(json["request_id"].is_string(), "{json}");
        if let Some(reset) = reset_within(&mut stream, Duration::from_millis(300)).await {
            panic!("{method} {path}: the stream was reset after the answer: {reset}");
        }
        send_body(&mut stream, Bytes::from(vec![b'y'; 40_000]), true)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: the rest of the body: {e}"));
        let ev = w.event_for(json["request_id"].as_str().unwrap_or_default()).await;
        assert_eq!(ev["status"], status, "{ev}");
    }
    // The connection is as good as new: an allowed request on it goes through.
    let t = format!("Bearer {}", w.token("bb", &[]));
    let (resp, mut stream) =
        open_post(&w, &mut send, ("/echo", &[("authorization", t.as_str())]), "POST").await;
    send_body(&mut stream, Bytes::from_static(b"hello"), true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read(resp).await.0, StatusCode::OK);
}

/// The symptom as reported, with the client that showed it: the system `curl` (Debian
/// 12's 7.88.1 here and in CI) over HTTP/2, a refused POST with a body, 20 times each:
/// every run prints the status and the fixed body, none fails with a framing error.
#[tokio::test]
async fn curl_gets_the_status_and_body_of_a_refused_http2_post_every_time() {
    let w = World::start().await;
    let big = w.dir.path().join("big-body");
    write(&big, &"x".repeat(64 * 1024));
    let feature = format!("Authorization: Bearer {}", w.token("bb", &["branchName=feature/x"]));
    let big_arg = format!("@{}", big.display());
    let cases: [(&[&str], &str, &str); 3] = [
        (&["-d", "x=1"], "401", "missing-token"),
        (&["-H", &feature, "-d", "{\"commit\":\"abc\"}"], "403", "policy-denied"),
        (&["--data-binary", &big_arg], "401", "missing-token"),
    ];
    for (args, status, code) in cases {
        for run in 0..20 {
            let out = tokio::process::Command::new("curl")
                .args(["--http2", "-sS", "--max-time", "10", "--cacert"])
                .arg(w.pki.ca_path())
                .args(["-w", "\n%{http_code} %{http_version}", "-X", "POST"])
                .args(args)
                .arg(w.url("/deploy"))
                .output()
                .await
                .unwrap_or_else(|e| panic!("the system `curl` is needed for this test: {e}"));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{args:?} run {run}: curl {}: {stderr} {stdout}",
                out.status
            );
            assert!(stdout.ends_with(&format!("\n{status} 2")), "{args:?} run {run}: {stdout}");
            assert!(stdout.contains(&format!("\"error\":\"{code}\"")), "{args:?}: {stdout}");
        }
    }
}

/// A body that never ends, sent as fast as the proxy takes it: read and discarded up to
/// 1 MiB (the proxy's bound; the route allows 10 MiB), then the stream is reset, long
/// before the time bound; the proxy never took more than that and one window.
#[tokio::test]
async fn an_endless_body_on_a_refused_http2_request_is_reset_past_the_byte_bound() {
    let w = World::start().await;
    let mut send = connect(&w).await;
    let (resp, mut stream) = open_post(&w, &mut send, ("/deploy", &[]), "POST").await;
    let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
    send_body(&mut stream, chunk.clone(), false).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read(resp).await.0, StatusCode::UNAUTHORIZED);
    let start = Instant::now();
    let mut sent = chunk.len();
    let why = loop {
        if let Err(why) = send_body(&mut stream, chunk.clone(), false).await {
            break why;
        }
        sent += chunk.len();
        assert!(sent < 8 << 20, "the proxy took 8 MiB of a refused request's body");
        assert!(start.elapsed() < Duration::from_secs(10), "never reset");
    };
    let took = start.elapsed();
    assert!(reset_within(&mut stream, Duration::from_secs(1)).await.is_some(), "{why}");
    // Over the bound (it was read), but not much over: a stream window at most.
    assert!(sent > 1 << 20, "reset after {sent} bytes: before the 1 MiB bound");
    assert!(sent <= (1 << 20) + (2 << 20), "{sent} bytes taken");
    assert!(took < Duration::from_secs(2), "reset after {took:?}: by the time bound");
}

/// A body that trickles and never ends: the stream is reset once the time bound (3 s)
/// is over, with little read.
#[tokio::test]
async fn a_trickling_body_on_a_refused_http2_request_is_reset_past_the_time_bound() {
    let w = World::start().await;
    let mut send = connect(&w).await;
    let (resp, mut stream) = open_post(&w, &mut send, ("/deploy", &[]), "POST").await;
    send_body(&mut stream, Bytes::from_static(b"x"), false).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read(resp).await.0, StatusCode::UNAUTHORIZED);
    let start = Instant::now();
    let why = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(why) = send_body(&mut stream, Bytes::from_static(b"x"), false).await {
            break why;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never reset");
    };
    let took = start.elapsed();
    assert!(reset_within(&mut stream, Duration::from_secs(1)).await.is_some(), "{why}");
    assert!(took >= Duration::from_millis(2500), "reset after {took:?}: before the time bound");
}

/// The bound is the route's `max_request_body` when that is smaller: a refused request
/// declaring a body the route would not take is not read at all (reset after its
/// answer, as a 413 is), one within it is.
#[tokio::test]
async fn a_refused_body_over_the_routes_limit_is_not_read() {
    let w = World::with(Setup {
        route_extra: "max_request_body = \"64KiB\"".into(),
        ..Setup::default()
    })
    .await;
    let mut send = connect(&w).await;
    for (len, reset) in [(60_000usize, false), (100_000, true)] {
        let n = len.to_string();
        let (resp, mut stream) =
            open_post(&w, &mut send, ("/deploy", &[("content-length", n.as_str())]), "POST").await;
        send_body(&mut stream, Bytes::from(vec![b'x'; 20_000]), false)
            .await
            .unwrap_or_else(|e| panic!("{len}: {e}"));
        assert_eq!(read(resp).await.0, StatusCode::UNAUTHORIZED);
        let got = reset_within(&mut stream, Duration::from_millis(300)).await;
        assert_eq!(got.is_some(), reset, "{len}-byte body: reset {got:?}");
        if !reset {
            send_body(&mut stream, Bytes::from(vec![b'y'; len - 20_000]), true)
                .await
                .unwrap_or_else(|e| panic!("{len}: {e}"));
        }
    }
}
