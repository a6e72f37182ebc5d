//! Compiled rules and their matchers. Everything here is checked and typed at load;
//! matching only compares, it never parses or allocates.

use std::fmt;
use std::sync::Arc;

use http::Method;
use serde::Serialize;
use serde_json::Value;

use super::{Glob, RequestFacts, RuleRef};
use crate::identity::{Identity, IssuerId};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// A 1-based position in the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Loc {
    pub line: u32,
    pub col: u32,
}

/// One compiled `[[rule]]`.
#[derive(Debug)]
pub struct Rule {
    pub(crate) rule_ref: Arc<RuleRef>,
    pub(crate) id_at: Loc,
    pub(crate) effect: Effect,
    /// `public = true`: an allow with request conditions only, which matches every
    /// caller, one without any credential included.
    pub(crate) public: bool,
    pub(crate) description: Option<Box<str>>,
    pub(crate) upstream_role: Option<Box<str>>,
    /// Identity and request conditions, cheapest first; the issuer is always first.
    pub(crate) conditions: Box<[Condition]>,
    /// Group conditions, evaluated last because group overage changes their meaning.
    pub(crate) groups: Box<[Condition]>,
}

/// One condition of a rule (`methods = [...]`, `ci.branch = ...`, ...).
#[derive(Debug)]
pub struct Condition {
    /// How the condition is written: `methods`, `ci.branch`, `claims.runner_id`.
    pub(crate) label: Box<str>,
    pub(crate) at: Loc,
    pub(crate) matcher: Matcher,
}

#[derive(Debug)]
pub(crate) enum Matcher {
    Issuer(Box<[IssuerId]>),
    Subject(Box<[Glob]>),
    /// In an allow, matches only a verified email; in a deny, the email the token
    /// claims, verified or not ([`Rule::outcome`]).
    Email(Box<[Glob]>),
    /// Exact domain of the email (verified, in an allow), ASCII case-insensitive (DNS
    /// names are).
    EmailDomain(Box<[Box<str>]>),
    GroupsAny(Box<[Box<str>]>),
    GroupsAll(Box<[Box<str>]>),
    /// A session's identity may not have kept the claim ([`Rule::outcome`]).
    Claim {
        name: Arc<str>,
        values: Box<[ClaimValue]>,
    },
    Ci {
        field: &'static str,
        globs: Box<[Glob]>,
    },
    /// `GET` also admits `HEAD` ([`methods_admit`]).
    Methods(Box<[Method]>),
    Paths(Box<[Glob]>),
    Databases(Box<[Glob]>),
    Roles(Box<[Glob]>),
}

/// A typed claim value: strings match strings (exactly, or as a glob), booleans match
/// booleans, integers match integers. `"true"` never matches `true` (V21).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimValue {
    Str(Glob),
    Bool(bool),
    Int(i64),
}

/// How one rule fared against one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Matched,
    /// The index into `conditions` followed by `groups` of the first failed condition.
    Failed(usize),
    /// An allow rule whose other conditions matched, skipped because the token's
    /// groups are unknown (overage).
    GroupsUnknown,
    /// The index of the first `claims.*` condition naming a claim the session did not
    /// keep or the provider holds elsewhere
    /// ([`Claims::is_known`](crate::identity::Claims::is_known)), in a rule whose
    /// other conditions matched. Fails closed as [`Outcome::GroupsUnknown`] does: such a
    /// condition counts as matched in a deny (the deny applies) and as failed in an
    /// allow (which is skipped).
    ClaimNotKept(usize),
}

// === impl Rule ===

impl Rule {
    pub fn id(&self) -> &str {
        &self.rule_ref.id
    }
    pub fn rule_ref(&self) -> &Arc<RuleRef> {
        &self.rule_ref
    }
    pub fn line(&self) -> u32 {
        self.rule_ref.line
    }
    pub fn effect(&self) -> Effect {
        self.effect
    }
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    /// Whether the rule is `public = true`: it admits callers without a credential.
    pub fn is_public(&self) -> bool {
        self.public
    }
    /// PostgreSQL routes: the upstream role this rule grants.
    pub fn upstream_role(&self) -> Option<&str> {
        self.upstream_role.as_deref()
    }
    /// The issuers this rule applies to.
    pub fn issuers(&self) -> &[IssuerId] {
        self.conditions
            .iter()
            .find_map(|c| match &c.matcher {
                Matcher::Issuer(i) => Some(&**i),
                _ => None,
            })
            .unwrap_or(&[])
    }
    /// Every condition in evaluation order (group conditions last).
    pub fn conditions(&self) -> impl Iterator<Item = &Condition> {
        self.conditions.iter().chain(self.groups.iter())
    }
    pub(crate) fn condition(&self, index: usize) -> Option<&Condition> {
        self.conditions().nth(index)
    }

    /// Whether the rule's request conditions (`methods`, `paths`, `databases`,
    /// `roles`) admit `request`, whoever asks: `policy who --request`.
    pub fn admits_request(&self, request: &RequestFacts<'_>) -> bool {
        self.conditions().all(|c| c.matcher.matches_request(self.effect, request))
    }

    /// Whether some HTTP request with `method` can meet the rule's request conditions:
    /// its `methods` (if any) admit it, and it names no `databases` or `roles`.
    pub fn may_match_method(&self, method: &Method) -> bool {
        self.conditions().all(|c| match &c.matcher {
            Matcher::Methods(m) => methods_admit(m, method),
            Matcher::Databases(_) | Matcher::Roles(_) => false,
            _ => true,
        })
    }

    /// Whether some path under `prefix` (a route's `path_prefix`, canonical) may meet the
    /// rule's `paths`: always without `paths`, and for a database rule. Errs towards
    /// yes: only a pattern whose text before its first wildcard neither starts with the
    /// prefix nor is a start of it is known to match nothing there.
    pub fn may_match_under(&self, prefix: &str) -> bool {
        let p = prefix.strip_suffix('/').unwrap_or(prefix);
        self.conditions().all(|c| match &c.matcher {
            Matcher::Paths(globs) => globs.iter().any(|g| {
                let literal = g.literal_prefix();
                literal.starts_with(p) || p.starts_with(literal)
            }),
            _ => true,
        })
    }

    /// How the rule fares for `identity`, or for a caller without any credential
    /// (`None`). An anonymous caller fails every identity condition of an allow (only a
    /// `public` allow, which has none, admits it) and meets every identity condition of
    /// a deny: nothing shows it is not the caller the deny names, so a deny applies
    /// whenever its request conditions hold (fail closed, as for unknown groups).
    pub(crate) fn outcome(
        &self,
        identity: Option<&Identity>,
        request: &RequestFacts<'_>,
    ) -> Outcome {
        let holds = |c: &Condition| match identity {
            Some(id) => c.matcher.matches(self.effect, id, request),
            None if c.matcher.is_request() => c.matcher.matches_request(self.effect, request),
            None => self.effect == Effect::Deny,
        };
        let mut not_kept = None;
        for (i, c) in self.conditions.iter().enumerate() {
            if let (Matcher::Claim { name, .. }, Some(id)) = (&c.matcher, identity) {
                if !id.claims.is_known(name) {
                    // A session that did not keep the claim (sealed before the rule
                    // named it), or a claim the provider holds elsewhere (Entra's group
                    // overage): fail closed, as for unknown groups below.
                    not_kept.get_or_insert(i);
                    continue;
                }
            }
            if !holds(c) {
                return Outcome::Failed(i);
            }
        }
        let matched = not_kept.map_or(Outcome::Matched, Outcome::ClaimNotKept);
        if self.groups.is_empty() {
            return matched;
        }
        let Some(identity) = identity else {
            return match self.effect {
                Effect::Deny => Outcome::Matched,
                Effect::Allow => Outcome::Failed(self.conditions.len()),
            };
        };
        if !identity.groups_known {
            // Overage (V25): fail closed. A deny still applies; an allow cannot.
            return match self.effect {
                Effect::Deny => matched,
                Effect::Allow => Outcome::GroupsUnknown,
            };
        }
        for (i, c) in self.groups.iter().enumerate() {
            if !c.matcher.matches(self.effect, identity, request) {
                return Outcome::Failed(self.conditions.len() + i);
            }
        }
        matched
    }
}

// === impl Condition ===

impl Condition {
    /// How the condition is written in the file (`ci.branch`).
    pub fn label(&self) -> &str {
        &self.label
    }
    pub fn loc(&self) -> Loc {
        self.at
    }
    pub(crate) fn matcher(&self) -> &Matcher {
        &self.matcher
    }
    /// The claim a `claims.NAME` condition names.
    pub(crate) fn claim_name(&self) -> Option<&Arc<str>> {
        match &self.matcher {
            Matcher::Claim { name, .. } => Some(name),
            _ => None,
        }
    }

    /// What the caller presented for this condition of a rule of `effect`, for
    /// `explain` only.
    pub(crate) fn actual(
        &self,
        effect: Effect,
        identity: Option<&Identity>,
        request: &RequestFacts<'_>,
    ) -> String {
        let q = |s: Option<&str>| s.map_or_else(|| "absent".to_string(), |s| format!("{s:?}"));
        match &self.matcher {
            Matcher::Methods(_) | Matcher::Paths(_) if request.is_database() => {
                return "a database request".to_string()
            }
            Matcher::Methods(_) => return q(Some(request.method.as_str())),
            Matcher::Paths(_) => return q(Some(request.path)),
            Matcher::Databases(_) => return q(request.database),
            Matcher::Roles(_) => return q(request.role),
            _ => {}
        }
        let Some(identity) = identity else {
            return "no credential (anonymous)".to_string();
        };
        match &self.matcher {
            Matcher::Issuer(_) => q(Some(identity.issuer.as_str())),
            Matcher::Subject(_) => q(Some(&identity.subject)),
            Matcher::Email(_) | Matcher::EmailDomain(_) => {
                match (&identity.email, identity.email_verified, effect) {
                    (Some(e), true, _) => q(Some(e)),
                    (Some(e), false, Effect::Allow) => {
                        format!("{e:?} (not verified: an allow reads only a verified email)")
                    }
                    (Some(e), false, Effect::Deny) => {
                        format!("{e:?} (not verified, which a deny reads too)")
                    }
                    (None, _, _) => q(None),
                }
            }
            Matcher::GroupsAny(_) | Matcher::GroupsAll(_) => format!("{:?}", identity.groups),
            Matcher::Claim { name, .. } if !identity.claims.is_kept(name) => {
                "not kept by the session".to_string()
            }
            Matcher::Claim { name, .. } if identity.claims.held_elsewhere(name) => {
                "held elsewhere by the provider (`_claim_names`, `hasgroups`)".to_string()
            }
            Matcher::Claim { name, .. } => {
                identity.claims.get(name).map_or_else(|| "absent".to_string(), Value::to_string)
            }
            Matcher::Ci { field, .. } => q(identity.ci.as_ref().and_then(|c| c.field(field))),
            // Answered above.
            Matcher::Methods(_) | Matcher::Paths(_) | Matcher::Databases(_) | Matcher::Roles(_) => {
                String::new()
            }
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = ", self.label)?;
        let list = |f: &mut fmt::Formatter<'_>, items: &mut dyn Iterator<Item = String>| {
            let items: Vec<String> = items.collect();
            write!(f, "[{}]", items.join(", "))
        };
        match &self.matcher {
            Matcher::Issuer(v) => list(f, &mut v.iter().map(|s| format!("{:?}", s.as_str()))),
            Matcher::Subject(v)
            | Matcher::Email(v)
            | Matcher::Paths(v)
            | Matcher::Databases(v)
            | Matcher::Roles(v)
            | Matcher::Ci { globs: v, .. } => {
                list(f, &mut v.iter().map(|g| format!("{:?}", g.as_str())))
            }
            Matcher::EmailDomain(v) | Matcher::GroupsAny(v) | Matcher::GroupsAll(v) => {
                list(f, &mut v.iter().map(|s| format!("{s:?}")))
            }
            Matcher::Claim { values, .. } => list(
                f,
                &mut values.iter().map(|v| match v {
                    ClaimValue::Str(g) => format!("{:?}", g.as_str()),
                    ClaimValue::Bool(b) => b.to_string(),
                    ClaimValue::Int(i) => i.to_string(),
                }),
            ),
            Matcher::Methods(v) => list(f, &mut v.iter().map(|m| format!("{:?}", m.as_str()))),
        }
    }
}

// === impl Matcher ===

impl Matcher {
    /// Whether the condition holds, in a rule of `effect`: only the email conditions
    /// read it (an allow trusts a verified email only, a deny any email; see [`email`]).
    pub(crate) fn matches(
        &self,
        effect: Effect,
        identity: &Identity,
        request: &RequestFacts<'_>,
    ) -> bool {
        match self {
            Matcher::Issuer(ids) => ids.contains(&identity.issuer),
            Matcher::Subject(globs) => any_glob(globs, &identity.subject),
            Matcher::Email(globs) => email(identity, effect).is_some_and(|e| {
                if e.bytes().any(|b| b.is_ascii_uppercase()) {
                    any_glob(globs, &e.to_ascii_lowercase())
                } else {
                    any_glob(globs, e)
                }
            }),
            Matcher::EmailDomain(domains) => email(identity, effect)
                .and_then(|e| e.rsplit_once('@'))
                .is_some_and(|(_, d)| domains.iter().any(|want| want.eq_ignore_ascii_case(d))),
            Matcher::GroupsAny(want) => {
                want.iter().any(|g| identity.groups.iter().any(|h| h == &**g))
            }
            Matcher::GroupsAll(want) => {
                want.iter().all(|g| identity.groups.iter().any(|h| h == &**g))
            }
            Matcher::Claim { name, values } => {
                identity.claims.get(name).is_some_and(|claim| claim_matches(values, claim))
            }
            Matcher::Ci { field, globs } => identity.ci.as_ref().is_some_and(|ci| {
                ci.field(field).is_some_and(|v| {
                    if folds_case(field) || (*field == "environment" && ci.provider == "github") {
                        globs.iter().any(|g| g.matches_ignoring_ascii_case(v))
                    } else {
                        any_glob(globs, v)
                    }
                })
            }),
            Matcher::Methods(_) | Matcher::Paths(_) | Matcher::Databases(_) | Matcher::Roles(_) => {
                self.matches_request(effect, request)
            }
        }
    }

    /// Request conditions only, in a rule of `effect`; any identity condition holds here.
    pub(crate) fn matches_request(&self, effect: Effect, request: &RequestFacts<'_>) -> bool {
        match self {
            // HTTP conditions never match a database request, and the reverse: a rule
            // written for one protocol must not leak onto the other.
            Matcher::Methods(methods) => {
                !request.is_database() && methods_admit(methods, request.method)
            }
            // `/admin/**` also matches `/admin` ([`Glob::matches_dir`]). In a deny, a path
            // also matches with its trailing `/` removed or added
            // ([`Glob::matches_slash_twin`]): Express, Rails, ASP.NET Core and Spring MVC
            // before 6 run the `/admin` handler for `/admin/`, so a deny of `/admin`
            // that `/admin/` escaped would be a hole. An allow is not widened.
            Matcher::Paths(globs) => {
                !request.is_database()
                    && globs.iter().any(|g| {
                        g.matches(request.path)
                            || g.matches_dir(request.path)
                            || (effect == Effect::Deny && g.matches_slash_twin(request.path))
                    })
            }
            Matcher::Databases(globs) => request.database.is_some_and(|d| any_glob(globs, d)),
            Matcher::Roles(globs) => request.role.is_some_and(|r| any_glob(globs, r)),
            _ => true,
        }
    }
}

/// Whether the `ci` field is matched ignoring ASCII case
/// ([`Glob::matches_ignoring_ascii_case`]): the repository and owner, by name or id. GitHub and GitLab names are
/// case-insensitive (`Acme/Legacy` is `acme/legacy`, and a case-only rename is allowed,
/// so a token spells the name as its admins last chose), and Bitbucket's UUIDs are hex,
/// sent in lower case. Matched as written, a deny on `acme/legacy` missed `Acme/Legacy`.
/// Branches and tags keep their case: git refs are case-sensitive. GitHub's
/// `environment` is folded too, but only for GitHub tokens (GitLab's environments are
/// case-sensitive): see [`Matcher::matches`].
pub(crate) fn folds_case(field: &str) -> bool {
    matches!(field, "workspace" | "workspace_id" | "repository" | "repository_id")
}

fn any_glob(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|g| g.matches(text))
}

/// Whether a `methods` list admits `method`. `GET` admits `HEAD` as well, as nginx's
/// `limit_except GET` does: Werkzeug, Express, Rails, Spring and Go's `ServeMux` run a
/// `HEAD` through the `GET` handler (its side effects and response headers included),
/// so a deny of `GET` that let `HEAD` through would be a hole, and an allow of `GET`
/// that refused `HEAD` would break `curl -I` and health checks. Route matching
/// (`match.methods`) uses the same rule.
pub fn methods_admit(methods: &[Method], method: &Method) -> bool {
    methods.iter().any(|m| m == method || (*m == Method::GET && *method == Method::HEAD))
}

/// The email an email condition reads. An allow trusts only a verified email (V21:
/// anyone can type an address into a profile). A deny is stricter, and fails closed:
/// it reads the email the token claims, verified or not, since `email_verified` is
/// `false` or absent for many real users (Entra never sends it; Okta and Keycloak
/// clear it when users change their own address). A token without an `email` claim
/// matches neither.
fn email(identity: &Identity, effect: Effect) -> Option<&str> {
    let email = identity.email.as_deref();
    match effect {
        Effect::Allow => email.filter(|_| identity.email_verified),
        Effect::Deny => email,
    }
}

/// A claim matches when it equals (with its own JSON type) one of the values; an array
/// claim (`aud`, `groups_direct`) matches when any element does.
fn claim_matches(values: &[ClaimValue], claim: &Value) -> bool {
    match claim {
        Value::Array(items) => items.iter().any(|item| scalar_matches(values, item)),
        other => scalar_matches(values, other),
    }
}

fn scalar_matches(values: &[ClaimValue], claim: &Value) -> bool {
    values.iter().any(|v| match (v, claim) {
        (ClaimValue::Str(g), Value::String(s)) => g.matches(s),
        (ClaimValue::Bool(b), Value::Bool(c)) => b == c,
        (ClaimValue::Int(i), Value::Number(n)) => n.as_i64() == Some(*i),
        _ => false,
    })
}
