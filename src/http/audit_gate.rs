//! Fail closed on audit: with `[audit] on_failure = "reject"`, no request is let
//! through while the audit log is not being written (its output failing or taking
//! nothing, or its queue too full to take the request's event), so there is no access
//! without a trace. It acts on the present state only: requests are admitted again as
//! soon as the output takes events and the queue has room.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower::Service;

use super::body::{ClientBody, ProxyBody};
use super::proxy::{Outcome, Proxy, Shared};
use super::RequestId;
use crate::audit::{AuditHealth, AuditStatus};
use crate::config::AuditOnFailure;
use crate::reason::Reason;

/// Answers 503 `audit-unavailable` instead of calling the proxy while the audit sink is
/// unhealthy now ([`AuditHealth::present`]) and the configuration says `on_failure = "reject"` (read per request, so a
/// reload applies at once).
#[derive(Clone)]
pub struct AuditGate {
    inner: Proxy,
    shared: Arc<Shared>,
    health: AuditHealth,
}

impl AuditGate {
    pub fn new(inner: Proxy, shared: Arc<Shared>, health: AuditHealth) -> Self {
        Self { inner, shared, health }
    }
}

impl Service<Request<ClientBody>> for AuditGate {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = <Proxy as Service<Request<ClientBody>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let status = self.health.present();
        if status == AuditStatus::Ok {
            return self.inner.call(req);
        }
        let rt = self.shared.runtime.load();
        if rt.config.audit_on_failure != AuditOnFailure::Reject {
            return self.inner.call(req);
        }
        let rid = match req.extensions().get::<RequestId>() {
            Some(r) => r.id.clone(),
            None => super::next_request_id(),
        };
        let mut resp = super::reject::response(Reason::AuditUnavailable, &rid);
        resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        resp.extensions_mut().insert(Outcome {
            path: None,
            upstream_path: None,
            route: None,
            reason: Reason::AuditUnavailable,
            detail: Some(Cow::Owned(format!(
                "refused: the audit log is {} (on_failure = \"reject\")",
                status.as_str()
            ))),
            rule: None,
            shadow: None,
            identity: None,
            upstream: None,
            revision: Some(rt.revision.clone()),
            bytes_in: Arc::new(AtomicU64::new(0)),
            decision: "error",
        });
        Box::pin(async move { Ok(resp) })
    }
}
