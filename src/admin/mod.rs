//! The admin listener (loopback by default): `/healthz`, `/readyz`, `/metrics`, and the
//! assertion JWKS for upstreams that prefer to fetch it out of band.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

use crate::audit::{AuditHealth, AuditStatus};
use crate::http::proxy::{Shared, JWKS_PATH};

/// Answers one admin request. On a loopback listener, a `Host` that is a DNS name
/// (other than `localhost` and `*.localhost`) is refused (see `local_host`).
pub fn respond<B>(
    shared: &Arc<Shared>,
    draining: bool,
    audit: AuditStatus,
    loopback: bool,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let foreign_host = loopback
        && req.headers().get(http::header::HOST).is_some_and(|h| !local_host(h.as_bytes()));
    let path = if foreign_host { "" } else { req.uri().path() };
    let (status, ctype, body) = match path {
        "" => (
            StatusCode::MISDIRECTED_REQUEST,
            "text/plain",
            Bytes::from_static(b"misdirected request\n"),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" => {
            let rt = shared.runtime.load();
            let issuers: serde_json::Map<String, serde_json::Value> = rt
                .verifier
                .issuer_status()
                .into_iter()
                .map(|(id, ok)| (id.to_string(), serde_json::Value::Bool(ok)))
                .collect();
            // Audit events not reaching their output: take this replica out of rotation
            // rather than serve requests that leave no trace.
            // With a shared store, not before the other replicas' sign-outs are read
            // back once: a replica just started would otherwise accept their cookies.
            let synced = shared.sign_outs_loaded();
            let ready = !draining && rt.verifier.ready() && audit == AuditStatus::Ok && synced;
            let mut body = serde_json::json!({
                "ready": ready,
                "draining": draining,
                "audit": audit.as_str(),
                "generation": rt.generation,
                "policy_revision": &*rt.revision,
                "issuers_keys_loaded": issuers,
            });
            if shared.store.is_some() {
                body["shared_sign_outs_loaded"] = serde_json::Value::Bool(synced);
            }
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, "application/json", Bytes::from(body.to_string()))
        }
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from({
                let rt = shared.runtime.load();
                let databases: Vec<_> =
                    rt.config.databases.iter().map(|d| d.name.clone()).collect();
                crate::metrics::global().render_for(&databases, &rt.tls_certificates)
            }),
        ),
        JWKS_PATH => (
            StatusCode::OK,
            "application/json",
            shared.runtime.load().signer.jwks(crate::util::unix_now()),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"not found\n")),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Whether a `Host` names this machine by address or as `localhost` (`*.localhost`):
/// what a probe or a scrape of a loopback listener sends. A DNS name is what a
/// DNS-rebinding page sends (a name of the attacker's that resolved to 127.0.0.1 a moment
/// after the page loaded, so the browser lets the page read the answers): refused, so no
/// page a person on this machine opens can read `/metrics` or `/readyz`. A name of one
/// label (`metrics`, `wpad`) is refused too: a name the machine's DNS does not know is
/// asked of the local network by LLMNR, mDNS or NetBIOS (Windows, macOS, many Linux
/// desktops), where any host may answer it with its own address, then with 127.0.0.1.
fn local_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else { return false };
    if let Some(v6) = host.strip_prefix('[') {
        return v6
            .split_once(']')
            .is_some_and(|(ip, port)| ip.parse::<std::net::Ipv6Addr>().is_ok() && is_port(port));
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if is_number(port) => name,
        Some(_) => return false,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
}

/// Empty, or `:` and a port number.
fn is_port(s: &str) -> bool {
    s.is_empty() || s.strip_prefix(':').is_some_and(is_number)
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// How long an admin connection has to send its request. Probes and scrapes send theirs
/// at once; a silent connection is closed after this, and sooner when a new connection
/// needs its place ([`Slot::evict`]).
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// An admin connection's place among those served at once, as the accept loop sees it.
#[derive(Debug, Default)]
pub struct Slot {
    /// [`WAITING`], [`SERVING`] or [`EVICTED`].
    state: AtomicU8,
    evicted: tokio::sync::Notify,
}

const WAITING: u8 = 0;
const SERVING: u8 = 1;
const EVICTED: u8 = 2;

impl Slot {
    /// Closes the connection if it has not sent a request yet (then it has nothing to
    /// lose); true if it did. A connection being answered is never cut.
    pub fn evict(&self) -> bool {
        let evicted = self
            .state
            .compare_exchange(WAITING, EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if evicted {
            self.evicted.notify_one();
        }
        evicted
    }
}

/// Serves the admin endpoints on an accepted connection: one request, which must start
/// within [`FIRST_REQUEST_TIMEOUT`]; the connection is closed after `lifetime` at most,
/// or as soon as it is evicted while still waiting for its request.
pub async fn serve_connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    audit: AuditHealth,
    slot: Arc<Slot>,
    lifetime: Duration,
) {
    let s = slot.clone();
    let loopback = stream.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let _ = s.state.compare_exchange(WAITING, SERVING, Ordering::AcqRel, Ordering::Acquire);
        let draining = draining.load(Ordering::Relaxed);
        let r = respond(&shared, draining, audit.status(), loopback, &req);
        async move { Ok::<_, Infallible>(r) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let serve = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(FIRST_REQUEST_TIMEOUT)
        .serve_connection(io, svc);
    // Silent past FIRST_REQUEST_TIMEOUT: hyper's header-read timer ends `serve`.
    tokio::select! {
        _ = serve => {}
        () = slot.evicted.notified() => {
            tracing::debug!("closing an admin connection that sent no request");
        }
        () = tokio::time::sleep(lifetime) => {
            tracing::debug!(lifetime_s = lifetime.as_secs(), "closing admin connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::local_host;

    #[test]
    fn only_addresses_and_localhost_name_a_loopback_admin_listener() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9090",
            "[::1]",
            "[::1]:9090",
            "localhost",
            "LOCALHOST:9090",
            "localhost.",
            "app.localhost:9090",
            "10.0.0.7:9090",
        ] {
            assert!(local_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9090",
            "metrics",
            "wpad:9090",
            "portcullis.:9090",
            "2130706433",
            "127.0.0.1.nip.io",
            "localhost.evil.example",
            "127.0.0.1:",
            "127.0.0.1:90a",
            "[::1",
            "[evil]:9090",
            "::1",
            "",
            "\u{ff}",
        ] {
            assert!(!local_host(bad.as_bytes()), "{bad}");
        }
    }
}
