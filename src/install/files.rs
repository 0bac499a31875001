//! File payloads (kernel, container images, plain files) of one slot: written into a fresh
//! staging directory beside the slot's `files_dir`, read back and compared with their signed
//! hashes, then swapped in atomically (`renameat2(RENAME_EXCHANGE)`), so the slot's directory
//! holds exactly the bundle's files and nothing of an older bundle. Every path is resolved
//! beneath the staging directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: no
//! symlink, `..` or absolute path can lead a write outside it, whatever the directory holds.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::bundle::Digest;
use crate::error::{Error, IoContext, Result};

/// A staging directory being filled for one slot.
pub struct Staging {
    files_dir: PathBuf,
    staging: PathBuf,
    dir: OwnedFd,
    /// Directories created (relative), to fsync before the swap.
    made: Vec<PathBuf>,
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
}

/// `openat2` beneath `dir`, as an owned descriptor.
fn open_beneath(dir: &OwnedFd, rel: &Path, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(resolve_flags());
    let fd = nix::fcntl::openat2(dir.as_raw_fd(), rel, how)?;
    // SAFETY: openat2 just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Staging {
    /// Start a fresh staging directory `<files_dir>.staging` (a leftover of an interrupted
    /// apply is removed first: it never holds anything that counts).
    pub fn begin(files_dir: &Path) -> Result<Staging> {
        let name = files_dir
            .file_name()
            .ok_or_else(|| Error::Slot(format!("files_dir {} has no name", files_dir.display())))?;
        let mut staging_name = name.to_os_string();
        staging_name.push(".staging");
        let staging = files_dir.with_file_name(staging_name);
        let parent = crate::fsutil::parent_dir(files_dir);
        std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        match std::fs::symlink_metadata(&staging) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&staging),
            Ok(_) => std::fs::remove_file(&staging),
            Err(_) => Ok(()),
        }
        .ctx(|| format!("removing a leftover {}", staging.display()))?;
        std::fs::create_dir(&staging).ctx(|| format!("creating {}", staging.display()))?;
        let dir = File::open(&staging)
            .ctx(|| format!("opening {}", staging.display()))?
            .into();
        Ok(Staging {
            files_dir: files_dir.to_path_buf(),
            staging,
            dir,
            made: Vec::new(),
        })
    }

    /// Create the file `rel` (a plain relative path, checked by the manifest) for writing,
    /// with its parent directories.
    pub fn create(&mut self, rel: &Path) -> Result<File> {
        let mut sofar = PathBuf::new();
        let comps: Vec<&OsStr> = rel
            .components()
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(Error::Format(format!(
                    "payload target {} is not a plain relative path",
                    rel.display()
                ))),
            })
            .collect::<Result<_>>()?;
        let (file, dirs) = comps
            .split_last()
            .ok_or_else(|| Error::Format(format!("payload target {} is empty", rel.display())))?;
        for d in dirs {
            sofar.push(d);
            match nix::sys::stat::mkdirat(
                Some(self.dir.as_raw_fd()),
                &sofar,
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) => self.made.push(sofar.clone()),
                Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("creating {}", self.staging.join(&sofar).display()),
                        e.into(),
                    ))
                }
            }
        }
        sofar.push(file);
        let fd = open_beneath(
            &self.dir,
            &sofar,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| {
            Error::io(
                format!("creating {}", self.staging.join(&sofar).display()),
                e.into(),
            )
        })?;
        Ok(File::from(fd))
    }

    /// Create `rel` with `bytes`, synced (a small file the updater itself derives, such as
    /// the container image index).
    pub fn write_file(&mut self, rel: &Path, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let mut f = self.create(rel)?;
        let path = self.staging.join(rel);
        f.write_all(bytes)
            .ctx(|| format!("writing {}", path.display()))?;
        f.sync_all().ctx(|| format!("syncing {}", path.display()))
    }

    /// Read `rel` back and compare it with the signed size and hash.
    pub fn verify(&self, payload: &str, rel: &Path, size: u64, blake3: &Digest) -> Result<()> {
        let shown = self.staging.join(rel);
        let fd = open_beneath(&self.dir, rel, OFlag::O_RDONLY, Mode::empty())
            .map_err(|e| Error::io(format!("reading back {}", shown.display()), e.into()))?;
        let mut f = File::from(fd);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f
                .read(&mut buf)
                .ctx(|| format!("reading back {}", shown.display()))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            hasher.update(&buf[..k]);
        }
        if n != size || hasher.finalize().as_bytes() != &blake3.0 {
            return Err(Error::Tampered {
                payload: payload.to_string(),
                what: format!(
                    "read back from {} does not match the signed hash",
                    shown.display()
                ),
            });
        }
        Ok(())
    }

    /// Make the staged tree durable and swap it in for `files_dir` in one rename; the old
    /// tree is removed afterwards.
    pub fn commit(self) -> Result<()> {
        for d in self.made.iter().rev() {
            let fd = open_beneath(
                &self.dir,
                d,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .map_err(|e| {
                Error::io(
                    format!("opening {}", self.staging.join(d).display()),
                    e.into(),
                )
            })?;
            nix::unistd::fsync(fd.as_fd().as_raw_fd()).map_err(|e| {
                Error::io(
                    format!("syncing {}", self.staging.join(d).display()),
                    e.into(),
                )
            })?;
        }
        nix::unistd::fsync(self.dir.as_raw_fd())
            .map_err(|e| Error::io(format!("syncing {}", self.staging.display()), e.into()))?;
        let exists = std::fs::symlink_metadata(&self.files_dir).is_ok();
        if exists {
            nix::fcntl::renameat2(
                None,
                &self.staging,
                None,
                &self.files_dir,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
        } else {
            nix::fcntl::renameat(None, &self.staging, None, &self.files_dir)
        }
        .map_err(|e| {
            Error::io(
                format!(
                    "swapping {} into {}",
                    self.staging.display(),
                    self.files_dir.display()
                ),
                e.into(),
            )
        })?;
        crate::fsutil::sync_dir(crate::fsutil::parent_dir(&self.files_dir))?;
        if exists {
            // What was the slot's directory is now at the staging path.
            match std::fs::symlink_metadata(&self.staging) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&self.staging),
                Ok(_) => std::fs::remove_file(&self.staging),
                Err(_) => Ok(()),
            }
            .ctx(|| format!("removing the old {}", self.staging.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn staged_files_replace_the_whole_directory() {
        let d = tempfile::tempdir().unwrap();
        let files = d.path().join("slotB");
        std::fs::create_dir_all(files.join("images")).unwrap();
        std::fs::write(files.join("images/old.tar"), b"old bundle").unwrap();
        let mut st = Staging::begin(&files).unwrap();
        st.create(Path::new("boot/vmlinuz"))
            .unwrap()
            .write_all(b"kernel")
            .unwrap();
        st.verify("k", Path::new("boot/vmlinuz"), 6, &Digest::of(b"kernel"))
            .unwrap();
        st.commit().unwrap();
        assert_eq!(
            std::fs::read(files.join("boot/vmlinuz")).unwrap(),
            b"kernel"
        );
        assert!(
            !files.join("images/old.tar").exists(),
            "older bundle's file left"
        );
        assert!(!d.path().join("slotB.staging").exists());
    }

    #[test]
    fn symlink_planted_in_staging_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let files = d.path().join("slotB");
        let mut st = Staging::begin(&files).unwrap();
        std::os::unix::fs::symlink(&outside, d.path().join("slotB.staging/boot")).unwrap();
        let e = st.create(Path::new("boot/vmlinuz")).unwrap_err();
        assert!(e.to_string().contains("creating"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn read_back_mismatch_is_tampering() {
        let d = tempfile::tempdir().unwrap();
        let mut st = Staging::begin(&d.path().join("s")).unwrap();
        st.create(Path::new("f"))
            .unwrap()
            .write_all(b"abc")
            .unwrap();
        let e = st
            .verify("f", Path::new("f"), 3, &Digest::of(b"abd"))
            .unwrap_err();
        assert_eq!(e.exit_code(), 16);
    }
}
