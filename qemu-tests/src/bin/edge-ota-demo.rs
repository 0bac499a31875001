//! The README demo: build v1 and v2 images, boot the v1 disk in QEMU with the serial console
//! on this terminal, update to v2 from a virtual USB stick (the air-gapped case), and print
//! the guest's `edge-ota status` at the end.

use std::time::Duration;

use qemu_tests::artifacts;
use qemu_tests::vm::{Vm, VmConfig};

fn main() {
    if let Some(why) = qemu_tests::skip_reason() {
        eprintln!("edge-ota-demo: cannot run: {why}");
        std::process::exit(1);
    }
    eprintln!("== building images (kernel, initramfs, v1 disk, signed v2 bundle); cached after the first run");
    let a = artifacts::get();
    let disk = a.fresh_disk("demo");
    let usb = a.usb_stick("demo", &a.bundle_v2);
    // Show the serial console as it happens.
    std::env::set_var("EDGE_OTA_QEMU_ECHO", "1");
    eprintln!("== booting v1 (slot A) in QEMU; serial console follows");
    let mut vm = Vm::start(&VmConfig {
        name: "demo",
        disk: &disk,
        usb: Some(&usb),
        log_dir: &a.work.join("logs"),
        ..VmConfig::default()
    });
    let boot = Duration::from_secs(300);
    vm.wait_for("edge-init: ready", boot);
    vm.ok("true", boot);
    vm.ok("mount -t vfat -o ro /dev/sda /media/usb || (sleep 3; mount -t vfat -o ro /dev/sda /media/usb)", boot);
    vm.send("edge-ota status; edge-ota apply /media/usb/image.bin");
    vm.wait_for("edge-grub: booting B", boot);
    vm.wait_for("edge-init: slot=B version=2.0.0", boot);
    vm.wait_for("edge-init: ready", boot);
    vm.ok("true", boot);
    let status = vm.ok("edge-ota status", boot);
    vm.shutdown(Duration::from_secs(60));
    println!("\n== guest status after the update:\n{}", status.trim());
}
