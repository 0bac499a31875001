//! `edge-ota repair`: put the boot environment and the state file back in order from what can
//! be proven, after corruption or a power cut: the booted slot (it runs, so it boots), the
//! slot images recorded in state (re-hashed), and the anti-rollback floor's two copies (the
//! larger wins). Every step is one atomic write, so a cut during repair leaves a state a
//! second repair finishes.

use serde::Serialize;

use crate::bootloader::{self, Bootloader};
use crate::config::Config;
use crate::control::Floor;
use crate::error::{Error, Result};
use crate::state::{SlotStatus, State, StateStore};

#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    /// What was wrong and what was done, in order.
    pub actions: Vec<String>,
}

/// Repair what can be repaired. The caller holds the operation lock.
pub fn repair(cfg: &Config) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let booted = crate::slot::booted_slot(&cfg.cmdline)?;
    let store = StateStore::new(&cfg.state_dir);

    let mut state = match store.load() {
        Ok(s) => s,
        Err(e @ Error::State { .. }) => {
            let aside = store
                .path()
                .with_extension(format!("json.corrupt-{}", crate::verify::unix_now()?));
            std::fs::rename(store.path(), &aside)
                .map_err(|io| Error::io(format!("moving {} aside", store.path().display()), io))?;
            crate::fsutil::sync_dir(&cfg.state_dir)?;
            report.actions.push(format!(
                "{e}; moved to {} and rebuilt from the boot environment",
                aside.display()
            ));
            State::default()
        }
        Err(e) => return Err(e),
    };

    let mut bl = bootloader::open(cfg)?;
    match bl.repair() {
        Ok(fixed) => report.actions.extend(
            fixed
                .into_iter()
                .map(|f| format!("{f}: rewritten from the current copy")),
        ),
        Err(e) => {
            rebuild_boot_env(cfg, booted.as_deref(), &state, &mut report, &e)?;
            bl = bootloader::open(cfg)?;
        }
    }
    // An environment that loads but lacks a slot or the order is as broken as a corrupt one.
    if let Err(e) = check_env(cfg, bl.as_ref()) {
        rebuild_boot_env(cfg, booted.as_deref(), &state, &mut report, &e)?;
        bl = bootloader::open(cfg)?;
    }

    let before = Floor::read(&state, bl.as_ref());
    if !before.problems.is_empty() {
        Floor::restore(&mut state, bl.as_mut())?;
        report.actions.push(format!(
            "anti-rollback floor: {}; both copies now {}",
            before.problems.join("; "),
            before.effective
        ));
    }
    store.save(&state)?;
    Ok(report)
}

fn check_env(cfg: &Config, bl: &dyn Bootloader) -> Result<()> {
    bl.order()?;
    for s in &cfg.slots {
        bl.slot_state(&s.name)?;
    }
    Ok(())
}

/// Write a fresh environment: the booted slot good (it runs), every other slot bad unless its
/// recorded image still hashes right and it had been confirmed (then good too, after the
/// booted one). Without a known booted slot nothing can be proven: refuse.
fn rebuild_boot_env(
    cfg: &Config,
    booted: Option<&str>,
    state: &State,
    report: &mut RepairReport,
    why: &dyn std::fmt::Display,
) -> Result<()> {
    let booted = booted.ok_or_else(|| {
        Error::Slot(format!(
            "the boot environment is broken ({why}) and the booted slot is unknown \
             (no edgeota.slot= on the kernel command line): provision it with init-boot-env"
        ))
    })?;
    bootloader::init(cfg, booted)?;
    let mut bl = bootloader::open(cfg)?;
    let mut also_good = Vec::new();
    for s in cfg.slots.iter().filter(|s| s.name != booted) {
        let rec = state.slot(&s.name);
        let proven = rec.status == SlotStatus::Installed
            && rec.confirmed_at.is_some()
            && rec.failure.is_none()
            && rec.image.as_ref().is_some_and(|img| {
                crate::slot::resolve(cfg, s)
                    .and_then(|dev| crate::install::prove_image(&dev, img))
                    .is_ok()
            });
        if proven {
            bl.mark_good(&s.name)?;
            also_good.push(s.name.clone());
        }
    }
    report.actions.push(format!(
        "boot environment: {why}; rebuilt with slot {booted} (booted) good{}",
        if also_good.is_empty() {
            ", the others bad".to_string()
        } else {
            format!(
                ", and {} (confirmed, image verified) good",
                also_good.join(", ")
            )
        }
    ));
    Ok(())
}
