//! One client connection, from accept to close: the front end (TLS, startup, token,
//! policy), the upstream leg, the relay, and the control that ends a session early.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::cancel::{CancelGuard, CancelTarget};
use super::events::{CancelEvent, SessionEvent, StartupParameters, StatementEvent};
use super::proto::{self, Captured, Initial, ReadError, Scanner, Severity};
use super::startup;
use super::statements::{is_utf8, Record, Tracker};
use super::upstream::{self, UpstreamError, UpstreamStream};
use super::{Hub, Place, ALPN_POSTGRESQL};
use crate::audit::{now_rfc3339, TlsInfo};
use crate::config::{is_loopback_host, DatabaseSettings};
use crate::identity::{Admission, Credential, Identity};
use crate::policy::{RequestFacts, RuleRef};
use crate::reason::Reason;
use crate::server::Runtime;

/// The client connection, before and after TLS.
type Client = super::stream::MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// What is known about a connection so far, for its audit events.
#[derive(Default)]
struct Facts {
    tls: Option<TlsInfo>,
    database: Option<String>,
    role: Option<String>,
    application_name: Option<String>,
    /// What was forwarded upstream from the startup packet (see `startup`).
    startup_parameters: Vec<(String, String)>,
    identity: Option<Arc<Identity>>,
    /// The key that verified the token ([`crate::identity::Verifier::signing_key`]).
    signing_key: Option<crate::identity::SigningKey>,
    rule: Option<Arc<RuleRef>>,
    upstream_role: Option<String>,
    /// Set while the connection waits for a `max_connections` slot (see [`take_slot`]).
    waiting_for_slot: bool,
}

/// Why the front end did not produce a session.
struct Refusal {
    reason: Reason,
    detail: String,
}

fn refusal(reason: Reason, detail: impl Into<String>) -> Refusal {
    Refusal { reason, detail: detail.into() }
}

/// An authenticated session, ready to relay.
struct Established {
    client: Client,
    upstream: UpstreamStream,
    _db: Arc<DatabaseSettings>,
    _cancel: CancelGuard,
    /// The backend's own cancel key, to stop a statement still running when the session
    /// ends (`None`: the server sent no BackendKeyData).
    backend: Option<CancelTarget>,
    /// `standard_conforming_strings` as the server reported it at startup.
    scs: Option<bool>,
    /// `server_encoding` as the server reported it at startup.
    server_encoding: Option<String>,
}

enum Outcome {
    Session(Established),
    Refused(Refusal),
    /// A CancelRequest with the key it carries, to forward once the set-up's timeout is
    /// no longer running (see [`cancel`]); the client's connection is closed after it.
    Cancel {
        client: Client,
        pid: u32,
        secret: u32,
    },
    /// A connection that sent nothing at all, or went away at once.
    Silent,
}

pub(super) async fn run(
    hub: Arc<Hub>,
    route: Arc<str>,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    mut place: Place,
) {
    // Subscribe before loading the runtime: a reload in between is then seen as a change.
    let mut generation = hub.subscribe();
    generation.borrow_and_update();
    let rt = hub.shared.runtime.load_full();
    // Before the token is verified: a key set dropping its key from then on is seen.
    let removals = rt.verifier.key_removals();
    let sid = crate::http::next_request_id();
    let started = Instant::now();
    let mut facts = Facts::default();
    let Some(db) = rt.config.databases.iter().find(|d| d.name == route).cloned() else {
        let mut tcp = tcp;
        let _ = tcp
            .write_all(&proto::error_response(
                Severity::Fatal,
                "08004",
                &format!(
                    "portcullis: no-route: database route `{route}` was removed (request id {sid})"
                ),
            ))
            .await;
        emit_refused(
            &hub,
            &rt,
            &route,
            "",
            peer,
            &sid,
            &facts,
            &refusal(Reason::NoRoute, "database route removed by a reload"),
        );
        return;
    };
    // Fail closed (`[audit] on_failure = "reject"`): no new session while the audit log
    // is not being written. Sessions already open go on.
    let audit = hub.sink.health().present();
    if audit != crate::audit::AuditStatus::Ok
        && rt.config.audit_on_failure == crate::config::AuditOnFailure::Reject
    {
        let mut tcp = tcp;
        let text = format!("portcullis: audit-unavailable: try again later (request id {sid})");
        let _ = tcp.write_all(&proto::error_response(Severity::Fatal, "57P03", &text)).await;
        let detail =
            format!("refused: the audit log is {} (on_failure = \"reject\")", audit.as_str());
        emit_refused(
            &hub,
            &rt,
            &route,
            &db.upstream_display,
            peer,
            &sid,
            &facts,
            &refusal(Reason::AuditUnavailable, detail),
        );
        return;
    }
    // One deadline for the whole set-up: a session waiting for a slot is refused at it
    // by `take_slot` itself, with an ErrorResponse, just before this timeout would drop
    // the connection without a word (`Timeout` polls the set-up before its timer).
    let deadline = tokio::time::Instant::now() + db.startup_timeout;
    let outcome = match tokio::time::timeout_at(
        deadline,
        establish(&hub, &rt, &db, tcp, &sid, &mut facts, &mut place, deadline),
    )
    .await
    {
        Ok(o) => o,
        Err(_) if facts.waiting_for_slot => Outcome::Refused(refusal(
            Reason::Overloaded,
            format!(
                "every connection slot (server.max_connections) stayed taken for the route's startup_timeout ({:?})",
                db.startup_timeout
            ),
        )),
        Err(_) => Outcome::Refused(refusal(
            Reason::ProtocolViolation,
            format!("session set-up not finished within {:?}", db.startup_timeout),
        )),
    };
    let est = match outcome {
        Outcome::Session(e) => e,
        Outcome::Refused(r) => {
            emit_refused(&hub, &rt, &route, &db.upstream_display, peer, &sid, &facts, &r);
            return;
        }
        Outcome::Cancel { client, pid, secret } => {
            // Not under `startup_timeout`: forwarding has bounds of its own (the upstream
            // connect, then 2 s for the server to close), and a cancel that reached the
            // backend once that timeout had run out went unaudited, its client blamed
            // for a set-up not finished. The client's connection closes after it, as
            // PostgreSQL's does once the backend was signalled.
            cancel(&hub, &db, peer, pid, secret).await;
            drop(client);
            return;
        }
        Outcome::Silent => return,
    };
    let (Some(identity), Some(database), Some(upstream_role)) =
        (facts.identity.clone(), facts.database.clone(), facts.upstream_role.clone())
    else {
        return;
    };
    // What every event of this session says; `open` as is, `close` with how it ended.
    let event = |event: &'static str| SessionEvent {
        ts: now_rfc3339(),
        kind: "pg.session",
        event,
        session_id: &sid,
        route: &route,
        client_addr: peer,
        tls: facts.tls.as_ref(),
        database: Some(&database),
        role: facts.role.as_deref(),
        upstream_role: Some(&upstream_role),
        upstream: &db.upstream_display,
        application_name: facts.application_name.as_deref(),
        startup_parameters: None,
        decision: "allow",
        reason: Reason::Allowed.code(),
        detail: None,
        rule: facts.rule.as_deref(),
        policy_revision: &rt.revision,
        identity: Some(identity.audit_fields().0),
        ci: identity.audit_fields().1,
        ended_by: None,
        duration_ms: None,
        bytes_in: None,
        bytes_out: None,
        statements: None,
        cancel_sent: None,
    };
    hub.sink.emit(&SessionEvent {
        startup_parameters: Some(StartupParameters(&facts.startup_parameters)),
        ..event("open")
    });
    let m = crate::metrics::global();
    m.pg_sessions.inc(&(route.clone(), "allow", Reason::Allowed.code()));
    let counters = RouteCounters::open(&route);
    let totals = Totals::default();
    let ctx = StatementContext {
        hub: &hub,
        counters: &counters,
        totals: &totals,
        sid: &sid,
        route: &route,
        database: &database,
        upstream_role: &upstream_role,
        identity: &identity,
    };
    let credential = Credential::Token(facts.signing_key.take());
    let admission = Admission::new(identity.clone(), credential, &rt.config);
    let control = control(
        &hub,
        &admission,
        &database,
        facts.role.as_deref(),
        &upstream_role,
        &db,
        (generation, removals),
        stop,
    );
    // Exactly one `close` per `open`: written below when the relay ends, or by this guard
    // when the task is dropped first (the shutdown drain aborts sessions still open after
    // the grace period).
    let close = |end: &End| {
        if let Some(r) = end.reason {
            m.pg_terminations.inc(&(route.clone(), r.code()));
        }
        let revision = hub.shared.runtime.load().revision.clone();
        hub.sink.emit(&SessionEvent {
            decision: if end.reason.is_some() { "terminated" } else { "closed" },
            reason: end.reason.map_or("closed", Reason::code),
            detail: end.detail.as_deref(),
            policy_revision: &revision,
            ended_by: Some(end.by),
            duration_ms: Some(crate::util::millis(started.elapsed())),
            bytes_in: Some(totals.bytes_in.load(Ordering::Relaxed)),
            bytes_out: Some(totals.bytes_out.load(Ordering::Relaxed)),
            statements: Some(totals.statements.load(Ordering::Relaxed)),
            cancel_sent: end.cancel_sent.then_some(true),
            ..event("close")
        });
    };
    let mut guard = OnDrop(Some(|| {
        close(&End {
            reason: Some(Reason::ShuttingDown),
            detail: Some(
                "server shutting down: the session was still open when the drain after the grace period aborted it"
                    .to_string(),
            ),
            by: "portcullis",
            cancel_sent: false,
        });
    }));
    let end = relay(est, control, &ctx).await;
    guard.0 = None;
    close(&end);
    drop(counters);
}

/// Runs its closure when dropped, unless it was taken out first.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A session's per-route metrics, resolved once when it opens; the open-sessions gauge
/// goes down when this is dropped, however the session ends.
struct RouteCounters {
    route: Arc<str>,
    statements: Arc<AtomicU64>,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
}

impl RouteCounters {
    fn open(route: &Arc<str>) -> RouteCounters {
        let m = crate::metrics::global();
        m.pg_sessions_open.inc(route);
        RouteCounters {
            route: route.clone(),
            statements: m.pg_statements.handle(route),
            bytes_in: m.pg_bytes.handle(&(route.clone(), "in")),
            bytes_out: m.pg_bytes.handle(&(route.clone(), "out")),
        }
    }
}

impl Drop for RouteCounters {
    fn drop(&mut self) {
        crate::metrics::global().pg_sessions_open.sub(&self.route, 1);
    }
}

#[allow(clippy::too_many_arguments)]
fn emit_refused(
    hub: &Hub,
    rt: &Runtime,
    route: &Arc<str>,
    upstream: &str,
    peer: SocketAddr,
    sid: &str,
    facts: &Facts,
    r: &Refusal,
) {
    let id = facts.identity.as_deref();
    crate::metrics::global().pg_sessions.inc(&(route.clone(), "deny", r.reason.code()));
    let budget = crate::audit::Budget::of(id.is_some());
    hub.sink.emit_as(
        budget,
        &SessionEvent {
            ts: now_rfc3339(),
            kind: "pg.session",
            event: "refused",
            session_id: sid,
            route,
            client_addr: peer,
            tls: facts.tls.as_ref(),
            database: facts.database.as_deref(),
            role: facts.role.as_deref(),
            upstream_role: facts.upstream_role.as_deref(),
            upstream,
            application_name: facts.application_name.as_deref(),
            startup_parameters: None,
            decision: "deny",
            reason: r.reason.code(),
            detail: Some(&r.detail),
            rule: facts.rule.as_deref(),
            policy_revision: &rt.revision,
            identity: id.map(|i| i.audit_fields().0),
            ci: id.and_then(|i| i.audit_fields().1),
            ended_by: None,
            duration_ms: None,
            bytes_in: None,
            bytes_out: None,
            statements: None,
            cancel_sent: None,
        },
    );
}

/// A read during set-up failed: a protocol error is answered (08P01), an I/O error ends
/// the attempt, and `closed` says what the client closing means at this point (`None`:
/// a silent end, nothing to audit).
async fn read_failed(
    client: &mut Client,
    sid: &str,
    e: ReadError,
    closed: Option<(Reason, &'static str)>,
) -> Outcome {
    match e {
        ReadError::Closed => match closed {
            Some((reason, detail)) => Outcome::Refused(refusal(reason, detail)),
            None => Outcome::Silent,
        },
        ReadError::Io(e) => {
            Outcome::Refused(refusal(Reason::ProtocolViolation, format!("read: {e}")))
        }
        ReadError::Protocol(m) => refuse(client, "08P01", Reason::ProtocolViolation, sid, m).await,
    }
}

/// Sends a FATAL ErrorResponse (best effort) and returns the refusal.
async fn refuse(
    client: &mut Client,
    sqlstate: &str,
    reason: Reason,
    sid: &str,
    detail: impl Into<String>,
) -> Outcome {
    refuse_saying(client, sqlstate, reason, sid, None, detail).await
}

/// [`refuse`], telling the client `shown` after the reason code (never a secret: what
/// the client itself sent, or a fixed text).
async fn refuse_saying(
    client: &mut Client,
    sqlstate: &str,
    reason: Reason,
    sid: &str,
    shown: Option<&str>,
    detail: impl Into<String>,
) -> Outcome {
    let text = match shown {
        Some(shown) => format!("portcullis: {}: {shown} (request id {sid})", reason.public_code()),
        None => format!("portcullis: {} (request id {sid})", reason.public_code()),
    };
    let _ = client.write_all(&proto::error_response(Severity::Fatal, sqlstate, &text)).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
    Outcome::Refused(refusal(reason, detail))
}

fn tls_info(s: &tokio_rustls::server::TlsStream<TcpStream>) -> TlsInfo {
    let (_, sess) = s.get_ref();
    TlsInfo {
        version: match sess.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        },
        sni: sess.server_name().map(|s| Arc::from(s.to_ascii_lowercase())),
    }
}

async fn accept_tls(
    hub: &Hub,
    tcp: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Refusal> {
    let Some(cfg) = hub.server_tls() else {
        return Err(refusal(Reason::InternalError, "no TLS configuration for database routes"));
    };
    tokio_rustls::TlsAcceptor::from(cfg)
        .accept(tcp)
        .await
        .map_err(|e| refusal(Reason::ProtocolViolation, format!("TLS handshake failed: {e}")))
}

/// Up to the first packet that says what the connection is (after `SSLRequest` and TLS,
/// if it asks for them): a StartupMessage, inside TLS, is returned with the client; any
/// other end of it is the outcome.
async fn first_packet(
    hub: &Hub,
    tcp: TcpStream,
    sid: &Arc<str>,
    facts: &mut Facts,
) -> Result<(Client, u16, Vec<(String, String)>), Outcome> {
    // Phase 1: plaintext negotiation, up to TLS.
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) | Err(_) => return Err(Outcome::Silent),
        Ok(_) => {}
    }
    let mut client = if first[0] == 0x16 {
        // Direct TLS (PostgreSQL 17 `sslnegotiation=direct`): ALPN is mandatory.
        let s = match accept_tls(hub, tcp).await {
            Ok(s) => s,
            Err(r) => return Err(Outcome::Refused(r)),
        };
        facts.tls = Some(tls_info(&s));
        let alpn_ok = s.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL);
        let mut c = Client::Tls(Box::new(s));
        if !alpn_ok {
            return Err(refuse(
                &mut c,
                "08P01",
                Reason::ProtocolViolation,
                sid,
                "direct TLS without ALPN `postgresql`",
            )
            .await);
        }
        c
    } else {
        let mut tcp = tcp;
        let mut gss_declined = false;
        loop {
            let initial = proto::read_initial(&mut tcp).await;
            let mut c = Client::Plain(tcp);
            match initial {
                Ok(Initial::Ssl) => {
                    let Client::Plain(t) = c else { return Err(Outcome::Silent) };
                    tcp = t;
                    // CVE-2021-23214: bytes sent before our answer would be taken as
                    // encrypted by a careless server. Refuse them, as PostgreSQL does.
                    let mut probe = [0u8; 1];
                    if let Ok(n) = tcp.try_read(&mut probe) {
                        let mut c = Client::Plain(tcp);
                        if n == 0 {
                            return Err(Outcome::Refused(refusal(
                                Reason::ProtocolViolation,
                                "closed after SSLRequest",
                            )));
                        }
                        return Err(refuse(
                            &mut c,
                            "08P01",
                            Reason::ProtocolViolation,
                            sid,
                            "received unencrypted data after SSL request",
                        )
                        .await);
                    }
                    if let Err(e) = tcp.write_all(b"S").await {
                        return Err(Outcome::Refused(refusal(
                            Reason::ProtocolViolation,
                            format!("write: {e}"),
                        )));
                    }
                    let s = match accept_tls(hub, tcp).await {
                        Ok(s) => s,
                        Err(r) => return Err(Outcome::Refused(r)),
                    };
                    facts.tls = Some(tls_info(&s));
                    break Client::Tls(Box::new(s));
                }
                Ok(Initial::GssEnc) if !gss_declined => {
                    gss_declined = true;
                    let Client::Plain(t) = c else { return Err(Outcome::Silent) };
                    tcp = t;
                    if tcp.write_all(b"N").await.is_err() {
                        return Err(Outcome::Silent);
                    }
                }
                Ok(Initial::GssEnc) => {
                    return Err(refuse(
                        &mut c,
                        "08P01",
                        Reason::ProtocolViolation,
                        sid,
                        "GSSENCRequest repeated",
                    )
                    .await);
                }
                Ok(Initial::Cancel { pid, secret }) => {
                    return Err(Outcome::Cancel { client: c, pid, secret });
                }
                Ok(Initial::Startup { params, .. }) => {
                    // Unchecked names, for the refused event: cut as the server cuts them.
                    let user = param(&params, "user");
                    facts.role = user.map(name_as_read);
                    facts.database = param(&params, "database").or(user).map(name_as_read);
                    return Err(refuse(&mut c, "28000", Reason::PlaintextRefused, sid, "StartupMessage without TLS; the client must use sslmode=require (or stricter)").await);
                }
                Err(e) => return Err(read_failed(&mut c, sid, e, None).await),
            }
        }
    };

    // Phase 2: the StartupMessage, inside TLS.
    match proto::read_initial(&mut client).await {
        Ok(Initial::Startup { minor, params }) => Ok((client, minor, params)),
        Ok(Initial::Cancel { pid, secret }) => Err(Outcome::Cancel { client, pid, secret }),
        Ok(Initial::Ssl | Initial::GssEnc) => Err(refuse(
            &mut client,
            "08P01",
            Reason::ProtocolViolation,
            sid,
            "encryption requested inside TLS",
        )
        .await),
        Err(e) => {
            let closed = (Reason::ProtocolViolation, "closed before the startup message");
            Err(read_failed(&mut client, sid, e, Some(closed)).await)
        }
    }
}

#[allow(clippy::too_many_lines, clippy::too_many_arguments)]
async fn establish(
    hub: &Hub,
    rt: &Runtime,
    db: &Arc<DatabaseSettings>,
    tcp: TcpStream,
    sid: &Arc<str>,
    facts: &mut Facts,
    place: &mut Place,
    deadline: tokio::time::Instant,
) -> Outcome {
    // On a seat (every slot was taken), only for `SEAT_WAIT`: connections that send
    // nothing must not keep every seat, and cancels out, for the whole `startup_timeout`.
    let first = first_packet(hub, tcp, sid, facts);
    let first = if matches!(place, Place::Seat { .. }) {
        match tokio::time::timeout(super::SEAT_WAIT, first).await {
            Ok(r) => r,
            Err(_) => {
                return Outcome::Refused(refusal(
                    Reason::Overloaded,
                    format!(
                        "every connection slot (server.max_connections) taken, and no startup or cancel packet within {:?} on a seat",
                        super::SEAT_WAIT
                    ),
                ))
            }
        }
    } else {
        first.await
    };
    let (mut client, minor, params) = match first {
        Ok(f) => f,
        Err(outcome) => return outcome,
    };
    // A session, not a cancel request: it needs a slot of its own.
    if let Err(refused) =
        take_slot(place, &mut client, sid, facts, (deadline, db.startup_timeout)).await
    {
        return refused;
    }
    // An empty one too, as PostgreSQL refuses it: the policy would see the database as
    // "" (no rule naming a database matches it), while the server, given an empty
    // database, picks the one named like the upstream role.
    let Some(role) = param(&params, "user").filter(|u| !u.is_empty()).map(str::to_string) else {
        return refuse(
            &mut client,
            "28000",
            Reason::BadRequest,
            sid,
            "no user name in the startup packet",
        )
        .await;
    };
    let database =
        param(&params, "database").filter(|d| !d.is_empty()).unwrap_or(&role).to_string();
    // PostgreSQL cuts names to 63 bytes (NAMEDATALEN - 1): a longer one would be matched
    // by policy as written but used by the server as cut. Refused instead.
    if role.len() > PG_NAME_MAX || database.len() > PG_NAME_MAX {
        return refuse(
            &mut client,
            "42622",
            Reason::BadRequest,
            sid,
            "user or database name longer than 63 bytes",
        )
        .await;
    }
    facts.role = Some(role.clone());
    facts.database = Some(database.clone());
    facts.application_name = params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("application_name"))
        .map(|(_, a)| a.chars().take(64).collect());
    if param(&params, "replication").is_some_and(|r| !matches!(r, "false" | "off" | "no" | "0")) {
        return refuse(
            &mut client,
            "0A000",
            Reason::BadRequest,
            sid,
            "replication connections are not supported",
        )
        .await;
    }
    // Only settings that cannot change who the session is or what applies to it reach
    // the server (see `startup`); the rest refuse the session before the token is asked
    // for. `client_encoding` must be UTF8: the audit reads statement text and names as
    // UTF8 (see `statements`). Under PostgreSQL's client-only encodings (SJIS, BIG5,
    // GBK, GB18030, UHC, JOHAB) a multi-byte character's second byte can be `\` or `'`,
    // so the masker would split literals where the server does not, and different name
    // bytes can be one name to the server.
    let mut forwarded = match startup::forwarded(&params, &db.startup_parameters) {
        Ok(f) => f,
        Err(e) => {
            let (sqlstate, reason) = match e {
                startup::Refused::Unsupported(_) => ("0A000", Reason::UnsupportedStartupParameter),
                startup::Refused::Encoding(_) => ("0A000", Reason::UnsupportedEncoding),
                startup::Refused::Twice(..) => ("08P01", Reason::ProtocolViolation),
            };
            let shown = e.shown();
            return refuse_saying(&mut client, sqlstate, reason, sid, shown.as_deref(), e.detail())
                .await;
        }
    };
    if db.session_id_in_application_name {
        startup::with_session_id(&mut forwarded, sid);
    }
    facts.startup_parameters = forwarded.clone();
    let ignored: Vec<&str> =
        params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.as_str()).collect();
    if (minor > 0 || !ignored.is_empty())
        && client.write_all(&proto::negotiate_protocol_version(&ignored)).await.is_err()
    {
        return Outcome::Silent;
    }

    // Phase 3: the token, as a cleartext password over TLS.
    if client.write_all(&proto::auth(3, &[])).await.is_err() || client.flush().await.is_err() {
        return Outcome::Silent;
    }
    let token = match proto::read_message(&mut client, proto::MAX_PASSWORD_LEN).await {
        Ok((b'p', body)) => {
            let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
            match String::from_utf8(body[..end].to_vec()) {
                Ok(t) if !t.is_empty() => t,
                _ => {
                    return refuse(
                        &mut client,
                        "28P01",
                        Reason::MissingToken,
                        sid,
                        "empty or non-UTF-8 password",
                    )
                    .await
                }
            }
        }
        Ok((other, _)) => {
            return refuse(
                &mut client,
                "08P01",
                Reason::ProtocolViolation,
                sid,
                format!("expected a password message, got `{}`", other.escape_ascii()),
            )
            .await;
        }
        Err(e) => {
            let closed = (Reason::MissingToken, "client closed at the password prompt");
            return read_failed(&mut client, sid, e, Some(closed)).await;
        }
    };
    let identity = match rt.verifier.verify(&token).await {
        Ok(i) => i,
        Err(e) => return refuse(&mut client, "28P01", e.reason, sid, e.detail.into_owned()).await,
    };
    // What the session stays admitted by: a key gone since the verification (a refresh
    // in between) refuses it, as it would end it.
    let Some(key) = rt.verifier.signing_key(&token) else {
        let detail = "the key that verified the token left the issuer's key set";
        return refuse(&mut client, "28P01", Reason::UnknownKey, sid, detail).await;
    };
    facts.signing_key = Some(key);
    drop(token);
    facts.identity = Some(identity.clone());
    if identity.expires_at <= crate::util::unix_now() {
        return refuse(
            &mut client,
            "28P01",
            Reason::TokenExpired,
            sid,
            "the token expires before the session could start",
        )
        .await;
    }

    // Phase 4: the policy.
    let decision = db.policy.evaluate(&identity, &RequestFacts::database(&database, Some(&role)));
    facts.rule = decision.rule.clone();
    if !decision.allowed {
        return refuse(
            &mut client,
            "28000",
            decision.reason,
            sid,
            format!("policy `{}` denied database {database:?} as role {role:?}", db.policy.name()),
        )
        .await;
    }
    let upstream_role = db.granted_role(decision.rule.as_deref());
    facts.upstream_role = Some(upstream_role.clone());
    let Some(password) = db.password_for(&upstream_role).cloned() else {
        return refuse(
            &mut client,
            "08006",
            Reason::InternalError,
            sid,
            format!("no credentials for upstream role `{upstream_role}`"),
        )
        .await;
    };

    // Phase 5: upstream.
    let tls = hub.upstream_tls(&db.name);
    let mut up = match upstream::connect(db, tls.as_ref()).await {
        Ok(u) => u,
        Err(e) => {
            return refuse(&mut client, "08006", Reason::UpstreamUnavailable, sid, e.to_string())
                .await
        }
    };
    let loopback = is_loopback_host(&db.host);
    if let Err(e) = upstream::authenticate(
        &mut up,
        &upstream_role,
        &password,
        &database,
        &forwarded,
        loopback,
        &hub.keys,
        db.upstream_tls,
    )
    .await
    {
        return match e {
            UpstreamError::Server { raw, code, message } => {
                let _ = client.write_all(&raw).await;
                let _ = client.flush().await;
                Outcome::Refused(refusal(
                    Reason::UpstreamUnavailable,
                    format!("upstream error {code}: {message}"),
                ))
            }
            other => {
                refuse(&mut client, "08006", Reason::UpstreamUnavailable, sid, other.to_string())
                    .await
            }
        };
    }
    drop(password);

    // Phase 6: AuthenticationOk, then the upstream's startup messages up to ReadyForQuery,
    // with its BackendKeyData replaced by ours.
    let mut out = proto::auth(0, &[]);
    let mut guard = None;
    let mut backend = None;
    let (mut scs, mut server_encoding) = (None, None);
    loop {
        let (kind, body) = match upstream::read(&mut up).await {
            Ok(m) => m,
            Err(e) => {
                return refuse(
                    &mut client,
                    "08006",
                    Reason::UpstreamUnavailable,
                    sid,
                    e.to_string(),
                )
                .await
            }
        };
        // PostgreSQL sends no authentication request after AuthenticationOk (a client may
        // answer one with its password: the token), and a BackendKeyData of 8 bytes under
        // protocol 3.0 (passed on as it is, another would hand the client the backend's own
        // key). All of this is held until ReadyForQuery: a bounded amount.
        let odd = match kind {
            b'R' => Some("an authentication request after AuthenticationOk"),
            b'K' if body.len() != 8 => Some("a malformed BackendKeyData"),
            _ if out.len() + body.len() > MAX_STARTUP_ANSWER => {
                Some("more than 1 MiB of messages between AuthenticationOk and ReadyForQuery")
            }
            _ => None,
        };
        if let Some(odd) = odd {
            let detail = format!("the upstream broke the protocol at startup: {odd}");
            return refuse(&mut client, "08006", Reason::UpstreamUnavailable, sid, detail).await;
        }
        match kind {
            b'K' => {
                let target = CancelTarget {
                    db: db.clone(),
                    tls: tls.clone(),
                    pid: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    secret: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    session_id: sid.clone(),
                };
                let Some(g) = hub.cancels.register(target.clone()) else {
                    return refuse(&mut client, "08006", Reason::InternalError, sid, NO_KEY).await;
                };
                backend = Some(target);
                out.extend_from_slice(&proto::backend_key_data(g.pid, g.secret));
                guard = Some(g);
            }
            b'S' => {
                let (name, value) = match proto::cstr(&body) {
                    Some((n, rest)) => (n, proto::cstr(rest).map_or("", |(v, _)| v)),
                    None => ("", ""),
                };
                match name {
                    // `options=-c client_encoding=…`, or a setting of the role or database
                    // that the client's own parameter did not override.
                    "client_encoding" if !is_utf8(value) => {
                        let detail = format!(
                            "the server set client_encoding to `{}` at startup (options, or a role or database setting); portcullis audits UTF8 sessions only",
                            value.chars().take(64).collect::<String>()
                        );
                        return refuse(
                            &mut client,
                            "0A000",
                            Reason::UnsupportedEncoding,
                            sid,
                            detail,
                        )
                        .await;
                    }
                    "standard_conforming_strings" => {
                        scs = match value {
                            "on" => Some(true),
                            "off" => Some(false),
                            _ => None,
                        };
                    }
                    "server_encoding" => server_encoding = Some(value.to_string()),
                    _ => {}
                }
                out.extend_from_slice(&proto::message(kind, &body));
            }
            b'Z' => {
                out.extend_from_slice(&proto::message(kind, &body));
                break;
            }
            b'E' => {
                out.extend_from_slice(&proto::message(kind, &body));
                let _ = client.write_all(&out).await;
                let _ = client.flush().await;
                let f = proto::parse_fields(&body);
                return Outcome::Refused(refusal(
                    Reason::UpstreamUnavailable,
                    format!(
                        "upstream error {}: {}",
                        f.get(&b'C').map_or("", |s| s),
                        f.get(&b'M').map_or("", |s| s)
                    ),
                ));
            }
            _ => out.extend_from_slice(&proto::message(kind, &body)),
        }
    }
    let guard = match guard {
        Some(g) => g,
        // No BackendKeyData (poolers may omit it): a key nothing maps to a backend.
        None => {
            let none =
                CancelTarget { db: db.clone(), tls, pid: 0, secret: 0, session_id: sid.clone() };
            let Some(g) = hub.cancels.register(none) else {
                return refuse(&mut client, "08006", Reason::InternalError, sid, NO_KEY).await;
            };
            g
        }
    };
    if client.write_all(&out).await.is_err() || client.flush().await.is_err() {
        return Outcome::Refused(refusal(
            Reason::ProtocolViolation,
            "client went away during set-up",
        ));
    }
    Outcome::Session(Established {
        client,
        upstream: up,
        _db: db.clone(),
        _cancel: guard,
        backend,
        scs,
        server_encoding,
    })
}

/// Turns a seat (a connection accepted while every slot was taken, see
/// [`super::SEATS`]) into a slot: the seat is given back at once, for cancel requests,
/// and the connection waits off it, as one of at most [`super::WAITERS`] on its
/// listener; one more is refused, as PostgreSQL refuses a session when full (`53300`).
/// The wait ends at the set-up's `deadline` (the route's `startup_timeout`, which runs
/// around all of this) with that same refusal, so the client is told why.
async fn take_slot(
    place: &mut Place,
    client: &mut Client,
    sid: &str,
    facts: &mut Facts,
    (deadline, startup_timeout): (tokio::time::Instant, Duration),
) -> Result<(), Outcome> {
    let Place::Seat { slots: limit, waiters, .. } = &*place else { return Ok(()) };
    let (limit, waiters) = (limit.clone(), waiters.clone());
    if let Ok(p) = limit.clone().try_acquire_owned() {
        *place = Place::Slot(p);
        return Ok(());
    }
    let Ok(waiter) = waiters.try_acquire_owned() else {
        let detail = format!(
            "every connection slot (server.max_connections) taken, and {} sessions already waiting for one on this listener",
            super::WAITERS
        );
        return Err(too_many_connections(client, sid, detail).await);
    };
    *place = Place::Waiting(waiter);
    facts.waiting_for_slot = true;
    let p = match tokio::time::timeout_at(deadline, limit.acquire_owned()).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => {
            return Err(
                refuse(client, "53300", Reason::Overloaded, sid, "connection slots closed").await
            )
        }
        // Told as the 17th waiter is, as PostgreSQL tells a session it has no room for.
        Err(_) => {
            let detail = format!(
                "every connection slot (server.max_connections) stayed taken for the route's startup_timeout ({:?})",
                startup_timeout
            );
            return Err(too_many_connections(client, sid, detail).await);
        }
    };
    facts.waiting_for_slot = false;
    *place = Place::Slot(p);
    Ok(())
}

/// `FATAL 53300`, as PostgreSQL refuses a session it has no room for: the 17th waiter
/// for a slot, and a waiter still waiting at `startup_timeout`.
async fn too_many_connections(client: &mut Client, sid: &str, detail: String) -> Outcome {
    let shown = Some("too many connections");
    refuse_saying(client, "53300", Reason::Overloaded, sid, shown, detail).await
}

/// A name as PostgreSQL reads it: its first 63 bytes (NAMEDATALEN - 1), cut on a
/// character boundary. For the audit of names not checked yet (a session refused before
/// the check that refuses longer ones): the client's own text, otherwise up to the
/// startup packet's 10,000 bytes on each event.
fn name_as_read(name: &str) -> String {
    let mut end = name.len().min(PG_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.get(..end).unwrap_or_default().to_string()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Forwards a CancelRequest whose key matches an open session of the listener's route
/// (`db`); silent either way, as PostgreSQL's own cancel handling. A key of another
/// route's session is not forwarded: each route's listener cancels its own sessions only.
async fn cancel(hub: &Hub, db: &DatabaseSettings, peer: SocketAddr, pid: u32, secret: u32) {
    let target = hub.cancels.lookup(pid, secret).filter(|t| t.pid != 0);
    let elsewhere = target.as_ref().filter(|t| t.db.name != db.name).map(|t| t.db.name.clone());
    let mut forwarded = false;
    if let Some(t) = target.as_ref().filter(|_| elsewhere.is_none()) {
        forwarded = t.send().await;
    }
    // A cancel request carries no identity: one that matched no session is refused, and
    // its event is unattributed; one forwarded held a live session's secret key.
    let budget =
        if forwarded { crate::audit::Budget::Full } else { crate::audit::Budget::Unattributed };
    let detail = elsewhere.as_ref().map(|r| {
        format!(
            "refused: the key is of a session on route `{r}`, sent to the listener of route `{}`",
            db.name
        )
    });
    hub.sink.emit_as(
        budget,
        &CancelEvent {
            ts: now_rfc3339(),
            kind: "pg.cancel",
            // The cancelled session's route when the key matched one.
            route: target.as_ref().map_or(&*db.name, |t| &*t.db.name),
            listener_route: elsewhere.as_ref().map(|_| &*db.name),
            client_addr: peer,
            session_id: target.as_ref().map(|t| &*t.session_id),
            forwarded,
            detail: detail.as_deref(),
        },
    );
}

// === control: why a session must end early ===

#[allow(clippy::too_many_arguments)]
async fn control(
    hub: &Hub,
    admission: &Admission,
    database: &str,
    role: Option<&str>,
    upstream_role: &str,
    opened_on: &DatabaseSettings,
    (mut generation, removals): (watch::Receiver<u64>, watch::Receiver<()>),
    mut stop: watch::Receiver<bool>,
) -> (Reason, String) {
    // Key sets that drop a key, announced by the verifier of each generation: subscribed
    // to again at every reload (`None`: that generation's verifier is gone).
    let mut removals = Some(removals);
    // Until when the credential admits the session: a reload may bring it forward (a
    // lower `max_token_age`).
    let mut expires_at = admission.identity.expires_at;
    let expiry = tokio::time::sleep(crate::util::until_unix(expires_at));
    tokio::pin!(expiry);
    // The route's `max_session`, counted from the session's start: a reload may shorten it.
    let opened = tokio::time::Instant::now();
    let mut max_session = opened_on.max_session;
    let cap = tokio::time::sleep(max_session.unwrap_or(Duration::from_secs(100 * 365 * 86_400)));
    tokio::pin!(cap);
    let mut generation_open = true;
    loop {
        let recheck;
        tokio::select! {
            () = &mut expiry => {
                return (Reason::SessionExpired, format!("the token expired (exp or max_token_age, at {})", rfc3339(expires_at)));
            }
            () = &mut cap, if max_session.is_some() => {
                return (Reason::SessionExpired, format!("max_session ({:?}) reached", max_session.unwrap_or_default()));
            }
            changed = generation.changed(), if generation_open => {
                if changed.is_err() {
                    generation_open = false;
                    continue;
                }
                generation.borrow_and_update();
                removals = Some(hub.shared.runtime.load().verifier.key_removals());
                recheck = true;
            }
            changed = async {
                match removals.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            }, if removals.is_some() => {
                recheck = changed.is_ok();
                if !recheck {
                    removals = None;
                }
            }
            () = super::stopped(&mut stop) => {
                return (Reason::ShuttingDown, hub.grace_over().await);
            }
        }
        if recheck {
            let (seen, cap_now) =
                match revoked(hub, opened_on, admission, database, role, upstream_role) {
                    Err(why) => return (Reason::AccessRevoked, why),
                    Ok(x) => x,
                };
            if seen.expires_at < expires_at {
                expires_at = seen.expires_at;
                expiry
                    .as_mut()
                    .reset(tokio::time::Instant::now() + crate::util::until_unix(expires_at));
            }
            // A shorter `max_session` ends an open session as it would a new one (a
            // longer one extends none), as a shorter `max_token_age` does above.
            if let Some(m) = cap_now.filter(|m| max_session.is_none_or(|c| *m < c)) {
                max_session = Some(m);
                cap.as_mut().reset(opened.checked_add(m).unwrap_or(opened));
            }
        }
    }
}

/// Unix seconds as RFC 3339 (UTC), as a detail a person reads gives a time.
fn rfc3339(unix: u64) -> String {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(unix))
        .map_or_else(|| unix.to_string(), |t| humantime::format_rfc3339_seconds(t).to_string())
}

/// Re-evaluates an open session against the configuration now in force, as a new
/// session with the same token would be: the route, the issuer's checks of the token
/// ([`Admission::recheck`]), the policy and the upstream role it grants; and against the
/// route's upstream now: a session whose route now names another server or other
/// transport security (`upstream`, `upstream_tls`, `upstream_ca`) is on a connection the
/// configuration no longer describes (the old server retired, plain TCP now refused), so
/// it ends as if revoked, and its client reconnects to the upstream now configured. The
/// identity as the configuration now sees it and the route's `max_session` now, or why
/// the session must end.
fn revoked(
    hub: &Hub,
    opened_on: &DatabaseSettings,
    admission: &Admission,
    database: &str,
    role: Option<&str>,
    upstream_role: &str,
) -> Result<(Arc<Identity>, Option<Duration>), String> {
    let rt = hub.shared.runtime.load();
    let route = &*opened_on.name;
    let Some(db) = rt.config.databases.iter().find(|d| &*d.name == route) else {
        return Err(format!("database route `{route}` removed (policy revision {})", rt.revision));
    };
    if let Some(change) = opened_on.upstream_change(db) {
        return Err(format!(
            "database route `{route}` changed its upstream ({change}) under policy revision {}: \
             the session's connection is the old one",
            rt.revision
        ));
    }
    let identity = admission
        .recheck(&rt.config, &rt.verifier, rt.sessions.as_deref(), crate::util::unix_now())
        .map_err(|why| format!("{why} (policy revision {})", rt.revision))?;
    let d = db.policy.evaluate(&identity, &RequestFacts::database(database, role));
    if !d.allowed {
        // Named as a WebSocket tunnel's revocation names it (`crate::http::tunnel`).
        let why = match &d.rule {
            Some(r) => format!("{} by rule `{}` ({}:{})", d.reason, r.id, r.file.display(), r.line),
            None => format!("{} (no rule allows it)", d.reason),
        };
        return Err(format!("{why} under policy revision {}", rt.revision));
    }
    let now_role = db.granted_role(d.rule.as_deref());
    if now_role != upstream_role {
        return Err(format!(
            "upstream role changed from `{upstream_role}` to `{now_role}` under policy revision {}",
            rt.revision
        ));
    }
    Ok((identity, db.max_session))
}

// === the relay ===

struct StatementContext<'a> {
    hub: &'a Hub,
    counters: &'a RouteCounters,
    totals: &'a Totals,
    sid: &'a str,
    route: &'a str,
    database: &'a str,
    upstream_role: &'a str,
    identity: &'a Identity,
}

struct End {
    /// `None`: closed by a peer; `Some`: terminated by portcullis.
    reason: Option<Reason>,
    detail: Option<String>,
    by: &'static str,
    /// A cancel request was sent to the backend: a statement was still running.
    cancel_sent: bool,
}

/// A session's running totals, for its `close` event.
#[derive(Default)]
struct Totals {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    statements: AtomicU64,
}

/// Why a session was refused when no cancel key could be minted for it.
const NO_KEY: &str = "the system's random source failed: no cancel key could be minted";

const BUF: usize = 64 * 1024;
/// The most the server may send between AuthenticationOk and ReadyForQuery (held until
/// then): a real server's parameters and notices are a few KiB.
const MAX_STARTUP_ANSWER: usize = 1024 * 1024;
/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
const PG_NAME_MAX: usize = 63;

async fn relay(
    session: Established,
    control: impl Future<Output = (Reason, String)>,
    ctx: &StatementContext<'_>,
) -> End {
    let (client, upstream) = (session.client, session.upstream);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let Totals { bytes_in, bytes_out, statements } = ctx.totals;
    let mut c2s_scan = Scanner::client();
    let mut s2c_scan = Scanner::server();
    let mut upstream_writing = false;
    // The upstream was left inside a message: a client message the audit refused
    // (`Tracker::desync`) had begun in bytes already relayed.
    let mut upstream_partial = false;
    // Prepared statements as the server accepted them; client messages are queued here
    // and resolved by the server's answers, in order.
    let tracker = parking_lot::Mutex::new(Tracker::for_session(
        session.scs,
        session.server_encoding.as_deref(),
    ));
    let drained = tokio::sync::Notify::new();
    let emit = |r: Record<'_>| emit_statement(ctx, statements, &r);
    // Every Bind relayed gets exactly one event: one still unanswered when the relay
    // ends (or is dropped by the shutdown drain) gets it here, `outcome: "unknown"`.
    let _finish = Finish { tracker: &tracker, emit: &emit };
    // A server message, at its end: what the statement audit follows.
    let on_server = |kind: u8, captured: Option<&Captured>| {
        if let b'1' | b'2' | b'3' | b'C' | b'E' | b'G' | b'I' | b'n' | b's' | b'S' | b'T' | b'V'
        | b'Z' = kind
        {
            let mut t = tracker.lock();
            t.server(kind, captured, &mut &emit);
            if t.waiting && !t.saturated() {
                t.waiting = false;
                drained.notify_one();
            }
        }
    };
    // A protocol violation by the client ends the session through the same path as the
    // other terminations, so the error reaches the client at a message boundary.
    let (violation_tx, mut violation_rx) = mpsc::channel::<String>(1);

    let c2s = Box::pin(async {
        let mut buf = vec![0u8; BUF];
        loop {
            // Too many messages await the server's answer: let it catch up first.
            while {
                let mut t = tracker.lock();
                t.waiting = t.saturated();
                t.waiting
            } {
                drained.notified().await;
            }
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return "client",
                Ok(n) => n,
            };
            // The server reported a client_encoding other than UTF8, or the audit cannot
            // follow the session: not one more byte goes upstream (the other direction
            // ends the session).
            let stopped = {
                let t = tracker.lock();
                t.refused_encoding.is_some() || t.desync.is_some()
            };
            if stopped {
                return std::future::pending().await;
            }
            let mut terminate = false;
            let at_boundary = c2s_scan.at_boundary();
            // A message the audit refuses is not relayed, nor anything after it: the bytes
            // relayed end where the message before it ended.
            let (mut refused, mut relay_to) = (None, n);
            let mut last_end = 0;
            let scanned = c2s_scan.feed_at(&buf[..n], |kind, captured, end| {
                // After Terminate the server reads nothing more: what follows it is neither
                // relayed nor audited as sent.
                if refused.is_some() || terminate {
                    return;
                }
                match kind {
                    b'X' => {
                        terminate = true;
                        relay_to = end;
                    }
                    b'Q' | b'F' | b'P' | b'B' | b'C' | b'D' | b'E' | b'H' | b'S' | b'c' | b'd'
                    | b'f' | b'p' => {
                        let mut t = tracker.lock();
                        t.client(kind, captured, &mut &emit);
                        if let Some(why) = t.desync {
                            refused = Some(why);
                            relay_to = last_end;
                            return;
                        }
                    }
                    _ => {}
                }
                last_end = end;
            });
            // A password message is refused at its first byte, not only once it is whole:
            // no part of it (the token) reaches the server.
            if refused.is_none() && !terminate && c2s_scan.partial_kind() == Some(b'p') {
                let mut t = tracker.lock();
                t.client(b'p', None, &mut &emit);
                refused = t.desync;
                relay_to = last_end;
            }
            // A header no message can have (a length below 4 or past 1 GiB), or one
            // PostgreSQL never reads from a client (another type, a length past its
            // type's limit: the backend ends the session there): what came
            // whole before it is relayed, as PostgreSQL itself would run it before
            // reading the bad header, and it was audited as sent; the bad header and
            // what follows it are not, and the session ends.
            let violation = match (scanned, terminate) {
                (Err(e), false) => {
                    relay_to = last_end;
                    Some(e)
                }
                _ => None,
            };
            if relay_to > 0 {
                upstream_writing = true;
                if uw.write_all(&buf[..relay_to]).await.is_err() || uw.flush().await.is_err() {
                    return "upstream";
                }
                upstream_writing = false;
                bytes_in.fetch_add(relay_to as u64, Ordering::Relaxed);
                ctx.counters.bytes_in.fetch_add(relay_to as u64, Ordering::Relaxed);
            }
            if let Some(why) = refused.or(violation) {
                // The upstream was left inside a message when the one refused had begun
                // in an earlier read (and so was partly relayed then).
                upstream_partial = relay_to == 0 && !at_boundary;
                let _ = violation_tx.send(why.to_string()).await;
                return std::future::pending().await;
            }
            if terminate {
                return "client";
            }
        }
    });

    let s2c = Box::pin(async {
        let mut buf = vec![0u8; BUF];
        let scan = &mut s2c_scan;
        let control = async {
            tokio::select! {
                r = control => r,
                Some(v) = violation_rx.recv() => (Reason::ProtocolViolation, v),
            }
        };
        tokio::pin!(control);
        let (reason, detail) = loop {
            tokio::select! {
                biased;
                r = &mut control => break r,
                r = ur.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => {
                            let _ = tokio::time::timeout(Duration::from_secs(1), cw.shutdown()).await;
                            return Ok("upstream");
                        }
                        Ok(n) => n,
                    };
                    // Where a message the server never sends once the session has started
                    // begins, if one does in this read.
                    let (mut odd_at, mut last_end) = (None, 0);
                    let fed = scan.feed_at(&buf[..n], |kind, captured, end| {
                        on_server(kind, captured);
                        if odd_at.is_none() && never_mid_session(kind) {
                            odd_at = Some((kind, last_end));
                        }
                        last_end = end;
                    });
                    if fed.is_err() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), cw.shutdown()).await;
                        return Err((Reason::UpstreamUnavailable, "the upstream broke the protocol".to_string()));
                    }
                    let odd_at = odd_at.or_else(|| {
                        scan.partial_kind().filter(|k| never_mid_session(*k)).map(|k| (k, last_end))
                    });
                    if let Some((kind, at)) = odd_at {
                        // Not passed on: the client is told why after what came before it.
                        let text = format!(
                            "portcullis: terminating connection: {} (request id {})",
                            Reason::UpstreamUnavailable.public_code(),
                            ctx.sid
                        );
                        let fatal = proto::error_response(Severity::Fatal, "08006", &text);
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            cw.write_all(&[&buf[..at], &fatal[..]].concat()).await?;
                            cw.flush().await?;
                            cw.shutdown().await
                        })
                        .await;
                        bytes_out.fetch_add(at as u64, Ordering::Relaxed);
                        ctx.counters.bytes_out.fetch_add(at as u64, Ordering::Relaxed);
                        let what = if kind == b'R' { "an authentication request" } else { "a BackendKeyData" };
                        return Err((
                            Reason::UpstreamUnavailable,
                            format!("the upstream broke the protocol: {what} in the middle of the session (not passed on)"),
                        ));
                    }
                    // A client that stops reading must not keep its session past its
                    // permission: the write races the control (expiry, revocation,
                    // shutdown), and then gets a short grace to complete.
                    let write = async { cw.write_all(&buf[..n]).await.and(cw.flush().await) };
                    tokio::pin!(write);
                    let fired = tokio::select! {
                        biased;
                        w = &mut write => {
                            if w.is_err() {
                                return Ok("client");
                            }
                            None
                        }
                        r = &mut control => Some(r),
                    };
                    if let Some((reason, detail)) = fired {
                        match tokio::time::timeout(Duration::from_secs(2), write).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return Err((reason, detail)),
                            Err(_) => {
                                // The client is not reading: nothing more can reach it.
                                let detail = format!("{detail}; the client was not reading, so it was not told");
                                return Err((reason, detail));
                            }
                        }
                        bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                        ctx.counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                        break (reason, detail);
                    }
                    bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    ctx.counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    if let Some(enc) = tracker.lock().refused_encoding.clone() {
                        break (
                            Reason::UnsupportedEncoding,
                            format!("the session changed client_encoding to `{enc}`; portcullis audits UTF8 sessions only"),
                        );
                    }
                    if let Some(why) = tracker.lock().desync {
                        break (Reason::ProtocolViolation, why.to_string());
                    }
                }
            }
        };
        // Finish the message in flight, then say why; all of it bounded, since a client
        // that does not read would hold every write forever.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let finished = tokio::time::timeout_at(deadline, async {
            while !scan.at_boundary() {
                let want = scan.needed().min(BUF);
                let Ok(n) = ur.read(&mut buf[..want]).await else { break };
                if n == 0
                    || scan.feed(&buf[..n], on_server).is_err()
                    || cw.write_all(&buf[..n]).await.is_err()
                {
                    break;
                }
                bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                ctx.counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            }
            if scan.at_boundary() {
                let text = format!(
                    "portcullis: terminating connection: {} (request id {})",
                    reason.public_code(),
                    ctx.sid
                );
                let sqlstate = match reason {
                    Reason::ProtocolViolation => "08P01",
                    Reason::UnsupportedEncoding => "0A000",
                    _ => "57P01",
                };
                cw.write_all(&proto::error_response(Severity::Fatal, sqlstate, &text)).await?;
            }
            cw.flush().await?;
            cw.shutdown().await
        })
        .await;
        let detail = match finished {
            Ok(_) => detail,
            Err(_) => format!("{detail}; the client was not reading, so it was not told"),
        };
        Err((reason, detail))
    });

    let mut c2s = c2s;
    let mut s2c = s2c;
    let (by, terminated) = tokio::select! {
        by = &mut c2s => (by, None),
        r = &mut s2c => match r {
            Ok(by) => (by, None),
            Err(t) => ("portcullis", Some(t)),
        },
    };
    drop(c2s);
    drop(s2c);
    // Say goodbye upstream when the client did not (only at a message boundary).
    if terminated.is_some() && c2s_scan.at_boundary() && !upstream_writing && !upstream_partial {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = uw.write_all(&proto::message(b'X', &[])).await;
            let _ = uw.flush().await;
        })
        .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), uw.shutdown()).await;
    // What was relayed may still be running, or be answered: read the server's answers
    // (never forwarded: the client is gone, or has been told the session is over) so that
    // each Bind gets its event with the server's outcome. A session portcullis ended has
    // its statement cancelled at once: its permission ended (expiry, revocation,
    // shutdown) or the audit can no longer read it (an encoding change). One whose client
    // went away, or broke the protocol, once the statement has outlived it by
    // ORPHAN_GRACE (past the session, its token's expiry or a revocation could no longer
    // stop it): what a client relayed before its bad message was allowed and audited as
    // sent, and PostgreSQL read directly would run it before reading the bad message, so
    // it is not cut short by a race between the server and the cancel.
    let backend = session.backend.as_ref().filter(|b| b.is_known());
    let cancel_after = match &terminated {
        Some((Reason::ProtocolViolation, _)) | None => ORPHAN_GRACE,
        Some(_) => Duration::ZERO,
    };
    let settled = match by {
        // The upstream closed or failed: there is nothing more to read from it.
        "upstream" => Settled::default(),
        _ => settle(&mut ur, &mut s2c_scan, &on_server, &tracker, backend, cancel_after).await,
    };
    let (reason, mut detail) = match terminated {
        Some((r, d)) => (Some(r), Some(d)),
        None => (None, None),
    };
    let note = match settled {
        Settled { unsettled: true, .. } => Some(
            "statements were still running or queued when the proxy stopped waiting for them \
             (the server neither finished nor gave them up after cancel requests): they may \
             run on",
        ),
        Settled { cancels: 1.., .. } => {
            Some("a statement was still running: a cancel request was sent to the backend")
        }
        _ => None,
    };
    if let Some(note) = note {
        detail = Some(match detail {
            Some(d) => format!("{d}; {note}"),
            None => note.to_string(),
        });
    }
    End { reason, detail, by, cancel_sent: settled.cancels > 0 }
}

/// Messages PostgreSQL sends only before the session's first ReadyForQuery: an
/// authentication request (a client may answer it with its password, the token) and
/// BackendKeyData (the backend's own cancel key). From an upstream mid-session they end
/// the session, not passed on.
fn never_mid_session(kind: u8) -> bool {
    matches!(kind, b'R' | b'K')
}

/// How long a statement may run on after its client went away before it is cancelled.
pub(super) const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// How long the server's answers are waited for after a cancel while nothing comes; and
/// how often the cancel is repeated meanwhile (a cancel stops one statement: a client may
/// have pipelined more, each starting as the one before it is cancelled).
pub(super) const SETTLE_AFTER_CANCEL: Duration = Duration::from_secs(2);
const CANCEL_AGAIN: Duration = Duration::from_millis(500);
/// The most a session's end waits for its statements to be cancelled, however many the
/// client queued (at most `MAX_PENDING`, each stopped by one cancel).
pub(super) const MAX_SETTLE: Duration = Duration::from_secs(30);

/// How the end of a session settled what it had relayed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Settled {
    /// Cancel requests sent to the backend.
    pub cancels: u32,
    /// Something was still awaiting its answer when the proxy stopped waiting: the server
    /// did not answer for `SETTLE_AFTER_CANCEL` after a cancel, or `MAX_SETTLE` ran out.
    pub unsettled: bool,
}

/// After the relay: reads the server's answers to what was relayed, feeding them to the
/// statement audit (`on_server`), until nothing awaits an answer or the server closes.
/// A statement still in flight `cancel_after` from now is cancelled (if the backend's key
/// is known), and again every `CANCEL_AGAIN` while something is in flight, so queued
/// statements are stopped one after another; the proxy stops waiting only when the
/// server has sent nothing for `SETTLE_AFTER_CANCEL` since the last answer (or the first
/// cancel), or after `MAX_SETTLE`.
pub(super) async fn settle<R: tokio::io::AsyncRead + Unpin>(
    ur: &mut R,
    scan: &mut Scanner,
    on_server: &impl Fn(u8, Option<&Captured>),
    tracker: &parking_lot::Mutex<Tracker>,
    backend: Option<&CancelTarget>,
    cancel_after: Duration,
) -> Settled {
    let mut buf = vec![0u8; BUF];
    let start = tokio::time::Instant::now();
    let cap = start + cancel_after + MAX_SETTLE;
    let mut next_cancel = start + cancel_after;
    let mut deadline = next_cancel + SETTLE_AFTER_CANCEL;
    let mut settled = Settled::default();
    while tracker.lock().in_flight() {
        let now = tokio::time::Instant::now();
        if now >= deadline.min(cap) {
            settled.unsettled = true;
            break;
        }
        if now >= next_cancel {
            if let Some(b) = backend {
                if tokio::time::timeout_at(deadline.min(cap), b.send()).await == Ok(true) {
                    settled.cancels += 1;
                }
            }
            next_cancel = tokio::time::Instant::now() + CANCEL_AGAIN;
            continue;
        }
        match tokio::time::timeout_at(next_cancel.min(deadline).min(cap), ur.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                if scan.feed(&buf[..n], on_server).is_err() {
                    break;
                }
                // The server is answering: a statement ended (cancelled, or done), and the
                // next one queued may have started. Past the first cancel's time, wait on
                // while it keeps answering.
                let now = tokio::time::Instant::now();
                if now >= start + cancel_after {
                    deadline = now + SETTLE_AFTER_CANCEL;
                }
            }
        }
    }
    settled
}

/// Writes the events of the Binds still unanswered when the relay ends (see
/// [`Tracker::finish`]), also when the relay is dropped (the shutdown drain aborting it).
struct Finish<'a, F: Fn(Record<'_>)> {
    tracker: &'a parking_lot::Mutex<Tracker>,
    emit: &'a F,
}

impl<F: Fn(Record<'_>)> Drop for Finish<'_, F> {
    fn drop(&mut self) {
        self.tracker.lock().finish(&mut self.emit);
    }
}

fn emit_statement(ctx: &StatementContext<'_>, statements: &AtomicU64, r: &Record<'_>) {
    let seq = statements.fetch_add(1, Ordering::Relaxed) + 1;
    let (identity, ci) = ctx.identity.audit_fields();
    ctx.counters.statements.fetch_add(1, Ordering::Relaxed);
    ctx.hub.sink.emit(&StatementEvent {
        ts: now_rfc3339(),
        kind: "pg.statement",
        session_id: ctx.sid,
        route: ctx.route,
        database: ctx.database,
        upstream_role: ctx.upstream_role,
        seq,
        protocol: r.protocol,
        statement: r.statement,
        text: r
            .text
            .map(|t| {
                if r.truncated {
                    super::redact::passwords_cut(t, r.scs)
                } else {
                    super::redact::passwords(t, r.scs)
                }
            })
            .as_deref(),
        truncated: r.truncated,
        text_status: r.text_status,
        outcome: r.outcome,
        function_oid: r.function.map(|f| f.oid),
        arguments: r.function.and_then(|f| f.arguments),
        identity,
        ci,
    });
}
