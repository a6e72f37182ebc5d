//! The documentation's TOML snippets, checked as a user who pastes them would check
//! them: with `portcullis check --policy-only` (no certificate or secret needed).
//!
//! Every ```` ```toml ```` block of the README, `docs/*.md`, `policies/README.md` and the
//! examples' READMEs carries a marker on the line before it, an HTML comment that
//! GitHub does not render, saying what the block is:
//!
//! - `<!-- check: config -->`: a whole `portcullis.toml`;
//! - `<!-- check: config-part -->`: sections added to a listener ([`LISTEN`]), or with
//!   `config-part issuers` to a listener and [`ISSUERS`] (a `[[databases]]` route, say);
//! - `<!-- check: policy NAME -->`: `policies/NAME.toml` of the last `config` or
//!   `config-part` above it in the same file;
//! - `<!-- check: rules -->`: a policy of its own, checked on an HTTP route and a
//!   database route ([`ROUTES`]) of [`ISSUERS`];
//! - `<!-- check: fragment -->`: a few keys or an elided excerpt (`…`), not checked.
//!
//! A block without a marker fails the test, so a new snippet is classified when it is
//! written.
//!
//! The other tests hold the reference to the code it describes, reading both as text:
//! the keys of `src/config/raw.rs`, the restart-only settings of `src/server/mod.rs`,
//! the client error codes of docs/audit.md in the README, and the flags of every
//! `portcullis` command shown against that subcommand's `--help`.

use std::path::{Path, PathBuf};

use super::cli::run;
use crate::support::write;

/// What a partial snippet leaves out: a listener and its certificate (never read by
/// `--policy-only`).
const LISTEN: &str = r#"[listen]
https = "127.0.0.1:8443"

[tls]
cert = "tls/server.pem"
key = "tls/server-key.pem"
"#;

/// The issuers the partial snippets refer to, one of each kind.
const ISSUERS: &str = r#"
[issuers.corp]
issuer = "https://example.okta.com/oauth2/default"
audiences = ["0oa1example"]

[issuers.partners]
issuer = "https://login.partners.example"
audiences = ["portcullis"]

[issuers.bitbucket]
preset = "bitbucket-pipelines"
issuer = "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc"
audiences = ["https://deploy.internal.example.com"]

[issuers.github]
preset = "github-actions"
issuer = "https://token.actions.githubusercontent.com"
audiences = ["https://deploy.internal.example.com"]

[issuers.gitlab]
preset = "gitlab-ci"
issuer = "https://gitlab.com"
audiences = ["https://deploy.internal.example.com"]
"#;

/// Where a `rules` snippet is put to work: an HTTP route and a database route.
const ROUTES: &str = r#"
[[routes]]
name = "app"
upstream = "http://10.0.0.12:8080"
policy = "snippet"

[[databases]]
name = "app"
listen = "127.0.0.1:6432"
upstream = "postgres://10.0.0.13:5432"
upstream_user = "app"
password_env = "APP_DB_PASSWORD"
policy = "snippet"

[databases.upstream_roles.app_owner]
password_env = "APP_OWNER_PASSWORD"
"#;

/// One configuration to check, built from the snippets of one file.
struct Set {
    /// `file:line` of the block that started it.
    at: String,
    config: String,
    policies: Vec<(String, String)>,
}

/// The files whose snippets a user reads.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md"), root.join("policies/README.md")];
    for dir in [root.join("docs"), root.join("examples")] {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let doc = if p.is_dir() { p.join("README.md") } else { p };
            if doc.extension().is_some_and(|e| e == "md") && doc.is_file() {
                files.push(doc);
            }
        }
    }
    files
}

/// The ```toml blocks of `text`, each with its fence's line (from 1) and the marker
/// before it.
fn toml_blocks(text: &str) -> Vec<(usize, Option<String>, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if fence != "```toml" {
            i += 1;
            continue;
        }
        let (start, indent) = (i, lines[i].len() - fence.len());
        let marker = i
            .checked_sub(1)
            .and_then(|m| lines[m].trim().strip_prefix("<!-- check:"))
            .and_then(|m| m.strip_suffix("-->"))
            .map(|m| m.trim().to_string());
        let mut body = String::new();
        i += 1;
        while i < lines.len() && lines[i].trim_start() != "```" {
            body.push_str(lines[i].get(indent..).unwrap_or(lines[i].trim_start()));
            body.push('\n');
            i += 1;
        }
        blocks.push((start + 1, marker, body));
        i += 1;
    }
    blocks
}

/// Groups the marked blocks of one file into configurations; unmarked blocks and
/// unknown markers are reported in `bad`.
fn sets(name: &str, text: &str, bad: &mut Vec<String>) -> Vec<Set> {
    let mut sets: Vec<Set> = Vec::new();
    for (line, marker, body) in toml_blocks(text) {
        let at = format!("{name}:{line}");
        let marker = marker.unwrap_or_default();
        let (kind, arg) = marker.split_once(' ').unwrap_or((marker.as_str(), ""));
        match kind {
            "config" => sets.push(Set { at, config: body, policies: Vec::new() }),
            "config-part" => {
                let issuers = match arg {
                    "" => "",
                    "issuers" => ISSUERS,
                    _ => {
                        bad.push(format!("{at}: unknown `config-part {arg}`"));
                        continue;
                    }
                };
                sets.push(Set {
                    at,
                    config: format!("{LISTEN}{issuers}\n{body}"),
                    policies: Vec::new(),
                })
            }
            "policy" if !arg.is_empty() => match sets.last_mut() {
                Some(set) => set.policies.push((arg.to_string(), body)),
                None => bad.push(format!("{at}: `policy {arg}` with no config above it")),
            },
            "rules" => sets.push(Set {
                at,
                config: format!("{LISTEN}{ISSUERS}{ROUTES}"),
                policies: vec![("snippet".into(), body)],
            }),
            "fragment" => {}
            _ => bad.push(format!("{at}: a ```toml block needs a `<!-- check: … -->` marker")),
        }
    }
    sets
}

/// Writes a set out and runs `check --policy-only` on it; the diagnostics if it fails.
fn check(set: &Set) -> Option<String> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(dir.path().join("policies")).ok();
    let config = dir.path().join("portcullis.toml");
    write(&config, &set.config);
    for (name, body) in &set.policies {
        write(&dir.path().join("policies").join(format!("{name}.toml")), body);
    }
    let (code, out, err) = run(&["check", "--policy-only", "-c", &config.to_string_lossy()]);
    (code != 0).then(|| format!("{} (exit {code}):\n{out}{err}", set.at))
}

#[test]
fn every_toml_snippet_of_the_documentation_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (mut bad, mut checked) = (Vec::new(), 0);
    for doc in documents(root) {
        let text =
            std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
        let name = doc.strip_prefix(root).unwrap_or(&doc).display().to_string();
        for set in sets(&name, &text, &mut bad) {
            checked += 1;
            bad.extend(check(&set));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(checked >= 10, "only {checked} snippets checked: markers lost?");
}

/// The marker rules themselves: an unmarked block, a policy without its config.
#[test]
fn an_unmarked_block_or_a_stray_policy_is_reported() {
    let text = "```toml\na = 1\n```\n\n<!-- check: policy p -->\n```toml\n[[rule]]\n```\n";
    let mut bad = Vec::new();
    assert!(sets("x.md", text, &mut bad).is_empty());
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].starts_with("x.md:1: a ```toml block needs"), "{bad:?}");
    assert!(bad[1].starts_with("x.md:6: `policy p` with no config"), "{bad:?}");
}

/// The Kubernetes example's ConfigMaps: `portcullis.toml` and the policies, as the pod
/// mounts them (its `policy_dir`, `/etc/portcullis/policies`, is where the policies are
/// written here instead).
#[test]
fn the_kubernetes_configmaps_pass_check() {
    use yaml_rust2::Yaml;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("examples/kubernetes/portcullis.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let data = |name: &str| {
        docs.iter()
            .find(|d| {
                d["kind"].as_str() == Some("ConfigMap")
                    && d["metadata"]["name"].as_str() == Some(name)
            })
            .and_then(|d| d["data"].as_hash().cloned())
            .unwrap_or_else(|| panic!("no ConfigMap {name}"))
    };
    let config = data("portcullis-config");
    let config = config[&Yaml::String("portcullis.toml".into())].as_str().unwrap_or_default();
    assert!(config.contains("policy_dir = \"/etc/portcullis/policies\""), "{config}");
    let policies = data("portcullis-policies")
        .iter()
        .filter_map(|(k, v)| {
            Some((k.as_str()?.strip_suffix(".toml")?.to_string(), v.as_str()?.to_string()))
        })
        .collect::<Vec<_>>();
    assert!(!policies.is_empty());
    let set = Set {
        at: "examples/kubernetes/portcullis.yaml".into(),
        config: config.replace("/etc/portcullis/policies", "policies"),
        policies,
    };
    assert_eq!(check(&set), None);
}

/// The text of a file of the repository.
fn source(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The keys of each raw configuration table, `(struct, key)`, read from
/// `src/config/raw.rs` as serde sees them (a `rename` wins over the field's name).
fn raw_config_keys(raw: &str) -> Vec<(String, String)> {
    let (mut keys, mut table, mut rename) = (Vec::new(), None::<String>, None::<String>);
    for line in raw.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            table = rest.split_whitespace().next().map(str::to_string);
        } else if line == "}" {
            table = None;
        } else if let Some(r) = line.strip_prefix("#[serde(rename = \"") {
            rename = r.split('"').next().map(str::to_string);
        } else if let (Some(t), Some(field)) = (&table, line.strip_prefix("pub ")) {
            if let Some((name, _)) = field.split_once(':') {
                keys.push((t.clone(), rename.take().unwrap_or_else(|| name.to_string())));
            }
        }
    }
    keys
}

/// Whether `word` occurs in `text` as a whole key name (not inside a longer one).
fn has_word(text: &str, word: &str) -> bool {
    let is_key = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word)
        .any(|(i, _)| !text[..i].ends_with(is_key) && !text[i + word.len()..].starts_with(is_key))
}

/// Where a user looks a key up: configuration.md has a row per key (its first cell);
/// sso.md and postgres.md name theirs in their example ```toml blocks, with the
/// defaults in comments, or in prose as `` `key = …` `` (a key that is refused).
fn documented(table: &str, key: &str, conf: &str, sso: &str, postgres: &str) -> bool {
    let in_blocks = |doc: &str| {
        toml_blocks(doc).iter().any(|(_, _, body)| has_word(body, key))
            || doc.contains(&format!("`{key} = "))
    };
    let row = |name: &str| {
        conf.lines().any(|l| {
            l.strip_prefix("| ")
                .and_then(|l| l.split(" |").next())
                .is_some_and(|cell| cell.contains(&format!("`{name}`")))
        })
    };
    match table {
        "Session" | "Login" => in_blocks(sso),
        "Database" | "UpstreamRole" => in_blocks(postgres),
        "Match" => row(&format!("match.{key}")),
        "Tls" if key == "sni" => row("[[tls.sni]]"),
        // `[[tls.sni]]` entries: that row names their keys.
        "Sni" => conf
            .lines()
            .any(|l| l.starts_with("| `[[tls.sni]]` |") && l.contains(&format!("`{key}"))),
        _ => row(key),
    }
}

/// Every key `portcullis.toml` accepts has its place in the reference: a row of
/// docs/configuration.md, or a line of the example blocks of docs/sso.md (`[session]`,
/// `login`) and docs/postgres.md (`[[databases]]`). A key added to `src/config/raw.rs`
/// without its documentation fails here.
#[test]
fn every_configuration_key_is_in_the_reference() {
    let keys = raw_config_keys(&source("src/config/raw.rs"));
    assert!(keys.len() > 80, "only {} keys read from raw.rs: its shape changed?", keys.len());
    assert!(keys.contains(&("Route".into(), "match".into())), "{keys:?}");
    let (conf, sso, pg) =
        (source("docs/configuration.md"), source("docs/sso.md"), source("docs/postgres.md"));
    let missing: Vec<_> = keys
        .iter()
        .filter(|(table, key)| !documented(table, key, &conf, &sso, &pg))
        .map(|(table, key)| format!("{table}.{key}"))
        .collect();
    assert!(missing.is_empty(), "keys of src/config/raw.rs not in the reference: {missing:?}");
}

/// The settings a reload cannot apply (`restart_required` in the reload's audit event)
/// are listed both where operators read the event (docs/audit.md) and where they read
/// what a reload does (docs/configuration.md).
#[test]
fn every_restart_required_setting_is_documented() {
    let server = source("src/server/mod.rs");
    let body = server
        .split_once("fn differences(")
        .and_then(|(_, rest)| rest.split_once(".into_iter()"))
        .map(|(body, _)| body)
        .unwrap_or_else(|| panic!("src/server/mod.rs: no `fn differences`"));
    let settings: Vec<&str> =
        body.lines().filter_map(|l| l.trim().strip_prefix("(\"")?.split('"').next()).collect();
    assert!(settings.len() >= 9, "{settings:?}");
    let audit = source("docs/audit.md");
    let row = audit
        .lines()
        .find(|l| l.starts_with("| `restart_required` |"))
        .unwrap_or_else(|| panic!("docs/audit.md: no `restart_required` row"));
    let conf = source("docs/configuration.md");
    let reload = conf
        .split_once("### What a reload does not apply")
        .and_then(|(_, rest)| rest.split_once("\n## "))
        .map(|(section, _)| section)
        .unwrap_or_else(|| panic!("docs/configuration.md: no `What a reload does not apply`"));
    for s in settings {
        let (table, key) = s.split_once('.').unwrap_or((s, ""));
        assert!(
            row.contains(&format!("`{s}`")),
            "docs/audit.md's restart_required row lacks `{s}`"
        );
        // configuration.md names them as `listen` addresses, `[audit] output`, `[redis]`.
        let named = reload.contains(&format!("`{s}`"))
            || reload.contains(&format!("`[{table}] {key}`"))
            || reload.contains(&format!("`[{table}]`"))
            || (table == "listen" && reload.contains(&format!("`{key}`")))
            || (table == "listen" && reload.contains("`listen` addresses"));
        assert!(named, "docs/configuration.md's `What a reload does not apply` lacks `{s}`");
    }
}

/// Every string of a YAML document (a CI file's commands, folded as the CI runs them).
fn yaml_strings(y: &yaml_rust2::Yaml, out: &mut Vec<String>) {
    use yaml_rust2::Yaml;
    match y {
        Yaml::String(s) => out.push(s.clone()),
        Yaml::Array(items) => items.iter().for_each(|i| yaml_strings(i, out)),
        Yaml::Hash(h) => h.iter().for_each(|(k, v)| {
            yaml_strings(k, out);
            yaml_strings(v, out);
        }),
        _ => {}
    }
}

/// The `portcullis` commands written in `text` (`portcullis`, `…/portcullis` or `$PC`,
/// then a subcommand), each as its subcommand and the `--flags` given to it, up to the
/// end of the shell command (line, pipe, `;`, `&`, `)`, a backtick or a comment).
fn portcullis_commands(text: &str) -> Vec<(String, Vec<String>)> {
    let text = text.replace("\\\n", " ");
    let mut found = Vec::new();
    for (i, word) in text.match_indices("portcullis ").chain(text.match_indices("$PC ")) {
        if word == "portcullis "
            && text[..i].ends_with(|c: char| c.is_alphanumeric() || "-_.".contains(c))
        {
            continue;
        }
        let rest = &text[i + word.len()..];
        let end = rest.find(['\n', '|', ';', '&', ')', '`', '#']).unwrap_or(rest.len());
        let mut words = rest[..end].split_whitespace();
        let sub = match (words.next(), words.clone().next()) {
            (Some(w @ ("serve" | "check" | "demo")), _) => w.to_string(),
            (Some("policy"), Some(w @ ("test" | "explain" | "who" | "diff")))
            | (Some("dev"), Some(w @ ("token" | "certs"))) => {
                let first = rest.split_whitespace().next().unwrap_or_default();
                words.next();
                format!("{first} {w}")
            }
            _ => continue,
        };
        let flags = words
            .filter_map(|w| w.trim_start_matches(['"', '\'']).strip_prefix("--"))
            .map(|f| f.split(['=', '"', '\'']).next().unwrap_or(f).to_string())
            .collect();
        found.push((sub, flags));
    }
    found
}

/// Every `portcullis` command the documentation and the examples' CI files show takes
/// the flags it is given: each `--flag` is in that subcommand's `--help`. (Whether the
/// command then does what the text says is the walk-through's business: README's demo
/// in `cli`, the review commands in `review`.)
#[test]
fn every_documented_portcullis_command_uses_flags_the_binary_has() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut texts = Vec::new();
    for doc in documents(root) {
        let text =
            std::fs::read_to_string(&doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
        texts.push((doc, text));
    }
    let mut yaml = Vec::new();
    super::cli::yaml_files(&root.join("examples"), &mut yaml);
    for file in yaml {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let docs = yaml_rust2::YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut strings = Vec::new();
        docs.iter().for_each(|d| yaml_strings(d, &mut strings));
        texts.push((file, strings.join("\n")));
    }
    let (mut helps, mut bad, mut checked) = (std::collections::HashMap::new(), Vec::new(), 0);
    for (file, text) in &texts {
        for (sub, flags) in portcullis_commands(text) {
            let help = helps.entry(sub.clone()).or_insert_with(|| {
                let mut args: Vec<&str> = sub.split(' ').collect();
                args.push("--help");
                let (code, out, err) = run(&args);
                assert_eq!(code, 0, "portcullis {sub} --help: {err}");
                out
            });
            for flag in flags {
                checked += 1;
                let flag = format!("--{flag}");
                if !help.contains(&format!("{flag} ")) && !help.contains(&format!("{flag}\n")) {
                    bad.push(format!(
                        "{}: `portcullis {sub} {flag}`",
                        file.strip_prefix(root).unwrap_or(file).display()
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "flags the subcommand does not have:\n{}", bad.join("\n"));
    assert!(checked >= 30, "only {checked} flags checked: commands no longer found?");
}

/// The README's "Trying an example locally" runs an example beside `portcullis demo`,
/// moving the example's listeners off the demo's by rewriting `0.0.0.0:8443` and
/// `127.0.0.1:9090` in its `portcullis.toml`. An example that left its admin listener
/// to the default (`127.0.0.1:9090`) would keep the demo's port and fail to start.
#[test]
fn every_example_writes_out_the_listeners_the_readme_moves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = source("README.md");
    assert!(readme
        .contains("-e 's#0.0.0.0:8443#127.0.0.1:8444#' -e 's#127.0.0.1:9090#127.0.0.1:9091#'"));
    let mut bad = Vec::new();
    for entry in std::fs::read_dir(root.join("examples")).into_iter().flatten().flatten() {
        let cfg = entry.path().join("portcullis.toml");
        let Ok(text) = std::fs::read_to_string(&cfg) else { continue };
        let name = cfg.strip_prefix(root).unwrap_or(&cfg).display().to_string();
        if !text.lines().any(|l| l.starts_with("admin = \"127.0.0.1:9090\"")) {
            bad.push(format!("{name}: no `admin = \"127.0.0.1:9090\"`"));
        }
        if text
            .lines()
            .any(|l| l.starts_with("https = ") && !l.starts_with("https = \"0.0.0.0:8443\""))
        {
            bad.push(format!("{name}: an `https` listener other than 0.0.0.0:8443"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Every error code a client can be sent (docs/audit.md's reason table, its second
/// column: `401 `invalid-session``) is in the README's "What a caller sees", where a
/// user who got one looks it up.
#[test]
fn every_error_a_client_can_get_is_in_the_readme_caller_table() {
    let audit = source("docs/audit.md");
    let reasons = audit
        .split_once("## Reason codes")
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("docs/audit.md: no `## Reason codes`"));
    let mut codes: Vec<String> = Vec::new();
    for row in reasons.lines().filter(|l| l.starts_with("| `")) {
        let client = row.split('|').nth(2).unwrap_or_default();
        // `401 `invalid-session``, `503 `audit-unavailable``: a status, then the body's code.
        for (i, _) in client.match_indices(" `") {
            let status = client[..i].rsplit(|c: char| !c.is_ascii_digit()).next();
            if status.is_some_and(|s| s.len() == 3) {
                let code = client[i + 2..].split('`').next().unwrap_or_default();
                if !codes.iter().any(|c| c == code) {
                    codes.push(code.to_string());
                }
            }
        }
    }
    assert!(codes.len() >= 20, "only {} codes read from docs/audit.md: {codes:?}", codes.len());
    let readme = source("README.md");
    let section = readme
        .split_once("## What a caller sees")
        .and_then(|(_, s)| s.split_once("\n## "))
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("README.md: no `## What a caller sees`"));
    let missing: Vec<_> = codes.iter().filter(|c| !section.contains(&format!("`{c}`"))).collect();
    assert!(missing.is_empty(), "README's `What a caller sees` lacks {missing:?}");
}

/// The README's example audit event has the fields a real one has: the event of an
/// allowed Bitbucket deployment step, compared object by object (the values are the
/// README's own; the keys must be the proxy's).
#[tokio::test]
async fn the_readme_audit_example_has_the_fields_of_a_real_event() {
    use serde_json::Value;
    let readme = source("README.md");
    let example = readme
        .split_once("## The audit log")
        .and_then(|(_, s)| s.split_once("```json\n"))
        .and_then(|(_, s)| s.split_once("```"))
        .map(|(json, _)| json)
        .unwrap_or_else(|| panic!("README.md: no json block under `## The audit log`"));
    let example: Value =
        serde_json::from_str(example).unwrap_or_else(|e| panic!("README's audit example: {e}"));

    let w = crate::support::World::start().await;
    let t = w.token("bb", &["deploymentEnvironmentUuid={5c1f3d0a-1111-4a2b-9c3d-0e1f2a3b4c5d}"]);
    let r = w.get("/deploy/42", Some(&t)).await;
    assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
    let real = w.last_event().await;
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> =
            v.as_object().into_iter().flatten().map(|(k, _)| k.clone()).collect();
        k.sort();
        k
    };
    for part in ["", "tls", "rule", "identity", "ci"] {
        let (ex, re) =
            if part.is_empty() { (&example, &real) } else { (&example[part], &real[part]) };
        assert_eq!(keys(ex), keys(re), "README's example `{part}` against a real event: {real}");
    }
}

/// A README command block run from the repository's root (it names `examples/…`) that
/// calls the bare `portcullis` puts `target/release` on the `PATH` first: a user who
/// built with `cargo build --release` or ran `cargo run --release -- demo` has no
/// `portcullis` command otherwise (`command not found`).
#[test]
fn readme_blocks_run_from_the_repository_find_the_built_binary() {
    let readme = source("README.md");
    let mut bad = Vec::new();
    let mut rest = readme.as_str();
    while let Some((before, block)) = rest.split_once("```sh\n") {
        let line = readme.len() - rest.len() + before.len();
        let line = readme[..line].lines().count() + 1;
        let Some((block, after)) = block.split_once("```") else { break };
        rest = after;
        // In command position: first on its line, or in a `$( … )`.
        let calls_bare = block
            .lines()
            .any(|l| l.trim_start().starts_with("portcullis ") || l.contains("$(portcullis "));
        if block.contains("examples/") && calls_bare && !block.contains("target/release:$PATH") {
            bad.push(format!("README.md:{line}"));
        }
    }
    assert!(
        bad.is_empty(),
        "blocks that call `portcullis` without target/release on PATH: {bad:?}"
    );
}
