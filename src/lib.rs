//! Portcullis: an identity-aware reverse proxy.
//!
//! Every request walks one path, and each step fails closed:
//!
//! ```text
//! route -> authenticate -> authorize -> forward (or reject) -> audit
//! ```
//!
//! Module map, in the order a request meets them:
//!
//! - [`tls`]: rustls server configuration, SNI certificate selection, upstream client TLS.
//! - [`server`]: listeners, accept loops, graceful drain, reload orchestration.
//! - [`http`]: the tower stack (`http::stack` lists every layer), routing, path
//!   normalization, header hygiene, forwarding, the upstream identity assertion.
//! - [`identity`]: credential extraction, issuer registry, JWKS cache, JWT verification,
//!   [`identity::Identity`] and its normalized [`identity::CiContext`].
//! - [`session`]: browser SSO: OpenID Connect login, sealed session cookies, refresh.
//! - [`policy`]: per-route TOML policies compiled once, evaluated per request into a
//!   [`policy::Decision`] that names the deciding rule and its `file:line`.
//! - [`postgres`]: database routes: PostgreSQL wire protocol, token as password over TLS,
//!   upstream SCRAM with credentials only the proxy holds, per-statement audit.
//! - [`audit`]: the one JSON event per request, written off the hot path.
//! - [`store`]: the optional store replicas share (Redis): single-use tokens and sign-outs.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on a separate listener.
//! - [`config`]: raw serde types, compilation into typed values, `file:line:col` diagnostics.
//! - [`dev`]: the embedded development issuer and echo upstream behind `portcullis demo`.
//! - [`reason`]: the closed set of stable reason codes shared by responses, logs and metrics.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
mod bounded;
pub mod config;
pub mod dev;
pub mod diag;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod postgres;
pub mod reason;
pub mod review;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod util;
