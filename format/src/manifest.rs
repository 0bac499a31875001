//! Format types (version 1, see docs/bundle-format.md): the fixed header, the signed
//! manifest with its payloads and chunk tables, and the structural checks made on a verified
//! manifest before anything in it is used.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// First 8 bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"EDGE-OTA";
/// Format version written in the header and the manifest.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;

/// Hard limits: every length read from a bundle is checked against these before it is used,
/// so hostile input cannot make the device allocate or loop without bound.
pub mod limits {
    /// Largest manifest accepted (a 64 GiB image with 64 KiB chunks needs about 120 MiB; we
    /// refuse more than this rather than hold it all in memory on a small device).
    pub const MAX_MANIFEST: u64 = 32 << 20;
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
    pub manifest_len: u64,
    pub signatures_len: u64,
    pub payload_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        // 12..16: flags, zero in version 1.
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
        if version != FORMAT_VERSION {
            return Err(Error::Malformed(format!(
                "unsupported format version {version} (this edge-ota reads {FORMAT_VERSION})"
            )));
        }
        if b[12..16] != [0; 4] || b[40..64] != [0; 24] {
            return Err(Error::Malformed("nonzero reserved header bytes".into()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let h = Header {
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

/// One chunk: where its compressed bytes are and what they must decompress to.
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
    pub chunks: Vec<Chunk>,
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
        if self.format != FORMAT_VERSION {
            return Err(Error::Malformed(format!(
                "manifest format {} (expected {FORMAT_VERSION})",
                self.format
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
            let mut size = 0u64;
            for (i, c) in p.chunks.iter().enumerate() {
                if c.len == 0 || c.len > limits::MAX_CHUNK {
                    return Err(Error::Limit(format!(
                        "payload {:?} chunk {i}: length {} (limit {})",
                        p.name,
                        c.len,
                        limits::MAX_CHUNK
                    )));
                }
                if c.clen == 0 || c.clen > limits::MAX_CHUNK_COMPRESSED {
                    return Err(Error::Limit(format!(
                        "payload {:?} chunk {i}: compressed length {} (limit {})",
                        p.name,
                        c.clen,
                        limits::MAX_CHUNK_COMPRESSED
                    )));
                }
                if c.offset != next_offset {
                    return Err(Error::Malformed(format!(
                        "payload {:?} chunk {i}: offset {} (expected {next_offset})",
                        p.name, c.offset
                    )));
                }
                next_offset += u64::from(c.clen);
                size += u64::from(c.len);
            }
            if size != p.size {
                return Err(Error::Malformed(format!(
                    "payload {:?}: chunks add up to {size} bytes, manifest says {}",
                    p.name, p.size
                )));
            }
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
    let p = std::path::Path::new(s);
    let ok = !s.contains('\0')
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
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
            format: FORMAT_VERSION,
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
                chunks: vec![Chunk {
                    offset: 0,
                    clen: 10,
                    len: 100,
                    hash: Digest([0; 32]),
                }],
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
            chunks: vec![Chunk {
                offset,
                clen: 1,
                len: 1,
                hash: Digest([0; 32]),
            }],
        };
        m.payloads.push(file("a", "etc/x", 10));
        m.payloads.push(file("b", "etc/x", 11));
        m.payload_len = 12;
        let h = Header {
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
            manifest_len: u64::MAX,
            signatures_len: 0,
            payload_len: 0,
        };
        assert!(matches!(Header::decode(&h.encode()), Err(Error::Limit(_))));
    }

    #[test]
    fn target_path_escape_is_refused() {
        for bad in ["../etc/passwd", "/etc/passwd", "a/../../b", "./x"] {
            assert!(check_relative_path(bad).is_err(), "{bad}");
        }
        assert!(check_relative_path("boot/vmlinuz").is_ok());
    }
}
