//! The head of a bundle as the device reads it from any stream (file, pipe, HTTP body):
//! `BundleHead::read` (fixed header, length limits, manifest bytes, signatures block), then
//! `verify` against the demo keys and `parse_unverified` (format 2's compressed manifest
//! through `manifest_json`, the JSON, `Manifest::validate`); and `Signatures::parse` on the
//! raw input.
#![no_main]

use std::sync::OnceLock;

use edge_ota_format::head::BundleHead;
use edge_ota_format::manifest::{limits, HEADER_LEN};
use edge_ota_format::signature::{read_public_key, Signatures, TrustedKeys};
use libfuzzer_sys::fuzz_target;

/// The keys the seed bundles are signed with (insecure demo keys, test use only).
fn trust() -> &'static TrustedKeys {
    static TRUST: OnceLock<TrustedKeys> = OnceLock::new();
    TRUST.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../keys-example/");
        let keys = ["INSECURE-demo.pub.pem", "INSECURE-demo-second.pub.pem"]
            .map(|k| read_public_key(std::path::Path::new(&format!("{dir}{k}"))).unwrap());
        TrustedKeys::new(keys.to_vec(), 1).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok(head) = BundleHead::read(&mut r) {
        // What was read is exactly what the header announced, within the limits.
        let h = head.header;
        assert!(h.manifest_len > 0 && h.manifest_len <= limits::MAX_MANIFEST);
        assert!(h.signatures_len <= limits::MAX_SIGNATURES);
        assert_eq!(head.manifest_bytes.len() as u64, h.manifest_len);
        assert!(head.signatures.signatures.len() <= limits::MAX_SIGNATURE_COUNT);
        assert_eq!(data.len() - r.len(), h.payload_offset() as usize);
        assert!(data.len() >= HEADER_LEN);
        // The head as a staging cache keeps it is exactly what was read.
        assert_eq!(head.to_bytes(), &data[..data.len() - r.len()]);
        if let Ok(json) = head.manifest_json() {
            assert!(json.len() as u64 <= limits::MAX_MANIFEST_JSON);
        }

        let unverified = head.parse_unverified();
        // A verified manifest is the same one parse_unverified gives.
        if let Ok(v) = head.verify(trust()) {
            assert_eq!(&v.manifest, unverified.as_ref().unwrap());
        }
        if let Ok(m) = unverified {
            assert_eq!(m.payload_len, h.payload_len);
        }
    }
    if let Ok(s) = Signatures::parse(data) {
        assert!(s.signatures.len() <= limits::MAX_SIGNATURE_COUNT);
    }
});
