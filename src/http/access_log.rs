//! The access log layer: exactly one audit event per request, rejections included,
//! emitted when the response body ends (or is dropped, if the client went away), so
//! `bytes_out` and `duration_ms` cover the whole exchange.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::{Layer, Service};

use super::activity::InFlight;
use super::body::{ClientBody, ProxyBody, ResponseBodyError};
use super::proxy::{Outcome, Parked};
use super::{ConnInfo, RequestId};
use crate::audit::{AuditSink, HttpEvent, ShadowSummary};
use crate::metrics::{self, RequestKey};
use crate::reason::Reason;

#[derive(Debug, Clone)]
pub struct AccessLogLayer {
    sink: AuditSink,
    conn: ConnInfo,
}

impl AccessLogLayer {
    pub fn new(sink: AuditSink, conn: ConnInfo) -> Self {
        Self { sink, conn }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner, sink: self.sink.clone(), conn: self.conn.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    sink: AuditSink,
    conn: ConnInfo,
}

impl<S> Service<Request<Incoming>> for AccessLog<S>
where
    S: Service<Request<ClientBody>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<AuditBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<AuditBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let start = Instant::now();
        // Dropped with the future if the client goes away first, else with the body.
        let mut in_flight = self.conn.activity.begin();
        let h2 = req.version() == http::Version::HTTP_2;
        let rid = super::next_request_id();
        let parked = Parked::default();
        let over_limit = in_flight.over_limit();
        req.extensions_mut().insert(RequestId {
            id: rid.clone(),
            parked: parked.clone(),
            over_limit,
        });
        let method = req.method().clone();
        let head = method == http::Method::HEAD;
        // The raw authority for the log (validated or not); never the query string.
        // Both are cheap clones of the parsed request's bytes, not copies.
        let host = LogHost::of(&req);
        // From here on the body is one that, left unread by an HTTP/2 answer, is read
        // and discarded (bounded) rather than reset under the client ([`ClientBody`]).
        let fut = self.inner.call(req.map(|b| ClientBody::new(b, h2)));
        // Written by the guard if the client goes away before the response head (the
        // future is dropped); otherwise handed to the response body.
        let mut unanswered = Unanswered {
            pending: Some(Pending {
                start,
                rid,
                method,
                host,
                status: CLIENT_CLOSED,
                outcome: None,
                conn: self.conn.clone(),
                sink: self.sink.clone(),
            }),
            parked,
        };
        Box::pin(async move {
            let resp = match fut.await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let (mut parts, mut body) = resp.into_parts();
            // A `HEAD` the proxy answers itself (a rejection, its own pages) gets the
            // head a `GET` would, without the bytes: hyper leaves them out over HTTP/1.1,
            // but over HTTP/2 sent them as DATA frames, which a response to `HEAD` may not
            // carry (RFC 9113 §8.1.1): the stream was reset and the client got nothing.
            // An upstream's answer to `HEAD` has no body to take.
            if head {
                if let ProxyBody::Full(Some(bytes)) = &body {
                    parts
                        .headers
                        .entry(http::header::CONTENT_LENGTH)
                        .or_insert_with(|| http::HeaderValue::from(bytes.len()));
                    body = ProxyBody::empty();
                }
            }
            let mut pending = unanswered.pending.take();
            if let Some(p) = pending.as_mut() {
                // A forwarded answer's outcome waits in the parked slot, the proxy's own
                // answers carry theirs.
                p.outcome =
                    parts.extensions.remove::<Outcome>().or_else(|| unanswered.parked.take());
                // A client gone mid-request body is answered, if at all, into the void:
                // logged 499 like one gone before the response.
                let gone = p.outcome.as_ref().is_some_and(|o| o.reason == Reason::ClientClosed);
                p.status = if gone { CLIENT_CLOSED } else { parts.status.as_u16() };
            }
            // The proxy's own answer holds no upstream socket: a concurrent request's
            // extra slot goes back now, not when the client has taken the answer.
            if matches!(body, ProxyBody::Full(_)) {
                in_flight.release_extra();
            }
            let mut body =
                AuditBody { inner: body, rest: None, bytes_out: 0, pending, in_flight, h2 };
            if h2 {
                body.in_flight.owe(true);
            }
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// Writes the event of a request the HTTP/1 server refused before the proxy saw it: a
/// malformed request line or header (400), a head over the size limit (431), or a head
/// not finished within `server.header_timeout` (408, as nginx logs it; hyper closes
/// without an answer), or one the client closed its connection part-way through (499);
/// and of an HTTP/2 connection the server closed on the client's
/// error or abuse (400: rapid reset, a CONTINUATION flood, an undecodable header block).
/// Without this, such requests would leave no trace in the audit log.
pub fn refused_by_server(
    sink: &AuditSink,
    conn: &ConnInfo,
    err: &(dyn std::error::Error + 'static),
) {
    let Some(e) = err.downcast_ref::<hyper::Error>() else { return };
    let (status, reason, detail) = if e.is_parse_too_large() {
        (431, Reason::BadRequest, "request head too large")
    } else if e.is_parse() {
        (400, Reason::BadRequest, "malformed request head")
    } else if e.is_timeout() && conn.activity.read_since_idle() {
        // hyper runs this timer between requests too: without a byte since the last
        // one, it closed an idle keep-alive connection, and there was no request.
        (408, Reason::RequestTimeout, "request head not received within the header-read timeout")
    } else if (e.is_incomplete_message() || io_failed(e))
        && conn.activity.http1()
        && conn.activity.read_since_idle()
    {
        // The client closed the connection part-way through a request head, cleanly or
        // not (a TLS client gone without `close_notify`, a reset), or right after a
        // whole one, before hyper handed it on (HTTP/1 half-closes are not supported:
        // the EOF ends the connection): a request cut mid-body has its own event, and
        // marks the connection idle when it ends.
        (
            CLIENT_CLOSED,
            Reason::ClientClosed,
            "the client went away before its request head was read",
        )
    } else if let Some(detail) = http2_refusal(e) {
        (400, Reason::BadRequest, detail)
    } else {
        return;
    };
    let rid = super::next_request_id();
    let m = metrics::global();
    m.requests.inc(&RequestKey {
        route: no_route(),
        decision: "error",
        reason: reason.code(),
        status,
    });
    // In the latency histogram too, so its count matches requests_total; as 0, like the
    // event's duration (the server does not say when the head began).
    m.observe_latency(&no_route(), std::time::Duration::ZERO);
    sink.emit_http(&HttpEvent {
        ts: crate::audit::now_rfc3339(),
        request_id: &rid,
        kind: "http",
        client_addr: &conn.peer_text,
        tls: conn.tls.as_deref(),
        method: "-",
        host: "",
        path: "-",
        route: None,
        decision: "error",
        reason: reason.code(),
        detail: Some(detail),
        rule: None,
        shadow: None,
        policy_revision: None,
        identity: None,
        ci: None,
        upstream: None,
        upstream_path: None,
        status,
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0.0,
    });
}

/// Whether the connection failed on its socket (reset, a TLS peer gone without
/// `close_notify`) rather than on what the client sent.
fn io_failed(e: &hyper::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Why the HTTP/2 server closed a connection with a GOAWAY of its own (`None`: it did
/// not, or with `NO_ERROR`, or the client closed it). The streams such a client opened
/// never reached the proxy: one event per connection says what happened to them.
fn http2_refusal(e: &hyper::Error) -> Option<&'static str> {
    let h2 = std::error::Error::source(e)?.downcast_ref::<h2::Error>()?;
    if !h2.is_go_away() || h2.is_remote() {
        return None;
    }
    Some(match h2.reason()? {
        h2::Reason::NO_ERROR => return None,
        h2::Reason::ENHANCE_YOUR_CALM => {
            "HTTP/2 connection closed for abuse (GOAWAY ENHANCE_YOUR_CALM): streams reset faster than served, a CONTINUATION flood or an oversized header list"
        }
        h2::Reason::PROTOCOL_ERROR => {
            "HTTP/2 connection closed on the client's protocol error (GOAWAY PROTOCOL_ERROR)"
        }
        h2::Reason::COMPRESSION_ERROR => {
            "HTTP/2 connection closed on an undecodable header block (GOAWAY COMPRESSION_ERROR)"
        }
        h2::Reason::FRAME_SIZE_ERROR => {
            "HTTP/2 connection closed on an oversized frame (GOAWAY FRAME_SIZE_ERROR)"
        }
        _ => "HTTP/2 connection closed on the client's error (GOAWAY)",
    })
}

/// The status logged for a request whose client went away first (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

/// Writes the event of a request whose future was dropped before it answered.
struct Unanswered {
    pending: Option<Pending>,
    parked: Parked,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.outcome = Some(if p.conn.activity.abandoned() {
                Outcome::connection_abandoned(self.parked.take())
            } else if p.conn.activity.was_shut() {
                Outcome::shutting_down(self.parked.take())
            } else {
                Outcome::client_closed(self.parked.take())
            });
            p.emit(0);
        }
    }
}

/// The request's authority as sent: `:authority` (HTTP/2) or the Host header.
enum LogHost {
    Authority(http::uri::Authority),
    Header(http::HeaderValue),
    None,
}

impl LogHost {
    fn of<B>(req: &http::Request<B>) -> LogHost {
        match req.uri().authority() {
            Some(a) => LogHost::Authority(a.clone()),
            None => req
                .headers()
                .get(http::header::HOST)
                .cloned()
                .map_or(LogHost::None, LogHost::Header),
        }
    }

    /// As the event shows it: userinfo (`user:password@`, refused with 400) masked, as
    /// no log line may hold a password; the rest as sent.
    fn text(&self) -> Cow<'_, str> {
        let sent = match self {
            LogHost::Authority(a) => a.as_str(),
            LogHost::Header(v) => v.to_str().unwrap_or_default(),
            LogHost::None => "",
        };
        match sent.rsplit_once('@') {
            Some((_, host)) => Cow::Owned(format!("***@{host}")),
            None => Cow::Borrowed(sent),
        }
    }
}

/// The request's host as its `http` event shows it: the `Host` / `:authority` as sent,
/// port included (a WebSocket tunnel's `close` event says the same).
pub(crate) fn shown_host<B>(req: &http::Request<B>) -> String {
    LogHost::of(req).text().into_owned()
}

struct Pending {
    start: Instant,
    rid: Arc<str>,
    method: Method,
    host: LogHost,
    status: u16,
    outcome: Option<Outcome>,
    conn: ConnInfo,
    sink: AuditSink,
}

impl Pending {
    fn emit(self, bytes_out: u64) {
        let duration = self.start.elapsed();
        // 499: whatever the server wrote went nowhere.
        let bytes_out = if self.status == CLIENT_CLOSED { 0 } else { bytes_out };
        let o = self.outcome.as_ref();
        let reason = o.map_or(Reason::InternalError, |o| o.reason);
        let decision = o.map_or("error", |o| o.decision);
        let route: Arc<str> = o.and_then(|o| o.route.clone()).unwrap_or_else(no_route);
        let m = metrics::global();
        m.requests.inc(&RequestKey {
            route: route.clone(),
            decision,
            reason: reason.code(),
            status: self.status,
        });
        m.observe_latency(&route, duration);
        let identity = o.and_then(|o| o.identity.as_deref());
        let shadow = o.and_then(|o| o.shadow.as_ref()).map(|s| ShadowSummary {
            decision: if s.allowed { "allow" } else { "deny" },
            reason: s.reason.code(),
            rule: s.rule.as_deref(),
        });
        let audit = identity.map(|i| i.audit_fields());
        let host = self.host.text();
        // Where a request went (or was on its way to): not for a refusal.
        let forwarded = o.filter(|o| o.decision != "deny");
        let ev = HttpEvent {
            ts: crate::audit::now_rfc3339(),
            request_id: &self.rid,
            kind: "http",
            client_addr: &self.conn.peer_text,
            tls: self.conn.tls.as_deref(),
            method: self.method.as_str(),
            host: &host,
            path: o.and_then(|o| o.path.as_deref()).unwrap_or("-"),
            route: o.and_then(|o| o.route.as_deref()),
            decision,
            reason: reason.code(),
            detail: o.and_then(|o| o.detail.as_deref()),
            rule: o.and_then(|o| o.rule.as_deref()),
            shadow,
            policy_revision: o.and_then(|o| o.revision.as_deref()),
            identity: audit.map(|a| a.0),
            ci: audit.and_then(|a| a.1),
            upstream: forwarded.and_then(|o| o.upstream.as_deref()),
            upstream_path: forwarded.and_then(|o| o.upstream_path.as_deref()),
            status: self.status,
            bytes_in: o.map_or(0, |o| o.bytes_in.load(Ordering::Relaxed)),
            bytes_out,
            duration_ms: crate::util::millis(duration),
        };
        self.sink.emit_http(&ev);
    }
}

/// The metrics label of requests that matched no route, allocated once.
fn no_route() -> Arc<str> {
    static NO_ROUTE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    NO_ROUTE.get_or_init(|| Arc::from("-")).clone()
}

/// The response body, counted; the event is emitted when it ends (HTTP/2: when the
/// server lets it go) or is dropped.
pub struct AuditBody {
    inner: ProxyBody,
    /// HTTP/2: the rest of a data frame larger than [`PIECE`], handed over in pieces.
    rest: Option<Bytes>,
    bytes_out: u64,
    pending: Option<Pending>,
    in_flight: InFlight,
    /// HTTP/2: hyper takes a stream's body one part at a time and holds each (the last
    /// too) until the client's flow-control window lets it go, so this body tells the
    /// connection whether the client is holding it up ([`InFlight::owe`]), and its event
    /// waits until hyper lets it go (or the connection is closed for `send_timeout`).
    h2: bool,
}

/// The largest part of an HTTP/2 response body handed over at once (the default HTTP/2
/// frame and TLS record size): hyper takes the next part only once the client's window
/// lets the last one go, so a client reading slowly but steadily lets one through well
/// within `send_timeout`, whatever the upstream's reads yield (up to 400 KB each).
const PIECE: usize = 16 * 1024;

const UNDELIVERED: &str =
    "the client took nothing of the response for server.send_timeout; the connection was closed";

impl AuditBody {
    fn done(&mut self) {
        if let Some(p) = self.pending.take() {
            p.emit(self.bytes_out);
        }
    }

    /// Records why an upstream's response reached the client cut short. The status stays
    /// the one sent; only a relayed (allowed) response is concerned: a refusal keeps its
    /// own reason.
    fn cut_short(&mut self, reason: Reason, detail: &'static str) {
        let o = self.pending.as_mut().and_then(|p| p.outcome.as_mut());
        if let Some(o) = o.filter(|o| o.reason.is_allow()) {
            o.reason = reason;
            o.detail = Some(std::borrow::Cow::Borrowed(detail));
        }
    }

    /// The connection was closed with this response undelivered (`send_timeout`): said
    /// of refusals too (their reason goes to the detail), since that is what happened.
    fn undelivered(&mut self) {
        let o = self.pending.as_mut().and_then(|p| p.outcome.as_mut());
        if let Some(o) = o {
            o.detail = Some(match o.reason {
                allowed if allowed.is_allow() => std::borrow::Cow::Borrowed(UNDELIVERED),
                refused => format!("{UNDELIVERED} (the answer: {})", refused.code()).into(),
            });
            o.reason = Reason::SendTimeout;
        }
    }

    /// Whether this response has a body to send at all (none for HEAD, 1xx, 204, 304:
    /// the server drops those bodies unpolled).
    fn has_body(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.method != Method::HEAD && !matches!(p.status, 100..=199 | 204 | 304))
    }

    /// A data frame as handed over: HTTP/2 gets at most [`PIECE`] at once.
    fn piece(&mut self, frame: Frame<Bytes>) -> Frame<Bytes> {
        if !self.h2 || frame.data_ref().is_none_or(|d| d.len() <= PIECE) {
            return frame;
        }
        match frame.into_data() {
            Ok(mut d) => {
                let piece = d.split_to(PIECE);
                self.rest = Some(d);
                Frame::data(piece)
            }
            Err(frame) => frame,
        }
    }
}

impl Drop for AuditBody {
    fn drop(&mut self) {
        if self.pending.is_some() && self.in_flight.activity().abandoned() {
            // HTTP/2 also holds an ended body until its last part is let go.
            if !self.is_end_stream() || self.h2 {
                self.undelivered();
            }
        } else if self.pending.is_some() && !self.is_end_stream() && self.has_body() {
            if self.in_flight.activity().was_shut() {
                // Dropped at the end of the shutdown's grace period.
                self.cut_short(
                    Reason::ShuttingDown,
                    "the shutdown's grace period ended during the response body; the body was cut there",
                );
            } else {
                // Dropped before its end: the server stopped sending, the client having gone.
                self.cut_short(
                    Reason::ClientClosed,
                    "the client went away during the response body",
                );
            }
        }
        self.done();
    }
}

impl Body for AuditBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let this = self.get_mut();
        let r = match this.rest.take() {
            Some(rest) => Poll::Ready(Some(Ok(this.piece(Frame::data(rest))))),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(this.piece(f)))),
                r => r,
            },
        };
        if this.h2 {
            // Waiting on the upstream owes the client nothing; anything else is held
            // until hyper lets it go.
            this.in_flight.owe(r.is_ready());
        }
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes_out += d.len() as u64;
                }
                if !this.h2 && this.is_end_stream() {
                    this.done();
                }
            }
            Poll::Ready(Some(Err(e))) => {
                // Only an upstream's body can fail; the client sees it cut short.
                match e {
                    ResponseBodyError::Upstream(_) => this.cut_short(
                        Reason::UpstreamAborted,
                        "the upstream's response body broke off before its end",
                    ),
                    ResponseBodyError::Stalled(_) => this.cut_short(
                        Reason::UpstreamTimeout,
                        "the upstream sent nothing of its response body for the route's \
                         read_timeout; the body was cut there",
                    ),
                }
                this.done();
            }
            Poll::Ready(None) => {
                if !this.h2 {
                    this.done();
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(rest) = &self.rest {
            let n = rest.len() as u64;
            // Upper first: a lower bound above the upper one panics.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(n));
            }
            hint.set_lower(hint.lower().saturating_add(n));
        }
        hint
    }
}
