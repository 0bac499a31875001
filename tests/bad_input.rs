//! Hostile and broken bundles: each is refused with its exit code and a one-line message,
//! and leaves the device as it was (boot environment, state, and slot B untouched; B never
//! bootable).

mod common;

use common::*;
use edge_ota::bootloader::SlotBootState;
use edge_ota::bundle::PayloadKind;

/// Apply `bundle` and check the refusal left everything unchanged.
fn refused_unchanged(dev: &Device, bundle: &std::path::Path, code: i32, msg: &str) {
    let before = dev.snapshot();
    let o = dev.run(&["apply", "--no-reboot", bundle.to_str().unwrap()]);
    assert_refused(&o, code, msg);
    assert!(
        before == dev.snapshot(),
        "refused bundle changed the device"
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

fn corrupt(
    dev: &Device,
    src: &std::path::Path,
    name: &str,
    f: impl FnOnce(&mut Vec<u8>),
) -> std::path::PathBuf {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    let p = dev.path(name);
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn wrong_key_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            keys: vec!["INSECURE-demo-second.key.pem"],
            ..Default::default()
        },
    );
    refused_unchanged(&dev, &b, 13, "signed only by unknown keys");
}

#[test]
fn unsigned_bundle_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            keys: vec![],
            ..Default::default()
        },
    );
    refused_unchanged(&dev, &b, 13, "bundle is unsigned");
}

#[test]
fn below_threshold_is_refused() {
    let dev = Device::with_trust(
        1 << 20,
        &["INSECURE-demo.pub.pem", "INSECURE-demo-second.pub.pem"],
        2,
    );
    let one = dev.bundle("one", &BundleOpts::default());
    refused_unchanged(&dev, &one, 15, "1 valid, 2 required");
    let both = dev.bundle(
        "both",
        &BundleOpts {
            keys: vec!["INSECURE-demo.key.pem", "INSECURE-demo-second.key.pem"],
            ..Default::default()
        },
    );
    let o = dev.run(&["apply", "--no-reboot", both.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn flipped_bit_in_header_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    // magic, version, flags, reserved: malformed. A manifest length one off shifts where the
    // signatures block starts: malformed. A high length bit exceeds the limit. The signatures
    // length one off: malformed signatures block. Payload length: the manifest disagrees.
    for (byte, code, msg) in [
        (0usize, 10, "not an edge-ota bundle (bad magic)"),
        (8, 10, "unsupported format version"),
        (12, 10, "nonzero reserved header bytes"),
        (16, 10, "signatures block"),
        (23, 12, "manifest length"),
        (24, 10, "signatures block"),
        (32, 0, "payload length byte"),
        (39, 12, "payload length"),
        (40, 10, "nonzero reserved header bytes"),
        (63, 10, "nonzero reserved header bytes"),
    ] {
        let original = std::fs::read(&b).unwrap()[byte];
        let bad = corrupt(&dev, &b, &format!("h{byte}"), |v| v[byte] ^= 0x01);
        let before = dev.snapshot();
        let o = dev.run(&["apply", "--no-reboot", bad.to_str().unwrap()]);
        let (code, msg) = match (byte, original & 1) {
            // The payload length one up: the file is shorter than the header says; one down:
            // longer. Both are caught before the signatures are even read.
            (32, 0) => (11, "the header says"),
            (32, _) => (10, "trailing data"),
            _ => (code, msg),
        };
        assert_refused(&o, code, msg);
        assert!(
            before == dev.snapshot(),
            "header byte {byte} flip changed the device"
        );
    }
}

#[test]
fn flipped_bit_in_manifest_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let (_, m, _, _) = layout(&b);
    for off in [0, m / 2, m - 1] {
        let bad = corrupt(&dev, &b, "m", |v| v[64 + off] ^= 0x04);
        refused_unchanged(&dev, &bad, 14, "bad signature by key 083283e8ebdabafd");
    }
}

#[test]
fn flipped_bit_in_signature_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let (_, m, s, _) = layout(&b);
    let sigs = std::fs::read(&b).unwrap()[64 + m..64 + m + s].to_vec();
    let at = 64 + m + sigs.windows(7).position(|w| w == b"\"sig\":\"").unwrap() + 7 + 10;
    // Hex digit '0'..'9' or 'a'..'f' with bit 0 flipped stays a hex digit for most values;
    // either way the signature no longer verifies.
    let bad = corrupt(&dev, &b, "s", |v| {
        v[at] = if v[at] == b'1' { b'2' } else { b'1' }
    });
    refused_unchanged(&dev, &bad, 14, "bad signature");
}

#[test]
fn flipped_bit_in_each_chunk_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let (_, _, _, payload) = layout(&b);
    let m = {
        let mut f = std::fs::File::open(&b).unwrap();
        edge_ota::bundle::head::BundleHead::read(&mut f)
            .unwrap()
            .parse_unverified()
            .unwrap()
    };
    let chunks = &m.payloads[0].chunks;
    assert!(
        chunks.len() >= 8,
        "want several chunks, got {}",
        chunks.len()
    );
    for (i, c) in chunks.iter().enumerate().filter(|(_, c)| c.clen > 0) {
        // A fresh device each time: the same bundle id would otherwise resume, and skip the
        // chunks an earlier refused try had already written and verified.
        let dev = Device::new(1 << 20);
        let at = payload + c.offset as usize + c.clen as usize / 2;
        let bad = corrupt(&dev, &b, "c", |v| v[at] ^= 0x10);
        let o = dev.run(&["apply", "--no-reboot", bad.to_str().unwrap()]);
        assert_refused(&o, 16, &format!("tampered payload \"rootfs\": chunk {i} "));
        // The write had started: the slot must be marked not bootable and not installed.
        assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
        let st = dev.state_json().unwrap();
        assert_eq!(st["slots"]["B"]["status"], "installing");
        assert_eq!(st["min_security_version"], 0);
    }
}

#[test]
fn truncated_bundle_is_refused_at_several_points() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let len = std::fs::metadata(&b).unwrap().len() as usize;
    let (_, m, _, payload) = layout(&b);
    for cut in [
        0,
        10,
        64 + m / 2,
        payload - 1,
        payload + 3,
        (payload + len) / 2,
        len - 1,
    ] {
        let bad = corrupt(&dev, &b, "t", |v| v.truncate(cut));
        refused_unchanged(&dev, &bad, 11, "truncated bundle");
    }
}

#[test]
fn truncated_stream_on_stdin_leaves_slot_not_bootable() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let mut bytes = std::fs::read(&b).unwrap();
    bytes.truncate(bytes.len() - 1000);
    let o = dev.run_stdin(&["apply", "--no-reboot", "-"], &bytes);
    assert_refused(
        &o,
        11,
        "truncated bundle: ends inside payload \"rootfs\" chunk",
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
    assert_eq!(
        dev.state_json().unwrap()["slots"]["B"]["status"],
        "installing"
    );
}

#[test]
fn trailing_garbage_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let bad = corrupt(&dev, &b, "g", |v| v.extend_from_slice(b"garbage"));
    refused_unchanged(&dev, &bad, 10, "trailing data");
    // On a pipe the length is unknown up front: caught after the last chunk, before the flip.
    let o = dev.run_stdin(
        &["apply", "--no-reboot", "-"],
        &std::fs::read(&bad).unwrap(),
    );
    assert_refused(&o, 10, "trailing data after the last chunk");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn oversized_manifest_length_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let bad = corrupt(&dev, &b, "o", |v| {
        v[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes())
    });
    refused_unchanged(&dev, &bad, 12, "manifest length");
    let bad = corrupt(&dev, &b, "o2", |v| {
        v[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    refused_unchanged(&dev, &bad, 12, "signatures length");
}

/// Re-sign a manifest edited by `edit` (as a malicious or buggy builder holding the key could).
fn resigned(
    dev: &Device,
    src: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let (_, m, _, payload) = layout(src);
    // Format 2 stores the manifest zstd-compressed.
    let json = zstd::bulk::decompress(&bytes[64..64 + m], 64 << 20).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&json).unwrap();
    edit(&mut manifest);
    let mbytes = zstd::bulk::compress(&serde_json::to_vec(&manifest).unwrap(), 3).unwrap();
    let sigs = edge_ota_format::build::keys::sign(&mbytes, &[signing_key("INSECURE-demo.key.pem")]);
    let sbytes = serde_json::to_vec(&sigs).unwrap();
    let mut header = bytes[..64].to_vec();
    header[16..24].copy_from_slice(&(mbytes.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&(sbytes.len() as u64).to_le_bytes());
    let mut out = header;
    out.extend_from_slice(&mbytes);
    out.extend_from_slice(&sbytes);
    out.extend_from_slice(&bytes[payload..]);
    let p = dev.path(name);
    std::fs::write(&p, out).unwrap();
    p
}

#[test]
fn oversized_chunk_length_in_signed_manifest_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let bad = resigned(&dev, &b, "big", |m| {
        m["payloads"][0]["chunks"][0]["l"] = (64u64 << 20).into()
    });
    refused_unchanged(&dev, &bad, 12, "chunk 0: length 67108864");
}

#[test]
fn payload_target_escaping_the_slot_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            payloads: vec![(PayloadKind::File, "x", b"hello".to_vec())],
            ..Default::default()
        },
    );
    let bad = resigned(&dev, &b, "esc", |m| {
        m["payloads"][0]["target"] = "../../etc/passwd".into();
    });
    refused_unchanged(&dev, &bad, 10, "not a plain relative path");
}

#[test]
fn wrong_compatible_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            compatible: "other-board".into(),
            ..Default::default()
        },
    );
    refused_unchanged(
        &dev,
        &b,
        17,
        "wrong compatible: bundle is for \"other-board\"",
    );
}

#[test]
fn downgrade_is_refused() {
    let dev = Device::new(1 << 20);
    std::fs::create_dir_all(dev.path("state")).unwrap();
    std::fs::write(
        dev.path("state/state.json"),
        r#"{"version":1,"min_security_version":5,"slots":{}}"#,
    )
    .unwrap();
    let b = dev.bundle(
        "b",
        &BundleOpts {
            security_version: 4,
            ..Default::default()
        },
    );
    refused_unchanged(
        &dev,
        &b,
        18,
        "security version 4 is below the installed minimum 5",
    );
}

#[test]
fn expired_bundle_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            expires: Some(1_700_000_100),
            ..Default::default()
        },
    );
    refused_unchanged(&dev, &b, 19, "bundle expired at 1700000100");
}

#[test]
fn payload_larger_than_slot_is_refused() {
    let dev = Device::new(200_000);
    let b = dev.bundle("b", &BundleOpts::default());
    refused_unchanged(
        &dev,
        &b,
        20,
        "payload \"rootfs\" (300000 bytes) is larger than slot B",
    );
}

#[test]
fn target_is_booted_slot_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let before = dev.snapshot();
    let a_before = std::fs::read(dev.path("slotA")).unwrap();
    let o = dev.run(&["apply", "--no-reboot", "--slot", "A", b.to_str().unwrap()]);
    assert_refused(
        &o,
        21,
        "refusing to write slot \"A\": it is the booted slot",
    );
    assert!(before == dev.snapshot());
    assert_eq!(a_before, std::fs::read(dev.path("slotA")).unwrap());
}

#[test]
fn not_a_bundle_is_refused() {
    let dev = Device::new(1 << 20);
    let p = dev.path("junk");
    std::fs::write(&p, vec![0x42u8; 4096]).unwrap();
    refused_unchanged(&dev, &p, 10, "not an edge-ota bundle");
}

#[test]
fn legacy_zstd_frame_in_a_chunk_is_refused_before_decoding() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let (_, _, _, payload) = layout(&b);
    // The magic of a zstd v0.7 frame: the device must never hand it to a decoder.
    let bad = corrupt(&dev, &b, "legacy", |v| {
        v[payload..payload + 4].copy_from_slice(&0xFD2F_B527u32.to_le_bytes())
    });
    let o = dev.run(&["apply", "--no-reboot", bad.to_str().unwrap()]);
    assert_refused(&o, 16, "chunk 0 is not a zstd frame of the current format");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn unknown_field_in_a_chunk_entry_is_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle("b", &BundleOpts::default());
    let bad = resigned(&dev, &b, "field", |m| {
        m["payloads"][0]["chunks"][0]["x"] = 1.into();
    });
    refused_unchanged(&dev, &bad, 10, "unknown field `x`");
    let bad = resigned(&dev, &b, "field2", |m| {
        m["payloads"][0]["compression"] = "none".into();
    });
    refused_unchanged(&dev, &bad, 10, "unknown field `compression`");
}

#[test]
fn two_payloads_writing_the_same_file_are_refused() {
    let dev = Device::new(1 << 20);
    let b = dev.bundle(
        "b",
        &BundleOpts {
            payloads: vec![
                (PayloadKind::Image, "rootfs", image_bytes(100_000, 1)),
                (PayloadKind::File, "a.conf", b"one".to_vec()),
                (PayloadKind::File, "b.conf", b"two".to_vec()),
            ],
            ..Default::default()
        },
    );
    let bad = resigned(&dev, &b, "dup", |m| {
        m["payloads"][2]["target"] = "a.conf".into();
    });
    refused_unchanged(&dev, &bad, 10, "both write file target \"a.conf\"");
}
