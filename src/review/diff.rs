//! `portcullis policy diff [FROM [TO]] -c FILE`: the access a change adds and removes.
//!
//! Both sides are read from git (a file's own bytes, through `git ls-tree` and `git
//! cat-file`; the working tree when `TO` is omitted), never checked out; what the diff
//! cannot read as `serve` would (a symbolic link, a policy outside the repository) is
//! an error, never a report that says less. Routes are matched by name (so a renamed policy file
//! is still the same route) and rules by id. For each route the output lists the
//! access gained and lost as `who` summaries, and every `[[test]]` case (of either
//! side) whose decision flips between the two sides.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::git;
use super::snapshot::{RouteView, Settings, Snapshot, TestSet, Tree};
use super::who::bullet;
use super::{shown, Format, Report, EXIT_OK};
use crate::config;
use crate::diag::Visible;
use crate::policy::{
    decide_case, rule_covers, Decision, Effect, Policy, Rule, RuleSummary, TestCase,
};

#[derive(Debug, Clone)]
pub struct DiffArgs {
    pub config: PathBuf,
    /// Default: the merge-base of `HEAD` with the default branch.
    pub from: Option<String>,
    /// Default: the working tree.
    pub to: Option<String>,
    /// Directories of extra test files, read at each side.
    pub tests: Vec<PathBuf>,
    pub format: Format,
}

/// Whether a change gives access or takes it away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    Gained,
    Lost,
    /// A rule changed in a way that may both add and remove access.
    Changed,
}

/// One rule that differs.
#[derive(Debug, Clone, Serialize)]
pub struct RuleChange {
    pub access: Access,
    /// `added`, `removed`, `narrowed`, `widened`, `changed`, `effect-changed`, or
    /// `reordered` (allows that grant upstream roles moved past one another).
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<RuleSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<RuleSummary>,
}

/// A test whose decision differs between the two sides.
#[derive(Debug, Clone, Serialize)]
pub struct Flip {
    pub name: String,
    /// Where the case is written (on the side it was taken from).
    pub file: Arc<Path>,
    pub line: u32,
    pub request: String,
    pub caller: String,
    pub before: Decision,
    pub after: Decision,
}

/// Everything that changed for one route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteDiff {
    pub route: String,
    /// `http` or `database` (a `[[databases]]` PostgreSQL route).
    pub kind: &'static str,
    /// `added`, `removed` or `changed`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_before: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_after: Option<PathBuf>,
    /// Host, prefix or method filter of the route changed (for a PostgreSQL route:
    /// listen address, upstream or upstream roles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_changed: Option<(String, String)>,
    /// The routes tried before this one that can match some of the same requests
    /// (overlapping host and path prefix), before and after, when they changed: the
    /// first route that matches serves a request, so swapping two route blocks (or
    /// respelling a prefix so it ranks higher, or adding a route in front) moves
    /// requests to another policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_changed: Option<(Vec<String>, Vec<String>)>,
    /// Other settings of the route that may change access or what the upstream is
    /// told (`upstream`, `issuers`, `preserve_host`, `forward_token`, …).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub settings_changed: Vec<SettingChange>,
    /// The HTTP routes of the new configuration that can take requests this route took
    /// (it is removed, or its match no longer covers what it did): a request no route
    /// takes first goes to the next route that matches it, whose policy decides it now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub taken_over_by: Vec<String>,
    /// `cors_preflight` turned on (`gained`: CORS preflights without any credential
    /// are forwarded without the policy; also for a route added with it) or off
    /// (`lost`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_preflight: Option<Access>,
    pub rules: Vec<RuleChange>,
    pub flipped_tests: Vec<Flip>,
}

/// One setting of a route or an issuer, as written on each side (compact JSON; `None`
/// where the key is absent, so its default applies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SettingChange {
    pub setting: String,
    pub before: Option<String>,
    pub after: Option<String>,
    /// Whether the change widens or narrows access, where that is decidable (a longer
    /// `stale_window`, `max_token_age` or `max_session`, more `audiences`, a
    /// `hosted_domain` removed, `single_use_tokens` off widen it); `None` for a setting
    /// added or removed with its issuer, route or section, and for one whose direction
    /// is not known (another `upstream`, a changed `issuer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach: Option<Reach>,
}

/// What a setting change does to access, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reach {
    /// `widened` or `narrowed`.
    pub access: &'static str,
    /// `how long a database session may stay open, whatever its token's lifetime`.
    pub what: String,
    /// The lengths before and after, for a duration (`8h`, `24h (default)`, `no limit
    /// (not set)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lengths: Option<(String, String)>,
}

impl Reach {
    /// `what: 8h -> 24h` (`arrow` between the lengths).
    fn line(&self, arrow: &str) -> String {
        match &self.lengths {
            Some((b, a)) => format!("{}: {b} {arrow} {a}", self.what),
            None => self.what.clone(),
        }
    }
}

/// Where a setting is written, which decides what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Issuer,
    Http,
    Database,
    /// A top-level section, by name (`session`, `assertion`).
    Section(&'static str),
    /// The setting comes or goes with its issuer, route or section: what it was or is
    /// set to is listed, with no direction.
    Whole,
}

/// A duration setting whose longer value widens access.
struct Longer {
    scope: Scope,
    key: &'static str,
    /// What the load applies when it is not written (the configuration's own
    /// constants); `None`: no limit.
    default: Option<Duration>,
    /// A longer value counts as this.
    cap: Option<Duration>,
    /// What it bounds, in words.
    what: &'static str,
}

/// The durations whose longer value widens access.
const LONGER_WIDENS: &[Longer] = &[
    Longer {
        scope: Scope::Issuer,
        key: "stale_window",
        default: Some(config::DEFAULT_STALE_WINDOW),
        cap: None,
        what: "how long the issuer's last fetched keys stay trusted while it cannot be reached (one it has withdrawn meanwhile included)",
    },
    Longer {
        scope: Scope::Issuer,
        key: "max_token_age",
        default: None,
        cap: None,
        what: "how long after it was issued a token is accepted, and what it opened (a WebSocket tunnel, a database session, its assertion) goes on",
    },
    Longer {
        scope: Scope::Issuer,
        key: "leeway",
        default: Some(config::DEFAULT_LEEWAY),
        cap: Some(config::MAX_LEEWAY),
        what: "the clock skew allowed past a token's expiry and before its start",
    },
    Longer {
        scope: Scope::Database,
        key: "max_session",
        default: None,
        cap: None,
        what: "how long a database session may stay open, whatever its token's lifetime",
    },
    Longer {
        scope: Scope::Section("session"),
        key: "absolute_lifetime",
        default: Some(config::DEFAULT_ABSOLUTE_LIFETIME),
        cap: None,
        what: "how long a browser session lasts before its user signs in again",
    },
    Longer {
        scope: Scope::Section("session"),
        key: "idle_lifetime",
        default: Some(config::DEFAULT_IDLE_LIFETIME),
        cap: None,
        what: "how long an unused browser session lasts",
    },
    Longer {
        scope: Scope::Section("assertion"),
        key: "ttl",
        default: Some(config::DEFAULT_ASSERTION_TTL),
        cap: None,
        what: "how long the identity assertion sent upstream is valid (never past the caller's token)",
    },
];

/// Switches of an HTTP route: the key, its default, and what turning it on and off
/// does, (`true` widens access?, on, off).
const SWITCHES: &[(&str, bool, bool, &str, &str)] = &[
    (
        "single_use_tokens",
        false,
        false,
        "single_use_tokens on: a token seen before is refused on the route (no replay)",
        "single_use_tokens off: a token may be presented again (replayed) for as long as it is valid",
    ),
    (
        "forward_token",
        false,
        true,
        "forward_token on: the upstream receives the caller's own token (its Authorization header) and can use it as the caller wherever it is accepted",
        "forward_token off: the upstream no longer receives the caller's token",
    ),
];

/// Lists whose larger set widens access: where each is set, its key, its default
/// (`None`: every value, as a route without `issuers` accepts every issuer; `Some(&[])`
/// for a required list, which decides nothing when absent) and what it holds.
const LARGER_WIDENS: &[(Scope, &str, Option<&[&str]>, &str)] = &[
    (Scope::Issuer, "audiences", Some(&[]), "the audiences a token may be issued for"),
    (Scope::Issuer, "algorithms", Some(&["RS256"]), "the algorithms a token may be signed with"),
    (Scope::Http, "issuers", None, "the issuers whose tokens and sessions the route accepts"),
];

/// Issuer settings that add a check to every token: removing one widens access, adding
/// one narrows it (another value is neither).
const CHECKS: &[(&str, &str, &str)] = &[
    (
        "hosted_domain",
        "a Google token need no longer carry the Workspace domain (hd) nor a verified email",
        "a Google token must carry this Workspace domain (hd) and a verified email",
    ),
    (
        "client_id",
        "a token issued to another client (azp) is accepted",
        "a token's authorized party (azp), when present, must be this client",
    ),
];

/// A list setting grown (widened) or shrunk (narrowed), with the values added or
/// removed; another set, or one not a list of strings, decides nothing.
fn larger(
    default: Option<&[&str]>,
    what: &str,
    before: Option<&str>,
    after: Option<&str>,
) -> Option<Reach> {
    use std::collections::BTreeSet;
    // `None`: every value.
    let set = |v: Option<&str>| -> Option<Option<BTreeSet<String>>> {
        match v {
            None => match default {
                Some([]) => None,
                Some(d) => Some(Some(d.iter().map(|x| x.to_string()).collect())),
                None => Some(None),
            },
            Some(v) => {
                serde_json::from_str::<Vec<String>>(v).ok().map(|l| Some(l.into_iter().collect()))
            }
        }
    };
    let (b, a) = (set(before)?, set(after)?);
    let quoted = |v: &BTreeSet<String>| -> String {
        v.iter()
            .map(|x| serde_json::to_string(x).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (access, change) = match (&b, &a) {
        (None, None) => return None,
        (Some(b), None) => ("widened", format!("every one (not set), was {}", quoted(b))),
        (None, Some(a)) => ("narrowed", format!("only {}, was every one (not set)", quoted(a))),
        (Some(b), Some(a)) if b == a => return None,
        (Some(b), Some(a)) if b.is_subset(a) => {
            ("widened", format!("added {}", quoted(&a.difference(b).cloned().collect())))
        }
        (Some(b), Some(a)) if a.is_subset(b) => {
            ("narrowed", format!("removed {}", quoted(&b.difference(a).cloned().collect())))
        }
        _ => return None,
    };
    Some(Reach { access, what: format!("{what}: {change}"), lengths: None })
}

/// A default duration as a configuration writes it: whole hours as hours (`24h`), else
/// seconds (`60s`).
fn written(d: Duration) -> String {
    match d.as_secs() {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

/// A setting's value as written (compact JSON) as the text it holds: `"8h"` → `8h`.
fn unquoted(v: &str) -> Option<String> {
    serde_json::from_str::<String>(v).ok()
}

/// Whether changing `key` (in `scope`) from `before` to `after` (`None`: not set, its
/// default applies) widens or narrows access, and how, in words.
fn reach(scope: Scope, key: &str, before: Option<&str>, after: Option<&str>) -> Option<Reach> {
    if let Some(&Longer { default, cap, what, .. }) =
        LONGER_WIDENS.iter().find(|l| l.scope == scope && l.key == key)
    {
        // `None`: no limit. A value that is not a duration (the load refuses it) decides
        // nothing.
        let value = |v: Option<&str>| -> Option<(Option<Duration>, String)> {
            let Some(v) = v else {
                return Some(match default {
                    Some(d) => (Some(d), format!("{} (default)", written(d))),
                    None => (None, "no limit (not set)".to_string()),
                });
            };
            let text = unquoted(v)?;
            let d = humantime::parse_duration(&text).ok()?;
            let d = cap.map_or(d, |c| d.min(c));
            Some((Some(d), text))
        };
        let ((b, bt), (a, at)) = (value(before)?, value(after)?);
        // `None` (no limit) is the longest.
        let longer = match (a, b) {
            (None, None) => return None,
            (None, Some(_)) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) if a == b => return None,
            (Some(a), Some(b)) => a > b,
        };
        return Some(Reach {
            access: if longer { "widened" } else { "narrowed" },
            what: what.to_string(),
            lengths: Some((bt, at)),
        });
    }
    if let Some(&(_, _, default, what)) =
        LARGER_WIDENS.iter().find(|(s, k, ..)| *s == scope && *k == key)
    {
        return larger(default, what, before, after);
    }
    if scope == Scope::Issuer {
        let &(_, removed, added) = CHECKS.iter().find(|(k, ..)| *k == key)?;
        return match (before, after) {
            (Some(_), None) => Some(Reach {
                access: "widened",
                what: format!("{key} removed: {removed}"),
                lengths: None,
            }),
            (None, Some(_)) => Some(Reach {
                access: "narrowed",
                what: format!("{key} set: {added}"),
                lengths: None,
            }),
            _ => None,
        };
    }
    if scope == Scope::Http {
        let &(_, default, on_widens, on, off) = SWITCHES.iter().find(|(k, ..)| *k == key)?;
        let value = |v: Option<&str>| match v {
            None => Some(default),
            Some(v) => v.parse::<bool>().ok(),
        };
        let (b, a) = (value(before)?, value(after)?);
        if a == b {
            return None;
        }
        return Some(Reach {
            access: if a == on_widens { "widened" } else { "narrowed" },
            what: (if a { on } else { off }).to_string(),
            lengths: None,
        });
    }
    None
}

/// An issuer whose settings changed: every rule naming it now admits other tokens,
/// though no policy file changed.
#[derive(Debug, Clone, Serialize)]
pub struct IssuerDiff {
    pub issuer: String,
    /// `added`, `removed` or `changed`.
    pub status: &'static str,
    pub settings_changed: Vec<SettingChange>,
    /// The routes whose policies have a rule naming the issuer (on either side).
    pub routes: Vec<String>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyDiff {
    pub from: String,
    pub to: String,
    /// Top-level sections (`[session]`, `[assertion]`, `[listen]`, …) whose settings
    /// changed, listed first: they apply to every route.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sections: Vec<SectionDiff>,
    /// Issuers added, removed or changed, listed before the routes they affect.
    pub issuers: Vec<IssuerDiff>,
    pub routes: Vec<RouteDiff>,
}

/// A top-level section of `portcullis.toml` whose settings changed.
#[derive(Debug, Clone, Serialize)]
pub struct SectionDiff {
    /// `session`, `assertion`, `listen`, `server`, `audit`, `tls`, …
    pub section: String,
    pub settings_changed: Vec<SettingChange>,
}

impl PolicyDiff {
    /// Nothing that may change access differs.
    pub fn is_empty(&self) -> bool {
        self.sections.is_empty() && self.issuers.is_empty() && self.routes.is_empty()
    }
}

/// The top-level sections whose settings differ.
fn section_changes(old: &Snapshot, new: &Snapshot) -> Vec<SectionDiff> {
    let empty = Settings::new();
    let mut names: Vec<&String> = old.sections.keys().chain(new.sections.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let (b, a) = (old.sections.get(name), new.sections.get(name));
            let scope = match (b.is_some() && a.is_some(), name.as_str()) {
                (true, "session") => Scope::Section("session"),
                (true, "assertion") => Scope::Section("assertion"),
                _ => Scope::Whole,
            };
            let settings_changed = setting_changes(scope, b.unwrap_or(&empty), a.unwrap_or(&empty));
            (!settings_changed.is_empty())
                .then(|| SectionDiff { section: name.clone(), settings_changed })
        })
        .collect()
}

/// The settings whose values differ between `before` and `after`, by key, each with
/// what it does to access where that is decidable ([`reach`]).
fn setting_changes(scope: Scope, before: &Settings, after: &Settings) -> Vec<SettingChange> {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            let (b, a) = (before.get(k).cloned(), after.get(k).cloned());
            SettingChange {
                setting: k.clone(),
                reach: reach(scope, k, b.as_deref(), a.as_deref()),
                before: b,
                after: a,
            }
        })
        .collect()
}

/// Issuers whose access-relevant settings differ, with the routes whose rules name them.
fn issuer_changes(old: &Snapshot, new: &Snapshot) -> Vec<IssuerDiff> {
    let empty = Settings::new();
    let mut names: Vec<&String> = old.issuers.keys().chain(new.issuers.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let (b, a) = (old.issuers.get(name), new.issuers.get(name));
        let status = match (b, a) {
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            _ => "changed",
        };
        let scope = if status == "changed" { Scope::Issuer } else { Scope::Whole };
        let settings_changed = setting_changes(scope, b.unwrap_or(&empty), a.unwrap_or(&empty));
        if settings_changed.is_empty() && status == "changed" {
            continue;
        }
        let mut routes: Vec<String> = old
            .routes
            .iter()
            .chain(&new.routes)
            .filter(|r| {
                std::iter::once(&r.policy).chain(&r.shadow).any(|p| {
                    p.rules().iter().any(|rule| rule.issuers().iter().any(|i| i.as_str() == name))
                })
            })
            .map(|r| r.name.clone())
            .collect();
        routes.sort();
        routes.dedup();
        out.push(IssuerDiff { issuer: name.clone(), status, settings_changed, routes });
    }
    out
}

pub fn run(args: &DiffArgs) -> Report {
    match compute(args) {
        Ok(d) => Report::new(EXIT_OK, render(&d, args.format)),
        Err(p) => Report::bad_input(args.format, &p),
    }
}

/// Reads both sides and compares them.
pub fn compute(args: &DiffArgs) -> Result<PolicyDiff, Vec<String>> {
    let one = |e: String| vec![e];
    let config_dir = match args.config.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let root = git::toplevel(&config_dir).map_err(one)?;
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    let rel = |p: &Path| -> Result<PathBuf, Vec<String>> {
        let abs = absolute(p);
        abs.strip_prefix(&root).map(Path::to_path_buf).map_err(|_| {
            vec![format!("{} is outside the repository {}", p.display(), root.display())]
        })
    };
    let config = rel(&args.config)?;
    let tests: Vec<PathBuf> = args.tests.iter().map(|d| rel(d)).collect::<Result<_, _>>()?;
    let from = match &args.from {
        Some(r) => r.clone(),
        None => git::default_base(&root).map_err(one)?,
    };
    let side = |rev: Option<&String>| -> Result<(Snapshot, Vec<TestSet>), Vec<String>> {
        let tree = Tree { root: root.clone(), rev: rev.cloned() };
        let label = match rev {
            Some(r) => git::short(&root, r).map_err(one)?,
            None => "working tree".to_string(),
        };
        let snap = Snapshot::load(&tree, &config, label)?;
        let sets = snap.test_sets(&tree, &tests, true)?;
        Ok((snap, sets))
    };
    let (old, old_tests) = side(Some(&from))?;
    let (new, new_tests) = side(args.to.as_ref())?;
    Ok(compare(&old, &old_tests, &new, &new_tests))
}

/// The comparison itself, on two loaded snapshots.
pub fn compare(
    old: &Snapshot,
    old_tests: &[TestSet],
    new: &Snapshot,
    new_tests: &[TestSet],
) -> PolicyDiff {
    let mut routes = Vec::new();
    // HTTP and PostgreSQL routes are matched by kind and name.
    let mut names: Vec<(bool, &str)> = new.routes.iter().map(route_key).collect();
    names.extend(
        old.routes.iter().map(route_key).filter(|(db, n)| new.route_of_kind(n, *db).is_none()),
    );
    for (database, name) in names {
        let kind = if database { "database" } else { "http" };
        let d = match (old.route_of_kind(name, database), new.route_of_kind(name, database)) {
            (None, Some(n)) => RouteDiff {
                route: name.into(),
                kind,
                status: "added",
                policy_before: None,
                policy_after: Some(n.policy.file().to_path_buf()),
                match_changed: None,
                order_changed: None,
                taken_over_by: Vec::new(),
                // What the new route is set to do (`forward_token`, its upstream, …).
                settings_changed: setting_changes(Scope::Whole, &Settings::new(), &n.settings),
                cors_preflight: n.cors_preflight.then_some(Access::Gained),
                rules: rule_changes(None, Some(&n.policy), old, new),
                flipped_tests: Vec::new(),
            },
            (Some(o), None) => RouteDiff {
                route: name.into(),
                kind,
                status: "removed",
                policy_before: Some(o.policy.file().to_path_buf()),
                policy_after: None,
                match_changed: None,
                order_changed: None,
                taken_over_by: taken_over_by(o, None, new),
                settings_changed: Vec::new(),
                cors_preflight: o.cors_preflight.then_some(Access::Lost),
                rules: rule_changes(Some(&o.policy), None, old, new),
                flipped_tests: Vec::new(),
            },
            (Some(o), Some(n)) => {
                let rules = rule_changes(Some(&o.policy), Some(&n.policy), old, new);
                let flipped_tests = flips(name, o, n, old_tests, new_tests);
                let match_changed =
                    (o.describe() != n.describe()).then(|| (o.describe(), n.describe()));
                let renamed = o.policy.file() != n.policy.file();
                let scope = if database { Scope::Database } else { Scope::Http };
                let settings_changed = setting_changes(scope, &o.settings, &n.settings);
                let order_changed = o
                    .database
                    .is_none()
                    .then(|| (tried_before(old, o, Some(new)), tried_before(new, n, None)))
                    .filter(|(before, after)| before != after);
                let taken_over_by = taken_over_by(o, Some(n), new);
                if rules.is_empty()
                    && flipped_tests.is_empty()
                    && match_changed.is_none()
                    && order_changed.is_none()
                    && settings_changed.is_empty()
                    && !renamed
                {
                    continue;
                }
                RouteDiff {
                    route: name.into(),
                    kind,
                    status: "changed",
                    policy_before: Some(o.policy.file().to_path_buf()),
                    policy_after: Some(n.policy.file().to_path_buf()),
                    match_changed,
                    order_changed,
                    taken_over_by,
                    settings_changed,
                    cors_preflight: match (o.cors_preflight, n.cors_preflight) {
                        (false, true) => Some(Access::Gained),
                        (true, false) => Some(Access::Lost),
                        _ => None,
                    },
                    rules,
                    flipped_tests,
                }
            }
            (None, None) => continue,
        };
        routes.push(d);
    }
    let issuers = issuer_changes(old, new);
    let sections = section_changes(old, new);
    PolicyDiff { from: old.label.clone(), to: new.label.clone(), sections, issuers, routes }
}

fn rule_changes(
    old: Option<&Arc<Policy>>,
    new: Option<&Arc<Policy>>,
    os: &Snapshot,
    ns: &Snapshot,
) -> Vec<RuleChange> {
    let before: &[Rule] = old.map_or(&[], |p| p.rules());
    let after: &[Rule] = new.map_or(&[], |p| p.rules());
    let mut out = Vec::new();
    for a in after {
        match before.iter().find(|b| b.id() == a.id()) {
            None => {
                let access =
                    if a.effect() == Effect::Allow { Access::Gained } else { Access::Lost };
                out.push(RuleChange {
                    access,
                    kind: "added",
                    before: None,
                    after: Some(a.summary(&ns.catalog)),
                });
            }
            Some(b) => {
                let (sb, sa) = (b.summary(&os.catalog), a.summary(&ns.catalog));
                if sb.canonical == sa.canonical
                    && sb.effect == sa.effect
                    && sb.issuers == sa.issuers
                {
                    continue;
                }
                let (access, kind) = if b.effect() != a.effect() {
                    let access =
                        if a.effect() == Effect::Allow { Access::Gained } else { Access::Lost };
                    (access, "effect-changed")
                } else {
                    // Another upstream role for the callers it still admits is access
                    // gained, whatever the conditions lost: never "narrowed".
                    let same_role = b.upstream_role() == a.upstream_role();
                    let narrowed = same_role && rule_covers(b, a) && !rule_covers(a, b);
                    let widened = rule_covers(a, b) && !rule_covers(b, a);
                    let allow = a.effect() == Effect::Allow;
                    match (narrowed, widened) {
                        (true, _) => {
                            (if allow { Access::Lost } else { Access::Gained }, "narrowed")
                        }
                        (_, true) => (if allow { Access::Gained } else { Access::Lost }, "widened"),
                        _ => (Access::Changed, "changed"),
                    }
                };
                out.push(RuleChange { access, kind, before: Some(sb), after: Some(sa) });
            }
        }
    }
    for b in before {
        if !after.iter().any(|a| a.id() == b.id()) {
            let access = if b.effect() == Effect::Allow { Access::Lost } else { Access::Gained };
            out.push(RuleChange {
                access,
                kind: "removed",
                before: Some(b.summary(&os.catalog)),
                after: None,
            });
        }
    }
    // The first allow that matches picks the upstream role: moving allows past one
    // another changes which role a session gets, though no rule changed.
    let grants_roles = before.iter().chain(after).any(|r| r.upstream_role().is_some());
    if grants_roles {
        let allows = |rules: &'_ [Rule], other: &[Rule]| -> Vec<String> {
            rules
                .iter()
                .filter(|r| r.effect() == Effect::Allow && other.iter().any(|o| o.id() == r.id()))
                .map(|r| r.id().to_string())
                .collect()
        };
        let (was, now) = (allows(before, after), allows(after, before));
        if let Some(i) = (0..now.len()).find(|&i| was.get(i) != now.get(i)) {
            let b = before.iter().find(|r| r.id() == now[i]);
            let a = after.iter().find(|r| r.id() == now[i]);
            out.push(RuleChange {
                access: Access::Changed,
                kind: "reordered",
                before: b.map(|r| r.summary(&os.catalog)),
                after: a.map(|r| r.summary(&ns.catalog)),
            });
        }
    }
    out
}

/// Every test of the route's live policy, from either side (both versions of a case the
/// change edits), whose decision differs between the two policies.
fn flips(
    route: &str,
    old: &RouteView,
    new: &RouteView,
    old_tests: &[TestSet],
    new_tests: &[TestSet],
) -> Vec<Flip> {
    let for_route = |sets: &[TestSet]| -> Vec<(Arc<Path>, TestCase)> {
        sets.iter()
            .filter(|s| s.route.as_deref() == Some(route))
            .flat_map(|s| s.cases.iter().map(|c| (s.file.clone(), c.clone())))
            .collect()
    };
    // Both versions of a test the change edits: rewriting a test so that it still passes
    // must not hide that its old version now flips.
    let newer = for_route(new_tests);
    let older = for_route(old_tests);
    let cases = newer.iter().chain(older.iter());
    let mut out: Vec<Flip> = Vec::new();
    for (file, case) in cases {
        // As `policy test` decides it: an anonymous `OPTIONS` on a `cors_preflight`
        // route is the preflight forwarded without the policy.
        let before = decide_case(&old.policy, case, &|p| old.forwards_preflight(p));
        let after = decide_case(&new.policy, case, &|p| new.forwards_preflight(p));
        if before.allowed == after.allowed {
            continue;
        }
        let (request, caller) = (
            case.request.to_string(),
            case.identity
                .as_ref()
                .map_or_else(|| "anonymous (no credential)".to_string(), |i| i.principal()),
        );
        // An unchanged test is in both versions: listed once. Only when both versions
        // decide alike, though: a rewritten test (same name, request and subject, other
        // claims) that flips the other way must not hide its old version's flip.
        if out.iter().any(|f| {
            f.name == case.name
                && f.request == request
                && f.caller == caller
                && f.before == before
                && f.after == after
        }) {
            continue;
        }
        out.push(Flip {
            name: case.name.clone(),
            file: file.clone(),
            line: case.line,
            request,
            caller,
            before,
            after,
        });
    }
    out
}

/// The names of the HTTP routes `snap` tries before `r` that can match some of the
/// same requests (and, given `other`, that it has too), sorted (which of them comes
/// first among themselves is their own entries' business). The old side counts only
/// routes the new one still has (a removed route names where its requests go, in
/// [`RouteDiff::taken_over_by`]); the new side counts every route, an added one too: it
/// takes requests out of reach of this route's denies.
fn tried_before(snap: &Snapshot, r: &RouteView, other: Option<&Snapshot>) -> Vec<String> {
    let mut names: Vec<String> = snap
        .routes
        .iter()
        .take_while(|x| x.name != r.name || x.database.is_some())
        .filter(|x| x.database.is_none() && overlap(x, r))
        .filter(|x| other.is_none_or(|o| o.route_of_kind(&x.name, false).is_some()))
        .map(|x| x.name.clone())
        .collect();
    names.sort();
    names
}

/// The HTTP routes of `snap` (the new side) other than `old` itself that can take
/// requests `old` took and its new version `new` (if any) no longer takes, by name.
fn taken_over_by(old: &RouteView, new: Option<&RouteView>, snap: &Snapshot) -> Vec<String> {
    if old.database.is_some() || new.is_some_and(|n| match_covers(n, old)) {
        return Vec::new();
    }
    let mut names: Vec<String> = snap
        .routes
        .iter()
        .filter(|x| x.database.is_none() && x.name != old.name && overlap(x, old))
        .map(|x| x.name.clone())
        .collect();
    names.sort();
    names
}

/// Whether route `a` matches every request route `b` matches (host, path prefix and
/// method filter), conservatively.
fn match_covers(a: &RouteView, b: &RouteView) -> bool {
    let host = a.host == "*"
        || a.host == b.host
        || a.host.strip_prefix('*').is_some_and(|s| b.host != "*" && b.host.ends_with(s));
    let methods = match (&a.methods, &b.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => {
            b.iter().all(|m| a.contains(m) || (m == "HEAD" && a.iter().any(|x| x == "GET")))
        }
    };
    host && crate::config::path_has_prefix(&b.path_prefix, &a.path_prefix) && methods
}

/// Whether two HTTP routes can match the same request: hosts that can be the same name
/// (`*` any; `*.example.com` and a name under it; two suffixes one of which ends the
/// other) and path prefixes one of which covers the other. Methods are left out: a
/// route's method filter only narrows what it takes, and the order decides the rest.
fn overlap(a: &RouteView, b: &RouteView) -> bool {
    let hosts = |x: &str, y: &str| match (x.strip_prefix('*'), y.strip_prefix('*')) {
        _ if x == "*" || y == "*" => true,
        (Some(sx), Some(sy)) => sx.ends_with(sy) || sy.ends_with(sx),
        (Some(sx), None) => y.ends_with(sx),
        (None, Some(sy)) => x.ends_with(sy),
        (None, None) => x == y,
    };
    let has = crate::config::path_has_prefix;
    hosts(&a.host, &b.host)
        && (has(&a.path_prefix, &b.path_prefix) || has(&b.path_prefix, &a.path_prefix))
}

fn route_key(r: &RouteView) -> (bool, &str) {
    (r.database.is_some(), r.name.as_str())
}

fn route_word(r: &RouteDiff) -> &'static str {
    if r.kind == "database" {
        "database route"
    } else {
        "route"
    }
}

fn absolute(p: &Path) -> PathBuf {
    // The file itself may be gone from the working tree (diffing its deletion), so
    // canonicalize the directory and keep the name.
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    };
    // A link is not followed either: the revisions are read at the path given, and a
    // link there is refused (`git::show`), not silently swapped for its target.
    let link = std::fs::symlink_metadata(&abs).is_ok_and(|m| m.file_type().is_symlink());
    if !link {
        if let Ok(c) = std::fs::canonicalize(&abs) {
            return c;
        }
    }
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).map_or(abs.clone(), |d| d.join(name)),
        _ => abs,
    }
}

// === rendering ===

/// `allow (`rule`, file:line)`; `md`: for a Markdown table cell (the rule id is a
/// plain name; the file path is the files' text).
fn decision_word(d: &Decision, md: bool) -> String {
    let verdict = if d.allowed { "allow" } else { "deny" };
    match &d.rule {
        Some(r) => {
            let file = shown(&r.file.display().to_string());
            let file = if md { md_cell(&file) } else { file };
            format!("{verdict} (`{}`, {file}:{})", r.id, r.line)
        }
        None => format!("{verdict} ({})", d.reason),
    }
}

pub fn render(d: &PolicyDiff, format: Format) -> String {
    match format {
        Format::Json => super::json(&json!(d)),
        Format::Text => text(d),
        Format::Markdown => markdown(d),
    }
}

fn text(d: &PolicyDiff) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "policy access changes: {} -> {}", d.from, d.to);
    if d.is_empty() {
        let _ = writeln!(o, "no access changes");
        return o;
    }
    for sd in &d.sections {
        let _ = writeln!(o, "\nsettings `[{}]` changed (every route):", Visible(&sd.section));
        for c in &sd.settings_changed {
            let _ = writeln!(o, "  {}", setting_line(c));
            reach_line(&mut o, c);
        }
    }
    for i in &d.issuers {
        let _ = writeln!(o, "\nissuer `{}` ({})", Visible(&i.issuer), i.status);
        if !i.routes.is_empty() {
            let names: Vec<String> = i.routes.iter().map(|r| format!("`{}`", Visible(r))).collect();
            let _ = writeln!(o, "  named by the rules of: {}", names.join(", "));
        }
        for c in &i.settings_changed {
            let _ = writeln!(o, "  {}", setting_line(c));
            reach_line(&mut o, c);
        }
    }
    for r in &d.routes {
        let _ = writeln!(o, "\n{} `{}` ({})", route_word(r), Visible(&r.route), r.status);
        if let (Some(b), Some(a)) = (&r.policy_before, &r.policy_after) {
            if b != a {
                let (b, a) = (shown(&b.display().to_string()), shown(&a.display().to_string()));
                let _ = writeln!(o, "  policy file renamed: {b} -> {a}");
            }
        }
        if let Some((b, a)) = &r.match_changed {
            let _ = writeln!(o, "  route match changed: {} -> {}", Visible(b), Visible(a));
        }
        if let Some((b, a)) = &r.order_changed {
            let _ = writeln!(
                o,
                "  routing order changed: routes tried first that can take the same requests: {} -> {}",
                names(b),
                names(a)
            );
        }
        for c in &r.settings_changed {
            let _ = writeln!(o, "  setting {}", setting_line(c));
            reach_line(&mut o, c);
        }
        for (access, title) in [
            (Access::Gained, "access gained"),
            (Access::Lost, "access lost"),
            (Access::Changed, "changed (may gain and lose access)"),
        ] {
            let items: Vec<&RuleChange> = r.rules.iter().filter(|c| c.access == access).collect();
            let preflight = preflight_line(r, access);
            let takeover = takeover_line(r, &|n| format!("`{}`", Visible(n)))
                .filter(|_| access == Access::Gained);
            if items.is_empty() && preflight.is_none() && takeover.is_none() {
                continue;
            }
            let _ = writeln!(o, "  {title}:");
            for line in takeover.iter().map(String::as_str).chain(preflight) {
                let _ = writeln!(o, "    {line}");
            }
            for c in items {
                let _ = writeln!(o, "    {}", change_line(c, false));
            }
        }
        if !r.flipped_tests.is_empty() {
            let _ = writeln!(o, "  tests whose decision flips:");
            for f in &r.flipped_tests {
                let _ = writeln!(
                    o,
                    "    {}:{}: {:?} ({} {}): {} -> {}",
                    shown(&f.file.display().to_string()),
                    f.line,
                    f.name,
                    shown(&f.caller),
                    shown(&f.request),
                    decision_word(&f.before, false),
                    decision_word(&f.after, false)
                );
            }
        }
    }
    o
}

/// Where the requests of a removed or narrowed route go now (access gained: whoever
/// those routes' policies allow), in words; `code` spells a route name.
fn takeover_line(r: &RouteDiff, code: &dyn Fn(&str) -> String) -> Option<String> {
    if r.taken_over_by.is_empty() {
        return None;
    }
    let names: Vec<String> = r.taken_over_by.iter().map(|n| code(n)).collect();
    let what = if r.status == "removed" { "it took" } else { "it no longer takes" };
    Some(format!(
        "requests {what} now go to route {}: its policy decides them (whoever it allows there gets in)",
        names.join(" or route ")
    ))
}

/// The access `cors_preflight` adds or removes, when it changed in the direction
/// `access`.
fn preflight_line(r: &RouteDiff, access: Access) -> Option<&'static str> {
    match (r.cors_preflight, access) {
        (Some(Access::Gained), Access::Gained) => Some(
            "cors_preflight on: ANYONE, without any credential, can send OPTIONS (a CORS preflight: with Origin and Access-Control-Request-Method, no Authorization, Proxy-Authorization or Cookie) to every path of the route; it is forwarded without consulting the policy, whatever its deny rules say",
        ),
        (Some(Access::Lost), Access::Lost) => Some(
            "cors_preflight off: a CORS preflight without a credential is no longer forwarded (it is asked for a credential, as any request)",
        ),
        _ => None,
    }
}

/// `` `a`, `b` `` for the text report; `(none)` for no route.
fn names(v: &[String]) -> String {
    if v.is_empty() {
        return "(none)".into();
    }
    v.iter().map(|n| format!("`{}`", Visible(n))).collect::<Vec<_>>().join(", ")
}

/// `upstream: "http://a" -> "http://b"`; an absent key reads `(not set)`.
fn setting_line(c: &SettingChange) -> String {
    let side = |v: &Option<String>| v.clone().unwrap_or_else(|| "(not set)".into());
    format!(
        "{}: {} -> {}",
        Visible(&c.setting),
        Visible(&side(&c.before)),
        Visible(&side(&c.after))
    )
}

/// `    access widened: how long … : 8h -> 24h`, under the setting line, when the
/// change's direction is decidable.
fn reach_line(o: &mut String, c: &SettingChange) {
    if let Some(r) = &c.reach {
        let _ = writeln!(o, "    access {}: {}", r.access, Visible(&r.line("->")));
    }
}

/// Text from a configuration file, safe in a Markdown table cell: it opens no HTML
/// (`<!--` would hide the rest of the comment), no code span and no new cell, and
/// shows a hidden character (a line break, a bidirectional override) as its escape.
fn md_cell(s: &str) -> String {
    Visible(s)
        .to_string()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('|', "\\|")
        .replace('`', "&#96;")
}

fn md_settings(o: &mut String, changes: &[SettingChange]) {
    let _ = writeln!(o, "| setting | before | after |");
    let _ = writeln!(o, "|---|---|---|");
    for c in changes {
        let side = |v: &Option<String>| v.as_deref().map_or("*(not set)*".to_string(), md_cell);
        let _ =
            writeln!(o, "| {} | {} | {} |", md_cell(&c.setting), side(&c.before), side(&c.after));
    }
    let _ = writeln!(o);
    // What the changes whose direction is decidable do, under the table.
    let mut any = false;
    for r in changes.iter().filter_map(|c| c.reach.as_ref()) {
        let title = match r.access {
            "widened" => ":unlock: **Access widened**",
            _ => ":lock: **Access narrowed**",
        };
        let _ = writeln!(o, "- {title}: {}", md_cell(&r.line("→")));
        any = true;
    }
    if any {
        let _ = writeln!(o);
    }
}

fn change_line(c: &RuleChange, md: bool) -> String {
    let verb = |s: &RuleSummary| match s.effect {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    };
    let (nl, indent) = if md { ("<br>", "") } else { ("\n", "      ") };
    // In Markdown, text from a policy file never opens HTML (`<!--` would hide the rest
    // of a pull-request comment).
    let bullet = |s: &RuleSummary| {
        let b = bullet(s);
        if md {
            b.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
        } else {
            b
        }
    };
    match (&c.before, &c.after) {
        (None, Some(a)) => format!("{} {} {}", c.kind, verb(a), bullet(a)),
        (Some(b), None) => format!("{} {} {}", c.kind, verb(b), bullet(b)),
        (Some(b), Some(a)) => format!(
            "{} {} `{}`:{nl}{indent}before: {} {}{nl}{indent}after:  {} {}",
            c.kind,
            verb(a),
            a.rule.id,
            verb(b),
            bullet(b),
            verb(a),
            bullet(a)
        ),
        (None, None) => c.kind.to_string(),
    }
}

/// Text from the files as a Markdown code span, [`shown`] in ASCII; in a table cell
/// (`cell`) a `|` is escaped so it opens no new cell. Text holding a backtick, which
/// would close the span, is written as escaped plain text instead ([`md_cell`]).
fn md_code(s: &str, cell: bool) -> String {
    let s = shown(s);
    if s.contains('`') {
        return md_cell(&s);
    }
    if cell {
        format!("`{}`", s.replace('|', "\\|"))
    } else {
        format!("`{s}`")
    }
}

fn markdown(d: &PolicyDiff) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "## Policy access changes: `{}` → `{}`\n", d.from, d.to);
    if d.is_empty() {
        let _ = writeln!(o, "No access changes.");
        return o;
    }
    for sd in &d.sections {
        let _ = writeln!(o, "### Settings `[{}]` (every route)\n", md_cell(&sd.section));
        md_settings(&mut o, &sd.settings_changed);
    }
    for i in &d.issuers {
        let _ = writeln!(o, "### Issuer `{}` ({})\n", md_cell(&i.issuer), i.status);
        if !i.routes.is_empty() {
            let names: Vec<String> = i.routes.iter().map(|r| format!("`{}`", md_cell(r))).collect();
            let _ = writeln!(
                o,
                ":warning: Every rule naming this issuer admits whatever it now accepts. Named by the rules of: {}\n",
                names.join(", ")
            );
        }
        md_settings(&mut o, &i.settings_changed);
    }
    for r in &d.routes {
        let title = if r.kind == "database" { "Database route" } else { "Route" };
        let _ = writeln!(o, "### {title} `{}` ({})\n", md_cell(&r.route), r.status);
        if let (Some(b), Some(a)) = (&r.policy_before, &r.policy_after) {
            if b != a {
                let _ = writeln!(
                    o,
                    "Policy file renamed: {} → {}\n",
                    md_code(&b.display().to_string(), false),
                    md_code(&a.display().to_string(), false)
                );
            }
        }
        if let Some((b, a)) = &r.match_changed {
            let _ = writeln!(o, "Route match changed: {} → {}\n", md_cell(b), md_cell(a));
        }
        if let Some((b, a)) = &r.order_changed {
            let md = |v: &[String]| -> String {
                if v.is_empty() {
                    return "(none)".into();
                }
                v.iter().map(|n| format!("`{}`", md_cell(n))).collect::<Vec<_>>().join(", ")
            };
            let _ = writeln!(
                o,
                ":warning: Routing order changed: routes tried first that can take the same requests: {} → {}\n",
                md(b),
                md(a)
            );
        }
        if !r.settings_changed.is_empty() {
            let _ = writeln!(o, "**Route settings changed**\n");
            md_settings(&mut o, &r.settings_changed);
        }
        for (access, title) in [
            (Access::Gained, ":unlock: **Access gained**"),
            (Access::Lost, ":lock: **Access lost**"),
            (Access::Changed, ":warning: **Changed** (may gain and lose access)"),
        ] {
            let items: Vec<&RuleChange> = r.rules.iter().filter(|c| c.access == access).collect();
            let preflight = preflight_line(r, access);
            let takeover = takeover_line(r, &|n| format!("`{}`", md_cell(n)))
                .filter(|_| access == Access::Gained);
            if items.is_empty() && preflight.is_none() && takeover.is_none() {
                continue;
            }
            let _ = writeln!(o, "{title}\n");
            for line in takeover.iter().map(String::as_str).chain(preflight) {
                let _ = writeln!(o, "- {line}");
            }
            for c in items {
                let _ = writeln!(o, "- {}", change_line(c, true));
            }
            let _ = writeln!(o);
        }
        if !r.flipped_tests.is_empty() {
            let _ = writeln!(o, "**Tests whose decision flips**\n");
            let _ = writeln!(o, "| test | caller | request | before | after |");
            let _ = writeln!(o, "|---|---|---|---|---|");
            for f in &r.flipped_tests {
                let _ = writeln!(
                    o,
                    "| {} ({}) | {} | {} | {} | {} |",
                    md_cell(&f.name),
                    md_code(&format!("{}:{}", f.file.display(), f.line), true),
                    md_code(&f.caller, true),
                    md_code(&f.request, true),
                    decision_word(&f.before, true),
                    decision_word(&f.after, true)
                );
            }
            let _ = writeln!(o);
        }
    }
    o
}
