//! The real binary, as a user runs it: `check` diagnostics, the README's demo flow,
//! `serve` with SIGHUP / file-watcher reloads and a SIGTERM drain (its prompt exit, and
//! requests cut at the end of the grace period still audited), and a browser sign-in
//! to the demo (debug logging on) that leaves no secret on stdout or stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the binary with `args`: its exit code, stdout and stderr.
pub(crate) fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_every_problem_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    write(
        &p.join("portcullis.toml"),
        r#"[listen]
insecure_http = "127.0.0.1:0"

[issuers.gh]
preset = "github-actions"
issuer = "https://token.actions.githubusercontent.com"
audiences = ["https://proxy.example.com"]
algorithms = ["RS256", "HS256"]
leeway = "10m"

[issuers.bb]
preset = "bitbucket-pipelines"
issuer = "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc"
audiences = ["ari:cloud:bitbucket::workspace/7baee083-4f25-4a97-8a9a-0fde1b623b45"]
audiance = "typo"

[[routes]]
name = "api"
match = { host = "api.example.com" }
upstream = "ftp://nowhere"
policy = "api"

[[routes]]
name = "missing"
upstream = "http://127.0.0.1:1"
policy = "does-not-exist"
match = {}
"#,
    );
    write(
        &p.join("policies/api.toml"),
        r#"[[rule]]
id = "anyone-on-github"
effect = "allow"
issuer = "gh"

[[rule]]
id = "typo"
effect = "alow"
issuer = "nobody"
"#,
    );
    let cfg = p.join("portcullis.toml");
    let (code, _out, err) = run(&["check", "-c", &cfg.to_string_lossy()]);
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(".toml:")).collect();
    for needle in [
        "portcullis.toml:8:24",  // HS256 is never allowed (V4)
        "portcullis.toml:9:10",  // leeway over the cap (V19)
        "portcullis.toml:15:1",  // unknown key `audiance`
        "portcullis.toml:20:12", // bad upstream scheme
        "portcullis.toml:26:10", // missing policy file
        "api.toml:4:10",         // shared issuer without a pin (V22)
        "api.toml:8:10",         // unknown effect
        "api.toml:9:10",         // undeclared issuer
    ] {
        assert!(lines.iter().any(|l| l.contains(needle)), "missing {needle} in:\n{err}");
    }
    assert!(err.contains("alow"), "unknown effect reported: {err}");
    assert!(err.contains("nobody"), "undeclared issuer reported: {err}");
    let (code, out, _) = run(&["check", "-c", &cfg.to_string_lossy(), "--format", "json"]);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(v["ok"], false);
    assert!(v["problems"].as_array().map_or(0, |a| a.len()) >= 7);
    // Nonsense never panics.
    write(&cfg, "[[routes]\nname = ");
    let (code, _, err) = run(&["check", "-c", &cfg.to_string_lossy()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("portcullis.toml:1:"), "{err}");
    let (code, _, _) = run(&["check", "-c", "/nonexistent/portcullis.toml"]);
    assert_eq!(code, 2);
}

/// A policy pull request cannot write lines of its own into the CI log that runs
/// `check` on it: a quoted key or a policy name holding a newline printed a GitHub
/// Actions workflow command (`::add-mask::ANYONE` hides that word from the `policy diff`
/// report that follows), and an ANSI escape could erase the real error in a terminal.
#[test]
fn check_output_carries_no_line_or_escape_a_file_wrote() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    write(
        &p.join("portcullis.toml"),
        "[listen]\ninsecure_http = \"127.0.0.1:0\"\n\n[issuers.corp]\nissuer = \"https://idp.example.com\"\n\
         audiences = [\"p\"]\n\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\n\n\
         [[routes]]\nname = \"other\"\nmatch = { path_prefix = \"/o\" }\nupstream = \"http://127.0.0.1:1\"\n\
         policy = \"x\\n::add-mask::ANYONE\\u001b[2K\"\n",
    );
    write(
        &p.join("policies/api.toml"),
        "[\"x\\n::error::all policies pass\\u001b[2K\\u202e\"]\nid = \"a\"\n",
    );
    let cfg = p.join("portcullis.toml");
    let (code, _out, err) = run(&["check", "-c", &cfg.to_string_lossy()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("x\\u000A::error::all policies pass\\u001B[2K\\u202E"), "{err}");
    assert!(err.contains("x\\u000A::add-mask::ANYONE\\u001B[2K"), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("::")), "{err}");
    assert!(!err.contains(['\u{1b}', '\u{202e}']), "{err}");
}

#[test]
fn shipped_examples_pass_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("examples")).into_iter().flatten().flatten() {
        let p = entry.path();
        let cfg = if p.is_dir() { p.join("portcullis.toml") } else { p.clone() };
        if cfg.extension().is_some_and(|e| e == "toml") && cfg.is_file() {
            let (code, out, err) = run(&["check", "-c", &cfg.to_string_lossy()]);
            assert_eq!(code, 0, "{}: {out}{err}", cfg.display());
            n += 1;
        }
    }
    assert!(n >= 3, "quickstart, bitbucket and github examples at least ({n})");
}

/// Every YAML file under `dir`, hidden directories (`.github`) included.
pub(crate) fn yaml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            out.push(p);
        }
    }
}

/// Walks a YAML document; for each CI command list (GitLab `script`, `before_script`,
/// `after_script`; Bitbucket `script`, `after-script`) and each GitHub `run`, counts the
/// commands and records those that are not strings.
fn ci_commands(y: &yaml_rust2::Yaml, at: &str, n: &mut usize, bad: &mut Vec<String>) {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Hash(h) => {
            for (k, v) in h {
                let key = k.as_str().unwrap_or("?");
                let here = format!("{at}.{key}");
                match (key, v) {
                    ("script" | "before_script" | "after_script" | "after-script", v) => {
                        let items = match v {
                            Yaml::Array(items) => items.iter().collect(),
                            one => vec![one],
                        };
                        for (i, item) in items.into_iter().enumerate() {
                            *n += 1;
                            if item.as_str().is_none() {
                                bad.push(format!("{here}[{i}] is not a string: {item:?}"));
                            }
                        }
                    }
                    ("run", v) => {
                        *n += 1;
                        if v.as_str().is_none() {
                            bad.push(format!("{here} is not a string: {v:?}"));
                        }
                    }
                    (_, v) => ci_commands(v, &here, n, bad),
                }
            }
        }
        Yaml::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                ci_commands(v, &format!("{at}[{i}]"), n, bad);
            }
        }
        _ => {}
    }
}

/// The shipped CI files are YAML their CI accepts: each parses, and each command is a
/// string. A plain `- curl -H "Authorization: Bearer …"` item holds `: `, so YAML reads
/// it as a mapping, which GitLab rejects (`script` must be strings); `- >` folds it.
#[test]
fn shipped_ci_files_parse_and_every_command_is_a_string() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    yaml_files(&root.join("examples"), &mut files);
    yaml_files(&root.join(".ci"), &mut files);
    assert!(files.len() >= 7, "the shipped CI files and the Kubernetes manifest: {files:?}");
    let (mut n, mut bad) = (0, Vec::new());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let docs = yaml_rust2::YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
        for doc in &docs {
            ci_commands(doc, &f.display().to_string(), &mut n, &mut bad);
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(n >= 20, "every pipeline's commands were seen ({n})");
}

/// The commands a policy-review pipeline runs when the one containing `failing` fails,
/// as its CI runs them, and whether the job fails. Bitbucket: the step's `script` up to
/// the failing command, then its whole `after-script`. GitHub Actions: the steps up to
/// the failing one, then only those with `if: always()` or `failure()`.
fn pipeline_run(file: &Path, failing: &str) -> (Vec<String>, bool) {
    use yaml_rust2::{Yaml, YamlLoader};
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let docs =
        YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let doc = &docs[0];
    let strings = |y: &Yaml| -> Vec<String> {
        y.as_vec().into_iter().flatten().filter_map(|c| c.as_str().map(String::from)).collect()
    };
    let (mut ran, mut failed) = (Vec::new(), false);
    if doc["pipelines"].is_badvalue() {
        for step in doc["jobs"]["review"]["steps"].as_vec().into_iter().flatten() {
            let cmd = step["run"].as_str().or(step["uses"].as_str()).unwrap_or("").to_string();
            let cond = step["if"].as_str().unwrap_or("");
            if failed && !(cond.contains("always()") || cond.contains("failure()")) {
                continue;
            }
            failed |= cmd.contains(failing);
            ran.push(cmd);
        }
    } else {
        let step = &doc["pipelines"]["pull-requests"]["**"][0]["step"];
        for cmd in strings(&step["script"]) {
            failed = cmd.contains(failing);
            ran.push(cmd);
            if failed {
                break;
            }
        }
        ran.extend(strings(&step["after-script"]));
    }
    (ran, failed)
}

/// A failing `check` or `policy test` is when the reviewer needs the access diff most:
/// both policy-review pipelines still compute it and post it then, and still fail.
#[test]
fn policy_review_pipelines_post_the_diff_when_check_or_tests_fail() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policy-review");
    for (file, post) in [
        ("bitbucket-pipelines.yml", "/pullrequests/$BITBUCKET_PR_ID/comments"),
        (".github/workflows/policy-review.yml", "sticky-pull-request-comment"),
    ] {
        for failing in ["portcullis check", "portcullis policy test", "no command fails"] {
            let (ran, failed) = pipeline_run(&dir.join(file), failing);
            let all = ran.join("\n");
            assert_eq!(failed, failing != "no command fails", "{file}, {failing}: {all}");
            let diff = ran.iter().position(|c| c.contains("portcullis policy diff"));
            let posted = ran.iter().position(|c| c.contains(post));
            assert!(
                matches!((diff, posted), (Some(d), Some(p)) if d < p),
                "{file}: with {failing:?} failing, the diff is not posted:\n{all}"
            );
        }
    }
}

/// A route may name its policy anywhere in the repository (`policy = "teams/x.toml"`,
/// `server.policy_dir`): the GitHub workflow's path filter (`portcullis.toml`,
/// `policies/**`, `security-tests/**`) let a pull request that changed only such a file
/// run no check, no test and post no diff. Both pipelines review every pull request.
#[test]
fn policy_review_pipelines_run_on_every_pull_request() {
    use yaml_rust2::YamlLoader;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policy-review");
    let text = std::fs::read_to_string(dir.join(".github/workflows/policy-review.yml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let on = &docs[0]["on"]["pull_request"];
    assert!(on["paths"].is_badvalue() && on["paths-ignore"].is_badvalue(), "{text}");
    let text = std::fs::read_to_string(dir.join("bitbucket-pipelines.yml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(!docs[0]["pipelines"]["pull-requests"]["**"].is_badvalue(), "{text}");
    assert!(!text.contains("condition:") && !text.contains("changesets"), "{text}");
}

/// The GitHub workflow's comment is sticky (one comment, updated on every push). When
/// the diff failed (exit 2: a policy committed as a symbolic link, a path outside the
/// repository), its step left `policy-diff.md` empty, and the comment from the previous
/// push stayed: "No access changes." under the commit that changed them. The step is run
/// here as the runner runs it (`sh -e`), with a `portcullis` that fails: the file says
/// the diff failed, and the step fails.
#[test]
fn the_github_diff_step_replaces_the_comment_when_the_diff_fails() {
    use yaml_rust2::YamlLoader;
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/policy-review/.github/workflows/policy-review.yml");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let steps = docs[0]["jobs"]["review"]["steps"].as_vec().cloned().unwrap_or_default();
    let script = steps
        .iter()
        .filter_map(|s| s["run"].as_str())
        .find(|r| r.contains("portcullis policy diff"))
        .unwrap_or_else(|| panic!("no diff step: {text}"))
        .replace("${{ github.base_ref }}", "main");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap_or_else(|e| panic!("{e}"));
    let fake = bin.join("portcullis");
    std::fs::write(&fake, "#!/bin/sh\necho 'policies/api.toml: is a symbolic link' >&2\nexit 2\n")
        .unwrap_or_else(|e| panic!("{e}"));
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let summary = dir.path().join("summary.md");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new("sh")
        .args(["-e", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .output()
        .unwrap_or_else(|e| panic!("sh: {e}"));
    assert!(!out.status.success(), "the step must fail");
    let posted = std::fs::read_to_string(dir.path().join("policy-diff.md")).unwrap_or_default();
    assert!(posted.contains("policy diff` failed"), "{posted:?}");
}

/// The audiences a Bitbucket Pipelines file's steps ask for in `oidc: audiences:` (the
/// YAML subset the examples use; a commented-out block asks for nothing).
fn bitbucket_step_audiences(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut oidc_indent = None;
    for line in yaml.lines() {
        let code = line.split('#').next().unwrap_or("");
        let trimmed = code.trim();
        if trimmed.is_empty() {
            continue;
        }
        let indent = code.len() - code.trim_start().len();
        match oidc_indent {
            Some(i) if indent > i => {
                if let Some(v) = trimmed.strip_prefix("- ") {
                    out.push(v.trim().trim_matches(|c| c == '"' || c == '\'').to_string());
                }
            }
            _ => oidc_indent = (trimmed == "oidc:").then_some(indent),
        }
    }
    out
}

/// Every shipped `bitbucket-pipelines.yml` step that calls through the proxy with
/// `$BITBUCKET_STEP_OIDC_TOKEN` asks for an audience its `portcullis.toml` accepts: with
/// `oidc: true` alone the token's `aud` is only the workspace ARI, which V23 refuses.
#[test]
fn shipped_bitbucket_steps_ask_for_the_audience_their_config_requires() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("examples")).into_iter().flatten().flatten() {
        let yml = entry.path().join("bitbucket-pipelines.yml");
        let Ok(yaml) = std::fs::read_to_string(&yml) else { continue };
        if !yaml.contains("BITBUCKET_STEP_OIDC_TOKEN") {
            continue;
        }
        let cfg = entry.path().join("portcullis.toml");
        let text =
            std::fs::read_to_string(&cfg).unwrap_or_else(|e| panic!("{}: {e}", cfg.display()));
        let table: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", cfg.display()));
        let asked = bitbucket_step_audiences(&yaml);
        let issuers = table.get("issuers").and_then(|i| i.as_table()).into_iter().flatten();
        let mut bitbucket = 0;
        for (name, issuer) in issuers {
            if issuer.get("preset").and_then(|p| p.as_str()) != Some("bitbucket-pipelines") {
                continue;
            }
            bitbucket += 1;
            let accepted: Vec<&str> = issuer
                .get("audiences")
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .collect();
            assert!(
                accepted.iter().any(|a| asked.iter().any(|b| b == a)),
                "{}: the step's `oidc: audiences:` {asked:?} has none of [issuers.{name}] \
                 audiences {accepted:?}",
                yml.display()
            );
        }
        assert!(bitbucket > 0, "{}: no bitbucket-pipelines issuer", cfg.display());
        n += 1;
    }
    assert!(n >= 2, "the bitbucket-pipelines and postgres examples at least ({n})");
}

/// `dev token` reads the running demo's state: its `--help` says where from, and names
/// the `PORTCULLIS_DEMO_DIR` default both commands share.
#[test]
fn dev_token_help_names_the_demo_state_dir_and_its_environment_variable() {
    for args in [&["dev", "token", "--help"][..], &["demo", "--help"][..]] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("--state-dir"), "{args:?}: {out}");
        assert!(out.contains("PORTCULLIS_DEMO_DIR"), "{args:?}: {out}");
    }
}

/// Starts the demo like the README does and returns it with what it printed so far.
fn start_demo(dir: &Path, port: u16, cpus: Cpus) -> (Killed, String) {
    let (demo, out) = start_demo_with(dir, port, &[], &[], cpus);
    let seen = out.stdout();
    (demo, seen)
}

/// Everything a child printed, drained continuously (so a chatty log never blocks it).
#[derive(Clone, Default)]
struct Captured {
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Captured {
    fn drain(
        into: std::sync::Arc<std::sync::Mutex<String>>,
        from: impl std::io::Read + Send + 'static,
    ) {
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                if let Ok(mut all) = into.lock() {
                    all.push_str(&line);
                    all.push('\n');
                }
            }
        });
    }
    fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }
    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts the demo with extra environment variables and arguments; waits for its `ready`
/// banner.
/// On how many CPUs the demo may run: with one it uses a current-thread runtime.
#[derive(Clone, Copy)]
enum Cpus {
    All,
    One,
}

fn start_demo_with(
    dir: &Path,
    port: u16,
    env: &[(&str, &str)],
    args: &[&str],
    cpus: Cpus,
) -> (Killed, Captured) {
    let admin = free_port();
    let mut command = match cpus {
        Cpus::All => Command::new(BIN),
        Cpus::One => {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", BIN]);
            c
        }
    };
    let mut child = command
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .args(["--state-dir", &dir.to_string_lossy()])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("demo: {e}"));
    let out = Captured::default();
    if let Some(s) = child.stdout.take() {
        Captured::drain(out.stdout.clone(), s);
    }
    if let Some(s) = child.stderr.take() {
        Captured::drain(out.stderr.clone(), s);
    }
    let demo = Killed(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let seen = out.stdout();
        if seen.lines().any(|l| l.starts_with("ready ")) && seen.contains("other presets") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = out.stdout();
    assert!(
        seen.lines().any(|l| l.starts_with("ready https://127.0.0.1:")),
        "demo did not print ready:\n{seen}\n{}",
        out.stderr()
    );
    (demo, out)
}

#[tokio::test]
async fn the_readme_demo_flow_works_through_the_real_binary() {
    demo_flow(Cpus::All).await;
}

/// Pinned to one CPU (as in the load test, or a one-CPU container) the binary runs a
/// current-thread runtime; the whole flow must behave the same.
#[tokio::test]
async fn the_readme_demo_flow_works_on_one_cpu() {
    demo_flow(Cpus::One).await;
}

async fn demo_flow(cpus: Cpus) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();
    let (demo, banner) = start_demo(dir.path(), port, cpus);
    assert!(banner.contains("--claim branchName=feature/x"), "ready-to-paste commands: {banner}");
    let pki =
        portcullis::tls::DevPki::load_or_create(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let c = client(&pki, false);
    let url = format!("https://127.0.0.1:{port}/hello");
    let token = |extra: &[&str]| {
        let mut args = vec!["dev", "token", "--state-dir"];
        let d = dir.path().to_string_lossy().to_string();
        args.push(&d);
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        out.trim().to_string()
    };
    let get = |token: Option<String>| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let h: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
            send_with(&c, Method::GET, &url, &h, Bytes::new()).await
        }
    };
    // No token → 401, with the RFC 6750 challenge (no error code: no token was sent).
    let r = get(None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="portcullis""#);
    // Default token → 200 and the upstream sees the verified identity.
    let r = get(Some(token(&[]))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-issuer").as_deref(), Some("demo-bitbucket"));
    assert_eq!(r.upstream_header("x-portcullis-ci-branch").as_deref(), Some("main"));
    // Feature branch → 403 with the reason code.
    let r = get(Some(token(&["--claim", "branchName=feature/x"]))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "policy-denied");
    // The other presets work too.
    for preset in ["github-actions", "gitlab-ci", "human"] {
        let r = get(Some(token(&["--preset", preset]))).await;
        assert_eq!(r.status, StatusCode::OK, "{preset}: {}", r.text());
    }
    drop(demo);
}

/// With `--upstream` the user's own service answers, not the echo server: the banner
/// says what it receives and promises no echo.
#[test]
fn the_demo_banner_promises_an_echo_only_from_its_own_echo_server() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (demo, out) = start_demo_with(
        dir.path(),
        free_port(),
        &[],
        &["--upstream", "http://127.0.0.1:9"],
        Cpus::All,
    );
    // The browser hint follows the `ready-to-paste` lines the start waits for.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.stdout().contains("Sign out") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let banner = out.stdout();
    drop(demo);
    assert!(banner.contains("Sign out"), "{banner}");
    assert!(!banner.contains("echo"), "{banner}");
    assert!(banner.contains("your upstream receives the verified identity"), "{banner}");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (demo, banner) = start_demo(dir.path(), free_port(), Cpus::All);
    drop(demo);
    assert!(banner.contains("the upstream echoes the verified identity"), "{banner}");
}

/// A second demo on the same state directory leaves the first alone: it stops before
/// writing anything (the first hot-reloads that configuration, and `dev token` signs
/// with those keys for those issuer URLs) and says who holds the directory.
#[tokio::test]
async fn a_second_demo_on_the_same_state_dir_refuses_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();
    let (demo, _) = start_demo(dir.path(), port, Cpus::All);
    let pid = demo.0.id();
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let before = (read("portcullis.toml"), read("demo.json"));

    let d = dir.path().to_string_lossy().to_string();
    let admin = format!("127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{port}");
    let (code, out, err) =
        run(&["demo", "--listen", &listen, "--admin", &admin, "--state-dir", &d]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!("another demo is using {d} (pid {pid})")),
        "a clear refusal: {err}"
    );
    assert_eq!((read("portcullis.toml"), read("demo.json")), before, "nothing rewritten");

    // Past the watcher's quiet second: the first demo has nothing new to reload.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (code, token, err) = run(&["dev", "token", "--state-dir", &d]);
    assert_eq!(code, 0, "{err}");
    let pki =
        portcullis::tls::DevPki::load_or_create(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let auth = format!("Bearer {}", token.trim());
    let url = format!("https://127.0.0.1:{port}/hello");
    let r = send_with(
        &client(&pki, false),
        Method::GET,
        &url,
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    drop(demo);
}

#[test]
fn the_demo_refuses_non_loopback_binds_without_the_flag() {
    let (code, _, err) =
        run(&["demo", "--listen", "0.0.0.0:18443", "--state-dir", "/tmp/portcullis-demo-refuse"]);
    assert_ne!(code, 0);
    assert!(err.contains("--insecure-bind-any"), "{err}");
}

#[tokio::test]
async fn serve_reloads_on_sighup_and_file_change_and_drains_on_sigterm() {
    // Reuse a test world's issuer and upstream, but run the proxy as the real binary.
    let w =
        World::with(Setup { policies: vec![("api".into(), ONLY_MAIN.into())], ..Setup::default() })
            .await;
    let port = free_port();
    let cfg = std::fs::read_to_string(w.config_path())
        .unwrap_or_default()
        .replace("https = \"127.0.0.1:0\"", &format!("https = \"127.0.0.1:{port}\""))
        .replace("watch = false", "watch = true");
    let path = w.dir.path().join("served.toml");
    write(&path, &cfg);
    let audit = w.dir.path().join("audit.log");
    let cfg = std::fs::read_to_string(&path).unwrap_or_default().replace(
        "[server]",
        &format!("[audit]\noutput = {:?}\n\n[server]", audit.to_string_lossy()),
    );
    write(&path, &cfg);
    let child = Command::new(BIN)
        .args(["serve", "-c", &path.to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = Killed(child);
    // The reloads are waited for by their lines.
    let lines = stderr_lines(&mut child.0);
    let mut stderr = Vec::new();
    let url = format!("https://localhost:{port}/slow/1500");
    let c = client(&w.pki, false);
    let feature = w.token("bb", &["branchName=feature/x"]);
    let auth = format!("Bearer {feature}");
    // Wait until it serves: a main-branch token is let through once the issuer's keys
    // are loaded.
    let main = format!("Bearer {}", w.token("bb", &[]));
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            let x = format!("https://localhost:{port}/x");
            status = send_with(&c, Method::GET, &x, &[("authorization", &main)], Bytes::new())
                .await
                .status;
            if status == StatusCode::OK {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK, "serving");
    let status = send_with(
        &c,
        Method::GET,
        &format!("https://localhost:{port}/x"),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await
    .status;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // File watcher: widen the policy on disk.
    write(&w.policy_path("api"), FEATURE_TOO);
    let mut allowed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = send_with(
            &c,
            Method::GET,
            &format!("https://localhost:{port}/x"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await;
        if r.status == StatusCode::OK {
            allowed = true;
            break;
        }
    }
    assert!(allowed, "the watcher reloaded the widened policy");
    // SIGHUP with a broken policy: rejected, the good one keeps serving. The watcher
    // tries the broken file once and SIGHUP once, in either order: two rejections.
    replace(&w.policy_path("api"), "[[rule]]\nid = 1\n");
    let pid = child.0.id().to_string();
    let _ = Command::new("kill").args(["-HUP", &pid]).status();
    wait_for_line(&lines, &mut stderr, "reload rejected", 2);
    let r = send_with(
        &c,
        Method::GET,
        &format!("https://localhost:{port}/x"),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "last good config keeps serving");
    // SIGTERM during a slow request: it completes, then the process exits 0.
    let c2 = c.clone();
    let a2 = auth.clone();
    let slow = tokio::spawn(async move {
        send_with(&c2, Method::GET, &url, &[("authorization", &a2)], Bytes::new()).await
    });
    assert!(w.echo.slow_arrived(1, Duration::from_secs(20)).await, "the request never arrived");
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let r = slow.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, StatusCode::OK, "in-flight request drained");
    let mut code = None;
    for _ in 0..100 {
        if let Ok(Some(s)) = child.0.try_wait() {
            code = s.code();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, Some(0));
    // The process has exited: the rest of its stderr is there to the end.
    stderr.extend(lines.iter());
    let stderr = stderr.join("\n");
    assert!(stderr.contains("api.toml:2:6"), "reload diagnostics name file:line:col: {stderr}");
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(log.lines().count() >= 3, "{log}");
    for part in feature.split('.') {
        assert!(!log.contains(part) && !stderr.contains(part), "token material in logs");
    }
}

/// A log shipper that goes away (the reader of a `serve 2>&1 | shipper` pipe restarted,
/// a sidecar killed) leaves stderr a pipe with no reader: every diagnostic then fails
/// with EPIPE. That must cost the diagnostics, never the proxy: it starts, serves,
/// reloads and drains as before, and exits 0. (`eprintln!`, and tracing's own report of
/// a failed write, panic on EPIPE: the process exited 101 at its first line.)
#[tokio::test]
async fn serve_outlives_the_reader_of_its_stderr() {
    for format in ["text", "json"] {
        let w = World::with(Setup {
            policies: vec![("api".into(), ONLY_MAIN.into())],
            ..Setup::default()
        })
        .await;
        let port = free_port();
        let cfg = std::fs::read_to_string(w.config_path())
            .unwrap_or_default()
            .replace("https = \"127.0.0.1:0\"", &format!("https = \"127.0.0.1:{port}\""));
        let path = w.dir.path().join("served.toml");
        write(&path, &cfg);
        let child = Command::new(BIN)
            .args(["serve", "-c", &path.to_string_lossy(), "--log-format", format])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut child = Killed(child);
        // The reader is gone before the process has logged anything it did not buffer.
        drop(child.0.stderr.take());
        let c = client(&w.pki, false);
        let get = |token: String| {
            let (c, url) = (c.clone(), format!("https://localhost:{port}/x"));
            async move {
                let auth = format!("Bearer {token}");
                send_with(&c, Method::GET, &url, &[("authorization", &auth)], Bytes::new())
                    .await
                    .status
            }
        };
        let mut status = StatusCode::SERVICE_UNAVAILABLE;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                status = get(w.token("bb", &[])).await;
                if status == StatusCode::OK {
                    break;
                }
            }
            if let Ok(Some(s)) = child.0.try_wait() {
                panic!("{format}: serve exited ({s}) with its stderr unread");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, StatusCode::OK, "{format}: serving");
        // A reload (SIGHUP) logs as it applies the widened policy.
        let feature = w.token("bb", &["branchName=feature/x"]);
        assert_eq!(get(feature.clone()).await, StatusCode::FORBIDDEN);
        write(&w.policy_path("api"), FEATURE_TOO);
        let pid = child.0.id().to_string();
        let _ = Command::new("kill").args(["-HUP", &pid]).status();
        let mut allowed = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if get(feature.clone()).await == StatusCode::OK {
                allowed = true;
                break;
            }
        }
        assert!(allowed, "{format}: the reload was applied");
        // The drain logs too, and the exit is a clean one.
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let mut code = None;
        for _ in 0..100 {
            if let Ok(Some(s)) = child.0.try_wait() {
                code = s.code();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(code, Some(0), "{format}: serve exits 0 after a drain with stderr unread");
    }
}

/// One plain HTTP/1.0 GET to the admin listener on `port`: the response, or `None`
/// when it cannot be had within 2 s.
fn admin_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.0 200").then_some(out)
}

/// Out of file descriptors (`ulimit -n` low, more clients than descriptors), each
/// listener's accept fails with EMFILE until one is free. It must back off (not spin),
/// count the failures in `/metrics`, report them on stderr at most every 10 s (not one
/// line per retry: 20 a second per listener, for as long as the clients stay), and serve
/// again once descriptors are free.
#[tokio::test]
async fn accept_failures_out_of_descriptors_are_counted_and_reported_sparingly() {
    let w =
        World::with(Setup { policies: vec![("api".into(), ONLY_MAIN.into())], ..Setup::default() })
            .await;
    let (port, admin) = (free_port(), free_port());
    let cfg = std::fs::read_to_string(w.config_path())
        .unwrap_or_default()
        .replace("https = \"127.0.0.1:0\"", &format!("https = \"127.0.0.1:{port}\""))
        .replace("admin = \"127.0.0.1:0\"", &format!("admin = \"127.0.0.1:{admin}\""))
        .replace("[server]", "[server]\nmax_connections = 1000");
    let path = w.dir.path().join("served.toml");
    write(&path, &cfg);
    let script = format!("ulimit -n 64 && exec {BIN} serve -c \"$1\"");
    let child = Command::new("sh")
        .args(["-c", &script, "sh", &path.to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = Killed(child);
    let lines = stderr_lines(&mut child.0);
    let mut stderr = Vec::new();
    let mut up = false;
    for _ in 0..100 {
        if admin_get(admin, "/healthz").is_some() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the admin listener answers");
    // More clients than descriptors: the kernel completes their handshakes (backlog),
    // the process cannot accept them.
    let held: Vec<std::net::TcpStream> =
        (0..120).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    assert!(held.len() > 64, "connected {}", held.len());
    wait_for_line(&lines, &mut stderr, "accept failed", 1);
    // Held a while longer: retried every 50 ms, reported once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(held);
    let mut metrics = None;
    for _ in 0..100 {
        metrics = admin_get(admin, "/metrics");
        if metrics.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = metrics.unwrap_or_else(|| panic!("/metrics answers again"));
    let failed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_accept_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("portcullis_accept_errors_total in {metrics}"));
    stderr.extend(lines.try_iter());
    let reported = stderr.iter().filter(|l| l.contains("accept failed")).count();
    assert!(failed >= 1, "{failed}");
    // One per listener (the https one, and the admin one if a scrape met EMFILE too).
    assert!(reported <= 2, "one report per listener per 10 s, not one per retry: {stderr:#?}");
    // Descriptors free again: it serves.
    let c = client(&w.pki, false);
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let url = format!("https://localhost:{port}/x");
    let r = send_with(&c, Method::GET, &url, &[("authorization", &auth)], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// `child`'s stderr, line by line as it comes (read on a thread of its own).
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, lines) = std::sync::mpsc::channel();
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    lines
}

/// Reads `lines` into `seen` until `n` of those seen contain `what`: a reload is waited
/// for by what it logs, not by a guess at how long it takes (each line within 20 s).
fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    what: &str,
    n: usize,
) {
    while seen.iter().filter(|l| l.contains(what)).count() < n {
        match lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("fewer than {n} `{what}` lines after 20 s: {seen:#?}"),
        }
    }
}

const ONLY_MAIN: &str = r#"
[[rule]]
id = "bb-main-only"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = "main" }
"#;

const FEATURE_TOO: &str = r#"
[[rule]]
id = "bb-any-branch"
effect = "allow"
issuer = "bb"
ci = { repository = "{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}", branch = ["main", "feature/*"] }
"#;

#[test]
fn check_runs_inline_policy_tests_and_exits_1_on_a_failure() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    write(
        &p.join("portcullis.toml"),
        "[listen]\ninsecure_http = \"127.0.0.1:0\"\n[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"x\"]\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\nmatch = {}\n",
    );
    let policy = "[[rule]]\nid = \"sre\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"sre\"]\n\n[[test]]\nname = \"sre may\"\nidentity = { issuer = \"corp\", claims = { sub = \"a\", groups = [\"sre\"] } }\nrequest = \"GET /\"\nexpect = \"allow\"\n";
    write(&p.join("policies/api.toml"), policy);
    let cfg = p.join("portcullis.toml").to_string_lossy().to_string();
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    // The same case expecting the opposite fails, naming the test's file:line.
    write(&p.join("policies/api.toml"), &policy.replace("expect = \"allow\"", "expect = \"deny\""));
    let (code, _, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("api.toml:7: test failed: sre may"), "{err}");
    // `serve` refuses such a version, as it refuses one with errors (exit 2).
    let child = Command::new(BIN)
        .args(["serve", "-c", &cfg])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = Killed(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break status.code(),
            _ if std::time::Instant::now() > deadline => {
                panic!("serve started with a failing test")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("api.toml:7: test failed: sre may"), "{err}");
}

/// `strip_prefix = true` on a route whose prefix is `/` strips nothing: `check` says so
/// as a warning at the key, `file:line:col: warning: …`, and still exits 0.
#[test]
fn check_warns_about_strip_prefix_on_a_route_without_a_prefix() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    write(
        &p.join("portcullis.toml"),
        "[listen]\ninsecure_http = \"127.0.0.1:0\"\n[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"x\"]\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\nmatch = {}\nstrip_prefix = true\n",
    );
    let policy =
        "[[rule]]\nid = \"sre\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"sre\"]\n";
    write(&p.join("policies/api.toml"), policy);
    let cfg = p.join("portcullis.toml").to_string_lossy().to_string();
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    let want = format!(
        "{cfg}:11:16: warning: route `api` has `strip_prefix = true` and `path_prefix` `/`: there is no prefix to strip"
    );
    assert!(err.lines().any(|l| l.starts_with(&want)), "{want}\nin:\n{err}");
    assert!(out.contains("ok (1 warning(s))"), "{out}");
}

/// `groups_claim` as a JSON Pointer (Keycloak's `/realm_access/roles`) passes `check`
/// with the policy's `[[test]]`s reading the roles there; one that names no claim is an
/// error at its value, `file:line:col`, as `serve` would refuse to start.
#[test]
fn check_reads_groups_claim_pointers_and_reports_one_that_names_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    let config = |claim: &str| {
        format!("[listen]\ninsecure_http = \"127.0.0.1:0\"\n[issuers.corp]\nissuer = \"https://sso.acme.example/realms/acme\"\naudiences = [\"edge-proxy\"]\ngroups_claim = \"{claim}\"\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\nmatch = {{}}\n")
    };
    let policy = "[[rule]]\nid = \"route-admins\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"route-admin\"]\n\n[[test]]\nname = \"a client role admits\"\nidentity = { issuer = \"corp\", claims = { resource_access = { \"edge.proxy\" = { roles = [\"route-admin\"] } } } }\nrequest = \"GET /\"\nexpect = \"allow\"\n\n[[test]]\nname = \"a realm role does not\"\nidentity = { issuer = \"corp\", claims = { realm_access = { roles = [\"route-admin\"] } } }\nrequest = \"GET /\"\nexpect = \"deny\"\n";
    write(&p.join("policies/api.toml"), policy);
    let cfg = p.join("portcullis.toml").to_string_lossy().to_string();
    write(Path::new(&cfg), &config("/resource_access/edge.proxy/roles"));
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    for bad in ["/resource_access//roles", "/resource_access/edge~2proxy/roles"] {
        write(Path::new(&cfg), &config(bad));
        let (code, out, err) = run(&["check", "-c", &cfg]);
        assert_eq!(code, 2, "{bad}: {out}{err}");
        let want = format!("{cfg}:6:16: `groups_claim` has ");
        assert!(err.lines().any(|l| l.starts_with(&want)), "{bad}: {want}\nin:\n{err}");
    }
}

/// A `[[test]]` identity is a token the verifier would accept, or `check` says why at
/// the value: a time claim that is no number (`exp = "soon"`) or an `aud` that is no
/// string or list of strings (`aud = 5`), which the verifier refuses (V14, V21), of an
/// `oidc` issuer as of a CI one; and, when the issuer's `login` asks for `acr_values`,
/// a person's identity without one of those `acr`s, which serve refuses (401
/// `acr-mismatch`) as the sign-in does.
#[test]
fn check_holds_test_identities_to_the_token_types_and_acr_the_verifier_does() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    write(&p.join("keys"), "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n");
    let config = |login: &str| {
        format!("[listen]\ninsecure_http = \"127.0.0.1:0\"\n[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"x\"]\n{login}[issuers.gh]\npreset = \"github-actions\"\nissuer = \"https://token.actions.githubusercontent.com\"\naudiences = [\"x\"]\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\nmatch = {{}}\n")
    };
    let cfg = p.join("portcullis.toml").to_string_lossy().to_string();
    let file = p.join("policies/api.toml").to_string_lossy().to_string();
    let rules =
        "[[rule]]\nid = \"sre\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"sre\"]\n";
    let case = |name: &str, claims: &str| {
        format!("\n[[test]]\nname = \"{name}\"\nidentity = {{ issuer = \"corp\", groups = [\"sre\"], claims = {{ {claims} }} }}\nrequest = \"GET /\"\nexpect = \"allow\"\n")
    };
    let policy = |cases: &[(&str, &str)]| {
        rules.to_string() + &cases.iter().map(|(n, c)| case(n, c)).collect::<String>()
    };
    write(Path::new(&cfg), &config(""));
    let bad = [
        ("exp", "exp = \"soon\"", "is a string, but oidc tokens carry it as a number"),
        ("aud", "aud = 5", "is an integer, but oidc tokens carry it as a string or a list"),
        ("nbf", "nbf = [1]", "is a list, but"),
        ("iat", "iat = true", "is a boolean, but"),
        ("aud list", "aud = [\"x\", 5]", "is a list, but"),
        ("other aud", "aud = [\"y\"]", "names none of issuer `corp`'s `audiences` (x)"),
        ("other iss", "iss = \"https://elsewhere.example\"", "is not issuer `corp`'s `issuer`"),
    ];
    let text = policy(&bad.map(|(name, claims, _)| (name, claims)));
    write(Path::new(&file), &text);
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 2, "{out}{err}");
    for (name, claims, why) in bad {
        let (claim, value) = claims.split_once(" = ").unwrap_or_default();
        // Where the value is, counted as `check` counts (1-based).
        let header = text.find(&format!("name = \"{name}\"")).unwrap_or_default();
        let at = header + text[header..].find(claims).unwrap_or_default() + claim.len() + 3;
        let line = text[..at].matches('\n').count() + 1;
        let col = at - text[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
        let want = format!("{file}:{line}:{col}: test identity claim `{claim}` ");
        let found = err.lines().any(|l| l.starts_with(&want) && l.contains(why));
        assert!(found, "{value}: {want}…{why}\nin:\n{err}");
    }
    // Numbers and an audience of the verifier's types are fine.
    let typed = "exp = 1767229200, iat = 1767225600.5, nbf = 0, aud = [\"y\", \"x\"], azp = \"x\", iss = \"https://idp.example.com\"";
    write(Path::new(&file), &policy(&[("typed", typed)]));
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    // A login that asks for `acr_values`: a person's identity needs one of them.
    let login = "login = { client_id = \"x\", client_secret_env = \"PATH\", extra_params = { acr_values = \"phr mfa\" } }\n[session]\nkeys_file = \"keys\"\n";
    write(Path::new(&cfg), &config(login));
    write(
        Path::new(&file),
        &policy(&[("without acr", "email = \"a@b.example\""), ("pwd", "acr = \"pwd\"")]),
    );
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 2, "{out}{err}");
    let refused: Vec<&str> =
        err.lines().filter(|l| l.contains("is not an oidc token the proxy would accept")).collect();
    assert_eq!(refused.len(), 2, "{err}");
    assert!(refused[0].contains("no `acr`") && refused[1].contains("not one of"), "{err}");
    write(Path::new(&file), &policy(&[("mfa", "acr = \"mfa\""), ("phr", "acr = \"phr\"")]));
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
}

/// `CONNECT` (and `TRACE`) are refused with 405 on every route before any policy is
/// asked: a rule listing them in `methods` is dead, and `check` says so at the rule's
/// `methods`, `file:line:col: warning: …`, still exiting 0.
#[test]
fn check_warns_about_connect_in_a_rules_methods() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    write(
        &p.join("portcullis.toml"),
        "[listen]\ninsecure_http = \"127.0.0.1:0\"\n[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"x\"]\n[[routes]]\nname = \"api\"\nupstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\nmatch = {}\n",
    );
    let policy = "[[rule]]\nid = \"tunnel\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"sre\"]\nmethods = [\"GET\", \"CONNECT\"]\n";
    write(&p.join("policies/api.toml"), policy);
    let cfg = p.join("portcullis.toml").to_string_lossy().to_string();
    let (code, out, err) = run(&["check", "-c", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    let file = p.join("policies/api.toml").to_string_lossy().to_string();
    let want = format!(
        "{file}:6:11: warning: allow rule `tunnel` lists `CONNECT` in `methods`, which never reaches a policy"
    );
    assert!(err.lines().any(|l| l.starts_with(&want)), "{want}\nin:\n{err}");
    assert!(out.contains("ok (1 warning(s))"), "{out}");
}

/// `name=value` from a URL's query.
fn query_value(url: &str, name: &str) -> String {
    url.split(['?', '&'])
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
        .unwrap_or_default()
        .to_string()
}

/// Every `aaa.bbb.ccc` run of base64url whose first part opens a JSON object: a
/// compact JWS, whatever its value.
fn jws_like(text: &str) -> Vec<String> {
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.split(|c: char| !(b64(c) || c == '.'))
        .filter(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 3 && parts[0].starts_with("eyJ") && parts.iter().all(|p| p.len() >= 8)
        })
        .map(str::to_string)
        .collect()
}

/// A cookie-keeping client that says it wants HTML.
struct DemoBrowser {
    client: TestClient,
    jar: BTreeMap<String, String>,
}

impl DemoBrowser {
    async fn go(&mut self, method: Method, url: String, body: &'static str) -> Resp {
        let cookies = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
        let cookies = cookies.join("; ");
        let mut h = vec![("accept", "text/html,application/xhtml+xml")];
        if !cookies.is_empty() {
            h.push(("cookie", cookies.as_str()));
        }
        if method == Method::POST {
            h.push(("content-type", "application/x-www-form-urlencoded"));
        }
        let r = send_with(&self.client, method, &url, &h, Bytes::from(body)).await;
        for v in r.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()) {
            let first = v.split(';').next().unwrap_or_default();
            let Some((n, val)) = first.split_once('=') else { continue };
            if v.contains("Max-Age=0") {
                self.jar.remove(n);
            } else {
                self.jar.insert(n.to_string(), val.to_string());
            }
        }
        r
    }
}

/// A browser signs in to the real demo through its dev issuer's form; with debug
/// logging on, nothing secret of that sign-in is in its stdout (audit) or stderr.
#[tokio::test]
async fn a_browser_sign_in_leaves_no_secret_on_stdout_or_stderr() {
    use portcullis::session::seal::{Purpose, Sealer};

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();
    let (demo, out) =
        start_demo_with(dir.path(), port, &[("PORTCULLIS_LOG", "debug")], &[], Cpus::All);
    let pki =
        portcullis::tls::DevPki::load_or_create(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let c = client(&pki, false);
    let base = format!("https://127.0.0.1:{port}");
    let mut b = DemoBrowser { client: c, jar: BTreeMap::new() };
    let location = |r: &Resp| {
        r.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    };

    // The protected page sends the browser to the dev issuer (the demo's only sign-in).
    let r = b.go(Method::GET, format!("{base}/hello"), "").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let authorize = location(&r);
    assert!(authorize.contains("/human/authorize?"), "{authorize}");
    let login_cookies: Vec<String> = b
        .jar
        .iter()
        .filter(|(k, _)| k.starts_with("__Host-_portcullis_login_"))
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(login_cookies.len(), 1, "{:?}", b.jar);
    let nonce = query_value(&authorize, "nonce");
    let challenge = query_value(&authorize, "code_challenge");

    // The dev issuer's form, submitted: a redirect to the callback with code and state.
    let page = b.go(Method::GET, authorize.clone(), "").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    assert!(page.text().contains("name=\"username\""), "{}", page.text());
    let r = b.go(Method::POST, authorize.clone(), "username=alice&groups=engineering").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
    let callback = location(&r);
    let (code, state) = (query_value(&callback, "code"), query_value(&callback, "state"));

    // The callback signs in; the page is then served with the session cookie.
    let r = b.go(Method::GET, callback.clone(), "").await;
    assert_eq!(r.status, StatusCode::FOUND, "callback: {}", r.text());
    assert_eq!(location(&r), format!("{base}/hello"));
    let r = b.go(Method::GET, format!("{base}/hello"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.upstream_header("x-portcullis-subject").as_deref(), Some("alice"));
    let session_values: Vec<String> = b
        .jar
        .iter()
        .filter(|(k, _)| k.starts_with("__Host-_portcullis"))
        .map(|(_, v)| v.clone())
        .collect();
    assert!(!session_values.is_empty(), "{:?}", b.jar);

    // What the sealed cookies hold, opened with the demo's own session key: the
    // refresh token, and the login's PKCE verifier.
    let keys = std::fs::read_to_string(dir.path().join("session-keys")).unwrap_or_default();
    let sealer = Sealer::from_text(&keys).unwrap_or_else(|e| panic!("session keys: {e}"));
    let pairs: Vec<(&str, &str)> = b.jar.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sealed = portcullis::session::cookie::read(&pairs, "__Host-_portcullis")
        .and_then(Result::ok)
        .unwrap_or_default();
    let session: serde_json::Value = sealer
        .open(Purpose::Session, &sealed)
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok())
        .unwrap_or_default();
    let refresh = session["r"].as_str().unwrap_or_default().to_string();
    assert!(!refresh.is_empty(), "the dev issuer hands out refresh tokens: {session}");
    let login: serde_json::Value = sealer
        .open(Purpose::Login, &login_cookies[0])
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok())
        .unwrap_or_default();
    let verifier = login["p"].as_str().unwrap_or_default().to_string();
    assert_eq!(login["n"].as_str(), Some(nonce.as_str()), "{login}");
    let client_secret =
        std::fs::read_to_string(dir.path().join("client-secret")).unwrap_or_default();

    // Sign out too, so that path is logged as well.
    let r = b.go(Method::GET, format!("{base}/.portcullis/logout"), "").await;
    assert!(r.status.is_redirection() || r.status == StatusCode::OK, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(demo);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (stdout, stderr) = (out.stdout(), out.stderr());
    assert!(stdout.contains("\"subject\":\"alice\""), "the audit has the sign-in:\n{stdout}");
    assert!(stderr.contains("DEBUG"), "debug logging is on:\n{stderr}");
    // Its stderr is a pipe, not a terminal: no colour escapes in what a file would keep.
    assert!(!stderr.contains('\u{1b}'), "ANSI escapes on a piped stderr:\n{stderr}");
    let mut secrets = vec![
        ("authorization code", code),
        ("state", state),
        ("nonce", nonce),
        ("PKCE code challenge", challenge),
        ("PKCE code verifier", verifier),
        ("refresh token", refresh),
        ("client secret", client_secret.trim().to_string()),
    ];
    secrets.extend(login_cookies.into_iter().map(|v| ("login cookie", v)));
    secrets.extend(session_values.into_iter().map(|v| ("session cookie", v)));
    for (what, secret) in &secrets {
        assert!(secret.len() >= 16, "{what} is too short to search for: {secret:?}");
        let head = &secret[..16];
        for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            assert!(!text.contains(head), "the {what} (or its first 16 characters) is on {stream}");
        }
    }
    // The ID token (and any other token) never appears: no compact JWS at all.
    for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        let found = jws_like(text);
        assert!(found.is_empty(), "a JWS (ID token?) is on {stream}: {found:?}");
    }
}

/// `dev floor`, the load test's baseline, forwards method, path and query to its upstream
/// unchanged and refuses anything but loopback.
#[tokio::test]
async fn dev_floor_forwards_to_its_upstream_and_binds_loopback_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = portcullis::dev::echo::EchoServer::start(
        "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("addr: {e:?}")),
    )
    .await
    .unwrap_or_else(|e| panic!("echo upstream: {e:?}"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = format!("http://{}", echo.addr());
    let mut child = Command::new(BIN)
        .args(["dev", "floor", "--listen", &listen, "--upstream", &upstream])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn dev floor: {e:?}"));
    let Some(stdout) = child.stdout.take() else { panic!("no stdout") };
    let floor = Killed(child);
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .unwrap_or_else(|e| panic!("dev floor became ready: {e:?}"))
        .unwrap_or_else(|e| panic!("reader: {e:?}"));
    assert_eq!(line.trim(), format!("ready floor on http://{listen}"));

    let mut s =
        tokio::net::TcpStream::connect(&listen).await.unwrap_or_else(|e| panic!("connect: {e:?}"));
    s.write_all(
        b"POST /a/b?c=d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await
    .unwrap_or_else(|e| panic!("write: {e:?}"));
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .unwrap_or_else(|e| panic!("answer in time: {e:?}"))
        .unwrap_or_else(|e| panic!("read: {e:?}"));
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body: serde_json::Value = serde_json::from_str(
        &resp[resp.find("\r\n\r\n").unwrap_or_else(|| panic!("no head end: {resp}")) + 4..],
    )
    .unwrap_or_else(|e| panic!("echo JSON: {e:?}"));
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/a/b");
    assert_eq!(body["query"], "c=d");
    assert_eq!(body["body_bytes"], 3);
    drop(floor);

    let (code, _, err) = run(&["dev", "floor", "--listen", "0.0.0.0:0", "--upstream", &upstream]);
    assert_ne!(code, 0);
    assert!(err.contains("loopback only"), "{err}");
}

/// `serve` run on a test world's configuration: HTTPS on a free port, the file watcher
/// on (as by default), audit events to a file; each line of its stderr is kept with
/// the moment it was read.
struct Served {
    child: Killed,
    port: u16,
    audit: std::path::PathBuf,
    stderr: std::sync::mpsc::Receiver<(std::time::Instant, String)>,
    /// The stderr lines read before `shutdown complete`.
    log: Vec<String>,
}

impl Served {
    async fn start(w: &World, shutdown_grace: &str) -> Served {
        let port = free_port();
        let audit = w.dir.path().join("audit.log");
        let cfg = std::fs::read_to_string(w.config_path())
            .unwrap_or_default()
            .replace("https = \"127.0.0.1:0\"", &format!("https = \"127.0.0.1:{port}\""))
            .replace("watch = false", "watch = true")
            .replace("shutdown_grace = \"5s\"", &format!("shutdown_grace = {shutdown_grace:?}"))
            .replace(
                "[server]",
                &format!("[audit]\noutput = {:?}\n\n[server]", audit.to_string_lossy()),
            );
        let path = w.dir.path().join("served.toml");
        write(&path, &cfg);
        let mut child = Command::new(BIN)
            .args(["serve", "-c", &path.to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let (tx, stderr) = std::sync::mpsc::channel();
        if let Some(err) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if tx.send((std::time::Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
        }
        let served = Served { child: Killed(child), port, audit, stderr, log: Vec::new() };
        // Serving once a token is accepted (the issuer's keys are loaded).
        let c = client(&w.pki, false);
        let auth = format!("Bearer {}", w.token("bb", &[]));
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                let (url, h) = (served.url("/ready"), [("authorization", auth.as_str())]);
                if send_with(&c, Method::GET, &url, &h, Bytes::new()).await.status == StatusCode::OK
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        served
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    fn terminate(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.0.id().to_string()]).status();
    }

    /// After SIGTERM: how long after logging `shutdown complete` the process exited,
    /// and its exit code. (Blocks the thread: call it once nothing else must run.)
    fn exit_after_shutdown_complete(&mut self) -> (Duration, Option<i32>) {
        let mut complete = None;
        let mut seen = Vec::new();
        while let Ok((at, line)) = self.stderr.recv_timeout(Duration::from_secs(30)) {
            if line.contains("shutdown complete") {
                complete = Some(at);
                break;
            }
            seen.push(line);
        }
        let complete = complete.unwrap_or_else(|| panic!("no `shutdown complete`: {seen:#?}"));
        self.log = seen;
        while complete.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(s)) = self.child.0.try_wait() {
                return (complete.elapsed(), s.code());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("still running 20 s after `shutdown complete`");
    }

    /// The HTTP audit events written for `path`.
    fn events_for(&self, path: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["path"] == path)
            .collect()
    }
}

/// After SIGTERM the drain finishes the request in flight and writes its audit event;
/// then the process exits at once, not after every blocking thread of the runtime (a
/// DNS lookup to a slow resolver) has returned.
#[tokio::test]
async fn serve_exits_promptly_once_shutdown_is_complete() {
    let w = World::start().await;
    let mut served = Served::start(&w, "5s").await;
    let c = client(&w.pki, false);
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let get = |url: String| {
        let (c, auth) = (c.clone(), auth.clone());
        async move { send_with(&c, Method::GET, &url, &[("authorization", &auth)], Bytes::new()).await }
    };
    let slow = tokio::spawn(get(served.url("/slow/1000")));
    assert!(w.echo.slow_arrived(1, Duration::from_secs(20)).await, "the request never arrived");
    served.terminate();
    assert_eq!(
        slow.await.map(|r| r.status).ok(),
        Some(StatusCode::OK),
        "in-flight request drained"
    );
    let (after, code) = served.exit_after_shutdown_complete();
    eprintln!("exited {after:?} after `shutdown complete`");
    assert_eq!(code, Some(0));
    assert!(after < Duration::from_secs(1), "exited {after:?} after `shutdown complete`");
    let drained = served.events_for("/slow/1000");
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert_eq!(drained[0]["status"], 200);
    // The start-up line is words, not a Rust debug struct.
    let want = format!("serving: https 127.0.0.1:{}, admin 127.0.0.1:", served.port);
    let serving: Vec<&String> = served.log.iter().filter(|l| l.contains("serving: ")).collect();
    assert_eq!(serving.len(), 1, "{:#?}", served.log);
    assert!(serving[0].contains(&want), "{}", serving[0]);
    assert!(serving[0].contains("route") && serving[0].contains("issuers "), "{}", serving[0]);
    assert!(
        !served.log.iter().any(|l| l.contains("Bound {") || l.contains("Some(")),
        "{:#?}",
        served.log
    );
}

/// A request still running when the grace period ends is cut, and still gets its audit
/// event in the log before the process exits, `shutting-down` (the proxy cut it, not the
/// client: found by probing, such requests were logged `client-closed`), 499 before its
/// response head, the status sent with its body cut; over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn requests_cut_by_the_end_of_the_grace_period_are_audited() {
    let w = World::start().await;
    let mut served = Served::start(&w, "1s").await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    // A response whose head came and whose body the client is not reading yet.
    let (c, url) = (client(&w.pki, false), served.url("/stream/100000000"));
    let req = http::Request::get(url)
        .header("authorization", auth.clone())
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap_or_else(|e| panic!("{e}"));
    let streaming = c.request(req).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(streaming.status(), 200);
    let mut cut = Vec::new();
    for (h2, path) in [(false, "/slow/8000"), (true, "/slow/8001")] {
        let (c, auth, url) = (client(&w.pki, h2), auth.clone(), served.url(path));
        cut.push(tokio::spawn(async move {
            let req = http::Request::get(url)
                .header("authorization", auth)
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap_or_else(|e| panic!("{e}"));
            c.request(req).await.map(|r| r.status())
        }));
    }
    assert!(w.echo.slow_arrived(2, Duration::from_secs(20)).await, "the requests never arrived");
    let start = std::time::Instant::now();
    served.terminate();
    for request in cut {
        let answer = tokio::time::timeout(Duration::from_secs(6), request).await;
        assert!(matches!(answer, Ok(Ok(Err(_)))), "not cut: {answer:?}");
    }
    let (after, code) = served.exit_after_shutdown_complete();
    let took = start.elapsed();
    assert_eq!(code, Some(0));
    assert!(after < Duration::from_secs(1), "exited {after:?} after `shutdown complete`");
    assert!(took < Duration::from_secs(4), "the grace period is 1 s; the exit took {took:?}");
    for path in ["/slow/8000", "/slow/8001"] {
        let events = served.events_for(path);
        assert_eq!(events.len(), 1, "{path}: {events:?}");
        assert_eq!(events[0]["reason"], "shutting-down", "{path}");
        assert_eq!(events[0]["status"], 499, "{path}");
        assert_eq!(events[0]["decision"], "allow", "{path}");
    }
    drop(streaming);
    let events = served.events_for("/stream/100000000");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "shutting-down", "{events:?}");
    assert_eq!(events[0]["status"], 200, "{events:?}");
    assert_eq!(events[0]["decision"], "allow", "{events:?}");
}

/// An audit output that cannot be written (here `/dev/full`; a full disk or a closed
/// pipe alike) is not silent: the failure is on stderr (once, not once per event), in
/// `/metrics`, and `/readyz` answers 503 so a load balancer moves traffic away.
#[tokio::test]
async fn an_audit_output_that_cannot_be_written_shows_on_stderr_metrics_and_readyz() {
    let w = World::start().await;
    let (port, admin) = (free_port(), free_port());
    let cfg = std::fs::read_to_string(w.config_path())
        .unwrap_or_default()
        .replace("https = \"127.0.0.1:0\"", &format!("https = \"127.0.0.1:{port}\""))
        .replace("admin = \"127.0.0.1:0\"", &format!("admin = \"127.0.0.1:{admin}\""))
        .replace("[server]", "[audit]\noutput = \"/dev/full\"\n\n[server]");
    let path = w.dir.path().join("full.toml");
    write(&path, &cfg);
    let stderr_path = w.dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).unwrap_or_else(|e| panic!("{e}"));
    let mut child = Killed(
        Command::new(BIN)
            .args(["serve", "-c", &path.to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let c = client(&w.pki, false);
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let url = format!("https://localhost:{port}/full");
    let mut served = 0;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let r = send_with(&c, Method::GET, &url, &[("authorization", auth.as_str())], Bytes::new())
            .await;
        if r.status == StatusCode::OK {
            served += 1;
            if served == 20 {
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(served, 20, "the proxy did not serve");
    let plain: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let admin_url = |p: &str| format!("http://127.0.0.1:{admin}{p}");
    let mut ready = send_with(&plain, Method::GET, &admin_url("/readyz"), &[], Bytes::new()).await;
    for _ in 0..50 {
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = send_with(&plain, Method::GET, &admin_url("/readyz"), &[], Bytes::new()).await;
    }
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{}", ready.text());
    assert_eq!(ready.json()["audit"], "write-failing");
    let metrics = send_with(&plain, Method::GET, &admin_url("/metrics"), &[], Bytes::new()).await;
    let errors = metrics
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_audit_write_errors_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(errors.is_some_and(|n| n > 0), "{}", metrics.text());
    let logged = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let reports = logged.lines().filter(|l| l.contains("audit log write failed")).count();
    // Rate-limited: 20 events and several retries, one line.
    assert_eq!(reports, 1, "{logged}");

    // At shutdown the events never written are not lost silently: one line says how
    // many, after a bounded wait (the writer stops retrying once the log is closed).
    let _ = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    let start = std::time::Instant::now();
    let code = loop {
        if let Ok(Some(s)) = child.0.try_wait() {
            break s.code();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
    let logged = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let lost: Vec<&str> = logged.lines().filter(|l| l.contains("audit log incomplete")).collect();
    assert_eq!(lost.len(), 1, "{logged}");
    let n = lost[0]
        .split("audit log incomplete: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(n.is_some_and(|n| n >= 20), "{}", lost[0]);
    assert!(lost[0].contains("dropped"), "{}", lost[0]);
}

/// `serve` rotates the assertion key on SIGHUP: the JWKS publishes the new key beside the
/// old one and new assertions carry the new `kid`; a key file that is not a P-256 key is
/// refused by name, the new key signing on; the log names the kids and never a key.
#[tokio::test]
async fn serve_rotates_the_assertion_key_on_sighup_and_refuses_a_bad_one_by_name() {
    let w = World::start().await;
    let key = w.dir.path().join("assertion.pem");
    let (pem_a, pem_b) = (p256_pem(), p256_pem());
    let rsa = portcullis::dev::signer::DevSigner::generate_rs256("rsa")
        .unwrap_or_else(|e| panic!("{e}"))
        .pkcs8_der();
    let pem_rsa = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(rsa);
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
    };
    write(&key, &pem_a);
    let port = free_port();
    let cfg = std::fs::read_to_string(w.config_path())
        .unwrap_or_default()
        .replace("https = \"127.0.0.1:0\"", &format!("https = \"127.0.0.1:{port}\""))
        .replace(
            "[server]",
            &format!("[assertion]\nkey = {:?}\n\n[server]", key.to_string_lossy()),
        );
    let path = w.dir.path().join("served.toml");
    write(&path, &cfg);
    let child = Command::new(BIN)
        .args(["serve", "-c", &path.to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = Killed(child);
    let lines = stderr_lines(&mut child.0);
    let mut stderr = Vec::new();
    let c = client(&w.pki, false);
    let get = |path: &str, token: Option<String>| {
        let (c, url) = (c.clone(), format!("https://localhost:{port}{path}"));
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let h: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
            send_with(&c, Method::GET, &url, &h, Bytes::new()).await
        }
    };
    let jwks = || async { get("/.well-known/portcullis/jwks.json", None).await.json() };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = w.token("corp", &[]);
    let signed = || async {
        let r = get("/h", Some(token.clone())).await;
        let jwt = r.upstream_header("x-portcullis-assertion").unwrap_or_default();
        verified_kid(&jwt, &jwks().await)
    };
    // Served once the issuer's keys are loaded.
    let mut a = None;
    for _ in 0..100 {
        a = signed().await;
        if a.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = a.unwrap_or_else(|| panic!("no verifiable assertion with key A"));
    assert_eq!(jwks_kids(&jwks().await), [a.as_str()]);

    let pid = child.0.id().to_string();
    replace(&key, &pem_b);
    let _ = Command::new("kill").args(["-HUP", &pid]).status();
    let mut kids = vec![];
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        kids = jwks_kids(&jwks().await);
        if kids.len() == 2 {
            break;
        }
    }
    assert_eq!(kids.get(1), Some(&a), "the old key stays published: {kids:?}");
    let b = kids[0].clone();
    assert_eq!(signed().await, Some(b.clone()), "new assertions are signed with the new key");

    replace(&key, &pem_rsa);
    let _ = Command::new("kill").args(["-HUP", &pid]).status();
    wait_for_line(&lines, &mut stderr, "reload rejected", 1);
    assert_eq!(signed().await, Some(b.clone()), "the last good key signs on");
    assert_eq!(jwks_kids(&jwks().await), [b.clone(), a.clone()]);

    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.0.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The process has exited: the rest of its stderr is there to the end.
    stderr.extend(lines.iter());
    let stderr = stderr.join("\n");
    let refused = format!("{}: assertion key: not a P-256", key.display());
    assert!(stderr.contains(&refused), "the bad key file is named: {stderr}");
    assert!(
        stderr.contains("assertion key rotated") && stderr.contains(&a) && stderr.contains(&b),
        "{stderr}"
    );
    assert!(!stderr.contains("takes effect on restart"), "nothing waits for a restart: {stderr}");
    for pem in [&pem_a, &pem_b, &pem_rsa] {
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!stderr.contains(&line[..line.len().min(40)]), "key material in the log");
        }
    }
}

/// `serve` runs the policies' `[[test]]` cases once at start: `load_or_report` runs them
/// to print every failure, and `Server::start` (which serves no configuration whose
/// tests fail, whoever calls it) takes that outcome instead of running them again.
#[tokio::test]
async fn serve_runs_the_policy_tests_once_at_start() {
    let policy = format!(
        "{ALLOW_ALL_PRESETS}\n[[test]]\nname = \"feature branches are refused\"\n\
         identity = {{ issuer = \"bb\", preset = \"bitbucket-pipelines\", claims = {{ repositoryUuid = \"{{7f3c1e2a-5b4d-4c8e-9a1f-2d3e4f5a6b7c}}\", branchName = \"feature/x\" }} }}\n\
         request = \"GET /x\"\nexpect = \"deny\"\n"
    );
    let w = World::with(Setup { policies: vec![("api".into(), policy)], ..Setup::default() }).await;
    let port = free_port();
    let cfg = std::fs::read_to_string(w.config_path())
        .unwrap_or_default()
        .replace("https = \"127.0.0.1:0\"", &format!("https = \"127.0.0.1:{port}\""));
    let path = w.dir.path().join("once.toml");
    write(&path, &cfg);
    let stderr_path = w.dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).unwrap_or_else(|e| panic!("{e}"));
    let _child = Killed(
        Command::new(BIN)
            .args(["serve", "-c", &path.to_string_lossy()])
            .env("PORTCULLIS_LOG", "info,portcullis::config=debug")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let c = client(&w.pki, false);
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let url = format!("https://localhost:{port}/x");
    let mut status = None;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            let r =
                send_with(&c, Method::GET, &url, &[("authorization", auth.as_str())], Bytes::new())
                    .await;
            status = Some(r.status);
            if r.status == StatusCode::OK {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, Some(StatusCode::OK), "the proxy did not serve");
    let logged = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let runs: Vec<&str> = logged.lines().filter(|l| l.contains("policy tests run")).collect();
    assert_eq!(runs.len(), 1, "{logged}");
    assert!(runs[0].contains("cases=1") && runs[0].contains("failed=0"), "{}", runs[0]);
}

/// `serve --log-format json` (the Kubernetes example's) writes every diagnostic on
/// stderr as one JSON object per line, those that stop it from starting too: a
/// configuration error (exit 2), a failing policy test (exit 2) and a listener it
/// cannot bind (exit 1). They were written as plain text, which a log pipeline parsing
/// JSON drops or mangles exactly when the pod is crash-looping.
#[test]
fn serve_reports_why_it_cannot_start_as_json_lines_under_log_format_json() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).ok();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = busy.local_addr().map(|a| a.port()).unwrap_or_default();
    let config = |extra: &str| {
        format!(
            "[listen]\ninsecure_http = \"127.0.0.1:{port}\"\nadmin = \"off\"\n[issuers.corp]\n\
             issuer = \"https://idp.invalid\"\naudiences = [\"x\"]\n[[routes]]\nname = \"api\"\n\
             upstream = \"http://127.0.0.1:1\"\npolicy = \"api\"\n{extra}"
        )
    };
    let policy = |expect: &str| {
        format!(
            "[[rule]]\nid = \"health\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\n\
             paths = [\"/healthz\"]\n\n[[test]]\nname = \"health is open\"\nidentity = \"anonymous\"\n\
             request = \"GET /healthz\"\nexpect = \"{expect}\"\n"
        )
    };
    let cfg = p.join("portcullis.toml");
    let cases = [
        (config("audiance = 1\n"), policy("allow"), 2, "portcullis.toml:11:1: unknown field"),
        (config(""), policy("deny"), 2, "api.toml:8: test failed: health is open"),
        (config(""), policy("allow"), 1, "cannot listen on 127.0.0.1"),
    ];
    for (text, pol, code, what) in cases {
        write(&cfg, &text);
        write(&p.join("policies/api.toml"), &pol);
        let (got, _, err) = run(&["serve", "--log-format", "json", "-c", &cfg.to_string_lossy()]);
        assert_eq!(got, code, "{what}: {err}");
        let mut messages = Vec::new();
        for line in err.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {line:?}\n{err}"));
            messages.push(v["fields"]["message"].as_str().unwrap_or_default().to_string());
        }
        assert!(messages.iter().any(|m| m.contains(what)), "{what}: {err}");
    }
    drop(busy);
}

/// A second SIGTERM (or SIGINT: Ctrl-C twice) during the drain ends the grace period at
/// once, as the first SIGTERM's grace running out would: the request still in flight is
/// cut and audited (`shutting-down`, 499), the audit log flushed, and the process exits
/// 0. It was ignored, so `serve` could not be stopped short of SIGKILL (which loses
/// the queued audit events) before `shutdown_grace` (30 s by default) was over.
#[tokio::test]
async fn a_second_signal_during_the_drain_ends_the_grace_period_at_once() {
    let w = World::start().await;
    let mut served = Served::start(&w, "60s").await;
    let auth = format!("Bearer {}", w.token("bb", &[]));
    let (c, url) = (client(&w.pki, false), served.url("/slow/30000"));
    let slow = tokio::spawn(async move {
        let req = http::Request::get(url)
            .header("authorization", auth)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        c.request(req).await.map(|r| r.status())
    });
    assert!(w.echo.slow_arrived(1, Duration::from_secs(20)).await, "the request never arrived");
    let start = std::time::Instant::now();
    served.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!slow.is_finished(), "the first SIGTERM drains: the request goes on");
    served.terminate();
    let answer = tokio::time::timeout(Duration::from_secs(10), slow).await;
    assert!(matches!(answer, Ok(Ok(Err(_)))), "not cut: {answer:?}");
    let (_, code) = served.exit_after_shutdown_complete();
    let took = start.elapsed();
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(8), "the exit took {took:?} (grace 60 s)");
    let events = served.events_for("/slow/30000");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "shutting-down");
    assert_eq!(events[0]["status"], 499);
    assert!(
        served.log.iter().any(|l| l.contains("second signal")),
        "the log says why the drain ended early: {:#?}",
        served.log
    );
}

/// `dev token --ttl 0` was accepted without a word (a token whose `exp` is its `iat`);
/// it is refused before any demo state is read, saying why, as is a day and more.
#[test]
fn dev_token_refuses_a_nonsense_ttl_saying_why() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let state = dir.path().to_string_lossy().to_string();
    for (ttl, why) in [
        ("0", "expired when it is issued"),
        ("90000", "longer than a day"),
        ("15m", "not a whole number of seconds"),
    ] {
        let (code, out, err) = run(&["dev", "token", "--state-dir", &state, "--ttl", ttl]);
        assert_eq!(code, 2, "{ttl}: {out}{err}");
        assert!(out.is_empty(), "{ttl}: {out}");
        assert!(err.contains("--ttl") && err.contains(why), "{ttl}: {err}");
    }
}

/// A pipe whose reader is gone before the process starts: every write fails with EPIPE.
fn readerless_pipe() -> Stdio {
    let (tx, rx) = tokio::net::unix::pipe::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
    drop(rx);
    Stdio::from(tx.into_blocking_fd().unwrap_or_else(|e| panic!("pipe: {e}")))
}

/// `check`, `policy …` and `dev …` wrote with `println!`/`eprintln!`, which panic on a
/// pipe whose reader is gone (a CI step piped into a `head` that has exited): they exited
/// 101 instead of their documented codes. Now a line that cannot go to stderr is lost and
/// the code is the command's own; output that cannot go to stdout (the report, the
/// token) makes a success exit 1.
#[tokio::test]
async fn cli_commands_keep_their_exit_codes_when_the_reader_of_their_output_is_gone() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = root.join("examples/quickstart/portcullis.toml").to_string_lossy().to_string();
    let bad = dir.path().join("bad.toml");
    write(&bad, "[listen]\nhttps = 42\n");
    let bad = bad.to_string_lossy().to_string();
    // A demo's state without the demo: `dev token` only signs.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap_or_else(|e| panic!("{e}"));
    let signer =
        portcullis::dev::signer::DevSigner::generate_rs256("k1").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(state.join("key.der"), signer.pkcs8_der()).unwrap_or_else(|e| panic!("{e}"));
    let issuers: BTreeMap<&str, &str> =
        [("bitbucket-pipelines", "https://localhost:1/bb")].into_iter().collect();
    let demo = serde_json::json!({"issuers": issuers, "audience": "portcullis-demo",
        "kid": "k1", "key_file": "key.der", "proxy_url": "https://localhost:1",
        "ca_file": state.join("ca.pem")});
    write(&state.join("demo.json"), &demo.to_string());
    let state = state.to_string_lossy().to_string();
    let empty = dir.path().to_string_lossy().to_string();
    let certs = dir.path().join("certs").to_string_lossy().to_string();
    let (code, out, err) = run(&["dev", "token", "--state-dir", &state]);
    assert_eq!((code, out.split('.').count()), (0, 3), "the state works: {out}{err}");
    let cases: &[(&[&str], &str, i32)] = &[
        (&["check", "-c", &ok], "stdout", 1),
        (&["check", "-c", &ok, "--format", "json"], "stdout", 1),
        (&["check", "-c", &bad], "stderr", 2),
        (&["check", "-c", &bad, "--format", "json"], "stdout", 2),
        (&["policy", "test", "-c", &ok], "stdout", 1),
        (&["policy", "test", "-c", &bad], "stderr", 2),
        (&["policy", "explain", "-c", &ok, "--request", "GET /"], "stderr", 2),
        (&["dev", "token", "--state-dir", &state], "stdout", 1),
        (&["dev", "token", "--state-dir", &empty], "stderr", 2),
        (&["dev", "certs", "--out", &certs], "stdout", 1),
        // Its ready line goes unread: it says so and exits rather than serve.
        (
            &["dev", "floor", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9"],
            "stdout",
            1,
        ),
    ];
    let mut wrong = Vec::new();
    for (args, stream, expected) in cases {
        let mut cmd = Command::new(BIN);
        cmd.args(*args).stdin(Stdio::null());
        if *stream == "stdout" {
            cmd.stdout(readerless_pipe()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::piped()).stderr(readerless_pipe());
        }
        let done = cmd.output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let said = [done.stdout, done.stderr].concat();
        if done.status.code() != Some(*expected) {
            wrong.push(format!(
                "{args:?} with its {stream} unread: exit {:?}, not {expected}: {}",
                done.status.code(),
                String::from_utf8_lossy(&said).lines().next().unwrap_or_default()
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
