//! Byte-reproducible ext2/ext4 images from a [`Tree`] with `mke2fs -d` (no mount, no root).
//!
//! `mke2fs -d` copies each source file's ctime (which nobody can set) and owner, so after it
//! runs, `debugfs -w` rewrites every inode's times and owner; mke2fs's own timestamps come from
//! `E2FSPROGS_FAKE_TIME`, the UUID and directory hash seed are given. The features are fixed by
//! our own mke2fs.conf so the host's /etc/mke2fs.conf cannot change the result.

use std::fs;
use std::path::Path;

use super::tree::Tree;
use super::util::{self, command, invalid, run, tool, IoContext, Result};

/// mke2fs settings, independent of the host. 4 KiB blocks everywhere: the delta updater reuses
/// 4 KiB-aligned chunks, and GRUB reads these features (it cannot read erofs).
const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text2 = {
\t}
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tsmall = {
\t\tinode_ratio = 4096
\t}
\tfloppy = {
\t\tinode_ratio = 8192
\t}
";

pub struct FsOpts<'a> {
    /// "ext4" or "ext2".
    pub fs_type: &'a str,
    pub label: &'a str,
    pub uuid: &'a str,
    pub hash_seed: &'a str,
    pub epoch: u64,
    pub size_bytes: u64,
    /// ext4 only: read-only slots need no journal; the data partition wants one.
    pub journal: bool,
    /// Blocks reserved for root, in percent.
    pub reserved_percent: u32,
}

/// Build `out` (replaced) holding exactly `tree`. `scratch` is a private empty-able directory.
pub fn make_image(tree: &Tree, out: &Path, opts: &FsOpts, scratch: &Path) -> Result<()> {
    util::remove_any(scratch)?;
    fs::create_dir_all(scratch).ctx(|| format!("creating {}", scratch.display()))?;
    let staging = scratch.join("root");
    tree.materialize(&staging)?;
    let conf = scratch.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).ctx(|| format!("writing {}", conf.display()))?;

    util::remove_any(out)?;
    let f = fs::File::create(out).ctx(|| format!("creating {}", out.display()))?;
    f.set_len(opts.size_bytes)
        .ctx(|| format!("sizing {}", out.display()))?;
    drop(f);

    let epoch = opts.epoch.to_string();
    let mut ext = format!(
        "root_owner=0:0,hash_seed={},lazy_itable_init=0,nodiscard",
        opts.hash_seed
    );
    let mut cmd = command(tool("mke2fs")?);
    cmd.env("MKE2FS_CONFIG", &conf)
        .env("E2FSPROGS_FAKE_TIME", &epoch)
        .env("SOURCE_DATE_EPOCH", &epoch)
        .args(["-q", "-F", "-t", opts.fs_type, "-b", "4096"])
        .args(["-L", opts.label, "-U", opts.uuid])
        .arg("-m")
        .arg(opts.reserved_percent.to_string());
    if opts.fs_type == "ext4" {
        if opts.journal {
            ext.push_str(",lazy_journal_init=0");
        } else {
            cmd.args(["-O", "^has_journal"]);
        }
    }
    cmd.arg("-E").arg(ext).arg("-d").arg(&staging).arg(out);
    run(&mut cmd)?;

    // Owner root and the fixed time on every inode we created.
    let mut script = String::new();
    for p in tree.paths() {
        if p.contains('"') || p.contains('\n') {
            return Err(invalid(format!(
                "{p:?}: unsupported character in image path"
            )));
        }
        for field in ["atime", "mtime", "ctime", "crtime"] {
            script.push_str(&format!("sif \"/{p}\" {field} @{epoch}\n"));
        }
        script.push_str(&format!("sif \"/{p}\" uid 0\nsif \"/{p}\" gid 0\n"));
    }
    let script_path = scratch.join("fixup.debugfs");
    fs::write(&script_path, script).ctx(|| format!("writing {}", script_path.display()))?;
    let out_text = command(tool("debugfs")?)
        .env("E2FSPROGS_FAKE_TIME", &epoch)
        .env("SOURCE_DATE_EPOCH", &epoch)
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(out)
        .output()
        .ctx(|| "running debugfs".to_string())?;
    // debugfs exits 0 even when a request fails; its complaints go to stderr.
    let stderr = String::from_utf8_lossy(&out_text.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !out_text.status.success() || !errors.is_empty() {
        return Err(invalid(format!(
            "running debugfs -w -f {} {}: {}",
            script_path.display(),
            out.display(),
            errors.join("; ")
        )));
    }
    util::remove_any(scratch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_image() {
        if tool("mke2fs").is_err() || tool("debugfs").is_err() {
            eprintln!("skipped: mke2fs/debugfs not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new();
        t.file_bytes("etc/os-release", "VERSION_ID=1\n", 0o644)
            .unwrap();
        t.symlink("bin/sh", "busybox").unwrap();
        let opts = FsOpts {
            fs_type: "ext4",
            label: "t",
            uuid: "6a1f0e3c-8d2b-4b7e-9f10-2c3d4e5f6a7b",
            hash_seed: "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3",
            epoch: 1_700_000_000,
            size_bytes: 8 << 20,
            journal: false,
            reserved_percent: 0,
        };
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        make_image(&t, &a, &opts, &dir.path().join("s1")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        make_image(&t, &b, &opts, &dir.path().join("s2")).unwrap();
        assert_eq!(util::hash_file(&a).unwrap(), util::hash_file(&b).unwrap());
    }
}
