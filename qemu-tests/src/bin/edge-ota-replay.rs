//! Rebuild a disk image from a QEMU `blklogwrites` (dm-log-writes format) log: the disk as it
//! was at any flush point of the log, or a crash state of it (see `qemu_tests::blklog`).
//!
//!     edge-ota-replay LOG --list
//!     edge-ota-replay LOG BASE OUT [--upto K] [--all | --subset SEED | --torn SEED | --mask M | --variant V]
//!
//! BASE is the disk as it was when the log started; OUT is written (sparse). Without `--upto`
//! the whole log is applied. `--upto K`: flush point K (0 = the start of the log, K = right
//! after the K-th flush), with none of the writes logged after it; `--all`: with all of them
//! (the state just before the next flush); `--subset SEED`, `--torn SEED`, `--mask M`: the
//! crash state the power-loss test names in its failure messages.

use std::path::PathBuf;
use std::process::ExitCode;

use qemu_tests::blklog::{self, Log, Variant};

fn usage() -> ExitCode {
    eprintln!(
        "usage: edge-ota-replay LOG --list\n       \
         edge-ota-replay LOG BASE OUT [--upto K] [--all | --subset SEED | --torn SEED | --mask M | --variant V]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pos = Vec::new();
    let mut upto = None;
    let mut variant = Variant::None;
    let mut list = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| -> Result<String, String> {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs {what}"))
        };
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--list" => list = true,
                "--upto" => {
                    upto = Some(
                        value("a flush point")?
                            .parse::<usize>()
                            .map_err(|e| format!("--upto: {e}"))?,
                    )
                }
                "--all" => variant = Variant::All,
                "--subset" => variant = format!("subset:{}", value("a seed")?).parse()?,
                "--torn" => variant = format!("torn:{}", value("a seed")?).parse()?,
                "--mask" => variant = format!("mask:{}", value("a mask")?).parse()?,
                "--variant" => variant = value("a variant")?.parse()?,
                "-h" | "--help" => return Err(String::new()),
                s if s.starts_with('-') => return Err(format!("unknown option {s}")),
                s => pos.push(PathBuf::from(s)),
            }
            Ok(())
        })();
        if let Err(e) = r {
            if !e.is_empty() {
                eprintln!("edge-ota-replay: {e}");
            }
            return usage();
        }
    }
    if pos.is_empty() {
        return usage();
    }
    let log = match Log::open(&pos[0]) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("edge-ota-replay: {}: {e}", pos[0].display());
            return ExitCode::from(1);
        }
    };
    let c = log.counts();
    eprintln!(
        "{}: {} entries ({} writes, {} bytes; {} flushes, {} FUA, {} discards, {} marks), sector size {}, superblock counts {}",
        log.path.display(),
        c.entries,
        c.writes,
        c.bytes_written,
        c.flushes,
        c.fua,
        c.discards,
        c.marks,
        log.sector_size,
        log.superblock_entries
    );
    if list {
        for p in log.flush_points() {
            let bytes: u64 = p
                .pending
                .iter()
                .map(|&i| log.range(i).end - log.range(i).start)
                .sum();
            let ranges: Vec<String> = p
                .pending
                .iter()
                .take(6)
                .map(|&i| {
                    let r = log.range(i);
                    format!("{}+{}", r.start, r.end - r.start)
                })
                .collect();
            println!(
                "point {:>5}: entries [0, {}) on disk; {} pending writes ({bytes} bytes){}{}",
                p.index,
                p.prefix,
                p.pending.len(),
                if ranges.is_empty() { "" } else { ": " },
                ranges.join(" ") + if p.pending.len() > 6 { " ..." } else { "" }
            );
        }
        return ExitCode::SUCCESS;
    }
    if pos.len() != 3 {
        return usage();
    }
    match blklog::rebuild(&log, &pos[1], &pos[2], upto, variant) {
        Ok(pieces) => {
            match upto {
                None => eprintln!("wrote {}: the whole log applied", pos[2].display()),
                Some(k) => eprintln!(
                    "wrote {}: flush point {k}, variant {variant}: {} pending writes applied{}",
                    pos[2].display(),
                    pieces.len(),
                    pieces
                        .iter()
                        .filter_map(|p| p
                            .groups
                            .as_ref()
                            .map(|g| format!(" (entry {} torn: 4 KiB groups {g:?})", p.entry)))
                        .collect::<String>()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-ota-replay: {e}");
            ExitCode::from(1)
        }
    }
}
