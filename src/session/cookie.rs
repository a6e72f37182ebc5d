//! Request cookies in, `Set-Cookie` out, and splitting a sealed value over several
//! cookies when it would not fit in one (browsers keep at most ~4 KB per cookie).
//!
//! Layout: a value that fits is `NAME=<sealed>`. A larger one is `NAME=c<N>` plus
//! `NAME_0` … `NAME_<N-1>` holding the pieces in order. A sealed value starts with its
//! version digit, so the `c` marker cannot be mistaken for one.
//!
//! Names: the configured `[session] cookie_name` (`_portcullis` by default) goes on the
//! wire behind a cookie prefix ([`session_name`]): `__Host-_portcullis` when the cookie
//! is host-only (no `cookie_domain`), `__Secure-_portcullis` otherwise. The sign-in
//! cookie is always host-only: `__Host-_portcullis_login_<16>`. Browsers keep a
//! `__Host-` cookie only when it was set by this very host over a secure origin,
//! `Secure`, `Path=/` and without `Domain`, so a page on a sibling host
//! (`evil.example.com`) cannot plant or shadow one (cookie tossing): what it can plant
//! has another name, which is never read as a credential.

use http::header::{HeaderMap, HeaderValue, COOKIE};

/// Room for one cookie's value, leaving space for its name and attributes under 4096.
pub const CHUNK: usize = 3800;
/// At most this many chunks (about 30 KB of session).
pub const MAX_CHUNKS: usize = 8;

/// The prefix of a host-only cookie (RFC 6265bis §4.1.3.2): set by this host only.
pub const HOST_PREFIX: &str = "__Host-";
/// The prefix of a `Secure` cookie that carries a `Domain` (`__Host-` forbids one).
pub const SECURE_PREFIX: &str = "__Secure-";

/// The wire name of the session cookie for the configured `base` name: `__Host-<base>`
/// for a host-only cookie, `__Secure-<base>` when it is shared with `domain`.
pub fn session_name(base: &str, domain: Option<&str>) -> String {
    match domain {
        None => format!("{HOST_PREFIX}{base}"),
        Some(_) => format!("{SECURE_PREFIX}{base}"),
    }
}

/// Whether a cookie name is one the proxy owns, or owned before the prefixes:
/// `_portcullis*`, bare or behind `__Host-` / `__Secure-` (in any case: browsers match
/// the prefixes case-insensitively). Such cookies never reach an upstream, and an
/// upstream never sets them.
pub fn is_proxy_cookie(name: &[u8]) -> bool {
    let unprefixed = [HOST_PREFIX, SECURE_PREFIX]
        .iter()
        .find_map(|p| {
            let (head, rest) = name.split_at_checked(p.len())?;
            head.eq_ignore_ascii_case(p.as_bytes()).then_some(rest)
        })
        .unwrap_or(name);
    unprefixed.starts_with(b"_portcullis")
}

/// The request's cookies as `(name, value)` pairs, in order. Read pair by pair: a
/// pair that is not visible ASCII (a UTF-8 value an application or a sibling host set:
/// browsers send such bytes as they are) is skipped alone, not with the whole header.
/// A browser sends every cookie in one `Cookie` header, so skipping the header hid the
/// session and the sign-in cookie beside it: the browser was sent to sign in, and every
/// callback failed, for as long as that one cookie lived.
pub fn parse(headers: &HeaderMap) -> Vec<(&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.is_ascii())?;
            let (n, v) = pair.trim().split_once('=')?;
            Some((n.trim(), v.trim()))
        })
        .collect()
}

/// Whether the request carries the named cookie or any of its chunks.
pub fn present(cookies: &[(&str, &str)], name: &str) -> bool {
    cookies.iter().any(|(n, _)| *n == name || is_chunk_of(n, name))
}

fn is_chunk_of(candidate: &str, name: &str) -> bool {
    candidate
        .strip_prefix(name)
        .and_then(|r| r.strip_prefix('_'))
        .is_some_and(|i| !i.is_empty() && i.len() <= 2 && i.bytes().all(|b| b.is_ascii_digit()))
}

/// Reassemble a possibly chunked value. `None` when absent; an error when duplicated
/// (cookie tossing from a sibling domain sends a second cookie of the same name: refuse
/// to guess which is ours), incomplete, or not laid out as [`write()`] lays a value out.
/// Only that one layout is read (`c2` to `c8`, never `c+2`, `c02` or `c1`; every chunk
/// but the last exactly [`CHUNK`] long, the last not empty), so one value has one
/// spelling on the wire, and a cookie no proxy wrote is refused before it is opened.
pub fn read(cookies: &[(&str, &str)], name: &str) -> Option<Result<String, ()>> {
    let mut heads = cookies.iter().filter(|(n, _)| *n == name);
    let head = heads.next()?.1;
    if heads.next().is_some() {
        return Some(Err(()));
    }
    let Some(count) = head.strip_prefix('c') else {
        return Some(Ok(head.to_string()));
    };
    let Some(count) = chunk_count(count) else { return Some(Err(())) };
    let mut out = String::with_capacity(count * CHUNK);
    for i in 0..count {
        let chunk_name = format!("{name}_{i}");
        let mut parts = cookies.iter().filter(|(n, _)| *n == chunk_name);
        let (Some(part), None) = (parts.next(), parts.next()) else { return Some(Err(())) };
        let last = i + 1 == count;
        let fits =
            if last { !part.1.is_empty() && part.1.len() <= CHUNK } else { part.1.len() == CHUNK };
        if !fits {
            return Some(Err(()));
        }
        out.push_str(part.1);
    }
    Some(Ok(out))
}

/// The chunk count of a head cookie's `c<N>` as [`write()`] spells it: decimal digits
/// without sign or leading zero, 2 to [`MAX_CHUNKS`] (a value that fits one cookie is
/// never chunked).
fn chunk_count(text: &str) -> Option<usize> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.starts_with('0') {
        return None;
    }
    text.parse::<usize>().ok().filter(|n| (2..=MAX_CHUNKS).contains(n))
}

/// Cookie attributes shared by every cookie the proxy sets.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    pub domain: Option<&'a str>,
    /// Seconds; 0 deletes.
    pub max_age: u64,
}

/// `Set-Cookie: NAME=VALUE; Path=/; Secure; HttpOnly; SameSite=Lax[; Domain=..]; Max-Age=..`
pub fn set_cookie(name: &str, value: &str, attrs: &Attrs<'_>) -> Option<HeaderValue> {
    let mut s = format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        attrs.max_age
    );
    if let Some(d) = attrs.domain {
        s.push_str("; Domain=");
        s.push_str(d);
    }
    HeaderValue::from_str(&s).ok()
}

/// The `Set-Cookie` headers that store `value` under `name`, chunked when needed, and
/// delete stale chunks the request still carried. `None` if it is too large.
pub fn write(
    cookies: &[(&str, &str)],
    name: &str,
    value: &str,
    attrs: &Attrs<'_>,
) -> Option<Vec<HeaderValue>> {
    let mut out = Vec::new();
    let used = if value.len() <= CHUNK {
        out.push(set_cookie(name, value, attrs)?);
        0
    } else {
        // Sealed values are ASCII (base64url), so byte chunks are char boundaries.
        let pieces: Vec<&str> =
            value.as_bytes().chunks(CHUNK).filter_map(|c| std::str::from_utf8(c).ok()).collect();
        if pieces.len() > MAX_CHUNKS {
            return None;
        }
        out.push(set_cookie(name, &format!("c{}", pieces.len()), attrs)?);
        for (i, p) in pieces.iter().enumerate() {
            out.push(set_cookie(&format!("{name}_{i}"), p, attrs)?);
        }
        pieces.len()
    };
    let deleted = Attrs { domain: attrs.domain, max_age: 0 };
    for (n, _) in cookies.iter().filter(|(n, _)| is_chunk_of(n, name)) {
        let idx: usize = n.rsplit('_').next().and_then(|i| i.parse().ok()).unwrap_or(usize::MAX);
        if idx >= used {
            out.push(set_cookie(n, "", &deleted)?);
        }
    }
    Some(out)
}

/// Delete the named cookie and every chunk of it the request carried.
pub fn clear(cookies: &[(&str, &str)], name: &str, domain: Option<&str>) -> Vec<HeaderValue> {
    let deleted = Attrs { domain, max_age: 0 };
    let mut names: Vec<&str> = vec![name];
    names.extend(cookies.iter().map(|(n, _)| *n).filter(|n| is_chunk_of(n, name)));
    names.dedup();
    names.into_iter().filter_map(|n| set_cookie(n, "", &deleted)).collect()
}
