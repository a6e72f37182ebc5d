//! Raw policy file types: what the TOML says, with spans, before any meaning is given
//! to it. [`parse`] reports every problem it can find at once: all syntax errors, every
//! unknown key (with a suggestion), and one shape error per `[[rule]]`/`[[test]]`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::diag::{Diagnostics, Source};

/// One `[[rule]]`. Required keys are `Option` so their absence is reported by the
/// compiler next to every other problem, not as the first serde error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: Option<Spanned<String>>,
    pub effect: Option<Spanned<String>>,
    pub description: Option<Spanned<String>>,
    /// `public = true`: an allow that admits callers without any credential, on its
    /// `methods` and `paths` alone.
    pub public: Option<Spanned<bool>>,
    pub issuer: Option<Spanned<OneOrMany>>,
    pub subject: Option<Spanned<OneOrMany>>,
    pub email: Option<Spanned<OneOrMany>>,
    pub email_domain: Option<Spanned<OneOrMany>>,
    pub groups_any: Option<Spanned<OneOrMany>>,
    pub groups_all: Option<Spanned<OneOrMany>>,
    pub claims: Option<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
    pub ci: Option<Spanned<BTreeMap<Spanned<String>, Spanned<OneOrMany>>>>,
    pub methods: Option<Spanned<OneOrMany>>,
    pub paths: Option<Spanned<OneOrMany>>,
    pub databases: Option<Spanned<OneOrMany>>,
    pub roles: Option<Spanned<OneOrMany>>,
    pub upstream_role: Option<Spanned<String>>,
}

/// Every key a `[[rule]]` may have, in documentation order.
pub const RULE_KEYS: &[&str] = &[
    "id",
    "effect",
    "description",
    "public",
    "issuer",
    "subject",
    "email",
    "email_domain",
    "groups_any",
    "groups_all",
    "claims",
    "ci",
    "methods",
    "paths",
    "databases",
    "roles",
    "upstream_role",
];

/// One `[[test]]`: an identity, a request and the expected outcome.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Test {
    pub name: Option<Spanned<String>>,
    pub identity: Option<Spanned<TestCaller>>,
    pub request: Option<Spanned<String>>,
    pub database: Option<Spanned<String>>,
    pub role: Option<Spanned<String>>,
    pub expect: Option<Spanned<String>>,
    pub rule: Option<Spanned<String>>,
}

pub const TEST_KEYS: &[&str] =
    &["name", "identity", "request", "database", "role", "expect", "rule"];

/// The caller of a `[[test]]`: built as the verifier would build it from these claims.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestIdentity {
    pub issuer: Option<Spanned<String>>,
    pub preset: Option<Spanned<String>>,
    pub subject: Option<Spanned<String>>,
    pub email: Option<Spanned<String>>,
    pub email_verified: Option<Spanned<bool>>,
    pub groups: Option<Spanned<Vec<Spanned<String>>>>,
    pub groups_known: Option<Spanned<bool>>,
    pub claims: Option<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
}

pub const TEST_IDENTITY_KEYS: &[&str] =
    &["issuer", "preset", "subject", "email", "email_verified", "groups", "groups_known", "claims"];

/// A test's `identity`: a table of claims, or the string `"anonymous"` for a request
/// without any credential (what a `public` rule is for).
#[derive(Debug)]
pub enum TestCaller {
    /// A string: only `"anonymous"` compiles.
    Named(String),
    Identity(Box<TestIdentity>),
}

/// A string or a list of strings (`issuer = "a"` or `issuer = ["a", "b"]`).
#[derive(Debug)]
pub enum OneOrMany {
    One(String),
    Many(Vec<Spanned<String>>),
}

/// The whole file: rules and tests in file order.
#[derive(Debug, Default)]
pub struct Document {
    pub rules: Vec<Spanned<Rule>>,
    pub tests: Vec<Spanned<Test>>,
}

// === impl OneOrMany ===

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for TestCaller {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TestCaller;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of claims, or \"anonymous\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TestCaller, E> {
                Ok(TestCaller::Named(v.to_owned()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<TestCaller, A::Error> {
                // The table's own errors (a key of the wrong type) keep their message.
                TestIdentity::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|i| TestCaller::Identity(Box::new(i)))
            }
        }
        d.deserialize_any(V)
    }
}

impl OneOrMany {
    /// Every string with its own span; a lone string takes the span of the whole value.
    pub fn items(this: &Spanned<OneOrMany>) -> Vec<(&str, std::ops::Range<usize>)> {
        match this.get_ref() {
            OneOrMany::One(s) => vec![(s.as_str(), this.span())],
            OneOrMany::Many(v) => v.iter().map(|s| (s.get_ref().as_str(), s.span())).collect(),
        }
    }
}

// === parsing ===

/// Parses a policy file into raw types, pushing every problem into `diags`.
pub fn parse(source: &Source, diags: &mut Diagnostics) -> Document {
    let (root, errors) = DeTable::parse_recoverable(&source.text);
    if !errors.is_empty() {
        // After a syntax error the recovered tree is a guess; shape errors found in it
        // would be noise, so report only the syntax errors.
        for d in source.toml_errors(&errors) {
            diags.push(d);
        }
        return Document::default();
    }
    let mut doc = Document::default();
    for (key, value) in root.into_inner() {
        let name = key.get_ref().as_ref();
        let is_rule = match name {
            "rule" => true,
            "test" => false,
            other => {
                let hint = suggest(other, &["rule", "test"])
                    .map_or_else(String::new, |s| format!("; did you mean `[[{s}]]`?"));
                diags.push(source.error(
                    Some(key.span()),
                    format!("unknown key `{other}`: a policy file holds `[[rule]]` and `[[test]]` tables{hint}"),
                ));
                continue;
            }
        };
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            diags.push(source.error(
                Some(key.span()),
                format!("`{name}` must be an array of tables: write `[[{name}]]`"),
            ));
            continue;
        };
        for item in items {
            let item_span = item.span();
            let mut item = item;
            let DeValue::Table(table) = item.get_mut() else {
                diags.push(
                    source.error(Some(span.clone()), format!("each `{name}` must be a table")),
                );
                continue;
            };
            if is_rule {
                strip_unknown_keys(source, table, RULE_KEYS, "rule", diags);
                match Spanned::<Rule>::deserialize(ValueDeserializer::from(item)) {
                    Ok(rule) => doc.rules.push(rule),
                    Err(e) => diags.push(with_fallback_span(source, &e, item_span)),
                }
            } else {
                strip_unknown_keys(source, table, TEST_KEYS, "test", diags);
                for (key, value) in table.iter_mut() {
                    if key.get_ref() == "identity" {
                        if let DeValue::Table(t) = value.get_mut() {
                            strip_unknown_keys(
                                source,
                                t,
                                TEST_IDENTITY_KEYS,
                                "test identity",
                                diags,
                            );
                        }
                    }
                }
                match Spanned::<Test>::deserialize(ValueDeserializer::from(item)) {
                    Ok(test) => doc.tests.push(test),
                    Err(e) => diags.push(with_fallback_span(source, &e, item_span)),
                }
            }
        }
    }
    doc
}

fn with_fallback_span(
    source: &Source,
    e: &toml::de::Error,
    span: std::ops::Range<usize>,
) -> crate::diag::Diagnostic {
    let span = e.span().unwrap_or(span);
    source.error(Some(span), e.message().trim().to_string())
}

/// Reports and removes keys outside `allowed`, so the serde pass can still report the
/// remaining problems of the same table.
fn strip_unknown_keys(
    source: &Source,
    table: &mut DeTable<'_>,
    allowed: &[&str],
    what: &str,
    diags: &mut Diagnostics,
) {
    // `Map::retain` hides the key's span, so rebuild the table instead.
    let mut kept = DeTable::default();
    for (key, value) in std::mem::take(table) {
        let k: &str = key.get_ref();
        if allowed.contains(&k) {
            kept.insert(key, value);
            continue;
        }
        let hint =
            suggest(k, allowed).map_or_else(String::new, |s| format!("; did you mean `{s}`?"));
        diags.push(source.error(Some(key.span()), format!("unknown key `{k}` in {what}{hint}")));
    }
    *table = kept;
}

/// The closest candidate, if it is close enough to be a plausible typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let folded = fold(word);
    if let Some(exact) = candidates.iter().find(|c| fold(c) == folded) {
        return Some(exact);
    }
    let close = candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    // `branchName` for `branch`, `repositoryUuid` for `repository`: the word extends a
    // candidate (the longest such, so `repository_id` wins over `repository`).
    close.or_else(|| {
        candidates
            .iter()
            .filter(|c| c.len() >= 3 && folded.starts_with(&fold(c)))
            .max_by_key(|c| c.len())
            .copied()
    })
}

/// Case and separator folding: `branch_name`, `branchName` and `BRANCH-NAME` agree.
fn fold(s: &str) -> String {
    s.chars().filter(|c| !matches!(c, '_' | '-')).flat_map(char::to_lowercase).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
