//! `server.max_connections_per_client`: one source address holding its limit of idle
//! connections cannot open one more (it is reset at once) while another address is
//! still served, and closing one frees its place. The count is shared by the HTTP and
//! database listeners and held by a WebSocket tunnel as long as its connection's slot.
//! The second source is 127.0.0.2 (Linux routes all of 127/8 to `lo`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::forwarding::ws_connect;
use crate::support::*;

const FIRST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const SECOND: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection to `to` from the address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    sock.bind(SocketAddr::new(from, 0)).unwrap_or_else(|e| panic!("bind {from}: {e}"));
    sock.connect(to).await.unwrap_or_else(|e| panic!("connect {to} from {from}: {e}"))
}

/// An HTTP/1.1 connection kept open after one request was answered on it.
struct Held {
    _send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// One request on a new plain-HTTP connection from `from`; the connection stays open in
/// the `Held` it returns. `Err` when the proxy closed it unanswered.
async fn request_from(w: &World, to: SocketAddr, from: IpAddr) -> Result<Held, String> {
    let tcp = connect_from(from, to).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get("/held")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", w.token("bb", &[])))
        .body(Empty::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let answered = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await;
    let resp = match answered {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("not answered: {e}")),
        Err(_) => panic!("neither answered nor closed within 5 s"),
    };
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
    Ok(Held { _send: send, conn })
}

/// Polls (every 50 ms, at most 5 s) until a request from `from` is answered.
async fn served_eventually(w: &World, to: SocketAddr, from: IpAddr) -> Held {
    for _ in 0..100 {
        if let Ok(h) = request_from(w, to, from).await {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("a connection from {from} was still refused after 5 s");
}

/// `portcullis_connections_refused_total{reason="per-client-limit"}`.
async fn refused(w: &World) -> u64 {
    let name = "portcullis_connections_refused_total{reason=\"per-client-limit\"} ";
    let m = w.admin_get("/metrics").await.text();
    m.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| {
        panic!("no {name} in /metrics");
    })
}

/// A PostgreSQL connection from `from` is served: its SSLRequest is answered (`S` or
/// `N`, one byte) rather than the connection closed. Nothing upstream is needed for that.
async fn pg_answers(to: SocketAddr, from: IpAddr) -> Option<TcpStream> {
    let mut tcp = connect_from(from, to).await;
    let ssl =
        portcullis::postgres::proto::startup_packet(portcullis::postgres::proto::SSL_REQUEST, &[]);
    tcp.write_all(&ssl).await.ok()?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut b)).await {
        Ok(Ok(1)) => Some(tcp),
        Ok(_) => None,
        Err(_) => panic!("a database connection from {from} neither answered nor closed"),
    }
}

#[tokio::test]
async fn one_address_at_its_limit_is_refused_while_another_is_served() {
    const LIMIT: usize = 3;
    let w = World::with(Setup {
        listen_extra: "insecure_http = \"127.0.0.1:0\"".into(),
        server_extra: format!("max_connections_per_client = {LIMIT}"),
        ..Setup::default()
    })
    .await;
    let plain = w.server().bound().insecure_http.unwrap_or_else(|| panic!("no plain listener"));
    let before = refused(&w).await;

    // LIMIT idle keep-alive connections from one address, each answered once.
    let mut held = Vec::new();
    for i in 0..LIMIT {
        let h = request_from(&w, plain, FIRST).await;
        held.push(h.unwrap_or_else(|e| panic!("connection {i} of {LIMIT}: {e}")));
    }
    // One more from it is closed unanswered, and counted; over TLS too (no handshake).
    assert!(request_from(&w, plain, FIRST).await.is_err(), "served beyond its limit");
    assert!(refused(&w).await > before, "the refusal is not in /metrics");
    let tls = tokio::time::timeout(Duration::from_secs(5), async {
        let tcp = connect_from(FIRST, w.https).await;
        let name =
            rustls_pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_client(&w)))
            .connect(name, tcp)
            .await
    })
    .await
    .unwrap_or_else(|_| panic!("the TLS handshake was neither done nor refused"));
    assert!(tls.is_err(), "a TLS handshake beyond the limit");

    // Another address is served meanwhile, up to its own limit.
    let mut others = Vec::new();
    for _ in 0..LIMIT {
        let h = request_from(&w, plain, SECOND).await;
        others.push(h.unwrap_or_else(|e| panic!("another address was refused: {e}")));
    }

    // Closing one of the first address's connections frees its place.
    held.pop();
    held.push(served_eventually(&w, plain, FIRST).await);
    assert!(request_from(&w, plain, FIRST).await.is_err(), "at its limit again");
    drop(others);
}

/// The WebSocket tunnel holds its connection's place, as it holds its slot: the upgraded
/// connection's task has ended, the tunnel has not.
#[tokio::test]
async fn a_websocket_tunnel_keeps_its_place_in_its_clients_count() {
    let w = World::with(Setup {
        listen_extra: "insecure_http = \"127.0.0.1:0\"".into(),
        server_extra: "max_connections_per_client = 1".into(),
        ..Setup::default()
    })
    .await;
    let plain = w.server().bound().insecure_http.unwrap_or_else(|| panic!("no plain listener"));
    let mut ws = ws_connect(&w, Some(&w.token("bb", &[]))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(request_from(&w, plain, FIRST).await.is_err(), "served beside the tunnel");
    assert!(request_from(&w, plain, SECOND).await.is_ok());
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    drop(ws);
    served_eventually(&w, plain, FIRST).await;
}

/// Database sessions count with HTTP connections, and are refused the same way.
#[tokio::test]
async fn database_sessions_share_their_clients_count_with_http_connections() {
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pw = secrets.path().join("app");
    write(&pw, "unused\n");
    // No PostgreSQL server behind it: the connections here never get past the SSLRequest.
    let routes = format!(
        "[[databases]]\nname = \"appdb\"\nlisten = \"127.0.0.1:0\"\nupstream = \"postgres://127.0.0.1:9\"\n\
         upstream_user = \"app\"\npassword_file = {}\npolicy = \"pg\"\nstartup_timeout = \"30s\"\n",
        toml::Value::String(pw.to_string_lossy().into_owned())
    );
    let w = World::with(Setup {
        routes,
        policies: vec![("api".into(), ALLOW_ALL_PRESETS.into()), ("pg".into(), PG_POLICY.into())],
        listen_extra: "insecure_http = \"127.0.0.1:0\"".into(),
        server_extra: "max_connections_per_client = 2".into(),
        ..Setup::default()
    })
    .await;
    let plain = w.server().bound().insecure_http.unwrap_or_else(|| panic!("no plain listener"));
    let db = w.server().bound().databases.first().map(|d| d.1).unwrap_or_else(|| panic!("no db"));
    let before = refused(&w).await;

    let http = request_from(&w, plain, FIRST).await.unwrap_or_else(|e| panic!("{e}"));
    let session = pg_answers(db, FIRST).await.unwrap_or_else(|| panic!("first session refused"));
    // The address has two: a third is refused on either listener.
    assert!(pg_answers(db, FIRST).await.is_none(), "a session beyond the limit");
    assert!(request_from(&w, plain, FIRST).await.is_err(), "a connection beyond the limit");
    assert!(refused(&w).await >= before + 2);
    // Another address is served.
    let other = pg_answers(db, SECOND).await;
    assert!(other.is_some(), "another address's session was refused");

    // The session ends: its place is free for a session or a connection.
    drop(session);
    let mut again = None;
    for _ in 0..100 {
        again = pg_answers(db, FIRST).await;
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "the ended session's place was not freed");
    drop((http, again));
    served_eventually(&w, plain, FIRST).await;
}

/// The database route's policy (never reached: no session here gets past its SSLRequest).
const PG_POLICY: &str = r#"
[[rule]]
id = "pipelines"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = "main" }
databases = ["appdb"]
"#;

/// A client configuration trusting the dev CA, HTTP/1.1.
fn tls_client(w: &World) -> rustls::ClientConfig {
    let mut tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(w.pki.root_store()).with_no_client_auth())
        .unwrap_or_else(|e| panic!("{e}"));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls
}

/// A reload sets the limit for the next connections. Those already open were counted
/// while there was none, so they count against it; none of them is closed.
#[tokio::test]
async fn a_reload_sets_the_limit_for_new_connections_counting_those_open() {
    let w = World::with(Setup {
        listen_extra: "insecure_http = \"127.0.0.1:0\"".into(),
        server_extra: "max_connections_per_client = 0".into(),
        ..Setup::default()
    })
    .await;
    let plain = w.server().bound().insecure_http.unwrap_or_else(|| panic!("no plain listener"));
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(request_from(&w, plain, FIRST).await.unwrap_or_else(|e| panic!("#{i}: {e}")));
    }
    let text = std::fs::read_to_string(w.config_path()).unwrap_or_else(|e| panic!("{e}"));
    let limited = text.replace("max_connections_per_client = 0", "max_connections_per_client = 2");
    assert_ne!(text, limited);
    write(&w.config_path(), &limited);
    assert!(w.server().reload().await);
    let reload =
        w.events().into_iter().rfind(|e| e["kind"] == "reload" && e["outcome"] == "loaded");
    let reload = reload.unwrap_or_else(|| panic!("no reload event"));
    assert_eq!(reload["restart_required"], serde_json::json!([]), "{reload}");

    assert!(request_from(&w, plain, FIRST).await.is_err(), "three open, the limit two");
    assert!(!held.iter().any(|h| h.conn.is_finished()), "a reload closed a connection");
    held.truncate(1);
    served_eventually(&w, plain, FIRST).await;
}
