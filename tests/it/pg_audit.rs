//! The `pg.statement` audit of the extended protocol follows what the server accepted,
//! proven with hand-built wire messages against the real PostgreSQL server: a Parse the
//! server refuses cannot forge the text of the statement a later Bind runs, names longer
//! than PostgreSQL keeps are named as the server ran them, and a FunctionCall is audited
//! without its argument values.

use std::time::Duration;

use portcullis::postgres::proto::{message, parse_fields};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pg::{assert_no_secrets, startup, tls_to, PgWorld};

type Conn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn cstr(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend(0u16.to_be_bytes());
    message(b'P', &b)
}

fn bind(stmt: &str) -> Vec<u8> {
    let mut b = cstr("");
    b.extend(cstr(stmt));
    b.extend([0, 0, 0, 0, 0, 0]);
    message(b'B', &b)
}

fn execute() -> Vec<u8> {
    message(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    message(b'S', b"")
}

/// Reads server messages up to and including ReadyForQuery.
async fn until_ready(t: &mut Conn) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut hdr))
            .await
            .unwrap_or_else(|_| panic!("no answer; so far {out:?}"))
            .unwrap_or_else(|e| panic!("read: {e}; so far {out:?}"));
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        t.read_exact(&mut body).await.unwrap_or_else(|e| panic!("{e}"));
        out.push((hdr[0], body));
        if hdr[0] == b'Z' {
            return out;
        }
    }
}

fn kinds(m: &[(u8, Vec<u8>)]) -> String {
    m.iter().map(|(k, _)| *k as char).collect()
}

fn sqlstate(m: &[(u8, Vec<u8>)]) -> String {
    m.iter()
        .find(|(k, _)| *k == b'E')
        .map(|(_, b)| parse_fields(b).get(&b'C').cloned().unwrap_or_default())
        .unwrap_or_default()
}

/// The first column of the first DataRow, as text.
fn first_value(m: &[(u8, Vec<u8>)]) -> String {
    let (_, b) = m.iter().find(|(k, _)| *k == b'D').unwrap_or_else(|| panic!("no row: {m:?}"));
    let len = u32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
    String::from_utf8_lossy(&b[6..6 + len]).into_owned()
}

async fn send(t: &mut Conn, parts: &[Vec<u8>]) {
    t.write_all(&parts.concat()).await.unwrap_or_else(|e| panic!("{e}"));
    t.flush().await.unwrap_or_else(|e| panic!("{e}"));
}

/// A session through the proxy, logged in, at its first ReadyForQuery.
async fn session(w: &PgWorld, token: &str) -> Conn {
    let mut t = tls_to(w).await;
    t.write_all(&startup("app", "appdb")).await.unwrap_or_else(|e| panic!("{e}"));
    let mut r = [0u8; 9];
    t.read_exact(&mut r).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r, [b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
    send(&mut t, &[message(b'p', &cstr(token))]).await;
    let m = until_ready(&mut t).await;
    assert!(!kinds(&m).contains('E'), "{m:?}");
    t
}

/// The session's `pg.statement` events, in order, once `n` of them are written.
async fn statements_of(w: &PgWorld, marker: &str, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let all = w.events_of("pg.statement").await;
        let sid = all
            .iter()
            .find(|e| e["text"].as_str().is_some_and(|t| t.contains(marker)))
            .map(|e| e["session_id"].clone());
        if let Some(sid) = sid {
            let mine: Vec<Value> = all.into_iter().filter(|e| e["session_id"] == sid).collect();
            if mine.len() >= n {
                return mine;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {n} statement events for {marker}");
}

#[tokio::test]
async fn a_parse_the_server_refused_cannot_forge_the_text_of_what_a_bind_runs() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let mut t = session(&w, &token).await;
    let victim = format!("victim_{}", std::process::id());
    let q = format!("create table {victim}(id int); insert into {victim} values (1), (2)");
    send(&mut t, &[message(b'Q', &cstr(&q))]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));

    // s1 is the DELETE, accepted.
    let delete = format!("DELETE FROM {victim}");
    send(&mut t, &[parse("s1", &delete), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "1Z");
    // A second Parse of s1 is refused (42P05): s1 stays the DELETE. In the same batch,
    // the Bind is skipped by the server.
    send(&mut t, &[parse("s1", "SELECT 1"), bind("s1"), execute(), sync()]).await;
    let m = until_ready(&mut t).await;
    assert_eq!((kinds(&m).as_str(), sqlstate(&m).as_str()), ("EZ", "42P05"));
    send(&mut t, &[parse("s1", "SELECT 1"), sync()]).await;
    assert_eq!(sqlstate(&until_ready(&mut t).await), "42P05");
    // Bind s1 runs the DELETE.
    send(&mut t, &[bind("s1"), execute(), sync()]).await;
    let m = until_ready(&mut t).await;
    assert_eq!(kinds(&m), "2CZ", "{m:?}");
    assert!(String::from_utf8_lossy(&m[1].1).starts_with("DELETE 2"), "{m:?}");

    // Pipelined, after a DEALLOCATE through a simple query: a new s1 is accepted and run
    // in one batch (Parse, Bind, Execute, Sync before any answer).
    send(&mut t, &[message(b'Q', &cstr("DEALLOCATE s1"))]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let count = format!("SELECT count(*) FROM {victim}");
    send(&mut t, &[parse("s1", &count), bind("s1"), execute(), sync()]).await;
    let m = until_ready(&mut t).await;
    assert_eq!(kinds(&m), "12DCZ", "{m:?}");
    assert_eq!(first_value(&m), "0", "the DELETE ran");

    let events = statements_of(&w, &victim, 5).await;
    let binds: Vec<&Value> = events.iter().filter(|e| e["protocol"] == "extended").collect();
    assert_eq!(binds.len(), 3, "{events:#?}");
    // The Bind the server skipped after the refused Parse: audited, as skipped.
    assert_eq!(binds[0]["statement"], "s1");
    assert_eq!(binds[0]["outcome"], "skipped", "{:#}", binds[0]);
    assert_eq!(binds[0]["text"], delete.as_str());
    // The Bind that ran the DELETE says so.
    assert_eq!(binds[1]["statement"], "s1");
    assert_eq!(binds[1]["text"], delete.as_str(), "{:#}", binds[1]);
    assert!(binds[1].get("outcome").is_none(), "{:#}", binds[1]);
    assert_eq!(binds[2]["text"], count.as_str(), "{:#}", binds[2]);
    assert!(events.iter().all(|e| e["text"] != "SELECT 1"), "{events:#?}");
    assert_no_secrets(&w, &[&token]);
}

#[tokio::test]
async fn long_statement_names_and_function_calls_are_audited_as_the_server_ran_them() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let mut t = session(&w, &token).await;

    // PostgreSQL keeps 63 bytes of a prepared statement's name: a 300-byte name and
    // another with the same first 63 bytes name the same statement.
    let long = format!("{}{}", "n".repeat(63), "a".repeat(237));
    let alias = format!("{}{}", "n".repeat(63), "z".repeat(300));
    let sql = "SELECT 'long-name-marker'::text";
    send(&mut t, &[parse(&long, sql), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "1Z");
    send(&mut t, &[bind(&alias), execute(), sync()]).await;
    let m = until_ready(&mut t).await;
    assert_eq!(kinds(&m), "2DCZ", "{m:?}");
    assert_eq!(first_value(&m), "long-name-marker", "the server ran the long-named one");

    // FunctionCall: set_config('portcullis.test', <secret>, false).
    send(&mut t, &[message(b'Q', &cstr("SELECT 'set_config'::regproc::oid"))]).await;
    let oid: u32 = first_value(&until_ready(&mut t).await).parse().unwrap_or(0);
    assert!(oid > 0);
    let secret = "fn-arg-value-7c1e9";
    let mut f = oid.to_be_bytes().to_vec();
    f.extend(1u16.to_be_bytes());
    f.extend(0u16.to_be_bytes());
    f.extend(3u16.to_be_bytes());
    for a in ["portcullis.test", secret, "false"] {
        f.extend((a.len() as u32).to_be_bytes());
        f.extend(a.as_bytes());
    }
    f.extend(0u16.to_be_bytes());
    send(&mut t, &[message(b'F', &f)]).await;
    let m = until_ready(&mut t).await;
    assert_eq!(kinds(&m), "VZ", "{m:?}");

    let events = statements_of(&w, "long-name-marker", 3).await;
    let b = events
        .iter()
        .find(|e| e["protocol"] == "extended")
        .unwrap_or_else(|| panic!("no Bind event: {events:#?}"));
    assert_eq!(b["statement"], "n".repeat(63), "{b:#}");
    assert_eq!(b["text"], sql, "{b:#}");
    let fc = events
        .iter()
        .find(|e| e["protocol"] == "function")
        .unwrap_or_else(|| panic!("no FunctionCall event: {events:#?}"));
    assert_eq!(fc["function_oid"], oid, "{fc:#}");
    assert_eq!(fc["arguments"], 3, "{fc:#}");
    assert!(fc.get("text").is_none());
    assert_no_secrets(&w, &[&token, secret]);
}

/// A password written into SQL text is masked in the audit log, in a simple query and in
/// a prepared statement, whether or not the server lets the statement run; so is one in
/// a statement a `DO` block builds, and when the proxy cannot tell where a secret ends
/// (a `format()` argument), it masks everything after the keyword.
#[tokio::test]
async fn passwords_in_sql_text_never_reach_the_audit_log() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let mut t = session(&w, &token).await;
    let (simple, prepared) = ("pw-simple-4f1d9a", "pw-prepared-8b2c7e");
    let (executed, formatted) = ("pw-do-execute-3c9e1b", "pw-do-format-7a2d5f");
    let q = format!("CREATE ROLE audit_marker_role PASSWORD '{simple}'");
    send(&mut t, &[message(b'Q', &cstr(&q))]).await;
    let _ = until_ready(&mut t).await; // refused or not: the client sent it
                                       // The forms a security probe set passwords with on PostgreSQL 15: EXECUTE of a
                                       // literal holding a literal, and format() with %L.
    let do_execute = format!(
        "DO $$ BEGIN EXECUTE 'ALTER ROLE audit_marker_role PASSWORD ''{executed}'''; END $$"
    );
    let do_format = format!(
        "DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', \
         'audit_marker_role', '{formatted}'); END $$"
    );
    for q in [&do_execute, &do_format] {
        send(&mut t, &[message(b'Q', &cstr(q))]).await;
        let _ = until_ready(&mut t).await;
    }
    // A conninfo string, as dblink_connect or postgres_fdw take it (a plain literal here).
    let sql = format!("SELECT 'audit_marker_role', 'host=x password={prepared}'::text");
    send(&mut t, &[parse("", &sql), bind(""), execute(), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "12DCZ");
    let events = statements_of(&w, "audit_marker_role", 4).await;
    let texts: Vec<&str> = events.iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(texts.contains(&"CREATE ROLE audit_marker_role PASSWORD ***"), "{events:#?}");
    let executed_text = "DO $$ BEGIN EXECUTE 'ALTER ROLE audit_marker_role PASSWORD ***'; END $$";
    assert!(texts.contains(&executed_text), "{events:#?}");
    let formatted_text =
        "DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN PASSWORD *** (masked to the end)";
    assert!(texts.contains(&formatted_text), "{events:#?}");
    assert!(texts.iter().any(|t| t.ends_with("'host=x password=***'::text")), "{events:#?}");
    assert_no_secrets(&w, &[&token, simple, prepared, executed, formatted]);
}

/// How a client leaves right after sending a statement.
#[derive(Debug, Clone, Copy)]
enum Leaving {
    /// Terminate in the same write as the statement, then the socket closed.
    Terminate,
    /// The socket closed without a word (no TLS close_notify).
    Close,
    /// TLS close_notify and a TCP half-close; the socket stays open.
    HalfClose,
}

/// Attack 1 of round 10: a statement pipelined with the client's goodbye runs on the
/// server (and commits), while the session ended before the server's answer came back. It
/// must still have exactly one `pg.statement` event, with the server's outcome: the
/// proxy reads the server's answers after the client is gone. Extended protocol (Parse,
/// Bind, Execute, Sync: the Bind is audited at the server's BindComplete) and simple
/// Query, each followed by Terminate in the same write, by an abrupt close, or by a
/// half-close.
#[tokio::test]
async fn a_statement_sent_with_the_goodbye_runs_and_is_audited_exactly_once() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let table = format!("bye_r10_{}", std::process::id());
    let mut t = session(&w, &token).await;
    send(&mut t, &[message(b'Q', &cstr(&format!("create table {table}(id int)")))]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    drop(t);
    let leavings = [Leaving::Terminate, Leaving::Close, Leaving::HalfClose];
    for (i, (leaving, extended)) in
        leavings.iter().flat_map(|l| [(*l, true), (*l, false)]).enumerate()
    {
        let case = format!("{leaving:?}, extended: {extended}");
        let mut t = session(&w, &token).await;
        // The session's id, from a first statement.
        let marker = format!("bye-r10-{i}-{}", std::process::id());
        send(&mut t, &[message(b'Q', &cstr(&format!("select '{marker}'")))]).await;
        assert!(!kinds(&until_ready(&mut t).await).contains('E'));
        let sid = statements_of(&w, &marker, 1).await[0]["session_id"].clone();

        let insert = format!("insert into {table} values ({i})");
        let mut out = if extended {
            vec![parse("", &insert), bind(""), execute(), sync()]
        } else {
            vec![message(b'Q', &cstr(&insert))]
        };
        if let Leaving::Terminate = leaving {
            out.push(message(b'X', b""));
        }
        send(&mut t, &out).await;
        let kept = match leaving {
            Leaving::Terminate | Leaving::Close => {
                drop(t);
                None
            }
            Leaving::HalfClose => {
                t.shutdown().await.unwrap_or_else(|e| panic!("{case}: {e}"));
                Some(t)
            }
        };
        let close = w.wait_event(|e| e["session_id"] == sid && e["event"] == "close").await;
        assert!(!close.is_null(), "{case}: no close event");
        drop(kept);
        let rows =
            w.pg.admin_sql_in("appdb", &format!("select count(*) from {table} where id = {i}"))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(rows, "1", "{case}: the server ran the insert");
        let events: Vec<Value> = w
            .events_of("pg.statement")
            .await
            .into_iter()
            .filter(|e| e["session_id"] == sid && e["text"] == insert.as_str())
            .collect();
        assert_eq!(events.len(), 1, "{case}: {events:#?}");
        let protocol = if extended { "extended" } else { "simple" };
        assert_eq!(events[0]["protocol"], protocol, "{case}");
        assert!(events[0].get("outcome").is_none(), "{case}: it ran: {:#}", events[0]);
        assert!(events[0].get("text_status").is_none(), "{case}: {:#}", events[0]);
        assert_eq!(close["statements"], 2, "{case}: {close:#}");
        assert_eq!(close["ended_by"], "client", "{case}: {close:#}");
        assert!(close.get("cancel_sent").is_none(), "{case}: nothing left running: {close:#}");
    }
    assert_no_secrets(&w, &[&token]);
}

/// Reads server messages up to and including the first of type `last`.
async fn until_kind(t: &mut Conn, last: u8) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut hdr))
            .await
            .unwrap_or_else(|_| panic!("no {}; so far {out:?}", last as char))
            .unwrap_or_else(|e| panic!("read: {e}; so far {out:?}"));
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        t.read_exact(&mut body).await.unwrap_or_else(|e| panic!("{e}"));
        out.push((hdr[0], body));
        if hdr[0] == last {
            return out;
        }
    }
}

fn copy_data(row: &str) -> Vec<u8> {
    message(b'd', row.as_bytes())
}

fn query(sql: &str) -> Vec<u8> {
    message(b'Q', &cstr(sql))
}

/// The one event whose text is `text`: it ran, and its text is exact.
fn assert_ran_exactly(events: &[Value], text: &str) {
    let mine: Vec<&Value> = events.iter().filter(|e| e["text"] == text).collect();
    assert_eq!(mine.len(), 1, "{text}: {events:#?}");
    let e = mine[0];
    assert!(e.get("outcome").is_none(), "it ran: {e:#}");
    assert!(e.get("text_status").is_none() && e.get("truncated").is_none(), "{e:#}");
}

/// Round 12b: PostgreSQL ends a COPY FROM STDIN at a bad row by itself (ErrorResponse,
/// then, in the extended protocol, it skips to the next Sync), whether or not the client
/// sends CopyDone. The audit follows the server: after the Sync, statements are audited
/// as run, with their whole text, also where a COPY ignores the Syncs it reads (a row that
/// fails) or answers them (a COPY into a view fails before reading any).
#[tokio::test]
async fn a_copy_the_server_ends_with_an_error_does_not_blind_the_audit() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    let setup = format!("create temp table ct(a int); create temp view cv as select 1 as a; select 'copy-setup-{pid}'");
    send(&mut t, &[query(&setup)]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));

    // Extended, no CopyDone ever: a bad row, then Sync, then a Query and a Bind.
    send(&mut t, &[parse("", "copy ct from stdin"), bind(""), execute(), sync()]).await;
    assert_eq!(kinds(&until_kind(&mut t, b'G').await), "12G");
    send(&mut t, &[copy_data("notanint\n")]).await;
    let m = until_kind(&mut t, b'E').await;
    assert_eq!(sqlstate(&m), "22P02", "{m:?}");
    send(&mut t, &[sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "Z");
    let evaded = format!("select 'copy-evaded-{pid}' as a -- \u{e9}\n, 'after-non-ascii'");
    send(&mut t, &[query(&evaded)]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "TDCZ");
    let extended = format!("select 'copy-extended-{pid}'");
    send(&mut t, &[parse("s1", &extended), bind("s1"), execute(), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "12DCZ");

    // The Sync and a Query sent with the bad row, before the error came back: the
    // server reads the Sync after the row it failed at, and answers it.
    send(&mut t, &[parse("", "copy ct from stdin"), bind(""), execute(), sync()]).await;
    assert_eq!(kinds(&until_kind(&mut t, b'G').await), "12G");
    let pipelined = format!("select 'copy-pipelined-{pid}'");
    send(&mut t, &[copy_data("1\n"), copy_data("x\n"), sync(), query(&pipelined)]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "EZ");
    assert_eq!(kinds(&until_ready(&mut t).await), "TDCZ");

    // As libpq does (Execute, Sync; the rows, CopyDone, Sync in one write): the COPY
    // reads the first Sync and fails at a row, one ReadyForQuery.
    send(&mut t, &[parse("", "copy ct from stdin"), bind(""), execute(), sync()]).await;
    assert_eq!(kinds(&until_kind(&mut t, b'G').await), "12G");
    send(&mut t, &[copy_data("1\n"), copy_data("x\n"), message(b'c', b""), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "EZ");
    let after_row = format!("select 'copy-after-row-{pid}' -- \u{e9}");
    send(&mut t, &[query(&after_row)]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "TDCZ");
    // Into a view: it fails before reading anything, so that first Sync is answered.
    send(&mut t, &[parse("", "copy cv from stdin"), bind(""), execute(), sync()]).await;
    let m = until_ready(&mut t).await;
    assert_eq!((kinds(&m).as_str(), sqlstate(&m).as_str()), ("12GEZ", "42809"), "{m:?}");
    send(&mut t, &[copy_data("1\n"), message(b'c', b""), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "Z");
    let after_view = format!("select 'copy-after-view-{pid}' -- \u{e9}");
    send(&mut t, &[query(&after_view)]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "TDCZ");
    let last = format!("select 'copy-last-{pid}'");
    send(&mut t, &[parse("s2", &last), bind("s2"), execute(), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "12DCZ");

    let events = statements_of(&w, &format!("copy-setup-{pid}"), 11).await;
    assert_eq!(events.len(), 11, "{events:#?}");
    for text in [&evaded, &extended, &after_row, &after_view, &last] {
        assert_ran_exactly(&events, text);
    }
    let e = events.iter().find(|e| e["text"] == pipelined.as_str());
    let e = e.unwrap_or_else(|| panic!("{events:#?}"));
    assert!(e.get("outcome").is_none(), "it ran: {e:#}");
    assert_no_secrets(&w, &[&token]);
}

/// The simple protocol: the server answers a COPY's bad row with ErrorResponse and
/// ReadyForQuery; the client never sends CopyDone. Later texts are exact, non-ASCII and
/// all.
#[tokio::test]
async fn a_simple_copy_the_server_ends_with_an_error_leaves_texts_exact() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    send(&mut t, &[query("create temp table ct(a int)")]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let copy = format!("copy ct from stdin -- simple-copy-{pid}");
    send(&mut t, &[query(&copy)]).await;
    assert_eq!(kinds(&until_kind(&mut t, b'G').await), "G");
    send(&mut t, &[copy_data("notanint\n")]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "EZ");
    let hidden = format!("select 1 as a -- \u{e9}\n, 'hidden-simple-{pid}' as b");
    send(&mut t, &[query(&hidden)]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "TDCZ");
    let extended = format!("select 'simple-copy-extended-{pid}'");
    send(&mut t, &[parse("s1", &extended), bind("s1"), execute(), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "12DCZ");
    // The CREATE, the COPY, and the two after it.
    let events = statements_of(&w, &format!("simple-copy-{pid}"), 4).await;
    assert_eq!(events.len(), 4, "{events:#?}");
    assert_ran_exactly(&events, &hidden);
    assert_ran_exactly(&events, &extended);
}

/// After an extended COPY that failed, a message sent without a Sync the server
/// certainly honoured (the only Sync was sent before a row, which the COPY may have read
/// or not): the server skips it or runs it, and nothing tells which. The proxy ends the
/// session rather than guess, and does not relay it.
#[tokio::test]
async fn after_a_failed_copy_a_message_of_unknown_fate_ends_the_session() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    let marker = format!("select 'copy-doubt-{pid}'; create temp table ct(a int)");
    send(&mut t, &[query(&marker)]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let sid = statements_of(&w, &format!("copy-doubt-{pid}"), 1).await[0]["session_id"].clone();
    send(&mut t, &[parse("", "copy ct from stdin"), bind(""), execute(), sync()]).await;
    assert_eq!(kinds(&until_kind(&mut t, b'G').await), "12G");
    send(&mut t, &[copy_data("notanint\n")]).await;
    assert_eq!(kinds(&until_kind(&mut t, b'E').await), "E");
    let maybe = format!("select 'copy-maybe-{pid}'");
    send(&mut t, &[query(&maybe)]).await;
    let m = until_kind(&mut t, b'E').await;
    assert_eq!(sqlstate(&m), "08P01", "{m:?}");
    let close = w.wait_event(|e| e["session_id"] == sid && e["event"] == "close").await;
    assert_eq!(close["reason"], "protocol-violation", "{close:#}");
    let events = w.events_of("pg.statement").await;
    assert!(events.iter().all(|e| e["text"] != maybe.as_str()), "{events:#?}");
}

/// Reads server messages up to and including the first whose type is in `last`.
async fn until_any(t: &mut Conn, last: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut hdr))
            .await
            .unwrap_or_else(|_| panic!("none of {last:?}; so far {out:?}"))
            .unwrap_or_else(|e| panic!("read: {e}; so far {out:?}"));
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        t.read_exact(&mut body).await.unwrap_or_else(|e| panic!("{e}"));
        out.push((hdr[0], body));
        if last.contains(&hdr[0]) {
            return out;
        }
    }
}

/// The session was ended by portcullis as a protocol violation: its FATAL is the last
/// message, and the `close` event says so.
async fn assert_ended_by_portcullis(w: &PgWorld, m: &[(u8, Vec<u8>)], sid: &Value) {
    let (kind, body) = m.last().unwrap_or_else(|| panic!("no message"));
    let f = parse_fields(body);
    let said = format!("{} {:?} {:?}", *kind as char, f.get(&b'C'), f.get(&b'M'));
    assert_eq!(*kind, b'E', "{said}");
    assert_eq!(f.get(&b'C').map(String::as_str), Some("08P01"), "{said}");
    assert!(f.get(&b'M').is_some_and(|m| m.starts_with("portcullis: terminating")), "{said}");
    let close = w.wait_event(|e| e["session_id"] == *sid && e["event"] == "close").await;
    assert_eq!(close["reason"], "protocol-violation", "{close:#}");
}

/// Round 13 (attack): PostgreSQL fails a Flush message that carries a body ("invalid
/// message format") and then skips every message up to the next Sync. Nothing answers a
/// Flush, so the audit took the statements sent after it as run, lost track of the
/// server's answers at the Sync, and from then on logged every Bind without its text and
/// every Query only up to its first non-ASCII byte: `/* é */ DELETE …` was logged as
/// `/* `. The Flush is refused: the session ends before it reaches the server.
#[tokio::test]
async fn a_flush_with_a_body_cannot_blind_the_audit() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    let marker = format!("select 'flush-body-{pid}'");
    send(&mut t, &[query(&marker)]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let sid = statements_of(&w, &marker, 1).await[0]["session_id"].clone();
    // A bare Flush is relayed as ever.
    let plain = format!("select 'flush-plain-{pid}'");
    send(&mut t, &[parse("s1", &plain), message(b'H', b""), bind("s1"), execute(), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "12DCZ");

    send(&mut t, &[message(b'H', b"x")]).await;
    let m = until_any(&mut t, b"EZ").await;
    assert_ended_by_portcullis(&w, &m, &sid).await;
    let events = w.events_of("pg.statement").await;
    let mine: Vec<&Value> = events.iter().filter(|e| e["session_id"] == sid).collect();
    assert_eq!(mine.len(), 2, "{mine:#?}");
    assert_ran_exactly(&events, &plain);
}

/// Round 13 (attack): a simple Query running two COPY FROM STDIN, the second one's rows
/// sent before the first one's CommandComplete: the second COPY reads them. The audit
/// took them as ignored, lost track of the server's answers at the second
/// CommandComplete, and logged the rest of the session without texts. It follows them.
#[tokio::test]
async fn a_query_s_second_copy_does_not_blind_the_audit() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    let marker = format!(
        "select 'two-copies-{pid}'; create temp table ca(a int); create temp table cb(a int)"
    );
    send(&mut t, &[query(&marker)]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let sid = statements_of(&w, &format!("two-copies-{pid}"), 1).await[0]["session_id"].clone();
    send(&mut t, &[query("copy ca from stdin; copy cb from stdin")]).await;
    assert_eq!(kinds(&until_kind(&mut t, b'G').await), "G");
    let c = message(b'c', b"");
    send(&mut t, &[copy_data("1\n"), c.clone(), copy_data("2\n"), c]).await;
    let after = format!("select 'two-copies-after-{pid}'");
    send(&mut t, &[parse("s1", &after), bind("s1"), execute(), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "CGCZ");
    assert_eq!(kinds(&until_ready(&mut t).await), "12DCZ");
    let simple = format!("select 'two-copies-simple-{pid}' -- \u{e9}\n, 2");
    send(&mut t, &[query(&simple)]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "TDCZ");
    let events = statements_of(&w, &format!("two-copies-{pid}"), 4).await;
    assert_eq!(events.len(), 4, "{events:#?}");
    assert_ran_exactly(&events, &after);
    assert_ran_exactly(&events, &simple);
    let close = w.w.events().into_iter().find(|e| e["session_id"] == sid && e["event"] == "close");
    assert!(close.is_none(), "the session goes on: {close:#?}");
}

/// Round 13 (attack): a statement parsed under a name, never bound, and run by SQL
/// `EXECUTE` (here also `EXPLAIN ANALYZE EXECUTE`): the audit said `EXECUTE innocent` and
/// nothing else; the DELETE's text was nowhere. Its text is now written, `outcome:
/// "prepared"`, before the first event that may run it.
#[tokio::test]
async fn a_statement_run_by_sql_execute_has_its_text_in_the_audit() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    let setup = format!(
        "select 'sql-execute-{pid}'; create temp table ev(a int); insert into ev values (1), (2)"
    );
    send(&mut t, &[query(&setup)]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let hidden = format!("delete from ev /* hidden-{pid} */");
    send(&mut t, &[parse("innocent", &hidden), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "1Z");
    send(&mut t, &[query("EXECUTE innocent")]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "CZ");
    send(&mut t, &[query("explain analyze execute innocent")]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let events = statements_of(&w, &format!("sql-execute-{pid}"), 4).await;
    let texts: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["text"].as_str().unwrap_or(""), e["outcome"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        texts[1..],
        [
            (hidden.as_str(), "prepared"),
            ("EXECUTE innocent", ""),
            ("explain analyze execute innocent", "")
        ],
        "{events:#?}"
    );
    assert_eq!(events[1]["statement"], "innocent", "{:#}", events[1]);
}

/// Round 13 (attack): a Query sent after Terminate in the same write was relayed and
/// audited as sent, though the server never reads past Terminate: the audit showed a
/// statement nothing ran. Nothing after Terminate is relayed or audited.
#[tokio::test]
async fn nothing_after_terminate_is_audited_as_sent() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    let marker = format!("select 'before-goodbye-{pid}'");
    send(&mut t, &[query(&marker)]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let sid = statements_of(&w, &marker, 1).await[0]["session_id"].clone();
    let after = format!("select 'after-goodbye-{pid}'");
    send(&mut t, &[message(b'X', b""), query(&after), b"\xff\xff".to_vec()]).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut rest)).await;
    let close = w.wait_event(|e| e["session_id"] == sid && e["event"] == "close").await;
    assert_eq!(
        (close["reason"].as_str(), close["ended_by"].as_str()),
        (Some("closed"), Some("client")),
        "{close:#}"
    );
    assert_eq!(close["statements"], 1, "{close:#}");
    let events = w.events_of("pg.statement").await;
    assert!(events.iter().all(|e| e["text"] != after.as_str()), "{events:#?}");
}

/// Round 14: a statement pipelined behind another (in one write, or after a Bind or
/// Execute without a Sync) is sent while the session's encoding is uncertain (the first
/// may `SET client_encoding`). The audit cut such a text before its first non-ASCII byte,
/// so `/* é */ insert …` was logged as `/* ` and any client could hide any statement
/// that way. The text is kept whole, marked uncertain, its passwords masked as ever.
#[tokio::test]
async fn a_pipelined_statement_with_a_non_ascii_byte_is_audited_whole() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let mut t = session(&w, &token).await;
    let setup = format!("select 'pipelined-{pid}'; create temp table pv(a int)");
    send(&mut t, &[query(&setup)]).await;
    assert!(!kinds(&until_ready(&mut t).await).contains('E'));
    let hidden = format!("/* \u{e9} */ insert into pv values (1) /* hidden-{pid} */");
    let parsed = format!("/* \u{e9} */ insert into pv values (2) /* parsed-{pid} */");
    let secret = "/* \u{e9} */ alter role nobody password 'Hunter2'";
    send(
        &mut t,
        &[
            query("select 1"),
            query(&hidden),
            parse("", "select 2"),
            bind(""),
            execute(),
            parse("p", &parsed),
            bind("p"),
            execute(),
            sync(),
            query(secret),
        ],
    )
    .await;
    assert_eq!(kinds(&until_ready(&mut t).await), "TDCZ");
    assert_eq!(kinds(&until_ready(&mut t).await), "CZ");
    assert_eq!(kinds(&until_ready(&mut t).await), "12DC12CZ");
    assert!(kinds(&until_ready(&mut t).await).contains('E'), "no such role");
    let events = statements_of(&w, &format!("pipelined-{pid}"), 6).await;
    let with = |text: &str| events.iter().find(|e| e["text"] == text).cloned();
    for text in [&hidden, &parsed] {
        let e = with(text).unwrap_or_else(|| panic!("{text} not audited whole: {events:#?}"));
        assert_eq!(e["text_status"], "uncertain", "{e:#}");
        assert!(e.get("truncated").is_none(), "{e:#}");
    }
    // A password in such a text is masked as in any other; the statement is there.
    let masked = "/* \u{e9} */ alter role nobody password ***";
    let e = with(masked).unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(e["text_status"], "uncertain", "{e:#}");
    assert!(!w.w.events().iter().any(|e| e.to_string().contains("Hunter2")));
}

/// Attack (round 14): the audit keeps the first 64 KiB of a statement's text (and less
/// of a prepared statement's once the session's text budget is spent). The masker finds
/// a URI's password by the `@` that ends it, so a text cut between the `:` and the `@`
/// logged the start of the password as it stood. In a text that was cut, a URI's
/// `user:` part that runs to the cut is masked from its colon on.
#[tokio::test]
async fn a_uri_password_cut_off_with_the_text_is_still_masked() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let mut t = session(&w, &token).await;
    let secret = "CutPw-7e4d1b-the-rest-of-it";
    let head = "SELECT 'cut-uri-marker', length('";
    let uri = "'), 'postgresql://app:";
    // The cut (at 64 KiB) falls 8 bytes into the password.
    let pad = "x".repeat(portcullis::postgres::proto::MAX_AUDIT_TEXT - head.len() - uri.len() - 8);
    // Longer than the part of a Query the proxy reads (64 KiB and a little), so it is cut.
    let sql = format!("{head}{pad}{uri}{secret}@db/app', '{}'", "y".repeat(1024));
    send(&mut t, &[message(b'Q', &cstr(&sql))]).await;
    assert!(kinds(&until_ready(&mut t).await).ends_with("CZ"));
    let ev = statements_of(&w, "cut-uri-marker", 1).await.remove(0);
    assert_eq!(ev["truncated"], true, "{}", ev["text"].as_str().map_or(0, str::len));
    let text = ev["text"].as_str().unwrap_or_default();
    assert!(text.ends_with("'postgresql://app:***"), "{}", &text[text.len().saturating_sub(40)..]);
    assert_no_secrets(&w, &[&token, &secret[..8]]);
}
