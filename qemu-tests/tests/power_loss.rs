//! Power cuts at every write barrier of a real update (issue 9). The v1 disk boots in QEMU
//! behind QEMU's `blklogwrites` driver, which logs every write and flush the guest makes; the
//! guest applies v2 from the USB stick, reboots into B, confirms it, repairs a damaged boot
//! environment and state file, and is cut between a state file's rename and its directory's
//! fsync. Then every crash state of that log (every flush point with none, all, random
//! subsets and torn 4 KiB groups of the writes that followed it) is checked on the host with
//! the real GRUB script in grub-emu, the slots' known image hashes, the guest kernel's own
//! journal replay stand-in (`e2fsck -E journal_only`) and the real `edge-ota repair`; a sample
//! of the states is booted in QEMU. docs/power-loss.md explains the design.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qemu_tests::artifacts::{self, Artifacts};
use qemu_tests::blklog::Log;
use qemu_tests::crashcheck::{self, BootJob, Checker, Phase, PhaseMark, StateFile};
use qemu_tests::scenario::{mount_usb, wait_ready_within};
use qemu_tests::vm::{Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(240);
const CMD: Duration = Duration::from_secs(120);
/// Seed of the random subsets and torn groups; printed with every failure.
const SEED: u64 = 0x9_2024;
/// Crash states boot-tested in QEMU besides the ones the issue names: random others.
const RANDOM_BOOTS: usize = 10;

const TEST: &str = "power_cut_at_every_flush_of_a_usb_update_leaves_a_bootable_good_slot";

/// The phase that starts now, at the log's current end.
fn mark(log: &Path, phase: Phase, marks: &mut Vec<PhaseMark>) {
    // The file is preallocated: count the whole entries written so far instead.
    let at = Log::open(log).map(|l| l.entries.len()).unwrap_or(0);
    marks.push(PhaseMark { phase, entries: at });
}

/// Record the whole update with every write and flush logged: returns the phase marks.
fn record(a: &Artifacts, disk: &Path, usb: &Path, log: &Path) -> Vec<PhaseMark> {
    let mut marks = Vec::new();
    let mut vm = Vm::start(&VmConfig {
        name: "power-loss-record",
        disk,
        usb: Some(usb),
        log_dir: &a.work.join("logs"),
        disk_log: Some(log),
        ..VmConfig::default()
    });
    wait_ready_within(&mut vm, "A", "1.0.0", BOOT);
    mount_usb(&mut vm);
    mark(log, Phase::Apply, &mut marks);
    vm.send("edge-ota apply /media/usb/image.bin");
    vm.wait_for("edge-grub: booting B", BOOT);
    mark(log, Phase::FirstBootOfB, &mut marks);
    wait_ready_within(&mut vm, "B", "2.0.0", BOOT);
    // The boot environment's second copy zeroed and the state file garbled, durably: what a
    // bad sector or an operator leaves; `edge-ota repair` must put both back.
    mark(log, Phase::Damage, &mut marks);
    vm.ok(
        "dd if=/dev/zero of=/mnt/boot/grub/grubenv2 bs=1024 count=1 conv=notrunc,fsync && \
         printf garbled > /var/lib/edge-ota/state.json && sync",
        CMD,
    );
    mark(log, Phase::Repair, &mut marks);
    vm.ok("edge-ota repair", CMD);
    // A state write stopped between its rename and the directory's fsync; the journal's own
    // commit (5 s) may or may not make the rename durable before the cut: both are states.
    mark(log, Phase::RenameBeforeDirSync, &mut marks);
    vm.send("EDGE_OTA_FAILPOINT=after-rename edge-ota repair");
    vm.wait_for(
        &format!("{} after-rename", edge_ota::failpoint::MARKER),
        CMD,
    );
    std::thread::sleep(Duration::from_secs(6));
    let serial = vm.log.clone();
    vm.power_cut();
    // The recording itself must not have disturbed the guest.
    let console = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !console.contains("I/O error"),
        "the guest saw I/O errors while its disk was logged: {}",
        serial.display()
    );
    marks
}

#[test]
fn power_cut_at_every_flush_of_a_usb_update_leaves_a_bootable_good_slot() {
    if let Some(why) = qemu_tests::skip_reason() {
        edge_ota::testing::skip(TEST, &why);
        return;
    }
    let Some(tools) = crashcheck::Tools::find(TEST) else {
        return;
    };
    let a = artifacts::get();
    let started = Instant::now();
    let disk = a.fresh_disk("power-loss");
    let dir = disk.parent().unwrap().to_path_buf();
    let usb = a.usb_stick("power-loss", &a.bundle_v2);
    let log_path = dir.join("disk.log");
    let marks = record(a, &disk, &usb, &log_path);
    let recorded = started.elapsed();
    let log = Log::open(&log_path).unwrap();
    let c = log.counts();
    eprintln!(
        "{TEST}: recorded in {recorded:.1?}: {} entries, {} writes ({} MiB), {} flushes, {} FUA, {} discards",
        c.entries,
        c.writes,
        c.bytes_written >> 20,
        c.flushes,
        c.fua,
        c.discards
    );
    let checker = Checker::new(a, &tools, &log, &a.disk, &dir.join("check"), marks);
    let mut report = checker.check_all(SEED);
    let checked = started.elapsed() - recorded;
    eprintln!("{TEST}: host check in {checked:.1?}\n{}", report.details());
    // A cut between the state file's rename and its directory's fsync: the file reads as it
    // is (old or new, whole), never needing repair.
    let window: Vec<_> = report.in_phase(Phase::RenameBeforeDirSync).collect();
    assert!(!window.is_empty(), "no crash state after the rename");
    for v in &window {
        assert_eq!(
            v.state_file,
            StateFile::Readable,
            "flush point {} variant {}: state.json after a cut between rename and directory fsync",
            v.id.point,
            v.id.variant
        );
    }
    // The checker can fail: a disk whose boot environment names slot B while B's image is
    // cut short must be caught.
    let broken = checker.problems_of_final_disk_with_slot_b_cut_short();
    assert!(
        broken.iter().any(|p| p.contains("no complete image")),
        "the checker accepted a disk booting a half-written slot B: {broken:?}"
    );
    let sample: Vec<BootJob> = checker
        .boot_sample(&report, RANDOM_BOOTS, SEED)
        .into_iter()
        .enumerate()
        .map(|(n, (id, why))| BootJob {
            n,
            id,
            why,
            expect_slot: report.slot_of(id),
            // Applying again after the boot costs a whole update: the first state (the
            // first flush of the image write) only.
            apply_again: n == 0,
        })
        .collect();
    let boots_started = Instant::now();
    let results = boot_in_parallel(a, &log, &dir, &usb, &sample);
    eprintln!(
        "{TEST}: {} states booted in QEMU in {:.1?} ({BOOT_THREADS} at a time)",
        sample.len(),
        boots_started.elapsed()
    );
    let booted = results.len();
    for (job, r) in sample.iter().zip(results) {
        if let Err(e) = r {
            report.bad.push(format!(
                "{e}\n  rebuild this disk: {}",
                crashcheck::replay_command(&log_path, &a.disk, job.id)
            ));
        }
    }
    let summary = report.summary(booted);
    let elapsed = started.elapsed();
    write_summary(&a.work, &summary, &report.details(), elapsed);
    println!("{summary}");
    eprintln!("{TEST}: {summary} ({elapsed:.1?} in all)");
    assert!(
        report.bad.is_empty(),
        "{} bad crash states:\n{}",
        report.bad.len(),
        report.bad.join("\n")
    );
}

/// Two VMs at a time: the most two cores take well (shared HOST-NOTES).
const BOOT_THREADS: usize = 2;

/// Boot each sampled state in QEMU, two at a time; results in the sample's order.
fn boot_in_parallel(
    a: &Artifacts,
    log: &Log,
    dir: &Path,
    usb: &Path,
    sample: &[BootJob],
) -> Vec<Result<(), String>> {
    let next = AtomicUsize::new(0);
    let results = Mutex::new(vec![None; sample.len()]);
    std::thread::scope(|s| {
        for _ in 0..BOOT_THREADS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = sample.get(i) else {
                    break;
                };
                let t = Instant::now();
                // A panic in the harness (a guest command that fails) is this state's failure.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crashcheck::boot_state(a, log, &a.disk, dir, usb, job)
                }))
                .unwrap_or_else(|p| {
                    Err(p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default())
                });
                eprintln!(
                    "{TEST}: boot {i}: flush point {} ({}; {}) in {:.1?}: {}",
                    job.id.point,
                    job.id.variant,
                    job.why,
                    t.elapsed(),
                    if r.is_ok() { "good slot, ready" } else { "BAD" }
                );
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every state booted"))
        .collect()
}

/// For scripts/test.sh (libtest captures a passing test's output): the summary line, where
/// the states went per phase, and the wall time.
fn write_summary(work: &Path, summary: &str, details: &str, elapsed: Duration) {
    std::fs::write(
        work.join("power-loss.txt"),
        format!(
            "{summary}\n{details}\n(recorded, checked and booted in {:.0} s)\n",
            elapsed.as_secs_f64()
        ),
    )
    .unwrap();
}
