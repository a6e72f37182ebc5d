//! Lints: rules that parse but are dangerous or dead. Errors fail the load (and
//! `portcullis check`); warnings are printed and the policy still loads.
//!
//! | lint | severity |
//! |---|---|
//! | allow on a shared CI issuer without a repository/owner pin (V22) | error |
//! | claim name the issuer's preset never emits | error |
//! | contradictory conditions (HTTP + database, branch + tag, `ci` on a human issuer, ...) | error |
//! | allow shadowed by a broader deny (deny wins, so it can never decide) | warning |
//! | allow covered by an earlier allow (the earlier one always decides) | warning |
//! | deploy-style allow on a CI issuer without a branch/ref/environment restriction | warning |
//! | public rule on every path of a route (`/**`, or `PREFIX/**` under its `path_prefix`): the whole route needs no credential; per route ([`public_everywhere`]) | warning |
//! | public rule that a deny refuses to every caller without a credential | warning |
//! | `CONNECT` or `TRACE` in `methods` (refused with 405 on every route, never decided) | warning |

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use http::Method;

use super::claims::{self, Shape, PIN_CI_FIELDS, PIN_CLAIMS, REF_CI_FIELDS, REF_CLAIMS};
use super::raw;
use super::rule::{methods_admit, ClaimValue, Condition, Effect, Loc, Matcher, Rule};
use super::{Catalog, Glob, Policy};
use crate::diag::Diagnostic;
use crate::identity::Preset;

/// How bad a lint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// A diagnostic with a severity. [`Diagnostic`] itself has none, so the policy module
/// keeps the pairing here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lint {
    pub severity: Severity,
    pub diagnostic: Diagnostic,
}

impl Lint {
    /// The diagnostic with `warning: ` in front of the message for warnings, for
    /// output that carries no severity of its own.
    pub fn into_labelled(self) -> Diagnostic {
        match self.severity {
            Severity::Error => self.diagnostic,
            Severity::Warning => Diagnostic {
                message: format!("warning: {}", self.diagnostic.message),
                ..self.diagnostic
            },
        }
    }
}

impl fmt::Display for Lint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.diagnostic;
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let file = d.file.display().to_string();
        let (file, message) = (crate::diag::Visible(&file), crate::diag::Visible(&d.message));
        write!(f, "{file}:{}:{}: {sev}: {message}", d.line, d.col)
    }
}

/// Every lint of a compiled policy, errors and warnings, in file order.
pub fn lint(policy: &Policy, catalog: &Catalog) -> Vec<Lint> {
    lint_rules(policy.file_arc(), policy.rules(), catalog)
}

pub(crate) fn lint_rules(file: &Arc<Path>, rules: &[Rule], catalog: &Catalog) -> Vec<Lint> {
    let mut out = Lints { file, items: Vec::new() };
    for rule in rules {
        let presets: Vec<(&str, Preset)> = rule
            .issuers()
            .iter()
            .filter_map(|i| catalog.preset(i.as_str()).map(|p| (i.as_str(), p)))
            .collect();
        unknown_claims(&mut out, rule, &presets);
        claim_types(&mut out, rule, &presets);
        contradictions(&mut out, rule, &presets);
        refused_methods(&mut out, rule);
        if rule.effect == Effect::Deny {
            github_subject_by_name(&mut out, rule, &presets);
            deny_by_name(&mut out, rule, &presets);
        }
        if rule.effect == Effect::Allow {
            unpinned(&mut out, rule, &presets);
            repository_without_owner(&mut out, rule, &presets);
            deploy_without_ref(&mut out, rule, &presets);
            branch_alone(&mut out, rule, &presets);
            gitlab_environment_alone(&mut out, rule, &presets);
            bitbucket_environment_alone(&mut out, rule, &presets);
            gitlab_ref_without_type(&mut out, rule, &presets);
            unverified_email(&mut out, rule);
            shadowed(&mut out, rule, rules);
            redundant(&mut out, rule, rules);
            if rule.is_public() {
                public_shadowed(&mut out, rule, rules);
            }
        }
    }
    out.items.sort_by_key(|l| (l.diagnostic.line, l.diagnostic.col));
    out.items
}

struct Lints<'a> {
    file: &'a Arc<Path>,
    items: Vec<Lint>,
}

impl Lints<'_> {
    fn push(&mut self, severity: Severity, at: Loc, message: String) {
        let diagnostic =
            Diagnostic { file: self.file.clone(), line: at.line, col: at.col, message };
        self.items.push(Lint { severity, diagnostic });
    }
}

/// A misspelt claim matches nothing: in an allow that is a dead rule, in a deny it is
/// a hole.
fn unknown_claims(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    for c in rule.conditions() {
        let Matcher::Claim { name, .. } = c.matcher() else { continue };
        for (issuer, preset) in presets {
            if claims::is_known(*preset, name) {
                continue;
            }
            let vocabulary = claims::vocabulary(*preset).unwrap_or_default();
            let hint = raw::suggest(name, &vocabulary)
                .map_or_else(String::new, |s| format!("; did you mean `{s}`?"));
            out.push(
                Severity::Error,
                c.loc(),
                format!(
                    "`{name}` is not a claim of {} tokens (issuer `{issuer}`){hint}",
                    preset.name()
                ),
            );
        }
    }
}

/// A `claims` value of a type the platform never gives the claim (V21) never matches:
/// `ref_protected = false` against GitLab's `"false"`, `repository_id = 74` against
/// GitHub's `"74"`. In an allow the rule is dead; in a deny it is a hole that reads in
/// review as closed (and a `[[test]]` written with the same type would pass).
fn claim_types(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    for c in rule.conditions() {
        let Matcher::Claim { name, values } = c.matcher() else { continue };
        for (issuer, preset) in presets {
            let Some(shape) = claims::shape(*preset, name) else { continue };
            for value in values.iter() {
                let (shown, kind, fits) = match value {
                    ClaimValue::Str(g) => (
                        format!("{:?}", g.as_str()),
                        "a string",
                        matches!(shape, Shape::String | Shape::StringOrStrings | Shape::Strings),
                    ),
                    ClaimValue::Int(i) => (
                        i.to_string(),
                        "an integer",
                        matches!(shape, Shape::Integer | Shape::NumericDate),
                    ),
                    ClaimValue::Bool(b) => (b.to_string(), "a boolean", false),
                };
                if fits {
                    continue;
                }
                let hint = match (shape, value) {
                    (Shape::String | Shape::StringOrStrings | Shape::Strings, _) => {
                        Some(format!("{shown:?}"))
                    }
                    (Shape::Integer | Shape::NumericDate, ClaimValue::Str(g)) => {
                        g.as_str().parse::<i64>().ok().map(|i| i.to_string())
                    }
                    _ => None,
                };
                let hint = hint.map_or_else(String::new, |h| format!(": write `{h}`"));
                out.push(
                    Severity::Error,
                    c.loc(),
                    format!(
                        "`claims.{name} = {shown}` never matches {} tokens (issuer `{issuer}`), which carry `{name}` as {}, not {kind}{hint}",
                        preset.name(),
                        shape.described()
                    ),
                );
            }
        }
    }
}

/// A GitHub deny on a name-form subject (`repo:acme/playground:*`): with immutable
/// subject claims (`repo:OWNER@ID/REPO@ID:…`, GitHub's default for repositories created
/// or renamed since July 2026, and an opt-in for any repository's admins) the token's
/// `sub` never matches it, so the repository it denies can leave the deny by itself.
fn github_subject_by_name(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let Some((issuer, _)) = presets.iter().find(|(_, p)| *p == Preset::GithubActions) else {
        return;
    };
    for c in rule.conditions() {
        let Matcher::Subject(globs) = c.matcher() else { continue };
        let by_name = globs.iter().find_map(|g| owner_of(g, "repo:").filter(|o| !o.contains('@')));
        if let Some(owner) = by_name {
            out.push(
                Severity::Warning,
                c.loc(),
                format!(
                    "deny rule `{}` matches GitHub subjects by name (`repo:{owner}/`): a repository with immutable subject claims (`repo:OWNER@ID/REPO@ID:…`) never matches it, and its own admins can turn those on (the default for repositories created or renamed since July 2026); deny on claims.repository_id or claims.repository_owner_id instead (issuer `{issuer}`)",
                    rule.id()
                ),
            );
        }
    }
}

/// A GitHub or GitLab deny on a repository or owner name (`ci.repository`,
/// `ci.workspace`, the name claims): a rename, which the denied repository's own admins
/// may make, gives its tokens the new name, out of the deny. (Bitbucket's `ci` names
/// are UUIDs.)
fn deny_by_name(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let Some((issuer, preset)) =
        presets.iter().find(|(_, p)| matches!(p, Preset::GithubActions | Preset::GitlabCi))
    else {
        return;
    };
    const NAME_CLAIMS: &[&str] = &[
        "repository",
        "repository_owner",
        "project_path",
        "namespace_path",
        "job_project_path",
        "job_namespace_path",
    ];
    for c in rule.conditions() {
        let named = match c.matcher() {
            Matcher::Ci { field: "repository" | "workspace", .. } => true,
            Matcher::Claim { name, .. } => {
                NAME_CLAIMS.contains(&&**name) && claims::is_known(*preset, name)
            }
            _ => false,
        };
        if named {
            out.push(
                Severity::Warning,
                c.loc(),
                format!(
                    "deny rule `{}` names a repository or owner by name (`{}`): a rename takes the repository out of it, and its own admins may make one (issuer `{issuer}`); deny on an id instead (ci.repository_id, ci.workspace_id, or the id claims)",
                    rule.id(),
                    c.label()
                ),
            );
        }
    }
}

/// V22: anyone on GitHub, gitlab.com or in a Bitbucket workspace can mint a token with
/// our audience, so an allow must pin a repository or owner by something immutable.
fn unpinned(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    // One pin value cannot pin on two shared issuers: GitHub owner ids and GitLab
    // namespace ids are separate number spaces (as are two GitLab instances'), so
    // `workspace_id = "4242"` lets in whoever holds 4242 on the other one. Bitbucket's
    // UUIDs are unique across workspaces.
    let shared: Vec<&(&str, Preset)> = presets.iter().filter(|(_, p)| p.is_shared()).collect();
    if shared.len() > 1 && shared.iter().any(|(_, p)| *p != Preset::BitbucketPipelines) {
        let names: Vec<&str> = shared.iter().map(|(n, _)| *n).collect();
        let at = rule.conditions.first().map_or(rule.id_at, Condition::loc);
        out.push(
            Severity::Error,
            at,
            format!(
                "allow rule `{}` names the shared issuers {} together: a repository or owner pin means a different repository on each, so write one allow rule per issuer (V22)",
                rule.id(),
                names.join(", ")
            ),
        );
        return;
    }
    for (issuer, preset) in presets {
        if !preset.is_shared() || pinned(rule, *preset) {
            continue;
        }
        let how = match preset {
            Preset::BitbucketPipelines => "ci.repository / ci.workspace, or claims.repositoryUuid / claims.workspaceUuid",
            Preset::GithubActions => {
                "claims.repository_owner_id / claims.repository_id, ci.workspace_id / ci.repository_id, or an immutable subject = \"repo:OWNER@ID/...\""
            }
            Preset::GitlabCi => "claims.namespace_id / claims.project_id, or ci.workspace_id / ci.repository_id",
            Preset::Oidc => "",
        };
        let at = rule.conditions.first().map_or(rule.id_at, Condition::loc);
        let message = match name_pin(rule, *preset) {
            Some(by_name) => format!(
                "allow rule `{}` pins a repository or owner by name only (`{}`): a rename or deletion frees the name for anyone to register, whose {} tokens then match (issuer `{issuer}` is shared); pin the id: {how} (V22)",
                rule.id(),
                by_name.label(),
                preset.name()
            ),
            None => format!(
                "allow rule `{}` does not pin a repository or owner, so any {} token with this audience matches (issuer `{issuer}` is shared); add {how} (V22)",
                rule.id(),
                preset.name()
            ),
        };
        out.push(Severity::Error, at, message);
    }
}

/// A GitHub or GitLab allow that pins a repository id but not its owner's: a
/// repository keeps its id when its admins transfer it to another account,
/// organization or group (GitHub lets a repository's admins do so by default), and the
/// new owner's pipelines then mint tokens that still match, a former admin's own
/// account's included. The owner id (or GitHub's immutable subject, which names both)
/// ends that at the transfer. Bitbucket's issuer is the workspace's own: a repository
/// moved out of it is another issuer's.
fn repository_without_owner(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let Some((issuer, preset)) =
        presets.iter().find(|(_, p)| matches!(p, Preset::GithubActions | Preset::GitlabCi))
    else {
        return;
    };
    let (repository, owner) = match preset {
        Preset::GithubActions => ("repository_id", "repository_owner_id"),
        _ => ("project_id", "namespace_id"),
    };
    let pin = |c: &Condition, field: &str, claim: &str| match c.matcher() {
        Matcher::Ci { field: f, globs } => *f == field && globs.iter().all(pins),
        Matcher::Claim { name, values } => {
            &**name == claim && values.iter().all(|v| matches!(v, ClaimValue::Str(g) if pins(g)))
        }
        Matcher::Subject(globs) => globs.iter().all(|g| subject_pins(*preset, g)),
        _ => false,
    };
    let Some(at) = rule.conditions().find(|c| pin(c, "repository_id", repository)) else {
        return;
    };
    if rule.conditions().any(|c| pin(c, "workspace_id", owner)) {
        return;
    }
    out.push(
        Severity::Warning,
        at.loc(),
        format!(
            "allow rule `{}` pins the repository id but not its owner's (issuer `{issuer}`): a repository keeps its id when its admins transfer it to another account or organization, whose pipelines then still match; add claims.{owner} (or ci.workspace_id)",
            rule.id()
        ),
    );
}

/// Whether `rule` pins a repository or owner of `preset` by an immutable id (V22).
/// Bitbucket's `ci.repository` and `ci.workspace` are its UUIDs; GitHub's and GitLab's
/// are names (`acme/api`), which a rename or deletion frees for anyone to register,
/// so there only the `_id` fields, the id claims and GitHub's immutable subject
/// (`repo:OWNER@ID/REPO@ID:…`) pin.
fn pinned(rule: &Rule, preset: Preset) -> bool {
    rule.conditions().any(|c| match c.matcher() {
        Matcher::Ci { field, globs } => {
            PIN_CI_FIELDS.contains(field)
                && (preset == Preset::BitbucketPipelines || field.ends_with("_id"))
                && globs.iter().all(pins)
        }
        Matcher::Claim { name, values } => {
            PIN_CLAIMS.contains(&&**name)
                && claims::is_known(preset, name)
                && values.iter().all(|v| match v {
                    ClaimValue::Str(g) => pins(g),
                    ClaimValue::Int(_) => true,
                    ClaimValue::Bool(_) => false,
                })
        }
        Matcher::Subject(globs) => globs.iter().all(|g| subject_pins(preset, g)),
        _ => false,
    })
}

/// The condition of a rule [`pinned`] refuses that fixes a GitHub or GitLab
/// repository or owner by its name: `ci.repository`, `ci.workspace`, or a subject
/// naming the owner (`repo:acme/…`, `project_path:acme/…`).
fn name_pin(rule: &Rule, preset: Preset) -> Option<&Condition> {
    let prefix = match preset {
        Preset::GithubActions => "repo:",
        Preset::GitlabCi => "project_path:",
        Preset::BitbucketPipelines | Preset::Oidc => return None,
    };
    rule.conditions().find(|c| match c.matcher() {
        Matcher::Ci { field, globs } => {
            matches!(*field, "repository" | "workspace") && globs.iter().all(pins)
        }
        Matcher::Subject(globs) => globs.iter().all(|g| owner_of(g, prefix).is_some()),
        _ => false,
    })
}

/// A pattern pins when it is literal, or fixes everything up to an owner's `/`.
fn pins(g: &Glob) -> bool {
    g.is_literal() || g.literal_prefix().find('/').is_some_and(|i| i > 0)
}

/// The owner a subject pattern fixes after `prefix` (`repo:`): the literal text up to
/// the first `/`, when there is one and it is not empty.
fn owner_of<'g>(g: &'g Glob, prefix: &str) -> Option<&'g str> {
    g.literal_prefix()
        .strip_prefix(prefix)
        .and_then(|rest| rest.split_once('/'))
        .map(|(owner, _)| owner)
        .filter(|owner| !owner.is_empty())
}

fn subject_pins(preset: Preset, g: &Glob) -> bool {
    match preset {
        // Only the immutable form, `repo:OWNER@ID/…`: a name-only owner is freed by a
        // rename or deletion (GitHub names hold no `@`, so no name reads as this).
        Preset::GithubActions => owner_of(g, "repo:")
            .and_then(|owner| owner.rsplit_once('@'))
            .is_some_and(|(name, id)| {
                !name.is_empty() && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
            }),
        // `project_path:GROUP/PROJECT:…` is a name.
        Preset::GitlabCi => false,
        // `{repositoryUuid}:{stepUuid}` or `{repositoryUuid}:{environmentUuid}:{stepUuid}`.
        Preset::BitbucketPipelines => {
            let prefix = g.literal_prefix();
            prefix.starts_with('{') && prefix.contains('}')
        }
        Preset::Oidc => false,
    }
}

/// `claims = { email = … }` reads the raw claim: an address the provider did not verify
/// matches too (anyone can put any address on some providers' accounts), where `email`
/// and `email_domain` take verified addresses only (V21).
fn unverified_email(out: &mut Lints<'_>, rule: &Rule) {
    for c in rule.conditions() {
        if let Matcher::Claim { name, .. } = c.matcher() {
            if &**name == "email" {
                out.push(
                    Severity::Warning,
                    c.loc(),
                    format!(
                        "allow rule `{}` matches `claims.email`, which includes unverified addresses; use `email` or `email_domain` (verified only, V21)",
                        rule.id()
                    ),
                );
            }
        }
    }
}

/// `CONNECT` and `TRACE` never reach a policy: the proxy refuses them (405
/// `method-not-allowed`) on every route before routing, so naming them in `methods` is
/// dead: an allow (or a `[[test]]` expecting one) for them never admits anything, a
/// deny on them refuses nothing the proxy had not refused already.
fn refused_methods(out: &mut Lints<'_>, rule: &Rule) {
    for c in rule.conditions() {
        let Matcher::Methods(methods) = c.matcher() else { continue };
        for m in methods.iter().filter(|m| crate::http::never_forwarded(m.as_str())) {
            let effect = match rule.effect {
                Effect::Allow => "allow",
                Effect::Deny => "deny",
            };
            let whole = if methods.len() == 1 {
                "the rule never decides anything"
            } else {
                "that entry is dead"
            };
            out.push(
                Severity::Warning,
                c.loc(),
                format!(
                    "{effect} rule `{}` lists `{m}` in `methods`, which never reaches a policy: the proxy refuses {m} (405 method-not-allowed) on every route; {whole}",
                    rule.id()
                ),
            );
        }
    }
}

/// A CI allow that can write and trusts a branch name alone, on a platform that gives
/// that name to runs an outsider can set off:
/// - GitHub: `pull_request_target`, `workflow_run` and `schedule` runs carry the base
///   branch's ref, so a workflow that a fork's pull request sets off (and that checks
///   out its code) gets a `main` token;
/// - GitLab: a merge-request pipeline from a fork, run in the parent project (as a
///   maintainer does to test it with the project's variables), carries the fork's own
///   branch name, so the fork's `main` reads `ref = "main"`; only `ref_protected` tells
///   it from the project's protected `main`.
///
/// Pinning what an outsider cannot choose (the event, the workflow file, a protected
/// ref or environment) closes that. On GitHub the workflow file is `workflow_ref`, the
/// run's top-level (calling) workflow; `job_workflow_ref` names the file the job runs,
/// which for a reusable workflow is the called one, whatever workflow and event called
/// it (a `pull_request_target` workflow of the same repository may call it too), so it
/// pins no caller and does not count.
fn branch_alone(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    struct Platform {
        preset: Preset,
        name: &'static str,
        /// Claims that pin what an outsider cannot choose.
        pins: &'static [&'static str],
        /// `ci` fields that do the same.
        ci_pins: &'static [&'static str],
        /// Why the branch alone is not enough there, and what to pin (the warning's end).
        why: &'static str,
    }
    const PLATFORMS: [Platform; 2] = [
        Platform {
            preset: Preset::GithubActions,
            name: "GitHub",
            pins: &["event_name", "environment", "workflow_ref", "ref_protected"],
            ci_pins: &["environment", "tag"],
            why: "pull_request_target, workflow_run and schedule runs carry the base branch too, so a fork's pull request can set one off; pin claims.event_name, claims.workflow_ref or ci.environment",
        },
        Platform {
            preset: Preset::GitlabCi,
            name: "GitLab",
            pins: &["ref_protected", "environment_protected", "pipeline_source"],
            ci_pins: &["tag"],
            why: "a merge-request pipeline from a fork, run in this project, carries the fork's branch name (its own `main`), unprotected; pin claims.ref_protected = \"true\" (or claims.environment_protected = \"true\")",
        },
    ];
    if can_write(rule).is_none() {
        return;
    }
    for platform in &PLATFORMS {
        let Some((issuer, _)) = presets.iter().find(|(_, p)| *p == platform.preset) else {
            continue;
        };
        let mut by_branch = None;
        let mut by_more = false;
        // A pin on the event that admits one an outsider can set off: it pins nothing.
        let mut outsider = None;
        // A GitHub `claims.job_workflow_ref` pin: the called workflow, not its caller.
        let mut called = None;
        for c in rule.conditions() {
            match c.matcher() {
                Matcher::Ci { field: "branch" | "ref", .. } => by_branch = by_branch.or(Some(c)),
                Matcher::Ci { field, globs } => {
                    by_more |= platform.ci_pins.contains(field)
                        && !globs.iter().any(Glob::is_wildcards_only)
                }
                Matcher::Claim { name, .. } if matches!(&**name, "ref" | "ref_path") => {
                    by_branch = by_branch.or(Some(c))
                }
                Matcher::Claim { name, values } => {
                    if platform.preset == Preset::GithubActions
                        && &**name == "job_workflow_ref"
                        && restricts(name, values)
                    {
                        called = called.or(Some(c));
                    }
                    let pin = platform.pins.contains(&&**name) && restricts(name, values);
                    match outsider_event(name, values).filter(|_| pin) {
                        Some(event) => outsider = outsider.or(Some((c, event))),
                        None => by_more |= pin,
                    }
                }
                Matcher::Subject(globs) => match platform.preset {
                    // `repo:OWNER/REPO:environment:NAME` names an environment.
                    Preset::GithubActions => {
                        by_more |= globs.iter().all(|g| names_after(g, ":environment:"))
                    }
                    // `project_path:GROUP/PROJECT:ref_type:branch:ref:main` names a branch.
                    _ => {
                        if globs.iter().any(|g| g.literal_prefix().contains(":ref_type:branch:")) {
                            by_branch = by_branch.or(Some(c));
                        }
                    }
                },
                _ => {}
            }
        }
        if let (Some(at), false) = (by_branch, by_more) {
            let event = outsider.map_or_else(String::new, |(c, event)| {
                format!(
                    " (`{}` admits `{event}`, an event an outsider can set off, so it pins nothing)",
                    c.label()
                )
            });
            let called = called.map_or_else(String::new, |c| {
                format!(
                    " (`{}` names the workflow the job runs, which for a reusable workflow is the called one, whatever workflow and event called it, so it pins no caller)",
                    c.label()
                )
            });
            out.push(
                Severity::Warning,
                at.loc(),
                format!(
                    "allow rule `{}` trusts a {} branch alone (issuer `{issuer}`): {}{event}{called}",
                    rule.id(),
                    platform.name,
                    platform.why
                ),
            );
        }
    }
}

/// The first event of an outsider's choosing that a `claims.event_name` (GitHub) or
/// `claims.pipeline_source` (GitLab) condition admits. On GitHub, runs of these events
/// carry the base or default branch's ref, yet anyone who can open a pull request, an
/// issue or a comment, or fork or star the repository, or edit an open wiki, sets them
/// off (`workflow_run` follows a workflow a fork's pull request ran). On GitLab, a
/// merge-request pipeline (and its `parent_pipeline` children, and an external pull
/// request's) from a fork carries the fork's own branch name.
fn outsider_event(name: &str, values: &[ClaimValue]) -> Option<&'static str> {
    const GITHUB: &[&str] = &[
        "pull_request_target",
        "workflow_run",
        "issue_comment",
        "issues",
        "discussion",
        "discussion_comment",
        "fork",
        "watch",
        "gollum",
    ];
    const GITLAB: &[&str] =
        &["merge_request_event", "external_pull_request_event", "parent_pipeline"];
    let events = match name {
        "event_name" => GITHUB,
        "pipeline_source" => GITLAB,
        _ => return None,
    };
    events
        .iter()
        .copied()
        .find(|event| values.iter().any(|v| matches!(v, ClaimValue::Str(g) if g.matches(event))))
}

/// Whether a `claims.NAME` condition restricts what the lints take it for: it
/// [`protection_pins`], and no value is wildcards only (`**`, `*`), which names nothing.
fn restricts(name: &str, values: &[ClaimValue]) -> bool {
    protection_pins(name, values)
        && !values.iter().any(|v| matches!(v, ClaimValue::Str(g) if g.is_wildcards_only()))
}

/// Whether a `claims.NAME` condition pins what the lints above take it for: a
/// `ref_protected` or `environment_protected` condition only when it holds for `"true"`
/// alone (`"*"`, `"false"` or `["true", "false"]` read as a pin in review and match the
/// unprotected ref too); any other claim as it is.
fn protection_pins(name: &str, values: &[ClaimValue]) -> bool {
    !matches!(name, "ref_protected" | "environment_protected")
        || values.iter().all(|v| matches!(v, ClaimValue::Str(g) if g.as_str() == "true"))
}

/// Whether a subject pattern fixes something after `marker` (`:ref:`, `:environment:`)
/// in its literal part: `…:ref:**` names no ref, `…:ref:refs/heads/main` does.
fn names_after(g: &Glob, marker: &str) -> bool {
    g.literal_prefix().split_once(marker).is_some_and(|(_, after)| !after.is_empty())
}

/// A GitLab allow on the bare `ref` claim that does not say which kind of ref: GitLab
/// sends a tag's name there too (`ref = "main"`, `ref_type = "tag"`), and a developer can
/// push a tag named like a protected branch wherever tags are not protected (none are
/// by default), so the tag's pipeline matched as the branch. `ci.branch`/`ci.tag` (read
/// with `ref_type`), `ci.ref`, `claims.ref_path` (`refs/heads/…`) or a literal
/// `claims.ref_type` say it. A deny matching both kinds is only wider.
fn gitlab_ref_without_type(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let Some((issuer, _)) = presets.iter().find(|(_, p)| *p == Preset::GitlabCi) else {
        return;
    };
    let mut bare_ref = None;
    let mut kind_said = false;
    for c in rule.conditions() {
        match c.matcher() {
            Matcher::Claim { name, .. } if &**name == "ref" => bare_ref = bare_ref.or(Some(c)),
            Matcher::Claim { name, values } if &**name == "ref_type" => {
                kind_said |=
                    values.iter().all(|v| matches!(v, ClaimValue::Str(g) if g.is_literal()))
            }
            Matcher::Claim { name, .. } if &**name == "ref_path" => kind_said = true,
            Matcher::Ci { field: "branch" | "tag" | "ref", .. } => kind_said = true,
            _ => {}
        }
    }
    if let (Some(at), false) = (bare_ref, kind_said) {
        out.push(
            Severity::Error,
            at.loc(),
            format!(
                "allow rule `{}` reads GitLab's `ref` claim without `ref_type` (issuer `{issuer}`): it holds a tag's name as well as a branch's, so a tag named `main`, which developers can push where tags are not protected, matches `main`; use ci.branch or ci.tag, or add claims.ref_type = \"branch\"",
                rule.id()
            ),
        );
    }
}

/// A GitLab allow that can write and trusts an environment's name alone: any developer's
/// pipeline, from any branch, may say `environment: production`, and only a protected
/// environment or ref tells the real deployment apart (`environment_protected`,
/// `ref_protected`). A rule that also names the ref is [`branch_alone`]'s.
fn gitlab_environment_alone(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let Some((issuer, _)) = presets.iter().find(|(_, p)| *p == Preset::GitlabCi) else { return };
    if can_write(rule).is_none() {
        return;
    }
    let mut by_environment = None;
    for c in rule.conditions() {
        match c.matcher() {
            Matcher::Ci { field: "environment", .. } => by_environment = by_environment.or(Some(c)),
            Matcher::Claim { name, .. } if matches!(&**name, "environment" | "deployment_tier") => {
                by_environment = by_environment.or(Some(c))
            }
            Matcher::Ci { field: "branch" | "ref" | "tag", .. } => return,
            // `project_path:GROUP/PROJECT:ref_type:branch:ref:main` names the ref.
            Matcher::Subject(globs) if globs.iter().all(|g| names_after(g, ":ref:")) => return,
            Matcher::Claim { name, values }
                if matches!(
                    &**name,
                    "ref" | "ref_path" | "ref_protected" | "environment_protected"
                ) && protection_pins(name, values) =>
            {
                return
            }
            _ => {}
        }
    }
    if let Some(at) = by_environment {
        out.push(
            Severity::Warning,
            at.loc(),
            format!(
                "allow rule `{}` trusts a GitLab environment name alone (issuer `{issuer}`): any developer's pipeline, from any branch, can name an environment that is not protected; pin claims.environment_protected = \"true\" (or claims.ref_protected = \"true\")",
                rule.id()
            ),
        );
    }
}

/// A Bitbucket allow that can write and trusts a deployment environment alone: a step
/// on any branch may name the environment (`deployment: production` in the branch's
/// own `bitbucket-pipelines.yml`) unless its deployment permissions, a Premium feature,
/// restrict branches, and the token carries nothing that says they do. A branch pins
/// it (with the repository's branch restrictions).
fn bitbucket_environment_alone(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let Some((issuer, _)) = presets.iter().find(|(_, p)| *p == Preset::BitbucketPipelines) else {
        return;
    };
    if can_write(rule).is_none() {
        return;
    }
    let names = |globs: &[Glob]| !globs.iter().any(Glob::is_wildcards_only);
    let mut by_environment = None;
    for c in rule.conditions() {
        match c.matcher() {
            Matcher::Ci { field: "environment", .. } => by_environment = by_environment.or(Some(c)),
            Matcher::Claim { name, .. } if &**name == "deploymentEnvironmentUuid" => {
                by_environment = by_environment.or(Some(c))
            }
            Matcher::Ci { field: "branch" | "ref", globs } if names(globs) => return,
            Matcher::Claim { name, values }
                if &**name == "branchName"
                    && !values
                        .iter()
                        .any(|v| matches!(v, ClaimValue::Str(g) if g.is_wildcards_only())) =>
            {
                return
            }
            _ => {}
        }
    }
    if let Some(at) = by_environment {
        out.push(
            Severity::Warning,
            at.loc(),
            format!(
                "allow rule `{}` trusts a Bitbucket deployment environment alone (issuer `{issuer}`): a step on any branch may name it unless its deployment permissions (a Premium feature) restrict branches; pin ci.branch too",
                rule.id()
            ),
        );
    }
}

/// Whether `rule` can allow a write: `None` when its `methods` are all GET/HEAD, else
/// `Some` of its `methods` condition (`Some(None)`: no `methods`, so any method).
fn can_write(rule: &Rule) -> Option<Option<&Condition>> {
    let methods = rule.conditions().find_map(|c| match c.matcher() {
        Matcher::Methods(m) => Some((c, m)),
        _ => None,
    });
    match methods {
        Some((_, m)) if m.iter().all(|m| *m == Method::GET || *m == Method::HEAD) => None,
        Some((c, _)) => Some(Some(c)),
        None => Some(None),
    }
}

/// A CI allow that can write, from any branch: a feature branch can deploy.
fn deploy_without_ref(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let Some((issuer, preset)) = presets.iter().find(|(_, p)| *p != Preset::Oidc) else { return };
    let Some(methods) = can_write(rule) else { return };
    let restricted = rule.conditions().any(|c| match c.matcher() {
        Matcher::Ci { field, globs } => {
            REF_CI_FIELDS.contains(field)
                && !globs.iter().any(|g| g.matches_everything() || g.is_wildcards_only())
        }
        // As for `ci`: a value of wildcards only (`**`, `*`) names no ref, and a
        // protection claim restricts only when it asks for "true".
        Matcher::Claim { name, values } => REF_CLAIMS.contains(&&**name) && restricts(name, values),
        Matcher::Subject(globs) => {
            globs.iter().all(|g| names_after(g, ":ref:") || names_after(g, ":environment:"))
        }
        _ => false,
    });
    if restricted {
        return;
    }
    let at = methods.map_or(rule.id_at, Condition::loc);
    let what = if methods.is_some() { "write methods" } else { "any method" };
    out.push(
        Severity::Warning,
        at,
        format!(
            "allow rule `{}` lets {} tokens (issuer `{issuer}`) use {what} from any branch; restrict it with ci.branch, ci.ref, ci.tag or ci.environment",
            rule.id(),
            preset.name()
        ),
    );
}

/// Conditions that cannot all hold at once.
fn contradictions(out: &mut Lints<'_>, rule: &Rule, presets: &[(&str, Preset)]) {
    let find = |pred: &dyn Fn(&Matcher) -> bool| rule.conditions().find(|c| pred(c.matcher()));
    let mut never = |at: Loc, why: String| {
        let kind = match rule.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        out.push(
            Severity::Error,
            at,
            format!("{kind} rule `{}` can never match: {why}", rule.id()),
        );
    };
    let http = find(&|m| matches!(m, Matcher::Methods(_) | Matcher::Paths(_)));
    let db = find(&|m| matches!(m, Matcher::Databases(_) | Matcher::Roles(_)));
    if let (Some(h), Some(d)) = (http, db) {
        never(
            d.loc(),
            format!(
                "`{}` applies to HTTP requests and `{}` to database sessions",
                h.label(),
                d.label()
            ),
        );
    }
    let branch = find(&|m| matches!(m, Matcher::Ci { field: "branch", .. }));
    let tag = find(&|m| matches!(m, Matcher::Ci { field: "tag", .. }));
    if let (Some(_), Some(t)) = (branch, tag) {
        never(
            t.loc(),
            "a ref is either a branch or a tag, so `ci.branch` and `ci.tag` never both hold".into(),
        );
    }
    // Bitbucket puts braced lower-case UUIDs in these fields and claims: `environment =
    // "production"` (the name shown in its UI), a UUID copied without its braces or in
    // upper case, or a look-alike (`{repo}`, a digit short) never matches, and a deny
    // written so is dead. (`ci.workspace` and
    // `ci.repository` match in any case, [`super::rule::folds_case`].)
    if !presets.is_empty() && presets.iter().all(|(_, p)| *p == Preset::BitbucketPipelines) {
        for c in rule.conditions() {
            let (name, bad) = match c.matcher() {
                Matcher::Ci { field, globs } => {
                    let uuid_field = matches!(
                        *field,
                        "workspace"
                            | "workspace_id"
                            | "repository"
                            | "repository_id"
                            | "environment"
                            | "pipeline"
                            | "run"
                            | "step"
                    );
                    let fold = super::rule::folds_case(field);
                    let bad = globs.iter().find(|g| uuid_field && !uuid_shaped(g, fold));
                    (format!("ci.{field}"), bad)
                }
                Matcher::Claim { name, values } if name.ends_with("Uuid") => {
                    let bad = values.iter().find_map(|v| match v {
                        ClaimValue::Str(g) if !uuid_shaped(g, false) => Some(g),
                        _ => None,
                    });
                    (format!("claims.{name}"), bad)
                }
                _ => continue,
            };
            if let Some(g) = bad {
                never(
                    c.loc(),
                    format!(
                        "Bitbucket sends `{name}` as a braced lower-case UUID (`{{2e9e…}}`), so `{}` never matches; copy the UUID from the repository or deployment settings",
                        g.as_str()
                    ),
                );
            }
        }
        // Bitbucket tokens name no tag, commit or actor, and their only ref is the
        // branch's: a deny on a tag pipeline written so was dead.
        for c in rule.conditions() {
            let why = match c.matcher() {
                Matcher::Ci { field: "tag", .. } => {
                    "Bitbucket tokens name no tag (a tag pipeline's has no `branchName` at all), so `ci.tag` never holds; restrict allows with `ci.branch`, which a tag pipeline never matches".to_string()
                }
                Matcher::Ci { field: field @ ("commit" | "actor"), .. } => {
                    format!("Bitbucket tokens carry no {field}, so `ci.{field}` never holds")
                }
                Matcher::Ci { field: "ref", globs } => {
                    let heads = "refs/heads/";
                    let Some(g) = globs.iter().find(|g| {
                        let p = g.literal_prefix();
                        !(p.starts_with(heads) || heads.starts_with(p))
                    }) else {
                        continue;
                    };
                    format!(
                        "Bitbucket's `ci.ref` is always `refs/heads/` + `branchName`, so `{}` never matches (a tag pipeline's token has no ref at all); restrict allows with `ci.branch`",
                        g.as_str()
                    )
                }
                _ => continue,
            };
            never(c.loc(), why);
        }
    }
    // GitHub and GitLab ids are decimal numbers in strings (`"74"`): a GraphQL node id
    // (`R_kgDO…`), a GitLab global id (`gid://gitlab/Project/20`), a name, full-width
    // digits or a leading zero never match, and a deny written so is dead.
    let numeric: Vec<Preset> = presets
        .iter()
        .map(|(_, p)| *p)
        .filter(|p| matches!(p, Preset::GithubActions | Preset::GitlabCi))
        .collect();
    if let Some(&preset) = numeric.first() {
        let all_numeric = numeric.len() == presets.len();
        for c in rule.conditions() {
            let (label, bad) = match c.matcher() {
                Matcher::Ci { field: field @ ("repository_id" | "workspace_id"), globs }
                    if all_numeric =>
                {
                    (format!("ci.{field}"), globs.iter().find(|g| !decimal_shaped(g)))
                }
                Matcher::Claim { name, values }
                    if ID_CLAIMS.contains(&&**name)
                        && numeric.iter().any(|p| claims::is_known(*p, name)) =>
                {
                    let bad = values.iter().find_map(|v| match v {
                        ClaimValue::Str(g) if !decimal_shaped(g) => Some(g),
                        _ => None,
                    });
                    (format!("claims.{name}"), bad)
                }
                _ => continue,
            };
            if let Some(g) = bad {
                let (provider, hint) = match preset {
                    Preset::GitlabCi => ("GitLab", "the ID a project's or group's page shows, not a `gid://gitlab/…` global id"),
                    _ => ("GitHub", "the REST API's `id` (`gh api repos/OWNER/REPO --jq .id`, `.owner.id`), not its `node_id`"),
                };
                never(
                    c.loc(),
                    format!(
                        "{provider} ids are decimal numbers, sent as strings (`\"74\"`), so `{}` in `{label}` never matches; write {hint}",
                        g.as_str()
                    ),
                );
            }
        }
    }
    if !presets.is_empty() && presets.iter().all(|(_, p)| *p == Preset::Oidc) {
        if let Some(c) = find(&|m| matches!(m, Matcher::Ci { .. })) {
            never(
                c.loc(),
                format!("`{}` needs a CI token, but the rule's issuers use the `oidc` preset (no CI context)", c.label()),
            );
        }
    }
    let email = rule.conditions().find_map(|c| match c.matcher() {
        Matcher::Email(g) => Some((c, g)),
        _ => None,
    });
    let domains = rule.conditions().find_map(|c| match c.matcher() {
        Matcher::EmailDomain(d) => Some(d),
        _ => None,
    });
    if let (Some((c, globs)), Some(domains)) = (email, domains) {
        let literal_domains: Option<Vec<&str>> = globs
            .iter()
            .map(|g| {
                g.as_str().rsplit_once('@').map(|(_, d)| d).filter(|d| !d.contains(['*', '?']))
            })
            .collect();
        if let Some(ds) = literal_domains {
            if !ds.iter().any(|d| domains.iter().any(|w| w.eq_ignore_ascii_case(d))) {
                never(c.loc(), "no `email` pattern is in any `email_domain`".into());
            }
        }
    }
}

/// Whether a pattern can match a Bitbucket UUID as its tokens send one: braced,
/// 8-4-4-4-12 lower-case hexadecimal digits (`{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}`).
/// `fold` reads the pattern's letters in lower case (a field matched without case).
/// A look-alike (`{repo}`, `{2e9e429c}`, a digit too many, a `g`) never matches.
fn uuid_shaped(g: &Glob, fold: bool) -> bool {
    /// What each of a UUID's 38 characters may be: `{`, a hex digit (`x`), `-`, `}`.
    const SHAPE: &[u8; 38] = b"{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}";
    let fits = |c: char, at: u8| match at {
        b'x' => matches!(c, '0'..='9' | 'a'..='f'),
        _ => c == char::from(at),
    };
    // `reach[i]`: the pattern read so far can match the shape's first `i` characters.
    let mut reach = [false; 39];
    reach[0] = true;
    let mut chars = g.as_str().chars().peekable();
    while let Some(c) = chars.next() {
        let c = if fold { c.to_ascii_lowercase() } else { c };
        let mut next = [false; 39];
        match c {
            // `*` and `**` alike: a UUID holds no `/`.
            '*' => {
                while chars.next_if_eq(&'*').is_some() {}
                let mut on = false;
                for (n, r) in next.iter_mut().zip(reach) {
                    on |= r;
                    *n = on;
                }
            }
            _ => {
                for (i, at) in SHAPE.iter().enumerate() {
                    next[i + 1] = reach[i] && (c == '?' || fits(c, *at));
                }
            }
        }
        reach = next;
    }
    reach[38]
}

/// GitHub and GitLab claims that hold a decimal id.
const ID_CLAIMS: &[&str] = &[
    "repository_id",
    "repository_owner_id",
    "actor_id",
    "enterprise_id",
    "project_id",
    "namespace_id",
    "job_project_id",
    "job_namespace_id",
    "user_id",
    "pipeline_id",
    "job_id",
];

/// Whether a pattern can match a decimal id: ASCII digits and wildcards only, and no
/// leading zero.
fn decimal_shaped(g: &Glob) -> bool {
    g.as_str().chars().all(|c| c.is_ascii_digit() || c == '*' || c == '?')
        && !g.as_str().starts_with('0')
}

/// An allow that a deny fully covers never decides anything, because deny wins.
fn shadowed(out: &mut Lints<'_>, allow: &Rule, rules: &[Rule]) {
    let Some(deny) = rules.iter().find(|d| d.effect == Effect::Deny && covers(d, allow)) else {
        return;
    };
    out.push(
        Severity::Warning,
        allow.id_at,
        format!(
            "allow rule `{}` can never match: deny rule `{}` (line {}) matches every request it does, and deny wins",
            allow.id(),
            deny.id(),
            deny.line()
        ),
    );
}

/// The route a policy serves, for [`public_everywhere`].
#[derive(Debug, Clone, Copy)]
pub struct RouteScope<'a> {
    pub name: &'a str,
    /// `any host`, `host api.example.com`, `hosts *.example.com`.
    pub host: &'a str,
    pub path_prefix: &'a str,
    /// The route's shadow policy (evaluated, not enforced).
    pub shadow: bool,
}

/// A public rule whose paths take every path a route takes opens the whole route to
/// callers without a credential: it is then not behind the proxy at all for those
/// methods. Possible on purpose (a public documentation site), never by accident.
/// Which paths that is depends on the route's `path_prefix`, so this lint is per route
/// (a policy is compiled once, whichever routes use it): `/**` opens everything a
/// route on `/` takes, but only `/status` and below on a route on `/status`, where
/// `/status/**` opens the whole route just as well.
pub fn public_everywhere(policy: &Policy, route: RouteScope<'_>) -> Vec<Lint> {
    let mut out = Lints { file: policy.file_arc(), items: Vec::new() };
    let dir = route.path_prefix.trim_end_matches('/');
    let whole: Vec<Glob> =
        ["/**".to_string(), format!("{dir}/**")].iter().filter_map(|p| Glob::new(p).ok()).collect();
    let taken = if dir.is_empty() {
        format!("its path_prefix is `/`: every path on {} that no route with a longer path_prefix takes", route.host)
    } else {
        format!(
            "its path_prefix is `{}`: `{dir}` and every path under `{dir}/` on {} that no route with a longer path_prefix takes",
            route.path_prefix, route.host
        )
    };
    let (opens, shadow) = if route.shadow {
        ("would open", " once this shadow policy is enforced")
    } else {
        ("opens", "")
    };
    for rule in policy.rules().iter().filter(|r| r.is_public()) {
        for c in rule.conditions() {
            let Matcher::Paths(globs) = c.matcher() else { continue };
            let Some(g) = globs.iter().find(|g| whole.iter().any(|w| g.covers(w))) else {
                continue;
            };
            out.push(
                Severity::Warning,
                c.loc(),
                format!(
                    "public rule `{}` {opens} every path of route `{}` (`{}`; {taken}) to callers without any credential{shadow}: \
                     list the paths that must be public (`{dir}/healthz`, `{dir}/webhooks/**`)",
                    rule.id(),
                    route.name,
                    g.as_str(),
                ),
            );
        }
    }
    out.items
}

/// A deny refuses a caller without a credential whenever its request conditions hold
/// (its identity conditions cannot be shown false), so a deny whose `methods`/`paths`
/// cover a public rule's leaves it nothing: the author thinks the paths are public.
fn public_shadowed(out: &mut Lints<'_>, public: &Rule, rules: &[Rule]) {
    let request_covers = |deny: &Rule| {
        deny.conditions()
            .filter(|d| d.matcher().is_request())
            .all(|d| public.conditions().any(|a| narrower(a.matcher(), d.matcher())))
    };
    let Some(deny) = rules.iter().find(|d| d.effect == Effect::Deny && request_covers(d)) else {
        return;
    };
    out.push(
        Severity::Warning,
        public.id_at,
        format!(
            "public rule `{}` never admits a caller without a credential: deny rule `{}` (line {}) \
             covers its methods and paths, and a deny applies to such a caller whatever its \
             identity conditions",
            public.id(),
            deny.id(),
            deny.line()
        ),
    );
}

/// An allow that an earlier allow fully covers never decides anything either: the
/// first matching allow decides, and it is always the earlier one. Usually a rule
/// left behind after a broader one was added, and a reviewer reading the later rule
/// would think it is what grants the access.
fn redundant(out: &mut Lints<'_>, allow: &Rule, rules: &[Rule]) {
    let earlier = rules.iter().take_while(|r| !std::ptr::eq(*r, allow));
    let Some(first) = earlier.filter(|r| r.effect == Effect::Allow).find(|r| covers(r, allow))
    else {
        return;
    };
    out.push(
        Severity::Warning,
        allow.id_at,
        format!(
            "allow rule `{}` never decides: the earlier allow rule `{}` (line {}) matches every request it does",
            allow.id(),
            first.id(),
            first.line()
        ),
    );
}

/// Conservatively: whether every (identity, request) that `narrow` matches also
/// matches `broad` (used by `policy diff` to tell a narrowed rule from a widened one).
/// `false` means "not provably", never "provably not".
pub fn rule_covers(broad: &Rule, narrow: &Rule) -> bool {
    covers(broad, narrow)
}

/// Conservatively: whether every (identity, request) that `allow` matches also
/// matches `deny`. False negatives are fine (no lint); false positives are not.
fn covers(deny: &Rule, allow: &Rule) -> bool {
    // A public rule matches every caller, one without a credential too; a rule with an
    // issuer matches no such caller (as an allow; a deny does, but then not every
    // caller with a credential), so it never covers a public one.
    if allow.is_public() && !deny.is_public() {
        return false;
    }
    let issuers_ok = deny.is_public() || allow.issuers().iter().all(|i| deny.issuers().contains(i));
    issuers_ok
        && deny
            .conditions()
            .filter(|c| !matches!(c.matcher(), Matcher::Issuer(_)))
            .all(|d| allow.conditions().any(|a| narrower(a.matcher(), d.matcher())))
}

/// Whether condition `a` implies condition `d`.
fn narrower(a: &Matcher, d: &Matcher) -> bool {
    let globs = |a: &[Glob], d: &[Glob]| a.iter().all(|x| d.iter().any(|y| y.covers(x)));
    let subset = |a: &[Box<str>], d: &[Box<str>]| a.iter().all(|x| d.contains(x));
    match (a, d) {
        (Matcher::Subject(a), Matcher::Subject(d))
        | (Matcher::Email(a), Matcher::Email(d))
        | (Matcher::Databases(a), Matcher::Databases(d))
        | (Matcher::Roles(a), Matcher::Roles(d)) => globs(a, d),
        (Matcher::Ci { field: fa, globs: a }, Matcher::Ci { field: fd, globs: d }) => {
            fa == fd && globs(a, d)
        }
        // `/admin/**` also covers `/admin` itself.
        (Matcher::Paths(a), Matcher::Paths(d)) => a.iter().all(|x| {
            d.iter().any(|y| y.covers(x) || (x.is_literal() && y.matches_dir(x.as_str())))
        }),
        // `GET` in `d` admits `HEAD` too (and `GET` in `a` needs `GET` in `d`).
        (Matcher::Methods(a), Matcher::Methods(d)) => a.iter().all(|m| methods_admit(d, m)),
        (Matcher::EmailDomain(a), Matcher::EmailDomain(d)) => {
            a.iter().all(|x| d.iter().any(|y| y.eq_ignore_ascii_case(x)))
        }
        (Matcher::GroupsAny(a), Matcher::GroupsAny(d)) => subset(a, d),
        (Matcher::GroupsAll(a), Matcher::GroupsAll(d)) => subset(d, a),
        (Matcher::GroupsAll(a), Matcher::GroupsAny(d)) => a.iter().any(|x| d.contains(x)),
        (Matcher::Claim { name: na, values: a }, Matcher::Claim { name: nd, values: d }) => {
            na == nd
                && a.iter().all(|x| {
                    d.iter().any(|y| match (x, y) {
                        (ClaimValue::Str(x), ClaimValue::Str(y)) => y.covers(x),
                        (x, y) => x == y,
                    })
                })
        }
        _ => false,
    }
}
