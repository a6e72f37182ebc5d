//! Upstream HTTP clients, one per route. Plain-HTTP/1.1 upstreams use the lean pool in
//! [`super::pool`]; HTTPS (HTTP/1.1 or HTTP/2 by ALPN, with the route's CA) and `h2c://`
//! (HTTP/2 with prior knowledge) use hyper-util's pooled client.
//!
//! hyper-util's pool gets the reuse rule of [`super::pool`] for HTTP/1.1 connections: one
//! whose request carried body bytes and was answered with a status of 300 or more (any
//! status, for a `GET`, `HEAD` or `DELETE`), or answered before its body was sent to its
//! end, is poisoned (never handed out again), as
//! the upstream may not have read that body and may read it next as a request of its own;
//! so is one that answered a `HEAD`, or any request with a 204 or 304 announcing a body
//! (a bodiless `GET` too: every HTTP/1.1 exchange is captured for this), whose body a
//! broken upstream may write after the head, to be read as the next request's answer. HTTP/2 connections (by ALPN, or h2c) are left alone: streams are framed, an unread body
//! is never read as a request. The poison comes when the answer's head is back; hyper-util
//! puts a connection back as soon as its exchange is over, so an answer whose body is
//! empty or fits in one read may be back in the pool a moment before: a request checking
//! out a connection for that same upstream in that moment (on another thread) can still get it.
//!
//! `TE`: the proxy forwards at most `te: trailers` (set only when the client's `TE` lists
//! `trailers`), and only on an HTTP/2 hop (RFC 9113 §8.2.2; gRPC clients send it and
//! servers may require it): to an `h2c://` upstream, and to an `https://` one for a gRPC
//! request (`content-type: application/grpc…`), which goes through a client offering ALPN
//! `h2` alone, since which protocol the shared client's connection speaks is known only
//! once the request has been handed to it. Everything else loses it: TE is hop-by-hop in
//! HTTP/1.1.

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{capture_connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::RequestBody;
use super::pool::{H1Pool, PoolError, PooledBody, Progress, Sent};
use crate::config::RouteSettings;

type HyperClient = Client<HttpsConnector<HttpConnector>, Sent<RequestBody>>;

/// hyper-util's clients for an HTTPS or h2c upstream.
#[derive(Clone)]
struct General {
    pooled: HyperClient,
    /// For requests offering an `Upgrade`: after an upgrade the upstream declined, the
    /// connection's state is the upstream's word alone (a careless one may have switched
    /// anyway), so it is never reused (as in [`super::pool`]).
    unpooled: HyperClient,
    /// HTTP/2 with prior knowledge: no HTTP/1.1 connection to poison.
    h2c: bool,
    /// An `https://` upstream offered ALPN `h2` alone, for gRPC requests (`te: trailers`
    /// goes to HTTP/2 only, and the hop to `pooled` may turn out HTTP/1.1 once its
    /// connection is made, too late to take a header back); `None` for h2c, whose
    /// `pooled` client speaks HTTP/2 already.
    grpc: Option<HyperClient>,
}

/// A route's upstream client.
#[derive(Clone)]
pub struct UpstreamClient {
    scheme: Scheme,
    authority: Authority,
    /// `authority` as a Host header, built once.
    host: HeaderValue,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    H1(H1Pool),
    General(Box<General>),
}

/// Why an upstream request failed (the cause chain goes to the log, never to clients).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    General(#[from] hyper_util::client::legacy::Error),
}

impl UpstreamClient {
    /// The upstream's authority as a `Host` header value.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Sends a request whose URI is origin-form (`/path?query`) to this upstream; a
    /// request without `Host` gets the upstream's authority.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        if !matches!(&self.kind, Kind::General(g) if g.h2c) {
            announce_chunked_body(&mut req);
        }
        match &self.kind {
            Kind::H1(pool) => {
                // TE is hop-by-hop in HTTP/1.1 (and would have to be listed in `Connection`).
                req.headers_mut().remove(header::TE);
                Ok(pool.send(req).await?)
            }
            Kind::General(client) => {
                // `te: trailers` (the proxy sets no other value) goes to an HTTP/2 hop
                // only: h2c, or for a gRPC request the `h2`-only client; anything else
                // over HTTPS may get an HTTP/1.1 connection.
                let grpc = client.grpc.as_ref().filter(|_| {
                    req.headers().get(header::TE).is_some_and(|v| v == "trailers")
                        && is_grpc(req.headers())
                });
                if !client.h2c && grpc.is_none() {
                    req.headers_mut().remove(header::TE);
                }
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(self.scheme.clone());
                parts.authority = Some(self.authority.clone());
                parts.path_and_query = req.uri().path_and_query().cloned();
                *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
                let upgrade = req.headers().contains_key(header::UPGRADE);
                // Every HTTP/1.1 exchange is captured, a bodiless `GET` too: any answer
                // may be a 204 or 304 announcing a body (a conditional `GET`'s 304 with
                // `Transfer-Encoding`), whose late body the next request would read, and
                // which of them is only known once the head is back. (An upgrade's
                // connection is never pooled; HTTP/2, h2c or a gRPC call's, is framed.)
                let http2 = client.h2c || grpc.is_some();
                let watch = !upgrade && !http2;
                let sent = Progress::of(req.method());
                let mut req = req.map(|b| Sent::new(b, sent.clone()));
                let conn = watch.then(|| capture_connection(&mut req));
                let pool = match grpc {
                    _ if upgrade => &client.unpooled,
                    Some(grpc) => grpc,
                    None => &client.pooled,
                };
                let resp = pool.request(req).await?;
                if let Some(conn) = conn {
                    if !sent.reusable_after(&resp) {
                        if let Some(c) = conn.connection_metadata().as_ref() {
                            if !c.is_negotiated_h2() {
                                c.poison();
                            }
                        }
                    }
                }
                Ok(resp.map(PooledBody::unpooled))
            }
        }
    }
}

/// A gRPC request (`application/grpc`, `application/grpc+proto`, …; not gRPC-Web, which
/// works over HTTP/1.1 and carries its trailers in the body).
fn is_grpc(h: &http::HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.get(..GRPC.len()).is_some_and(|p| p.eq_ignore_ascii_case(GRPC))
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// hyper's HTTP/1.1 client frames a `GET` or `HEAD` whose body has no known length
/// (a chunked HTTP/1.1 body, HTTP/2 DATA without `content-length`) as bodiless
/// ("almost never have bodies"): it sent the head alone and never read the body, so
/// Elasticsearch's `GET /_search` with a JSON query reached its upstream empty. Such a
/// request is sent `Transfer-Encoding: chunked`, streamed as any other body; a request
/// with a `Content-Length` is sent by it, one with no body at all stays bodiless (hyper
/// drops the header when the body is empty from the start), and an HTTP/2 upstream never
/// sees the header (hyper removes it; DATA frames carry the body).
fn announce_chunked_body(req: &mut Request<RequestBody>) {
    if matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        && !req.body().is_end_stream()
        && !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        req.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
}

/// The origin-form URI of `target` (`/path?query`).
pub fn origin_form(target: String) -> Result<Uri, http::uri::InvalidUri> {
    PathAndQuery::from_maybe_shared(bytes::Bytes::from(target)).map(Uri::from)
}

/// Builds the client for a route.
pub fn client_for(route: &RouteSettings) -> Result<UpstreamClient, String> {
    let u = &route.upstream;
    client(&u.scheme, &u.authority, u.ca.as_deref(), u.h2c, route.connect_timeout)
        .map_err(|e| format!("route `{}`: {e}", route.name))
}

/// The client for one upstream (also used by `dev floor`).
pub fn client(
    scheme: &Scheme,
    authority: &Authority,
    ca: Option<&std::path::Path>,
    h2c: bool,
    connect_timeout: std::time::Duration,
) -> Result<UpstreamClient, String> {
    let kind = if *scheme == Scheme::HTTP && !h2c {
        let port = authority.port_u16().unwrap_or(80);
        Kind::H1(H1Pool::new(&format!("{}:{port}", authority.host()), connect_timeout))
    } else {
        Kind::General(Box::new(general(ca, h2c, connect_timeout)?))
    };
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|_| format!("upstream authority `{authority}` is not a valid Host"))?;
    Ok(UpstreamClient { scheme: scheme.clone(), authority: authority.clone(), host, kind })
}

fn general(
    ca: Option<&std::path::Path>,
    h2c: bool,
    connect_timeout: std::time::Duration,
) -> Result<General, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let tls = crate::tls::client_config(ca, false).map_err(|e| e.to_string())?;
    // hyper-rustls sets ALPN itself from the enabled protocols.
    let mut tls = Arc::unwrap_or_clone(tls);
    tls.alpn_protocols.clear();
    let builder =
        || hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls.clone()).https_or_http();
    let connector = if h2c {
        builder().enable_http1().wrap_connector(http.clone())
    } else {
        builder().enable_http1().enable_http2().wrap_connector(http.clone())
    };
    let client = |connector: &HttpsConnector<HttpConnector>, max_idle, http2_only| {
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .pool_max_idle_per_host(max_idle)
            .http2_only(http2_only);
        b.build(connector.clone())
    };
    let grpc = (!h2c).then(|| client(&builder().enable_http2().wrap_connector(http), 256, true));
    Ok(General {
        pooled: client(&connector, 256, h2c),
        unpooled: client(&connector, 0, h2c),
        h2c,
        grpc,
    })
}
