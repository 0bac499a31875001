//! Reboot coordination: whether this device may reboot into its new slot now. Alone, always
//! ([`Local`]); in a cluster, after taking one of the update's `maxUnavailable` slots and
//! draining the node ([`crate::kubernetes`]). The agent only knows this trait, so the state
//! machine stays free of any cluster code.

use super::desired::Desired;

/// The answer to "may I reboot?" and to "is the node handed back?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Yes / done.
    Go,
    /// Not yet: ask again at this time (unix seconds). `why` is shown in the status.
    Wait { until: u64, why: String },
    /// Never for this attempt (a drain that timed out with `onTimeout: abort`): the applied
    /// slot is abandoned and the attempt fails with this reason.
    Abort(String),
}

/// How an update ended, for [`Coordinator::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The new slot runs and is confirmed.
    Confirmed,
    /// It booted and rolled back.
    RolledBack,
    /// It never rebooted (drain aborted, images missing, ...).
    NotRebooted,
}

/// Decides when the device reboots. Every method is called again after a restart and must be
/// idempotent: the agent persists only that a release is owed, the coordinator finds what it
/// holds (its lease, its cordon) again.
pub trait Coordinator: Send {
    /// Before the reboot: take a slot, drain. Called on every step in `Draining`.
    fn acquire(&mut self, d: &Desired, now: u64) -> Gate;
    /// After the update ended: check the node, uncordon, give the slot back. `Wait` while
    /// the cluster cannot be reached; never `Abort`.
    fn release(&mut self, d: &Desired, ended: Ended, now: u64) -> Gate;
}

/// No cluster: reboot whenever the machine is ready to.
pub struct Local;

impl Coordinator for Local {
    fn acquire(&mut self, _: &Desired, _: u64) -> Gate {
        Gate::Go
    }
    fn release(&mut self, _: &Desired, _: Ended, _: u64) -> Gate {
        Gate::Go
    }
}
