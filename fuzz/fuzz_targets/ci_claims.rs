//! Any claim set (structure drawn from the bytes: names the proxy reads, or any, with
//! values of every JSON type) under each issuer preset (`bitbucket-pipelines`,
//! `github-actions`, `gitlab-ci`, `oidc`, and Google-, Entra- and Keycloak-shaped
//! `oidc` issuers), through the verifier's own identity building
//! (`identity::unverified_identity`, which a verified token goes through after its
//! signature, times and audience), then the identity and claim headers.
//!
//! Properties: never a panic; `ci.branch` is set only for a branch's ref (never beside
//! a tag, and `ci.ref`, when there is one, is `refs/heads/<branch>`: not a tag's, a pull
//! or merge request's, or a merge queue's ref); every identity and claim header value
//! is visible ASCII without a space, and decodes to exactly the value the policy reads
//! (issuer, subject, verified email, each group, each CI field, each claim).
#![no_main]

use http::header::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::config::ClaimHeader;
use portcullis::http::headers::{claim_headers, identity_headers};
use portcullis::identity::{unverified_identity, ClaimPath, IssuerSettings, Preset};
use serde_json::{Map, Number, Value};

/// Claim names the fuzzer reaches by one byte: the ones the identity is built from.
const NAMES: &[&str] = &[
    "sub",
    "email",
    "email_verified",
    "groups",
    "roles",
    "realm_access",
    "hd",
    "hasgroups",
    "_claim_names",
    "azp",
    "typ",
    "ref",
    "ref_type",
    "ref_path",
    "branchName",
    "repositoryUuid",
    "workspaceUuid",
    "repository_id",
    "repository",
    "repository_owner",
    "repository_owner_id",
    "project_id",
    "project_path",
    "namespace_path",
    "namespace_id",
    "environment",
    "sha",
    "workflow_ref",
    "job_workflow_ref",
    "run_id",
    "run_attempt",
    "pipeline_id",
    "job_id",
    "actor",
    "user_login",
    "ci_config_ref_uri",
    "pipelineUuid",
    "pipelineRunUuid",
    "stepUuid",
    "deploymentEnvironmentUuid",
    "head_ref",
    "base_ref",
    "event_name",
];

/// Values the fuzzer reaches by one byte, for the claims whose shape matters.
const STRINGS: &[&str] = &[
    "refs/heads/main",
    "refs/tags/main",
    "refs/pull/1/merge",
    "refs/heads/gh-readonly-queue/main/pr-1-714a629c",
    "refs/merge-requests/1/head",
    "main",
    "branch",
    "tag",
    "alice@example.com",
    "alice@gmail.com",
    "example.com",
    "client",
];

fn settings(mode: u8) -> IssuerSettings {
    let (preset, issuer) = match mode % 7 {
        0 => (
            Preset::BitbucketPipelines,
            "https://api.bitbucket.org/2.0/workspaces/w/pipelines-config/identity/oidc",
        ),
        1 => (Preset::GithubActions, "https://token.actions.githubusercontent.com"),
        2 => (Preset::GitlabCi, "https://gitlab.com"),
        3 => (Preset::Oidc, "https://id.example.com"),
        4 => (Preset::Oidc, "https://accounts.google.com"),
        5 => (Preset::Oidc, "https://login.microsoftonline.com/72f988bf/v2.0"),
        _ => (Preset::Oidc, "https://sso.example.com/realms/corp"),
    };
    let mut s = IssuerSettings::declared("corp", preset);
    s.issuer = issuer.into();
    s.audiences = vec!["client".into()];
    match mode % 7 {
        4 if mode & 8 != 0 => s.hosted_domain = Some("example.com".into()),
        5 => s.groups_claim = ClaimPath::parse("roles").unwrap_or_default(),
        6 => s.groups_claim = ClaimPath::parse("/realm_access/roles").unwrap_or_default(),
        _ => {}
    }
    if mode & 16 != 0 {
        s.client_id = Some("client".into());
    }
    s
}

/// Draws one JSON value from `input`, at most `depth` levels deep.
fn draw(input: &mut &[u8], depth: u8) -> Value {
    let Some((&kind, rest)) = input.split_first() else { return Value::Null };
    *input = rest;
    let text = |input: &mut &[u8]| -> String {
        // A string runs to the next 0xff (or the end).
        let end = input.iter().position(|&b| b == 0xff).unwrap_or(input.len());
        let s = String::from_utf8_lossy(&input[..end]).into_owned();
        *input = input.get(end + 1..).unwrap_or_default();
        s
    };
    match kind % 8 {
        0 => Value::Null,
        1 => Value::Bool(kind & 8 != 0),
        2 => Value::Number(Number::from(i64::from(kind) - 100)),
        3 => Value::Number(Number::from_f64(f64::from(kind) / 3.0).unwrap_or(Number::from(0))),
        4 => Value::String(STRINGS[usize::from(kind >> 3) % STRINGS.len()].into()),
        5 | 6 if depth > 0 => {
            let n = usize::from(kind >> 4);
            if kind % 8 == 5 {
                Value::Array((0..n).map(|_| draw(input, depth - 1)).collect())
            } else {
                let mut m = Map::new();
                for _ in 0..n {
                    let k = name(input);
                    m.insert(k, draw(input, depth - 1));
                }
                Value::Object(m)
            }
        }
        _ => Value::String(text(input)),
    }
}

/// A claim name: one of NAMES by a byte below 0x80, else the text up to 0xff.
fn name(input: &mut &[u8]) -> String {
    let Some((&b, rest)) = input.split_first() else { return String::new() };
    if b < 0x80 {
        *input = rest;
        return NAMES[usize::from(b) % NAMES.len()].into();
    }
    let end = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
    let s = String::from_utf8_lossy(&rest[..end]).into_owned();
    *input = rest.get(end + 1..).unwrap_or_default();
    s
}

/// `%XX` decoded; `None` for a `%` without two hex digits after it, or bytes that are
/// no UTF-8.
fn decode(v: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' {
            let hex = std::str::from_utf8(v.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A value every HTTP parser reads as it was written: visible ASCII, no space.
fn plain(v: &HeaderValue) -> bool {
    v.as_bytes().iter().all(|b| (0x21..0x7f).contains(b))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut input)) = data.split_first() else { return };
    let settings = settings(mode);
    let mut payload = Map::new();
    // The subject most tokens have, so the fuzzer spends its time past that check.
    if mode & 32 == 0 {
        payload.insert("sub".into(), Value::String("repo:acme/api:ref:refs/heads/main".into()));
    }
    while !input.is_empty() {
        let k = name(&mut input);
        let v = draw(&mut input, 3);
        payload.insert(k, v);
    }
    let Ok(id) = unverified_identity(&settings, payload.clone()) else { return };

    // CI context: a branch only for a branch's ref.
    if let Some(ci) = &id.ci {
        assert!(ci.branch.is_none() || ci.tag.is_none(), "{ci:?}");
        if let (Some(branch), Some(r)) = (&ci.branch, &ci.git_ref) {
            assert_eq!(*r, format!("refs/heads/{branch}"), "{ci:?}");
        }
        if let (Some(tag), Some(r)) = (&ci.tag, &ci.git_ref) {
            assert_eq!(*r, format!("refs/tags/{tag}"), "{ci:?}");
        }
        if ci.provider == "github" {
            let r = ci.git_ref.as_deref().unwrap_or_default();
            assert_eq!(ci.branch.is_some(), r.starts_with("refs/heads/"), "{ci:?}");
            assert_eq!(ci.tag.is_some(), r.starts_with("refs/tags/"), "{ci:?}");
        }
    } else {
        assert_eq!(settings.preset, Preset::Oidc);
    }

    // The identity headers: plain, and each decodes to what the policy reads.
    let headers = identity_headers(&id);
    let get = |name: &str| headers.iter().find(|(n, _)| n.as_str() == name).map(|(_, v)| v);
    for (name, v) in &headers {
        assert!(plain(v) || v.is_empty(), "{name}: {v:?}");
    }
    let read = |name: &str| get(name).map(|v| decode(v.as_bytes()).expect("decodes"));
    assert_eq!(read("x-portcullis-subject").as_deref(), Some(id.subject.as_str()));
    assert_eq!(read("x-portcullis-issuer").as_deref(), Some("corp"));
    let verified = id.email.as_deref().filter(|_| id.email_verified);
    assert_eq!(read("x-portcullis-email").as_deref(), verified);
    match get("x-portcullis-groups") {
        None => assert!(id.groups.is_empty(), "{:?}", id.groups),
        Some(v) => {
            let groups: Vec<String> = v
                .as_bytes()
                .split(|&b| b == b',')
                .map(|g| decode(g).expect("a group decodes"))
                .collect();
            assert_eq!(groups, id.groups);
        }
    }
    if let Some(ci) = &id.ci {
        assert_eq!(
            get("x-portcullis-ci-provider").map(HeaderValue::as_bytes),
            Some(ci.provider.as_bytes())
        );
        for field in portcullis::identity::CiContext::FIELDS {
            let header = format!("x-portcullis-ci-{}", field.replace('_', "-"));
            assert_eq!(read(&header).as_deref(), ci.field(field), "{header}");
        }
    }

    // Claim headers: what the policy's `claims` conditions read, and nothing else.
    let wanted: Vec<ClaimHeader> = payload
        .keys()
        .enumerate()
        .map(|(i, claim)| ClaimHeader {
            header: HeaderName::from_bytes(format!("x-claim-{i}").as_bytes()).expect("a name"),
            claim: claim.as_str().into(),
        })
        .collect();
    for (name, v) in claim_headers(&id, &wanted) {
        assert!(plain(&v) || v.is_empty(), "{name}: {v:?}");
        let w = wanted.iter().find(|w| w.header == name).expect("a wanted header");
        let claim = id.claims.get(&w.claim).expect("a header only for a claim the identity has");
        assert_eq!(Some(claim), payload.get(&*w.claim), "the policy reads another value");
        let scalar = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => panic!("{name} carries {other:?}"),
        };
        let expected: Vec<String> = match claim {
            Value::Array(items) => items.iter().map(scalar).collect(),
            other => vec![scalar(other)],
        };
        let got: Vec<String> = v
            .as_bytes()
            .split(|&b| b == b',')
            .map(|e| decode(e).expect("an element decodes"))
            .collect();
        assert_eq!(got, expected, "{name}");
    }
});
