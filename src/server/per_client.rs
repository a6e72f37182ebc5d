//! Connections open per client address (`server.max_connections_per_client`), so one
//! address cannot take every `server.max_connections` slot: nginx's `limit_conn` keyed
//! on `$binary_remote_addr`, HAProxy's `src_conn_cur`.
//!
//! One table for every listener, HTTP and database alike (both take `max_connections`
//! slots). A connection is counted from its accept, before it waits for a slot, until
//! the last holder of its slot lets go: the [`ClientGuard`] lives next to the
//! `max_connections` permit (in the connection's [`crate::http::activity::Activity`],
//! which its requests and a WebSocket tunnel keep alive; in a database session's task),
//! so whichever way a connection ends, its count goes down with its slot. A connection
//! over the limit is reset at once: no slot taken, no TLS handshake, nothing read.
//!
//! - IPv6 addresses count per /64: one host is given a whole /64 (RFC 6177, SLAAC) and
//!   can pick any address in it, so a per-address count would not bind it. IPv4-mapped
//!   IPv6 addresses (a dual-stack `[::]` listener) count as their IPv4 address.
//! - Addresses in `listen.trusted_proxies` are not counted: a load balancer's address is
//!   every client's behind it.
//! - An entry is removed when its count returns to zero, so the table never holds more
//!   entries than connections are open (at most `max_connections`, plus one per listener
//!   waiting for a slot): a spray of addresses cannot grow it.
//! - Counted even while the limit is 0 (no limit), so a reload that sets it applies to
//!   the connections already open as well as new ones.
//! - Refusals are counted in `portcullis_connections_refused_total{reason="per-client-limit"}`
//!   and reported on stderr at most once per [`REPORT_EVERY`] (their rate is the
//!   attacker's to choose). They write no audit event: the audit log has one event per
//!   request, and a refused connection carried none (nor any identity); an event each
//!   would let one address fill the audit queue as fast as it can connect.
//!
//! The table is one mutex: it is taken twice per connection (accept, end), never on the
//! request path. Its keys are chosen by clients, so it keeps std's keyed SipHash.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::IpNet;

/// The `reason` label of `portcullis_connections_refused_total` for these refusals.
pub const REFUSED_REASON: &str = "per-client-limit";

/// Refusals are reported on stderr at most this often (each report says how many).
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// What one client's connections are counted under: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

/// The connections open per client, across every listener.
#[derive(Debug)]
pub struct PerClient {
    /// `listen.trusted_proxies`, never counted (fixed at start, as they are).
    exempt: Vec<IpNet>,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Only clients with a connection open: no entry is ever 0.
    open: HashMap<ClientKey, u32>,
    report: Throttle,
}

/// Counts events and says when a report of them is due: the first at once, then at
/// most one per [`REPORT_EVERY`], each with the number since the last.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    unreported: u64,
    last: Option<Instant>,
}

/// A connection's place in its client's count, given back on drop.
#[derive(Debug)]
pub struct ClientGuard {
    /// `None` for a client that is not counted (a trusted proxy).
    counted: Option<(Arc<PerClient>, ClientKey)>,
}

// === impl ClientKey ===

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    ClientKey(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

// === impl PerClient ===

impl PerClient {
    pub fn new(exempt: Vec<IpNet>) -> Arc<PerClient> {
        Arc::new(PerClient { exempt, table: Mutex::default() })
    }

    /// Counts a connection just accepted from `ip`, or refuses it (`None`) when its client
    /// already has `limit` open (0: no limit). A refusal is counted in the metrics and
    /// reported (throttled); the caller closes the connection.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientGuard> {
        if self.exempt.iter().any(|n| n.contains(ip)) {
            return Some(ClientGuard { counted: None });
        }
        let key = ClientKey::of(ip);
        let refused_since_report = {
            let mut t = self.table.lock();
            let open = t.open.get(&key).copied().unwrap_or(0);
            if limit == 0 || (open as usize) < limit {
                t.open.insert(key, open.saturating_add(1));
                return Some(ClientGuard { counted: Some((self.clone(), key)) });
            }
            t.report.note(Instant::now())
        };
        let m = crate::metrics::global();
        m.connections_refused.inc(&REFUSED_REASON);
        if let Some(n) = refused_since_report {
            tracing::warn!(
                client = %key,
                limit,
                refused = n,
                "refused {n} connection(s) whose client already had server.max_connections_per_client \
                 ({limit}) open, the latest from {key}; reported at most every {}s \
                 (portcullis_connections_refused_total counts each)",
                REPORT_EVERY.as_secs()
            );
        }
        None
    }

    /// Connections open now from `ip`'s client (IPv4 address or IPv6 /64).
    pub fn open(&self, ip: IpAddr) -> usize {
        self.table.lock().open.get(&ClientKey::of(ip)).map_or(0, |n| *n as usize)
    }

    /// Clients with a connection open now (entries in the table).
    pub fn clients(&self) -> usize {
        self.table.lock().open.len()
    }

    fn release(&self, key: ClientKey) {
        let mut t = self.table.lock();
        if let Some(n) = t.open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.open.remove(&key);
            }
        }
    }
}

/// Closes a refused connection with a reset: nothing is read or sent, and no TIME_WAIT
/// socket is left behind for each refusal of a flood.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

// === impl ClientGuard ===

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Some((table, key)) = self.counted.take() {
            table.release(key);
        }
    }
}

// === impl Throttle ===

impl Throttle {
    /// Notes one event at `now`; `Some(events since the last report)` when a report is due.
    pub(crate) fn note(&mut self, now: Instant) -> Option<u64> {
        self.unreported = self.unreported.saturating_add(1);
        let due = self.last.is_none_or(|at| now.saturating_duration_since(at) >= REPORT_EVERY);
        due.then(|| {
            self.last = Some(now);
            std::mem::take(&mut self.unreported)
        })
    }
}

#[cfg(test)]
mod tests;
