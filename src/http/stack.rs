//! The HTTP service stack, outermost layer first. Each line says why it is there.

use std::sync::Arc;

use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use tower::ServiceBuilder;
use tower_http::sensitive_headers::{
    SetSensitiveRequestHeadersLayer, SetSensitiveResponseHeadersLayer,
};

use super::access_log::AccessLogLayer;
use super::audit_gate::AuditGate;
use super::proxy::{Proxy, Shared};
use super::ConnInfo;
use crate::audit::AuditSink;

/// Builds the per-connection service.
pub fn service(
    shared: Arc<Shared>,
    sink: AuditSink,
    conn: ConnInfo,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<super::access_log::AuditBody>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    let health = sink.health();
    ServiceBuilder::new()
        // Credentials are marked sensitive first, so no layer's Debug or trace output
        // can ever print a token or cookie.
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE]))
        .layer(SetSensitiveResponseHeadersLayer::new([SET_COOKIE]))
        // Exactly one audit event per request, rejections included; it sees the final
        // status and counts the response body to its end.
        // It also marks the request in flight until its body ends, so the connection
        // is not closed as idle meanwhile.
        .layer(AccessLogLayer::new(sink, conn.clone()))
        // Fail closed (`[audit] on_failure = "reject"`): nothing passes while the audit
        // log is not being written. Inside the access log, so the refusal is audited too.
        // The phases: own endpoints → path → route → authenticate → authorize → forward.
        .service(AuditGate::new(Proxy::new(shared.clone(), conn), shared, health))
}
