//! PostgreSQL through portcullis: stock clients (`psql`, libpq, any driver) present their
//! OIDC token as the password; portcullis verifies it exactly as for HTTP, asks the
//! database route's policy, and authenticates upstream with credentials only it holds.
//!
//! # The session state machine
//!
//! ```text
//! accept ─┬─ first byte 0x16 ───────────────────────────────> TLS (direct, ALPN `postgresql`)
//!         └─ packet ─┬─ SSLRequest ── 'S' ──────────────────> TLS
//!                    ├─ GSSENCRequest ── 'N' ── next packet
//!                    ├─ CancelRequest ── forward by key, close
//!                    ├─ StartupMessage (plaintext) ── FATAL 28000 plaintext-refused
//!                    └─ anything else ── FATAL 08P01 protocol-violation
//! TLS ── StartupMessage (a parameter outside the allow-list: FATAL 0A000, see `startup`)
//!     ── AuthenticationCleartextPassword ── PasswordMessage = token
//!     ── verify (28P01 on failure) ── policy(database, role) (28000 on deny)
//!     ── upstream: TCP (+TLS) ── StartupMessage as the granted role ── SCRAM / md5
//!     ── AuthenticationOk to the client ── ParameterStatus… ── BackendKeyData (ours,
//!        mapped to the backend's) ── ReadyForQuery
//!     ── RELAY ─┬─ client closes / Terminate ─────────────────> SETTLE ── close (audit)
//!               ├─ upstream closes ───────────────────────────> close (audit)
//!               └─ control fires: token exp, max_session, reload revokes access,
//!                  shutdown grace over, client protocol violation
//!                  ── finish the message in flight ── FATAL 57P01 ── Terminate upstream
//!                  ── SETTLE ── close (audit)
//! SETTLE: the server's answers to what was relayed are read (never forwarded) until none
//!         is awaited, so each Bind gets its real outcome; a statement still running is
//!         cancelled (CancelRequest with the backend's key): at once when portcullis
//!         ended the session, after 2 s when the client went away; what is still
//!         unanswered after that is audited with `outcome: "unknown"`.
//! ```
//!
//! Everything before RELAY runs under the route's `startup_timeout`, but forwarding a
//! CancelRequest (bounded on its own, and always audited as one `pg.cancel` event). Every
//! other connection ends in exactly one `pg.session` event with `event = "refused"` or one
//! `open` and one `close`; each statement relayed in between is exactly one
//! `pg.statement` event.
//!
//! A session holds a `server.max_connections` slot; a CancelRequest needs none. With
//! every slot taken, a connection is accepted on one of its listener's [`SEATS`] until its
//! first packet says what it is (within [`SEAT_WAIT`]): a cancel is served there, a
//! StartupMessage waits for a slot off its seat (at most [`WAITERS`] of them per listener;
//! one more, or one still waiting at `startup_timeout`, is refused `53300`). Seats and
//! waiting places are each listener's own, so a flood on one database listener cannot
//! keep another route's cancels or sessions out.
//!
//! The relay never reassembles messages. It reads up to 64 KiB, forwards it, and walks the
//! message headers in what it forwarded ([`proto::Scanner`]); only Query, Parse, Bind,
//! Close and FunctionCall bodies from the client are looked into, and only as far as their
//! text and names (a FunctionCall: its function OID and argument count), plus the server's
//! CommandComplete tags. Which statement a Bind ran follows the server's answers
//! ([`statements`]). Bind parameter values, FunctionCall arguments and the password
//! message never reach the audit log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::audit::AuditSink;
use crate::config::{Config, UpstreamTls};
use crate::http::proxy::Shared;

pub mod cancel;
pub mod events;
mod listeners;
pub mod proto;
pub mod redact;
pub mod scram;
mod session;
pub mod startup;
pub mod statements;
mod stream;
pub mod upstream;

#[cfg(test)]
mod tests;

pub use listeners::{ListenerPlan, Listeners};

/// The ALPN id of PostgreSQL (direct TLS, PostgreSQL 17+ clients).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Connections each database listener accepts while every `max_connections` slot is
/// taken: each until its first packet says what it is. A CancelRequest is then served on
/// its seat (PostgreSQL serves cancels when full: a cancel is how an operator stops the
/// runaway statement that may be holding the slots); a session waits for a slot off its
/// seat (see [`WAITERS`]). Each listener has seats of its own: anyone who can reach one
/// route's port can fill its seats (with silent connections, or cancels its upstream is
/// slow to take), and that must not delay another route's cancels.
pub const SEATS: usize = 8;
/// How long a connection may hold a seat before its first packet (after `SSLRequest` and
/// TLS, if it asks for them) has come in: psql sends it at once. A connection still silent
/// then is refused (`overloaded`), so connections that send nothing cannot keep every
/// seat, and a cancel out, for the route's whole `startup_timeout`.
pub const SEAT_WAIT: Duration = Duration::from_secs(2);
/// Sessions that may wait for a slot at once on each database listener, once their
/// startup packet has come in on a seat; one more is refused with `53300` (reason
/// `overloaded`), as PostgreSQL refuses a session when full. Waiting is bounded by the
/// route's `startup_timeout`. Per listener, as the seats are: startup packets flooding
/// one route's port (no token is asked for before a slot) must not get another route's
/// sessions refused at once.
pub const WAITERS: usize = 16;

/// Where a connection stands against `server.max_connections`. The permits are held
/// (given back when dropped), never read.
#[allow(dead_code)]
pub(crate) enum Place {
    /// A slot: the connection may become a session.
    Slot(OwnedSemaphorePermit),
    /// A seat of the listener the connection came in on (see [`SEATS`]), taken when
    /// every slot was; the slots to wait on, and that listener's places to wait in.
    Seat { seat: OwnedSemaphorePermit, slots: Arc<Semaphore>, waiters: Arc<Semaphore> },
    /// Waiting for a slot in one of its listener's places (see [`WAITERS`]), its seat
    /// given back.
    Waiting(OwnedSemaphorePermit),
}

/// What every database listener and session shares, across reloads.
pub struct Hub {
    pub(crate) shared: Arc<Shared>,
    pub(crate) sink: AuditSink,
    tls: ArcSwap<Option<Arc<rustls::ServerConfig>>>,
    /// Route name → TLS client configuration for its upstream (routes with TLS only).
    upstream_tls: ArcSwap<HashMap<Arc<str>, Arc<rustls::ClientConfig>>>,
    pub(crate) cancels: Arc<cancel::CancelMap>,
    pub(crate) keys: scram::KeyCache,
    /// `server.shutdown_grace` as the server started: the drain's, which a reload does
    /// not change (it warns that a restart is needed).
    grace: Duration,
    /// Turns true when a second SIGTERM/SIGINT ends the grace period early.
    hurried: watch::Receiver<bool>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("postgres::Hub").field("sessions", &self.cancels.len()).finish()
    }
}

/// TLS material for a generation, built before it is swapped in.
#[derive(Debug)]
pub struct Prepared {
    tls: Option<Arc<rustls::ServerConfig>>,
    upstream_tls: HashMap<Arc<str>, Arc<rustls::ClientConfig>>,
    grace: Duration,
}

/// Builds the listener and upstream TLS configurations of a configuration. The listener
/// serves `keys`, the certificates the HTTPS listener's configuration was built from
/// ([`crate::server::tls_config`]): no file is read again, and both serve the same
/// certificate even when one is replaced in between.
pub fn prepare(config: &Config, keys: Option<&crate::tls::KeySet>) -> Result<Prepared, String> {
    let mut upstream_tls = HashMap::new();
    for db in &config.databases {
        if let Some(c) = upstream::client_config(db)? {
            upstream_tls.insert(db.name.clone(), c);
        }
    }
    let tls = match keys.filter(|_| !config.databases.is_empty()) {
        Some(k) => Some(
            crate::tls::server_config_with_alpn(
                k.default.clone(),
                k.sni.clone(),
                vec![ALPN_POSTGRESQL.to_vec()],
            )
            .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    Ok(Prepared { tls, upstream_tls, grace: config.server.shutdown_grace })
}

impl Hub {
    /// `hurried` turns true when the shutdown's grace period is cut short (a second
    /// SIGTERM/SIGINT): open sessions are then ended at once, as when it runs out.
    pub fn new(
        shared: Arc<Shared>,
        sink: AuditSink,
        prepared: Prepared,
        hurried: watch::Receiver<bool>,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            shared,
            sink,
            tls: ArcSwap::from_pointee(prepared.tls),
            upstream_tls: ArcSwap::from_pointee(prepared.upstream_tls),
            cancels: Arc::default(),
            keys: scram::KeyCache::default(),
            grace: prepared.grace,
            hurried,
        })
    }

    /// Waits out the shutdown's grace period, or less if it is cut short; the words say
    /// which, for the session's `close` event.
    pub(crate) async fn grace_over(&self) -> String {
        let grace = self.grace;
        let mut hurried = self.hurried.clone();
        tokio::select! {
            () = tokio::time::sleep(grace) => format!("server shutting down; grace period ({grace:?}) over"),
            () = crate::server::grace_over(&mut hurried) => {
                "server shutting down; grace period ended early by a second signal".to_string()
            }
        }
    }

    /// Called after a reload swapped the runtime in, before the new generation is
    /// announced ([`Shared::reloads`], on which every open session re-evaluates its
    /// identity against the new policy): new TLS material.
    pub fn reloaded(&self, prepared: Prepared) {
        self.tls.store(Arc::new(prepared.tls));
        self.upstream_tls.store(Arc::new(prepared.upstream_tls));
        // Passwords may have changed; derived SCRAM keys are keyed by password anyway,
        // but nothing derived from an old secret should outlive its configuration.
        self.keys.clear();
    }

    /// Logs in to database route `route`'s upstream as its `upstream_user`, on
    /// `database`, with the password the configuration holds, then ends that session:
    /// `demo --postgres` checks its password at start rather than at the first `psql`.
    /// The error names the route, the server and the role, never the password.
    pub async fn check_upstream_login(&self, route: &str, database: &str) -> Result<(), String> {
        let rt = self.shared.runtime.load_full();
        let db = rt
            .config
            .databases
            .iter()
            .find(|d| &*d.name == route)
            .ok_or_else(|| format!("no database route `{route}`"))?;
        let role = db.upstream_user.as_str();
        let password = db.password_for(role).ok_or_else(|| format!("no password for `{role}`"))?;
        let tls = self.upstream_tls(route);
        let mut up = upstream::connect(db, tls.as_ref()).await.map_err(|e| e.to_string())?;
        let loopback = crate::config::is_loopback_host(&db.host);
        let login = upstream::authenticate(
            &mut up,
            role,
            password,
            database,
            &[],
            loopback,
            &self.keys,
            db.upstream_tls,
        );
        tokio::time::timeout(db.connect_timeout, login)
            .await
            .map_err(|_| format!("{} did not finish the login in time", db.upstream_display))?
            .map_err(|e| e.to_string())?;
        // Terminate: the server ends the session at once.
        let _ = tokio::io::AsyncWriteExt::write_all(&mut up, &[b'X', 0, 0, 0, 4]).await;
        Ok(())
    }

    /// Open sessions (those that got a cancel key).
    pub fn open_sessions(&self) -> usize {
        self.cancels.len()
    }

    pub(crate) fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        (**self.tls.load()).clone()
    }

    pub(crate) fn upstream_tls(&self, route: &str) -> Option<Arc<rustls::ClientConfig>> {
        self.upstream_tls.load().get(route).cloned()
    }

    /// The configuration generation in force, as announced after each reload.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.reloads.subscribe()
    }

    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    /// Accepts sessions on one database listener until shutdown or until the listener is
    /// closed (`route`'s sender dropped: a reload removed or moved the route). `route` names
    /// the route the listener serves; a reload may hand the listener to another route.
    ///
    /// At shutdown it waits for the sessions to end (each terminates itself when the
    /// grace period is over). A closed listener's sessions go on: a moved route's for as
    /// long as the new generation allows them, a removed route's until they re-evaluate
    /// against it and end themselves (`access-revoked`).
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut route: watch::Receiver<Arc<str>>,
        limit: Arc<Semaphore>,
        per_client: Arc<crate::server::per_client::PerClient>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut sessions = tokio::task::JoinSet::new();
        // This listener's own seats and waiting places (see `SEATS`, `WAITERS`): a
        // flood on another database listener takes none of them. They stay with the
        // listener (its port) when a reload hands it to another route.
        let seats = Arc::new(Semaphore::new(SEATS));
        let waiters = Arc::new(Semaphore::new(WAITERS));
        let name = match listener.local_addr() {
            Ok(a) => format!("database listener {a}"),
            Err(_) => "database listener".to_string(),
        };
        let mut failures = crate::server::per_client::Throttle::default();
        let closed = loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        crate::server::accept_failed(&name, &e, &mut failures).await;
                        continue;
                    }
                },
                _ = stopped(&mut shutdown) => break false,
                r = route.changed() => {
                    if r.is_err() { break true }
                    route.borrow_and_update();
                    continue;
                }
            };
            // Counted against its client first, with the HTTP listeners' connections;
            // over its client's limit it is reset at once, unread and holding no slot.
            let per_client_limit =
                self.shared.runtime.load().config.server.max_connections_per_client;
            let Some(client) = per_client.admit(peer.ip(), per_client_limit) else {
                crate::server::per_client::reset(stream);
                continue;
            };
            // The session's slot, taken once it is accepted (a loop waiting for clients
            // holds none). With every slot taken it gets one of this listener's seats, on
            // which a cancel request is served; with every seat taken too it waits for
            // either, unserved. The error says whether the listener was closed.
            let place = match limit.clone().try_acquire_owned() {
                Ok(p) => Ok(Place::Slot(p)),
                Err(TryAcquireError::Closed) => Err(false),
                Err(TryAcquireError::NoPermits) => loop {
                    tokio::select! {
                        biased;
                        p = limit.clone().acquire_owned() => break p.map(Place::Slot).map_err(|_| false),
                        s = seats.clone().acquire_owned() => {
                            let seat = |seat| Place::Seat {
                                seat,
                                slots: limit.clone(),
                                waiters: waiters.clone(),
                            };
                            break s.map(seat).map_err(|_| false)
                        }
                        _ = stopped(&mut shutdown) => break Err(false),
                        r = route.changed() => match r {
                            Ok(()) => { route.borrow_and_update(); }
                            Err(_) => break Err(true),
                        },
                    }
                },
            };
            let place = match place {
                Ok(p) => p,
                Err(closed) => break closed,
            };
            let _ = stream.set_nodelay(true);
            let hub = self.clone();
            let name = route.borrow_and_update().clone();
            let stop = shutdown.clone();
            sessions.spawn(async move {
                // Both given back, and the connection no longer counted open, however
                // the session ends (its task is dropped when aborted at shutdown).
                let _held = client;
                let _open = crate::metrics::OpenConnection::new();
                session::run(hub, name, stream, peer, stop, place).await;
            });
            // Reap finished sessions so the set does not grow without bound.
            while sessions.try_join_next().is_some() {}
        };
        drop(listener);
        if closed {
            loop {
                tokio::select! {
                    r = sessions.join_next() => if r.is_none() { return },
                    _ = stopped(&mut shutdown) => break,
                }
            }
        }
        let limit = self.grace() + Duration::from_secs(5);
        if tokio::time::timeout(limit, async { while sessions.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            let route = route.borrow().clone();
            tracing::warn!(route = %route, "database sessions still open after the grace period; aborting them");
            sessions.abort_all();
            // Wait until each aborted task is dropped: its `close` event (reason
            // `shutting-down`) is written then, before the audit output is flushed.
            while sessions.join_next().await.is_some() {}
        }
    }
}

/// Warnings for settings that weaken security, logged at start-up.
pub fn warnings(config: &Config) -> Vec<String> {
    config
        .databases
        .iter()
        .filter(|d| d.upstream_tls == UpstreamTls::Require)
        .map(|d| {
            format!(
                "database route `{}`: upstream_tls = \"require\" encrypts but does not authenticate the upstream server; use \"verify-full\" with upstream_ca",
                d.name
            )
        })
        .collect()
}

/// Bound address of each database route.
pub type BoundDatabases = Vec<(Arc<str>, SocketAddr)>;

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
