//! gRPC-style traffic (HTTP/2 client → proxy → HTTP/2 upstream) and the one `TE` the
//! proxy forwards: exactly `te: trailers`, to HTTP/2 upstreams only.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;

use crate::forwarding::tls_alpn;
use crate::support::*;

/// What an upstream was sent: `(path, version, te)` per request.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A gRPC-like upstream: answers every request with its body echoed,
/// `content-type: application/grpc` and the trailers `grpc-status: 0` and
/// `grpc-message: <the request's te, or none>`; records what it was sent. Served with
/// hyper's auto builder: HTTP/2 with prior knowledge (h2c) or HTTP/1.1 in clear, or,
/// with `tls`, over TLS with those ALPN protocols (and its PKI's directory, to keep).
async fn grpc_upstream(
    tls: Option<Vec<Vec<u8>>>,
) -> (std::net::SocketAddr, Seen, Option<(portcullis::tls::DevPki, tempfile::TempDir)>) {
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let seen: Seen = Arc::default();
    let (acceptor, pki) = match tls {
        Some(alpn) => {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let pki = portcullis::tls::DevPki::load_or_create(dir.path(), &[])
                .unwrap_or_else(|e| panic!("{e}"));
            let cfg = portcullis::tls::server_config_with_alpn(pki.key_source(), vec![], alpn)
                .unwrap_or_else(|e| panic!("{e}"));
            (Some(tokio_rustls::TlsAcceptor::from(cfg)), Some((pki, dir)))
        }
        None => (None, None),
    };
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (record, acceptor) = (record.clone(), acceptor.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let te = req
                                .headers()
                                .get_all("te")
                                .iter()
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                                .reduce(|a, b| format!("{a}|{b}"));
                            let path = req.uri().path().to_string();
                            let version = format!("{:?}", req.version());
                            record.lock().unwrap_or_else(|e| e.into_inner()).push((
                                path,
                                version,
                                te.clone(),
                            ));
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body = body.unwrap_or_default();
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let message = te.unwrap_or_else(|| "none".into());
                            if let Ok(v) = http::HeaderValue::from_str(&message) {
                                trailers.insert("grpc-message", v);
                            }
                            // What no upstream may say to the proxy's clients, in
                            // trailers as in the head.
                            for (name, value) in [
                                ("set-cookie", "_portcullis=planted; Path=/"),
                                ("alt-svc", "h2=\"other.example:443\"; ma=86400"),
                                ("x-accel-redirect", "/internal/secret"),
                            ] {
                                trailers.append(name, http::HeaderValue::from_static(value));
                            }
                            let frames = vec![
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(body)),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ];
                            let body =
                                http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                            let mut resp = http::Response::new(body);
                            resp.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/grpc"),
                            );
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    Some(a) => {
                        let Ok(s) = a.accept(s).await else { return };
                        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    (addr, seen, pki)
}

/// One gRPC-style unary call over HTTP/2 to `path`: the answer's status, body and
/// trailers.
async fn grpc_call(
    w: &World,
    path: &str,
    content_type: &str,
) -> (StatusCode, Bytes, Option<HeaderMap>) {
    let t = w.token("bb", &[]);
    let tls = tls_alpn(w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{}{path}", w.https.port()))
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, mut stream) = send.send_request(req, false).unwrap_or_else(|e| panic!("{e}"));
    // A length-prefixed message: not compressed, 3 bytes, `abc`.
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x03abc");
    stream.send_data(message, true).unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = resp.status();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = body.data().await {
        got.extend_from_slice(&d.unwrap_or_else(|e| panic!("{path}: {e}")));
    }
    let trailers = body.trailers().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    (status, Bytes::from(got), trailers)
}

fn te_seen(seen: &Seen, path: &str) -> Vec<(String, Option<String>)> {
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    seen.iter().filter(|(p, _, _)| p == path).map(|(_, v, te)| (v.clone(), te.clone())).collect()
}

/// RFC 9113 §8.2.2 allows `TE` in HTTP/2 as `trailers` alone, and gRPC clients send it
/// (`te: trailers`), as servers may require. It was removed with the hop-by-hop headers
/// for every upstream. Now a gRPC call from an HTTP/2 client reaches an h2c upstream and
/// an HTTPS upstream (ALPN `h2`) with `te: trailers`, and its answer comes back with its
/// trailers (`grpc-status`).
#[tokio::test]
async fn grpc_calls_reach_http2_upstreams_with_te_trailers_and_get_their_trailers() {
    let (h2c, h2c_seen, _) = grpc_upstream(None).await;
    let (tls, tls_seen, pki) =
        grpc_upstream(Some(vec![b"h2".to_vec(), b"http/1.1".to_vec()])).await;
    let (pki, _dir) = pki.unwrap_or_else(|| panic!("no PKI"));
    let routes = format!(
        "[[routes]]\nname = \"g\"\nmatch = {{ path_prefix = \"/g\" }}\nupstream = \"h2c://{h2c}\"\npolicy = \"api\"\n\n[[routes]]\nname = \"gt\"\nmatch = {{ path_prefix = \"/tg\" }}\nupstream = \"https://localhost:{}\"\nupstream_ca = {:?}\npolicy = \"api\"\n",
        tls.port(),
        pki.ca_path().to_string_lossy(),
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    for (path, seen) in [("/g/pkg.Echo/Say", &h2c_seen), ("/tg/pkg.Echo/Say", &tls_seen)] {
        let (status, body, trailers) = grpc_call(&w, path, "application/grpc").await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(&body[..], b"\x00\x00\x00\x00\x03abc", "{path}");
        let trailers = trailers.unwrap_or_else(|| panic!("{path}: no trailers"));
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]), "{path}");
        // An HTTP/2 upstream's trailers get the head's hygiene too.
        for name in ["set-cookie", "alt-svc", "x-accel-redirect"] {
            assert!(trailers.get(name).is_none(), "{path}: {name} passed: {trailers:?}");
        }
        assert_eq!(
            trailers.get("grpc-message").map(|v| v.as_bytes()),
            Some(&b"trailers"[..]),
            "{path}: the upstream's te"
        );
        assert_eq!(te_seen(seen, path), [("HTTP/2.0".to_string(), Some("trailers".to_string()))]);
    }
    // `application/grpc+proto` is gRPC too.
    let (status, _, trailers) = grpc_call(&w, "/tg/pkg.Echo/Proto", "application/grpc+proto").await;
    assert_eq!(status, StatusCode::OK);
    let te = trailers.and_then(|t| t.get("grpc-message").cloned());
    assert_eq!(te.as_ref().map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    let ev = w.last_event().await;
    assert_eq!(
        (ev["status"].as_u64(), ev["decision"].as_str()),
        (Some(200), Some("allow")),
        "{ev}"
    );
}

/// `TE` is hop-by-hop in HTTP/1.1: no value of it reaches an HTTP/1.1 upstream, whatever
/// the client (an HTTP/2 gRPC call, an HTTP/1.1 `TE: trailers, deflate` listed in
/// `Connection`), nor an HTTPS upstream reached over HTTP/1.1 by ALPN; and an HTTP/2
/// upstream is sent exactly `trailers`, never another coding (`TE: deflate`).
#[tokio::test]
async fn te_is_only_ever_trailers_and_only_to_http2_upstreams() {
    let (h1, h1_seen, _) = grpc_upstream(None).await;
    let (h2c, h2c_seen, _) = grpc_upstream(None).await;
    let (tls, tls_seen, pki) = grpc_upstream(Some(vec![b"http/1.1".to_vec()])).await;
    let (pki, _dir) = pki.unwrap_or_else(|| panic!("no PKI"));
    let routes = format!(
        "[[routes]]\nname = \"h1\"\nmatch = {{ path_prefix = \"/h1\" }}\nupstream = \"http://{h1}\"\npolicy = \"api\"\n\n[[routes]]\nname = \"g\"\nmatch = {{ path_prefix = \"/g\" }}\nupstream = \"h2c://{h2c}\"\npolicy = \"api\"\n\n[[routes]]\nname = \"t1\"\nmatch = {{ path_prefix = \"/t1\" }}\nupstream = \"https://localhost:{}\"\nupstream_ca = {:?}\npolicy = \"api\"\n",
        tls.port(),
        pki.ca_path().to_string_lossy(),
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    // An HTTP/2 gRPC call to an HTTP/1.1 upstream: it arrives, without TE.
    let (status, _, _) = grpc_call(&w, "/h1/pkg.Echo/Say", "application/grpc").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(te_seen(&h1_seen, "/h1/pkg.Echo/Say"), [("HTTP/1.1".to_string(), None)]);
    // A plain (not gRPC) HTTP/2 request with `te: trailers` (Firefox sends it) to an HTTPS
    // upstream that speaks HTTP/1.1 only: served over HTTP/1.1, without TE.
    let (status, _, _) = grpc_call(&w, "/t1/x", "application/json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(te_seen(&tls_seen, "/t1/x"), [("HTTP/1.1".to_string(), None)]);
    // A gRPC call needs HTTP/2: to that upstream it is refused (502), never sent over
    // HTTP/1.1 with or without its `te: trailers`.
    let (status, _, _) = grpc_call(&w, "/t1/pkg.Echo/Say", "application/grpc").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(te_seen(&tls_seen, "/t1/pkg.Echo/Say"), []);

    let t = w.token("bb", &[]);
    let port = w.https.port();
    for (path, te, want) in [
        ("/h1/a", "trailers, deflate", None),
        ("/g/b", "deflate, trailers;q=0.5", Some("trailers")),
        ("/g/c", "deflate", None),
    ] {
        let mut s = tls_alpn(&w, b"http/1.1").await;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {t}\r\nTE: {te}\r\nConnection: TE, close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        use tokio::io::AsyncReadExt;
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200 "), "{path}: {out}");
        let seen = if path.starts_with("/h1") { &h1_seen } else { &h2c_seen };
        let got = te_seen(seen, path);
        assert_eq!(got.len(), 1, "{path}: {got:?}");
        assert_eq!(got[0].1.as_deref(), want, "{path}: TE {te}");
    }
}
