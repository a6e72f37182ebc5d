//! Any sequence of client and server messages through the relay's statement audit, fed
//! as the relay feeds it: each direction through its scanner, the client's messages
//! until the audit refuses one (or Terminate), the server's to the end.
//!
//! Properties: every Bind, Query and FunctionCall relayed gets exactly one event (a
//! Bind's possibly only when the session ends); the texts held stay within the session's
//! budget, and are all given back when the statements are discarded (no byte of the
//! budget leaks).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::postgres::proto::{message, Captured, Scanner};
use portcullis::postgres::statements::{Record, Tracker, TEXT_BUDGET};

/// The client messages the relay hands to the audit, and Terminate.
const CLIENT: &[u8] = b"QFPBCDEHScdfpX";
/// The server messages the relay hands to the audit.
const SERVER: &[u8] = b"123CEGInsSTVZ";

/// Events written, by kind.
#[derive(Debug, Default, PartialEq, Eq)]
struct Count {
    bind: usize,
    query: usize,
    function: usize,
}

impl Count {
    fn record(&mut self, r: &Record<'_>) {
        match (r.protocol, r.outcome) {
            ("extended", Some("prepared")) => {}
            ("extended", _) => self.bind += 1,
            ("simple", _) => self.query += 1,
            ("function", _) => self.function += 1,
            (p, _) => panic!("protocol {p}"),
        }
    }
}

/// The relay's view of one session.
struct Relay {
    tracker: Tracker,
    client: Scanner,
    server: Scanner,
    /// The relay stopped reading from the client (a refused message, Terminate).
    client_done: bool,
    relayed: Count,
    events: Count,
}

impl Relay {
    fn client_message(&mut self, bytes: &[u8]) {
        if self.client_done {
            return;
        }
        let (tracker, events, relayed, done) =
            (&mut self.tracker, &mut self.events, &mut self.relayed, &mut self.client_done);
        let _ = self.client.feed(bytes, |kind, c| {
            if *done || tracker.refused_encoding.is_some() || tracker.desync.is_some() {
                *done = true;
                return;
            }
            if kind == b'X' {
                *done = true;
                return;
            }
            tracker.client(kind, c, &mut |r| events.record(&r));
            if tracker.desync.is_some() {
                *done = true;
                return;
            }
            match kind {
                b'B' => relayed.bind += 1,
                b'Q' => relayed.query += 1,
                b'F' => relayed.function += 1,
                _ => {}
            }
        });
        assert!(self.tracker.text_bytes() <= TEXT_BUDGET);
    }

    fn server_message(&mut self, bytes: &[u8]) {
        let (tracker, events) = (&mut self.tracker, &mut self.events);
        let _ = self.server.feed(bytes, |kind, c| {
            tracker.server(kind, c, &mut |r| events.record(&r));
        });
        assert!(self.tracker.text_bytes() <= TEXT_BUDGET);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut relay = Relay {
        tracker: Tracker::for_session(Some(true), Some("UTF8")),
        client: Scanner::client(),
        server: Scanner::server(),
        client_done: false,
        relayed: Count::default(),
        events: Count::default(),
    };
    // Each message: a byte choosing its direction and type, a byte its body's length,
    // then the body.
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (body, next) = tail.split_at(n);
        rest = next;
        if op & 0x80 == 0 {
            let kind = CLIENT[usize::from(op & 0x7F) % CLIENT.len()];
            relay.client_message(&message(kind, body));
        } else {
            let kind = SERVER[usize::from(op & 0x7F) % SERVER.len()];
            relay.server_message(&message(kind, body));
        }
    }
    let Relay { mut tracker, relayed, mut events, .. } = relay;
    tracker.finish(&mut |r| events.record(&r));
    assert_eq!(events, relayed, "events written for the messages relayed");
    // Discarding every statement gives back every byte of text held.
    let discard = Captured { kind: b'C', body: b"DISCARD ALL\0".to_vec(), truncated: false };
    tracker.server(b'C', Some(&discard), &mut |_| {});
    assert_eq!(tracker.text_bytes(), 0, "text bytes still charged after DISCARD ALL");
});
