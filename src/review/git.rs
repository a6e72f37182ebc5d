//! The few git commands `policy diff` needs. Revisions are read with `git ls-tree` and
//! `git cat-file`: nothing is ever checked out over the user's work.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `git -C dir args...`, returning trimmed stdout or git's own message.
pub(crate) fn run(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("git {}: {}", args.join(" "), err.trim()))
    }
}

/// The top of the work tree containing `dir`.
pub(crate) fn toplevel(dir: &Path) -> Result<PathBuf, String> {
    let top = run(dir, &["rev-parse", "--show-toplevel"])
        .map_err(|e| format!("{} is not in a git repository ({e})", dir.display()))?;
    Ok(PathBuf::from(top))
}

/// The file at `rev`, as text: a regular file's own bytes, which must be UTF-8 (as
/// `serve` reads it).
///
/// A symbolic link is refused: `git show REV:link` gives the link's text (its target),
/// while `serve` and `check` read the file it points at, so a link whose target reads as
/// TOML (`#x`, a comment: an empty policy) would be compared as something no proxy runs.
pub(crate) fn show(root: &Path, rev: &str, path: &Path) -> Result<String, String> {
    if !inside(path) {
        return Err("is outside the repository".into());
    }
    let p = slash_path(path);
    let entries = tree_entries(root, rev, &p)?;
    let Some(entry) = entries.iter().find(|e| e.path == p) else {
        return Err(format!("does not exist at revision `{rev}`"));
    };
    let object = regular_file(entry, rev)?;
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["cat-file", "blob", object])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!("cannot be read at revision `{rev}`"));
    }
    String::from_utf8(out.stdout).map_err(|_| format!("is not UTF-8 text at revision `{rev}`"))
}

/// The `*.toml` files directly in `dir` at `rev`, sorted (none when the directory does
/// not exist). A symbolic link among them is refused, as by [`show`].
pub(crate) fn ls(root: &Path, rev: &str, dir: &Path) -> Result<Vec<PathBuf>, String> {
    if !inside(dir) {
        return Err(format!("{}: is outside the repository", dir.display()));
    }
    let d = format!("{}/", slash_path(dir).trim_end_matches('/'));
    let mut out = Vec::new();
    for e in tree_entries(root, rev, &d)? {
        if !e.path.ends_with(".toml") {
            continue;
        }
        regular_file(&e, rev).map_err(|why| format!("{}: {why}", e.path))?;
        out.push(PathBuf::from(&e.path));
    }
    Ok(out)
}

/// One line of `git ls-tree`: mode, object and path (as git stores it, unquoted).
struct Entry {
    mode: String,
    object: String,
    path: String,
}

/// `git ls-tree -z REV -- spec`: NUL-separated, so no path is quoted or split.
fn tree_entries(root: &Path, rev: &str, spec: &str) -> Result<Vec<Entry>, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-tree", "-z", rev, "--", spec])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("git ls-tree {rev}: {}", err.trim()));
    }
    let mut entries = Vec::new();
    for record in out.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let record = String::from_utf8_lossy(record);
        let Some((meta, path)) = record.split_once('\t') else { continue };
        let mut parts = meta.split(' ');
        let (Some(mode), Some(_kind), Some(object)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        entries.push(Entry { mode: mode.into(), object: object.into(), path: path.into() });
    }
    Ok(entries)
}

/// The object of a regular file's entry; anything else (a symbolic link, a submodule,
/// a directory) is an error saying what it is.
fn regular_file<'a>(e: &'a Entry, rev: &str) -> Result<&'a str, String> {
    match e.mode.as_str() {
        "100644" | "100755" => Ok(&e.object),
        "120000" => Err(format!(
            "is a symbolic link at revision `{rev}`: `policy diff` reads the text git holds, not the file it points at, which `serve` would read; commit the file itself"
        )),
        _ => Err(format!("is not a regular file at revision `{rev}`")),
    }
}

/// A commit id for display, short.
pub(crate) fn short(root: &Path, rev: &str) -> Result<String, String> {
    run(root, &["rev-parse", "--verify", "--short=12", &format!("{rev}^{{commit}}")])
        .map_err(|_| format!("unknown git revision `{rev}`"))
}

/// The default base of a pull request: the merge-base of `HEAD` with the default
/// branch (`origin/HEAD`, else `origin/main`, `main`, `origin/master`, `master`).
pub(crate) fn default_base(root: &Path) -> Result<String, String> {
    let mut candidates = Vec::new();
    if let Ok(r) = run(root, &["rev-parse", "--abbrev-ref", "origin/HEAD"]) {
        candidates.push(r);
    }
    for c in ["origin/main", "main", "origin/master", "master"] {
        candidates.push(c.to_string());
    }
    for c in candidates {
        if run(root, &["rev-parse", "--verify", "--quiet", &format!("{c}^{{commit}}")]).is_ok() {
            return run(root, &["merge-base", "HEAD", &c]);
        }
    }
    Err("no default branch (origin/HEAD, main or master) to compare with: name FROM".into())
}

/// Whether `path` (relative to the top of the work tree) names a file in it: no root,
/// no `..` ([`slash_path`] drops them, which would name another file).
fn inside(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
}

/// Git wants `/` separators and no `./`.
fn slash_path(p: &Path) -> String {
    p.components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}
