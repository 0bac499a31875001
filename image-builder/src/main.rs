//! `edge-ota-image`: the build side of edge-ota. Keys, signed bundles, and (module `os`) the
//! kernel, initramfs, root filesystem and disk images the QEMU tests boot.

mod bundle_cmd;
mod os;

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
    /// OS images for the QEMU tests: kernel, initramfs, rootfs, disk.
    #[command(flatten)]
    Os(Box<os::OsCommand>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Each command family has its own error type; both map to distinct exit codes.
    let result: Result<(), (String, u8)> = match cli.command {
        Command::Keygen(a) => bundle_cmd::keygen(a).map_err(|e| (e.to_string(), e.exit_code())),
        Command::Bundle(c) => bundle_cmd::run(c).map_err(|e| (e.to_string(), e.exit_code())),
        Command::Os(c) => os::run(*c).map_err(|e| (e.to_string(), e.exit_code())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => {
            eprintln!("edge-ota-image: error: {msg}");
            ExitCode::from(code)
        }
    }
}
