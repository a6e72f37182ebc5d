//! Any bytes as the first packet of a PostgreSQL connection (StartupMessage, SSLRequest,
//! GSSENCRequest, CancelRequest), then the startup parameters' allow-list.
//!
//! Properties: what is read is exactly what the builders would write for it (so nothing
//! past the packet's own length is consumed and nothing in it is skipped); the
//! parameters forwarded upstream are only allow-listed ones, each once, with a UTF8
//! `client_encoding`; the tagged `application_name` fits the server's 63 bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis::postgres::proto::{self, Initial, GSSENC_REQUEST, MAX_STARTUP_LEN, SSL_REQUEST};
use portcullis::postgres::startup::{self, DEFAULT_FORWARDED, NEVER_FORWARDED};
use portcullis::postgres::statements::is_utf8;
use tokio::runtime::{Builder, Runtime};

fuzz_target!(|data: &[u8]| {
    static RT: OnceLock<Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| Builder::new_current_thread().build().expect("runtime"));
    let mut rest = data;
    let Ok(initial) = rt.block_on(proto::read_initial(&mut rest)) else { return };
    let packet = &data[..data.len() - rest.len()];
    assert!(packet.len() <= MAX_STARTUP_LEN);
    let rebuilt = match &initial {
        Initial::Ssl => proto::startup_packet(SSL_REQUEST, &[]),
        Initial::GssEnc => proto::startup_packet(GSSENC_REQUEST, &[]),
        Initial::Cancel { pid, secret } => proto::cancel_request(*pid, *secret),
        Initial::Startup { minor, params } => {
            let mut body = Vec::new();
            for (k, v) in params {
                body.extend_from_slice(k.as_bytes());
                body.push(0);
                body.extend_from_slice(v.as_bytes());
                body.push(0);
            }
            body.push(0);
            proto::startup_packet(3 << 16 | u32::from(*minor), &body)
        }
    };
    assert_eq!(packet, &rebuilt[..]);
    if let Initial::Startup { params, .. } = initial {
        check_forwarded(&params);
    }
});

/// What reaches the server is allow-listed, named once (PostgreSQL reads names
/// case-insensitively), UTF8, and the tagged `application_name` fits 63 bytes.
fn check_forwarded(params: &[(String, String)]) {
    let Ok(mut out) = startup::forwarded(params, &[]) else { return };
    for (i, (name, value)) in out.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        assert!(DEFAULT_FORWARDED.contains(&lower.as_str()), "{name}");
        assert!(!NEVER_FORWARDED.contains(&lower.as_str()), "{name}");
        assert!(!out[..i].iter().any(|(n, _)| n.eq_ignore_ascii_case(name)), "{name} twice");
        if lower == "client_encoding" {
            assert!(is_utf8(value));
        }
    }
    assert!(out.iter().any(|(n, _)| n.eq_ignore_ascii_case("client_encoding")));
    startup::with_session_id(&mut out, "0123456789abcdef");
    let apps: Vec<_> =
        out.iter().filter(|(n, _)| n.eq_ignore_ascii_case("application_name")).collect();
    let [(_, app)] = apps.as_slice() else { panic!("application_name {} times", apps.len()) };
    // The server's length: every byte outside printable ASCII becomes `\xNN`.
    let cost: usize = app.bytes().map(|b| if (b' '..=b'~').contains(&b) { 1 } else { 4 }).sum();
    assert!(cost <= 63, "{app:?}");
    assert!(app.ends_with("portcullis 0123456789abcdef)") || app == "portcullis 0123456789abcdef");
}
