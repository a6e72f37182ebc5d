//! The proxy as an OpenID relying party of one provider, on `openidconnect`: discovery
//! (with `end_session_endpoint`), the authorization URL (PKCE S256, state, nonce), the
//! code exchange, refresh, and ID-token verification (signature, `iss`, `aud`, `azp`,
//! nonce, `exp`, `at_hash`). HTTP goes through our own hyper client (aws-lc-rs rustls):
//! no reqwest, no ring, no redirects followed, bounded in time and size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient,
    CoreClientAuthMethod, CoreGrantType, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm, CoreResponseMode, CoreResponseType,
    CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AccessTokenHash, AdditionalProviderMetadata, AuthorizationCode, ClientId, ClientSecret,
    CsrfToken, EndSessionUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet, JsonWebKeySet, Nonce,
    OAuth2TokenResponse as _, PkceCodeChallenge, PkceCodeVerifier, ProviderMetadata, RedirectUrl,
    RefreshToken, Scope, TokenResponse as _,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::LoginSettings;
use crate::identity::IssuerSettings;

/// Discovery metadata is reused this long before it is fetched again.
const METADATA_TTL: Duration = Duration::from_secs(10 * 60);
/// After a failed fetch, nobody fetches again for this long: callers get the failure at
/// once (or the previous metadata), so with the provider down or slow, sign-ins fail fast
/// instead of queuing behind one another's timeouts.
const METADATA_RETRY: Duration = Duration::from_secs(5);
/// How long past [`METADATA_TTL`] the previous metadata still serves while fetches fail.
const METADATA_MAX_STALE: Duration = Duration::from_secs(60 * 60);
/// Whole exchange with the provider, connect to last byte.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a discovery document or key set read.
const MAX_BODY: usize = 1024 * 1024;
/// The most of a token endpoint's answer read (a code exchange's or a refresh's). Real
/// ones are a few KiB (an ID token, an access token, a refresh token; an Entra ID token
/// with 200 groups is about 10 KiB, and Entra sends a group overage claim past 200), so
/// 256 KiB leaves room for any of them 25 times over, while the `openidconnect` crate's
/// parse of it, on a runtime thread once per sign-in callback or refresh (linear in its
/// size), stays a quarter of what the 1 MiB read before allowed.
const TOKEN_MAX_BODY: usize = 256 * 1024;

/// The discovery members beyond the core set that the proxy uses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogoutMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_session_endpoint: Option<EndSessionUrl>,
    /// RFC 9207 §3: the provider names itself (`iss`) in every authorization response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_response_iss_parameter_supported: Option<bool>,
}
impl AdditionalProviderMetadata for LogoutMetadata {}

pub type Metadata = ProviderMetadata<
    LogoutMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client built from discovery: authorization endpoint set, token endpoint maybe.
type LoginClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// An HTTP failure talking to the provider. Never carries a body (it may hold tokens).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

/// The `openidconnect` HTTP client: our hyper client, with a boxed `Send` future so
/// the proxy's request future stays `Send`.
struct Http<'p>(&'p Provider);

impl<'c> openidconnect::AsyncHttpClient<'c> for Http<'_> {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<openidconnect::HttpResponse, HttpError>>
                + Send
                + 'c,
        >,
    >;
    fn call(&'c self, request: openidconnect::HttpRequest) -> Self::Future {
        // Only the token endpoint is asked through this client.
        Box::pin(self.0.call(request, TOKEN_MAX_BODY))
    }
}

/// A login that failed; `detail` is safe to log (no code, token or state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginError(pub String);

/// What a verified token response gives the session.
#[derive(Debug)]
pub struct Verified {
    /// The ID token payload (signature already verified).
    pub claims: Map<String, Value>,
    pub id_token_exp: u64,
    pub refresh_token: Option<String>,
}

/// What the browser is sent to, and what must be remembered to finish the login.
#[derive(Debug)]
pub struct AuthRequest {
    pub url: String,
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
}

/// One provider browsers sign in with.
pub struct Provider {
    pub settings: IssuerSettings,
    pub login: LoginSettings,
    secret: String,
    http: HttpClient,
    /// Held across a fetch: concurrent callers wait for that one fetch (single flight).
    metadata: tokio::sync::Mutex<MetadataSlot>,
    /// Clients built from a discovery document so far (tests: once per fetch).
    #[cfg(test)]
    client_builds: std::sync::atomic::AtomicU64,
}

/// A provider's discovery document (with its key set) and the client built from it,
/// once per fetch: building one is a JSON round trip of the whole document and a copy of
/// its keys, too much to do for each sign-in started (anyone's request for a protected
/// page). Each request sets its own `redirect_uri`.
pub struct Loaded {
    pub meta: Metadata,
    client: LoginClient,
}

#[derive(Default)]
struct MetadataSlot {
    current: Option<(Arc<Loaded>, Instant)>,
    failed: Option<(LoginError, Instant)>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider").field("issuer", &self.settings.id).finish()
    }
}

// === impl Provider ===

impl Provider {
    pub fn new(settings: IssuerSettings, login: LoginSettings) -> Result<Provider, String> {
        let secret = login
            .client_secret
            .read()
            .map_err(|e| format!("issuer {}: client secret: {e}", settings.id))?;
        let tls = crate::identity::verify::issuer_tls(&settings)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let http = Client::builder(TokioExecutor::new()).build(connector);
        let metadata = tokio::sync::Mutex::new(MetadataSlot::default());
        Ok(Provider {
            settings,
            login,
            secret,
            http,
            metadata,
            #[cfg(test)]
            client_builds: Default::default(),
        })
    }

    /// One request to the provider: refuses non-https (unless the issuer allows loopback
    /// http), follows no redirects, bounded in time and to `max_body` bytes of answer.
    async fn call(
        &self,
        req: openidconnect::HttpRequest,
        max_body: usize,
    ) -> Result<openidconnect::HttpResponse, HttpError> {
        let uri = req.uri().to_string();
        let checked = crate::identity::verify::check_fetch_url(&uri, self.settings.insecure_http)
            .map_err(|e| HttpError(format!("provider URL {e}")))?;
        // Named in every failure (never its query: [`url_for_log`]).
        let shown = crate::identity::verify::url_for_log(&checked);
        let (parts, body) = req.into_parts();
        let req = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                let e = crate::identity::verify::chain(&e);
                HttpError(format!("request to {shown} failed: {e}"))
            })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| {
                    HttpError(if e.is::<http_body_util::LengthLimitError>() {
                        format!("response body of {shown} larger than {} KiB", max_body / 1024)
                    } else {
                        format!("response body of {shown} failed")
                    })
                })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body.to_vec()))
        };
        tokio::time::timeout(HTTP_TIMEOUT, exchange)
            .await
            .map_err(|_| HttpError(format!("{shown} did not answer in time")))?
    }

    /// Discovery + JWKS, cached for `METADATA_TTL`; `force` fetches again (an unknown
    /// signing key: the provider rotated). One fetch at a time; after a failure, the
    /// failure (or the previous metadata, up to `METADATA_MAX_STALE` old) is returned
    /// without fetching for `METADATA_RETRY`.
    pub async fn metadata(&self, force: bool) -> Result<Arc<Loaded>, LoginError> {
        let mut slot = self.metadata.lock().await;
        let stale = match &slot.current {
            Some((m, at)) if !force && at.elapsed() < METADATA_TTL => return Ok(m.clone()),
            Some((m, at)) if !force && at.elapsed() < METADATA_TTL + METADATA_MAX_STALE => {
                Some(m.clone())
            }
            _ => None,
        };
        if let Some((e, at)) = &slot.failed {
            if at.elapsed() < METADATA_RETRY {
                return stale.ok_or_else(|| e.clone());
            }
        }
        let loaded = match self.fetch_metadata().await {
            Ok(meta) => self.load(meta).await,
            Err(e) => Err(e),
        };
        match loaded {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                *slot =
                    MetadataSlot { current: Some((loaded.clone(), Instant::now())), failed: None };
                Ok(loaded)
            }
            Err(e) => {
                // Escaped: the error can quote the provider's certificate names.
                let error = crate::diag::Visible(&e.0);
                tracing::warn!(issuer = %self.settings.id, %error, stale = stale.is_some(), "provider metadata fetch failed");
                slot.failed = Some((e.clone(), Instant::now()));
                stale.ok_or(e)
            }
        }
    }

    async fn fetch_metadata(&self) -> Result<Metadata, LoginError> {
        let req = http::Request::get(self.settings.discovery_url.as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|_| LoginError("bad discovery URL".into()))?;
        let resp =
            self.call(req, MAX_BODY).await.map_err(|e| LoginError(format!("discovery: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            let url = crate::identity::verify::url_str_for_log(&self.settings.discovery_url);
            return Err(LoginError(format!("discovery {url} answered {}", resp.status())));
        }
        let body = resp.into_body();
        // Off the runtime thread, as the key set: the provider chooses what 1 MiB holds.
        let meta = crate::identity::verify::off_the_runtime(move || {
            #[cfg(test)]
            crate::identity::verify::DOCUMENTS_READ.with(|n| n.set(n.get() + 1));
            serde_json::from_slice::<Metadata>(&body)
                .map_err(|e| format!("discovery document: {e}"))
        })
        .await
        .map_err(LoginError)?;
        // OIDC Discovery §4.3: the document's issuer is exactly the configured one.
        if meta.issuer().as_str() != self.settings.issuer {
            return Err(LoginError("discovery `issuer` differs from the configured issuer".into()));
        }
        self.check_endpoints(&meta)?;
        let jwks = self.fetch_jwks(meta.jwks_uri().url().as_str()).await?;
        Ok(meta.set_jwks(jwks))
    }

    /// The endpoints of `meta` the proxy sends a browser to (authorization, end-session)
    /// or the code and client secret to (token) are https, as the key fetches are
    /// ([`crate::identity::verify::check_fetch_url`]: plain http only on loopback with
    /// `insecure_http`, no `user:password@`; RFC 6749 §3.1 requires TLS there). The token
    /// endpoint is checked again at each call, but only after the browser went to the
    /// authorization endpoint: a provider behind a TLS-terminating proxy that advertises
    /// `http://` had people type their password over plain http first. The whole
    /// document is refused (fail closed): ignoring a bad end-session endpoint would make
    /// sign-outs silently local.
    fn check_endpoints(&self, meta: &Metadata) -> Result<(), LoginError> {
        let endpoints = [
            ("authorization_endpoint", Some(meta.authorization_endpoint().url())),
            ("token_endpoint", meta.token_endpoint().map(|u| u.url())),
            (
                "end_session_endpoint",
                meta.additional_metadata().end_session_endpoint.as_ref().map(|u| u.url()),
            ),
        ];
        for (name, url) in endpoints {
            let Some(url) = url else { continue };
            crate::identity::verify::check_fetch_url(url.as_str(), self.settings.insecure_http)
                .map_err(|e| LoginError(format!("discovery `{name}` {e}")))?;
        }
        Ok(())
    }

    /// The provider's key set, for verifying ID tokens: only its keys that a bearer
    /// token of this issuer could be verified with ([`login_keys`]).
    async fn fetch_jwks(&self, url: &str) -> Result<LoginKeys, LoginError> {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|_| LoginError("bad jwks_uri".into()))?;
        let resp = self.call(req, MAX_BODY).await.map_err(|e| LoginError(format!("JWKS: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            let url = crate::identity::verify::url_str_for_log(url);
            return Err(LoginError(format!("JWKS {url} answered {}", resp.status())));
        }
        let allowlist = self.settings.algorithms.clone();
        let body = resp.into_body();
        // Off the runtime thread, as the bearer path's ([`crate::identity::verify::off_the_runtime`]).
        crate::identity::verify::off_the_runtime(move || read_login_keys(&body, &allowlist))
            .await
            .map_err(LoginError)
    }

    /// `meta` with its client, without a redirect URI (each request sets its own). Built
    /// on the blocking pool: it is a JSON round trip of the whole document, which the
    /// provider chooses (up to 1 MiB).
    async fn load(&self, meta: Metadata) -> Result<Loaded, LoginError> {
        #[cfg(test)]
        self.client_builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = ClientId::new(self.login.client_id.clone());
        let secret = ClientSecret::new(self.secret.clone());
        crate::identity::verify::off_the_runtime(move || {
            #[cfg(test)]
            crate::identity::verify::DOCUMENTS_READ.with(|n| n.set(n.get() + 1));
            // `from_provider_metadata` wants the core metadata type; rebuild it from ours.
            let core: openidconnect::core::CoreProviderMetadata = serde_json::to_value(&meta)
                .and_then(serde_json::from_value)
                .map_err(|e| format!("metadata: {e}"))?;
            let core = core.set_jwks(meta.jwks().clone());
            let client = CoreClient::from_provider_metadata(core, id, Some(secret));
            Ok(Loaded { meta, client })
        })
        .await
        .map_err(LoginError)
    }

    /// The provider's end-session endpoint, if it advertises one.
    pub async fn end_session_endpoint(&self) -> Option<String> {
        let loaded = self.metadata(false).await.ok()?;
        loaded.meta.additional_metadata().end_session_endpoint.as_ref().map(|u| u.url().to_string())
    }

    /// Whether the provider says it names itself in every authorization response
    /// (RFC 9207): then a response without `iss` is not its own.
    pub async fn names_itself(&self) -> Result<bool, LoginError> {
        let loaded = self.metadata(false).await?;
        let meta = &loaded.meta;
        Ok(meta.additional_metadata().authorization_response_iss_parameter_supported == Some(true))
    }

    /// The authorization request: code flow, PKCE S256, fresh state and nonce.
    pub async fn authorize(&self, redirect_uri: &str) -> Result<AuthRequest, LoginError> {
        let loaded = self.metadata(false).await?;
        let redirect = redirect_url(redirect_uri)?;
        let rnd = || super::seal::random_token().map_err(LoginError);
        let (state, nonce, verifier) = (rnd()?, rnd()?, rnd()?);
        let challenge =
            PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(verifier.clone()));
        let (s2, n2) = (state.clone(), nonce.clone());
        let mut req = loaded
            .client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                move || CsrfToken::new(s2),
                move || Nonce::new(n2),
            )
            .set_redirect_uri(std::borrow::Cow::Owned(redirect))
            .set_pkce_challenge(challenge);
        for scope in self.login.scopes.iter().filter(|s| *s != "openid") {
            req = req.add_scope(Scope::new(scope.clone()));
        }
        for (k, v) in &self.login.extra_params {
            req = req.add_extra_param(k.clone(), v.clone());
        }
        let (url, _, _) = req.url();
        Ok(AuthRequest { url: url.to_string(), state, nonce, pkce_verifier: verifier })
    }

    /// Exchange the code and verify the ID token against `nonce`, and its `auth_time`
    /// against the login's `max_age` and `prompt=login` for a sign-in that began at
    /// `started` (Unix seconds): present, within `max_age`, not before `started` for
    /// `prompt=login`, give or take the issuer's `leeway`.
    pub async fn exchange(
        &self,
        code: String,
        pkce_verifier: String,
        nonce: &str,
        redirect_uri: &str,
        started: u64,
    ) -> Result<Verified, LoginError> {
        let verified = self.exchange_code(code, pkce_verifier, nonce, redirect_uri).await?;
        self.check_auth_time(&verified.claims, started, crate::util::unix_now())?;
        self.check_acr(&verified.claims)?;
        Ok(verified)
    }

    /// When the login asks the provider for a recent authentication (`max_age`) or a new
    /// one (`prompt=login`), the ID token must show one: `auth_time` present (OIDC Core
    /// §2 requires it then), within `max_age`, and for `prompt=login` not before the
    /// sign-in began, each give or take the issuer's `leeway`. Otherwise the request
    /// alone would be the control: a provider that does not implement the
    /// parameter, or whoever sits at an unlocked browser and deletes it from the
    /// authorization URL, gets a session from the provider's old one, no password asked.
    fn check_auth_time(
        &self,
        claims: &Map<String, Value>,
        started: u64,
        now: u64,
    ) -> Result<(), LoginError> {
        let (max_age, fresh) = (self.login.max_age(), self.login.prompts_login());
        if max_age.is_none() && !fresh {
            return Ok(());
        }
        let auth_time = claims.get("auth_time").and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
        });
        let Some(auth_time) = auth_time else {
            return Err(LoginError(
                "ID token has no `auth_time`, though the login asks for a recent sign-in (`max_age` or `prompt=login`)".into(),
            ));
        };
        let leeway = self.settings.leeway.as_secs();
        if max_age.is_some_and(|max| now.saturating_sub(auth_time) > max.saturating_add(leeway)) {
            return Err(LoginError(
                "ID token `auth_time` is older than the login's `max_age`: the provider did not authenticate the person again".into(),
            ));
        }
        if fresh && auth_time.saturating_add(leeway) < started {
            return Err(LoginError(
                "ID token `auth_time` is before the sign-in began, though the login asks `prompt=login`: the provider did not authenticate the person again".into(),
            ));
        }
        Ok(())
    }

    /// When the login asks for an authentication context (`acr_values`), the ID token's
    /// `acr` must be one of those asked for: a provider may satisfy the request with
    /// another class or ignore it (OIDC Core §3.1.2.1, §5.5.1.1: it is voluntary unless
    /// requested as essential through `claims`, which few providers support), and whoever
    /// sits at an unlocked browser can delete it from the authorization URL. The values
    /// are compared exactly, so list every class to accept.
    fn check_acr(&self, claims: &Map<String, Value>) -> Result<(), LoginError> {
        let Some(mut asked) = self.login.acr_values() else {
            return Ok(());
        };
        match claims.get("acr") {
            Some(Value::String(acr)) if asked.any(|a| a == acr) => Ok(()),
            Some(Value::String(_)) => Err(LoginError(
                "ID token `acr` is not one of the login's `acr_values`: the provider authenticated the person with another context class".into(),
            )),
            _ => Err(LoginError(
                "ID token has no `acr` string, though the login asks for `acr_values`".into(),
            )),
        }
    }

    async fn exchange_code(
        &self,
        code: String,
        pkce_verifier: String,
        nonce: &str,
        redirect_uri: &str,
    ) -> Result<Verified, LoginError> {
        let loaded = self.metadata(false).await?;
        let redirect = redirect_url(redirect_uri)?;
        let http = Http(self);
        let response = loaded
            .client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|_| LoginError("provider has no token endpoint".into()))?
            .set_redirect_uri(std::borrow::Cow::Owned(redirect))
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier))
            .request_async(&http)
            .await
            .map_err(token_error)?;
        let nonce = Nonce::new(nonce.to_string());
        match self.verify(&loaded.client, &response, Some(&nonce)) {
            Err(e) if e.0.contains("signing key") => {
                // The provider rotated its keys: fetch them once more and retry.
                let loaded = self.metadata(true).await?;
                self.verify(&loaded.client, &response, Some(&nonce))
            }
            other => other,
        }
    }

    /// Use a refresh token. The new ID token, when the provider sends one, is verified
    /// like the first (no nonce: OIDC Core §12.2).
    pub async fn refresh(&self, refresh_token: &str) -> Result<Verified, LoginError> {
        let loaded = self.metadata(false).await?;
        let http = Http(self);
        let rt = RefreshToken::new(refresh_token.to_string());
        let response = loaded
            .client
            .exchange_refresh_token(&rt)
            .map_err(|_| LoginError("provider has no token endpoint".into()))?
            .request_async(&http)
            .await
            .map_err(token_error)?;
        let refresh = response.refresh_token().map(|t| t.secret().clone());
        if response.id_token().is_none() {
            // Some providers answer a refresh without a new ID token: the session keeps
            // its claims for as long as the access token lives.
            return Ok(Verified {
                claims: Map::new(),
                id_token_exp: claims_kept_until(crate::util::unix_now(), response.expires_in()),
                refresh_token: refresh.or_else(|| Some(refresh_token.to_string())),
            });
        }
        let mut v = self.verify(&loaded.client, &response, None)?;
        v.refresh_token = v.refresh_token.or_else(|| Some(refresh_token.to_string()));
        Ok(v)
    }

    /// The issuer's `algorithms` as `openidconnect` names them (all of them exist there).
    fn allowed_algs(&self) -> Vec<CoreJwsSigningAlgorithm> {
        self.settings
            .algorithms
            .iter()
            .filter_map(|a| serde_json::from_value(Value::String(a.name().into())).ok())
            .collect()
    }

    fn verify(
        &self,
        client: &LoginClient,
        response: &CoreTokenResponse,
        nonce: Option<&Nonce>,
    ) -> Result<Verified, LoginError> {
        let id_token = response
            .id_token()
            .ok_or_else(|| LoginError("no ID token in the token response".into()))?;
        // The issuer's `algorithms` (V4), as for its bearer tokens: not whatever the
        // discovery document advertises (HS256 keyed by the client secret among them).
        let verifier = client.id_token_verifier().set_allowed_algs(self.allowed_algs());
        let claims = match nonce {
            Some(n) => id_token.claims(&verifier, n),
            None => id_token.claims(&verifier, |_: Option<&Nonce>| Ok(())),
        }
        .map_err(|e| LoginError(format!("ID token: {}", claims_error(&e))))?;
        // at_hash binds the access token to the ID token (OIDC Core §3.1.3.8).
        if let Some(expected) = claims.access_token_hash() {
            let alg = id_token.signing_alg().map_err(|_| LoginError("ID token: no alg".into()))?;
            let key = id_token
                .signing_key(&verifier)
                .map_err(|_| LoginError("ID token: no signing key for at_hash".into()))?;
            let actual = AccessTokenHash::from_token(response.access_token(), alg, key)
                .map_err(|_| LoginError("ID token: at_hash algorithm".into()))?;
            if !super::seal::same(actual.as_str(), expected.as_str()) {
                return Err(LoginError("ID token: at_hash does not match the access token".into()));
            }
        }
        let exp = claims.expiration().timestamp().max(0) as u64;
        // The raw payload (now verified) carries the provider's own claims: groups,
        // hd, _claim_names. They go through the same profile checks as bearer tokens.
        let payload = id_token
            .to_string()
            .split('.')
            .nth(1)
            .and_then(|p| {
                use base64::Engine as _;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok()
            })
            .and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
            .ok_or_else(|| LoginError("ID token payload".into()))?;
        Ok(Verified {
            claims: payload,
            id_token_exp: exp,
            refresh_token: response.refresh_token().map(|t| t.secret().clone()),
        })
    }
}

type LoginKeys = JsonWebKeySet<CoreJsonWebKey>;

/// The redirect URI a sign-in's requests carry.
fn redirect_url(uri: &str) -> Result<RedirectUrl, LoginError> {
    RedirectUrl::new(uri.to_string()).map_err(|_| LoginError("bad redirect URI".into()))
}

/// The keys of a JWKS document that pass the checks a bearer token's key passes
/// ([`crate::identity::verify::fit_for_verifying`]). `openidconnect` would take every
/// key it can parse: an RSA modulus of any size under 4096 bits (512 among them, which
/// anyone can factor), and a key whose `key_ops` leave out `verify`. Of keys under one
/// `kid`, the first is kept, as for bearer tokens (`openidconnect` refuses a token
/// naming a `kid` that several keys carry). A set of more than
/// [`crate::identity::verify::check_key_count`]'s cap is refused whole, as for bearer
/// tokens.
fn login_keys(
    mut doc: Value,
    allowlist: &[crate::identity::Algorithm],
) -> Result<LoginKeys, LoginError> {
    let Some(Value::Array(keys)) = doc.get_mut("keys") else {
        return Err(LoginError("JWKS has no `keys` array".into()));
    };
    crate::identity::verify::check_key_count(keys.len()).map_err(LoginError)?;
    let mut kids = std::collections::HashSet::new();
    keys.retain(|key| {
        let fit = match key {
            Value::Object(jwk) => crate::identity::verify::fit_for_verifying(jwk, allowlist)
                .and_then(|()| match jwk.get("kid").and_then(Value::as_str) {
                    Some(kid) if !kids.insert(kid.to_owned()) => Err("kid repeated"),
                    _ => Ok(()),
                }),
            _ => Err("not an object"),
        };
        if let Err(why) = fit {
            tracing::debug!(why, "JWK skipped for ID tokens");
        }
        fit.is_ok()
    });
    serde_json::from_value(doc).map_err(|e| LoginError(format!("JWKS: {e}")))
}

/// A fetched key set document, read for ID tokens: JSON, then [`login_keys`]. Run by
/// [`crate::identity::verify::off_the_runtime`].
fn read_login_keys(
    body: &[u8],
    allowlist: &[crate::identity::Algorithm],
) -> Result<LoginKeys, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    login_keys(doc, allowlist).map_err(|e| e.0)
}

/// The `kid`s of the keys the browser sign-in verifies ID tokens with, read from the
/// key set document `body` as a fetched one is (`None` for a key without one), in the
/// document's order, or why the whole set is refused. For the `jwks` fuzz target, which
/// holds them to the keys a bearer token's verification keeps.
pub fn sign_in_key_ids(
    body: &[u8],
    allowlist: &[crate::identity::Algorithm],
) -> Result<Vec<Option<String>>, String> {
    use openidconnect::JsonWebKey as _;
    let keys = read_login_keys(body, allowlist)?;
    Ok(keys.keys().iter().map(|k| k.key_id().map(|id| id.to_string())).collect())
}

/// What of a provider's OAuth `error` (an authorization response's or the token
/// endpoint's) may be logged: the characters registered error codes are made of (RFC 6749
/// §5.2, §11.4: small letters and `_`), at most 40. The provider chooses the text, and
/// the text log writes it as it is: a newline in it would start a log line the provider
/// wrote, and nothing else bounds it but the 1 MiB answer.
pub(crate) fn error_code(error: &str) -> String {
    error.chars().filter(|c| c.is_ascii_lowercase() || *c == '_').take(40).collect()
}

/// Token endpoint errors, without bodies (they can echo the code), and of the error
/// code only what [`error_code`] keeps.
fn token_error<E: std::error::Error + 'static>(
    e: openidconnect::RequestTokenError<
        E,
        openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    >,
) -> LoginError {
    use openidconnect::RequestTokenError as R;
    LoginError(match e {
        R::ServerResponse(r) => {
            format!("token endpoint refused: {}", error_code(r.error().as_ref()))
        }
        R::Request(e) => format!("token endpoint: {e}"),
        R::Parse(_, _) => "token endpoint answer did not parse".into(),
        R::Other(_) => "token endpoint: unexpected answer".into(),
    })
}

/// Claim verification errors, by kind (their messages can quote token values).
fn claims_error(e: &openidconnect::ClaimsVerificationError) -> &'static str {
    use openidconnect::ClaimsVerificationError as C;
    match e {
        C::Expired(_) => "expired",
        C::InvalidAudience(_) => "audience or azp is not our client_id (or untrusted audiences)",
        C::InvalidAuthTime(_) => "auth_time",
        C::InvalidIssuer(_) => "issuer mismatch",
        C::InvalidNonce(_) => "nonce mismatch",
        C::InvalidSubject(_) => "subject",
        C::SignatureVerification(openidconnect::SignatureVerificationError::NoMatchingKey) => {
            "no matching signing key"
        }
        C::SignatureVerification(_) => "signature does not verify",
        C::Unsupported(_) => "unsupported",
        _ => "invalid",
    }
}

/// Until when a session keeps its claims after a refresh answered without an ID token:
/// the access token's `expires_in` (5 minutes when absent). The provider chooses that
/// number, so a huge one saturates rather than overflows (a panic in a debug build, a
/// time in 1970 after wrapping in a release one); the session's own lifetimes still
/// bound it.
fn claims_kept_until(now: u64, expires_in: Option<Duration>) -> u64 {
    now.saturating_add(expires_in.unwrap_or(Duration::from_secs(300)).as_secs())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::SecretSource;
    use crate::identity::{IssuerId, Preset};

    /// A refresh answered without an ID token keeps the claims for `expires_in`; a
    /// provider's `u64::MAX` saturates instead of overflowing (which panicked here).
    #[test]
    fn a_refresh_expires_in_beyond_any_time_saturates() {
        assert_eq!(claims_kept_until(1_000, None), 1_300);
        assert_eq!(claims_kept_until(1_000, Some(Duration::from_secs(60))), 1_060);
        assert_eq!(claims_kept_until(1_000, Some(Duration::from_secs(u64::MAX))), u64::MAX);
    }

    /// A sign-in's ID tokens are verified only with keys a bearer token's could be:
    /// `openidconnect` took a 1024-bit RSA modulus, a key whose `key_ops` leave out
    /// `verify` and an EC point off its curve, and verified ID tokens with them.
    #[test]
    fn a_sign_in_verifies_with_no_key_a_bearer_token_could_not_verify_with() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use openidconnect::JsonWebKey as _;
        let good = crate::dev::signer::DevSigner::generate_rs256("good")
            .unwrap_or_else(|e| panic!("signer: {e}"))
            .public_jwk();
        let mut short = good.clone();
        short["kid"] = "short".into();
        // An odd 1024-bit modulus: top and bottom bits set.
        let mut n = vec![0x5au8; 128];
        n[0] = 0xc1;
        n[127] = 0x01;
        short["n"] = URL_SAFE_NO_PAD.encode(&n).into();
        let mut encrypting = good.clone();
        encrypting["kid"] = "encrypting".into();
        encrypting["key_ops"] = serde_json::json!(["encrypt"]);
        let mut unnamed = good.clone();
        if let Value::Object(m) = &mut unnamed {
            m.remove("kid");
        }
        let one = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let off_curve = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "off-curve", "x": one, "y": one,
        });
        // A second key under a kid already seen: the first is kept, as for bearer
        // tokens (`openidconnect` refused every ID token naming that kid as ambiguous).
        let again = crate::dev::signer::DevSigner::generate_rs256("good")
            .unwrap_or_else(|e| panic!("signer: {e}"))
            .public_jwk();
        let doc = serde_json::json!({
            "keys": [good.clone(), short, encrypting, off_curve, unnamed, again, "not a key"],
        });
        let allow = [crate::identity::Algorithm::RS256, crate::identity::Algorithm::ES256];
        let keys = login_keys(doc, &allow).unwrap_or_else(|e| panic!("{e:?}"));
        let kids: Vec<Option<&str>> =
            keys.keys().iter().map(|k| k.key_id().map(|id| id.as_str())).collect();
        assert_eq!(kids, [Some("good"), None]);
        let kept = serde_json::to_value(&keys.keys()[0]).unwrap_or_default();
        assert_eq!(kept["n"], good["n"], "not the first key under its kid");
        assert!(login_keys(serde_json::json!({}), &allow).is_err());
        // More than 100 entries: refused whole, as for bearer tokens.
        let many: Vec<Value> = (0..101)
            .map(|i| {
                let mut k = good.clone();
                k["kid"] = format!("k{i}").into();
                k
            })
            .collect();
        let refused = login_keys(serde_json::json!({ "keys": many }), &allow);
        assert!(refused.is_err_and(|e| e.0.contains("101 keys")), "a set of 101 keys was taken");
    }

    /// A development issuer at `/human` with one RS256 key and a login client
    /// `portcullis` / `s3cret`: what a sign-in test starts from. Its key and issuer URL.
    async fn dev_login() -> (crate::dev::issuer::DevIssuer, crate::dev::signer::DevSigner, String) {
        let dev = crate::dev::issuer::DevIssuer::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("dev issuer: {e}"));
        let signer = crate::dev::signer::DevSigner::generate_rs256("k1")
            .unwrap_or_else(|e| panic!("signer: {e}"));
        let url = dev.add_issuer("/human", &[&signer]);
        crate::dev::login::DevLogin::install(&dev, "/human", &signer, "portcullis", "s3cret")
            .unwrap_or_else(|| panic!("dev login"));
        (dev, signer, url)
    }

    /// The login client's secret in a file (the directory lives as long as the guard).
    fn secret_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret").unwrap_or_else(|e| panic!("secret: {e}"));
        (dir, secret)
    }

    fn provider(issuer: &str, secret: &std::path::Path) -> Provider {
        let mut settings =
            crate::identity::tests::settings("idp", Preset::Oidc, issuer, "portcullis");
        // The test provider is plain HTTP on loopback.
        settings.insecure_http = true;
        let login = LoginSettings {
            issuer: IssuerId("idp".into()),
            client_id: "portcullis".into(),
            client_secret: SecretSource::File(secret.to_path_buf()),
            scopes: vec!["openid".into()],
            redirect_path: "/.portcullis/callback".into(),
            extra_params: Vec::new(),
            post_logout_redirect: None,
        };
        Provider::new(settings, login).unwrap_or_else(|e| panic!("provider: {e}"))
    }

    /// The sign-in's own fetches (discovery, JWKS) follow no redirect (a `jwks_uri`
    /// answering 302, to an internal address or anywhere, is a failure, not a second
    /// request) and read at most `MAX_BODY` of an answer. The same JWKS served directly
    /// loads, so each refusal is the redirect's or the size's.
    #[tokio::test]
    async fn the_sign_in_follows_no_redirect_and_reads_no_oversized_answer() {
        let (dev, signer, url) = dev_login().await;
        let jwks = crate::dev::signer::jwks(&[&signer]).to_string();
        let followed = dev.serve_jwks_elsewhere(jwks, MAX_BODY + 1);
        let (_dir, secret) = secret_file();
        let metadata_with = |member: &str, value: Value| {
            dev.set_discovery_member("/human", member, value);
            // A new provider each time: nothing cached.
            let p = provider(&url, &secret);
            async move { p.metadata(false).await.map(|_| ()) }
        };
        let at = |path: &str| Value::String(format!("{}{path}", dev.base_url()));

        let moved = metadata_with("jwks_uri", at("/elsewhere/moved")).await;
        assert!(moved.is_err(), "a redirected JWKS was taken");
        assert_eq!(followed.load(Ordering::SeqCst), 0, "the redirect was followed");
        let big = metadata_with("jwks_uri", at("/elsewhere/big")).await;
        assert!(big.is_err(), "a JWKS over the size limit was taken");
        let direct = metadata_with("jwks_uri", at("/elsewhere/jwks.json")).await;
        assert_eq!(direct, Ok(()), "the same JWKS served directly did not load");
        // A discovery document over the limit.
        let padded = metadata_with("padding", Value::String(" ".repeat(MAX_BODY))).await;
        assert!(padded.is_err(), "a discovery document over the size limit was taken");
    }

    /// The endpoints a browser is sent to (authorization, end-session) and the token
    /// endpoint must be https, as the key fetches must (plain http only on loopback with
    /// `insecure_http`): a provider behind a TLS-terminating proxy that advertises
    /// `http://` (a common Keycloak mistake) had the browser sent there, the password
    /// typed over plain http, before the token endpoint's own check refused the code.
    /// `javascript:` and credentials (`user:pw@`) are no better.
    #[tokio::test]
    async fn a_discovery_document_sending_the_browser_to_plain_http_is_refused() {
        let (dev, _, url) = dev_login().await;
        let (_dir, secret) = secret_file();
        // The dev issuer's own (loopback http, which the test issuer allows) load.
        let fresh = provider(&url, &secret);
        assert_eq!(fresh.metadata(false).await.map(|_| ()), Ok(()));

        for member in ["authorization_endpoint", "end_session_endpoint", "token_endpoint"] {
            for bad in [
                "http://idp.example/endpoint",
                "javascript:alert(1)",
                "https://user:pw@idp.example/endpoint",
            ] {
                dev.set_discovery_member("/human", member, Value::String(bad.into()));
                let p = provider(&url, &secret);
                assert!(p.metadata(false).await.is_err(), "{member} = {bad} was taken");
                assert!(p.authorize("https://proxy.example/cb").await.is_err());
                assert_eq!(p.end_session_endpoint().await, None);
            }
            dev.set_discovery_member(
                "/human",
                member,
                Value::String(format!("https://idp.example/{member}")),
            );
        }
        let https = provider(&url, &secret);
        assert_eq!(https.metadata(false).await.map(|_| ()), Ok(()));
    }

    /// A code exchange and a refresh against the provider's token endpoint replaced by
    /// one answering `status` and `body` (JSON) at `path`: their errors.
    async fn token_endpoint_answering(
        dev: &crate::dev::issuer::DevIssuer,
        url: &str,
        path: &str,
        status: http::StatusCode,
        body: String,
    ) -> [Result<(), LoginError>; 2] {
        dev.add_handler(
            path,
            Arc::new(move |_| {
                http::Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body.clone())))
                    .ok()
            }),
        );
        dev.set_discovery_member(
            "/human",
            "token_endpoint",
            Value::String(format!("{}{path}", dev.base_url())),
        );
        let (_dir, secret) = secret_file();
        let p = provider(url, &secret);
        let exchanged = p
            .exchange("code".into(), "v".repeat(43), "nonce", "https://proxy.example/cb", 0)
            .await
            .map(|_| ());
        let refreshed = p.refresh("refresh-token").await.map(|_| ());
        [exchanged, refreshed]
    }

    /// A token endpoint's error answer is the provider's text: its `error` reached the
    /// log of a failed code exchange or refresh whole (a refresh's in the text log, where
    /// a newline starts a line the provider wrote, up to the 1 MiB answer). Only what an
    /// OAuth error code is made of (RFC 6749 §5.2's registered codes: small letters and
    /// `_`), at most 40 characters, is shown.
    #[tokio::test]
    async fn a_token_endpoint_error_reaches_the_log_only_as_an_error_code() {
        let (dev, _, url) = dev_login().await;
        let forged = format!(
            "invalid_grant\n2026-11-27T12:00:00Z  INFO portcullis: ADMIN SIGNED IN\u{1b}[2K{}",
            "x".repeat(100_000)
        );
        let body = serde_json::json!({ "error": forged, "error_description": "DESCRIBED" });
        let status = http::StatusCode::BAD_REQUEST;
        let results =
            token_endpoint_answering(&dev, &url, "/refusing-token", status, body.to_string()).await;
        for result in results {
            let Err(LoginError(text)) = result else {
                panic!("a refusing token endpoint gave a session: {result:?}")
            };
            assert!(text.starts_with("token endpoint refused: invalid_grant"), "{text}");
            assert!(text.len() < 100, "{} bytes of the provider's text", text.len());
            assert!(text.chars().all(|c| !c.is_control() && !c.is_ascii_uppercase()), "{text:?}");
        }
    }

    /// A token endpoint's answer is parsed by the `openidconnect` crate on a runtime
    /// thread: it was read up to the 1 MiB of a discovery document, where real ones are a
    /// few KiB. One over 256 KiB is refused before any parse, for a code exchange and a
    /// refresh alike, and the log says so (not "did not parse").
    #[tokio::test]
    async fn a_token_endpoint_answer_over_256_kib_is_refused_before_it_is_parsed() {
        let (dev, _, url) = dev_login().await;
        let body = serde_json::json!({
            "access_token": "at",
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": "e30.e30.sig",
            "padding": "x".repeat(256 * 1024),
        })
        .to_string();
        assert!(body.len() < MAX_BODY, "within the discovery limit, over the token one");
        let results =
            token_endpoint_answering(&dev, &url, "/huge-token", http::StatusCode::OK, body).await;
        for result in results {
            let Err(LoginError(text)) = result else {
                panic!("an oversized token answer gave a session: {result:?}")
            };
            assert!(text.starts_with("token endpoint: response body of "), "{text}");
            assert!(text.ends_with("larger than 256 KiB"), "{text}");
        }
    }

    /// Each sign-in started (anyone's request for a protected page, no credential
    /// needed) built the client from the provider's document anew: a JSON round trip of
    /// the whole discovery document and a copy of its key set. A provider with a large
    /// document (a 1 MiB `claims_supported`, a key set of 2 000 keys) made each such
    /// request cost some 40 times a usual one. The client is built once per fetch of the
    /// document; each request sets only its own `redirect_uri`.
    #[tokio::test]
    async fn a_sign_in_start_does_not_rebuild_the_client_from_the_providers_document() {
        let (dev, _, url) = dev_login().await;
        let claims: Vec<Value> = (0..1000).map(|i| Value::String(format!("claim{i}"))).collect();
        dev.set_discovery_member("/human", "claims_supported", Value::Array(claims));
        let (_dir, secret) = secret_file();
        let p = provider(&url, &secret);
        for host in ["a.example", "b.example", "a.example", "c.example"] {
            let auth = p
                .authorize(&format!("https://{host}/cb"))
                .await
                .unwrap_or_else(|e| panic!("authorize: {e:?}"));
            let wanted = format!("redirect_uri=https%3A%2F%2F{host}%2Fcb");
            assert!(auth.url.contains(&wanted), "{} lacks {wanted}", auth.url);
            assert_eq!(auth.url.matches("redirect_uri=").count(), 1, "{}", auth.url);
        }
        assert_eq!(p.end_session_endpoint().await.map(|e| e.ends_with("/logout")), Some(true));
        assert_eq!(p.client_builds.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// Every algorithm an issuer may allow (V4) has its `openidconnect` name: none drops
    /// out of a login's allowlist.
    #[test]
    fn every_issuer_algorithm_is_known_to_the_login_verifier() {
        for name in
            ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
        {
            let alg = crate::identity::Algorithm::parse(name).map(|a| a.name());
            assert_eq!(alg, Some(name));
            let core: Result<CoreJwsSigningAlgorithm, _> =
                serde_json::from_value(Value::String(name.into()));
            assert!(core.is_ok(), "{name}");
        }
    }

    /// A provider that accepts connections and never answers: concurrent sign-ins wait
    /// for one fetch and then fail together, instead of each waiting out its own
    /// timeout behind the others (three callers took 3 × 10 s before).
    #[tokio::test(start_paused = true)]
    async fn a_silent_provider_is_asked_once_and_every_waiting_caller_fails_with_it() {
        let (_dir, secret) = secret_file();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        tokio::spawn({
            let accepted = accepted.clone();
            async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    held.push(s);
                }
            }
        });
        let p = Arc::new(provider(&format!("http://{addr}"), &secret));
        let start = tokio::time::Instant::now();
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.metadata(false).await })
            })
            .collect();
        for c in callers {
            let r = c.await.unwrap_or_else(|e| panic!("join: {e}"));
            assert!(r.is_err(), "a silent provider gave metadata");
        }
        let waited = start.elapsed();
        assert!(waited < HTTP_TIMEOUT * 2, "callers queued behind each other: {waited:?}");
        assert!(accepted.load(Ordering::SeqCst) <= 1, "asked more than once");
        // Within the retry pause, a new caller gets the failure without waiting.
        let again = tokio::time::Instant::now();
        assert!(p.metadata(false).await.is_err());
        assert!(again.elapsed() < Duration::from_secs(1));
    }
}
