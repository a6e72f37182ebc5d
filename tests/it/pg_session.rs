//! Session guards against the real PostgreSQL server of `pg`: a session that leaves UTF8
//! is ended before the audit could misread it (and what it pipelined before that is
//! audited as uncertain, never mis-masked), a client that stops reading loses its session
//! at expiry and at shutdown like any other (with exactly one `close` event), and a
//! cancel key works only on its own route's listener.

use std::net::SocketAddr;
use std::time::Duration;

use portcullis::postgres::proto::{message, parse_fields};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pg::{assert_no_secrets, PgWorld};

pub(crate) type Conn = tokio_rustls::client::TlsStream<TcpStream>;

pub(crate) fn cstr(s: &[u8]) -> Vec<u8> {
    let mut b = s.to_vec();
    b.push(0);
    b
}

pub(crate) fn query(sql: &[u8]) -> Vec<u8> {
    message(b'Q', &cstr(sql))
}

fn parse(name: &[u8], sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql.as_bytes()));
    b.extend([0, 0]);
    message(b'P', &b)
}

fn bind(name: &[u8]) -> Vec<u8> {
    let mut b = cstr(b"");
    b.extend(cstr(name));
    b.extend([0, 0, 0, 0, 0, 0]);
    message(b'B', &b)
}

fn close(name: &[u8]) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    message(b'C', &b)
}

fn execute() -> Vec<u8> {
    message(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    message(b'S', b"")
}

/// TLS to the database listener at `addr`.
pub(crate) async fn tls_at(w: &PgWorld, addr: SocketAddr) -> Conn {
    let mut tcp = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
    let ssl =
        portcullis::postgres::proto::startup_packet(portcullis::postgres::proto::SSL_REQUEST, &[]);
    tcp.write_all(&ssl).await.unwrap_or_else(|e| panic!("{e}"));
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&s, b"S");
    let name =
        rustls::pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
    tokio_rustls::TlsConnector::from(w.tls().config())
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub(crate) async fn send(t: &mut Conn, parts: &[Vec<u8>]) {
    t.write_all(&parts.concat()).await.unwrap_or_else(|e| panic!("{e}"));
    t.flush().await.unwrap_or_else(|e| panic!("{e}"));
}

/// One server message; `None` at EOF.
pub(crate) async fn next(t: &mut Conn) -> Option<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(15), t.read_exact(&mut hdr))
        .await
        .unwrap_or_else(|_| panic!("no answer"))
        .ok()?;
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    t.read_exact(&mut body).await.ok()?;
    Some((hdr[0], body))
}

/// Messages up to and including ReadyForQuery (or up to EOF).
pub(crate) async fn until_ready(t: &mut Conn) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(m) = next(t).await {
        let ready = m.0 == b'Z';
        out.push(m);
        if ready {
            break;
        }
    }
    out
}

/// Reads until the proxy closes the session: the fields of the last error it sent (the
/// FATAL that ended it).
async fn last_error_before_close(t: &mut Conn) -> std::collections::BTreeMap<u8, String> {
    let mut all = Vec::new();
    while let Some(m) = next(t).await {
        all.push(m);
    }
    all.iter()
        .rev()
        .find(|(k, _)| *k == b'E')
        .map(|(_, b)| parse_fields(b))
        .unwrap_or_else(|| panic!("no error: {}", kinds(&all)))
}

pub(crate) fn kinds(m: &[(u8, Vec<u8>)]) -> String {
    m.iter().map(|(k, _)| *k as char).collect()
}

pub(crate) fn error_code(m: &[(u8, Vec<u8>)]) -> Option<String> {
    m.iter().find(|(k, _)| *k == b'E').and_then(|(_, b)| parse_fields(b).get(&b'C').cloned())
}

/// A logged-in session at its first ReadyForQuery, with `params` in its startup packet;
/// also its BackendKeyData.
async fn login(
    w: &PgWorld,
    addr: SocketAddr,
    token: &str,
    params: &[(&str, &str)],
) -> (Conn, Vec<u8>) {
    let mut p = vec![("user", "app"), ("database", "appdb")];
    p.extend_from_slice(params);
    login_on(tls_at(w, addr).await, token, &portcullis::postgres::proto::startup_message(&p)).await
}

/// [`login`] over `t`, a connection already encrypted, with `startup` as its startup
/// packet: the session at its first ReadyForQuery, and its BackendKeyData.
/// Creates `table_and_columns` (`t(v text)`) through a session of its own.
async fn create_table(w: &PgWorld, token: &str, table_and_columns: &str) {
    let (mut t, _) = login(w, w.addr, token, &[]).await;
    send(&mut t, &[query(format!("create table {table_and_columns}").as_bytes())]).await;
    assert_eq!(error_code(&until_ready(&mut t).await), None);
}

pub(crate) async fn login_on(mut t: Conn, token: &str, startup: &[u8]) -> (Conn, Vec<u8>) {
    send(&mut t, &[startup.to_vec()]).await;
    let (k, _) = next(&mut t).await.unwrap_or_else(|| panic!("closed"));
    assert_eq!(k, b'R');
    send(&mut t, &[message(b'p', &cstr(token.as_bytes()))]).await;
    let m = until_ready(&mut t).await;
    assert!(kinds(&m).ends_with('Z'), "{m:?}");
    let key = m.iter().find(|(k, _)| *k == b'K').map(|(_, b)| b.clone()).unwrap_or_default();
    (t, key)
}

async fn session_events(w: &PgWorld, sid: &str) -> Vec<Value> {
    w.w.events().into_iter().filter(|e| e["session_id"] == sid).collect()
}

/// The session id of the session whose statement text contains `marker`.
async fn sid_of(w: &PgWorld, marker: &str) -> String {
    let e = w
        .wait_event(|e| {
            e["kind"] == "pg.statement" && e["text"].as_str().is_some_and(|t| t.contains(marker))
        })
        .await;
    e["session_id"].as_str().unwrap_or_else(|| panic!("no statement with {marker}")).to_string()
}

/// Attack 2 of round 9: under SJIS, `\x81\x5c` is one character to the server, while a
/// UTF8 reader sees a byte and a backslash escape, so the masker would read the password
/// as outside the keyword's reach. Pipelined behind the SET, the query reaches the server
/// before the proxy can see the new encoding: it is audited as uncertain, its text cut
/// before the first non-ASCII byte; then the session ends, before anything else is
/// relayed.
#[tokio::test]
async fn a_session_that_leaves_utf8_is_ended_and_what_it_pipelined_is_never_misread() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (mut t, _) = login(&w, w.addr, &token, &[]).await;
    let attack: &[u8] =
        b"SELECT E'\x81\\' , '\"' ; ALTER ROLE victim PASSWORD 'sekret-r9' ; SELECT '\"' ;";
    send(&mut t, &[query(b"SET client_encoding TO 'SJIS' /* enc-marker */"), query(attack)]).await;
    let fatal = last_error_before_close(&mut t).await;
    assert_eq!(fatal.get(&b'S').map(String::as_str), Some("FATAL"));
    assert_eq!(fatal.get(&b'C').map(String::as_str), Some("0A000"));
    let msg = fatal.get(&b'M').cloned().unwrap_or_default();
    assert!(msg.contains("unsupported-encoding") && msg.contains("request id"), "{msg}");
    let sid = sid_of(&w, "enc-marker").await;
    let close = w.wait_event(|e| e["session_id"] == sid.as_str() && e["event"] == "close").await;
    assert_eq!(close["reason"], "unsupported-encoding", "{close}");
    assert!(close["detail"].as_str().is_some_and(|d| d.contains("SJIS")), "{close}");
    let statements: Vec<Value> = session_events(&w, &sid)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "pg.statement")
        .collect();
    assert_eq!(statements.len(), 2, "{statements:?}");
    assert_eq!(statements[1]["text"], "SELECT E'", "{statements:?}");
    assert_eq!(statements[1]["text_status"], "uncertain");
    assert_eq!(statements[1]["truncated"], true);
    assert_no_secrets(&w, &["sekret-r9"]);

    // Asked for in the startup packet: refused before the session.
    let got = refused_startup(&w, &[("client_encoding", "SJIS")]).await;
    assert_eq!(error_code(&got).as_deref(), Some("0A000"), "{}", kinds(&got));
    assert_eq!(kinds(&got), "E", "refused before the password prompt");
    let ev = w
        .wait_event(|e| {
            e["event"] == "refused"
                && e["reason"] == "unsupported-encoding"
                && e["detail"].as_str().is_some_and(|d| d.contains("SJIS"))
        })
        .await;
    assert_eq!(ev["decision"], "deny", "{ev}");
    // In another spelling: still refused (setting names are case-insensitive).
    let got = refused_startup(&w, &[("CLIENT_ENCODING", "BIG5")]).await;
    assert_eq!(error_code(&got).as_deref(), Some("0A000"), "{}", kinds(&got));
    // Through `options`: refused like any setting there (see
    // `startup_settings_that_change_the_role_or_guards_are_refused_and_audited`).
    // Naming none: the proxy asks for UTF8 upstream, which takes precedence over a role's
    // or database's setting; `utf-8` is UTF8.
    for params in [[("client_encoding", "UTF8")], [("client_encoding", "utf-8")]] {
        let (mut t, _) = login(&w, w.addr, &token, &params).await;
        send(&mut t, &[query(b"show client_encoding")]).await;
        let m = until_ready(&mut t).await;
        let row = m.iter().find(|(k, _)| *k == b'D').map(|(_, b)| b[6..].to_vec());
        assert_eq!(row.as_deref(), Some(&b"UTF8"[..]), "{params:?}: {m:?}");
    }
}

/// Attack 1 of round 9, in the shape that keeps the session: one pipeline switches to
/// SJIS and back, so PostgreSQL reports nothing (the value at ReadyForQuery is the one it
/// last reported). Inside it, SJIS 0xFA4A closes and replaces the statement the client
/// parsed as UTF-8 U+2160 (E2 85 A0). A later Bind of E2 85 A0 runs the DELETE: the proxy
/// must not log it as the harmless text.
#[tokio::test]
async fn a_statement_replaced_under_another_encoding_is_never_logged_as_the_old_text() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (mut t, _) = login(&w, w.addr, &token, &[]).await;
    let table = format!("names_r9_{}", std::process::id());
    let setup = format!("create table {table}(x int); insert into {table} values (1),(2),(3)");
    send(&mut t, &[query(setup.as_bytes())]).await;
    assert_eq!(error_code(&until_ready(&mut t).await), None);
    let utf8_name = "\u{2160}".as_bytes();
    let sjis_name = &b"\xfa\x4a"[..];
    send(&mut t, &[parse(utf8_name, "SELECT 'harmless-r9'"), sync()]).await;
    assert_eq!(kinds(&until_ready(&mut t).await), "1Z");
    send(
        &mut t,
        &[
            parse(b"", "SET client_encoding TO 'SJIS'"),
            bind(b""),
            execute(),
            close(sjis_name),
            parse(sjis_name, &format!("DELETE FROM {table}")),
            parse(b"", "SET client_encoding TO 'UTF8'"),
            bind(b""),
            execute(),
            sync(),
        ],
    )
    .await;
    let m = until_ready(&mut t).await;
    assert_eq!(error_code(&m), None, "{m:?}");
    assert!(!m.iter().any(|(k, b)| *k == b'S' && b.starts_with(b"client_encoding")), "no report");
    send(&mut t, &[bind(utf8_name), execute(), sync()]).await;
    let m = until_ready(&mut t).await;
    let tag =
        m.iter().find(|(k, _)| *k == b'C').map(|(_, b)| String::from_utf8_lossy(b).into_owned());
    assert_eq!(tag.as_deref(), Some("DELETE 3\0"), "the server ran the DELETE: {m:?}");
    let sid = sid_of(&w, &table).await;
    w.wait_event(|e| {
        e["session_id"] == sid.as_str()
            && e["kind"] == "pg.statement"
            && e["statement"] == "\u{2160}"
    })
    .await;
    let binds: Vec<Value> = session_events(&w, &sid)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "pg.statement" && e["statement"] == "\u{2160}")
        .collect();
    let last = binds.last().unwrap_or_else(|| panic!("no Bind event"));
    assert_eq!(last["text_status"], "uncertain", "{last}");
}

/// A client that stops reading in the middle of a large result keeps neither its session
/// nor its backend past the token's expiry: the relay's write to it races the control.
#[tokio::test]
async fn a_client_that_stops_reading_loses_its_session_at_expiry() {
    let Some(w) = PgWorld::start().await else { return };
    let exp = portcullis::util::unix_now() + 4;
    let token = w.w.token("bb", &[&format!("exp:={exp}")]);
    let (mut t, _) = login(&w, w.addr, &token, &[("application_name", "stuck-r9")]).await;
    send(
        &mut t,
        &[query(b"begin; select repeat('x', 100000) from generate_series(1, 3000) /* stuck-r9 */")],
    )
    .await;
    // Read nothing more. The close event comes at exp with the right reason.
    let sid = sid_of(&w, "stuck-r9").await;
    let mut close = Value::Null;
    for _ in 0..60 {
        close = session_events(&w, &sid)
            .await
            .into_iter()
            .find(|e| e["event"] == "close")
            .unwrap_or(Value::Null);
        if !close.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(close["reason"], "session-expired", "{close}");
    assert_eq!(close["ended_by"], "portcullis", "{close}");
    assert!(portcullis::util::unix_now() >= exp);
    // The backend is gone too (its transaction with it).
    let other = w.w.token("bb", &[]);
    let (c, conn) = w.connect(&other, "app").await.unwrap_or_else(|e| panic!("{e}"));
    let mut left = i64::MAX;
    for _ in 0..40 {
        let rows = c
            .query_one(
                "select count(*) from pg_stat_activity where application_name = 'stuck-r9'",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        left = rows.get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(left, 0, "the stuck session's backend outlived it");
    drop(t);
    conn.abort();
}

/// Shutdown: a client that does not read is still ended when the grace period is over,
/// and every session that opened gets exactly one `close` event, `shutting-down`.
#[tokio::test]
async fn shutdown_ends_a_client_that_stops_reading_with_one_close_event() {
    let Some(mut w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (mut t, _) = login(&w, w.addr, &token, &[]).await;
    send(
        &mut t,
        &[query(b"select repeat('x', 100000) from generate_series(1, 3000) /* down-r9 */")],
    )
    .await;
    let sid = sid_of(&w, "down-r9").await;
    let server = w.w.server.take().unwrap_or_else(|| panic!("server"));
    let down = tokio::spawn(server.shutdown());
    // Grace (5 s), then at most the drain's own bound.
    tokio::time::timeout(Duration::from_secs(30), down)
        .await
        .unwrap_or_else(|_| panic!("shutdown hung"))
        .unwrap_or_else(|e| panic!("{e}"));
    let closes: Vec<Value> = session_events(&w, &sid)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "pg.session" && e["event"] == "close")
        .collect();
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0]["reason"], "shutting-down", "{closes:?}");
    drop(t);
}

/// A cancel key works on its own route's listener only; the event names the cancelled
/// session's route either way.
#[tokio::test]
async fn a_cancel_key_is_refused_on_another_route_s_listener() {
    let Some(w) = PgWorld::with_toml("", |t| {
        let second = t.replacen("name = \"appdb\"", "name = \"second\"", 1);
        format!("{t}\n{second}")
    })
    .await
    else {
        return;
    };
    let token = w.w.token("bb", &[]);
    let (mut t, key) = login(&w, w.addr_of("second"), &token, &[]).await;
    assert_eq!(key.len(), 8);
    let cancel = |at: SocketAddr| {
        let key = key.clone();
        async move {
            let mut s = TcpStream::connect(at).await.unwrap_or_else(|e| panic!("{e}"));
            let mut b = 16u32.to_be_bytes().to_vec();
            b.extend(80_877_102u32.to_be_bytes());
            b.extend(&key);
            s.write_all(&b).await.unwrap_or_else(|e| panic!("{e}"));
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        }
    };
    // On the other route's listener: not forwarded, the query runs to its end.
    send(&mut t, &[query(b"select pg_sleep(1.5)")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel(w.addr_of("appdb")).await;
    let m = until_ready(&mut t).await;
    assert_eq!(error_code(&m), None, "cancelled through another route's listener: {m:?}");
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel").await;
    assert_eq!(ev["route"], "second", "{ev}");
    assert_eq!(ev["listener_route"], "appdb", "{ev}");
    assert_eq!(ev["forwarded"], false, "{ev}");
    // On its own route's listener: forwarded.
    send(&mut t, &[query(b"select pg_sleep(30) /* own-route-cancel */")]).await;
    w.until_running("own-route-cancel").await;
    cancel(w.addr_of("second")).await;
    let m = until_ready(&mut t).await;
    assert_eq!(error_code(&m).as_deref(), Some("57014"), "{m:?}");
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel" && e["forwarded"] == true).await;
    assert_eq!(ev["route"], "second", "{ev}");
    assert!(ev.get("listener_route").is_none(), "{ev}");
}

/// Ends the backends of an application name when dropped, so that a failing test does
/// not leave a loop running on the shared server.
struct Reap<'a>(&'a PgWorld, &'static str);

impl Drop for Reap<'_> {
    fn drop(&mut self) {
        let _ = self.0.pg.admin_sql(&format!(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = '{}'",
            self.1
        ));
    }
}

/// Waits until no backend of `application_name` is executing; its last state, if any.
async fn wait_idle(w: &PgWorld, application_name: &str) -> String {
    let q = format!(
        "select coalesce(string_agg(state, ','), '') from pg_stat_activity \
         where application_name = '{application_name}' and state = 'active'"
    );
    let mut state = String::new();
    for _ in 0..40 {
        state = w.pg.admin_sql(&q).unwrap_or_else(|e| panic!("{e}"));
        if state.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    state
}

/// A loop that commits a row every 200 ms, forever, doing no client I/O.
fn endless_loop(table: &str, marker: &str) -> Vec<u8> {
    query(
        format!(
            "do $$ begin loop insert into {table} values (clock_timestamp()); commit; \
             perform pg_sleep(0.2); end loop; end $$ /* {marker} */"
        )
        .as_bytes(),
    )
}

fn rows(w: &PgWorld, table: &str) -> u64 {
    w.pg.admin_sql_in("appdb", &format!("select count(*) from {table}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .parse()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Attack 2 of round 10: a statement still running when portcullis ends the session (at
/// the token's expiry here; revocation and shutdown take the same path) does not run on
/// without it: an executing backend does no client I/O and would never notice the closed
/// socket, so portcullis sends it a cancel request. Two such loops are pipelined: a
/// cancel stops one statement, and the second would start when the first is cancelled.
#[tokio::test]
async fn a_statement_running_when_portcullis_ends_the_session_is_cancelled() {
    let Some(w) = PgWorld::start().await else { return };
    let app = "inflight-r10";
    let _reap = Reap(&w, app);
    let table = format!("inflight_r10_{}", std::process::id());
    let (mut t, _) = login(&w, w.addr, &w.w.token("bb", &[]), &[]).await;
    send(&mut t, &[query(format!("create table {table}(at timestamptz)").as_bytes())]).await;
    assert_eq!(error_code(&until_ready(&mut t).await), None);
    drop(t);

    let exp = portcullis::util::unix_now() + 4;
    let token = w.w.token("bb", &[&format!("exp:={exp}")]);
    let (mut t, _) = login(&w, w.addr, &token, &[("application_name", app)]).await;
    send(&mut t, &[endless_loop(&table, app), endless_loop(&table, app)]).await;
    let fatal = last_error_before_close(&mut t).await;
    assert_eq!(fatal.get(&b'C').map(String::as_str), Some("57P01"), "{fatal:?}");
    assert!(portcullis::util::unix_now() >= exp);
    assert!(rows(&w, &table) > 0, "the loop ran");

    // The backend stops executing within a few seconds, and no row is written after.
    assert_eq!(wait_idle(&w, app).await, "", "the backend still executes the loop");
    let before = rows(&w, &table);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rows(&w, &table), before, "the loop goes on");

    let sid = sid_of(&w, app).await;
    let close = w.wait_event(|e| e["session_id"] == sid.as_str() && e["event"] == "close").await;
    assert_eq!(close["reason"], "session-expired", "{close}");
    assert_eq!(close["ended_by"], "portcullis", "{close}");
    assert_eq!(close["cancel_sent"], true, "{close}");
    assert!(close["detail"].as_str().is_some_and(|d| d.contains("cancel request")), "{close}");
    let statements: Vec<Value> = session_events(&w, &sid)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "pg.statement")
        .collect();
    assert_eq!(statements.len(), 2, "one event per Query relayed: {statements:#?}");
}

/// A statement that outlives its client (sent, then the socket closed) is cancelled
/// once it has run 2 s past the session's end: beyond the session, nothing (its token's
/// expiry, a revocation, a shutdown) could end it any more.
#[tokio::test]
async fn a_statement_that_outlives_its_client_is_cancelled() {
    let Some(w) = PgWorld::start().await else { return };
    let app = "orphan-r10";
    let _reap = Reap(&w, app);
    let table = format!("orphan_r10_{}", std::process::id());
    let token = w.w.token("bb", &[]);
    let (mut t, _) = login(&w, w.addr, &token, &[("application_name", app)]).await;
    send(&mut t, &[query(format!("create table {table}(at timestamptz)").as_bytes())]).await;
    assert_eq!(error_code(&until_ready(&mut t).await), None);
    send(&mut t, &[endless_loop(&table, app)]).await;
    let sid = sid_of(&w, app).await;
    // The loop has committed a row: it runs when the client goes.
    for _ in 0..100 {
        if rows(&w, &table) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(t);

    assert_eq!(wait_idle(&w, app).await, "", "the backend still executes the loop");
    let before = rows(&w, &table);
    assert!(before > 0, "the loop ran");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rows(&w, &table), before, "the loop goes on");
    let close = w.wait_event(|e| e["session_id"] == sid.as_str() && e["event"] == "close").await;
    assert_eq!(close["ended_by"], "client", "{close}");
    assert_eq!(close["reason"], "closed", "{close}");
    assert_eq!(close["cancel_sent"], true, "{close}");
}

/// A refused startup: the messages the proxy sent before closing (it must close).
pub(crate) async fn refused_startup(w: &PgWorld, params: &[(&str, &str)]) -> Vec<(u8, Vec<u8>)> {
    let mut t = tls_at(w, w.addr).await;
    let mut p = vec![("user", "app"), ("database", "appdb")];
    p.extend_from_slice(params);
    send(&mut t, &[portcullis::postgres::proto::startup_message(&p)]).await;
    let mut got = Vec::new();
    while let Some(m) = next(&mut t).await {
        got.push(m);
    }
    got
}

/// Finding 02 of round 11: `options=-c role=…` (or a bare `role=` key, or
/// `default_transaction_read_only=off`, `search_path=…`) in the startup packet would run
/// the session as another role, or without the DBA's guards, while every event said
/// `upstream_role: migrator`. Such a session is refused before the token is asked for,
/// naming the parameter and never its value; what is forwarded is in the `open` event.
#[tokio::test]
async fn startup_settings_that_change_the_role_or_guards_are_refused_and_audited() {
    let Some(w) = PgWorld::start().await else { return };
    // `migrator` (the role pipelines on main get) may become this role: the attack's
    // target, as in the finding (a nologin owner role the upstream role is a member of).
    let _ = w.pg.admin_sql("create role startup_owner nologin; grant startup_owner to migrator");
    let token = w.w.token("bb", &[]);
    let cases: &[(&str, &str)] = &[
        ("options", "-c role=startup_owner -c default_transaction_read_only=yes"),
        ("role", "startup_owner"),
        ("Role", "startup_owner"),
        ("session_authorization", "startup_owner"),
        ("default_transaction_read_only", "yes"),
        ("search_path", "startup_owner_schema"),
    ];
    for (name, value) in cases {
        let got = refused_startup(&w, &[(name, value)]).await;
        assert_eq!(kinds(&got), "E", "{name}: refused before the password prompt");
        let f = parse_fields(&got[0].1);
        assert_eq!(f.get(&b'S').map(String::as_str), Some("FATAL"), "{name}");
        assert_eq!(f.get(&b'C').map(String::as_str), Some("0A000"), "{name}");
        let msg = f.get(&b'M').cloned().unwrap_or_default();
        assert!(
            msg.contains("unsupported-startup-parameter")
                && msg.contains(&format!("`{name}`"))
                && msg.contains("request id"),
            "{name}: {msg}"
        );
        assert!(!msg.contains(value), "{name}: the value is never quoted: {msg}");
        let ev = w
            .wait_event(|e| {
                e["event"] == "refused"
                    && e["reason"] == "unsupported-startup-parameter"
                    && e["detail"].as_str().is_some_and(|d| d.contains(&format!("`{name}`")))
            })
            .await;
        assert_eq!(ev["kind"], "pg.session", "{name}: {ev}");
        assert_eq!(ev["decision"], "deny", "{ev}");
        assert_eq!(ev["role"], "app", "{ev}");
    }
    let all = w.w.sink.lines().join("");
    assert!(!all.contains("startup_owner"), "no value of a refused parameter is logged");

    // What stock clients send is forwarded, applied, and listed in the `open` event; an
    // empty `options` (libpq with an empty PGOPTIONS) is dropped.
    let params = [
        ("application_name", "startup-audit-app"),
        ("DateStyle", "ISO, DMY"),
        ("TimeZone", "Asia/Tokyo"),
        ("extra_float_digits", "3"),
        ("options", " "),
    ];
    let (mut t, _) = login(&w, w.addr, &token, &params).await;
    send(
        &mut t,
        &[query(b"select current_user || ' ' || current_setting('TimeZone') || ' ' || current_setting('DateStyle')")],
    )
    .await;
    let m = until_ready(&mut t).await;
    let row = m
        .iter()
        .find(|(k, _)| *k == b'D')
        .map(|(_, b)| String::from_utf8_lossy(&b[6..]).into_owned());
    assert_eq!(row.as_deref(), Some("migrator Asia/Tokyo ISO, DMY"), "{m:?}");
    let open = w
        .wait_event(|e| e["event"] == "open" && e["application_name"] == "startup-audit-app")
        .await;
    assert_eq!(
        open["startup_parameters"],
        serde_json::json!({
            "application_name": "startup-audit-app",
            "DateStyle": "ISO, DMY",
            "TimeZone": "Asia/Tokyo",
            "extra_float_digits": "3",
            "client_encoding": "UTF8",
        }),
        "{open}"
    );
    assert_eq!(open["upstream_role"], "migrator", "{open}");
}

/// A route may forward more settings (`startup_parameters`): they are applied and in the
/// `open` event; `role` and `options` stay refused.
#[tokio::test]
async fn a_route_s_startup_parameters_are_forwarded_and_audited() {
    let Some(w) =
        PgWorld::with_extra("startup_parameters = [\"search_path\", \"Statement_Timeout\"]").await
    else {
        return;
    };
    let token = w.w.token("bb", &[]);
    let params = [("search_path", "pg_catalog"), ("statement_timeout", "12s")];
    let (mut t, _) = login(&w, w.addr, &token, &params).await;
    send(
        &mut t,
        &[query(
            b"select current_setting('search_path') || '|' || current_setting('statement_timeout')",
        )],
    )
    .await;
    let m = until_ready(&mut t).await;
    let row = m
        .iter()
        .find(|(k, _)| *k == b'D')
        .map(|(_, b)| String::from_utf8_lossy(&b[6..]).into_owned());
    assert_eq!(row.as_deref(), Some("pg_catalog|12s"), "{m:?}");
    let open = w.wait_event(|e| e["event"] == "open").await;
    assert_eq!(open["startup_parameters"]["search_path"], "pg_catalog", "{open}");
    assert_eq!(open["startup_parameters"]["statement_timeout"], "12s", "{open}");
    for (name, value) in [("role", "migrator"), ("options", "-c search_path=public")] {
        let got = refused_startup(&w, &[(name, value)]).await;
        assert_eq!(error_code(&got).as_deref(), Some("0A000"), "{name}: {}", kinds(&got));
    }
}

/// The `application_name` the server sees for the session on `t`.
async fn server_side_application_name(t: &mut Conn) -> Option<String> {
    let sql = b"select application_name from pg_stat_activity where pid = pg_backend_pid()";
    send(t, &[query(sql)]).await;
    let m = until_ready(t).await;
    m.iter().find(|(k, _)| *k == b'D').map(|(_, b)| String::from_utf8_lossy(&b[6..]).into_owned())
}

/// `session_id_in_application_name`: the server's `pg_stat_activity` shows the client's
/// application name with the session id appended, the id of the session's audit events;
/// without the setting the name reaches the server as the client sent it.
#[tokio::test]
async fn the_session_id_reaches_pg_stat_activity_when_asked() {
    let app = [("application_name", "deploy-job")];
    let Some(w) = PgWorld::with_extra("session_id_in_application_name = true").await else {
        return;
    };
    let (mut t, _) = login(&w, w.addr, &w.w.token("bb", &[]), &app).await;
    let row = server_side_application_name(&mut t).await;
    let open = w.wait_event(|e| e["event"] == "open").await;
    let sid = open["session_id"].as_str().unwrap_or_else(|| panic!("{open}"));
    let tagged = format!("deploy-job (portcullis {sid})");
    assert_eq!(row.as_deref(), Some(tagged.as_str()));
    assert_eq!(open["application_name"], "deploy-job", "{open}");
    assert_eq!(open["startup_parameters"]["application_name"], tagged.as_str(), "{open}");

    // A tag of the proxy's shape sent by the client is not passed on as one: the
    // session id a reader finds is the real one, and only that.
    let forged = [("application_name", "deploy-job (portcullis ffffffffffffffffffff)")];
    let (mut t, _) = login(&w, w.addr, &w.w.token("bb", &[]), &forged).await;
    let row = server_side_application_name(&mut t).await.unwrap_or_default();
    assert_eq!(row.matches("portcullis").count(), 1, "{row}");
    assert!(!row.contains("(portcullis ffff"), "{row}");
    let open = w.wait_event(|e| e["event"] == "open" && e["application_name"] == forged[0].1).await;
    let sid = open["session_id"].as_str().unwrap_or_else(|| panic!("{open}"));
    assert!(row.ends_with(&format!("(portcullis {sid})")), "{row}");

    let Some(plain) = PgWorld::with_extra("").await else { return };
    let (mut t, _) = login(&plain, plain.addr, &plain.w.token("bb", &[]), &app).await;
    assert_eq!(server_side_application_name(&mut t).await.as_deref(), Some("deploy-job"));
}

/// Attack (round 14): PostgreSQL refuses a startup packet whose `user` is empty, and
/// connects a session whose `database` is empty to the database named like its user.
/// portcullis took `user=""` with `database=""`: the policy saw the database as "", which
/// no rule naming a database matches, and the server got the upstream role as the user
/// and so the database of that name. A deny rule on that database was passed by
/// leaving both names empty. An empty `user` is refused, before the token is asked for.
#[tokio::test]
async fn an_empty_user_name_is_refused_so_no_database_hides_behind_it() {
    let policy = r#"
[[rule]]
id = "not-the-readonly-database"
effect = "deny"
issuer = "corp"
databases = ["readonly"]

[[rule]]
id = "engineers-read-anything-else"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]
upstream_role = "readonly"
"#;
    let Some(w) = PgWorld::with_policy(policy).await else { return };
    // A database named like the upstream role (the attack's target; it may exist already).
    let _ = w.pg.admin_sql("create database readonly");
    let token = w.w.token("corp", &[]);
    // Named, it is denied.
    let mut t = tls_at(&w, w.addr).await;
    let denied = [("user", "app"), ("database", "readonly")];
    send(&mut t, &[portcullis::postgres::proto::startup_message(&denied)]).await;
    assert_eq!(next(&mut t).await.map(|m| m.0), Some(b'R'));
    send(&mut t, &[message(b'p', &cstr(token.as_bytes()))]).await;
    let got = until_ready(&mut t).await;
    assert_eq!(error_code(&got).as_deref(), Some("28000"), "{}", kinds(&got));
    // Left empty, it is refused too, before the password prompt.
    for params in [&[("user", ""), ("database", "")][..], &[("user", "")]] {
        let mut t = tls_at(&w, w.addr).await;
        send(&mut t, &[portcullis::postgres::proto::startup_message(params)]).await;
        let mut got = Vec::new();
        while let Some(m) = next(&mut t).await {
            if m.0 == b'R' {
                send(&mut t, &[message(b'p', &cstr(token.as_bytes()))]).await;
            }
            got.push(m);
        }
        assert_eq!(kinds(&got), "E", "{params:?}: refused before the password prompt");
        assert_eq!(error_code(&got).as_deref(), Some("28000"), "{params:?}");
    }
    let opened = w.w.events().into_iter().filter(|e| e["event"] == "open").count();
    assert_eq!(opened, 0, "no session opened");
}

/// Gap 1 of session 16: a Query and, in the same write, a header no message can have (a
/// length below 4). The Query was audited as sent but never relayed: the audit log said
/// the server ran a statement it never received. It is relayed now (PostgreSQL, read
/// directly, would run it before reading the bad header), then the session ends with
/// 08P01; the audit event and the server agree.
///
/// Session 19: the statement was then cancelled at once, as for a session portcullis ends
/// for expiry, so whether it ran depended on whether the server finished it before the
/// cancel arrived (this test failed once in CI). A protocol violation is the client's
/// doing, like leaving: what it relayed before gets `ORPHAN_GRACE`. The insert sleeps so
/// that an immediate cancel always catches it.
#[tokio::test]
async fn a_query_before_a_bad_header_is_relayed_as_audited_then_the_session_ends() {
    let Some(w) = PgWorld::start().await else { return };
    let table = format!("bad_header_s16_{}", std::process::id());
    let token = w.w.token("bb", &[]);
    create_table(&w, &token, &format!("{table}(v text)")).await;

    let (mut t, _) = login(&w, w.addr, &token, &[]).await;
    let insert = format!("insert into {table} select 'bad-header-marker' from pg_sleep(0.3)");
    send(&mut t, &[query(insert.as_bytes()), vec![b'Q', 0, 0, 0, 2]]).await;
    let fatal = last_error_before_close(&mut t).await;
    assert_eq!(fatal.get(&b'C').map(String::as_str), Some("08P01"), "{fatal:?}");
    let sid = sid_of(&w, "bad-header-marker").await;
    let close = w.wait_event(|e| e["session_id"] == sid.as_str() && e["event"] == "close").await;
    assert_eq!(close["reason"], "protocol-violation", "{close}");
    assert!(
        close["cancel_sent"].is_null(),
        "no cancel for what came before the bad header: {close}"
    );
    // What the audit says was sent, the server received and ran.
    let mut seen = 0;
    for _ in 0..40 {
        seen = rows(&w, &table);
        if seen > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 1, "the audited insert never reached the server");
    let statements = session_events(&w, &sid).await;
    let statements: Vec<&Value> =
        statements.iter().filter(|e| e["kind"] == "pg.statement").collect();
    assert_eq!(statements.len(), 1, "{statements:#?}");
    assert_eq!(statements[0]["text"], insert.as_str(), "{statements:#?}");
}

/// Session 20 (pgout): a message PostgreSQL never reads as a client message — a type
/// byte no frontend message has (`z`), or a Sync longer than the 10,000 bytes
/// PostgreSQL 14+ accepts for it (`PQ_SMALL_MESSAGE_LIMIT`) — ends the backend there
/// (FATAL "invalid frontend message type", or a silent exit after "invalid message
/// length"). Relayed, it left what followed it in the same write audited as sent while
/// the server never read it, and the `close` event said the upstream closed a session
/// the client had broken. Now it is refused like a bad header: what came before is
/// relayed, the session ends `08P01`, `protocol-violation`, and nothing after it is
/// relayed or audited.
#[tokio::test]
async fn a_message_postgres_never_reads_ends_the_session_before_what_follows_is_audited() {
    let Some(w) = PgWorld::start().await else { return };
    let table = format!("bad_type_s20_{}", std::process::id());
    let token = w.w.token("bb", &[]);
    create_table(&w, &token, &format!("{table}(v text)")).await;

    let over_long_sync = message(b'S', &[b'x'; 10_001]);
    for (case, bad) in [("type", message(b'z', b"")), ("sync", over_long_sync)] {
        let (mut t, _) = login(&w, w.addr, &token, &[]).await;
        let before = format!("insert into {table} values ('before-{case}')");
        let after = format!("insert into {table} values ('after-{case}')");
        send(&mut t, &[query(before.as_bytes()), bad, query(after.as_bytes())]).await;
        let fatal = last_error_before_close(&mut t).await;
        assert_eq!(fatal.get(&b'C').map(String::as_str), Some("08P01"), "{case}: {fatal:?}");
        let sid = sid_of(&w, &format!("before-{case}")).await;
        let close =
            w.wait_event(|e| e["session_id"] == sid.as_str() && e["event"] == "close").await;
        assert_eq!(close["reason"], "protocol-violation", "{case}: {close}");
        assert_eq!(close["ended_by"], "portcullis", "{case}: {close}");
        let events = session_events(&w, &sid).await;
        let texts: Vec<&str> = events
            .iter()
            .filter(|e| e["kind"] == "pg.statement")
            .filter_map(|e| e["text"].as_str())
            .collect();
        assert_eq!(texts, vec![before.as_str()], "{case}: only what the server read is audited");
    }
    // What the audit says was sent, the server ran; nothing after the bad message.
    let mut got = String::new();
    for _ in 0..40 {
        got = w
            .pg
            .admin_sql_in("appdb", &format!("select string_agg(v, ',' order by v) from {table}"))
            .unwrap_or_else(|e| panic!("{e}"));
        if got.matches("before").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, "before-sync,before-type");
}
