//! A development sign-in for the dev issuer: an authorization endpoint with a minimal
//! form (any user name, choosable groups), a token endpoint (authorization code with
//! PKCE S256, refresh tokens that rotate) and an end-session endpoint. Used by
//! `portcullis demo` so a newcomer can sign in with a browser, and by the tests, whose
//! hooks make it misbehave (wrong nonce, failing refresh, short-lived ID tokens).
//!
//! Never for production: it signs in anyone who asks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::Full;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::issuer::{DevIssuer, DevRequest};
use super::signer::DevSigner;
use crate::session::pages::escape;

/// Groups the form offers.
pub const DEV_GROUPS: &[&str] = &["engineering", "release-managers", "sre", "admins"];

/// The dev sign-in of one dev issuer path. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct DevLogin {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DevLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevLogin").field("issuer", &self.inner.issuer).finish()
    }
}

type RefreshGrant = (String, Vec<String>, String);

struct Grant {
    user: String,
    groups: Vec<String>,
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
}

#[derive(Default)]
struct Hooks {
    /// ID-token lifetime in seconds (default 300).
    id_ttl: Option<u64>,
    /// Put this nonce into ID tokens instead of the requested one.
    nonce_override: Option<String>,
    fail_refresh: bool,
    no_refresh_tokens: bool,
    /// Signal Entra-style group overage instead of listing groups.
    overage: bool,
    /// Run in a refresh grant before it answers: what happens while a refresh is at the
    /// provider (a sign-out landing meanwhile).
    on_refresh: Option<Arc<dyn Fn() + Send + Sync>>,
    /// `auth_time` this many seconds ago: the person authenticated earlier (the
    /// provider ignored `max_age` or `prompt=login`). `None`: now.
    auth_time_age: Option<u64>,
    /// ID tokens without `auth_time`.
    no_auth_time: bool,
    /// Authorization responses without `iss` (RFC 9207).
    no_iss: bool,
    /// ID tokens signed HS256 with the client secret (which OIDC allows a provider).
    hs256: bool,
    /// The `acr` of ID tokens (none by default).
    acr: Option<String>,
    /// The `hd` (Google Workspace domain) of ID tokens (none by default).
    hd: Option<String>,
    /// Members set in every ID token's claims last (`null`: removed): a provider that
    /// signs for another audience or issuer.
    claims: serde_json::Map<String, Value>,
    /// Members set in every token response last (`null`: removed): a provider whose
    /// `token_type` or `expires_in` is off.
    response: serde_json::Map<String, Value>,
}

/// Sets each member of `with` in `target`, removing those set to `null`.
fn overlay(target: &mut Value, with: &serde_json::Map<String, Value>) {
    if let Value::Object(m) = target {
        for (k, v) in with {
            match v {
                Value::Null => m.remove(k),
                v => m.insert(k.clone(), v.clone()),
            };
        }
    }
}

struct Inner {
    issuer: String,
    path: String,
    client_id: String,
    client_secret: String,
    signer: DevSigner,
    codes: Mutex<HashMap<String, Grant>>,
    /// Refresh token → (user, groups, access token).
    refresh: Mutex<HashMap<String, RefreshGrant>>,
    hooks: Mutex<Hooks>,
    code_exchanges: AtomicU64,
    refreshes: AtomicU64,
}

fn random() -> String {
    let mut b = [0u8; 24];
    let _ = aws_lc_rs::rand::fill(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let d = |x: &str| {
                percent_encoding::percent_decode_str(&x.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn respond(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

fn oauth_error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    respond(status, "application/json", json!({ "error": code }).to_string())
}

fn found(location: &str) -> Response<Full<Bytes>> {
    let mut r = respond(StatusCode::FOUND, "text/plain", String::new());
    if let Ok(v) = header::HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Redirect URIs the dev sign-in accepts: https anywhere (it is a dev tool on
/// loopback), http only on loopback.
fn redirect_ok(uri: &str) -> bool {
    uri.starts_with("https://")
        || uri.starts_with("http://127.0.0.1")
        || uri.starts_with("http://localhost")
}

// === impl DevLogin ===

impl DevLogin {
    /// Add the endpoints to the issuer at `path` (already registered with
    /// [`DevIssuer::add_issuer`]) and advertise them in its discovery document.
    pub fn install(
        dev: &DevIssuer,
        path: &str,
        signer: &DevSigner,
        client_id: &str,
        client_secret: &str,
    ) -> Option<DevLogin> {
        let issuer = dev.issuer_url(path)?;
        let signer =
            DevSigner::from_pkcs8_der(signer.alg(), signer.kid().to_string(), &signer.pkcs8_der())
                .ok()?;
        let path = format!("/{}", path.trim_matches('/'));
        let login = DevLogin {
            inner: Arc::new(Inner {
                issuer: issuer.clone(),
                path: path.clone(),
                client_id: client_id.to_string(),
                client_secret: client_secret.to_string(),
                signer,
                codes: Mutex::new(HashMap::new()),
                refresh: Mutex::new(HashMap::new()),
                hooks: Mutex::new(Hooks::default()),
                code_exchanges: AtomicU64::new(0),
                refreshes: AtomicU64::new(0),
            }),
        };
        let mut extra = serde_json::Map::new();
        extra.insert("authorization_endpoint".into(), json!(format!("{issuer}/authorize")));
        extra.insert("token_endpoint".into(), json!(format!("{issuer}/token")));
        extra.insert("end_session_endpoint".into(), json!(format!("{issuer}/logout")));
        extra.insert("response_types_supported".into(), json!(["code"]));
        extra
            .insert("grant_types_supported".into(), json!(["authorization_code", "refresh_token"]));
        extra.insert("code_challenge_methods_supported".into(), json!(["S256"]));
        // Every authorization response names the issuer (RFC 9207).
        extra.insert("authorization_response_iss_parameter_supported".into(), json!(true));
        extra.insert(
            "token_endpoint_auth_methods_supported".into(),
            json!(["client_secret_basic", "client_secret_post"]),
        );
        extra.insert("scopes_supported".into(), json!(["openid", "email", "profile", "groups"]));
        dev.set_discovery_extra(&path, extra);
        let l = login.clone();
        dev.add_handler(&format!("{path}/"), Arc::new(move |req: &DevRequest| l.handle(req)));
        Some(login)
    }

    /// Code exchanges so far.
    pub fn code_exchanges(&self) -> u64 {
        self.inner.code_exchanges.load(Ordering::SeqCst)
    }
    /// Refresh-token grants so far (failed ones included).
    pub fn refreshes(&self) -> u64 {
        self.inner.refreshes.load(Ordering::SeqCst)
    }
    pub fn set_id_token_ttl(&self, secs: u64) {
        self.inner.hooks.lock().id_ttl = Some(secs);
    }
    pub fn set_nonce_override(&self, nonce: Option<&str>) {
        self.inner.hooks.lock().nonce_override = nonce.map(str::to_owned);
    }
    pub fn set_fail_refresh(&self, fail: bool) {
        self.inner.hooks.lock().fail_refresh = fail;
    }
    pub fn set_no_refresh_tokens(&self, none: bool) {
        self.inner.hooks.lock().no_refresh_tokens = none;
    }
    pub fn set_groups_overage(&self, overage: bool) {
        self.inner.hooks.lock().overage = overage;
    }
    /// Runs `hook` in every refresh grant, before the answer (`None`: no more).
    pub fn set_on_refresh(&self, hook: Option<Arc<dyn Fn() + Send + Sync>>) {
        self.inner.hooks.lock().on_refresh = hook;
    }

    pub fn set_auth_time_age(&self, age: Option<u64>) {
        self.inner.hooks.lock().auth_time_age = age;
    }
    pub fn set_no_auth_time(&self, none: bool) {
        self.inner.hooks.lock().no_auth_time = none;
    }
    pub fn set_no_iss(&self, none: bool) {
        self.inner.hooks.lock().no_iss = none;
    }
    pub fn set_hs256(&self, hs256: bool) {
        self.inner.hooks.lock().hs256 = hs256;
    }
    pub fn set_acr(&self, acr: Option<&str>) {
        self.inner.hooks.lock().acr = acr.map(str::to_string);
    }
    pub fn set_hd(&self, hd: Option<&str>) {
        self.inner.hooks.lock().hd = hd.map(str::to_string);
    }
    /// Sets these members in every ID token's claims from now on (`null` removes one);
    /// an empty map: none.
    pub fn set_claim_overrides(&self, claims: serde_json::Map<String, Value>) {
        self.inner.hooks.lock().claims = claims;
    }
    /// Sets these members in every token response from now on (`null` removes one); an
    /// empty map: none.
    pub fn set_response_overrides(&self, members: serde_json::Map<String, Value>) {
        self.inner.hooks.lock().response = members;
    }

    fn handle(&self, req: &DevRequest) -> Option<Response<Full<Bytes>>> {
        let rest = req.uri.path().strip_prefix(&self.inner.path)?;
        match (rest, &req.method) {
            ("/authorize", &Method::GET) => Some(self.authorize_form(req)),
            ("/authorize", &Method::POST) => Some(self.authorize_submit(req)),
            ("/token", &Method::POST) => Some(self.token(req)),
            ("/logout", &Method::GET) => Some(self.logout(req)),
            _ => None,
        }
    }

    fn check_authorize(&self, q: &[(String, String)]) -> Result<(), &'static str> {
        if get(q, "response_type") != Some("code") {
            return Err("response_type must be code");
        }
        if get(q, "client_id") != Some(self.inner.client_id.as_str()) {
            return Err("unknown client_id");
        }
        if !get(q, "redirect_uri").is_some_and(redirect_ok) {
            return Err("redirect_uri not allowed");
        }
        if get(q, "code_challenge_method") != Some("S256") || get(q, "code_challenge").is_none() {
            return Err("PKCE S256 is required");
        }
        if !get(q, "scope").is_some_and(|s| s.split(' ').any(|x| x == "openid")) {
            return Err("scope must include openid");
        }
        Ok(())
    }

    fn authorize_form(&self, req: &DevRequest) -> Response<Full<Bytes>> {
        let query = req.uri.query().unwrap_or("");
        let q = form_decode(query);
        if let Err(e) = self.check_authorize(&q) {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad authorization request: {e}"),
            );
        }
        let groups: String = DEV_GROUPS
            .iter()
            .map(|g| {
                let checked = if *g == "engineering" { " checked" } else { "" };
                format!("<label><input type=\"checkbox\" name=\"groups\" value=\"{g}\"{checked}> {g}</label><br>\n")
            })
            .collect();
        let body = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Dev sign-in</title>\
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:30em;margin:4em auto;padding:0 1em}}\
input[type=text]{{font-size:1em;padding:.3em;width:100%}}button{{font-size:1em;padding:.4em 1.2em;margin-top:1em}}</style></head>\n\
<body>\n<h1>Development sign-in</h1>\n<p>The demo's issuer signs in any name. Never use it in production.</p>\n\
<form method=\"post\" action=\"{path}/authorize?{q}\">\n<label>User name<br><input type=\"text\" name=\"username\" value=\"alice\" autofocus></label>\n\
<p>Groups:<br>\n{groups}</p>\n<button type=\"submit\">Sign in</button>\n</form>\n</body></html>\n",
            path = escape(&self.inner.path),
            q = escape(query),
        );
        respond(StatusCode::OK, "text/html; charset=utf-8", body)
    }

    fn authorize_submit(&self, req: &DevRequest) -> Response<Full<Bytes>> {
        let q = form_decode(req.uri.query().unwrap_or(""));
        if let Err(e) = self.check_authorize(&q) {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad authorization request: {e}"),
            );
        }
        let form = form_decode(&String::from_utf8_lossy(&req.body));
        let user = get(&form, "username").unwrap_or("").trim().to_string();
        if user.is_empty() || user.len() > 64 {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "a user name is required".into(),
            );
        }
        let groups: Vec<String> = form
            .iter()
            .filter(|(k, _)| k == "groups")
            .map(|(_, v)| v.clone())
            .filter(|g| DEV_GROUPS.contains(&g.as_str()))
            .collect();
        let redirect_uri = get(&q, "redirect_uri").unwrap_or_default().to_string();
        let code = random();
        self.inner.codes.lock().insert(
            code.clone(),
            Grant {
                user,
                groups,
                client_id: self.inner.client_id.clone(),
                redirect_uri: redirect_uri.clone(),
                challenge: get(&q, "code_challenge").unwrap_or_default().to_string(),
                nonce: get(&q, "nonce").map(str::to_owned),
            },
        );
        let sep = if redirect_uri.contains('?') { '&' } else { '?' };
        let mut loc = format!("{redirect_uri}{sep}code={}", enc(&code));
        if !self.inner.hooks.lock().no_iss {
            loc.push_str(&format!("&iss={}", enc(&self.inner.issuer)));
        }
        if let Some(state) = get(&q, "state") {
            loc.push_str(&format!("&state={}", enc(state)));
        }
        found(&loc)
    }

    /// Client authentication: HTTP Basic (form-urlencoded parts, RFC 6749 §2.3.1) or
    /// `client_secret_post`.
    fn client_ok(&self, req: &DevRequest, form: &[(String, String)]) -> bool {
        let basic = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| {
                let (id, secret) = s.split_once(':')?;
                let d = |x: &str| {
                    percent_encoding::percent_decode_str(&x.replace('+', " "))
                        .decode_utf8_lossy()
                        .into_owned()
                };
                Some((d(id), d(secret)))
            });
        let (id, secret) = match basic {
            Some(pair) => pair,
            None => (
                get(form, "client_id").unwrap_or_default().to_string(),
                get(form, "client_secret").unwrap_or_default().to_string(),
            ),
        };
        id == self.inner.client_id && secret == self.inner.client_secret
    }

    fn token(&self, req: &DevRequest) -> Response<Full<Bytes>> {
        let form = form_decode(&String::from_utf8_lossy(&req.body));
        if !self.client_ok(req, &form) {
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
        }
        match get(&form, "grant_type") {
            Some("authorization_code") => {
                self.inner.code_exchanges.fetch_add(1, Ordering::SeqCst);
                // Single use: the code is gone whether or not the rest checks out.
                let Some(grant) =
                    get(&form, "code").and_then(|c| self.inner.codes.lock().remove(c))
                else {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
                };
                if grant.client_id != self.inner.client_id
                    || get(&form, "redirect_uri") != Some(grant.redirect_uri.as_str())
                {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
                }
                let verifier = get(&form, "code_verifier").unwrap_or_default();
                let digest =
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
                if URL_SAFE_NO_PAD.encode(digest.as_ref()) != grant.challenge {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
                }
                self.tokens(&grant.user, &grant.groups, grant.nonce.as_deref())
            }
            Some("refresh_token") => {
                self.inner.refreshes.fetch_add(1, Ordering::SeqCst);
                if self.inner.hooks.lock().fail_refresh {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
                }
                let hook = self.inner.hooks.lock().on_refresh.clone();
                if let Some(hook) = hook {
                    hook();
                }
                // Rotating refresh tokens: the old one is spent.
                let Some((user, groups, _)) =
                    get(&form, "refresh_token").and_then(|r| self.inner.refresh.lock().remove(r))
                else {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
                };
                self.tokens(&user, &groups, None)
            }
            _ => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
        }
    }

    fn tokens(&self, user: &str, groups: &[String], nonce: Option<&str>) -> Response<Full<Bytes>> {
        let hooks = self.inner.hooks.lock();
        let now = crate::util::unix_now();
        let ttl = hooks.id_ttl.unwrap_or(300);
        let access = random();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, access.as_bytes());
        let at_hash = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]);
        let email =
            if user.contains('@') { user.to_string() } else { format!("{user}@example.test") };
        let mut claims = json!({
            "iss": self.inner.issuer,
            "sub": user,
            "aud": self.inner.client_id,
            "azp": self.inner.client_id,
            "iat": now,
            "exp": now + ttl,
            "auth_time": now.saturating_sub(hooks.auth_time_age.unwrap_or(0)),
            "at_hash": at_hash,
            "email": email,
            "email_verified": true,
            "name": user,
            "groups": groups,
        });
        if let Some(n) = hooks.nonce_override.as_deref().or(nonce) {
            claims["nonce"] = Value::String(n.to_string());
        }
        if let Some(acr) = &hooks.acr {
            claims["acr"] = Value::String(acr.clone());
        }
        if let Some(hd) = &hooks.hd {
            claims["hd"] = Value::String(hd.clone());
        }
        if hooks.no_auth_time {
            if let Value::Object(m) = &mut claims {
                m.remove("auth_time");
            }
        }
        if hooks.overage {
            if let Value::Object(m) = &mut claims {
                m.remove("groups");
                m.insert("_claim_names".into(), json!({ "groups": "src1" }));
                m.insert(
                    "_claim_sources".into(),
                    json!({ "src1": { "endpoint": "https://graph.invalid/getMemberObjects" } }),
                );
            }
        }
        overlay(&mut claims, &hooks.claims);
        let id_token = if hooks.hs256 {
            if let Value::Object(m) = &mut claims {
                m.remove("at_hash");
            }
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let key = aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                self.inner.client_secret.as_bytes(),
            );
            let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
        } else {
            self.inner.signer.sign(&json!({ "alg": self.inner.signer.alg().name(), "typ": "JWT", "kid": self.inner.signer.kid() }), &claims)
        };
        let mut body = json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "id_token": id_token,
        });
        if !hooks.no_refresh_tokens {
            let rt = random();
            self.inner
                .refresh
                .lock()
                .insert(rt.clone(), (user.to_string(), groups.to_vec(), access));
            body["refresh_token"] = Value::String(rt);
        }
        overlay(&mut body, &hooks.response);
        respond(StatusCode::OK, "application/json", body.to_string())
    }

    fn logout(&self, req: &DevRequest) -> Response<Full<Bytes>> {
        let q = form_decode(req.uri.query().unwrap_or(""));
        match get(&q, "post_logout_redirect_uri") {
            Some(uri)
                if redirect_ok(uri)
                    && get(&q, "client_id") == Some(self.inner.client_id.as_str()) =>
            {
                found(uri)
            }
            _ => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                "<!doctype html><title>Signed out</title><h1>Signed out of the dev issuer</h1>"
                    .into(),
            ),
        }
    }
}
