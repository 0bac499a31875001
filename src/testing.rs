//! For the test suites only (unit, integration and QEMU tests): a test that needs root, a
//! tool or QEMU must not pass silently where it cannot run. `scripts/test.sh` (and so CI)
//! sets `EDGE_OTA_REQUIRE_ALL=1`, which turns every such skip into a failure naming what is
//! missing.

/// The variable that turns skips into failures.
pub const REQUIRE_ALL: &str = "EDGE_OTA_REQUIRE_ALL";

/// Call where a test cannot run because `missing` is missing: panics under
/// `EDGE_OTA_REQUIRE_ALL`, else prints why it skips. The caller then returns.
pub fn skip(test: &str, missing: &str) {
    if std::env::var_os(REQUIRE_ALL).is_some() {
        panic!("{test}: cannot run: {missing} ({REQUIRE_ALL} is set: nothing may be skipped; scripts/install-deps.sh installs what the suite needs)");
    }
    eprintln!("SKIP {test}: {missing}");
}

/// Whether this process runs as root (loop devices, mounts).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// `name` found as an executable file in `PATH`, or in the sbin directories a non-root
/// `PATH` often lacks (`mkfs.vfat` lives in `/usr/sbin`).
pub fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/bin".into(), "/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
