//! `apply`: verify a bundle, plan where every payload goes, then stream it into the inactive
//! slot, read it back, record it, and hand the slot to the bootloader. The running slot is
//! never opened for writing, and the only known-good slot is never overwritten.
//!
//! Order of durable effects (each survives a power cut in a state a retry reads correctly):
//! 1. target marked bad in the bootloader and `installing` in state, before any write;
//! 2. payloads written, fsynced, read back and compared with the signed hashes; file payloads
//!    swapped in as one directory;
//! 3. state records the installed bundle and the image it wrote;
//! 4. the bootloader makes the target primary with N tries.
//!
//! `verify` runs the same checks and the same plan ([`prepare`]) and decodes every chunk, but
//! writes nothing.

pub mod blockdev;
pub mod files;
pub mod pipeline;

use std::path::PathBuf;
use std::sync::Arc;

use crate::bootloader::Bootloader;
use crate::bundle::head::{BundleHead, Verified};
use crate::bundle::{Manifest, Payload, PayloadKind};
use crate::config::{Config, SlotConfig};
use crate::control::{self, Floor};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::slot::{self, SlotDevice};
use crate::source::Source;
use crate::state::{ImageRecord, SlotStatus, State, StateStore};
use crate::verify::{unix_now, Policy, TrustedTime};

/// Options of one apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Install into this slot instead of the inactive one (never the booted one).
    pub slot: Option<String>,
    /// Override the configured boot tries (1..=9, checked by the CLI).
    pub tries: Option<u32>,
}

/// What an apply did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub slot: String,
    pub bundle_version: String,
    pub security_version: u64,
    pub bundle_id: String,
    pub bytes_written: u64,
    pub tries: u32,
}

/// Verify the head of a bundle and the device policy; nothing is written.
pub fn verify_head(
    cfg: &Config,
    src: &mut Source,
    state: &State,
    floor: u64,
) -> Result<(BundleHead, Verified)> {
    let head = BundleHead::read(&mut src.reader)?;
    let verified = head.verify(&cfg.trusted_keys()?)?;
    Policy {
        compatible: cfg.compatible.clone(),
        time: TrustedTime::new(unix_now()?, state.newest_seen),
        min_security_version: floor,
    }
    .check(&verified.manifest)?;
    if let Some(len) = src.len {
        let want = head.header.total_len();
        if len < want {
            return Err(Error::Truncated(format!(
                "{} is {len} bytes, the header says {want}",
                src.name
            )));
        }
        if len > want {
            return Err(Error::Format(format!(
                "trailing data: {} is {len} bytes, the bundle ends at {want}",
                src.name
            )));
        }
    }
    Ok((head, verified))
}

/// Where one payload goes in the target slot.
#[derive(Debug, Clone)]
pub enum Destination {
    Device(SlotDevice),
    /// A path relative to the slot's `files_dir`.
    File(PathBuf),
}

/// Everything decided before the first write.
#[derive(Debug)]
pub struct Plan {
    pub target: SlotConfig,
    pub device: SlotDevice,
    pub destinations: Vec<Destination>,
    pub tries: u32,
}

impl Plan {
    fn files_dir(&self) -> Option<&std::path::Path> {
        self.target.files_dir.as_deref()
    }
}

fn destination(slot_cfg: &SlotConfig, dev: &SlotDevice, p: &Payload) -> Result<Destination> {
    let subdir = match p.kind {
        PayloadKind::Image if p.target == "rootfs" => return Ok(Destination::Device(dev.clone())),
        PayloadKind::Image => {
            return Err(Error::Slot(format!(
                "payload {:?} targets slot component {:?}; this device has only \"rootfs\"",
                p.name, p.target
            )))
        }
        PayloadKind::Kernel => "boot",
        PayloadKind::ContainerImages => "images",
        PayloadKind::File => "files",
    };
    if slot_cfg.files_dir.is_none() {
        return Err(Error::Slot(format!(
            "payload {:?} is a {} payload but slot {:?} has no files_dir",
            p.name,
            p.kind.as_str(),
            slot_cfg.name
        )));
    }
    Ok(Destination::File(PathBuf::from(subdir).join(&p.target)))
}

/// File payloads must fit the free space where they go (beside the current files, which stay
/// until the swap), checked before anything is written: running out of space halfway is the
/// failure users of other updaters hit most.
fn check_file_space(m: &Manifest, files_dir: Option<&std::path::Path>) -> Result<()> {
    let Some(dir) = files_dir else { return Ok(()) };
    let files: Vec<&Payload> = m
        .payloads
        .iter()
        .filter(|p| p.kind != PayloadKind::Image)
        .collect();
    let Some(last) = files.last() else {
        return Ok(());
    };
    let bytes: u64 = files.iter().map(|p| p.size).sum();
    // The directory may not exist yet: measure the nearest one that does.
    let mut at = dir.to_path_buf();
    while !at.exists() {
        if !at.pop() {
            break;
        }
    }
    let st = nix::sys::statvfs::statvfs(&at)
        .map_err(|e| Error::io(format!("checking free space in {}", at.display()), e.into()))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if bytes > free {
        return Err(Error::TooLarge {
            payload: last.name.clone(),
            size: bytes,
            target: format!("the free space in {}", at.display()),
            capacity: free,
        });
    }
    Ok(())
}

/// Check that a slot's bytes still hash to the image recorded for it.
pub fn prove_image(dev: &SlotDevice, img: &ImageRecord) -> Result<()> {
    if img.size > dev.size {
        return Err(Error::Slot(format!(
            "slot {} is smaller than the image recorded for it",
            dev.name
        )));
    }
    let got = blockdev::hash_region(&dev.path, dev.offset, img.size)?;
    if got.as_bytes() != &img.blake3.0 {
        return Err(Error::Slot(format!(
            "slot {}'s image no longer matches the one recorded at its install ({})",
            dev.name,
            dev.path.display()
        )));
    }
    Ok(())
}

/// Every check `apply` makes before writing, and the plan it follows: target slot (never the
/// booted one, never the only known-good one), its device distinct from every other slot's
/// and not in use, payload destinations, sizes and free space, and a slot image that is
/// either written whole by this bundle or proven intact.
pub fn prepare(
    cfg: &Config,
    bl: &dyn Bootloader,
    state: &State,
    m: &Manifest,
    opts: &ApplyOptions,
) -> Result<Plan> {
    let booted = slot::booted_slot(&cfg.cmdline)?;
    let target_cfg = slot::choose_target(cfg, booted.as_deref(), opts.slot.as_deref())?;
    let devices = slot::resolve_all_distinct(cfg)?;
    let dev = devices
        .into_iter()
        .find(|d| d.name == target_cfg.name)
        .expect("every configured slot resolves");
    slot::ensure_not_busy(&dev.path, &cfg.mountinfo, &cfg.sysfs)?;
    control::keep_a_known_good_slot(cfg, bl, state, booted.as_deref(), &dev.name, "overwrite it")?;

    let mut destinations = Vec::new();
    for p in &m.payloads {
        let d = destination(target_cfg, &dev, p)?;
        if let Destination::Device(dev) = &d {
            if p.size > dev.size {
                return Err(Error::TooLarge {
                    payload: p.name.clone(),
                    size: p.size,
                    target: format!("slot {} ({})", dev.name, dev.path.display()),
                    capacity: dev.size,
                });
            }
        }
        destinations.push(d);
    }
    check_file_space(m, target_cfg.files_dir.as_deref())?;
    let writes_image = destinations
        .iter()
        .any(|d| matches!(d, Destination::Device(_)));
    if !writes_image {
        // The slot becomes bootable over bytes this bundle does not write: only if they are
        // the complete image of an earlier install, still intact.
        let rec = state.slot(&dev.name);
        match (&rec.status, &rec.image) {
            (SlotStatus::Installed, Some(img)) => prove_image(&dev, img)?,
            _ => {
                return Err(Error::Slot(format!(
                    "the bundle has no image for slot {} and the slot does not hold a complete, recorded image",
                    dev.name
                )))
            }
        }
    }
    Ok(Plan {
        target: target_cfg.clone(),
        device: dev,
        destinations,
        tries: opts.tries.unwrap_or(cfg.tries),
    })
}

/// Install a bundle into the inactive slot. On any error nothing the bootloader would boot
/// has changed: the target stays marked bad until a complete, verified write. The caller
/// holds the operation lock.
pub fn apply(
    cfg: &Config,
    bl: &mut dyn Bootloader,
    src: &mut Source,
    opts: &ApplyOptions,
    progress: &Progress,
) -> Result<ApplyReport> {
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    let floor = Floor::read(&state, bl).effective;
    let (_head, verified) = verify_head(cfg, src, &state, floor)?;
    let m = Arc::new(verified.manifest.clone());
    let plan = prepare(cfg, bl, &state, &m, opts)?;
    let dev = &plan.device;
    // The bundle passed every check: now repair a missing or stale floor copy, if any.
    Floor::restore(&mut state, bl)?;

    // 1. Not bootable before the first byte is written.
    bl.mark_bad(&dev.name)?;
    {
        let rec = state.slot_mut(&dev.name);
        let image = rec.image.take();
        *rec = Default::default();
        rec.status = SlotStatus::Installing;
        rec.version = Some(m.version.to_string());
        rec.bundle_id = Some(verified.id.to_hex());
        // Kept only while the bundle does not rewrite the image (proven in prepare()).
        if !plan
            .destinations
            .iter()
            .any(|d| matches!(d, Destination::Device(_)))
        {
            rec.image = image;
        }
    }
    store.save(&state)?;
    crate::failpoint::hit("after-mark-bad");

    // 2. Stream, verify each chunk, write; then read back.
    let total: u64 = m.payloads.iter().map(|p| p.size).sum();
    progress.start(
        total,
        &format!("installing {} into slot {}", m.version, dev.name),
    );
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut staging = match plan.files_dir() {
        Some(d)
            if plan
                .destinations
                .iter()
                .any(|d| matches!(d, Destination::File(_))) =>
        {
            Some(files::Staging::begin(d)?)
        }
        _ => None,
    };
    let mut writers: Vec<Option<Sink>> = Vec::new();
    for d in &plan.destinations {
        writers.push(Some(match d {
            Destination::Device(dev) => {
                Sink::Image(blockdev::SlotWriter::open(&dev.path, dev.offset, dev.size)?)
            }
            Destination::File(rel) => Sink::File(
                staging
                    .as_mut()
                    .expect("a staging directory for file payloads")
                    .create(rel)?,
                Box::new(blake3::Hasher::new()),
            ),
        }));
    }
    let mut fail_after = crate::failpoint::chunk_countdown();
    let reader = std::mem::replace(&mut src.reader, Box::new(std::io::empty()));
    pipeline::stream_bundle(
        reader,
        m.clone(),
        workers,
        |p, data| {
            fail_after();
            match writers[p].as_mut().expect("open writer") {
                Sink::Image(w) => w.write(data),
                Sink::File(f, h) => {
                    use std::io::Write;
                    h.update(data);
                    f.write_all(data)
                        .ctx(|| format!("writing payload {:?}", m.payloads[p].name))
                }
            }
        },
        |n| progress.set(n),
    )?;
    let mut written = 0u64;
    for (i, w) in writers.iter_mut().enumerate() {
        let p = &m.payloads[i];
        written += match w.take().expect("open writer") {
            Sink::Image(w) => w.finish()?,
            Sink::File(f, h) => {
                f.sync_all()
                    .ctx(|| format!("syncing payload {:?}", p.name))?;
                if h.finalize().as_bytes() != &p.blake3.0 {
                    return Err(Error::Tampered {
                        payload: p.name.clone(),
                        what: "whole-payload hash mismatch".into(),
                    });
                }
                p.size
            }
        };
    }
    crate::failpoint::hit("after-write");
    progress.message("reading back");
    let mut image = None;
    for (p, d) in m.payloads.iter().zip(&plan.destinations) {
        match d {
            Destination::Device(dev) => {
                let got = blockdev::hash_region(&dev.path, dev.offset, p.size)?;
                if got.as_bytes() != &p.blake3.0 {
                    return Err(Error::Tampered {
                        payload: p.name.clone(),
                        what: format!(
                            "read back from {} does not match the signed hash",
                            dev.path.display()
                        ),
                    });
                }
                image = Some(ImageRecord {
                    size: p.size,
                    blake3: p.blake3,
                });
            }
            Destination::File(rel) => staging
                .as_ref()
                .expect("a staging directory for file payloads")
                .verify(&p.name, rel, p.size, &p.blake3)?,
        }
    }
    if let Some(st) = staging {
        st.commit()?;
    }
    progress.finish();

    // 3. Record what the slot holds.
    {
        let now = unix_now()?;
        let rec = state.slot_mut(&dev.name);
        rec.status = SlotStatus::Installed;
        rec.security_version = Some(m.security_version);
        rec.installed_at = Some(now);
        rec.activated_tries = Some(plan.tries);
        if image.is_some() {
            rec.image = image;
        }
        state.newest_seen = state.newest_seen.max(m.created);
    }
    store.save(&state)?;
    crate::failpoint::hit("before-flip");

    // 4. Boot it next, with a limited number of tries.
    bl.set_primary(&dev.name, plan.tries)?;
    crate::failpoint::hit("after-flip");
    Ok(ApplyReport {
        slot: dev.name.clone(),
        bundle_version: m.version.to_string(),
        security_version: m.security_version,
        bundle_id: verified.id.to_hex(),
        bytes_written: written,
        tries: plan.tries,
    })
}

enum Sink {
    Image(blockdev::SlotWriter),
    File(std::fs::File, Box<blake3::Hasher>),
}

/// What `verify` checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub bundle_id: String,
    pub compatible: String,
    pub bundle_version: String,
    pub security_version: u64,
    pub payloads: usize,
    pub bytes: u64,
    pub signers: Vec<String>,
    /// The slot an apply would write.
    pub target: String,
}

/// Check everything `apply` would check, including the plan for this device's target slot,
/// chunk by chunk and whole payload by whole payload, without writing anything.
pub fn verify_all(
    cfg: &Config,
    bl: &dyn Bootloader,
    src: &mut Source,
    opts: &ApplyOptions,
) -> Result<VerifyReport> {
    let state = StateStore::new(&cfg.state_dir).load()?;
    let floor = Floor::read(&state, bl).effective;
    let (_head, verified) = verify_head(cfg, src, &state, floor)?;
    let m = Arc::new(verified.manifest.clone());
    let plan = prepare(cfg, bl, &state, &m, opts)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut hashers: Vec<blake3::Hasher> =
        m.payloads.iter().map(|_| blake3::Hasher::new()).collect();
    let reader = std::mem::replace(&mut src.reader, Box::new(std::io::empty()));
    pipeline::stream_bundle(
        reader,
        m.clone(),
        workers,
        |p, data| {
            hashers[p].update(data);
            Ok(())
        },
        |_| {},
    )?;
    for (p, h) in m.payloads.iter().zip(&hashers) {
        if h.finalize().as_bytes() != &p.blake3.0 {
            return Err(Error::Tampered {
                payload: p.name.clone(),
                what: "whole-payload hash mismatch".into(),
            });
        }
    }
    Ok(VerifyReport {
        bundle_id: verified.id.to_hex(),
        compatible: m.compatible.clone(),
        bundle_version: m.version.to_string(),
        security_version: m.security_version,
        payloads: m.payloads.len(),
        bytes: m.payloads.iter().map(|p| p.size).sum(),
        signers: verified.signers.clone(),
        target: plan.device.name,
    })
}
