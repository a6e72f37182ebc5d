//! TLS tests: real handshakes over loopback with tokio-rustls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

/// A test CA and leaf certificates it signs, written as PEM files into a temporary directory.
struct TestCa {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { dir: tempfile::tempdir().unwrap(), issuer }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        roots
    }

    /// Issues a leaf for `sans`; returns its DER and the files.
    fn leaf(&self, label: &str, sans: &[&str]) -> (CertificateDer<'static>, CertifiedKeySource) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        let cert_path = self.path(&format!("{label}.pem"));
        let key_path = self.path(&format!("{label}-key.pem"));
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert.der().clone(), CertifiedKeySource::files(cert_path, key_path))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn client(roots: RootCertStore, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// What the client saw of one handshake.
#[derive(Debug)]
struct Seen {
    leaf: CertificateDer<'static>,
    alpn: Option<Vec<u8>>,
}

/// One full handshake on loopback: a server task with `server`, a client with `client`
/// connecting as `name`.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> Result<Seen, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // Hold the connection until the client closes it; a failed handshake just ends here.
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let mut buf = [0u8; 1];
            let _ = tls.read(&mut buf).await;
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let result = TlsConnector::from(client).connect(server_name, tcp).await;
    let seen = match result {
        Ok(tls) => {
            let conn = tls.get_ref().1;
            Ok(Seen {
                leaf: conn.peer_certificates().unwrap()[0].clone().into_owned(),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            })
        }
        Err(e) => Err(e.to_string()),
    };
    server_task.abort();
    seen
}

#[tokio::test]
async fn sni_selects_exact_then_wildcard_then_default() {
    let ca = TestCa::new();
    let (default_der, default_src) = ca.leaf(
        "default",
        &["default.example.test", "a.b.apps.example.test", "apps.example.test", "127.0.0.1"],
    );
    let (api_der, api_src) = ca.leaf("api", &["api.example.test"]);
    let (wild_der, wild_src) = ca.leaf("wild", &["*.apps.example.test"]);
    let (special_der, special_src) = ca.leaf("special", &["special.apps.example.test"]);
    let server = server_config(
        default_src,
        vec![
            ("api.example.test".into(), api_src),
            ("*.apps.example.test".into(), wild_src),
            // Upper case and a trailing dot in configuration are normalized.
            ("Special.Apps.Example.Test.".into(), special_src),
        ],
    )
    .unwrap();
    let client = client(ca.roots(), &[]);

    let cases: [(&str, &CertificateDer<'_>, &str); 7] = [
        ("api.example.test", &api_der, "exact name"),
        ("API.Example.TEST", &api_der, "exact name, any case"),
        ("x.apps.example.test", &wild_der, "wildcard, one label"),
        ("special.apps.example.test", &special_der, "exact beats wildcard"),
        ("a.b.apps.example.test", &default_der, "wildcard covers one label only"),
        ("apps.example.test", &default_der, "wildcard does not cover its suffix"),
        ("127.0.0.1", &default_der, "no SNI (IP address)"),
    ];
    for (name, want, why) in cases {
        let seen = handshake(Arc::clone(&server), Arc::clone(&client), name)
            .await
            .unwrap_or_else(|e| panic!("{why}: {name}: handshake failed: {e}"));
        assert_eq!(&seen.leaf, want, "{why}: {name}");
    }
}

#[tokio::test]
async fn unknown_name_gets_default_which_the_client_rejects() {
    let ca = TestCa::new();
    let (_, default_src) = ca.leaf("default", &["default.example.test"]);
    let server = server_config(default_src, vec![]).unwrap();
    let err = handshake(server, client(ca.roots(), &[]), "other.example.test").await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn alpn_prefers_h2_then_http11() {
    let ca = TestCa::new();
    let (_, src) = ca.leaf("server", &["localhost"]);
    let server = server_config(src, vec![]).unwrap();
    let roots = ca.roots();

    type Case = (&'static [&'static [u8]], Option<&'static [u8]>);
    let cases: [Case; 4] = [
        (&[b"h2", b"http/1.1"], Some(b"h2")),
        (&[b"http/1.1", b"h2"], Some(b"h2")),
        (&[b"http/1.1"], Some(b"http/1.1")),
        (&[], None),
    ];
    for (offered, want) in cases {
        let seen =
            handshake(Arc::clone(&server), client(roots.clone(), offered), "localhost").await;
        assert_eq!(seen.unwrap().alpn.as_deref(), want, "client offered {offered:?}");
    }

    // A client offering only protocols we do not speak is refused (RFC 7301 §3.2).
    let err = handshake(server, client(roots, &[b"spdy/3"]), "localhost").await.unwrap_err();
    assert!(err.contains("NoApplicationProtocol"), "{err}");
}

#[tokio::test]
async fn alpn_variant_for_postgres() {
    let ca = TestCa::new();
    let (_, src) = ca.leaf("server", &["localhost"]);
    let server = server_config_with_alpn(src, vec![], vec![b"postgresql".to_vec()]).unwrap();
    let seen = handshake(server, client(ca.roots(), &[b"postgresql"]), "localhost").await.unwrap();
    assert_eq!(seen.alpn.as_deref(), Some(&b"postgresql"[..]));
}

#[test]
fn bad_files_are_named_with_what_is_wrong() {
    let ca = TestCa::new();
    let (_, src) = ca.leaf("good", &["localhost"]);
    let CertifiedKeySource::Files { cert, key } = src else { unreachable!() };
    let (_, other) = ca.leaf("other", &["localhost"]);
    let CertifiedKeySource::Files { key: other_key, .. } = other else { unreachable!() };
    let garbage = ca.path("garbage.pem");
    fs::write(&garbage, "not pem at all\n").unwrap();
    let broken = ca.path("broken.pem");
    fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let missing = ca.path("missing.pem");

    let load = |c: &Path, k: &Path| load_certified_key(c, k).unwrap_err();
    let cases: Vec<(TlsError, &Path, &str)> = vec![
        (load(&missing, &key), &missing, "file not found"),
        (load(&cert, &missing), &missing, "file not found"),
        (load(&key, &key), &key, "no certificate"),
        (load(&garbage, &key), &garbage, "no certificate"),
        (load(&cert, &cert), &cert, "no private key"),
        (load(&broken, &key), &broken, "malformed PEM"),
        (load(&cert, &other_key), &other_key, "does not match the certificate"),
    ];
    for (err, path, what) in cases {
        let msg = err.to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg} should start with {path:?}");
        assert!(msg.contains(what), "{msg} should say {what:?}");
    }
    assert!(matches!(load(&cert, &other_key), TlsError::KeyMismatch { .. }));
}

#[test]
fn bad_server_names_are_rejected() {
    let ca = TestCa::new();
    let (_, src) = ca.leaf("server", &["localhost"]);
    for bad in ["*", "*.com", "a.*.example.com", "*x.example.com", "10.0.0.1", "exa mple.com"] {
        let err = server_config(src.clone(), vec![(bad.into(), src.clone())]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidServerName { .. }), "{bad}: {err}");
    }
    let err = server_config(
        src.clone(),
        vec![("a.example.com".into(), src.clone()), ("A.example.com".into(), src.clone())],
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::DuplicateServerName { .. }), "{err}");
}

#[test]
fn client_config_roots_and_alpn() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = DevPki::load_or_create(pki_dir.path(), &[]).unwrap();

    let with_ca = client_config(Some(&pki.ca_path()), true).unwrap();
    assert_eq!(with_ca.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    let plain = client_config(None, false).unwrap();
    assert_eq!(plain.alpn_protocols, vec![b"http/1.1".to_vec()]);

    let missing = pki_dir.path().join("nope.pem");
    let err = client_config(Some(&missing), true).unwrap_err();
    assert!(matches!(err, TlsError::Missing { .. }), "{err}");
    let err = client_config(Some(&pki.key_path()), true).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
}

#[tokio::test]
async fn client_config_trusts_extra_ca_and_public_roots_only() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = DevPki::load_or_create(pki_dir.path(), &["proxy.example.test".into()]).unwrap();
    let server = server_config(pki.key_source(), vec![]).unwrap();

    for name in ["localhost", "127.0.0.1", "proxy.example.test"] {
        let with_ca = client_config(Some(&pki.ca_path()), true).unwrap();
        let seen = handshake(Arc::clone(&server), with_ca, name).await.unwrap();
        assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]), "{name}");
    }
    // Without the extra CA, the dev certificate is not trusted.
    let err = handshake(server, client_config(None, true).unwrap(), "localhost").await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[test]
fn dev_pki_creates_files_and_reuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let first = DevPki::load_or_create(dir.path(), &[]).unwrap();
    for path in [first.ca_path(), first.ca_key_path(), first.cert_path(), first.key_path()] {
        assert!(path.is_file(), "{path:?}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [first.ca_key_path(), first.key_path()] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key:?}");
        }
    }
    // The chain file is leaf then CA.
    let chain = read_certs(&first.cert_path()).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(&chain[1], first.ca_cert_der());
    assert_eq!(first.server_names(), ["localhost", "127.0.0.1", "::1"]);

    let cert_before = fs::read(first.cert_path()).unwrap();
    let ca_before = fs::read(first.ca_path()).unwrap();
    let second = DevPki::load_or_create(dir.path(), &[]).unwrap();
    assert_eq!(fs::read(second.cert_path()).unwrap(), cert_before, "valid material is reused");
    assert_eq!(second.ca_cert_der(), first.ca_cert_der());

    // A new name re-issues the server certificate under the same CA.
    let third = DevPki::load_or_create(dir.path(), &["Portcullis.Test".into()]).unwrap();
    assert_ne!(fs::read(third.cert_path()).unwrap(), cert_before);
    assert_eq!(fs::read(third.ca_path()).unwrap(), ca_before);
    assert!(third.server_names().contains(&"portcullis.test".to_string()));
}

#[test]
fn dev_pki_renews_expiring_and_repairs_damaged_material() {
    let dir = tempfile::tempdir().unwrap();
    let first = DevPki::load_or_create(dir.path(), &[]).unwrap();
    let ca_before = fs::read(first.ca_path()).unwrap();
    let cert_before = fs::read(first.cert_path()).unwrap();

    // 810 days on, the 825-day server certificate is within the renewal window; the CA is not.
    let later = SystemTime::now() + Duration::from_secs(810 * 24 * 3600);
    let renewed = DevPki::load_or_create_at(dir.path(), &[], later).unwrap();
    assert_ne!(fs::read(renewed.cert_path()).unwrap(), cert_before);
    assert_eq!(fs::read(renewed.ca_path()).unwrap(), ca_before);

    // A damaged key is replaced (key and certificate together).
    fs::write(first.key_path(), "garbage").unwrap();
    let repaired = DevPki::load_or_create(dir.path(), &[]).unwrap();
    load_certified_key(&repaired.cert_path(), &repaired.key_path()).unwrap();

    // A lost CA key means a new CA.
    fs::remove_file(first.ca_key_path()).unwrap();
    let new_ca = DevPki::load_or_create(dir.path(), &[]).unwrap();
    assert_ne!(fs::read(new_ca.ca_path()).unwrap(), ca_before);
    load_certified_key(&new_ca.cert_path(), &new_ca.key_path()).unwrap();
}

#[test]
fn dev_pki_rejects_bad_names_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("pki");
    let err = DevPki::load_or_create(&sub, &["bad name!".into()]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    assert!(!sub.exists());
}

#[test]
fn write_dev_certs_discards_the_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ca-key.pem"), "stale").unwrap();
    let pki = write_dev_certs(dir.path()).unwrap();
    assert!(pki.ca_path().is_file() && pki.cert_path().is_file() && pki.key_path().is_file());
    assert!(!pki.ca_key_path().exists());
    load_certified_key(&pki.cert_path(), &pki.key_path()).unwrap();
}

/// A development server certificate is valid for at most 825 days, counted as macOS
/// counts it (notAfter - notBefore), or a Mac refuses the demo's certificate
/// (`NET::ERR_CERT_VALIDITY_TOO_LONG`) even with its CA trusted. Its notBefore lies a day
/// back for clock skew, so the end is 825 days after that, not after now.
#[test]
fn dev_server_certificates_are_valid_for_at_most_825_days() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_dev_certs(&dir.path().join("committed")).unwrap();
    let kept = DevPki::load_or_create(&dir.path().join("demo"), &[]).unwrap();
    for pki in [written, kept] {
        let leaf = read_certs(&pki.cert_path()).unwrap().remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        let validity = cert.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
        let left = validity.not_after.timestamp()
            - i64::try_from(
                SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            )
            .unwrap();
        assert!(
            (validity.not_after.timestamp() - validity.not_before.timestamp()) <= 825 * 86_400,
            "{}: {days} days",
            pki.cert_path().display()
        );
        assert!(left > 823 * 86_400, "{}: ends too soon", pki.cert_path().display());
    }
}

/// The committed `certs/dev` material loads and matches (regenerate with
/// `cargo run -- dev certs --out certs/dev` if this fails).
#[test]
fn committed_dev_certs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev");
    load_certified_key(&dir.join("server.pem"), &dir.join("server-key.pem")).unwrap();
    read_certs(&dir.join("ca.pem")).unwrap();
}

/// Regenerates the committed `certs/dev` material without the CLI:
/// `cargo test --lib tls::tests::regenerate_committed_dev_certs -- --ignored`.
#[test]
#[ignore = "writes into the source tree; run by hand to regenerate certs/dev"]
fn regenerate_committed_dev_certs() {
    write_dev_certs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev")).unwrap();
}

/// The leaf's notAfter is read as written; within 14 days of it, or past it, a load warns.
#[test]
fn not_after_and_expiry_warnings() {
    let at = 1_924_992_000; // 2031-01-01T00:00:00Z
    let mut params = CertificateParams::new(vec!["x.example.com".to_string()]).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(at).unwrap();
    let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
    assert_eq!(not_after(cert.der()), Some(at));
    assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])), None);

    let day = 86_400;
    let now = |before: i64| u64::try_from(at - before).unwrap();
    assert_eq!(expiry_warning(at, now(14 * day)), None);
    assert_eq!(
        expiry_warning(at, now(14 * day - 1)).as_deref(),
        Some("expires in 13 days (2031-01-01T00:00:00Z): renew it")
    );
    assert_eq!(
        expiry_warning(at, now(day)).as_deref(),
        Some("expires in 1 day (2031-01-01T00:00:00Z): renew it")
    );
    assert_eq!(
        expiry_warning(at, now(60)).as_deref(),
        Some("expires in less than a day (2031-01-01T00:00:00Z): renew it")
    );
    assert_eq!(
        expiry_warning(at, now(0)).as_deref(),
        Some("expired less than a day ago (2031-01-01T00:00:00Z): clients refuse it; renew it")
    );
    assert_eq!(
        expiry_warning(at, now(-3 * day - 5)).as_deref(),
        Some("expired 3 days ago (2031-01-01T00:00:00Z): clients refuse it; renew it")
    );
}

/// A symbolic link planted where a development key goes is refused, and what it points
/// to is left as it was.
#[cfg(unix)]
#[test]
fn dev_pki_never_writes_through_a_symbolic_link() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    fs::create_dir_all(&pki).unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, pki.join("server-key.pem")).unwrap();
    let err = DevPki::load_or_create(&pki, &[]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("server-key.pem is a symbolic link"), "{err}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert!(fs::symlink_metadata(pki.join("server-key.pem")).unwrap().file_type().is_symlink());
    assert!(!pki.join("ca.pem").exists(), "refused before writing anything");

    // `dev certs --out` too, for the CA certificate it writes first.
    let out = dir.path().join("out");
    fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&victim, out.join("ca.pem")).unwrap();
    assert!(write_dev_certs(&out).unwrap_err().to_string().contains("ca.pem is a symbolic link"));
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");

    // Once the link is gone, the material is written, keys 0600.
    fs::remove_file(pki.join("server-key.pem")).unwrap();
    let made = DevPki::load_or_create(&pki, &[]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(made.key_path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
