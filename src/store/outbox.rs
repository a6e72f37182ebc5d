//! This replica's sign-outs on their way to the others ([`Store::share_sign_outs`]).
//!
//! A sign-out holds on its own replica at once; sharing it (`SET signout:ID` then
//! `PUBLISH`) may fail while Redis is unreachable. Such a sign-out is kept and tried
//! again, backing off, until Redis takes it: fail closed means the other replicas must
//! eventually refuse the cookie too, not only until the next blip. It needs keeping
//! only until its session would have ended anyway (its `until`), and at most
//! [`MAX_UNSHARED`] are kept.
//!
//! Ordering with the other replicas' read-back: a sign-out is stored before it is
//! published, and a replica subscribes before it reads back, so one shared at any
//! moment of another replica's reconnection is seen by it, by the read-back or by the
//! subscription (or both, which is harmless).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Store, StoreError, RETRY};
use crate::session::revoke::SignOut;

/// At most this many sign-outs wait to be shared (about 40 bytes each): as many as the
/// revocation list holds ([`crate::session::revoke::MAX_REVOCATIONS`]).
pub const MAX_UNSHARED: usize = crate::session::revoke::MAX_REVOCATIONS;

/// How long the last attempt to share what is left takes at most, once the shutdown's
/// drain is over.
pub const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// The longest wait between the last attempts ([`FINAL_FLUSH`]).
const FINAL_RETRY: Duration = Duration::from_millis(500);

/// The sign-outs not shared yet, first made first; their number is the
/// `portcullis_redis_sign_outs_unshared` gauge (summed over the stores of a process).
#[derive(Debug)]
pub struct Unshared {
    queue: VecDeque<SignOut>,
    cap: usize,
}

impl Unshared {
    pub fn with_capacity(cap: usize) -> Unshared {
        Unshared { queue: VecDeque::new(), cap }
    }

    /// Keeps `s`. When full even after dropping the sign-outs whose sessions have ended
    /// by `now`, the one whose session ends first is given up to make room (returned):
    /// it holds on this replica, and the others refuse it for the shortest time.
    pub fn push(&mut self, s: SignOut, now: u64) -> Option<SignOut> {
        if self.queue.len() >= self.cap {
            self.expire(now);
        }
        let mut dropped = None;
        if self.queue.len() >= self.cap {
            let first_to_end = self.queue.iter().enumerate().min_by_key(|(_, s)| s.until);
            match first_to_end.map(|(i, _)| i) {
                Some(i) if self.queue[i].until < s.until => {
                    dropped = self.queue.remove(i);
                    gauge_sub(1);
                }
                // Nothing kept ends before it (or nothing can be kept at all).
                _ => return Some(s),
            }
        }
        self.queue.push_back(s);
        gauge_add(1);
        dropped
    }

    /// Drops the sign-outs whose sessions have ended by `now`: no replica would accept
    /// their cookies any more.
    pub fn expire(&mut self, now: u64) {
        let before = self.queue.len();
        self.queue.retain(|s| s.until > now);
        gauge_sub(before - self.queue.len());
    }

    pub fn first(&self) -> Option<&SignOut> {
        self.queue.front()
    }

    /// Forgets the first: it was shared.
    pub fn shared_first(&mut self) {
        if self.queue.pop_front().is_some() {
            gauge_sub(1);
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

impl Drop for Unshared {
    fn drop(&mut self) {
        gauge_sub(self.queue.len());
    }
}

fn gauge_add(n: usize) {
    let g = &crate::metrics::global().redis_sign_outs_unshared;
    g.fetch_add(n as u64, Ordering::Relaxed);
}

fn gauge_sub(n: usize) {
    let g = &crate::metrics::global().redis_sign_outs_unshared;
    let _ =
        g.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n as u64)));
}

impl Store {
    /// Shares every sign-out `outbox` receives, keeping those Redis does not take and
    /// trying them again (backing off from 100 ms to 5 s, and at once when the
    /// subscription comes back), until `drained` (the shutdown's drain is over, so no
    /// request can sign out any more): then what is left gets [`FINAL_FLUSH`] more.
    pub async fn share_sign_outs(
        self: Arc<Self>,
        mut outbox: mpsc::Receiver<SignOut>,
        mut drained: watch::Receiver<bool>,
    ) {
        let mut unshared = Unshared::with_capacity(MAX_UNSHARED);
        let mut wait = RETRY.0;
        let mut retry_at: Option<Instant> = None;
        loop {
            tokio::select! {
                s = outbox.recv() => match s {
                    Some(s) => self.keep(&mut unshared, s),
                    None => break,
                },
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() => retry_at = None,
                // Redis is back: no need to wait out the backoff.
                () = self.subscribed_again.notified(), if retry_at.is_some() => retry_at = None,
                _ = drained.wait_for(|d| *d) => break,
            }
            if retry_at.is_some() || unshared.is_empty() {
                continue;
            }
            let failing = wait > RETRY.0;
            match self.flush(&mut unshared, &mut outbox).await {
                Ok(()) if failing => {
                    wait = RETRY.0;
                    tracing::info!(server = %self.shown(),
                        "the sign-outs made while Redis was unreachable are now shared");
                }
                Ok(()) => {}
                Err(e) => {
                    crate::metrics::global().redis_errors.inc(&"sign-out");
                    if !failing {
                        tracing::error!(server = %self.shown(), error = %e,
                            unshared = unshared.len(), retry_in = ?wait,
                            "sign-outs are not shared with the other replicas yet (they hold on this one); retrying");
                    }
                    retry_at = Some(Instant::now() + super::jittered(wait));
                    wait = (wait * 2).min(RETRY.1);
                }
            }
        }
        outbox.close();
        while let Some(s) = outbox.recv().await {
            self.keep(&mut unshared, s);
        }
        // Tried again often in the little time left, whatever the backoff had grown
        // to: Redis coming back a second into it must not wait out a 5 s retry.
        let mut wait = RETRY.0;
        let last = async {
            while let Err(e) = self.flush(&mut unshared, &mut outbox).await {
                crate::metrics::global().redis_errors.inc(&"sign-out");
                tracing::debug!(error = %e, "sharing the last sign-outs before exit");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(FINAL_RETRY);
            }
        };
        let _ = tokio::time::timeout(FINAL_FLUSH, last).await;
        unshared.expire(crate::util::unix_now());
        if !unshared.is_empty() {
            crate::metrics::global().redis_errors.inc(&"sign-out");
            tracing::error!(server = %self.shown(), unshared = unshared.len(),
                "exiting with sign-outs the other replicas were never told of: copies of those cookies work there until their sessions end");
        }
    }

    fn keep(&self, unshared: &mut Unshared, s: SignOut) {
        if unshared.push(s, crate::util::unix_now()).is_some() {
            crate::metrics::global().redis_errors.inc(&"sign-out");
            tracing::error!(server = %self.shown(), max = MAX_UNSHARED,
                "too many sign-outs wait for Redis: the one whose session ends first will not be shared (it holds on this one)");
        }
    }

    /// Shares the waiting sign-outs, first made first, until one fails; takes what
    /// `outbox` received meanwhile as it goes, so a long backlog does not fill it.
    async fn flush(
        &self,
        unshared: &mut Unshared,
        outbox: &mut mpsc::Receiver<SignOut>,
    ) -> Result<(), StoreError> {
        unshared.expire(crate::util::unix_now());
        while let Some(s) = unshared.first().copied() {
            self.share_sign_out(&s, crate::util::unix_now()).await?;
            unshared.shared_first();
            while let Ok(s) = outbox.try_recv() {
                self.keep(unshared, s);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign_out(n: u8, until: u64) -> SignOut {
        SignOut { key: [n; 16], created: until.saturating_sub(3600), until }
    }

    #[test]
    fn sign_outs_are_kept_only_until_their_sessions_end_and_in_bounds() {
        let mut u = Unshared::with_capacity(3);
        for (n, until) in [(1, 500), (2, 300), (3, 400)] {
            assert_eq!(u.push(sign_out(n, until), 100), None);
        }
        // Full: the one whose session ends first makes room, not the newest.
        assert_eq!(u.push(sign_out(4, 600), 100), Some(sign_out(2, 300)));
        assert_eq!(u.len(), 3);
        // One that would end before all those kept is the one given up.
        assert_eq!(u.push(sign_out(5, 200), 100), Some(sign_out(5, 200)));
        // Ended sessions make room before anything live is given up.
        assert_eq!(u.push(sign_out(6, 700), 450), None);
        let kept: Vec<u8> = u.queue.iter().map(|s| s.key[0]).collect();
        assert_eq!(kept, [1, 4, 6], "first made first");
        u.expire(600);
        assert_eq!(u.first(), Some(&sign_out(6, 700)));
        u.shared_first();
        assert!(u.is_empty());
        let mut none = Unshared::with_capacity(0);
        assert_eq!(none.push(sign_out(1, 500), 100), Some(sign_out(1, 500)));
    }
}
