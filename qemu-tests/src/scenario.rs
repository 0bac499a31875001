//! What the scenario tests share: their timeouts, the "slot is up and healthy" wait, the USB
//! stick mount, the boot state of a slot in `status`, and the per-scenario timing line that
//! scripts/test.sh prints.

use std::time::{Duration, Instant};

use crate::vm::Vm;

/// A boot, or an update and the reboot it ends with (TCG is slow).
pub const BOOT: Duration = Duration::from_secs(180);
/// One shell command in the guest.
pub const CMD: Duration = Duration::from_secs(120);

/// Skip (with the reason printed) where QEMU or root is missing; CI has both, and under
/// `EDGE_OTA_REQUIRE_ALL` the skip is a failure.
#[macro_export]
macro_rules! require_qemu {
    ($name:expr) => {
        if let Some(why) = $crate::skip_reason() {
            edge_ota::testing::skip($name, &why);
            return;
        }
    };
}

/// Wait for slot `slot` running `version` to pass its health gate and offer a shell, each
/// step within `timeout`.
pub fn wait_ready_within(vm: &mut Vm, slot: &str, version: &str, timeout: Duration) {
    vm.wait_for(
        &format!("edge-init: slot={slot} version={version}"),
        timeout,
    );
    vm.wait_for("edge-init: ready", timeout);
    // The shell may still be starting: a round trip proves it reads input.
    vm.ok("true", CMD);
}

/// [`wait_ready_within`] the usual [`BOOT`] time.
pub fn wait_ready(vm: &mut Vm, slot: &str, version: &str) {
    wait_ready_within(vm, slot, version, BOOT);
}

/// Mount the USB stick (it shows up a little after boot on the emulated xHCI bus).
pub fn mount_usb(vm: &mut Vm) {
    vm.ok(
        "i=0; while [ ! -b /dev/sda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; mount -t vfat -o ro /dev/sda /media/usb",
        CMD,
    );
}

/// The boot state (`good`, `bad`, `trying`, ...) of `slot` in `edge-ota --json status`.
pub fn slot_boot_state(status: &serde_json::Value, slot: &str) -> String {
    status["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == slot)
        .map(|s| s["boot"]["state"].as_str().unwrap().to_string())
        .unwrap()
}

/// Run a scenario and append its wall time to `<work>/timings.txt` (printed by
/// scripts/test.sh as the per-scenario summary; libtest would capture our output).
pub fn timed(name: &str, f: impl FnOnce()) {
    // Image building (once per run, shared) is not part of any scenario's time.
    let work = &crate::artifacts::get().work;
    let t = Instant::now();
    f();
    let line = format!("{name}: {:.1} s\n", t.elapsed().as_secs_f64());
    eprint!("scenario {line}");
    use std::io::Write;
    let path = work.join("timings.txt");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    file.write_all(line.as_bytes()).unwrap();
}
