//! edge-ota: A/B over-the-air updates for immutable edge Linux.
//!
//! Layout by concern: [`bundle`] (format, reading, writing), [`verify`] (keys, signatures,
//! policy), [`source`] (where bundles come from), [`slot`] (devices, booted slot),
//! [`install`] (the streaming apply pipeline), [`bootloader`] (backends behind one trait),
//! [`health`] (probes and verdict), [`control`] (mark-good/bad/active, status), [`state`]
//! (persistent, atomic), [`config`], [`error`] (exit codes), [`cli`].

pub mod bootloader;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod failpoint;
pub mod health;
pub mod install;
pub mod progress;
pub mod slot;
pub mod source;
pub mod state;
pub mod verify;

pub use error::{Error, Result};
