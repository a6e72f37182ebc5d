//! Audit events of database sessions: `pg.session` (open, refused, close), `pg.statement`
//! and `pg.cancel`. Like the HTTP event, no type here has a field that could hold a token,
//! a password, SCRAM material or a bind parameter value.

use std::net::SocketAddr;

use serde::Serialize;

use serde_json::value::RawValue;

use super::startup::MAX_SHOWN;
use crate::audit::TlsInfo;
use crate::policy::RuleRef;

/// A session opened, was refused, or closed.
#[derive(Debug, Serialize)]
pub struct SessionEvent<'a> {
    pub ts: String,
    pub kind: &'static str,
    /// `open`, `refused` or `close`.
    pub event: &'static str,
    pub session_id: &'a str,
    pub route: &'a str,
    pub client_addr: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a TlsInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<&'a str>,
    /// The role the client asked for (`user=` in the connection string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'a str>,
    /// The role portcullis authenticated as upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_role: Option<&'a str>,
    pub upstream: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_name: Option<&'a str>,
    /// Open only: the startup parameters forwarded to the server (names as the client
    /// spelled them; values cut to [`MAX_SHOWN`] characters), `client_encoding=UTF8`
    /// included when portcullis added it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_parameters: Option<StartupParameters<'a>>,
    /// `allow` or `deny` (open/refused); on close, how it ended.
    pub decision: &'static str,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a RuleRef>,
    pub policy_revision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci: Option<&'a RawValue>,
    /// Close only: who ended the session (`client`, `upstream`, `portcullis`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statements: Option<u64>,
    /// Close only, when true: a statement was still running when the session ended, and
    /// portcullis sent the backend a cancel request (PostgreSQL does not say whether it
    /// stopped anything).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_sent: Option<bool>,
}

/// Startup parameters, written as a JSON object in the packet's order.
#[derive(Debug, Clone, Copy)]
pub struct StartupParameters<'a>(pub &'a [(String, String)]);

impl Serialize for StartupParameters<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            let bounded = |v: &str| v.chars().take(MAX_SHOWN).collect::<String>();
            m.serialize_entry(&bounded(name), &bounded(value))?;
        }
        m.end()
    }
}

/// One statement sent for execution: a simple Query, a Bind of a parsed statement, a
/// FunctionCall; or the text of a named statement before anything could run it by name.
#[derive(Debug, Serialize)]
pub struct StatementEvent<'a> {
    pub ts: String,
    pub kind: &'static str,
    pub session_id: &'a str,
    pub route: &'a str,
    pub database: &'a str,
    pub upstream_role: &'a str,
    /// 1, 2, ... within the session.
    pub seq: u64,
    /// `simple` (Query), `extended` (Parse/Bind) or `function` (FunctionCall).
    pub protocol: &'static str,
    /// The prepared statement's name (extended protocol, named statements).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<&'a str>,
    /// The SQL text (up to 64 KiB); absent when it is not known (see `text_status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Absent: `text` is the text of the statement the server ran (extended protocol:
    /// as the server accepted it). `over-budget`: cut or dropped by the session's budget
    /// for held texts; `unknown`: the proxy does not know it (prepared by SQL `PREPARE`,
    /// past the statement cap); `uncertain`: a SQL `PREPARE`/`DEALLOCATE` ran since the
    /// statement was parsed, and may have replaced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_status: Option<&'static str>,
    /// Absent: sent to the server (Query, FunctionCall) or run (a Bind the server
    /// accepted). `error`: the server refused this Bind; `skipped`: the server skipped it
    /// after an earlier error; `unknown`: the proxy could not tell; `prepared`: not run,
    /// the text of a statement the server accepted under this name, before anything could
    /// run it by name (SQL `EXECUTE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// FunctionCall: the function's OID (never its argument values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_oid: Option<u32>,
    /// FunctionCall: the number of arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<u16>,
    pub identity: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci: Option<&'a RawValue>,
}

/// A CancelRequest arrived.
#[derive(Debug, Serialize)]
pub struct CancelEvent<'a> {
    pub ts: String,
    pub kind: &'static str,
    /// The route of the session the key belongs to; the listener's route when the key
    /// matched no session.
    pub route: &'a str,
    /// The route whose listener received it, when that is not `route` (then refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener_route: Option<&'a str>,
    pub client_addr: SocketAddr,
    /// The session it cancelled, when the key matched one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
    pub forwarded: bool,
    /// Why it was not forwarded, when its key matched a session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}
