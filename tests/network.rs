//! Updates over the network, each test named after the fault or the saving it covers: a real
//! origin (Debian's nginx) behind the fault-injecting proxy of `edge-ota-testkit`, the real
//! `edge-ota` binary, file-backed slots. Bytes on the wire are counted by the proxy.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use edge_ota::bootloader::SlotBootState;
use edge_ota_testkit::{Faults, Nginx, Proxy};

/// A v1-like image: pseudo-random, text and zeros, a multiple of 4 KiB (deltas work on blocks).
fn v1_image() -> Vec<u8> {
    image_bytes(1 << 20, 1)
}

/// v2: v1 with a few blocks changed in place, some moved, some new.
fn v2_image() -> Vec<u8> {
    let mut v = v1_image();
    for b in [3usize, 40, 77] {
        v[b * 4096 + 100..b * 4096 + 140].copy_from_slice(&[0x5a; 40]);
    }
    let moved = v[100 * 4096..110 * 4096].to_vec();
    v[150 * 4096..160 * 4096].copy_from_slice(&moved);
    let fresh = image_bytes(8 * 4096, 99);
    v[20 * 4096..28 * 4096].copy_from_slice(&fresh);
    v
}

struct Site {
    _root: tempfile::TempDir,
    nginx: Nginx,
    proxy: Proxy,
}

/// Serve `bundle` as `/b.eota` through a proxy with `faults`; `None` (test skipped, or failed
/// under EDGE_OTA_REQUIRE_ALL) without nginx.
fn serve(bundle: &std::path::Path, faults: Faults, test: &str) -> Option<Site> {
    if Nginx::find().is_none() {
        edge_ota::testing::skip(test, "nginx is not installed (apt-get install nginx-light)");
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(bundle, root.path().join("b.eota")).unwrap();
    let nginx = Nginx::start(root.path()).unwrap();
    let proxy = Proxy::start("127.0.0.1:0", &nginx.origin(), faults).unwrap();
    Some(Site {
        _root: root,
        nginx,
        proxy,
    })
}

fn url(site: &Site) -> String {
    site.proxy.url("/b.eota")
}

/// A device whose running slot A holds `v1_image()`, recorded as its installed image
/// (version 1.0.0), so a delta from it can be used.
fn device_running_v1() -> Device {
    let dev = Device::new(2 << 20);
    let v1 = v1_image();
    let mut slot = std::fs::read(dev.path("slotA")).unwrap();
    slot[..v1.len()].copy_from_slice(&v1);
    std::fs::write(dev.path("slotA"), slot).unwrap();
    let mut st = edge_ota::state::State::default();
    let a = st.slot_mut("A");
    a.status = edge_ota::state::SlotStatus::Installed;
    a.version = Some("1.0.0".into());
    a.image = Some(edge_ota::state::ImageRecord {
        size: v1.len() as u64,
        blake3: edge_ota::bundle::Digest::of(&v1),
    });
    std::fs::create_dir_all(dev.path("state")).unwrap();
    edge_ota::state::StateStore::new(dev.path("state"))
        .save(&st)
        .unwrap();
    dev
}

fn v2_bundle(dev: &Device, with_delta: bool) -> std::path::PathBuf {
    dev.bundle(
        "v2.eota",
        &BundleOpts {
            payloads: vec![(edge_ota::bundle::PayloadKind::Image, "rootfs", v2_image())],
            chunk_size: 64 << 10,
            deltas: if with_delta {
                vec![(v1_image(), "1.0.0")]
            } else {
                vec![]
            },
            ..Default::default()
        },
    )
}

fn ok(o: &std::process::Output) {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
}

fn installed_v2(dev: &Device) {
    let v2 = v2_image();
    assert_eq!(
        &std::fs::read(dev.path("slotB")).unwrap()[..v2.len()],
        &v2[..]
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
}

#[test]
fn apply_over_http_streams_every_chunk_once() {
    let dev = device_running_v1();
    let b = v2_bundle(&dev, false);
    let Some(site) = serve(
        &b,
        Faults::default(),
        "apply_over_http_streams_every_chunk_once",
    ) else {
        return;
    };
    ok(&dev.run(&["apply", "--no-reboot", &url(&site)]));
    installed_v2(&dev);
    let size = std::fs::metadata(&b).unwrap().len();
    let sent = site.proxy.stats().body_bytes_sent;
    assert!(
        sent as f64 <= 1.05 * size as f64,
        "{sent} bytes on the wire for a {size}-byte bundle"
    );
}

#[test]
fn delta_from_the_running_slot_fetches_a_fraction_of_the_bundle() {
    let dev = device_running_v1();
    let b = v2_bundle(&dev, true);
    let Some(site) = serve(&b, Faults::default(), "delta_from_the_running_slot") else {
        return;
    };
    let o = dev.run(&["--json", "apply", "--no-reboot", &url(&site)]);
    ok(&o);
    installed_v2(&dev);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["delta_from"], "1.0.0");
    let head = layout(&b).3 as u64;
    let m = {
        let mut f = std::fs::File::open(&b).unwrap();
        edge_ota::bundle::head::BundleHead::read(&mut f)
            .unwrap()
            .parse_unverified()
            .unwrap()
    };
    let full = m.payloads[0].compressed_len();
    let delta: u64 = m.payloads[0].deltas[0]
        .frames
        .iter()
        .map(|f| u64::from(f.clen))
        .sum();
    let sent = site.proxy.stats().body_bytes_sent;
    assert!(delta < full / 3, "delta {delta} vs full {full}");
    assert!(
        sent <= head + delta + 64 * 1024,
        "{sent} bytes on the wire: head {head} + delta {delta} expected"
    );
    assert_eq!(r["bytes_fetched"], delta);
}

#[test]
fn killed_mid_download_resumes_without_fetching_twice() {
    let dev = device_running_v1();
    // Without a delta, every chunk comes from the network: a slow link, then a kill.
    let dev = {
        drop(dev);
        Device::new(8 << 20)
    };
    let b = dev.bundle(
        "big.eota",
        &BundleOpts {
            payloads: vec![(
                edge_ota::bundle::PayloadKind::Image,
                "rootfs",
                image_bytes(6 << 20, 7),
            )],
            ..Default::default()
        },
    );
    let faults = Faults {
        throttle: Some(1 << 20),
        ..Default::default()
    };
    let Some(site) = serve(&b, faults, "killed_mid_download_resumes") else {
        return;
    };
    let m = {
        let mut f = std::fs::File::open(&b).unwrap();
        edge_ota::bundle::head::BundleHead::read(&mut f)
            .unwrap()
            .parse_unverified()
            .unwrap()
    };
    let size = std::fs::metadata(&b).unwrap().len();
    // Compressed bytes of the chunks the state lists as done (zero chunks cost nothing).
    let done_bytes = |st: &serde_json::Value| -> u64 {
        st["slots"]["B"]["progress"]["done"][0]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .flat_map(|r| r[0].as_u64().unwrap()..r[1].as_u64().unwrap())
                    .map(|i| u64::from(m.payloads[0].chunks[i as usize].clen))
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut child = dev
        .cmd()
        .args(["apply", "--no-reboot", "-q", &url(&site)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a checkpoint covering a good share of the bundle, then cut.
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let n = dev.state_json().map_or(0, |s| done_bytes(&s));
        if n >= size * 2 / 5 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint covering 40% of the bundle"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let first = site.proxy.stats().body_bytes_sent;
    site.proxy.set_faults(Faults::default());
    let o = dev.run(&["--json", "apply", "--no-reboot", "-q", &url(&site)]);
    ok(&o);
    let second = site.proxy.stats().body_bytes_sent - first;
    // Everything arrived once, give or take what the kill cut off: bytes spooled since the
    // cache last listed them (at most 512 KiB or one second of the link) and bytes still in
    // the sockets.
    let lost_at_most = (512 + 256) << 10;
    assert!(
        first + second <= size + lost_at_most,
        "{first} + {second} bytes on the wire for a {size}-byte bundle ({done} were in the slot)"
    );
    // The second apply fetched what was missing (plus the head again, and small gaps the
    // client reads through rather than splitting a request), not the chunks done.
    assert!(
        second as f64 <= 1.05 * (size - done) as f64 + 64.0 * 1024.0,
        "the resumed apply fetched {second} of {size}, {done} were already in the slot"
    );
    let image = image_bytes(6 << 20, 7);
    assert_eq!(
        &std::fs::read(dev.path("slotB")).unwrap()[..image.len()],
        &image[..]
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
}

#[test]
fn data_budget_refuses_before_anything_is_written() {
    let dev = device_running_v1();
    let b = v2_bundle(&dev, false);
    let Some(site) = serve(&b, Faults::default(), "data_budget_refuses") else {
        return;
    };
    let before = dev.snapshot();
    let o = dev.run(&[
        "apply",
        "--no-reboot",
        "--max-download",
        "10000",
        &url(&site),
    ]);
    assert_refused(&o, 27, "the budget is 10000");
    assert!(
        before == dev.snapshot(),
        "a refused update changed the device"
    );
}

#[test]
fn bundle_replaced_on_the_server_mid_download_is_refused() {
    let dev = device_running_v1();
    let b = v2_bundle(&dev, false);
    let other = dev.bundle(
        "other.eota",
        &BundleOpts {
            version: "3.0.0",
            ..Default::default()
        },
    );
    let Some(site) = serve(
        &b,
        Faults {
            swap: Some((200 << 10, "/other.eota".into())),
            // A drop after the swap makes the client ask again, and meet the other file.
            drop_every: Some(300 << 10),
            ..Default::default()
        },
        "bundle_replaced_on_the_server",
    ) else {
        return;
    };
    std::fs::copy(&other, site._root.path().join("other.eota")).unwrap();
    let o = dev.run(&["apply", "--no-reboot", &url(&site)]);
    assert_refused(&o, 26, "source changed");
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
}

#[test]
fn fetch_then_apply_offline_uses_only_the_staged_bytes() {
    let dev = device_running_v1();
    let b = v2_bundle(&dev, false);
    let Some(mut site) = serve(&b, Faults::default(), "fetch_then_apply_offline") else {
        return;
    };
    let u = url(&site);
    let o = dev.run(&["--json", "fetch", &u]);
    ok(&o);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["complete"], true);
    let text = stdout(&dev.run(&["status"]));
    assert!(
        text.contains("staged:") && text.contains("complete"),
        "{text}"
    );
    // Staging wrote nothing a bootloader sees.
    assert_eq!(dev.boot_state("B"), SlotBootState::Bad);
    // At sea: no server at all.
    site.nginx.stop();
    let requests = site.proxy.stats().requests;
    ok(&dev.run(&["apply", "--no-reboot", "--offline", &u]));
    installed_v2(&dev);
    assert_eq!(
        site.proxy.stats().requests,
        requests,
        "--offline touched the network"
    );
    // Installed: the staged copy is gone.
    assert!(!stdout(&dev.run(&["status"])).contains("staged:"));
}

#[test]
fn apply_offline_with_nothing_staged_is_refused() {
    let dev = device_running_v1();
    let before = dev.snapshot();
    let o = dev.run(&[
        "apply",
        "--no-reboot",
        "--offline",
        "http://127.0.0.1:9/b.eota",
    ]);
    assert_refused(&o, 28, "nothing staged from http://127.0.0.1:9/b.eota");
    assert!(before == dev.snapshot());
}

#[test]
fn fetch_interrupted_by_a_full_disk_marks_nothing_complete_and_a_retry_succeeds() {
    if !edge_ota::testing::is_root() {
        edge_ota::testing::skip(
            "fetch_interrupted_by_a_full_disk",
            "needs root to mount a tmpfs",
        );
        return;
    }
    let dev = device_running_v1();
    let b = dev.bundle(
        "big.eota",
        &BundleOpts {
            payloads: vec![(
                edge_ota::bundle::PayloadKind::Image,
                "rootfs",
                image_bytes(1 << 20, 8),
            )],
            ..Default::default()
        },
    );
    let Some(site) = serve(
        &b,
        Faults {
            throttle: Some(300 << 10),
            ..Default::default()
        },
        "fetch_interrupted_by_a_full_disk",
    ) else {
        return;
    };
    let cache = dev.path("cache");
    std::fs::create_dir(&cache).unwrap();
    let m = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(m.success());
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(cache.clone());
    dev.edit_config(|c| {
        c.replace(
            "[trust]",
            &format!("cache_dir = \"{}\"\n[trust]", cache.display()),
        )
    });
    let child = dev
        .cmd()
        .args(["fetch", "--progress", "none", &url(&site)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the fetch has committed some bytes, something else fills the disk.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let staged = std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("index.json")).ok())
            .any(|b| String::from_utf8_lossy(&b).contains("\"present\": [\n    ["));
        if staged {
            break;
        }
        assert!(Instant::now() < deadline, "the fetch committed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let filler = cache.join("filler");
    let _ = std::fs::write(&filler, vec![1u8; 4 << 20]);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(20), "{err}");
    assert!(err.contains("free space in"), "{err}");
    let st: serde_json::Value =
        serde_json::from_slice(&dev.run(&["--json", "status"]).stdout).unwrap();
    assert_eq!(st["staged"][0]["complete"], false, "{st}");
    // Space again: the retry continues and completes.
    std::fs::remove_file(&filler).unwrap();
    site.proxy.set_faults(Faults::default());
    let before = site.proxy.stats().body_bytes_sent;
    ok(&dev.run(&["fetch", "--progress", "none", &url(&site)]));
    let size = std::fs::metadata(&b).unwrap().len();
    assert!(
        site.proxy.stats().body_bytes_sent - before < size,
        "the retry started over"
    );
    ok(&dev.run(&["apply", "--no-reboot", "--offline", &url(&site)]));
    let image = image_bytes(1 << 20, 8);
    assert_eq!(
        &std::fs::read(dev.path("slotB")).unwrap()[..image.len()],
        &image[..]
    );
}
