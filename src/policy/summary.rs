//! Rules in plain words, for reviewers: `portcullis policy who` and `policy diff`
//! render a rule as "who" (the identity conditions) and "what" (the request
//! conditions), so a reviewer can check it against intent without reading TOML.

use std::fmt;
use std::sync::Arc;

use http::Method;
use serde::Serialize;

use super::rule::{ClaimValue, Condition, Effect, Matcher, Rule};
use super::{Catalog, Glob, RuleRef};
use crate::identity::Preset;

/// One rule, summarized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleSummary {
    pub rule: Arc<RuleRef>,
    pub effect: Effect,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `people from `corp` (oidc)`, one per issuer.
    pub issuers: Vec<String>,
    /// `public = true`: anyone, without any credential too.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// Identity conditions in words, all of which must hold.
    pub who: Vec<String>,
    /// Request conditions in words; empty means any request.
    pub what: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_role: Option<String>,
    /// The rule's conditions as written (`ci.branch = ["main"]`), sorted: two rules
    /// with the same canonical form grant the same access.
    #[serde(skip)]
    pub canonical: Vec<String>,
}

// === impl Rule ===

impl Rule {
    /// The rule in words; `catalog` supplies each issuer's preset.
    pub fn summary(&self, catalog: &Catalog) -> RuleSummary {
        let issuers = self
            .issuers()
            .iter()
            .map(|i| match catalog.preset(i.as_str()) {
                Some(Preset::Oidc) => format!("people and services of `{i}` (oidc)"),
                Some(p) => format!("pipelines of `{i}` ({})", p.name()),
                None => format!("tokens of `{i}`"),
            })
            .collect();
        let mut who = Vec::new();
        let mut what = Vec::new();
        for c in self.conditions() {
            match c.matcher() {
                Matcher::Issuer(_) => {}
                m if m.is_request() => what.push(c.words(self.effect())),
                _ => who.push(c.words(self.effect())),
            }
        }
        let mut canonical: Vec<String> = self.conditions().map(Condition::to_string).collect();
        if self.is_public() {
            canonical.push("public = true".to_string());
        }
        canonical.sort();
        if let Some(u) = self.upstream_role() {
            canonical.push(format!("upstream_role = {u:?}"));
        }
        RuleSummary {
            rule: self.rule_ref().clone(),
            effect: self.effect(),
            description: self.description().map(str::to_string),
            issuers,
            public: self.is_public(),
            who,
            what,
            upstream_role: self.upstream_role().map(str::to_string),
            canonical,
        }
    }
}

impl super::Policy {
    /// Whether two policies grant exactly the same access to every caller: the same
    /// rules, effects and conditions in the same order. Ids, descriptions, comments,
    /// `[[test]]`s and layout may differ. The reload audit event lists the routes
    /// for which this is false.
    pub fn same_access(&self, other: &super::Policy) -> bool {
        let shape = |r: &Rule| {
            let mut c: Vec<String> = r.conditions().map(Condition::to_string).collect();
            c.sort();
            (r.effect(), r.is_public(), c, r.upstream_role().map(str::to_string))
        };
        self.rules().len() == other.rules().len()
            && self.rules().iter().zip(other.rules()).all(|(a, b)| shape(a) == shape(b))
    }
}

// === impl RuleSummary ===

impl RuleSummary {
    /// "who" in one phrase: `pipelines of `bb` (bitbucket-pipelines) whose CI branch is `main``.
    pub fn who_phrase(&self) -> String {
        if self.public {
            return "ANYONE, without any credential (public)".to_string();
        }
        let issuers = join_or(&self.issuers);
        if self.who.is_empty() {
            format!("all {issuers}")
        } else {
            format!("{issuers} whose {}", self.who.join(" and "))
        }
    }

    /// "what" in one phrase: `` `POST` requests to paths matching `/deploy/*` ``, or
    /// `any request`.
    pub fn what_phrase(&self) -> String {
        match self.what.first() {
            None => "any request".to_string(),
            Some(first) if first.ends_with("requests") => self.what.join(" "),
            Some(_) => format!("requests {}", self.what.join(" ")),
        }
    }
}

impl fmt::Display for RuleSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.effect {
            Effect::Allow => "ALLOW",
            Effect::Deny => "DENY ",
        };
        write!(
            f,
            "{verb} `{}` ({}:{}): {}; {}",
            self.rule.id,
            self.rule.file.display(),
            self.rule.line,
            self.who_phrase(),
            self.what_phrase()
        )?;
        if let Some(r) = &self.upstream_role {
            write!(f, "; as upstream role `{r}`")?;
        }
        if let Some(d) = &self.description {
            write!(f, " — \"{d}\"")?;
        }
        Ok(())
    }
}

// === impl Condition ===

impl Condition {
    /// The condition in words, in a rule of `effect`: `CI branch is `main` or matches
    /// `release/*``.
    pub fn words(&self, effect: Effect) -> String {
        // An email condition reads a verified email in an allow, any email in a deny.
        let email = match effect {
            Effect::Allow => "verified email",
            Effect::Deny => "email (verified or not)",
        };
        match self.matcher() {
            Matcher::Issuer(ids) => {
                let v: Vec<String> = ids.iter().map(|i| format!("`{i}`")).collect();
                format!("issuer is {}", join_or(&v))
            }
            Matcher::Subject(g) => format!("subject {}", globs(g)),
            Matcher::Email(g) => format!("{email} {}", globs(g)),
            Matcher::EmailDomain(d) => format!("{email} domain is {}", strs(d, "or")),
            Matcher::GroupsAny(g) if g.len() == 1 => format!("groups include {}", strs(g, "or")),
            Matcher::GroupsAny(g) => format!("groups include any of {}", strs(g, "or")),
            Matcher::GroupsAll(g) => format!("groups include all of {}", strs(g, "and")),
            Matcher::Claim { name, values } => {
                let v: Vec<String> = values
                    .iter()
                    .map(|v| match v {
                        ClaimValue::Str(g) => glob_word(g),
                        ClaimValue::Bool(b) => format!("{b} (boolean)"),
                        ClaimValue::Int(i) => format!("{i} (integer)"),
                    })
                    .collect();
                format!("claim `{name}` {}", join_or(&v))
            }
            Matcher::Ci { field, globs: g } => format!("CI {field} {}", globs(g)),
            // Request conditions read as one phrase when joined with spaces:
            // "`POST` requests to paths matching `/deploy/*`".
            // `GET` admits `HEAD` too: say so, right after it.
            Matcher::Methods(m) => {
                let mut v: Vec<String> = Vec::with_capacity(m.len() + 1);
                for method in m.iter() {
                    v.push(format!("`{method}`"));
                    if *method == Method::GET && !m.contains(&Method::HEAD) {
                        v.push("`HEAD`".to_string());
                    }
                }
                format!("{} requests", join_or(&v))
            }
            // A deny also reads each path with its trailing `/` removed or added
            // ([`Glob::matches_slash_twin`]); `/x/**` covers both already.
            Matcher::Paths(g)
                if effect == Effect::Deny && !g.iter().all(|g| g.as_str().ends_with("/**")) =>
            {
                format!("to paths {}, with or without a trailing `/`", plural(g))
            }
            Matcher::Paths(g) => format!("to paths {}", plural(g)),
            Matcher::Databases(g) => format!("to databases {}", plural(g)),
            Matcher::Roles(g) => format!("as roles {}", plural(g)),
        }
    }
}

impl Matcher {
    /// Whether this condition is about the request rather than the caller.
    pub(crate) fn is_request(&self) -> bool {
        matches!(
            self,
            Matcher::Methods(_) | Matcher::Paths(_) | Matcher::Databases(_) | Matcher::Roles(_)
        )
    }
}

fn glob_word(g: &Glob) -> String {
    if g.is_literal() {
        format!("is `{}`", g.as_str())
    } else {
        format!("matches `{}`", g.as_str())
    }
}

/// `matching `/a/*` or `/b``, for several things.
fn plural(g: &[Glob]) -> String {
    let v: Vec<String> = g.iter().map(|g| format!("`{}`", g.as_str())).collect();
    let exact = g.iter().all(Glob::is_literal);
    format!("{} {}", if exact { "named" } else { "matching" }, join_or(&v))
}

fn globs(g: &[Glob]) -> String {
    let v: Vec<String> = g.iter().map(glob_word).collect();
    join_or(&v)
}

fn strs(v: &[Box<str>], conj: &str) -> String {
    let v: Vec<String> = v.iter().map(|s| format!("`{s}`")).collect();
    join(&v, conj)
}

fn join_or(v: &[String]) -> String {
    join(v, "or")
}

fn join(v: &[String], conj: &str) -> String {
    match v {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} {conj} {last}", init.join(", ")),
    }
}
