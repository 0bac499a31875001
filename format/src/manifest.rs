//! Format types (docs/bundle-format.md): the fixed header, the signed manifest with its
//! payloads, chunk tables and delta variants, and the structural checks made on a verified
//! manifest before anything in it is used.
//!
//! Version 2 (written): payloads are cut on a fixed grid of large chunks, each one zstd frame
//! (all-zero chunks take no bytes), and an image payload may carry deltas: recipes that
//! rebuild it from a named earlier image (copy a block, zeros, or take it from a literal
//! stream compressed against ranges of that image). Version 1 (still read): content-defined
//! chunks, each its own frame.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// First 8 bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"EDGE-OTA";
/// Format version written in the header and the manifest.
pub const FORMAT_VERSION: u32 = 2;
/// The first version, still read.
pub const FORMAT_V1: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;

/// Hard limits: every length read from a bundle is checked against these before it is used,
/// so hostile input cannot make the device allocate or loop without bound.
pub mod limits {
    /// Largest manifest accepted as stored (a 64 GiB image with 64 KiB chunks needs about
    /// 120 MiB in version 1; we refuse more than this rather than hold it all in memory on a
    /// small device).
    pub const MAX_MANIFEST: u64 = 32 << 20;
    /// Largest manifest once decompressed (version 2 stores it zstd-compressed).
    pub const MAX_MANIFEST_JSON: u64 = 64 << 20;
    /// Largest signatures block.
    pub const MAX_SIGNATURES: u64 = 64 << 10;
    /// Most signatures in one bundle.
    pub const MAX_SIGNATURE_COUNT: usize = 32;
    /// Largest uncompressed chunk.
    pub const MAX_CHUNK: u32 = 4 << 20;
    /// Largest compressed chunk (zstd's worst case for MAX_CHUNK is a little above it).
    pub const MAX_CHUNK_COMPRESSED: u32 = MAX_CHUNK + (64 << 10);
    /// Most chunks across all payloads.
    pub const MAX_CHUNKS: usize = 1 << 21;
    /// Most payloads in one bundle.
    pub const MAX_PAYLOADS: usize = 64;
    /// Largest single payload.
    pub const MAX_PAYLOAD_SIZE: u64 = 1 << 40;
    /// Longest name, target or compatible string.
    pub const MAX_NAME: usize = 255;
    /// Deltas per payload.
    pub const MAX_DELTAS: usize = 8;
    /// Runs in one delta recipe.
    pub const MAX_RUNS: usize = 1 << 22;
    /// Largest literal frame of a delta, uncompressed.
    pub const MAX_DELTA_FRAME: u32 = 8 << 20;
    /// Largest prefix (base ranges read into memory) of one literal frame.
    pub const MAX_PREFIX: u64 = 16 << 20;
    /// Base ranges in one prefix.
    pub const MAX_PREFIX_RANGES: usize = 4096;
    /// Images one container-images payload may list.
    pub const MAX_IMAGES: usize = 256;
}

/// A 32-byte blake3 digest, hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out)
            .map_err(|e| serde::de::Error::custom(format!("bad blake3 digest: {e}")))?;
        Ok(Digest(out))
    }
}

/// The fixed header. Not signed itself: every field is either checked for consistency with the
/// signed manifest or must be zero, so a flipped header bit is always refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version (1 or 2).
    pub version: u32,
    pub manifest_len: u64,
    pub signatures_len: u64,
    pub payload_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        // 12..16: flags, zero.
        b[16..24].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.signatures_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.payload_len.to_le_bytes());
        // 40..64: reserved, zero.
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        if b[0..8] != MAGIC {
            return Err(Error::Malformed(
                "not an edge-ota bundle (bad magic)".into(),
            ));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if !(FORMAT_V1..=FORMAT_VERSION).contains(&version) {
            return Err(Error::Malformed(format!(
                "unsupported format version {version} (this edge-ota reads {FORMAT_V1} to {FORMAT_VERSION})"
            )));
        }
        if b[12..16] != [0; 4] || b[40..64] != [0; 24] {
            return Err(Error::Malformed("nonzero reserved header bytes".into()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let h = Header {
            version,
            manifest_len: u64_at(16),
            signatures_len: u64_at(24),
            payload_len: u64_at(32),
        };
        if h.manifest_len == 0 || h.manifest_len > limits::MAX_MANIFEST {
            return Err(Error::Limit(format!(
                "manifest length {} (limit {})",
                h.manifest_len,
                limits::MAX_MANIFEST
            )));
        }
        if h.signatures_len > limits::MAX_SIGNATURES {
            return Err(Error::Limit(format!(
                "signatures length {} (limit {})",
                h.signatures_len,
                limits::MAX_SIGNATURES
            )));
        }
        let max_payload = limits::MAX_PAYLOAD_SIZE * limits::MAX_PAYLOADS as u64;
        if h.payload_len > max_payload {
            return Err(Error::Limit(format!("payload length {}", h.payload_len)));
        }
        Ok(h)
    }

    /// Offset of the first chunk in the bundle.
    pub fn payload_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.manifest_len + self.signatures_len
    }

    /// Total bundle size implied by the header.
    pub fn total_len(&self) -> u64 {
        self.payload_offset() + self.payload_len
    }
}

/// What a payload is and therefore where it goes in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadKind {
    /// A raw filesystem image written to the slot's block device named by `target`.
    Image,
    /// Kernel or boot files, written as a file `target` in the slot's `boot/` directory.
    Kernel,
    /// A container image archive (OCI/docker tar) for the slot's image store.
    ContainerImages,
    /// A plain file for the slot's `files/` directory.
    File,
}

impl PayloadKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            PayloadKind::Image => "image",
            PayloadKind::Kernel => "kernel",
            PayloadKind::ContainerImages => "container-images",
            PayloadKind::File => "file",
        }
    }
}

/// One chunk: where its compressed bytes are and what they must decompress to. In version 2 a
/// chunk with no compressed bytes (`clen` 0) is all zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// Offset of the compressed bytes from the start of the payload area.
    #[serde(rename = "o")]
    pub offset: u64,
    /// Compressed length.
    #[serde(rename = "c")]
    pub clen: u32,
    /// Uncompressed length.
    #[serde(rename = "l")]
    pub len: u32,
    /// blake3 of the uncompressed bytes.
    #[serde(rename = "h")]
    pub hash: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub name: String,
    pub kind: PayloadKind,
    pub target: String,
    /// Uncompressed size.
    pub size: u64,
    /// blake3 of the whole uncompressed payload.
    pub blake3: Digest,
    /// Version 2: every chunk but the last is exactly this long (the last is at most), so
    /// chunk i starts at byte i × chunk_size of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
    pub chunks: Vec<Chunk>,
    /// Version 2, image payloads: ways to rebuild this payload from an earlier image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<Delta>,
    /// Container-images payloads: the images the archive holds, which the device checks after
    /// importing it into containerd (absent in bundles made before this field existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ContainerImage>,
}

/// An image a container-images archive holds: the name containerd gives it on import and the
/// digest the device compares once it is imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerImage {
    /// The full reference (`registry.local/edge/hello:1`), as `ctr images ls` lists it.
    pub name: String,
    /// `sha256:<64 hex>`, of what `digest_of` says.
    pub digest: String,
    #[serde(default, skip_serializing_if = "DigestOf::is_manifest")]
    pub digest_of: DigestOf,
}

/// Which object of an image [`ContainerImage::digest`] identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestOf {
    /// The manifest (or index) the name points to (OCI archives): containerd keeps it as the
    /// image's target, so it is what `ctr images ls` shows.
    #[default]
    Manifest,
    /// The image configuration (docker archives): containerd writes a manifest of its own for
    /// those on import, and only the configuration, which names every layer by its digest,
    /// comes through unchanged.
    Config,
}

impl DigestOf {
    pub fn is_manifest(&self) -> bool {
        *self == DigestOf::Manifest
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            DigestOf::Manifest => "manifest",
            DigestOf::Config => "config",
        }
    }
}

impl ContainerImage {
    /// An image name the device can pass to `ctr` as one argument and that containerd
    /// accepts: a reference (`host[:port]/path[:tag][@digest]`), never an option.
    pub fn check_name(name: &str) -> std::result::Result<(), String> {
        let ok = !name.is_empty()
            && name.len() <= limits::MAX_NAME
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
        if ok {
            Ok(())
        } else {
            Err(format!("invalid image name {name:?}"))
        }
    }

    /// `sha256:` and 64 lowercase hex digits: the only digest containerd shows here.
    pub fn check_digest(digest: &str) -> std::result::Result<(), String> {
        let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(())
        } else {
            Err(format!("invalid image digest {digest:?} (sha256:<64 hex>)"))
        }
    }
}

impl Payload {
    /// Where chunk `i` starts in the uncompressed payload.
    pub fn chunk_start(&self, i: usize) -> u64 {
        match self.chunk_size {
            Some(cs) => i as u64 * u64::from(cs),
            None => self.chunks[..i].iter().map(|c| u64::from(c.len)).sum(),
        }
    }

    /// Compressed bytes of the full chunks.
    pub fn compressed_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.clen)).sum()
    }
}

/// The identity of an image: a slot holding exactly these bytes at its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageId {
    pub size: u64,
    pub blake3: Digest,
}

/// How to rebuild a payload from an earlier image (`base`), block by block: copy a block of
/// the base, write zeros, or take the next block of the literal stream. The literal stream
/// is stored in frames, each compressed against a prefix made of ranges of the base (the
/// data the new blocks most resemble), and each covering whole chunks of the payload, so
/// every chunk can be rebuilt, and checked against its signed hash, on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub base: ImageId,
    /// The release the base image is (for messages and plans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<String>,
    /// Block size of the recipe (divides the chunk size).
    pub block: u32,
    /// The recipe, in payload order: `[0, n, b]` copy n blocks from base block b on,
    /// `[1, n]` n zero blocks, `[2, n]` n blocks from the literal stream.
    pub runs: Vec<Run>,
    pub frames: Vec<DeltaFrame>,
}

/// One run of a delta recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Copy { count: u32, from: u64 },
    Zero { count: u32 },
    Literal { count: u32 },
}

impl Run {
    pub fn count(&self) -> u32 {
        match *self {
            Run::Copy { count, .. } | Run::Zero { count } | Run::Literal { count } => count,
        }
    }
}

impl Serialize for Run {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match *self {
            Run::Copy { count, from } => (0u8, count, from).serialize(s),
            Run::Zero { count } => (1u8, count).serialize(s),
            Run::Literal { count } => (2u8, count).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Run {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v: Vec<u64> = Vec::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("bad delta run {v:?}"));
        let count = |x: u64| u32::try_from(x).map_err(|_| bad());
        match v.as_slice() {
            [0, n, b] => Ok(Run::Copy {
                count: count(*n)?,
                from: *b,
            }),
            [1, n] => Ok(Run::Zero { count: count(*n)? }),
            [2, n] => Ok(Run::Literal { count: count(*n)? }),
            _ => Err(bad()),
        }
    }
}

/// A frame of a delta's literal stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaFrame {
    /// Offset of the compressed bytes from the start of the payload area.
    #[serde(rename = "o")]
    pub offset: u64,
    #[serde(rename = "c")]
    pub clen: u32,
    /// Uncompressed length: the literal blocks of the chunks it covers.
    #[serde(rename = "l")]
    pub len: u32,
    /// The payload chunks whose literal blocks it holds: `[first, end)`.
    pub chunks: [u32; 2],
    /// Base byte ranges `[offset, length]`, read in order and concatenated: the zstd prefix.
    pub prefix: Vec<[u64; 2]>,
}

impl DeltaFrame {
    /// Saturating: lengths in a hostile manifest may sum past `u64::MAX` (found by the
    /// `manifest` fuzz target); a saturated sum is over every limit.
    pub fn prefix_len(&self) -> u64 {
        self.prefix.iter().fold(0u64, |a, r| a.saturating_add(r[1]))
    }
}

/// The signed description of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub compatible: String,
    pub version: semver::Version,
    pub security_version: u64,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Expiry, unix seconds: devices refuse the bundle after it (freeze attacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// Total bytes of chunk data; must equal the header's.
    pub payload_len: u64,
    pub payloads: Vec<Payload>,
}

impl Manifest {
    /// Structural checks, done after the signature is verified and before anything is used:
    /// limits, chunk table contiguity, sizes adding up, safe names.
    pub fn validate(&self, header: &Header) -> Result<()> {
        if self.format != header.version {
            return Err(Error::Malformed(format!(
                "manifest format {} does not match the header's version {}",
                self.format, header.version
            )));
        }
        if self.payload_len != header.payload_len {
            return Err(Error::Malformed(format!(
                "header payload length {} does not match the manifest's {}",
                header.payload_len, self.payload_len
            )));
        }
        check_name("compatible", &self.compatible)?;
        if self.payloads.is_empty() {
            return Err(Error::Malformed("no payloads".into()));
        }
        if self.payloads.len() > limits::MAX_PAYLOADS {
            return Err(Error::Limit(format!(
                "{} payloads (limit {})",
                self.payloads.len(),
                limits::MAX_PAYLOADS
            )));
        }
        let total_chunks: usize = self.payloads.iter().map(|p| p.chunks.len()).sum();
        if total_chunks > limits::MAX_CHUNKS {
            return Err(Error::Limit(format!(
                "{total_chunks} chunks (limit {})",
                limits::MAX_CHUNKS
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut image_names = std::collections::BTreeSet::new();
        let mut next_offset = 0u64;
        for p in &self.payloads {
            check_name("payload name", &p.name)?;
            check_name("payload target", &p.target)?;
            if !names.insert(p.name.as_str()) {
                return Err(Error::Malformed(format!(
                    "duplicate payload name {:?}",
                    p.name
                )));
            }
            if p.kind != PayloadKind::Image {
                check_relative_path(&p.target)?;
            } else if p.size == 0 {
                // An empty image would make a slot "installed" without defining its content.
                return Err(Error::Malformed(format!(
                    "image payload {:?} is empty",
                    p.name
                )));
            }
            if p.size > limits::MAX_PAYLOAD_SIZE {
                return Err(Error::Limit(format!(
                    "payload {:?} size {} (limit {})",
                    p.name,
                    p.size,
                    limits::MAX_PAYLOAD_SIZE
                )));
            }
            let size = if self.format == FORMAT_V1 {
                check_chunks_v1(p, &mut next_offset)?
            } else {
                check_chunks_v2(p, &mut next_offset)?
            };
            if size != p.size {
                return Err(Error::Malformed(format!(
                    "payload {:?}: chunks add up to {size} bytes, manifest says {}",
                    p.name, p.size
                )));
            }
            if p.deltas.len() > limits::MAX_DELTAS {
                return Err(Error::Limit(format!(
                    "payload {:?}: {} deltas (limit {})",
                    p.name,
                    p.deltas.len(),
                    limits::MAX_DELTAS
                )));
            }
            for d in &p.deltas {
                check_delta(p, d, &mut next_offset)?;
            }
            check_images(p, &mut image_names)?;
        }
        check_targets_distinct(&self.payloads)?;
        if next_offset != self.payload_len {
            return Err(Error::Malformed(format!(
                "chunks end at {next_offset}, payload length is {}",
                self.payload_len
            )));
        }
        Ok(())
    }

    /// blake3 of the exact signed manifest bytes: identifies a bundle in state and logs.
    pub fn id(manifest_bytes: &[u8]) -> Digest {
        Digest::of(manifest_bytes)
    }
}

fn check_chunk_lengths(p: &Payload, i: usize, c: &Chunk, zero_ok: bool) -> Result<()> {
    if c.len == 0 || c.len > limits::MAX_CHUNK {
        return Err(Error::Limit(format!(
            "payload {:?} chunk {i}: length {} (limit {})",
            p.name,
            c.len,
            limits::MAX_CHUNK
        )));
    }
    if (c.clen == 0 && !zero_ok) || c.clen > limits::MAX_CHUNK_COMPRESSED {
        return Err(Error::Limit(format!(
            "payload {:?} chunk {i}: compressed length {} (limit {})",
            p.name,
            c.clen,
            limits::MAX_CHUNK_COMPRESSED
        )));
    }
    Ok(())
}

fn check_offset(what: &str, offset: u64, next_offset: &mut u64, clen: u32) -> Result<()> {
    if offset != *next_offset {
        return Err(Error::Malformed(format!(
            "{what}: offset {offset} (expected {next_offset})"
        )));
    }
    *next_offset += u64::from(clen);
    Ok(())
}

/// Version 1: content-defined chunks, each its own frame, contiguous. Returns their size.
fn check_chunks_v1(p: &Payload, next_offset: &mut u64) -> Result<u64> {
    if p.chunk_size.is_some() || !p.deltas.is_empty() {
        return Err(Error::Malformed(format!(
            "payload {:?}: chunk_size and deltas do not exist in format 1",
            p.name
        )));
    }
    let mut size = 0u64;
    for (i, c) in p.chunks.iter().enumerate() {
        check_chunk_lengths(p, i, c, false)?;
        check_offset(
            &format!("payload {:?} chunk {i}", p.name),
            c.offset,
            next_offset,
            c.clen,
        )?;
        size += u64::from(c.len);
    }
    Ok(size)
}

/// Version 2: a fixed grid of chunks (the last may be shorter); zero chunks take no bytes.
fn check_chunks_v2(p: &Payload, next_offset: &mut u64) -> Result<u64> {
    let cs = p
        .chunk_size
        .ok_or_else(|| Error::Malformed(format!("payload {:?}: no chunk_size", p.name)))?;
    if !(4096..=limits::MAX_CHUNK).contains(&cs) || cs % 4096 != 0 {
        return Err(Error::Limit(format!(
            "payload {:?}: chunk_size {cs} (a multiple of 4096 up to {})",
            p.name,
            limits::MAX_CHUNK
        )));
    }
    let want = p.size.div_ceil(u64::from(cs));
    if p.chunks.len() as u64 != want {
        return Err(Error::Malformed(format!(
            "payload {:?}: {} chunks, {want} expected for {} bytes",
            p.name,
            p.chunks.len(),
            p.size
        )));
    }
    let mut size = 0u64;
    for (i, c) in p.chunks.iter().enumerate() {
        check_chunk_lengths(p, i, c, true)?;
        let expected = (p.size - i as u64 * u64::from(cs)).min(u64::from(cs));
        if u64::from(c.len) != expected {
            return Err(Error::Malformed(format!(
                "payload {:?} chunk {i}: length {} off the grid of {cs}",
                p.name, c.len
            )));
        }
        check_offset(
            &format!("payload {:?} chunk {i}", p.name),
            c.offset,
            next_offset,
            c.clen,
        )?;
        size += u64::from(c.len);
    }
    Ok(size)
}

/// A delta must rebuild exactly the payload: its runs cover every block once, copies stay
/// inside the base, and its literal frames hold exactly the literal blocks of the chunks they
/// claim, with prefixes inside the base and within the memory limits.
fn check_delta(p: &Payload, d: &Delta, next_offset: &mut u64) -> Result<()> {
    let bad = |what: String| Error::Malformed(format!("payload {:?} delta: {what}", p.name));
    let cs = u64::from(p.chunk_size.unwrap_or(0));
    let block = u64::from(d.block);
    if p.kind != PayloadKind::Image {
        return Err(bad("deltas exist only for images".into()));
    }
    if block < 512 || !block.is_power_of_two() || cs % block != 0 || !p.size.is_multiple_of(block) {
        return Err(bad(format!(
            "block {block} must be a power of two dividing the chunk size and the payload size"
        )));
    }
    if d.runs.len() > limits::MAX_RUNS {
        return Err(Error::Limit(format!(
            "payload {:?} delta: {} runs (limit {})",
            p.name,
            d.runs.len(),
            limits::MAX_RUNS
        )));
    }
    let base_blocks = d.base.size / block;
    let per_chunk = cs / block;
    let mut literal_in_chunk = vec![0u64; p.chunks.len()];
    let mut at = 0u64;
    for r in &d.runs {
        let n = u64::from(r.count());
        if n == 0 {
            return Err(bad("a run of 0 blocks".into()));
        }
        if let Run::Copy { from, .. } = *r {
            if from.checked_add(n).is_none_or(|end| end > base_blocks) {
                return Err(bad(format!(
                    "copies base blocks {from}..{} of {base_blocks}",
                    from.saturating_add(n)
                )));
            }
        }
        if at + n > p.size / block {
            return Err(bad("runs cover more than the payload".into()));
        }
        if let Run::Literal { .. } = r {
            // Count literal blocks per chunk without walking them one by one.
            let mut b = at;
            while b < at + n {
                let chunk = b / per_chunk;
                let end = ((chunk + 1) * per_chunk).min(at + n);
                literal_in_chunk[chunk as usize] += end - b;
                b = end;
            }
        }
        at += n;
    }
    if at != p.size / block {
        return Err(bad(format!(
            "runs cover {at} blocks, the payload has {}",
            p.size / block
        )));
    }
    let mut covered = 0usize;
    for (k, f) in d.frames.iter().enumerate() {
        let [first, end] = f.chunks.map(|c| c as usize);
        if first < covered || end <= first || end > p.chunks.len() {
            return Err(bad(format!(
                "frame {k} covers chunks {first}..{end} out of order"
            )));
        }
        if literal_in_chunk[covered..first].iter().any(|&n| n > 0) {
            return Err(bad(format!(
                "literal blocks before frame {k} are in no frame"
            )));
        }
        let lit: u64 = literal_in_chunk[first..end].iter().sum();
        if lit == 0 || u64::from(f.len) != lit * block || f.len > limits::MAX_DELTA_FRAME {
            return Err(bad(format!(
                "frame {k}: length {} for {lit} literal blocks (limit {})",
                f.len,
                limits::MAX_DELTA_FRAME
            )));
        }
        if f.clen == 0 || f.clen > limits::MAX_DELTA_FRAME + (64 << 10) {
            return Err(Error::Limit(format!(
                "payload {:?} delta frame {k}: compressed length {}",
                p.name, f.clen
            )));
        }
        if f.prefix.len() > limits::MAX_PREFIX_RANGES || f.prefix_len() > limits::MAX_PREFIX {
            return Err(Error::Limit(format!(
                "payload {:?} delta frame {k}: prefix of {} bytes in {} ranges",
                p.name,
                f.prefix_len(),
                f.prefix.len()
            )));
        }
        for &[off, len] in &f.prefix {
            if len == 0 || off.checked_add(len).is_none_or(|e| e > d.base.size) {
                return Err(bad(format!(
                    "frame {k}: prefix range {off}+{len} outside the base"
                )));
            }
        }
        check_offset(
            &format!("payload {:?} delta frame {k}", p.name),
            f.offset,
            next_offset,
            f.clen,
        )?;
        covered = end;
    }
    if literal_in_chunk[covered..].iter().any(|&n| n > 0) {
        return Err(bad("literal blocks after the last frame".into()));
    }
    Ok(())
}

/// Image records: only on container-images payloads, within the limit, well-formed, and each
/// name once in the whole bundle (two archives cannot both decide what a name points to).
fn check_images<'a>(p: &'a Payload, seen: &mut std::collections::BTreeSet<&'a str>) -> Result<()> {
    if p.images.is_empty() {
        return Ok(());
    }
    let bad = |what: String| Error::Malformed(format!("payload {:?}: {what}", p.name));
    if p.kind != PayloadKind::ContainerImages {
        return Err(bad("only container-images payloads list images".into()));
    }
    if p.images.len() > limits::MAX_IMAGES {
        return Err(Error::Limit(format!(
            "payload {:?}: {} images (limit {})",
            p.name,
            p.images.len(),
            limits::MAX_IMAGES
        )));
    }
    for i in &p.images {
        ContainerImage::check_name(&i.name).map_err(bad)?;
        ContainerImage::check_digest(&i.digest).map_err(bad)?;
        if !seen.insert(i.name.as_str()) {
            return Err(bad(format!("image {:?} is listed twice", i.name)));
        }
    }
    Ok(())
}

/// Two payloads of the same kind must not write the same place, nor one inside the other
/// (`a` as a file and `a/b` beneath it): the second would silently replace or break the first.
fn check_targets_distinct(payloads: &[Payload]) -> Result<()> {
    for (i, a) in payloads.iter().enumerate() {
        for b in &payloads[..i] {
            if a.kind != b.kind {
                continue;
            }
            let inside = |x: &str, y: &str| {
                x.strip_prefix(y)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            };
            if inside(&a.target, &b.target) || inside(&b.target, &a.target) {
                return Err(Error::Malformed(format!(
                    "payloads {:?} and {:?} both write {} target {:?}",
                    b.name,
                    a.name,
                    a.kind.as_str(),
                    if a.target.len() < b.target.len() {
                        &a.target
                    } else {
                        &b.target
                    }
                )));
            }
        }
    }
    Ok(())
}

fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > limits::MAX_NAME || s.chars().any(|c| c.is_control()) {
        return Err(Error::Malformed(format!("invalid {what} {s:?}")));
    }
    Ok(())
}

/// File payload targets are relative paths inside a slot directory: no escaping it.
fn check_relative_path(s: &str) -> Result<()> {
    // Checked on the string, not through `Path::components`, which drops `.` and empty
    // components: `etc/./x` and `etc//x` would pass as plain and alias `etc/x`.
    let ok = !s.contains('\0') && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if !ok {
        return Err(Error::Malformed(format!(
            "payload target {s:?} is not a plain relative path"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            version: FORMAT_V1,
            manifest_len: 100,
            signatures_len: 20,
            payload_len: 1 << 30,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.payload_offset(), 184);
    }

    #[test]
    fn header_bit_flip_in_a_constant_field_is_refused() {
        let h = Header {
            version: FORMAT_V1,
            manifest_len: 100,
            signatures_len: 20,
            payload_len: 4096,
        };
        let enc = h.encode();
        // Magic, version, flags and the reserved bytes: every flip is refused outright.
        let constant = (0..16).chain(40..HEADER_LEN);
        for byte in constant {
            for bit in 0..8 {
                let mut b = enc;
                b[byte] ^= 1 << bit;
                assert!(
                    matches!(Header::decode(&b), Err(Error::Malformed(_))),
                    "byte {byte} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn header_bit_flip_in_a_length_is_caught_by_the_manifest() {
        // A flipped length decodes (it is only a number) but no longer matches what the
        // signed manifest says: validate() refuses it.
        let m = sample_manifest();
        let good = Header {
            version: FORMAT_V1,
            manifest_len: 100,
            signatures_len: 20,
            payload_len: m.payload_len,
        };
        assert!(m.validate(&good).is_ok());
        for bit in 0..64 {
            let mut b = good.encode();
            b[32 + bit / 8] ^= 1 << (bit % 8);
            match Header::decode(&b) {
                Err(Error::Limit(_)) => {}
                Ok(h) => assert!(
                    matches!(m.validate(&h), Err(Error::Malformed(_))),
                    "payload length bit {bit} accepted"
                ),
                Err(e) => panic!("payload length bit {bit}: unexpected {e}"),
            }
        }
    }

    fn sample_manifest() -> Manifest {
        Manifest {
            format: FORMAT_V1,
            compatible: "c".into(),
            version: "1.0.0".parse().unwrap(),
            security_version: 1,
            created: 0,
            expires: None,
            payload_len: 10,
            payloads: vec![Payload {
                name: "rootfs".into(),
                kind: PayloadKind::Image,
                target: "rootfs".into(),
                size: 100,
                blake3: Digest([0; 32]),
                chunk_size: None,
                chunks: vec![Chunk {
                    offset: 0,
                    clen: 10,
                    len: 100,
                    hash: Digest([0; 32]),
                }],
                deltas: vec![],
                images: vec![],
            }],
        }
    }

    #[test]
    fn two_payloads_writing_the_same_target_are_refused() {
        let mut m = sample_manifest();
        let file = |name: &str, target: &str, offset: u64| Payload {
            name: name.into(),
            kind: PayloadKind::File,
            target: target.into(),
            size: 1,
            blake3: Digest([0; 32]),
            chunk_size: None,
            chunks: vec![Chunk {
                offset,
                clen: 1,
                len: 1,
                hash: Digest([0; 32]),
            }],
            deltas: vec![],
            images: vec![],
        };
        m.payloads.push(file("a", "etc/x", 10));
        m.payloads.push(file("b", "etc/x", 11));
        m.payload_len = 12;
        let h = Header {
            version: FORMAT_V1,
            manifest_len: 1,
            signatures_len: 0,
            payload_len: 12,
        };
        let e = m.validate(&h).unwrap_err().to_string();
        assert!(e.contains("both write file target \"etc/x\""), "{e}");
        m.payloads[2].target = "etc/x/y".into();
        assert!(m.validate(&h).is_err(), "a file beneath another file");
        m.payloads[2].target = "etc/xy".into();
        assert!(m.validate(&h).is_ok());
    }

    #[test]
    fn empty_image_payload_is_refused() {
        let mut m = sample_manifest();
        m.payloads[0].size = 0;
        m.payloads[0].chunks.clear();
        m.payload_len = 0;
        let h = Header {
            version: FORMAT_V1,
            manifest_len: 1,
            signatures_len: 0,
            payload_len: 0,
        };
        let e = m.validate(&h).unwrap_err().to_string();
        assert!(e.contains("image payload \"rootfs\" is empty"), "{e}");
    }

    #[test]
    fn unknown_fields_in_payloads_and_chunks_are_refused() {
        let m = sample_manifest();
        let mut v = serde_json::to_value(&m).unwrap();
        v["payloads"][0]["extra"] = 1.into();
        assert!(
            serde_json::from_value::<Manifest>(v).is_err(),
            "payload field"
        );
        let mut v = serde_json::to_value(&m).unwrap();
        v["payloads"][0]["chunks"][0]["z"] = 1.into();
        assert!(
            serde_json::from_value::<Manifest>(v).is_err(),
            "chunk field"
        );
    }

    #[test]
    fn hostile_manifest_length_is_refused() {
        let h = Header {
            version: FORMAT_V1,
            manifest_len: u64::MAX,
            signatures_len: 0,
            payload_len: 0,
        };
        assert!(matches!(Header::decode(&h.encode()), Err(Error::Limit(_))));
    }

    #[test]
    fn target_path_escape_is_refused() {
        for bad in ["../etc/passwd", "/etc/passwd", "a/../../b", "./x", "", "x/"] {
            assert!(check_relative_path(bad).is_err(), "{bad}");
        }
        assert!(check_relative_path("boot/vmlinuz").is_ok());
    }

    /// Every manifest the fuzzers found a bug with (`fuzz/regressions/*-json`) is refused,
    /// without a panic or an overflow.
    #[test]
    fn fuzz_regression_manifests_are_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if !path.to_string_lossy().ends_with("-json") {
                continue;
            }
            // The fuzz target's input: a mode byte, then the JSON.
            let bytes = std::fs::read(&path).unwrap();
            let m: Manifest = serde_json::from_slice(&bytes[1..]).unwrap();
            let header = Header {
                version: m.format,
                manifest_len: 1,
                signatures_len: 0,
                payload_len: m.payload_len,
            };
            assert!(m.validate(&header).is_err(), "{}", path.display());
            n += 1;
        }
        assert!(n >= 3, "only {n} regression manifests in {}", dir.display());
    }

    /// Found by the `manifest` fuzz target (fuzz/regressions/manifest-target-alias-*): two
    /// payloads writing the same file through differently spelled paths.
    #[test]
    fn target_aliasing_another_through_dot_or_double_slash_is_refused() {
        for alias in ["etc/./x", "etc//x", "etc/x/."] {
            assert!(check_relative_path(alias).is_err(), "{alias}");
        }
    }
}
