//! Bundles on the device: the shared format (crate `edge-ota-format`, re-exported here:
//! header, manifest, head reading, signatures) and [`decode`], the checked decompression of
//! one chunk, which only the device does.

pub mod decode;

pub use edge_ota_format::*;
