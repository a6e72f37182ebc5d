//! Any `Host` header(s) and absolute-form target (or HTTP/2 `:authority`) as a request's
//! authority.
//!
//! Properties: a request the proxy accepts has one name, and every reading of it agrees:
//! the name it is routed by (and held to the SNI), the `Host` a `preserve_host` route
//! forwards and the authority of sign-in redirects name the same host and port, none
//! with an empty port or a trailing dot; the name is a DNS name or an IP literal (no
//! userinfo, list or percent-escape an upstream could read as another host).
#![no_main]

use http::header::{HeaderValue, HOST};
use http::uri::Authority;
use http::Request;
use libfuzzer_sys::fuzz_target;
use portcullis::http::authority;

fuzz_target!(|data: &[u8]| {
    // First byte: which parts the request has; then the target's authority, a newline,
    // and the Host header(s), separated by newlines.
    let Some((&shape, rest)) = data.split_first() else { return };
    let mut parts = rest.split(|&b| b == b'\n');
    let target = parts.next().unwrap_or_default();
    let mut b = Request::builder();
    if shape & 1 == 1 {
        let Ok(target) = std::str::from_utf8(target) else { return };
        b = b.uri(format!("https://{target}/x"));
    } else {
        b = b.uri("/x");
    }
    for host in parts.take(usize::from((shape >> 1) & 3)) {
        let Ok(v) = HeaderValue::from_bytes(host) else { return };
        b = b.header(HOST, v);
    }
    let Ok(req) = b.body(()) else { return };
    if authority::unambiguous(&req).is_err() {
        return;
    }
    let Some(host) = authority::host(&req) else { return };
    assert!(!host.is_empty() && !host.ends_with('.'));
    assert_eq!(host, host.to_ascii_lowercase());
    let name_ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let literal_ok = |b: u8| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'[' | b']');
    assert!(host.bytes().all(name_ok) || host.bytes().all(literal_ok), "{host:?}");

    let forwarded = authority::routed_authority(&req).expect("a Host to forward");
    let forwarded = forwarded.to_str().expect("ascii").to_string();
    let redirect = authority::authority_with_port(&req).expect("an authority for redirects");
    assert_eq!(redirect, forwarded.to_ascii_lowercase());
    let parsed: Authority = forwarded.parse().expect("the forwarded Host parses");
    assert_eq!(parsed.host().to_ascii_lowercase(), host, "{forwarded:?}");
    assert!(!forwarded.ends_with(':') && !parsed.host().ends_with('.'), "{forwarded:?}");
});
