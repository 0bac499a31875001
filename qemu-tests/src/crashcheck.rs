//! The power-loss checker: every crash state of a recorded update (a [`blklog::Log`]) judged
//! on the host the way the device would see it after the power comes back, and a sample of
//! them booted in QEMU. See docs/power-loss.md.
//!
//! For one crash state (a flush point and a [`Variant`] of its pending writes):
//! 1. GRUB: the boot partition, as the state left it, is given to `grub-emu` as `(hd0)` and the
//!    `grub/grub.cfg` found on it (the real script, as installed) runs; the slot it boots is
//!    the `edgeota.slot=` it passes to `linux`.
//! 2. That slot's partition must start with a complete, verified image: blake3 of its first
//!    bytes equals the known hash of v1's or v2's root filesystem image.
//! 3. The data partition (ext4) gets its journal replayed (`e2fsck -E journal_only`, what the
//!    guest kernel does on mount) and `state.json` is read with `debugfs`: it must parse with
//!    edge-ota's own loader. If it is missing or is the garbage the test wrote on purpose, the
//!    real `edge-ota repair` runs on the host against this disk (booted slot: GRUB's choice)
//!    and must leave a state file that parses. A state file that is empty or half-written is
//!    always a failure.
//!
//! Each partition's content is a pure function of how many logged writes before the flush
//! point touched it and which pending pieces touch it, so verdicts are cached on that key:
//! thousands of states cost a few hundred grub-emu, e2fsck and hash runs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::artifacts::Artifacts;
use crate::blklog::{self, derive_seed, FlushPoint, Log, Piece, Replayer, Variant};
use crate::vm::{Vm, VmConfig};

/// The host tools the checker runs.
pub struct Tools {
    pub grub_emu: PathBuf,
    pub e2fsck: PathBuf,
    pub debugfs: PathBuf,
}

/// GRUB's emu modules (Debian package grub-emu).
const EMU_MODULES: &str = "/usr/lib/grub/x86_64-emu";
/// Where the state file is inside the data partition (mounted on /var in the guest).
const STATE_IN_DATA_FS: &str = "/lib/edge-ota/state.json";
/// What the test writes over state.json on purpose before running `edge-ota repair`.
pub const GARBLED_STATE: &[u8] = b"garbled";

impl Tools {
    /// The tools, or `None` after [`edge_ota::testing::skip`] said what is missing (a failure
    /// under `EDGE_OTA_REQUIRE_ALL`).
    pub fn find(test: &str) -> Option<Tools> {
        let mut missing = Vec::new();
        let mut get = |name: &str, package: &str| {
            let found = edge_ota::testing::find_tool(name);
            if found.is_none() {
                missing.push(format!("{name} (apt-get install {package})"));
            }
            found
        };
        let grub_emu = get("grub-emu", "grub-emu");
        let e2fsck = get("e2fsck", "e2fsprogs");
        let debugfs = get("debugfs", "e2fsprogs");
        if !Path::new(EMU_MODULES).join("normal.mod").is_file() {
            missing.push(format!(
                "GRUB's emu modules in {EMU_MODULES} (apt-get install grub-emu)"
            ));
        }
        match (grub_emu, e2fsck, debugfs) {
            (Some(grub_emu), Some(e2fsck), Some(debugfs)) if missing.is_empty() => Some(Tools {
                grub_emu,
                e2fsck,
                debugfs,
            }),
            _ => {
                edge_ota::testing::skip(test, &format!("missing {}", missing.join(", ")));
                None
            }
        }
    }
}

/// What the guest was doing when a part of the log was written (noted by the test from the
/// log's length at each step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// From power-on: GRUB, slot A booting, the stick mounted.
    BootOfA,
    /// `edge-ota apply` of v2 from the stick: mark B bad, the image, the flip, the reboot.
    Apply,
    /// GRUB after the flip, B's first boot and `health`'s mark-good.
    FirstBootOfB,
    /// The test zeroes grubenv2 and garbles state.json (durably).
    Damage,
    /// `edge-ota repair` puts both back.
    Repair,
    /// A state write stopped after its rename, before the directory fsync; then the cut.
    RenameBeforeDirSync,
}

/// How many log entries there were when `phase` began.
#[derive(Debug, Clone, Copy)]
pub struct PhaseMark {
    pub phase: Phase,
    pub entries: usize,
}

/// Regions of the disk a write can fall in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Area {
    Boot,
    RootA,
    RootB,
    Data,
    /// GPT, BIOS boot partition, gaps.
    Other,
}

const PARTS: [(Area, &str); 4] = [
    (Area::Boot, "boot"),
    (Area::RootA, "rootfs-A"),
    (Area::RootB, "rootfs-B"),
    (Area::Data, "data"),
];

/// One crash state, enough to rebuild it (with `edge-ota-replay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateId {
    pub point: usize,
    pub variant: Variant,
}

/// What one state was judged to be.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub id: StateId,
    pub phase: Phase,
    /// The slot GRUB boots and the version its partition holds.
    pub slot: String,
    pub version: Option<&'static str>,
    pub state_file: StateFile,
    /// The inode of state.json after journal replay: tells an old file from its atomic
    /// replacement even when both hold the same bytes.
    pub state_inode: Option<u64>,
    pub problems: Vec<String>,
}

/// What the state file was in a crash state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateFile {
    /// Parsed as it was.
    Readable,
    /// Missing or the deliberate garbage; `edge-ota repair` made it readable.
    Repaired,
    /// Anything else (a failure).
    Broken,
}

/// The result of checking every state.
pub struct Report {
    pub verdicts: Vec<Verdict>,
    pub flush_points: usize,
    /// States with a strict subset of their point's pending writes or a torn write.
    pub reordered_or_torn: usize,
    pub bad: Vec<String>,
    /// What each flush point's preceding writes touched, and its phase.
    pub points: Vec<PointInfo>,
    pub tool_runs: BTreeMap<&'static str, usize>,
}

#[derive(Debug, Clone)]
pub struct PointInfo {
    pub phase: Phase,
    /// Areas written since the previous flush (what this flush makes durable).
    pub protects: Vec<Area>,
    pub pending: usize,
}

/// A known complete image: a slot whose partition starts with it holds that version.
struct KnownImage {
    version: &'static str,
    len: usize,
    hash: blake3::Hash,
}

pub struct Checker<'a> {
    artifacts: &'a Artifacts,
    tools: &'a Tools,
    log: &'a Log,
    base: &'a Path,
    scratch: PathBuf,
    marks: Vec<PhaseMark>,
    parts: Vec<(Area, Range<u64>)>,
    images: Vec<KnownImage>,
}

/// Which pieces of a state touch `r` (entries whose disk range meets it).
fn pieces_in(log: &Log, pieces: &[Piece], r: &Range<u64>) -> Vec<Piece> {
    pieces
        .iter()
        .filter(|p| overlaps(&log.range(p.entry), r))
        .cloned()
        .collect()
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// A partition's content key: logged writes before the point that touch it, and the pending
/// pieces that do.
type Key = (usize, Vec<Piece>);

impl<'a> Checker<'a> {
    pub fn new(
        artifacts: &'a Artifacts,
        tools: &'a Tools,
        log: &'a Log,
        base: &'a Path,
        scratch: &Path,
        marks: Vec<PhaseMark>,
    ) -> Checker<'a> {
        let _ = std::fs::remove_dir_all(scratch);
        std::fs::create_dir_all(scratch).unwrap();
        let parts = PARTS
            .iter()
            .map(|&(area, label)| {
                let (_, off, len) = edge_ota::slot::find_partition(base, label)
                    .unwrap_or_else(|e| panic!("{}: partition {label}: {e}", base.display()));
                (area, off..off + len)
            })
            .collect();
        let images = [("1.0.0", "rootfs-v1.img"), ("2.0.0", "rootfs-v2.img")]
            .iter()
            .map(|&(version, file)| {
                let bytes = std::fs::read(artifacts.work.join(file)).unwrap();
                KnownImage {
                    version,
                    len: bytes.len(),
                    hash: blake3::hash(&bytes),
                }
            })
            .collect();
        Checker {
            artifacts,
            tools,
            log,
            base,
            scratch: scratch.to_path_buf(),
            marks,
            parts,
            images,
        }
    }

    fn range(&self, area: Area) -> Range<u64> {
        self.parts.iter().find(|p| p.0 == area).unwrap().1.clone()
    }

    fn area_of(&self, r: &Range<u64>) -> Vec<Area> {
        let mut v: Vec<Area> = self
            .parts
            .iter()
            .filter(|(_, p)| overlaps(p, r))
            .map(|p| p.0)
            .collect();
        if v.is_empty() {
            v.push(Area::Other);
        }
        v
    }

    fn phase_of(&self, entry: usize) -> Phase {
        let mut phase = Phase::BootOfA;
        for m in &self.marks {
            if m.entries <= entry {
                phase = m.phase;
            }
        }
        phase
    }

    /// The crash states checked at `point`: none and all of its pending writes, and seeded
    /// random subsets and torn writes (fewer when there are few pending writes).
    pub fn variants(point: &FlushPoint, log: &Log, seed: u64) -> Vec<Variant> {
        let n = point.pending.len();
        let mut v = vec![Variant::None];
        if n == 0 {
            return v;
        }
        v.push(Variant::All);
        // Every mask when there are few pending writes; else seeded random subsets.
        if n <= 3 {
            v.extend((1..(1u64 << n) - 1).map(Variant::Mask));
        } else {
            v.extend((0..SUBSETS).map(|j| Variant::Subset(derive_seed(seed, point.index, j))));
        }
        let torn = (0..TORN).map(|j| Variant::Torn(derive_seed(seed, point.index, 1000 + j)));
        v.extend(torn.filter(|t| point.pieces(log, *t).is_some()));
        v
    }

    /// Check every crash state of every flush point.
    pub fn check_all(&self, seed: u64) -> Report {
        let log = self.log;
        let points = log.flush_points();
        let image = std::fs::read(self.base).unwrap();
        let mut replayer = Replayer::new(log, image);
        // touches[area][i]: logged writes among entries [0, i) that touch the area.
        let areas = [Area::Boot, Area::RootA, Area::RootB, Area::Data];
        let mut touches: HashMap<Area, Vec<usize>> = HashMap::new();
        for area in areas {
            let r = self.range(area);
            let mut v = vec![0usize; log.entries.len() + 1];
            for i in 0..log.entries.len() {
                let hit = log.entries[i].writes() && overlaps(&log.range(i), &r);
                v[i + 1] = v[i] + hit as usize;
            }
            touches.insert(area, v);
        }
        let mut grub_cache: HashMap<Key, Result<String, String>> = HashMap::new();
        let mut slot_cache: HashMap<(Area, Key), Option<&'static str>> = HashMap::new();
        let mut data_cache: HashMap<Key, (DataState, Option<u64>)> = HashMap::new();
        let mut repair_cache: HashMap<(Key, Key, String), Result<(), String>> = HashMap::new();
        let mut report = Report {
            verdicts: Vec::new(),
            flush_points: points.len(),
            reordered_or_torn: 0,
            bad: Vec::new(),
            points: Vec::new(),
            tool_runs: BTreeMap::new(),
        };
        let mut prev_flush = 0usize;
        for point in &points {
            let phase = self.phase_of(point.prefix);
            let seg_end = point.flush_entry.unwrap_or(0);
            let mut protects: Vec<Area> = (prev_flush..seg_end)
                .filter(|&i| log.entries[i].writes())
                .flat_map(|i| self.area_of(&log.range(i)))
                .collect();
            protects.sort();
            protects.dedup();
            prev_flush = seg_end;
            report.points.push(PointInfo {
                phase,
                protects,
                pending: point.pending.len(),
            });
            for variant in Self::variants(point, log, seed) {
                let pieces = replayer.enter(point, variant).unwrap().unwrap();
                let id = StateId {
                    point: point.index,
                    variant,
                };
                if matches!(
                    variant,
                    Variant::Mask(_) | Variant::Subset(_) | Variant::Torn(_)
                ) {
                    report.reordered_or_torn += 1;
                }
                let key = |area: Area| -> Key {
                    (
                        touches[&area][point.prefix],
                        pieces_in(log, &pieces, &self.range(area)),
                    )
                };
                let img = &replayer.image;
                let mut problems = Vec::new();
                let boot_key = key(Area::Boot);
                let grub = grub_cache
                    .entry(boot_key.clone())
                    .or_insert_with(|| {
                        *report.tool_runs.entry("grub-emu").or_default() += 1;
                        self.grub_boot(img)
                    })
                    .clone();
                let (slot, version) = match grub {
                    Ok(slot) => {
                        let area = match slot.as_str() {
                            "A" => Some(Area::RootA),
                            "B" => Some(Area::RootB),
                            _ => None,
                        };
                        let version = area.and_then(|area| {
                            *slot_cache.entry((area, key(area))).or_insert_with(|| {
                                *report.tool_runs.entry("slot hash").or_default() += 1;
                                self.slot_version(img, area)
                            })
                        });
                        if version.is_none() {
                            problems.push(format!(
                                "GRUB boots slot {slot}, whose partition holds no complete \
                                 image (neither v1's nor v2's hash)"
                            ));
                        }
                        (slot, version)
                    }
                    Err(e) => {
                        problems.push(format!("GRUB boots nothing: {e}"));
                        (String::new(), None)
                    }
                };
                let data_key = key(Area::Data);
                let (data, state_inode) = data_cache
                    .entry(data_key.clone())
                    .or_insert_with(|| {
                        *report.tool_runs.entry("e2fsck + debugfs").or_default() += 1;
                        self.read_state_file(img)
                    })
                    .clone();
                let state_file = match data {
                    DataState::Readable => StateFile::Readable,
                    DataState::Missing | DataState::Garbled if !slot.is_empty() => {
                        let r = repair_cache
                            .entry((data_key, boot_key, slot.clone()))
                            .or_insert_with(|| {
                                *report.tool_runs.entry("edge-ota repair").or_default() += 1;
                                self.repair(img, &slot)
                            });
                        match r {
                            Ok(()) => StateFile::Repaired,
                            Err(e) => {
                                problems.push(format!("state.json {data:?}; {e}"));
                                StateFile::Broken
                            }
                        }
                    }
                    other => {
                        problems.push(format!("state.json: {other:?}"));
                        StateFile::Broken
                    }
                };
                if !problems.is_empty() {
                    report.bad.push(format!(
                        "flush point {}, variant {variant} (seed {seed:#x}; {phase:?}): {}\n  \
                         rebuild this disk: {}",
                        point.index,
                        problems.join("; "),
                        replay_command(&log.path, self.base, id)
                    ));
                }
                report.verdicts.push(Verdict {
                    id,
                    phase,
                    slot,
                    version,
                    state_file,
                    state_inode,
                    problems,
                });
            }
        }
        replayer.rollback().unwrap();
        report
    }

    /// The problems of the disk after the whole log with 1 MiB in the middle of slot B's
    /// image inverted (zeros would not do: the image has free, zero blocks): GRUB boots B
    /// (the update confirmed it), whose image is no longer whole. Shows that the checker can
    /// fail.
    pub fn problems_of_final_disk_with_slot_b_cut_short(&self) -> Vec<String> {
        let mut r = Replayer::new(self.log, std::fs::read(self.base).unwrap());
        r.advance_to(self.log.entries.len()).unwrap();
        let mut img = r.image;
        let b = self.range(Area::RootB);
        let mid = b.start as usize + self.images[1].len / 2;
        for byte in &mut img[mid..mid + (1 << 20)] {
            *byte = !*byte;
        }
        let mut problems = Vec::new();
        match self.grub_boot(&img) {
            Ok(slot) if slot == "B" => {
                if self.slot_version(&img, Area::RootB).is_none() {
                    problems
                        .push("GRUB boots slot B, whose partition holds no complete image".into());
                }
            }
            other => problems.push(format!("GRUB boots {other:?}, not B, after the update")),
        }
        problems
    }

    /// Run the real grub.cfg of this disk's boot partition in grub-emu: the slot it boots.
    fn grub_boot(&self, img: &[u8]) -> Result<String, String> {
        let dir = self.scratch.join("grub");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(EMU_MODULES, dir.join("x86_64-emu")).unwrap();
        // The emu platform has no `linux`: a function of that name shows its arguments and
        // ends the run (reboot, exit 0).
        std::fs::write(
            dir.join("grub.cfg"),
            "function linux { echo \"EMU-LINUX\"; for a in \"$@\"; do echo \"EMU-ARG $a\"; done; reboot; }\n\
             set root=hd0\n\
             set prefix=(hd0)/grub\n\
             source (hd0)/grub/grub.cfg\n",
        )
        .unwrap();
        let r = self.range(Area::Boot);
        let boot = dir.join("boot.img");
        std::fs::write(&boot, &img[r.start as usize..r.end as usize]).unwrap();
        std::fs::write(
            dir.join("device.map"),
            format!("(hd0) {}\n", boot.display()),
        )
        .unwrap();
        let out = run_with_timeout(
            Command::new(&self.tools.grub_emu)
                .arg("-d")
                .arg(dir.join("x86_64-emu"))
                .arg("-m")
                .arg(dir.join("device.map")),
            Duration::from_secs(30),
        )?;
        let text = strip_escapes(&out);
        let slot = text
            .lines()
            .filter_map(|l| l.split("EMU-ARG edgeota.slot=").nth(1))
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            .next_back();
        slot.ok_or_else(|| format!("grub-emu passed no edgeota.slot= to linux; output:\n{text}"))
    }

    /// The version whose complete image the slot's partition starts with.
    fn slot_version(&self, img: &[u8], area: Area) -> Option<&'static str> {
        let r = self.range(area);
        let part = &img[r.start as usize..r.end as usize];
        self.images
            .iter()
            .find(|k| part.len() >= k.len && blake3::hash(&part[..k.len]) == k.hash)
            .map(|k| k.version)
    }

    /// The data partition's journal replayed, then state.json read from it, and its inode.
    fn read_state_file(&self, img: &[u8]) -> (DataState, Option<u64>) {
        let state = self.read_state_file_bytes(img);
        // data.img now holds the replayed file system.
        let stat = Command::new(&self.tools.debugfs)
            .arg("-R")
            .arg(format!("stat {STATE_IN_DATA_FS}"))
            .arg(self.scratch.join("data.img"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let inode = String::from_utf8_lossy(&stat.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "Inode:")
            .nth(1)
            .and_then(|n| n.parse().ok());
        (state, inode)
    }

    fn read_state_file_bytes(&self, img: &[u8]) -> DataState {
        let r = self.range(Area::Data);
        let file = self.scratch.join("data.img");
        std::fs::write(&file, &img[r.start as usize..r.end as usize]).unwrap();
        let fsck = Command::new(&self.tools.e2fsck)
            .args(["-E", "journal_only", "-y"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // 0: clean, 1: fixed (the journal replayed); anything else is a broken file system.
        if !matches!(fsck.status.code(), Some(0 | 1)) {
            return DataState::Unmountable(format!(
                "e2fsck -E journal_only: {}: {}",
                fsck.status,
                String::from_utf8_lossy(&fsck.stdout).trim()
            ));
        }
        let cat = Command::new(&self.tools.debugfs)
            .arg("-R")
            .arg(format!("cat {STATE_IN_DATA_FS}"))
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&cat.stderr);
        if stderr.contains("not found") {
            return DataState::Missing;
        }
        classify_state_file(&cat.stdout, &self.scratch.join("state-parse"))
    }

    /// Run the real `edge-ota repair` on this disk, booted slot `slot`; Ok when afterwards the
    /// state file parses.
    fn repair(&self, img: &[u8], slot: &str) -> Result<(), String> {
        let root = self.scratch.join("repair");
        let _ = std::fs::remove_dir_all(&root);
        for d in ["state", "grub", "files-A", "files-B"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let disk = root.join("disk.img");
        std::fs::write(&disk, img).unwrap();
        // The data partition's state.json as the checker read it (journal replayed).
        let data = self.scratch.join("data.img");
        std::fs::write(&data, data_partition(img, &self.range(Area::Data))).unwrap();
        let fsck = Command::new(&self.tools.e2fsck)
            .args(["-E", "journal_only", "-y"])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(matches!(fsck.status.code(), Some(0 | 1)));
        let cat = Command::new(&self.tools.debugfs)
            .arg("-R")
            .arg(format!("cat {STATE_IN_DATA_FS}"))
            .arg(&data)
            .output()
            .unwrap();
        if !String::from_utf8_lossy(&cat.stderr).contains("not found") {
            std::fs::write(root.join("state/state.json"), &cat.stdout).unwrap();
        }
        // Both grubenv copies as they are on this disk (whole blocks, written in place).
        let layout = &self.artifacts.layout;
        for (name, off) in [
            ("grubenv", layout.grubenv_offset),
            ("grubenv2", layout.grubenv2_offset),
        ] {
            let at = off as usize;
            std::fs::write(
                root.join("grub").join(name),
                &img[at..at + edge_ota::bootloader::grubenv::BLOCK_SIZE],
            )
            .unwrap();
        }
        std::fs::write(root.join("cmdline"), format!("edgeota.slot={slot}\n")).unwrap();
        let config = std::fs::read_to_string(self.artifacts.work.join("config-normal.toml"))
            .unwrap()
            .replace(
                "state_dir = \"/var/lib/edge-ota\"",
                &format!(
                    "state_dir = \"{}\"\ncmdline = \"{}\"",
                    root.join("state").display(),
                    root.join("cmdline").display()
                ),
            )
            .replace(
                "disk = \"/dev/vda\"",
                &format!("disk = \"{}\"", disk.display()),
            )
            .replace(
                "/mnt/boot/grub/grubenv",
                &root.join("grub/grubenv").display().to_string(),
            )
            .replace(
                "/etc/edge-ota/keys/INSECURE-demo.pub.pem",
                &crate::artifacts::workspace()
                    .join("keys-example/INSECURE-demo.pub.pem")
                    .display()
                    .to_string(),
            )
            .replace(
                "/var/lib/containerd-images/slot-",
                &root.join("files-").display().to_string(),
            )
            .replace("watchdog = \"/dev/watchdog\"", "");
        std::fs::write(root.join("config.toml"), config).unwrap();
        let out = Command::new(crate::artifacts::guest_edge_ota())
            .arg("--config")
            .arg(root.join("config.toml"))
            .arg("repair")
            .env_remove("EDGE_OTA_FAILPOINT")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "edge-ota repair exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let after = std::fs::read(root.join("state/state.json")).unwrap_or_default();
        match classify_state_file(&after, &self.scratch.join("state-parse")) {
            DataState::Readable => Ok(()),
            other => Err(format!("after edge-ota repair, state.json is {other:?}")),
        }
    }

    /// The states the issue asks to boot in QEMU: the first and last flush of the image
    /// write, every flush that makes a boot-environment write durable, the flushes around the
    /// repair and the rename, and `random` others (seeded), each in its "none" variant (the
    /// state right after the flush) except the random ones, which keep their variant.
    pub fn boot_sample(&self, report: &Report, random: usize, seed: u64) -> Vec<(StateId, String)> {
        let mut picks: Vec<(StateId, String)> = Vec::new();
        let at = |k: usize| StateId {
            point: k,
            variant: Variant::None,
        };
        let image: Vec<usize> = (0..report.points.len())
            .filter(|&k| {
                report.points[k].phase == Phase::Apply
                    && report.points[k].protects.contains(&Area::RootB)
            })
            .collect();
        if let (Some(&first), Some(&last)) = (image.first(), image.last()) {
            picks.push((at(first), "first flush of the image write".into()));
            picks.push((at(last), "last flush of the image write".into()));
        }
        for (k, p) in report.points.iter().enumerate() {
            if p.protects.contains(&Area::Boot) && p.phase != Phase::Damage {
                picks.push((at(k), format!("boot-environment write ({:?})", p.phase)));
            }
        }
        let mut seen = std::collections::HashSet::new();
        picks.retain(|p| seen.insert(p.0));
        // Random others, any variant (torn ones included), never the same state twice.
        let mut rng = blklog::SplitMix64(seed ^ 0xb007);
        let mut tries = 0;
        let target = picks.len() + random;
        while picks.len() < target && tries < 100 * random.max(1) {
            tries += 1;
            let v = &report.verdicts[rng.below(report.verdicts.len() as u64) as usize];
            if seen.insert(v.id) {
                picks.push((v.id, format!("random ({:?})", v.phase)));
            }
        }
        picks
    }
}

/// What the data partition held as state.json.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DataState {
    Readable,
    Missing,
    /// Exactly what the test wrote on purpose.
    Garbled,
    /// Empty, half-written or otherwise not a state file.
    Torn(String),
    Unmountable(String),
}

fn classify_state_file(bytes: &[u8], dir: &Path) -> DataState {
    if bytes == GARBLED_STATE {
        return DataState::Garbled;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("state.json"), bytes).unwrap();
    match edge_ota::state::StateStore::new(dir).load() {
        Ok(_) if !bytes.is_empty() => DataState::Readable,
        Ok(_) => DataState::Torn("empty".into()),
        Err(e) => DataState::Torn(format!("{} bytes: {e}", bytes.len())),
    }
}

fn data_partition<'i>(img: &'i [u8], r: &Range<u64>) -> &'i [u8] {
    &img[r.start as usize..r.end as usize]
}

fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Result<Vec<u8>, String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let started = std::time::Instant::now();
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            let mut all = out.stdout;
            all.extend_from_slice(&out.stderr);
            return Ok(all);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{shown}: still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// grub-emu's output without terminal escape sequences and carriage returns.
fn strip_escapes(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => out.push('\n'),
            c => out.push(c),
        }
    }
    out
}

const SUBSETS: usize = 3;
const TORN: usize = 2;

impl Report {
    pub fn summary(&self, booted: usize) -> String {
        format!(
            "crash states checked: {} (flush points {}, torn/reordered {}); booted in QEMU: {booted}; bad: {}",
            self.verdicts.len(),
            self.flush_points,
            self.reordered_or_torn,
            self.bad.len()
        )
    }

    pub fn in_phase(&self, phase: Phase) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(move |v| v.phase == phase)
    }

    /// Per phase: flush points, states, where GRUB went, how the state file was.
    pub fn details(&self) -> String {
        let mut by: BTreeMap<Phase, (usize, BTreeMap<String, usize>)> = BTreeMap::new();
        for p in &self.points {
            by.entry(p.phase).or_default().0 += 1;
        }
        for v in &self.verdicts {
            let e = by.entry(v.phase).or_default();
            let what = format!(
                "slot {} {} / state file {:?}",
                v.slot,
                v.version.unwrap_or("?"),
                v.state_file
            );
            *e.1.entry(what).or_default() += 1;
        }
        let mut s = String::new();
        for (phase, (points, outcomes)) in by {
            let _ = writeln!(s, "  {phase:?}: {points} flush points");
            for (what, n) in outcomes {
                let _ = writeln!(s, "    {n:>5} states: {what}");
            }
        }
        let mut inodes: BTreeMap<Option<u64>, usize> = BTreeMap::new();
        for v in self.in_phase(Phase::RenameBeforeDirSync) {
            *inodes.entry(v.state_inode).or_default() += 1;
        }
        let _ = writeln!(
            s,
            "  between the rename and the directory fsync: states per state.json inode {inodes:?}"
        );
        let _ = write!(s, "  tool runs: {:?}", self.tool_runs);
        s
    }
}

/// The `edge-ota-replay` command that rebuilds the disk of state `id`.
pub fn replay_command(log: &Path, base: &Path, id: StateId) -> String {
    format!(
        "cargo run -p qemu-tests --bin edge-ota-replay -- {} {} /tmp/crash.img --upto {} --variant {}",
        log.display(),
        base.display(),
        id.point,
        id.variant
    )
}

/// One crash state to boot in QEMU.
#[derive(Debug, Clone)]
pub struct BootJob {
    /// Names the VM and its directory.
    pub n: usize,
    pub id: StateId,
    pub why: String,
    /// The slot grub-emu chose for this state on the host: the real boot must agree.
    pub expect_slot: String,
    /// After the boot, apply v2 from the stick again and see it confirmed.
    pub apply_again: bool,
}

impl Report {
    /// The slot the host check found GRUB boots in state `id`.
    pub fn slot_of(&self, id: StateId) -> String {
        self.verdicts
            .iter()
            .find(|v| v.id == id)
            .map(|v| v.slot.clone())
            .unwrap_or_default()
    }
}

/// Rebuild a state's disk and boot it in QEMU: the slot grub-emu predicted must come up,
/// reach its shell and be good in `edge-ota status`.
pub fn boot_state(
    a: &Artifacts,
    log: &Log,
    base: &Path,
    dir: &Path,
    usb: &Path,
    job: &BootJob,
) -> Result<(), String> {
    let BootJob {
        n,
        id,
        ref why,
        ref expect_slot,
        apply_again,
    } = *job;
    let dir = dir.join(format!("boot-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    blklog::rebuild(log, base, &disk, Some(id.point), id.variant).map_err(|e| e.to_string())?;
    let name = format!("power-loss-boot-{n}");
    // QEMU locks the stick's image: only the VM that applies again gets it.
    let mut vm = Vm::start(&VmConfig {
        name: &name,
        disk: &disk,
        usb: apply_again.then_some(usb),
        log_dir: &a.work.join("logs"),
        ..VmConfig::default()
    });
    let boot = Duration::from_secs(240);
    let ctx = |what: &str, tail: String| {
        format!(
            "booting flush point {} variant {} ({why}): {what}; serial log {}; console tail:\n{tail}",
            id.point,
            id.variant,
            vm_log(a, &name).display()
        )
    };
    let (which, _) = vm
        .wait_any(
            &[
                "edge-init: slot=A version=1.0.0",
                "edge-init: slot=B version=2.0.0",
            ],
            boot,
        )
        .map_err(|t| ctx("no slot came up", t))?;
    vm.wait_any(&["edge-init: ready"], boot)
        .map_err(|t| ctx("never ready", t))?;
    vm.ok("true", boot);
    let st = vm.status();
    let booted = st["booted"].as_str().unwrap_or("").to_string();
    let expect = ["A", "B"][which];
    if expect != expect_slot {
        return Err(ctx(
            &format!("QEMU booted slot {expect}, grub-emu on the host chose {expect_slot:?}"),
            String::new(),
        ));
    }
    let state_of = |slot: &str| {
        st["slots"]
            .as_array()
            .and_then(|v| v.iter().find(|s| s["name"] == slot))
            .and_then(|s| s["boot"]["state"].as_str())
            .unwrap_or("")
            .to_string()
    };
    if booted != expect || state_of(&booted) != "good" {
        return Err(ctx(
            &format!("booted {booted:?} ({}), status {st}", state_of(&booted)),
            String::new(),
        ));
    }
    if apply_again {
        vm.ok(
            "i=0; while [ ! -b /dev/sda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; mount -t vfat -o ro /dev/sda /media/usb",
            boot,
        );
        if booted == "B" {
            // v2 is already installed and confirmed: applying it again installs it into A.
            let (code, out) = vm.run("edge-ota apply --no-reboot /media/usb/image.bin", boot);
            if code != 0 {
                return Err(ctx(
                    &format!("apply again exited {code}: {out}"),
                    String::new(),
                ));
            }
        } else {
            vm.send("edge-ota apply /media/usb/image.bin");
            vm.wait_any(&["edge-init: slot=B version=2.0.0"], boot)
                .map_err(|t| ctx("apply again: B never booted", t))?;
            vm.wait_any(&["edge-init: ready"], boot)
                .map_err(|t| ctx("apply again: B never ready", t))?;
            vm.ok("true", boot);
            let st = vm.status();
            if st["booted"] != "B" {
                return Err(ctx(&format!("apply again: status {st}"), String::new()));
            }
        }
    }
    vm.power_cut();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn vm_log(a: &Artifacts, name: &str) -> PathBuf {
    a.work.join("logs").join(format!("{name}.serial.log"))
}
