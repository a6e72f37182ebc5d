//! A policy of up to four rules drawn from the bytes (allow or deny, `public`, `methods`,
//! `paths`, `subject`; patterns of `/`, letters, `.`, `%25`, `*`, `**` and `?`), written
//! out as TOML and compiled by `Policy::parse`, against a request (a method, a path as
//! the proxy normalizes it) from a caller with a subject or without any credential.
//!
//! Property: the decision (allowed, reason, deciding rule) is the one a naive reference
//! written from the documented semantics reaches: deny wins (the first deny in file
//! order whose conditions hold; for a caller without a credential every identity
//! condition of a deny holds), then the first allow whose conditions hold (`public` ones
//! alone for a caller without a credential, reason `public`), else the default deny;
//! globs read by a character-by-character matcher (`*` within a segment, `**` across,
//! `?` one character but `/`), `GET` admitting `HEAD`, `/x/**` matching `/x`, and a
//! deny's path also matching with its trailing `/` removed (or, for a pattern ending in
//! `/`, added). `explain` reaches the same decision, and each rule's `admits_request`
//! agrees with the reference's request conditions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::diag::Source;
use portcullis::http::path::{check_pattern, normalize, Syntax};
use portcullis::identity::{Identity, IssuerId, Preset, PrincipalKind};
use portcullis::policy::{Catalog, Policy, RequestFacts};
use portcullis::reason::Reason;
use std::sync::Arc;

const METHODS: &[&str] = &["GET", "HEAD", "POST", "DELETE", "OPTIONS", "PUT"];
/// Pieces of path patterns and request paths (one byte each).
const PATH_PIECES: &[&str] = &["/", "a", "b", "*", "**", "?", ".", "%25", "/a", "/b/"];
/// Pieces of subjects and subject patterns.
const SUBJECT_PIECES: &[&str] = &["a", "b", "/", "*", "**", "?", ":"];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    /// Up to `max` pieces, their count the first byte.
    fn text(&mut self, pieces: &[&str], max: u8) -> String {
        let n = self.byte() % (max + 1);
        (0..n).map(|_| pieces[usize::from(self.byte()) % pieces.len()]).collect()
    }
}

#[derive(Debug)]
struct RefRule {
    id: String,
    deny: bool,
    public: bool,
    methods: Option<Vec<&'static str>>,
    paths: Option<Vec<String>>,
    subject: Option<Vec<String>>,
}

/// The reference glob: `*` within a segment, `**` across, `?` one character but `/`.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p {
            [] => t.is_empty(),
            ['*', '*', rest @ ..] => (0..=t.len()).any(|k| go(rest, &t[k..])),
            ['*', rest @ ..] => {
                (0..=t.len()).take_while(|&k| k == 0 || t[k - 1] != '/').any(|k| go(rest, &t[k..]))
            }
            ['?', rest @ ..] => t.first().is_some_and(|&c| c != '/') && go(rest, &t[1..]),
            [c, rest @ ..] => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

fn path_matches(pattern: &str, path: &str, deny: bool) -> bool {
    if glob(pattern, path) {
        return true;
    }
    // `/x/**` is also the directory `/x` itself.
    if pattern.ends_with("/**") && !path.ends_with('/') && glob(pattern, &format!("{path}/")) {
        return true;
    }
    if !deny {
        return false;
    }
    match path.strip_suffix('/') {
        Some(bare) => !bare.is_empty() && glob(pattern, bare),
        None => pattern.ends_with('/') && glob(pattern, &format!("{path}/")),
    }
}

impl RefRule {
    fn admits_request(&self, method: &str, path: &str) -> bool {
        let methods = self
            .methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|&m| m == method || (m == "GET" && method == "HEAD")));
        let paths = self
            .paths
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| path_matches(p, path, self.deny)));
        methods && paths
    }
    fn holds(&self, subject: Option<&str>, method: &str, path: &str) -> bool {
        if !self.admits_request(method, path) {
            return false;
        }
        match subject {
            // The issuer is always the caller's; the subject patterns read it.
            Some(s) => self.subject.as_ref().is_none_or(|g| g.iter().any(|g| glob(g, s))),
            // Without a credential: a deny's identity conditions all hold, an allow's
            // (its issuer) never; a public rule has none.
            None => self.deny || self.public,
        }
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let n = 1 + b.byte() % 4;
    let mut rules = Vec::new();
    for i in 0..n {
        let flags = b.byte();
        let deny = flags & 1 != 0;
        let public = !deny && flags & 2 != 0;
        let methods = (flags & 4 != 0 || public).then(|| {
            let mask = b.byte() % 63 + 1;
            METHODS
                .iter()
                .enumerate()
                .filter(|(j, _)| mask & (1 << j) != 0)
                .map(|(_, m)| *m)
                .collect()
        });
        let paths = (flags & 8 != 0 || public).then(|| {
            let k = 1 + b.byte() % 3;
            (0..k)
                .map(|_| format!("/{}", b.text(PATH_PIECES, 6)))
                .filter(|p| check_pattern(p, Syntax::Glob).is_ok())
                .collect::<Vec<_>>()
        });
        if paths.as_ref().is_some_and(Vec::is_empty) {
            continue;
        }
        let subject = (flags & 16 != 0 && !public).then(|| {
            let k = 1 + b.byte() % 2;
            (0..k).map(|_| b.text(SUBJECT_PIECES, 5)).filter(|s| !s.is_empty()).collect::<Vec<_>>()
        });
        if subject.as_ref().is_some_and(Vec::is_empty) {
            continue;
        }
        rules.push(RefRule { id: format!("r{i}"), deny, public, methods, paths, subject });
    }
    if rules.is_empty() {
        return;
    }
    let method = METHODS[usize::from(b.byte()) % METHODS.len()];
    let raw_path = format!("/{}", b.text(PATH_PIECES, 8));
    let Ok(path) = normalize(&raw_path) else { return };
    let subject = match b.byte() % 2 {
        0 => None,
        _ => Some(b.text(SUBJECT_PIECES, 6)),
    };

    let mut text = String::new();
    for r in &rules {
        text.push_str(&format!("[[rule]]\nid = {:?}\n", r.id));
        text.push_str(if r.deny { "effect = \"deny\"\n" } else { "effect = \"allow\"\n" });
        if r.public {
            text.push_str("public = true\n");
        } else {
            text.push_str("issuer = \"corp\"\n");
        }
        if let Some(m) = &r.methods {
            let m: Vec<String> = m.iter().map(|s| s.to_string()).collect();
            text.push_str(&format!("methods = {}\n", toml_list(&m)));
        }
        if let Some(p) = &r.paths {
            text.push_str(&format!("paths = {}\n", toml_list(p)));
        }
        if let Some(s) = &r.subject {
            text.push_str(&format!("subject = {}\n", toml_list(s)));
        }
        text.push('\n');
    }
    let mut catalog = Catalog::default();
    catalog.declare("corp", Preset::Oidc);
    // Some drawn policies are refused (a lint the compiler holds to, say): no property.
    let Ok(policy) = Policy::parse(&Source::new("fuzz.toml", text.clone()), &catalog) else {
        return;
    };

    let identity = subject.as_ref().map(|s| Identity {
        issuer: IssuerId(Arc::from("corp")),
        subject: s.clone(),
        kind: PrincipalKind::Human,
        email: None,
        email_verified: false,
        groups: Vec::new(),
        groups_known: true,
        expires_at: u64::MAX,
        issued_at: None,
        ci: None,
        claims: Default::default(),
        audit: Default::default(),
    });
    let Ok(m) = http::Method::from_bytes(method.as_bytes()) else { return };
    let facts = RequestFacts::http(&m, &path);
    let decision = policy.decide(identity.as_ref(), &facts);

    let s = subject.as_deref();
    let want = match rules.iter().find(|r| r.deny && r.holds(s, method, &path)) {
        Some(r) => (false, Reason::DeniedByRule, Some(r.id.as_str())),
        None => match rules.iter().find(|r| !r.deny && r.holds(s, method, &path)) {
            Some(r) if r.public => (true, Reason::Public, Some(r.id.as_str())),
            Some(r) => (true, Reason::Allowed, Some(r.id.as_str())),
            None => (false, Reason::PolicyDenied, None),
        },
    };
    let got = (decision.allowed, decision.reason, decision.rule.as_ref().map(|r| &*r.id));
    assert_eq!(got, want, "{method} {path:?} (sent {raw_path:?}) by {subject:?}\n{text}");

    let explained = policy.explain_caller(identity.as_ref(), &facts).decision;
    assert_eq!(explained, decision, "explain: {method} {path:?} by {subject:?}\n{text}");

    for (rule, r) in policy.rules().iter().zip(&rules) {
        assert_eq!(rule.id(), r.id);
        assert_eq!(
            rule.admits_request(&facts),
            r.admits_request(method, &path),
            "admits_request of {}: {method} {path:?}\n{text}",
            r.id
        );
    }
});
