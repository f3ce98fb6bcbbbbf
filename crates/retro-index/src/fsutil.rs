//! Atomic writes, checksums and the small versioned header of the crate's binary files.

use crate::error::{IndexError, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[cfg(target_endian = "big")]
compile_error!("retro-index stores little-endian arrays and views them in place: big-endian targets are not supported");

/// Bytes of the header of every binary array file: 8 magic bytes, u32 format version, u32 reserved.
/// 16 bytes keep the payload aligned for u32, u64 and f32 views.
pub const HEADER_LEN: usize = 16;

pub(crate) fn header(magic: &[u8; 8], version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h
}

/// Checks the header of a mapped file and returns its payload.
pub(crate) fn check_header<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: &[u8; 8],
    version: u32,
) -> Result<&'a [u8]> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != magic {
        return Err(IndexError::corrupt(
            path,
            format!(
                "bad header (expected magic {:?})",
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if found != version {
        return Err(IndexError::Version {
            path: path.to_path_buf(),
            found,
            expected: version,
        });
    }
    Ok(&bytes[HEADER_LEN..])
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `path` atomically: a temporary file beside it, fsync, rename.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = tmp_name(path);
    let res = (|| {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| IndexError::io(path, e))
}

/// Writes a JSON value atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    })
}

/// Reads a JSON file, naming the file in errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IndexError::missing(path, "no such file")
        } else {
            IndexError::io(path, e)
        }
    })?;
    // Editors on Windows write a byte-order mark; JSON parsers reject it.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    serde_json::from_slice(bytes).map_err(|e| IndexError::corrupt(path, e.to_string()))
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| IndexError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| IndexError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Hex SHA-256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Whether `s` is hex digits only, with a length in `len` (ids, checksums read from files).
pub fn is_hex(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Memory-maps a file read-only (an empty file gives an empty map).
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IndexError::missing(path, "no such file")
        } else {
            IndexError::io(path, e)
        }
    })?;
    // SAFETY: the database files are written once (atomically) and never modified in place;
    // a concurrent writer replacing the directory renames, it does not truncate mapped files.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| IndexError::io(path, e))
}

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
    let Some(parent) = out.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    }) else {
        return;
    };
    let prefix = format!(".{}.", staged_name(out));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let pid = ["building-", "old-"]
            .iter()
            .find_map(|t| rest.strip_prefix(t))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
            if !alive {
                if rest.starts_with("old-") && !out.exists() {
                    let _ = std::fs::rename(e.path(), out);
                } else {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

impl StagedDir {
    /// Checks that `out` may be written (absent; or, with `overwrite`, empty or holding `marker`)
    /// and creates the temporary directory beside it. `what` names the kind in errors.
    pub fn new(out: &Path, marker: &str, what: &str, overwrite: bool) -> Result<StagedDir> {
        if out.exists() {
            if !out.is_dir() {
                return Err(IndexError::invalid(
                    "out_dir",
                    out.display(),
                    format!("is a file, not a {what} directory"),
                ));
            }
            let empty = std::fs::read_dir(out)
                .map_err(|e| IndexError::io(out, e))?
                .next()
                .is_none();
            if !empty && !out.join(marker).is_file() {
                return Err(IndexError::invalid(
                    "out_dir",
                    out.display(),
                    format!(
                        "holds files but is not a {what} (no {marker}): refusing to replace it; \
                         choose a new or empty directory"
                    ),
                ));
            }
            if !empty && !overwrite {
                return Err(IndexError::invalid(
                    "out_dir",
                    out.display(),
                    format!("already holds a {what} (pass --overwrite to replace it)"),
                ));
            }
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| IndexError::io(parent, e))?;
        }
        remove_stale_siblings(out);
        let tmp = staged_sibling(out, "building");
        std::fs::create_dir(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
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
                    return Err(IndexError::io(&self.out, e));
                }
                Err(_) => {}
            }
        }
        // Two renames where the exchange is not available; a crash between them leaves the old
        // version under `.NAME.old-PID-*`, which the next build puts back.
        let mut old = None;
        if self.out.exists() {
            let o = staged_sibling(&self.out, "old");
            std::fs::rename(&self.out, &o).map_err(|e| IndexError::io(&self.out, e))?;
            old = Some(o);
        }
        if let Err(e) = std::fs::rename(&tmp, &self.out) {
            if let Some(o) = &old {
                let _ = std::fs::rename(o, &self.out);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(IndexError::io(&self.out, e));
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
