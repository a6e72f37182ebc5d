//! Any bytes as a relayed PostgreSQL message stream, fed to the relay's scanners in
//! arbitrary chunks.
//!
//! Properties: the scanner finds the boundaries a plain reading of the stream finds, and
//! fails exactly at the first impossible length (for the client's scanner, also at the
//! first type byte no client message has, and at a length past PostgreSQL's limit for its
//! type); how the stream was cut into reads changes nothing it reports; a kept body is
//! never longer than the message's, and is the message's own bytes (names cut to 63
//! bytes, then a prefix of the rest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::postgres::proto::{client_message_limit, Scanner, MAX_RELAY_MESSAGE_LEN, NAME_MAX};

/// One message as reported: type, what was kept of it, and where it ended.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: u8,
    kept: Option<(Vec<u8>, bool)>,
    end: usize,
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else { return };
    let server_limit: fn(u8) -> Option<usize> = |_| Some(MAX_RELAY_MESSAGE_LEN);
    for (scanner, limit) in [
        (Scanner::client as fn() -> Scanner, client_message_limit as fn(u8) -> Option<usize>),
        (Scanner::server, server_limit),
    ] {
        let whole = scan(scanner(), stream, &[stream.len()]);
        let cuts = cuts(seed, stream.len());
        assert_eq!(scan(scanner(), stream, &cuts), whole, "cut at {cuts:?}");
        check_against_plain_reading(stream, &whole, limit);
    }
});

/// Reads of the stream's bytes, of lengths chosen by `seed` (1 to 16 bytes, repeating).
fn cuts(seed: u8, len: usize) -> Vec<usize> {
    let mut sizes = (0..).map(|i: usize| 1 + (usize::from(seed).wrapping_mul(i + 7) >> 2) % 16);
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        at = (at + sizes.next().unwrap_or(1)).min(len);
        out.push(at);
    }
    out
}

/// The messages a scanner reports when fed `stream` in reads ending at `ends`, and whether
/// it failed, with what it says of the message in progress at the end.
fn scan(mut s: Scanner, stream: &[u8], ends: &[usize]) -> (Vec<Seen>, bool, Option<u8>, usize) {
    let mut seen = Vec::new();
    let mut from = 0;
    let mut failed = false;
    for &to in ends {
        let r = s.feed_at(&stream[from..to], |kind, c, end| {
            seen.push(Seen {
                kind,
                kept: c.map(|c| (c.body.clone(), c.truncated)),
                end: from + end,
            })
        });
        if r.is_err() {
            failed = true;
            break;
        }
        from = to;
    }
    (
        seen,
        failed,
        if failed { None } else { s.partial_kind() },
        if failed { 0 } else { s.needed() },
    )
}

/// The stream read message by message, without a scanner; `limit` is the longest length
/// each type may have (`None`: a type refused at its first byte).
fn check_against_plain_reading(
    stream: &[u8],
    (seen, failed, partial, needed): &(Vec<Seen>, bool, Option<u8>, usize),
    limit: fn(u8) -> Option<usize>,
) {
    let mut at = 0;
    let mut messages = seen.iter();
    loop {
        let max = match stream.get(at) {
            Some(&kind) => match limit(kind) {
                Some(max) => max.min(MAX_RELAY_MESSAGE_LEN),
                None => {
                    assert!(*failed && messages.next().is_none(), "type {kind} at {at} accepted");
                    return;
                }
            },
            None => MAX_RELAY_MESSAGE_LEN,
        };
        let Some(hdr) = stream.get(at..at + 5) else {
            // A header not all there: no failure, and the scanner says what is missing.
            assert!(!failed && messages.next().is_none());
            let have = stream.len() - at;
            assert_eq!(*partial, (have > 0).then(|| stream[at]));
            assert_eq!(*needed, if have > 0 { 5 - have } else { 0 });
            return;
        };
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        if !(4..=max).contains(&len) {
            assert!(*failed && messages.next().is_none(), "length {len} at {at} accepted");
            return;
        }
        let end = at + 1 + len;
        if end > stream.len() {
            assert!(!failed && messages.next().is_none());
            assert_eq!(*partial, Some(hdr[0]));
            assert_eq!(*needed, end - stream.len());
            return;
        }
        let m = messages.next().expect("a whole message not reported");
        assert_eq!((m.kind, m.end), (hdr[0], end));
        if let Some((kept, truncated)) = &m.kept {
            check_kept(&stream[at + 5..end], kept, *truncated, names(hdr[0]));
        }
        at = end;
    }
}

/// How many leading names each captured type keeps (as `Scanner::client` says).
fn names(kind: u8) -> usize {
    match kind {
        b'P' => 1,
        b'B' => 2,
        _ => 0,
    }
}

/// `kept` is `names` names of `body`, each cut to [`NAME_MAX`] bytes and NUL-terminated,
/// then a prefix of the rest of `body`; `truncated` says whether the prefix is shorter.
fn check_kept(body: &[u8], kept: &[u8], truncated: bool, names: usize) {
    assert!(kept.len() <= body.len() + names, "kept more than the body");
    let (mut body, mut kept) = (body, kept);
    for _ in 0..names {
        let Some(nul) = body.iter().position(|&b| b == 0) else {
            // The body ends inside this name: its first bytes are all that is kept.
            assert_eq!(kept, &body[..body.len().min(NAME_MAX)]);
            return;
        };
        let cut = nul.min(NAME_MAX);
        assert_eq!(&kept[..cut + 1], &[&body[..cut], &[0]].concat()[..]);
        body = &body[nul + 1..];
        kept = &kept[cut + 1..];
    }
    assert!(body.starts_with(kept), "kept bytes not the body's");
    assert_eq!(truncated, kept.len() < body.len(), "truncated flag");
}
