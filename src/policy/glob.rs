//! Glob patterns for policy values: compiled once, matched without allocation.
//!
//! - `*` matches any run of characters except `/` (possibly empty);
//! - `**` matches any run of characters, `/` included (possibly empty);
//! - `?` matches exactly one character except `/`;
//! - every other character matches itself, case-sensitively
//!   ([`Glob::matches_ignoring_ascii_case`] folds ASCII letters, for names the platform
//!   compares without case).
//!
//! Three or more stars in a row, an empty pattern and control characters are
//! rejected: they are typos far more often than intent.

use std::fmt;

/// A compiled glob pattern. See the module docs for the syntax.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: Box<str>,
    kind: Kind,
}

/// Why a pattern was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("empty pattern")]
    Empty,
    #[error("`***` is not a pattern: use `*` (one path segment) or `**` (any depth)")]
    TooManyStars,
    #[error("control, invisible, bidirectional-override or non-ASCII space character in pattern")]
    ControlCharacter,
}

/// Characters that show as nothing, as a plain space, or reorder what follows (Trojan
/// Source): a policy value holding one reads in review as something it is not
/// (`/аdmin\u{200b}/**`), and an audit event as something it is not (the audit log
/// writes them as `\uXXXX` escapes). The whole Unicode `Default_Ignorable_Code_Point`
/// set, C0 and C1 controls and DEL, the line and paragraph separators, the non-ASCII
/// space separators, and the blank Braille pattern (U+2800).
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            // Default_Ignorable_Code_Point (Unicode 15.1 DerivedCoreProperties.txt).
            '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}'
            | '\u{17b5}' | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}' | '\u{feff}' | '\u{ffa0}' | '\u{fff0}'..='\u{fff8}'
            | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e0fff}'
            // Interlinear annotation characters (not ignorable, but they hide text).
            | '\u{fff9}'..='\u{fffb}'
            // Line and paragraph separators.
            | '\u{2028}' | '\u{2029}'
            // Space separators other than the ASCII space, and the blank Braille pattern.
            | '\u{00a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}'
            | '\u{3000}' | '\u{2800}')
}

/// One character of each range [`is_hidden`] covers, both ends of most (tests).
#[cfg(test)]
pub(crate) const HIDDEN_SAMPLES: &[char] = &[
    '\u{1}',
    '\u{7f}',
    '\u{85}',
    '\u{9f}',
    '\u{00ad}',
    '\u{034f}',
    '\u{061c}',
    '\u{115f}',
    '\u{1160}',
    '\u{17b4}',
    '\u{17b5}',
    '\u{180b}',
    '\u{180f}',
    '\u{200b}',
    '\u{200f}',
    '\u{202a}',
    '\u{202e}',
    '\u{2060}',
    '\u{206f}',
    '\u{3164}',
    '\u{fe00}',
    '\u{fe0f}',
    '\u{feff}',
    '\u{ffa0}',
    '\u{fff0}',
    '\u{fff8}',
    '\u{fffb}',
    '\u{1bca0}',
    '\u{1bca3}',
    '\u{1d173}',
    '\u{1d17a}',
    '\u{e0000}',
    '\u{e0041}',
    '\u{e0fff}',
    '\u{2028}',
    '\u{2029}',
    '\u{00a0}',
    '\u{1680}',
    '\u{2000}',
    '\u{2005}',
    '\u{200a}',
    '\u{202f}',
    '\u{205f}',
    '\u{3000}',
    '\u{2800}',
];

/// Shapes worth a fast path: most policy values are literals or `prefix**`.
#[derive(Clone, PartialEq, Eq)]
enum Kind {
    Literal,
    /// `prefix**`: everything that starts with the prefix.
    Prefix(Box<str>),
    General(Box<[Token]>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(Box<str>),
    /// `*`: does not cross `/`.
    Star,
    /// `**`: crosses `/`.
    DoubleStar,
    /// `?`: one character, not `/`.
    Question,
}

/// Result of matching a token suffix; the two abort values prune the search the way
/// git's wildmatch does, which keeps backtracking polynomial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Match,
    NoMatch,
    /// The text ran out: no later start position can match either.
    AbortAll,
    /// A `*` hit a `/`: only an enclosing `**` may still succeed.
    AbortToDoubleStar,
}

// === impl Glob ===

impl Glob {
    /// Compiles a pattern.
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.contains("***") {
            return Err(GlobError::TooManyStars);
        }
        if pattern.chars().any(is_hidden) {
            return Err(GlobError::ControlCharacter);
        }
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            let token = match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    Token::DoubleStar
                }
                '*' => Token::Star,
                '?' => Token::Question,
                other => {
                    literal.push(other);
                    continue;
                }
            };
            if !literal.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut literal).into_boxed_str()));
            }
            tokens.push(token);
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal.into_boxed_str()));
        }
        let kind = match tokens.as_slice() {
            [Token::Literal(_)] => Kind::Literal,
            [Token::DoubleStar] => Kind::Prefix("".into()),
            [Token::Literal(p), Token::DoubleStar] => Kind::Prefix(p.clone()),
            _ => Kind::General(tokens.into_boxed_slice()),
        };
        Ok(Glob { source: pattern.into(), kind })
    }

    /// For a path pattern ending in `/**`: whether `path` is the directory itself,
    /// written without its trailing slash (`/admin` for `/admin/**`), as Spring's
    /// `AntPathMatcher` reads such patterns. Without it, `deny /admin/**` would leave
    /// `/admin` to an allow, while the upstream most often serves it as the same place.
    pub fn matches_dir(&self, path: &str) -> bool {
        if !self.source.ends_with("/**") || path.ends_with('/') {
            return false;
        }
        match &self.kind {
            Kind::Prefix(p) => p.len() == path.len() + 1 && p.starts_with(path),
            // Rare (`/api/*/admin/**`): the path with its slash, matched as written.
            _ => self.matches(&format!("{path}/")),
        }
    }

    /// Whether the pattern matches `path` with its trailing `/` removed (`/admin` for
    /// `/admin/`), or, for a pattern that ends in `/`, with one added (`/billing/` for
    /// `/billing`): the same handler to upstreams that ignore a trailing slash. Deny
    /// rules read paths so.
    pub fn matches_slash_twin(&self, path: &str) -> bool {
        match path.strip_suffix('/') {
            Some(bare) => !bare.is_empty() && self.matches(bare),
            // Rare: the path with a slash, matched as written.
            None => self.source.ends_with('/') && self.matches(&format!("{path}/")),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when the pattern has no wildcard at all.
    pub fn is_literal(&self) -> bool {
        matches!(self.kind, Kind::Literal)
    }

    /// True for `**`, which matches every string.
    pub fn matches_everything(&self) -> bool {
        matches!(&self.kind, Kind::Prefix(p) if p.is_empty())
    }

    /// Whether the pattern is wildcards only (`*`, `?**`, `??*`): it names no value, it
    /// only bounds a length or a depth.
    pub fn is_wildcards_only(&self) -> bool {
        self.source.chars().all(|c| c == '*' || c == '?')
    }

    /// The characters every match must start with (the text before the first wildcard).
    pub fn literal_prefix(&self) -> &str {
        let end = self.source.find(['*', '?']).unwrap_or(self.source.len());
        &self.source[..end]
    }

    /// Whether `text` matches. Never allocates.
    pub fn matches(&self, text: &str) -> bool {
        match &self.kind {
            Kind::Literal => *self.source == *text,
            Kind::Prefix(p) => text.starts_with(&**p),
            Kind::General(tokens) => match_tokens(tokens, text, false) == Step::Match,
        }
    }

    /// Whether `text` matches with ASCII letters compared without case (`Acme/API` for
    /// `acme/api*`): for names the platform itself compares so. Never allocates.
    pub fn matches_ignoring_ascii_case(&self, text: &str) -> bool {
        match &self.kind {
            Kind::Literal => self.source.eq_ignore_ascii_case(text),
            Kind::Prefix(p) => strip_prefix(text, p, true).is_some(),
            Kind::General(tokens) => match_tokens(tokens, text, true) == Step::Match,
        }
    }

    /// Conservatively, whether every string `other` matches is also matched by `self`.
    /// `false` means "not known to cover", not "does not cover"; used by lints only.
    pub fn covers(&self, other: &Glob) -> bool {
        if self.source == other.source {
            return true;
        }
        match &self.kind {
            Kind::Prefix(p) => other.literal_prefix().starts_with(&**p),
            _ => other.is_literal() && self.matches(other.as_str()),
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Glob {
    type Err = GlobError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Glob::new(s)
    }
}

/// `text` without its prefix `lit`, ASCII letters compared without case when `fold`.
fn strip_prefix<'t>(text: &'t str, lit: &str, fold: bool) -> Option<&'t str> {
    if !fold {
        return text.strip_prefix(lit);
    }
    // ASCII case folding keeps every byte's length and leaves non-ASCII bytes alike, so
    // an equal run ends on a character boundary of `text` as it does of `lit`.
    let head = text.as_bytes().get(..lit.len())?;
    if head.eq_ignore_ascii_case(lit.as_bytes()) {
        text.get(lit.len()..)
    } else {
        None
    }
}

/// Matches `tokens` against `text`, recursing only at stars (git wildmatch's scheme);
/// literals compared without ASCII case when `fold`.
fn match_tokens(tokens: &[Token], mut text: &str, fold: bool) -> Step {
    for (i, token) in tokens.iter().enumerate() {
        match token {
            Token::Literal(lit) => {
                if let Some(rest) = strip_prefix(text, lit, fold) {
                    text = rest;
                } else if text.len() < lit.len() {
                    return Step::AbortAll;
                } else {
                    return Step::NoMatch;
                }
            }
            Token::Question => {
                let mut chars = text.chars();
                match chars.next() {
                    None => return Step::AbortAll,
                    Some('/') => return Step::NoMatch,
                    Some(_) => text = chars.as_str(),
                }
            }
            Token::Star | Token::DoubleStar => {
                let crosses = matches!(token, Token::DoubleStar);
                let rest = &tokens[i + 1..];
                if rest.is_empty() {
                    return if crosses || !text.contains('/') {
                        Step::Match
                    } else {
                        Step::AbortToDoubleStar
                    };
                }
                let mut at = text;
                loop {
                    match match_tokens(rest, at, fold) {
                        Step::NoMatch => {}
                        Step::AbortToDoubleStar if crosses => {}
                        other => return other,
                    }
                    let mut chars = at.chars();
                    match chars.next() {
                        None => return Step::AbortAll,
                        Some('/') if !crosses => return Step::AbortToDoubleStar,
                        Some(_) => at = chars.as_str(),
                    }
                }
            }
        }
    }
    if text.is_empty() {
        Step::Match
    } else {
        Step::NoMatch
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_pattern_matches_the_directory_without_its_slash() {
        for (pattern, path, dir) in [
            ("/admin/**", "/admin", true),
            ("/admin/**", "/admin/", false), // matched as a prefix already
            ("/admin/**", "/adminx", false),
            ("/admin/**", "/admi", false),
            ("/admin/**", "/", false),
            ("/api/*/admin/**", "/api/v1/admin", true),
            ("/api/*/admin/**", "/api/v1/v2/admin", false),
            ("/admin/*", "/admin", false), // one segment, not a directory pattern
            ("/admin**", "/admin", false),
            ("main/**", "main", true),
        ] {
            let g = Glob::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(g.matches_dir(path), dir, "{pattern} ~ {path}");
        }
    }

    use super::*;

    /// A slow, obviously correct reference: dynamic programming over (pattern, text).
    fn reference(pattern: &str, text: &str) -> bool {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        fn go(p: &[char], t: &[char]) -> bool {
            match p {
                [] => t.is_empty(),
                ['*', '*', rest @ ..] => (0..=t.len()).any(|k| go(rest, &t[k..])),
                ['*', rest @ ..] => (0..=t.len())
                    .take_while(|&k| k == 0 || t[k - 1] != '/')
                    .any(|k| go(rest, &t[k..])),
                ['?', rest @ ..] => t.first().is_some_and(|&c| c != '/') && go(rest, &t[1..]),
                [c, rest @ ..] => t.first() == Some(c) && go(rest, &t[1..]),
            }
        }
        go(&p, &t)
    }

    #[test]
    fn table() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, bool)] = &[
            // literals are exact and case-sensitive
            ("main", "main", true),
            ("main", "Main", false),
            ("main", "main2", false),
            ("main", "mai", false),
            ("/deploy", "/deploy/", false),
            // `*` stays within a segment
            ("release/*", "release/1.2", true),
            ("release/*", "release/", true),
            ("release/*", "release/a/b", false),
            ("release/*", "release", false),
            ("*", "", true),
            ("*", "abc", true),
            ("*", "a/b", false),
            ("/deploy/*", "/deploy/42", true),
            ("/deploy/*", "/deploy/42/logs", false),
            ("/deploy/*/logs", "/deploy/42/logs", true),
            ("/deploy/*/logs", "/deploy/4/2/logs", false),
            ("*@acme.example", "jane@acme.example", true),
            ("*@acme.example", "jane@acme.example.evil", false),
            ("*@acme.example", "jane@evil.acme.example", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbYcZ", false),
            ("a*b*c", "a/b/c", false),
            // `**` crosses segments
            ("**", "", true),
            ("**", "a/b/c", true),
            ("/api/**", "/api/", true),
            ("/api/**", "/api/v1/x", true),
            ("/api/**", "/api", false),
            ("/api/**", "/apix", false),
            ("/**/x", "/a/b/x", true),
            ("/**/x", "//x", true),
            ("/**/x", "/x", false),
            ("repo:acme/**", "repo:acme/api:ref:refs/heads/main", true),
            ("repo:acme/*", "repo:acme/api:ref:refs/heads/main", false),
            ("repo:acme/*", "repo:acme/api:environment:production", true),
            ("**.json", "a/b.json", true),
            ("**/*.json", "a/b/c.json", true),
            ("**/*.json", "c.json", false),
            ("a**b*c", "a/x/b/c", false),
            ("a**b*c", "a/x/bzc", true),
            // `?` is one character, never `/`
            ("v?", "v1", true),
            ("v?", "v", false),
            ("v?", "v12", false),
            ("a?b", "a/b", false),
            ("?", "é", true),
            ("??", "é", false),
            // other characters are literal
            ("{2e9e}", "{2e9e}", true),
            ("[ab]", "[ab]", true),
            ("[ab]", "a", false),
            ("a.b", "axb", false),
        ];
        for &(pattern, text, want) in cases {
            let g = Glob::new(pattern);
            let got = g.as_ref().map(|g| g.matches(text));
            assert_eq!(got, Ok(want), "{pattern:?} vs {text:?}");
            assert_eq!(reference(pattern, text), want, "reference: {pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn rejects_bad_patterns() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert_eq!(Glob::new("***"), Err(GlobError::TooManyStars));
        assert_eq!(Glob::new("/a/***/b"), Err(GlobError::TooManyStars));
        assert_eq!(Glob::new("a\nb"), Err(GlobError::ControlCharacter));
        assert_eq!(Glob::new("a\0"), Err(GlobError::ControlCharacter));
        for hidden in ["/admin\u{200b}/**", "main\u{202e}", "\u{feff}main", "a\u{2066}b"] {
            assert_eq!(Glob::new(hidden), Err(GlobError::ControlCharacter), "{hidden:?}");
        }
        assert!(Glob::new("relé/*").is_ok(), "other non-ASCII text is fine");
    }

    #[test]
    fn every_default_ignorable_control_separator_and_unusual_space_is_hidden() {
        for &c in HIDDEN_SAMPLES {
            assert!(is_hidden(c), "U+{:04X}", c as u32);
            let pattern = format!("/admin{c}/**");
            assert_eq!(Glob::new(&pattern), Err(GlobError::ControlCharacter), "U+{:04X}", c as u32);
        }
        // Just outside the ranges, and ordinary text: visible.
        for c in [' ', 'a', 'é', '✓', '\u{2801}', '\u{1bca4}', '\u{1d172}', '\u{1d17b}', '\u{fffd}']
        {
            assert!(!is_hidden(c), "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn agrees_with_the_reference_exhaustively() {
        // Every pattern over a small alphabet, against every text over it, up to a length.
        let palette = ["a", "b", "/", "*", "**", "?"];
        let texts_alpha = ['a', 'b', '/'];
        let mut patterns = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &patterns {
                for piece in palette {
                    next.push(format!("{p}{piece}"));
                }
            }
            patterns.extend(next);
        }
        patterns.sort();
        patterns.dedup();
        let mut texts = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for t in &frontier {
                for c in texts_alpha {
                    next.push(format!("{t}{c}"));
                }
            }
            texts.extend(next.iter().cloned());
            frontier = next;
        }
        let mut checked = 0usize;
        for p in &patterns {
            let Ok(g) = Glob::new(p) else { continue };
            for t in &texts {
                assert_eq!(g.matches(t), reference(p, t), "{p:?} vs {t:?}");
                let (upper, lower) = (t.to_ascii_uppercase(), p.to_ascii_lowercase());
                let folded = reference(&lower, &t.to_ascii_lowercase());
                assert_eq!(g.matches_ignoring_ascii_case(&upper), folded, "{p:?} ~ {upper:?}");
                checked += 1;
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    /// Without case, for ASCII letters only, in each of the three compiled kinds; and
    /// never cutting a character of the text.
    #[test]
    fn matching_ignoring_ascii_case() {
        for (pattern, text, want) in [
            ("acme/legacy", "Acme/Legacy", true),     // literal
            ("Acme/**", "ACME/x/y", true),            // prefix
            ("acme/*-api", "ACME/Billing-API", true), // general
            ("acme/*", "acme/x/y", false),
            ("acme/legacy", "acme/legacy2", false),
            ("école/*", "École/x", false), // non-ASCII letters keep their case
            ("école/*", "éCOLE/x", true),
            ("é*", "É", false),
            ("a?", "Aé", true),
        ] {
            let g = Glob::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(g.matches_ignoring_ascii_case(text), want, "{pattern} ~ {text}");
        }
        // A literal that ends inside a multi-byte character of the text never matches
        // (nor panics).
        let g = Glob::new("a\u{e9}*").ok();
        assert!(g.is_some_and(|g| !g.matches_ignoring_ascii_case("A\u{e8}")));
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let g = Glob::new("*a*a*a*a*a*a*a*a*a*b").ok();
        let text = "a".repeat(64);
        let start = std::time::Instant::now();
        assert_eq!(g.map(|g| g.matches(&text)), Some(false));
        let g = Glob::new("**a**a**a**a**a**a**a**b").ok();
        assert_eq!(g.map(|g| g.matches(&text)), Some(false));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn covers_is_conservative() {
        let g = |s: &str| Glob::new(s).ok();
        let covers = |a: &str, b: &str| g(a).zip(g(b)).is_some_and(|(a, b)| a.covers(&b));
        assert!(covers("**", "/anything/**"));
        assert!(covers("/api/**", "/api/v1/*"));
        assert!(covers("/deploy/*", "/deploy/42"));
        assert!(covers("main", "main"));
        assert!(!covers("/deploy/*", "/deploy/**"));
        assert!(!covers("main", "*"));
        assert!(!covers("/api/**", "/ap*"));
        assert_eq!(g("release/*").map(|g| g.literal_prefix().to_string()), Some("release/".into()));
        assert!(g("**").is_some_and(|g| g.matches_everything()));
        assert!(g("main").is_some_and(|g| g.is_literal()));
    }
}
