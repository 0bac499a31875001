//! The crate's error type and the exit code of each class of failure.
//!
//! Callers branch on variants; the CLI maps each to a distinct exit code (table in README.md),
//! so scripts and GitOps agents can tell "bad input, nothing changed" from "I/O failed".

use std::path::PathBuf;

use crate::bootloader::BootError;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("usage: {0}")]
    Usage(String),
    #[error("configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("health check failed: {0}")]
    HealthFailed(String),

    #[error("malformed bundle: {0}")]
    Format(String),
    #[error("truncated bundle: {0}")]
    Truncated(String),
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
    #[error("tampered payload {payload:?}: {what}")]
    Tampered { payload: String, what: String },
    #[error("wrong compatible: bundle is for {bundle:?}, this device is {device:?}")]
    WrongCompatible { bundle: String, device: String },
    #[error("downgrade refused: bundle security version {bundle} is below the installed minimum {minimum}")]
    Downgrade { bundle: u64, minimum: u64 },
    #[error("bundle expired at {expires} (now {now}, unix seconds)")]
    Expired { expires: u64, now: u64 },
    #[error("payload {payload:?} ({size} bytes) is larger than {target} ({capacity} bytes)")]
    TooLarge {
        payload: String,
        size: u64,
        target: String,
        capacity: u64,
    },
    #[error("slot: {0}")]
    Slot(String),
}

impl Error {
    /// Wrap an I/O error with a short lowercase context naming the object ("writing /dev/vda3").
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The process exit code for this error. Distinct per class; documented in README.md.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Config { .. } => 3,
            Error::Io { .. } => 4,
            Error::State { .. } => 5,
            Error::Boot(_) => 6,
            Error::HealthFailed(_) => 7,
            Error::Format(_) => 10,
            Error::Truncated(_) => 11,
            Error::Limit(_) => 12,
            Error::Unsigned | Error::UnknownKey(_) => 13,
            Error::BadSignature(_) => 14,
            Error::BelowThreshold { .. } => 15,
            Error::Tampered { .. } => 16,
            Error::WrongCompatible { .. } => 17,
            Error::Downgrade { .. } => 18,
            Error::Expired { .. } => 19,
            Error::TooLarge { .. } => 20,
            Error::Slot(_) => 21,
        }
    }
}

/// Attach a context to I/O results at the edges: `file.read(..).ctx(|| format!("reading {p}"))`.
pub trait IoContext<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
