//! Any list of request header names and values, from a trusted proxy or any other peer,
//! through the proxy's request header hygiene (`http::headers::clean_request`, then
//! `add_identity` as for a request without a credential).
//!
//! Properties: the forwarded set holds no client-supplied `X-Portcullis-*` (in any case
//! or with `_`), no hop-by-hop header and no `Connection`-listed one (save those the
//! proxy routes, authorizes or frames by, and a trusted proxy's forwarding headers), no
//! host-override header, exactly one `Host` (the one the proxy chose) and one
//! `X-Forwarded-For`, a comma list of non-empty addresses ending in the peer's (the
//! trusted proxy's chain before it, in order; the peer alone from anyone else); every
//! other header the client sent reaches the upstream with all its values, in order, or
//! not at all, and nothing appears that neither the client nor the proxy wrote.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::http::headers::{add_identity, clean_request, value, Hop};
use portcullis::session::cookie::is_proxy_cookie;

/// Names the fuzzer reaches by one byte (`\x01`..): the ones the hygiene treats apart.
const NAMES: &[&str] = &[
    "connection",
    "upgrade",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
    "keep-alive",
    "proxy-connection",
    "host",
    "content-length",
    "cookie",
    "authorization",
    "x-portcullis-subject",
    "X_Portcullis_Email",
    "x-portcullis-request-id",
    "x-forwarded-for",
    "X_Forwarded_For",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-original-host",
    "x_host",
    "x-forwarded-server",
    "x-user",
    "x_user",
    "accept",
];

/// The hop-by-hop headers (RFC 9110 §7.6.1) and `Expect`.
const HOP: &[&str] = &[
    "connection",
    "upgrade",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
    "keep-alive",
    "proxy-connection",
];

/// Host-override names (any spelling of `-`/`_`).
const HOST_OVERRIDES: &[&str] = &[
    "x-original-host",
    "x-host",
    "x-forwarded-server",
    "x-http-host-override",
    "x-host-override",
    "x-proxy-host",
    "x-real-host",
    "x-origin-host",
];

/// Client-address and forwarding names besides `x-forwarded-*`.
const FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded",
    "forwarded-for",
    "x-real-ip",
    "client-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "cf-pseudo-ipv4",
    "fastly-client-ip",
    "x-appengine-user-ip",
    "proxy-client-ip",
    "wl-proxy-client-ip",
];

fn fold(name: &str) -> String {
    name.replace('_', "-")
}

fn forwarding(name: &str) -> bool {
    let n = fold(name);
    n.starts_with("x-forwarded-") || FORWARDING.contains(&n.as_str())
}

fn values<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    h.get_all(name).iter().map(HeaderValue::as_bytes).collect()
}

fuzz_target!(|data: &[u8]| {
    // First byte: trusted peer, WebSocket, a stripped prefix, the token dropped, a port;
    // then one header a line, `name:value`, a name byte below 0x20 picking from NAMES.
    let Some((&flags, rest)) = data.split_first() else { return };
    let trusted = flags & 1 != 0;
    let websocket = flags & 2 != 0;
    let prefix = (flags & 4 != 0).then_some("/billing");
    let drop_authorization = flags & 8 != 0;
    let port = HeaderValue::from_static("8443");
    let port = (flags & 16 != 0).then_some(&port);
    let extra = [HeaderName::from_static("x-user")];
    let strip: &[HeaderName] = if flags & 32 != 0 { &extra } else { &[] };

    let mut client = HeaderMap::new();
    for line in rest.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let name = match name {
            [b, more @ ..] if *b < 0x20 => {
                let base = NAMES[usize::from(*b) % NAMES.len()].as_bytes();
                HeaderName::from_bytes(&[base, more].concat())
            }
            _ => HeaderName::from_bytes(name),
        };
        let (Ok(name), Ok(value)) = (name, HeaderValue::from_bytes(value)) else { continue };
        client.append(name, value);
    }

    let peer = HeaderValue::from_static("192.0.2.7");
    let host = "app.example.com";
    let host_sent = HeaderValue::from_static("upstream.internal:8080");
    let hop = Hop {
        websocket,
        strip_headers: strip,
        drop_authorization,
        peer: &peer,
        trusted,
        proto: "https",
        host,
        port,
        prefix,
    };
    let mut h = client.clone();
    clean_request(&mut h, &hop, host_sent.clone());
    add_identity(&mut h, &[], &[], "0123456789abcdef0123");

    // What the client's `Connection` listed (as the proxy reads it: text fields only).
    let listed: Vec<String> = client
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .map(|n| n.as_str().to_owned())
        .collect();
    let te_trailers = client.get_all("te").iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            let coding = t.split(|&b| b == b';').next().unwrap_or_default();
            coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
        })
    });

    // Exactly one Host, the proxy's.
    assert_eq!(values(&h, "host"), [host_sent.as_bytes()]);
    // The only `X-Portcullis-*` is the proxy's request id.
    for name in h.keys() {
        let n = fold(name.as_str());
        if n.starts_with("x-portcullis-") {
            assert_eq!(name.as_str(), "x-portcullis-request-id", "{name}");
        }
        assert!(!HOST_OVERRIDES.contains(&n.as_str()), "{name}");
        assert!(!strip.iter().any(|s| fold(s.as_str()) == n), "{name} (strip_headers)");
        if !trusted && forwarding(name.as_str()) {
            assert!(
                matches!(
                    name.as_str(),
                    "x-forwarded-for"
                        | "x-forwarded-proto"
                        | "x-forwarded-host"
                        | "x-forwarded-port"
                        | "x-forwarded-prefix"
                ),
                "{name} from an untrusted peer"
            );
        }
        if trusted && forwarding(name.as_str()) {
            assert!(!name.as_str().contains('_'), "{name}: an underscore spelling");
        }
    }
    assert_eq!(values(&h, "x-portcullis-request-id"), [value("0123456789abcdef0123").as_bytes()]);
    // Hop-by-hop: none but the WebSocket upgrade and the `TE: trailers` the proxy says.
    for name in HOP {
        let got = values(&h, name);
        match *name {
            "connection" if websocket => assert_eq!(got, [&b"upgrade"[..]]),
            "upgrade" if websocket => assert_eq!(got, [&b"websocket"[..]]),
            "te" if te_trailers => assert_eq!(got, [&b"trailers"[..]]),
            _ => assert!(got.is_empty(), "{name}: {got:?}"),
        }
    }
    // `Connection`-listed: gone, unless the proxy routes, authorizes or frames by it, or
    // sets it, or a trusted proxy's forwarding header.
    for name in &listed {
        let kept_on_purpose = matches!(
            name.as_str(),
            "host"
                | "content-length"
                | "authorization"
                | "cookie"
                | "connection"
                | "upgrade"
                | "te"
        ) || name.starts_with("x-portcullis-")
            || forwarding(name);
        if !kept_on_purpose {
            assert!(values(&h, name).is_empty(), "{name} was listed in Connection");
        }
    }
    // X-Forwarded-For: one field, a list of non-empty elements ending in the peer.
    let xff = values(&h, "x-forwarded-for");
    assert_eq!(xff.len(), 1, "{xff:?}");
    let xff = std::str::from_utf8(xff[0]).expect("X-Forwarded-For is text");
    let chain: Vec<&str> = xff.split(',').map(str::trim).collect();
    assert!(chain.iter().all(|e| !e.is_empty()), "{xff:?}");
    assert_eq!(chain.last().copied(), Some("192.0.2.7"), "{xff:?}");
    if trusted {
        // The client's chain, every field in order, then the peer.
        let mut given = String::new();
        for v in client.get_all("x-forwarded-for") {
            let Ok(v) = v.to_str() else { continue };
            for element in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                given.push_str(element);
                given.push_str(", ");
            }
        }
        if !given.is_empty() {
            assert_eq!(format!("{given}192.0.2.7"), xff, "the trusted chain");
        }
    } else {
        assert_eq!(chain, ["192.0.2.7"]);
    }
    assert_eq!(values(&h, "x-forwarded-host"), [host.as_bytes()]);
    // A trusted proxy's own scheme stands (as it sent it); anyone else's is replaced.
    let proto = values(&h, "x-forwarded-proto");
    match values(&client, "x-forwarded-proto") {
        given if trusted && !given.is_empty() => assert_eq!(proto, given),
        _ => assert_eq!(proto, [&b"https"[..]]),
    }
    assert!(values(&h, "x-forwarded-port").len() <= 1);
    if let Some(prefix) = prefix {
        let p = values(&h, "x-forwarded-prefix");
        assert_eq!(p.len(), 1);
        assert!(p[0].ends_with(prefix.as_bytes()));
    }
    // Cookies: the client's own, in order, one field; none of the proxy's.
    let pairs = |vs: Vec<&[u8]>| -> Vec<Vec<u8>> {
        vs.iter()
            .flat_map(|v| v.split(|&b| b == b';'))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    let sent: Vec<Vec<u8>> =
        pairs(values(&client, "cookie")).into_iter().filter(|c| !is_proxy_cookie(c)).collect();
    let cookies = values(&h, "cookie");
    assert!(cookies.len() <= 1);
    assert_eq!(pairs(cookies), sent);
    // Content-Length: at most one field, in its one decimal spelling.
    let cl = values(&h, "content-length");
    assert!(cl.len() <= 1);
    if let Some(v) = cl.first() {
        assert!(!v.is_empty() && v.iter().all(u8::is_ascii_digit), "{v:?}");
        assert!(v.len() == 1 || v[0] != b'0', "{v:?}");
    }
    if drop_authorization {
        assert!(values(&h, "authorization").is_empty());
    }

    // Every other header: all the client's values, in order, or none; nothing new.
    let proxys = |n: &str| {
        matches!(
            n,
            "host"
                | "cookie"
                | "content-length"
                | "authorization"
                | "te"
                | "connection"
                | "upgrade"
                | "forwarded"
                | "x-portcullis-request-id"
        ) || n.starts_with("x-forwarded-")
    };
    for name in h.keys() {
        let n = name.as_str();
        if proxys(n) {
            continue;
        }
        assert!(client.contains_key(name), "{n} appeared");
        assert_eq!(values(&h, n), values(&client, n), "{n} changed");
    }
    if !drop_authorization {
        assert_eq!(values(&h, "authorization"), values(&client, "authorization"));
    }
});
