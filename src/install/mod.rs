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
//! writes nothing. The chunk-by-chunk work is the [`engine`]'s.

pub mod auto;
pub mod blockdev;
pub mod engine;
pub mod files;

use std::path::PathBuf;
use std::sync::Arc;

use crate::bootloader::Bootloader;
use crate::bundle::head::{BundleHead, Verified};
use crate::bundle::{Manifest, Payload, PayloadKind};
use crate::config::{Config, SlotConfig};
use crate::control::{self, Floor};
use crate::error::{Error, IoContext, Result};
use crate::progress::{Event, Progress};
use crate::slot::{self, SlotDevice};
use crate::source::{RangeSource, Source};
use crate::state::{ChunkTable, ImageRecord, InstallProgress, SlotStatus, State, StateStore};
use crate::verify::{unix_now, Policy, TrustedTime};

/// Where an apply reads the bundle from.
pub enum BundleSource {
    /// A pipe: read once, in order.
    Stream(Source),
    /// A file or an HTTP(S) URL: read by ranges.
    Ranges(Box<dyn RangeSource>),
    /// Only what `fetch` staged (`--offline`): the head and the staged frames.
    Staged(Arc<crate::stage::StagedBundle>, String),
}

impl BundleSource {
    /// `-` is standard input, `http://` and `https://` URLs go over the network, anything else
    /// is a path.
    pub fn open(spec: &str, net: &crate::source::http::HttpOptions) -> Result<BundleSource> {
        if spec == "-" {
            return Ok(BundleSource::Stream(Source::open(spec)?));
        }
        if spec.starts_with("http://") || spec.starts_with("https://") {
            return Ok(BundleSource::Ranges(Box::new(
                crate::source::http::HttpSource::open(spec, net)?,
            )));
        }
        let path = std::path::Path::new(spec);
        let meta = std::fs::metadata(path).ctx(|| format!("opening bundle {spec}"))?;
        if meta.is_file() {
            Ok(BundleSource::Ranges(Box::new(
                crate::source::FileSource::open(path)?,
            )))
        } else {
            // A FIFO or a character device: a stream.
            Ok(BundleSource::Stream(Source::open(spec)?))
        }
    }

    pub fn name(&self) -> String {
        match self {
            BundleSource::Stream(s) => s.name.clone(),
            BundleSource::Ranges(r) => r.name().to_string(),
            BundleSource::Staged(_, source) => format!("the staged copy of {source}"),
        }
    }

    /// Read the head (header, manifest, signatures) and check the length the source reports
    /// against the header's.
    pub fn read_head(&mut self) -> Result<BundleHead> {
        let (head, len) = match self {
            BundleSource::Stream(s) => (BundleHead::read(&mut s.reader)?, s.len),
            BundleSource::Staged(st, _) => (BundleHead::read(&mut &st.head()?[..])?, None),
            BundleSource::Ranges(r) => {
                let len = r.len();
                let mut first = Vec::new();
                let n = len.min(crate::bundle::HEADER_LEN as u64);
                fetch_into(r.as_mut(), 0..n, &mut first)?;
                let header = {
                    let mut b = [0u8; crate::bundle::HEADER_LEN];
                    if first.len() < b.len() {
                        return Err(Error::Truncated("ends inside the header".into()));
                    }
                    b.copy_from_slice(&first);
                    crate::bundle::Header::decode(&b)?
                };
                let end = header.payload_offset().min(len);
                fetch_into(r.as_mut(), n..end, &mut first)?;
                (BundleHead::read(&mut &first[..])?, Some(len))
            }
        };
        if let Some(len) = len {
            let want = head.header.total_len();
            if len < want {
                return Err(Error::Truncated(format!(
                    "{} is {len} bytes, the header says {want}",
                    self.name()
                )));
            }
            if len > want {
                return Err(Error::Format(format!(
                    "trailing data: {} is {len} bytes, the bundle ends at {want}",
                    self.name()
                )));
            }
        }
        Ok(head)
    }

    fn into_fetcher(self) -> engine::Fetcher {
        match self {
            BundleSource::Stream(s) => engine::Fetcher::Stream(s.reader),
            BundleSource::Ranges(r) => engine::Fetcher::Ranges(r),
            BundleSource::Staged(..) => engine::Fetcher::Offline,
        }
    }

    /// `--offline`: the bundle `fetch` staged from `spec` (a URL or path), without touching it.
    pub fn staged(cfg: &Config, spec: &str) -> Result<BundleSource> {
        let cache = cfg.cache_dir();
        let idx = crate::stage::find_by_source(&cache, spec).ok_or_else(|| {
            Error::Offline(format!(
                "nothing staged from {spec} in {}: run `edge-ota fetch {spec}` while the link is up",
                cache.display()
            ))
        })?;
        let st = crate::stage::StagedBundle::open(&cache, &idx.bundle_id)?.ok_or_else(|| {
            Error::Offline(format!(
                "the staging of {spec} in {} is incomplete",
                cache.display()
            ))
        })?;
        Ok(BundleSource::Staged(Arc::new(st), spec.to_string()))
    }
}

fn fetch_into(src: &mut dyn RangeSource, r: std::ops::Range<u64>, out: &mut Vec<u8>) -> Result<()> {
    if r.is_empty() {
        return Ok(());
    }
    src.fetch(&[r], &mut |_, b| {
        out.extend_from_slice(b);
        Ok(())
    })
}

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
    /// Compressed bytes read from the source.
    pub bytes_fetched: u64,
    /// Uncompressed bytes that did not have to come from the source.
    pub bytes_reused: u64,
    /// The release a delta rebuilt the image from.
    pub delta_from: Option<String>,
    pub tries: u32,
}

/// Verify the head of a bundle and the device policy; nothing is written.
pub fn verify_head(
    cfg: &Config,
    src: &mut BundleSource,
    state: &State,
    floor: u64,
) -> Result<(BundleHead, Verified)> {
    let head = src.read_head()?;
    let verified = head.verify(&cfg.trusted_keys()?)?;
    Policy {
        compatible: cfg.compatible.clone(),
        time: TrustedTime::new(unix_now()?, state.newest_seen),
        min_security_version: floor,
    }
    .check(&verified.manifest)?;
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

/// Extra knobs of an apply that the CLI and the agent set.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Refuse an update that would fetch more than this many bytes from the source.
    pub max_download: Option<u64>,
    /// Nothing may come from the source: every chunk is local or staged.
    pub offline: bool,
    /// Set by another thread to stop a fetch at the next block it receives.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The bundle must be this one (the agent's desired state), checked right after the
    /// signatures, before anything is fetched or written.
    pub expect: Expected,
}

/// Which bundle a caller wants; empty: any valid one.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub version: Option<semver::Version>,
    pub bundle_id: Option<String>,
}

impl Expected {
    fn check(&self, m: &Manifest, bundle_id: &str, source: &str) -> Result<()> {
        if let Some(v) = &self.version {
            if &m.version != v {
                return Err(Error::NotDesired(format!(
                    "{source} holds version {}, {v} is wanted",
                    m.version
                )));
            }
        }
        if let Some(id) = &self.bundle_id {
            if !id.eq_ignore_ascii_case(bundle_id) {
                return Err(Error::NotDesired(format!(
                    "{source} holds bundle {bundle_id}, {id} is wanted"
                )));
            }
        }
        Ok(())
    }
}

/// Install a bundle into the inactive slot. On any error nothing the bootloader would boot
/// has changed: the target stays marked bad until a complete, verified write. The caller
/// holds the operation lock.
pub fn apply(
    cfg: &Config,
    bl: &mut dyn Bootloader,
    mut src: BundleSource,
    opts: &ApplyOptions,
    limits: &Limits,
    progress: &Progress,
) -> Result<ApplyReport> {
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    let floor = Floor::read(&state, bl).effective;
    progress.phase("verifying", src.name());
    let (head, verified) = verify_head(cfg, &mut src, &state, floor)?;
    limits
        .expect
        .check(&verified.manifest, &verified.id.to_hex(), &src.name())?;
    let m = Arc::new(verified.manifest.clone());
    let plan = prepare(cfg, bl, &state, &m, opts)?;
    let dev = plan.device.clone();
    let bundle_id = verified.id.to_hex();

    // Where each payload goes: the slot device, or a file in a fresh staging directory.
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
    let mut outs = Vec::with_capacity(m.payloads.len());
    for (p, d) in m.payloads.iter().zip(&plan.destinations) {
        outs.push(Arc::new(match d {
            Destination::Device(dev) => blockdev::PosWriter::open(&dev.path, dev.offset, dev.size)?,
            Destination::File(rel) => blockdev::PosWriter::from_file(
                staging
                    .as_mut()
                    .expect("a staging directory for file payloads")
                    .create(rel)?,
                rel,
                p.size,
            ),
        }));
    }
    let rec = state.slot(&dev.name);
    let resume = rec
        .progress
        .filter(|pr| rec.status == SlotStatus::Installing && pr.bundle_id == bundle_id);
    // Frames staged by a `fetch` (or by an earlier, interrupted apply over the network).
    let staged: Option<Arc<dyn engine::Staged>> = match &src {
        BundleSource::Staged(st, _) => Some(st.clone()),
        _ => crate::stage::StagedBundle::open(&cfg.cache_dir(), &bundle_id)?
            .map(|st| Arc::new(st) as Arc<dyn engine::Staged>),
    };
    let mut inputs = engine::Inputs {
        manifest: m.clone(),
        payload_offset: head.header.payload_offset(),
        outs,
        base: running_slot(cfg, &state)?,
        resume: resume.as_ref(),
        staged,
        consume_staged: true,
        source_name: src.name(),
    };
    progress.phase("planning", "");
    let eplan = engine::plan(&inputs, limits.offline, progress)?;
    progress.event(Event::Plan(eplan.summary.clone()));
    if eplan.resumed > 0 {
        progress.note(format!(
            "continuing an interrupted install: {} chunks already written and verified",
            eplan.resumed
        ));
    }
    if let Some(budget) = limits.max_download {
        if eplan.summary.fetch > budget {
            return Err(Error::DataBudget {
                need: eplan.summary.fetch,
                budget,
            });
        }
    }
    // The bundle passed every check: now repair a missing or stale floor copy, if any.
    Floor::restore(&mut state, bl)?;
    // Over a network, what arrives is spooled in the cache (and dropped as it is used), so a
    // power cut mid-frame never costs a byte twice.
    if inputs.staged.is_none() && matches!(&src, BundleSource::Ranges(r) if r.is_remote()) {
        inputs.staged = Some(Arc::new(crate::stage::StagedBundle::open_or_create(
            &cfg.cache_dir(),
            &bundle_id,
            &m.version.to_string(),
            &src.name(),
            &head.to_bytes(),
        )?));
    }

    // 1. Not bootable before the first byte is written.
    bl.mark_bad(&dev.name)?;
    {
        let rec = state.slot_mut(&dev.name);
        let image = rec.image.take();
        let progress = rec.progress.take().filter(|_| resume.is_some());
        *rec = Default::default();
        rec.status = SlotStatus::Installing;
        rec.version = Some(m.version.to_string());
        rec.bundle_id = Some(bundle_id.clone());
        rec.progress = progress;
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

    // 2. Produce every chunk, verify it, write it; checkpoint as it goes; then read back.
    progress.phase("writing", format!("{} into slot {}", m.version, dev.name));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let device_payloads: Vec<bool> = plan
        .destinations
        .iter()
        .map(|d| matches!(d, Destination::Device(_)))
        .collect();
    let report = engine::run(
        &inputs,
        &eplan,
        src.into_fetcher(),
        workers,
        progress,
        &mut |done| {
            // Only chunks in the slot itself survive a restart (file payloads are staged
            // afresh by every apply).
            let done = done
                .iter()
                .zip(&device_payloads)
                .map(|(d, dev)| {
                    if *dev {
                        InstallProgress::ranges(d)
                    } else {
                        Vec::new()
                    }
                })
                .collect();
            state.slot_mut(&dev.name).progress = Some(InstallProgress {
                bundle_id: bundle_id.clone(),
                done,
            });
            store.save(&state)
        },
    )?;
    crate::failpoint::hit("after-write");
    progress.phase("reading-back", "");
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
                image = Some((
                    ImageRecord {
                        size: p.size,
                        blake3: p.blake3,
                    },
                    p.chunk_size.map(|cs| ChunkTable {
                        chunk_size: cs,
                        hashes: p.chunks.iter().map(|c| c.hash).collect(),
                    }),
                ));
            }
            Destination::File(rel) => staging
                .as_ref()
                .expect("a staging directory for file payloads")
                .verify(&p.name, rel, p.size, &p.blake3)?,
        }
    }
    if let Some(mut st) = staging {
        // Which archive holds which signed images: the agent loads and checks them later.
        let archives: Vec<crate::containerd::Archive> = m
            .payloads
            .iter()
            .zip(&plan.destinations)
            .filter_map(|(p, d)| match d {
                Destination::File(rel) if p.kind == PayloadKind::ContainerImages => {
                    Some(crate::containerd::Archive {
                        path: rel.to_string_lossy().into_owned(),
                        images: p.images.clone(),
                    })
                }
                _ => None,
            })
            .collect();
        if !archives.is_empty() {
            st.write_file(
                std::path::Path::new(crate::containerd::INDEX_FILE),
                &crate::containerd::index_json(&archives)?,
            )?;
        }
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
        rec.progress = None;
        if let Some((img, chunks)) = image {
            rec.image = Some(img);
            rec.chunks = chunks;
        }
        state.newest_seen = state.newest_seen.max(m.created);
    }
    store.save(&state)?;
    crate::failpoint::hit("before-flip");

    // 4. Boot it next, with a limited number of tries.
    bl.set_primary(&dev.name, plan.tries)?;
    crate::failpoint::hit("after-flip");
    // Installed: its staged copy, if any, has served, and so have older ones.
    if let Err(e) = crate::stage::remove(&cfg.cache_dir(), &bundle_id)
        .and_then(|()| crate::stage::remove_superseded(&cfg.cache_dir(), &m.version))
    {
        progress.note(format!("could not remove a staged copy: {e}"));
    }
    Ok(ApplyReport {
        slot: dev.name.clone(),
        bundle_version: m.version.to_string(),
        security_version: m.security_version,
        bundle_id,
        bytes_written: report.written,
        bytes_fetched: report.fetched,
        bytes_reused: eplan.summary.reused,
        delta_from: eplan.summary.delta_from.clone(),
        tries: plan.tries,
    })
}

/// The running slot, as a source of local copies and delta bases: its device (read-only) and
/// what state recorded about its image.
fn running_slot(cfg: &Config, state: &State) -> Result<Option<Arc<engine::Base>>> {
    let Some(booted) = slot::booted_slot(&cfg.cmdline)? else {
        return Ok(None);
    };
    let Ok(slot_cfg) = cfg.slot(&booted) else {
        return Ok(None);
    };
    let dev = slot::resolve(cfg, slot_cfg)?;
    let rec = state.slot(&booted);
    let file = std::fs::File::open(&dev.path).ctx(|| format!("opening {}", dev.path.display()))?;
    // A slot device inside a disk image file starts at an offset: copies read relative to it.
    let file = if dev.offset == 0 {
        file
    } else {
        return Ok(None);
    };
    Ok(Some(Arc::new(engine::Base {
        file,
        image: rec.image,
        chunks: rec.chunks,
        version: rec.version,
    })))
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
/// and decode and hash every chunk, without writing anything.
pub fn verify_all(
    cfg: &Config,
    bl: &dyn Bootloader,
    mut src: BundleSource,
    opts: &ApplyOptions,
) -> Result<VerifyReport> {
    let state = StateStore::new(&cfg.state_dir).load()?;
    let floor = Floor::read(&state, bl).effective;
    let (head, verified) = verify_head(cfg, &mut src, &state, floor)?;
    let m = Arc::new(verified.manifest.clone());
    let plan = prepare(cfg, bl, &state, &m, opts)?;
    let hashers: Vec<Arc<blockdev::PosWriter>> = m
        .payloads
        .iter()
        .map(|p| Arc::new(blockdev::PosWriter::discard(p.size)))
        .collect();
    let inputs = engine::Inputs {
        manifest: m.clone(),
        payload_offset: head.header.payload_offset(),
        outs: hashers,
        base: None,
        resume: None,
        staged: None,
        consume_staged: false,
        source_name: src.name(),
    };
    let progress = Progress::hidden();
    let eplan = engine::plan(&inputs, false, &progress)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    engine::run(
        &inputs,
        &eplan,
        src.into_fetcher(),
        workers,
        &progress,
        &mut |_| Ok(()),
    )?;
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

/// What `fetch` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchReport {
    pub bundle_id: String,
    pub bundle_version: String,
    /// Compressed bytes an apply would need from the source.
    pub needed: u64,
    /// Fetched by this run.
    pub fetched: u64,
    /// Now staged (all runs).
    pub staged: u64,
    pub complete: bool,
    pub cache: String,
}

/// `fetch`: stage, in the cache, exactly what an apply of this bundle would fetch (the same
/// plan: chunks already in the slots or rebuildable from the running slot are not fetched),
/// continuing an earlier fetch from the exact byte; then check every staged frame. Nothing
/// outside the cache is written. The caller holds the operation lock.
pub fn fetch(
    cfg: &Config,
    bl: &dyn Bootloader,
    mut src: BundleSource,
    limits: &Limits,
    progress: &Progress,
) -> Result<FetchReport> {
    let store = StateStore::new(&cfg.state_dir);
    let state = store.load()?;
    let floor = Floor::read(&state, bl).effective;
    progress.phase("verifying", src.name());
    let (head, verified) = verify_head(cfg, &mut src, &state, floor)?;
    limits
        .expect
        .check(&verified.manifest, &verified.id.to_hex(), &src.name())?;
    let m = Arc::new(verified.manifest.clone());
    let plan = prepare(cfg, bl, &state, &m, &ApplyOptions::default())?;
    let bundle_id = verified.id.to_hex();
    let cache = cfg.cache_dir();
    let source_name = src.name();
    let BundleSource::Ranges(mut remote) = src else {
        return Err(Error::Usage(
            "fetch stages from a file or an http(s) URL, not from a pipe or the cache".into(),
        ));
    };
    // Planned as the apply will plan it, reading what is already in the target slot.
    let outs = m
        .payloads
        .iter()
        .zip(&plan.destinations)
        .map(|(p, d)| {
            Ok(Arc::new(match d {
                Destination::Device(dev) => {
                    blockdev::PosWriter::read_only(&dev.path, dev.offset, dev.size)?
                }
                Destination::File(_) => blockdev::PosWriter::discard(p.size),
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    let rec = state.slot(&plan.device.name);
    let resume = rec
        .progress
        .filter(|pr| rec.status == SlotStatus::Installing && pr.bundle_id == bundle_id);
    crate::stage::remove_others(&cache, Some(&bundle_id))?;
    let staging = Arc::new(crate::stage::StagedBundle::open_or_create(
        &cache,
        &bundle_id,
        &m.version.to_string(),
        &source_name,
        &head.to_bytes(),
    )?);
    let inputs = engine::Inputs {
        manifest: m.clone(),
        payload_offset: head.header.payload_offset(),
        outs,
        base: running_slot(cfg, &state)?,
        resume: resume.as_ref(),
        staged: Some(staging.clone()),
        consume_staged: false,
        source_name: source_name.clone(),
    };
    let eplan = engine::plan(&inputs, false, progress)?;
    let needed_frames = eplan.frame_ranges(&inputs);
    let needed: u64 = needed_frames.iter().map(|r| r.end - r.start).sum();
    staging.commit(&[], |i| i.needed = needed)?;
    let missing = staging.index().missing(&needed_frames);
    let missing_bytes: u64 = missing.iter().map(|r| r.end - r.start).sum();
    let mut summary = eplan.summary.clone();
    summary.fetch = missing_bytes;
    progress.event(Event::Plan(summary));
    if let Some(budget) = limits.max_download {
        if missing_bytes > budget {
            return Err(Error::DataBudget {
                need: missing_bytes,
                budget,
            });
        }
    }
    if limits.offline && missing_bytes > 0 {
        return Err(Error::Offline(format!(
            "{missing_bytes} bytes are not staged yet"
        )));
    }
    let free = crate::stage::free_space(&cache)?;
    if missing_bytes > free {
        return Err(Error::TooLarge {
            payload: "staged bundle".into(),
            size: missing_bytes,
            target: format!("the free space in {}", cache.display()),
            capacity: free,
        });
    }
    progress.phase("staging", format!("{} into {}", m.version, cache.display()));
    let fetched = std::cell::Cell::new(0u64);
    let r = remote.fetch(&missing, &mut |off, bytes| {
        if limits
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(Error::Interrupted(format!(
                "staging {} stopped on request",
                m.version
            )));
        }
        staging.append(off, bytes)?;
        fetched.set(fetched.get() + bytes.len() as u64);
        progress.bytes(crate::progress::Bytes {
            needed: missing_bytes,
            fetched: fetched.get(),
            ..Default::default()
        });
        Ok(())
    });
    // Whatever arrived is kept for the next try, even when the fetch failed.
    staging.flush()?;
    r?;
    // Check every staged frame: decode it (or rebuild its chunks) and compare with the
    // signed hashes, writing nothing.
    progress.phase("checking", "");
    let check = engine::Inputs {
        outs: m
            .payloads
            .iter()
            .map(|p| Arc::new(blockdev::PosWriter::discard(p.size)))
            .collect(),
        ..inputs
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    if let Err(e) = engine::run(
        &check,
        &eplan,
        engine::Fetcher::Offline,
        workers,
        progress,
        &mut |_| Ok(()),
    ) {
        if let Error::Tampered { .. } = e {
            // Bytes that do not check out are not kept: the next fetch starts this one over.
            crate::stage::remove(&cache, &bundle_id)?;
        }
        return Err(e);
    }
    staging.commit(&[], |i| {
        i.complete = true;
        i.needed = needed;
    })?;
    progress.finish();
    Ok(FetchReport {
        bundle_id,
        bundle_version: m.version.to_string(),
        needed,
        fetched: fetched.get(),
        staged: staging.index().present_bytes(),
        complete: true,
        cache: staging.dir().display().to_string(),
    })
}
