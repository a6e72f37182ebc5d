//! PostgreSQL through portcullis, against a real PostgreSQL server started here (initdb
//! in a temporary directory, a free port) and real clients: `psql`, `pgbench`, and
//! `tokio-postgres` over a rustls connector.
//!
//! TCP is SCRAM-SHA-256 for every role but three that `pg_auth` uses: `md5_user` (md5,
//! its password stored as md5), `clear_user` (`password`: cleartext) and `tls_user`
//! (`hostssl` only). The server has `ssl = on` with a certificate for `localhost` only,
//! signed by a test CA ([`PgServer::tls_ca`]).
//!
//! The server is shared by the tests of this binary (initdb costs seconds on 2 cores).
//! It runs under a small shell guardian whose stdin is a pipe from this process: when the
//! test binary exits, however it exits, the pipe closes and the guardian stops PostgreSQL
//! and removes the directory.
//!
//! Without PostgreSQL binaries the tests say so and pass, unless
//! `PORTCULLIS_REQUIRE_INTEROP=1` (set by the test command), where they fail.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::support::*;

pub const BB_REPO: &str = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}";
const APP_PW: &str = "app-Pw-3f9a1c";
const MIGRATOR_PW: &str = "migrator-Pw-77b2e0";
const READONLY_PW: &str = "readonly-Pw-c41d8e";
/// Roles (and their passwords) with their own pg_hba.conf lines, for `pg_auth`.
pub const MD5_ROLE: &str = "md5_user";
pub const MD5_PW: &str = "md5-Pw-e81f0b";
pub const CLEAR_ROLE: &str = "clear_user";
pub const CLEAR_PW: &str = "clear-Pw-5ac37d";
pub const TLS_ROLE: &str = "tls_user";
pub const TLS_PW: &str = "tls-Pw-90d4b6";

/// The database policy of these tests: pipelines on main migrate, engineers read.
pub const PG_POLICY: &str = r#"
[[rule]]
id = "pipelines-main-migrate"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = "main" }
databases = ["appdb"]
roles = ["app"]
upstream_role = "migrator"

[[rule]]
id = "engineers-read"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]
databases = ["appdb"]
upstream_role = "readonly"
"#;

// === the PostgreSQL server ===

pub struct PgServer {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    /// The CA that signed the server's certificate (which names `localhost` only).
    pub tls_ca: PathBuf,
    /// The guardian's stdin: closing it stops and removes the server.
    guardian: Mutex<Option<std::process::ChildStdin>>,
    child: Mutex<Option<std::process::Child>>,
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Ok(mut g) = self.guardian.lock() {
            g.take();
        }
        if let Ok(mut c) = self.child.lock() {
            if let Some(mut c) = c.take() {
                let _ = c.wait();
            }
        }
    }
}

/// The newest `/usr/lib/postgresql/<v>/bin` with initdb, or `PG_BIN`.
pub fn pg_bin() -> Option<PathBuf> {
    if let Some(b) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(b));
    }
    let mut best: Option<(u32, PathBuf)> = None;
    for e in std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let v: u32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
        let bin = e.path().join("bin");
        if bin.join("initdb").is_file() && best.as_ref().is_none_or(|(b, _)| v > *b) {
            best = Some((v, bin));
        }
    }
    best.map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Runs a command as the `postgres` OS user when we are root (initdb refuses root).
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PgServer {
    fn start(bin: PathBuf) -> Result<PgServer, String> {
        let dir = std::env::temp_dir().join(format!(
            "portcullis-pg-{}-{}",
            std::process::id(),
            portcullis::util::unix_now()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if is_root() {
            let st = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err("chown postgres failed".into());
            }
        }
        let data = dir.join("data");
        let out = as_pg_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let port = free_port();
        let tls_ca = write_server_tls(&dir)?;
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\n\
             password_encryption = 'scram-sha-256'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 200\nshared_buffers = '64MB'\n\
             ssl = on\nssl_cert_file = '{d}/server.pem'\nssl_key_file = '{d}/server-key.pem'\n",
            d = dir.display()
        );
        let append = |file: &str, text: &str, truncate: bool| -> Result<(), String> {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .append(!truncate)
                .write(true)
                .truncate(truncate)
                .open(data.join(file))
                .map_err(|e| format!("{file}: {e}"))?;
            f.write_all(text.as_bytes()).map_err(|e| format!("{file}: {e}"))
        };
        append("postgresql.conf", &conf, false)?;
        // TCP: SCRAM-SHA-256, but for the three roles of `pg_auth` (first match wins).
        // The Unix socket (this directory only) is for set-up.
        append(
            "pg_hba.conf",
            &format!(
                "local all postgres trust\n\
                 host all {MD5_ROLE} 127.0.0.1/32 md5\n\
                 host all {CLEAR_ROLE} 127.0.0.1/32 password\n\
                 hostssl all {TLS_ROLE} 127.0.0.1/32 scram-sha-256\n\
                 hostnossl all {TLS_ROLE} all reject\n\
                 host all all 127.0.0.1/32 scram-sha-256\n"
            ),
            true,
        )?;
        let script = format!(
            "'{bin}/postgres' -D '{data}' >'{dir}/server.log' 2>&1 & pid=$!\n\
             read _ignored\n\
             kill -INT $pid 2>/dev/null; wait $pid; rm -rf '{dir}'\n",
            bin = bin.display(),
            data = data.display(),
            dir = dir.display()
        );
        let mut child = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--", "sh", "-c", &script])
                .stdin(Stdio::piped())
                .spawn()
        } else {
            Command::new("sh").args(["-c", &script]).stdin(Stdio::piped()).spawn()
        }
        .map_err(|e| format!("start postgres: {e}"))?;
        let guardian = child.stdin.take();
        let server = PgServer {
            bin,
            dir,
            port,
            tls_ca,
            guardian: Mutex::new(guardian),
            child: Mutex::new(Some(child)),
        };
        let mut ready = false;
        for _ in 0..150 {
            if server.admin_sql("select 1").is_ok() {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !ready {
            let log = std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
            return Err(format!("postgres did not start:\n{log}"));
        }
        server.admin_sql(&format!(
            "create role app login password '{APP_PW}';
             create role migrator login password '{MIGRATOR_PW}';
             create role readonly login password '{READONLY_PW}';
             set password_encryption = 'md5';
             create role {MD5_ROLE} login password '{MD5_PW}';
             reset password_encryption;
             create role {CLEAR_ROLE} login password '{CLEAR_PW}';
             create role {TLS_ROLE} login password '{TLS_PW}';"
        ))?;
        // CREATE DATABASE cannot share psql's implicit transaction.
        server.admin_sql("create database appdb owner migrator")?;
        server.admin_sql_in(
            "appdb",
            "grant connect on database appdb to app, readonly;
             alter default privileges for role migrator in schema public grant select on tables to readonly;
             grant usage on schema public to readonly;
             grant all on schema public to migrator;",
        )?;
        Ok(server)
    }

    /// Runs SQL as the superuser over the Unix socket.
    pub fn admin_sql(&self, sql: &str) -> Result<String, String> {
        self.admin_sql_in("postgres", sql)
    }

    pub fn admin_sql_in(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// The server's TLS material in `dir`: a test CA (`ca.pem`, returned) and a certificate
/// for `localhost` only (`server.pem`, `server-key.pem`), readable by the server alone.
fn write_server_tls(dir: &Path) -> Result<PathBuf, String> {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let e = |e: rcgen::Error| format!("test certificates: {e}");
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "portcullis pg test CA");
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).map_err(e)?;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key)).map_err(e)?;
    let put = |name: &str, text: String, mode: u32| -> Result<PathBuf, String> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let p = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("{name}: {e}"))?;
        if is_root() {
            let st = Command::new("chown").arg("postgres:postgres").arg(&p).status();
            if !st.is_ok_and(|s| s.success()) {
                return Err(format!("chown postgres {name} failed"));
            }
        }
        Ok(p)
    };
    put("server.pem", cert.pem(), 0o644)?;
    put("server-key.pem", key.serialize_pem(), 0o600)?;
    put("ca.pem", ca_cert.pem(), 0o644)
}

/// The shared server, or `None` (test skipped) when PostgreSQL is not installed.
pub fn pg() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
    let Some(bin) = pg_bin() else {
        assert!(
            std::env::var("PORTCULLIS_REQUIRE_INTEROP").is_err(),
            "PostgreSQL binaries not found (/usr/lib/postgresql/*/bin) but PORTCULLIS_REQUIRE_INTEROP is set"
        );
        eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql)");
        return None;
    };
    match SERVER.get_or_init(|| PgServer::start(bin)) {
        Ok(s) => Some(s),
        Err(e) => panic!("cannot start PostgreSQL: {e}"),
    }
}

// === a world with a database route ===

pub struct PgWorld {
    pub w: World,
    pub pg: &'static PgServer,
    /// The first database route's listener.
    pub addr: SocketAddr,
    /// Every database route's listener, by route name.
    pub routes: portcullis::postgres::BoundDatabases,
    _secrets: tempfile::TempDir,
}

pub fn database_toml(pg: &PgServer, secrets: &Path, extra: &str) -> String {
    let f = |name: &str| toml::Value::String(secrets.join(name).to_string_lossy().into_owned());
    format!(
        "[[databases]]\nname = \"appdb\"\nlisten = \"127.0.0.1:0\"\nupstream = \"postgres://127.0.0.1:{port}\"\n\
         upstream_user = \"app\"\npassword_file = {app}\npolicy = \"pg\"\nstartup_timeout = \"2s\"\n{extra}\n\
         [databases.upstream_roles.migrator]\npassword_file = {mig}\n\
         [databases.upstream_roles.readonly]\npassword_file = {ro}\n",
        port = pg.port,
        app = f("app"),
        mig = f("migrator"),
        ro = f("readonly"),
    )
}

impl PgWorld {
    pub async fn start() -> Option<PgWorld> {
        Self::with_extra("").await
    }

    pub async fn with_extra(extra: &str) -> Option<PgWorld> {
        Self::with_toml(extra, |t| t).await
    }

    /// A world whose `[[databases]]` TOML is `edit` of the route `appdb` (with `extra`).
    pub async fn with_toml(extra: &str, edit: impl FnOnce(String) -> String) -> Option<PgWorld> {
        Self::with_toml_and_policy(extra, edit, PG_POLICY).await
    }

    /// The route `appdb` under `policy` instead of [`PG_POLICY`].
    pub async fn with_policy(policy: &str) -> Option<PgWorld> {
        Self::with_toml_and_policy("", |t| t, policy).await
    }

    /// The route `appdb`, its TOML edited by `edit`, with `server_extra` in `[server]`.
    pub async fn with_server(
        server_extra: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Option<PgWorld> {
        let pg = pg()?;
        let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (n, p) in [("app", APP_PW), ("migrator", MIGRATOR_PW), ("readonly", READONLY_PW)] {
            write(&secrets.path().join(n), &format!("{p}\n"));
        }
        let routes = edit(database_toml(pg, secrets.path(), ""));
        Some(Self::build_with(pg, secrets, routes, PG_POLICY, server_extra).await)
    }

    async fn with_toml_and_policy(
        extra: &str,
        edit: impl FnOnce(String) -> String,
        policy: &str,
    ) -> Option<PgWorld> {
        let pg = pg()?;
        let secrets = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (n, p) in [("app", APP_PW), ("migrator", MIGRATOR_PW), ("readonly", READONLY_PW)] {
            write(&secrets.path().join(n), &format!("{p}\n"));
        }
        let routes = edit(database_toml(pg, secrets.path(), extra));
        Some(Self::build(pg, secrets, routes, policy).await)
    }

    /// A world whose `[[databases]]` routes are `routes` (password files in `secrets`,
    /// kept for the world's lifetime) under the policy `pg`.
    pub async fn build(
        pg: &'static PgServer,
        secrets: tempfile::TempDir,
        routes: String,
        policy: &str,
    ) -> PgWorld {
        Self::build_with(pg, secrets, routes, policy, "").await
    }

    async fn build_with(
        pg: &'static PgServer,
        secrets: tempfile::TempDir,
        routes: String,
        policy: &str,
        server_extra: &str,
    ) -> PgWorld {
        let w = World::with(Setup {
            routes,
            policies: vec![("api".into(), ALLOW_ALL_PRESETS.into()), ("pg".into(), policy.into())],
            server_extra: server_extra.into(),
            ..Setup::default()
        })
        .await;
        let routes = w.server().bound().databases.clone();
        let addr = routes.first().map(|d| d.1).unwrap_or_else(|| panic!("no database listener"));
        PgWorld { w, pg, addr, routes, _secrets: secrets }
    }

    /// The listener of the database route `name`.
    pub fn addr_of(&self, name: &str) -> SocketAddr {
        self.routes
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no database route `{name}`"))
    }

    /// `psql -c` through the proxy; (success, stdout, stderr).
    pub async fn psql(
        &self,
        token: &str,
        user: &str,
        sslmode: &str,
        sql: &str,
    ) -> (bool, String, String) {
        let conn = format!(
            "host=127.0.0.1 port={} sslmode={sslmode} dbname=appdb user={user} connect_timeout=10",
            self.addr.port()
        );
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(self.pg.bin.join("psql"))
                .env("PGPASSWORD", token)
                .env_remove("PGSERVICE")
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-w", &conn, "-c", sql])
                .output(),
        )
        .await;
        match out {
            Ok(Ok(o)) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).trim().to_string(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Ok(Err(e)) => panic!("psql: {e}"),
            Err(_) => panic!("psql hung"),
        }
    }

    pub fn pg_config(&self, token: &str, user: &str) -> tokio_postgres::Config {
        self.pg_config_at(self.addr, token, user)
    }

    /// [`Self::pg_config`] for the database listener at `addr`.
    pub fn pg_config_at(
        &self,
        addr: SocketAddr,
        token: &str,
        user: &str,
    ) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("localhost")
            .hostaddr(std::net::IpAddr::from([127, 0, 0, 1]))
            .port(addr.port())
            .user(user)
            .dbname("appdb")
            .password(token)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// A tokio-postgres client through the proxy (TLS verified against the dev CA).
    pub async fn connect(
        &self,
        token: &str,
        user: &str,
    ) -> Result<
        (tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>),
        tokio_postgres::Error,
    > {
        let (client, conn) = self.pg_config(token, user).connect(self.tls()).await?;
        Ok((client, tokio::spawn(conn)))
    }

    pub fn tls(&self) -> RustlsConnect {
        RustlsConnect::new(&self.w.pki)
    }

    pub async fn events_of(&self, kind: &str) -> Vec<Value> {
        self.w.events().into_iter().filter(|e| e["kind"] == kind).collect()
    }

    /// Waits (at most 20 s) until the server executes a statement whose text holds
    /// `marker`: a cancel request that reaches a backend before its statement runs is
    /// ignored, so a test sending one after a fixed pause raced the proxy's relay.
    pub async fn until_running(&self, marker: &str) {
        let q = format!(
            "select count(*) from pg_stat_activity where state = 'active' \
             and pid <> pg_backend_pid() and query like '%{marker}%'"
        );
        for _ in 0..400 {
            if self.pg.admin_sql(&q).is_ok_and(|n| n != "0") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no statement with {marker} ran within 20 s");
    }

    /// Waits until an event matching `pred` is written (at most 15 s: some come after
    /// the product's own 2 s bounds, on a loaded machine).
    pub async fn wait_event(&self, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..600 {
            if let Some(e) = self.w.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Value::Null
    }
}

// === a rustls connector for tokio-postgres ===

#[derive(Clone)]
pub struct RustlsConnect(Arc<rustls::ClientConfig>);

impl RustlsConnect {
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.0.clone()
    }

    pub fn new(pki: &portcullis::tls::DevPki) -> Self {
        let c = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(pki.root_store()).with_no_client_auth())
            .unwrap_or_else(|e| panic!("{e}"));
        RustlsConnect(Arc::new(c))
    }
}

pub struct RustlsConnectOne(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>);

pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for RustlsConnect {
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;
    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnectOne> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectOne(self.0.clone(), name))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for RustlsConnectOne {
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;
    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.0).connect(self.1, stream).await?;
            Ok(RustlsStream(s))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

// === raw protocol helpers ===

pub fn startup(user: &str, db: &str) -> Vec<u8> {
    portcullis::postgres::proto::startup_message(&[("user", user), ("database", db)])
}

/// The error a tokio-postgres connection task ended with, within `within`.
pub async fn ended_with(
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    within: Duration,
) -> tokio_postgres::Error {
    let ended = tokio::time::timeout(within, conn)
        .await
        .unwrap_or_else(|_| panic!("session still open after {within:?}"));
    match ended {
        Ok(Err(e)) => e,
        other => panic!("expected the session to end with an error, got {other:?}"),
    }
}

fn ssl_request() -> Vec<u8> {
    portcullis::postgres::proto::startup_packet(portcullis::postgres::proto::SSL_REQUEST, &[])
}

/// Reads until EOF (bounded): what the proxy said before closing.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "the proxy did not close the connection (read so far: {out:?})");
    out
}

/// The (code, message) of the first ErrorResponse in `b`.
fn error_of(b: &[u8]) -> (String, String) {
    assert_eq!(b.first(), Some(&b'E'), "expected an ErrorResponse, got {b:?}");
    let f = portcullis::postgres::proto::parse_fields(&b[5..]);
    (f.get(&b'C').cloned().unwrap_or_default(), f.get(&b'M').cloned().unwrap_or_default())
}

pub async fn tls_to(w: &PgWorld) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    tcp.write_all(&ssl_request()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&s, b"S");
    let name =
        rustls::pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
    tokio_rustls::TlsConnector::from(w.tls().0)
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that no audit line holds any secret of the test.
pub fn assert_no_secrets(w: &PgWorld, extra: &[&str]) {
    let all = w.w.sink.lines().join("");
    for s in [APP_PW, MIGRATOR_PW, READONLY_PW].iter().chain(extra) {
        assert!(!all.contains(s), "audit output contains a secret ({} chars)", s.len());
    }
}

// === tests ===

#[tokio::test]
async fn psql_runs_a_query_as_the_rule_s_upstream_role_and_everything_is_audited() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (ok, out, err) = w.psql(&token, "app", "require", "select current_user, 40 + 2").await;
    assert!(ok, "psql failed: {err}");
    assert_eq!(out, "migrator|42", "pipelines on main get the migrator role");

    let human = w.w.token("corp", &[]);
    let (ok, out, err) = w.psql(&human, "alice", "verify-ca", "select current_user").await;
    // verify-ca needs the CA: psql without root cert fails closed; require works.
    if !ok {
        assert!(err.contains("root certificate"), "{err}");
        let (ok, out, err) = w.psql(&human, "alice", "require", "select current_user").await;
        assert!(ok, "{err}");
        assert_eq!(out, "readonly");
    } else {
        assert_eq!(out, "readonly");
    }
    let (ok, _, err) = w.psql(&human, "alice", "require", "create table nope(x int)").await;
    assert!(!ok && err.contains("permission denied"), "readonly cannot write: {err}");

    let open = w
        .wait_event(|e| {
            e["kind"] == "pg.session" && e["event"] == "open" && e["upstream_role"] == "migrator"
        })
        .await;
    assert_eq!(open["decision"], "allow");
    assert_eq!(open["database"], "appdb");
    assert_eq!(open["role"], "app");
    assert_eq!(open["rule"]["id"], "pipelines-main-migrate");
    assert_eq!(open["ci"]["branch"], "main");
    assert_eq!(open["ci"]["repository"], BB_REPO);
    assert_eq!(open["tls"]["version"], "TLSv1.3");
    // What psql sent and portcullis forwarded: its name, and the encoding.
    assert_eq!(open["startup_parameters"]["application_name"], "psql", "{open}");
    assert!(open["startup_parameters"]["client_encoding"].is_string(), "{open}");
    let sid = open["session_id"].as_str().unwrap_or_default().to_string();
    let stmt =
        w.wait_event(|e| e["kind"] == "pg.statement" && e["session_id"] == sid.as_str()).await;
    assert_eq!(stmt["text"], "select current_user, 40 + 2");
    assert_eq!(stmt["protocol"], "simple");
    assert_eq!(stmt["identity"]["issuer"], "bb");
    assert!(
        stmt["ci"]["run"].is_string() || stmt["ci"]["pipeline"].is_string(),
        "CI context: {stmt}"
    );
    let close = w
        .wait_event(|e| {
            e["kind"] == "pg.session" && e["event"] == "close" && e["session_id"] == sid.as_str()
        })
        .await;
    assert_eq!(close["decision"], "closed");
    assert_eq!(close["ended_by"], "client");
    assert_eq!(close["statements"], 1);
    assert!(
        close["bytes_in"].as_u64().unwrap_or(0) > 0 && close["bytes_out"].as_u64().unwrap_or(0) > 0
    );
    assert!(close["duration_ms"].is_number());
    assert_no_secrets(&w, &[&token, &human]);
}

#[tokio::test]
async fn denials_are_postgres_errors_with_reason_and_request_id_never_the_token() {
    let Some(w) = PgWorld::start().await else { return };
    let cases: Vec<(String, &str, &str, &str)> = vec![
        (w.w.token("bb", &["branchName=feature/x"]), "28000", "policy-denied", "policy-denied"),
        (w.w.token("bb", &["aud=someone-else"]), "28P01", "invalid-token", "audience-mismatch"),
        (
            w.w.token(
                "bb",
                &[
                    &format!("exp:={}", portcullis::util::unix_now() - 3600),
                    &format!("iat:={}", portcullis::util::unix_now() - 4000),
                ],
            ),
            "28P01",
            "invalid-token",
            "token-expired",
        ),
        ("not-a-jwt".to_string(), "28P01", "invalid-token", "malformed-token"),
    ];
    for (token, code, public, reason) in &cases {
        let err = match w.connect(token, "app").await {
            Ok(_) => panic!("{reason}: connected"),
            Err(e) => e,
        };
        let db =
            err.as_db_error().unwrap_or_else(|| panic!("{reason}: not a database error: {err}"));
        assert_eq!(db.code().code(), *code, "{reason}");
        assert!(
            db.message().contains(public) && db.message().contains("request id"),
            "{reason}: {}",
            db.message()
        );
        assert!(!db.message().contains(token.as_str()));
        let rid = db
            .message()
            .rsplit("request id ")
            .next()
            .unwrap_or("")
            .trim_end_matches(')')
            .to_string();
        let ev =
            w.wait_event(|e| e["kind"] == "pg.session" && e["session_id"] == rid.as_str()).await;
        assert_eq!(ev["event"], "refused", "{reason}");
        assert_eq!(ev["reason"], *reason);
    }
    // psql shows the same message.
    let (ok, _, err) = w.psql(&cases[0].0, "app", "require", "select 1").await;
    assert!(!ok && err.contains("policy-denied") && err.contains("request id"), "{err}");
    // The policy matches the requested role: a pipeline asking for `postgres` is denied.
    let main = w.w.token("bb", &[]);
    let (ok, _, err) = w.psql(&main, "postgres", "require", "select 1").await;
    assert!(!ok && err.contains("policy-denied"), "{err}");
    assert_no_secrets(&w, &[&main, &cases[0].0]);
}

#[tokio::test]
async fn plaintext_is_refused_without_asking_for_a_token_and_gssenc_is_declined() {
    let Some(w) = PgWorld::start().await else { return };
    // psql with sslmode=disable: refused, no password prompt.
    let token = w.w.token("bb", &[]);
    let (ok, _, err) = w.psql(&token, "app", "disable", "select 1").await;
    assert!(!ok && err.contains("plaintext-refused"), "{err}");

    // Raw: a plaintext StartupMessage gets an ErrorResponse, never an authentication request.
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    tcp.write_all(&startup("app", "appdb")).await.unwrap_or_else(|e| panic!("{e}"));
    let out = read_to_close(&mut tcp).await;
    let (code, msg) = error_of(&out);
    assert_eq!(code, "28000");
    assert!(msg.contains("plaintext-refused"), "{msg}");
    assert!(!out.contains(&b'R'), "never an authentication request");

    // GSSENCRequest: 'N', then the client may go on with SSLRequest.
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let gss = portcullis::postgres::proto::startup_packet(
        portcullis::postgres::proto::GSSENC_REQUEST,
        &[],
    );
    tcp.write_all(&gss).await.unwrap_or_else(|e| panic!("{e}"));
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&b, b"N");
    tcp.write_all(&ssl_request()).await.unwrap_or_else(|e| panic!("{e}"));
    tcp.read_exact(&mut b).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&b, b"S");
    // psql with gssencmode=prefer (its default when built with GSS) still works.
    let (ok, out, err) = w.psql(&token, "app", "require", "select 7").await;
    assert!(ok && out == "7", "{err}");
    let refused = w.wait_event(|e| e["reason"] == "plaintext-refused").await;
    assert_eq!(refused["event"], "refused");
}

#[tokio::test]
async fn bad_input_gets_the_right_error_and_nothing_hangs() {
    let Some(w) = PgWorld::start().await else { return };
    // Garbage / wrong protocol before the startup packet.
    for garbage in
        [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &b"\x00\x00\x00\x02xx"[..], &[0xffu8; 64][..]]
    {
        let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
        tcp.write_all(garbage).await.unwrap_or_else(|e| panic!("{e}"));
        let out = read_to_close(&mut tcp).await;
        assert_eq!(error_of(&out).0, "08P01", "{garbage:?}");
    }
    // Oversized startup packet.
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let mut big = (100_000u32).to_be_bytes().to_vec();
    big.extend(196_608u32.to_be_bytes());
    tcp.write_all(&big).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(error_of(&read_to_close(&mut tcp).await).0, "08P01");
    // A database name PostgreSQL would cut to 63 bytes: refused, not matched as written.
    for (user, db) in [("app".to_string(), "d".repeat(64)), ("a".repeat(64), "appdb".to_string())] {
        let mut t = tls_to(&w).await;
        t.write_all(&startup(&user, &db)).await.unwrap_or_else(|e| panic!("{e}"));
        let (code, msg) = error_of(&read_to_close(&mut t).await);
        assert_eq!(code, "42622", "{msg}");
    }
    // Unencrypted bytes right after SSLRequest (CVE-2021-23214 shape).
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let mut m = ssl_request();
    m.extend(startup("app", "appdb"));
    tcp.write_all(&m).await.unwrap_or_else(|e| panic!("{e}"));
    let (code, msg) = error_of(&read_to_close(&mut tcp).await);
    assert_eq!(code, "08P01");
    assert!(msg.contains("protocol-violation"), "{msg}");
    // A client that never finishes TLS: closed after startup_timeout (2 s).
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    tcp.write_all(&ssl_request()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap_or_else(|e| panic!("{e}"));
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    let _ = read_to_close(&mut tcp).await;
    assert!(started.elapsed() < Duration::from_secs(4));
    let ev = w
        .wait_event(|e| {
            e["reason"] == "protocol-violation"
                && e["detail"].as_str().is_some_and(|d| d.contains("not finished"))
        })
        .await;
    assert_eq!(ev["event"], "refused");
    // A client that connects and says nothing at all: also closed.
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    let _ = read_to_close(&mut tcp).await;

    // Inside TLS: garbage instead of the password message.
    let mut t = tls_to(&w).await;
    t.write_all(&startup("app", "appdb")).await.unwrap_or_else(|e| panic!("{e}"));
    let mut r = [0u8; 9];
    t.read_exact(&mut r).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r, [b'R', 0, 0, 0, 8, 0, 0, 0, 3], "AuthenticationCleartextPassword");
    t.write_all(&portcullis::postgres::proto::message(b'Q', b"select 1\0"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(error_of(&read_to_close(&mut t).await).0, "08P01");
    // Inside TLS: an oversized password message.
    let mut t = tls_to(&w).await;
    t.write_all(&startup("app", "appdb")).await.unwrap_or_else(|e| panic!("{e}"));
    t.read_exact(&mut r).await.unwrap_or_else(|e| panic!("{e}"));
    let mut huge = vec![b'p'];
    huge.extend(1_000_000u32.to_be_bytes());
    t.write_all(&huge).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(error_of(&read_to_close(&mut t).await).0, "08P01");
    // Inside TLS: a startup packet with garbage after it (truncated parameters).
    let mut t = tls_to(&w).await;
    let mut bad = startup("app", "appdb");
    let n = bad.len();
    bad[n - 1] = b'x';
    t.write_all(&bad).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(error_of(&read_to_close(&mut t).await).0, "08P01");
    // A session in the relay that sends an oversized message header is terminated.
    let token = w.w.token("bb", &[]);
    let mut t = tls_to(&w).await;
    t.write_all(&startup("app", "appdb")).await.unwrap_or_else(|e| panic!("{e}"));
    t.read_exact(&mut r).await.unwrap_or_else(|e| panic!("{e}"));
    let mut pw = token.clone().into_bytes();
    pw.push(0);
    t.write_all(&portcullis::postgres::proto::message(b'p', &pw))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Read up to ReadyForQuery.
    let mut seen = Vec::new();
    while !seen.windows(6).any(|x| x == [b'Z', 0, 0, 0, 5, b'I']) {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("no ReadyForQuery"))
            .unwrap_or(0);
        assert!(n > 0, "closed before ReadyForQuery: {seen:?}");
        seen.extend_from_slice(&b[..n]);
    }
    t.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await.unwrap_or_else(|e| panic!("{e}"));
    let out = read_to_close(&mut t).await;
    let (code, msg) = error_of(&out);
    assert_eq!(code, "08P01");
    assert!(msg.contains("terminating connection"), "{msg}");
    assert_no_secrets(&w, &[&token]);
}

#[tokio::test]
async fn tokio_postgres_extended_protocol_copy_notifications_large_results_and_cancel() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (c, conn) = w.connect(&token, "app").await.unwrap_or_else(|e| panic!("{e}"));
    let table = format!("t_{}", std::process::id());
    c.batch_execute(&format!("create table {table}(id int primary key, v text)"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Prepared statement with a bind value that must never reach the audit log.
    let secret_value = "bind-value-s3cr3t-9d2";
    let ins = c
        .prepare(&format!("insert into {table}(id, v) values ($1, $2)"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..3 {
        c.execute(&ins, &[&i, &secret_value]).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let row = c
        .query_one(&format!("select count(*)::int from {table} where v = $1"), &[&secret_value])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(row.get::<_, i32>(0), 3);

    // COPY FROM STDIN and COPY TO STDOUT.
    use futures_util::SinkExt;
    let sink = c
        .copy_in(&format!("copy {table}(id, v) from stdin"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 100..5100 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap_or_else(|e| panic!("{e}"));
    let copied = sink.finish().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(copied, 5000);
    let out = c
        .copy_out(&format!("copy (select id, v from {table} order by id) to stdout"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    futures_util::pin_mut!(out);
    let mut got = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut out).await {
        got.extend_from_slice(&chunk.unwrap_or_else(|e| panic!("{e}")));
    }
    assert_eq!(got.iter().filter(|&&b| b == b'\n').count(), 5003);

    // A large result, streamed (about 40 MB).
    let rows = c
        .query_raw(
            "select g, repeat('x', 200) from generate_series(1, 200000) g",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    futures_util::pin_mut!(rows);
    let mut n = 0u64;
    while let Some(r) = futures_util::StreamExt::next(&mut rows).await {
        r.unwrap_or_else(|e| panic!("{e}"));
        n += 1;
    }
    assert_eq!(n, 200_000);

    // Cancel: the proxy's key reaches the right backend.
    let cancel = c.cancel_token();
    let tls = w.tls();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        c.simple_query("select pg_sleep(30) /* cancel-tp */").await.map(|_| c)
    });
    w.until_running("cancel-tp").await;
    cancel.cancel_query(tls).await.unwrap_or_else(|e| panic!("cancel: {e}"));
    let r = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .unwrap_or_else(|_| panic!("cancel did not arrive"))
        .unwrap_or_else(|e| panic!("{e}"));
    let err = match r {
        Ok(_) => panic!("pg_sleep was not cancelled"),
        Err(e) => e,
    };
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let cancel_ev = w.wait_event(|e| e["kind"] == "pg.cancel").await;
    assert_eq!(cancel_ev["forwarded"], true);
    // A cancel with a wrong key is ignored (and the session keeps working).
    let (c2, conn2) = w.connect(&token, "app").await.unwrap_or_else(|e| panic!("{e}"));
    let mut tcp = TcpStream::connect(w.addr).await.unwrap_or_else(|e| panic!("{e}"));
    tcp.write_all(&portcullis::postgres::proto::cancel_request(1, 2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = read_to_close(&mut tcp).await;

    // Notifications between two sessions.
    let (listener, mut lconn) =
        w.pg_config(&token, "app").connect(w.tls()).await.unwrap_or_else(|e| panic!("{e}"));
    let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
    let ltask = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| lconn.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut stream).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
                let _ = ntx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("listen portcullis_test").await.unwrap_or_else(|e| panic!("{e}"));
    c2.batch_execute("notify portcullis_test, 'hello'").await.unwrap_or_else(|e| panic!("{e}"));
    let n = tokio::time::timeout(Duration::from_secs(5), nrx.recv())
        .await
        .unwrap_or_else(|_| panic!("no notification"));
    assert_eq!(n, Some(("portcullis_test".to_string(), "hello".to_string())));
    c2.batch_execute(&format!("drop table {table}")).await.unwrap_or_else(|e| panic!("{e}"));
    drop(listener);
    drop(c2);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn2).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    ltask.abort();

    // Audit: Parse/Bind statements carry their text, never the bind values.
    let stmts = w.events_of("pg.statement").await;
    let inserts: Vec<&Value> = stmts
        .iter()
        .filter(|e| {
            e["text"].as_str().is_some_and(|t| t.starts_with(&format!("insert into {table}")))
        })
        .collect();
    assert_eq!(inserts.len(), 3, "one event per execution");
    assert!(inserts.iter().all(|e| e["protocol"] == "extended"));
    // Every Bind was followed through the server's answers, COPY included.
    let extended: Vec<&Value> = stmts.iter().filter(|e| e["protocol"] == "extended").collect();
    assert!(extended.len() >= 5, "{extended:#?}");
    assert!(
        extended.iter().all(|e| e["text"].is_string()
            && e.get("text_status").is_none()
            && e.get("outcome").is_none()),
        "{extended:#?}"
    );
    assert!(stmts.iter().any(|e| e["text"].as_str().is_some_and(|t| t.starts_with("copy "))));
    assert_no_secrets(&w, &[&token, secret_value]);
}

#[tokio::test]
async fn an_expired_token_ends_its_session_with_57p01_and_an_audit_event() {
    let Some(w) = PgWorld::start().await else { return };
    let exp = portcullis::util::unix_now() + 3;
    let token = w.w.token("bb", &[&format!("exp:={exp}")]);
    let (c, conn) = w.connect(&token, "app").await.unwrap_or_else(|e| panic!("{e}"));
    let r = c.simple_query("select 1").await;
    assert!(r.is_ok(), "works before exp");
    let err = ended_with(conn, Duration::from_secs(8)).await;
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    let msg = err.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("session-expired") && msg.contains("request id"), "{msg}");
    assert!(portcullis::util::unix_now() >= exp, "not before exp");
    let close = w.wait_event(|e| e["event"] == "close" && e["reason"] == "session-expired").await;
    assert_eq!(close["decision"], "terminated");
    assert_eq!(close["ended_by"], "portcullis");
    assert!(c.simple_query("select 1").await.is_err());
}

#[tokio::test]
async fn a_reload_that_revokes_access_terminates_exactly_the_revoked_sessions() {
    let Some(w) = PgWorld::start().await else { return };
    let pipeline = w.w.token("bb", &[]);
    let human = w.w.token("corp", &[]);
    let (pc, pconn) = w.connect(&pipeline, "app").await.unwrap_or_else(|e| panic!("{e}"));
    let (hc, _hconn) = w.connect(&human, "alice").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(pc.simple_query("select 1").await.is_ok());
    // The new revision drops the pipeline rule; engineers keep their access.
    let only_engineers =
        PG_POLICY.split("[[rule]]").nth(2).map(|r| format!("[[rule]]{r}")).unwrap_or_default();
    write(&w.w.policy_path("pg"), &only_engineers);
    assert!(w.w.server().reload().await);
    let ended = tokio::time::timeout(Duration::from_secs(5), pconn)
        .await
        .unwrap_or_else(|_| panic!("revoked session still open"));
    let err = match ended {
        Ok(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"));
    let msg = err.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("access-revoked"), "{msg}");
    let close = w.wait_event(|e| e["event"] == "close" && e["reason"] == "access-revoked").await;
    assert_eq!(close["upstream_role"], "migrator");
    assert!(
        close["detail"].as_str().is_some_and(|d| d.contains("policy-denied (no rule allows it)")),
        "{close}"
    );
    // The engineer's session survives and still works; a new pipeline session is refused.
    let rows = hc
        .simple_query("select current_user")
        .await
        .unwrap_or_else(|e| panic!("engineer session: {e}"));
    assert!(!rows.is_empty());
    assert!(w.connect(&pipeline, "app").await.is_err());
    // A revision that changes the engineers' upstream role also ends their session.
    write(&w.w.policy_path("pg"), &only_engineers.replace("\"readonly\"", "\"migrator\""));
    assert!(w.w.server().reload().await);
    let close = w.wait_event(|e| e["event"] == "close" && e["upstream_role"] == "readonly").await;
    assert_eq!(close["reason"], "access-revoked");
    assert!(
        close["detail"].as_str().is_some_and(|d| d.contains("upstream role changed")),
        "{close}"
    );
}

/// A reload whose deny rule ends a session names the rule (id, file:line) in the
/// `access-revoked` detail; an expired token's detail gives the time in RFC 3339.
#[tokio::test]
async fn a_revoking_deny_rule_is_named_and_an_expiry_is_a_readable_time() {
    let Some(w) = PgWorld::start().await else { return };
    let pipeline = w.w.token("bb", &[]);
    let (pc, pconn) = w.connect(&pipeline, "app").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(pc.simple_query("select 1").await.is_ok());
    let deny = "[[rule]]\nid = \"no-pipelines\"\neffect = \"deny\"\nissuer = \"bb\"\n";
    write(&w.w.policy_path("pg"), &format!("{deny}{PG_POLICY}"));
    assert!(w.w.server().reload().await);
    let _ = tokio::time::timeout(Duration::from_secs(5), pconn).await;
    let close = w.wait_event(|e| e["event"] == "close" && e["reason"] == "access-revoked").await;
    let detail = close["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("denied-by-rule by rule `no-pipelines` ("), "{close}");
    assert!(detail.contains("pg.toml:1)"), "{close}");
    assert!(detail.contains("under policy revision "), "{close}");

    // The token's expiry, as a time a person reads.
    write(&w.w.policy_path("pg"), PG_POLICY);
    assert!(w.w.server().reload().await);
    let exp_soon = portcullis::util::unix_now() + 2;
    let token = w.w.token("bb", &[&format!("exp:={exp_soon}")]);
    let (c, conn) = w.connect(&token, "app").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(c.simple_query("select 1").await.is_ok());
    let _ = tokio::time::timeout(Duration::from_secs(8), conn).await;
    let close = w.wait_event(|e| e["event"] == "close" && e["reason"] == "session-expired").await;
    let when =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(exp_soon))
            .to_string();
    let detail = close["detail"].as_str().unwrap_or_default();
    assert!(detail.ends_with(&format!("at {when})")), "{close}");
    assert!(!detail.contains(&exp_soon.to_string()), "no raw epoch: {close}");
}

/// Round 10: a reload whose issuer no longer accepts an open session's token (its
/// `audiences` changed) ends the session with `access-revoked`, as a new session with
/// that token is refused; a reload that changes nothing the token relies on (another
/// route, an audience added) leaves it open.
#[tokio::test]
async fn a_reload_that_stops_trusting_a_sessions_token_ends_the_session() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (c, conn) = w.connect(&token, "app").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(c.simple_query("select 1").await.is_ok());
    let config = std::fs::read_to_string(w.w.config_path()).unwrap_or_default();
    let other = format!(
        "\n[[routes]]\nname = \"other\"\nmatch = {{ path_prefix = \"/other\" }}\nupstream = \"http://{}\"\npolicy = \"api\"\n",
        w.w.echo.addr()
    );

    let wider =
        crate::forwarding::with_audiences(&config, &format!("{AUD:?}, \"another\""), &other);
    write(&w.w.config_path(), &wider);
    assert!(w.w.server().reload().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c.simple_query("select 'still here'").await;
    assert!(r.is_ok(), "ended by a reload that does not concern its token: {r:?}");

    let narrower = crate::forwarding::with_audiences(&config, "\"another\"", &other);
    write(&w.w.config_path(), &narrower);
    assert!(w.w.server().reload().await);
    // Not outliving the reload that stopped trusting its token.
    let err = ended_with(conn, Duration::from_secs(5)).await;
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"));
    let close = w.wait_event(|e| e["event"] == "close" && e["reason"] == "access-revoked").await;
    assert_eq!(close["decision"], "terminated", "{close}");
    assert!(close["detail"].as_str().is_some_and(|d| d.contains("audience-mismatch")), "{close}");
    assert!(w.connect(&token, "app").await.is_err(), "a new session with the token is refused");
}

#[tokio::test]
async fn shutdown_lets_sessions_finish_then_terminates_them_politely() {
    let Some(mut w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (c, conn) = w.connect(&token, "app").await.unwrap_or_else(|e| panic!("{e}"));
    let server = w.w.server.take().unwrap_or_else(|| panic!("server"));
    let sink = w.w.sink.clone();
    let started = std::time::Instant::now();
    let down = tokio::spawn(server.shutdown());
    // Within the grace period (5 s) new sessions are not accepted (tried until the
    // shutdown task has begun), and the session still works.
    let mut refused = false;
    for _ in 0..40 {
        if TcpStream::connect(w.addr).await.is_err() || w.connect(&token, "app").await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "a new session was accepted during the grace period");
    assert!(c.simple_query("select 1").await.is_ok(), "session works during the grace period");
    let err = ended_with(conn, Duration::from_secs(10)).await;
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"));
    assert!(started.elapsed() >= Duration::from_secs(4), "not before the grace period");
    tokio::time::timeout(Duration::from_secs(10), down).await.ok();
    let lines = sink.lines().join("");
    assert!(lines.contains("\"reason\":\"shutting-down\""));
}

/// A second SIGTERM or SIGINT during the drain ([`Server::hurry`]) ends the grace period
/// for database sessions too: an open session is told `57P01` at once rather than when
/// the grace period (5 s here) runs out, and its `close` event says why.
#[tokio::test]
async fn a_second_signal_ends_database_sessions_at_once() {
    let Some(mut w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let (c, conn) = w.connect(&token, "app").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(c.simple_query("select 1").await.is_ok());
    let server = w.w.server.take().unwrap_or_else(|| panic!("server"));
    let sink = w.w.sink.clone();
    let started = std::time::Instant::now();
    server.hurry();
    let down = tokio::spawn(server.shutdown());
    let err = ended_with(conn, Duration::from_secs(10)).await;
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "waited for the grace period");
    tokio::time::timeout(Duration::from_secs(10), down).await.ok();
    let lines = sink.lines().join("");
    assert!(lines.contains("grace period ended early by a second signal"), "{lines}");
}

#[tokio::test]
async fn pgbench_initializes_and_runs_through_the_proxy() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let run = |args: Vec<String>| {
        let bin = w.pg.bin.join("pgbench");
        let port = w.addr.port().to_string();
        let token = token.clone();
        async move {
            let out = tokio::time::timeout(
                Duration::from_secs(120),
                tokio::process::Command::new(bin)
                    .env("PGPASSWORD", &token)
                    .env("PGSSLMODE", "require")
                    .args(["-h", "127.0.0.1", "-p", &port, "-U", "app"])
                    .args(&args)
                    .arg("appdb")
                    .output(),
            )
            .await
            .unwrap_or_else(|_| panic!("pgbench hung"))
            .unwrap_or_else(|e| panic!("pgbench: {e}"));
            assert!(
                out.status.success(),
                "pgbench {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    run(vec!["-i".into(), "-s".into(), "1".into(), "-q".into()]).await;
    let out = run(vec![
        "-c".into(),
        "4".into(),
        "-j".into(),
        "2".into(),
        "-t".into(),
        "50".into(),
        "-S".into(),
    ])
    .await;
    assert!(out.contains("number of transactions actually processed: 200/200"), "{out}");
    let out =
        run(vec!["-c".into(), "4".into(), "-j".into(), "2".into(), "-t".into(), "20".into()]).await;
    assert!(out.contains("number of transactions actually processed: 80/80"), "{out}");
    let n = w.events_of("pg.statement").await.len();
    assert!(n >= 200 + 80 * 7, "every statement audited ({n})");
    assert_no_secrets(&w, &[&token]);
}

/// `portcullis demo --postgres URL` as a process of its own (its metrics its own, not
/// shared with the tests running in this one), ready: its banner printed.
struct DemoProcess {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    https: u16,
    admin: u16,
    db: u16,
    token: String,
}

impl DemoProcess {
    async fn start(pg: &PgServer) -> DemoProcess {
        const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (https, admin, db) = (free_port(), free_port(), free_port());
        let url = format!("postgres://app:{APP_PW}@127.0.0.1:{}/appdb", pg.port);
        let mut child = tokio::process::Command::new(BIN)
            .args([
                "demo",
                "--listen",
                &format!("127.0.0.1:{https}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ])
            .args([
                "--postgres-listen",
                &format!("127.0.0.1:{db}"),
                "--state-dir",
                &dir.path().to_string_lossy(),
            ])
            .env("PORTCULLIS_DEMO_POSTGRES", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("demo: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("stdout"));
        let mut lines = tokio::io::BufReader::new(stdout);
        let mut banner = String::new();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            use tokio::io::AsyncBufReadExt;
            let mut line = String::new();
            while lines.read_line(&mut line).await.unwrap_or(0) > 0 {
                banner.push_str(&line);
                if line.contains("sslmode=verify-full") {
                    return true;
                }
                line.clear();
            }
            false
        })
        .await;
        assert!(matches!(ready, Ok(true)), "demo banner: {banner}");
        assert!(!banner.contains(APP_PW), "the banner never shows the upstream password");
        // The audit events go on to stdout: read them away so the demo never blocks.
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut lines, &mut tokio::io::sink()).await;
        });
        let token = Command::new(BIN)
            .args(["dev", "token", "--state-dir", &dir.path().to_string_lossy()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        DemoProcess { child, dir, https, admin, db, token }
    }

    /// `psql` to the demo's database route as `user`, verifying the demo's CA.
    fn psql(&self, pg: &PgServer, user: &str, args: &[&str]) -> tokio::process::Command {
        let ca = self.dir.path().join("ca.pem");
        let conn = format!(
            "host=127.0.0.1 port={} sslmode=verify-full sslrootcert={} dbname=appdb user={user}",
            self.db,
            ca.to_string_lossy()
        );
        let mut c = tokio::process::Command::new(pg.bin.join("psql"));
        c.env("PGPASSWORD", &self.token).args(["-X", "-A", "-t", "-w", &conn]).args(args);
        c.kill_on_drop(true);
        c
    }

    /// A sample of the demo's `/metrics` (no labels), polled until it reads `want` (at
    /// most 5 s); what it read last.
    async fn metric(&self, name: &str, want: u64) -> Option<u64> {
        let mut last = None;
        for _ in 0..100 {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.admin))
                .await
                .unwrap_or_else(|e| panic!("admin: {e}"));
            let text = raw_exchange(
                tcp,
                "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            )
            .await;
            last = text
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok());
            if last == Some(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last
    }
}

/// The README flow: `portcullis demo --postgres URL`, a token from `portcullis dev token`,
/// and stock `psql` with `sslmode=verify-full` against the demo's CA, as the banner prints it.
#[tokio::test]
async fn the_demo_serves_a_database_route_for_psql() {
    let Some(pg) = pg() else { return };
    let mut demo = DemoProcess::start(pg).await;
    let config =
        std::fs::read_to_string(demo.dir.path().join("portcullis.toml")).unwrap_or_default();
    assert!(config.contains("[[databases]]") && !config.contains(APP_PW), "{config}");
    let psql = |user: &'static str| demo.psql(pg, user, &["-c", "select 1"]).output();
    let out = tokio::time::timeout(Duration::from_secs(30), psql("app")).await;
    let out = out.unwrap_or_else(|_| panic!("psql hung")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::time::timeout(Duration::from_secs(30), psql("postgres")).await;
    let out = out.unwrap_or_else(|_| panic!("psql hung")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy-denied"),
        "the demo policy keeps everyone off the postgres role"
    );
    let _ = demo.child.kill().await;
}

/// `portcullis_connections_open` counts every client connection open, as metrics.md says:
/// a database session and a WebSocket tunnel too, for as long as they last. It counted
/// HTTP connections only, and only until a WebSocket upgrade handed the connection to its
/// tunnel (which keeps its `max_connections` slot): with every slot held by sessions and
/// tunnels, the gauge said 0. In a demo process of its own: the gauge is process-wide,
/// and the tests of this binary run side by side.
#[tokio::test]
async fn connections_open_counts_database_sessions_and_websocket_tunnels() {
    use futures_util::{SinkExt, StreamExt};
    use rustls_pki_types::pem::PemObject as _;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let Some(pg) = pg() else { return };
    let mut demo = DemoProcess::start(pg).await;
    const OPEN: &str = "portcullis_connections_open";
    assert_eq!(demo.metric(OPEN, 0).await, Some(0));

    // A database session, held open by psql waiting on its stdin.
    let mut psql = demo
        .psql(pg, "app", &["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("psql: {e}"));
    let mut stdin = psql.stdin.take().unwrap_or_else(|| panic!("stdin"));
    let mut out = tokio::io::BufReader::new(psql.stdout.take().unwrap_or_else(|| panic!("out")));
    stdin.write_all(b"select 'session-open';\n").await.unwrap_or_else(|e| panic!("{e}"));
    stdin.flush().await.unwrap_or_else(|e| panic!("{e}"));
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(30), out.read_line(&mut line)).await;
    assert!(matches!(read, Ok(Ok(n)) if n > 0) && line.trim() == "session-open", "{line:?}");
    assert_eq!(demo.metric(OPEN, 1).await, Some(1), "the database session");

    // A WebSocket tunnel to the demo's echo upstream.
    let ca = rustls_pki_types::CertificateDer::from_pem_file(demo.dir.path().join("ca.pem"))
        .unwrap_or_else(|e| panic!("ca.pem: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap_or_else(|e| panic!("{e}"));
    let mut tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|e| panic!("{e}"));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", demo.https))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let name =
        rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS: {e}"));
    let mut req = format!("wss://127.0.0.1:{}/ws", demo.https)
        .into_client_request()
        .unwrap_or_else(|e| panic!("{e}"));
    let bearer = format!("Bearer {}", demo.token);
    req.headers_mut().insert("authorization", bearer.parse().unwrap_or_else(|e| panic!("{e:?}")));
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .unwrap_or_else(|e| panic!("ws connect: {e}"));
    ws.send(Message::text("hi")).await.unwrap_or_else(|e| panic!("{e}"));
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(matches!(echoed, Ok(Some(Ok(Message::Text(_))))), "{echoed:?}");
    assert_eq!(demo.metric(OPEN, 2).await, Some(2), "the session and the tunnel");

    // Each ends, and the gauge follows.
    drop(ws);
    assert_eq!(demo.metric(OPEN, 1).await, Some(1), "the tunnel closed");
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(30), psql.wait()).await;
    assert_eq!(demo.metric(OPEN, 0).await, Some(0), "the session closed");
    let _ = demo.child.kill().await;
}

/// `demo --postgres` with a wrong password started, printed its `psql` line, and the
/// mistake showed only there, as a refused session. It now logs in once at start and
/// stops, saying which server and role refused it, never with the password.
#[tokio::test]
async fn the_demo_checks_its_database_password_at_start() {
    let Some(pg) = pg() else { return };
    const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (https, admin, db) = (free_port(), free_port(), free_port());
    let wrong = "not-the-app-password-7f3c";
    let url = format!("postgres://app:{wrong}@127.0.0.1:{}/appdb", pg.port);
    let child = tokio::process::Command::new(BIN)
        .args(["demo", "--listen", &format!("127.0.0.1:{https}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--postgres-listen", &format!("127.0.0.1:{db}")])
        .args(["--state-dir", &dir.path().to_string_lossy()])
        .env("PORTCULLIS_DEMO_POSTGRES", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("demo: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await;
    let out =
        out.unwrap_or_else(|_| panic!("the demo did not stop")).unwrap_or_else(|e| panic!("{e}"));
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        !stdout.contains("sslmode=verify-full"),
        "no psql line for a route that cannot log in: {stdout}"
    );
    assert!(
        stderr.contains(&format!("--postgres: cannot log in to 127.0.0.1:{} as app", pg.port))
            && stderr.contains("28P01"),
        "{stderr}"
    );
    assert!(!stdout.contains(wrong) && !stderr.contains(wrong), "{stdout}{stderr}");
}

/// pgbench's `-M extended` and `-M prepared` in pipeline mode (`\startpipeline`): every
/// Bind the server ran is audited exactly once, with the text of the statement its name
/// stood for when it ran (pgbench parses a pipeline's statements up front, before any
/// answer, then binds them by name, pipelined).
#[tokio::test]
async fn pgbench_pipelines_are_audited_exactly_once_with_their_text() {
    let Some(w) = PgWorld::start().await else { return };
    let token = w.w.token("bb", &[]);
    let pid = std::process::id();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for mode in ["extended", "prepared"] {
        let texts = [
            format!("select :v + 0 as a /* one-{mode}-{pid} */;"),
            format!("select 'two-{mode}-{pid}', :v;"),
            format!("select 'three-{mode}-{pid}';"),
            format!("select 'four-{mode}-{pid}';"),
        ];
        let script = dir.path().join(format!("{mode}.sql"));
        let body = format!(
            "\\set v random(1, 1000)\n\\startpipeline\n{}\n{}\n\\endpipeline\n\\startpipeline\n{}\n\\endpipeline\n{}\n",
            texts[0], texts[1], texts[2], texts[3]
        );
        std::fs::write(&script, body).unwrap_or_else(|e| panic!("{e}"));
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(w.pg.bin.join("pgbench"))
                .env("PGPASSWORD", &token)
                .env("PGSSLMODE", "require")
                .args(["-h", "127.0.0.1", "-p", &w.addr.port().to_string(), "-U", "app"])
                .args(["-n", "-t", "7", "-c", "2", "-M", mode, "-f"])
                .arg(&script)
                .arg("appdb")
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("pgbench hung"))
        .unwrap_or_else(|e| panic!("pgbench: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("number of transactions actually processed: 14/14"),
            "{mode}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen = w.events_of("pg.statement").await;
            seen.retain(|e| e["outcome"] != "prepared");
            seen.retain(|e| {
                e["text"].as_str().is_some_and(|t| t.contains(&format!("-{mode}-{pid}")))
            });
            if seen.len() >= 4 * 14 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(seen.len(), 4 * 14, "{mode}: {seen:#?}");
        for (i, text) in texts.iter().enumerate() {
            let sql = text.replace(":v", "$1");
            let mine: Vec<&Value> = seen.iter().filter(|e| e["text"] == sql.as_str()).collect();
            assert_eq!(mine.len(), 14, "{mode} {sql}: {seen:#?}");
            for e in mine {
                assert_eq!(e["protocol"], "extended", "{e:#}");
                assert!(e.get("outcome").is_none() && e.get("text_status").is_none(), "{e:#}");
                let statement = if mode == "prepared" { Some(format!("P_{i}")) } else { None };
                assert_eq!(e["statement"].as_str(), statement.as_deref(), "{e:#}");
            }
        }
    }
    assert_no_secrets(&w, &[&token]);
}
