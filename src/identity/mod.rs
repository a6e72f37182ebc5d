//! Who is calling: credential extraction, issuer registry, JWKS cache, JWT verification.
//!
//! The output of this module is an [`Identity`]: verified, typed, with CI claims of
//! Bitbucket Pipelines, GitHub Actions and GitLab CI normalized into one [`CiContext`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

mod admission;
mod cache;
pub mod ci;
mod claim_path;
mod jwks;
#[cfg(test)]
pub(crate) mod tests;
mod token;
pub mod verify;

pub use admission::{Admission, Credential};
pub use cache::{LastToken, DEFAULT_CAPACITY as DEFAULT_TOKEN_CACHE_ENTRIES};
pub use claim_path::ClaimPath;
pub use token::{MAX_KID_LEN, MAX_TOKEN_LEN};
pub use verify::{
    authorization_holds_a_token, extract_bearer, iat_required, unverified_identity,
    CredentialSource, SigningKey, Verifier, MAX_LEEWAY,
};

/// The configured name of an issuer (`[issuers.NAME]`), not its URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct IssuerId(pub Arc<str>);

impl IssuerId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IssuerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of principal a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    Human,
    Pipeline,
    Service,
}

impl PrincipalKind {
    /// The name the audit log and the identity headers use (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Human => "human",
            PrincipalKind::Pipeline => "pipeline",
            PrincipalKind::Service => "service",
        }
    }
}

/// Which provider's claim vocabulary an issuer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    BitbucketPipelines,
    GithubActions,
    GitlabCi,
    /// Any other OpenID provider (Okta, Google, Entra, Keycloak, oidc-provider, ...).
    Oidc,
}

impl Preset {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bitbucket-pipelines" => Preset::BitbucketPipelines,
            "github-actions" => Preset::GithubActions,
            "gitlab-ci" => Preset::GitlabCi,
            "oidc" => Preset::Oidc,
            _ => return None,
        })
    }
    pub const fn name(self) -> &'static str {
        match self {
            Preset::BitbucketPipelines => "bitbucket-pipelines",
            Preset::GithubActions => "github-actions",
            Preset::GitlabCi => "gitlab-ci",
            Preset::Oidc => "oidc",
        }
    }
    /// Whether anyone on the platform can mint a token from this issuer, so that a rule
    /// must pin a repository, workspace or owner (V22). Every CI preset is: GitHub and
    /// gitlab.com are shared by everyone, a Bitbucket workspace issuer by every
    /// repository in the workspace, and a self-managed GitLab by every project on it.
    pub const fn is_shared(self) -> bool {
        !matches!(self, Preset::Oidc)
    }
    pub const fn default_kind(self) -> PrincipalKind {
        match self {
            Preset::Oidc => PrincipalKind::Human,
            _ => PrincipalKind::Pipeline,
        }
    }
}

/// Which kind of JWT an issuer's tokens must be (RFC 8725 §3.11, RFC 9068).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenType {
    /// ID tokens and CI tokens: `typ` absent or `JWT`; `at+jwt` rejected.
    Id,
    /// RFC 9068 access tokens: `typ` must be `at+jwt`.
    Access,
}

/// JWS algorithms the proxy can verify. `none` and `HS*` are unrepresentable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Algorithm {
    /// Exact, case-sensitive (V4).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            _ => return None,
        })
    }
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }
    /// The JWK `kty` this algorithm's keys must have (V5).
    pub const fn key_type(self) -> &'static str {
        match self {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => "RSA",
            Algorithm::ES256 | Algorithm::ES384 => "EC",
            Algorithm::EdDSA => "OKP",
        }
    }
}

/// An issuer as configured, compiled from `[issuers.NAME]`. Plain data; the
/// [`Verifier`] owns the live key state.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub id: IssuerId,
    pub preset: Preset,
    /// The exact `iss` value (V6, V13).
    pub issuer: String,
    /// Where the discovery document lives; default `<issuer>/.well-known/openid-configuration`.
    pub discovery_url: String,
    /// At least one must be in the token's `aud` (V14).
    pub audiences: Vec<String>,
    /// Allowlist (V4); never empty.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerance (V19); at most 300 s.
    pub leeway: Duration,
    /// Reject tokens whose `iat` is older than this (V18).
    pub max_token_age: Option<Duration>,
    pub kind: PrincipalKind,
    pub token_type: TokenType,
    /// For human ID tokens: `azp`, when present, must equal this (V15).
    pub client_id: Option<String>,
    /// For human ID tokens: the authentication context classes the issuer's `login`
    /// asks for (`extra_params.acr_values`), one of which the token's `acr` must be, as
    /// at a browser sign-in. Empty: `acr` is not looked at.
    pub acr_values: Vec<String>,
    /// Google Workspace: require `hd` == this and `email_verified` == true (V24).
    pub hosted_domain: Option<String>,
    /// Where group names are (default `groups`): a top-level claim, or a JSON Pointer
    /// into nested ones (`/realm_access/roles`).
    pub groups_claim: ClaimPath,
    /// Extra trust anchors for the discovery and JWKS fetches (PEM file).
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` discovery/JWKS URLs; only honoured for loopback hosts.
    pub insecure_http: bool,
    /// Serve the last good key set this long after fetches start failing (§11.7).
    pub stale_window: Duration,
    /// At most one refresh per this interval on an unknown `kid` (§11.3).
    pub refresh_cooldown: Duration,
}

// === impl IssuerSettings ===

impl IssuerSettings {
    /// An issuer known by its name and preset alone, every other setting at the default
    /// docs/configuration.md gives (no `issuer` URL or audiences, so it verifies no
    /// token): the catalog entry of an issuer whose section did not compile, whose
    /// policies are still checked, and the start of a unit test's settings.
    pub fn declared(id: &str, preset: Preset) -> IssuerSettings {
        IssuerSettings {
            id: IssuerId(Arc::from(id)),
            preset,
            issuer: String::new(),
            discovery_url: String::new(),
            audiences: Vec::new(),
            algorithms: vec![Algorithm::RS256],
            leeway: Duration::from_secs(60),
            max_token_age: None,
            kind: preset.default_kind(),
            token_type: TokenType::Id,
            client_id: None,
            acr_values: Vec::new(),
            hosted_domain: None,
            groups_claim: ClaimPath::default(),
            ca_file: None,
            insecure_http: false,
            stale_window: Duration::from_secs(24 * 3600),
            refresh_cooldown: Duration::from_secs(30),
        }
    }
}

/// A verified caller. Built only by the verifier (or the session layer), never from
/// unverified input.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    /// The configured issuer name.
    pub issuer: IssuerId,
    pub subject: String,
    pub kind: PrincipalKind,
    pub email: Option<String>,
    /// `email_verified == true` in the token (typed, never coerced; V21).
    pub email_verified: bool,
    pub groups: Vec<String>,
    /// False when the provider signalled group overage (Entra `_claim_names`; V25):
    /// group rules then fail closed with `groups-unknown`.
    pub groups_known: bool,
    /// When this identity stops being valid, Unix seconds: the token's `exp`, or
    /// `iat + max_token_age` when that comes first (a bearer identity), or the session's
    /// end. WebSocket tunnels, database sessions and assertions end there.
    pub expires_at: u64,
    pub issued_at: Option<u64>,
    pub ci: Option<CiContext>,
    /// Every verified payload claim, for `claims = { ... }` policy matchers.
    #[serde(skip)]
    pub claims: Claims,
    /// Its audit fields, serialized on first use ([`Identity::audit_fields`]).
    #[serde(skip)]
    pub audit: crate::audit::AuditJson,
}

impl Identity {
    /// `issuer/subject`: the namespaced principal id used in logs.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }

    /// For unit tests: `subject` of `issuer`, of `kind`, with nothing else (no email,
    /// groups, CI context or claims; groups known; valid until 2033). A test sets what
    /// it needs with struct update: `Identity { email: …, ..Identity::test("corp",
    /// "alice", PrincipalKind::Human) }`.
    #[cfg(test)]
    pub(crate) fn test(issuer: &str, subject: &str, kind: PrincipalKind) -> Identity {
        Identity {
            issuer: IssuerId(std::sync::Arc::from(issuer)),
            subject: subject.into(),
            kind,
            email: None,
            email_verified: false,
            groups: Vec::new(),
            groups_known: true,
            expires_at: 2_000_000_000,
            issued_at: None,
            ci: None,
            claims: Claims::default(),
            audit: Default::default(),
        }
    }
}

/// Every claim of a verified payload, kept as the JSON text that was verified and
/// parsed on first use: most policies match on the normalized fields, and a cached
/// identity then holds one string instead of a map of a few dozen allocations
/// (about a sixth of a cached identity's memory with its assertion: benches/README.md).
///
/// A token's identity has every claim of its payload. A browser session's has only the
/// claims the session kept at sign-in ([`Claims::kept_only`]): policy then tells a claim
/// the token did not have (absent) from one the session did not keep ([`Claims::is_kept`]),
/// and a deny naming the latter fails closed.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    json: Box<str>,
    parsed: std::sync::OnceLock<serde_json::Map<String, serde_json::Value>>,
    /// `None`: every claim of the payload is here. `Some`: only these names are known;
    /// any other may have been in the ID token.
    kept: Option<Box<[Box<str>]>>,
}

impl Claims {
    /// From a verified payload's JSON text (a JSON object).
    pub(crate) fn from_verified_json(json: Box<str>) -> Self {
        Self { json, parsed: std::sync::OnceLock::new(), kept: None }
    }

    /// Claims of which only the names in `kept` are known (a browser session's): a name
    /// in `kept` but not in `map` was absent from the ID token; a name in neither may
    /// have been there, and was not kept.
    pub fn kept_only(
        map: serde_json::Map<String, serde_json::Value>,
        kept: impl IntoIterator<Item = impl Into<Box<str>>>,
    ) -> Self {
        let mut claims = Self::from(map);
        claims.kept = Some(kept.into_iter().map(Into::into).collect());
        claims
    }

    /// Whether the value of claim `name` is known: always for a token's claims; for a
    /// session's, when the session kept it. An unknown claim is never in [`Claims::map`].
    pub fn is_kept(&self, name: &str) -> bool {
        self.kept.as_ref().is_none_or(|k| k.iter().any(|n| **n == *name))
    }

    /// Whether the provider put claim `name` elsewhere, so the token has no value for
    /// it: named in `_claim_names` (OIDC Core §5.6.2 distributed and aggregated claims,
    /// Entra's group overage), or `groups` beside a `hasgroups` that is not `false`
    /// (Entra's implicit-flow overage). `_claim_sources` is never fetched (V25).
    pub fn held_elsewhere(&self, name: &str) -> bool {
        held_elsewhere(self.map(), name)
    }

    /// Whether policy may read claim `name` as the token (or session) has it: kept
    /// ([`Claims::is_kept`]) and not held elsewhere ([`Claims::held_elsewhere`]). A
    /// `claims.NAME` condition on an unknown claim fails closed.
    pub fn is_known(&self, name: &str) -> bool {
        self.is_kept(name) && !self.held_elsewhere(name)
    }

    /// One claim by name.
    pub fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.map().get(name)
    }

    /// All claims. The text was parsed strictly once already, so parsing cannot fail;
    /// if it somehow did, the identity has no claims and claim matchers fail closed.
    pub fn map(&self) -> &serde_json::Map<String, serde_json::Value> {
        self.parsed.get_or_init(|| match token::parse_strict_json(self.json.as_bytes()) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        })
    }
}

/// [`Claims::held_elsewhere`] of a token's claims `map`.
pub(crate) fn held_elsewhere(map: &serde_json::Map<String, serde_json::Value>, name: &str) -> bool {
    map.get("_claim_names")
        .and_then(serde_json::Value::as_object)
        .is_some_and(|names| names.contains_key(name))
        || (name == "groups"
            && map.get("hasgroups").is_some_and(|v| *v != serde_json::Value::Bool(false)))
}

impl From<serde_json::Map<String, serde_json::Value>> for Claims {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Self {
        // Already parsed: the text is never needed.
        let parsed = std::sync::OnceLock::new();
        let _ = parsed.set(map);
        Self { json: Box::default(), parsed, kept: None }
    }
}

impl Serialize for Claims {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map().serialize(s)
    }
}

/// CI claims of all three providers in one vocabulary, so one audit schema and one
/// policy language cover them. Raw claims stay matchable through `claims`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct CiContext {
    pub provider: &'static str,
    /// Bitbucket `workspaceUuid`, GitHub `repository_owner`, GitLab `namespace_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Immutable owner id: Bitbucket `workspaceUuid`, GitHub `repository_owner_id`,
    /// GitLab `namespace_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// Bitbucket `repositoryUuid`, GitHub `repository` (`owner/name`), GitLab `project_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Immutable repository id: Bitbucket `repositoryUuid`, GitHub `repository_id`,
    /// GitLab `project_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
    /// Branch name when the ref is a branch (`main`, not `refs/heads/main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Tag name when the ref is a tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Full git ref (`refs/heads/main`).
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Bitbucket `deploymentEnvironmentUuid`, GitHub/GitLab `environment`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Bitbucket `pipelineUuid`, GitHub `workflow_ref`, GitLab `ci_config_ref_uri`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Bitbucket `pipelineRunUuid`, GitHub `run_id`-`run_attempt`, GitLab `pipeline_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Bitbucket `stepUuid`, GitHub `job_workflow_ref`, GitLab `job_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// GitHub `actor`, GitLab `user_login`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl CiContext {
    /// The normalized field names policy `ci = { ... }` matchers may use.
    pub const FIELDS: &'static [&'static str] = &[
        "workspace",
        "workspace_id",
        "repository",
        "repository_id",
        "branch",
        "tag",
        "ref",
        "environment",
        "commit",
        "pipeline",
        "run",
        "step",
        "actor",
    ];

    /// A normalized field by name (one of [`CiContext::FIELDS`]).
    pub fn field(&self, name: &str) -> Option<&str> {
        match name {
            "workspace" => self.workspace.as_deref(),
            "workspace_id" => self.workspace_id.as_deref(),
            "repository" => self.repository.as_deref(),
            "repository_id" => self.repository_id.as_deref(),
            "branch" => self.branch.as_deref(),
            "tag" => self.tag.as_deref(),
            "ref" => self.git_ref.as_deref(),
            "environment" => self.environment.as_deref(),
            "commit" => self.commit.as_deref(),
            "pipeline" => self.pipeline.as_deref(),
            "run" => self.run.as_deref(),
            "step" => self.step.as_deref(),
            "actor" => self.actor.as_deref(),
            _ => None,
        }
    }

    /// Appends this context as a JSON object (`provider`, then the fields present in
    /// [`CiContext::FIELDS`] order), each string written by `string`: the audit log's
    /// escaping or the assertion's, which differ only in how they escape.
    pub fn write_json(&self, out: &mut Vec<u8>, string: fn(&mut Vec<u8>, &str)) {
        out.extend_from_slice(b"{\"provider\":");
        string(out, self.provider);
        for &name in Self::FIELDS {
            if let Some(value) = self.field(name) {
                out.push(b',');
                string(out, name);
                out.push(b':');
                string(out, value);
            }
        }
        out.push(b'}');
    }
}

/// A rejected credential: the stable reason for responses and metrics, and a detail
/// for the log only. The detail never contains the token or any part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub reason: crate::reason::Reason,
    pub detail: std::borrow::Cow<'static, str>,
}

impl AuthError {
    pub fn new(
        reason: crate::reason::Reason,
        detail: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Self {
        Self { reason, detail: detail.into() }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}
