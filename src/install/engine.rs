//! The apply engine: decide, chunk by chunk, where each chunk of the bundle comes from, then
//! produce every chunk, verify it against its signed hash, and write it where it goes.
//!
//! A chunk can be: already in the slot being written (an interrupted apply of the same bundle,
//! re-hashed), zeros, in the running slot (its recorded chunk table), rebuilt by a delta from
//! the running slot's image, in the staging cache, or fetched from the source. Only the last
//! two cost bytes from the source, and they are fetched together, in bundle order: from a file
//! or an HTTP URL by ranges, from a pipe by reading past what is not needed.
//!
//! Threads: a feeder obtains compressed bytes and hands out work; workers decode, verify and
//! write each chunk at its offset; the caller's thread syncs and checkpoints progress. All are
//! detached and own what they use: a failure returns at once even while the source is
//! stalled. Memory is flat in bundle size and small next to the 4 MiB chunks: one
//! compressed-frame buffer and one chunk buffer per worker, nothing else per chunk.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use super::blockdev::{AlignedBuf, PosWriter};
use crate::bundle::decode::decode_chunk_into;
use crate::bundle::head::{expect_end, read_exact_or_truncated};
use crate::bundle::{Manifest, Payload, Run};
use crate::error::{Error, Result};
use crate::failpoint::ChunkCountdown;
use crate::progress::{Bytes, Plan, Progress};
use crate::source::RangeSource;
use crate::state::{ChunkTable, ImageRecord, InstallProgress};

/// Where the compressed bytes come from.
pub enum Fetcher {
    /// A pipe, positioned at the first chunk: read in order, the unneeded skipped.
    Stream(Box<dyn Read + Send>),
    /// A file or URL, by ranges (absolute offsets).
    Ranges(Box<dyn RangeSource>),
    /// Nothing may be fetched (`--offline`): every chunk must be local or staged.
    Offline,
}

/// Compressed bytes staged on the device (the `fetch` cache, which an apply over the network
/// also spools through, so a frame cut by a power failure continues from its exact byte):
/// absolute bundle ranges that can be read locally.
pub trait Staged: Send + Sync {
    /// Whether every byte of `r` is staged.
    fn has(&self, r: &Range<u64>) -> bool;
    /// How many bytes of `r`, from its start, are staged.
    fn prefix(&self, r: &Range<u64>) -> u64;
    /// Read a staged range.
    fn read(&self, r: &Range<u64>, buf: &mut [u8]) -> Result<()>;
    /// Keep bytes as they arrive from the source.
    fn spool(&self, offset: u64, bytes: &[u8]) -> Result<()>;
    /// Make what was spooled count.
    fn flush(&self) -> Result<()>;
    /// These ranges are used up (their chunks are written and checkpointed).
    fn used(&self, ranges: &[Range<u64>]) -> Result<()>;
}

/// The running slot, for copies and deltas.
pub struct Base {
    pub file: File,
    /// Its image, as recorded at its install (or provisioning).
    pub image: Option<ImageRecord>,
    pub chunks: Option<ChunkTable>,
    pub version: Option<String>,
}

/// Everything the engine needs.
pub struct Inputs<'a> {
    pub manifest: Arc<Manifest>,
    /// Offset of the payload area in the bundle.
    pub payload_offset: u64,
    /// Per payload, where its bytes go.
    pub outs: Vec<Arc<PosWriter>>,
    pub base: Option<Arc<Base>>,
    /// An interrupted apply of this bundle into the same slot.
    pub resume: Option<&'a InstallProgress>,
    pub staged: Option<Arc<dyn Staged>>,
    /// Drop staged frames once their chunks are written and checkpointed (an apply, not the
    /// check at the end of a fetch).
    pub consume_staged: bool,
    /// Name of the source, for the plan.
    pub source_name: String,
}

/// How one chunk is produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Have,
    Zero,
    /// Copy from the running slot at this byte offset.
    Local(u64),
    /// Decode its own frame.
    Full,
    /// Rebuilt by delta `d` of its payload, from literal frame `f`.
    Delta(usize, usize),
}

/// The engine's plan: how every chunk is produced, and the bytes that entails.
pub struct EnginePlan {
    how: Vec<Vec<How>>,
    /// The plan as reported.
    pub summary: Plan,
    /// Chunks found already written and verified (resume).
    pub resumed: usize,
}

fn frame_range(payload_offset: u64, offset: u64, clen: u32) -> Range<u64> {
    payload_offset + offset..payload_offset + offset + u64::from(clen)
}

/// Decide how each chunk is produced. Reads the slot being written to re-check resumed
/// chunks; nothing is written.
pub fn plan(inp: &Inputs, offline: bool, progress: &Progress) -> Result<EnginePlan> {
    let m = &inp.manifest;
    let mut summary = Plan {
        source: inp.source_name.clone(),
        full_size: m.payloads.iter().map(|p| p.size).sum(),
        ..Default::default()
    };
    let mut resumed = 0usize;
    let mut how = Vec::with_capacity(m.payloads.len());
    let local: HashMap<crate::bundle::Digest, u64> = match inp.base.as_deref() {
        Some(Base {
            chunks: Some(t), ..
        }) => t
            .hashes
            .iter()
            .enumerate()
            .rev()
            .map(|(i, h)| (*h, i as u64 * u64::from(t.chunk_size)))
            .collect(),
        _ => HashMap::new(),
    };
    let mut buf = Vec::new();
    for (pi, p) in m.payloads.iter().enumerate() {
        let staged = |c: &crate::bundle::Chunk| {
            c.clen > 0
                && inp
                    .staged
                    .as_ref()
                    .is_some_and(|s| s.has(&frame_range(inp.payload_offset, c.offset, c.clen)))
        };
        let mut hs = Vec::with_capacity(p.chunks.len());
        for (i, c) in p.chunks.iter().enumerate() {
            let start = p.chunk_start(i);
            let done = inp.resume.is_some_and(|r| r.has(pi, i as u32)) && {
                buf.resize(c.len as usize, 0);
                inp.outs[pi].read_at(start, &mut buf).is_ok()
                    && blake3::hash(&buf).as_bytes() == &c.hash.0
            };
            let h = if done {
                resumed += 1;
                summary.reused_target += u64::from(c.len);
                How::Have
            } else if c.clen == 0 && p.chunk_size.is_some() {
                summary.reused_local += u64::from(c.len);
                How::Zero
            } else if let Some(&at) = local.get(&c.hash) {
                summary.reused_local += u64::from(c.len);
                How::Local(at)
            } else if staged(c) {
                summary.reused_cache += u64::from(c.len);
                How::Full
            } else {
                How::Full
            };
            hs.push(h);
        }
        // A delta from the running slot's image, for the chunks still to fetch, if it saves
        // enough: a delta that saves little is said so and not used.
        if let Some(di) = usable_delta(p, inp.base.as_deref()) {
            let d = &p.deltas[di];
            let mut delta_bytes = 0u64;
            let mut full_bytes = 0u64;
            let mut frames = Vec::new();
            for (k, f) in d.frames.iter().enumerate() {
                let [a, b] = f.chunks.map(|c| c as usize);
                if hs[a..b].contains(&How::Full) {
                    frames.push(k);
                    delta_bytes += u64::from(f.clen);
                    full_bytes += p.chunks[a..b]
                        .iter()
                        .zip(&hs[a..b])
                        .filter(|(c, h)| **h == How::Full && !staged(c))
                        .map(|(c, _)| u64::from(c.clen))
                        .sum::<u64>();
                }
            }
            // Chunks of the fetch no frame covers have no literal blocks: copies and zeros.
            let outside: u64 = p
                .chunks
                .iter()
                .zip(&hs)
                .enumerate()
                .filter(|(i, (c, h))| {
                    **h == How::Full
                        && !staged(c)
                        && !d
                            .frames
                            .iter()
                            .any(|f| (f.chunks[0] as usize..f.chunks[1] as usize).contains(i))
                })
                .map(|(_, (c, _))| u64::from(c.clen))
                .sum();
            full_bytes += outside;
            let from = d
                .base_version
                .clone()
                .unwrap_or_else(|| "the running image".into());
            if full_bytes > 0 && (delta_bytes as f64) < 0.8 * full_bytes as f64 {
                for (i, h) in hs.iter_mut().enumerate() {
                    if *h == How::Full && !staged(&p.chunks[i]) {
                        let f = d.frames.iter().position(|f| {
                            (f.chunks[0] as usize..f.chunks[1] as usize).contains(&i)
                        });
                        *h = How::Delta(di, f.unwrap_or(usize::MAX));
                    }
                }
                summary.delta_from = Some(from);
                summary.fetch_delta += delta_bytes;
            } else if full_bytes > 0 {
                progress.note(format!(
                    "the delta from {from} would fetch {delta_bytes} bytes against {full_bytes} for the full chunks: fetching the full chunks"
                ));
            }
        }
        for (c, h) in p.chunks.iter().zip(&hs) {
            if *h == How::Full && !staged(c) {
                summary.fetch += u64::from(c.clen);
            }
        }
        how.push(hs);
    }
    summary.fetch += summary.fetch_delta;
    summary.reused = summary.reused_target + summary.reused_local + summary.reused_cache;
    if offline && summary.fetch > 0 {
        return Err(Error::Offline(format!(
            "{} bytes are neither staged nor on this device; run `edge-ota fetch` while the link is up",
            summary.fetch
        )));
    }
    Ok(EnginePlan {
        how,
        summary,
        resumed,
    })
}

impl EnginePlan {
    /// Every frame the plan reads (staged or not), in bundle order: what `fetch` stages.
    pub fn frame_ranges(&self, inp: &Inputs) -> Vec<Range<u64>> {
        let (items, _) = work_list(inp, &self.how);
        let mut out: Vec<Range<u64>> = items
            .into_iter()
            .filter_map(|it| match it {
                Item::Frame(r, _) => Some(r),
                Item::Now(_) => None,
            })
            .collect();
        out.sort_by_key(|r| r.start);
        out
    }
}

/// The delta of `p` whose base is the running slot's recorded image.
fn usable_delta(p: &Payload, base: Option<&Base>) -> Option<usize> {
    let img = base?.image.as_ref()?;
    p.deltas
        .iter()
        .position(|d| d.base.size == img.size && d.base.blake3 == img.blake3)
}

/// What a worker is asked to do.
enum Work {
    /// Decode chunk `(p, i)` from its frame.
    Full(usize, usize, Vec<u8>),
    /// Rebuild these chunks of payload `p` with literal frame `f` of delta `d`.
    Delta(usize, usize, usize, Vec<u8>, Vec<usize>),
    /// Copy chunk `(p, i)` from the running slot.
    Local(usize, usize, u64),
}

/// What comes back.
enum Done {
    /// Verified and handed to the slot's writer: one per chunk of the work.
    Verified,
    /// All its bytes are written (not yet synced). A chunk that shares pages with chunks
    /// not yet verified is written when they are (or at the end of the pass), possibly by
    /// another worker; sent before the writer's own `Verified`.
    Written(usize, usize),
    /// A local copy or delta did not reproduce the chunk: fetch its full frame instead.
    Mismatch(usize, usize, String),
    /// The feeder is finished; a source that can be read again comes back for another pass.
    Fed(Option<Fetcher>),
}

/// Counts of one run.
#[derive(Debug, Default, Clone)]
pub struct RunReport {
    pub written: u64,
    pub fetched: u64,
    pub fell_back: usize,
}

/// Produce and write every chunk of the plan. `checkpoint(done)` is called every few chunks
/// after the writers were synced, with the chunks done so far (per payload, sorted indexes).
pub fn run(
    inp: &Inputs,
    plan: &EnginePlan,
    fetcher: Fetcher,
    workers: usize,
    progress: &Progress,
    checkpoint: &mut dyn FnMut(&[Vec<u32>]) -> Result<()>,
) -> Result<RunReport> {
    let m = &inp.manifest;
    let mut done: Vec<Vec<u32>> = plan
        .how
        .iter()
        .map(|hs| {
            hs.iter()
                .enumerate()
                .filter(|(_, h)| **h == How::Have)
                .map(|(i, _)| i as u32)
                .collect()
        })
        .collect();
    let mut report = RunReport::default();
    let total: u64 = m.payloads.iter().map(|p| p.size).sum();
    let mut written = plan.summary.reused_target;
    // Zeros are written in pieces from one small buffer: a chunk-sized one would cost as
    // much memory as a worker's.
    let zeros = AlignedBuf::new(ZERO_PIECE);
    // Crash tests stop dead after N chunks written, zeros included (feature failpoints only).
    let fail_after = Arc::new(ChunkCountdown::from_env());
    // (chunks, bytes, time) since the last checkpoint.
    let mut since_checkpoint = (0usize, 0u64, Instant::now());

    // Zero chunks are written here; everything else goes through the pipeline.
    for (pi, hs) in plan.how.iter().enumerate() {
        for (i, h) in hs.iter().enumerate() {
            if *h == How::Zero {
                let c = &m.payloads[pi].chunks[i];
                let p = &m.payloads[pi];
                fail_after.tick();
                let (start, len) = (p.chunk_start(i), u64::from(c.len));
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(ZERO_PIECE as u64);
                    inp.outs[pi].write_at(start + at, &zeros.as_slice()[..n as usize])?;
                    at += n;
                }
                done[pi].push(i as u32);
                written += u64::from(c.len);
            }
        }
    }

    let fetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut fallback: Vec<(usize, usize)> = Vec::new();
    let mut pass_how: Vec<Vec<How>> = plan.how.clone();
    let mut fetcher = Some(fetcher);
    for pass in 0..2 {
        let (work, n_results) = work_list(inp, &pass_how);
        if n_results == 0 {
            break;
        }
        // Which frame each chunk comes from, and how many chunks each frame still owes: a
        // frame whose chunks are all written and checkpointed is dropped from the spool.
        let mut frame_of: HashMap<(usize, usize), u64> = HashMap::new();
        let mut owed: HashMap<u64, (Range<u64>, usize)> = HashMap::new();
        // Only an apply that consumes the spool needs them (a 1 GiB format 1 bundle has
        // 16384 frames: a megabyte of maps for nothing).
        let consume = inp.staged.is_some() && inp.consume_staged;
        for it in work.iter().filter(|_| consume) {
            if let Item::Frame(r, w) = it {
                let chunks: Vec<(usize, usize)> = match w {
                    Work::Full(pi, i, _) => vec![(*pi, *i)],
                    Work::Delta(pi, _, _, _, wanted) => wanted.iter().map(|&i| (*pi, i)).collect(),
                    Work::Local(..) => Vec::new(),
                };
                owed.insert(r.start, (r.clone(), chunks.len()));
                for c in chunks {
                    frame_of.insert(c, r.start);
                }
            }
        }
        let mut used: Vec<Range<u64>> = Vec::new();
        let mut settle = |pi: usize, i: usize, used: &mut Vec<Range<u64>>| {
            if let Some(start) = frame_of.remove(&(pi, i)) {
                if let Some((r, n)) = owed.get_mut(&start) {
                    *n -= 1;
                    if *n == 0 {
                        used.push(r.clone());
                    }
                }
            }
        };
        let Some(f) = fetcher.take() else {
            return Err(Error::Offline(
                "chunks that could not be rebuilt locally must be fetched, and the source (a pipe) is already read: run apply again".into(),
            ));
        };
        let rx = start(inp, work, f, workers, fetched.clone(), fail_after.clone())?;
        let mut left = n_results;
        let mut fed = false;
        while left > 0 || !fed {
            match rx.done.recv() {
                Ok(Ok(Done::Fed(back))) => {
                    fed = true;
                    fetcher = back;
                }
                Ok(Ok(Done::Verified)) => left -= 1,
                Ok(Ok(Done::Written(pi, i))) => {
                    let len = u64::from(m.payloads[pi].chunks[i].len);
                    done[pi].push(i as u32);
                    written += len;
                    since_checkpoint.0 += 1;
                    since_checkpoint.1 += len;
                    settle(pi, i, &mut used);
                }
                Ok(Ok(Done::Mismatch(pi, i, why))) => {
                    if pass == 1 {
                        return Err(Error::Tampered {
                            payload: m.payloads[pi].name.clone(),
                            what: format!("chunk {i}: {why}"),
                        });
                    }
                    progress.note(format!(
                        "chunk {i} of {:?} not reproduced locally ({why}): fetching its full frame",
                        m.payloads[pi].name
                    ));
                    fallback.push((pi, i));
                    left -= 1;
                    settle(pi, i, &mut used);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::io(
                        "applying the bundle",
                        std::io::Error::other("pipeline stopped early"),
                    ))
                }
            }
            progress.bytes(Bytes {
                needed: plan.summary.fetch,
                fetched: fetched.load(std::sync::atomic::Ordering::Relaxed),
                written,
                total,
                reused: plan.summary.reused,
                ..Default::default()
            });
            // A kill or power cut loses at most about this much written work: 16 MiB or a
            // second, whichever comes first. Each checkpoint costs an fsync of the slot and
            // an atomic state write, so it is bounded by bytes, not by chunks (format 1's
            // 64 KiB chunks would checkpoint thousands of times per GiB). Lost work is
            // rewritten from the spool, not fetched again: frames leave it only once their
            // chunks are checkpointed.
            let (n, bytes, since) = since_checkpoint;
            if n > 0 && (bytes >= CHECKPOINT_BYTES || since.elapsed() >= Duration::from_secs(1)) {
                for o in &inp.outs {
                    o.sync()?;
                }
                done.iter_mut().for_each(|d| d.sort_unstable());
                checkpoint(&done)?;
                if let (Some(st), true) = (&inp.staged, inp.consume_staged) {
                    st.used(&std::mem::take(&mut used))?;
                }
                since_checkpoint = (0, 0, Instant::now());
            }
        }
        // Pages shared with chunks that are not part of this pass (already in the slot, or
        // to be fetched in the next) are completed from what the slot holds.
        for (pi, o) in inp.outs.iter().enumerate() {
            for i in o.flush()? {
                done[pi].push(i);
                written += u64::from(m.payloads[pi].chunks[i as usize].len);
            }
        }
        report.fell_back += fallback.len();
        if fallback.is_empty() {
            break;
        }
        // Second pass: the full frames of the chunks that did not come out right.
        pass_how = plan
            .how
            .iter()
            .map(|hs| vec![How::Have; hs.len()])
            .collect();
        for &(pi, i) in &fallback {
            pass_how[pi][i] = How::Full;
        }
        fallback.clear();
    }
    for o in &inp.outs {
        o.sync()?;
    }
    done.iter_mut().for_each(|d| d.sort_unstable());
    checkpoint(&done)?;
    report.written = written;
    report.fetched = fetched.load(std::sync::atomic::Ordering::Relaxed);
    Ok(report)
}

/// One unit for the feeder, in bundle order.
enum Item {
    /// Needs the frame at this range (from the staging cache or the source).
    Frame(Range<u64>, Work),
    /// Needs nothing fetched.
    Now(Work),
}

/// The work of a pass, ordered by where its bytes are in the bundle, and how many results
/// (chunks) it yields.
fn work_list(inp: &Inputs, how: &[Vec<How>]) -> (Vec<Item>, usize) {
    let m = &inp.manifest;
    let mut items = Vec::new();
    let mut results = 0;
    for (pi, hs) in how.iter().enumerate() {
        let p = &m.payloads[pi];
        let mut frames_wanted: Vec<(usize, usize, Vec<usize>)> = Vec::new();
        for (i, h) in hs.iter().enumerate() {
            match *h {
                How::Full => {
                    let c = &p.chunks[i];
                    items.push(Item::Frame(
                        frame_range(inp.payload_offset, c.offset, c.clen),
                        Work::Full(pi, i, Vec::new()),
                    ));
                    results += 1;
                }
                How::Local(at) => {
                    items.push(Item::Now(Work::Local(pi, i, at)));
                    results += 1;
                }
                How::Delta(d, f) => match frames_wanted.iter_mut().find(|w| (w.0, w.1) == (d, f)) {
                    Some(w) => w.2.push(i),
                    None => frames_wanted.push((d, f, vec![i])),
                },
                How::Have | How::Zero => {}
            }
        }
        for (d, f, wanted) in frames_wanted {
            results += wanted.len();
            if f == usize::MAX {
                // Chunks with no literal block: a frame of nothing.
                items.push(Item::Now(Work::Delta(pi, d, f, Vec::new(), wanted)));
            } else {
                let fr = &p.deltas[d].frames[f];
                items.push(Item::Frame(
                    frame_range(inp.payload_offset, fr.offset, fr.clen),
                    Work::Delta(pi, d, f, Vec::new(), wanted),
                ));
            }
        }
    }
    // Local work first (no source needed), then frames in bundle order.
    items.sort_by_key(|it| match it {
        Item::Now(_) => (0, 0),
        Item::Frame(r, _) => (1, r.start),
    });
    (items, results)
}

struct Running {
    done: Receiver<Result<Done>>,
    // Dropped with this struct: workers see it disconnect and stop.
    _cancel: Sender<()>,
}

fn start(
    inp: &Inputs,
    items: Vec<Item>,
    fetcher: Fetcher,
    workers: usize,
    fetched: Arc<std::sync::atomic::AtomicU64>,
    fail_after: Arc<ChunkCountdown>,
) -> Result<Running> {
    let m = inp.manifest.clone();
    let workers = workers.max(1);
    let max_out = m
        .payloads
        .iter()
        .flat_map(|p| p.chunks.iter().map(|c| c.len))
        .max()
        .unwrap_or(0) as usize;
    // Compressed frames: one buffer per worker, the feeder fills whichever is free. A worker
    // gives its frame back as soon as it is decoded, before writing, so the feeder keeps
    // ahead. With 4 MiB chunks these and the workers' chunk buffers are the bulk of the
    // memory an apply uses.
    // Each is reserved once at the largest frame: growing on demand would copy, and could
    // leave the allocator holding more than the frames need.
    let max_in = m
        .payloads
        .iter()
        .flat_map(|p| {
            let chunks = p.chunks.iter().map(|c| c.clen);
            let frames = p
                .deltas
                .iter()
                .flat_map(|d| d.frames.iter().map(|f| f.clen));
            chunks.chain(frames)
        })
        .max()
        .unwrap_or(0) as usize;
    let (free_in_tx, free_in_rx) = bounded::<Vec<u8>>(workers);
    for _ in 0..workers {
        free_in_tx
            .send(Vec::with_capacity(max_in))
            .expect("fresh pool");
    }
    let (work_tx, work_rx) = bounded::<Work>(workers);
    let (done_tx, done_rx) = unbounded::<Result<Done>>();
    let (cancel_tx, cancel_rx) = bounded::<()>(0);
    // One delta frame at a time: each holds its prefix (up to 8 MiB) and its literals while it
    // decodes, and two at once would double the peak.
    let delta_gate = Arc::new(std::sync::Mutex::new(()));

    {
        let done_tx = done_tx.clone();
        let staged = inp.staged.clone();
        let payload_offset = inp.payload_offset;
        let m = m.clone();
        std::thread::Builder::new()
            .name("bundle-feeder".into())
            .spawn(move || {
                let r = feed(
                    items,
                    fetcher,
                    staged,
                    payload_offset,
                    &m,
                    &free_in_rx,
                    &work_tx,
                    &fetched,
                );
                let _ = done_tx.send(r.map(Done::Fed));
            })
            .map_err(|e| Error::io("starting the bundle feeder", e))?;
    }
    for w in 0..workers {
        let work_rx = work_rx.clone();
        let done_tx = done_tx.clone();
        let free_in_tx = free_in_tx.clone();
        let cancel_rx = cancel_rx.clone();
        let outs = inp.outs.clone();
        let fail_after = fail_after.clone();
        let m = m.clone();
        let base = inp.base.clone();
        let delta_gate = delta_gate.clone();
        let staged = inp.staged.clone();
        let payload_offset = inp.payload_offset;
        std::thread::Builder::new()
            .name(format!("chunk-worker-{w}"))
            .spawn(move || {
                let mut dec = match zstd::bulk::Decompressor::new() {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = done_tx.send(Err(Error::io("creating zstd decompressor", e)));
                        return;
                    }
                };
                // This worker's chunk buffer, touched only once a chunk needs it; a chunk
                // starts in it where its first byte falls in a page (PosWriter::skew).
                let mut out = AlignedBuf::new(max_out + super::blockdev::ALIGN);
                let w = Writer {
                    outs: &outs,
                    fail_after: &fail_after,
                    done: &done_tx,
                };
                while let Some(work) = recv_or_cancel(&work_rx, &cancel_rx) {
                    // The bytes a frame came from, to forget them if they fail their check.
                    let from = match &work {
                        Work::Full(pi, i, _) => {
                            let c = &m.payloads[*pi].chunks[*i];
                            Some(frame_range(payload_offset, c.offset, c.clen))
                        }
                        Work::Delta(pi, d, f, _, _) if *f != usize::MAX => {
                            let fr = &m.payloads[*pi].deltas[*d].frames[*f];
                            Some(frame_range(payload_offset, fr.offset, fr.clen))
                        }
                        _ => None,
                    };
                    let r = match work {
                        Work::Full(pi, i, compressed) => {
                            let r = full(
                                &m,
                                &mut dec,
                                pi,
                                i,
                                &compressed,
                                w.chunk(&m, pi, i, &mut out),
                            );
                            let _ = free_in_tx.send(compressed);
                            r.and_then(|()| w.write(&m, pi, i, &out))
                        }
                        Work::Local(pi, i, at) => {
                            local(&m, base.as_deref(), pi, i, at, &mut out, &w)
                        }
                        Work::Delta(pi, d, f, compressed, wanted) => {
                            let _one = delta_gate.lock().unwrap_or_else(|e| e.into_inner());
                            let r = delta(
                                &m,
                                base.as_deref(),
                                (pi, d, f),
                                &wanted,
                                &compressed,
                                &mut out,
                                &w,
                            );
                            let _ = free_in_tx.send(compressed);
                            r
                        }
                    };
                    match r {
                        Ok(ds) => {
                            for d in ds {
                                if done_tx.send(Ok(d)).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            // A frame that fails its check must not stay spooled or staged:
                            // the next try (another source, a retry) fetches it again
                            // instead of failing on the same bad bytes forever.
                            if let (Error::Tampered { .. }, Some(st), Some(r)) = (&e, &staged, from)
                            {
                                let _ = st.used(&[r]);
                            }
                            let _ = done_tx.send(Err(e));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::io("starting a chunk worker", e))?;
    }
    Ok(Running {
        done: done_rx,
        _cancel: cancel_tx,
    })
}

/// The feeder: obtain each frame (staging cache, else the source, in bundle order) and hand
/// out the work.
#[allow(clippy::too_many_arguments)]
fn feed(
    items: Vec<Item>,
    fetcher: Fetcher,
    staged: Option<Arc<dyn Staged>>,
    payload_offset: u64,
    m: &Manifest,
    free_in: &Receiver<Vec<u8>>,
    work: &Sender<Work>,
    fetched: &std::sync::atomic::AtomicU64,
) -> Result<Option<Fetcher>> {
    let stopped = || Error::io("feeding", std::io::Error::other("stopped"));
    let mut remote: Vec<(Range<u64>, Work)> = Vec::new();
    for it in items {
        match it {
            Item::Now(w) => work.send(w).map_err(|_| stopped())?,
            Item::Frame(r, w) if staged.as_ref().is_some_and(|s| s.has(&r)) => {
                let mut buf = free_in.recv().map_err(|_| stopped())?;
                buf.resize((r.end - r.start) as usize, 0);
                staged.as_ref().expect("checked").read(&r, &mut buf)?;
                work.send(with_bytes(w, buf)).map_err(|_| stopped())?;
            }
            Item::Frame(r, w) => remote.push((r, w)),
        }
    }
    match fetcher {
        Fetcher::Offline if remote.is_empty() => Ok(Some(Fetcher::Offline)),
        Fetcher::Offline => Err(Error::Offline(format!(
            "{} frames would have to be fetched",
            remote.len()
        ))),
        Fetcher::Stream(mut r) => {
            // Read the whole body in order: every frame of the manifest, keeping the wanted.
            let mut at = payload_offset;
            let mut wanted = remote.into_iter().peekable();
            let mut skip = vec![0u8; 1 << 16];
            let end = payload_offset + m.payload_len;
            while at < end {
                match wanted.peek() {
                    Some((range, _)) if range.start == at => {
                        let (range, w) = wanted.next().expect("peeked");
                        let mut buf = free_in.recv().map_err(|_| stopped())?;
                        buf.resize((range.end - range.start) as usize, 0);
                        read_exact_or_truncated(&mut r, &mut buf, || describe(&w, m))?;
                        fetched.fetch_add(
                            range.end - range.start,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        work.send(with_bytes(w, buf)).map_err(|_| stopped())?;
                        at = range.end;
                    }
                    next => {
                        let until = next.map_or(end, |(range, _)| range.start);
                        let n = ((until - at) as usize).min(skip.len());
                        read_exact_or_truncated(&mut r, &mut skip[..n], || {
                            format!("the bundle at byte {at}")
                        })?;
                        at += n as u64;
                    }
                }
            }
            expect_end(&mut r)?;
            // A pipe cannot be read again.
            Ok(None)
        }
        Fetcher::Ranges(mut src) => {
            if remote.is_empty() {
                return Ok(Some(Fetcher::Ranges(src)));
            }
            // A frame partly staged (a fetch or apply cut mid-frame) continues from its byte.
            let ranges: Vec<Range<u64>> = remote
                .iter()
                .map(|(r, _)| {
                    let have = staged.as_ref().map_or(0, |s| s.prefix(r));
                    r.start + have..r.end
                })
                .collect();
            let mut pending = remote.into_iter();
            let mut cur: Option<(Range<u64>, Work, Vec<u8>)> = None;
            let r = src.fetch(&ranges, &mut |off, bytes| {
                let mut bytes = bytes;
                let mut off = off;
                while !bytes.is_empty() {
                    if cur.is_none() {
                        let (range, w) = pending.next().ok_or_else(|| {
                            Error::Format(
                                "the source sent bytes beyond the frames asked for".into(),
                            )
                        })?;
                        let mut buf = free_in.recv().map_err(|_| stopped())?;
                        buf.clear();
                        if let Some(st) = &staged {
                            let have = st.prefix(&range);
                            if have > 0 {
                                buf.resize(have as usize, 0);
                                st.read(&(range.start..range.start + have), &mut buf)?;
                            }
                        }
                        cur = Some((range, w, buf));
                    }
                    let (range, _, buf) = cur.as_mut().expect("set above");
                    let want = range.start + buf.len() as u64;
                    if off != want {
                        return Err(Error::Format(format!(
                            "the source sent byte {off}, expected {want}"
                        )));
                    }
                    let n = ((range.end - want) as usize).min(bytes.len());
                    buf.extend_from_slice(&bytes[..n]);
                    if let Some(st) = &staged {
                        st.spool(off, &bytes[..n])?;
                    }
                    fetched.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    bytes = &bytes[n..];
                    off += n as u64;
                    if buf.len() as u64 == range.end - range.start {
                        let (_, w, buf) = cur.take().expect("set above");
                        work.send(with_bytes(w, buf)).map_err(|_| stopped())?;
                    }
                }
                Ok(())
            });
            // What arrived is kept for the next try, even when this one failed.
            if let Some(st) = &staged {
                st.flush()?;
            }
            r?;
            if cur.is_some() || pending.next().is_some() {
                return Err(Error::Truncated(format!(
                    "{} ended before every frame asked for",
                    src.name()
                )));
            }
            Ok(Some(Fetcher::Ranges(src)))
        }
    }
}

/// What a unit of work is about, for messages.
fn describe(w: &Work, m: &Manifest) -> String {
    match w {
        Work::Full(p, i, _) | Work::Local(p, i, _) => {
            format!("payload {:?} chunk {i}", m.payloads[*p].name)
        }
        Work::Delta(p, _, f, _, _) => format!("payload {:?} delta frame {f}", m.payloads[*p].name),
    }
}

fn with_bytes(w: Work, buf: Vec<u8>) -> Work {
    match w {
        Work::Full(p, i, _) => Work::Full(p, i, buf),
        Work::Delta(p, d, f, _, wanted) => Work::Delta(p, d, f, buf, wanted),
        other => other,
    }
}

/// Written bytes between two checkpoints, at most (or one second).
const CHECKPOINT_BYTES: u64 = 16 << 20;

/// Zeros are written this much at a time.
const ZERO_PIECE: usize = 1 << 20;

/// Where a worker puts a verified chunk.
struct Writer<'a> {
    outs: &'a [Arc<PosWriter>],
    fail_after: &'a ChunkCountdown,
    done: &'a Sender<Result<Done>>,
}

impl Writer<'_> {
    /// Where chunk `(pi, i)` goes in a worker's buffer.
    fn chunk<'b>(
        &self,
        m: &Manifest,
        pi: usize,
        i: usize,
        buf: &'b mut AlignedBuf,
    ) -> &'b mut [u8] {
        let p = &m.payloads[pi];
        let skew = self.outs[pi].skew(p.chunk_start(i));
        &mut buf.as_mut_slice()[skew..skew + p.chunks[i].len as usize]
    }

    /// Write verified chunk `(pi, i)`, held in `buf` where [`Writer::chunk`] put it. The
    /// chunks this completes come first, then the chunk's own `Verified`.
    fn write(&self, m: &Manifest, pi: usize, i: usize, buf: &AlignedBuf) -> Result<Vec<Done>> {
        let p = &m.payloads[pi];
        self.fail_after.tick();
        let complete = self.outs[pi].write_chunk(
            p.chunk_start(i),
            buf.as_slice(),
            p.chunks[i].len as usize,
            i as u32,
        )?;
        let mut out: Vec<Done> = complete
            .into_iter()
            .map(|c| Done::Written(pi, c as usize))
            .collect();
        out.push(Done::Verified);
        Ok(out)
    }
}

fn full(
    m: &Manifest,
    dec: &mut zstd::bulk::Decompressor<'_>,
    pi: usize,
    i: usize,
    compressed: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let p = &m.payloads[pi];
    let c = &p.chunks[i];
    decode_chunk_into(dec, c, compressed, out).map_err(|what| Error::Tampered {
        payload: p.name.clone(),
        what: format!("chunk {i} {what}"),
    })
}

#[allow(clippy::too_many_arguments)]
fn local(
    m: &Manifest,
    base: Option<&Base>,
    pi: usize,
    i: usize,
    at: u64,
    out: &mut AlignedBuf,
    w: &Writer,
) -> Result<Vec<Done>> {
    let c = &m.payloads[pi].chunks[i];
    let base = base.expect("local copies come from the running slot");
    let buf = w.chunk(m, pi, i, out);
    let why = match base.file.read_exact_at(buf, at) {
        Err(e) => format!("reading the running slot: {e}"),
        Ok(()) if blake3::hash(buf).as_bytes() == &c.hash.0 => return w.write(m, pi, i, out),
        Ok(()) => "the running slot's chunk changed".into(),
    };
    Ok(vec![Done::Mismatch(pi, i, why)])
}

/// Rebuild the planned chunks of one literal frame (or, `f == usize::MAX`, the chunks
/// without literals): decompress the frame against its prefix read from the running slot, then lay
/// out each chunk from copies, zeros and literals, and check it.
#[allow(clippy::too_many_arguments)]
fn delta(
    m: &Manifest,
    base: Option<&Base>,
    (pi, di, f): (usize, usize, usize),
    wanted: &[usize],
    compressed: &[u8],
    out: &mut AlignedBuf,
    w: &Writer,
) -> Result<Vec<Done>> {
    let p = &m.payloads[pi];
    let d = &p.deltas[di];
    let base = base.expect("deltas rebuild from the running slot");
    let mismatch_all = |why: String| -> Vec<Done> {
        wanted
            .iter()
            .map(|&i| Done::Mismatch(pi, i, why.clone()))
            .collect()
    };
    // Every chunk the frame covers, in order: the literals of the ones not wanted in this
    // pass are skipped over.
    let chunks: Vec<usize> = if f == usize::MAX {
        wanted.to_vec()
    } else {
        (d.frames[f].chunks[0] as usize..d.frames[f].chunks[1] as usize).collect()
    };
    let literals = if f == usize::MAX {
        Vec::new()
    } else {
        let fr = &d.frames[f];
        let mut prefix = Vec::with_capacity(fr.prefix_len() as usize);
        for &[off, len] in &fr.prefix {
            let at = prefix.len();
            prefix.resize(at + len as usize, 0);
            if let Err(e) = base.file.read_exact_at(&mut prefix[at..], off) {
                return Ok(mismatch_all(format!("reading the running slot: {e}")));
            }
        }
        match crate::bundle::decode::decode_with_prefix(compressed, fr.len, &prefix) {
            Ok(l) => l,
            // The frame's own bytes are not covered by a hash until its chunks are rebuilt:
            // a frame that does not decode is as suspect as a chunk that does not.
            Err(what) => {
                return Err(Error::Tampered {
                    payload: p.name.clone(),
                    what: format!("delta frame {f} {what}"),
                })
            }
        }
    };
    // Blocks per chunk, and where each chunk's literals start in the frame.
    let block = u64::from(d.block);
    let per_chunk = u64::from(p.chunk_size.unwrap_or(0)) / block;
    let runs = RunIndex::new(&d.runs);
    let mut lit_at = 0usize;
    let mut out_list = Vec::new();
    for i in chunks {
        let first = i as u64 * per_chunk;
        let c = &p.chunks[i];
        let blocks = u64::from(c.len) / block;
        if !wanted.contains(&i) {
            lit_at += (runs.literal_blocks(first, first + blocks) * block) as usize;
            continue;
        }
        let buf = w.chunk(m, pi, i, out);
        let mut ok = Ok(());
        let mut b = first;
        while b < first + blocks {
            let (run, start) = runs.at(b);
            let n = (start + u64::from(run.count())).min(first + blocks) - b;
            let dst = &mut buf[((b - first) * block) as usize..((b - first + n) * block) as usize];
            match run {
                Run::Zero { .. } => dst.fill(0),
                Run::Copy { from, .. } => {
                    let src = (from + (b - start)) * block;
                    if let Err(e) = base.file.read_exact_at(dst, src) {
                        ok = Err(format!("reading the running slot: {e}"));
                    }
                }
                Run::Literal { .. } => {
                    let len = dst.len();
                    match literals.get(lit_at..lit_at + len) {
                        Some(l) => dst.copy_from_slice(l),
                        None => ok = Err("the literal frame is short".into()),
                    }
                    lit_at += len;
                }
            }
            b += n;
        }
        let verdict = ok.and_then(|()| {
            if blake3::hash(buf).as_bytes() == &c.hash.0 {
                Ok(())
            } else {
                Err("rebuilt from the running slot, its hash differs".into())
            }
        });
        match verdict {
            Ok(()) => {
                // Reported as soon as it is written: the buffer serves the next chunk.
                for d in w.write(m, pi, i, out)? {
                    if w.done.send(Ok(d)).is_err() {
                        return Ok(out_list);
                    }
                }
            }
            Err(why) => out_list.push(Done::Mismatch(pi, i, why)),
        }
    }
    Ok(out_list)
}

/// Which run a block of the payload falls in.
struct RunIndex<'a> {
    runs: &'a [Run],
    starts: Vec<u64>,
}

impl<'a> RunIndex<'a> {
    fn new(runs: &'a [Run]) -> Self {
        let mut starts = Vec::with_capacity(runs.len());
        let mut at = 0u64;
        for r in runs {
            starts.push(at);
            at += u64::from(r.count());
        }
        RunIndex { runs, starts }
    }

    /// How many of the blocks `[a, b)` come from the literal stream.
    fn literal_blocks(&self, a: u64, b: u64) -> u64 {
        let mut n = 0;
        let mut at = a;
        while at < b {
            let (run, start) = self.at(at);
            let end = (start + u64::from(run.count())).min(b);
            if let Run::Literal { .. } = run {
                n += end - at;
            }
            at = end;
        }
        n
    }

    /// The run holding block `b`, and the block it starts at.
    fn at(&self, b: u64) -> (Run, u64) {
        let k = self.starts.partition_point(|&s| s <= b) - 1;
        (self.runs[k], self.starts[k])
    }
}

/// The next item, or `None` once the channel closed or the work was cancelled.
fn recv_or_cancel<T>(rx: &Receiver<T>, cancel: &Receiver<()>) -> Option<T> {
    select! {
        recv(rx) -> v => v.ok(),
        recv(cancel) -> _ => None,
    }
}
