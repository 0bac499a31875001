//! The crate's error type and the exit code of each class of failure.
//!
//! Callers branch on variants; the CLI maps each to a distinct exit code (table in README.md),
//! so scripts and GitOps agents can tell "bad input, nothing changed" from "I/O failed".

use std::path::PathBuf;

use crate::bootloader::BootError;
use crate::fsutil::FsError;

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
    /// The health gate could not judge the booted slot (its state or the boot environment is
    /// unreadable, or the slot is marked bad or half-installed): nothing was marked good, the
    /// slot keeps running.
    #[error("health check cannot confirm slot {slot}: {reason}")]
    Unjudgeable { slot: String, reason: String },

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
    #[error("bundle expired at {expires} (now {now}, unix seconds{})", if *clock_behind { "; the clock is behind the newest time this device has seen, which is used instead" } else { "" })]
    Expired {
        expires: u64,
        now: u64,
        clock_behind: bool,
    },
    #[error("payload {payload:?} ({size} bytes) is larger than {target} ({capacity} bytes)")]
    TooLarge {
        payload: String,
        size: u64,
        target: String,
        capacity: u64,
    },
    #[error("slot: {0}")]
    Slot(String),
    /// Writing the target would destroy the only slot known to boot.
    #[error("{0}")]
    OnlyGoodSlot(String),
    /// Another edge-ota command holds the lock.
    #[error("another edge-ota operation is running ({0})")]
    Busy(String),
    #[error("clock: {0}")]
    Clock(String),
    /// The network source could not be read and retrying gave up (the reason says why).
    #[error("network: {url}: {reason}")]
    Network { url: String, reason: String },
    /// The bundle at the source changed while it was being read (ETag/Last-Modified differ):
    /// chunks of two bundles are never mixed.
    #[error("source changed: {url}: {reason}")]
    SourceChanged { url: String, reason: String },
    /// The update would download more than allowed (`--max-download`, `[network] max_download`).
    #[error("data budget: the update needs {need} bytes from the network, the budget is {budget}")]
    DataBudget { need: u64, budget: u64 },
    /// `--offline` and something would have to come from the network.
    #[error("offline: {0}")]
    Offline(String),
    /// Stopped on request (the agent was paused or its desired state changed); what was
    /// done so far is kept and the next run continues from it.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// The source holds a valid bundle, but not the one asked for (another version or id).
    #[error("not the bundle asked for: {0}")]
    NotDesired(String),
    /// Container images could not be loaded into containerd, or are not what was signed.
    #[error("container images: {0}")]
    Images(String),
    /// The reboot coordinator refused leave to reboot for this attempt (a drain that timed
    /// out with `onTimeout: abort`); the applied slot was taken back.
    #[error("reboot refused: {0}")]
    RebootRefused(String),
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
            Error::Unjudgeable { .. } => 8,
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
            Error::OnlyGoodSlot(_) => 22,
            Error::Busy(_) => 23,
            Error::Clock(_) => 24,
            Error::Network { .. } => 25,
            Error::SourceChanged { .. } => 26,
            Error::DataBudget { .. } => 27,
            Error::Offline(_) => 28,
            Error::Interrupted(_) => 29,
            Error::NotDesired(_) => 30,
            Error::Images(_) => 31,
            Error::RebootRefused(_) => 32,
        }
    }
}

impl From<crate::bundle::Error> for Error {
    fn from(e: crate::bundle::Error) -> Self {
        use crate::bundle::Error as F;
        match e {
            F::Malformed(s) => Error::Format(s),
            F::Truncated(s) => Error::Truncated(s),
            F::Limit(s) => Error::Limit(s),
            F::Unsigned => Error::Unsigned,
            F::UnknownKey(s) => Error::UnknownKey(s),
            F::BadSignature(s) => Error::BadSignature(s),
            F::BelowThreshold { have, need } => Error::BelowThreshold { have, need },
            F::Key { path, reason } => Error::Config { path, reason },
            F::Trust(reason) => Error::Config {
                path: "[trust]".into(),
                reason,
            },
            F::Io { context, source } => Error::Io { context, source },
        }
    }
}

impl From<FsError> for Error {
    fn from(e: FsError) -> Self {
        Error::Io {
            context: e.context,
            source: e.source,
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
