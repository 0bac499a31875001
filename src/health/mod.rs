//! `edge-ota health`: run once per boot. Detects a bootloader fallback (but leaves a slot
//! that is only pending its first boot alone), runs the configured probes within a deadline
//! while petting the watchdog, and confirms the booted slot or marks it bad (the caller then
//! reboots into the other slot). A slot it cannot judge keeps running, unconfirmed.

pub mod probe;
pub mod watchdog;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bootloader::{Bootloader, SlotBootState};
use crate::control::{self, REPAIR_HINT};
use crate::error::{Error, Result};
use crate::state::{HealthRecord, RollbackEvent, SlotStatus, State, StateStore};
use crate::verify::unix_now;

pub use crate::config::HealthConfig;

/// The outcome of one health run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum Verdict {
    /// The slot was already confirmed; the boot was recorded.
    AlreadyGood { slot: String },
    /// All required probes passed: the slot is now confirmed.
    Confirmed { slot: String },
    /// A required probe failed until the deadline: the slot is marked bad.
    Failed { slot: String, reason: String },
    /// The slot cannot be judged (state or boot environment unreadable, or the slot is marked
    /// bad or half-installed and was booted anyway): nothing is marked good, nothing is
    /// marked bad, the slot keeps running, and `status` says how to repair.
    Unjudged { slot: String, reason: String },
}

/// Run the health check for the booted slot. Always reaches a verdict once the booted slot
/// is known: a broken state file or boot environment is `Unjudged`, not an error that would
/// leave the device waiting.
pub fn run(cfg: &crate::config::Config, bl: &mut dyn Bootloader) -> Result<Verdict> {
    let booted = crate::slot::booted_slot(&cfg.cmdline)?.ok_or_else(|| {
        Error::Slot(
            "cannot tell the booted slot: edgeota.slot= is not on the kernel command line".into(),
        )
    })?;
    cfg.slot(&booted)?;
    let store = StateStore::new(&cfg.state_dir);
    let mut state = match store.load() {
        Ok(s) => s,
        // Never overwrite a corrupt state file here: it holds the floor and the slot hashes
        // that `repair` uses.
        Err(e) => return Ok(unjudged(&booted, format!("{e}: {REPAIR_HINT}"))),
    };
    let verdict = judge(cfg, bl, &mut state, &booted)?;
    state.last_health = Some(HealthRecord {
        slot: booted.clone(),
        healthy: matches!(
            verdict,
            Verdict::AlreadyGood { .. } | Verdict::Confirmed { .. }
        ),
        at: unix_now()?,
        detail: match &verdict {
            Verdict::AlreadyGood { .. } => Some("already confirmed".into()),
            Verdict::Confirmed { .. } => None,
            Verdict::Failed { reason, .. } | Verdict::Unjudged { reason, .. } => {
                Some(reason.clone())
            }
        },
    });
    store.save(&state)?;
    Ok(verdict)
}

fn unjudged(slot: &str, reason: String) -> Verdict {
    Verdict::Unjudged {
        slot: slot.to_string(),
        reason,
    }
}

fn judge(
    cfg: &crate::config::Config,
    bl: &mut dyn Bootloader,
    state: &mut State,
    booted: &str,
) -> Result<Verdict> {
    // Redundant copies of the boot state: fix a stale or corrupt one now, while we hold the lock.
    match bl.repair() {
        Ok(fixed) => fixed
            .iter()
            .for_each(|f| eprintln!("edge-ota health: repaired: {f}")),
        Err(e) => return Ok(unjudged(booted, format!("{e}: {REPAIR_HINT}"))),
    }
    let booted_state = match bl.slot_state(booted) {
        Ok(s) => s,
        Err(e) => return Ok(unjudged(booted, format!("{e}: {REPAIR_HINT}"))),
    };
    if let Err(e) = control::Floor::restore(state, bl) {
        eprintln!("edge-ota health: warning: {e}");
    }
    detect_fallback(bl, state, booted)?;

    if state.slot(booted).status == SlotStatus::Installing {
        return Ok(unjudged(
            booted,
            format!("slot {booted} holds an unfinished install; not confirming it"),
        ));
    }
    match booted_state {
        SlotBootState::Good => Ok(Verdict::AlreadyGood {
            slot: booted.to_string(),
        }),
        SlotBootState::Bad => Ok(unjudged(
            booted,
            format!(
                "slot {booted} is marked bad and was booted anyway (the bootloader's last resort); not confirming it"
            ),
        )),
        SlotBootState::Trying { .. } => match check(&with_extra(cfg, state, booted)) {
            Ok(()) => {
                control::confirm(bl, state, booted)?;
                Ok(Verdict::Confirmed {
                    slot: booted.to_string(),
                })
            }
            Err(reason) => {
                bl.mark_bad(booted)?;
                let version = state.slot(booted).version;
                let running = bl.next_boot()?.unwrap_or_default();
                state.slot_mut(booted).failure = Some(format!("health check failed: {reason}"));
                state.record_rollback(RollbackEvent {
                    at: unix_now()?,
                    slot: booted.to_string(),
                    version,
                    running,
                    reason: format!("health check failed: {reason}"),
                });
                Ok(Verdict::Failed {
                    slot: booted.to_string(),
                    reason,
                })
            }
        },
    }
}

/// Health settings an update adds for the first boot of its slot, left by the agent in
/// `<state_dir>/health-extra.json`.
pub const EXTRA_FILE: &str = "health-extra.json";

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Extra {
    /// The slot and bundle they are for: anything else is ignored.
    pub slot: String,
    pub bundle_id: Option<String>,
    /// A longer deadline (never a shorter one).
    pub deadline_secs: Option<u64>,
    /// More probes, same fields as `[[health.probe]]`.
    pub probes: Vec<serde_json::Value>,
}

/// The configured health settings plus the extra ones meant for this slot's bundle. Extras
/// only add: the configured probes always run.
fn with_extra(cfg: &crate::config::Config, state: &State, booted: &str) -> HealthConfig {
    let mut hc = cfg.health.clone();
    let path = cfg.state_dir.join(EXTRA_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return hc;
    };
    let extra: Extra = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("edge-ota health: ignoring {}: {e}", path.display());
            return hc;
        }
    };
    if extra.slot != booted || extra.bundle_id != state.slot(booted).bundle_id {
        return hc;
    }
    if let Some(d) = extra.deadline_secs {
        hc.deadline_secs = hc.deadline_secs.max(d);
    }
    for v in extra.probes {
        match serde_json::from_value::<crate::config::ProbeConfig>(v) {
            Ok(p) => hc.probes.push(p),
            Err(e) => eprintln!("edge-ota health: ignoring an extra probe: {e}"),
        }
    }
    hc
}

/// The bootloader fell back when the slot first in its order is not the one that booted, is
/// not already bad, and has had a boot attempt (fewer tries left than it was given, or none
/// left). A slot that still has all its tries was never booted: it is pending (an apply with
/// `--no-reboot`, a `mark-active`), and running health before the reboot must not touch it.
fn detect_fallback(bl: &mut dyn Bootloader, state: &mut State, booted: &str) -> Result<()> {
    let order = bl.order()?;
    let Some(first) = order.first() else {
        return Ok(());
    };
    if first == booted
        || bl.slot_state(first)? == SlotBootState::Bad
        || control::is_pending(bl, state, first)?
    {
        return Ok(());
    }
    let reason = "boot attempts exhausted: the bootloader fell back".to_string();
    bl.mark_bad(first)?;
    let version = state.slot(first).version;
    state.slot_mut(first).failure = Some(reason.clone());
    state.record_rollback(RollbackEvent {
        at: unix_now()?,
        slot: first.clone(),
        version,
        running: booted.to_string(),
        reason,
    });
    Ok(())
}

/// Run the probes in rounds until every required one passes in the same round, or the
/// deadline passes. Returns the last failure (probe name and error) on failure.
pub fn check(hc: &HealthConfig) -> std::result::Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(hc.deadline_secs);
    let interval = Duration::from_millis(hc.interval_ms);
    let _petter = match &hc.watchdog {
        Some(p) => Some(
            watchdog::Petter::start(p, interval.min(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    loop {
        let mut failure = None;
        for p in &hc.probes {
            match p.run() {
                Ok(()) => {}
                Err(e) if p.required => {
                    failure = Some(format!("probe {}: {e}", p.name));
                    break;
                }
                Err(e) => eprintln!("edge-ota health: optional probe {} failed: {e}", p.name),
            }
        }
        let Some(f) = failure else { return Ok(()) };
        if Instant::now() + interval >= deadline {
            return Err(f);
        }
        eprintln!("edge-ota health: {f}; retrying");
        std::thread::sleep(interval);
    }
}
