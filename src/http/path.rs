//! Path normalization: the proxy authorizes exactly the path it forwards.
//!
//! Upstreams disagree about what `%2F`, `..`, `..;` or `\` mean, so an attacker who
//! finds a path that the proxy reads one way and the upstream another can slip past a
//! path rule (the `..;` trick against Tomcat, `%2e%2e` against naive decoders). Instead
//! of guessing, ambiguous paths are rejected and everything else is put into one
//! canonical form that is both matched by policy and sent upstream.
//!
//! The canonical form spells every byte one way, chosen so that every upstream reads it
//! as the same character: the characters that frameworks decode and that cannot change
//! a path's structure (unreserved, the sub-delims but `+` and `;`, `:` and `@`) as
//! themselves, so `/v1/keys/k1%3Arevoke` is `/v1/keys/k1:revoke` to the policy as it is
//! to Flask; everything else as an upper-case escape. `+` is the exception on purpose:
//! RFC 3986 and most frameworks read it as a plus, but Amazon S3 and anything that
//! form-decodes a path read it as a space, while `%2B` is a plus to all of them. So
//! `+` is sent as `%2B`, and a path rule that means a plus writes `%2B`.
//!
//! Path patterns (policy `paths`, route `path_prefix`) must be written in the same form,
//! or they could never match: [`check_pattern`] says how to write them.

use std::borrow::Cow;

/// Why a path was refused; all map to `400 ambiguous-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOrigin,
    EncodedSlash,
    Backslash,
    DotSegment,
    BadEscape,
    ControlCharacter,
    MatrixDots,
    PathParameter,
    DoubleEncoded,
    Overlong,
}

/// What a path pattern is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// A policy glob: `*` and `?` are wildcards and kept as written.
    Glob,
    /// A literal path (a route's `path_prefix`): `?` is a character like any other.
    Literal,
}

/// Why a path pattern cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// Spelled otherwise than the canonical form of requests, so it would never match:
    /// `why` is the first difference, `canonical` the spelling that matches.
    NotCanonical { canonical: String, why: String },
    /// Only paths that the proxy refuses (400) could match it.
    Refused(PathError),
    /// `%2A`: requests have it decoded to `*`, which a glob reads as its wildcard.
    EncodedStar { canonical: String },
}

/// How the canonicalizer treats what only patterns hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Request,
    Pattern(Syntax),
}

impl PathError {
    pub fn detail(self) -> &'static str {
        match self {
            PathError::NotOrigin => "path is not in origin form",
            PathError::EncodedSlash => "encoded slash or backslash in path",
            PathError::Backslash => "backslash in path",
            PathError::DotSegment => "`.` or `..` segment in path",
            PathError::BadEscape => "invalid percent-escape in path",
            PathError::ControlCharacter => "control character or NUL in path",
            PathError::MatrixDots => "`..;` in path",
            PathError::PathParameter => "`;` (path parameter) in path",
            PathError::DoubleEncoded => {
                "doubly encoded character in path (`%25` before two hex digits)"
            }
            PathError::Overlong => {
                "overlong UTF-8 escape in path (a lenient decoder reads it as ASCII)"
            }
        }
    }
}

// === impl PatternError ===

impl PatternError {
    /// The diagnostic for `pattern`, which a configuration key holds.
    pub fn message(&self, pattern: &str) -> String {
        match self {
            PatternError::NotCanonical { canonical, why } => format!(
                "path `{pattern}` would never match: requests are matched in canonical form, \
                 where {why}; write `{canonical}`"
            ),
            PatternError::Refused(e) => format!(
                "path `{pattern}` can never match: requests for it are refused \
                 (400 ambiguous-path: {})",
                e.detail()
            ),
            PatternError::EncodedStar { canonical } => format!(
                "path `{pattern}`: `%2A` is `*` in requests, and a pattern cannot match a \
                 literal `*` apart from its wildcard, which matches it as it matches any run \
                 of characters within a segment: write `{canonical}`"
            ),
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters the canonical form writes as themselves and decodes when escaped:
/// unreserved, the sub-delims other than `+` (a space to S3 and form decoders) and `;`
/// (refused), `:` and `@`. Every framework decodes them, and none of them can end a
/// segment or the path.
fn is_literal(b: u8) -> bool {
    is_unreserved(b)
        || matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b',' | b'=' | b':' | b'@')
}

/// The value of one hex digit.
pub(super) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(out: &mut String, v: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(v >> 4)]));
    out.push(char::from(HEX[usize::from(v & 15)]));
}

/// Whether the bytes after a `%25` spell an escape's two hex digits: a second decoding
/// hop (nginx's `proxy_pass` with a URI in front of the application, code that decodes
/// `PATH_INFO` again) turns `%2561` into `a` and `%252F` into `/`, a spelling of the
/// character the policy never saw (`/%2561dmin/` past a deny on `/admin/**`), so every
/// such path is refused, as Spring's `StrictHttpFirewall` refuses every `%25`. A `%`
/// before anything else (`/100%25`, `/100%25off`) reads the same to every hop.
fn double_encoded(rest: &[u8]) -> bool {
    matches!(rest, [h, l, ..] if hex(*h).is_some() && hex(*l).is_some())
}

/// Whether a canonical segment (escapes in upper-case hex) holds an overlong UTF-8
/// sequence: `C0` or `C1` before a continuation byte (`%C0%AE` is `.`, `%C0%AF` is `/`
/// to a lenient decoder), `E0` before `80`–`9F`, `F0` before `80`–`8F`. Valid UTF-8
/// never holds one, so only a decoder that takes them (IIS's old Unicode traversal,
/// Tomcat before 6.0.18, JBoss) reads them, and then as characters the escapes hid
/// from every check here. The lead byte alone (a Latin-1 `À` before a letter) is none.
fn overlong(seg: &[u8]) -> bool {
    seg.windows(6).any(|w| {
        let [b'%', l1, l2, b'%', c1, _] = *w else { return false };
        match (l1, l2) {
            (b'C', b'0' | b'1') => matches!(c1, b'8' | b'9' | b'A' | b'B'),
            (b'E', b'0') => matches!(c1, b'8' | b'9'),
            (b'F', b'0') => c1 == b'8',
            _ => false,
        }
    })
}

/// Whether `raw` is canonical as it stands and holds nothing to refuse: only literal
/// characters (and a glob's `?`), no empty segment but a trailing one, no dot-segment.
/// The common request path, which is then borrowed, not copied.
fn already_canonical(raw: &str, mode: Mode) -> bool {
    let Some(rest) = raw.strip_prefix('/') else { return false };
    let glob = mode == Mode::Pattern(Syntax::Glob);
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        if (seg.is_empty() && segments.peek().is_some()) || seg == "." || seg == ".." {
            return false;
        }
        if !seg.bytes().all(|b| is_literal(b) || (glob && b == b'?')) {
            return false;
        }
    }
    true
}

/// Returns the canonical form of a raw request path (without query):
/// - percent-escapes of the characters that cannot change the path's structure
///   (unreserved, `! $ & ' ( ) * , =`, `:` and `@`) are decoded (`%7E` → `~`,
///   `%3A` → `:`), since every framework decodes them before routing;
/// - every other character is an escape with upper-case hex (`%c3%a9` → `%C3%A9`), and
///   so is one that should have been escaped but came raw (`{` → `%7B`), and `+`
///   (`%2B`: a plus to every upstream, where a raw `+` is a space to S3); `%25`
///   (`%`), `%3F` (`?`) and `%23` (`#`) stay escapes, or they would end the path;
/// - empty segments are merged (`//admin` → `/admin`), since many upstreams do so;
/// - encoded `/` or `\`, a raw `\`, `.` / `..` segments (also when encoded), `;`
///   or `%3B` (path parameters, which Java servers strip before routing; encoded, a
///   decoding hop in between would turn it back into one), control characters and
///   malformed escapes are rejected.
///
/// The returned string is what policy sees and what is forwarded. A path that is
/// canonical already (the common case: no `%`, no `//`) is borrowed.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    canonical(raw, Mode::Request)
}

/// Checks that a path pattern is written in the canonical form of [`normalize`], so
/// that it can match: lower-case hex, an escape of a character requests have decoded
/// (`%61`, `%3A`, `%40`) or a raw one they have escaped (`+`, `{`, non-ASCII) would
/// never match anything, and a pattern only refused paths match (`/a/../b`, `%2F`)
/// neither. `%2A` in a glob is refused too: the only way to write a literal `*` is `*`,
/// the wildcard.
pub fn check_pattern(pattern: &str, syntax: Syntax) -> Result<(), PatternError> {
    let canonical = canonical(pattern, Mode::Pattern(syntax)).map_err(PatternError::Refused)?;
    if syntax == Syntax::Glob && pattern.to_ascii_uppercase().contains("%2A") {
        return Err(PatternError::EncodedStar { canonical: canonical.into_owned() });
    }
    if canonical == pattern {
        return Ok(());
    }
    let why = first_difference(pattern, syntax);
    Err(PatternError::NotCanonical { canonical: canonical.into_owned(), why })
}

/// Why `pattern` is not canonical, in words: its first spelling that differs.
fn first_difference(pattern: &str, syntax: Syntax) -> String {
    let bytes = pattern.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (bytes.get(i + 1).copied(), bytes.get(i + 2).copied())
                else {
                    break;
                };
                let v = hex(h).zip(hex(l)).map_or(0, |(h, l)| h << 4 | l);
                let written = &pattern[i..i + 3];
                if is_literal(v) {
                    return format!("`{written}` is decoded to `{}`", char::from(v));
                }
                if h.is_ascii_lowercase() || l.is_ascii_lowercase() {
                    return format!(
                        "escapes have upper-case hex (`{}`)",
                        written.to_ascii_uppercase()
                    );
                }
                i += 3;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                return "`//` is merged into `/`".to_string();
            }
            b'?' if syntax == Syntax::Glob => i += 1,
            b'+' => return "`+` is sent as `%2B` (a plus to every upstream)".to_string(),
            0x80..=0xff => {
                let c = pattern[i..].chars().next().unwrap_or_default();
                let mut escaped = String::new();
                for b in c.encode_utf8(&mut [0; 4]).bytes() {
                    push_escape(&mut escaped, b);
                }
                return format!("`{c}` is percent-encoded as UTF-8 (`{escaped}`)");
            }
            b if !is_literal(b) && b != b'/' => {
                let mut escaped = String::new();
                push_escape(&mut escaped, b);
                return format!("`{}` is escaped (`{escaped}`)", char::from(b));
            }
            _ => i += 1,
        }
    }
    "the spelling differs".to_string()
}

/// [`normalize`], and for patterns the same form with what only patterns hold: a
/// glob's `?` is kept, non-ASCII is encoded (a policy is text, a request never holds it).
fn canonical(raw: &str, mode: Mode) -> Result<Cow<'_, str>, PathError> {
    if already_canonical(raw, mode) {
        return Ok(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOrigin);
    }
    let mut out = String::with_capacity(raw.len() + 8);
    // Decode one segment at a time so dot-segments are seen after decoding.
    for seg in raw.split('/').skip(1) {
        if seg.is_empty() {
            continue;
        }
        let start = out.len();
        out.push('/');
        let sb = seg.as_bytes();
        // Whether the canonical segment holds a `%25` (an encoded `%`) to look behind,
        // or the escape of a byte that begins overlong UTF-8 when a continuation follows.
        let (mut escaped_percent, mut overlong_lead) = (false, false);
        let mut i = 0;
        while i < sb.len() {
            let b = sb[i];
            match b {
                b'%' => {
                    let (Some(h), Some(l)) =
                        (sb.get(i + 1).and_then(|b| hex(*b)), sb.get(i + 2).and_then(|b| hex(*b)))
                    else {
                        return Err(PathError::BadEscape);
                    };
                    let v = h << 4 | l;
                    match v {
                        b'/' | b'\\' => return Err(PathError::EncodedSlash),
                        // A hop that decodes it (nginx `proxy_pass` with a URI) would hand
                        // a Java server a path parameter after all.
                        b';' => return Err(PathError::PathParameter),
                        0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                        v if is_literal(v) => out.push(char::from(v)),
                        v => {
                            escaped_percent |= v == b'%';
                            overlong_lead |= matches!(v, 0xC0 | 0xC1 | 0xE0 | 0xF0);
                            push_escape(&mut out, v);
                        }
                    }
                    i += 3;
                    continue;
                }
                b'\\' => return Err(PathError::Backslash),
                0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                // Non-ASCII never reaches here through http::Uri, but be exact anyway.
                0x80..=0xff if mode == Mode::Request => return Err(PathError::ControlCharacter),
                // Refused below, once the segment is known (`..;` or a parameter).
                b';' => out.push(';'),
                b'?' if mode == Mode::Pattern(Syntax::Glob) => out.push('?'),
                b if is_literal(b) => out.push(char::from(b)),
                // `+`, and what a client should have escaped (`"`, `{`, `|`, ...).
                b => push_escape(&mut out, b),
            }
            i += 1;
        }
        let decoded = &out[start + 1..];
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
        // `%252F`, `%2561`: what a second decoding hop would turn into another character
        // (`%2F`, `a`), refused. Looked for in the canonical segment, where `%25%32%46`
        // has become `%252F` too.
        let mut rest = if escaped_percent { decoded.as_bytes() } else { b"" };
        while let Some(at) = rest.windows(3).position(|w| w == b"%25") {
            rest = &rest[at + 3..];
            if double_encoded(rest) {
                return Err(PathError::DoubleEncoded);
            }
        }
        if overlong_lead && overlong(decoded.as_bytes()) {
            return Err(PathError::Overlong);
        }
        // Tomcat, Jetty, Spring and Shiro drop `;params` from each segment before
        // routing, so `/admin;x/secret` is `/admin/secret` to them but not to a path
        // rule; `..;x` is even `..`. Refused, as Spring's StrictHttpFirewall does.
        if let Some((before, _)) = decoded.split_once(';') {
            if before == ".." || before == "." {
                return Err(PathError::MatrixDots);
            }
            return Err(PathError::PathParameter);
        }
    }
    if out.is_empty() || raw.ends_with('/') {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        let cases = [
            ("/", "/"),
            ("/api", "/api"),
            ("/api/", "/api/"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/%7Euser", "/~user"),
            ("/%41%42c", "/ABc"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/deploy/42", "/deploy/42"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/...", "/a/..."),
            // A literal `%` stays encoded; only a `%25` that a second decoding turns into
            // another character (two hex digits after it) is refused.
            ("/100%25", "/100%25"),
            ("/a%25b", "/a%25b"),
            ("/100%25off", "/100%25off"),
            ("/a%25%7D", "/a%25%7D"),
            // `:` and `@` and the sub-delims but `+` and `;` are what frameworks decode:
            // decoded, in either case of hex, so a rule on `k1:revoke` sees `k1%3Arevoke`.
            ("/v1/keys/k1%3Arevoke", "/v1/keys/k1:revoke"),
            ("/v1/keys/k1%3arevoke", "/v1/keys/k1:revoke"),
            ("/v1/keys/k1:revoke", "/v1/keys/k1:revoke"),
            ("/users/%40me/tokens", "/users/@me/tokens"),
            ("/%21%24%26%27%28%29%2A%2C%3D", "/!$&'()*,="),
            ("/!$&'()*,=:@", "/!$&'()*,=:@"),
            ("/a%2ab", "/a*b"),
            // Mixed with unreserved escapes and ones that stay.
            ("/%61dmin%3A%7e%20x", "/admin:~%20x"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            // `+` is `%2B`: a plus to every upstream, where S3 reads a raw `+` as a space.
            ("/c%2B%2B", "/c%2B%2B"),
            ("/c%2b%2b", "/c%2B%2B"),
            ("/c++", "/c%2B%2B"),
            // `%`, `?` and `#` stay escapes: decoded, they would end the path or escape.
            ("/a%25", "/a%25"),
            ("/a%3F", "/a%3F"),
            ("/a%23b", "/a%23b"),
            // What a client should have escaped, escaped: one spelling per character.
            ("/a{b}", "/a%7Bb%7D"),
            ("/a|b\"", "/a%7Cb%22"),
            ("/[x]^", "/%5Bx%5D%5E"),
            ("/a%7b", "/a%7B"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn a_canonical_path_is_borrowed() {
        for raw in ["/", "/api/v1/x", "/v1/keys/k1:revoke", "/users/@me/", "/a*b/~x"] {
            assert!(matches!(normalize(raw), Ok(Cow::Borrowed(_))), "{raw}");
        }
        for raw in ["/a%3Ab", "//a", "/a+b", "/a%20b"] {
            assert!(matches!(normalize(raw), Ok(Cow::Owned(_))), "{raw}");
        }
    }

    #[test]
    fn ambiguous_paths_are_rejected() {
        let cases = [
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedSlash),
            ("/a\\b", PathError::Backslash),
            ("/..", PathError::DotSegment),
            ("/a/../admin", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a/%2e%2e/admin", PathError::DotSegment),
            ("/a/.%2E/admin", PathError::DotSegment),
            ("/a/%2e/b", PathError::DotSegment),
            ("/a/..;/admin", PathError::MatrixDots),
            ("/a/..;jsessionid=1/admin", PathError::MatrixDots),
            ("/a/%2e%2e;/admin", PathError::MatrixDots),
            ("/a;b=c", PathError::PathParameter),
            ("/api/admin;x/secret", PathError::PathParameter),
            ("/api/admin;/secret", PathError::PathParameter),
            ("/app;jsessionid=1", PathError::PathParameter),
            ("/a%3Bb", PathError::PathParameter),
            ("/admin%3bx/secret", PathError::PathParameter),
            // Decoding `:` and `=` must not let a parameter through.
            ("/a%3A;b%3Dc", PathError::PathParameter),
            ("/a%00b", PathError::ControlCharacter),
            ("/a%0ab", PathError::ControlCharacter),
            ("/public/%252e%252e/admin", PathError::DoubleEncoded),
            ("/public%252Fadmin", PathError::DoubleEncoded),
            ("/public%252fadmin", PathError::DoubleEncoded),
            ("/public/%253Bx/admin", PathError::DoubleEncoded),
            ("/a%255Cb", PathError::DoubleEncoded),
            ("/a%25252Fb", PathError::DoubleEncoded),
            ("/a%2500", PathError::DoubleEncoded),
            // Any character, not only separators: a second decoding hop (nginx's
            // `proxy_pass` with a URI in front of the application, code that decodes
            // `PATH_INFO` again) reads `%2561dmin` as `admin`, past a deny on `/admin/**`.
            ("/%2561dmin/x", PathError::DoubleEncoded),
            ("/a%2541", PathError::DoubleEncoded),
            ("/my%2520docs", PathError::DoubleEncoded),
            ("/caf%25C3%25A9", PathError::DoubleEncoded),
            ("/a%2525", PathError::DoubleEncoded),
            ("/a%25%36%31", PathError::DoubleEncoded),
            // The characters after `%25` encoded too: the canonical form is `%252F`.
            ("/a%25%32%46b", PathError::DoubleEncoded),
            ("/a/%25%32%65%25%32%65/x", PathError::DoubleEncoded),
            ("/a%25%33%42x", PathError::DoubleEncoded),
            ("/a%25%35%43b", PathError::DoubleEncoded),
            ("/a%25%30%30b", PathError::DoubleEncoded),
            ("/a%2525%32%46b", PathError::DoubleEncoded),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%3", PathError::BadEscape),
            ("*", PathError::NotOrigin),
            ("", PathError::NotOrigin),
            ("/caf\u{e9}", PathError::ControlCharacter),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }

    /// An overlong UTF-8 sequence spells an ASCII character in two to four bytes:
    /// `%C0%AE` is `.` and `%C0%AF` is `/` to a lenient decoder (IIS's Unicode
    /// traversal, Tomcat before 6.0.18, JBoss), past every check made on the escapes.
    /// Valid UTF-8 never holds one; a Latin-1 `%C0` before anything but a continuation
    /// byte is no such sequence and passes.
    #[test]
    fn overlong_utf8_escapes_are_rejected() {
        for raw in [
            "/%C0%AE%C0%AE/admin",
            "/public/%c0%ae%c0%ae/admin",
            "/a%C0%AFb",
            "/a%C1%9Cb",
            "/a%C0%80b",
            "/%E0%80%AE%E0%80%AE/x",
            "/a%E0%80%AFb",
            "/a%E0%9F%BFb",
            "/%F0%80%80%AE",
            "/a%F0%8F%BF%BFb",
        ] {
            assert_eq!(normalize(raw), Err(PathError::Overlong), "{raw}");
        }
        for (raw, want) in [
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%C0x", "/%C0x"),
            ("/%C0%20", "/%C0%20"),
            ("/%E0%A0%80", "/%E0%A0%80"),
            ("/%F0%90%80%80", "/%F0%90%80%80"),
            ("/%E2%82%AC", "/%E2%82%AC"),
            ("/%C2%A0", "/%C2%A0"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn normalization_is_idempotent() {
        for raw in ["/a//b/%7e/%41%2A", "/x/y/", "/%E2%82%AC", "/a%3a%40+%2b{%25}", "/!$&'()*,=:@"]
        {
            let once = normalize(raw).map(Cow::into_owned).unwrap_or_default();
            assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()), "{raw}");
        }
    }

    #[test]
    fn patterns_in_canonical_form_are_accepted() {
        for (pattern, syntax) in [
            ("/admin/**", Syntax::Glob),
            ("/v1/keys/*:revoke", Syntax::Glob),
            ("/users/@me/**", Syntax::Glob),
            ("/caf%C3%A9/**", Syntax::Glob),
            ("/c%2B%2B/*", Syntax::Glob),
            ("/v?/admin", Syntax::Glob),
            // `%3F` is a literal `?` (requests keep it escaped), not a wildcard.
            ("/what%3F/**", Syntax::Glob),
            ("/100%25", Syntax::Glob),
            ("/", Syntax::Literal),
            ("/users/@me", Syntax::Literal),
            ("/v1/keys/", Syntax::Literal),
            ("/caf%C3%A9", Syntax::Literal),
        ] {
            assert_eq!(check_pattern(pattern, syntax), Ok(()), "{pattern}");
        }
    }

    #[test]
    fn patterns_not_in_canonical_form_say_how_to_write_them() {
        let cases = [
            ("/caf%c3%a9/**", Syntax::Glob, "/caf%C3%A9/**", "escapes have upper-case hex (`%C3`)"),
            ("/%61dmin/**", Syntax::Glob, "/admin/**", "`%61` is decoded to `a`"),
            ("/v1/keys/*%3Arevoke", Syntax::Glob, "/v1/keys/*:revoke", "`%3A` is decoded to `:`"),
            ("/users/%40me/**", Syntax::Glob, "/users/@me/**", "`%40` is decoded to `@`"),
            ("/c++/**", Syntax::Glob, "/c%2B%2B/**", "`+` is sent as `%2B`"),
            ("/a{id}", Syntax::Glob, "/a%7Bid%7D", "`{` is escaped (`%7B`)"),
            (
                "/caf\u{e9}/**",
                Syntax::Glob,
                "/caf%C3%A9/**",
                "`\u{e9}` is percent-encoded as UTF-8 (`%C3%A9`)",
            ),
            ("/a//b", Syntax::Glob, "/a/b", "`//` is merged into `/`"),
            ("/users/%40me", Syntax::Literal, "/users/@me", "`%40` is decoded to `@`"),
            ("/what?", Syntax::Literal, "/what%3F", "`?` is escaped (`%3F`)"),
        ];
        for (pattern, syntax, canonical, why) in cases {
            match check_pattern(pattern, syntax) {
                Err(PatternError::NotCanonical { canonical: c, why: w }) => {
                    assert_eq!(c, canonical, "{pattern}");
                    assert!(w.starts_with(why), "{pattern}: {w}");
                    let msg = PatternError::NotCanonical { canonical: c, why: w }.message(pattern);
                    assert!(msg.ends_with(&format!("write `{canonical}`")), "{msg}");
                }
                other => panic!("{pattern}: {other:?}"),
            }
        }
    }

    #[test]
    fn patterns_only_refused_paths_match_are_errors() {
        for (pattern, want) in [
            ("/a/../admin/**", PathError::DotSegment),
            ("/a%2Fb/**", PathError::EncodedSlash),
            ("/admin;x/**", PathError::PathParameter),
            ("/a%252F/**", PathError::DoubleEncoded),
            ("/a%zz", PathError::BadEscape),
            ("/100%", PathError::BadEscape),
            ("admin/**", PathError::NotOrigin),
        ] {
            assert_eq!(check_pattern(pattern, Syntax::Glob), Err(PatternError::Refused(want)));
        }
    }

    #[test]
    fn an_encoded_star_in_a_glob_names_the_wildcard() {
        for pattern in ["/a%2Ab", "/a%2ab"] {
            assert_eq!(
                check_pattern(pattern, Syntax::Glob),
                Err(PatternError::EncodedStar { canonical: "/a*b".into() })
            );
        }
        // The wildcard matches the literal `*` requests decode `%2A` to.
        assert_eq!(normalize("/a%2Ab").as_deref(), Ok("/a*b"));
        // `%252A` is not an encoded `*` but a doubly encoded one: requests spelling it are
        // refused (a second decoding hop reads `*`), so no pattern can match it.
        assert_eq!(
            check_pattern("/a%252A", Syntax::Glob),
            Err(PatternError::Refused(PathError::DoubleEncoded))
        );
    }
}
