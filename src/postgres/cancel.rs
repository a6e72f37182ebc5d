//! CancelRequest routing. The client gets a (pid, secret) minted by portcullis, never the
//! upstream backend's; a cancel with a matching pair is forwarded to the backend that
//! session is connected to, over a new upstream connection (TLS when the route uses it).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::DatabaseSettings;

/// Where a client's cancel key leads.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub db: Arc<DatabaseSettings>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The upstream backend's key.
    pub pid: u32,
    pub secret: u32,
    pub session_id: Arc<str>,
}

/// Client keys of open sessions.
#[derive(Debug, Default)]
pub struct CancelMap {
    map: Mutex<HashMap<u32, (u32, CancelTarget)>>,
}

/// Removes the key when the session ends.
#[derive(Debug)]
pub struct CancelGuard {
    map: Arc<CancelMap>,
    pub pid: u32,
    pub secret: u32,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.map.map.lock().remove(&self.pid);
    }
}

impl CancelMap {
    /// Mints a fresh client key (pid unique among open sessions, positive as PostgreSQL's).
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelGuard {
        let mut map = self.map.lock();
        loop {
            let mut b = [0u8; 8];
            let _ = aws_lc_rs::rand::fill(&mut b);
            let pid = u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]);
            let secret = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            map.insert(pid, (secret, target));
            return CancelGuard { map: self.clone(), pid, secret };
        }
    }

    /// The target of a client key; the secret is compared in constant time.
    pub fn lookup(&self, pid: u32, secret: u32) -> Option<CancelTarget> {
        let map = self.map.lock();
        let (s, t) = map.get(&pid)?;
        aws_lc_rs::constant_time::verify_slices_are_equal(&s.to_be_bytes(), &secret.to_be_bytes())
            .ok()
            .map(|()| t.clone())
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
