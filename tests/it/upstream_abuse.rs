//! A hostile or broken upstream behind one route, against the proxy, its other routes and
//! callers, and the audit trail: a response body that stops coming, and answer headers
//! that would speak for the proxy's origin.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::forwarding::tls_alpn;
use crate::support::*;

/// A raw upstream that answers each connection's first request with `answer(head)`: a
/// list of writes, each after a pause (`Duration::ZERO`: at once); then it keeps the
/// connection open for 60 s without a byte more (a hung upstream, not a closed one), and
/// reads nothing more: an answer that ends says `connection: close`.
async fn raw_stalling(
    answer: impl Fn(&str) -> Vec<(Duration, Vec<u8>)> + Copy + Send + 'static,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else { return };
                for (pause, bytes) in answer(&head) {
                    tokio::time::sleep(pause).await;
                    if s.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    (addr, task)
}

/// A world whose route `s` (`/s…`) goes to `addr` with `read_timeout = "1s"`.
async fn world_to(addr: std::net::SocketAddr) -> World {
    let routes = format!(
        "[[routes]]\nname = \"s\"\nmatch = {{ path_prefix = \"/s\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\nread_timeout = \"1s\"\n"
    );
    World::with(Setup { routes, ..Setup::default() }).await
}

/// The one event of `path`, once written (`Null` if none comes within 10 s).
async fn event_at(w: &World, path: &str) -> serde_json::Value {
    for _ in 0..500 {
        let same: Vec<serde_json::Value> =
            w.events().into_iter().filter(|e| e["path"] == path).collect();
        if let [one] = same.as_slice() {
            return one.clone();
        }
        assert!(same.len() < 2, "more than one event: {same:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serde_json::Value::Null
}

/// An upstream that sends its answer's head and part of its body, then nothing, while
/// keeping the connection: the proxy waited on it for as long as the client did (a
/// browser or an HTTP library without a read timeout: forever), holding the client's
/// connection, its `max_connections` slot and the upstream socket, and the request had
/// no audit event until the client gave up. The route's `read_timeout` now cuts the body
/// (the client sees it broken off, never a complete answer: no closing chunk), and the
/// event says `upstream-timeout` with the status and the bytes actually sent.
#[tokio::test]
async fn a_response_body_that_stops_coming_is_cut_after_read_timeout_and_audited() {
    let (addr, upstream) = raw_stalling(|head| {
        let answer: &[u8] = if head.starts_with("GET /s/chunked ") {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello"
        };
        vec![(Duration::ZERO, answer.to_vec())]
    })
    .await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    for path in ["/s/length", "/s/chunked"] {
        let mut s = tls_alpn(&w, b"http/1.1").await;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut out)).await;
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out);
        assert!(read.is_ok(), "{path}: the proxy still waits on the upstream: {text}");
        assert!(took < Duration::from_secs(4), "{path}: cut after {took:?}");
        assert!(text.starts_with("HTTP/1.1 200 "), "{path}: {text}");
        assert!(text.contains("hello"), "{path}: {text}");
        assert!(!text.ends_with("0\r\n\r\n"), "{path}: a cut body framed as complete: {text}");
        let ev = event_at(&w, path).await;
        assert_eq!(ev["reason"], "upstream-timeout", "{path}: {ev}");
        assert_eq!(ev["status"], 200, "{path}: the status sent: {ev}");
        assert_eq!(ev["decision"], "allow", "{path}: {ev}");
        assert_eq!(ev["bytes_out"], 5, "{path}: {ev}");
        assert!(ev["detail"].as_str().unwrap_or_default().contains("read_timeout"), "{ev}");
    }

    // HTTP/2: the stream is reset, the connection and its other streams live on.
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let req = |path: &str| {
        http::Request::builder()
            .uri(format!("https://localhost:{}{path}", w.https.port()))
            .header("authorization", format!("Bearer {t}"))
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (resp, _) = send.send_request(req("/s/h2"), true).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(d) = body.data().await {
            match d {
                Ok(d) => got.extend_from_slice(&d),
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await;
    let reset = ended.unwrap_or_else(|_| panic!("HTTP/2: the proxy still waits on the upstream"));
    assert!(reset.is_some_and(|e| e.is_reset()), "HTTP/2: the cut body ended cleanly");
    assert_eq!(got, b"hello");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    let ev = event_at(&w, "/s/h2").await;
    assert_eq!(ev["reason"], "upstream-timeout", "{ev}");
    assert_eq!((ev["status"].as_u64(), ev["bytes_out"].as_u64()), (Some(200), Some(5)), "{ev}");
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, _) = send.send_request(req("/s/length"), true).unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("the connection went with the stream: {e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    upstream.abort();
}

/// `read_timeout` counts only time spent waiting on the upstream: a body whose parts come
/// more often than that (a stream's heartbeats) goes through whole however long it lasts,
/// and so does a body the client takes nothing of for longer than that before reading it.
#[tokio::test]
async fn read_timeout_cuts_neither_a_steady_stream_nor_a_slow_reader() {
    const BIG: usize = 4 * 1024 * 1024;
    let (addr, upstream) = raw_stalling(|head| {
        if head.starts_with("GET /s/steady ") {
            let mut parts = vec![(
                Duration::ZERO,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    .to_vec(),
            )];
            for _ in 0..5 {
                parts.push((Duration::from_millis(500), b"4\r\ntick\r\n".to_vec()));
            }
            parts.push((Duration::ZERO, b"0\r\n\r\n".to_vec()));
            parts
        } else {
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\nconnection: close\r\n\r\n")
                    .into_bytes();
            answer.resize(answer.len() + BIG, b'x');
            vec![(Duration::ZERO, answer)]
        }
    })
    .await;
    let w = world_to(addr).await;
    let t = w.token("bb", &[]);
    let r = w.get("/s/steady", Some(&t)).await;
    assert_eq!(r.status, http::StatusCode::OK);
    assert_eq!(r.text(), "ticktickticktick".to_string() + "tick");
    assert_eq!(event_at(&w, "/s/steady").await["reason"], "allowed");

    let mut s = tls_alpn(&w, b"http/1.1").await;
    let req =
        format!("GET /s/big HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the answer did not end: {} bytes", out.len());
    assert!(out.len() > BIG, "cut at {} bytes", out.len());
    let ev = event_at(&w, "/s/big").await;
    assert_eq!(ev["reason"], "allowed", "{ev}");
    assert_eq!(ev["bytes_out"], BIG, "{ev}");
    upstream.abort();
}

/// An upstream's `Alt-Svc` would send the browser's later connections to the proxy's
/// origin (every route on the host) to another server: any holder of a certificate valid
/// for the name (a wildcard certificate's other hosts) would get every route's requests,
/// session cookie included, without the proxy; its `NEL` would have the browser report
/// every request to the origin, each route's URL with its query, to the upstream's
/// collector, for a year. One route's upstream owns neither: both are dropped (in
/// trailers too). The application's other headers, `Strict-Transport-Security` and
/// `Report-To` among them (the latter now names no `NEL` policy), pass.
#[tokio::test]
async fn an_upstream_cannot_set_origin_wide_alt_svc_or_nel() {
    let (addr, upstream) = raw_answering(|_| {
        concat!(
            "HTTP/1.1 200 OK\r\n",
            "Alt-Svc: h2=\"evil.example:443\"; ma=31536000, h3=\":8443\"\r\n",
            "NEL: {\"report_to\":\"x\",\"max_age\":31536000,\"include_subdomains\":true,\"success_fraction\":1.0}\r\n",
            "Report-To: {\"group\":\"x\",\"max_age\":31536000,\"endpoints\":[{\"url\":\"https://evil.example/r\"}]}\r\n",
            "Strict-Transport-Security: max-age=63072000\r\n",
            "X-App: 1\r\n",
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            "2\r\nok\r\n0\r\nAlt-Svc: h2=\"evil.example:443\"\r\nNEL: {}\r\nX-Trailer: 1\r\n\r\n",
        )
        .into()
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"o\"\nmatch = {{ path_prefix = \"/o\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let r = w.get("/o/page", Some(&t)).await;
    assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "ok");
    assert!(r.headers.get("alt-svc").is_none(), "{:?}", r.headers);
    assert!(r.headers.get("nel").is_none(), "{:?}", r.headers);
    for kept in ["x-app", "strict-transport-security", "report-to"] {
        assert!(r.headers.get(kept).is_some(), "{kept}: {:?}", r.headers);
    }

    // The trailers, over HTTP/2 (the proxy's HTTP/1.1 server sends none).
    let tls = tls_alpn(&w, b"h2").await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .uri(format!("https://localhost:{}/o/page", w.https.port()))
        .header("authorization", format!("Bearer {t}"))
        .header("te", "trailers")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut send = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let (resp, _) = send.send_request(req, true).unwrap_or_else(|e| panic!("{e}"));
    let resp = resp.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert!(resp.headers().get("alt-svc").is_none(), "{:?}", resp.headers());
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        d.unwrap_or_else(|e| panic!("the answer was cut: {e}"));
    }
    let trailers = body.trailers().await.unwrap_or_else(|e| panic!("the answer was cut: {e}"));
    let trailers = trailers.unwrap_or_else(|| panic!("no trailers"));
    assert!(trailers.get("x-trailer").is_some(), "{trailers:?}");
    assert!(trailers.get("alt-svc").is_none(), "{trailers:?}");
    assert!(trailers.get("nel").is_none(), "{trailers:?}");
    upstream.abort();
}

/// `Service-Worker-Allowed` widens the scope a service worker may be registered for. An
/// upstream behind the prefix `/a` answering `Service-Worker-Allowed: /` for its script
/// lets one of its pages register a worker for the whole host, through which every other
/// route's pages then load (answered or read by it, with the caller's session, on every
/// later visit). Only a scope strictly under the route's prefix passes; a `strip_prefix`
/// route's upstream, which knows nothing of its prefix, has its `/` mapped under it. A
/// script served at the prefix itself (`/a`, whose directory is `/`) is held to the route
/// by a `Service-Worker-Allowed: /a/` of the proxy's.
#[tokio::test]
async fn a_service_worker_scope_never_reaches_past_the_routes_prefix() {
    let (addr, upstream) = raw_answering(|head| {
        let scope = head
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|p| p.split_once("scope="))
            .map_or("/", |(_, s)| s)
            .to_string();
        let allowed = match scope.as_str() {
            "none" => String::new(),
            scope => format!("Service-Worker-Allowed: {scope}\r\n"),
        };
        format!("HTTP/1.1 200 OK\r\n{allowed}Content-Type: text/javascript\r\nContent-Length: 2\r\nConnection: close\r\n\r\n//")
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"a\"\nmatch = {{ path_prefix = \"/a\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n\n\
         [[routes]]\nname = \"billing\"\nmatch = {{ path_prefix = \"/billing\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\nstrip_prefix = true\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    for (path, want) in [
        ("/a/sw.js?scope=/", None),
        ("/a/sw.js?scope=/admin/", None),
        ("/a/sw.js?scope=/a", None),
        ("/a/sw.js?scope=/a/../", None),
        ("/a/sw.js?scope=/a/", Some("/a/")),
        ("/a/sw.js?scope=/a/app/", Some("/a/app/")),
        ("/billing/sw.js?scope=/", Some("/billing/")),
        ("/billing/sw.js?scope=/app/", Some("/billing/app/")),
    ] {
        let r = w.get(path, Some(&t)).await;
        assert_eq!(r.status, http::StatusCode::OK, "{path}: {}", r.text());
        let got = r.headers.get("service-worker-allowed").and_then(|v| v.to_str().ok());
        assert_eq!(got, want, "{path}");
    }

    // A script served at the prefix itself may take its directory, `/`, by default: a
    // script fetch (`Service-Worker: script`) whose directory is outside the route is
    // held to it; other answers, and scripts inside the route, are left alone.
    let auth = format!("Bearer {t}");
    for (path, script, want) in [
        ("/a?scope=none", true, Some("/a/")),
        ("/a?scope=/", true, Some("/a/")),
        ("/a/?scope=none", true, None),
        ("/a/sw.js?scope=none", true, None),
        ("/a?scope=none", false, None),
    ] {
        let mut h = vec![("authorization", auth.as_str())];
        if script {
            h.push(("service-worker", "script"));
        }
        let r = w.send(http::Method::GET, path, &h, bytes::Bytes::new()).await;
        assert_eq!(r.status, http::StatusCode::OK, "{path}: {}", r.text());
        let got = r.headers.get("service-worker-allowed").and_then(|v| v.to_str().ok());
        assert_eq!(got, want, "{path} (script fetch: {script})");
    }
    upstream.abort();
}

/// nginx in front of the proxy (terminating TLS; a `trusted_proxies` set-up), started for
/// the test on a free loopback port with `extra` in its `server` block, passing every
/// other path to the proxy at `https`. `None` (the test skips) without an `nginx` binary,
/// unless `PORTCULLIS_REQUIRE_INTEROP` is set. Killed on drop.
struct Nginx {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    async fn start(https: std::net::SocketAddr, extra: &str) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var("PORTCULLIS_REQUIRE_INTEROP").is_err(),
                "nginx missing but PORTCULLIS_REQUIRE_INTEROP is set"
            );
            eprintln!("SKIPPED: nginx in front (apt-get install nginx)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let port = free_port();
        let d = dir.path().display().to_string();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{}}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
             server {{\n  listen 127.0.0.1:{port};\n\
               location / {{ proxy_pass https://{https}; proxy_http_version 1.1; proxy_set_header Host localhost; proxy_ssl_server_name on; proxy_ssl_name localhost; proxy_ssl_verify off; }}\n\
               {extra}\n }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        write(&path, &conf);
        let child = std::process::Command::new(bin)
            .args(["-p", &d, "-e", &format!("{d}/error.log"), "-c"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nginx: {e}"));
        let log = dir.path().join("error.log");
        let nginx = Nginx { child, port, _dir: dir };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(nginx);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nginx did not start: {}", std::fs::read_to_string(log).unwrap_or_default());
    }

    /// One plain HTTP/1.1 exchange through nginx: everything it sends back.
    async fn exchange(&self, req: &str) -> String {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        raw_exchange(s, req).await
    }
}

/// With nginx in front of the proxy, a route's upstream answering
/// `X-Accel-Redirect: /internal/…` had nginx serve its client from an `internal` location
/// instead (nginx honours the header from any `proxy_pass` upstream, and the proxy passed
/// it on): one kept for another application's protected files, or proxying to a service
/// the proxy guards, outside every route and policy, audited as this route's answer.
/// The proxy drops `X-Accel-Redirect` and the `X-Sendfile` family; the upstream's own
/// answer reaches the client, and its other `X-Accel-*` hints (`X-Accel-Buffering: no`
/// for an event stream) still reach nginx.
#[tokio::test]
async fn an_upstream_cannot_redirect_a_web_server_in_front_of_the_proxy() {
    let (addr, upstream) = raw_answering(|_| {
        concat!(
            "HTTP/1.1 200 OK\r\n",
            "X-Accel-Redirect: /internal/files\r\n",
            "X-Sendfile: /etc/passwd\r\n",
            "X-LIGHTTPD-send-file: /etc/passwd\r\n",
            "X-Accel-Buffering: no\r\n",
            "Content-Length: 3\r\nConnection: close\r\n\r\napp",
        )
        .into()
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"x\"\nmatch = {{ path_prefix = \"/x\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup {
        routes,
        listen_extra: "trusted_proxies = [\"127.0.0.1/32\"]".into(),
        ..Setup::default()
    })
    .await;
    let t = w.token("bb", &[]);
    let internal = "location /internal/ { internal; return 200 \"INTERNAL-SECRET\"; }";
    let Some(nginx) = Nginx::start(w.https, internal).await else { return };
    let resp = nginx
        .exchange(&format!(
            "GET /x/page HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    assert!(!resp.contains("INTERNAL-SECRET"), "nginx served its internal location: {resp}");
    assert!(resp.ends_with("app"), "{resp}");
    // And straight from the proxy: none of them, the buffering hint kept.
    let r = w.get("/x/page", Some(&t)).await;
    for gone in ["x-accel-redirect", "x-sendfile", "x-lighttpd-send-file"] {
        assert!(r.headers.get(gone).is_none(), "{gone}: {:?}", r.headers);
    }
    assert_eq!(r.headers.get("x-accel-buffering").map(|v| v.as_bytes()), Some(&b"no"[..]));
    upstream.abort();
}

/// A keep-alive upstream answering `/m/<case>` with the malformed or hostile answer of
/// that name ([`malformed`]) and anything else with `ok`, reading requests on each
/// connection for as long as it stays open.
async fn malformed_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut s).await {
                    let path = head.split(' ').nth(1).unwrap_or_default();
                    let answer = malformed(path.trim_start_matches("/m/"));
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// The answer of each case: `LEAKED` marks bytes that must never reach any client.
fn malformed(case: &str) -> Vec<u8> {
    let head = |h: &str| format!("HTTP/1.1 200 OK\r\n{h}\r\n\r\n").into_bytes();
    match case {
        // A second answer queued behind a complete one, for the next caller.
        "queued" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nLEAKED".to_vec(),
        "informational-body" => b"HTTP/1.1 103 Early Hints\r\ncontent-length: 6\r\n\r\nLEAKEDHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        "informational-after" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 100 Continue\r\n\r\n".to_vec(),
        "length-list" => [head("content-length: 2, 8"), b"okLEAKED".to_vec()].concat(),
        "length-twice" => [head("content-length: 2\r\ncontent-length: 8"), b"okLEAKED".to_vec()].concat(),
        "length-negative" => [head("content-length: -1"), b"LEAKED".to_vec()].concat(),
        "length-huge" => [head("content-length: 99999999999999999999999"), b"LEAKED".to_vec()].concat(),
        "length-plus" => [head("content-length: +6"), b"LEAKED".to_vec()].concat(),
        "chunked-http10" => b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nLEAKED\r\n0\r\n\r\n".to_vec(),
        "obs-fold" => [head("x-a: 1\r\n x-b: 2\r\ncontent-length: 6"), b"LEAKED".to_vec()].concat(),
        "bare-cr" => b"HTTP/1.1 200 OK\rx-a: 1\r\ncontent-length: 6\r\n\r\nLEAKED".to_vec(),
        "nul" => [head("x-a: a\0b\r\ncontent-length: 6"), b"LEAKED".to_vec()].concat(),
        "control-in-location" => b"HTTP/1.1 302 Found\r\nlocation: /x\x0b/y\r\ncontent-length: 6\r\n\r\nLEAKED".to_vec(),
        "many-headers" => {
            let fields: Vec<String> = (0..200).map(|i| format!("x-h{i}: 1")).collect();
            [head(&(fields.join("\r\n") + "\r\ncontent-length: 6")), b"LEAKED".to_vec()].concat()
        }
        "huge-header" => {
            [head(&format!("x-big: {}\r\ncontent-length: 6", "a".repeat(600_000))), b"LEAKED".to_vec()]
                .concat()
        }
        "switching-unasked" => b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nLEAKED".to_vec(),
        "chunk-overflow" => [head("transfer-encoding: chunked"), b"FFFFFFFFFFFFFFFFF1\r\nLEAKED\r\n0\r\n\r\n".to_vec()].concat(),
        "chunk-bare-lf" => [head("transfer-encoding: chunked"), b"6\nLEAKED\n0\n\n".to_vec()].concat(),
        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
    }
}

/// Malformed and hostile answers from a keep-alive upstream on the proxy's own pool: each
/// is refused (502 `upstream-unavailable`, the cause in the event), or, its head already
/// relayed, cut (`upstream-aborted`), or read as the one answer it frames; none of its
/// bytes (`LEAKED`) reaches its client or the callers after it on the route, which get
/// their own answers at once and a moment later. Pins what the HTTP layer refuses (a
/// `Content-Length` list or pair that disagrees, a sign, a `Transfer-Encoding` in an
/// HTTP/1.0 answer, obs-fold, a bare CR, a NUL or other control byte in a value, more
/// than 100 fields or a head over 400 KB, a chunk size over 64 bits, a chunk line without
/// its CR) and what it drops (1xx answers, bytes after an answer).
#[tokio::test]
async fn malformed_upstream_answers_never_reach_a_caller() {
    let (addr, upstream) = malformed_upstream().await;
    let routes = format!(
        "[[routes]]\nname = \"m\"\nmatch = {{ path_prefix = \"/m\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let refused = [
        "informational-body",
        "length-list",
        "length-twice",
        "length-negative",
        "length-huge",
        "length-plus",
        "chunked-http10",
        "obs-fold",
        "bare-cr",
        "nul",
        "control-in-location",
        "many-headers",
        "huge-header",
        "switching-unasked",
    ];
    let cut = ["chunk-overflow", "chunk-bare-lf"];
    let read = ["queued", "informational-after"];
    for case in refused.iter().chain(&cut).chain(&read) {
        let path = format!("/m/{case}");
        let resp = raw_h1(&w, &path, &t).await;
        assert!(!resp.contains("LEAKED"), "{case}: {resp}");
        let ev = event_at(&w, &path).await;
        let (status, reason) = (ev["status"].as_u64(), ev["reason"].as_str());
        if refused.contains(case) {
            assert!(resp.starts_with("HTTP/1.1 502 "), "{case}: {resp}");
            assert_eq!((status, reason), (Some(502), Some("upstream-unavailable")), "{case}: {ev}");
        } else if cut.contains(case) {
            // The head may not have left before the body failed: then the client gets
            // the connection closed, and no answer at all.
            assert!(resp.is_empty() || resp.starts_with("HTTP/1.1 200 "), "{case}: {resp}");
            assert_eq!((status, reason), (Some(200), Some("upstream-aborted")), "{case}: {ev}");
        } else {
            assert!(
                resp.starts_with("HTTP/1.1 200 ") && resp.ends_with("\r\n\r\nok"),
                "{case}: {resp}"
            );
            assert_eq!((status, reason), (Some(200), Some("allowed")), "{case}: {ev}");
        }
        for wait in [0, 0, 50] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let next = w.get("/m/ok", Some(&t)).await;
            assert_eq!(next.text(), "ok", "{case}: the next caller got another answer");
        }
    }
    upstream.abort();
}

/// One HTTP/1.1 request for `path` over TLS with `Connection: close`: everything the
/// proxy sends back until it closes the connection (or 5 s pass).
async fn raw_h1(w: &World, path: &str, token: &str) -> String {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    raw_exchange(tls_alpn(w, b"http/1.1").await, &req).await
}

/// An upstream's proxy-authentication fields are for the next client on its chain, the
/// proxy, alone (RFC 9110 §11.7): `Proxy-Authenticate` was removed, but its companion
/// `Proxy-Authentication-Info` reached the client, which takes `Proxy-Authorization`
/// for the proxy's own credential. Both stay with the proxy; the application's own
/// `WWW-Authenticate` and `Authentication-Info` pass.
#[tokio::test]
async fn an_upstreams_proxy_authentication_fields_stay_with_the_proxy() {
    let (addr, upstream) = raw_answering(|_| {
        concat!(
            "HTTP/1.1 401 Unauthorized\r\n",
            "WWW-Authenticate: Basic realm=\"app\"\r\n",
            "Authentication-Info: nextnonce=\"a\"\r\n",
            "Proxy-Authenticate: Basic realm=\"proxy\"\r\n",
            "Proxy-Authentication-Info: nextnonce=\"b\"\r\n",
            "Content-Length: 2\r\nConnection: close\r\n\r\nno",
        )
        .into()
    })
    .await;
    let routes = format!(
        "[[routes]]\nname = \"pa\"\nmatch = {{ path_prefix = \"/pa\" }}\nupstream = \"http://{addr}\"\npolicy = \"api\"\n"
    );
    let w = World::with(Setup { routes, ..Setup::default() }).await;
    let t = w.token("bb", &[]);
    let r = w.get("/pa/x", Some(&t)).await;
    assert_eq!(r.status, http::StatusCode::UNAUTHORIZED);
    for gone in ["proxy-authenticate", "proxy-authentication-info"] {
        assert!(r.headers.get(gone).is_none(), "{gone}: {:?}", r.headers);
    }
    for kept in ["www-authenticate", "authentication-info"] {
        assert!(r.headers.get(kept).is_some(), "{kept}: {:?}", r.headers);
    }
    upstream.abort();
}
