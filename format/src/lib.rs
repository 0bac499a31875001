//! The edge-ota bundle format (docs/bundle-format.md), shared by the device (`edge-ota`) and
//! the build side (`edge-ota-image`): [`manifest`] types and structural checks, [`head`]
//! (reading header, manifest and signatures from any stream), [`signature`] (trusted keys and
//! threshold checks). The bundle writer, the chunker and key generation live in [`build`],
//! compiled only with the `build` feature, so the device binary carries none of them.

pub mod error;
pub mod frame;
pub mod head;
pub mod manifest;
pub mod signature;

#[cfg(feature = "build")]
pub mod build;

pub use error::{Error, Result};
pub use manifest::*;
