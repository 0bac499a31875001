//! The U-Boot environment (src/bootloader/uboot_env.rs): `parse` of one copy in the single
//! and the redundant layout, `parse_fw_env_config` (and `UBootEnv::new`'s checks of its
//! locations) on text input.
//!
//! The raw input is parsed as it is (its CRC almost never matches); then again with the CRC
//! recomputed for each layout, so mutations reach the entry parser. Whatever parses must
//! serialize (same size, same flag) and re-parse to the same variables.
#![no_main]

use std::path::Path;

use edge_ota::bootloader::uboot_env::{
    parse, parse_fw_env_config, serialize, UBootEnv, REDUNDANT_HEADER, SINGLE_HEADER,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/uboot.env");
    for redundant in [false, true] {
        check(data, redundant, path);
        let hdr = if redundant {
            REDUNDANT_HEADER
        } else {
            SINGLE_HEADER
        };
        if data.len() > hdr {
            let mut fixed = data.to_vec();
            let crc = crc32fast::hash(&fixed[hdr..]);
            fixed[..4].copy_from_slice(&crc.to_le_bytes());
            check(&fixed, redundant, path);
        }
    }

    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(locations) = parse_fw_env_config(text) {
            assert!(matches!(locations.len(), 1 | 2));
            assert!(locations.iter().all(|l| l.size > 0));
            let _ = UBootEnv::new(locations);
        }
    }
});

fn check(image: &[u8], redundant: bool, path: &Path) {
    let Ok(env) = parse(image, redundant, path) else {
        return;
    };
    assert_eq!(env.flag.is_some(), redundant);
    // Entries of a parsed image always fit again in the same size: serialize must not refuse.
    let again = serialize(&env.vars, image.len(), env.flag).expect("parsed variables serialize");
    assert_eq!(again.len(), image.len());
    assert_eq!(
        parse(&again, redundant, path).expect("serialize's image parses"),
        env,
        "parse/serialize round trip"
    );
}
