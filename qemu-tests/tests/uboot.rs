//! `bootloader/u-boot/boot.cmd` run by real U-Boot (Debian's `u-boot-qemu`, `qemu_arm64`)
//! under `qemu-system-aarch64 -M virt` (TCG), with the environment written and read by
//! edge-ota's own `uboot_env` module: the automated form of the manual test in
//! `bootloader/u-boot/README.md`.
//!
//! Each QEMU run is one boot. `edge_bootcmd` (the script's hook for the final boot command)
//! echoes a marker with the chosen slot and the kernel arguments, then powers the machine off,
//! so the console says which slot the script picked and the environment in the pflash bank
//! says what it saved. No kernel runs: the files called `/boot/Image` are placeholders.
//!
//! The environment image starts from U-Boot's own default environment (saved by U-Boot from a
//! blank flash once per test binary and read back with edge-ota's reader), because U-Boot uses
//! a valid stored environment *instead of* its default one: an image holding only the `EDGE_*`
//! variables would have no `bootcmd`, and nothing would boot.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edge_ota::bootloader::uboot_env::{parse_fw_env_config, UBootEnv};
use edge_ota::bootloader::EnvStore;

const UBOOT_BIN: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
const BOOT_CMD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../bootloader/u-boot/boot.cmd");

/// QEMU's `virt` flash banks are 64 MiB each; the image must have exactly that size.
const PFLASH_SIZE: u64 = 64 << 20;
/// Where Debian's qemu_arm64 U-Boot keeps its environment, in `fw_env.config` terms: 0x40000
/// bytes at the start of the second flash bank (0x4000000; `flinfo` shows its first two
/// 128 KiB sectors protected for the environment).
///
/// Single layout: this build has no `CONFIG_SYS_REDUNDAND_ENVIRONMENT` (a build-time choice,
/// not something the flash bank can change). Its `saveenv` erases and rewrites one 0x40000
/// copy whose data starts right after the CRC, at byte 4, with no flag byte; the template
/// step checks that, since reading U-Boot's own save with this one-line config succeeds only
/// if the CRC covers the data from byte 4 on.
const ENV_CONFIG_LINE: &str = "0x0 0x40000";
const ENV_SIZE: usize = 0x40000;

/// Generous bound for one boot (about 1 s of TCG when the machine is idle): this machine has 2
/// cores shared with the other tests and possibly a compiler.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// What `edge_bootcmd` prints in place of booting the kernel.
const MARKER: &str = "EDGE-BOOT slot=";
const EDGE_BOOTCMD: &str = "echo EDGE-BOOT slot=${edge_slot} bootargs=${bootargs}; poweroff";

/// Variables the script sets with setenv/setexpr/part/load, which must never reach a saved
/// environment (boot.cmd clears them before `saveenv`).
const SCRIPT_VARS: &[&str] = &[
    "edge_get",
    "edge_state",
    "edge_tries",
    "edge_part",
    "edge_fdt_addr",
    "edge_initrd_arg",
    "bootargs",
];

type Vars = BTreeMap<String, String>;

/// The external tools, found once per test.
#[derive(Clone)]
struct Tools {
    qemu: PathBuf,
    mkimage: PathBuf,
    mkfs_vfat: PathBuf,
    mcopy: PathBuf,
    uboot: PathBuf,
}

use edge_ota::testing::find_tool;

/// The tools, or `None` after printing why the test is skipped. With `EDGE_OTA_REQUIRE_ALL`
/// set (CI) a missing tool fails the test instead: a skipped test proves nothing.
fn tools_or_skip(test: &str) -> Option<Tools> {
    let mut missing = Vec::new();
    let mut tool = |name: &str, package: &str| {
        find_tool(name).unwrap_or_else(|| {
            missing.push(format!("{name} (package {package})"));
            PathBuf::new()
        })
    };
    let qemu = tool("qemu-system-aarch64", "qemu-system-arm");
    let mkimage = tool("mkimage", "u-boot-tools");
    let mkfs_vfat = tool("mkfs.vfat", "dosfstools");
    let mcopy = tool("mcopy", "mtools");
    let uboot = PathBuf::from(UBOOT_BIN);
    if !uboot.is_file() {
        missing.push(format!("{UBOOT_BIN} (package u-boot-qemu)"));
    }
    if missing.is_empty() {
        return Some(Tools {
            qemu,
            mkimage,
            mkfs_vfat,
            mcopy,
            uboot,
        });
    }
    edge_ota::testing::skip(test, &format!("missing {}", missing.join(", ")));
    None
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The console so far, shared with the thread that reads QEMU's stdout.
#[derive(Default)]
struct Console {
    text: Mutex<String>,
    grew: Condvar,
}

/// One QEMU run of U-Boot; killed on drop so a failing test leaves no VM behind.
struct Qemu {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Console>,
    reader: Option<JoinHandle<()>>,
    /// Which run this is, for failure messages.
    name: String,
}

impl Qemu {
    /// Starts U-Boot with `env_img` as the second flash bank and `disk` (if any) as a virtio
    /// disk. `interactive`: keep stdin open to type at the U-Boot prompt.
    fn start(
        name: &str,
        tools: &Tools,
        env_img: &Path,
        disk: Option<&Path>,
        interactive: bool,
    ) -> Qemu {
        let mut cmd = Command::new(&tools.qemu);
        // -no-reboot: a `reset` (from the script or a U-Boot panic) ends the run instead of
        // booting again, so one run is one boot.
        cmd.args(
            "-M virt -cpu cortex-a57 -accel tcg -m 256 -smp 1 -nodefaults -no-user-config \
             -display none -nic none -serial stdio -no-reboot"
                .split_whitespace(),
        )
        .arg("-bios")
        .arg(&tools.uboot)
        .arg("-drive")
        .arg(format!(
            "if=pflash,index=1,format=raw,file={}",
            env_img.display()
        ));
        if let Some(disk) = disk {
            cmd.arg("-drive")
                .arg(format!("if=virtio,format=raw,file={}", disk.display()));
        }
        cmd.stdin(if interactive {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", tools.qemu.display()));
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let console = Arc::new(Console::default());
        let c = console.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // U-Boot ends lines with \r\n; drop the \r so patterns can use \n.
                let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                c.text.lock().unwrap().push_str(&chunk);
                c.grew.notify_all();
            }
            c.grew.notify_all();
        });
        Qemu {
            child,
            stdin,
            console,
            reader: Some(reader),
            name: name.to_string(),
        }
    }

    /// Waits until `pattern` is on the console; panics with the console on timeout or exit.
    fn wait_for(&mut self, pattern: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut text = self.console.text.lock().unwrap();
        while !text.contains(pattern) {
            let now = Instant::now();
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if now >= deadline || exited {
                panic!(
                    "{}: {pattern:?} not seen on the U-Boot console within {timeout:?} (QEMU \
                     exited: {exited}); console:\n{}",
                    self.name, *text
                );
            }
            // Short waits: QEMU exiting does not signal the condvar until stdout closes.
            let step = (deadline - now).min(Duration::from_millis(200));
            text = self.console.grew.wait_timeout(text, step).unwrap().0;
        }
    }

    fn send(&mut self, keys: &str) {
        let stdin = self.stdin.as_mut().expect("started interactive");
        stdin.write_all(keys.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for QEMU to exit on its own (poweroff) and returns the whole console.
    fn wait_exit(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("polling QEMU") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{}: QEMU still running after {timeout:?} (no poweroff); console:\n{}",
                    self.name,
                    self.console.text.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // QEMU has exited: stdout is closed, so the reader ends promptly with all the output.
        if let Some(reader) = self.reader.take() {
            reader.join().expect("console reader");
        }
        let text = self.console.text.lock().unwrap().clone();
        assert!(
            status.success(),
            "{}: QEMU exited with {status}; console:\n{text}",
            self.name
        );
        text
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A blank 64 MiB flash bank and the edge-ota store over its environment area.
fn new_env_image(path: &Path) -> UBootEnv {
    File::create(path)
        .and_then(|f| f.set_len(PFLASH_SIZE))
        .expect("creating the flash image");
    let device = path.to_str().expect("UTF-8 temp path");
    assert!(
        !device.contains(char::is_whitespace),
        "fw_env.config cannot name {device:?}"
    );
    let config = format!("{device} {ENV_CONFIG_LINE}\n");
    let copies = parse_fw_env_config(&config).expect("parsing fw_env.config");
    // The image is private to this test: no need to take the system-wide fw_printenv lock.
    UBootEnv::new(copies)
        .expect("opening the U-Boot env")
        .with_lock_file(None)
}

/// U-Boot's default environment, as U-Boot itself saves it, read with edge-ota's reader.
/// Made once per test binary (one extra boot); every scenario starts from it.
fn default_env(tools: &Tools) -> Vars {
    static TEMPLATE: OnceLock<Vars> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("env.img");
            let env = new_env_image(&img);
            let mut vm = Qemu::start("template", tools, &img, None, true);
            vm.wait_for("Hit any key to stop autoboot", BOOT_TIMEOUT);
            vm.send(" ");
            vm.wait_for("=> ", BOOT_TIMEOUT);
            vm.send("saveenv\n");
            vm.wait_for("\nOK\n", BOOT_TIMEOUT);
            vm.send("poweroff\n");
            let console = vm.wait_exit(BOOT_TIMEOUT);
            // A blank flash has no valid environment; anything else means a wrong image.
            assert!(
                console.contains("Loading Environment from Flash... *** Warning - bad CRC"),
                "U-Boot did not find the blank flash blank:\n{console}"
            );
            let vars = env
                .load()
                .expect("edge-ota reads the environment U-Boot saved (single layout)");
            assert_eq!(
                vars.get("bootcmd").map(String::as_str),
                Some("run distro_bootcmd"),
                "U-Boot's default environment boots with distro boot: {vars:?}"
            );
            assert!(
                !vars.keys().any(|k| k.starts_with("EDGE_")),
                "the default environment has no EDGE_* variables: {vars:?}"
            );
            vars
        })
        .clone()
}

/// One slot's protocol state.
struct Slot {
    name: &'static str,
    state: &'static str,
    tries: u32,
}

fn slot(name: &'static str, state: &'static str, tries: u32) -> Slot {
    Slot { name, state, tries }
}

/// A scenario's machine: its temp dir, disk and flash bank.
struct Rig {
    /// Holds the images; dropping it deletes them.
    _dir: tempfile::TempDir,
    tools: Tools,
    disk: PathBuf,
    env_img: PathBuf,
    env: UBootEnv,
    boots: u32,
}

impl Rig {
    /// A GPT disk with FAT `rootfs-A` and `rootfs-B` (each with `boot.scr`, and `/boot/Image`
    /// where `kernel` says so), and a flash bank holding U-Boot's default environment plus
    /// `order` and `slots`, written by edge-ota's writer.
    fn new(tools: Tools, order: &str, slots: &[Slot], kernel: [bool; 2]) -> Rig {
        let template = default_env(&tools);
        let dir = tempfile::tempdir().unwrap();
        let disk = make_disk(dir.path(), &tools, kernel);
        let env_img = dir.path().join("env.img");
        let env = new_env_image(&env_img);
        let mut vars = template;
        vars.insert("EDGE_ORDER".into(), order.into());
        for s in slots {
            vars.insert(format!("EDGE_{}_STATE", s.name), s.state.into());
            vars.insert(format!("EDGE_{}_TRIES", s.name), s.tries.to_string());
        }
        // Board settings: no 2 s autoboot countdown, and the test's stand-in for booti.
        vars.insert("bootdelay".into(), "0".into());
        vars.insert("edge_bootcmd".into(), EDGE_BOOTCMD.into());
        env.store(&vars).expect("edge-ota writes the U-Boot env");
        Rig {
            _dir: dir,
            tools,
            disk,
            env_img,
            env,
            boots: 0,
        }
    }

    /// One boot: U-Boot runs until the script's `edge_bootcmd` powers off. Returns the
    /// console, after checking that U-Boot used the stored environment (not its default) and
    /// ran boot.scr from the disk.
    fn boot(&mut self) -> String {
        self.boots += 1;
        let name = format!("boot {}", self.boots);
        let mut vm = Qemu::start(&name, &self.tools, &self.env_img, Some(&self.disk), false);
        let console = vm.wait_exit(BOOT_TIMEOUT);
        assert!(
            console.contains("Loading Environment from Flash... OK"),
            "U-Boot did not accept the stored environment:\n{console}"
        );
        assert!(
            console.contains("Found U-Boot script /boot.scr")
                && console.contains("## Executing script at"),
            "distro boot did not run boot.scr:\n{console}"
        );
        console
    }

    /// The environment now in the flash bank, read with edge-ota's reader.
    fn vars(&self) -> Vars {
        let vars = self.env.load().expect("edge-ota reads the env U-Boot left");
        for v in SCRIPT_VARS {
            assert!(
                !vars.contains_key(*v),
                "script variable {v}={:?} leaked into the saved environment",
                vars[*v]
            );
        }
        vars
    }

    /// The raw environment area, to tell whether a boot wrote it.
    fn env_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; ENV_SIZE];
        File::open(&self.env_img)
            .and_then(|f| f.read_exact_at(&mut buf, 0))
            .expect("reading the flash image");
        buf
    }
}

/// Builds `disk.img` in `dir` without root: GPT by the `gpt` crate, FAT filesystems made
/// as separate files by `mkfs.vfat -C` and `mcopy`, then copied to their partitions.
/// `rootfs-A` is partition 1: with no partition marked bootable, distro boot only scans
/// partition 1 for `boot.scr`. Both carry the script, as real rootfs images would.
fn make_disk(dir: &Path, tools: &Tools, kernel: [bool; 2]) -> PathBuf {
    const MIB: u64 = 1 << 20;
    const PART: u64 = 4 * MIB;
    let boot_scr = dir.join("boot.scr");
    run(Command::new(&tools.mkimage)
        .args(["-A", "arm64", "-O", "linux", "-T", "script", "-C", "none"])
        .args(["-n", "edge-ota boot", "-d", BOOT_CMD])
        .arg(&boot_scr));

    let path = dir.join("disk.img");
    let total = 2 * PART + 2 * MIB;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(total).unwrap();
    gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(total / 512 - 1).unwrap())
        .overwrite_lba0(&mut f)
        .unwrap();
    drop(f);
    let mut gpt = gpt::GptConfig::new().writable(true).create(&path).unwrap();
    for name in ["rootfs-A", "rootfs-B"] {
        gpt.add_partition(name, PART, gpt::partition_types::LINUX_FS, 0, Some(2048))
            .unwrap();
    }
    gpt.write().unwrap();

    for (i, s) in ["A", "B"].into_iter().enumerate() {
        let tree = dir.join(format!("tree-{s}"));
        fs::create_dir_all(&tree).unwrap();
        fs::copy(&boot_scr, tree.join("boot.scr")).unwrap();
        let mut files = vec![tree.join("boot.scr")];
        if kernel[i] {
            fs::create_dir_all(tree.join("boot")).unwrap();
            fs::write(
                tree.join("boot/Image"),
                format!("placeholder kernel of slot {s}\n"),
            )
            .unwrap();
            files.push(tree.join("boot"));
        }
        let fat = dir.join(format!("rootfs-{s}.fat"));
        run(Command::new(&tools.mkfs_vfat)
            .arg("-C")
            .arg(&fat)
            .arg((PART / 1024).to_string()));
        run(Command::new(&tools.mcopy)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-s")
            .arg("-i")
            .arg(&fat)
            .args(&files)
            .arg("::/"));
        let (_, offset, len) = edge_ota::slot::find_partition(&path, &format!("rootfs-{s}"))
            .expect("partition just written");
        let bytes = fs::read(&fat).unwrap();
        assert!(
            bytes.len() as u64 <= len,
            "FAT image larger than its partition"
        );
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|d| d.write_all_at(&bytes, offset))
            .unwrap();
    }
    path
}

/// The slot `edge_bootcmd` reported, checking that exactly one boot happened and that the
/// kernel arguments name that slot's partition.
fn booted_slot(console: &str) -> String {
    let boots: Vec<&str> = console
        .lines()
        .filter_map(|l| l.strip_prefix(MARKER))
        .collect();
    assert_eq!(
        boots.len(),
        1,
        "expected exactly one boot in this run:\n{console}"
    );
    let (slot, args) = boots[0]
        .split_once(" bootargs=")
        .unwrap_or_else(|| panic!("malformed marker {:?}", boots[0]));
    assert_eq!(
        args.trim_end(),
        format!("ro rootwait root=PARTLABEL=rootfs-{slot} edgeota.slot={slot}"),
        "kernel arguments of slot {slot}"
    );
    slot.to_string()
}

/// How many times U-Boot saved the environment during this run.
fn saves(console: &str) -> usize {
    console.matches("Saving Environment to Flash...").count()
}

/// Index of `needle` in `console`, failing the test when it is absent.
fn at(console: &str, needle: &str) -> usize {
    console
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not on the console:\n{console}"))
}

fn get<'a>(vars: &'a Vars, key: &str) -> &'a str {
    vars.get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{key} missing from the environment: {vars:?}"))
}

/// The whole protocol state of both slots: U-Boot may only have changed what a test expects.
fn assert_protocol(vars: &Vars, order: &str, a: (&str, &str), b: (&str, &str)) {
    assert_eq!(get(vars, "EDGE_ORDER"), order);
    assert_eq!(get(vars, "EDGE_A_STATE"), a.0);
    assert_eq!(get(vars, "EDGE_A_TRIES"), a.1);
    assert_eq!(get(vars, "EDGE_B_STATE"), b.0);
    assert_eq!(get(vars, "EDGE_B_TRIES"), b.1);
}

#[test]
fn uboot_new_slot_uses_its_tries_then_falls_back() {
    let Some(tools) = tools_or_skip("uboot_new_slot_uses_its_tries_then_falls_back") else {
        return;
    };
    let mut rig = Rig::new(
        tools,
        "B A",
        &[slot("A", "good", 0), slot("B", "trying", 2)],
        [true, true],
    );

    // Boots 1 and 2: B is tried, and each try is saved before B boots.
    for left in [1, 0] {
        let console = rig.boot();
        assert_eq!(
            booted_slot(&console),
            "B",
            "boot with {left} tries left after it"
        );
        assert_eq!(saves(&console), 1, "one save per try:\n{console}");
        let tried = at(
            &console,
            &format!("edge-ota: trying slot B, {left} tries left after this boot"),
        );
        assert!(
            tried < at(&console, "Saving Environment to Flash...")
                && at(&console, "Saving Environment to Flash...") < at(&console, MARKER),
            "the try must be saved before B boots:\n{console}"
        );
        let vars = rig.vars();
        assert_protocol(&vars, "B A", ("good", "0"), ("trying", &left.to_string()));
    }

    // Boot 3: B is out of tries, A (good) boots, and nothing is written.
    let before = rig.env_bytes();
    let console = rig.boot();
    assert_eq!(booted_slot(&console), "A", "fallback to the good slot");
    at(
        &console,
        "edge-ota: skipping slot B (state trying, tries 0)",
    );
    at(&console, "edge-ota: slot A is good");
    assert_eq!(
        saves(&console),
        0,
        "a good slot boots without a save:\n{console}"
    );
    assert!(
        rig.env_bytes() == before,
        "the environment changed on a boot that must not write it"
    );
    assert_protocol(&rig.vars(), "B A", ("good", "0"), ("trying", "0"));
}

#[test]
fn uboot_missing_kernel_counts_a_try_and_boots_the_good_slot() {
    let Some(tools) = tools_or_skip("uboot_missing_kernel_counts_a_try_and_boots_the_good_slot")
    else {
        return;
    };
    let mut rig = Rig::new(
        tools,
        "B A",
        &[slot("A", "good", 0), slot("B", "trying", 2)],
        [true, false],
    );

    let console = rig.boot();
    assert_eq!(
        booted_slot(&console),
        "A",
        "the good slot boots in the same run"
    );
    assert_eq!(saves(&console), 1, "only B's try is saved:\n{console}");
    // In this order: B's try saved, B's kernel fails to load, then A boots.
    let steps = [
        "edge-ota: trying slot B, 1 tries left after this boot",
        "Saving Environment to Flash...",
        "edge-ota: booting slot B from virtio 0:",
        "Failed to load '/boot/Image'",
        "edge-ota: ERROR: could not boot slot B",
        "edge-ota: slot A is good",
        "edge-ota: booting slot A from virtio 0:",
        MARKER,
    ];
    let positions: Vec<usize> = steps.iter().map(|s| at(&console, s)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "steps out of order ({steps:?} at {positions:?}):\n{console}"
    );
    assert_protocol(&rig.vars(), "B A", ("good", "0"), ("trying", "1"));
}

#[test]
fn uboot_failed_slot_leaves_no_script_variables_in_the_next_save() {
    let Some(tools) =
        tools_or_skip("uboot_failed_slot_leaves_no_script_variables_in_the_next_save")
    else {
        return;
    };
    // B fails after the script has set edge_part, bootargs, edge_fdt_addr and
    // edge_initrd_arg for it; A, trying too, is saved next: that save must not carry them
    // (Rig::vars checks), or the next boot would start with B's leftovers.
    let mut rig = Rig::new(
        tools,
        "B A",
        &[slot("A", "trying", 3), slot("B", "trying", 2)],
        [true, false],
    );

    let console = rig.boot();
    assert_eq!(booted_slot(&console), "A");
    assert_eq!(saves(&console), 2, "one save per try:\n{console}");
    let steps = [
        "edge-ota: trying slot B, 1 tries left after this boot",
        "edge-ota: ERROR: could not boot slot B",
        "edge-ota: trying slot A, 2 tries left after this boot",
        MARKER,
    ];
    let positions: Vec<usize> = steps.iter().map(|s| at(&console, s)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "steps out of order ({steps:?} at {positions:?}):\n{console}"
    );
    assert_protocol(&rig.vars(), "B A", ("trying", "2"), ("trying", "1"));
}

#[test]
fn uboot_nothing_bootable_uses_the_last_resort() {
    let Some(tools) = tools_or_skip("uboot_nothing_bootable_uses_the_last_resort") else {
        return;
    };
    let mut rig = Rig::new(
        tools,
        "B A",
        &[slot("A", "bad", 0), slot("B", "bad", 0)],
        [true, true],
    );

    let before = rig.env_bytes();
    let console = rig.boot();
    assert_eq!(booted_slot(&console), "B", "the first slot of EDGE_ORDER");
    let steps = [
        "edge-ota: skipping slot B (state bad, tries 0)",
        "edge-ota: skipping slot A (state bad, tries 0)",
        "edge-ota: WARNING: no bootable slot in EDGE_ORDER (B A), booting B as a last resort",
        MARKER,
    ];
    let positions: Vec<usize> = steps.iter().map(|s| at(&console, s)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "steps out of order ({steps:?} at {positions:?}):\n{console}"
    );
    assert_eq!(
        saves(&console),
        0,
        "the last resort writes nothing:\n{console}"
    );
    assert!(
        rig.env_bytes() == before,
        "the environment changed on a boot that must not write it"
    );
    assert_protocol(&rig.vars(), "B A", ("bad", "0"), ("bad", "0"));
}
