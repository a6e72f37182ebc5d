//! `explain`: every rule of a policy against one request, with the first condition
//! that failed. Off the hot path; allocates freely.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use super::rule::{Effect, Outcome};
use super::{Decision, Policy, RequestFacts, RuleRef};
use crate::identity::Identity;

/// The decision and how every rule fared.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub decision: Decision,
    pub rules: Vec<RuleTrace>,
}

/// One rule's fate.
#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    pub rule: Arc<RuleRef>,
    pub effect: Effect,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub outcome: TraceOutcome,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum TraceOutcome {
    Matched,
    /// The first condition that did not hold.
    NotMatched {
        condition: String,
        line: u32,
        col: u32,
        /// The condition as written.
        expected: String,
        /// What the caller presented.
        actual: String,
    },
    /// An allow whose other conditions held, skipped because the token's group list
    /// is incomplete (overage).
    GroupsUnknown,
}

impl Policy {
    /// Evaluates every rule (no short-circuit) and reports each one.
    pub fn explain(&self, identity: &Identity, request: &RequestFacts<'_>) -> Explanation {
        self.explain_caller(Some(identity), request)
    }

    /// [`Policy::explain`] for a caller or, with `None`, for one without any credential.
    pub fn explain_caller(
        &self,
        identity: Option<&Identity>,
        request: &RequestFacts<'_>,
    ) -> Explanation {
        let rules = self
            .rules()
            .iter()
            .map(|rule| {
                let outcome = match rule.outcome(identity, request) {
                    Outcome::Matched => TraceOutcome::Matched,
                    Outcome::GroupsUnknown => TraceOutcome::GroupsUnknown,
                    Outcome::Failed(i) => match rule.condition(i) {
                        Some(c) => TraceOutcome::NotMatched {
                            condition: c.label().to_string(),
                            line: c.loc().line,
                            col: c.loc().col,
                            expected: c.to_string(),
                            actual: c.actual(rule.effect(), identity, request),
                        },
                        None => TraceOutcome::NotMatched {
                            condition: String::new(),
                            line: rule.line(),
                            col: 1,
                            expected: String::new(),
                            actual: String::new(),
                        },
                    },
                };
                RuleTrace {
                    rule: rule.rule_ref().clone(),
                    effect: rule.effect(),
                    description: rule.description().map(str::to_string),
                    outcome,
                }
            })
            .collect();
        Explanation { decision: self.decide(identity, request), rules }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        write!(f, "decision: {} ({})", if d.allowed { "allow" } else { "deny" }, d.reason)?;
        if let Some(r) = &d.rule {
            write!(f, " by rule `{}` at {}:{}", r.id, r.file.display(), r.line)?;
        }
        writeln!(f)?;
        for t in &self.rules {
            let effect = match t.effect {
                Effect::Allow => "allow",
                Effect::Deny => "deny ",
            };
            write!(f, "  {}:{}: {effect} `{}`: ", t.rule.file.display(), t.rule.line, t.rule.id)?;
            match &t.outcome {
                TraceOutcome::Matched => writeln!(f, "matched")?,
                TraceOutcome::GroupsUnknown => {
                    writeln!(f, "skipped: the token's groups are unknown (overage)")?
                }
                TraceOutcome::NotMatched { line, col, expected, actual, .. } => {
                    writeln!(f, "no match at {line}:{col}: {expected}, got {actual}")?
                }
            }
        }
        Ok(())
    }
}
