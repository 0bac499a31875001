//! Persistent updater state (`<state_dir>/state.json`): what each slot holds, the
//! anti-rollback floor, and the history of rollbacks. Written atomically so a power cut
//! leaves either the old or the new file, never a mix.

use std::collections::BTreeMap;
use std::path::PathBuf;

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

impl InstallProgress {
    /// Ranges `[a, b)` from a sorted list of chunk indexes.
    pub fn ranges(done: &[u32]) -> Vec<[u32; 2]> {
        let mut out: Vec<[u32; 2]> = Vec::new();
        for &i in done {
            match out.last_mut() {
                Some(r) if r[1] == i => r[1] = i + 1,
                _ => out.push([i, i + 1]),
            }
        }
        out
    }

    /// Whether chunk `i` of payload `p` is done.
    pub fn has(&self, p: usize, i: u32) -> bool {
        self.done
            .get(p)
            .is_some_and(|rs| rs.iter().any(|r| r[0] <= i && i < r[1]))
    }
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
    /// The image this slot holds, as written and read back: what proves the slot intact later
    /// (a bundle without an image payload may make the slot bootable only if its bytes still
    /// hash to this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRecord>,
    /// Tries the bootloader was given when this slot was made primary: while it still has all
    /// of them it has not been booted yet (pending), once fewer are left a boot was attempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_tries: Option<u32>,
    /// While an install is under way: which chunks of which bundle are already written,
    /// fsynced and verified in this slot, so an interrupted apply of the same bundle continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<InstallProgress>,
    /// The chunk table of the image this slot holds (version 2 bundles): a later update can
    /// take any chunk it shares from this slot instead of the network (re-hashed when used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunkTable>,
}

/// Chunks of an interrupted install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallProgress {
    pub bundle_id: String,
    /// Per payload (in manifest order), the indexes of the chunks done, as ranges `[a, b)`.
    pub done: Vec<Vec<[u32; 2]>>,
}

/// A slot image's chunks on a fixed grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkTable {
    pub chunk_size: u32,
    pub hashes: Vec<crate::bundle::Digest>,
}

/// A slot image: `size` bytes from the start of the slot device, with this blake3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub size: u64,
    pub blake3: crate::bundle::Digest,
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
            image: None,
            activated_tries: None,
            progress: None,
            chunks: None,
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
    /// Rollbacks ever recorded (the list above keeps only the last few): a counter for metrics.
    #[serde(default)]
    pub rollbacks_total: u64,
    /// The last boot the health check judged: (slot, healthy, unix time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_health: Option<HealthRecord>,
    /// The newest creation time of any bundle installed here (unix seconds): the clock may
    /// not be trusted below it for expiry checks.
    #[serde(default)]
    pub newest_seen: u64,
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
            rollbacks_total: 0,
            last_health: None,
            newest_seen: 0,
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
        // States written before the counter existed: count at least the events kept.
        self.rollbacks_total = self.rollbacks_total.max(self.rollbacks.len() as u64) + 1;
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
        Ok(crate::fsutil::write_atomic(&self.path(), &bytes, 0o644)?)
    }
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
        assert_eq!(st.rollbacks_total, 100);
    }
}
