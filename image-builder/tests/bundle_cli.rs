//! CLI tests of `edge-ota-image keygen` and `bundle create|info`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-ota-image"))
}

fn demo_key() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../keys-example/INSECURE-demo.key.pem")
}

fn payload(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("rootfs.img");
    let mut data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    data.extend(std::iter::repeat_n(0u8, 1_000_000));
    std::fs::write(&p, data).unwrap();
    p
}

fn create(dir: &Path, out: &str, threads: &str) -> Vec<u8> {
    let o = tool()
        .args([
            "bundle",
            "create",
            "--compatible",
            "edge-test",
            "--version",
            "1.2.3",
        ])
        .args([
            "--security-version",
            "4",
            "--created",
            "1700000000",
            "--threads",
            threads,
        ])
        .arg("--key")
        .arg(demo_key())
        .arg("--image")
        .arg(payload(dir))
        .arg("--out")
        .arg(dir.join(out))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(dir.join(out)).unwrap()
}

#[test]
fn bundle_create_is_reproducible_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let one = create(dir.path(), "a.eota", "1");
    let two = create(dir.path(), "b.eota", "2");
    assert!(one == two, "same inputs gave different bundles");
    assert_eq!(&one[..8], b"EDGE-OTA");
}

#[test]
fn bundle_info_json_shows_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "a.eota", "2");
    let o = tool()
        .args(["bundle", "info", "--json"])
        .arg(dir.path().join("a.eota"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["manifest"]["version"], "1.2.3");
    assert_eq!(v["manifest"]["payloads"][0]["size"], 4_000_000);
    assert_eq!(v["signatures"][0], "083283e8ebdabafd");
    // Format 2: 4 MiB chunks on a grid, so 4 MB is one chunk.
    assert_eq!(v["manifest"]["format"], 2);
    assert_eq!(v["manifest"]["payloads"][0]["chunk_size"], 4 << 20);
    assert_eq!(
        v["manifest"]["payloads"][0]["chunks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn keygen_writes_a_private_key_only_the_owner_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("release");
    let o = tool()
        .arg("keygen")
        .arg("--out")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = dir.path().join("release.key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    let public = std::fs::read_to_string(dir.path().join("release.pub.pem")).unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    // Never overwrites an existing key.
    let again = tool()
        .arg("keygen")
        .arg("--out")
        .arg(&prefix)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(4));
}

#[test]
fn missing_payload_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = tool()
        .args([
            "bundle",
            "create",
            "--compatible",
            "x",
            "--version",
            "1.0.0",
            "--security-version",
            "1",
        ])
        .arg("--key")
        .arg(demo_key())
        .arg("--out")
        .arg(dir.path().join("x.eota"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no payloads"));
}

fn create_with_images(dir: &Path, archive: &Path) -> std::process::Output {
    tool()
        .args(["bundle", "create", "--compatible", "edge-test"])
        .args(["--version", "1.0.0", "--security-version", "1"])
        .args(["--created", "1700000000"])
        .arg("--key")
        .arg(demo_key())
        .arg("--image")
        .arg(payload(dir))
        .arg("--payload")
        .arg(format!("container-images:apps:{}", archive.display()))
        .arg("--out")
        .arg(dir.join("images.eota"))
        .output()
        .unwrap()
}

#[test]
fn bundle_create_signs_the_images_a_container_archive_holds() {
    use edge_ota_format::build::oci;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    let archive = dir.path().join("apps.tar");
    let img = oci::write_oci_archive_file(
        &oci::OciArchiveSpec {
            from: tree,
            name: "registry.local/edge/hello:1".into(),
            architecture: oci::host_architecture().into(),
            entrypoint: vec!["/bin/hello".into()],
            mtime: 1_700_000_000,
        },
        &archive,
    )
    .unwrap();
    let o = create_with_images(dir.path(), &archive);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tool()
        .args(["bundle", "info", "--json"])
        .arg(dir.path().join("images.eota"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let apps = &v["manifest"]["payloads"][1];
    assert_eq!(apps["kind"], "container-images");
    assert_eq!(apps["images"][0]["name"], "registry.local/edge/hello:1");
    assert_eq!(apps["images"][0]["digest"], img.digest.as_str());
    // An OCI archive: the manifest digest, the default, which is left out.
    assert!(apps["images"][0]["digest_of"].is_null());
    assert_eq!(apps["images"].as_array().unwrap().len(), 1);
}

#[test]
fn container_archive_without_named_images_is_refused_at_build() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("not-images.tar");
    std::fs::write(&archive, vec![0u8; 10240]).unwrap();
    let o = create_with_images(dir.path(), &archive);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("apps") && err.contains("not-images.tar"),
        "{err}"
    );
    assert!(!dir.path().join("images.eota").exists());
}
