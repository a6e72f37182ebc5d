//! What the policy compiler knows about each preset's claims: the claim vocabulary
//! (to catch misspelt claim names), the immutable ids that pin a repository or owner
//! (V22), and plausible base claims for `[[test]]` identities written with `preset`.

use serde_json::{Map, Value};

use crate::identity::Preset;

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

/// The JSON type a preset's tokens give a claim (V21: each claim has one documented
/// type, and a value of another type is a different token shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    String,
    Integer,
    /// `exp`, `nbf`, `iat`: a JSON number.
    NumericDate,
    /// `aud`.
    StringOrStrings,
    /// GitLab `groups_direct`.
    Strings,
    /// GitLab `user_identities`.
    Objects,
}

impl Shape {
    /// As a sentence says it: "a string", "a list of strings".
    pub fn described(self) -> &'static str {
        match self {
            Shape::String => "a string",
            Shape::Integer => "an integer",
            Shape::NumericDate => "a number",
            Shape::StringOrStrings => "a string or a list of strings",
            Shape::Strings => "a list of strings",
            Shape::Objects => "a list of objects",
        }
    }

    /// Whether a claim of this shape can equal a JSON value of `v`'s type (`null`
    /// counts as absent).
    pub fn admits(self, v: &Value) -> bool {
        let all = |items: &[Value], f: fn(&Value) -> bool| items.iter().all(f);
        match (self, v) {
            (_, Value::Null) => true,
            (Shape::String | Shape::StringOrStrings, Value::String(_)) => true,
            (Shape::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (Shape::NumericDate, Value::Number(_)) => true,
            (Shape::StringOrStrings | Shape::Strings, Value::Array(items)) => {
                all(items, Value::is_string)
            }
            (Shape::Objects, Value::Array(items)) => all(items, Value::is_object),
            _ => false,
        }
    }
}

/// The JSON type `preset`'s tokens give claim `name`, when it is documented (see
/// `shared/reference/tokens/*.json`): GitHub and Bitbucket send every custom claim as a
/// string, numeric ids included; GitLab sends ids and its booleans (`ref_protected`)
/// as strings, `runner_id` as an integer. The registered claims have the types RFC 7519
/// gives them for every preset, `oidc` too: the verifier refuses any token with an
/// `exp`, `nbf` or `iat` that is no number (V21) or an `aud` that is no string or list
/// of strings (V14), so a `[[test]]` identity or a rule value of another type is one no
/// token the proxy accepts has. `None` for an `oidc` provider's other claims (any
/// provider, any shape), unknown names, and claims whose type is not confirmed
/// (Bitbucket `compliant`, GitHub `repo_property_*`).
pub fn shape(preset: Preset, name: &str) -> Option<Shape> {
    match name {
        "iss" | "sub" | "jti" => return Some(Shape::String),
        "aud" => return Some(Shape::StringOrStrings),
        "exp" | "nbf" | "iat" => return Some(Shape::NumericDate),
        _ => {}
    }
    let (known, shape) = match preset {
        Preset::BitbucketPipelines if name == "compliant" => return None,
        Preset::BitbucketPipelines => (BITBUCKET, Shape::String),
        Preset::GithubActions => (GITHUB, Shape::String),
        Preset::GitlabCi => match name {
            "runner_id" => return Some(Shape::Integer),
            "groups_direct" => return Some(Shape::Strings),
            "user_identities" => return Some(Shape::Objects),
            _ => (GITLAB, Shape::String),
        },
        Preset::Oidc => return None,
    };
    known.contains(&name).then_some(shape)
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
    let mut claims: Map<String, Value> =
        pairs.iter().map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string()))).collect();
    // The verifier refuses a CI token that does not say when it was minted (V18).
    if preset != Preset::Oidc {
        claims.insert("iat".into(), Value::from(TEST_IAT));
    }
    claims
}

/// The `iat` of a `[[test]]` identity whose issuer's tokens must carry one (every CI
/// preset's, and any issuer's with `max_token_age`), unless its `claims` give their
/// own: 2026-01-01T00:00:00Z. Test identities are not held to any time.
pub const TEST_IAT: u64 = 1_767_225_600;

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
    fn templates_are_tokens_the_verifier_accepts() {
        for preset in
            [Preset::BitbucketPipelines, Preset::GithubActions, Preset::GitlabCi, Preset::Oidc]
        {
            let ci = crate::identity::ci::normalize(preset, &template(preset));
            assert!(
                matches!(ci, Ok(ref c) if c.is_some() == preset.is_shared()),
                "{preset:?}: {ci:?}"
            );
            let settings = crate::identity::IssuerSettings::declared("t", preset);
            let identity = crate::identity::unverified_identity(&settings, template(preset));
            assert!(identity.is_ok(), "{preset:?}: {identity:?}");
            for name in template(preset).keys() {
                assert!(is_known(preset, name), "{preset:?}: {name}");
            }
        }
    }
}
