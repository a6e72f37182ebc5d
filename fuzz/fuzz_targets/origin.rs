//! Any `Origin`/`Referer` text against any request authority, through the sign-out's
//! CSRF check (`session::of_this_origin`), and any `Origin` header(s) on a WebSocket
//! handshake through its cross-site check (`http::proxy::websocket_origin`), with and
//! without a `cookie_domain`.
//!
//! Property: what either check accepts, read as a browser reads a URL (the WHATWG parser
//! of the `url` crate; what it refuses no browser sends, and is not checked), is `https`, without userinfo, on the request's own host and port
//! (or, for a WebSocket with `cookie_domain`, on a host under that domain); a WebSocket
//! `Origin` is a bare origin (no path, query or fragment) and there is exactly one.
#![no_main]

use http::header::{HeaderValue, HOST, ORIGIN};
use http::Request;
use libfuzzer_sys::fuzz_target;
use portcullis::http::authority;
use portcullis::http::proxy::websocket_origin;
use portcullis::session::of_this_origin;

/// The host and port a URL names as the browser reads it (lower-cased, default port).
fn browser_origin(text: &str) -> Option<(String, u16, url::Url)> {
    let url = url::Url::parse(text).ok()?;
    if url.scheme() != "https" || !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    let port = url.port_or_known_default()?;
    Some((host, port, url))
}

/// The request's own origin as the browser reads it (`3.` is the IPv4 `0.0.0.3`).
fn own_origin(authority: &str) -> Option<(String, u16)> {
    browser_origin(&format!("https://{authority}/")).map(|(host, port, _)| (host, port))
}

fuzz_target!(|data: &[u8]| {
    // `authority` NUL `value` [NUL `second Origin`]; the first byte picks the domain.
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut parts = rest.split(|&b| b == 0);
    let (Some(authority), Some(value)) = (parts.next(), parts.next()) else { return };
    let second = parts.next();
    let Ok(authority) = std::str::from_utf8(authority) else { return };
    // The proxy refuses a Host with userinfo (`authority::unambiguous`).
    if authority.contains('@') {
        return;
    }
    let Ok(own) = authority.parse::<http::uri::Authority>() else { return };
    let own_host = own.host().trim_end_matches('.').to_ascii_lowercase();

    if of_this_origin(value, authority) {
        // A `Referer`'s path may hold any bytes; a browser would have percent-encoded them.
        let text = String::from_utf8_lossy(value);
        // What a browser cannot send (the WHATWG parser refuses it: `XN--0p`, a bad
        // punycode label) is not checked: no page has that origin.
        let Some((host, port, _)) = browser_origin(&text) else { return };
        let own = own_origin(authority).unwrap_or_else(|| panic!("{text:?} for {authority:?}"));
        assert_eq!((host, port), own, "{text:?} for {authority:?}");
    }

    // The WebSocket check, on a request routed by `authority` as the proxy routes it.
    let Ok(host_header) = HeaderValue::from_str(authority) else { return };
    let Ok(origin) = HeaderValue::from_bytes(value) else { return };
    let mut req = Request::new(());
    req.headers_mut().insert(HOST, host_header);
    req.headers_mut().append(ORIGIN, origin);
    if let Some(second) = second.and_then(|s| HeaderValue::from_bytes(s).ok()) {
        req.headers_mut().append(ORIGIN, second);
    }
    let Some(host) = authority::host(&req) else { return };
    let domain = match mode % 3 {
        0 => None,
        1 => Some("example.com"),
        _ => Some(own_host.as_str()),
    };
    if websocket_origin(&req, &host, domain).is_ok() {
        let origins: Vec<_> = req.headers().get_all(ORIGIN).iter().collect();
        assert_eq!(origins.len(), 1, "{origins:?}");
        let text = origins[0].to_str().expect("an accepted origin is ASCII");
        let Some((page_host, port, url)) = browser_origin(text) else { return };
        assert!(url.path() == "/" && url.query().is_none() && url.fragment().is_none());
        let same = own_origin(authority) == Some((page_host.clone(), port));
        let shared = domain.is_some_and(|d| {
            page_host == d || page_host.strip_suffix(d).is_some_and(|s| s.ends_with('.'))
        });
        assert!(same || shared, "{text:?} for {authority:?}, cookie_domain {domain:?}");
    }
});
