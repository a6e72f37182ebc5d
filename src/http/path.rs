//! Path normalization: the proxy authorizes exactly the path it forwards.
//!
//! Upstreams disagree about what `%2F`, `..`, `..;` or `\` mean, so an attacker who
//! finds a path that the proxy reads one way and the upstream another can slip past a
//! path rule (the `..;` trick against Tomcat, `%2e%2e` against naive decoders). Instead
//! of guessing, ambiguous paths are rejected and everything else is put into one
//! canonical form that is both matched by policy and sent upstream.

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
                "doubly encoded `/`, `\\`, `.`, `;` or control character in path"
            }
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
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

/// Whether the bytes after a `%25` (any more `25`s skipped) spell the hex of a byte that
/// [`normalize`] refuses when it is encoded once: `/`, `\`, `.`, `;`, a control byte.
fn double_encoded(mut rest: &[u8]) -> bool {
    while let [b'2', b'5', tail @ ..] = rest {
        rest = tail;
    }
    match rest {
        [h, l, ..] => match (hex(*h), hex(*l)) {
            (Some(h), Some(l)) => {
                matches!(h << 4 | l, b'/' | b'\\' | b'.' | b';' | 0..=0x1f | 0x7f)
            }
            _ => false,
        },
        _ => false,
    }
}

/// Returns the canonical form of a raw request path (without query):
/// - percent-escapes of unreserved characters are decoded (`%7E` → `~`), all other
///   escapes are kept with upper-case hex, so `%41` and `A` cannot be told apart by the
///   policy but can be by nobody else either;
/// - empty segments are merged (`//admin` → `/admin`), since many upstreams do so;
/// - encoded `/` or `\`, a raw `\`, `.` / `..` segments (also when encoded), `;`
///   or `%3B` (path parameters, which Java servers strip before routing; encoded, a
///   decoding hop in between would turn it back into one), control characters and
///   malformed escapes are rejected.
///
/// The returned string is what policy sees and what is forwarded.
pub fn normalize(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOrigin);
    }
    let mut out = String::with_capacity(raw.len());
    // Decode one segment at a time so dot-segments are seen after decoding.
    for seg in raw.split('/').skip(1) {
        if seg.is_empty() {
            continue;
        }
        let start = out.len();
        out.push('/');
        let sb = seg.as_bytes();
        // Whether the canonical segment holds a `%25` (an encoded `%`) to look behind.
        let mut escaped_percent = false;
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
                        v if is_unreserved(v) => out.push(v as char),
                        v => {
                            escaped_percent |= v == b'%';
                            out.push('%');
                            out.push(char::from(b"0123456789ABCDEF"[usize::from(v >> 4)]));
                            out.push(char::from(b"0123456789ABCDEF"[usize::from(v & 15)]));
                        }
                    }
                    i += 3;
                }
                b'\\' => return Err(PathError::Backslash),
                0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                // Non-ASCII never reaches here through http::Uri, but be exact anyway.
                0x80..=0xff => return Err(PathError::ControlCharacter),
                _ => {
                    out.push(b as char);
                    i += 1;
                }
            }
        }
        let decoded = &out[start + 1..];
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
        // `%252F`, `%25252e`: what a second (third…) decoding hop would turn into `%2F`,
        // `..` or `;`, refused like their single forms. Looked for in the canonical
        // segment, where `%25%32%46` has become `%252F` too.
        let mut rest = if escaped_percent { decoded.as_bytes() } else { b"" };
        while let Some(at) = rest.windows(3).position(|w| w == b"%25") {
            rest = &rest[at + 3..];
            if double_encoded(rest) {
                return Err(PathError::DoubleEncoded);
            }
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
    Ok(out)
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
            // A literal `%` stays encoded; only the doubly encoded separators are refused.
            ("/100%25", "/100%25"),
            ("/a%25b", "/a%25b"),
            ("/a%2541", "/a%2541"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
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
            ("/a%00b", PathError::ControlCharacter),
            ("/a%0ab", PathError::ControlCharacter),
            ("/public/%252e%252e/admin", PathError::DoubleEncoded),
            ("/public%252Fadmin", PathError::DoubleEncoded),
            ("/public%252fadmin", PathError::DoubleEncoded),
            ("/public/%253Bx/admin", PathError::DoubleEncoded),
            ("/a%255Cb", PathError::DoubleEncoded),
            ("/a%25252Fb", PathError::DoubleEncoded),
            ("/a%2500", PathError::DoubleEncoded),
            // The characters after `%25` encoded too: the canonical form is `%252F`.
            ("/a%25%32%46b", PathError::DoubleEncoded),
            ("/a/%25%32%65%25%32%65/x", PathError::DoubleEncoded),
            ("/a%25%33%42x", PathError::DoubleEncoded),
            ("/a%25%35%43b", PathError::DoubleEncoded),
            ("/a%25%30%30b", PathError::DoubleEncoded),
            ("/a%2525%32%46b", PathError::DoubleEncoded),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("*", PathError::NotOrigin),
            ("", PathError::NotOrigin),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn normalization_is_idempotent() {
        for raw in ["/a//b/%7e/%41%2A", "/x/y/", "/%E2%82%AC"] {
            let once = normalize(raw).unwrap_or_default();
            assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()));
        }
    }
}
