//! The updater killed (SIGKILL) at each step that commits state: afterwards the bootloader
//! boots a good slot, the half-done slot is never bootable, and a second apply completes.
//! Needs the `failpoints` feature: `cargo test --features failpoints --test crash_points`.
#![cfg(feature = "failpoints")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;
use edge_ota::bootloader::{Bootloader, SlotBootState};

/// Start an apply that stops dead at `point`, wait for the marker, kill it.
fn kill_at(dev: &Device, bundle: &std::path::Path, point: &str) {
    let mut child = dev
        .cmd()
        .args(["apply", "--no-reboot", "-q", bundle.to_str().unwrap()])
        .env("EDGE_OTA_FAILPOINT", point)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().expect("failpoint marker").unwrap();
    assert!(
        line.contains(edge_ota::failpoint::MARKER),
        "{point}: {line}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

fn crash_then_retry(point: &str, b_after_crash: SlotBootState) {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    kill_at(&dev, &b, point);
    assert_eq!(
        dev.boot_state("B"),
        b_after_crash,
        "after a crash at {point}"
    );
    assert_eq!(
        dev.bootloader().next_boot().unwrap().as_deref(),
        Some(if b_after_crash == SlotBootState::Bad {
            "A"
        } else {
            "B"
        })
    );
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "retry after {point}: {}",
        stderr(&o)
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
    assert_eq!(
        dev.state_json().unwrap()["slots"]["B"]["status"],
        "installed"
    );
}

#[test]
fn crash_after_marking_target_bad() {
    crash_then_retry("after-mark-bad", SlotBootState::Bad);
}

#[test]
fn crash_early_in_the_write() {
    crash_then_retry("chunks:2", SlotBootState::Bad);
}

#[test]
fn crash_mid_write() {
    crash_then_retry("chunks:6", SlotBootState::Bad);
}

#[test]
fn crash_after_write_before_flip() {
    crash_then_retry("before-flip", SlotBootState::Bad);
}

#[test]
fn crash_after_flip_boots_the_new_slot() {
    crash_then_retry("after-flip", SlotBootState::Trying { tries_left: 3 });
}
