//! Decoding one chunk. Its compressed bytes are not covered by any signature until they are
//! decompressed and hashed, so the decoder sees hostile input: before any decoding, the bytes
//! must be exactly one zstd frame of the current format (RFC 8878), without a dictionary,
//! declaring the content size the signed manifest gives. Legacy (v0.1–v0.7) and skippable
//! frames never reach the decoder, and the workspace builds zstd without its legacy decoders.

use super::{limits, Chunk};

/// Magic number of a current-format zstd frame.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Check the frame header of `compressed` against the chunk's declared length. Returns a
/// reason for the refusal.
pub fn check_frame(compressed: &[u8], len: u32) -> Result<(), String> {
    let b = compressed;
    if b.len() < 5 || u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != ZSTD_MAGIC {
        return Err("is not a zstd frame of the current format".into());
    }
    let fhd = b[4];
    let fcs_flag = fhd >> 6;
    let single_segment = fhd & 0x20 != 0;
    if fhd & 0x08 != 0 {
        return Err("has a zstd frame header with the reserved bit set".into());
    }
    if fhd & 0x03 != 0 {
        return Err("needs a zstd dictionary (bundles never use one)".into());
    }
    let mut at = 5 + usize::from(!single_segment);
    let fcs_len = match (fcs_flag, single_segment) {
        (0, false) => return Err("is a zstd frame without a declared content size".into()),
        (0, true) => 1,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    let field = b
        .get(at..at + fcs_len)
        .ok_or("ends inside its zstd frame header")?;
    at += fcs_len;
    let mut size = field
        .iter()
        .rev()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    if fcs_len == 2 {
        size += 256;
    }
    if size != u64::from(len) {
        return Err(format!(
            "declares {size} bytes of content, the manifest says {len}"
        ));
    }
    debug_assert!(at <= b.len());
    match zstd::zstd_safe::find_frame_compressed_size(b) {
        Ok(n) if n == b.len() => Ok(()),
        Ok(n) => Err(format!(
            "has {} bytes after its zstd frame",
            b.len().saturating_sub(n)
        )),
        Err(_) => Err("is not a complete zstd frame".into()),
    }
}

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
