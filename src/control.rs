//! Operator and service actions on slots: confirm (mark-good), mark-bad, mark-active, the
//! rule that always keeps one known-good slot, the anti-rollback floor's two copies, and the
//! `status` report. Each action checks the state it starts from and fails loudly otherwise.

use serde::Serialize;

use crate::bootloader::{Bootloader, SlotBootState};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::{RollbackEvent, SlotStatus, State, StateStore};
use crate::verify::unix_now;

/// The command that repairs what `status` and `health` report as broken.
pub const REPAIR_HINT: &str = "run `edge-ota repair`";

/// A slot the device can fall back to: confirmed in the bootloader, and not half-written.
pub fn known_good(bl: &dyn Bootloader, state: &State, slot: &str) -> Result<bool> {
    Ok(bl.slot_state(slot)? == SlotBootState::Good
        && state.slot(slot).status != SlotStatus::Installing)
}

/// Refuse to make `target` unbootable (overwrite it, mark it bad) when it is the only
/// known-good slot: a working device must always keep one slot it can boot. A target that
/// holds nothing good anyway is fine.
pub fn keep_a_known_good_slot(
    cfg: &Config,
    bl: &dyn Bootloader,
    state: &State,
    booted: Option<&str>,
    target: &str,
    action: &str,
) -> Result<()> {
    if !known_good(bl, state, target)? {
        return Ok(());
    }
    for s in cfg.slots.iter().filter(|s| s.name != target) {
        if known_good(bl, state, &s.name)? {
            return Ok(());
        }
    }
    Err(Error::OnlyGoodSlot(match booted {
        Some(b) if b != target => format!(
            "slot {b} is booted but not confirmed; slot {target} is the only known-good slot: \
             confirm {b} or let the health check decide first"
        ),
        _ => format!("slot {target} is the only known-good slot; refusing to {action}"),
    }))
}

/// The anti-rollback floor as both copies say: the state file's and the bootloader's.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// The effective floor: the larger copy.
    pub effective: u64,
    pub state: u64,
    /// `None`: missing; `Err`: unreadable (corrupt value, boot environment unreadable).
    #[serde(skip)]
    pub bootloader: std::result::Result<Option<u64>, String>,
    /// What does not agree, for `status` and logs.
    pub problems: Vec<String>,
}

impl Floor {
    pub fn read(state: &State, bl: &dyn Bootloader) -> Floor {
        let bootloader = bl.floor().map_err(|e| e.to_string());
        let mut problems = Vec::new();
        let effective = match &bootloader {
            Ok(Some(b)) => {
                if *b != state.min_security_version {
                    problems.push(format!(
                        "anti-rollback floor copies differ (state {}, bootloader {b}); the larger counts",
                        state.min_security_version
                    ));
                }
                state.min_security_version.max(*b)
            }
            Ok(None) => {
                problems.push("anti-rollback floor missing in the boot environment".into());
                state.min_security_version
            }
            Err(e) => {
                problems.push(format!(
                    "anti-rollback floor unreadable in the bootloader: {e}"
                ));
                state.min_security_version
            }
        };
        Floor {
            effective,
            state: state.min_security_version,
            bootloader,
            problems,
        }
    }

    /// Make both copies hold the effective floor. The caller saves `state`. Prints what it
    /// restored: a deleted or corrupt copy is something an operator must hear about.
    pub fn restore(state: &mut State, bl: &mut dyn Bootloader) -> Result<u64> {
        let f = Floor::read(state, bl);
        if f.problems.is_empty() {
            return Ok(f.effective);
        }
        for p in &f.problems {
            eprintln!(
                "edge-ota: warning: {p}; restoring both copies to {}",
                f.effective
            );
        }
        raise_floor(state, bl, f.effective)?;
        Ok(f.effective)
    }
}

/// Raise the floor to at least `to` in both places (never lowers it).
pub fn raise_floor(state: &mut State, bl: &mut dyn Bootloader, to: u64) -> Result<()> {
    let target = to.max(state.min_security_version);
    state.min_security_version = target;
    if bl.floor().ok().flatten() != Some(target) {
        bl.set_floor(target)?;
    }
    Ok(())
}

/// Confirm `slot` (the booted one): good in the bootloader, and the anti-rollback floor rises
/// to its bundle's security version in both copies. Only now, never at install time.
pub fn confirm(bl: &mut dyn Bootloader, state: &mut State, slot: &str) -> Result<()> {
    bl.mark_good(slot)?;
    let now = unix_now()?;
    let rec = state.slot_mut(slot);
    rec.confirmed_at = Some(now);
    rec.failure = None;
    rec.activated_tries = None;
    if let Some(sv) = rec.security_version {
        raise_floor(state, bl, sv)?;
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

/// `mark-good [SLOT]`: only the booted slot can be confirmed (its health is what was seen),
/// and never one whose install did not finish.
pub fn mark_good(cfg: &Config, bl: &mut dyn Bootloader, slot: Option<&str>) -> Result<String> {
    let (booted, slot) = booted_or(cfg, slot)?;
    if booted.as_deref() != Some(slot.as_str()) {
        return Err(Error::Slot(format!(
            "only the booted slot can be marked good; {slot:?} is not booted"
        )));
    }
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    if state.slot(&slot).status == SlotStatus::Installing {
        return Err(Error::Slot(format!(
            "slot {slot:?} holds an unfinished install; it cannot be confirmed"
        )));
    }
    Floor::restore(&mut state, bl)?;
    confirm(bl, &mut state, &slot)?;
    store.save(&state)?;
    Ok(slot)
}

/// `mark-bad [SLOT]`: never boot it again until reinstalled. Refused for the only known-good
/// slot.
pub fn mark_bad(cfg: &Config, bl: &mut dyn Bootloader, slot: Option<&str>) -> Result<String> {
    let (booted, slot) = booted_or(cfg, slot)?;
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    keep_a_known_good_slot(cfg, bl, &state, booted.as_deref(), &slot, "mark it bad")?;
    bl.mark_bad(&slot)?;
    state.slot_mut(&slot).failure = Some("marked bad by an operator".into());
    if booted.as_deref() == Some(slot.as_str()) {
        state.record_rollback(RollbackEvent {
            at: unix_now()?,
            slot: slot.clone(),
            version: state.slot(&slot).version,
            running: bl.next_boot()?.unwrap_or_default(),
            reason: "marked bad by an operator".into(),
        });
    }
    store.save(&state)?;
    Ok(slot)
}

/// `mark-active SLOT`: boot `slot` next, with `tries` tries. Only a slot that holds a complete
/// image (installed, or recorded at provisioning), whose bytes still hash to what was
/// recorded, and whose security version is not below the floor.
pub fn mark_active(cfg: &Config, bl: &mut dyn Bootloader, slot: &str, tries: u32) -> Result<()> {
    let slot_cfg = cfg.slot(slot)?;
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    let floor = Floor::restore(&mut state, bl)?;
    let rec = state.slot(slot);
    match rec.status {
        SlotStatus::Installing => {
            return Err(Error::Slot(format!(
                "slot {slot:?} holds an unfinished install; apply a bundle to it first"
            )))
        }
        SlotStatus::Unknown => {
            return Err(Error::Slot(format!(
                "slot {slot:?} holds no image edge-ota installed or provisioned; apply a bundle to it first"
            )))
        }
        SlotStatus::Installed => {}
    }
    let sv = rec.security_version.unwrap_or(0);
    if sv < floor {
        return Err(Error::Downgrade {
            bundle: sv,
            minimum: floor,
        });
    }
    if let Some(img) = &rec.image {
        let dev = crate::slot::resolve(cfg, slot_cfg)?;
        crate::install::prove_image(&dev, img)?;
    }
    bl.set_primary(slot, tries)?;
    state.slot_mut(slot).activated_tries = Some(tries);
    store.save(&state)?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct SlotReport {
    pub name: String,
    /// `None` when the boot environment could not be read.
    pub boot: Option<SlotBootState>,
    pub booted: bool,
    #[serde(flatten)]
    pub record: crate::state::SlotRecord,
}

/// `status`; the CLI adds the JSON schema `version` field. Produced even when the state file
/// or the boot environment is broken: what cannot be read is listed in `problems`, with the
/// command that repairs it.
#[derive(Debug, Serialize)]
pub struct Status {
    pub compatible: String,
    pub booted: Option<String>,
    /// The slot the bootloader will pick next.
    pub next_boot: Option<String>,
    pub boot_order: Vec<String>,
    /// The booted slot is not first in the boot order and that one was tried: the bootloader
    /// fell back (or the health check sent it back).
    pub fallback: bool,
    /// A newly installed slot boots at the next reboot.
    pub pending_reboot: bool,
    /// The effective anti-rollback floor (the larger of its two copies).
    pub min_security_version: u64,
    pub floor: Option<Floor>,
    pub slots: Vec<SlotReport>,
    pub rollbacks: Vec<RollbackEvent>,
    pub last_health: Option<crate::state::HealthRecord>,
    pub bootloader: String,
    /// Required health probes; 0 only with `allow_no_probes`, when a confirmation checks
    /// nothing.
    pub health_required_probes: usize,
    pub health_allow_no_probes: bool,
    /// Bundles staged by `fetch`, waiting to be applied.
    pub staged: Vec<crate::stage::Index>,
    /// What is wrong and how to repair it; empty on a healthy device.
    pub problems: Vec<String>,
}

/// Whether `first` (first in the boot order, not booted) is still waiting for its first boot:
/// trying with all the tries it was given (when known), or at least one left.
pub fn is_pending(bl: &dyn Bootloader, state: &State, first: &str) -> Result<bool> {
    Ok(match bl.slot_state(first)? {
        SlotBootState::Trying { tries_left } if tries_left > 0 => state
            .slot(first)
            .activated_tries
            .is_none_or(|given| tries_left >= given),
        _ => false,
    })
}

pub fn status(cfg: &Config, bl: &dyn Bootloader) -> Result<Status> {
    let booted = crate::slot::booted_slot(&cfg.cmdline)?;
    let mut problems = Vec::new();
    let store = StateStore::new(&cfg.state_dir);
    let state = match store.load() {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("{e}: {REPAIR_HINT}"));
            State::default()
        }
    };
    problems.extend(
        bl.check()
            .into_iter()
            .map(|p| format!("{p}: {REPAIR_HINT}")),
    );
    // The environment is usable only if the order and every slot's state read.
    let readable = bl.order().and_then(|o| {
        cfg.slots
            .iter()
            .try_for_each(|s| bl.slot_state(&s.name).map(drop))
            .map(|()| o)
    });
    let order = match readable {
        Ok(o) => o,
        Err(e) => {
            problems.push(format!("{e}: {REPAIR_HINT}"));
            Vec::new()
        }
    };
    let env_ok = !order.is_empty();
    let (pending, fallback) = match (&booted, order.first()) {
        (Some(b), Some(first)) if b != first && env_ok => {
            let pending = is_pending(bl, &state, first).unwrap_or(false);
            (pending, !pending)
        }
        _ => (false, false),
    };
    let floor = env_ok.then(|| Floor::read(&state, bl));
    if let Some(f) = &floor {
        problems.extend(f.problems.iter().cloned());
    }
    let slots = cfg
        .slots
        .iter()
        .map(|s| SlotReport {
            name: s.name.clone(),
            boot: if env_ok {
                bl.slot_state(&s.name).ok()
            } else {
                None
            },
            booted: booted.as_deref() == Some(s.name.as_str()),
            record: crate::state::SlotRecord {
                // The chunk table is for updates, not for people.
                chunks: None,
                ..state.slot(&s.name)
            },
        })
        .collect();
    Ok(Status {
        compatible: cfg.compatible.clone(),
        fallback,
        pending_reboot: pending,
        booted,
        next_boot: if env_ok {
            bl.next_boot().ok().flatten()
        } else {
            None
        },
        boot_order: order,
        min_security_version: floor
            .as_ref()
            .map_or(state.min_security_version, |f| f.effective),
        floor,
        slots,
        rollbacks: state.rollbacks,
        last_health: state.last_health,
        bootloader: bl.describe(),
        health_required_probes: cfg.health.required(),
        health_allow_no_probes: cfg.health.allow_no_probes,
        staged: crate::stage::list(&cfg.cache_dir()),
        problems,
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
        if self.health_required_probes == 0 {
            s += "health:       NO REQUIRED PROBES (allow_no_probes): a confirmation checks nothing\n";
        } else {
            s += &format!(
                "health:       {} required probe(s)\n",
                self.health_required_probes
            );
        }
        if self.fallback {
            s += "FALLBACK:     the last boot fell back from the first slot in the boot order\n";
        }
        if self.pending_reboot {
            s += "PENDING:      a new slot boots at the next reboot\n";
        }
        for r in &self.slots {
            let boot = match r.boot {
                Some(SlotBootState::Good) => "good".to_string(),
                Some(SlotBootState::Bad) => "bad".to_string(),
                Some(SlotBootState::Trying { tries_left }) => {
                    format!("trying ({tries_left} tries left)")
                }
                None => "unknown (boot environment unreadable)".to_string(),
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
        for st in &self.staged {
            s += &format!(
                "staged:       {} ({}), {} bytes of {} needed{}, from {}\n",
                st.version,
                &st.bundle_id[..16.min(st.bundle_id.len())],
                st.present_bytes(),
                st.needed,
                if st.complete {
                    ", complete"
                } else {
                    ", INCOMPLETE: run fetch again"
                },
                st.source
            );
        }
        for p in &self.problems {
            s += &format!("PROBLEM: {p}\n");
        }
        s
    }
}
