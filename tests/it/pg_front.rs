//! The database front as an outside attacker, or a client with a valid token, meets it
//! on raw bytes (psql 15 speaks none of the newer features): PostgreSQL 17 direct TLS and
//! its mandatory ALPN, a newer protocol version and `_pq_.` options negotiated down to
//! 3.0, replication startups, repeated parameters and encryption requests, startup packets
//! at PostgreSQL's length limit, cancel requests over direct TLS, and cancel requests
//! (psql's Ctrl-C) while every `max_connections` slot is taken.

use std::sync::Arc;
use std::time::Duration;

use portcullis::postgres::proto::{self, message};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pg::{assert_no_secrets, tls_to, PgWorld};
use crate::pg_session::{
    cstr, error_code, kinds, login_on, next, query, refused_startup, send, tls_at, until_ready,
    Conn,
};

/// TLS from the first byte (libpq 17's `sslnegotiation=direct`), offering `alpn`.
async fn direct_tls(w: &PgWorld, alpn: &[&[u8]]) -> std::io::Result<Conn> {
    let tcp = TcpStream::connect(w.addr).await?;
    let mut cfg = (*w.tls().config()).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name =
        rustls::pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
}

/// Every message the proxy sends until it closes the connection.
async fn all_until_close(t: &mut Conn) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    while let Some(m) = next(t).await {
        got.push(m);
    }
    got
}

/// A startup packet of protocol `version` with `params`.
/// Writes a CancelRequest for the session whose BackendKeyData body is `key`.
async fn send_cancel<S: AsyncWrite + Unpin>(c: &mut S, key: &[u8]) {
    let pid = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    let secret = u32::from_be_bytes([key[4], key[5], key[6], key[7]]);
    c.write_all(&proto::cancel_request(pid, secret)).await.unwrap_or_else(|e| panic!("{e}"));
}

fn startup_of(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in params {
        body.extend(cstr(k.as_bytes()));
        body.extend(cstr(v.as_bytes()));
    }
    body.push(0);
    proto::startup_packet(version, &body)
}

/// PostgreSQL 17 clients may start TLS at once, without SSLRequest; the server must then
/// see ALPN `postgresql` (a TLS client of another protocol, such as a browser sent at the
/// port, is refused before anything is read). Sessions and cancel requests work over it.
#[tokio::test]
async fn direct_tls_needs_alpn_postgresql_and_carries_sessions_and_cancels() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let startup = proto::startup_message(&[("user", "app"), ("database", "appdb")]);

    // Without ALPN: refused, never asked for the token.
    let mut t = direct_tls(&w, &[]).await.unwrap_or_else(|e| panic!("{e}"));
    send(&mut t, std::slice::from_ref(&startup)).await;
    let got = all_until_close(&mut t).await;
    assert_eq!(kinds(&got), "E", "{got:?}");
    assert_eq!(error_code(&got).as_deref(), Some("08P01"));
    // Another protocol's ALPN: the handshake itself fails.
    assert!(direct_tls(&w, &[b"http/1.1"]).await.is_err(), "ALPN http/1.1 accepted");

    // ALPN `postgresql`: a session as after SSLRequest, with the proxy's own cancel key.
    let t = direct_tls(&w, &[b"postgresql"]).await.unwrap_or_else(|e| panic!("{e}"));
    let (mut t, key) = login_on(t, &token, &startup).await;
    assert_eq!(key.len(), 8);
    send(&mut t, &[query(b"select 'direct-tls-marker', pg_sleep(30)")]).await;
    w.until_running("direct-tls-marker").await;
    // The cancel request over direct TLS too.
    let mut c = direct_tls(&w, &[b"postgresql"]).await.unwrap_or_else(|e| panic!("{e}"));
    send_cancel(&mut c, &key).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut sink)).await;
    let m = until_ready(&mut t).await;
    assert_eq!(error_code(&m).as_deref(), Some("57014"), "not cancelled: {m:?}");
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel" && e["forwarded"] == true).await;
    assert_eq!(ev["route"], "appdb", "{ev}");
    let open = w.wait_event(|e| e["kind"] == "pg.session" && e["event"] == "open").await;
    assert_eq!(open["tls"]["version"], "TLSv1.3", "{open}");
    let refused = w
        .wait_event(|e| {
            e["kind"] == "pg.session"
                && e["detail"].as_str().is_some_and(|d| d.contains("without ALPN"))
        })
        .await;
    assert_eq!(refused["event"], "refused", "{refused}");
    assert_no_secrets(&w, &[&token]);
}

/// libpq 18 (`max_protocol_version=3.2`) and 19 ask for a newer protocol, and clients may
/// send `_pq_.` protocol options: answered NegotiateProtocolVersion 3.0 naming the options
/// ignored, before the token is asked for; the session goes on in 3.0, with a 4-byte
/// cancel secret (3.2's are longer), and no option reaches the server.
#[tokio::test]
async fn a_newer_protocol_and_its_options_are_negotiated_down_to_3_0() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    for version in [(3 << 16) | 2, (3 << 16) | 0xffff] {
        let mut t = tls_to(&w).await;
        let params = [("user", "app"), ("database", "appdb"), ("_pq_.portcullis_probe", "on")];
        send(&mut t, &[startup_of(version, &params)]).await;
        let (k, body) = next(&mut t).await.unwrap_or_else(|| panic!("closed"));
        assert_eq!(k, b'v', "NegotiateProtocolVersion first");
        let mut want = proto::PROTOCOL_3_0.to_be_bytes().to_vec();
        want.extend(1u32.to_be_bytes());
        want.extend(cstr(b"_pq_.portcullis_probe"));
        assert_eq!(body, want);
        let (k, body) = next(&mut t).await.unwrap_or_else(|| panic!("closed"));
        assert_eq!((k, body), (b'R', 3u32.to_be_bytes().to_vec()), "then the password");
        send(&mut t, &[message(b'p', &cstr(token.as_bytes()))]).await;
        let m = until_ready(&mut t).await;
        let key = m.iter().find(|(k, _)| *k == b'K').map(|(_, b)| b.len());
        assert_eq!(key, Some(8), "3.0's BackendKeyData: {m:?}");
        send(&mut t, &[query(b"select 40 + 2")]).await;
        let m = until_ready(&mut t).await;
        assert_eq!(kinds(&m), "TDCZ", "{m:?}");
    }
    let open = w.wait_event(|e| e["kind"] == "pg.session" && e["event"] == "open").await;
    let forwarded = open["startup_parameters"].as_object().map(|o| o.keys().cloned().collect());
    assert_eq!(forwarded, Some(vec!["client_encoding".to_string()]), "{open}");
}

/// A replication connection (`replication=database` or `true`) runs replication commands
/// and streams changes, none of them statements the audit sees: refused before the token
/// is asked for, however the value or the name is spelt. `replication=false` is an
/// ordinary session: the server gets no replication flag (a replication command is a
/// syntax error there).
#[tokio::test]
async fn replication_startups_are_refused_before_the_token_is_asked_for() {
    let Some(w) = PgWorld::start().await else { return };
    for (name, value) in [
        ("replication", "database"),
        ("replication", "true"),
        ("replication", "on"),
        ("replication", "yes"),
        ("replication", "1"),
        ("replication", "t"),
        ("replication", "TRUE"),
        ("Replication", "database"),
        ("REPLICATION", "true"),
    ] {
        let got = refused_startup(&w, &[(name, value)]).await;
        assert_eq!(kinds(&got), "E", "{name}={value}: {got:?}");
        assert_eq!(error_code(&got).as_deref(), Some("0A000"), "{name}={value}");
    }
    let token = w.w.token("bb", &[]);
    let t = tls_to(&w).await;
    let startup =
        proto::startup_message(&[("user", "app"), ("database", "appdb"), ("replication", "false")]);
    let (mut t, _) = login_on(t, &token, &startup).await;
    send(&mut t, &[query(b"IDENTIFY_SYSTEM")]).await;
    let m = until_ready(&mut t).await;
    assert_eq!(error_code(&m).as_deref(), Some("42601"), "a walsender? {m:?}");
}

/// A parameter named twice (PostgreSQL keeps the last `user`, an audit reading the first
/// would name another role), encryption asked for again inside TLS or twice in plaintext,
/// a cancel key of protocol 3.2's length, and startup packets past PostgreSQL's length
/// limit: refused, never asked for a token.
#[tokio::test]
async fn repeated_parameters_and_encryption_requests_and_long_startups_are_refused() {
    let Some(w) = PgWorld::start().await else { return };
    // `user` twice, and `database` twice.
    for twice in ["user", "database"] {
        let got = refused_startup(&w, &[(twice, "postgres")]).await;
        assert_eq!(kinds(&got), "E", "{twice}: {got:?}");
        assert_eq!(error_code(&got).as_deref(), Some("08P01"), "{twice}");
    }
    // SSLRequest or GSSENCRequest inside TLS.
    for code in [proto::SSL_REQUEST, proto::GSSENC_REQUEST] {
        let mut t = tls_to(&w).await;
        send(&mut t, &[proto::startup_packet(code, &[])]).await;
        let got = all_until_close(&mut t).await;
        assert_eq!(error_code(&got).as_deref(), Some("08P01"), "{code}: {got:?}");
    }
    // A second SSLRequest where the TLS handshake should begin: closed, nothing asked.
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let ssl = proto::startup_packet(proto::SSL_REQUEST, &[]);
    tcp.write_all(&ssl).await.unwrap_or_else(|e| panic!("{e}"));
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&s, b"S");
    tcp.write_all(&ssl).await.unwrap_or_else(|e| panic!("{e}"));
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "not closed");
    assert!(!rest.contains(&b'R'), "asked for a password: {rest:?}");
    // A protocol 3.2 cancel key (up to 256 bytes): never handed out (sessions speak 3.0),
    // refused as malformed.
    let mut long_key = 1u32.to_be_bytes().to_vec();
    long_key.extend([7u8; 32]);
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let cancel = proto::startup_packet(proto::CANCEL_REQUEST, &long_key);
    tcp.write_all(&cancel).await.unwrap_or_else(|e| panic!("{e}"));
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "not closed");
    assert_eq!(rest.first(), Some(&b'E'), "{rest:?}");
    // At PostgreSQL's limit (10,000 bytes with the length word): read, the token asked
    // for. One byte more: refused.
    let base = startup_of(proto::PROTOCOL_3_0, &[("user", "app"), ("database", "appdb")]);
    let fill = proto::MAX_STARTUP_LEN - base.len() - "application_name".len() - 2;
    for (extra, asked) in [(0, true), (1, false)] {
        let name = "x".repeat(fill + extra);
        let packet = startup_of(
            proto::PROTOCOL_3_0,
            &[("user", "app"), ("database", "appdb"), ("application_name", &name)],
        );
        assert_eq!(packet.len(), proto::MAX_STARTUP_LEN + extra);
        let mut t = tls_to(&w).await;
        send(&mut t, &[packet]).await;
        let (k, _) = next(&mut t).await.unwrap_or_else(|| panic!("closed"));
        assert_eq!(k == b'R', asked, "{} bytes", proto::MAX_STARTUP_LEN + extra);
    }
}

/// A TCP relay to the PostgreSQL server that closes each client connection 3 s after the
/// server closed it: an upstream slow to end a cancel request's connection (PostgreSQL
/// closes it once it has signalled the backend; a pooler or a loaded network may not).
async fn slow_closing_relay(port: u16) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let relay = l.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(u) = TcpStream::connect(("127.0.0.1", port)).await else { return };
                let ((mut cr, mut cw), (mut ur, mut uw)) = (c.into_split(), u.into_split());
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut uw).await });
                let _ = tokio::io::copy(&mut ur, &mut cw).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                up.abort();
            });
        }
    });
    relay
}

/// Round 15: a CancelRequest was handled inside the session set-up's `startup_timeout`,
/// which also bounds the wait for the upstream to close the cancel's connection. Past it,
/// the cancel had reached the backend (the statement stopped) but its `pg.cancel` event
/// was never written, and a `refused` event blamed the client for a set-up not finished.
#[tokio::test]
async fn a_cancel_the_upstream_is_slow_to_acknowledge_is_audited() {
    let Some(pg) = crate::pg::pg() else { return };
    let relay = slow_closing_relay(pg.port).await;
    let upstream = format!("postgres://127.0.0.1:{}", pg.port);
    // Set-up must finish within 1.5 s; the cancel's wait for the close is 2 s.
    let Some(w) = PgWorld::with_toml("", |t| {
        t.replace(&upstream, &format!("postgres://127.0.0.1:{relay}"))
            .replace("startup_timeout = \"2s\"", "startup_timeout = \"1500ms\"")
    })
    .await
    else {
        return;
    };
    let token = w.w.token("bb", &[]);
    let startup = proto::startup_message(&[("user", "app"), ("database", "appdb")]);
    let (mut t, key) = login_on(tls_to(&w).await, &token, &startup).await;
    send(&mut t, &[query(b"select pg_sleep(30) /* slow-ack-marker */")]).await;
    w.until_running("slow-ack-marker").await;
    let mut c = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend(proto::CANCEL_REQUEST.to_be_bytes());
    cancel.extend(&key);
    c.write_all(&cancel).await.unwrap_or_else(|e| panic!("{e}"));
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut sink)).await;
    let m = until_ready(&mut t).await;
    assert_eq!(error_code(&m).as_deref(), Some("57014"), "not cancelled: {m:?}");
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel").await;
    assert_eq!(ev["forwarded"], true, "the cancel that stopped the statement: {ev}");
    let refused = w.w.events().into_iter().filter(|e| e["event"] == "refused").count();
    assert_eq!(refused, 0, "{:#?}", w.w.events());
}

/// `psql -c sql` through the proxy as `application_name`, running in the background.
fn psql_in_background(w: &PgWorld, token: &str, app: &str, sql: &str) -> tokio::process::Child {
    let conn = format!(
        "host=127.0.0.1 port={} sslmode=require dbname=appdb user=app connect_timeout=10 \
         application_name={app}",
        w.addr.port()
    );
    tokio::process::Command::new(w.pg.bin.join("psql"))
        .env("PGPASSWORD", token)
        .env_remove("PGSERVICE")
        .args(["-X", "-A", "-t", "-w", &conn, "-c", sql])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("psql: {e}"))
}

/// Gap 2 of session 16: with every `server.max_connections` slot held by a running
/// statement, psql's Ctrl-C (a CancelRequest on a new connection) waited for a slot, so
/// the statements holding them could not be stopped. PostgreSQL serves cancels when
/// full; so does the proxy now, on a few seats of their own, while a new session still
/// waits for a slot (and gets the one the cancelled session gives back).
#[tokio::test]
async fn a_cancel_gets_through_when_every_slot_is_taken_and_a_session_still_waits() {
    // Time enough to wait for a slot on a loaded machine.
    let longer = |t: String| t.replace("startup_timeout = \"2s\"", "startup_timeout = \"10s\"");
    let Some(w) = PgWorld::with_server("max_connections = 2", longer).await else { return };
    let token = w.w.token("bb", &[]);
    let apps = ("full-s16-a", "full-s16-b");
    let reap = || {
        let _ = w.pg.admin_sql(&format!(
            "select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name in ('{}', '{}')",
            apps.0, apps.1
        ));
    };
    let a = psql_in_background(&w, &token, apps.0, "select pg_sleep(30)");
    let _b = psql_in_background(&w, &token, apps.1, "select pg_sleep(30)");
    let busy = format!(
        "select count(*) from pg_stat_activity where application_name in ('{}', '{}') \
         and state = 'active'",
        apps.0, apps.1
    );
    let mut running = String::new();
    for _ in 0..100 {
        running = w.pg.admin_sql(&busy).unwrap_or_else(|e| panic!("{e}"));
        if running == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running, "2", "both slots taken by running statements");

    // A third session waits: every slot is taken.
    let mut third = psql_in_background(&w, &token, "full-s16-c", "select 'third'");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(third.try_wait().ok().flatten().is_none(), "the third session did not wait");

    // Ctrl-C on the first: psql sends its cancel request on a new connection.
    let pid = a.id().unwrap_or_else(|| panic!("psql exited")).to_string();
    let killed = std::process::Command::new("kill").args(["-INT", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    let out = tokio::time::timeout(Duration::from_secs(5), a.wait_with_output()).await;
    let out = out.unwrap_or_else(|_| {
        reap();
        panic!("the cancel request did not get through while every slot was taken")
    });
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("canceling statement due to user request"), "{stderr}");
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel").await;
    assert_eq!(ev["forwarded"], true, "{ev}");

    // The slot the cancelled session gave back goes to the session that waited.
    let out = tokio::time::timeout(Duration::from_secs(5), third.wait_with_output()).await;
    reap();
    let out = out.unwrap_or_else(|_| panic!("the waiting session never got a slot"));
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "third");
}

/// Gap 3 of session 17: with every slot taken and every seat held by a connection that
/// sends nothing, a CancelRequest waited in the kernel's backlog until `startup_timeout`
/// (10 s here) freed a seat. A seat now holds its connection for `SEAT_WAIT` only (psql
/// sends its packet at once): the cancel gets through within that, and the silent
/// connections are refused `overloaded`.
#[tokio::test]
async fn silent_connections_on_every_seat_delay_a_cancel_only_briefly() {
    let longer = |t: String| t.replace("startup_timeout = \"2s\"", "startup_timeout = \"10s\"");
    let Some(w) = PgWorld::with_server("max_connections = 1", longer).await else { return };
    let token = w.w.token("bb", &[]);
    let startup = crate::pg::startup("app", "appdb");
    let (mut t, key) = login_on(tls_to(&w).await, &token, &startup).await;
    send(&mut t, &[query(b"select 'seat-marker', pg_sleep(30)")]).await;
    w.until_running("seat-marker").await;
    let mut silent = Vec::new();
    for _ in 0..portcullis::postgres::SEATS {
        silent.push(TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}")));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    send_cancel(&mut c, &key).await;
    let m = tokio::time::timeout(Duration::from_secs(6), until_ready(&mut t)).await;
    let m = m.unwrap_or_else(|_| panic!("the cancel waited behind silent seats"));
    assert_eq!(error_code(&m).as_deref(), Some("57014"), "not cancelled: {m:?}");
    let waited = started.elapsed();
    assert!(
        waited < portcullis::postgres::SEAT_WAIT + Duration::from_secs(2),
        "the cancel took {waited:?}"
    );
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel").await;
    assert_eq!(ev["forwarded"], true, "{ev}");
    let ev = w
        .wait_event(|e| {
            e["reason"] == "overloaded" && e["detail"].as_str().is_some_and(|d| d.contains("seat"))
        })
        .await;
    assert_eq!(ev["event"], "refused", "{ev}");
    drop(silent);
}

/// The other side of the seats: sessions that come in while every slot is taken wait
/// for one off their seat, but only `WAITERS` of them; the next is refused at once with
/// PostgreSQL's own `53300`, and those waiting are refused with it too when
/// `startup_timeout` (2 s here) runs out, each with one `overloaded` event.
#[tokio::test]
async fn sessions_waiting_for_a_slot_are_bounded_and_the_next_is_refused_53300() {
    let Some(w) = PgWorld::with_server("max_connections = 1", |t| t).await else { return };
    let token = w.w.token("bb", &[]);
    let startup = crate::pg::startup("app", "appdb");
    let (_holds_the_slot, _) = login_on(tls_to(&w).await, &token, &startup).await;
    let mut waiting = Vec::new();
    for _ in 0..portcullis::postgres::WAITERS {
        let mut t = tls_to(&w).await;
        send(&mut t, std::slice::from_ref(&startup)).await;
        waiting.push(t);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut t = tls_to(&w).await;
    send(&mut t, std::slice::from_ref(&startup)).await;
    let got = all_until_close(&mut t).await;
    assert_eq!(error_code(&got).as_deref(), Some("53300"), "{}", kinds(&got));
    let ev = w
        .wait_event(|e| {
            e["event"] == "refused"
                && e["reason"] == "overloaded"
                && e["detail"].as_str().is_some_and(|d| d.contains("already waiting"))
        })
        .await;
    assert_eq!(ev["decision"], "deny", "{ev}");

    // Those waiting were never asked for a token, and are refused at startup_timeout,
    // told so as the 17th was (gap 1 of session 17: they were closed without a word).
    for t in &mut waiting {
        let got = all_until_close(t).await;
        assert_eq!(kinds(&got), "E", "a waiting session was served, or not told: {got:?}");
        assert_eq!(error_code(&got).as_deref(), Some("53300"));
        let text = String::from_utf8_lossy(&got[0].1).into_owned();
        assert!(text.contains("overloaded: too many connections"), "{text}");
    }
    let mut timed_out = 0;
    for _ in 0..40 {
        timed_out = w
            .events_of("pg.session")
            .await
            .into_iter()
            .filter(|e| {
                e["reason"] == "overloaded"
                    && e["detail"].as_str().is_some_and(|d| d.contains("stayed taken"))
            })
            .count();
        if timed_out == portcullis::postgres::WAITERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(timed_out, portcullis::postgres::WAITERS);
    // One event each, not one from the refusal and one from the set-up's timeout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let overloaded = w.events_of("pg.session").await;
    let overloaded = overloaded.iter().filter(|e| e["reason"] == "overloaded").count();
    assert_eq!(overloaded, portcullis::postgres::WAITERS + 1);
}

/// The routes `appdb` and `second` (the same but for the name), each on its own
/// listener, with `startup_timeout`s of `a` and `b`, and `server` in `[server]`.
async fn two_routes(server: &str, a: &str, b: &str) -> Option<PgWorld> {
    PgWorld::with_server(server, |t| {
        let timeout = |s: &str| format!("startup_timeout = \"{s}\"");
        let second = t
            .replacen("name = \"appdb\"", "name = \"second\"", 1)
            .replace(&timeout("2s"), &timeout(b));
        format!("{}\n{second}", t.replace(&timeout("2s"), &timeout(a)))
    })
    .await
}

/// Gap 1 of session 20: the seats were shared by every database listener, so silent
/// connections flooding one route's port (anyone who can reach it) took the seats a
/// cancel on another route needed: psql's Ctrl-C on `second` waited until a connection
/// of the flood on `appdb` was refused at `SEAT_WAIT` and gave its seat back (and with
/// more routes flooded, or cancels `appdb`'s upstream is slow to take, longer). Each
/// listener now has seats of its own: the cancel on `second` is served at once.
#[tokio::test]
async fn a_flood_on_one_database_listener_does_not_hold_up_a_cancel_on_another() {
    let Some(w) = two_routes("max_connections = 1", "10s", "10s").await else { return };
    let token = w.w.token("bb", &[]);
    let startup = crate::pg::startup("app", "appdb");
    let (mut t, key) = login_on(tls_at(&w, w.addr_of("second")).await, &token, &startup).await;
    send(&mut t, &[query(b"select 'flood-marker', pg_sleep(30)")]).await;
    w.until_running("flood-marker").await;
    // Twice as many silent connections on `appdb` as it has seats.
    let mut flood = Vec::new();
    for _ in 0..2 * portcullis::postgres::SEATS {
        flood.push(TcpStream::connect(w.addr_of("appdb")).await.unwrap_or_else(|e| panic!("{e}")));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(w.addr_of("second")).await.unwrap_or_else(|e| panic!("{e}"));
    send_cancel(&mut c, &key).await;
    let m = tokio::time::timeout(Duration::from_secs(8), until_ready(&mut t)).await;
    let m = m.unwrap_or_else(|_| panic!("the cancel on `second` never got through"));
    assert_eq!(error_code(&m).as_deref(), Some("57014"), "not cancelled: {m:?}");
    let waited = started.elapsed();
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel").await;
    assert_eq!((&ev["route"], &ev["forwarded"]), (&"second".into(), &true.into()), "{ev}");
    // The flood did hold `appdb`'s seats: its connections are refused at `SEAT_WAIT`.
    let seat_refusal = |e: &serde_json::Value| {
        e["reason"] == "overloaded" && e["detail"].as_str().is_some_and(|d| d.contains("seat"))
    };
    let ev = w.wait_event(seat_refusal).await;
    assert_eq!(ev["route"], "appdb", "{ev}");
    // The cancel did not wait for one of them to give its seat back.
    let events = w.w.events();
    let cancelled = events.iter().position(|e| e["kind"] == "pg.cancel");
    let first_refused = events.iter().position(seat_refusal);
    assert!(
        cancelled < first_refused,
        "the cancel on `second` waited {waited:?}, for a seat the flood on `appdb` gave back"
    );
    assert!(events.iter().filter(|e| seat_refusal(e)).all(|e| e["route"] == "appdb"));
    drop(flood);
}

/// Gap 2 of session 20, the same for sessions: the places to wait for a slot were shared
/// too, so startup packets flooding `appdb`'s port (no token is asked for before a
/// slot) got a session on `second` refused at once with `53300` while the proxy was
/// full. Each listener now has its own: the session on `second` waits, and gets the slot
/// that frees once the flood's sessions have given up (`appdb`'s `startup_timeout`).
#[tokio::test]
async fn startups_flooding_one_database_listener_leave_another_route_room_to_wait() {
    let Some(w) = two_routes("max_connections = 1", "2s", "10s").await else { return };
    let token = w.w.token("bb", &[]);
    let startup = crate::pg::startup("app", "appdb");
    let (holds_the_slot, _) =
        login_on(tls_at(&w, w.addr_of("second")).await, &token, &startup).await;
    let mut flood = Vec::new();
    for _ in 0..portcullis::postgres::WAITERS {
        let mut f = tls_at(&w, w.addr_of("appdb")).await;
        send(&mut f, std::slice::from_ref(&startup)).await;
        flood.push(f);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut t = tls_at(&w, w.addr_of("second")).await;
    send(&mut t, std::slice::from_ref(&startup)).await;
    // Every waiting place on `appdb` was taken: its sessions give up at its 2 s.
    for f in &mut flood {
        let got = all_until_close(f).await;
        assert_eq!(error_code(&got).as_deref(), Some("53300"), "{got:?}");
    }
    drop(holds_the_slot);
    let first = tokio::time::timeout(Duration::from_secs(6), next(&mut t)).await;
    let first = first.unwrap_or_else(|_| panic!("the session on `second` never got the slot"));
    let (k, body) = first.unwrap_or_else(|| panic!("the session on `second` was closed"));
    assert_eq!(k, b'R', "the session on `second` was refused: {}", String::from_utf8_lossy(&body));
    send(&mut t, &[message(b'p', &cstr(token.as_bytes()))]).await;
    let m = until_ready(&mut t).await;
    assert!(kinds(&m).ends_with('Z'), "{m:?}");
    let refused = w.events_of("pg.session").await;
    let refused: Vec<_> =
        refused.iter().filter(|e| e["event"] == "refused" && e["route"] == "second").collect();
    assert!(refused.is_empty(), "{refused:?}");
}

/// Gap 2 of session 17: a refused startup's `user` and `database` are the client's own
/// text, up to the startup packet's 10,000 bytes; the `refused` event (a plaintext
/// startup's, before any name check) carried them whole. Cut to PostgreSQL's 63 bytes
/// (NAMEDATALEN - 1), on a character boundary, as the server would read them.
#[tokio::test]
async fn a_refused_startups_user_and_database_are_cut_to_63_bytes_in_the_audit() {
    let Some(w) = PgWorld::start().await else { return };
    let user = format!("u{}", "é".repeat(2400));
    let database = "d".repeat(4800);
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let startup = proto::startup_message(&[("user", &user), ("database", &database)]);
    tcp.write_all(&startup).await.unwrap_or_else(|e| panic!("{e}"));
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    let ev = w.wait_event(|e| e["reason"] == "plaintext-refused").await;
    assert_eq!(ev["event"], "refused", "{ev}");
    // `u` and 31 two-byte characters: the 32nd would end at byte 64.
    assert_eq!(ev["role"].as_str(), Some(&user[..63]), "{ev}");
    assert_eq!(ev["database"].as_str(), Some(&database[..63]), "{ev}");
}

/// Pipelining across the authentication boundary: the startup packet, the token and a
/// Query in one write, before the proxy asked for the token. The Query is relayed once
/// the session is open, and audited; with a token the policy refuses, nothing of it
/// reaches the server or the statement audit.
#[tokio::test]
async fn a_query_pipelined_before_authentication_runs_only_in_an_admitted_session() {
    let Some(w) = PgWorld::start().await else { return };
    let startup = crate::pg::startup("app", "appdb");
    let pipelined = |token: &str, marker: &str| {
        vec![
            startup.clone(),
            message(b'p', &cstr(token.as_bytes())),
            query(format!("select '{marker}'").as_bytes()),
        ]
    };
    let mut t = tls_to(&w).await;
    send(&mut t, &pipelined(&w.w.token("bb", &[]), "pipelined-ok")).await;
    let mut got = until_ready(&mut t).await;
    got.extend(until_ready(&mut t).await);
    let rows: Vec<&Vec<u8>> = got.iter().filter(|(k, _)| *k == b'D').map(|(_, b)| b).collect();
    assert_eq!(rows.len(), 1, "{}", kinds(&got));
    assert!(rows[0].ends_with(b"pipelined-ok"), "{}", kinds(&got));
    let ev =
        w.wait_event(|e| e["kind"] == "pg.statement" && e["text"] == "select 'pipelined-ok'").await;
    assert_eq!(ev["upstream_role"], "migrator", "{ev}");

    // A token of an identity the policy does not admit: refused, the Query dropped.
    let stranger = w.w.token("bb", &["branchName=feature/x"]);
    let mut t = tls_to(&w).await;
    send(&mut t, &pipelined(&stranger, "pipelined-denied")).await;
    let got = all_until_close(&mut t).await;
    assert_eq!(error_code(&got).as_deref(), Some("28000"), "{}", kinds(&got));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leaked = w.w.events().into_iter().any(|e| {
        e["kind"] == "pg.statement"
            && e["text"].as_str().is_some_and(|t| t.contains("pipelined-denied"))
    });
    assert!(!leaked, "a refused session's pipelined Query was audited");
    assert_no_secrets(&w, &[]);
}
