//! `disk`: the GPT disk image (bios, boot, rootfs-A, rootfs-B, data) with GRUB for BIOS.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use gpt::partition_types::{Type, BIOS, LINUX_FS};
use serde::Serialize;

use super::ext4::{self, FsOpts};
use super::grub;
use super::tree::{Source, Tree};
use super::util::{self, command, invalid, note, run_text, tool, IoContext, Result, Stamp};

pub struct DiskOpts {
    pub slot_a: PathBuf,
    pub slot_b: Option<PathBuf>,
    pub out: PathBuf,
    pub slot_mib: u64,
    pub data_mib: u64,
    pub boot_mib: u64,
    pub grub_cfg: Option<PathBuf>,
    pub grub_dir: PathBuf,
    pub seed: String,
    pub force: bool,
    /// Version and security version of slot A's image, recorded in the data partition's
    /// state file as a provisioned, confirmed slot (so `status` knows what runs).
    pub slot_a_version: Option<String>,
    pub slot_a_security_version: u64,
}

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

/// One partition: its GPT number is its index + 1 (the order GRUB's grub.cfg relies on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: &'static str,
    pub start: u64,
    pub size: u64,
}

impl Part {
    pub fn first_lba(&self) -> u64 {
        self.start / SECTOR
    }
    pub fn last_lba(&self) -> u64 {
        (self.start + self.size) / SECTOR - 1
    }
}

/// Partitions 1 MiB-aligned from 1 MiB; the disk ends 1 MiB after the last one (room for the
/// backup GPT).
pub fn layout(boot_mib: u64, slot_mib: u64, data_mib: u64) -> (Vec<Part>, u64) {
    let sizes = [
        ("bios", 1),
        ("boot", boot_mib),
        ("rootfs-A", slot_mib),
        ("rootfs-B", slot_mib),
        ("data", data_mib),
    ];
    let mut at = MIB;
    let mut parts = Vec::new();
    for (name, mib) in sizes {
        parts.push(Part {
            name,
            start: at,
            size: mib * MIB,
        });
        at += mib * MIB;
    }
    (parts, at + MIB)
}

/// A GUID as the `gpt` crate wants it. gpt 4.1 takes `uuid::Uuid` without re-exporting the
/// crate; its partition-type parser is the public way to make one from text.
fn guid(s: &str) -> Result<Type> {
    Type::from_str(s).map_err(|e| invalid(format!("GUID {s}: {e}")))
}

fn write_gpt(file: fs::File, name: &Path, parts: &[Part], seed: &str) -> Result<fs::File> {
    let gerr = |e: gpt::GptError| invalid(format!("writing GPT to {}: {e}", name.display()));
    let disk_guid = guid(&util::uuid_from_seed(seed, "disk"))?.guid;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(file, Some(disk_guid))
        .map_err(gerr)?;
    let mut map = BTreeMap::new();
    for (i, p) in parts.iter().enumerate() {
        map.insert(
            i as u32 + 1,
            gpt::partition::Partition {
                part_type_guid: if p.name == "bios" { BIOS } else { LINUX_FS },
                part_guid: guid(&util::uuid_from_seed(seed, &format!("part:{}", p.name)))?.guid,
                first_lba: p.first_lba(),
                last_lba: p.last_lba(),
                flags: 0,
                name: p.name.to_string(),
            },
        );
    }
    disk.update_partitions(map).map_err(gerr)?;
    disk.write().map_err(gerr)
}

/// The provisioned boot state, both copies (sequence 1): A good, B bad, the floor at A's
/// security version. Built by the updater's own code, so the two can never disagree.
fn initial_env(floor: u64) -> Result<Vec<u8>> {
    use edge_ota::bootloader::env::{EnvBootloader, FLOOR};
    use edge_ota::bootloader::file::FileEnv;
    let mut vars = EnvBootloader::<FileEnv>::initial_vars(&["A".into(), "B".into()], "A");
    vars.insert(FLOOR.into(), floor.to_string());
    edge_ota::bootloader::grubenv::serialize_copy(&vars, 1)
        .map_err(|e| invalid(format!("grubenv: {e}")))
}

fn boot_tree(grub_cfg: &str, grub_dir: &Path, floor: u64) -> Result<Tree> {
    let mut t = Tree::new();
    t.file_bytes("grub/grub.cfg", grub_cfg, 0o644)?;
    let env = initial_env(floor)?;
    t.file_bytes("grub/grubenv", env.clone(), 0o644)?;
    t.file_bytes(
        &format!("grub/{}", edge_ota::bootloader::grubenv::SECOND_COPY),
        env,
        0o644,
    )?;
    // All modules, for `insmod` at the GRUB prompt; booting needs only those in core.img.
    let mut names: Vec<String> = fs::read_dir(grub_dir)
        .ctx(|| format!("listing {}", grub_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".mod") || n.ends_with(".lst"))
        .collect();
    names.sort();
    for n in names {
        t.file(
            &format!("grub/i386-pc/{n}"),
            Source::Path(grub_dir.join(&n)),
            0o644,
        )?;
    }
    Ok(t)
}

/// The updater's state file as provisioning leaves it: slot A holds `image` (its size and
/// blake3, so a later kernel-only bundle can prove it intact), confirmed at `epoch`.
fn provisioned_state(o: &DiskOpts, epoch: u64) -> Result<Vec<u8>> {
    use edge_ota::state::{ImageRecord, SlotStatus, State};
    let img = fs::read(&o.slot_a).ctx(|| format!("reading {}", o.slot_a.display()))?;
    let mut st = State {
        min_security_version: o.slot_a_security_version,
        newest_seen: epoch,
        ..State::default()
    };
    let a = st.slot_mut("A");
    a.status = SlotStatus::Installed;
    a.version = o.slot_a_version.clone();
    a.security_version = Some(o.slot_a_security_version);
    a.confirmed_at = Some(epoch);
    a.image = Some(ImageRecord {
        size: img.len() as u64,
        blake3: edge_ota::bundle::Digest::of(&img),
    });
    let mut bytes = serde_json::to_vec_pretty(&st).expect("state serializes");
    bytes.push(b'\n');
    Ok(bytes)
}

fn data_tree(state: Vec<u8>) -> Result<Tree> {
    let mut t = Tree::new();
    t.dir_mode("lib/edge-ota", 0o700)?;
    t.file_bytes("lib/edge-ota/state.json", state, 0o644)?;
    t.dir("lib/containerd-images")?;
    t.dir("log")?;
    t.dir_mode("tmp", 0o1777)?;
    Ok(t)
}

/// `<disk>.layout.json`: where everything is, for test drivers that edit the image offline.
#[derive(Serialize)]
struct LayoutJson<'a> {
    size: u64,
    disk_guid: String,
    boot_fs_uuid: &'a str,
    data_fs_uuid: &'a str,
    /// Absolute byte offsets of the two 1024-byte grubenv copies in the disk image.
    grubenv_offset: u64,
    grubenv2_offset: u64,
    partitions: Vec<PartJson<'a>>,
}

#[derive(Serialize)]
struct PartJson<'a> {
    number: usize,
    name: &'a str,
    start: u64,
    size: u64,
    first_lba: u64,
    last_lba: u64,
    guid: String,
}

pub fn layout_json_path(out: &Path) -> PathBuf {
    util::sibling(out, "layout.json")
}

/// Byte offset of a file's first block inside an ext2/4 image (files here are one extent).
fn file_offset_in_fs(fs_img: &Path, path: &str) -> Result<u64> {
    let text = run_text(
        command(tool("debugfs")?)
            .arg("-R")
            .arg(format!("bmap {path} 0"))
            .arg(fs_img),
    )?;
    let block: u64 = text.trim().parse().map_err(|_| {
        invalid(format!(
            "debugfs bmap {path} {}: unexpected output {text:?}",
            fs_img.display()
        ))
    })?;
    if block == 0 {
        return Err(invalid(format!(
            "{}: {path} has no data block",
            fs_img.display()
        )));
    }
    Ok(block * 4096)
}

fn file_len(p: &Path) -> Result<u64> {
    Ok(fs::metadata(p)
        .ctx(|| format!("reading {}", p.display()))?
        .len())
}

pub fn build(o: &DiskOpts) -> Result<()> {
    if o.boot_mib < 8 || o.slot_mib == 0 || o.data_mib < 8 {
        return Err(invalid(
            "--boot-size and --data-size must be at least 8 MiB, --slot-size at least 1 MiB",
        ));
    }
    let grub_cfg = match &o.grub_cfg {
        Some(p) => fs::read_to_string(p).ctx(|| format!("reading {}", p.display()))?,
        None => grub::GRUB_CFG.to_string(),
    };
    let slots: Vec<(&str, &Path)> = std::iter::once(("rootfs-A", o.slot_a.as_path()))
        .chain(o.slot_b.as_deref().map(|b| ("rootfs-B", b)))
        .collect();
    for (name, img) in &slots {
        let len = file_len(img)?;
        if len > o.slot_mib * MIB {
            return Err(invalid(format!(
                "{}: {} MiB does not fit the {name} slot ({} MiB; raise --slot-size)",
                img.display(),
                len.div_ceil(MIB),
                o.slot_mib
            )));
        }
    }
    let epoch = util::source_date_epoch()?;
    let boot_img_path = o.grub_dir.join("boot.img");

    let mut stamp = Stamp::new("disk");
    stamp
        // Bump when what this step writes changes for the same inputs.
        .add("format", "2")
        .add(
            "slot-a",
            format!("{:?} {}", o.slot_a_version, o.slot_a_security_version),
        )
        .add("grub.cfg", &grub_cfg)
        .add(
            "sizes",
            format!("{} {} {}", o.boot_mib, o.slot_mib, o.data_mib),
        )
        .add("seed", &o.seed)
        .add("epoch", epoch.to_string())
        .add_tree("grub-dir", &o.grub_dir)?;
    for (name, img) in &slots {
        stamp.add_file(name, img)?;
    }
    let digest = stamp.digest();
    let layout_path = layout_json_path(&o.out);
    if !o.force && layout_path.exists() && util::is_fresh(&o.out, &digest)? {
        note(format!("{} is up to date", o.out.display()));
        return Ok(());
    }

    let (parts, total) = layout(o.boot_mib, o.slot_mib, o.data_mib);
    util::ensure_parent(&o.out)?;
    let tmp = util::sibling(&o.out, "tmp");
    let scratch = util::sibling(&o.out, "scratch");
    util::remove_any(&tmp)?;
    util::remove_any(&scratch)?;
    fs::create_dir_all(&scratch).ctx(|| format!("creating {}", scratch.display()))?;

    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .ctx(|| format!("creating {}", tmp.display()))?;
    file.set_len(total)
        .ctx(|| format!("sizing {}", tmp.display()))?;
    let mut file = write_gpt(file, &tmp, &parts, &o.seed)?;
    let part = |name: &str| {
        parts
            .iter()
            .find(|p| p.name == name)
            .expect("known partition")
    };

    // boot: GRUB's configuration, environment and modules on ext2 (no journal GRUB would
    // have to ignore when it rewrites grubenv in place).
    let boot_uuid = util::uuid_from_seed(&o.seed, "fs:boot");
    let boot_fs = scratch.join("boot.ext2");
    ext4::make_image(
        &boot_tree(&grub_cfg, &o.grub_dir, o.slot_a_security_version)?,
        &boot_fs,
        &FsOpts {
            fs_type: "ext2",
            label: "boot",
            uuid: &boot_uuid,
            hash_seed: &util::uuid_from_seed(&o.seed, "fs:boot:hash"),
            epoch,
            size_bytes: part("boot").size,
            journal: false,
            reserved_percent: 0,
        },
        &scratch.join("boot-work"),
    )?;
    util::copy_into_sparse(&boot_fs, &mut file, &tmp, part("boot").start)?;
    let grubenv_offset = part("boot").start + file_offset_in_fs(&boot_fs, "/grub/grubenv")?;
    let grubenv2_offset = part("boot").start
        + file_offset_in_fs(
            &boot_fs,
            &format!("/grub/{}", edge_ota::bootloader::grubenv::SECOND_COPY),
        )?;

    // data: persistent state, journaled.
    let data_uuid = util::uuid_from_seed(&o.seed, "fs:data");
    let data_fs = scratch.join("data.ext4");
    ext4::make_image(
        &data_tree(provisioned_state(o, epoch)?)?,
        &data_fs,
        &FsOpts {
            fs_type: "ext4",
            label: "data",
            uuid: &data_uuid,
            hash_seed: &util::uuid_from_seed(&o.seed, "fs:data:hash"),
            epoch,
            size_bytes: part("data").size,
            journal: true,
            reserved_percent: 0,
        },
        &scratch.join("data-work"),
    )?;
    util::copy_into_sparse(&data_fs, &mut file, &tmp, part("data").start)?;

    for (name, img) in &slots {
        util::copy_into_sparse(img, &mut file, &tmp, part(name).start)?;
    }

    // GRUB: core.img fills the BIOS boot partition, boot.img's code goes into the MBR.
    let bios = part("bios");
    let core_lba = bios.first_lba();
    let mut core = grub::build_core(&o.grub_dir, &boot_uuid, &scratch.join("grub"))?;
    grub::patch_core_img(&mut core, core_lba)?;
    if core.len() as u64 > bios.size {
        return Err(invalid(format!(
            "core.img is {} bytes, larger than the bios partition",
            core.len()
        )));
    }
    file.seek(SeekFrom::Start(bios.start))
        .and_then(|_| file.write_all(&core))
        .ctx(|| format!("writing core.img into {}", tmp.display()))?;

    let boot_img =
        fs::read(&boot_img_path).ctx(|| format!("reading {}", boot_img_path.display()))?;
    let code = grub::patch_boot_img(&boot_img, core_lba)?;
    let mut bootcode = [0u8; 440];
    bootcode.copy_from_slice(&code);
    let sectors = u32::try_from(total / SECTOR - 1).unwrap_or(u32::MAX);
    let mut mbr = gpt::mbr::ProtectiveMBR::with_lb_size(sectors);
    mbr.set_bootcode(bootcode);
    let sig = blake3::hash(format!("mbr:{}", o.seed).as_bytes());
    let mut sig4 = [0u8; 4];
    sig4.copy_from_slice(&sig.as_bytes()[..4]);
    mbr.set_disk_signature(sig4);
    mbr.overwrite_lba0(&mut file)
        .map_err(|e| invalid(format!("writing MBR to {}: {e}", tmp.display())))?;
    file.sync_all()
        .ctx(|| format!("syncing {}", tmp.display()))?;
    drop(file);

    util::remove_any(&scratch)?;
    let lj = LayoutJson {
        size: total,
        disk_guid: util::uuid_from_seed(&o.seed, "disk"),
        boot_fs_uuid: &boot_uuid,
        data_fs_uuid: &data_uuid,
        grubenv_offset,
        grubenv2_offset,
        partitions: parts
            .iter()
            .enumerate()
            .map(|(i, p)| PartJson {
                number: i + 1,
                name: p.name,
                start: p.start,
                size: p.size,
                first_lba: p.first_lba(),
                last_lba: p.last_lba(),
                guid: util::uuid_from_seed(&o.seed, &format!("part:{}", p.name)),
            })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&lj)
        .map_err(|e| invalid(format!("encoding {}: {e}", layout_path.display())))?;
    fs::write(&layout_path, json + "\n").ctx(|| format!("writing {}", layout_path.display()))?;
    util::replace(&tmp, &o.out)?;
    util::write_stamp(&o.out, &digest)?;
    note(format!(
        "disk {} ({} MiB): bios, boot (fs uuid {boot_uuid}), rootfs-A <- {}, rootfs-B{}, data",
        o.out.display(),
        total / MIB,
        o.slot_a.display(),
        match &o.slot_b {
            Some(b) => format!(" <- {}", b.display()),
            None => " (empty)".to_string(),
        }
    ));
    for (i, p) in parts.iter().enumerate() {
        note(format!(
            "  gpt{} {:<9} start {:>5} MiB  size {:>5} MiB  (LBA {}..{})",
            i + 1,
            p.name,
            p.start / MIB,
            p.size / MIB,
            p.first_lba(),
            p.last_lba()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sectors at the end of the disk for the backup GPT (header + 128 entries).
    const BACKUP_GPT_SECTORS: u64 = 33;

    #[test]
    fn default_layout() {
        let (parts, total) = layout(16, 256, 256);
        let names: Vec<_> = parts.iter().map(|p| p.name).collect();
        assert_eq!(names, ["bios", "boot", "rootfs-A", "rootfs-B", "data"]);
        assert_eq!(parts[0].first_lba(), 2048);
        assert_eq!(parts[0].last_lba(), 4095);
        assert_eq!(parts[2].start, 18 * MIB);
        assert_eq!(parts[3].size, parts[2].size);
        assert_eq!(total, 787 * MIB);
        // room for the backup GPT after the last partition
        assert!(parts[4].last_lba() < total / SECTOR - BACKUP_GPT_SECTORS - 1);
    }

    #[test]
    fn gpt_is_deterministic_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (parts, total) = layout(8, 8, 8);
        let mut hashes = Vec::new();
        for n in ["a", "b"] {
            let p = dir.path().join(n);
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            f.set_len(total).unwrap();
            write_gpt(f, &p, &parts, "s").unwrap();
            hashes.push(util::hash_file(&p).unwrap());
        }
        assert_eq!(hashes[0], hashes[1]);
        let d = gpt::GptConfig::new().open(dir.path().join("a")).unwrap();
        let names: Vec<_> = d.partitions().values().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["bios", "boot", "rootfs-A", "rootfs-B", "data"]);
        assert_eq!(d.partitions()[&3].first_lba, parts[2].first_lba());
    }
}
