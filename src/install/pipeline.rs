//! The streaming pipeline of a bundle's body: a reader thread pulls every payload's compressed
//! chunks from the source in order and then checks the stream ends, worker threads decompress
//! and check each chunk against the signed manifest, and the caller receives verified chunks
//! in order. Nothing unverified ever reaches the sink.
//!
//! The threads are detached and own what they use: when a chunk fails (or the sink does), the
//! caller gets the error at once and returns, even while the reader is blocked on a stalled
//! pipe or link; the workers stop on the cancel signal, and the reader stops as soon as its
//! read returns.

use std::io::Read;
use std::sync::Arc;

use crossbeam_channel::{bounded, select, unbounded, Receiver};

use crate::bundle::decode::decode_chunk;
use crate::bundle::head::{expect_end, read_exact_or_truncated};
use crate::bundle::Manifest;
use crate::error::{Error, Result};

/// A chunk by its position: payload index, chunk index within the payload.
type At = (usize, usize);

enum Done {
    Chunk(usize, Vec<u8>),
    End,
}

/// Stream every payload of `manifest` from `src` (positioned at the first chunk) into
/// `sink(payload index, verified bytes)`, in order, then check the stream ends there.
/// `progress` gets the uncompressed bytes delivered so far.
pub fn stream_bundle<S, P>(
    src: Box<dyn Read + Send>,
    manifest: Arc<Manifest>,
    workers: usize,
    mut sink: S,
    mut progress: P,
) -> Result<()>
where
    S: FnMut(usize, &[u8]) -> Result<()>,
    P: FnMut(u64),
{
    let order: Arc<Vec<At>> = Arc::new(
        manifest
            .payloads
            .iter()
            .enumerate()
            .flat_map(|(p, pl)| (0..pl.chunks.len()).map(move |c| (p, c)))
            .collect(),
    );
    let n = order.len();
    let workers = workers.max(1);
    // Fixed pools of buffers, allocated here once: memory stays flat whatever the bundle
    // size, and worker threads never allocate (glibc would give each its own arena).
    // A worker takes an output buffer *before* it takes a job, so the chunk the consumer
    // waits for always has a buffer and the pools cannot deadlock.
    let pool = 2 * workers + 2;
    let all = || manifest.payloads.iter().flat_map(|p| &p.chunks);
    let max_clen = all().map(|c| c.clen).max().unwrap_or(0) as usize;
    let max_len = all().map(|c| c.len).max().unwrap_or(0) as usize;
    let (free_in_tx, free_in_rx) = bounded::<Vec<u8>>(pool);
    let (free_out_tx, free_out_rx) = bounded::<Vec<u8>>(pool);
    for _ in 0..pool {
        free_in_tx
            .send(Vec::with_capacity(max_clen))
            .expect("fresh pool");
        free_out_tx
            .send(Vec::with_capacity(max_len))
            .expect("fresh pool");
    }
    let (job_tx, job_rx) = unbounded::<(usize, Vec<u8>)>();
    let (done_tx, done_rx) = unbounded::<Result<Done>>();
    // Dropped when this function returns: workers see it disconnect and stop.
    let (_cancel_tx, cancel_rx) = bounded::<()>(0);

    {
        let done_tx = done_tx.clone();
        let manifest = manifest.clone();
        let order = order.clone();
        let mut src = src;
        std::thread::Builder::new()
            .name("bundle-reader".into())
            .spawn(move || {
                for (i, &(p, c)) in order.iter().enumerate() {
                    let Ok(mut buf) = free_in_rx.recv() else {
                        return;
                    };
                    let payload = &manifest.payloads[p];
                    buf.resize(payload.chunks[c].clen as usize, 0);
                    if let Err(e) = read_exact_or_truncated(&mut src, &mut buf, || {
                        format!("payload {:?} chunk {c}", payload.name)
                    }) {
                        let _ = done_tx.send(Err(e.into()));
                        return;
                    }
                    if job_tx.send((i, buf)).is_err() {
                        return;
                    }
                }
                let _ = done_tx.send(expect_end(&mut src).map(|()| Done::End).map_err(Into::into));
            })
            .map_err(|e| Error::io("starting the bundle reader", e))?;
    }
    for w in 0..workers {
        let job_rx = job_rx.clone();
        let done_tx = done_tx.clone();
        let free_in_tx = free_in_tx.clone();
        let free_out_rx = free_out_rx.clone();
        let cancel_rx = cancel_rx.clone();
        let manifest = manifest.clone();
        let order = order.clone();
        std::thread::Builder::new()
            .name(format!("chunk-worker-{w}"))
            .spawn(move || {
                let mut dec = match zstd::bulk::Decompressor::new() {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = done_tx.send(Err(Error::io("creating zstd decompressor", e)));
                        return;
                    }
                };
                loop {
                    let Some(mut out) = recv_or_cancel(&free_out_rx, &cancel_rx) else {
                        return;
                    };
                    let Some((i, compressed)) = recv_or_cancel(&job_rx, &cancel_rx) else {
                        return;
                    };
                    let (p, c) = order[i];
                    let payload = &manifest.payloads[p];
                    let r = decode_chunk(&mut dec, &payload.chunks[c], &compressed, &mut out)
                        .map(|()| Done::Chunk(i, out))
                        .map_err(|what| Error::Tampered {
                            payload: payload.name.clone(),
                            what: format!("chunk {c} {what}"),
                        });
                    let _ = free_in_tx.send(compressed);
                    if done_tx.send(r).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("starting a chunk worker", e))?;
    }
    drop((job_rx, done_tx, free_in_tx, free_out_rx));

    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0usize;
    let mut delivered = 0u64;
    let mut ended = false;
    while next < n || !ended {
        match done_rx.recv() {
            Ok(Ok(Done::Chunk(i, data))) => {
                pending.insert(i, data);
            }
            Ok(Ok(Done::End)) => ended = true,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::io(
                    "streaming the bundle",
                    std::io::Error::other("pipeline stopped early"),
                ))
            }
        }
        while let Some(data) = pending.remove(&next) {
            sink(order[next].0, &data)?;
            delivered += data.len() as u64;
            progress(delivered);
            let _ = free_out_tx.send(data);
            next += 1;
        }
    }
    Ok(())
}

/// The next item, or `None` once the channel closed or the stream was cancelled.
fn recv_or_cancel<T>(rx: &Receiver<T>, cancel: &Receiver<()>) -> Option<T> {
    select! {
        recv(rx) -> v => v.ok(),
        recv(cancel) -> _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A reader that serves `data`, then blocks for a long time (a stalled pipe or link).
    struct Stalls {
        data: std::io::Cursor<Vec<u8>>,
    }

    impl Read for Stalls {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.data.read(buf)?;
            if n == 0 {
                std::thread::sleep(Duration::from_secs(3600));
            }
            Ok(n)
        }
    }

    #[test]
    fn tampered_chunk_is_reported_while_the_source_stalls() {
        let good = vec![5u8; 10_000];
        let z = zstd::bulk::compress(&good, 3).unwrap();
        let chunk = |offset: u64, hash| crate::bundle::Chunk {
            offset,
            clen: z.len() as u32,
            len: good.len() as u32,
            hash,
        };
        let manifest = Manifest {
            format: crate::bundle::FORMAT_VERSION,
            compatible: "t".into(),
            version: "1.0.0".parse().unwrap(),
            security_version: 0,
            created: 0,
            expires: None,
            payload_len: 3 * z.len() as u64,
            payloads: vec![crate::bundle::Payload {
                name: "rootfs".into(),
                kind: crate::bundle::PayloadKind::Image,
                target: "rootfs".into(),
                size: 3 * good.len() as u64,
                blake3: crate::bundle::Digest([0; 32]),
                chunks: vec![
                    // The first chunk's hash is wrong; the stream stalls before the third.
                    chunk(0, crate::bundle::Digest::of(b"not it")),
                    chunk(z.len() as u64, crate::bundle::Digest::of(&good)),
                    chunk(2 * z.len() as u64, crate::bundle::Digest::of(&good)),
                ],
            }],
        };
        let mut body = z.clone();
        body.extend_from_slice(&z);
        let t = Instant::now();
        let e = stream_bundle(
            Box::new(Stalls {
                data: std::io::Cursor::new(body),
            }),
            Arc::new(manifest),
            2,
            |_, _| Ok(()),
            |_| {},
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 16, "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "waited {:?} for a stalled reader",
            t.elapsed()
        );
    }
}
