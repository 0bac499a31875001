//! The agent end to end on the host: the real `edge-ota agent` process, a desired-state file,
//! a real HTTP origin (Debian's nginx), file-backed slots, the local API on its Unix socket
//! and `/metrics` over TCP. The reboot is simulated where the hardware would do it: the
//! configured reboot command leaves a mark, the test "powers on" (the boot script picks the
//! slot), runs the boot's `health` service, changes the boot id and starts the agent again.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edge_ota::bootloader::SlotBootState;
use edge_ota_testkit::Nginx;

/// A device running 1.0.0 on A, with an `[agent]` section: socket, metrics on a free port,
/// a desired-state file, boot id file, quick retries, a reboot command that leaves a mark.
fn agent_device() -> (Device, u16) {
    let dev = Device::new(2 << 20);
    let mut st = edge_ota::state::State::default();
    let a = st.slot_mut("A");
    a.status = edge_ota::state::SlotStatus::Installed;
    a.version = Some("1.0.0".into());
    std::fs::create_dir_all(dev.path("state")).unwrap();
    edge_ota::state::StateStore::new(dev.path("state"))
        .save(&st)
        .unwrap();
    std::fs::write(dev.path("boot_id"), "boot-1\n").unwrap();
    std::fs::write(dev.path("healthy"), "").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dev.path("").display().to_string();
    dev.edit_config(|c| {
        format!(
            r#"{c}
[agent]
socket = "{d}/agent.sock"
metrics = "127.0.0.1:{port}"
desired_file = "{d}/desired.yaml"
boot_id = "{d}/boot_id"
retry_secs = 1
[agent.reboot]
command = ["sh", "-c", "touch {d}/rebooted"]
"#
        )
    });
    (dev, port)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(dev: &Device) -> Agent {
    Agent(
        dev.cmd()
            .args(["agent", "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `edge-ota agent status` (the CLI through the API), as JSON.
fn status(dev: &Device) -> Option<serde_json::Value> {
    let o = dev.run(&["--json", "agent", "status"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn phase(dev: &Device) -> String {
    status(dev)
        .and_then(|s| s["agent"]["phase"].as_str().map(String::from))
        .unwrap_or_default()
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn desired(dev: &Device, version: &str, url: &str, activation: &str) {
    let text = format!(
        "apiVersion: edge-ota.io/v1alpha1\nkind: OSUpdate\nspec:\n  version: {version}\n  \
         sources: [\"{url}\"]\n  activation:\n{activation}\n"
    );
    // Written beside, then renamed in: the way a GitOps sync lands a file.
    let tmp = dev.path("desired.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dev.path("desired.yaml")).unwrap();
}

fn v2_bundle(dev: &Device, image: &[u8]) -> std::path::PathBuf {
    dev.bundle(
        "v2.eota",
        &BundleOpts {
            version: "2.0.0",
            payloads: vec![(
                edge_ota::bundle::PayloadKind::Image,
                "rootfs",
                image.to_vec(),
            )],
            ..Default::default()
        },
    )
}

fn origin(bundle: &Path, test: &str) -> Option<(tempfile::TempDir, Nginx)> {
    if Nginx::find().is_none() {
        edge_ota::testing::skip(test, "nginx is not installed (apt-get install nginx-light)");
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(bundle, root.path().join("v2.eota")).unwrap();
    let nginx = Nginx::start(root.path()).unwrap();
    Some((root, nginx))
}

#[test]
fn desired_file_over_http_is_staged_applied_in_its_window_rebooted_and_reported_succeeded() {
    let (dev, port) = agent_device();
    let image = image_bytes(1 << 20, 21);
    let b = v2_bundle(&dev, &image);
    let Some((_root, nginx)) = origin(&b, "agent_desired_file") else {
        return;
    };
    // A window that is always open (every minute, two minutes long): the window path, with
    // no waiting.
    desired(
        &dev,
        "2.0.0",
        &nginx.url("/v2.eota"),
        "    policy: Window\n    windows:\n      - {schedule: \"* * * * *\", duration: 2m, timeZone: UTC}",
    );
    let agent = start_agent(&dev);
    wait_for("the reboot", Duration::from_secs(120), || {
        dev.path("rebooted").exists()
    });
    // Before the reboot: B written, flipped, trying; A untouched and still good.
    assert_eq!(
        &std::fs::read(dev.path("slotB")).unwrap()[..image.len()],
        &image[..]
    );
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
    wait_for("phase rebooting", Duration::from_secs(10), || {
        phase(&dev) == "rebooting"
    });
    let s = status(&dev).unwrap();
    let trail: Vec<&str> = s["agent"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        trail,
        [
            "staging",
            "staged",
            "applying",
            "importing",
            "draining",
            "rebooting"
        ],
        "{s}"
    );

    // Power cycle: the boot script picks B, the boot's health service confirms it.
    drop(agent);
    assert_eq!(dev.boot(), "B");
    std::fs::write(dev.path("boot_id"), "boot-2\n").unwrap();
    let o = dev.run(&["health"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let _agent = start_agent(&dev);
    wait_for("phase succeeded", Duration::from_secs(30), || {
        phase(&dev) == "succeeded"
    });
    let s = status(&dev).unwrap();
    assert_eq!(s["agent"]["last_result"]["result"], "succeeded", "{s}");
    assert_eq!(s["running"]["slot"], "B");
    assert_eq!(s["running"]["version"], "2.0.0");
    let m = metrics(port);
    assert!(
        m.contains(r#"edge_ota_running_info{slot="B",version="2.0.0"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"edge_ota_last_result{result="succeeded",target="2.0.0"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"edge_ota_agent_phase{phase="succeeded"} 1"#),
        "{m}"
    );
    // Only the reboot it was told to do: the mark is from the one reboot.
    assert_eq!(dev.boot_state("A"), SlotBootState::Good);
}

#[test]
fn desired_state_below_the_running_release_is_never_applied() {
    let (dev, _port) = agent_device();
    let image = image_bytes(1 << 20, 22);
    // The origin offers 2.0.0; the device runs 1.0.0; the desired state asks for 0.9.0.
    let b = v2_bundle(&dev, &image);
    let Some((_root, nginx)) = origin(&b, "agent_desired_downgrade") else {
        return;
    };
    desired(&dev, "0.9.0", &nginx.url("/v2.eota"), "    policy: Now");
    let before = dev.snapshot();
    let _agent = start_agent(&dev);
    // It tries, finds the source holds another release than the one asked for, and says so.
    wait_for("a failure", Duration::from_secs(60), || {
        status(&dev).is_some_and(|s| s["agent"]["failures"].as_u64().unwrap_or(0) >= 1)
    });
    let s = status(&dev).unwrap();
    let why = s["agent"]["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("0.9.0"), "{s}");
    assert!(!dev.path("rebooted").exists());
    assert_eq!(
        dev.snapshot(),
        before,
        "a refused desired state changed the device"
    );
}

#[test]
fn malformed_desired_file_is_reported_and_nothing_starts() {
    let (dev, _port) = agent_device();
    std::fs::write(
        dev.path("desired.yaml"),
        "apiVersion: edge-ota.io/v1alpha1\nkind: OSUpdate\nspec:\n  verison: 2.0.0\n",
    )
    .unwrap();
    let _agent = start_agent(&dev);
    wait_for("the provider's complaint", Duration::from_secs(30), || {
        status(&dev).is_some_and(|s| s.to_string().contains("verison"))
    });
    assert_eq!(phase(&dev), "idle");
}

#[test]
fn manual_apply_while_the_agent_runs_is_refused_until_it_is_paused() {
    let (dev, _port) = agent_device();
    let image = image_bytes(1 << 20, 23);
    let b = v2_bundle(&dev, &image);
    let _agent = start_agent(&dev);
    wait_for("the API", Duration::from_secs(30), || {
        status(&dev).is_some()
    });
    let before = dev.snapshot();
    let o = dev.run(&["apply", "--no-reboot", b.to_str().unwrap()]);
    assert_refused(&o, 23, "the agent is running (phase idle) and owns updates");
    assert_eq!(dev.snapshot(), before);
    let o = dev.run(&["agent", "pause"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = dev.run(&["apply", "--no-reboot", "-q", b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(dev.boot_state("B"), SlotBootState::Trying { tries_left: 3 });
}
