//! Write logs in the Linux dm-log-writes format, as QEMU's `blklogwrites` block driver records
//! them (`VmConfig::disk_log`): every write, discard and flush a guest made to a disk, in the
//! order they completed. This module reads such a log, rebuilds the disk as it was at any
//! point of it (a base image plus the entries applied in order; incrementally, with undo, when
//! many states are needed), and enumerates the states a power cut could leave: everything up
//! to a flush is on the platter, and of the writes that completed after it (until the next
//! flush) any subset may be, some of them torn.
//!
//! # Format (little-endian)
//!
//! Sector 0 of the log is the superblock: `magic: u64 = 0x6a736677736872`, `version: u64 = 1`,
//! `nr_entries: u64`, `sectorsize: u32` (512 unless QEMU's `log-sector-size` says otherwise).
//! QEMU writes it only at a flush (or every `log-super-update-interval` entries), so the
//! entries after the last flush are not counted in it: they are found by walking. From sector
//! 1 on, each entry is one sector holding its header, `sector: u64` (where on the disk, in
//! units of `sectorsize`), `nr_sectors: u64`, `flags: u64` (1 flush, 2 FUA, 4 discard, 8 mark,
//! 16 metadata), `data_len: u64` (marks only), padded with zeros to `sectorsize`; then, unless
//! it is a discard, `nr_sectors` sectors of data. A flush entry has no data; a write of zeros
//! (`WRITE_ZEROES`) is logged as a plain write whose data are zeros. The walk ends at the end
//! of the file or at an all-zero header (QEMU starts a log at sector 1 of an emptied file).
//!
//! # Crash model
//!
//! [`FlushPoint`] `k` is the moment right after the `k`-th flush entry completed (point 0: the
//! start of the log, before any). The disk then holds every entry before it, and any subset
//! of the writes logged after it and before the next flush ([`FlushPoint::pending`]), each
//! either whole or torn at 4 KiB boundaries ([`GROUP`]). A FUA write is treated like any
//! other pending write (not assumed durable until the next flush): that only adds states.
//! Discards are replayed as no-ops (QEMU's default `discard=ignore` does not forward them to
//! the image either) and counted, so a reader can see whether any happened.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
pub const FLAG_FLUSH: u64 = 1 << 0;
pub const FLAG_FUA: u64 = 1 << 1;
pub const FLAG_DISCARD: u64 = 1 << 2;
pub const FLAG_MARK: u64 = 1 << 3;
/// Linux only (a hint that the write is file-system metadata); replayed as a write.
pub const FLAG_METADATA: u64 = 1 << 4;
const FLAG_MASK: u64 = FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD | FLAG_MARK | FLAG_METADATA;
const HEADER_LEN: usize = 32;
/// Torn writes keep or lose whole 4 KiB groups, aligned on the disk.
pub const GROUP: u64 = 4096;

/// One log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// First disk sector, in units of the log's sector size.
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// Where the entry's header starts in the log file.
    pub header_at: u64,
    /// Where its data start in the log file (`nr_sectors` sectors, none for a discard).
    pub data_at: u64,
}

impl Entry {
    pub fn is_flush(&self) -> bool {
        self.flags & FLAG_FLUSH != 0
    }
    pub fn is_discard(&self) -> bool {
        self.flags & FLAG_DISCARD != 0
    }
    pub fn is_mark(&self) -> bool {
        self.flags & FLAG_MARK != 0
    }
    /// Whether replaying it changes the disk.
    pub fn writes(&self) -> bool {
        !self.is_discard() && !self.is_mark() && self.nr_sectors > 0
    }
}

/// What a log holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub entries: usize,
    pub writes: usize,
    pub flushes: usize,
    pub fua: usize,
    pub discards: usize,
    pub marks: usize,
    pub bytes_written: u64,
}

/// A parsed log; entry data stay in the file and are read on demand.
pub struct Log {
    file: File,
    pub path: PathBuf,
    pub sector_size: u64,
    pub entries: Vec<Entry>,
    /// `nr_entries` of the superblock (0 when no flush ever updated it).
    pub superblock_entries: u64,
    /// Bytes after the last whole entry (a header or data cut short when the writer died).
    pub trailing_bytes: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Log {
    pub fn open(path: &Path) -> io::Result<Log> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut sb = [0u8; HEADER_LEN];
        let got = read_up_to(&mut file, 0, &mut sb)?;
        let (sector_size, superblock_entries) = if got == HEADER_LEN && le64(&sb, 0) == MAGIC {
            let version = le64(&sb, 8);
            if version != VERSION {
                return Err(invalid(format!(
                    "{}: log version {version}, only {VERSION} is known",
                    path.display()
                )));
            }
            let ss = u32::from_le_bytes(sb[24..28].try_into().unwrap()) as u64;
            if !ss.is_power_of_two() || ss < HEADER_LEN as u64 || ss >= 1 << 24 {
                return Err(invalid(format!(
                    "{}: sector size {ss} in the superblock",
                    path.display()
                )));
            }
            (ss, le64(&sb, 16))
        } else if sb[..got].iter().all(|&b| b == 0) {
            // No flush has written the superblock yet: QEMU's default sector size.
            (512, 0)
        } else {
            return Err(invalid(format!(
                "{}: not a dm-log-writes log (bad magic)",
                path.display()
            )));
        };
        let mut entries = Vec::new();
        let mut at = sector_size;
        let mut header = [0u8; HEADER_LEN];
        loop {
            if at + HEADER_LEN as u64 > len {
                break;
            }
            file.read_exact_at(&mut header, at)?;
            if header.iter().all(|&b| b == 0) {
                break;
            }
            let (sector, nr_sectors, flags) =
                (le64(&header, 0), le64(&header, 8), le64(&header, 16));
            if flags & !FLAG_MASK != 0 {
                return Err(invalid(format!(
                    "{}: entry {} at byte {at}: unknown flags {flags:#x}",
                    path.display(),
                    entries.len()
                )));
            }
            let data_at = at + sector_size;
            let data_len = if flags & FLAG_DISCARD != 0 {
                0
            } else {
                nr_sectors.checked_mul(sector_size).ok_or_else(|| {
                    invalid(format!(
                        "{}: entry {} too long",
                        path.display(),
                        entries.len()
                    ))
                })?
            };
            if data_at + data_len > len {
                break;
            }
            entries.push(Entry {
                sector,
                nr_sectors,
                flags,
                header_at: at,
                data_at,
            });
            at = data_at + data_len;
        }
        if (entries.len() as u64) < superblock_entries {
            return Err(invalid(format!(
                "{}: the superblock counts {superblock_entries} entries, only {} are whole",
                path.display(),
                entries.len()
            )));
        }
        Ok(Log {
            file,
            path: path.to_path_buf(),
            sector_size,
            entries,
            superblock_entries,
            trailing_bytes: len.saturating_sub(at),
        })
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            entries: self.entries.len(),
            ..Default::default()
        };
        for e in &self.entries {
            c.flushes += e.is_flush() as usize;
            c.fua += (e.flags & FLAG_FUA != 0) as usize;
            c.discards += e.is_discard() as usize;
            c.marks += e.is_mark() as usize;
            if e.writes() {
                c.writes += 1;
                c.bytes_written += e.nr_sectors * self.sector_size;
            }
        }
        c
    }

    /// The bytes of the disk entry `i` covers.
    pub fn range(&self, i: usize) -> Range<u64> {
        let e = &self.entries[i];
        e.sector * self.sector_size..(e.sector + e.nr_sectors) * self.sector_size
    }

    /// The data of write entry `i`.
    pub fn data(&self, i: usize) -> io::Result<Vec<u8>> {
        let e = &self.entries[i];
        let mut v = vec![0u8; (e.nr_sectors * self.sector_size) as usize];
        if e.writes() {
            self.file.read_exact_at(&mut v, e.data_at)?;
        }
        Ok(v)
    }

    /// How many entries begin before byte `offset` of the log file: turns a log length noted
    /// while the guest ran into a position in the entry sequence.
    pub fn entries_before(&self, offset: u64) -> usize {
        self.entries.partition_point(|e| e.header_at < offset)
    }

    /// Point 0 (the start) and one point per flush entry, in order.
    pub fn flush_points(&self) -> Vec<FlushPoint> {
        let mut starts = vec![0usize];
        starts.extend(
            self.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.is_flush())
                .map(|(i, _)| i),
        );
        let n = self.entries.len();
        starts
            .iter()
            .enumerate()
            .map(|(k, &at)| {
                // A flush entry orders what came before it; data it carries (a Linux
                // PREFLUSH write) come after the flush, so they are pending.
                let end = starts.get(k + 1).copied().unwrap_or(n);
                let from = if k == 0 { 0 } else { at };
                let pending = (from..end).filter(|&i| self.entries[i].writes()).collect();
                FlushPoint {
                    index: k,
                    prefix: from,
                    pending,
                    flush_entry: if k == 0 { None } else { Some(at) },
                }
            })
            .collect()
    }

    /// The 4 KiB groups (aligned on the disk) that write entry `i` covers, as byte ranges.
    pub fn groups(&self, i: usize) -> Vec<Range<u64>> {
        split_groups(self.range(i))
    }
}

fn split_groups(r: Range<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut a = r.start;
    while a < r.end {
        let b = ((a / GROUP + 1) * GROUP).min(r.end);
        out.push(a..b);
        a = b;
    }
    out
}

fn read_up_to(f: &mut File, at: u64, buf: &mut [u8]) -> io::Result<usize> {
    f.seek(SeekFrom::Start(at))?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A moment a power cut may hit: see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushPoint {
    /// 0: the start of the log; `k`: right after the `k`-th flush entry.
    pub index: usize,
    /// Entries `[0, prefix)` are on the disk at this point.
    pub prefix: usize,
    /// Write entries that may or may not be (whole or torn), in log order.
    pub pending: Vec<usize>,
    /// The flush entry this point follows.
    pub flush_entry: Option<usize>,
}

/// Which of a point's pending writes a crash state has. Every variant is a pure function of
/// its parameters and the log, so a state named in a failure can be rebuilt by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// None of them: the state right after the flush.
    None,
    /// All of them, whole: the state right before the next flush.
    All,
    /// Bit `i` set: pending write `i` is whole on the disk, else absent (at most 64).
    Mask(u64),
    /// Each pending write present with probability 1/2 (never none or all when there are
    /// two or more), drawn from `seed`.
    Subset(u64),
    /// A [`Variant::Subset`] drawn from `seed`, plus one write of more than one 4 KiB group
    /// torn: only a random, non-empty, proper subset of its groups is on the disk.
    Torn(u64),
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::None => write!(f, "none"),
            Variant::All => write!(f, "all"),
            Variant::Mask(m) => write!(f, "mask:{m:#x}"),
            Variant::Subset(s) => write!(f, "subset:{s}"),
            Variant::Torn(s) => write!(f, "torn:{s}"),
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |v: &str| -> Result<u64, String> {
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            }
            .map_err(|e| format!("{v:?}: {e}"))
        };
        match s.split_once(':') {
            None if s == "none" => Ok(Variant::None),
            None if s == "all" => Ok(Variant::All),
            Some(("mask", v)) => Ok(Variant::Mask(num(v)?)),
            Some(("subset", v)) => Ok(Variant::Subset(num(v)?)),
            Some(("torn", v)) => Ok(Variant::Torn(num(v)?)),
            _ => Err(format!(
                "variant {s:?}: none, all, mask:M, subset:SEED or torn:SEED"
            )),
        }
    }
}

/// Part of one write entry to put on the disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Piece {
    pub entry: usize,
    /// Indexes into [`Log::groups`] of the entry; `None`: the whole write.
    pub groups: Option<Vec<usize>>,
}

/// SplitMix64: small, fast, and its sequence for a seed never changes (the seeds printed in
/// failure messages must rebuild the same state in any later build).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// A seed for state `j` of flush point `point` under the run's `seed`.
pub fn derive_seed(seed: u64, point: usize, j: usize) -> u64 {
    let mut r = SplitMix64(seed ^ (point as u64).wrapping_mul(0x100_0000_01b3));
    r.next_u64();
    let mut r = SplitMix64(r.next_u64() ^ (j as u64).wrapping_mul(0x9e37_79b9));
    r.next_u64()
}

impl FlushPoint {
    /// The writes a crash state of this point has on top of its prefix, in log order; `None`
    /// when the variant cannot exist here (a mask naming writes beyond the pending ones, a torn
    /// state where no pending write spans two 4 KiB groups).
    pub fn pieces(&self, log: &Log, v: Variant) -> Option<Vec<Piece>> {
        let n = self.pending.len();
        let whole = |i: usize| Piece {
            entry: self.pending[i],
            groups: None,
        };
        let subset = |rng: &mut SplitMix64, force_mixed: bool| -> Vec<bool> {
            let mut keep: Vec<bool> = (0..n).map(|_| rng.coin()).collect();
            if force_mixed && n >= 2 {
                let k = keep.iter().filter(|&&b| b).count();
                if k == 0 || k == n {
                    let i = rng.below(n as u64) as usize;
                    keep[i] = !keep[i];
                }
            }
            keep
        };
        match v {
            Variant::None => Some(Vec::new()),
            Variant::All => Some((0..n).map(whole).collect()),
            Variant::Mask(m) => {
                if n < 64 && m >> n != 0 {
                    return None;
                }
                Some((0..n).filter(|&i| m >> i & 1 == 1).map(whole).collect())
            }
            Variant::Subset(seed) => {
                let mut rng = SplitMix64(seed);
                let keep = subset(&mut rng, true);
                Some((0..n).filter(|&i| keep[i]).map(whole).collect())
            }
            Variant::Torn(seed) => {
                let tearable: Vec<usize> = (0..n)
                    .filter(|&i| log.groups(self.pending[i]).len() >= 2)
                    .collect();
                if tearable.is_empty() {
                    return None;
                }
                let mut rng = SplitMix64(seed);
                let keep = subset(&mut rng, false);
                let torn = tearable[rng.below(tearable.len() as u64) as usize];
                let g = log.groups(self.pending[torn]).len();
                // A non-empty proper subset of the groups: draw until one is.
                let groups = loop {
                    let pick: Vec<usize> = (0..g).filter(|_| rng.coin()).collect();
                    if !pick.is_empty() && pick.len() < g {
                        break pick;
                    }
                };
                Some(
                    (0..n)
                        .filter_map(|i| {
                            if i == torn {
                                Some(Piece {
                                    entry: self.pending[i],
                                    groups: Some(groups.clone()),
                                })
                            } else if keep[i] {
                                Some(whole(i))
                            } else {
                                None
                            }
                        })
                        .collect(),
                )
            }
        }
    }
}

/// A disk image being rebuilt.
pub trait Image {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// The whole disk in memory: fast for checking thousands of states.
impl Image for Vec<u8> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let a = offset as usize;
        let dst = self
            .get_mut(a..a + data.len())
            .ok_or_else(|| invalid(format!("write at {offset} past the end of the image")))?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let a = offset as usize;
        buf.copy_from_slice(
            self.get(a..a + buf.len())
                .ok_or_else(|| invalid(format!("read at {offset} past the end of the image")))?,
        );
        Ok(())
    }
}

/// An image file, written in place.
impl Image for File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

/// Applies a log to an image: entries in order ([`Replayer::advance_to`]), and on top of that
/// tentative pieces that [`Replayer::rollback`] takes back.
pub struct Replayer<'l, I: Image> {
    pub log: &'l Log,
    pub image: I,
    applied: usize,
    undo: Vec<(u64, Vec<u8>)>,
}

impl<'l, I: Image> Replayer<'l, I> {
    /// `image` must hold the disk as it was when the log started.
    pub fn new(log: &'l Log, image: I) -> Self {
        Replayer {
            log,
            image,
            applied: 0,
            undo: Vec::new(),
        }
    }

    /// Entries `[0, applied())` are in the image.
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// Apply entries up to (not including) `n`, in log order.
    pub fn advance_to(&mut self, n: usize) -> io::Result<()> {
        assert!(self.undo.is_empty(), "roll back tentative pieces first");
        assert!(n >= self.applied && n <= self.log.entries.len());
        for i in self.applied..n {
            if self.log.entries[i].writes() {
                let data = self.log.data(i)?;
                self.image.write_at(self.log.range(i).start, &data)?;
            }
        }
        self.applied = n;
        Ok(())
    }

    /// Put `pieces` on the image, remembering what they overwrote.
    pub fn apply_tentative(&mut self, pieces: &[Piece]) -> io::Result<()> {
        for p in pieces {
            let r = self.log.range(p.entry);
            let data = self.log.data(p.entry)?;
            let parts = match &p.groups {
                None => vec![r.clone()],
                Some(gs) => {
                    let all = self.log.groups(p.entry);
                    gs.iter().map(|&g| all[g].clone()).collect()
                }
            };
            for part in parts {
                let mut old = vec![0u8; (part.end - part.start) as usize];
                self.image.read_at(part.start, &mut old)?;
                self.undo.push((part.start, old));
                let from = (part.start - r.start) as usize;
                self.image.write_at(
                    part.start,
                    &data[from..from + (part.end - part.start) as usize],
                )?;
            }
        }
        Ok(())
    }

    /// Take back every tentative piece.
    pub fn rollback(&mut self) -> io::Result<()> {
        while let Some((at, old)) = self.undo.pop() {
            self.image.write_at(at, &old)?;
        }
        Ok(())
    }

    /// Move to crash state `v` of `point` (tentative pieces of an earlier state rolled back).
    /// `None` when the variant does not exist at this point.
    pub fn enter(&mut self, point: &FlushPoint, v: Variant) -> io::Result<Option<Vec<Piece>>> {
        self.rollback()?;
        let Some(pieces) = point.pieces(self.log, v) else {
            return Ok(None);
        };
        self.advance_to(point.prefix)?;
        self.apply_tentative(&pieces)?;
        Ok(Some(pieces))
    }
}

/// Copy `from` to `to` leaving all-zero 4 KiB blocks as holes (disk images are mostly zeros).
pub fn sparse_copy(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = File::create(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        src.read_exact(&mut buf[..n])?;
        for (i, block) in buf[..n].chunks(GROUP as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.write_all_at(block, at + (i as u64) * GROUP)?;
            }
        }
        at += n as u64;
    }
    dst.set_len(len)?;
    dst.flush()?;
    Ok(())
}

/// Write into `out` the disk at crash state `variant` of flush point `upto` (`None`: after the
/// whole log), starting from a sparse copy of `base`. Returns the pieces applied beyond the
/// point's prefix.
pub fn rebuild(
    log: &Log,
    base: &Path,
    out: &Path,
    upto: Option<usize>,
    variant: Variant,
) -> io::Result<Vec<Piece>> {
    sparse_copy(base, out)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(out)?;
    let mut r = Replayer::new(log, file);
    match upto {
        None => {
            r.advance_to(log.entries.len())?;
            Ok(Vec::new())
        }
        Some(k) => {
            let points = log.flush_points();
            let point = points.get(k).ok_or_else(|| {
                invalid(format!(
                    "flush point {k}: the log has points 0..={}",
                    points.len() - 1
                ))
            })?;
            let pieces = r.enter(point, variant)?.ok_or_else(|| {
                invalid(format!(
                    "variant {variant} does not exist at flush point {k} ({} pending writes)",
                    point.pending.len()
                ))
            })?;
            r.image.sync_all()?;
            Ok(pieces)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log as QEMU writes it: superblock, then (header sector, data sectors) per entry.
    fn write_log(path: &Path, entries: &[(u64, u64, u64, u8)], superblock: bool) {
        let ss = 512usize;
        let mut v = vec![0u8; ss];
        if superblock {
            v[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            v[8..16].copy_from_slice(&VERSION.to_le_bytes());
            let flushes = entries.iter().filter(|e| e.2 & FLAG_FLUSH != 0).count() as u64;
            v[16..24].copy_from_slice(&flushes.to_le_bytes());
            v[24..28].copy_from_slice(&512u32.to_le_bytes());
        }
        for &(sector, nr, flags, fill) in entries {
            let mut h = vec![0u8; ss];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            v.extend_from_slice(&h);
            if flags & FLAG_DISCARD == 0 {
                v.extend(std::iter::repeat_n(fill, nr as usize * ss));
            }
        }
        std::fs::write(path, v).unwrap();
    }

    fn sample(dir: &Path) -> Log {
        let p = dir.join("log");
        write_log(
            &p,
            &[
                (8, 8, 0, 1),             // 0: 4 KiB at 4096
                (0, 0, FLAG_FLUSH, 0),    // 1: flush
                (16, 16, 0, 2),           // 2: 8 KiB at 8192 (two groups)
                (4, 2, 0, 3),             // 3: 1 KiB at 2048
                (40, 8, FLAG_DISCARD, 0), // 4: discard
                (0, 0, FLAG_FLUSH, 0),    // 5: flush
                (1, 1, 0, 4),             // 6: after the last flush
            ],
            true,
        );
        Log::open(&p).unwrap()
    }

    #[test]
    fn parses_entries_flags_and_unflushed_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample(dir.path());
        assert_eq!(log.sector_size, 512);
        assert_eq!(log.entries.len(), 7);
        assert_eq!(log.superblock_entries, 2);
        let c = log.counts();
        assert_eq!((c.writes, c.flushes, c.discards), (4, 2, 1));
        assert_eq!(log.range(2), 8192..16384);
        assert_eq!(log.groups(2), vec![8192..12288, 12288..16384]);
        assert_eq!(log.groups(3), vec![2048..3072]);
        assert_eq!(log.data(3).unwrap(), vec![3u8; 1024]);
        assert_eq!(log.entries_before(log.entries[2].header_at + 1), 3);
    }

    #[test]
    fn flush_points_split_pending_writes() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample(dir.path());
        let p = log.flush_points();
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].prefix, p[0].pending.clone()), (0, vec![0]));
        assert_eq!((p[1].prefix, p[1].pending.clone()), (1, vec![2, 3]));
        assert_eq!((p[2].prefix, p[2].pending.clone()), (5, vec![6]));
    }

    #[test]
    fn replay_with_undo_and_variants_are_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample(dir.path());
        let points = log.flush_points();
        let mut r = Replayer::new(&log, vec![0u8; 32768]);
        r.enter(&points[1], Variant::None).unwrap().unwrap();
        assert_eq!(&r.image[4096..8192], &[1u8; 4096][..]);
        assert!(r.image[8192..].iter().all(|&b| b == 0));
        let pieces = r.enter(&points[1], Variant::Torn(7)).unwrap().unwrap();
        assert_eq!(pieces, points[1].pieces(&log, Variant::Torn(7)).unwrap());
        let torn = pieces.iter().find(|p| p.groups.is_some()).unwrap();
        assert_eq!(torn.entry, 2);
        assert_eq!(torn.groups.as_ref().unwrap().len(), 1);
        let ones = r.image[8192..16384].iter().filter(|&&b| b == 2).count();
        assert_eq!(ones, 4096, "exactly one of the two groups");
        r.rollback().unwrap();
        assert!(r.image[8192..].iter().all(|&b| b == 0));
        // Every mask of two writes, then everything.
        for m in 0..4 {
            let pieces = r.enter(&points[1], Variant::Mask(m)).unwrap().unwrap();
            assert_eq!(pieces.len(), m.count_ones() as usize);
        }
        assert!(r.enter(&points[1], Variant::Mask(4)).unwrap().is_none());
        assert!(r.enter(&points[2], Variant::Torn(1)).unwrap().is_none());
        r.rollback().unwrap();
        r.advance_to(log.entries.len()).unwrap();
        assert_eq!(&r.image[512..1024], &[4u8; 512][..]);
        assert_eq!(&r.image[2048..3072], &[3u8; 1024][..]);
        // Subsets of two or more writes are never none or all.
        for s in 0..50 {
            let n = points[1].pieces(&log, Variant::Subset(s)).unwrap().len();
            assert_eq!(n, 1);
        }
        assert_eq!("torn:0x10".parse::<Variant>().unwrap(), Variant::Torn(16));
        assert_eq!(
            Variant::Mask(5).to_string().parse::<Variant>(),
            Ok(Variant::Mask(5))
        );
    }

    #[test]
    fn log_without_superblock_and_with_a_cut_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        write_log(&p, &[(8, 8, 0, 9), (16, 8, 0, 9)], false);
        // The second entry's data cut short, as when QEMU dies mid-write.
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let log = Log::open(&p).unwrap();
        assert_eq!(log.entries.len(), 1);
        assert_eq!(log.trailing_bytes, 512 + 4096 - 100);
    }

    #[test]
    fn rebuild_writes_a_sparse_image() {
        let dir = tempfile::tempdir().unwrap();
        let log = sample(dir.path());
        let base = dir.path().join("base");
        std::fs::write(&base, vec![0u8; 32768]).unwrap();
        let out = dir.path().join("out");
        rebuild(&log, &base, &out, Some(1), Variant::All).unwrap();
        let img = std::fs::read(&out).unwrap();
        assert_eq!(img.len(), 32768);
        assert_eq!(&img[8192..16384], &[2u8; 8192][..]);
        rebuild(&log, &base, &out, None, Variant::None).unwrap();
        assert_eq!(std::fs::read(&out).unwrap()[512], 4);
    }
}
