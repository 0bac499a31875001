//! Writing and reading back a slot: positional writes of verified chunks (aligned ones with
//! direct I/O), fsync, and a read-back hash that bypasses the page cache.
//!
//! Chunks need not start or end on a page ([`ALIGN`]): format 1's content-defined chunks
//! never do. They are gathered, in whatever order they arrive, into aligned stripes written
//! whole with direct I/O ([`PosWriter::write_chunk`]). Writing each chunk through the page
//! cache instead costs a read-modify-write of each shared page, a small request per chunk
//! and double caching under a loop device: more than twice the time of a direct copy.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crossbeam_channel::bounded;

use crate::error::{Error, IoContext, Result};

/// Size of each read-back request.
pub const IO_BLOCK: usize = 2 << 20;
/// Alignment O_DIRECT needs (covers 512-byte and 4 KiB logical blocks).
pub const ALIGN: usize = 4096;

/// A heap buffer whose usable part starts on an [`ALIGN`] boundary (no `unsafe` needed:
/// over-allocate and skip to the boundary).
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Open for direct I/O when the file and offset allow it; buffered otherwise (tmpfs, odd
/// offsets in test images). Returns whether the handle is direct.
fn open_maybe_direct(path: &Path, write: bool, offset: u64) -> Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(write);
    if write && is_block_device(path) {
        // Hold the kernel's exclusive claim while writing: nobody can mount the slot or put
        // device-mapper on it under us, and an existing claim makes this open fail (EBUSY).
        opts.custom_flags(nix::libc::O_EXCL);
    }
    if offset.is_multiple_of(ALIGN as u64) {
        let mut direct = opts.clone();
        let excl = if write && is_block_device(path) {
            nix::libc::O_EXCL
        } else {
            0
        };
        direct.custom_flags(nix::libc::O_DIRECT | excl);
        if let Ok(f) = direct.open(path) {
            return Ok((f, true));
        }
    }
    let what = if write {
        "opening for writing"
    } else {
        "opening"
    };
    let f = opts
        .open(path)
        .ctx(|| format!("{what} {}", path.display()))?;
    Ok((f, false))
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Positional writes into a slot device (or a file), verified chunks in any order: aligned
/// chunks go through an `O_DIRECT` handle, so slot writes do not churn the page cache of a
/// small device; anything unaligned (a last, short chunk; version 1 chunks) through a buffered
/// one. `sync` makes both durable.
pub struct PosWriter {
    path: PathBuf,
    offset: u64,
    limit: u64,
    direct: Option<File>,
    /// `None`: discard (verify only checks).
    buffered: Option<File>,
    /// Stripes partly filled by the chunks seen so far (direct writers only).
    stripes: Mutex<Stripes>,
}

/// Small chunks (format 1's content-defined ones, 16 KiB to 256 KiB, never on a page
/// boundary) are gathered into aligned stripes of this size and written with one direct
/// write each; larger chunks write their whole stripes straight from the worker's buffer.
pub const STRIPE: usize = 1 << 20;
/// At most this many stripes are held open: beyond, the oldest is written as far as it is
/// filled (its chunks complete; a chunk that arrives later for it is written on its own).
const OPEN_STRIPES: usize = 8;

/// Part of the slot being gathered.
struct Stripe {
    data: AlignedBuf,
    /// Byte ranges within the stripe that are filled.
    filled: Vec<(usize, usize)>,
    /// Their total: the stripe is full at [`STRIPE`].
    bytes: usize,
    /// The chunks whose bytes are in it.
    chunks: Vec<u32>,
}

#[derive(Default)]
struct Stripes {
    /// By the stripe's byte position in the device.
    open: HashMap<u64, Stripe>,
    /// Per chunk, how many of its stripes are not written yet.
    pending: HashMap<u32, u8>,
    /// Buffers of written stripes, for the next ones.
    spare: Vec<AlignedBuf>,
}

impl Stripes {
    /// One stripe is written: keep its buffer, and note the chunks it completes.
    fn settle(&mut self, stripe: Stripe, complete: &mut Vec<u32>) {
        for c in stripe.chunks {
            if let Some(n) = self.pending.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&c);
                    complete.push(c);
                }
            }
        }
        if self.spare.len() < 2 {
            self.spare.push(stripe.data);
        }
    }
}

impl PosWriter {
    /// Write `limit` bytes from `offset` of `path` (a block device is claimed exclusively).
    pub fn open(path: &Path, offset: u64, limit: u64) -> Result<PosWriter> {
        let (first, direct) = open_maybe_direct(path, true, offset)?;
        // A second, buffered handle for unaligned writes: a non-exclusive open is allowed
        // while we hold the exclusive claim.
        let (direct, buffered) = if direct {
            // Readable too: a resumed apply re-reads the chunks it relies on.
            let b = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .ctx(|| format!("opening for writing {}", path.display()))?;
            (Some(first), Some(b))
        } else {
            (None, Some(first))
        };
        Ok(PosWriter {
            path: path.to_path_buf(),
            offset,
            limit,
            direct,
            buffered,
            stripes: Mutex::default(),
        })
    }

    /// An already open file (a staged file payload): buffered writes.
    pub fn from_file(file: File, name: &Path, limit: u64) -> PosWriter {
        PosWriter {
            path: name.to_path_buf(),
            offset: 0,
            limit,
            direct: None,
            buffered: Some(file),
            stripes: Mutex::default(),
        }
    }

    /// Read-only access to a slot (planning a fetch re-checks chunks already written).
    pub fn read_only(path: &Path, offset: u64, limit: u64) -> Result<PosWriter> {
        let f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        Ok(PosWriter {
            path: path.to_path_buf(),
            offset,
            limit,
            direct: None,
            buffered: Some(f),
            stripes: Mutex::default(),
        })
    }

    /// A writer that keeps nothing (the chunks were verified on their way here).
    pub fn discard(limit: u64) -> PosWriter {
        PosWriter {
            path: PathBuf::from("(verify only)"),
            offset: 0,
            limit,
            direct: None,
            buffered: None,
            stripes: Mutex::default(),
        }
    }

    /// Write `data` at `pos` of the slot. Whole pages go through the direct handle when
    /// `data` is aligned like them (an [`AlignedBuf`]'s slice at an aligned position is).
    pub fn write_at(&self, pos: u64, data: &[u8]) -> Result<()> {
        self.check_limit(pos, data.len())?;
        self.write_raw(self.offset + pos, data)
    }

    fn check_limit(&self, pos: u64, len: usize) -> Result<()> {
        if pos + len as u64 > self.limit {
            return Err(Error::Format(format!(
                "payload overruns {} ({} bytes)",
                self.path.display(),
                self.limit
            )));
        }
        Ok(())
    }

    /// Write `data` at device byte `at`: its partial pages buffered, the whole pages between
    /// them direct (if the memory is aligned like the device position).
    fn write_raw(&self, at: u64, data: &[u8]) -> Result<()> {
        let Some(buffered) = &self.buffered else {
            return Ok(());
        };
        let a = ALIGN as u64;
        let end = at + data.len() as u64;
        let (from, to) = (at.div_ceil(a) * a, end / a * a);
        let direct = match &self.direct {
            Some(d)
                if from < to && data[(from - at) as usize..].as_ptr().align_offset(ALIGN) == 0 =>
            {
                Some(d)
            }
            _ => None,
        };
        let write = |f: &File, s: u64, e: u64| -> Result<()> {
            if s < e {
                f.write_all_at(&data[(s - at) as usize..(e - at) as usize], s)
                    .ctx(|| format!("writing {} at byte {s}", self.path.display()))?;
            }
            Ok(())
        };
        match direct {
            Some(d) => {
                write(buffered, at, from)?;
                write(d, from, to)?;
                write(buffered, to, end)
            }
            None => write(buffered, at, end),
        }
    }

    /// Where a chunk for `pos` must start in an aligned buffer for
    /// [`write_chunk`](Self::write_chunk) to write whole pages straight from it.
    pub fn skew(&self, pos: u64) -> usize {
        if self.direct.is_some() {
            ((self.offset + pos) % ALIGN as u64) as usize
        } else {
            0
        }
    }

    /// Write chunk `id`, `len` bytes for `pos`, held in `buf` (aligned) from
    /// [`skew(pos)`](Self::skew). Whole [`STRIPE`]s are written at once; the rest is gathered
    /// with the neighbouring chunks, in any order, and written once the stripe is full (or
    /// at [`flush`](Self::flush)). Returns the chunks (this one, or earlier ones) whose bytes
    /// are now all written.
    pub fn write_chunk(&self, pos: u64, buf: &[u8], len: usize, id: u32) -> Result<Vec<u32>> {
        self.check_limit(pos, len)?;
        let skew = self.skew(pos);
        let data = &buf[skew..skew + len];
        let Some(direct) = &self.direct else {
            self.write_raw(self.offset + pos, data)?;
            return Ok(vec![id]);
        };
        debug_assert_eq!(buf.as_ptr().align_offset(ALIGN), 0);
        let z = STRIPE as u64;
        let at = self.offset + pos;
        let end = at + len as u64;
        let (first_full, last_full) = (at.div_ceil(z) * z, end / z * z);
        if first_full < last_full {
            let (from, to) = ((first_full - at) as usize, (last_full - at) as usize);
            direct
                .write_all_at(&data[from..to], first_full)
                .ctx(|| format!("writing {} at byte {first_full}", self.path.display()))?;
        }
        // The partial stripes: the head (up to the first stripe boundary) and the tail (from
        // the last one); a chunk inside one stripe is one piece.
        let mut pieces: Vec<(u64, u64)> = Vec::with_capacity(2);
        if first_full > last_full {
            pieces.push((at, end));
        } else {
            if at < first_full {
                pieces.push((at, first_full));
            }
            if last_full < end {
                pieces.push((last_full, end));
            }
        }
        let mut complete = Vec::new();
        if pieces.is_empty() {
            complete.push(id);
            return Ok(complete);
        }
        // Full stripes are written after the lock is released: the other workers go on
        // filling stripes meanwhile.
        let mut full: Vec<(u64, Stripe)> = Vec::new();
        let mut st = self.stripes.lock().unwrap_or_else(|e| e.into_inner());
        st.pending.insert(id, pieces.len() as u8);
        for (s, e) in pieces {
            let stripe_at = s / z * z;
            if !st.open.contains_key(&stripe_at) {
                let data = st.spare.pop().unwrap_or_else(|| AlignedBuf::new(STRIPE));
                st.open.insert(
                    stripe_at,
                    Stripe {
                        data,
                        filled: Vec::new(),
                        bytes: 0,
                        chunks: Vec::new(),
                    },
                );
            }
            let stripe = st.open.get_mut(&stripe_at).expect("just opened");
            let (ss, se) = ((s - stripe_at) as usize, (e - stripe_at) as usize);
            stripe.data.as_mut_slice()[ss..se]
                .copy_from_slice(&data[(s - at) as usize..(e - at) as usize]);
            stripe.filled.push((ss, se));
            stripe.bytes += se - ss;
            stripe.chunks.push(id);
            if stripe.bytes == STRIPE {
                full.push((stripe_at, st.open.remove(&stripe_at).expect("just filled")));
            }
        }
        while st.open.len() > OPEN_STRIPES {
            let oldest = *st.open.keys().min().expect("not empty");
            let stripe = st.open.remove(&oldest).expect("present");
            self.write_partial(oldest, &stripe)?;
            st.settle(stripe, &mut complete);
        }
        if full.is_empty() {
            return Ok(complete);
        }
        drop(st);
        for (stripe_at, stripe) in &full {
            direct
                .write_all_at(stripe.data.as_slice(), *stripe_at)
                .ctx(|| format!("writing {} at byte {stripe_at}", self.path.display()))?;
        }
        let mut st = self.stripes.lock().unwrap_or_else(|e| e.into_inner());
        for (_, stripe) in full {
            st.settle(stripe, &mut complete);
        }
        Ok(complete)
    }

    /// Write what a stripe holds, range by range.
    fn write_partial(&self, stripe_at: u64, stripe: &Stripe) -> Result<()> {
        let mut ranges = stripe.filled.clone();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => merged.push((s, e)),
            }
        }
        for (s, e) in merged {
            self.write_raw(stripe_at + s as u64, &stripe.data.as_slice()[s..e])?;
        }
        Ok(())
    }

    /// Write what the open stripes hold (their partial pages through the page cache, which
    /// reads in the rest of each page: bytes written before, or never written); returns the
    /// chunks this completes.
    pub fn flush(&self) -> Result<Vec<u32>> {
        let mut st = self.stripes.lock().unwrap_or_else(|e| e.into_inner());
        let mut open: Vec<(u64, Stripe)> = st.open.drain().collect();
        open.sort_unstable_by_key(|(at, _)| *at);
        let mut complete = Vec::new();
        for (stripe_at, stripe) in open {
            self.write_partial(stripe_at, &stripe)?;
            st.settle(stripe, &mut complete);
        }
        st.spare.clear();
        Ok(complete)
    }

    /// Make every write so far durable.
    pub fn sync(&self) -> Result<()> {
        let ctx = || format!("syncing {}", self.path.display());
        if let Some(b) = &self.buffered {
            b.sync_all().ctx(ctx)?;
        }
        if let Some(d) = &self.direct {
            d.sync_all().ctx(ctx)?;
        }
        Ok(())
    }

    /// Read `len` bytes back from `pos` (for re-checking a resumed chunk).
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.offset + pos;
        let Some(b) = &self.buffered else {
            return Err(Error::io(
                "reading back",
                std::io::Error::other("nothing kept"),
            ));
        };
        b.read_exact_at(buf, at)
            .ctx(|| format!("reading {} at byte {at}", self.path.display()))
    }
}

/// blake3 of `len` bytes at `offset` in `path`, read past the page cache where possible so
/// the check sees what the device stored. Reading and hashing run on two threads.
pub fn hash_region(path: &Path, offset: u64, len: u64) -> Result<blake3::Hash> {
    let (file, direct) = open_maybe_direct(path, false, offset)?;
    if !direct {
        // Buffered fallback: at least drop cached pages so we re-read from the device.
        let _ = nix::fcntl::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            offset as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    let (full_tx, full_rx) = bounded::<(AlignedBuf, usize)>(2);
    let (free_tx, free_rx) = bounded::<AlignedBuf>(3);
    for _ in 0..3 {
        free_tx
            .send(AlignedBuf::new(IO_BLOCK))
            .expect("fresh channel");
    }
    let p = path.to_path_buf();
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<()> {
            let mut pos = 0u64;
            while pos < len {
                let Ok(mut buf) = free_rx.recv() else {
                    return Ok(());
                };
                let want = (len - pos).min(IO_BLOCK as u64) as usize;
                // Direct reads must be whole aligned blocks; the hasher uses only `want`.
                let req = if direct {
                    want.div_ceil(ALIGN) * ALIGN
                } else {
                    want
                };
                let mut got = 0;
                while got < want {
                    let n = file
                        .read_at(&mut buf.as_mut_slice()[got..req], offset + pos + got as u64)
                        .ctx(|| format!("reading back {} at byte {}", p.display(), offset + pos))?;
                    if n == 0 {
                        return Err(Error::io(
                            format!("reading back {}", p.display()),
                            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                        ));
                    }
                    got += n;
                }
                if full_tx.send((buf, want)).is_err() {
                    return Ok(());
                }
                pos += want as u64;
            }
            Ok(())
        });
        let mut hasher = blake3::Hasher::new();
        for (buf, n) in full_rx {
            hasher.update(&buf.as_slice()[..n]);
            let _ = free_tx.send(buf);
        }
        reader.join().expect("read-back thread panicked")?;
        Ok(hasher.finalize())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_TEST_CHUNK: usize = 1_200_000;

    /// Deterministic bytes and chunk cuts (a linear congruential generator is enough here).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// Cut `len` bytes into chunks of 1 byte to 1.2 MiB, as content-defined chunking does
    /// (pages and stripes shared by two, three or more chunks; chunks spanning stripes).
    fn cuts(len: usize, rng: &mut Lcg) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < len {
            let n = match rng.next() % 20 {
                0..=4 => 1 + rng.next() as usize % 100,
                5..=17 => 1 + rng.next() as usize % 20_000,
                _ => 1 + rng.next() as usize % MAX_TEST_CHUNK,
            }
            .min(len - at);
            out.push((at, n));
            at += n;
        }
        out
    }

    fn write_all(
        w: &PosWriter,
        data: &[u8],
        chunks: &[(usize, usize)],
        order: &[usize],
    ) -> Vec<u32> {
        let mut completed = Vec::new();
        let mut buf = AlignedBuf::new(MAX_TEST_CHUNK + ALIGN);
        for &k in order {
            let (at, n) = chunks[k];
            let skew = w.skew(at as u64);
            buf.as_mut_slice()[skew..skew + n].copy_from_slice(&data[at..at + n]);
            completed.extend(
                w.write_chunk(at as u64, buf.as_slice(), n, k as u32)
                    .unwrap(),
            );
        }
        completed.extend(w.flush().unwrap());
        completed
    }

    fn shuffled(n: usize, rng: &mut Lcg) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.next() as usize % (i + 1));
        }
        order
    }

    #[test]
    fn unaligned_chunks_in_any_order_are_written_whole_and_each_completes_once() {
        // Shuffled over 24 stripes: more open at once than are kept, so some are written
        // partly filled and the rest of their bytes later.
        let mut rng = Lcg(7);
        let len = 12 << 20;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let chunks = cuts(len, &mut rng);
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("slot");
        std::fs::write(&path, vec![0xAAu8; len + 8192]).unwrap();
        // At byte 4096 of the file: the slot's pages are the file's pages.
        let w = PosWriter::open(&path, 4096, len as u64).unwrap();
        assert_eq!(w.skew(1), 1, "the slot must be open for direct I/O here");
        let order = shuffled(chunks.len(), &mut rng);
        let mut completed = write_all(&w, &data, &chunks, &order);
        w.sync().unwrap();
        completed.sort_unstable();
        let want: Vec<u32> = (0..chunks.len() as u32).collect();
        assert_eq!(completed, want, "every chunk reported written exactly once");
        let got = std::fs::read(&path).unwrap();
        assert!(
            got[..4096].iter().all(|&b| b == 0xAA),
            "bytes before the slot changed"
        );
        assert!(
            got[4096 + len..].iter().all(|&b| b == 0xAA),
            "bytes after the slot changed"
        );
        assert!(
            got[4096..4096 + len] == data[..],
            "the slot holds other bytes than written"
        );
    }

    #[test]
    fn pages_shared_with_chunks_written_earlier_keep_their_bytes() {
        // A resumed apply: every third chunk is already in the slot; the others arrive in
        // any order and share pages with them.
        let mut rng = Lcg(11);
        let len = 3 << 20;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let chunks = cuts(len, &mut rng);
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("slot");
        let mut before = vec![0x55u8; len];
        for (k, &(at, n)) in chunks.iter().enumerate() {
            if k % 3 == 0 {
                before[at..at + n].copy_from_slice(&data[at..at + n]);
            }
        }
        std::fs::write(&path, &before).unwrap();
        let w = PosWriter::open(&path, 0, len as u64).unwrap();
        let rest: Vec<usize> = (0..chunks.len()).filter(|k| k % 3 != 0).collect();
        let order: Vec<usize> = shuffled(rest.len(), &mut rng)
            .into_iter()
            .map(|i| rest[i])
            .collect();
        let mut completed = write_all(&w, &data, &chunks, &order);
        w.sync().unwrap();
        completed.sort_unstable();
        assert_eq!(
            completed,
            rest.iter().map(|&k| k as u32).collect::<Vec<_>>()
        );
        assert!(
            std::fs::read(&path).unwrap() == data,
            "the slot holds other bytes than written"
        );
    }
}
