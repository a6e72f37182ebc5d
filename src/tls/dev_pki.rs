//! Development and test certificate material, made with rcgen. Never for production.
//!
//! Layout of a directory (all PEM):
//!
//! | file            | what                                              | mode |
//! |-----------------|---------------------------------------------------|------|
//! | `ca.pem`        | the "portcullis development CA" certificate       | 0644 |
//! | `ca-key.pem`    | its key; only kept by [`DevPki::load_or_create`]  | 0600 |
//! | `server.pem`    | server certificate, then the CA (the full chain)  | 0644 |
//! | `server-key.pem`| the server key                                    | 0600 |
//!
//! [`DevPki::load_or_create`] keeps the CA key so that a developer who trusted the CA once keeps
//! trusting it when the server certificate is re-issued for new names. [`write_dev_certs`]
//! (the committed `certs/dev` material) throws the CA key away: nobody can mint more
//! certificates under a CA that anyone may have trusted from the repository.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;

use super::{load_certified_key, provider, read_certs, CertifiedKeySource};

const CA_COMMON_NAME: &str = "portcullis development CA";
const CA_ORGANIZATION: &str = "portcullis (development only, never production)";
const SERVER_COMMON_NAME: &str = "portcullis development server";
/// Names every development server certificate covers.
const BASE_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Ten years: the CA should outlive many server certificates.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// 825 days: the longest server certificate validity macOS accepts from a locally trusted CA.
const SERVER_VALIDITY: Duration = Duration::from_secs(825 * 24 * 60 * 60);
/// Existing material expiring sooner than this is re-issued rather than reused.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Development certificate material on disk: a CA and a server certificate it signed for
/// `localhost`, `127.0.0.1`, `::1` and any extra names.
#[derive(Debug, Clone)]
pub struct DevPki {
    dir: PathBuf,
    ca_cert: CertificateDer<'static>,
    names: Vec<String>,
}

// === impl DevPki ===

impl DevPki {
    /// Reuses valid material in `dir`, or (re)creates what is missing, damaged, expiring within
    /// 30 days, or not covering every name. Creates `dir` if needed.
    pub fn load_or_create(dir: &Path, extra_names: &[String]) -> io::Result<DevPki> {
        Self::load_or_create_at(dir, extra_names, SystemTime::now())
    }

    /// [`Self::load_or_create`] as if the time were `now` (tests of the renewal rule).
    pub(crate) fn load_or_create_at(
        dir: &Path,
        extra_names: &[String],
        now: SystemTime,
    ) -> io::Result<DevPki> {
        // Reject unusable names before touching anything on disk.
        let names = server_names(extra_names)?;
        fs::create_dir_all(dir)?;
        let pki = Self { dir: dir.to_owned(), ca_cert: CertificateDer::from(Vec::new()), names };
        // Neither read nor written through a link planted in the directory.
        for path in [pki.ca_path(), pki.ca_key_path(), pki.cert_path(), pki.key_path()] {
            refuse_link(&path)?;
        }

        let ca = match pki.load_ca(now) {
            Some(ca) => ca,
            None => {
                let ca = Ca::generate(now)?;
                write_file(&pki.ca_path(), ca.cert_pem.as_bytes(), false)?;
                write_file(&pki.ca_key_path(), ca.key.serialize_pem().as_bytes(), true)?;
                ca
            }
        };
        let pki = Self { ca_cert: ca.cert_der.clone(), ..pki };
        if !pki.server_is_valid(now) {
            pki.issue_server(&ca, now)?;
        }
        Ok(pki)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.pem`: what clients (curl `--cacert`, browsers, tests) trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `ca-key.pem` (absent for [`write_dev_certs`] material).
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// `server.pem`: the server certificate followed by the CA.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// `server-key.pem`.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }

    /// The CA certificate, DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// Every name the server certificate covers.
    pub fn server_names(&self) -> &[String] {
        &self.names
    }

    /// The server chain and key, for [`super::server_config`].
    pub fn key_source(&self) -> CertifiedKeySource {
        CertifiedKeySource::files(self.cert_path(), self.key_path())
    }

    /// A root store holding only the development CA (tests' TLS clients).
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        // Only fails on a certificate webpki cannot parse; ours came from rcgen and was checked
        // on load, and an empty store then makes every handshake fail closed anyway.
        let _ = roots.add(self.ca_cert.clone());
        roots
    }

    fn load_ca(&self, now: SystemTime) -> Option<Ca> {
        let cert_der = read_certs(&self.ca_path()).ok()?.into_iter().next()?;
        let key = KeyPair::from_pem(&fs::read_to_string(self.ca_key_path()).ok()?).ok()?;
        let cert_pem = fs::read_to_string(self.ca_path()).ok()?;
        let ca = Ca { params: Ca::params(now)?, key, cert_der, cert_pem };
        // Prove the key is the certificate's, and that the CA is not about to expire: sign a
        // probe server certificate and verify it as a client would, 30 days from now.
        let probe = ca.issue(&self.names, now).ok()?;
        verify_chain(&ca.cert_der, &[probe.der().clone()], &self.names, now + RENEW_BEFORE)
            .then_some(ca)
    }

    fn server_is_valid(&self, now: SystemTime) -> bool {
        let Ok(chain) = read_certs(&self.cert_path()) else { return false };
        if load_certified_key(&self.cert_path(), &self.key_path()).is_err() {
            return false;
        }
        // Valid longer than macOS accepts (826 days, as issued before the fix): re-issued.
        let validity = chain
            .first()
            .and_then(|leaf| x509_parser::parse_x509_certificate(leaf.as_ref()).ok())
            .map(|(_, c)| c.validity().not_after.timestamp() - c.validity().not_before.timestamp());
        let max = i64::try_from(SERVER_VALIDITY.as_secs()).unwrap_or(i64::MAX);
        if validity.is_none_or(|v| v > max) {
            return false;
        }
        verify_chain(&self.ca_cert, &chain, &self.names, now + RENEW_BEFORE)
    }

    fn issue_server(&self, ca: &Ca, now: SystemTime) -> io::Result<()> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let cert = ca.issue_with_key(&self.names, &key, now)?;
        write_file(&self.key_path(), key.serialize_pem().as_bytes(), true)?;
        write_file(&self.cert_path(), format!("{}{}", cert.pem(), ca.cert_pem).as_bytes(), false)
    }
}

/// Writes fresh development material into `dir` (`ca.pem`, `server.pem`, `server-key.pem`) for
/// `localhost`, `127.0.0.1` and `::1`, discarding the CA key. Behind
/// `portcullis dev certs --out certs/dev`.
pub fn write_dev_certs(dir: &Path) -> io::Result<DevPki> {
    let now = SystemTime::now();
    fs::create_dir_all(dir)?;
    let ca = Ca::generate(now)?;
    let names = server_names(&[])?;
    let pki = DevPki { dir: dir.to_owned(), ca_cert: ca.cert_der.clone(), names };
    write_file(&pki.ca_path(), ca.cert_pem.as_bytes(), false)?;
    pki.issue_server(&ca, now)?;
    match fs::remove_file(pki.ca_key_path()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(pki)
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

// === impl Ca ===

impl Ca {
    /// The CA's parameters. Issuing only needs its name, key identifier method and key usages,
    /// which are the same on every run, so a CA loaded from disk issues from these too.
    fn params(now: SystemTime) -> Option<CertificateParams> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        dn.push(DnType::OrganizationName, CA_ORGANIZATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset(now.checked_sub(DAY)?)?;
        params.not_after = offset(now.checked_add(CA_VALIDITY)?)?;
        Some(params)
    }

    fn generate(now: SystemTime) -> io::Result<Ca> {
        let params = Self::params(now).ok_or_else(|| io::Error::other("clock out of range"))?;
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        Ok(Ca { cert_pem: cert.pem(), cert_der: cert.der().clone(), params, key })
    }

    fn issue(&self, names: &[String], now: SystemTime) -> io::Result<rcgen::Certificate> {
        let key = KeyPair::generate().map_err(rcgen_error)?;
        self.issue_with_key(names, &key, now)
    }

    fn issue_with_key(
        &self,
        names: &[String],
        key: &KeyPair,
        now: SystemTime,
    ) -> io::Result<rcgen::Certificate> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("server names {names:?}: {e}"))
        })?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, SERVER_COMMON_NAME);
        params.distinguished_name.push(DnType::OrganizationName, CA_ORGANIZATION);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let range = || io::Error::other("clock out of range");
        // A day back for clock skew; the validity (notAfter - notBefore, as macOS counts
        // it) stays SERVER_VALIDITY.
        let start = now.checked_sub(DAY).ok_or_else(range)?;
        params.not_before = offset(start).ok_or_else(range)?;
        params.not_after =
            offset(start.checked_add(SERVER_VALIDITY).ok_or_else(range)?).ok_or_else(range)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        params.signed_by(key, &issuer).map_err(rcgen_error)
    }
}

/// The base names plus the extra ones (lower-cased, without duplicates, in a stable order).
/// Each must be an IP address or a DNS name a client can ask for, optionally `*.`-prefixed:
/// rcgen would accept any ASCII, and a certificate for `bad name!` helps nobody.
fn server_names(extra: &[String]) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = BASE_NAMES.iter().map(|s| (*s).to_owned()).collect();
    for name in extra {
        let name = name.trim().to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        if ServerName::try_from(bare).is_err() || bare.contains('*') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is neither a DNS name nor an IP address"),
            ));
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// Whether `chain` (leaf first) verifies up to `ca` for every name at time `at`, using the same
/// verifier a rustls client would.
fn verify_chain(
    ca: &CertificateDer<'static>,
    chain: &[CertificateDer<'static>],
    names: &[String],
    at: SystemTime,
) -> bool {
    let mut roots = RootCertStore::empty();
    if roots.add(ca.clone()).is_err() {
        return false;
    }
    let Ok(verifier) =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build()
    else {
        return false;
    };
    let Some((leaf, intermediates)) = chain.split_first() else { return false };
    let Ok(since_epoch) = at.duration_since(UNIX_EPOCH) else { return false };
    let at = UnixTime::since_unix_epoch(since_epoch);
    names.iter().all(|name| {
        // A wildcard name is checked through a name it must cover.
        let concrete = match name.strip_prefix("*.") {
            Some(rest) => format!("wildcard-check.{rest}"),
            None => name.clone(),
        };
        let Ok(server_name) = ServerName::try_from(concrete) else { return false };
        verifier.verify_server_cert(leaf, intermediates, &server_name, &[], at).is_ok()
    })
}

fn offset(t: SystemTime) -> Option<OffsetDateTime> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()
}

fn rcgen_error(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("certificate generation: {e}"))
}

/// An error if `path` is a symbolic link: development material is neither read nor
/// written through one.
fn refuse_link(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link: development certificates and keys are not read or written through one (remove it)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader never sees half a file; key files
/// are created 0600 from the start rather than narrowed afterwards.
///
/// Nothing planted in the directory is written through: a symbolic link at `path` is
/// refused (the rename would only replace the link, but something put it there, and the
/// developer should know), and the temporary file is created afresh with `O_EXCL` and
/// `O_NOFOLLOW`, so a link or file put at its name between the removal of a stale one and
/// the open fails the write instead of redirecting it.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> io::Result<()> {
    refuse_link(path)?;
    let tmp = path.with_extension("pem.tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
        // As the demo's own state files (`dev::demo`).
        options.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    #[cfg(not(unix))]
    let _ = secret;
    // A stale temporary file from a crash may carry other permissions; start afresh.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = options.open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A server certificate issued before its validity was counted from the backdated
    /// notBefore (826 days, which macOS refuses) is re-issued at the next start, so a demo
    /// state directory made then does not keep it for two years.
    #[test]
    fn a_server_certificate_valid_longer_than_825_days_is_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::load_or_create(dir.path(), &[]).unwrap();
        let now = SystemTime::now();
        let ca = pki.load_ca(now).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(pki.names.clone()).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = offset(now - DAY).unwrap();
        params.not_after = offset(now + SERVER_VALIDITY).unwrap();
        let cert = params.signed_by(&key, &Issuer::from_params(&ca.params, &ca.key)).unwrap();
        write_file(&pki.key_path(), key.serialize_pem().as_bytes(), true).unwrap();
        let chain = format!("{}{}", cert.pem(), ca.cert_pem);
        write_file(&pki.cert_path(), chain.as_bytes(), false).unwrap();
        assert!(!pki.server_is_valid(now), "an 826-day certificate is kept");

        DevPki::load_or_create(dir.path(), &[]).unwrap();
        assert_ne!(fs::read_to_string(pki.cert_path()).unwrap(), chain);
        assert!(pki.server_is_valid(now));
    }
}
