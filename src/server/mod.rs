//! Listeners, accept loops, reload orchestration and graceful shutdown.
//!
//! A [`Runtime`] is one generation of compiled configuration with its verifier and
//! upstream clients. Requests load the current generation once and keep it until they
//! finish, so a reload never changes the rules under an in-flight request, and the old
//! generation is dropped only when its last request is done.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::audit::{AuditSink, TlsInfo};
use crate::config::{AuditOutput, Config};
use crate::http::activity::{Activity, Counted};
use crate::http::assertion::AssertionSigner;
use crate::http::proxy::Shared;
use crate::http::upstream::{client_for, UpstreamClient};
use crate::http::{stack, ConnInfo};
use crate::identity::verify::Verifier;

pub mod per_client;
pub mod process;
mod watcher;

/// One generation of configuration, ready to serve.
pub struct Runtime {
    pub config: Config,
    pub verifier: Arc<Verifier>,
    /// Index-aligned with `config.routes`.
    pub clients: Vec<UpstreamClient>,
    pub revision: Arc<str>,
    pub generation: u64,
    /// Browser sessions, when an issuer has `login`.
    pub sessions: Option<Arc<crate::session::Sessions>>,
    /// The sessions signed out at `/.portcullis/logout`: one list for the process,
    /// handed on by every reload (whether or not it keeps `[session]`), so a reload
    /// never brings a signed-out cookie back.
    pub revocations: Arc<crate::session::revoke::Revocations>,
    /// Signs the assertions of this generation's requests; the same one as the previous
    /// generation's unless `[assertion]` changed ([`AssertionSigner::reload`]).
    pub signer: Arc<AssertionSigner>,
    /// The certificates the HTTPS listener serves in this generation, for `/metrics`
    /// (set by the server once its TLS is built; empty without `[tls]`).
    pub tls_certificates: Vec<crate::tls::ServedCertificate>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("generation", &self.generation).finish()
    }
}

impl Runtime {
    /// Builds a generation. Key state of unchanged issuers is carried over from
    /// `previous`, so a reload neither refetches every JWKS nor blips readiness; so is
    /// the assertion signer while `[assertion]` and its key are unchanged, and a new key
    /// retires the previous one ([`AssertionSigner::reload`]); and always the list of
    /// signed-out browser sessions.
    pub fn build(
        config: Config,
        previous: Option<&Runtime>,
        generation: u64,
    ) -> Result<Runtime, String> {
        // First: a key that cannot be read rejects the generation before anything starts.
        let signer = match previous {
            None => Arc::new(AssertionSigner::new(&config.assertion).map_err(|e| e.to_string())?),
            Some(p) => match p.signer.reload(&config.assertion, crate::util::unix_now()) {
                Ok(Some(s)) => Arc::new(s),
                Ok(None) => p.signer.clone(),
                Err(e) => return Err(e.to_string()),
            },
        };
        let verifier = Verifier::new(config.issuers.clone())?
            .with_token_cache(config.server.token_cache_entries);
        if let Some(p) = previous {
            verifier.adopt_keys_from(&p.verifier);
        }
        let verifier = Arc::new(verifier);
        let clients = config.routes.iter().map(|r| client_for(r)).collect::<Result<Vec<_>, _>>()?;
        let revision: Arc<str> = Arc::from(policy_revision(&config));
        let revocations = previous.map(|p| p.revocations.clone()).unwrap_or_default();
        let sessions = crate::session::Sessions::build(&config, revocations.clone())?.map(Arc::new);
        verifier.start();
        Ok(Runtime {
            config,
            verifier,
            clients,
            revision,
            generation,
            sessions,
            revocations,
            signer,
            tls_certificates: Vec::new(),
        })
    }
}

/// The revision of the policies in force: the git commit of the policy directory when
/// it is a clean checkout, otherwise a hash of the policy files' contents.
pub fn policy_revision(config: &Config) -> String {
    let mut policies: Vec<&crate::policy::Policy> = Vec::new();
    for r in &config.routes {
        policies.push(&r.policy);
        if let Some(s) = &r.shadow_policy {
            policies.push(s);
        }
    }
    for d in &config.databases {
        policies.push(&d.policy);
    }
    policies.sort_by(|a, b| a.file().cmp(b.file()));
    policies.dedup_by(|a, b| a.file() == b.file());
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in &policies {
        ctx.update(p.file().to_string_lossy().as_bytes());
        ctx.update(p.content_hash().as_bytes());
    }
    let hash: String = ctx.finish().as_ref().iter().take(6).map(|b| format!("{b:02x}")).collect();
    let dir = &config.server.policy_dir;
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) if !commit.is_empty() => match git(&["status", "--porcelain", "--", "."]) {
            Some(s) if s.is_empty() => format!("git:{commit}"),
            _ => format!("git:{commit}+dirty.{hash}"),
        },
        _ => format!("sha256:{hash}"),
    }
}

/// Builds the rustls server configuration from `[tls]`, with what `/metrics` says of the
/// certificates it serves. Each file is read once, however many names it serves.
pub fn tls_config(cfg: &Config) -> Result<ServingTls, String> {
    let Some(t) = &cfg.tls else { return Ok(ServingTls::default()) };
    let mut certificates = Vec::new();
    let mut load = |cert: &Path, key: &Path, server_names: &[String]| {
        let ck = crate::tls::load_certified_key(cert, key).map_err(|e| e.to_string())?;
        // rustls took the leaf; one whose notAfter cannot be read is left out of the
        // metric (the configuration's load warned about it).
        if let Some(not_after) = ck.end_entity_cert().ok().and_then(crate::tls::not_after) {
            certificates.push(crate::tls::ServedCertificate {
                cert: cert.to_path_buf(),
                server_names: server_names.to_vec(),
                not_after,
            });
        }
        Ok::<_, String>(crate::tls::CertifiedKeySource::Loaded(ck))
    };
    let default = load(&t.cert, &t.key, &[])?;
    let mut sni = Vec::new();
    for s in &t.sni {
        let source = load(&s.cert, &s.key, &s.server_names)?;
        for name in &s.server_names {
            sni.push((name.clone(), source.clone()));
        }
    }
    let keys = crate::tls::KeySet { default, sni };
    let config = crate::tls::server_config(keys.default.clone(), keys.sni.clone())
        .map_err(|e| e.to_string())?;
    Ok(ServingTls { config: Some(config), keys: Some(keys), certificates })
}

/// The HTTPS listener's TLS of one generation ([`tls_config`]).
#[derive(Debug, Default)]
pub struct ServingTls {
    /// `None` without `[tls]`.
    pub config: Option<Arc<rustls::ServerConfig>>,
    /// The certificates as read, for the database listeners (`postgres::prepare`),
    /// which serve the same ones; `None` without `[tls]`.
    pub keys: Option<crate::tls::KeySet>,
    /// Every certificate it serves, default first.
    pub certificates: Vec<crate::tls::ServedCertificate>,
}

/// Bound addresses of a running server (useful when the config asked for port 0).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub https: Option<SocketAddr>,
    pub insecure_http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Each `[[databases]]` route and where it listens (as of the last reload).
    pub databases: crate::postgres::BoundDatabases,
}

/// A running server: reload it, or shut it down and wait for the drain.
pub struct Server {
    /// The HTTP and admin listeners (fixed at start); see [`Server::bound`].
    http_bound: Bound,
    pub shared: Arc<Shared>,
    pub sink: AuditSink,
    /// Database sessions: open-session count, reload re-evaluation.
    pub postgres: Arc<crate::postgres::Hub>,
    state: Arc<State>,
    shutdown_tx: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    /// The admin listener, apart from `tasks`: it serves through the drain (`/readyz`
    /// answers 503 `"draining": true` meanwhile) and stops once the drain is over.
    admin: tokio::task::JoinSet<()>,
    admin_stop: watch::Sender<bool>,
    /// Turns true to end a shutdown's grace period at once (a second SIGTERM/SIGINT).
    hurry: watch::Sender<bool>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("bound", &self.bound()).finish()
    }
}

struct State {
    config_path: PathBuf,
    shared: Arc<Shared>,
    tls: ArcSwap<Option<Arc<rustls::ServerConfig>>>,
    generation: AtomicU64,
    draining: Arc<AtomicBool>,
    reload_lock: tokio::sync::Mutex<()>,
    /// The files the newest version that did not load named (as far as it compiled),
    /// until a version loads: the watcher watches them too, so a fix written to one
    /// the configuration in force does not read (a new policy) is loaded.
    refused_files: parking_lot::Mutex<Vec<PathBuf>>,
    sink: AuditSink,
    pg: Arc<crate::postgres::Hub>,
    /// The database routes' listeners; a reload binds, hands over and closes them.
    pg_listeners: crate::postgres::Listeners,
    /// The settings a reload does not change, as the server started with them.
    fixed: Fixed,
}

/// What a reload does not apply: the listeners and their trusted proxies, the audit
/// output, the connection limit, the drain's grace period (WebSocket tunnels use it too)
/// and the watcher. (`[assertion]` is applied: [`Runtime::build`].)
#[derive(Debug, Clone, PartialEq)]
struct Fixed {
    https: Option<SocketAddr>,
    insecure_http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    trusted_proxies: Vec<crate::config::IpNet>,
    audit: AuditOutput,
    max_connections: usize,
    shutdown_grace: Duration,
    watch: bool,
    redis: Option<crate::config::RedisSettings>,
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        Fixed {
            https: c.listen.https,
            insecure_http: c.listen.insecure_http,
            admin: c.listen.admin,
            trusted_proxies: c.listen.trusted_proxies.clone(),
            audit: c.audit.clone(),
            max_connections: c.server.max_connections,
            shutdown_grace: c.server.shutdown_grace,
            watch: c.server.watch,
            redis: c.redis.clone(),
        }
    }

    /// The settings (by their configuration names) whose value in `new` differs.
    fn differences(&self, new: &Fixed) -> Vec<&'static str> {
        [
            ("listen.https", self.https != new.https),
            ("listen.insecure_http", self.insecure_http != new.insecure_http),
            ("listen.admin", self.admin != new.admin),
            ("listen.trusted_proxies", self.trusted_proxies != new.trusted_proxies),
            ("audit.output", self.audit != new.audit),
            ("server.max_connections", self.max_connections != new.max_connections),
            ("server.shutdown_grace", self.shutdown_grace != new.shutdown_grace),
            ("server.watch", self.watch != new.watch),
            ("redis", self.redis != new.redis),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
    }
}

/// Shares this replica's sign-outs through `store` (trying again those Redis does not
/// take) and records the other replicas' ([`crate::store`]), until `drained`: sign-outs
/// made by requests still in flight during a shutdown's drain are shared too, and
/// other replicas' sign-outs still apply to those requests.
fn share_sign_outs(
    tasks: &mut tokio::task::JoinSet<()>,
    store: Arc<crate::store::Store>,
    shared: &Arc<Shared>,
    drained: watch::Receiver<bool>,
) {
    let revocations = shared.runtime.load().revocations.clone();
    // Each sign-out takes a sign-in at the identity provider, and the task takes them
    // off the queue as they come (also while Redis is unreachable: those are kept and
    // tried again there), so this fills only if sign-outs outpace it; a full queue is
    // counted, and the sign-out holds on this replica anyway.
    let (tx, rx) = tokio::sync::mpsc::channel::<crate::session::revoke::SignOut>(1024);
    revocations.share_with(tx);
    tasks.spawn(store.clone().share_sign_outs(rx, drained.clone()));
    let runtime = shared.clone();
    // Sign-outs are kept for this replica's own absolute lifetime, read at each one so
    // a reload's new lifetime applies.
    let lifetime = Arc::new(move || {
        runtime.runtime.load().sessions.as_ref().map(|s| s.settings.absolute_lifetime.as_secs())
    });
    tasks.spawn(store.follow_sign_outs(revocations, lifetime, drained));
}

/// Options that are not in the configuration file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Write audit events here instead of the config's `[audit]` output (tests).
    pub sink: Option<AuditSink>,
}

impl Server {
    /// Binds every listener and starts serving. A configuration whose policy tests fail
    /// is refused ([`Config::failing_policy_tests`]).
    pub async fn start(config: Config, opts: Options) -> Result<Server, String> {
        if config.mode != crate::config::LoadMode::Serve {
            // Its certificates were not looked for and its upstream passwords not read.
            return Err("this configuration was loaded for policy review only; not serving".into());
        }
        let failures = config.failing_policy_tests();
        if !failures.is_empty() {
            let report: Vec<String> = failures.iter().map(|o| o.failure_report()).collect();
            return Err(format!("policy tests fail:\n{}", report.join("\n")));
        }
        let sink = match (opts.sink, &config.audit) {
            (Some(s), _) => s,
            (None, AuditOutput::Stdout) => AuditSink::stdout(),
            (None, AuditOutput::File(p)) => {
                AuditSink::file(p).map_err(|e| format!("audit output {}: {e}", p.display()))?
            }
        };
        let ServingTls { config: tls, keys, certificates } = tls_config(&config)?;
        let pg_prepared = crate::postgres::prepare(&config, keys.as_ref())?;
        for w in crate::postgres::warnings(&config) {
            tracing::warn!("{w}");
        }
        let open_files =
            std::fs::read_to_string("/proc/self/limits").ok().and_then(|l| open_files_limit(&l));
        if let Some(w) = descriptor_warning(config.server.max_connections, open_files) {
            tracing::warn!("{w}");
        }
        let config_path = config.path.clone();
        let fixed = Fixed::of(&config);
        let listen = config.listen.clone();
        let max_conns = config.server.max_connections;
        let grace = config.server.shutdown_grace;
        let watch_files = config.server.watch;
        for w in &config.warnings {
            tracing::warn!(target: "portcullis::config", "{w}");
        }
        let store = config.redis.clone().map(crate::store::Store::new).transpose()?;
        let mut runtime = Runtime::build(config, None, 1)?;
        runtime.tls_certificates = certificates;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        // Turns true when the grace period is over: connections still open are closed.
        let (cut_tx, cut_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            replay: Default::default(),
            store: store.clone(),
            reloads: watch::channel(1).0,
            grace_over: cut_rx.clone(),
            sink: sink.clone(),
        });
        // A second signal ends the grace period early ([`Server::hurry`]), for HTTP
        // connections (the drain task below) and database sessions alike.
        let (hurry, hurried) = watch::channel(false);
        let pg =
            crate::postgres::Hub::new(shared.clone(), sink.clone(), pg_prepared, hurried.clone());
        let limit = Arc::new(Semaphore::new(max_conns));
        let per_client = per_client::PerClient::new(listen.trusted_proxies.clone());
        let state = Arc::new(State {
            config_path,
            pg: pg.clone(),
            pg_listeners: crate::postgres::Listeners::new(
                pg.clone(),
                limit.clone(),
                per_client.clone(),
                shutdown_rx.clone(),
            ),
            shared: shared.clone(),
            tls: ArcSwap::from_pointee(tls),
            generation: AtomicU64::new(1),
            draining: Arc::new(AtomicBool::new(false)),
            reload_lock: tokio::sync::Mutex::new(()),
            refused_files: Default::default(),
            sink: sink.clone(),
            fixed,
        });

        let mut tasks = tokio::task::JoinSet::new();
        let mut admin = tokio::task::JoinSet::new();
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let mut bound = Bound::default();

        let bind = |a: SocketAddr| async move {
            TcpListener::bind(a).await.map_err(|e| format!("cannot listen on {a}: {e}"))
        };
        if let Some(a) = listen.https {
            let l = bind(a).await?;
            bound.https = l.local_addr().ok();
            tasks.spawn(accept_loop(
                l,
                true,
                state.clone(),
                listen.trusted_proxies.clone(),
                Slots { limit: limit.clone(), per_client: per_client.clone() },
                shutdown_rx.clone(),
                cut_rx.clone(),
            ));
        }
        if let Some(a) = listen.insecure_http {
            let l = bind(a).await?;
            bound.insecure_http = l.local_addr().ok();
            tracing::warn!(addr = %a, "plain-HTTP listener enabled (insecure_http): only run it behind a TLS-terminating load balancer");
            tasks.spawn(accept_loop(
                l,
                false,
                state.clone(),
                listen.trusted_proxies.clone(),
                Slots { limit: limit.clone(), per_client: per_client.clone() },
                shutdown_rx.clone(),
                cut_rx.clone(),
            ));
        }
        if let Some(a) = listen.admin {
            let l = bind(a).await?;
            bound.admin = l.local_addr().ok();
            admin.spawn(admin_loop(l, state.clone(), admin_stop_rx));
        }
        let first = state.shared.runtime.load_full();
        let plan = state.pg_listeners.plan(&first.config).await?;
        drop(first);
        state.pg_listeners.apply(plan);
        if watch_files {
            tasks.spawn(watch_loop(state.clone(), shutdown_rx.clone()));
        }
        // True once the drain below is over (or dropped with it): no request is left
        // that could sign out or open a session.
        let (drained_tx, drained_rx) = watch::channel(false);
        if let Some(store) = store {
            share_sign_outs(&mut tasks, store, &shared, drained_rx);
        }
        // The drain task: when shutdown is signalled, wait until every connection has
        // given its permit back (each holds one for its lifetime), up to the grace period.
        // Then those still open are closed, and their requests end, each with its audit
        // event (`client-closed`), before the audit log is flushed.
        let mut rx = shutdown_rx.clone();
        let all = u32::try_from(max_conns).unwrap_or(u32::MAX);
        let drain_limit = limit.clone();
        let mut hurried = hurried;
        tasks.spawn(async move {
            stopped(&mut rx).await;
            let drained = tokio::select! {
                r = tokio::time::timeout(grace, drain_limit.acquire_many(all)) => r.is_ok(),
                () = grace_over(&mut hurried) => false,
            };
            if !drained {
                tracing::warn!(grace = ?grace, "shutdown grace period over; closing remaining connections");
                let _ = cut_tx.send(true);
                if tokio::time::timeout(CLOSE_WAIT, drain_limit.acquire_many(all)).await.is_err() {
                    tracing::warn!("connection slots still taken after closing the connections");
                }
            }
            let _ = drained_tx.send(true);
        });
        Ok(Server {
            http_bound: bound,
            shared,
            sink,
            postgres: pg,
            state,
            shutdown_tx,
            tasks,
            admin,
            admin_stop,
            hurry,
        })
    }

    /// Where the server listens; the database routes as of the last reload.
    pub fn bound(&self) -> Bound {
        Bound { databases: self.state.pg_listeners.bound(), ..self.http_bound.clone() }
    }

    /// Reloads configuration and policies from disk; on any problem the running
    /// generation stays and every diagnostic is logged.
    pub async fn reload(&self) -> bool {
        reload(&self.state).await
    }

    /// The files the watcher polls (with `server.watch`) and a change to which brings a
    /// reload: every file the configuration in force reads, and those the newest
    /// version refused since read or tried to read.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        watched(&self.state).into_iter().map(|(f, _)| f).collect()
    }

    /// Says on stderr, in one readable line, what this server serves: its listeners,
    /// how many routes and database routes, and its issuers (`serve` and `demo`, once
    /// started).
    pub fn log_serving(&self) {
        let runtime = self.shared.runtime.load();
        let config = &runtime.config;
        let issuers: Vec<(&str, &str)> =
            config.issuers.iter().map(|i| (i.id.as_str(), i.preset.name())).collect();
        let line = serving_line(&self.bound(), config.routes.len(), &issuers);
        tracing::info!("{line}");
    }

    pub fn is_ready(&self) -> bool {
        !self.state.draining.load(Ordering::Relaxed)
            && self.shared.runtime.load().verifier.ready()
            && self.shared.sign_outs_loaded()
    }

    /// Stops accepting, drains in-flight requests (up to the grace period; then the
    /// connections still open are closed, their requests audited as `client-closed`),
    /// then closes the audit log, waiting up to [`AUDIT_CLOSE_WAIT`] for what is queued
    /// to be written; if any event was dropped during the process's lifetime or is left
    /// unwritten, one error line on stderr says how many. The admin listener serves until
    /// the drain is over, so `/readyz` is seen answering 503 `"draining": true` (and
    /// `/healthz` 200) meanwhile. With `[redis]`, sign-outs are shared (and the other
    /// replicas' received) until the drain is over, then those Redis has not taken yet
    /// get up to [`crate::store::outbox::FINAL_FLUSH`] more.
    pub async fn shutdown(mut self) {
        self.state.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown_tx.send(true);
        while self.tasks.join_next().await.is_some() {}
        // A reload in progress finishes first, so no accept loop starts after the drain.
        let _reloads = self.state.reload_lock.lock().await;
        self.state.pg_listeners.drained().await;
        let _ = self.admin_stop.send(true);
        while self.admin.join_next().await.is_some() {}
        let sink = self.sink.clone();
        let loss = tokio::task::spawn_blocking(move || sink.close(AUDIT_CLOSE_WAIT))
            .await
            .unwrap_or_else(|_| self.sink.close(Duration::ZERO));
        if let Some(report) = loss.report() {
            tracing::error!(dropped = loss.dropped, unwritten = loss.unwritten, "{report}");
        }
    }

    /// Ends a shutdown's grace period now: the connections still open are closed as when
    /// it runs out (their requests audited as `client-closed`, database sessions told
    /// `57P01` and ended `shutting-down`). Before [`Server::shutdown`] it takes effect as
    /// soon as the drain begins.
    pub fn hurry(&self) {
        let _ = self.hurry.send(true);
    }

    /// Runs until SIGTERM/SIGINT (drain, then return), reloading on SIGHUP. A second
    /// SIGTERM or SIGINT during the drain ends its grace period at once ([`Server::hurry`]).
    pub async fn run_until_signalled(self) -> Result<(), String> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        loop {
            tokio::select! {
                _ = hup.recv() => { self.reload().await; }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        let hurry = self.hurry.clone();
        let shutdown = self.shutdown();
        tokio::pin!(shutdown);
        let mut hurried = false;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = term.recv(), if !hurried => hurried = true,
                _ = int.recv(), if !hurried => hurried = true,
            }
            tracing::warn!("second signal: ending the shutdown grace period now");
            let _ = hurry.send(true);
        }
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// `serving: https 0.0.0.0:8443, admin 127.0.0.1:9090, database route orders
/// 127.0.0.1:6432; 3 routes; issuers corp (oidc), bb (bitbucket-pipelines)`.
fn serving_line(bound: &Bound, routes: usize, issuers: &[(&str, &str)]) -> String {
    let mut listeners: Vec<String> =
        [("https", bound.https), ("plain HTTP", bound.insecure_http), ("admin", bound.admin)]
            .into_iter()
            .filter_map(|(what, a)| a.map(|a| format!("{what} {a}")))
            .collect();
    listeners.extend(bound.databases.iter().map(|(name, a)| format!("database route {name} {a}")));
    let listeners = if listeners.is_empty() { "no listener".into() } else { listeners.join(", ") };
    let routes = match routes {
        1 => "1 route".to_string(),
        n => format!("{n} routes"),
    };
    let issuers: Vec<String> =
        issuers.iter().map(|(id, preset)| format!("{id} ({preset})")).collect();
    let issuers = match issuers.as_slice() {
        [] => "no issuers".to_string(),
        [one] => format!("issuer {one}"),
        all => format!("issuers {}", all.join(", ")),
    };
    format!("serving: {listeners}; {routes}; {issuers}")
}

async fn reload(state: &State) -> bool {
    let _guard = state.reload_lock.lock().await;
    let m = crate::metrics::global();
    let attempt = Config::attempt(&state.config_path);
    // Watched until a version loads (cleared below), whatever refuses this one.
    *state.refused_files.lock() = attempt.files;
    let config = match attempt.result {
        Ok(c) => c,
        Err(e) => {
            for d in &e.0 {
                tracing::error!(target: "portcullis::config", "{d}");
            }
            tracing::error!(
                problems = e.0.len(),
                "reload rejected; the previous configuration keeps serving"
            );
            return rejected(state, "config", e.0.iter().map(ToString::to_string).collect());
        }
    };
    // A version whose own policy tests fail is refused like one that does not compile.
    let failures = config.failing_policy_tests();
    if !failures.is_empty() {
        for o in &failures {
            tracing::error!(target: "portcullis::config", "{}", o.failure_report());
        }
        tracing::error!(
            failed_tests = failures.len(),
            "reload rejected: policy tests fail; the previous configuration keeps serving"
        );
        return rejected(
            state,
            "policy-tests",
            failures.iter().map(|o| o.failure_report()).collect(),
        );
    }
    let old = state.shared.runtime.load_full();
    // Settings fixed at start: said at every reload while they differ from what runs.
    let restart_required = state.fixed.differences(&Fixed::of(&config));
    for setting in &restart_required {
        tracing::warn!(
            setting,
            "{setting} differs from the running value: it takes effect on restart, not on reload"
        );
    }
    let ServingTls { config: tls, keys, certificates } = match tls_config(&config) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected: TLS; the previous configuration keeps serving");
            return rejected(state, "tls", vec![e.to_string()]);
        }
    };
    let generation = state.generation.fetch_add(1, Ordering::Relaxed) + 1;
    for w in &config.warnings {
        tracing::warn!(target: "portcullis::config", "{w}");
    }
    let mut runtime = match Runtime::build(config, Some(&old), generation) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected; the previous configuration keeps serving");
            return rejected(state, "runtime", vec![e.to_string()]);
        }
    };
    runtime.tls_certificates = certificates;
    let pg = match crate::postgres::prepare(&runtime.config, keys.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected: database TLS; the previous configuration keeps serving");
            return rejected(state, "database-tls", vec![e.to_string()]);
        }
    };
    // Bind the listeners of added and moved database routes before anything is swapped
    // in: if one cannot be bound, nothing of this reload applies.
    let listeners = match state.pg_listeners.plan(&runtime.config).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected: database listener; the previous configuration and its listeners keep serving");
            return rejected(state, "database-listener", vec![e.to_string()]);
        }
    };
    let changed: Vec<&str> = runtime
        .config
        .routes
        .iter()
        .filter(|r| {
            old.config.routes.iter().find(|o| o.name == r.name).is_none_or(|o| {
                !o.policy.same_access(&r.policy)
                    || o.host != r.host
                    || o.path_prefix != r.path_prefix
                    || o.methods != r.methods
                    // Which route serves a request also depends on the order: two
                    // route blocks swapped send shared requests to the other policy.
                    || old.config.routes_tried_before(&o.name, &runtime.config)
                        != runtime.config.routes_tried_before(&r.name, &old.config)
            })
        })
        .map(|r| &*r.name)
        .chain(
            old.config
                .routes
                .iter()
                .filter(|o| !runtime.config.routes.iter().any(|r| r.name == o.name))
                .map(|o| &*o.name),
        )
        .chain(
            runtime
                .config
                .databases
                .iter()
                .filter(|d| {
                    old.config.databases.iter().find(|o| o.name == d.name).is_none_or(|o| {
                        o.policy.content_hash() != d.policy.content_hash()
                            || o.upstream_display != d.upstream_display
                            || o.listen != d.listen
                    })
                })
                .map(|d| &*d.name),
        )
        .chain(
            old.config
                .databases
                .iter()
                .filter(|o| !runtime.config.databases.iter().any(|d| d.name == o.name))
                .map(|o| &*o.name),
        )
        .collect();
    let (old_kid, new_kid) = (old.signer.kid(), runtime.signer.kid());
    state.sink.emit(&serde_json::json!({
        "ts": crate::audit::now_rfc3339(),
        "kind": "reload",
        "outcome": "loaded",
        "generation": generation,
        "old_policy_revision": &*old.revision,
        "new_policy_revision": &*runtime.revision,
        "routes_changed": changed,
        "restart_required": restart_required,
        "old_assertion_kid": old_kid,
        "new_assertion_kid": new_kid,
    }));
    if old_kid != new_kid {
        // The kids only: they are public (the JWKS), the keys never are.
        let published_s = runtime
            .signer
            .retired_until(old_kid)
            .map(|t| t.saturating_sub(crate::util::unix_now()));
        tracing::info!(
            old_kid,
            new_kid,
            generated = runtime.signer.generated(),
            old_key_published_s = published_s,
            "assertion key rotated: new assertions are signed with the new key; the JWKS keeps the old one until what it signed has expired"
        );
    }
    tracing::info!(generation, revision = %runtime.revision, "configuration reloaded");
    state.shared.runtime.store(Arc::new(runtime));
    state.tls.store(Arc::new(tls));
    // After the swap: open database sessions and WebSocket tunnels re-evaluate against the
    // new generation (a removed route's end), then listeners of added and moved routes
    // start accepting and those of removed and moved routes close.
    state.pg.reloaded(pg);
    state.shared.reloads.send_replace(generation);
    state.pg_listeners.apply(listeners);
    state.refused_files.lock().clear();
    m.config_reloads.inc(&"ok");
    true
}

/// A reload refused at `stage`: counted, and audited as a `reload` event with
/// `outcome: "rejected"`, so the audit trail shows every attempted change, not only
/// those that took effect. The problems are the diagnostics already logged
/// (`file:line:col: message`; they never quote a secret), the first ten, each bounded.
fn rejected(state: &State, stage: &'static str, problems: Vec<String>) -> bool {
    const SHOWN: usize = 10;
    crate::metrics::global().config_reloads.inc(&"error");
    let current = state.shared.runtime.load();
    let shown: Vec<&str> =
        problems.iter().take(SHOWN).map(|p| &p[..crate::audit::bounded_len(p)]).collect();
    state.sink.emit(&serde_json::json!({
        "ts": crate::audit::now_rfc3339(),
        "kind": "reload",
        "outcome": "rejected",
        "stage": stage,
        "generation": current.generation,
        "policy_revision": &*current.revision,
        "problems": problems.len(),
        "errors": shown,
    }));
    false
}

/// How long a listener waits after a failed `accept` before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A listener's failed `accept`: out of file descriptors (EMFILE, ENFILE: more clients
/// than `ulimit -n` allows), or out of kernel memory. The connection stays in the kernel's
/// backlog; the listener waits [`ACCEPT_BACKOFF`] (it neither spins nor stops: it accepts
/// again as soon as a descriptor is free), counts the failure in
/// `portcullis_accept_errors_total`, and reports on stderr at most once per
/// [`per_client::REPORT_EVERY`] with the number since its last report, never a line per
/// retry (20 a second for as long as the clients stay).
pub(crate) async fn accept_failed(
    listener: &str,
    error: &std::io::Error,
    report: &mut per_client::Throttle,
) {
    crate::metrics::global().accept_errors.fetch_add(1, Ordering::Relaxed);
    if let Some(n) = report.note(std::time::Instant::now()) {
        tracing::warn!(
            listener,
            %error,
            failed = n,
            "{listener}: accept failed {n} time(s) since the last report ({error}); retried \
             every {}ms, reported at most every {}s (portcullis_accept_errors_total counts \
             each); out of file descriptors: raise `ulimit -n` or lower server.max_connections",
            ACCEPT_BACKOFF.as_millis(),
            per_client::REPORT_EVERY.as_secs()
        );
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

async fn accept_loop(
    listener: TcpListener,
    tls: bool,
    state: Arc<State>,
    trusted: Vec<crate::config::IpNet>,
    Slots { limit, per_client }: Slots,
    mut shutdown: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
) {
    // The port clients connect to (`X-Forwarded-Port`): the listener's, read once.
    let local_port = listener.local_addr().ok().map(|a| a.port());
    let name = match listener.local_addr() {
        Ok(a) if tls => format!("https listener {a}"),
        Ok(a) => format!("plain HTTP listener {a}"),
        Err(_) => "listener".to_string(),
    };
    let mut failures = per_client::Throttle::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    accept_failed(&name, &e, &mut failures).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        // Counted against its client first; over that client's limit it is reset at
        // once, before it waits for a slot, is handshaken or read (a reload's limit
        // applies to the next connections).
        let per_client_limit = state.shared.runtime.load().config.server.max_connections_per_client;
        let Some(client) = per_client.admit(peer.ip(), per_client_limit) else {
            per_client::reset(stream);
            continue;
        };
        // The connection's slot, taken once it is accepted: a loop waiting for clients
        // holds none (each listener's loop used to keep one, so N listeners left
        // max_connections - N for clients). With every slot taken this connection waits
        // for one, unserved, and the next clients wait in the kernel's backlog.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut shutdown) => return,
        };
        let _ = stream.set_nodelay(true);
        let trusted_peer = trusted.iter().any(|n| n.contains(peer.ip()));
        let shared = state.shared.clone();
        let sink = state.sink.clone();
        // Read per connection, so a reload's timeouts apply to the next connections.
        let (header_timeout, max_header, timeouts) = {
            let s = &state.shared.runtime.load().config.server;
            let timeouts = Timeouts { idle: s.idle_timeout, send: s.send_timeout };
            (s.header_timeout, s.max_header_size, timeouts)
        };
        let builder = http_server_builder(header_timeout, max_header);
        let tls_cfg = if tls { (**state.tls.load()).clone() } else { None };
        let mut stop = shutdown.clone();
        let mut cut = cut.clone();
        let slots = limit.clone();
        tokio::spawn(async move {
            // The slot (and the client's count, and the connection's place in
            // `portcullis_connections_open`) is held by the connection and, after a
            // WebSocket upgrade, by its tunnel.
            let activity = Activity::new(Some(permit), Some(client), Some(slots));
            let conn = |tls| ConnInfo::new(peer, local_port, tls, trusted_peer, activity.clone());
            let http = Http { builder: &builder, shared, sink, timeouts };
            let serve = async {
                match tls_cfg {
                    Some(cfg) => {
                        if let Some((stream, tls)) = tls_handshake(cfg, stream, peer).await {
                            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                                activity.negotiated_http2();
                            }
                            http.serve(stream, conn(Some(tls)), &mut stop).await;
                        }
                    }
                    None => http.serve(stream, conn(None), &mut stop).await,
                }
            };
            // At the end of a shutdown's grace period the connection is dropped, and with
            // it the requests still in flight (each writes its event as it goes).
            tokio::select! {
                () = serve => {}
                () = async {
                    grace_over(&mut cut).await;
                    // Said before `serve` (and its requests) is dropped.
                    activity.shut();
                } => {}
            }
        });
    }
}

/// Where an accept loop's connections take their places: a `max_connections` slot and
/// their client's count (`max_connections_per_client`), both shared by every listener.
struct Slots {
    limit: Arc<Semaphore>,
    per_client: Arc<per_client::PerClient>,
}

/// What serving one client connection needs besides the connection itself.
struct Http<'a> {
    builder: &'a auto::Builder<TokioExecutor>,
    shared: Arc<Shared>,
    sink: AuditSink,
    timeouts: Timeouts,
}

/// `server.idle_timeout` and `server.send_timeout`, as a connection was accepted with.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    idle: Duration,
    send: Duration,
}

impl Http<'_> {
    /// Serves a (plain or TLS) connection until it ends ([`drive`]); a request the
    /// HTTP/1 server refused on its own still gets its audit event.
    async fn serve<I>(self, io: I, conn: ConnInfo, stop: &mut watch::Receiver<bool>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = conn.activity.clone();
        let io = TokioIo::new(Counted::new(io, activity.clone()));
        let svc =
            TowerToHyperService::new(stack::service(self.shared, self.sink.clone(), conn.clone()));
        let c = self.builder.serve_connection_with_upgrades(io, svc);
        if let Some(e) = drive(c, stop, &activity, self.timeouts).await {
            crate::http::access_log::refused_by_server(&self.sink, &conn, &*e);
        }
    }
}

/// The TLS handshake of a client connection (at most 10 s) and what the audit records
/// of it; `None` if it failed.
async fn tls_handshake(
    cfg: Arc<rustls::ServerConfig>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Arc<TlsInfo>)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    let (_, sess) = stream.get_ref();
    let info = TlsInfo {
        version: match sess.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        },
        sni: sess.server_name().map(|s| Arc::from(s.to_ascii_lowercase())),
    };
    Some((stream, Arc::new(info)))
}

/// The hyper server settings of every proxy listener (also used by `dev floor`, so the
/// load test's floor measures exactly this server).
pub fn http_server_builder(
    header_timeout: Duration,
    max_header_size: usize,
) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slow-loris: a client gets this long to send a request head once it starts.
        .header_read_timeout(header_timeout)
        // The read buffer may grow to this while a head is incomplete: bounded memory per
        // connection (a longer head gets 431).
        .max_buf_size(max_header_size)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(max_header_size).unwrap_or(u32::MAX));
    builder
}

/// The soft "Max open files" limit from `/proc/self/limits` (`None`: unlimited or unknown).
fn open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Each connection takes a descriptor, and each request in flight (one per HTTP/1
/// connection, one per slot for HTTP/2 streams) one more upstream: `max_connections`
/// needs about twice as many descriptors, plus idle upstream pools, files and listeners.
fn descriptor_warning(max_connections: usize, open_files: Option<u64>) -> Option<String> {
    let limit = open_files?;
    let needed = 2 * max_connections as u64 + 256;
    (limit < needed).then(|| {
        let fits = limit.saturating_sub(256) / 2;
        let advice = if fits == 0 {
            " (this limit leaves no room for connections beyond the process's own files)"
                .to_string()
        } else {
            format!(" or lower max_connections to {fits}")
        };
        format!(
            "server.max_connections = {max_connections} may need about {needed} file descriptors, and the \
             open-files limit is {limit}: raise it (`ulimit -n`, systemd `LimitNOFILE=`){advice}, \
             or accepting fails with EMFILE under load"
        )
    })
}

/// HTTP/2 streams a client may have open on one connection (nginx allows 128, Envoy's
/// edge guidance 100). Each stream beyond the first also takes a `max_connections`
/// slot while in flight ([`crate::http::activity`]).
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// How long a closing connection (idle, or shutting down) with no request in flight and
/// no write refused may take to finish closing: an HTTP/2 client that never answers the
/// GOAWAY's PING, or keeps sending its own, would otherwise keep it (and its slot)
/// forever. As nginx's `lingering_timeout` and Envoy's `drain_timeout` (5 s both).
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// How long a shutdown waits, after the drain, for the queued audit events to be
/// written before it gives up on them (and says how many were lost).
pub const AUDIT_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How long the drain waits, once the grace period is over and the remaining connections
/// are closed, for their requests to end and give their slots back.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Admin connections served at once. The listener never stops accepting: a connection
/// beyond these takes the place of the oldest one that has sent no request yet, so
/// probes are never left in the kernel backlog behind silent sockets.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The admin listener: one request per connection (probes and scrapes are cheap to
/// reconnect), until `stop` (the end of a shutdown's drain, not its start: the probes
/// see it draining), at most [`ADMIN_MAX_CONNECTIONS`] at once, each closed if it sends no
/// request within [`crate::admin::FIRST_REQUEST_TIMEOUT`] or when a newer connection needs
/// its place before it has, and none open longer than `server.idle_timeout` — so silent
/// sockets can neither use up the process's descriptors nor starve the health probes
/// when the listener is exposed beyond loopback.
async fn admin_loop(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    use crate::admin::Slot;
    // Oldest first; a slot is gone once its connection's task has ended.
    let mut slots: std::collections::VecDeque<std::sync::Weak<Slot>> = Default::default();
    let name = match listener.local_addr() {
        Ok(a) => format!("admin listener {a}"),
        Err(_) => "admin listener".to_string(),
    };
    let mut failures = per_client::Throttle::default();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(&name, &e, &mut failures).await;
                continue;
            }
        };
        slots.retain(|s| s.strong_count() > 0);
        if slots.len() >= ADMIN_MAX_CONNECTIONS {
            match slots.iter().position(|s| s.upgrade().is_some_and(|s| s.evict())) {
                Some(oldest_silent) => {
                    slots.remove(oldest_silent);
                }
                // Every one is being answered (each a moment): this one waits its turn
                // closed, and reconnects.
                None => continue,
            }
        }
        let slot = Arc::new(Slot::default());
        slots.push_back(Arc::downgrade(&slot));
        let lifetime = state.shared.runtime.load().config.server.idle_timeout;
        tokio::spawn(crate::admin::serve_connection(
            stream,
            state.shared.clone(),
            state.draining.clone(),
            state.sink.health(),
            slot,
            lifetime,
        ));
    }
}

/// The files the watcher polls: those of the configuration in force, with the digest
/// of what it read of each when known, and those of the newest version refused since.
fn watched(state: &State) -> watcher::Watched {
    let rt = state.shared.runtime.load();
    let read = rt.config.read_digests();
    let mut files = rt.config.files.clone();
    files.push(state.config_path.clone());
    // A refused version may name files the one in force does not read (a new policy,
    // also one not written yet): a fix to one of them must bring a reload.
    files.extend(state.refused_files.lock().iter().cloned());
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    files
        .into_iter()
        .map(|f| {
            let d = read.get(&f).copied();
            (f, d)
        })
        .collect()
}

/// Reloads when a file of the configuration in force, or of the newest version refused
/// since, changed ([`watcher`]).
async fn watch_loop(state: Arc<State>, shutdown: watch::Receiver<bool>) {
    watcher::run(watcher::TIMING, || watched(&state), || reload(&state), shutdown).await;
}

/// Serves one connection until it ends, shutdown is signalled, or it has had no request
/// in flight for `idle_timeout`. On shutdown or idle it stops taking new requests
/// (HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY) and finishes those
/// in flight. Returns the error the connection ended with, if any (for the audit log).
///
/// A client cannot hold the connection (and its `max_connections` slot) by taking nothing
/// of what it is sent: once it has held up writes or an HTTP/2 response for
/// `send_timeout` ([`Activity::stall_deadline`]) the connection is dropped, whatever its
/// state; and a closing connection with nothing in flight and nothing it refuses to
/// take is dropped after [`CLOSE_LINGER`] (HTTP/2's graceful close waits for the
/// client's answer to a PING, which it need not send).
async fn drive<C>(
    conn: C,
    stop: &mut watch::Receiver<bool>,
    activity: &Activity,
    t: Timeouts,
) -> Option<C::Error>
where
    C: hyper_util::server::graceful::GracefulConnection,
{
    tokio::pin!(conn);
    // Since when the connection has been closing (idle or shutdown), once it is.
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        // Looked at again at least this often (so a stall that begins meanwhile is seen
        // in time); the timer is re-armed only when it fires, not per request.
        let mut wake = tokio::time::Instant::now() + t.idle.min(t.send);
        let close = match closing {
            None => activity.idle_deadline(t.idle),
            Some(since) => Some(since + CLOSE_LINGER),
        };
        for d in [activity.stall_deadline(t.send), close].into_iter().flatten() {
            wake = wake.min(d);
        }
        tokio::select! {
            r = conn.as_mut() => return r.err(),
            _ = stopped(stop), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now());
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = tokio::time::Instant::now();
                let m = crate::metrics::global();
                if activity.stall_deadline(t.send).is_some_and(|d| d <= now) {
                    tracing::debug!(send_s = t.send.as_secs(), "closing a connection whose client takes nothing of what it is sent");
                    m.stalled_connections_closed.fetch_add(1, Ordering::Relaxed);
                    // Before the drop: the requests cut short by it say why.
                    activity.abandon();
                    return None;
                }
                match closing {
                    None => {
                        if activity.idle_deadline(t.idle).is_some_and(|d| d <= now) {
                            tracing::debug!(idle_s = t.idle.as_secs(), "closing idle connection");
                            m.idle_connections_closed.fetch_add(1, Ordering::Relaxed);
                            conn.as_mut().graceful_shutdown();
                            closing = Some(now);
                        }
                    }
                    // Requests in flight finish (a shutdown's grace period bounds them);
                    // writes the client is taking go on (refused ones are timed above).
                    Some(since) => {
                        if since + CLOSE_LINGER <= now && !activity.busy() && !activity.write_blocked() {
                            tracing::debug!("dropping a connection that did not finish closing");
                            m.stalled_connections_closed.fetch_add(1, Ordering::Relaxed);
                            return None;
                        }
                    }
                }
            }
        }
    }
}

/// Resolves once shutdown has been signalled. (The guard `wait_for` returns is not
/// `Send`; dropping it here keeps the accept loops `Send`.)
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Resolves once a shutdown's grace period is over, or is cut short ([`Server::hurry`])
/// (never when the server is dropped without a shutdown: its connections then go on as
/// before).
pub(crate) async fn grace_over(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|over| *over).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Loads a configuration to serve, printing every diagnostic and every failing policy
/// test (either refuses it) on stderr; for `serve`. The error is the number of problems.
pub fn load_or_report(path: &Path) -> Result<Config, usize> {
    load_or_report_to(path, &mut |line| crate::util::stderr_line(&line))
}

/// [`load_or_report`], each line handed to `emit` (`serve --log-format json` logs them
/// as JSON objects).
pub fn load_or_report_to(path: &Path, emit: &mut dyn FnMut(&str)) -> Result<Config, usize> {
    match Config::load(path) {
        Ok(c) => {
            let failures = c.failing_policy_tests();
            if failures.is_empty() {
                return Ok(c);
            }
            for o in &failures {
                emit(&o.failure_report());
            }
            emit(&format!(
                "{}: {} policy test(s) failed; not serving",
                path.display(),
                failures.len()
            ));
            Err(failures.len())
        }
        Err(e) => {
            for d in &e.0 {
                emit(&d.to_string());
            }
            Err(e.0.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        descriptor_warning, open_files_limit, serving_line, AuditOutput, Bound, Duration, Fixed,
    };

    #[test]
    fn the_startup_line_names_listeners_routes_and_issuers_in_words() {
        let bound = Bound {
            https: "0.0.0.0:8443".parse().ok(),
            insecure_http: None,
            admin: "127.0.0.1:9090".parse().ok(),
            databases: vec![("orders".into(), ([127, 0, 0, 1], 6432).into())],
        };
        assert_eq!(
            serving_line(&bound, 3, &[("corp", "oidc"), ("bb", "bitbucket-pipelines")]),
            "serving: https 0.0.0.0:8443, admin 127.0.0.1:9090, database route orders 127.0.0.1:6432; 3 routes; issuers corp (oidc), bb (bitbucket-pipelines)"
        );
        let plain = Bound { insecure_http: "127.0.0.1:8080".parse().ok(), ..Bound::default() };
        assert_eq!(
            serving_line(&plain, 1, &[("corp", "oidc")]),
            "serving: plain HTTP 127.0.0.1:8080; 1 route; issuer corp (oidc)"
        );
    }

    #[test]
    fn a_reload_names_each_setting_that_only_a_restart_applies() {
        let started = Fixed {
            https: "127.0.0.1:8443".parse().ok(),
            insecure_http: None,
            admin: "127.0.0.1:9090".parse().ok(),
            trusted_proxies: vec![],
            audit: AuditOutput::Stdout,
            max_connections: 100,
            shutdown_grace: Duration::from_secs(30),
            watch: true,
            redis: None,
        };
        assert!(started.differences(&started.clone()).is_empty());
        let new = Fixed {
            audit: AuditOutput::File("/var/log/audit.jsonl".into()),
            max_connections: 50,
            shutdown_grace: Duration::from_secs(1),
            watch: false,
            ..started.clone()
        };
        assert_eq!(
            started.differences(&new),
            ["audit.output", "server.max_connections", "server.shutdown_grace", "server.watch"]
        );
        let moved = Fixed { admin: None, ..started.clone() };
        assert_eq!(started.differences(&moved), ["listen.admin"]);
        let shared = crate::config::RedisSettings {
            host: "10.0.0.5".into(),
            port: 6379,
            tls: false,
            ca: None,
            db: 0,
            username: None,
            password: None,
            key_prefix: "portcullis:".into(),
            timeout: Duration::from_millis(500),
        };
        let with_redis = Fixed { redis: Some(shared), ..started.clone() };
        assert_eq!(started.differences(&with_redis), ["redis"]);
    }

    const LIMITS: &str =
        "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max open files            1024                 524288               files     \n";

    #[test]
    fn the_open_files_limit_is_read_from_proc_and_compared_with_max_connections() {
        assert_eq!(open_files_limit(LIMITS), Some(1024));
        assert_eq!(open_files_limit(&LIMITS.replace("1024 ", "unlimited ")), None);
        assert_eq!(open_files_limit("garbage"), None);
        let w = descriptor_warning(10_000, Some(1024)).unwrap_or_default();
        assert!(w.contains("20256") && w.contains("is 1024") && w.contains("to 384"), "{w}");
        assert_eq!(descriptor_warning(10_000, Some(1 << 20)), None);
        assert_eq!(descriptor_warning(10_000, None), None);
        // A limit that leaves no room for connections: no `max_connections` fits, and 0
        // (which is no valid value) is not offered as one.
        let w = descriptor_warning(10_000, Some(64)).unwrap_or_default();
        assert!(w.contains("is 64") && !w.contains("to 0") && w.contains("raise it"), "{w}");
        assert!(w.contains("leaves no room"), "{w}");
    }
}
