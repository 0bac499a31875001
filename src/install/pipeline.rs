//! The streaming pipeline of one payload: a reader thread pulls compressed chunks from the
//! source, worker threads decompress and check each chunk against the signed manifest, and the
//! caller receives verified chunks in order. Nothing unverified ever reaches the sink.

use std::collections::BTreeMap;
use std::io::Read;

use crossbeam_channel::{bounded, unbounded};

use crate::bundle::reader::{decode_chunk, read_exact_or_truncated};
use crate::bundle::Payload;
use crate::error::{Error, Result};

/// Stream `payload`'s chunks from `src` (positioned at its first chunk) into `sink`, in order,
/// each verified. `progress` gets the uncompressed bytes delivered so far.
pub fn stream_payload<R, S, P>(
    src: &mut R,
    payload: &Payload,
    workers: usize,
    mut sink: S,
    mut progress: P,
) -> Result<()>
where
    R: Read + Send + ?Sized,
    S: FnMut(&[u8]) -> Result<()>,
    P: FnMut(u64),
{
    let n = payload.chunks.len();
    let workers = workers.max(1);
    // Fixed pools of buffers, allocated here once: memory stays flat whatever the payload
    // size, and worker threads never allocate (glibc would give each its own arena).
    // A worker takes an output buffer *before* it takes a job, so the chunk the consumer
    // waits for always has a buffer and the pools cannot deadlock.
    let pool = 2 * workers + 2;
    let max_clen = payload.chunks.iter().map(|c| c.clen).max().unwrap_or(0) as usize;
    let max_len = payload.chunks.iter().map(|c| c.len).max().unwrap_or(0) as usize;
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
    let (done_tx, done_rx) = unbounded::<Result<(usize, Vec<u8>)>>();

    std::thread::scope(|s| {
        {
            let done_tx = done_tx.clone();
            let free_in_rx = free_in_rx.clone();
            s.spawn(move || {
                for (i, c) in payload.chunks.iter().enumerate() {
                    let Ok(mut buf) = free_in_rx.recv() else {
                        return;
                    };
                    buf.resize(c.clen as usize, 0);
                    if let Err(e) = read_exact_or_truncated(src, &mut buf, || {
                        format!("payload {:?} chunk {i}", payload.name)
                    }) {
                        let _ = done_tx.send(Err(e));
                        return;
                    }
                    if job_tx.send((i, buf)).is_err() {
                        return;
                    }
                }
            });
        }
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let free_in_tx = free_in_tx.clone();
            let free_out_rx = free_out_rx.clone();
            s.spawn(move || {
                let mut dec = match zstd::bulk::Decompressor::new() {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = done_tx.send(Err(Error::io("creating zstd decompressor", e)));
                        return;
                    }
                };
                loop {
                    let Ok(mut out) = free_out_rx.recv() else {
                        return;
                    };
                    let Ok((i, compressed)) = job_rx.recv() else {
                        return;
                    };
                    let r = decode_chunk(&mut dec, &payload.chunks[i], &compressed, &mut out)
                        .map(|()| (i, out))
                        .map_err(|what| Error::Tampered {
                            payload: payload.name.clone(),
                            what: format!("chunk {i} {what}"),
                        });
                    let _ = free_in_tx.send(compressed);
                    if done_tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        // Only the threads hold these now, so each stage sees its input close when the stage
        // before it stops, and everyone stops when we return (done_rx and the pools dropped).
        drop((job_rx, done_tx, free_in_tx, free_in_rx, free_out_rx));
        // Moved in here so they are dropped when this closure returns, before the scope
        // joins: on an error the other threads then see closed channels instead of blocking.
        let done_rx = done_rx;
        let free_out_tx = free_out_tx;

        let mut pending: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        let mut next = 0usize;
        let mut delivered = 0u64;
        while next < n {
            let (i, data) = match done_rx.recv() {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::io(
                        "streaming payload",
                        std::io::Error::other("pipeline stopped early"),
                    ))
                }
            };
            pending.insert(i, data);
            while let Some(data) = pending.remove(&next) {
                sink(&data)?;
                delivered += data.len() as u64;
                progress(delivered);
                let _ = free_out_tx.send(data);
                next += 1;
            }
        }
        Ok(())
    })
}
