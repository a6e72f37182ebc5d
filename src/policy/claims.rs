//! What the policy compiler knows about each preset's claims: the claim vocabulary
//! (to catch misspelt claim names), the immutable ids that pin a repository or owner
//! (V22), and a small claim → [`CiContext`] builder for `[[test]]` identities.
//!
//! The builder mirrors the normalization documented on [`CiContext`]; once
//! `identity::ci` exposes its own normalizer, `[[test]]` identities should switch to it
//! so tests exercise exactly what production does.

use serde_json::{Map, Value};

use crate::identity::{CiContext, Preset};

/// Claims every JWT may carry.
const REGISTERED: &[&str] = &["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

const BITBUCKET: &[&str] = &[
    "branchName",
    "compliant",
    "deploymentEnvironmentUuid",
    "pipelineUuid",
    "pipelineRunUuid",
    "repositoryUuid",
    "stepUuid",
    "workspaceUuid",
];

const GITHUB: &[&str] = &[
    "environment",
    "ref",
    "ref_type",
    "sha",
    "repository",
    "repository_id",
    "repository_owner",
    "repository_owner_id",
    "repository_visibility",
    "actor",
    "actor_id",
    "run_id",
    "run_number",
    "run_attempt",
    "runner_environment",
    "workflow",
    "workflow_ref",
    "workflow_sha",
    "job_workflow_ref",
    "job_workflow_sha",
    "head_ref",
    "base_ref",
    "event_name",
    "enterprise",
    "enterprise_id",
    "check_run_id",
];

const GITLAB: &[&str] = &[
    "namespace_id",
    "namespace_path",
    "project_id",
    "project_path",
    "job_namespace_id",
    "job_namespace_path",
    "job_project_id",
    "job_project_path",
    "user_id",
    "user_login",
    "user_email",
    "user_access_level",
    "user_identities",
    "pipeline_id",
    "pipeline_source",
    "job_id",
    "ref",
    "ref_type",
    "ref_path",
    "ref_protected",
    "groups_direct",
    "environment",
    "environment_protected",
    "deployment_tier",
    "environment_action",
    "runner_id",
    "runner_environment",
    "sha",
    "project_visibility",
    "ci_config_ref_uri",
    "ci_config_sha",
];

/// Claims that pin an immutable repository or owner id (V22).
pub const PIN_CLAIMS: &[&str] = &[
    "repositoryUuid",
    "workspaceUuid",
    "repository_id",
    "repository_owner_id",
    "project_id",
    "namespace_id",
];

/// `ci` fields that pin a repository or owner (V22).
pub const PIN_CI_FIELDS: &[&str] = &["repository", "repository_id", "workspace", "workspace_id"];

/// Claims and `ci` fields that restrict which ref or environment a token comes from.
pub const REF_CLAIMS: &[&str] = &[
    "branchName",
    "deploymentEnvironmentUuid",
    "ref",
    "ref_path",
    "ref_protected",
    "environment",
    "environment_protected",
    "deployment_tier",
];
pub const REF_CI_FIELDS: &[&str] = &["branch", "tag", "ref", "environment"];

/// The claim names a preset's tokens carry, or `None` when any name is plausible.
pub fn vocabulary(preset: Preset) -> Option<Vec<&'static str>> {
    let specific = match preset {
        Preset::BitbucketPipelines => BITBUCKET,
        Preset::GithubActions => GITHUB,
        Preset::GitlabCi => GITLAB,
        Preset::Oidc => return None,
    };
    Some(REGISTERED.iter().chain(specific).copied().collect())
}

/// Whether `name` is a claim `preset` tokens can carry (always true for `oidc`).
pub fn is_known(preset: Preset, name: &str) -> bool {
    match preset {
        // GitHub custom repository properties arrive as `repo_property_<name>`.
        Preset::GithubActions if name.starts_with("repo_property_") => true,
        _ => vocabulary(preset).is_none_or(|v| v.contains(&name)),
    }
}

/// Claims of a plausible token for `preset`, the base that `[[test]]` overrides.
/// Values are synthetic, shaped like `shared/reference/tokens/*.json`.
pub fn template(preset: Preset) -> Map<String, Value> {
    let pairs: &[(&str, &str)] = match preset {
        Preset::BitbucketPipelines => &[
            (
                "sub",
                "{00000000-0000-4000-8000-000000000001}:{00000000-0000-4000-8000-000000000002}",
            ),
            ("workspaceUuid", "{00000000-0000-4000-8000-000000000010}"),
            ("repositoryUuid", "{00000000-0000-4000-8000-000000000001}"),
            ("pipelineUuid", "{00000000-0000-4000-8000-000000000003}"),
            ("stepUuid", "{00000000-0000-4000-8000-000000000002}"),
            ("branchName", "main"),
        ],
        Preset::GithubActions => &[
            ("sub", "repo:example/app:ref:refs/heads/main"),
            ("ref", "refs/heads/main"),
            ("ref_type", "branch"),
            ("sha", "0000000000000000000000000000000000000000"),
            ("repository", "example/app"),
            ("repository_id", "1"),
            ("repository_owner", "example"),
            ("repository_owner_id", "1"),
            ("actor", "octocat"),
            ("run_id", "1"),
            ("run_attempt", "1"),
            ("workflow_ref", "example/app/.github/workflows/ci.yml@refs/heads/main"),
            ("event_name", "push"),
        ],
        Preset::GitlabCi => &[
            ("sub", "project_path:example/app:ref_type:branch:ref:main"),
            ("namespace_id", "1"),
            ("namespace_path", "example"),
            ("project_id", "1"),
            ("project_path", "example/app"),
            ("user_login", "sample-user"),
            ("pipeline_id", "1"),
            ("job_id", "1"),
            ("ref", "main"),
            ("ref_type", "branch"),
            ("ref_path", "refs/heads/main"),
            ("ref_protected", "true"),
            ("sha", "0000000000000000000000000000000000000000"),
        ],
        Preset::Oidc => &[("sub", "test-user")],
    };
    pairs.iter().map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string()))).collect()
}

/// Normalizes CI claims into a [`CiContext`] (`None` for `oidc`).
pub fn ci_context(preset: Preset, claims: &Map<String, Value>) -> Option<CiContext> {
    let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
    let ctx = match preset {
        Preset::Oidc => return None,
        Preset::BitbucketPipelines => {
            let branch = s("branchName");
            CiContext {
                provider: "bitbucket",
                workspace: s("workspaceUuid"),
                workspace_id: s("workspaceUuid"),
                repository: s("repositoryUuid"),
                repository_id: s("repositoryUuid"),
                git_ref: branch.as_ref().map(|b| format!("refs/heads/{b}")),
                branch,
                environment: s("deploymentEnvironmentUuid"),
                pipeline: s("pipelineUuid"),
                run: s("pipelineRunUuid"),
                step: s("stepUuid"),
                ..CiContext::default()
            }
        }
        Preset::GithubActions => {
            let git_ref = s("ref");
            let strip =
                |p: &str| git_ref.as_deref().and_then(|r| r.strip_prefix(p)).map(str::to_string);
            CiContext {
                provider: "github",
                workspace: s("repository_owner"),
                workspace_id: s("repository_owner_id"),
                repository: s("repository"),
                repository_id: s("repository_id"),
                branch: strip("refs/heads/"),
                tag: strip("refs/tags/"),
                environment: s("environment"),
                commit: s("sha"),
                pipeline: s("workflow_ref"),
                run: s("run_id").map(|id| match s("run_attempt") {
                    Some(a) => format!("{id}-{a}"),
                    None => id,
                }),
                step: s("job_workflow_ref"),
                actor: s("actor"),
                git_ref,
            }
        }
        Preset::GitlabCi => {
            let name = s("ref");
            let kind = s("ref_type");
            CiContext {
                provider: "gitlab",
                workspace: s("namespace_path"),
                workspace_id: s("namespace_id"),
                repository: s("project_path"),
                repository_id: s("project_id"),
                branch: name.clone().filter(|_| kind.as_deref() == Some("branch")),
                tag: name.filter(|_| kind.as_deref() == Some("tag")),
                git_ref: s("ref_path"),
                environment: s("environment"),
                commit: s("sha"),
                pipeline: s("ci_config_ref_uri"),
                run: s("pipeline_id"),
                step: s("job_id"),
                actor: s("user_login"),
            }
        }
    };
    Some(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabularies_know_their_claims() {
        assert!(is_known(Preset::BitbucketPipelines, "branchName"));
        assert!(!is_known(Preset::BitbucketPipelines, "branch_name"));
        assert!(!is_known(Preset::BitbucketPipelines, "repository_owner_id"));
        assert!(is_known(Preset::GithubActions, "repository_owner_id"));
        assert!(is_known(Preset::GithubActions, "repo_property_team"));
        assert!(is_known(Preset::GitlabCi, "runner_id"));
        assert!(is_known(Preset::Oidc, "anything_at_all"));
        for pin in PIN_CLAIMS {
            let known = [Preset::BitbucketPipelines, Preset::GithubActions, Preset::GitlabCi]
                .into_iter()
                .any(|p| is_known(p, pin));
            assert!(known, "{pin}");
        }
    }

    #[test]
    fn normalizes_each_provider() {
        let gh = template(Preset::GithubActions);
        let ci = ci_context(Preset::GithubActions, &gh).unwrap_or_default();
        assert_eq!(ci.field("branch"), Some("main"));
        assert_eq!(ci.field("ref"), Some("refs/heads/main"));
        assert_eq!(ci.field("workspace_id"), Some("1"));
        assert_eq!(ci.field("run"), Some("1-1"));
        let gl = template(Preset::GitlabCi);
        let ci = ci_context(Preset::GitlabCi, &gl).unwrap_or_default();
        assert_eq!((ci.field("branch"), ci.field("tag")), (Some("main"), None));
        assert_eq!(ci.field("ref"), Some("refs/heads/main"));
        let bb = template(Preset::BitbucketPipelines);
        let ci = ci_context(Preset::BitbucketPipelines, &bb).unwrap_or_default();
        assert_eq!(ci.field("ref"), Some("refs/heads/main"));
        assert_eq!(ci.field("repository"), ci.field("repository_id"));
        assert!(ci_context(Preset::Oidc, &Map::new()).is_none());
    }
}
