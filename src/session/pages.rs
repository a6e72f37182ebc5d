//! The few HTML pages a browser sees from the proxy itself: a rejection, the sign-in
//! chooser and "signed out". Plain, small, no scripts, no outside resources.

use std::fmt::Write as _;

/// HTML-escape text for element content and double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width\"><title>{t}</title>\
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em;color:#222}}\
h1{{font-size:1.4em}}code{{background:#f3f3f3;padding:0 .3em}}a.button{{display:inline-block;padding:.4em 1em;\
border:1px solid #555;border-radius:4px;text-decoration:none;color:#222;margin:.2em 0}}\
footer{{margin-top:2em;color:#777;font-size:.85em}}</style></head>\n<body>\n<h1>{t}</h1>\n{body}\n\
<footer>portcullis</footer>\n</body></html>\n",
        t = escape(title)
    )
}

/// Who a browser is signed in as, for a rejection page: a way out when the account is
/// the wrong one.
#[derive(Debug, Clone, Copy)]
pub struct SignedIn<'a> {
    /// The e-mail address of the session, else its subject.
    pub who: &'a str,
    /// The configured issuer's name.
    pub issuer: &'a str,
    /// Where to sign out (the proxy's logout endpoint).
    pub sign_out: &'a str,
}

/// A rejection for a browser: what happened, the reason code and request id to quote,
/// and a sign-in link when signing in could help. A browser that is signed in is told as
/// whom, and offered to sign out (to come back as someone else) instead of signing in.
pub fn rejection(
    status: u16,
    title: &str,
    code: &str,
    request_id: &str,
    sign_in: Option<&str>,
    signed_in: Option<SignedIn<'_>>,
) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<p>The request was refused (HTTP {status}).</p>\n<p>Reason: <code>{}</code><br>Request id: <code>{}</code></p>\n",
        escape(code),
        escape(request_id)
    );
    if let Some(s) = signed_in {
        let _ = writeln!(
            b,
            "<p>You are signed in as <strong>{}</strong> (<code>{}</code>).</p>\n<p><a class=\"button\" href=\"{}\">Sign out or switch account</a></p>",
            escape(s.who),
            escape(s.issuer),
            escape(s.sign_out)
        );
    } else if let Some(link) = sign_in {
        let _ = writeln!(b, "<p><a class=\"button\" href=\"{}\">Sign in</a></p>", escape(link));
    }
    b.push_str("<p>If you think you should have access, send the request id to the team that runs this service.</p>");
    page(title, &b)
}

/// The sign-in chooser: one link per issuer (`(label, href)`).
pub fn chooser(choices: &[(String, String)]) -> String {
    let mut b = String::from("<p>Choose how to sign in:</p>\n<ul>\n");
    for (label, href) in choices {
        let _ = writeln!(
            b,
            "<li><a class=\"button\" href=\"{}\">{}</a></li>",
            escape(href),
            escape(label)
        );
    }
    b.push_str("</ul>");
    page("Sign in", &b)
}

/// After a local sign-out (the provider has no logout endpoint).
/// Asked when a sign-out link was followed from another site: a cross-site request must
/// not end a session by itself (logout CSRF); the button here is same-origin.
pub fn confirm_sign_out(link: &str) -> String {
    page(
        "Sign out?",
        &format!("<p>Another site sent you here to sign out of this proxy.</p>\n<p><a class=\"button\" href=\"{}\">Sign out</a></p>", escape(link)),
    )
}

pub fn signed_out(again: &str) -> String {
    page(
        "Signed out",
        &format!("<p>Your session with this proxy has ended.</p>\n<p><a class=\"button\" href=\"{}\">Sign in again</a></p>", escape(again)),
    )
}
