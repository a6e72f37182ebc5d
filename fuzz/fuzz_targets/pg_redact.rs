//! A statement that sets a password, with any text before and after it, through the
//! audit's password masking (`postgres::redact`), under each reading of
//! `standard_conforming_strings`, whole or cut.
//!
//! Properties: the masked text never holds the password (whatever the text around it
//! opens or closes: a literal, a comment, a dollar quote, a `DO` body); for a whole text,
//! masking all but settles after two passes (`PASSWORD ***` is a value the masking cannot
//! see the end of, so a second pass masks the rest, fail closed; a third keeps what the
//! second kept, at most cut at one more such keyword).
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use portcullis::postgres::redact::{passwords, passwords_cut, BACKSTOP};

const SECRET: &str = "Qz7Hunter2Qz";

/// Statements carrying `SECRET` as a password, in the forms the masking knows.
const FORMS: &[&str] = &[
    "ALTER ROLE app PASSWORD 'Qz7Hunter2Qz'",
    "ALTER ROLE app PASSWORD E'Qz7Hunter2Qz'",
    "ALTER ROLE app PASSWORD $$Qz7Hunter2Qz$$",
    "ALTER ROLE app PASSWORD $t$Qz7Hunter2Qz$t$",
    "ALTER ROLE app PASSWORD U&'Qz7Hunter2Qz'",
    "create user x with encrypted password 'Qz7Hunter2Qz' valid until 'x'",
    "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password 'Qz7Hunter2Qz')",
    "CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (sslpassword 'Qz7Hunter2Qz')",
    "SELECT dblink_connect('host=db password=Qz7Hunter2Qz dbname=x')",
    "SELECT dblink_connect('host=db password = ''Qz7Hunter2Qz'' dbname=x')",
    "SELECT dblink('postgresql://app:Qz7Hunter2Qz@db:5432/x', 'select 1')",
    "UPDATE users SET password = 'Qz7Hunter2Qz' WHERE id = 1",
    "DO $$BEGIN EXECUTE 'ALTER ROLE app PASSWORD ''Qz7Hunter2Qz'''; END$$",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let scs = match mode % 3 {
        0 => None,
        1 => Some(true),
        _ => Some(false),
    };
    let cut = mode & 0x80 != 0;

    // Any text: masking settles after two passes (a cut text's URI masked from its colon
    // to the end may find another such URI, so only a whole text's).
    if !cut {
        let once = mask(text, scs, cut);
        let twice = mask(&once, scs, cut).into_owned();
        let thrice = mask(&twice, scs, cut);
        // At most, a third pass reads a last `PASSWORD ***` as a value it cannot see the
        // end of: what it keeps is what the second kept, up to the backstop.
        let kept = thrice.strip_suffix(BACKSTOP).unwrap_or(&thrice);
        assert!(
            thrice == twice || (thrice.ends_with(BACKSTOP) && twice.starts_with(kept)),
            "{text:?} -> {once:?} -> {twice:?} -> {thrice:?}"
        );
    }

    // The text split at its first NUL: what comes before and after the statement.
    let (before, after) = text.split_once('\0').unwrap_or((text, ""));
    // A quoted identifier opened before the statement holds it as a name (`"x ALTER …`):
    // no password there. Nor may the text around already hold the secret.
    if before.contains('"') || before.contains(SECRET) || after.contains(SECRET) {
        return;
    }
    let form = FORMS[usize::from(mode >> 2) % FORMS.len()];
    let statement = format!("{before}{form}{after}");
    let masked = mask(&statement, scs, cut);
    assert!(!masked.contains(SECRET), "{statement:?} -> {masked:?}");
});

fn mask(text: &str, scs: Option<bool>, cut: bool) -> Cow<'_, str> {
    if cut {
        passwords_cut(text, scs)
    } else {
        passwords(text, scs)
    }
}
