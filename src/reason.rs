//! Stable reason codes: one closed enum used in responses, audit events and metrics.
//!
//! The *code* (kebab-case) is precise and goes to the log. The *public code* is what a
//! client may learn: coarse enough that a rejected caller cannot probe which check failed.

use http::StatusCode;

/// Why a request was allowed or rejected. Codes never change once published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A policy rule allowed the request.
    Allowed,
    /// A `public = true` policy rule allowed the request: one without any credential
    /// (the event names the rule and no identity), or a caller's whose credential was
    /// verified first.
    Public,
    /// A CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`, no
    /// credential) forwarded without authentication on a `cors_preflight = true` route.
    CorsPreflight,
    /// Served by the proxy itself (JWKS of the upstream assertion, for example).
    Internal,
    /// No route matches host + path (+ method).
    NoRoute,
    /// TLS SNI names a different host than the request's authority.
    MisdirectedRequest,
    /// The path is ambiguous: encoded slash or backslash, `..` or `.` segment, `;`, NUL.
    AmbiguousPath,
    /// The request is malformed in a way that is not about the path.
    BadRequest,
    /// TRACE/TRACK: refused on every route, since the upstream's reflection would hand the
    /// caller the identity headers and the signed assertion the proxy added; CONNECT
    /// likewise (a tunnel request: only WebSocket upgrades are tunnelled).
    MethodNotAllowed,
    /// More than one credential was presented (two Authorization headers, cookie + bearer).
    AmbiguousCredentials,
    /// No bearer token on a route that needs one.
    MissingToken,
    /// Not a compact JWS, bad base64url, bad JSON, duplicate members, oversized.
    MalformedToken,
    /// The header names an algorithm outside the issuer's allowlist (or `none`/`HS*`).
    DisallowedAlgorithm,
    /// The header carries something the proxy refuses: `crit`, `jku`, `x5u`, `jwk`, `x5c`, `cty`.
    ForbiddenHeader,
    /// `typ` says this is the wrong kind of token for the issuer (e.g. `at+jwt` as an ID token).
    WrongTokenType,
    /// `iss` matches no configured issuer. Nothing is fetched.
    UnknownIssuer,
    /// The issuer's keys are not loaded (never fetched, or stale beyond the window).
    IssuerUnavailable,
    /// No key with the token's `kid`, even after one refresh.
    UnknownKey,
    /// The signature does not verify.
    InvalidSignature,
    /// `exp` is in the past (beyond leeway).
    TokenExpired,
    /// `nbf` is in the future (beyond leeway).
    TokenNotYetValid,
    /// `iat` is in the future, or older than the issuer's max token age.
    TokenIssuedAt,
    /// `aud` does not contain a configured audience.
    AudienceMismatch,
    /// `azp` is wrong or missing where required.
    AuthorizedPartyMismatch,
    /// A required claim is missing or has the wrong JSON type.
    InvalidClaims,
    /// A person's ID token without an `acr` of the classes the issuer's `login` asks
    /// for (`acr_values`): the authentication context a browser sign-in must show.
    AcrMismatch,
    /// The token was already used on a route that demands single use.
    TokenReplayed,
    /// A single-use route could not ask the shared store (`[redis]`) whether another
    /// replica saw the token: refused (503) rather than risk a replay.
    ReplayCheckUnavailable,
    /// Explicitly denied by a `deny` rule.
    DeniedByRule,
    /// No allow rule matched (default deny).
    PolicyDenied,
    /// A group rule could not be evaluated because the token signals group overage.
    GroupsUnknown,
    /// The request body exceeded the route's limit.
    PayloadTooLarge,
    /// The upstream could not be reached or failed mid-response.
    UpstreamUnavailable,
    /// The upstream did not answer within the route's timeout.
    UpstreamTimeout,
    /// The proxy failed in a way that is its own fault.
    InternalError,
    /// A browser without a session was sent to sign in (302), or an API caller on a
    /// sign-in route was told to.
    LoginRequired,
    /// The sign-in callback failed: state, code exchange or ID-token checks.
    LoginFailed,
    /// The sign-in callback succeeded: a session cookie was set and the browser sent on
    /// to where it was going.
    SignedIn,
    /// `/.portcullis/logout` cleared the session cookie (and, when the provider has an
    /// end-session endpoint, sent the browser there).
    SignedOut,
    /// The session cookie is tampered, sealed with an unknown key, duplicated, or its
    /// issuer is not accepted here.
    SessionInvalid,
    /// A browser session passed its absolute or idle lifetime or could not be refreshed;
    /// or (PostgreSQL) the token that opened a database session expired, or
    /// `max_session` passed, and the session was terminated.
    SessionExpired,
    /// A browser session that was signed out (`/.portcullis/logout`) came back: a copy of
    /// its cookie (stolen, another browser profile, a tool) or the signed-out cookie
    /// itself. Treated as no session: an API caller gets 401 with the public code
    /// `login-required`, a browser navigation is sent to sign in, and the cookie is
    /// cleared. Also a session the full revocation list refuses with the oldest
    /// ([`crate::session::revoke`]).
    SessionRevoked,
    /// A return or post-logout target that is not a host this proxy serves.
    InvalidRedirect,
    /// A WebSocket handshake that a browser session would authenticate, sent by a page of
    /// another origin (cross-site WebSocket hijacking: SameSite=Lax sends the cookie
    /// from any page of the same site, and no CORS check guards a WebSocket).
    CrossOrigin,
    /// PostgreSQL: the client started a session without TLS; it is never asked for a token.
    PlaintextRefused,
    /// PostgreSQL: the client broke the wire protocol (bad lengths, unexpected messages,
    /// unencrypted data after SSLRequest, startup not finished in time).
    ProtocolViolation,
    /// PostgreSQL: a reload changed the policy (or route, or issuer) so that this identity
    /// may no longer hold the session; it was terminated.
    AccessRevoked,
    /// The server is shutting down and the grace period is over.
    ShuttingDown,
    /// PostgreSQL: the session asked for a `client_encoding` other than UTF8 (in its
    /// startup packet, or later by `SET client_encoding` / `SET NAMES`), under which the
    /// audit could no longer read statement text and names as the server does.
    UnsupportedEncoding,
    /// PostgreSQL: the startup packet carried a parameter portcullis does not forward: a
    /// non-empty `options`, or a setting outside the allow-list (`role`,
    /// `search_path`, …), which the server would apply unaudited.
    UnsupportedStartupParameter,
    /// HTTP/2: a connection's concurrent request beyond its first found every
    /// `max_connections` slot taken (each in-flight request can hold an upstream socket).
    /// PostgreSQL: a session found every slot taken and too many others already waiting
    /// for one (`53300`), or waited for one longer than the route's `startup_timeout`.
    Overloaded,
    /// `[audit] on_failure = "reject"`: audit events are not being written (the output
    /// fails, stalls or the queue overflowed), so nothing new is let through.
    AuditUnavailable,
    /// HTTP/1: a request head not finished within `server.header_timeout`; or a request
    /// body that had not come to its end when the route's `timeout` passed (status 408).
    RequestTimeout,
    /// The upstream's response body broke off (a reset, a close before its end, fewer
    /// bytes than its `Content-Length`) after its head was relayed: the client got the
    /// status logged and a truncated body. The request was allowed; the event keeps that.
    UpstreamAborted,
    /// The client went away before the response head (logged with status 499, as nginx
    /// does; nothing is sent). If the request was authorized, it may have reached the
    /// upstream: the event keeps the decision, identity and rule. Also a client gone while
    /// sending its request body (499 too), or while receiving an upstream's response body
    /// (logged with the status sent).
    ClientClosed,
    /// The client took nothing of its response for `server.send_timeout` (it did not read
    /// its socket, or kept an HTTP/2 flow-control window closed), so the connection was
    /// closed with the response undelivered, as nginx's `send_timeout` does. Logged with
    /// the status answered (a refusal's own reason is kept in `detail`, its decision
    /// unchanged); a request on the same connection still without its response head is
    /// logged 499, as the connection closed under it.
    SendTimeout,
}

impl Reason {
    /// The precise, stable kebab-case code used in logs and metrics.
    pub const fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::Public => "public",
            Reason::CorsPreflight => "cors-preflight",
            Reason::Internal => "internal",
            Reason::NoRoute => "no-route",
            Reason::MisdirectedRequest => "misdirected-request",
            Reason::AmbiguousPath => "ambiguous-path",
            Reason::BadRequest => "bad-request",
            Reason::MethodNotAllowed => "method-not-allowed",
            Reason::AmbiguousCredentials => "ambiguous-credentials",
            Reason::MissingToken => "missing-token",
            Reason::MalformedToken => "malformed-token",
            Reason::DisallowedAlgorithm => "disallowed-algorithm",
            Reason::ForbiddenHeader => "forbidden-header",
            Reason::WrongTokenType => "wrong-token-type",
            Reason::UnknownIssuer => "unknown-issuer",
            Reason::IssuerUnavailable => "issuer-unavailable",
            Reason::UnknownKey => "unknown-key",
            Reason::InvalidSignature => "invalid-signature",
            Reason::TokenExpired => "token-expired",
            Reason::TokenNotYetValid => "token-not-yet-valid",
            Reason::TokenIssuedAt => "token-issued-at",
            Reason::AudienceMismatch => "audience-mismatch",
            Reason::AuthorizedPartyMismatch => "authorized-party-mismatch",
            Reason::InvalidClaims => "invalid-claims",
            Reason::AcrMismatch => "acr-mismatch",
            Reason::TokenReplayed => "token-replayed",
            Reason::DeniedByRule => "denied-by-rule",
            Reason::PolicyDenied => "policy-denied",
            Reason::GroupsUnknown => "groups-unknown",
            Reason::PayloadTooLarge => "payload-too-large",
            Reason::UpstreamUnavailable => "upstream-unavailable",
            Reason::UpstreamTimeout => "upstream-timeout",
            Reason::InternalError => "internal-error",
            Reason::LoginRequired => "login-required",
            Reason::LoginFailed => "login-failed",
            Reason::SignedIn => "signed-in",
            Reason::SignedOut => "signed-out",
            Reason::SessionInvalid => "invalid-session",
            Reason::SessionExpired => "session-expired",
            Reason::SessionRevoked => "session-revoked",
            Reason::InvalidRedirect => "invalid-redirect",
            Reason::CrossOrigin => "cross-origin",
            Reason::PlaintextRefused => "plaintext-refused",
            Reason::ProtocolViolation => "protocol-violation",
            Reason::AccessRevoked => "access-revoked",
            Reason::ShuttingDown => "shutting-down",
            Reason::UnsupportedEncoding => "unsupported-encoding",
            Reason::UnsupportedStartupParameter => "unsupported-startup-parameter",
            Reason::Overloaded => "overloaded",
            Reason::AuditUnavailable => "audit-unavailable",
            Reason::ReplayCheckUnavailable => "replay-check-unavailable",
            Reason::RequestTimeout => "request-timeout",
            Reason::ClientClosed => "client-closed",
            Reason::UpstreamAborted => "upstream-aborted",
            Reason::SendTimeout => "send-timeout",
        }
    }

    /// The code a client sees. Every token problem collapses into `invalid-token` so a
    /// caller cannot probe which check failed; the log keeps [`Reason::code`].
    pub const fn public_code(self) -> &'static str {
        match self {
            Reason::MalformedToken
            | Reason::DisallowedAlgorithm
            | Reason::ForbiddenHeader
            | Reason::WrongTokenType
            | Reason::UnknownIssuer
            | Reason::IssuerUnavailable
            | Reason::UnknownKey
            | Reason::InvalidSignature
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::TokenIssuedAt
            | Reason::AudienceMismatch
            | Reason::AuthorizedPartyMismatch
            | Reason::InvalidClaims
            | Reason::AcrMismatch
            | Reason::TokenReplayed => "invalid-token",
            Reason::DeniedByRule | Reason::PolicyDenied | Reason::GroupsUnknown => "policy-denied",
            // As if there were no session: whoever holds a copy of a signed-out cookie
            // learns only that it must sign in.
            Reason::SessionRevoked => "login-required",
            other => other.code(),
        }
    }

    /// The HTTP status for a rejection with this reason.
    pub const fn status(self) -> StatusCode {
        match self {
            Reason::Allowed
            | Reason::Public
            | Reason::CorsPreflight
            | Reason::Internal
            | Reason::SignedIn
            | Reason::SignedOut => StatusCode::OK,
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::AmbiguousPath
            | Reason::BadRequest
            | Reason::AmbiguousCredentials
            | Reason::LoginFailed
            | Reason::InvalidRedirect => StatusCode::BAD_REQUEST,
            Reason::LoginRequired
            | Reason::SessionInvalid
            | Reason::SessionExpired
            | Reason::SessionRevoked => StatusCode::UNAUTHORIZED,
            Reason::MissingToken
            | Reason::MalformedToken
            | Reason::DisallowedAlgorithm
            | Reason::ForbiddenHeader
            | Reason::WrongTokenType
            | Reason::UnknownIssuer
            | Reason::IssuerUnavailable
            | Reason::UnknownKey
            | Reason::InvalidSignature
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::TokenIssuedAt
            | Reason::AudienceMismatch
            | Reason::AuthorizedPartyMismatch
            | Reason::InvalidClaims
            | Reason::AcrMismatch
            | Reason::TokenReplayed => StatusCode::UNAUTHORIZED,
            Reason::DeniedByRule | Reason::PolicyDenied | Reason::GroupsUnknown => {
                StatusCode::FORBIDDEN
            }
            Reason::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            // Only ever logged, with the status already sent.
            Reason::UpstreamUnavailable | Reason::UpstreamAborted => StatusCode::BAD_GATEWAY,
            Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            Reason::PlaintextRefused => StatusCode::UPGRADE_REQUIRED,
            Reason::ProtocolViolation
            | Reason::UnsupportedEncoding
            | Reason::UnsupportedStartupParameter => StatusCode::BAD_REQUEST,
            Reason::AccessRevoked | Reason::CrossOrigin => StatusCode::FORBIDDEN,
            Reason::ShuttingDown
            | Reason::Overloaded
            | Reason::AuditUnavailable
            | Reason::ReplayCheckUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            // Never sent: the client is gone. (The log says 499.)
            Reason::ClientClosed => StatusCode::BAD_REQUEST,
            // Never sent: only logged, with the status answered.
            Reason::SendTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Whether the request was let through to the upstream: by a rule, or as a CORS
    /// preflight.
    pub const fn is_allow(self) -> bool {
        matches!(self, Reason::Allowed | Reason::Public | Reason::CorsPreflight)
    }

    /// Whether this reason comes from the credential (→ `WWW-Authenticate: Bearer error=...`).
    pub const fn is_token_problem(self) -> bool {
        matches!(self.status(), StatusCode::UNAUTHORIZED)
            && !matches!(
                self,
                Reason::MissingToken
                    | Reason::LoginRequired
                    | Reason::SessionInvalid
                    | Reason::SessionExpired
                    | Reason::SessionRevoked
            )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_problems_share_one_public_code() {
        for r in [Reason::TokenExpired, Reason::InvalidSignature, Reason::UnknownIssuer] {
            assert_eq!(r.public_code(), "invalid-token");
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            assert!(r.is_token_problem());
        }
        assert!(!Reason::MissingToken.is_token_problem());
        assert_eq!(Reason::DeniedByRule.public_code(), "policy-denied");
        assert_eq!(Reason::NoRoute.public_code(), "no-route");
        // A signed-out session is no session to the client; the log says which.
        assert_eq!(Reason::SessionRevoked.code(), "session-revoked");
        assert_eq!(Reason::SessionRevoked.public_code(), "login-required");
        assert_eq!(Reason::SessionRevoked.status(), StatusCode::UNAUTHORIZED);
        assert!(!Reason::SessionRevoked.is_token_problem());
    }

    /// Every code [`Reason::code`] returns, read off its match arms (one per variant,
    /// since the match is exhaustive): `Reason::X => "code",`.
    fn codes() -> std::collections::BTreeSet<&'static str> {
        let source = include_str!("reason.rs");
        let body = source.split("pub const fn code(self)").nth(1).unwrap_or_default();
        let body = body.split("pub const fn public_code").next().unwrap_or_default();
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("Reason::")?.split_once(" => \""))
            .filter_map(|(_, code)| code.strip_suffix("\","))
            .collect()
    }

    /// Operators read `reason` in docs/audit.md: its table lists every code the proxy
    /// can write, and no code it cannot.
    #[test]
    fn the_audit_reference_lists_every_reason_code_and_no_other() {
        let doc = include_str!("../docs/audit.md");
        let table = doc.split("\n## Reason codes\n").nth(1).unwrap_or_default();
        let table = table.split("\n## ").next().unwrap_or_default();
        let documented: std::collections::BTreeSet<&str> = table
            .lines()
            .skip_while(|l| !l.starts_with("|---"))
            .filter_map(|l| l.strip_prefix("| `")?.split_once('`'))
            .map(|(code, _)| code)
            .collect();
        let codes = codes();
        assert!(codes.len() > 50, "the parse of Reason::code lost arms: {codes:?}");
        let undocumented: Vec<_> = codes.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&codes).collect();
        assert!(undocumented.is_empty(), "not in docs/audit.md's reason table: {undocumented:?}");
        assert!(unknown.is_empty(), "in docs/audit.md but not a Reason code: {unknown:?}");
    }
}
