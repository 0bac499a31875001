//! The agent in QEMU, unattended: the v1 disk of `scenarios.rs` with the agent switched on on
//! its data partition (so the slot's init starts `edge-ota agent run` after the health gate,
//! and the new slot's init starts it again to report). Nobody types an update command: a stick
//! is hot-plugged through QEMU's monitor, or a desired-state file names a URL on the host, and
//! the test only watches the console, the agent's API and `/metrics`, the guest's status and
//! the disk.

use std::time::{Duration, Instant};

use qemu_tests::artifacts::{self, Artifacts};
use qemu_tests::disk;
use qemu_tests::require_qemu;
use qemu_tests::scenario::{slot_boot_state, timed, BOOT, CMD};
use qemu_tests::vm::{Vm, VmConfig};

/// From the agent seeing a bundle to the reboot: stage (44 MB), apply, import, under TCG.
const UPDATE: Duration = Duration::from_secs(300);

/// A private v1 disk whose data partition switches the agent on.
fn agent_disk(a: &Artifacts, scenario: &str) -> std::path::PathBuf {
    let d = a.fresh_disk(scenario);
    disk::write_ext4_file(&d, "data", artifacts::AGENT_ENABLED_FILE, b"");
    d
}

/// Slot `slot` running `version` passed its health gate, its init started the agent, and the
/// shell answers.
fn wait_ready_with_agent(vm: &mut Vm, slot: &str, version: &str) {
    vm.wait_for(&format!("edge-init: slot={slot} version={version}"), BOOT);
    vm.wait_for("edge-init: agent started", BOOT);
    vm.wait_for("edge-init: ready", BOOT);
    vm.ok("true", CMD);
}

/// The agent's status through its API (`edge-ota --json agent status` talks HTTP on its Unix
/// socket). The agent prints its notices on the same console: those lines are dropped, the
/// answer is the rest from the line `{` to the line `}`. Right after init started it, the
/// agent may not listen yet: asked again for up to a minute.
fn agent_status(vm: &mut Vm) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out) = vm.run("edge-ota --json agent status", CMD);
        if code == 0 {
            let lines: Vec<&str> = out
                .lines()
                .filter(|l| !l.starts_with("edge-ota agent:") && !l.starts_with("edge-ota-agent:"))
                .collect();
            let json = lines
                .iter()
                .position(|l| *l == "{")
                .zip(lines.iter().rposition(|l| *l == "}"))
                .map(|(from, to)| lines[from..=to].join("\n"));
            return json
                .and_then(|j| serde_json::from_str(&j).ok())
                .unwrap_or_else(|| panic!("no status JSON in:\n{out}"));
        }
        assert!(
            Instant::now() < deadline,
            "the agent's API does not answer (exit {code}):\n{out}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Ask the agent until it is in one of `phases` (polling: it gets there by itself; every few
/// seconds, as each question costs the one emulated CPU the agent works on); the last status.
fn wait_phase(vm: &mut Vm, phases: &[&str], timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = agent_status(vm);
        if phases.iter().any(|p| st["agent"]["phase"] == *p) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not reach {phases:?} within {timeout:?}: {st}"
        );
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// When the agent's history says it entered `phase` (the last time).
fn entered(st: &serde_json::Value, phase: &str) -> u64 {
    st["agent"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|t| t["to"] == phase)
        .and_then(|t| t["at"].as_u64())
        .unwrap_or_else(|| panic!("no transition to {phase} in {st}"))
}

/// `/metrics` of the guest's agent, read in the guest (busybox wget).
fn metrics(vm: &mut Vm) -> String {
    vm.ok(
        &format!(
            "wget -q -O - http://127.0.0.1:{}/metrics",
            artifacts::AGENT_METRICS_PORT
        ),
        CMD,
    )
}

/// The new slot runs, is confirmed, and the agent says so: API and status.
fn assert_succeeded_on_b(vm: &mut Vm) -> serde_json::Value {
    let st = wait_phase(vm, &["succeeded", "failed", "gave-up"], BOOT);
    let a = &st["agent"];
    assert_eq!(a["phase"], "succeeded", "{st}");
    assert_eq!(a["last_result"]["result"], "succeeded", "{st}");
    assert_eq!(a["last_result"]["target"], "2.0.0", "{st}");
    assert_eq!(st["running"]["slot"], "B", "{st}");
    assert_eq!(st["running"]["version"], "2.0.0", "{st}");
    let s = vm.status();
    assert_eq!(s["booted"], "B");
    assert_eq!(slot_boot_state(&s, "B"), "good", "{s}");
    assert_eq!(slot_boot_state(&s, "A"), "good", "{s}");
    assert_eq!(s["fallback"], false);
    st
}

#[test]
fn agent_applies_hot_plugged_usb_stick() {
    require_qemu!("agent_applies_hot_plugged_usb_stick");
    timed("agent_applies_hot_plugged_usb_stick", || {
        let a = artifacts::get();
        let d = agent_disk(a, "agent-usb");
        let usb = a.usb_stick("agent-usb", &a.bundle_v2);
        let qmp = a.work.join("runs/agent-usb/qmp.sock");
        let mut vm = Vm::start(&VmConfig {
            name: "agent-usb",
            disk: &d,
            usb_controller: true,
            qmp: Some(&qmp),
            log_dir: &a.work.join("logs"),
            ..VmConfig::default()
        });
        wait_ready_with_agent(&mut vm, "A", "1.0.0");
        // Nothing to do until the stick arrives.
        let st = agent_status(&mut vm);
        assert_eq!(st["agent"]["phase"], "idle", "{st}");
        assert!(st["agent"]["desired"].is_null(), "{st}");
        vm.ok("[ ! -b /dev/sda ]", CMD);

        vm.plug_usb_stick("stick", &usb);
        // From here on nobody types: the agent finds the stick, stages, applies, imports the
        // container images and reboots by itself.
        vm.wait_for("removable media /dev/sda: bundle 2.0.0", UPDATE);
        vm.wait_for("edge-grub: booting B", UPDATE);
        wait_ready_with_agent(&mut vm, "B", "2.0.0");
        let st = assert_succeeded_on_b(&mut vm);
        assert_eq!(st["agent"]["desired"]["origin"], "media:/dev/sda", "{st}");
        for phase in ["staging", "applying", "importing", "rebooting", "verifying"] {
            entered(&st, phase);
        }
        // The bundle's container images were loaded before the reboot, from the stick.
        let ls = vm.ok("ctr -n k8s.io images ls", CMD);
        assert!(
            ls.lines().any(|l| l.starts_with(&a.container_image.name)
                && l.contains(&a.container_image.digest)
                && l.contains("io.cri-containerd.pinned=pinned")),
            "{ls}"
        );
        vm.shutdown(BOOT);
        let env = disk::grubenv(&d, &a.layout);
        assert_eq!(env["EDGE_ORDER"], "B A");
        assert_eq!(env["EDGE_B_STATE"], "good");
    });
}

/// A daily window opening at `at` (unix seconds, UTC) to the second, 10 minutes long.
fn window_at(at: u64) -> serde_json::Value {
    let (s, m, h) = (at % 60, at / 60 % 60, at / 3600 % 24);
    serde_json::json!({"schedule": format!("{s} {m} {h} * * *"), "duration": "10m", "timeZone": "UTC"})
}

#[test]
fn agent_stages_over_flaky_link_then_applies_in_window() {
    require_qemu!("agent_stages_over_flaky_link_then_applies_in_window");
    if edge_ota_testkit::Nginx::find().is_none() {
        edge_ota::testing::skip(
            "agent_stages_over_flaky_link_then_applies_in_window",
            "nginx is not installed",
        );
        return;
    }
    timed(
        "agent_stages_over_flaky_link_then_applies_in_window",
        || {
            let a = artifacts::get();
            let d = agent_disk(a, "agent-window");
            let root = a.work.join("runs/agent-window/www");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::copy(&a.bundle_v2, root.join("v2.eota")).unwrap();
            let size = std::fs::metadata(&a.bundle_v2).unwrap().len();
            let nginx = edge_ota_testkit::Nginx::start(&root).unwrap();
            // The link drops the first connection a little past half the bundle; the second one
            // has less than that left to carry, so there is exactly one drop to resume from.
            let proxy = edge_ota_testkit::Proxy::start(
                "127.0.0.1:0",
                &nginx.origin(),
                edge_ota_testkit::Faults {
                    drop_every: Some(size * 55 / 100),
                    ..Default::default()
                },
            )
            .unwrap();
            let url = format!("http://10.0.2.2:{}/v2.eota", proxy.addr().port());
            let mut vm = Vm::start(&VmConfig {
                name: "agent-window",
                disk: &d,
                net: true,
                log_dir: &a.work.join("logs"),
                ..VmConfig::default()
            });
            wait_ready_with_agent(&mut vm, "A", "1.0.0");

            // The desired state, with its window opening at `opens` (by the guest's clock, the one
            // the agent reads), written whole and renamed as a GitOps tool would.
            let desire = |vm: &mut Vm, opens: u64| {
                let doc = serde_json::json!({
                    "apiVersion": "edge-ota.io/v1alpha1",
                    "kind": "OSUpdate",
                    "metadata": {"name": "edge-2.0.0"},
                    "spec": {
                        "version": "2.0.0",
                        "sources": [url],
                        "stage": {"policy": "Immediately"},
                        "activation": {"policy": "Window", "windows": [window_at(opens)]},
                    },
                });
                let file = artifacts::AGENT_DESIRED_FILE;
                vm.ok(
                    &format!("echo '{doc}' > {file}.tmp && mv {file}.tmp {file}"),
                    CMD,
                );
            };
            let guest_now = |vm: &mut Vm| -> u64 { vm.ok("date +%s", CMD).trim().parse().unwrap() };
            // First the window is an hour away: the agent stages at once, then waits. Any phase
            // past staging ends the wait (and fails below) rather than running out the time.
            let later = guest_now(&mut vm) + 3600;
            desire(&mut vm, later);
            let st = wait_phase(
                &mut vm,
                &[
                    "staged",
                    "applying",
                    "importing",
                    "rebooting",
                    "failed",
                    "gave-up",
                ],
                UPDATE,
            );
            assert_eq!(st["agent"]["phase"], "staged", "{st}");
            assert_eq!(st["staged_version"], "2.0.0", "{st}");
            assert!(
                proxy.stats().connections >= 2,
                "no drop happened: {:?}",
                proxy.stats()
            );
            // Then the window moves to shortly from now (how long checking the staged copy takes
            // under TCG, and some): a new desired state, staged already, applied once it opens.
            let opens = guest_now(&mut vm) + 45;
            desire(&mut vm, opens);

            vm.wait_for("edge-grub: booting B", UPDATE);
            wait_ready_with_agent(&mut vm, "B", "2.0.0");
            let st = assert_succeeded_on_b(&mut vm);
            let applying_at = entered(&st, "applying");
            assert!(
                applying_at >= opens,
                "applied at {applying_at}, before the window opened at {opens}"
            );
            assert!(st["agent"]["desired"]["origin"]
                .as_str()
                .unwrap()
                .starts_with("file:"));
            let m = metrics(&mut vm);
            for line in [
                r#"edge_ota_running_info{slot="B",version="2.0.0"} 1"#,
                r#"edge_ota_last_result{result="succeeded",target="2.0.0"} 1"#,
                r#"edge_ota_agent_phase{phase="succeeded"} 1"#,
            ] {
                assert!(m.lines().any(|l| l == line), "no {line:?} in:\n{m}");
            }
            vm.shutdown(BOOT);
            let total = proxy.stats().body_bytes_sent;
            eprintln!("proxy: {:?} for a {size}-byte bundle", proxy.stats());
            assert!(
                total as f64 <= 1.05 * size as f64,
                "the server sent {total} bytes for a {size}-byte bundle"
            );
        },
    );
}

#[test]
fn agent_rolls_back_when_image_import_fails() {
    require_qemu!("agent_rolls_back_when_image_import_fails");
    timed("agent_rolls_back_when_image_import_fails", || {
        let a = artifacts::get();
        let d = agent_disk(a, "agent-bad-images");
        let usb = a.usb_stick("agent-bad-images", &a.bundle_bad_images);
        let slot_a = disk::partition_hash(&d, "rootfs-A");
        let mut vm = Vm::start(&VmConfig {
            name: "agent-bad-images",
            disk: &d,
            usb: Some(&usb),
            log_dir: &a.work.join("logs"),
            ..VmConfig::default()
        });
        wait_ready_with_agent(&mut vm, "A", "1.0.0");
        // The stick was there from the start: the agent takes it up by itself, writes B, and
        // containerd cannot unpack the image B would need.
        let st = wait_phase(
            &mut vm,
            &["failed", "gave-up", "rebooting", "verifying"],
            UPDATE,
        );
        let a_st = &st["agent"];
        assert_eq!(a_st["phase"], "failed", "{st}");
        assert_eq!(a_st["last_result"]["result"], "failed", "{st}");
        assert_eq!(a_st["last_result"]["target"], "2.0.0", "{st}");
        let reason = a_st["last_result"]["reason"].as_str().unwrap();
        assert!(
            reason.contains("ctr images import") && reason.contains("failed to extract layer"),
            "{reason}"
        );
        entered(&st, "importing");
        // B was written but is taken back: marked bad, never booted; A stays next.
        let s = vm.status();
        assert_eq!(s["booted"], "A");
        assert_eq!(s["next_boot"], "A", "{s}");
        assert_eq!(slot_boot_state(&s, "B"), "bad", "{s}");
        assert_eq!(slot_boot_state(&s, "A"), "good", "{s}");
        assert_eq!(st["running"]["slot"], "A", "{st}");
        let m = metrics(&mut vm);
        let line = r#"edge_ota_last_result{result="failed",target="2.0.0"} 1"#;
        assert!(m.lines().any(|l| l == line), "no {line:?} in:\n{m}");
        vm.shutdown(BOOT);
        let log = std::fs::read_to_string(a.work.join("logs/agent-bad-images.serial.log")).unwrap();
        assert_eq!(
            log.matches("edge-grub: booting").count(),
            1,
            "the VM rebooted"
        );
        // GRUB skips a bad slot whatever the order: A boots next.
        let env = disk::grubenv(&d, &a.layout);
        assert_eq!(env["EDGE_B_STATE"], "bad", "{env:?}");
        assert_eq!(env["EDGE_A_STATE"], "good", "{env:?}");
        assert_eq!(
            disk::partition_hash(&d, "rootfs-A"),
            slot_a,
            "slot A written"
        );
    });
}
