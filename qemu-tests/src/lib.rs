//! Harness for the QEMU end-to-end tests: a VM on a serial console ([`Vm`]), the images it
//! boots ([`artifacts`]), host-side inspection of its disk between boots ([`disk`]), and the
//! power-loss checker: write logs of a VM's disk ([`blklog`]) and their crash states judged
//! on the host ([`crashcheck`]); what the scenarios share ([`scenario`]).

pub mod artifacts;
pub mod blklog;
pub mod crashcheck;
pub mod disk;
pub mod scenario;
pub mod vm;

pub use vm::Vm;

/// Why the suite cannot run here, if it cannot (printed by each test as its skip reason).
pub fn skip_reason() -> Option<String> {
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return Some(
            "qemu-system-x86_64 is not installed (scripts/install-deps.sh installs it)".into(),
        );
    }
    for tool in ["containerd", "ctr", "runc"] {
        if edge_ota::testing::find_tool(tool).is_none() {
            return Some(format!(
                "{tool} is not installed: the guest OS ships the host's (scripts/install-deps.sh installs it)"
            ));
        }
    }
    if !nix_is_root() {
        return Some("building the images needs root (apt-get download, package installs)".into());
    }
    None
}

fn nix_is_root() -> bool {
    // SAFETY-free check: /proc/self/status carries the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
