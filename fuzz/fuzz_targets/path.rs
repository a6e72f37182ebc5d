//! Path normalization is idempotent, never yields an ambiguous path, and yields a path
//! that a policy may write as a pattern.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::path::{check_pattern, normalize, Syntax};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(p) = normalize(raw) {
        assert_eq!(normalize(&p).as_deref(), Ok(&*p));
        assert!(!p.contains("/../") && !p.ends_with("/..") && !p.contains('\\'));
        assert!(!p.to_ascii_lowercase().contains("%2f"));
        assert_eq!(check_pattern(&p, Syntax::Literal), Ok(()));
    }
});
