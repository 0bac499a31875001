//! The whole update state machine on file-backed slots and the file bootloader backend:
//! apply → primary with tries → (simulated) boot → health → good or bad → fallback.
//! Boots are simulated with the same selection algorithm the GRUB and U-Boot scripts run.

mod common;

use common::*;
use edge_ota::bootloader::SlotBootState;

fn boot(dev: &Device) -> String {
    dev.boot()
}

fn apply_v2(dev: &Device, tries: &str) {
    let b = dev.bundle(
        "v2",
        &BundleOpts {
            security_version: 7,
            ..Default::default()
        },
    );
    let o = dev.run(&[
        "apply",
        "--no-reboot",
        "--tries",
        tries,
        b.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn health_pass_confirms_new_slot_and_raises_security_floor() {
    let dev = Device::new(1 << 20);
    apply_v2(&dev, "3");
    assert_eq!(boot(&dev), "B");
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 2 });
    std::fs::write(dev.path("healthy"), "").unwrap();
    let o = dev.run(&["health", "--no-reboot"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(dev.boot_state("B"), SlotBootState::Good);
    let st = dev.state_json().unwrap();
    assert_eq!(st["min_security_version"], 7);
    assert_eq!(st["last_health"]["healthy"], true);
    // Later boots stay on B without using tries; health only records the boot.
    for _ in 0..4 {
        assert_eq!(boot(&dev), "B");
        let o = dev.run(&["--json", "health", "--no-reboot"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["verdict"], "already-good");
    }
}

#[test]
fn health_fail_marks_bad_and_next_boot_is_the_old_slot() {
    let dev = Device::new(1 << 20);
    apply_v2(&dev, "3");
    assert_eq!(boot(&dev), "B");
    // No "healthy" file: the required probe fails until the 1 s deadline.
    let o = dev.run(&["health", "--no-reboot"]);
    assert_refused_multiline(&o, 7, "health check failed: probe ready-file");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
    assert_eq!(boot(&dev), "A");
    let o = dev.run(&["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["booted"], "A");
    assert_eq!(v["fallback"], true);
    assert_eq!(v["rollbacks"][0]["slot"], "B");
    assert_eq!(v["rollbacks"][0]["version"], "2.0.0");
    assert!(v["rollbacks"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("probe ready-file"));
    // The failed slot's security version was never confirmed.
    assert_eq!(v["min_security_version"], 0);
    // Health on A (already good) does not record a second rollback.
    assert!(dev.run(&["health", "--no-reboot"]).status.success());
    assert_eq!(
        dev.state_json().unwrap()["rollbacks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Health failure prints retries before the final error line.
fn assert_refused_multiline(o: &std::process::Output, code: i32, msg: &str) {
    assert_eq!(o.status.code(), Some(code), "{}", stderr(o));
    let last = stderr(o)
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.contains(msg), "last line {last:?} lacks {msg:?}");
}

#[test]
fn tries_exhausted_falls_back_and_is_detected() {
    let dev = Device::new(1 << 20);
    apply_v2(&dev, "2");
    // The new kernel panics twice: no health run at all.
    assert_eq!(boot(&dev), "B");
    assert_eq!(boot(&dev), "B");
    assert_eq!(boot(&dev), "A");
    std::fs::write(dev.path("healthy"), "").unwrap();
    let o = dev.run(&["health", "--no-reboot"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
    let st = dev.state_json().unwrap();
    assert_eq!(st["rollbacks"][0]["slot"], "B");
    assert_eq!(st["rollbacks"][0]["running"], "A");
    assert!(st["rollbacks"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("boot attempts exhausted"));
    assert_eq!(
        st["slots"]["B"]["failure"],
        "boot attempts exhausted: the bootloader fell back"
    );
    let text = stdout(&dev.run(&["status"]));
    assert!(
        text.contains("ROLLBACK: slot B (version 2.0.0) failed"),
        "{text}"
    );
}

#[test]
fn mark_good_only_for_the_booted_slot() {
    let dev = Device::new(1 << 20);
    apply_v2(&dev, "3");
    let o = dev.run(&["mark-good", "B"]);
    assert_refused(&o, 21, "only the booted slot can be marked good");
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
    assert_eq!(dev.state_json().unwrap()["min_security_version"], 0);
    boot(&dev);
    assert!(dev.run(&["mark-good"]).status.success());
    assert_eq!(dev.boot_state("B"), SlotBootState::Good);
    assert_eq!(dev.state_json().unwrap()["min_security_version"], 7);
}

#[test]
fn downgrade_after_confirmation_is_refused() {
    let dev = Device::new(1 << 20);
    apply_v2(&dev, "3");
    boot(&dev);
    assert!(dev.run(&["mark-good"]).status.success());
    let old = dev.bundle(
        "old",
        &BundleOpts {
            security_version: 6,
            version: "1.9.0",
            ..Default::default()
        },
    );
    let o = dev.run(&["apply", "--no-reboot", old.to_str().unwrap()]);
    assert_refused(
        &o,
        18,
        "security version 6 is below the installed minimum 7",
    );
    assert_eq!(dev.boot_state("A"), SlotBootState::Good);
}

#[test]
fn mark_bad_and_mark_active_switch_slots_manually() {
    let dev = Device::new(1 << 20);
    apply_v2(&dev, "3");
    assert!(dev.run(&["mark-bad", "B"]).status.success());
    assert_eq!(boot(&dev), "A");
    assert!(dev
        .run(&["mark-active", "B", "--tries", "1"])
        .status
        .success());
    assert_eq!(boot(&dev), "B");
    assert_eq!(boot(&dev), "A");
}

#[test]
fn unknown_slot_name_is_refused() {
    let dev = Device::new(1 << 20);
    let o = dev.run(&["mark-active", "C"]);
    assert_refused(&o, 21, "no slot named \"C\"");
}

#[test]
fn corrupt_boot_environment_is_an_error_not_a_default() {
    let dev = Device::new(1 << 20);
    std::fs::write(dev.path("bootenv"), "EDGE_ORDER=A B\nEDGE_A_STATE=good\n").unwrap();
    let b = dev.bundle("b", &BundleOpts::default());
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_refused(&o, 6, "corrupt: EDGE_B_STATE is missing");
    // status still reports, says what is wrong and how to repair it.
    let o = dev.run(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("PROBLEM:")
            && text.contains("EDGE_B_STATE is missing")
            && text.contains("edge-ota repair"),
        "{text}"
    );
}

#[test]
fn watchdog_device_missing_fails_the_new_slot_with_its_name() {
    let dev = Device::new(1 << 20);
    let cfg = std::fs::read_to_string(&dev.config).unwrap();
    let cfg = cfg.replace(
        "interval_ms = 100\n",
        &format!(
            "interval_ms = 100\nwatchdog = \"{}\"\n",
            dev.path("no-such-watchdog").display()
        ),
    );
    std::fs::write(&dev.config, cfg).unwrap();
    std::fs::write(dev.path("healthy"), "").unwrap();
    apply_v2(&dev, "3");
    assert_eq!(boot(&dev), "B");
    let o = dev.run(&["health", "--no-reboot"]);
    assert_refused_multiline(&o, 7, "opening watchdog");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn probe_timing_out_fails_the_new_slot() {
    let dev = Device::new(1 << 20);
    let cfg = std::fs::read_to_string(&dev.config).unwrap();
    let cfg = cfg.replace(
        "deadline_secs = 1\n",
        "deadline_secs = 2\n",
    ) + "\n[[health.probe]]\nname = \"slow\"\nkind = \"command\"\ncommand = [\"sleep\", \"30\"]\ntimeout_secs = 1\n";
    std::fs::write(&dev.config, cfg).unwrap();
    std::fs::write(dev.path("healthy"), "").unwrap();
    apply_v2(&dev, "3");
    boot(&dev);
    let o = dev.run(&["health", "--no-reboot"]);
    assert_refused_multiline(&o, 7, "probe slow: sleep timed out after 1s");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}
