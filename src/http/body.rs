//! Body types. Bodies are streamed frame by frame in both directions, never buffered.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// What the proxy answers with: its own small bodies, or the upstream's stream.
#[derive(Debug)]
pub enum ProxyBody {
    Full(Option<Bytes>),
    Upstream(super::pool::PooledBody),
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
    pub fn full(b: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(b.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(i) => Pin::new(i).poll_frame(cx),
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

/// The client's request body on its way upstream: counted for the audit log and cut
/// off at the route's size limit (the upstream then sees an aborted request, the
/// client a 413).
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
    counter: Arc<AtomicU64>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, counter: Arc<AtomicU64>) -> Self {
        Self { inner, limit, seen: 0, counter }
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
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => Poll::Ready(None),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    this.counter.store(this.seen, Ordering::Relaxed);
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge(this.limit))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
