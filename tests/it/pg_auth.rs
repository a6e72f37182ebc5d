//! The upstream leg against the real PostgreSQL server of `pg`: md5 and cleartext
//! password authentication, and upstream TLS (`require`, `verify-full`, `disable`).
//!
//! The server's pg_hba.conf gives `md5_user` md5, `clear_user` cleartext (`password`) and
//! `tls_user` `hostssl` only; its certificate names `localhost` only (see `pg`). Plain
//! upstream connections that matter go through a [`Tap`], a forwarder that records what
//! each side sent, so the tests see which authentication request the server made and
//! whether a password crossed the wire in the clear.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::pg::*;
use crate::support::*;

/// Pipelines on main may use `appdb` as `app`; no `upstream_role`, so each route's
/// `upstream_user` is who portcullis logs in as.
fn policy() -> String {
    format!(
        "[[rule]]\nid = \"pipelines-main\"\neffect = \"allow\"\nissuer = \"bb\"\n\
         ci = {{ repository = \"{BB_REPO}\", branch = \"main\" }}\n\
         databases = [\"appdb\"]\nroles = [\"app\"]\n"
    )
}

const WRONG_PW: &str = "wrong-Pw-0c6e29";

/// AuthenticationMD5Password and AuthenticationCleartextPassword, as the server sends them
/// (the md5 salt follows).
const ASKS_MD5: &[u8] = &[b'R', 0, 0, 0, 12, 0, 0, 0, 5];
const ASKS_CLEARTEXT: &[u8] = &[b'R', 0, 0, 0, 8, 0, 0, 0, 3];

/// A `[[databases]]` route to `upstream` as `user`, whose password file (in `secrets`)
/// holds `password`.
fn route(secrets: &Path, name: &str, upstream: &str, user: &str, password: &str) -> String {
    route_with(secrets, name, upstream, user, password, "")
}

fn route_with(
    secrets: &Path,
    name: &str,
    upstream: &str,
    user: &str,
    password: &str,
    extra: &str,
) -> String {
    let file = secrets.join(name);
    write(&file, &format!("{password}\n"));
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        "[[databases]]\nname = {}\nlisten = \"127.0.0.1:0\"\nupstream = {}\nupstream_user = {}\n\
         password_file = {}\npolicy = \"pg\"\nstartup_timeout = \"5s\"\n{extra}\n\n",
        q(name),
        q(&format!("postgres://{upstream}")),
        q(user),
        q(&file.to_string_lossy()),
    )
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The types of the messages a client sent after its StartupMessage.
fn message_types(sent: &[u8]) -> Vec<u8> {
    let len = |b: &[u8]| b.get(..4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    let mut rest = sent.get(len(sent).unwrap_or(sent.len())..).unwrap_or_default();
    let mut types = Vec::new();
    while let (Some(&t), Some(n)) = (rest.first(), len(rest.get(1..).unwrap_or_default())) {
        types.push(t);
        rest = rest.get(1 + n..).unwrap_or_default();
    }
    types
}

// === a recording forwarder ===

/// Forwards TCP from `addr` to the PostgreSQL server and records both directions.
struct Tap {
    addr: SocketAddr,
    to_server: Arc<Mutex<Vec<u8>>>,
    to_client: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tap {
    async fn start(ip: IpAddr, pg_port: u16) -> Tap {
        let l = TcpListener::bind((ip, 0)).await.unwrap_or_else(|e| panic!("tap on {ip}: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let to_server = Arc::new(Mutex::new(Vec::new()));
        let to_client = Arc::new(Mutex::new(Vec::new()));
        let (ts, tc) = (to_server.clone(), to_client.clone());
        let task = tokio::spawn(async move {
            while let Ok((c, peer)) = l.accept().await {
                // Only this host: the forwarded connection reaches the server from loopback.
                if peer.ip() != ip {
                    continue;
                }
                let Ok(s) = TcpStream::connect(("127.0.0.1", pg_port)).await else { continue };
                let (cr, cw) = c.into_split();
                let (sr, sw) = s.into_split();
                tokio::spawn(pump(cr, sw, ts.clone()));
                tokio::spawn(pump(sr, cw, tc.clone()));
            }
        });
        Tap { addr, to_server, to_client, task }
    }

    fn upstream(&self) -> String {
        self.addr.to_string()
    }

    fn to_server(&self) -> Vec<u8> {
        self.to_server.lock().map(|b| b.clone()).unwrap_or_default()
    }

    fn to_client(&self) -> Vec<u8> {
        self.to_client.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    log: Arc<Mutex<Vec<u8>>>,
) {
    let mut b = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut b).await {
        if n == 0 {
            break;
        }
        if let Ok(mut l) = log.lock() {
            l.extend_from_slice(&b[..n]);
        }
        if w.write_all(&b[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// An IPv4 address of this host that is not loopback and can be bound, if there is one.
fn non_loopback_ip() -> Option<IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the outgoing address.
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|u| u.connect("203.0.113.1:9").and_then(|()| u.local_addr()))
        .map(|a| a.ip())
        .ok();
    let listed = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    routed
        .into_iter()
        .chain(listed.split_whitespace().filter_map(|s| s.parse::<IpAddr>().ok()))
        .find(|ip| {
            ip.is_ipv4()
                && !ip.is_loopback()
                && !ip.is_unspecified()
                && std::net::TcpListener::bind((*ip, 0)).is_ok()
        })
}

// === clients ===

/// Runs `sql` through the database route `route`; the first column of each row.
async fn query(
    w: &PgWorld,
    route: &str,
    token: &str,
    sql: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let config = w.pg_config_at(w.addr_of(route), token, "app");
    let (client, conn) = tokio::time::timeout(Duration::from_secs(20), config.connect(w.tls()))
        .await
        .unwrap_or_else(|_| panic!("{route}: connecting through the proxy hung"))?;
    let conn = tokio::spawn(conn);
    let msgs = tokio::time::timeout(Duration::from_secs(20), client.simple_query(sql))
        .await
        .unwrap_or_else(|_| panic!("{route}: query hung"))?;
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect())
}

/// `select current_user, <TLS in use upstream>` through `route`.
async fn who_and_ssl(w: &PgWorld, route: &str, token: &str) -> (String, String) {
    let rows = query(
        w,
        route,
        token,
        "select current_user || ' ' || ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .await
    .unwrap_or_else(|e| panic!("{route}: {e}"));
    let row = rows.first().cloned().unwrap_or_else(|| panic!("{route}: no row"));
    let (who, ssl) = row.split_once(' ').unwrap_or_else(|| panic!("{route}: {row}"));
    (who.to_string(), ssl.to_string())
}

/// Connecting through `route` fails promptly with FATAL 08006 `upstream-unavailable`
/// and a request id, whose `refused` audit event is returned.
async fn refused(w: &PgWorld, route: &str, token: &str, secrets: &[&str]) -> serde_json::Value {
    let err = match query(w, route, token, "select 1").await {
        Ok(rows) => panic!("{route}: connected and got {rows:?}"),
        Err(e) => e,
    };
    let db = err.as_db_error().unwrap_or_else(|| panic!("{route}: not a PostgreSQL error: {err}"));
    assert_eq!(db.severity(), "FATAL", "{route}");
    assert_eq!(db.code().code(), "08006", "{route}: {}", db.message());
    let msg = db.message();
    assert!(msg.contains("upstream-unavailable") && msg.contains("request id"), "{route}: {msg}");
    for s in secrets.iter().chain([&token]) {
        assert!(!format!("{err:?} {msg}").contains(s), "{route}: the client error holds a secret");
    }
    let rid = msg.rsplit("request id ").next().unwrap_or("").trim_end_matches(')').to_string();
    let ev = w.wait_event(|e| e["kind"] == "pg.session" && e["session_id"] == rid.as_str()).await;
    assert_eq!(ev["event"], "refused", "{route}: {ev}");
    assert_eq!(ev["decision"], "deny", "{route}: {ev}");
    assert_eq!(ev["reason"], "upstream-unavailable", "{route}: {ev}");
    ev
}

fn detail(ev: &serde_json::Value) -> &str {
    ev["detail"].as_str().unwrap_or_default()
}

/// Neither the audit output nor the server's log holds any of `secrets`.
fn assert_secrets_kept(w: &PgWorld, secrets: &[&str]) {
    assert_no_secrets(w, secrets);
    let log = std::fs::read_to_string(w.pg.dir.join("server.log")).unwrap_or_default();
    assert!(!log.is_empty(), "the server log is readable");
    for s in secrets {
        assert!(!log.contains(s), "the server log holds a secret ({} chars)", s.len());
    }
}

// === tests ===

#[tokio::test]
async fn md5_upstream_auth_against_a_real_server_and_a_wrong_password_is_a_clean_error() {
    let Some(pg) = pg() else { return };
    // The role's password is stored as md5, so the server cannot fall back to SCRAM.
    let stored = pg
        .admin_sql(&format!(
            "select rolpassword like 'md5%' from pg_authid where rolname = '{MD5_ROLE}'"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, "t", "md5_user's password is stored as md5");
    let tap = Tap::start(IpAddr::from([127, 0, 0, 1]), pg.port).await;
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = secrets.path();
    let direct = format!("127.0.0.1:{}", pg.port);
    let routes = [
        route(s, "md5", &tap.upstream(), MD5_ROLE, MD5_PW),
        route(s, "md5-wrong", &direct, MD5_ROLE, WRONG_PW),
    ]
    .concat();
    let w = PgWorld::build(pg, secrets, routes, &policy()).await;
    let token = w.w.token("bb", &[]);

    let (who, ssl) = who_and_ssl(&w, "md5", &token).await;
    assert_eq!((who.as_str(), ssl.as_str()), ("md5_user", "false"));
    // The server asked for md5 and got a salted hash ("md5" + 32 hex), never the password.
    assert!(contains(&tap.to_client(), ASKS_MD5), "the server asked for md5");
    let sent = tap.to_server();
    assert!(contains(&sent, b"p\0\0\0\x28md5"), "an md5 PasswordMessage went upstream");
    assert!(!contains(&sent, MD5_PW.as_bytes()), "the password itself never went upstream");
    let open = w.wait_event(|e| e["event"] == "open" && e["route"] == "md5").await;
    assert_eq!(open["upstream_role"], MD5_ROLE);

    let ev = refused(&w, "md5-wrong", &token, &[MD5_PW, WRONG_PW]).await;
    assert!(
        detail(&ev).contains("upstream authentication failed: 28P01")
            && detail(&ev).contains("password authentication failed for user \"md5_user\""),
        "{ev}"
    );
    assert_eq!(ev["upstream_role"], MD5_ROLE);
    assert_secrets_kept(&w, &[MD5_PW, WRONG_PW, &token]);
}

#[tokio::test]
async fn cleartext_upstream_auth_over_loopback_or_tls_and_never_in_the_clear_elsewhere() {
    let Some(pg) = pg() else { return };
    let tap = Tap::start(IpAddr::from([127, 0, 0, 1]), pg.port).await;
    // The same server behind a non-loopback address of this host, if it has one.
    let remote = match non_loopback_ip() {
        Some(ip) => Some((Tap::start(ip, pg.port).await, Tap::start(ip, pg.port).await)),
        None => {
            eprintln!("SKIPPED (part): no non-loopback address to reach PostgreSQL through");
            None
        }
    };
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = secrets.path();
    let direct = format!("127.0.0.1:{}", pg.port);
    let mut routes = [
        route(s, "clear", &tap.upstream(), CLEAR_ROLE, CLEAR_PW),
        route(s, "clear-wrong", &direct, CLEAR_ROLE, WRONG_PW),
    ]
    .concat();
    if let Some((plain, tls)) = &remote {
        routes.push_str(&route(s, "clear-remote", &plain.upstream(), CLEAR_ROLE, CLEAR_PW));
        routes.push_str(&route_with(
            s,
            "clear-remote-tls",
            &tls.upstream(),
            CLEAR_ROLE,
            CLEAR_PW,
            "upstream_tls = \"require\"",
        ));
    }
    let w = PgWorld::build(pg, secrets, routes, &policy()).await;
    let token = w.w.token("bb", &[]);

    // Loopback: the server asks for the password in the clear and gets it.
    let (who, ssl) = who_and_ssl(&w, "clear", &token).await;
    assert_eq!((who.as_str(), ssl.as_str()), ("clear_user", "false"));
    assert!(contains(&tap.to_client(), ASKS_CLEARTEXT), "the server asked for cleartext");
    let mut pw_message = vec![b'p'];
    pw_message.extend((4 + CLEAR_PW.len() as u32 + 1).to_be_bytes());
    pw_message.extend(CLEAR_PW.as_bytes());
    assert!(contains(&tap.to_server(), &pw_message), "the cleartext PasswordMessage went upstream");

    let ev = refused(&w, "clear-wrong", &token, &[CLEAR_PW, WRONG_PW]).await;
    assert!(
        detail(&ev).contains("upstream authentication failed: 28P01")
            && detail(&ev).contains("password authentication failed for user \"clear_user\""),
        "{ev}"
    );

    if let Some((plain, tls)) = &remote {
        // Plain TCP to a non-loopback address: the server asks, portcullis refuses to answer.
        let ev = refused(&w, "clear-remote", &token, &[CLEAR_PW]).await;
        assert!(
            detail(&ev).contains("cleartext password over an unencrypted, non-loopback connection"),
            "{ev}"
        );
        assert!(contains(&plain.to_client(), ASKS_CLEARTEXT), "the server did ask");
        let sent = plain.to_server();
        assert!(!contains(&sent, CLEAR_PW.as_bytes()), "the password never went upstream");
        assert!(!message_types(&sent).contains(&b'p'), "no PasswordMessage at all: {sent:?}");
        // Over TLS whose certificate is not verified (`require`) the server is not known
        // to be the server: cleartext is refused too, and nothing is sent.
        let ev = refused(&w, "clear-remote-tls", &token, &[CLEAR_PW]).await;
        assert!(
            detail(&ev).contains("cleartext") && detail(&ev).contains("SCRAM-SHA-256-PLUS"),
            "{ev}"
        );
        let sent = tls.to_server();
        assert!(sent.len() > 100, "the TLS session went through the tap");
        assert!(!contains(&sent, CLEAR_PW.as_bytes()), "the password never travelled");
    }
    assert_secrets_kept(&w, &[CLEAR_PW, WRONG_PW, &token]);
}

#[tokio::test]
async fn upstream_tls_require_and_verify_full_work_and_fail_closed_against_a_real_server() {
    let Some(pg) = pg() else { return };
    let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let other_ca = portcullis::tls::DevPki::load_or_create(other.path(), &[])
        .unwrap_or_else(|e| panic!("{e}"))
        .ca_path();
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = secrets.path();
    let ip = format!("127.0.0.1:{}", pg.port);
    let name = format!("localhost:{}", pg.port);
    let verify = |ca: &Path| {
        format!(
            "upstream_tls = \"verify-full\"\nupstream_ca = {}",
            toml::Value::String(ca.to_string_lossy().into_owned())
        )
    };
    let routes = [
        route_with(s, "tls-require", &ip, TLS_ROLE, TLS_PW, "upstream_tls = \"require\""),
        route_with(s, "tls-verify", &name, TLS_ROLE, TLS_PW, &verify(&pg.tls_ca)),
        route_with(s, "tls-wrong-ca", &name, TLS_ROLE, TLS_PW, &verify(&other_ca)),
        // The certificate names `localhost`, not `127.0.0.1`.
        route_with(s, "tls-wrong-name", &ip, TLS_ROLE, TLS_PW, &verify(&pg.tls_ca)),
        route(s, "tls-disable", &ip, TLS_ROLE, TLS_PW),
        // Roles with plain `host` lines may still use TLS, and then do.
        route_with(s, "md5-tls", &name, MD5_ROLE, MD5_PW, &verify(&pg.tls_ca)),
    ]
    .concat();
    let w = PgWorld::build(pg, secrets, routes, &policy()).await;
    let token = w.w.token("bb", &[]);

    for route in ["tls-require", "tls-verify"] {
        let (who, ssl) = who_and_ssl(&w, route, &token).await;
        assert_eq!((who.as_str(), ssl.as_str()), ("tls_user", "true"), "{route}");
    }
    let (who, ssl) = who_and_ssl(&w, "md5-tls", &token).await;
    assert_eq!((who.as_str(), ssl.as_str()), ("md5_user", "true"));
    // A cancel reaches its backend over verified TLS too.
    let config = w.pg_config_at(w.addr_of("tls-verify"), &token, "app");
    let (c, conn) = config.connect(w.tls()).await.unwrap_or_else(|e| panic!("{e}"));
    let conn = tokio::spawn(conn);
    let cancel = c.cancel_token();
    let sleeper = tokio::spawn(async move {
        c.simple_query("select pg_sleep(30) /* cancel-tls-verify */").await.err()
    });
    w.until_running("cancel-tls-verify").await;
    cancel.cancel_query(w.tls()).await.unwrap_or_else(|e| panic!("cancel: {e}"));
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .unwrap_or_else(|_| panic!("the cancel did not arrive"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("pg_sleep was not cancelled"));
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    let ev = w.wait_event(|e| e["kind"] == "pg.cancel" && e["route"] == "tls-verify").await;
    assert_eq!(ev["forwarded"], true, "{ev}");
    conn.abort();

    let ev = refused(&w, "tls-wrong-ca", &token, &[TLS_PW]).await;
    let d = detail(&ev);
    assert!(d.contains(&format!("TLS to {name}")) && d.contains("UnknownIssuer"), "{ev}");
    let ev = refused(&w, "tls-wrong-name", &token, &[TLS_PW]).await;
    let d = detail(&ev);
    assert!(d.contains(&format!("TLS to {ip}")) && d.contains("not valid for name"), "{ev}");
    // Without TLS the server itself refuses the hostssl-only role.
    let ev = refused(&w, "tls-disable", &token, &[TLS_PW]).await;
    let d = detail(&ev);
    assert!(d.contains("upstream authentication failed: 28000"), "{ev}");
    assert!(d.contains("pg_hba.conf rejects connection") && d.contains("no encryption"), "{ev}");
    assert_secrets_kept(&w, &[TLS_PW, MD5_PW, &token]);
}

/// A SCRAM password that SASLprep changes (soft hyphen removed, U+FB01 and U+00AA
/// normalized): PostgreSQL stores the secret of the prepared form, so portcullis must
/// prepare it the same way or every login fails.
#[tokio::test]
async fn scram_passwords_are_saslprepped_like_postgres_does() {
    let Some(pg) = pg() else { return };
    const ROLE: &str = "saslprep_user";
    const PW: &str = "s\u{00AD}ecre\u{FB01}t-\u{00AA}-Pw-4d1";
    pg.admin_sql(&format!("drop role if exists {ROLE}; create role {ROLE} login password '{PW}';"))
        .unwrap_or_else(|e| panic!("{e}"));
    let stored = pg
        .admin_sql(&format!(
            "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = '{ROLE}'"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored, "t", "{ROLE}'s password is stored as a SCRAM secret");
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = secrets.path();
    let direct = format!("127.0.0.1:{}", pg.port);
    let routes = [
        route(s, "saslprep", &direct, ROLE, PW),
        // A password one character off is still refused: the login above succeeds
        // because of the preparation, not because the role takes anything.
        route(s, "saslprep-wrong", &direct, ROLE, "secre\u{FB01}t-\u{00AA}-Pw-4d2"),
    ]
    .concat();
    let w = PgWorld::build(pg, secrets, routes, &policy()).await;
    let token = w.w.token("bb", &[]);
    let (who, _) = who_and_ssl(&w, "saslprep", &token).await;
    assert_eq!(who, ROLE);
    let ev = refused(&w, "saslprep-wrong", &token, &[PW]).await;
    assert!(detail(&ev).contains("28P01"), "{ev}");
    assert_secrets_kept(&w, &[PW, &token]);
}

// === a TLS-terminating man in the middle ===

/// Answers SSLRequest, terminates TLS with `pki`'s certificate (not the server's), opens
/// its own TLS to the real server (trusting `pg_ca`) and relays the plaintext: what an
/// attacker on the path can do to `upstream_tls = "require"`, which checks no certificate.
async fn mitm(pki: &portcullis::tls::DevPki, pg_port: u16, pg_ca: &Path) -> (SocketAddr, Tap2) {
    use rustls_pki_types::pem::PemObject;
    // Speaks `postgresql` if asked, as PostgreSQL 17 would.
    let alpn = vec![b"postgresql".to_vec()];
    let server_cfg = portcullis::tls::server_config_with_alpn(pki.key_source(), vec![], alpn)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in
        rustls_pki_types::CertificateDer::pem_file_iter(pg_ca).unwrap_or_else(|e| panic!("{e}"))
    {
        roots.add(c.unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
    }
    let client_cfg = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|e| panic!("{e}"));
    let (acceptor, connector) = (
        tokio_rustls::TlsAcceptor::from(server_cfg),
        tokio_rustls::TlsConnector::from(Arc::new(client_cfg)),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let mut ssl_request = [0u8; 8];
                c.read_exact(&mut ssl_request).await.ok()?;
                c.write_all(b"S").await.ok()?;
                let mut c = acceptor.accept(c).await.ok()?;
                let mut s = TcpStream::connect(("127.0.0.1", pg_port)).await.ok()?;
                s.write_all(&ssl_request).await.ok()?;
                let mut answer = [0u8; 1];
                s.read_exact(&mut answer).await.ok()?;
                let name = rustls_pki_types::ServerName::try_from("localhost").ok()?;
                let mut s = connector.connect(name, s).await.ok()?;
                tokio::io::copy_bidirectional(&mut c, &mut s).await.ok()
            });
        }
    });
    (addr, Tap2(task))
}

/// Aborts the man in the middle when dropped.
struct Tap2(tokio::task::JoinHandle<()>);

impl Drop for Tap2 {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SCRAM over TLS is bound to the server's certificate (`SCRAM-SHA-256-PLUS`,
/// `tls-server-end-point`), so a man in the middle with its own certificate gets no
/// session even where `upstream_tls = "require"` checks no certificate; without it in
/// the path the same route works, bound to the real certificate.
#[tokio::test]
async fn scram_over_tls_is_channel_bound_so_a_man_in_the_middle_is_refused() {
    let Some(pg) = pg() else { return };
    let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let other_pki = portcullis::tls::DevPki::load_or_create(other.path(), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let (mitm_addr, _mitm) = mitm(&other_pki, pg.port, &pg.tls_ca).await;
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = secrets.path();
    let require = "upstream_tls = \"require\"";
    let direct = format!("127.0.0.1:{}", pg.port);
    let routes = [
        route_with(s, "direct", &direct, TLS_ROLE, TLS_PW, require),
        route_with(s, "intercepted", &mitm_addr.to_string(), TLS_ROLE, TLS_PW, require),
    ]
    .concat();
    let w = PgWorld::build(pg, secrets, routes, &policy()).await;
    let token = w.w.token("bb", &[]);

    let (who, ssl) = who_and_ssl(&w, "direct", &token).await;
    assert_eq!((who.as_str(), ssl.as_str()), ("tls_user", "true"));
    let ev = refused(&w, "intercepted", &token, &[TLS_PW]).await;
    let d = detail(&ev);
    assert!(d.contains("upstream authentication failed"), "{ev}");
    assert!(d.to_ascii_lowercase().contains("channel binding"), "{ev}");
    assert_secrets_kept(&w, &[TLS_PW, &token]);
}

// === impostors: upstreams that skip or weaken authentication ===

enum Step {
    /// Send these bytes.
    Send(Vec<u8>),
    /// Read one message from the proxy (recorded).
    Read,
}

fn auth_request(code: u32, payload: &[u8]) -> Vec<u8> {
    portcullis::postgres::proto::auth(code, payload)
}

/// AuthenticationOk and what a server sends after it, up to ReadyForQuery.
fn ok_and_ready() -> Vec<u8> {
    use portcullis::postgres::proto::{backend_key_data, message};
    [
        auth_request(0, &[]),
        message(b'S', b"server_version\x0015.0\x00"),
        message(b'S', b"client_encoding\x00UTF8\x00"),
        backend_key_data(4242, 4343),
        message(b'Z', b"I"),
    ]
    .concat()
}

/// A fake upstream: answers SSLRequest (with TLS and `pki`'s certificate when given,
/// else `N`), reads the StartupMessage, then plays `script`; every byte it receives after
/// the StartupMessage is recorded.
async fn impostor(
    pki: Option<&portcullis::tls::DevPki>,
    script: Vec<Step>,
) -> (SocketAddr, Arc<Mutex<Vec<u8>>>, Tap2) {
    trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
    let acceptor = pki.map(|p| {
        let alpn = vec![b"postgresql".to_vec()];
        tokio_rustls::TlsAcceptor::from(
            portcullis::tls::server_config_with_alpn(p.key_source(), vec![], alpn)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let got = Arc::new(Mutex::new(Vec::new()));
    let log = got.clone();
    let script = Arc::new(script);
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let (acceptor, log, script) = (acceptor.clone(), log.clone(), script.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                c.read_exact(&mut first).await.ok()?;
                let ssl = first[4..] == [0x04, 0xd2, 0x16, 0x2f];
                let mut s: Box<dyn Io> = match (ssl, acceptor) {
                    (true, Some(a)) => {
                        c.write_all(b"S").await.ok()?;
                        Box::new(a.accept(c).await.ok()?)
                    }
                    (true, None) => {
                        c.write_all(b"N").await.ok()?;
                        Box::new(c)
                    }
                    (false, _) => Box::new(c),
                };
                // The StartupMessage (its first 8 bytes already read without SSLRequest).
                let len = if ssl {
                    let mut len = [0u8; 4];
                    s.read_exact(&mut len).await.ok()?;
                    (u32::from_be_bytes(len) as usize).saturating_sub(4)
                } else {
                    (u32::from_be_bytes([first[0], first[1], first[2], first[3]]) as usize)
                        .saturating_sub(8)
                };
                let mut startup = vec![0u8; len];
                s.read_exact(&mut startup).await.ok()?;
                for step in script.iter() {
                    match step {
                        Step::Send(b) => s.write_all(b).await.ok()?,
                        Step::Read => {
                            let mut hdr = [0u8; 5];
                            s.read_exact(&mut hdr).await.ok()?;
                            let n = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
                            let mut body = vec![0u8; n.saturating_sub(4)];
                            s.read_exact(&mut body).await.ok()?;
                            if let Ok(mut l) = log.lock() {
                                l.extend_from_slice(&hdr);
                                l.extend_from_slice(&body);
                            }
                        }
                    }
                }
                // Whatever else comes (a query of the client's, were it let through).
                let mut rest = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
                if let Ok(mut l) = log.lock() {
                    l.extend_from_slice(&rest);
                }
                Some(())
            });
        }
    });
    (addr, got, Tap2(task))
}

/// An upstream that answers AuthenticationOk at once gets no session (plain or over
/// unverified TLS), nor one that skips SCRAM's server signature; under
/// `upstream_tls = "require"` an upstream asking for cleartext, md5 or unbound SCRAM gets
/// nothing: only SCRAM-SHA-256-PLUS authenticates a server whose certificate is not
/// checked.
#[tokio::test]
async fn an_upstream_that_skips_authentication_gets_no_session_and_no_password() {
    let Some(pg) = pg() else { return };
    let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let pki = portcullis::tls::DevPki::load_or_create(other.path(), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let sasl = |mechs: &[u8]| auth_request(10, mechs);
    let cases: Vec<(&str, bool, Vec<Step>, &str)> = vec![
        ("ok-plain", false, vec![Step::Send(ok_and_ready())], "without authenticating"),
        ("ok-tls", true, vec![Step::Send(ok_and_ready())], "without authenticating"),
        (
            "scram-no-final",
            false,
            vec![Step::Send(sasl(b"SCRAM-SHA-256\0\0")), Step::Read, Step::Send(ok_and_ready())],
            "without authenticating",
        ),
        ("clear-tls", true, vec![Step::Send(auth_request(3, &[])), Step::Read], "cleartext"),
        ("md5-tls", true, vec![Step::Send(auth_request(5, b"salt")), Step::Read], "md5"),
        (
            "scram-unbound-tls",
            true,
            vec![Step::Send(sasl(b"SCRAM-SHA-256\0\0")), Step::Read],
            "SCRAM-SHA-256-PLUS",
        ),
    ];
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut routes = String::new();
    let mut fakes = Vec::new();
    for (name, tls, script, _) in cases.iter().map(|(n, t, s, w)| (n, t, s, w)) {
        let script = script
            .iter()
            .map(|s| match s {
                Step::Send(b) => Step::Send(b.clone()),
                Step::Read => Step::Read,
            })
            .collect();
        let (addr, got, guard) = impostor(tls.then_some(&pki), script).await;
        let extra = if *tls { "upstream_tls = \"require\"" } else { "" };
        routes.push_str(&route_with(
            secrets.path(),
            name,
            &addr.to_string(),
            TLS_ROLE,
            TLS_PW,
            extra,
        ));
        fakes.push((got, guard));
    }
    let w = PgWorld::build(pg, secrets, routes, &policy()).await;
    let token = w.w.token("bb", &[]);
    for ((name, _, _, why), (got, _)) in cases.iter().zip(&fakes) {
        let ev = refused(&w, name, &token, &[TLS_PW]).await;
        assert!(detail(&ev).contains(why), "{name}: {ev}");
        let got = got.lock().map(|g| g.clone()).unwrap_or_default();
        assert!(!contains(&got, b"select 1"), "{name}: the client's query reached the impostor");
        assert!(!contains(&got, TLS_PW.as_bytes()), "{name}: the password reached the impostor");
        if *name != "scram-no-final" {
            // Nothing at all: no password, no hash, no SCRAM message.
            assert!(
                !message_types(&[&[0, 0, 0, 4][..], &got].concat()).contains(&b'p'),
                "{name}: {got:?}"
            );
        }
    }
    assert_secrets_kept(&w, &[TLS_PW, &token]);
}

/// A raw session through the first route of `w`, logged in with `token`: the server's
/// messages up to its first ReadyForQuery are read.
async fn raw_session(w: &PgWorld, token: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    use portcullis::postgres::proto::message;
    let mut t = tls_to(w).await;
    t.write_all(&startup("app", "appdb")).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next_message(&mut t).await.map(|m| m.0), Some(b'R'));
    t.write_all(&message(b'p', &[token.as_bytes(), b"\0"].concat()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    while let Some((k, _)) = next_message(&mut t).await {
        if k == b'Z' {
            return t;
        }
    }
    panic!("the session ended before ReadyForQuery")
}

/// One message from the proxy; `None` once it closed.
async fn next_message<S: tokio::io::AsyncRead + Unpin>(t: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut hdr))
        .await
        .unwrap_or_else(|_| panic!("no answer from the proxy"))
        .ok()?;
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    t.read_exact(&mut body).await.ok()?;
    Some((hdr[0], body))
}

/// Attack (round 14): the client's password is its OIDC token, meant for portcullis
/// alone, and node-postgres answers an authentication request whenever one comes, with
/// the password it was given. An upstream that is not honest (a compromised server, an
/// impostor on a path whose authentication it can pass) asked for a cleartext password
/// in the middle of the session, the proxy passed the request on, and relayed the
/// client's answer: the token, which other routes with the same audience accept. Such a
/// request (or a BackendKeyData, the backend's own key) now ends the session, not passed
/// on; and a password message from the client after startup is never relayed, not even
/// in part.
#[tokio::test]
async fn an_upstream_asking_for_a_password_mid_session_never_gets_the_client_s_token() {
    use portcullis::postgres::proto::{backend_key_data, message};
    let Some(pg) = pg() else { return };
    // The upstream logs in, reads the client's query, and answers it with `then`.
    let world = |then: Vec<u8>| async move {
        let mut script = vec![Step::Send(auth_request(3, &[])), Step::Read];
        script.extend([Step::Send(ok_and_ready()), Step::Read, Step::Send(then)]);
        let (addr, got, guard) = impostor(None, script).await;
        let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let routes = route(secrets.path(), "asks", &addr.to_string(), CLEAR_ROLE, CLEAR_PW);
        (PgWorld::build(pg, secrets, routes, &policy()).await, got, guard)
    };
    let query = message(b'Q', b"select 1 /* asks */\0");
    let cases = [
        (auth_request(3, &[]), "an authentication request"),
        (backend_key_data(77, 78), "a BackendKeyData"),
    ];
    for (odd, what) in cases {
        let (w, got, _guard) = world(odd.clone()).await;
        let token = w.w.token("bb", &[]);
        let mut t = raw_session(&w, &token).await;
        t.write_all(&query).await.unwrap_or_else(|e| panic!("{e}"));
        let mut seen = Vec::new();
        while let Some(m) = next_message(&mut t).await {
            seen.push(m);
        }
        assert!(seen.iter().all(|(k, _)| *k != odd[0]), "{what} was passed on");
        let (kind, body) = seen.last().unwrap_or_else(|| panic!("{what}: the proxy said nothing"));
        let f = portcullis::postgres::proto::parse_fields(body);
        assert_eq!((*kind, f.get(&b'C').map(String::as_str)), (b'E', Some("08006")), "{f:?}");
        let ev = w.wait_event(|e| e["kind"] == "pg.session" && e["event"] == "close").await;
        assert_eq!(ev["reason"], "upstream-unavailable", "{ev}");
        assert!(detail(&ev).contains(what), "{ev}");
        let got = got.lock().map(|g| g.clone()).unwrap_or_default();
        assert!(contains(&got, b"select 1 /* asks */"), "the query reached the upstream");
        assert!(!contains(&got, token.as_bytes()), "the client's token reached the upstream");
        assert_secrets_kept(&w, &[CLEAR_PW, &token]);
    }

    // A client that sends a password message anyway: sent in two writes, so the header
    // arrives alone first.
    let (w, got, _guard) = world(message(b'Z', b"I")).await;
    let token = w.w.token("bb", &[]);
    let mut t = raw_session(&w, &token).await;
    t.write_all(&query).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next_message(&mut t).await.map(|m| m.0), Some(b'Z'));
    let answer = message(b'p', &[token.as_bytes(), b"\0"].concat());
    t.write_all(&answer[..5]).await.unwrap_or_else(|e| panic!("{e}"));
    t.flush().await.unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = t.write_all(&answer[5..]).await;
    let _ = t.flush().await;
    // Until the proxy closes, which it does once the upstream is done with the session.
    let mut last = None;
    while let Some(m) = next_message(&mut t).await {
        last = Some(m);
    }
    let got = got.lock().map(|g| g.clone()).unwrap_or_default();
    assert!(contains(&got, b"select 1 /* asks */"), "the query reached the upstream");
    assert!(!contains(&got, token.as_bytes()), "the client's token reached the upstream");
    assert!(!contains(&got, &token.as_bytes()[..16]), "part of the token reached the upstream");
    // The proxy's own cleartext password comes first; no password message after it.
    let first =
        got.get(1..5).map_or(0, |l| 1 + u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    let after = got.get(first..).unwrap_or_default();
    assert!(!message_types(&[&[0, 0, 0, 4][..], after].concat()).contains(&b'p'), "{after:?}");
    let (kind, body) = last.unwrap_or_else(|| panic!("the proxy said nothing"));
    let f = portcullis::postgres::proto::parse_fields(&body);
    assert_eq!((kind, f.get(&b'C').map(String::as_str)), (b'E', Some("08P01")), "{f:?}");
    let ev = w.wait_event(|e| e["kind"] == "pg.session" && e["event"] == "close").await;
    assert_eq!(ev["reason"], "protocol-violation", "{ev}");
    assert!(detail(&ev).contains("password message"), "{ev}");
    assert_secrets_kept(&w, &[CLEAR_PW, &token]);
}

/// Attack (round 14): between AuthenticationOk and ReadyForQuery the proxy held and passed
/// on whatever the upstream sent: a second authentication request (which a client may
/// answer with its token), a BackendKeyData of another length (handing the client the
/// backend's own key), or any amount of messages, all held in memory until ReadyForQuery
/// or the startup timeout (a server flooding notices grew the proxy's memory for every
/// client connecting). Each refuses the session, nothing passed on.
#[tokio::test]
async fn an_upstream_that_breaks_the_protocol_after_authentication_ok_gets_no_session() {
    use portcullis::postgres::proto::{auth, message};
    let Some(pg) = pg() else { return };
    let notice = message(b'N', &[b"SNOTICE\0M".as_slice(), &[b'x'; 60_000], b"\0\0"].concat());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("auth-again", auth(3, &[]), "an authentication request after AuthenticationOk"),
        ("long-key", message(b'K', &[7; 12]), "a malformed BackendKeyData"),
        ("flood", notice.repeat(20), "more than 1 MiB"),
    ];
    let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut routes = String::new();
    let mut fakes = Vec::new();
    for (name, odd, _) in &cases {
        let then = [auth(0, &[]), message(b'S', b"client_encoding\0UTF8\0"), odd.clone()];
        let script = vec![
            Step::Send(auth_request(3, &[])),
            Step::Read,
            Step::Send([then.concat(), message(b'Z', b"I")].concat()),
        ];
        let (addr, _got, guard) = impostor(None, script).await;
        routes.push_str(&route(secrets.path(), name, &addr.to_string(), CLEAR_ROLE, CLEAR_PW));
        fakes.push(guard);
    }
    let w = PgWorld::build(pg, secrets, routes, &policy()).await;
    let token = w.w.token("bb", &[]);
    for (name, _, why) in &cases {
        let ev = refused(&w, name, &token, &[CLEAR_PW]).await;
        assert!(detail(&ev).contains(why), "{name}: {ev}");
    }
    assert_secrets_kept(&w, &[CLEAR_PW, &token]);
}
