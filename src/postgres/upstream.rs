//! The upstream leg: TCP (+ TLS by SSLRequest), StartupMessage as the granted role, and
//! authentication with credentials only portcullis holds (SCRAM-SHA-256, md5, or
//! cleartext over TLS/loopback).

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::proto::{self, ReadError};
use super::scram::{self, KeyCache};
use crate::config::{DatabaseSettings, Secret, UpstreamTls};

/// A connection to the upstream server, plain or TLS.
pub type UpstreamStream = super::stream::MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// Why the upstream leg failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connect, TLS, I/O or protocol trouble; the client learns `upstream-unavailable`.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream refused portcullis' own credentials: a configuration problem.
    #[error("upstream authentication failed: {0}")]
    Auth(String),
    /// Another ErrorResponse during startup (database does not exist, too many
    /// connections...): relayed to the client as is.
    #[error("upstream error {code}: {message}")]
    Server { code: String, message: String, raw: Vec<u8> },
}

fn unavailable(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Unavailable(e.to_string())
}

/// Opens TCP (and TLS when configured) to the route's upstream.
pub async fn connect(
    db: &DatabaseSettings,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<UpstreamStream, UpstreamError> {
    let addr = (db.host.as_str(), db.port);
    let tcp = tokio::time::timeout(db.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| unavailable(format!("connect to {} timed out", db.upstream_display)))?
        .map_err(|e| unavailable(format!("connect to {}: {e}", db.upstream_display)))?;
    let _ = tcp.set_nodelay(true);
    match (db.upstream_tls, tls) {
        (UpstreamTls::Disable, _) => Ok(UpstreamStream::Plain(tcp)),
        (_, None) => Err(unavailable("no TLS client configuration for the upstream")),
        (_, Some(cfg)) => {
            let mut tcp = tcp;
            tcp.write_all(&proto::startup_packet(proto::SSL_REQUEST, &[]))
                .await
                .map_err(unavailable)?;
            let mut answer = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut answer)
                .await
                .map_err(unavailable)?;
            if answer[0] != b'S' {
                return Err(unavailable("the upstream does not accept TLS"));
            }
            let name = ServerName::try_from(db.host.clone())
                .map_err(|_| unavailable(format!("`{}` is not a TLS server name", db.host)))?;
            let s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| unavailable(format!("TLS to {}: {e}", db.upstream_display)))?;
            Ok(UpstreamStream::Tls(Box::new(s)))
        }
    }
}

/// Sends the StartupMessage and authenticates as `role`. Returns once the upstream says
/// AuthenticationOk; the caller relays what follows (ParameterStatus, BackendKeyData,
/// ReadyForQuery).
///
/// Like libpq's `require_auth`, AuthenticationOk is accepted only after the exchange
/// portcullis expects has completed: an upstream that answers AuthenticationOk without
/// asking for the password (an impostor, or a `trust` line in pg_hba.conf) gets no
/// session. Where the server's certificate is not verified (`upstream_tls = "require"`),
/// only SCRAM-SHA-256-PLUS will do: channel binding is then what authenticates the
/// server (its signature over our nonce, bound to the certificate we saw), so md5,
/// cleartext and unbound SCRAM are refused before any password material leaves.
#[allow(clippy::too_many_arguments)]
pub async fn authenticate(
    s: &mut UpstreamStream,
    role: &str,
    password: &Secret,
    database: &str,
    params: &[(String, String)],
    loopback: bool,
    cache: &KeyCache,
    mode: UpstreamTls,
) -> Result<(), UpstreamError> {
    let mut p: Vec<(&str, &str)> = vec![("user", role), ("database", database)];
    p.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    send(s, &proto::startup_message(&p)).await?;
    let tls = matches!(s, UpstreamStream::Tls(_));
    // The server's identity rests on channel binding alone: TLS without verification.
    let bound_only = mode == UpstreamTls::Require;
    let mut scram: Option<scram::Exchange> = None;
    // The exchange portcullis expects has completed (the password, or its proof, sent;
    // for SCRAM the server's signature verified).
    let mut done = false;
    loop {
        let (kind, body) = read(s).await?;
        match kind {
            b'R' => {
                let code = body.get(..4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                match code {
                    Some(0) if done => return Ok(()),
                    Some(0) => {
                        return Err(UpstreamError::Auth(
                            "the upstream accepted the session without authenticating portcullis (AuthenticationOk before any password exchange); refused: an impostor, or a `trust` rule for this role".into(),
                        ))
                    }
                    Some(_) if done => {
                        return Err(unavailable(
                            "a second authentication request after the exchange completed",
                        ))
                    }
                    Some(3 | 5) if bound_only => {
                        return Err(UpstreamError::Auth(format!(
                            "the upstream asks for {} but upstream_tls = \"require\" does not verify its certificate: only SCRAM-SHA-256-PLUS (channel binding) authenticates the server; refused, nothing sent (use verify-full)",
                            if code == Some(3) { "a cleartext password" } else { "an md5 password" }
                        )))
                    }
                    Some(3) => {
                        if !tls && !loopback {
                            return Err(UpstreamError::Auth(
                                "the upstream asks for a cleartext password over an unencrypted, non-loopback connection; refused (set upstream_tls)".into(),
                            ));
                        }
                        send(s, &password_message(password.expose().as_bytes())).await?;
                        done = true;
                    }
                    Some(5) => {
                        let salt = body
                            .get(4..8)
                            .map(|b| [b[0], b[1], b[2], b[3]])
                            .ok_or_else(|| unavailable("malformed md5 request"))?;
                        let r = scram::md5_response(role, password.expose(), salt);
                        send(s, &password_message(r.as_bytes())).await?;
                        done = true;
                    }
                    Some(10) => {
                        let mechs: Vec<&[u8]> =
                            body[4..].split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                        let offers = |m: &str| mechs.contains(&m.as_bytes());
                        let binding = match (&*s, offers(scram::Exchange::MECHANISM_PLUS)) {
                            (UpstreamStream::Tls(t), true) => {
                                // A certificate whose signature has no single hash
                                // (Ed25519, RSASSA-PSS) cannot be bound; then unbound.
                                let cert =
                                    t.get_ref().1.peer_certificates().and_then(|c| c.first());
                                match cert.and_then(|c| scram::server_end_point(c)) {
                                    Some(hash) => scram::Binding::ServerEndPoint(hash),
                                    None => scram::Binding::None,
                                }
                            }
                            (UpstreamStream::Tls(_), false) => scram::Binding::NotOffered,
                            _ => scram::Binding::None,
                        };
                        let plain = !matches!(binding, scram::Binding::ServerEndPoint(_));
                        if plain && bound_only {
                            return Err(UpstreamError::Auth(
                                "the upstream does not offer SCRAM-SHA-256-PLUS channel binding (or its certificate cannot be bound), and upstream_tls = \"require\" does not verify its certificate; refused, nothing sent (use verify-full)".into(),
                            ));
                        }
                        if plain && !offers(scram::Exchange::MECHANISM) {
                            return Err(UpstreamError::Auth(
                                "the upstream offers no SCRAM-SHA-256".into(),
                            ));
                        }
                        let x = scram::Exchange::new(binding);
                        let first = x.client_first();
                        let mut b = Vec::new();
                        b.extend_from_slice(x.mechanism().as_bytes());
                        b.push(0);
                        b.extend_from_slice(&(first.len() as u32).to_be_bytes());
                        b.extend_from_slice(first.as_bytes());
                        send(s, &proto::message(b'p', &b)).await?;
                        scram = Some(x);
                    }
                    Some(11) => {
                        let x = scram.as_mut().ok_or_else(|| unavailable("SASL out of order"))?;
                        let server_first = std::str::from_utf8(&body[4..])
                            .map_err(|_| unavailable("server-first is not UTF-8"))?;
                        let fin = x
                            .client_final(server_first, password, cache)
                            .await
                            .map_err(|e| UpstreamError::Auth(e.to_string()))?;
                        send(s, &proto::message(b'p', fin.as_bytes())).await?;
                    }
                    Some(12) => {
                        let x = scram.as_ref().ok_or_else(|| unavailable("SASL out of order"))?;
                        let fin = std::str::from_utf8(&body[4..])
                            .map_err(|_| unavailable("server-final is not UTF-8"))?;
                        x.verify_server_final(fin)
                            .map_err(|e| UpstreamError::Auth(e.to_string()))?;
                        done = true;
                    }
                    Some(other) => {
                        return Err(UpstreamError::Auth(format!(
                            "unsupported authentication request {other}"
                        )))
                    }
                    None => return Err(unavailable("malformed authentication request")),
                }
            }
            b'E' => return Err(server_error(body)),
            b'N' => {}
            b'v' => {} // NegotiateProtocolVersion: we asked for 3.0 with no options
            other => {
                return Err(unavailable(format!(
                    "unexpected message `{}` during authentication",
                    other as char
                )))
            }
        }
    }
}

/// An ErrorResponse body: class 28 is about portcullis' credentials; the rest is relayed.
pub fn server_error(body: Vec<u8>) -> UpstreamError {
    let f = proto::parse_fields(&body);
    let code = f.get(&b'C').cloned().unwrap_or_default();
    let message = f.get(&b'M').cloned().unwrap_or_default();
    if code.starts_with("28") {
        UpstreamError::Auth(format!("{code}: {message}"))
    } else {
        UpstreamError::Server { code, message, raw: proto::message(b'E', &body) }
    }
}

fn password_message(p: &[u8]) -> Vec<u8> {
    let mut b = p.to_vec();
    b.push(0);
    proto::message(b'p', &b)
}

async fn send(s: &mut UpstreamStream, m: &[u8]) -> Result<(), UpstreamError> {
    s.write_all(m).await.map_err(unavailable)?;
    s.flush().await.map_err(unavailable)
}

pub async fn read(s: &mut UpstreamStream) -> Result<(u8, Vec<u8>), UpstreamError> {
    proto::read_message(s, proto::MAX_STARTUP_MESSAGE_LEN).await.map_err(|e| match e {
        ReadError::Closed => unavailable("the upstream closed the connection"),
        other => unavailable(other),
    })
}

/// TLS client configuration for a route: verified (`verify-full`) or encryption-only
/// (`require`, libpq semantics). `None` for `disable`.
pub fn client_config(db: &DatabaseSettings) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    match db.upstream_tls {
        UpstreamTls::Disable => Ok(None),
        UpstreamTls::VerifyFull => {
            let mut c = (*crate::tls::client_config(db.upstream_ca.as_deref(), false)
                .map_err(|e| e.to_string())?)
            .clone();
            c.alpn_protocols = vec![b"postgresql".to_vec()];
            Ok(Some(Arc::new(c)))
        }
        UpstreamTls::Require => {
            let provider = crate::tls::provider();
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(danger::NoVerify(provider)))
                .with_no_client_auth();
            c.alpn_protocols = vec![b"postgresql".to_vec()];
            Ok(Some(Arc::new(c)))
        }
    }
}

mod danger {
    //! `upstream_tls = "require"`: encryption without authentication of the server, as
    //! libpq's `sslmode=require`. Signatures are still checked so the handshake is sound;
    //! only the certificate chain and name are not. Warned about at start-up.
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    pub struct NoVerify(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
