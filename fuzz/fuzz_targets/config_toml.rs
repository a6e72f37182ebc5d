//! Any text as a configuration: diagnostics with positions inside the text, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;
use portcullis::diag::Source;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count() as u32 + 1;
    if let Err(e) = Config::compile(&Source::new("/nonexistent/fuzz.toml", text.to_string())) {
        for d in e.0 {
            assert!(d.line >= 1 && d.col >= 1);
            if d.file.ends_with("fuzz.toml") {
                assert!(d.line <= lines);
            }
        }
    }
});
