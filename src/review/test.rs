//! `portcullis policy test -c FILE [--tests DIR]...`: every `[[test]]` case of every
//! policy the configuration names, plus extra test files kept apart from the policies.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::json;

use super::snapshot::{Snapshot, Tree};
use super::{Format, Report, EXIT_FAILED, EXIT_OK};
use crate::config::{Config, LoadMode};
use crate::policy::{run_cases_with, TestOutcome};

#[derive(Debug, Clone)]
pub struct TestArgs {
    pub config: PathBuf,
    /// Directories of extra test files (`NAME.toml` tests the policy or route `NAME`).
    pub tests: Vec<PathBuf>,
    pub format: Format,
    /// Also list the cases that passed.
    pub verbose: bool,
}

pub fn run(args: &TestArgs) -> Report {
    let config = match Config::load_with(&args.config, LoadMode::PolicyOnly) {
        Ok(c) => c,
        Err(e) => {
            let p: Vec<String> = e.0.iter().map(ToString::to_string).collect();
            return Report::bad_input(args.format, &p);
        }
    };
    let snapshot = Snapshot::from_config(&config);
    let sets = match snapshot.test_sets(&Tree::disk(""), &args.tests, false) {
        Ok(s) => s,
        Err(p) => return Report::bad_input(args.format, &p),
    };
    // An anonymous `OPTIONS` case on a `cors_preflight` route is the preflight the
    // proxy forwards without consulting the policy (`policy::decide_case`).
    let outcomes: Vec<TestOutcome> = sets
        .iter()
        .flat_map(|s| {
            let preflight = |path: &str| snapshot.forwards_preflight(&s.policy, path);
            run_cases_with(&s.policy, &s.file, &s.cases, &preflight)
        })
        .collect();
    render(&outcomes, sets.len(), args)
}

fn render(outcomes: &[TestOutcome], files: usize, args: &TestArgs) -> Report {
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    let passed = outcomes.len() - failed;
    let code = if failed == 0 { EXIT_OK } else { EXIT_FAILED };
    let mut out = String::new();
    match args.format {
        Format::Json => {
            let results: Vec<_> = outcomes
                .iter()
                .map(|o| {
                    json!({
                        "name": o.name,
                        "file": o.file,
                        "line": o.line,
                        "passed": o.passed(),
                        "decision": o.decision,
                        "failure": o.failure,
                    })
                })
                .collect();
            out = super::json(&json!({
                "ok": failed == 0,
                "passed": passed,
                "failed": failed,
                "results": results,
            }));
        }
        Format::Text | Format::Markdown => {
            for o in outcomes.iter().filter(|o| args.verbose || !o.passed()) {
                let _ = writeln!(out, "{o}");
            }
            let _ = writeln!(
                out,
                "{}: {passed} passed, {failed} failed ({} test file(s))",
                if failed == 0 { "ok" } else { "FAILED" },
                files
            );
        }
    }
    Report::new(code, out)
}
