//! Sizes and SHA-256 checksums: of one file ([`FileInfo`]), of a folder's files ([`FileTable`]),
//! and the content id derived from them.

use crate::error::{FormatError, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| FormatError::opening(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| FormatError::io(path, e))?;
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

/// Lowercase hex of bytes.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size and checksum of one file of a folder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileInfo {
    pub bytes: u64,
    pub sha256: String,
}

impl FileInfo {
    /// The size and SHA-256 of the file at `path`.
    pub fn of(path: &Path) -> Result<FileInfo> {
        let bytes = std::fs::metadata(path)
            .map_err(|e| FormatError::io(path, e))?
            .len();
        Ok(FileInfo {
            bytes,
            sha256: sha256_file(path)?,
        })
    }

    /// Errors unless the file at `path` has the recorded size: the cheap check, before any
    /// SHA-256. `recorded_in` names the file that recorded it. A missing file is
    /// [`FormatError::Missing`].
    pub fn check_size(&self, path: &Path, recorded_in: &str) -> Result<()> {
        let len = std::fs::metadata(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    FormatError::missing(
                        path,
                        format!("listed in {recorded_in}: the folder is incomplete"),
                    )
                } else {
                    FormatError::io(path, e)
                }
            })?
            .len();
        if len != self.bytes {
            return Err(FormatError::corrupt(
                path,
                format!("{len} bytes, {recorded_in} says {}", self.bytes),
            ));
        }
        Ok(())
    }

    /// Errors unless the file at `path` has this SHA-256. `recorded_in` names the file that
    /// recorded it ("the manifest", "dataset.json"); `remedy` says what to do about a mismatch.
    pub fn check_sha256(&self, path: &Path, recorded_in: &str, remedy: &str) -> Result<()> {
        let sha = sha256_file(path)?;
        if sha != self.sha256 {
            return Err(FormatError::corrupt(
                path,
                format!(
                    "SHA-256 {sha} differs from {recorded_in}'s {}: the file was damaged after it \
                     was written; {remedy}",
                    self.sha256
                ),
            ));
        }
        Ok(())
    }
}

/// A folder's files, by path relative to the folder, with their sizes and checksums: what every
/// manifest of the project lists (as a JSON object, name -> `{bytes, sha256}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct FileTable(BTreeMap<String, FileInfo>);

impl FileTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The size and SHA-256 of each of `names` in `dir`.
    pub fn record<S: AsRef<str>>(dir: &Path, names: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut t = Self::new();
        for name in names {
            t.add(dir, name.as_ref())?;
        }
        Ok(t)
    }

    /// Records the file `name` of `dir`.
    pub fn add(&mut self, dir: &Path, name: &str) -> Result<()> {
        let info = FileInfo::of(&dir.join(name))?;
        self.0.insert(name.to_string(), info);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&FileInfo> {
        self.0.get(name)
    }
    pub fn get_mut(&mut self, name: &str) -> Option<&mut FileInfo> {
        self.0.get_mut(name)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &FileInfo)> {
        self.0.iter()
    }
    /// The sum of the listed files' sizes.
    pub fn total_bytes(&self) -> u64 {
        self.0.values().map(|f| f.bytes).sum()
    }
    /// The listed names, in order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// Errors unless the table lists each of `names`: a manifest (at `manifest`) that lists less
    /// than its kind needs is corrupt.
    pub fn require<S: AsRef<str>>(
        &self,
        manifest: &Path,
        names: impl IntoIterator<Item = S>,
    ) -> Result<()> {
        for name in names {
            let name = name.as_ref();
            if !self.contains(name) {
                return Err(FormatError::corrupt(manifest, format!("lists no {name}")));
            }
        }
        Ok(())
    }

    /// Checks every listed file of `dir`: its size always, its SHA-256 where `hash(name, info)`
    /// says so. `recorded_in` names the manifest in errors, `remedy` what to do about a mismatch.
    pub fn check(
        &self,
        dir: &Path,
        recorded_in: &str,
        remedy: &str,
        hash: impl Fn(&str, &FileInfo) -> bool,
    ) -> Result<()> {
        for (name, info) in &self.0 {
            let p = dir.join(name);
            info.check_size(&p, recorded_in)?;
            if hash(name, info) {
                info.check_sha256(&p, recorded_in, remedy)?;
            }
        }
        Ok(())
    }

    /// The id of a folder built from these files with these parameters: the first 16 hex digits
    /// of the SHA-256 of the parameters and of every file's name and checksum, so that the same
    /// inputs give the same id on every machine.
    pub fn content_id(&self, params: &str) -> String {
        let digests = self
            .0
            .iter()
            .map(|(k, v)| format!("{k}={}", v.sha256))
            .collect::<Vec<_>>()
            .join(",");
        sha256_bytes(format!("{params}|{digests}").as_bytes())[..16].to_string()
    }
}

impl<'a> IntoIterator for &'a FileTable {
    type Item = (&'a String, &'a FileInfo);
    type IntoIter = std::collections::btree_map::Iter<'a, String, FileInfo>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// `table["name"]`, for a name the manifest is known to list (checked by [`FileTable::require`]).
impl std::ops::Index<&str> for FileTable {
    type Output = FileInfo;
    fn index(&self, name: &str) -> &FileInfo {
        &self.0[name]
    }
}
