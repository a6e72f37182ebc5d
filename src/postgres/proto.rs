//! PostgreSQL wire protocol v3: the few messages portcullis builds or reads itself, and
//! the streaming [`Scanner`] that finds message boundaries while bytes are relayed.
//!
//! Only startup-phase messages are read whole (they are small and bounded). Relayed
//! traffic is never reassembled: the scanner looks at each message's type and length and,
//! for the few messages audit needs (`Q`, `P`, `B`, `C`, `F` from the client,
//! CommandComplete from the server), keeps a bounded part of the body.

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol 3.0.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// PostgreSQL's own limit for startup packets.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// A password message carries a token (16 KiB at most) plus a NUL.
pub const MAX_PASSWORD_LEN: usize = 16 * 1024 + 16;
/// Any other message read whole during startup (authentication, parameter status...).
pub const MAX_STARTUP_MESSAGE_LEN: usize = 64 * 1024;
/// Relayed messages: PostgreSQL's own ceiling (1 GiB - 1).
pub const MAX_RELAY_MESSAGE_LEN: usize = 0x3FFF_FFFF;
/// The longest length word PostgreSQL 14+ reads for a client message that carries no
/// data (Close, Describe, Execute, Flush, Sync, Terminate, CopyDone, CopyFail):
/// `PQ_SMALL_MESSAGE_LIMIT`.
pub const MAX_SMALL_CLIENT_MESSAGE_LEN: usize = 10_000;
/// The longest length word PostgreSQL reads for any other client message
/// (`PQ_LARGE_MESSAGE_LIMIT`, `MaxAllocSize - 1`).
pub const MAX_LARGE_CLIENT_MESSAGE_LEN: usize = 0x3FFF_FFFE;

/// The longest length word (itself included) PostgreSQL reads for a client message of
/// type `kind` once the session has started (`SocketBackend`); `None` for a type no
/// client message has, at which the backend ends the session (FATAL "invalid frontend
/// message type"). Past its limit the backend stops reading and exits ("invalid message
/// length"). Either way it never reads what follows, so the relay must not pass it on
/// (nor audit what follows as sent). A password message (`p`) is accepted here: the
/// relay refuses it itself, at its first byte.
pub fn client_message_limit(kind: u8) -> Option<usize> {
    match kind {
        b'Q' | b'F' | b'B' | b'P' | b'd' | b'p' => Some(MAX_LARGE_CLIENT_MESSAGE_LEN),
        b'C' | b'D' | b'E' | b'H' | b'S' | b'X' | b'c' | b'f' => Some(MAX_SMALL_CLIENT_MESSAGE_LEN),
        _ => None,
    }
}

/// Why reading from a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(&'static str),
}

/// The first packet of a connection (or the first one inside TLS).
#[derive(Debug)]
pub enum Initial {
    Ssl,
    GssEnc,
    Cancel { pid: u32, secret: u32 },
    Startup { minor: u16, params: Vec<(String, String)> },
}

/// Reads one untyped startup-phase packet (length-prefixed, no type byte).
pub async fn read_initial<R: AsyncRead + Unpin>(r: &mut R) -> Result<Initial, ReadError> {
    let mut len = [0u8; 4];
    read_exact_or_closed(r, &mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ReadError::Protocol("invalid length of startup packet"));
    }
    let mut body = vec![0u8; len - 4];
    read_exact_or_closed(r, &mut body).await?;
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST if rest.is_empty() => Ok(Initial::Ssl),
        GSSENC_REQUEST if rest.is_empty() => Ok(Initial::GssEnc),
        CANCEL_REQUEST if rest.len() == 8 => Ok(Initial::Cancel {
            pid: u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            Err(ReadError::Protocol("malformed special request packet"))
        }
        v if v >> 16 == 3 => {
            let params = parse_params(rest)?;
            Ok(Initial::Startup { minor: (v & 0xFFFF) as u16, params })
        }
        _ => Err(ReadError::Protocol("unsupported frontend protocol")),
    }
}

/// `name\0value\0...\0`: names unique, terminated by an empty name.
fn parse_params(mut b: &[u8]) -> Result<Vec<(String, String)>, ReadError> {
    let bad = ReadError::Protocol("invalid startup packet layout");
    let mut out: Vec<(String, String)> = Vec::new();
    loop {
        let (name, rest) = cstr(b).ok_or(ReadError::Protocol("invalid startup packet layout"))?;
        if name.is_empty() {
            return if rest.is_empty() { Ok(out) } else { Err(bad) };
        }
        let (value, rest) =
            cstr(rest).ok_or(ReadError::Protocol("invalid startup packet layout"))?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(ReadError::Protocol("duplicate parameter in startup packet"));
        }
        out.push((name.to_string(), value.to_string()));
        b = rest;
    }
}

/// A NUL-terminated UTF-8 string and what follows it.
pub fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = std::str::from_utf8(&b[..end]).ok()?;
    Some((s, &b[end + 1..]))
}

/// Reads one typed message whole (startup phase only): type byte and body.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<(u8, Vec<u8>), ReadError> {
    let mut hdr = [0u8; 5];
    read_exact_or_closed(r, &mut hdr).await?;
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    if len < 4 {
        return Err(ReadError::Protocol("invalid message length"));
    }
    if len - 4 > max {
        return Err(ReadError::Protocol("message too large"));
    }
    let mut body = vec![0u8; len - 4];
    read_exact_or_closed(r, &mut body).await?;
    Ok((hdr[0], body))
}

async fn read_exact_or_closed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), ReadError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ReadError::Closed),
        Err(e) => Err(ReadError::Io(e)),
    }
}

// === building messages ===

/// A typed message: `type`, length, body.
pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(kind);
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// An untyped startup-phase packet.
pub fn startup_packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 8);
    m.extend_from_slice(&(body.len() as u32 + 8).to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in params {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    startup_packet(PROTOCOL_3_0, &b)
}

pub fn cancel_request(pid: u32, secret: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(8);
    b.extend_from_slice(&pid.to_be_bytes());
    b.extend_from_slice(&secret.to_be_bytes());
    startup_packet(CANCEL_REQUEST, &b)
}

/// `R` with an authentication code and payload.
pub fn auth(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(payload);
    message(b'R', &b)
}

pub fn backend_key_data(pid: u32, secret: u32) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    b.extend_from_slice(&secret.to_be_bytes());
    message(b'K', &b)
}

/// `v`: the newest protocol version portcullis speaks (3.0, as a whole version number, as
/// PostgreSQL sends it: libpq 18 refuses a value below 3.0), and the `_pq_.` options it
/// ignored.
pub fn negotiate_protocol_version(options: &[&str]) -> Vec<u8> {
    let mut b = PROTOCOL_3_0.to_be_bytes().to_vec();
    b.extend_from_slice(&(options.len() as u32).to_be_bytes());
    for o in options {
        b.extend_from_slice(o.as_bytes());
        b.push(0);
    }
    message(b'v', &b)
}

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// `E` with severity, SQLSTATE and message.
pub fn error_response(severity: Severity, code: &str, text: &str) -> Vec<u8> {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let mut b = BytesMut::with_capacity(64 + text.len());
    for (field, value) in [(b'S', sev), (b'V', sev), (b'C', code), (b'M', text)] {
        b.put_u8(field);
        b.put_slice(value.replace('\0', " ").as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    message(b'E', &b)
}

/// Fields of an ErrorResponse or NoticeResponse body, by field code.
pub fn parse_fields(body: &[u8]) -> BTreeMap<u8, String> {
    let mut out = BTreeMap::new();
    let mut b = body;
    while let Some((&code, rest)) = b.split_first() {
        if code == 0 {
            break;
        }
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        out.insert(code, String::from_utf8_lossy(&rest[..end]).into_owned());
        b = rest.get(end + 1..).unwrap_or(&[]);
    }
    out
}

// === the streaming scanner ===

/// How much of a statement's text audit keeps.
pub const MAX_AUDIT_TEXT: usize = 64 * 1024;
/// The bytes of a name PostgreSQL keeps (NAMEDATALEN - 1); prepared statements are keyed
/// by them, however long the name on the wire.
pub const NAME_MAX: usize = 63;
/// Enough of a Close body for its kind byte and a name PostgreSQL would keep.
const CLOSE_PREFIX: usize = 1 + NAME_MAX + 1;
/// Enough of a FunctionCall body for the function's OID and its argument count:
/// OID, format count, at most one format per argument (at most 100, FUNC_MAX_ARGS),
/// argument count.
const FUNCTION_CALL_PREFIX: usize = 4 + 2 + 2 * 100 + 2;
/// Enough of a CommandComplete body for the tags audit looks for (`DEALLOCATE ALL`).
const COMMAND_TAG_PREFIX: usize = 16;
/// Of a ParameterStatus: enough for the names and values the audit follows.
const PARAMETER_STATUS_PREFIX: usize = 256;

/// What of a message's body a scanner keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    Nothing,
    /// The first bytes of the body.
    Prefix(usize),
    /// The first `names` NUL-terminated strings, each cut to [`NAME_MAX`] bytes as
    /// PostgreSQL does (and still NUL-terminated), then up to `then` bytes of the rest.
    Names {
        names: u8,
        then: usize,
    },
}

/// A message the scanner was asked to keep: its type, the kept part of its body, and
/// whether the body was longer than that.
#[derive(Debug, Default)]
pub struct Captured {
    pub kind: u8,
    pub body: Vec<u8>,
    pub truncated: bool,
}

/// Finds message boundaries in a byte stream fed in arbitrary chunks.
#[derive(Debug)]
pub struct Scanner {
    /// Header bytes collected so far (0..5).
    hdr: [u8; 5],
    hdr_len: usize,
    /// Body bytes of the current message still to come.
    remaining: usize,
    /// The current message is being captured into `captured` (a buffer reused from
    /// message to message).
    capturing: bool,
    captured: Captured,
    /// Names still to capture, and bytes kept of the current one.
    names_left: u8,
    name_len: usize,
    capture_left: usize,
    /// Which message types to capture, and how much of each.
    capture_for: fn(u8) -> Capture,
    /// The longest length word a message of each type may have; `None`: a type the
    /// stream may not carry (see [`client_message_limit`]).
    limit_for: fn(u8) -> Option<usize>,
}

impl Scanner {
    /// A scanner that keeps `capture_for(type)` of each message's body.
    pub fn new(capture_for: fn(u8) -> Capture) -> Self {
        Scanner::with_limits(capture_for, |_| Some(MAX_RELAY_MESSAGE_LEN))
    }

    /// [`Scanner::new`], failing at a message of a type `limit_for` refuses (at its type
    /// byte) or longer than it allows (at its header).
    pub fn with_limits(capture_for: fn(u8) -> Capture, limit_for: fn(u8) -> Option<usize>) -> Self {
        Scanner {
            hdr: [0; 5],
            hdr_len: 0,
            remaining: 0,
            capturing: false,
            captured: Captured::default(),
            names_left: 0,
            name_len: 0,
            capture_left: 0,
            capture_for,
            limit_for,
        }
    }

    /// Client → server: statements and their names, function calls; only the message
    /// types PostgreSQL reads from a client, each within PostgreSQL's length limit for it
    /// ([`client_message_limit`]).
    pub fn client() -> Self {
        Scanner::with_limits(
            |k| match k {
                b'Q' => Capture::Prefix(MAX_AUDIT_TEXT + 256),
                b'P' => Capture::Names { names: 1, then: MAX_AUDIT_TEXT + 1 },
                b'B' => Capture::Names { names: 2, then: 0 },
                b'C' => Capture::Prefix(CLOSE_PREFIX),
                b'F' => Capture::Prefix(FUNCTION_CALL_PREFIX),
                // Flush: whether it has a body (PostgreSQL fails one that does).
                b'H' => Capture::Prefix(1),
                _ => Capture::Nothing,
            },
            client_message_limit,
        )
    }

    /// Server → client: boundaries, and the tags of CommandComplete.
    pub fn server() -> Self {
        Scanner::new(|k| match k {
            b'C' => Capture::Prefix(COMMAND_TAG_PREFIX),
            // ParameterStatus: `client_encoding` and `standard_conforming_strings`.
            b'S' => Capture::Prefix(PARAMETER_STATUS_PREFIX),
            _ => Capture::Nothing,
        })
    }

    /// At a message boundary: nothing of a next message seen yet.
    pub fn at_boundary(&self) -> bool {
        self.hdr_len == 0 && self.remaining == 0 && !self.capturing
    }

    /// The type of the message read in part (its header or body not all fed yet); `None`
    /// at a message boundary.
    pub fn partial_kind(&self) -> Option<u8> {
        (!self.at_boundary()).then_some(self.hdr[0])
    }

    /// Bytes needed to reach the next message boundary as far as is known now: the rest
    /// of a partial header, or the rest of the current body.
    pub fn needed(&self) -> usize {
        if self.hdr_len > 0 {
            5 - self.hdr_len
        } else {
            self.remaining
        }
    }

    /// Keeps what the capture mode wants of the next `chunk` of the body.
    fn keep(&mut self, mut chunk: &[u8]) {
        let c = &mut self.captured;
        while self.names_left > 0 && !chunk.is_empty() {
            let (part, ended) = match chunk.iter().position(|&b| b == 0) {
                Some(i) => (&chunk[..i], Some(i + 1)),
                None => (chunk, None),
            };
            let keep = part.len().min(NAME_MAX - self.name_len);
            c.body.extend_from_slice(&part[..keep]);
            self.name_len += keep;
            match ended {
                Some(i) => {
                    c.body.push(0);
                    self.names_left -= 1;
                    self.name_len = 0;
                    chunk = &chunk[i..];
                }
                None => chunk = &[],
            }
        }
        if self.names_left == 0 && !chunk.is_empty() {
            let keep = chunk.len().min(self.capture_left);
            c.body.extend_from_slice(&chunk[..keep]);
            self.capture_left -= keep;
            c.truncated |= keep < chunk.len();
        }
    }

    /// Type of each completed message is reported through `done` (captured ones with what
    /// was kept of their body). Fails on a length below 4 or above
    /// [`MAX_RELAY_MESSAGE_LEN`], or what the scanner's limits refuse (a type at its first
    /// byte, a length at its header).
    pub fn feed(
        &mut self,
        data: &[u8],
        mut done: impl FnMut(u8, Option<&Captured>),
    ) -> Result<(), &'static str> {
        self.feed_at(data, |kind, c, _| done(kind, c))
    }

    /// [`Scanner::feed`], also telling `done` where in `data` each message ends.
    pub fn feed_at(
        &mut self,
        mut data: &[u8],
        mut done: impl FnMut(u8, Option<&Captured>, usize),
    ) -> Result<(), &'static str> {
        let fed = data.len();
        let mut done = |kind: u8, c: Option<&Captured>, left: usize| done(kind, c, fed - left);
        while !data.is_empty() {
            if self.remaining == 0 {
                if self.hdr_len < 5 {
                    let take = (5 - self.hdr_len).min(data.len());
                    self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&data[..take]);
                    self.hdr_len += take;
                    data = &data[take..];
                    // Refused at its type byte, so not even that is relayed.
                    if (self.limit_for)(self.hdr[0]).is_none() {
                        return Err("invalid message type");
                    }
                    if self.hdr_len < 5 {
                        return Ok(());
                    }
                }
                let len = u32::from_be_bytes([self.hdr[1], self.hdr[2], self.hdr[3], self.hdr[4]])
                    as usize;
                let max = (self.limit_for)(self.hdr[0]).unwrap_or(0).min(MAX_RELAY_MESSAGE_LEN);
                if !(4..=max).contains(&len) {
                    return Err("invalid message length");
                }
                let kind = self.hdr[0];
                self.hdr_len = 0;
                self.remaining = len - 4;
                let (names, then) = match (self.capture_for)(kind) {
                    Capture::Nothing => (0, 0),
                    Capture::Prefix(n) => (0, n),
                    Capture::Names { names, then } => (names, then),
                };
                self.capturing = names > 0 || then > 0;
                if self.capturing {
                    let c = &mut self.captured;
                    c.kind = kind;
                    c.body.clear();
                    c.truncated = false;
                    self.names_left = names;
                    self.name_len = 0;
                    self.capture_left = then;
                }
                if self.remaining == 0 {
                    self.finish(&mut done, data.len());
                    continue;
                }
            }
            let take = self.remaining.min(data.len());
            if self.capturing {
                self.keep(&data[..take]);
            }
            self.remaining -= take;
            data = &data[take..];
            if self.remaining == 0 {
                self.finish(&mut done, data.len());
            }
        }
        Ok(())
    }

    /// `left`: bytes of the fed data after the message.
    fn finish(&mut self, done: &mut impl FnMut(u8, Option<&Captured>, usize), left: usize) {
        if self.capturing {
            self.capturing = false;
            done(self.hdr[0], Some(&self.captured), left);
        } else {
            done(self.hdr[0], None, left);
        }
    }
}
