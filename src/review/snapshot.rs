//! The routes of a configuration and their compiled policies, read from the working
//! tree (through [`Config::load`], exactly as `serve` reads them) or from a git
//! revision (config and policy text from git, compiled with
//! [`Policy::parse`]), plus the `[[test]]` sets that go with them.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::git;
use crate::config::{Config, HostMatch};
use crate::diag::{Diagnostic, Source};
use crate::identity::{ClaimPath, IssuerSettings, Preset, TokenType};
use crate::policy::{Catalog, Policy, TestCase};

/// Routes and policies at one point in history.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `working tree`, or the short commit.
    pub label: String,
    pub catalog: Catalog,
    /// HTTP routes in routing order (most specific host, then longest prefix, then
    /// file order), then PostgreSQL routes (`[[databases]]`) in file order.
    pub routes: Vec<RouteView>,
    /// Each issuer's settings that decide whose tokens it accepts, by issuer name (read
    /// by [`Snapshot::load`] for `policy diff`; empty from [`Snapshot::from_config`]).
    pub issuers: BTreeMap<String, Settings>,
    /// The top-level sections' settings (`[session]`, `[assertion]`, `[listen]`,
    /// `[server]`, `[audit]`, `[tls]`, …) by section name: a session key file moved to
    /// one the change commits, a `cookie_domain` added or a `trusted_proxies` widened
    /// changes who gets in or what is recorded as surely as a policy does. As for
    /// issuers, read by [`Snapshot::load`] only.
    pub sections: BTreeMap<String, Settings>,
}

/// Settings of an issuer or a route as written, by key, each value rendered as
/// compact JSON (`"https://idp"`, `["a","b"]`, `true`); a key absent is not listed.
/// Only keys that may change who gets access or what the upstream is told: the
/// ones that only tune availability (timeouts, cache lifetimes, body limits) are
/// left out, and every key not known to be harmless is kept, so a setting added
/// later is reported until it is classified.
pub type Settings = BTreeMap<String, String>;

/// Keys that tune availability or limits only, never who gets in.
const NOT_ACCESS: &[&str] = &[
    // issuers (`stale_window` is access: a longer one trusts a withdrawn key longer)
    "refresh_cooldown",
    // [server] limits and timeouts
    "max_connections",
    "max_connections_per_client",
    "idle_timeout",
    "header_timeout",
    "send_timeout",
    "shutdown_grace",
    "token_cache_entries",
    "max_header_size",
    // routes and databases
    "timeout",
    "connect_timeout",
    "startup_timeout",
    "max_request_body",
];

/// The settings in `rest` (the keys a snapshot does not read otherwise) that may
/// change access. A value under a key naming a secret is never shown, only whether
/// it changed (a secret must not reach a pull-request comment, even one an old
/// revision committed by mistake).
fn access_settings(rest: &BTreeMap<String, toml::Value>) -> Settings {
    rest.iter()
        .filter(|(k, _)| !NOT_ACCESS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), render_value(k, v)))
        .collect()
}

/// The settings of issuer `name` that shape its tokens' identities, and so its
/// `[[test]]`s' (the issuer URL, for Google's rule; `audiences`, `client_id`,
/// `token_type` and `hosted_domain`, for the profile checks; `groups_claim`), read from
/// its table, every other at its default: a test of a revision decides as `serve` of
/// that revision would. Why a `groups_claim` names no claim, otherwise.
fn identity_settings(
    name: &str,
    preset: Preset,
    table: &BTreeMap<String, toml::Value>,
) -> Result<IssuerSettings, String> {
    let text = |key: &str| table.get(key).and_then(toml::Value::as_str).map(str::to_string);
    let mut settings = IssuerSettings::declared(name, preset);
    settings.issuer = text("issuer").unwrap_or_default();
    if let Some(audiences) = table.get("audiences").and_then(toml::Value::as_array) {
        settings.audiences =
            audiences.iter().filter_map(toml::Value::as_str).map(str::to_string).collect();
    }
    settings.client_id = text("client_id");
    settings.hosted_domain = text("hosted_domain");
    if text("token_type").as_deref() == Some("access") {
        settings.token_type = TokenType::Access;
    }
    if let Some(claim) = text("groups_claim") {
        settings.groups_claim =
            ClaimPath::parse(&claim).map_err(|e| format!("issuer `{name}`: `groups_claim` {e}"))?;
    }
    Ok(settings)
}

/// Whether `s` is a URL that carries a credential: an `@` anywhere (the load refuses
/// it in every URL: `http://u:pa/ss@host` parses as host `u`, yet holds a password), or
/// a password in its query (`postgres://db/app?password=…`). Never shown by the diff.
fn url_with_credentials(s: &str) -> bool {
    s.contains("://") && (s.contains('@') || s.to_ascii_lowercase().contains("password"))
}

fn render_value(key: &str, v: &toml::Value) -> String {
    // A key naming a secret holds it, unless it holds where the secret is: a file's
    // path (`password_file`) or a variable's name (`client_secret_env`), shown so a
    // reviewer sees which credential a route now uses, unless it reads like the secret
    // pasted by mistake (`pasted`, below).
    let secret = |k: &str| {
        (k.contains("secret") || k.contains("password"))
            && !(k.ends_with("_file") || k.ends_with("_env"))
    };
    // A `*_env` key holds a variable's name; one that does not read like a name may be
    // the secret itself, pasted by mistake (`keys_env = "<hex key>"`).
    // So may a path that reads like a secret ([`crate::config::reads_like_secret`]).
    let pasted = |k: &str, v: &toml::Value| match v.as_str() {
        Some(url) if url_with_credentials(url) => true,
        Some(name) if k.ends_with("_env") => !crate::config::env_name_shown(name).contains(name),
        Some(path)
            if k.ends_with("_file") || matches!(k, "key" | "cert" | "ca" | "upstream_ca") =>
        {
            crate::config::reads_like_secret(path)
        }
        _ => false,
    };
    match v {
        // Keys quoted as JSON strings, so no key or value can read as another pair.
        toml::Value::Table(t) => {
            let parts: Vec<String> = t
                .iter()
                .map(|(k, v)| {
                    let name = serde_json::to_string(k).unwrap_or_default();
                    format!("{name}: {}", render_value(k, v))
                })
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        // Each item as a value of the key: an array of tables (`[[tls.sni]]`) holds keys
        // of its own, each judged as above.
        toml::Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(|item| render_value(key, item)).collect();
            format!("[{}]", parts.join(","))
        }
        // The digest tells a change apart without showing the value.
        _ if secret(key) || pasted(key, v) => {
            let digest = crate::util::sha256(v.to_string().as_bytes());
            format!(
                "(hidden, {:02x}{:02x}{:02x}{:02x})",
                digest[0], digest[1], digest[2], digest[3]
            )
        }
        _ => serde_json::to_string(v).unwrap_or_else(|_| v.to_string()),
    }
}

/// One route, as far as access is concerned.
#[derive(Debug, Clone)]
pub struct RouteView {
    pub name: String,
    /// `*`, `api.example.com` or `*.example.com`.
    pub host: String,
    pub path_prefix: String,
    /// The route's own method filter, if any.
    pub methods: Option<Vec<String>>,
    pub policy: Arc<Policy>,
    pub shadow: Option<Arc<Policy>>,
    /// Set for a PostgreSQL route (`[[databases]]`); `host`, `path_prefix` and
    /// `methods` are then empty and meaningless.
    pub database: Option<DatabaseView>,
    /// The route's other settings that may change access or what the upstream is
    /// told (`upstream`, `issuers`, `preserve_host`, `forward_token`, `upstream_tls`,
    /// …); read by [`Snapshot::load`] only.
    pub settings: Settings,
    /// `cors_preflight = true`: a CORS preflight without a credential is forwarded
    /// without consulting the policy.
    pub cors_preflight: bool,
}

/// What a PostgreSQL route adds to a [`RouteView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseView {
    /// The address clients connect to.
    pub listen: String,
    /// `host:port` of the upstream server.
    pub upstream: String,
    /// The upstream role when the deciding rule grants no `upstream_role`.
    pub upstream_user: String,
    /// The other roles a rule may grant, sorted.
    pub upstream_roles: Vec<String>,
}

/// `[[test]]` cases and the policy they run against.
#[derive(Debug, Clone)]
pub struct TestSet {
    /// The route whose live policy this is; `None` for a policy that is only ever a
    /// shadow policy.
    pub route: Option<String>,
    pub policy: Arc<Policy>,
    /// Where the cases are written (the policy itself, or an extra test file).
    pub file: Arc<Path>,
    pub cases: Vec<TestCase>,
}

/// Where files come from: the disk (paths relative to `root`), or git at `rev`.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: PathBuf,
    pub rev: Option<String>,
}

// === impl Tree ===

impl Tree {
    pub fn disk(root: impl Into<PathBuf>) -> Self {
        Tree { root: root.into(), rev: None }
    }

    fn read(&self, path: &Path) -> Result<String, String> {
        match &self.rev {
            None => std::fs::read_to_string(self.root.join(path))
                .map_err(|e| format!("cannot read file: {e}")),
            Some(rev) => git::show(&self.root, rev, path),
        }
    }

    /// `*.toml` files directly in `dir`, sorted; none when `dir` does not exist.
    fn toml_files(&self, dir: &Path) -> Result<Vec<PathBuf>, String> {
        let mut out: Vec<PathBuf> = match &self.rev {
            None => match std::fs::read_dir(self.root.join(dir)) {
                Ok(entries) => entries
                    .filter_map(Result::ok)
                    .map(|e| dir.join(e.file_name()))
                    .filter(|p| self.root.join(p).is_file())
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            },
            Some(rev) => git::ls(&self.root, rev, dir)?,
        };
        out.retain(|p| p.extension().is_some_and(|e| e == "toml"));
        out.sort();
        Ok(out)
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// The routes of a loaded configuration.
    pub fn from_config(config: &Config) -> Snapshot {
        let mut catalog = Catalog::default();
        for issuer in &config.issuers {
            catalog.insert(issuer.clone());
        }
        let routes = config
            .routes
            .iter()
            .map(|r| RouteView {
                name: r.name.to_string(),
                host: match &r.host {
                    HostMatch::Any => "*".to_string(),
                    HostMatch::Exact(h) => h.clone(),
                    HostMatch::Suffix(s) => format!("*{s}"),
                },
                path_prefix: r.path_prefix.clone(),
                methods: r
                    .methods
                    .as_ref()
                    .map(|m| m.iter().map(|m| m.as_str().to_string()).collect()),
                policy: r.policy.clone(),
                shadow: r.shadow_policy.clone(),
                database: None,
                settings: Settings::new(),
                cors_preflight: r.cors_preflight,
            })
            .chain(config.databases.iter().map(|d| {
                RouteView::database(
                    d.name.to_string(),
                    d.policy.clone(),
                    DatabaseView {
                        listen: d.listen.to_string(),
                        upstream: d.upstream_display.to_string(),
                        upstream_user: d.upstream_user.clone(),
                        upstream_roles: d.upstream_roles.keys().cloned().collect(),
                    },
                )
            }))
            .collect();
        Snapshot {
            label: "working tree".into(),
            catalog,
            routes,
            issuers: BTreeMap::new(),
            sections: BTreeMap::new(),
        }
    }

    /// Reads the configuration at `config` (relative to `tree.root`) and every policy
    /// its routes name. Only what access depends on is read (issuers and their
    /// presets, routes, `server.policy_dir`), so a revision whose certificates are
    /// elsewhere still compares. Fails with every problem at once.
    pub fn load(tree: &Tree, config: &Path, label: String) -> Result<Snapshot, Vec<String>> {
        let at = |p: &Path| match &tree.rev {
            Some(rev) => format!("{}@{rev}", p.display()),
            None => p.display().to_string(),
        };
        let text = tree.read(config).map_err(|e| vec![format!("{}: {e}", at(config))])?;
        let raw: LenientConfig =
            toml::from_str(&text).map_err(|e| vec![format!("{}: {}", at(config), e.message())])?;
        let mut problems = Vec::new();
        let mut catalog = Catalog::default();
        for (name, issuer) in &raw.issuers {
            let preset = match issuer.preset.as_deref() {
                None => Preset::Oidc,
                Some(p) => Preset::parse(p).unwrap_or_else(|| {
                    problems.push(format!("{}: issuer `{name}`: unknown preset `{p}`", at(config)));
                    Preset::Oidc
                }),
            };
            match identity_settings(name, preset, &issuer.rest) {
                Ok(settings) => catalog.insert(settings),
                Err(e) => {
                    problems.push(format!("{}: {e}", at(config)));
                    catalog.declare(name, preset);
                }
            }
        }
        let issuers = raw
            .issuers
            .iter()
            .map(|(name, i)| {
                let mut settings = access_settings(&i.rest);
                if let Some(p) = &i.preset {
                    settings.insert("preset".into(), render_value("preset", &p.clone().into()));
                }
                (name.clone(), settings)
            })
            .collect();
        let base = config.parent().map(Path::to_path_buf).unwrap_or_default();
        let policy_dir = base.join(raw.server.policy_dir.as_deref().unwrap_or("policies"));
        let mut compiled: BTreeMap<PathBuf, Option<Arc<Policy>>> = BTreeMap::new();
        let mut load = |name: &str, problems: &mut Vec<String>| -> Option<Arc<Policy>> {
            let path = if name.contains('/') || name.ends_with(".toml") {
                normalize(&base.join(name))
            } else {
                normalize(&policy_dir.join(format!("{name}.toml")))
            };
            if let Some(done) = compiled.get(&path) {
                return done.clone();
            }
            // `serve` reads such a file where it is (`/srv/…`, `../repo/…`); git holds no
            // file there, and no other file may stand in for it.
            if path.is_absolute() || path.starts_with("..") {
                problems.push(format!(
                    "{}: policy `{}` is outside the repository: `policy diff` compares the files git holds and cannot judge it",
                    at(config),
                    crate::diag::Visible(name)
                ));
                compiled.insert(path, None);
                return None;
            }
            let policy = match tree.read(&path) {
                Err(e) => {
                    problems.push(format!("{}: {e}", at(&path)));
                    None
                }
                Ok(text) => match Policy::parse(&Source::new(path.clone(), text), &catalog) {
                    Ok(p) => Some(Arc::new(p)),
                    Err(d) => {
                        problems.extend(d.into_sorted().iter().map(|d| match &tree.rev {
                            Some(rev) => format!("{d} (at {rev})"),
                            None => d.to_string(),
                        }));
                        None
                    }
                },
            };
            compiled.insert(path, policy.clone());
            policy
        };
        let mut routes = Vec::new();
        for (order, r) in raw.routes.iter().enumerate() {
            let policy = load(&r.policy, &mut problems);
            let shadow = r.shadow_policy.as_deref().map(|s| load(s, &mut problems));
            let (Some(policy), Some(shadow)) = (policy, shadow.map_or(Some(None), |s| s.map(Some)))
            else {
                continue;
            };
            let host = r.matcher.host.clone().unwrap_or_else(|| "*".into()).to_ascii_lowercase();
            let view = RouteView {
                name: r.name.clone(),
                host,
                path_prefix: r.matcher.path_prefix.clone().unwrap_or_else(|| "/".into()),
                methods: r.matcher.methods.clone(),
                policy,
                shadow,
                database: None,
                settings: access_settings(&r.rest),
                cors_preflight: r.rest.get("cors_preflight").and_then(toml::Value::as_bool)
                    == Some(true),
            };
            routes.push((order, view));
        }
        let mut databases = Vec::new();
        for d in &raw.databases {
            let Some(policy) = load(&d.policy, &mut problems) else {
                continue;
            };
            let upstream = d.upstream.strip_prefix("postgres://").unwrap_or(&d.upstream);
            let upstream = upstream.strip_prefix("postgresql://").unwrap_or(upstream);
            let upstream = if url_with_credentials(&d.upstream) {
                render_value("upstream", &d.upstream.clone().into())
            } else {
                upstream.trim_end_matches('/').to_string()
            };
            let view = DatabaseView {
                listen: d.listen.clone(),
                upstream,
                upstream_user: d.upstream_user.clone(),
                upstream_roles: d.upstream_roles.keys().cloned().collect(),
            };
            let mut route = RouteView::database(d.name.clone(), policy, view);
            route.settings = access_settings(&d.rest);
            // Where each role a rule may grant gets its password (a variable's name or a
            // file's path, [`render_value`]; never the password): a change of credentials
            // changes which upstream identity sessions log in as.
            for (role, credentials) in &d.upstream_roles {
                // A role written as anything but a table (the load refuses it) may be
                // its password itself.
                let shown = match credentials {
                    toml::Value::Table(_) => render_value("upstream_roles", credentials),
                    other => render_value("password", other),
                };
                route.settings.insert(format!("upstream_roles.{role}"), shown);
            }
            databases.push(route);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let specificity = |h: &str| match h {
            "*" => 0,
            s if s.starts_with("*.") => s.len(),
            s => 10_000 + s.len(),
        };
        // As routing orders them (`Config::load`).
        let rank = crate::config::prefix_rank;
        routes.sort_by(|(oa, a), (ob, b)| {
            (specificity(&b.host), rank(&b.path_prefix), *oa).cmp(&(
                specificity(&a.host),
                rank(&a.path_prefix),
                *ob,
            ))
        });
        let routes = routes.into_iter().map(|(_, r)| r).chain(databases).collect();
        let mut sections: BTreeMap<String, Settings> = raw
            .rest
            .iter()
            .map(|(name, v)| {
                let settings = match v {
                    toml::Value::Table(t) => access_settings(&t.clone().into_iter().collect()),
                    other => Settings::from([(String::new(), render_value(name, other))]),
                };
                (name.clone(), settings)
            })
            .collect();
        let mut server = access_settings(&raw.server.rest);
        if let Some(dir) = &raw.server.policy_dir {
            server.insert("policy_dir".into(), render_value("policy_dir", &dir.clone().into()));
        }
        sections.insert("server".into(), server);
        sections.retain(|_, s| !s.is_empty());
        Ok(Snapshot { label, catalog, routes, issuers, sections })
    }

    /// The route named `name`: an HTTP route first, else a PostgreSQL route.
    pub fn route(&self, name: &str) -> Option<&RouteView> {
        self.routes
            .iter()
            .find(|r| r.name == name && r.database.is_none())
            .or_else(|| self.routes.iter().find(|r| r.name == name))
    }

    /// The route of this kind (HTTP or PostgreSQL) named `name`.
    pub fn route_of_kind(&self, name: &str, database: bool) -> Option<&RouteView> {
        self.routes.iter().find(|r| r.name == name && r.database.is_some() == database)
    }

    /// Whether a route that uses `policy` (live or shadow) forwards a CORS preflight to
    /// `path` without consulting it ([`RouteView::forwards_preflight`]).
    pub fn forwards_preflight(&self, policy: &Policy, path: &str) -> bool {
        self.routes.iter().any(|r| {
            let uses = r.policy.file() == policy.file()
                || r.shadow.as_ref().is_some_and(|s| s.file() == policy.file());
            uses && r.forwards_preflight(path)
        })
    }

    /// Every distinct policy file: live policies first, then shadow-only ones.
    pub fn policies(&self) -> Vec<(Option<&RouteView>, Arc<Policy>)> {
        let mut out: Vec<(Option<&RouteView>, Arc<Policy>)> = Vec::new();
        for r in &self.routes {
            if !out.iter().any(|(_, p)| p.file() == r.policy.file()) {
                out.push((Some(r), r.policy.clone()));
            }
        }
        for r in &self.routes {
            if let Some(s) = &r.shadow {
                if !out.iter().any(|(_, p)| p.file() == s.file()) {
                    out.push((None, s.clone()));
                }
            }
        }
        out
    }

    /// The `[[test]]` sets: each policy's own, then every `*.toml` in `dirs` (an
    /// extra test file `NAME.toml` runs against the policy named `NAME`, or else the
    /// live policy of route `NAME`). Fails with every problem at once.
    ///
    /// `any_rule`: a test naming a rule the policy does not have compiles (and fails
    /// when run) instead of being an error: `policy diff` must still compare a change
    /// that deletes a rule a security team's test guards, and show that test flip.
    pub fn test_sets(
        &self,
        tree: &Tree,
        dirs: &[PathBuf],
        any_rule: bool,
    ) -> Result<Vec<TestSet>, Vec<String>> {
        let mut sets: Vec<TestSet> = self
            .policies()
            .into_iter()
            .map(|(route, policy)| TestSet {
                route: route.map(|r| r.name.clone()),
                file: Arc::from(policy.file()),
                cases: policy.tests().to_vec(),
                policy,
            })
            .collect();
        let mut problems = Vec::new();
        for dir in dirs {
            let files = match tree.toml_files(dir) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            if files.is_empty() && tree.rev.is_none() && !tree.root.join(dir).is_dir() {
                problems.push(format!("{}: test directory does not exist", dir.display()));
            }
            for file in files {
                let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
                let stem = stem.unwrap_or_default();
                // Every policy the name could mean: one named so (in any directory), and
                // the live policy of a route named so. More than one is refused: a
                // policy of the same name added elsewhere, on a route ranked first, would
                // take the security team's cases, and the real policy go untested.
                let mut targets: Vec<(Option<String>, Arc<Policy>)> = self
                    .policies()
                    .into_iter()
                    .filter(|(_, p)| p.name() == stem)
                    .map(|(r, p)| (r.map(|r| r.name.clone()), p))
                    .collect();
                if let Some(r) = self.route(&stem) {
                    if !targets.iter().any(|(_, p)| p.file() == r.policy.file()) {
                        targets.push((Some(r.name.clone()), r.policy.clone()));
                    }
                }
                if targets.len() > 1 {
                    let files: Vec<String> = targets
                        .iter()
                        .map(|(_, p)| {
                            crate::diag::Visible(&p.file().display().to_string()).to_string()
                        })
                        .collect();
                    problems.push(format!(
                        "{}:1:1: `{stem}` names more than one policy ({}): an extra test file runs against one, named after it or its route; rename a policy",
                        file.display(),
                        files.join(", ")
                    ));
                    continue;
                }
                let target = targets.pop();
                let Some((route, policy)) = target else {
                    let names: Vec<&str> = self.routes.iter().map(|r| r.name.as_str()).collect();
                    problems.push(format!(
                        "{}:1:1: no policy or route is named `{stem}`: an extra test file is named after the policy it tests (routes: {})",
                        file.display(),
                        names.join(", ")
                    ));
                    continue;
                };
                let text = match tree.read(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        problems.push(format!("{}: {e}", file.display()));
                        continue;
                    }
                };
                let shown = match &tree.rev {
                    None if tree.root.as_os_str().is_empty() => file.clone(),
                    None => tree.root.join(&file),
                    Some(_) => file.clone(),
                };
                match policy.parse_tests(&Source::new(shown.clone(), text), &self.catalog, any_rule)
                {
                    Ok(cases) => {
                        sets.push(TestSet { route, policy, file: Arc::from(shown), cases })
                    }
                    Err(d) => problems.extend(d.into_sorted().iter().map(Diagnostic::to_string)),
                }
            }
        }
        if problems.is_empty() {
            Ok(sets)
        } else {
            Err(problems)
        }
    }
}

// === impl RouteView ===

impl RouteView {
    fn database(name: String, policy: Arc<Policy>, view: DatabaseView) -> RouteView {
        RouteView {
            name,
            host: String::new(),
            path_prefix: String::new(),
            methods: None,
            policy,
            shadow: None,
            database: Some(view),
            settings: Settings::new(),
            cors_preflight: false,
        }
    }

    /// Whether this route forwards a CORS preflight to `path` without consulting its
    /// policy: `cors_preflight = true`, `path` under its prefix, and its method filter
    /// (if any) takes `OPTIONS`.
    pub fn forwards_preflight(&self, path: &str) -> bool {
        self.cors_preflight
            && self.database.is_none()
            && crate::config::path_has_prefix(path, &self.path_prefix)
            && self.methods.as_ref().is_none_or(|m| m.iter().any(|x| x == "OPTIONS"))
    }

    /// `host api.example.com, paths under /v1, methods GET, HEAD`, or for a
    /// PostgreSQL route `PostgreSQL sessions on 0.0.0.0:6432 to db:5432, upstream
    /// role `readonly` unless the deciding rule grants `migrator``.
    pub fn describe(&self) -> String {
        if let Some(d) = &self.database {
            let mut s = format!(
                "PostgreSQL sessions on {} to {}, as upstream role `{}`",
                d.listen, d.upstream, d.upstream_user
            );
            if d.upstream_roles.is_empty() {
                s.push_str(" (no other role can be granted)");
            } else {
                let roles: Vec<String> =
                    d.upstream_roles.iter().map(|r| format!("`{r}`")).collect();
                s.push_str(&format!(" unless the deciding rule grants {}", roles.join(" or ")));
            }
            return s;
        }
        let host =
            if self.host == "*" { "any host".to_string() } else { format!("host {}", self.host) };
        let methods = match &self.methods {
            None => "any method".to_string(),
            // `GET` matches `HEAD` too (`policy::methods_admit`): list it.
            Some(m) => {
                let mut v: Vec<&str> = Vec::with_capacity(m.len() + 1);
                for method in m {
                    v.push(method);
                    if method == "GET" && !m.iter().any(|x| x == "HEAD") {
                        v.push("HEAD");
                    }
                }
                format!("methods {}", v.join(", "))
            }
        };
        format!("{host}, paths under {}, {methods}", self.path_prefix)
    }
}

/// `a/./b/../c` → `a/c`, lexically: git paths have no `.` or `..`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Only the parts of `portcullis.toml` that access depends on; everything else is
/// ignored here (`check` is where unknown keys are errors).
#[derive(Debug, Deserialize)]
struct LenientConfig {
    #[serde(default)]
    server: LenientServer,
    #[serde(default)]
    issuers: BTreeMap<String, LenientIssuer>,
    #[serde(default)]
    routes: Vec<LenientRoute>,
    #[serde(default)]
    databases: Vec<LenientDatabase>,
    /// Every other top-level table (`[session]`, `[assertion]`, `[listen]`, `[audit]`,
    /// `[tls]`, …), for `policy diff`.
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
struct LenientDatabase {
    name: String,
    #[serde(default)]
    listen: String,
    #[serde(default)]
    upstream: String,
    #[serde(default)]
    upstream_user: String,
    #[serde(default)]
    upstream_roles: BTreeMap<String, toml::Value>,
    policy: String,
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct LenientServer {
    policy_dir: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
struct LenientIssuer {
    preset: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
struct LenientRoute {
    name: String,
    #[serde(rename = "match", default)]
    matcher: LenientMatch,
    policy: String,
    shadow_policy: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct LenientMatch {
    host: Option<String>,
    path_prefix: Option<String>,
    methods: Option<Vec<String>>,
}
