//! Reading a VM's disk image from the host between boots: partitions by GPT name, the GRUB
//! environment block, slot contents.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use edge_ota::bootloader::grubenv;

/// Bytes of the partition named `label`.
pub fn partition(disk: &Path, label: &str) -> Vec<u8> {
    let (_, off, len) = edge_ota::slot::find_partition(disk, label).unwrap();
    let mut f = std::fs::File::open(disk).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v).unwrap();
    v
}

/// blake3 of a partition, to compare slots across boots cheaply.
pub fn partition_hash(disk: &Path, label: &str) -> String {
    blake3::hash(&partition(disk, label)).to_hex().to_string()
}

/// Where the image builder put things (`<disk>.layout.json`), for reading a disk offline.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub grubenv_offset: u64,
    pub grubenv2_offset: u64,
}

impl Layout {
    pub fn read(layout_json: &Path) -> Layout {
        let text = std::fs::read_to_string(layout_json)
            .unwrap_or_else(|e| panic!("reading {}: {e}", layout_json.display()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        Layout {
            grubenv_offset: v["grubenv_offset"].as_u64().expect("grubenv_offset"),
            grubenv2_offset: v["grubenv2_offset"].as_u64().expect("grubenv2_offset"),
        }
    }
}

/// The two grubenv copies of a disk image, raw.
pub fn grubenv_copies(disk: &Path, layout: &Layout) -> [Vec<u8>; 2] {
    let mut f = std::fs::File::open(disk).unwrap();
    [layout.grubenv_offset, layout.grubenv2_offset].map(|off| {
        let mut b = vec![0u8; grubenv::BLOCK_SIZE];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut b).unwrap();
        b
    })
}

/// The boot state GRUB will use (the current one of the two copies), parsed by edge-ota's
/// own strict parser: no valid copy fails the test. Also asserts both copies agree, as they
/// must after any completed write.
pub fn grubenv(disk: &Path, layout: &Layout) -> BTreeMap<String, String> {
    let copies = grubenv_copies(disk, layout).map(|b| grubenv::parse_copy(&b, disk));
    let cur = grubenv::GrubEnvPair::current(&copies).expect("a valid grubenv copy");
    assert_eq!(copies[0], copies[1], "grubenv copies differ: {copies:?}");
    match &copies[cur] {
        grubenv::Copy::Valid { vars, .. } => vars.clone(),
        _ => unreachable!(),
    }
}

/// Write `bytes` as the file `path` (absolute inside that filesystem, its directory existing)
/// on the ext4 partition named `label`, with the VM stopped: e2fsprogs' debugfs edits a copy
/// of the partition, which is then put back, so no mount and no loop device is needed.
pub fn write_ext4_file(disk: &Path, label: &str, path: &str, bytes: &[u8]) {
    use std::io::Write;
    let (_, off, len) = edge_ota::slot::find_partition(disk, label).unwrap();
    let dir = tempfile_dir(disk);
    let (fs, src) = (dir.join("fs.img"), dir.join("file"));
    std::fs::write(&fs, partition(disk, label)).unwrap();
    std::fs::write(&src, bytes).unwrap();
    let debugfs = edge_ota::testing::find_tool("debugfs").expect("debugfs (e2fsprogs)");
    // `rm` first: debugfs `write` refuses an existing file (an error here is "not found").
    for cmd in [
        format!("rm {path}"),
        format!("write {} {path}", src.display()),
    ] {
        let out = std::process::Command::new(&debugfs)
            .args(["-w", "-R", &cmd])
            .arg(&fs)
            .output()
            .unwrap();
        assert!(out.status.success(), "debugfs {cmd}: {out:?}");
    }
    let check = std::process::Command::new(&debugfs)
        .args(["-R", &format!("cat {path}")])
        .arg(&fs)
        .output()
        .unwrap();
    assert_eq!(
        check.stdout, bytes,
        "debugfs did not write {path} on {label}"
    );
    let written = std::fs::read(&fs).unwrap();
    assert_eq!(written.len() as u64, len);
    let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&written).unwrap();
    f.sync_all().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scratch directory beside `disk` (same filesystem, cleaned by the caller).
fn tempfile_dir(disk: &Path) -> std::path::PathBuf {
    let dir = disk.with_extension("edit");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
