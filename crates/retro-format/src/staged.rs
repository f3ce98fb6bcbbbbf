//! A folder written beside its destination under a hidden name and swapped into place whole:
//! a crash leaves the old folder or the new one, never a mix.

use crate::error::{FormatError, Result};
use std::path::{Path, PathBuf};

/// A directory written beside its destination under a hidden temporary name, then swapped into
/// place by [`StagedDir::commit`]; dropped uncommitted, it is removed. The destination is replaced
/// only when it is empty or holds `marker` (the file that makes it one of ours, e.g. a database's
/// manifest): a folder of other files is never deleted. Leftovers of staged builds that died (their
/// process is gone) are removed when the next one starts.
pub struct StagedDir {
    tmp: Option<PathBuf>,
    out: PathBuf,
}

fn staged_name(out: &Path) -> String {
    out.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

fn staged_sibling(out: &Path, tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    out.with_file_name(format!(
        ".{}.{tag}-{}-{nanos}",
        staged_name(out),
        std::process::id()
    ))
}

/// Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`), so no instant exists where
/// neither is in place. Fails with `Unsupported` where the system or file system cannot.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: two NUL-terminated paths that outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    let _ = (a, b);
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Removes `.NAME.building-PID-*` and `.NAME.old-PID-*` siblings of `out` whose process is gone.
/// An `.old-` one is the previous version that a two-step swap had moved aside when it died: when
/// `out` itself is missing it is put back, never deleted.
fn remove_stale_siblings(out: &Path) {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        Some(_) => Path::new("."),
        None => return,
    };
    remove_stale(parent, Some(&staged_name(out)));
}

/// Removes what staged folders of `parent` left when their process died (any `NAME`), as
/// [`StagedDir::new`] does for its own destination: for a folder that one writer owns, such as a
/// training run's checkpoints.
pub fn remove_stale_staged(parent: &Path) {
    remove_stale(parent, None);
}

fn remove_stale(parent: &Path, only: Option<&str>) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(staged) = parse_staged(&name) else {
            continue;
        };
        if only.is_some_and(|o| o != staged.out) {
            continue;
        }
        let alive = staged.pid == std::process::id()
            || Path::new(&format!("/proc/{}", staged.pid)).exists();
        if alive {
            continue;
        }
        let out = parent.join(staged.out);
        if staged.old && !out.exists() {
            let _ = std::fs::rename(e.path(), out);
        } else {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

struct Staged<'a> {
    out: &'a str,
    old: bool,
    pid: u32,
}

/// `.NAME.building-PID-NANOS` or `.NAME.old-PID-NANOS`.
fn parse_staged(name: &str) -> Option<Staged<'_>> {
    let rest = name.strip_prefix('.')?;
    let (out, tail, old) = [("building-", false), ("old-", true)]
        .into_iter()
        .find_map(|(tag, old)| {
            let at = rest.rfind(&format!(".{tag}"))?;
            Some((&rest[..at], &rest[at + 1 + tag.len()..], old))
        })?;
    let pid = tail.split('-').next()?.parse().ok()?;
    Some(Staged { out, old, pid })
}

impl StagedDir {
    /// Checks that `out` may be written (absent; or, with `overwrite`, empty or holding `marker`)
    /// and creates the temporary directory beside it. `what` names the kind in errors.
    pub fn new(out: &Path, marker: &str, what: &str, overwrite: bool) -> Result<StagedDir> {
        if out.exists() {
            if !out.is_dir() {
                return Err(FormatError::invalid(
                    "out_dir",
                    out.display(),
                    format!("is a file, not a {what} directory"),
                ));
            }
            let empty = std::fs::read_dir(out)
                .map_err(|e| FormatError::io(out, e))?
                .next()
                .is_none();
            if !empty && !out.join(marker).is_file() {
                return Err(FormatError::invalid(
                    "out_dir",
                    out.display(),
                    format!(
                        "holds files but is not a {what} (no {marker}): refusing to replace it; \
                         choose a new or empty directory"
                    ),
                ));
            }
            if !empty && !overwrite {
                return Err(FormatError::invalid(
                    "out_dir",
                    out.display(),
                    format!("already holds a {what} (pass --overwrite to replace it)"),
                ));
            }
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| FormatError::io(parent, e))?;
        }
        remove_stale_siblings(out);
        let tmp = staged_sibling(out, "building");
        std::fs::create_dir(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
        Ok(StagedDir {
            tmp: Some(tmp),
            out: out.to_owned(),
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        self.tmp.as_deref().expect("not committed")
    }

    /// Moves the staged directory into place, swapping it with the old one (if any) in one step, so
    /// a crash leaves either the old or the new one at `out`; the old one is then removed.
    pub fn commit(mut self) -> Result<()> {
        let tmp = self.tmp.take().expect("not committed");
        if self.out.exists() {
            match exchange(&tmp, &self.out) {
                // `tmp` now holds the old version.
                Ok(()) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Ok(());
                }
                Err(e) if e.kind() != std::io::ErrorKind::Unsupported => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(FormatError::io(&self.out, e));
                }
                Err(_) => {}
            }
        }
        // Two renames where the exchange is not available; a crash between them leaves the old
        // version under `.NAME.old-PID-*`, which the next build puts back.
        let mut old = None;
        if self.out.exists() {
            let o = staged_sibling(&self.out, "old");
            std::fs::rename(&self.out, &o).map_err(|e| FormatError::io(&self.out, e))?;
            old = Some(o);
        }
        if let Err(e) = std::fs::rename(&tmp, &self.out) {
            if let Some(o) = &old {
                let _ = std::fs::rename(o, &self.out);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(FormatError::io(&self.out, e));
        }
        if let Some(o) = old {
            let _ = std::fs::remove_dir_all(o);
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if let Some(p) = self.tmp.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
