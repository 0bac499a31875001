//! Broken boot state and state files, as a power cut, a bad sector or an operator can leave
//! them: the device keeps working from the surviving copy, and `edge-ota repair` rebuilds the
//! rest from what can be proven.

mod common;

use common::*;
use edge_ota::bootloader::grubenv::{self, Copy, GrubEnvPair};
use edge_ota::bootloader::SlotBootState;

fn ok(o: &std::process::Output) {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
}

fn pair(dev: &Device) -> GrubEnvPair {
    GrubEnvPair::new(dev.path("grub/grubenv"))
}

#[test]
fn provisioning_records_the_good_slot_and_writes_both_grubenv_copies() {
    let dev = Device::with_grub(1 << 20);
    let copies = pair(&dev).read_copies();
    assert!(
        matches!(copies[0], Copy::Valid { seq: 2, .. }),
        "{copies:?}"
    );
    assert_eq!(copies[0], copies[1]);
    let st: serde_json::Value =
        serde_json::from_slice(&dev.run(&["--json", "status"]).stdout).unwrap();
    assert_eq!(st["slots"][0]["version"], "1.0.0");
    assert_eq!(st["min_security_version"], 1);
    assert_eq!(st["problems"].as_array().unwrap().len(), 0, "{st}");
}

#[test]
fn apply_with_a_zeroed_first_grubenv_copy_works_and_leaves_both_copies_equal() {
    let dev = Device::with_grub(1 << 20);
    std::fs::write(dev.path("grub/grubenv"), [0u8; grubenv::BLOCK_SIZE]).unwrap();
    let text = stdout(&dev.run(&["status"]));
    assert!(text.contains("PROBLEM: grubenv copy 1"), "{text}");
    let b = dev.bundle("b", &BundleOpts::default());
    ok(&dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]));
    let copies = pair(&dev).read_copies();
    assert_eq!(copies[0], copies[1]);
    let Copy::Valid { vars, .. } = &copies[0] else {
        panic!("{copies:?}")
    };
    assert_eq!(vars["EDGE_ORDER"], "B A");
    assert_eq!(vars["EDGE_B_STATE"], "trying");
}

#[test]
fn both_grubenv_copies_corrupt_repair_rebuilds_with_the_booted_slot_good() {
    let dev = Device::with_grub(1 << 20);
    std::fs::write(dev.path("grub/grubenv"), [0u8; grubenv::BLOCK_SIZE]).unwrap();
    std::fs::write(dev.path("grub/grubenv2"), b"garbage").unwrap();
    std::fs::write(dev.path("healthy"), "").unwrap();
    // The gate reaches a verdict without a boot state, and says what to do.
    let o = dev.run(&["health", "--no-reboot"]);
    assert_refused(&o, 8, "run `edge-ota repair`");
    let o = dev.run(&["repair"]);
    ok(&o);
    assert!(
        stdout(&o).contains("rebuilt with slot A (booted) good"),
        "{}",
        stdout(&o)
    );
    let copies = pair(&dev).read_copies();
    assert_eq!(copies[0], copies[1]);
    let Copy::Valid { vars, .. } = &copies[0] else {
        panic!("{copies:?}")
    };
    assert_eq!(vars["EDGE_A_STATE"], "good");
    assert_eq!(vars["EDGE_B_STATE"], "bad");
    // The floor's copy in the environment came back from the state file.
    assert_eq!(vars["EDGE_FLOOR"], "1");
    let o = dev.run(&["--json", "health", "--no-reboot"]);
    ok(&o);
    let st: serde_json::Value =
        serde_json::from_slice(&dev.run(&["--json", "status"]).stdout).unwrap();
    assert_eq!(st["problems"].as_array().unwrap().len(), 0, "{st}");
    // Nothing left to do.
    assert!(stdout(&dev.run(&["repair"])).contains("nothing to repair"));
}

#[test]
fn repair_rebuilds_a_corrupt_state_file_keeping_the_floor() {
    let dev = Device::new(1 << 20);
    let v7 = dev.bundle(
        "v7",
        &BundleOpts {
            security_version: 7,
            ..Default::default()
        },
    );
    ok(&dev.run(&["apply", "--no-reboot", v7.to_str().unwrap()]));
    dev.boot();
    ok(&dev.run(&["mark-good"]));
    std::fs::write(dev.path("state/state.json"), b"\0\0\0 torn").unwrap();
    let o = dev.run(&["repair"]);
    ok(&o);
    assert!(stdout(&o).contains("moved to"), "{}", stdout(&o));
    let aside = std::fs::read_dir(dev.path("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .expect("the corrupt file kept aside");
    assert_eq!(std::fs::read(aside.path()).unwrap(), b"\0\0\0 torn");
    assert_eq!(dev.state_json().unwrap()["min_security_version"], 7);
    let old = dev.bundle(
        "old",
        &BundleOpts {
            security_version: 6,
            ..Default::default()
        },
    );
    let o = dev.run(&["apply", "--no-reboot", old.to_str().unwrap()]);
    assert_refused(&o, 18, "below the installed minimum 7");
    assert_eq!(dev.boot_state("B"), SlotBootState::Good);
}

#[test]
fn repair_without_a_known_booted_slot_refuses_to_guess() {
    let dev = Device::with_grub(1 << 20);
    std::fs::write(dev.path("grub/grubenv"), [0u8; grubenv::BLOCK_SIZE]).unwrap();
    std::fs::write(dev.path("grub/grubenv2"), [0u8; grubenv::BLOCK_SIZE]).unwrap();
    std::fs::write(dev.path("cmdline"), "ro quiet\n").unwrap();
    let o = dev.run(&["repair"]);
    assert_refused(&o, 21, "the booted slot is unknown");
}
