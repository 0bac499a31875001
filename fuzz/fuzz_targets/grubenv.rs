//! GRUB's environment block (src/bootloader/grubenv.rs): `parse` and `parse_copy` (edge-ota's
//! redundant copies with EDGE_SEQ/EDGE_END), and round trips through `serialize` and
//! `serialize_copy`.
//!
//! The raw input is parsed as it is (any length); then it is made a block (cut to 1024 bytes,
//! or padded with '#', as GRUB pads) so short mutations still reach the line parser.
#![no_main]

use std::path::Path;

use edge_ota::bootloader::grubenv::{
    parse, parse_copy, serialize, serialize_copy, Copy, BLOCK_SIZE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/grubenv");
    let _ = parse(data, path);

    let mut block = data[..data.len().min(BLOCK_SIZE)].to_vec();
    block.resize(BLOCK_SIZE, b'#');

    // Anything parse accepts and serialize can store re-parses to the same variables.
    if let Ok(vars) = parse(&block, path) {
        if let Ok(again) = serialize(&vars) {
            assert_eq!(again.len(), BLOCK_SIZE);
            assert_eq!(
                parse(&again, path).expect("serialize's block parses"),
                vars,
                "parse/serialize round trip"
            );
        }
    }

    // A valid copy re-serialized with its sequence number reads back the same.
    if let Copy::Valid { seq, vars } = parse_copy(&block, path) {
        if let Ok(again) = serialize_copy(&vars, seq) {
            assert_eq!(again.len(), BLOCK_SIZE);
            assert_eq!(
                parse_copy(&again, path),
                Copy::Valid { seq, vars },
                "parse_copy/serialize_copy round trip"
            );
        }
    }
});
