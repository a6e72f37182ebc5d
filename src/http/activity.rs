//! What a connection is doing, so idle connections can be closed.
//!
//! Without this, a client could open connections and never send a request (plain HTTP,
//! or TLS after the handshake), or keep an HTTP/2 connection with no streams open
//! forever: each holds one of `max_connections` slots, so a few thousand sockets make
//! the proxy unavailable. hyper's `header_read_timeout` only starts with the first byte
//! of a request head. The server's connection task closes a connection (gracefully:
//! HTTP/2 gets a GOAWAY) once no request has been in flight for `idle_timeout`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Requests in flight on one connection and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicU32,
    /// Milliseconds after `opened` at which the connection last became idle.
    idle_since_ms: AtomicU64,
    /// The connection's `max_connections` slot, released when the last holder (the
    /// connection task, its service, a WebSocket tunnel) lets go.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Held from the start of a request until its response body is done or dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub fn new(slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            _slot: slot,
        })
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
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

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamp first, then leave: whoever sees zero in flight sees the fresh stamp.
        let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_without_requests_in_flight_and_counted_from_the_last_one() {
        let timeout = Duration::from_secs(75);
        let a = Activity::new(None);
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
}
