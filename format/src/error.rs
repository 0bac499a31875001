//! What reading or checking a bundle can fail with. The device maps each variant to its own
//! exit code (edge-ota's `Error`), so a caller can tell a forged signature from a short file.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad magic, version, structure, trailing data, unknown fields.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error("truncated bundle: {0}")]
    Truncated(String),
    /// A length or count above a hard limit, refused before anything is allocated.
    #[error("bundle exceeds a limit: {0}")]
    Limit(String),
    #[error("bundle is unsigned")]
    Unsigned,
    #[error("bundle signed only by unknown keys: {0}")]
    UnknownKey(String),
    #[error("bad signature by key {0}")]
    BadSignature(String),
    #[error("not enough trusted signatures: {have} valid, {need} required")]
    BelowThreshold { have: usize, need: usize },
    /// A key file or a trust setting that cannot be used.
    #[error("key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// Trust settings that can never accept a bundle (no keys, impossible threshold).
    #[error("trust: {0}")]
    Trust(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a context naming the object to I/O results: `f.read(..).ctx(|| format!("reading {p}"))`.
pub trait IoContext<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
