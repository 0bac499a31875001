//! Creating bundles (used by `edge-ota-image bundle create`): deterministic manifest and
//! signatures, compression on all cores.
//!
//! Version 2 (the default): every payload is cut on a fixed grid of large chunks (4 MiB by
//! default), each compressed as one zstd frame at a high level (whole-file ratios need large
//! frames), all-zero chunks stored as nothing; an image payload may get deltas against
//! earlier images ([`super::delta`]); the manifest is zstd-compressed JSON.
//!
//! Version 1 (kept so devices' reading of it stays tested): content-defined chunks (FastCDC),
//! each its own frame, JSON manifest as is.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::delta::{self, DeltaParams};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{
    limits, Chunk, ContainerImage, Delta, Digest, Header, ImageId, Manifest, Payload, PayloadKind,
    FORMAT_V1, FORMAT_VERSION,
};

/// Content-defined chunking parameters of version 1 (bytes).
#[derive(Debug, Clone, Copy)]
pub struct Chunking {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        }
    }
}

/// One input file and where it goes.
#[derive(Debug, Clone)]
pub struct PayloadInput {
    pub name: String,
    pub kind: PayloadKind,
    pub target: String,
    pub path: PathBuf,
}

/// An earlier image to build a delta against, for the payload named `payload`.
#[derive(Debug, Clone)]
pub struct DeltaInput {
    pub payload: String,
    pub base: PathBuf,
    pub base_version: Option<String>,
}

/// Everything a bundle is made from. Same spec and keys → same bytes.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub compatible: String,
    pub version: semver::Version,
    pub security_version: u64,
    pub created: u64,
    pub expires: Option<u64>,
    pub payloads: Vec<PayloadInput>,
    /// Format version to write: 2, or 1 for compatibility tests.
    pub format: u32,
    /// Version 1 chunking.
    pub chunking: Chunking,
    /// Version 2 chunk size.
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub threads: usize,
    pub deltas: Vec<DeltaInput>,
    pub delta_params: DeltaParams,
    /// The images each container-images payload (by name) holds, recorded in the signed
    /// manifest for the device to check after importing them. The writer records what it is
    /// given: `edge-ota-image bundle create` reads them from the archive
    /// ([`super::oci::archive_images`]); a test may give a record that disagrees with its
    /// archive, to see the device refuse it.
    pub container_images: std::collections::BTreeMap<String, Vec<ContainerImage>>,
}

impl BundleSpec {
    /// A version 2 spec with the defaults (4 MiB chunks, zstd level 19, all cores, no deltas).
    pub fn new(
        compatible: &str,
        version: semver::Version,
        security_version: u64,
        created: u64,
        payloads: Vec<PayloadInput>,
    ) -> BundleSpec {
        BundleSpec {
            compatible: compatible.into(),
            version,
            security_version,
            created,
            expires: None,
            payloads,
            format: FORMAT_VERSION,
            chunking: Chunking::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 19,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            deltas: Vec::new(),
            delta_params: DeltaParams::default(),
            container_images: Default::default(),
        }
    }
}

/// Version 2 chunk size: large frames compress within a few percent of a whole-file zstd
/// (measured in docs/bundle-format.md) and still fit a small device's memory.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;

/// How many chunks are compressed per parallel batch (version 1): bounds memory to about
/// `BATCH * max chunk` while keeping every core busy.
const BATCH: usize = 256;

/// Write a bundle to `out` (a new file; the caller makes it durable) and return its manifest.
/// Chunk data is spilled to an unnamed temporary file in `scratch` first: the manifest, which
/// precedes it, is only known once every chunk is compressed.
pub fn create(
    spec: &BundleSpec,
    keys: &[SigningKey],
    out: &mut dyn Write,
    scratch: &Path,
) -> Result<Manifest> {
    check_spec(spec)?;
    let mut data = tempfile::tempfile_in(scratch)
        .ctx(|| format!("creating temp file in {}", scratch.display()))?;
    let mut data_w = BufWriter::with_capacity(1 << 20, &mut data);
    let mut offset = 0u64;
    let mut payloads = Vec::new();
    for input in &spec.payloads {
        let (mut payload, written) = if spec.format == FORMAT_V1 {
            chunk_payload_v1(input, spec, offset, &mut data_w)?
        } else {
            chunk_payload_v2(input, spec, offset, &mut data_w)?
        };
        offset += written;
        payload.images = spec
            .container_images
            .get(&input.name)
            .cloned()
            .unwrap_or_default();
        for d in spec.deltas.iter().filter(|d| d.payload == input.name) {
            if let Some((delta, bytes)) = build_delta(input, d, &payload, spec, offset)? {
                data_w
                    .write_all(&bytes)
                    .ctx(|| "writing delta data".into())?;
                offset += bytes.len() as u64;
                payload.deltas.push(delta);
            }
        }
        payloads.push(payload);
    }
    data_w.flush().ctx(|| "writing chunk data".into())?;
    drop(data_w);

    let manifest = Manifest {
        format: spec.format,
        compatible: spec.compatible.clone(),
        version: spec.version.clone(),
        security_version: spec.security_version,
        created: spec.created,
        expires: spec.expires,
        payload_len: offset,
        payloads,
    };
    let json = serde_json::to_vec(&manifest).expect("manifest serializes");
    let manifest_bytes = if spec.format == FORMAT_V1 {
        json
    } else {
        zstd::bulk::compress(&json, 19).map_err(|e| Error::io("compressing the manifest", e))?
    };
    if manifest_bytes.len() as u64 > limits::MAX_MANIFEST {
        return Err(Error::Limit(format!(
            "manifest of {} bytes (limit {})",
            manifest_bytes.len(),
            limits::MAX_MANIFEST
        )));
    }
    let sig_bytes = if keys.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&super::keys::sign(&manifest_bytes, keys)).expect("signatures serialize")
    };
    let header = Header {
        version: spec.format,
        manifest_len: manifest_bytes.len() as u64,
        signatures_len: sig_bytes.len() as u64,
        payload_len: offset,
    };
    manifest.validate(&header)?;

    let mut w = BufWriter::with_capacity(1 << 20, out);
    w.write_all(&header.encode())
        .and_then(|_| w.write_all(&manifest_bytes))
        .and_then(|_| w.write_all(&sig_bytes))
        .ctx(|| "writing the bundle".into())?;
    data.seek(SeekFrom::Start(0))
        .ctx(|| "rewinding chunk data".into())?;
    std::io::copy(&mut data, &mut w).ctx(|| "writing the bundle".into())?;
    w.flush().ctx(|| "writing the bundle".into())?;
    Ok(manifest)
}

/// [`create`] into a file at `path` (replaced; not made durable: for tests and scratch use).
pub fn create_file(spec: &BundleSpec, keys: &[SigningKey], path: &Path) -> Result<Manifest> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut f = File::create(path).ctx(|| format!("creating {}", path.display()))?;
    create(spec, keys, &mut f, dir)
}

fn check_spec(spec: &BundleSpec) -> Result<()> {
    let bad = |what: String| Err(Error::Malformed(what));
    match spec.format {
        FORMAT_V1 => {
            let c = spec.chunking;
            if c.max > limits::MAX_CHUNK || c.min == 0 || !(c.min <= c.avg && c.avg <= c.max) {
                return bad(format!(
                    "invalid chunk sizes {c:?} (max {})",
                    limits::MAX_CHUNK
                ));
            }
            if !spec.deltas.is_empty() {
                return bad("format 1 has no deltas".into());
            }
        }
        FORMAT_VERSION => {
            let cs = spec.chunk_size;
            if cs < 4096 || !cs.is_multiple_of(4096) || cs > limits::MAX_CHUNK {
                return bad(format!(
                    "chunk size {cs}: a multiple of 4096 up to {}",
                    limits::MAX_CHUNK
                ));
            }
        }
        v => return bad(format!("cannot write format {v}")),
    }
    for name in spec.container_images.keys() {
        if !spec
            .payloads
            .iter()
            .any(|p| &p.name == name && p.kind == PayloadKind::ContainerImages)
        {
            return bad(format!(
                "image records for {name:?}, which is not a container-images payload"
            ));
        }
    }
    for d in &spec.deltas {
        match spec.payloads.iter().find(|p| p.name == d.payload) {
            Some(p) if p.kind == PayloadKind::Image => {}
            _ => {
                return bad(format!(
                    "a delta for {:?}, which is not an image payload",
                    d.payload
                ))
            }
        }
    }
    Ok(())
}

/// Version 2: cut one input on the chunk grid, compress the non-zero chunks in parallel,
/// append them to `w`. `start` is where its chunks begin in the payload area. Returns the
/// payload entry and the number of compressed bytes written.
fn chunk_payload_v2(
    input: &PayloadInput,
    spec: &BundleSpec,
    start: u64,
    w: &mut impl Write,
) -> Result<(Payload, u64)> {
    let cs = spec.chunk_size as usize;
    let mut file = File::open(&input.path).ctx(|| format!("opening {}", input.path.display()))?;
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut offset = start;
    let mut size = 0u64;
    // A batch is as many chunks as threads, so memory stays a few chunks per core.
    let per_batch = spec.threads.max(1) * 2;
    loop {
        let mut batch = Vec::with_capacity(per_batch);
        for _ in 0..per_batch {
            let mut buf = Vec::with_capacity(cs);
            (&mut file)
                .take(cs as u64)
                .read_to_end(&mut buf)
                .ctx(|| format!("reading {}", input.path.display()))?;
            if buf.is_empty() {
                break;
            }
            whole.update(&buf);
            size += buf.len() as u64;
            batch.push(buf);
        }
        if batch.is_empty() {
            break;
        }
        let last = batch.last().is_some_and(|b| b.len() < cs);
        for (data, (compressed, hash)) in batch.iter().zip(compress_parallel(&batch, spec)?) {
            w.write_all(&compressed)
                .ctx(|| "writing chunk data".into())?;
            chunks.push(Chunk {
                offset,
                clen: compressed.len() as u32,
                len: data.len() as u32,
                hash,
            });
            offset += compressed.len() as u64;
        }
        if last {
            break;
        }
    }
    Ok((
        Payload {
            name: input.name.clone(),
            kind: input.kind,
            target: input.target.clone(),
            size,
            blake3: whole.finalize().into(),
            chunk_size: Some(spec.chunk_size),
            chunks,
            deltas: Vec::new(),
            images: Vec::new(),
        },
        offset - start,
    ))
}

/// A delta of `payload` (already chunked) against `d.base`, its frames placed from `offset`
/// on. `None` when it would not save enough to be worth carrying (said on stderr).
fn build_delta(
    input: &PayloadInput,
    d: &DeltaInput,
    payload: &Payload,
    spec: &BundleSpec,
    offset: u64,
) -> Result<Option<(Delta, Vec<u8>)>> {
    let new = std::fs::read(&input.path).ctx(|| format!("reading {}", input.path.display()))?;
    let base = std::fs::read(&d.base).ctx(|| format!("reading {}", d.base.display()))?;
    let encoded = delta::encode(
        &new,
        &base,
        spec.chunk_size,
        &spec.delta_params,
        spec.zstd_level,
        spec.threads,
    )?;
    let full = payload.compressed_len();
    let bytes: u64 = encoded.frames.iter().map(|f| f.1.len() as u64).sum();
    if bytes as f64 > 0.9 * full as f64 {
        eprintln!(
            "edge-ota-image: no delta from {}: it would be {bytes} bytes against {full} for the full payload",
            d.base.display()
        );
        return Ok(None);
    }
    let mut at = offset;
    let mut data = Vec::with_capacity(bytes as usize);
    let mut frames = Vec::with_capacity(encoded.frames.len());
    for (mut f, z) in encoded.frames {
        f.offset = at;
        at += z.len() as u64;
        data.extend_from_slice(&z);
        frames.push(f);
    }
    Ok(Some((
        Delta {
            base: ImageId {
                size: base.len() as u64,
                blake3: Digest::of(&base),
            },
            base_version: d.base_version.clone(),
            block: spec.delta_params.block,
            runs: encoded.runs,
            frames,
        },
        data,
    )))
}

/// Version 1: cut one input into content-defined chunks, compress them in parallel batches,
/// append to `w`.
fn chunk_payload_v1(
    input: &PayloadInput,
    spec: &BundleSpec,
    start: u64,
    w: &mut impl Write,
) -> Result<(Payload, u64)> {
    let file = File::open(&input.path).ctx(|| format!("opening {}", input.path.display()))?;
    let mut cdc = fastcdc::v2020::StreamCDC::new(
        std::io::BufReader::with_capacity(1 << 20, file),
        spec.chunking.min,
        spec.chunking.avg,
        spec.chunking.max,
    );
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut offset = start;
    let mut size = 0u64;
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    loop {
        let next = cdc.next();
        let done = next.is_none();
        if let Some(c) = next {
            let c = c.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => {
                    Error::io(format!("reading {}", input.path.display()), e)
                }
                other => Error::Malformed(format!("chunking {}: {other}", input.path.display())),
            })?;
            whole.update(&c.data);
            size += c.data.len() as u64;
            batch.push(c.data);
        }
        if batch.len() == BATCH || (done && !batch.is_empty()) {
            for (data, (compressed, hash)) in batch.iter().zip(compress_parallel(&batch, spec)?) {
                w.write_all(&compressed)
                    .ctx(|| "writing chunk data".into())?;
                chunks.push(Chunk {
                    offset,
                    clen: compressed.len() as u32,
                    len: data.len() as u32,
                    hash,
                });
                offset += compressed.len() as u64;
            }
            batch.clear();
        }
        if done {
            break;
        }
    }
    Ok((
        Payload {
            name: input.name.clone(),
            kind: input.kind,
            target: input.target.clone(),
            size,
            blake3: whole.finalize().into(),
            chunk_size: None,
            chunks,
            deltas: Vec::new(),
            images: Vec::new(),
        },
        offset - start,
    ))
}

/// Compress and hash chunks on `spec.threads` threads, results in input order. Version 2
/// stores an all-zero chunk as nothing (empty result).
fn compress_parallel(batch: &[Vec<u8>], spec: &BundleSpec) -> Result<Vec<(Vec<u8>, Digest)>> {
    let threads = spec.threads.max(1).min(batch.len().max(1));
    let per = batch.len().div_ceil(threads);
    let elide_zeros = spec.format != FORMAT_V1;
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(per.max(1))
            .map(|part| {
                s.spawn(move || -> Result<Vec<(Vec<u8>, Digest)>> {
                    let mut c = zstd::bulk::Compressor::new(spec.zstd_level)
                        .map_err(|e| Error::io("creating zstd compressor", e))?;
                    part.iter()
                        .map(|d| {
                            if elide_zeros && d.iter().all(|&b| b == 0) {
                                return Ok((Vec::new(), Digest::of(d)));
                            }
                            let z = c
                                .compress(d)
                                .map_err(|e| Error::io("compressing chunk", e))?;
                            Ok((z, Digest::of(d)))
                        })
                        .collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for h in handles {
            out.extend(h.join().expect("compression thread panicked")?);
        }
        Ok(out)
    })
}
