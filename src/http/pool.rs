//! A connection pool for plain-HTTP/1.1 upstreams: a stack of idle
//! [`http1::SendRequest`] handles per route.
//!
//! This is the common deployment (a sidecar or a service on the same network) and the
//! hot path, so it skips what hyper-util's general pool does on every request for
//! upstreams it does not need here: hashing a `(scheme, authority)` key into a shared
//! map, racing a checkout against a lazy connect, and spawning a task per request to
//! wait until the connection can be reused. Measured with `benches/instructions.sh`
//! (see benches/README.md). HTTPS and HTTP/2 upstreams keep hyper-util's client.
//!
//! A connection goes back on the stack when its response body has been read to the
//! end and its request body sent to the end; a body dropped early, a request body the
//! upstream answered before it was sent to its end (a 413 while the client still
//! uploads — even if the upload then finishes: an upstream that answers before reading
//! may go on to read the rest as a request of its own, whose answer would reach the next
//! client), an upgrade (101), `Connection: close` or an error closes it instead — so a
//! connection taken from the stack is ready at once, never still busy with another
//! client's upload, and never holding an answer to nobody's request.
//!
//! Early-answer smuggling: whether the upstream *read* a request body cannot be seen from
//! here — a body that came with its head is written at once, before any answer. An
//! upstream that answers without reading it (Python's `http.server` `send_error`, most
//! frameworks' 401/403/404/405/413/415/417 and login redirects) and keeps the connection
//! reads that body next as a request of its own, and its answer would reach the next
//! client on the connection. So a connection whose request carried body bytes (at least
//! one non-empty data frame, see [`Progress`]) is also closed when its answer is not a
//! success (status 300 or more): that is where handlers bail out without reading; and,
//! whatever the answer, when the method gives content no meaning (`GET`, `HEAD`,
//! `DELETE`): such handlers (Python's `do_GET`) never read a body and answer 200.
//! Requests without a body (most traffic) and successes to `POST`, `PUT` or `PATCH`
//! bodies keep the connection. A `HEAD`'s connection is not kept either, nor one whose 204 or 304
//! announced a body (`body_may_follow`): a body written after such a head would answer
//! the next request. hyper-util's pool (HTTPS upstreams) gets the same rule in
//! [`super::upstream`] by poisoning the connection; HTTP/2 streams are framed, so an
//! unread body is never read as a request there.
//!
//! A request that a reused connection could not take — the upstream closed it while it
//! sat idle, a race every keep-alive pool has — is sent once more on a new connection, as
//! hyper-util does; a request that reached the wire is never repeated. Idle connections
//! are dropped when a checkout or a return finds them expired or closed (no timer).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

use super::body::RequestBody;

/// Idle connections older than this are dropped rather than reused (hyper-util's
/// default, and longer than most servers' keep-alive so those usually close first).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle connections per route; more are closed when they finish.
const MAX_IDLE: usize = 256;

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// The pool of one route's upstream (`host:port`, plain HTTP/1.1).
pub struct H1Pool<B = RequestBody> {
    inner: Arc<Inner<B>>,
}

struct Inner<B> {
    /// `host:port`, as configured.
    authority: String,
    connect_timeout: Duration,
    /// Most recently used last: checkouts take the warmest connection, and the oldest
    /// ones are at the front where [`Inner::put`] expires them.
    idle: Mutex<VecDeque<Idle<B>>>,
}

struct Idle<B> {
    tx: http1::SendRequest<Sent<B>>,
    since: Instant,
}

impl<B> H1Pool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(authority: &str, connect_timeout: Duration) -> Self {
        H1Pool {
            inner: Arc::new(Inner {
                authority: authority.to_string(),
                connect_timeout,
                idle: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Sends `req` (origin-form URI, Host set) and returns the response head; the
    /// connection returns to the pool when the body has been read to its end.
    pub async fn send(&self, req: Request<B>) -> Result<Response<PooledBody<B>>, PoolError> {
        let sent = Progress::of(req.method());
        // An upgrade the upstream declines leaves a connection whose state only the
        // upstream knows (a careless one may have switched anyway): never reused.
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        let mut req = req.map(|inner| Sent::new(inner, sent.clone()));
        // A reused connection may have been closed by the upstream while idle: the
        // request it refused (before sending anything) goes to the next idle one, and
        // at last to a new connection.
        while let Some(mut tx) = self.inner.checkout().await {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.inner.wrap(resp, tx, sent, upgrade)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
        // Boxed: connecting (TCP, handshake) is the rare path, and its future is the
        // largest part of this one, which every request's future carries.
        let mut tx = Box::pin(self.inner.connect()).await?;
        let resp = tx.send_request(req).await?;
        Ok(self.inner.wrap(resp, tx, sent, upgrade))
    }

    /// Idle connections now (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.inner.idle.lock().len()
    }
}

impl<B> Inner<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The most recently used idle connection that can take a request now.
    async fn checkout(&self) -> Option<http1::SendRequest<Sent<B>>> {
        loop {
            let Idle { mut tx, since } = self.idle.lock().pop_back()?;
            if tx.is_closed() || since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Both bodies of its last exchange ended, so it is ready at once, or as soon
            // as its task has seen the response's end; an error means it closed.
            if tx.ready().await.is_ok() {
                return Some(tx);
            }
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<Sent<B>>, PoolError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout(self.authority.clone()))?
        .map_err(|e| PoolError::Connect(self.authority.clone(), e))?;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (tx, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// `upgrade`: an upgrade was offered.
    fn wrap(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        tx: http1::SendRequest<Sent<B>>,
        sent: Progress,
        upgrade: bool,
    ) -> Response<PooledBody<B>> {
        // After a 101 the connection belongs to the tunnel; after a declined upgrade, an
        // early answer, an error answer to a body or an answer whose body may still come,
        // to nobody.
        let reusable = !upgrade
            && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
            && sent.reusable_after(&resp);
        let back = reusable.then(|| (self.clone(), tx, sent));
        resp.map(|inner| PooledBody { inner, done: false, back })
    }
}

/// Whether an answer that ends with its head (`head`: it answers a `HEAD`; or a 204 or
/// 304) may still be followed by a body its upstream writes after the head (read in
/// [`Progress::reusable_after`]): always for a `HEAD` (a server that runs the `GET` handler and writes its body, as Python's
/// `do_HEAD = do_GET` idiom does, announces the `GET`'s length, exactly as a correct one
/// does), and for a 204 or 304 whose head announces one (`Transfer-Encoding`, or a
/// `Content-Length` other than 0 on a 204, which may carry none). hyper reads no body
/// there; bytes already received when the exchange ends close the connection, but a body
/// written a moment after its head reaches the connection once it is back in the pool,
/// where it would be read as the answer to the next request: another client's (as an
/// `HTTP/1.1 …` body, that client gets it; otherwise a 502 and the rest of that
/// connection out of step).
fn body_may_follow<T>(head: bool, resp: &Response<T>) -> bool {
    use http::{header, StatusCode};
    let h = resp.headers();
    head || match resp.status() {
        StatusCode::NO_CONTENT => {
            h.contains_key(header::TRANSFER_ENCODING)
                || h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
        }
        StatusCode::NOT_MODIFIED => h.contains_key(header::TRANSFER_ENCODING),
        _ => false,
    }
}

impl<B> Inner<B> {
    fn put(&self, tx: http1::SendRequest<Sent<B>>) {
        if tx.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) > IDLE_TIMEOUT || i.tx.is_closed())
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { tx, since: now });
        }
    }
}

impl<B> Clone for H1Pool<B> {
    fn clone(&self) -> Self {
        H1Pool { inner: self.inner.clone() }
    }
}

/// An upstream response body that hands its connection back to the pool once read to
/// the end (on drop, so a body the client never polls — HEAD, 204, an empty 200 — counts
/// when hyper knows it is empty).
pub struct PooledBody<B = RequestBody> {
    inner: Incoming,
    done: bool,
    back: Option<GiveBack<B>>,
}

/// What a finished response hands back: the pool, the connection, and whether the
/// request body was sent to its end.
type GiveBack<B> = (Arc<Inner<B>>, http1::SendRequest<Sent<B>>, Progress);

impl<B> std::fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").field("done", &self.done).finish_non_exhaustive()
    }
}

impl<B> PooledBody<B> {
    /// A body with no pool behind it (hyper-util's client, tests).
    pub fn unpooled(inner: Incoming) -> Self {
        PooledBody { inner, done: false, back: None }
    }
}

impl<B> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            // Trailers are the last frame: the server stops polling after them.
            Poll::Ready(None) => this.done = true,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.done = true,
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for PooledBody<B> {
    fn drop(&mut self) {
        if let Some((pool, tx, sent)) = self.back.take() {
            if self.is_end_stream() && sent.ended() {
                pool.put(tx);
            }
        }
    }
}

/// How far a request body has been sent, shared by its [`Sent`] wrapper (polled by the
/// connection's task) and the pool deciding whether the connection may be reused.
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<AtomicU8>);

/// The body was sent to its end (recorded before its last bytes are written, so an
/// upstream that read it all cannot answer before this is set).
const ENDED: u8 = 1;
/// At least one non-empty data frame was sent.
const CARRIED: u8 = 2;
/// The request's method gives content no meaning (`GET`, `HEAD`, `DELETE`: RFC 9110
/// §9.3.1, §9.3.2, §9.3.5), so its handler usually never reads a body it was sent.
const UNREAD_METHOD: u8 = 4;
/// The request is a `HEAD`: its answer ends with its head, whatever the head announces.
const HEAD: u8 = 8;

impl Progress {
    /// The progress of a request with this method's body.
    pub fn of(method: &http::Method) -> Self {
        let p = Self::default();
        if matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::DELETE) {
            p.set(UNREAD_METHOD);
        }
        if *method == http::Method::HEAD {
            p.set(HEAD);
        }
        p
    }

    fn set(&self, flag: u8) {
        self.0.fetch_or(flag, Ordering::Release);
    }

    /// Whether the request body was sent to its end.
    pub fn ended(&self) -> bool {
        self.0.load(Ordering::Acquire) & ENDED != 0
    }

    /// Whether the connection that carried this request may take another one, its answer
    /// having `resp`'s head (read when it arrives): not if the answer came
    /// before the body was sent to its end, nor if the body carried bytes and the answer
    /// is not a success, or is any answer to a `GET`, `HEAD` or `DELETE` (the upstream
    /// may not have read them, and would read them next as a request; a `GET` handler
    /// that ignores its body, as Python's `do_GET` does, answers 200; see the module
    /// docs); nor if a body may still follow the answer's head (`body_may_follow`).
    pub fn reusable_after<T>(&self, resp: &Response<T>) -> bool {
        let s = self.0.load(Ordering::Acquire);
        let status = resp.status();
        s & ENDED != 0
            && (s & CARRIED == 0 || (status.as_u16() < 300 && s & UNREAD_METHOD == 0))
            && !body_may_follow(s & HEAD != 0, resp)
    }
}

/// A request body that records its [`Progress`]: its first non-empty data frame, and its
/// end (hyper never polls one that is empty from the start, so that counts at once).
pub struct Sent<B> {
    inner: B,
    progress: Progress,
    /// `CARRIED` already recorded (one atomic write per request, not per frame).
    carried: bool,
}

impl<B: Body> Sent<B> {
    pub fn new(inner: B, progress: Progress) -> Self {
        if inner.is_end_stream() {
            progress.set(ENDED);
        }
        Sent { inner, progress, carried: false }
    }
}

impl<B: Body + Unpin> Body for Sent<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame)))
                if !this.carried && frame.data_ref().is_some_and(|d| d.has_remaining()) =>
            {
                this.carried = true;
                this.progress.set(CARRIED);
            }
            Poll::Ready(None) => this.progress.set(ENDED),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.progress.set(ENDED);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Pool = H1Pool<http_body_util::Empty<Bytes>>;

    fn get(path: &str) -> Request<http_body_util::Empty<Bytes>> {
        Request::builder()
            .uri(path)
            .header(http::header::HOST, "upstream")
            .body(http_body_util::Empty::new())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A loopback upstream that hands each connection it accepts to `serve`, with its
    /// index from 0, and counts them.
    async fn counted_upstream<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s, n));
            }
        });
        (addr, conns)
    }

    /// Reads from `s` into `buf` until it holds `enough(buf)`; false if the peer went.
    async fn fill(
        s: &mut tokio::net::TcpStream,
        buf: &mut Vec<u8>,
        enough: impl Fn(&[u8]) -> bool,
    ) -> bool {
        while !enough(buf) {
            let mut chunk = [0u8; 1024];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        true
    }

    fn has_head(buf: &[u8]) -> bool {
        buf.windows(4).any(|w| w == b"\r\n\r\n")
    }

    /// The next request head from `s` (lower-cased), taken out of `buf`.
    async fn next_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        if !fill(s, buf, has_head).await {
            return None;
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        Some(head)
    }

    /// An upstream that answers each request on a connection with `answer(n)` (n counts
    /// requests on that connection from 0) and closes after `per_conn` requests.
    async fn upstream(
        per_conn: usize,
        answer: fn(usize) -> &'static str,
    ) -> (String, Arc<AtomicUsize>) {
        counted_upstream(move |mut s, _| async move {
            let mut buf = Vec::new();
            for n in 0..per_conn {
                // One request head (these tests send no bodies).
                if next_head(&mut s, &mut buf).await.is_none()
                    || s.write_all(answer(n).as_bytes()).await.is_err()
                {
                    return;
                }
            }
        })
        .await
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    async fn read_all(resp: Response<PooledBody<http_body_util::Empty<Bytes>>>) -> Bytes {
        resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_finished_response_returns_its_connection_and_the_next_request_reuses_it() {
        let (addr, conns) = upstream(100, |_| OK).await;
        let pool = Pool::new(&addr, Duration::from_secs(2));
        for _ in 0..5 {
            let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(read_all(resp).await, "ok");
            assert_eq!(pool.idle(), 1);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one connection for five requests");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, conns) =
            upstream(100, |_| "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc").await;
        let pool = Pool::new(&addr, Duration::from_secs(2));
        let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("{e}"));
        drop(resp);
        assert_eq!(pool.idle(), 0, "half-read connection not pooled");
        let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("{e}"));
        drop(resp);
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_replaced_without_an_error() {
        // One request per connection, then the upstream closes it (without saying so).
        let (addr, conns) = upstream(1, |_| OK).await;
        let pool = Pool::new(&addr, Duration::from_secs(2));
        for i in 0..4 {
            let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(read_all(resp).await, "ok");
            // Let the close arrive, or race it: both must work.
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn connection_close_and_switching_protocols_are_not_pooled() {
        let (addr, _) = upstream(100, |n| match n {
            0 => "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            _ => OK,
        })
        .await;
        let pool = Pool::new(&addr, Duration::from_secs(2));
        let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_all(resp).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.inner.checkout().await.is_none(), "closed connection handed out");

        let (addr, _) = upstream(100, |_| {
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        })
        .await;
        let pool = Pool::new(&addr, Duration::from_secs(2));
        let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
        drop(resp);
        assert_eq!(pool.idle(), 0, "an upgraded connection is not pooled");

        // An upgrade answered 200: the connection is not handed to the next request.
        let (addr, conns) = upstream(100, |_| OK).await;
        let pool = Pool::new(&addr, Duration::from_secs(2));
        let upgrade = Request::get("/ws")
            .header("host", "u")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = pool.send(upgrade).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_all(resp).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle(), 0, "a declined upgrade's connection is not pooled");
        let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_all(resp).await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 2, "the next request got a new connection");
    }

    #[tokio::test]
    async fn connect_failures_are_reported_as_such() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
        drop(listener);
        let pool = Pool::new(&addr, Duration::from_secs(2));
        let err = pool.send(get("/")).await.err().unwrap_or_else(|| panic!("connected"));
        assert!(matches!(err, PoolError::Connect(..)), "{err:?}");
    }

    /// A request body that sends one chunk and then never ends (a client still uploading).
    struct Uploading(bool);

    impl Body for Uploading {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let this = self.get_mut();
            if std::mem::replace(&mut this.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"part")))))
            }
        }
    }

    #[tokio::test]
    async fn a_connection_still_sending_a_request_body_is_not_handed_to_the_next_request() {
        // The upstream answers at once (a 413, say) while the client's upload goes on.
        let (addr, conns) = upstream(100, |_| OK).await;
        let uploads = H1Pool::<Uploading>::new(&addr, Duration::from_secs(2));
        let req = Request::post("/upload")
            .header(http::header::HOST, "upstream")
            .header(http::header::CONTENT_LENGTH, "1000000")
            .body(Uploading(false))
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = uploads.send(req).await.unwrap_or_else(|e| panic!("{e}"));
        let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        assert_eq!(body, "ok");
        assert_eq!(uploads.idle(), 0, "a connection busy uploading was pooled");
        // The next request gets a connection of its own instead of waiting on that one.
        let req = Request::get("/")
            .header(http::header::HOST, "upstream")
            .body(Uploading(true))
            .unwrap_or_else(|e| panic!("{e}"));
        let next = tokio::time::timeout(Duration::from_secs(2), uploads.send(req)).await;
        assert!(matches!(next, Ok(Ok(_))), "the next request waited on the busy connection");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_body_sent_to_its_end_leaves_the_connection_reusable() {
        let (addr, conns) = upstream(100, |_| OK).await;
        let pool = H1Pool::<http_body_util::Full<Bytes>>::new(&addr, Duration::from_secs(2));
        for _ in 0..3 {
            let req = Request::post("/")
                .header(http::header::HOST, "upstream")
                .body(http_body_util::Full::new(Bytes::from_static(b"hello")))
                .unwrap_or_else(|e| panic!("{e}"));
            let resp = pool.send(req).await.unwrap_or_else(|e| panic!("{e}"));
            let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            assert_eq!(body, "ok");
            assert_eq!(pool.idle(), 1);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_read_up_to_its_trailers_returns_its_connection() {
        let (addr, conns) = upstream(100, |_| {
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"
        })
        .await;
        let pool = Pool::new(&addr, Duration::from_secs(2));
        for _ in 0..3 {
            let resp = pool.send(get("/")).await.unwrap_or_else(|e| panic!("{e}"));
            // As hyper's server does: stop at the trailers, then drop the body.
            let mut body = resp.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if frame.is_trailers() {
                    break;
                }
            }
            drop(body);
            assert_eq!(pool.idle(), 1);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    /// An upstream answering by request line: `POST /early…` gets `early` at once without
    /// its body being read (the body is then read as the next request's head, as Python's
    /// `http.server` does after `send_error`), `GET /smug…` gets `SMUGGLED` once the next
    /// request on the connection has come in, `GET /missing`
    /// a 404 and anything else `OK`, its body read first (by `content-length`). Counts the
    /// connections it accepts.
    async fn by_request_line(early: &'static str) -> (String, Arc<AtomicUsize>) {
        counted_upstream(move |mut s, _| async move {
            let mut buf = Vec::new();
            while let Some(head) = next_head(&mut s, &mut buf).await {
                let answer = if head.starts_with("post /early") {
                    early
                } else if head.starts_with("get /smug") {
                    // Slow to answer: the answer comes once the next request is in
                    // (sooner, hyper would see bytes on an idle connection and close it).
                    if !fill(&mut s, &mut buf, has_head).await {
                        return;
                    }
                    "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED"
                } else if head.starts_with("get /missing") {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 7\r\n\r\nmissing"
                } else {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if !fill(&mut s, &mut buf, |b| b.len() >= len).await {
                        return;
                    }
                    buf.drain(..len);
                    OK
                };
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        })
        .await
    }

    fn with_body(method: &str, path: &str, body: &'static [u8]) -> Request<Full> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "upstream")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    type Full = http_body_util::Full<Bytes>;

    /// The body came with its head, so it was sent to its end before the answer: only the
    /// status tells that the upstream may have left it unread.
    #[tokio::test]
    async fn a_connection_whose_request_body_got_an_error_answer_is_not_reused() {
        for early in [
            "HTTP/1.1 403 Forbidden\r\ncontent-length: 9\r\n\r\nforbidden",
            "HTTP/1.1 302 Found\r\nlocation: /login\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n",
        ] {
            let (addr, conns) = by_request_line(early).await;
            let pool = H1Pool::<Full>::new(&addr, Duration::from_secs(2));
            let smuggled = b"GET /smug HTTP/1.1\r\nhost: upstream\r\n\r\n";
            let resp = pool.send(with_body("POST", "/early", smuggled)).await;
            let resp = resp.unwrap_or_else(|e| panic!("{e}"));
            assert!(resp.status().as_u16() >= 300, "{early}");
            let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            assert_ne!(body, "SMUGGLED");
            assert_eq!(pool.idle(), 0, "{early}: the connection went back to the pool");
            let next = pool.send(with_body("GET", "/", b"")).await;
            let next = next.unwrap_or_else(|e| panic!("{e}"));
            let body = next.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            assert_eq!(body, "ok", "{early}: the next request got the answer to the body");
            assert_eq!(conns.load(Ordering::SeqCst), 2, "{early}");
        }
    }

    /// The rule above costs nothing to requests without a body, whatever their answer, nor
    /// to successes: these all go on one connection.
    #[tokio::test]
    async fn requests_without_a_body_and_successes_to_bodies_keep_their_connection() {
        let (addr, conns) =
            by_request_line("HTTP/1.1 403 Forbidden\r\ncontent-length: 9\r\n\r\nforbidden").await;
        let pool = H1Pool::<Full>::new(&addr, Duration::from_secs(2));
        let exchanges: [(&str, &str, &'static [u8], &str); 5] = [
            ("GET", "/", b"", "ok"),
            ("POST", "/upload", b"hello", "ok"),
            ("GET", "/missing", b"", "missing"),
            // Content-Length: 0 carries no bytes to leave unread.
            ("POST", "/early", b"", "forbidden"),
            ("GET", "/", b"", "ok"),
        ];
        for (method, path, body, want) in exchanges {
            let resp = pool.send(with_body(method, path, body)).await;
            let resp = resp.unwrap_or_else(|e| panic!("{e}"));
            let got = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            assert_eq!(got, want, "{method} {path}");
            assert_eq!(pool.idle(), 1, "{method} {path}: the connection was not pooled");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    /// A request body the test hands over piece by piece.
    struct Channel(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.get_mut().0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_closed() && self.0.is_empty()
        }
    }

    /// An upstream that answers before reading the request body (RFC 9110 allows that)
    /// and keeps the connection, reading the body as a request of its own: its answer
    /// waits for the next request on that connection, which it would reach in place of
    /// that request's own. The pool never hands such a connection out again.
    #[tokio::test]
    async fn a_connection_answered_before_its_request_body_was_sent_is_not_reused() {
        let (addr, conns) = counted_upstream(|mut s, n| async move {
            let mut buf = Vec::new();
            let mut heads = 0;
            while next_head(&mut s, &mut buf).await.is_some() {
                heads += 1;
                let answer: &[u8] = match (n, heads) {
                    // The first request: its head at once, without reading the body.
                    (0, 1) => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                    // Its body, read as a request: now the first answer's body.
                    (0, 2) => b"early",
                    // The next request on this connection gets the body's answer.
                    (0, _) => b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED",
                    _ => OK.as_bytes(),
                };
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let pool = H1Pool::<Channel>::new(&addr, Duration::from_secs(2));
        let smuggled = Bytes::from_static(b"GET /admin HTTP/1.1\r\nhost: upstream\r\n\r\n");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = Request::post("/upload")
            .header(http::header::HOST, "upstream")
            .header(http::header::CONTENT_LENGTH, smuggled.len().to_string())
            .body(Channel(rx))
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = pool.send(req).await.unwrap_or_else(|e| panic!("{e}"));
        // The body goes only after the answer's head: the client was slow.
        let _ = tx.send(smuggled);
        drop(tx);
        let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        assert_eq!(body, "early");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        drop(tx);
        let next = Request::get("/")
            .header(http::header::HOST, "upstream")
            .body(Channel(rx))
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = tokio::time::timeout(Duration::from_secs(2), pool.send(next))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        assert_eq!(body, "ok", "the next request got the answer to the first one's body");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }
}
