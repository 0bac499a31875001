//! Where a bundle comes from: a file (USB stick, pre-staged download), a pipe (`-`), or an
//! HTTP(S) URL. A pipe can only be read in order ([`Source`]); files and URLs can be read at
//! any offset ([`RangeSource`]), which is what lets an apply fetch only what the device lacks
//! and resume from the exact byte after a drop.

pub mod http;

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// An opened bundle stream.
pub struct Source {
    pub reader: Box<dyn Read + Send>,
    /// Total length when known (regular files): lets truncation be refused before any write.
    pub len: Option<u64>,
    /// For messages.
    pub name: String,
}

impl Source {
    /// Open `spec`: `-` is standard input, anything else a path.
    pub fn open(spec: &str) -> Result<Source> {
        if spec == "-" {
            return Ok(Source {
                reader: Box::new(std::io::stdin()),
                len: None,
                name: "standard input".into(),
            });
        }
        let path = Path::new(spec);
        let file = File::open(path).ctx(|| format!("opening bundle {spec}"))?;
        let meta = file
            .metadata()
            .ctx(|| format!("reading metadata of {spec}"))?;
        let len = meta.is_file().then_some(meta.len());
        Ok(Source {
            reader: Box::new(file),
            len,
            name: spec.to_string(),
        })
    }
}

/// A bundle readable at any offset.
pub trait RangeSource: Send {
    /// Total length of the bundle.
    fn len(&self) -> u64;
    /// A bundle is never empty; for completeness.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Across a network: what arrives is spooled on the device, so a cut never costs a byte
    /// twice.
    fn is_remote(&self) -> bool {
        false
    }
    /// For messages: a path or a URL.
    fn name(&self) -> &str;
    /// Deliver exactly the bytes of `ranges` (sorted, not overlapping) to `sink`, in ascending
    /// offset order, each byte once: `sink(offset, bytes)`. An error from `sink` stops the
    /// fetch and is returned as is.
    fn fetch(
        &mut self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()>;
}

/// A regular file as a [`RangeSource`].
pub struct FileSource {
    file: File,
    len: u64,
    name: String,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource> {
        let file = File::open(path).ctx(|| format!("opening bundle {}", path.display()))?;
        let len = file
            .metadata()
            .ctx(|| format!("reading metadata of {}", path.display()))?
            .len();
        Ok(FileSource {
            file,
            len,
            name: path.display().to_string(),
        })
    }
}

impl RangeSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(
        &mut self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        for r in ranges {
            if r.end > self.len {
                return Err(Error::Truncated(format!(
                    "{} is {} bytes, a range ends at {}",
                    self.name, self.len, r.end
                )));
            }
            let mut at = r.start;
            while at < r.end {
                let n = ((r.end - at) as usize).min(buf.len());
                self.file
                    .read_exact_at(&mut buf[..n], at)
                    .ctx(|| format!("reading {} at byte {at}", self.name))?;
                sink(at, &buf[..n])?;
                at += n as u64;
            }
        }
        Ok(())
    }
}
