//! Installing good bundles through the CLI: file and pipe sources, several payload kinds,
//! `verify` writing nothing, `info` and `status --json`.

mod common;

use common::*;
use edge_ota::bootloader::SlotBootState;
use edge_ota::bundle::PayloadKind;

#[test]
fn apply_from_file_writes_inactive_slot_and_makes_it_primary() {
    let dev = Device::new(1 << 20);
    let image = image_bytes(300_000, 1);
    let a_before = std::fs::read(dev.path("slotA")).unwrap();
    let b = dev.bundle("b", &BundleOpts::default());
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let slot_b = std::fs::read(dev.path("slotB")).unwrap();
    assert_eq!(&slot_b[..image.len()], &image[..]);
    assert!(
        slot_b[image.len()..].iter().all(|&x| x == 0xAA),
        "wrote past the payload"
    );
    assert_eq!(
        a_before,
        std::fs::read(dev.path("slotA")).unwrap(),
        "running slot touched"
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
    let st = dev.state_json().unwrap();
    assert_eq!(st["slots"]["B"]["status"], "installed");
    assert_eq!(st["slots"]["B"]["version"], "2.0.0");
    // Installing does not raise the anti-rollback floor; confirming does.
    assert_eq!(st["min_security_version"], 0);
}

#[test]
fn apply_from_stdin_matches_apply_from_file() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let o = dev.run_stdin(
        &["apply", "--no-reboot", "--tries", "2", "-"],
        &std::fs::read(&b).unwrap(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let image = image_bytes(300_000, 1);
    assert_eq!(
        &std::fs::read(dev.path("slotB")).unwrap()[..image.len()],
        &image[..]
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 2 });
}

#[test]
fn file_payloads_land_in_the_slot_directory() {
    let dev = Device::new(1 << 20);
    let kernel = image_bytes(70_000, 3);
    let images = image_bytes(90_000, 4);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            payloads: vec![
                (PayloadKind::Image, "rootfs", image_bytes(200_000, 2)),
                (PayloadKind::Kernel, "vmlinuz", kernel.clone()),
                (
                    PayloadKind::ContainerImages,
                    "k8s-images.tar",
                    images.clone(),
                ),
            ],
            ..Default::default()
        },
    );
    let o = dev.run(&["--json", "apply", "--no-reboot", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["version"], 1);
    assert_eq!(report["slot"], "B");
    assert_eq!(
        std::fs::read(dev.path("filesB/boot/vmlinuz")).unwrap(),
        kernel
    );
    assert_eq!(
        std::fs::read(dev.path("filesB/images/k8s-images.tar")).unwrap(),
        images
    );
    assert!(!dev.path("filesA").exists(), "running slot's files touched");
}

#[test]
fn verify_checks_everything_and_writes_nothing() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let before = dev.snapshot();
    let o = dev.run(&["verify", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("OK: edge-test version 2.0.0"));
    assert!(before == dev.snapshot());
    // A tampered chunk is found by verify too, still without writing.
    let mut bytes = std::fs::read(&b).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 1;
    let bad = dev.path("bad");
    std::fs::write(&bad, bytes).unwrap();
    let o = dev.run(&["verify", bad.to_str().unwrap()]);
    assert_refused(&o, 16, "tampered payload");
    assert!(before == dev.snapshot());
}

#[test]
fn info_shows_manifest_and_signers() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let o = dev.run(&["--json", "info", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["verification"], "verified");
    assert_eq!(v["manifest"]["security_version"], 2);
    assert_eq!(v["verified_signers"][0], "083283e8ebdabafd");
}

#[test]
fn info_without_configuration_verifies_nothing_and_names_no_signer() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_edge-ota"))
        .args(["--config", "/nonexistent/config.toml", "info"])
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("signatures: not verified: no configuration"),
        "{text}"
    );
    assert!(text.contains("signed by (verified): nobody"), "{text}");
    assert!(
        !text.contains("083283e8ebdabafd"),
        "claimed key id shown: {text}"
    );
}

#[test]
fn info_with_a_forged_key_id_names_no_signer() {
    // Signed by an untrusted key whose entry claims the trusted key's id.
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            keys: vec!["INSECURE-demo-second.key.pem"],
            ..Default::default()
        },
    );
    let mut bytes = std::fs::read(&b).unwrap();
    let (_, m, s, _) = layout(&b);
    let sigs = String::from_utf8(bytes[64 + m..64 + m + s].to_vec()).unwrap();
    let claimed = sigs.split("\"key_id\":\"").nth(1).unwrap()[..16].to_string();
    let forged = sigs.replace(&claimed, "083283e8ebdabafd");
    bytes.splice(64 + m..64 + m + s, forged.bytes());
    std::fs::write(&b, &bytes).unwrap();
    let o = dev.run(&["--json", "info", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(14), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified_signers"].as_array().unwrap().len(), 0);
    assert!(v["verification"]
        .as_str()
        .unwrap()
        .starts_with("FAILED: bad signature"));
}

#[test]
fn info_with_a_broken_configuration_is_a_configuration_error() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    std::fs::write(&dev.config, "compatible = 1\n").unwrap();
    let o = dev.run(&["info", b.to_str().unwrap()]);
    assert_refused(&o, 3, "configuration");
}

#[test]
fn status_json_reports_slots_and_pending_update() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    assert!(dev
        .run(&["apply", "--no-reboot", b.to_str().unwrap()])
        .status
        .success());
    let o = dev.run(&["--json", "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["booted"], "A");
    assert_eq!(v["next_boot"], "B");
    assert_eq!(v["pending_reboot"], true);
    assert_eq!(v["fallback"], false);
    assert_eq!(v["slots"][1]["boot"]["state"], "trying");
    assert_eq!(v["slots"][1]["boot"]["tries_left"], 3);
    assert_eq!(v["slots"][1]["version"], "2.0.0");
}

#[test]
fn reapply_after_interrupted_install_completes() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    // A truncated pipe leaves B half written and marked installing...
    let bytes = std::fs::read(&b).unwrap();
    let o = dev.run_stdin(&["apply", "--no-reboot", "-"], &bytes[..bytes.len() / 2]);
    assert_eq!(o.status.code(), Some(11));
    assert_eq!(
        dev.state_json().unwrap()["slots"]["B"]["status"],
        "installing"
    );
    // ...mark-active refuses to boot it, and a retry finishes the job.
    let o = dev.run(&["mark-active", "B"]);
    assert_refused(&o, 21, "unfinished install");
    assert!(dev
        .run(&["apply", "--no-reboot", b.to_str().unwrap()])
        .status
        .success());
    assert_eq!(
        dev.state_json().unwrap()["slots"]["B"]["status"],
        "installed"
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
}

#[test]
fn cli_definition_is_consistent() {
    use clap::CommandFactory;
    edge_ota::cli::Cli::command().debug_assert();
}

#[test]
fn format_1_bundle_still_applies() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "v1.eota",
        &BundleOpts {
            format: 1,
            ..Default::default()
        },
    );
    assert_eq!(&std::fs::read(&b).unwrap()[8..12], &1u32.to_le_bytes());
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let image = image_bytes(300_000, 1);
    assert_eq!(
        &std::fs::read(dev.path("slotB")).unwrap()[..image.len()],
        &image[..]
    );
    // And from a pipe.
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "v1.eota",
        &BundleOpts {
            format: 1,
            ..Default::default()
        },
    );
    let o = dev.run_stdin(&["apply", "--no-reboot", "-"], &std::fs::read(&b).unwrap());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
}
