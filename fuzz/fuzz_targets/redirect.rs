//! Any text as the return target of a sign-in or sign-out (`rd`), read back as a browser
//! reads the `Location` it is sent (the WHATWG URL parser, the `url` crate).
//!
//! Property: a target accepted sends the browser only to this proxy: `https`, no
//! userinfo, the request's own host or one a route names explicitly (never one only the
//! catch-all route serves), on the request's own port.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;
use portcullis::diag::Source;
use portcullis::session::redirect;

/// Routes for `app.example.com`, `*.internal.example.com` and a catch-all `*`.
fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portcullis-fuzz-redirect-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("policies")).expect("policy dir");
        std::fs::write(
            dir.join("policies/p.toml"),
            "[[rule]]\nid = \"a\"\neffect = \"allow\"\nissuer = \"corp\"\ngroups_any = [\"x\"]\n",
        )
        .expect("policy");
        let route = |name: &str, host: &str| {
            format!("[[routes]]\nname = \"{name}\"\nmatch = {{ host = \"{host}\" }}\nupstream = \"http://127.0.0.1:2\"\npolicy = \"p\"\n")
        };
        let text = format!(
            "[listen]\ninsecure_http = \"127.0.0.1:1\"\n[issuers.corp]\nissuer = \"https://idp.example.com\"\naudiences = [\"a\"]\n{}{}{}",
            route("a", "app.example.com"),
            route("b", "*.internal.example.com"),
            route("c", "*"),
        );
        let config = Config::compile(&Source::new(dir.join("portcullis.toml"), text));
        let _ = std::fs::remove_dir_all(&dir);
        config.unwrap_or_else(|e| panic!("{e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, target)) = data.split_first() else { return };
    let Ok(target) = std::str::from_utf8(target) else { return };
    // The request's own authority: on a port of its own, or the default one.
    let (own, port) =
        if which & 1 == 0 { ("app.example.com:8443", 8443) } else { ("app.example.com", 443) };
    let Ok(location) = redirect::check(target, own, config()) else { return };
    assert!(location.len() <= redirect::MAX_LEN + "https://".len() + own.len());
    // What the browser does with it. One it cannot parse it does not follow.
    let Ok(url) = url::Url::parse(&location) else { return };
    assert_eq!(url.scheme(), "https", "{target:?} -> {location:?}");
    assert!(url.username().is_empty() && url.password().is_none(), "{target:?} -> {location:?}");
    let host = url.host_str().unwrap_or_default();
    assert!(
        host == "app.example.com"
            || (host.ends_with(".internal.example.com") && host != ".internal.example.com"),
        "{target:?} -> {location:?} goes to {host:?}"
    );
    assert_eq!(url.port_or_known_default(), Some(port), "{target:?} -> {location:?}");
});
