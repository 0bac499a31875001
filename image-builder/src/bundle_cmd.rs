//! `keygen` and `bundle create|info`: thin wrappers over the bundle writer in the edge-ota
//! library, so device and builder share one definition of the format.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use edge_ota::error::{Error, IoContext, Result};
use edge_ota_format::build::keys;
use edge_ota_format::build::oci;
use edge_ota_format::build::writer::{self, BundleSpec, Chunking, DeltaInput, PayloadInput};
use edge_ota_format::head::BundleHead;
use edge_ota_format::signature;
use edge_ota_format::PayloadKind;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Output prefix: writes PREFIX.key.pem (private, mode 0600) and PREFIX.pub.pem.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Create a signed bundle.
    Create(Box<CreateArgs>),
    /// Show a bundle's header, manifest and signatures (not verified).
    Info {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// What a device running OLD's image would fetch of NEW: its head, plus a delta from
    /// OLD if NEW carries one, else the chunks whose hashes OLD lacks (each counted once).
    Reuse { old: PathBuf, new: PathBuf },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Output bundle file.
    #[arg(long)]
    out: PathBuf,
    /// Product/hardware string devices must match.
    #[arg(long)]
    compatible: String,
    /// Bundle version (semver).
    #[arg(long)]
    version: semver::Version,
    /// Anti-rollback counter: devices refuse bundles below their confirmed one.
    #[arg(long)]
    security_version: u64,
    /// Signing key (PEM PKCS#8); repeat for several signatures.
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Root filesystem image (shorthand for --payload image:rootfs:PATH).
    #[arg(long)]
    image: Option<PathBuf>,
    /// A payload KIND:TARGET:PATH, KIND one of image, kernel, container-images, file.
    #[arg(long = "payload")]
    payloads: Vec<String>,
    /// Creation time, unix seconds. Default: $SOURCE_DATE_EPOCH, else the newest input mtime
    /// (so the same inputs give the same bytes).
    #[arg(long)]
    created: Option<u64>,
    /// Expiry, unix seconds.
    #[arg(long, conflicts_with = "expires_in_days")]
    expires: Option<u64>,
    /// Expiry relative to the creation time.
    #[arg(long)]
    expires_in_days: Option<u64>,
    /// zstd level (large frames at a high level: the download is what costs).
    #[arg(long, default_value_t = 19)]
    level: i32,
    /// Compression threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Format version: 2 (chunk grid, deltas, compressed manifest) or 1.
    #[arg(long, default_value_t = 2)]
    format: u32,
    /// Chunk size in KiB: format 2's grid (default 4096), format 1's content-defined average
    /// (min = avg/4, max = avg*4; default 64).
    #[arg(long)]
    chunk_kib: Option<u32>,
    /// Format 1: fixed-size chunks of exactly --chunk-kib instead of content-defined ones.
    #[arg(long)]
    fixed_chunks: bool,
    /// Also carry a delta of the rootfs image from this earlier image, for devices that run
    /// it: IMAGE or IMAGE=VERSION (the version is shown in their plans). Repeatable.
    #[arg(long = "delta-from", value_name = "IMAGE[=VERSION]")]
    delta_from: Vec<String>,
}

pub fn keygen(a: KeygenArgs) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (private, public) = keys::generate_key_pem()?;
    let key_path = PathBuf::from(format!("{}.key.pem", a.out.display()));
    let pub_path = PathBuf::from(format!("{}.pub.pem", a.out.display()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .and_then(|mut f| f.write_all(private.as_bytes()))
        .ctx(|| format!("writing {}", key_path.display()))?;
    std::fs::write(&pub_path, public).ctx(|| format!("writing {}", pub_path.display()))?;
    let id = signature::key_id(&signature::read_public_key(&pub_path)?);
    println!("key {id}: {} {}", key_path.display(), pub_path.display());
    Ok(())
}

fn parse_payload(spec: &str) -> Result<PayloadInput> {
    let mut parts = spec.splitn(3, ':');
    let (Some(kind), Some(target), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::Usage(format!(
            "--payload {spec:?}: expected KIND:TARGET:PATH"
        )));
    };
    let kind = match kind {
        "image" => PayloadKind::Image,
        "kernel" => PayloadKind::Kernel,
        "container-images" => PayloadKind::ContainerImages,
        "file" => PayloadKind::File,
        other => return Err(Error::Usage(format!("--payload: unknown kind {other:?}"))),
    };
    Ok(PayloadInput {
        name: target.to_string(),
        kind,
        target: target.to_string(),
        path: path.into(),
    })
}

pub fn create(a: CreateArgs) -> Result<()> {
    let mut payloads = Vec::new();
    if let Some(img) = &a.image {
        payloads.push(PayloadInput {
            name: "rootfs".into(),
            kind: PayloadKind::Image,
            target: "rootfs".into(),
            path: img.clone(),
        });
    }
    for p in &a.payloads {
        payloads.push(parse_payload(p)?);
    }
    if payloads.is_empty() {
        return Err(Error::Usage(
            "no payloads: give --image or --payload".into(),
        ));
    }
    let created = match a.created {
        Some(c) => c,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v
                .parse()
                .map_err(|_| Error::Usage(format!("SOURCE_DATE_EPOCH={v:?} is not a number")))?,
            Err(_) => newest_mtime(&payloads)?,
        },
    };
    let expires = a
        .expires
        .or(a.expires_in_days.map(|d| created + d * 86_400));
    let keys = a
        .keys
        .iter()
        .map(|k| keys::read_private_key(k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut spec = BundleSpec::new(
        &a.compatible,
        a.version,
        a.security_version,
        created,
        payloads,
    );
    spec.container_images = container_images(&spec.payloads)?;
    spec.expires = expires;
    spec.format = a.format;
    spec.zstd_level = a.level;
    if let Some(t) = a.threads {
        spec.threads = t;
    }
    if a.format == 1 {
        let avg = a.chunk_kib.unwrap_or(64) << 10;
        spec.chunking = if a.fixed_chunks {
            Chunking {
                min: avg,
                avg,
                max: avg,
            }
        } else {
            Chunking {
                min: avg / 4,
                avg,
                max: avg * 4,
            }
        };
    } else if let Some(kib) = a.chunk_kib {
        spec.chunk_size = kib << 10;
    }
    for d in &a.delta_from {
        let (base, version) = match d.split_once('=') {
            Some((b, v)) => (PathBuf::from(b), Some(v.to_string())),
            None => (PathBuf::from(d), None),
        };
        spec.deltas.push(DeltaInput {
            payload: "rootfs".into(),
            base,
            base_version: version,
        });
    }
    let m = write_bundle(&spec, &keys, &a.out)?;
    let chunks: usize = m.payloads.iter().map(|p| p.chunks.len()).sum();
    let size: u64 = m.payloads.iter().map(|p| p.size).sum();
    let bundle_len = std::fs::metadata(&a.out)
        .ctx(|| format!("reading {}", a.out.display()))?
        .len();
    println!(
        "{}: version {} security {}; {} payload(s), {size} bytes in {chunks} chunks -> {bundle_len} bytes",
        a.out.display(),
        m.version,
        m.security_version,
        m.payloads.len()
    );
    Ok(())
}

/// Write the bundle next to `out` and make it durable there (a half-written bundle is never
/// left under the final name). Bundles are public (their signature protects them): 0644.
fn write_bundle(
    spec: &BundleSpec,
    keys: &[keys::SigningKey],
    out: &std::path::Path,
) -> Result<edge_ota_format::Manifest> {
    use std::os::unix::fs::PermissionsExt;
    let dir = edge_ota::fsutil::parent_dir(out);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .ctx(|| format!("creating a temporary file in {}", dir.display()))?;
    let m = writer::create(spec, keys, tmp.as_file_mut(), dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .ctx(|| format!("setting permissions of {}", out.display()))?;
    edge_ota::fsutil::persist(tmp, out)?;
    Ok(m)
}

/// The images each container-images payload's archive holds, for the signed manifest: the
/// device checks what containerd imported against them. An archive whose images cannot be
/// named and hashed is refused here rather than shipped unverifiable.
fn container_images(
    payloads: &[PayloadInput],
) -> Result<std::collections::BTreeMap<String, Vec<edge_ota_format::ContainerImage>>> {
    let mut out = std::collections::BTreeMap::new();
    for p in payloads
        .iter()
        .filter(|p| p.kind == PayloadKind::ContainerImages)
    {
        let images = oci::archive_images(&p.path).map_err(|e| match e {
            oci::ArchiveError::Invalid { .. } => {
                Error::Usage(format!("container-images payload {}: {e}", p.name))
            }
            oci::ArchiveError::Io { context, source } => Error::Io { context, source },
        })?;
        out.insert(p.name.clone(), images);
    }
    Ok(out)
}

fn newest_mtime(payloads: &[PayloadInput]) -> Result<u64> {
    let mut newest = 0;
    for p in payloads {
        let m = std::fs::metadata(&p.path).ctx(|| format!("reading {}", p.path.display()))?;
        let t = m
            .modified()
            .ctx(|| format!("reading mtime of {}", p.path.display()))?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        newest = newest.max(t);
    }
    Ok(newest)
}

fn reuse(old: &std::path::Path, new: &std::path::Path) -> Result<()> {
    let old_head = read_head(old)?;
    let old = old_head.parse_unverified()?;
    let new_head = read_head(new)?;
    let new_m = new_head.parse_unverified()?;
    let head = new_head.header.payload_offset();
    let mut fetch = 0u64;
    let mut delta = 0u64;
    let mut how = "chunks";
    for p in &new_m.payloads {
        let old_p = old.payloads.iter().find(|o| o.name == p.name);
        // The image a device running OLD holds, as recorded at its install.
        let base = old_p.map(|o| (o.size, o.blake3));
        if let Some(d) = p
            .deltas
            .iter()
            .find(|d| Some((d.base.size, d.base.blake3)) == base)
        {
            let frames: u64 = d.frames.iter().map(|f| u64::from(f.clen)).sum();
            delta += frames;
            fetch += frames;
            how = "delta";
            continue;
        }
        let have: std::collections::HashSet<_> = old_p
            .map(|o| o.chunks.iter().map(|c| c.hash).collect())
            .unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        for c in &p.chunks {
            if !have.contains(&c.hash) && seen.insert(c.hash) {
                fetch += u64::from(c.clen);
            }
        }
    }
    let total = std::fs::metadata(new)
        .ctx(|| format!("reading {}", new.display()))?
        .len();
    println!(
        "a device running the old image fetches {} bytes of {total} ({:.2}%): head {head}, {} {}",
        head + fetch,
        100.0 * (head + fetch) as f64 / total.max(1) as f64,
        how,
        if how == "delta" { delta } else { fetch }
    );
    Ok(())
}

fn read_head(path: &std::path::Path) -> Result<BundleHead> {
    let mut f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    Ok(BundleHead::read(&mut f)?)
}

pub fn run(c: BundleCommand) -> Result<()> {
    match c {
        BundleCommand::Create(a) => create(*a),
        BundleCommand::Reuse { old, new } => reuse(&old, &new),
        BundleCommand::Info { bundle, json } => {
            let mut f =
                std::fs::File::open(&bundle).ctx(|| format!("opening {}", bundle.display()))?;
            let head = BundleHead::read(&mut f)?;
            let m = head.parse_unverified()?;
            if json {
                let v = serde_json::json!({
                    "version": 1,
                    "header": {
                        "manifest_len": head.header.manifest_len,
                        "signatures_len": head.header.signatures_len,
                        "payload_len": head.header.payload_len,
                    },
                    "signatures": head.signatures.signatures.iter().map(|s| &s.key_id).collect::<Vec<_>>(),
                    "manifest": m,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serializable")
                );
            } else {
                println!(
                    "{}: {} {} security {} created {} expires {}",
                    bundle.display(),
                    m.compatible,
                    m.version,
                    m.security_version,
                    m.created,
                    m.expires.map_or("never".into(), |e| e.to_string())
                );
                println!(
                    "header: manifest {} bytes, signatures {} bytes, payload {} bytes",
                    head.header.manifest_len, head.header.signatures_len, head.header.payload_len
                );
                for s in &head.signatures.signatures {
                    println!("signed by key {}", s.key_id);
                }
                for p in &m.payloads {
                    let clen: u64 = p.chunks.iter().map(|c| u64::from(c.clen)).sum();
                    println!(
                        "payload {}: {} -> {}, {} bytes ({} compressed) in {} chunks, blake3 {}",
                        p.name,
                        p.kind.as_str(),
                        p.target,
                        p.size,
                        clen,
                        p.chunks.len(),
                        p.blake3
                    );
                    for i in &p.images {
                        println!("  image {} {} {}", i.name, i.digest_of.as_str(), i.digest);
                    }
                }
            }
            Ok(())
        }
    }
}
