//! The bundles an operator put in the served directory: found by name (`*.eota`, `*.bin`,
//! regular files only, no links followed, nothing below the top level), described by their
//! head (read once per file version), and opened for serving only if the file is still the
//! one that was scanned. Request paths are never joined to the directory: a request names a
//! bundle by an exact entry of this library, or gets `404`.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::bundle::head::BundleHead;
use crate::bundle::signature::TrustedKeys;
use crate::bundle::Manifest;

/// What the index says of one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IndexEntry {
    pub name: String,
    /// Its path on this server.
    pub path: String,
    pub compatible: String,
    pub version: String,
    pub security_version: u64,
    /// blake3 of the signed manifest (the bundle's `ETag`, quoted).
    pub bundle_id: String,
    /// Bytes.
    pub size: u64,
    /// Every byte is here and checked (a bundle still arriving from the upstream: `false`).
    pub complete: bool,
    /// `local` (the directory) or `cache` (fetched from the upstream).
    pub origin: String,
}

/// `GET /index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Index {
    /// Schema version of this document.
    pub version: u32,
    /// HTTP API version.
    pub api: u32,
    pub instance: String,
    /// A pull-through cache: bundles not listed may be asked for by name.
    pub upstream: bool,
    pub bundles: Vec<IndexEntry>,
}

/// A bundle name a request may use: a plain file name (letters, digits, `.`, `_`, `-`), not
/// hidden, ending in `.eota` or `.bin`. Everything else is `404` before any file is touched.
pub fn valid_name(name: &str) -> bool {
    (1..=200).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && (name.ends_with(".eota") || name.ends_with(".bin"))
}

/// The identity of a file version: a replaced or rewritten file is looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        }
    }
}

/// One bundle of the directory.
#[derive(Debug)]
pub struct LocalBundle {
    pub name: String,
    pub path: PathBuf,
    pub id: String,
    pub compatible: String,
    pub version: semver::Version,
    pub security_version: u64,
    pub len: u64,
    file: FileId,
}

impl LocalBundle {
    pub fn index_entry(&self) -> IndexEntry {
        IndexEntry {
            name: self.name.clone(),
            path: format!("/{}", self.name),
            compatible: self.compatible.clone(),
            version: self.version.to_string(),
            security_version: self.security_version,
            bundle_id: self.id.clone(),
            size: self.len,
            complete: true,
            origin: "local".into(),
        }
    }

    /// Open for reading: no link followed, and still the file that was scanned (same device,
    /// inode, size and modification time); `None` otherwise (the next scan sees the change).
    pub fn open(&self) -> Option<File> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&self.path)
            .ok()?;
        let m = f.metadata().ok()?;
        (m.is_file() && FileId::of(&m) == self.file).then_some(f)
    }
}

/// The directory's bundles.
pub struct Library {
    dir: PathBuf,
    trust: Option<Arc<TrustedKeys>>,
    entries: RwLock<HashMap<String, Arc<LocalBundle>>>,
    /// Files that are not bundles (or not trusted), by name: not read again until they change.
    rejected: RwLock<HashMap<String, FileId>>,
}

impl Library {
    pub fn new(dir: &Path, trust: Option<Arc<TrustedKeys>>) -> Library {
        Library {
            dir: dir.to_path_buf(),
            trust,
            entries: RwLock::default(),
            rejected: RwLock::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<LocalBundle>> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<LocalBundle>> {
        let mut v: Vec<_> = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Look at the directory (blocking I/O: call it off the runtime's threads). Returns
    /// whether the set of bundles changed.
    pub fn scan(&self) -> bool {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            super::log(format!("cannot read {}", self.dir.display()));
            return false;
        };
        let mut seen: HashMap<String, (PathBuf, FileId)> = HashMap::new();
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !valid_name(&name) {
                continue;
            }
            // symlink_metadata: a link is never followed, whatever it points to.
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_file() {
                seen.insert(name, (e.path(), FileId::of(&m)));
            }
        }
        let mut changed = false;
        let current = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut next = HashMap::new();
        for (name, (path, id)) in seen {
            if let Some(b) = current.get(&name).filter(|b| b.file == id) {
                next.insert(name, b.clone());
                continue;
            }
            let known_bad = self
                .rejected
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name)
                == Some(&id);
            if known_bad {
                continue;
            }
            match self.describe(&name, &path, id) {
                Ok(b) => {
                    super::log(format!(
                        "serving {name}: {} {} (bundle {})",
                        b.compatible, b.version, b.id
                    ));
                    next.insert(name, Arc::new(b));
                    changed = true;
                }
                Err(why) => {
                    super::log(format!("not serving {name}: {why}"));
                    self.rejected
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name, id);
                }
            }
        }
        if next.len() != current.len() || current.keys().any(|k| !next.contains_key(k)) {
            changed = true;
        }
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = next;
        changed
    }

    /// Read a file's head. A file whose length is not its header's (still being copied in,
    /// truncated) is not a bundle yet.
    fn describe(&self, name: &str, path: &Path, id: FileId) -> Result<LocalBundle, String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| e.to_string())?;
        let head = BundleHead::read(&mut std::io::BufReader::new(&f)).map_err(|e| e.to_string())?;
        let total = head.header.total_len();
        if total != id.size {
            return Err(format!(
                "{} bytes, its header says {total} (still being copied?)",
                id.size
            ));
        }
        let manifest = match &self.trust {
            Some(t) => head.verify(t).map_err(|e| e.to_string())?.manifest,
            None => head.parse_unverified().map_err(|e| e.to_string())?,
        };
        Ok(LocalBundle {
            name: name.to_string(),
            path: path.to_path_buf(),
            id: Manifest::id(&head.manifest_bytes).to_hex(),
            compatible: manifest.compatible,
            version: manifest.version,
            security_version: manifest.security_version,
            len: total,
            file: id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn only_plain_bundle_names_are_valid() {
        for ok in ["v2.eota", "edge-os_2.1.0.bin", "A.eota"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".eota",
            ".hidden.eota",
            "../x.eota",
            "a/b.eota",
            "a%2fb.eota",
            "index.json",
            "x.eota.part",
            "spa ce.eota",
            "x.EOTA",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
