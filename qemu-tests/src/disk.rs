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

/// The grubenv block inside the `boot` partition (found by its header on a 512-byte
/// boundary, where the filesystem stores the file's first block), parsed by edge-ota's own
/// strict parser: a corrupt block fails the test.
pub fn grubenv(disk: &Path) -> BTreeMap<String, String> {
    let boot = partition(disk, "boot");
    let header = grubenv::HEADER.as_bytes();
    let at = (0..boot.len().saturating_sub(grubenv::BLOCK_SIZE))
        .step_by(512)
        .find(|&o| boot[o..].starts_with(header))
        .expect("grubenv block in the boot partition");
    grubenv::parse(&boot[at..at + grubenv::BLOCK_SIZE], disk).unwrap()
}
