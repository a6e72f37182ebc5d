//! The access/audit log: one JSON line per request (and, later, per database session
//! and statement), written by a dedicated thread so the request path only serializes
//! and enqueues.
//!
//! Events never contain a token, cookie, password or query-string value: the types
//! below have no field that could hold one.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use crate::identity::{CiContext, Identity};
use crate::policy::RuleRef;

/// TLS facts of the client connection.
#[derive(Debug, Clone, Serialize)]
pub struct TlsInfo {
    pub version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<Arc<str>>,
}

/// Who made the request, as recorded (no claims beyond these).
#[derive(Debug, Serialize)]
pub struct IdentitySummary<'a> {
    pub issuer: &'a str,
    pub subject: &'a str,
    pub kind: crate::identity::PrincipalKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<&'a str>,
}

impl<'a> IdentitySummary<'a> {
    pub fn of(id: &'a Identity) -> Self {
        Self {
            issuer: id.issuer.as_str(),
            subject: &id.subject,
            kind: id.kind,
            email: id.email.as_deref(),
        }
    }
}

/// What the shadow policy would have decided, when it disagrees.
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
    pub client_addr: SocketAddr,
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
    pub identity: Option<IdentitySummary<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci: Option<&'a CiContext>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
}

/// An RFC 3339 timestamp with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

enum Msg {
    Line(Vec<u8>),
    Flush(mpsc::SyncSender<()>),
}

/// Where events go. Cloning is cheap; all clones feed one writer thread.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    memory: Option<Arc<Mutex<Vec<String>>>>,
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

    fn spawn(out: Box<dyn Write + Send>, memory: Option<Arc<Mutex<Vec<String>>>>) -> Self {
        let (tx, rx) = mpsc::channel::<Msg>();
        let mem = memory.clone();
        let spawned =
            std::thread::Builder::new().name("portcullis-audit".into()).spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
                while let Ok(msg) = rx.recv() {
                    let mut next = Some(msg);
                    // Drain whatever is queued, then flush once: one write syscall per batch.
                    while let Some(m) = next.take() {
                        match m {
                            Msg::Line(l) => {
                                if let Some(mem) = &mem {
                                    mem.lock().push(String::from_utf8_lossy(&l).into_owned());
                                }
                                let _ = out.write_all(&l);
                            }
                            Msg::Flush(ack) => {
                                let _ = out.flush();
                                let _ = ack.send(());
                            }
                        }
                        next = rx.try_recv().ok();
                    }
                    let _ = out.flush();
                }
                let _ = out.flush();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the audit writer thread");
        }
        Self { tx, memory }
    }

    /// Serializes one event and queues it.
    pub fn emit<T: Serialize>(&self, event: &T) {
        let mut buf = Vec::with_capacity(768);
        if serde_json::to_writer(&mut buf, event).is_ok() {
            buf.push(b'\n');
            let _ = self.tx.send(Msg::Line(buf));
        }
    }

    /// Blocks until everything queued so far is written.
    pub fn flush(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(std::time::Duration::from_secs(5));
        }
    }

    /// Lines written so far (memory sinks only).
    pub fn lines(&self) -> Vec<String> {
        self.flush();
        self.memory.as_ref().map(|m| m.lock().clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_line_each() {
        let sink = AuditSink::memory();
        let tls = TlsInfo { version: "TLSv1.3", sni: Some(Arc::from("api.example.com")) };
        let ev = HttpEvent {
            ts: now_rfc3339(),
            request_id: "r1",
            kind: "http",
            client_addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
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
}
