//! Helpers shared by the OS image steps: errors, external commands, stamps, fixed IDs.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What building an OS image can fail with; every message names the file or command.
#[derive(Debug, thiserror::Error)]
pub enum OsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("running {cmd}: {status}: {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl OsError {
    /// Process exit code, in the classes of edge-ota's table: 2 bad input, 4 I/O or a
    /// failing external tool.
    pub fn exit_code(&self) -> u8 {
        match self {
            OsError::Invalid(_) => 2,
            OsError::Io { .. } | OsError::Command { .. } => 4,
        }
    }
}

pub type Result<T, E = OsError> = std::result::Result<T, E>;

/// Attach a context (usually "verb path") to an I/O error.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| OsError::Io {
            context: context(),
            source,
        })
    }
}

pub fn invalid(msg: impl Into<String>) -> OsError {
    OsError::Invalid(msg.into())
}

/// Fallback timestamp when SOURCE_DATE_EPOCH is not set (2024-01-01T00:00:00Z).
pub const DEFAULT_EPOCH: u64 = 1_704_067_200;

/// The timestamp every built file gets: SOURCE_DATE_EPOCH, else [`DEFAULT_EPOCH`].
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse().map_err(|_| {
            invalid(format!(
                "SOURCE_DATE_EPOCH={v:?} is not a number of seconds"
            ))
        }),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

/// A version-4-shaped UUID derived from `seed` and `purpose`, so rebuilds get identical IDs
/// and different purposes (disk, each partition, each filesystem) never collide.
pub fn uuid_from_seed(seed: &str, purpose: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"edge-ota-image uuid\0");
    h.update(seed.as_bytes());
    h.update(b"\0");
    h.update(purpose.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize().as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// `<path>.<suffix>` next to `path` (stamps, scratch directories).
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Find an external tool; sbin directories are searched too because they are not on a normal
/// user's PATH on Debian (mke2fs, debugfs, depmod).
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(invalid(format!(
        "{name}: not found on PATH or in /usr/sbin (install it: image-builder/scripts/install-deps.sh)"
    )))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a command to completion; its stdout on success, an error naming the command, its exit
/// status and the tail of its stderr otherwise.
pub fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    run_with_input(cmd, None)
}

/// Like [`run`], feeding `input` to the command's stdin.
pub fn run_with_input(cmd: &mut Command, input: Option<&[u8]>) -> Result<Vec<u8>> {
    let desc = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().ctx(|| format!("running {desc}"))?;
    if let Some(data) = input {
        // Written from a thread so a command that fills its stdout pipe cannot deadlock us.
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let data = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().ctx(|| format!("running {desc}"))?;
        writer
            .join()
            .map_err(|_| invalid(format!("running {desc}: stdin writer panicked")))?
            .ctx(|| format!("writing stdin of {desc}"))?;
        return finish(desc, out);
    }
    let out = child.wait_with_output().ctx(|| format!("running {desc}"))?;
    finish(desc, out)
}

fn finish(desc: String, out: std::process::Output) -> Result<Vec<u8>> {
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    // The end of stderr carries the actual error; keep messages readable.
    let tail: String = if stderr.len() > 2000 {
        let cut = stderr.len() - 2000;
        let cut = (cut..stderr.len())
            .find(|&i| stderr.is_char_boundary(i))
            .unwrap_or(cut);
        format!("...{}", &stderr[cut..])
    } else {
        stderr.to_string()
    };
    Err(OsError::Command {
        cmd: desc,
        status: out.status.to_string(),
        stderr: tail,
    })
}

/// Run and return stdout as text.
pub fn run_text(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    String::from_utf8(out).map_err(|_| invalid(format!("{}: output is not UTF-8", describe(cmd))))
}

pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    // Messages from apt, mke2fs and friends stay parseable and in English.
    c.env("LC_ALL", "C");
    c
}

/// BLAKE3 of a file's contents.
pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut f = fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// BLAKE3 over a directory tree: sorted relative paths, kinds, modes and contents.
pub fn hash_tree(root: &Path) -> Result<blake3::Hash> {
    use std::os::unix::fs::PermissionsExt;
    let mut h = blake3::Hasher::new();
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths)?;
    for rel in paths {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).ctx(|| format!("reading {}", p.display()))?;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(&md.permissions().mode().to_le_bytes());
        if md.file_type().is_symlink() {
            let t = fs::read_link(&p).ctx(|| format!("reading link {}", p.display()))?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if md.is_file() {
            h.update(hash_file(&p)?.as_bytes());
        }
        h.update(b"\0");
    }
    Ok(h.finalize())
}

/// Every path under `root` (relative, sorted, parents before children).
pub fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .ctx(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .ctx(|| format!("listing {}", dir.display()))?;
    names.sort();
    for name in names {
        let r = rel.join(&name);
        let is_dir = fs::symlink_metadata(root.join(&r))
            .ctx(|| format!("reading {}", root.join(&r).display()))?
            .is_dir();
        out.push(r.clone());
        if is_dir {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

/// The cache record of one output: a digest of everything it was built from, and a digest of
/// the output itself (so an output modified after the build, e.g. a disk a VM booted from, is
/// rebuilt rather than trusted).
pub struct Stamp {
    hasher: blake3::Hasher,
}

impl Stamp {
    pub fn new(step: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"edge-ota-image os stamp v1\0");
        hasher.update(env!("CARGO_PKG_VERSION").as_bytes());
        hasher.update(b"\0");
        hasher.update(step.as_bytes());
        hasher.update(b"\0");
        Stamp { hasher }
    }

    pub fn add(&mut self, key: &str, value: impl AsRef<[u8]>) -> &mut Self {
        let value = value.as_ref();
        self.hasher.update(key.as_bytes());
        self.hasher.update(b"=");
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
        self
    }

    pub fn add_file(&mut self, key: &str, path: &Path) -> Result<&mut Self> {
        let h = hash_file(path)?;
        Ok(self.add(key, h.as_bytes()))
    }

    pub fn add_tree(&mut self, key: &str, path: &Path) -> Result<&mut Self> {
        let h = hash_tree(path)?;
        Ok(self.add(key, h.as_bytes()))
    }

    pub fn digest(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }
}

/// Hash of an output: a file's contents, or a directory tree.
fn output_digest(out: &Path) -> Result<String> {
    let md = fs::metadata(out).ctx(|| format!("reading {}", out.display()))?;
    let h = if md.is_dir() {
        hash_tree(out)?
    } else {
        hash_file(out)?
    };
    Ok(h.to_hex().to_string())
}

/// Where the stamp of `out` lives: `<out>.stamp`.
pub fn stamp_path(out: &Path) -> PathBuf {
    sibling(out, "stamp")
}

/// True when `out` exists and was built from exactly these inputs and not changed since.
pub fn is_fresh(out: &Path, inputs: &str) -> Result<bool> {
    let sp = stamp_path(out);
    if !out.exists() {
        return Ok(false);
    }
    let Ok(text) = fs::read_to_string(&sp) else {
        return Ok(false);
    };
    let mut want_in = None;
    let mut want_out = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("inputs=") {
            want_in = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("output=") {
            want_out = Some(v.to_string());
        }
    }
    if want_in.as_deref() != Some(inputs) {
        return Ok(false);
    }
    Ok(want_out == Some(output_digest(out)?))
}

/// Record that `out` was built from `inputs`.
pub fn write_stamp(out: &Path, inputs: &str) -> Result<()> {
    let sp = stamp_path(out);
    let text = format!("inputs={inputs}\noutput={}\n", output_digest(out)?);
    fs::write(&sp, text).ctx(|| format!("writing {}", sp.display()))
}

/// Remove a file or directory tree if present.
pub fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            fs::remove_dir_all(path).ctx(|| format!("removing {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).ctx(|| format!("removing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx(|| format!("reading {}", path.display())),
    }
}

/// Move a finished temporary output into place, replacing the old one.
pub fn replace(tmp: &Path, out: &Path) -> Result<()> {
    if fs::symlink_metadata(out)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        remove_any(out)?;
    }
    fs::rename(tmp, out).ctx(|| format!("renaming {} to {}", tmp.display(), out.display()))
}

/// Make sure the parent directory of an output exists.
pub fn ensure_parent(out: &Path) -> Result<()> {
    if let Some(p) = out.parent() {
        if !p.as_os_str().is_empty() {
            fs::create_dir_all(p).ctx(|| format!("creating {}", p.display()))?;
        }
    }
    Ok(())
}

/// Copy `src` into `dst` at byte `offset`, skipping all-zero blocks so a sparse destination
/// stays sparse (the destination must already read as zeros there).
pub fn copy_into_sparse(
    src: &Path,
    dst: &mut fs::File,
    dst_name: &Path,
    offset: u64,
) -> Result<u64> {
    let mut f = fs::File::open(src).ctx(|| format!("opening {}", src.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).ctx(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        // Work in 64 KiB pieces: coarse enough to be fast, fine enough to keep holes.
        for (i, piece) in chunk.chunks(64 << 10).enumerate() {
            if piece.iter().all(|&b| b == 0) {
                continue;
            }
            let at = offset + pos + (i as u64) * (64 << 10);
            dst.seek(SeekFrom::Start(at))
                .and_then(|_| dst.write_all(piece))
                .ctx(|| format!("writing {} at {at}", dst_name.display()))?;
        }
        pos += n as u64;
    }
    Ok(pos)
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Print a progress line (stderr, so stdout stays clean for scripts).
pub fn note(msg: impl AsRef<str>) {
    eprintln!("edge-ota-image: {}", msg.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_stable_and_well_formed() {
        let a = uuid_from_seed("s", "disk");
        assert_eq!(a, uuid_from_seed("s", "disk"));
        assert_ne!(a, uuid_from_seed("s", "part:boot"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn stamp_tracks_inputs_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o");
        fs::write(&out, b"x").unwrap();
        let mut s = Stamp::new("t");
        s.add("k", "v");
        let d = s.digest();
        assert!(!is_fresh(&out, &d).unwrap());
        write_stamp(&out, &d).unwrap();
        assert!(is_fresh(&out, &d).unwrap());
        assert!(!is_fresh(&out, "other").unwrap());
        fs::write(&out, b"y").unwrap();
        assert!(!is_fresh(&out, &d).unwrap());
    }
}
