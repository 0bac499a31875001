//! Operator and service actions on slots: confirm (mark-good), mark-bad, mark-active, and the
//! `status` report. Each checks the state it starts from and fails loudly otherwise.

use serde::Serialize;

use crate::bootloader::{Bootloader, SlotBootState};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::{RollbackEvent, SlotStatus, State, StateStore};
use crate::verify::unix_now;

/// Confirm `slot` (the booted one): good in the bootloader, and the anti-rollback floor rises
/// to its bundle's security version. Only now, never at install time.
pub fn confirm(bl: &mut dyn Bootloader, state: &mut State, slot: &str) -> Result<()> {
    bl.mark_good(slot)?;
    let rec = state.slot_mut(slot);
    rec.confirmed_at = Some(unix_now());
    rec.failure = None;
    if let Some(sv) = rec.security_version {
        state.min_security_version = state.min_security_version.max(sv);
    }
    Ok(())
}

fn booted_or(cfg: &Config, slot: Option<&str>) -> Result<(Option<String>, String)> {
    let booted = crate::slot::booted_slot(&cfg.cmdline)?;
    let slot = match (slot, &booted) {
        (Some(s), _) => s.to_string(),
        (None, Some(b)) => b.clone(),
        (None, None) => {
            return Err(Error::Slot(
                "cannot tell the booted slot (edgeota.slot= is not on the kernel command line): name the slot".into(),
            ))
        }
    };
    cfg.slot(&slot)?;
    Ok((booted, slot))
}

/// `mark-good [SLOT]`: only the booted slot can be confirmed (its health is what was seen).
pub fn mark_good(cfg: &Config, bl: &mut dyn Bootloader, slot: Option<&str>) -> Result<String> {
    let (booted, slot) = booted_or(cfg, slot)?;
    if booted.as_deref() != Some(slot.as_str()) {
        return Err(Error::Slot(format!(
            "only the booted slot can be marked good; {slot:?} is not booted"
        )));
    }
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    confirm(bl, &mut state, &slot)?;
    store.save(&state)?;
    Ok(slot)
}

/// `mark-bad [SLOT]`: never boot it again until reinstalled.
pub fn mark_bad(cfg: &Config, bl: &mut dyn Bootloader, slot: Option<&str>) -> Result<String> {
    let (booted, slot) = booted_or(cfg, slot)?;
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    bl.mark_bad(&slot)?;
    state.slot_mut(&slot).failure = Some("marked bad by an operator".into());
    if booted.as_deref() == Some(slot.as_str()) {
        state.record_rollback(RollbackEvent {
            at: unix_now(),
            slot: slot.clone(),
            version: state.slot(&slot).version,
            running: bl.next_boot()?.unwrap_or_default(),
            reason: "marked bad by an operator".into(),
        });
    }
    store.save(&state)?;
    Ok(slot)
}

/// `mark-active SLOT`: boot `slot` next, with `tries` tries. Refused for a slot whose last
/// install did not finish: its content is not a complete, verified image.
pub fn mark_active(cfg: &Config, bl: &mut dyn Bootloader, slot: &str, tries: u32) -> Result<()> {
    cfg.slot(slot)?;
    let state = StateStore::new(&cfg.state_dir).load()?;
    if state.slot(slot).status == SlotStatus::Installing {
        return Err(Error::Slot(format!(
            "slot {slot:?} holds an unfinished install; apply a bundle to it first"
        )));
    }
    bl.set_primary(slot, tries)?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct SlotReport {
    pub name: String,
    pub boot: SlotBootState,
    pub booted: bool,
    #[serde(flatten)]
    pub record: crate::state::SlotRecord,
}

/// `status`; the CLI adds the JSON schema `version` field.
#[derive(Debug, Serialize)]
pub struct Status {
    pub compatible: String,
    pub booted: Option<String>,
    /// The slot the bootloader will pick next.
    pub next_boot: Option<String>,
    pub boot_order: Vec<String>,
    /// The booted slot is not the one first in the boot order and that one has no tries
    /// left: the bootloader fell back (or the health check sent it back).
    pub fallback: bool,
    /// A newly installed slot boots at the next reboot.
    pub pending_reboot: bool,
    pub min_security_version: u64,
    pub slots: Vec<SlotReport>,
    pub rollbacks: Vec<RollbackEvent>,
    pub last_health: Option<crate::state::HealthRecord>,
    pub bootloader: String,
}

pub fn status(cfg: &Config, bl: &dyn Bootloader) -> Result<Status> {
    let booted = crate::slot::booted_slot(&cfg.cmdline)?;
    let state = StateStore::new(&cfg.state_dir).load()?;
    let order = bl.order()?;
    let pending = match (&booted, order.first()) {
        (Some(b), Some(first)) if b != first => {
            matches!(bl.slot_state(first)?, SlotBootState::Trying { tries_left } if tries_left > 0)
        }
        _ => false,
    };
    let slots = cfg
        .slots
        .iter()
        .map(|s| {
            Ok(SlotReport {
                name: s.name.clone(),
                boot: bl.slot_state(&s.name)?,
                booted: booted.as_deref() == Some(s.name.as_str()),
                record: state.slot(&s.name),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Status {
        compatible: cfg.compatible.clone(),
        fallback: !pending
            && matches!((&booted, order.first()), (Some(b), Some(first)) if b != first),
        pending_reboot: pending,
        booted,
        next_boot: bl.next_boot()?,
        boot_order: order,
        min_security_version: state.min_security_version,
        slots,
        rollbacks: state.rollbacks,
        last_health: state.last_health,
        bootloader: bl.describe(),
    })
}

impl Status {
    /// Human-readable form (never parse this; use --json).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        s += &format!("compatible:   {}\n", self.compatible);
        s += &format!("booted:       {}\n", opt(&self.booted));
        s += &format!("next boot:    {}\n", opt(&self.next_boot));
        s += &format!("boot order:   {}\n", self.boot_order.join(" "));
        s += &format!("min security: {}\n", self.min_security_version);
        s += &format!("bootloader:   {}\n", self.bootloader);
        if self.fallback {
            s += "FALLBACK:     the last boot fell back from the first slot in the boot order\n";
        }
        if self.pending_reboot {
            s += "PENDING:      a new slot boots at the next reboot\n";
        }
        for r in &self.slots {
            let boot = match r.boot {
                SlotBootState::Good => "good".to_string(),
                SlotBootState::Bad => "bad".to_string(),
                SlotBootState::Trying { tries_left } => format!("trying ({tries_left} tries left)"),
            };
            s += &format!(
                "slot {}{}: {boot}, {}, version {}, security version {}\n",
                r.name,
                if r.booted { " (booted)" } else { "" },
                r.record.status.as_str(),
                opt(&r.record.version),
                r.record
                    .security_version
                    .map_or("-".into(), |v| v.to_string()),
            );
            if let Some(f) = &r.record.failure {
                s += &format!("  last failure: {f}\n");
            }
        }
        if let Some(ev) = self.rollbacks.last() {
            s += &format!(
                "ROLLBACK: slot {} (version {}) failed, running {}: {}\n",
                ev.slot,
                opt(&ev.version),
                ev.running,
                ev.reason
            );
        }
        s
    }
}
