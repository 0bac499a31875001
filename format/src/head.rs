//! Reading a bundle's head (header, manifest, signatures) from any byte stream (file, pipe,
//! HTTP body), verified before any payload byte is used; and the end-of-stream check.

use std::io::{ErrorKind, Read};

use crate::error::{Error, Result};
use crate::manifest::{Digest, Header, Manifest, HEADER_LEN};
use crate::signature::{Signatures, TrustedKeys};

/// The head of a bundle: everything before the chunk data.
#[derive(Debug, Clone)]
pub struct BundleHead {
    pub header: Header,
    pub manifest_bytes: Vec<u8>,
    /// The signatures block exactly as stored.
    pub signatures_bytes: Vec<u8>,
    pub signatures: Signatures,
}

/// A manifest whose signatures met the threshold and whose structure is valid.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    /// Ids of the trusted keys that signed.
    pub signers: Vec<String>,
    /// blake3 of the signed manifest bytes.
    pub id: Digest,
}

impl BundleHead {
    /// The manifest's JSON: as stored in version 1, zstd-compressed in version 2 (checked
    /// frame, bounded size; the signature covers the compressed bytes, so a verified
    /// manifest is decompressed only after its signature passed).
    pub fn manifest_json(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        if self.header.version == crate::manifest::FORMAT_V1 {
            return Ok(std::borrow::Cow::Borrowed(&self.manifest_bytes));
        }
        crate::frame::decompress_bounded(
            &self.manifest_bytes,
            crate::manifest::limits::MAX_MANIFEST_JSON,
        )
        .map(std::borrow::Cow::Owned)
        .map_err(|e| Error::Malformed(format!("manifest {e}")))
    }

    /// The whole head as stored (header, manifest, signatures): what a staging cache keeps.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.header.encode().to_vec();
        out.extend_from_slice(&self.manifest_bytes);
        out.extend_from_slice(&self.signatures_bytes);
        out
    }
}

/// `read_exact` that reports running out of input as a truncated bundle.
pub fn read_exact_or_truncated<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => Error::Truncated(format!("ends inside {}", what())),
        _ => Error::io(format!("reading bundle ({})", what()), e),
    })
}

impl BundleHead {
    /// Read header, manifest and signatures. Every length is checked against the limits
    /// before anything is allocated.
    pub fn read<R: Read + ?Sized>(r: &mut R) -> Result<Self> {
        let mut hb = [0u8; HEADER_LEN];
        read_exact_or_truncated(r, &mut hb, || "the header".into())?;
        let header = Header::decode(&hb)?;
        let mut manifest_bytes = vec![0u8; header.manifest_len as usize];
        read_exact_or_truncated(r, &mut manifest_bytes, || "the manifest".into())?;
        let mut sig_bytes = vec![0u8; header.signatures_len as usize];
        read_exact_or_truncated(r, &mut sig_bytes, || "the signatures".into())?;
        let signatures = if sig_bytes.is_empty() {
            Signatures::default()
        } else {
            Signatures::parse(&sig_bytes)?
        };
        Ok(BundleHead {
            header,
            manifest_bytes,
            signatures_bytes: sig_bytes,
            signatures,
        })
    }

    /// Verify the signatures over the exact manifest bytes, then parse and validate it.
    /// Nothing in the manifest is looked at before the signatures pass.
    pub fn verify(&self, trust: &TrustedKeys) -> Result<Verified> {
        let signers = trust.verify(&self.manifest_bytes, &self.signatures)?;
        let manifest = self.parse_unverified()?;
        Ok(Verified {
            manifest,
            signers,
            id: Manifest::id(&self.manifest_bytes),
        })
    }

    /// Parse and validate the manifest WITHOUT checking signatures: only for showing what a
    /// bundle claims (`info`), never for installing.
    pub fn parse_unverified(&self) -> Result<Manifest> {
        let json = self.manifest_json()?;
        let manifest: Manifest = serde_json::from_slice(&json)
            .map_err(|e| Error::Malformed(format!("manifest: {e}")))?;
        manifest.validate(&self.header)?;
        Ok(manifest)
    }
}

/// After the last chunk: the stream must end here.
pub fn expect_end<R: Read + ?Sized>(r: &mut R) -> Result<()> {
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(Error::Malformed(
                    "trailing data after the last chunk".into(),
                ))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("reading bundle end", e)),
        }
    }
}
