//! Any text as a policy file: diagnostics or a policy, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::diag::Source;
use portcullis::identity::Preset;
use portcullis::policy::{Catalog, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let catalog = Catalog {
        issuers: [
            ("bb".to_string(), Preset::BitbucketPipelines),
            ("corp".to_string(), Preset::Oidc),
        ]
        .into_iter()
        .collect(),
    };
    let _ = Policy::parse(&Source::new("fuzz.toml", text.to_string()), &catalog);
});
