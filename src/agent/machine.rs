//! The agent's state machine: one update at a time moves through explicit phases, each entered
//! only from its allowed predecessors, every transition persisted (atomically) before the work
//! of the new phase starts. After a crash or power cut the agent reloads the phase and does its
//! work again; every phase's work is safe to repeat (staging and apply resume, image import is
//! idempotent, a reboot is only issued once per boot).
//!
//! ```text
//!            ┌──────────── new desired state ────────────┐
//!            v                                           │
//!  Idle ─> Staging ─> Staged ─> Applying ─> Importing ─> Rebooting ─> Verifying ─> Succeeded
//!            │  ^        │         │           │            │            │
//!            v  │        v         v           v            v            v
//!           Failed ─(backoff)─> Staging                           (rolled back) Failed
//!            │
//!            v  after max_failures
//!          GaveUp (until the desired state changes)
//! ```
//! (`docs/agent.dot` is the full diagram, with every allowed edge.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::desired::Desired;
use crate::error::{Error, Result};

pub const AGENT_STATE_VERSION: u32 = 1;
/// Transitions and notices kept for `status`.
const HISTORY: usize = 40;
const NOTICES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing to do: no desired state, or the device runs it.
    Idle,
    /// Downloading into the cache what the update needs (resumable).
    Staging,
    /// Everything is staged and checked; waiting for the activation window.
    Staged,
    /// Writing the inactive slot from the cache.
    Applying,
    /// Loading the new slot's container images into containerd, while the old OS still runs.
    Importing,
    /// Waiting for leave to reboot: a cluster slot (`maxUnavailable`), the node drained.
    Draining,
    /// Stopping services and rebooting into the new slot.
    Rebooting,
    /// Booted again: waiting for the health gate's verdict on the new slot.
    Verifying,
    /// The new slot runs and is confirmed.
    Succeeded,
    /// The last attempt failed; retried after a backoff.
    Failed,
    /// Failed too often; nothing is retried until the desired state changes.
    GaveUp,
}

impl Phase {
    pub const ALL: [Phase; 11] = [
        Phase::Idle,
        Phase::Staging,
        Phase::Staged,
        Phase::Applying,
        Phase::Importing,
        Phase::Draining,
        Phase::Rebooting,
        Phase::Verifying,
        Phase::Succeeded,
        Phase::Failed,
        Phase::GaveUp,
    ];

    /// The phases this one may be entered from.
    pub fn allowed_from(self) -> &'static [Phase] {
        use Phase::*;
        match self {
            // Desired state withdrawn, or reached without an update.
            Idle => &[Staging, Staged, Succeeded, Failed, GaveUp],
            // A new desired state, a retry, or a staged copy that went missing.
            Staging => &[Idle, Staged, Succeeded, Failed, GaveUp],
            Staged => &[Staging],
            Applying => &[Staged],
            Importing => &[Applying],
            Draining => &[Importing],
            Rebooting => &[Draining],
            Verifying => &[Rebooting],
            Succeeded => &[Verifying],
            Failed => &[Staging, Applying, Importing, Draining, Rebooting, Verifying],
            GaveUp => &[Failed],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Staging => "staging",
            Phase::Staged => "staged",
            Phase::Applying => "applying",
            Phase::Importing => "importing",
            Phase::Draining => "draining",
            Phase::Rebooting => "rebooting",
            Phase::Verifying => "verifying",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::GaveUp => "gave-up",
        }
    }

    /// Phases in which the slots are being changed: a new desired state waits for the end.
    pub fn is_committed(self) -> bool {
        matches!(
            self,
            Phase::Applying
                | Phase::Importing
                | Phase::Draining
                | Phase::Rebooting
                | Phase::Verifying
        )
    }
}

/// The update in progress: what was decided, so a restart continues it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Work {
    /// Generation of the desired state this work is for.
    pub generation: String,
    /// The source the bundle was staged from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The slot and release that ran when the update started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    /// The slot written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_slot: Option<String>,
    /// Boot id when the reboot was issued: the same id after a restart means the reboot has
    /// not happened yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_boot_id: Option<String>,
    /// Compressed bytes fetched for this update (all runs).
    #[serde(default)]
    pub fetched: u64,
    /// Seconds the apply took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_secs: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    Succeeded,
    Failed,
    RolledBack,
    GaveUp,
}

/// How the last update ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub result: OutcomeKind,
    /// What was asked for (`2.0.0`).
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    pub at: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Something the agent did that a person should see (printed on the console too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub at: u64,
    pub message: String,
}

/// Everything the agent persists (`<state_dir>/agent.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub version: u32,
    pub phase: Phase,
    /// When the phase was entered (unix seconds).
    pub since: u64,
    /// The desired state being worked on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Desired>,
    /// A newer desired state that arrived while the slots were being changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<Desired>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<Work>,
    /// Failures of the current desired state, and when to try again.
    #[serde(default)]
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Paused through the API: nothing new starts (a running stage stops at its next chunk).
    #[serde(default)]
    pub paused: bool,
    /// `agent apply` asked to apply now, outside the windows.
    #[serde(default)]
    pub apply_now: bool,
    /// `agent stage` asked to stage now, outside the windows.
    #[serde(default)]
    pub stage_now: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<Outcome>,
    #[serde(default)]
    pub history: Vec<Transition>,
    #[serde(default)]
    pub notices: Vec<Notice>,
    /// The last generation each provider handed over: an unchanged document from one
    /// provider never replaces a newer one from another (after a restart, say).
    #[serde(default)]
    pub seen: std::collections::BTreeMap<String, String>,
    /// The coordinator was asked for leave to reboot and has not handed the node back yet
    /// (uncordon, lease): owed even across a restart, whatever the update's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_owed: Option<Owed>,
}

/// A release the coordinator still owes, and for which end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Owed {
    /// Asked for leave; the update has not ended yet (a confirmed update is released
    /// before it counts as succeeded, so there is no "owed after success").
    Pending,
    RolledBack,
    NotRebooted,
}

impl Default for AgentState {
    fn default() -> Self {
        AgentState {
            version: AGENT_STATE_VERSION,
            phase: Phase::Idle,
            since: 0,
            desired: None,
            queued: None,
            work: None,
            failures: 0,
            retry_at: None,
            last_error: None,
            paused: false,
            apply_now: false,
            stage_now: false,
            last_result: None,
            history: Vec::new(),
            notices: Vec::new(),
            seen: Default::default(),
            release_owed: None,
        }
    }
}

/// A transition that the machine does not allow: a bug, never a reaction to input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("agent: transition {from:?} -> {to:?} is not allowed")]
pub struct Forbidden {
    pub from: Phase,
    pub to: Phase,
}

impl AgentState {
    /// The one transition function: check the predecessor, record it. The caller persists.
    pub fn transition(&mut self, to: Phase, at: u64, reason: &str) -> Result<(), Forbidden> {
        let from = self.phase;
        if !to.allowed_from().contains(&from) {
            return Err(Forbidden { from, to });
        }
        self.phase = to;
        self.since = at;
        self.history.push(Transition {
            from,
            to,
            at,
            reason: reason.to_string(),
        });
        let excess = self.history.len().saturating_sub(HISTORY);
        self.history.drain(..excess);
        Ok(())
    }

    pub fn notice(&mut self, at: u64, message: String) {
        self.notices.push(Notice { at, message });
        let excess = self.notices.len().saturating_sub(NOTICES);
        self.notices.drain(..excess);
    }
}

/// The agent's state file.
#[derive(Debug, Clone)]
pub struct AgentStore {
    path: PathBuf,
}

impl AgentStore {
    pub fn new(state_dir: &Path) -> Self {
        AgentStore {
            path: state_dir.join("agent.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Load the state. A missing file is a fresh agent. A corrupt one is kept aside (for a
    /// person to read) and the agent starts over from `Idle`: nothing in it protects the
    /// device (the floor and the slots are in `state.json`), and an agent that refuses to
    /// start cannot be told anything.
    pub fn load(&self) -> Result<(AgentState, Option<String>)> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((AgentState::default(), None))
            }
            Err(e) => return Err(Error::io(format!("reading {}", self.path.display()), e)),
        };
        match serde_json::from_slice::<AgentState>(&bytes) {
            Ok(s) if s.version == AGENT_STATE_VERSION => Ok((s, None)),
            other => {
                let why = match other {
                    Ok(s) => format!("unsupported version {}", s.version),
                    Err(e) => e.to_string(),
                };
                let aside = self.path.with_extension("json.corrupt");
                std::fs::rename(&self.path, &aside)
                    .map_err(|e| Error::io(format!("moving aside {}", self.path.display()), e))?;
                Ok((
                    AgentState::default(),
                    Some(format!(
                        "{} was unreadable ({why}); kept as {}; starting over",
                        self.path.display(),
                        aside.display()
                    )),
                ))
            }
        }
    }

    pub fn save(&self, st: &AgentState) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(st).expect("agent state serializes");
        bytes.push(b'\n');
        Ok(crate::fsutil::write_atomic(&self.path, &bytes, 0o644)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(phase: Phase) -> AgentState {
        AgentState {
            phase,
            ..Default::default()
        }
    }

    /// Every edge of the diagram is allowed, every other pair is refused, and a refused
    /// transition changes nothing.
    #[test]
    fn every_transition_is_allowed_exactly_from_its_predecessors() {
        let mut allowed = 0;
        for to in Phase::ALL {
            for from in Phase::ALL {
                let mut st = at(from);
                let r = st.transition(to, 7, "test");
                if to.allowed_from().contains(&from) {
                    allowed += 1;
                    assert_eq!(r, Ok(()), "{from:?} -> {to:?}");
                    assert_eq!(st.phase, to);
                    assert_eq!(st.since, 7);
                    assert_eq!(st.history.last().unwrap().from, from);
                } else {
                    assert_eq!(r, Err(Forbidden { from, to }));
                    assert_eq!(st, at(from), "a refused transition changed the state");
                }
            }
        }
        assert_eq!(allowed, 24, "the diagram in docs/agent.dot has 24 edges");
    }

    #[test]
    fn docs_agent_dot_shows_exactly_the_allowed_transitions() {
        let dot = include_str!("../../docs/agent.dot");
        let name = |p: Phase| p.as_str().replace('-', "_");
        let mut in_doc: Vec<(String, String)> = dot
            .lines()
            .filter_map(|l| {
                let (a, rest) = l.trim().split_once(" -> ")?;
                let b = rest.split([' ', ';', '[']).next()?;
                Some((a.to_string(), b.to_string()))
            })
            .collect();
        let mut in_code: Vec<(String, String)> = Phase::ALL
            .iter()
            .flat_map(|to| {
                to.allowed_from()
                    .iter()
                    .map(|from| (name(*from), name(*to)))
            })
            .collect();
        in_doc.sort();
        in_code.sort();
        assert_eq!(in_doc, in_code);
    }

    #[test]
    fn the_happy_path_is_a_chain_of_allowed_transitions() {
        let mut st = AgentState::default();
        for to in [
            Phase::Staging,
            Phase::Staged,
            Phase::Applying,
            Phase::Importing,
            Phase::Draining,
            Phase::Rebooting,
            Phase::Verifying,
            Phase::Succeeded,
        ] {
            st.transition(to, 1, "").unwrap();
        }
        assert_eq!(st.history.len(), 8);
    }

    #[test]
    fn slots_cannot_be_written_without_a_complete_stage() {
        for from in [Phase::Idle, Phase::Staging, Phase::Failed, Phase::GaveUp] {
            assert!(at(from).transition(Phase::Applying, 1, "").is_err());
        }
    }

    #[test]
    fn history_and_notices_are_bounded() {
        let mut st = AgentState::default();
        for i in 0..100 {
            st.transition(Phase::Staging, i, "").unwrap();
            st.transition(Phase::Staged, i, "").unwrap();
            st.notice(i, format!("n{i}"));
        }
        assert_eq!(st.history.len(), HISTORY);
        assert_eq!(st.notices.len(), NOTICES);
        assert_eq!(st.notices.last().unwrap().message, "n99");
    }

    #[test]
    fn state_round_trips_and_a_corrupt_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::new(dir.path());
        let (mut st, note) = store.load().unwrap();
        assert!(note.is_none());
        st.transition(Phase::Staging, 5, "desired 2.0.0").unwrap();
        store.save(&st).unwrap();
        assert_eq!(store.load().unwrap().0, st);
        std::fs::write(store.path(), b"{\"version\":1,\"pha").unwrap();
        let (fresh, note) = store.load().unwrap();
        assert_eq!(fresh.phase, Phase::Idle);
        assert!(note.unwrap().contains("kept as"));
        assert!(dir.path().join("agent.json.corrupt").exists());
    }
}
