//! `kernel`: fetch Debian's kernel package with apt, verify it, and keep vmlinuz + needed modules.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::modules::ModuleIndex;
use super::util::{self, command, invalid, note, run, run_text, tool, IoContext, Result, Stamp};

/// Modules the test OS loads, and whether a kernel without them is unusable. Dependencies and
/// softdeps (crc32c for ext4, ...) are added from modules.dep; built-in ones are skipped.
pub const MODULES: &[(&str, bool)] = &[
    // disks and network under QEMU
    ("virtio_pci", true),
    ("virtio_blk", true),
    ("virtio_net", true),
    ("virtio_rng", false),
    // root, data and boot filesystems (built into the cloud kernel, a module in the generic one)
    ("ext4", true),
    // hang detection; loaded by the slot's init with its parameters
    ("softdog", true),
    // USB sticks (`-device qemu-xhci -device usb-storage`); the cloud kernel has no USB at all
    ("xhci_pci", false),
    ("ehci_pci", false),
    ("usb_storage", false),
    ("uas", false),
    ("sd_mod", false),
    // FAT-formatted sticks
    ("vfat", false),
    ("nls_cp437", false),
    ("nls_iso8859_1", false),
    ("nls_ascii", false),
    ("nls_utf8", false),
];

/// Parameters the initramfs passes when loading a module. usb-storage otherwise waits a
/// second before scanning a new stick.
pub const MODULE_PARAMS: &[(&str, &str)] = &[("usb_storage", "delay_use=0")];

/// The module the slot's init loads itself (with `soft_margin`/`nowayout`), so the initramfs
/// must not load it first.
pub const WATCHDOG_MODULE: &str = "softdog";

pub struct KernelOpts {
    pub out: PathBuf,
    pub flavour: String,
    pub package: Option<String>,
    /// apt target release (`-t`), e.g. bookworm-backports; `None`: apt's default candidate.
    pub suite: Option<String>,
    pub work_dir: PathBuf,
    pub force: bool,
}

/// What the output directory holds, as `kernel.json`.
#[derive(Serialize)]
struct Manifest<'a> {
    package: &'a str,
    version: &'a str,
    sha256: &'a str,
    kernel_release: &'a str,
    /// Relative to lib/modules/<release>/, dependencies first.
    load_order: &'a [String],
    /// Wanted modules the kernel has built in.
    builtin: Vec<&'a str>,
    /// Wanted optional modules this kernel does not have (e.g. USB in the cloud flavour).
    missing_optional: &'a [String],
}

/// One paragraph of `apt-cache show`, as key → value (first line of each field).
fn apt_fields(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            break; // only the first paragraph
        }
        if line.starts_with(' ') {
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            out.push((k.to_string(), v.trim().to_string()));
        }
    }
    out
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn apt_cache(suite: Option<&str>) -> Result<std::process::Command> {
    let mut c = command(tool("apt-cache")?);
    if let Some(s) = suite {
        c.args(["-t", s]);
    }
    Ok(c)
}

/// The version apt would install (`Candidate:` of `apt-cache policy`).
fn candidate(pkg: &str, suite: Option<&str>) -> Result<String> {
    let text = run_text(apt_cache(suite)?.args(["policy", pkg]))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)")
        .ok_or_else(|| {
            invalid(format!(
                "apt-cache policy {pkg}: no candidate version (run apt-get update?)"
            ))
        })
}

/// Resolve the flavour's metapackage to the versioned image package it depends on.
fn resolve_package(opts: &KernelOpts) -> Result<(String, String)> {
    let pkg = match &opts.package {
        Some(p) => p.clone(),
        None => {
            let meta = format!("linux-image-{}", opts.flavour);
            let ver = candidate(&meta, opts.suite.as_deref())?;
            let text = run_text(apt_cache(None)?.arg("show").arg(format!("{meta}={ver}")))?;
            let f = apt_fields(&text);
            let depends = field(&f, "Depends")
                .ok_or_else(|| invalid(format!("apt-cache show {meta}={ver}: no Depends")))?;
            depends
                .split(',')
                .map(|d| d.split_whitespace().next().unwrap_or(""))
                .find(|d| d.starts_with("linux-image-"))
                .ok_or_else(|| {
                    invalid(format!(
                        "apt-cache show {meta}={ver}: no linux-image-* in Depends: {depends}"
                    ))
                })?
                .to_string()
        }
    };
    let ver = candidate(&pkg, opts.suite.as_deref())?;
    Ok((pkg, ver))
}

fn sha256(path: &Path) -> Result<String> {
    let out = run_text(command(tool("sha256sum")?).arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("sha256sum {}: no output", path.display())))
}

/// Download `pkg=ver` into `dir` (reusing a verified earlier download) and check it against
/// the SHA256 in apt's package index.
fn download(pkg: &str, ver: &str, want_sha: &str, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let find = || -> Result<Option<PathBuf>> {
        let prefix = format!("{pkg}_");
        let mut found = None;
        for e in fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
            let e = e.ctx(|| format!("listing {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                found = Some(e.path());
            }
        }
        Ok(found)
    };
    if let Some(deb) = find()? {
        if sha256(&deb)? == want_sha {
            return Ok(deb);
        }
        util::remove_any(&deb)?;
    }
    note(format!("downloading {pkg}={ver}"));
    run(command(tool("apt-get")?)
        .current_dir(dir)
        .args(["download", "-q"])
        .arg(format!("{pkg}={ver}")))
    .map_err(|e| invalid(format!("{e} (stale package lists? run apt-get update)")))?;
    let deb = find()?.ok_or_else(|| {
        invalid(format!(
            "apt-get download {pkg}={ver}: no {pkg}_*.deb appeared in {}",
            dir.display()
        ))
    })?;
    let got = sha256(&deb)?;
    if got != want_sha {
        return Err(invalid(format!(
            "{}: SHA256 {got} does not match apt's index ({want_sha})",
            deb.display()
        )));
    }
    Ok(deb)
}

/// Store modules uncompressed (newer Debian kernels ship .ko.xz): busybox insmod then needs
/// no decompressor and the initramfs compresses them as a whole anyway. Returns the new
/// relative path.
fn decompress_module(path: &Path, rel: &str) -> Result<String> {
    let (plain, cmd): (&str, &[&str]) = if let Some(p) = rel.strip_suffix(".xz") {
        (p, &["xz", "-d", "-f", "-q"])
    } else if let Some(p) = rel.strip_suffix(".zst") {
        (p, &["zstd", "-d", "-f", "-q", "--rm"])
    } else if let Some(p) = rel.strip_suffix(".gz") {
        (p, &["gzip", "-d", "-f"])
    } else {
        return Ok(rel.to_string());
    };
    run(command(tool(cmd[0])?).args(&cmd[1..]).arg(path))?;
    Ok(plain.to_string())
}

fn read_opt(p: &Path) -> Result<String> {
    match fs::read_to_string(p) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).ctx(|| format!("reading {}", p.display())),
    }
}

pub fn build(opts: &KernelOpts) -> Result<()> {
    let (pkg, ver) = resolve_package(opts)?;
    let show = run_text(
        command(tool("apt-cache")?)
            .arg("show")
            .arg(format!("{pkg}={ver}")),
    )?;
    let f = apt_fields(&show);
    let want_sha = field(&f, "SHA256")
        .ok_or_else(|| invalid(format!("apt-cache show {pkg}={ver}: no SHA256 field")))?
        .to_ascii_lowercase();

    let mut stamp = Stamp::new("kernel");
    stamp
        // Bump when the output layout changes (2: modules stored uncompressed).
        .add("format", "2")
        .add("package", &pkg)
        .add("version", &ver)
        .add("sha256", &want_sha);
    for (m, req) in MODULES {
        stamp.add("module", format!("{m}:{req}"));
    }
    let digest = stamp.digest();
    if !opts.force && util::is_fresh(&opts.out, &digest)? {
        note(format!(
            "{} is up to date ({pkg} {ver})",
            opts.out.display()
        ));
        return Ok(());
    }

    let deb = download(&pkg, &ver, &want_sha, &opts.work_dir)?;
    let unpacked = opts.work_dir.join("unpacked");
    util::remove_any(&unpacked)?;
    note(format!("unpacking {}", deb.display()));
    run(command(tool("dpkg")?).arg("-x").arg(&deb).arg(&unpacked))?;

    // The one kernel in the package: boot/vmlinuz-<release>.
    let boot = unpacked.join("boot");
    let mut release = None;
    for e in fs::read_dir(&boot).ctx(|| format!("listing {}", boot.display()))? {
        let name = e
            .ctx(|| format!("listing {}", boot.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(r) = name.strip_prefix("vmlinuz-") {
            if release.replace(r.to_string()).is_some() {
                return Err(invalid(format!(
                    "{}: more than one vmlinuz",
                    boot.display()
                )));
            }
        }
    }
    let release = release.ok_or_else(|| invalid(format!("{}: no vmlinuz-*", boot.display())))?;
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d).join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| invalid(format!("{}: no lib/modules/{release}", deb.display())))?;
    // The package ships no modules.dep (it is made at install time): make one.
    let base = moddir
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .ok_or_else(|| invalid(format!("{}: unexpected layout", moddir.display())))?;
    run(command(tool("depmod")?).arg("-b").arg(base).arg(&release))?;

    let idx = ModuleIndex::parse(
        &read_opt(&moddir.join("modules.dep"))?,
        &read_opt(&moddir.join("modules.builtin"))?,
        &read_opt(&moddir.join("modules.alias"))?,
        &read_opt(&moddir.join("modules.softdep"))?,
    )?;
    let roots: Vec<&str> = MODULES.iter().map(|(m, _)| *m).collect();
    let (order, missing) = idx.load_order(&roots);
    let required_missing: Vec<&String> = missing
        .iter()
        .filter(|m| MODULES.iter().any(|(r, req)| *req && r == m))
        .collect();
    if !required_missing.is_empty() {
        return Err(invalid(format!(
            "{pkg} {ver}: required modules neither built in nor available: {required_missing:?}"
        )));
    }
    if !missing.is_empty() {
        note(format!(
            "warning: {pkg} lacks optional modules {} (cloud kernels have no USB: use --flavour amd64 for USB sticks)",
            missing.join(", ")
        ));
    }

    let tmp = util::sibling(&opts.out, "tmp");
    util::remove_any(&tmp)?;
    let out_mods = tmp.join("lib/modules").join(&release);
    fs::create_dir_all(&out_mods).ctx(|| format!("creating {}", out_mods.display()))?;
    let mut plain_order = Vec::new();
    for rel in &order {
        let dst = out_mods.join(rel);
        fs::create_dir_all(dst.parent().expect("module path has a parent"))
            .ctx(|| format!("creating {}", dst.display()))?;
        fs::copy(moddir.join(rel), &dst).ctx(|| format!("copying {rel}"))?;
        plain_order.push(decompress_module(&dst, rel)?);
    }
    let order = plain_order;
    for name in ["modules.builtin", "modules.builtin.modinfo"] {
        let src = moddir.join(name);
        if src.exists() {
            fs::copy(&src, out_mods.join(name)).ctx(|| format!("copying {}", src.display()))?;
        }
    }
    let mut order_text = order.join("\n");
    order_text.push('\n');
    fs::write(out_mods.join("modules.order"), &order_text)
        .ctx(|| "writing modules.order".into())?;
    // modules.dep for the subset, so busybox modprobe works in the slot (softdog).
    run(command(tool("depmod")?).arg("-b").arg(&tmp).arg(&release))?;
    fs::write(tmp.join("load-order"), &order_text).ctx(|| "writing load-order".into())?;
    fs::write(tmp.join("kernel-release"), format!("{release}\n"))
        .ctx(|| "writing kernel-release".into())?;
    fs::copy(boot.join(format!("vmlinuz-{release}")), tmp.join("vmlinuz"))
        .ctx(|| format!("copying vmlinuz-{release}"))?;
    let config = boot.join(format!("config-{release}"));
    if config.exists() {
        fs::copy(&config, tmp.join("config")).ctx(|| format!("copying {}", config.display()))?;
    }
    let builtin: Vec<&str> = roots
        .iter()
        .copied()
        .filter(|m| idx.is_builtin(m))
        .collect();
    let manifest = Manifest {
        package: &pkg,
        version: &ver,
        sha256: &want_sha,
        kernel_release: &release,
        load_order: &order,
        builtin,
        missing_optional: &missing,
    };
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| invalid(format!("encoding kernel.json: {e}")))?;
    fs::write(tmp.join("kernel.json"), json + "\n").ctx(|| "writing kernel.json".into())?;

    util::ensure_parent(&opts.out)?;
    util::replace(&tmp, &opts.out)?;
    util::write_stamp(&opts.out, &digest)?;
    // The unpacked tree is large (hundreds of MiB); the verified .deb is kept for rebuilds.
    util::remove_any(&unpacked)?;
    note(format!(
        "kernel {release} ({pkg} {ver}), {} modules -> {}",
        order.len(),
        opts.out.display()
    ));
    Ok(())
}

/// What `initramfs` and `rootfs` read from a `kernel` output directory.
pub struct KernelDir {
    pub dir: PathBuf,
    pub release: String,
    pub load_order: Vec<String>,
}

impl KernelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let rel_path = dir.join("kernel-release");
        let release = fs::read_to_string(&rel_path)
            .ctx(|| format!("reading {} (run `kernel --out` first)", rel_path.display()))?
            .trim()
            .to_string();
        let lo = dir.join("load-order");
        let load_order = fs::read_to_string(&lo)
            .ctx(|| format!("reading {}", lo.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        let k = KernelDir {
            dir: dir.to_path_buf(),
            release,
            load_order,
        };
        for p in [k.vmlinuz(), k.modules_dir()] {
            if !p.exists() {
                return Err(invalid(format!(
                    "{}: missing (rerun `kernel`)",
                    p.display()
                )));
            }
        }
        Ok(k)
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_show_first_paragraph() {
        let t = "Package: a\nVersion: 1\nDescription: x\n more\nSHA256: abc\n\nPackage: a\nSHA256: def\n";
        let f = apt_fields(t);
        assert_eq!(field(&f, "SHA256"), Some("abc"));
        assert_eq!(field(&f, "Version"), Some("1"));
    }
}
