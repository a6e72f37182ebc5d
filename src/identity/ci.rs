//! CI claims of Bitbucket Pipelines, GitHub Actions and GitLab CI normalized into
//! one [`CiContext`] (field meanings are documented on the type).
//!
//! Every claim read here must be a JSON string when present (V21): GitHub sends ids
//! as strings and GitLab sends booleans as strings, so a number or boolean where a
//! string belongs means a different token shape, and the token is rejected rather
//! than coerced. JSON `null` counts as absent (GitLab's `ci_config_ref_uri`).

use serde_json::{Map, Value};

use super::{AuthError, CiContext, Preset};
use crate::reason::Reason;

/// The claim that tells a CI token of `preset` apart from any other token of the
/// same issuer (V20): the immutable repository id.
pub const fn required_claim(preset: Preset) -> Option<&'static str> {
    match preset {
        Preset::BitbucketPipelines => Some("repositoryUuid"),
        Preset::GithubActions => Some("repository_id"),
        Preset::GitlabCi => Some("project_id"),
        Preset::Oidc => None,
    }
}

/// The normalized CI context of verified `claims`, `None` for [`Preset::Oidc`].
/// Fails when the preset's required claim is missing or a claim has the wrong type.
pub fn normalize(
    preset: Preset,
    claims: &Map<String, Value>,
) -> Result<Option<CiContext>, AuthError> {
    let s = |name: &'static str| string_claim(claims, name);
    if let Some(required) = required_claim(preset) {
        if s(required)?.is_none() {
            return Err(AuthError::new(
                Reason::InvalidClaims,
                format!("{} token without `{required}`", preset.name()),
            ));
        }
    }
    let ci = match preset {
        Preset::Oidc => return Ok(None),
        Preset::BitbucketPipelines => {
            let branch = s("branchName")?;
            let workspace = s("workspaceUuid")?;
            let repository = s("repositoryUuid")?;
            CiContext {
                provider: "bitbucket",
                workspace_id: workspace.clone(),
                workspace,
                repository_id: repository.clone(),
                repository,
                git_ref: branch.as_ref().map(|b| format!("refs/heads/{b}")),
                branch,
                environment: s("deploymentEnvironmentUuid")?,
                pipeline: s("pipelineUuid")?,
                run: s("pipelineRunUuid")?,
                step: s("stepUuid")?,
                ..CiContext::default()
            }
        }
        Preset::GithubActions => {
            let git_ref = s("ref")?;
            let under = |prefix: &str| {
                git_ref.as_deref().and_then(|r| r.strip_prefix(prefix)).map(str::to_owned)
            };
            let run = match (s("run_id")?, s("run_attempt")?) {
                (Some(id), Some(attempt)) => Some(format!("{id}-{attempt}")),
                (id, _) => id,
            };
            CiContext {
                provider: "github",
                workspace: s("repository_owner")?,
                workspace_id: s("repository_owner_id")?,
                repository: s("repository")?,
                repository_id: s("repository_id")?,
                branch: under("refs/heads/"),
                tag: under("refs/tags/"),
                git_ref,
                environment: s("environment")?,
                commit: s("sha")?,
                pipeline: s("workflow_ref")?,
                run,
                step: s("job_workflow_ref")?,
                actor: s("actor")?,
            }
        }
        Preset::GitlabCi => {
            let name = s("ref")?;
            let (mut branch, mut tag, prefix) = match s("ref_type")?.as_deref() {
                Some("branch") => (name.clone(), None, Some("refs/heads/")),
                Some("tag") => (None, name.clone(), Some("refs/tags/")),
                _ => (None, None, None),
            };
            let named = prefix.zip(name).map(|(p, n)| format!("{p}{n}"));
            let git_ref = match s("ref_path")? {
                // GitLab writes `ref_path` as the ref `ref` and `ref_type` name (a merge
                // request pipeline's too: its source branch). One that is another ref
                // makes the token neither a branch's nor a tag's: a branch rule and a
                // tag or ref rule must not both read it as theirs.
                Some(path) if named.as_deref() != Some(path.as_str()) => {
                    (branch, tag) = (None, None);
                    Some(path)
                }
                Some(path) => Some(path),
                None => named,
            };
            CiContext {
                provider: "gitlab",
                workspace: s("namespace_path")?,
                workspace_id: s("namespace_id")?,
                repository: s("project_path")?,
                repository_id: s("project_id")?,
                branch,
                tag,
                git_ref,
                environment: s("environment")?,
                commit: s("sha")?,
                pipeline: s("ci_config_ref_uri")?,
                run: s("pipeline_id")?,
                step: s("job_id")?,
                actor: s("user_login")?,
            }
        }
    };
    Ok(Some(ci))
}

/// A string claim: absent or `null` → `None`; any other non-string → `InvalidClaims`.
pub(crate) fn string_claim(
    claims: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) => Ok(Some(v.clone())),
        Some(_) => {
            Err(AuthError::new(Reason::InvalidClaims, format!("claim `{name}` is not a string")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn bitbucket_branch_becomes_a_heads_ref() -> Result<(), AuthError> {
        let c = claims(json!({
            "repositoryUuid": "{r}", "workspaceUuid": "{w}", "branchName": "main",
            "stepUuid": "{s}", "pipelineUuid": "{p}", "deploymentEnvironmentUuid": "{e}"
        }));
        let ci = normalize(Preset::BitbucketPipelines, &c)?;
        let ci = ci.unwrap_or_default();
        assert_eq!(ci.provider, "bitbucket");
        assert_eq!(ci.field("ref"), Some("refs/heads/main"));
        assert_eq!(ci.field("branch"), Some("main"));
        assert_eq!(ci.field("repository_id"), Some("{r}"));
        assert_eq!(ci.field("workspace_id"), Some("{w}"));
        assert_eq!(ci.field("environment"), Some("{e}"));
        assert_eq!(ci.field("run"), None);
        assert_eq!(ci.field("commit"), None);
        Ok(())
    }

    #[test]
    fn github_tags_and_runs() -> Result<(), AuthError> {
        let c = claims(json!({"repository_id": "74", "ref": "refs/tags/v1.2", "run_id": "9"}));
        let ci = normalize(Preset::GithubActions, &c)?.unwrap_or_default();
        assert_eq!((ci.field("tag"), ci.field("branch")), (Some("v1.2"), None));
        assert_eq!(ci.field("ref"), Some("refs/tags/v1.2"));
        assert_eq!(ci.field("run"), Some("9"));
        Ok(())
    }

    #[test]
    fn gitlab_tag_without_ref_path_and_null_config_uri() -> Result<(), AuthError> {
        let c = claims(json!({
            "project_id": "20", "ref": "v2", "ref_type": "tag", "ci_config_ref_uri": null
        }));
        let ci = normalize(Preset::GitlabCi, &c)?.unwrap_or_default();
        assert_eq!(ci.field("tag"), Some("v2"));
        assert_eq!(ci.field("ref"), Some("refs/tags/v2"));
        assert_eq!(ci.field("pipeline"), None);
        Ok(())
    }

    /// A GitLab token whose `ref_path` is not the ref `ref` and `ref_type` name (GitLab
    /// writes it as `refs/heads/` or `refs/tags/` + `ref`, a merge request pipeline's
    /// too): neither a branch nor a tag, only the `ref_path` as `ci.ref`. It was
    /// `ci.branch = "main"` beside `ci.ref = "refs/tags/main"` (or a merge request's
    /// ref), a branch rule and a tag rule both matching (found by the `ci_claims` fuzz
    /// target).
    #[test]
    fn a_gitlab_ref_path_that_is_not_the_named_ref_sets_no_branch_or_tag() -> Result<(), AuthError>
    {
        for (ref_type, path) in [
            ("branch", "refs/tags/main"),
            ("branch", "refs/merge-requests/1/head"),
            ("branch", ""),
            ("tag", "refs/heads/main"),
        ] {
            let c = claims(json!({
                "project_id": "20", "ref": "main", "ref_type": ref_type, "ref_path": path
            }));
            let ci = normalize(Preset::GitlabCi, &c)?.unwrap_or_default();
            assert_eq!((ci.field("branch"), ci.field("tag")), (None, None), "{ref_type} {path}");
            assert_eq!(ci.field("ref"), Some(path));
        }
        // As GitLab writes them: the branch or tag, and its ref.
        for (ref_type, path, field) in
            [("branch", "refs/heads/main", "branch"), ("tag", "refs/tags/main", "tag")]
        {
            let c = claims(json!({
                "project_id": "20", "ref": "main", "ref_type": ref_type, "ref_path": path
            }));
            let ci = normalize(Preset::GitlabCi, &c)?.unwrap_or_default();
            assert_eq!(ci.field(field), Some("main"));
            assert_eq!(ci.field("ref"), Some(path));
        }
        Ok(())
    }

    #[test]
    fn wrong_types_and_missing_discriminators_are_rejected() {
        let numeric_id = claims(json!({"repository_id": 74}));
        let missing = claims(json!({"repository": "acme/api"}));
        let bool_branch = claims(json!({"project_id": "20", "ref": true}));
        for (preset, c) in [
            (Preset::GithubActions, numeric_id),
            (Preset::GithubActions, missing),
            (Preset::GitlabCi, bool_branch),
        ] {
            let err = normalize(preset, &c).err().map(|e| e.reason);
            assert_eq!(err, Some(Reason::InvalidClaims));
        }
        assert_eq!(normalize(Preset::Oidc, &Map::new()), Ok(None));
    }
}
