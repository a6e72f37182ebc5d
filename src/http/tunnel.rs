//! WebSocket tunnels: bytes copied both ways once both sides have switched protocols.
//!
//! A tunnel is authorized once, by the upgrade request, so it must not outlive what
//! authorized it: it ends when the caller's credential expires, when a reload changes
//! the policy so that the upgrade request would now be denied or removes its route (as
//! a database session does), at the end of the shutdown grace period (database sessions
//! too), and after `server.idle_timeout` with no byte in either direction (as nginx's
//! `proxy_read_timeout` ends an idle tunnel; applications keep theirs alive with
//! WebSocket pings). The proxy does not speak WebSocket framing, so either end sees the
//! TCP connection close.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Why a tunnel ended (the `reason` label of `portcullis_websocket_tunnels_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Either side closed, or an I/O error.
    Closed,
    Idle,
    CredentialExpired,
    AccessRevoked,
    /// The proxy is shutting down and the grace period is over.
    Shutdown,
}

impl End {
    pub const ALL: [End; 5] =
        [End::Closed, End::Idle, End::CredentialExpired, End::AccessRevoked, End::Shutdown];

    pub const fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle",
            End::CredentialExpired => "credential-expired",
            End::AccessRevoked => "access-revoked",
            End::Shutdown => "shutdown",
        }
    }
}

/// What authorized a tunnel, re-checked at every reload.
pub struct Grant {
    pub shared: Arc<super::proxy::Shared>,
    pub route: Arc<str>,
    pub identity: Arc<crate::identity::Identity>,
    pub method: http::Method,
    /// The normalized path the upgrade request was authorized for.
    pub path: String,
    pub idle: Duration,
    /// The configuration generation that authorized the upgrade.
    pub generation: u64,
}

impl Grant {
    /// Why the tunnel must end, once it must: a reload removed the route or its policy
    /// now denies the upgrade request, or the shutdown grace period is over. Never
    /// resolves otherwise.
    async fn ended(&self) -> End {
        let mut stopping = self.shared.stopping.clone();
        let shutdown = async {
            let _ = stopping.wait_for(|s| *s).await;
            // The grace period of the configuration in force when shutdown starts.
            let grace = self.shared.runtime.load().config.server.shutdown_grace;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            () = self.revoked() => End::AccessRevoked,
            () = shutdown => End::Shutdown,
        }
    }

    async fn revoked(&self) {
        let mut reloads = self.shared.reloads.subscribe();
        // Starting from the generation that authorized the upgrade, so a reload between
        // the request and the switch to the tunnel is not missed.
        let mut seen = self.generation;
        loop {
            let current = *reloads.borrow_and_update();
            if current != seen {
                seen = current;
                if !self.still_allowed() {
                    return;
                }
            }
            if reloads.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The upgrade request, evaluated against the current generation.
    fn still_allowed(&self) -> bool {
        let rt = self.shared.runtime.load();
        let Some(route) = rt.config.routes.iter().find(|r| *r.name == *self.route) else {
            return false;
        };
        let facts = crate::policy::RequestFacts {
            method: &self.method,
            path: &self.path,
            database: None,
            role: None,
        };
        route.accepts(&self.identity.issuer)
            && route.policy.evaluate(&self.identity, &facts).allowed
    }
}

/// Runs a tunnel to its end.
pub async fn run(client: OnUpgrade, upstream: OnUpgrade, grant: Grant) {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade did not complete");
            return;
        }
    };
    let m = crate::metrics::global();
    m.websocket_tunnels_open.fetch_add(1, Ordering::Relaxed);
    let (expires_at, idle) = (grant.identity.expires_at, grant.idle);
    let end = relay(TokioIo::new(c), TokioIo::new(u), expires_at, idle, grant.ended()).await;
    m.websocket_tunnels_open.fetch_sub(1, Ordering::Relaxed);
    m.websocket_tunnels_closed.inc(&end.label());
    tracing::debug!(end = end.label(), "websocket tunnel ended");
}

async fn relay<C, U>(
    client: C,
    upstream: U,
    expires_at: u64,
    idle: Duration,
    ended: impl Future<Output = End>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let opened = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut c = Stamped { inner: client, opened, last: last.clone() };
    let mut u = Stamped { inner: upstream, opened, last: last.clone() };
    let left = expires_at.saturating_sub(crate::util::unix_now());
    let expiry = opened + Duration::from_secs(left.min(u64::from(u32::MAX)));
    let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
    tokio::pin!(copy);
    tokio::pin!(ended);
    loop {
        let quiet_until = opened + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "websocket tunnel closed with an error");
                }
                return End::Closed;
            }
            _ = tokio::time::sleep_until(expiry) => return End::CredentialExpired,
            end = &mut ended => return end,
            _ = tokio::time::sleep_until(quiet_until) => {
                let since = Duration::from_millis(last.load(Ordering::Relaxed));
                if Instant::now() >= opened + since + idle {
                    return End::Idle;
                }
            }
        }
    }
}

/// Records when bytes last arrived from this side (every byte relayed is read first).
struct Stamped<T> {
    inner: T,
    opened: Instant,
    /// Milliseconds after `opened`.
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A relay between two in-memory pipes with a 60 s idle timeout and no revocation;
    /// the far ends: what the client writes, what the upstream reads.
    fn relay_for(expires_in: u64) -> (tokio::task::JoinHandle<End>, DuplexStream, DuplexStream) {
        let (client, client_peer) = tokio::io::duplex(1024);
        let (upstream, upstream_peer) = tokio::io::duplex(1024);
        let expires_at = crate::util::unix_now() + expires_in;
        let never = std::future::pending();
        let idle = Duration::from_secs(60);
        (tokio::spawn(relay(client, upstream, expires_at, idle, never)), client_peer, upstream_peer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_ends_after_the_idle_timeout_and_traffic_keeps_it_open() {
        let (relay, mut client_peer, mut upstream_peer) = relay_for(3600);
        // Traffic every 40 s for four minutes: never idle for 60 s.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            client_peer.write_all(b"ping").await.unwrap_or_else(|e| panic!("{e}"));
            let mut got = [0u8; 4];
            upstream_peer.read_exact(&mut got).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&got, b"ping");
            assert!(!relay.is_finished(), "closed while in use");
        }
        let end = relay.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(end, End::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_when_the_credential_expires_even_while_in_use() {
        let (relay, mut client_peer, mut upstream_peer) = relay_for(90);
        let chatter = async {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if client_peer.write_all(b"x").await.is_err() {
                    break;
                }
                let mut b = [0u8; 1];
                if upstream_peer.read_exact(&mut b).await.is_err() {
                    break;
                }
            }
        };
        let both =
            tokio::time::timeout(Duration::from_secs(3600), async { tokio::join!(relay, chatter) });
        let (end, ()) = both.await.unwrap_or_else(|_| panic!("the tunnel outlived the credential"));
        assert_eq!(end.unwrap_or_else(|e| panic!("{e}")), End::CredentialExpired);
    }
}
