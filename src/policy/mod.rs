//! Per-route policies: TOML files compiled once at load into typed rules, evaluated per
//! request into a [`Decision`] that names the deciding rule and its `file:line`.
//!
//! The language is documented in `policies/README.md`. In short:
//!
//! - default deny;
//! - any matching `deny` rule beats every `allow` (deny wins);
//! - among allows, the first matching in file order decides;
//! - group overage (`groups_known == false`): allows with a group condition do not
//!   match, denies with one still apply (fail closed), and a request that only such an
//!   allow would have let through is denied with [`Reason::GroupsUnknown`];
//! - a claim a browser session did not keep (`claims.NAME` where the session sealed at
//!   sign-in does not hold `NAME`: the rule came later): the same, fail closed. A deny
//!   naming it applies, an allow naming it does not match, and the decision says so
//!   ([`Decision::claim_not_kept`], [`Decision::detail`]).
//!
//! Loading goes [`raw`] (serde, spans) → `compile` (typed rules) → [`lint`]; every
//! problem of all three stages is reported at once. Evaluation compares precompiled
//! values only and allocates nothing beyond the `Arc` clone of the deciding rule.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::ser::SerializeStruct;
use serde::Serialize;

use crate::diag::{Diagnostic, Diagnostics, Source};
use crate::identity::{Identity, IssuerSettings, Preset};
use crate::reason::Reason;

mod claims;
mod compile;
mod explain;
mod glob;

pub(crate) use glob::is_hidden;
#[cfg(test)]
pub(crate) use glob::HIDDEN_SAMPLES;
mod lint;
pub mod raw;
mod rule;
mod summary;
mod testcase;

pub use explain::{Explanation, FailedCondition, RuleTrace, TraceOutcome};
pub use glob::{Glob, GlobError};
pub use lint::{lint, public_everywhere, rule_covers, Lint, RouteScope, Severity};
pub use rule::{methods_admit, Condition, Effect, Loc, Rule};
pub use summary::RuleSummary;
pub use testcase::{
    decide_case, run_cases, run_cases_with, run_tests, TestCase, TestOutcome, TestRequest,
};

use rule::Outcome;

/// The issuers a configuration declares (`[issuers.NAME]`) and their settings: what a
/// policy may name in `issuer = ...`, which claim vocabulary applies, and how a
/// `[[test]]` identity is built from its claims (as the verifier builds a token's).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    issuers: BTreeMap<String, IssuerSettings>,
}

/// A compiled policy file. Immutable; share it behind an `Arc`.
#[derive(Debug)]
pub struct Policy {
    name: Arc<str>,
    file: Arc<Path>,
    sha256: [u8; 32],
    rules: Vec<Rule>,
    tests: Vec<TestCase>,
    /// Lint warnings, each message prefixed with `warning: `.
    warnings: Vec<Diagnostic>,
}

/// What the proxy knows about the request being authorized. For a PostgreSQL session
/// `database` (and usually `role`) is set; `method` and `path` are then ignored, and
/// `methods`/`paths` conditions never match.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a http::Method,
    /// The normalized path that is forwarded.
    pub path: &'a str,
    pub database: Option<&'a str>,
    pub role: Option<&'a str>,
}

/// Where a rule lives: its id and the `file:line` of its `[[rule]]` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RuleRef {
    pub id: Arc<str>,
    pub file: Arc<Path>,
    pub line: u32,
}

/// The outcome of evaluating a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// [`Reason::Allowed`], [`Reason::Public`] (a `public` rule decided),
    /// [`Reason::DeniedByRule`], [`Reason::PolicyDenied`] or
    /// [`Reason::GroupsUnknown`].
    pub reason: Reason,
    /// The deciding rule: the allow or the deny that matched; for `groups-unknown`
    /// the first allow skipped for unknown groups; `None` for the default deny.
    pub rule: Option<Arc<RuleRef>>,
    /// A claim the (session's) identity did not keep, or the provider holds elsewhere,
    /// that decided: the deciding deny applied because it names it, or (default deny)
    /// an allow that names it was skipped. See [`Decision::detail`].
    pub claim_not_kept: Option<Arc<str>>,
    /// That claim was kept (a token's claims all are) but the provider holds it
    /// elsewhere (`_claim_names`, `hasgroups`): its value is not in the token.
    pub claim_held_elsewhere: bool,
}

// === impl Catalog ===

impl Catalog {
    /// Adds an issuer as compiled (replacing one of the same name).
    pub fn insert(&mut self, settings: IssuerSettings) {
        self.issuers.insert(settings.id.to_string(), settings);
    }

    /// Declares `name` with `preset` and every other setting at its default
    /// ([`IssuerSettings::declared`]): an issuer whose section did not compile, so that
    /// its policies are still checked, or a unit test's.
    pub fn declare(&mut self, name: &str, preset: Preset) {
        self.insert(IssuerSettings::declared(name, preset));
    }

    /// The settings of issuer `name`.
    pub fn settings(&self, name: &str) -> Option<&IssuerSettings> {
        self.issuers.get(name)
    }

    /// The preset of issuer `name`.
    pub fn preset(&self, name: &str) -> Option<Preset> {
        self.settings(name).map(|s| s.preset)
    }

    /// Every issuer's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.issuers.keys().map(String::as_str)
    }
}

// === impl Policy ===

impl Policy {
    /// Reads and compiles a policy file.
    pub fn load(path: &Path, catalog: &Catalog) -> Result<Policy, Diagnostics> {
        let source = Source::read(path).map_err(|d| {
            let mut diags = Diagnostics::default();
            diags.push(d);
            diags
        })?;
        Self::parse(&source, catalog)
    }

    /// Compiles policy text (tests, `policy diff` of git revisions). Fails with every
    /// error at once: syntax, shape, meaning and error-level lints.
    pub fn parse(source: &Source, catalog: &Catalog) -> Result<Policy, Diagnostics> {
        let mut diags = Diagnostics::default();
        let doc = raw::parse(source, &mut diags);
        let mut compiler = compile::Compiler::new(source, catalog);
        let rules = compiler.rules(&doc.rules);
        let ids: Vec<&str> = doc
            .rules
            .iter()
            .filter_map(|r| r.get_ref().id.as_ref())
            .map(|i| i.get_ref().as_str())
            .collect();
        let tests = compiler.tests(&doc.tests, Some(&ids));
        diags.extend(compiler.diags);

        let mut warnings = Vec::new();
        for l in lint::lint_rules(&source.path, &rules, catalog) {
            match l.severity {
                Severity::Error => diags.push(l.diagnostic),
                Severity::Warning => warnings.push(l.into_labelled()),
            }
        }
        if !diags.is_empty() {
            return Err(diags);
        }
        let name =
            source.path.file_stem().map_or_else(|| "policy".into(), |s| s.to_string_lossy().into());
        let sha256 = crate::util::sha256(source.text.as_bytes());
        Ok(Policy { name, file: source.path.clone(), sha256, rules, tests, warnings })
    }

    /// Compiles a file of `[[test]]` cases kept apart from the policy (a security
    /// team's own expectations) against `policy`: `rule = ...` must name one of its
    /// rules (unless `any_rule`: then a test naming a rule the policy no longer has
    /// compiles, and fails when run), and the file may hold no `[[rule]]` of its own.
    pub fn parse_tests(
        &self,
        source: &Source,
        catalog: &Catalog,
        any_rule: bool,
    ) -> Result<Vec<TestCase>, Diagnostics> {
        let mut diags = Diagnostics::default();
        let doc = raw::parse(source, &mut diags);
        for r in &doc.rules {
            diags.push(source.error(
                Some(r.span()),
                format!(
                    "a test file holds only `[[test]]`; rules belong in the policy `{}`",
                    self.file.display()
                ),
            ));
        }
        let ids: Vec<&str> = self.rules.iter().map(Rule::id).collect();
        let mut compiler = compile::Compiler::new(source, catalog);
        let tests = compiler.tests(&doc.tests, (!any_rule).then_some(&ids[..]));
        diags.extend(compiler.diags);
        if diags.is_empty() {
            Ok(tests)
        } else {
            Err(diags)
        }
    }

    /// The decision for one request. The hot path: no allocation beyond an `Arc` clone.
    pub fn evaluate(&self, identity: &Identity, request: &RequestFacts<'_>) -> Decision {
        self.decide(Some(identity), request)
    }

    /// Whether any rule is `public = true` (else no anonymous request is evaluated).
    pub fn has_public_rules(&self) -> bool {
        self.rules.iter().any(Rule::is_public)
    }

    /// [`Policy::evaluate`] for a caller or, with `None`, for a request that carries no
    /// credential at all: only a `public` allow can admit it, and any deny whose request
    /// conditions hold refuses it (whatever its identity conditions: nothing shows the
    /// caller is not the one it names).
    pub fn decide(&self, identity: Option<&Identity>, request: &RequestFacts<'_>) -> Decision {
        // Deny wins: any matching deny decides, wherever it is in the file. One that
        // applies only because the session did not keep a claim it names (fail closed)
        // decides unless another deny matches outright (which says more).
        let mut closed: Option<(&Rule, usize)> = None;
        for rule in self.rules.iter().filter(|r| r.effect == Effect::Deny) {
            match rule.outcome(identity, request) {
                Outcome::Matched => return Decision::new(false, Reason::DeniedByRule, Some(rule)),
                Outcome::ClaimNotKept(i) => {
                    closed.get_or_insert((rule, i));
                }
                Outcome::Failed(_) | Outcome::GroupsUnknown => {}
            }
        }
        if let Some((rule, i)) = closed {
            return Decision::new(false, Reason::DeniedByRule, Some(rule))
                .with_claim_not_kept(rule, i, identity);
        }
        let mut skipped: Option<&Rule> = None;
        let mut claim_skipped: Option<(&Rule, usize)> = None;
        for rule in self.rules.iter().filter(|r| r.effect == Effect::Allow) {
            match rule.outcome(identity, request) {
                // A public rule's decision says so: the audit event tells it apart.
                Outcome::Matched if rule.public => {
                    return Decision::new(true, Reason::Public, Some(rule))
                }
                Outcome::Matched => return Decision::new(true, Reason::Allowed, Some(rule)),
                Outcome::GroupsUnknown => {
                    skipped.get_or_insert(rule);
                }
                Outcome::ClaimNotKept(i) => {
                    claim_skipped.get_or_insert((rule, i));
                }
                Outcome::Failed(_) => {}
            }
        }
        match (skipped, claim_skipped) {
            (Some(rule), _) => Decision::new(false, Reason::GroupsUnknown, Some(rule)),
            (None, Some((rule, i))) => Decision::new(false, Reason::PolicyDenied, None)
                .with_claim_not_kept(rule, i, identity),
            (None, None) => Decision::new(false, Reason::PolicyDenied, None),
        }
    }

    /// The file's stem (`deploy-api` for `policies/deploy-api.toml`).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn file(&self) -> &Path {
        &self.file
    }
    pub(crate) fn file_arc(&self) -> &Arc<Path> {
        &self.file
    }
    /// Rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    /// `[[test]]` cases in file order.
    pub fn tests(&self) -> &[TestCase] {
        &self.tests
    }
    /// Lint warnings (errors fail the load), messages prefixed with `warning: `.
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }
    /// SHA-256 of the source text as it was read.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
    /// SHA-256 of the source text, lower-case hex: identifies the revision in logs.
    pub fn content_hash(&self) -> String {
        self.sha256.iter().fold(String::with_capacity(64), |mut s, b| {
            use fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

// === impl RequestFacts ===

impl<'a> RequestFacts<'a> {
    pub fn http(method: &'a http::Method, path: &'a str) -> Self {
        Self { method, path, database: None, role: None }
    }

    /// A PostgreSQL session request.
    pub fn database(database: &'a str, role: Option<&'a str>) -> Self {
        static UNUSED: http::Method = http::Method::CONNECT;
        Self { method: &UNUSED, path: "", database: Some(database), role }
    }

    /// Whether this is a database session rather than an HTTP request.
    pub fn is_database(&self) -> bool {
        self.database.is_some() || self.role.is_some()
    }
}

// === impl Decision ===

impl Decision {
    /// A CORS preflight forwarded on a `cors_preflight = true` route: allowed, no
    /// rule, the policy not consulted.
    pub fn cors_preflight() -> Self {
        Decision {
            allowed: true,
            reason: Reason::CorsPreflight,
            rule: None,
            claim_not_kept: None,
            claim_held_elsewhere: false,
        }
    }

    fn new(allowed: bool, reason: Reason, rule: Option<&Rule>) -> Self {
        Decision {
            allowed,
            reason,
            rule: rule.map(|r| r.rule_ref.clone()),
            claim_not_kept: None,
            claim_held_elsewhere: false,
        }
    }

    /// Names the claim of condition `index` of `rule` as unknown to `identity`: not
    /// kept by its session, or held elsewhere by the provider.
    fn with_claim_not_kept(
        mut self,
        rule: &Rule,
        index: usize,
        identity: Option<&Identity>,
    ) -> Self {
        self.claim_not_kept = rule.condition(index).and_then(|c| c.claim_name()).cloned();
        self.claim_held_elsewhere = match (&self.claim_not_kept, identity) {
            (Some(c), Some(id)) => id.claims.is_kept(c) && id.claims.held_elsewhere(c),
            _ => false,
        };
        self
    }

    /// Why a request was denied, for the audit `detail`: `denied by policy`, or what a
    /// claim the session did not keep did to the decision.
    pub fn detail(&self) -> std::borrow::Cow<'static, str> {
        match (&self.claim_not_kept, self.reason) {
            (Some(c), Reason::DeniedByRule) if self.claim_held_elsewhere => format!(
                "claim `{c}` is held elsewhere by the provider (`_claim_names`, `hasgroups`), so its value is unknown: deny applies"
            )
            .into(),
            (Some(c), _) if self.claim_held_elsewhere => format!(
                "claim `{c}` is held elsewhere by the provider (`_claim_names`, `hasgroups`), so its value is unknown: an allow naming it cannot match"
            )
            .into(),
            (Some(c), Reason::DeniedByRule) => {
                format!("claim `{c}` not kept by the session: deny applies; sign in again").into()
            }
            (Some(c), _) => format!(
                "claim `{c}` not kept by the session: an allow naming it cannot match; sign in again"
            )
            .into(),
            (None, _) => "denied by policy".into(),
        }
    }
}

impl Serialize for Decision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct(
            "Decision",
            3 + usize::from(self.claim_not_kept.is_some()) + usize::from(self.claim_held_elsewhere),
        )?;
        st.serialize_field("allowed", &self.allowed)?;
        st.serialize_field("reason", self.reason.code())?;
        st.serialize_field("rule", &self.rule)?;
        if let Some(c) = &self.claim_not_kept {
            st.serialize_field("claim_not_kept", &**c)?;
        }
        if self.claim_held_elsewhere {
            st.serialize_field("claim_held_elsewhere", &true)?;
        }
        st.end()
    }
}

#[cfg(test)]
mod tests;
