//! The few git commands `policy diff` needs. Revisions are read with `git show
//! REV:path` and `git ls-tree`: nothing is ever checked out over the user's work.

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

/// The file at `rev`, as text.
pub(crate) fn show(root: &Path, rev: &str, path: &Path) -> Result<String, String> {
    let spec = format!("{rev}:{}", slash_path(path));
    run(root, &["show", &spec]).map(|mut s| {
        // `run` trims the final newline; put it back so line counts match the file.
        s.push('\n');
        s
    })
}

/// The files directly in `dir` at `rev` (empty when the directory does not exist).
pub(crate) fn ls(root: &Path, rev: &str, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let d = format!("{}/", slash_path(dir).trim_end_matches('/'));
    let out = run(root, &["ls-tree", "--name-only", rev, "--", &d])?;
    Ok(out.lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect())
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
