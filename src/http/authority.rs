//! A request's authority, read once and the same way by every part of the proxy: whether
//! it is unambiguous (one Host, agreeing with the target or `:authority`, a DNS name or
//! IP literal), the name it is routed by, and the forms the upstream and the browser's
//! redirects get. Two of these disagreeing would be host confusion: a request routed and
//! authorized for one name reaching an upstream, or a browser, under another.

use std::borrow::Cow;

use http::header::{self, HeaderValue};
use http::Request;

/// Refuses what two hops could read differently: more than one Host, a Host that
/// contradicts the absolute-form target or HTTP/2 `:authority` (the proxy routes by one,
/// the upstream might route by the other), and an HTTP/1 target that is no `http(s)` URL
/// or comes without the Host HTTP/1.1 requires (RFC 9112 §3.2). (Content-Length beside Transfer-Encoding never
/// gets here: hyper frames such a request by Transfer-Encoding alone and drops the
/// Content-Length, so the upstream is sent one unambiguous framing; tested.)
pub fn unambiguous<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if host.is_some_and(|h| h.as_bytes().contains(&b'@')) {
        return Err("Host carries userinfo");
    }
    let target = req.uri().authority();
    if req.version() < http::Version::HTTP_2 {
        // An HTTP/1 absolute-form target is `http://` or `https://` (RFC 9112 §3.2.2): a
        // reverse proxy has no business with `ftp://`, and routing one like `http` would
        // take a request no client of this server sends. nginx answers 400 alike.
        if req
            .uri()
            .scheme()
            .is_some_and(|s| *s != http::uri::Scheme::HTTP && *s != http::uri::Scheme::HTTPS)
        {
            return Err("the request target's scheme is not http or https");
        }
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400, absolute-form or not.
        if target.is_some() && host.is_none() && req.version() == http::Version::HTTP_11 {
            return Err("an HTTP/1.1 absolute-form request without a Host header");
        }
    }
    if target.is_some_and(|t| t.as_str().contains('@')) {
        return Err("the request target's authority carries userinfo");
    }
    if let (Some(target), Some(host)) = (target, host) {
        if !host.as_bytes().eq_ignore_ascii_case(target.as_str().as_bytes()) {
            return Err("Host differs from the request target's authority");
        }
    }
    // The name routes the request and reaches the upstream in X-Forwarded-Host: a DNS
    // name or an IP literal, never `evil.com,app.example.com` (a list to frameworks
    // that read the first element, yet a match for `*.example.com`).
    let name = target.map(|t| t.as_str().as_bytes()).or_else(|| host.map(|h| h.as_bytes()));
    if name.is_some_and(|n| !is_host_and_port(n)) {
        return Err("Host is not a DNS name or IP literal with an optional port");
    }
    Ok(())
}

/// The port an `https` authority names (443 when it names none), or `None` when what
/// follows its host is no port: `http` accepts `host:844A` or `host:-1` and reads the
/// port as absent, which is no reason to take it for 443.
pub fn https_port(a: &http::uri::Authority) -> Option<u16> {
    let s = a.as_str();
    let host_and_port = s.rsplit_once('@').map_or(s, |(_, h)| h);
    match host_and_port.strip_prefix(a.host())? {
        "" => Some(443),
        port => {
            port.strip_prefix(':').filter(|p| p.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
        }
    }
}

/// The request's authority, lower-cased and without port or trailing dots: `:authority`
/// (HTTP/2) or Host. The name the request is routed by, and held to the TLS SNI.
pub fn host<B>(req: &Request<B>) -> Option<String> {
    let parsed: http::uri::Authority;
    let raw = match req.uri().authority() {
        Some(a) => a.host(),
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            parsed = h.parse().ok()?;
            parsed.host()
        }
    };
    // One allocation: trim the borrowed host, then lower-case into the owned copy.
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// The request's `host[:port]` as the browser wrote it, in its routed form
/// (`routed_form`: no empty port, no trailing dots), lower-cased (for redirect URIs).
pub fn authority_with_port<B>(req: &Request<B>) -> Option<String> {
    match req.uri().authority() {
        Some(a) => Some(routed_form(a.as_str()).to_ascii_lowercase()),
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            let a: http::uri::Authority = h.parse().ok()?;
            Some(routed_form(a.as_str()).to_ascii_lowercase())
        }
    }
}

/// The authority a request was routed by, as the client wrote it (Host, else the
/// target's authority or HTTP/2 `:authority`), in its routed form (`routed_form`): the
/// Host a `preserve_host` route forwards.
pub fn routed_authority<B>(req: &Request<B>) -> Option<HeaderValue> {
    let host = req.headers().get(header::HOST);
    let written = match host {
        Some(v) => v.to_str().ok()?,
        None => req.uri().authority()?.as_str(),
    };
    let form = routed_form(written);
    match host {
        // The common case: the client's own Host, as it is.
        Some(v) if form.len() == written.len() => Some(v.clone()),
        _ => HeaderValue::from_str(&form).ok(),
    }
}

/// The name and port a request was routed by, as the upstream and redirects must see
/// them: without an empty port (`example.com:` is `example.com`, RFC 3986 §3.2.3: an
/// empty port is the scheme's default; nginx reads it so too) and without the trailing
/// dots of a fully qualified name (`example.com.` is the same DNS name, routed as
/// `example.com`; nginx and Apache drop the dot before choosing a virtual host, but Go's
/// `ServeMux` and Envoy (`strip_trailing_host_dot` is off by default) do not, and
/// would serve another virtual host, or their default one, than the route authorized).
/// Only for an authority [`is_host_and_port`] accepted, where a `:` outside an IPv6
/// literal can only open the port.
fn routed_form(authority: &str) -> Cow<'_, str> {
    let authority = authority.strip_suffix(':').unwrap_or(authority);
    if authority.starts_with('[') {
        return Cow::Borrowed(authority);
    }
    let (name, port) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
    match name.strip_suffix('.') {
        None => Cow::Borrowed(authority),
        Some(_) => Cow::Owned(format!("{}{port}", name.trim_end_matches('.'))),
    }
}

/// A byte of a host name label as requests may spell it (and so route hosts must):
/// letters, digits, `-` and `_`.
pub(crate) fn host_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')
}

/// `name[:port]` or `[ipv6][:port]`, where a name is letters, digits, `-`, `_` and `.`,
/// and a port is a number up to 65535 or empty (`example.com:`, the default port).
pub(crate) fn is_host_and_port(a: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(inner) = a.strip_prefix(b"[") {
        let Some(end) = inner.iter().position(|&b| b == b']') else { return false };
        let ip = &inner[..end];
        let ok =
            !ip.is_empty() && ip.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        (ok, &inner[end + 1..])
    } else {
        let end = a.iter().position(|&b| b == b':').unwrap_or(a.len());
        let name = &a[..end];
        let ok = !name.is_empty() && name.iter().all(|&b| host_label_byte(b) || b == b'.');
        (ok, &a[end..])
    };
    let port_ok = match rest {
        [] | [b':'] => true,
        [b':', port @ ..] => {
            (1..=5).contains(&port.len())
                && port.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(port).is_ok_and(|p| p.parse::<u16>().is_ok())
        }
        _ => false,
    };
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::{is_host_and_port, routed_authority};

    #[test]
    fn the_routed_authority_is_the_clients_host_or_target_less_an_empty_port_and_trailing_dots() {
        let at = |target: &str, host: Option<&str>| {
            let mut b = http::Request::builder().uri(target);
            if let Some(h) = host {
                b = b.header(http::header::HOST, h);
            }
            let req = b.body(()).unwrap_or_else(|e| panic!("{e}"));
            routed_authority(&req).map(|v| v.to_str().unwrap_or("?").to_string())
        };
        assert_eq!(at("/x", Some("App.example.com:8443")).as_deref(), Some("App.example.com:8443"));
        assert_eq!(at("/x", Some("app.example.com:")).as_deref(), Some("app.example.com"));
        // HTTP/2 `:authority`, or an absolute-form target without Host.
        assert_eq!(at("https://app.example.com/x", None).as_deref(), Some("app.example.com"));
        assert_eq!(at("https://app.example.com:/x", None).as_deref(), Some("app.example.com"));
        assert_eq!(at("/x", None), None);
        // A fully qualified name's trailing dot: the name it was routed as.
        assert_eq!(at("/x", Some("app.example.com.")).as_deref(), Some("app.example.com"));
        assert_eq!(
            at("/x", Some("App.example.com..:8443")).as_deref(),
            Some("App.example.com:8443")
        );
        assert_eq!(at("/x", Some("app.example.com.:")).as_deref(), Some("app.example.com"));
        assert_eq!(
            at("https://app.example.com.:8443/x", None).as_deref(),
            Some("app.example.com:8443")
        );
        assert_eq!(at("/x", Some("[::1]:8443")).as_deref(), Some("[::1]:8443"));
    }

    #[test]
    fn hosts_are_dns_names_or_ip_literals_with_an_optional_port() {
        for ok in [
            "example.com",
            "app.example.com:8443",
            "localhost",
            "LOCALHOST:1",
            "example.com.",
            "my_host.internal",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "[2001:db8::ffff:1.2.3.4]:65535",
            // An empty port is the default one (RFC 3986 §3.2.3), as nginx reads it.
            "example.com:",
            "[::1]:",
        ] {
            assert!(is_host_and_port(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "evil.com,app.example.com",
            "evil.com;.example.com",
            "evil.com!.example.com",
            "evil@app.example.com",
            "a b.example.com",
            "example.com:80:80",
            "example.com::",
            ":",
            "example.com:123456",
            "example.com:8x",
            "example.com:99999",
            "[]",
            "[::1",
            "[::1]x",
            "[::1]::",
            "[fe80::1%25eth0]",
            "exa%6dple.com",
        ] {
            assert!(!is_host_and_port(bad.as_bytes()), "{bad}");
        }
    }
}
