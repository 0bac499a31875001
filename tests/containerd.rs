//! Kubernetes container images shipped in a bundle, loaded into a real containerd (Debian's
//! `containerd`, `runc`, `ctr`), started by each test with its own root, state, socket and
//! configuration in a temp dir: `edge-ota import-images` imports them into `k8s.io`, checks
//! them against the signed manifest and pins them, or refuses with exit 31.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use edge_ota::bundle::{ContainerImage, PayloadKind};
use edge_ota::testing::{find_tool, is_root, skip};
use edge_ota_format::build::oci;

const IMAGE: &str = "registry.local/edge/hello:1";

/// A private containerd, killed when dropped.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Start one, or say why it cannot run (panics under `EDGE_OTA_REQUIRE_ALL`).
    fn start(test: &str) -> Option<Containerd> {
        if !is_root() {
            skip(test, "root (containerd)");
            return None;
        }
        for tool in ["containerd", "ctr", "runc"] {
            if find_tool(tool).is_none() {
                skip(test, &format!("{tool} (Debian packages containerd, runc)"));
                return None;
            }
        }
        // Short path: a Unix socket path is limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().display();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
# No kubelet here: the CRI plugin would only look for CNI; k8s.io is just a namespace.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"#
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new(find_tool("containerd").unwrap())
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Containerd { child, dir };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(c.socket()).is_err() {
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!("containerd exited ({status}): {}", c.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd did not open its socket within 20 s: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(c)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -n k8s.io images ls` lines (header dropped), as containerd's own tool shows them.
    fn images_ls(&self) -> Vec<String> {
        let o = Command::new(find_tool("ctr").unwrap())
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "ls"])
            .output()
            .unwrap();
        assert!(o.status.success(), "ctr images ls: {}", stderr(&o));
        stdout(&o).lines().skip(1).map(str::to_string).collect()
    }

    /// The `images ls` line of `name`, if containerd has it.
    fn image(&self, name: &str) -> Option<String> {
        self.images_ls()
            .into_iter()
            .find(|l| l.split_whitespace().next() == Some(name))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small real image (one layer holding a script) as a reproducible OCI archive.
fn oci_archive(dir: &Path) -> (Vec<u8>, ContainerImage) {
    let tree = dir.join("image-tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(
        tree.join("bin/hello"),
        "#!/bin/sh\necho hello from the bundle\n",
    )
    .unwrap();
    let mut bytes = Vec::new();
    let img = oci::write_oci_archive(
        &oci::OciArchiveSpec {
            from: tree,
            name: IMAGE.into(),
            architecture: oci::host_architecture().into(),
            entrypoint: vec!["/bin/hello".into()],
            mtime: 1_700_000_000,
        },
        &mut bytes,
    )
    .unwrap();
    (bytes, img)
}

/// sha256 with coreutils (the test crate has no sha256 of its own).
fn sha256_hex(data: &[u8]) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), data).unwrap();
    let o = Command::new("sha256sum").arg(f.path()).output().unwrap();
    assert!(o.status.success());
    stdout(&o).split_whitespace().next().unwrap().to_string()
}

/// A `docker save` archive of one image tagged `hello:1` (made with tar(1), as docker
/// writes it: manifest.json, the configuration, one layer), and the images
/// `edge-ota-image bundle create` would sign for it.
fn docker_archive(dir: &Path) -> (Vec<u8>, Vec<ContainerImage>) {
    let root = dir.join("docker");
    let layer_tree = dir.join("docker-layer");
    std::fs::create_dir_all(layer_tree.join("etc")).unwrap();
    std::fs::write(layer_tree.join("etc/hello.conf"), "from a docker archive\n").unwrap();
    std::fs::create_dir_all(root.join("layer")).unwrap();
    let tar = |out: &Path, from: &Path| {
        let o = Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@1700000000",
                "--owner=0",
                "--group=0",
            ])
            .arg("-cf")
            .arg(out)
            .arg("-C")
            .arg(from)
            .arg(".")
            .output()
            .unwrap();
        assert!(o.status.success(), "tar: {}", stderr(&o));
    };
    tar(&root.join("layer/layer.tar"), &layer_tree);
    let layer = std::fs::read(root.join("layer/layer.tar")).unwrap();
    std::fs::remove_dir_all(&layer_tree).unwrap();
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#,
        oci::host_architecture()
    );
    let config_hex = sha256_hex(config.as_bytes());
    std::fs::write(root.join(format!("{config_hex}.json")), &config).unwrap();
    std::fs::write(
        root.join("manifest.json"),
        format!(
            r#"[{{"Config":"{config_hex}.json","RepoTags":["hello:1"],"Layers":["layer/layer.tar"]}}]"#
        ),
    )
    .unwrap();
    let out = dir.join("docker.tar");
    tar(&out, &root);
    let images = oci::archive_images(&out).unwrap();
    (std::fs::read(&out).unwrap(), images)
}

/// A device whose `[containerd]` is at `socket`, with a v2 bundle carrying the archive
/// applied and booted; `signed` is what the bundle's manifest says the archive holds.
fn updated_device(socket: &Path, signed: impl FnOnce(ContainerImage) -> ContainerImage) -> Device {
    updated_device_with(socket, |dir| {
        let (archive, img) = oci_archive(dir);
        (archive, vec![signed(img)])
    })
}

/// The same, with the archive and its signed images from `archive`.
fn updated_device_with(
    socket: &Path,
    archive: impl FnOnce(&Path) -> (Vec<u8>, Vec<ContainerImage>),
) -> Device {
    let dev = Device::new(1 << 20);
    let ctr = find_tool("ctr").unwrap_or_else(|| "/usr/bin/ctr".into());
    dev.edit_config(|c| {
        format!(
            "{c}[containerd]\nctr = {:?}\naddress = {:?}\nsnapshotter = \"native\"\ntimeout_secs = 60\n",
            ctr.display().to_string(),
            socket.display().to_string()
        )
    });
    let (archive, images) = archive(dev.dir.path());
    let b = dev.bundle(
        "v2.eota",
        &BundleOpts {
            payloads: vec![
                (PayloadKind::Image, "rootfs", image_bytes(300_000, 2)),
                (PayloadKind::ContainerImages, "k8s", archive),
            ],
            container_images: vec![("k8s", images)],
            ..Default::default()
        },
    );
    let o = dev.run(&["apply", b.to_str().unwrap(), "--no-reboot", "--quiet"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(dev.boot(), "B");
    dev
}

#[test]
fn shipped_images_are_imported_checked_and_pinned_without_a_registry() {
    let Some(ctrd) = Containerd::start("shipped_images_are_imported_checked_and_pinned") else {
        return;
    };
    let mut signed = None;
    let dev = updated_device(&ctrd.socket(), |i| {
        signed = Some(i.clone());
        i
    });
    let signed = signed.unwrap();
    assert!(ctrd.image(IMAGE).is_none(), "containerd starts empty");

    let o = dev.run(&["--json", "import-images"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["slot"], "B");
    assert_eq!(v["images"][0]["name"], IMAGE);
    assert_eq!(v["images"][0]["digest"], signed.digest.as_str());
    assert_eq!(v["images"][0]["pinned"], true);
    assert_eq!(v["images"].as_array().unwrap().len(), 1);

    let line = ctrd.image(IMAGE).expect("ctr lists the shipped image");
    assert!(line.contains(&signed.digest), "{line}");
    assert!(line.contains("io.cri-containerd.pinned=pinned"), "{line}");

    // Importing twice is harmless: same image, same digest, still pinned, exit 0.
    let before = ctrd.images_ls();
    let o = dev.run(&["import-images", "--slot", "B"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("{IMAGE} {} pinned\n", signed.digest),
        "human output"
    );
    assert_eq!(ctrd.images_ls(), before);
}

#[test]
fn image_differing_from_its_signed_digest_is_refused_and_not_pinned() {
    let Some(ctrd) = Containerd::start("image_differing_from_its_signed_digest") else {
        return;
    };
    let dev = updated_device(&ctrd.socket(), |i| ContainerImage {
        digest: format!("sha256:{}", "0".repeat(64)),
        ..i
    });
    let o = dev.run(&["import-images"]);
    assert_refused(&o, 31, IMAGE);
    assert!(
        stderr(&o).contains("signed manifest says"),
        "{}",
        stderr(&o)
    );
    if let Some(line) = ctrd.image(IMAGE) {
        assert!(!line.contains("io.cri-containerd.pinned"), "{line}");
    }
}

#[test]
fn containerd_not_running_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("containerd.sock");
    let dev = updated_device(&socket, |i| i);
    let o = dev.run(&["import-images"]);
    assert_refused(&o, 31, "containerd is not running");
    assert!(stderr(&o).contains(&socket.display().to_string()));
}

#[test]
fn slot_without_images_needs_no_containerd() {
    let dev = Device::new(1 << 20);
    let o = dev.run(&["import-images", "--slot", "A"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "slot A carries no container images\n");
}

#[test]
fn docker_archive_is_checked_by_its_configuration_digest() {
    let Some(ctrd) = Containerd::start("docker_archive_is_checked_by_its_configuration_digest")
    else {
        return;
    };
    let mut signed = Vec::new();
    let dev = updated_device_with(&ctrd.socket(), |dir| {
        let (bytes, images) = docker_archive(dir);
        signed = images.clone();
        (bytes, images)
    });
    assert_eq!(signed.len(), 1);
    assert_eq!(signed[0].name, "docker.io/library/hello:1");
    assert_eq!(signed[0].digest_of, edge_ota::bundle::DigestOf::Config);
    let o = dev.run(&["import-images"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let line = ctrd
        .image("docker.io/library/hello:1")
        .expect("ctr lists the docker image under its normalized name");
    assert!(line.contains("io.cri-containerd.pinned=pinned"), "{line}");
}
