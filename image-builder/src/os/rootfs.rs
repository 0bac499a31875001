//! `rootfs`: a slot's read-only ext4 root (busybox, kernel + initramfs, edge-ota, init).

use std::fs;
use std::path::{Path, PathBuf};

use super::ext4::{self, FsOpts};
use super::kernel::KernelDir;
use super::tree::{Source, Tree};
use super::util::{self, command, invalid, note, run_text, tool, IoContext, Result, Stamp};

pub const SLOT_INIT: &str = include_str!("init/slot-init.sh");
pub const UDHCPC_SCRIPT: &str = include_str!("init/udhcpc.script");
/// containerd's configuration (used when the image has containerd: `--add-bin`).
pub const CONTAINERD_CONFIG: &str = include_str!("init/containerd.toml");
/// The agent's respawn wrapper for busybox inits, started by the slot's init when enabled.
pub const AGENT_WRAPPER: &str = include_str!("../../../bootloader/init/edge-ota-agent");

/// How the slot's init behaves, for rollback tests.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Health gate, then watchdog feeding and a shell.
    Normal,
    /// Same init as `normal`: the failure comes from the `--config` given (a required health
    /// probe that always fails). Recorded in os-release so tests can tell images apart.
    HealthFail,
    /// PID 1 exits right after printing the slot line: kernel panic, reboot (panic=5).
    Panic,
    /// Arms the watchdog, prints `edge-init: hanging` and sleeps: softdog resets the machine.
    Hang,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Normal => "normal",
            Variant::HealthFail => "health-fail",
            Variant::Panic => "panic",
            Variant::Hang => "hang",
        }
    }
}

pub struct RootfsOpts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub edge_ota: PathBuf,
    pub config: PathBuf,
    pub version: String,
    pub variant: Variant,
    pub out: PathBuf,
    pub size_mib: u64,
    pub add: Vec<String>,
    /// Executables added with their shared libraries, `HOST_PATH=IMAGE_PATH`.
    pub add_bin: Vec<String>,
    pub busybox: PathBuf,
    pub seed: String,
    pub force: bool,
}

/// Seconds between arming softdog and its reset; the health gate must finish within it.
pub const WATCHDOG_MARGIN: u32 = 15;

/// The ELF interpreter (PT_INTERP) of `path`, or `None` for static binaries and scripts.
pub fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let data = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Ok(None);
    }
    if data[4] != 2 || data[5] != 1 {
        return Err(invalid(format!(
            "{}: only 64-bit little-endian ELF is supported",
            path.display()
        )));
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if ph + 56 > data.len() {
            return Err(invalid(format!("{}: truncated ELF header", path.display())));
        }
        if u32::from_le_bytes([data[ph], data[ph + 1], data[ph + 2], data[ph + 3]]) == 3 {
            let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
            let raw = data
                .get(off..off + size)
                .ok_or_else(|| invalid(format!("{}: bad PT_INTERP", path.display())))?;
            let s = String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_string();
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Busybox must run before any library exists (initramfs, early init).
pub fn check_static(busybox: &Path) -> Result<()> {
    if let Some(interp) = elf_interpreter(busybox)? {
        return Err(invalid(format!(
            "{}: dynamically linked (interpreter {interp}); install busybox-static",
            busybox.display()
        )));
    }
    Ok(())
}

/// Absolute paths of the shared libraries and loader a dynamic binary needs (from ldd).
fn shared_libs(bin: &Path) -> Result<Vec<String>> {
    let Some(interp) = elf_interpreter(bin)? else {
        return Ok(Vec::new());
    };
    let text = run_text(command(tool("ldd")?).arg(bin))?;
    let mut libs = vec![interp];
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(invalid(format!("ldd {}: {line}", bin.display())));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') && !libs.iter().any(|l| l == path) {
            libs.push(path.to_string());
        }
    }
    libs.sort();
    Ok(libs)
}

fn check_version(v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "--version {v:?}: use letters, digits and . _ + ~ - only"
        )))
    }
}

fn parse_add(spec: &str) -> Result<(PathBuf, String)> {
    let (src, dest) = spec
        .split_once('=')
        .ok_or_else(|| invalid(format!("--add {spec:?}: expected HOST_PATH=IMAGE_PATH")))?;
    if !dest.starts_with('/') {
        return Err(invalid(format!(
            "--add {spec:?}: the image path must be absolute"
        )));
    }
    Ok((PathBuf::from(src), dest.to_string()))
}

fn tree(o: &RootfsOpts, k: &KernelDir) -> Result<Tree> {
    let mut t = Tree::new();
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "var",
        "media/usb",
        "data",
        "mnt/boot",
        "boot",
        // hidden once the data partition is mounted on /var (init recreates it there)
        "var/lib/containerd-images",
    ] {
        t.dir(d)?;
    }
    t.dir_mode("tmp", 0o1777)?;
    t.dir_mode("root", 0o700)?;

    // busybox and its applet links; /sbin/init is ours.
    t.file("bin/busybox", Source::Path(o.busybox.clone()), 0o755)?;
    let list = run_text(command(&o.busybox).arg("--list-full"))?;
    let mut applets: Vec<&str> = list.lines().map(str::trim).collect();
    applets.sort();
    for a in applets {
        if a.is_empty() || matches!(a, "sbin/init" | "linuxrc" | "bin/busybox") {
            continue;
        }
        t.symlink(a, "/bin/busybox")?;
    }
    t.file_bytes("sbin/init", SLOT_INIT, 0o755)?;
    t.file_bytes("usr/share/udhcpc/default.script", UDHCPC_SCRIPT, 0o755)?;
    t.file_bytes("etc/containerd/config.toml", CONTAINERD_CONFIG, 0o644)?;
    t.file_bytes("usr/lib/edge-ota/edge-ota-agent", AGENT_WRAPPER, 0o755)?;

    let v = &o.version;
    let variant = o.variant.as_str();
    t.file_bytes(
        "etc/edge-init.conf",
        format!(
            "# Read by /sbin/init.\nEDGE_VERSION={v}\nEDGE_VARIANT={variant}\nEDGE_WATCHDOG_MARGIN={WATCHDOG_MARGIN}\n"
        ),
        0o644,
    )?;
    t.file_bytes(
        "etc/os-release",
        format!(
            "NAME=\"edge-ota OS\"\nID=edge-ota\nVERSION=\"{v}\"\nVERSION_ID={v}\nVARIANT_ID={variant}\nPRETTY_NAME=\"edge-ota OS {v}\"\n"
        ),
        0o644,
    )?;
    t.file_bytes(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    t.file_bytes(
        "etc/group",
        "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
        0o644,
    )?;
    t.file_bytes("etc/hostname", "edge\n", 0o644)?;
    t.symlink("etc/resolv.conf", "/run/resolv.conf")?;
    t.symlink("etc/mtab", "/proc/self/mounts")?;

    // The updater, its libraries at the paths the loader expects, and its configuration.
    t.file("usr/bin/edge-ota", Source::Path(o.edge_ota.clone()), 0o755)?;
    for lib in shared_libs(&o.edge_ota)? {
        let real = fs::canonicalize(&lib).ctx(|| format!("resolving {lib}"))?;
        t.file(&lib, Source::Path(real), 0o755)?;
    }
    t.file(
        "etc/edge-ota/config.toml",
        Source::Path(o.config.clone()),
        0o644,
    )?;

    // GRUB loads these from the slot's partition.
    t.file("boot/vmlinuz", Source::Path(k.vmlinuz()), 0o644)?;
    t.file("boot/initrd.img", Source::Path(o.initramfs.clone()), 0o644)?;
    t.add_host(&k.modules_dir(), &format!("lib/modules/{}", k.release))?;

    for spec in &o.add {
        let (src, dest) = parse_add(spec)?;
        t.add_host(&src, &dest)?;
    }
    for spec in &o.add_bin {
        let (src, dest) = parse_add(spec)?;
        t.file(&dest, Source::Path(src.clone()), 0o755)?;
        for lib in shared_libs(&src)? {
            let real = fs::canonicalize(&lib).ctx(|| format!("resolving {lib}"))?;
            t.file(&lib, Source::Path(real), 0o755)?;
        }
    }
    Ok(t)
}

pub fn build(o: &RootfsOpts) -> Result<()> {
    check_version(&o.version)?;
    check_static(&o.busybox)?;
    let k = KernelDir::open(&o.kernel)?;
    if o.size_mib == 0 {
        return Err(invalid("--size must be at least 1 MiB"));
    }
    let epoch = util::source_date_epoch()?;

    let mut stamp = Stamp::new("rootfs");
    stamp
        // Bump when what this step writes changes for the same inputs.
        .add("format", "3")
        .add("init", SLOT_INIT)
        .add("udhcpc", UDHCPC_SCRIPT)
        .add("containerd-config", CONTAINERD_CONFIG)
        .add("agent-wrapper", AGENT_WRAPPER)
        .add("watchdog-margin", WATCHDOG_MARGIN.to_string())
        .add("version", &o.version)
        .add("variant", o.variant.as_str())
        .add("size", o.size_mib.to_string())
        .add("seed", &o.seed)
        .add("epoch", epoch.to_string())
        .add_tree("kernel", &k.dir)?
        .add_file("initramfs", &o.initramfs)?
        .add_file("edge-ota", &o.edge_ota)?
        .add_file("config", &o.config)?
        .add_file("busybox", &o.busybox)?;
    for lib in shared_libs(&o.edge_ota)? {
        stamp.add_file("lib", Path::new(&lib))?;
    }
    for spec in &o.add {
        let (src, dest) = parse_add(spec)?;
        stamp.add("add", &dest);
        if src.is_dir() {
            stamp.add_tree("add-src", &src)?;
        } else {
            stamp.add_file("add-src", &src)?;
        }
    }
    for spec in &o.add_bin {
        let (src, dest) = parse_add(spec)?;
        stamp.add("add-bin", &dest).add_file("add-bin-src", &src)?;
        for lib in shared_libs(&src)? {
            stamp.add_file("lib", Path::new(&lib))?;
        }
    }
    let digest = stamp.digest();
    if !o.force && util::is_fresh(&o.out, &digest)? {
        note(format!("{} is up to date", o.out.display()));
        return Ok(());
    }

    let t = tree(o, &k)?;
    // The same UUID and hash seed for every version: ext4's metadata checksums are seeded by
    // the UUID, so a new UUID would change every inode table and directory block and defeat
    // block reuse in delta updates. Slots are found by partition name, never by UUID.
    let uuid = util::uuid_from_seed(&o.seed, "rootfs");
    let hash_seed = util::uuid_from_seed(&o.seed, "rootfs:hash");
    util::ensure_parent(&o.out)?;
    let tmp = util::sibling(&o.out, "tmp");
    ext4::make_image(
        &t,
        &tmp,
        &FsOpts {
            fs_type: "ext4",
            label: "rootfs",
            uuid: &uuid,
            hash_seed: &hash_seed,
            epoch,
            size_bytes: o.size_mib << 20,
            journal: false,
            reserved_percent: 0,
        },
        &util::sibling(&o.out, "scratch"),
    )?;
    util::replace(&tmp, &o.out)?;
    util::write_stamp(&o.out, &digest)?;
    note(format!(
        "rootfs {} (version {}, variant {}, {} MiB, uuid {uuid})",
        o.out.display(),
        o.version,
        o.variant.as_str(),
        o.size_mib
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_of_host_binaries() {
        // /bin/sh on Debian is dynamic; a text file is not ELF.
        if let Ok(Some(i)) = elf_interpreter(Path::new("/bin/sh")) {
            assert!(i.starts_with('/'), "{i}");
        }
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        fs::write(&s, "#!/bin/sh\n").unwrap();
        assert_eq!(elf_interpreter(&s).unwrap(), None);
    }

    #[test]
    fn versions_and_add_specs() {
        assert!(check_version("1.2.0-rc1").is_ok());
        assert!(check_version("1 2").is_err());
        assert!(check_version("").is_err());
        assert!(parse_add("a=/b").is_ok());
        assert!(parse_add("a=b").is_err());
        assert!(parse_add("a").is_err());
    }
}
