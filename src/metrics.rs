//! Process-wide counters, exposed in Prometheus text format by the admin listener.
//!
//! Plain atomics: a counter increment on the request path is one relaxed `fetch_add`.
//! Labelled families keep a small map behind a read-mostly lock, keyed by cheaply
//! cloned data so a lookup allocates nothing, and hashed with [`FxHasher`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;

/// FxHash (the multiply-rotate hash rustc uses) for the label maps. Their keys come
/// from configuration and fixed code sets, never from request data, so SipHash's flood
/// resistance buys nothing there, and on every request it cost more than the rest of
/// the lookup.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A labelled counter family.
#[derive(Debug)]
pub struct Family<K: Eq + Hash + Clone> {
    map: RwLock<FxMap<K, Arc<AtomicU64>>>,
}

impl<K: Eq + Hash + Clone> Default for Family<K> {
    fn default() -> Self {
        Self { map: RwLock::new(FxMap::default()) }
    }
}

impl<K: Eq + Hash + Clone> Family<K> {
    pub fn inc(&self, key: &K) {
        self.add(key, 1);
    }
    pub fn add(&self, key: &K, n: u64) {
        if let Some(c) = self.map.read().get(key) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.map.write().entry(key.clone()).or_default().fetch_add(n, Ordering::Relaxed);
    }
    /// Decrements a gauge kept in a family (never below zero).
    pub fn sub(&self, key: &K, n: u64) {
        if let Some(c) = self.map.read().get(key) {
            let _ =
                c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
        }
    }
    /// The counter of `key`, for a caller that updates it often (a database session
    /// resolves its route's counters once, then each update is one `fetch_add`).
    pub fn handle(&self, key: &K) -> Arc<AtomicU64> {
        if let Some(c) = self.map.read().get(key) {
            return c.clone();
        }
        self.map.write().entry(key.clone()).or_default().clone()
    }
    /// Sets a gauge kept in a family.
    pub fn set(&self, key: &K, v: u64) {
        self.handle(key).store(v, Ordering::Relaxed);
    }
    pub fn get(&self, key: &K) -> u64 {
        self.map.read().get(key).map_or(0, |c| c.load(Ordering::Relaxed))
    }
    pub fn snapshot(&self) -> Vec<(K, u64)> {
        self.map.read().iter().map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed))).collect()
    }
}

/// Latency buckets in seconds (upper bounds), chosen around a proxy's sub-millisecond
/// overhead and typical upstream latencies.
pub const LATENCY_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A fixed-bucket histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Labels of `portcullis_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub route: Arc<str>,
    pub decision: &'static str,
    pub reason: &'static str,
    pub status: u16,
}

/// Every metric the proxy exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: Family<RequestKey>,
    pub latency: RwLock<FxMap<Arc<str>, Arc<Histogram>>>,
    /// Token verifications by result reason code (`allowed` = verified).
    pub token_verifications: Family<&'static str>,
    pub token_cache_hits: AtomicU64,
    /// JWKS fetches by (issuer, outcome: ok|error).
    pub jwks_refreshes: Family<(Arc<str>, &'static str)>,
    /// When each issuer's keys were last fetched successfully, Unix seconds (a gauge).
    pub jwks_last_success: Family<Arc<str>>,
    /// Browser sign-in callbacks by (issuer, outcome: ok|error); the issuer is empty when
    /// the callback did not get as far as knowing it.
    pub sign_ins: Family<(Arc<str>, &'static str)>,
    /// Browser session refresh-token exchanges by (issuer, outcome: ok|error).
    pub session_refreshes: Family<(Arc<str>, &'static str)>,
    /// Sign-outs recorded in the revocation list ([`crate::session::revoke`]).
    pub sessions_revoked: AtomicU64,
    /// Sign-outs that found the revocation list full of live entries and raised its floor.
    pub session_revocation_overflows: AtomicU64,
    /// Entries in the revocation list after the last sign-out (a gauge).
    pub session_revocation_entries: AtomicU64,
    /// Config reloads by outcome (ok|error).
    pub config_reloads: Family<&'static str>,
    /// Shared-store (`[redis]`) failures by operation: replay (a single-use check),
    /// sign-out (sharing one), subscribe (receiving them), malformed (a stored or
    /// published sign-out that could not be read).
    pub redis_errors: Family<&'static str>,
    /// Sign-outs made on other replicas and recorded here through the shared store.
    pub redis_sign_outs_received: AtomicU64,
    /// This replica's sign-outs Redis has not taken yet, kept to be tried again (a
    /// gauge; [`crate::store::outbox`]).
    pub redis_sign_outs_unshared: AtomicU64,
    /// Shadow-policy disagreements by route.
    pub shadow_disagreements: Family<Arc<str>>,
    /// Client connections open now, HTTP and database: each counted by an
    /// [`OpenConnection`] held as long as the connection (after a WebSocket upgrade, its
    /// tunnel) lasts.
    pub connections_open: AtomicU64,
    /// Client connections closed after `server.idle_timeout` with no request in flight.
    pub idle_connections_closed: AtomicU64,
    /// Client connections dropped because the client took nothing of what it was sent
    /// for `server.send_timeout`, or did not finish closing.
    pub stalled_connections_closed: AtomicU64,
    /// Failed `accept` calls on the client, admin and database listeners.
    pub accept_errors: AtomicU64,
    /// Client connections closed at accept, unserved, by reason (`per-client-limit`:
    /// `server.max_connections_per_client`, [`crate::server::per_client`]).
    pub connections_refused: Family<&'static str>,
    /// WebSocket tunnels open now, and ended ones by reason ([`crate::http::tunnel::End`]).
    pub websocket_tunnels_open: AtomicU64,
    pub websocket_tunnels_closed: Family<&'static str>,
    /// Database sessions by (route, decision: allow|deny, reason code): one per `pg.session`
    /// `open` or `refused` event.
    pub pg_sessions: Family<(Arc<str>, &'static str, &'static str)>,
    /// Database sessions open now, by route (a gauge).
    pub pg_sessions_open: Family<Arc<str>>,
    /// Statements (simple Query, or Bind of a parsed statement) by route.
    pub pg_statements: Family<Arc<str>>,
    /// Sessions portcullis ended, by (route, reason code).
    pub pg_terminations: Family<(Arc<str>, &'static str)>,
    /// Relayed bytes by (route, direction: in = client to server, out = server to client).
    pub pg_bytes: Family<(Arc<str>, &'static str)>,
    /// Failed writes (or flushes) of the audit log to its output; each is retried.
    pub audit_write_errors: AtomicU64,
    /// Audit events lost: dropped because the queue was full, or unwritten at exit.
    pub audit_events_dropped: AtomicU64,
}

impl Metrics {
    /// Records one request's latency for `route`; no `Arc` clone once the route is known.
    pub fn observe_latency(&self, route: &Arc<str>, d: std::time::Duration) {
        if let Some(h) = self.latency.read().get(route) {
            h.observe(d);
            return;
        }
        self.latency_for(route).observe(d);
    }

    pub fn latency_for(&self, route: &Arc<str>) -> Arc<Histogram> {
        if let Some(h) = self.latency.read().get(route) {
            return h.clone();
        }
        self.latency.write().entry(route.clone()).or_default().clone()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        self.render_for(&[], &[])
    }

    /// [`Metrics::render`], with a zero sample of `portcullis_pg_sessions_open` for every
    /// configured database route without an open session (a dashboard then tells an idle
    /// route from a missing one), and the expiry of every certificate served (they are
    /// the generation's, not the process's: a reload that drops one drops its series).
    pub fn render_for(
        &self,
        database_routes: &[Arc<str>],
        certificates: &[crate::tls::ServedCertificate],
    ) -> String {
        let mut out = String::with_capacity(4096);
        family(
            &mut out,
            "portcullis_build_info",
            "gauge",
            "The running portcullis version (always 1).",
        );
        let _ = writeln!(
            out,
            "portcullis_build_info{{version=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION"))
        );
        family(
            &mut out,
            "portcullis_requests_total",
            "counter",
            "Requests by route, decision, reason and status.",
        );
        let mut reqs = self.requests.snapshot();
        reqs.sort_by(|a, b| {
            (&a.0.route, a.0.status, a.0.reason).cmp(&(&b.0.route, b.0.status, b.0.reason))
        });
        for (k, v) in reqs {
            let _ = writeln!(
                out,
                "portcullis_requests_total{{route=\"{}\",decision=\"{}\",reason=\"{}\",status=\"{}\"}} {v}",
                escape(&k.route), k.decision, k.reason, k.status
            );
        }
        family(
            &mut out,
            "portcullis_request_duration_seconds",
            "histogram",
            "Time from request head to response head.",
        );
        let mut lat: Vec<_> =
            self.latency.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        lat.sort_by(|a, b| a.0.cmp(&b.0));
        for (route, h) in lat {
            let route = escape(&route);
            let mut cum = 0;
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                cum += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "portcullis_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {cum}");
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "portcullis_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}");
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ =
                writeln!(out, "portcullis_request_duration_seconds_sum{{route=\"{route}\"}} {sum}");
            let _ = writeln!(
                out,
                "portcullis_request_duration_seconds_count{{route=\"{route}\"}} {count}"
            );
        }
        family(
            &mut out,
            "portcullis_token_verifications_total",
            "counter",
            "Bearer token verifications by result.",
        );
        let mut tv = self.token_verifications.snapshot();
        tv.sort();
        for (k, v) in tv {
            let _ = writeln!(out, "portcullis_token_verifications_total{{result=\"{k}\"}} {v}");
        }
        scalar(
            &mut out,
            "portcullis_token_cache_hits_total",
            "counter",
            "Requests served from the verified-token cache.",
            self.token_cache_hits.load(Ordering::Relaxed),
        );
        by_pair(
            &mut out,
            "portcullis_jwks_refreshes_total",
            "counter",
            "JWKS fetches by issuer and outcome.",
            ("issuer", "outcome"),
            &self.jwks_refreshes,
        );
        by_label(
            &mut out,
            "portcullis_jwks_last_success_timestamp_seconds",
            "gauge",
            "When each issuer's keys were last fetched successfully (Unix seconds).",
            "issuer",
            &self.jwks_last_success,
        );
        by_pair(
            &mut out,
            "portcullis_sign_ins_total",
            "counter",
            "Browser sign-in callbacks by issuer and outcome (ok, error).",
            ("issuer", "outcome"),
            &self.sign_ins,
        );
        by_pair(
            &mut out,
            "portcullis_session_refreshes_total",
            "counter",
            "Browser session refreshes (refresh-token exchanges) by issuer and outcome (ok, error).",
            ("issuer", "outcome"),
            &self.session_refreshes,
        );
        scalar(
            &mut out,
            "portcullis_sessions_revoked_total",
            "counter",
            "Browser sessions signed out and recorded as revoked (copies of their cookie are refused).",
            self.sessions_revoked.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "portcullis_session_revocation_overflows_total",
            "counter",
            "Sign-outs that found the revocation list full of live entries: every session signed in no later than the oldest entry is refused since.",
            self.session_revocation_overflows.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "portcullis_session_revocations",
            "gauge",
            "Signed-out sessions the revocation list holds (as of the last sign-out; at most 100000).",
            self.session_revocation_entries.load(Ordering::Relaxed),
        );
        family(
            &mut out,
            "portcullis_config_reloads_total",
            "counter",
            "Configuration reloads by outcome.",
        );
        for outcome in ["ok", "error"] {
            let _ = writeln!(
                out,
                "portcullis_config_reloads_total{{outcome=\"{outcome}\"}} {}",
                self.config_reloads.get(&outcome)
            );
        }
        family(
            &mut out,
            "portcullis_redis_errors_total",
            "counter",
            "Shared-store ([redis]) failures by operation: replay (a single-use check, refused with 503), sign-out (an attempt to share sign-outs failed, tried again; or one given up), subscribe (other replicas' sign-outs not received until it reconnects), malformed (an unreadable stored or published sign-out).",
        );
        for op in ["replay", "sign-out", "subscribe", "malformed"] {
            let _ = writeln!(
                out,
                "portcullis_redis_errors_total{{op=\"{op}\"}} {}",
                self.redis_errors.get(&op)
            );
        }
        scalar(
            &mut out,
            "portcullis_redis_sign_outs_received_total",
            "counter",
            "Sign-outs made on other replicas and recorded here through the shared store.",
            self.redis_sign_outs_received.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "portcullis_redis_sign_outs_unshared",
            "gauge",
            "Sign-outs made here that Redis has not taken yet: they hold here and are tried again until shared or their sessions end.",
            self.redis_sign_outs_unshared.load(Ordering::Relaxed),
        );
        family(
            &mut out,
            "portcullis_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When each certificate the listeners serve expires: its leaf's notAfter (Unix seconds), by cert file and [[tls.sni]] server_names (default: the [tls] certificate).",
        );
        for c in certificates {
            let names =
                if c.server_names.is_empty() { "default".into() } else { c.server_names.join(",") };
            let _ = writeln!(
                out,
                "portcullis_tls_certificate_expiry_timestamp_seconds{{cert=\"{}\",server_names=\"{}\"}} {}",
                escape(&c.cert.to_string_lossy()),
                escape(&names),
                c.not_after
            );
        }
        by_route(
            &mut out,
            "portcullis_shadow_disagreements_total",
            "counter",
            "Requests where the shadow policy decided differently.",
            &self.shadow_disagreements,
        );
        scalar(
            &mut out,
            "portcullis_connections_open",
            "gauge",
            "Client connections currently open.",
            self.connections_open.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "portcullis_idle_connections_closed_total",
            "counter",
            "Client connections closed after idle_timeout with no request in flight.",
            self.idle_connections_closed.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "portcullis_stalled_connections_closed_total",
            "counter",
            "Client connections dropped because the client took nothing of what it was sent for send_timeout, or did not finish closing.",
            self.stalled_connections_closed.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "portcullis_accept_errors_total",
            "counter",
            "Failed accepts on the client, admin and database listeners (EMFILE: out of file descriptors), each retried after 50 ms.",
            self.accept_errors.load(Ordering::Relaxed),
        );
        family(
            &mut out,
            "portcullis_connections_refused_total",
            "counter",
            "Client connections closed at accept, unserved and holding no slot, by reason.",
        );
        // One reason so far; the label leaves room for others.
        let reason = crate::server::per_client::REFUSED_REASON;
        let _ = writeln!(
            out,
            "portcullis_connections_refused_total{{reason=\"{reason}\"}} {}",
            self.connections_refused.get(&reason)
        );
        scalar(
            &mut out,
            "portcullis_websocket_tunnels_open",
            "gauge",
            "WebSocket tunnels open now.",
            self.websocket_tunnels_open.load(Ordering::Relaxed),
        );
        family(
            &mut out,
            "portcullis_websocket_tunnels_closed_total",
            "counter",
            "WebSocket tunnels ended, by reason.",
        );
        for end in crate::http::tunnel::End::ALL {
            let reason = end.label();
            let _ = writeln!(
                out,
                "portcullis_websocket_tunnels_closed_total{{reason=\"{reason}\"}} {}",
                self.websocket_tunnels_closed.get(&reason)
            );
        }
        scalar(
            &mut out,
            "portcullis_audit_write_errors_total",
            "counter",
            "Failed writes of the audit log to its output (each retried).",
            self.audit_write_errors.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "portcullis_audit_events_dropped_total",
            "counter",
            "Audit events lost: the queue was full (output slow or failing), or unwritten at exit.",
            self.audit_events_dropped.load(Ordering::Relaxed),
        );
        self.render_postgres(&mut out, database_routes);
        out
    }

    /// The `portcullis_pg_*` families.
    fn render_postgres(&self, out: &mut String, database_routes: &[Arc<str>]) {
        family(
            out,
            "portcullis_pg_sessions_total",
            "counter",
            "Database sessions opened (allow) or refused (deny), by route and reason.",
        );
        let mut s = self.pg_sessions.snapshot();
        s.sort();
        for ((route, decision, reason), v) in s {
            let _ = writeln!(
                out,
                "portcullis_pg_sessions_total{{route=\"{}\",decision=\"{decision}\",reason=\"{reason}\"}} {v}",
                escape(&route)
            );
        }
        family(
            out,
            "portcullis_pg_sessions_open",
            "gauge",
            "Database sessions currently open, by route.",
        );
        let mut open: std::collections::BTreeMap<Arc<str>, u64> =
            database_routes.iter().map(|r| (r.clone(), 0)).collect();
        open.extend(self.pg_sessions_open.snapshot());
        for (route, v) in open {
            let _ =
                writeln!(out, "portcullis_pg_sessions_open{{route=\"{}\"}} {v}", escape(&route));
        }
        by_route(
            out,
            "portcullis_pg_statements_total",
            "counter",
            "Statements sent for execution (Query, or Bind of a parsed statement), by route.",
            &self.pg_statements,
        );
        by_pair(
            out,
            "portcullis_pg_session_terminations_total",
            "counter",
            "Database sessions ended by portcullis, by route and reason.",
            ("route", "reason"),
            &self.pg_terminations,
        );
        by_pair(out, "portcullis_pg_bytes_total", "counter", "Bytes relayed by database sessions, by route and direction (in: client to server, out: server to client).", ("route", "direction"), &self.pg_bytes);
    }
}

/// The `# HELP` and `# TYPE` lines of one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family labelled by route only, sorted.
fn by_route(out: &mut String, name: &str, kind: &str, help: &str, f: &Family<Arc<str>>) {
    by_label(out, name, kind, help, "route", f);
}

/// A family with one label, sorted.
fn by_label(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    f: &Family<Arc<str>>,
) {
    family(out, name, kind, help);
    let mut samples = f.snapshot();
    samples.sort();
    for (value, v) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {v}", escape(&value));
    }
}

/// A family labelled by a name (escaped) and a fixed code, sorted.
fn by_pair(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    (first, second): (&str, &str),
    f: &Family<(Arc<str>, &'static str)>,
) {
    family(out, name, kind, help);
    let mut samples = f.snapshot();
    samples.sort();
    for ((a, b), v) in samples {
        let _ = writeln!(out, "{name}{{{first}=\"{}\",{second}=\"{b}\"}} {v}", escape(&a));
    }
}

/// A family with one unlabelled sample.
fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The process-wide registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// One client connection in `portcullis_connections_open`, from when it is made until it
/// is dropped: held by whatever holds the connection's `max_connections` place (an HTTP
/// connection's [`crate::http::activity::Activity`], which a WebSocket tunnel keeps; a
/// database connection's task), so the gauge ends when the connection does, not when
/// the HTTP server hands an upgraded one to its tunnel.
#[derive(Debug)]
pub struct OpenConnection(());

impl OpenConnection {
    pub fn new() -> Self {
        global().connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(())
    }
}

impl Default for OpenConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        global().connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_families_render_with_help_type_and_labels() {
        let m = Metrics::default();
        let route: Arc<str> = Arc::from("orders");
        m.pg_sessions.inc(&(route.clone(), "allow", "allowed"));
        m.pg_sessions.add(&(route.clone(), "deny", "policy-denied"), 2);
        m.pg_sessions_open.inc(&route);
        m.pg_sessions_open.inc(&route);
        m.pg_sessions_open.sub(&route, 1);
        m.pg_statements.handle(&route).fetch_add(7, Ordering::Relaxed);
        m.pg_terminations.inc(&(route.clone(), "access-revoked"));
        m.pg_bytes.handle(&(route.clone(), "in")).fetch_add(100, Ordering::Relaxed);
        m.pg_bytes.add(&(route.clone(), "out"), 2000);
        // A gauge never goes below zero.
        m.pg_sessions_open.sub(&Arc::from("other"), 1);
        let out = m.render();
        for line in [
            "# TYPE portcullis_pg_sessions_total counter",
            "portcullis_pg_sessions_total{route=\"orders\",decision=\"allow\",reason=\"allowed\"} 1",
            "portcullis_pg_sessions_total{route=\"orders\",decision=\"deny\",reason=\"policy-denied\"} 2",
            "# TYPE portcullis_pg_sessions_open gauge",
            "portcullis_pg_sessions_open{route=\"orders\"} 1",
            "portcullis_pg_statements_total{route=\"orders\"} 7",
            "portcullis_pg_session_terminations_total{route=\"orders\",reason=\"access-revoked\"} 1",
            "portcullis_pg_bytes_total{route=\"orders\",direction=\"in\"} 100",
            "portcullis_pg_bytes_total{route=\"orders\",direction=\"out\"} 2000",
        ] {
            assert!(out.lines().any(|l| l == line), "missing `{line}` in:\n{out}");
        }
        assert!(!out.contains("route=\"other\""));
        // A configured route without a session shows 0, not nothing.
        let out = m.render_for(&[Arc::from("orders"), Arc::from("idle")], &[]);
        assert!(out.lines().any(|l| l == "portcullis_pg_sessions_open{route=\"idle\"} 0"), "{out}");
        assert!(out.lines().any(|l| l == "portcullis_pg_sessions_open{route=\"orders\"} 1"));
        let help = out.lines().filter(|l| l.starts_with("# HELP portcullis_pg_")).count();
        assert_eq!(help, 5);
    }

    #[test]
    fn build_info_sign_ins_refreshes_and_key_freshness_render() {
        let m = Metrics::default();
        let corp: Arc<str> = Arc::from("corp");
        m.sign_ins.inc(&(corp.clone(), "ok"));
        m.sign_ins.add(&(Arc::from(""), "error"), 2);
        m.session_refreshes.inc(&(corp.clone(), "error"));
        m.jwks_last_success.set(&corp, 1_795_690_366);
        m.jwks_last_success.set(&corp, 1_795_690_400);
        let out = m.render();
        for line in [
            "# TYPE portcullis_build_info gauge",
            &format!("portcullis_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
            "# TYPE portcullis_sign_ins_total counter",
            "portcullis_sign_ins_total{issuer=\"corp\",outcome=\"ok\"} 1",
            "portcullis_sign_ins_total{issuer=\"\",outcome=\"error\"} 2",
            "portcullis_session_refreshes_total{issuer=\"corp\",outcome=\"error\"} 1",
            "# TYPE portcullis_jwks_last_success_timestamp_seconds gauge",
            "portcullis_jwks_last_success_timestamp_seconds{issuer=\"corp\"} 1795690400",
        ] {
            assert!(out.lines().any(|l| l == line), "missing `{line}` in:\n{out}");
        }
    }

    /// The families `/metrics` serves, as its `# HELP` lines name them.
    fn families() -> std::collections::BTreeSet<String> {
        Metrics::default()
            .render()
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP ")?.split_once(' '))
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// Every `portcullis_…` name in `text` (a cookie name prefix such as
    /// `_portcullis_login_…` ends with `_` and is no metric).
    fn names_in(text: &str) -> Vec<&str> {
        text.match_indices("portcullis_")
            .filter(|(at, _)| !text[..*at].ends_with('_'))
            .map(|(at, _)| {
                let rest = &text[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .filter(|name| !name.ends_with('_'))
            .collect()
    }

    /// docs/metrics.md has a row for every family, and no document names a metric the
    /// proxy does not serve (a histogram's `_bucket`, `_sum` and `_count` included).
    #[test]
    fn every_family_is_in_the_metrics_reference_and_every_documented_name_is_served() {
        let families = families();
        assert!(families.len() > 25, "{families:?}");
        let reference = include_str!("../docs/metrics.md");
        let rows: std::collections::BTreeSet<&str> = reference
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
            .map(|(name, _)| name)
            .filter(|name| name.starts_with("portcullis_"))
            .collect();
        let missing: Vec<_> = families.iter().filter(|f| !rows.contains(f.as_str())).collect();
        assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
        let served = |name: &str| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            families.contains(name) || families.contains(base)
        };
        for (doc, text) in [
            ("README.md", include_str!("../README.md")),
            ("docs/metrics.md", reference),
            ("docs/configuration.md", include_str!("../docs/configuration.md")),
            ("docs/postgres.md", include_str!("../docs/postgres.md")),
            ("docs/sso.md", include_str!("../docs/sso.md")),
            ("docs/audit.md", include_str!("../docs/audit.md")),
            ("docs/architecture.md", include_str!("../docs/architecture.md")),
            ("docs/threat-model.md", include_str!("../docs/threat-model.md")),
            ("policies/README.md", include_str!("../policies/README.md")),
        ] {
            let unknown: Vec<_> = names_in(text).into_iter().filter(|n| !served(n)).collect();
            assert!(unknown.is_empty(), "{doc} names metrics /metrics does not serve: {unknown:?}");
        }
    }
}
