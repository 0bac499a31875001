//! One chunk's compressed bytes, which no signature covers until they are decompressed and
//! hashed: `check_frame` (format/src/frame.rs), `decode_chunk` and `decode_chunk_into`
//! (src/bundle/decode.rs), and `frame::decompress_bounded` (the version 2 manifest's decoder)
//! with the same bound.
//!
//! Input: 4 bytes (little endian) give the declared uncompressed length, reduced to
//! 0..=MAX_CHUNK (4 MiB); the rest is the compressed chunk. Seeds are real frames from bundles.
//!
//! Checked: no panic; `decode_chunk` and `decompress_bounded` never allocate (on the Rust heap)
//! more than the declared length, beyond a small allowance for an error message, and `out`
//! never grows past it; whatever `check_frame` refuses, the decoders refuse for the same
//! reason; the three decoders agree on what they accept and produce.
#![no_main]

#[path = "../common/counting_alloc.rs"]
mod counting_alloc;

use std::cell::RefCell;

use counting_alloc::{peak_of, Counting, ALLOWANCE};
use edge_ota::bundle::decode::{decode_chunk, decode_chunk_into};
use edge_ota::bundle::frame::{check_frame, decompress_bounded};
use edge_ota::bundle::{limits, Chunk, Digest};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Counting = Counting;

thread_local! {
    /// One decompressor reused across chunks, as the installer's workers do.
    static DEC: RefCell<zstd::bulk::Decompressor<'static>> =
        RefCell::new(zstd::bulk::Decompressor::new().unwrap());
}

/// `decode_chunk` into a fresh buffer, checking what it allocated.
fn decode_counted(
    dec: &mut zstd::bulk::Decompressor<'static>,
    chunk: &Chunk,
    compressed: &[u8],
) -> (Result<(), String>, Vec<u8>) {
    let len = chunk.len as usize;
    let ((res, out), peak) = peak_of(|| {
        let mut out = Vec::new();
        let res = decode_chunk(dec, chunk, compressed, &mut out);
        (res, out)
    });
    assert!(
        peak <= len + ALLOWANCE,
        "decode_chunk allocated {peak} bytes for a chunk declared {len} bytes"
    );
    assert!(out.capacity() <= len, "out grew to {}", out.capacity());
    (res, out)
}

fuzz_target!(|data: &[u8]| {
    let Some((len, compressed)) = data.split_first_chunk::<4>() else {
        return;
    };
    let len = u32::from_le_bytes(*len) % (limits::MAX_CHUNK + 1);
    let mut chunk = Chunk {
        offset: 0,
        clen: compressed.len() as u32,
        len,
        hash: Digest([0; 32]),
    };
    let frame = check_frame(compressed, len);

    // The bounded decoder with min = max = len, as for a chunk.
    let (bounded, peak) = peak_of(|| decompress_bounded(compressed, u64::from(len)));
    assert!(
        peak <= len as usize + ALLOWANCE,
        "decompress_bounded allocated {peak} bytes, bound {len}"
    );

    DEC.with_borrow_mut(|dec| {
        let (res, out) = decode_counted(dec, &chunk, compressed);
        match (&frame, &res) {
            (Err(a), Err(b)) => assert_eq!(a, b, "decode_chunk refuses for check_frame's reason"),
            (Err(a), Ok(())) => panic!("check_frame refused ({a}) but decode_chunk accepted"),
            (Ok(()), Ok(())) => unreachable!("blake3 preimage of zeros"),
            (Ok(()), Err(e)) if e == "hash mismatch" => {
                assert_eq!(out.len(), len as usize);
                assert_eq!(
                    bounded.as_deref(),
                    Ok(&out[..]),
                    "decompress_bounded agrees"
                );
                // With the right hash it is accepted, by both decoders, with the same bytes.
                chunk.hash = Digest::of(&out);
                let (again, out2) = decode_counted(dec, &chunk, compressed);
                assert_eq!(again, Ok(()));
                assert_eq!(out2, out);
                let mut buf = vec![0u8; len as usize];
                assert_eq!(decode_chunk_into(dec, &chunk, compressed, &mut buf), Ok(()));
                assert_eq!(buf, out, "decode_chunk_into agrees");
            }
            (Ok(()), Err(_)) => {
                assert!(
                    bounded.is_err(),
                    "decompress_bounded accepted what decode_chunk refused"
                );
                let mut buf = vec![0u8; len as usize];
                assert!(decode_chunk_into(dec, &chunk, compressed, &mut buf).is_err());
            }
        }
        if let Err(a) = &frame {
            // decompress_bounded with min = 0 may accept a shorter declared size; with the
            // same size it refuses for the same reason unless the size was the reason.
            if !a.starts_with("declares ") {
                assert_eq!(bounded.as_ref().err(), Some(a));
            }
        }
    });
});
