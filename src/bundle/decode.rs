//! Decoding one chunk. Its compressed bytes are not covered by any signature until they are
//! decompressed and hashed, so the decoder sees hostile input: before any decoding, the bytes
//! must pass [`check_frame`] (exactly one current-format zstd frame, no dictionary, the
//! declared size the signed manifest gives). The workspace builds zstd without its legacy
//! decoders.

use super::frame::check_frame;
use super::{limits, Chunk};

/// Check, decompress one chunk into `out` and check it against the manifest before it may be
/// used. `out` never grows beyond the chunk's declared length, so a decompression bomb
/// cannot allocate more than [`limits::MAX_CHUNK`].
pub fn decode_chunk(
    dec: &mut zstd::bulk::Decompressor<'_>,
    chunk: &Chunk,
    compressed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), String> {
    debug_assert!(chunk.len <= limits::MAX_CHUNK);
    check_frame(compressed, chunk.len)?;
    out.clear();
    out.reserve_exact(chunk.len as usize);
    let n = dec
        .decompress_to_buffer(compressed, out)
        .map_err(|e| format!("does not decompress ({e})"))?;
    if n != chunk.len as usize {
        return Err(format!(
            "decompresses to {n} bytes, manifest says {}",
            chunk.len
        ));
    }
    if blake3::hash(out).as_bytes() != &chunk.hash.0 {
        return Err("hash mismatch".into());
    }
    Ok(())
}

/// [`decode_chunk`] into a slice of exactly the chunk's length (an aligned write buffer).
pub fn decode_chunk_into(
    dec: &mut zstd::bulk::Decompressor<'_>,
    chunk: &Chunk,
    compressed: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    debug_assert_eq!(out.len(), chunk.len as usize);
    check_frame(compressed, chunk.len)?;
    let n = dec
        .decompress_to_buffer(compressed, out)
        .map_err(|e| format!("does not decompress ({e})"))?;
    if n != chunk.len as usize {
        return Err(format!(
            "decompresses to {n} bytes, manifest says {}",
            chunk.len
        ));
    }
    if blake3::hash(out).as_bytes() != &chunk.hash.0 {
        return Err("hash mismatch".into());
    }
    Ok(())
}

/// Decompress a delta's literal frame (checked first: one frame, its declared length `len`)
/// against `prefix`, the base ranges the builder compressed it with. The result is not
/// covered by a hash itself: the chunks rebuilt from it are checked one by one.
pub fn decode_with_prefix(compressed: &[u8], len: u32, prefix: &[u8]) -> Result<Vec<u8>, String> {
    check_frame(compressed, len)?;
    let mut dctx = zstd::zstd_safe::DCtx::try_create().ok_or("no zstd context")?;
    // The frame's window reaches back over the whole prefix.
    let need = (prefix.len() + len as usize)
        .max(1 << 10)
        .next_power_of_two()
        .trailing_zeros();
    dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(need.max(10)))
        .map_err(|c| format!("zstd: {}", zstd::zstd_safe::get_error_name(c)))?;
    dctx.ref_prefix(prefix)
        .map_err(|c| format!("zstd: {}", zstd::zstd_safe::get_error_name(c)))?;
    let mut out = Vec::with_capacity(len as usize);
    let n = dctx.decompress(&mut out, compressed).map_err(|c| {
        format!(
            "does not decompress ({})",
            zstd::zstd_safe::get_error_name(c)
        )
    })?;
    if n != len as usize {
        return Err(format!("decompresses to {n} bytes, manifest says {len}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Digest;

    fn frame(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).unwrap()
    }

    fn chunk_of(data: &[u8], clen: usize) -> Chunk {
        Chunk {
            offset: 0,
            clen: clen as u32,
            len: data.len() as u32,
            hash: Digest::of(data),
        }
    }

    fn decode(c: &Chunk, z: &[u8]) -> Result<Vec<u8>, String> {
        let mut dec = zstd::bulk::Decompressor::new().unwrap();
        let mut out = Vec::new();
        decode_chunk(&mut dec, c, z, &mut out).map(|()| out)
    }

    #[test]
    fn current_frame_with_its_size_decodes() {
        let data = vec![7u8; 70_000];
        let z = frame(&data);
        assert_eq!(decode(&chunk_of(&data, z.len()), &z).unwrap(), data);
    }

    #[test]
    fn legacy_zstd_frame_is_refused_before_decoding() {
        // v0.7 and v0.5 frame magics: the decoder must never see them.
        for magic in [0xFD2F_B527u32, 0xFD2F_B525] {
            let mut z = magic.to_le_bytes().to_vec();
            z.extend_from_slice(&[0u8; 32]);
            let e = check_frame(&z, 10).unwrap_err();
            assert!(e.contains("not a zstd frame of the current format"), "{e}");
        }
    }

    #[test]
    fn skippable_frame_is_refused() {
        let mut z = 0x184D_2A50u32.to_le_bytes().to_vec();
        z.extend_from_slice(&[4, 0, 0, 0, 1, 2, 3, 4]);
        assert!(check_frame(&z, 4).is_err());
    }

    #[test]
    fn frame_without_content_size_is_refused() {
        let data = vec![1u8; 5000];
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_contentsize(false).unwrap();
        let z = c.compress(&data).unwrap();
        let e = check_frame(&z, 5000).unwrap_err();
        assert!(e.contains("without a declared content size"), "{e}");
    }

    #[test]
    fn frame_declaring_another_size_is_refused() {
        let data = vec![1u8; 5000];
        let z = frame(&data);
        let e = check_frame(&z, 4999).unwrap_err();
        assert!(e.contains("declares 5000 bytes"), "{e}");
    }

    #[test]
    fn trailing_bytes_after_the_frame_are_refused() {
        let data = vec![3u8; 9000];
        let mut z = frame(&data);
        z.extend_from_slice(&frame(b"more"));
        let e = decode(&chunk_of(&data, z.len()), &z).unwrap_err();
        assert!(e.contains("after its zstd frame"), "{e}");
    }

    #[test]
    fn dictionary_frame_is_refused() {
        let data = vec![3u8; 100];
        let mut z = frame(&data);
        z[4] |= 0x01;
        assert!(check_frame(&z, 100).unwrap_err().contains("dictionary"));
    }

    #[test]
    fn wrong_content_is_a_hash_mismatch() {
        let data = vec![9u8; 1000];
        let z = frame(&data);
        let mut c = chunk_of(&data, z.len());
        c.hash = Digest::of(b"other");
        assert_eq!(decode(&c, &z).unwrap_err(), "hash mismatch");
    }
}
