//! A working device always keeps one slot it can boot. Each test is named after a fault that
//! used to break that promise (or could): the pending-update guard, the operation lock, the
//! health gate's verdicts, the anti-rollback floor's two copies and the clock, slot identity,
//! bundles that do not define a slot's content, prompt failure on a stalled stream, option
//! checks before any write, and file payloads that must stay inside their slot.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use edge_ota::bootloader::SlotBootState;
use edge_ota::bundle::PayloadKind;

fn v2(dev: &Device, name: &str, sv: u64) -> std::path::PathBuf {
    dev.bundle(
        name,
        &BundleOpts {
            security_version: sv,
            ..Default::default()
        },
    )
}

fn ok(o: &std::process::Output) {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
}

fn apply(dev: &Device, b: &std::path::Path) -> std::process::Output {
    dev.run(&["apply", "--no-reboot", b.to_str().unwrap()])
}

// ---- 1. The pending-update guard ----

#[test]
fn apply_while_the_booted_slot_is_unconfirmed_refuses_to_overwrite_the_only_good_slot() {
    let dev = Device::new(1 << 20);
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    assert_eq!(dev.boot(), "B");
    let a_before = std::fs::read(dev.path("slotA")).unwrap();
    let before = dev.snapshot();
    let o = apply(&dev, &v2(&dev, "v3", 3));
    assert_refused(
        &o,
        22,
        "slot B is booted but not confirmed; slot A is the only known-good slot: confirm B or let the health check decide first",
    );
    assert_eq!(std::fs::read(dev.path("slotA")).unwrap(), a_before);
    assert!(before.0 == dev.snapshot().0, "boot environment changed");
    assert_eq!(dev.boot_state("A"), SlotBootState::Good);
}

#[test]
fn apply_onto_a_slot_that_holds_nothing_good_is_allowed_while_unconfirmed() {
    let dev = Device::new(1 << 20);
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    assert_eq!(dev.boot(), "B");
    // A is not known-good (say a failed install): nothing to protect there.
    let env = std::fs::read_to_string(dev.path("bootenv"))
        .unwrap()
        .replace("EDGE_A_STATE=good", "EDGE_A_STATE=bad");
    std::fs::write(dev.path("bootenv"), env).unwrap();
    ok(&apply(&dev, &v2(&dev, "v3", 3)));
    assert_eq!(dev.boot_state("A"), SlotBootState::Trying { tries_left: 3 });
}

#[test]
fn mark_bad_of_the_only_good_slot_is_refused() {
    let dev = Device::new(1 << 20);
    let before = dev.snapshot();
    let o = dev.run(&["mark-bad", "A"]);
    assert_refused(
        &o,
        22,
        "slot A is the only known-good slot; refusing to mark it bad",
    );
    assert!(before == dev.snapshot());
    // With a second good slot it is allowed.
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    dev.boot();
    ok(&dev.run(&["mark-good"]));
    ok(&dev.run(&["mark-bad", "A"]));
    assert_eq!(dev.boot_state("A"), SlotBootState::Bad);
}

// ---- 2. One lock ----

/// Start an apply that takes the lock and then waits on an open, empty pipe.
fn apply_holding_the_lock(dev: &Device) -> std::process::Child {
    let child = dev
        .cmd()
        .args(["apply", "--no-reboot", "-q", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lock_holder(dev, "apply");
    child
}

fn wait_for_lock_holder(dev: &Device, command: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(dev.path("state/lock")).unwrap_or_default();
        if text.contains(&format!("\"command\":\"{command}\"")) {
            return;
        }
        assert!(Instant::now() < deadline, "no {command} took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_concurrent_applies_the_second_is_refused_naming_the_first() {
    let dev = Device::new(1 << 20);
    let b = v2(&dev, "v2", 2);
    let mut first = apply_holding_the_lock(&dev);
    let before = dev.snapshot();
    let o = apply(&dev, &b);
    assert_refused(
        &o,
        23,
        &format!(
            "another edge-ota operation is running (pid {}, `apply`, since",
            first.id()
        ),
    );
    assert!(
        before == dev.snapshot(),
        "the refused apply changed something"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    ok(&apply(&dev, &b));
}

#[test]
fn apply_during_health_is_refused() {
    let dev = Device::new(1 << 20);
    dev.edit_config(|c| {
        c.replace("deadline_secs = 1\n", "deadline_secs = 30\n")
            + "\n[[health.probe]]\nname = \"slow\"\nkind = \"command\"\ncommand = [\"sleep\", \"3\"]\n"
    });
    std::fs::write(dev.path("healthy"), "").unwrap();
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    dev.boot();
    let mut health = dev
        .cmd()
        .args(["health", "--no-reboot"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lock_holder(&dev, "health");
    let o = dev.run(&["mark-bad", "B"]);
    assert_refused(&o, 23, "`health`");
    assert!(health.wait().unwrap().success());
    assert_eq!(dev.boot_state("B"), SlotBootState::Good);
}

#[test]
fn wait_flag_waits_for_the_running_operation() {
    let dev = Device::new(1 << 20);
    let b = v2(&dev, "v2", 2);
    let mut first = apply_holding_the_lock(&dev);
    let t = Instant::now();
    let second = dev
        .cmd()
        .args([
            "--wait=30",
            "apply",
            "--no-reboot",
            "-q",
            b.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    // The first one ends (its pipe closes: a truncated bundle), releasing the lock.
    drop(first.stdin.take());
    assert_eq!(first.wait().unwrap().code(), Some(11));
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(t.elapsed() >= Duration::from_millis(800));
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
}

// ---- 3. Honest health verdicts ----

#[test]
fn health_before_the_reboot_leaves_the_pending_slot_alone() {
    let dev = Device::new(1 << 20);
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    // Still running A; B waits for its first boot.
    let o = dev.run(&["--json", "health", "--no-reboot"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "already-good");
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
    let st = dev.state_json().unwrap();
    assert_eq!(st["rollbacks"].as_array().unwrap().len(), 0);
    let s: serde_json::Value =
        serde_json::from_slice(&dev.run(&["--json", "status"]).stdout).unwrap();
    assert_eq!(s["pending_reboot"], true);
    assert_eq!(s["fallback"], false);
    // Same after mark-active.
    ok(&dev.run(&["mark-active", "B", "--tries", "2"]));
    ok(&dev.run(&["health", "--no-reboot"]));
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 2 });
}

#[test]
fn health_after_a_boot_attempt_that_fell_back_detects_the_fallback() {
    let dev = Device::new(1 << 20);
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    // GRUB used one of B's tries, B's kernel did not load, GRUB went on to A.
    assert_eq!(dev.boot(), "B");
    dev.set_booted("A");
    ok(&dev.run(&["health", "--no-reboot"]));
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
    let st = dev.state_json().unwrap();
    assert_eq!(st["rollbacks"][0]["slot"], "B");
}

#[test]
fn health_does_not_confirm_a_slot_booted_as_the_last_resort() {
    let dev = Device::new(1 << 20);
    let env = std::fs::read_to_string(dev.path("bootenv"))
        .unwrap()
        .replace("EDGE_A_STATE=good", "EDGE_A_STATE=bad");
    std::fs::write(dev.path("bootenv"), env).unwrap();
    std::fs::write(dev.path("healthy"), "").unwrap();
    let o = dev.run(&["health"]);
    assert_refused(&o, 8, "is marked bad and was booted anyway");
    assert_eq!(dev.boot_state("A"), SlotBootState::Bad);
    let st = dev.state_json().unwrap();
    assert_eq!(st["last_health"]["healthy"], false);
    assert!(st["last_health"]["detail"]
        .as_str()
        .unwrap()
        .contains("last resort"));
}

#[test]
fn health_does_not_confirm_a_half_installed_slot() {
    let dev = Device::new(1 << 20);
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    dev.boot();
    let st = std::fs::read_to_string(dev.path("state/state.json"))
        .unwrap()
        .replace("\"installed\"", "\"installing\"");
    std::fs::write(dev.path("state/state.json"), st).unwrap();
    std::fs::write(dev.path("healthy"), "").unwrap();
    let o = dev.run(&["health", "--no-reboot"]);
    assert_refused(&o, 8, "holds an unfinished install");
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 2 });
}

#[test]
fn health_with_a_corrupt_state_file_keeps_running_and_names_repair() {
    let dev = Device::new(1 << 20);
    std::fs::create_dir_all(dev.path("state")).unwrap();
    std::fs::write(dev.path("state/state.json"), b"{\"version\":1,").unwrap();
    let before = dev.snapshot();
    let o = dev.run(&["health"]);
    assert_refused(&o, 8, "run `edge-ota repair`");
    assert!(before == dev.snapshot(), "health changed a corrupt device");
    let text = stdout(&dev.run(&["status"]));
    assert!(
        text.contains("PROBLEM: state") && text.contains("edge-ota repair"),
        "{text}"
    );
}

#[test]
fn health_with_a_corrupt_boot_environment_reaches_a_verdict() {
    let dev = Device::new(1 << 20);
    std::fs::write(dev.path("bootenv"), "garbage\n").unwrap();
    let o = dev.run(&["health"]);
    assert_refused(&o, 8, "run `edge-ota repair`");
    assert_eq!(
        std::fs::read_to_string(dev.path("bootenv")).unwrap(),
        "garbage\n"
    );
}

#[test]
fn configuration_without_a_required_probe_is_refused_unless_allowed() {
    let dev = Device::new(1 << 20);
    dev.edit_config(|c| c.replace("[[health.probe]]", "[[health.probe]]\nrequired = false"));
    let o = dev.run(&["status"]);
    assert_refused(&o, 3, "no required health probe");
    dev.edit_config(|c| c.replace("[health]", "[health]\nallow_no_probes = true"));
    let text = stdout(&dev.run(&["status"]));
    assert!(text.contains("NO REQUIRED PROBES"), "{text}");
}

// ---- 4. The anti-rollback floor and the clock ----

fn install_and_confirm(dev: &Device, b: &std::path::Path) {
    ok(&apply(dev, b));
    dev.boot();
    ok(&dev.run(&["mark-good"]));
}

#[test]
fn deleting_the_state_file_does_not_reset_the_anti_rollback_floor() {
    let dev = Device::new(1 << 20);
    install_and_confirm(&dev, &v2(&dev, "v7", 7));
    assert!(std::fs::read_to_string(dev.path("bootenv"))
        .unwrap()
        .contains("EDGE_FLOOR=7"));
    std::fs::remove_file(dev.path("state/state.json")).unwrap();
    let o = apply(&dev, &v2(&dev, "old", 6));
    assert_refused(&o, 18, "below the installed minimum 7");
    // The next accepted apply restores the state file's copy.
    ok(&apply(&dev, &v2(&dev, "v8", 8)));
    assert_eq!(dev.state_json().unwrap()["min_security_version"], 7);
}

#[test]
fn corrupt_floor_copy_in_the_boot_environment_is_restored_from_the_state_file() {
    let dev = Device::new(1 << 20);
    install_and_confirm(&dev, &v2(&dev, "v7", 7));
    let env = std::fs::read_to_string(dev.path("bootenv"))
        .unwrap()
        .replace("EDGE_FLOOR=7", "EDGE_FLOOR=x");
    std::fs::write(dev.path("bootenv"), env).unwrap();
    let text = stdout(&dev.run(&["status"]));
    assert!(
        text.contains("PROBLEM: anti-rollback floor unreadable"),
        "{text}"
    );
    let o = apply(&dev, &v2(&dev, "old", 6));
    assert_refused(&o, 18, "below the installed minimum 7");
    ok(&dev.run(&["health", "--no-reboot"]));
    assert!(std::fs::read_to_string(dev.path("bootenv"))
        .unwrap()
        .contains("EDGE_FLOOR=7"));
}

#[test]
fn mark_active_refuses_a_slot_below_the_floor() {
    let dev = Device::new(1 << 20);
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    dev.boot();
    ok(&dev.run(&["mark-good"]));
    // Slot A gets security version 3 and is confirmed; B's 2 is now below the floor.
    dev.set_booted("B");
    ok(&apply(&dev, &v2(&dev, "v3", 3)));
    assert_eq!(dev.boot(), "A");
    ok(&dev.run(&["mark-good"]));
    let o = dev.run(&["mark-active", "B"]);
    assert_refused(
        &o,
        18,
        "security version 2 is below the installed minimum 3",
    );
}

#[test]
fn clock_set_back_cannot_revive_an_expired_bundle() {
    let dev = Device::new(1 << 20);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A bundle created a year from now was installed: the device has seen that time.
    let future = BundleOpts {
        created: now + 365 * 86_400,
        ..Default::default()
    };
    ok(&apply(&dev, &dev.bundle("future", &future)));
    // This one expires in an hour by the (wrong, behind) clock: already expired.
    let soon = BundleOpts {
        expires: Some(now + 3600),
        ..Default::default()
    };
    let o = apply(&dev, &dev.bundle("soon", &soon));
    assert_refused(
        &o,
        19,
        "the clock is behind the newest time this device has seen",
    );
}

// ---- 8. Slots are what they are, not what they are called ----

#[test]
fn target_symlinked_to_the_booted_slot_is_refused() {
    let dev = Device::new(1 << 20);
    std::fs::remove_file(dev.path("slotB")).unwrap();
    std::os::unix::fs::symlink(dev.path("slotA"), dev.path("slotB")).unwrap();
    let a_before = std::fs::read(dev.path("slotA")).unwrap();
    let o = apply(&dev, &v2(&dev, "v2", 2));
    assert_refused(&o, 21, "resolve to the same device");
    assert_eq!(std::fs::read(dev.path("slotA")).unwrap(), a_before);
}

#[test]
fn target_hard_linked_to_the_booted_slot_is_refused() {
    let dev = Device::new(1 << 20);
    std::fs::remove_file(dev.path("slotB")).unwrap();
    std::fs::hard_link(dev.path("slotA"), dev.path("slotB")).unwrap();
    let o = apply(&dev, &v2(&dev, "v2", 2));
    assert_refused(&o, 21, "resolve to the same device");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

// ---- 9. A slot becomes bootable only over a complete image ----

fn kernel_only(dev: &Device) -> std::path::PathBuf {
    dev.bundle(
        "kernel-only",
        &BundleOpts {
            payloads: vec![(PayloadKind::Kernel, "vmlinuz", image_bytes(50_000, 9))],
            ..Default::default()
        },
    )
}

#[test]
fn bundle_without_an_image_cannot_make_a_half_written_slot_bootable() {
    let dev = Device::new(1 << 20);
    let b = v2(&dev, "v2", 2);
    let bytes = std::fs::read(&b).unwrap();
    let o = dev.run_stdin(&["apply", "--no-reboot", "-"], &bytes[..bytes.len() / 2]);
    assert_eq!(o.status.code(), Some(11));
    let o = apply(&dev, &kernel_only(&dev));
    assert_refused(
        &o,
        21,
        "the bundle has no image for slot B and the slot does not hold a complete, recorded image",
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn kernel_only_bundle_on_an_intact_slot_is_allowed_and_on_a_changed_one_refused() {
    let dev = Device::new(1 << 20);
    ok(&apply(&dev, &v2(&dev, "v2", 2)));
    ok(&apply(&dev, &kernel_only(&dev)));
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
    assert_eq!(
        std::fs::read(dev.path("filesB/boot/vmlinuz")).unwrap(),
        image_bytes(50_000, 9)
    );
    // One byte of B's image changes: no longer proven.
    let mut slot = std::fs::read(dev.path("slotB")).unwrap();
    slot[1000] ^= 1;
    std::fs::write(dev.path("slotB"), slot).unwrap();
    let o = apply(&dev, &kernel_only(&dev));
    assert_refused(&o, 21, "no longer matches the one recorded at its install");
}

// ---- 10. A failure stops the stream at once ----

#[test]
fn tampered_chunk_on_a_stalled_pipe_fails_at_once() {
    let dev = Device::new(1 << 20);
    let b = v2(&dev, "v2", 2);
    let (_, _, _, payload) = layout(&b);
    let mut bytes = std::fs::read(&b).unwrap();
    bytes[payload + 20] ^= 0x40;
    let mut child = dev
        .cmd()
        .args(["apply", "--no-reboot", "-q", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The head and half the chunks, then the pipe stays open with nothing more.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("apply still waiting on the stalled pipe after a tampered chunk");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(16), "{err}");
    assert!(
        err.contains("tampered payload \"rootfs\": chunk 0"),
        "{err}"
    );
    drop(stdin);
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

// ---- 11. Options and verify make every check before anything is written ----

#[test]
fn tries_out_of_range_is_refused_before_anything_is_written() {
    let dev = Device::new(1 << 20);
    let b = v2(&dev, "v2", 2);
    let before = dev.snapshot();
    for t in ["0", "10"] {
        let o = dev.run(&["apply", "--no-reboot", "--tries", t, b.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "--tries {t}: {}", stderr(&o));
        assert!(stderr(&o).contains("--tries"), "{}", stderr(&o));
        assert!(before == dev.snapshot(), "--tries {t} changed the device");
    }
    assert_eq!(
        dev.run(&["mark-active", "B", "--tries", "12"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn verify_refuses_what_apply_refuses_for_its_target() {
    let dev = Device::new(200_000);
    let b = v2(&dev, "v2", 2);
    let o = dev.run(&["verify", b.to_str().unwrap()]);
    assert_refused(&o, 20, "is larger than slot B");
    let o = dev.run(&["verify", "--slot", "A", b.to_str().unwrap()]);
    assert_refused(&o, 21, "it is the booted slot");
}

// ---- 7. File payloads stay inside their slot's directory ----

#[test]
fn file_payload_cannot_escape_through_a_symlink_in_the_slot_directory() {
    let dev = Device::new(1 << 20);
    let outside = dev.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(dev.path("filesB")).unwrap();
    std::os::unix::fs::symlink(&outside, dev.path("filesB/images")).unwrap();
    let tar = image_bytes(40_000, 5);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            payloads: vec![
                (PayloadKind::Image, "rootfs", image_bytes(100_000, 1)),
                (PayloadKind::ContainerImages, "k8s.tar", tar.clone()),
            ],
            ..Default::default()
        },
    );
    ok(&apply(&dev, &b));
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote outside the slot"
    );
    let images = dev.path("filesB/images");
    assert!(!std::fs::symlink_metadata(&images)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(images.join("k8s.tar")).unwrap(), tar);
}

#[test]
fn files_of_an_older_bundle_are_removed_from_the_slot_directory() {
    let dev = Device::new(1 << 20);
    std::fs::create_dir_all(dev.path("filesB/files")).unwrap();
    std::fs::write(dev.path("filesB/files/stale.conf"), "old").unwrap();
    let b = dev.bundle(
        "b",
        &BundleOpts {
            payloads: vec![
                (PayloadKind::Image, "rootfs", image_bytes(100_000, 1)),
                (PayloadKind::File, "new.conf", b"new".to_vec()),
            ],
            ..Default::default()
        },
    );
    ok(&apply(&dev, &b));
    assert!(!dev.path("filesB/files/stale.conf").exists());
    assert_eq!(
        std::fs::read(dev.path("filesB/files/new.conf")).unwrap(),
        b"new"
    );
    assert!(!dev.path("filesB.staging").exists());
}
