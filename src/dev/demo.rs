//! `portcullis demo`: a complete, working set-up with no outside services — a dev
//! OIDC issuer (discovery + JWKS over TLS on loopback), an echo upstream, and the proxy
//! itself, started from a generated configuration through exactly the same code path
//! as `portcullis serve`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::issuer::DevIssuer;
use super::signer::DevSigner;
use super::token::{DemoState, DEMO_AUDIENCE};
use crate::identity::Algorithm;

/// The demo policy, embedded so the demo runs from any directory.
pub const DEMO_POLICY: &str = include_str!("../../policies/demo.toml");

/// Options of `portcullis demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub insecure_http: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub insecure_bind_any: bool,
    pub state_dir: PathBuf,
    /// `--postgres postgres://user:pass@host:port/db`: also serve a database route.
    pub postgres: Option<String>,
    /// Where that database route listens.
    pub postgres_listen: SocketAddr,
}

/// The parts of a `postgres://user:pass@host:port/db` URL the demo needs.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: Option<String>,
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// Parses `postgres://user:pass@host[:port][/db]` (user and password percent-decoded).
/// Errors never repeat the password.
pub fn parse_postgres_url(url: &str) -> Result<PostgresUrl, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or("--postgres: expected postgres://user:password@host:port/database")?;
    let (creds, rest) = rest.rsplit_once('@').ok_or(
        "--postgres: the URL needs user:password@ (portcullis holds the upstream credentials)",
    )?;
    let (user, password) = creds.split_once(':').ok_or("--postgres: the URL needs a password")?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| "--postgres: user or password is not UTF-8".to_string())
    };
    let (authority, database) = match rest.split_once('/') {
        Some((a, d)) => {
            (a, Some(d.split('?').next().unwrap_or(d).to_string()).filter(|d| !d.is_empty()))
        }
        None => (rest, None),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| "--postgres: bad port".to_string())?),
        None => (authority, 5432),
    };
    if host.is_empty() || user.is_empty() {
        return Err("--postgres: missing host or user".into());
    }
    Ok(PostgresUrl {
        host: host.to_string(),
        port,
        user: decode(user)?,
        password: decode(password)?,
        database,
    })
}

/// The name of the `[[databases]]` route `--postgres` adds.
pub const DEMO_DATABASE_ROUTE: &str = "demo-db";

/// The `[[databases]]` route the demo adds for `--postgres`; the password is in a file
/// next to the configuration (mode 0600), never in it.
pub fn demo_database_config(listen: SocketAddr, pg: &PostgresUrl, password_file: &str) -> String {
    format!(
        "\n[[databases]]\nname = \"{DEMO_DATABASE_ROUTE}\"\nlisten = {}\nupstream = {}\nupstream_user = {}\npassword_file = {}\npolicy = \"demo\"\nsession_id_in_application_name = true\n",
        toml_str(&listen.to_string()),
        toml_str(&format!("postgres://{}:{}", pg.host, pg.port)),
        toml_str(&pg.user),
        toml_str(password_file),
    )
}

/// Where the demo keeps its generated files unless told otherwise.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("PORTCULLIS_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("portcullis-demo"))
}

/// Refuses a non-loopback bind unless the user said `--insecure-bind-any` (like
/// `vault server -dev`): the demo's keys and policy are public.
pub fn check_bind(addrs: &[SocketAddr], insecure_bind_any: bool) -> Result<(), String> {
    for a in addrs {
        if !a.ip().is_loopback() && !insecure_bind_any {
            return Err(format!(
                "refusing to bind the demo to {a}: it is not a loopback address and the demo's keys are public; pass --insecure-bind-any to do it anyway"
            ));
        }
    }
    Ok(())
}

/// An exclusive lock on a demo's state directory, held for the life of the demo: a
/// second demo on the same directory would rewrite the configuration the first one
/// watches (pointing it at its own issuer and upstream, dead once it fails to bind) and
/// the keys `dev token` signs with. `flock`, so a demo killed with -9 leaves no stale lock.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    pub const FILE: &'static str = "demo.lock";

    /// Takes the lock on `dir` (it must exist) or says which process holds it. The
    /// lock file is never followed through a symbolic link (`O_NOFOLLOW`).
    pub fn take(dir: &Path) -> Result<StateLock, String> {
        use std::io::{Read as _, Seek as _};
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(Self::FILE);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(NOFOLLOW)
            .open(&path)
            .map_err(|e| open_error(&path, &e))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                let pid = pid.trim();
                let who = if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                    format!(" (pid {pid})")
                } else {
                    String::new()
                };
                return Err(format!(
                    "another demo is using {}{who}; stop it, or give this one another --state-dir",
                    dir.display()
                ));
            }
            Err(e) => return Err(format!("{}: cannot lock: {e}", path.display())),
        }
        f.set_len(0).map_err(|e| format!("{}: {e}", path.display()))?;
        f.rewind().map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(f, "{}", std::process::id()).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(StateLock { _file: f })
    }
}

/// `O_NOFOLLOW`: every file the demo writes in its state directory is opened without
/// following a symbolic link planted there.
#[allow(clippy::cast_possible_wrap)]
const NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;

/// An error opening `path` in the state directory; a symbolic link (`ELOOP` under
/// `O_NOFOLLOW`) said in words.
fn open_error(path: &Path, e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        format!(
            "{}: is a symbolic link; the demo does not follow links in its state directory (remove it)",
            path.display()
        )
    } else {
        format!("{}: {e}", path.display())
    }
}

/// Refuses a state directory another user could have prepared or can change: one that
/// is a symbolic link, not a directory, not owned by the current user, or writable by
/// group or others (the default is under the shared temporary directory, where anyone
/// may create `/tmp/portcullis-demo` first, with links to the user's files in it).
pub fn check_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let refuse = |why: String| {
        Err(format!(
            "refusing the demo state directory {}: {why}; remove it, or give another --state-dir",
            dir.display()
        ))
    };
    if m.file_type().is_symlink() {
        return refuse("it is a symbolic link".into());
    }
    if !m.is_dir() {
        return refuse("it is not a directory".into());
    }
    let me = rustix::process::geteuid().as_raw();
    if m.uid() != me {
        return refuse(format!("it is owned by uid {}, not by you (uid {me})", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return refuse(format!(
            "it is writable by group or others (mode {:o}); `chmod go-w` it",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Creates `dir` (mode 0700) if it does not exist, then [`check_state_dir`].
fn prepare_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    check_state_dir(dir)
}

/// Files the demo generates for browser sign-in (mode 0600).
const SESSION_KEYS_FILE: &str = "session-keys";
const CLIENT_SECRET_FILE: &str = "client-secret";

/// A random secret in `dir/name` unless one is there; returns it.
fn load_or_create_secret(dir: &Path, name: &str) -> Result<String, String> {
    let path = dir.join(name);
    if let Ok(s) = std::fs::read_to_string(&path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_string());
        }
    }
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| "no randomness".to_string())?;
    use base64::Engine as _;
    let s = base64::engine::general_purpose::STANDARD.encode(b);
    write_private(&path, format!("{s}\n").as_bytes())?;
    Ok(s)
}

fn load_or_create_key(dir: &Path) -> Result<DevSigner, String> {
    let path = dir.join("issuer-key.pk8");
    if let Ok(der) = std::fs::read(&path) {
        if let Ok(s) = DevSigner::from_pkcs8_der(Algorithm::RS256, "demo-key-1", &der) {
            return Ok(s);
        }
    }
    let s = DevSigner::generate_rs256("demo-key-1").map_err(|e| e.to_string())?;
    write_private(&path, &s.pkcs8_der())?;
    Ok(s)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    write_mode(path, bytes, 0o600)
}

/// Writes `path` (created with `mode`), never through a symbolic link.
fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(NOFOLLOW)
        .open(path)
        .map_err(|e| open_error(path, &e))?;
    f.write_all(bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The configuration the demo serves, in the same language as production configs.
pub fn demo_config(
    opts: &DemoOptions,
    issuer_urls: &std::collections::BTreeMap<String, String>,
    upstream: &str,
    pki: &crate::tls::DevPki,
) -> String {
    let mut c = String::new();
    c.push_str("# Generated by `portcullis demo`. Same language as production configs.\n");
    c.push_str("[listen]\n");
    c.push_str(&format!("https = {}\n", toml_str(&opts.listen.to_string())));
    if let Some(h) = opts.insecure_http {
        c.push_str(&format!("insecure_http = {}\n", toml_str(&h.to_string())));
    }
    c.push_str(&format!("admin = {}\n\n", toml_str(&opts.admin.to_string())));
    c.push_str("[tls]\n");
    c.push_str(&format!("cert = {}\n", toml_str(&pki.cert_path().to_string_lossy())));
    c.push_str(&format!("key = {}\n\n", toml_str(&pki.key_path().to_string_lossy())));
    // 384 connections fit the common `ulimit -n` of 1024 (two descriptors per connection
    // under load, plus 256 spare): no descriptor warning on a default shell.
    c.push_str(
        "[server]\npolicy_dir = \"policies\"\nshutdown_grace = \"5s\"\nmax_connections = 384\n\n",
    );
    c.push_str(&format!(
        "[assertion]\nissuer = {}\n\n",
        toml_str(&format!("https://{}", opts.listen))
    ));
    // Browser sign-in: sealed session cookies; the key is generated into the state dir.
    c.push_str(&format!(
        "[session]\nkeys_file = {}\nabsolute_lifetime = \"8h\"\nidle_lifetime = \"1h\"\n\n",
        toml_str(&opts.state_dir.join(SESSION_KEYS_FILE).to_string_lossy())
    ));
    let ca = pki.ca_path();
    for (preset, name) in [
        ("bitbucket-pipelines", "demo-bitbucket"),
        ("github-actions", "demo-github"),
        ("gitlab-ci", "demo-gitlab"),
        ("human", "demo-human"),
    ] {
        let Some(url) = issuer_urls.get(preset) else { continue };
        c.push_str(&format!("[issuers.{name}]\n"));
        if preset != "human" {
            c.push_str(&format!("preset = {}\n", toml_str(preset)));
        } else {
            c.push_str(&format!("client_id = {}\n", toml_str(DEMO_AUDIENCE)));
            c.push_str(&format!(
                "login = {{ client_id = {}, client_secret_file = {}, scopes = [\"openid\", \"email\", \"profile\", \"groups\"] }}\n",
                toml_str(DEMO_AUDIENCE),
                toml_str(&opts.state_dir.join(CLIENT_SECRET_FILE).to_string_lossy())
            ));
        }
        c.push_str(&format!("issuer = {}\n", toml_str(url)));
        c.push_str(&format!("audiences = [{}]\n", toml_str(DEMO_AUDIENCE)));
        c.push_str(&format!("ca = {}\n\n", toml_str(&ca.to_string_lossy())));
    }
    c.push_str("[[routes]]\nname = \"demo\"\nmatch = { host = \"*\", path_prefix = \"/\" }\n");
    c.push_str(&format!("upstream = {}\npolicy = \"demo\"\n", toml_str(upstream)));
    c
}

/// Runs the demo until SIGTERM/SIGINT.
pub async fn run(opts: DemoOptions) -> Result<(), String> {
    let mut binds = vec![opts.listen, opts.admin];
    let postgres = opts.postgres.as_deref().map(parse_postgres_url).transpose()?;
    if postgres.is_some() {
        binds.push(opts.postgres_listen);
    }
    binds.extend(opts.insecure_http);
    check_bind(&binds, opts.insecure_bind_any)?;
    let dir = &opts.state_dir;
    // Owned by the user and writable by no one else, before anything is written in it.
    prepare_dir(dir)?;
    prepare_dir(&dir.join("policies"))?;
    // Before anything in the directory is written: a running demo hot-reloads its
    // configuration from here, and `dev token` reads its keys and issuer URLs.
    let _lock = StateLock::take(dir)?;

    let mut names = vec![];
    if !opts.listen.ip().is_unspecified() {
        names.push(opts.listen.ip().to_string());
    }
    let pki = crate::tls::DevPki::load_or_create(dir, &names)
        .map_err(|e| format!("dev certificates: {e}"))?;
    let signer = load_or_create_key(dir)?;

    let issuer_tls =
        crate::tls::server_config(pki.key_source(), vec![]).map_err(|e| e.to_string())?;
    let issuer = DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), Some(issuer_tls))
        .await
        .map_err(|e| format!("dev issuer: {e}"))?;
    let mut urls = std::collections::BTreeMap::new();
    for (preset, path) in [
        ("bitbucket-pipelines", "/bitbucket"),
        ("github-actions", "/github"),
        ("gitlab-ci", "/gitlab"),
        ("human", "/human"),
    ] {
        urls.insert(preset.to_string(), issuer.add_issuer(path, &[&signer]));
    }
    // The human issuer also signs browsers in: a form with any name and chosen groups.
    load_or_create_secret(dir, SESSION_KEYS_FILE)?;
    let client_secret = load_or_create_secret(dir, CLIENT_SECRET_FILE)?;
    let _login =
        super::login::DevLogin::install(&issuer, "/human", &signer, DEMO_AUDIENCE, &client_secret)
            .ok_or("dev sign-in: no /human issuer")?;

    let (upstream, _echo) = match &opts.upstream {
        Some(u) => (u.clone(), None),
        None => {
            let echo = super::echo::EchoServer::start(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("echo upstream: {e}"))?;
            (format!("http://{}", echo.addr()), Some(echo))
        }
    };

    let config_path = dir.join("portcullis.toml");
    let mut config_text = demo_config(&opts, &urls, &upstream, &pki);
    if let Some(pg) = &postgres {
        write_private(&dir.join("pg-password"), pg.password.as_bytes())?;
        config_text.push_str(&demo_database_config(opts.postgres_listen, pg, "pg-password"));
    }
    write_mode(&config_path, config_text.as_bytes(), 0o644)?;
    let policy_path = dir.join("policies").join("demo.toml");
    write_mode(&policy_path, DEMO_POLICY.as_bytes(), 0o644)?;

    let state = DemoState {
        issuers: urls.clone(),
        audience: DEMO_AUDIENCE.to_string(),
        kid: signer.kid().to_string(),
        key_file: "issuer-key.pk8".into(),
        proxy_url: format!("https://{}", opts.listen),
        ca_file: pki.ca_path(),
    };
    let state_json = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
    write_mode(&dir.join(DemoState::FILE), state_json.as_bytes(), 0o644)?;

    let config = crate::config::Config::load(&config_path).map_err(|e| e.to_string())?;
    let server = crate::server::Server::start(config, Default::default()).await?;
    let verifier = server.shared.runtime.load().verifier.clone();
    if !verifier.wait_ready(Duration::from_secs(15)).await {
        return Err("the dev issuer's keys did not load within 15 s".into());
    }
    // A wrong password (or a server not there) showed only at the first `psql`, as a
    // refused session: log in once now, and say so. Never with the password.
    if let Some(pg) = &postgres {
        let db = pg.database.clone().unwrap_or_else(|| pg.user.clone());
        if let Err(e) = server.postgres.check_upstream_login(DEMO_DATABASE_ROUTE, &db).await {
            return Err(format!(
                "--postgres: cannot log in to {}:{} as {} (database {db}): {e}; check the user, password and database in the URL",
                pg.host, pg.port, pg.user
            ));
        }
    }

    // Every path printed into a command line is quoted for the shell: the binary's own
    // and the state directory (`--state-dir`) may hold a space or a quote.
    let exe = std::env::current_exe()
        .map(|p| shell_quote(&p.to_string_lossy()))
        .unwrap_or_else(|_| "portcullis".into());
    let dir_flag = if opts.state_dir == default_state_dir() {
        String::new()
    } else {
        format!(" --state-dir {}", shell_quote(&opts.state_dir.to_string_lossy()))
    };
    let ca = shell_quote(&pki.ca_path().to_string_lossy());
    let url = format!("https://{}", opts.listen);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {url} (CA certificate: {})", pki.ca_path().display());
    let _ =
        writeln!(out, "  dev issuer:  {} (bitbucket, github, gitlab, human)", issuer.base_url());
    let _ = writeln!(out, "  upstream:    {upstream}");
    let _ = writeln!(
        out,
        "  admin:       http://{}/metrics",
        server.bound().admin.unwrap_or(opts.admin)
    );
    let _ = writeln!(out, "  config:      {}", config_path.display());
    let _ = writeln!(out, "  policy:      {}", policy_path.display());
    let _ = writeln!(out);
    let _ = writeln!(out, "Try it (one JSON audit event per request follows on this terminal):");
    let _ = writeln!(out, "  # no token: 401");
    let _ = writeln!(out, "  curl -si --cacert {ca} {url}/hello");
    // With `--upstream` the user's own service answers: it receives the identity, it
    // need not echo it.
    let sees = match opts.upstream {
        Some(_) => "your upstream receives the verified identity (X-Portcullis-* headers, the signed assertion)",
        None => "the upstream echoes the verified identity",
    };
    let _ = writeln!(
        out,
        "  # a Bitbucket Pipelines token for the demo repository on main: 200, {sees}"
    );
    let _ = writeln!(out, "  curl -s --cacert {ca} -H \"Authorization: Bearer $({exe} dev token{dir_flag})\" {url}/hello");
    let _ = writeln!(out, "  # the same token from a feature branch: 403 policy-denied");
    let _ = writeln!(
        out,
        "  curl -si --cacert {ca} -H \"Authorization: Bearer $({exe} dev token{dir_flag} --claim branchName=feature/x)\" {url}/hello"
    );
    let _ = writeln!(out, "  # other presets: --preset github-actions | gitlab-ci | human");
    if let Some(pg) = &postgres {
        let db = pg.database.clone().unwrap_or_else(|| pg.user.clone());
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "PostgreSQL on {} -> {}:{} as {} (the client never sees that password):",
            opts.postgres_listen, pg.host, pg.port, pg.user
        );
        let token = format!("{exe} dev token{dir_flag}");
        let _ = writeln!(out, "  {}", psql_line(&token, opts.postgres_listen, &pki.ca_path(), &db));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Or open {url}/ in a browser (trust the CA above, or accept the warning): sign in with any name;"
    );
    let _ = writeln!(
        out,
        "the demo policy admits the engineering group, and {}. Sign out: {url}/.portcullis/logout",
        match opts.upstream {
            Some(_) => "your upstream receives who you are",
            None => "the upstream echoes who you are",
        }
    );
    let _ = writeln!(out);
    let _ = out.flush();
    drop(out);

    server.log_serving();
    let r = server.run_until_signalled().await;
    drop(issuer);
    r
}

/// The `psql` command the demo prints, for a POSIX shell: the password from `token`
/// (a command line), the connection string one shell word, and in it the CA path and
/// the database name quoted as libpq reads them, so that a state directory with a space
/// or a quote in its name still connects when the line is pasted.
fn psql_line(token: &str, listen: SocketAddr, ca: &Path, db: &str) -> String {
    let conninfo = format!(
        "host={} port={} sslmode=verify-full sslrootcert={} dbname={} user=app",
        listen.ip(),
        listen.port(),
        conninfo_quote(&ca.to_string_lossy()),
        conninfo_quote(db)
    );
    format!("PGPASSWORD=$({token}) psql {} -c 'select 1'", shell_quote(&conninfo))
}

/// A value of a libpq connection string: as it is when plain, otherwise in single quotes
/// with `\` and `'` escaped by a backslash (libpq's keyword/value connection strings).
fn conninfo_quote(v: &str) -> String {
    if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c)) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', r"\\").replace('\'', r"\'"))
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_parse_and_never_echo_the_password() {
        let u = parse_postgres_url("postgres://app:p%40ss@127.0.0.1:5433/appdb")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.host.as_str(), u.port, u.user.as_str()), ("127.0.0.1", 5433, "app"));
        assert_eq!(u.password, "p@ss");
        assert_eq!(u.database.as_deref(), Some("appdb"));
        assert!(!format!("{u:?}").contains("p@ss"));
        let d = parse_postgres_url("postgresql://a:b@db").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((d.port, d.database), (5432, None));
        for bad in [
            "http://a:b@h/d",
            "postgres://h:5432/d",
            "postgres://a@h/d",
            "postgres://a:secretpw@h:x/d",
        ] {
            let e = parse_postgres_url(bad).err().unwrap_or_default();
            assert!(!e.is_empty() && !e.contains("secretpw"), "{bad}: {e}");
        }
        let cfg = demo_database_config(([127, 0, 0, 1], 6432).into(), &u, "pg-password");
        assert!(
            cfg.contains("listen = \"127.0.0.1:6432\"")
                && cfg.contains("upstream = \"postgres://127.0.0.1:5433\"")
        );
        assert!(!cfg.contains("p@ss"), "the password goes to a file, not the config");
    }

    /// A `demo.lock` planted as a symbolic link to a file of the user is not followed
    /// (the file is neither truncated nor given the pid), nor is any other state file.
    #[test]
    fn the_lock_and_state_files_never_follow_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "precious data\n").unwrap_or_else(|e| panic!("{e}"));
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&victim, state.join(StateLock::FILE))
            .unwrap_or_else(|e| panic!("{e}"));
        let err = StateLock::take(&state).err().unwrap_or_default();
        assert!(err.ends_with("demo.lock: is a symbolic link; the demo does not follow links in its state directory (remove it)"), "{err}");
        std::os::unix::fs::symlink(&victim, state.join("issuer-key.pk8"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(load_or_create_key(&state).is_err(), "the key is not written through it");
        std::os::unix::fs::symlink(&victim, state.join("portcullis.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(write_mode(&state.join("portcullis.toml"), b"x", 0o644).is_err());
        let left = std::fs::read_to_string(&victim).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(left, "precious data\n");
    }

    /// A state directory writable by others (or not the user's) is refused before
    /// anything is written in it; the user's own private directory is taken.
    #[test]
    fn a_state_dir_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let state = dir.path().join("state");
        prepare_dir(&state).unwrap_or_else(|e| panic!("{e}"));
        check_state_dir(&state).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|e| panic!("{e}"));
        let err = check_state_dir(&state).err().unwrap_or_default();
        assert!(err.contains("writable by group or others (mode 777)"), "{err}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&state, &link).unwrap_or_else(|e| panic!("{e}"));
        let err = check_state_dir(&link).err().unwrap_or_default();
        assert!(err.contains("it is a symbolic link"), "{err}");
        // Owned by another user: `/` is root's (skipped when the tests run as root).
        if rustix::process::geteuid().as_raw() != 0 {
            let err = check_state_dir(Path::new("/")).err().unwrap_or_default();
            assert!(err.contains("not by you"), "{err}");
        }
    }

    #[test]
    fn a_state_dir_is_locked_by_one_demo_at_a_time() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = StateLock::take(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let second = StateLock::take(dir.path()).err().unwrap_or_default();
        assert_eq!(
            second,
            format!(
                "another demo is using {} (pid {}); stop it, or give this one another --state-dir",
                dir.path().display(),
                std::process::id()
            )
        );
        drop(first);
        assert!(StateLock::take(dir.path()).is_ok(), "released with its holder");
    }

    /// The printed `psql` line works pasted into a shell whatever the state directory is
    /// called: run by `sh` with the real `psql`, libpq reads the CA path the demo put in
    /// the line (a server that agrees to TLS makes it load the file, and its error names
    /// the path it read). The path went into the connection string unquoted, and a
    /// space split it (`missing "=" after "demo/pki/ca.pem"`).
    #[test]
    fn the_printed_psql_line_survives_a_state_dir_with_a_space_or_a_quote() {
        use std::io::{Read as _, Write as _};
        use std::process::Command;
        let psql = Command::new("psql").arg("--version").output();
        if !psql.is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: no psql on PATH");
            return;
        }
        // Answers a client's SSLRequest with `S`, so that libpq goes on to its CA file.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut request = [0u8; 8];
                if s.read_exact(&mut request).is_ok() {
                    let _ = s.write_all(b"S");
                }
            }
        });
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for name in ["my demo", "it's a $HOME demo", r"back\slash demo", "plain"] {
            let ca = dir.path().join(name).join("pki").join("ca.pem");
            let line = psql_line("true dev token", addr, &ca, "app db");
            let out = Command::new("sh")
                .arg("-c")
                .arg(&line)
                .env("PGCONNECT_TIMEOUT", "5")
                .env("PGGSSENCMODE", "disable")
                .output()
                .unwrap_or_else(|e| panic!("sh: {e}"));
            let err = String::from_utf8_lossy(&out.stderr);
            let read = format!("root certificate file \"{}\" does not exist", ca.display());
            assert!(err.contains(&read), "{line}\n{err}");
        }
    }

    #[test]
    fn non_loopback_binds_need_the_insecure_flag() {
        let any: SocketAddr = ([0, 0, 0, 0], 8443).into();
        let lo: SocketAddr = ([127, 0, 0, 1], 8443).into();
        assert!(check_bind(&[lo], false).is_ok());
        assert!(check_bind(&[lo, any], false).is_err());
        assert!(check_bind(&[any], true).is_ok());
    }
}
