//! `initramfs`: busybox + modules + an /init that mounts the slot by GPT name and switches to it.

use std::fs;
use std::path::Path;

use super::kernel::{KernelDir, MODULE_PARAMS, WATCHDOG_MODULE};
use super::modules::canonical;
use super::tree::{Source, Tree};
use super::util::{self, command, invalid, note, run_with_input, tool, IoContext, Result, Stamp};
use super::{cpio, rootfs::check_static};

pub const INIT: &str = include_str!("init/initramfs-init.sh");

/// The initramfs contents for a kernel directory and a static busybox.
fn tree(k: &KernelDir, busybox: &Path) -> Result<Tree> {
    let mut t = Tree::new();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "newroot",
    ] {
        t.dir(d)?;
    }
    t.dir_mode("tmp", 0o1777)?;
    // The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    t.chardev("dev/console", 5, 1, 0o600)?;
    t.file("bin/busybox", Source::Path(busybox.to_path_buf()), 0o755)?;
    t.symlink("bin/sh", "busybox")?;
    t.file_bytes("init", INIT, 0o755)?;

    // The whole module subset with depmod's indexes: the kernel's own module requests
    // (crypto algorithms, ...) go through busybox modprobe.
    let base = format!("lib/modules/{}", k.release);
    t.add_host(&k.modules_dir(), &base)?;
    let mut list = String::new();
    for rel in &k.load_order {
        // The slot's init loads the watchdog itself, with its parameters.
        let name = canonical(rel);
        if name == WATCHDOG_MODULE {
            continue;
        }
        list.push_str(&format!("/{base}/{rel}"));
        if let Some((_, params)) = MODULE_PARAMS.iter().find(|(m, _)| *m == name) {
            list.push_str(&format!(" {params}"));
        }
        list.push('\n');
    }
    t.file_bytes("etc/edge-init/modules", list, 0o644)?;
    Ok(t)
}

pub fn build(kernel: &Path, busybox: &Path, out: &Path, force: bool) -> Result<()> {
    let k = KernelDir::open(kernel)?;
    check_static(busybox)?;
    let epoch = util::source_date_epoch()?;
    let mut stamp = Stamp::new("initramfs");
    stamp
        // Bump when what this step writes changes for the same inputs.
        .add("format", "1")
        .add("init", INIT)
        .add("params", format!("{MODULE_PARAMS:?} {WATCHDOG_MODULE}"))
        .add("epoch", epoch.to_string())
        .add_tree("kernel", &k.dir)?
        .add_file("busybox", busybox)?;
    let digest = stamp.digest();
    if !force && util::is_fresh(out, &digest)? {
        note(format!("{} is up to date", out.display()));
        return Ok(());
    }

    let t = tree(&k, busybox)?;
    let mtime = u32::try_from(epoch)
        .map_err(|_| invalid(format!("SOURCE_DATE_EPOCH {epoch} does not fit in cpio")))?;
    let archive = cpio::write(&t, mtime)?;
    // -n: no name or timestamp in the gzip header, so the output is reproducible.
    let gz = run_with_input(
        command(tool("gzip")?).args(["-n", "-9", "-c"]),
        Some(&archive),
    )?;

    util::ensure_parent(out)?;
    let tmp = util::sibling(out, "tmp");
    fs::write(&tmp, &gz).ctx(|| format!("writing {}", tmp.display()))?;
    util::replace(&tmp, out)?;
    util::write_stamp(out, &digest)?;
    note(format!(
        "initramfs {} ({} KiB, {} KiB unpacked)",
        out.display(),
        gz.len() / 1024,
        archive.len() / 1024
    ));
    Ok(())
}
