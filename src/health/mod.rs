//! `edge-ota health`: run once per boot. Detects a bootloader fallback, runs the configured
//! probes within a deadline while petting the watchdog, and confirms the booted slot or marks
//! it bad (the caller then reboots into the other slot).

pub mod probe;
pub mod watchdog;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bootloader::{Bootloader, SlotBootState};
use crate::control;
use crate::error::{Error, Result};
use crate::state::{HealthRecord, RollbackEvent, StateStore};
use crate::verify::unix_now;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// All required probes must pass together before this deadline.
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    /// Pause between rounds of probes.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Watchdog device to pet until the verdict (e.g. /dev/watchdog).
    #[serde(default)]
    pub watchdog: Option<PathBuf>,
    #[serde(default, rename = "probe")]
    pub probes: Vec<probe::ProbeConfig>,
}

fn default_deadline() -> u64 {
    300
}
fn default_interval() -> u64 {
    2000
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            deadline_secs: default_deadline(),
            interval_ms: default_interval(),
            watchdog: None,
            probes: Vec::new(),
        }
    }
}

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
}

/// Run the health check for the booted slot.
pub fn run(cfg: &crate::config::Config, bl: &mut dyn Bootloader) -> Result<Verdict> {
    let booted = crate::slot::booted_slot(&cfg.cmdline)?.ok_or_else(|| {
        Error::Slot(
            "cannot tell the booted slot: edgeota.slot= is not on the kernel command line".into(),
        )
    })?;
    cfg.slot(&booted)?;
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;

    detect_fallback(bl, &mut state, &booted)?;
    store.save(&state)?;

    if bl.slot_state(&booted)? == SlotBootState::Good {
        state.last_health = Some(HealthRecord {
            slot: booted.clone(),
            healthy: true,
            at: unix_now(),
            detail: Some("already confirmed".into()),
        });
        store.save(&state)?;
        return Ok(Verdict::AlreadyGood { slot: booted });
    }

    let outcome = check(&cfg.health);
    match outcome {
        Ok(()) => {
            control::confirm(bl, &mut state, &booted)?;
            state.last_health = Some(HealthRecord {
                slot: booted.clone(),
                healthy: true,
                at: unix_now(),
                detail: None,
            });
            store.save(&state)?;
            Ok(Verdict::Confirmed { slot: booted })
        }
        Err(reason) => {
            bl.mark_bad(&booted)?;
            let version = state.slot(&booted).version;
            let running = bl.next_boot()?.unwrap_or_default();
            state.slot_mut(&booted).failure = Some(format!("health check failed: {reason}"));
            state.record_rollback(RollbackEvent {
                at: unix_now(),
                slot: booted.clone(),
                version,
                running,
                reason: format!("health check failed: {reason}"),
            });
            state.last_health = Some(HealthRecord {
                slot: booted.clone(),
                healthy: false,
                at: unix_now(),
                detail: Some(reason.clone()),
            });
            store.save(&state)?;
            Ok(Verdict::Failed {
                slot: booted,
                reason,
            })
        }
    }
}

/// The bootloader fell back when the slot first in its order is not the one that booted and
/// was not already marked bad: its tries ran out (panic, hang, reset). Record it once and mark
/// that slot bad so it is not tried again.
fn detect_fallback(
    bl: &mut dyn Bootloader,
    state: &mut crate::state::State,
    booted: &str,
) -> Result<()> {
    let order = bl.order()?;
    let Some(first) = order.first() else {
        return Ok(());
    };
    if first == booted || bl.slot_state(first)? == SlotBootState::Bad {
        return Ok(());
    }
    let reason = "boot attempts exhausted: the bootloader fell back".to_string();
    bl.mark_bad(first)?;
    let version = state.slot(first).version;
    state.slot_mut(first).failure = Some(reason.clone());
    state.record_rollback(RollbackEvent {
        at: unix_now(),
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
