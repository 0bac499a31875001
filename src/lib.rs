//! edge-ota: A/B over-the-air updates for immutable edge Linux.
//!
//! Layout by concern, in pipeline order: [`source`] (where bundles come from), [`bundle`] (the
//! shared format, re-exported, plus checked chunk decoding), [`verify`] (policy: compatible,
//! expiry against a trusted clock, anti-rollback), [`slot`] (devices, booted slot, identity),
//! [`install`] (plan and the streaming apply pipeline), [`bootloader`] (backends behind one
//! trait), [`health`] (probes and verdict); then [`control`] (mark-good/bad/active, the
//! known-good rule, the floor, status), [`repair`], [`stage`] (pre-staged downloads), [`lock`] (one operation at a time),
//! [`state`] (persistent, atomic via [`fsutil`]), [`config`], [`error`] (exit codes), [`cli`].

/// Version of every JSON document the CLI, the agent's API and `serve` print.
pub const JSON_VERSION: u32 = 1;

pub mod agent;
pub mod bootloader;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod containerd;
pub mod control;
pub mod discover;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod health;
pub mod install;
pub mod kubernetes;
pub mod lock;
pub mod memory;
pub mod process;
pub mod progress;
pub mod repair;
pub mod schedule;
pub mod serve;
pub mod slot;
pub mod source;
pub mod stage;
pub mod state;
#[doc(hidden)]
pub mod testing;
pub mod verify;

pub use error::{Error, Result};
