//! The images the scenarios boot, built once per test run with `edge-ota-image` (each step is
//! cached by the builder itself): kernel, initramfs, a v1 disk with slot A good, and signed
//! v2 bundles, one per scenario variant. Nothing here is committed; all of it is rebuilt
//! from Debian packages and this workspace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use edge_ota_format::build::oci;

/// The guest's product string; bundles for anything else are refused.
pub const COMPATIBLE: &str = "edge-os-x86_64-qemu";

/// The guest agent's Prometheus endpoint (inside the guest).
pub const AGENT_METRICS_PORT: u16 = 9101;
/// The desired-state file the guest agent watches.
pub const AGENT_DESIRED_FILE: &str = "/var/lib/edge-ota/desired.yaml";
/// Created on the data partition, it makes the guest's init start the agent.
pub const AGENT_ENABLED_FILE: &str = "/lib/edge-ota/agent.enabled";

pub struct Artifacts {
    pub work: PathBuf,
    /// Disk with slot A = v1 (good), slot B empty (bad).
    pub disk: PathBuf,
    /// Where its grubenv copies are.
    pub layout: crate::disk::Layout,
    /// v2 (security version 2), healthy, with a container image archive for slot B.
    pub bundle_v2: PathBuf,
    /// The container image archive inside `bundle_v2`.
    pub container_images: PathBuf,
    /// The image that archive holds, as the bundle's manifest signs it.
    pub container_image: edge_ota::bundle::ContainerImage,
    /// v2 whose health check always fails.
    pub bundle_health_fail: PathBuf,
    /// v2 whose init exits at once: kernel panic, reboot.
    pub bundle_panic: PathBuf,
    /// v2 whose init hangs after arming the watchdog, before the health verdict.
    pub bundle_hang: PathBuf,
    /// v1.5 with security version 1: a downgrade once v2 is confirmed.
    pub bundle_downgrade: PathBuf,
    /// v2 whose container image archive containerd cannot import (its layer is not a tar),
    /// while the bundle itself is signed and well-formed.
    pub bundle_bad_images: PathBuf,
    /// v2 with one payload byte flipped.
    pub bundle_tampered: PathBuf,
    /// v2 with one manifest byte flipped (its signature no longer verifies).
    pub bundle_tampered_manifest: PathBuf,
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn guest_target() -> PathBuf {
    workspace().join("target/guest")
}

/// The updater binary the guest images carry (release, with fail points), built by [`get`]:
/// host-side checks run the very same program.
pub fn guest_edge_ota() -> PathBuf {
    guest_target().join("release/edge-ota")
}

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest configuration: GRUB backend on the boot partition, slots by GPT name, state on
/// the data partition, the insecure demo key (test images only).
fn guest_config(extra_probe: &str) -> String {
    format!(
        r#"compatible = "{COMPATIBLE}"
state_dir = "/var/lib/edge-ota"
disk = "/dev/vda"
tries = 2

[trust]
keys = ["/etc/edge-ota/keys/INSECURE-demo.pub.pem"]

[[slot]]
name = "A"
partlabel = "rootfs-A"
files_dir = "/var/lib/containerd-images/slot-A"

[[slot]]
name = "B"
partlabel = "rootfs-B"
files_dir = "/var/lib/containerd-images/slot-B"

[bootloader]
backend = "grub"
path = "/mnt/boot/grub/grubenv"

[health]
deadline_secs = 6
interval_ms = 500
watchdog = "/dev/watchdog"

[[health.probe]]
name = "os-release"
kind = "file"
path = "/etc/os-release"

[[health.probe]]
name = "edge-ota-status"
kind = "command"
command = ["/usr/bin/edge-ota", "status"]
{extra_probe}
[containerd]
address = "/run/containerd/containerd.sock"
snapshotter = "native"

# Used only where the data partition enables the agent (init starts it when
# /var/lib/edge-ota/agent.enabled exists): tests/agent.rs.
[agent]
metrics = "127.0.0.1:{AGENT_METRICS_PORT}"
desired_file = "{AGENT_DESIRED_FILE}"
# One attempt per scenario: a retry would start while the test still looks at the failure.
retry_secs = 3600
retry_max_secs = 3600

[agent.reboot]
# Through init (busybox reboot signals PID 1): containerd stopped, /var unmounted, as a
# person's `reboot` does.
command = ["/bin/busybox", "reboot"]

[agent.media]
# A stick with a newer bundle for this device is applied at once, with nobody typing.
mode = "now"
poll_secs = 1
"#
    )
}

static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();

/// Build (or reuse) everything. Work directory: `$EDGE_OTA_QEMU_WORK` or `build/qemu`.
pub fn get() -> &'static Artifacts {
    ARTIFACTS.get_or_init(build)
}

fn build() -> Artifacts {
    let ws = workspace();
    let work = std::env::var_os("EDGE_OTA_QEMU_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("build/qemu"));
    std::fs::create_dir_all(&work).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    // The builder, and the guest's updater with fail points (for the power-cut scenario) in
    // its own target directory so the host's release binary stays without them.
    run(Command::new(&cargo).current_dir(&ws).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "edge-ota-image",
    ]));
    let guest_target = guest_target();
    run(Command::new(&cargo)
        .current_dir(&ws)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "edge-ota",
            "--features",
            "failpoints",
        ])
        .arg("--target-dir")
        .arg(&guest_target));
    let tool = ws.join("target/release/edge-ota-image");
    let guest_ota = guest_edge_ota();
    let image = |args: &[&str]| {
        let mut c = Command::new(&tool);
        c.args(args);
        run(&mut c);
    };
    let p = |name: &str| work.join(name).to_string_lossy().into_owned();

    // The "amd64" flavour: Debian's cloud kernels have no USB, and the stick needs it.
    image(&["kernel", "--flavour", "amd64", "--out", &p("kernel")]);
    image(&[
        "initramfs",
        "--kernel",
        &p("kernel"),
        "--out",
        &p("initrd.img"),
    ]);

    std::fs::write(work.join("config-normal.toml"), guest_config("")).unwrap();
    std::fs::write(
        work.join("config-health-fail.toml"),
        guest_config(
            "\n[[health.probe]]\nname = \"kubelet-ready\"\nkind = \"file\"\npath = \"/run/kubelet-ready-never-exists\"\n",
        ),
    )
    .unwrap();
    let key_pub = ws.join("keys-example/INSECURE-demo.pub.pem");
    let add_key = format!(
        "{}=/etc/edge-ota/keys/INSECURE-demo.pub.pem",
        key_pub.display()
    );
    // The container runtime, Debian's, as the host has it.
    let bin = |tool: &str, dest: &str| {
        let host = edge_ota::testing::find_tool(tool)
            .unwrap_or_else(|| panic!("{tool} is not installed (scripts/install-deps.sh)"));
        format!("{}={dest}", host.display())
    };
    let rootfs = |name: &str, version: &str, variant: &str, config: &str| {
        image(&[
            "rootfs",
            "--kernel",
            &p("kernel"),
            "--initramfs",
            &p("initrd.img"),
            "--edge-ota",
            &guest_ota.to_string_lossy(),
            "--config",
            &p(config),
            "--version",
            version,
            "--variant",
            variant,
            "--add",
            &add_key,
            "--add-bin",
            &bin("containerd", "/usr/bin/containerd"),
            "--add-bin",
            &bin("ctr", "/usr/bin/ctr"),
            "--add-bin",
            &bin("runc", "/usr/sbin/runc"),
            // containerd, ctr and runc take about 76 MiB.
            "--size",
            "144",
            "--out",
            &p(name),
        ]);
    };
    rootfs("rootfs-v1.img", "1.0.0", "normal", "config-normal.toml");
    rootfs("rootfs-v1.5.img", "1.5.0", "normal", "config-normal.toml");
    rootfs("rootfs-v2.img", "2.0.0", "normal", "config-normal.toml");
    rootfs(
        "rootfs-v2-health-fail.img",
        "2.0.0",
        "normal",
        "config-health-fail.toml",
    );
    rootfs(
        "rootfs-v2-panic.img",
        "2.0.0",
        "panic",
        "config-normal.toml",
    );
    rootfs("rootfs-v2-hang.img", "2.0.0", "hang", "config-normal.toml");
    image(&[
        "disk",
        "--slot-a",
        &p("rootfs-v1.img"),
        "--out",
        &p("disk-v1.img"),
        "--slot-size",
        "176",
        "--data-size",
        "64",
        "--slot-a-version",
        "1.0.0",
        "--slot-a-security-version",
        "1",
    ]);

    // The Kubernetes images a release ships: a small real image (one layer) as an OCI
    // archive, made reproducibly so the bundle is too.
    let image_tree = work.join("k8s-image-tree");
    std::fs::create_dir_all(image_tree.join("etc")).unwrap();
    std::fs::write(
        image_tree.join("etc/edge-app.conf"),
        "# shipped in the v2 bundle, imported with no network\n",
    )
    .unwrap();
    let container_image = oci::write_oci_archive_file(
        &oci::OciArchiveSpec {
            from: image_tree,
            name: "registry.local/edge/app:2.0.0".into(),
            architecture: oci::host_architecture().into(),
            entrypoint: Vec::new(),
            mtime: 1_700_000_000,
        },
        &work.join("k8s-images.tar"),
    )
    .unwrap();

    let key = ws.join("keys-example/INSECURE-demo.key.pem");
    let bundle = |out: &str, rootfs: &str, version: &str, sv: &str, extra: &[&str]| {
        let mut c = Command::new(&tool);
        c.current_dir(&work)
            .args(["bundle", "create", "--out", out, "--compatible", COMPATIBLE])
            .args([
                "--version",
                version,
                "--security-version",
                sv,
                "--image",
                rootfs,
            ])
            .args(["--created", "1700000000"])
            // Test bundles: level 9 builds several times faster than the default 19.
            .args(["--level", "9"])
            .args(extra)
            .arg("--key")
            .arg(&key);
        run(&mut c);
    };
    bundle(
        "v2.eota",
        "rootfs-v2.img",
        "2.0.0",
        "2",
        &[
            "--payload",
            "container-images:k8s-images.tar:k8s-images.tar",
        ],
    );
    bundle(
        "v2-health-fail.eota",
        "rootfs-v2-health-fail.img",
        "2.0.0",
        "2",
        &[],
    );
    broken_layer_archive(
        &work.join("k8s-images.tar"),
        &work.join("k8s-images-bad.tar"),
    );
    bundle(
        "v2-bad-images.eota",
        "rootfs-v2.img",
        "2.0.0",
        "2",
        &[
            "--payload",
            "container-images:k8s-images.tar:k8s-images-bad.tar",
        ],
    );
    bundle("v2-panic.eota", "rootfs-v2-panic.img", "2.0.0", "2", &[]);
    bundle("v2-hang.eota", "rootfs-v2-hang.img", "2.0.0", "2", &[]);
    bundle("v1.5-downgrade.eota", "rootfs-v1.5.img", "1.5.0", "1", &[]);
    let mut tampered = std::fs::read(work.join("v2.eota")).unwrap();
    // One bit in the middle of a chunk of the root filesystem payload.
    let at = {
        let head = edge_ota::bundle::head::BundleHead::read(&mut &tampered[..]).unwrap();
        let rootfs = &head.parse_unverified().unwrap().payloads[0];
        // The middle chunk that has bytes (all-zero chunks are stored as nothing).
        let with_bytes: Vec<_> = rootfs.chunks.iter().filter(|c| c.clen > 0).collect();
        let c = with_bytes[with_bytes.len() / 2];
        (head.header.payload_offset() + c.offset) as usize + c.clen as usize / 2
    };
    tampered[at] ^= 0x20;
    std::fs::write(work.join("v2-tampered.eota"), &tampered).unwrap();
    tampered[at] ^= 0x20;
    tampered[64 + 40] ^= 0x01;
    std::fs::write(work.join("v2-tampered-manifest.eota"), tampered).unwrap();

    Artifacts {
        disk: work.join("disk-v1.img"),
        layout: crate::disk::Layout::read(&work.join("disk-v1.img.layout.json")),
        bundle_v2: work.join("v2.eota"),
        container_images: work.join("k8s-images.tar"),
        container_image,
        bundle_health_fail: work.join("v2-health-fail.eota"),
        bundle_bad_images: work.join("v2-bad-images.eota"),
        bundle_panic: work.join("v2-panic.eota"),
        bundle_hang: work.join("v2-hang.eota"),
        bundle_downgrade: work.join("v1.5-downgrade.eota"),
        bundle_tampered: work.join("v2-tampered.eota"),
        bundle_tampered_manifest: work.join("v2-tampered-manifest.eota"),
        work,
    }
}

/// Copy the OCI archive `good` to `out` with its layer replaced by bytes that are not a tar,
/// the manifest and index rewritten to the new digests: every name and digest checks out (the
/// bundle builder and the device's index accept it), but containerd fails to unpack it, as it
/// would a release whose image build went wrong.
fn broken_layer_archive(good: &Path, out: &Path) {
    use sha2::{Digest, Sha256};
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let mut members = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(good).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
            members.insert(name, bytes);
        }
    }
    let json = |b: &[u8]| -> serde_json::Value { serde_json::from_slice(b).unwrap() };
    let mut index = json(&members["index.json"]);
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest = json(&members[&blob(&manifest_digest)]);
    let layer = b"not a tar archive: this image's build went wrong\n".to_vec();
    members.remove(&blob(manifest["layers"][0]["digest"].as_str().unwrap()));
    manifest["layers"][0]["digest"] = sha(&layer).into();
    manifest["layers"][0]["size"] = layer.len().into();
    members.insert(blob(&sha(&layer)), layer);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    members.remove(&blob(&manifest_digest));
    index["manifests"][0]["digest"] = sha(&manifest).into();
    index["manifests"][0]["size"] = manifest.len().into();
    members.insert(blob(&sha(&manifest)), manifest);
    members.insert("index.json".into(), serde_json::to_vec(&index).unwrap());
    let mut tar = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (name, bytes) in &members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    tar.finish().unwrap();
}

impl Artifacts {
    /// A private copy of the v1 disk for one scenario.
    pub fn fresh_disk(&self, scenario: &str) -> PathBuf {
        let d = self.work.join("runs").join(scenario);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let disk = d.join("disk.img");
        // cp --sparse keeps the copy cheap: most of the disk is zeros.
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&self.disk)
            .arg(&disk));
        disk
    }

    /// A FAT USB stick holding `bundle` as /image.bin (built with mtools: no mount, no vfat
    /// in the host kernel needed).
    pub fn usb_stick(&self, scenario: &str, bundle: &Path) -> PathBuf {
        self.usb_stick_with(scenario, &[(bundle, "image.bin")])
    }

    /// A FAT USB stick holding each `(file, name)`.
    pub fn usb_stick_with(&self, scenario: &str, files: &[(&Path, &str)]) -> PathBuf {
        let img = self.work.join("runs").join(scenario).join("usb.img");
        let bytes: u64 = files
            .iter()
            .map(|(f, _)| std::fs::metadata(f).unwrap().len())
            .sum();
        let size_mib = bytes / (1 << 20) + 16;
        let _ = std::fs::remove_file(&img);
        run(Command::new("mkfs.vfat")
            .args(["-C", "-n", "EDGEUSB"])
            .arg(&img)
            .arg((size_mib * 1024).to_string()));
        for (file, name) in files {
            run(Command::new("mcopy")
                .arg("-i")
                .arg(&img)
                .arg(file)
                .arg(format!("::/{name}")));
        }
        img
    }
}
