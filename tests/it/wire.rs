//! The wire between a client, the proxy and a raw upstream: request methods and framings
//! the proxy must not carry, and upstream answers it must not misread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::forwarding::tls_alpn;
use crate::support::*;

/// A raw upstream that hands each connection it accepts to `serve`, with a counter
/// shared by all of them (for `serve` to count what it likes); that counter, and the
/// number of connections accepted.
async fn raw_upstream<F, Fut>(
    serve: F,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, Arc<AtomicUsize>) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (counter, conns) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (shared, accepted) = (counter.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s, shared.clone()));
        }
    });
    (addr, counter, conns)
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
    raw_exchange(tls_alpn(w, b"http/1.1").await, req).await
}

/// `CONNECT` asks an intermediary for a tunnel, which a reverse proxy never offers (only
/// a WebSocket upgrade is tunnelled). An HTTP/1.1 `CONNECT /q/rpc` (origin form, which
/// hyper accepts) was authorized and forwarded; an upstream answering it with a 2xx (Go's
/// net/rpc does, for `CONNECT /_goRPC_`) had both HTTP layers take the exchange for a
/// tunnel, so the client got nothing at all while the event said `200 allowed`. It is
/// refused like TRACE, before anything reaches the upstream, over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn connect_is_refused_and_never_reaches_the_upstream() {
    let (addr, heads, _) = raw_upstream(|mut s, heads| async move {
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

/// A keep-alive upstream whose answers to `HEAD` and to `/q/no-content` (a 204 announcing
/// a body) end with their head, their body written a moment later: here, once the next
/// request has arrived on the connection, the order a pooled connection meets when it
/// is taken again at once. That body is itself an HTTP answer (`LEAKED`), as an
/// upstream reflecting what a client sent could make it. Every other request gets `ok`.
/// The second value counts the connections accepted.
async fn late_body_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let (addr, _, conns) = raw_upstream(|s, _| serve_late_bodies(s)).await;
    (addr, conns)
}

/// [`late_body_upstream`]'s answers on one connection (plain or TLS): a `HEAD`, and a
/// `GET` of a path ending in `/no-content` (a 204), get their body after the next
/// request's head.
async fn serve_late_bodies<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let late = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nLEAKED";
    while let Some(head) = read_head(&mut s).await {
        let status = if head.starts_with("HEAD ") {
            "200 OK"
        } else if head.starts_with("GET ") && head.contains("/no-content ") {
            "204 No Content"
        } else {
            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
            continue;
        };
        let first = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n", late.len());
        if s.write_all(first.as_bytes()).await.is_err() {
            return;
        }
        // The body comes after the next request: none if the proxy closed.
        let Some(_next) = read_head(&mut s).await else { return };
        let _ = s.write_all(late.as_bytes()).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    }
}

/// Response queue poisoning by a late body: an upstream that answers `HEAD` by running
/// its `GET` handler (Python's `do_HEAD = do_GET`, hand-written servers) writes the body
/// after the head, and so may one answering 204 with a `Content-Length`. hyper reads no
/// body after such a head, so the pooled connection went back at once and the next
/// request on it, another client's, was answered with those late bytes (here a whole
/// answer, `LEAKED`), its own answer left on the connection for the one after. Such an
/// exchange's connection is not reused; ordinary answers still are.
#[tokio::test]
async fn a_body_written_after_a_bodiless_answer_never_answers_the_next_request() {
    let (addr, conns) = late_body_upstream().await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    let head = w
        .send(http::Method::HEAD, "/q/page", &[("authorization", &auth)], bytes::Bytes::new())
        .await;
    assert_eq!(head.status, http::StatusCode::OK);
    let next = w.get("/q/next", Some(&t)).await;
    assert_eq!(next.text(), "ok", "the HEAD's late body answered the next request");
    let no_content = w.get("/q/no-content", Some(&t)).await;
    assert_eq!(no_content.status, http::StatusCode::NO_CONTENT);
    let next = w.get("/q/next", Some(&t)).await;
    assert_eq!(next.text(), "ok", "the 204's late body answered the next request");
    plain_gets_keep_their_connection(&w, &t, &conns).await;
}

/// The same over an HTTPS upstream speaking HTTP/1.1 (hyper-util's pool): the connection
/// that answered a `HEAD` is not handed out again (it is poisoned once the head is back);
/// a `GET`'s is.
#[tokio::test]
async fn an_https_upstream_connection_that_answered_a_head_is_not_reused() {
    // Every answer's body is the number of the connection it came on.
    let (w, _dir, server) = crate::forwarding::world_with_http1_tls_upstream().await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    assert_eq!(w.get("/tls/a", Some(&t)).await.text(), "1");
    let head = w
        .send(http::Method::HEAD, "/tls/h", &[("authorization", &auth)], bytes::Bytes::new())
        .await;
    assert_eq!(head.status, http::StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(w.get("/tls/b", Some(&t)).await.text(), "2", "the HEAD's connection was reused");
    }
    server.abort();
}

/// The late body of a 204 from an HTTPS upstream speaking HTTP/1.1 (hyper-util's pool),
/// to a `GET` without a body. Attack (round 14): only a `HEAD`, or a request with a body,
/// had its connection captured to be poisoned, so a bodiless `GET` answered with a 204
/// announcing a body (or a 304 with `Transfer-Encoding`, the everyday conditional `GET`)
/// went back to the pool, and the late bytes answered the next client's request there,
/// as they did over plain HTTP before the fix for it.
#[tokio::test]
async fn an_https_upstreams_late_body_after_a_204_never_answers_the_next_request() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pki =
        portcullis::tls::DevPki::load_or_create(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let tls = portcullis::tls::server_config_with_alpn(
        pki.key_source(),
        vec![],
        vec![b"http/1.1".to_vec()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let port = listener.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(s).await {
                    serve_late_bodies(s).await;
                }
            });
        }
    });
    let routes = format!(
        "[[routes]]\nname = \"tls-up\"\nmatch = {{ path_prefix = \"/tls\" }}\nupstream = \"https://localhost:{port}\"\nupstream_ca = {:?}\npolicy = \"api\"\n",
        pki.ca_path().to_string_lossy(),
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    assert_eq!(w.get("/tls/first", Some(&t)).await.text(), "ok");
    let no_content = w.get("/tls/no-content", Some(&t)).await;
    assert_eq!(no_content.status, http::StatusCode::NO_CONTENT);
    for _ in 0..2 {
        let next = w.get("/tls/next", Some(&t)).await;
        assert_eq!(next.text(), "ok", "the 204's late body answered the next request");
    }
    server.abort();
}

/// A client that sends its request head and then only part of the body it announced
/// holds the exchange until the route's `timeout` (the upstream, as most do, waits for the
/// whole body before it answers). That was audited as `upstream-timeout` (504), blaming
/// the upstream for the client's upload, the very slow-POST pattern an operator's alerts
/// on upstream timeouts would then misreport. It is the client's: 408 `request-timeout`,
/// the decision still `allow` (the request was authorized and went upstream). An
/// upstream slow to answer a complete request is still `upstream-timeout`.
#[tokio::test]
async fn a_request_body_that_stops_coming_is_a_request_timeout_not_the_upstreams() {
    let (addr, _, _) = raw_upstream(|mut s, _| async move {
        // Reads the head and whatever body comes; answers only `/q/slow` (never) and a
        // complete body.
        let Some(head) = read_head(&mut s).await else { return };
        if head.split(' ').nth(1) == Some("/q/slow") {
            let _ = tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"q\"\nmatch = {{ path_prefix = \"/q\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\ntimeout = \"1s\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let resp = exchange(
        &w,
        &format!("POST /q/upload HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nContent-Length: 10\r\n\r\nhalf."),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    assert!(resp.contains("\"error\":\"request-timeout\""), "{resp}");
    let ev = w.last_event().await;
    assert_eq!(
        (ev["path"].as_str(), ev["status"].as_u64()),
        (Some("/q/upload"), Some(408)),
        "{ev}"
    );
    assert_eq!(
        (ev["reason"].as_str(), ev["decision"].as_str()),
        (Some("request-timeout"), Some("allow")),
        "{ev}"
    );
    assert_eq!(ev["bytes_in"], 5, "{ev}");
    // A whole body, and an upstream that does not answer: the upstream's.
    let r = w
        .send(
            http::Method::POST,
            "/q/slow",
            &[("authorization", &format!("Bearer {t}"))],
            bytes::Bytes::from_static(b"whole"),
        )
        .await;
    assert_eq!(r.status, http::StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(w.last_event().await["reason"], "upstream-timeout");
    // Attack (round 14): a whole body too large for the socket buffers, and an upstream
    // that reads none of it. The proxy cannot send it all, so it never reaches its end
    // here: that was the client's 408, though the client had it all ready and the
    // upstream was the one not taking it. The upstream's.
    let r = w
        .send(
            http::Method::POST,
            "/q/slow",
            &[("authorization", &format!("Bearer {t}"))],
            bytes::Bytes::from(vec![b'x'; 8 << 20]),
        )
        .await;
    assert_eq!(r.status, http::StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(w.last_event().await["reason"], "upstream-timeout");
    // A GET with a chunked body is sent upstream without it (hyper frames it as
    // bodiless): no upload to wait on either.
    let resp = exchange(
        &w,
        &format!("GET /q/slow HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 504 "), "{resp}");
}

/// Trailers of an upstream answer pass to the client, but not as the upstream wrote them:
/// a hop-by-hop name in them (`Connection: close`, which an HTTP/1.1 upstream may think
/// harmless) made the HTTP/2 server refuse the whole trailer section and reset the
/// stream under an answer whose event said `200 allowed`, and a `Set-Cookie` for the
/// proxy's own cookie, dropped from the head, passed in the trailers. Trailers get the
/// head's hygiene: those names go, the application's trailers stay.
#[tokio::test]
async fn upstream_trailers_get_the_heads_hygiene() {
    let (addr, _, _) = raw_upstream(|mut s, _| async move {
        while read_head(&mut s).await.is_some() {
            let a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nconnection: close\r\nset-cookie: __Host-_portcullis=planted; Path=/; Secure\r\nset-cookie: app=1\r\nx-checksum: abc\r\n\r\n";
            if s.write_all(a).await.is_err() {
                return;
            }
        }
    })
    .await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .uri(format!("https://localhost:{}/q/trailers", w.https.port()))
        .header("authorization", format!("Bearer {t}"))
        .header("te", "trailers")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, _) = send.send_request(req, true).unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = body.data().await {
        got.extend_from_slice(&d.unwrap_or_else(|e| panic!("the answer was cut: {e}")));
    }
    assert_eq!(got, b"ok");
    let trailers = body.trailers().await.unwrap_or_else(|e| panic!("the answer was cut: {e}"));
    let trailers = trailers.unwrap_or_else(|| panic!("no trailers"));
    assert_eq!(trailers.get("x-checksum").map(|v| v.as_bytes()), Some(&b"abc"[..]), "{trailers:?}");
    let cookies: Vec<_> = trailers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["app=1"], "{trailers:?}");
    assert!(trailers.get("connection").is_none(), "{trailers:?}");
}

/// An HTTP/2 request may repeat an equal `content-length` (the `h2` server checks that
/// every value agrees with the others and with the DATA): forwarded as it came, an
/// HTTP/1.1 upstream got two `Content-Length` fields, which read together are the list
/// `5, 5`, no valid length (RFC 9110 §8.6; Node's parser refuses the request, others may
/// guess). The upstream gets one.
#[tokio::test]
async fn an_http2_requests_repeated_content_length_reaches_the_upstream_once() {
    let (addr, lengths, _) = raw_upstream(|mut s, lengths| async move {
        while let Some(head) = read_head(&mut s).await {
            let n = head
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
                .count();
            lengths.store(n, Ordering::SeqCst);
            // Its five body bytes came with the head or come next; then the answer.
            let mut rest = head.split("\r\n\r\n").nth(1).map_or(0, str::len);
            let mut buf = [0u8; 16];
            while rest < 5 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest += n,
                }
            }
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                return;
            }
        }
    })
    .await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{}/q/upload", w.https.port()))
        .header("authorization", format!("Bearer {t}"))
        .header("content-length", "5")
        .header("content-length", "5")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, mut stream) = send.send_request(req, false).unwrap_or_else(|e| panic!("{e}"));
    stream.send_data(bytes::Bytes::from_static(b"hello"), true).unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(lengths.load(Ordering::SeqCst), 1, "the upstream got Content-Length more than once");
}

/// A `GET` with a body of no announced length (Elasticsearch's `GET /_search` with a
/// JSON query, chunked over HTTP/1.1 or HTTP/2 DATA without `content-length`): hyper's
/// client sent such a `GET` upstream as bodiless (`GET`, `HEAD` "almost never have
/// bodies"), so the upstream got the head alone. It gets the body, chunked, and streamed:
/// this upstream answers once it has read the first chunk, while the client still holds
/// the rest, which a buffered body would never let it see.
#[tokio::test]
async fn a_get_with_a_chunked_or_unsized_body_reaches_the_upstream_streamed() {
    let (addr, _, _) = raw_upstream(|mut s, _| async move {
        let Some(mut seen) = read_head(&mut s).await else { return };
        let chunked = seen.to_ascii_lowercase().contains("\r\ntransfer-encoding: chunked\r\n");
        let mut buf = [0u8; 4096];
        while chunked && !seen.contains("\r\n5\r\nhello\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        let answer = if chunked { "got-hello" } else { "no-body" };
        let a = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        );
        let _ = s.write_all(a.as_bytes()).await;
    })
    .await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();

    // HTTP/1.1, chunked: the answer comes while the body is still open.
    let mut s = tls_alpn(&w, b"http/1.1").await;
    let head = format!(
        "GET /q/_search HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n")
        || !(got.ends_with(b"got-hello") || got.ends_with(b"no-body"))
    {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("no answer while the body is open: {other:?}: {got:?}"),
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(got.ends_with("got-hello"), "HTTP/1.1: the upstream got no body: {got}");
    let _ = s.write_all(b"0\r\n\r\n").await;

    // HTTP/2 DATA without content-length.
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("GET")
        .uri(format!("https://localhost:{port}/q/_search"))
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, mut stream) = send.send_request(req, false).unwrap_or_else(|e| panic!("{e}"));
    stream.send_data(bytes::Bytes::from_static(b"hello"), false).unwrap_or_else(|e| panic!("{e}"));
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap_or_else(|_| panic!("HTTP/2: no answer while the body is open"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(d) = body.data().await {
        text.extend_from_slice(&d.unwrap_or_else(|e| panic!("{e}")));
    }
    assert_eq!(String::from_utf8_lossy(&text), "got-hello", "HTTP/2: the upstream got no body");
}

/// An upstream that never reads a request body, as Python's `do_GET` (and most `GET`
/// handlers) do: whatever follows a head is read as the next request. `/q/slow` is
/// answered only once the next request has arrived (a slow endpoint), with `LEAKED`;
/// every other request with `ok`. The second value counts the connections accepted.
async fn body_ignoring_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let (addr, _, conns) = raw_upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let find = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n");
        loop {
            while find(&buf).is_none() {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let end = find(&buf).map_or(0, |p| p + 4);
            let head: Vec<u8> = buf.drain(..end).collect();
            let answer: &[u8] = if head.starts_with(b"GET /q/slow ") {
                while find(&buf).is_none() {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nLEAKED"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            if s.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await;
    (addr, conns)
}

/// A `GET` whose body is itself a request, to an upstream whose `GET` handler never
/// reads a body and answers 200 (the early-answer rule closes connections only after an
/// error answer): the upstream reads the body as a request of its own, unauthorized, and
/// its answer, written late, went to the next client on the pooled connection. A
/// connection whose `GET`, `HEAD` or `DELETE` carried body bytes is not reused,
/// whatever the answer; a `GET` without a body keeps its connection.
#[tokio::test]
async fn a_get_bodys_connection_is_not_reused_even_after_a_success() {
    let (addr, conns) = body_ignoring_upstream().await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    let smuggled = bytes::Bytes::from_static(b"GET /q/slow HTTP/1.1\r\nHost: upstream\r\n\r\n");
    for method in [http::Method::GET, http::Method::DELETE] {
        let r = w.send(method.clone(), "/q/a", &[("authorization", &auth)], smuggled.clone()).await;
        assert_eq!((r.status, r.text()), (http::StatusCode::OK, "ok".to_string()), "{method}");
        let next = w.get("/q/next", Some(&t)).await;
        assert_eq!(next.text(), "ok", "{method}: the smuggled request answered the next one");
    }
    plain_gets_keep_their_connection(&w, &t, &conns).await;
}

/// The same rule over an HTTPS upstream speaking HTTP/1.1 (hyper-util's pool): the
/// connection that carried a `GET` body is poisoned.
#[tokio::test]
async fn an_https_upstream_connection_that_carried_a_get_body_is_not_reused() {
    // Every answer's body is the number of the connection it came on.
    let (w, _dir, server) = crate::forwarding::world_with_http1_tls_upstream().await;
    let t = w.token("bb", &[]);
    let auth = format!("Bearer {t}");
    assert_eq!(w.get("/tls/a", Some(&t)).await.text(), "1");
    let body = bytes::Bytes::from_static(b"{\"query\":{}}");
    let r = w.send(http::Method::GET, "/tls/_search", &[("authorization", &auth)], body).await;
    assert_eq!(r.text(), "1");
    for _ in 0..3 {
        assert_eq!(
            w.get("/tls/b", Some(&t)).await.text(),
            "2",
            "the GET body's connection was reused"
        );
    }
    server.abort();
}

/// Ordinary answers keep their connection: three plain `GET`s open no new upstream
/// connection (`conns` counts those the upstream accepted), so a test of a rule that
/// closes connections cannot pass by closing every one.
async fn plain_gets_keep_their_connection(w: &World, token: &str, conns: &AtomicUsize) {
    let before = conns.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(w.get("/q/again", Some(token)).await.text(), "ok");
    }
    assert_eq!(conns.load(Ordering::SeqCst), before, "a plain GET's connection was not reused");
}

/// A raw upstream that counts request heads and answers each `ok` (reading a chunked
/// body to its end first) on a connection of its own.
async fn counting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let (addr, heads, _) = raw_upstream(|mut s, heads| async move {
        let Some(mut seen) = read_head(&mut s).await else { return };
        heads.fetch_add(1, Ordering::SeqCst);
        let chunked = seen.to_ascii_lowercase().contains("\r\ntransfer-encoding: chunked\r\n");
        let mut buf = [0u8; 4096];
        while chunked && !seen.ends_with("\r\n0\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        let _ = s.write_all(ok).await;
    })
    .await;
    (addr, heads)
}

/// A request `Transfer-Encoding` other than `chunked` alone (`gzip, chunked`, `chunked`
/// twice, in one field or two): the HTTP server decodes the chunked framing only and
/// the proxy frames the body anew without the client's `Transfer-Encoding` (hop-by-hop),
/// so the upstream took the still-coded bytes (gzip, or a second layer of chunks) for
/// the content with nothing saying so. Refused (400) before routing, as nginx refuses
/// them (501), the connection closed; the same rule as for an upstream's answer.
#[tokio::test]
async fn a_request_transfer_coding_other_than_chunked_alone_is_refused() {
    let (addr, heads) = counting_upstream().await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let post = |codings: &str| {
        format!(
            "POST /q/x HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n{codings}\r\n5\r\nhello\r\n0\r\n\r\n"
        )
    };
    for codings in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: x-custom\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let resp = exchange(&w, &post(codings)).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{codings:?}: {resp}");
        assert!(resp.contains("\"error\":\"bad-request\""), "{codings:?}: {resp}");
        let ev = w.last_event().await;
        assert_eq!(ev["reason"], "bad-request", "{codings:?}: {ev}");
    }
    assert_eq!(heads.load(Ordering::SeqCst), 0, "a request reached the upstream");
    // `chunked` alone (any case) is the one coding a request may have.
    for codings in ["Transfer-Encoding: chunked\r\n", "Transfer-Encoding: Chunked\r\n"] {
        let resp = exchange(&w, &post(codings)).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{codings:?}: {resp}");
        assert!(resp.ends_with("ok"), "{codings:?}: {resp}");
    }
    assert_eq!(heads.load(Ordering::SeqCst), 2);
}

/// A `Content-Length` with leading zeros (`0010`) is valid HTTP and framed as 10 by the
/// proxy's HTTP server, but was forwarded as the client spelt it: an upstream that reads
/// a leading `0` as octal (`strtol(…, 0)`, as some hand-written and embedded servers
/// parse numbers) takes 8 of the 10 bytes as the body and the last 2, the client's, as
/// the start of the next request on a pooled connection. The upstream gets the length in
/// its one decimal spelling, over HTTP/1.1 and HTTP/2; and so does a client an upstream
/// answers with `02` or the list `2, 2` (hyper's client accepts both).
#[tokio::test]
async fn a_content_length_reaches_the_other_side_in_its_one_decimal_spelling() {
    let w = World::start().await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let resp = exchange(
        &w,
        &format!("POST /x HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nContent-Length: 0010\r\nConnection: close\r\n\r\n0123456789"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    let echo: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
    assert_eq!(echo["headers"]["content-length"], serde_json::json!(["10"]), "{echo}");
    assert_eq!(echo["body_bytes"], 10, "{echo}");

    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{port}/x"))
        .header("authorization", format!("Bearer {t}"))
        .header("content-length", "010")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, mut stream) = send.send_request(req, false).unwrap_or_else(|e| panic!("{e}"));
    stream
        .send_data(bytes::Bytes::from_static(b"0123456789"), true)
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.unwrap_or_else(|e| panic!("{e}")));
    }
    let echo: serde_json::Value = serde_json::from_slice(&got).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(echo["headers"]["content-length"], serde_json::json!(["10"]), "h2: {echo}");

    for given in ["02", "2, 2", "2,2"] {
        let (addr, _task) = raw_answering(move |_| {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {given}\r\nConnection: close\r\n\r\nok")
        })
        .await;
        let w = world_to(addr).await;
        let t = w.token("bb", &[]);
        let resp = exchange(
            &w,
            &format!("GET /q HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n", w.https.port()),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{given}: {resp}");
        let lengths: Vec<&str> =
            resp.lines().filter_map(|l| l.strip_prefix("content-length:")).map(str::trim).collect();
        assert_eq!(lengths, ["2"], "{given}: {resp}");
        assert!(resp.ends_with("\r\n\r\nok"), "{given}: {resp}");
    }
}

/// A `HEAD` answered by the proxy itself (a 401, a rejection page, the sign-in
/// endpoints' pages) over HTTP/2: the page's bytes went out as DATA frames, which a
/// response to `HEAD` may not carry (RFC 9110 §9.3.2, RFC 9113 §8.1.1), and the stream
/// was reset (curl: `PROTOCOL_ERROR`), so a monitor's or a link checker's `HEAD` got no
/// answer at all. It gets the status and headers, with the `Content-Length` a `GET` gets.
#[tokio::test]
async fn a_head_the_proxy_answers_itself_over_http2_gets_its_head_and_no_body() {
    let w = World::with(Setup { sso: Some(String::new()), ..Setup::default() }).await;
    let h2 = client(&w.pki, true);
    for (path, accept, status) in [
        ("/secret", "application/json", http::StatusCode::UNAUTHORIZED),
        ("/%2e%2e/x", "text/html", http::StatusCode::BAD_REQUEST),
        ("/.portcullis/sign_in?rd=//evil.example", "text/html", http::StatusCode::BAD_REQUEST),
        ("/.portcullis/userinfo", "application/json", http::StatusCode::UNAUTHORIZED),
    ] {
        let (url, headers) = (w.url(path), [("accept", accept)]);
        let send = |method| send_with(&h2, method, &url, &headers, Default::default());
        let get = send(http::Method::GET).await;
        assert_eq!(get.status, status, "GET {path}");
        assert!(!get.body.is_empty(), "GET {path} has a body");
        let head = send(http::Method::HEAD).await;
        assert_eq!(head.status, status, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path}: no body");
        assert_eq!(
            head.headers.get("content-length").and_then(|v| v.to_str().ok()),
            Some(get.body.len().to_string().as_str()),
            "HEAD {path}: the GET's length"
        );
    }
}

/// A raw upstream that answers every request head with `200 ok` and counts the heads.
async fn head_counting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let (addr, heads, _) = raw_upstream(|mut s, heads| async move {
        while read_head(&mut s).await.is_some() {
            heads.fetch_add(1, Ordering::SeqCst);
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                return;
            }
        }
    })
    .await;
    (addr, heads)
}

/// An HTTP/1 absolute-form target names `http` or `https` (RFC 9112 §3.2.2), and an
/// HTTP/1.1 request carries a Host (§3.2). `GET ftp://…` was routed like `http`, and an
/// HTTP/1.1 absolute-form request without Host was served; both are a 400 with the fixed
/// body now (as nginx answers), one `bad-request` event each, and nothing reaches the
/// upstream.
#[tokio::test]
async fn an_absolute_form_target_of_another_scheme_or_without_host_is_refused() {
    let (addr, heads) = head_counting_upstream().await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let auth = format!("Authorization: Bearer {t}\r\nConnection: close\r\n");
    let scheme = "the request target's scheme is not http or https";
    let no_host = "an HTTP/1.1 absolute-form request without a Host header";
    let cases = [
        (
            format!(
                "GET ftp://localhost:{port}/q/x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}\r\n"
            ),
            scheme,
        ),
        (
            format!(
                "GET ws://localhost:{port}/q/x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}\r\n"
            ),
            scheme,
        ),
        (
            format!(
                "GET ftp://localhost:{port}/q/x HTTP/1.0\r\nHost: localhost:{port}\r\n{auth}\r\n"
            ),
            scheme,
        ),
        (format!("GET https://localhost:{port}/q/x HTTP/1.1\r\n{auth}\r\n"), no_host),
        (format!("GET http://localhost:{port}/q/x HTTP/1.1\r\n{auth}\r\n"), no_host),
    ];
    for (request, detail) in &cases {
        let resp = exchange(&w, request).await;
        assert!(
            resp.starts_with("HTTP/1.1 400 ") || resp.starts_with("HTTP/1.0 400 "),
            "{request}: {resp}"
        );
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
        assert_eq!(body["error"], "bad-request", "{request}: {resp}");
        assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{request}: {resp}");
        let id = body["request_id"].as_str().unwrap_or_else(|| panic!("no id: {resp}"));
        let ev = w.event_for(id).await;
        assert_eq!(ev["status"], 400, "{request}: {ev}");
        assert_eq!(ev["reason"], "bad-request", "{request}: {ev}");
        assert_eq!(ev["detail"], *detail, "{request}: {ev}");
        assert!(!ev.to_string().contains(&t), "the token was logged: {ev}");
        let events = w.events().into_iter().filter(|e| e["request_id"] == id).count();
        assert_eq!(events, 1, "{request}: one event per refusal");
    }
    assert_eq!(heads.load(Ordering::SeqCst), 0, "a refused request reached the upstream");
    // What stays: absolute-form `https` with its Host, and HTTP/1.0, which has no Host
    // to require, in absolute form without one.
    for request in [
        format!(
            "GET https://localhost:{port}/q/x HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}\r\n"
        ),
        format!("GET https://localhost:{port}/q/x HTTP/1.0\r\n{auth}\r\n"),
    ] {
        let resp = exchange(&w, &request).await;
        assert!(
            resp.starts_with("HTTP/1.1 200 ") || resp.starts_with("HTTP/1.0 200 "),
            "{request}: {resp}"
        );
    }
    assert_eq!(heads.load(Ordering::SeqCst), 2);
}

/// Extended CONNECT (RFC 8441: `:method CONNECT` with `:protocol websocket`, a WebSocket
/// over HTTP/2) and `OPTIONS *` over HTTP/2 never reach the upstream. The server does not
/// advertise `SETTINGS_ENABLE_CONNECT_PROTOCOL`, and the `h2` server resets a stream that
/// carries `:protocol` anyway; `OPTIONS *` names no path a route could authorize (400
/// `ambiguous-path`, as over HTTP/1.1). Either one forwarded would be a request the
/// policy never saw as it is: a tunnel, or the upstream's server-wide `*`.
#[tokio::test]
async fn extended_connect_and_options_star_over_http2_never_reach_the_upstream() {
    let (addr, heads) = head_counting_upstream().await;
    // Every path goes to the counting upstream: whatever a refused request were taken for.
    let routes = format!(
        "[[routes]]\nname = \"q\"\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, default_route: false, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let port = w.https.port();
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));

    // OPTIONS *: `:path *` (the `h2` client writes it for an OPTIONS with no path).
    let uri = http::Uri::builder()
        .scheme("https")
        .authority(format!("localhost:{port}"))
        .path_and_query("*")
        .build();
    let uri = uri.unwrap_or_else(|e| panic!("{e}"));
    let req = http::Request::builder()
        .method("OPTIONS")
        .uri(uri)
        .header("authorization", format!("Bearer {t}"))
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let (resp, _) = send.send_request(req, true).unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = body.data().await {
        got.extend_from_slice(&d.unwrap_or_else(|e| panic!("{e}")));
    }
    let got: serde_json::Value =
        serde_json::from_slice(&got).unwrap_or_else(|e| panic!("{e}: {got:?}"));
    assert_eq!(got["error"], "ambiguous-path", "{got}");
    let ev = w.event_for(got["request_id"].as_str().unwrap_or_default()).await;
    assert_eq!(
        (ev["method"].as_str(), ev["status"].as_u64()),
        (Some("OPTIONS"), Some(400)),
        "{ev}"
    );

    // And over HTTP/1.1 (asterisk-form, RFC 9112 §3.2.4).
    let resp = exchange(
        &w,
        &format!("OPTIONS * HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert!(resp.contains("\"error\":\"ambiguous-path\""), "{resp}");

    // The server's SETTINGS (read by now) do not enable extended CONNECT.
    assert!(!send.is_extended_connect_protocol_enabled(), "SETTINGS_ENABLE_CONNECT_PROTOCOL");
    // A client that sends `:protocol websocket` regardless gets its stream reset.
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost:{port}/q/socket"))
        .header("authorization", format!("Bearer {t}"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    req.extensions_mut().insert(h2::ext::Protocol::from_static("websocket"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, _stream) = send.send_request(req, false).unwrap_or_else(|e| panic!("{e}"));
    match resp.await {
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{e}"),
        Ok(r) => panic!("extended CONNECT was answered: {r:?}"),
    }

    // The route itself works, so nothing above was the upstream's to see.
    let r = w.get("/q/plain", Some(&t)).await;
    assert_eq!(r.text(), "ok");
    assert_eq!(
        heads.load(Ordering::SeqCst),
        1,
        "OPTIONS * or extended CONNECT reached the upstream"
    );
}

/// Informational answers (`103 Early Hints` with `Link` and a `Set-Cookie`, then `100
/// Continue`) from an HTTP/1.1 upstream, to an HTTP/2 client: skipped, as for an HTTP/1.1
/// client. The client gets the final answer alone, with none of the 1xx fields in it (a
/// `Set-Cookie` there would have passed no response hygiene).
#[tokio::test]
async fn an_upstreams_informational_answers_never_reach_an_http2_client() {
    let (addr, _, _) = raw_upstream(|mut s, _| async move {
        while read_head(&mut s).await.is_some() {
            let a = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\nset-cookie: _portcullis=planted; Path=/\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            if s.write_all(a).await.is_err() {
                return;
            }
        }
    })
    .await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .uri(format!("https://localhost:{}/q/hints", w.https.port()))
        .header("authorization", format!("Bearer {t}"))
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (mut resp, _) = send.send_request(req, true).unwrap_or_else(|e| panic!("{e}"));
    // Every 1xx HEADERS the stream got before its final answer.
    let mut interim = Vec::new();
    while let Some(r) = std::future::poll_fn(|cx| resp.poll_informational(cx)).await {
        interim.push(r.map(|r| r.status()).unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(interim.is_empty(), "informational answers reached the client: {interim:?}");
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert!(resp.headers().get("link").is_none(), "{:?}", resp.headers());
    assert!(resp.headers().get("set-cookie").is_none(), "{:?}", resp.headers());
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = body.data().await {
        got.extend_from_slice(&d.unwrap_or_else(|e| panic!("{e}")));
    }
    assert_eq!(got, b"ok");
    let ev = w.last_event().await;
    assert_eq!(
        (ev["status"].as_u64(), ev["decision"].as_str()),
        (Some(200), Some("allow")),
        "{ev}"
    );
}
