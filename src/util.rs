//! Small helpers shared across modules.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How long from now until `unix` (seconds since the epoch), to the nanosecond; zero
/// once it has passed. For timers that end something at a credential's `exp`:
/// `unix - unix_now()` counts whole seconds from the last one begun, up to a second late.
pub fn until_unix(unix: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(unix).saturating_sub(now)
}

/// Whether diagnostics on stderr may carry ANSI colour codes: only when stderr is a
/// terminal (a file, a pipe or journald would store the escapes as text), and never with
/// `NO_COLOR` set to anything but the empty string (<https://no-color.org>).
pub fn stderr_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Writes one line to stderr, ignoring a failure: a closed or reader-less stderr (a log
/// shipper that went away: EPIPE) costs the line, never the process, where `eprintln!`
/// panics.
pub fn stderr_line(line: &dyn std::fmt::Display) {
    stderr_text(&format_args!("{line}\n"));
}

/// [`stderr_line`] without the line end: `text` as it is (several lines, or none).
pub fn stderr_text(text: &dyn std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(std::io::stderr().lock(), "{text}");
}

/// Reads a file the operator named (configuration, policy, secret), refusing what would
/// hang or exhaust memory: more than `limit` bytes (`/dev/zero`), and, when
/// `regular_only`, anything but a regular file after following symlinks (a FIFO would
/// block until someone writes to it).
pub fn read_bounded(
    path: &std::path::Path,
    limit: u64,
    regular_only: bool,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let meta = std::fs::metadata(path)?;
    if regular_only && !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let too_big = || Error::new(ErrorKind::InvalidData, format!("larger than {limit} bytes"));
    if meta.is_file() && meta.len() > limit {
        return Err(too_big());
    }
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(out)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_bounded_text(
    path: &std::path::Path,
    limit: u64,
    regular_only: bool,
) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, limit, regular_only)?).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8")
    })
}

/// The most a configuration or policy file may hold.
pub const MAX_CONFIG_FILE: u64 = 16 * 1024 * 1024;
/// The most a secret file (a password, a key) may hold.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// SHA-256 of some bytes: token-cache keys, policy revisions, what the file watcher
/// compares.
/// A duration in milliseconds to the microsecond, as audit events give it: from whole
/// microseconds, so the JSON reads `0.12`, not `0.11994500000000001`.
pub fn millis(d: std::time::Duration) -> f64 {
    // u128 → f64: exact below 2^53 µs (285 years).
    d.as_micros() as f64 / 1000.0
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(stderr_colour(true, None));
        assert!(stderr_colour(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!stderr_colour(true, Some(OsStr::new("1"))));
        assert!(!stderr_colour(false, None), "a file or journald gets no escapes");
        assert!(!stderr_colour(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn millis_are_whole_microseconds_in_json() {
        let d = std::time::Duration::from_nanos(119_945_678);
        assert_eq!(serde_json::to_string(&millis(d)).unwrap_or_default(), "119.945");
        let d = std::time::Duration::from_nanos(119_945);
        assert_eq!(serde_json::to_string(&millis(d)).unwrap_or_default(), "0.119");
        assert_eq!(millis(std::time::Duration::from_secs(84)), 84_000.0);
    }

    #[test]
    fn bounded_reads_refuse_devices_fifos_and_oversized_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let small = dir.path().join("small");
        std::fs::write(&small, "secret\n").ok();
        assert_eq!(read_bounded_text(&small, 64, true).ok().as_deref(), Some("secret\n"));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 65]).ok();
        assert!(read_bounded(&big, 64, true).is_err());
        // A device reads forever: refused as not regular, or cut at the limit.
        let zero = std::path::Path::new("/dev/zero");
        assert!(read_bounded(zero, 64, true).is_err());
        assert!(read_bounded(zero, 64, false).is_err());
        // A symlink to a device is the device.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(zero, &link).ok();
        assert!(read_bounded(&link, 64, true).is_err());
        // A FIFO is refused without opening it (opening would block: no writer).
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = read_bounded(&fifo, 64, true).err().map(|e| e.to_string());
            assert_eq!(err.as_deref(), Some("not a regular file"));
        }
        assert!(read_bounded_text(&big, 1024, true).is_ok());
        std::fs::write(&big, [0xff, 0xfe]).ok();
        assert!(read_bounded_text(&big, 1024, true).is_err());
    }
}
