//! Which StartupMessage parameters reach the server.
//!
//! PostgreSQL takes every startup parameter but `user`, `database`, `replication` and
//! `options` as a setting (a GUC), and `options` as a list of more (`-c name=value`), all
//! applied before the session starts and reported nowhere the proxy sees: `role=admin`
//! or `options=-c role=admin` runs the session as another role, `-c
//! default_transaction_read_only=off` lifts a guard the DBA set on the role, and
//! `search_path` makes the names in the logged text mean other objects. The same
//! settings sent as SQL (`SET ROLE`, `SET search_path`) are audited statements.
//!
//! So only an allow-list is forwarded: settings stock clients send that change how values
//! are written and read, never who the session is or what applies to it. A route may add
//! names (`startup_parameters`), never [`NEVER_FORWARDED`]. Anything else refuses the
//! session; its name (never its value) is said to the client and in the audit.

/// Forwarded by every route, lowercase (setting names are case-insensitive to PostgreSQL):
/// what libpq (`application_name`, `client_encoding`, and `datestyle`, `timezone`, `geqo`
/// from `PGDATESTYLE`, `PGTZ`, `PGGEQO`), pgjdbc (`DateStyle`, `TimeZone`,
/// `extra_float_digits`), node-postgres, tokio-postgres, asyncpg and sqlx send on their
/// own. `client_encoding` must name UTF8 (see `statements`).
pub const DEFAULT_FORWARDED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
    "geqo",
];

/// Never forwarded, whatever a route allows: they change who the session is (`role`,
/// `session_authorization`), carry any setting at all (`options`), or are not settings
/// (`user`, `database`, `replication`: read by portcullis itself).
pub const NEVER_FORWARDED: &[&str] =
    &["role", "session_authorization", "options", "user", "database", "replication"];

/// The most of a parameter's name or value an audit event or an error message keeps
/// (characters).
pub const MAX_SHOWN: usize = 128;

/// Why a startup packet's parameters refuse the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// A parameter outside the allow-list, or a non-empty `options`: its name as sent
    /// (bounded).
    Unsupported(String),
    /// A `client_encoding` other than UTF8: its value (bounded).
    Encoding(String),
    /// One setting named twice, in different cases: both names (bounded).
    Twice(String, String),
}

impl Refused {
    /// The audit `detail`: names the parameter, never its value (but the encoding's).
    pub fn detail(&self) -> String {
        match self {
            Refused::Unsupported(n) if n == "options" => "startup parameter `options` carries settings; portcullis forwards none (they are set unaudited): the client can send them as SQL `SET` once connected".to_string(),
            Refused::Unsupported(n) => format!(
                "startup parameter `{}` is not forwarded (setting it in the startup packet bypasses the audit; allowed: {}): the client can send it as SQL `SET` once connected",
                n.escape_debug(),
                DEFAULT_FORWARDED.join(", "),
            ),
            Refused::Encoding(e) => format!(
                "client_encoding `{}` requested in the startup packet; portcullis audits UTF8 sessions only",
                e.escape_debug()
            ),
            Refused::Twice(a, b) => format!(
                "startup parameter named twice, as `{}` and `{}`",
                a.escape_debug(),
                b.escape_debug()
            ),
        }
    }

    /// What the client is told after the reason code: the parameter's name only.
    pub fn shown(&self) -> Option<String> {
        match self {
            Refused::Unsupported(n) => Some(format!(
                "startup parameter `{}` is not accepted; use SET once connected",
                n.escape_debug()
            )),
            Refused::Encoding(_) | Refused::Twice(..) => None,
        }
    }
}

fn bounded(s: &str) -> String {
    s.chars().take(MAX_SHOWN).collect()
}

/// PostgreSQL's `isspace` in `pg_split_opts`: an `options` of only these sets nothing.
fn is_pg_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// The parameters to send upstream, in the client's order and spelling, with
/// `client_encoding=UTF8` added when the client named none; or why the session is
/// refused. `extra` are the route's own additions, lowercase. `user`, `database` and
/// `replication` (read by the caller) and `_pq_.*` (protocol extensions, declined) are
/// not forwarded; an empty `options` is dropped.
pub fn forwarded(
    params: &[(String, String)],
    extra: &[String],
) -> Result<Vec<(String, String)>, Refused> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in params {
        if matches!(name.as_str(), "user" | "database" | "replication") || name.starts_with("_pq_.")
        {
            continue;
        }
        if name == "options" && value.chars().all(is_pg_space) {
            continue;
        }
        let lower = name.to_ascii_lowercase();
        let allowed = !NEVER_FORWARDED.contains(&lower.as_str())
            && (DEFAULT_FORWARDED.contains(&lower.as_str()) || extra.contains(&lower));
        if !allowed {
            return Err(Refused::Unsupported(bounded(name)));
        }
        if let Some((first, _)) = out.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Err(Refused::Twice(bounded(first), bounded(name)));
        }
        if lower == "client_encoding" && !super::statements::is_utf8(value) {
            return Err(Refused::Encoding(bounded(value)));
        }
        out.push((name.clone(), value.clone()));
    }
    // Asked for explicitly, so that neither the database's default encoding nor a
    // setting of the role or the database (lower precedence) picks another.
    if !out.iter().any(|(n, _)| n.eq_ignore_ascii_case("client_encoding")) {
        out.push(("client_encoding".to_string(), "UTF8".to_string()));
    }
    Ok(out)
}

/// Sets the forwarded `application_name` to the client's with `(portcullis SID)`
/// appended (`portcullis SID` when the client sent none), the client's part cut on a
/// character boundary so the whole fits PostgreSQL's 63 bytes and the session id is
/// never the part the server cuts. As PgBouncer's `application_name_add_host`: a DBA
/// looking at `pg_stat_activity` finds the audit events of a backend.
///
/// The server keeps only printable ASCII in `application_name`: PostgreSQL 16 and later
/// write every other byte as a four-character `\xNN` escape (earlier versions as `?`)
/// before cutting the name to 63 bytes, so each such byte counts four here.
///
/// The word `portcullis` (in any case) is taken out of the client's part: the tag is then
/// the only place it appears, so a client cannot put a session id of its choosing in
/// front of the real one (`x (portcullis FORGED)`) for a reader to take as its own.
pub fn with_session_id(forwarded: &mut Vec<(String, String)>, sid: &str) {
    const MAX: usize = 63;
    let tag = format!("portcullis {sid}");
    let slot = forwarded.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case("application_name"));
    let client = slot.as_ref().map(|(_, v)| without_tag_word(v));
    let client = client.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let value = match client {
        None => tag,
        Some(app) => {
            let room = MAX.saturating_sub(tag.len() + 3);
            let (mut end, mut used) = (0, 0);
            for c in app.chars() {
                let cost = if matches!(c, ' '..='~') { 1 } else { 4 * c.len_utf8() };
                if used + cost > room {
                    break;
                }
                used += cost;
                end += c.len_utf8();
            }
            format!("{} ({tag})", app[..end].trim_end())
        }
    };
    match slot {
        Some((_, v)) => *v = value,
        None => forwarded.push(("application_name".to_string(), value)),
    }
}

/// `s` without the word `portcullis` in any letter case, removed until none is left
/// (taking one out may join the letters around it into another).
fn without_tag_word(s: &str) -> String {
    const WORD: &str = "portcullis";
    let mut out = s.to_string();
    // ASCII case folding keeps byte offsets, so a match in the folded copy is one in `out`.
    while let Some(at) = out.to_ascii_lowercase().find(WORD) {
        out.replace_range(at..at + WORD.len(), "");
    }
    out
}

/// Why a route may not add `name` to its `startup_parameters` (`None`: it may).
pub fn extra_name_error(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let shaped = lower.len() <= 63
        && lower.split('.').all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        });
    if !shaped {
        return Some(format!(
            "`{}` is not a PostgreSQL setting name (letters, digits, `_`, `$`, dotted for extensions; at most 63 bytes)",
            bounded(name).escape_debug()
        ));
    }
    if lower.starts_with("_pq_.") {
        return Some(format!("`{name}` is a protocol extension, not a setting"));
    }
    match lower.as_str() {
        "role" | "session_authorization" => Some(format!(
            "`{name}` can never be forwarded: it would run the session as another role than the one the policy granted, unaudited"
        )),
        "options" => Some(
            "`options` can never be forwarded: it carries any setting (`-c role=…`); list the settings themselves"
                .to_string(),
        ),
        "user" | "database" | "replication" => Some(format!(
            "`{name}` is read by portcullis itself, not forwarded as a setting"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    #[test]
    fn what_stock_clients_send_is_forwarded_with_utf8_added() {
        // pgjdbc's startup packet.
        let jdbc = p(&[
            ("user", "app"),
            ("database", "appdb"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "Europe/Berlin"),
            ("extra_float_digits", "3"),
            ("application_name", "PostgreSQL JDBC Driver"),
        ]);
        assert_eq!(forwarded(&jdbc, &[]), Ok(jdbc[2..].to_vec()));
        // libpq (psql with PGDATESTYLE, PGTZ, PGGEQO set, and an empty PGOPTIONS), asyncpg's
        // quoted encoding, a protocol extension and `replication=false`.
        let libpq = p(&[
            ("user", "app"),
            ("database", "appdb"),
            ("options", " \t"),
            ("application_name", "psql"),
            ("client_encoding", "'utf-8'"),
            ("datestyle", "ISO, MDY"),
            ("timezone", "UTC"),
            ("geqo", "off"),
            ("IntervalStyle", "iso_8601"),
            ("replication", "false"),
            ("_pq_.something", "x"),
        ]);
        let got = forwarded(&libpq, &[]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(got, libpq[3..9].to_vec());
        // tokio-postgres, naming no encoding: UTF8 is asked for.
        let bare = p(&[("user", "app"), ("database", "appdb")]);
        assert_eq!(forwarded(&bare, &[]), Ok(p(&[("client_encoding", "UTF8")])));
    }

    #[test]
    fn settings_that_change_the_role_or_guards_refuse_the_session_by_name() {
        for (name, value) in [
            ("options", "-c role=app_owner -c default_transaction_read_only=off"),
            ("options", "--search_path=evil"),
            ("role", "app_owner"),
            ("ROLE", "app_owner"),
            ("session_authorization", "postgres"),
            ("default_transaction_read_only", "off"),
            ("search_path", "pg_temp,public"),
            ("statement_timeout", "0"),
            ("app.tenant_id", "42"),
            ("User", "postgres"),
            ("Options", "-c role=x"),
        ] {
            let params = p(&[("user", "app"), ("application_name", "x"), (name, value)]);
            let err = forwarded(&params, &[]);
            assert_eq!(err, Err(Refused::Unsupported(name.to_string())), "{name}");
            let e = Refused::Unsupported(name.to_string());
            let said = format!("{} {:?}", e.detail(), e.shown());
            assert!(said.contains(name), "{said}");
            assert!(!said.contains(value), "the value is never quoted: {said}");
        }
    }

    #[test]
    fn a_route_may_add_names_but_never_the_role_or_options() {
        let params = p(&[("user", "app"), ("Search_Path", "app, public")]);
        let extra = vec!["search_path".to_string()];
        assert_eq!(
            forwarded(&params, &extra),
            Ok(p(&[("Search_Path", "app, public"), ("client_encoding", "UTF8")]))
        );
        // Even if a list got there unchecked, these stay refused.
        for name in ["role", "options", "session_authorization"] {
            let params = p(&[(name, "x")]);
            assert_eq!(
                forwarded(&params, &[name.to_string()]),
                Err(Refused::Unsupported(name.to_string()))
            );
            assert!(extra_name_error(name).is_some(), "{name}");
            assert!(extra_name_error(&name.to_ascii_uppercase()).is_some(), "{name}");
        }
        for bad in ["", "a b", "-c", "x=y", "1abc", "_pq_.x", "user", "a..b", &"x".repeat(64)] {
            assert!(extra_name_error(bad).is_some(), "{bad:?}");
        }
        for good in ["search_path", "statement_timeout", "app.tenant_id", "lc_monetary"] {
            assert_eq!(extra_name_error(good), None, "{good}");
        }
    }

    #[test]
    fn encodings_and_case_variants_are_checked_whatever_the_spelling() {
        let params = p(&[("CLIENT_ENCODING", "SJIS")]);
        assert_eq!(forwarded(&params, &[]), Err(Refused::Encoding("SJIS".into())));
        let params = p(&[("Client_Encoding", "unicode")]);
        assert_eq!(forwarded(&params, &[]), Ok(params.clone()), "no second client_encoding");
        let params = p(&[("TimeZone", "UTC"), ("timezone", "Asia/Tokyo")]);
        assert_eq!(
            forwarded(&params, &[]),
            Err(Refused::Twice("TimeZone".into(), "timezone".into()))
        );
        let long = "x".repeat(1000);
        let params = p(&[(long.as_str(), "v")]);
        let Err(Refused::Unsupported(n)) = forwarded(&params, &[]) else { panic!("refused") };
        assert_eq!(n.len(), MAX_SHOWN);
    }

    #[test]
    fn the_session_id_is_appended_to_the_application_name_within_63_bytes() {
        let sid = "0123456789abcdef0123";
        let mut f = vec![("application_name".to_string(), "psql".to_string())];
        with_session_id(&mut f, sid);
        assert_eq!(f, vec![("application_name".into(), format!("psql (portcullis {sid})"))]);

        let mut f = vec![("client_encoding".to_string(), "UTF8".to_string())];
        with_session_id(&mut f, sid);
        assert_eq!(f[1], ("application_name".into(), format!("portcullis {sid}")));

        // A long name (multi-byte at the cut) is shortened, never the session id.
        let long = "é".repeat(40);
        let mut f = vec![("Application_Name".to_string(), long)];
        with_session_id(&mut f, sid);
        let v = &f[0].1;
        assert!(v.len() <= 63, "{} bytes: {v}", v.len());
        assert!(v.ends_with(&format!("(portcullis {sid})")), "{v}");
        assert!(v.starts_with("éé"), "{v}");
        // As PostgreSQL 16+ shows it (`pg_clean_ascii`: a byte outside printable ASCII as
        // `\xNN`), cut to 63 bytes: the session id is still there, also after a tab.
        for app in ["é".repeat(40), format!("app\t{}", "ü".repeat(12)), "日本".repeat(20)] {
            let mut f = vec![("application_name".to_string(), app)];
            with_session_id(&mut f, sid);
            let shown: String = f[0]
                .1
                .bytes()
                .map(|b| match b {
                    b' '..=b'~' => (b as char).to_string(),
                    b => format!("\\x{b:02x}"),
                })
                .collect();
            assert!(shown.len() <= 63, "{} bytes: {shown}", shown.len());
            assert!(shown.ends_with(&format!("(portcullis {sid})")), "{shown}");
        }
    }

    #[test]
    fn a_client_cannot_put_a_session_id_of_its_own_before_the_real_one() {
        let sid = "0123456789abcdef0123";
        let forged = "ffffffffffffffffffff";
        for (app, expect) in [
            (format!("job (portcullis {forged})"), format!("job ( {forged}) (portcullis {sid})")),
            (format!("PortCullis {forged}"), format!("{forged} (portcullis {sid})")),
            // Taking one word out joins the letters around it into another.
            ("portportcullisCULLIS x".to_string(), format!("x (portcullis {sid})")),
            ("portcullis".to_string(), format!("portcullis {sid}")),
        ] {
            let mut f = vec![("application_name".to_string(), app.clone())];
            with_session_id(&mut f, sid);
            assert_eq!(f[0].1, expect, "{app}");
            let v = f[0].1.to_ascii_lowercase();
            assert_eq!(v.matches("portcullis").count(), 1, "{app}: {}", f[0].1);
        }
    }
}
