//! Slots: which device holds each slot (a path, or a GPT partition name on a disk), which slot
//! is booted (from the kernel command line), and which one an update may write.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::config::{Config, SlotConfig};
use crate::error::{Error, IoContext, Result};

/// Kernel command line argument naming the booted slot.
pub const CMDLINE_KEY: &str = "edgeota.slot";

/// Where a slot's bytes are: `size` bytes at `offset` in `path`. For a partition device
/// `offset` is 0; for a disk image file (tests) it is the partition's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotDevice {
    pub name: String,
    pub path: PathBuf,
    pub offset: u64,
    pub size: u64,
}

/// The booted slot named on the kernel command line, if any.
pub fn booted_slot(cmdline: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(cmdline)
        .ctx(|| format!("reading kernel command line {}", cmdline.display()))?;
    Ok(parse_cmdline(&text))
}

/// Find `edgeota.slot=NAME` in a kernel command line (the last one wins, as in the kernel).
pub fn parse_cmdline(text: &str) -> Option<String> {
    text.split_ascii_whitespace()
        .filter_map(|arg| arg.strip_prefix(CMDLINE_KEY)?.strip_prefix('='))
        .rfind(|v| !v.is_empty())
        .map(str::to_string)
}

/// Pick the slot to install into: the requested one, or the single other slot. Never the
/// booted one.
pub fn choose_target<'a>(
    cfg: &'a Config,
    booted: Option<&str>,
    requested: Option<&str>,
) -> Result<&'a SlotConfig> {
    if let Some(b) = booted {
        cfg.slot(b).map_err(|_| {
            Error::Slot(format!(
                "booted slot {b:?} (from the kernel command line) is not in the configuration"
            ))
        })?;
    }
    let target = match (requested, booted) {
        (Some(r), _) => cfg.slot(r)?,
        (None, Some(b)) => {
            let others: Vec<_> = cfg.slots.iter().filter(|s| s.name != b).collect();
            match others.as_slice() {
                [one] => *one,
                _ => {
                    return Err(Error::Slot(format!(
                        "{} slots besides the booted one: name the target with --slot",
                        others.len()
                    )))
                }
            }
        }
        (None, None) => {
            return Err(Error::Slot(format!(
                "cannot tell the booted slot ({CMDLINE_KEY}= is not on the kernel command line): name the target with --slot"
            )))
        }
    };
    if Some(target.name.as_str()) == booted {
        return Err(Error::Slot(format!(
            "refusing to write slot {:?}: it is the booted slot",
            target.name
        )));
    }
    Ok(target)
}

/// Locate a slot's bytes.
pub fn resolve(cfg: &Config, slot: &SlotConfig) -> Result<SlotDevice> {
    if let Some(dev) = &slot.device {
        let size = device_size(dev)?;
        return Ok(SlotDevice {
            name: slot.name.clone(),
            path: dev.clone(),
            offset: 0,
            size,
        });
    }
    let label = slot
        .partlabel
        .as_deref()
        .expect("config checked device or partlabel");
    let disk = cfg
        .disk
        .as_deref()
        .expect("config checked disk with partlabel");
    let (number, offset, size) = find_partition(disk, label)?;
    // Prefer the kernel's partition node (/dev/vda3, /dev/nvme0n1p3, /dev/loop0p3) so writes
    // go through the same device the system mounts; a disk image file has none.
    for node in partition_node_candidates(disk, number) {
        if node.exists() {
            return Ok(SlotDevice {
                name: slot.name.clone(),
                path: node,
                offset: 0,
                size,
            });
        }
    }
    Ok(SlotDevice {
        name: slot.name.clone(),
        path: disk.to_path_buf(),
        offset,
        size,
    })
}

/// Refuse a target that something else uses. For a block device: mounted anywhere (the
/// running root above all: the kernel command line could be wrong, the mount table cannot),
/// held by device-mapper or md (`holders/` in sysfs), or refused by the kernel for an
/// exclusive open (which catches both, and any other exclusive user). An unreadable mount
/// table is a refusal, not a pass. `mountinfo` is normally `/proc/self/mountinfo`, `sysfs`
/// `/sys`.
pub fn ensure_not_busy(path: &Path, mountinfo: &Path, sysfs: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let meta = std::fs::metadata(path).ctx(|| format!("opening {}", path.display()))?;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let table = std::fs::read_to_string(mountinfo).map_err(|e| {
        Error::Slot(format!(
            "cannot read the mount table {} ({e}): refusing to write {} without it",
            mountinfo.display(),
            path.display()
        ))
    })?;
    if let Some(point) = mounted_at(&table, major, minor) {
        return Err(Error::Slot(format!(
            "refusing to write {}: it is mounted at {point}",
            path.display()
        )));
    }
    let holders = sysfs.join(format!("dev/block/{major}:{minor}/holders"));
    if let Ok(dir) = std::fs::read_dir(&holders) {
        let names: Vec<String> = dir
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !names.is_empty() {
            return Err(Error::Slot(format!(
                "refusing to write {}: it is held by {} (device-mapper or md)",
                path.display(),
                names.join(", ")
            )));
        }
    }
    // The kernel's own answer: an exclusive open fails (EBUSY) on a device that is mounted or
    // claimed, including by holders sysfs does not show.
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Err(Error::Slot(format!(
            "refusing to write {}: the kernel reports it busy (mounted or in use)",
            path.display()
        ))),
        Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
    }
}

/// What a slot's bytes are, after resolving links: the same block device (by device number),
/// or the same file (by device and inode), and the byte range in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    object: (bool, u64, u64),
    start: u64,
    len: u64,
}

impl Identity {
    pub fn of(dev: &SlotDevice, sysfs: &Path) -> Result<Identity> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::metadata(&dev.path).ctx(|| format!("opening {}", dev.path.display()))?;
        if m.file_type().is_block_device() {
            let rdev = m.rdev();
            let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
            // A partition is the byte range of its whole disk: /dev/vda3 and /dev/vda overlap.
            let sys = sysfs.join(format!("dev/block/{maj}:{min}"));
            let start = std::fs::read_to_string(sys.join("start"))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok());
            let parent = std::fs::read_to_string(sys.join("../dev"))
                .ok()
                .and_then(|t| {
                    t.trim()
                        .split_once(':')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                })
                .and_then(|(a, b)| Some(nix::sys::stat::makedev(a.parse().ok()?, b.parse().ok()?)));
            if let (Some(sectors), Some(disk)) = (start, parent) {
                return Ok(Identity {
                    object: (true, disk, 0),
                    start: sectors * 512 + dev.offset,
                    len: dev.size,
                });
            }
            return Ok(Identity {
                object: (true, rdev, 0),
                start: dev.offset,
                len: dev.size,
            });
        }
        Ok(Identity {
            object: (false, m.dev(), m.ino()),
            start: dev.offset,
            len: dev.size,
        })
    }

    /// The two share at least one byte.
    pub fn overlaps(&self, other: &Identity) -> bool {
        self.object == other.object
            && self.start < other.start + other.len.max(1)
            && other.start < self.start + self.len.max(1)
    }
}

/// Resolve every slot and refuse any two that share bytes (a symlink or hard link to the same
/// device, a partition and its whole disk, overlapping ranges of one image file). Returns the
/// devices in configuration order.
pub fn resolve_all_distinct(cfg: &Config) -> Result<Vec<SlotDevice>> {
    let devs = cfg
        .slots
        .iter()
        .map(|s| resolve(cfg, s))
        .collect::<Result<Vec<_>>>()?;
    let ids = devs
        .iter()
        .map(|d| Identity::of(d, &cfg.sysfs))
        .collect::<Result<Vec<_>>>()?;
    for (i, a) in ids.iter().enumerate() {
        for (j, b) in ids[..i].iter().enumerate() {
            if a.overlaps(b) {
                return Err(Error::Slot(format!(
                    "slots {:?} ({}) and {:?} ({}) resolve to the same device: refusing to write either",
                    devs[j].name,
                    devs[j].path.display(),
                    devs[i].name,
                    devs[i].path.display()
                )));
            }
        }
    }
    Ok(devs)
}

/// Where device `major:minor` is mounted, from a mountinfo table.
fn mounted_at(table: &str, major: u64, minor: u64) -> Option<String> {
    let want = format!("{major}:{minor}");
    table.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let dev = f.nth(2)?;
        let point = f.nth(1)?;
        (dev == want).then(|| point.to_string())
    })
}

/// Size of a block device or regular file.
pub fn device_size(path: &Path) -> Result<u64> {
    let mut f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::End(0))
        .ctx(|| format!("finding the size of {}", path.display()))
}

/// Find a GPT partition by name: (partition number, byte offset, byte length).
pub fn find_partition(disk: &Path, label: &str) -> Result<(u32, u64, u64)> {
    let gpt = gpt::GptConfig::new()
        .writable(false)
        .open(disk)
        .map_err(|e| Error::Slot(format!("reading GPT of {}: {e}", disk.display())))?;
    let lb = *gpt.logical_block_size();
    let mut found = gpt.partitions().iter().filter(|(_, p)| p.name == label);
    let (num, part) = found.next().ok_or_else(|| {
        Error::Slot(format!(
            "no partition named {label:?} on {}",
            disk.display()
        ))
    })?;
    if found.next().is_some() {
        return Err(Error::Slot(format!(
            "more than one partition named {label:?} on {}",
            disk.display()
        )));
    }
    let start = part
        .bytes_start(lb)
        .map_err(|e| Error::Slot(format!("partition {label:?}: {e}")))?;
    let len = part
        .bytes_len(lb)
        .map_err(|e| Error::Slot(format!("partition {label:?}: {e}")))?;
    Ok((*num, start, len))
}

fn partition_node_candidates(disk: &Path, number: u32) -> Vec<PathBuf> {
    let d = disk.to_string_lossy();
    if !d.starts_with("/dev/") {
        return Vec::new();
    }
    // The kernel inserts "p" when the disk name ends in a digit (loop0p3, nvme0n1p3).
    let sep = if d.ends_with(|c: char| c.is_ascii_digit()) {
        "p"
    } else {
        ""
    };
    vec![PathBuf::from(format!("{d}{sep}{number}"))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_mount_table_refuses_a_block_device() {
        // /dev/null is a character device: not a slot, nothing to check.
        assert!(ensure_not_busy(
            Path::new("/dev/null"),
            Path::new("/nonexistent"),
            Path::new("/sys")
        )
        .is_ok());
    }

    #[test]
    fn hard_link_to_a_slot_file_is_the_same_slot() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![0u8; 4096]).unwrap();
        std::fs::hard_link(&a, dir.path().join("b")).unwrap();
        std::os::unix::fs::symlink(&a, dir.path().join("c")).unwrap();
        let dev = |p: &str, offset: u64, size: u64| SlotDevice {
            name: p.into(),
            path: dir.path().join(p),
            offset,
            size,
        };
        let sys = Path::new("/sys");
        let ia = Identity::of(&dev("a", 0, 4096), sys).unwrap();
        assert!(ia.overlaps(&Identity::of(&dev("b", 0, 4096), sys).unwrap()));
        assert!(ia.overlaps(&Identity::of(&dev("c", 0, 4096), sys).unwrap()));
        // Disjoint ranges of one image file are distinct slots.
        let lo = Identity::of(&dev("a", 0, 2048), sys).unwrap();
        let hi = Identity::of(&dev("a", 2048, 2048), sys).unwrap();
        assert!(!lo.overlaps(&hi));
    }

    #[test]
    fn mounted_device_is_found_in_mountinfo() {
        let t = "22 1 254:3 / / ro,relatime shared:1 - ext4 /dev/vda3 ro\n\
                 23 22 254:5 / /var rw shared:2 - ext4 /dev/vda5 rw\n";
        assert_eq!(mounted_at(t, 254, 3).as_deref(), Some("/"));
        assert_eq!(mounted_at(t, 254, 5).as_deref(), Some("/var"));
        assert_eq!(mounted_at(t, 254, 4), None);
    }

    #[test]
    fn cmdline_slot_is_found() {
        assert_eq!(
            parse_cmdline("BOOT_IMAGE=/vmlinuz root=PARTLABEL=rootfs-B edgeota.slot=B ro\n"),
            Some("B".into())
        );
        assert_eq!(parse_cmdline("edgeota.slot= ro"), None);
        assert_eq!(parse_cmdline("edgeota.slotx=A"), None);
        assert_eq!(
            parse_cmdline("edgeota.slot=A edgeota.slot=B"),
            Some("B".into())
        );
    }
}
