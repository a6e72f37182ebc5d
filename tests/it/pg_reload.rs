//! Database routes across reloads (added, removed, moved, renamed on a fixed port, a
//! listener that cannot be bound), and the `portcullis_pg_*` metrics, against the real
//! PostgreSQL server of `pg`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpStream;

use crate::pg::{ended_with, PgWorld, PG_POLICY};
use crate::support::*;

/// How long a session a reload ends may take to end.
const SESSION_END: Duration = Duration::from_secs(5);

/// The configuration's text before its `[[databases]]` routes, and the first route's block.
fn config_parts(w: &PgWorld) -> (String, String) {
    let text = std::fs::read_to_string(w.w.config_path()).unwrap_or_else(|e| panic!("{e}"));
    let i = text.find("[[databases]]").unwrap_or_else(|| panic!("no database route"));
    let (head, rest) = text.split_at(i);
    let end = rest[1..].find("[[databases]]").map_or(rest.len(), |j| j + 1);
    (head.to_string(), rest[..end].to_string())
}

/// `block` (the route `appdb` listening on `127.0.0.1:0`) renamed and moved.
fn route_block(block: &str, name: &str, listen: &str) -> String {
    block
        .replace("name = \"appdb\"", &format!("name = \"{name}\""))
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{listen}\""))
}

fn bound_now(w: &PgWorld) -> Vec<(String, SocketAddr)> {
    w.w.server().bound().databases.iter().map(|(n, a)| (n.to_string(), *a)).collect()
}

fn addr_now(w: &PgWorld, name: &str) -> SocketAddr {
    bound_now(w)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("no database route `{name}` after the reload"))
}

/// Waits (up to 3 s) until nothing accepts connections at `addr`.
async fn assert_refuses(addr: SocketAddr) {
    for _ in 0..60 {
        if TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} still accepts connections");
}

/// The last `reload` audit event.
fn last_reload(w: &PgWorld) -> Value {
    w.w.events()
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "reload" && e["outcome"] == "loaded")
        .unwrap_or(Value::Null)
}

type Conn = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

async fn connect_at(
    w: &PgWorld,
    addr: SocketAddr,
    token: &str,
) -> Result<(tokio_postgres::Client, Conn), tokio_postgres::Error> {
    let (c, conn) = w.pg_config_at(addr, token, "app").connect(w.tls()).await?;
    Ok((c, tokio::spawn(conn)))
}

async fn current_user(c: &tokio_postgres::Client) -> String {
    let rows =
        c.query_one("select current_user::text", &[]).await.unwrap_or_else(|e| panic!("{e}"));
    rows.get::<_, String>(0)
}

#[tokio::test]
async fn a_reload_that_adds_a_database_route_serves_it_without_restart() {
    let Some(w) = PgWorld::start().await else { return };
    let (head, block) = config_parts(&w);
    let token = w.w.token("bb", &[]);
    let (before, _conn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));

    write(
        &w.w.config_path(),
        &format!("{head}{block}\n{}", route_block(&block, "added", "127.0.0.1:0")),
    );
    assert!(w.w.server().reload().await, "reload with an added database route");
    assert_eq!(last_reload(&w)["routes_changed"], serde_json::json!(["added"]));
    let added = addr_now(&w, "added");
    assert_eq!(addr_now(&w, "appdb"), w.addr, "an unchanged route keeps its listener");
    assert_ne!(added, w.addr);

    // The new listener serves at once, under the route's policy.
    let (c, _c2) =
        connect_at(&w, added, &token).await.unwrap_or_else(|e| panic!("added route: {e}"));
    assert_eq!(current_user(&c).await, "migrator");
    let open = w
        .wait_event(|e| e["kind"] == "pg.session" && e["event"] == "open" && e["route"] == "added")
        .await;
    assert_eq!(open["decision"], "allow");
    // The session opened before the reload is untouched, and its listener still accepts.
    assert_eq!(current_user(&before).await, "migrator");
    let (again, _c3) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&again).await, "migrator");
    // A reload that changes nothing rebinds nothing.
    assert!(w.w.server().reload().await);
    assert_eq!(addr_now(&w, "added"), added);
    assert_eq!(last_reload(&w)["routes_changed"], serde_json::json!([]));
    assert_eq!(current_user(&c).await, "migrator");
}

#[tokio::test]
async fn removing_a_database_route_closes_its_listener_and_ends_its_sessions_with_57p01() {
    let Some(w) = PgWorld::with_toml("", |t| {
        format!("{t}\n{}", t.replace("name = \"appdb\"", "name = \"doomed\""))
    })
    .await
    else {
        return;
    };
    let (head, appdb) = config_parts(&w);
    let doomed = w.addr_of("doomed");
    let token = w.w.token("bb", &[]);
    let (dc, dconn) = connect_at(&w, doomed, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&dc).await, "migrator");
    let (kept, _kconn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));

    write(&w.w.config_path(), &format!("{head}{appdb}"));
    assert!(w.w.server().reload().await);
    assert_eq!(last_reload(&w)["routes_changed"], serde_json::json!(["doomed"]));

    let err = ended_with(dconn, SESSION_END).await;
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    let msg = err.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("access-revoked") && msg.contains("request id"), "{msg}");
    let close = w
        .wait_event(|e| {
            e["kind"] == "pg.session" && e["event"] == "close" && e["route"] == "doomed"
        })
        .await;
    assert_eq!(close["decision"], "terminated");
    assert_eq!(close["reason"], "access-revoked");
    assert_eq!(close["ended_by"], "portcullis");
    assert!(
        close["detail"].as_str().is_some_and(|d| d.contains("database route `doomed` removed")),
        "{close}"
    );
    assert_refuses(doomed).await;
    assert_eq!(bound_now(&w), vec![("appdb".to_string(), w.addr)]);
    // The other route's session and listener are untouched.
    assert_eq!(current_user(&kept).await, "migrator");
    assert!(connect_at(&w, w.addr, &token).await.is_ok());
}

#[tokio::test]
async fn moving_a_database_route_rebinds_it_and_its_sessions_go_on() {
    let Some(w) = PgWorld::start().await else { return };
    let (head, block) = config_parts(&w);
    let token = w.w.token("bb", &[]);
    let (c, _conn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();

    write(
        &w.w.config_path(),
        &format!("{head}{}", route_block(&block, "appdb", &format!("127.0.0.1:{port}"))),
    );
    assert!(w.w.server().reload().await);
    assert_eq!(last_reload(&w)["routes_changed"], serde_json::json!(["appdb"]));
    let moved = addr_now(&w, "appdb");
    assert_eq!(moved, SocketAddr::from(([127, 0, 0, 1], port)));
    assert_refuses(w.addr).await;
    // Still allowed: the session opened on the old listener goes on.
    assert_eq!(current_user(&c).await, "migrator");
    let (c2, _conn2) = connect_at(&w, moved, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&c2).await, "migrator");
    assert!(
        !w.w.events().iter().any(|e| e["kind"] == "pg.session" && e["event"] == "close"),
        "no session ended"
    );
}

#[tokio::test]
async fn renaming_a_route_on_a_fixed_port_hands_its_listener_over() {
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let Some(w) = PgWorld::with_toml("", |t| t.replace("listen = \"127.0.0.1:0\"", &listen)).await
    else {
        return;
    };
    let (head, block) = config_parts(&w);
    let token = w.w.token("bb", &[]);
    let (_c, conn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));

    // The new route wants the port the old one holds: no second bind, no restart.
    write(
        &w.w.config_path(),
        &format!("{head}{}", block.replace("name = \"appdb\"", "name = \"renamed\"")),
    );
    assert!(w.w.server().reload().await, "rename on the same port");
    assert_eq!(bound_now(&w), vec![("renamed".to_string(), w.addr)]);
    let err = ended_with(conn, SESSION_END).await;
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    let (c, _conn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&c).await, "migrator");
    let open = w
        .wait_event(|e| {
            e["kind"] == "pg.session" && e["event"] == "open" && e["route"] == "renamed"
        })
        .await;
    assert_eq!(open["decision"], "allow");
    let mut changed: Vec<String> =
        serde_json::from_value(last_reload(&w)["routes_changed"].clone()).unwrap_or_default();
    changed.sort();
    assert_eq!(changed, vec!["appdb", "renamed"]);
}

#[tokio::test]
async fn a_reload_whose_database_listener_cannot_bind_is_rejected_and_nothing_changes() {
    let Some(w) = PgWorld::start().await else { return };
    let (head, block) = config_parts(&w);
    let token = w.w.token("bb", &[]);
    let (c, conn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let taken = blocker.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let loaded = |e: &&Value| e["kind"] == "reload" && e["outcome"] == "loaded";
    let reloads = w.w.events().iter().filter(loaded).count();

    // One route that can be bound, one that cannot, and a policy that would revoke the
    // open session: all or nothing.
    let only_engineers =
        PG_POLICY.split("[[rule]]").nth(2).map(|r| format!("[[rule]]{r}")).unwrap_or_default();
    write(&w.w.policy_path("pg"), &only_engineers);
    write(
        &w.w.config_path(),
        &format!(
            "{head}{block}\n{}\n{}",
            route_block(&block, "first", "127.0.0.1:0"),
            route_block(&block, "second", &taken.to_string())
        ),
    );
    assert!(!w.w.server().reload().await, "a listener that cannot bind rejects the reload");
    assert_eq!(bound_now(&w), vec![("appdb".to_string(), w.addr)], "no listener added");
    assert_eq!(w.w.events().iter().filter(loaded).count(), reloads, "nothing loaded");
    let last = w.w.events().into_iter().rfind(|e| e["kind"] == "reload").unwrap_or(Value::Null);
    assert_eq!(
        (last["outcome"].as_str(), last["stage"].as_str()),
        (Some("rejected"), Some("database-listener")),
        "{last}"
    );
    // The old policy is still in force: the session goes on and new ones open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(current_user(&c).await, "migrator");
    let (c2, _conn2) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&c2).await, "migrator");

    // Once the port is free, the same configuration applies in full.
    drop(blocker);
    assert!(w.w.server().reload().await);
    let names: Vec<String> = bound_now(&w).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["appdb", "first", "second"]);
    assert_eq!(addr_now(&w, "second"), taken);
    assert_eq!(ended_with(conn, SESSION_END).await.code().map(|c| c.code()), Some("57P01"));
    let human = w.w.token("corp", &[]);
    let (h, _hconn) = w
        .pg_config_at(taken, &human, "alice")
        .connect(w.tls())
        .await
        .map(|(c, conn)| (c, tokio::spawn(conn)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&h).await, "readonly");
}

/// The value of the metric line `series` (name and labels), polled until it is `want`
/// (up to 3 s); the last value seen otherwise.
async fn metric(w: &PgWorld, series: &str, want: u64) -> Option<u64> {
    let mut last = None;
    for _ in 0..60 {
        let text = w.w.admin_get("/metrics").await.text();
        last = text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok());
        if last == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test]
async fn postgres_metrics_count_sessions_statements_terminations_and_bytes() {
    // The metrics are process-wide; a route name of its own keeps other tests' sessions out.
    let Some(w) =
        PgWorld::with_toml("", |t| t.replace("name = \"appdb\"", "name = \"metricsdb\"")).await
    else {
        return;
    };
    let r = "route=\"metricsdb\"";
    let pipeline = w.w.token("bb", &[]);
    let human = w.w.token("corp", &[]);
    // Session 1: two statements, closed by the client.
    let (c, conn) = connect_at(&w, w.addr, &pipeline).await.unwrap_or_else(|e| panic!("{e}"));
    c.simple_query("select 1").await.unwrap_or_else(|e| panic!("{e}"));
    c.simple_query("select 2").await.unwrap_or_else(|e| panic!("{e}"));
    drop(c);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    // Session 2: one statement (extended protocol: Parse, Bind, Execute), left open.
    let (h, hconn) = w
        .pg_config_at(w.addr, &human, "alice")
        .connect(w.tls())
        .await
        .map(|(c, conn)| (c, tokio::spawn(conn)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&h).await, "readonly");
    // Two refusals: the policy, and a token that does not verify.
    let feature = w.w.token("bb", &["branchName=feature/x"]);
    assert!(connect_at(&w, w.addr, &feature).await.is_err());
    assert!(connect_at(&w, w.addr, "not-a-jwt").await.is_err());

    let series = |name: &str, labels: &str| format!("{name}{{{r}{labels}}}");
    let sessions = "portcullis_pg_sessions_total";
    assert_eq!(
        metric(&w, &series(sessions, ",decision=\"allow\",reason=\"allowed\""), 2).await,
        Some(2)
    );
    assert_eq!(
        metric(&w, &series(sessions, ",decision=\"deny\",reason=\"policy-denied\""), 1).await,
        Some(1)
    );
    assert_eq!(
        metric(&w, &series(sessions, ",decision=\"deny\",reason=\"malformed-token\""), 1).await,
        Some(1)
    );
    assert_eq!(metric(&w, &series("portcullis_pg_sessions_open", ""), 1).await, Some(1));
    assert_eq!(metric(&w, &series("portcullis_pg_statements_total", ""), 3).await, Some(3));

    // A reload that revokes the engineers' access ends session 2.
    let only_pipelines =
        PG_POLICY.split("[[rule]]").nth(1).map(|r| format!("[[rule]]{r}")).unwrap_or_default();
    write(&w.w.policy_path("pg"), &only_pipelines);
    assert!(w.w.server().reload().await);
    let e = ended_with(hconn, SESSION_END).await;
    if e.code().map(|c| c.code()) != Some("57P01") {
        // Failed once in CI (session 19) with no code, not reproduced since (27 runs, 12
        // of them loaded): the session's close events say what ended it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let closes: Vec<_> = w.w.events().into_iter().filter(|e| e["event"] == "close").collect();
        panic!("the session ended with `{e}` ({e:?}), not 57P01; close events: {closes:#?}");
    }
    let terminations = "portcullis_pg_session_terminations_total";
    assert_eq!(metric(&w, &series(terminations, ",reason=\"access-revoked\""), 1).await, Some(1));
    assert_eq!(metric(&w, &series("portcullis_pg_sessions_open", ""), 0).await, Some(0));

    // Bytes: exactly what the two sessions' close events say they relayed.
    let mut closes = Vec::new();
    for _ in 0..100 {
        closes =
            w.events_of("pg.session").await.into_iter().filter(|e| e["event"] == "close").collect();
        if closes.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(closes.len(), 2, "two sessions closed");
    let sum = |k: &str| closes.iter().map(|e| e[k].as_u64().unwrap_or(0)).sum::<u64>();
    let (bytes_in, bytes_out) = (sum("bytes_in"), sum("bytes_out"));
    assert!(bytes_in > 0 && bytes_out > 0, "in {bytes_in}, out {bytes_out}");
    let bytes = "portcullis_pg_bytes_total";
    assert_eq!(metric(&w, &series(bytes, ",direction=\"in\""), bytes_in).await, Some(bytes_in));
    assert_eq!(metric(&w, &series(bytes, ",direction=\"out\""), bytes_out).await, Some(bytes_out));
    let text = w.w.admin_get("/metrics").await.text();
    for family in [sessions, "portcullis_pg_sessions_open", terminations, bytes] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} has a TYPE line");
    }
}

/// A configured database route with no session open exports 0 open sessions, not nothing.
#[tokio::test]
async fn an_idle_database_route_exports_zero_open_sessions() {
    let Some(w) =
        PgWorld::with_toml("", |t| t.replace("name = \"appdb\"", "name = \"idle-metrics\"")).await
    else {
        return;
    };
    let series = "portcullis_pg_sessions_open{route=\"idle-metrics\"}";
    assert_eq!(metric(&w, series, 0).await, Some(0));
}

/// Attack (round 14): `max_session` was read when a session opened, so a reload that
/// shortened it (an operator cutting long sessions during an incident) left every open
/// session running until its token expired, while a shorter `max_token_age` ended them.
/// A shorter `max_session` now ends open sessions older than it (counted from each
/// session's start), as it would a new one; a longer one extends none.
#[tokio::test]
async fn a_reload_that_shortens_max_session_ends_the_sessions_older_than_it() {
    let Some(w) = PgWorld::with_extra("max_session = \"1h\"").await else { return };
    let (head, block) = config_parts(&w);
    let token = w.w.token("bb", &[]);
    let (c, conn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(current_user(&c).await, "migrator");

    // Longer: nothing ends.
    write(&w.w.config_path(), &format!("{head}{}", block.replace("\"1h\"", "\"2h\"")));
    assert!(w.w.server().reload().await, "reload with a longer max_session");
    assert_eq!(current_user(&c).await, "migrator");

    write(&w.w.config_path(), &format!("{head}{}", block.replace("\"1h\"", "\"1s\"")));
    assert!(w.w.server().reload().await, "reload with a shorter max_session");
    let e = ended_with(conn, SESSION_END).await;
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a PostgreSQL error: {e}"));
    assert_eq!(db.code().code(), "57P01", "{}", db.message());
    assert!(db.message().contains("session-expired"), "{}", db.message());
    let close = w.wait_event(|e| e["kind"] == "pg.session" && e["event"] == "close").await;
    assert_eq!(close["reason"], "session-expired", "{close}");
    assert!(close["detail"].as_str().is_some_and(|d| d.contains("max_session (1s)")), "{close}");
}

/// `current_user` by a simple Query: no prepared statement whose Close, sent when it is
/// dropped, could still await its answer when the session is ended (the client then
/// hands the FATAL to that request and reports only "connection closed").
async fn simple_user(c: &tokio_postgres::Client) -> String {
    let rows = c.simple_query("select current_user").await.unwrap_or_else(|e| panic!("{e}"));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default()
}

/// A TCP relay to the PostgreSQL server: another upstream address for the same server.
async fn relay_to(port: u16) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let relay = l.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut u) = TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
    });
    relay
}

/// Attack (round 14): a reload that moved a database route to another server
/// (`upstream`) or changed how it is reached (`upstream_tls`: an operator moving off a
/// retired or compromised server, or turning TLS on) left the sessions already open on
/// their old connection, to the old server or in clear, for as long as their tokens
/// lived. They now end, as a revocation ends them (57P01 `access-revoked`, the `close`
/// event saying which setting changed); sessions of a route whose upstream did not
/// change stay, and the same upstream spelt otherwise is no change.
#[tokio::test]
async fn a_reload_that_changes_a_databases_upstream_ends_its_sessions_only() {
    let Some(w) = PgWorld::with_toml("", |t| {
        format!("{t}\n{}", t.replace("name = \"appdb\"", "name = \"steady\""))
    })
    .await
    else {
        return;
    };
    let text = std::fs::read_to_string(w.w.config_path()).unwrap_or_else(|e| panic!("{e}"));
    let upstream = format!("upstream = \"postgres://127.0.0.1:{}\"", w.pg.port);
    assert_eq!(text.matches(&upstream).count(), 2, "both routes on the server");
    let token = w.w.token("bb", &[]);
    let steady = w.addr_of("steady");
    let (s, _sconn) = connect_at(&w, steady, &token).await.unwrap_or_else(|e| panic!("{e}"));
    let (a, aconn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(simple_user(&a).await, "migrator");

    // The same host and port written otherwise: nothing ends.
    let respelt = format!("upstream = \"postgresql://127.0.0.1:{}/\"", w.pg.port);
    write(&w.w.config_path(), &text.replacen(&upstream, &respelt, 1));
    assert!(w.w.server().reload().await, "reload with the upstream respelt");
    assert_eq!(simple_user(&a).await, "migrator");

    // Another address (the first route only): its session ends, the other route's stays.
    let relay = relay_to(w.pg.port).await;
    let moved = format!("upstream = \"postgres://127.0.0.1:{relay}\"");
    write(&w.w.config_path(), &text.replacen(&upstream, &moved, 1));
    assert!(w.w.server().reload().await, "reload with appdb's upstream moved");
    let e = ended_with(aconn, SESSION_END).await;
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a PostgreSQL error: {e}"));
    assert_eq!(db.code().code(), "57P01", "{}", db.message());
    assert!(db.message().contains("access-revoked"), "{}", db.message());
    let close = w
        .wait_event(|e| e["kind"] == "pg.session" && e["event"] == "close" && e["route"] == "appdb")
        .await;
    assert_eq!(close["reason"], "access-revoked", "{close}");
    let detail = close["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("127.0.0.1:{}` → `127.0.0.1:{relay}`", w.pg.port)), "{close}");
    assert_eq!(
        simple_user(&s).await,
        "migrator",
        "a route whose upstream stayed keeps its session"
    );
    // A new session goes to the upstream now configured.
    let (a, aconn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(simple_user(&a).await, "migrator");

    // TLS to the upstream turned on: the session made in clear ends.
    let tls = format!("{moved}\nupstream_tls = \"require\"");
    write(&w.w.config_path(), &text.replacen(&upstream, &tls, 1));
    assert!(w.w.server().reload().await, "reload with upstream_tls = require");
    let e = ended_with(aconn, SESSION_END).await;
    assert!(e.as_db_error().is_some_and(|d| d.code().code() == "57P01"), "{e}");
    let close = w
        .wait_event(|e| {
            e["event"] == "close"
                && e["route"] == "appdb"
                && e["detail"].as_str().is_some_and(|d| d.contains("upstream_tls"))
        })
        .await;
    assert_eq!(close["reason"], "access-revoked", "{close}");
    assert!(
        close["detail"].as_str().is_some_and(|d| d.contains("upstream_tls `disable` → `require`")),
        "{close}"
    );
    assert_eq!(simple_user(&s).await, "migrator");
    let (a, _aconn) = connect_at(&w, w.addr, &token).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(simple_user(&a).await, "migrator");
}

/// Session 14 (identity attack round): a database session ends when the issuer's key set
/// drops the key that verified its token (a rotation after a key compromise: a forged
/// token with a far-off `exp` kept its session open until then), as a new session with
/// that token is refused; a session whose token the issuer's new key verified goes on.
#[tokio::test]
async fn a_key_set_that_drops_a_sessions_signing_key_ends_the_session() {
    use crate::forwarding::{refresh_keys, token_by};
    let Some(w) = PgWorld::start().await else { return };
    let old = w.w.token("bb", &[]);
    let (c, conn) = connect_at(&w, w.addr, &old).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(simple_user(&c).await, "migrator");

    // The issuer publishes a second key: fetched on first sight, nothing ends.
    let next = portcullis::dev::signer::DevSigner::generate_rs256("test-key-2")
        .unwrap_or_else(|e| panic!("{e}"));
    w.w.issuer.set_keys("/bitbucket", &[&w.w.signer, &next]);
    let new = token_by(&w.w, "bb", &next, "test-key-2");
    let (kept, _kconn) = connect_at(&w, w.addr, &new).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(simple_user(&kept).await, "migrator");
    assert_eq!(simple_user(&c).await, "migrator", "ended by a refresh that only added a key");

    // The issuer retires the old key; the next refresh drops it.
    w.w.issuer.set_keys("/bitbucket", &[&next]);
    refresh_keys(&w.w, "bb").await;
    assert!(connect_at(&w, w.addr, &old).await.is_err(), "a new session with the old key");
    let err = ended_with(conn, SESSION_END).await;
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    let close = w
        .wait_event(|e| {
            e["kind"] == "pg.session" && e["event"] == "close" && e["decision"] == "terminated"
        })
        .await;
    assert_eq!(close["reason"], "access-revoked", "{close}");
    let detail = close["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("unknown-key")
            && detail.contains("`test-key-1`")
            && detail.contains("`bb`"),
        "{close}"
    );
    assert_eq!(simple_user(&kept).await, "migrator", "the session of the new key was ended");
}
