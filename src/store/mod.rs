//! The store replicas share, in Redis (`[redis]`, docs/configuration.md): the one place
//! where what one replica learns must bind the others.
//!
//! - **Single-use tokens** (V27): a replica that sees a token for the first time
//!   records it with `SET key 1 NX PX ttl`; a reply of nil means another replica (or
//!   this one) saw it first, and the request is refused as a replay. A check that
//!   cannot be made (Redis down, slow past `timeout`, refusing) fails closed: 503
//!   `replay-check-unavailable`.
//! - **Sign-outs**: a sign-out is recorded in this replica's list at once (as without
//!   Redis), then stored under `signout:ID` until the session would have ended anyway
//!   and published on the `signouts` channel. Every replica subscribes, and on each
//!   (re)subscription first reads back every stored sign-out, so one that was published
//!   while it was disconnected or not yet running is not missed. One that Redis does
//!   not take (unreachable, slow, refusing) is kept and tried again until it does, or
//!   until its session would have ended anyway ([`outbox`]).
//!
//! What Redis says can only *refuse* more: a sign-out it reports ends a session, a
//! replay it reports refuses a token; nothing it answers lets a request through that
//! this replica would refuse on its own (its own replay cache and sign-out list are
//! still consulted first). Whoever can write to Redis can therefore sign people out or
//! refuse single-use tokens, never sign in or replay (docs/threat-model.md).
//!
//! One connection for commands, serialized behind a lock (single-use checks and
//! sign-outs are rare next to the requests that need neither), and one for the
//! subscription. Either is dropped on any error or timeout and made again on next use.

pub mod outbox;
pub mod resp;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

use crate::config::RedisSettings;
use crate::diag::Visible;
use crate::session::revoke::{Revocations, SignOut};
use resp::Value;

/// A connection to Redis: TCP, or TLS over it.
type Conn = BufStream<Box<dyn Io>>;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why the store could not answer. Never holds a credential: Redis does not echo the
/// password in its errors, and connection errors name only the address.
#[derive(Debug)]
pub enum StoreError {
    Connect(String),
    Io(String),
    Protocol(&'static str),
    /// Redis answered with an error (`-ERR …`, `-WRONGPASS …`, `-NOAUTH …`).
    Refused(String),
    /// An answer of a type the command never gives.
    Unexpected,
    Timeout,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The server's text (its certificate's names in a TLS error, its own error
            // replies) escaped: logs write these as they are, and a newline in them
            // would start a log line of the server's making.
            StoreError::Connect(e) => write!(f, "cannot connect: {}", Visible(e)),
            StoreError::Io(e) => write!(f, "connection failed: {}", Visible(e)),
            StoreError::Protocol(why) => write!(f, "protocol error: {why}"),
            StoreError::Refused(e) => write!(f, "Redis refused the command: {}", Visible(e)),
            StoreError::Unexpected => f.write_str("unexpected reply"),
            StoreError::Timeout => f.write_str("timed out"),
        }
    }
}

impl From<resp::ReadError> for StoreError {
    fn from(e: resp::ReadError) -> Self {
        match e {
            resp::ReadError::Io(e) => StoreError::Io(e.to_string()),
            resp::ReadError::Protocol(why) => StoreError::Protocol(why),
        }
    }
}

/// The shared store of one server (it outlives reloads: `[redis]` changes take a
/// restart).
pub struct Store {
    settings: RedisSettings,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The command connection, taken out while a command runs: a command cut short by
    /// the timeout drops it with whatever it had half written or half read.
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// Set once the stored sign-outs were first read back (`/readyz` waits for it).
    synced: std::sync::atomic::AtomicBool,
    /// Told each time the subscription is back and read back: Redis answers again, so
    /// the sign-outs waiting to be shared need not wait out their backoff.
    subscribed_again: tokio::sync::Notify,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("server", &self.settings.shown()).finish_non_exhaustive()
    }
}

/// How long the subscriber waits before connecting again, doubling from the first
/// to the last.
const RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// `wait`, less up to half of it at random: replicas that lost Redis at the same
/// moment (it restarted) do not all come back to it, and read everything back, in the
/// same instant at every attempt.
fn jittered(wait: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    let cut = wait.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0);
    wait.saturating_sub(cut)
}

/// How long a subscription must have held for its loss to start the backoff over.
const STABLE: Duration = Duration::from_secs(30);
/// Keys asked for per `SCAN` page when reading the stored sign-outs back.
const SCAN_PAGE: &str = "512";

impl Store {
    pub fn new(settings: RedisSettings) -> Result<Arc<Store>, String> {
        let tls = if settings.tls {
            let mut c = crate::tls::client_config(settings.ca.as_deref(), false)
                .map_err(|e| format!("[redis]: {e}"))?;
            // Redis speaks no ALPN protocol; offering `http/1.1` would be a lie.
            Arc::make_mut(&mut c).alpn_protocols.clear();
            Some(c)
        } else {
            None
        };
        Ok(Arc::new(Store {
            settings,
            tls,
            conn: tokio::sync::Mutex::new(None),
            synced: Default::default(),
            subscribed_again: tokio::sync::Notify::new(),
        }))
    }

    /// Whether the sign-outs stored in Redis were read back at least once since start.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The server, as logs name it.
    pub fn shown(&self) -> String {
        self.settings.shown()
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.settings.key_prefix)
    }

    fn channel(&self) -> String {
        format!("{}signouts", self.settings.key_prefix)
    }

    /// Records a single-use token (by its replay digest) until `until`, Unix seconds:
    /// `Ok(true)` if no replica had, `Ok(false)` if one had.
    pub async fn first_use(
        &self,
        digest: &[u8; 32],
        until: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        let key = self.key("replay", &hex(digest));
        let ms = until.saturating_sub(now).max(1).saturating_mul(1000).to_string();
        match self.command(&[b"SET", key.as_bytes(), b"1", b"NX", b"PX", ms.as_bytes()]).await? {
            Value::Simple(ok) if ok == "OK" => Ok(true),
            Value::Bulk(None) => Ok(false),
            _ => Err(StoreError::Unexpected),
        }
    }

    /// Stores a sign-out until its session would have ended and tells the other
    /// replicas.
    pub async fn share_sign_out(&self, s: &SignOut, now: u64) -> Result<(), StoreError> {
        let id = URL_SAFE_NO_PAD.encode(s.key);
        let value = s.created.to_string();
        let ms = s.until.saturating_sub(now).max(1).saturating_mul(1000).to_string();
        let key = self.key("signout", &id);
        self.command(&[b"SET", key.as_bytes(), value.as_bytes(), b"PX", ms.as_bytes()]).await?;
        let message = format!("{id} {value}");
        self.command(&[b"PUBLISH", self.channel().as_bytes(), message.as_bytes()]).await?;
        Ok(())
    }

    /// Runs one command on the command connection, connecting first if there is none,
    /// within `timeout` from when it is asked: waiting for the connection (another
    /// command running) counts, so a slow Redis cannot hold a request for longer than
    /// that however many queue behind it. A connection kept from earlier that fails at
    /// once (the server closed it while idle) is replaced once, in the same time.
    pub async fn command(&self, args: &[&[u8]]) -> Result<Value, StoreError> {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut slot = tokio::time::timeout_at(deadline, self.conn.lock())
            .await
            .map_err(|_| StoreError::Timeout)?;
        let attempt = |kept: Option<Conn>| async move {
            let mut conn = match kept {
                Some(c) => c,
                None => self.connect().await?,
            };
            let v = call(&mut conn, args).await?;
            Ok::<_, StoreError>((conn, v))
        };
        let kept = slot.take();
        let had = kept.is_some();
        let result = match tokio::time::timeout_at(deadline, attempt(kept)).await {
            Ok(Err(StoreError::Io(_))) if had => {
                tokio::time::timeout_at(deadline, attempt(None)).await
            }
            other => other,
        };
        match result {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok((conn, Value::Error(e)))) => {
                *slot = Some(conn);
                Err(StoreError::Refused(e))
            }
            Ok(Ok((conn, v))) => {
                *slot = Some(conn);
                Ok(v)
            }
        }
    }

    /// A new connection, authenticated and on the configured database.
    async fn connect(&self) -> Result<Conn, StoreError> {
        let s = &self.settings;
        let tcp = TcpStream::connect((s.host.as_str(), s.port))
            .await
            .map_err(|e| StoreError::Connect(format!("{}: {e}", s.shown())))?;
        let _ = tcp.set_nodelay(true);
        // The subscription only ever reads: without keepalive, a silently dropped
        // connection (a partition, a failed-over address) would never be noticed and
        // other replicas' sign-outs would stop arriving. Probes find it within about
        // a minute, and the subscriber then reconnects and reads back.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(s.host.clone())
                    .map_err(|_| StoreError::Connect(format!("{}: not a TLS name", s.host)))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| StoreError::Connect(format!("{}: TLS: {e}", s.shown())))?;
                Box::new(tls)
            }
        };
        let mut conn = BufStream::new(io);
        if let Some(password) = &s.password {
            let pw = password.expose().as_bytes();
            let auth = match &s.username {
                Some(user) => call(&mut conn, &[b"AUTH", user.as_bytes(), pw]).await?,
                None => call(&mut conn, &[b"AUTH", pw]).await?,
            };
            expect_ok(auth)?;
        }
        if s.db != 0 {
            expect_ok(call(&mut conn, &[b"SELECT", s.db.to_string().as_bytes()]).await?)?;
        }
        Ok(conn)
    }

    /// Keeps this replica's sign-out list in step with the other replicas' until
    /// `drained` (a shutdown's drain is over, or its sender gone): subscribes, reads
    /// back every stored sign-out, then applies each one published; on any failure
    /// connects again (backing off) and reads back again.
    pub async fn follow_sign_outs(
        self: Arc<Self>,
        revocations: Arc<Revocations>,
        lifetime: Arc<dyn Fn() -> Option<u64> + Send + Sync>,
        mut drained: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut wait = RETRY.0;
        loop {
            let mut since = None;
            let run = self.subscribed(&revocations, &*lifetime, &mut since);
            tokio::select! {
                e = run => {
                    // Only a subscription that held a while starts the backoff over: one
                    // cut soon after it was made (a server or a proxy in front that drops
                    // it) would otherwise have every replica read every stored sign-out
                    // back ten times a second.
                    if since.is_some_and(|t| t.elapsed() >= STABLE) {
                        wait = RETRY.0;
                    }
                    crate::metrics::global().redis_errors.inc(&"subscribe");
                    tracing::warn!(server = %self.shown(), error = %e, retry_in = ?wait,
                        "sign-outs from other replicas are not being received; retrying");
                }
                _ = drained.wait_for(|d| *d) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(jittered(wait)) => {}
                _ = drained.wait_for(|d| *d) => return,
            }
            wait = (wait * 2).min(RETRY.1);
        }
    }

    /// One subscription, until it fails; `since` says from when it was followed (read
    /// back), if it got so far.
    async fn subscribed(
        &self,
        revocations: &Revocations,
        lifetime: &(dyn Fn() -> Option<u64> + Send + Sync),
        since: &mut Option<tokio::time::Instant>,
    ) -> StoreError {
        let channel = self.channel();
        let subscribe = async {
            let mut conn = self.connect().await?;
            match call(&mut conn, &[b"SUBSCRIBE", channel.as_bytes()]).await? {
                Value::Array(Some(v)) if v.first() == Some(&bulk("subscribe")) => Ok(conn),
                Value::Error(e) => Err(StoreError::Refused(e)),
                _ => Err(StoreError::Unexpected),
            }
        };
        let mut conn = match tokio::time::timeout(self.settings.timeout, subscribe).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return e,
            Err(_) => return StoreError::Timeout,
        };
        // Subscribed first, then read back: a sign-out published in between is seen
        // twice, which is harmless, rather than not at all.
        if let Err(e) = self.read_back(revocations, lifetime).await {
            return e;
        }
        *since = Some(tokio::time::Instant::now());
        self.synced.store(true, std::sync::atomic::Ordering::Relaxed);
        self.subscribed_again.notify_waiters();
        tracing::info!(server = %self.shown(), "following sign-outs of other replicas");
        loop {
            let message = match resp::read(&mut conn).await {
                Ok(v) => v,
                Err(e) => return e.into(),
            };
            let Value::Array(Some(parts)) = message else { return StoreError::Unexpected };
            match parts.as_slice() {
                [kind, _, Value::Bulk(Some(payload))] if *kind == bulk("message") => {
                    match std::str::from_utf8(payload).ok().and_then(|p| p.split_once(' ')) {
                        Some((id, created)) => apply(revocations, lifetime, id, created),
                        None => ignored(),
                    }
                }
                _ => return StoreError::Unexpected,
            }
        }
    }

    /// Applies every sign-out stored now (`SCAN` then `MGET`, a page at a time).
    async fn read_back(
        &self,
        revocations: &Revocations,
        lifetime: &(dyn Fn() -> Option<u64> + Send + Sync),
    ) -> Result<(), StoreError> {
        let prefix = self.key("signout", "");
        // `key_prefix` may hold `?`, `[` or `\`, which `MATCH` would read as a pattern
        // (`dep[1]:` matching `dep1:` and never itself): matched literally instead.
        let pattern = format!("{}*", glob_literal(&prefix));
        let prefix = prefix.as_bytes();
        let mut cursor = b"0".to_vec();
        // A hostile server could answer cursors forever; a real one runs out of keys
        // long before this many pages of 512.
        for _ in 0..10_000 {
            let page = self
                .command(&[
                    b"SCAN",
                    &cursor,
                    b"MATCH",
                    pattern.as_bytes(),
                    b"COUNT",
                    SCAN_PAGE.as_bytes(),
                ])
                .await?;
            let Value::Array(Some(page)) = page else { return Err(StoreError::Unexpected) };
            let [Value::Bulk(Some(next)), Value::Array(Some(keys))] = page.as_slice() else {
                return Err(StoreError::Unexpected);
            };
            let mut found = Vec::with_capacity(keys.len());
            for key in keys {
                let Value::Bulk(Some(key)) = key else { return Err(StoreError::Unexpected) };
                if key.starts_with(prefix) {
                    found.push(key.as_slice());
                }
            }
            self.apply_stored(&found, prefix.len(), revocations, lifetime).await?;
            if next.as_slice() == b"0" {
                return Ok(());
            }
            cursor = next.clone();
        }
        Err(StoreError::Protocol("SCAN did not finish"))
    }

    /// Applies the sign-outs stored under `keys` (a `SCAN` page's, each the sign-out
    /// prefix, `prefix_len` bytes, then the session id), read with one `MGET`: one round
    /// trip a page, not one a sign-out, so a replica starting beside many stored
    /// sign-outs is ready in a fraction of the time.
    async fn apply_stored(
        &self,
        keys: &[&[u8]],
        prefix_len: usize,
        revocations: &Revocations,
        lifetime: &(dyn Fn() -> Option<u64> + Send + Sync),
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut args: Vec<&[u8]> = Vec::with_capacity(keys.len() + 1);
        args.push(b"MGET");
        args.extend_from_slice(keys);
        let Value::Array(Some(values)) = self.command(&args).await? else {
            return Err(StoreError::Unexpected);
        };
        if values.len() != keys.len() {
            return Err(StoreError::Unexpected);
        }
        for (key, value) in keys.iter().zip(values) {
            let id = key.get(prefix_len..).unwrap_or_default();
            match value {
                Value::Bulk(Some(created)) => {
                    match (std::str::from_utf8(id), std::str::from_utf8(&created)) {
                        (Ok(id), Ok(created)) => apply(revocations, lifetime, id, created),
                        _ => ignored(),
                    }
                }
                // Expired between the two commands.
                Value::Bulk(None) => {}
                _ => return Err(StoreError::Unexpected),
            }
        }
        Ok(())
    }
}

/// Records a sign-out another replica made: session `id` (base64url of 16 bytes),
/// signed in at `created`, kept for this replica's own absolute lifetime (never a
/// lifetime the message names, so a forged message cannot make the list hold entries
/// for ever). Ignored without browser sessions, and when `created` is later than now
/// past the clock skew replicas are assumed to stay within: no session was signed in
/// in the future, and a forged one would be kept until that future plus the lifetime
/// (for ever, in effect), and once the list is full raise its floor there, refusing
/// every session until a restart.
fn apply(
    revocations: &Revocations,
    lifetime: &(dyn Fn() -> Option<u64> + Send + Sync),
    id: &str,
    created: &str,
) {
    let mut key = [0u8; 16];
    let decoded = URL_SAFE_NO_PAD.decode_slice(id, &mut key);
    let (Ok(16), Ok(created), Some(lifetime)) = (decoded, created.parse::<u64>(), lifetime())
    else {
        return ignored();
    };
    let now = crate::util::unix_now();
    if created > now.saturating_add(crate::identity::verify::MAX_LEEWAY.as_secs()) {
        return ignored();
    }
    if matches!(
        revocations.revoke_from_peer(key, created, lifetime, now),
        crate::session::revoke::Revoked::Recorded
            | crate::session::revoke::Revoked::Overflow { .. }
    ) {
        crate::metrics::global()
            .redis_sign_outs_received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn ignored() {
    crate::metrics::global().redis_errors.inc(&"malformed");
}

fn bulk(s: &str) -> Value {
    Value::Bulk(Some(s.as_bytes().to_vec()))
}

fn expect_ok(v: Value) -> Result<(), StoreError> {
    match v {
        Value::Simple(ok) if ok == "OK" => Ok(()),
        Value::Error(e) => Err(StoreError::Refused(e)),
        _ => Err(StoreError::Unexpected),
    }
}

async fn call(conn: &mut Conn, args: &[&[u8]]) -> Result<Value, StoreError> {
    let mut out = Vec::with_capacity(64);
    resp::encode(&mut out, args);
    let io = |e: std::io::Error| StoreError::Io(e.to_string());
    conn.write_all(&out).await.map_err(io)?;
    conn.flush().await.map_err(io)?;
    Ok(resp::read(conn).await?)
}

/// `text` as a Redis glob pattern that matches it and nothing else.
fn glob_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(port: u16) -> RedisSettings {
        RedisSettings {
            host: "127.0.0.1".into(),
            port,
            tls: false,
            ca: None,
            db: 0,
            username: None,
            password: None,
            key_prefix: "t:".into(),
            timeout: Duration::from_millis(200),
        }
    }

    /// A server that answers `reply` to whatever it is sent (or nothing, when empty).
    async fn fake(reply: &'static [u8]) -> u16 {
        fake_after(reply, Duration::ZERO).await
    }

    /// [`fake`], answering each read `delay` after it came in.
    async fn fake_after(reply: &'static [u8], delay: Duration) -> u16 {
        use tokio::io::AsyncReadExt;
        let l =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let port = l.local_addr().map_or(0, |a| a.port());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while s.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        tokio::time::sleep(delay).await;
                        if !reply.is_empty() && s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    /// A server that accepts the subscription and the read-back, then drops the
    /// subscription at once, again and again: the replica backs off rather than reading
    /// everything back every 100 ms.
    #[tokio::test]
    async fn a_subscription_dropped_at_once_each_time_is_retried_backing_off() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncReadExt;
        let l =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let port = l.local_addr().map_or(0, |a| a.port());
        let subscriptions = Arc::new(AtomicUsize::new(0));
        let counted = subscriptions.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let command = &buf[..n];
                        if command.windows(9).any(|w| w == b"SUBSCRIBE") {
                            counted.fetch_add(1, Ordering::Relaxed);
                            let _ =
                                s.write_all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n").await;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            return;
                        }
                        // SCAN: one page, no key.
                        if s.write_all(b"*2\r\n$1\r\n0\r\n*0\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let store = Store::new(settings(port)).unwrap_or_else(|e| panic!("{e}"));
        let (_drained_tx, drained) = tokio::sync::watch::channel(false);
        let follow = store.clone().follow_sign_outs(
            Arc::new(Revocations::default()),
            Arc::new(|| Some(3600)),
            drained,
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), follow).await;
        assert!(store.synced(), "it did subscribe and read back");
        // At least 50 + 100 + 200 + 400 + 800 ms between them (jittered): at most six in
        // two seconds (seventeen when each read-back started the backoff over).
        let n = subscriptions.load(Ordering::Relaxed);
        assert!((2..=6).contains(&n), "{n} subscriptions in two seconds");
    }

    /// The stored sign-outs are read back a page at a time, not a round trip each: a
    /// replica starting beside 100 000 of them across a network would otherwise stay
    /// unready for minutes.
    #[tokio::test]
    async fn stored_sign_outs_are_read_back_with_one_round_trip_a_page() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncReadExt;
        let now = crate::util::unix_now();
        let ids: Vec<String> = (1..=3u8).map(|n| URL_SAFE_NO_PAD.encode([n; 16])).collect();
        let mut scan = b"*2\r\n$1\r\n0\r\n*3\r\n".to_vec();
        let mut values = b"*3\r\n".to_vec();
        for id in &ids {
            let key = format!("t:signout:{id}");
            scan.extend_from_slice(format!("${}\r\n{key}\r\n", key.len()).as_bytes());
            let created = (now - 10).to_string();
            values.extend_from_slice(format!("${}\r\n{created}\r\n", created.len()).as_bytes());
        }
        let one = format!("${}\r\n{}\r\n", (now - 10).to_string().len(), now - 10);
        let l =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let port = l.local_addr().map_or(0, |a| a.port());
        let commands = Arc::new(AtomicUsize::new(0));
        let counted = commands.clone();
        tokio::spawn(async move {
            let Ok((mut s, _)) = l.accept().await else { return };
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                counted.fetch_add(1, Ordering::Relaxed);
                let has = |w: &[u8]| buf[..n].windows(w.len()).any(|x| x == w);
                let reply = if has(b"SCAN") {
                    scan.as_slice()
                } else if has(b"MGET") {
                    values.as_slice()
                } else {
                    one.as_bytes()
                };
                if s.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
        let store = Store::new(settings(port)).unwrap_or_else(|e| panic!("{e}"));
        let revocations = Revocations::default();
        let read = store.read_back(&revocations, &|| Some(3600)).await;
        assert!(read.is_ok(), "{read:?}");
        assert_eq!(revocations.len(), 3, "every stored sign-out applied");
        for n in 1..=3u8 {
            assert!(revocations.refused(&[n; 16], now - 10).is_some(), "{n}");
        }
        assert_eq!(commands.load(Ordering::Relaxed), 2, "SCAN, then one read of the page");
    }

    /// What another replica (or whoever can write to Redis) says is a sign-out is
    /// kept for this replica's own lifetime from a sign-in time that can have been:
    /// never one in the future, which would be kept for ever.
    #[test]
    fn a_sign_out_of_a_session_signed_in_in_the_future_is_ignored() {
        let revocations = Revocations::default();
        let now = crate::util::unix_now();
        let id = URL_SAFE_NO_PAD.encode([5u8; 16]);
        for created in [now + 10 * 24 * 3600, u64::MAX - 1] {
            apply(&revocations, &|| Some(3600), &id, &created.to_string());
            assert!(revocations.is_empty(), "{created}");
        }
        // Within the clock skew replicas may have, and in the past: recorded.
        let id2 = URL_SAFE_NO_PAD.encode([6u8; 16]);
        apply(&revocations, &|| Some(3600), &id, &(now + 60).to_string());
        apply(&revocations, &|| Some(3600), &id2, &(now - 60).to_string());
        assert_eq!(revocations.len(), 2);
    }

    /// `timeout` bounds a command from when it is asked, waiting for the connection
    /// included: a single-use check behind a slow one gets its answer or its 503 within
    /// `timeout`, not twice that.
    #[tokio::test]
    async fn a_command_queued_behind_a_slow_one_is_answered_within_the_timeout() {
        // Answers each command "first use" after 300 ms.
        let port = fake_after(b"+OK\r\n", Duration::from_millis(300)).await;
        let store =
            Store::new(RedisSettings { timeout: Duration::from_millis(400), ..settings(port) })
                .unwrap_or_else(|e| panic!("{e}"));
        let started = std::time::Instant::now();
        let check = || async {
            let r = store.first_use(&[7; 32], 100, 10).await;
            (r.map_err(|e| e.to_string()), started.elapsed())
        };
        let (first, second) = tokio::join!(check(), check());
        assert_eq!(first.0, Ok(true), "the first answered in 300 ms");
        assert_eq!(second.0, Err("timed out".into()), "the second had 100 ms left");
        assert!(second.1 < Duration::from_millis(550), "{:?}", second.1);
    }

    #[test]
    fn retries_are_spread_over_the_second_half_of_the_backoff() {
        let waits: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| jittered(Duration::from_secs(4))).collect();
        assert!(waits.len() > 10, "spread: {waits:?}");
        assert!(waits
            .iter()
            .all(|w| (Duration::from_secs(2)..=Duration::from_secs(4)).contains(w)));
    }

    /// A Redis server whose TLS certificate (signed by the `ca` trusted) holds names of
    /// its own making: rustls quotes them in the connection error ("certificate not valid
    /// for name …"), and the error, as every log line naming it writes it (the
    /// subscription's, the sign-outs', the single-use check's warnings), holds them
    /// escaped: no newline starting a line of the server's making, no ANSI escape, no
    /// bidi override.
    #[tokio::test]
    async fn a_tls_error_quoting_the_servers_certificate_names_is_escaped() {
        use crate::tls::odd_names::{odd_names, FORGED};
        let odd = odd_names();
        let server = crate::dev::issuer::DevIssuer::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            Some(odd.server.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &odd.ca_pem).unwrap_or_else(|e| panic!("{e}"));
        let mut s = settings(server.local_addr().port());
        s.tls = true;
        s.ca = Some(ca);
        s.timeout = Duration::from_secs(10);
        let store = Store::new(s).unwrap_or_else(|e| panic!("{e}"));
        let e = match store.command(&[b"PING"]).await {
            Err(e) => e.to_string(),
            Ok(v) => panic!("answered {v:?}"),
        };
        assert!(e.contains("certificate not valid for name"), "{e}");
        assert!(e.contains(&format!("x\\u000A{FORGED}")), "{e}");
        assert!(e.contains("y\\u001B[2K") && e.contains("z\\u202Elmth"), "{e}");
        assert!(!e.contains(['\n', '\u{1b}', '\u{202e}']), "{e}");
    }

    /// A server that hangs, or answers what no command of the store expects, is a
    /// failure (which a single-use check turns into a 503), never a yes.
    #[tokio::test]
    async fn a_silent_or_strange_server_is_an_error_never_a_first_use() {
        for (reply, want) in [
            (&b""[..], "timed out"),
            (b"+QUEUED\r\n", "unexpected reply"),
            (b":1\r\n", "unexpected reply"),
            (b"-ERR nope\r\n", "Redis refused the command: ERR nope"),
            (b"$99999999\r\n", "protocol error: bulk string length out of bounds"),
        ] {
            let store = Store::new(settings(fake(reply).await)).unwrap_or_else(|e| panic!("{e}"));
            let started = std::time::Instant::now();
            match store.first_use(&[7; 32], 100, 10).await {
                Err(e) => assert_eq!(e.to_string(), want),
                Ok(v) => panic!("{reply:?} answered {v}"),
            }
            assert!(started.elapsed() < Duration::from_secs(2), "bounded by the timeout");
        }
        let store = Store::new(settings(fake(b"$-1\r\n").await)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(store.first_use(&[7; 32], 100, 10).await, Ok(false)), "nil: seen");
    }
}
