use super::*;

fn compile(dir: &std::path::Path, text: &str) -> Result<Config, Vec<String>> {
    std::fs::create_dir_all(dir.join("policies")).ok();
    std::fs::write(
        dir.join("policies/p.toml"),
        "[[rule]]\nid = \"h\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"sre\"]\n",
    )
    .ok();
    let src = Source::new(dir.join("portcullis.toml"), text.to_string());
    Config::compile(&src)
        .map_err(|e| e.0.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect())
}

const BASE: &str = r#"[listen]
insecure_http = "127.0.0.1:8080"

[issuers.corp]
issuer = "https://idp.example.com"
audiences = ["portcullis"]

[[routes]]
name = "api"
match = { host = "api.example.com", path_prefix = "/v1" }
upstream = "http://127.0.0.1:9000"
policy = "p"
"#;

#[test]
fn a_valid_config_compiles_with_defaults() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = compile(dir.path(), BASE).unwrap_or_else(|e| panic!("{e:?}"));
    let i = &c.issuers[0];
    assert_eq!(i.discovery_url, "https://idp.example.com/.well-known/openid-configuration");
    assert_eq!(i.algorithms, vec![Algorithm::RS256]);
    assert_eq!(i.leeway, Duration::from_secs(60));
    assert_eq!(i.kind, PrincipalKind::Human);
    let r = &c.routes[0];
    assert_eq!(r.host, HostMatch::Exact("api.example.com".into()));
    assert_eq!(r.max_request_body, 10 * 1024 * 1024);
    assert_eq!(r.timeout, Duration::from_secs(30));
    assert!(!r.forward_token);
    assert!(c.route("api.example.com", "/v1/x", &Method::GET).is_some());
    assert!(c.route("api.example.com", "/v2", &Method::GET).is_none());
    assert!(c.route("API.example.com", "/v1", &Method::GET).is_some());
    assert_eq!(c.server.idle_timeout, Duration::from_secs(75));
}

/// A route without `match` takes every host and path (each key's default), as
/// `match = {}` does.
#[test]
fn a_route_without_match_takes_every_host_and_path() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"rest\"\nupstream = \"http://127.0.0.1:9001\"\npolicy = \"p\"\n"
    );
    let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let rest = |host: &str, path: &str| c.route(host, path, &Method::POST).map(|r| &*r.name);
    assert_eq!(rest("other.example.com", "/anything"), Some("rest"));
    assert_eq!(rest("api.example.com", "/v2"), Some("rest"));
    assert_eq!(rest("api.example.com", "/v1/x"), Some("api"));
}

#[test]
fn token_cache_entries_default_zero_and_negative() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let entries = |extra: &str| {
        compile(dir.path(), &format!("{BASE}\n[server]\n{extra}\n"))
            .map(|c| c.server.token_cache_entries)
    };
    assert_eq!(entries("").ok(), Some(65_536));
    assert_eq!(entries("token_cache_entries = 0").ok(), Some(0));
    assert_eq!(entries("token_cache_entries = 1000").ok(), Some(1000));
    assert_eq!(
        entries("token_cache_entries = -1").err().unwrap_or_default(),
        ["15:23 `token_cache_entries` must be 0 (no cache) or more"]
    );
}

/// Values that parse but no deadline can be computed from: an `idle_timeout` of
/// `"18446744073709551615s"` passed `check` and then panicked on every connection
/// (`Instant` + it overflows), a `max_connections` of `i64::MAX` made `serve` panic at
/// start (more than the slot semaphore counts). Refused where they are written.
#[test]
fn durations_and_connection_limits_beyond_any_use_are_refused_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = |extra: &str| compile(dir.path(), &format!("{BASE}\n[server]\n{extra}\n"));
    for key in ["idle_timeout", "header_timeout", "send_timeout", "shutdown_grace"] {
        assert_eq!(
            server(&format!("{key} = \"18446744073709551615s\"")).err().unwrap_or_default(),
            [format!("15:{} `18446744073709551615s` is longer than 100 years", key.len() + 4)],
        );
    }
    let hundred_years = server("idle_timeout = \"100y\"").map(|c| c.server.idle_timeout);
    assert!(hundred_years.is_ok_and(|d| d > Duration::from_secs(3_000_000_000)));
    let stale = compile(
        dir.path(),
        &BASE.replace("audiences = [", "stale_window = \"101y\"\naudiences = ["),
    );
    assert_eq!(stale.err().unwrap_or_default(), ["6:16 `101y` is longer than 100 years"]);
    assert_eq!(
        server("max_connections = 9223372036854775807").err().unwrap_or_default(),
        ["15:19 `max_connections` must be at most 1000000"]
    );
    assert!(server("max_connections = 1000000").is_ok());
}

#[test]
fn max_connections_per_client_defaults_off_and_is_at_most_max_connections() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let limit = |extra: &str| {
        compile(dir.path(), &format!("{BASE}\n[server]\n{extra}\n"))
            .map(|c| c.server.max_connections_per_client)
    };
    assert_eq!(limit("").ok(), Some(0));
    assert_eq!(limit("max_connections_per_client = 0").ok(), Some(0));
    assert_eq!(limit("max_connections_per_client = 256").ok(), Some(256));
    assert_eq!(limit("max_connections = 100\nmax_connections_per_client = 100").ok(), Some(100));
    assert_eq!(
        limit("max_connections = 100\nmax_connections_per_client = 101").err().unwrap_or_default(),
        ["16:30 `max_connections_per_client` (101) must not exceed `max_connections` (100): 0 turns the limit off"]
    );
    assert_eq!(
        limit("max_connections_per_client = 20000").err().unwrap_or_default(),
        ["15:30 `max_connections_per_client` (20000) must not exceed `max_connections` (10000): 0 turns the limit off"]
    );
    assert_eq!(
        limit("max_connections_per_client = -1").err().unwrap_or_default(),
        ["15:30 `max_connections_per_client` must be 0 (no limit) or more"]
    );
    // A wrong max_connections is one problem, not two.
    assert_eq!(
        limit("max_connections = 0\nmax_connections_per_client = 5").err().unwrap_or_default(),
        ["15:19 `max_connections` must be at least 1"]
    );
}

#[test]
fn a_misspelt_issuer_key_is_one_problem_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The policy names `corp` twice: a broken [issuers.corp] is still declared, so it
    // adds no "issuer not declared" error per mention.
    std::fs::create_dir_all(dir.path().join("policies")).ok();
    let text = BASE.replace("audiences = [", "audiance = [");
    let errors = compile(dir.path(), &text).err().unwrap_or_default();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "6:1 unknown field `audiance` (did you mean `audiences`?), expected one of"
        ),
        "{errors:?}"
    );
}

#[test]
fn audit_on_failure_defaults_to_serve_and_is_serve_or_reject() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mode = |extra: &str| {
        compile(dir.path(), &format!("{BASE}\n[audit]\n{extra}\n")).map(|c| c.audit_on_failure)
    };
    assert_eq!(mode("").ok(), Some(AuditOnFailure::Serve));
    assert_eq!(mode("on_failure = \"serve\"").ok(), Some(AuditOnFailure::Serve));
    assert_eq!(mode("on_failure = \"reject\"").ok(), Some(AuditOnFailure::Reject));
    assert_eq!(
        mode("on_failure = \"block\"").err().unwrap_or_default(),
        ["15:14 unknown on_failure `block`, expected serve or reject"]
    );
}

#[test]
fn max_header_size_defaults_to_64kib_within_8kib_and_1mib() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let size = |extra: &str| {
        compile(dir.path(), &format!("{BASE}\n[server]\n{extra}\n"))
            .map(|c| c.server.max_header_size)
    };
    assert_eq!(size("").ok(), Some(64 * 1024));
    assert_eq!(size("max_header_size = \"16KiB\"").ok(), Some(16 * 1024));
    assert_eq!(size("max_header_size = 32768").ok(), Some(32 * 1024));
    assert_eq!(
        size("max_header_size = \"4KiB\"").err().unwrap_or_default(),
        ["15:19 `max_header_size` must be between 8KiB and 1MiB"]
    );
    assert_eq!(
        size("max_header_size = \"2MiB\"").err().unwrap_or_default(),
        ["15:19 `max_header_size` must be between 8KiB and 1MiB"]
    );
    assert_eq!(
        size("max_header_size = true").err().unwrap_or_default(),
        ["15:19 `max_header_size` is bytes (integer) or a size like \"64KiB\""]
    );
}

#[test]
fn header_timeout_defaults_to_75s_and_is_at_least_a_second() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let timeout = |extra: &str| {
        compile(dir.path(), &format!("{BASE}\n[server]\n{extra}\n"))
            .map(|c| c.server.header_timeout)
    };
    assert_eq!(timeout("").ok(), Some(Duration::from_secs(75)));
    assert_eq!(timeout("header_timeout = \"10s\"").ok(), Some(Duration::from_secs(10)));
    assert_eq!(
        timeout("header_timeout = \"0s\"").err().unwrap_or_default(),
        ["15:18 `header_timeout` must be at least 1s"]
    );
}

#[test]
fn send_timeout_defaults_to_60s_and_is_at_least_a_second() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let timeout = |extra: &str| {
        compile(dir.path(), &format!("{BASE}\n[server]\n{extra}\n")).map(|c| c.server.send_timeout)
    };
    assert_eq!(timeout("").ok(), Some(Duration::from_secs(60)));
    assert_eq!(timeout("send_timeout = \"10s\"").ok(), Some(Duration::from_secs(10)));
    assert_eq!(
        timeout("send_timeout = \"500ms\"").err().unwrap_or_default(),
        ["15:16 `send_timeout` must be at least 1s"]
    );
}

#[test]
fn idle_timeout_is_at_least_a_second() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = compile(dir.path(), &format!("{BASE}\n[server]\nidle_timeout = \"5m\"\n"));
    assert_eq!(c.map(|c| c.server.idle_timeout).ok(), Some(Duration::from_secs(300)));
    for bad in ["0s", "500ms"] {
        let text = format!("{BASE}\n[server]\nidle_timeout = \"{bad}\"\n");
        let e = compile(dir.path(), &text).err().unwrap_or_default();
        assert_eq!(e, ["15:16 `idle_timeout` must be at least 1s"], "{bad}");
    }
}

#[test]
fn every_problem_is_reported_at_once_with_its_position() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = r#"[listen]
insecure_http = "not-an-address"
trusted_proxies = ["10.0.0.0/33"]

[issuers.corp]
issuer = "http://idp.example.com"
audiences = []
algorithms = ["none", "HS256", "rs256"]
leeway = "forever"

[issuers.gh]
preset = "github-action"
issuer = "https://token.actions.githubusercontent.com"
audiences = ["x"]

[[routes]]
name = "api"
match = { host = "a*b", path_prefix = "v1", methods = ["get"] }
upstream = "ftp://x"
policy = "missing"
max_request_body = "lots"

[[routes]]
name = "api"
match = {}
upstream = "http://127.0.0.1:1"
policy = "p"
timout = "1s"

[extra]
"#;
    let errs = compile(dir.path(), text).err().unwrap_or_default();
    let want = [
        "2:17 ",  // bad address
        "3:20 ",  // bad CIDR
        "6:10 ",  // http issuer
        "7:13 ",  // empty audiences
        "8:15 ",  // none
        "8:23 ",  // HS256
        "8:32 ",  // case-sensitive alg
        "9:10 ",  // bad duration
        "12:10 ", // unknown preset
        "18:18 ", // bad wildcard host
        "18:39 ", // path prefix without /
        "18:56 ", // lower-case method
        "19:12 ", // bad scheme
        "20:10 ", // missing policy
        "21:20 ", // bad size
        "28:1 ",  // unknown key `timout`
        "30:2 ",  // unknown top-level table
    ];
    for w in want {
        assert!(errs.iter().any(|e| e.starts_with(w)), "missing {w:?} in {errs:#?}");
    }
}

#[test]
fn a_refresh_cooldown_under_a_second_is_refused_where_it_is_written() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (cooldown, ok) in [("0s", false), ("999ms", false), ("1s", true), ("5m", true)] {
        let text = BASE.replace(
            "audiences = [\"portcullis\"]",
            &format!("audiences = [\"portcullis\"]\nrefresh_cooldown = \"{cooldown}\""),
        );
        match compile(dir.path(), &text) {
            Ok(c) => {
                assert!(ok, "{cooldown} accepted");
                assert_eq!(
                    c.issuers[0].refresh_cooldown,
                    humantime::parse_duration(cooldown).unwrap_or_else(|e| panic!("{e}"))
                );
            }
            Err(errs) => {
                assert!(!ok, "{cooldown} refused: {errs:?}");
                assert!(
                    errs.iter().any(|e| e.starts_with("7:20 ") && e.contains("at least 1s")),
                    "{errs:?}"
                );
            }
        }
    }
}

#[test]
fn bitbucket_workspace_ari_alone_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = BASE.replace(
        "[[routes]]",
        "[issuers.bb]\npreset = \"bitbucket-pipelines\"\nissuer = \"https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc\"\naudiences = [\"ari:cloud:bitbucket::workspace/7baee083\"]\n\n[[routes]]",
    );
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert!(errs.iter().any(|e| e.contains("V23")), "{errs:?}");
}

/// Round 11E: a route host no request's host can equal (a trailing dot, which requests
/// lose before routing; an empty label, a space, non-ASCII) is a load error, not a dead
/// route whose requests fall through to a broader route and its policy.
#[test]
fn a_route_host_no_request_can_have_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (host, ok) in [
        ("admin.example.com.", false),
        ("*.example.com.", false),
        ("admin..example.com", false),
        (".example.com", false),
        ("ad min.example.com", false),
        ("bücher.example", false),
        ("", false),
        ("Admin.Example.com", true),
        ("xn--bcher-kva.example", true),
        ("127.0.0.1", true),
        ("*.example.com", true),
        ("internal_api.local", true),
    ] {
        let text = BASE.replace("host = \"api.example.com\"", &format!("host = {host:?}"));
        match compile(dir.path(), &text) {
            Ok(_) => assert!(ok, "{host:?} accepted"),
            Err(errs) => {
                assert!(!ok, "{host:?} refused: {errs:?}");
                assert!(errs.iter().any(|e| e.starts_with("10:18 ")), "{host:?}: {errs:?}");
            }
        }
    }
}

#[test]
fn routes_sort_most_specific_first() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"any\"\nmatch = {{}}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n\n[[routes]]\nname = \"wild\"\nmatch = {{ host = \"*.example.com\" }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n\n[[routes]]\nname = \"deep\"\nmatch = {{ host = \"api.example.com\", path_prefix = \"/v1/admin\" }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n"
    );
    let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let pick = |h: &str, p: &str| c.route(h, p, &Method::GET).map(|r| r.name.to_string());
    assert_eq!(pick("api.example.com", "/v1/admin/x").as_deref(), Some("deep"));
    assert_eq!(pick("api.example.com", "/v1/x").as_deref(), Some("api"));
    assert_eq!(pick("web.example.com", "/v1/x").as_deref(), Some("wild"));
    assert_eq!(
        pick("example.com", "/").as_deref(),
        Some("any"),
        "a wildcard needs a label before the suffix"
    );
    assert_eq!(pick("other.test", "/").as_deref(), Some("any"));
}

/// A route that an earlier one takes every request of is reported where it is named,
/// as a warning: same host (case aside) and path prefix (`/v1` and `/v1/` alike), and
/// all of its methods. A route that only shares some requests is not.
#[test]
fn a_route_an_earlier_route_takes_every_request_of_is_a_warning() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let route = |name: &str, matcher: &str| {
        format!("\n[[routes]]\nname = \"{name}\"\nmatch = {{ {matcher} }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n")
    };
    let text = [
        BASE.to_string(),
        route("api-again", "host = \"API.example.com\", path_prefix = \"/v1/\""),
        route(
            "api-gets",
            "host = \"api.example.com\", path_prefix = \"/v1\", methods = [\"GET\", \"POST\"]",
        ),
        route("web", "host = \"web.example.com\", path_prefix = \"/v1\""),
        route("deeper", "host = \"api.example.com\", path_prefix = \"/v1/admin\""),
        route("reads", "host = \"x.example.com\", methods = [\"GET\"]"),
        route("heads", "host = \"x.example.com\", path_prefix = \"/\", methods = [\"HEAD\"]"),
        route("rest", "host = \"x.example.com\""),
        route("posts", "host = \"x.example.com\", methods = [\"POST\"]"),
    ]
    .concat();
    let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let w: Vec<String> =
        c.warnings.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect();
    let at = |name: &str| {
        let line = text.lines().position(|l| l == format!("name = \"{name}\"")).unwrap_or(0);
        format!("{}:8 route `{name}` is never reached: ", line + 1)
    };
    let shadowed: Vec<&str> = ["api-again", "api-gets", "heads", "posts"].to_vec();
    assert_eq!(w.len(), shadowed.len(), "{w:#?}");
    for (w, name) in w.iter().zip(&shadowed) {
        assert!(w.starts_with(&at(name)), "{name}: {w}");
    }
    assert!(w[0].contains("route `api` (line 9) is tried first"), "{}", w[0]);
    assert!(w[2].contains("route `reads` (line "), "GET takes HEAD: {}", w[2]);
    assert!(w[2].contains("same host and path_prefix and methods"), "{}", w[2]);
    assert!(w[3].contains("route `rest` (line "), "{}", w[3]);
}

/// A route for `GET` takes `HEAD` too (the upstream runs its `GET` handler), so a
/// `HEAD` cannot fall through to a broader route and its policy; `HEAD` does not take
/// `GET`.
#[test]
fn a_get_route_takes_head_requests() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"any\"\nmatch = {{}}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n\n[[routes]]\nname = \"reads\"\nmatch = {{ host = \"api.example.com\", path_prefix = \"/secret\", methods = [\"GET\"] }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n\n[[routes]]\nname = \"probes\"\nmatch = {{ host = \"api.example.com\", path_prefix = \"/probe\", methods = [\"HEAD\"] }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n"
    );
    let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let pick = |m: Method, p: &str| c.route("api.example.com", p, &m).map(|r| r.name.to_string());
    assert_eq!(pick(Method::GET, "/secret/x").as_deref(), Some("reads"));
    assert_eq!(pick(Method::HEAD, "/secret/x").as_deref(), Some("reads"));
    assert_eq!(pick(Method::POST, "/secret/x").as_deref(), Some("any"), "near miss");
    assert_eq!(pick(Method::HEAD, "/probe/x").as_deref(), Some("probes"));
    assert_eq!(pick(Method::GET, "/probe/x").as_deref(), Some("any"), "HEAD does not take GET");
}

#[test]
fn path_prefixes_are_written_as_requests_are_matched() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let with_prefix = |prefix: &str| {
        format!(
            "{BASE}\n[[routes]]\nname = \"me\"\nmatch = {{ host = \"api.example.com\", path_prefix = {prefix:?} }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n"
        )
    };
    // Escapes requests have decoded, lower-case hex, a raw `+`: never matched, so the
    // requests would go to the broader route. Each says how to write it.
    for (prefix, write) in [
        ("/v1/users/%40me", "/v1/users/@me"),
        ("/v1/keys/k1%3arevoke", "/v1/keys/k1:revoke"),
        ("/v1/caf%c3%a9", "/v1/caf%C3%A9"),
        ("/v1/c++", "/v1/c%2B%2B"),
        ("/v1//x", "/v1/x"),
    ] {
        let errs = compile(dir.path(), &with_prefix(prefix)).err().unwrap_or_default();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("16:51 ") && e.ends_with(&format!("write `{write}`"))),
            "{prefix}: {errs:#?}"
        );
    }
    for prefix in ["/v1/a/../b", "/v1/a%2Fb", "/v1/a;b", "/v1/a*", "/v1/a%2A"] {
        let errs = compile(dir.path(), &with_prefix(prefix)).err().unwrap_or_default();
        assert!(errs.iter().any(|e| e.starts_with("16:51 ")), "{prefix}: {errs:#?}");
    }
    // The canonical spelling loads, and takes the request however it was encoded.
    let c = compile(dir.path(), &with_prefix("/v1/users/@me")).unwrap_or_else(|e| panic!("{e:?}"));
    for raw in ["/v1/users/@me/tokens", "/v1/users/%40me/tokens", "/v1/users/%40me"] {
        let path = crate::http::path::normalize(raw).unwrap_or_else(|e| panic!("{raw}: {e:?}"));
        let route = c.route("api.example.com", &path, &Method::GET).map(|r| r.name.to_string());
        assert_eq!(route.as_deref(), Some("me"), "{raw}");
    }
    let path = crate::http::path::normalize("/v1/users/me").unwrap_or_else(|e| panic!("{e:?}"));
    let route = c.route("api.example.com", &path, &Method::GET).map(|r| r.name.to_string());
    assert_eq!(route.as_deref(), Some("api"));
    for prefix in ["/v1/caf%C3%A9", "/v1/c%2B%2B", "/v1/keys/k1:revoke"] {
        assert!(compile(dir.path(), &with_prefix(prefix)).is_ok(), "{prefix}");
    }
}

#[test]
fn helpers() {
    assert!(path_has_prefix("/api", "/api"));
    assert!(path_has_prefix("/api/x", "/api/"));
    assert!(!path_has_prefix("/apix", "/api"));
    assert!(path_has_prefix("/anything", "/"));
    let n = IpNet::parse("10.0.0.0/8").unwrap_or_else(|| panic!("cidr"));
    assert!(n.contains("10.1.2.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
    assert!(!n.contains("11.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
    assert!(
        n.contains("::ffff:10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
        "v4-mapped"
    );
    assert_eq!(IpNet::parse("::1").map(|n| n.prefix), Some(128));
    assert!(IpNet::parse("1.2.3.4/40").is_none());
    assert_eq!(parse_size(&toml::Value::String("10MiB".into())), Some(10 << 20));
    assert_eq!(parse_size(&toml::Value::Integer(5)), Some(5));
    assert_eq!(parse_size(&toml::Value::Integer(-5)), None);
    assert_eq!(parse_size(&toml::Value::String("5 parsecs".into())), None);
    assert!(
        is_loopback_host("127.0.0.1") && is_loopback_host("[::1]") && is_loopback_host("localhost")
    );
    assert!(!is_loopback_host("example.com"));
}

#[test]
fn the_admin_listener_defaults_to_loopback_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = compile(dir.path(), BASE).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.listen.admin, Some(SocketAddr::from(([127, 0, 0, 1], 9090))));
    let off = BASE.replace("[listen]\n", "[listen]\nadmin = \"off\"\n");
    let c = compile(dir.path(), &off).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.listen.admin, None);
}

/// A secret pasted into `*_env` instead of a variable's name must not be quoted back:
/// diagnostics reach the log and, for a refused reload, the audit trail.
#[test]
fn a_secret_pasted_into_an_env_key_is_never_quoted_in_a_diagnostic() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (pasted, shown) in [
        ("GOCSPX-Zk8s~secret.Value", false), // not a variable name at all
        ("hunter2sEcretPassword", false),    // could be a name, but does not read like one
        ("PORTCULLIS_TEST_UNSET_VAR", true), // reads like one: named
    ] {
        let text = BASE.replace(
            "audiences = [\"portcullis\"]\n",
            &format!("audiences = [\"portcullis\"]\nlogin = {{ client_id = \"portcullis\", client_secret_env = \"{pasted}\" }}\n"),
        ) + "issuers = [\"corp\"]\n\n[session]\nkeys_file = \"keys\"\n";
        let loaded = compile(dir.path(), &text);
        let all = match &loaded {
            Err(errs) => errs.join("\n"),
            // Read at start: a variable that is not set is an error there.
            Ok(c) => c.logins[0].client_secret.read().err().unwrap_or_default(),
        };
        assert!(!all.is_empty(), "{pasted}: no diagnostic");
        assert_eq!(all.contains(pasted), shown, "{pasted}: {all}");
    }
    // The same for a secret pasted into `*_file`: a path is shown unless its file name
    // reads like a secret.
    for (pasted, shown) in [
        ("9f86d081884c7d659a2feaa0c55ad015Zq", false),
        ("Q8a8Q~abcDEFghiJKLmnoPQRstuVWXyz0123.4", false), // Entra
        ("dGhpcyBpcyBh/c2VjcmV0IGtleSBtYXRlcmlhbA==", false), // base64, a `/` in it
        ("okta-secret.txt", true),
        ("secrets/session-keys-2026.txt", true),
    ] {
        let text = BASE.replace(
            "audiences = [\"portcullis\"]\n",
            &format!("audiences = [\"portcullis\"]\nlogin = {{ client_id = \"portcullis\", client_secret_file = \"{pasted}\" }}\n"),
        ) + "issuers = [\"corp\"]\n\n[session]\nkeys_file = \"keys\"\n";
        let all = match compile(dir.path(), &text) {
            Err(errs) => errs.join("\n"),
            Ok(c) => c.logins[0].client_secret.read().err().unwrap_or_default(),
        };
        assert!(!all.is_empty(), "{pasted}: no diagnostic");
        assert_eq!(all.contains(pasted), shown, "{pasted}: {all}");
    }
}

#[test]
fn login_and_session_compile_with_defaults() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = BASE.replace(
        "audiences = [\"portcullis\"]\n",
        "audiences = [\"portcullis\"]\nlogin = { client_id = \"portcullis\", client_secret_env = \"PATH\", scopes = [\"openid\", \"email\", \"groups\"] }\n",
    ) + "issuers = [\"corp\"]\n\n[session]\nkeys_file = \"keys\"\ncookie_domain = \".example.com\"\n";
    let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let s = c.session.as_ref().unwrap_or_else(|| panic!("session"));
    assert_eq!(s.cookie_name, "_portcullis");
    assert_eq!(s.cookie_domain.as_deref(), Some("example.com"));
    assert_eq!(s.absolute_lifetime, Duration::from_secs(12 * 3600));
    assert_eq!(s.idle_lifetime, Duration::from_secs(3600));
    assert_eq!(s.keys, SecretSource::File(dir.path().join("keys")));
    let l = &c.logins[0];
    assert_eq!(l.redirect_path, DEFAULT_REDIRECT_PATH);
    assert_eq!(l.client_secret, SecretSource::Env("PATH".into()));
    assert_eq!(c.routes[0].issuers.as_ref().map(Vec::len), Some(1));
    assert_eq!(c.login_issuers(&c.routes[0]).len(), 1);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    // A head limit too small for the largest session cookie: a warning at its key.
    let small = text.replace("[session]", "[server]\nmax_header_size = \"16KiB\"\n\n[session]");
    let c = compile(dir.path(), &small).unwrap_or_else(|e| panic!("{e:?}"));
    let w: Vec<String> =
        c.warnings.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("17:19 session cookies can take 30 KB"), "{w:?}");
}

#[test]
fn login_and_session_mistakes_are_reported_with_positions() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = BASE.replace(
        "audiences = [\"portcullis\"]\n",
        "audiences = [\"portcullis\"]\nlogin = { client_id = \"p\", client_secret = \"hunter2\", scopes = [\"email\"], redirect_path = \"/cb\", extra_params = { max_age = \"5m\", response_mode = \"form_post\", acr_values = \"  \" } }\n",
    ) + "issuers = [\"nobody\"]\n";
    let e = compile(dir.path(), &text).err().unwrap_or_default();
    let all = e.join("\n");
    assert!(all.contains("never go into the config file"), "{all}");
    assert!(all.contains("missing `client_secret_env` or `client_secret_file`"), "{all}");
    assert!(all.contains("must include \"openid\""), "{all}");
    assert!(all.contains("`redirect_path`"), "{all}");
    assert!(all.contains("`max_age` is a number of seconds"), "{all}");
    assert!(all.contains("`response_mode` can only be \"query\""), "{all}");
    assert!(all.contains("`acr_values` lists the authentication context classes"), "{all}");
    assert!(all.contains("issuer `nobody` is not declared"), "{all}");
    assert!(all.contains("needs a [session] section"), "{all}");
    assert!(!all.contains("hunter2"), "the secret is not echoed");
    assert!(e.iter().all(|d| !d.starts_with("0:")), "positions: {all}");

    let text = BASE.to_string()
        + "\n[session]\ncookie_name = \"session\"\nkeys_env = \"K\"\nkeys_file = \"f\"\nidle_lifetime = \"2h\"\nabsolute_lifetime = \"1h\"\n";
    let all = compile(dir.path(), &text).err().unwrap_or_default().join("\n");
    assert!(all.contains("starts with `_portcullis`"), "{all}");
    assert!(all.contains("not both"), "{all}");
    // The prefix is the proxy's to add: a configured one is refused, not doubled.
    let prefixed = text.replace("\"session\"", "\"__Host-_portcullis\"");
    let all = compile(dir.path(), &prefixed).err().unwrap_or_default().join("\n");
    assert!(all.contains("adds the `__Host-` / `__Secure-` prefix itself"), "{all}");
    assert!(all.contains("longer than `absolute_lifetime`"), "{all}");
}

#[test]
fn upstream_credentials_are_refused_and_never_quoted_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("pw"), "x\n").ok();
    let text = BASE.replace("http://127.0.0.1:9000", "http://user:S3cretHttp@127.0.0.1:9000")
        + "\n[[databases]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\n\
           upstream = \"postgres://127.0.0.1:5432/app?user=app&password=S3cretPg\"\n\
           upstream_user = \"app\"\npassword_file = \"pw\"\npolicy = \"p\"\n\
           [[databases]]\nname = \"db2\"\nlisten = \"127.0.0.1:0\"\n\
           upstream = \"mysql://S3cretScheme@h\"\nupstream_user = \"app\"\n\
           password_file = \"pw\"\npolicy = \"p\"\n";
    let errs = match compile(dir.path(), &text) {
        Ok(_) => panic!("credentials in an upstream URL must be refused"),
        Err(e) => e,
    };
    assert!(errs.iter().any(|e| e.contains("must not carry credentials")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("no path or query")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("expected postgres://")), "{errs:?}");
    assert!(!errs.iter().any(|e| e.contains("S3cret")), "a secret quoted back: {errs:?}");
    // A `/` or `#` in the password ends the parsed authority early: still refused.
    for url in ["http://admin:s3cr3t/x@127.0.0.1:9000", "http://admin:s3cr3t#@127.0.0.1:9000"] {
        let errs = compile(dir.path(), &BASE.replace("http://127.0.0.1:9000", url))
            .err()
            .unwrap_or_default();
        assert!(errs.iter().any(|e| e.contains("must not carry credentials")), "{url}: {errs:?}");
        assert!(!errs.iter().any(|e| e.contains("s3cr3t")), "{errs:?}");
    }
}

#[test]
fn issuer_names_are_plain_like_route_names() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = BASE.replace("[issuers.corp]", "[issuers.\"co\\\"r\\np\"]");
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert!(
        errs.iter().any(|e| e.starts_with("4:") && e.contains("issuer names use letters")),
        "{errs:?}"
    );
    let another = "\n[issuers.\"corp-1.eu_west\"]\nissuer = \"https://idp2.example.com\"\n\
                   audiences = [\"portcullis\"]\n";
    let ok = compile(dir.path(), &BASE.replace("[[routes]]", &format!("{another}\n[[routes]]")));
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[test]
fn a_password_file_that_is_a_fifo_or_a_device_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let db = |name: &str, file: &str| {
        format!(
            "\n[[databases]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"postgres://127.0.0.1:5432\"\nupstream_user = \"app\"\n\
             password_file = \"{file}\"\npolicy = \"p\"\n"
        )
    };
    let text = format!("{BASE}{}{}", db("a", "fifo"), db("b", "/dev/zero"));
    // A FIFO with no writer would block a read forever: this returns at once.
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert_eq!(errs.iter().filter(|e| e.contains("not a regular file")).count(), 2, "{errs:?}");
}

#[test]
fn issuer_urls_with_credentials_are_refused_and_never_quoted_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = BASE.replace(
        "audiences = [\"portcullis\"]",
        "audiences = [\"portcullis\"]\ndiscovery_url = \"https://svc:hunter2SECRET@idp.example.com/.well-known/openid-configuration\"",
    );
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert!(errs.iter().any(|e| e.contains("must not carry credentials")), "{errs:?}");
    assert!(!errs.iter().any(|e| e.contains("hunter2")), "{errs:?}");
    let text = BASE.replace("https://idp.example.com", "https://u:hunter2/@idp.example.com");
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert!(errs.iter().any(|e| e.contains("must not carry credentials")), "{errs:?}");
    let text = BASE.replace("https://idp.example.com", "ftp://u:hunter2@idp.example.com");
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert!(errs.len() >= 2 && !errs.iter().any(|e| e.contains("hunter2")), "{errs:?}");
}

/// F6: the watcher reloads when any file the configuration names changes: certificates
/// and keys, CAs, the assertion key, the session keys and client-secret files.
#[test]
fn every_file_the_configuration_names_is_watched() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("client-secret"), "x").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("keys"), "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
        .unwrap_or_else(|e| panic!("{e}"));
    // The CAs and the assertion key must be usable ones: a serving load reads them.
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let ca = rcgen::CertificateParams::new(vec!["ca.example.com".to_string()])
        .and_then(|p| p.self_signed(&key))
        .unwrap_or_else(|e| panic!("{e}"));
    for f in ["idp-ca.pem", "upstream-ca.pem"] {
        std::fs::write(dir.path().join(f), ca.pem()).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(dir.path().join("assertion.pem"), key.serialize_pem())
        .unwrap_or_else(|e| panic!("{e}"));
    let text = BASE
        .replace(
            "audiences = [\"portcullis\"]\n",
            "audiences = [\"portcullis\"]\nca = \"idp-ca.pem\"\nlogin = { client_id = \"portcullis\", client_secret_file = \"client-secret\" }\n",
        )
        .replace(
            "upstream = \"http://127.0.0.1:9000\"",
            "upstream = \"https://127.0.0.1:9000\"\nupstream_ca = \"upstream-ca.pem\"",
        )
        + "\n[session]\nkeys_file = \"keys\"\n\n[assertion]\nkey = \"assertion.pem\"\n";
    let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let files: Vec<String> = c
        .files
        .iter()
        .filter_map(|f| f.strip_prefix(dir.path()).ok())
        .map(|f| f.display().to_string())
        .collect();
    for f in [
        "portcullis.toml",
        "policies/p.toml",
        "idp-ca.pem",
        "upstream-ca.pem",
        "assertion.pem",
        "client-secret",
        "keys",
    ] {
        assert_eq!(files.iter().filter(|w| *w == f).count(), 1, "{f} not watched once: {files:?}");
    }
    // What the load read of the configuration and the policy, for the watcher.
    let read = c.read_digests();
    assert_eq!(
        read.get(&dir.path().join("portcullis.toml")),
        Some(&crate::util::sha256(text.as_bytes()))
    );
    assert!(read.contains_key(&dir.path().join("policies/p.toml")), "{read:?}");
}

/// Round 10: a load that fails still says which files it read or tried to read — a
/// policy that does not parse, one that does not exist yet, an unreadable CA — so the
/// watcher reloads when one of them is fixed or written.
#[test]
fn a_failed_load_names_the_files_it_tried_to_read() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let broken =
        "[[rule]]\nid = \"h\"\neffect = \"allow\"\nissuer = \"corp\"\ngroupz = [\"sre\"]\n";
    std::fs::create_dir_all(dir.path().join("policies")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("policies/broken.toml"), broken)
        .unwrap_or_else(|e| panic!("{e}"));
    let route = |name: &str, policy: &str| {
        format!("\n[[routes]]\nname = \"{name}\"\nmatch = {{ path_prefix = \"/{name}\" }}\nupstream = \"http://127.0.0.1:9000\"\npolicy = \"{policy}\"\n")
    };
    let text = BASE.replace(
        "audiences = [\"portcullis\"]\n",
        "audiences = [\"portcullis\"]\nca = \"missing-ca.pem\"\n",
    ) + &route("b", "broken")
        + &route("l", "later");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let attempt = Config::attempt(&path);
    assert!(attempt.result.is_err(), "it should not load");
    for f in [
        "portcullis.toml",
        "policies/p.toml",
        "policies/broken.toml",
        "policies/later.toml",
        "missing-ca.pem",
    ] {
        assert!(attempt.files.contains(&dir.path().join(f)), "{f} not named: {:?}", attempt.files);
    }
    // A configuration that is not even TOML names itself.
    std::fs::write(&path, "[[routes]\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(Config::attempt(&path).files, [path]);
}

#[test]
fn database_startup_parameters_are_setting_names_and_never_the_role_or_options() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("pw"), "x\n").ok();
    let text = format!(
        "{BASE}\n[[databases]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"postgres://127.0.0.1:5432\"\nupstream_user = \"app\"\n\
         password_file = \"pw\"\npolicy = \"p\"\n\
         startup_parameters = [\"search_path\", \"Role\", \"options\",\n  \
         \"-c x=y\", \"SEARCH_PATH\", \"session_authorization\", \"app.tenant_id\"]\n"
    );
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    let at = |pos: &str, what: &str| {
        assert!(
            errs.iter().any(|e| e.starts_with(pos) && e.contains(what)),
            "{pos} {what}: {errs:?}"
        );
    };
    at("21:38 ", "`Role` can never be forwarded");
    at("21:46 ", "`options` can never be forwarded");
    at("22:3 ", "not a PostgreSQL setting name");
    at("22:13 ", "`SEARCH_PATH` listed twice");
    at("22:28 ", "`session_authorization` can never be forwarded");
    assert!(!errs.iter().any(|e| e.contains("search_path`") || e.contains("tenant")), "{errs:?}");
}

/// Policy CI has neither the certificates nor the secrets `serve` reads: a
/// [`LoadMode::PolicyOnly`] load opens none of them and still reports everything else.
#[test]
fn a_policy_only_load_reads_no_server_file_or_secret_and_reports_everything_else() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    compile(d, BASE).unwrap_or_else(|e| panic!("{e:?}"));
    std::fs::write(
        d.join("policies/db.toml"),
        "[[rule]]\nid = \"migrate\"\neffect = \"allow\"\nissuer = \"corp\"\n\
         groups_any = [\"sre\"]\nupstream_role = \"migrator\"\n",
    )
    .ok();
    let text = |extra: &str| {
        format!(
            "{BASE}\n[tls]\ncert = \"missing/cert.pem\"\nkey = \"missing/key.pem\"\n\n\
             [[databases]]\nname = \"orders\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"postgres://db.example.com:5432\"\nupstream_tls = \"verify-full\"\n\
             upstream_ca = \"missing/ca.pem\"\nupstream_user = \"readonly\"\n\
             password_file = \"missing/readonly.password\"\npolicy = \"db\"\n{extra}\n\n\
             [databases.upstream_roles.migrator]\npassword_env = \"PORTCULLIS_TEST_NEVER_SET\"\n"
        )
    };
    let load = |text: String, mode: LoadMode| {
        let src = Source::new(d.join("portcullis.toml"), text);
        Config::compile_attempt(&src, mode).result.map_err(|e| {
            e.0.iter().map(|x| format!("{}:{} {}", x.line, x.col, x.message)).collect()
        })
    };

    // `serve` (and plain `check`) reads them all, and says so once for each.
    let errs: Vec<String> = load(text(""), LoadMode::Serve).err().unwrap_or_default();
    let all = errs.join("\n");
    assert_eq!(errs.len(), 5, "{all}");
    for want in [
        "15:8 file `",
        "missing/cert.pem` does not exist",
        "16:7 file `",
        "missing/key.pem` does not exist",
        "23:15 file `",
        "missing/ca.pem` does not exist",
        "25:17 cannot read `",
        "missing/readonly.password`",
        "30:16 environment variable `PORTCULLIS_TEST_NEVER_SET` is not set",
    ] {
        assert!(all.contains(want), "{want}: {all}");
    }
    assert!(!all.contains("no credentials"), "the role is declared: {all}");

    let c = load(text(""), LoadMode::PolicyOnly).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.mode, LoadMode::PolicyOnly);
    assert_eq!(c.databases[0].password.expose(), "");
    assert!(c.files.contains(&d.join("missing/readonly.password")), "still named: {:?}", c.files);

    // Everything else is still checked, at its position.
    let errs =
        load(text("connect_timeout = \"soon\""), LoadMode::PolicyOnly).err().unwrap_or_default();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].ends_with("`soon` is not a duration (e.g. \"30s\")"), "{errs:?}");
    assert!(errs[0].starts_with("27:19 "), "{errs:?}");
    let undeclared = text("").replace("[databases.upstream_roles.migrator]", "[unused]");
    let undeclared = undeclared.replace("[unused]\npassword_env", "#");
    let errs = load(undeclared, LoadMode::PolicyOnly).err().unwrap_or_default();
    assert!(
        errs.iter().any(|e| e.contains("grants upstream_role `migrator`, but database route `orders` has no credentials for it")),
        "{errs:?}"
    );
}

#[test]
fn claim_headers_compile_sorted_and_are_stripped_from_clients() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{BASE}strip_headers = [\"X-User\"]\n[routes.claim_headers]\nX-Tenant = \"tenant_id\"\n\"X-Team\" = \"team\"\n"
    );
    let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let r = &c.routes[0];
    let got: Vec<(&str, &str)> =
        r.claim_headers.iter().map(|c| (c.header.as_str(), &*c.claim)).collect();
    assert_eq!(got, [("x-team", "team"), ("x-tenant", "tenant_id")]);
    let stripped: Vec<&str> = r.strip_headers.iter().map(HeaderName::as_str).collect();
    assert_eq!(stripped, ["x-user", "x-team", "x-tenant"]);
    // None configured: nothing to build per request.
    let c = compile(dir.path(), BASE).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(c.routes[0].claim_headers.is_empty() && c.routes[0].strip_headers.is_empty());

    let errs = compile(
        dir.path(),
        &format!(
            "{BASE}claim_headers = {{ \"X-Team\" = \"team\", \"X-TEAM\" = \"t\", Host = \"h\" }}\n"
        ),
    )
    .err()
    .unwrap_or_default();
    assert_eq!(
        errs,
        [
            "13:38 `claim_headers`: `X-TEAM` is the same header as `x-team` (names ignore case, and CGI/WSGI servers read `-` and `_` alike)",
            "13:54 `claim_headers`: `Host` cannot carry a claim: the proxy routes, authenticates or frames the request by this header",
        ]
    );
}

/// A claim header for `email` forwards the address verified or not (nOAuth: Entra sends
/// no `email_verified`, and lets users put an address they do not own there), while
/// `X-Portcullis-Email` is sent verified only: a warning at the claim, as `claims.email`
/// in an allow is. Other claims, and `email_verified` itself, warn nothing.
#[test]
fn a_claim_header_for_email_is_a_warning_at_the_claim() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let warnings = |claims: &str| {
        let text = format!("{BASE}claim_headers = {{ {claims} }}\n");
        let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
        let w: Vec<String> =
            c.warnings.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect();
        w
    };
    let w = warnings("\"X-Team\" = \"team\", \"X-Mail\" = \"email\"");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "13:49 route `api`: `claim_headers` sends `email` as `X-Mail` whether or not the address is verified"
        ),
        "{w:?}"
    );
    assert!(warnings("\"X-Team\" = \"team\", \"X-V\" = \"email_verified\"").is_empty());
}

/// `strip_prefix` removes the prefix as the route matched it: on a segment boundary, a
/// trailing `/` of the prefix not counting, the prefix itself forwarded as `/`; the
/// removed prefix (for `X-Forwarded-Prefix`) has no trailing `/`. Off, or with the
/// prefix `/`, the path goes as it is and nothing counts as stripped.
#[test]
fn strip_prefix_removes_the_matched_prefix_on_its_segment_boundary() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let route = |prefix: &str, strip: &str| {
        let text = format!(
            "{BASE}\n[[routes]]\nname = \"b\"\nmatch = {{ host = \"b.example.com\", path_prefix = {prefix:?} }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n{strip}\n"
        );
        let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
        let r = c.routes.iter().find(|r| &*r.name == "b").cloned();
        r.unwrap_or_else(|| panic!("route b"))
    };
    for prefix in ["/billing", "/billing/"] {
        let r = route(prefix, "strip_prefix = true");
        assert!(r.strip_prefix);
        for (path, want) in [
            ("/billing/invoices", "/invoices"),
            ("/billing/invoices/", "/invoices/"),
            ("/billing/a/b", "/a/b"),
            ("/billing", "/"),
            ("/billing/", "/"),
        ] {
            assert!(r.matches("b.example.com", path, &Method::GET), "{prefix} {path}");
            assert_eq!(r.forwarded_path(path), Some((want, Some("/billing"))), "{prefix} {path}");
        }
        // Never matched by the route, and never stripped either.
        assert!(!r.matches("b.example.com", "/billingx", &Method::GET));
        assert_eq!(r.forwarded_path("/billingx"), None, "{prefix}");
        assert_eq!(r.forwarded_path("/other"), None, "{prefix}");
    }
    let r = route("/a/b", "strip_prefix = true");
    assert_eq!(r.forwarded_path("/a/b/c"), Some(("/c", Some("/a/b"))));
    for strip in ["", "strip_prefix = false"] {
        let r = route("/billing", strip);
        assert!(!r.strip_prefix, "{strip:?}");
        assert_eq!(r.forwarded_path("/billing/invoices"), Some(("/billing/invoices", None)));
        assert_eq!(r.forwarded_path("/billing"), Some(("/billing", None)));
    }
    let r = route("/", "strip_prefix = true");
    assert_eq!(r.forwarded_path("/billing/invoices"), Some(("/billing/invoices", None)));
    assert_eq!(r.forwarded_path("/"), Some(("/", None)));
}

/// `strip_prefix = true` on a route whose prefix is `/` strips nothing: a warning at the
/// key, whether the prefix is written or left to its default. With a prefix, or set to
/// `false`, there is none.
#[test]
fn strip_prefix_on_a_route_without_a_prefix_is_a_warning_at_the_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let warnings = |matcher: &str, strip: &str| {
        let text = format!(
            "{BASE}\n[[routes]]\nname = \"root\"\nmatch = {{ {matcher} }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n{strip}\n"
        );
        let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
        let w: Vec<String> =
            c.warnings.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect();
        w
    };
    for matcher in ["host = \"b.example.com\", path_prefix = \"/\"", "host = \"b.example.com\""] {
        let w = warnings(matcher, "strip_prefix = true");
        assert_eq!(w.len(), 1, "{matcher}: {w:?}");
        assert!(
            w[0].starts_with(
                "19:16 route `root` has `strip_prefix = true` and `path_prefix` `/`: there is no prefix to strip"
            ),
            "{matcher}: {w:?}"
        );
        assert!(warnings(matcher, "strip_prefix = false").is_empty(), "{matcher}");
    }
    let w = warnings("host = \"b.example.com\", path_prefix = \"/billing\"", "strip_prefix = true");
    assert!(w.is_empty(), "{w:?}");
    // Not a boolean: an error, as for any key.
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"s\"\nmatch = {{ path_prefix = \"/s\" }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\nstrip_prefix = \"yes\"\n"
    );
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert!(errs.iter().any(|e| e.starts_with("19:16 ")), "{errs:#?}");
}

/// `restore_prefix` is on by default and only means something where a prefix is
/// stripped: set on any other route, a warning at the key.
#[test]
fn restore_prefix_defaults_on_and_warns_where_nothing_is_stripped() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let compiled = |prefix: &str, keys: &str| {
        let text = format!(
            "{BASE}\n[[routes]]\nname = \"r\"\nmatch = {{ path_prefix = \"{prefix}\" }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n{keys}\n"
        );
        let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
        let w: Vec<String> = c
            .warnings
            .iter()
            .map(|d| format!("{}:{} {}", d.line, d.col, d.message))
            .filter(|m| m.contains("restore_prefix"))
            .collect();
        let r = c.routes.iter().find(|r| &*r.name == "r").map(|r| r.restore_prefix);
        (r, w)
    };
    assert_eq!(compiled("/app", "strip_prefix = true"), (Some(true), vec![]));
    assert_eq!(
        compiled("/app", "strip_prefix = true\nrestore_prefix = false"),
        (Some(false), vec![])
    );
    for (prefix, keys) in [
        ("/app", "restore_prefix = false"),
        ("/app", "strip_prefix = false\nrestore_prefix = true"),
        ("/", "strip_prefix = true\nrestore_prefix = true"),
    ] {
        let (_, w) = compiled(prefix, keys);
        let line = 18 + keys.lines().count();
        assert_eq!(w.len(), 1, "{keys}: {w:?}");
        assert!(
            w[0].starts_with(&format!(
                "{line}:18 route `r` sets `restore_prefix` but strips no prefix"
            )),
            "{keys}: {w:?}"
        );
    }
}

/// On a `strip_prefix` route, policies see the client's path: a deny written against
/// the application's own paths (`/admin/**` behind `/billing`) never applies there. A
/// warning at `strip_prefix` for each such deny; none for a deny under the prefix, one a
/// wildcard may carry under it, one without `paths`, or without `strip_prefix`.
#[test]
fn a_deny_on_a_strip_prefix_route_with_no_path_under_the_prefix_is_a_warning() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let warnings = |strip: &str| {
        let _ = compile(dir.path(), BASE);
        std::fs::write(
            dir.path().join("policies/q.toml"),
            "[[rule]]\nid = \"h\"\neffect = \"allow\"\nissuer = \"corp\"\n\n\
             [[rule]]\nid = \"app-admin\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = [\"/admin/**\", \"/internal\"]\n\n\
             [[rule]]\nid = \"client-admin\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = [\"/billing/admin/**\"]\n\n\
             [[rule]]\nid = \"wild\"\neffect = \"deny\"\nissuer = \"corp\"\npaths = [\"/*/secret\"]\n\n\
             [[rule]]\nid = \"writes\"\neffect = \"deny\"\nissuer = \"corp\"\nmethods = [\"DELETE\"]\n",
        )
        .ok();
        let text = format!(
            "{BASE}\n[[routes]]\nname = \"billing\"\nmatch = {{ path_prefix = \"/billing/\" }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"q\"\n{strip}\n"
        );
        let src = Source::new(dir.path().join("portcullis.toml"), text);
        let c = Config::compile(&src).unwrap_or_else(|e| panic!("{:?}", e.0));
        let w: Vec<String> =
            c.warnings.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect();
        w
    };
    let w = warnings("strip_prefix = true");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "19:16 route `billing` strips `/billing` before forwarding, but policies match the client's path: deny rule `app-admin` ("
        ),
        "{w:?}"
    );
    assert!(w[0].contains("q.toml:6) has no `paths` under `/billing/`"), "{w:?}");
    assert!(warnings("strip_prefix = false").is_empty());
}

/// A certificate that has expired, or expires within 14 days, is a warning at its `cert`
/// key (`check`, `serve`, every reload), never an error: the listener still starts.
#[test]
fn expired_and_expiring_certificates_are_warnings_at_their_cert_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let now = i64::try_from(crate::util::unix_now()).unwrap_or_else(|e| panic!("{e}"));
    let day = 86_400;
    let write = |name: &str, not_after: i64| {
        let mut params = rcgen::CertificateParams::new(vec![format!("{name}.example.com")])
            .unwrap_or_else(|e| panic!("{e}"));
        params.not_before = time::OffsetDateTime::from_unix_timestamp(now - 400 * day)
            .unwrap_or_else(|e| panic!("{e}"));
        params.not_after =
            time::OffsetDateTime::from_unix_timestamp(not_after).unwrap_or_else(|e| panic!("{e}"));
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join(format!("{name}.pem")), cert.pem()).ok();
        std::fs::write(d.join(format!("{name}-key.pem")), key.serialize_pem()).ok();
    };
    write("soon", now + 5 * day + 3600);
    write("gone", now - 3 * day - 3600);
    write("fine", now + 60 * day);
    let sni = |name: &str| {
        format!(
            "[[tls.sni]]\nserver_names = [\"{name}.example.com\"]\ncert = \"{name}.pem\"\nkey = \"{name}-key.pem\"\n\n"
        )
    };
    let text = format!(
        "{BASE}\n[tls]\ncert = \"soon.pem\"\nkey = \"soon-key.pem\"\n\n{}{}",
        sni("gone"),
        sni("fine")
    );
    let c = compile(d, &text).unwrap_or_else(|e| panic!("{e:?}"));
    let w: Vec<String> = c
        .warnings
        .iter()
        .map(|x| format!("{}:{} {}", x.line, x.col, x.message))
        .filter(|x| x.contains("certificate"))
        .collect();
    assert_eq!(w.len(), 2, "{w:?}");
    let shown = |name: &str| format!("certificate `{}`", d.join(format!("{name}.pem")).display());
    assert!(w[0].starts_with(&format!("15:8 {} expires in 5 days (", shown("soon"))), "{w:?}");
    assert!(w[0].ends_with("Z): renew it"), "{w:?}");
    assert!(w[1].starts_with(&format!("20:8 {} expired 3 days ago (", shown("gone"))), "{w:?}");
    assert!(w[1].ends_with("Z): clients refuse it; renew it"), "{w:?}");

    // Review tools read no certificate, so they say nothing of one.
    let src = Source::new(d.join("portcullis.toml"), text);
    let c = Config::compile_attempt(&src, LoadMode::PolicyOnly)
        .result
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.warnings.iter().any(|x| x.message.contains("certificate")), "{:?}", c.warnings);
}

/// A certificate rustls accepts (it does not read the validity of a certificate it
/// serves) but whose notAfter does not parse gets no expiry metric and could expire
/// unannounced: a warning at its `cert` key, and the load goes on.
#[test]
fn a_certificate_whose_expiry_cannot_be_read_is_a_warning_at_its_cert_key() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let mut params = rcgen::CertificateParams::new(vec!["odd.example.com".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    params.not_after = time::OffsetDateTime::from_unix_timestamp(2_208_988_800) // 2040-01-01
        .unwrap_or_else(|e| panic!("{e}"));
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
    // notAfter, a UTCTime, with letters for its seconds.
    let mut der = cert.der().to_vec();
    let at = der
        .windows(13)
        .position(|w| w == b"400101000000Z")
        .unwrap_or_else(|| panic!("no notAfter"));
    der[at + 10..at + 12].copy_from_slice(b"xx");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    let pem =
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"));
    std::fs::write(d.join("odd.pem"), pem).ok();
    std::fs::write(d.join("odd-key.pem"), key.serialize_pem()).ok();
    let loaded = crate::tls::load_certified_key(&d.join("odd.pem"), &d.join("odd-key.pem"))
        .unwrap_or_else(|e| panic!("rustls takes it: {e}"));
    let leaf = loaded.end_entity_cert().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crate::tls::not_after(leaf), None);

    let text = format!("{BASE}\n[tls]\ncert = \"odd.pem\"\nkey = \"odd-key.pem\"\n");
    let c = compile(d, &text).unwrap_or_else(|e| panic!("{e:?}"));
    let w: Vec<String> = c
        .warnings
        .iter()
        .map(|x| format!("{}:{} {}", x.line, x.col, x.message))
        .filter(|x| x.contains("certificate"))
        .collect();
    let shown = format!("certificate `{}`", d.join("odd.pem").display());
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(&format!("15:8 {shown}: its expiry date (notAfter) cannot be read")),
        "{w:?}"
    );
}

/// A public rule on `/**` is flagged once per route using its policy, with what it
/// opens there: everything under the route's `path_prefix`, on its host.
#[test]
fn a_public_rule_on_every_path_is_flagged_with_each_routes_prefix() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    compile(d, BASE).unwrap_or_else(|e| panic!("{e:?}"));
    std::fs::write(
        d.join("policies/open.toml"),
        "[[rule]]\nid = \"site\"\neffect = \"allow\"\npublic = true\nmethods = [\"GET\"]\npaths = [\"/**\"]\n",
    )
    .ok();
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"docs\"\nmatch = {{ host = \"api.example.com\", path_prefix = \"/docs\" }}\n\
         upstream = \"http://127.0.0.1:9000\"\npolicy = \"open\"\n\n\
         [[routes]]\nname = \"www\"\nupstream = \"http://127.0.0.1:9000\"\nmatch = {{ path_prefix = \"/\" }}\n\
         shadow_policy = \"open\"\npolicy = \"p\"\n"
    );
    let c = compile(d, &text).unwrap_or_else(|e| panic!("{e:?}"));
    let w: Vec<String> = c
        .warnings
        .iter()
        .filter(|x| x.message.contains("every path"))
        .map(|x| format!("{}:{}:{} {}", x.file.display(), x.line, x.col, x.message))
        .collect();
    let at = format!("{}:6:9 warning: public rule `site`", d.join("policies/open.toml").display());
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].starts_with(&format!("{at} opens every path of route `docs` (`/**`; its path_prefix is `/docs`: `/docs` and every path under `/docs/` on host api.example.com that")), "{w:?}");
    assert!(w[1].starts_with(&format!("{at} would open every path of route `www` (`/**`; its path_prefix is `/`: every path on any host that no route")), "{w:?}");
}

/// `match.methods = []` admits no request: the route would be dead, and its requests
/// would go to a broader route and its policy. An error at the key, as `issuers = []`.
#[test]
fn a_route_whose_methods_list_is_empty_is_an_error() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"none\"\nmatch = {{ path_prefix = \"/x\", methods = [] }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n"
    );
    let errs = compile(dir.path(), &text).err().unwrap_or_default();
    assert_eq!(
        errs,
        ["16:41 `match.methods` must name at least one method (or be left out)"],
        "{errs:?}"
    );
}

/// A zero timeout fails every request or session it bounds (504s, refused connects, an
/// assertion expired as it is signed): refused where it is written. Sub-second route
/// timeouts stay possible; the assertion's `ttl` is whole seconds, as JWT times are.
#[test]
fn zero_timeouts_and_lifetimes_are_refused_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("pw"), "x\n").ok();
    let route = |keys: &str| {
        let text = BASE.replace("policy = \"p\"\n", &format!("policy = \"p\"\n{keys}\n"));
        compile(dir.path(), &text).err().unwrap_or_default()
    };
    assert_eq!(route("timeout = \"0s\""), ["13:11 `timeout` must be longer than zero"]);
    assert_eq!(
        route("connect_timeout = \"0ms\""),
        ["13:19 `connect_timeout` must be longer than zero"]
    );
    let ok = compile(
        dir.path(),
        &BASE.replace("policy = \"p\"\n", "policy = \"p\"\ntimeout = \"250ms\"\n"),
    );
    assert_eq!(ok.map(|c| c.routes[0].timeout).ok(), Some(Duration::from_millis(250)));
    let ttl = |v: &str| {
        compile(dir.path(), &format!("{BASE}\n[assertion]\nttl = \"{v}\"\n"))
            .err()
            .unwrap_or_default()
    };
    assert_eq!(ttl("0s"), ["15:7 `ttl` must be at least 1s"]);
    assert_eq!(ttl("500ms"), ["15:7 `ttl` must be at least 1s"]);
    let database = |keys: &str| {
        let text = format!(
            "{BASE}\n[[databases]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"postgres://127.0.0.1:5432\"\nupstream_user = \"app\"\n\
             password_file = \"pw\"\npolicy = \"p\"\n{keys}\n"
        );
        // (No [tls]: that error is the same for every case and left out.)
        let errs = compile(dir.path(), &text).err().unwrap_or_default();
        errs.into_iter().filter(|e| !e.contains("[tls]")).collect::<Vec<_>>()
    };
    assert_eq!(database("max_session = \"8h\""), Vec::<String>::new());
    for key in ["max_session", "startup_timeout", "connect_timeout"] {
        let col = key.len() + 4;
        assert_eq!(
            database(&format!("{key} = \"0s\"")),
            [format!("21:{col} `{key}` must be longer than zero")]
        );
    }
}

/// A sign-in route on a host `cookie_domain` does not cover can never keep a session
/// (the browser refuses the cookie): a warning at the route; none where it is covered.
#[test]
fn a_sign_in_route_outside_the_cookie_domain_is_a_warning() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let warnings = |host: &str| {
        let text = BASE.replace("api.example.com", host).replace(
            "audiences = [\"portcullis\"]\n",
            "audiences = [\"portcullis\"]\nlogin = { client_id = \"p\", client_secret_env = \"PATH\", scopes = [\"openid\"] }\n",
        ) + "\n[session]\nkeys_file = \"keys\"\ncookie_domain = \"example.com\"\n";
        let c = compile(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
        c.warnings.iter().map(|d| format!("{}:{} {}", d.line, d.col, d.message)).collect::<Vec<_>>()
    };
    for covered in ["example.com", "api.example.com", "API.Example.COM", "*.example.com"] {
        assert_eq!(warnings(covered), Vec::<String>::new(), "{covered}");
    }
    for outside in ["api.other.com", "notexample.com", "*.example.org"] {
        let w = warnings(outside);
        assert_eq!(w.len(), 1, "{outside}: {w:?}");
        assert!(
            w[0].starts_with("10:8 route `api` offers browser sign-in on a host outside `cookie_domain` `example.com`"),
            "{outside}: {w:?}"
        );
    }
}

/// The "never reached" check compares a route only with routes of the same host and
/// prefix; it must warn exactly as comparing every pair would, on a mix of exact hosts
/// (in two spellings), wildcards, any host, prefixes with and without a trailing `/`,
/// and method filters, in a scrambled order.
#[test]
fn never_reached_warns_as_comparing_every_pair_does() {
    let hosts = [
        Some("a.example.com"),
        Some("A.Example.com"),
        Some("b.example.com"),
        Some("*.example.com"),
        Some("*.a.example.com"),
        None,
    ];
    let prefixes = ["/", "/v1", "/v1/", "/v1/x", "/v2"];
    let methods = ["", "GET", "HEAD", "GET\", \"POST", "POST", "GET\", \"HEAD"];
    let mut matchers = Vec::new();
    for host in hosts {
        for prefix in prefixes {
            for m in methods {
                let mut parts = vec![format!("path_prefix = {prefix:?}")];
                parts.extend(host.map(|h| format!("host = {h:?}")));
                if !m.is_empty() {
                    parts.push(format!("methods = [\"{m}\"]"));
                }
                // Each matcher twice: a later copy is always taken by an earlier one.
                matchers.extend([parts.join(", "), parts.join(", ")]);
            }
        }
    }
    let (warned, want) = never_reached_both_ways(&matchers);
    assert!(
        want.len() > matchers.len() / 2,
        "a generated set with few dead routes: {}",
        want.len()
    );
    assert_eq!(warned, want);
}

/// The same on one host and prefix, routes differing only in their methods: every set
/// of one to three of eight (standard and extension methods, `GET` taking `HEAD`),
/// some twice, and a route without a filter among them, in a scrambled order.
#[test]
fn never_reached_warns_as_comparing_every_pair_does_for_routes_differing_in_methods() {
    let pool = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "PROPFIND", "MKCOL"];
    let mut matchers = Vec::new();
    for bits in 1u32..(1 << pool.len()) {
        if bits.count_ones() > 3 {
            continue;
        }
        let ms: Vec<String> = pool
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, m)| format!("{m:?}"))
            .collect();
        let m = format!(
            "host = \"a.example.com\", path_prefix = \"/v1\", methods = [{}]",
            ms.join(", ")
        );
        if bits % 3 == 0 {
            matchers.push(m.clone());
        }
        matchers.push(m);
    }
    matchers.push("host = \"a.example.com\", path_prefix = \"/v1/\"".into());
    let (warned, want) = never_reached_both_ways(&matchers);
    let n = matchers.len();
    assert!(want.len() > n / 4 && n - want.len() >= 10, "{} dead of {n}", want.len());
    assert_eq!(warned, want);
}

/// Thousands of routes on one host and prefix, differing only in their methods (an
/// extension method each, some with `GET`), are not each compared with every earlier
/// one: the check did n²/2 comparisons (12 million for these 5 000 routes, seconds of
/// `portcullis check`), it now does a few per route.
#[test]
fn never_reached_compares_routes_differing_in_methods_a_few_times_each() {
    let n = 5000;
    // An extension method of capitals alone: `M` + the route's number in letters.
    let method = |i: usize| -> String {
        let mut m = String::from("M");
        let mut i = i;
        loop {
            m.push(char::from(b'A' + (i % 26) as u8));
            i /= 26;
            if i == 0 {
                return m;
            }
        }
    };
    let text = (0..n)
        .map(|i| {
            let get = if i % 2 == 0 { "\"GET\", " } else { "" };
            let m = method(i);
            format!("\n[[routes]]\nname = \"r{i}\"\nmatch = {{ host = \"a.example.com\", path_prefix = \"/v1\", methods = [{get}\"{m}\"] }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n")
        })
        .collect::<String>();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = compile(dir.path(), &format!("{BASE}{text}")).unwrap_or_else(|e| panic!("{e:?}"));
    let placed: Vec<(usize, Arc<RouteSettings>)> = c.routes.iter().cloned().enumerate().collect();
    let mut compared = 0usize;
    let dead = never_reached_by(&placed, |e, l| {
        compared += 1;
        takes_all_of(e, l)
    });
    assert!(dead.is_empty());
    assert!(compared <= 2 * placed.len(), "{compared} comparisons for {} routes", placed.len());
}

/// The warnings `check` gives for routes with these `match`es (each `r<i>`, in a fixed
/// scramble: multiplication by a unit modulo the count, no randomness), and those of
/// the pairwise reference, each as (later, earlier) route names.
fn never_reached_both_ways(matchers: &[String]) -> (Vec<Pair>, Vec<Pair>) {
    let n = matchers.len();
    let unit = (127..).find(|u| gcd(*u, n) == 1).unwrap_or(1);
    let text = (0..n)
        .map(|i| {
            let m = &matchers[(i * unit) % n];
            format!("\n[[routes]]\nname = \"r{i}\"\nmatch = {{ {m} }}\nupstream = \"http://127.0.0.1:1\"\npolicy = \"p\"\n")
        })
        .collect::<String>();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let c = compile(dir.path(), &format!("{BASE}{text}")).unwrap_or_else(|e| panic!("{e:?}"));
    let warned: Vec<(String, String)> = c
        .warnings
        .iter()
        .filter_map(|d| {
            let (later, rest) = d.message.strip_prefix("route `")?.split_once('`')?;
            let earlier = rest.strip_prefix(" is never reached: route `")?.split_once('`')?.0;
            Some((later.to_string(), earlier.to_string()))
        })
        .collect();
    (warned, never_reached_pairwise(&c.routes))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A route never reached and the earlier one that takes it, by name.
type Pair = (String, String);

/// The reference: every route against every earlier one, in routing order.
fn never_reached_pairwise(routes: &[Arc<RouteSettings>]) -> Vec<(String, String)> {
    routes
        .iter()
        .enumerate()
        .filter_map(|(j, later)| {
            let earlier = routes[..j].iter().find(|e| takes_all_of(e, later))?;
            Some((later.name.to_string(), earlier.name.to_string()))
        })
        .collect()
}

/// A key of more than 80 dotted parts is refused by the `toml` crate as `recursion
/// limit`, without a position: it read as `1:1`, whichever line held the key. It is
/// reported at the key (the first such key: the crate reports no other).
#[test]
fn a_too_deeply_dotted_key_is_reported_at_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let deep = vec!["k"; 81].join(".");
    let text = format!("{BASE}\n[server]\n  {deep} = 1\n\n[{deep}]\n");
    let line = BASE.lines().count() + 3;
    let e = compile(dir.path(), &text).err().unwrap_or_default();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with(&format!("{line}:3 recursion limit: a key of more than 80")), "{e:?}");
    // A table header too.
    let text = format!("{BASE}\n[server]\n\n[{deep}]\n");
    let e = compile(dir.path(), &text).err().unwrap_or_default();
    assert_eq!(
        e,
        [format!(
            "{}:2 recursion limit: a key of more than 80 dotted parts; write fewer levels",
            line + 1
        )]
    );
    // 80 parts are within the limit: not a syntax error (an unknown key of `[server]`).
    let text = format!("{BASE}\n[server]\n{} = 1\n", vec!["k"; 80].join("."));
    let e = compile(dir.path(), &text).err().unwrap_or_default();
    assert!(e.iter().all(|d| !d.contains("recursion")), "{e:?}");
}

#[test]
fn redis_settings_default_and_every_mistake_is_reported_where_it_is_written() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("redis-pw"), "s3cret\n").ok();
    let redis = |extra: &str| compile(dir.path(), &format!("{BASE}\n[redis]\n{extra}\n"));
    let c = redis("url = \"redis://10.0.0.5\"").unwrap_or_else(|e| panic!("{e:?}"));
    let r = c.redis.unwrap_or_else(|| panic!("no [redis]"));
    assert_eq!((r.host.as_str(), r.port, r.db, r.tls), ("10.0.0.5", 6379, 0, false));
    assert_eq!(r.key_prefix, "portcullis:");
    assert_eq!(r.timeout, Duration::from_millis(500));
    assert_eq!(r.password, None);
    let c = redis(
        "url = \"rediss://[::1]:6380/2\"\nusername = \"px\"\npassword_file = \"redis-pw\"\nkey_prefix = \"prod:\"\ntimeout = \"2s\"",
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let r = c.redis.unwrap_or_else(|| panic!("no [redis]"));
    assert_eq!((r.host.as_str(), r.port, r.db, r.tls), ("::1", 6380, 2, true));
    assert_eq!(r.password.as_ref().map(|p| p.expose()), Some("s3cret"));
    assert_eq!(r.shown(), "rediss://::1:6380/2", "never a credential");
    assert!(compile(dir.path(), BASE).is_ok_and(|c| c.redis.is_none()));
    for (extra, error) in [
        ("url = \"redis://u:s3cret@h\"", "15:7 the Redis URL must not carry credentials"),
        ("url = \"http://h\"", "15:7 `url` must start with redis:// or rediss://"),
        ("url = \"redis://h:0\"", "15:7 the Redis URL has a bad port"),
        ("url = \"redis://h/x\"", "15:7 the URL's path is the database number"),
        ("url = \"redis://h?db=1\"", "15:7 the Redis URL takes no query"),
        ("url = \"redis://:6379\"", "15:7 the Redis URL names no host"),
        ("url = \"redis://h\"\nusername = \"u\"", "16:12 `username` needs a password"),
        ("url = \"redis://h\"\nca = \"redis-pw\"", "16:6 `ca` only applies to rediss://"),
        ("url = \"redis://h\"\nkey_prefix = \"a b\"", "16:14 `key_prefix` is 1 to 64"),
        ("url = \"redis://h\"\ntimeout = \"0s\"", "16:11 `timeout` must be longer than zero"),
        ("url = \"redis://h\"\npassword = \"inline\"", "16:1 unknown field `password`"),
    ] {
        let errors = redis(extra).err().unwrap_or_default();
        assert!(errors.iter().any(|e| e.starts_with(error)), "{extra}: {errors:?}");
        assert!(!errors.iter().any(|e| e.contains("s3cret")), "{extra}: {errors:?}");
    }
}

/// A CI provider's issuer declared without its preset (the key is optional and
/// defaults to `oidc`) was taken as a people's issuer: no CI claims required, no CI
/// context, and none of the V22 pin lints, so `issuer = "gh"` with a
/// `claims.repository = "acme/api"` or a `subject = "repo:acme/…"` rule (or nothing
/// at all) admitted every repository on GitHub that asks for the proxy's audience.
#[test]
fn a_ci_providers_issuer_needs_its_preset() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let gh = "https://token.actions.githubusercontent.com";
    let bb = "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc";
    let with = |preset: &str, issuer: &str| {
        let preset =
            if preset.is_empty() { String::new() } else { format!("preset = \"{preset}\"\n") };
        let text = BASE.replace(
            "[[routes]]",
            &format!("[issuers.ci]\n{preset}issuer = \"{issuer}\"\naudiences = [\"https://proxy.example.com\"]\n\n[[routes]]"),
        );
        compile(dir.path(), &text).err().unwrap_or_default()
    };
    for (preset, issuer, needs) in [
        ("", gh, "github-actions"),
        ("oidc", gh, "github-actions"),
        ("gitlab-ci", gh, "github-actions"),
        ("", &format!("{gh}/acme-corp"), "github-actions"),
        ("", "https://ghes.example.com/_services/token", "github-actions"),
        ("", bb, "bitbucket-pipelines"),
        ("github-actions", bb, "bitbucket-pipelines"),
    ] {
        let errs = with(preset, issuer);
        assert!(
            errs.iter().any(|e| e.contains(&format!("needs `preset = \"{needs}\"`"))),
            "{preset:?} {issuer}: {errs:?}"
        );
    }
    for (preset, issuer) in [
        ("github-actions", gh),
        ("github-actions", &*format!("{gh}/acme-corp")),
        ("github-actions", "https://ghes.example.com/_services/token"),
        ("bitbucket-pipelines", bb),
        // gitlab.com is also an OpenID provider people sign in with.
        ("", "https://gitlab.com"),
        ("gitlab-ci", "https://gitlab.com"),
    ] {
        assert_eq!(with(preset, issuer), Vec::<String>::new(), "{preset:?} {issuer}");
    }
}

/// Two listeners on one socket passed `check` and then failed `serve` at start
/// ("cannot listen on …: Address already in use"): the admin listener's default
/// `127.0.0.1:9090` taken by another listener, two listeners alike, or a wildcard
/// address and a specific one on the same port (Linux refuses the second bind; `[::]`
/// takes IPv4 too). Refused where the second one is written.
#[test]
fn two_listeners_on_one_socket_are_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let listen = |lines: &str| {
        compile(dir.path(), &BASE.replace("insecure_http = \"127.0.0.1:8080\"", lines)).map(|_| ())
    };
    assert_eq!(
        listen("insecure_http = \"127.0.0.1:9090\"").err().unwrap_or_default(),
        ["2:17 `127.0.0.1:9090` is also the admin listener's address (by default): set `admin` to another one, or \"off\""]
    );
    assert_eq!(
        listen("insecure_http = \"0.0.0.0:8080\"\nadmin = \"127.0.0.1:8080\"")
            .err()
            .unwrap_or_default(),
        ["3:9 `127.0.0.1:8080` is already used by another listener (`insecure_http`)"]
    );
    assert_eq!(
        listen("insecure_http = \"127.0.0.1:8080\"\nadmin = \"[::]:8080\"")
            .err()
            .unwrap_or_default(),
        ["3:9 `[::]:8080` is already used by another listener (`insecure_http`)"]
    );
    let db = "\n[[databases]]\nname = \"db\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"postgres://127.0.0.1:5432\"\nupstream_user = \"app\"\npassword_file = \"pw\"\npolicy = \"p\"\n";
    std::fs::write(dir.path().join("pw"), "x\n").ok();
    let with_db = |listen_line: &str| {
        compile(
            dir.path(),
            &format!("{}{db}", BASE.replace("insecure_http = \"127.0.0.1:8080\"", listen_line)),
        )
        .map(|_| ())
    };
    assert!(with_db("insecure_http = \"0.0.0.0:8080\"")
        .err()
        .unwrap_or_default()
        .iter()
        .any(|e| e.ends_with("`127.0.0.1:8080` is already used by another listener")));
    // Other ports, other specific addresses, and port 0 (each its own) are fine.
    for ok in [
        "insecure_http = \"127.0.0.1:8080\"\nadmin = \"127.0.0.2:8080\"",
        "insecure_http = \"0.0.0.0:8443\"\nadmin = \"[::1]:8443\"",
        "insecure_http = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"",
    ] {
        assert_eq!(listen(ok), Ok(()), "{ok}");
    }
}

/// A certificate and key that exist but cannot serve passed `check` (which looked for
/// the files only) and then failed `serve` at start: a key file given as `cert`, a
/// certificate given as `key`, another certificate's key. Refused where the file at
/// fault is named, for `[[tls.sni]]` entries too.
#[test]
fn a_certificate_and_key_that_cannot_serve_are_refused_where_named() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    for name in ["a", "b"] {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params = rcgen::CertificateParams::new(vec![format!("{name}.example.com")])
            .unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join(format!("{name}.pem")), cert.pem()).ok();
        std::fs::write(d.join(format!("{name}-key.pem")), key.serialize_pem()).ok();
    }
    let tls = |cert: &str, key: &str| {
        compile(d, &format!("{BASE}\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n")).map(|_| ())
    };
    let shown = |f: &str| d.join(f).display().to_string();
    assert_eq!(tls("a.pem", "a-key.pem"), Ok(()));
    assert_eq!(
        tls("a-key.pem", "a-key.pem").err().unwrap_or_default(),
        [format!(
            "15:8 {}: no certificate (expected a PEM `BEGIN CERTIFICATE` section)",
            shown("a-key.pem")
        )]
    );
    assert_eq!(
        tls("a.pem", "a.pem").err().unwrap_or_default(),
        [format!(
            "16:7 {}: no private key (expected a PEM section holding a PKCS#8, SEC1 EC or PKCS#1 RSA key)",
            shown("a.pem")
        )]
    );
    assert_eq!(
        tls("a.pem", "b-key.pem").err().unwrap_or_default(),
        [format!(
            "16:7 {}: private key does not match the certificate in {}",
            shown("b-key.pem"),
            shown("a.pem")
        )]
    );
    let sni = compile(
        d,
        &format!(
            "{BASE}\n[tls]\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n\n[[tls.sni]]\n\
             server_names = [\"b.example.com\"]\ncert = \"b.pem\"\nkey = \"a-key.pem\"\n"
        ),
    );
    assert_eq!(
        sni.err().unwrap_or_default(),
        [format!(
            "21:7 {}: private key does not match the certificate in {}",
            shown("a-key.pem"),
            shown("b.pem")
        )]
    );
    // `check --policy-only` opens no certificate or key.
    let src = Source::new(
        d.join("portcullis.toml"),
        format!("{BASE}\n[tls]\ncert = \"a-key.pem\"\nkey = \"b.pem\"\n"),
    );
    assert!(Config::compile_attempt(&src, LoadMode::PolicyOnly).result.is_ok());
}

/// A CA file or assertion key that exists but cannot be used passed `check` (which
/// looked for the file only) and then failed `serve` at start: an issuer's `ca`, a
/// route's or a database's `upstream_ca`, `[assertion] key`. Refused where named.
#[test]
fn ca_files_and_the_assertion_key_that_cannot_be_used_are_refused_where_named() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    std::fs::write(d.join("junk.pem"), "not PEM at all\n").ok();
    std::fs::write(d.join("pw"), "x\n").ok();
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let params = rcgen::CertificateParams::new(vec!["ca.example.com".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(d.join("ca.pem"), cert.pem()).ok();
    std::fs::write(d.join("key.pem"), key.serialize_pem()).ok();
    let errs = |text: String| compile(d, &text).err().unwrap_or_default();
    let issuer = |ca: &str| BASE.replace("audiences = [", &format!("ca = \"{ca}\"\naudiences = ["));
    assert_eq!(compile(d, &issuer("ca.pem")).map(|_| ()), Ok(()));
    let e = errs(issuer("junk.pem"));
    assert!(e.len() == 1 && e[0].starts_with("6:6 CA file: "), "{e:?}");
    let route = |ca: &str| {
        BASE.replace(
            "http://127.0.0.1:9000\"",
            &format!("https://127.0.0.1:9000\"\nupstream_ca = \"{ca}\""),
        )
    };
    assert_eq!(compile(d, &route("ca.pem")).map(|_| ()), Ok(()));
    let e = errs(route("key.pem"));
    assert!(e.len() == 1 && e[0].starts_with("12:15 CA file: "), "{e:?}");
    let assertion = |k: &str| format!("{BASE}\n[assertion]\nkey = \"{k}\"\n");
    assert_eq!(compile(d, &assertion("key.pem")).map(|_| ()), Ok(()));
    let e = errs(assertion("ca.pem"));
    assert!(e.len() == 1 && e[0].starts_with("15:7 ") && e[0].contains("assertion key: "), "{e:?}");
    let db = |ca: &str| {
        format!(
            "{BASE}\n[[databases]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"postgres://127.0.0.1:5432\"\nupstream_user = \"app\"\n\
             password_file = \"pw\"\npolicy = \"p\"\nupstream_tls = \"verify-full\"\n\
             upstream_ca = \"{ca}\"\n\n[tls]\ncert = \"ca.pem\"\nkey = \"key.pem\"\n"
        )
    };
    assert_eq!(compile(d, &db("ca.pem")).map(|_| ()), Ok(()));
    let e = errs(db("junk.pem"));
    assert!(e.len() == 1 && e[0].starts_with("22:15 CA file: "), "{e:?}");
    let redis =
        |ca: &str| format!("{BASE}\n[redis]\nurl = \"rediss://127.0.0.1:6379\"\nca = \"{ca}\"\n");
    assert_eq!(compile(d, &redis("ca.pem")).map(|_| ()), Ok(()));
    let e = errs(redis("junk.pem"));
    assert!(e.len() == 1 && e[0].starts_with("16:6 CA file: "), "{e:?}");
}

/// A session-keys file that holds no key and an empty client-secret file passed `check`
/// and then failed `serve` at start (`[session] keys: session key #1 is not base64`,
/// `client secret: … is empty`). Refused where named; the value is never quoted.
#[test]
fn secret_files_serve_cannot_use_are_refused_where_named() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let text = |keys: &str, secret: &str| {
        std::fs::write(d.join("keys"), keys).ok();
        std::fs::write(d.join("secret"), secret).ok();
        BASE.replace(
            "audiences = [\"portcullis\"]\n",
            "audiences = [\"portcullis\"]\nlogin = { client_id = \"p\", client_secret_file = \"secret\" }\n",
        ) + "\n[session]\nkeys_file = \"keys\"\n"
    };
    let good = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    assert_eq!(compile(d, &text(good, "s3cret")).map(|_| ()), Ok(()));
    let e = compile(d, &text("hunter2 not a key", "s3cret")).err().unwrap_or_default();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("16:13 session key #1 is not base64"), "{e:?}");
    assert!(!e[0].contains("hunter2"), "{e:?}");
    let e = compile(d, &text(good, " \n")).err().unwrap_or_default();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("7:49 secret file `") && e[0].ends_with("is empty"), "{e:?}");
}

/// A `*_env` secret was never looked at before `serve` started: `check` passed a
/// `client_secret_env` or `[session] keys_env` naming a variable that is not set (or
/// holds no keys), and `serve` failed at start. Refused where named, as an unusable
/// secret file is; the value is never quoted. (`check --policy-only` reads none.)
#[test]
fn secret_variables_serve_cannot_use_are_refused_where_named() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let unset = "PORTCULLIS_TEST_VARIABLE_NOBODY_SETS";
    assert!(std::env::var_os(unset).is_none());
    let text = |keys: &str, secret: &str| {
        BASE.replace(
            "audiences = [\"portcullis\"]\n",
            &format!("audiences = [\"portcullis\"]\nlogin = {{ client_id = \"p\", client_secret_env = \"{secret}\" }}\n"),
        ) + &format!("\n[session]\nkeys_env = \"{keys}\"\n")
    };
    let e = compile(d, &text(unset, unset)).err().unwrap_or_default();
    assert_eq!(
        e,
        [
            format!("7:48 environment variable `{unset}` is not set"),
            format!("16:12 environment variable `{unset}` is not set"),
        ]
    );
    // PATH is set, and is no session key: refused, its value not shown.
    let path = std::env::var("PATH").unwrap_or_default();
    assert!(!path.is_empty());
    let e = compile(d, &text("PATH", "PATH")).err().unwrap_or_default();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("16:12 session key #1 is not base64"), "{e:?}");
    assert!(!e[0].contains(&path), "{e:?}");
    // `--policy-only` reads no variable.
    let src = Source::new(d.join("portcullis.toml"), text(unset, unset));
    assert!(Config::compile_attempt(&src, LoadMode::PolicyOnly).result.is_ok());
}

/// `[[tls.sni]] server_names` that the listener refuses (not a DNS name, a wildcard
/// elsewhere than the whole leftmost label, an IP address, a name twice, whatever its
/// case) passed `check`, `--policy-only` too, and then failed `serve` at start. Refused
/// where the name is written.
#[test]
fn sni_server_names_the_listener_refuses_are_refused_where_written() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = rcgen::CertificateParams::new(vec!["a.example.com".to_string()])
        .and_then(|p| p.self_signed(&key))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(d.join("a.pem"), cert.pem()).ok();
    std::fs::write(d.join("a-key.pem"), key.serialize_pem()).ok();
    let names = |first: &str, second: &str| {
        let sni = |names: &str| {
            format!(
                "[[tls.sni]]\nserver_names = {names}\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n\n"
            )
        };
        compile(
            d,
            &format!(
                "{BASE}\n[tls]\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n\n{}{}",
                sni(first),
                sni(second)
            ),
        )
        .map(|_| ())
    };
    assert_eq!(names("[\"a.example.com\", \"*.b.example.com\"]", "[\"c.example.com.\"]"), Ok(()));
    let one = |first: &str| names(first, "[\"z.example.com\"]").err().unwrap_or_default();
    assert_eq!(
        one("[\"ok.example.com\", \"*.*.example.com\"]"),
        ["19:35 invalid TLS server name \"*.*.example.com\": a wildcard must be the whole leftmost label, as in *.example.com"]
    );
    assert_eq!(one("[\"a..b\"]"), ["19:17 invalid TLS server name \"a..b\": not a DNS name"]);
    assert_eq!(
        one("[\"10.0.0.1\"]"),
        ["19:17 invalid TLS server name \"10.0.0.1\": an IP address is never sent in SNI"]
    );
    assert_eq!(
        names("[\"x.example.com\"]", "[\"X.example.com.\"]").err().unwrap_or_default(),
        ["24:17 TLS server name \"X.example.com.\" is configured more than once"]
    );
    assert_eq!(
        one("[\"*.example.com\", \"*.EXAMPLE.com\"]"),
        ["19:34 TLS server name \"*.EXAMPLE.com\" is configured more than once"]
    );
}

/// An `[audit] output` that cannot be opened for appending (empty, a directory, a file
/// in a directory that does not exist) passed `check` and failed `serve` at start.
/// Refused where written; `check` creates nothing.
#[test]
fn an_audit_output_serve_cannot_open_is_refused_where_written() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let output = |o: &str| {
        compile(d, &format!("{BASE}\n[audit]\noutput = \"{o}\"\n")).err().unwrap_or_default()
    };
    assert!(output("audit.log").is_empty());
    assert!(output("stdout").is_empty());
    assert!(!d.join("audit.log").exists(), "check created the audit file");
    assert_eq!(output(""), ["15:10 `output` is \"stdout\" or the path of a file to append to"]);
    std::fs::create_dir_all(d.join("logs")).ok();
    assert_eq!(
        output("logs"),
        [format!(
            "15:10 `{}` is a directory: `output` is the file events are appended to",
            d.join("logs").display()
        )]
    );
    assert_eq!(
        output("missing/audit.log"),
        [format!(
            "15:10 the directory of `{}` does not exist",
            d.join("missing/audit.log").display()
        )]
    );
}

/// An upstream on port 0 passed `check`, and every request to the route was a 502:
/// port 0 names no port to connect to.
#[test]
fn an_upstream_on_port_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let errs = compile(dir.path(), &BASE.replace("127.0.0.1:9000", "127.0.0.1:0"))
        .err()
        .unwrap_or_default();
    assert_eq!(errs, ["11:12 upstream: port 0 is no port to connect to"]);
    assert!(compile(dir.path(), &BASE.replace("127.0.0.1:9000", "127.0.0.1:00080")).is_ok());
}
