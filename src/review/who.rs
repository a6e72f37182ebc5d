//! `portcullis policy who -c FILE [--route NAME | --request "GET https://host/path"]`:
//! who can reach a route, rule by rule, in words a reviewer can check against intent.
//! A `[[databases]]` route is named with `--route` like any other; its rules read with
//! their databases, roles and the upstream role a session gets.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::json;

use super::explain::{RequestLine, PREFLIGHT_NOTE};
use super::snapshot::{RouteView, Snapshot};
use super::{shown, Format, Report, EXIT_OK};
use crate::config::{Config, LoadMode};
use crate::policy::{Effect, Policy, RuleSummary};

#[derive(Debug, Clone)]
pub struct WhoArgs {
    pub config: PathBuf,
    /// One route by name; with neither this nor `request`, every route.
    pub route: Option<String>,
    /// `METHOD URL`: the route that takes it, and only the rules that apply to it.
    pub request: Option<String>,
    pub format: Format,
}

/// Who can reach one route (for one request, if given).
#[derive(Debug, Clone)]
pub struct RouteAccess {
    pub route: RouteView,
    pub request: Option<String>,
    pub allows: Vec<RuleSummary>,
    pub denies: Vec<RuleSummary>,
    /// The route forwards an anonymous CORS preflight (to the request, if given)
    /// without consulting the policy: `cors_preflight = true`, and its method filter
    /// takes `OPTIONS` (as does the request).
    pub preflight: bool,
}

pub fn run(args: &WhoArgs) -> Report {
    let config = match Config::load_with(&args.config, LoadMode::PolicyOnly) {
        Ok(c) => c,
        Err(e) => {
            let p: Vec<String> = e.0.iter().map(ToString::to_string).collect();
            return Report::bad_input(args.format, &p);
        }
    };
    let snapshot = Snapshot::from_config(&config);
    let mut access = Vec::new();
    match (&args.route, &args.request) {
        (Some(_), Some(_)) => {
            return Report::bad_input(args.format, &["give --route or --request, not both".into()])
        }
        (Some(name), None) => match snapshot.route(name) {
            Some(r) => access.push(route_access(&snapshot, r, None)),
            None => return unknown_route(args.format, &snapshot, name),
        },
        (None, Some(line)) => {
            let req = match RequestLine::parse(line) {
                Ok(r) => r,
                Err(e) => return Report::bad_input(args.format, &[e]),
            };
            let Some(r) = config.route(&req.host, &req.path, &req.method) else {
                let mut why = format!("no route takes {line} (the proxy answers `no-route`)");
                if req.host.is_empty() {
                    why = format!("{why}: {}", super::explain::NO_HOST_HINT);
                }
                return Report::bad_input(args.format, &[why]);
            };
            let Some(view) = snapshot.route(&r.name) else {
                return Report::bad_input(args.format, &[format!("route `{}` vanished", r.name)]);
            };
            access.push(route_access(&snapshot, view, Some(&req)));
        }
        (None, None) => {
            access.extend(snapshot.routes.iter().map(|r| route_access(&snapshot, r, None)));
        }
    }
    let out = match args.format {
        Format::Json => super::json(&json!(access.iter().map(to_json).collect::<Vec<_>>())),
        Format::Text => access.iter().map(text).collect::<Vec<_>>().join("\n"),
        Format::Markdown => access.iter().map(markdown).collect::<Vec<_>>().join("\n"),
    };
    Report::new(EXIT_OK, out)
}

fn unknown_route(format: Format, snapshot: &Snapshot, name: &str) -> Report {
    let names: Vec<&str> = snapshot.routes.iter().map(|r| r.name.as_str()).collect();
    Report::bad_input(format, &[format!("no route `{name}` (routes: {})", names.join(", "))])
}

/// The summaries of a route's live policy; with a request, only the rules whose
/// request conditions admit it.
pub fn route_access(
    snapshot: &Snapshot,
    route: &RouteView,
    req: Option<&RequestLine>,
) -> RouteAccess {
    let (allows, denies) = summaries(&route.policy, snapshot, req);
    let preflight = match req {
        Some(q) => q.method == http::Method::OPTIONS && route.forwards_preflight(&q.path),
        None => route.forwards_preflight(&route.path_prefix),
    };
    RouteAccess {
        route: route.clone(),
        request: req.map(|r| r.to_string()),
        allows,
        denies,
        preflight,
    }
}

fn summaries(
    policy: &Policy,
    snapshot: &Snapshot,
    req: Option<&RequestLine>,
) -> (Vec<RuleSummary>, Vec<RuleSummary>) {
    let rules = policy.rules().iter().filter(|r| req.is_none_or(|q| r.admits_request(&q.facts())));
    let all: Vec<RuleSummary> = rules.map(|r| r.summary(&snapshot.catalog)).collect();
    all.into_iter().partition(|s| s.effect == Effect::Allow)
}

fn to_json(a: &RouteAccess) -> serde_json::Value {
    if let Some(d) = &a.route.database {
        let default = |s: &RuleSummary| {
            let mut v = json!(s);
            if s.upstream_role.is_none() {
                v["upstream_role"] = json!(d.upstream_user);
            }
            v
        };
        return json!({
            "route": a.route.name,
            "kind": "database",
            "database": {
                "listen": d.listen,
                "upstream": d.upstream,
                "upstream_user": d.upstream_user,
                "upstream_roles": d.upstream_roles,
            },
            "policy": a.route.policy.file(),
            "allow": a.allows.iter().map(default).collect::<Vec<_>>(),
            "deny": a.denies,
            "default": "deny",
        });
    }
    json!({
        "kind": "http",
        "route": a.route.name,
        "match": { "host": a.route.host, "path_prefix": a.route.path_prefix, "methods": a.route.methods },
        "policy": a.route.policy.file(),
        "shadow_policy": a.route.shadow.as_ref().map(|s| s.file()),
        "request": a.request,
        "allow": a.allows,
        "deny": a.denies,
        "cors_preflight": a.preflight.then(|| json!({
            "forwarded_without_policy": true,
            "note": PREFLIGHT_NOTE,
        })),
        "default": "deny",
    })
}

/// A bullet for a rule: `` `id` (file:line): who; what ``, what decides access (its
/// conditions, upstream role and file) shown in printable ASCII: a look-alike letter
/// (`mallоry`, with a Cyrillic `о`) makes a value no token has, and must not read as the
/// value it imitates. The description says nothing about access and keeps its letters
/// (it holds no hidden character).
pub fn bullet(s: &RuleSummary) -> String {
    let mut b = format!(
        "`{}` ({}:{}): {}; {}",
        s.rule.id,
        shown(&s.rule.file.display().to_string()),
        s.rule.line,
        shown(&s.who_phrase()),
        shown(&s.what_phrase())
    );
    if let Some(r) = &s.upstream_role {
        let _ = write!(b, "; as upstream role `{}`", shown(r));
    }
    if let Some(d) = &s.description {
        let _ = write!(b, " — \"{}\"", crate::diag::Visible(d));
    }
    b
}

/// [`bullet`], and on a PostgreSQL route an allow that grants no `upstream_role` says
/// which role its sessions get (the route's `upstream_user`).
fn route_bullet(route: &RouteView, s: &RuleSummary) -> String {
    let mut b = bullet(s);
    if let Some(d) = &route.database {
        if s.effect == Effect::Allow && s.upstream_role.is_none() {
            let at = b.find(" — \"").unwrap_or(b.len());
            b.insert_str(
                at,
                &format!("; as upstream role `{}` (the route's default)", d.upstream_user),
            );
        }
    }
    b
}

/// `route` or `database route`.
fn kind(route: &RouteView) -> &'static str {
    if route.database.is_some() {
        "database route"
    } else {
        "route"
    }
}

fn text(a: &RouteAccess) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} `{}`: {}",
        kind(&a.route),
        shown(&a.route.name),
        shown(&a.route.describe())
    );
    let _ = writeln!(o, "  policy: {}", shown(&a.route.policy.file().display().to_string()));
    if let Some(s) = &a.route.shadow {
        let shadow = shown(&s.file().display().to_string());
        let _ = writeln!(o, "  shadow policy (evaluated, not enforced): {shadow}");
    }
    if let Some(r) = &a.request {
        let _ = writeln!(o, "  only rules that apply to: {r}");
    }
    if a.preflight {
        let _ = writeln!(
            o,
            "  ANYONE, without any credential, can send a CORS preflight: {PREFLIGHT_NOTE}"
        );
    }
    if a.allows.is_empty() {
        let _ = writeln!(o, "  nobody is allowed: no allow rule applies");
    } else {
        let _ = writeln!(o, "  allowed (the first matching allow decides):");
        for s in &a.allows {
            let _ = writeln!(o, "    - {}", route_bullet(&a.route, s));
        }
    }
    if !a.denies.is_empty() {
        let _ = writeln!(o, "  always denied, whatever the allows say (deny wins):");
        for s in &a.denies {
            let _ = writeln!(o, "    - {}", route_bullet(&a.route, s));
        }
    }
    if a.preflight {
        let _ =
            writeln!(o, "  everyone else: denied (default deny), but for CORS preflights (above)");
    } else {
        let _ = writeln!(o, "  everyone else: denied (default deny)");
    }
    o
}

/// Text from the files, safe in a Markdown comment: it opens no HTML (`<!--` would
/// hide the rest of it).
fn md(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn markdown(a: &RouteAccess) -> String {
    let mut o = String::new();
    let title = if a.route.database.is_some() { "Database route" } else { "Route" };
    let _ = writeln!(o, "### {title} `{}`\n", md(&shown(&a.route.name)));
    let _ = writeln!(
        o,
        "{}; policy `{}`\n",
        md(&shown(&a.route.describe())),
        md(&shown(&a.route.policy.file().display().to_string()))
    );
    if let Some(r) = &a.request {
        let _ = writeln!(o, "Only rules that apply to `{r}`.\n");
    }
    if a.preflight {
        let _ = writeln!(
            o,
            "**ANYONE, without any credential, can send a CORS preflight**: {PREFLIGHT_NOTE}.\n"
        );
    }
    let _ = writeln!(o, "**Allowed** (the first matching allow decides):\n");
    if a.allows.is_empty() {
        let _ = writeln!(o, "- nobody");
    }
    for s in &a.allows {
        let _ = writeln!(o, "- {}", md(&route_bullet(&a.route, s)));
    }
    if !a.denies.is_empty() {
        let _ = writeln!(o, "\n**Always denied** (deny wins):\n");
        for s in &a.denies {
            let _ = writeln!(o, "- {}", md(&route_bullet(&a.route, s)));
        }
    }
    if a.preflight {
        let _ = writeln!(o, "\nEveryone else is denied, but for CORS preflights (above).");
    } else {
        let _ = writeln!(o, "\nEveryone else is denied.");
    }
    o
}
