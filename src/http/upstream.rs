//! Upstream HTTP clients: one pooled hyper client per route, speaking HTTP/1.1, HTTP/2
//! (ALPN over TLS, or prior knowledge for `h2c://`), with the route's CA.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::RequestBody;
use crate::config::RouteSettings;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// Builds the client for a route.
pub fn client_for(route: &RouteSettings) -> Result<UpstreamClient, String> {
    client(route.upstream.ca.as_deref(), route.upstream.h2c, route.connect_timeout)
        .map_err(|e| format!("route `{}`: {e}", route.name))
}

/// The pooled client with these settings (also used by `dev floor`).
pub fn client(
    ca: Option<&std::path::Path>,
    h2c: bool,
    connect_timeout: std::time::Duration,
) -> Result<UpstreamClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let tls = crate::tls::client_config(ca, false).map_err(|e| e.to_string())?;
    // hyper-rustls sets ALPN itself from the enabled protocols.
    let mut tls = Arc::unwrap_or_clone(tls);
    tls.alpn_protocols.clear();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let connector = if h2c {
        builder.wrap_connector(http)
    } else {
        builder.enable_http2().wrap_connector(http)
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .http2_only(h2c);
    Ok(b.build(connector))
}
