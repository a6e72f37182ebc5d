//! WebSocket tunnels: bytes copied both ways once both sides have switched protocols.
//!
//! A tunnel is authorized once, by the upgrade request, so it must not outlive what
//! authorized it: it ends when the caller's credential expires, when a reload changes
//! the configuration so that the upgrade request would now be denied — its policy
//! denies it, or the request now matches another route or none (route matching runs
//! again, as for a new request) — as a database session does, when the issuer's key set
//! drops the key that verified the tunnel's token (checked again whenever a key set
//! drops a key, and at every reload), when a shutdown's grace
//! period is over (the drain's, as the server started: database sessions too), and after
//! `server.idle_timeout` with no byte in either direction (as nginx's
//! `proxy_read_timeout` ends an idle tunnel; applications keep theirs alive with
//! WebSocket pings). The proxy does not speak WebSocket framing, so either end sees the
//! TCP connection close. Its end is audited: one `websocket` `close` event.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::value::RawValue;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::audit::TlsInfo;

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
            End::Shutdown => "shutting-down",
        }
    }
}

/// What authorized a tunnel, re-checked at every reload, and what its end event says.
pub struct Grant {
    pub shared: Arc<super::proxy::Shared>,
    pub route: Arc<str>,
    /// The identity, and the credential and issuer settings that admitted it.
    pub admission: crate::identity::Admission,
    pub method: http::Method,
    /// The upgrade request's host (lower case, no port), as routing read it.
    pub host: String,
    /// The upgrade request's host as sent, port included, as its `http` event shows it
    /// (and so the `close` event).
    pub shown_host: String,
    /// The normalized path the upgrade request was authorized for.
    pub path: String,
    pub idle: Duration,
    /// The configuration generation that authorized the upgrade.
    pub generation: u64,
    /// The upgrade request's id (its `http` event's `request_id`).
    pub request_id: Arc<str>,
    pub client_addr: Arc<str>,
    pub tls: Option<Arc<TlsInfo>>,
    pub upstream: Arc<str>,
    /// The path the upgrade request was sent upstream with, when it differs from `path`
    /// (`strip_prefix`, an upstream base path).
    pub upstream_path: Option<String>,
    /// Why a reload ended the tunnel, for its `close` event's `detail`.
    pub revoked_because: parking_lot::Mutex<Option<String>>,
}

impl Grant {
    /// Why the tunnel must end, once it must: a reload revoked the access, or the
    /// shutdown grace period is over. Never resolves otherwise.
    async fn ended(&self) -> End {
        let mut grace_over = self.shared.grace_over.clone();
        // The drain's own signal, so a tunnel ends when the drain closes the connections
        // (its grace is the one the server started with; a reload does not change it).
        // A server dropped without a shutdown never sends it.
        let shutdown = async {
            if grace_over.wait_for(|over| *over).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            end = self.revoked() => end,
            () = shutdown => End::Shutdown,
        }
    }

    /// Resolves when a reload, for a tunnel a browser session opened a sign-out of that
    /// session, or for one a token opened a key set that dropped a key (the one that
    /// verified the token, a rotation after a compromise), revoked the access
    /// ([`End::AccessRevoked`]), or a reload brought the credential's end forward (a
    /// lower `max_token_age`) and that time came ([`End::CredentialExpired`]).
    async fn revoked(&self) -> End {
        let mut reloads = self.shared.reloads.subscribe();
        // Key removals are announced by the verifier of each generation: subscribed to
        // again at every reload. The check at the first pass covers a removal between
        // the request and the switch to the tunnel.
        let token = !self.admission.is_session();
        let mut removals = token.then(|| self.shared.runtime.load().verifier.key_removals());
        // Sign-outs are counted by the list every generation's sessions share. Starting
        // from the count when the tunnel opened; the check at the first pass covers a
        // sign-out between the request and the switch to the tunnel.
        let mut sign_outs = match self.shared.runtime.load().sessions.as_deref() {
            Some(s) if self.admission.is_session() => Some(s.revocations().sign_outs()),
            _ => None,
        };
        // Starting from the generation that authorized the upgrade, so a reload between
        // the request and the switch to the tunnel is not missed.
        let mut seen = self.generation;
        let mut expires_at = self.admission.identity.expires_at;
        let mut reloads_open = true;
        let mut check = sign_outs.is_some() || removals.is_some();
        loop {
            let current = *reloads.borrow_and_update();
            if current != seen || check {
                if current != seen && token {
                    removals = Some(self.shared.runtime.load().verifier.key_removals());
                }
                seen = current;
                check = false;
                match self.still_allowed() {
                    Ok(now_ends) => expires_at = expires_at.min(now_ends),
                    Err(why) => {
                        tracing::debug!(route = %self.route, %why, "websocket tunnel revoked");
                        *self.revoked_because.lock() = Some(why);
                        return End::AccessRevoked;
                    }
                }
            }
            let left = crate::util::until_unix(expires_at);
            // The relay's own timer ends the tunnel at the end it was admitted with.
            let sooner = expires_at < self.admission.identity.expires_at;
            tokio::select! {
                changed = reloads.changed(), if reloads_open => reloads_open = changed.is_ok(),
                changed = next_change(&mut sign_outs), if sign_outs.is_some() => match changed {
                    Ok(()) => check = true,
                    Err(_) => sign_outs = None,
                },
                changed = next_change(&mut removals), if removals.is_some() => match changed {
                    Ok(()) => check = true,
                    // That generation's verifier is gone: the reload subscribes again.
                    Err(_) => removals = None,
                },
                () = tokio::time::sleep(left), if sooner => {
                    return End::CredentialExpired;
                }
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// The upgrade request, evaluated against the current generation as a new request
    /// would be: routed by host, path and method to the same route (not another, more
    /// specific one, and not to none), which accepts the issuer, whose checks the
    /// credential still passes ([`crate::identity::Admission::recheck`]) and whose
    /// policy allows. When it is still allowed: when the credential ends now; when it
    /// is not: why (for the log and the `close` event).
    fn still_allowed(&self) -> Result<u64, String> {
        let rt = self.shared.runtime.load();
        let Some(route) = rt.config.route(&self.host, &self.path, &self.method) else {
            return Err(format!(
                "no route for the upgrade request since the reload (was `{}`)",
                self.route
            ));
        };
        let identity = self.admission.identity.clone();
        if *route.name != *self.route {
            return Err(format!(
                "the upgrade request goes to route `{}` since the reload (was `{}`)",
                route.name, self.route
            ));
        }
        if !route.accepts(&identity.issuer) {
            return Err(format!(
                "route `{}` no longer accepts issuer `{}`",
                route.name, identity.issuer
            ));
        }
        let now = crate::util::unix_now();
        let identity =
            self.admission.recheck(&rt.config, &rt.verifier, rt.sessions.as_deref(), now)?;
        let facts = crate::policy::RequestFacts {
            method: &self.method,
            path: &self.path,
            database: None,
            role: None,
        };
        let decision = route.policy.evaluate(&identity, &facts);
        if decision.allowed {
            return Ok(identity.expires_at);
        }
        Err(match &decision.rule {
            Some(r) if decision.claim_not_kept.is_some() => format!(
                "{} by rule `{}` ({}:{}): {}",
                decision.reason,
                r.id,
                r.file.display(),
                r.line,
                decision.detail()
            ),
            Some(r) => {
                format!("{} by rule `{}` ({}:{})", decision.reason, r.id, r.file.display(), r.line)
            }
            None if decision.claim_not_kept.is_some() => {
                format!("{} (no rule allows it): {}", decision.reason, decision.detail())
            }
            None => format!("{} (no rule allows it)", decision.reason),
        })
    }

    /// The tunnel's end event: one per tunnel, after the upgrade's `http` event (same
    /// `request_id`); shaped as a database session's `close`.
    fn emit_end(&self, relayed: &Relayed, duration: Duration) {
        let host = &self.shown_host[..crate::audit::bounded_len(&self.shown_host)];
        let path = &self.path[..crate::audit::bounded_len(&self.path)];
        let upstream_path =
            self.upstream_path.as_deref().map(|p| &p[..crate::audit::bounded_len(p)]);
        let revision = self.shared.runtime.load().revision.clone();
        let (identity, ci) = self.admission.identity.audit_fields();
        let detail = self.revoked_because.lock().take();
        self.shared.sink.emit(&TunnelEvent {
            ts: crate::audit::now_rfc3339(),
            kind: "websocket",
            event: "close",
            request_id: &self.request_id,
            client_addr: &self.client_addr,
            tls: self.tls.as_deref(),
            host,
            path,
            route: &self.route,
            upstream: &self.upstream,
            upstream_path,
            decision: if relayed.end == End::Closed { "closed" } else { "terminated" },
            reason: relayed.end.label(),
            ended_by: relayed.ended_by(),
            detail: detail.as_deref(),
            policy_revision: &revision,
            identity,
            ci,
            duration_ms: crate::util::millis(duration),
            bytes_in: relayed.bytes_in,
            bytes_out: relayed.bytes_out,
            truncated: host.len() < self.shown_host.len()
                || path.len() < self.path.len()
                || upstream_path.map(str::len) != self.upstream_path.as_deref().map(str::len),
        });
    }
}

/// A WebSocket tunnel ended (`kind: "websocket"`, `event: "close"`).
#[derive(Debug, Serialize)]
pub struct TunnelEvent<'a> {
    pub ts: String,
    pub kind: &'static str,
    pub event: &'static str,
    pub request_id: &'a str,
    pub client_addr: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a TlsInfo>,
    pub host: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    /// As the upgrade's `http` event's: only when it differs from `path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_path: Option<&'a str>,
    /// `closed` (an end closed it) or `terminated` (the proxy ended it: `reason`).
    pub decision: &'static str,
    /// [`End::label`]: `closed`, `idle`, `credential-expired`, `access-revoked`,
    /// `shutdown`.
    pub reason: &'static str,
    /// Which end ended the tunnel: `client` or `upstream` (`closed`: the one that sent
    /// the first close frame, else the first whose connection ended, by a close or an
    /// error), `portcullis` (every other `reason`). As a database session's `close`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<&'static str>,
    /// Why the access was revoked (`access-revoked`): the route it goes to now, the
    /// issuer check, the key that verified the token gone from the issuer's key set, or
    /// the rule that denies it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    /// The revision in force when the tunnel ended.
    pub policy_revision: &'a str,
    pub identity: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci: Option<&'a RawValue>,
    /// From the switch to the tunnel to its end.
    pub duration_ms: f64,
    /// Relayed from the client to the upstream, and back, after the 101.
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Runs a tunnel to its end, and audits it.
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
    let (expires_at, idle) = (grant.admission.identity.expires_at, grant.idle);
    let opened = Instant::now();
    let relayed = relay(TokioIo::new(c), TokioIo::new(u), expires_at, idle, grant.ended()).await;
    m.websocket_tunnels_open.fetch_sub(1, Ordering::Relaxed);
    m.websocket_tunnels_closed.inc(&relayed.end.label());
    grant.emit_end(&relayed, opened.elapsed());
    tracing::debug!(end = relayed.end.label(), "websocket tunnel ended");
}

/// How a relay ended, and the bytes it read from each side.
#[derive(Debug)]
struct Relayed {
    end: End,
    /// The side whose connection ended first ([`CLIENT`], [`UPSTREAM`]; 0: neither).
    first_gone: u8,
    /// The side that sent the first WebSocket close frame (0: neither).
    first_close: u8,
    /// From the client (to the upstream).
    bytes_in: u64,
    /// From the upstream (to the client).
    bytes_out: u64,
}

impl Relayed {
    /// The `close` event's `ended_by`.
    fn ended_by(&self) -> Option<&'static str> {
        let first = if self.first_close != 0 { self.first_close } else { self.first_gone };
        match (self.end, first) {
            (End::Closed, CLIENT) => Some("client"),
            (End::Closed, UPSTREAM) => Some("upstream"),
            (End::Closed, _) => None,
            _ => Some("portcullis"),
        }
    }
}

/// The sides of a tunnel, as [`Stamped::side`] and [`Relayed::first_gone`] say them.
const CLIENT: u8 = 1;
const UPSTREAM: u8 = 2;

async fn relay<C, U>(
    client: C,
    upstream: U,
    expires_at: u64,
    idle: Duration,
    ended: impl Future<Output = End>,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let opened = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let gone = Arc::new(AtomicU8::new(0));
    let (l, g) = (last.clone(), gone.clone());
    let close = Arc::new(AtomicU8::new(0));
    let mut c = Stamped {
        inner: client,
        opened,
        last: l,
        bytes: 0,
        side: CLIENT,
        first_gone: g,
        frames: Frames::default(),
        first_close: close.clone(),
    };
    let (l, g) = (last.clone(), gone.clone());
    let mut u = Stamped {
        inner: upstream,
        opened,
        last: l,
        bytes: 0,
        side: UPSTREAM,
        first_gone: g,
        frames: Frames::default(),
        first_close: close.clone(),
    };
    let end = {
        let left = crate::util::until_unix(expires_at);
        let expiry = opened + left.min(Duration::from_secs(u64::from(u32::MAX)));
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
                    break End::Closed;
                }
                _ = tokio::time::sleep_until(expiry) => break End::CredentialExpired,
                end = &mut ended => break end,
                _ = tokio::time::sleep_until(quiet_until) => {
                    let since = Duration::from_millis(last.load(Ordering::Relaxed));
                    if Instant::now() >= opened + since + idle {
                        break End::Idle;
                    }
                }
            }
        }
    };
    Relayed {
        end,
        first_gone: gone.load(Ordering::Relaxed),
        first_close: close.load(Ordering::Relaxed),
        bytes_in: c.bytes,
        bytes_out: u.bytes,
    }
}

/// Records when bytes last arrived from this side (every byte relayed is read first).
struct Stamped<T> {
    inner: T,
    opened: Instant,
    /// Milliseconds after `opened`.
    last: Arc<AtomicU64>,
    /// Read from this side so far.
    bytes: u64,
    /// [`CLIENT`] or [`UPSTREAM`].
    side: u8,
    /// Set, once, to the side of the first end of file or error on a read, or error on
    /// a write or a shutdown.
    first_gone: Arc<AtomicU8>,
    /// Where this side's byte stream is among WebSocket frames.
    frames: Frames,
    /// Set, once, to the side of the first close frame.
    first_close: Arc<AtomicU8>,
}

/// Follows a WebSocket byte stream frame by frame (RFC 6455 §5.2), only as far as
/// telling a close frame (opcode 8) from the others: payloads are skipped, never read.
#[derive(Debug, Default)]
struct Frames {
    /// The frame head read so far (at most 14 bytes).
    head: Vec<u8>,
    /// Payload bytes still to skip.
    skip: u64,
}

impl Frames {
    /// Takes the next bytes of the stream; true when one of them begins a close frame's
    /// payload (the frame head was whole).
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut close = false;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.head.push(bytes[0]);
            bytes = &bytes[1..];
            let Some(need) = self.head_len() else { continue };
            if self.head.len() < need {
                continue;
            }
            close |= self.head[0] & 0x0f == 8;
            let len7 = self.head[1] & 0x7f;
            self.skip = match len7 {
                126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                127 => self.head[2..10].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)),
                n => u64::from(n),
            };
            self.head.clear();
        }
        close
    }

    /// The whole head's length, once its first two bytes tell it.
    fn head_len(&self) -> Option<usize> {
        let b1 = *self.head.get(1)?;
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Some(2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 })
    }
}

impl<T> Stamped<T> {
    /// This side's connection ended (unless the other's did first).
    fn gone<R>(&self, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if let Poll::Ready(Err(_)) = r {
            self.mark_gone();
        }
        r
    }
    fn mark_gone(&self) {
        let _ =
            self.first_gone.compare_exchange(0, self.side, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        // Nothing read into room for it: the end of the stream.
        if matches!(r, Poll::Ready(Ok(()))) && room && buf.filled().len() == before {
            self.mark_gone();
        }
        let r = self.gone(r);
        if buf.filled().len() > before {
            let this = &mut *self;
            if this.frames.feed(&buf.filled()[before..]) {
                let first = &this.first_close;
                let _ = first.compare_exchange(0, this.side, Ordering::Relaxed, Ordering::Relaxed);
            }
            self.bytes += (buf.filled().len() - before) as u64;
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
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.gone(r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.gone(r)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.gone(r)
    }
}

/// The next change of a watch the tunnel may not have (`None`: never).
async fn next_change<T>(
    rx: &mut Option<tokio::sync::watch::Receiver<T>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rx.as_mut() {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A relay between two in-memory pipes with a 60 s idle timeout and no revocation;
    /// the far ends: what the client writes, what the upstream reads.
    fn relay_for(
        expires_in: u64,
    ) -> (tokio::task::JoinHandle<Relayed>, DuplexStream, DuplexStream) {
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
        let relayed = relay.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(relayed.end, End::Idle);
        // What the end event reports: six pings from the client, nothing back.
        assert_eq!((relayed.bytes_in, relayed.bytes_out), (24, 0));
    }

    /// The `close` event says which end closed the tunnel: the first whose side ended
    /// (the other then closes in turn, as a WebSocket close handshake goes), or the
    /// proxy when it ended it.
    #[tokio::test(start_paused = true)]
    async fn a_tunnel_says_which_end_closed_it() {
        for first in ["client", "upstream"] {
            let (relay, mut client_peer, mut upstream_peer) = relay_for(3600);
            // A masked binary frame "hi".
            let hi = [0x82u8, 0x82, 0, 0, 0, 0, b'h', b'i'];
            client_peer.write_all(&hi).await.unwrap_or_else(|e| panic!("{e}"));
            let mut got = [0u8; 8];
            upstream_peer.read_exact(&mut got).await.unwrap_or_else(|e| panic!("{e}"));
            let (closer, other) = if first == "client" {
                (client_peer, upstream_peer)
            } else {
                (upstream_peer, client_peer)
            };
            drop(closer);
            // The other end reads the end of the stream, then closes too.
            let mut other = other;
            let mut rest = Vec::new();
            other.read_to_end(&mut rest).await.unwrap_or_else(|e| panic!("{e}"));
            drop(other);
            let relayed = relay.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(relayed.end, End::Closed, "{first}");
            assert_eq!(relayed.ended_by(), Some(first));
        }
        // A close handshake: whoever sends the first close frame closed the tunnel, even
        // though the server closes its connection first (RFC 6455 §7.1.1). The client's
        // frames are masked, its close frame split across writes after a 300-byte one.
        for (first, client_first) in [("client", true), ("upstream", false)] {
            let (relay, mut client_peer, mut upstream_peer) = relay_for(3600);
            let mut big = vec![0x82, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4];
            big.extend([0u8; 300]);
            let client_close = [0x88u8, 0x82, 9, 9, 9, 9, 0x0b, 0xe1];
            let upstream_close = [0x88u8, 0x02, 0x03, 0xe8];
            client_peer.write_all(&big).await.unwrap_or_else(|e| panic!("{e}"));
            let mut got = vec![0u8; big.len()];
            upstream_peer.read_exact(&mut got).await.unwrap_or_else(|e| panic!("{e}"));
            if client_first {
                client_peer.write_all(&client_close[..3]).await.unwrap_or_else(|e| panic!("{e}"));
                tokio::task::yield_now().await;
                client_peer.write_all(&client_close[3..]).await.unwrap_or_else(|e| panic!("{e}"));
                let mut c = [0u8; 8];
                upstream_peer.read_exact(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
                upstream_peer.write_all(&upstream_close).await.unwrap_or_else(|e| panic!("{e}"));
            } else {
                upstream_peer.write_all(&upstream_close).await.unwrap_or_else(|e| panic!("{e}"));
                let mut c = [0u8; 4];
                client_peer.read_exact(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
                client_peer.write_all(&client_close).await.unwrap_or_else(|e| panic!("{e}"));
                let mut c = [0u8; 8];
                upstream_peer.read_exact(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
            }
            // The server closes its connection first, then the client.
            drop(upstream_peer);
            let mut rest = Vec::new();
            client_peer.read_to_end(&mut rest).await.unwrap_or_else(|e| panic!("{e}"));
            drop(client_peer);
            let relayed = relay.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((relayed.end, relayed.ended_by()), (End::Closed, Some(first)));
        }
        let (relay, _client_peer, _upstream_peer) = relay_for(3600);
        let relayed = relay.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((relayed.end, relayed.ended_by()), (End::Idle, Some("portcullis")));
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
        assert_eq!(end.unwrap_or_else(|e| panic!("{e}")).end, End::CredentialExpired);
    }

    /// `exp` is whole seconds, the clock is not: the tunnel ends at `exp` itself, not up
    /// to a second past it (the time left was counted from the last whole second begun).
    /// On tokio's paused clock the relay's timer fires when it was set for.
    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_at_the_credentials_exp_not_the_second_after() {
        let unix = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        // Away from a whole second, where both ways of counting agree.
        while !(100..900).contains(&unix().subsec_millis()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let before = unix();
        let exp = before.as_secs() + 1;
        let opened = tokio::time::Instant::now();
        let (client, _client_peer) = tokio::io::duplex(64);
        let (upstream, _upstream_peer) = tokio::io::duplex(64);
        let never = std::future::pending();
        let relayed = relay(client, upstream, exp, Duration::from_secs(60), never).await;
        assert_eq!(relayed.end, End::CredentialExpired);
        let lived = opened.elapsed();
        // Tokio's timers round up to the millisecond.
        let to_exp = Duration::from_secs(exp) - before + Duration::from_millis(1);
        assert!(lived <= to_exp, "ended {:?} past exp", lived - to_exp);
    }
}
