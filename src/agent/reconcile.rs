//! Reconcile: compare the desired state with what the device runs and take the next step.
//! Each step does the work of the current phase, then makes one transition, persisted before
//! the next step starts; a restart resumes at the persisted phase.
//!
//! The device is reached through the [`Host`] trait and time through [`Clock`], so the whole
//! policy (windows, backoff, give-up, crash and restart in every phase) runs in unit tests
//! against a fake host, and unchanged against the real one ([`super::host::RealHost`]).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::coordinate::{Coordinator, Ended, Gate, Local};
use super::desired::{ActivateWhen, Desired, StageWhen};
use super::machine::{AgentState, AgentStore, Outcome, OutcomeKind, Owed, Phase, Work};
use crate::config::AgentConfig;
use crate::error::{Error, Result};

/// Unix seconds, injected.
pub trait Clock: Send + Sync {
    fn now(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        crate::verify::unix_now().unwrap_or(0)
    }
}

/// What runs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub slot: String,
    pub version: Option<String>,
    pub bundle_id: Option<String>,
}

/// What a stage produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageDone {
    pub source: String,
    pub bundle_id: String,
    pub version: String,
    /// Compressed bytes fetched by this run.
    pub fetched: u64,
}

/// What the boot after the reboot says about the new slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootVerdict {
    /// The new slot runs and is confirmed.
    Confirmed,
    /// The new slot runs; its health gate has not decided yet.
    Pending,
    /// Another slot runs: the new one failed to boot or failed its health gate.
    RolledBack(String),
}

/// The device, as the agent needs it. Every method is safe to call again after a crash.
pub trait Host {
    fn running(&self) -> Result<Running>;
    /// An id that changes on every boot.
    fn boot_id(&self) -> Result<String>;
    /// Stage the bundle `d` asks for, from its sources in order; resumable; stops with
    /// [`Error::Interrupted`] when `cancel` is set.
    fn stage(
        &mut self,
        d: &Desired,
        budget: Option<u64>,
        cancel: Arc<AtomicBool>,
    ) -> Result<StageDone>;
    /// Whether the staged copy of `bundle_id` is still complete.
    fn is_staged(&self, bundle_id: &str) -> bool;
    /// Whether `slot` already holds `bundle_id`, installed and waiting for its first boot (an
    /// apply that finished before a crash).
    fn is_installed(&self, slot: &str, bundle_id: &str) -> bool;
    /// The slot an apply would write (the inactive one).
    fn target_slot(&self) -> Result<String>;
    /// Apply the staged bundle to the inactive slot; returns the slot written.
    fn apply(&mut self, work: &Work) -> Result<String>;
    /// Load the new slot's container images into the runtime (idempotent).
    fn import_images(&mut self, slot: &str) -> Result<()>;
    /// Health checks the desired state adds for the first boot of `slot`.
    fn add_health(&mut self, slot: &str, d: &Desired) -> Result<()>;
    /// Take back an applied slot that must not boot (its images could not be imported).
    fn abandon(&mut self, slot: &str, reason: &str) -> Result<()>;
    /// Stop services, sync, reboot. Returns only if the reboot did not happen (yet).
    fn reboot(&mut self) -> Result<()>;
    fn verdict(&self, target: &str) -> Result<BootVerdict>;
}

/// A wait time that is never in the past (a coordinator's clock may differ).
fn until_or(until: u64, now: u64) -> u64 {
    until.max(now + 1)
}

/// When to ask a coordinator again after anything but `Go` (`release` never aborts; if one
/// did, asking again soon is the safe answer).
fn retry_at(g: &Gate, now: u64) -> u64 {
    match g {
        Gate::Wait { until, .. } => until_or(*until, now),
        _ => now + 5,
    }
}

/// What the loop should do after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Step again at once.
    Continue,
    /// Nothing to do until this time (or until something arrives); `None`: until something
    /// arrives.
    WaitUntil(Option<u64>),
}

/// Errors that are the link's, not the update's: retried with backoff for ever (a ship may be
/// out of reach for weeks), not counted towards giving up.
fn is_link_error(e: &Error) -> bool {
    matches!(e, Error::Network { .. } | Error::Busy(_))
}

/// The agent's reconcile state: the persisted machine plus its configuration.
pub struct Reconciler<'a> {
    pub state: AgentState,
    store: AgentStore,
    agent: &'a AgentConfig,
    clock: &'a dyn Clock,
    /// Set to stop a running stage (pause, new desired state).
    pub cancel: Arc<AtomicBool>,
    /// Called after every persisted change (the API's snapshot, metrics).
    pub on_change: Box<dyn FnMut(&AgentState) + Send + 'a>,
    /// Notices for the console.
    pub on_notice: Box<dyn FnMut(&str) + Send + 'a>,
    /// Who gives leave to reboot ([`Local`] unless the agent runs in a cluster).
    pub coordinator: Box<dyn Coordinator + 'a>,
}

impl<'a> Reconciler<'a> {
    pub fn load(store: AgentStore, agent: &'a AgentConfig, clock: &'a dyn Clock) -> Result<Self> {
        let (mut state, note) = store.load()?;
        if let Some(n) = note {
            state.notice(clock.now(), n);
        }
        Ok(Reconciler {
            state,
            store,
            agent,
            clock,
            cancel: Arc::new(AtomicBool::new(false)),
            on_change: Box::new(|_| {}),
            on_notice: Box::new(|_| {}),
            coordinator: Box::new(Local),
        })
    }

    fn save(&mut self) -> Result<()> {
        self.store.save(&self.state)?;
        (self.on_change)(&self.state);
        Ok(())
    }

    /// The one way phases change: checked, then persisted.
    fn go(&mut self, to: Phase, reason: &str) -> Result<()> {
        self.state
            .transition(to, self.clock.now(), reason)
            .map_err(|f| Error::State {
                path: self.store.path().into(),
                reason: f.to_string(),
            })?;
        self.save()
    }

    pub fn notice(&mut self, message: String) -> Result<()> {
        (self.on_notice)(&message);
        self.state.notice(self.clock.now(), message);
        self.save()
    }

    /// A desired state arrived. The latest change wins; while the slots are being changed it
    /// waits for the end of that update.
    pub fn offer(&mut self, d: Desired) -> Result<()> {
        if self.state.seen.get(&d.origin) == Some(&d.generation) {
            return Ok(());
        }
        self.state
            .seen
            .insert(d.origin.clone(), d.generation.clone());
        let same = |o: &Option<Desired>| o.as_ref().is_some_and(|c| c.generation == d.generation);
        if same(&self.state.desired) || same(&self.state.queued) {
            return self.save();
        }
        if self.state.phase.is_committed() {
            self.state.queued = Some(d);
            return self.save();
        }
        self.adopt(d)
    }

    fn adopt(&mut self, d: Desired) -> Result<()> {
        let msg = format!("desired state {} from {}", d.target(), d.origin);
        self.state.desired = Some(d);
        self.state.work = None;
        self.state.failures = 0;
        self.state.retry_at = None;
        self.state.last_error = None;
        self.state.apply_now = false;
        self.state.stage_now = false;
        if self.state.phase == Phase::Staging {
            // Start over for the new desired state; persisted as the same phase.
            return self.save();
        }
        self.go(Phase::Staging, &msg)
    }

    /// Pause or resume: a paused agent starts nothing new.
    pub fn set_paused(&mut self, paused: bool) -> Result<()> {
        self.state.paused = paused;
        self.save()
    }

    /// `agent stage` / `agent apply`: ignore the windows for the current desired state.
    pub fn request(&mut self, apply: bool) -> Result<()> {
        if self.state.desired.is_none() {
            return Err(Error::Usage("the agent has no desired state".into()));
        }
        if apply {
            self.state.apply_now = true;
        }
        self.state.stage_now = true;
        if matches!(self.state.phase, Phase::Failed | Phase::GaveUp) {
            self.state.failures = 0;
            self.state.retry_at = None;
            self.go(Phase::Staging, "retry requested")?;
        }
        self.save()
    }

    fn fail(&mut self, e: &Error) -> Result<Next> {
        let now = self.clock.now();
        let link = is_link_error(e);
        if !link {
            self.state.failures += 1;
        }
        let n = self.state.failures.max(1);
        let backoff = self
            .agent
            .retry_secs
            .saturating_mul(1u64 << (n - 1).min(20))
            .min(self.agent.retry_max_secs);
        self.state.last_error = Some(e.to_string());
        self.state.retry_at = Some(now + backoff);
        if self.state.release_owed == Some(Owed::Pending) {
            // Leave was asked for: the node is handed back before the retry.
            self.state.release_owed = Some(if self.state.phase == Phase::Verifying {
                Owed::RolledBack
            } else {
                Owed::NotRebooted
            });
        }
        let target = self
            .state
            .desired
            .as_ref()
            .map_or_else(String::new, |d| d.target());
        let rolled_back = matches!(self.state.phase, Phase::Verifying | Phase::Rebooting);
        self.state.last_result = Some(Outcome {
            result: if rolled_back {
                OutcomeKind::RolledBack
            } else {
                OutcomeKind::Failed
            },
            target: target.clone(),
            reason: Some(e.to_string()),
            at: now,
        });
        self.go(Phase::Failed, &e.to_string())?;
        if self.state.failures >= self.agent.max_failures {
            self.state.retry_at = None;
            let why = format!(
                "gave up on {target} after {} failures; last: {e}",
                self.state.failures
            );
            self.state.last_result = Some(Outcome {
                result: OutcomeKind::GaveUp,
                target,
                reason: Some(why.clone()),
                at: now,
            });
            self.go(Phase::GaveUp, &why)?;
            self.notice(why)?;
            return Ok(self.release_first(Next::WaitUntil(None)));
        }
        Ok(self.release_first(Next::WaitUntil(self.state.retry_at)))
    }

    /// A node owed to the cluster is handed back at once, not after the retry backoff.
    fn release_first(&self, next: Next) -> Next {
        if self.state.release_owed.is_some() {
            Next::Continue
        } else {
            next
        }
    }

    /// The device already runs what `d` asks for.
    fn satisfied(d: &Desired, r: &Running) -> bool {
        let s = d.spec();
        let version_ok = s
            .version
            .as_ref()
            .is_none_or(|v| r.version.as_deref() == Some(v.to_string().as_str()));
        let id_ok = s
            .bundle_id
            .as_ref()
            .is_none_or(|id| r.bundle_id.as_deref() == Some(id.as_str()));
        version_ok && id_ok
    }

    /// One step of the machine.
    pub fn step(&mut self, host: &mut dyn Host) -> Result<Next> {
        let now = self.clock.now();
        if let Some(next) = self.settle_release(now)? {
            return Ok(next);
        }
        match self.state.phase {
            Phase::Idle | Phase::Succeeded | Phase::GaveUp => {
                if let Some(q) = self.state.queued.take() {
                    self.adopt(q)?;
                    return Ok(Next::Continue);
                }
                Ok(Next::WaitUntil(None))
            }
            Phase::Failed => match self.state.retry_at {
                Some(t) if t > now => Ok(Next::WaitUntil(Some(t))),
                _ if self.state.paused => Ok(Next::WaitUntil(None)),
                _ => {
                    let n = self.state.failures;
                    self.go(Phase::Staging, &format!("retry after {n} failure(s)"))?;
                    Ok(Next::Continue)
                }
            },
            Phase::Staging => self.stage(host, now),
            Phase::Staged => self.wait_for_window(host, now),
            Phase::Applying => self.apply(host),
            Phase::Importing => {
                let work = self.work();
                let slot = work.target_slot.clone().unwrap_or_default();
                if let Err(e) = host.import_images(&slot) {
                    // The slot must not boot without its images: the running one stays.
                    host.abandon(&slot, &format!("container images: {e}"))?;
                    return self.fail(&e);
                }
                let d = self
                    .state
                    .desired
                    .clone()
                    .expect("importing has a desired state");
                host.add_health(&slot, &d)?;
                self.go(Phase::Draining, "asking for leave to reboot")?;
                Ok(Next::Continue)
            }
            Phase::Draining => self.drain(host, now),
            Phase::Rebooting => {
                let work = self.work();
                if work.reboot_boot_id.as_deref() == Some(host.boot_id()?.as_str()) {
                    // Same boot: the reboot has not happened (or was just issued).
                    if let Err(e) = host.reboot() {
                        return self.fail(&e);
                    }
                    return Ok(Next::WaitUntil(Some(now + 30)));
                }
                self.go(Phase::Verifying, "booted again")?;
                Ok(Next::Continue)
            }
            Phase::Verifying => {
                let work = self.work();
                let target = work.target_slot.clone().unwrap_or_default();
                match host.verdict(&target)? {
                    BootVerdict::Pending => Ok(Next::WaitUntil(Some(now + 5))),
                    BootVerdict::Confirmed => {
                        // The node is handed back (checked Ready, uncordoned, its slot
                        // released) before the update counts as done.
                        if self.state.release_owed.is_some() {
                            let d = self.state.desired.clone().expect("verifying has desired");
                            match self.coordinator.release(&d, Ended::Confirmed, now) {
                                Gate::Go => self.state.release_owed = None,
                                g => return Ok(Next::WaitUntil(Some(retry_at(&g, now)))),
                            }
                        }
                        let d = self.state.desired.as_ref().map(|d| d.target());
                        self.state.failures = 0;
                        self.state.last_error = None;
                        self.state.last_result = Some(Outcome {
                            result: OutcomeKind::Succeeded,
                            target: d.clone().unwrap_or_default(),
                            reason: None,
                            at: now,
                        });
                        self.go(Phase::Succeeded, &format!("slot {target} confirmed"))?;
                        self.notice(format!(
                            "update to {} succeeded: slot {target} runs and is confirmed",
                            d.unwrap_or_default()
                        ))?;
                        Ok(Next::Continue)
                    }
                    BootVerdict::RolledBack(why) => {
                        if self.state.release_owed.is_some() {
                            self.state.release_owed = Some(Owed::RolledBack);
                        }
                        let e =
                            Error::HealthFailed(format!("rolled back from slot {target}: {why}"));
                        let r = self.fail(&e);
                        if let Some(o) = self.state.last_result.as_mut() {
                            if o.result == OutcomeKind::Failed {
                                o.result = OutcomeKind::RolledBack;
                            }
                        }
                        self.save()?;
                        r
                    }
                }
            }
        }
    }

    fn work(&self) -> Work {
        self.state.work.clone().unwrap_or_default()
    }

    /// A release owed after the update ended (failed, rolled back, aborted): the node is
    /// handed back before anything new starts. `Some` while the cluster cannot be told.
    fn settle_release(&mut self, now: u64) -> Result<Option<Next>> {
        let ended = match self.state.release_owed {
            None | Some(Owed::Pending) => return Ok(None),
            Some(Owed::RolledBack) => Ended::RolledBack,
            Some(Owed::NotRebooted) => Ended::NotRebooted,
        };
        let Some(d) = self.state.desired.clone() else {
            self.state.release_owed = None;
            self.save()?;
            return Ok(None);
        };
        match self.coordinator.release(&d, ended, now) {
            Gate::Go => {
                self.state.release_owed = None;
                self.save()?;
                Ok(None)
            }
            g => Ok(Some(Next::WaitUntil(Some(retry_at(&g, now))))),
        }
    }

    /// `Draining`: leave to reboot. The slot is written and next to boot; it is taken back
    /// when the coordinator refuses for good, so an unrelated reboot cannot boot an update
    /// whose node was never drained.
    fn drain(&mut self, host: &mut dyn Host, now: u64) -> Result<Next> {
        let work = self.work();
        let slot = work.target_slot.clone().unwrap_or_default();
        if host.running()?.slot == slot {
            // Rebooted anyway (power cut) while waiting: verify what booted.
            self.state.work.as_mut().expect("work").reboot_boot_id = Some("unplanned".into());
            self.go(
                Phase::Rebooting,
                "booted the new slot before leave was given",
            )?;
            return Ok(Next::Continue);
        }
        let d = self.state.desired.clone().expect("draining has desired");
        if self.state.release_owed.is_none() {
            // Persisted before asking: whatever happens next, the node is handed back.
            self.state.release_owed = Some(Owed::Pending);
            self.save()?;
        }
        match self.coordinator.acquire(&d, now) {
            Gate::Go => {
                self.state.work.as_mut().expect("work").reboot_boot_id = Some(host.boot_id()?);
                self.go(Phase::Rebooting, &format!("rebooting into slot {slot}"))?;
                Ok(Next::Continue)
            }
            Gate::Wait { until, why } => {
                if self.state.last_error.as_deref() != Some(why.as_str()) {
                    self.state.last_error = Some(why);
                    self.save()?;
                }
                Ok(Next::WaitUntil(Some(until_or(until, now))))
            }
            Gate::Abort(why) => {
                host.abandon(&slot, &why)?;
                self.state.release_owed = Some(Owed::NotRebooted);
                self.fail(&Error::RebootRefused(why))
            }
        }
    }

    fn stage(&mut self, host: &mut dyn Host, now: u64) -> Result<Next> {
        let Some(d) = self.state.desired.clone() else {
            self.go(Phase::Idle, "no desired state")?;
            return Ok(Next::WaitUntil(None));
        };
        let running = host.running()?;
        if Self::satisfied(&d, &running) {
            self.go(
                Phase::Idle,
                &format!("slot {} already runs {}", running.slot, d.target()),
            )?;
            return Ok(Next::WaitUntil(None));
        }
        if self.state.paused {
            return Ok(Next::WaitUntil(None));
        }
        if d.spec().stage.policy == StageWhen::InWindow && !self.state.stage_now {
            let w = d.windows(self.agent);
            if w.open_until(now).is_none() {
                return Ok(Next::WaitUntil(w.next_start(now)));
            }
        }
        self.cancel
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let budget = d.spec().data_budget.map(|b| b.0);
        match host.stage(&d, budget, self.cancel.clone()) {
            Ok(s) => {
                let w = self.state.work.get_or_insert_with(Work::default);
                w.generation = d.generation.clone();
                w.fetched += s.fetched;
                w.source = Some(s.source.clone());
                w.bundle_id = Some(s.bundle_id);
                w.version = Some(s.version.clone());
                w.from_slot = Some(running.slot);
                w.from_version = running.version;
                self.go(
                    Phase::Staged,
                    &format!("{} staged from {}", s.version, s.source),
                )?;
                Ok(Next::Continue)
            }
            // Paused or replaced: stay in Staging; the next step sees why.
            Err(Error::Interrupted(_)) => Ok(Next::Continue),
            Err(e) => self.fail(&e),
        }
    }

    fn wait_for_window(&mut self, host: &mut dyn Host, now: u64) -> Result<Next> {
        let work = self.work();
        let id = work.bundle_id.clone().unwrap_or_default();
        if !host.is_staged(&id) {
            self.go(Phase::Staging, "the staged copy is gone")?;
            return Ok(Next::Continue);
        }
        if self.state.paused {
            return Ok(Next::WaitUntil(None));
        }
        let d = self
            .state
            .desired
            .clone()
            .expect("staged has a desired state");
        let go = self.state.apply_now
            || match d.spec().activation.policy {
                ActivateWhen::Now => true,
                ActivateWhen::Manual => false,
                ActivateWhen::Window => d.windows(self.agent).open_until(now).is_some(),
            };
        if !go {
            let next = match d.spec().activation.policy {
                ActivateWhen::Window => d.windows(self.agent).next_start(now),
                _ => None,
            };
            return Ok(Next::WaitUntil(next));
        }
        self.go(Phase::Applying, &format!("applying {}", d.target()))?;
        Ok(Next::Continue)
    }

    fn apply(&mut self, host: &mut dyn Host) -> Result<Next> {
        if self.work().target_slot.is_none() {
            // Recorded before writing, so a restart can tell a finished apply from a new one.
            let t = match host.target_slot() {
                Ok(t) => t,
                Err(e) => return self.fail(&e),
            };
            self.state.work.as_mut().expect("work").target_slot = Some(t);
            self.save()?;
        }
        let work = self.work();
        let id = work.bundle_id.clone().unwrap_or_default();
        let done = work
            .target_slot
            .as_deref()
            .is_some_and(|s| host.is_installed(s, &id));
        if !done {
            let t = std::time::Instant::now();
            match host.apply(&work) {
                Ok(slot) => {
                    let w = self.state.work.as_mut().expect("work");
                    w.target_slot = Some(slot);
                    w.apply_secs = Some(t.elapsed().as_secs_f64());
                }
                Err(e) => return self.fail(&e),
            }
        }
        self.state.apply_now = false;
        let slot = self.work().target_slot.unwrap_or_default();
        self.go(
            Phase::Importing,
            &format!("slot {slot} written and verified"),
        )?;
        Ok(Next::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::desired::tests::agent as agent_cfg;
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct TestClock(AtomicU64);
    impl Clock for TestClock {
        fn now(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    /// 2026-11-21 12:00 UTC (a Saturday); the test windows open at 02:00 UTC.
    const NOON: u64 = 1_795_262_400;

    /// A device in memory: slot A runs 1.0.0; B is the other slot.
    #[derive(Default)]
    struct FakeHost {
        booted: String,
        versions: std::collections::BTreeMap<String, String>,
        staged: Option<String>,
        installed: Option<(String, String)>,
        boot_id: u32,
        confirmed: bool,
        fail_stage: RefCell<Vec<Error>>,
        fail_apply: Option<String>,
        fail_import: bool,
        roll_back: bool,
        calls: RefCell<Vec<String>>,
        rebooted: bool,
    }

    impl FakeHost {
        fn new() -> Self {
            let mut h = FakeHost {
                booted: "A".into(),
                ..Default::default()
            };
            h.versions.insert("A".into(), "1.0.0".into());
            h
        }
        fn call(&self, c: &str) {
            self.calls.borrow_mut().push(c.into());
        }
        /// What a reboot does: the other slot boots, its health gate decides.
        fn boot(&mut self) {
            self.boot_id += 1;
            self.rebooted = false;
            if let Some((slot, _)) = self.installed.clone() {
                if self.roll_back {
                    self.installed = None;
                } else {
                    self.booted = slot;
                    self.confirmed = true;
                }
            }
        }
        fn calls(&self, c: &str) -> usize {
            self.calls.borrow().iter().filter(|x| *x == c).count()
        }
    }

    impl Host for FakeHost {
        fn running(&self) -> Result<Running> {
            Ok(Running {
                slot: self.booted.clone(),
                version: self.versions.get(&self.booted).cloned(),
                bundle_id: None,
            })
        }
        fn boot_id(&self) -> Result<String> {
            Ok(self.boot_id.to_string())
        }
        fn stage(&mut self, d: &Desired, _: Option<u64>, _: Arc<AtomicBool>) -> Result<StageDone> {
            self.call("stage");
            if let Some(e) = self.fail_stage.borrow_mut().pop() {
                return Err(e);
            }
            self.staged = Some("id2".into());
            Ok(StageDone {
                source: d.spec().sources[0].clone(),
                bundle_id: "id2".into(),
                version: d.target(),
                fetched: 100,
            })
        }
        fn is_staged(&self, id: &str) -> bool {
            self.staged.as_deref() == Some(id)
        }
        fn is_installed(&self, slot: &str, id: &str) -> bool {
            self.installed == Some((slot.into(), id.into()))
        }
        fn target_slot(&self) -> Result<String> {
            Ok(if self.booted == "A" { "B" } else { "A" }.into())
        }
        fn apply(&mut self, w: &Work) -> Result<String> {
            self.call("apply");
            if let Some(e) = &self.fail_apply {
                return Err(Error::Tampered {
                    payload: "rootfs".into(),
                    what: e.clone(),
                });
            }
            self.installed = Some(("B".into(), w.bundle_id.clone().unwrap()));
            self.versions.insert("B".into(), w.version.clone().unwrap());
            Ok("B".into())
        }
        fn import_images(&mut self, _: &str) -> Result<()> {
            self.call("import");
            if self.fail_import {
                return Err(Error::HealthFailed("image hello: digest mismatch".into()));
            }
            Ok(())
        }
        fn add_health(&mut self, _: &str, _: &Desired) -> Result<()> {
            Ok(())
        }
        fn abandon(&mut self, _: &str, _: &str) -> Result<()> {
            self.call("abandon");
            self.installed = None;
            Ok(())
        }
        fn reboot(&mut self) -> Result<()> {
            self.call("reboot");
            self.rebooted = true;
            Ok(())
        }
        fn verdict(&self, target: &str) -> Result<BootVerdict> {
            if self.booted == target {
                Ok(if self.confirmed {
                    BootVerdict::Confirmed
                } else {
                    BootVerdict::Pending
                })
            } else {
                Ok(BootVerdict::RolledBack("health probe app failed".into()))
            }
        }
    }

    fn desired(policy: &str) -> Desired {
        let doc = format!(
            "apiVersion: edge-ota.io/v1alpha1\nkind: OSUpdate\nspec:\n  version: 2.0.0\n  sources: [http://x/b.eota]\n  activation: {{policy: {policy}}}\n"
        );
        super::super::desired::parse(doc.as_bytes(), "test", &agent_cfg()).unwrap()
    }

    struct Rig {
        dir: tempfile::TempDir,
        agent: AgentConfig,
        clock: TestClock,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                dir: tempfile::tempdir().unwrap(),
                agent: agent_cfg(),
                clock: TestClock(AtomicU64::new(NOON)),
            }
        }
        fn rec(&self) -> Reconciler<'_> {
            Reconciler::load(AgentStore::new(self.dir.path()), &self.agent, &self.clock).unwrap()
        }
        /// Step until the agent waits; a reboot it asks for happens (the fake boots).
        fn run(&self, r: &mut Reconciler, h: &mut FakeHost) -> Next {
            for _ in 0..50 {
                let n = r.step(h).unwrap();
                if h.rebooted {
                    h.boot();
                    continue;
                }
                if let Next::WaitUntil(_) = n {
                    return n;
                }
            }
            panic!("no progress: {:?}", r.state.phase);
        }
        fn set(&self, t: u64) {
            self.clock.0.store(t, Ordering::Relaxed);
        }
    }

    #[test]
    fn desired_now_goes_through_every_phase_to_succeeded() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let mut r = rig.rec();
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
        let phases: Vec<Phase> = r.state.history.iter().map(|t| t.to).collect();
        assert_eq!(
            phases,
            [
                Phase::Staging,
                Phase::Staged,
                Phase::Applying,
                Phase::Importing,
                Phase::Draining,
                Phase::Rebooting,
                Phase::Verifying,
                Phase::Succeeded
            ]
        );
        assert_eq!(
            r.state.last_result.as_ref().unwrap().result,
            OutcomeKind::Succeeded
        );
        assert_eq!(h.calls("reboot"), 1);
        assert_eq!(h.booted, "B");
    }

    #[test]
    fn unchanged_document_from_one_provider_never_replaces_a_newer_one_from_another() {
        let rig = Rig::new();
        let mut r = rig.rec();
        let from = |origin: &str, version: &str| {
            let doc = format!(
                "apiVersion: edge-ota.io/v1alpha1\nkind: OSUpdate\nspec:\n  version: {version}\n  sources: [http://x/b.eota]\n  activation: {{policy: Manual}}\n"
            );
            super::super::desired::parse(doc.as_bytes(), origin, &agent_cfg()).unwrap()
        };
        r.offer(from("file", "2.0.0")).unwrap();
        r.offer(from("url", "3.0.0")).unwrap();
        // The file provider reads its unchanged file again (a poll, a restart): not news.
        r.offer(from("file", "2.0.0")).unwrap();
        assert_eq!(r.state.desired.as_ref().unwrap().target(), "3.0.0");
        // Changed, it is news again, and the latest change wins.
        r.offer(from("file", "2.1.0")).unwrap();
        assert_eq!(r.state.desired.as_ref().unwrap().target(), "2.1.0");
        // What was seen survives a restart.
        let r = rig.rec();
        assert_eq!(r.state.seen.get("url").map(String::len), Some(16));
    }

    #[test]
    fn desired_outside_the_window_stages_but_applies_only_when_it_opens() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let mut r = rig.rec();
        r.offer(desired("Window")).unwrap();
        let next = rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Staged);
        assert_eq!(h.calls("stage"), 1);
        assert_eq!(h.calls("apply"), 0);
        // Next start: 02:00 UTC the next day.
        let opens = NOON + 14 * 3600;
        assert_eq!(next, Next::WaitUntil(Some(opens)));
        rig.set(opens - 1);
        rig.run(&mut r, &mut h);
        assert_eq!(h.calls("apply"), 0, "applied before the window");
        rig.set(opens);
        rig.run(&mut r, &mut h);
        assert_eq!(h.calls("apply"), 1);
        assert_eq!(r.state.phase, Phase::Succeeded);
    }

    #[test]
    fn manual_activation_waits_for_an_apply_request() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let mut r = rig.rec();
        r.offer(desired("Manual")).unwrap();
        assert_eq!(rig.run(&mut r, &mut h), Next::WaitUntil(None));
        assert_eq!(r.state.phase, Phase::Staged);
        r.request(true).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
    }

    #[test]
    fn paused_agent_starts_nothing_until_resumed() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let mut r = rig.rec();
        r.set_paused(true).unwrap();
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(h.calls("stage"), 0);
        r.set_paused(false).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
    }

    #[test]
    fn desired_already_running_goes_idle_without_staging() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        h.versions.insert("A".into(), "2.0.0".into());
        let mut r = rig.rec();
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Idle);
        assert_eq!(h.calls("stage"), 0);
    }

    #[test]
    fn failing_desired_state_backs_off_then_gives_up_with_the_reason() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        h.fail_apply = Some("chunk 3 hash mismatch".into());
        let mut r = rig.rec();
        r.offer(desired("Now")).unwrap();
        let mut waits = Vec::new();
        for _ in 0..rig.agent.max_failures {
            match rig.run(&mut r, &mut h) {
                Next::WaitUntil(Some(t)) => {
                    waits.push(t - rig.clock.now());
                    rig.set(t);
                }
                Next::WaitUntil(None) => break,
                n => panic!("{n:?}"),
            }
        }
        assert_eq!(r.state.phase, Phase::GaveUp);
        assert_eq!(waits, [60, 120, 240, 480], "doubling backoff");
        let o = r.state.last_result.clone().unwrap();
        assert_eq!(o.result, OutcomeKind::GaveUp);
        assert!(o.reason.unwrap().contains("chunk 3 hash mismatch"));
        // Nothing is retried any more ...
        rig.set(rig.clock.now() + 86_400);
        rig.run(&mut r, &mut h);
        assert_eq!(h.calls("apply"), 5);
        // ... until the desired state changes.
        h.fail_apply = None;
        let mut d = desired("Now");
        d.generation = "other".into();
        r.offer(d).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
    }

    #[test]
    fn link_down_is_retried_without_counting_towards_giving_up() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        for _ in 0..20 {
            h.fail_stage.borrow_mut().push(Error::Network {
                url: "http://x/b.eota".into(),
                reason: "connection refused".into(),
            });
        }
        let mut r = rig.rec();
        r.offer(desired("Now")).unwrap();
        while let Next::WaitUntil(Some(t)) = rig.run(&mut r, &mut h) {
            rig.set(t);
        }
        assert_eq!(r.state.phase, Phase::Succeeded);
        assert_eq!(h.calls("stage"), 21);
    }

    #[test]
    fn failed_image_import_abandons_the_slot_and_never_reboots() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        h.fail_import = true;
        let mut r = rig.rec();
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Failed);
        assert_eq!(h.calls("abandon"), 1);
        assert_eq!(h.calls("reboot"), 0);
        assert_eq!(h.booted, "A");
    }

    #[test]
    fn rollback_after_reboot_is_reported_as_rolled_back() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        h.roll_back = true;
        let mut r = rig.rec();
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Failed);
        let o = r.state.last_result.clone().unwrap();
        assert_eq!(o.result, OutcomeKind::RolledBack);
        assert!(o.reason.unwrap().contains("health probe app failed"));
    }

    #[test]
    fn desired_state_arriving_mid_apply_waits_for_the_end() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let mut r = rig.rec();
        r.offer(desired("Now")).unwrap();
        while r.state.phase != Phase::Applying {
            r.step(&mut h).unwrap();
        }
        let mut d3 = desired("Now");
        d3.generation = "three".into();
        r.offer(d3).unwrap();
        assert_eq!(r.state.phase, Phase::Applying);
        assert!(r.state.queued.is_some());
        rig.run(&mut r, &mut h);
        // The first update finished, then the queued one was adopted (and is already met,
        // since its version is the same): idle.
        assert!(r.state.queued.is_none());
        assert_eq!(h.booted, "B");
        assert_eq!(r.state.desired.as_ref().unwrap().generation, "three");
    }

    /// A crash (the process killed) in every phase, after the transition into it was
    /// persisted and before its work finished: a new agent loads the state and finishes the
    /// update, applying and rebooting once.
    #[test]
    fn crash_in_every_phase_then_restart_continues_to_succeeded() {
        for crash_in in [
            Phase::Staging,
            Phase::Staged,
            Phase::Applying,
            Phase::Importing,
            Phase::Draining,
            Phase::Rebooting,
            Phase::Verifying,
        ] {
            let rig = Rig::new();
            let mut h = FakeHost::new();
            {
                let mut r = rig.rec();
                r.offer(desired("Now")).unwrap();
                while r.state.phase != crash_in {
                    r.step(&mut h).unwrap();
                    if h.rebooted {
                        h.boot();
                    }
                }
                // Killed here: the state on disk says `crash_in`.
            }
            let mut r = rig.rec();
            assert_eq!(r.state.phase, crash_in);
            rig.run(&mut r, &mut h);
            assert_eq!(r.state.phase, Phase::Succeeded, "crash in {crash_in:?}");
            assert_eq!(h.booted, "B", "crash in {crash_in:?}");
            assert!(
                h.calls("apply") <= 1,
                "crash in {crash_in:?}: applied twice"
            );
            assert_eq!(h.calls("reboot"), 1, "crash in {crash_in:?}");
        }
    }

    /// Killed after the apply finished but before `Importing` was persisted: the restart sees
    /// the slot installed and does not write it again.
    #[test]
    fn crash_after_apply_before_its_transition_does_not_apply_twice() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        {
            let mut r = rig.rec();
            r.offer(desired("Now")).unwrap();
            while r.state.phase != Phase::Applying {
                r.step(&mut h).unwrap();
            }
            // The apply runs to its end; the process dies before persisting `Importing`.
            r.step(&mut h).unwrap();
            assert_eq!(r.state.phase, Phase::Importing);
            r.state.phase = Phase::Applying;
            r.save().unwrap();
        }
        let mut r = rig.rec();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
        assert_eq!(h.calls("apply"), 1);
    }

    /// A coordinator in memory: answers what the test scripts, records what it was asked.
    #[derive(Default)]
    struct Script {
        acquire: Vec<Gate>,
        release: Vec<Gate>,
        acquired: usize,
        released: Vec<Ended>,
    }

    #[derive(Clone, Default)]
    struct FakeCoordinator(std::sync::Arc<std::sync::Mutex<Script>>);

    impl Coordinator for FakeCoordinator {
        fn acquire(&mut self, _: &Desired, _: u64) -> Gate {
            let mut s = self.0.lock().unwrap();
            s.acquired += 1;
            if s.acquire.is_empty() {
                Gate::Go
            } else {
                s.acquire.remove(0)
            }
        }
        fn release(&mut self, _: &Desired, ended: Ended, _: u64) -> Gate {
            let mut s = self.0.lock().unwrap();
            let g = if s.release.is_empty() {
                Gate::Go
            } else {
                s.release.remove(0)
            };
            if g == Gate::Go {
                s.released.push(ended);
            }
            g
        }
    }

    fn wait(until: u64) -> Gate {
        Gate::Wait {
            until,
            why: "waiting for a slot: 1 of 1 taken by node-b".into(),
        }
    }

    #[test]
    fn no_reboot_until_the_coordinator_gives_leave_then_the_node_is_released() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let c = FakeCoordinator::default();
        c.0.lock().unwrap().acquire = vec![wait(NOON + 30), wait(NOON + 60)];
        let mut r = rig.rec();
        r.coordinator = Box::new(c.clone());
        r.offer(desired("Now")).unwrap();
        assert_eq!(rig.run(&mut r, &mut h), Next::WaitUntil(Some(NOON + 30)));
        assert_eq!(r.state.phase, Phase::Draining);
        assert_eq!(h.calls("reboot"), 0);
        assert!(r.state.last_error.as_deref().unwrap().contains("node-b"));
        rig.set(NOON + 30);
        rig.run(&mut r, &mut h);
        assert_eq!(h.calls("reboot"), 0);
        rig.set(NOON + 60);
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
        assert_eq!(h.calls("reboot"), 1);
        let s = c.0.lock().unwrap();
        assert_eq!(s.acquired, 3);
        assert_eq!(s.released, [Ended::Confirmed]);
        assert_eq!(r.state.release_owed, None);
    }

    #[test]
    fn drain_abort_takes_the_slot_back_releases_the_node_and_never_reboots() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let c = FakeCoordinator::default();
        c.0.lock().unwrap().acquire = vec![Gate::Abort("drain timed out after 600s".into())];
        let mut r = rig.rec();
        r.coordinator = Box::new(c.clone());
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Failed);
        assert_eq!(h.calls("abandon"), 1);
        assert_eq!(h.calls("reboot"), 0);
        assert_eq!(h.booted, "A");
        assert!(r
            .state
            .last_error
            .as_deref()
            .unwrap()
            .contains("drain timed out"));
        assert_eq!(c.0.lock().unwrap().released, [Ended::NotRebooted]);
        assert_eq!(r.state.release_owed, None);
    }

    /// The API server is down when the update ends: the node stays owed to the cluster,
    /// across a restart, and is handed back when the link returns; nothing new starts first.
    #[test]
    fn release_owed_survives_a_restart_while_the_cluster_is_unreachable() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        h.roll_back = true;
        let c = FakeCoordinator::default();
        c.0.lock().unwrap().release = vec![wait(NOON + 10)];
        {
            let mut r = rig.rec();
            r.coordinator = Box::new(c.clone());
            r.offer(desired("Now")).unwrap();
            assert_eq!(rig.run(&mut r, &mut h), Next::WaitUntil(Some(NOON + 10)));
            assert_eq!(r.state.phase, Phase::Failed);
            assert_eq!(r.state.release_owed, Some(Owed::RolledBack));
        }
        let mut r = rig.rec();
        assert_eq!(r.state.release_owed, Some(Owed::RolledBack));
        r.coordinator = Box::new(c.clone());
        rig.set(NOON + 10);
        r.step(&mut h).unwrap();
        assert_eq!(c.0.lock().unwrap().released, [Ended::RolledBack]);
        assert_eq!(r.state.release_owed, None);
    }

    #[test]
    fn confirmed_update_is_not_succeeded_until_the_node_is_handed_back() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let c = FakeCoordinator::default();
        c.0.lock().unwrap().release = vec![wait(NOON + 5)];
        let mut r = rig.rec();
        r.coordinator = Box::new(c.clone());
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Verifying);
        rig.set(NOON + 5);
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
        assert_eq!(c.0.lock().unwrap().released, [Ended::Confirmed]);
    }

    /// Power cut while waiting for leave: the new slot booted anyway. It is verified like any
    /// boot, not drained again.
    #[test]
    fn unplanned_boot_of_the_new_slot_while_draining_is_verified() {
        let rig = Rig::new();
        let mut h = FakeHost::new();
        let c = FakeCoordinator::default();
        c.0.lock().unwrap().acquire = vec![wait(NOON + 30)];
        let mut r = rig.rec();
        r.coordinator = Box::new(c.clone());
        r.offer(desired("Now")).unwrap();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Draining);
        h.boot();
        rig.run(&mut r, &mut h);
        assert_eq!(r.state.phase, Phase::Succeeded);
        assert_eq!(h.calls("reboot"), 0);
        assert_eq!(c.0.lock().unwrap().released, [Ended::Confirmed]);
    }
}
