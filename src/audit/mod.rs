//! The access/audit log: one JSON line per request (and, later, per database session
//! and statement), written by a dedicated thread so the request path only serializes
//! and enqueues.
//!
//! Events never contain a token, cookie, password or query-string value: the types
//! below have no field that could hold one.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::identity::Identity;
use crate::policy::RuleRef;

/// TLS facts of the client connection.
#[derive(Debug, Clone, Serialize)]
pub struct TlsInfo {
    pub version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<Arc<str>>,
}

/// Who made the request, as recorded (no claims beyond these): the schema that
/// [`Identity::audit_fields`] writes by hand once per identity, and the serde reference
/// a test holds it to.
#[cfg(test)]
#[derive(Debug, Serialize)]
struct IdentitySummary<'a> {
    issuer: &'a str,
    subject: &'a str,
    kind: crate::identity::PrincipalKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email_verified: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups_truncated: Option<bool>,
}

#[cfg(test)]
impl<'a> IdentitySummary<'a> {
    fn of(id: &'a Identity) -> Self {
        Self {
            issuer: id.issuer.as_str(),
            subject: &id.subject,
            kind: id.kind,
            email: id.email.as_deref(),
            email_verified: id.email.as_ref().map(|_| id.email_verified),
            groups: (!id.groups.is_empty())
                .then(|| &id.groups[..id.groups.len().min(AUDIT_GROUPS_MAX)]),
            groups_truncated: (id.groups.len() > AUDIT_GROUPS_MAX).then_some(true),
        }
    }
}

/// What the shadow policy would have decided, when it disagrees.
/// An identity's `identity` and `ci` audit fields, serialized once per verified identity
/// and spliced into every event after that: a pipeline's repeated calls (and every
/// statement of a database session) escape none of these strings again.
#[derive(Default)]
pub struct AuditJson(std::sync::OnceLock<(Box<RawValue>, Option<Box<RawValue>>)>);

impl Clone for AuditJson {
    /// A clone starts empty: a changed copy must never reuse the original's fields.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for AuditJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditJson")
    }
}

impl Identity {
    /// The `identity` and `ci` fields of this identity's audit events, as JSON.
    pub fn audit_fields(&self) -> (&RawValue, Option<&RawValue>) {
        let (identity, ci) = self.audit.0.get_or_init(|| {
            // Written by hand, as the HTTP event is (a new identity per request is what a
            // flood of distinct tokens costs); the same bytes as serializing
            // `IdentitySummary` and `CiContext` with `AuditFormatter` (a test holds them).
            let raw = |json: Vec<u8>| {
                String::from_utf8(json).ok().and_then(|s| RawValue::from_string(s).ok())
            };
            let identity = raw(identity_json(self)).unwrap_or_default();
            (identity, self.ci.as_ref().and_then(|ci| raw(ci_json(ci))))
        });
        (identity, ci.as_deref())
    }
}

/// The most groups an identity's audit field lists: an Entra token can carry a couple of
/// hundred, and every event of that identity (each request, each statement) repeats
/// them. Beyond this many the field ends with `"groups_truncated":true`.
pub const AUDIT_GROUPS_MAX: usize = 50;

/// `IdentitySummary` of `id`, as JSON.
fn identity_json(id: &Identity) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"issuer\":");
    json_str(&mut out, id.issuer.as_str());
    out.extend_from_slice(b",\"subject\":");
    json_str(&mut out, &id.subject);
    out.extend_from_slice(b",\"kind\":");
    json_str(&mut out, id.kind.as_str());
    // An address the token claims is recorded with whether the issuer verified it: an
    // unverified one (`email_verified: false`, or no such claim, as Entra sends) is what
    // the caller says, not who they are, and policies never grant on it (V21).
    if let Some(email) = &id.email {
        out.extend_from_slice(b",\"email\":");
        json_str(&mut out, email);
        out.extend_from_slice(if id.email_verified {
            b",\"email_verified\":true"
        } else {
            b",\"email_verified\":false"
        });
    }
    // The groups the policy matched on (`groups_any`), so a reader can tell why a person
    // was let in; bounded, so a large directory does not make every line huge.
    if !id.groups.is_empty() {
        out.extend_from_slice(b",\"groups\":[");
        for (i, group) in id.groups.iter().take(AUDIT_GROUPS_MAX).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(&mut out, group);
        }
        out.push(b']');
        if id.groups.len() > AUDIT_GROUPS_MAX {
            out.extend_from_slice(b",\"groups_truncated\":true");
        }
    }
    out.push(b'}');
    out
}

/// A [`crate::identity::CiContext`] as JSON: `provider`, then the fields present in
/// declaration order ([`crate::identity::CiContext::FIELDS`]).
fn ci_json(ci: &crate::identity::CiContext) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    ci.write_json(&mut out, json_str);
    out
}

#[derive(Debug, Serialize)]
pub struct ShadowSummary<'a> {
    pub decision: &'static str,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a RuleRef>,
}

/// One HTTP request, allowed or not.
#[derive(Debug, Serialize)]
pub struct HttpEvent<'a> {
    pub ts: String,
    pub request_id: &'a str,
    pub kind: &'static str,
    /// The client's `ip:port`, formatted once per connection.
    pub client_addr: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a TlsInfo>,
    pub method: &'a str,
    pub host: &'a str,
    /// The normalized path, never the query string.
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<&'a str>,
    /// `allow`, `deny` or `error`.
    pub decision: &'static str,
    pub reason: &'static str,
    /// The precise cause of a rejection or failure, for operators. Never token material.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a RuleRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSummary<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_revision: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    /// The path sent upstream (no query string), only when it differs from `path`: a
    /// `strip_prefix` route, an upstream URL with a path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_path: Option<&'a str>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
}

impl HttpEvent<'_> {
    /// Appends the event as one JSON object, exactly as its `Serialize` derive writes it
    /// (a unit test holds the two to the same bytes). Written by hand because it runs
    /// once per request: field names go out as constant byte strings, and a string
    /// value with nothing to escape (nearly all) is one scan and one copy; serde_json
    /// spent about as much on this event as the rest of the proxy's own request work.
    ///
    /// The strings a client chooses (method, host, path, SNI, and the detail, which may
    /// quote them) are cut to [`MAX_FIELD_BYTES`] each, and the event then says
    /// `"truncated":true` (before `status`); the derive writes them whole.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut cut = false;
        let mut bounded = |s: &'_ str| -> usize {
            let end = bounded_len(s);
            cut |= end < s.len();
            end
        };
        out.extend_from_slice(b"{\"ts\":");
        json_str(out, &self.ts);
        str_field(out, "request_id", self.request_id);
        str_field(out, "kind", self.kind);
        str_field(out, "client_addr", self.client_addr);
        if let Some(tls) = self.tls {
            key(out, "tls");
            out.extend_from_slice(b"{\"version\":");
            json_str(out, tls.version);
            if let Some(sni) = tls.sni.as_deref() {
                str_field(out, "sni", &sni[..bounded(sni)]);
            }
            out.push(b'}');
        }
        str_field(out, "method", &self.method[..bounded(self.method)]);
        str_field(out, "host", &self.host[..bounded(self.host)]);
        str_field(out, "path", &self.path[..bounded(self.path)]);
        opt_str_field(out, "route", self.route);
        str_field(out, "decision", self.decision);
        str_field(out, "reason", self.reason);
        if let Some(detail) = self.detail {
            str_field(out, "detail", &detail[..bounded(detail)]);
        }
        if let Some(rule) = self.rule {
            rule_field(out, rule);
        }
        if let Some(shadow) = &self.shadow {
            key(out, "shadow");
            out.extend_from_slice(b"{\"decision\":");
            json_str(out, shadow.decision);
            str_field(out, "reason", shadow.reason);
            if let Some(rule) = shadow.rule {
                rule_field(out, rule);
            }
            out.push(b'}');
        }
        opt_str_field(out, "policy_revision", self.policy_revision);
        for (name, raw) in [("identity", self.identity), ("ci", self.ci)] {
            if let Some(raw) = raw {
                key(out, name);
                out.extend_from_slice(raw.get().as_bytes());
            }
        }
        opt_str_field(out, "upstream", self.upstream);
        if let Some(p) = self.upstream_path {
            str_field(out, "upstream_path", &p[..bounded(p)]);
        }
        if cut {
            out.extend_from_slice(b",\"truncated\":true");
        }
        let mut n = itoa::Buffer::new();
        for (name, value) in [
            ("status", u64::from(self.status)),
            ("bytes_in", self.bytes_in),
            ("bytes_out", self.bytes_out),
        ] {
            key(out, name);
            out.extend_from_slice(n.format(value).as_bytes());
        }
        key(out, "duration_ms");
        // Floats as serde_json writes them (shortest round-trip form; null if not finite).
        let _ = to_writer(&mut *out, &self.duration_ms);
        out.push(b'}');
    }
}

/// The most of a client-chosen string an event keeps (bytes): a 60 KiB path must not
/// make a 60 KiB line, which log shippers split (Docker's json-file at 16 KiB, journald
/// at 48 KiB) and which floods the log at one line per unauthenticated request.
pub const MAX_FIELD_BYTES: usize = 2048;

/// How much of `s` an event keeps: all of it, or [`MAX_FIELD_BYTES`] at most, cut on a
/// character boundary.
pub(crate) fn bounded_len(s: &str) -> usize {
    if s.len() <= MAX_FIELD_BYTES {
        return s.len();
    }
    let mut end = MAX_FIELD_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// `,"name":` — every field but an object's first.
fn key(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn str_field(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    json_str(out, value);
}

fn opt_str_field(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    if let Some(value) = value {
        str_field(out, name, value);
    }
}

fn rule_field(out: &mut Vec<u8>, rule: &RuleRef) {
    key(out, "rule");
    out.extend_from_slice(b"{\"id\":");
    json_str(out, &rule.id);
    str_field(out, "file", &rule.file.to_string_lossy());
    key(out, "line");
    out.extend_from_slice(itoa::Buffer::new().format(rule.line).as_bytes());
    out.push(b'}');
}

/// Appends `s` as a JSON string. Plain printable ASCII with nothing to escape (the usual
/// case): one vectorizable scan and one copy; otherwise serde_json escapes it with
/// [`AuditFormatter`], so the bytes are the same as a whole event serialized with it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let plain = !s
        .bytes()
        .fold(false, |any, b| any | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\'));
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = to_writer(&mut *out, s);
    }
}

/// serde_json's compact output, except that characters which show as nothing, as a
/// plain space, or reorder what follows are written as `\uXXXX` escapes: exactly those
/// the policy loader refuses (`crate::policy::is_hidden`: C1 controls and DEL, bidi
/// marks, embeddings, overrides and isolates (Trojan Source), every default-ignorable
/// character, the line and paragraph separators, non-ASCII spaces, U+2800). A claim (a branch name, an email) holding one would otherwise read in a
/// terminal or log viewer as something it is not. Still valid JSON with the same value.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditFormatter;

impl serde_json::ser::Formatter for AuditFormatter {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if fragment.is_ascii() && !fragment.contains('\u{7f}') {
            return w.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if misleading(c) {
                w.write_all(&fragment.as_bytes()[start..i])?;
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(w, "\\u{unit:04x}")?;
                }
                start = i + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[start..])
    }
}

/// Characters [`AuditFormatter`] escapes (beyond what JSON requires): the policy
/// loader's predicate, so the two never disagree.
fn misleading(c: char) -> bool {
    crate::policy::is_hidden(c)
}

/// `serde_json::to_writer`, with [`AuditFormatter`].
pub fn to_writer<W: Write, T: ?Sized + Serialize>(out: W, value: &T) -> serde_json::Result<()> {
    value.serialize(&mut serde_json::Serializer::with_formatter(out, AuditFormatter))
}

/// `serde_json::to_string`, with [`AuditFormatter`].
pub fn to_string<T: ?Sized + Serialize>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    to_writer(&mut out, value)?;
    // The formatter writes UTF-8 only: whole fragments, and ASCII escapes.
    String::from_utf8(out).map_err(serde::ser::Error::custom)
}

/// An RFC 3339 timestamp with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// How long the writer lets events accumulate after the first one of a batch before
/// writing them (group commit): one wake-up and one `write` per batch instead of per
/// event, and an event reaches the output at most this long after it happened.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// A batch this large is written without waiting out the linger.
const EARLY_WRITE_BYTES: usize = 256 * 1024;
/// Events queued and not yet written, at most (bytes). Beyond it, new events are dropped
/// and counted rather than held: a sink that stalls (a pipe nobody reads) or fails (a
/// full disk) must not take the process's memory with it.
pub const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// After a drop of an attributed event, `/readyz` reports the sink unhealthy this long.
const DROP_WINDOW: Duration = Duration::from_secs(10);
/// A write call that has not returned for this long makes the sink unhealthy (a stalled
/// reader). Each call writes at most [`CHUNK`], so a reader that makes progress (however
/// slowly, above [`CHUNK`] per [`STALL`]) is never reported stalled.
const STALL: Duration = Duration::from_secs(5);
/// The most one `write` call to the output is given (bytes): the default Linux pipe
/// capacity, so a blocking pipe write returns once the reader has taken one pipe's worth.
const CHUNK: usize = 64 * 1024;
/// At most one stderr line per this long about failing writes or dropped events.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Retry delays after a failed write: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// The queue between request paths and the writer thread: one byte buffer of
/// newline-terminated events, appended under a short lock.
struct Queue {
    state: Mutex<QueueState>,
    /// The writer waits here for events (or a flush, or close).
    wake: Condvar,
    /// [`AuditSink::flush`] waits here for the writer to catch up.
    written: Condvar,
    health: Arc<Health>,
}

#[derive(Default)]
struct QueueState {
    buf: Vec<u8>,
    /// Bytes the writer took from `buf` and has not finished writing (count to the cap).
    inflight: usize,
    /// Events queued so far, and events written so far (for `flush`).
    queued: u64,
    done: u64,
    /// The writer is waiting for the first event of a batch (needs a notify).
    writer_idle: bool,
    flush_asked: bool,
    closed: bool,
    /// The writer has ended (closed and drained, or never started): what is queued now
    /// is never written.
    finished: bool,
}

/// Whether audit events are reaching their output: shared by the writer thread (write
/// errors, stalls), the request path (drops) and `/readyz`.
#[derive(Debug)]
struct Health {
    epoch: Instant,
    write_errors: AtomicU64,
    dropped: AtomicU64,
    /// The last write (or flush) failed, and none has succeeded since.
    failing: AtomicBool,
    /// Milliseconds after `epoch` (+1, so 0 means never) of the last drop, of the last
    /// drop reported on stderr, and of the start of the write in progress (0: none).
    last_drop: AtomicU64,
    last_drop_report: AtomicU64,
    writing_since: AtomicU64,
    /// When a stalled write was last reported on stderr (same stamps).
    last_stall_report: AtomicU64,
    /// [`STALL`], or less in tests.
    stall: Duration,
    /// Bytes queued and not yet written (the queue's `buf` and `inflight`), and the
    /// queue's cap ([`QUEUE_BYTES`], or less in tests): whether an attributed event would
    /// still fit, for the gate.
    queued: AtomicUsize,
    cap: usize,
}

impl Health {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            write_errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            last_drop: AtomicU64::new(0),
            last_drop_report: AtomicU64::new(0),
            writing_since: AtomicU64::new(0),
            last_stall_report: AtomicU64::new(0),
            stall: STALL,
            queued: AtomicUsize::new(0),
            cap: QUEUE_BYTES,
        }
    }

    /// Now, as a non-zero millisecond stamp.
    fn stamp(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn within(&self, stamp: u64, window: Duration) -> bool {
        stamp != 0 && self.stamp().saturating_sub(stamp) < window.as_millis() as u64
    }

    fn write_error(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
        crate::metrics::global().audit_write_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` events lost; says so on stderr at most once per [`REPORT_EVERY`]. Only
    /// the loss of attributed events ([`Budget::Full`]) makes `/readyz` report
    /// `dropping`: anyone can have unattributed ones dropped.
    fn drop_events(&self, n: u64, budget: Budget, why: &'static str) {
        if n == 0 {
            return;
        }
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        crate::metrics::global().audit_events_dropped.fetch_add(n, Ordering::Relaxed);
        let now = self.stamp();
        if budget == Budget::Full {
            self.last_drop.store(now, Ordering::Relaxed);
        }
        let last = self.last_drop_report.load(Ordering::Relaxed);
        if !self.within(last, REPORT_EVERY)
            && self
                .last_drop_report
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(dropped_total = total, "audit events dropped: {why}");
        }
    }

    /// Says on stderr (at most once per [`REPORT_EVERY`]) that the writer is stuck in one
    /// write: the writer itself cannot, and with no failure and no drop yet nothing else
    /// would. Checked by the request path only when events pile up.
    fn report_stall(&self, queued: usize) {
        let last = self.last_stall_report.load(Ordering::Relaxed);
        if self.within(last, REPORT_EVERY) || !self.stalled() {
            return;
        }
        let now = self.stamp();
        if self
            .last_stall_report
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let since = self.writing_since.load(Ordering::Relaxed);
            tracing::error!(
                blocked_for_s = now.saturating_sub(since) / 1000,
                queued_bytes = queued,
                "audit log output stalled: a write has been blocked (is the reader of the pipe gone?); events queue up and are dropped once the queue is full"
            );
        }
    }

    /// One write call (of at most [`CHUNK`]) has been in progress for [`STALL`] or
    /// longer: the output took nothing for that long.
    fn stalled(&self) -> bool {
        let since = self.writing_since.load(Ordering::Relaxed);
        since != 0 && self.stamp().saturating_sub(since) >= self.stall.as_millis() as u64
    }

    /// The queue holds more than its cap less [`headroom`]: the events of requests
    /// admitted now might not fit.
    fn full(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > self.cap - headroom(self.cap)
    }

    /// The queue holds more than half its cap less [`headroom`]: the events of requests
    /// without a credential ([`Budget::Unattributed`]) admitted now might not fit.
    fn unattributed_full(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > self.cap / 2 - headroom(self.cap)
    }

    /// The state now: failing, stalled or full, else ok.
    fn present(&self) -> AuditStatus {
        if self.failing.load(Ordering::Relaxed) {
            AuditStatus::Failing
        } else if self.stalled() {
            AuditStatus::Stalled
        } else if self.full() {
            AuditStatus::Full
        } else {
            AuditStatus::Ok
        }
    }

    /// [`Self::present`], and `dropping` for [`DROP_WINDOW`] after an attributed event
    /// was dropped.
    fn status(&self) -> AuditStatus {
        match self.present() {
            AuditStatus::Ok if self.within(self.last_drop.load(Ordering::Relaxed), DROP_WINDOW) => {
                AuditStatus::Dropping
            }
            s => s,
        }
    }
}

/// How far below its cap the queue counts as full for the gate: room for the events of
/// requests admitted just before (each writes its event when it ends).
fn headroom(cap: usize) -> usize {
    cap / 8
}

/// How much of the queue an event may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// All of it: the events of everything with a verified identity (allowed requests,
    /// open and closed sessions, statements, denials of an authenticated caller), and
    /// the proxy's own (reloads).
    Full,
    /// Half of it: the event of a request or session without any verified identity,
    /// whatever its decision: refused before authentication (no route, unauthenticated,
    /// malformed, refused by the audit gate), answered by the proxy itself (the assertion
    /// JWKS, the sign-in pages and redirects), or let through without a credential (a
    /// `public` rule, a CORS preflight). Anyone can cause these, as fast as they like,
    /// so their flood must leave room for the rest, and their loss must not make the
    /// sink unhealthy (which would refuse everyone, or take the replica out of
    /// rotation). With `on_failure = "reject"` a request without a credential is not let
    /// through while its event would not fit ([`AuditHealth::present_unattributed`]).
    Unattributed,
}

impl Budget {
    /// The rule: an event with no verified identity is unattributed.
    pub fn of(identified: bool) -> Self {
        if identified {
            Self::Full
        } else {
            Self::Unattributed
        }
    }

    fn limit(self, cap: usize) -> usize {
        match self {
            Self::Full => cap,
            Self::Unattributed => cap / 2,
        }
    }
}

/// The audit sink's state, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditStatus {
    /// Events are being written.
    Ok,
    /// The last write to the output failed (full disk, closed pipe); retrying.
    Failing,
    /// Attributed events were dropped in the last `DROP_WINDOW` (the queue was full).
    /// `/readyz` only: the gate acts on the present state.
    Dropping,
    /// The output has taken nothing for `STALL` (nobody reads the pipe).
    Stalled,
    /// The queue is within `headroom` of its cap.
    Full,
}

impl AuditStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failing => "write-failing",
            Self::Dropping => "dropping",
            Self::Stalled => "stalled",
            Self::Full => "queue-full",
        }
    }
}

/// The events a sink never wrote, as [`AuditSink::close`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditLoss {
    /// Dropped while the process ran or closed the sink
    /// (`portcullis_audit_events_dropped_total`).
    pub dropped: u64,
    /// Still queued when the process stopped waiting for the output.
    pub unwritten: u64,
}

impl AuditLoss {
    /// The one line said on stderr at exit when any event was lost; `None` when every
    /// event was written.
    pub fn report(&self) -> Option<String> {
        let total = self.dropped + self.unwritten;
        if total == 0 {
            return None;
        }
        let mut parts = Vec::new();
        if self.dropped > 0 {
            parts.push(format!(
                "{} dropped (the queue was full or the output failed; portcullis_audit_events_dropped_total)",
                self.dropped
            ));
        }
        if self.unwritten > 0 {
            parts.push(format!(
                "{} still queued and not written before exit (the output stalled)",
                self.unwritten
            ));
        }
        Some(format!("audit log incomplete: {total} event(s) never written: {}", parts.join("; ")))
    }
}

/// A handle on a sink's health that does not keep its queue open (for `/readyz`).
#[derive(Debug, Clone)]
pub struct AuditHealth(Arc<Health>);

impl AuditHealth {
    /// What `/readyz` reports: [`Self::present`], or `dropping` for a while after an
    /// attributed event was dropped.
    pub fn status(&self) -> AuditStatus {
        self.0.status()
    }
    /// The state now (failing, stalled, queue full, or ok), which `on_failure =
    /// "reject"` acts on: ok again as soon as the output takes events and the queue has
    /// room.
    pub fn present(&self) -> AuditStatus {
        self.0.present()
    }
    /// [`Self::present`] for a request let through without a credential, whose event
    /// has only half the queue ([`Budget::Unattributed`]): `full` already when that
    /// half is within an eighth of the whole cap.
    pub fn present_unattributed(&self) -> AuditStatus {
        match self.0.present() {
            AuditStatus::Ok if self.0.unattributed_full() => AuditStatus::Full,
            s => s,
        }
    }
    /// Failed writes (and flushes) to the output so far.
    pub fn write_errors(&self) -> u64 {
        self.0.write_errors.load(Ordering::Relaxed)
    }
    /// Events dropped so far (queue full, or left unwritten when closing).
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// Closes the queue when the last [`AuditSink`] clone goes; the writer then writes what
/// is left and ends.
struct Handle {
    queue: Arc<Queue>,
    memory: Option<Arc<Mutex<Vec<String>>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.state.lock().closed = true;
        self.queue.wake.notify_one();
    }
}

/// Where events go. Cloning is cheap; all clones feed one writer thread.
#[derive(Clone)]
pub struct AuditSink {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditSink")
    }
}

impl AuditSink {
    pub fn stdout() -> Self {
        Self::spawn(Box::new(std::io::stdout()), None)
    }

    pub fn file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::spawn(Box::new(f), None))
    }

    /// Keeps events in memory, for tests.
    pub fn memory() -> Self {
        let mem = Arc::new(Mutex::new(Vec::new()));
        Self::spawn(Box::new(std::io::sink()), Some(mem))
    }

    /// Writes to `out`, queueing at most `queue_bytes` (tests; the others use
    /// [`QUEUE_BYTES`]).
    pub fn writer(out: Box<dyn Write + Send>, queue_bytes: usize) -> Self {
        Self::spawn_capped(out, None, queue_bytes)
    }

    fn spawn(out: Box<dyn Write + Send>, memory: Option<Arc<Mutex<Vec<String>>>>) -> Self {
        Self::spawn_capped(out, memory, QUEUE_BYTES)
    }

    fn spawn_capped(
        out: Box<dyn Write + Send>,
        memory: Option<Arc<Mutex<Vec<String>>>>,
        cap: usize,
    ) -> Self {
        Self::spawn_with(out, memory, cap, Health::new())
    }

    fn spawn_with(
        out: Box<dyn Write + Send>,
        memory: Option<Arc<Mutex<Vec<String>>>>,
        cap: usize,
        health: Health,
    ) -> Self {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            written: Condvar::new(),
            health: Arc::new(Health { cap, ..health }),
        });
        let q = queue.clone();
        let mem = memory.clone();
        let spawned = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || writer(&q, out, mem.as_deref()));
        // Without its thread nothing is ever written: say so wherever it is looked at.
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the audit writer thread");
            queue.health.write_error();
            queue.state.lock().finished = true;
        }
        Self { handle: Arc::new(Handle { queue, memory }) }
    }

    /// Serializes one event and queues it, with the whole queue ([`Budget::Full`]). The
    /// writer is woken only for the first event of a batch.
    pub fn emit<T: Serialize>(&self, event: &T) {
        self.emit_as(Budget::Full, event);
    }

    /// [`Self::emit`], within `budget`.
    pub fn emit_as<T: Serialize>(&self, budget: Budget, event: &T) {
        self.emit_with(budget, |line| to_writer(line, event).is_ok());
    }

    /// Queues one HTTP event, written by [`HttpEvent::write_json`] (the request path),
    /// within the budget [`Budget::of`] its identity.
    pub fn emit_http(&self, event: &HttpEvent<'_>) {
        let budget = Budget::of(event.identity.is_some());
        self.emit_with(budget, |line| {
            event.write_json(line);
            true
        });
    }

    /// Queues the line `write` appends to an empty buffer, if it says it succeeded and
    /// the queue holds no more than `budget` allows with it.
    fn emit_with(&self, budget: Budget, write: impl FnOnce(&mut Vec<u8>) -> bool) {
        thread_local! {
            // Reused serialization buffer: no allocation per event once warm.
            static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut line = SCRATCH.with(std::cell::Cell::take);
        line.clear();
        if write(&mut line) {
            line.push(b'\n');
            let queue = &self.handle.queue;
            let mut st = queue.state.lock();
            let over = st.buf.len() + st.inflight + line.len() > budget.limit(queue.health.cap);
            if over || st.finished {
                let finished = st.finished;
                drop(st);
                let why = match budget {
                    _ if finished => "the audit log is closed (shutting down)",
                    Budget::Full => "the queue is full (the output is slow or failing)",
                    Budget::Unattributed => "the queue is half full (the output is slow or failing); events of requests refused before authentication are dropped first",
                };
                queue.health.drop_events(1, budget, why);
                SCRATCH.with(|s| s.set(line));
                return;
            }
            st.buf.extend_from_slice(&line);
            st.queued += 1;
            queue.health.queued.store(st.buf.len() + st.inflight, Ordering::Relaxed);
            let backlog = st.buf.len() >= EARLY_WRITE_BYTES;
            let wake = st.writer_idle || backlog;
            if wake {
                st.writer_idle = false;
            }
            let queued = st.buf.len() + st.inflight;
            drop(st);
            if wake {
                queue.wake.notify_one();
            }
            if backlog {
                queue.health.report_stall(queued);
            }
        }
        SCRATCH.with(|s| s.set(line));
    }

    /// Blocks until everything queued so far is written (at most 5 s).
    pub fn flush(&self) {
        let queue = &self.handle.queue;
        let mut st = queue.state.lock();
        let target = st.queued;
        if st.done >= target {
            return;
        }
        st.flush_asked = true;
        queue.wake.notify_one();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while st.done < target {
            if queue.written.wait_until(&mut st, deadline).timed_out() {
                return;
            }
        }
    }

    /// Closes the sink for good (the end of a shutdown, after the drain): the writer
    /// writes what is queued, without retrying a failed write, and ends. Waits for it at
    /// most `within`. Returns what never reached the output over the sink's lifetime:
    /// the events dropped (queue full, the output failing while closing, or emitted
    /// after the close) and those still queued when the wait ended (a stalled output).
    pub fn close(&self, within: Duration) -> AuditLoss {
        let queue = &self.handle.queue;
        let mut st = queue.state.lock();
        st.closed = true;
        queue.wake.notify_one();
        let deadline = Instant::now() + within;
        while !st.finished {
            if queue.written.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        let unwritten = if st.finished { 0 } else { st.queued.saturating_sub(st.done) };
        drop(st);
        AuditLoss { dropped: queue.health.dropped.load(Ordering::Relaxed), unwritten }
    }

    /// This sink's health, for `/readyz`.
    pub fn health(&self) -> AuditHealth {
        AuditHealth(self.handle.queue.health.clone())
    }

    /// Lines written so far (memory sinks only).
    pub fn lines(&self) -> Vec<String> {
        self.flush();
        self.handle.memory.as_ref().map(|m| m.lock().clone()).unwrap_or_default()
    }
}

/// The writer thread: waits for the first event of a batch, lingers so the batch can
/// grow, then writes it in [`CHUNK`]s and flushes. A failed write is counted, reported
/// and retried (from where it stopped, so no line is doubled) until it succeeds or the
/// sink closes; meanwhile the queue fills up to its cap and further events are dropped.
fn writer(queue: &Queue, mut out: Box<dyn Write + Send>, memory: Option<&Mutex<Vec<String>>>) {
    let mut report = Reporter::default();
    let mut spare = Vec::with_capacity(64 * 1024);
    let mut st = queue.state.lock();
    loop {
        while st.buf.is_empty() && !st.closed {
            st.flush_asked = false;
            st.writer_idle = true;
            queue.wake.wait(&mut st);
        }
        st.writer_idle = false;
        if st.buf.is_empty() {
            break; // closed and drained
        }
        if !st.flush_asked && !st.closed && st.buf.len() < EARLY_WRITE_BYTES {
            let _ = queue.wake.wait_for(&mut st, LINGER);
        }
        st.flush_asked = false;
        std::mem::swap(&mut st.buf, &mut spare);
        st.inflight = spare.len();
        let upto = st.queued;
        MutexGuard::unlocked(&mut st, || {
            if let Some(mem) = memory {
                let mut mem = mem.lock();
                for line in spare.split_inclusive(|b| *b == b'\n') {
                    mem.push(String::from_utf8_lossy(line).into_owned());
                }
            }
            write_batch(&mut *out, &spare, queue, &mut report);
            spare.clear();
            // A burst may have grown the buffer to the cap: do not keep that memory.
            spare.shrink_to(EARLY_WRITE_BYTES);
        });
        st.inflight = 0;
        queue.health.queued.store(st.buf.len(), Ordering::Relaxed);
        st.done = upto;
        queue.written.notify_all();
    }
    st.done = st.queued;
    st.finished = true;
    queue.written.notify_all();
}

/// Writes one batch, [`CHUNK`] at most per `write` call (each one that returns is
/// progress, and frees its bytes in the queue), retrying failures with a growing delay.
/// When the sink is closing, a failure is not retried: what is left is counted as
/// dropped.
fn write_batch(out: &mut dyn Write, batch: &[u8], queue: &Queue, report: &mut Reporter) {
    let health = &*queue.health;
    let mut written = 0;
    let mut flushed = false;
    let mut delay = RETRY_FIRST;
    while !flushed {
        health.writing_since.store(health.stamp(), Ordering::Relaxed);
        let result = if written < batch.len() {
            let end = batch.len().min(written + CHUNK);
            match out.write(&batch[written..end]) {
                Ok(0) => Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => {
                    written += n;
                    let mut st = queue.state.lock();
                    st.inflight = st.inflight.saturating_sub(n);
                    health.queued.store(st.buf.len() + st.inflight, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            out.flush().map(|()| flushed = true)
        };
        health.writing_since.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => {
                if health.failing.swap(false, Ordering::Relaxed) {
                    report.recovered(health);
                }
                delay = RETRY_FIRST;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                health.write_error();
                report.failed(health, &e);
                if queue.state.lock().closed {
                    let lost = batch[written..].iter().filter(|b| **b == b'\n').count();
                    health.drop_events(
                        lost as u64,
                        Budget::Full,
                        "the output failed while closing",
                    );
                    return;
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Says on stderr that writes fail (once per [`REPORT_EVERY`], not once per event) and
/// when they work again.
#[derive(Default)]
struct Reporter {
    last: Option<Instant>,
    errors_at_last: u64,
    since: Option<Instant>,
}

impl Reporter {
    fn failed(&mut self, health: &Health, e: &std::io::Error) {
        let since = *self.since.get_or_insert_with(Instant::now);
        if self.last.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return;
        }
        let errors = health.write_errors.load(Ordering::Relaxed);
        tracing::error!(
            error = %e,
            failed_writes = errors - self.errors_at_last,
            failing_for_s = since.elapsed().as_secs(),
            dropped_total = health.dropped.load(Ordering::Relaxed),
            "audit log write failed; retrying, events queue up and are dropped once the queue is full"
        );
        self.last = Some(Instant::now());
        self.errors_at_last = errors;
    }

    fn recovered(&mut self, health: &Health) {
        if let Some(since) = self.since.take() {
            tracing::warn!(
                failed_for_s = since.elapsed().as_secs(),
                write_errors_total = health.write_errors.load(Ordering::Relaxed),
                dropped_total = health.dropped.load(Ordering::Relaxed),
                "audit log writes succeed again"
            );
        }
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_ci_fields_are_the_bytes_serde_writes() {
        use crate::identity::{CiContext, PrincipalKind};
        let full = CiContext {
            provider: "bitbucket-pipelines",
            workspace: Some("{ws}".into()),
            workspace_id: Some("ws-id".into()),
            repository: Some("a\"quote\\back".into()),
            repository_id: Some("r\u{1}ctl".into()),
            branch: Some("feat/\u{202e}evil\u{2066}".into()),
            tag: Some("v1.0\u{a0}nbsp".into()),
            git_ref: Some("refs/heads/é-ü".into()),
            environment: Some("prod\u{2028}line".into()),
            commit: Some("c0ffee".into()),
            pipeline: Some("\u{7f}del".into()),
            run: Some("run\u{1d173}".into()),
            step: Some("step\u{feff}".into()),
            actor: Some("actor\u{e0001}".into()),
        };
        let sparse = CiContext {
            provider: "github-actions",
            branch: Some("main".into()),
            ..Default::default()
        };
        for ci in [full, sparse, CiContext::default()] {
            let expected = to_string(&ci).unwrap_or_default();
            assert_eq!(String::from_utf8(ci_json(&ci)).unwrap_or_default(), expected);
        }
        let many = |n: usize| (0..n).map(|i| format!("g{i}")).collect::<Vec<_>>();
        for (email, verified, kind, groups) in [
            (None, false, PrincipalKind::Pipeline, Vec::new()),
            (Some("a\u{200b}@x.com"), false, PrincipalKind::Human, Vec::new()),
            (Some("b@x.com"), true, PrincipalKind::Human, vec!["eng".to_string()]),
            (
                None,
                false,
                PrincipalKind::Human,
                vec!["a\"q".into(), "\u{202e}x".into(), "é".into()],
            ),
            (Some("c@x.com"), true, PrincipalKind::Human, many(AUDIT_GROUPS_MAX)),
            (Some("d@x.com"), true, PrincipalKind::Human, many(AUDIT_GROUPS_MAX + 1)),
            (None, false, PrincipalKind::Service, many(200)),
        ] {
            let id = Identity {
                issuer: crate::identity::IssuerId("iss\u{202e}".into()),
                subject: "sub\"\n".into(),
                kind,
                email: email.map(str::to_string),
                email_verified: verified,
                groups,
                groups_known: true,
                expires_at: u64::MAX,
                issued_at: None,
                ci: None,
                claims: serde_json::Map::new().into(),
                audit: Default::default(),
            };
            let expected = to_string(&IdentitySummary::of(&id)).unwrap_or_default();
            assert_eq!(String::from_utf8(identity_json(&id)).unwrap_or_default(), expected);
        }
    }

    #[test]
    fn identity_groups_are_listed_and_bounded() {
        let id = |groups: Vec<String>| Identity {
            issuer: crate::identity::IssuerId("corp".into()),
            subject: "alice".into(),
            kind: crate::identity::PrincipalKind::Human,
            email: None,
            email_verified: false,
            groups,
            groups_known: true,
            expires_at: u64::MAX,
            issued_at: None,
            ci: None,
            claims: serde_json::Map::new().into(),
            audit: Default::default(),
        };
        let parse = |id: &Identity| {
            serde_json::from_slice::<serde_json::Value>(&identity_json(id))
                .unwrap_or_else(|e| panic!("identity json: {e}"))
        };
        let none = parse(&id(Vec::new()));
        assert!(none.get("groups").is_none() && none.get("groups_truncated").is_none());
        let two = parse(&id(vec!["eng".into(), "ops".into()]));
        assert_eq!(two["groups"], serde_json::json!(["eng", "ops"]));
        assert!(two.get("groups_truncated").is_none());
        let entra = parse(&id((0..200).map(|i| format!("group-{i}")).collect()));
        let listed = entra["groups"].as_array().map_or(0, Vec::len);
        assert_eq!(listed, AUDIT_GROUPS_MAX);
        assert_eq!(entra["groups"][0], "group-0");
        assert_eq!(entra["groups_truncated"], true);
    }

    #[test]
    fn events_are_one_json_line_each() {
        let sink = AuditSink::memory();
        let tls = TlsInfo { version: "TLSv1.3", sni: Some(Arc::from("api.example.com")) };
        let ev = HttpEvent {
            ts: now_rfc3339(),
            request_id: "r1",
            kind: "http",
            client_addr: "127.0.0.1:5000",
            tls: Some(&tls),
            method: "GET",
            host: "api.example.com",
            path: "/x",
            route: Some("api"),
            decision: "deny",
            reason: "policy-denied",
            detail: None,
            rule: None,
            shadow: None,
            policy_revision: None,
            identity: None,
            ci: None,
            upstream: None,
            upstream_path: None,
            status: 403,
            bytes_in: 0,
            bytes_out: 10,
            duration_ms: 0.5,
        };
        sink.emit(&ev);
        sink.emit(&ev);
        let lines = sink.lines();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0].trim_end()).unwrap_or_default();
        assert_eq!(v["reason"], "policy-denied");
        assert_eq!(v["tls"]["sni"], "api.example.com");
        assert!(v.get("identity").is_none());
        assert!(lines[0].ends_with('\n') && !lines[0].trim_end().contains('\n'));
    }

    #[test]
    fn the_hand_written_http_event_is_byte_for_byte_what_serde_writes() {
        let rule = RuleRef {
            id: Arc::from("main-deploys"),
            file: Arc::from(std::path::Path::new("policies/déploy \"x\".toml")),
            line: 12,
        };
        let identity = RawValue::from_string(r#"{"issuer":"bb","subject":"a\"b"}"#.into())
            .unwrap_or_else(|e| panic!("{e}"));
        let ci =
            RawValue::from_string(r#"{"branch":"main"}"#.into()).unwrap_or_else(|e| panic!("{e}"));
        let tls_sni = TlsInfo { version: "TLSv1.3", sni: Some(Arc::from("api.example.com")) };
        let tls_bare = TlsInfo { version: "TLSv1.2", sni: None };
        let full = HttpEvent {
            ts: now_rfc3339(),
            request_id: "5c0ffee000000000002a",
            kind: "http",
            client_addr: "[::1]:40000",
            tls: Some(&tls_sni),
            method: "POST",
            host: "api.example.com:8443",
            path: "/deploy/42%20x",
            route: Some("deploy"),
            decision: "allow",
            reason: "allowed",
            detail: Some(
                "quote \" backslash \\ newline \n tab \t bell \u{7} del \u{7f} é ✓ \u{85} \u{202e}x \u{1f600} \u{e0041}",
            ),
            rule: Some(&rule),
            shadow: Some(ShadowSummary {
                decision: "deny",
                reason: "policy-denied",
                rule: Some(&rule),
            }),
            policy_revision: Some("git:3f2a1b0c9d8e"),
            identity: Some(&identity),
            ci: Some(&ci),
            upstream: Some("http://10.0.0.12:8080"),
            upstream_path: Some("/v2/42%20x"),
            status: 200,
            bytes_in: u64::MAX,
            bytes_out: 0,
            duration_ms: 2.718_281_9,
        };
        let sparse = HttpEvent {
            tls: Some(&tls_bare),
            route: None,
            detail: None,
            rule: None,
            shadow: Some(ShadowSummary { decision: "allow", reason: "allowed", rule: None }),
            policy_revision: None,
            identity: None,
            ci: None,
            upstream: None,
            upstream_path: None,
            method: "-",
            path: "-",
            status: 499,
            duration_ms: 0.0,
            ..full.clone_for_test()
        };
        let no_tls =
            HttpEvent { tls: None, shadow: None, duration_ms: 1e-9, ..sparse.clone_for_test() };
        let huge = HttpEvent { duration_ms: 12_345_678.5, ..full.clone_for_test() };
        for ev in [&full, &sparse, &no_tls, &huge] {
            let mut ours = Vec::new();
            ev.write_json(&mut ours);
            let serde = to_string(ev).unwrap_or_else(|e| panic!("{e}")).into_bytes();
            assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&serde));
        }
    }

    #[test]
    fn long_client_chosen_strings_are_cut_and_the_event_says_so() {
        let long = |c: &str| c.repeat(60 * 1024);
        // A path of two-byte characters: the cut falls inside one, and must not split it.
        let (method, host, path) = (long("M"), long("h"), format!("/{}", long("é")));
        let detail = format!("bad host {host}");
        let tls = TlsInfo { version: "TLSv1.3", sni: Some(Arc::from(long("s"))) };
        let ev = HttpEvent {
            tls: Some(&tls),
            method: &method,
            detail: Some(&detail),
            upstream_path: Some(&path),
            ..anonymous_401(&path, &host)
        };
        let mut line = Vec::new();
        ev.write_json(&mut line);
        assert!(line.len() < 7 * MAX_FIELD_BYTES, "{} bytes", line.len());
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
        assert_eq!(v["truncated"], true);
        for (field, full) in [
            ("method", &method),
            ("host", &host),
            ("path", &path),
            ("detail", &detail),
            ("upstream_path", &path),
        ] {
            let kept = v[field].as_str().unwrap_or_default();
            assert!(kept.len() <= MAX_FIELD_BYTES && kept.len() > MAX_FIELD_BYTES - 4, "{field}");
            assert!(full.starts_with(kept), "{field} is a prefix of what was sent");
        }
        assert_eq!(v["tls"]["sni"].as_str().map(str::len), Some(MAX_FIELD_BYTES));
        // A short event is whole, and says nothing of truncation.
        let short = HttpEvent {
            method: "GET",
            host: "a",
            path: "/",
            detail: None,
            tls: None,
            upstream_path: None,
            ..ev.clone_for_test()
        };
        let mut line = Vec::new();
        short.write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
        assert_eq!(v["path"], "/");
        assert!(v.get("truncated").is_none());
    }

    #[test]
    fn bidi_invisible_and_c1_characters_from_claims_and_requests_are_escaped() {
        use crate::identity::{ci, IssuerId, Preset};
        // A branch that reads as `main` followed by reordered text, and other tricks.
        let branch = "main\u{202e}\u{2066}lanif\u{2069}\u{200e}\u{200b}\u{85}\u{9f}\u{2028}x\u{2029}\u{7f}é✓";
        let escapes = [
            "\\u202e", "\\u2066", "\\u2069", "\\u200e", "\\u200b", "\\u0085", "\\u009f", "\\u2028",
            "\\u2029", "\\u007f",
        ];
        let check = |json: &str, what: &str| {
            assert!(!json.chars().any(misleading), "{what} holds a raw one: {json:?}");
            for e in escapes {
                assert!(json.contains(e), "{what} lacks {e}: {json}");
            }
            // Ordinary non-ASCII text stays as it is.
            assert!(json.contains("é✓"), "{what}: {json}");
        };
        let claims = serde_json::json!({
            "sub": "{repo}:{step}",
            "repositoryUuid": "{repo}",
            "workspaceUuid": "{ws}",
            "branchName": branch,
        });
        let claims = claims.as_object().cloned().unwrap_or_default();
        let id = Identity {
            issuer: IssuerId(Arc::from("bitbucket")),
            subject: "{repo}:{step}".into(),
            kind: Preset::BitbucketPipelines.default_kind(),
            email: Some(format!("dev@{branch}")),
            email_verified: true,
            groups: Vec::new(),
            groups_known: true,
            expires_at: u64::MAX,
            issued_at: None,
            ci: ci::normalize(Preset::BitbucketPipelines, &claims).ok().flatten(),
            claims: claims.into(),
            audit: Default::default(),
        };
        let (identity, ci) = id.audit_fields();
        check(identity.get(), "identity");
        let ci = ci.map(RawValue::get).unwrap_or_default();
        check(ci, "ci");
        let parsed: serde_json::Value = serde_json::from_str(ci).unwrap_or_default();
        assert_eq!(parsed["branch"], branch, "the value is the same once parsed");
        // A request's own strings, through the hand-written writer and through `emit`.
        let sink = AuditSink::memory();
        let path = format!("/{branch}");
        let ev = HttpEvent { identity: Some(identity), ..anonymous_401(&path, "a.example") };
        sink.emit_http(&ev);
        sink.emit(&serde_json::json!({ "kind": "pg.session", "application_name": branch }));
        let lines = sink.lines();
        assert_eq!(lines.len(), 2);
        for line in &lines {
            check(line.trim_end(), "event");
        }
        let parsed: serde_json::Value = serde_json::from_str(&lines[0]).unwrap_or_default();
        assert_eq!(parsed["path"], path.as_str());
    }

    #[test]
    fn every_character_the_policy_loader_refuses_is_escaped_in_audit_events() {
        let hidden: String = crate::policy::HIDDEN_SAMPLES.iter().collect();
        let path = format!("/a{hidden}b");
        let sink = AuditSink::memory();
        sink.emit_http(&anonymous_401(&path, "h"));
        sink.emit(&serde_json::json!({ "kind": "pg.session", "application_name": hidden }));
        let lines = sink.lines();
        assert_eq!(lines.len(), 2);
        for line in &lines {
            for &c in crate::policy::HIDDEN_SAMPLES {
                assert!(!line.contains(c), "U+{:04X} raw in {line:?}", c as u32);
            }
        }
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap_or_default();
        assert_eq!(v["path"], path.as_str(), "the value is the same once parsed");
        let v: serde_json::Value = serde_json::from_str(&lines[1]).unwrap_or_default();
        assert_eq!(v["application_name"], hidden.as_str());
    }

    /// An output that blocks while `blocked`, fails while `failing`, and keeps the rest.
    #[derive(Clone, Default)]
    struct Flaky {
        failing: Arc<AtomicBool>,
        blocked: Arc<(Mutex<bool>, Condvar)>,
        kept: Arc<Mutex<Vec<u8>>>,
    }

    impl Flaky {
        fn block(&self, on: bool) {
            *self.blocked.0.lock() = on;
            self.blocked.1.notify_all();
        }
        fn lines(&self) -> Vec<serde_json::Value> {
            let kept = self.kept.lock();
            kept.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap_or_default())
                .collect()
        }
    }

    impl Write for Flaky {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut blocked = self.blocked.0.lock();
            while *blocked {
                self.blocked.1.wait(&mut blocked);
            }
            if self.failing.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("no space left on device"));
            }
            // Half at a time: a retry must go on from where a short write stopped.
            let n = b.len().div_ceil(2);
            self.kept.lock().extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn failing_writes_are_counted_reported_unhealthy_and_retried_until_they_succeed() {
        let out = Flaky::default();
        out.failing.store(true, Ordering::Relaxed);
        let sink = AuditSink::writer(Box::new(out.clone()), QUEUE_BYTES);
        let health = sink.health();
        assert_eq!(health.status(), AuditStatus::Ok);
        let metric_before = crate::metrics::global().audit_write_errors.load(Ordering::Relaxed);
        for n in 0..10 {
            sink.emit(&serde_json::json!({ "n": n }));
        }
        eventually("a write error is counted", || health.write_errors() > 0);
        assert_eq!(health.status(), AuditStatus::Failing);
        assert!(
            crate::metrics::global().audit_write_errors.load(Ordering::Relaxed) > metric_before
        );
        assert!(crate::metrics::global()
            .render()
            .contains("\nportcullis_audit_write_errors_total "));
        // The output works again: everything queued meanwhile is written, once, in order.
        out.failing.store(false, Ordering::Relaxed);
        sink.flush();
        eventually("the sink is healthy again", || health.status() == AuditStatus::Ok);
        let ns: Vec<_> = out.lines().iter().map(|v| v["n"].as_u64()).collect();
        assert_eq!(ns, (0..10).map(Some).collect::<Vec<_>>());
        assert_eq!(health.dropped(), 0);
    }

    #[test]
    fn a_write_blocked_past_the_stall_limit_makes_the_sink_unhealthy_until_it_returns() {
        let out = Flaky::default();
        out.block(true);
        let health = Health { stall: Duration::from_millis(50), ..Health::new() };
        let sink = AuditSink::spawn_with(Box::new(out.clone()), None, QUEUE_BYTES, health);
        let health = sink.health();
        sink.emit(&serde_json::json!({ "n": 0 }));
        eventually("the sink reports a stall", || health.status() == AuditStatus::Stalled);
        out.block(false);
        sink.flush();
        eventually("the sink is healthy again", || health.status() == AuditStatus::Ok);
        assert_eq!(out.lines().len(), 1);
        assert_eq!((health.write_errors(), health.dropped()), (0, 0));
    }

    #[test]
    fn a_blocked_output_bounds_the_queue_and_drops_and_counts_the_excess() {
        let out = Flaky::default();
        out.block(true);
        let cap = 16 * 1024;
        let sink = AuditSink::writer(Box::new(out.clone()), cap);
        let health = sink.health();
        let pad = "x".repeat(90);
        let event = |n: u64| serde_json::json!({ "n": n, "pad": pad });
        // The shortest line: no more than the cap divided by it fit in the queue.
        let line_len = serde_json::to_vec(&event(0)).map_or(0, |v| v.len()) + 1;
        let dropped_before = crate::metrics::global().audit_events_dropped.load(Ordering::Relaxed);
        // ~100 KB of events towards an output that takes none of them.
        let sent = 1000;
        for n in 0..sent {
            sink.emit(&event(n));
        }
        let dropped = health.dropped();
        assert!(dropped >= sent - (cap / line_len) as u64, "only {dropped} dropped");
        assert_eq!(health.status(), AuditStatus::Full);
        assert!(
            crate::metrics::global().audit_events_dropped.load(Ordering::Relaxed)
                >= dropped_before + dropped
        );
        // Released, the output gets exactly what was kept, and no more than the cap.
        out.block(false);
        sink.flush();
        assert_eq!(health.status(), AuditStatus::Dropping, "for a while after a drop");
        let written = out.lines();
        assert_eq!(written.len() as u64, sent - dropped);
        assert!(written.len() * line_len <= cap);
        assert_eq!(written.first().map(|v| v["n"].clone()), Some(serde_json::json!(0)));
    }

    /// Closing at shutdown writes what is queued and says nothing when all of it was
    /// written; it counts what a failing output loses (without retrying past the close)
    /// and what a stalled one leaves queued, waiting no longer than it is given.
    #[test]
    fn closing_writes_the_queue_and_counts_what_never_reached_the_output() {
        // A working output: everything written, nothing to report.
        let out = Flaky::default();
        let sink = AuditSink::writer(Box::new(out.clone()), QUEUE_BYTES);
        for n in 0..50 {
            sink.emit(&serde_json::json!({ "n": n }));
        }
        let loss = sink.close(Duration::from_secs(5));
        assert_eq!(loss, AuditLoss::default());
        assert_eq!(loss.report(), None);
        assert_eq!(out.lines().len(), 50);
        // After the close an event is not queued for nobody: it is counted.
        sink.emit(&serde_json::json!({ "late": true }));
        assert_eq!(sink.health().dropped(), 1);
        assert_eq!(sink.close(Duration::ZERO).dropped, 1);

        // A failing output: the close does not retry for ever; every event is counted.
        let out = Flaky::default();
        out.failing.store(true, Ordering::Relaxed);
        let sink = AuditSink::writer(Box::new(out.clone()), QUEUE_BYTES);
        for n in 0..10 {
            sink.emit(&serde_json::json!({ "n": n }));
        }
        eventually("a write error is counted", || sink.health().write_errors() > 0);
        let start = Instant::now();
        let loss = sink.close(Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        assert_eq!(loss, AuditLoss { dropped: 10, unwritten: 0 });
        let report = loss.report().unwrap_or_default();
        assert!(report.contains("10 event(s) never written: 10 dropped"), "{report}");
        assert!(report.contains("portcullis_audit_events_dropped_total"), "{report}");

        // A stalled output, with some dropped earlier: the wait is bounded, and both
        // counts are in the one line.
        let out = Flaky::default();
        out.block(true);
        let sink = AuditSink::writer(Box::new(out.clone()), 1024);
        let pad = "x".repeat(200);
        for n in 0..20 {
            sink.emit(&serde_json::json!({ "n": n, "pad": pad }));
        }
        let dropped = sink.health().dropped();
        assert!(dropped > 0);
        let start = Instant::now();
        let loss = sink.close(Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        assert_eq!(loss.dropped, dropped);
        assert_eq!(loss.dropped + loss.unwritten, 20, "{loss:?}");
        let report = loss.report().unwrap_or_default();
        assert!(report.starts_with("audit log incomplete: 20 event(s) never written"), "{report}");
        assert!(report.contains("not written before exit"), "{report}");
        out.block(false);
    }

    /// An unauthenticated request's event, refused before any identity (a 401).
    fn anonymous_401<'a>(path: &'a str, host: &'a str) -> HttpEvent<'a> {
        HttpEvent {
            ts: now_rfc3339(),
            request_id: "r1",
            kind: "http",
            client_addr: "127.0.0.1:5000",
            tls: None,
            method: "GET",
            host,
            path,
            route: None,
            decision: "deny",
            reason: "unauthenticated",
            detail: None,
            rule: None,
            shadow: None,
            policy_revision: None,
            identity: None,
            ci: None,
            upstream: None,
            upstream_path: None,
            status: 401,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0.1,
        }
    }

    #[test]
    fn a_flood_of_unattributed_events_fills_half_the_queue_at_most_and_leaves_the_sink_healthy() {
        let out = Flaky::default();
        out.block(true);
        let cap = 64 * 1024;
        let sink = AuditSink::writer(Box::new(out.clone()), cap);
        let health = sink.health();
        let (path, host) = (format!("/{}", "p".repeat(4096)), "h".repeat(4096));
        // ~5 MB of refused, identity-less events (401s, and the gate's own 503s).
        let gate_refusal = HttpEvent {
            decision: "error",
            reason: "audit-unavailable",
            status: 503,
            ..anonymous_401(&path, &host)
        };
        for _ in 0..500 {
            sink.emit_http(&anonymous_401(&path, &host));
            sink.emit_http(&gate_refusal);
            sink.emit_as(Budget::Unattributed, &serde_json::json!({ "kind": "pg.session" }));
        }
        let dropped = health.dropped();
        assert!(dropped > 1000, "only {dropped} dropped");
        assert!(health.0.queued.load(Ordering::Relaxed) <= cap / 2);
        assert_eq!(health.status(), AuditStatus::Ok, "unattributed drops keep it healthy");
        assert_eq!(health.present(), AuditStatus::Ok);
        // An authenticated caller's events still queue, denials included.
        let identity = RawValue::from_string(r#"{"issuer":"idp","subject":"alice"}"#.into())
            .unwrap_or_else(|e| panic!("{e}"));
        let denied = HttpEvent {
            identity: Some(&identity),
            reason: "policy-denied",
            status: 403,
            ..anonymous_401("/x", "a")
        };
        for _ in 0..20 {
            sink.emit_http(&denied);
            sink.emit(&serde_json::json!({ "kind": "pg.statement" }));
        }
        assert_eq!(health.dropped(), dropped, "no attributed event dropped");
        assert_eq!(health.status(), AuditStatus::Ok);
        // Attributed events fill the rest: the gate refuses before the queue is full, and
        // their drops do make `/readyz` say so.
        let pad = "x".repeat(1000);
        while health.present() == AuditStatus::Ok {
            sink.emit(&serde_json::json!({ "pad": pad }));
        }
        assert_eq!(health.present(), AuditStatus::Full);
        assert_eq!(health.dropped(), dropped, "full for the gate before any drop");
        for _ in 0..100 {
            sink.emit(&serde_json::json!({ "pad": pad }));
        }
        assert!(health.dropped() > dropped);
        assert_eq!(health.status(), AuditStatus::Full);
        // As soon as the output takes events, the gate admits again; `/readyz` says
        // `dropping` a while longer.
        out.block(false);
        sink.flush();
        assert_eq!(health.present(), AuditStatus::Ok);
        assert_eq!(health.status(), AuditStatus::Dropping);
    }

    /// Requests without any credential that the proxy answers itself (`GET
    /// /.well-known/portcullis/jwks.json`, the sign-in pages) or lets through (a `public`
    /// rule, a CORS preflight) have `decision: allow`, and anyone can send them as fast as
    /// they like: their events take half the queue at most, as refusals do, so their
    /// flood neither makes the sink unhealthy (`/readyz`, the gate) nor drops an
    /// authenticated caller's event; `present_unattributed` tells the proxy, in reject
    /// mode, to refuse more of them before their half is full.
    #[test]
    fn identity_less_allow_events_fill_half_the_queue_at_most() {
        let out = Flaky::default();
        out.block(true);
        let cap = 64 * 1024;
        let sink = AuditSink::writer(Box::new(out.clone()), cap);
        let health = sink.health();
        let path = format!("/{}", "p".repeat(2000));
        let public = HttpEvent {
            decision: "allow",
            reason: "public",
            status: 200,
            ..anonymous_401(&path, "localhost")
        };
        let jwks = HttpEvent {
            decision: "allow",
            reason: "internal",
            status: 200,
            ..anonymous_401("/.well-known/portcullis/jwks.json", "localhost")
        };
        assert_eq!(health.present_unattributed(), AuditStatus::Ok);
        for _ in 0..200 {
            sink.emit_http(&public);
            sink.emit_http(&jwks);
        }
        let dropped = health.dropped();
        assert!(dropped > 100, "only {dropped} dropped");
        assert!(health.0.queued.load(Ordering::Relaxed) <= cap / 2);
        assert_eq!(health.status(), AuditStatus::Ok, "their drops keep it healthy");
        assert_eq!(health.present(), AuditStatus::Ok, "the gate still admits");
        assert_eq!(health.present_unattributed(), AuditStatus::Full);
        // An authenticated caller's events still queue.
        let identity = RawValue::from_string(r#"{"issuer":"idp","subject":"alice"}"#.into())
            .unwrap_or_else(|e| panic!("{e}"));
        let allowed = HttpEvent { identity: Some(&identity), ..public };
        for _ in 0..5 {
            sink.emit_http(&allowed);
        }
        assert_eq!(health.dropped(), dropped, "no attributed event dropped");
        out.block(false);
        sink.flush();
        assert_eq!(health.present_unattributed(), AuditStatus::Ok);
    }

    /// An output like a blocking pipe to a slow reader: a write of `n` bytes returns after
    /// the reader took them, at `per_chunk` per 64 KiB.
    #[derive(Clone)]
    struct Trickle {
        per_chunk: Duration,
        kept: Arc<AtomicU64>,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.per_chunk.mul_f64(b.len() as f64 / (64.0 * 1024.0)));
            self.kept.fetch_add(b.len() as u64, Ordering::Relaxed);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_slow_reader_that_makes_progress_is_not_a_stall() {
        let out = Trickle { per_chunk: Duration::from_millis(15), kept: Arc::default() };
        let health = Health { stall: Duration::from_millis(100), ..Health::new() };
        let sink = AuditSink::spawn_with(Box::new(out.clone()), None, QUEUE_BYTES, health);
        let health = sink.health();
        // 2 MiB at once: ~0.5 s to write, no 64 KiB of it slower than 15 ms.
        let pad = "x".repeat(1000);
        let mut total = 0;
        for n in 0..2048 {
            let line = serde_json::json!({ "n": n, "pad": pad });
            total += serde_json::to_vec(&line).map_or(0, |v| v.len() as u64) + 1;
            sink.emit(&line);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.kept.load(Ordering::Relaxed) < total {
            assert_eq!(health.status(), AuditStatus::Ok, "a live reader is not stalled");
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!((health.write_errors(), health.dropped()), (0, 0));
    }

    impl<'a> HttpEvent<'a> {
        fn clone_for_test(&self) -> HttpEvent<'a> {
            HttpEvent {
                ts: self.ts.clone(),
                shadow: self.shadow.as_ref().map(|s| ShadowSummary { ..*s }),
                ..*self
            }
        }
    }
}
