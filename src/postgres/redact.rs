//! Passwords written into SQL text are masked before a statement reaches the audit log.
//!
//! `ALTER ROLE app PASSWORD 'secret'`, `CREATE USER MAPPING … OPTIONS (password 'secret')`
//! and a connection string with `password=secret` (dblink, postgres_fdw) carry a
//! password in the statement itself; the audit log must never hold one.
//!
//! The text is split into tokens by PostgreSQL's own lexer rules (`scan.l`): whitespace is
//! space, `\t`, `\n`, `\r`, `\f` and `\v`; `--` comments end at `\n` or `\r`; `/* */`
//! comments nest; `''` is a quote inside a literal; `E'…'` takes backslash escapes;
//! `U&'…'` (and `U&"…"`) takes Unicode escapes, with `UESCAPE`; a dollar quote's tag is an
//! identifier, non-ASCII letters included; string constants separated by whitespace
//! holding a newline are one constant. Every string constant, dollar-quoted body and
//! comment is decoded and scanned the same way in turn, so a statement built inside a
//! `DO` block or an `EXECUTE '…'` is masked too.
//!
//! Wherever the keyword `password` (or `sslpassword`) stands as a whole word (a bare or
//! quoted identifier), the value after it is masked when its end is certain: a string
//! constant (`***`), or a connection-string value after `=`. When it is not certain (the
//! value is built by `format()`, concatenated, a `%L` placeholder, the keyword ends a
//! literal, an unknown token follows, a word is glued to the value's closing quote, …)
//! everything after the keyword, to the end of the text, is replaced with [`BACKSTOP`]:
//! masking fails closed. A password sent as a Bind parameter never reaches the log at
//! all (parameters are not logged).

use std::borrow::Cow;
use std::collections::BTreeMap;

/// What replaces a secret whose extent is known.
const MASK: &str = "***";
/// What replaces everything after a keyword whose secret's extent is not known.
pub const BACKSTOP: &str = " *** (masked to the end)";
/// How deep literals within literals are decoded; deeper, a suspect literal masks the rest.
const MAX_DEPTH: usize = 8;

/// `text` with every password masked; borrowed when there is none.
///
/// `scs`: the session's `standard_conforming_strings` when the server lexed the text, as
/// it reported it (`None`: not known). It decides how the statement's own plain `'…'`
/// literals are read: `on`, a backslash is a character; `off`, an escape (as in
/// `E'…'`); unknown, both readings are checked and a backslash that would matter masks
/// the rest. Literals nested in the statement (a function body, an `EXECUTE` string) are
/// lexed by the server later, under a setting that may have changed by then, so they
/// are always read both ways.
pub fn passwords(text: &str, scs: Option<bool>) -> Cow<'_, str> {
    masked(text, scs, false)
}

/// [`passwords`] of a text the audit cut short (64 KiB, the session's text budget, an
/// encoding it could not be sure of): a URI whose `user:` part runs to the cut had its
/// `@` cut off, so everything after that colon may be the start of a password, and is
/// masked.
pub fn passwords_cut(text: &str, scs: Option<bool>) -> Cow<'_, str> {
    masked(text, scs, true)
}

fn masked(text: &str, scs: Option<bool>, cut: bool) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut scan =
        Scan { text: bytes, masks: BTreeMap::new(), values: Vec::new(), backstop: None, scs };
    for (start, end) in uri_passwords(bytes, cut) {
        scan.mask(start, end);
    }
    if may_hide_keyword(bytes) {
        let top = View { bytes: Cow::Borrowed(bytes), map: Map::Shift(0) };
        scan.region(&top, Ctx::Top, 0);
    }
    scan.render(text)
}

/// Whether the text could hold a keyword, plainly or behind an escape (`E'\x70…'`,
/// `U&'\0070…'`, a backslash in a literal under `standard_conforming_strings = off`), or
/// split by a continuation (`'pass'\n'word'`).
fn may_hide_keyword(bytes: &[u8]) -> bool {
    bytes.contains(&b'\\')
        || bytes.contains(&b'&')
        || (bytes.contains(&b'\'') && bytes.iter().any(|c| matches!(c, b'\n' | b'\r')))
        || bytes.windows(8).any(|w| w.eq_ignore_ascii_case(b"password"))
}

struct Scan<'t> {
    text: &'t [u8],
    /// Byte ranges of `text` to replace with [`MASK`], start to end; overlapping ranges
    /// are merged.
    masks: BTreeMap<usize, usize>,
    /// Each value masked after a keyword: its byte range in `text`, and the keyword's end.
    values: Vec<(usize, usize, usize)>,
    /// Where [`BACKSTOP`] starts: the earliest end of an unresolved keyword.
    backstop: Option<usize>,
    /// `standard_conforming_strings` for the statement's own literals, if known.
    scs: Option<bool>,
}

/// Where a region of bytes sits in the statement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ctx {
    /// The statement itself.
    Top,
    /// The body of a comment.
    Comment,
    /// The decoded body of a string constant or of a dollar quote: text that other code
    /// may concatenate, `format()` or `EXECUTE`.
    Literal,
}

/// Bytes to scan, and where each of them came from in the statement.
struct View<'t> {
    bytes: Cow<'t, [u8]>,
    map: Map,
}

enum Map {
    /// `bytes[k]` is `text[k + n]`.
    Shift(usize),
    /// `bytes[k]` came from `text[table[k]]`; one more entry for the end.
    Table(Vec<usize>),
}

impl View<'_> {
    /// The statement offset of `bytes[k]` (`k == len`: just past the last byte).
    fn raw(&self, k: usize) -> usize {
        match &self.map {
            Map::Shift(n) => n + k,
            Map::Table(t) => t.get(k).or(t.last()).copied().unwrap_or(0),
        }
    }

    /// The first `k` whose byte came from statement offset `raw` or later (`len` if
    /// none): the inverse of `View::raw`, which never decreases.
    fn local(&self, raw: usize) -> usize {
        let k = match &self.map {
            Map::Shift(n) => raw.saturating_sub(*n),
            Map::Table(t) => t.partition_point(|&r| r < raw),
        };
        k.min(self.bytes.len())
    }
}

impl<'t> Scan<'t> {
    fn mask(&mut self, mut start: usize, mut end: usize) {
        if start >= end {
            return;
        }
        // Merge with the ranges it overlaps: the one starting before it, those inside.
        if let Some((&s, &e)) = self.masks.range(..=start).next_back() {
            if e > start {
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.masks.range(start..end).next() {
            self.masks.remove(&s);
            end = end.max(e);
        }
        self.masks.insert(start, end);
    }

    /// Masks the value after a keyword ending at `kw_end`, remembering it for the checks
    /// of the comments around it.
    fn mask_value(&mut self, start: usize, end: usize, kw_end: usize) {
        self.values.push((start, end, kw_end));
        self.mask(start, end);
    }

    /// Whether masking `text[start..end]` leaves where block comment `tok` of `view` ends
    /// as it was. PostgreSQL finds a comment's end by counting every `/*` and `*/` in it,
    /// whatever literal or operator they sit in for this module's lexer of its body: a
    /// value holding one, or next to a `/` that would pair with the mask's `*`, moves the
    /// end once masked, and the next reading of the masked text finds another value.
    fn keeps_comment(&self, view: &View<'_>, tok: Token, start: usize, end: usize) -> bool {
        let b = &view.bytes[..];
        let (from, to) = (view.local(start).max(tok.start), view.local(end).min(tok.end));
        let delimiter = |w: &[u8]| w == b"/*" || w == b"*/";
        let window = &b[from.saturating_sub(1)..(to + 1).min(b.len())];
        !(window.windows(2).any(delimiter)
            || (from > 0 && b[from - 1] == b'/')
            || b.get(to) == Some(&b'/'))
    }

    /// Whether a region's plain literals were lexed as the server lexed them: the
    /// statement's own, with the setting known.
    fn scs_known(&self, ctx: Ctx) -> bool {
        ctx == Ctx::Top && self.scs.is_some()
    }

    fn give_up_after(&mut self, at: usize) {
        self.backstop = Some(self.backstop.map_or(at, |b| b.min(at)));
    }

    fn covered(&self, start: usize, end: usize) -> bool {
        self.masks.range(..=start).next_back().is_some_and(|(_, &e)| end <= e)
            || self.backstop.is_some_and(|b| b <= start)
    }

    /// Scans one region. Returns the end of a keyword whose value reaches the region's
    /// end (it might go on outside it, so the caller checks what follows).
    fn region(&mut self, view: &View<'_>, ctx: Ctx, depth: usize) -> Option<usize> {
        let b = &view.bytes[..];
        let toks = lex(b, ctx == Ctx::Top && self.scs == Some(false));
        // strings_after[t]: a string constant is among toks[t..].
        let mut strings_after = vec![false; toks.len() + 1];
        for t in (0..toks.len()).rev() {
            strings_after[t] = strings_after[t + 1] || toks[t].kind.is_string();
        }
        let mut open_end = None;
        for (t, &tok) in toks.iter().enumerate() {
            let (raw_start, raw_end) = (view.raw(tok.start), view.raw(tok.end));
            if self.covered(raw_start, raw_end) {
                continue;
            }
            match tok.kind {
                Kind::Ident | Kind::QIdent { .. } if is_keyword_token(b, &toks, t) => {
                    if let Some(o) = self.keyword(view, &toks, t, ctx, strings_after[t + 1]) {
                        open_end.get_or_insert(o);
                    }
                }
                Kind::Str { .. } | Kind::Dollar { .. } | Kind::Comment { .. } => {
                    if !may_hide_keyword(&b[tok.start..tok.end]) {
                        continue; // decoding cannot make a keyword appear
                    }
                    if depth >= MAX_DEPTH {
                        self.give_up_after(raw_start);
                        continue;
                    }
                    let (child, child_ctx) = self.child(view, &toks, t);
                    // A comment between continued constants (`'a' -- …\n'b'`) is whitespace
                    // to PostgreSQL, not part of the decoded value: a keyword there (more
                    // in the token than in either reading of the value) masks the rest.
                    if matches!(tok.kind, Kind::Str { .. })
                        && keywords(&b[tok.start..tok.end])
                            > keywords(&child.bytes)
                                .max(keywords(&decode_str(b, tok, Quote::E, b'\\').0))
                    {
                        self.give_up_after(raw_start);
                    }
                    if let (Kind::Str { quote: Quote::Std, .. }, false) =
                        (tok.kind, self.scs_known(ctx))
                    {
                        // With standard_conforming_strings off, backslashes escape here too.
                        if b[tok.start..tok.end].contains(&b'\\')
                            && !has_keyword(&child.bytes)
                            && has_keyword(&decode_str(b, tok, Quote::E, b'\\').0)
                        {
                            self.give_up_after(raw_start);
                        }
                    }
                    let values = self.values.len();
                    let inner = self.region(&child, child_ctx, depth + 1);
                    if let Kind::Comment { block: true, .. } = tok.kind {
                        for k in values..self.values.len() {
                            let (start, end, kw_end) = self.values[k];
                            if !self.keeps_comment(view, tok, start, end) {
                                self.give_up_after(kw_end);
                            }
                        }
                    }
                    // A comment unterminated, or a line comment without its newline, runs
                    // to the end of this region: in a literal, a keyword ending it ends
                    // the literal.
                    let comment_to_end = match tok.kind {
                        Kind::Comment { block: true, closed } => !closed,
                        Kind::Comment { block: false, .. } => tok.end == b.len(),
                        _ => false,
                    };
                    if let (Some(kw_end), Ctx::Comment, true) = (inner, child_ctx, comment_to_end) {
                        match ctx {
                            Ctx::Literal => self.give_up_after(kw_end),
                            Ctx::Comment => {
                                open_end.get_or_insert(kw_end);
                            }
                            Ctx::Top => {}
                        }
                    }
                    if let (Some(kw_end), Ctx::Literal) = (inner, child_ctx) {
                        match ends_value(b, &toks, t) {
                            End::Clean => {}
                            End::Region if ctx == Ctx::Literal => {
                                open_end.get_or_insert(kw_end);
                            }
                            End::Region => {}
                            End::Unsure => self.give_up_after(kw_end),
                        }
                    }
                }
                // In a literal (a connection string), `"` is an ordinary character to libpq:
                // what lexes as a quoted identifier there may hold `password=…`.
                Kind::QIdent { .. }
                    if ctx == Ctx::Literal
                        && b[tok.start..tok.end]
                            .windows(8)
                            .any(|w| w.eq_ignore_ascii_case(b"password")) =>
                {
                    self.give_up_after(raw_start);
                }
                // `PASSWORD$$x$$` and `PASSWORD\u{a0}'x'` are one identifier to PostgreSQL
                // (a syntax error), but the secret is in the text all the same.
                Kind::Ident => {
                    if let Some(len) = glued_keyword(&b[tok.start..tok.end]) {
                        self.give_up_after(view.raw(tok.start + len));
                    }
                }
                _ => {}
            }
        }
        open_end
    }

    /// The decoded body of string, dollar-quote or comment token `t`, and its context.
    fn child(&self, view: &View<'_>, toks: &[Token], t: usize) -> (View<'t>, Ctx) {
        let tok = toks[t];
        let b = &view.bytes[..];
        let (start, end, ctx) = match tok.kind {
            Kind::Str { quote, .. } => {
                let esc = if quote == Quote::U { uescape(b, toks, t) } else { b'\\' };
                let (bytes, local) = decode_str(b, tok, quote, esc);
                let table = local.iter().map(|&k| view.raw(k)).collect();
                return (View { bytes: Cow::Owned(bytes), map: Map::Table(table) }, Ctx::Literal);
            }
            Kind::Dollar { tag, closed } => {
                (tok.start + tag, if closed { tok.end - tag } else { tok.end }, Ctx::Literal)
            }
            Kind::Comment { block, closed } => {
                let end = if block && closed { tok.end - 2 } else { tok.end };
                (tok.start + 2, end, Ctx::Comment)
            }
            _ => (tok.start, tok.start, Ctx::Comment),
        };
        let end = end.max(start);
        let child = match (&view.map, &view.bytes) {
            (Map::Shift(n), _) => View {
                bytes: Cow::Borrowed(self.text.get(n + start..n + end).unwrap_or_default()),
                map: Map::Shift(n + start),
            },
            (Map::Table(table), bytes) => View {
                bytes: Cow::Owned(bytes[start..end].to_vec()),
                map: Map::Table(table.get(start..=end).unwrap_or_default().to_vec()),
            },
        };
        (child, ctx)
    }

    /// Masks the value after the keyword `toks[k]`, or gives up after the keyword.
    /// `later`: a string constant follows in the region. Returns the keyword's end if
    /// the value reaches the end of a literal region.
    fn keyword(
        &mut self,
        view: &View<'_>,
        toks: &[Token],
        k: usize,
        ctx: Ctx,
        later: bool,
    ) -> Option<usize> {
        let b = &view.bytes[..];
        let kw_end = view.raw(toks[k].end);
        let Some(n) = next_sig(toks, k) else {
            // Nothing follows: in a literal, the value is concatenated or a format argument;
            // an unterminated comment may hold it (`PASSWORD /* 'x'`).
            if ctx == Ctx::Literal || toks[k + 1..].iter().any(|t| !t.kind.closed()) {
                self.give_up_after(kw_end);
            }
            // The keyword ends the comment: if the comment runs to the end of a literal,
            // the value may follow the literal (the caller checks).
            return (ctx == Ctx::Comment).then_some(kw_end);
        };
        let next = toks[n];
        let text = &b[next.start..next.end];
        let word = |w: &[u8]| next.kind == Kind::Ident && text.eq_ignore_ascii_case(w);
        if next.kind.is_string() {
            return self.value(view, toks, n, ctx, kw_end);
        }
        if next.kind == Kind::Op && matches!(text, b"=" | b":=") {
            if ctx != Ctx::Top {
                return self.conninfo(view, next.end, kw_end);
            }
            // `SET password = 'x'`; `= $1` and `= NULL` hold no secret.
            match next_sig(toks, n) {
                Some(v) if toks[v].kind.is_string() => {
                    return self.value(view, toks, v, ctx, kw_end);
                }
                Some(v) => {
                    let value = toks[v];
                    let text = &b[value.start..value.end];
                    let placeholder = value.kind == Kind::Param
                        || (value.kind == Kind::Ident
                            && (text.eq_ignore_ascii_case(b"null")
                                || text.eq_ignore_ascii_case(b"default")));
                    if !placeholder {
                        self.give_up_after(kw_end);
                    }
                }
                None => self.give_up_after(kw_end),
            }
            return None;
        }
        // `PASSWORD NULL`; the keyword as a column (`SELECT password FROM t`).
        if word(b"null")
            || word(b"from")
            || word(b"as")
            || (next.kind == Kind::Punct && text == b";")
        {
            return None;
        }
        // In the statement itself, a column list (`INSERT INTO t (name, password) …`), a
        // column definition or a comparison: no secret unless a literal follows.
        let listish =
            next.kind == Kind::Ident || (next.kind == Kind::Punct && matches!(text, b"," | b")"));
        if !(ctx == Ctx::Top && listish && !later) {
            self.give_up_after(kw_end);
        }
        None
    }

    /// Masks the string constants from `toks[n]` on (a value and whatever constants
    /// follow it); then the value must visibly end.
    fn value(
        &mut self,
        view: &View<'_>,
        toks: &[Token],
        n: usize,
        ctx: Ctx,
        kw_end: usize,
    ) -> Option<usize> {
        let b = &view.bytes[..];
        let mut last;
        let mut i = n;
        loop {
            let tok = toks[i];
            if !tok.kind.closed() {
                if ctx == Ctx::Literal {
                    self.give_up_after(kw_end);
                    return None;
                }
                self.mask_value(view.raw(toks[n].start), view.raw(b.len()), kw_end);
                // In a comment, the value reaches its end: the caller checks what follows.
                return (ctx == Ctx::Comment).then_some(kw_end);
            }
            if let (Kind::Str { quote: Quote::Std, prefix, .. }, false) =
                (tok.kind, self.scs_known(ctx))
            {
                // With standard_conforming_strings off, `\'` would not end it here.
                if b[tok.start..tok.end].contains(&b'\\')
                    && lex_str(b, tok.start, prefix, Quote::E).end != tok.end
                {
                    self.give_up_after(kw_end);
                    return None;
                }
            }
            last = i;
            // `U&'…' UESCAPE '!'`, and constants that follow (a continuation PostgreSQL
            // would reject without its newline still holds part of the secret).
            let Some(j) = next_sig(toks, i) else { break };
            let is_uescape = toks[j].kind == Kind::Ident
                && b[toks[j].start..toks[j].end].eq_ignore_ascii_case(b"uescape");
            if toks[j].kind.is_string() {
                i = j;
            } else if is_uescape && next_sig(toks, j).is_some_and(|s| toks[s].kind.is_string()) {
                i = next_sig(toks, j).unwrap_or(j);
            } else {
                break;
            }
        }
        self.mask_value(view.raw(toks[n].start), view.raw(toks[last].end), kw_end);
        if ctx == Ctx::Literal && b[toks[n].start..toks[last].end].contains(&b'%') {
            // A format() template: `PASSWORD ''%s''`; the secret is an argument.
            self.give_up_after(kw_end);
            return None;
        }
        match ends_value(b, toks, last) {
            End::Clean => None,
            End::Region if ctx == Ctx::Literal => Some(kw_end),
            End::Region => None,
            End::Unsure => {
                self.give_up_after(kw_end);
                None
            }
        }
    }

    /// Masks a connection-string value after `=` (at `from`): bare (to whitespace, `\`
    /// escaping) or single-quoted (`\'` and `\\` escaping).
    fn conninfo(&mut self, view: &View<'_>, from: usize, kw_end: usize) -> Option<usize> {
        let b = &view.bytes[..];
        let mut i = from;
        while b.get(i).is_some_and(|c| is_space(*c)) {
            i += 1;
        }
        if i >= b.len() {
            self.give_up_after(kw_end); // `'password=' || secret`
            return None;
        }
        if b[i] == b'\'' {
            let mut j = i + 1;
            while j < b.len() {
                match b[j] {
                    b'\\' => j += 2,
                    b'\'' if b[i..j].contains(&b'%') => break, // a format() template
                    b'\'' if self.ends_masked(view, j + 1) => break,
                    b'\'' => {
                        self.mask_value(view.raw(i), view.raw(j + 1), kw_end);
                        return self.after_conninfo(b, j + 1, kw_end);
                    }
                    _ => j += 1,
                }
            }
            self.give_up_after(kw_end);
            return None;
        }
        let mut j = i;
        while j < b.len() && !is_space(b[j]) {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        let j = j.min(b.len());
        if b[i..j].iter().any(|c| matches!(c, b'(' | b')' | b'|' | b'%'))
            || self.ends_masked(view, j)
        {
            // SQL rather than a connection string (`password = crypt('…', …)`), or a
            // format() template (`password=%s`).
            self.give_up_after(kw_end);
            return None;
        }
        self.mask_value(view.raw(i), view.raw(j), kw_end);
        self.after_conninfo(b, j, kw_end)
    }

    /// Whether what ends a connection-string value, the byte at `j`, is inside a URI's
    /// password already masked: masked with it, the value would run on past it.
    fn ends_masked(&self, view: &View<'_>, j: usize) -> bool {
        j < view.bytes.len() && self.covered(view.raw(j), view.raw(j) + 1)
    }

    /// After a connection-string value ending at `j`: the next keyword, or the end.
    fn after_conninfo(&mut self, b: &[u8], mut j: usize, kw_end: usize) -> Option<usize> {
        let value_end = j;
        // Anything glued to a quoted value (`password='',x`) reads, once the value is
        // `***`, as part of a bare value: its end would move.
        if b.get(j).is_some_and(|c| !is_space(*c)) {
            self.give_up_after(kw_end);
            return None;
        }
        while j < b.len() {
            let tok = token(b, j, false);
            if !matches!(tok.kind, Kind::Space | Kind::Comment { .. }) {
                // A word glued to a quoted value (`password=''pw''`) may be the secret.
                let glued = tok.kind == Kind::Ident && tok.start == value_end;
                if glued || matches!(classify(b, tok), End::Unsure) {
                    self.give_up_after(kw_end); // `password=''a'' || ''b''`
                }
                return None;
            }
            j = tok.end.max(j + 1);
        }
        Some(kw_end)
    }

    fn render<'a>(self, text: &'a str) -> Cow<'a, str> {
        if self.masks.is_empty() && self.backstop.is_none() {
            return Cow::Borrowed(text);
        }
        let cut = self.backstop.map_or(text.len(), |b| floor_boundary(text, b));
        let mut out = String::with_capacity(text.len());
        let mut copied = 0; // bytes of `text` already in `out`
        for (&start, &end) in &self.masks {
            let (start, end) = (floor_boundary(text, start), ceil_boundary(text, end));
            if start >= cut {
                break;
            }
            if end <= copied {
                continue; // inside a span already masked
            }
            out.push_str(text.get(copied..start.max(copied)).unwrap_or_default());
            if self.backstop.is_some() && end >= cut {
                copied = cut; // the backstop stands for this mask too
                break;
            }
            if start >= copied {
                out.push_str(MASK);
            }
            copied = end;
        }
        if self.backstop.is_some() {
            out.push_str(text.get(copied.min(cut)..cut).unwrap_or_default());
            out.push_str(BACKSTOP);
        } else {
            out.push_str(text.get(copied..).unwrap_or_default());
        }
        Cow::Owned(out)
    }
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The length of the keyword an identifier starts with, glued to `$` or a non-ASCII byte.
fn glued_keyword(word: &[u8]) -> Option<usize> {
    [&b"password"[..], b"sslpassword"].into_iter().map(<[u8]>::len).find(|&len| {
        word.len() > len && is_keyword(&word[..len]) && (word[len] == b'$' || word[len] >= 0x80)
    })
}

fn is_keyword(word: &[u8]) -> bool {
    word.eq_ignore_ascii_case(b"password") || word.eq_ignore_ascii_case(b"sslpassword")
}

/// Whether `bytes` hold `password` not inside a longer ASCII word.
fn has_keyword(bytes: &[u8]) -> bool {
    keywords(bytes) > 0
}

/// How many times a keyword (`password`, `sslpassword`) stands as a whole word in `bytes`.
fn keywords(bytes: &[u8]) -> usize {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let starts_word = |i: usize| i == 0 || !word(&bytes[i - 1]);
    (0..bytes.len().saturating_sub(7))
        .filter(|&i| {
            let ssl = i >= 3 && bytes[i - 3..i].eq_ignore_ascii_case(b"ssl") && starts_word(i - 3);
            bytes[i..i + 8].eq_ignore_ascii_case(b"password")
                && (starts_word(i) || ssl)
                && bytes.get(i + 8).is_none_or(|b| !word(b))
        })
        .count()
}

/// How what follows token `t` bears on a value that ends with it.
enum End {
    /// Something that ends an expression: `;`, `,`, `)`, a word, `::`.
    Clean,
    /// The region ends: the enclosing region decides.
    Region,
    /// An operator or anything else: the value may go on.
    Unsure,
}

fn ends_value(b: &[u8], toks: &[Token], t: usize) -> End {
    match next_sig(toks, t) {
        // A word glued to the closing quote (`''pw''`: a literal that was meant to hold
        // quotes, closed too early) may be the secret itself.
        Some(n) if toks[n].kind == Kind::Ident && toks[n].start == toks[t].end => End::Unsure,
        Some(n) => classify(b, toks[n]),
        None => End::Region,
    }
}

fn classify(b: &[u8], tok: Token) -> End {
    match (tok.kind, &b[tok.start..tok.end]) {
        (Kind::Punct, b";" | b"," | b")") | (Kind::Ident, _) | (Kind::Op, b"::") => End::Clean,
        _ => End::Unsure,
    }
}

fn next_sig(toks: &[Token], t: usize) -> Option<usize> {
    (t + 1..toks.len()).find(|&i| !matches!(toks[i].kind, Kind::Space | Kind::Comment { .. }))
}

// ---- The lexer: PostgreSQL's scan.l, as far as finding tokens' ends goes. ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Quote {
    /// `'…'`, `N'…'`, `B'…'`, `X'…'`: `''` is a quote.
    Std,
    /// `E'…'`: backslash escapes too.
    E,
    /// `U&'…'`: Unicode escapes.
    U,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Space,
    Comment {
        block: bool,
        closed: bool,
    },
    Ident,
    /// `"…"` (`prefix` 1) or `U&"…"` (`prefix` 3).
    QIdent {
        prefix: usize,
    },
    /// `prefix`: bytes before the opening quote (`E`, `U&`).
    Str {
        quote: Quote,
        prefix: usize,
        closed: bool,
    },
    /// `tag`: the delimiter's length, `$$` included.
    Dollar {
        tag: usize,
        closed: bool,
    },
    Param,
    Number,
    Op,
    Punct,
}

impl Kind {
    fn is_string(self) -> bool {
        matches!(self, Kind::Str { .. } | Kind::Dollar { .. })
    }

    fn closed(self) -> bool {
        match self {
            Kind::Str { closed, .. }
            | Kind::Dollar { closed, .. }
            | Kind::Comment { closed, .. } => closed,
            _ => true,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// PostgreSQL's whitespace: space, `\t`, `\n`, `\r`, `\f`, `\v`.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

fn is_op(c: u8) -> bool {
    b"~!@#^&|`?+-*/%<>=:".contains(&c)
}

/// `escapes`: `standard_conforming_strings` is off, so `'…'` and `N'…'` take backslash
/// escapes as `E'…'` does.
fn lex(b: &[u8], escapes: bool) -> Vec<Token> {
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let tok = token(b, i, escapes);
        i = tok.end.max(i + 1);
        toks.push(Token { end: i, ..tok });
    }
    toks
}

fn token(b: &[u8], i: usize, escapes: bool) -> Token {
    let plain = if escapes { Quote::E } else { Quote::Std };
    let at = |k: usize| b.get(k).copied().unwrap_or(0);
    let tok = |kind, end| Token { kind, start: i, end };
    let c = b[i];
    match c {
        _ if is_space(c) => {
            let end = (i..b.len()).find(|&k| !is_space(b[k])).unwrap_or(b.len());
            tok(Kind::Space, end)
        }
        b'-' if at(i + 1) == b'-' => {
            let end = (i..b.len()).find(|&k| matches!(b[k], b'\n' | b'\r')).unwrap_or(b.len());
            tok(Kind::Comment { block: false, closed: true }, end)
        }
        b'/' if at(i + 1) == b'*' => {
            let (mut depth, mut k) = (1usize, i + 2);
            while k < b.len() && depth > 0 {
                if b[k] == b'/' && at(k + 1) == b'*' {
                    depth += 1;
                    k += 2;
                } else if b[k] == b'*' && at(k + 1) == b'/' {
                    depth -= 1;
                    k += 2;
                } else {
                    k += 1;
                }
            }
            tok(Kind::Comment { block: true, closed: depth == 0 }, k.min(b.len()))
        }
        b'\'' => lex_str(b, i, 0, plain),
        b'"' => tok(Kind::QIdent { prefix: 1 }, qident_end(b, i + 1)),
        b'$' if at(i + 1).is_ascii_digit() => {
            let end = (i + 1..b.len()).find(|&k| !b[k].is_ascii_digit()).unwrap_or(b.len());
            tok(Kind::Param, end)
        }
        b'$' => match dollar_tag(b, i) {
            Some(tag) => {
                let delim = &b[i..i + tag];
                let body = i + tag;
                match b[body..].windows(tag).position(|w| w == delim) {
                    Some(p) => tok(Kind::Dollar { tag, closed: true }, body + p + tag),
                    None => tok(Kind::Dollar { tag, closed: false }, b.len()),
                }
            }
            None => tok(Kind::Op, i + 1),
        },
        b'e' | b'E' if at(i + 1) == b'\'' => lex_str(b, i, 1, Quote::E),
        b'n' | b'N' if at(i + 1) == b'\'' => lex_str(b, i, 1, plain),
        b'b' | b'B' | b'x' | b'X' if at(i + 1) == b'\'' => lex_str(b, i, 1, Quote::Std),
        b'u' | b'U' if at(i + 1) == b'&' && at(i + 2) == b'\'' => lex_str(b, i, 2, Quote::U),
        b'u' | b'U' if at(i + 1) == b'&' && at(i + 2) == b'"' => {
            tok(Kind::QIdent { prefix: 3 }, qident_end(b, i + 3))
        }
        _ if is_ident_start(c) => {
            let end = (i..b.len()).find(|&k| !is_ident_cont(b[k])).unwrap_or(b.len());
            tok(Kind::Ident, end)
        }
        _ if c.is_ascii_digit() || (c == b'.' && at(i + 1).is_ascii_digit()) => {
            let end = (i + 1..b.len())
                .find(|&k| !(b[k].is_ascii_alphanumeric() || b[k] == b'_' || b[k] == b'.'))
                .unwrap_or(b.len());
            tok(Kind::Number, end)
        }
        b',' | b'(' | b')' | b'[' | b']' | b';' | b'.' => tok(Kind::Punct, i + 1),
        _ if is_op(c) => {
            let mut k = i;
            while k < b.len() && is_op(b[k]) {
                if k > i && matches!((b[k], at(k + 1)), (b'-', b'-') | (b'/', b'*')) {
                    break;
                }
                k += 1;
            }
            tok(Kind::Op, k)
        }
        _ => tok(Kind::Op, i + 1),
    }
}

/// The length of the dollar-quote delimiter at `i` (`$$`, `$tag$`; the tag an identifier
/// without `$`, non-ASCII letters included), if there is one.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut k = i + 1;
    if b.get(k).is_some_and(|c| is_ident_start(*c)) {
        k += 1;
        while b.get(k).is_some_and(|c| is_ident_cont(*c) && *c != b'$') {
            k += 1;
        }
    }
    (b.get(k) == Some(&b'$')).then_some(k + 1 - i)
}

/// Past the `"` closing a quoted identifier whose body starts at `i` (`""` is a quote).
fn qident_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        if b[i] == b'"' {
            if b.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// A string constant starting at `start` whose opening quote is `prefix` bytes in,
/// continued across whitespace holding a newline (`'a'\n'b'` is `'ab'`).
fn lex_str(b: &[u8], start: usize, prefix: usize, quote: Quote) -> Token {
    let mut i = start + prefix + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if quote == Quote::E => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => match continuation(b, i + 1) {
                Some(next) => i = next + 1,
                None => {
                    return Token {
                        kind: Kind::Str { quote, prefix, closed: true },
                        start,
                        end: i + 1,
                    }
                }
            },
            _ => i += 1,
        }
    }
    Token { kind: Kind::Str { quote, prefix, closed: false }, start, end: b.len() }
}

/// The quote that continues a string constant closed just before `i`: after whitespace
/// and `--` comments that hold at least one newline.
fn continuation(b: &[u8], mut i: usize) -> Option<usize> {
    let mut newline = false;
    loop {
        match b.get(i) {
            Some(&c) if is_space(c) => {
                newline |= matches!(c, b'\n' | b'\r');
                i += 1;
            }
            Some(b'-') if b.get(i + 1) == Some(&b'-') => {
                while b.get(i).is_some_and(|c| !matches!(c, b'\n' | b'\r')) {
                    i += 1;
                }
            }
            Some(b'\'') if newline => return Some(i),
            _ => return None,
        }
    }
}

/// Whether identifier token `t` is a keyword (`"password"` and `U&"…"` decoded).
fn is_keyword_token(b: &[u8], toks: &[Token], t: usize) -> bool {
    let tok = toks[t];
    match tok.kind {
        Kind::QIdent { prefix } => {
            let (esc, quote) =
                if prefix == 3 { (uescape(b, toks, t), Quote::U) } else { (b'\\', Quote::Std) };
            is_keyword(&decode_quoted(b, tok.start + prefix - 1, tok.end, b'"', quote, esc).0)
        }
        _ => is_keyword(&b[tok.start..tok.end]),
    }
}

/// The escape character of the `U&` token `t`: `UESCAPE 'c'` after it, or `\`.
fn uescape(b: &[u8], toks: &[Token], t: usize) -> u8 {
    let Some(u) = next_sig(toks, t) else { return b'\\' };
    if toks[u].kind != Kind::Ident
        || !b[toks[u].start..toks[u].end].eq_ignore_ascii_case(b"uescape")
    {
        return b'\\';
    }
    match next_sig(toks, u).map(|s| toks[s]) {
        Some(s)
            if matches!(
                s.kind,
                Kind::Str { quote: Quote::Std | Quote::E, prefix: 0, closed: true }
            ) && s.end == s.start + 3 =>
        {
            b[s.start + 1]
        }
        _ => b'\\',
    }
}

/// The decoded body of string token `tok`, with the offset in `b` each byte came from
/// (one more entry: the end).
fn decode_str(b: &[u8], tok: Token, quote: Quote, esc: u8) -> (Vec<u8>, Vec<usize>) {
    let prefix = match tok.kind {
        Kind::Str { prefix, .. } => prefix,
        _ => 0,
    };
    decode_quoted(b, tok.start + prefix, tok.end, b'\'', quote, esc)
}

/// Decodes the quoted text opening at `open` (the quote) and ending by `end`.
fn decode_quoted(
    b: &[u8],
    open: usize,
    end: usize,
    q: u8,
    quote: Quote,
    esc: u8,
) -> (Vec<u8>, Vec<usize>) {
    let (mut out, mut map) = (Vec::new(), Vec::new());
    fn push(out: &mut Vec<u8>, map: &mut Vec<usize>, bytes: &[u8], from: usize) {
        out.extend_from_slice(bytes);
        map.extend(std::iter::repeat_n(from, bytes.len()));
    }
    let mut i = open + 1;
    let end = end.min(b.len());
    while i < end {
        let c = b[i];
        if c == q {
            if i + 1 < end && b[i + 1] == q {
                push(&mut out, &mut map, &[q], i);
                i += 2;
                continue;
            }
            // The closing quote, or a continuation's.
            match (q == b'\'').then(|| continuation(b, i + 1)).flatten() {
                Some(next) if next < end => i = next + 1,
                _ => break,
            }
            continue;
        }
        if quote == Quote::E && c == b'\\' {
            let (bytes, len) = e_escape(&b[i..end]);
            push(&mut out, &mut map, &bytes, i);
            i += len;
            continue;
        }
        if quote == Quote::U && c == esc {
            let (bytes, len) = u_escape(&b[i..end], esc);
            push(&mut out, &mut map, &bytes, i);
            i += len;
            continue;
        }
        push(&mut out, &mut map, &[c], i);
        i += 1;
    }
    map.push(i.min(end));
    (out, map)
}

fn hex(b: &[u8], max: usize) -> (u32, usize) {
    let mut v = 0u32;
    let mut n = 0;
    while n < max && n < b.len() && b[n].is_ascii_hexdigit() {
        v = v.wrapping_mul(16).wrapping_add(char::from(b[n]).to_digit(16).unwrap_or(0));
        n += 1;
    }
    (v, n)
}

fn utf8(v: u32) -> Vec<u8> {
    char::from_u32(v).map(|c| c.to_string().into_bytes()).unwrap_or_default()
}

/// An `E'…'` escape at the start of `s` (which starts with `\`): its bytes and length.
fn e_escape(s: &[u8]) -> (Vec<u8>, usize) {
    let Some(&c) = s.get(1) else { return (Vec::new(), 1) };
    match c {
        b'b' => (vec![8], 2),
        b'f' => (vec![12], 2),
        b'n' => (vec![b'\n'], 2),
        b'r' => (vec![b'\r'], 2),
        b't' => (vec![b'\t'], 2),
        b'0'..=b'7' => {
            let n = s[1..].iter().take(3).take_while(|d| (b'0'..=b'7').contains(*d)).count();
            let v = s[1..1 + n].iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            (vec![(v & 0xff) as u8], 1 + n)
        }
        b'x' if s.get(2).is_some_and(u8::is_ascii_hexdigit) => {
            let (v, n) = hex(&s[2..], 2);
            (vec![(v & 0xff) as u8], 2 + n)
        }
        b'u' | b'U' => {
            let want = if c == b'u' { 4 } else { 8 };
            let (v, n) = hex(&s[2..], want);
            if n == want {
                (utf8(v), 2 + n)
            } else {
                (vec![c], 2)
            }
        }
        _ => (vec![c], 2),
    }
}

/// A `U&'…'` escape at the start of `s` (which starts with `esc`): its bytes and length.
fn u_escape(s: &[u8], esc: u8) -> (Vec<u8>, usize) {
    match s.get(1) {
        Some(&c) if c == esc => (vec![esc], 2),
        Some(b'+') => {
            let (v, n) = hex(&s[2..], 6);
            if n == 6 {
                (utf8(v), 8)
            } else {
                (vec![esc], 1)
            }
        }
        _ => {
            let (v, n) = hex(&s[1..], 4);
            if n == 4 {
                (utf8(v), 5)
            } else {
                (vec![esc], 1)
            }
        }
    }
}

/// The password of every `scheme://user:password@host` (a URI connection string, as
/// dblink and foreign-data wrappers take): the bytes between the `:` and the `@`; in a
/// text that was `cut`, also between the `:` and the cut, when the URI runs to it.
fn uri_passwords(bytes: &[u8], cut: bool) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut from = 0;
    let (mut uri_end, mut query, mut queried) = (0, None, None);
    while let Some(p) = bytes[from..].windows(3).position(|w| w == b"://") {
        let authority = from + p + 3;
        let mut end = authority;
        while end < bytes.len() {
            match bytes[end] {
                // A quote doubled or backslash-escaped inside the enclosing literal.
                b'\'' if bytes.get(end + 1) == Some(&b'\'') => end += 2,
                b'\'' if bytes[end - 1] == b'\\' => end += 1,
                // libpq takes `user:password` up to the first `@` before a `/`: a `?`,
                // `#`, `"` or space there is part of the password.
                b'@' | b'/' | b'\'' => break,
                _ => end += 1,
            }
        }
        if bytes.get(end) == Some(&b'@') || (cut && end == bytes.len()) {
            if let Some(colon) = bytes[authority..end].iter().position(|b| *b == b':') {
                spans.push((authority + colon + 1, end));
            }
        }
        // `?password=…`: libpq percent-decodes parameter names (`?pass%77ord=…`). The
        // URI's end and its `?` are found once for all the URIs that share them.
        if uri_end < end {
            uri_end = (end..bytes.len())
                .find(|&k| is_space(bytes[k]) || matches!(bytes[k], b'\'' | b'"'))
                .unwrap_or(bytes.len());
        }
        if query.is_none_or(|q| q < end) {
            query = (end..uri_end).find(|&k| bytes[k] == b'?').or(Some(uri_end));
        }
        if let Some(q) = query.filter(|&q| q < uri_end && queried != Some(q)) {
            queried = Some(q);
            let mut param = q + 1;
            while param < uri_end {
                let stop = (param..uri_end).find(|&k| bytes[k] == b'&').unwrap_or(uri_end);
                if let Some(eq) = bytes[param..stop].iter().position(|b| *b == b'=') {
                    if is_keyword(&percent_decode(&bytes[param..param + eq])) {
                        spans.push((param + eq + 1, stop));
                    }
                }
                param = stop + 1;
            }
        }
        from = authority;
    }
    spans
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let (v, n) = if s[i] == b'%' { hex(&s[i + 1..], 2) } else { (0, 0) };
        if n == 2 {
            out.push((v & 0xff) as u8);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::BACKSTOP;
    use std::borrow::Cow;

    /// With `standard_conforming_strings` not known (the fail-closed reading).
    fn passwords(text: &str) -> Cow<'_, str> {
        super::passwords(text, None)
    }

    /// `text` is masked to exactly `want`, which holds none of `secrets`.
    fn masks(text: &str, want: &str, secrets: &[&str]) {
        let got = passwords(text);
        assert_eq!(got, want, "{text:?}");
        for s in secrets {
            assert!(!got.contains(s), "{text:?} -> {got:?} shows {s:?}");
        }
    }

    #[test]
    fn a_uri_cut_before_its_at_is_masked_only_in_a_text_that_was_cut() {
        let text = "SELECT dblink('postgresql://app:Hunter2-c";
        assert_eq!(super::passwords_cut(text, None), "SELECT dblink('postgresql://app:***");
        assert_eq!(super::passwords(text, None), text, "whole, it names a host and port");
        let whole = "SELECT dblink('postgresql://app:Hunter2@db/x', 'select 1'), 'http://h:80";
        assert_eq!(
            super::passwords_cut(whole, None),
            "SELECT dblink('postgresql://app:***@db/x', 'select 1'), 'http://h:***"
        );
        // Cut before the colon: nothing of a password is there.
        assert_eq!(super::passwords_cut("x 'postgresql://app", None), "x 'postgresql://app");
    }

    /// `text` is masked from the end of `kept` on: `kept` followed by the backstop.
    fn masks_the_rest(text: &str, kept: &str, secret: &str) {
        masks(text, &format!("{kept}{BACKSTOP}"), &[secret]);
    }

    /// A literal closed too early (`''pw''` meant inside one, written outside it): the
    /// value masked is the empty literal, and the password is the word glued to it. A
    /// word right after a value's closing quote is no visible end of it.
    #[test]
    fn a_word_glued_to_a_value_masks_the_rest() {
        let text = "'x dblink_connect('host=db password = ''Hunter2'' dbname=x')";
        masks_the_rest(text, "'x dblink_connect('host=db password", "Hunter2");
        let text = "ALTER ROLE app PASSWORD ''Hunter2'' LOGIN";
        masks_the_rest(text, "ALTER ROLE app PASSWORD", "Hunter2");
        // The same in a literal, where `password =` starts a connection-string value.
        let text = "$p$'x dblink_connect('host=db password = ''Hunter2'' dbname=x')";
        masks_the_rest(text, "$p$'x dblink_connect('host=db password", "Hunter2");
        // Separated from it, a word ends the value, as `LOGIN` or `VALID UNTIL` do.
        masks("ALTER ROLE app PASSWORD '' LOGIN", "ALTER ROLE app PASSWORD *** LOGIN", &[]);
    }

    /// A comment that runs to the end of a literal ends with it: a keyword ending the
    /// comment ends the literal, and the value may follow the literal.
    #[test]
    fn a_keyword_ending_a_comment_that_ends_a_literal_masks_the_rest() {
        let text = "8/$$/*ALTER ROLE app PASSWORD $$Hunter2$$";
        masks_the_rest(text, "8/$$/*ALTER ROLE app PASSWORD", "Hunter2");
        let text = "SELECT 'x -- password ' || 'Hunter2'";
        masks_the_rest(text, "SELECT 'x -- password", "Hunter2");
        // A value unterminated in such a comment runs to the end of the literal too.
        let text = "SELECT '/*PASSWORD $$x' || 'Hunter2'";
        masks_the_rest(text, "SELECT '/*PASSWORD", "Hunter2");
        // A comment closed in the literal, or one in the statement itself, holds no value.
        for text in ["SELECT '/* password */ x', 'y'", "SELECT 1 -- password"] {
            assert!(matches!(passwords(text), Cow::Borrowed(_)), "{}", passwords(text));
        }
    }

    /// PostgreSQL reads a comment in the whitespace between continued constants as
    /// whitespace (`'a' -- …\n'b'` is `'ab'`): the comment is not in the decoded value,
    /// so a keyword there masks the rest (found by the `pg_redact` fuzz target).
    #[test]
    fn a_keyword_in_a_comment_between_continued_constants_masks_the_rest() {
        let text = "SELECT 'x' -- ALTER ROLE app PASSWORD 'Hunter2'\n'y'";
        masks_the_rest(text, "SELECT ", "Hunter2");
        let text = "'x'------'6ALTER ROLE app PASSWORD E'Hunter2'$t\n'----'-'y";
        masks_the_rest(text, "", "Hunter2");
        let text = "SELECT 'x' -- OPTIONS (sslpassword 'Hunter2')\n'y'";
        masks_the_rest(text, "SELECT ", "Hunter2");
        // Though the value itself names the keyword too.
        let text = "SELECT 'x' -- ALTER ROLE app PASSWORD 'Hunter2'\n'y password'";
        masks_the_rest(text, "SELECT ", "Hunter2");
    }

    /// The `pg_redact` fuzz target's settling property on `text` (whole, under `scs`):
    /// a third pass keeps what the second kept, at most cut at one more keyword.
    fn settles(text: &str, scs: Option<bool>) {
        let once = super::passwords(text, scs);
        let twice = super::passwords(&once, scs).into_owned();
        let thrice = super::passwords(&twice, scs);
        let kept = thrice.strip_suffix(BACKSTOP).unwrap_or(&thrice);
        assert!(
            thrice == twice || (thrice.ends_with(BACKSTOP) && twice.starts_with(kept)),
            "{text:?} -> {once:?} -> {twice:?} -> {thrice:?}"
        );
    }

    /// A comment's end is found by counting `/*` and `*/` through everything in it,
    /// literals and operators included: a value there that holds one (or ends next to a
    /// `/` the mask's `*` would pair with) moves the comment's end once masked, and the
    /// next pass reads a different value. Such a value masks the rest (found by the
    /// `pg_redact` fuzz target: `fuzz/regressions/pg_redact/`, mode byte `0x30`).
    #[test]
    fn a_value_holding_a_comment_delimiter_in_a_comment_masks_the_rest() {
        // The kept minimisation: each pass masked more (`PASSWORD= ****/*&*/*`, then
        // `PASSWORD= ****/*`, then `PASSWORD= ***`).
        let text = "\0/*)'@''P/*\x01\x01u' PASSWORD= */*/*&*/*\0\0";
        settles(text, None);
        masks_the_rest(text, "\0/*)'@''P/*\x01\x01u' PASSWORD", "*/*&");
        // A delimiter in a quoted value, and a value the mask's `*` would close with `/`.
        for (text, kept) in [
            ("SELECT 1 /* '/*' password='x*/y' */ */ ", "SELECT 1 /* '/*' password"),
            ("SELECT 1 /* ALTER ROLE x PASSWORD '/*' */ x */", "SELECT 1 /* ALTER ROLE x PASSWORD"),
            ("SELECT 1 /* password='Hunter2'/**/ y */", "SELECT 1 /* password"),
            ("SELECT 1 /* password=/* x */", "SELECT 1 /* password"),
        ] {
            settles(text, None);
            masks_the_rest(text, kept, "Hunter2");
        }
        // A value clear of delimiters in a comment is masked as anywhere.
        masks("SELECT 1 /* password=Hunter2 */", "SELECT 1 /* password=*** */", &["Hunter2"]);
        masks("/* PASSWORD 'Hunter2' */ SELECT 1", "/* PASSWORD *** */ SELECT 1", &["Hunter2"]);
    }

    /// A URI's password masked from its colon to its `@` can swallow the whitespace that
    /// ended a connection-string value before it (`password= a$://:\tb= c:@d`): masked,
    /// the value ran on to the next whitespace, and each pass masked more. Such a value,
    /// whose end is masked away, masks the rest (found by the `pg_redact` fuzz target:
    /// `fuzz/regressions/pg_redact/crash-7771…`, mode byte `0x2a`).
    #[test]
    fn a_value_ended_inside_a_uri_password_masks_the_rest() {
        let input = include_bytes!(
            "../../fuzz/regressions/pg_redact/crash-77710b1d8c04ffeccb0cb199a7f9a305e3d33cf4"
        );
        let text = std::str::from_utf8(&input[1..]).unwrap_or_default();
        assert!(!text.is_empty() && input[0] % 3 == 0 && input[0] & 0x80 == 0);
        settles(text, None);
        // The same, short: the space that ends `x://:` is the URI's password.
        let text = "SELECT dblink_connect('password=x://: y@d')";
        masks_the_rest(text, "SELECT dblink_connect('password", "x://");
    }

    /// A quoted connection-string value with something glued to it (`password='',x`):
    /// masked, `***,x` read as one bare value, and each pass masked more. Such a value
    /// masks the rest (found by the `pg_redact` fuzz target: `fuzz/regressions/pg_redact/
    /// minimized-from-f104…`, mode byte `0x2b`).
    #[test]
    fn a_quoted_connection_string_value_with_something_glued_masks_the_rest() {
        let text = "$$PASSWORD= '','\nPASSWORD= \0'";
        for scs in [None, Some(true), Some(false)] {
            settles(text, scs);
        }
        masks_the_rest(text, "$$PASSWORD", "''");
        masks_the_rest(
            "SELECT dblink_connect('password=''Hunter2'',x')",
            "SELECT dblink_connect('password",
            "Hunter2",
        );
    }

    #[test]
    fn password_literals_are_masked_whatever_their_quoting() {
        let cases = [
            ("ALTER ROLE app PASSWORD 'hunter2'", "ALTER ROLE app PASSWORD ***"),
            (
                "create user x with encrypted password 'a''b' valid until 'x'",
                "create user x with encrypted password *** valid until 'x'",
            ),
            ("ALTER USER x PASSWORD E'a\\'b' LOGIN", "ALTER USER x PASSWORD *** LOGIN"),
            ("ALTER USER x PASSWORD $$s3cr3t$$", "ALTER USER x PASSWORD ***"),
            ("ALTER USER x PASSWORD $t$s3$cr3t$t$;", "ALTER USER x PASSWORD ***;"),
            ("ALTER USER x PASSWORD\n  'multi\nline'", "ALTER USER x PASSWORD\n  ***"),
            (
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password 'pw')",
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password ***)",
            ),
            (
                "SELECT dblink_connect('host=db password=pw dbname=x')",
                "SELECT dblink_connect('host=db password=*** dbname=x')",
            ),
            (
                "SELECT dblink_connect('host=db password = pw')",
                "SELECT dblink_connect('host=db password = ***')",
            ),
            (
                "SELECT dblink_connect('password=''it\\''s'' host=x')",
                "SELECT dblink_connect('password=*** host=x')",
            ),
            (
                "ALTER ROLE a PASSWORD 'x'; ALTER ROLE b PASSWORD 'y'",
                "ALTER ROLE a PASSWORD ***; ALTER ROLE b PASSWORD ***",
            ),
            ("ALTER ROLE a PASSWORD 'unterminated", "ALTER ROLE a PASSWORD ***"),
            ("ALTER ROLE a PASSWORD /* c */ 'pw'", "ALTER ROLE a PASSWORD /* c */ ***"),
            ("ALTER ROLE a PASSWORD -- c\n 'pw' LOGIN", "ALTER ROLE a PASSWORD -- c\n *** LOGIN"),
            ("ALTER ROLE a PASSWORD U&'p\\0077' LOGIN", "ALTER ROLE a PASSWORD *** LOGIN"),
            ("ALTER ROLE a PASSWORD n'pw'", "ALTER ROLE a PASSWORD ***"),
            (
                "SELECT dblink_connect(E'host=x password=\\'pw\\' port=1')",
                "SELECT dblink_connect(E'host=x password=*** port=1')",
            ),
            (
                "SELECT dblink_connect('postgresql://app:s3cr%40t@db:5432/x')",
                "SELECT dblink_connect('postgresql://app:***@db:5432/x')",
            ),
            (
                "SELECT 'postgres://a:b@h', 'mysql://u:p@h/db'",
                "SELECT 'postgres://a:***@h', 'mysql://u:***@h/db'",
            ),
            (
                "UPDATE users SET password = 'x' WHERE id = 1",
                "UPDATE users SET password = *** WHERE id = 1",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(passwords(text), want, "{text}");
        }
    }

    #[test]
    fn text_without_a_password_literal_is_left_alone() {
        for text in [
            "SELECT 1",
            "SELECT password_hash FROM users",
            "ALTER ROLE app PASSWORD NULL",
            "SHOW password_encryption",
            "SET password_encryption = 'scram-sha-256'",
            "SELECT old_password FROM t",
            "SELECT password FROM users WHERE id = $1",
            "SELECT password FROM users WHERE name = 'bob'",
            "SELECT \"password\" AS p FROM users WHERE name = 'bob'",
            "SELECT id, password FROM users",
            "UPDATE users SET password = $1",
            "UPDATE users SET password = NULL WHERE name = 'bob'",
            "CREATE TABLE users (id int, password text)",
            "EXECUTE 'SELECT password FROM users'",
            "/* reset the password */ SELECT 1",
            "SELECT 'https://example.com/path', 'postgres://app@db/x'",
            "SELECT a & b, E'\\n', 'a\\b'",
            "password",
            "",
        ] {
            assert!(matches!(passwords(text), Cow::Borrowed(_)), "{text} -> {}", passwords(text));
        }
    }

    #[test]
    fn truncated_and_odd_input_never_panics_and_never_shows_a_literal_after_the_keyword() {
        for text in [
            "password",
            "password=",
            "password =",
            "PASSWORD /*",
            "PASSWORD /* x",
            "PASSWORD --",
            "PASSWORD E",
            "PASSWORD E'",
            "PASSWORD U&",
            "PASSWORD U&'",
            "PASSWORD N'",
            "PASSWORD $",
            "PASSWORD $a",
            "PASSWORD $$",
            "password=\\",
            "password=\\'",
            "password=''",
            "://",
            "a://",
            "a://b:c",
            "a://b:c@",
            "é PASSWORD 'é' é",
            "PASSWORD 'x' -- é",
            "://:@",
            "'password=",
            "'password='é",
            "E'password=\\",
            "U&'\\",
            "U&'\\+",
            "U&\"",
            "PASSWORD U&'x' UESCAPE",
            "PASSWORD U&'x' UESCAPE '",
            "$é",
            "'é\\xé'",
            "E'\\uD800 password \\U0011FFFF é'",
        ] {
            let masked = passwords(text);
            assert!(!masked.contains("'é'"), "{text} -> {masked}");
        }
    }

    // The forms a security probe set a password with on PostgreSQL 15, unmasked before.

    #[test]
    fn a_statement_executed_in_a_do_block_is_masked() {
        masks(
            "DO $$ BEGIN EXECUTE 'ALTER ROLE other PASSWORD ''Hunter2-do-execute'''; END $$",
            "DO $$ BEGIN EXECUTE 'ALTER ROLE other PASSWORD ***'; END $$",
            &["Hunter2"],
        );
        masks(
            "DO $$ BEGIN ALTER ROLE x PASSWORD 'Hunter2-in-body'; END $$",
            "DO $$ BEGIN ALTER ROLE x PASSWORD ***; END $$",
            &["Hunter2"],
        );
        // `''''` inside a literal: a quote inside the nested literal.
        masks(
            "DO $$BEGIN EXECUTE 'ALTER ROLE x PASSWORD ''a''''Hunter2'' LOGIN'; END$$",
            "DO $$BEGIN EXECUTE 'ALTER ROLE x PASSWORD *** LOGIN'; END$$",
            &["Hunter2"],
        );
    }

    #[test]
    fn a_password_in_a_format_template_masks_the_rest() {
        masks_the_rest(
            "DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L','r','Hunter2-format-L'); END $$",
            "DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN PASSWORD",
            "Hunter2",
        );
        masks_the_rest(
            "SELECT format('ALTER ROLE %I PASSWORD ''%s''', 'r', 'Hunter2-format-s')",
            "SELECT format('ALTER ROLE %I PASSWORD",
            "Hunter2",
        );
        masks_the_rest(
            "SELECT format('ALTER ROLE %I %s %L', 'r', 'PASSWORD', 'Hunter2-format-arg')",
            "SELECT format('ALTER ROLE %I %s %L', 'r', 'PASSWORD",
            "Hunter2",
        );
        masks_the_rest(
            "SELECT dblink_connect(format('host=x password=%s', 'Hunter2-conninfo'))",
            "SELECT dblink_connect(format('host=x password",
            "Hunter2",
        );
    }

    #[test]
    fn a_quoted_password_option_is_masked() {
        masks(
            "CREATE USER MAPPING FOR app SERVER s OPTIONS (\"user\" 'u', \"password\" 'Hunter2-quoted-option')",
            "CREATE USER MAPPING FOR app SERVER s OPTIONS (\"user\" 'u', \"password\" ***)",
            &["Hunter2"],
        );
        masks(
            "ALTER SERVER s OPTIONS (SET U&\"p\\0061ssword\" 'Hunter2-u-ident')",
            "ALTER SERVER s OPTIONS (SET U&\"p\\0061ssword\" ***)",
            &["Hunter2"],
        );
    }

    #[test]
    fn string_constants_continued_across_a_newline_are_one_secret() {
        masks(
            "ALTER ROLE other PASSWORD 'Hunter2-'\n'continued'",
            "ALTER ROLE other PASSWORD ***",
            &["continued"],
        );
        masks(
            "ALTER ROLE x PASSWORD 'Hunter2-' -- c\r\n  'continued' LOGIN",
            "ALTER ROLE x PASSWORD *** LOGIN",
            &["continued"],
        );
        masks(
            "ALTER ROLE x PASSWORD E'Hunter2\\''\n'\\'continued'",
            "ALTER ROLE x PASSWORD ***",
            &["continued"],
        );
        // A continuation can spell the keyword.
        masks(
            "DO $$BEGIN EXECUTE 'ALTER ROLE x PASS'\n'WORD ''Hunter2'''; END$$",
            "DO $$BEGIN EXECUTE 'ALTER ROLE x PASS'\n'WORD ***'; END$$",
            &["Hunter2"],
        );
        // Inside a literal: the continuation is part of the nested secret.
        masks(
            "DO $$BEGIN EXECUTE 'ALTER ROLE x PASSWORD ''Hunter2-''\n''continued'''; END$$",
            "DO $$BEGIN EXECUTE 'ALTER ROLE x PASSWORD ***'; END$$",
            &["continued"],
        );
    }

    #[test]
    fn a_line_comment_ends_at_a_carriage_return() {
        masks(
            "ALTER ROLE other PASSWORD --c\r'Hunter2-cr-comment'",
            "ALTER ROLE other PASSWORD --c\r***",
            &["Hunter2"],
        );
    }

    #[test]
    fn block_comments_nest() {
        masks(
            "ALTER ROLE other PASSWORD /* /* */ 'x' */ 'Hunter2-nested-comment'",
            "ALTER ROLE other PASSWORD /* /* */ 'x' */ ***",
            &["Hunter2"],
        );
    }

    #[test]
    fn dollar_quote_tags_are_identifiers_non_ascii_letters_included() {
        masks("ALTER ROLE x PASSWORD $é$Hunter2$é$", "ALTER ROLE x PASSWORD ***", &["Hunter2"]);
        masks(
            "ALTER ROLE x PASSWORD $_1$Hunter2$$_1$ LOGIN",
            "ALTER ROLE x PASSWORD *** LOGIN",
            &["Hunter2"],
        );
        // A longer tag inside the body does not close it.
        masks(
            "ALTER ROLE x PASSWORD $a$Hunter2$ab$x$a$",
            "ALTER ROLE x PASSWORD ***",
            &["Hunter2", "x$a"],
        );
    }

    #[test]
    fn vertical_tab_and_form_feed_are_whitespace() {
        masks(
            "ALTER ROLE x PASSWORD\x0b'Hunter2-vt'\x0cLOGIN",
            "ALTER ROLE x PASSWORD\x0b***\x0cLOGIN",
            &["Hunter2"],
        );
        masks(
            "SELECT dblink_connect('password=Hunter2-ff\x0bport=1')",
            "SELECT dblink_connect('password=***\x0bport=1')",
            &["Hunter2"],
        );
    }

    #[test]
    fn escapes_that_spell_the_keyword_are_decoded() {
        masks(
            "DO $$BEGIN EXECUTE E'ALTER ROLE x PASS\\x57ORD ''Hunter2-e'''; END$$",
            "DO $$BEGIN EXECUTE E'ALTER ROLE x PASS\\x57ORD ***'; END$$",
            &["Hunter2"],
        );
        masks(
            "DO $$BEGIN EXECUTE U&'ALTER ROLE x PASS\\0057ORD ''Hunter2-u'''; END$$",
            "DO $$BEGIN EXECUTE U&'ALTER ROLE x PASS\\0057ORD ***'; END$$",
            &["Hunter2"],
        );
        masks(
            "SELECT U&'ALTER ROLE x PASS!0057ORD ''Hunter2-uescape''' UESCAPE '!'",
            "SELECT U&'ALTER ROLE x PASS!0057ORD ***' UESCAPE '!'",
            &["Hunter2"],
        );
        masks(
            "SELECT dblink_connect(E'host=x pass\\167ord=Hunter2-octal')",
            "SELECT dblink_connect(E'host=x pass\\167ord=***')",
            &["Hunter2"],
        );
    }

    #[test]
    fn a_secret_whose_end_is_uncertain_masks_the_rest() {
        for (text, kept) in [
            (
                "EXECUTE 'ALTER ROLE x PASSWORD ' || quote_literal('Hunter2')",
                "EXECUTE 'ALTER ROLE x PASSWORD",
            ),
            (
                "SELECT dblink_connect('host=x password=' || 'Hunter2')",
                "SELECT dblink_connect('host=x password",
            ),
            ("SELECT dblink_connect('password=Hun' || 'ter2')", "SELECT dblink_connect('password"),
            ("ALTER ROLE x PASSWORD 'Hun' || 'ter2'", "ALTER ROLE x PASSWORD"),
            ("UPDATE u SET password = crypt('Hunter2', gen_salt('bf'))", "UPDATE u SET password"),
            (
                "INSERT INTO u (name, password) VALUES ('a', 'Hunter2')",
                "INSERT INTO u (name, password",
            ),
            ("SELECT 'password', 'Hunter2'", "SELECT 'password"),
            ("COMMENT ON ROLE x IS 'password Hunter2'", "COMMENT ON ROLE x IS 'password"),
            ("-- password: Hunter2\nSELECT 1", "-- password"),
            ("ALTER ROLE x PASSWORD$$Hunter2$$", "ALTER ROLE x PASSWORD"),
            ("ALTER ROLE x PASSWORD 1234 -- Hunter2", "ALTER ROLE x PASSWORD"),
            ("ALTER ROLE x PASSWORD /* 'Hunter2'", "ALTER ROLE x PASSWORD"),
            ("SELECT '{\"password\": \"Hunter2\"}'::jsonb", "SELECT '{\"password\""),
        ] {
            masks_the_rest(text, kept, "Hunter2");
        }
    }

    /// The server reports `standard_conforming_strings`; where the proxy knows it, the
    /// statement's own plain literals are read as the server reads them, and literals
    /// nested in it (lexed later, under a setting that may have changed) both ways still.
    #[test]
    fn plain_literals_are_read_under_the_reported_standard_conforming_strings() {
        let on = |t| super::passwords(t, Some(true)).into_owned();
        let off = |t| super::passwords(t, Some(false)).into_owned();
        // Off: `\'` is a quote inside the literal; the whole of it is the secret.
        let t = "ALTER ROLE x PASSWORD 'a\\' LOGIN Hunter2'";
        assert_eq!(off(t), "ALTER ROLE x PASSWORD ***");
        // On: the literal ends at `\'`; what follows is not a secret to the server.
        assert_eq!(on(t), "ALTER ROLE x PASSWORD *** LOGIN Hunter2'");
        assert_eq!(on("ALTER ROLE x PASSWORD 'a\\b'"), "ALTER ROLE x PASSWORD ***");
        // A literal whose end moves with the setting: the secret is masked either way.
        let t = "SELECT 'a\\' , ' ; ALTER ROLE v PASSWORD 'Hunter2' ; SELECT '";
        for got in [on(t), off(t), passwords(t).into_owned()] {
            assert!(!got.contains("Hunter2"), "{got}");
        }
        // Nested: an EXECUTE string is read both ways whatever the setting now.
        let t = "DO $$ BEGIN EXECUTE 'ALTER ROLE x PASSWORD ''a\\'' LOGIN Hunter2'''; END $$";
        for got in [on(t), off(t)] {
            assert!(!got.contains("Hunter2") && got.ends_with(BACKSTOP), "{got}");
        }
        // N'…' follows the setting too; B'…' and X'…' never take escapes.
        assert_eq!(off("ALTER ROLE x PASSWORD N'a\\' b'"), "ALTER ROLE x PASSWORD ***");
        assert_eq!(
            off("SELECT B'1\\' , 'x' ; ALTER ROLE x PASSWORD 'Hunter2'"),
            "SELECT B'1\\' , 'x' ; ALTER ROLE x PASSWORD ***"
        );
        assert_eq!(
            off("ALTER ROLE x PASSWORD U&'d!0061t' UESCAPE '!'"),
            "ALTER ROLE x PASSWORD ***"
        );
    }

    /// A backslash in a plain literal is an escape when standard_conforming_strings is off:
    /// when the setting is not known and that changes where a secret ends, or spells the
    /// keyword, the rest is masked.
    #[test]
    fn a_backslash_that_would_matter_without_standard_conforming_strings_masks_the_rest() {
        masks_the_rest(
            "ALTER ROLE x PASSWORD 'a\\' LOGIN Hunter2'",
            "ALTER ROLE x PASSWORD",
            "Hunter2",
        );
        masks_the_rest("SELECT 'ALTER ROLE x PASS\\WORD ''Hunter2'''", "SELECT ", "Hunter2");
        masks("ALTER ROLE x PASSWORD 'a\\b'", "ALTER ROLE x PASSWORD ***", &["a\\b"]);
    }

    #[test]
    fn literals_nested_deeper_than_the_limit_mask_the_rest() {
        let mut text = String::from("ALTER ROLE x PASSWORD 'Hunter2'");
        for _ in 0..super::MAX_DEPTH + 1 {
            text = format!("SELECT $q{}$ {text} $q{}$", text.len(), text.len());
        }
        let masked = passwords(&text);
        assert!(masked.ends_with(BACKSTOP) && !masked.contains("Hunter2"), "{masked}");
    }

    #[test]
    fn other_secret_bearing_forms_are_masked() {
        masks(
            "CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'db', password 'Hunter2')",
            "CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'db', password ***)",
            &["Hunter2"],
        );
        masks(
            "ALTER USER MAPPING FOR u SERVER s OPTIONS (ADD password 'Hunter2', SET user 'x')",
            "ALTER USER MAPPING FOR u SERVER s OPTIONS (ADD password ***, SET user 'x')",
            &["Hunter2"],
        );
        masks(
            "CREATE SUBSCRIPTION s CONNECTION 'host=db password=Hunter2 dbname=x' PUBLICATION p",
            "CREATE SUBSCRIPTION s CONNECTION 'host=db password=*** dbname=x' PUBLICATION p",
            &["Hunter2"],
        );
        masks(
            "SELECT dblink_connect('host=db sslpassword=Hunter2 sslkey=k')",
            "SELECT dblink_connect('host=db sslpassword=*** sslkey=k')",
            &["Hunter2"],
        );
        masks(
            "SELECT dblink_connect('postgresql://app:Hunter''2@db/x')",
            "SELECT dblink_connect('postgresql://app:***@db/x')",
            &["Hunter"],
        );
        masks(
            "SELECT dblink_connect('postgresql://db/x?user=a&pass%77ord=Hunter2&sslmode=require')",
            "SELECT dblink_connect('postgresql://db/x?user=a&pass%77ord=***&sslmode=require')",
            &["Hunter2"],
        );
    }

    /// However a probe form is cut (a statement longer than the audit keeps), no part of
    /// its secret shows.
    #[test]
    fn every_prefix_of_the_probe_forms_hides_the_secret() {
        for text in [
            "DO $$ BEGIN EXECUTE 'ALTER ROLE other PASSWORD ''Hunter2-do-execute'''; END $$",
            "DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L','r','Hunter2-format-L'); END $$",
            "CREATE USER MAPPING FOR app SERVER s OPTIONS (\"user\" 'u', \"password\" 'Hunter2-quoted-option')",
            "ALTER ROLE other PASSWORD 'Hunter2-'\n'continued'",
            "ALTER ROLE other PASSWORD --c\r'Hunter2-cr-comment'",
            "ALTER ROLE other PASSWORD /* /* */ 'x' */ 'Hunter2-nested-comment'",
            "ALTER ROLE other PASSWORD $é$Hunter2$é$",
            "ALTER ROLE other PASSWORD\x0b\x0c'Hunter2'",
        ] {
            let start = text.find("Hunter2").unwrap_or(0);
            for end in (start + 1..=text.len()).filter(|&e| text.is_char_boundary(e)) {
                let cut = &text[..end];
                let masked = passwords(cut);
                assert!(!masked.contains(&text[start..end]), "{cut:?} -> {masked:?}");
                assert!(!masked.contains("continued"), "{cut:?} -> {masked:?}");
            }
        }
    }

    /// Random splices of the lexer's delimiters never panic nor split a character.
    #[test]
    fn random_input_never_panics() {
        let pieces = [
            "'", "''", "\\", "E'", "U&'", "U&\"", "\"", "$$", "$é$", "$1", "/*", "*/", "--", "\n",
            "\r", "\x0b", " ", "password", "PASSWORD", "=", "%L", "||", "(", ")", ",", ";", "é",
            "uescape", "'!'", "\\0070", "\\x70", "://u:p@h", "null", "from",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut text = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for k in 0..(seed % 12) {
                text.push_str(pieces[((seed >> (k * 5)) as usize) % pieces.len()]);
            }
            let _ = passwords(&text);
        }
    }

    #[test]
    fn libpq_connection_string_quirks_do_not_hide_a_password() {
        // A URI's password runs to the `@`, whatever `?`, `#` or space it holds.
        for pw in ["Sec?ret5", "Sec#ret6", "Sec ret7", "Sec\"ret8"] {
            let text = format!(
                "select * from dblink('postgresql://victim:{pw}@127.0.0.1:55432/app','select 1') as t(u text)"
            );
            let out = passwords(&text);
            assert!(!out.contains(pw), "{out}");
            assert!(out.contains("postgresql://victim:***@127.0.0.1:55432/app"), "{out}");
        }
        // `"` is ordinary in a key=value connection string: `password=` inside a span
        // that lexes as a quoted identifier is still a password.
        for text in [
            "select dblink('host=h user=victim application_name=\"x password=Secret8 application_name=y\"','select 1')",
            "select dblink('host=h application_name=x\"y password=Secret8 application_name=\"','select 1')",
        ] {
            let out = passwords(text);
            assert!(!out.contains("Secret8"), "{out}");
        }
        // Ordinary text keeps its URLs and quotes.
        for text in [
            "SELECT 'see http://example.com/a?b#c', \"col\" FROM t",
            "SELECT dblink('host=h application_name=\"x\"','select 1')",
        ] {
            assert_eq!(passwords(text), text);
        }
    }
}
