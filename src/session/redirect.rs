//! Where a browser may be sent after signing in or out: only back to this proxy.
//!
//! A target is either a path on the current host (`/x?y`) or an `https://` URL whose
//! host is the current host or one that a route names explicitly (an exact or
//! `*.suffix` host; a catch-all `*` route does not make every host on the Internet a
//! valid target). Everything else is refused before a session is created: other
//! hosts, scheme-relative `//evil`, `/\evil` (browsers read `\` as `/`), userinfo
//! tricks (`https://ok@evil`), control characters, and all of these percent-encoded.

use crate::config::{Config, HostMatch};

/// Longest return URL accepted.
pub const MAX_LEN: usize = 2048;

/// `url` (`https://host/path?query`, this request's own) cut to fit [`MAX_LEN`]: as
/// it is, else without its query, else the host's root. A deep link too long to keep
/// then still signs the user in, instead of failing at the callback.
pub fn shorten(url: &str) -> std::borrow::Cow<'_, str> {
    if url.len() <= MAX_LEN {
        return url.into();
    }
    let without_query = url.split_once('?').map_or(url, |(u, _)| u);
    if without_query.len() <= MAX_LEN {
        return without_query.into();
    }
    let root = url
        .strip_prefix("https://")
        .and_then(|rest| rest.find('/').map(|i| &url[..("https://".len() + i + 1)]));
    root.filter(|r| r.len() <= MAX_LEN).unwrap_or("/").into()
}

/// Why a target was refused (for the log; the response says `invalid-redirect`).
pub type Refused = &'static str;

/// Check `target` and return the absolute URL to redirect to. `authority` is the
/// request's own `host[:port]`, already validated.
pub fn check(target: &str, authority: &str, cfg: &Config) -> Result<String, Refused> {
    if target.is_empty() || target.len() > MAX_LEN {
        return Err("empty or overlong target");
    }
    // Only what comes before the query decides where the browser goes; the query and
    // fragment (a deep link's `?q=hello%20world`, `?p=C%3A%5Ctmp`) are carried as they
    // are and need only be fit for a header.
    let (head, tail) = target.split_at(target.find(['?', '#']).unwrap_or(target.len()));
    if tail.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("control character or space");
    }
    suspicious(head, false)?;
    // Encoded variants: decode a few times and apply the same checks.
    let mut decoded = head.to_string();
    for _ in 0..3 {
        let next = percent_encoding::percent_decode_str(&decoded).decode_utf8_lossy().into_owned();
        if next == decoded {
            break;
        }
        suspicious(&next, true)?;
        decoded = next;
    }
    if let Some(rest) = target.strip_prefix('/') {
        if rest.starts_with('/') {
            return Err("scheme-relative target");
        }
        return Ok(format!("https://{authority}{target}"));
    }
    let Some(rest) = target.strip_prefix("https://") else {
        return Err("not https and not a path");
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let auth = &rest[..end];
    if auth.is_empty() || auth.contains('@') {
        return Err("userinfo or empty host");
    }
    // A host is never percent-encoded as the proxy writes one; a browser would decode it.
    if auth.contains('%') {
        return Err("percent-encoded host");
    }
    let parsed: http::uri::Authority = auth.parse().map_err(|_| "bad host")?;
    let host = parsed.host().trim_end_matches('.').to_ascii_lowercase();
    let own = authority.parse::<http::uri::Authority>().ok();
    let own_host = own
        .as_ref()
        .map(|a| a.host().trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default();
    if host != own_host && !served(&host, cfg) {
        return Err("host is not served by any route");
    }
    // The proxy serves its hosts on the port this browser used; another port of the same
    // name is another service, not this proxy.
    let own_port = own.as_ref().and_then(|a| a.port_u16()).unwrap_or(443);
    if parsed.port_u16().unwrap_or(443) != own_port {
        return Err("another port than this proxy's");
    }
    let path = &rest[end..];
    if !(path.is_empty() || path.starts_with('/') || path.starts_with('?')) {
        return Err("fragment-only target");
    }
    Ok(format!(
        "https://{}{}",
        parsed.as_str().to_ascii_lowercase(),
        if path.is_empty() { "/" } else { path }
    ))
}

/// `decoded`: `s` is a percent-decoded form of the target. Whitespace that is not a
/// control character is then allowed: a deep link's path holds `%20`
/// (`/docs/Q3%20report.pdf`), a no-break space or an ideographic space (U+3000, common in
/// Japanese file names), and none of them, unlike a tab or a newline (which URL parsers
/// delete, joining `/\t/` into `//`), can make two slashes one, nor lead the target (it
/// starts with `/` or `https://` as sent).
fn suspicious(s: &str, decoded: bool) -> Result<(), Refused> {
    if s.chars().any(|c| c.is_control() || (c.is_whitespace() && !decoded) || c == '\\') {
        return Err("control character, space or backslash");
    }
    if s.starts_with("//") || s.starts_with("/\\") {
        return Err("scheme-relative target");
    }
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("javascript:") || lower.starts_with("data:") {
        return Err("script scheme");
    }
    Ok(())
}

/// A route names this host explicitly.
fn served(host: &str, cfg: &Config) -> bool {
    cfg.routes.iter().any(|r| !matches!(r.host, HostMatch::Any) && r.host.matches(host))
}
