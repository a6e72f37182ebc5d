//! Certificate selection by SNI.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;

use super::{CertifiedKeySource, TlsError};

/// Picks the certificate for a connection from the client's SNI: an exact name first, then a
/// wildcard `*.suffix` covering exactly one more label (as certificate wildcards do, RFC 6125
/// §6.4.3), then the default. A client that sends no SNI (connecting by IP) gets the default.
#[derive(Debug)]
pub struct SniResolver {
    /// Lower-case names without a trailing dot.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`, lower-case.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

// === impl SniResolver ===

impl SniResolver {
    /// Loads every source and checks every name; fails on the first bad entry.
    pub fn load(
        default: CertifiedKeySource,
        sni: Vec<(String, CertifiedKeySource)>,
    ) -> Result<Self, TlsError> {
        let mut resolver =
            Self { exact: HashMap::new(), wildcard: HashMap::new(), default: default.load()? };
        for (name, source) in sni {
            let key = source.load()?;
            let (table, normalized) = match parse_name(&name)? {
                Name::Exact(n) => (&mut resolver.exact, n),
                Name::Wildcard(suffix) => (&mut resolver.wildcard, suffix),
            };
            if table.insert(normalized, key).is_some() {
                return Err(TlsError::DuplicateServerName { name });
            }
        }
        Ok(resolver)
    }

    /// The certificate for a server name as sent in SNI (`None`: no SNI).
    pub fn select(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else { return &self.default };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        if let Some((_first, suffix)) = name.split_once('.') {
            if let Some(key) = self.wildcard.get(suffix) {
                return key;
            }
        }
        &self.default
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.select(client_hello.server_name())))
    }
}

enum Name {
    Exact(String),
    Wildcard(String),
}

/// A configured SNI name as the resolver keys it (`*.suffix` for a wildcard, the exact
/// name otherwise, lower-case without a trailing dot), or why the listener refuses it:
/// what `check` reports where the name is written, so `serve` never fails on it at start.
pub fn server_name_key(raw: &str) -> Result<String, TlsError> {
    Ok(match parse_name(raw)? {
        Name::Exact(n) => n,
        Name::Wildcard(suffix) => format!("*.{suffix}"),
    })
}

/// Normalizes a configured name; a wildcard is allowed only as the whole leftmost label, and
/// never directly above a top-level domain (`*.com` would be a mistake, not a configuration).
fn parse_name(raw: &str) -> Result<Name, TlsError> {
    let invalid = |why| TlsError::InvalidServerName { name: raw.to_owned(), why };
    let name = raw.trim_end_matches('.').to_ascii_lowercase();
    let (wildcard, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    if rest.contains('*') {
        return Err(invalid("a wildcard must be the whole leftmost label, as in *.example.com"));
    }
    match ServerName::try_from(rest) {
        Ok(ServerName::DnsName(_)) => {}
        Ok(_) => return Err(invalid("an IP address is never sent in SNI")),
        Err(_) => return Err(invalid("not a DNS name")),
    }
    if wildcard {
        if !rest.contains('.') {
            return Err(invalid("a wildcard needs at least two labels after *."));
        }
        Ok(Name::Wildcard(rest.to_owned()))
    } else {
        Ok(Name::Exact(rest.to_owned()))
    }
}
