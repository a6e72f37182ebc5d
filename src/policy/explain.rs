//! `explain`: every rule of a policy against one request, with every condition that
//! failed. Off the hot path; allocates freely.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use super::rule::{Condition, Effect, Matcher, Outcome, Rule};
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
    NotMatched {
        /// The first condition that did not hold, in evaluation order (the one the
        /// proxy stops at), flattened into the outcome as earlier versions wrote it.
        #[serde(flatten)]
        first: FailedCondition,
        /// Every condition that did not hold, in file order: everything to change for
        /// the rule to match. Only the issuer when that differs (the rule is for
        /// other callers, and its other conditions say nothing about this one); the
        /// group conditions only when the token's groups are known.
        failed: Vec<FailedCondition>,
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
        /// Kept, but held elsewhere by the provider (`_claim_names`, `hasgroups`).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        held_elsewhere: bool,
    },
}

/// One condition that did not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedCondition {
    /// How the condition is written: `methods`, `ci.branch`.
    pub condition: String,
    pub line: u32,
    pub col: u32,
    /// The condition as written.
    pub expected: String,
    /// What the caller presented.
    pub actual: String,
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
                    Outcome::ClaimNotKept(i) => {
                        let c = rule.condition(i);
                        let held_elsewhere = match (c.and_then(|c| c.claim_name()), identity) {
                            (Some(name), Some(id)) => {
                                id.claims.is_kept(name) && id.claims.held_elsewhere(name)
                            }
                            _ => false,
                        };
                        TraceOutcome::ClaimNotKept {
                            condition: c.map_or_else(String::new, |c| c.label().to_string()),
                            line: c.map_or(rule.line(), |c| c.loc().line),
                            col: c.map_or(1, |c| c.loc().col),
                            held_elsewhere,
                        }
                    }
                    Outcome::Failed(i) => {
                        let failed = |c: &Condition| FailedCondition {
                            condition: c.label().to_string(),
                            line: c.loc().line,
                            col: c.loc().col,
                            expected: c.to_string(),
                            actual: c.actual(rule.effect(), identity, request),
                        };
                        let first = rule.condition(i).map_or_else(
                            || FailedCondition {
                                condition: String::new(),
                                line: rule.line(),
                                col: 1,
                                expected: String::new(),
                                actual: String::new(),
                            },
                            failed,
                        );
                        let mut all: Vec<FailedCondition> =
                            every_failed(rule, identity, request).into_iter().map(failed).collect();
                        if all.is_empty() {
                            all.push(first.clone());
                        }
                        TraceOutcome::NotMatched { first, failed: all }
                    }
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

/// Every condition of `rule` that does not hold for this caller and request, in file
/// order. An issuer that differs is the only one reported: the rule is written for
/// other callers. Group conditions are judged only when the groups are known.
fn every_failed<'r>(
    rule: &'r Rule,
    identity: Option<&Identity>,
    request: &RequestFacts<'_>,
) -> Vec<&'r Condition> {
    // As `Rule::outcome` judges them: without a credential, an identity condition fails
    // an allow and holds for a deny.
    let fails = |c: &&Condition| match identity {
        Some(id) => !c.matcher().matches(rule.effect(), id, request),
        None if c.matcher().is_request() => !c.matcher().matches_request(rule.effect(), request),
        None => rule.effect() != Effect::Deny,
    };
    if let Some(issuer) =
        rule.conditions.iter().find(|c| matches!(c.matcher(), Matcher::Issuer(_))).filter(fails)
    {
        return vec![issuer];
    }
    let groups = rule.groups.iter().filter(|_| identity.is_some_and(|id| id.groups_known));
    let mut failed: Vec<&Condition> = rule.conditions.iter().chain(groups).filter(fails).collect();
    failed.sort_by_key(|c| (c.loc().line, c.loc().col));
    failed
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
                TraceOutcome::ClaimNotKept { condition, line, col, held_elsewhere: true } => {
                    let claim = condition.strip_prefix("claims.").unwrap_or(condition);
                    let what = match t.effect {
                        Effect::Deny => "matched",
                        Effect::Allow => "skipped",
                    };
                    writeln!(
                        f,
                        "{what}: claim `{claim}` ({line}:{col}) is held elsewhere by the provider (`_claim_names`, `hasgroups`), so its value is unknown"
                    )?
                }
                TraceOutcome::ClaimNotKept { condition, line, col, held_elsewhere: false } => {
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
                TraceOutcome::NotMatched { failed, .. } => match failed.as_slice() {
                    [one] => writeln!(f, "no match at {one}")?,
                    several => {
                        writeln!(f, "no match on {} conditions:", several.len())?;
                        for c in several {
                            writeln!(f, "      at {c}")?;
                        }
                    }
                },
            }
        }
        Ok(())
    }
}

impl fmt::Display for FailedCondition {
    /// `42:63: ci.branch = ["main"], got "feature/x"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}, got {}", self.line, self.col, self.expected, self.actual)
    }
}
