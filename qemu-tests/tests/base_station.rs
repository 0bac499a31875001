//! A base station on the guest's LAN, in QEMU: `edge-ota serve` on the host, on a tap device
//! the VM's NIC is attached to (a LAN of two machines, nothing else on it), announcing itself
//! by mDNS on that interface only. The guest is told nothing about it: `edge-ota discover`
//! must find it and `edge-ota apply --source auto` must update through it.
//!
//! Why a tap device rather than QEMU's socket multicast network between two VMs: the host's
//! real `serve` is the base station (a second TCG guest would double the scenario's time), and
//! QEMU's user network cannot carry the guest's multicast mDNS queries to the host at all.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_ota_testkit::ip;
use qemu_tests::artifacts;
use qemu_tests::require_qemu;
use qemu_tests::scenario::{slot_boot_state, timed, wait_ready, BOOT, CMD};
use qemu_tests::vm::{Vm, VmConfig};

/// The LAN: a tap device with the base station's address; deleted on drop.
struct Tap(String);

impl Tap {
    fn new(name: &str, addr: &str) -> Tap {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let tap = Tap(name.to_string());
        ip(&["addr", "add", addr, "dev", name]);
        ip(&["link", "set", name, "up"]);
        tap
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from the base station (plain HTTP/1.1, read to the end).
fn get(addr: &str, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "GET {path}");
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    out[end + 4..].to_vec()
}

#[test]
fn leaf_discovers_the_base_station_by_mdns_and_updates_through_it() {
    require_qemu!("leaf_discovers_the_base_station_by_mdns_and_updates_through_it");
    timed(
        "leaf_discovers_the_base_station_by_mdns_and_updates_through_it",
        || {
            let a = artifacts::get();
            let d = a.fresh_disk("base-station");
            let name = format!("eotabs{}", std::process::id() % 100_000);
            let _tap = Tap::new(&name, "10.77.0.1/24");
            let dir = a.work.join("runs/base-station/served");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&a.bundle_v2, dir.join("v2.eota")).unwrap();
            let size = std::fs::metadata(&a.bundle_v2).unwrap().len();

            let mut vm = Vm::start(&VmConfig {
                name: "base-station-leaf",
                disk: &d,
                tap: Some(&name),
                log_dir: &a.work.join("logs"),
                ..VmConfig::default()
            });
            wait_ready(&mut vm, "A", "1.0.0");
            // No DHCP on this LAN: the leaf gets a fixed address, nothing about the station.
            vm.ok(
                "ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up",
                CMD,
            );

            // The base station starts once the link is up, announcing on the tap only.
            let log = a.work.join("logs/base-station-serve.log");
            let serve = Killed(
                Command::new(artifacts::guest_edge_ota())
                    .args(["--config", "/nonexistent/serve.toml", "serve"])
                    .args(["--listen", "10.77.0.1:8470", "--name", "harbour-base"])
                    .args(["--announce-interface", &name, "--dir"])
                    .arg(&dir)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")
            {
                assert!(Instant::now() < deadline, "serve did not start");
                std::thread::sleep(Duration::from_millis(100));
            }

            // Discovery alone finds it, with what it holds for this device.
            let found = vm.ok("edge-ota --json discover | tr -d '\\n'; echo", CMD);
            let json = found
                .lines()
                .find(|l| l.trim_start().starts_with('{'))
                .unwrap_or_else(|| panic!("no JSON in: {found}"));
            let caches: serde_json::Value = serde_json::from_str(json).unwrap();
            let station = caches["caches"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c.to_string().contains("10.77.0.1"))
                .unwrap_or_else(|| panic!("the base station was not discovered: {caches}"));
            assert!(
                station.to_string().contains("harbour-base"),
                "announced under another name: {station}"
            );

            // The update goes through it, with nobody naming a source.
            vm.send("edge-ota apply --progress none --source auto");
            vm.wait_for("edge-grub: booting B", BOOT);
            wait_ready(&mut vm, "B", "2.0.0");
            let st = vm.status();
            assert_eq!(st["booted"], "B");
            assert_eq!(slot_boot_state(&st, "B"), "good");
            vm.shutdown(BOOT);

            let stats: serde_json::Value =
                serde_json::from_slice(&get("10.77.0.1:8470", "/stats.json")).unwrap();
            let sent = stats["bytes_sent"].as_u64().unwrap();
            assert!(
                sent > 0 && sent as f64 <= 1.05 * size as f64,
                "the base station sent {sent} bytes for a {size}-byte bundle: {stats}"
            );
            drop(serve);
        },
    );
}
