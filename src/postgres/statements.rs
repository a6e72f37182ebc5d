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
//!   `outcome` `error` (the one that failed) or `skipped`.
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
    /// CopyDone or CopyFail: no answer of its own; a COPY FROM STDIN ignores Syncs up to it.
    CopyEnd,
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
    /// `skipped`, `unknown`.
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
    /// A COPY FROM STDIN runs whose CopyDone/CopyFail the client has not sent yet.
    copy_in: bool,
    /// The answers no longer match the queue (never expected): from then on no text is
    /// reported for a Bind, rather than one that may be wrong.
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
}

/// A Record's text as the audit may show it: while the session's encoding is uncertain
/// (see [`Tracker::settled`]) only the ASCII prefix of a text is certain, whatever the
/// encoding (every encoding PostgreSQL accepts reads ASCII bytes before any non-ASCII
/// byte as ASCII), so the text is cut before its first non-ASCII byte.
fn ascii_prefix(text: String) -> (String, bool) {
    match text.bytes().position(|b| b >= 0x80) {
        Some(i) => (text[..i].to_string(), true),
        None => (text, false),
    }
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
        self.pending.is_empty() && !self.exec_open && !self.lost && !self.copy_in
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
        self.lost || self.pending.iter().any(|p| !matches!(p, Pending::CopyEnd))
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
        if let (Pending::Other(n), Some(Pending::Other(m))) = (&p, self.pending.back_mut()) {
            *m += n;
            return;
        }
        self.pending.push_back(p);
    }

    fn release(&mut self, t: &Text) {
        self.text_bytes -= t.bytes();
    }

    /// A client message, as relayed to the server (`c`: its capture, for the kinds the
    /// client scanner captures).
    pub fn client(&mut self, kind: u8, c: Option<&Captured>, emit: &mut impl FnMut(Record<'_>)) {
        let skipped = self.skipping.then_some("skipped");
        let settled = self.settled();
        let scs = if settled { self.scs } else { None };
        match kind {
            b'B' | b'E' | b'c' | b'f' => self.exec_open = true,
            b'Q' | b'F' => self.exec_open = false,
            b'S' if !self.copy_in => self.exec_open = false,
            _ => {}
        }
        match kind {
            b'Q' => {
                let (text, truncated) =
                    c.map_or((String::new(), false), |c| text_of(&c.body, c.truncated));
                let (text, cut) = if settled { (text, false) } else { ascii_prefix(text) };
                emit(Record {
                    protocol: "simple",
                    statement: None,
                    text: Some(&text),
                    truncated: truncated || cut,
                    text_status: cut.then_some("uncertain"),
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
                let (text, cut) = if settled { (text, false) } else { ascii_prefix(text) };
                let mut text = self.charge(text, truncated || cut);
                text.uncertain = cut;
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
            b'S' if !self.copy_in => {
                self.skipping = false;
                if !self.lost {
                    self.push(Pending::Sync);
                }
            }
            b'c' | b'f' => {
                if self.copy_in {
                    self.copy_in = false;
                } else if !self.lost {
                    self.push(Pending::CopyEnd);
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
        &self,
        name: &Name,
        outcome: &'static str,
        unsure: bool,
        emit: &mut impl FnMut(Record<'_>),
    ) {
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

    /// A Parse or Close of a non-ASCII name the server may have read otherwise: any
    /// statement known by a non-ASCII name may have been replaced or closed.
    fn unsure_names(&mut self) {
        for (n, t) in &mut self.known {
            if non_ascii(n) {
                t.uncertain = true;
            }
        }
    }

    /// The front of the queue, past CopyEnd markers (they get no answer).
    fn front(&mut self) -> Option<&mut Pending> {
        while matches!(self.pending.front(), Some(Pending::CopyEnd)) {
            self.pending.pop_front();
        }
        self.pending.front_mut()
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
                        self.release(&text);
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
            b'G' => self.copy_in_started(),
            b'Z' => match self.front() {
                Some(Pending::Sync | Pending::Simple) => {
                    self.pending.pop_front();
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

    /// CopyInResponse: the server ignores Sync (and Flush) until CopyDone or CopyFail.
    fn copy_in_started(&mut self) {
        let mut i = 1;
        while i < self.pending.len() {
            match self.pending.get(i) {
                Some(Pending::Sync) => {
                    self.pending.remove(i);
                }
                Some(Pending::CopyEnd) => {
                    self.pending.remove(i);
                    return;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    fn error(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        match self.front() {
            None | Some(Pending::Simple | Pending::Sync) => return,
            _ => {}
        }
        // An extended-protocol message failed: the server skips everything up to Sync.
        let mut first = true;
        while let Some(p) = self.pending.front() {
            if matches!(p, Pending::Sync) {
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

    /// The answers do not match the queue: audit what is pending as of unknown outcome and
    /// stop naming texts for the rest of the session.
    fn lose(&mut self, emit: &mut impl FnMut(Record<'_>)) {
        tracing::warn!("postgres statement audit lost track of the server's answers");
        self.lost = true;
        while let Some(p) = self.pending.pop_front() {
            if let Pending::Bind { name, unsure } = p {
                self.emit_bind(&name, "unknown", unsure, emit);
            }
        }
        self.known.clear();
        self.text_bytes = 0;
    }
}

/// Pops the front Parse (past CopyEnd markers); `None` if the front is not a Parse.
fn pop_front_parse(pending: &mut VecDeque<Pending>) -> Option<(Name, Text, bool)> {
    while matches!(pending.front(), Some(Pending::CopyEnd)) {
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

        fn take(&mut self) -> Vec<Ev> {
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

    #[test]
    fn answers_out_of_step_never_yield_a_text() {
        let mut h = Harness::new();
        h.send(&[parse("s", "select 1"), bind("s"), m(b'S')]);
        h.answer(&[m(b'2')]);
        let ev = h.take();
        assert_eq!((ev[0].outcome, ev[0].text_status), (Some("unknown"), Some("unknown")));
        h.send(&[parse("s", "select 1"), m(b'S'), bind("s")]);
        h.answer(&[m(b'1'), m(b'Z')]);
        assert_eq!(h.take()[0].text, None);
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
        assert_eq!(q.text.as_deref(), Some("SELECT '"), "only the ASCII prefix is certain");
        assert_eq!((q.truncated, q.text_status), (true, Some("uncertain")));
        h.answer(&[m(b'2'), complete("SET"), m(b'3'), m(b'1'), m(b'2')]);
        let ev = h.take();
        let bind_n1 = ev.last().unwrap_or_else(|| panic!("{ev:?}"));
        assert_eq!(bind_n1.text_status, Some("uncertain"), "{ev:?}");
        h.answer(&[complete("DELETE 3"), m(b'Z'), complete("SELECT 1"), m(b'Z')]);
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
}
