//! What a connection is doing, so idle connections can be closed.
//!
//! Without this, a client could open connections and never send a request (plain HTTP,
//! or TLS after the handshake), or keep an HTTP/2 connection with no streams open
//! forever: each holds one of `max_connections` slots, so a few thousand sockets make
//! the proxy unavailable. hyper's `header_read_timeout` starts with a new connection's
//! first byte (and, on a keep-alive HTTP/1.1 connection, again after each response; the
//! bytes counted here tell the audit log whether it cut a request short). The server's
//! connection task closes a connection (gracefully: HTTP/2 gets a GOAWAY) once no
//! request has been in flight for `idle_timeout`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Requests in flight on one connection and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicU32,
    /// Milliseconds after `opened` at which the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Bytes read from the client, and how many had been read when the last request
    /// ended: hyper's header-read timeout also runs between requests on a keep-alive
    /// HTTP/1 connection, and only one with bytes read since was sending a request.
    bytes_read: AtomicU64,
    read_at_idle: AtomicU64,
    /// The connection's `max_connections` slot, released when the last holder (the
    /// connection task, its service, a WebSocket tunnel) lets go.
    _slot: Option<OwnedSemaphorePermit>,
    /// Where the slot came from: a request beyond the connection's first in flight
    /// (HTTP/2 streams) takes one more, as it can hold an upstream socket of its own.
    slots: Option<Arc<Semaphore>>,
}

/// Held from the start of a request until its response body is done or dropped.
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
    /// The extra slot of a concurrent request: `Err` when there was none to take.
    extra: Result<Option<OwnedSemaphorePermit>, ()>,
}

impl Activity {
    /// `slot` was taken from `slots` for the connection itself.
    pub fn new(slot: Option<OwnedSemaphorePermit>, slots: Option<Arc<Semaphore>>) -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            read_at_idle: AtomicU64::new(0),
            _slot: slot,
            slots,
        })
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let extra = match (&self.slots, before) {
            (Some(slots), 1..) => slots.clone().try_acquire_owned().map(Some).map_err(|_| ()),
            _ => Ok(None),
        };
        InFlight { activity: self.clone(), extra }
    }

    /// Counts bytes read from the client ([`Counted`]).
    pub fn note_read(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Whether the client sent anything since its last request ended (or since the
    /// connection opened): a header-read timeout then cut a request short; otherwise it
    /// only closed an idle keep-alive connection.
    pub fn read_since_idle(&self) -> bool {
        self.bytes_read.load(Ordering::Acquire) > self.read_at_idle.load(Ordering::Acquire)
    }

    /// When the connection will have been idle for `timeout`, or `None` while a
    /// request is in flight.
    pub fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.opened + since + timeout)
    }
}

impl InFlight {
    /// This request is one of several on its connection and every slot is taken: it is
    /// answered 503 without reaching an upstream, so concurrent streams cannot hold more
    /// sockets than `max_connections` allows.
    pub fn over_limit(&self) -> bool {
        self.extra.is_err()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamp first, then leave: whoever sees zero in flight sees the fresh stamp.
        let a = &self.activity;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Release);
        a.read_at_idle.store(a.bytes_read.load(Ordering::Acquire), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client stream that counts the bytes read from it into its connection's
/// [`Activity`]; writes pass straight through (vectored too).
pub struct Counted<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I> Counted<I> {
    pub fn new(io: I, activity: Arc<Activity>) -> Self {
        Counted { io, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.activity.note_read(buf.filled().len() - before);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_in_flight_and_counted_from_the_last_one() {
        let timeout = Duration::from_secs(75);
        let a = Activity::new(None, None);
        let opened = Instant::now();
        assert_eq!(a.idle_deadline(timeout), Some(opened + timeout));

        tokio::time::advance(Duration::from_secs(10)).await;
        let first = a.begin();
        let second = a.begin();
        assert_eq!(a.idle_deadline(timeout), None);
        tokio::time::advance(Duration::from_secs(500)).await;
        drop(first);
        assert_eq!(a.idle_deadline(timeout), None, "one request still in flight");
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(second);
        assert_eq!(a.idle_deadline(timeout), Some(opened + Duration::from_secs(515) + timeout));
    }

    #[tokio::test]
    async fn a_concurrent_request_takes_a_slot_of_its_own_or_is_over_the_limit() {
        let slots = Arc::new(Semaphore::new(3));
        let conn = slots.clone().try_acquire_owned().ok();
        let a = Activity::new(conn, Some(slots.clone()));
        let first = a.begin();
        assert!(!first.over_limit());
        assert_eq!(
            slots.available_permits(),
            2,
            "the first request rides on the connection's slot"
        );
        let second = a.begin();
        let third = a.begin();
        assert!(!second.over_limit() && !third.over_limit());
        assert_eq!(slots.available_permits(), 0);
        let fourth = a.begin();
        assert!(fourth.over_limit(), "no slot left");
        drop((second, fourth));
        assert_eq!(slots.available_permits(), 1, "a finished request gives its slot back");
        assert!(!a.begin().over_limit());
        drop((first, third));
        assert_eq!(slots.available_permits(), 2);
    }
}
