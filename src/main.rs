//! The on-device `edge-ota` command: parse the command line, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    edge_ota::memory::tune();
    let cli = edge_ota::cli::Cli::parse();
    match edge_ota::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("edge-ota: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
