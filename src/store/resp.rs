//! The few parts of RESP2 (the Redis serialization protocol) the shared store speaks:
//! commands out as arrays of bulk strings, replies in as the five RESP2 types.
//!
//! Replies come from the network, so reading is bounded: a bulk string of at most
//! [`MAX_BULK`] bytes, an array of at most [`MAX_ARRAY`] elements, nested at most
//! [`MAX_DEPTH`] deep, a simple line of at most [`MAX_LINE`] bytes. A reply past any of
//! them is a protocol error and the connection is dropped, so a hostile or broken server
//! can neither exhaust memory nor recurse the stack.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Longest bulk string read (the store's values are a few dozen bytes).
pub const MAX_BULK: usize = 64 * 1024;
/// Most elements in one array (a `SCAN` page asks for 512).
pub const MAX_ARRAY: usize = 4096;
/// Deepest nesting of arrays (`SCAN` answers two levels).
pub const MAX_DEPTH: usize = 3;
/// Longest `+`, `-` or `:` line, and length header.
pub const MAX_LINE: usize = 4096;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Simple(String),
    /// `-ERR …`: the server refused the command (not a connection problem).
    Error(String),
    Int(i64),
    /// `$-1` is `Bulk(None)`, the nil reply.
    Bulk(Option<Vec<u8>>),
    /// `*-1` is `Array(None)`.
    Array(Option<Vec<Value>>),
}

/// Why a reply could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// The bytes are not RESP2, or exceed a bound.
    Protocol(&'static str),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

/// Appends `args` as one command: `*N\r\n` then `$len\r\narg\r\n` for each.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one reply.
pub async fn read<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Value, ReadError> {
    // Arrays are read with an explicit stack, not by recursion (an `async fn` cannot
    // recurse without boxing, and the depth is bounded anyway).
    let mut stack: Vec<(usize, Vec<Value>)> = Vec::new();
    loop {
        let mut value = match read_one(r).await? {
            Item::Value(v) => v,
            Item::ArrayOf(0) => Value::Array(Some(Vec::new())),
            Item::ArrayOf(n) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(ReadError::Protocol("arrays nested too deep"));
                }
                stack.push((n, Vec::with_capacity(n.min(64))));
                continue;
            }
        };
        // Completes every array this value fills.
        loop {
            match stack.last_mut() {
                None => return Ok(value),
                Some((n, items)) => {
                    items.push(value);
                    if items.len() < *n {
                        break;
                    }
                }
            }
            let (_, items) = stack.pop().unwrap_or_default();
            value = Value::Array(Some(items));
        }
    }
}

enum Item {
    Value(Value),
    /// The header of an array of this many elements, which follow.
    ArrayOf(usize),
}

async fn read_one<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Item, ReadError> {
    let line = read_line(r).await?;
    let (kind, rest) = match line.split_first() {
        Some((k, rest)) => (*k, rest),
        None => return Err(ReadError::Protocol("empty line")),
    };
    let text = || {
        std::str::from_utf8(rest)
            .map(str::to_owned)
            .map_err(|_| ReadError::Protocol("a status line that is not UTF-8"))
    };
    Ok(match kind {
        b'+' => Item::Value(Value::Simple(text()?)),
        b'-' => Item::Value(Value::Error(text()?)),
        b':' => Item::Value(Value::Int(int(rest)?)),
        b'$' => match int(rest)? {
            -1 => Item::Value(Value::Bulk(None)),
            n if n < 0 || n as u64 > MAX_BULK as u64 => {
                return Err(ReadError::Protocol("bulk string length out of bounds"))
            }
            n => {
                let mut buf = vec![0u8; n as usize + 2];
                r.read_exact(&mut buf).await?;
                if !buf.ends_with(b"\r\n") {
                    return Err(ReadError::Protocol("bulk string not ended by CRLF"));
                }
                buf.truncate(n as usize);
                Item::Value(Value::Bulk(Some(buf)))
            }
        },
        b'*' => match int(rest)? {
            -1 => Item::Value(Value::Array(None)),
            n if n < 0 || n as u64 > MAX_ARRAY as u64 => {
                return Err(ReadError::Protocol("array length out of bounds"))
            }
            n => Item::ArrayOf(n as usize),
        },
        _ => return Err(ReadError::Protocol("unknown reply type")),
    })
}

/// One line without its CRLF, at most [`MAX_LINE`] bytes.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    let n = (&mut *r).take(MAX_LINE as u64 + 2).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    match line.strip_suffix(b"\r\n") {
        Some(l) => Ok(l.to_vec()),
        None if line.len() > MAX_LINE => Err(ReadError::Protocol("line too long")),
        None => Err(ReadError::Protocol("line not ended by CRLF")),
    }
}

fn int(digits: &[u8]) -> Result<i64, ReadError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ReadError::Protocol("not an integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Value, ReadError> {
        read(&mut tokio::io::BufReader::new(bytes)).await
    }

    fn bulk(s: &str) -> Value {
        Value::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b"", b"a\r\nb"]);
        assert_eq!(out, b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n$4\r\na\r\nb\r\n");
    }

    #[tokio::test]
    async fn every_reply_type_is_read() {
        assert_eq!(parse(b"+OK\r\n").await.ok(), Some(Value::Simple("OK".into())));
        assert_eq!(parse(b"-ERR no\r\n").await.ok(), Some(Value::Error("ERR no".into())));
        assert_eq!(parse(b":-42\r\n").await.ok(), Some(Value::Int(-42)));
        assert_eq!(parse(b"$-1\r\n").await.ok(), Some(Value::Bulk(None)));
        assert_eq!(parse(b"$5\r\na\r\nbc\r\n").await.ok(), Some(bulk("a\r\nbc")));
        assert_eq!(parse(b"*0\r\n").await.ok(), Some(Value::Array(Some(vec![]))));
        assert_eq!(parse(b"*-1\r\n").await.ok(), Some(Value::Array(None)));
        // A SCAN page: a cursor and an array of keys.
        let scan = b"*2\r\n$1\r\n0\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n";
        assert_eq!(
            parse(scan).await.ok(),
            Some(Value::Array(Some(vec![
                bulk("0"),
                Value::Array(Some(vec![bulk("a"), bulk("b")]))
            ])))
        );
        // Pub/sub: ["message", channel, payload] after an empty array in the middle.
        let nested = b"*3\r\n*0\r\n$7\r\nmessage\r\n:1\r\n";
        assert_eq!(
            parse(nested).await.ok(),
            Some(Value::Array(Some(vec![
                Value::Array(Some(vec![])),
                bulk("message"),
                Value::Int(1)
            ])))
        );
    }

    #[tokio::test]
    async fn hostile_replies_are_refused_within_bounds() {
        let huge_bulk = format!("${}\r\n", MAX_BULK + 1);
        let huge_array = format!("*{}\r\n", MAX_ARRAY + 1);
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        let long_line = format!("+{}\r\n", "a".repeat(MAX_LINE + 10));
        for bad in [
            huge_bulk.as_str(),
            huge_array.as_str(),
            deep.as_str(),
            long_line.as_str(),
            "$-2\r\n",
            "*-5\r\n",
            "$3\r\nabcXY",
            "?what\r\n",
            ":12a\r\n",
            "+no newline",
            "+bare lf\n",
            "\r\n",
        ] {
            assert!(matches!(parse(bad.as_bytes()).await, Err(ReadError::Protocol(_))), "{bad:?}");
        }
        // Cut short: an I/O error (end of stream), not a value.
        for cut in ["", "*2\r\n:1\r\n", "$5\r\nab"] {
            assert!(matches!(parse(cut.as_bytes()).await, Err(ReadError::Io(_))), "{cut:?}");
        }
    }
}
