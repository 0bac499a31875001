//! A LAN on this machine: network namespaces joined by veth pairs on a bridge, an upstream
//! in its own namespace reachable only from the base station, `edge-ota serve` as the base
//! station announcing itself by mDNS, and leaves (file-backed devices, the real binary run
//! with `ip netns exec`) that find it with `--source auto`. Each namespace has its own UTS
//! namespace too (`unshare --uts`), so every machine announces its own host name.
//!
//! Needs root, `ip` and `unshare`; under `EDGE_OTA_REQUIRE_ALL` their absence fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use edge_ota_testkit::ip;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The namespaces of one test; deleted on drop, whatever the test's outcome.
struct Lan {
    tag: String,
    namespaces: Vec<String>,
    lan: String,
    next_ip: u8,
}

impl Lan {
    /// A namespace holding a bridge: the LAN (10.8.0.0/24).
    fn new(test: &str) -> Option<Lan> {
        if !edge_ota::testing::is_root() {
            edge_ota::testing::skip(test, "needs root for network namespaces");
            return None;
        }
        for tool in ["ip", "unshare"] {
            if edge_ota::testing::find_tool(tool).is_none() {
                edge_ota::testing::skip(test, &format!("{tool} is not installed"));
                return None;
            }
        }
        let tag = format!(
            "e{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lan = Lan {
            lan: format!("{tag}lan"),
            tag,
            namespaces: Vec::new(),
            next_ip: 1,
        };
        let l = lan.lan.clone();
        lan.add_ns(&l);
        ip(&["-n", &l, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &l, "link", "set", "br0", "up"]);
        Some(lan)
    }

    fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// A machine on the LAN: its namespace, a veth into the bridge, the next address.
    /// Returns (namespace, address, interface).
    fn machine(&mut self, short: &str) -> (String, String, String) {
        let ns = format!("{}{short}", self.tag);
        self.add_ns(&ns);
        let i = self.next_ip;
        self.next_ip += 1;
        let ifname = format!("lan{i}");
        let peer = format!("br{i}");
        ip(&[
            "link", "add", &ifname, "netns", &ns, "type", "veth", "peer", "name", &peer, "netns",
            &self.lan,
        ]);
        ip(&["-n", &self.lan, "link", "set", &peer, "master", "br0", "up"]);
        let addr = format!("10.8.0.{i}");
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &ifname,
        ]);
        ip(&["-n", &ns, "link", "set", &ifname, "up"]);
        (ns, addr, ifname)
    }

    /// A point-to-point link 10.9.0.1 (`a`) - 10.9.0.2 (`b`): the expensive upstream link.
    fn link(&mut self, a: &str, b: &str) {
        ip(&[
            "link", "add", "up0", "netns", a, "type", "veth", "peer", "name", "up1", "netns", b,
        ]);
        for (ns, dev, addr) in [(a, "up0", "10.9.0.1/24"), (b, "up1", "10.9.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Processes still inside would keep nothing alive but their own sockets: the
            // guards of the test kill them first (they are declared after the Lan).
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `edge-ota ARGS` in namespace `ns` with host name `host`.
fn in_ns(ns: &str, host: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "unshare", "--uts", "sh", "-c"])
        .arg("hostname \"$0\" && exec \"$@\"")
        .arg(host)
        .arg(env!("CARGO_BIN_EXE_edge-ota"))
        .args(args);
    c
}

/// A process in a namespace, killed on drop; its standard error goes to a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(mut cmd: Command, log: PathBuf, ready: &str) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap();
        let p = Proc { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.log().contains(ready) {
            assert!(
                Instant::now() < deadline,
                "not ready ({ready}): {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url` from inside namespace `ns` (a thread that joins it with `setns`).
fn get_in(ns: &str, addr: &str, path: &str) -> Vec<u8> {
    let ns_path = format!("/run/netns/{ns}");
    let addr = addr.to_string();
    let path = path.to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&ns_path).unwrap();
        // SAFETY: setns on an open namespace file; it changes only this thread's network
        // namespace, and the thread ends with this closure.
        let r = unsafe { nix::libc::setns(f.as_raw_fd(), nix::libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200"), "{path}");
        out[end + 4..].to_vec()
    })
    .join()
    .unwrap()
}

fn stats_in(ns: &str, addr: &str) -> serde_json::Value {
    serde_json::from_slice(&get_in(ns, addr, "/stats.json")).unwrap()
}

/// A leaf: a file-backed device whose `--source auto` looks on the LAN (then the upstream).
fn leaf(order: &str) -> Device {
    let dev = Device::new(2 << 20);
    dev.edit_config(|c| {
        c.replacen(
            "[trust]",
            &format!(
                "[sources]\norder = [{order}]\nupstream = \"http://10.9.0.1:8470/b.eota\"\ndiscover_timeout_secs = 3\n[network]\nmax_attempts = 2\nbackoff_base_secs = 0.1\nbackoff_cap_secs = 0.2\nconnect_timeout_secs = 3\n[trust]"
            ),
            1,
        )
    });
    dev
}

fn apply_auto(ns: &str, host: &str, dev: &Device) -> Child {
    in_ns(
        ns,
        host,
        &[
            "--config",
            dev.config.to_str().unwrap(),
            "apply",
            "--no-reboot",
            "--source",
            "auto",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

fn image() -> Vec<u8> {
    image_bytes(1 << 20, 41)
}

fn bundle(dev: &Device) -> PathBuf {
    dev.bundle(
        "v2.eota",
        &BundleOpts {
            payloads: vec![(edge_ota::bundle::PayloadKind::Image, "rootfs", image())],
            ..Default::default()
        },
    )
}

fn serve_args<'a>(dir: &'a Path, name: &'a str, iface: &'a str) -> Vec<&'a str> {
    vec![
        "--config",
        "/nonexistent/serve.toml",
        "serve",
        "--listen",
        "0.0.0.0:8470",
        "--dir",
        dir.to_str().unwrap(),
        "--name",
        name,
        "--announce-interface",
        iface,
    ]
}

#[test]
fn leaves_find_the_base_station_by_mdns_and_the_upstream_sends_one_bundle() {
    let Some(mut lan) = Lan::new("leaves_find_the_base_station_by_mdns") else {
        return;
    };
    let (base, base_ip, base_if) = lan.machine("base");
    let up = format!("{}up", lan.tag);
    lan.add_ns(&up);
    lan.link(&up, &base);
    let leaves: Vec<(String, String, String)> =
        (1..=3).map(|i| lan.machine(&format!("l{i}"))).collect();
    let work = tempfile::tempdir().unwrap();
    let devs: Vec<Device> = (0..3).map(|_| leaf("\"lan\", \"upstream\"")).collect();
    let b = bundle(&devs[0]);
    let size = std::fs::metadata(&b).unwrap().len();
    let up_dir = work.path().join("up");
    std::fs::create_dir(&up_dir).unwrap();
    std::fs::copy(&b, up_dir.join("b.eota")).unwrap();
    let base_dir = work.path().join("base");
    std::fs::create_dir(&base_dir).unwrap();
    let key = demo_key("INSECURE-demo.pub.pem");
    let _upstream = Proc::start(
        in_ns(
            &up,
            "upstream",
            &[
                "--config",
                "/nonexistent/serve.toml",
                "serve",
                "--listen",
                "10.9.0.1:8470",
                "--no-announce",
                "--dir",
                up_dir.to_str().unwrap(),
            ],
        ),
        work.path().join("upstream.log"),
        "listening on",
    );
    let mut args = serve_args(&base_dir, "base", &base_if);
    args.extend([
        "--upstream",
        "http://10.9.0.1:8470/",
        "--trust-key",
        key.to_str().unwrap(),
    ]);
    let base_proc = Proc::start(
        in_ns(&base, "base", &args),
        work.path().join("base.log"),
        "announcing",
    );

    // `discover` on a leaf sees it, with its LAN address.
    let o = in_ns(
        &leaves[0].0,
        "l1",
        &["--json", "discover", "--timeout", "3"],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let caches = d["caches"].as_array().unwrap();
    assert_eq!(caches.len(), 1, "{d}");
    assert_eq!(caches[0]["instance"], "base");
    assert_eq!(caches[0]["upstream"], true);
    assert_eq!(caches[0]["addresses"][0], base_ip.as_str());

    // Every leaf at once.
    let children: Vec<Child> = leaves
        .iter()
        .zip(&devs)
        .enumerate()
        .map(|(i, ((ns, _, _), dev))| apply_auto(ns, &format!("l{}", i + 1), dev))
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}\nbase: {}",
            stderr(&o),
            base_proc.log()
        );
        let err = stderr(&o);
        assert!(
            err.contains("using lan http://10.8.0.1:8470/b.eota"),
            "{err}"
        );
    }
    for dev in &devs {
        assert_eq!(
            &std::fs::read(dev.path("slotB")).unwrap()[..1 << 20],
            &image()[..]
        );
    }
    // The expensive link carried one bundle (and the response heads of a few requests).
    let up_stats = stats_in(&up, "10.9.0.1:8470");
    let up_sent = up_stats["bytes_sent"].as_u64().unwrap();
    assert!(
        up_sent as f64 <= 1.05 * size as f64,
        "the upstream sent {up_sent} bytes for one {size}-byte bundle and 3 leaves"
    );
    let st = stats_in(&base, &format!("{base_ip}:8470"));
    assert_eq!(st["upstream_fetches"], 1, "{st}");
    // Each leaf lacked the whole bundle (nothing of it in its slots) and fetched about that.
    for (_, addr, _) in &leaves {
        let got = st["peers"][addr.as_str()].as_u64().unwrap();
        assert!(
            got as f64 <= 1.05 * size as f64,
            "leaf {addr} fetched {got} bytes for a {size}-byte bundle"
        );
    }
}

#[test]
fn rogue_announcer_is_refused_and_the_leaf_falls_back() {
    let Some(mut lan) = Lan::new("rogue_announcer_is_refused") else {
        return;
    };
    let (base, _, base_if) = lan.machine("base");
    let (rogue, _, rogue_if) = lan.machine("rogue");
    let (l1, _, _) = lan.machine("l1");
    let (l2, _, _) = lan.machine("l2");
    let work = tempfile::tempdir().unwrap();
    let dev1 = leaf("\"lan\"");
    let dev2 = leaf("\"lan\"");
    let b = bundle(&dev1);
    // The rogue's copy: signatures intact, one chunk in the middle changed.
    let mut bytes = std::fs::read(&b).unwrap();
    let m = {
        let mut f = std::fs::File::open(&b).unwrap();
        edge_ota::bundle::head::BundleHead::read(&mut f)
            .unwrap()
            .parse_unverified()
            .unwrap()
    };
    let po = layout(&b).3;
    let chunks = &m.payloads[0].chunks;
    let bad = &chunks[chunks.len() / 2];
    bytes[po + bad.offset as usize + bad.clen as usize / 2] ^= 0x55;
    let base_dir = work.path().join("base");
    let rogue_dir = work.path().join("rogue");
    for d in [&base_dir, &rogue_dir] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::copy(&b, base_dir.join("b.eota")).unwrap();
    std::fs::write(rogue_dir.join("b.eota"), &bytes).unwrap();
    // The rogue sorts first by name, and has no keys to check what it serves.
    let _rogue = Proc::start(
        in_ns(
            &rogue,
            "rogue",
            &serve_args(&rogue_dir, "a-rogue", &rogue_if),
        ),
        work.path().join("rogue.log"),
        "announcing",
    );
    let base_proc = Proc::start(
        in_ns(&base, "base", &serve_args(&base_dir, "base", &base_if)),
        work.path().join("base.log"),
        "announcing",
    );
    let o = apply_auto(&l1, "l1", &dev1).wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("a-rogue") && err.contains("trying the next source"),
        "{err}"
    );
    assert!(
        err.contains("using lan http://10.8.0.1:8470/b.eota"),
        "{err}"
    );
    assert_eq!(
        &std::fs::read(dev1.path("slotB")).unwrap()[..1 << 20],
        &image()[..]
    );

    // Only the rogue left: refused, and the slot holds verified chunks or nothing.
    drop(base_proc);
    let before = dev2.snapshot();
    let o = apply_auto(&l2, "l2", &dev2).wait_with_output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(before.0, dev2.snapshot().0, "the boot environment changed");
    let slot = std::fs::read(dev2.path("slotB")).unwrap();
    let img = image();
    let mut at = 0usize;
    let mut bad_at = None;
    for c in chunks {
        let n = c.len as usize;
        let (got, want) = (&slot[at..at + n], &img[at..at + n]);
        assert!(
            got == want || got.iter().all(|&x| x == 0xAA),
            "slot B holds bytes at {at} that are neither the verified chunk nor untouched"
        );
        if c.offset == bad.offset {
            bad_at = Some(at);
        }
        at += n;
    }
    let bad_at = bad_at.unwrap();
    assert!(
        slot[bad_at..bad_at + bad.len as usize]
            .iter()
            .all(|&x| x == 0xAA),
        "the tampered chunk reached the slot"
    );
}
