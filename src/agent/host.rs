//! The real device behind the agent's [`Host`] trait: the same library calls the CLI makes
//! (`fetch`, `apply --offline`, `mark-bad`), each under the operation lock, so a person at the
//! console and the agent never change the device at the same time.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::desired::Desired;
use super::machine::Work;
use super::reconcile::{BootVerdict, Host, Running, StageDone};
use crate::bootloader::{self, SlotBootState};
use crate::config::{AgentConfig, Config};
use crate::error::{Error, IoContext, Result};
use crate::install::{self, BundleSource, Expected, Limits};
use crate::lock::OpLock;
use crate::progress::{Progress, Sink};
use crate::state::StateStore;

/// How long the agent waits for a command a person runs to release the lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

pub struct RealHost<'a> {
    pub cfg: &'a Config,
    pub agent: &'a AgentConfig,
    /// Where progress events go (the API's event stream, metrics).
    pub sink: Sink,
}

impl RealHost<'_> {
    fn lock(&self, what: &str) -> Result<OpLock> {
        OpLock::acquire(
            &self.cfg.state_dir,
            &format!("agent: {what}"),
            Some(LOCK_WAIT),
        )
    }

    fn progress(&self) -> Progress {
        Progress::sink(self.sink.clone())
    }

    fn note(&self, message: String) {
        self.progress().note(message);
    }

    fn booted(&self) -> Result<String> {
        crate::slot::booted_slot(&self.cfg.cmdline)?.ok_or_else(|| {
            Error::Slot(
                "cannot tell the booted slot: edgeota.slot= is not on the kernel command line"
                    .into(),
            )
        })
    }

    fn expected(d: &Desired) -> Expected {
        Expected {
            version: d.spec().version.clone(),
            bundle_id: d.spec().bundle_id.clone(),
        }
    }
}

/// Run `argv` with a time limit; the error names the command.
pub fn run_command(argv: &[String], limit: Duration) -> Result<()> {
    crate::process::run(argv, limit, false)
        .map(|_| ())
        .map_err(|why| Error::io(format!("`{}`", argv.join(" ")), std::io::Error::other(why)))
}

impl Host for RealHost<'_> {
    fn running(&self) -> Result<Running> {
        let slot = self.booted()?;
        let rec = StateStore::new(&self.cfg.state_dir).load()?.slot(&slot);
        Ok(Running {
            slot,
            version: rec.version,
            bundle_id: rec.bundle_id,
        })
    }

    fn boot_id(&self) -> Result<String> {
        let p = &self.agent.boot_id;
        Ok(std::fs::read_to_string(p)
            .ctx(|| format!("reading boot id {}", p.display()))?
            .trim()
            .to_string())
    }

    fn stage(
        &mut self,
        d: &Desired,
        budget: Option<u64>,
        cancel: Arc<AtomicBool>,
    ) -> Result<StageDone> {
        let _lock = self.lock("stage")?;
        let bl = bootloader::open(self.cfg)?;
        let limits = Limits {
            max_download: match (budget, self.cfg.max_download) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            cancel: Some(cancel),
            expect: Self::expected(d),
            ..Default::default()
        };
        let mut last = None;
        for source in expand_sources(self.cfg, &d.spec().sources, &self.progress()) {
            let opened = source
                .and_then(|name| BundleSource::open(&name, &self.cfg.network).map(|b| (name, b)));
            let (name, src) = match opened {
                Ok(x) => x,
                Err(e) => {
                    self.note(format!("source unusable: {e}"));
                    last = Some(e);
                    continue;
                }
            };
            match install::fetch(self.cfg, bl.as_ref(), src, &limits, &self.progress()) {
                Ok(r) => {
                    return Ok(StageDone {
                        source: name,
                        bundle_id: r.bundle_id,
                        version: r.bundle_version,
                        fetched: r.fetched,
                    })
                }
                Err(e @ Error::Interrupted(_)) => return Err(e),
                Err(e) => {
                    self.note(format!("staging from {name} failed: {e}"));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Usage("the desired state names no source".into())))
    }

    fn is_staged(&self, bundle_id: &str) -> bool {
        crate::stage::StagedBundle::open(&self.cfg.cache_dir(), bundle_id)
            .ok()
            .flatten()
            .is_some_and(|s| s.index().complete)
    }

    fn is_installed(&self, slot: &str, bundle_id: &str) -> bool {
        let Ok(state) = StateStore::new(&self.cfg.state_dir).load() else {
            return false;
        };
        let rec = state.slot(slot);
        let Ok(bl) = bootloader::open(self.cfg) else {
            return false;
        };
        rec.status == crate::state::SlotStatus::Installed
            && rec.bundle_id.as_deref() == Some(bundle_id)
            && bl.next_boot().ok().flatten().as_deref() == Some(slot)
            && !matches!(bl.slot_state(slot), Ok(SlotBootState::Bad))
    }

    fn target_slot(&self) -> Result<String> {
        let booted = self.booted()?;
        Ok(crate::slot::choose_target(self.cfg, Some(&booted), None)?
            .name
            .clone())
    }

    fn apply(&mut self, work: &Work) -> Result<String> {
        let _lock = self.lock("apply")?;
        let mut bl = bootloader::open(self.cfg)?;
        let source = work.source.clone().unwrap_or_default();
        let src = BundleSource::staged(self.cfg, &source)?;
        let limits = Limits {
            offline: true,
            expect: Expected {
                version: None,
                bundle_id: work.bundle_id.clone(),
            },
            ..Default::default()
        };
        let opts = install::ApplyOptions {
            slot: work.target_slot.clone(),
            tries: None,
        };
        let r = install::apply(self.cfg, bl.as_mut(), src, &opts, &limits, &self.progress())?;
        Ok(r.slot)
    }

    fn import_images(&mut self, slot: &str) -> Result<()> {
        let _lock = self.lock("import images")?;
        crate::containerd::import_slot(self.cfg, slot).map(|_| ())
    }

    fn add_health(&mut self, slot: &str, d: &Desired) -> Result<()> {
        let path = self.cfg.state_dir.join(crate::health::EXTRA_FILE);
        let Some(h) = &d.spec().health else {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", path.display()), e))
                }
                _ => Ok(()),
            };
        };
        let state = StateStore::new(&self.cfg.state_dir).load()?;
        let extra = crate::health::Extra {
            slot: slot.to_string(),
            bundle_id: state.slot(slot).bundle_id,
            deadline_secs: h.deadline_secs,
            probes: h.probes.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&extra).expect("serializable");
        Ok(crate::fsutil::write_atomic(&path, &bytes, 0o644)?)
    }

    fn abandon(&mut self, slot: &str, reason: &str) -> Result<()> {
        let _lock = self.lock("abandon")?;
        let mut bl = bootloader::open(self.cfg)?;
        let store = StateStore::new(&self.cfg.state_dir);
        let mut state = store.load()?;
        let booted = self.booted()?;
        crate::control::keep_a_known_good_slot(
            self.cfg,
            bl.as_ref(),
            &state,
            Some(&booted),
            slot,
            "mark it bad",
        )?;
        bl.mark_bad(slot)?;
        state.slot_mut(slot).failure = Some(reason.to_string());
        store.save(&state)
    }

    fn reboot(&mut self) -> Result<()> {
        let limit = Duration::from_secs(self.agent.reboot.timeout_secs.unwrap_or(120));
        for c in &self.agent.reboot.before {
            if let Err(e) = run_command(c, limit) {
                // A service that does not stop cleanly must not keep the device on the old
                // release: the reboot goes on.
                self.note(format!("before reboot: {e}"));
            }
        }
        nix::unistd::sync();
        match &self.agent.reboot.command {
            Some(c) => run_command(c, limit),
            None => nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
                .map(|_| ())
                .map_err(|e| Error::io("rebooting", e.into())),
        }
    }

    fn verdict(&self, target: &str) -> Result<BootVerdict> {
        let booted = self.booted()?;
        let state = StateStore::new(&self.cfg.state_dir).load()?;
        if booted == target {
            let bl = bootloader::open(self.cfg)?;
            return Ok(
                if crate::control::known_good(bl.as_ref(), &state, target)? {
                    BootVerdict::Confirmed
                } else {
                    BootVerdict::Pending
                },
            );
        }
        let why = state
            .rollbacks
            .iter()
            .rev()
            .find(|r| r.slot == target)
            .map(|r| r.reason.clone())
            .or_else(|| state.slot(target).failure.clone())
            .unwrap_or_else(|| format!("slot {booted} booted instead"));
        Ok(BootVerdict::RolledBack(why))
    }
}

/// The sources to try, in order: `auto` becomes the base stations found on the LAN.
fn expand_sources(cfg: &Config, sources: &[String], progress: &Progress) -> Vec<Result<String>> {
    let mut out = Vec::new();
    for s in sources {
        if s == "auto" {
            out.extend(auto_sources(cfg, progress));
        } else {
            out.push(Ok(s.clone()));
        }
    }
    out
}

/// `auto`: what `--source auto` would try (removable media, base stations on the LAN, the
/// configured upstream), in the configured order.
fn auto_sources(cfg: &Config, progress: &Progress) -> Vec<Result<String>> {
    use crate::install::auto;
    let dev = match bootloader::open(cfg)
        .map_err(Error::from)
        .and_then(|bl| auto::Device::read(cfg, bl.as_ref()))
    {
        Ok(d) => d,
        Err(e) => return vec![Err(e)],
    };
    let (cands, notes) = auto::candidates(cfg, &dev, &cfg.network, progress);
    if cands.is_empty() {
        return vec![Err(Error::Network {
            url: "auto".into(),
            reason: format!("no source offers an update ({})", notes.join("; ")),
        })];
    }
    cands.into_iter().map(|c| Ok(c.spec)).collect()
}

/// The boot id of this boot (for tests and the CLI).
pub fn read_boot_id(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}
