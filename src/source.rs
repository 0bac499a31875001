//! Where a bundle comes from: a file (USB stick, pre-staged download) or a pipe (`-`).
//! Network sources (HTTP ranges, LAN cache) plug in here as further readers.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{IoContext, Result};

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
