//! The REAL boot script, `bootloader/grub/grub.cfg`, run by GRUB's own interpreter (Debian's
//! `grub-emu`, GRUB 2.06) over every combination of slot states, tries and damaged or missing
//! copies of the boot environment, compared with the Rust model
//! [`edge_ota::bootloader::grubenv::grub_boot_model`]: the slot GRUB boots, whether it was the
//! last resort, and the bytes of both copies (`grubenv`, `grubenv2`) after the boot.
//!
//! How a boot is run: `grub-emu -d DIR/x86_64-emu -m device.map` reads `DIR/grub.cfg`, a small
//! wrapper that defines a script function `linux` (the emu platform has no `linux` command; a
//! function of that name is called instead), which prints its arguments and `reboot`s (exit 0),
//! then `source`s the real script from `(hd0)/grub/grub.cfg`. `(hd0)` is an ext2 image made once
//! by `mke2fs -d` (one template with both copies, one without `grubenv2`); each run patches the
//! two 1024-byte blocks into a fresh copy of the template at the files' data blocks (found with
//! `debugfs bmap` and checked with `debugfs cat`), and reads them back from the same offsets.
//! Every other byte of the image must be left as it was (GRUB writes nothing else, and never
//! creates a missing copy).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edge_ota::bootloader::grubenv::{
    self, grub_boot_model, parse_copy, serialize_copy, GrubBoot, GrubEnvPair, BLOCK_SIZE, END,
    END_AT, SECOND_COPY, SEQ,
};
use edge_ota::testing::{find_tool, skip};

/// GRUB's emu modules (Debian package grub-emu).
const EMU_MODULES: &str = "/usr/lib/grub/x86_64-emu";
/// Size of a sector: a write cut between the two halves of a block leaves them from two writes.
const SECTOR: usize = 512;
/// Longest a single boot may take before it counts as hung (it normally takes ~0.1 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

// ---- Tools ----

struct Tools {
    grub_emu: PathBuf,
    mke2fs: PathBuf,
    debugfs: PathBuf,
}

/// The tools, or None after [`skip`] said what is missing (a failure under
/// `EDGE_OTA_REQUIRE_ALL`).
fn tools(test: &str) -> Option<Tools> {
    let mut missing = Vec::new();
    let mut get = |name: &str, package: &str| {
        let found = find_tool(name);
        if found.is_none() {
            missing.push(format!("{name} (apt-get install {package})"));
        }
        found
    };
    let grub_emu = get("grub-emu", "grub-emu");
    let mke2fs = get("mke2fs", "e2fsprogs");
    let debugfs = get("debugfs", "e2fsprogs");
    if !Path::new(EMU_MODULES).join("normal.mod").is_file() {
        missing.push(format!(
            "GRUB's emu modules in {EMU_MODULES} (apt-get install grub-emu)"
        ));
    }
    match (grub_emu, mke2fs, debugfs) {
        (Some(grub_emu), Some(mke2fs), Some(debugfs)) if missing.is_empty() => Some(Tools {
            grub_emu,
            mke2fs,
            debugfs,
        }),
        _ => {
            skip(test, &format!("missing {}", missing.join(", ")));
            None
        }
    }
}

fn real_grub_cfg() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bootloader/grub/grub.cfg")
}

// ---- The emulated machine ----

/// A disk image made once by mke2fs, and where the copies' data blocks are in it.
struct Template {
    image: Vec<u8>,
    /// Byte offset of grubenv's and grubenv2's 1024 bytes (None: that file does not exist).
    offsets: [Option<usize>; 2],
}

/// What one boot in grub-emu did.
struct GrubRun {
    status: ExitStatus,
    /// Output without terminal escapes and progress lines.
    output: String,
    /// How many times the script called `linux` (the wrapper reboots, so at most once).
    linux_calls: usize,
    /// `edgeota.slot=` from the kernel command line.
    slot: Option<String>,
    /// The slot of `edge-grub: booting S` (the last one printed).
    booting: Option<String>,
    /// The slot of `edge-grub: WARNING: no bootable slot, last resort: S`.
    last_resort: Option<String>,
    /// Both copies read back from the image after the boot.
    copies: Copies,
    /// Bytes of the image outside the two copies that changed (must be none).
    stray_write: Option<String>,
}

struct Emu {
    tools: Tools,
    dir: tempfile::TempDir,
    /// [0]: both copies; [1]: no grubenv2.
    templates: [Template; 2],
}

impl Emu {
    fn new(tools: Tools) -> Emu {
        let dir = tempfile::tempdir().unwrap();
        // grub-emu reads DIR/grub.cfg beside the module folder given with -d.
        std::os::unix::fs::symlink(EMU_MODULES, dir.path().join("x86_64-emu")).unwrap();
        std::fs::write(
            dir.path().join("grub.cfg"),
            "function linux { echo \"EMU-LINUX\"; for a in \"$@\"; do echo \"EMU-ARG $a\"; done; reboot; }\n\
             set root=hd0\n\
             set prefix=(hd0)/grub\n\
             source (hd0)/grub/grub.cfg\n",
        )
        .unwrap();
        let mut emu = Emu {
            tools,
            dir,
            templates: [Template::empty(), Template::empty()],
        };
        emu.templates = [emu.template(true), emu.template(false)];
        emu
    }

    fn debugfs(&self, image: &Path, request: &str) -> std::process::Output {
        Command::new(&self.tools.debugfs)
            .arg("-R")
            .arg(request)
            .arg(image)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// An ext2 image holding the real grub.cfg and placeholder copies (distinct, non-zero,
    /// so each is a real allocated block found exactly once in the image).
    fn template(&self, with_second: bool) -> Template {
        let name = if with_second { "both" } else { "first-only" };
        let tree = self.dir.path().join(format!("tree-{name}"));
        let grub = tree.join("grub");
        std::fs::create_dir_all(&grub).unwrap();
        std::fs::copy(real_grub_cfg(), grub.join("grub.cfg")).unwrap();
        let files = ["grubenv", SECOND_COPY];
        let placeholders: Vec<Vec<u8>> = (0..2)
            .map(|i| serialize_copy(&Combo::placeholder().vars(), 101 + i as u64).unwrap())
            .collect();
        for i in 0..2 {
            if i == 0 || with_second {
                std::fs::write(grub.join(files[i]), &placeholders[i]).unwrap();
            }
        }
        let image = self.dir.path().join(format!("template-{name}.img"));
        let out = Command::new(&self.tools.mke2fs)
            .args(["-q", "-t", "ext2", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("4M")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mke2fs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let stats = self.debugfs(&image, "stats");
        let stats = String::from_utf8_lossy(&stats.stdout);
        let block_size: usize = stats
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .unwrap_or_else(|| panic!("no block size in debugfs stats:\n{stats}"))
            .trim()
            .parse()
            .unwrap();
        let bytes = std::fs::read(&image).unwrap();
        let mut offsets = [None, None];
        for i in 0..2 {
            let path = format!("/grub/{}", files[i]);
            let cat = self.debugfs(&image, &format!("cat {path}"));
            if i == 1 && !with_second {
                assert!(
                    cat.stdout.is_empty(),
                    "{path} should not exist in {}",
                    image.display()
                );
                continue;
            }
            assert_eq!(
                cat.stdout, placeholders[i],
                "debugfs cat {path} does not return what mke2fs was given"
            );
            let bmap = self.debugfs(&image, &format!("bmap {path} 0"));
            let block: usize = String::from_utf8_lossy(&bmap.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|e| {
                    panic!(
                        "debugfs bmap {path} 0: {e}: {}",
                        String::from_utf8_lossy(&bmap.stderr)
                    )
                });
            let at = block * block_size;
            assert_eq!(
                bytes.get(at..at + BLOCK_SIZE),
                Some(&placeholders[i][..]),
                "{path}: block {block} × {block_size} does not hold its bytes"
            );
            let found = bytes
                .windows(BLOCK_SIZE)
                .filter(|w| *w == &placeholders[i][..])
                .count();
            assert_eq!(found, 1, "{path}'s bytes are {found} times in the image");
            offsets[i] = Some(at);
        }
        Template {
            image: bytes,
            offsets,
        }
    }

    /// Boots the real grub.cfg once with these copies (`None`: the file does not exist; only
    /// the second copy may be missing) in a fresh image. `tag` names the run's directory.
    fn boot(&self, copies: &Copies, tag: &str) -> GrubRun {
        assert!(copies[0].is_some(), "the templates always hold grubenv");
        let template = &self.templates[if copies[1].is_some() { 0 } else { 1 }];
        let mut image = template.image.clone();
        for (copy, offset) in copies.iter().zip(template.offsets) {
            if let (Some(block), Some(at)) = (copy, offset) {
                assert_eq!(block.len(), BLOCK_SIZE, "a copy is one whole block");
                image[at..at + BLOCK_SIZE].copy_from_slice(block);
            }
        }
        let run = self.dir.path().join(format!("run-{tag}"));
        std::fs::create_dir(&run).unwrap();
        let img = run.join("boot.img");
        std::fs::write(&img, &image).unwrap();
        let map = run.join("device.map");
        std::fs::write(&map, format!("(hd0) {}\n", img.display())).unwrap();
        let stdout = run.join("stdout");
        let mut child = Command::new(&self.tools.grub_emu)
            .arg("-d")
            .arg(self.dir.path().join("x86_64-emu"))
            .arg("-m")
            .arg(&map)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(run.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > BOOT_TIMEOUT {
                child.kill().unwrap();
                let status = child.wait().unwrap();
                let out = std::fs::read(&stdout).unwrap();
                panic!(
                    "{tag}: grub-emu still running after {BOOT_TIMEOUT:?} ({status}); output:\n{}",
                    clean_output(&out)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut raw = std::fs::read(&stdout).unwrap();
        raw.extend_from_slice(&std::fs::read(run.join("stderr")).unwrap());
        let output = clean_output(&raw);

        let after = std::fs::read(&img).unwrap();
        let read = |offset: Option<usize>| offset.map(|at| after[at..at + BLOCK_SIZE].to_vec());
        let copies_after = template.offsets.map(read);
        // Everything but the copies' blocks must be as before.
        let mut masked = after.clone();
        for at in template.offsets.into_iter().flatten() {
            masked[at..at + BLOCK_SIZE].copy_from_slice(&image[at..at + BLOCK_SIZE]);
        }
        let stray_write = (masked != image).then(|| {
            let first = masked.iter().zip(&image).position(|(a, b)| a != b);
            format!(
                "image size {} -> {}, first changed byte outside the copies at {first:?}",
                image.len(),
                after.len()
            )
        });
        std::fs::remove_dir_all(&run).unwrap();

        let mut linux_calls = 0;
        let (mut slot, mut booting, mut last_resort) = (None, None, None);
        for line in output.lines() {
            if line.contains("EMU-LINUX") {
                linux_calls += 1;
            }
            if let Some(s) = after_marker(line, "EMU-ARG edgeota.slot=") {
                slot = Some(s);
            }
            if let Some(s) = after_marker(line, "edge-grub: booting ") {
                booting = Some(s);
            }
            if let Some(s) =
                after_marker(line, "edge-grub: WARNING: no bootable slot, last resort: ")
            {
                last_resort = Some(s);
            }
        }
        GrubRun {
            status,
            output,
            linux_calls,
            slot,
            booting,
            last_resort,
            copies: copies_after,
            stray_write,
        }
    }

    /// Boots every case on a few threads; results in the cases' order.
    fn boot_all(&self, cases: &[Case]) -> Vec<GrubRun> {
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get() * 2)
            .clamp(2, 4);
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<GrubRun>>> =
            Mutex::new((0..cases.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    let run = self.boot(&case.copies, &i.to_string());
                    results.lock().unwrap()[i] = Some(run);
                });
            }
        });
        results
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|r| r.expect("every case ran"))
            .collect()
    }
}

impl Template {
    fn empty() -> Template {
        Template {
            image: Vec::new(),
            offsets: [None, None],
        }
    }
}

/// The word after `marker` in `line`.
fn after_marker(line: &str, marker: &str) -> Option<String> {
    let at = line.find(marker)? + marker.len();
    Some(
        line[at..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string(),
    )
}

/// grub-emu's output without terminal escape sequences, carriage returns and the file
/// progress indicators (`[ grubenv  1.00KiB  100%  0.00B/s ]`), which become line breaks.
fn clean_output(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => plain.push(c),
        }
    }
    let mut out = String::new();
    let mut rest = plain.as_str();
    while let Some(open) = rest.find("[ ") {
        match rest[open..].find(" ]") {
            Some(close)
                if rest[open..open + close].contains('%')
                    && !rest[open..open + close].contains('\n') =>
            {
                out.push_str(rest[..open].trim_end_matches(' '));
                out.push('\n');
                rest = &rest[open + close + 2..];
            }
            _ => {
                out.push_str(&rest[..open + 2]);
                rest = &rest[open + 2..];
            }
        }
    }
    out.push_str(rest);
    out.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- The combinations ----

/// grubenv's and grubenv2's bytes (None: the file does not exist).
type Copies = [Option<Vec<u8>>; 2];

/// (state, tries) of one slot.
const SLOT_STATES: [(&str, &str); 5] = [
    ("good", "0"),
    ("bad", "0"),
    ("trying", "3"),
    ("trying", "1"),
    ("trying", "0"),
];

#[derive(Clone, Copy)]
struct Combo {
    order: &'static str,
    a: (&'static str, &'static str),
    b: (&'static str, &'static str),
}

impl Combo {
    fn placeholder() -> Combo {
        Combo {
            order: "A B",
            a: ("good", "0"),
            b: ("bad", "0"),
        }
    }

    fn vars(&self) -> BTreeMap<String, String> {
        [
            ("EDGE_ORDER", self.order),
            ("EDGE_A_STATE", self.a.0),
            ("EDGE_A_TRIES", self.a.1),
            ("EDGE_B_STATE", self.b.0),
            ("EDGE_B_TRIES", self.b.1),
            ("EDGE_FLOOR", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The same state with the slots' roles exchanged: order reversed, A's state and tries
    /// given to B and B's to A. Whatever a combination boots, its mirror boots the other slot
    /// (and decrements the other slot's tries), so booting from the wrong copy always shows.
    fn mirror(&self) -> Combo {
        Combo {
            order: if self.order == "A B" { "B A" } else { "A B" },
            a: self.b,
            b: self.a,
        }
    }

    fn block(&self, seq: u64) -> Vec<u8> {
        serialize_copy(&self.vars(), seq).unwrap()
    }

    fn describe(&self) -> String {
        format!(
            "EDGE_ORDER={:?} A={}/{} B={}/{}",
            self.order, self.a.0, self.a.1, self.b.0, self.b.1
        )
    }
}

/// Deterministic garbage: not a GRUB environment block.
fn garbage(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    let mut v: Vec<u8> = (0..BLOCK_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    v[0] = 0xA5;
    v
}

/// `head`'s first sector, `tail`'s second: a write cut between the sectors.
fn torn(head: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut v = head[..SECTOR].to_vec();
    v.extend_from_slice(&tail[SECTOR..]);
    v
}

struct Case {
    what: String,
    copies: Copies,
}

/// The 8 situations of the two copies for one combination `c`.
fn situations(c: &Combo, n: u64) -> Vec<(String, Copies, Option<usize>)> {
    let m = c.mirror();
    let zeros = vec![0u8; BLOCK_SIZE];
    // The second copy differs from the first only in the tries of the first slot in order.
    let tie = {
        let mut v = c.vars();
        let key = format!("EDGE_{}_TRIES", &c.order[..1]);
        let t = if v[&key] == "0" { "2" } else { "0" };
        v.insert(key, t.into());
        serialize_copy(&v, 8).unwrap()
    };
    vec![
        (
            "1: both copies equal, sequence 8".into(),
            [Some(c.block(8)), Some(c.block(8))],
            Some(0),
        ),
        (
            "2: first copy sequence 8, second stale (sequence 7, mirrored state)".into(),
            [Some(c.block(8)), Some(m.block(7))],
            Some(0),
        ),
        (
            "3: second copy sequence 8, first stale (sequence 7, mirrored state)".into(),
            [Some(m.block(7)), Some(c.block(8))],
            Some(1),
        ),
        (
            "4: first copy zero-filled, second sequence 8".into(),
            [Some(zeros.clone()), Some(c.block(8))],
            Some(1),
        ),
        (
            "5: first copy sequence 8, second missing".into(),
            [Some(c.block(8)), None],
            Some(0),
        ),
        (
            "6: first copy torn (first sector: this state at sequence 9, second sector: the \
             mirrored state at sequence 8), second copy the mirrored state at sequence 8"
                .into(),
            [Some(torn(&c.block(9), &m.block(8))), Some(m.block(8))],
            Some(1),
        ),
        (
            "7: first copy zero-filled, second garbage: no valid copy".into(),
            [Some(zeros), Some(garbage(n))],
            None,
        ),
        (
            "8: both sequence 8, the second differs in the first slot's tries: the first wins"
                .into(),
            [Some(c.block(8)), Some(tie)],
            Some(0),
        ),
    ]
}

fn all_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for order in ["A B", "B A"] {
        for a in SLOT_STATES {
            for b in SLOT_STATES {
                let c = Combo { order, a, b };
                for (what, copies, current) in situations(&c, cases.len() as u64) {
                    // The construction itself: the copy meant to be current is the one the
                    // pair logic picks (a torn or zeroed copy is invalid, ...).
                    let parsed = copies.each_ref().map(|b| match b {
                        Some(b) => parse_copy(b, Path::new("case")),
                        None => grubenv::Copy::Missing,
                    });
                    assert_eq!(
                        GrubEnvPair::current(&parsed),
                        current,
                        "{}; situation {what}: the test builds the wrong copies: {parsed:?}",
                        c.describe()
                    );
                    cases.push(Case {
                        what: format!("{}; situation {what}", c.describe()),
                        copies,
                    });
                }
            }
        }
    }
    cases
}

// ---- Comparing GRUB with the model ----

/// Every way `grub` differs from `model` (empty: they agree).
fn disagreements(grub: &GrubRun, model: &GrubBoot) -> Vec<String> {
    let mut out = Vec::new();
    if !grub.status.success() {
        out.push(format!(
            "grub-emu {} (the wrapper's linux reboots with exit 0)",
            grub.status
        ));
    }
    if grub.linux_calls != 1 {
        out.push(format!(
            "the script called linux {} times, not once",
            grub.linux_calls
        ));
    }
    if grub.slot.as_deref() != Some(model.slot.as_str()) {
        out.push(format!(
            "slot: GRUB booted {:?} (edgeota.slot=), the model says {:?}",
            grub.slot, model.slot
        ));
    }
    if grub.booting != grub.slot {
        out.push(format!(
            "GRUB printed `edge-grub: booting {:?}` but booted {:?}",
            grub.booting, grub.slot
        ));
    }
    if grub.last_resort.is_some() != model.last_resort {
        out.push(format!(
            "last resort: GRUB {}, the model {}",
            if grub.last_resort.is_some() {
                "printed the last-resort warning"
            } else {
                "did not print the last-resort warning"
            },
            if model.last_resort {
                "says last resort"
            } else {
                "says a regular boot"
            },
        ));
    }
    if grub.last_resort.is_some() && grub.last_resort != grub.slot {
        out.push(format!(
            "GRUB's last resort was {:?} but it booted {:?}",
            grub.last_resort, grub.slot
        ));
    }
    if let Some(stray) = &grub.stray_write {
        out.push(format!(
            "GRUB changed the image outside the copies: {stray}"
        ));
    }
    let names = ["grubenv", SECOND_COPY];
    for (i, name) in names.iter().enumerate() {
        if grub.copies[i] != model.copies[i] {
            out.push(format!(
                "{name} after the boot differs (GRUB vs model):\n{}",
                diff_copy(&grub.copies[i], &model.copies[i]).trim_end()
            ));
        }
    }
    out
}

/// The variables that differ between two copies (or why they cannot be compared).
fn diff_copy(grub: &Option<Vec<u8>>, model: &Option<Vec<u8>>) -> String {
    let (g, m) = match (grub, model) {
        (Some(g), Some(m)) => (g, m),
        (g, m) => {
            let show = |b: &Option<Vec<u8>>| if b.is_some() { "present" } else { "missing" };
            return format!("      GRUB: file {}, model: file {}", show(g), show(m));
        }
    };
    let p = Path::new("copy");
    match (grubenv::parse(g, p), grubenv::parse(m, p)) {
        (Ok(gv), Ok(mv)) => {
            let mut s = String::new();
            let keys: std::collections::BTreeSet<&String> = gv.keys().chain(mv.keys()).collect();
            for k in keys {
                if gv.get(k) != mv.get(k) {
                    writeln!(s, "      {k}: GRUB {:?}, model {:?}", gv.get(k), mv.get(k)).unwrap();
                }
            }
            if s.is_empty() {
                let at = g.iter().zip(m).position(|(a, b)| a != b);
                write!(
                    s,
                    "      same variables, different layout: first differing byte at {at:?} \
                     ({SEQ} first, {END} at {END_AT})"
                )
                .unwrap();
            }
            s
        }
        (g_parsed, m_parsed) => format!(
            "      GRUB's copy: {}\n      model's copy: {}",
            g_parsed.map_or_else(|e| e.to_string(), |v| format!("{v:?}")),
            m_parsed.map_or_else(|e| e.to_string(), |v| format!("{v:?}")),
        ),
    }
}

fn vars_of(block: &Option<Vec<u8>>) -> Option<BTreeMap<String, String>> {
    grubenv::parse(block.as_deref()?, Path::new("copy")).ok()
}

// ---- The tests ----

#[test]
fn real_grub_cfg_agrees_with_the_model_on_every_combination() {
    const TEST: &str = "real_grub_cfg_agrees_with_the_model_on_every_combination";
    let Some(tools) = tools(TEST) else { return };
    let started = Instant::now();
    let emu = Emu::new(tools);
    let cases = all_cases();
    assert_eq!(
        cases.len(),
        2 * 25 * 8,
        "orders × slot-state pairs × situations"
    );
    let runs = emu.boot_all(&cases);

    let mut failures = Vec::new();
    // Coverage: each branch of the script must be taken by some combination.
    let (mut booted_a, mut booted_b, mut last_resorts) = (0, 0, 0);
    let (mut no_write, mut wrote_one, mut wrote_both) = (0, 0, 0);
    for (case, run) in cases.iter().zip(&runs) {
        let model = grub_boot_model(case.copies.clone());
        let problems = disagreements(run, &model);
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n  - {}\n  GRUB's output:\n    {}",
                case.what,
                problems.join("\n  - "),
                run.output.replace('\n', "\n    ")
            ));
            continue;
        }
        match run.slot.as_deref() {
            Some("A") => booted_a += 1,
            Some("B") => booted_b += 1,
            _ => {}
        }
        last_resorts += usize::from(run.last_resort.is_some());
        match (0..2).filter(|&i| run.copies[i] != case.copies[i]).count() {
            0 => no_write += 1,
            1 => wrote_one += 1,
            _ => wrote_both += 1,
        }
    }
    eprintln!(
        "{TEST}: {} boots of the real grub.cfg in grub-emu in {:.1?}: {} disagreements; \
         booted A {booted_a}, B {booted_b}, last resort {last_resorts}; wrote no copy \
         {no_write}, one {wrote_one}, both {wrote_both}",
        runs.len(),
        started.elapsed(),
        failures.len()
    );
    if !failures.is_empty() {
        // In full for the first few, then one line each (the combination).
        let shown = 20;
        let rest: Vec<&str> = failures
            .iter()
            .skip(shown)
            .map(|f| f.lines().next().unwrap_or(""))
            .collect();
        panic!(
            "GRUB (grub-emu running bootloader/grub/grub.cfg) and grub_boot_model disagree on \
             {} of {} combinations:\n\n{}{}",
            failures.len(),
            cases.len(),
            failures[..failures.len().min(shown)].join("\n\n"),
            if rest.is_empty() {
                String::new()
            } else {
                format!("\n\nand also on:\n{}", rest.join("\n"))
            }
        );
    }
    for (what, n) in [
        ("booted A", booted_a),
        ("booted B", booted_b),
        ("last resort", last_resorts),
        ("no copy written", no_write),
        ("one copy written", wrote_one),
        ("both copies written", wrote_both),
    ] {
        assert!(n > 0, "no combination covers `{what}`");
    }

    // The comparison can fail: a model that is off in the slot, the warning or one byte of a
    // copy is caught on a real run.
    let (case, run) = (&cases[0], &runs[0]);
    let model = grub_boot_model(case.copies.clone());
    let mut wrong = model.clone();
    wrong.slot = if model.slot == "A" { "B" } else { "A" }.into();
    assert!(!disagreements(run, &wrong).is_empty());
    let mut wrong = model.clone();
    wrong.last_resort = !model.last_resort;
    assert!(!disagreements(run, &wrong).is_empty());
    let mut wrong = model;
    wrong.copies[1].as_mut().unwrap()[3] ^= 1;
    assert!(!disagreements(run, &wrong).is_empty());
}

/// A power cut between the two sectors of a copy's write leaves that copy invalid; GRUB then
/// boots the other copy's whole state, old or new, never a mix of the two, and writes only
/// into that copy.
#[test]
fn a_copy_torn_between_its_sectors_boots_the_whole_other_copy() {
    const TEST: &str = "a_copy_torn_between_its_sectors_boots_the_whole_other_copy";
    let Some(tools) = tools(TEST) else { return };
    let emu = Emu::new(tools);
    // Before: A good, B empty. The update being written: B trying with 3 tries, first.
    let old_state = Combo::placeholder();
    let new_state = Combo {
        order: "B A",
        a: ("good", "0"),
        b: ("trying", "3"),
    };
    let (old, new) = (old_state.block(8), new_state.block(9));
    let mut cases = Vec::new();
    for torn_copy in 0..2 {
        for (tear, block) in [
            ("new first sector, old second", torn(&new, &old)),
            ("old first sector, new second", torn(&old, &new)),
        ] {
            for (other_is, other) in [("old", &old), ("new", &new)] {
                let mut copies = [None, None];
                copies[torn_copy] = Some(block.clone());
                copies[1 - torn_copy] = Some(other.clone());
                cases.push((
                    format!(
                        "copy {} torn ({tear}), the other copy {other_is}",
                        torn_copy + 1
                    ),
                    torn_copy,
                    other_is == "new",
                    copies,
                ));
            }
        }
    }
    let mut failures = Vec::new();
    for (i, (what, torn_copy, other_new, copies)) in cases.iter().enumerate() {
        let run = emu.boot(copies, &format!("torn-{i}"));
        let mut problems = disagreements(&run, &grub_boot_model(copies.clone()));
        // Independently of the model: the other copy's state boots, the torn one is kept.
        let other = 1 - torn_copy;
        let (slot, other_after) = if *other_new {
            let mut v = new_state.vars();
            v.insert("EDGE_B_TRIES".into(), "2".into());
            ("B", serialize_copy(&v, 9).unwrap())
        } else {
            ("A", old.clone())
        };
        if run.slot.as_deref() != Some(slot) || run.last_resort.is_some() {
            problems.push(format!(
                "booted {:?} (last resort: {:?}), expected {slot} from the other copy",
                run.slot, run.last_resort
            ));
        }
        if run.copies[*torn_copy] != copies[*torn_copy] {
            problems.push("GRUB wrote into the torn copy".into());
        }
        if run.copies[other].as_ref() != Some(&other_after) {
            problems.push(format!(
                "the other copy after the boot: {:?}, expected {:?}",
                vars_of(&run.copies[other]),
                vars_of(&Some(other_after))
            ));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{what}:\n  - {}\n  GRUB's output:\n    {}",
                problems.join("\n  - "),
                run.output.replace('\n', "\n    ")
            ));
        }
    }
    assert_eq!(cases.len(), 8);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
