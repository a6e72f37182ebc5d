//! Integration tests: one binary (fast to link on 2 cores), real TLS on loopback, a
//! real upstream server, the in-process dev issuer serving discovery + JWKS.
//!
//! Index:
//! - `support`: the test world (issuer, upstream, proxy, client) and helpers.
//! - `proxy`: routing, authentication, authorization, responses, audit events.
//! - `checklist`: every token validation rule (V1–V27) end to end through the proxy.
//! - `forwarding`: header hygiene, identity headers and the signed assertion, streaming,
//!   WebSocket, HTTP/2 both sides, timeouts, upstream failures, size limits.
//! - `grpc`: gRPC-style calls (HTTP/2 client, h2c and HTTPS upstreams) get `te: trailers`
//!   through and their trailers back; no `TE` ever reaches an HTTP/1.1 upstream.
//! - `claim_headers`: a route's `claim_headers` forward verified claims (every JSON
//!   shape, cache hits, another token of the same principal, a browser session's kept
//!   claims), and a client's own copies never reach the upstream (with and without the
//!   claim, public rules, CORS preflights, HTTP/2); bad names refused at load.
//! - `public`: requests let through without a credential: CORS preflights on a
//!   `cors_preflight` route, and paths a policy's `public = true` rules open; hygiene
//!   still applies, no identity reaches the upstream, a bad token is still refused.
//! - `strip_prefix`: routes that forward the path less their prefix (HTTP/1.1, HTTP/2,
//!   WebSocket, reload) while policies and the audit event keep the client's path;
//!   `X-Forwarded-Prefix` set by the proxy alone (or appended to a trusted proxy's);
//!   the prefix put back into the answer's redirects and cookie paths.
//! - `hoarding`: clients that take nothing of what they are sent (HTTP/2 windows kept
//!   closed, HTTP/1.1 never read, a close never finished) lose their slots in time; slow
//!   but steady readers are not cut.
//! - `http2_abuse`: HTTP/2 abuse the server refuses at the frame level (rapid reset,
//!   streams it must reset itself) is audited, one event per connection.
//! - `per_client`: `server.max_connections_per_client`: an address at its limit is reset
//!   while another (127.0.0.2) is served, on the HTTP and database listeners alike, and a
//!   closed connection, ended session or WebSocket tunnel frees its place.
//! - `unread_bodies`: HTTP/2 requests the proxy refuses while their body is still arriving
//!   get their answer without a stream reset (the raw `h2` client and the system `curl`);
//!   what is left of the body is discarded only up to 1 MiB and 3 s.
//! - `upstream_abuse`: a hostile or broken upstream: a response body that stops coming
//!   is cut after the route's `read_timeout` and audited (a steady stream and a slow
//!   reader are not cut); answer headers that would speak for the proxy's origin (a
//!   service worker's scope, `Alt-Svc`, `NEL`) or instruct a web server in front of it
//!   (a real nginx, `X-Accel-Redirect`).
//! - `wire`: raw bytes between a client, the proxy and a raw upstream: methods and
//!   framings the proxy must not carry, upstream answers it must not misread.
//! - `lifecycle`: reload (good, bad, via file watcher), graceful drain, readiness, metrics.
//! - `cli`: the real binary: `check` diagnostics, the shipped examples (configs, and CI
//!   files parsed as YAML), and the README's demo flow.
//! - `docs`: every ```toml snippet of the README, `docs/` and `policies/README.md`,
//!   marked with what it is (a configuration, a part of one, a policy), passes `check`;
//!   and the documentation against the code: every configuration key, restart-only
//!   setting and client error code is documented, every `portcullis` command shown in
//!   the docs and the examples' CI files takes its flags.
//! - `review`: shadow policies through the proxy, policy revisions in audit events,
//!   and `portcullis policy test/explain/who/diff` as a pipeline runs them.
//! - `browser`: headless Chromium signs in at npm `oidc-provider` through the proxy.
//! - `sso`: browser sign-in with a cookie-keeping client against the dev issuer.
//! - `pg`: PostgreSQL routes against a real PostgreSQL server (initdb in a temp dir) with
//!   `psql`, `pgbench` and `tokio-postgres`: roles per rule, denials, plaintext and bad
//!   input, extended protocol, COPY, cancel, notifications, expiry, revocation, drain.
//! - `pg_audit`: the statement audit follows the server on raw wire messages: a Parse the
//!   server refused cannot forge a statement's text, long names, FunctionCall.
//! - `pg_auth`: the upstream leg against that server: md5 and cleartext password
//!   authentication (right and wrong passwords, cleartext refused off loopback without
//!   TLS), upstream TLS `require`/`verify-full` (wrong CA, wrong name) and `disable`
//!   against a `hostssl`-only role; impostor upstreams that skip or weaken authentication.
//! - `pg_front`: the database front on raw bytes: PostgreSQL 17 direct TLS (ALPN
//!   required), newer protocol versions and `_pq_.` options negotiated down to 3.0,
//!   replication startups, repeated parameters and encryption requests, length limits,
//!   psql's cancel served while every `max_connections` slot is taken, and the bound on
//!   sessions waiting for one.
//! - `pg_session`: a session that leaves UTF8 is ended (and what it pipelined before is
//!   audited as uncertain), clients that stop reading at expiry and at shutdown, cancel
//!   keys across routes.
//! - `pg_reload`: database routes added, removed, moved and renamed by a reload, a reload
//!   whose listener cannot bind, and the `portcullis_pg_*` metrics.
//! - `interop`: a real OpenID provider (npm `oidc-provider`) issuing JWT access tokens,
//!   key rotation included.

mod browser;
mod checklist;
mod claim_headers;
mod cli;
mod docs;
mod forwarding;
mod grpc;
mod hoarding;
mod http2_abuse;
mod interop;
mod lifecycle;
mod per_client;
mod pg;
mod pg_audit;
mod pg_auth;
mod pg_front;
mod pg_reload;
mod pg_session;
mod proxy;
mod public;
mod redis;
mod review;
mod sso;
mod strip_prefix;
mod support;
mod unread_bodies;
mod upstream_abuse;
mod wire;
