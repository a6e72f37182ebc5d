//! Per-route policies: TOML files compiled once at load into typed rules, evaluated per
//! request into a [`Decision`] that names the deciding rule and its `file:line`.
//!
//! Work in progress: this skeleton fixes the public shape so other modules can build.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::diag::{Diagnostic, Diagnostics, Source};
use crate::identity::{Identity, Preset};
use crate::reason::Reason;

/// The issuers a configuration declares (`[issuers.NAME]`) and their presets.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub issuers: BTreeMap<String, Preset>,
}

/// A compiled policy file.
#[derive(Debug)]
pub struct Policy {
    file: Arc<Path>,
    warnings: Vec<Diagnostic>,
}

/// What the proxy knows about the request being authorized.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub database: Option<&'a str>,
    pub role: Option<&'a str>,
}

/// Where a rule lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    pub id: Arc<str>,
    pub file: Arc<Path>,
    pub line: u32,
}

/// The outcome of evaluating a policy.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    pub rule: Option<Arc<RuleRef>>,
}

impl Policy {
    pub fn load(path: &Path, catalog: &Catalog) -> Result<Policy, Diagnostics> {
        let source = Source::read(path).map_err(|d| {
            let mut ds = Diagnostics::default();
            ds.push(d);
            ds
        })?;
        Self::parse(&source, catalog)
    }

    pub fn parse(source: &Source, _catalog: &Catalog) -> Result<Policy, Diagnostics> {
        Ok(Policy { file: source.path.clone(), warnings: Vec::new() })
    }

    pub fn evaluate(&self, _identity: &Identity, _request: &RequestFacts<'_>) -> Decision {
        Decision { allowed: false, reason: Reason::PolicyDenied, rule: None }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }
}
