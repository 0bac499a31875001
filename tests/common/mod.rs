//! Shared fixture for the CLI tests: a device made of files (two slot files, a file boot
//! environment, a state directory, a fake kernel command line) and bundles signed with the
//! insecure demo keys from keys-example/.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use edge_ota::bootloader::env::EnvBootloader;
use edge_ota::bootloader::file::FileEnv;
use edge_ota::bootloader::{Bootloader, EnvStore, SlotBootState};
use edge_ota::bundle::PayloadKind;
use edge_ota_format::build::writer::{self, BundleSpec, Chunking, DeltaInput, PayloadInput};

pub fn demo_key(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("keys-example")
        .join(name)
}

pub fn signing_key(name: &str) -> edge_ota_format::build::keys::SigningKey {
    edge_ota_format::build::keys::read_private_key(&demo_key(name)).unwrap()
}

/// Deterministic test data: pseudo-random, text and zeros, like a filesystem image.
pub fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    while v.len() < len / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    let mut n = 0u64;
    while v.len() < len * 3 / 4 {
        v.extend_from_slice(format!("line {n} of some configuration text\n").as_bytes());
        n += 1;
    }
    v.resize(len, 0);
    v
}

pub struct Device {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

pub struct BundleOpts {
    pub compatible: String,
    pub version: &'static str,
    pub security_version: u64,
    pub created: u64,
    pub expires: Option<u64>,
    pub keys: Vec<&'static str>,
    pub payloads: Vec<(PayloadKind, &'static str, Vec<u8>)>,
    /// Format version: 2 (chunk grid, deltas) or 1 (content-defined chunks).
    pub format: u32,
    /// Version 2 chunk size: small, so small test images have many chunks.
    pub chunk_size: u32,
    /// Base images to build deltas of the "rootfs" payload against: (bytes, version).
    pub deltas: Vec<(Vec<u8>, &'static str)>,
    /// The images each container-images payload (by target) is signed as holding.
    pub container_images: Vec<(&'static str, Vec<edge_ota::bundle::ContainerImage>)>,
}

impl Default for BundleOpts {
    fn default() -> Self {
        BundleOpts {
            compatible: "edge-test".into(),
            version: "2.0.0",
            security_version: 2,
            created: 1_700_000_000,
            expires: None,
            keys: vec!["INSECURE-demo.key.pem"],
            payloads: vec![(PayloadKind::Image, "rootfs", image_bytes(300_000, 1))],
            format: 2,
            chunk_size: 16 << 10,
            deltas: Vec::new(),
            container_images: Vec::new(),
        }
    }
}

impl Device {
    /// Two slots of `slot_size` bytes (filled with 0xAA so untouched bytes are visible),
    /// booted from A, A good and B bad.
    pub fn new(slot_size: usize) -> Device {
        Self::with_trust(slot_size, &["INSECURE-demo.pub.pem"], 1)
    }

    pub fn with_trust(slot_size: usize, keys: &[&str], threshold: usize) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for s in ["slotA", "slotB"] {
            std::fs::write(p.join(s), vec![0xAAu8; slot_size]).unwrap();
        }
        std::fs::write(
            p.join("cmdline"),
            "BOOT_IMAGE=/boot/vmlinuz ro edgeota.slot=A\n",
        )
        .unwrap();
        let keys: Vec<String> = keys
            .iter()
            .map(|k| format!("{:?}", demo_key(k).display().to_string()))
            .collect();
        let config = p.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"compatible = "edge-test"
state_dir = "{d}/state"
cmdline = "{d}/cmdline"
[trust]
keys = [{keys}]
threshold = {threshold}
[[slot]]
name = "A"
device = "{d}/slotA"
files_dir = "{d}/filesA"
[[slot]]
name = "B"
device = "{d}/slotB"
files_dir = "{d}/filesB"
[bootloader]
backend = "file"
path = "{d}/bootenv"
[health]
deadline_secs = 1
interval_ms = 100
[[health.probe]]
name = "ready-file"
kind = "file"
path = "{d}/healthy"
"#,
                d = p.display(),
                keys = keys.join(", ")
            ),
        )
        .unwrap();
        let env = FileEnv::new(p.join("bootenv"));
        env.store(&EnvBootloader::<FileEnv>::initial_vars(
            &["A".into(), "B".into()],
            "A",
        ))
        .unwrap();
        Device { dir, config }
    }

    /// The same device with the GRUB backend: two grubenv copies in `grub/`, provisioned by
    /// `init-boot-env` (slot A good, version 1.0.0, security version 1).
    pub fn with_grub(slot_size: usize) -> Device {
        let dev = Self::new(slot_size);
        std::fs::create_dir_all(dev.path("grub")).unwrap();
        let cfg = std::fs::read_to_string(&dev.config).unwrap().replace(
            &format!(
                "backend = \"file\"\npath = \"{}/bootenv\"",
                dev.dir.path().display()
            ),
            &format!(
                "backend = \"grub\"\npath = \"{}/grub/grubenv\"",
                dev.dir.path().display()
            ),
        );
        std::fs::write(&dev.config, cfg).unwrap();
        let o = dev.run(&[
            "init-boot-env",
            "--good",
            "A",
            "--version",
            "1.0.0",
            "--security-version",
            "1",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        dev
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Edit the configuration file.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, f(text)).unwrap();
    }

    /// Power on: the boot script picks a slot (using up a try) and the kernel command line
    /// names it (file backend).
    pub fn boot(&self) -> String {
        let slot = self
            .bootloader()
            .select_and_count()
            .unwrap()
            .expect("a bootable slot");
        self.set_booted(&slot);
        slot
    }

    pub fn bundle(&self, name: &str, o: &BundleOpts) -> PathBuf {
        let mut inputs = Vec::new();
        for (i, (kind, target, data)) in o.payloads.iter().enumerate() {
            let path = self.path(&format!("{name}.payload{i}"));
            std::fs::write(&path, data).unwrap();
            inputs.push(PayloadInput {
                name: target.to_string(),
                kind: *kind,
                target: target.to_string(),
                path,
            });
        }
        let out = self.path(name);
        let deltas = o
            .deltas
            .iter()
            .enumerate()
            .map(|(i, (base, version))| {
                let path = self.path(&format!("{name}.base{i}"));
                std::fs::write(&path, base).unwrap();
                DeltaInput {
                    payload: "rootfs".into(),
                    base: path,
                    base_version: Some(version.to_string()),
                }
            })
            .collect();
        let mut spec = BundleSpec::new(
            &o.compatible,
            o.version.parse().unwrap(),
            o.security_version,
            o.created,
            inputs,
        );
        spec.expires = o.expires;
        spec.format = o.format;
        spec.chunk_size = o.chunk_size;
        // Small chunks so even small test images have many.
        spec.chunking = Chunking {
            min: 4 << 10,
            avg: 16 << 10,
            max: 64 << 10,
        };
        spec.zstd_level = 3;
        spec.threads = 2;
        spec.deltas = deltas;
        spec.container_images = o
            .container_images
            .iter()
            .map(|(t, i)| (t.to_string(), i.clone()))
            .collect();
        let keys: Vec<_> = o.keys.iter().map(|k| signing_key(k)).collect();
        writer::create_file(&spec, &keys, &out).unwrap();
        out
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_edge-ota"));
        c.arg("--config").arg(&self.config);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Run with `input` on standard input.
    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // A refused bundle may close the pipe early; that is not a test failure.
        let _ = stdin.write_all(input);
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    pub fn bootloader(&self) -> EnvBootloader<FileEnv> {
        EnvBootloader::new(FileEnv::new(self.path("bootenv")))
    }

    pub fn boot_state(&self, slot: &str) -> SlotBootState {
        self.bootloader().slot_state(slot).unwrap()
    }

    pub fn set_booted(&self, slot: &str) {
        std::fs::write(self.path("cmdline"), format!("ro edgeota.slot={slot}\n")).unwrap();
    }

    pub fn state_json(&self) -> Option<serde_json::Value> {
        std::fs::read(self.path("state/state.json"))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    /// Everything a refused bundle must leave as it was.
    pub fn snapshot(&self) -> (Vec<u8>, Option<Vec<u8>>, Vec<u8>) {
        (
            std::fs::read(self.path("bootenv")).unwrap(),
            std::fs::read(self.path("state/state.json")).ok(),
            std::fs::read(self.path("slotB")).unwrap(),
        )
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert a refusal: exit code, message, a single error line.
/// Assert a refusal: exit code, and exactly one error line, the last, holding `msg`. Notes
/// before it (e.g. that an interrupted install continues) are allowed; nothing else is.
pub fn assert_refused(o: &Output, code: i32, msg: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("edge-ota: error: ") && last.contains(msg),
        "expected one error line with {msg:?}, last: {err}"
    );
    for l in &lines[..lines.len() - 1] {
        assert!(
            l.starts_with("edge-ota: ") && !l.starts_with("edge-ota: error"),
            "only notes may come before the error: {err}"
        );
    }
}

/// Byte ranges of a bundle's parts: (header, manifest, signatures, payload start).
pub fn layout(bundle: &Path) -> (usize, usize, usize, usize) {
    let mut f = std::fs::File::open(bundle).unwrap();
    let h = edge_ota::bundle::head::BundleHead::read(&mut f)
        .unwrap()
        .header;
    let m = h.manifest_len as usize;
    let s = h.signatures_len as usize;
    (64, m, s, 64 + m + s)
}
