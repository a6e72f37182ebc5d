//! The echo upstream behind `portcullis demo` and the integration tests.
//!
//! Plain HTTP, HTTP/1.1 and h2c (prior knowledge) on one port. What it answers:
//!
//! | request             | answer                                                             |
//! |---------------------|--------------------------------------------------------------------|
//! | anything else       | 200 JSON: `method`, `path`, `query`, `version`, `authority`,       |
//! |                     | `headers` (`{name: [values…]}`), `body_bytes` (body read and counted), |
//! |                     | `trailers` (like `headers`)                                        |
//! | `GET /stream/{n}`   | `n` bytes, produced in 16 KiB chunks as the client reads; byte `i` is |
//! |                     | [`stream_byte`]`(i)`                                               |
//! | `POST /echo-body`   | the request body, streamed straight back as it arrives             |
//! | `/status/{code}`    | that status (200–599)                                              |
//! | `/slow/{ms}`        | sleeps, then the JSON echo (counted as it arrives: [`EchoServer::slow_arrived`]) |
//! | `GET /ws`           | WebSocket (HTTP/1.1 upgrade) that echoes text and binary messages  |
//! | `/close`            | drops the connection without answering (HTTP/2: resets the stream) |
//! | `/set-cookie/{a,b}` | 200 with one `Set-Cookie: {name}=upstream; Path=/` per listed name    |
//!
//! The JSON echo is how tests see what the proxy forwarded: which identity headers arrived,
//! that spoofed and hop-by-hop headers did not, that the caller's token stayed behind.
//! Never expose this server beyond loopback: it reflects every header it gets.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Chunk size for `/stream/{n}`.
const STREAM_CHUNK: usize = 16 * 1024;
/// Longest `/slow/{ms}` sleep: ten minutes is longer than any sane timeout under test.
const MAX_SLOW: Duration = Duration::from_secs(600);

type EchoBody = UnsyncBoxBody<Bytes, io::Error>;

/// A running echo server. Dropping it stops accepting and closes every connection, including
/// WebSocket sessions.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    /// Dropped with the server: every task waits on a receiver and ends when this goes.
    _shutdown: watch::Sender<()>,
    /// How many `/slow/{ms}` requests have arrived so far ([`EchoServer::slow_arrived`]).
    slow: watch::Receiver<u64>,
}

/// The JSON echo of one request.
#[derive(Debug, Serialize)]
struct Echo {
    method: String,
    path: String,
    query: Option<String>,
    version: String,
    authority: Option<String>,
    headers: BTreeMap<String, Vec<String>>,
    body_bytes: u64,
    /// Request trailers, like `headers` (empty when none came).
    trailers: BTreeMap<String, Vec<String>>,
}

/// Ends the connection without a response (`/close`).
#[derive(Debug, thiserror::Error)]
#[error("closing the connection without a response, as asked")]
struct CloseConnection;

/// Byte `i` of a `/stream/{n}` body. The period, 251, is prime, so a lost, repeated or
/// reordered chunk of any power-of-two size changes what a client sees.
pub fn stream_byte(i: u64) -> u8 {
    // Cannot truncate: the remainder is below 251.
    (i % 251) as u8
}

// === impl EchoServer ===

impl EchoServer {
    /// Binds `addr` (port 0 picks a free port) and serves until dropped. Must be called inside
    /// a tokio runtime.
    pub async fn start(addr: SocketAddr) -> io::Result<EchoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, stopped) = watch::channel(());
        let (arrived, slow) = watch::channel(0);
        tokio::spawn(accept_loop(listener, stopped, arrived));
        Ok(EchoServer { addr, _shutdown: shutdown, slow })
    }

    /// Waits, at most `within`, until `n` `/slow/{ms}` requests in all have arrived (each
    /// counted before its sleep); false if fewer came in time. A test that acts while a
    /// request is in flight (a reload, a shutdown, a signal) waits on this rather than on a
    /// guess at how long the request takes to get here, which load makes wrong.
    pub async fn slow_arrived(&self, n: u64, within: Duration) -> bool {
        let mut slow = self.slow.clone();
        let arrived = tokio::time::timeout(within, slow.wait_for(|c| *c >= n)).await;
        matches!(arrived, Ok(Ok(_)))
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    mut stopped: watch::Receiver<()>,
    slow: watch::Sender<u64>,
) {
    loop {
        let stream = tokio::select! {
            // Err: the server was dropped (nothing is ever sent).
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "echo: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, stopped.clone(), slow.clone()));
    }
}

async fn serve_connection(
    stream: TcpStream,
    mut stopped: watch::Receiver<()>,
    slow: watch::Sender<u64>,
) {
    // Latency over throughput: tests time small responses.
    let _ = stream.set_nodelay(true);
    let ws_stopped = stopped.clone();
    let service = service_fn(move |req| handle(req, ws_stopped.clone(), slow.clone()));
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "echo: connection ended with an error");
            }
        }
        _ = stopped.changed() => {}
    }
}

async fn handle(
    req: Request<Incoming>,
    stopped: watch::Receiver<()>,
    slow: watch::Sender<u64>,
) -> Result<Response<EchoBody>, CloseConnection> {
    let path = req.uri().path().to_owned();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let first = segments.next().unwrap_or_default();
    let arg = segments.next();
    Ok(match (req.method(), first, arg) {
        (&Method::GET, "stream", Some(n)) => match n.parse::<u64>() {
            Ok(n) => stream_response(n),
            Err(_) => bad_request("stream length must be a number of bytes"),
        },
        (&Method::POST, "echo-body", None) => echo_body(req),
        (_, "status", Some(code)) => status(code),
        (_, "slow", Some(ms)) => match ms.parse::<u64>() {
            Ok(ms) => {
                slow.send_modify(|c| *c += 1);
                tokio::time::sleep(Duration::from_millis(ms).min(MAX_SLOW)).await;
                echo(req).await?
            }
            Err(_) => bad_request("sleep must be a number of milliseconds"),
        },
        (_, "ws", None) => websocket(req, stopped),
        (_, "close", None) => return Err(CloseConnection),
        (_, "set-cookie", Some(names)) => set_cookies(names),
        _ => echo(req).await?,
    })
}

async fn echo(req: Request<Incoming>) -> Result<Response<EchoBody>, CloseConnection> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    let mut trailers = BTreeMap::<String, Vec<String>>::new();
    while let Some(frame) = body.frame().await {
        // A body that breaks off mid-way has no echo to speak of.
        let frame = frame.map_err(|_| CloseConnection)?;
        if let Some(data) = frame.data_ref() {
            body_bytes += data.len() as u64;
        }
        if let Some(t) = frame.trailers_ref() {
            for (name, value) in t {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                trailers.entry(name.as_str().to_owned()).or_default().push(value);
            }
        }
    }
    let mut headers = BTreeMap::<String, Vec<String>>::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.entry(name.as_str().to_owned()).or_default().push(value);
    }
    let echo = Echo {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        version: format!("{:?}", parts.version),
        authority: parts.uri.authority().map(|a| a.to_string()),
        headers,
        body_bytes,
        trailers,
    };
    // Serializing strings and numbers cannot fail; answer 500 rather than panic regardless.
    let Ok(json) = serde_json::to_vec(&echo) else {
        return Ok(text(StatusCode::INTERNAL_SERVER_ERROR, "cannot serialize echo"));
    };
    let mut resp = Response::new(full(json));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

fn stream_response(n: u64) -> Response<EchoBody> {
    // Each chunk is made only when hyper asks for it, so memory stays at one chunk however
    // large `n` is, and a slow reader slows the producer.
    let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= n {
            return None;
        }
        let len = (n - sent).min(STREAM_CHUNK as u64);
        let chunk: Bytes = (sent..sent + len).map(stream_byte).collect::<Vec<u8>>().into();
        Some((Ok::<_, io::Error>(Frame::data(chunk)), sent + len))
    });
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(chunks)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp
}

fn echo_body(req: Request<Incoming>) -> Response<EchoBody> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    // The request body becomes the response body frame by frame: nothing is buffered.
    let mut resp = Response::new(req.into_body().map_err(io::Error::other).boxed_unsync());
    if let Some(ct) = content_type {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

fn set_cookies(names: &str) -> Response<EchoBody> {
    let mut resp = text(StatusCode::OK, "{}");
    for name in names.split(',').filter(|n| !n.is_empty()) {
        if let Ok(v) = HeaderValue::from_str(&format!("{name}=upstream; Path=/")) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

fn status(code: &str) -> Response<EchoBody> {
    // 1xx are not final answers (hyper would refuse to send one as such), and 600-999 are no
    // HTTP status a test needs.
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
    else {
        return bad_request("status must be a number from 200 to 599");
    };
    let mut resp = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Response::new(empty())
    } else {
        text(status, &format!("{{\"status\":{}}}", status.as_u16()))
    };
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Answers a WebSocket upgrade with 101 and echoes messages on the upgraded connection.
fn websocket(mut req: Request<Incoming>, mut stopped: watch::Receiver<()>) -> Response<EchoBody> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes()));
    let is_upgrade = req.method() == Method::GET
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
        && headers.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    let Some(accept) = key.filter(|_| is_upgrade) else {
        let mut resp = text(StatusCode::UPGRADE_REQUIRED, "websocket upgrade required");
        resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return resp;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "echo: websocket upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        tokio::select! {
            () = echo_messages(ws) => {}
            _ = stopped.changed() => {}
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

async fn echo_messages<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(msg) = ws.next().await {
        let msg = match msg {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => msg,
            // tungstenite answers pings and closes itself; it flushes on the next poll.
            Ok(_) => continue,
            Err(_) => return,
        };
        if ws.send(msg).await.is_err() {
            return;
        }
    }
}

fn bad_request(why: &str) -> Response<EchoBody> {
    text(StatusCode::BAD_REQUEST, why)
}

fn text(status: StatusCode, body: &str) -> Response<EchoBody> {
    let mut resp = Response::new(full(body.as_bytes().to_vec()));
    *resp.status_mut() = status;
    resp
}

fn full(body: Vec<u8>) -> EchoBody {
    Full::new(Bytes::from(body)).map_err(|e: Infallible| match e {}).boxed_unsync()
}

fn empty() -> EchoBody {
    Empty::<Bytes>::new().map_err(|e: Infallible| match e {}).boxed_unsync()
}

#[cfg(test)]
mod tests;
