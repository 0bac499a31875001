//! Persistent updater state (`<state_dir>/state.json`): what each slot holds, the
//! anti-rollback floor, and the history of rollbacks. Written atomically so a power cut
//! leaves either the old or the new file, never a mix.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Schema version of state.json.
pub const STATE_VERSION: u32 = 1;
/// How many rollback events are kept.
const MAX_EVENTS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotStatus {
    /// Never written by edge-ota (e.g. the factory image) or state unknown.
    Unknown,
    /// A write started and did not finish: the content is garbage until reinstalled.
    Installing,
    /// Written and read back: holds the recorded bundle.
    Installed,
}

impl SlotStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            SlotStatus::Unknown => "unknown",
            SlotStatus::Installing => "installing",
            SlotStatus::Installed => "installed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub status: SlotStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_version: Option<u64>,
    /// blake3 of the bundle's signed manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<u64>,
    /// Why the slot was last marked bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl Default for SlotRecord {
    fn default() -> Self {
        SlotRecord {
            status: SlotStatus::Unknown,
            version: None,
            security_version: None,
            bundle_id: None,
            installed_at: None,
            confirmed_at: None,
            failure: None,
        }
    }
}

/// A fallback to the other slot, recorded so operators and `status` can see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackEvent {
    pub at: u64,
    /// The slot that failed.
    pub slot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The slot that runs instead.
    pub running: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Bundles with a lower security_version are refused. Rises only when a slot is confirmed.
    pub min_security_version: u64,
    pub slots: BTreeMap<String, SlotRecord>,
    #[serde(default)]
    pub rollbacks: Vec<RollbackEvent>,
    /// The last boot the health check judged: (slot, healthy, unix time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_health: Option<HealthRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub slot: String,
    pub healthy: bool,
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            min_security_version: 0,
            slots: BTreeMap::new(),
            rollbacks: Vec::new(),
            last_health: None,
        }
    }
}

impl State {
    pub fn slot(&self, name: &str) -> SlotRecord {
        self.slots.get(name).cloned().unwrap_or_default()
    }

    pub fn slot_mut(&mut self, name: &str) -> &mut SlotRecord {
        self.slots.entry(name.to_string()).or_default()
    }

    pub fn record_rollback(&mut self, ev: RollbackEvent) {
        self.rollbacks.push(ev);
        let excess = self.rollbacks.len().saturating_sub(MAX_EVENTS);
        self.rollbacks.drain(..excess);
    }
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Load the state; a missing file is a fresh device, a corrupt one is an error (never
    /// silently reset: it holds the anti-rollback floor).
    pub fn load(&self) -> Result<State> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: path.clone(),
            reason: format!("corrupt: {e}"),
        })?;
        if state.version != STATE_VERSION {
            return Err(Error::State {
                path,
                reason: format!("unsupported state version {}", state.version),
            });
        }
        Ok(state)
    }

    pub fn save(&self, state: &State) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .ctx(|| format!("creating state directory {}", self.dir.display()))?;
        let mut bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        bytes.push(b'\n');
        write_atomic(&self.path(), &bytes)
    }
}

/// Replace `path` with `bytes` atomically and durably: temp file in the same directory,
/// fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .ctx(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .ctx(|| format!("writing {}", tmp.path().display()))?;
    persist(tmp, path)
}

/// Make a fully written temporary file (created in `path`'s directory) durable as `path`:
/// fsync it, rename it over `path`, fsync the directory. A power cut leaves the old file or
/// the new one, never a mix.
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    tmp.as_file()
        .sync_all()
        .ctx(|| format!("syncing {}", tmp.path().display()))?;
    tmp.persist(path)
        .map_err(|e| Error::io(format!("renaming into {}", path.display()), e.error))?;
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_state_is_fresh_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("s"));
        let mut st = store.load().unwrap();
        assert_eq!(st, State::default());
        st.min_security_version = 7;
        st.slot_mut("B").status = SlotStatus::Installing;
        store.save(&st).unwrap();
        assert_eq!(store.load().unwrap(), st);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        std::fs::write(store.path(), b"{\"version\":1,").unwrap();
        assert!(matches!(store.load(), Err(Error::State { .. })));
    }

    #[test]
    fn rollback_history_is_bounded() {
        let mut st = State::default();
        for i in 0..100 {
            st.record_rollback(RollbackEvent {
                at: i,
                slot: "B".into(),
                version: None,
                running: "A".into(),
                reason: "x".into(),
            });
        }
        assert_eq!(st.rollbacks.len(), MAX_EVENTS);
        assert_eq!(st.rollbacks.last().unwrap().at, 99);
    }
}
