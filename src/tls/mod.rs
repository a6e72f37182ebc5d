//! TLS for both sides of the proxy, on rustls with the aws-lc-rs provider only.
//!
//! - [`server_config`] / [`server_config_with_alpn`]: the listener's configuration. Certificates
//!   are chosen per connection by SNI through [`SniResolver`] (exact name, then a one-label
//!   `*.suffix` wildcard, then the default).
//! - [`client_config`]: upstream HTTPS and issuer discovery/JWKS fetches: public roots from
//!   `webpki-roots` plus an optional extra CA file.
//! - [`DevPki`] / [`write_dev_certs`]: development and test certificate material made with rcgen.
//!
//! The provider is always passed explicitly (`builder_with_provider`), never taken from a
//! process-wide default: should another provider ever enter the dependency tree, rustls would
//! otherwise refuse to pick one at run time.
//!
//! PEM files are read through `rustls-pki-types` (`rustls-pemfile` is unmaintained).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod dev_pki;
#[cfg(test)]
pub(crate) mod odd_names;
mod resolver;

pub use dev_pki::{write_dev_certs, DevPki};
pub use resolver::{server_name_key, SniResolver};

/// ALPN protocol id for HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id for HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why TLS material could not be loaded or a configuration could not be built.
///
/// Every file-related variant names the file, so the message alone tells an operator what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: file not found", path.display())]
    Missing { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: malformed PEM: {source}", path.display())]
    Pem { path: PathBuf, source: rustls_pki_types::pem::Error },
    #[error("{}: no certificate (expected a PEM `BEGIN CERTIFICATE` section)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key (expected a PEM section holding a PKCS#8, SEC1 EC or PKCS#1 RSA key)", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("{}: unsupported private key: {source}", path.display())]
    UnsupportedKey { path: PathBuf, source: rustls::Error },
    #[error("{}: private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: invalid certificate: {source}", path.display())]
    InvalidCertificate { path: PathBuf, source: rustls::Error },
    #[error("invalid TLS server name {name:?}: {why}")]
    InvalidServerName { name: String, why: &'static str },
    #[error("TLS server name {name:?} is configured more than once")]
    DuplicateServerName { name: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Where a certificate chain and its private key come from.
#[derive(Debug, Clone)]
pub enum CertifiedKeySource {
    /// PEM files: `cert` holds the chain (leaf first), `key` the private key.
    Files { cert: PathBuf, key: PathBuf },
    /// Material already loaded (tests, hot reload).
    Loaded(Arc<CertifiedKey>),
}

/// The certificates a configuration serves, once loaded: the default, and one source per
/// SNI name. The HTTPS and database listeners build their configurations from the same
/// set, so a file read once is what both serve.
#[derive(Debug, Clone)]
pub struct KeySet {
    pub default: CertifiedKeySource,
    pub sni: Vec<(String, CertifiedKeySource)>,
}

// === impl CertifiedKeySource ===

impl CertifiedKeySource {
    /// Chain and key from PEM files.
    pub fn files(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self::Files { cert: cert.into(), key: key.into() }
    }

    /// Reads (if needed) and checks the material.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        match self {
            Self::Files { cert, key } => load_certified_key(cert, key),
            Self::Loaded(ck) => Ok(Arc::clone(ck)),
        }
    }
}

/// A certificate the listeners serve, as `/metrics` reports it
/// (`portcullis_tls_certificate_expiry_timestamp_seconds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedCertificate {
    /// The `cert` file as configured.
    pub cert: PathBuf,
    /// Its `[[tls.sni]]` entry's `server_names`; empty for the `[tls]` default.
    pub server_names: Vec<String>,
    /// The leaf's notAfter, Unix seconds ([`not_after`]).
    pub not_after: i64,
}

/// The one crypto provider portcullis uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Server configuration for the HTTPS listener: ALPN `h2`, then `http/1.1`.
pub fn server_config(
    default: CertifiedKeySource,
    sni: Vec<(String, CertifiedKeySource)>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_alpn(default, sni, vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()])
}

/// Server configuration with explicit ALPN ids, most preferred first (the PostgreSQL listener
/// uses `postgresql`). An empty list disables ALPN. A client that offers ALPN but none of these
/// ids fails the handshake (rustls' `no_application_protocol`), as RFC 7301 asks.
pub fn server_config_with_alpn(
    default: CertifiedKeySource,
    sni: Vec<(String, CertifiedKeySource)>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = SniResolver::load(default, sni)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// Client configuration for upstream HTTPS and issuer fetches: the Mozilla roots shipped in
/// `webpki-roots` (no dependency on the host's trust store), plus every certificate in
/// `extra_ca` (a private CA, or the dev CA in tests). ALPN offers `h2` and `http/1.1` when
/// `alpn_h2`, else only `http/1.1`.
pub fn client_config(
    extra_ca: Option<&Path>,
    alpn_h2: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_ca {
        for cert in read_certs(path)? {
            roots
                .add(cert)
                .map_err(|source| TlsError::InvalidCertificate { path: path.into(), source })?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = if alpn_h2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
    } else {
        vec![ALPN_HTTP11.to_vec()]
    };
    Ok(Arc::new(config))
}

/// Reads a chain (leaf first) and its private key from PEM files and checks that they belong
/// together, so a mismatched pair fails at start-up rather than at the first handshake.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs(cert)?;
    let key_der = read_private_key(key)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|source| TlsError::UnsupportedKey { path: key.into(), source })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key type cannot report its public key; rustls itself lets that pass.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch { cert: cert.into(), key: key.into() });
        }
        Err(source) => return Err(TlsError::InvalidCertificate { path: cert.into(), source }),
    }
    Ok(Arc::new(certified))
}

/// Within this many days of its leaf's notAfter, a configured certificate is warned about
/// at every load (`check`, `serve`, reload).
pub const EXPIRY_WARNING_DAYS: u64 = 14;

/// The leaf's notAfter as Unix seconds; `None` if it does not parse as X.509 (rustls
/// accepted it, so this is not expected).
pub fn not_after(leaf: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// What to say about a leaf whose notAfter is `not_after`, at `now` (Unix seconds):
/// that it has expired, or expires within [`EXPIRY_WARNING_DAYS`]; `None` otherwise.
/// A warning, never a refusal: as with nginx and HAProxy, the listener still starts
/// (clients refuse the certificate; everything else keeps working).
pub fn expiry_warning(not_after: i64, now: u64) -> Option<String> {
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let when = u64::try_from(not_after)
        .map(|s| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s)))
        .map_or_else(|_| not_after.to_string(), |t| t.to_string());
    let day = 86_400;
    let days = |secs: i64| match secs / day {
        0 => "less than a day".to_string(),
        1 => "1 day".to_string(),
        n => format!("{n} days"),
    };
    if not_after <= now {
        Some(format!(
            "expired {} ago ({when}): clients refuse it; renew it",
            days(now.saturating_sub(not_after))
        ))
    } else if not_after.saturating_sub(now) < i64::try_from(EXPIRY_WARNING_DAYS).unwrap_or(0) * day
    {
        Some(format!("expires in {} ({when}): renew it", days(not_after - now)))
    } else {
        None
    }
}

/// Every certificate in a PEM file, in file order; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file; other sections are skipped,
/// so a combined chain+key file works too.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey { path: path.into() },
        other => pem_error(path, other),
    })
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) if source.kind() == io::ErrorKind::NotFound => {
            TlsError::Missing { path: path.into() }
        }
        rustls_pki_types::pem::Error::Io(source) => TlsError::Read { path: path.into(), source },
        source => TlsError::Pem { path: path.into(), source },
    }
}

#[cfg(test)]
mod tests;
