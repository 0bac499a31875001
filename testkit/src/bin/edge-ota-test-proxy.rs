//! `edge-ota-test-proxy`: the fault-injecting proxy of `edge_ota_testkit::proxy` as a
//! process, for the QEMU tests and `bench/link.sh`.
//!
//! Prints `listening on http://ADDR` once it accepts connections; rewrites `--status-file`
//! (atomically) every quarter second; on SIGINT or SIGTERM prints a final line
//! `edge-ota-test-proxy: bytes_sent=… body_bytes_sent=… requests=… connections=…` and exits 0.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use edge_ota_testkit::{Faults, Proxy, ProxyStats};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

#[derive(Parser, Debug)]
#[command(about = "Fault-injecting HTTP/1.1 reverse proxy for edge-ota tests")]
struct Args {
    /// Origin to forward to: http://HOST:PORT
    #[arg(long)]
    origin: String,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Throttle everything sent to clients to this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    throttle: Option<u64>,
    /// Close each connection after it carried this many KiB of body.
    #[arg(long, value_name = "KIB")]
    drop_every_kib: Option<u64>,
    /// Once, after this many KiB of body in all, stop sending for --stall-secs.
    #[arg(long, value_name = "KIB", requires = "stall_secs")]
    stall_after_kib: Option<u64>,
    #[arg(long, value_name = "SECS", requires = "stall_after_kib")]
    stall_secs: Option<f64>,
    /// Answer range requests with 200 and the whole file.
    #[arg(long)]
    full_200: bool,
    /// Serve only the first range of multi-range requests.
    #[arg(long)]
    ignore_multirange: bool,
    /// Answer multi-range requests with 416.
    #[arg(long)]
    refuse_multirange: bool,
    /// Append this many garbage bytes to every 206 body.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    extra_bytes: u64,
    /// After this many KiB of body in all, serve --swap-path instead of the path asked for.
    #[arg(long, value_name = "KIB", requires = "swap_path")]
    swap_after_kib: Option<u64>,
    #[arg(long, value_name = "PATH", requires = "swap_after_kib")]
    swap_path: Option<String>,
    /// Answer this many requests 503 with Retry-After: --retry-after-secs.
    #[arg(long, value_name = "N", default_value_t = 0)]
    busy_requests: u64,
    #[arg(long, value_name = "SECS", default_value_t = 1)]
    retry_after_secs: u64,
    /// Answer-shaping faults apply from this request on (1-based).
    #[arg(long, value_name = "N", default_value_t = 0)]
    faults_from_request: u64,
    /// Keep the counters in this file (key=value on one line).
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn write_status(path: &Path, stats: &ProxyStats) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{stats}\n"))?;
    std::fs::rename(&tmp, path)
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let stall_once = match (a.stall_after_kib, a.stall_secs) {
        (Some(k), Some(s)) => match Duration::try_from_secs_f64(s) {
            Ok(d) => Some((k * 1024, d)),
            Err(_) => {
                eprintln!("edge-ota-test-proxy: --stall-secs {s}: not a duration");
                return std::process::ExitCode::from(2);
            }
        },
        _ => None,
    };
    let faults = Faults {
        throttle: a.throttle,
        drop_every: a.drop_every_kib.map(|k| k * 1024),
        stall_once,
        full_200: a.full_200,
        ignore_multirange: a.ignore_multirange,
        refuse_multirange: a.refuse_multirange,
        extra_bytes: a.extra_bytes,
        swap: a
            .swap_after_kib
            .zip(a.swap_path.clone())
            .map(|(k, p)| (k * 1024, p)),
        busy: (a.busy_requests > 0).then_some((a.busy_requests, a.retry_after_secs)),
        faults_from_request: a.faults_from_request,
    };
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(sig, &handler) } {
            eprintln!("edge-ota-test-proxy: installing the {sig} handler: {e}");
            return std::process::ExitCode::from(1);
        }
    }
    let mut proxy = match Proxy::start(&a.listen, &a.origin, faults) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("edge-ota-test-proxy: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    println!("listening on http://{}", proxy.addr());
    let _ = std::io::stdout().flush();
    while !STOP.load(Ordering::SeqCst) {
        if let Some(p) = &a.status_file {
            if let Err(e) = write_status(p, &proxy.stats()) {
                eprintln!("edge-ota-test-proxy: {}: {e}", p.display());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    proxy.stop();
    let stats = proxy.stats();
    if let Some(p) = &a.status_file {
        let _ = write_status(p, &stats);
    }
    println!("edge-ota-test-proxy: {stats}");
    std::process::ExitCode::SUCCESS
}
