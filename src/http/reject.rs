//! Rejections become responses here and only here: a fixed public body, the precise
//! cause kept for the log.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Response};

use super::body::ProxyBody;
use crate::reason::Reason;

/// The response for a rejection: `{"error": CODE, "request_id": ID}`.
///
/// Every 401 carries `WWW-Authenticate` (see `challenge`).
pub fn response(reason: Reason, request_id: &str) -> Response<ProxyBody> {
    let body = format!(r#"{{"error":"{}","request_id":"{}"}}"#, reason.public_code(), request_id);
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(body))));
    *resp.status_mut() = reason.status();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = challenge(reason) {
        h.insert(WWW_AUTHENTICATE, c);
    }
    resp
}

/// The `WWW-Authenticate` challenge of a rejection: every 401 sends one (RFC 9110
/// §11.6.1, a MUST; clients that follow it, such as .NET's and Java's, fail on a 401
/// without), a sign-in route's "no session" as much as a bearer route's "no token", since
/// both take a bearer token. Per RFC 6750 §3: no error code when no bearer token was
/// sent (no token, no session, or a session that ended), `error="invalid_token"` when
/// one was sent and refused.
fn challenge(reason: Reason) -> Option<HeaderValue> {
    if reason.status() != http::StatusCode::UNAUTHORIZED {
        None
    } else if reason.is_token_problem() {
        Some(HeaderValue::from_static(r#"Bearer realm="portcullis", error="invalid_token""#))
    } else {
        Some(HeaderValue::from_static(r#"Bearer realm="portcullis""#))
    }
}

/// Whether the client asked for HTML (a browser): its `Accept` names `text/html`, and
/// not with `q=0`, which says HTML is not acceptable (RFC 9110 §12.4.2): an API client
/// writing `Accept: application/json, text/html;q=0` gets JSON, and is not sent to sign in.
pub fn wants_html(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let mut parts = t.split(';');
            let media = parts.next().unwrap_or_default().trim();
            media.eq_ignore_ascii_case("text/html")
                && !parts.any(|p| {
                    p.trim().split_once('=').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("q")
                            && v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
                    })
                })
        })
}

/// The rejection for a browser: a small HTML page with the public reason code, the
/// request id and, when signing in could help, a sign-in link. Same status as JSON.
///
/// `signed_in`: the request carried a valid session; the page says as whom and links to
/// sign out (in place of signing in).
pub fn html_response(
    reason: Reason,
    request_id: &str,
    sign_in: Option<&str>,
    signed_in: Option<crate::session::pages::SignedIn<'_>>,
) -> Response<ProxyBody> {
    html_response_as(reason.status(), reason, request_id, sign_in, signed_in)
}

/// [`html_response`] with a status other than the reason's own (431 for a request of
/// too many header fields, whose reason is `bad-request`).
pub fn html_response_as(
    status: http::StatusCode,
    reason: Reason,
    request_id: &str,
    sign_in: Option<&str>,
    signed_in: Option<crate::session::pages::SignedIn<'_>>,
) -> Response<ProxyBody> {
    let title = match status.as_u16() {
        400 => "Bad request",
        401 => "Sign-in required",
        403 => "Access denied",
        404 => "Not found",
        s if s >= 500 => "Service unavailable",
        _ => "Request refused",
    };
    let link = match status.as_u16() {
        400 | 401 | 403 => sign_in,
        _ => None,
    };
    let body = crate::session::pages::rejection(
        status.as_u16(),
        title,
        reason.public_code(),
        request_id,
        link,
        signed_in,
    );
    let mut resp = page(status, body);
    if let Some(c) = challenge(reason) {
        resp.headers_mut().insert(WWW_AUTHENTICATE, c);
    }
    resp
}

/// One of the proxy's own HTML pages (a rejection, the sign-in chooser, the sign-out
/// confirmation): never stored, no script or outside resource, and never shown inside
/// another site's frame, where a page laid over it could trick a click on its button
/// (clickjacking the "Sign out" confirmation). `frame-ancestors` is how current browsers
/// are told; `X-Frame-Options` tells those that predate it.
pub fn page(status: http::StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(http::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn html_text(r: &Response<ProxyBody>) -> String {
        match r.body() {
            ProxyBody::Full(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => panic!("expected a full body"),
        }
    }

    #[test]
    fn html_is_wanted_when_accept_names_it_and_not_with_q_0() {
        let wants = |accept: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::ACCEPT,
                HeaderValue::from_str(accept).unwrap_or_else(|e| panic!("{e}")),
            );
            wants_html(&h)
        };
        assert!(wants("text/html,application/xhtml+xml,*/*;q=0.8"));
        assert!(wants("application/json, TEXT/HTML ; q=0.5"));
        assert!(!wants("application/json, text/html;q=0"));
        assert!(!wants("application/json, text/html; q=0.000"));
        assert!(!wants("application/json"));
        assert!(!wants("*/*"));
        assert!(!wants("text/htmlx"));
    }

    #[test]
    fn a_signed_in_browser_is_told_who_it_is_and_offered_to_sign_out() {
        use crate::session::pages::SignedIn;
        let who = SignedIn {
            who: "<script>x</script>\"@evil",
            issuer: "corp&co",
            sign_out: "/.portcullis/logout",
        };
        let r = html_response(
            Reason::DeniedByRule,
            "rid1",
            Some("/.portcullis/sign_in?rd=x"),
            Some(who),
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let text = html_text(&r);
        assert!(
            text.contains("signed in as <strong>&lt;script&gt;x&lt;/script&gt;&quot;@evil</strong> (<code>corp&amp;co</code>)"),
            "{text}"
        );
        assert!(text.contains("href=\"/.portcullis/logout\""), "{text}");
        assert!(!text.contains("<script>") && !text.contains("sign_in"), "{text}");
        // The public code, never the precise one.
        assert!(text.contains("<code>policy-denied</code>") && !text.contains("denied-by-rule"));
        // Not signed in: the sign-in link, no sign-out.
        let text = html_text(&html_response(Reason::PolicyDenied, "rid1", Some("/si"), None));
        assert!(text.contains("href=\"/si\"") && !text.contains("logout"), "{text}");
    }

    #[test]
    fn rejections_have_fixed_bodies_and_rfc6750_challenges() {
        let r = response(Reason::TokenExpired, "abc");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()),
            Some(r#"Bearer realm="portcullis", error="invalid_token""#)
        );
        match r.body() {
            ProxyBody::Full(Some(b)) => {
                assert_eq!(&b[..], br#"{"error":"invalid-token","request_id":"abc"}"#)
            }
            _ => panic!("expected a full body"),
        }
        let r = response(Reason::MissingToken, "abc");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()),
            Some(r#"Bearer realm="portcullis""#)
        );
        let r = response(Reason::DeniedByRule, "abc");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers().get(WWW_AUTHENTICATE).is_none());
    }

    /// Every 401, JSON or HTML, challenges (RFC 9110 §11.6.1): a sign-in route's
    /// missing or ended session too, without an error code (no bearer token was sent).
    #[test]
    fn every_401_carries_a_challenge() {
        let plain = r#"Bearer realm="portcullis""#;
        let invalid = r#"Bearer realm="portcullis", error="invalid_token""#;
        for (reason, want) in [
            (Reason::MissingToken, plain),
            (Reason::LoginRequired, plain),
            (Reason::SessionInvalid, plain),
            (Reason::SessionExpired, plain),
            (Reason::SessionRevoked, plain),
            (Reason::TokenExpired, invalid),
            (Reason::InvalidSignature, invalid),
            (Reason::UnknownIssuer, invalid),
        ] {
            assert_eq!(reason.status(), StatusCode::UNAUTHORIZED, "{reason:?}");
            for r in [response(reason, "r"), html_response(reason, "r", None, None)] {
                let got = r.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
                assert_eq!(got, Some(want), "{reason:?}");
            }
        }
        let r = html_response(Reason::DeniedByRule, "r", None, None);
        assert!(r.headers().get(WWW_AUTHENTICATE).is_none());
    }
}
