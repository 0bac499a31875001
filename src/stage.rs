//! Pre-staging (`edge-ota fetch`): download now, apply later. A ship stages in harbour and
//! applies at sea; a shop stages at night and applies in its maintenance window.
//!
//! The cache lives on the data partition, one directory per bundle (named by its id): the
//! head as fetched (`head`), a sparse file holding the fetched bytes at their bundle offsets
//! (`data`), and an index of the byte ranges present (`index.json`, replaced atomically after
//! the data it lists was fsynced). Only what the device lacks is fetched (the same plan an
//! apply makes: chunks in the slots, deltas from the running slot), and an interrupted fetch
//! continues from the exact byte. A range is listed only once its bytes are on disk; a fetch
//! is `complete` only once every frame it fetched was decoded and checked against the signed
//! manifest. `apply` reads staged frames instead of fetching them (`--offline`: only them).

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::install::engine::Staged;

const HEAD: &str = "head";
const DATA: &str = "data";
const INDEX: &str = "index.json";

/// What a staged bundle holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub bundle_id: String,
    pub version: String,
    /// Where it was fetched from (an `--offline` apply of that source finds it here).
    pub source: String,
    /// Byte ranges `[a, b)` of the bundle present in `data`, sorted, disjoint.
    pub present: Vec<[u64; 2]>,
    /// Compressed bytes the device still needs from the source, as planned.
    pub needed: u64,
    /// Every needed frame is present and was checked.
    pub complete: bool,
}

impl Index {
    /// Add `[a, b)`, merging neighbours.
    pub fn add(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let mut out: Vec<[u64; 2]> = Vec::with_capacity(self.present.len() + 1);
        let mut cur = [a, b];
        for r in self.present.drain(..) {
            if r[1] < cur[0] || r[0] > cur[1] {
                out.push(r);
            } else {
                cur = [cur[0].min(r[0]), cur[1].max(r[1])];
            }
        }
        out.push(cur);
        out.sort_unstable();
        self.present = out;
    }

    /// Remove `[a, b)` (a frame that failed its check).
    pub fn remove(&mut self, a: u64, b: u64) {
        let mut out = Vec::new();
        for r in self.present.drain(..) {
            if r[1] <= a || r[0] >= b {
                out.push(r);
                continue;
            }
            if r[0] < a {
                out.push([r[0], a]);
            }
            if r[1] > b {
                out.push([b, r[1]]);
            }
        }
        self.present = out;
    }

    pub fn contains(&self, r: &Range<u64>) -> bool {
        r.is_empty()
            || self
                .present
                .iter()
                .any(|p| p[0] <= r.start && r.end <= p[1])
    }

    /// The parts of `wanted` not present.
    pub fn missing(&self, wanted: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for w in wanted {
            let mut at = w.start;
            for p in &self.present {
                if p[1] <= at || p[0] >= w.end {
                    continue;
                }
                if p[0] > at {
                    out.push(at..p[0]);
                }
                at = at.max(p[1]);
            }
            if at < w.end {
                out.push(at..w.end);
            }
        }
        out
    }

    pub fn present_bytes(&self) -> u64 {
        self.present.iter().map(|r| r[1] - r[0]).sum()
    }
}

/// One staged bundle in the cache directory.
pub struct StagedBundle {
    dir: PathBuf,
    data: File,
    index: Mutex<Index>,
    /// Appended but not yet listed: (ranges, bytes, since).
    pending: Mutex<(Vec<Range<u64>>, u64, Instant)>,
}

/// An interrupted fetch or apply loses at most this much of what it had received.
const COMMIT_BYTES: u64 = 512 << 10;
const COMMIT_EVERY: Duration = Duration::from_secs(1);

impl StagedBundle {
    fn paths(cache_dir: &Path, bundle_id: &str) -> PathBuf {
        cache_dir.join(bundle_id)
    }

    /// Open (or start) the staging of a bundle whose head is `head` (its bytes as stored).
    pub fn open_or_create(
        cache_dir: &Path,
        bundle_id: &str,
        version: &str,
        source: &str,
        head: &[u8],
    ) -> Result<StagedBundle> {
        let dir = Self::paths(cache_dir, bundle_id);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let head_path = dir.join(HEAD);
        if std::fs::read(&head_path).ok().as_deref() != Some(head) {
            crate::fsutil::write_atomic(&head_path, head, 0o644)?;
        }
        let index = match Self::read_index(&dir)? {
            Some(i) if i.bundle_id == bundle_id => i,
            _ => Index {
                bundle_id: bundle_id.into(),
                version: version.into(),
                source: source.into(),
                ..Default::default()
            },
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(DATA))
            .ctx(|| format!("opening {}", dir.join(DATA).display()))?;
        Ok(StagedBundle {
            dir,
            data,
            index: Mutex::new(index),
            pending: Mutex::new((Vec::new(), 0, Instant::now())),
        })
    }

    /// An existing staging, if any.
    pub fn open(cache_dir: &Path, bundle_id: &str) -> Result<Option<StagedBundle>> {
        let dir = Self::paths(cache_dir, bundle_id);
        let Some(index) = Self::read_index(&dir)? else {
            return Ok(None);
        };
        let data = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(DATA))
        {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        Ok(Some(StagedBundle {
            dir,
            data,
            index: Mutex::new(index),
            pending: Mutex::new((Vec::new(), 0, Instant::now())),
        }))
    }

    fn read_index(dir: &Path) -> Result<Option<Index>> {
        let p = dir.join(INDEX);
        match std::fs::read(&p) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
        }
    }

    pub fn index(&self) -> Index {
        self.index.lock().expect("index lock").clone()
    }

    /// The staged head bytes (header, manifest, signatures).
    pub fn head(&self) -> Result<Vec<u8>> {
        let p = self.dir.join(HEAD);
        std::fs::read(&p).ctx(|| format!("reading {}", p.display()))
    }

    /// Running out of space is its own error (exit 20), naming the cache: the operator
    /// frees space, and the next fetch continues where this one stopped.
    fn no_space(&self, e: Error) -> Error {
        let enospc = match &e {
            Error::Io { source, .. } => {
                source.raw_os_error() == Some(nix::libc::ENOSPC)
                    || source.kind() == std::io::ErrorKind::StorageFull
            }
            _ => false,
        };
        if !enospc {
            return e;
        }
        let index = self.index.lock().expect("index lock");
        Error::TooLarge {
            payload: "staged bundle".into(),
            size: index.needed.saturating_sub(index.present_bytes()),
            target: format!(
                "the free space in {} (the disk filled up)",
                self.dir.display()
            ),
            capacity: free_space(&self.dir).unwrap_or(0),
        }
    }

    /// Write fetched bytes at their bundle offset (not yet listed as present).
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.data
            .write_all_at(bytes, offset)
            .ctx(|| format!("writing {}", self.dir.join(DATA).display()))
            .map_err(|e| self.no_space(e))
    }

    /// Make the data durable, then list `ranges` as present (atomically replaced index).
    pub fn commit(&self, ranges: &[Range<u64>], update: impl FnOnce(&mut Index)) -> Result<()> {
        self.data
            .sync_data()
            .ctx(|| format!("syncing {}", self.dir.join(DATA).display()))
            .map_err(|e| self.no_space(e))?;
        let mut next = self.index.lock().expect("index lock").clone();
        for r in ranges {
            next.add(r.start, r.end);
        }
        update(&mut next);
        let bytes = serde_json::to_vec_pretty(&next).expect("index serializes");
        crate::fsutil::write_atomic(&self.dir.join(INDEX), &bytes, 0o644)
            .map_err(|e| self.no_space(e.into()))?;
        // Listed in memory only once listed on disk.
        *self.index.lock().expect("index lock") = next;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep fetched bytes: written at once, listed as present every [`COMMIT_BYTES`] or
    /// [`COMMIT_EVERY`] (after an fsync of the data).
    pub fn append(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.write(offset, bytes)?;
        let due = {
            let mut p = self.pending.lock().expect("pending lock");
            match p.0.last_mut() {
                Some(r) if r.end == offset => r.end += bytes.len() as u64,
                _ => p.0.push(offset..offset + bytes.len() as u64),
            }
            p.1 += bytes.len() as u64;
            p.1 >= COMMIT_BYTES || p.2.elapsed() >= COMMIT_EVERY
        };
        if due {
            self.flush()?;
        }
        Ok(())
    }

    /// List everything appended so far.
    pub fn flush(&self) -> Result<()> {
        let ranges = {
            let mut p = self.pending.lock().expect("pending lock");
            p.1 = 0;
            p.2 = Instant::now();
            std::mem::take(&mut p.0)
        };
        if ranges.is_empty() {
            return Ok(());
        }
        self.commit(&ranges, |_| {})
    }

    /// Forget ranges that were used up (their chunks are written and checkpointed in the
    /// slot): the space goes back to the filesystem, so an apply that streams through the
    /// cache never holds more than what is in flight.
    pub fn discard(&self, ranges: &[Range<u64>]) -> Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        use std::os::fd::AsRawFd;
        if ranges.is_empty() {
            return Ok(());
        }
        // Bytes appended but not listed yet must not be listed later either: the next flush
        // would otherwise bring the range back over the hole punched below.
        {
            let mut p = self.pending.lock().expect("pending lock");
            let mut left = Index::default();
            for r in p.0.drain(..) {
                left.add(r.start, r.end);
            }
            for r in ranges {
                left.remove(r.start, r.end);
            }
            p.0 = left.present.iter().map(|r| r[0]..r[1]).collect();
        }
        self.commit(&[], |i| {
            for r in ranges {
                i.remove(r.start, r.end);
            }
        })?;
        for r in ranges {
            // Best effort: a filesystem without hole punching keeps the bytes until the
            // staging is removed.
            let _ = fallocate(
                self.data.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                r.start as i64,
                (r.end - r.start) as i64,
            );
        }
        Ok(())
    }
}

impl Staged for StagedBundle {
    fn has(&self, r: &Range<u64>) -> bool {
        self.index.lock().expect("index lock").contains(r)
    }

    fn prefix(&self, r: &Range<u64>) -> u64 {
        let idx = self.index.lock().expect("index lock");
        idx.present
            .iter()
            .find(|p| p[0] <= r.start && r.start < p[1])
            .map_or(0, |p| p[1].min(r.end) - r.start)
    }

    fn spool(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.append(offset, bytes)
    }

    fn flush(&self) -> Result<()> {
        StagedBundle::flush(self)
    }

    fn used(&self, ranges: &[Range<u64>]) -> Result<()> {
        self.discard(ranges)
    }

    fn read(&self, r: &Range<u64>, buf: &mut [u8]) -> Result<()> {
        self.data.read_exact_at(buf, r.start).ctx(|| {
            format!(
                "reading {} at byte {}",
                self.dir.join(DATA).display(),
                r.start
            )
        })
    }
}

/// Every staged bundle in `cache_dir`.
pub fn list(cache_dir: &Path) -> Vec<Index> {
    let Ok(rd) = std::fs::read_dir(cache_dir) else {
        return Vec::new();
    };
    let mut out: Vec<Index> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| StagedBundle::read_index(&e.path()).ok().flatten())
        .collect();
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out
}

/// The staged bundle fetched from `source`, if any (for `apply --offline SOURCE`).
pub fn find_by_source(cache_dir: &Path, source: &str) -> Option<Index> {
    list(cache_dir).into_iter().find(|i| i.source == source)
}

/// Remove staged bundles other than `keep` (superseded), or all.
pub fn remove_others(cache_dir: &Path, keep: Option<&str>) -> Result<()> {
    for i in list(cache_dir) {
        if Some(i.bundle_id.as_str()) != keep {
            let d = cache_dir.join(&i.bundle_id);
            std::fs::remove_dir_all(&d).ctx(|| format!("removing {}", d.display()))?;
        }
    }
    Ok(())
}

/// Remove staged bundles of `version` or older (superseded by an install of `version`).
pub fn remove_superseded(cache_dir: &Path, version: &semver::Version) -> Result<()> {
    for i in list(cache_dir) {
        let older = i
            .version
            .parse::<semver::Version>()
            .is_ok_and(|v| v <= *version);
        if older {
            remove(cache_dir, &i.bundle_id)?;
        }
    }
    Ok(())
}

/// Remove one staged bundle (installed).
pub fn remove(cache_dir: &Path, bundle_id: &str) -> Result<()> {
    let d = cache_dir.join(bundle_id);
    match std::fs::remove_dir_all(&d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", d.display()), e)),
    }
}

/// Free bytes on the filesystem holding `dir` (or its nearest existing parent).
pub fn free_space(dir: &Path) -> Result<u64> {
    let mut at = dir.to_path_buf();
    while !at.exists() {
        if !at.pop() {
            break;
        }
    }
    let st = nix::sys::statvfs::statvfs(&at)
        .map_err(|e| Error::io(format!("checking free space in {}", at.display()), e.into()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_merges_and_subtracts_ranges() {
        let mut i = Index::default();
        i.add(10, 20);
        i.add(30, 40);
        i.add(20, 30);
        assert_eq!(i.present, vec![[10, 40]]);
        assert_eq!(i.missing(&[0..15, 35..50]), vec![0..10, 40..50]);
        i.remove(15, 25);
        assert_eq!(i.present, vec![[10, 15], [25, 40]]);
        assert!(i.contains(&(26..40)));
        assert!(!i.contains(&(14..26)));
        assert_eq!(i.present_bytes(), 20);
    }

    #[test]
    fn remove_keeps_what_is_outside_the_cuts() {
        let left = |r: [u64; 2], cuts: &[[u64; 2]]| {
            let mut i = Index::default();
            i.add(r[0], r[1]);
            for c in cuts {
                i.remove(c[0], c[1]);
            }
            i.present
        };
        assert_eq!(
            left([0, 100], &[[10, 20], [50, 60]]),
            vec![[0, 10], [20, 50], [60, 100]]
        );
        assert_eq!(left([10, 20], &[[0, 100], [5, 6]]), Vec::<[u64; 2]>::new());
        assert_eq!(left([10, 20], &[[20, 30], [0, 10]]), vec![[10, 20]]);
    }

    /// A frame that failed its check is discarded while its bytes are still waiting to be
    /// listed: a later flush must not list them again over the punched hole.
    #[test]
    fn discarded_bytes_not_yet_listed_are_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let st = StagedBundle::open_or_create(dir.path(), "id", "1.0.0", "src", b"head").unwrap();
        st.append(0, &[7u8; 1000]).unwrap();
        st.discard(&[100..600, 2000..2100]).unwrap();
        st.flush().unwrap();
        assert_eq!(st.index().present, vec![[0, 100], [600, 1000]]);
    }
}
