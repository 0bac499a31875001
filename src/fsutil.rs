//! Durable file replacement, the one helper every writer of state, boot files and payloads
//! uses: write a temporary file in the same directory, fsync it, rename it over the target,
//! fsync the directory. A power cut leaves the old file or the new one, never a mix.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A failed file-system step, with the object it was about.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct FsError {
    pub context: String,
    #[source]
    pub source: std::io::Error,
}

fn err(context: String) -> impl FnOnce(std::io::Error) -> FsError {
    move |source| FsError { context, source }
}

/// The directory a path lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// fsync a directory, so a rename or create in it survives a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err(format!("syncing directory {}", dir.display())))
}

/// Make a fully written temporary file (created in `path`'s directory) durable as `path`.
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), FsError> {
    tmp.as_file()
        .sync_all()
        .map_err(err(format!("syncing {}", tmp.path().display())))?;
    tmp.persist(path).map_err(|e| FsError {
        context: format!("renaming into {}", path.display()),
        source: e.error,
    })?;
    // The power-loss test cuts here: renamed, the directory not yet synced.
    crate::failpoint::hit("after-rename");
    sync_dir(parent_dir(path))
}

/// Replace `path` with `bytes` atomically and durably, with permissions `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err(format!(
        "creating a temporary file in {}",
        dir.display()
    )))?;
    tmp.write_all(bytes)
        .and_then(|_| {
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
        })
        .map_err(err(format!("writing {}", tmp.path().display())))?;
    persist(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_names_it() {
        let e = write_atomic(Path::new("/nonexistent/dir/f"), b"x", 0o644).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir"), "{e}");
    }
}
