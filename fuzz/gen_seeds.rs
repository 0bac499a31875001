//! Writes the committed seed corpus, `fuzz/seeds/<target>/`, from real bundles and
//! environments:
//!
//! - bundle_head: small bundles made by the build-side writer (`create_file`), format 1 and 2
//!   (with a delta), signed with the insecure demo keys in `keys-example/`;
//! - manifest: their manifests' JSON (mode byte 0: header version and payload length from the
//!   manifest);
//! - chunk_decode: their chunk frames, and a few frames of edge-case shapes, each after its
//!   declared length (4 bytes, little endian);
//! - delta_frame: the delta bundle's literal frames with their prefixes read from the base
//!   image;
//! - grubenv: blocks written by `grub-editenv`, and by `grubenv::serialize`/`serialize_copy`;
//! - uboot_env: environments written by `fw_setenv` (single and redundant) and by
//!   `uboot_env::serialize`, and `fw_env.config` texts (the shipped example);
//! - config: the README's example configuration and the QEMU tests' guest configuration.
//!
//! Every seed is checked to be accepted by the code under test, so the fuzzers start from the
//! success paths. Seeds from external tools (`grub-editenv`, `fw_setenv`) are skipped with a
//! note when the tool is missing. Run by hand:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use edge_ota::bootloader::{grubenv, uboot_env};
use edge_ota::bundle::decode::decode_with_prefix;
use edge_ota::bundle::frame::check_frame;
use edge_ota::config::Config;
use edge_ota_format::build::keys::read_private_key;
use edge_ota_format::build::writer::{create_file, BundleSpec, Chunking, DeltaInput, PayloadInput};
use edge_ota_format::head::BundleHead;
use edge_ota_format::manifest::{limits, PayloadKind, FORMAT_V1, FORMAT_VERSION};
use edge_ota_format::signature::{read_public_key, TrustedKeys};

fn main() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = fuzz.parent().unwrap();
    let seeds = fuzz.join("seeds");
    let scratch = std::env::temp_dir().join(format!("edge-ota-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut out = Seeds::new(&seeds);

    bundles(repo, &scratch, &mut out);
    chunk_shapes(&mut out);
    grub(&scratch, &mut out);
    uboot(repo, &scratch, &mut out);
    configs(repo, &mut out);

    std::fs::remove_dir_all(&scratch).unwrap();
    println!(
        "{} seeds, {} bytes, in {}",
        out.count,
        out.bytes,
        seeds.display()
    );
}

/// Writes seeds, emptying each target's directory the first time it is written to.
struct Seeds {
    root: PathBuf,
    cleared: Vec<String>,
    count: usize,
    bytes: usize,
}

impl Seeds {
    fn new(root: &Path) -> Self {
        Seeds {
            root: root.into(),
            cleared: Vec::new(),
            count: 0,
            bytes: 0,
        }
    }

    fn put(&mut self, target: &str, name: &str, data: &[u8]) {
        let dir = self.root.join(target);
        if !self.cleared.iter().any(|t| t == target) {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            self.cleared.push(target.into());
        }
        std::fs::write(dir.join(name), data).unwrap();
        self.count += 1;
        self.bytes += data.len();
        println!("{target}/{name}: {} bytes", data.len());
    }
}

/// Text shaped like a root filesystem's config files: compresses like one.
fn text(lines: usize, tag: &str) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..lines {
        writeln!(
            s,
            "{tag}.{i}: net.ipv4.conf.all.rp_filter = {} # line",
            i % 3
        )
        .unwrap();
    }
    s.into_bytes()
}

/// A block of `len` bytes of text unique to `tag`.
fn block(len: usize, tag: &str) -> Vec<u8> {
    let mut b = text(len / 40 + 1, tag);
    b.truncate(len);
    b
}

fn bundles(repo: &Path, scratch: &Path, out: &mut Seeds) {
    let keys = repo.join("keys-example");
    let demo = read_private_key(&keys.join("INSECURE-demo.key.pem")).unwrap();
    let second = read_private_key(&keys.join("INSECURE-demo-second.key.pem")).unwrap();
    let trust = TrustedKeys::new(
        vec![
            read_public_key(&keys.join("INSECURE-demo.pub.pem")).unwrap(),
            read_public_key(&keys.join("INSECURE-demo-second.pub.pem")).unwrap(),
        ],
        1,
    )
    .unwrap();

    let file = |name: &str, data: &[u8]| {
        let p = scratch.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let input = |name: &str, kind, target: &str, path: &Path| PayloadInput {
        name: name.into(),
        kind,
        target: target.into(),
        path: path.into(),
    };
    // Small chunks (the smallest grid, small content-defined chunks), so a few KiB of payload
    // make several chunks and the seeds stay small.
    let spec = |format, version: &str, payloads| {
        let mut s = BundleSpec::new(
            "edge-os-x86_64-fuzz",
            version.parse().unwrap(),
            1,
            1_700_000_000,
            payloads,
        );
        s.format = format;
        s.chunking = Chunking {
            min: 256,
            avg: 1024,
            max: 4096,
        };
        s.chunk_size = 4096;
        s.threads = 1;
        s
    };

    // Images: 4 KiB blocks of text, one all zero (a chunk stored as nothing in format 2). The
    // new image keeps two blocks of the base, changes one and zeroes one: a delta.
    let (b0, b1, b2) = (block(4096, "b0"), block(4096, "b1"), block(4096, "b2"));
    let zeros = vec![0u8; 4096];
    let base = file("base.img", &[&b0[..], &b1, &b2, &b2].concat());
    let rootfs = file(
        "rootfs.img",
        &[&b0[..], &b1, &block(4096, "new"), &zeros].concat(),
    );
    let kernel = file("vmlinuz", &text(20, "kernel"));
    let hostname = file("hostname", b"edge-node-1\n");
    let images = file("images.tar", &text(25, "oci"));
    let empty = file("empty", b"");
    let all = vec![
        input("rootfs", PayloadKind::Image, "rootfs", &rootfs),
        input("kernel", PayloadKind::Kernel, "vmlinuz", &kernel),
        input(
            "images",
            PayloadKind::ContainerImages,
            "images.tar",
            &images,
        ),
        input("hostname", PayloadKind::File, "etc/hostname", &hostname),
        input("marker", PayloadKind::File, "etc/marker", &empty),
    ];
    let image = || vec![input("rootfs", PayloadKind::Image, "rootfs", &rootfs)];

    let v1_image = spec(FORMAT_V1, "1.0.0", image());
    let mut v1_multi = spec(FORMAT_V1, "1.1.0-rc.1+build.7", all.clone());
    v1_multi.expires = Some(1_900_000_000);
    let v2_image = spec(FORMAT_VERSION, "2.0.0", image());
    let mut v2_multi = spec(FORMAT_VERSION, "2.1.0-rc.1+build.7", all);
    v2_multi.expires = Some(1_900_000_000);
    let mut v2_delta = spec(FORMAT_VERSION, "2.2.0", image());
    v2_delta.deltas = vec![DeltaInput {
        payload: "rootfs".into(),
        base: base.clone(),
        base_version: Some("2.0.0".into()),
    }];
    let v2_unsigned = spec(
        FORMAT_VERSION,
        "0.1.0",
        vec![input(
            "hostname",
            PayloadKind::File,
            "etc/hostname",
            &hostname,
        )],
    );
    let base_bytes = std::fs::read(&base).unwrap();

    let cases = [
        ("v1-image-1sig", v1_image, vec![demo.clone()]),
        (
            "v1-multi-2sig",
            v1_multi,
            vec![demo.clone(), second.clone()],
        ),
        ("v2-image-1sig", v2_image, vec![demo.clone()]),
        (
            "v2-multi-2sig",
            v2_multi,
            vec![demo.clone(), second.clone()],
        ),
        ("v2-delta", v2_delta, vec![second]),
        ("v2-unsigned", v2_unsigned, vec![]),
    ];
    let mut frames = Vec::new();
    let mut deltas = 0;
    for (name, spec, keys) in cases {
        let path = scratch.join(format!("{name}.eota"));
        create_file(&spec, &keys, &path).unwrap();
        let bundle = std::fs::read(&path).unwrap();
        let head = BundleHead::read(&mut &bundle[..]).unwrap();
        let manifest = if keys.is_empty() {
            head.parse_unverified().unwrap()
        } else {
            head.verify(&trust).unwrap().manifest
        };
        out.put("bundle_head", name, &bundle);

        let mut m = vec![0u8];
        m.extend_from_slice(&head.manifest_json().unwrap());
        out.put("manifest", name, &m);

        // A few real chunk frames of each bundle (all-zero chunks have none), each after its
        // declared length.
        let mut taken = 0;
        let payload = &bundle[head.header.payload_offset() as usize..];
        for (p, c) in manifest
            .payloads
            .iter()
            .flat_map(|p| p.chunks.iter().map(move |c| (p, c)))
            .filter(|(_, c)| c.clen > 0)
        {
            let z = &payload[c.offset as usize..][..c.clen as usize];
            check_frame(z, c.len).unwrap();
            let mut seed = c.len.to_le_bytes().to_vec();
            seed.extend_from_slice(z);
            if taken < 3 && !frames.contains(&seed) {
                taken += 1;
                out.put(
                    "chunk_decode",
                    &format!("{name}-{}-{}", p.name, c.offset),
                    &seed,
                );
                frames.push(seed);
            }
        }

        // Delta literal frames with their prefixes, read from the base as the device does.
        for d in manifest.payloads.iter().flat_map(|p| &p.deltas) {
            assert_eq!(d.base.size, base_bytes.len() as u64);
            for f in &d.frames {
                let prefix: Vec<u8> = f
                    .prefix
                    .iter()
                    .flat_map(|&[o, l]| &base_bytes[o as usize..][..l as usize])
                    .copied()
                    .collect();
                let z = &payload[f.offset as usize..][..f.clen as usize];
                let lit = decode_with_prefix(z, f.len, &prefix).unwrap();
                assert_eq!(lit.len(), f.len as usize);
                let mut seed = f.len.to_le_bytes().to_vec();
                seed.extend_from_slice(&(prefix.len() as u32).to_le_bytes());
                seed.extend_from_slice(&prefix);
                seed.extend_from_slice(z);
                out.put("delta_frame", &format!("{name}-{}", f.offset), &seed);
                deltas += 1;
            }
        }
    }
    assert!(
        deltas > 0,
        "the delta bundle has no delta: change its images"
    );
    // A literal frame without prefix, and one against an unrelated prefix (refused or not).
    let lit = block(4096, "lit");
    let z = zstd::bulk::compress(&lit, 19).unwrap();
    for (name, prefix) in [("no-prefix", &b""[..]), ("unrelated-prefix", &b0[..1024])] {
        let mut seed = 4096u32.to_le_bytes().to_vec();
        seed.extend_from_slice(&(prefix.len() as u32).to_le_bytes());
        seed.extend_from_slice(prefix);
        seed.extend_from_slice(&z);
        out.put("delta_frame", name, &seed);
    }
    // The arbitrary-built mode of the manifest target, from a plain byte ramp.
    let mut ramp = vec![1u8];
    ramp.extend(0..=255u8);
    out.put("manifest", "built-ramp", &ramp);
}

/// Frames whose header shapes the bundle chunks do not show: each content-size field width,
/// a checksum, several blocks, the largest chunk, no content size (refused).
fn chunk_shapes(out: &mut Seeds) {
    let frame = |data: &[u8], checksum: bool, content_size: bool| {
        let mut c = zstd::bulk::Compressor::new(19).unwrap();
        c.include_checksum(checksum).unwrap();
        c.include_contentsize(content_size).unwrap();
        let z = c.compress(data).unwrap();
        let mut seed = (data.len() as u32).to_le_bytes().to_vec();
        seed.extend_from_slice(&z);
        if content_size {
            check_frame(&z, data.len() as u32).unwrap();
        }
        seed
    };
    out.put(
        "chunk_decode",
        "fcs1-single-byte",
        &frame(b"x", false, true),
    );
    out.put(
        "chunk_decode",
        "fcs2-300-bytes",
        &frame(&text(10, "a")[..300], false, true),
    );
    out.put(
        "chunk_decode",
        "checksum",
        &frame(&text(10, "b"), true, true),
    );
    out.put(
        "chunk_decode",
        "multi-block",
        &frame(&text(4000, "c"), false, true),
    );
    let max = vec![0u8; limits::MAX_CHUNK as usize];
    out.put("chunk_decode", "max-chunk-zeros", &frame(&max, false, true));
    out.put(
        "chunk_decode",
        "no-content-size",
        &frame(&text(3, "d"), false, false),
    );
}

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The variables edge-ota keeps in a boot environment.
fn protocol_vars() -> BTreeMap<String, String> {
    vars(&[
        ("EDGE_ORDER", "A B"),
        ("EDGE_A_STATE", "good"),
        ("EDGE_A_TRIES", "0"),
        ("EDGE_B_STATE", "trying"),
        ("EDGE_B_TRIES", "3"),
    ])
}

fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!("note: {name} not found in PATH: its seeds are not regenerated");
    }
    found
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn grub(scratch: &Path, out: &mut Seeds) {
    let p = Path::new("/seed");
    let block = grubenv::serialize(&protocol_vars()).unwrap();
    grubenv::parse(&block, p).unwrap();
    out.put("grubenv", "serialize", &block);
    let block = grubenv::serialize_copy(&protocol_vars(), 42).unwrap();
    assert!(matches!(
        grubenv::parse_copy(&block, p),
        grubenv::Copy::Valid { seq: 42, .. }
    ));
    out.put("grubenv", "serialize_copy-seq42", &block);

    let Some(editenv) = tool("grub-editenv") else {
        return;
    };
    let file = scratch.join("grubenv");
    run(Command::new(&editenv).arg(&file).arg("create"));
    let block = std::fs::read(&file).unwrap();
    grubenv::parse(&block, p).unwrap();
    out.put("grubenv", "grub-editenv-create", &block);
    run(Command::new(&editenv).arg(&file).args([
        "set",
        "EDGE_ORDER=B A",
        "EDGE_A_STATE=good",
        "EDGE_A_TRIES=0",
        "EDGE_B_STATE=trying",
        "EDGE_B_TRIES=3",
        r"back=a\b\\c",
        "eq=x=y",
        "empty=",
        "nl=line1\nline2",
    ]));
    let block = std::fs::read(&file).unwrap();
    assert_eq!(grubenv::parse(&block, p).unwrap()["nl"], "line1\nline2");
    out.put("grubenv", "grub-editenv-set", &block);
}

/// Environment size of the U-Boot seeds (small, so the fuzzer's inputs stay small).
const UBOOT_SIZE: usize = 0x1000;

fn uboot(repo: &Path, scratch: &Path, out: &mut Seeds) {
    let p = Path::new("/seed");
    let mut v = protocol_vars();
    v.insert("bootcmd".into(), "run edge_boot".into());
    let image = uboot_env::serialize(&v, UBOOT_SIZE, None).unwrap();
    uboot_env::parse(&image, false, p).unwrap();
    out.put("uboot_env", "serialize-single", &image);
    let image = uboot_env::serialize(&v, UBOOT_SIZE, Some(7)).unwrap();
    uboot_env::parse(&image, true, p).unwrap();
    out.put("uboot_env", "serialize-redundant-flag7", &image);

    let example = std::fs::read(repo.join("bootloader/u-boot/fw_env.config.example")).unwrap();
    uboot_env::parse_fw_env_config(std::str::from_utf8(&example).unwrap()).unwrap();
    out.put("uboot_env", "fw_env.config.example", &example);
    let text = "# comment\n/dev/mmcblk0\t4161536\t10000\t0x200 0X10\n\
                /dev/mmcblk0 -0x8000 2000 0x1000 2 # from the end\n";
    uboot_env::parse_fw_env_config(text).unwrap();
    out.put("uboot_env", "fw_env.config-numbers", text.as_bytes());

    let Some(setenv) = tool("fw_setenv") else {
        return;
    };
    let defenv = scratch.join("defenv");
    std::fs::write(&defenv, "").unwrap();
    let script = scratch.join("script");
    let set = |config: &Path, pairs: &BTreeMap<String, String>| {
        let text: String = pairs
            .iter()
            .map(|(k, val)| format!("{k}={val}\n"))
            .collect();
        std::fs::write(&script, text).unwrap();
        run(Command::new(&setenv)
            .arg("-c")
            .arg(config)
            .arg("-f")
            .arg(&defenv)
            .arg("-s")
            .arg(&script));
    };
    let blank = |name: &str| {
        let f = scratch.join(name);
        std::fs::write(&f, vec![0u8; UBOOT_SIZE]).unwrap();
        f
    };

    let env = blank("uboot-single");
    let config = scratch.join("fw_env-single.config");
    std::fs::write(&config, format!("{} 0x0 {UBOOT_SIZE:#x}\n", env.display())).unwrap();
    set(&config, &v);
    let image = std::fs::read(&env).unwrap();
    assert_eq!(uboot_env::parse(&image, false, p).unwrap().vars, v);
    out.put("uboot_env", "fw_setenv-single", &image);

    let (env0, env1) = (blank("uboot-r0"), blank("uboot-r1"));
    let config = scratch.join("fw_env-redundant.config");
    std::fs::write(
        &config,
        format!(
            "{} 0x0 {UBOOT_SIZE:#x}\n{} 0x0 {UBOOT_SIZE:#x}\n",
            env0.display(),
            env1.display()
        ),
    )
    .unwrap();
    set(&config, &v);
    v.insert("EDGE_B_TRIES".into(), "2".into());
    v.insert("EDGE_ORDER".into(), "B A".into());
    set(&config, &v);
    for (i, f) in [env0, env1].iter().enumerate() {
        let image = std::fs::read(f).unwrap();
        uboot_env::parse(&image, true, p).unwrap();
        out.put("uboot_env", &format!("fw_setenv-redundant-copy{i}"), &image);
    }
}

/// The text of the first ```toml block after `## Configuration` in the README.
fn readme_config(readme: &str) -> String {
    let section = &readme[readme
        .find("## Configuration")
        .expect("README: Configuration")..];
    let start = section.find("```toml\n").expect("README: toml block") + "```toml\n".len();
    let len = section[start..].find("```").unwrap();
    section[start..start + len].to_string()
}

/// The QEMU tests' guest configuration (`guest_config` in qemu-tests/src/artifacts.rs).
fn guest_config(artifacts: &str, extra_probe: &str) -> String {
    let compatible = artifacts
        .split("pub const COMPATIBLE: &str = \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("artifacts.rs: COMPATIBLE");
    let body = &artifacts[artifacts
        .find("fn guest_config")
        .expect("artifacts.rs: guest_config")..];
    let start = body.find("r#\"").unwrap() + 3;
    let len = body[start..].find("\"#").unwrap();
    body[start..start + len]
        .replace("{COMPATIBLE}", compatible)
        .replace("{extra_probe}", extra_probe)
}

fn configs(repo: &Path, out: &mut Seeds) {
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let artifacts = std::fs::read_to_string(repo.join("qemu-tests/src/artifacts.rs")).unwrap();
    let cases = [
        ("readme.toml", readme_config(&readme)),
        ("qemu-guest.toml", guest_config(&artifacts, "")),
        (
            "qemu-guest-health-fail.toml",
            guest_config(
                &artifacts,
                "\n[[health.probe]]\nname = \"kubelet-ready\"\nkind = \"file\"\npath = \"/run/kubelet-ready-never-exists\"\n",
            ),
        ),
    ];
    for (name, text) in cases {
        if let Err(e) = Config::parse(&text, Path::new(name)) {
            panic!("{name} does not parse: {e}\n{text}");
        }
        out.put("config", name, text.as_bytes());
    }
}
