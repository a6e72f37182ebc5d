use super::proto::{self, Initial, Scanner};

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    proto::message(kind, body)
}

#[test]
fn the_scanner_finds_boundaries_across_any_split() {
    let mut stream = Vec::new();
    stream.extend(msg(b'Q', b"select 1\0"));
    stream.extend(msg(b'P', b"s1\0select $1\0\0\0"));
    stream.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x06secret\0\0"));
    stream.extend(msg(b'S', b""));
    stream.extend(msg(b'd', &[7u8; 300]));
    for split in 1..stream.len() {
        let mut s = Scanner::client();
        let mut seen = Vec::new();
        let mut feed = |part: &[u8], s: &mut Scanner| {
            s.feed(part, |k, c| seen.push((k, c.map(|c| c.body.clone()))))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        feed(&stream[..split], &mut s);
        feed(&stream[split..], &mut s);
        assert!(s.at_boundary(), "split at {split}");
        let kinds: Vec<u8> = seen.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, b"QPBSd".to_vec(), "split at {split}");
        assert_eq!(seen[0].1.as_deref(), Some(&b"select 1\0"[..]));
        assert_eq!(seen[3].1, None, "Sync is not captured");
        assert_eq!(seen[4].1, None, "CopyData is not captured");
    }
}

#[test]
fn the_scanner_rejects_bad_lengths_and_caps_captures() {
    let mut s = Scanner::client();
    assert!(s.feed(&[b'Q', 0, 0, 0, 3], |_, _| {}).is_err());
    let mut s = Scanner::client();
    assert!(s.feed(&[b'Q', 0x7f, 0xff, 0xff, 0xff], |_, _| {}).is_err(), "over 1 GiB");
    let big = vec![b'a'; proto::MAX_AUDIT_TEXT + 1000];
    let mut s = Scanner::client();
    let mut got = None;
    s.feed(&msg(b'Q', &big), |_, c| got = c.map(|c| (c.body.clone(), c.truncated)))
        .unwrap_or_else(|e| panic!("{e}"));
    let c = got.unwrap_or_else(|| panic!("captured"));
    assert!(c.1);
    assert!(c.0.len() <= proto::MAX_AUDIT_TEXT + 256);
    let mut s = Scanner::server();
    s.feed(&msg(b'D', b"abc")[..6], |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
    assert!(!s.at_boundary());
    assert_eq!(s.needed(), 2);
}

#[test]
fn the_client_scanner_refuses_what_postgres_never_reads_from_a_client() {
    // A type no frontend message has: refused at its type byte, before its length.
    for kind in [b'z', b'V', b'R', b'T', 0] {
        let mut s = Scanner::client();
        assert!(s.feed(&[kind], |_, _| {}).is_err(), "type {kind}");
        // The server's scanner relays any type.
        let mut s = Scanner::server();
        assert!(s.feed(&msg(kind, b""), |_, _| {}).is_ok(), "type {kind}");
    }
    // What came whole before it is reported, with where it ended.
    let mut s = Scanner::client();
    let mut seen = Vec::new();
    let q = msg(b'Q', b"select 1\0");
    let stream = [q.clone(), msg(b'z', b""), msg(b'Q', b"select 2\0")].concat();
    assert!(s.feed_at(&stream, |k, _, end| seen.push((k, end))).is_err());
    assert_eq!(seen, vec![(b'Q', q.len())]);
    // PostgreSQL's limits per type: 10,000 for the messages that carry no data.
    for kind in [b'C', b'D', b'E', b'H', b'S', b'X', b'c', b'f'] {
        let mut s = Scanner::client();
        assert!(s.feed(&msg(kind, &[0; 9_996]), |_, _| {}).is_ok(), "type {kind}");
        let mut s = Scanner::client();
        assert!(s.feed(&msg(kind, &[0; 9_997]), |_, _| {}).is_err(), "type {kind}");
    }
    for kind in [b'Q', b'F', b'B', b'P', b'd'] {
        let mut s = Scanner::client();
        let mut hdr = vec![kind];
        hdr.extend_from_slice(&(20_000u32).to_be_bytes());
        assert!(s.feed(&hdr, |_, _| {}).is_ok(), "type {kind}");
        let mut s = Scanner::client();
        let mut hdr = vec![kind];
        hdr.extend_from_slice(&(0x3FFF_FFFFu32).to_be_bytes());
        assert!(s.feed(&hdr, |_, _| {}).is_err(), "type {kind}: over PostgreSQL's 1 GiB - 2");
    }
}

#[tokio::test]
async fn startup_packets_parse_and_bad_ones_fail() {
    let m = proto::startup_message(&[("user", "app"), ("database", "db")]);
    match proto::read_initial(&mut &m[..]).await {
        Ok(Initial::Startup { minor: 0, params }) => {
            assert_eq!(
                params,
                vec![("user".into(), "app".into()), ("database".into(), "db".into())]
            );
        }
        other => panic!("{other:?}"),
    }
    let ssl = proto::startup_packet(proto::SSL_REQUEST, &[]);
    assert!(matches!(proto::read_initial(&mut &ssl[..]).await, Ok(Initial::Ssl)));
    let gss = proto::startup_packet(proto::GSSENC_REQUEST, &[]);
    assert!(matches!(proto::read_initial(&mut &gss[..]).await, Ok(Initial::GssEnc)));
    let c = proto::cancel_request(7, 9);
    assert!(matches!(
        proto::read_initial(&mut &c[..]).await,
        Ok(Initial::Cancel { pid: 7, secret: 9 })
    ));
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert!(matches!(
        proto::read_initial(&mut &http[..]).await,
        Err(proto::ReadError::Protocol(_))
    ));
    let v2 = proto::startup_packet(0x0002_0000, b"user\0x\0\0");
    assert!(matches!(proto::read_initial(&mut &v2[..]).await, Err(proto::ReadError::Protocol(_))));
    let dup = proto::startup_message(&[("user", "a"), ("user", "b")]);
    assert!(matches!(proto::read_initial(&mut &dup[..]).await, Err(proto::ReadError::Protocol(_))));
    let short = &m[..m.len() - 1];
    assert!(matches!(proto::read_initial(&mut &short[..]).await, Err(proto::ReadError::Closed)));
}

#[test]
fn error_responses_carry_severity_code_and_message() {
    let e = proto::error_response(proto::Severity::Fatal, "28P01", "portcullis: invalid-token");
    assert_eq!(e[0], b'E');
    let f = proto::parse_fields(&e[5..]);
    assert_eq!(f.get(&b'S').map(String::as_str), Some("FATAL"));
    assert_eq!(f.get(&b'C').map(String::as_str), Some("28P01"));
    assert_eq!(f.get(&b'M').map(String::as_str), Some("portcullis: invalid-token"));
}

#[test]
fn cancel_keys_map_to_their_session_only_with_the_right_secret() {
    use std::sync::Arc;
    let map = Arc::new(super::cancel::CancelMap::default());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = Arc::new(test_db(dir.path()));
    let g = map
        .register(super::cancel::CancelTarget {
            db,
            tls: None,
            pid: 42,
            secret: 43,
            session_id: Arc::from("s1"),
        })
        .unwrap_or_else(|| panic!("no key minted"));
    assert!(map.lookup(g.pid, g.secret).is_some_and(|t| t.pid == 42 && t.secret == 43));
    assert!(map.lookup(g.pid, g.secret ^ 1).is_none());
    assert_eq!(map.len(), 1);
    drop(g);
    assert!(map.is_empty());
}

/// A random source that fails, or that keeps giving a pid already taken (or 0), ends the
/// minting of a cancel key with `None` (the session is refused) instead of spinning under
/// the map's lock for ever, which stalled every session's start and every cancel.
#[test]
fn a_broken_random_source_mints_no_cancel_key_and_does_not_spin() {
    use std::sync::Arc;
    let map = Arc::new(super::cancel::CancelMap::default());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = Arc::new(test_db(dir.path()));
    let target = || super::cancel::CancelTarget {
        db: db.clone(),
        tls: None,
        pid: 42,
        secret: 43,
        session_id: Arc::from("s1"),
    };
    let mut draws = 0;
    let failing = map.register_with(target(), |_| {
        draws += 1;
        Err(())
    });
    assert!(failing.is_none());
    assert_eq!(draws, 1, "a failed draw is not retried");
    // All zeros: pid 0, never a key; the same bytes each time.
    let mut draws = 0;
    let zeros = map.register_with(target(), |b| {
        draws += 1;
        b.fill(0);
        Ok(())
    });
    assert!(zeros.is_none());
    assert!((2..=1000).contains(&draws), "{draws} draws");
    // Always the pid of an open session.
    let open = map.register_with(target(), |b| {
        b.copy_from_slice(&[0, 0, 0, 7, 1, 2, 3, 4]);
        Ok(())
    });
    let open = open.unwrap_or_else(|| panic!("the first draw of pid 7 is free"));
    assert_eq!((open.pid, open.secret), (7, 0x0102_0304));
    let again = map.register_with(target(), |b| {
        b.copy_from_slice(&[0, 0, 0, 7, 9, 9, 9, 9]);
        Ok(())
    });
    assert!(again.is_none());
    assert_eq!(map.len(), 1);
    assert!(map.register(target()).is_some(), "the real source mints a key");
}

fn test_db(dir: &std::path::Path) -> crate::config::DatabaseSettings {
    let src = crate::diag::Source::new(
        dir.join("p.toml"),
        "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\ndatabases = \"app\"\n",
    );
    let mut cat = crate::policy::Catalog::default();
    cat.declare("corp", crate::identity::Preset::Oidc);
    let policy = crate::policy::Policy::parse(&src, &cat).unwrap_or_else(|e| panic!("{e:?}"));
    crate::config::DatabaseSettings {
        name: "db".into(),
        listen: ([127, 0, 0, 1], 0).into(),
        host: "127.0.0.1".into(),
        port: 5432,
        upstream_display: "127.0.0.1:5432".into(),
        upstream_tls: crate::config::UpstreamTls::Disable,
        upstream_ca: None,
        upstream_user: "app".into(),
        password: crate::config::Secret::new("pw"),
        upstream_roles: Default::default(),
        policy: std::sync::Arc::new(policy),
        max_session: None,
        startup_timeout: std::time::Duration::from_secs(1),
        connect_timeout: std::time::Duration::from_secs(1),
        startup_parameters: Vec::new(),
        session_id_in_application_name: false,
    }
}

#[test]
fn secrets_do_not_debug_print() {
    let s = crate::config::Secret::new("hunter2");
    assert_eq!(format!("{s:?}"), "[redacted]");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = test_db(dir.path());
    assert!(!format!("{db:?}").contains("pw\""));
}

// === `[[databases]]` in the configuration ===

fn compile_db(
    dir: &std::path::Path,
    db: &str,
    policy: &str,
) -> Result<crate::config::Config, Vec<String>> {
    std::fs::create_dir_all(dir.join("policies")).ok();
    std::fs::write(dir.join("policies/db.toml"), policy).ok();
    std::fs::write(dir.join("pw"), "s3cret-from-file\n").ok();
    // Copies of the dev certificate, which a test may then replace.
    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev");
    for f in ["server.pem", "server-key.pem"] {
        std::fs::copy(certs.join(f), dir.join(f)).ok();
    }
    let text = format!(
        "[tls]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n\n[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"portcullis\"]\n\n{db}"
    );
    let src = crate::diag::Source::new(dir.join("portcullis.toml"), text);
    crate::config::Config::compile(&src)
        .map_err(|e| e.0.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect())
}

const DB_POLICY: &str = "[[rule]]\nid = \"eng\"\neffect = \"allow\"\nissuer = \"corp\"\ndatabases = \"app\"\nupstream_role = \"readonly\"\n";

#[test]
fn a_database_only_config_compiles_without_an_http_listener() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = compile_db(
        dir.path(),
        "[[databases]]\nname = \"app\"\nlisten = \"127.0.0.1:6432\"\nupstream = \"postgres://db.internal:5433\"\nupstream_tls = \"verify-full\"\nupstream_user = \"portcullis\"\npassword_file = \"pw\"\npolicy = \"db\"\nmax_session = \"8h\"\n[databases.upstream_roles.readonly]\npassword_file = \"pw\"\n",
        DB_POLICY,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let d = &c.databases[0];
    assert_eq!((d.host.as_str(), d.port), ("db.internal", 5433));
    assert_eq!(d.upstream_tls, crate::config::UpstreamTls::VerifyFull);
    assert_eq!(d.password.expose(), "s3cret-from-file");
    assert_eq!(d.password_for("readonly").map(|s| s.expose()), Some("s3cret-from-file"));
    assert!(d.password_for("postgres").is_none());
    assert_eq!(d.max_session, Some(std::time::Duration::from_secs(8 * 3600)));
    assert_eq!(d.startup_timeout, std::time::Duration::from_secs(10));
    assert!(c.listen.https.is_none());
    assert!(!format!("{c:?}").contains("s3cret"), "Debug never prints a password");
    assert!(c.files.iter().any(|f| f.ends_with("pw")), "password files are watched for reload");
}

/// The database listeners serve the certificates the HTTPS listener's configuration was
/// built from: `prepare` reads no certificate file, so one replaced (or gone) after
/// that read changes nothing, and both listeners serve the same certificate.
#[test]
fn prepare_serves_the_certificates_already_read_and_reads_none() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = compile_db(
        dir.path(),
        "[[databases]]\nname = \"app\"\nlisten = \"127.0.0.1:6432\"\nupstream = \"postgres://db.internal:5433\"\nupstream_user = \"portcullis\"\npassword_file = \"pw\"\npolicy = \"db\"\n",
        &DB_POLICY.replace("upstream_role = \"readonly\"\n", ""),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let serving = crate::server::tls_config(&c).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("server.pem"), "not a certificate").ok();
    std::fs::remove_file(dir.path().join("server-key.pem")).ok();
    let prepared = super::prepare(&c, serving.keys.as_ref()).unwrap_or_else(|e| panic!("{e}"));
    let tls = prepared.tls.unwrap_or_else(|| panic!("the database listeners have TLS"));
    assert_eq!(tls.alpn_protocols, [super::ALPN_POSTGRESQL.to_vec()]);
    // Nothing loaded (no `[tls]`): no listener TLS either.
    assert!(super::prepare(&c, None).unwrap_or_else(|e| panic!("{e}")).tls.is_none());
}

#[test]
fn database_mistakes_are_all_reported_with_their_position() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let errors = compile_db(
        dir.path(),
        "[[databases]]\nname = \"app\"\nlisten = \"127.0.0.1:6432\"\nupstream = \"postgres://u:p@db:5432\"\nupstream_user = \"portcullis\"\npassword_env = \"PORTCULLIS_TEST_SURELY_UNSET_VAR\"\npolicy = \"db\"\n\n[[databases]]\nname = \"two\"\nlisten = \"127.0.0.1:6433\"\nupstream = \"postgres://db\"\nupstream_tls = \"sometimes\"\nupstream_user = \"portcullis\"\npassword_env = \"X\"\npassword_file = \"pw\"\npolicy = \"db\"\n\n[[databases]]\nname = \"three\"\nlisten = \"127.0.0.1:6434\"\nupstream = \"postgres://db\"\nupstream_user = \"portcullis\"\npassword = \"inline\"\npolicy = \"db\"\n",
        DB_POLICY,
    )
    .err()
    .unwrap_or_default();
    let has = |pos: &str, text: &str| errors.iter().any(|e| e.starts_with(pos) && e.contains(text));
    assert!(has("12:12", "must not carry credentials"), "{errors:?}");
    assert!(has("14:16", "`PORTCULLIS_TEST_SURELY_UNSET_VAR` is not set"), "{errors:?}");
    assert!(has("15:10", "grants upstream_role `readonly`"), "{errors:?}");
    assert!(has("21:16", "unknown upstream_tls `sometimes`"), "{errors:?}");
    assert!(has("24:17", "either `password_env` or `password_file`"), "{errors:?}");
    assert!(has("32:1", "unknown field `password`"), "{errors:?}");
    assert!(!errors.iter().any(|e| e.contains("inline")), "never echo a value");
}

#[test]
fn databases_need_tls() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(dir.path().join("policies")).ok();
    std::fs::write(
        dir.path().join("policies/db.toml"),
        DB_POLICY.replace("upstream_role = \"readonly\"\n", ""),
    )
    .ok();
    std::fs::write(dir.path().join("pw"), "x").ok();
    let src = crate::diag::Source::new(
        dir.path().join("portcullis.toml"),
        "[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"p\"]\n\n[[databases]]\nname = \"app\"\nlisten = \"127.0.0.1:6432\"\nupstream = \"postgres://db\"\nupstream_user = \"u\"\npassword_file = \"pw\"\npolicy = \"db\"\n",
    );
    let errors = crate::config::Config::compile(&src).err().map(|e| e.0).unwrap_or_default();
    assert!(
        errors.iter().any(|d| d.line == 6 && d.message.contains("need a [tls] section")),
        "{errors:?}"
    );
}

/// After the relay, the server's answers still resolve what was relayed (round 10: a
/// Bind sent with Terminate in the same write); a server that stays silent is given up
/// on in bounded time, and what is unanswered then is audited as `unknown`.
#[tokio::test(start_paused = true)]
async fn settle_reads_the_answers_after_the_session_and_gives_up_in_time() {
    use std::time::Duration;

    use parking_lot::Mutex;
    use tokio::io::AsyncWriteExt;

    use super::session::{settle, ORPHAN_GRACE, SETTLE_AFTER_CANCEL};
    use super::statements::{Record, Tracker};

    let relayed = [
        msg(b'P', b"\0insert into t values (1)\0\0\0"),
        msg(b'B', b"\0\0\0\0\0\0\0\0"),
        msg(b'E', b"\0\0\0\0\0"),
        msg(b'S', b""),
        msg(b'X', b""),
    ]
    .concat();
    let answers = [msg(b'1', b""), msg(b'2', b""), msg(b'C', b"INSERT 0 1\0"), msg(b'Z', b"I")];
    for (answered, silent) in [(&answers[..], false), (&answers[..1], true)] {
        let tracker = Mutex::new(Tracker::new());
        let events: Mutex<Vec<(Option<String>, Option<&'static str>)>> = Mutex::new(Vec::new());
        let emit = |r: Record<'_>| events.lock().push((r.text.map(str::to_string), r.outcome));
        Scanner::client()
            .feed(&relayed, |k, c| tracker.lock().client(k, c, &mut &emit))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(events.lock().is_empty());
        let (mut server, mut upstream) = tokio::io::duplex(4096);
        server.write_all(&answered.concat()).await.unwrap_or_else(|e| panic!("{e}"));
        let on_server =
            |k: u8, c: Option<&proto::Captured>| tracker.lock().server(k, c, &mut &emit);
        let started = tokio::time::Instant::now();
        let mut scan = Scanner::server();
        let settled =
            settle(&mut upstream, &mut scan, &on_server, &tracker, None, ORPHAN_GRACE).await;
        assert_eq!(settled.cancels, 0, "no backend key, no cancel");
        assert_eq!(settled.unsettled, silent);
        if silent {
            assert_eq!(started.elapsed(), ORPHAN_GRACE + SETTLE_AFTER_CANCEL);
            assert!(events.lock().is_empty());
            tracker.lock().finish(&mut &emit);
            assert_eq!(
                *events.lock(),
                vec![(Some("insert into t values (1)".to_string()), Some("unknown"))]
            );
        } else {
            assert!(started.elapsed() < Duration::from_millis(10), "no waiting once answered");
            assert_eq!(*events.lock(), vec![(Some("insert into t values (1)".to_string()), None)]);
            assert!(!tracker.lock().in_flight());
        }
        drop(server);
    }
}

/// Round 10: statements queued behind the one running (a client pipelining eight
/// endless loops) start one after another as each is cancelled. The end of the session
/// waits on while the server keeps answering, past `SETTLE_AFTER_CANCEL` from the first
/// cancel, so each gets its cancel and its answer is audited; only a server silent for
/// that long (or `MAX_SETTLE`) ends the wait.
#[tokio::test(start_paused = true)]
async fn settle_waits_on_while_queued_statements_are_answered_one_by_one() {
    use std::time::Duration;

    use parking_lot::Mutex;
    use tokio::io::AsyncWriteExt;

    use super::session::{settle, MAX_SETTLE, ORPHAN_GRACE, SETTLE_AFTER_CANCEL};
    use super::statements::{Record, Tracker};

    let queries = 5;
    let relayed: Vec<u8> =
        (0..queries).flat_map(|_| msg(b'Q', b"do $$ begin loop end loop; end $$\0")).collect();
    let tracker = Mutex::new(Tracker::new());
    let emit = |_: Record<'_>| {};
    Scanner::client()
        .feed(&relayed, |k, c| tracker.lock().client(k, c, &mut &emit))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(tracker.lock().in_flight());
    let (mut server, mut upstream) = tokio::io::duplex(4096);
    // Each statement ends (as its cancel stops it) well after the previous one, each gap
    // shorter than SETTLE_AFTER_CANCEL, all of them together longer.
    let gap = SETTLE_AFTER_CANCEL - Duration::from_millis(300);
    let answers = tokio::spawn(async move {
        tokio::time::sleep(ORPHAN_GRACE).await;
        for _ in 0..queries {
            tokio::time::sleep(gap).await;
            let canceled = [
                msg(b'E', b"SERROR\0C57014\0Mcanceling statement due to user request\0\0"),
                msg(b'Z', b"I"),
            ];
            server.write_all(&canceled.concat()).await.unwrap_or_else(|e| panic!("{e}"));
        }
        server
    });
    let on_server = |k: u8, c: Option<&proto::Captured>| tracker.lock().server(k, c, &mut &emit);
    let started = tokio::time::Instant::now();
    let mut scan = Scanner::server();
    let settled = settle(&mut upstream, &mut scan, &on_server, &tracker, None, ORPHAN_GRACE).await;
    assert!(!settled.unsettled, "gave up with statements queued: {settled:?}");
    assert!(!tracker.lock().in_flight());
    let took = started.elapsed();
    assert!(took >= ORPHAN_GRACE + gap * queries, "{took:?}");
    assert!(took < ORPHAN_GRACE + MAX_SETTLE, "{took:?}");
    drop(answers.await);
}

/// PostgreSQL's NegotiateProtocolVersion names the newest version it speaks for the major
/// version asked for, as a whole version number (3.0 is 196608, `PG_PROTOCOL_LATEST`):
/// libpq 18, asked for 3.2 (`max_protocol_version`), refuses anything below 3.0 as "a
/// downgrade to pre-3.0". portcullis sent 0.
#[test]
fn negotiate_protocol_version_names_3_0_as_postgresql_does() {
    let m = proto::negotiate_protocol_version(&["_pq_.x"]);
    assert_eq!(m[0], b'v');
    assert_eq!(m[5..9], proto::PROTOCOL_3_0.to_be_bytes());
    assert_eq!(m[9..13], 1u32.to_be_bytes());
    assert_eq!(&m[13..], b"_pq_.x\0");
}
