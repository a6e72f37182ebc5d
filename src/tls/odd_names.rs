//! Tests: a private CA, and a server certificate it signed whose subjectAltName holds
//! names no public CA would sign but a private one (or a compromised one) may: a newline
//! followed by a log line, an ANSI escape, a bidi override. rustls quotes those names, as
//! they are, when the certificate does not fit the name asked for ("certificate not valid
//! for name …; certificate is only valid for DnsName(\"…\")").
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

/// The text one of the names holds after its newline: a line of the text log's shape.
pub(crate) const FORGED: &str = "2026-11-27T12:00:00.000000Z  INFO portcullis: FORGED";

/// The CA (PEM, for a `ca_file`) and a server configuration presenting the certificate.
pub(crate) struct OddNames {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

/// A DER TLV (lengths up to 64 KiB).
fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match body.len() {
        n @ 0..=0x7f => out.push(n as u8),
        n @ 0x80..=0xff => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(body);
    out
}

pub(crate) fn odd_names() -> OddNames {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, IsCa};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    // subjectAltName: dNSName ([2] IMPLICIT IA5String) entries of raw bytes, which rcgen's
    // own names (ASCII only) could not all hold.
    let names = [
        format!("x\n{FORGED}"),
        "y\u{1b}[2K.example".to_string(),
        "z\u{202e}lmth.example".to_string(),
    ];
    let san: Vec<u8> = names.iter().flat_map(|n| der(0x82, n.as_bytes())).collect();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.custom_extensions
        .push(CustomExtension::from_oid_content(&[2, 5, 29, 17], der(0x30, &san)));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &*ca).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    OddNames { ca_pem: ca.pem(), server: Arc::new(server) }
}
