//! Creating bundles (used by `edge-ota-image bundle create`): content-defined chunking,
//! per-chunk zstd on all cores, deterministic manifest and signatures.
//!
//! Chunks are cut with FastCDC (16 KiB min, 64 KiB average, 256 KiB max, as casync's
//! defaults): boundaries follow content, so an insertion in a filesystem image shifts only the
//! chunks around it and a later delta can reuse the rest from the other slot.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use crate::error::{Error, IoContext, Result};
use crate::manifest::{
    limits, Chunk, Digest, Header, Manifest, Payload, PayloadKind, FORMAT_VERSION,
};

/// Chunking parameters (bytes).
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

/// Everything a bundle is made from. Same spec and keys → same bytes.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub compatible: String,
    pub version: semver::Version,
    pub security_version: u64,
    pub created: u64,
    pub expires: Option<u64>,
    pub payloads: Vec<PayloadInput>,
    pub chunking: Chunking,
    pub zstd_level: i32,
    pub threads: usize,
}

/// How many chunks are compressed per parallel batch: bounds memory to about
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
    if spec.chunking.max > limits::MAX_CHUNK
        || spec.chunking.min == 0
        || !(spec.chunking.min <= spec.chunking.avg && spec.chunking.avg <= spec.chunking.max)
    {
        return Err(Error::Malformed(format!(
            "invalid chunk sizes {:?} (max {})",
            spec.chunking,
            limits::MAX_CHUNK
        )));
    }
    let mut data = tempfile::tempfile_in(scratch)
        .ctx(|| format!("creating temp file in {}", scratch.display()))?;
    let mut data_w = BufWriter::with_capacity(1 << 20, &mut data);
    let mut offset = 0u64;
    let mut payloads = Vec::new();
    for input in &spec.payloads {
        let (payload, written) = chunk_payload(input, spec, offset, &mut data_w)?;
        offset += written;
        payloads.push(payload);
    }
    data_w.flush().ctx(|| "writing chunk data".into())?;
    drop(data_w);

    let manifest = Manifest {
        format: FORMAT_VERSION,
        compatible: spec.compatible.clone(),
        version: spec.version.clone(),
        security_version: spec.security_version,
        created: spec.created,
        expires: spec.expires,
        payload_len: offset,
        payloads,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
    let sig_bytes = if keys.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&super::keys::sign(&manifest_bytes, keys)).expect("signatures serialize")
    };
    let header = Header {
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

/// Cut one input into chunks, compress them in parallel batches, append to `w`.
/// `start` is where its chunks begin in the payload area (chunk offsets count from there).
/// Returns the payload entry and the number of compressed bytes written.
fn chunk_payload(
    input: &PayloadInput,
    spec: &BundleSpec,
    start: u64,
    w: &mut impl Write,
) -> Result<(Payload, u64)> {
    let file = File::open(&input.path).ctx(|| format!("opening {}", input.path.display()))?;
    let cdc = fastcdc::v2020::StreamCDC::new(
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
    let mut cdc = cdc;
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
            for (data, (compressed, hash)) in batch.iter().zip(compress_batch(&batch, spec)?) {
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
            chunks,
        },
        offset - start,
    ))
}

/// Compress and hash a batch of chunks on `spec.threads` threads, results in input order.
fn compress_batch(batch: &[Vec<u8>], spec: &BundleSpec) -> Result<Vec<(Vec<u8>, Digest)>> {
    let threads = spec.threads.max(1).min(batch.len().max(1));
    let per = batch.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(per.max(1))
            .map(|part| {
                s.spawn(move || -> Result<Vec<(Vec<u8>, Digest)>> {
                    let mut c = zstd::bulk::Compressor::new(spec.zstd_level)
                        .map_err(|e| Error::io("creating zstd compressor", e))?;
                    part.iter()
                        .map(|d| {
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
