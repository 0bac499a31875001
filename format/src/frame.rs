//! The zstd frames of a bundle (chunks, delta frames, the version 2 manifest) are checked
//! before any decoder sees them: exactly one frame of the current format (RFC 8878), without
//! a dictionary, declaring its content size. Legacy (v0.1-v0.7) and skippable frames never
//! reach a decoder.

/// Magic number of a current-format zstd frame.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Check the frame header of `compressed` against the chunk's declared length. Returns a
/// reason for the refusal.
pub fn check_frame(compressed: &[u8], len: u32) -> Result<(), String> {
    check_frame_size(compressed, u64::from(len), u64::from(len)).map(drop)
}

/// Decompress one checked frame of at most `max` bytes into a buffer of exactly its declared
/// size (so a frame cannot make us allocate more than it declares, nor declare more than
/// `max`).
pub fn decompress_bounded(compressed: &[u8], max: u64) -> Result<Vec<u8>, String> {
    let size = check_frame_size(compressed, 0, max)?;
    let mut out = Vec::with_capacity(size as usize);
    let mut dec = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
    let n = dec
        .decompress_to_buffer(compressed, &mut out)
        .map_err(|e| format!("does not decompress ({e})"))?;
    if n as u64 != size {
        return Err(format!("decompresses to {n} bytes, declared {size}"));
    }
    Ok(out)
}

/// Like [`check_frame`], for a frame whose size is only bounded: returns the declared size,
/// which must be at most `max` (and at least `min`).
pub fn check_frame_size(compressed: &[u8], min: u64, max: u64) -> Result<u64, String> {
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
    if size < min || size > max {
        return Err(if min == max {
            format!("declares {size} bytes of content, the manifest says {max}")
        } else {
            format!("declares {size} bytes of content (limit {max})")
        });
    }
    debug_assert!(at <= b.len());
    match zstd::zstd_safe::find_frame_compressed_size(b) {
        Ok(n) if n == b.len() => Ok(size),
        Ok(n) => Err(format!(
            "has {} bytes after its zstd frame",
            b.len().saturating_sub(n)
        )),
        Err(_) => Err("is not a complete zstd frame".into()),
    }
}
