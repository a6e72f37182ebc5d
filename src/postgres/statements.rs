//! Which prepared statement a Bind runs, as the **server** sees it.
//!
//! A client's Parse is only a request: the server may refuse it (`42P05` "already exists",
//! a syntax error) or skip it (after an earlier error, until Sync). So the name → text map
//! follows the server's answers, which come in the order of the client's messages:
//!
//! - every client message the server answers is queued (`Pending`) when it is relayed;
//! - ParseComplete (`1`) makes the front Parse known (replacing a statement of that name:
//!   the server accepted it, so the old one was gone, e.g. after a `DEALLOCATE`);
//!   CloseComplete (`3`) forgets a closed statement;
//! - BindComplete (`2`) emits the Bind's `pg.statement` event, resolved against the map as
//!   it is when the server ran the Bind (every earlier Parse is answered by then);
//! - ErrorResponse (`E`) to an extended-protocol message fails it and drops everything up
//!   to the next Sync (the server skips those): a Bind among them is still audited, with
//!   `outcome` `error` (the one that failed) or `skipped`;
//! - a statement accepted under a name whose text no event carries yet gets a `prepared`
//!   event before anything else runs (SQL `EXECUTE name` runs it without a Bind);
//! - a COPY FROM STDIN ends when the server ends it (CommandComplete, or ErrorResponse at
//!   a bad row, whether or not the client sent CopyDone); the Syncs the client sent while
//!   it read are counted as answered or not by the ReadyForQuery that come (`Window`).
//!
//! Names are keyed as PostgreSQL keys them: their first 63 bytes (NAMEDATALEN - 1).
//! Texts held (known statements and Parses in flight) share a per-session byte budget;
//! beyond it a text is kept as a prefix or not at all, and the event says `text_status`
//! `over-budget`. A text the proxy does not know is never guessed: the event says
//! `text_status` `unknown`.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use super::proto::{Captured, MAX_AUDIT_TEXT, NAME_MAX};

/// Bytes of statement text a session may hold (known statements and Parses in flight).
pub const TEXT_BUDGET: usize = 4 * 1024 * 1024;
/// Prepared statements remembered per session.
pub const MAX_STATEMENTS: usize = 10_000;
/// Client messages awaiting the server's answer beyond which the relay stops reading from
/// the client until the server catches up.
pub const MAX_PENDING: usize = 16_384;

/// A prepared statement's name as the server keys it: at most 63 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Name {
    len: u8,
    bytes: [u8; NAME_MAX],
}

impl Name {
    pub fn new(wire: &[u8]) -> Name {
        let len = wire.len().min(NAME_MAX);
        let mut bytes = [0u8; NAME_MAX];
        bytes[..len].copy_from_slice(&wire[..len]);
        Name { len: len as u8, bytes }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn display(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

/// What is known of a statement's text.
#[derive(Debug, Default)]
struct Text {
    text: Option<Box<str>>,
    /// `text` is a prefix.
    truncated: bool,
    /// Cut or dropped by the session's budget.
    over_budget: bool,
    /// A `PREPARE` or `DEALLOCATE` ran as SQL since: it may have replaced the statement;
    /// or it was parsed while the session's encoding was uncertain.
    uncertain: bool,
    /// `standard_conforming_strings` when the server lexed it (`None`: not known).
    scs: Option<bool>,
    /// The audit has this text under the statement's name: in the event of a Bind of it,
    /// or in its `prepared` event (see [`Tracker::flush_prepared`]).
    audited: bool,
}

impl Text {
    fn bytes(&self) -> usize {
        self.text.as_ref().map_or(0, |t| t.len())
    }
}

enum Pending {
    /// `unsure`: a non-ASCII name sent while the encoding could have changed.
    Parse {
        name: Name,
        text: Text,
        unsure: bool,
    },
    Bind {
        name: Name,
        unsure: bool,
    },
    /// `None`: a portal.
    Close {
        statement: Option<Name>,
        unsure: bool,
    },
    /// Describe and Execute (consecutive ones counted): each ends with one of `T n C I s`.
    Other(u32),
    /// Answered by ReadyForQuery.
    Sync,
    /// Query or FunctionCall: everything up to ReadyForQuery answers it.
    Simple,
    /// CopyDone or CopyFail, sent while something is awaited (it may be a COPY FROM
    /// STDIN): no answer of its own; it ends what a COPY reads.
    CopyEnd,
    /// CopyData sent while something is awaited (consecutive ones counted as one): no
    /// answer; a COPY FROM STDIN may fail at any of them.
    Data,
    /// Syncs sent while a COPY FROM STDIN the server then ended with an error was
    /// reading: those it read before the error it ignored, those after it answers, and
    /// the proxy cannot tell which (see [`Window`]). Between `min` and `max`
    /// ReadyForQuery answer them, `got` so far.
    Syncs {
        min: u32,
        max: u32,
        got: u32,
        /// Extended protocol and `min` 0: the server may still be skipping (no Sync was
        /// honoured) or not. Only another Sync tells.
        doubt: bool,
    },
}

/// A COPY FROM STDIN the server started (CopyInResponse) and has not ended.
///
/// PostgreSQL reads a COPY's CopyData, and ignores Sync and Flush, until CopyDone or
/// CopyFail; any other message ends the session (FATAL). It may fail at any CopyData it
/// reads (a bad row, a constraint, a trigger), before reading any (a view, a statement
/// trigger), or at CopyDone (a foreign key, the last row): it then reads messages as
/// usual, skipping to the next Sync in the extended protocol. The proxy cannot know how
/// far it had read: a Sync followed by CopyData or a CopyEnd in the window may have been
/// read by the COPY (ignored) or after the error (answered); one after the window's last
/// CopyData was read after it, if the COPY failed.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Syncs followed by CopyData or a CopyEnd in the window.
    ambiguous: u32,
    /// Syncs after the window's last CopyData.
    trailing: u32,
    /// The window has not ended: no CopyDone, CopyFail or other message sent since.
    open: bool,
    /// It ended with CopyDone or CopyFail (rather than another message).
    client_ended: bool,
    /// The COPY was an Execute (not a Query): an error makes the server skip to Sync.
    extended: bool,
}

impl Window {
    fn data(&mut self) {
        self.ambiguous = self.ambiguous.saturating_add(self.trailing);
        self.trailing = 0;
    }
}

fn marker(p: &Pending) -> bool {
    matches!(p, Pending::CopyEnd | Pending::Data)
}

/// A FunctionCall's audited facts: never its argument values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionCall {
    pub oid: u32,
    /// `None` when the message was too short to say.
    pub arguments: Option<u16>,
}

/// One `pg.statement` event to write.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// `simple`, `extended` or `function`.
    pub protocol: &'static str,
    pub statement: Option<&'a str>,
    pub text: Option<&'a str>,
    pub truncated: bool,
    /// Absent: `text` is the statement's text. `over-budget`, `unknown`, `uncertain`.
    pub text_status: Option<&'static str>,
    /// `standard_conforming_strings` as the server lexed the text: `None` when not known
    /// (the masker then reads plain literals both ways).
    pub scs: Option<bool>,
    /// Absent: the server ran it (Query, FunctionCall: sent to the server). `error`,
    /// `skipped`, `unknown`; `prepared` (a named statement's text, not run, written
    /// before anything could run it by name).
    pub outcome: Option<&'static str>,
    pub function: Option<FunctionCall>,
}

/// The prepared statements of one session and the client messages awaiting an answer.
#[derive(Default)]
pub struct Tracker {
    known: HashMap<Name, Text>,
    pending: VecDeque<Pending>,
    text_bytes: usize,
    /// The server skips the client's messages until its next Sync.
    skipping: bool,
    /// A COPY FROM STDIN the server started and has not ended (its entry is at the front
    /// of `pending`; the window sits right behind it).
    copy_in: Option<Window>,
    /// The answers no longer match the queue (never expected from a client that follows
    /// the protocol): no text is reported for a Bind any more, rather than one that may
    /// be wrong, and the session ends (`desync`): it would go on with the audit blind.
    lost: bool,
    /// The relay waits for the queue to shrink.
    pub waiting: bool,
    /// `standard_conforming_strings` as last reported by the server (ParameterStatus).
    scs: Option<bool>,
    /// The server keys names by the bytes the client sent: its encoding is UTF8 or
    /// SQL_ASCII (no conversion). Otherwise a non-ASCII name is converted, and cut at 63
    /// bytes of the converted form: such names are `uncertain`.
    names_exact: bool,
    /// An execution-capable message (Bind, Execute, CopyDone, CopyFail) was relayed
    /// since the last Sync, Query or FunctionCall.
    exec_open: bool,
    /// The server reported a `client_encoding` other than UTF8: the session must end
    /// before any further client message is relayed.
    pub refused_encoding: Option<String>,
    /// The client sent a message whose fate the proxy cannot know (after a COPY FROM
    /// STDIN failed, without a Sync the server certainly honoured; a Flush with a body),
    /// or the server's answers stopped matching what was relayed: the session must end,
    /// and no further client message is relayed. Why, for the `close` event.
    pub desync: Option<&'static str>,
}

/// Why a session is ended when a message's fate cannot be known after a failed COPY.
const COPY_DOUBT: &str = "after a COPY FROM STDIN that failed, a message was sent without a \
     Sync that certainly followed the failure: whether the server skips it cannot be known";

/// Why a session is ended when the server's answers no longer match what was relayed:
/// from then on the audit could not say what a Bind runs, nor how a text was read.
const LOST: &str = "the server's answers no longer match the messages relayed: the audit \
     cannot tell what runs";

/// Why a session is ended at a Flush that carries a body.
const FLUSH_BODY: &str = "a Flush message with a body: PostgreSQL fails it and skips every \
     message up to the next Sync, which nothing the audit follows would tell";

/// Why a session is ended at a PasswordMessage (or SASL, GSS response) after startup.
const PASSWORD_MID_SESSION: &str = "a password message after the session started: never \
     relayed (it would carry the client's token to the server, which asks for none once \
     the session has started)";

/// A Record's text as the audit shows it while the session's encoding is uncertain (see
/// [`Tracker::settled`]): `(text, uncertain, cut)`.
///
/// Only the ASCII bytes of a text read the same in every encoding PostgreSQL accepts;
/// another encoding (a pipeline may `SET client_encoding` and back, which the server
/// never reports) could read the rest otherwise. A text with a non-ASCII byte is logged
/// whole all the same, marked `uncertain`: its ASCII bytes are shown as they are (a byte
/// sequence that is not UTF-8 becomes U+FFFD, never an ASCII byte). Until session 12
/// every such text was cut before its first non-ASCII byte, which also cut statements
/// pipelined behind another in one write (`select 1` then `/* é */ delete from t`).
///
/// The one reading that matters to the password masker: in SJIS, BIG5, GBK, UHC,
/// GB18030 and JOHAB the second byte of a character can be `\`, which the masker
/// (reading UTF-8) takes for an escape that moves a literal's end, so a password could
/// pass it unmasked. Every other ASCII byte such an encoding can take as a second byte
/// is 0x30 or above: never a quote, `$`, `-`, `/`, `*` or whitespace, so none ends a
/// literal, comment or dollar quote, and none makes a keyword the UTF-8 reading misses
/// (it sees every ASCII byte). So a text with a `\` right after a
/// non-ASCII character is still cut before its first non-ASCII byte (`truncated`).
fn uncertain_text(text: String) -> (String, bool, bool) {
    let Some(first) = text.bytes().position(|b| b >= 0x80) else { return (text, false, false) };
    let mut previous_non_ascii = false;
    for c in text[first..].chars() {
        if c == '\\' && previous_non_ascii {
            return (text[..first].to_string(), true, true);
        }
        previous_non_ascii = !c.is_ascii();
    }
    (text, true, false)
}

fn non_ascii(name: &Name) -> bool {
    !name.as_bytes().is_ascii()
}

/// An encoding name as PostgreSQL compares them (`pg_char_to_encoding`: case and
/// punctuation ignored).
fn clean_encoding(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect()
}

/// Whether `name` is UTF8 (`UTF8`, `utf-8`, `unicode`).
pub fn is_utf8(name: &str) -> bool {
    matches!(clean_encoding(name).as_str(), "utf8" | "unicode")
}

fn text_of(b: &[u8], truncated: bool) -> (String, bool) {
    match b.iter().position(|&x| x == 0) {
        Some(end) => (String::from_utf8_lossy(&b[..end]).into_owned(), false),
        None => (
            String::from_utf8_lossy(&b[..b.len().min(MAX_AUDIT_TEXT)]).into_owned(),
            truncated || !b.is_empty(),
        ),
    }
}

/// The NUL-terminated string at the start of `b` (all of `b` without a NUL) and the rest.
fn name_at(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&x| x == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker { names_exact: true, ..Tracker::default() }
    }

    /// A tracker for a session whose startup reported `standard_conforming_strings`
    /// (`scs`) and `server_encoding`.
    pub fn for_session(scs: Option<bool>, server_encoding: Option<&str>) -> Tracker {
        let names_exact =
            server_encoding.is_some_and(|e| is_utf8(e) || clean_encoding(e) == "sqlascii");
        Tracker { scs, names_exact, ..Tracker::default() }
    }

    /// Whether the server's `client_encoding` and `standard_conforming_strings` are known
    /// for the next client message: every message before it has been answered up to a
    /// ReadyForQuery (before which the server reports changed settings), and none that
    /// can run code (a Bind's input functions, an Execute, a COPY's triggers) was sent
    /// since. PostgreSQL reports a changed setting only at ReadyForQuery (14+), and not
    /// at all when it was changed back before it: in between, the proxy cannot know.
    pub fn settled(&self) -> bool {
        !self.awaited() && !self.exec_open && !self.lost && self.copy_in.is_none()
    }

    /// Whether some message still awaits its answer. Not markers, nor the Syncs of a
    /// failed COPY's window once as many were answered as certainly will be: one more
    /// ReadyForQuery may come, for a Sync read after the failure, but nothing runs then.
    fn awaited(&self) -> bool {
        self.pending.iter().any(|p| match p {
            Pending::Syncs { min, got, .. } => got < min,
            p => !marker(p),
        })
    }

    /// A ParameterStatus from the server.
    fn parameter_status(&mut self, body: &[u8]) {
        let (name, rest) = name_at(body);
        let value = String::from_utf8_lossy(name_at(rest).0);
        match name {
            b"client_encoding" if !is_utf8(&value) => {
                self.refused_encoding.get_or_insert_with(|| value.chars().take(64).collect());
            }
            b"standard_conforming_strings" => {
                self.scs = match &*value {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                };
            }
            _ => {}
        }
    }

    /// Whether the server may still be working on something the client sent: a message
    /// awaits its answer (a Query or Sync its ReadyForQuery, a Bind its BindComplete, …).
    /// When the session ends then, a statement may still be running on the backend.
    /// After the answers were lost track of, always (nothing can be ruled out).
    pub fn in_flight(&self) -> bool {
        self.lost || self.awaited()
    }

    /// The session is over: the server's answers that were to come will not be read. Every
    /// Bind still awaiting its answer gets its event now, `outcome` `unknown` (the server
    /// may have run it, or may yet), so that each Bind relayed has exactly one event. A
    /// Parse or Close before it that is unanswered too may or may not have been accepted:
    /// the text it would give the Bind is reported `uncertain`, never dropped (the
    /// Parse's text is what the server would have run).
    pub fn finish(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Bind { name, unsure } => self.emit_bind(&name, "unknown", unsure, emit),
                Pending::Parse { name, mut text, .. } => {
                    text.uncertain = true;
                    if let Some(old) = self.known.insert(name, text) {
                        self.release(&old);
                    }
                }
                Pending::Close { statement: Some(name), .. } => {
                    if let Some(t) = self.known.get_mut(&name) {
                        t.uncertain = true;
                    }
                }
                _ => {}
            }
        }
        self.flush_prepared(emit);
    }

    /// Too many messages await an answer: stop reading from the client for now.
    pub fn saturated(&self) -> bool {
        self.pending.len() >= MAX_PENDING
    }

    /// Bytes of text held.
    pub fn text_bytes(&self) -> usize {
        self.text_bytes
    }

    fn push(&mut self, p: Pending) {
        // Never into a running COPY's entry: what is sent now comes after its window.
        let behind_copy = self.copy_in.is_some() && self.pending.len() == 1;
        match (&p, self.pending.back_mut()) {
            (Pending::Other(n), Some(Pending::Other(m))) if !behind_copy => *m += n,
            (Pending::Data, Some(Pending::Data)) => {}
            _ => self.pending.push_back(p),
        }
    }

    /// A Sync the server will certainly answer (not read by a COPY).
    fn push_sync(&mut self) {
        // Syncs of a failed COPY's window and this one: one run.
        let run = self.pending.iter().rposition(|p| !marker(p));
        if let Some(i) = run.filter(|&i| matches!(self.pending[i], Pending::Syncs { .. })) {
            self.pending.truncate(i + 1);
            if let Some(Pending::Syncs { min, max, doubt, .. }) = self.pending.back_mut() {
                *min = min.saturating_add(1);
                *max = max.saturating_add(1);
                *doubt = false;
            }
            return;
        }
        self.push(Pending::Sync);
    }

    /// Whether the server may or may not skip the next message: after a failed COPY in
    /// the extended protocol, no Sync since is certain to have ended its skipping, and
    /// one may have.
    fn doubtful(&self) -> bool {
        if self.lost {
            return false;
        }
        if let Some(w) = &self.copy_in {
            return w.open && w.extended && w.trailing == 0 && w.ambiguous > 0;
        }
        let last = self.pending.iter().rev().find(|p| !marker(p));
        matches!(last, Some(Pending::Syncs { doubt: true, .. }))
    }

    /// The session must end: `why` for its `close` event. What awaits an answer is
    /// audited as of unknown outcome.
    fn refuse(&mut self, why: &'static str, emit: &mut impl FnMut(Record<'_>)) {
        tracing::warn!("postgres statement audit: {why}");
        self.desync.get_or_insert(why);
        self.abandon(emit);
    }

    fn release(&mut self, t: &Text) {
        self.text_bytes -= t.bytes();
    }

    /// A client message, as relayed to the server (`c`: its capture, for the kinds the
    /// client scanner captures).
    pub fn client(&mut self, kind: u8, c: Option<&Captured>, emit: &mut impl FnMut(Record<'_>)) {
        let settled = self.settled();
        let scs = if settled { self.scs } else { None };
        if self.desync.is_some() {
            return;
        }
        // The client's password is its token: it is for portcullis alone. node-postgres
        // answers an authentication request whenever one comes, with the password it was
        // given; the relay passes none on (`never_mid_session`), and never relays an answer.
        if kind == b'p' {
            return self.refuse(PASSWORD_MID_SESSION, emit);
        }
        // A Flush gets no answer, so an error the server raises at it (it fails one with a
        // body, then skips to the next Sync) would be taken for the next message's.
        if kind == b'H' {
            if c.is_some_and(|c| !c.body.is_empty()) {
                self.refuse(FLUSH_BODY, emit);
            }
            return;
        }
        if matches!(kind, b'Q' | b'F' | b'P' | b'B' | b'C' | b'D' | b'E') {
            if self.doubtful() {
                return self.refuse(COPY_DOUBT, emit);
            }
            // A message other than CopyData, CopyDone, CopyFail, Flush or Sync ends the
            // window: if the COPY is still reading, the server ends the session at it; if
            // the COPY failed before it, it is read after the failure.
            if let Some(w) = self.copy_in.as_mut().filter(|w| w.open) {
                w.open = false;
                // No Sync since the COPY started: the server skips this up to the next.
                if w.extended && w.trailing == 0 {
                    self.skipping = true;
                }
            }
        }
        let skipped = self.skipping.then_some("skipped");
        // CopyData and CopyDone run a COPY's input functions and triggers: in the
        // extended protocol, a later Sync reports what they changed (a Sync in the COPY's
        // window may be one the COPY ignores: one is followed by CopyData or a CopyEnd, which
        // set the flag again); in the simple protocol, the Query's ReadyForQuery does.
        // Outside a COPY the server ignores them.
        let copy_reads = match &self.copy_in {
            Some(w) => w.open && w.extended,
            None => self.awaited(),
        };
        match kind {
            b'B' | b'E' => self.exec_open = true,
            b'd' | b'c' | b'f' if copy_reads => self.exec_open = true,
            b'Q' | b'F' | b'S' => self.exec_open = false,
            _ => {}
        }
        match kind {
            b'Q' => {
                let (text, truncated) =
                    c.map_or((String::new(), false), |c| text_of(&c.body, c.truncated));
                let (text, unsure, cut) =
                    if settled { (text, false, false) } else { uncertain_text(text) };
                self.flush_prepared(emit);
                emit(Record {
                    protocol: "simple",
                    statement: None,
                    text: Some(&text),
                    truncated: truncated || cut,
                    text_status: unsure.then_some("uncertain"),
                    scs,
                    outcome: skipped,
                    function: None,
                });
                if !self.skipping {
                    self.push(Pending::Simple);
                }
            }
            b'F' => {
                let b = c.map_or(&[][..], |c| &c.body[..]);
                let oid = b.get(..4).map_or(0, |o| u32::from_be_bytes([o[0], o[1], o[2], o[3]]));
                let formats = b.get(4..6).map(|f| u16::from_be_bytes([f[0], f[1]]) as usize);
                let arguments = formats.and_then(|f| {
                    let at = 6 + 2 * f;
                    b.get(at..at + 2).map(|a| u16::from_be_bytes([a[0], a[1]]))
                });
                self.flush_prepared(emit);
                emit(Record {
                    protocol: "function",
                    statement: None,
                    text: None,
                    truncated: false,
                    text_status: None,
                    scs: None,
                    outcome: skipped,
                    function: Some(FunctionCall { oid, arguments }),
                });
                if !self.skipping {
                    self.push(Pending::Simple);
                }
            }
            b'P' => {
                let Some(c) = c else { return };
                if self.skipping {
                    return;
                }
                let (name, rest) = name_at(&c.body);
                let name = Name::new(name);
                if self.lost {
                    self.forget(&name);
                    return;
                }
                let (text, truncated) = text_of(rest, c.truncated);
                let (text, unsure_text, cut) =
                    if settled { (text, false, false) } else { uncertain_text(text) };
                let mut text = self.charge(text, truncated || cut);
                text.uncertain = unsure_text;
                text.scs = scs;
                let unsure = !settled && non_ascii(&name);
                self.push(Pending::Parse { name, text, unsure });
            }
            b'B' => {
                let Some(c) = c else { return };
                let (_portal, rest) = name_at(&c.body);
                let name = Name::new(name_at(rest).0);
                let unsure = !settled && non_ascii(&name);
                if self.skipping || self.lost {
                    let outcome = if self.lost { "unknown" } else { "skipped" };
                    self.emit_bind(&name, outcome, unsure, emit);
                } else {
                    self.push(Pending::Bind { name, unsure });
                }
            }
            b'C' => {
                let Some(c) = c else { return };
                if self.skipping {
                    return;
                }
                let statement = match c.body.split_first() {
                    Some((b'S', rest)) => Some(Name::new(name_at(rest).0)),
                    _ => None,
                };
                let unsure = !settled && statement.as_ref().is_some_and(non_ascii);
                if self.lost {
                    if let Some(n) = statement {
                        self.forget(&n);
                    }
                } else {
                    self.push(Pending::Close { statement, unsure });
                }
            }
            b'D' | b'E' if !self.skipping && !self.lost => self.push(Pending::Other(1)),
            b'S' => match self.copy_in.as_mut().filter(|w| w.open) {
                Some(w) => w.trailing = w.trailing.saturating_add(1),
                None => {
                    self.skipping = false;
                    if !self.lost {
                        self.push_sync();
                    }
                }
            },
            b'd' | b'c' | b'f' => {
                let idle = self.lost || !self.awaited();
                match self.copy_in.as_mut() {
                    Some(w) if w.open => {
                        w.data();
                        if kind != b'd' {
                            w.open = false;
                            w.client_ended = true;
                        }
                    }
                    // After an Execute's window: the server ignores it. With nothing
                    // awaited: no COPY can read it.
                    Some(w) if w.extended => {}
                    None if idle => {}
                    // After a Query's window, or with a message awaited: a COPY may read
                    // it (a later statement of the same Query may be another COPY FROM
                    // STDIN, whose window it joins at the CopyInResponse).
                    Some(_) | None => {
                        self.push(if kind == b'd' { Pending::Data } else { Pending::CopyEnd });
                    }
                }
            }
            _ => {}
        }
    }

    /// A text to hold, within the session's budget.
    fn charge(&mut self, mut text: String, truncated: bool) -> Text {
        let room = TEXT_BUDGET.saturating_sub(self.text_bytes);
        if text.len() <= room {
            self.text_bytes += text.len();
            return Text { text: Some(text.into()), truncated, ..Text::default() };
        }
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        self.text_bytes += cut;
        Text {
            text: (cut > 0).then(|| text.into()),
            truncated: true,
            over_budget: true,
            ..Text::default()
        }
    }

    fn forget(&mut self, name: &Name) {
        if let Some(t) = self.known.remove(name) {
            self.release(&t);
        }
    }

    /// `unsure`: the name was sent while the encoding could have changed.
    fn emit_bind(
        &mut self,
        name: &Name,
        outcome: &'static str,
        unsure: bool,
        emit: &mut impl FnMut(Record<'_>),
    ) {
        // This event carries the statement's text; the others it may run by name (its
        // text may be an `EXECUTE`) are written before it.
        if let Some(t) = self.known.get_mut(name) {
            t.audited = true;
        }
        self.flush_prepared(emit);
        let outcome = (!outcome.is_empty()).then_some(outcome);
        let display = name.display();
        let statement = (name.len > 0).then_some(&*display);
        let known = if self.lost { None } else { self.known.get(name) };
        // A non-ASCII name the server may have read otherwise (converted to its encoding
        // and cut there, or decoded under an encoding that had changed) may name another
        // statement than the one the proxy knows by these bytes.
        let unsure = unsure || (!self.names_exact && non_ascii(name));
        let text_status = match known {
            None => Some("unknown"),
            Some(t) if t.over_budget => Some("over-budget"),
            Some(t) if t.uncertain || unsure => Some("uncertain"),
            Some(_) => None,
        };
        emit(Record {
            protocol: "extended",
            statement,
            text: known.and_then(|t| t.text.as_deref()),
            truncated: known.is_some_and(|t| t.truncated),
            text_status,
            scs: known.and_then(|t| t.scs),
            outcome,
            function: None,
        });
    }

    /// Writes a `prepared` event (`outcome: "prepared"`, the name and text) for every named
    /// statement the server accepted whose text the audit does not have yet: before an
    /// event of a Query, FunctionCall or Bind, since any of them may run one by name
    /// without a Bind (SQL `EXECUTE name`, also from a function through SPI), and at a
    /// ParseComplete answered after a Query or FunctionCall was sent (its event was
    /// written when it was sent). A statement bound before
    /// anything else ran (what drivers do) has its text in its Bind's event only.
    fn flush_prepared(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        if self.lost {
            return;
        }
        let mut names: Vec<Name> =
            self.known.iter().filter(|(n, t)| n.len > 0 && !t.audited).map(|(n, _)| *n).collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let Some(t) = self.known.get_mut(&name) else { continue };
            t.audited = true;
            let t = &*t;
            prepared_event(&name, t, self.names_exact, emit);
        }
    }

    /// A Parse or Close of a non-ASCII name the server may have read otherwise: any
    /// statement known by a non-ASCII name may have been replaced or closed.
    fn unsure_names(&mut self) {
        for (n, t) in &mut self.known {
            if non_ascii(n) {
                t.uncertain = true;
            }
        }
    }

    /// The front of the queue, past markers (they get no answer).
    fn front(&mut self) -> Option<&mut Pending> {
        while self.pending.front().is_some_and(marker) {
            self.pending.pop_front();
        }
        self.pending.front_mut()
    }

    /// An answer other than ReadyForQuery: the Syncs of a failed COPY's window at the
    /// front were answered as far as they will be. `false`: fewer than certain were.
    fn past_syncs(&mut self, emit: &mut impl FnMut(Record<'_>)) -> bool {
        while let Some(Pending::Syncs { min, got, .. }) = self.front() {
            if got < min {
                self.lose(emit);
                return false;
            }
            self.pending.pop_front();
        }
        true
    }

    /// A server message (`c`: its capture, for CommandComplete).
    pub fn server(&mut self, kind: u8, c: Option<&Captured>, emit: &mut impl FnMut(Record<'_>)) {
        if kind == b'C' {
            if let Some(c) = c {
                self.command_complete(&c.body);
            }
        }
        if kind == b'S' {
            if let Some(c) = c {
                self.parameter_status(&c.body);
            }
            return;
        }
        if self.lost {
            return;
        }
        if kind != b'Z' && !self.past_syncs(emit) {
            return;
        }
        if kind == b'C' && self.copy_in.is_some() && !self.copy_done(emit) {
            return;
        }
        // While a COPY FROM STDIN reads, the server answers nothing but its end: any other
        // answer would take the COPY's own entry off the queue.
        if self.copy_in.is_some() && kind != b'E' {
            return self.lose(emit);
        }
        match kind {
            b'1' => match pop_front_parse(&mut self.pending) {
                Some((name, mut text, unsure)) => {
                    if unsure {
                        self.unsure_names();
                        text.uncertain = true;
                    }
                    if let Some(old) = self.known.remove(&name) {
                        self.release(&old);
                    }
                    if self.known.len() < MAX_STATEMENTS {
                        self.known.insert(name, text);
                    } else {
                        // Not kept: its text is written now, while it is known (SQL
                        // `EXECUTE` may run it without a Bind).
                        if name.len > 0 {
                            prepared_event(&name, &text, self.names_exact, emit);
                        }
                        self.release(&text);
                    }
                    // A Query or FunctionCall sent after the Parse (pipelined) was
                    // audited before the statement was known, and may run it by name. (A
                    // Bind is audited at its BindComplete, after this.)
                    if self.pending.iter().any(|p| matches!(p, Pending::Simple)) {
                        self.flush_prepared(emit);
                    }
                }
                None => self.lose(emit),
            },
            b'2' => match self.front() {
                Some(Pending::Bind { name, unsure }) => {
                    let (name, unsure) = (*name, *unsure);
                    self.pending.pop_front();
                    self.emit_bind(&name, "", unsure, emit);
                }
                _ => self.lose(emit),
            },
            b'3' => match self.front() {
                Some(Pending::Close { statement, unsure }) => {
                    let (statement, unsure) = (*statement, *unsure);
                    self.pending.pop_front();
                    if let Some(n) = statement {
                        self.forget(&n);
                    }
                    if unsure {
                        self.unsure_names();
                    }
                }
                _ => self.lose(emit),
            },
            b'T' | b'n' | b'C' | b'I' | b's' => match self.front() {
                Some(Pending::Other(n)) => {
                    *n -= 1;
                    if *n == 0 {
                        self.pending.pop_front();
                    }
                }
                Some(Pending::Simple) => {}
                _ => self.lose(emit),
            },
            b'G' => self.copy_in_started(emit),
            b'Z' => match self.front() {
                Some(Pending::Sync | Pending::Simple) => {
                    self.pending.pop_front();
                }
                Some(Pending::Syncs { max, got, doubt, .. }) => {
                    // One was read after the failure: the server is not skipping.
                    *doubt = false;
                    *got += 1;
                    if *got == *max {
                        self.pending.pop_front();
                    }
                }
                None => {}
                _ => self.lose(emit),
            },
            b'E' => self.error(emit),
            _ => {}
        }
    }

    /// `PREPARE` / `DEALLOCATE` / `DISCARD ALL` run as SQL change statements behind the
    /// protocol's back.
    fn command_complete(&mut self, tag: &[u8]) {
        let tag = name_at(tag).0;
        if tag == b"DEALLOCATE ALL" || tag == b"DISCARD ALL" {
            for (_, t) in self.known.drain() {
                self.text_bytes -= t.bytes();
            }
        } else if tag == b"DEALLOCATE" || tag == b"PREPARE" {
            for t in self.known.values_mut() {
                t.uncertain = true;
            }
        }
    }

    /// CopyInResponse to the front message: the COPY reads what the client sent after
    /// it, up to CopyDone or CopyFail, ignoring Sync (and Flush). What was sent before
    /// this answer came moves into the window.
    fn copy_in_started(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        let extended = match self.front() {
            Some(Pending::Other(_)) => true,
            Some(Pending::Simple) => false,
            _ => return self.lose(emit),
        };
        let mut w = Window { ambiguous: 0, trailing: 0, open: true, client_ended: false, extended };
        while let Some(p) = self.pending.get(1) {
            match p {
                Pending::Sync => w.trailing += 1,
                Pending::Data => w.data(),
                Pending::CopyEnd => {
                    w.data();
                    (w.open, w.client_ended) = (false, true);
                }
                // Another message ends the window and stays: the server reads it after
                // the COPY failed (skipping it if no Sync came between) or ends the
                // session at it.
                _ => {
                    w.open = false;
                    break;
                }
            }
            self.pending.remove(1);
            if !w.open {
                break;
            }
        }
        self.copy_in = Some(w);
    }

    /// CommandComplete while a COPY FROM STDIN runs: it read the client's CopyDone, and
    /// ignored every Sync of its window. `false`: it cannot have (the answers are lost).
    fn copy_done(&mut self, emit: &mut impl FnMut(Record<'_>)) -> bool {
        match self.copy_in.take() {
            Some(w) if w.client_ended => true,
            _ => {
                self.lose(emit);
                false
            }
        }
    }

    /// ErrorResponse while a COPY FROM STDIN runs: it ended there. The Syncs of its
    /// window become a run of `Syncs` behind its entry, with the Syncs sent after the
    /// window that follow it: those are answered, and so are the window's trailing ones.
    fn copy_failed(&mut self, w: Window, emit: &mut impl FnMut(Record<'_>)) {
        let mut after = 0u32;
        while matches!(self.pending.get(1), Some(Pending::Sync)) {
            self.pending.remove(1);
            after = after.saturating_add(1);
        }
        let min = w.trailing.saturating_add(after);
        let max = min.saturating_add(w.ambiguous);
        if max == 0 {
            return;
        }
        let doubt = w.extended && min == 0;
        if doubt && self.pending.len() > 1 {
            // Something follows that the server skipped, or ran after a Sync it
            // honoured: its fate, and its answers, cannot be told apart.
            return self.refuse(COPY_DOUBT, emit);
        }
        self.pending.insert(1, Pending::Syncs { min, max, got: 0, doubt });
    }

    fn error(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        if let Some(w) = self.copy_in.take() {
            self.copy_failed(w, emit);
            if self.lost {
                return;
            }
        }
        match self.front() {
            None | Some(Pending::Simple | Pending::Sync | Pending::Syncs { .. }) => return,
            _ => {}
        }
        // An extended-protocol message failed: the server skips everything up to Sync.
        let mut first = true;
        while let Some(p) = self.pending.front() {
            // A run of a failed COPY's Syncs: one may end the skipping (`min` > 0: one
            // does), and only another Sync tells whether one did (`doubt`).
            if matches!(p, Pending::Sync | Pending::Syncs { .. }) {
                break;
            }
            match self.pending.pop_front() {
                Some(Pending::Bind { name, unsure }) => {
                    self.emit_bind(&name, if first { "error" } else { "skipped" }, unsure, emit);
                }
                Some(Pending::Parse { text, .. }) => self.release(&text),
                _ => {}
            }
            first = false;
        }
        if self.pending.is_empty() {
            self.skipping = true;
        }
    }

    /// The answers do not match the queue: audit what is pending as of unknown outcome,
    /// stop naming texts, and end the session (the rest of it could not be audited).
    fn lose(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        self.refuse(LOST, emit);
    }

    /// Audit what is pending as of unknown outcome and stop following the answers.
    fn abandon(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        self.flush_prepared(emit);
        self.lost = true;
        self.copy_in = None;
        while let Some(p) = self.pending.pop_front() {
            if let Pending::Bind { name, unsure } = p {
                self.emit_bind(&name, "unknown", unsure, emit);
            }
        }
        self.known.clear();
        self.text_bytes = 0;
    }
}

/// The `prepared` event of the named statement `name` (see [`Tracker::flush_prepared`]).
fn prepared_event(name: &Name, t: &Text, names_exact: bool, emit: &mut impl FnMut(Record<'_>)) {
    let non_exact = !names_exact && non_ascii(name);
    let text_status = if t.over_budget {
        Some("over-budget")
    } else if t.uncertain || non_exact {
        Some("uncertain")
    } else {
        None
    };
    let display = name.display();
    emit(Record {
        protocol: "extended",
        statement: Some(&display),
        text: t.text.as_deref(),
        truncated: t.truncated,
        text_status,
        scs: t.scs,
        outcome: Some("prepared"),
        function: None,
    });
}

/// Pops the front Parse (past markers); `None` if the front is not a Parse.
fn pop_front_parse(pending: &mut VecDeque<Pending>) -> Option<(Name, Text, bool)> {
    while pending.front().is_some_and(marker) {
        pending.pop_front();
    }
    if !matches!(pending.front(), Some(Pending::Parse { .. })) {
        return None;
    }
    match pending.pop_front() {
        Some(Pending::Parse { name, text, unsure }) => Some((name, text, unsure)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::proto::{message, Scanner};

    /// An owned [`Record`].
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    struct Ev {
        protocol: &'static str,
        statement: Option<String>,
        text: Option<String>,
        truncated: bool,
        text_status: Option<&'static str>,
        outcome: Option<&'static str>,
        function: Option<FunctionCall>,
        scs: Option<bool>,
    }

    /// A tracker fed through real scanners, as the relay feeds it.
    struct Harness {
        t: Tracker,
        client: Scanner,
        server: Scanner,
        events: Vec<Ev>,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                t: Tracker::new(),
                client: Scanner::client(),
                server: Scanner::server(),
                events: Vec::new(),
            }
        }

        fn send(&mut self, msgs: &[Vec<u8>]) {
            let (t, events) = (&mut self.t, &mut self.events);
            let mut emit = |r: Record<'_>| events.push(own(&r));
            self.client
                .feed(&msgs.concat(), |k, c| t.client(k, c, &mut emit))
                .unwrap_or_else(|e| panic!("{e}"));
        }

        fn answer(&mut self, msgs: &[Vec<u8>]) {
            let (t, events) = (&mut self.t, &mut self.events);
            let mut emit = |r: Record<'_>| events.push(own(&r));
            self.server
                .feed(&msgs.concat(), |k, c| t.server(k, c, &mut emit))
                .unwrap_or_else(|e| panic!("{e}"));
        }

        /// The events written so far, but `prepared` ones (see `take_all`).
        fn take(&mut self) -> Vec<Ev> {
            let all = std::mem::take(&mut self.events);
            all.into_iter().filter(|e| e.outcome != Some("prepared")).collect()
        }

        fn take_all(&mut self) -> Vec<Ev> {
            std::mem::take(&mut self.events)
        }
    }

    fn own(r: &Record<'_>) -> Ev {
        Ev {
            protocol: r.protocol,
            statement: r.statement.map(str::to_string),
            text: r.text.map(str::to_string),
            truncated: r.truncated,
            text_status: r.text_status,
            outcome: r.outcome,
            function: r.function,
            scs: r.scs,
        }
    }

    fn cstr(s: &[u8]) -> Vec<u8> {
        let mut b = s.to_vec();
        b.push(0);
        b
    }
    fn parse(name: &str, sql: &str) -> Vec<u8> {
        parse_bytes(name.as_bytes(), sql)
    }
    fn parse_bytes(name: &[u8], sql: &str) -> Vec<u8> {
        let mut b = cstr(name);
        b.extend(cstr(sql.as_bytes()));
        b.extend([0, 0]);
        message(b'P', &b)
    }
    fn bind(name: &str) -> Vec<u8> {
        bind_bytes(b"", name.as_bytes())
    }
    fn bind_bytes(portal: &[u8], name: &[u8]) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(cstr(name));
        // One text parameter: a value that must never be looked at.
        b.extend([0, 0, 0, 1, 0, 0, 0, 6]);
        b.extend(b"secret");
        b.extend([0, 0]);
        message(b'B', &b)
    }
    fn close(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        b.extend(cstr(name.as_bytes()));
        message(b'C', &b)
    }
    fn m(kind: u8) -> Vec<u8> {
        match kind {
            b'E' => message(b'E', b"\0\0\0\0\0"),
            b'Z' => message(b'Z', b"I"),
            b'D' => message(b'D', b"S\0"),
            k => message(k, b""),
        }
    }
    fn query(sql: &str) -> Vec<u8> {
        message(b'Q', &cstr(sql.as_bytes()))
    }
    fn error() -> Vec<u8> {
        message(b'E', b"SERROR\0C42P05\0Mexists\0\0")
    }
    fn complete(tag: &str) -> Vec<u8> {
        message(b'C', &cstr(tag.as_bytes()))
    }

    fn ran(statement: &str, text: &str) -> Ev {
        Ev {
            protocol: "extended",
            statement: (!statement.is_empty()).then(|| statement.to_string()),
            text: Some(text.to_string()),
            ..Ev::default()
        }
    }

    #[test]
    fn pipelined_parse_bind_execute_sync_is_audited_when_the_server_binds() {
        let mut h = Harness::new();
        h.send(&[parse("s1", "select 1"), bind("s1"), m(b'D'), m(b'E'), m(b'S')]);
        assert!(h.take().is_empty(), "nothing is known before the server answers");
        h.answer(&[m(b'1'), m(b'2')]);
        assert_eq!(h.take(), vec![ran("s1", "select 1")]);
        h.answer(&[message(b'T', b"\0\0"), message(b'D', b"\0\0"), complete("SELECT 1"), m(b'Z')]);
        // The unnamed statement, Close, and a later Bind of s1.
        h.send(&[parse("", "select 2"), bind(""), m(b'E'), close("s1"), bind("s1"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), complete("SELECT 1"), m(b'3')]);
        assert_eq!(h.take(), vec![ran("", "select 2")]);
        // s1 was closed: the server refuses its Bind, and the audit does not guess.
        h.answer(&[error(), m(b'Z')]);
        let ev = h.take();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].outcome, ev[0].text_status, &ev[0].text),
            (Some("error"), Some("unknown"), &None)
        );
        assert!(h.t.pending.is_empty());
    }

    #[test]
    fn a_parse_the_server_refused_does_not_replace_the_statement() {
        let mut h = Harness::new();
        h.send(&[parse("s1", "DELETE FROM victim"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'Z')]);
        // 42P05: s1 already exists; Bind/Execute in the same batch are skipped.
        h.send(&[parse("s1", "SELECT 1"), bind("s1"), m(b'E'), m(b'S')]);
        h.answer(&[error(), m(b'Z')]);
        let ev = h.take();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].outcome, Some("skipped"));
        assert_eq!(ev[0].text.as_deref(), Some("DELETE FROM victim"));
        h.send(&[parse("s1", "SELECT 1"), m(b'S'), bind("s1"), m(b'E'), m(b'S')]);
        h.answer(&[error(), m(b'Z'), m(b'2'), complete("DELETE 2"), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("s1", "DELETE FROM victim")]);
    }

    #[test]
    fn after_an_error_messages_up_to_sync_are_skipped_even_those_sent_later() {
        let mut h = Harness::new();
        h.send(&[parse("bad", "selec oops"), bind("bad")]);
        h.answer(&[error()]);
        let ev = h.take();
        assert_eq!(
            (ev.len(), ev[0].outcome, ev[0].text_status),
            (1, Some("skipped"), Some("unknown"))
        );
        // Sent after the error arrived, before Sync: skipped by the server.
        h.send(&[parse("s2", "select 2"), bind("s2"), query("select 3")]);
        let ev = h.take();
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].protocol, ev[0].outcome), ("extended", Some("skipped")));
        assert_eq!((ev[1].protocol, ev[1].outcome), ("simple", Some("skipped")));
        h.send(&[m(b'S'), parse("s2", "select 22"), bind("s2"), m(b'S')]);
        h.answer(&[m(b'Z'), m(b'1'), m(b'2'), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("s2", "select 22")]);
        assert!(!h.t.known.contains_key(&Name::new(b"bad")));
        // A Bind that fails by itself is `error`; what follows it up to Sync `skipped`.
        h.send(&[bind("s2"), bind("s2"), m(b'S')]);
        h.answer(&[error(), m(b'Z')]);
        let o: Vec<_> = h.take().iter().map(|e| e.outcome).collect();
        assert_eq!(o, vec![Some("error"), Some("skipped")]);
    }

    #[test]
    fn sql_deallocate_then_a_new_parse_replaces_and_discard_all_forgets() {
        let mut h = Harness::new();
        h.send(&[parse("s1", "select 1"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'Z')]);
        h.send(&[query("DEALLOCATE s1")]);
        h.answer(&[complete("DEALLOCATE"), m(b'Z')]);
        h.take();
        // Before a new Parse, the old text is kept but marked uncertain.
        h.send(&[bind("s1"), m(b'S')]);
        h.answer(&[m(b'2'), m(b'Z')]);
        assert_eq!(h.take()[0].text_status, Some("uncertain"));
        // The server accepted a new s1: it replaces the old one.
        h.send(&[parse("s1", "delete from t"), bind("s1"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("s1", "delete from t")]);
        h.send(&[query("DISCARD ALL")]);
        h.answer(&[complete("DISCARD ALL"), m(b'Z')]);
        h.take();
        assert!(h.t.known.is_empty());
        assert_eq!(h.t.text_bytes(), 0);
        // Prepared by SQL: the server runs it, the proxy says it does not know the text.
        h.send(&[query("PREPARE s1 AS select 9"), bind("s1"), m(b'S')]);
        h.answer(&[complete("PREPARE"), m(b'Z'), m(b'2'), m(b'Z')]);
        let ev = h.take();
        assert_eq!((ev[1].text.as_deref(), ev[1].text_status), (None, Some("unknown")));
    }

    #[test]
    fn names_are_keyed_like_postgres_keys_them_however_long() {
        let mut h = Harness::new();
        let long = [b"n".repeat(63), b"a".repeat(400)].concat();
        let alias = [b"n".repeat(63), b"z".repeat(5)].concat();
        // A long portal name does not hide the statement name either.
        h.send(&[parse_bytes(&long, "select 'long'"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'Z')]);
        h.send(&[bind_bytes(&b"p".repeat(1000), &alias), m(b'S')]);
        h.answer(&[m(b'2'), m(b'Z')]);
        assert_eq!(h.take(), vec![ran(&"n".repeat(63), "select 'long'")]);
    }

    #[test]
    fn function_calls_are_audited_with_oid_and_argument_count_only() {
        let mut h = Harness::new();
        let mut f = 2078u32.to_be_bytes().to_vec();
        f.extend([0, 1, 0, 0, 0, 3]);
        for a in [&b"role"[..], b"admin_role", b"false"] {
            f.extend((a.len() as u32).to_be_bytes());
            f.extend(a);
        }
        f.extend([0, 0]);
        h.send(&[message(b'F', &f), parse("s", "select 1"), bind("s"), m(b'S')]);
        let ev = h.take();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].protocol, "function");
        assert_eq!(ev[0].function, Some(FunctionCall { oid: 2078, arguments: Some(3) }));
        assert_eq!((&ev[0].text, &ev[0].statement), (&None, &None));
        // Its answer (FunctionCallResponse, ReadyForQuery) keeps the queue in step.
        h.answer(&[message(b'V', b"\0\0\0\x01t"), m(b'Z'), m(b'1'), m(b'2'), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("s", "select 1")]);
        // A short message says what it can.
        h.send(&[message(b'F', &[0, 0, 0, 7])]);
        assert_eq!(h.take()[0].function, Some(FunctionCall { oid: 7, arguments: None }));
    }

    #[test]
    fn held_texts_stay_within_the_budget_and_refused_parses_free_theirs() {
        let mut h = Harness::new();
        let big = "x".repeat(MAX_AUDIT_TEXT);
        // 6,000 Parses of 64 KiB in one batch: the server refuses the first and skips
        // the rest; the texts held never exceed the budget.
        for _ in 0..6 {
            let batch: Vec<Vec<u8>> = (0..1000).map(|i| parse(&format!("p{i}"), &big)).collect();
            h.send(&batch);
            assert!(h.t.text_bytes() <= TEXT_BUDGET);
        }
        h.send(&[m(b'S')]);
        h.answer(&[error(), m(b'Z')]);
        assert_eq!(h.t.text_bytes(), 0);
        assert!(h.t.pending.is_empty() && h.t.known.is_empty());
        // Accepted statements beyond the budget keep a prefix, and say so.
        let n = TEXT_BUDGET / MAX_AUDIT_TEXT;
        let batch: Vec<Vec<u8>> = (0..=n).map(|i| parse(&format!("s{i}"), &big)).collect();
        h.send(&batch);
        h.send(&[bind("s0"), bind(&format!("s{n}")), m(b'S')]);
        h.answer(&vec![m(b'1'); n + 1]);
        h.answer(&[m(b'2'), m(b'2'), m(b'Z')]);
        let ev = h.take();
        assert_eq!((ev[0].text.as_deref(), ev[0].text_status), (Some(&*big), None));
        assert_eq!(
            (ev[1].text.as_deref(), ev[1].text_status, ev[1].truncated),
            (None, Some("over-budget"), true)
        );
        assert!(h.t.text_bytes() <= TEXT_BUDGET);
        // Closing frees the budget.
        h.send(&[close("s0"), m(b'S')]);
        h.answer(&[m(b'3'), m(b'Z')]);
        assert_eq!(h.t.text_bytes(), TEXT_BUDGET - MAX_AUDIT_TEXT);
    }

    #[test]
    fn copy_in_ignores_syncs_until_copy_done_and_stays_in_step() {
        let mut h = Harness::new();
        // tokio-postgres: Bind, Execute, Sync, CopyData..., CopyDone, Sync.
        h.send(&[parse("c", "copy t from stdin"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'Z')]);
        h.send(&[bind("c"), m(b'E'), m(b'S')]);
        h.answer(&[m(b'2'), message(b'G', b"\0\0\0")]);
        h.send(&[
            message(b'd', b"1\n"),
            m(b'c'),
            m(b'S'),
            parse("s", "select 1"),
            bind("s"),
            m(b'S'),
        ]);
        h.answer(&[complete("COPY 1"), m(b'Z'), m(b'1'), m(b'2'), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("c", "copy t from stdin"), ran("s", "select 1")]);
        assert!(h.t.pending.is_empty() && !h.t.lost);
    }

    fn copy_in() -> Vec<u8> {
        message(b'G', b"\0\0\0")
    }
    fn data(row: &str) -> Vec<u8> {
        message(b'd', row.as_bytes())
    }
    fn simple(text: &str) -> Ev {
        Ev { protocol: "simple", text: Some(text.to_string()), ..Ev::default() }
    }

    /// Round 12b: the server ends a COPY FROM STDIN at a bad row by itself (ErrorResponse),
    /// whether or not the client ever sends CopyDone. The Sync sent after it is one the
    /// server answers; what follows runs, and is audited as run, with its whole text.
    #[test]
    fn a_copy_the_server_ends_with_an_error_ends_for_the_audit_too() {
        let mut h = Harness::new();
        h.send(&[parse("", "copy t from stdin"), bind(""), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), copy_in()]);
        h.send(&[data("notanint\n")]);
        h.answer(&[error()]);
        // Its Bind was audited when the server bound it.
        assert_eq!(h.take(), vec![ran("", "copy t from stdin")]);
        h.send(&[m(b'S')]);
        h.answer(&[m(b'Z')]);
        assert!(h.t.settled() && !h.t.in_flight());
        h.send(&[query("select 'evaded' -- \u{e9}\n, 'hidden'")]);
        h.send(&[parse("s1", "select 'extended'"), bind("s1"), m(b'E'), m(b'S')]);
        assert_eq!(h.take(), vec![simple("select 'evaded' -- \u{e9}\n, 'hidden'")]);
        h.answer(&[complete("SELECT 1"), m(b'Z'), m(b'1'), m(b'2')]);
        assert_eq!(h.take(), vec![ran("s1", "select 'extended'")]);
        h.answer(&[complete("SELECT 1"), m(b'Z')]);
        assert!(h.t.settled() && !h.t.lost);

        // The Sync and Query sent before the error reached the proxy: the Sync came after
        // the row the COPY failed at, so the server answers it.
        let mut h = Harness::new();
        h.send(&[parse("", "copy t from stdin"), bind(""), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), copy_in()]);
        h.send(&[data("notanint\n"), m(b'S'), query("select 'ran'")]);
        h.answer(&[error(), m(b'Z'), complete("SELECT 1"), m(b'Z')]);
        let ev = h.take();
        assert_eq!(ev[1], simple("select 'ran'"));
        assert!(h.t.settled() && !h.t.lost);
        // The first Sync (sent with the Execute) was read by the COPY if it failed at a
        // row, but answered if it failed before reading any (a view): both are in step.
        for extra in [vec![], vec![m(b'Z')]] {
            let mut h = Harness::new();
            h.send(&[parse("", "copy t from stdin"), bind(""), m(b'E'), m(b'S')]);
            h.answer(&[m(b'1'), m(b'2'), copy_in()]);
            h.send(&[data("1\n"), data("x"), m(b'c'), m(b'S')]);
            h.answer(&[error()]);
            h.answer(&extra);
            h.answer(&[m(b'Z')]);
            assert!(h.t.settled(), "one ReadyForQuery is certain, and enough");
            h.send(&[query("select '\u{e9}'"), parse("s", "select 2"), bind("s"), m(b'S')]);
            assert_eq!(h.take().pop(), Some(simple("select '\u{e9}'")));
            h.answer(&[complete("SELECT 1"), m(b'Z'), m(b'1'), m(b'2'), m(b'Z')]);
            assert_eq!(h.take(), vec![ran("s", "select 2")]);
            assert!(h.t.settled() && !h.t.lost);
        }
        // Failed before reading anything (the view), the client told only then.
        let mut h = Harness::new();
        h.send(&[parse("", "copy v from stdin"), bind(""), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), copy_in(), error(), m(b'Z')]);
        h.send(&[data("1\n"), m(b'c'), m(b'S'), parse("s", "select 3"), bind("s"), m(b'S')]);
        h.answer(&[m(b'Z'), m(b'1'), m(b'2'), m(b'Z')]);
        assert_eq!(h.take().pop(), Some(ran("s", "select 3")));
        assert!(h.t.settled() && !h.t.lost);
    }

    /// Found by the `pg_audit` fuzz target: while a COPY FROM STDIN reads, the server
    /// answers nothing but its end (CommandComplete, ErrorResponse). An upstream that
    /// answered something else (PortalSuspended, ReadyForQuery) took the COPY's own entry
    /// off the queue, and the ErrorResponse that followed then panicked the relay
    /// (`VecDeque::insert` past the end): the session was torn down without its audit
    /// trail. Such answers are out of step: the audit is lost and the session ends.
    #[test]
    fn an_upstream_answering_out_of_step_during_a_copy_ends_the_session_without_a_panic() {
        for (first, out_of_step) in [(m(b'D'), m(b's')), (query("copy t from stdin"), m(b'Z'))] {
            let mut h = Harness::new();
            h.send(&[first]);
            h.answer(&[copy_in(), out_of_step]);
            h.send(&[m(b'S')]);
            h.answer(&[error()]);
            assert!(h.t.lost && h.t.desync == Some(LOST));
        }
    }

    /// The simple protocol: the server answers the COPY's ErrorResponse with
    /// ReadyForQuery; later texts are settled, exact, however much non-ASCII they hold.
    #[test]
    fn a_simple_copy_the_server_ends_with_an_error_leaves_the_session_settled() {
        let mut h = Harness::new();
        h.send(&[query("copy t from stdin")]);
        h.answer(&[copy_in()]);
        h.send(&[data("notanint\n")]);
        h.answer(&[error(), m(b'Z')]);
        h.take();
        assert!(h.t.settled() && !h.t.in_flight());
        h.send(&[query("select 1 as a -- \u{e9}\n, 'hidden'")]);
        assert_eq!(h.take(), vec![simple("select 1 as a -- \u{e9}\n, 'hidden'")]);
        h.answer(&[complete("SELECT 1"), m(b'Z')]);
        // Late CopyData and CopyDone are ignored by the server, and by the audit.
        h.send(&[data("2\n"), m(b'c'), parse("s", "select 4"), bind("s"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("s", "select 4")]);
        // A Sync sent during the COPY: answered if the COPY had failed before it.
        for extra in [vec![], vec![m(b'Z')]] {
            let mut h = Harness::new();
            h.send(&[query("copy t from stdin")]);
            h.answer(&[copy_in()]);
            h.send(&[m(b'S'), data("x\n")]);
            h.answer(&[error(), m(b'Z')]);
            h.answer(&extra);
            assert!(h.t.settled());
            h.take();
            h.send(&[query("select 5"), parse("s", "select 6"), bind("s"), m(b'S')]);
            h.answer(&[complete("SELECT 1"), m(b'Z'), m(b'1'), m(b'2'), m(b'Z')]);
            assert_eq!(h.take()[1..], [ran("s", "select 6")]);
            assert!(h.t.settled() && !h.t.lost);
        }
    }

    /// A failed extended COPY whose Syncs the server may all have read before failing:
    /// whether it skips what follows up to the next Sync cannot be told, so a message sent
    /// then is refused (the session ends) rather than audited with a guess.
    #[test]
    fn after_a_failed_copy_a_message_whose_fate_is_unknown_ends_the_session() {
        // Sent after the error: refused, and not audited as run.
        let mut h = Harness::new();
        h.send(&[parse("", "copy t from stdin"), bind(""), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), copy_in()]);
        h.send(&[data("notanint\n")]);
        h.answer(&[error()]);
        h.take();
        assert!(h.t.desync.is_none());
        h.send(&[query("select 'maybe'")]);
        assert!(h.take().is_empty());
        assert_eq!(h.t.desync, Some(COPY_DOUBT));
        // Sent before the CopyInResponse, behind a Sync and a row: refused at the error.
        let mut h = Harness::new();
        h.send(&[parse("", "copy t from stdin"), bind(""), m(b'E'), m(b'S')]);
        h.send(&[data("x\n"), parse("s", "select 1"), bind("s"), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), copy_in()]);
        assert!(h.t.desync.is_none());
        h.answer(&[error()]);
        assert_eq!(h.t.desync, Some(COPY_DOUBT));
        let o: Vec<_> = h.take().iter().map(|e| e.outcome).collect();
        assert_eq!(o, vec![None, Some("unknown")]);
        // A Sync first settles it: the server answers that one whatever it read.
        let mut h = Harness::new();
        h.send(&[parse("", "copy t from stdin"), bind(""), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), copy_in()]);
        h.send(&[data("notanint\n")]);
        h.answer(&[error()]);
        h.send(&[m(b'S'), query("select 'sure'")]);
        assert_eq!(h.take().pop(), Some(Ev { truncated: false, ..simple("select 'sure'") }));
        assert!(h.t.desync.is_none());
        // Without any Sync since the COPY began, the server skips to the next one.
        let mut h = Harness::new();
        h.send(&[parse("", "copy t from stdin"), bind(""), m(b'E')]);
        h.answer(&[m(b'1'), m(b'2'), copy_in()]);
        h.send(&[data("notanint\n"), query("select 'skipped'"), bind("x")]);
        h.answer(&[error()]);
        h.send(&[m(b'S'), query("select 'ran'")]);
        let o: Vec<_> = h.take().iter().map(|e| e.outcome).collect();
        assert_eq!(o, vec![None, Some("skipped"), Some("skipped"), None]);
        h.answer(&[m(b'Z'), complete("SELECT 1"), m(b'Z')]);
        assert!(h.t.settled() && !h.t.lost && h.t.desync.is_none());
    }

    #[test]
    fn answers_out_of_step_never_yield_a_text() {
        let mut h = Harness::new();
        h.send(&[parse("s", "select 1"), bind("s"), m(b'S')]);
        h.answer(&[m(b'2')]);
        let ev = h.take();
        assert_eq!((ev[0].outcome, ev[0].text_status), (Some("unknown"), Some("unknown")));
        // The session ends: nothing the client sends after is relayed, nor audited.
        assert!(h.t.desync.is_some());
        h.send(&[parse("s", "select 1"), m(b'S'), bind("s")]);
        h.answer(&[m(b'1'), m(b'Z')]);
        assert!(h.take().is_empty());
    }
    fn close_bytes(name: &[u8]) -> Vec<u8> {
        let mut b = vec![b'S'];
        b.extend(cstr(name));
        message(b'C', &b)
    }

    fn status(name: &str, value: &str) -> Vec<u8> {
        let mut b = cstr(name.as_bytes());
        b.extend(cstr(value.as_bytes()));
        message(b'S', &b)
    }

    /// SJIS 0x8754 and 0xFA4A are both U+2160 to the server: names (and text) sent while a
    /// SET the proxy cannot see yet may have changed the encoding are not taken at their
    /// bytes' word. PostgreSQL reports a changed client_encoding only at ReadyForQuery,
    /// and not at all when a pipeline changes it and changes it back.
    #[test]
    fn names_and_text_sent_while_the_encoding_may_have_changed_are_uncertain() {
        let (n1, n2) = (&b"\x87\x54"[..], &b"\xfa\x4a"[..]);
        let mut h = Harness::new();
        h.send(&[parse_bytes(n1, "SELECT 'harmless'"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'Z')]);
        assert!(h.t.settled());
        // Nothing is awaited: a Bind of n1 is what the proxy knows.
        h.send(&[bind_bytes(b"", n1), m(b'S')]);
        h.answer(&[m(b'2'), m(b'Z')]);
        assert_eq!(h.take().pop().and_then(|e| e.text_status), None);
        // One pipeline: run something (it may SET client_encoding), then Close n2, Parse
        // n2, Bind n1, and a query whose text has non-ASCII bytes.
        h.send(&[
            bind("set"),
            m(b'E'),
            close_bytes(n2),
            parse_bytes(n2, "DELETE FROM t"),
            bind_bytes(b"", n1),
            m(b'E'),
            m(b'S'),
            query("SELECT '\u{3042}' ; ALTER ROLE v PASSWORD 'sekret'"),
        ]);
        assert!(!h.t.settled());
        let q = h.take().pop().unwrap_or_else(|| panic!("the query's event"));
        // Logged whole, marked (the masker runs on it when the event is written).
        let whole = "SELECT '\u{3042}' ; ALTER ROLE v PASSWORD 'sekret'";
        assert_eq!(q.text.as_deref(), Some(whole));
        assert_eq!((q.truncated, q.text_status), (false, Some("uncertain")));
        // A backslash right after a non-ASCII character, which another encoding may take
        // as its second byte: cut before the first non-ASCII byte.
        h.send(&[query("SELECT '\u{3042}\\' ; DELETE FROM victim")]);
        let q = h.take().pop().unwrap_or_else(|| panic!("the query's event"));
        assert_eq!(q.text.as_deref(), Some("SELECT '"));
        assert_eq!((q.truncated, q.text_status), (true, Some("uncertain")));
        // ASCII alone is the same in every encoding: not uncertain even now.
        h.send(&[query("DELETE FROM victim")]);
        let q = h.take().pop().unwrap_or_else(|| panic!("the query's event"));
        assert_eq!(q.text_status, None);
        h.answer(&[m(b'2'), complete("SET"), m(b'3'), m(b'1'), m(b'2')]);
        let ev = h.take();
        let bind_n1 = ev.last().unwrap_or_else(|| panic!("{ev:?}"));
        assert_eq!(bind_n1.text_status, Some("uncertain"), "{ev:?}");
        h.answer(&[complete("DELETE 3"), m(b'Z'), complete("SELECT 1"), m(b'Z')]);
        h.answer(&[complete("DELETE 1"), m(b'Z'), complete("DELETE 1"), m(b'Z')]);
        assert!(h.t.settled());
        // Later, settled: n1 may have been replaced behind its bytes' back; still uncertain.
        h.send(&[bind_bytes(b"", n1), m(b'S')]);
        h.answer(&[m(b'2'), m(b'Z')]);
        assert_eq!(h.take().pop().and_then(|e| e.text_status), Some("uncertain"));
        // ASCII names and texts are the same in every encoding: exact even in a pipeline.
        h.send(&[bind("x"), m(b'E'), parse("a", "select 'plain'"), bind("a"), m(b'S')]);
        h.answer(&[m(b'2'), complete("SELECT 1"), m(b'1'), m(b'2'), m(b'Z')]);
        assert_eq!(h.take().pop(), Some(ran("a", "select 'plain'")));
    }

    #[test]
    fn parameter_status_is_followed_for_the_encoding_and_standard_conforming_strings() {
        let mut h = Harness::new();
        h.send(&[query("SET standard_conforming_strings = off")]);
        assert_eq!(h.take()[0].scs, None, "not reported yet");
        h.answer(&[status("standard_conforming_strings", "off"), complete("SET"), m(b'Z')]);
        h.send(&[query("select 1"), parse("p", "select 2"), m(b'S')]);
        assert_eq!(h.take()[0].scs, Some(false));
        h.answer(&[complete("SELECT 1"), m(b'Z'), m(b'1'), m(b'Z')]);
        // The Parse was sent while the query was unanswered: its setting is not known.
        h.send(&[bind("p"), m(b'S')]);
        h.answer(&[m(b'2'), m(b'Z')]);
        assert_eq!(h.take()[0].scs, None);
        assert!(h.t.refused_encoding.is_none());
        h.answer(&[status("client_encoding", "UTF8")]);
        assert!(h.t.refused_encoding.is_none());
        h.answer(&[status("client_encoding", "SJIS")]);
        assert_eq!(h.t.refused_encoding.as_deref(), Some("SJIS"));
        assert!(is_utf8("utf-8") && is_utf8("Unicode") && !is_utf8("SQL_ASCII"));
    }

    /// Round 10: Parse, Bind, Execute, Sync and Terminate in one write. The session ends
    /// before the server answers; each Bind relayed still gets exactly one event: with
    /// the server's outcome if its answers are read after the end, else `unknown`.
    #[test]
    fn a_bind_unanswered_when_the_session_ends_is_audited_once_as_unknown() {
        let mut h = Harness::new();
        assert!(!h.t.in_flight());
        h.send(&[parse("", "delete from t"), bind(""), m(b'E'), m(b'S'), m(b'X')]);
        assert!(h.take().is_empty());
        assert!(h.t.in_flight());
        let (t, events) = (&mut h.t, &mut h.events);
        t.finish(&mut |r: Record<'_>| events.push(own(&r)));
        let ev = h.take();
        assert_eq!(
            ev,
            vec![Ev {
                text_status: Some("uncertain"),
                outcome: Some("unknown"),
                ..ran("", "delete from t")
            }],
            "the Parse was never answered: its text is what the Bind ran if it ran"
        );
        assert!(!h.t.in_flight());
        // Finishing again (the relay's guard) writes nothing more.
        let (t, events) = (&mut h.t, &mut h.events);
        t.finish(&mut |r: Record<'_>| events.push(own(&r)));
        assert!(h.take().is_empty());

        // A Bind of a statement the server knows, behind an unanswered Close of it and a
        // Bind of a name never parsed.
        let mut h = Harness::new();
        h.send(&[parse("k", "select 'kept'"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'Z')]);
        h.send(&[bind("k"), m(b'S'), close("k"), bind("k"), bind("nope"), m(b'S')]);
        let (t, events) = (&mut h.t, &mut h.events);
        t.finish(&mut |r: Record<'_>| events.push(own(&r)));
        let unknown = |e: Ev| Ev { outcome: Some("unknown"), ..e };
        assert_eq!(
            h.take(),
            vec![
                unknown(ran("k", "select 'kept'")),
                unknown(Ev { text_status: Some("uncertain"), ..ran("k", "select 'kept'") }),
                unknown(Ev {
                    protocol: "extended",
                    statement: Some("nope".into()),
                    text_status: Some("unknown"),
                    ..Ev::default()
                }),
            ]
        );

        // Answers read after the end resolve the Bind as usual: one event, nothing left.
        let mut h = Harness::new();
        h.send(&[parse("", "delete from t"), bind(""), m(b'E'), m(b'S'), m(b'X')]);
        h.answer(&[m(b'1'), m(b'2'), complete("DELETE 1"), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("", "delete from t")]);
        assert!(!h.t.in_flight());
        let (t, events) = (&mut h.t, &mut h.events);
        t.finish(&mut |r: Record<'_>| events.push(own(&r)));
        assert!(h.take().is_empty());
    }

    #[test]
    fn in_flight_until_every_message_is_answered() {
        let mut h = Harness::new();
        h.send(&[query("select pg_sleep(10)")]);
        assert_eq!(h.take().len(), 1, "a Query is audited when it is relayed");
        assert!(h.t.in_flight());
        h.answer(&[complete("SELECT 1")]);
        assert!(h.t.in_flight(), "not before its ReadyForQuery");
        h.answer(&[m(b'Z')]);
        assert!(!h.t.in_flight());
        // A Bind answered but its Sync not yet: the server may still be executing.
        h.send(&[parse("", "select 1"), bind(""), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2')]);
        assert_eq!(h.take().len(), 1);
        assert!(h.t.in_flight());
        h.answer(&[complete("SELECT 1"), m(b'Z')]);
        assert!(!h.t.in_flight());
        // An answer out of step: nothing can be ruled out any more.
        h.answer(&[m(b'2')]);
        assert!(h.t.in_flight());
    }

    /// PostgreSQL fails a Flush that carries a body ("invalid message format") and then
    /// skips every message up to the next Sync; nothing the proxy follows answers a
    /// Flush, so the audit would take the Parse and Bind sent after it as run, and lose
    /// track at the Sync's ReadyForQuery. It is refused, and a bare Flush is not.
    #[test]
    fn a_flush_with_a_body_ends_the_session_before_it_is_relayed() {
        let mut h = Harness::new();
        h.send(&[parse("s", "select 1"), m(b'H'), bind("s"), m(b'E'), m(b'S')]);
        h.answer(&[m(b'1'), m(b'2'), complete("SELECT 1"), m(b'Z')]);
        assert_eq!(h.take(), vec![ran("s", "select 1")]);
        assert!(h.t.desync.is_none());
        h.send(&[message(b'H', b"x")]);
        assert!(h.t.desync.is_some(), "a Flush with a body is refused");
    }

    /// A simple Query may run two COPY FROM STDIN: what the client sends after the first
    /// one's CopyDone is read by the second, also when it is sent before the first one's
    /// CommandComplete. The audit lost track there (and went on with every text
    /// `unknown`).
    #[test]
    fn a_query_s_second_copy_reads_what_follows_the_first_one_s_copy_done() {
        let mut h = Harness::new();
        h.send(&[query("copy a from stdin; copy b from stdin")]);
        h.answer(&[copy_in()]);
        h.send(&[data("1\n"), m(b'c'), data("2\n"), m(b'c')]);
        h.send(&[parse("s", "select 'after'"), bind("s"), m(b'E'), m(b'S')]);
        h.answer(&[complete("COPY 1"), copy_in(), complete("COPY 1"), m(b'Z')]);
        h.answer(&[m(b'1'), m(b'2'), complete("SELECT 1"), m(b'Z')]);
        let ev = h.take();
        assert_eq!(ev[1..], [ran("s", "select 'after'")], "{ev:?}");
        assert!(h.t.settled() && !h.t.lost && h.t.desync.is_none());
        // One COPY: rows sent after its CopyDone are ignored by the server.
        let mut h = Harness::new();
        h.send(&[query("copy a from stdin; select 1")]);
        h.answer(&[copy_in()]);
        h.send(&[data("1\n"), m(b'c'), data("2\n"), m(b'c'), query("select 2")]);
        h.answer(&[complete("COPY 1"), complete("SELECT 1"), m(b'Z')]);
        h.answer(&[complete("SELECT 1"), m(b'Z')]);
        assert!(h.t.settled() && !h.t.lost && h.t.desync.is_none());
    }

    /// Answers that do not match what was relayed leave the audit unable to say what a
    /// Bind runs, or how a text was read, for the rest of the session: the session ends
    /// (`desync`) instead of going on with every text `unknown`.
    #[test]
    fn answers_out_of_step_end_the_session() {
        let mut h = Harness::new();
        h.answer(&[m(b'2')]);
        assert!(h.t.desync.is_some() && h.t.in_flight());
        let mut h = Harness::new();
        h.send(&[parse("s", "select 1"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'1')]);
        assert!(h.t.desync.is_some());
    }

    fn prepared(statement: &str, text: &str) -> Ev {
        Ev { outcome: Some("prepared"), ..ran(statement, text) }
    }

    /// Round 13 (attack): a statement parsed under a name and never bound runs by SQL
    /// `EXECUTE name` (or `EXPLAIN ANALYZE EXECUTE`, or from a function through SPI): the
    /// Query's event says `EXECUTE innocent`, and the text of `innocent` was nowhere in
    /// the audit. Its text is written (`outcome: "prepared"`) before the next event that
    /// may run it; a statement bound first has its text in its Bind's event only.
    #[test]
    fn a_named_statement_s_text_is_audited_before_anything_can_execute_it() {
        let mut h = Harness::new();
        h.send(&[parse("innocent", "delete from victim"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'Z')]);
        assert!(h.take_all().is_empty(), "nothing ran yet");
        h.send(&[query("EXECUTE innocent")]);
        assert_eq!(
            h.take_all(),
            vec![prepared("innocent", "delete from victim"), simple("EXECUTE innocent")]
        );
        h.answer(&[complete("DELETE 2"), m(b'Z')]);
        h.send(&[query("EXECUTE innocent")]);
        assert_eq!(h.take_all(), vec![simple("EXECUTE innocent")], "once");
        h.answer(&[complete("DELETE 0"), m(b'Z')]);

        // Pipelined: the Query is audited before the ParseComplete; the text follows it.
        h.send(&[parse("p2", "delete from other"), m(b'S'), query("EXECUTE p2")]);
        assert_eq!(h.take_all(), vec![simple("EXECUTE p2")]);
        h.answer(&[m(b'1')]);
        assert_eq!(h.take_all(), vec![prepared("p2", "delete from other")]);
        h.answer(&[m(b'Z'), complete("DELETE 1"), m(b'Z')]);

        // Drivers: Parse, then Bind: the Bind's event carries the text, nothing more.
        h.send(&[parse("s0", "select 1"), m(b'D'), m(b'S')]);
        h.answer(&[m(b'1'), message(b't', b"\0\0"), message(b'T', b"\0\0"), m(b'Z')]);
        h.send(&[bind("s0"), m(b'E'), m(b'S')]);
        h.answer(&[m(b'2'), complete("SELECT 1"), m(b'Z')]);
        assert_eq!(h.take_all(), vec![ran("s0", "select 1")]);

        // A Bind of another statement may run it too (its text may be an EXECUTE).
        h.send(&[parse("x", "delete from third"), parse("e", "EXECUTE x"), m(b'S')]);
        h.answer(&[m(b'1'), m(b'1'), m(b'Z')]);
        h.send(&[bind("e"), m(b'E'), m(b'S')]);
        h.answer(&[m(b'2')]);
        assert_eq!(h.take_all(), vec![prepared("x", "delete from third"), ran("e", "EXECUTE x")]);
    }

    /// Past the statements a session keeps, a named statement's text is written when the
    /// server accepts it: SQL `EXECUTE` could run it without a Bind, and nothing would
    /// have its text later.
    #[test]
    fn a_named_statement_past_the_cap_has_its_text_written_at_once() {
        let mut h = Harness::new();
        let batch: Vec<Vec<u8>> =
            (0..MAX_STATEMENTS).map(|i| parse(&format!("d{i}"), "select 1")).collect();
        h.send(&batch);
        h.answer(&vec![m(b'1'); MAX_STATEMENTS]);
        assert!(h.take_all().is_empty());
        h.send(&[parse("innocent", "delete from victim"), m(b'S')]);
        h.answer(&[m(b'1')]);
        assert_eq!(h.take_all(), vec![prepared("innocent", "delete from victim")]);
    }
}
