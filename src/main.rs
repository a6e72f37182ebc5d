//! The `portcullis` command line. The only place that uses `anyhow`; exit codes:
//! 0 success, 1 failure (or a failed test/expectation), 2 bad configuration or input.
//!
//! Nothing here writes with `println!`/`eprintln!`, which panic (exit 101) when the
//! stream is a pipe whose reader is gone (EPIPE): what a command cannot write to stdout,
//! its product (a report, a token), makes it exit 1 unless its code says worse already;
//! a line it cannot write to stderr is lost and changes nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: measured side by side with `benches/load.sh`
/// (four alternating runs, same host), CPU per request −8 % with a reused token
/// (22.2 → 20.4 µs) and −7 % with distinct tokens (67.2 → 62.5 µs); nginx 12.0 µs in both.
/// Built without transparent huge pages (`no_thp`): with them, mimalloc's segments were
/// madvised for huge pages, and on a kernel whose THP `defrag` is `madvise` (Debian's
/// default) each fault could compact memory synchronously: while a flood of distinct
/// tokens filled the caches, p99 rose from 3 to 25 ms (`load.sh` pc-distinct).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "An identity-aware reverse proxy",
    propagate_version = true
)]
struct Cli {
    /// Diagnostics format on stderr (audit events always go to their own output as JSON).
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy with a configuration file.
    ///
    /// Refuses what `check` refuses, failing policy tests too (exit 2). SIGHUP or a
    /// change to a file the configuration reads reloads it; SIGTERM drains and exits.
    Serve {
        /// The configuration file; the paths in it are relative to its directory.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and every policy it names; print every problem.
    ///
    /// Problems are printed as `file:line:col: message`, all at once. Runs the policies'
    /// [[test]] cases. Exit 0 when all is well (warnings allowed), 1 when a policy test
    /// fails, 2 on any error in the configuration or a policy.
    Check {
        /// The configuration file; the paths in it are relative to its directory.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
        /// Check the configuration and its policies only, as the `policy` commands do:
        /// do not look for the files `serve` reads (TLS certificates and keys, CA files)
        /// nor read upstream passwords (`password_file`, `password_env`). For policy CI,
        /// which has neither.
        #[arg(long)]
        policy_only: bool,
        /// Output: text for people, JSON for tools.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
    },
    /// Review policies: run their tests, explain a decision, list who can reach a
    /// route, compare access between git revisions.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Start a complete local set-up: dev issuer, echo upstream and the proxy.
    Demo(DemoArgs),
    /// Development helpers.
    #[command(subcommand)]
    Dev(DevCommand),
}

/// `portcullis policy ...`: thin wrappers around `portcullis::review`.
#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Run every [[test]] case of the policies (and of extra test files).
    Test {
        /// The configuration file; the paths in it are relative to its directory.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
        /// A directory of extra test files; `NAME.toml` tests the policy (or route) NAME.
        #[arg(long = "tests")]
        tests: Vec<PathBuf>,
        /// List passing cases too.
        #[arg(short, long)]
        verbose: bool,
        /// Output: text for people, JSON for tools.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
    },
    /// Explain the decision for one caller and one request, rule by rule.
    Explain {
        /// The configuration file; the paths in it are relative to its directory.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
        /// A JWT (decoded; verified when the issuer is reachable). Never printed.
        #[arg(long, group = "caller", env = "PORTCULLIS_EXPLAIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A JSON file of claims.
        #[arg(long, group = "caller")]
        claims: Option<PathBuf>,
        /// A `dev token` preset: bitbucket-pipelines | github-actions | gitlab-ci | human.
        #[arg(long, group = "caller")]
        preset: Option<String>,
        /// A request without any credential (no token, no session): what `public`
        /// rules admit.
        #[arg(long, group = "caller", conflicts_with_all = ["issuer", "no_verify"])]
        anonymous: bool,
        /// Override a claim of the preset: key=value (string) or key:=json (typed; key:=null
        /// removes), as `dev token --claim` does.
        #[arg(long = "claim", requires = "preset", value_name = "CLAIM")]
        claim: Vec<String>,
        /// The configured issuer name, when the token's `iss` or the preset is ambiguous.
        #[arg(long)]
        issuer: Option<String>,
        /// "METHOD https://host/path".
        #[arg(long, required_unless_present = "database", conflicts_with = "database")]
        request: Option<String>,
        /// A PostgreSQL session instead of a request: the database the client asks for.
        #[arg(long, requires = "role")]
        database: Option<String>,
        /// With --database: the role (user name) the client connects as.
        #[arg(long, requires = "database", conflicts_with = "request")]
        role: Option<String>,
        /// With --database: the [[databases]] route (optional when there is only one). An
        /// HTTP request is routed by its host and path, as the proxy routes it.
        #[arg(long, requires = "database", conflicts_with = "request")]
        route: Option<String>,
        /// Explain the token's claims without checking its signature.
        #[arg(long)]
        no_verify: bool,
        /// Exit 1 unless the decision is this.
        #[arg(long, value_parser = ["allow", "deny"])]
        expect: Option<String>,
        /// Output: text for people, JSON for tools.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
    },
    /// Who can reach a route (or the route of a request), in plain words.
    Who {
        /// The configuration file; the paths in it are relative to its directory.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
        /// A route by name: an HTTP route or a [[databases]] route.
        #[arg(long, conflicts_with = "request")]
        route: Option<String>,
        /// "METHOD https://host/path": only the rules that apply to this request.
        #[arg(long)]
        request: Option<String>,
        /// Output: text for people, JSON for tools, Markdown for a pull-request comment.
        #[arg(long, value_parser = ["text", "json", "markdown"], default_value = "text")]
        format: String,
    },
    /// Access gained and lost between two git revisions (default: merge-base with the
    /// default branch vs the working tree).
    Diff {
        /// The revision to compare from (a commit, branch or tag) [default: the merge-base
        /// with the default branch].
        from: Option<String>,
        /// The revision to compare to [default: the working tree].
        to: Option<String>,
        /// The configuration file; the paths in it are relative to its directory.
        #[arg(short, long, default_value = "portcullis.toml")]
        config: PathBuf,
        /// A directory of extra test files, read at each revision.
        #[arg(long = "tests")]
        tests: Vec<PathBuf>,
        /// Output: text for people, JSON for tools, Markdown for a pull-request comment.
        #[arg(long, value_parser = ["text", "json", "markdown"], default_value = "text")]
        format: String,
    },
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Where the proxy listens (HTTPS).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: std::net::SocketAddr,
    /// Admin listener (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: std::net::SocketAddr,
    /// Also listen on plain HTTP here (for load tests behind a TLS terminator).
    #[arg(long)]
    insecure_http: Option<std::net::SocketAddr>,
    /// Forward to this upstream instead of the built-in echo server.
    #[arg(long)]
    upstream: Option<String>,
    /// Allow binding non-loopback addresses (the demo's keys are public!).
    #[arg(long)]
    insecure_bind_any: bool,
    /// Where the demo keeps its generated config, keys and certificates (`dev token` needs
    /// the same directory; one demo at a time uses it) [default: $PORTCULLIS_DEMO_DIR, else
    /// /tmp/portcullis-demo].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also serve a PostgreSQL route to this server: postgres://user:password@host:port/db.
    /// portcullis keeps these credentials; clients log in with a token.
    #[arg(long, env = "PORTCULLIS_DEMO_POSTGRES", hide_env_values = true)]
    postgres: Option<String>,
    /// Where the PostgreSQL route listens.
    #[arg(long, default_value = "127.0.0.1:6432")]
    postgres_listen: std::net::SocketAddr,
}

#[derive(Subcommand, Debug)]
enum DevCommand {
    /// Print a token the running demo accepts.
    Token {
        /// bitbucket-pipelines | github-actions | gitlab-ci | human
        #[arg(long, default_value = "bitbucket-pipelines")]
        preset: String,
        /// Override a claim: key=value (string) or key:=json (typed; key:=null removes).
        /// Overriding a claim the provider builds `sub` from (repositoryUuid, stepUuid;
        /// repository, ref, environment; project_path, ref_type, ref) builds `sub` again,
        /// unless --claim sub=... is given too.
        #[arg(long = "claim", value_name = "CLAIM")]
        claims: Vec<String>,
        /// Lifetime in seconds, 1 to 86400.
        #[arg(long, default_value = "900", value_parser = portcullis::dev::token::parse_ttl)]
        ttl: u64,
        /// Print this many distinct tokens, one per line (load tests).
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// The running demo's state directory, as given to `demo --state-dir` (its keys and
        /// issuer URLs are read from DIR/demo.json) [default: $PORTCULLIS_DEMO_DIR, else
        /// /tmp/portcullis-demo].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// The load test's floor: the same HTTP server and pooled client with no identity,
    /// policy or audit (benches/load.sh; loopback only, plain HTTP).
    #[command(hide = true)]
    Floor {
        #[arg(long, default_value = "127.0.0.1:18200")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: String,
    },
    /// Regenerate the committed development certificates.
    Certs {
        /// Where to write the CA and the server certificate with their keys.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
    },
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    // Colour for a person at a terminal only: a file or journald would keep the escapes.
    let ansi = portcullis::util::stderr_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    // A failed write to stderr (EPIPE: the reader of the pipe is gone) loses the line and
    // nothing else: tracing's own report of the failure would go to stderr with
    // `eprintln!`, which panics there, in whichever thread was logging.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Writes `text` to stdout and flushes it; false when it could not (EPIPE).
fn out(text: &dyn std::fmt::Display) -> bool {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    write!(o, "{text}").and_then(|()| o.flush()).is_ok()
}

/// Writes `text` to stderr, ignoring a failure: the line is lost, nothing else.
use portcullis::util::stderr_text as err;

/// `code`, or 1 when it is a success but the output could not be written.
fn unless_unwritten(code: u8, written: bool) -> ExitCode {
    ExitCode::from(if code == 0 && !written { 1 } else { code })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let json = cli.log_format == "json";
    match cli.command {
        Command::Check { config, policy_only, format } => {
            let mode = if policy_only {
                portcullis::config::LoadMode::PolicyOnly
            } else {
                portcullis::config::LoadMode::Serve
            };
            check(&config, mode, &format)
        }
        Command::Serve { config } => {
            let loaded = if json {
                // One JSON object per line, as every other diagnostic of `serve`.
                portcullis::server::load_or_report_to(&config, &mut |line| {
                    tracing::error!(target: "portcullis::config", "{line}");
                })
            } else {
                portcullis::server::load_or_report(&config)
            };
            let cfg = match loaded {
                Ok(c) => c,
                Err(_) => return ExitCode::from(2),
            };
            runtime(json, || async move {
                let server = portcullis::server::Server::start(cfg, Default::default()).await?;
                server.log_serving();
                server.run_until_signalled().await
            })
        }
        Command::Policy(cmd) => policy(cmd),
        Command::Demo(a) => {
            let opts = portcullis::dev::demo::DemoOptions {
                listen: a.listen,
                admin: a.admin,
                insecure_http: a.insecure_http,
                upstream: a.upstream,
                insecure_bind_any: a.insecure_bind_any,
                state_dir: a.state_dir.unwrap_or_else(portcullis::dev::demo::default_state_dir),
                postgres: a.postgres,
                postgres_listen: a.postgres_listen,
            };
            runtime(json, || portcullis::dev::demo::run(opts))
        }
        Command::Dev(DevCommand::Token { preset, claims, ttl, count, state_dir }) => {
            let dir = state_dir.unwrap_or_else(portcullis::dev::demo::default_state_dir);
            let (state, signer) = match portcullis::dev::token::DemoState::load(&dir) {
                Ok(s) => s,
                Err(e) => {
                    portcullis::util::stderr_line(&format_args!("error: {e}"));
                    return ExitCode::from(2);
                }
            };
            let now = portcullis::util::unix_now();
            for _ in 0..count.max(1) {
                match portcullis::dev::token::mint(&state, &signer, &preset, &claims, now, ttl) {
                    Ok(t) => {
                        if !out(&format_args!("{t}\n")) {
                            return ExitCode::FAILURE;
                        }
                    }
                    Err(e) => {
                        portcullis::util::stderr_line(&format_args!("error: {e}"));
                        return ExitCode::from(2);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Dev(DevCommand::Floor { listen, upstream }) => {
            runtime(json, || async move { portcullis::dev::floor::run(listen, &upstream).await })
        }
        Command::Dev(DevCommand::Certs { out }) => match portcullis::tls::write_dev_certs(&out) {
            Ok(pki) => {
                let line = format!("wrote {} (CA {})\n", out.display(), pki.ca_path().display());
                unless_unwritten(0, self::out(&line))
            }
            Err(e) => {
                portcullis::util::stderr_line(&format_args!("error: {e}"));
                ExitCode::FAILURE
            }
        },
    }
}

/// Runs a long-running command; its error (a listener it cannot bind, …) ends it with
/// exit 1, said on stderr as `error: …`, or as a JSON log line under `--log-format json`.
fn runtime<F, Fut>(json: bool, f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    // The runtime's choice and its prompt end: `portcullis::server::process`.
    match portcullis::server::process::run(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            portcullis::util::stderr_line(&format_args!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// `check`: every problem at once, then the policies' inline `[[test]]` cases.
/// Exit 2 on configuration or policy errors, 1 when a test case fails, else 0
/// (warnings alone do not fail).
fn check(path: &std::path::Path, mode: portcullis::config::LoadMode, format: &str) -> ExitCode {
    let (errors, warnings, failures) = match portcullis::config::Config::load_with(path, mode) {
        Ok(c) => {
            let failures = c.failing_policy_tests();
            (Vec::new(), c.warnings, failures)
        }
        Err(e) => (e.0, Vec::new(), Vec::new()),
    };
    let mut written = true;
    if format == "json" {
        let item = |d: &portcullis::diag::Diagnostic, sev: &str| serde_json::json!({"file": d.file, "line": d.line, "col": d.col, "severity": sev, "message": d.message});
        let all: Vec<_> = errors
            .iter()
            .map(|d| item(d, "error"))
            .chain(warnings.iter().map(|d| item(d, "warning")))
            .collect();
        let failed: Vec<_> = failures
            .iter()
            .map(|o| {
                serde_json::json!({"file": o.file, "line": o.line, "test": o.name,
                    "failure": o.failure, "decision": o.decision})
            })
            .collect();
        let doc = serde_json::json!({"ok": errors.is_empty() && failures.is_empty(), "problems": all, "failed_tests": failed});
        written = out(&format_args!("{doc}\n"));
    } else {
        for d in &errors {
            err(&format_args!("{d}\n"));
        }
        for d in &warnings {
            // Policy lints come labelled already; say it once.
            let message = d.message.strip_prefix("warning: ").unwrap_or(&d.message);
            let labelled = format!("warning: {message}");
            err(&format_args!(
                "{}\n",
                portcullis::diag::Diagnostic { message: labelled, ..d.clone() }
            ));
        }
        for o in &failures {
            err(&format_args!("{}\n", o.failure_report()));
        }
        if !errors.is_empty() {
            err(&format_args!("{}: {} problem(s)\n", path.display(), errors.len()));
        } else if !failures.is_empty() {
            err(&format_args!("{}: {} policy test(s) failed\n", path.display(), failures.len()));
        } else {
            written =
                out(&format_args!("{}: ok ({} warning(s))\n", path.display(), warnings.len()));
        }
    }
    let code = if !errors.is_empty() {
        2
    } else if !failures.is_empty() {
        1
    } else {
        0
    };
    unless_unwritten(code, written)
}

/// `policy ...`: parse flags, call the library, print its report, exit with its code.
fn policy(cmd: PolicyCommand) -> ExitCode {
    use portcullis::review::{self, Format};
    let fmt = |f: &str| f.parse::<Format>().unwrap_or(Format::Text);
    let report = match cmd {
        PolicyCommand::Test { config, tests, verbose, format } => {
            review::test::run(&review::test::TestArgs {
                config,
                tests,
                format: fmt(&format),
                verbose,
            })
        }
        PolicyCommand::Explain {
            config,
            token,
            claims,
            preset,
            anonymous,
            claim,
            issuer,
            request,
            database,
            role,
            route,
            no_verify,
            expect,
            format,
        } => {
            use review::explain::{Caller, ExplainArgs, Target};
            let caller = match (token, claims, preset) {
                (Some(t), _, _) => Caller::Token(t),
                (_, Some(c), _) => Caller::Claims(c),
                (_, _, Some(name)) => Caller::Preset { name, overrides: claim },
                _ if anonymous => Caller::Anonymous,
                _ => {
                    portcullis::util::stderr_line(
                        &"error: give the caller as --token, --claims, --preset or --anonymous",
                    );
                    return ExitCode::from(review::EXIT_BAD_INPUT);
                }
            };
            let expect = expect.map(|e| {
                if e == "allow" {
                    portcullis::policy::Effect::Allow
                } else {
                    portcullis::policy::Effect::Deny
                }
            });
            let target = match (request, database, role) {
                (Some(line), _, _) => Target::Http(line),
                (None, Some(database), Some(role)) => Target::Database { route, database, role },
                _ => {
                    portcullis::util::stderr_line(
                        &"error: give --request, or --database with --role",
                    );
                    return ExitCode::from(review::EXIT_BAD_INPUT);
                }
            };
            review::explain::run(&ExplainArgs {
                config,
                caller,
                issuer,
                target,
                no_verify,
                expect,
                format: fmt(&format),
                verify_timeout: std::time::Duration::from_secs(5),
            })
        }
        PolicyCommand::Who { config, route, request, format } => {
            review::who::run(&review::who::WhoArgs { config, route, request, format: fmt(&format) })
        }
        PolicyCommand::Diff { from, to, config, tests, format } => {
            review::diff::run(&review::diff::DiffArgs {
                config,
                from,
                to,
                tests,
                format: fmt(&format),
            })
        }
    };
    let written = out(&report.stdout);
    err(&report.stderr);
    unless_unwritten(report.code, written)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The arguments of `cmd` and of its visible subcommands that `--help` shows with no
    /// words, as `PATH ARG`.
    fn undescribed(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if arg.get_help().is_none() && !builtin {
                out.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            undescribed(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    /// Every option and argument a user can see in `--help` says what it is.
    #[test]
    fn every_argument_in_help_is_described() {
        let mut out = Vec::new();
        undescribed(&super::Cli::command(), "portcullis", &mut out);
        assert!(out.is_empty(), "no help text: {out:?}");
    }

    /// `policy explain --request … --route NAME` asked for `--role` and `--database`, as
    /// if the request were a database session: `--route` and `--role` name a database
    /// session's route and role, and with a request the error says they do not go together.
    #[test]
    fn explain_names_a_database_route_or_role_only_for_a_database_session() {
        use clap::Parser as _;
        let explain = |extra: &[&str]| {
            let base = ["portcullis", "policy", "explain", "--preset", "human"];
            super::Cli::try_parse_from(base.iter().chain(extra)).map(|_| ())
        };
        let request = ["--request", "GET https://localhost/"];
        for (arg, value) in [("--route", "orders"), ("--role", "app")] {
            let e = explain(&[request[0], request[1], arg, value]).err();
            let kind = e.as_ref().map(clap::Error::kind);
            assert_eq!(kind, Some(clap::error::ErrorKind::ArgumentConflict), "{arg}: {e:?}");
        }
        let session = ["--database", "orders", "--role", "app", "--route", "orders"];
        assert!(explain(&session).is_ok());
        assert!(explain(&request).is_ok());
    }
}
