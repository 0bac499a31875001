//! Slots found by GPT partition name, on a disk image file (partition offsets) and on a real
//! loop device with kernel partition nodes (`losetup` + `partx -a`; needs root, which CI has).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use edge_ota::bootloader::SlotBootState;

const MIB: u64 = 1 << 20;

/// A GPT disk image with the named partitions, written with the gpt crate.
fn make_gpt_disk(path: &Path, parts: &[(&str, u64)]) {
    let total: u64 = parts.iter().map(|p| p.1).sum::<u64>() + 2 * MIB;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(total).unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(total / 512 - 1).unwrap_or(0xFFFF_FFFF),
    );
    mbr.overwrite_lba0(&mut f).unwrap();
    let mut disk = gpt::GptConfig::new().writable(true).create(path).unwrap();
    for (name, size) in parts {
        disk.add_partition(name, *size, gpt::partition_types::LINUX_FS, 0, Some(2048))
            .unwrap();
    }
    disk.write().unwrap();
}

/// Point the fixture's slots at partitions of `disk` instead of slot files.
fn use_partlabels(dev: &Device, disk: &Path) {
    let cfg = std::fs::read_to_string(&dev.config).unwrap();
    let d = dev.dir.path().display().to_string();
    let cfg = cfg
        .replace(
            &format!("device = \"{d}/slotA\""),
            "partlabel = \"rootfs-A\"",
        )
        .replace(
            &format!("device = \"{d}/slotB\""),
            "partlabel = \"rootfs-B\"",
        )
        .replace(
            "[trust]",
            &format!("disk = \"{}\"\n[trust]", disk.display()),
        );
    std::fs::write(&dev.config, cfg).unwrap();
}

#[test]
fn slots_by_partlabel_on_a_disk_image_file() {
    let dev = Device::new(16);
    let disk = dev.path("disk.img");
    make_gpt_disk(
        &disk,
        &[("rootfs-A", 2 * MIB), ("rootfs-B", 2 * MIB), ("data", MIB)],
    );
    use_partlabels(&dev, &disk);
    let before = std::fs::read(&disk).unwrap();
    let b = dev.bundle("b", &BundleOpts::default());
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_, off_b, _) = edge_ota::slot::find_partition(&disk, "rootfs-B").unwrap();
    let after = std::fs::read(&disk).unwrap();
    let image = image_bytes(300_000, 1);
    let off_b = off_b as usize;
    assert_eq!(&after[off_b..off_b + image.len()], &image[..]);
    // Everything outside B's payload, including the running slot A and the GPT, unchanged.
    assert_eq!(&after[..off_b], &before[..off_b]);
    assert_eq!(
        &after[off_b + image.len()..],
        &before[off_b + image.len()..]
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
}

/// A loop device with partition nodes, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn attach(image: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(image)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // Some kernels do not scan partitions on loop devices; partx adds the nodes.
        let _ = Command::new("partx").arg("-a").arg(&dev).output();
        let lo = Loop { dev };
        for _ in 0..50 {
            if lo.part(1).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(
            lo.part(1).exists(),
            "no partition node {} after partx -a",
            lo.part(1).display()
        );
        Some(lo)
    }
    fn part(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.dev.display()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("partx").arg("-d").arg(&self.dev).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

#[test]
fn slots_by_partlabel_on_a_loop_device() {
    if !edge_ota::testing::is_root() {
        edge_ota::testing::skip(
            "slots_by_partlabel_on_a_loop_device",
            "needs root for losetup (CI runs as root)",
        );
        return;
    }
    let dev = Device::new(16);
    let disk = dev.path("disk.img");
    make_gpt_disk(&disk, &[("rootfs-A", 2 * MIB), ("rootfs-B", 2 * MIB)]);
    let lo = Loop::attach(&disk).expect("attaching a loop device as root");
    use_partlabels(&dev, &lo.dev);
    let a_before = blake3::hash(&std::fs::read(lo.part(1)).unwrap());
    let b = dev.bundle("b", &BundleOpts::default());
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let image = image_bytes(300_000, 1);
    let part_b = std::fs::read(lo.part(2)).unwrap();
    assert_eq!(&part_b[..image.len()], &image[..]);
    assert_eq!(
        a_before,
        blake3::hash(&std::fs::read(lo.part(1)).unwrap()),
        "running slot touched"
    );
    // The booted slot's device is refused outright.
    let o = dev.run(&["apply", "--no-reboot", "--slot", "A", b.to_str().unwrap()]);
    assert_refused(&o, 21, "it is the booted slot");
}

#[test]
fn mounted_target_is_refused_even_if_the_cmdline_says_otherwise() {
    if !edge_ota::testing::is_root() {
        edge_ota::testing::skip(
            "mounted_target_is_refused_even_if_the_cmdline_says_otherwise",
            "needs root for losetup and mount",
        );
        return;
    }
    let dev = Device::new(16);
    let disk = dev.path("disk.img");
    make_gpt_disk(&disk, &[("rootfs-A", 4 * MIB), ("rootfs-B", 4 * MIB)]);
    let lo = Loop::attach(&disk).expect("attaching a loop device as root");
    let mkfs = Command::new("mke2fs")
        .args(["-q", "-t", "ext4"])
        .arg(lo.part(2))
        .status()
        .unwrap();
    assert!(mkfs.success());
    let mnt = dev.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Command::new("mount")
        .args(["-o", "ro"])
        .arg(lo.part(2))
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(m.success(), "mounting the test partition");
    use_partlabels(&dev, &lo.dev);
    let b = dev.bundle("b", &BundleOpts::default());
    let hash = || blake3::hash(&std::fs::read(lo.part(2)).unwrap());
    let before = hash();
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    let after = hash();
    let _ = Command::new("umount").arg(&mnt).status();
    assert_refused(&o, 21, &format!("is mounted at {}", mnt.display()));
    assert_eq!(before, after, "mounted partition written");
}

#[test]
fn file_payloads_larger_than_free_space_are_refused_before_writing() {
    if !edge_ota::testing::is_root() {
        edge_ota::testing::skip(
            "file_payloads_larger_than_free_space_are_refused_before_writing",
            "needs root to mount a small tmpfs",
        );
        return;
    }
    let dev = Device::new(1 << 20);
    let files = dev.path("filesB");
    std::fs::create_dir(&files).unwrap();
    let m = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(&files)
        .status()
        .unwrap();
    assert!(m.success(), "mounting a 512 KiB tmpfs");
    let b = dev.bundle(
        "b",
        &BundleOpts {
            payloads: vec![
                (
                    edge_ota::bundle::PayloadKind::Image,
                    "rootfs",
                    image_bytes(200_000, 2),
                ),
                (
                    edge_ota::bundle::PayloadKind::ContainerImages,
                    "k8s.tar",
                    image_bytes(900_000, 3),
                ),
            ],
            ..Default::default()
        },
    );
    let before = dev.snapshot();
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    let left = std::fs::read_dir(&files).unwrap().count();
    let _ = Command::new("umount").arg(&files).status();
    assert_refused(&o, 20, "(900000 bytes) is larger than the free space in");
    assert!(
        before == dev.snapshot(),
        "refused bundle changed the device"
    );
    assert_eq!(left, 0, "something was written to the full filesystem");
}

/// Two 2 MiB partitions on a loop device, the fixture's slots on them, and a bundle.
fn loop_device_with_slots() -> Option<(Device, Loop, std::path::PathBuf)> {
    if !edge_ota::testing::is_root() {
        edge_ota::testing::skip("loop-device slot tests", "needs root for losetup");
        return None;
    }
    let dev = Device::new(16);
    let disk = dev.path("disk.img");
    make_gpt_disk(&disk, &[("rootfs-A", 2 * MIB), ("rootfs-B", 2 * MIB)]);
    let lo = Loop::attach(&disk).expect("attaching a loop device as root");
    use_partlabels(&dev, &lo.dev);
    let b = dev.bundle("b", &BundleOpts::default());
    Some((dev, lo, b))
}

#[test]
fn target_held_open_exclusively_is_refused_by_the_kernel() {
    use std::os::unix::fs::OpenOptionsExt;
    let Some((dev, lo, b)) = loop_device_with_slots() else {
        return;
    };
    // Someone else (a mount, device-mapper, another tool) holds the exclusive claim.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(lo.part(2))
        .unwrap();
    let before = blake3::hash(&std::fs::read(lo.part(2)).unwrap());
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    drop(holder);
    assert_refused(&o, 21, "the kernel reports it busy");
    assert_eq!(before, blake3::hash(&std::fs::read(lo.part(2)).unwrap()));
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn target_with_a_device_mapper_holder_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, lo, b)) = loop_device_with_slots() else {
        return;
    };
    // The host kernel has no device-mapper: a sysfs tree that shows one (config `sysfs`).
    let rdev = std::fs::metadata(lo.part(2)).unwrap().rdev();
    let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = dev.path("sys");
    std::fs::create_dir_all(sys.join(format!("dev/block/{maj}:{min}/holders/dm-0"))).unwrap();
    dev.edit_config(|c| {
        c.replace(
            "[trust]",
            &format!("sysfs = \"{}\"\n[trust]", sys.display()),
        )
    });
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_refused(&o, 21, "is held by dm-0");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn unreadable_mount_table_refuses_a_block_device_target() {
    let Some((dev, _lo, b)) = loop_device_with_slots() else {
        return;
    };
    dev.edit_config(|c| c.replace("[trust]", "mountinfo = \"/nonexistent/mountinfo\"\n[trust]"));
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_refused(&o, 21, "cannot read the mount table /nonexistent/mountinfo");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn partition_and_its_whole_disk_are_the_same_slot() {
    let Some((dev, lo, b)) = loop_device_with_slots() else {
        return;
    };
    // Slot B configured as the whole loop device: it contains slot A's partition.
    dev.edit_config(|c| {
        c.replacen(
            "partlabel = \"rootfs-B\"",
            &format!("device = \"{}\"", lo.dev.display()),
            1,
        )
    });
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_refused(&o, 21, "resolve to the same device");
}
