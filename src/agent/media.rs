//! Removable media as a desired-state provider: a sailor updates a node by plugging in a
//! stick, with no shell. Every few seconds the block devices in sysfs are listed; a new one on
//! a USB bus (or flagged removable) is mounted read-only (nosuid, nodev, noexec) and searched
//! for bundles (`*.eota`, `*.bin`, `*.bundle` at its top or in `edge-ota/`). A bundle that is
//! signed by the trusted keys, meant for this device, within the policy (expiry, floor) and
//! newer than what runs becomes the desired state, with the activation the configuration
//! chooses (`[agent.media] mode`). Whatever happens is said on the console and kept in the
//! agent's notices. The stick stays mounted while it is plugged in (staging reads from it);
//! unplugging it detaches the mount.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::Sender;

use super::desired::{self, ActivateWhen, Activation, Document, Spec, StagePolicy};
use super::Input;
use crate::config::{Config, MediaMode};
use crate::error::{Error, Result};

/// File names looked at on a stick.
const EXTENSIONS: [&str; 3] = ["eota", "bin", "bundle"];
/// Filesystems a stick may carry.
const FILESYSTEMS: [&str; 5] = ["vfat", "exfat", "ext4", "ext2", "iso9660"];

/// A block device that may be a stick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Kernel name (`sda`, `sda1`).
    pub name: String,
    /// The whole disk it belongs to.
    pub disk: String,
}

/// List the block devices under `<sysfs>/class/block` that sit on removable media: the disk
/// is flagged removable or hangs off a USB bus. A partitioned disk yields its partitions, an
/// unpartitioned one (a "superfloppy" stick) itself.
pub fn scan(sysfs: &Path, skip_disks: &[String]) -> Vec<Candidate> {
    let class = sysfs.join("class/block");
    let Ok(entries) = std::fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in &names {
        let dev = class.join(name);
        let is_part = dev.join("partition").exists();
        let disk = if is_part {
            match std::fs::canonicalize(&dev)
                .ok()
                .and_then(|p| p.parent().map(|d| d.to_path_buf()))
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            {
                Some(d) => d,
                None => continue,
            }
        } else {
            name.clone()
        };
        if skip_disks.contains(&disk) {
            continue;
        }
        let disk_dir = class.join(&disk);
        let removable =
            std::fs::read_to_string(disk_dir.join("removable")).is_ok_and(|s| s.trim() == "1");
        let usb = std::fs::canonicalize(&disk_dir).is_ok_and(|p| {
            p.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with("usb"))
        });
        if !(removable || usb) {
            continue;
        }
        let size = std::fs::read_to_string(dev.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if size == 0 {
            // An empty card reader slot.
            continue;
        }
        let has_parts = names.iter().any(|n| {
            n != &disk && n.starts_with(&disk) && class.join(n).join("partition").exists()
        });
        if !is_part && has_parts {
            continue;
        }
        out.push(Candidate {
            name: name.clone(),
            disk,
        });
    }
    out
}

/// Bundle files on a mounted stick, by name.
pub fn find_bundles(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [root.to_path_buf(), root.join("edge-ota")] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// What a bundle on a stick is, once checked.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    pub version: semver::Version,
    pub bundle_id: String,
}

/// Check one bundle file: signatures, compatible, expiry, floor, and newer than `running`.
pub fn check_bundle(cfg: &Config, path: &Path, running: Option<&semver::Version>) -> Result<Found> {
    let spec = path.to_string_lossy().into_owned();
    let mut src = crate::install::BundleSource::open(&spec, &cfg.network)?;
    let state = crate::state::StateStore::new(&cfg.state_dir).load()?;
    let bl = crate::bootloader::open(cfg)?;
    let floor = crate::control::Floor::read(&state, bl.as_ref()).effective;
    let (_, verified) = crate::install::verify_head(cfg, &mut src, &state, floor)?;
    let m = &verified.manifest;
    if let Some(r) = running {
        if &m.version <= r {
            return Err(Error::NotDesired(format!(
                "{} is version {}, not newer than the {r} that runs",
                path.display(),
                m.version
            )));
        }
    }
    Ok(Found {
        path: path.to_path_buf(),
        version: m.version.clone(),
        bundle_id: verified.id.to_hex(),
    })
}

/// The desired state a stick's bundle stands for.
pub fn desired_for(found: &Found, device: &str, mode: MediaMode) -> Document {
    let policy = match mode {
        MediaMode::Now => ActivateWhen::Now,
        MediaMode::Window => ActivateWhen::Window,
        MediaMode::Stage | MediaMode::Off => ActivateWhen::Manual,
    };
    Document {
        api_version: desired::API_VERSION.into(),
        kind: desired::KIND.into(),
        metadata: desired::Metadata {
            name: Some(format!("media-{device}")),
            other: Default::default(),
        },
        spec: Spec {
            version: Some(found.version.clone()),
            bundle_id: Some(found.bundle_id.clone()),
            sources: vec![found.path.to_string_lossy().into_owned()],
            stage: StagePolicy::default(),
            activation: Activation {
                policy,
                windows: Vec::new(),
            },
            data_budget: None,
            health: None,
        },
    }
}

fn running_version(cfg: &Config) -> Option<semver::Version> {
    let booted = crate::slot::booted_slot(&cfg.cmdline).ok()??;
    let state = crate::state::StateStore::new(&cfg.state_dir).load().ok()?;
    state.slot(&booted).version?.parse().ok()
}

/// Disks that hold the slots: never treated as sticks.
fn own_disks(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let name = |p: &Path| {
        std::fs::canonicalize(p)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    if let Some(d) = cfg.disk.as_deref().and_then(name) {
        out.push(d);
    }
    for s in &cfg.slots {
        if let Some(d) = s.device.as_deref().and_then(name) {
            // A partition: its disk is named by its sysfs parent.
            let sys = cfg.sysfs.join("class/block").join(&d);
            if let Some(parent) = std::fs::canonicalize(sys).ok().and_then(|p| {
                p.parent()
                    .and_then(|q| q.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            }) {
                out.push(parent);
            }
            out.push(d);
        }
    }
    out
}

/// Watch for sticks until the agent goes away.
pub fn watch(cfg: Config, tx: Sender<Input>) {
    let Some(agent) = cfg.agent.clone() else {
        return;
    };
    let media = agent.media.clone();
    if media.mode == MediaMode::Off {
        return;
    }
    let skip = own_disks(&cfg);
    let mut mounted: BTreeMap<String, PathBuf> = BTreeMap::new();
    let say = |m: String| tx.send(Input::Notice(m)).is_ok();
    loop {
        let now: Vec<Candidate> = scan(&cfg.sysfs, &skip);
        // Unplugged: detach the mount, forget the device (plugging it in again is new).
        let gone: Vec<String> = mounted
            .keys()
            .filter(|k| !now.iter().any(|c| &c.name == *k))
            .cloned()
            .collect();
        for name in gone {
            let at = mounted.remove(&name).expect("listed");
            let _ = sys_mount::unmount(&at, sys_mount::UnmountFlags::DETACH);
            let _ = std::fs::remove_dir(&at);
            if !say(format!("removable media {name} was removed")) {
                return;
            }
        }
        for c in now {
            if mounted.contains_key(&c.name) {
                continue;
            }
            let at = media.mount_dir.join(&c.name);
            mounted.insert(c.name.clone(), at.clone());
            let dev = media.dev.join(&c.name);
            if let Err(e) = mount_ro(&dev, &at) {
                if !say(format!(
                    "removable media {}: not mounted: {e}",
                    dev.display()
                )) {
                    return;
                }
                continue;
            }
            let running = running_version(&cfg);
            let mut best: Option<Found> = None;
            let bundles = find_bundles(&at);
            if bundles.is_empty() {
                say(format!(
                    "removable media {}: no bundle (*.eota, *.bin, *.bundle) on it",
                    dev.display()
                ));
            }
            for b in bundles {
                match check_bundle(&cfg, &b, running.as_ref()) {
                    Ok(f) => {
                        if best.as_ref().is_none_or(|x| f.version > x.version) {
                            best = Some(f);
                        }
                    }
                    Err(e) => {
                        say(format!(
                            "removable media {}: ignoring {}: {e}",
                            dev.display(),
                            b.display()
                        ));
                    }
                }
            }
            if let Some(f) = best {
                let what = match media.mode {
                    MediaMode::Now => "staging and applying it now",
                    MediaMode::Window => "staging it; it is applied in the next maintenance window",
                    _ => "staging it; `edge-ota agent apply` applies it",
                };
                say(format!(
                    "removable media {}: bundle {} ({}) for this device; {what}",
                    dev.display(),
                    f.version,
                    f.path.display()
                ));
                let origin = format!("media:{}", dev.display());
                let d =
                    desired::from_document(desired_for(&f, &c.name, media.mode), &origin, &agent);
                if tx.send(Input::Offer(origin, d.map(Box::new))).is_err() {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(media.poll_secs));
    }
}

fn mount_ro(dev: &Path, at: &Path) -> Result<()> {
    use sys_mount::{FilesystemType, Mount, MountFlags};
    std::fs::create_dir_all(at).map_err(|e| Error::io(format!("creating {}", at.display()), e))?;
    let types: &[&str] = &FILESYSTEMS;
    Mount::builder()
        .fstype(FilesystemType::Set(types))
        .flags(MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC)
        .mount(dev, at)
        .map(std::mem::forget)
        .map_err(|e| Error::io(format!("mounting {} on {}", dev.display(), at.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs: `devices/.../<disk>[/<part>]` with `class/block/<name>` links.
    fn sysfs(devs: &[(&str, &str, Option<&str>, bool)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let class = d.path().join("class/block");
        std::fs::create_dir_all(&class).unwrap();
        for (bus, disk, part, removable) in devs {
            let disk_dir = d.path().join("devices").join(bus).join(disk);
            std::fs::create_dir_all(&disk_dir).unwrap();
            std::fs::write(
                disk_dir.join("removable"),
                if *removable { "1\n" } else { "0\n" },
            )
            .unwrap();
            std::fs::write(disk_dir.join("size"), "2048\n").unwrap();
            if !class.join(disk).exists() {
                symlink(&disk_dir, class.join(disk)).unwrap();
            }
            if let Some(p) = part {
                let pd = disk_dir.join(p);
                std::fs::create_dir_all(&pd).unwrap();
                std::fs::write(pd.join("partition"), "1\n").unwrap();
                std::fs::write(pd.join("size"), "2000\n").unwrap();
                symlink(&pd, class.join(p)).unwrap();
            }
        }
        d
    }

    #[test]
    fn usb_stick_partitions_are_found_and_the_system_disk_is_not() {
        let s = sysfs(&[
            ("pci0000:00/virtio2", "vda", Some("vda3"), false),
            ("pci0000:00/usb2/2-1", "sda", Some("sda1"), false),
            ("pci0000:00/ata1", "sdb", None, true),
        ]);
        let c = scan(s.path(), &["vda".into()]);
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["sda1", "sdb"]);
        assert_eq!(c[0].disk, "sda");
        // The system disk is skipped even if it were on USB.
        let c = scan(s.path(), &["sda".into(), "vda".into()]);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn bundles_are_found_at_the_top_and_in_edge_ota() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("image.bin"), b"x").unwrap();
        std::fs::write(d.path().join("notes.txt"), b"x").unwrap();
        std::fs::create_dir(d.path().join("edge-ota")).unwrap();
        std::fs::write(d.path().join("edge-ota/v2.EOTA"), b"x").unwrap();
        let names: Vec<String> = find_bundles(d.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["image.bin", "v2.EOTA"]);
    }

    #[test]
    fn stick_mode_chooses_the_activation() {
        let f = Found {
            path: "/run/edge-ota/media/sda/v2.eota".into(),
            version: "2.0.0".parse().unwrap(),
            bundle_id: "ab".repeat(32),
        };
        let a = crate::agent::desired::tests::agent();
        for (mode, want) in [
            (MediaMode::Now, ActivateWhen::Now),
            (MediaMode::Window, ActivateWhen::Window),
            (MediaMode::Stage, ActivateWhen::Manual),
        ] {
            let d =
                desired::from_document(desired_for(&f, "sda", mode), "media:/dev/sda", &a).unwrap();
            assert_eq!(d.spec().activation.policy, want);
            assert_eq!(d.spec().sources, ["/run/edge-ota/media/sda/v2.eota"]);
        }
    }
}
