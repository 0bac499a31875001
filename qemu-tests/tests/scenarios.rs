//! End-to-end scenarios in QEMU (TCG): the v1 disk built by `edge-ota-image` boots through
//! real GRUB into slot A; updates arrive on a virtual USB stick. Each scenario checks the
//! serial console markers, the guest's `edge-ota --json status`, and the disk from the host.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::artifacts::{self, Artifacts};
use qemu_tests::disk;
use qemu_tests::require_qemu;
use qemu_tests::scenario::{mount_usb, slot_boot_state, timed, wait_ready, BOOT, CMD};
use qemu_tests::vm::{Vm, VmConfig};

fn start(a: &Artifacts, name: &str, disk: &Path, usb: &Path) -> Vm {
    Vm::start(&VmConfig {
        name,
        disk,
        usb: Some(usb),
        log_dir: &a.work.join("logs"),
        ..VmConfig::default()
    })
}

fn start_networked(a: &Artifacts, name: &str, disk: &Path) -> Vm {
    Vm::start(&VmConfig {
        name,
        disk,
        usb: None,
        net: true,
        log_dir: &a.work.join("logs"),
        ..VmConfig::default()
    })
}

/// Apply v2 from the stick, let it reboot into B and confirm.
fn update_to_v2(vm: &mut Vm) {
    mount_usb(vm);
    vm.send("edge-ota apply /media/usb/image.bin");
    vm.wait_for("edge-grub: booting B", BOOT);
    wait_ready(vm, "B", "2.0.0");
}

/// `ctr -n k8s.io images ls` in the guest lists `img` with its signed digest, pinned.
fn assert_image_pinned(vm: &mut Vm, img: &edge_ota::bundle::ContainerImage) {
    let ls = vm.ok("ctr -n k8s.io images ls", CMD);
    let line = ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(img.name.as_str()))
        .unwrap_or_else(|| panic!("containerd has no {}:\n{ls}", img.name));
    assert!(line.contains(&img.digest), "want {}: {line}", img.digest);
    assert!(line.contains("io.cri-containerd.pinned=pinned"), "{line}");
}

#[test]
fn usb_update_air_gapped() {
    require_qemu!("usb_update_air_gapped");
    timed("usb_update_air_gapped", || {
        let a = artifacts::get();
        let d = a.fresh_disk("usb");
        let usb = a.usb_stick("usb", &a.bundle_v2);
        let slot_a = disk::partition_hash(&d, "rootfs-A");
        let mut vm = start(a, "usb", &d, &usb);
        wait_ready(&mut vm, "A", "1.0.0");
        update_to_v2(&mut vm);
        let st = vm.status();
        assert_eq!(st["booted"], "B");
        assert_eq!(slot_boot_state(&st, "B"), "good");
        assert_eq!(slot_boot_state(&st, "A"), "good");
        assert_eq!(st["min_security_version"], 2);
        assert_eq!(st["fallback"], false);
        // The Kubernetes images shipped in the same bundle landed in B's image store.
        let md5 = vm.ok(
            "md5sum /var/lib/containerd-images/slot-B/images/k8s-images.tar",
            CMD,
        );
        let want = std::process::Command::new("md5sum")
            .arg(&a.container_images)
            .output()
            .unwrap();
        let want = String::from_utf8_lossy(&want.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        assert!(md5.contains(&want), "guest {md5}, host {want}");
        // ...and init loaded them into containerd, checked against the signed manifest and
        // pinned, from the bundle: this VM has no network interface to pull with.
        vm.ok("[ ! -e /sys/class/net/eth0 ]", CMD);
        assert_image_pinned(&mut vm, &a.container_image);
        // Another reboot stays on B, and importing again at its boot is harmless.
        vm.send("reboot");
        vm.wait_for("edge-grub: booting B", BOOT);
        wait_ready(&mut vm, "B", "2.0.0");
        assert_eq!(vm.status()["booted"], "B");
        assert_image_pinned(&mut vm, &a.container_image);
        vm.shutdown(BOOT);
        assert_eq!(
            disk::partition_hash(&d, "rootfs-A"),
            slot_a,
            "slot A was written"
        );
        let env = disk::grubenv(&d, &a.layout);
        assert_eq!(env["EDGE_ORDER"], "B A");
        assert_eq!(env["EDGE_B_STATE"], "good");
        assert_eq!(env["EDGE_A_STATE"], "good");
    });
}

#[test]
fn health_check_fails_then_rollback() {
    require_qemu!("health_check_fails_then_rollback");
    timed("health_check_fails_then_rollback", || {
        let a = artifacts::get();
        let d = a.fresh_disk("health-fail");
        let usb = a.usb_stick("health-fail", &a.bundle_health_fail);
        let mut vm = start(a, "health-fail", &d, &usb);
        wait_ready(&mut vm, "A", "1.0.0");
        mount_usb(&mut vm);
        vm.send("edge-ota apply /media/usb/image.bin");
        vm.wait_for("edge-init: slot=B version=2.0.0", BOOT);
        vm.wait_for("probe kubelet-ready", BOOT);
        vm.wait_for("edge-grub: booting A", BOOT);
        wait_ready(&mut vm, "A", "1.0.0");
        let st = vm.status();
        assert_eq!(st["booted"], "A");
        assert_eq!(st["fallback"], true);
        assert_eq!(slot_boot_state(&st, "B"), "bad");
        assert_eq!(st["rollbacks"][0]["slot"], "B");
        assert_eq!(st["rollbacks"][0]["version"], "2.0.0");
        let reason = st["rollbacks"][0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("health check failed: probe kubelet-ready"),
            "{reason}"
        );
        // The floor stays where provisioning put it (slot A's 1): B was never confirmed.
        assert_eq!(st["min_security_version"], 1);
    });
}

/// Install a v2 that never reaches its health verdict (each boot of B shows
/// `per_boot_marker` and dies): with tries = 2 in the guest config, GRUB must bring A back by
/// itself after two boots of B, and health on A must record the fallback.
fn fallback_after_tries_run_out(scenario: &str, bundle: &Path, per_boot_marker: &str) {
    let a = artifacts::get();
    let d = a.fresh_disk(scenario);
    let usb = a.usb_stick(scenario, bundle);
    let mut vm = start(a, scenario, &d, &usb);
    wait_ready(&mut vm, "A", "1.0.0");
    mount_usb(&mut vm);
    vm.send("edge-ota apply /media/usb/image.bin");
    for _ in 0..2 {
        vm.wait_for("edge-grub: booting B", BOOT);
        vm.wait_for(per_boot_marker, BOOT);
    }
    vm.wait_for("edge-grub: booting A", BOOT);
    wait_ready(&mut vm, "A", "1.0.0");
    let st = vm.status();
    assert_eq!(st["booted"], "A");
    assert_eq!(slot_boot_state(&st, "B"), "bad");
    assert_eq!(st["rollbacks"][0]["slot"], "B");
    assert_eq!(st["rollbacks"][0]["version"], "2.0.0");
    let reason = st["rollbacks"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("boot attempts exhausted"), "{reason}");
}

#[test]
fn kernel_panic_exhausts_tries_then_fallback() {
    require_qemu!("kernel_panic_exhausts_tries_then_fallback");
    timed("kernel_panic_exhausts_tries_then_fallback", || {
        // init exits at once: the kernel panics and reboots (panic=5).
        fallback_after_tries_run_out("panic", &artifacts::get().bundle_panic, "Kernel panic");
    });
}

#[test]
fn hang_before_verdict_watchdog_resets_then_fallback() {
    require_qemu!("hang_before_verdict_watchdog_resets_then_fallback");
    timed("hang_before_verdict_watchdog_resets_then_fallback", || {
        // init hangs after arming softdog (nowayout): the watchdog resets the machine.
        let bundle = &artifacts::get().bundle_hang;
        fallback_after_tries_run_out("hang", bundle, "edge-init: hanging");
    });
}

#[test]
fn power_cut_during_apply_at_several_points() {
    require_qemu!("power_cut_during_apply_at_several_points");
    timed("power_cut_during_apply_at_several_points", || {
        let a = artifacts::get();
        let d = a.fresh_disk("power-cut");
        let usb = a.usb_stick("power-cut", &a.bundle_v2);
        let chunks = {
            let mut f = std::fs::File::open(&a.bundle_v2).unwrap();
            let head = edge_ota::bundle::head::BundleHead::read(&mut f).unwrap();
            head.parse_unverified().unwrap().payloads[0].chunks.len()
        };
        let points = [
            "chunks:3".to_string(),
            format!("chunks:{}", chunks - 3),
            "before-flip".to_string(),
            "boot-env-write@2".to_string(),
        ];
        let mut booted_b = false;
        for (i, point) in points.iter().enumerate() {
            let mut vm = start(a, &format!("power-cut-{i}"), &d, &usb);
            wait_ready(&mut vm, "A", "1.0.0");
            mount_usb(&mut vm);
            vm.send(&format!(
                "EDGE_OTA_FAILPOINT={point} edge-ota apply --no-reboot /media/usb/image.bin"
            ));
            vm.wait_for(edge_ota::failpoint::MARKER, BOOT);
            vm.power_cut();
            // Power back on: a good slot must come up whatever was cut.
            let mut vm = start(a, &format!("power-cut-{i}-after"), &d, &usb);
            let (which, _) = vm
                .wait_any(
                    &[
                        "edge-init: slot=A version=1.0.0",
                        "edge-init: slot=B version=2.0.0",
                    ],
                    BOOT,
                )
                .unwrap_or_else(|tail| panic!("after cut at {point}: no slot came up:\n{tail}"));
            vm.wait_for("edge-init: ready", BOOT);
            vm.ok("true", CMD);
            let st = vm.status();
            let booted = st["booted"].as_str().unwrap().to_string();
            assert_eq!(
                slot_boot_state(&st, &booted),
                "good",
                "after cut at {point}: {st}"
            );
            if which == 1 {
                // Only the flip's env write can have survived the cut, and then B is whole.
                assert_eq!(point, "boot-env-write@2", "B booted after a cut at {point}");
                booted_b = true;
            } else {
                assert_ne!(slot_boot_state(&st, "B"), "good", "after cut at {point}");
            }
            vm.shutdown(BOOT);
        }
        if !booted_b {
            // Running apply again completes and B confirms.
            let mut vm = start(a, "power-cut-final", &d, &usb);
            wait_ready(&mut vm, "A", "1.0.0");
            update_to_v2(&mut vm);
            let st = vm.status();
            assert_eq!(st["booted"], "B");
            assert_eq!(slot_boot_state(&st, "B"), "good");
        }
    });
}

/// The guest's md5sum of `dev`, taken from its own output line: under load the console can
/// interleave a fragment of the echoed command with the output.
fn md5_of(vm: &mut Vm, dev: &str) -> String {
    let out = vm.ok(&format!("md5sum {dev}"), CMD);
    out.lines()
        .filter_map(|l| l.strip_suffix(&format!("  {dev}")))
        .map(str::trim)
        .find(|h| h.len() == 32 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no md5sum of {dev} in {out:?}"))
        .to_string()
}

#[test]
fn tampered_bundle_is_refused_without_reboot() {
    require_qemu!("tampered_bundle_is_refused_without_reboot");
    timed("tampered_bundle_is_refused_without_reboot", || {
        let a = artifacts::get();
        let d = a.fresh_disk("tampered");
        let usb = a.usb_stick_with(
            "tampered",
            &[
                (&a.bundle_tampered, "image.bin"),
                (&a.bundle_tampered_manifest, "manifest.bin"),
            ],
        );
        let env_before = disk::grubenv(&d, &a.layout);
        let slot_a = disk::partition_hash(&d, "rootfs-A");
        let mut vm = start(a, "tampered", &d, &usb);
        wait_ready(&mut vm, "A", "1.0.0");
        mount_usb(&mut vm);
        // A forged manifest is refused before a single byte reaches slot B.
        let b_before = md5_of(&mut vm, "/dev/vda4");
        let (code, out) = vm.run("edge-ota apply /media/usb/manifest.bin", CMD);
        assert_eq!(code, 14, "{out}");
        assert!(
            out.contains("bad signature by key 083283e8ebdabafd"),
            "{out}"
        );
        assert_eq!(md5_of(&mut vm, "/dev/vda4"), b_before, "slot B written");
        // A tampered chunk is caught before it is written; B stays marked bad.
        let (code, out) = vm.run("edge-ota apply /media/usb/image.bin", CMD);
        assert_eq!(code, 16, "{out}");
        assert!(out.contains("tampered payload \"rootfs\""), "{out}");
        // Still running the same boot: the shell answers, nothing rebooted.
        let st = vm.status();
        assert_eq!(st["booted"], "A");
        assert_eq!(slot_boot_state(&st, "B"), "bad");
        assert_eq!(st["next_boot"], "A");
        vm.shutdown(BOOT);
        assert!(!vm_output_has_reboot(
            &a.work.join("logs/tampered.serial.log")
        ));
        assert_eq!(
            disk::grubenv(&d, &a.layout),
            env_before,
            "boot environment changed"
        );
        assert_eq!(disk::partition_hash(&d, "rootfs-A"), slot_a);
    });
}

/// GRUB ran more than once in this VM's life: something rebooted it.
fn vm_output_has_reboot(log: &Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap();
    text.matches("edge-grub: booting").count() > 1
}

#[test]
fn downgrade_after_confirmation_is_refused() {
    require_qemu!("downgrade_after_confirmation_is_refused");
    timed("downgrade_after_confirmation_is_refused", || {
        let a = artifacts::get();
        let d = a.fresh_disk("downgrade");
        let usb = a.usb_stick_with(
            "downgrade",
            &[
                (&a.bundle_v2, "image.bin"),
                (&a.bundle_downgrade, "old.bin"),
            ],
        );
        let mut vm = start(a, "downgrade", &d, &usb);
        wait_ready(&mut vm, "A", "1.0.0");
        update_to_v2(&mut vm);
        assert_eq!(vm.status()["min_security_version"], 2);
        mount_usb(&mut vm);
        let (code, out) = vm.run("edge-ota apply --no-reboot /media/usb/old.bin", CMD);
        assert_eq!(code, 18, "{out}");
        assert!(
            out.contains("downgrade refused: bundle security version 1"),
            "{out}"
        );
        let st = vm.status();
        assert_eq!(st["booted"], "B");
        assert_eq!(slot_boot_state(&st, "A"), "good");
        assert_eq!(st["next_boot"], "B");
    });
}

#[test]
fn update_over_http_resumes_after_a_power_cut() {
    require_qemu!("update_over_http_resumes_after_a_power_cut");
    if edge_ota_testkit::Nginx::find().is_none() {
        edge_ota::testing::skip(
            "update_over_http_resumes_after_a_power_cut",
            "nginx is not installed",
        );
        return;
    }
    timed("update_over_http_resumes_after_a_power_cut", || {
        let a = artifacts::get();
        let d = a.fresh_disk("http");
        // The bundle on a real server on the host, behind the counting proxy, throttled so the
        // power can be cut mid-download.
        let root = a.work.join("runs/http/www");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(&a.bundle_v2, root.join("v2.eota")).unwrap();
        let size = std::fs::metadata(&a.bundle_v2).unwrap().len();
        let nginx = edge_ota_testkit::Nginx::start(&root).unwrap();
        let proxy = edge_ota_testkit::Proxy::start(
            "127.0.0.1:0",
            &nginx.origin(),
            edge_ota_testkit::Faults {
                throttle: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let url = format!("http://10.0.2.2:{}/v2.eota", proxy.addr().port());
        let mut vm = start_networked(a, "http", &d);
        wait_ready(&mut vm, "A", "1.0.0");
        vm.send(&format!("edge-ota apply --progress none {url}"));
        // Cut the power once about 40% of the bundle has crossed.
        let deadline = Instant::now() + BOOT;
        while proxy.stats().body_bytes_sent < size * 2 / 5 {
            assert!(Instant::now() < deadline, "the download did not progress");
            std::thread::sleep(Duration::from_millis(100));
        }
        vm.power_cut();
        let first = proxy.stats().body_bytes_sent;
        // Power back on: A runs; the same apply continues where it stopped, reboots into B.
        let mut vm = start_networked(a, "http-after", &d);
        wait_ready(&mut vm, "A", "1.0.0");
        vm.send(&format!("edge-ota apply --progress none {url}"));
        vm.wait_for("edge-grub: booting B", BOOT);
        wait_ready(&mut vm, "B", "2.0.0");
        let st = vm.status();
        assert_eq!(st["booted"], "B");
        assert_eq!(slot_boot_state(&st, "B"), "good");
        assert_eq!(
            st["staged"].as_array().unwrap().len(),
            0,
            "spool left behind: {st}"
        );
        vm.shutdown(BOOT);
        let total = proxy.stats().body_bytes_sent;
        assert!(
            total as f64 <= 1.05 * size as f64,
            "the server sent {total} bytes ({first} before the cut) for a {size}-byte bundle"
        );
    });
}
