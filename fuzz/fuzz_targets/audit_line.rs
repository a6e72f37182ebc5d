//! Any text in every audit field a client (or a token's claims) chooses: the method,
//! host, path, SNI, detail and upstream path of an HTTP event, the identity's subject,
//! email and groups, every CI field; written as the request path writes it
//! (`HttpEvent::write_json`, with the identity's `audit_fields`) and through the serde
//! formatter the other events use (`audit::to_string`).
//!
//! Properties: the event is exactly one line of valid JSON that parses back to the
//! same fields, the method, host, path, SNI, detail and upstream path each cut to 2 KiB
//! on a character boundary (then `"truncated":true`, and only then); uncut, it is the
//! same bytes as the event's `Serialize` derive; no raw control, bidi, invisible or
//! non-ASCII space character is in the line (each is a `\uXXXX` escape: docs/audit.md).
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis::audit::{to_string, HttpEvent, TlsInfo, MAX_FIELD_BYTES};
use portcullis::identity::{CiContext, Claims, Identity, IssuerId, PrincipalKind};
use portcullis::policy::RuleRef;
use serde_json::Value;

/// What may never be raw in a line: controls (C0, DEL, C1), bidi embeddings, overrides,
/// isolates and marks, zero-width and other invisible characters, line and paragraph
/// separators, non-ASCII spaces, the blank Braille pattern (README "The audit log").
fn hidden(c: char) -> bool {
    c.is_control()
        || (!c.is_ascii() && c.is_whitespace())
        || matches!(c,
            '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{00ad}' | '\u{034f}'
            | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}' | '\u{180b}'..='\u{180f}'
            | '\u{3164}' | '\u{fe00}'..='\u{fe0f}' | '\u{ffa0}' | '\u{fff0}'..='\u{fffb}'
            | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e0fff}'
            | '\u{2800}')
}

/// Pieces the fuzzer reaches by one byte: what JSON and terminals treat apart.
const PIECES: &[&str] = &[
    "\"",
    "\\",
    "\n",
    "\r",
    "\u{0}",
    "\u{1b}[2J",
    "\u{7f}",
    "\u{85}",
    "\u{9f}",
    "\u{202e}",
    "\u{2066}",
    "\u{2028}",
    "\u{2029}",
    "\u{200b}",
    "\u{feff}",
    "\u{a0}",
    "\u{3000}",
    "\u{e0041}",
    "\u{1f600}",
    "é",
    "\u{fe0f}",
    "</script>",
    "\\u0000",
    "\u{fffd}",
];

/// The text of one field: bytes up to the next 0xff, a byte 0xf8..=0xfe followed by an
/// index standing for a piece (and 0xf8 0x00 for 2 KiB of `é`, to reach the cut).
fn field(input: &mut &[u8]) -> String {
    let mut out = String::new();
    let mut plain = Vec::new();
    while let Some((&b, rest)) = input.split_first() {
        *input = rest;
        match b {
            0xff => break,
            0xf8..=0xfe => {
                out.push_str(&String::from_utf8_lossy(&plain));
                plain.clear();
                let Some((&i, rest)) = input.split_first() else { break };
                *input = rest;
                if b == 0xf8 && i == 0 {
                    out.push_str(&"é".repeat(MAX_FIELD_BYTES / 2));
                } else {
                    out.push_str(PIECES[usize::from(i) % PIECES.len()]);
                }
            }
            b => plain.push(b),
        }
    }
    out.push_str(&String::from_utf8_lossy(&plain));
    out
}

/// What an event keeps of `s`: all of it, or its longest prefix of at most 2 KiB that
/// ends on a character boundary.
fn kept(s: &str) -> &str {
    let mut end = s.len().min(MAX_FIELD_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn check_line(line: &[u8]) -> Value {
    let text = std::str::from_utf8(line).expect("UTF-8");
    assert!(!text.contains('\n') && !text.contains('\r'), "more than one line");
    if let Some(c) = text.chars().find(|&c| hidden(c)) {
        panic!("raw {c:?} in {text:?}");
    }
    serde_json::from_str(text).expect("one JSON value")
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut f = || field(&mut input);
    let (method, host, path, sni, detail, upstream_path) = (f(), f(), f(), f(), f(), f());
    let (subject, email, route) = (f(), f(), f());
    let groups: Vec<String> = f().split('\u{1}').map(str::to_owned).collect();
    let ci_values: Vec<String> = (0..CiContext::FIELDS.len()).map(|_| f()).collect();
    let claim = f();
    let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
    let ci = CiContext {
        provider: "github",
        workspace: opt(&ci_values[0]),
        workspace_id: opt(&ci_values[1]),
        repository: opt(&ci_values[2]),
        repository_id: opt(&ci_values[3]),
        branch: opt(&ci_values[4]),
        tag: opt(&ci_values[5]),
        git_ref: opt(&ci_values[6]),
        environment: opt(&ci_values[7]),
        commit: opt(&ci_values[8]),
        pipeline: opt(&ci_values[9]),
        run: opt(&ci_values[10]),
        step: opt(&ci_values[11]),
        actor: opt(&ci_values[12]),
    };
    let mut claims = serde_json::Map::new();
    claims.insert("custom".into(), Value::String(claim.clone()));
    let id = Identity {
        issuer: IssuerId(Arc::from("corp")),
        subject: subject.clone(),
        kind: PrincipalKind::Pipeline,
        email: opt(&email),
        email_verified: !email.is_empty() && email.len() % 2 == 0,
        groups: if groups == [""] { Vec::new() } else { groups.clone() },
        groups_known: true,
        expires_at: 2_000_000_000,
        issued_at: None,
        ci: Some(ci.clone()),
        claims: Claims::from(claims),
        audit: Default::default(),
    };
    let (identity, ci_raw) = id.audit_fields();
    let tls = TlsInfo { version: "TLSv1.3", sni: opt(&sni).map(Arc::from) };
    let rule = RuleRef {
        id: Arc::from(route.as_str()),
        file: Arc::from(std::path::Path::new("policies/p.toml")),
        line: 7,
    };
    let event = HttpEvent {
        ts: "2026-11-27T08:00:00.000Z".into(),
        request_id: "0123456789abcdef0123",
        kind: "http",
        client_addr: "192.0.2.7:41000",
        tls: Some(&tls),
        method: &method,
        host: &host,
        path: &path,
        route: Some(&route),
        decision: "deny",
        reason: "denied-by-rule",
        detail: Some(&detail),
        rule: Some(&rule),
        shadow: None,
        policy_revision: Some("sha256:00"),
        identity: Some(identity),
        ci: ci_raw,
        upstream: None,
        upstream_path: (!upstream_path.is_empty()).then_some(upstream_path.as_str()),
        status: 403,
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0.25,
    };
    let mut line = Vec::new();
    event.write_json(&mut line);
    let v = check_line(&line);

    // Each client-chosen field, cut where the docs say.
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let mut cut = false;
    for (name, value, got) in [
        ("method", &method, s(&v["method"])),
        ("host", &host, s(&v["host"])),
        ("path", &path, s(&v["path"])),
        ("detail", &detail, s(&v["detail"])),
        ("sni", &sni, s(&v["tls"]["sni"])),
        ("upstream_path", &upstream_path, s(&v["upstream_path"])),
    ] {
        if matches!(name, "sni" | "upstream_path") && value.is_empty() {
            assert_eq!(got, None, "{name}");
            continue;
        }
        assert_eq!(got.as_deref(), Some(kept(value)), "{name}");
        cut |= kept(value).len() < value.len();
    }
    assert_eq!(v.get("truncated"), cut.then_some(&Value::Bool(true)));
    assert_eq!(s(&v["route"]).as_deref(), Some(route.as_str()));
    assert_eq!(s(&v["rule"]["id"]).as_deref(), Some(route.as_str()));
    // The identity and CI fields, whole.
    assert_eq!(s(&v["identity"]["subject"]), Some(subject.clone()));
    assert_eq!(s(&v["identity"]["email"]), opt(&email));
    let logged: Vec<String> = v["identity"]["groups"]
        .as_array()
        .map(|g| g.iter().filter_map(s).collect())
        .unwrap_or_default();
    let n = id.groups.len().min(portcullis::audit::AUDIT_GROUPS_MAX);
    assert_eq!(logged, id.groups[..n]);
    for (name, value) in CiContext::FIELDS.iter().zip(&ci_values) {
        assert_eq!(s(&v["ci"][*name]), opt(value), "ci.{name}");
    }
    // Uncut, the same bytes as the derive writes.
    if !cut {
        let derived = to_string(&event).expect("serializes");
        assert_eq!(String::from_utf8_lossy(&line), derived);
    }

    // The serde formatter the other events (pg.session, pg.statement, reload) use.
    let mut other = BTreeMap::new();
    for (k, value) in [("database", &method), ("role", &host), ("application_name", &claim)] {
        other.insert(k, value.as_str());
    }
    let line = to_string(&other).expect("serializes");
    let v = check_line(line.as_bytes());
    for (k, value) in &other {
        assert_eq!(v[*k].as_str(), Some(*value), "{k}");
    }
});
