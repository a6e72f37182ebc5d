//! Raw → compiled: gives every key its meaning, reporting every problem with the
//! `file:line:col` of the offending key or value. A rule with problems is left out of
//! the result (so lints do not pile noise on it), but its siblings are still checked.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use http::Method;
use serde_json::{Map, Value};
use toml::Spanned;

use super::claims;
use super::raw::{self, OneOrMany};
use super::rule::{ClaimValue, Condition, Effect, Loc, Matcher, Rule};
use super::testcase::{TestCase, TestRequest};
use super::{Catalog, Glob, RuleRef};
use crate::diag::{Diagnostics, Source};
use crate::http::path;
use crate::identity::{CiContext, Identity, IssuerId, IssuerSettings, Preset};

/// The methods a rule may name. Extension methods are refused: a misspelt `PSOT`
/// would otherwise be a valid token that silently matches nothing.
const METHODS: &[&str] =
    &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];

pub(crate) struct Compiler<'a> {
    pub source: &'a Source,
    pub catalog: &'a Catalog,
    pub diags: Diagnostics,
}

impl<'a> Compiler<'a> {
    pub fn new(source: &'a Source, catalog: &'a Catalog) -> Self {
        Self { source, catalog, diags: Diagnostics::default() }
    }

    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.diags.push(self.source.error(Some(span), message));
    }

    fn loc(&self, span: &Range<usize>) -> Loc {
        let (line, col) = self.source.line_col(span.start);
        Loc { line, col }
    }

    // === rules ===

    pub fn rules(&mut self, raw: &[Spanned<raw::Rule>]) -> Vec<Rule> {
        let mut seen: HashMap<&str, u32> = HashMap::new();
        let mut rules = Vec::new();
        for r in raw {
            if let Some(id) = &r.get_ref().id {
                let line = self.loc(&id.span()).line;
                if let Some(first) = seen.insert(id.get_ref(), line) {
                    self.err(
                        id.span(),
                        format!(
                            "duplicate rule id `{}` (first defined on line {first})",
                            id.get_ref()
                        ),
                    );
                    // Keep the first definition's line for any later duplicate.
                    seen.insert(id.get_ref(), first);
                }
            }
            if let Some(rule) = self.rule(r) {
                rules.push(rule);
            }
        }
        rules
    }

    fn rule(&mut self, spanned: &Spanned<raw::Rule>) -> Option<Rule> {
        let before = self.diags.len();
        let r = spanned.get_ref();
        let header = spanned.span();

        let id = match &r.id {
            None => {
                self.err(header.clone(), "rule is missing `id`");
                None
            }
            Some(id) if !valid_id(id.get_ref()) => {
                self.err(
                    id.span(),
                    format!(
                        "rule id `{}` must be non-empty and use only letters, digits, `-`, `_` and `.`",
                        id.get_ref()
                    ),
                );
                None
            }
            Some(id) => Some(id),
        };
        let effect = self.effect(r.effect.as_ref(), &header, "rule", "effect");

        let public = r.public.as_ref().is_some_and(|p| *p.get_ref());
        if let Some(p) = r.public.as_ref().filter(|_| public) {
            self.public_rule(r, p.span(), effect);
        }

        let mut conditions = Vec::new();
        let mut groups = Vec::new();
        match &r.issuer {
            // A public rule's own error says why it names no issuer.
            None if public => {}
            None => {
                self.err(header.clone(), "rule is missing `issuer` (a name from `[issuers.NAME]`)")
            }
            Some(v) => {
                let ids = self.issuers(v);
                conditions.push(self.condition("issuer", v.span(), Matcher::Issuer(ids)));
            }
        }
        // Request conditions first: they are the cheapest to compare.
        if let Some(v) = &r.methods {
            let methods = self.methods(v);
            conditions.push(self.condition("methods", v.span(), Matcher::Methods(methods)));
        }
        if let Some(v) = &r.paths {
            let globs = self.globs(v, "paths", |p| {
                if !p.starts_with('/') {
                    return Some(format!("path `{p}` must start with `/`"));
                }
                // Requests are matched in canonical form: a pattern spelt otherwise
                // (`%61dmin`, `%3A`, `%c3%a9`) would never match, so a deny would not.
                match path::check_pattern(p, path::Syntax::Glob).err()? {
                    path::PatternError::NotCanonical { canonical, .. } if !p.is_ascii() => {
                        Some(format!(
                            "path `{}` is not ASCII: write other characters percent-encoded, \
                             as requests are matched: `{canonical}`",
                            p.escape_default()
                        ))
                    }
                    problem => Some(problem.message(p)),
                }
            });
            conditions.push(self.condition("paths", v.span(), Matcher::Paths(globs)));
        }
        if let Some(v) = &r.databases {
            let globs = self.globs(v, "databases", |_| None);
            conditions.push(self.condition("databases", v.span(), Matcher::Databases(globs)));
        }
        if let Some(v) = &r.roles {
            let globs = self.globs(v, "roles", |_| None);
            conditions.push(self.condition("roles", v.span(), Matcher::Roles(globs)));
        }
        if let Some(v) = &r.subject {
            let globs = self.globs(v, "subject", |_| None);
            conditions.push(self.condition("subject", v.span(), Matcher::Subject(globs)));
        }
        if let Some(v) = &r.email {
            // Addresses are matched in lower case, as `email_domain` compares domains.
            let globs = self.globs(v, "email", |e| {
                e.bytes().any(|b| b.is_ascii_uppercase()).then(|| {
                    format!(
                        "email `{e}` has upper case; addresses are matched in lower case: write `{}`",
                        e.to_ascii_lowercase()
                    )
                })
            });
            conditions.push(self.condition("email", v.span(), Matcher::Email(globs)));
        }
        if let Some(v) = &r.email_domain {
            let domains = self.strings(v, "email_domain", |d| {
                if d.contains('@') {
                    Some(format!("`email_domain` takes a domain, not an address: write `{}`", d.rsplit('@').next().unwrap_or(d)))
                } else if d.contains(['*', '?']) {
                    Some(format!("`email_domain` is exact; `{d}` looks like a glob (use `email = \"*@{d}\"`)"))
                } else if d.is_empty() || d.contains(char::is_whitespace) {
                    Some(format!("`{d}` is not a domain"))
                } else {
                    None
                }
            });
            conditions.push(self.condition(
                "email_domain",
                v.span(),
                Matcher::EmailDomain(domains),
            ));
        }
        if let Some(claims) = &r.claims {
            if claims.get_ref().is_empty() {
                self.err(claims.span(), "`claims` is empty: remove it or name a claim");
            }
            for (name, value) in claims.get_ref() {
                let values = self.claim_values(name.get_ref(), value);
                let label = format!("claims.{}", name.get_ref());
                let matcher = Matcher::Claim { name: name.get_ref().as_str().into(), values };
                conditions.push(self.condition(&label, name.span(), matcher));
            }
        }
        if let Some(ci) = &r.ci {
            if ci.get_ref().is_empty() {
                self.err(ci.span(), "`ci` is empty: remove it or name a field");
            }
            for (name, value) in ci.get_ref() {
                let Some(field) = CiContext::FIELDS.iter().find(|f| **f == name.get_ref().as_str())
                else {
                    let hint = raw::suggest(name.get_ref(), CiContext::FIELDS)
                        .map_or_else(String::new, |s| format!("; did you mean `{s}`?"));
                    self.err(
                        name.span(),
                        format!(
                            "unknown ci field `{}`{hint} (fields: {})",
                            name.get_ref(),
                            CiContext::FIELDS.join(", ")
                        ),
                    );
                    continue;
                };
                let label = format!("ci.{field}");
                // Matched without case where the platform compares so (repository and
                // owner names, a GitHub environment): [`super::rule::folds_case`].
                let globs = self.globs(value, &label, |_| None);
                conditions.push(self.condition(&label, name.span(), Matcher::Ci { field, globs }));
            }
        }
        if let Some(v) = &r.groups_any {
            let names = self.strings(v, "groups_any", |_| None);
            groups.push(self.condition("groups_any", v.span(), Matcher::GroupsAny(names)));
        }
        if let Some(v) = &r.groups_all {
            let names = self.strings(v, "groups_all", |_| None);
            groups.push(self.condition("groups_all", v.span(), Matcher::GroupsAll(names)));
        }
        let upstream_role = match &r.upstream_role {
            Some(u) if u.get_ref().trim().is_empty() => {
                self.err(u.span(), "`upstream_role` is empty");
                None
            }
            Some(u) => Some(u.get_ref().as_str().into()),
            None => None,
        };
        // Printed by `who` and `policy diff` (into pull-request comments): one line of
        // visible text, so it cannot forge or hide a line of the report.
        if let Some(d) = &r.description {
            if d.get_ref().chars().any(super::glob::is_hidden) {
                self.err(d.span(), "`description` is one line without control, invisible, bidirectional-override or non-ASCII space characters");
            }
        }
        let description = r.description.as_ref().map(|d| d.get_ref().as_str().into());

        let (id, effect) = (id?, effect?);
        if self.diags.len() != before {
            return None;
        }
        let id_at = self.loc(&id.span());
        let rule_ref = Arc::new(RuleRef {
            id: Arc::from(id.get_ref().as_str()),
            file: self.source.path.clone(),
            line: self.loc(&header).line,
        });
        Some(Rule {
            rule_ref,
            id_at,
            effect,
            public,
            description,
            upstream_role,
            conditions: conditions.into_boxed_slice(),
            groups: groups.into_boxed_slice(),
        })
    }

    /// `public = true` admits callers without any credential, so the rule may say
    /// nothing about the caller (there is none to match), and must say which requests
    /// it opens: the reviewer sees every method and path that needs no credential.
    fn public_rule(&mut self, r: &raw::Rule, at: Range<usize>, effect: Option<Effect>) {
        if effect == Some(Effect::Deny) {
            self.err(
                at.clone(),
                "`public` is for allow rules: a deny already applies to callers without a \
                 credential whenever its `methods` and `paths` hold",
            );
        }
        let identity_keys = [
            ("issuer", r.issuer.as_ref().map(Spanned::span)),
            ("subject", r.subject.as_ref().map(Spanned::span)),
            ("email", r.email.as_ref().map(Spanned::span)),
            ("email_domain", r.email_domain.as_ref().map(Spanned::span)),
            ("groups_any", r.groups_any.as_ref().map(Spanned::span)),
            ("groups_all", r.groups_all.as_ref().map(Spanned::span)),
            ("claims", r.claims.as_ref().map(Spanned::span)),
            ("ci", r.ci.as_ref().map(Spanned::span)),
        ];
        for (key, span) in identity_keys {
            if let Some(span) = span {
                self.err(
                    span,
                    format!(
                        "`{key}` in a public rule: `public = true` admits callers without any \
                         credential, who have no identity to match; remove `{key}`, or \
                         `public` to require a credential"
                    ),
                );
            }
        }
        let database_keys = [
            ("databases", r.databases.as_ref().map(Spanned::span)),
            ("roles", r.roles.as_ref().map(Spanned::span)),
            ("upstream_role", r.upstream_role.as_ref().map(Spanned::span)),
        ];
        for (key, span) in database_keys {
            if let Some(span) = span {
                self.err(
                    span,
                    format!("`{key}` in a public rule: database sessions always need a credential"),
                );
            }
        }
        for (key, present) in [("paths", r.paths.is_some()), ("methods", r.methods.is_some())] {
            if !present {
                self.err(
                    at.clone(),
                    format!(
                        "a public rule must list its `{key}`: every request it opens to callers \
                         without a credential is written out for review"
                    ),
                );
            }
        }
    }

    fn condition(&self, label: &str, span: Range<usize>, matcher: Matcher) -> Condition {
        Condition { label: label.into(), at: self.loc(&span), matcher }
    }

    /// Every string of a list, checked by `check`; an empty list is an error because
    /// it either matches nothing (any-of) or everything (all-of), never what was meant.
    fn strings(
        &mut self,
        v: &Spanned<OneOrMany>,
        key: &str,
        check: impl Fn(&str) -> Option<String>,
    ) -> Box<[Box<str>]> {
        let items = OneOrMany::items(v);
        if items.is_empty() {
            self.err(
                v.span(),
                format!("`{key}` is an empty list: remove it or give at least one value"),
            );
        }
        let mut out = Vec::with_capacity(items.len());
        for (s, span) in items {
            if let Some(msg) = check(s) {
                self.err(span, msg);
            } else if s.is_empty() {
                self.err(span, format!("empty string in `{key}`"));
            } else if s.chars().any(super::glob::is_hidden) {
                // As for patterns: a value must read in review as what it is.
                self.err(
                    span,
                    format!(
                        "control, invisible, bidirectional-override or non-ASCII space character in `{key}`: {}",
                        s.escape_default()
                    ),
                );
            } else {
                out.push(s.into());
            }
        }
        out.into_boxed_slice()
    }

    fn globs(
        &mut self,
        v: &Spanned<OneOrMany>,
        key: &str,
        check: impl Fn(&str) -> Option<String>,
    ) -> Box<[Glob]> {
        let items = OneOrMany::items(v);
        if items.is_empty() {
            self.err(
                v.span(),
                format!("`{key}` is an empty list: remove it or give at least one value"),
            );
        }
        let mut out = Vec::with_capacity(items.len());
        for (s, span) in items {
            match Glob::new(s) {
                Err(e) => self.err(span, format!("bad pattern {s:?} in `{key}`: {e}")),
                Ok(g) => match check(s) {
                    Some(msg) => self.err(span, msg),
                    None => out.push(g),
                },
            }
        }
        out.into_boxed_slice()
    }

    fn issuers(&mut self, v: &Spanned<OneOrMany>) -> Box<[IssuerId]> {
        let known: Vec<&str> = self.catalog.names().collect();
        let names = self.strings(v, "issuer", |name| {
            if known.contains(&name) {
                return None;
            }
            let hint = raw::suggest(name, &known)
                .map_or_else(String::new, |s| format!("; did you mean `{s}`?"));
            Some(format!(
                "issuer `{name}` is not declared in the configuration{hint} (declared: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        });
        names.iter().map(|n| IssuerId(Arc::from(&**n))).collect()
    }

    fn methods(&mut self, v: &Spanned<OneOrMany>) -> Box<[Method]> {
        let names = self.strings(v, "methods", |m| {
            if METHODS.contains(&m) {
                return None;
            }
            let upper = m.to_ascii_uppercase();
            let hint = if METHODS.contains(&upper.as_str()) {
                format!("; methods are upper case: `{upper}`")
            } else {
                raw::suggest(&upper, METHODS)
                    .map_or_else(String::new, |s| format!("; did you mean `{s}`?"))
            };
            Some(format!("unknown HTTP method `{m}`{hint}"))
        });
        names.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect()
    }

    fn claim_values(&mut self, name: &str, value: &Spanned<toml::Value>) -> Box<[ClaimValue]> {
        let mut out = Vec::new();
        match value.get_ref() {
            toml::Value::Array(items) => {
                if items.is_empty() {
                    self.err(value.span(), format!("`claims.{name}` is an empty list"));
                }
                for item in items {
                    if let Some(v) = self.claim_scalar(name, item, value.span()) {
                        out.push(v);
                    }
                }
            }
            scalar => {
                if let Some(v) = self.claim_scalar(name, scalar, value.span()) {
                    out.push(v);
                }
            }
        }
        out.into_boxed_slice()
    }

    fn claim_scalar(
        &mut self,
        name: &str,
        v: &toml::Value,
        span: Range<usize>,
    ) -> Option<ClaimValue> {
        match v {
            toml::Value::String(s) => match Glob::new(s) {
                Ok(g) => Some(ClaimValue::Str(g)),
                Err(e) => {
                    self.err(span, format!("bad pattern {s:?} in `claims.{name}`: {e}"));
                    None
                }
            },
            toml::Value::Boolean(b) => Some(ClaimValue::Bool(*b)),
            toml::Value::Integer(i) => Some(ClaimValue::Int(*i)),
            other => {
                self.err(
                    span,
                    format!(
                        "`claims.{name}` must be a string, boolean, integer or a list of them, not {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    // === tests ===

    /// `rule_ids`: the rules a test's `rule = ...` may name (an error otherwise), or
    /// `None` to take any name (a test naming a rule the policy lacks then fails when
    /// run).
    pub fn tests(
        &mut self,
        raw: &[Spanned<raw::Test>],
        rule_ids: Option<&[&str]>,
    ) -> Vec<TestCase> {
        let mut names: HashMap<&str, u32> = HashMap::new();
        let mut out = Vec::new();
        for t in raw {
            if let Some(n) = &t.get_ref().name {
                let line = self.loc(&n.span()).line;
                if let Some(first) = names.insert(n.get_ref(), line) {
                    self.err(
                        n.span(),
                        format!("duplicate test name `{}` (first on line {first})", n.get_ref()),
                    );
                    names.insert(n.get_ref(), first);
                }
            }
            if let Some(tc) = self.test(t, rule_ids) {
                out.push(tc);
            }
        }
        out
    }

    /// `effect` of a rule or `expect` of a test: "allow" or "deny".
    fn effect(
        &mut self,
        value: Option<&Spanned<String>>,
        header: &std::ops::Range<usize>,
        what: &str,
        key: &str,
    ) -> Option<Effect> {
        let Some(v) = value else {
            self.err(header.clone(), format!("{what} is missing `{key}` (\"allow\" or \"deny\")"));
            return None;
        };
        match v.get_ref().as_str() {
            "allow" => Some(Effect::Allow),
            "deny" => Some(Effect::Deny),
            other => {
                self.err(
                    v.span(),
                    format!("unknown {key} `{other}`: expected \"allow\" or \"deny\""),
                );
                None
            }
        }
    }

    fn test(
        &mut self,
        spanned: &Spanned<raw::Test>,
        rule_ids: Option<&[&str]>,
    ) -> Option<TestCase> {
        let before = self.diags.len();
        let t = spanned.get_ref();
        let header = spanned.span();
        let name = match &t.name {
            // Printed by `policy diff` into pull-request comments, as a description is.
            Some(n) if n.get_ref().chars().any(super::glob::is_hidden) => {
                self.err(n.span(), "test `name` is one line without control, invisible, bidirectional-override or non-ASCII space characters");
                None
            }
            Some(n) if !n.get_ref().trim().is_empty() => Some(n.get_ref().clone()),
            Some(n) => {
                self.err(n.span(), "test `name` is empty");
                None
            }
            None => {
                self.err(header.clone(), "test is missing `name`");
                None
            }
        };
        let expect = self.effect(t.expect.as_ref(), &header, "test", "expect");
        let request = self.test_request(t, &header);
        let identity = match &t.identity {
            None => {
                self.err(header.clone(), "test is missing `identity`");
                None
            }
            Some(i) => match i.get_ref() {
                raw::TestCaller::Identity(identity) => {
                    self.test_identity(identity, i.span()).map(Some)
                }
                // A request without any credential: what a `public` rule admits.
                raw::TestCaller::Named(name) if name == "anonymous" => Some(None),
                raw::TestCaller::Named(name) => {
                    self.err(
                        i.span(),
                        format!(
                            "test identity {name:?}: write a table of claims \
                             (`{{ issuer = \"...\", claims = {{ ... }} }}`), or \"anonymous\" \
                             for a request without any credential"
                        ),
                    );
                    None
                }
            },
        };
        if let (Some(r), Some(rule_ids)) = (&t.rule, rule_ids) {
            if !rule_ids.contains(&r.get_ref().as_str()) {
                let hint = raw::suggest(r.get_ref(), rule_ids)
                    .map_or_else(String::new, |s| format!("; did you mean `{s}`?"));
                self.err(
                    r.span(),
                    format!(
                        "test expects rule `{}`, which the policy it tests does not define{hint}",
                        r.get_ref()
                    ),
                );
            }
        }
        let (name, expect, request, identity) = (name?, expect?, request?, identity?);
        if self.diags.len() != before {
            return None;
        }
        Some(TestCase {
            name,
            line: self.loc(&header).line,
            identity,
            request,
            expect,
            rule: t.rule.as_ref().map(|r| r.get_ref().clone()),
        })
    }

    fn test_request(&mut self, t: &raw::Test, header: &Range<usize>) -> Option<TestRequest> {
        match (&t.request, &t.database) {
            (Some(r), None) => {
                if let Some(role) = &t.role {
                    self.err(
                        role.span(),
                        "`role` belongs to database tests (`database = ...`), not to `request`",
                    );
                }
                let text = r.get_ref().trim();
                let Some((method, path)) = text.split_once(' ') else {
                    self.err(r.span(), format!("bad request {text:?}: expected \"METHOD /path\", e.g. \"POST /deploy/42\""));
                    return None;
                };
                let path = path.trim();
                if !METHODS.contains(&method) {
                    self.err(
                        r.span(),
                        format!("bad request {text:?}: unknown HTTP method `{method}`"),
                    );
                    return None;
                }
                if crate::http::never_forwarded(method) {
                    self.err(
                        r.span(),
                        format!("bad request {text:?}: the proxy never forwards `{method}`: it refuses it on every route before any rule (405 method-not-allowed)"),
                    );
                    return None;
                }
                if !path.starts_with('/')
                    || path.contains(char::is_whitespace)
                    || path.contains(['?', '#'])
                {
                    self.err(
                        r.span(),
                        format!("bad request {text:?}: the path must start with `/` and have no spaces, query or fragment"),
                    );
                    return None;
                }
                // The proxy's own canonical form, so a test sees exactly what a request
                // would (`k1%3Arevoke` is `k1:revoke` to the rules).
                let path = match path::normalize(path) {
                    Ok(p) => p.into_owned(),
                    Err(e) => {
                        self.err(
                            r.span(),
                            format!(
                                "bad request {text:?}: the proxy refuses this path before any rule (400 ambiguous-path: {})",
                                e.detail()
                            ),
                        );
                        return None;
                    }
                };
                let method = Method::from_bytes(method.as_bytes()).ok()?;
                Some(TestRequest::Http { method, path })
            }
            (None, Some(db)) => Some(TestRequest::Database {
                database: db.get_ref().clone(),
                role: t.role.as_ref().map(|r| r.get_ref().clone()),
            }),
            (Some(r), Some(_)) => {
                self.err(
                    r.span(),
                    "a test has either `request` (HTTP) or `database` (PostgreSQL), not both",
                );
                None
            }
            (None, None) => {
                self.err(
                    header.clone(),
                    "test is missing `request = \"METHOD /path\"` (or `database = ...`)",
                );
                None
            }
        }
    }

    fn test_identity(&mut self, i: &raw::TestIdentity, span: Range<usize>) -> Option<Identity> {
        let preset_of = |name: &str| self.catalog.preset(name);
        let named_preset = match &i.preset {
            None => None,
            Some(p) => match Preset::parse(p.get_ref()) {
                Some(preset) => Some((preset, p.span())),
                None => {
                    self.err(
                        p.span(),
                        format!(
                            "unknown preset `{}` (bitbucket-pipelines, github-actions, gitlab-ci, oidc)",
                            p.get_ref()
                        ),
                    );
                    return None;
                }
            },
        };
        let (issuer, preset) = match (&i.issuer, named_preset) {
            (Some(iss), named) => {
                let Some(preset) = preset_of(iss.get_ref()) else {
                    self.err(
                        iss.span(),
                        format!("issuer `{}` is not declared in the configuration", iss.get_ref()),
                    );
                    return None;
                };
                if let Some((p, span)) = named {
                    if p != preset {
                        self.err(
                            span,
                            format!(
                                "issuer `{}` has preset `{}`, not `{}`",
                                iss.get_ref(),
                                preset.name(),
                                p.name()
                            ),
                        );
                        return None;
                    }
                }
                (iss.get_ref().clone(), preset)
            }
            (None, Some((p, span))) => {
                let candidates: Vec<&str> =
                    self.catalog.names().filter(|n| self.catalog.preset(n) == Some(p)).collect();
                match candidates.as_slice() {
                    [one] => ((*one).to_string(), p),
                    [] => {
                        self.err(
                            span,
                            format!("no issuer in the configuration has preset `{}`", p.name()),
                        );
                        return None;
                    }
                    _ => {
                        self.err(
                            span,
                            format!(
                                "several issuers have preset `{}`: name one with `issuer = ...`",
                                p.name()
                            ),
                        );
                        return None;
                    }
                }
            }
            (None, None) => {
                self.err(span.clone(), "test identity needs `issuer` (or `preset`)");
                return None;
            }
        };

        // A preset starts from a plausible token of that provider; `claims` overrides it.
        let mut claims: Map<String, Value> =
            if i.preset.is_some() { claims::template(preset) } else { Map::new() };
        if let Some(c) = &i.claims {
            for (k, v) in c.get_ref() {
                match toml_to_json(v.get_ref()) {
                    // A token the platform never sends would test a rule against a
                    // claim no real token matches (V21): `ref_protected = false` where
                    // GitLab sends "false".
                    Some(json)
                        if claims::shape(preset, k.get_ref()).is_some_and(|s| !s.admits(&json)) =>
                    {
                        let shape =
                            claims::shape(preset, k.get_ref()).map_or("", |s| s.described());
                        self.err(
                            v.span(),
                            format!(
                                "test identity claim `{}` is {}, but {} tokens carry it as {shape}",
                                k.get_ref(),
                                json_type(&json),
                                preset.name()
                            ),
                        );
                    }
                    Some(json) => {
                        claims.insert(k.get_ref().clone(), json);
                    }
                    None => self.err(
                        v.span(),
                        format!("claim `{}` cannot be a TOML date-time", k.get_ref()),
                    ),
                }
            }
        }
        // The shortcuts are the token's claims: `groups` where the issuer's tokens carry
        // them (`groups_claim`), so a `claims` matcher sees what the shortcut says.
        if let Some(subject) = &i.subject {
            claims.insert("sub".into(), Value::String(subject.get_ref().clone()));
        }
        claims.entry("sub").or_insert_with(|| Value::String("test-subject".into()));
        if let Some(email) = &i.email {
            claims.insert("email".into(), Value::String(email.get_ref().clone()));
        }
        if let Some(verified) = &i.email_verified {
            claims.insert("email_verified".into(), Value::Bool(*verified.get_ref()));
        }
        let settings = self.catalog.settings(&issuer)?;
        if let Some(c) = &i.claims {
            self.test_identity_names_its_issuer(settings, c.get_ref(), &claims);
        }
        // Where the issuer's tokens always say when they were minted (V18), so does the
        // test's token, as the preset's template does: `check` decides as `serve` would.
        if crate::identity::iat_required(settings) {
            claims.entry("iat").or_insert_with(|| Value::from(claims::TEST_IAT));
        }
        if let Some(groups) = &i.groups {
            let names = groups.get_ref().iter().map(|g| Value::String(g.get_ref().clone()));
            settings.groups_claim.insert(&mut claims, Value::Array(names.collect()));
        }
        // The verifier's own identity of such a token (its CI normalization, groups,
        // Google's rule, overage, claim types), so a test decides as `serve` would, and a
        // claim set the verifier would refuse is reported here instead.
        let identity = match crate::identity::unverified_identity(settings, claims) {
            Ok(identity) => identity,
            Err(e) => {
                self.err(
                    span,
                    format!(
                        "test identity is not {} {} token the proxy would accept: {}",
                        if preset == Preset::Oidc { "an" } else { "a" },
                        preset.name(),
                        e.detail
                    ),
                );
                return None;
            }
        };
        // `groups_known = false`: an overage the claims do not spell (V25).
        let overage = i.groups_known.as_ref().is_some_and(|known| !*known.get_ref());
        let (groups, groups_known) =
            if overage { (Vec::new(), false) } else { (identity.groups, identity.groups_known) };
        Some(Identity {
            groups,
            groups_known,
            // Far in the future: test identities never expire mid-run.
            expires_at: u64::from(u32::MAX),
            ..identity
        })
    }
}

impl Compiler<'_> {
    /// A test identity's `iss` and `aud`, when its `claims` give them, are what the
    /// verifier compares with the issuer's settings before anything else (V6, V14): an
    /// `iss` other than the issuer's URL, or an `aud` naming none of its `audiences`, is
    /// a token `serve` refuses (401 `unknown-issuer` or another issuer's policy;
    /// `audience-mismatch`), whatever the policy says. Reported at the value. An issuer
    /// whose own section did not compile has no URL or audiences to hold them to.
    fn test_identity_names_its_issuer(
        &mut self,
        settings: &IssuerSettings,
        written: &std::collections::BTreeMap<Spanned<String>, Spanned<toml::Value>>,
        claims: &Map<String, Value>,
    ) {
        let span =
            |name: &str| written.iter().find(|(k, _)| k.get_ref() == name).map(|(_, v)| v.span());
        if let (Some(span), Some(iss)) = (span("iss"), claims.get("iss")) {
            if !settings.issuer.is_empty() && iss.as_str() != Some(settings.issuer.as_str()) {
                self.err(
                    span,
                    format!(
                        "test identity claim `iss` is not issuer `{}`'s `issuer` ({}): the proxy would take such a token for another issuer's, or refuse it",
                        settings.id, settings.issuer
                    ),
                );
            }
        }
        if let (Some(span), Some(aud)) = (span("aud"), claims.get("aud")) {
            let named =
                |a: &Value| a.as_str().is_some_and(|a| settings.audiences.iter().any(|c| c == a));
            let fits = match aud {
                Value::Array(items) => items.iter().any(named),
                other => named(other),
            };
            if !settings.audiences.is_empty() && !fits {
                self.err(
                    span,
                    format!(
                        "test identity claim `aud` names none of issuer `{}`'s `audiences` ({}): the proxy would refuse such a token (audience-mismatch)",
                        settings.id,
                        settings.audiences.join(", ")
                    ),
                );
            }
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A JSON value's type as a sentence says it.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

fn toml_to_json(v: &toml::Value) -> Option<Value> {
    Some(match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(_) => return None,
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect::<Option<_>>()?),
        toml::Value::Table(t) => Value::Object(
            t.iter().map(|(k, v)| Some((k.clone(), toml_to_json(v)?))).collect::<Option<_>>()?,
        ),
    })
}
