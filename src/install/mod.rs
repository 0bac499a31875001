//! `apply`: verify a bundle, then stream it into the inactive slot, read it back, record it,
//! and hand the slot to the bootloader. The running slot is never opened for writing.
//!
//! Order of durable effects (each survives a power cut in a state a retry reads correctly):
//! 1. target marked bad in the bootloader and `installing` in state, before any write;
//! 2. payloads written, fsynced, read back and compared with the signed hashes;
//! 3. state records the installed bundle;
//! 4. the bootloader makes the target primary with N tries.

pub mod blockdev;
pub mod pipeline;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::bootloader::Bootloader;
use crate::bundle::reader::{expect_end, BundleHead, Verified};
use crate::bundle::{Payload, PayloadKind};
use crate::config::{Config, SlotConfig};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::slot::{self, SlotDevice};
use crate::source::Source;
use crate::state::{SlotStatus, StateStore};
use crate::verify::{unix_now, Policy};

/// Options of one apply.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Install into this slot instead of the inactive one (never the booted one).
    pub slot: Option<String>,
    /// Override the configured boot tries.
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
    min_security_version: u64,
) -> Result<(BundleHead, Verified)> {
    let head = BundleHead::read(&mut src.reader)?;
    let verified = head.verify(&cfg.trusted_keys()?)?;
    Policy {
        compatible: cfg.compatible.clone(),
        now: unix_now(),
        min_security_version,
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

/// Where each payload goes in the target slot.
enum Destination {
    Device(SlotDevice),
    File(PathBuf),
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
    let dir = slot_cfg.files_dir.as_ref().ok_or_else(|| {
        Error::Slot(format!(
            "payload {:?} is a {} payload but slot {:?} has no files_dir",
            p.name,
            p.kind.as_str(),
            slot_cfg.name
        ))
    })?;
    Ok(Destination::File(dir.join(subdir).join(&p.target)))
}

/// File payloads must fit the free space where they go, checked before anything is written:
/// running out of space halfway is the failure users of other updaters hit most.
fn check_file_space(m: &crate::bundle::Manifest, dests: &[Destination]) -> Result<()> {
    let mut need: Vec<(PathBuf, u64, String)> = Vec::new();
    for (p, d) in m.payloads.iter().zip(dests) {
        let Destination::File(path) = d else { continue };
        // The payload's directory may not exist yet: measure the nearest one that does.
        let mut dir = path
            .parent()
            .expect("payload path has a directory")
            .to_path_buf();
        while !dir.exists() {
            if !dir.pop() {
                break;
            }
        }
        match need.iter_mut().find(|(d, _, _)| *d == dir) {
            Some(entry) => {
                entry.1 += p.size;
                entry.2 = p.name.clone();
            }
            None => need.push((dir, p.size, p.name.clone())),
        }
    }
    for (dir, bytes, last) in need {
        let st = nix::sys::statvfs::statvfs(&dir).map_err(|e| {
            Error::io(
                format!("checking free space in {}", dir.display()),
                e.into(),
            )
        })?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        if bytes > free {
            return Err(Error::TooLarge {
                payload: last,
                size: bytes,
                target: format!("the free space in {}", dir.display()),
                capacity: free,
            });
        }
    }
    Ok(())
}

/// Install a bundle into the inactive slot. On any error nothing the bootloader would boot
/// has changed: the target stays marked bad until a complete, verified write.
pub fn apply(
    cfg: &Config,
    bootloader: &mut dyn Bootloader,
    src: &mut Source,
    opts: &ApplyOptions,
    progress: &Progress,
) -> Result<ApplyReport> {
    let store = StateStore::new(&cfg.state_dir);
    let mut state = store.load()?;
    let (_head, verified) = verify_head(cfg, src, state.min_security_version)?;
    let m = &verified.manifest;

    let booted = slot::booted_slot(&cfg.cmdline)?;
    let target_cfg = slot::choose_target(cfg, booted.as_deref(), opts.slot.as_deref())?;
    let dev = slot::resolve(cfg, target_cfg)?;
    slot::ensure_not_mounted(&dev.path, &cfg.mountinfo)?;
    let mut dests = Vec::new();
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
        dests.push(d);
    }
    check_file_space(m, &dests)?;
    let tries = opts.tries.unwrap_or(cfg.tries);

    // 1. Not bootable before the first byte is written.
    bootloader.mark_bad(&dev.name)?;
    {
        let rec = state.slot_mut(&dev.name);
        *rec = Default::default();
        rec.status = SlotStatus::Installing;
        rec.version = Some(m.version.to_string());
        rec.bundle_id = Some(verified.id.to_hex());
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
    let mut done_before = 0u64;
    let mut written = 0u64;
    let reader: &mut (dyn Read + Send) = &mut *src.reader;
    for (p, d) in m.payloads.iter().zip(&dests) {
        let report = |n: u64| progress.set(done_before + n);
        written += match d {
            Destination::Device(dev) => write_image(reader, p, dev, workers, report)?,
            Destination::File(path) => write_file(reader, p, path, workers, report)?,
        };
        done_before += p.size;
    }
    expect_end(reader)?;
    crate::failpoint::hit("after-write");
    progress.message("reading back");
    for (p, d) in m.payloads.iter().zip(&dests) {
        if let Destination::Device(dev) = d {
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
        }
    }
    progress.finish();

    // 3. Record what the slot holds.
    {
        let rec = state.slot_mut(&dev.name);
        rec.status = SlotStatus::Installed;
        rec.security_version = Some(m.security_version);
        rec.installed_at = Some(unix_now());
    }
    store.save(&state)?;
    crate::failpoint::hit("before-flip");

    // 4. Boot it next, with a limited number of tries.
    bootloader.set_primary(&dev.name, tries)?;
    crate::failpoint::hit("after-flip");
    Ok(ApplyReport {
        slot: dev.name.clone(),
        bundle_version: m.version.to_string(),
        security_version: m.security_version,
        bundle_id: verified.id.to_hex(),
        bytes_written: written,
        tries,
    })
}

fn write_image(
    src: &mut (dyn Read + Send),
    p: &Payload,
    dev: &SlotDevice,
    workers: usize,
    progress: impl FnMut(u64),
) -> Result<u64> {
    let mut w = blockdev::SlotWriter::open(&dev.path, dev.offset, dev.size)?;
    let mut fail_after = crate::failpoint::chunk_countdown();
    pipeline::stream_payload(
        src,
        p,
        workers,
        |data| {
            fail_after();
            w.write(data)
        },
        progress,
    )?;
    w.finish()
}

/// File payloads are written to a temporary file beside the target, checked against the
/// whole-payload hash, fsynced and renamed into place.
fn write_file(
    src: &mut (dyn Read + Send),
    p: &Payload,
    path: &Path,
    workers: usize,
    progress: impl FnMut(u64),
) -> Result<u64> {
    use std::io::Write;
    let dir = path.parent().expect("payload path has a directory");
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .ctx(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
    pipeline::stream_payload(
        src,
        p,
        workers,
        |data| {
            hasher.update(data);
            out.write_all(data)
                .ctx(|| format!("writing {}", path.display()))
        },
        progress,
    )?;
    out.flush().ctx(|| format!("writing {}", path.display()))?;
    drop(out);
    if hasher.finalize().as_bytes() != &p.blake3.0 {
        return Err(Error::Tampered {
            payload: p.name.clone(),
            what: "whole-payload hash mismatch".into(),
        });
    }
    crate::state::persist(tmp, path)?;
    Ok(p.size)
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
}

/// Check everything `apply` would check, chunk by chunk and whole payload by whole payload,
/// without writing anything.
pub fn verify_all(
    cfg: &Config,
    src: &mut Source,
    min_security_version: u64,
) -> Result<VerifyReport> {
    let (_head, verified) = verify_head(cfg, src, min_security_version)?;
    let m = &verified.manifest;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let reader: &mut (dyn Read + Send) = &mut *src.reader;
    for p in &m.payloads {
        let mut hasher = blake3::Hasher::new();
        pipeline::stream_payload(
            reader,
            p,
            workers,
            |data| {
                hasher.update(data);
                Ok(())
            },
            |_| {},
        )?;
        if hasher.finalize().as_bytes() != &p.blake3.0 {
            return Err(Error::Tampered {
                payload: p.name.clone(),
                what: "whole-payload hash mismatch".into(),
            });
        }
    }
    expect_end(reader)?;
    Ok(VerifyReport {
        bundle_id: verified.id.to_hex(),
        compatible: m.compatible.clone(),
        bundle_version: m.version.to_string(),
        security_version: m.security_version,
        payloads: m.payloads.len(),
        bytes: m.payloads.iter().map(|p| p.size).sum(),
        signers: verified.signers.clone(),
    })
}
