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
    /// A rule whose other conditions held and which names a claim the session did not
    /// keep: a deny applies (fail closed), an allow is skipped.
    ClaimNotKept {
        condition: String,
        line: u32,
        col: u32,
    },
}

impl Policy {
    /// Evaluates every rule (no short-circuit) and reports each one.
    pub fn explain(&self, identity: &Identity, request: &RequestFacts<'_>) -> Explanation {
        let rules = self
            .rules()
            .iter()
            .map(|rule| {
                let outcome = match rule.outcome(identity, request) {
                    Outcome::Matched => TraceOutcome::Matched,
                    Outcome::GroupsUnknown => TraceOutcome::GroupsUnknown,
                    Outcome::ClaimNotKept(i) => {
                        let c = rule.condition(i);
                        TraceOutcome::ClaimNotKept {
                            condition: c.map_or_else(String::new, |c| c.label().to_string()),
                            line: c.map_or(rule.line(), |c| c.loc().line),
                            col: c.map_or(1, |c| c.loc().col),
                        }
                    }
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
        Explanation { decision: self.evaluate(identity, request), rules }
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
                TraceOutcome::ClaimNotKept { condition, line, col } => {
                    let claim = condition.strip_prefix("claims.").unwrap_or(condition);
                    match t.effect {
                        Effect::Deny => writeln!(
                            f,
                            "matched: claim `{claim}` ({line}:{col}) not kept by the session: deny applies; sign in again"
                        )?,
                        Effect::Allow => writeln!(
                            f,
                            "skipped: claim `{claim}` ({line}:{col}) not kept by the session; sign in again"
                        )?,
                    }
                }
                TraceOutcome::NotMatched { line, col, expected, actual, .. } => {
                    writeln!(f, "no match at {line}:{col}: {expected}, got {actual}")?
                }
            }
        }
        Ok(())
    }
}
