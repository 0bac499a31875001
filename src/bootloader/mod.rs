//! Bootloader backends: every backend answers the same few questions (as in RAUC's bootchooser).
//!
//! The A/B protocol itself lives in [`env`]: backends that keep a key/value environment
//! (GRUB's grubenv, U-Boot's env, a plain file for tests) only implement [`EnvStore`].
//! systemd-boot keeps its state in entry file names and implements [`Bootloader`] directly.

pub mod env;
pub mod file;
pub mod grubenv;
pub mod systemd_boot;
pub mod uboot_env;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

/// What a backend can fail with. Corrupt or missing state is an error, never a silent default:
/// a default could boot the wrong slot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("boot environment {path}: corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("boot environment {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown slot {0:?} (not in the boot order)")]
    UnknownSlot(String),
    #[error("boot environment: {0}")]
    Invalid(String),
}

impl BootError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BootError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Replace a bootloader file (loader.conf, a new grubenv, the file backend) atomically and
/// durably, world-readable like the files the bootloaders' own tools write.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), BootError> {
    crate::fsutil::write_atomic(path, bytes, 0o644).map_err(BootError::from)
}

impl From<crate::fsutil::FsError> for BootError {
    fn from(e: crate::fsutil::FsError) -> Self {
        BootError::Io {
            path: e.context.into(),
            source: e.source,
        }
    }
}

/// A key/value environment that a bootloader reads at boot (grubenv, U-Boot env, a file).
///
/// `load` must fail on a corrupt or missing store; `store` must be durable (fsynced) when it
/// returns, and must never leave a state the bootloader would read as half old, half new.
pub trait EnvStore {
    fn load(&self) -> Result<BTreeMap<String, String>, BootError>;
    fn store(&self, vars: &BTreeMap<String, String>) -> Result<(), BootError>;
    /// Where the store lives, for messages and `status`.
    fn describe(&self) -> String;
    /// Problems with redundant copies that [`EnvStore::load`] worked around (a copy missing,
    /// corrupt or stale). Empty when there is nothing to repair.
    fn check(&self) -> Vec<String> {
        Vec::new()
    }
    /// Rewrite stale or corrupt redundant copies from the current one; returns what was fixed.
    fn repair(&self) -> Result<Vec<String>, BootError> {
        Ok(Vec::new())
    }
}

/// `<dir of path>/<name>`: files a backend keeps beside its main one.
pub(crate) fn file_beside(path: &std::path::Path, name: &str) -> PathBuf {
    crate::fsutil::parent_dir(path).join(name)
}

/// How the bootloader sees one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum SlotBootState {
    /// Confirmed by the health check: boots without using up tries.
    Good,
    /// Not yet confirmed: the bootloader boots it while `tries_left > 0`, decrementing each time.
    Trying { tries_left: u32 },
    /// Marked bad: never booted.
    Bad,
}

/// The operations every bootloader backend provides.
pub trait Bootloader {
    /// Slots in boot order, as stored (the first is the one that was asked to boot).
    fn order(&self) -> Result<Vec<String>, BootError>;
    /// Put `slot` first in the order, in state `Trying { tries_left: tries }`.
    fn set_primary(&mut self, slot: &str, tries: u32) -> Result<(), BootError>;
    /// Confirm `slot`: state `Good`.
    fn mark_good(&mut self, slot: &str) -> Result<(), BootError>;
    /// Never boot `slot` again until it is reinstalled: state `Bad`.
    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError>;
    /// The state of one slot.
    fn slot_state(&self, slot: &str) -> Result<SlotBootState, BootError>;
    /// The bootloader side's copy of the anti-rollback floor (the state file holds the other
    /// one; the effective floor is the larger). `None` when none is recorded.
    fn floor(&self) -> Result<Option<u64>, BootError>;
    /// Record the floor on the bootloader side.
    fn set_floor(&mut self, floor: u64) -> Result<(), BootError>;
    /// Where the backend keeps its state, for messages.
    fn describe(&self) -> String;
    /// Problems with redundant copies of the boot state that reading worked around.
    fn check(&self) -> Vec<String> {
        Vec::new()
    }
    /// Rewrite stale or corrupt redundant copies; returns what was fixed.
    fn repair(&mut self) -> Result<Vec<String>, BootError> {
        Ok(Vec::new())
    }

    /// The slot the bootloader will pick next: the first in order that is good, or trying with
    /// tries left. `None` when no slot is bootable.
    fn next_boot(&self) -> Result<Option<String>, BootError> {
        for slot in self.order()? {
            match self.slot_state(&slot)? {
                SlotBootState::Good => return Ok(Some(slot)),
                SlotBootState::Trying { tries_left } if tries_left > 0 => return Ok(Some(slot)),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// Open the configured backend.
pub fn open(cfg: &crate::config::Config) -> Result<Box<dyn Bootloader>, BootError> {
    use crate::config::BackendKind;
    let path = cfg.bootloader.path.clone();
    Ok(match cfg.bootloader.backend {
        BackendKind::File => Box::new(env::EnvBootloader::new(file::FileEnv::new(path))),
        BackendKind::Grub => Box::new(env::EnvBootloader::new(grubenv::GrubEnvPair::new(path))),
        BackendKind::Uboot => Box::new(env::EnvBootloader::new(
            uboot_env::UBootEnv::from_config_file(&path)?,
        )),
        BackendKind::SystemdBoot => Box::new(systemd_boot::SystemdBoot::new(
            path.join("loader/entries"),
            path.join("loader/loader.conf"),
            cfg.bootloader.entry_prefix.clone(),
            cfg.slots.iter().map(|s| s.name.clone()).collect(),
        )?),
    })
}

/// Write a fresh environment in which `good` boots and every other slot is bad.
pub fn init(cfg: &crate::config::Config, good: &str) -> Result<(), BootError> {
    use crate::config::BackendKind;
    let slots: Vec<String> = cfg.slots.iter().map(|s| s.name.clone()).collect();
    let vars = env::EnvBootloader::<file::FileEnv>::initial_vars(&slots, good);
    match cfg.bootloader.backend {
        BackendKind::File => file::FileEnv::new(&cfg.bootloader.path).store(&vars),
        BackendKind::Grub => grubenv::GrubEnvPair::create(&cfg.bootloader.path, &vars).map(drop),
        BackendKind::Uboot => {
            uboot_env::UBootEnv::from_config_file(&cfg.bootloader.path)?.store(&vars)
        }
        BackendKind::SystemdBoot => Err(BootError::Invalid(
            "systemd-boot keeps its state in entry file names: the image builder installs them"
                .into(),
        )),
    }
}
