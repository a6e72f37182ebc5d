//! `portcullis dev token`: tokens shaped exactly like each provider's (claim names and
//! JSON types from the providers' documentation), signed by the demo's dev issuer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::signer::DevSigner;
use crate::identity::Algorithm;

/// Demo values the demo policy (`policies/demo.toml`) is written against.
pub const DEMO_AUDIENCE: &str = "portcullis-demo";
pub const DEMO_BB_WORKSPACE: &str = "{0c0ffee0-1234-4abc-8def-0123456789ab}";
pub const DEMO_BB_REPOSITORY: &str = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}";
pub const DEMO_GH_OWNER_ID: &str = "1001";
pub const DEMO_GL_NAMESPACE_ID: &str = "2001";

/// The presets `dev token --preset` knows.
pub const PRESETS: &[&str] = &["bitbucket-pipelines", "github-actions", "gitlab-ci", "human"];

/// What `portcullis demo` writes for `dev token` to find its issuer and key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoState {
    /// Preset name → issuer URL.
    pub issuers: std::collections::BTreeMap<String, String>,
    pub audience: String,
    pub kid: String,
    /// PKCS#8 DER of the RS256 signing key, relative to the state directory.
    pub key_file: String,
    pub proxy_url: String,
    pub ca_file: PathBuf,
}

impl DemoState {
    pub const FILE: &'static str = "demo.json";

    pub fn load(dir: &Path) -> Result<(DemoState, DevSigner), String> {
        let p = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| format!("{}: {e} (start `portcullis demo` first)", p.display()))?;
        let state: DemoState =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let kp = dir.join(&state.key_file);
        let der = std::fs::read(&kp).map_err(|e| format!("{}: {e}", kp.display()))?;
        let signer = DevSigner::from_pkcs8_der(Algorithm::RS256, state.kid.clone(), &der)
            .map_err(|e| format!("{}: {e}", kp.display()))?;
        Ok((state, signer))
    }
}

/// Deterministic-looking but fresh UUID-ish values, so every token has its own run/step.
fn uuid(braced: bool) -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let u = format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]);
    if braced {
        format!("{{{u}}}")
    } else {
        u
    }
}

/// The header and payload of a preset token, before overrides.
pub fn preset_claims(
    preset: &str,
    issuer: &str,
    audience: &str,
    now: u64,
    ttl: u64,
) -> Option<(Value, Value)> {
    let exp = now + ttl;
    let sha = "714a629c0b401fdce83e847fc9589983fc6f46bc";
    Some(match preset {
        "bitbucket-pipelines" => {
            let step = uuid(true);
            (
                json!({"alg": "RS256"}),
                json!({
                    "iss": issuer,
                    "aud": [format!("ari:cloud:bitbucket::workspace/{}", DEMO_BB_WORKSPACE.trim_matches(|c| c == '{' || c == '}')), audience],
                    "sub": format!("{DEMO_BB_REPOSITORY}:{step}"),
                    "iat": now,
                    "exp": exp,
                    "workspaceUuid": DEMO_BB_WORKSPACE,
                    "repositoryUuid": DEMO_BB_REPOSITORY,
                    "pipelineUuid": uuid(true),
                    "pipelineRunUuid": uuid(true),
                    "stepUuid": step,
                    "branchName": "main",
                }),
            )
        }
        "github-actions" => (
            json!({"typ": "JWT", "alg": "RS256"}),
            json!({
                "jti": uuid(false),
                "sub": "repo:demo-org/demo-api:ref:refs/heads/main",
                "aud": audience,
                "iss": issuer,
                "nbf": now.saturating_sub(600),
                "iat": now,
                "exp": exp,
                "ref": "refs/heads/main",
                "ref_type": "branch",
                "sha": sha,
                "repository": "demo-org/demo-api",
                "repository_id": "1002",
                "repository_owner": "demo-org",
                "repository_owner_id": DEMO_GH_OWNER_ID,
                "repository_visibility": "private",
                "actor": "octocat",
                "actor_id": "12",
                "run_id": "9876543210",
                "run_number": "10",
                "run_attempt": "1",
                "runner_environment": "github-hosted",
                "workflow": "deploy",
                "workflow_ref": "demo-org/demo-api/.github/workflows/deploy.yml@refs/heads/main",
                "workflow_sha": sha,
                "job_workflow_ref": "demo-org/demo-api/.github/workflows/deploy.yml@refs/heads/main",
                "event_name": "push",
                "head_ref": "",
                "base_ref": "",
            }),
        ),
        "gitlab-ci" => (
            json!({"typ": "JWT", "alg": "RS256"}),
            json!({
                "iss": issuer,
                "aud": audience,
                "sub": "project_path:demo-group/demo-api:ref_type:branch:ref:main",
                "jti": uuid(false),
                "iat": now,
                "nbf": now.saturating_sub(5),
                "exp": exp,
                "namespace_id": DEMO_GL_NAMESPACE_ID,
                "namespace_path": "demo-group",
                "project_id": "2002",
                "project_path": "demo-group/demo-api",
                "user_id": "1",
                "user_login": "demo-user",
                "pipeline_id": "574",
                "pipeline_source": "push",
                "job_id": "302",
                "ref": "main",
                "ref_type": "branch",
                "ref_path": "refs/heads/main",
                "ref_protected": "true",
                "runner_id": 1,
                "runner_environment": "gitlab-hosted",
                "sha": sha,
                "project_visibility": "private",
            }),
        ),
        "human" => (
            json!({"typ": "JWT", "alg": "RS256"}),
            json!({
                "iss": issuer,
                "aud": audience,
                "azp": audience,
                "sub": "demo-user",
                "iat": now,
                "exp": exp,
                "auth_time": now,
                "email": "dev@demo.example",
                "email_verified": true,
                "name": "Demo Engineer",
                "preferred_username": "dev",
                "groups": ["engineering"],
            }),
        ),
        _ => return None,
    })
}

/// Applies `key=value` (string) and `key:=json` (typed; `key:=null` removes) overrides.
pub fn apply_overrides(payload: &mut Value, overrides: &[String]) -> Result<(), String> {
    let Some(map) = payload.as_object_mut() else { return Err("payload is not an object".into()) };
    for o in overrides {
        if let Some((k, v)) = o.split_once(":=") {
            let v: Value =
                serde_json::from_str(v).map_err(|e| format!("--claim {k}:=…: not JSON: {e}"))?;
            if v.is_null() {
                map.remove(k);
            } else {
                map.insert(k.to_string(), v);
            }
        } else if let Some((k, v)) = o.split_once('=') {
            map.insert(k.to_string(), Value::String(v.to_string()));
        } else {
            return Err(format!("--claim `{o}`: expected key=value or key:=json"));
        }
    }
    Ok(())
}

/// The claim a `--claim` override sets or removes (`key=value`, `key:=json`).
fn override_key(o: &str) -> Option<&str> {
    o.split_once(":=").or_else(|| o.split_once('=')).map(|(k, _)| k)
}

/// The claims a provider builds `sub` from, for a preset.
pub fn sub_components(preset: &str) -> &'static [&'static str] {
    match preset {
        "bitbucket-pipelines" => &["repositoryUuid", "stepUuid", "deploymentEnvironmentUuid"],
        "github-actions" => &["repository", "ref", "environment", "event_name"],
        "gitlab-ci" => &["project_path", "ref_type", "ref"],
        _ => &[],
    }
}

/// `sub` as the provider builds it from the other claims, when they are all there
/// (strings): Bitbucket `{repositoryUuid}:{stepUuid}`, or
/// `{repositoryUuid}:{deploymentEnvironmentUuid}:{stepUuid}` for a step with a
/// deployment environment; GitHub `repo:OWNER/REPO:environment:NAME` when the job has
/// an environment, else `repo:OWNER/REPO:pull_request` for a `pull_request` event, else
/// `repo:OWNER/REPO:ref:REF`; GitLab `project_path:P:ref_type:T:ref:R` (each provider's
/// default format).
pub fn derived_sub(preset: &str, payload: &Map<String, Value>) -> Option<String> {
    let get = |k: &str| payload.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    match preset {
        "bitbucket-pipelines" => {
            let (repo, step) = (get("repositoryUuid")?, get("stepUuid")?);
            Some(match get("deploymentEnvironmentUuid") {
                Some(env) => format!("{repo}:{env}:{step}"),
                None => format!("{repo}:{step}"),
            })
        }
        "github-actions" => {
            let repo = get("repository")?;
            Some(match (get("environment"), get("event_name")) {
                (Some(env), _) => format!("repo:{repo}:environment:{env}"),
                (None, Some("pull_request")) => format!("repo:{repo}:pull_request"),
                (None, _) => format!("repo:{repo}:ref:{}", get("ref")?),
            })
        }
        "gitlab-ci" => Some(format!(
            "project_path:{}:ref_type:{}:ref:{}",
            get("project_path")?,
            get("ref_type")?,
            get("ref")?
        )),
        _ => None,
    }
}

/// [`apply_overrides`] for a preset's payload, keeping `sub` consistent: when an
/// override sets or removes a claim the provider builds `sub` from
/// ([`sub_components`]), `sub` is built again from the result ([`derived_sub`]).
/// An explicit `--claim sub=…` always wins.
pub fn apply_preset_overrides(
    preset: &str,
    payload: &mut Value,
    overrides: &[String],
) -> Result<(), String> {
    apply_overrides(payload, overrides)?;
    let keys: Vec<&str> = overrides.iter().filter_map(|o| override_key(o)).collect();
    let components = sub_components(preset);
    if keys.contains(&"sub") || !keys.iter().any(|k| components.contains(k)) {
        return Ok(());
    }
    if let Some(map) = payload.as_object_mut() {
        if let Some(sub) = derived_sub(preset, map) {
            map.insert("sub".into(), Value::String(sub));
        }
    }
    Ok(())
}

/// The longest lifetime `dev token --ttl` takes: a day. CI tokens live minutes to
/// hours; a longer one is a typo (or a stand-in for a credential the demo does not
/// mean to model).
pub const MAX_TTL: u64 = 24 * 60 * 60;

/// `dev token --ttl`: whole seconds from 1 to [`MAX_TTL`], else why not. `0` read as
/// "no limit" or "a token that expires at once" and minted one whose `exp` was its
/// `iat` (the demo's 60 s leeway still took it); a number past `u64` (or `now` + it)
/// overflowed.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let secs: u64 = text.parse().map_err(|_| {
        format!("`{text}` is not a whole number of seconds (1 to {MAX_TTL}; `15m` is written 900)")
    })?;
    match secs {
        0 => Err(format!(
            "a token must live at least 1 s: 0 mints one expired when it is issued (there is no \"never expires\"); give 1 to {MAX_TTL} seconds"
        )),
        s if s > MAX_TTL => Err(format!(
            "{s} s is longer than a day: the demo's tokens stand in for CI and sign-in tokens, which live minutes to hours; give 1 to {MAX_TTL} seconds"
        )),
        s => Ok(s),
    }
}

/// Mints one token for a preset from the demo state.
pub fn mint(
    state: &DemoState,
    signer: &DevSigner,
    preset: &str,
    overrides: &[String],
    now: u64,
    ttl: u64,
) -> Result<String, String> {
    let issuer = state.issuers.get(preset).ok_or_else(|| {
        format!("unknown preset `{preset}`, expected one of: {}", PRESETS.join(", "))
    })?;
    let (mut header, mut payload) = preset_claims(preset, issuer, &state.audience, now, ttl)
        .ok_or_else(|| format!("unknown preset `{preset}`"))?;
    if let Some(h) = header.as_object_mut() {
        h.insert("kid".into(), Value::String(signer.kid().to_string()));
    }
    apply_preset_overrides(preset, &mut payload, overrides)?;
    Ok(signer.sign(&header, &payload))
}

/// The claims of a preset as a map (for `policy explain --preset`).
pub fn preset_payload(preset: &str) -> Option<Map<String, Value>> {
    preset_claims(preset, "", DEMO_AUDIENCE, 0, 0).and_then(|(_, p)| p.as_object().cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--ttl 0` minted a token that expired as it was issued, silently; a huge value
    /// overflowed `now + ttl`. Each nonsense value is refused with its reason.
    #[test]
    fn a_ttl_of_zero_or_beyond_a_day_or_not_a_number_is_refused_with_why() {
        assert_eq!(parse_ttl("1"), Ok(1));
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("86400"), Ok(MAX_TTL));
        for (text, why) in [
            ("0", "expired when it is issued"),
            ("86401", "longer than a day"),
            ("18446744073709551615", "longer than a day"),
            ("18446744073709551616", "not a whole number of seconds"),
            ("15m", "`15m` is written 900"),
            ("-5", "not a whole number"),
            ("", "not a whole number"),
        ] {
            let e = parse_ttl(text).err().unwrap_or_default();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn overrides_are_strings_unless_typed() {
        let mut p = json!({"branchName": "main", "runner_id": 1});
        let r = apply_overrides(
            &mut p,
            &[
                "branchName=feature/x".into(),
                "runner_id:=2".into(),
                "x:=true".into(),
                "runner_id:=null".into(),
            ],
        );
        assert_eq!(r, Ok(()));
        assert_eq!(p, json!({"branchName": "feature/x", "x": true}));
        assert!(apply_overrides(&mut p, &["nonsense".into()]).is_err());
    }

    #[test]
    fn presets_follow_the_provider_shapes() {
        let (_, bb) = preset_claims("bitbucket-pipelines", "https://i/bb", "aud", 100, 60)
            .unwrap_or_default();
        assert_eq!(bb["repositoryUuid"], DEMO_BB_REPOSITORY);
        assert!(bb["aud"].is_array(), "bitbucket aud is an array once a custom audience is set");
        let (h, gh) =
            preset_claims("github-actions", "https://i/gh", "aud", 1000, 300).unwrap_or_default();
        assert_eq!(h["typ"], "JWT");
        assert!(gh["repository_id"].is_string(), "GitHub ids are strings");
        assert_eq!(gh["nbf"], 400);
        let (_, gl) =
            preset_claims("gitlab-ci", "https://i/gl", "aud", 100, 60).unwrap_or_default();
        assert!(gl["runner_id"].is_number() && gl["ref_protected"].is_string());
        assert!(preset_claims("nope", "", "", 0, 0).is_none());
    }

    fn minted(preset: &str, overrides: &[&str]) -> Value {
        let (_, mut p) = preset_claims(preset, "https://i", "aud", 100, 60).unwrap_or_default();
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        assert_eq!(apply_preset_overrides(preset, &mut p, &o), Ok(()));
        p
    }

    #[test]
    fn sub_follows_the_claims_it_is_built_from() {
        const REPO: &str = "{2e9e429c-7b8b-404f-8648-8c40c27c9ebd}";
        const ENV: &str = "{5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}";
        // Bitbucket: {repositoryUuid}:{stepUuid}, with the environment in the middle.
        let bb = minted("bitbucket-pipelines", &[&format!("repositoryUuid={REPO}")]);
        let step = bb["stepUuid"].as_str().unwrap_or_default().to_string();
        assert_eq!(bb["sub"], format!("{REPO}:{step}"));
        let bb = minted(
            "bitbucket-pipelines",
            &[&format!("repositoryUuid={REPO}"), &format!("deploymentEnvironmentUuid={ENV}")],
        );
        let step = bb["stepUuid"].as_str().unwrap_or_default().to_string();
        assert_eq!(bb["sub"], format!("{REPO}:{ENV}:{step}"));
        let bb = minted("bitbucket-pipelines", &["stepUuid={s}"]);
        assert_eq!(bb["sub"], format!("{DEMO_BB_REPOSITORY}:{{s}}"));
        // Other claims leave the preset's sub alone.
        let bb = minted("bitbucket-pipelines", &["branchName=feature/x"]);
        assert_eq!(
            bb["sub"],
            format!("{DEMO_BB_REPOSITORY}:{}", bb["stepUuid"].as_str().unwrap_or_default())
        );

        // GitHub: environment, then pull_request, then the ref.
        let gh = minted("github-actions", &["repository=acme/api"]);
        assert_eq!(gh["sub"], "repo:acme/api:ref:refs/heads/main");
        let gh = minted("github-actions", &["ref=refs/tags/v1"]);
        assert_eq!(gh["sub"], "repo:demo-org/demo-api:ref:refs/tags/v1");
        let gh = minted("github-actions", &["repository=acme/api", "environment=production"]);
        assert_eq!(gh["sub"], "repo:acme/api:environment:production");
        let gh = minted("github-actions", &["event_name=pull_request"]);
        assert_eq!(gh["sub"], "repo:demo-org/demo-api:pull_request");

        // GitLab: project_path, ref_type, ref.
        let gl = minted("gitlab-ci", &["project_path=acme/platform/api", "ref_type=tag", "ref=v1"]);
        assert_eq!(gl["sub"], "project_path:acme/platform/api:ref_type:tag:ref:v1");

        // An explicit sub always wins, whatever its position.
        let gh = minted("github-actions", &["sub=repo:x/y:ref:z", "repository=acme/api"]);
        assert_eq!(gh["sub"], "repo:x/y:ref:z");
        // A component removed: built from what is left, or left alone when it cannot be.
        let gh = minted("github-actions", &["environment=prod", "environment:=null"]);
        assert_eq!(gh["sub"], "repo:demo-org/demo-api:ref:refs/heads/main");
        let gl = minted("gitlab-ci", &["ref:=null"]);
        assert_eq!(gl["sub"], "project_path:demo-group/demo-api:ref_type:branch:ref:main");
    }
}
