//! The process's tokio runtime: which one to build, and how it ends.
//!
//! The runtime ends once the command's future has returned, and for `serve` that is
//! after the drain: every connection closed, every audit event written and flushed
//! ([`super::Server::shutdown`]). What is left then is not worth waiting for — and
//! dropping a runtime waits, without bound, for every blocking thread still running:
//! a DNS lookup of a JWKS refresh or an upstream connect (`getaddrinfo` cannot be
//! cancelled) held the exit for as long as the resolver took, seconds with a slow or
//! unreachable one. So the runtime's worker threads get [`EXIT_WAIT`] to drop the
//! remaining tasks, and threads still blocked after that are left to the process's exit.

use std::future::Future;
use std::time::Duration;

/// The most the exit waits for the runtime's threads once the command is done.
pub const EXIT_WAIT: Duration = Duration::from_millis(100);

/// Runs `f` to completion on a new runtime, then ends the runtime without waiting for
/// blocking threads longer than [`EXIT_WAIT`].
///
/// One CPU (taskset, a container's CPU quota): a current-thread runtime, which does the
/// same work as a one-worker multi-thread runtime without its cross-thread scheduling
/// (measured on the load test's hyper floor: 15.1 → 13.0 µs CPU per request). More
/// CPUs: the work-stealing runtime, one worker per CPU. `TOKIO_WORKER_THREADS` forces
/// the work-stealing runtime.
pub fn run<F, Fut>(f: F) -> Result<(), String>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1)
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none();
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = builder.enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = rt.block_on(f());
    rt.shutdown_timeout(EXIT_WAIT);
    result
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{run, EXIT_WAIT};

    #[test]
    fn a_blocking_call_still_running_does_not_hold_the_exit() {
        let start = Instant::now();
        let result = run(|| async {
            // As a DNS lookup to a resolver that does not answer.
            let (started, running) = tokio::sync::oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let _ = started.send(());
                std::thread::sleep(Duration::from_secs(5));
            });
            running.await.map_err(|e| e.to_string())
        });
        let took = start.elapsed();
        assert_eq!(result, Ok(()));
        assert!(took < EXIT_WAIT + Duration::from_secs(1), "the exit waited {took:?}");
    }

    #[test]
    fn the_command_result_is_returned() {
        assert_eq!(run(|| async { Err::<(), _>("no".to_string()) }), Err("no".to_string()));
        assert_eq!(run(|| async { Ok(()) }), Ok(()));
    }
}
