//! Delta encoding (build side): rebuild a new image from an earlier one a device already holds.
//!
//! Every block of the new image is a copy of some block of the base (found by content,
//! anywhere: filesystems rebuilt from a tree move data around), zeros, or new. New blocks go
//! into a literal stream, cut into frames that each cover whole chunks of the payload, and each
//! frame is compressed with a zstd *prefix* made of the base ranges the new data most likely
//! resembles: where the copies around it come from (a package's new files sit where its old
//! ones sat, shifted as the copies are) and the same offset (filesystem metadata changes in
//! place). That is what `zstd --patch-from` finds with the whole base in memory; here a frame
//! needs only its own prefix, a few MiB, so a small device can decode it.

use std::collections::HashMap;

use zstd::zstd_safe::{CCtx, CParameter};

use crate::error::{Error, Result};
use crate::manifest::{DeltaFrame, Run};

/// Tuning of the delta encoder.
#[derive(Debug, Clone)]
pub struct DeltaParams {
    /// Block size of the recipe.
    pub block: u32,
    /// Literal bytes per frame (frames end on chunk boundaries, so they may hold more).
    pub frame_bytes: usize,
    /// Most prefix bytes per frame (device memory while decoding it).
    pub prefix_max: usize,
    /// Base bytes taken around where a run of new blocks most likely came from.
    pub radius: usize,
    /// Blocks around a new run whose copies tell where it came from.
    pub around: usize,
}

impl Default for DeltaParams {
    fn default() -> Self {
        DeltaParams {
            block: 4096,
            frame_bytes: 2 << 20,
            prefix_max: 8 << 20,
            radius: 512 << 10,
            around: 256,
        }
    }
}

/// A delta: its recipe and its frames (offsets not set yet) with their compressed bytes.
pub struct Encoded {
    pub runs: Vec<Run>,
    pub frames: Vec<(DeltaFrame, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    Copy(u64),
    Literal,
}

type Key = [u8; 16];

fn key(b: &[u8]) -> Key {
    blake3::hash(b).as_bytes()[..16]
        .try_into()
        .expect("16 bytes")
}

/// Encode `new` against `base`.
pub fn encode(
    new: &[u8],
    base: &[u8],
    chunk_size: u32,
    p: &DeltaParams,
    level: i32,
    threads: usize,
) -> Result<Encoded> {
    let bs = p.block as usize;
    if bs == 0 || !new.len().is_multiple_of(bs) || !(chunk_size as usize).is_multiple_of(bs) {
        return Err(Error::Malformed(format!(
            "delta: the image ({} bytes) and chunk size ({chunk_size}) must be multiples of the block ({bs})",
            new.len()
        )));
    }
    fn block_of(data: &[u8], bs: usize, i: u64) -> &[u8] {
        &data[i as usize * bs..(i as usize + 1) * bs]
    }
    let block = |data, i| block_of(data, bs, i);
    let base_blocks = (base.len() / bs) as u64;
    let mut index: HashMap<Key, u64> = HashMap::new();
    for i in 0..base_blocks {
        let b = block(base, i);
        if b.iter().any(|&x| x != 0) {
            index.entry(key(b)).or_insert(i);
        }
    }
    // Classify: a copy continues the previous one when the next base block matches too,
    // which keeps runs long and the recipe small.
    let nb = (new.len() / bs) as u64;
    let mut kinds = Vec::with_capacity(nb as usize);
    let mut prev: Option<u64> = None;
    for i in 0..nb {
        let b = block(new, i);
        let kind = if b.iter().all(|&x| x == 0) {
            Kind::Zero
        } else if let Some(next) = prev
            .map(|j| j + 1)
            .filter(|&j| j < base_blocks && block(base, j) == b)
        {
            Kind::Copy(next)
        } else {
            match index.get(&key(b)) {
                Some(&j) if block(base, j) == b => Kind::Copy(j),
                _ => Kind::Literal,
            }
        };
        prev = match kind {
            Kind::Copy(j) => Some(j),
            _ => None,
        };
        kinds.push(kind);
    }
    let runs = to_runs(&kinds);

    // Frames: whole chunks, until frame_bytes of literal blocks are collected.
    let per_chunk = (chunk_size as usize / bs) as u64;
    let chunks = nb.div_ceil(per_chunk);
    let mut plans: Vec<(u32, u32, Vec<u64>)> = Vec::new();
    // The frame being filled: first and last chunk with literals, and the literal blocks.
    let mut cur: Option<(u64, u64, Vec<u64>)> = None;
    for c in 0..chunks {
        let lo = c * per_chunk;
        let hi = ((c + 1) * per_chunk).min(nb);
        let here: Vec<u64> = (lo..hi)
            .filter(|&i| kinds[i as usize] == Kind::Literal)
            .collect();
        if here.is_empty() {
            continue;
        }
        let f = cur.get_or_insert((c, c, Vec::new()));
        f.1 = c;
        f.2.extend(here);
        if f.2.len() * bs >= p.frame_bytes {
            let (a, b, lits) = cur.take().expect("just set");
            plans.push((a as u32, (b + 1) as u32, lits));
        }
    }
    if let Some((a, b, lits)) = cur {
        plans.push((a as u32, (b + 1) as u32, lits));
    }

    let compressed: Vec<Result<(DeltaFrame, Vec<u8>)>> =
        parallel_map(&plans, threads, |(a, b, lits)| {
            let prefix = choose_prefix(lits, &kinds, base.len() as u64, p);
            let mut data = Vec::with_capacity(lits.len() * bs);
            for &i in lits {
                data.extend_from_slice(block(new, i));
            }
            let mut pre = Vec::with_capacity(prefix.iter().map(|r| r[1] as usize).sum());
            for &[off, len] in &prefix {
                pre.extend_from_slice(&base[off as usize..(off + len) as usize]);
            }
            let z = compress_with_prefix(&data, &pre, level)?;
            Ok((
                DeltaFrame {
                    offset: 0,
                    clen: z.len() as u32,
                    len: data.len() as u32,
                    chunks: [*a, *b],
                    prefix,
                },
                z,
            ))
        });
    let frames = compressed.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(Encoded { runs, frames })
}

fn to_runs(kinds: &[Kind]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &k in kinds {
        match (runs.last_mut(), k) {
            (Some(Run::Zero { count }), Kind::Zero)
            | (Some(Run::Literal { count }), Kind::Literal) => *count += 1,
            (Some(Run::Copy { count, from }), Kind::Copy(j)) if *from + u64::from(*count) == j => {
                *count += 1
            }
            _ => runs.push(match k {
                Kind::Zero => Run::Zero { count: 1 },
                Kind::Literal => Run::Literal { count: 1 },
                Kind::Copy(j) => Run::Copy { count: 1, from: j },
            }),
        }
    }
    runs
}

/// Base ranges for a frame's prefix: for each run of new blocks, the base around where the
/// copies near it come from (median displacement), and the base at the same offset; merged,
/// in base order, shrunk until they fit `prefix_max`.
fn choose_prefix(lits: &[u64], kinds: &[Kind], base_len: u64, p: &DeltaParams) -> Vec<[u64; 2]> {
    let bs = u64::from(p.block);
    let nb = kinds.len() as u64;
    let displacement = |i: u64| -> i64 {
        let lo = i.saturating_sub(p.around as u64);
        let hi = (i + p.around as u64).min(nb);
        let mut d: Vec<i64> = (lo..hi)
            .filter_map(|k| match kinds[k as usize] {
                Kind::Copy(j) => Some(j as i64 - k as i64),
                _ => None,
            })
            .collect();
        if d.is_empty() {
            return 0;
        }
        d.sort_unstable();
        d[d.len() / 2]
    };
    // Runs of consecutive new blocks.
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &i in lits {
        match spans.last_mut() {
            Some((_, end)) if *end == i => *end = i + 1,
            _ => spans.push((i, i + 1)),
        }
    }
    let mut radius = p.radius as u64;
    loop {
        let mut wins: Vec<(u64, u64)> = Vec::new();
        for &(s, e) in &spans {
            let mid = (s + e) / 2;
            let center = (mid as i64 + displacement(mid)) * bs as i64;
            let half = ((e - s) * bs / 2 + radius) as i64;
            let a = (center - half).max(0) as u64;
            let b = ((center + half).max(0) as u64).min(base_len);
            if a < b {
                wins.push((a, b));
            }
            let a = (s * bs).saturating_sub(radius / 8);
            let b = (e * bs + radius / 8).min(base_len);
            if a < b {
                wins.push((a, b));
            }
        }
        wins.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, b) in wins {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let total: u64 = merged.iter().map(|(a, b)| b - a).sum();
        if total <= p.prefix_max as u64 || radius < 4096 {
            let mut left = p.prefix_max as u64;
            return merged
                .into_iter()
                .filter_map(|(a, b)| {
                    let len = (b - a).min(left);
                    left -= len;
                    (len > 0).then_some([a, len])
                })
                .collect();
        }
        radius /= 2;
    }
}

/// zstd at `level`, with `prefix` as a single-use dictionary the decoder must be given too.
fn compress_with_prefix(data: &[u8], prefix: &[u8], level: i32) -> Result<Vec<u8>> {
    let err = |what: &str| {
        Error::io(
            "compressing a delta frame",
            std::io::Error::other(what.to_string()),
        )
    };
    let mut cctx = CCtx::try_create().ok_or_else(|| err("no zstd context"))?;
    // The window must reach back over the whole prefix.
    let need = (prefix.len() + data.len())
        .max(1 << 10)
        .next_power_of_two()
        .trailing_zeros();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .and_then(|_| cctx.set_parameter(CParameter::ContentSizeFlag(true)))
        .and_then(|_| cctx.set_parameter(CParameter::WindowLog(need.clamp(10, 27))))
        .map_err(|_| err("setting parameters"))?;
    if !prefix.is_empty() {
        cctx.ref_prefix(prefix)
            .map_err(|_| err("setting the prefix"))?;
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data)
        .map_err(|c| err(zstd::zstd_safe::get_error_name(c)))?;
    Ok(out)
}

fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.max(1).min(items.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut out);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                results.lock().expect("results lock")[i] = Some(r);
            });
        }
    });
    out.into_iter()
        .map(|r| r.expect("every item mapped"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(seed: u64, blocks: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut v = Vec::with_capacity(blocks * 4096);
        while v.len() < blocks * 4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    #[test]
    fn moved_blocks_are_copies_and_new_ones_literals() {
        let base = image(1, 64);
        let mut new = vec![0u8; 4096 * 4];
        new.extend_from_slice(&base[4096 * 10..4096 * 40]);
        new.extend_from_slice(&image(2, 2));
        new.extend_from_slice(&vec![0u8; 4096 * 28]);
        let e = encode(&new, &base, 64 * 1024, &DeltaParams::default(), 3, 2).unwrap();
        assert_eq!(
            e.runs,
            vec![
                Run::Zero { count: 4 },
                Run::Copy {
                    count: 30,
                    from: 10
                },
                Run::Literal { count: 2 },
                Run::Zero { count: 28 },
            ]
        );
        assert_eq!(e.frames.len(), 1);
        assert_eq!(e.frames[0].0.len, 2 * 4096);
        // The literal blocks sit in chunk 2 (16 blocks per 64 KiB chunk).
        assert_eq!(e.frames[0].0.chunks, [2, 3]);
    }
}
