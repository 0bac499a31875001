//! `edge-ota-image`: the build side of edge-ota. Keys, signed bundles, and (module `os`) the
//! kernel, initramfs, root filesystem and disk images the QEMU tests boot.

mod bundle_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build keys, signed update bundles and OS images for edge-ota.
#[derive(Debug, Parser)]
#[command(name = "edge-ota-image", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an ed25519 signing key pair (PEM: PKCS#8 private, SPKI public).
    Keygen(bundle_cmd::KeygenArgs),
    /// Create or inspect bundles.
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(a) => bundle_cmd::keygen(a),
        Command::Bundle(c) => bundle_cmd::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-ota-image: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
