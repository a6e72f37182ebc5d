//! `portcullis policy ...`: the commands a security reviewer runs against a policy
//! repository — `test`, `explain`, `who` and `diff` — as library functions that return
//! a [`Report`] (what to print and the exit code), so `main.rs` stays a thin shell and
//! tests can call them directly.
//!
//! Exit codes, for every command: `0` fine, `1` a test or expectation failed, `2` bad
//! input (a configuration, policy or test file with errors, an unknown route, a bad
//! request line, a git revision that does not exist).
//!
//! - [`snapshot`]: routes and compiled policies, from the working tree or a git revision.
//! - [`test`](mod@test): `policy test`, the `[[test]]` cases of every policy plus extra test files.
//! - [`explain`]: `policy explain`, one caller and one request, every rule's fate.
//! - [`who`]: `policy who`, who can reach a route, in words.
//! - [`diff`]: `policy diff`, access gained and lost between two git revisions.

use std::fmt::Write as _;
use std::str::FromStr;

pub mod diff;
pub mod explain;
mod git;
pub mod snapshot;
pub mod test;
pub mod who;

#[cfg(test)]
mod tests;

/// Exit code: everything as expected.
pub const EXIT_OK: u8 = 0;
/// Exit code: a test or expectation failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad input.
pub const EXIT_BAD_INPUT: u8 = 2;

/// Output format: text for people, JSON for tools, Markdown for pull-request comments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "markdown" | "md" => Ok(Format::Markdown),
            other => Err(format!("unknown format `{other}` (text, json, markdown)")),
        }
    }
}

/// What a command prints, and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

impl Report {
    pub fn new(code: u8, stdout: String) -> Self {
        Report { code, stdout, stderr: String::new() }
    }

    /// Bad input: every problem on stderr (and, for JSON, a document on stdout so a
    /// tool always has something to parse).
    pub fn bad_input(format: Format, problems: &[String]) -> Self {
        let mut stderr = String::new();
        for p in problems {
            let _ = writeln!(stderr, "{p}");
        }
        let stdout = match format {
            Format::Json => {
                let v = serde_json::json!({ "ok": false, "errors": problems });
                format!("{v}\n")
            }
            Format::Text | Format::Markdown => String::new(),
        };
        Report { code: EXIT_BAD_INPUT, stdout, stderr }
    }
}

/// Text from the files in a report, in printable ASCII: every other character (a
/// control such as an ANSI escape or a line break, an invisible or bidirectional one, a
/// letter from another script that looks like a Latin one) as the TOML escape that
/// spells it (`\u001B`, `\u043E`).
pub(crate) fn shown(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() && !c.is_ascii_control() {
            o.push(c);
        } else {
            let _ = match u32::from(c) {
                n @ 0..=0xffff => write!(o, "\\u{n:04X}"),
                n => write!(o, "\\U{n:08X}"),
            };
        }
    }
    o
}

/// `serde_json` pretty output with a trailing newline.
fn json(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}
