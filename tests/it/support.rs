//! The test world: a dev issuer over TLS, the echo upstream, the proxy, and a client
//! that trusts the dev CA. Everything on 127.0.0.1 with ports picked by the OS.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portcullis::audit::AuditSink;
use portcullis::config::Config;
use portcullis::dev::echo::EchoServer;
use portcullis::dev::issuer::DevIssuer;
use portcullis::dev::login::DevLogin;
use portcullis::dev::signer::DevSigner;
use portcullis::dev::token::{apply_preset_overrides, preset_claims};
use portcullis::server::{Options, Server};
use portcullis::tls::DevPki;
use serde_json::Value;

pub const AUD: &str = "portcullis-test";

/// A loopback port free now, for a listener that binds it later (a child process, a
/// PostgreSQL server, a reload). Picked below the kernel's ephemeral range: a port from
/// `bind(0)`, once released, could be given to another test's listener on port 0 before
/// the child bound it ("Address already in use", seen under load); no port is handed out
/// twice in this process. Falls back to `bind(0)` where that range starts too low.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const FROM: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|l| l.parse::<u32>().ok()))
        .unwrap_or(32_768);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if ephemeral >= FROM + 1_000 {
        let span = ephemeral - FROM;
        // Where to start looking: differs between processes (two test runs at once).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut at = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % span;
        for _ in 0..span {
            at = (at + 7_919) % span; // a prime step: every port of the span in turn
            let Ok(port) = u16::try_from(FROM + at) else { continue };
            if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.push(port);
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}

/// Held by every test whose world closes HTTPS connections as idle (`idle_timeout` of a
/// second): `portcullis_idle_connections_closed_total` is the process's, and the tests
/// run in parallel in one process, so a test that counts its own idle closes would also
/// count another's (seen under load: 4 where the test closed 3).
pub static IDLE_CLOSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// The header values the echo upstream says it received.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].get(0).and_then(|v| v.as_str()).map(str::to_string)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub type TestClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client trusting the dev CA, HTTP/1.1 only or HTTP/2 only.
pub fn client(pki: &DevPki, h2: bool) -> TestClient {
    let tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(pki.root_store()).with_no_client_auth());
    let tls = match tls {
        Ok(t) => t,
        Err(e) => panic!("client TLS: {e}"),
    };
    let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let conn = if h2 { b.enable_http2().build() } else { b.enable_http1().build() };
    Client::builder(TokioExecutor::new()).http2_only(h2).build(conn)
}

/// The issuers every test world declares, with their dev-issuer paths.
pub const ISSUERS: &[(&str, &str, &str)] = &[
    ("bb", "bitbucket-pipelines", "/bitbucket"),
    ("gh", "github-actions", "/github"),
    ("gl", "gitlab-ci", "/gitlab"),
    ("corp", "human", "/human"),
];

/// A policy allowing the demo identities of every preset.
pub const ALLOW_ALL_PRESETS: &str = r#"
[[rule]]
id = "bb-main"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = ["main", "release/*"] }

[[rule]]
id = "gh-main"
effect = "allow"
issuer = "gh"
ci = { workspace_id = "1001", ref = "refs/heads/main" }

[[rule]]
id = "gl-main"
effect = "allow"
issuer = "gl"
ci = { workspace_id = "2001", branch = "main" }

[[rule]]
id = "engineers"
effect = "allow"
issuer = "corp"
groups_any = ["engineering"]

[[rule]]
id = "no-admin-from-ci"
effect = "deny"
issuer = ["bb", "gh", "gl"]
paths = ["/admin/**"]
"#;

pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    pub issuer: DevIssuer,
    pub signer: DevSigner,
    pub echo: EchoServer,
    pub server: Option<Server>,
    pub sink: AuditSink,
    pub urls: BTreeMap<String, String>,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub client: TestClient,
    /// The dev sign-in on `/human`, when the world has browser SSO.
    pub login: Option<DevLogin>,
    /// The dev sign-in on `/partner` ([`Setup::second_login`]).
    pub login2: Option<DevLogin>,
}

/// The client secret the SSO worlds' dev sign-in expects.
pub const SSO_SECRET: &str = "dev-web-secret";
/// The session key of the SSO worlds (base64 of 32 bytes).
pub const SSO_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// How to build a world.
pub struct Setup {
    /// Extra `[[routes]]` TOML appended after the default route; `{echo}` is replaced.
    pub routes: String,
    /// Policy files: name → text. `api` is the default route's policy.
    pub policies: Vec<(String, String)>,
    /// Extra keys for every issuer table.
    pub issuer_extra: String,
    /// Settings for the default route.
    pub route_extra: String,
    /// Extra top-level TOML (e.g. `[listen]` additions go in `listen_extra`).
    pub listen_extra: String,
    /// Extra `[server]` keys.
    pub server_extra: String,
    pub default_route: bool,
    /// Browser SSO: `corp` gets `login`, and these lines go into `[session]`.
    pub sso: Option<String>,
    /// With `sso`: a second human issuer `partner` (dev issuer path `/partner`, its
    /// own dev sign-in in [`World::login2`]) that also has `login`.
    pub second_login: bool,
    /// With `sso`: more keys for `corp`'s `login` table (`extra_params = { ... }`).
    pub login_extra: String,
    /// Audit events go here instead of a memory sink ([`World::events`] is then empty).
    pub sink: Option<AuditSink>,
    /// `server.watch`: the file watcher reloads on changes.
    pub watch: bool,
    /// `[assertion]` keys (the section is written when this is not empty).
    pub assertion: String,
    /// `[redis]` keys (the section is written when this is not empty).
    pub redis: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            routes: String::new(),
            policies: vec![("api".into(), ALLOW_ALL_PRESETS.into())],
            issuer_extra: String::new(),
            route_extra: String::new(),
            listen_extra: String::new(),
            server_extra: String::new(),
            default_route: true,
            sso: None,
            second_login: false,
            login_extra: String::new(),
            sink: None,
            watch: false,
            assertion: String::new(),
            redis: String::new(),
        }
    }
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl World {
    pub async fn start() -> World {
        Self::with(Setup::default()).await
    }

    pub async fn with(setup: Setup) -> World {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let pki = match DevPki::load_or_create(&dir.path().join("pki"), &[]) {
            Ok(p) => p,
            Err(e) => panic!("pki: {e}"),
        };
        let signer = match DevSigner::generate_rs256("test-key-1") {
            Ok(s) => s,
            Err(e) => panic!("signer: {e}"),
        };
        let tls = match portcullis::tls::server_config(pki.key_source(), vec![]) {
            Ok(t) => t,
            Err(e) => panic!("tls: {e}"),
        };
        let issuer = match DevIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), Some(tls)).await
        {
            Ok(i) => i,
            Err(e) => panic!("issuer: {e}"),
        };
        let mut urls = BTreeMap::new();
        for (name, _, path) in ISSUERS {
            urls.insert(name.to_string(), issuer.add_issuer(path, &[&signer]));
        }
        let login = match &setup.sso {
            Some(_) => {
                std::fs::write(dir.path().join("client-secret"), SSO_SECRET).ok();
                std::fs::write(dir.path().join("session-keys"), format!("{SSO_KEY}\n")).ok();
                DevLogin::install(&issuer, "/human", &signer, AUD, SSO_SECRET)
            }
            None => None,
        };
        let login2 = if setup.sso.is_some() && setup.second_login {
            urls.insert("partner".into(), issuer.add_issuer("/partner", &[&signer]));
            DevLogin::install(&issuer, "/partner", &signer, AUD, SSO_SECRET)
        } else {
            None
        };
        let echo = match EchoServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await {
            Ok(e) => e,
            Err(e) => panic!("echo: {e}"),
        };
        let config = World::config_text(&dir, &pki, &urls, &echo, &setup);
        std::fs::create_dir_all(dir.path().join("policies")).ok();
        for (name, text) in &setup.policies {
            std::fs::write(dir.path().join("policies").join(format!("{name}.toml")), text).ok();
        }
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, config).ok();
        let cfg = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => panic!("test config does not load:\n{e}"),
        };
        let sink = setup.sink.clone().unwrap_or_else(AuditSink::memory);
        let server = match Server::start(cfg, Options { sink: Some(sink.clone()) }).await {
            Ok(s) => s,
            Err(e) => panic!("server: {e}"),
        };
        let ready = server.shared.runtime.load().verifier.wait_ready(Duration::from_secs(10)).await;
        assert!(ready, "issuer keys did not load");
        let https = server.bound().https.unwrap_or_else(|| panic!("no https listener"));
        let admin = server.bound().admin.unwrap_or_else(|| panic!("no admin listener"));
        let client = client(&pki, false);
        World {
            dir,
            pki,
            issuer,
            signer,
            echo,
            server: Some(server),
            sink,
            urls,
            https,
            admin,
            client,
            login,
            login2,
        }
    }

    fn config_text(
        dir: &tempfile::TempDir,
        pki: &DevPki,
        urls: &BTreeMap<String, String>,
        echo: &EchoServer,
        setup: &Setup,
    ) -> String {
        let mut c = format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{}\n[tls]\ncert = {}\nkey = {}\n\n[server]\nshutdown_grace = \"5s\"\nwatch = {}\n{}\n\n",
            setup.listen_extra,
            q(&pki.cert_path().to_string_lossy()),
            q(&pki.key_path().to_string_lossy()),
            setup.watch,
            setup.server_extra,
        );
        if !setup.assertion.is_empty() {
            c.push_str(&format!("[assertion]\n{}\n\n", setup.assertion));
        }
        if !setup.redis.is_empty() {
            c.push_str(&format!("[redis]\n{}\n\n", setup.redis));
        }
        if let Some(extra) = &setup.sso {
            c.push_str(&format!(
                "[session]\nkeys_file = {}\n{extra}\n\n",
                q(&dir.path().join("session-keys").to_string_lossy())
            ));
        }
        for (name, preset, _) in ISSUERS {
            c.push_str(&format!("[issuers.{name}]\n"));
            if *preset != "human" {
                c.push_str(&format!("preset = {}\n", q(preset)));
            } else {
                c.push_str(&format!("client_id = {}\n", q(AUD)));
                if setup.sso.is_some() {
                    c.push_str(&format!(
                        "login = {{ client_id = {}, client_secret_file = {}, scopes = [\"openid\", \"email\", \"groups\"]{} }}\n",
                        q(AUD),
                        q(&dir.path().join("client-secret").to_string_lossy()),
                        setup.login_extra,
                    ));
                }
            }
            c.push_str(&format!(
                "issuer = {}\naudiences = [{}]\nca = {}\nrefresh_cooldown = \"1s\"\n{}\n\n",
                q(&urls[*name]),
                q(AUD),
                q(&pki.ca_path().to_string_lossy()),
                setup.issuer_extra
            ));
        }
        if let (Some(url), Some(_)) = (urls.get("partner"), &setup.sso) {
            c.push_str(&format!(
                "[issuers.partner]\nclient_id = {aud}\nlogin = {{ client_id = {aud}, client_secret_file = {}, scopes = [\"openid\", \"email\", \"groups\"] }}\nissuer = {}\naudiences = [{aud}]\nca = {}\nrefresh_cooldown = \"1s\"\n{}\n\n",
                q(&dir.path().join("client-secret").to_string_lossy()),
                q(url),
                q(&pki.ca_path().to_string_lossy()),
                setup.issuer_extra,
                aud = q(AUD),
            ));
        }
        if setup.default_route {
            c.push_str(&format!(
                "[[routes]]\nname = \"api\"\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"http://{}\"\npolicy = \"api\"\n{}\n\n",
                echo.addr(),
                setup.route_extra
            ));
        }
        c.push_str(&setup.routes.replace("{echo}", &echo.addr().to_string()));
        let _ = dir;
        c
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.toml")
    }

    pub fn policy_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("policies").join(format!("{name}.toml"))
    }

    pub fn server(&self) -> &Server {
        match &self.server {
            Some(s) => s,
            None => panic!("server already shut down"),
        }
    }

    /// A token for a preset (`bb`, `gh`, `gl`, `corp`), with overrides applied
    /// (`key=value` strings, `key:=json` typed) as `portcullis dev token --claim` applies
    /// them: an override of a claim the provider builds `sub` from rebuilds `sub`
    /// ([`apply_preset_overrides`]), unless `sub` itself is given.
    pub fn token(&self, issuer: &str, overrides: &[&str]) -> String {
        let (header, payload) = self.parts(issuer, overrides);
        self.signer.sign(&header, &payload)
    }

    /// Header and payload of a preset token, for tests that break one thing.
    pub fn parts(&self, issuer: &str, overrides: &[&str]) -> (Value, Value) {
        let preset = ISSUERS.iter().find(|i| i.0 == issuer).map(|i| i.1).unwrap_or("human");
        let now = portcullis::util::unix_now();
        let (mut header, mut payload) = preset_claims(preset, &self.urls[issuer], AUD, now, 600)
            .unwrap_or_else(|| panic!("preset {preset}"));
        header["kid"] = Value::String(self.signer.kid().to_string());
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        if let Err(e) = apply_preset_overrides(preset, &mut payload, &o) {
            panic!("{e}");
        }
        (header, payload)
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        let mut h = vec![];
        let auth;
        if let Some(t) = token {
            auth = format!("Bearer {t}");
            h.push(("authorization", auth.as_str()));
        }
        self.send(Method::GET, path, &h, Bytes::new()).await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Resp {
        send_with(&self.client, method, &self.url(path), headers, body).await
    }

    /// Audit events so far, parsed.
    pub fn events(&self) -> Vec<Value> {
        self.sink.lines().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The last HTTP audit event.
    pub async fn last_event(&self) -> Value {
        // The event is written when the response body ends; give the writer a moment
        // (up to 10 s: a loaded machine may hold the server's task that long).
        for _ in 0..500 {
            if let Some(e) = self.events().into_iter().rev().find(|e| e["kind"] == "http") {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Value::Null
    }

    /// The audit event of a request id (from a rejection body or upstream header).
    pub async fn event_for(&self, request_id: &str) -> Value {
        for _ in 0..500 {
            if let Some(e) = self.events().into_iter().find(|e| e["request_id"] == request_id) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Value::Null
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        send_with(&c, Method::GET, &format!("http://{}{path}", self.admin), &[], Bytes::new()).await
    }
}

pub async fn send_with<C>(
    client: &Client<C, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Resp
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = match b.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => panic!("request: {e}"),
    };
    let resp = match tokio::time::timeout(Duration::from_secs(20), client.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("request to {url} failed: {e:?}"),
        Err(_) => panic!("request to {url} timed out"),
    };
    let (parts, body) = resp.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => panic!("body: {e}"),
    };
    Resp { status: parts.status, headers: parts.headers, body }
}

/// The request id of a rejection body.
pub fn request_id(r: &Resp) -> String {
    r.json()["request_id"].as_str().unwrap_or_default().to_string()
}

pub fn write(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// A running `tests/node/provider.mjs` (npm `oidc-provider`): killed on drop.
pub struct Provider {
    pub child: std::process::Child,
    pub stdin: Option<std::process::ChildStdin>,
    pub issuer: String,
    /// Lines the provider prints after `ready` (answers to stdin commands).
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the provider with `args` and waits (bounded) for its `ready <issuer>` line.
/// A provider that does not come up within a minute is killed and started once more
/// (seen once in CI: a cold first start on a loaded 2-core machine); a second failure
/// fails the test with a clear message instead of hanging it.
/// It serves TLS with `pki`'s certificate on a free loopback port (control port too);
/// `extra` adds provider options (`--audience`, `--redirect-uri`, ...).
pub fn start_provider(pki: &DevPki, extra: &[String]) -> Provider {
    let mut args: Vec<String> = vec![
        "--cert".into(),
        pki.cert_path().to_string_lossy().into(),
        "--key".into(),
        pki.key_path().to_string_lossy().into(),
        "--port".into(),
        "0".into(),
        "--control-port".into(),
        "0".into(),
    ];
    args.extend_from_slice(extra);
    let provider = match try_start_provider(&args) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("start_provider: {why}; starting it once more");
            try_start_provider(&args).unwrap_or_else(|why| panic!("oidc-provider: {why}"))
        }
    };
    assert!(provider.issuer.starts_with("https://127.0.0.1:"), "provider did not start");
    provider
}

fn try_start_provider(args: &[String]) -> Result<Provider, String> {
    use std::io::BufRead;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new("node")
        .arg(root.join("tests/node/provider.mjs"))
        .args(args)
        .arg("--stdin-control")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("node: {e}"));
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("provider stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut issuer = String::new();
    let mut seen = Vec::new();
    while issuer.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(i) = line.strip_prefix("ready ") {
                    issuer = i.trim().to_string();
                }
                seen.push(line);
            }
            Err(e) => {
                let exited = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no `ready` line within 60 s ({e:?}; exit status {exited:?}; stdout so far {seen:?})"
                ));
            }
        }
    }
    Ok(Provider { child, stdin, issuer, lines: rx })
}

/// Whether the Node-based interop tools are installed (and Chromium, for browser tests).
/// When they are not, the test is skipped with a message — unless
/// `PORTCULLIS_REQUIRE_INTEROP` is set (the test command sets it), where that is a failure:
/// CI can never skip an interop test silently.
pub fn interop_available(what: &str, browser: bool) -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let node = root.join("tests/node/node_modules/oidc-provider").is_dir()
        && std::process::Command::new("node").arg("--version").output().is_ok();
    let chromium = !browser
        || (root.join("tests/node/node_modules/playwright-core").is_dir()
            && Path::new("/usr/bin/chromium").exists());
    if node && chromium {
        return true;
    }
    assert!(
        std::env::var("PORTCULLIS_REQUIRE_INTEROP").is_err(),
        "{what}: node, tests/node or chromium missing but PORTCULLIS_REQUIRE_INTEROP is set"
    );
    eprintln!("SKIPPED: {what} (install chromium; npm ci --prefix tests/node)");
    false
}

/// A fresh P-256 key as PKCS#8 PEM (`openssl genpkey -algorithm EC -pkeyopt
/// ec_paramgen_curve:P-256`), for `[assertion] key`.
pub fn p256_pem() -> String {
    use base64::Engine;
    let key = DevSigner::generate_es256("assertion").unwrap_or_else(|e| panic!("{e}")).pkcs8_der();
    let b64 = base64::engine::general_purpose::STANDARD.encode(key);
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n"))
}

/// Replaces `path` atomically (a temporary file renamed over it), as operators should.
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write(&tmp, text);
    if let Err(e) = std::fs::rename(&tmp, path) {
        panic!("rename {}: {e}", path.display());
    }
}

/// A connection to the TLS listener on `port` that the server has accepted (it answered
/// the ClientHello) and that stays in the handshake, holding its slot, until dropped:
/// what a drain must wait for, known to be accepted before the shutdown stops accepting.
pub async fn accepted_mid_handshake(pki: &DevPki, port: u16) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(pki.root_store()).with_no_client_auth())
        .unwrap_or_else(|e| panic!("client TLS: {e}"));
    let name =
        rustls_pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
    let mut hello = Vec::new();
    rustls::ClientConnection::new(Arc::new(tls), name)
        .unwrap_or_else(|e| panic!("{e}"))
        .write_tls(&mut hello)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut s =
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap_or_else(|e| panic!("{e}"));
    s.write_all(&hello).await.unwrap_or_else(|e| panic!("{e}"));
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut first)).await;
    assert!(matches!(read, Ok(Ok(1))), "the ClientHello was not answered: {read:?}");
    s
}

/// The `kid`s of a JWKS document, in its order.
pub fn jwks_kids(jwks: &Value) -> Vec<String> {
    let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
    keys.iter().map(|k| k["kid"].as_str().unwrap_or_default().to_string()).collect()
}

/// The `kid` of a signed assertion if it verifies, as an upstream verifies it: with the
/// ES256 key of that `kid` in `jwks`; `None` if there is none or the signature fails.
pub fn verified_kid(jwt: &str, jwks: &Value) -> Option<String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, payload, sig] = parts[..] else { return None };
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    let kid = header["kid"].as_str()?;
    let keys = jwks["keys"].as_array()?;
    let k = keys.iter().find(|k| k["kid"] == kid)?;
    let mut point = vec![4u8];
    for c in ["x", "y"] {
        point.extend(URL_SAFE_NO_PAD.decode(k[c].as_str()?).ok()?);
    }
    let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        &point,
    )
    .verify(format!("{}.{payload}", parts[0]).as_bytes(), &sig)
    .ok()?;
    Some(kid.to_string())
}

/// A raw upstream that answers each connection's first request with `answer(head)`, the
/// whole response as bytes on the wire, then closes.
pub async fn raw_answering(
    answer: impl Fn(&str) -> String + Copy + Send + 'static,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else { return };
                let _ = s.write_all(answer(&head).as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A raw upstream's read of a request head, up to its blank line (`None`: the connection
/// ended first).
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A throwaway `redis-server` on a free loopback port, with a password, that keeps
/// nothing on disk; killed on drop. `None` (the test skips) when redis-server is not
/// installed, unless `PORTCULLIS_REQUIRE_INTEROP` is set (the test command installs it).
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    /// A `password_file` holding the password.
    pub password_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub const PASSWORD: &'static str = "redis-test-password";

    pub async fn start(what: &str) -> Option<RedisServer> {
        Self::start_on(what, free_port()).await
    }

    /// On `port` (a server started again where an earlier one ran).
    pub async fn start_on(what: &str, port: u16) -> Option<RedisServer> {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let password_file = dir.path().join("redis-password");
        write(&password_file, &format!("{}\n", Self::PASSWORD));
        let spawned = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--requirepass", Self::PASSWORD])
            .args(["--dir", &dir.path().to_string_lossy()])
            .stdout(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("PORTCULLIS_REQUIRE_INTEROP").is_err(),
                    "{what}: redis-server cannot run ({e}) but PORTCULLIS_REQUIRE_INTEROP is set"
                );
                eprintln!("SKIPPED: {what} (apt-get install redis-server)");
                return None;
            }
        };
        let server = RedisServer { child, port, password_file, _dir: dir };
        for _ in 0..100 {
            if server.ping().await {
                return Some(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: redis-server did not answer on port {port}");
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let cmd = format!("AUTH {}\r\nPING\r\n", Self::PASSWORD);
        if s.write_all(cmd.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; 64];
        let mut got = Vec::new();
        while !got.ends_with(b"+PONG\r\n") {
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        true
    }

    /// The `[redis]` keys of a configuration using this server.
    /// How many sign-outs the worlds' database (3) holds, read with a connection of
    /// its own (`KEYS *signout:*`; a test's Redis holds a handful of keys at most).
    pub async fn stored_sign_outs(&self) -> usize {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap_or_else(|e| panic!("redis: {e}"));
        let mut s = tokio::io::BufReader::new(s);
        let mut reply = String::new();
        for command in [&["AUTH", Self::PASSWORD][..], &["SELECT", "3"], &["KEYS", "*signout:*"]] {
            let mut req = format!("*{}\r\n", command.len());
            for arg in command {
                req.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
            s.get_mut().write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("redis: {e}"));
            reply.clear();
            s.read_line(&mut reply).await.unwrap_or_else(|e| panic!("redis: {e}"));
        }
        // The last reply's first line: `*N`, the number of keys.
        let n = reply.trim_end().strip_prefix('*').and_then(|n| n.parse().ok());
        n.unwrap_or_else(|| panic!("redis: not a KEYS answer: {reply:?}"))
    }

    pub fn config(&self) -> String {
        format!(
            "url = \"redis://127.0.0.1:{}/3\"\npassword_file = {}\n",
            self.port,
            q(&self.password_file.to_string_lossy())
        )
    }

    /// Stops the server (as an outage would).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Another replica of `w`'s configuration, serving on its own ports, once ready (its
/// issuers' keys loaded and, with `[redis]`, the stored sign-outs read back): the
/// server, its HTTPS port and its audit events.
pub async fn replica(w: &World) -> (Server, u16, AuditSink) {
    let (s, port, sink) = replica_unready(w).await;
    for _ in 0..100 {
        if s.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.is_ready(), "the replica did not become ready");
    (s, port, sink)
}

/// [`replica`] without waiting for more than its issuers' keys.
pub async fn replica_unready(w: &World) -> (Server, u16, AuditSink) {
    let cfg = Config::load(&w.config_path()).unwrap_or_else(|e| panic!("{e}"));
    let sink = AuditSink::memory();
    let s = Server::start(cfg, Options { sink: Some(sink.clone()) })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(s.shared.runtime.load().verifier.wait_ready(Duration::from_secs(10)).await);
    let port = s.bound().https.map_or(0, |a| a.port());
    (s, port, sink)
}

/// Writes `req` on `s` as it is and returns everything sent back until the peer closes
/// (or 5 s pass), as text: one raw HTTP/1.1 exchange.
pub async fn raw_exchange<S>(mut s: S, req: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
