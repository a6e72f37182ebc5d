//! Path normalization is idempotent and never yields an ambiguous path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(p) = normalize(raw) {
        assert_eq!(normalize(&p).as_deref(), Ok(p.as_str()));
        assert!(!p.contains("/../") && !p.ends_with("/..") && !p.contains('\\'));
        assert!(!p.to_ascii_lowercase().contains("%2f"));
    }
});
