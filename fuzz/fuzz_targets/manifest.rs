//! The signed manifest: `serde_json::from_slice::<Manifest>` then `Manifest::validate` against a
//! header, the structural checks every manifest goes through before anything in it is used
//! (format 1 and 2: chunk grids, zero chunks, delta recipes, literal frames and prefixes).
//!
//! Input: one mode byte, then
//! - bit 0 clear: JSON bytes, parsed as they are. Bit 1 clear: the header's version and
//!   payload length are the manifest's own (so `validate` gets past those checks); set: they
//!   are the 12 bytes (u32 version, u64 payload length, little endian) before the JSON.
//! - bit 0 set: a manifest built from the bytes with `arbitrary`: lengths, offsets, grids,
//!   runs and prefixes mostly consistent (so the later checks are reached) and otherwise drawn
//!   near the limits; serialized to JSON, parsed back (it must round-trip), validated.
//!
//! Every manifest that parses must survive a serialize/parse round trip unchanged (the writer
//! serializes, the device parses), and every manifest `validate` accepts must keep the
//! promises the installer relies on (limits, and prefix memory, summed without overflow).
#![no_main]

use std::path::Path;

use arbitrary::{Result, Unstructured};
use edge_ota_format::manifest::{
    limits, Chunk, Delta, DeltaFrame, Digest, Header, ImageId, Manifest, Payload, PayloadKind, Run,
    FORMAT_V1, FORMAT_VERSION,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let (fixed, json) = if mode & 2 == 0 {
            (None, rest)
        } else {
            let Some((h, json)) = rest.split_first_chunk::<12>() else {
                return;
            };
            let version = u32::from_le_bytes(h[..4].try_into().unwrap());
            let payload_len = u64::from_le_bytes(h[4..].try_into().unwrap());
            (Some((version, payload_len)), json)
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(json) else {
            return;
        };
        check(&m, json.len() as u64, fixed);
    } else {
        let mut u = Unstructured::new(rest);
        let Ok((m, fixed)) = build(&mut u) else {
            return;
        };
        check(&m, 1, fixed);
    }
});

fn check(m: &Manifest, manifest_len: u64, fixed: Option<(u32, u64)>) {
    let json = serde_json::to_vec(m).expect("a manifest serializes");
    let back: Manifest = serde_json::from_slice(&json).expect("a serialized manifest parses");
    assert_eq!(&back, m, "serialize/parse round trip");

    let (version, payload_len) = fixed.unwrap_or((m.format, m.payload_len));
    // A header as the device has it: through `Header::decode` (which checks the version).
    let header = Header {
        version,
        manifest_len: manifest_len.clamp(1, limits::MAX_MANIFEST),
        signatures_len: 0,
        payload_len,
    };
    let Ok(header) = Header::decode(&header.encode()) else {
        return;
    };
    if m.validate(&header).is_err() {
        return;
    }
    // What validate promises to the installer.
    assert!(m.format == FORMAT_V1 || m.format == FORMAT_VERSION);
    assert_eq!(m.format, header.version);
    assert_eq!(m.payload_len, header.payload_len);
    assert!(!m.payloads.is_empty() && m.payloads.len() <= limits::MAX_PAYLOADS);
    let mut chunks = 0usize;
    for (i, p) in m.payloads.iter().enumerate() {
        assert!(m.payloads[..i].iter().all(|o| o.name != p.name));
        assert!(p.size <= limits::MAX_PAYLOAD_SIZE);
        assert!(p.kind != PayloadKind::Image || p.size > 0);
        if p.kind != PayloadKind::Image {
            assert!(!p.target.starts_with('/') && !p.target.split('/').any(|c| c == ".."));
            // No two file-like payloads of a kind write the same path, nor one inside the
            // other, however the paths are spelled (compared component by component).
            for o in m.payloads[..i].iter().filter(|o| o.kind == p.kind) {
                let (a, b) = (Path::new(&p.target), Path::new(&o.target));
                assert!(
                    !a.starts_with(b) && !b.starts_with(a),
                    "payloads {:?} and {:?} both write {} target {:?} / {:?}",
                    o.name,
                    p.name,
                    p.kind.as_str(),
                    o.target,
                    p.target
                );
            }
        }
        let mut size = 0u64;
        for c in &p.chunks {
            assert!(c.len > 0 && c.len <= limits::MAX_CHUNK);
            assert!(c.clen <= limits::MAX_CHUNK_COMPRESSED);
            size += u64::from(c.len);
            chunks += 1;
        }
        assert_eq!(size, p.size);
        assert!(p.deltas.len() <= limits::MAX_DELTAS);
        for d in &p.deltas {
            assert!(d.runs.len() <= limits::MAX_RUNS);
            for f in &d.frames {
                // The installer reads each prefix into memory: bounded, every range inside
                // the base, the total summed without wrapping.
                assert!(f.len <= limits::MAX_DELTA_FRAME);
                assert!(f.prefix.len() <= limits::MAX_PREFIX_RANGES);
                let total: u128 = f.prefix.iter().map(|r| u128::from(r[1])).sum();
                assert!(
                    total <= u128::from(limits::MAX_PREFIX),
                    "validate accepted a prefix of {total} bytes"
                );
                for r in &f.prefix {
                    assert!(r[0].checked_add(r[1]).is_some_and(|e| e <= d.base.size));
                }
            }
        }
    }
    assert!(chunks <= limits::MAX_CHUNKS);
}

/// A rare choice, false once the input is used up (`ratio` is then always true).
fn chance(u: &mut Unstructured, a: u8, b: u8) -> Result<bool> {
    Ok(!u.is_empty() && u.ratio(a, b)?)
}

/// Names and targets: mostly valid ones that exercise the overlap checks, sometimes ones the
/// name and path checks refuse.
fn name(u: &mut Unstructured) -> Result<String> {
    const VALID: &[&str] = &[
        "rootfs",
        "boot",
        "boot/vmlinuz",
        "etc",
        "etc/x",
        "etc/x/y",
        "etc/xy",
        "é",
    ];
    const ODD: &[&str] = &[
        "../x", "/abs", "etc//x", "etc/./x", "etc/x/", "./x", "etc/.", "", "x\u{7}", "a\0b",
    ];
    Ok(match u.int_in_range(0..=15u8)? {
        0 => u.choose(ODD)?.to_string(),
        1 => u.arbitrary()?,
        _ => u.choose(VALID)?.to_string(),
    })
}

/// A u32 length: mostly small, sometimes at and around the limits.
fn length(u: &mut Unstructured, limit: u32) -> Result<u32> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => 0,
        1 => limit,
        2 => limit + 1,
        3 => u.arbitrary()?,
        _ => u.int_in_range(1..=4096)?,
    })
}

/// A u64 near interesting values: small, the limits, the top of the range.
fn big(u: &mut Unstructured, near: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => near,
        1 => near.wrapping_add(1),
        2 => 1 << 63,
        3 => u64::MAX,
        4 => u.arbitrary()?,
        _ => u.int_in_range(0..=near)?,
    })
}

fn build(u: &mut Unstructured) -> Result<(Manifest, Option<(u32, u64)>)> {
    let format = match u.int_in_range(0..=7u8)? {
        0..=2 => FORMAT_V1,
        3..=6 => FORMAT_VERSION,
        _ => u.arbitrary()?,
    };
    let compatible = name(u)?;
    let mut version = semver::Version::new(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
    if u.ratio(1, 4)? {
        if let Ok(pre) = semver::Prerelease::new(&u.arbitrary::<String>()?) {
            version.pre = pre;
        }
    }
    let n = u.int_in_range(0..=4)?;
    let mut offset = 0u64;
    let mut payloads = Vec::new();
    for _ in 0..n {
        payloads.push(payload(u, format, &mut offset)?);
    }
    // At and just over the payload limit: copies of the first, without deltas (cheap JSON).
    if !payloads.is_empty() && chance(u, 1, 32)? {
        let total = limits::MAX_PAYLOADS + usize::from(u.arbitrary::<bool>()?);
        let mut copy = payloads[0].clone();
        copy.deltas.clear();
        for i in payloads.len()..total {
            copy.name = format!("p{i}");
            payloads.push(copy.clone());
        }
    }
    let manifest = Manifest {
        format,
        compatible,
        version,
        security_version: u.arbitrary()?,
        created: u.arbitrary()?,
        expires: u.arbitrary()?,
        payload_len: if u.ratio(7, 8)? {
            offset
        } else {
            u.arbitrary()?
        },
        payloads,
    };
    let fixed = if u.ratio(7, 8)? {
        None
    } else {
        Some((u.arbitrary()?, u.arbitrary()?))
    };
    Ok((manifest, fixed))
}

fn next(u: &mut Unstructured, offset: &mut u64, clen: u32) -> Result<u64> {
    let o = if u.ratio(15, 16)? {
        *offset
    } else {
        u.arbitrary()?
    };
    *offset = offset.wrapping_add(u64::from(clen));
    Ok(o)
}

fn payload(u: &mut Unstructured, format: u32, offset: &mut u64) -> Result<Payload> {
    let kind = *u.choose(&[
        PayloadKind::Image,
        PayloadKind::Kernel,
        PayloadKind::ContainerImages,
        PayloadKind::File,
    ])?;
    let chunk_size = if (format == FORMAT_VERSION && u.ratio(7, 8)?) || u.ratio(1, 16)? {
        Some(match u.int_in_range(0..=5u8)? {
            0 | 1 => 4096,
            2 => 8192,
            3 => 65536,
            4 => limits::MAX_CHUNK,
            _ => u.arbitrary()?,
        })
    } else {
        None
    };
    let mut chunks = Vec::new();
    let mut size = 0u64;
    match chunk_size {
        // On the grid: every chunk full but the last; some all-zero (no bytes).
        Some(cs) if cs > 0 && u.ratio(3, 4)? => {
            let n = u.int_in_range(0..=6u32)?;
            for i in 0..n {
                // The last chunk: full, or a multiple of 512 (images are whole blocks), or
                // any length.
                let len = if i + 1 < n {
                    cs
                } else {
                    match u.int_in_range(0..=3u8)? {
                        0 | 1 => cs,
                        2 => u.int_in_range(1..=(cs / 512).max(1))? * 512,
                        _ => u.int_in_range(1..=cs)?,
                    }
                    .min(cs)
                };
                let clen = if u.ratio(1, 4)? {
                    0
                } else {
                    length(u, limits::MAX_CHUNK_COMPRESSED)?
                };
                chunks.push(Chunk {
                    offset: next(u, offset, clen)?,
                    clen,
                    len,
                    hash: Digest(u.arbitrary()?),
                });
                size += u64::from(len);
            }
        }
        _ => {
            for _ in 0..u.int_in_range(0..=6)? {
                let clen = length(u, limits::MAX_CHUNK_COMPRESSED)?;
                let len = length(u, limits::MAX_CHUNK)?;
                chunks.push(Chunk {
                    offset: next(u, offset, clen)?,
                    clen,
                    len,
                    hash: Digest(u.arbitrary()?),
                });
                size = size.wrapping_add(u64::from(len));
            }
        }
    }
    let size = if u.ratio(7, 8)? { size } else { u.arbitrary()? };
    let mut p = Payload {
        name: name(u)?,
        kind,
        target: name(u)?,
        size,
        blake3: Digest(u.arbitrary()?),
        chunk_size,
        chunks,
        deltas: Vec::new(),
        images: Vec::new(),
    };
    if !u.is_empty() && u.ratio(1, 3)? {
        for _ in 0..u.int_in_range(1..=2)? {
            let d = delta(u, &p, offset)?;
            p.deltas.push(d);
        }
        // Just over the delta limit.
        if chance(u, 1, 16)? {
            while p.deltas.len() <= limits::MAX_DELTAS {
                p.deltas.push(p.deltas[0].clone());
            }
        }
    }
    Ok(p)
}

fn delta(u: &mut Unstructured, p: &Payload, offset: &mut u64) -> Result<Delta> {
    let cs = p.chunk_size.unwrap_or(0);
    let block = match u.int_in_range(0..=4u8)? {
        0 => 512,
        1 | 2 => 4096,
        3 => cs,
        _ => u.arbitrary()?,
    };
    // Sometimes a huge base with huge prefix ranges inside it: their sum reaches the limit,
    // or overflows u64.
    let huge = chance(u, 1, 8)?;
    let base = ImageId {
        size: match u.int_in_range(0..=7u8)? {
            _ if huge => u64::MAX,
            0..=3 => p.size,
            4 => p.size.saturating_mul(2),
            5 => u64::MAX,
            _ => big(u, p.size)?,
        },
        blake3: Digest(u.arbitrary()?),
    };
    let consistent = block >= 512
        && cs > 0
        && cs.is_multiple_of(block)
        && p.size.is_multiple_of(u64::from(block));
    let blocks = if block > 0 {
        p.size / u64::from(block)
    } else {
        0
    };
    let base_blocks = if block > 0 {
        base.size / u64::from(block)
    } else {
        0
    };

    // Runs: covering exactly the payload's blocks, or anything.
    let mut runs = Vec::new();
    if consistent && u.ratio(3, 4)? {
        let mut at = 0u64;
        while at < blocks && runs.len() < 8 {
            let left = (blocks - at).min(u64::from(u32::MAX));
            let n = if runs.len() == 7 || u.ratio(1, 3)? {
                left
            } else {
                u.int_in_range(1..=left)?
            };
            let count = n as u32;
            runs.push(match u.int_in_range(0..=2u8)? {
                0 => Run::Copy {
                    count,
                    from: if base_blocks >= n && u.ratio(7, 8)? {
                        u.int_in_range(0..=base_blocks - n)?
                    } else {
                        big(u, base_blocks)?
                    },
                },
                1 => Run::Zero { count },
                _ => Run::Literal { count },
            });
            at += n;
        }
    } else {
        for _ in 0..u.int_in_range(0..=4)? {
            let count = u.arbitrary()?;
            runs.push(match u.int_in_range(0..=2u8)? {
                0 => Run::Copy {
                    count,
                    from: u.arbitrary()?,
                },
                1 => Run::Zero { count },
                _ => Run::Literal { count },
            });
        }
    }

    // Literal blocks per chunk, as the recipe lays them out.
    let mut literal = vec![0u64; p.chunks.len()];
    if consistent {
        let per_chunk = u64::from(cs / block);
        let mut at = 0u64;
        for r in &runs {
            let n = u64::from(r.count());
            if let Run::Literal { .. } = r {
                let mut b = at;
                while b < at + n && ((b / per_chunk) as usize) < literal.len() {
                    let c = b / per_chunk;
                    let end = ((c + 1) * per_chunk).min(at + n);
                    literal[c as usize] += end - b;
                    b = end;
                }
            }
            at = at.saturating_add(n);
        }
    }

    // Frames: over consecutive chunks holding literal blocks, or anything.
    let mut frames = Vec::new();
    let with_literal: Vec<usize> = (0..literal.len()).filter(|&i| literal[i] > 0).collect();
    if consistent && !with_literal.is_empty() && u.ratio(3, 4)? {
        let mut i = 0;
        while i < with_literal.len() {
            let first = with_literal[i];
            let take = u.int_in_range(1..=with_literal.len() - i)?;
            let end = with_literal[i + take - 1] + 1;
            let lit: u64 = literal[first..end].iter().sum();
            let len = (lit * u64::from(block)).min(u64::from(u32::MAX)) as u32;
            frames.push(frame(
                u,
                [first as u32, end as u32],
                len,
                &base,
                huge,
                offset,
            )?);
            i += take;
        }
    } else {
        for _ in 0..u.int_in_range(0..=2)? {
            let chunks = [u.int_in_range(0..=4)?, u.int_in_range(0..=5)?];
            let len = length(u, limits::MAX_DELTA_FRAME)?;
            frames.push(frame(u, chunks, len, &base, huge, offset)?);
        }
    }
    Ok(Delta {
        base,
        base_version: u.arbitrary()?,
        block,
        runs,
        frames,
    })
}

fn frame(
    u: &mut Unstructured,
    chunks: [u32; 2],
    len: u32,
    base: &ImageId,
    huge: bool,
    offset: &mut u64,
) -> Result<DeltaFrame> {
    let clen = length(u, limits::MAX_DELTA_FRAME + (64 << 10))?;
    let mut prefix = Vec::new();
    // Ranges inside the base mostly; sometimes past its end, or huge.
    let ranges = if huge {
        u.int_in_range(2..=4)?
    } else {
        u.int_in_range(0..=4)?
    };
    for _ in 0..ranges {
        let len = if huge {
            *u.choose(&[1 << 63, u64::MAX / 3, limits::MAX_PREFIX / 2])?
        } else if base.size > 0 && u.ratio(3, 4)? {
            u.int_in_range(1..=base.size.min(limits::MAX_PREFIX))?
        } else {
            big(u, base.size)?
        };
        let off = if base.size >= len && u.ratio(7, 8)? {
            u.int_in_range(0..=base.size - len)?
        } else {
            big(u, base.size)?
        };
        prefix.push([off, len]);
    }
    Ok(DeltaFrame {
        offset: next(u, offset, clen)?,
        clen,
        len,
        chunks,
        prefix,
    })
}
