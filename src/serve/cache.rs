//! The pull-through cache: a bundle asked for by name and not in the served directory is
//! fetched from the upstream **once**, however many leaves ask at once, and served to them
//! as it arrives; it becomes a complete cached bundle only once its signatures (the
//! configured `[trust]`) and every frame checked out.
//!
//! Store layout (in the cache directory, never served as files):
//! - `frames/<blake3>-<clen>-<len>`: a chunk frame, checked (decompressed to its signed
//!   length and hash). A frame is a chunk's content, so bundles sharing a chunk (successive
//!   versions) share the file: each shared chunk is fetched and stored once.
//! - `bundles/<id>/head`: the head (header, manifest, signatures) as fetched and verified;
//!   `bundles/<id>/delta-<offset>`: the bundle's delta frames (checked for shape only: their
//!   content depends on the base image, which only the leaves hold; the leaves check the
//!   chunks they rebuild); `bundles/<id>/meta.json`: the name it was fetched as, complete.
//! - `*.part`: a frame still arriving. An interrupted download continues from its length
//!   (the [`HttpSource`] resumes within a download, the part files across downloads and
//!   restarts); a resumed frame that does not check out is fetched again whole.
//!
//! Disk use is bounded: before a download, the oldest versions (semver, then least recently
//! used) that no response is reading are evicted, then frames no remaining bundle uses.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::library::IndexEntry;
use super::stats::Stats;
use crate::bundle::head::BundleHead;
use crate::bundle::signature::TrustedKeys;
use crate::bundle::{Chunk, Digest};
use crate::error::{Error, Result};
use crate::source::http::{HttpOptions, HttpSource};
use crate::source::RangeSource;

/// A failed upstream fetch is not tried again for this long (a LAN client asking for a name
/// in a loop must not turn into a loop over the expensive link).
const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// A bundle the cache had no room for is asked for again sooner: room comes back as soon as
/// the responses holding the other bundles end.
const NO_SPACE_MEMORY: Duration = Duration::from_secs(2);

fn failure_memory(f: &Failure) -> Duration {
    match f {
        Failure::NoSpace(_) => NO_SPACE_MEMORY,
        _ => FAILURE_MEMORY,
    }
}

/// Failed names remembered at most.
const MAX_FAILURES: usize = 1024;

/// How the cache is set up.
pub struct CacheOptions {
    pub dir: PathBuf,
    /// A directory URL: the bundle's name is appended.
    pub upstream: String,
    pub trust: Arc<TrustedKeys>,
    pub net: HttpOptions,
    pub max_bytes: u64,
    pub revalidate: Duration,
    pub max_downloads: usize,
    pub stats: Arc<Stats>,
}

/// Why a cached bundle cannot be served; the HTTP layer maps each to a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstream has no such bundle (`404`).
    NotFound,
    /// Too many upstream downloads at once (`503`).
    Busy,
    /// The cache cannot make room: everything is being served (`507`).
    NoSpace(String),
    /// The upstream's bytes were refused: signatures, format, a frame that does not check
    /// out (`502`).
    Refused(String),
    /// The upstream could not be read (`502`).
    Upstream(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NotFound => f.write_str("not found upstream"),
            Failure::Busy => f.write_str("too many upstream downloads"),
            Failure::NoSpace(s) => write!(f, "no space in the cache: {s}"),
            Failure::Refused(s) => write!(f, "refused: {s}"),
            Failure::Upstream(s) => write!(f, "upstream: {s}"),
        }
    }
}

fn failure_of(e: Error) -> Failure {
    match e {
        Error::Network { reason, .. }
            if reason.starts_with("HTTP 404") || reason.starts_with("HTTP 410") =>
        {
            Failure::NotFound
        }
        Error::Network { .. } | Error::SourceChanged { .. } | Error::Io { .. } => {
            Failure::Upstream(e.to_string())
        }
        other => Failure::Refused(other.to_string()),
    }
}

/// Identity of a stored frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FrameKey {
    /// A chunk frame: any frame of this length decompressing to this content serves.
    Chunk { hash: Digest, clen: u32, len: u32 },
    /// A delta frame, private to its bundle.
    Delta { bundle: String, offset: u64 },
}

/// How a frame is checked before it counts as stored.
#[derive(Debug, Clone)]
enum Check {
    Chunk(Chunk),
    /// Shape only: one current zstd frame declaring this length.
    Delta {
        len: u32,
    },
}

/// One frame in a bundle's byte layout.
#[derive(Debug, Clone)]
struct Seg {
    /// Bundle offset of its first byte.
    start: u64,
    len: u64,
    key: FrameKey,
    check: Check,
}

impl Seg {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A bundle the cache holds (completely or in part).
pub struct Cached {
    pub id: String,
    pub compatible: String,
    pub version: semver::Version,
    pub security_version: u64,
    /// Bytes of the whole bundle.
    pub len: u64,
    head_len: u64,
    segs: Vec<Seg>,
    dir: PathBuf,
    complete: AtomicBool,
    downloading: AtomicBool,
    /// Responses reading it: never evicted while above zero.
    users: AtomicUsize,
    last_used: AtomicU64,
    /// Bumped as bytes arrive and frames complete, and when a download stops.
    progress: watch::Sender<u64>,
}

impl Cached {
    fn bump(&self) {
        self.progress.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    fn seg_at(&self, pos: u64) -> usize {
        self.segs.partition_point(|s| s.end() <= pos)
    }
}

/// A frame's state in the store.
enum FrameState {
    Present {
        bytes: u64,
    },
    /// Being downloaded: this many bytes are in its part file.
    Arriving {
        avail: Arc<AtomicU64>,
    },
}

struct NameEntry {
    id: String,
    /// When the upstream last confirmed it (`None`: not since the start).
    checked: Option<Instant>,
}

/// One upstream download, shared by every request that waits for it.
pub struct Download {
    state: watch::Sender<DlState>,
}

#[derive(Clone)]
enum DlState {
    Opening,
    Ready(Arc<Cached>),
    Failed(Failure),
}

#[derive(Default)]
struct Inner {
    bundles: HashMap<String, Arc<Cached>>,
    names: HashMap<String, NameEntry>,
    frames: HashMap<FrameKey, FrameState>,
    downloads: HashMap<String, Arc<Download>>,
    failures: HashMap<String, (Instant, Failure)>,
    /// Bytes in the store, including what downloads under way have reserved.
    usage: u64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    name: String,
    id: String,
    complete: bool,
    fetched_at: u64,
}

type Listener = Box<dyn Fn() + Send + Sync>;

/// The cache.
pub struct Cache {
    opts: CacheOptions,
    inner: Mutex<Inner>,
    on_change: Mutex<Option<Listener>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(context, e)
}

impl Cache {
    /// Open (or create) the store and load what it holds (blocking).
    pub fn open(mut opts: CacheOptions) -> Result<Cache> {
        if !opts.upstream.ends_with('/') {
            opts.upstream.push('/');
        }
        for d in ["frames", "bundles"] {
            let p = opts.dir.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        let cache = Cache {
            opts,
            inner: Mutex::new(Inner::default()),
            on_change: Mutex::new(None),
        };
        cache.load()?;
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call `f` whenever the set of cached bundles changes.
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.on_change.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    fn changed(&self) {
        if let Some(f) = self
            .on_change
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f();
        }
    }

    /// Bytes in the store.
    pub fn usage(&self) -> u64 {
        self.lock().usage
    }

    fn frame_path(&self, key: &FrameKey, part: bool) -> PathBuf {
        let sfx = if part { ".part" } else { "" };
        match key {
            FrameKey::Chunk { hash, clen, len } => self
                .opts
                .dir
                .join("frames")
                .join(format!("{hash}-{clen}-{len}{sfx}")),
            FrameKey::Delta { bundle, offset } => self
                .opts
                .dir
                .join("bundles")
                .join(bundle)
                .join(format!("delta-{offset}{sfx}")),
        }
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.opts.dir.join("bundles").join(id)
    }

    /// Build the in-memory description of a verified head.
    fn describe(&self, head: &BundleHead, trust: &TrustedKeys) -> Result<Cached> {
        let verified = head.verify(trust)?;
        let id = verified.id.to_hex();
        let m = &verified.manifest;
        let po = head.header.payload_offset();
        let mut segs = Vec::new();
        for p in &m.payloads {
            for c in &p.chunks {
                if c.clen == 0 {
                    continue;
                }
                segs.push(Seg {
                    start: po + c.offset,
                    len: u64::from(c.clen),
                    key: FrameKey::Chunk {
                        hash: c.hash,
                        clen: c.clen,
                        len: c.len,
                    },
                    check: Check::Chunk(c.clone()),
                });
            }
            for d in &p.deltas {
                for f in &d.frames {
                    segs.push(Seg {
                        start: po + f.offset,
                        len: u64::from(f.clen),
                        key: FrameKey::Delta {
                            bundle: id.clone(),
                            offset: f.offset,
                        },
                        check: Check::Delta { len: f.len },
                    });
                }
            }
        }
        segs.sort_by_key(|s| s.start);
        // Validated manifests have contiguous frames filling the payload: checked again here
        // because reads map every byte to exactly one frame.
        let mut at = po;
        for s in &segs {
            if s.start != at {
                return Err(Error::Format(format!(
                    "bundle {id}: frames are not contiguous at byte {at}"
                )));
            }
            at = s.end();
        }
        if at != head.header.total_len() {
            return Err(Error::Format(format!(
                "bundle {id}: frames end at {at}, the bundle at {}",
                head.header.total_len()
            )));
        }
        let (progress, _) = watch::channel(0);
        Ok(Cached {
            dir: self.bundle_dir(&id),
            id,
            compatible: m.compatible.clone(),
            version: m.version.clone(),
            security_version: m.security_version,
            len: head.header.total_len(),
            head_len: po,
            segs,
            complete: AtomicBool::new(false),
            downloading: AtomicBool::new(false),
            users: AtomicUsize::new(0),
            last_used: AtomicU64::new(0),
            progress,
        })
    }

    /// Read the store at start: bundles (heads verified again: the trust may have changed),
    /// frames, and the bytes they take.
    fn load(&self) -> Result<()> {
        let mut inner = self.lock();
        let frames_dir = self.opts.dir.join("frames");
        let rd = std::fs::read_dir(&frames_dir)
            .map_err(io_err(format!("reading {}", frames_dir.display())))?;
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if !m.is_file() {
                continue;
            }
            inner.usage += m.len();
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(key) = parse_chunk_name(&name) {
                inner
                    .frames
                    .insert(key, FrameState::Present { bytes: m.len() });
            }
        }
        let bundles_dir = self.opts.dir.join("bundles");
        let rd = std::fs::read_dir(&bundles_dir)
            .map_err(io_err(format!("reading {}", bundles_dir.display())))?;
        let mut names: HashMap<String, (u64, String)> = HashMap::new();
        for e in rd.flatten() {
            let dir = e.path();
            let id = e.file_name().to_string_lossy().into_owned();
            let loaded = (|| -> Result<(Cached, Meta)> {
                let meta: Meta = serde_json::from_slice(
                    &std::fs::read(dir.join("meta.json"))
                        .map_err(io_err(format!("reading {}", dir.display())))?,
                )
                .map_err(|e| Error::Format(e.to_string()))?;
                let head_bytes = std::fs::read(dir.join("head"))
                    .map_err(io_err(format!("reading {}", dir.display())))?;
                let head = BundleHead::read(&mut &head_bytes[..])?;
                let c = self.describe(&head, &self.opts.trust)?;
                if c.id != id || meta.id != id {
                    return Err(Error::Format("id does not match its directory".into()));
                }
                Ok((c, meta))
            })();
            let (c, meta) = match loaded {
                Ok(v) => v,
                Err(err) => {
                    super::log(format!("cache: dropping {}: {err}", dir.display()));
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
            };
            for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let Ok(m) = f.metadata() else { continue };
                inner.usage += m.len();
                let fname = f.file_name().to_string_lossy().into_owned();
                if let Some(off) = fname
                    .strip_prefix("delta-")
                    .and_then(|o| o.parse::<u64>().ok())
                {
                    inner.frames.insert(
                        FrameKey::Delta {
                            bundle: id.clone(),
                            offset: off,
                        },
                        FrameState::Present { bytes: m.len() },
                    );
                }
            }
            let all_there = c.segs.iter().all(|s| {
                matches!(inner.frames.get(&s.key), Some(FrameState::Present { bytes }) if *bytes == s.len)
            });
            c.complete
                .store(meta.complete && all_there, Ordering::Release);
            c.last_used.store(meta.fetched_at, Ordering::Relaxed);
            let newer = names
                .get(&meta.name)
                .is_none_or(|(t, _)| meta.fetched_at >= *t);
            if newer {
                names.insert(meta.name.clone(), (meta.fetched_at, id.clone()));
            }
            inner.bundles.insert(id, Arc::new(c));
        }
        for (name, (_, id)) in names {
            inner.names.insert(name, NameEntry { id, checked: None });
        }
        super::log(format!(
            "cache {}: {} bundle(s), {} MiB of {} MiB",
            self.opts.dir.display(),
            inner.bundles.len(),
            inner.usage >> 20,
            self.opts.max_bytes >> 20
        ));
        Ok(())
    }

    /// What the index lists: every name the cache answers for, with the bundle it maps to.
    pub fn index_entries(&self) -> Vec<IndexEntry> {
        let inner = self.lock();
        let mut out: Vec<IndexEntry> = inner
            .names
            .iter()
            .filter_map(|(name, ne)| {
                let c = inner.bundles.get(&ne.id)?;
                Some(IndexEntry {
                    name: name.clone(),
                    path: format!("/{name}"),
                    compatible: c.compatible.clone(),
                    version: c.version.to_string(),
                    security_version: c.security_version,
                    bundle_id: c.id.clone(),
                    size: c.len,
                    complete: c.is_complete(),
                    origin: "cache".into(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The bundle `name`, from the store or the upstream: waits for the upstream's head when
    /// it has to be fetched, then returns at once (its frames stream as they arrive).
    pub async fn get(self: &Arc<Self>, name: &str) -> std::result::Result<Reader, Failure> {
        let dl = {
            let mut inner = self.lock();
            if let Some(dl) = inner.downloads.get(name).cloned() {
                let state = dl.state.borrow().clone();
                match state {
                    DlState::Ready(c) => return Ok(self.reader(c)),
                    DlState::Failed(f) => return Err(f),
                    DlState::Opening => {
                        // A revalidation: the complete copy serves meanwhile.
                        if let Some(c) = self.complete_for(&inner, name) {
                            return Ok(self.reader(c));
                        }
                        dl
                    }
                }
            } else if let Some(c) = self.complete_for(&inner, name) {
                let stale = inner.names.get(name).is_none_or(|ne| {
                    ne.checked
                        .is_none_or(|t| t.elapsed() >= self.opts.revalidate)
                });
                if stale {
                    // Best effort: when every download slot is taken, the next request tries.
                    let _ = self.start_download(&mut inner, name);
                }
                return Ok(self.reader(c));
            } else {
                if let Some((t, f)) = inner.failures.get(name) {
                    if t.elapsed() < failure_memory(f) {
                        return Err(f.clone());
                    }
                }
                self.start_download(&mut inner, name)?
            }
        };
        let mut rx = dl.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                DlState::Opening => {}
                DlState::Ready(c) => return Ok(self.reader(c)),
                DlState::Failed(f) => return Err(f),
            }
            if rx.changed().await.is_err() {
                return Err(Failure::Upstream("the download stopped".into()));
            }
        }
    }

    fn complete_for(&self, inner: &Inner, name: &str) -> Option<Arc<Cached>> {
        let ne = inner.names.get(name)?;
        inner
            .bundles
            .get(&ne.id)
            .filter(|c| c.is_complete())
            .cloned()
    }

    fn reader(self: &Arc<Self>, c: Arc<Cached>) -> Reader {
        c.users.fetch_add(1, Ordering::AcqRel);
        c.last_used.store(unix_now(), Ordering::Relaxed);
        Reader {
            guard: Arc::new(UseGuard(c)),
            cache: self.clone(),
        }
    }

    fn start_download(
        self: &Arc<Self>,
        inner: &mut Inner,
        name: &str,
    ) -> std::result::Result<Arc<Download>, Failure> {
        if inner.downloads.len() >= self.opts.max_downloads {
            return Err(Failure::Busy);
        }
        let (state, _) = watch::channel(DlState::Opening);
        let dl = Arc::new(Download { state });
        inner.downloads.insert(name.to_string(), dl.clone());
        inner.failures.remove(name);
        let cache = self.clone();
        let name = name.to_string();
        let d = dl.clone();
        // The upstream client is blocking (it sleeps between retries): its own thread.
        tokio::task::spawn_blocking(move || cache.run_download(&name, &d));
        Ok(dl)
    }

    fn run_download(&self, name: &str, dl: &Download) {
        let result = self.download(name, dl);
        let mut inner = self.lock();
        inner.downloads.remove(name);
        match result {
            Ok(c) => {
                dl.state.send_replace(DlState::Ready(c));
            }
            Err(f) => {
                super::log(format!("cache: {name}: {f}"));
                if inner.failures.len() >= MAX_FAILURES {
                    inner.failures.clear();
                }
                inner
                    .failures
                    .insert(name.to_string(), (Instant::now(), f.clone()));
                dl.state.send_replace(DlState::Failed(f));
            }
        }
        drop(inner);
        self.changed();
    }

    /// Open the upstream, verify the head, and fetch what the store lacks.
    fn download(&self, name: &str, dl: &Download) -> std::result::Result<Arc<Cached>, Failure> {
        let url = format!("{}{name}", self.opts.upstream);
        let mut src = HttpSource::open(&url, &self.opts.net).map_err(failure_of)?;
        let counters = src.counters();
        let result = (|| {
            let head_bytes = read_head(&mut src).map_err(failure_of)?;
            let head = BundleHead::read(&mut &head_bytes[..]).map_err(|e| failure_of(e.into()))?;
            if src.len() != head.header.total_len() {
                return Err(Failure::Refused(format!(
                    "{name} is {} bytes, its header says {}",
                    src.len(),
                    head.header.total_len()
                )));
            }
            let fresh = self
                .describe(&head, &self.opts.trust)
                .map_err(|e| Failure::Refused(e.to_string()))?;
            let c = {
                let mut inner = self.lock();
                inner.names.insert(
                    name.to_string(),
                    NameEntry {
                        id: fresh.id.clone(),
                        checked: Some(Instant::now()),
                    },
                );
                inner.bundles.get(&fresh.id).cloned()
            };
            let c = match c {
                Some(c) if c.is_complete() => {
                    // A revalidation that found the bundle it had.
                    dl.state.send_replace(DlState::Ready(c.clone()));
                    return Ok(c);
                }
                Some(c) => c,
                None => {
                    std::fs::create_dir_all(&fresh.dir)
                        .and_then(|()| {
                            crate::fsutil::write_atomic(&fresh.dir.join("head"), &head_bytes, 0o644)
                                .map_err(|e| e.source)
                        })
                        .map_err(|e| Failure::NoSpace(format!("writing the head: {e}")))?;
                    let c = Arc::new(fresh);
                    let mut inner = self.lock();
                    inner.usage += head_bytes.len() as u64;
                    inner.bundles.insert(c.id.clone(), c.clone());
                    c
                }
            };
            // Room first, while the answer can still be `507`: once the head is served as
            // `200`, a cache that cannot hold the frames could only cut the response short.
            self.check_room(&c)?;
            self.write_meta(&c, name, false);
            c.downloading.store(true, Ordering::Release);
            dl.state.send_replace(DlState::Ready(c.clone()));
            self.changed();
            let filled = self.fill(&c, &mut src);
            c.downloading.store(false, Ordering::Release);
            c.bump();
            filled?;
            c.complete.store(true, Ordering::Release);
            self.write_meta(&c, name, true);
            super::log(format!(
                "cache: {name}: {} {} complete (bundle {})",
                c.compatible, c.version, c.id
            ));
            Ok(c)
        })();
        Stats::add(&self.opts.stats.upstream_bytes, counters.wire_bytes());
        result
    }

    fn write_meta(&self, c: &Cached, name: &str, complete: bool) {
        let meta = Meta {
            name: name.to_string(),
            id: c.id.clone(),
            complete,
            fetched_at: unix_now(),
        };
        let bytes = serde_json::to_vec_pretty(&meta).expect("meta serializes");
        if let Err(e) = crate::fsutil::write_atomic(&c.dir.join("meta.json"), &bytes, 0o644) {
            super::log(format!("cache: {e}"));
        }
    }

    /// Fetch every frame of `c` the store lacks (several rounds: a frame another download
    /// was fetching may have failed there).
    fn fill(&self, c: &Arc<Cached>, src: &mut HttpSource) -> std::result::Result<(), Failure> {
        for _round in 0..3 {
            let mut todo: Vec<(usize, u64)> = Vec::new();
            let mut waiting_on_others = false;
            {
                let mut inner = self.lock();
                let mut planned = HashSet::new();
                let mut need = 0u64;
                for (i, s) in c.segs.iter().enumerate() {
                    match inner.frames.get(&s.key) {
                        Some(FrameState::Present { .. }) => continue,
                        Some(FrameState::Arriving { .. }) => {
                            waiting_on_others = true;
                            continue;
                        }
                        None => {}
                    }
                    if !planned.insert(s.key.clone()) {
                        continue;
                    }
                    let have = std::fs::metadata(self.frame_path(&s.key, true))
                        .map_or(0, |m| m.len())
                        .min(s.len);
                    todo.push((i, have));
                    need += s.len - have;
                }
                if todo.is_empty() && !waiting_on_others {
                    return Ok(());
                }
                self.make_room(&mut inner, need, c)?;
                for (i, have) in &todo {
                    inner.frames.insert(
                        c.segs[*i].key.clone(),
                        FrameState::Arriving {
                            avail: Arc::new(AtomicU64::new(readable(*have, c.segs[*i].len))),
                        },
                    );
                }
                inner.usage += need;
                if need > 0 {
                    Stats::add(&self.opts.stats.upstream_fetches, 1);
                }
            }
            c.bump();
            let mut w = Writer::new(self, c, todo);
            let r = w.run(src);
            w.abort_unfinished();
            r?;
            if waiting_on_others {
                // Frames another download fetches: wait for it to end, then look again.
                while self.any_arriving(c) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            if c.segs.iter().all(|s| {
                matches!(
                    self.lock().frames.get(&s.key),
                    Some(FrameState::Present { .. })
                )
            }) {
                return Ok(());
            }
        }
        Err(Failure::Upstream(
            "frames still missing after three rounds".into(),
        ))
    }

    /// Make room now for the frames of `c` the store lacks (evicting as [`Self::make_room`]
    /// does); a bundle larger than the whole cache evicts nothing.
    fn check_room(&self, c: &Cached) -> std::result::Result<(), Failure> {
        let mut inner = self.lock();
        let mut seen = HashSet::new();
        let need: u64 = c
            .segs
            .iter()
            .filter(|s| !inner.frames.contains_key(&s.key) && seen.insert(&s.key))
            .map(|s| s.len)
            .sum();
        if need + c.head_len > self.opts.max_bytes {
            return Err(Failure::NoSpace(format!(
                "bundle {} needs {} bytes, the cache holds at most {}",
                c.id,
                need + c.head_len,
                self.opts.max_bytes
            )));
        }
        self.make_room(&mut inner, need, c)
    }

    fn any_arriving(&self, c: &Cached) -> bool {
        let inner = self.lock();
        c.segs
            .iter()
            .any(|s| matches!(inner.frames.get(&s.key), Some(FrameState::Arriving { .. })))
    }

    /// Evict until `need` more bytes fit: the oldest versions first (then the least recently
    /// used), never `keep`, a bundle being read, or one being downloaded.
    fn make_room(
        &self,
        inner: &mut Inner,
        need: u64,
        keep: &Cached,
    ) -> std::result::Result<(), Failure> {
        while inner.usage + need > self.opts.max_bytes {
            let victim = inner
                .bundles
                .values()
                .filter(|b| {
                    b.id != keep.id
                        && b.users.load(Ordering::Acquire) == 0
                        && !b.downloading.load(Ordering::Acquire)
                })
                .min_by(|a, b| {
                    a.version.cmp(&b.version).then(
                        a.last_used
                            .load(Ordering::Relaxed)
                            .cmp(&b.last_used.load(Ordering::Relaxed)),
                    )
                })
                .cloned();
            let Some(v) = victim else {
                return Err(Failure::NoSpace(format!(
                    "{} more bytes do not fit in {} (in use: {}), and every cached bundle is being served",
                    need, self.opts.max_bytes, inner.usage
                )));
            };
            super::log(format!(
                "cache: evicting {} {} (bundle {}) to make room",
                v.compatible, v.version, v.id
            ));
            inner.bundles.remove(&v.id);
            inner.names.retain(|_, ne| ne.id != v.id);
            inner.usage = inner.usage.saturating_sub(dir_bytes(&v.dir));
            let _ = std::fs::remove_dir_all(&v.dir);
            inner
                .frames
                .retain(|k, _| !matches!(k, FrameKey::Delta { bundle, .. } if *bundle == v.id));
            // Frames (and part files) no remaining bundle uses.
            let mut used: HashSet<&FrameKey> = keep.segs.iter().map(|s| &s.key).collect();
            for b in inner.bundles.values() {
                used.extend(b.segs.iter().map(|s| &s.key));
            }
            let frames_dir = self.opts.dir.join("frames");
            let mut freed = 0u64;
            let mut gone = Vec::new();
            for e in std::fs::read_dir(&frames_dir)
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(key) = parse_chunk_name(name.trim_end_matches(".part")) else {
                    continue;
                };
                if used.contains(&key) {
                    continue;
                }
                freed += e.metadata().map_or(0, |m| m.len());
                let _ = std::fs::remove_file(e.path());
                gone.push(key);
            }
            for k in gone {
                inner.frames.remove(&k);
            }
            inner.usage = inner.usage.saturating_sub(freed);
        }
        Ok(())
    }

    /// Bytes of `key` readable now: `(bytes, whether it is the checked file)`.
    fn available(&self, key: &FrameKey) -> Option<(u64, bool)> {
        match self.lock().frames.get(key)? {
            FrameState::Present { bytes } => Some((*bytes, true)),
            FrameState::Arriving { avail } => Some((avail.load(Ordering::Acquire), false)),
        }
    }
}

/// Keeps a cached bundle from eviction while a response reads it.
struct UseGuard(Arc<Cached>);

impl Drop for UseGuard {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
        self.0.last_used.store(unix_now(), Ordering::Relaxed);
    }
}

/// Reads one cached bundle for a response (cheap to clone: one per range of a response).
#[derive(Clone)]
pub struct Reader {
    guard: Arc<UseGuard>,
    cache: Arc<Cache>,
}

/// The file a [`Reader`] has open: frame index and file.
pub type OpenFrame = Option<(usize, bool, Arc<File>)>;

impl Reader {
    pub fn bundle(&self) -> &Arc<Cached> {
        &self.guard.0
    }

    /// Up to `max` bytes at `pos`, waiting for them while they are on their way from the
    /// upstream. `waiting` counts the time spent so (a connection is not idle then).
    pub async fn read(
        &self,
        pos: u64,
        max: usize,
        open: &mut OpenFrame,
        waiting: &AtomicUsize,
    ) -> io::Result<Bytes> {
        let c = self.bundle();
        if pos < c.head_len {
            let n = (c.head_len - pos).min(max as u64) as usize;
            let path = c.dir.join("head");
            return blocking(move || {
                let f = File::open(&path)?;
                read_at(&f, pos, n)
            })
            .await;
        }
        let i = c.seg_at(pos);
        let Some(seg) = c.segs.get(i) else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the bundle",
            ));
        };
        let off = pos - seg.start;
        let mut rx = c.progress.subscribe();
        loop {
            let avail = self.cache.available(&seg.key);
            if let Some((a, checked)) = avail {
                if a > off {
                    let n = (a - off).min(max as u64) as usize;
                    let file = match open {
                        Some((j, was_checked, f)) if *j == i && (*was_checked || !checked) => {
                            f.clone()
                        }
                        _ => {
                            let f = Arc::new(self.open_frame(&seg.key, checked).await?);
                            *open = Some((i, checked, f.clone()));
                            f
                        }
                    };
                    return blocking(move || read_at(&file, off, n)).await;
                }
            } else if !c.downloading.load(Ordering::Acquire) {
                return Err(io::Error::other(format!(
                    "bundle {}: bytes at {pos} are not in the cache and no download is under way",
                    c.id
                )));
            }
            waiting.fetch_add(1, Ordering::AcqRel);
            let r = rx.changed().await;
            waiting.fetch_sub(1, Ordering::AcqRel);
            if r.is_err() {
                return Err(io::Error::other("the cache is shutting down"));
            }
        }
    }

    async fn open_frame(&self, key: &FrameKey, checked: bool) -> io::Result<File> {
        let first = self.cache.frame_path(key, !checked);
        let second = self.cache.frame_path(key, checked);
        blocking(move || {
            // A part file is renamed when its frame checks out: then the other name.
            File::open(&first).or_else(|_| File::open(&second))
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

fn read_at(f: &File, pos: u64, n: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, pos)?;
    Ok(Bytes::from(buf))
}

/// The head of a bundle through a range source: the header, then the rest of the head.
fn read_head(src: &mut HttpSource) -> Result<Vec<u8>> {
    let len = src.len();
    let hl = crate::bundle::HEADER_LEN as u64;
    if len < hl {
        return Err(Error::Truncated("ends inside the header".into()));
    }
    let mut out = Vec::new();
    let get = |src: &mut HttpSource, r: Range<u64>, out: &mut Vec<u8>| {
        src.fetch(&[r], &mut |_, b| {
            out.extend_from_slice(b);
            Ok(())
        })
    };
    get(src, 0..hl, &mut out)?;
    let header = crate::bundle::Header::decode(out[..].try_into().expect("64 bytes"))?;
    let end = header.payload_offset().min(len);
    get(src, hl..end, &mut out)?;
    Ok(out)
}

/// Bytes of a frame still arriving that responses may read, when `have` of its `len` are in
/// its part file: all but the last until the frame checks out. A response streaming a frame
/// as it arrives then never ends before the check: a frame that does not check out cuts the
/// response short (the client sees a truncated body), it is never served whole.
fn readable(have: u64, len: u64) -> u64 {
    have.min(len.saturating_sub(1))
}

fn parse_chunk_name(name: &str) -> Option<FrameKey> {
    let mut it = name.split('-');
    let (h, c, l) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || h.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(h, &mut hash).ok()?;
    Some(FrameKey::Chunk {
        hash: Digest(hash),
        clen: c.parse().ok()?,
        len: l.parse().ok()?,
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Writes what the upstream sends into part files, checks each frame as it completes and
/// makes it a stored frame.
struct Writer<'a> {
    cache: &'a Cache,
    c: &'a Arc<Cached>,
    /// (segment index, bytes already in its part file), by offset.
    todo: Vec<(usize, u64)>,
    cur: usize,
    file: Option<(usize, File)>,
    done: Vec<bool>,
    /// Resumed frames that did not check out: fetched again whole.
    redo: Vec<usize>,
    dec: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl<'a> Writer<'a> {
    fn new(cache: &'a Cache, c: &'a Arc<Cached>, todo: Vec<(usize, u64)>) -> Self {
        let n = todo.len();
        Writer {
            cache,
            c,
            todo,
            cur: 0,
            file: None,
            done: vec![false; n],
            redo: Vec::new(),
            dec: None,
            buf: Vec::new(),
            out: Vec::new(),
        }
    }

    fn run(&mut self, src: &mut HttpSource) -> std::result::Result<(), Failure> {
        // Part files already whole (a download stopped between the last byte and the check).
        for t in 0..self.todo.len() {
            let (i, have) = self.todo[t];
            if have == self.c.segs[i].len {
                self.finish(t, true)?;
            }
        }
        let ranges: Vec<Range<u64>> = self
            .todo
            .iter()
            .filter(|(i, have)| *have < self.c.segs[*i].len)
            .map(|(i, have)| self.c.segs[*i].start + have..self.c.segs[*i].end())
            .collect();
        self.fetch(src, &ranges)?;
        if !self.redo.is_empty() {
            let again: Vec<Range<u64>> = std::mem::take(&mut self.redo)
                .into_iter()
                .map(|t| {
                    let s = &self.c.segs[self.todo[t].0];
                    self.todo[t].1 = 0;
                    s.start..s.end()
                })
                .collect();
            self.cur = 0;
            self.fetch(src, &again)?;
            if !self.redo.is_empty() {
                return Err(Failure::Refused("a frame did not check out twice".into()));
            }
        }
        Ok(())
    }

    fn fetch(
        &mut self,
        src: &mut HttpSource,
        ranges: &[Range<u64>],
    ) -> std::result::Result<(), Failure> {
        if ranges.is_empty() {
            return Ok(());
        }
        let mut failure = None;
        let r = src.fetch(ranges, &mut |off, bytes| {
            self.write(off, bytes).map_err(|f| {
                let e = Error::Format(f.to_string());
                failure = Some(f);
                e
            })
        });
        match (r, failure) {
            (_, Some(f)) => Err(f),
            (Err(e), None) => Err(failure_of(e)),
            (Ok(()), None) => Ok(()),
        }
    }

    fn write(&mut self, mut off: u64, mut bytes: &[u8]) -> std::result::Result<(), Failure> {
        while !bytes.is_empty() {
            while self.cur < self.todo.len() && self.c.segs[self.todo[self.cur].0].end() <= off {
                self.cur += 1;
            }
            let Some(&(i, _)) = self.todo.get(self.cur) else {
                return Err(Failure::Upstream(format!("unexpected bytes at {off}")));
            };
            let seg = &self.c.segs[i];
            if off < seg.start {
                return Err(Failure::Upstream(format!("unexpected bytes at {off}")));
            }
            let n = ((seg.end() - off) as usize).min(bytes.len());
            let at = off - seg.start;
            if self.file.as_ref().is_none_or(|(j, _)| *j != i) {
                let path = self.cache.frame_path(&seg.key, true);
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| Failure::NoSpace(format!("{}: {e}", path.display())))?;
                self.file = Some((i, f));
            }
            let (_, f) = self.file.as_ref().expect("opened above");
            f.write_all_at(&bytes[..n], at)
                .map_err(|e| Failure::NoSpace(format!("writing the cache: {e}")))?;
            let now = at + n as u64;
            if let Some(FrameState::Arriving { avail }) = self.cache.lock().frames.get(&seg.key) {
                avail.store(readable(now, seg.len), Ordering::Release);
            }
            self.c.bump();
            if now == seg.len {
                self.finish(self.cur, false)?;
            }
            off += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// The last byte of frame `t` arrived: make it durable, check it, store it.
    fn finish(&mut self, t: usize, resumed_whole: bool) -> std::result::Result<(), Failure> {
        let (i, had) = self.todo[t];
        let seg = &self.c.segs[i];
        let part = self.cache.frame_path(&seg.key, true);
        if let Some((j, f)) = self.file.take() {
            if j == i {
                f.sync_data()
                    .map_err(|e| Failure::NoSpace(format!("syncing the cache: {e}")))?;
            }
        }
        self.buf.clear();
        let read = File::open(&part).and_then(|f| {
            use std::io::Read;
            f.take(seg.len + 1).read_to_end(&mut self.buf)
        });
        let verdict = match read {
            Err(e) => Err(format!("reading {}: {e}", part.display())),
            Ok(_) if self.buf.len() as u64 != seg.len => {
                Err(format!("{} bytes, {} expected", self.buf.len(), seg.len))
            }
            Ok(_) => self.check(seg),
        };
        if let Err(why) = verdict {
            if had > 0 || resumed_whole {
                // Bytes kept from an earlier run may be what a power cut left: fetch it whole.
                let _ = std::fs::remove_file(&part);
                if let Some(FrameState::Arriving { avail }) = self.cache.lock().frames.get(&seg.key)
                {
                    avail.store(0, Ordering::Release);
                }
                self.redo.push(t);
                return Ok(());
            }
            let _ = std::fs::remove_file(&part);
            self.cache.lock().frames.remove(&seg.key);
            self.c.bump();
            return Err(Failure::Refused(format!(
                "the frame at byte {} ({} bytes) does not check out: {why}",
                seg.start, seg.len
            )));
        }
        let fin = self.cache.frame_path(&seg.key, false);
        std::fs::rename(&part, &fin)
            .map_err(|e| Failure::NoSpace(format!("storing {}: {e}", fin.display())))?;
        self.cache
            .lock()
            .frames
            .insert(seg.key.clone(), FrameState::Present { bytes: seg.len });
        self.done[t] = true;
        self.c.bump();
        Ok(())
    }

    fn check(&mut self, seg: &Seg) -> std::result::Result<(), String> {
        match &seg.check {
            Check::Chunk(chunk) => {
                if self.dec.is_none() {
                    self.dec =
                        Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
                }
                let dec = self.dec.as_mut().expect("created above");
                crate::bundle::decode::decode_chunk(dec, chunk, &self.buf, &mut self.out)
            }
            Check::Delta { len } => crate::bundle::frame::check_frame(&self.buf, *len),
        }
    }

    /// After a failed or finished fetch: frames that did not arrive are no longer arriving
    /// (their part files stay, for the next download to continue), and the bytes reserved
    /// for them are given back.
    fn abort_unfinished(&mut self) {
        let mut inner = self.cache.lock();
        for (t, &(i, _)) in self.todo.iter().enumerate() {
            if self.done[t] {
                continue;
            }
            let seg = &self.c.segs[i];
            if let Some(FrameState::Arriving { avail }) = inner.frames.get(&seg.key) {
                let got = avail.load(Ordering::Acquire);
                inner.usage = inner.usage.saturating_sub(seg.len - got.min(seg.len));
                inner.frames.remove(&seg.key);
            }
        }
        drop(inner);
        self.c.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_frame_names_round_trip() {
        let key = FrameKey::Chunk {
            hash: Digest::of(b"x"),
            clen: 12,
            len: 4096,
        };
        let FrameKey::Chunk { hash, clen, len } = &key else {
            unreachable!()
        };
        let name = format!("{hash}-{clen}-{len}");
        assert_eq!(parse_chunk_name(&name), Some(key));
        assert_eq!(parse_chunk_name("x-1-2"), None);
        assert_eq!(parse_chunk_name(&format!("{name}-3")), None);
    }
}
