//! Putting back, in an upstream's answer, the path prefix a `strip_prefix` route took off
//! the request. The application serves at its root and knows nothing of `/billing`, so
//! its `Location: /login` and its cookies' `Path=/` would send the browser out of the
//! route (to another route, or to none). nginx users write `proxy_redirect` and
//! `proxy_cookie_path` for this; here it is part of `strip_prefix` (`restore_prefix =
//! false` turns it off for an application that links outside its prefix on purpose).
//!
//! Headers are read and written as bytes: a value that is not UTF-8 keeps its bytes, and
//! the prefix, a canonical path, adds no control character (and `HeaderValue` refuses
//! one anyway), so no rewrite can put a CR or LF into an answer.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

/// How the upstream's paths map back to the client's for one request.
#[derive(Debug, Clone, Copy)]
pub struct Restore<'a> {
    /// The prefix the route removed, without its trailing `/` (`/billing`); not empty.
    pub prefix: &'a str,
    /// The upstream URL's base path (`/v2`, or empty): what the upstream's paths begin
    /// with in place of the prefix.
    pub base: &'a str,
    /// The `Host` the client sent (in its routed form), if known.
    pub client_host: Option<&'a [u8]>,
    /// The `Host` the upstream was sent.
    pub upstream_host: &'a [u8],
}

impl Restore<'_> {
    /// Puts the prefix back into `Location`, `Content-Location`, `Service-Worker-Allowed`
    /// (a service worker scope's path, read as a `Location`'s) and every `Set-Cookie`'s
    /// `Path` of an upstream's answer; anything else is left as it is.
    pub fn apply(&self, h: &mut HeaderMap) {
        self.rewrite(h, header::LOCATION, Self::location);
        self.rewrite(h, header::CONTENT_LOCATION, Self::location);
        let sw = super::headers::SERVICE_WORKER_ALLOWED.clone();
        self.rewrite(h, sw, Self::location);
        self.rewrite(h, header::SET_COOKIE, Self::set_cookie);
    }

    fn rewrite(&self, h: &mut HeaderMap, name: HeaderName, f: fn(&Self, &[u8]) -> Option<Vec<u8>>) {
        if !h.contains_key(&name) {
            return;
        }
        if let Entry::Occupied(mut e) = h.entry(name) {
            for v in e.iter_mut() {
                let Some(new) = f(self, v.as_bytes()) else { continue };
                if let Ok(mut new) = HeaderValue::from_bytes(&new) {
                    new.set_sensitive(v.is_sensitive());
                    *v = new;
                }
            }
        }
    }

    /// A `Location` (or `Content-Location`) with the prefix put back: an absolute path
    /// (`/login` → `/billing/login`), or an absolute `http(s)` URL of the client's `Host`
    /// (its path gets the prefix) or of the upstream's (it becomes the path alone, as
    /// nginx's `proxy_redirect default` makes it: the upstream's address means nothing
    /// to a client). `None`, left as it is: a relative reference (the browser resolves it
    /// against the client's URL, prefix and all), another host (`//evil.example`, and
    /// `/\evil.example`, which browsers read the same), a URL with userinfo, a path that
    /// is not the upstream's ([`Restore::client_path`]).
    fn location(&self, v: &[u8]) -> Option<Vec<u8>> {
        match v {
            [b'/', b'/' | b'\\', ..] => None,
            [b'/', ..] => self.url(b"", v),
            _ => {
                let sep = v.windows(3).position(|w| w == b"://")?;
                let scheme = &v[..sep];
                if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https"))
                {
                    return None;
                }
                let after = &v[sep + 3..];
                let end = after
                    .iter()
                    .position(|b| matches!(b, b'/' | b'?' | b'#'))
                    .unwrap_or(after.len());
                let (authority, rest) = after.split_at(end);
                if authority.iter().any(|b| matches!(b, b'@' | b'\\')) {
                    return None;
                }
                if self.client_host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
                    self.url(&v[..v.len() - rest.len()], rest)
                } else if self.upstream_host.eq_ignore_ascii_case(authority) {
                    self.url(b"", rest)
                } else {
                    None
                }
            }
        }
    }

    /// `origin` then `rest` (path, query, fragment) with its path mapped to the client's
    /// ([`Restore::client_path`]); an empty path is the root.
    fn url(&self, origin: &[u8], rest: &[u8]) -> Option<Vec<u8>> {
        let end = rest.iter().position(|b| matches!(b, b'?' | b'#')).unwrap_or(rest.len());
        let (path, tail) = rest.split_at(end);
        let path = self.client_path(if path.is_empty() { b"/" } else { path })?;
        Some([origin, &path, tail].concat())
    }

    /// The client's path for one of the upstream's: the prefix, then what follows the
    /// upstream's base path. `None`, left as it is: a path outside the base path (not
    /// this route's), or, without a base path, one under the prefix already (an
    /// application that builds its links from `X-Forwarded-Prefix`: never prefixed twice).
    fn client_path(&self, path: &[u8]) -> Option<Vec<u8>> {
        let rest = if self.base.is_empty() {
            if under(path, self.prefix.as_bytes()).is_some() {
                return None;
            }
            path
        } else {
            under(path, self.base.as_bytes())?
        };
        Some([self.prefix.as_bytes(), rest].concat())
    }

    /// A `Set-Cookie` whose `Path` attributes (any case, blanks around, as browsers read
    /// them: RFC 6265 §5.2) get the prefix back; the cookie's own `name=value` is never
    /// read as one (a cookie may be named `Path`). `None`: nothing to change.
    fn set_cookie(&self, v: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(v.len() + self.prefix.len());
        let mut changed = false;
        for (i, attr) in v.split(|b| *b == b';').enumerate() {
            if i > 0 {
                out.push(b';');
            }
            let new = if i > 0 { self.path_attribute(attr) } else { None };
            changed |= new.is_some();
            out.extend_from_slice(new.as_deref().unwrap_or(attr));
        }
        changed.then_some(out)
    }

    fn path_attribute(&self, attr: &[u8]) -> Option<Vec<u8>> {
        let eq = attr.iter().position(|b| *b == b'=')?;
        if !attr[..eq].trim_ascii().eq_ignore_ascii_case(b"path") {
            return None;
        }
        let raw = &attr[eq + 1..];
        let start = eq + 1 + (raw.len() - raw.trim_ascii_start().len());
        let value = raw.trim_ascii();
        let path = self.cookie_path(value)?;
        Some([&attr[..start], &path, &attr[start + value.len()..]].concat())
    }

    /// A cookie path in the client's terms. One that covers every path the route
    /// reaches upstream (`/`, or one covering the base path) becomes the prefix itself,
    /// `/billing`, which browsers match against `/billing` and `/billing/…` and nothing
    /// else: exactly the route's paths (nginx's usual `proxy_cookie_path / /billing/;`
    /// would leave out `/billing` itself). A path browsers ignore (not beginning with
    /// `/`: they use the default path, the client's already) is left.
    fn cookie_path(&self, path: &[u8]) -> Option<Vec<u8>> {
        if !path.starts_with(b"/") {
            return None;
        }
        let covers_route = match self.base.as_bytes() {
            b"" => path == b"/",
            base => cookie_path_matches(path, base),
        };
        if covers_route {
            return Some(self.prefix.as_bytes().to_vec());
        }
        self.client_path(path)
    }
}

/// What follows `prefix` in `path` when `path` is `prefix` or below it (`""` or `/…`).
fn under<'p>(path: &'p [u8], prefix: &[u8]) -> Option<&'p [u8]> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with(b"/")).then_some(rest)
}

/// Whether a cookie with path `cookie` is sent for `path` (RFC 6265 §5.1.4 path-match).
fn cookie_path_matches(cookie: &[u8], path: &[u8]) -> bool {
    path.strip_prefix(cookie)
        .is_some_and(|rest| rest.is_empty() || cookie.ends_with(b"/") || rest.starts_with(b"/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &[u8] = b"10.0.0.12:8080";
    const CLIENT: &[u8] = b"app.example.com";

    fn restore(base: &'static str) -> Restore<'static> {
        Restore { prefix: "/billing", base, client_host: Some(CLIENT), upstream_host: UPSTREAM }
    }

    fn location(r: &Restore<'_>, v: &[u8]) -> Vec<u8> {
        r.location(v).unwrap_or_else(|| v.to_vec())
    }

    /// Absolute paths and URLs of this application get the prefix; relative references,
    /// other hosts and paths already prefixed are left as they are.
    #[test]
    fn locations_get_the_prefix_back_when_they_point_into_the_application() {
        let r = restore("");
        for (sent, want) in [
            ("/login", "/billing/login"),
            ("/", "/billing/"),
            ("/login?next=/x#top", "/billing/login?next=/x#top"),
            ("/caf%C3%A9", "/billing/caf%C3%A9"),
            // Already prefixed (X-Forwarded-Prefix at work): never twice.
            ("/billing", "/billing"),
            ("/billing/login", "/billing/login"),
            ("/billingx", "/billing/billingx"),
            // Relative: the browser resolves it against the client's URL.
            ("login", "login"),
            ("../x", "../x"),
            ("?page=2", "?page=2"),
            ("#top", "#top"),
            ("", ""),
            // Another host, however spelt.
            ("//evil.example/x", "//evil.example/x"),
            ("/\\evil.example/x", "/\\evil.example/x"),
            // Browsers drop a tab anywhere in a URL: `/<TAB>/evil.example` is
            // `//evil.example` to them, and gets the prefix in front, a path again.
            ("/\t/evil.example/x", "/billing/\t/evil.example/x"),
            (
                "https://app.example.com\t@evil.example/x",
                "https://app.example.com\t@evil.example/x",
            ),
            ("https://app.example.com:443/x", "https://app.example.com:443/x"),
            ("https://evil.example/login", "https://evil.example/login"),
            ("https://app.example.com.evil.example/x", "https://app.example.com.evil.example/x"),
            ("https://app.example.com@evil.example/x", "https://app.example.com@evil.example/x"),
            (
                "https://evil.example\\@app.example.com/x",
                "https://evil.example\\@app.example.com/x",
            ),
            ("javascript:alert(1)", "javascript:alert(1)"),
            ("ftp://app.example.com/x", "ftp://app.example.com/x"),
            // The client's Host: the URL stays absolute, its path gets the prefix.
            ("https://app.example.com/login", "https://app.example.com/billing/login"),
            ("HTTP://App.Example.COM/login?x=1", "HTTP://App.Example.COM/billing/login?x=1"),
            ("https://app.example.com", "https://app.example.com/billing/"),
            ("https://app.example.com?x", "https://app.example.com/billing/?x"),
            ("https://app.example.com/billing/x", "https://app.example.com/billing/x"),
            // Another port is another origin.
            ("https://app.example.com:8443/x", "https://app.example.com:8443/x"),
            // The upstream's own address: the path alone, as nginx's default makes it.
            ("http://10.0.0.12:8080/login?x=1", "/billing/login?x=1"),
            ("http://10.0.0.12:8080", "/billing/"),
            // Never a protocol-relative URL out of the upstream's address.
            ("http://10.0.0.12:8080//evil.example/x", "/billing//evil.example/x"),
            ("http://10.0.0.12/login", "http://10.0.0.12/login"),
        ] {
            assert_eq!(String::from_utf8_lossy(&location(&r, sent.as_bytes())), want, "{sent:?}");
        }
    }

    /// With a base path on the upstream URL, a path under it maps back to the prefix,
    /// any other is not this route's and is left.
    #[test]
    fn locations_under_the_upstreams_base_path_map_back_to_the_prefix() {
        let r = restore("/v2");
        for (sent, want) in [
            ("/v2/login", "/billing/login"),
            ("/v2", "/billing"),
            ("/v2/", "/billing/"),
            ("/v2x", "/v2x"),
            ("/login", "/login"),
            ("/billing/login", "/billing/login"),
            ("http://10.0.0.12:8080/v2/login", "/billing/login"),
            ("https://app.example.com/v2/x", "https://app.example.com/billing/x"),
        ] {
            assert_eq!(String::from_utf8_lossy(&location(&r, sent.as_bytes())), want, "{sent:?}");
        }
        // The prefix under the base path: the mapping decides, not the look of it.
        let r = Restore { prefix: "/api", ..restore("/api/v2") };
        assert_eq!(location(&r, b"/api/v2/x"), b"/api/x");
        assert_eq!(location(&r, b"/api/x"), b"/api/x");
    }

    /// Bytes that are not UTF-8 pass through unchanged around the prefix; the result is
    /// a valid header value.
    #[test]
    fn values_that_are_not_utf8_keep_their_bytes() {
        let r = restore("");
        assert_eq!(location(&r, b"/caf\xe9\xff?q=\x80"), b"/billing/caf\xe9\xff?q=\x80");
        let mut h = HeaderMap::new();
        let v = HeaderValue::from_bytes(b"/caf\xe9\xff").unwrap_or_else(|e| panic!("{e}"));
        h.insert(header::LOCATION, v);
        let cookie =
            HeaderValue::from_bytes(b"a=\xff; Path=/\xfe").unwrap_or_else(|e| panic!("{e}"));
        h.insert(header::SET_COOKIE, cookie);
        r.apply(&mut h);
        assert_eq!(
            h.get(header::LOCATION).map(HeaderValue::as_bytes),
            Some(&b"/billing/caf\xe9\xff"[..])
        );
        assert_eq!(
            h.get(header::SET_COOKIE).map(HeaderValue::as_bytes),
            Some(&b"a=\xff; Path=/billing/\xfe"[..])
        );
    }

    /// `Path=/` becomes the prefix itself (every path of the route, nothing else), a
    /// deeper path gets the prefix in front; no `Path`, an ignored one, or one already
    /// under the prefix is left; the cookie's own name and value are never read as a
    /// path. Every `Location`, `Content-Location` and `Set-Cookie` field is rewritten,
    /// other headers not.
    #[test]
    fn set_cookie_paths_get_the_prefix_back() {
        let r = restore("");
        for (sent, want) in [
            ("a=1; Path=/", "a=1; Path=/billing"),
            ("a=1; path=/x; HttpOnly", "a=1; path=/billing/x; HttpOnly"),
            ("a=1;PATH = /x/ ;Secure", "a=1;PATH = /billing/x/ ;Secure"),
            ("a=1; Path=/; Path=/y", "a=1; Path=/billing; Path=/billing/y"),
            ("a=1", "a=1"),
            ("a=1; Path=", "a=1; Path="),
            ("a=1; Path=x", "a=1; Path=x"),
            ("a=1; Path=/billing/y", "a=1; Path=/billing/y"),
            ("Path=/; Secure", "Path=/; Secure"),
            ("a=Path=/x", "a=Path=/x"),
            // Browsers end an attribute at `;` inside quotes too, and the last Path wins.
            ("a=\"x; Path=/y\"; Path=/", "a=\"x; Path=/billing/y\"; Path=/billing"),
            ("a=1; Pathx=/; Domain=app.example.com", "a=1; Pathx=/; Domain=app.example.com"),
        ] {
            let got = r.set_cookie(sent.as_bytes()).unwrap_or_else(|| sent.as_bytes().to_vec());
            assert_eq!(String::from_utf8_lossy(&got), want, "{sent:?}");
        }
        let r = restore("/v2");
        for (sent, want) in [
            ("a=1; Path=/", "a=1; Path=/billing"),
            ("a=1; Path=/v2", "a=1; Path=/billing"),
            ("a=1; Path=/v2/x", "a=1; Path=/billing/x"),
            ("a=1; Path=/other", "a=1; Path=/other"),
        ] {
            let got = r.set_cookie(sent.as_bytes()).unwrap_or_else(|| sent.as_bytes().to_vec());
            assert_eq!(String::from_utf8_lossy(&got), want, "{sent:?}");
        }

        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("a=1; Path=/"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("b=2; Path=/x"));
        h.insert(header::LOCATION, HeaderValue::from_static("/login"));
        h.insert(header::CONTENT_LOCATION, HeaderValue::from_static("/doc/1"));
        h.insert(header::LINK, HeaderValue::from_static("</style.css>; rel=preload"));
        r.apply(&mut h);
        let all = |n: HeaderName| -> Vec<String> {
            h.get_all(n)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect()
        };
        assert_eq!(all(header::SET_COOKIE), ["a=1; Path=/billing", "b=2; Path=/x"]);
        assert_eq!(all(header::LOCATION), ["/login"], "not under the base path /v2");
        assert_eq!(all(header::LINK), ["</style.css>; rel=preload"]);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LOCATION, HeaderValue::from_static("/doc/1"));
        restore("").apply(&mut h);
        assert_eq!(
            h.get(header::CONTENT_LOCATION),
            Some(&HeaderValue::from_static("/billing/doc/1"))
        );
    }
}
