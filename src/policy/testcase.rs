//! `[[test]]` cases: example callers with the expected decision, run by
//! `portcullis policy test` and `portcullis check`, and before a version serves
//! ([`crate::config::Config::failing_policy_tests`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use http::Method;

use super::rule::Effect;
use super::{Decision, Policy, RequestFacts};
use crate::identity::Identity;

/// A compiled `[[test]]`.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    /// Line of the `[[test]]` header.
    pub line: u32,
    /// `None`: a request without any credential (`identity = "anonymous"`).
    pub identity: Option<Identity>,
    pub request: TestRequest,
    pub expect: Effect,
    /// The rule expected to decide, if the test names one.
    pub rule: Option<String>,
}

/// The request of a test case.
#[derive(Debug, Clone)]
pub enum TestRequest {
    Http { method: Method, path: String },
    Database { database: String, role: Option<String> },
}

/// The result of one test case.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub name: String,
    pub file: Arc<Path>,
    pub line: u32,
    pub decision: Decision,
    /// `None` when the test passed; otherwise what went wrong.
    pub failure: Option<String>,
}

// === impl TestRequest ===

/// Database requests carry no HTTP method; this one fills the field and is never
/// compared, because HTTP conditions do not match database requests.
static DATABASE_METHOD: Method = Method::CONNECT;

impl TestRequest {
    pub fn facts(&self) -> RequestFacts<'_> {
        match self {
            TestRequest::Http { method, path } => {
                RequestFacts { method, path, database: None, role: None }
            }
            TestRequest::Database { database, role } => RequestFacts {
                method: &DATABASE_METHOD,
                path: "",
                database: Some(database),
                role: role.as_deref(),
            },
        }
    }
}

impl fmt::Display for TestRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestRequest::Http { method, path } => write!(f, "{method} {path}"),
            TestRequest::Database { database, role: Some(role) } => {
                write!(f, "database {database:?} as role {role:?}")
            }
            TestRequest::Database { database, role: None } => write!(f, "database {database:?}"),
        }
    }
}

// === impl TestOutcome ===

impl TestOutcome {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }

    /// `file:line: test failed: name: why`, as `check`, `serve` and a refused reload
    /// report a failing case.
    pub fn failure_report(&self) -> String {
        format!(
            "{}:{}: test failed: {}: {}",
            self.file.display(),
            self.line,
            self.name,
            self.failure.as_deref().unwrap_or("")
        )
    }
}

impl fmt::Display for TestOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = format!("{}:{}", self.file.display(), self.line);
        match &self.failure {
            None => write!(f, "{at}: ok: {}", self.name),
            Some(why) => write!(f, "{at}: FAILED: {}: {why}", self.name),
        }
    }
}

/// Runs every `[[test]]` of a policy, in file order.
pub fn run_tests(policy: &Policy) -> Vec<TestOutcome> {
    run_cases(policy, policy.file_arc(), policy.tests())
}

/// Runs `cases`, written in `file`, against `policy` (a separate test file, or the
/// tests of another revision in `policy diff`).
pub fn run_cases(policy: &Policy, file: &Arc<Path>, cases: &[TestCase]) -> Vec<TestOutcome> {
    run_cases_with(policy, file, cases, &|_| false)
}

/// [`run_cases`] where `preflight(path)` says whether a route using the policy
/// forwards a CORS preflight to `path` without consulting it (`cors_preflight = true`):
/// there an anonymous `OPTIONS` case is taken as that preflight ([`decide_case`]).
pub fn run_cases_with(
    policy: &Policy,
    file: &Arc<Path>,
    cases: &[TestCase],
    preflight: &dyn Fn(&str) -> bool,
) -> Vec<TestOutcome> {
    cases
        .iter()
        .map(|t| {
            let decision = decide_case(policy, t, preflight);
            let got = if decision.allowed { Effect::Allow } else { Effect::Deny };
            let by = match &decision.rule {
                Some(r) => format!("rule `{}` ({}:{})", r.id, r.file.display(), r.line),
                None => "no rule".to_string(),
            };
            let failure = if got != t.expect {
                Some(format!(
                    "expected {}, got {} ({}) by {by} for {}",
                    effect_name(t.expect),
                    effect_name(got),
                    decision.reason,
                    t.request
                ))
            } else {
                match &t.rule {
                    Some(want)
                        if decision.rule.as_ref().is_none_or(|r| &*r.id != want.as_str()) =>
                    {
                        Some(format!(
                            "expected rule `{want}` to decide, but {} was decided by {by}",
                            effect_name(got)
                        ))
                    }
                    _ => None,
                }
            };
            TestOutcome {
                name: t.name.clone(),
                file: file.clone(),
                line: t.line,
                decision,
                failure,
            }
        })
        .collect()
}

/// The decision for one case. A test carries no headers, so an anonymous `OPTIONS`
/// case on a path where `preflight(path)` holds (a `cors_preflight = true` route) is
/// taken as the CORS preflight a browser sends (`Origin`, `Access-Control-Request-Method`,
/// no credential): forwarded without consulting the policy, `allow` (`cors-preflight`),
/// no rule. Every other case is decided by the policy.
pub fn decide_case(policy: &Policy, case: &TestCase, preflight: &dyn Fn(&str) -> bool) -> Decision {
    if case.identity.is_none() {
        if let TestRequest::Http { method, path } = &case.request {
            if *method == Method::OPTIONS && preflight(path) {
                return Decision::cors_preflight();
            }
        }
    }
    policy.decide(case.identity.as_ref(), &case.request.facts())
}

fn effect_name(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
    }
}
