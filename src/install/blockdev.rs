//! Writing and reading back a slot: positional writes of verified chunks (aligned ones with
//! direct I/O), fsync, and a read-back hash that bypasses the page cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
    if offset % ALIGN as u64 == 0 {
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
        }
    }

    /// Write `data` at `pos` of the slot. `data` must start on an aligned address for the
    /// direct path to be used (an [`AlignedBuf`]'s slice does).
    pub fn write_at(&self, pos: u64, data: &[u8]) -> Result<()> {
        if pos + data.len() as u64 > self.limit {
            return Err(Error::Format(format!(
                "payload overruns {} ({} bytes)",
                self.path.display(),
                self.limit
            )));
        }
        let at = self.offset + pos;
        let aligned_len = if at % ALIGN as u64 == 0 && data.as_ptr().align_offset(ALIGN) == 0 {
            data.len() / ALIGN * ALIGN
        } else {
            0
        };
        let Some(buffered) = &self.buffered else {
            return Ok(());
        };
        let (head, tail) = data.split_at(aligned_len);
        if let (Some(d), false) = (&self.direct, head.is_empty()) {
            d.write_all_at(head, at)
                .ctx(|| format!("writing {} at byte {at}", self.path.display()))?;
        } else if !head.is_empty() {
            buffered
                .write_all_at(head, at)
                .ctx(|| format!("writing {} at byte {at}", self.path.display()))?;
        }
        if !tail.is_empty() {
            let at = at + head.len() as u64;
            buffered
                .write_all_at(tail, at)
                .ctx(|| format!("writing {} at byte {at}", self.path.display()))?;
        }
        Ok(())
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
