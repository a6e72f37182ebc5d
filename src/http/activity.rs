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
//!
//! Nor may a client hold a connection by not taking what it is sent (`send_timeout`, as
//! nginx's): the connection is closed when writes to it have been refused for that long
//! (a socket it does not read, [`Counted`] notes it), or when an HTTP/2 response has
//! waited that long for the client to let the server take its next part ([`InFlight::owe`]:
//! a stream whose flow-control window the client keeps closed). The latter is measured
//! on the responses, not the socket: a client could keep the socket busy with PINGs
//! while no response moves. Only the client is timed so: a response waiting on its
//! upstream (before its head, or for its body's next part) owes the client nothing.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::server::per_client::ClientGuard;

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
    /// The connection began with the HTTP/2 preface: a client gone without a request
    /// head of its own is then no cut-short request ([`Activity::http1`]).
    http2: AtomicBool,
    /// The shutdown's grace period ended with the connection still open: what it had in
    /// flight was cut by the proxy, not by the client.
    shut: AtomicBool,
    /// The connection's `max_connections` slot, released when the last holder (the
    /// connection task, its service, a WebSocket tunnel) lets go.
    _slot: Option<OwnedSemaphorePermit>,
    /// The connection's place in its client's count (`max_connections_per_client`), held
    /// exactly as long as the slot.
    _client: Option<ClientGuard>,
    /// The connection in `portcullis_connections_open`, counted as long as its slot is
    /// held (a WebSocket tunnel outlives the HTTP connection it came from).
    _open: Option<crate::metrics::OpenConnection>,
    /// Where the slot came from: a request beyond the connection's first in flight
    /// (HTTP/2 streams) takes one more, as it can hold an upstream socket of its own.
    slots: Option<Arc<Semaphore>>,
    /// Since when (ms after `opened`) the client has taken nothing written to it: the
    /// last write or flush was refused (its socket's buffer, or TLS's, is full) and none
    /// went through since. [`NOT_BLOCKED`] otherwise.
    blocked_ms: AtomicU64,
    /// HTTP/2 responses the server has something of to send ([`InFlight::owe`]), and when
    /// (ms after `opened`) a response last handed it something.
    owing: AtomicU32,
    handed_ms: AtomicU64,
    /// Closed because the client took nothing for `send_timeout`: requests cut short are
    /// audited `send-timeout`.
    abandoned: AtomicBool,
}

/// `blocked_ms` while writes go through.
const NOT_BLOCKED: u64 = u64::MAX;

/// Held from the start of a request until its response body is done or dropped.
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
    /// The extra slot of a concurrent request: `Err` when there was none to take.
    extra: Result<Option<OwnedSemaphorePermit>, ()>,
    /// Counted in [`Activity::owing`].
    owing: bool,
}

impl Activity {
    /// `slot` was taken from `slots` for the connection itself, once `client` had
    /// admitted it.
    pub fn new(
        slot: Option<OwnedSemaphorePermit>,
        client: Option<ClientGuard>,
        slots: Option<Arc<Semaphore>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            read_at_idle: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            shut: AtomicBool::new(false),
            _open: slot.as_ref().map(|_| crate::metrics::OpenConnection::new()),
            _slot: slot,
            _client: client,
            slots,
            blocked_ms: AtomicU64::new(NOT_BLOCKED),
            owing: AtomicU32::new(0),
            handed_ms: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let extra = match (&self.slots, before) {
            (Some(slots), 1..) => slots.clone().try_acquire_owned().map(Some).map_err(|_| ()),
            _ => Ok(None),
        };
        InFlight { activity: self.clone(), extra, owing: false }
    }

    /// Counts bytes read from the client ([`Counted`]); of the connection's first read,
    /// notes whether it began with HTTP/2's preface.
    fn note_read(&self, read: &[u8]) {
        let before = self.bytes_read.fetch_add(read.len() as u64, Ordering::Relaxed);
        if before == 0 && read.starts_with(b"PRI * HTTP/2.0") {
            self.http2.store(true, Ordering::Release);
        }
    }

    /// The TLS handshake chose HTTP/2 (ALPN `h2`): the connection speaks HTTP/2 whatever
    /// its first read holds. A client may send the preface a few bytes at a time, and the
    /// first read's check (`note_read`) then missed it, so one that left
    /// before a request was audited as an HTTP/1 head cut short (499 `client-closed`).
    /// Without ALPN (cleartext, or a client that offered none) that check is all there is.
    pub fn negotiated_http2(&self) {
        self.http2.store(true, Ordering::Release);
    }

    /// Whether the client sent something other than the HTTP/2 preface first: an
    /// HTTP/1 connection (or one that never said), where bytes read since the last
    /// request ended are a request head begun. On HTTP/2 they are frames of any kind
    /// (`SETTINGS`, `PING`, `WINDOW_UPDATE`) that begin no request.
    pub fn http1(&self) -> bool {
        !self.http2.load(Ordering::Acquire)
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

    /// Whether a request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// A write to the client went through: it is taking bytes. One load, no clock.
    fn note_written(&self) {
        if self.blocked_ms.load(Ordering::Relaxed) != NOT_BLOCKED {
            self.blocked_ms.store(NOT_BLOCKED, Ordering::Relaxed);
        }
    }

    /// A write to the client was refused (`Pending`); the clock is read only when a
    /// blocked spell begins.
    fn note_blocked(&self) {
        if self.blocked_ms.load(Ordering::Relaxed) == NOT_BLOCKED {
            self.blocked_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Whether the last write to the client was refused.
    pub fn write_blocked(&self) -> bool {
        self.blocked_ms.load(Ordering::Relaxed) != NOT_BLOCKED
    }

    /// When the client will have held the connection up for `timeout`: writes refused
    /// all along, or an HTTP/2 response with something to send and none handed over
    /// meanwhile. `None` while it holds nothing up.
    pub fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        let blocked = self.blocked_ms.load(Ordering::Relaxed);
        let writes = (blocked != NOT_BLOCKED).then(|| self.at(blocked) + timeout);
        let owed = (self.owing.load(Ordering::Acquire) > 0)
            .then(|| self.at(self.handed_ms.load(Ordering::Acquire)) + timeout);
        match (writes, owed) {
            (Some(w), Some(o)) => Some(w.min(o)),
            (w, o) => w.or(o),
        }
    }

    /// Marks the connection closed for holding up what it was sent.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    /// Whether the connection was closed for holding up what it was sent.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Marks the connection cut at the end of the shutdown's grace period (before its
    /// requests are dropped, so their events say so).
    pub fn shut(&self) {
        self.shut.store(true, Ordering::Release);
    }

    /// Whether the connection was cut at the end of the shutdown's grace period.
    pub fn was_shut(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }
}

impl InFlight {
    /// This request is one of several on its connection and every slot is taken: it is
    /// answered 503 without reaching an upstream, so concurrent streams cannot hold more
    /// sockets than `max_connections` allows.
    pub fn over_limit(&self) -> bool {
        self.extra.is_err()
    }

    /// The connection this request came on.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Gives back the extra slot of a concurrent request the proxy answered itself (a
    /// refusal, its own endpoints): it holds no upstream socket, so while its answer
    /// waits for the client it need not keep a slot from other clients.
    pub fn release_extra(&mut self) {
        if let Ok(extra) = &mut self.extra {
            *extra = None;
        }
    }

    /// HTTP/2: whether the server has something of this response to send (`true`: its
    /// head was produced, or its body handed over a part or ended, and the response is
    /// still held) or is waiting on the body's upstream (`false`). hyper takes a
    /// stream's next part only once the client's window lets the last one go, so a
    /// response owed this long with nothing handed over is one the client holds up.
    pub fn owe(&mut self, owing: bool) {
        let a = &self.activity;
        if owing {
            // Stamp first: whoever sees it owing sees the fresh stamp.
            a.handed_ms.store(a.now_ms(), Ordering::Release);
        }
        if owing != self.owing {
            self.owing = owing;
            if owing {
                a.owing.fetch_add(1, Ordering::AcqRel);
            } else {
                a.owing.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.owe(false);
        // Stamp first, then leave: whoever sees zero in flight sees the fresh stamp.
        let a = &self.activity;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Release);
        a.read_at_idle.store(a.bytes_read.load(Ordering::Acquire), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client stream that counts the bytes read from it into its connection's
/// [`Activity`], and notes whether writes go through or are refused (vectored too), so a
/// client that takes nothing cannot hold its connection (`send_timeout`).
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
            this.activity.note_read(&buf.filled()[before..]);
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
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note(&r, |n| *n > 0);
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note(&r, |n| *n > 0);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    // A TLS stream takes plaintext into a bounded buffer and pushes it out on flush: a
    // refused flush is a refused write.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.note(&r, |()| true);
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.note(&r, |()| true);
        r
    }
}

impl<I> Counted<I> {
    /// Bytes went out (`went`), or the write was refused (`Pending`).
    fn note<T>(&self, r: &Poll<std::io::Result<T>>, went: impl FnOnce(&T) -> bool) {
        match r {
            Poll::Ready(Ok(t)) if went(t) => self.activity.note_written(),
            Poll::Pending => self.activity.note_blocked(),
            Poll::Ready(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_in_flight_and_counted_from_the_last_one() {
        let timeout = Duration::from_secs(75);
        let a = Activity::new(None, None, None);
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

    #[tokio::test(start_paused = true)]
    async fn a_client_holds_the_connection_up_while_writes_are_refused_or_an_h2_response_waits() {
        let t = Duration::from_secs(60);
        let a = Activity::new(None, None, None);
        assert_eq!(a.stall_deadline(t), None);
        // Refused writes: timed from the first refusal, not the last.
        tokio::time::advance(Duration::from_secs(5)).await;
        let first = Instant::now();
        a.note_blocked();
        tokio::time::advance(Duration::from_secs(30)).await;
        a.note_blocked();
        assert!(a.write_blocked());
        assert_eq!(a.stall_deadline(t), Some(first + t));
        // A write that goes through ends the spell.
        a.note_written();
        assert!(!a.write_blocked());
        assert_eq!(a.stall_deadline(t), None);

        // An HTTP/2 response owed: timed from the last part handed over.
        let mut r = a.begin();
        r.owe(true);
        let handed = Instant::now();
        assert_eq!(a.stall_deadline(t), Some(handed + t));
        tokio::time::advance(Duration::from_secs(20)).await;
        r.owe(true);
        assert_eq!(a.stall_deadline(t), Some(handed + Duration::from_secs(20) + t));
        // Waiting on the upstream owes the client nothing, however long.
        r.owe(false);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(a.stall_deadline(t), None);
        r.owe(true);
        let mut other = a.begin();
        other.owe(true);
        drop(r);
        assert!(a.stall_deadline(t).is_some(), "the other response is still owed");
        drop(other);
        assert_eq!(a.stall_deadline(t), None, "a finished response owes nothing");
        assert!(!a.abandoned());
        a.abandon();
        assert!(a.abandoned());
    }

    #[tokio::test]
    async fn a_refusal_gives_its_extra_slot_back_at_once() {
        let slots = Arc::new(Semaphore::new(2));
        let a = Activity::new(slots.clone().try_acquire_owned().ok(), None, Some(slots.clone()));
        let _first = a.begin();
        let mut second = a.begin();
        assert_eq!(slots.available_permits(), 0);
        second.release_extra();
        assert_eq!(slots.available_permits(), 1, "released while the request is still in flight");
        assert!(!second.over_limit());
        assert_eq!(a.idle_deadline(Duration::from_secs(1)), None);
        let mut third = a.begin();
        assert!(!third.over_limit(), "took the slot given back");
        let mut fourth = a.begin();
        assert!(fourth.over_limit());
        fourth.release_extra();
        assert!(fourth.over_limit(), "still answered 503");
        third.release_extra();
        drop((second, third, fourth));
        assert_eq!(slots.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_concurrent_request_takes_a_slot_of_its_own_or_is_over_the_limit() {
        let slots = Arc::new(Semaphore::new(3));
        let conn = slots.clone().try_acquire_owned().ok();
        let a = Activity::new(conn, None, Some(slots.clone()));
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
