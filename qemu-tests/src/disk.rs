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
