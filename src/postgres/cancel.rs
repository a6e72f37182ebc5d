//! CancelRequest routing. The client gets a (pid, secret) minted by portcullis, never the
//! upstream backend's; a cancel with a matching pair is forwarded to the backend that
//! session is connected to, over a new upstream connection (TLS when the route uses it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{proto, upstream};
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

impl CancelTarget {
    /// Whether the backend's key is known: a server that sent no BackendKeyData (poolers
    /// may omit it) cannot be sent a cancel.
    pub fn is_known(&self) -> bool {
        self.pid != 0
    }

    /// Sends the backend's CancelRequest over a new upstream connection (TLS when the
    /// route uses it, as the session's own connection), then waits briefly for the server
    /// to close it, which it does once it has acted on it. Whether the request was sent:
    /// PostgreSQL answers nothing, so whether a statement was running and stopped is not
    /// known here.
    pub async fn send(&self) -> bool {
        if !self.is_known() {
            return false;
        }
        let connect = upstream::connect(&self.db, self.tls.as_ref());
        let Ok(Ok(mut s)) =
            tokio::time::timeout(self.db.connect_timeout + Duration::from_secs(5), connect).await
        else {
            return false;
        };
        let sent = s.write_all(&proto::cancel_request(self.pid, self.secret)).await.is_ok()
            && s.flush().await.is_ok();
        let mut sink = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
        sent
    }
}

/// How many draws [`CancelMap::register`] makes before it gives up: with 2³¹ pids, 64
/// collisions in a row mean a broken random source, not bad luck.
const MINT_ATTEMPTS: usize = 64;

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
    /// Mints a fresh client key (pid unique among open sessions, positive as PostgreSQL's),
    /// or `None` when the system's random source fails: the session is then refused, as
    /// a key that is not random would let others cancel its statements.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> Option<CancelGuard> {
        self.register_with(target, |b| aws_lc_rs::rand::fill(b).map_err(|_| ()))
    }

    /// [`CancelMap::register`] with the random source given. A draw that fails ends it at
    /// once, and so do [`MINT_ATTEMPTS`] draws that each collide with an open session's pid
    /// (or are 0), rather than retrying under the lock for ever.
    pub(super) fn register_with(
        self: &Arc<Self>,
        target: CancelTarget,
        mut fill: impl FnMut(&mut [u8]) -> Result<(), ()>,
    ) -> Option<CancelGuard> {
        let mut map = self.map.lock();
        for _ in 0..MINT_ATTEMPTS {
            let mut b = [0u8; 8];
            fill(&mut b).ok()?;
            let pid = u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]);
            let secret = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            map.insert(pid, (secret, target));
            return Some(CancelGuard { map: self.clone(), pid, secret });
        }
        None
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
