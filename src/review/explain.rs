//! `portcullis policy explain -c FILE (--token JWT | --claims FILE | --preset NAME
//! --claim k=v...) --request "GET https://host/path"`: the route, the decision, and
//! every rule with the condition that failed or the fact that it matched.
//!
//! For a PostgreSQL route, `--database DB --role ROLE [--route NAME]` instead of
//! `--request`: the session decision and the upstream role it would get.
//!
//! A token is decoded and, when its issuer's keys can be fetched, verified exactly as
//! the proxy would; otherwise (or with `--no-verify`) its claims are explained and the
//! output says "signature NOT verified". The token itself is never printed.

use std::fmt::{self, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::Method;
use serde_json::{json, Map, Value};

use super::{Format, Report, EXIT_FAILED, EXIT_OK};
use crate::config::{Config, DatabaseSettings, LoadMode};
use crate::identity::{unverified_identity, Identity, IssuerSettings, Preset, Verifier};
use crate::policy::{Effect, Explanation, RequestFacts};
use crate::reason::Reason;

/// Who is asking.
#[derive(Clone)]
pub enum Caller {
    /// A compact JWT (never printed).
    Token(String),
    /// A JSON file of claims.
    Claims(PathBuf),
    /// A `dev token` preset with `key=value` / `key:=json` overrides.
    Preset { name: String, overrides: Vec<String> },
    /// No credential at all: only `public` rules can admit it.
    Anonymous,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Token(_) => f.write_str("Token(<redacted>)"),
            Caller::Claims(p) => f.debug_tuple("Claims").field(p).finish(),
            Caller::Preset { name, overrides } => {
                f.debug_struct("Preset").field("name", name).field("overrides", overrides).finish()
            }
            Caller::Anonymous => f.write_str("Anonymous"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExplainArgs {
    pub config: PathBuf,
    pub caller: Caller,
    /// The configured issuer name, when `iss` (or the preset) does not single one out.
    pub issuer: Option<String>,
    /// What is asked for.
    pub target: Target,
    pub no_verify: bool,
    /// With an expectation, exit 1 when the decision differs (scripts, CI).
    pub expect: Option<Effect>,
    pub format: Format,
    /// How long to wait for the issuer's keys before explaining unverified.
    pub verify_timeout: Duration,
}

/// What the caller asks for.
#[derive(Debug, Clone)]
pub enum Target {
    /// `METHOD URL`, e.g. `POST https://deploy.example.com/deploy/42`.
    Http(String),
    /// A PostgreSQL session: the database and role of the startup message, on the
    /// `[[databases]]` route `route` (optional when there is only one).
    Database { route: Option<String>, database: String, role: String },
}

/// A parsed `METHOD URL` (or `METHOD /path`, which only host-less routes take).
#[derive(Debug, Clone)]
pub struct RequestLine {
    pub method: Method,
    pub host: String,
    /// Normalized as the proxy normalizes it before routing and authorizing.
    pub path: String,
}

/// How the claims were obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verification {
    Verified,
    /// The token was checked and rejected: the proxy would answer with this reason.
    Rejected {
        reason: Reason,
        detail: String,
    },
    NotVerified(String),
}

// === impl RequestLine ===

impl RequestLine {
    pub fn parse(line: &str) -> Result<RequestLine, String> {
        let bad = |why: &str| format!("bad request {line:?}: {why}");
        let (method, target) = line
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad("expected \"METHOD https://host/path\""))?;
        let method = Method::from_bytes(method.as_bytes())
            .ok()
            .filter(|_| method.chars().all(|c| c.is_ascii_uppercase()))
            .ok_or_else(|| bad("unknown method (upper case, e.g. GET)"))?;
        if crate::http::never_forwarded(method.as_str()) {
            return Err(bad(&format!(
                "the proxy never forwards `{method}`: it refuses it on every route before any rule (405 method-not-allowed)"
            )));
        }
        let target = target.trim();
        let (host, raw_path) = if target.starts_with('/') {
            (String::new(), target.to_string())
        } else {
            let uri: http::Uri = target.parse().map_err(|_| bad("not a URL"))?;
            let host = uri.host().ok_or_else(|| bad("the URL has no host"))?.to_ascii_lowercase();
            (host, uri.path().to_string())
        };
        let raw_path = raw_path.split(['?', '#']).next().unwrap_or("/").to_string();
        let path = crate::http::path::normalize(&raw_path)
            .map_err(|e| {
                bad(&format!("the proxy rejects this path as `ambiguous-path`: {}", e.detail()))
            })?
            .into_owned();
        Ok(RequestLine { method, host, path })
    }

    pub fn facts(&self) -> RequestFacts<'_> {
        RequestFacts::http(&self.method, &self.path)
    }
}

impl fmt::Display for RequestLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.is_empty() {
            write!(f, "{} {}", self.method, self.path)
        } else {
            write!(f, "{} https://{}{}", self.method, self.host, self.path)
        }
    }
}

// === the command ===

pub fn run(args: &ExplainArgs) -> Report {
    let bad = |p: String| Report::bad_input(args.format, &[p]);
    let config = match Config::load_with(&args.config, LoadMode::PolicyOnly) {
        Ok(c) => c,
        Err(e) => {
            let p: Vec<String> = e.0.iter().map(ToString::to_string).collect();
            return Report::bad_input(args.format, &p);
        }
    };
    let asked = match &args.target {
        Target::Http(line) => match RequestLine::parse(line) {
            Ok(r) => Asked::Http(r),
            Err(e) => return bad(e),
        },
        Target::Database { route, database, role } => {
            match database_route(&config, route.as_deref()) {
                Ok(db) => Asked::Database { db, database, role },
                Err(e) => return bad(e),
            }
        }
    };
    // `None`: a caller without any credential.
    let caller = match &args.caller {
        Caller::Anonymous => None,
        _ => match caller_identity(&config, args) {
            Ok(x) => Some(x),
            Err(e) => return bad(e),
        },
    };
    let identity = caller.as_ref().map(|(_, identity, _)| identity);
    let verification = caller.as_ref().map(|(_, _, v)| v);
    // The route forwards a CORS preflight without consulting its policy.
    let mut cors_preflight = false;
    let (route_name, policy, explanation) = match &asked {
        Asked::Http(req) => {
            let route = config.route(&req.host, &req.path, &req.method);
            cors_preflight = route.is_some_and(|r| r.cors_preflight);
            let explanation = route.map(|r| r.policy.explain_caller(identity, &req.facts()));
            (route.map(|r| r.name.to_string()), route.map(|r| r.policy.clone()), explanation)
        }
        Asked::Database { db, database, role } => {
            let facts = RequestFacts::database(database, Some(role));
            let explanation = db.policy.explain_caller(identity, &facts);
            (Some(db.name.to_string()), Some(db.policy.clone()), Some(explanation))
        }
    };
    // An explained request carries no headers: an anonymous `OPTIONS` on such a route
    // is taken as the preflight a browser sends (as a `[[test]]` is).
    let preflight = match &asked {
        Asked::Http(req) => {
            let options = req.method == Method::OPTIONS;
            Preflight {
                route: cors_preflight,
                taken: cors_preflight && options && caller.is_none(),
            }
        }
        Asked::Database { .. } => Preflight { route: false, taken: false },
    };
    let (allowed, reason) = match (verification, &explanation) {
        _ if preflight.taken => (true, Reason::CorsPreflight),
        (Some(Verification::Rejected { reason, .. }), _) => (false, *reason),
        (_, Some(e)) => (e.decision.allowed, e.decision.reason),
        (_, None) => (false, Reason::NoRoute),
    };
    // The upstream role an allowed session would log in as.
    let upstream_role = match (&asked, &explanation) {
        (Asked::Database { db, .. }, Some(e)) if allowed => {
            Some(db.granted_role(e.decision.rule.as_deref()))
        }
        _ => None,
    };
    let code = match args.expect {
        Some(want) if (want == Effect::Allow) != allowed => EXIT_FAILED,
        _ => EXIT_OK,
    };
    let policy_file = policy.as_ref().map(|p| p.file().display().to_string());
    let out = match args.format {
        Format::Json => super::json(&json!({
            "request": asked.to_string(),
            "kind": if matches!(asked, Asked::Database { .. }) { "database" } else { "http" },
            "route": route_name,
            "policy": policy_file,
            "issuer": caller.as_ref().map(|(settings, _, _)| &settings.id),
            "anonymous": caller.is_none(),
            "verified": verification == Some(&Verification::Verified),
            "verification": verification.map(ToString::to_string),
            "identity": identity,
            "claims": identity.map(|i| &i.claims),
            "decision": { "allowed": allowed, "reason": reason.code() },
            "deciding_rule": explanation.as_ref().and_then(|e| e.decision.rule.clone()),
            "upstream_role": upstream_role,
            "rules": explanation.as_ref().map(|e| &e.rules),
            "cors_preflight": preflight.route.then(|| json!({
                "forwarded_without_policy": preflight.taken,
                "note": PREFLIGHT_NOTE,
            })),
            "expectation_met": code == EXIT_OK,
        })),
        Format::Text | Format::Markdown => {
            let mut o = text(
                &asked,
                route_name.as_deref(),
                policy_file.as_deref(),
                caller.as_ref(),
                explanation.as_ref(),
                (allowed, reason),
                preflight,
            );
            if let (Some(role), Asked::Database { db, .. }) = (&upstream_role, &asked) {
                let granted = explanation
                    .as_ref()
                    .and_then(|e| e.decision.rule.as_deref())
                    .and_then(|r| db.policy.rules().iter().find(|x| *x.id() == *r.id))
                    .and_then(|r| r.upstream_role())
                    .is_some();
                let how = if granted {
                    "granted by the deciding rule's `upstream_role`"
                } else {
                    "the route's `upstream_user`: the deciding rule grants none"
                };
                let _ = writeln!(o, "upstream role: `{role}` ({how})");
            }
            o
        }
    };
    let mut report = Report::new(code, out);
    if code == EXIT_FAILED {
        report.stderr = format!(
            "expected {}, got {}\n",
            if args.expect == Some(Effect::Allow) { "allow" } else { "deny" },
            if allowed { "allow" } else { "deny" }
        );
    }
    report
}

/// An HTTP request, or a PostgreSQL session on a database route.
enum Asked<'a> {
    Http(RequestLine),
    Database { db: &'a Arc<DatabaseSettings>, database: &'a str, role: &'a str },
}

impl fmt::Display for Asked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Asked::Http(r) => r.fmt(f),
            Asked::Database { database, role, .. } => {
                write!(f, "PostgreSQL session: database {database:?} as role {role:?}")
            }
        }
    }
}

/// The `[[databases]]` route named `name`, or the only one.
fn database_route<'a>(
    config: &'a Config,
    name: Option<&str>,
) -> Result<&'a Arc<DatabaseSettings>, String> {
    let names = || {
        let n: Vec<&str> = config.databases.iter().map(|d| &*d.name).collect();
        if n.is_empty() {
            "the configuration has no [[databases]]".to_string()
        } else {
            format!("database routes: {}", n.join(", "))
        }
    };
    match name {
        Some(name) => config
            .databases
            .iter()
            .find(|d| &*d.name == name)
            .ok_or_else(|| format!("no database route `{name}` ({})", names())),
        None => match config.databases.as_slice() {
            [one] => Ok(one),
            _ => Err(format!("name the database route with --route ({})", names())),
        },
    }
}

/// What the route's `cors_preflight` means for the explained request.
#[derive(Debug, Clone, Copy)]
struct Preflight {
    /// The route has `cors_preflight = true`.
    route: bool,
    /// An anonymous `OPTIONS`, taken as a CORS preflight: forwarded without the policy.
    taken: bool,
}

pub(super) const PREFLIGHT_NOTE: &str = "this route has `cors_preflight = true`: a CORS preflight without a credential (OPTIONS with Origin and Access-Control-Request-Method; no Authorization, Proxy-Authorization or Cookie; no body) is forwarded on this route without consulting the policy";

/// Why a request written as a `[[test]]` writes it, `POST /deploy/1`, finds no route: it
/// names no host, and only a route for any host takes that.
pub(super) const NO_HOST_HINT: &str = "a request without a host (\"METHOD /path\") reaches only a route for any host; name it: \"METHOD https://HOST/path\"";

fn no_host_hint(o: &mut String, req: &Asked<'_>) {
    if matches!(req, Asked::Http(r) if r.host.is_empty()) {
        let _ = writeln!(o, "  ({NO_HOST_HINT})");
    }
}

#[allow(clippy::too_many_arguments)]
fn text(
    req: &Asked<'_>,
    route: Option<&str>,
    policy: Option<&str>,
    caller: Option<&(IssuerSettings, Identity, Verification)>,
    explanation: Option<&Explanation>,
    (allowed, reason): (bool, Reason),
    preflight: Preflight,
) -> String {
    let mut o = String::new();
    let Some((settings, identity, verification)) = caller else {
        let _ = writeln!(o, "caller: anonymous (no token, no session)");
        let _ = writeln!(o, "request: {req}");
        match (route, explanation) {
            (Some(r), Some(e)) if preflight.taken => {
                let _ = writeln!(o, "route: `{r}` (policy {})", policy.unwrap_or_default());
                let _ = writeln!(o, "note: {PREFLIGHT_NOTE}");
                let _ = writeln!(
                    o,
                    "decision: allow ({reason}): taken as a CORS preflight, forwarded WITHOUT a credential and without consulting the policy"
                );
                let _ = writeln!(
                    o,
                    "what the policy would decide for an OPTIONS without Origin and Access-Control-Request-Method (not a preflight):"
                );
                let _ = write!(o, "{e}");
            }
            (Some(r), Some(e)) => {
                let _ = writeln!(o, "route: `{r}` (policy {})", policy.unwrap_or_default());
                if preflight.route {
                    let _ = writeln!(o, "note: {PREFLIGHT_NOTE}");
                }
                let _ = write!(o, "{e}");
                if !e.decision.allowed {
                    let _ = writeln!(
                        o,
                        "(the proxy asks such a caller for a credential: 401 missing-token, or sign-in)"
                    );
                }
            }
            _ => {
                let _ = writeln!(o, "route: none takes this request");
                no_host_hint(&mut o, req);
                let _ = writeln!(o, "decision: deny ({reason})");
            }
        }
        return o;
    };
    let _ = writeln!(
        o,
        "caller: {} (issuer `{}`, {})",
        identity.principal(),
        settings.id,
        settings.preset.name()
    );
    let _ = writeln!(o, "  {verification}");
    if let Some(e) = &identity.email {
        let v = if identity.email_verified { "verified" } else { "NOT verified" };
        let _ = writeln!(o, "  email: {e} ({v})");
    }
    if !identity.groups.is_empty() || !identity.groups_known {
        let known = if identity.groups_known { "" } else { " (overage: membership unknown)" };
        let _ = writeln!(o, "  groups: {}{known}", identity.groups.join(", "));
    }
    if let Some(ci) = &identity.ci {
        let fields: Vec<String> = crate::identity::CiContext::FIELDS
            .iter()
            .filter_map(|f| ci.field(f).map(|v| format!("{f}={v}")))
            .collect();
        let _ = writeln!(o, "  ci ({}): {}", ci.provider, fields.join(" "));
    }
    let _ = writeln!(o, "request: {req}");
    match (route, policy) {
        (Some(r), Some(p)) if matches!(req, Asked::Database { .. }) => {
            let _ = writeln!(o, "database route: `{r}` (policy {p})");
        }
        (Some(r), Some(p)) => {
            let _ = writeln!(o, "route: `{r}` (policy {p})");
            if preflight.route && req.to_string().starts_with("OPTIONS ") {
                let _ = writeln!(
                    o,
                    "note: {PREFLIGHT_NOTE} (this caller presents a credential, so its OPTIONS is authorized by the policy as below)"
                );
            }
        }
        _ => {
            let _ = writeln!(o, "route: none takes this request");
            no_host_hint(&mut o, req);
        }
    }
    match (verification, explanation) {
        (Verification::Rejected { reason, detail }, e) => {
            let _ = writeln!(
                o,
                "decision: deny ({reason}): the token is rejected before any policy: {detail}"
            );
            if let Some(e) = e {
                let _ = writeln!(o, "what the policy would decide for these (unverified) claims:");
                let _ = write!(o, "{e}");
            }
        }
        (_, Some(e)) => {
            let _ = write!(o, "{e}");
        }
        (_, None) => {
            let _ = writeln!(o, "decision: deny ({reason})");
        }
    }
    let _ = allowed;
    o
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verification::Verified => f.write_str("signature verified against the issuer's keys"),
            Verification::Rejected { reason, detail } => {
                write!(f, "token REJECTED by the verifier ({reason}): {detail}")
            }
            Verification::NotVerified(why) => write!(f, "signature NOT verified: {why}"),
        }
    }
}

/// The issuer, the identity and how far it could be checked.
fn caller_identity(
    config: &Config,
    args: &ExplainArgs,
) -> Result<(IssuerSettings, Identity, Verification), String> {
    let by_name = |name: &str| {
        config.issuer(name).cloned().ok_or_else(|| {
            let names: Vec<String> = config.issuers.iter().map(|i| i.id.to_string()).collect();
            format!("no issuer `{name}` in the configuration (issuers: {})", names.join(", "))
        })
    };
    let by_iss = |claims: &Map<String, Value>| -> Result<IssuerSettings, String> {
        if let Some(name) = &args.issuer {
            return by_name(name);
        }
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or_default();
        config.issuers.iter().find(|i| i.issuer == iss).cloned().ok_or_else(|| {
            format!("no configured issuer has `iss` {iss:?}; name one with --issuer")
        })
    };
    match &args.caller {
        Caller::Anonymous => Err("an anonymous caller has no identity".to_string()),
        Caller::Claims(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("{}: cannot read claims: {e}", path.display()))?;
            let claims: Map<String, Value> = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a JSON object of claims: {e}", path.display()))?;
            let settings = by_iss(&claims)?;
            let identity = unverified(&settings, claims)?;
            let why = "claims given directly, not a signed token".to_string();
            Ok((settings, identity, Verification::NotVerified(why)))
        }
        Caller::Preset { name, overrides } => {
            let preset = match name.as_str() {
                "human" | "oidc" => Preset::Oidc,
                other => Preset::parse(other).ok_or_else(|| {
                    format!(
                        "unknown preset `{other}`, expected one of: {}",
                        crate::dev::token::PRESETS.join(", ")
                    )
                })?,
            };
            let settings = match &args.issuer {
                Some(n) => by_name(n)?,
                None => {
                    let matching: Vec<&IssuerSettings> =
                        config.issuers.iter().filter(|i| i.preset == preset).collect();
                    match matching.as_slice() {
                        [one] => (*one).clone(),
                        [] => {
                            return Err(format!(
                                "no issuer in the configuration has preset `{}`",
                                preset.name()
                            ))
                        }
                        _ => {
                            return Err(format!(
                                "several issuers have preset `{}`: name one with --issuer",
                                preset.name()
                            ))
                        }
                    }
                }
            };
            let dev_name = if preset == Preset::Oidc { "human" } else { preset.name() };
            let audience = settings
                .client_id
                .clone()
                .or_else(|| settings.audiences.first().cloned())
                .unwrap_or_default();
            let now = crate::util::unix_now();
            let (_, mut payload) =
                crate::dev::token::preset_claims(dev_name, &settings.issuer, &audience, now, 600)
                    .ok_or_else(|| format!("unknown preset `{name}`"))?;
            if preset == Preset::Oidc {
                fit_to_issuer(&settings, &mut payload);
            }
            crate::dev::token::apply_preset_overrides(dev_name, &mut payload, overrides)?;
            let Value::Object(claims) = payload else {
                return Err("preset claims are not an object".into());
            };
            let identity = unverified(&settings, claims)?;
            let why = format!("claims built from preset `{name}`, not a signed token");
            Ok((settings, identity, Verification::NotVerified(why)))
        }
        Caller::Token(token) => {
            let claims = decode_payload(token)?;
            let settings = by_iss(&claims)?;
            let identity = unverified(&settings, claims)?;
            if args.no_verify {
                let why = "--no-verify: the claims are explained as they are".to_string();
                return Ok((settings, identity, Verification::NotVerified(why)));
            }
            let verification = verify(&settings, token, args.verify_timeout);
            // A verified identity is the one the proxy would build; prefer it.
            Ok(match verification {
                Ok(verified) => (settings, verified, Verification::Verified),
                Err(v) => (settings, identity, v),
            })
        }
    }
}

/// Makes the `human` preset's claims a token `settings` would accept, as the issuer's
/// provider would send one: the first of the login's `acr_values` as `acr` (a person
/// who signed in as the login asks), the `hosted_domain` as `hd`. `--claim` overrides
/// still win (`--claim acr=pwd` explains a password-only token's refusal).
fn fit_to_issuer(settings: &IssuerSettings, payload: &mut Value) {
    let Some(claims) = payload.as_object_mut() else { return };
    if let Some(acr) = settings.acr_values.first() {
        claims.insert("acr".into(), Value::String(acr.clone()));
    }
    if let Some(domain) = &settings.hosted_domain {
        claims.insert("hd".into(), Value::String(domain.clone()));
    }
}

fn unverified(settings: &IssuerSettings, claims: Map<String, Value>) -> Result<Identity, String> {
    unverified_identity(settings, claims).map_err(|e| {
        format!(
            "the proxy would reject these claims for issuer `{}` ({}): {}",
            settings.id, e.reason, e.detail
        )
    })
}

/// The payload of a compact JWS, without checking anything.
fn decode_payload(token: &str) -> Result<Map<String, Value>, String> {
    let mut parts = token.trim().split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("--token is not a compact JWT (three base64url parts)".into());
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| "--token: the payload is not base64url".to_string())?;
    serde_json::from_slice(&bytes).map_err(|_| "--token: the payload is not a JSON object".into())
}

/// Verifies with the issuer's live keys when they can be fetched in time.
fn verify(
    settings: &IssuerSettings,
    token: &str,
    timeout: Duration,
) -> Result<Identity, Verification> {
    let not = |why: String| Verification::NotVerified(why);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| not(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        let verifier = Verifier::new(vec![settings.clone()]).map_err(not)?;
        let verifier = Arc::new(verifier);
        verifier.start();
        if !verifier.wait_ready(timeout).await {
            return Err(not(format!(
                "the keys of issuer `{}` could not be fetched from {} within {}s",
                settings.id,
                settings.discovery_url,
                timeout.as_secs()
            )));
        }
        match verifier.verify(token).await {
            Ok(id) => Ok((*id).clone()),
            Err(e) => {
                Err(Verification::Rejected { reason: e.reason, detail: e.detail.into_owned() })
            }
        }
    })
}
