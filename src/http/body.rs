//! Body types. Bodies are streamed frame by frame in both directions, never buffered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// What the proxy answers with: its own small bodies, or the upstream's stream.
#[derive(Debug)]
pub enum ProxyBody {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
    pub fn full(b: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(b.into()))
    }
    /// The upstream's body, cut with [`ResponseBodyError::Stalled`] when the upstream
    /// sends nothing of it for `read_timeout` while the proxy waits on it (`None`: never).
    pub fn upstream(inner: super::pool::PooledBody, read_timeout: Option<Duration>) -> Self {
        ProxyBody::Upstream(UpstreamBody { inner, read_timeout, stall: None })
    }
}

/// Why a response body the proxy relays ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// The upstream's body broke off (a reset, a close before its length, bad framing).
    #[error("upstream body: {0}")]
    Upstream(#[from] hyper::Error),
    /// The upstream sent nothing of its body for the route's `read_timeout`.
    #[error("the upstream sent nothing of its response body for {0:?}")]
    Stalled(Duration),
}

/// An upstream's response body with the route's `read_timeout`: the longest the proxy
/// waits on the upstream for the body's next frame. Only time spent waiting on the
/// upstream counts: the clock starts when a poll finds nothing ready and stops at the
/// next frame, so a client that reads slowly (the body not polled meanwhile) is never
/// the upstream's fault (`server.send_timeout` is for that). Without it, an upstream that
/// sends its head and then nothing (hung, or on purpose) held the client's connection,
/// its `max_connections` slot and the upstream socket for as long as the client waited,
/// and the request had no audit event until the client gave up (nginx's
/// `proxy_read_timeout`, 60 s, cuts it).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: super::pool::PooledBody,
    read_timeout: Option<Duration>,
    /// Armed at the first `Pending` after a frame (allocated once per body, reset after).
    stall: Option<(bool, Pin<Box<tokio::time::Sleep>>)>,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                if let Some((armed, _)) = this.stall.as_mut() {
                    *armed = false;
                }
                Poll::Ready(r.map(|r| r.map_err(ResponseBodyError::from)))
            }
            Poll::Pending => {
                let Some(limit) = this.read_timeout else { return Poll::Pending };
                let (armed, sleep) =
                    this.stall.get_or_insert_with(|| (true, Box::pin(tokio::time::sleep(limit))));
                if !std::mem::replace(armed, true) {
                    sleep.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ResponseBodyError::Stalled(limit)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(i) => match Pin::new(i).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    Poll::Ready(Some(Ok(match frame.into_trailers() {
                        Ok(t) => Frame::trailers(clean_trailers(t)),
                        Err(frame) => frame,
                    })))
                }
                polled => polled,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Upstream(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(i) => i.size_hint(),
        }
    }
}

/// An upstream answer's trailers get its head's hygiene: no hop-by-hop field (the
/// HTTP/2 server refuses a trailer section holding `Connection` and resets the stream
/// under an answer already logged as sent whole), no `Set-Cookie` for the proxy's own
/// cookies, no origin-wide policy (`Alt-Svc`, `NEL`) and no front server directive
/// (`X-Accel-Redirect`…).
fn clean_trailers(mut t: http::HeaderMap) -> http::HeaderMap {
    super::headers::strip_hop_by_hop(&mut t, false);
    super::headers::strip_proxy_set_cookies(&mut t);
    super::headers::strip_upstream_directives(&mut t);
    t
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds the route's limit of {0} bytes")]
    TooLarge(u64),
    #[error("client body: {0}")]
    Client(#[from] hyper::Error),
}

impl RequestBodyError {
    /// The request-body error behind an upstream request's failure, if that is why it
    /// failed (the client's body broke off, was malformed or too large), rather than the
    /// upstream.
    pub fn behind<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Self> {
        let mut cur = Some(e);
        while let Some(c) = cur {
            if let Some(b) = c.downcast_ref::<Self>() {
                return Some(b);
            }
            cur = c.source();
        }
        None
    }

    /// Whether the client sent a body that does not parse (a bad chunk size, a bare LF, a
    /// size that overflows, trailers over the limit), as opposed to going away mid-body.
    pub fn is_malformed(&self) -> bool {
        let RequestBodyError::Client(e) = self else { return false };
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cur {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                );
            }
            cur = c.source();
        }
        false
    }
}

/// The most of an unread HTTP/2 request body the proxy reads and discards after
/// answering without it ([`ClientBody`]): nginx's `lingering_*`, bounded in bytes...
pub const LINGER_BYTES: u64 = 1024 * 1024;
/// ...and in time, from the moment the body is let go.
pub const LINGER_TIME: Duration = Duration::from_secs(3);

/// The client's request body as the proxy's phases hold it: forwarded, it becomes the
/// upstream request's body ([`RequestBody`]).
///
/// HTTP/2: when the proxy answers without reading it to its end (any refusal, its own
/// endpoints, an upstream it could not reach), dropping it would reset the stream
/// (`RST_STREAM`, `NO_ERROR` or `CANCEL`) while the client is still sending, and clients
/// such as curl 7.88 then report a framing error instead of the answer. So what is left
/// is read and discarded in a task of its own, as nginx does: at most [`LINGER_BYTES`]
/// (never past the route's `max_request_body`) and for at most [`LINGER_TIME`]; beyond
/// either bound, or when the declared length is over it from the start, it is dropped
/// and the stream reset. The task holds the stream alone: no `max_connections` slot, no
/// request in flight (the connection may close as idle meanwhile, which ends it), and the
/// stream counts against the connection's concurrent streams until it ends.
///
/// HTTP/1.1 is left as it was: hyper closes the connection after the answer instead of
/// reading an unread body, and clients read the answer first.
#[derive(Debug)]
pub struct ClientBody {
    /// Taken by the task that discards it.
    inner: Option<Incoming>,
    h2: bool,
    /// Data bytes read so far.
    seen: u64,
    /// The route's `max_request_body` once the request has a route (set through a
    /// shared borrow: the phases hold the request's path borrowed meanwhile).
    limit: AtomicU64,
    /// Read to its end, or failed: nothing is left to discard.
    finished: bool,
}

impl ClientBody {
    pub fn new(inner: Incoming, h2: bool) -> Self {
        Self { inner: Some(inner), h2, seen: 0, limit: AtomicU64::new(u64::MAX), finished: false }
    }

    /// The route's limit: the body is never read past it, discarded or not.
    pub fn limit_to(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The limit set by [`ClientBody::limit_to`] (none: `u64::MAX`).
    fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// What may still be read and discarded once the proxy has let the body go.
    fn linger_budget(&self) -> u64 {
        self.limit().saturating_sub(self.seen).min(LINGER_BYTES)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.seen = this.seen.saturating_add(d.len() as u64);
                }
            }
            Poll::Ready(_) => this.finished = true,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if !self.h2 || self.finished || self.is_end_stream() {
            return;
        }
        let budget = self.linger_budget();
        // A declared length over what may be read: no use reading any of it.
        if budget == 0 || self.size_hint().lower() > budget {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if let Some(body) = self.inner.take() {
            rt.spawn(linger(body, budget));
        }
    }
}

/// Reads and discards an unread HTTP/2 request body until it ends, `budget` bytes have
/// come, [`LINGER_TIME`] has passed, or the connection is gone; then drops it (reset the
/// stream, if it has not ended).
async fn linger(mut body: Incoming, budget: u64) {
    let mut left = budget;
    let read = async {
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(f)) => {
                    let n = f.data_ref().map_or(0, |d| d.len() as u64);
                    match left.checked_sub(n) {
                        Some(l) => left = l,
                        None => return false,
                    }
                }
                None => return true,
                Some(Err(_)) => return true,
            }
        }
    };
    match tokio::time::timeout(LINGER_TIME, read).await {
        Ok(true) => {}
        Ok(false) => tracing::debug!(
            budget,
            "request answered before its body ended: the rest is more than may be discarded; resetting the stream"
        ),
        Err(_) => tracing::debug!(
            linger_s = LINGER_TIME.as_secs(),
            "request answered before its body ended: the rest did not come in time; resetting the stream"
        ),
    }
}

/// The client's request body on its way upstream: counted for the audit log and cut
/// off at the limit its [`ClientBody`] was given (the route's `max_request_body`; the
/// upstream then sees an aborted request, the client a 413). The count and the limit
/// are the client body's own.
#[derive(Debug)]
pub struct RequestBody {
    inner: ClientBody,
    counter: Arc<AtomicU64>,
    /// Who the body waits on (see [`BodyProgress`]); `None` for one empty from the
    /// start (most requests: no allocation).
    state: Option<Arc<AtomicU8>>,
}

/// [`RequestBody`] states: not yet polled, or the last frame polled not yet taken
/// upstream (the upstream is not reading), the client's next frame awaited, the end.
const WAITING_ON_UPSTREAM: u8 = 0;
const WAITING_ON_CLIENT: u8 = 1;
const ENDED: u8 = 2;

impl RequestBody {
    pub fn new(inner: ClientBody, counter: Arc<AtomicU64>) -> Self {
        let state = (!inner.is_end_stream()).then(Arc::default);
        Self { inner, counter, state }
    }

    /// Who the body waits on, for as long as it lives upstream: a request whose answer
    /// does not come in time may be waiting on its client's upload rather than on the
    /// upstream.
    pub fn progress(&self) -> BodyProgress {
        BodyProgress(self.state.clone())
    }

    fn set(&self, state: u8) {
        if let Some(s) = &self.state {
            s.store(state, Ordering::Relaxed);
        }
    }

    fn end(&self) {
        self.set(ENDED);
    }
}

/// Who a [`RequestBody`] waits on (see [`RequestBody::progress`]).
#[derive(Debug)]
pub struct BodyProgress(Option<Arc<AtomicU8>>);

impl BodyProgress {
    /// The body's last poll found nothing from the client yet: its upload is what the
    /// exchange waits on. Not when the body had nothing in it or came to its end, nor
    /// when its last frame is still to be taken by the upstream (an upstream that reads
    /// none of a body larger than the socket buffers leaves it unfinished, however
    /// promptly the client sent it), nor before it was first polled.
    pub fn waiting_on_client(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.load(Ordering::Relaxed) == WAITING_ON_CLIENT)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            // Client trailers are dropped, as nginx does: hygiene only ever sees the
            // head, and an HTTP/2 upstream would take `X-Portcullis-*` or
            // `Authorization` from a trailer as readily as from a header. Trailers are
            // the last frame, so the body ends there.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Until the upstream side polls again, it holds this frame unsent.
                this.set(WAITING_ON_UPSTREAM);
                if frame.is_data() {
                    let (seen, limit) = (this.inner.seen, this.inner.limit());
                    this.counter.store(seen, Ordering::Relaxed);
                    if seen > limit {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge(limit))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.set(WAITING_ON_CLIENT);
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // hyper asks after each frame: a body framed by its length is never polled for
        // its end once that length has been sent.
        let end = self.inner.is_end_stream();
        if end {
            self.end();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
