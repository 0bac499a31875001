//! A delta's literal frame, decompressed against its prefix (base ranges read from the running
//! slot): `decode_with_prefix` (src/bundle/decode.rs). The frame bytes are not covered by any
//! signature until the chunks rebuilt from them are hashed.
//!
//! Input: 4 bytes (little endian) the declared length, reduced to 0..=MAX_DELTA_FRAME; 4 bytes
//! the prefix length, reduced to what follows (and MAX_PREFIX); the prefix; the frame. Seeds
//! are real delta frames with their real prefixes.
//!
//! Checked: no panic; at most the declared length (plus an error message) allocated on the
//! Rust heap; accepted output has exactly the declared length; `check_frame`'s refusals are
//! kept.
#![no_main]

#[path = "../common/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{peak_of, Counting, ALLOWANCE};
use edge_ota::bundle::decode::decode_with_prefix;
use edge_ota::bundle::frame::check_frame;
use edge_ota::bundle::limits;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Some((plen, rest)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let len = u32::from_le_bytes(*len) % (limits::MAX_DELTA_FRAME + 1);
    let max_prefix = (rest.len() as u64).min(limits::MAX_PREFIX);
    let plen = (u64::from(u32::from_le_bytes(*plen)) % (max_prefix + 1)) as usize;
    let (prefix, compressed) = rest.split_at(plen);

    let (res, peak) = peak_of(|| decode_with_prefix(compressed, len, prefix));
    assert!(
        peak <= len as usize + ALLOWANCE,
        "decode_with_prefix allocated {peak} bytes for a frame declared {len} bytes"
    );
    match (check_frame(compressed, len), res) {
        (Err(a), Err(b)) => assert_eq!(a, b, "refused for check_frame's reason"),
        (Err(a), Ok(_)) => panic!("check_frame refused ({a}) but decode_with_prefix accepted"),
        (Ok(()), Ok(out)) => assert_eq!(out.len(), len as usize),
        (Ok(()), Err(_)) => {}
    }
});
