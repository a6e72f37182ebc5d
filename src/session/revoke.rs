//! Signed-out sessions: a per-process list of the browser sessions `/.portcullis/logout`
//! ended, consulted whenever a session cookie is opened.
//!
//! Sessions are sealed cookies with no server-side store, so clearing the cookie in one
//! browser leaves every copy of it (stolen, or held by another browser profile or a
//! tool) working until its lifetimes end. Sign-out therefore records the session's
//! [`SessionId`] here until the session would have ended anyway (its sign-in time plus
//! `absolute_lifetime`); a cookie of a recorded session is refused (`session-revoked`)
//! as if there were none.
//!
//! Bounded ([`MAX_REVOCATIONS`]) and fail-closed when full: the list never forgets a
//! sign-out whose session could still be used. A sign-out that finds it full of live
//! entries raises a *floor* instead: every session signed in at or before the sign-in
//! time of the oldest entry is refused from then on, signed out or not, and the entries
//! the floor covers are dropped. Those are the sessions nearest to their absolute end;
//! their users sign in again. Each entry takes a signed-in session (an identity-provider
//! sign-in) to make, which is what it would take to fill the list (docs/threat-model.md).
//!
//! Per process and in memory: a restart forgets it, and replicas share it only through
//! `[redis]` ([`crate::store`], docs/sso.md). Rotating the `[session]` keys still signs
//! everyone out everywhere.

use std::collections::{BTreeSet, HashMap};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::RwLock;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// At most this many signed-out sessions are remembered at once (about 100 bytes each).
pub const MAX_REVOCATIONS: usize = 100_000;

/// Audit detail of a refused cookie whose session was signed out.
pub const SIGNED_OUT: &str = "session signed out at /.portcullis/logout";
/// Audit detail of a refused cookie that the floor covers.
pub const BELOW_FLOOR: &str =
    "session signed in before the floor the full revocation list raised; sign in again";

/// A browser session's identifier: 128 random bits drawn at sign-in and kept by every
/// renewal (refresh, last-use updates), so that every copy of a session's cookie, old or
/// renewed, names the same session. All zero: a session sealed before sessions had one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// A new random identifier.
    pub fn random() -> Result<SessionId, &'static str> {
        let mut b = [0u8; 16];
        aws_lc_rs::rand::fill(&mut b).map_err(|_| "no randomness")?;
        Ok(SessionId(b))
    }

    /// Whether this is no identifier (a cookie sealed before sessions had one).
    pub fn is_none(&self) -> bool {
        self.0 == [0; 16]
    }
}

/// In the cookie: 22 characters of base64url.
impl Serialize for SessionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 22];
        match URL_SAFE_NO_PAD.encode_slice(self.0, &mut buf) {
            Ok(22) => {
                s.serialize_str(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)
            }
            _ => Err(serde::ser::Error::custom("session id encoding")),
        }
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SessionId, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SessionId;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a session id (22 characters of base64url)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SessionId, E> {
                let mut out = [0u8; 18];
                match URL_SAFE_NO_PAD.decode_slice(v, &mut out) {
                    Ok(16) if v.len() == 22 => {
                        let mut id = [0u8; 16];
                        id.copy_from_slice(&out[..16]);
                        Ok(SessionId(id))
                    }
                    _ => Err(E::custom("malformed session id")),
                }
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// What [`Revocations::revoke`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Recorded: copies of the cookie are refused from now on.
    Recorded,
    /// Already refused (recorded before, or under the floor): nothing changed.
    Already,
    /// The session had reached its absolute lifetime: nothing to record.
    Ended,
    /// The list was full of live entries: the floor rose to this sign-in time (every
    /// session signed in at or before it is refused now), and the session is refused.
    Overflow { floor: u64 },
}

/// The signed-out sessions of a process (see the module documentation).
#[derive(Debug)]
pub struct Revocations {
    cap: usize,
    inner: RwLock<Inner>,
    /// Counts the sign-outs that refused a session (recorded, or past a new floor):
    /// what outlives a request (a WebSocket tunnel a session opened) watches it to
    /// check its session again.
    sign_outs: tokio::sync::watch::Sender<u64>,
    /// Where this replica's own sign-outs go to be shared with the others (`[redis]`,
    /// [`crate::store`]), once set.
    outbox: std::sync::OnceLock<tokio::sync::mpsc::Sender<SignOut>>,
}

/// A sign-out as the replicas share it: the session, its sign-in time, and until when
/// it must be remembered (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignOut {
    pub key: [u8; 16],
    pub created: u64,
    pub until: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Signed-out session → its sign-in time.
    by_key: HashMap<[u8; 16], u64>,
    /// The same entries by sign-in time: the first ends first.
    by_created: BTreeSet<(u64, [u8; 16])>,
    /// Sessions signed in at or before this time are refused (set when the list was
    /// full; gone once such sessions have all reached their absolute lifetime).
    floor: Option<u64>,
    /// The longest `absolute_lifetime` a sign-out was recorded under: entries and the
    /// floor are kept that long. A reload that shortens the lifetime must not drop
    /// them, or one that lengthens it again would bring their cookies back.
    longest: u64,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations::with_capacity(MAX_REVOCATIONS)
    }
}

impl Revocations {
    /// A list holding at most `cap` entries.
    pub fn with_capacity(cap: usize) -> Revocations {
        Revocations {
            cap,
            inner: RwLock::new(Inner::default()),
            sign_outs: tokio::sync::watch::channel(0).0,
            outbox: std::sync::OnceLock::new(),
        }
    }

    /// Sends every sign-out made here from now on to `outbox` as well, to be shared
    /// with the other replicas. False if one was set already.
    pub fn share_with(&self, outbox: tokio::sync::mpsc::Sender<SignOut>) -> bool {
        self.outbox.set(outbox).is_ok()
    }

    /// Why the session known by `key` and signed in at `created` is refused, if it is:
    /// [`SIGNED_OUT`] or [`BELOW_FLOOR`]. One hash lookup under a read lock; allocates
    /// nothing.
    pub fn refused(&self, key: &[u8; 16], created: u64) -> Option<&'static str> {
        let inner = self.inner.read();
        if inner.floor.is_some_and(|f| created <= f) {
            return Some(BELOW_FLOOR);
        }
        inner.by_key.contains_key(key).then_some(SIGNED_OUT)
    }

    /// Records that the session known by `key`, signed in at `created`, was signed out
    /// at `now`; it is remembered until `created + lifetime` (its absolute lifetime),
    /// or longer if an earlier sign-out was made under a longer lifetime (a reload
    /// shortened it, and may lengthen it again). Entries and a floor whose sessions have
    /// all ended by `now` are dropped first.
    /// With a shared store, the sign-out is then handed to it ([`Self::share_with`]);
    /// a full hand-off queue is logged and counted, and the sign-out holds here anyway.
    pub fn revoke(&self, key: [u8; 16], created: u64, lifetime: u64, now: u64) -> Revoked {
        let outcome = self.revoke_from_peer(key, created, lifetime, now);
        if let (Some(outbox), Revoked::Recorded | Revoked::Overflow { .. }) =
            (self.outbox.get(), outcome)
        {
            let until = created.saturating_add(lifetime);
            if outbox.try_send(SignOut { key, created, until }).is_err() {
                crate::metrics::global().redis_errors.inc(&"sign-out");
                tracing::error!("a sign-out could not be queued for the other replicas");
            }
        }
        outcome
    }

    /// [`Self::revoke`] for a sign-out another replica made (through the shared
    /// store): recorded here, never handed back to the store.
    pub fn revoke_from_peer(
        &self,
        key: [u8; 16],
        created: u64,
        lifetime: u64,
        now: u64,
    ) -> Revoked {
        let outcome = self.record(key, created, lifetime, now);
        if matches!(outcome, Revoked::Recorded | Revoked::Overflow { .. }) {
            self.sign_outs.send_modify(|n| *n = n.wrapping_add(1));
        }
        outcome
    }

    /// Changes at every sign-out that refused a session from then on.
    pub fn sign_outs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sign_outs.subscribe()
    }

    fn record(&self, key: [u8; 16], created: u64, lifetime: u64, now: u64) -> Revoked {
        let mut inner = self.inner.write();
        let inner = &mut *inner;
        inner.longest = inner.longest.max(lifetime);
        let lifetime = inner.longest;
        if now >= created.saturating_add(lifetime) {
            return Revoked::Ended;
        }
        while let Some(&(c, k)) = inner.by_created.first() {
            if now < c.saturating_add(lifetime) {
                break;
            }
            inner.by_created.pop_first();
            inner.by_key.remove(&k);
        }
        if inner.floor.is_some_and(|f| now >= f.saturating_add(lifetime)) {
            inner.floor = None;
        }
        if inner.floor.is_some_and(|f| created <= f) || inner.by_key.contains_key(&key) {
            return Revoked::Already;
        }
        let mut outcome = Revoked::Recorded;
        if inner.by_key.len() >= self.cap {
            // Full of sessions that could still be used: forgetting one would bring its
            // cookie back. Refuse instead every session as old as the oldest entry.
            let floor = inner.by_created.first().map_or(created, |&(c, _)| c).min(created);
            inner.floor = Some(floor);
            while let Some(&(c, k)) = inner.by_created.first() {
                if c > floor {
                    break;
                }
                inner.by_created.pop_first();
                inner.by_key.remove(&k);
            }
            outcome = Revoked::Overflow { floor };
            if created <= floor {
                return outcome;
            }
        }
        inner.by_key.insert(key, created);
        inner.by_created.insert((created, key));
        outcome
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.inner.read().by_key.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The floor, if the list raised one ([`Revoked::Overflow`]).
    pub fn floor(&self) -> Option<u64> {
        self.inner.read().floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;

    fn key(n: u8) -> [u8; 16] {
        [n; 16]
    }

    #[test]
    fn a_signed_out_session_is_refused_until_its_absolute_lifetime_ends() {
        let list = Revocations::default();
        assert_eq!(list.refused(&key(1), 1000), None);
        assert_eq!(list.revoke(key(1), 1000, HOUR, 1500), Revoked::Recorded);
        assert_eq!(list.refused(&key(1), 1000), Some(SIGNED_OUT));
        // Another session, of the same user or not, signed in at the same time or not.
        assert_eq!(list.refused(&key(2), 1000), None);
        assert_eq!(list.revoke(key(1), 1000, HOUR, 1600), Revoked::Already);
        assert_eq!(list.len(), 1);
        // Signing out a session that has already ended records nothing.
        assert_eq!(list.revoke(key(3), 1000, HOUR, 1000 + HOUR), Revoked::Ended);
        assert_eq!(list.len(), 1);
        // Once the session has ended anyway, the next sign-out drops its entry.
        assert_eq!(list.revoke(key(4), 5000, HOUR, 1000 + HOUR - 1), Revoked::Recorded);
        assert_eq!(list.len(), 2);
        assert_eq!(list.revoke(key(5), 5000, HOUR, 1000 + HOUR), Revoked::Recorded);
        assert_eq!(list.len(), 2, "the ended entry is dropped");
        assert_eq!(list.refused(&key(1), 1000), None);
        assert_eq!(list.refused(&key(4), 5000), Some(SIGNED_OUT));
        assert_eq!(list.floor(), None);
    }

    #[test]
    fn a_full_list_drops_ended_entries_before_raising_a_floor() {
        let list = Revocations::with_capacity(2);
        assert_eq!(list.revoke(key(1), 100, HOUR, 200), Revoked::Recorded);
        assert_eq!(list.revoke(key(2), 2000, HOUR, 2100), Revoked::Recorded);
        // Full, but the first has ended: room without refusing anyone else.
        assert_eq!(list.revoke(key(3), 3000, HOUR, 100 + HOUR), Revoked::Recorded);
        assert_eq!(list.floor(), None);
        assert_eq!(list.len(), 2);
        assert_eq!(list.refused(&key(2), 2000), Some(SIGNED_OUT));
        assert_eq!(list.refused(&key(3), 3000), Some(SIGNED_OUT));
    }

    #[test]
    fn a_list_full_of_live_entries_forgets_no_sign_out_and_refuses_the_oldest_sessions() {
        let list = Revocations::with_capacity(3);
        for (n, created) in [(1, 10), (2, 20), (3, 30)] {
            assert_eq!(list.revoke(key(n), created, HOUR, 100), Revoked::Recorded);
        }
        assert_eq!(list.revoke(key(4), 40, HOUR, 100), Revoked::Overflow { floor: 10 });
        assert!(list.len() <= 3, "bounded: {}", list.len());
        // Every sign-out is still refused: none came back.
        assert_eq!(list.refused(&key(1), 10), Some(BELOW_FLOOR));
        for (n, created) in [(2, 20), (3, 30), (4, 40)] {
            assert_eq!(list.refused(&key(n), created), Some(SIGNED_OUT), "{n}");
        }
        // The price: a session signed in no later than the oldest sign-out is refused
        // too; later ones are not.
        assert_eq!(list.refused(&key(9), 10), Some(BELOW_FLOOR));
        assert_eq!(list.refused(&key(9), 11), None);
        // An older session's sign-out while full: the floor covers it.
        assert_eq!(list.revoke(key(5), 5, HOUR, 100), Revoked::Already);
        assert_eq!(list.revoke(key(6), 15, HOUR, 100), Revoked::Overflow { floor: 15 });
        assert_eq!(list.refused(&key(6), 15), Some(BELOW_FLOOR));
        assert_eq!(list.refused(&key(2), 20), Some(SIGNED_OUT));
        assert_eq!(list.len(), 3);
        // The floor goes once the sessions under it have all ended (and the entries too).
        assert_eq!(list.revoke(key(7), 100, HOUR, 40 + HOUR), Revoked::Recorded);
        assert_eq!(list.len(), 1);
        assert_eq!(list.floor(), None);
        assert_eq!(list.refused(&key(9), 15), None);
        assert_eq!(list.refused(&key(7), 100), Some(SIGNED_OUT));
    }

    /// A reload that shortens `absolute_lifetime` and one that lengthens it again:
    /// a session signed out under the long one stays refused in between, though a
    /// sign-out under the short one would have found it ended.
    #[test]
    fn a_shorter_lifetime_for_a_while_forgets_no_sign_out() {
        let list = Revocations::with_capacity(3);
        assert_eq!(list.revoke(key(1), 1000, 12 * HOUR, 1500), Revoked::Recorded);
        // Reloaded to one hour: another sign-out after the first session's hour.
        assert_eq!(list.revoke(key(2), 9000, HOUR, 1000 + 2 * HOUR), Revoked::Recorded);
        // Reloaded back to twelve hours: the first session's cookie would open again.
        assert_eq!(list.refused(&key(1), 1000), Some(SIGNED_OUT));
        // Likewise the floor of a full list.
        let list = Revocations::with_capacity(2);
        assert_eq!(list.revoke(key(1), 1000, 12 * HOUR, 1500), Revoked::Recorded);
        assert_eq!(list.revoke(key(2), 1200, 12 * HOUR, 1500), Revoked::Recorded);
        assert_eq!(list.revoke(key(3), 1300, 12 * HOUR, 1500), Revoked::Overflow { floor: 1000 });
        assert_eq!(
            list.revoke(key(4), 9000, HOUR, 1000 + 2 * HOUR),
            Revoked::Overflow { floor: 1200 }
        );
        assert_eq!(list.refused(&key(9), 1000), Some(BELOW_FLOOR));
        assert_eq!(list.refused(&key(2), 1200), Some(BELOW_FLOOR));
        assert_eq!(list.refused(&key(3), 1300), Some(SIGNED_OUT));
    }

    #[test]
    fn a_zero_capacity_list_still_refuses_what_it_was_told() {
        let list = Revocations::with_capacity(0);
        assert_eq!(list.revoke(key(1), 50, HOUR, 100), Revoked::Overflow { floor: 50 });
        assert_eq!(list.refused(&key(1), 50), Some(BELOW_FLOOR));
        assert!(list.is_empty());
    }

    #[test]
    fn session_ids_are_22_base64url_characters_and_nothing_else_parses() {
        let id = match SessionId::random() {
            Ok(id) => id,
            Err(e) => panic!("{e}"),
        };
        assert!(!id.is_none());
        assert!(SessionId::default().is_none());
        let json = serde_json::to_string(&id).unwrap_or_default();
        assert_eq!(json.len(), 24, "{json}");
        assert_eq!(serde_json::from_str::<SessionId>(&json).ok(), Some(id));
        for bad in
            ["\"\"", "\"AAAA\"", "\"AAAAAAAAAAAAAAAAAAAAAAAA\"", "\"AAAAAAAAAAAAAAAAAAAA+/\"", "7"]
        {
            assert!(serde_json::from_str::<SessionId>(bad).is_err(), "{bad}");
        }
    }
}
