//! Passwords written into SQL text are masked before a statement reaches the audit log.
//!
//! `ALTER ROLE app PASSWORD 'secret'`, `CREATE USER MAPPING … OPTIONS (password 'secret')`
//! and a connection string with `password=secret` (dblink, postgres_fdw) carry a
//! password in the statement itself; the audit log must never hold one. The literal
//! after the keyword `password` is replaced with `***`, whatever its quoting (`'…'`,
//! `E'…'`, `$$…$$`, `$tag$…$tag$`, or a bare conninfo value). A password sent as a Bind
//! parameter never reaches the log at all (parameters are not logged), which is why
//! drivers and `psql`'s `\password` (a SCRAM verifier, not the password) are safe anyway.

use std::borrow::Cow;

const KEYWORD: &[u8] = b"password";
const MASK: &str = "***";

/// `text` with every password literal masked; borrowed when there is none.
pub fn passwords(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while let Some(at) = find_keyword(bytes, i) {
        let after = at + KEYWORD.len();
        match secret_span(bytes, after) {
            Some(span) => {
                i = span.1;
                spans.push(span);
            }
            None => i = after,
        }
    }
    spans.extend(uri_passwords(bytes));
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0; // bytes of `text` already in `out`
    for (start, end) in spans {
        if end <= copied {
            continue; // inside a span already masked
        }
        // Spans start and end next to ASCII delimiters (or at the text's ends), so they
        // are char boundaries.
        out.push_str(text.get(copied..start.max(copied)).unwrap_or_default());
        out.push_str(MASK);
        copied = end;
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    Cow::Owned(out)
}

/// The password of every `scheme://user:password@host` (a URI connection string, as
/// dblink and foreign-data wrappers take): the bytes between the `:` and the `@`.
fn uri_passwords(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(p) = bytes[from..].windows(3).position(|w| w == b"://") {
        let authority = from + p + 3;
        let end = bytes[authority..]
            .iter()
            .position(|b| {
                matches!(b, b'@' | b'/' | b'?' | b'#' | b'\'' | b'"') || b.is_ascii_whitespace()
            })
            .map_or(bytes.len(), |q| authority + q);
        if bytes.get(end) == Some(&b'@') {
            if let Some(colon) = bytes[authority..end].iter().position(|b| *b == b':') {
                spans.push((authority + colon + 1, end));
            }
        }
        from = authority;
    }
    spans
}

/// The next case-insensitive `password` at or after `from` that is not part of a longer
/// identifier (`password_encryption`, `old_password`).
fn find_keyword(bytes: &[u8], from: usize) -> Option<usize> {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = from;
    while i + KEYWORD.len() <= bytes.len() {
        if bytes[i..i + KEYWORD.len()].eq_ignore_ascii_case(KEYWORD)
            && (i == 0 || !ident(bytes[i - 1]))
            && bytes.get(i + KEYWORD.len()).is_none_or(|b| !ident(*b))
        {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Where the secret after the keyword starts and ends (the bytes to mask), if there is one.
fn secret_span(bytes: &[u8], mut i: usize) -> Option<(usize, usize)> {
    // Whitespace and comments (`/* … */`, `-- …`) may stand between keyword and literal.
    let skip = |mut i: usize| loop {
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if bytes[i.min(bytes.len())..].starts_with(b"/*") {
            i = bytes[i + 2..]
                .windows(2)
                .position(|w| w == b"*/")
                .map_or(bytes.len(), |p| i + 2 + p + 2);
        } else if bytes[i.min(bytes.len())..].starts_with(b"--") {
            i = bytes[i..].iter().position(|b| *b == b'\n').map_or(bytes.len(), |p| i + p);
        } else {
            return i;
        }
    };
    i = skip(i);
    let conninfo = bytes.get(i) == Some(&b'=');
    if conninfo {
        i = skip(i + 1);
    }
    // String-literal prefixes: E'…' (backslash escapes), U&'…', N'…'.
    let prefixed = |p: &[u8]| {
        bytes[i.min(bytes.len())..].len() > p.len()
            && bytes[i..i + p.len()].eq_ignore_ascii_case(p)
            && bytes[i + p.len()] == b'\''
    };
    if !conninfo {
        if prefixed(b"e") {
            return Some((i, quoted_end(bytes, i + 2, true)));
        }
        if prefixed(b"u&") {
            return Some((i, quoted_end(bytes, i + 3, false)));
        }
        if prefixed(b"n") {
            return Some((i, quoted_end(bytes, i + 2, false)));
        }
    }
    // A conninfo value quoted with `\'` inside an E'…' literal: `password=\'pw\'`.
    if conninfo && bytes[i.min(bytes.len())..].starts_with(b"\\'") {
        let body = i + 2;
        let end = bytes[body..]
            .windows(2)
            .position(|w| w == b"\\'")
            .map_or(bytes.len(), |p| body + p + 2);
        return Some((i, end));
    }
    match bytes.get(i)? {
        // A quoted conninfo value inside an SQL literal: `password=''it\''s''`.
        b'\'' if conninfo && bytes.get(i + 1) == Some(&b'\'') => {
            let mut j = i + 2;
            while j < bytes.len() {
                match bytes[j] {
                    b'\\' => j += 2,
                    b'\'' if bytes.get(j + 1) == Some(&b'\'') => return Some((i, j + 2)),
                    _ => j += 1,
                }
            }
            Some((i, bytes.len()))
        }
        b'\'' => Some((i, quoted_end(bytes, i + 1, false))),
        b'$' => {
            // $tag$ … $tag$ (the tag may be empty).
            let tag_end = i + 1 + bytes[i + 1..].iter().position(|b| *b == b'$')?;
            let tag = &bytes[i..=tag_end];
            if !tag[1..tag.len() - 1].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') {
                return None;
            }
            let body = tag_end + 1;
            let end = bytes[body..]
                .windows(tag.len())
                .position(|w| w == tag)
                .map_or(bytes.len(), |p| body + p + tag.len());
            Some((i, end))
        }
        // A bare conninfo value runs to a space or the end of the enclosing literal.
        _ if conninfo => {
            let end = bytes[i..]
                .iter()
                .position(|b| b.is_ascii_whitespace() || *b == b'\'' || *b == b'"')
                .map_or(bytes.len(), |p| i + p);
            (end > i).then_some((i, end))
        }
        _ => None,
    }
}

/// The index just past the quote closing a literal whose body starts at `i` (`''` is a
/// quote inside it; with `backslash`, so is `\'`). Unterminated: the end of the text.
fn quoted_end(bytes: &[u8], mut i: usize, backslash: bool) -> usize {
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if backslash => i += 2,
            b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::passwords;

    #[test]
    fn password_literals_are_masked_whatever_their_quoting() {
        let cases = [
            ("ALTER ROLE app PASSWORD 'hunter2'", "ALTER ROLE app PASSWORD ***"),
            (
                "create user x with encrypted password 'a''b' valid until 'x'",
                "create user x with encrypted password *** valid until 'x'",
            ),
            ("ALTER USER x PASSWORD E'a\\'b' LOGIN", "ALTER USER x PASSWORD *** LOGIN"),
            ("ALTER USER x PASSWORD $$s3cr3t$$", "ALTER USER x PASSWORD ***"),
            ("ALTER USER x PASSWORD $t$s3$cr3t$t$;", "ALTER USER x PASSWORD ***;"),
            ("ALTER USER x PASSWORD\n  'multi\nline'", "ALTER USER x PASSWORD\n  ***"),
            (
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password 'pw')",
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password ***)",
            ),
            (
                "SELECT dblink_connect('host=db password=pw dbname=x')",
                "SELECT dblink_connect('host=db password=*** dbname=x')",
            ),
            (
                "SELECT dblink_connect('host=db password = pw')",
                "SELECT dblink_connect('host=db password = ***')",
            ),
            (
                "SELECT dblink_connect('password=''it\\''s'' host=x')",
                "SELECT dblink_connect('password=*** host=x')",
            ),
            (
                "ALTER ROLE a PASSWORD 'x'; ALTER ROLE b PASSWORD 'y'",
                "ALTER ROLE a PASSWORD ***; ALTER ROLE b PASSWORD ***",
            ),
            ("ALTER ROLE a PASSWORD 'unterminated", "ALTER ROLE a PASSWORD ***"),
            ("ALTER ROLE a PASSWORD /* c */ 'pw'", "ALTER ROLE a PASSWORD /* c */ ***"),
            ("ALTER ROLE a PASSWORD -- c\n 'pw' LOGIN", "ALTER ROLE a PASSWORD -- c\n *** LOGIN"),
            ("ALTER ROLE a PASSWORD U&'p\\0077' LOGIN", "ALTER ROLE a PASSWORD *** LOGIN"),
            ("ALTER ROLE a PASSWORD n'pw'", "ALTER ROLE a PASSWORD ***"),
            (
                "SELECT dblink_connect(E'host=x password=\\'pw\\' port=1')",
                "SELECT dblink_connect(E'host=x password=*** port=1')",
            ),
            (
                "SELECT dblink_connect('postgresql://app:s3cr%40t@db:5432/x')",
                "SELECT dblink_connect('postgresql://app:***@db:5432/x')",
            ),
            (
                "SELECT 'postgres://a:b@h', 'mysql://u:p@h/db'",
                "SELECT 'postgres://a:***@h', 'mysql://u:***@h/db'",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(passwords(text), want, "{text}");
        }
    }

    #[test]
    fn text_without_a_password_literal_is_left_alone() {
        for text in [
            "SELECT 1",
            "ALTER ROLE app PASSWORD NULL",
            "SHOW password_encryption",
            "SELECT old_password FROM t",
            "SELECT password FROM users WHERE id = $1",
            "UPDATE users SET password = $1",
            "SELECT 'https://example.com/path', 'postgres://app@db/x'",
            "password",
            "",
        ] {
            assert!(matches!(passwords(text), std::borrow::Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn truncated_and_odd_input_never_panics_and_never_shows_a_literal_after_the_keyword() {
        for text in [
            "password",
            "password=",
            "password =",
            "PASSWORD /*",
            "PASSWORD /* x",
            "PASSWORD --",
            "PASSWORD E",
            "PASSWORD E'",
            "PASSWORD U&",
            "PASSWORD U&'",
            "PASSWORD N'",
            "PASSWORD $",
            "PASSWORD $a",
            "PASSWORD $$",
            "password=\\",
            "password=\\'",
            "password=''",
            "://",
            "a://",
            "a://b:c",
            "a://b:c@",
            "é PASSWORD 'é' é",
            "PASSWORD 'x' -- é",
            "://:@",
        ] {
            let masked = passwords(text);
            assert!(!masked.contains("'é'"), "{text} -> {masked}");
        }
    }
}
