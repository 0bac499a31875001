//! Writing and reading back a slot: large aligned direct-I/O writes on a writer thread, fsync,
//! and a read-back hash that bypasses the page cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::error::{Error, IoContext, Result};

/// Size of each write (and read-back) request.
pub const IO_BLOCK: usize = 2 << 20;
/// Alignment O_DIRECT needs (covers 512-byte and 4 KiB logical blocks).
const ALIGN: usize = 4096;
/// Write buffers in rotation: one filling, the rest queued for or in the kernel.
const WRITE_BUFFERS: usize = 4;

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

struct WriteJob {
    buf: AlignedBuf,
    len: usize,
    at: u64,
}

/// Streams bytes to `size` bytes at `offset` in a device. Bytes are gathered into aligned
/// [`IO_BLOCK`] buffers and written by a separate thread, so writing overlaps with the
/// decompression and hashing that produce the next buffer.
pub struct SlotWriter {
    path: PathBuf,
    offset: u64,
    limit: u64,
    written: u64,
    cur: AlignedBuf,
    fill: usize,
    jobs: Option<Sender<WriteJob>>,
    free: Receiver<AlignedBuf>,
    thread: Option<std::thread::JoinHandle<Result<File>>>,
    direct: bool,
}

impl SlotWriter {
    pub fn open(path: &Path, offset: u64, limit: u64) -> Result<SlotWriter> {
        let (file, direct) = open_maybe_direct(path, true, offset)?;
        let (job_tx, job_rx) = bounded::<WriteJob>(WRITE_BUFFERS);
        let (free_tx, free_rx) = bounded::<AlignedBuf>(WRITE_BUFFERS);
        for _ in 1..WRITE_BUFFERS {
            free_tx
                .send(AlignedBuf::new(IO_BLOCK))
                .expect("fresh channel");
        }
        let p = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("slot-writer".into())
            .spawn(move || -> Result<File> {
                for job in job_rx {
                    file.write_all_at(&job.buf.as_slice()[..job.len], job.at)
                        .ctx(|| format!("writing {} at byte {}", p.display(), job.at))?;
                    // The receiver is gone only if the producer already failed.
                    let _ = free_tx.send(job.buf);
                }
                Ok(file)
            })
            .ctx(|| "starting writer thread".into())?;
        Ok(SlotWriter {
            path: path.to_path_buf(),
            offset,
            limit,
            written: 0,
            cur: AlignedBuf::new(IO_BLOCK),
            fill: 0,
            jobs: Some(job_tx),
            free: free_rx,
            thread: Some(thread),
            direct,
        })
    }

    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        if self.written + self.fill as u64 + data.len() as u64 > self.limit {
            return Err(Error::Format(format!(
                "payload overruns {} ({} bytes)",
                self.path.display(),
                self.limit
            )));
        }
        while !data.is_empty() {
            let n = data.len().min(IO_BLOCK - self.fill);
            self.cur.as_mut_slice()[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == IO_BLOCK {
                self.submit(IO_BLOCK)?;
            }
        }
        Ok(())
    }

    fn submit(&mut self, len: usize) -> Result<()> {
        let next = match self.free.recv() {
            Ok(b) => b,
            Err(_) => return Err(self.writer_failure()),
        };
        let buf = std::mem::replace(&mut self.cur, next);
        let job = WriteJob {
            buf,
            len,
            at: self.offset + self.written,
        };
        if self.jobs.as_ref().expect("open writer").send(job).is_err() {
            return Err(self.writer_failure());
        }
        self.written += len as u64;
        self.fill = 0;
        Ok(())
    }

    /// The writer thread stopped early: fetch its error.
    fn writer_failure(&mut self) -> Error {
        self.jobs = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            _ => Error::io(
                format!("writing {}", self.path.display()),
                std::io::Error::other("writer thread stopped"),
            ),
        }
    }

    /// Write what is left, wait for the writer, fsync. Returns bytes written.
    pub fn finish(mut self) -> Result<u64> {
        // Whole aligned blocks go through the direct handle; an unaligned tail through a
        // buffered one (O_DIRECT cannot write it).
        let aligned = if self.direct {
            self.fill / ALIGN * ALIGN
        } else {
            self.fill
        };
        let tail = self.cur.as_slice()[aligned..self.fill].to_vec();
        if aligned > 0 {
            self.submit(aligned)?;
        } else {
            self.fill = 0;
        }
        self.jobs = None;
        let file = match self.thread.take().expect("writer thread").join() {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::io(
                    "writing",
                    std::io::Error::other("writer thread panicked"),
                ))
            }
        };
        let ctx = || format!("syncing {}", self.path.display());
        if !tail.is_empty() {
            let f = OpenOptions::new()
                .write(true)
                .open(&self.path)
                .ctx(|| format!("opening for writing {}", self.path.display()))?;
            f.write_all_at(&tail, self.offset + self.written)
                .ctx(|| format!("writing {}", self.path.display()))?;
            self.written += tail.len() as u64;
            f.sync_all().ctx(ctx)?;
        }
        file.sync_all().ctx(ctx)?;
        Ok(self.written)
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
