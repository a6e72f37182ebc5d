//! Diagnostics for configuration and policy files: every problem at once, each as
//! `file:line:col: message`, nothing applied partially.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A loaded source file, kept so byte spans can be turned into `line:col`.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: Arc<Path>,
    pub text: Arc<str>,
    line_starts: Arc<[usize]>,
}

impl Source {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<Arc<str>>) -> Self {
        let text: Arc<str> = text.into();
        let line_starts =
            std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Self { path: Arc::from(path.into()), text, line_starts }
    }

    /// Reads a file. An unreadable file becomes a diagnostic at `1:1`.
    pub fn read(path: &Path) -> Result<Self, Diagnostic> {
        // Not only regular files: `-c /dev/stdin` and `-c <(…)` are fine, but bounded.
        match crate::util::read_bounded_text(path, crate::util::MAX_CONFIG_FILE, false) {
            Ok(text) => Ok(Self::new(path, text)),
            Err(e) => Err(Diagnostic::at_path(path, format!("cannot read file: {e}"))),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.line_starts.get(line).copied().unwrap_or(0);
        let col = self.text.get(start..offset).map_or(0, |s| s.chars().count());
        (line as u32 + 1, col as u32 + 1)
    }

    /// A diagnostic pointing at the start of `span`.
    pub fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = span.map_or((1, 1), |s| self.line_col(s.start));
        Diagnostic { file: self.path.clone(), line, col, message: message.into() }
    }

    /// The diagnostic for a TOML syntax or shape error from the `toml` crate.
    pub fn toml_error(&self, err: &toml::de::Error) -> Diagnostic {
        // The toml crate appends a rendered snippet to its Display; keep only the message.
        self.error(err.span(), with_suggestion(err.message().trim()))
    }

    /// The diagnostics for the syntax errors of [`toml::de::DeTable::parse_recoverable`],
    /// in order. The `toml` crate reports a key of more than [`TOML_KEY_PARTS`] dotted
    /// parts (`a.b.c…`, a key, a table header or an inline table's key) as `recursion
    /// limit` with no position, which read as `1:1`: each such error gets the position
    /// of its key, found by [`too_deep_keys`].
    pub fn toml_errors(&self, errors: &[toml::de::Error]) -> Vec<Diagnostic> {
        let mut deep = None;
        errors
            .iter()
            .map(|e| {
                if e.span().is_some() || e.message().trim() != "recursion limit" {
                    return self.toml_error(e);
                }
                let keys = deep.get_or_insert_with(|| too_deep_keys(&self.text).into_iter());
                self.error(
                    keys.next(),
                    format!(
                        "recursion limit: a key of more than {TOML_KEY_PARTS} dotted parts; \
                         write fewer levels"
                    ),
                )
            })
            .collect()
    }
}

/// The most dotted parts a TOML key may have: the `toml` crate refuses a key whose
/// path (the parts before its last) is 80 long or more, and nests inline tables and
/// arrays 80 deep at most.
pub const TOML_KEY_PARTS: usize = 80;

/// Where each key of more than [`TOML_KEY_PARTS`] dotted parts begins and ends, in
/// document order: the keys the `toml` crate refuses as `recursion limit`. Read from the
/// events of the parser the `toml` crate itself runs (`toml_parser`), under the same
/// nesting limit, so strings, comments and quoted keys holding dots are told apart as
/// it tells them, and a deep nesting is skipped as it skips it (never recursed into).
pub fn too_deep_keys(text: &str) -> Vec<Range<usize>> {
    use toml_parser::parser::{parse_document, Event, EventKind, RecursionGuard};
    let source = toml_parser::Source::new(text);
    let tokens = source.lex().into_vec();
    let mut events: Vec<Event> = Vec::new();
    let mut guard = RecursionGuard::new(&mut events, TOML_KEY_PARTS as u32);
    parse_document(&tokens, &mut guard, &mut ());
    let mut found = Vec::new();
    let (mut parts, mut start) = (0, 0);
    for e in &events {
        match e.kind() {
            EventKind::SimpleKey => {
                if parts == 0 {
                    start = e.span().start();
                }
                parts += 1;
                if parts == TOML_KEY_PARTS + 1 {
                    found.push(start..e.span().end());
                }
            }
            // `a . b` is one key.
            EventKind::KeySep | EventKind::Whitespace => {}
            _ => parts = 0,
        }
    }
    found
}

/// serde's "unknown field `audiance`, expected one of `issuer`, `audiences`, …" with the
/// likeliest intended key named first: "(did you mean `audiences`?)".
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((word, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match crate::policy::raw::suggest(word, &candidates) {
        Some(hint) => format!("unknown field `{word}` (did you mean `{hint}`?){expected}"),
        None => message.to_string(),
    }
}

/// One problem in one file, at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: Arc<Path>,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl Diagnostic {
    pub fn at_path(path: &Path, message: impl Into<String>) -> Self {
        Self { file: Arc::from(path), line: 1, col: 1, message: message.into() }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display().to_string();
        write!(f, "{}:{}:{}: {}", Visible(&file), self.line, self.col, Visible(&self.message))
    }
}

/// Text as diagnostics print it: every character a terminal or CI log would not show as
/// itself (`crate::policy::is_hidden`: controls, bidi overrides, invisible and
/// non-ASCII space characters) written as the TOML escape that spells it (`\u000A`,
/// `\u202E`). Diagnostics quote what the files say (a key, a policy name, a path); a
/// newline there started a line of the reviewer's CI log of its own, such as a GitHub
/// Actions `::add-mask::ANYONE` or `::error::` command, and an ANSI escape could erase
/// the real error from a terminal.
pub struct Visible<'a>(pub &'a str);

impl fmt::Display for Visible<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some((at, c)) = rest.char_indices().find(|(_, c)| crate::policy::is_hidden(*c)) {
            f.write_str(&rest[..at])?;
            match u32::from(c) {
                n @ 0..=0xffff => write!(f, "\\u{n:04X}")?,
                n => write!(f, "\\U{n:08X}")?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// Collects every diagnostic; compilation succeeds only when none were pushed.
#[derive(Debug, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }
    pub fn extend(&mut self, other: Diagnostics) {
        self.items.extend(other.items);
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }
    /// Sorted by file, line, column, so output is stable and reads top to bottom.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        self.items.dedup();
        self.items
    }
}

/// The error returned when loading failed: every diagnostic, sorted.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s):\n{}", .0.len(), DisplayList(.0))]
pub struct LoadError(pub Vec<Diagnostic>);

struct DisplayList<'a>(&'a [Diagnostic]);
impl fmt::Display for DisplayList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_and_in_chars() {
        let s = Source::new("a.toml", "x = 1\ny = \"é\" z\n");
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(4), (1, 5));
        assert_eq!(s.line_col(6), (2, 1));
        // 'z' comes after a two-byte character: column counts characters, not bytes.
        let z = s.text.find('z').unwrap_or(0);
        assert_eq!(s.line_col(z), (2, 9));
        assert_eq!(s.error(Some(6..7), "bad").to_string(), "a.toml:2:1: bad");
    }

    /// A key or value quoted in a diagnostic cannot start a line of its own (a CI
    /// runner's workflow command) nor hide or reorder text in a terminal.
    #[test]
    fn diagnostics_show_hidden_characters_as_escapes() {
        let d = Diagnostic::at_path(
            Path::new("policies/x\n::add-mask::ANYONE.toml"),
            "unknown key `x\n::error::all policies pass\u{1b}[2K\u{202e}\u{e0041}`",
        );
        assert_eq!(
            d.to_string(),
            "policies/x\\u000A::add-mask::ANYONE.toml:1:1: unknown key \
             `x\\u000A::error::all policies pass\\u001B[2K\\u202E\\U000E0041`"
        );
        assert_eq!(Visible("plain, café").to_string(), "plain, café");
    }

    #[test]
    fn toml_errors_point_at_the_offending_key() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            issuer: u32,
            audiences: u32,
        }
        let s = Source::new("t.toml", "issuer = 1\naudiance = 2\n");
        let err = toml::from_str::<T>(&s.text).err();
        let d = err.map(|e| s.toml_error(&e));
        let d = d.map(|d| (d.line, d.col, d.message));
        assert_eq!(
            d,
            Some((
                2,
                1,
                "unknown field `audiance` (did you mean `audiences`?), expected `issuer` or `audiences`"
                    .to_string()
            ))
        );
    }

    /// The keys the `toml` crate refuses as too deeply dotted, found as it parses: a
    /// dotted key, a table header, an inline table's key; never dots in strings,
    /// comments or quoted keys; at most 80 parts is fine; a nesting beyond the limit is
    /// skipped, not recursed into.
    #[test]
    fn too_deep_keys_finds_each_key_of_more_than_80_parts() {
        let deep = vec!["k"; 81].join(".");
        let quoted = vec!["\"k.k\""; 40].join(".");
        let text = format!(
            "# {deep}\nok = \"{deep}\"\n{quoted} = 1\n{deep} = 1\n[t]\nx = {{ {deep} = 1 }}\n[[{deep}]]\n{n}{m}\n",
            n = "a = ".to_string() + &"[".repeat(200),
            m = "]".repeat(200),
        );
        let s = Source::new("t.toml", text.clone());
        let at: Vec<(u32, u32)> =
            too_deep_keys(&text).iter().map(|r| s.line_col(r.start)).collect();
        assert_eq!(at, vec![(4, 1), (6, 7), (7, 3)]);
        let (_, errors) = toml::de::DeTable::parse_recoverable(&text);
        let limit: Vec<String> = s
            .toml_errors(&errors)
            .iter()
            .filter(|d| d.message.starts_with("recursion limit"))
            .map(|d| format!("{}:{}", d.line, d.col))
            .collect();
        // The `toml` crate reports the first of them (its recovery after one drops the
        // rest): at the key.
        assert_eq!(limit, ["4:1"]);
        assert!(too_deep_keys(&vec!["k"; 80].join(".")).is_empty());
        assert!(too_deep_keys("[[[").is_empty());
    }
}
