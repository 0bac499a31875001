//! Command-line interface of `edge-ota`. Doc comments are the help text. Human output is for
//! people; `--json` output is versioned and is what programs should read.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::bootloader;
use crate::bundle::reader::BundleHead;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::install::{self, ApplyOptions};
use crate::progress::Progress;
use crate::source::Source;

/// Schema version of every `--json` document.
pub const JSON_VERSION: u32 = 1;

/// A/B over-the-air updater for immutable edge Linux.
#[derive(Debug, Parser)]
#[command(name = "edge-ota", version)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Print machine-readable JSON (with a "version" field) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify a bundle and install it into the inactive slot, then boot it next.
    Apply {
        /// Bundle path, or - for standard input.
        source: String,
        /// Install into this slot (never the booted one).
        #[arg(long)]
        slot: Option<String>,
        /// Boot attempts for the new slot (default: from the configuration).
        #[arg(long)]
        tries: Option<u32>,
        /// Do not reboot when done; the caller reboots.
        #[arg(long)]
        no_reboot: bool,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Fully check a bundle (signatures, policy, every chunk) without writing anything.
    Verify {
        /// Bundle path, or - for standard input.
        source: String,
    },
    /// Show what a bundle contains. Signatures are checked when a configuration is present.
    Info {
        /// Bundle path, or - for standard input.
        source: String,
    },
    /// Show slots, boot state, installed versions and rollbacks.
    Status,
    /// Confirm a slot (default: the booted one). Only the booted slot can be confirmed.
    MarkGood { slot: Option<String> },
    /// Mark a slot bad (default: the booted one): it is not booted again until reinstalled.
    MarkBad { slot: Option<String> },
    /// Boot SLOT next, with a limited number of tries (manual switch).
    MarkActive {
        slot: String,
        #[arg(long)]
        tries: Option<u32>,
    },
    /// Health check of the booted slot: confirm it, or mark it bad and reboot.
    Health {
        /// On failure, do not reboot (exit 7 instead).
        #[arg(long)]
        no_reboot: bool,
    },
    /// Write a fresh boot environment (provisioning): GOOD boots, the other slots are bad.
    InitBootEnv {
        #[arg(long)]
        good: String,
    },
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        #[derive(Serialize)]
        struct Versioned<'a, T> {
            version: u32,
            #[serde(flatten)]
            inner: &'a T,
        }
        let v = Versioned {
            version: JSON_VERSION,
            inner: value,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
    } else {
        print!("{}", text());
    }
}

/// Run a command; returns the exit code for success paths that are not 0 (health failure).
pub fn run(cli: Cli) -> Result<u8> {
    let json = cli.json;
    let load = || Config::load(&cli.config);
    match cli.command {
        Command::Apply {
            source,
            slot,
            tries,
            no_reboot,
            quiet,
        } => {
            let cfg = load()?;
            let mut bl = bootloader::open(&cfg)?;
            let mut src = Source::open(&source)?;
            let opts = ApplyOptions { slot, tries };
            let report = install::apply(
                &cfg,
                bl.as_mut(),
                &mut src,
                &opts,
                &Progress::auto(quiet || json),
            )?;
            print(json, &report, || {
                format!(
                    "installed {} (security version {}) into slot {}; it boots next ({} tries)\n",
                    report.bundle_version, report.security_version, report.slot, report.tries
                )
            });
            if !no_reboot {
                reboot()?;
            }
            Ok(0)
        }
        Command::Verify { source } => {
            let cfg = load()?;
            let state = crate::state::StateStore::new(&cfg.state_dir).load()?;
            let mut src = Source::open(&source)?;
            let v = install::verify_all(&cfg, &mut src, state.min_security_version)?;
            print(json, &v, || {
                format!(
                    "OK: {} version {} (security version {}), {} payload(s), signed by {}\n",
                    v.compatible,
                    v.bundle_version,
                    v.security_version,
                    v.payloads,
                    v.signers.join(", ")
                )
            });
            Ok(0)
        }
        Command::Info { source } => {
            let mut src = Source::open(&source)?;
            let head = BundleHead::read(&mut src.reader)?;
            let manifest = head.parse_unverified()?;
            let verified = match load() {
                Ok(cfg) => Some(head.verify(&cfg.trusted_keys()?).map(|v| v.signers)),
                Err(_) => None,
            };
            let info = BundleInfo {
                bundle_id: crate::bundle::Manifest::id(&head.manifest_bytes).to_hex(),
                signatures: head
                    .signatures
                    .signatures
                    .iter()
                    .map(|s| s.key_id.clone())
                    .collect(),
                verified: match &verified {
                    Some(Ok(_)) => "yes",
                    Some(Err(_)) => "no",
                    None => "not checked (no configuration)",
                },
                manifest: &manifest,
            };
            print(json, &info, || info.render());
            if let Some(Err(e)) = verified {
                return Err(e);
            }
            Ok(0)
        }
        Command::Status => {
            let cfg = load()?;
            let bl = bootloader::open(&cfg)?;
            let st = crate::control::status(&cfg, bl.as_ref())?;
            print(json, &st, || st.render());
            Ok(0)
        }
        Command::MarkGood { slot } => {
            let cfg = load()?;
            let mut bl = bootloader::open(&cfg)?;
            let s = crate::control::mark_good(&cfg, bl.as_mut(), slot.as_deref())?;
            print(
                json,
                &serde_json::json!({"slot": s, "marked": "good"}),
                || format!("slot {s} marked good\n"),
            );
            Ok(0)
        }
        Command::MarkBad { slot } => {
            let cfg = load()?;
            let mut bl = bootloader::open(&cfg)?;
            let s = crate::control::mark_bad(&cfg, bl.as_mut(), slot.as_deref())?;
            print(
                json,
                &serde_json::json!({"slot": s, "marked": "bad"}),
                || format!("slot {s} marked bad\n"),
            );
            Ok(0)
        }
        Command::MarkActive { slot, tries } => {
            let cfg = load()?;
            let mut bl = bootloader::open(&cfg)?;
            let tries = tries.unwrap_or(cfg.tries);
            crate::control::mark_active(&cfg, bl.as_mut(), &slot, tries)?;
            print(
                json,
                &serde_json::json!({"slot": slot, "marked": "active", "tries": tries}),
                || format!("slot {slot} boots next ({tries} tries)\n"),
            );
            Ok(0)
        }
        Command::Health { no_reboot } => {
            let cfg = load()?;
            let mut bl = bootloader::open(&cfg)?;
            let verdict = crate::health::run(&cfg, bl.as_mut())?;
            print(json, &verdict, || match &verdict {
                crate::health::Verdict::AlreadyGood { slot } => {
                    format!("slot {slot}: already good; boot recorded healthy\n")
                }
                crate::health::Verdict::Confirmed { slot } => {
                    format!("slot {slot}: healthy, marked good\n")
                }
                crate::health::Verdict::Failed { slot, reason } => {
                    format!("slot {slot}: UNHEALTHY ({reason}); marked bad\n")
                }
            });
            if let crate::health::Verdict::Failed { reason, .. } = verdict {
                if !no_reboot {
                    reboot()?;
                }
                return Err(Error::HealthFailed(reason));
            }
            Ok(0)
        }
        Command::InitBootEnv { good } => {
            let cfg = load()?;
            cfg.slot(&good)?;
            bootloader::init(&cfg, &good)?;
            print(json, &serde_json::json!({"good": good}), || {
                format!("boot environment written; slot {good} boots\n")
            });
            Ok(0)
        }
    }
}

#[derive(Serialize)]
struct BundleInfo<'a> {
    bundle_id: String,
    signatures: Vec<String>,
    verified: &'static str,
    manifest: &'a crate::bundle::Manifest,
}

impl BundleInfo<'_> {
    fn render(&self) -> String {
        let m = self.manifest;
        let mut s = format!(
            "bundle {}\ncompatible: {}\nversion: {}\nsecurity version: {}\ncreated: {}\nexpires: {}\nsigned by: {}\nsignatures verified: {}\n",
            self.bundle_id,
            m.compatible,
            m.version,
            m.security_version,
            m.created,
            m.expires.map_or("never".into(), |e| e.to_string()),
            self.signatures.join(", "),
            self.verified,
        );
        for p in &m.payloads {
            s += &format!(
                "payload {}: {} -> {}, {} bytes in {} chunks, blake3 {}\n",
                p.name,
                p.kind.as_str(),
                p.target,
                p.size,
                p.chunks.len(),
                p.blake3
            );
        }
        s
    }
}

/// Flush everything and reboot now.
fn reboot() -> Result<()> {
    nix::unistd::sync();
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
        .map_err(|e| Error::io("rebooting", e.into()))?;
    Ok(())
}
