//! `portcullis dev floor`: the proxy with everything portcullis adds taken out — the same
//! hyper server settings ([`crate::server::http_server_builder`]), the same pooled
//! upstream client ([`crate::http::upstream::client`]) and the same runtime, but no
//! identity, policy, header hygiene or audit. It forwards every request to one upstream.
//!
//! It exists for `benches/load.sh`: beside nginx and HAProxy it separates what the HTTP
//! stack costs from what portcullis's own work costs. It is plain HTTP only, refuses to
//! bind anything but loopback, and is never part of a served configuration.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

use crate::http::body::{ClientBody, ProxyBody, RequestBody};

/// Serves until the process is stopped.
pub async fn run(listen: SocketAddr, upstream: &str) -> Result<(), String> {
    if !listen.ip().is_loopback() {
        return Err(format!("dev floor binds loopback only, not {listen}"));
    }
    let base: Uri = upstream.parse().map_err(|e| format!("--upstream {upstream}: {e}"))?;
    let (Some(scheme), Some(authority)) = (base.scheme().cloned(), base.authority().cloned())
    else {
        return Err(format!("--upstream {upstream}: expected http://host:port"));
    };
    let client =
        crate::http::upstream::client(&scheme, &authority, None, false, Duration::from_secs(5))?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("bind {listen}: {e}"))?;
    let ready =
        format!("ready floor on http://{}\n", listener.local_addr().map_err(|e| e.to_string())?);
    // `println!` would panic on a stdout whose reader is gone: say so and exit 1.
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        out.write_all(ready.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))?;
    }
    let builder = Arc::new(crate::server::http_server_builder(
        Duration::from_secs(75),
        crate::config::DEFAULT_MAX_HEADER_SIZE,
    ));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (client, builder) = (client.clone(), builder.clone());
        tokio::spawn(async move {
            let svc = tower::service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                async move { Ok::<_, Infallible>(forward(&client, req).await) }
            });
            let svc = TowerToHyperService::new(svc);
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
        });
    }
}

async fn forward(
    client: &crate::http::upstream::UpstreamClient,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let Some(pq) = parts.uri.path_and_query().cloned() else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = Uri::from(pq);
    let h2 = parts.version == http::Version::HTTP_2;
    parts.version = http::Version::HTTP_11;
    let body = RequestBody::new(ClientBody::new(body, h2), Default::default());
    match client.send(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(|b| ProxyBody::upstream(b, None)),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::empty());
    *r.status_mut() = code;
    r
}
