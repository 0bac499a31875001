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

/// Refuse a block device that is mounted anywhere (the running root above all): the kernel
/// command line could be wrong, the mount table cannot. `mountinfo` is normally
/// `/proc/self/mountinfo`.
pub fn ensure_not_mounted(path: &Path, mountinfo: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ctx(|| format!("opening {}", path.display()))?;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let table = match std::fs::read_to_string(mountinfo) {
        Ok(t) => t,
        // No mount table (not Linux, or no /proc): nothing more to check.
        Err(_) => return Ok(()),
    };
    if let Some(point) = mounted_at(&table, major, minor) {
        return Err(Error::Slot(format!(
            "refusing to write {}: it is mounted at {point}",
            path.display()
        )));
    }
    Ok(())
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
