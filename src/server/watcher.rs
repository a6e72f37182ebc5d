//! The configuration file watcher: polls every file the configuration was built from
//! or names ([`crate::config::Config::files`]), and those the newest refused version
//! read or tried to read ([`crate::config::Attempt::files`]) until a version loads, and
//! reloads when one changed.
//!
//! Polling (content-hashed) works the same on every filesystem, including the symlink
//! swaps Kubernetes does for mounted ConfigMaps. Two rules keep what is on disk and what
//! is loaded from drifting apart:
//!
//! - What the watcher remembers after a reload is never read after the reload: for the
//!   configuration file and the policies it is the digest of the bytes the load read
//!   ([`crate::config::Config::read_digests`]), for the other files (certificates, keys,
//!   secrets) their state *before* the reload started. A write that lands during or
//!   after the reload therefore always differs from it, and brings another reload.
//! - A change is acted on once the files have been quiet (unchanged across polls) for
//!   [`Timing::quiet`], so a file rewritten in several writes is not loaded half
//!   written — as far as a pause can tell: edits should be atomic (write a temporary
//!   file, rename it over the old one). Whatever is loaded meanwhile, the last version
//!   written is always loaded in the end.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How often the watcher looks, and how long it waits for writes to end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub poll: Duration,
    /// The files must be unchanged across polls this long before a reload.
    pub quiet: Duration,
    /// Files that never stop changing are reloaded after this long anyway (the next
    /// change brings another reload).
    pub longest_settle: Duration,
}

/// The server's: a look every second, a reload after a second without writes.
pub(crate) const TIMING: Timing = Timing {
    poll: Duration::from_secs(1),
    quiet: Duration::from_secs(1),
    longest_settle: Duration::from_secs(10),
};

/// How often the files are looked at while waiting for them to be quiet.
const SETTLE_POLL: Duration = Duration::from_millis(250);

/// A file's state as the watcher compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Content([u8; 32]),
    /// It could not be read (missing, not readable, not a regular file, too large): the
    /// kind of error. Errors that are not the file's (out of descriptors) are not a
    /// state: see [`about_the_file`].
    Unreadable(std::io::ErrorKind),
    /// Not known from before a reload: differs from whatever is on disk, so the next
    /// poll reloads once more (a file a reload named for the first time).
    Unknown,
}

type Snapshot = BTreeMap<PathBuf, Seen>;

/// Each file watched, with the digest of what the generation in force read of it when
/// that is known (the configuration file and the policies).
pub(crate) type Watched = Vec<(PathBuf, Option<[u8; 32]>)>;

/// How the watcher reads a file: the server's is [`read_file`]; tests give their own to
/// inject errors.
pub(crate) type Reader = fn(&std::path::Path) -> std::io::Result<Vec<u8>>;

/// The server's [`Reader`]. A file that is not a regular one (a FIFO, a device) is never
/// opened: the load refuses it anyway.
fn read_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    crate::util::read_bounded(path, crate::util::MAX_CONFIG_FILE, true)
}

/// Whether a read error says something about the file (it is not there, not readable by
/// us, not a regular file, too large: a state to compare), rather than about the
/// process or the machine at this moment (out of descriptors or memory, interrupted,
/// an I/O error): those say nothing of the file and are not taken for a change.
fn about_the_file(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // ELOOP (a symlink loop) and ENAMETOOLONG have no stable kind to match.
    const ELOOP: i32 = 40;
    const ENAMETOOLONG: i32 = 36;
    matches!(
        e.kind(),
        NotFound | PermissionDenied | InvalidInput | InvalidData | NotADirectory | IsADirectory
    ) || (cfg!(target_os = "linux") && matches!(e.raw_os_error(), Some(ELOOP | ENAMETOOLONG)))
}

/// A file's state, or `None` when the read failed for a reason that is not the file's
/// ([`about_the_file`]).
fn read(reader: Reader, path: &std::path::Path) -> Option<Seen> {
    match reader(path) {
        Ok(b) => Some(Seen::Content(crate::util::sha256(&b))),
        Err(e) if about_the_file(&e) => Some(Seen::Unreadable(e.kind())),
        Err(e) => {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "could not read a watched configuration file; not taken for a change"
            );
            None
        }
    }
}

/// The files' states now. A file whose read failed for a reason that is not the file's
/// keeps its state in `last` (no change seen in it this poll), or is [`Seen::Unknown`]
/// when `last` has none. File reads block: they run off the runtime's threads.
async fn snapshot(reader: Reader, watched: &Watched, last: &Snapshot) -> Snapshot {
    let paths: Vec<PathBuf> = watched.iter().map(|(p, _)| p.clone()).collect();
    let last = last.clone();
    let read_all = move || {
        paths
            .into_iter()
            .map(|p| {
                let seen = read(reader, &p)
                    .unwrap_or_else(|| last.get(&p).cloned().unwrap_or(Seen::Unknown));
                (p, seen)
            })
            .collect()
    };
    // A hashing task that panicked leaves an empty snapshot: it differs, so a reload
    // follows (never a change taken for no change).
    tokio::task::spawn_blocking(read_all).await.unwrap_or_default()
}

/// What to compare the disk with from now on: what the generation in force read of each
/// file when known (`loaded`), else the file's state in `before`, taken before that
/// generation was loaded; a file in neither is [`Seen::Unknown`].
fn remembered(watched: &Watched, before: &Snapshot, loaded: bool) -> Snapshot {
    watched
        .iter()
        .map(|(path, read)| {
            let seen = match read {
                Some(digest) if loaded => Seen::Content(*digest),
                _ => before.get(path).cloned().unwrap_or(Seen::Unknown),
            };
            (path.clone(), seen)
        })
        .collect()
}

/// Waits for `d`; false when shutdown was signalled meanwhile.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = super::stopped(shutdown) => false,
    }
}

/// Polls the files `watched` lists (what the generation in force reads) and calls
/// `reload` when they changed and have been quiet for `timing.quiet`, until shutdown.
/// `reload` says whether a new generation was loaded.
pub(crate) async fn run<W, R, F>(
    timing: Timing,
    watched: W,
    reload: R,
    shutdown: watch::Receiver<bool>,
) where
    W: Fn() -> Watched,
    R: FnMut() -> F,
    F: Future<Output = bool>,
{
    run_with(read_file, timing, watched, reload, shutdown).await;
}

/// [`run`], reading the files with `reader`.
async fn run_with<W, R, F>(
    reader: Reader,
    timing: Timing,
    watched: W,
    mut reload: R,
    mut shutdown: watch::Receiver<bool>,
) where
    W: Fn() -> Watched,
    R: FnMut() -> F,
    F: Future<Output = bool>,
{
    let files = watched();
    // A file not read at start for a reason that is not its own is `Unknown`: one more
    // reload once it reads, never a change missed.
    let now = snapshot(reader, &files, &Snapshot::new()).await;
    // The generation in force at start was loaded before this snapshot: what it read of
    // the configuration and the policies is compared, not what is there now.
    let mut last = remembered(&files, &now, true);
    loop {
        if !pause(timing.poll, &mut shutdown).await {
            return;
        }
        let files = watched();
        let mut now = snapshot(reader, &files, &last).await;
        if now == last {
            continue;
        }
        // Let an editor or `git checkout` finish writing every file: the files must
        // stay unchanged for `quiet`.
        let started = Instant::now();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < timing.quiet {
            if started.elapsed() >= timing.longest_settle {
                tracing::warn!(
                    waited = ?timing.longest_settle,
                    "configuration files keep changing; reloading anyway"
                );
                break;
            }
            if !pause(SETTLE_POLL.min(timing.quiet), &mut shutdown).await {
                return;
            }
            let again = snapshot(reader, &files, &now).await;
            if again != now {
                now = again;
                quiet_since = Instant::now();
            }
        }
        tracing::info!("configuration files changed; reloading");
        let loaded = reload().await;
        // `now` was taken before the reload read anything: a write since then differs
        // from it. A refused reload is retried at the next change, not at every poll.
        last = remembered(&watched(), &now, loaded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The tests run on a paused clock (`start_paused`): their writes 100 ms apart
    /// against a 150 ms quiet period, on the real clock, were a race with the scheduler
    /// of a loaded machine (a stall of the thread longer than the gap reads as a quiet
    /// file); paused, the clock moves only when every task waits.
    const FAST: Timing = Timing {
        poll: Duration::from_millis(20),
        quiet: Duration::from_millis(150),
        longest_settle: Duration::from_secs(5),
    };

    /// One watched file and a stand-in for the server: `reload` reads the file (what
    /// a generation "loads"), records it, and runs `during` (a write that lands while
    /// the reload is in progress).
    struct Fake {
        _dir: tempfile::TempDir,
        file: PathBuf,
        loaded: Arc<Mutex<Vec<String>>>,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(initial: &str, digest_known: bool, during: Option<&'static str>) -> Fake {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, initial).unwrap_or_else(|e| panic!("{e}"));
        let loaded = Arc::new(Mutex::new(vec![initial.to_string()]));
        let (shutdown, rx) = watch::channel(false);
        let (f, l) = (file.clone(), loaded.clone());
        let watched = move || {
            let last = l.lock().map(|v| v.last().cloned().unwrap_or_default()).unwrap_or_default();
            let digest = digest_known.then(|| crate::util::sha256(last.as_bytes()));
            vec![(f.clone(), digest)]
        };
        let (f, l) = (file.clone(), loaded.clone());
        let during = Arc::new(Mutex::new(during));
        let reload = move || {
            let (f, l, during) = (f.clone(), l.clone(), during.clone());
            async move {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                if let Ok(mut v) = l.lock() {
                    v.push(text);
                }
                if let Some(next) = during.lock().ok().and_then(|mut d| d.take()) {
                    std::fs::write(&f, next).unwrap_or_else(|e| panic!("{e}"));
                }
                true
            }
        };
        let task = tokio::spawn(run(FAST, watched, reload, rx));
        Fake { _dir: dir, file, loaded, shutdown, task }
    }

    impl Fake {
        fn loaded(&self) -> Vec<String> {
            self.loaded.lock().map(|v| v.clone()).unwrap_or_default()
        }
        async fn stop(self) -> Vec<String> {
            let _ = self.shutdown.send(true);
            let loaded = self.loaded.clone();
            let _ = self.task.await;
            loaded.lock().map(|v| v.clone()).unwrap_or_default()
        }
    }

    async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        f()
    }

    /// F2: a write that lands while a reload runs (after it read the file) is loaded by
    /// another reload, whether the watcher knows the digest of what was read (config,
    /// policies) or only the file's state before the reload (certificates, secrets).
    #[tokio::test(start_paused = true)]
    async fn a_write_during_a_reload_is_loaded_by_another_reload() {
        for digest_known in [true, false] {
            let fake = start("v1", digest_known, Some("v3-revoked"));
            tokio::time::sleep(Duration::from_millis(60)).await;
            std::fs::write(&fake.file, "v2").unwrap_or_else(|e| panic!("{e}"));
            let done = until(Duration::from_secs(3), || {
                fake.loaded().last().is_some_and(|l| l == "v3-revoked")
            })
            .await;
            let loaded = fake.stop().await;
            assert!(
                done,
                "digest known: {digest_known}: the last write was never loaded: {loaded:?}"
            );
            assert_eq!(loaded, ["v1", "v2", "v3-revoked"], "digest known: {digest_known}");
        }
    }

    /// F2b: a file written in several writes with pauses shorter than the quiet period
    /// is loaded once, whole.
    #[tokio::test(start_paused = true)]
    async fn a_file_still_being_written_is_loaded_once_it_is_quiet() {
        let fake = start("v1", true, None);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut text = String::new();
        for part in ["[[rule]] allow", "\n[[rule]] more", "\n[[rule]] deny"] {
            text.push_str(part);
            std::fs::write(&fake.file, &text).unwrap_or_else(|e| panic!("{e}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let whole = text.clone();
        let done =
            until(Duration::from_secs(3), || fake.loaded().last().is_some_and(|l| *l == whole))
                .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let loaded = fake.stop().await;
        assert!(done, "never loaded: {loaded:?}");
        assert_eq!(loaded, ["v1".to_string(), text], "a half-written version was loaded");
    }

    /// A refused reload is not retried at every poll, only at the next change.
    #[tokio::test(start_paused = true)]
    async fn a_refused_reload_waits_for_the_next_change() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("portcullis.toml");
        std::fs::write(&file, "good").unwrap_or_else(|e| panic!("{e}"));
        let digest = crate::util::sha256(b"good");
        let calls = Arc::new(Mutex::new(0u32));
        let (tx, rx) = watch::channel(false);
        let (f, c) = (file.clone(), calls.clone());
        let task = tokio::spawn(run(
            FAST,
            move || vec![(f.clone(), Some(digest))],
            move || {
                let c = c.clone();
                async move {
                    if let Ok(mut n) = c.lock() {
                        *n += 1;
                    }
                    false
                }
            },
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        std::fs::write(&file, "broken").unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(calls.lock().map(|n| *n).unwrap_or_default(), 1);
        std::fs::write(&file, "still broken").unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(calls.lock().map(|n| *n).unwrap_or_default(), 2);
        let _ = tx.send(true);
        let _ = task.await;
    }

    /// While the process is out of descriptors (EMFILE) or memory (ENOMEM), a read fails
    /// with an error that says nothing of the file: the poll sees no change in it, so no
    /// reload starts then, nor another once reads work again. A file that goes missing
    /// is still a change.
    #[tokio::test(start_paused = true)]
    async fn a_read_that_fails_for_want_of_descriptors_is_not_a_change() {
        use std::sync::atomic::{AtomicI32, Ordering};
        // The errno the reader fails with; 0: it reads.
        static FAIL: AtomicI32 = AtomicI32::new(0);
        fn reader(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
            match FAIL.load(Ordering::SeqCst) {
                0 => read_file(path),
                errno => Err(std::io::Error::from_raw_os_error(errno)),
            }
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("portcullis.toml");
        std::fs::write(&file, "good").unwrap_or_else(|e| panic!("{e}"));
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "cert").unwrap_or_else(|e| panic!("{e}"));
        let digest = crate::util::sha256(b"good");
        let calls = Arc::new(Mutex::new(0u32));
        let count = || calls.lock().map(|n| *n).unwrap_or_default();
        let (tx, rx) = watch::channel(false);
        let (f, c, k) = (file.clone(), calls.clone(), cert.clone());
        let task = tokio::spawn(run_with(
            reader,
            FAST,
            move || vec![(f.clone(), Some(digest)), (k.clone(), None)],
            move || {
                let c = c.clone();
                async move {
                    if let Ok(mut n) = c.lock() {
                        *n += 1;
                    }
                    true
                }
            },
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        for errno in
            [24 /* EMFILE */, 12 /* ENOMEM */, 23 /* ENFILE */, 5 /* EIO */]
        {
            FAIL.store(errno, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(count(), 0, "errno {errno}: a failed read was taken for a change");
            FAIL.store(0, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(count(), 0, "errno {errno}: reads working again were a change");
        }
        std::fs::remove_file(&cert).unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(count(), 1, "a file gone missing is a change");
        let _ = tx.send(true);
        let _ = task.await;
    }
}
