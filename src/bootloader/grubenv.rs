//! GRUB's environment block (`grubenv`), read and written natively, without `grub-editenv`.
//!
//! The block is exactly [`BLOCK_SIZE`] bytes: the [`HEADER`] line, `key=value\n` lines, then `#`
//! padding up to the end (no newline after the padding). Lines starting with `#` are comments
//! (Debian's `grub-editenv create` adds a `# WARNING: ...` line). In values, GRUB escapes `\` as
//! `\\` and a newline as `\` followed by a newline; keys are written raw.
//!
//! GRUB's `save_env` writes the file through its block list (the disk sectors it found at boot),
//! not through a file system driver, so [`GrubEnvFile`] rewrites the existing 1024 bytes in
//! place and never replaces the file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BootError, EnvStore};

/// Size of a GRUB environment block, in bytes.
pub const BLOCK_SIZE: usize = 1024;
/// The first line of every environment block.
pub const HEADER: &str = "# GRUB Environment Block\n";

/// Parses a whole environment block. Strict: anything GRUB's own tools would not have written
/// is [`BootError::Corrupt`], with the reason and `path` in the message.
pub fn parse(block: &[u8], path: &Path) -> Result<BTreeMap<String, String>, BootError> {
    let corrupt = |reason: String| BootError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if block.len() != BLOCK_SIZE {
        return Err(corrupt(format!(
            "block is {} bytes, a GRUB environment block is exactly {BLOCK_SIZE}",
            block.len()
        )));
    }
    if !block.starts_with(HEADER.as_bytes()) {
        return Err(corrupt(format!(
            "missing header line {:?}",
            HEADER.trim_end()
        )));
    }

    let mut vars = BTreeMap::new();
    let mut pos = HEADER.len();
    while pos < block.len() {
        let rest = &block[pos..];
        if rest[0] == b'#' {
            match rest.iter().position(|&b| b == b'\n') {
                // A comment line.
                Some(nl) => pos += nl + 1,
                // No newline left: this is the padding, which must be all '#'.
                None => {
                    if let Some(bad) = rest.iter().position(|&b| b != b'#') {
                        return Err(corrupt(format!(
                            "padding byte 0x{:02x} at offset {} is not '#'",
                            rest[bad],
                            pos + bad
                        )));
                    }
                    break;
                }
            }
            continue;
        }

        let line_start = pos;
        let key_end = match rest.iter().position(|&b| b == b'=' || b == b'\n') {
            Some(i) if rest[i] == b'=' => pos + i,
            _ => {
                return Err(corrupt(format!(
                    "line at offset {line_start} has no '=' (garbage before the padding?)"
                )))
            }
        };
        let key = &block[pos..key_end];
        if key.is_empty() {
            return Err(corrupt(format!(
                "line at offset {line_start} has an empty variable name"
            )));
        }
        let key = std::str::from_utf8(key)
            .map_err(|_| corrupt(format!("variable name at offset {line_start} is not UTF-8")))?;

        // The value runs to the first newline that is not escaped.
        let mut value = Vec::new();
        let mut i = key_end + 1;
        loop {
            match block.get(i) {
                None => {
                    return Err(corrupt(format!(
                        "line for {key:?} is not terminated by a newline"
                    )))
                }
                Some(b'\n') => break,
                Some(b'\\') => match block.get(i + 1) {
                    Some(&c @ (b'\\' | b'\n')) => {
                        value.push(c);
                        i += 2;
                    }
                    other => {
                        return Err(corrupt(format!(
                            "invalid escape {:?} in the value of {key:?} (only \\\\ and \\<newline> exist)",
                            other.map(|&c| c as char)
                        )))
                    }
                },
                Some(&c) => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        let value = String::from_utf8(value)
            .map_err(|_| corrupt(format!("value of {key:?} is not UTF-8")))?;
        if vars.insert(key.to_string(), value).is_some() {
            // GRUB would silently take the last one; two writers disagreeing is not normal.
            return Err(corrupt(format!("variable {key:?} appears twice")));
        }
        pos = i + 1;
    }
    Ok(vars)
}

/// Builds a full block (header, sorted `key=value` lines, `#` padding). Refuses, with
/// [`BootError::Invalid`], what GRUB could not read back identically: empty keys, keys with
/// `=`, `\`, a newline, NUL or a leading `#`; values with a newline or NUL; and anything that
/// does not fit in [`BLOCK_SIZE`] bytes. Backslashes in values are escaped as GRUB does.
pub fn serialize(vars: &BTreeMap<String, String>) -> Result<Vec<u8>, BootError> {
    let mut out = HEADER.as_bytes().to_vec();
    for (key, value) in vars {
        if key.is_empty() || key.starts_with('#') || key.contains(['=', '\\', '\n', '\0']) {
            return Err(BootError::Invalid(format!(
                "grubenv: variable name {key:?} is not storable (empty, leading '#', or contains '=', '\\', newline or NUL)"
            )));
        }
        if value.contains(['\n', '\0']) {
            return Err(BootError::Invalid(format!(
                "grubenv: value of {key:?} contains a newline or NUL"
            )));
        }
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        for &b in value.as_bytes() {
            if b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'\n');
    }
    if out.len() > BLOCK_SIZE {
        return Err(BootError::Invalid(format!(
            "grubenv: the variables need {} bytes, a GRUB environment block holds {BLOCK_SIZE}",
            out.len()
        )));
    }
    out.resize(BLOCK_SIZE, b'#');
    Ok(out)
}

/// A grubenv file (usually `/boot/grub/grubenv` or on the ESP) used as an [`EnvStore`].
#[derive(Debug, Clone)]
pub struct GrubEnvFile {
    path: PathBuf,
}

impl GrubEnvFile {
    /// Uses an existing grubenv file; nothing is read until [`EnvStore::load`].
    pub fn new(path: impl Into<PathBuf>) -> Self {
        GrubEnvFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a new grubenv file holding `vars` (replacing any file at `path`): temp file,
    /// fsync, rename, fsync of the directory. For provisioning only: GRUB must find the file
    /// afresh (its block list changes), unlike [`EnvStore::store`] which rewrites in place.
    pub fn create(
        path: impl Into<PathBuf>,
        vars: &BTreeMap<String, String>,
    ) -> Result<Self, BootError> {
        let path = path.into();
        let block = serialize(vars)?;
        super::write_atomic(&path, &block)?;
        Ok(GrubEnvFile { path })
    }
}

impl EnvStore for GrubEnvFile {
    fn load(&self) -> Result<BTreeMap<String, String>, BootError> {
        let file = File::open(&self.path).map_err(|e| BootError::io(&self.path, e))?;
        // One byte more than a block, so an oversized file is seen without reading all of it.
        let mut block = Vec::with_capacity(BLOCK_SIZE + 1);
        file.take(BLOCK_SIZE as u64 + 1)
            .read_to_end(&mut block)
            .map_err(|e| BootError::io(&self.path, e))?;
        parse(&block, &self.path)
    }

    fn store(&self, vars: &BTreeMap<String, String>) -> Result<(), BootError> {
        // Serialize first: a refused variable must leave the file untouched.
        let block = serialize(vars)?;
        // No create, no truncate: the same inode and the same disk blocks must be rewritten.
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| BootError::io(&self.path, e))?;
        let len = file
            .metadata()
            .map_err(|e| BootError::io(&self.path, e))?
            .len();
        if len != BLOCK_SIZE as u64 {
            return Err(BootError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "file is {len} bytes, not {BLOCK_SIZE}; refusing to rewrite it in place \
                     (recreate it with grub-editenv or GrubEnvFile::create)"
                ),
            });
        }
        let n = file
            .write_at(&block, 0)
            .map_err(|e| BootError::io(&self.path, e))?;
        if n != BLOCK_SIZE {
            return Err(BootError::io(
                &self.path,
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {n} of {BLOCK_SIZE} bytes"),
                ),
            ));
        }
        // Crash tests cut the power here: written, not yet synced.
        crate::failpoint::hit("boot-env-write");
        file.sync_all().map_err(|e| BootError::io(&self.path, e))
    }

    fn describe(&self) -> String {
        format!("grubenv {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn protocol_vars() -> BTreeMap<String, String> {
        vars(&[
            ("EDGE_ORDER", "A B"),
            ("EDGE_A_STATE", "good"),
            ("EDGE_A_TRIES", "0"),
            ("EDGE_B_STATE", "trying"),
            ("EDGE_B_TRIES", "3"),
        ])
    }

    /// A block made of `body` after the header, padded with '#'.
    fn block_with(body: &[u8]) -> Vec<u8> {
        let mut b = HEADER.as_bytes().to_vec();
        b.extend_from_slice(body);
        b.resize(BLOCK_SIZE, b'#');
        b
    }

    fn corrupt_reason(r: Result<BTreeMap<String, String>, BootError>) -> String {
        match r {
            Err(BootError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    const P: &str = "/test/grubenv";

    #[test]
    fn round_trip() {
        let v = protocol_vars();
        let block = serialize(&v).unwrap();
        assert_eq!(block.len(), BLOCK_SIZE);
        assert!(block.starts_with(HEADER.as_bytes()));
        assert_eq!(*block.last().unwrap(), b'#');
        assert_eq!(parse(&block, Path::new(P)).unwrap(), v);
    }

    #[test]
    fn empty_env_round_trips() {
        let block = serialize(&BTreeMap::new()).unwrap();
        assert_eq!(block, block_with(b""));
        assert!(parse(&block, Path::new(P)).unwrap().is_empty());
    }

    #[test]
    fn serialized_layout_is_sorted_lines() {
        let block = serialize(&vars(&[("b", "2"), ("a", "1"), ("e", "")])).unwrap();
        assert_eq!(block, block_with(b"a=1\nb=2\ne=\n"));
    }

    #[test]
    fn backslash_is_escaped_and_unescaped() {
        let v = vars(&[("K", r"a\b\"), ("k2", "x=y")]);
        let block = serialize(&v).unwrap();
        assert_eq!(block, block_with(b"K=a\\\\b\\\\\nk2=x=y\n"));
        assert_eq!(parse(&block, Path::new(P)).unwrap(), v);
    }

    #[test]
    fn escaped_newline_is_parsed() {
        // What grub-editenv writes for a value with a newline.
        let block = block_with(b"N=x\\\ny\n");
        assert_eq!(parse(&block, Path::new(P)).unwrap(), vars(&[("N", "x\ny")]));
    }

    #[test]
    fn comment_lines_are_skipped() {
        let block = block_with(b"# WARNING: Do not edit this file\nA=1\n#another\nB=2\n");
        assert_eq!(
            parse(&block, Path::new(P)).unwrap(),
            vars(&[("A", "1"), ("B", "2")])
        );
    }

    #[test]
    fn exactly_full_block_round_trips() {
        // Header + "A=" + value + "\n" == 1024: no padding at all, which GRUB accepts too.
        let value = "x".repeat(BLOCK_SIZE - HEADER.len() - 3);
        let v = vars(&[("A", &value)]);
        let block = serialize(&v).unwrap();
        assert_eq!(block.last(), Some(&b'\n'));
        assert_eq!(parse(&block, Path::new(P)).unwrap(), v);
    }

    #[test]
    fn corrupt_header_is_refused() {
        let mut block = serialize(&protocol_vars()).unwrap();
        block[2] = b'g';
        let reason = corrupt_reason(parse(&block, Path::new(P)));
        assert!(reason.contains("header"), "{reason}");
        assert!(corrupt_reason(parse(&[0u8; BLOCK_SIZE], Path::new(P))).contains("header"));
    }

    #[test]
    fn block_too_short_is_refused() {
        let block = serialize(&protocol_vars()).unwrap();
        let reason = corrupt_reason(parse(&block[..BLOCK_SIZE - 1], Path::new(P)));
        assert!(reason.contains("1023 bytes"), "{reason}");
        assert!(corrupt_reason(parse(b"", Path::new(P))).contains("0 bytes"));
    }

    #[test]
    fn block_too_long_is_refused() {
        let mut block = serialize(&protocol_vars()).unwrap();
        block.push(b'#');
        assert!(corrupt_reason(parse(&block, Path::new(P))).contains("1025 bytes"));
    }

    #[test]
    fn padding_garbage_is_refused() {
        let mut block = serialize(&protocol_vars()).unwrap();
        block[BLOCK_SIZE - 10] = b'x';
        let reason = corrupt_reason(parse(&block, Path::new(P)));
        assert!(
            reason.contains("padding") && reason.contains("1014"),
            "{reason}"
        );
        block[BLOCK_SIZE - 10] = 0xff;
        assert!(corrupt_reason(parse(&block, Path::new(P))).contains("0xff"));
    }

    #[test]
    fn zeroed_padding_is_refused() {
        let mut block = block_with(b"A=1\n");
        for b in &mut block[HEADER.len() + 4..] {
            *b = 0;
        }
        assert!(corrupt_reason(parse(&block, Path::new(P))).contains("no '='"));
    }

    #[test]
    fn line_without_equals_is_refused() {
        let reason = corrupt_reason(parse(&block_with(b"A=1\njunk\n"), Path::new(P)));
        assert!(reason.contains("no '='"), "{reason}");
    }

    #[test]
    fn unterminated_line_is_refused() {
        // A value that runs into the end of the block without a newline.
        let body = format!("A={}", "v".repeat(BLOCK_SIZE - HEADER.len() - 2));
        let reason = corrupt_reason(parse(&block_with(body.as_bytes()), Path::new(P)));
        assert!(reason.contains("not terminated"), "{reason}");
    }

    #[test]
    fn empty_key_is_refused() {
        assert!(corrupt_reason(parse(&block_with(b"=1\n"), Path::new(P))).contains("empty"));
    }

    #[test]
    fn non_utf8_is_refused() {
        let reason = corrupt_reason(parse(&block_with(b"A=\xff\xfe\n"), Path::new(P)));
        assert!(reason.contains("UTF-8"), "{reason}");
        let reason = corrupt_reason(parse(&block_with(b"\xc3=1\n"), Path::new(P)));
        assert!(reason.contains("UTF-8"), "{reason}");
    }

    #[test]
    fn invalid_escape_is_refused() {
        let reason = corrupt_reason(parse(&block_with(b"A=a\\xb\n"), Path::new(P)));
        assert!(reason.contains("escape"), "{reason}");
    }

    #[test]
    fn duplicate_key_is_refused() {
        let reason = corrupt_reason(parse(&block_with(b"A=1\nA=2\n"), Path::new(P)));
        assert!(reason.contains("twice"), "{reason}");
    }

    #[test]
    fn corrupt_error_names_the_path() {
        let err = parse(b"short", Path::new("/boot/grub/grubenv")).unwrap_err();
        assert!(err.to_string().contains("/boot/grub/grubenv"), "{err}");
    }

    #[test]
    fn value_too_large_is_refused() {
        let v = vars(&[("A", &"x".repeat(BLOCK_SIZE - HEADER.len() - 2))]);
        match serialize(&v) {
            Err(BootError::Invalid(msg)) => assert!(msg.contains("1025 bytes"), "{msg}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        // Escaping counts: 500 backslashes need 1000 bytes.
        let v = vars(&[("A", &"\\".repeat(500))]);
        assert!(matches!(serialize(&v), Err(BootError::Invalid(_))));
    }

    #[test]
    fn unstorable_names_and_values_are_refused() {
        for key in ["", "a=b", "a\nb", "#a", "a\\b", "a\0b"] {
            assert!(
                matches!(serialize(&vars(&[(key, "1")])), Err(BootError::Invalid(_))),
                "key {key:?}"
            );
        }
        for value in ["a\nb", "a\0b"] {
            assert!(
                matches!(
                    serialize(&vars(&[("K", value)])),
                    Err(BootError::Invalid(_))
                ),
                "value {value:?}"
            );
        }
    }

    #[test]
    fn create_load_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let env = GrubEnvFile::create(&path, &protocol_vars()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), BLOCK_SIZE as u64);
        assert_eq!(env.load().unwrap(), protocol_vars());
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let mut v = protocol_vars();
        v.insert("EDGE_B_TRIES".into(), "2".into());
        env.store(&v).unwrap();
        assert_eq!(GrubEnvFile::new(&path).load().unwrap(), v);
        assert!(env.describe().contains("grubenv"));
    }

    #[test]
    fn store_rewrites_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let env = GrubEnvFile::create(&path, &protocol_vars()).unwrap();
        let before = std::fs::metadata(&path).unwrap();
        env.store(&vars(&[("X", "1")])).unwrap();
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(before.ino(), after.ino(), "store must not replace the file");
        assert_eq!(after.len(), BLOCK_SIZE as u64);
        assert_eq!(env.load().unwrap(), vars(&[("X", "1")]));
    }

    #[test]
    fn store_refuses_wrong_size_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        std::fs::write(&path, b"# GRUB Environment Block\n").unwrap();
        let env = GrubEnvFile::new(&path);
        match env.store(&protocol_vars()) {
            Err(BootError::Corrupt { path: p, reason }) => {
                assert_eq!(p, path);
                assert!(reason.contains("25 bytes"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Untouched.
        assert_eq!(std::fs::read(&path).unwrap(), b"# GRUB Environment Block\n");
    }

    #[test]
    fn store_of_unstorable_vars_leaves_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let env = GrubEnvFile::create(&path, &protocol_vars()).unwrap();
        assert!(env.store(&vars(&[("a=b", "1")])).is_err());
        assert_eq!(env.load().unwrap(), protocol_vars());
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let env = GrubEnvFile::new(dir.path().join("nope"));
        assert!(matches!(env.load(), Err(BootError::Io { .. })));
        assert!(matches!(
            env.store(&protocol_vars()),
            Err(BootError::Io { .. })
        ));
        assert!(
            !dir.path().join("nope").exists(),
            "store must not create the file"
        );
    }

    #[test]
    fn oversized_file_is_refused_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let mut block = serialize(&protocol_vars()).unwrap();
        block.extend_from_slice(&[b'#'; 4096]);
        std::fs::write(&path, &block).unwrap();
        let reason = corrupt_reason(GrubEnvFile::new(&path).load());
        assert!(reason.contains("1025 bytes"), "{reason}");
    }

    // ---- Against Debian's real grub-editenv (grub2-common) ----

    /// The grub-editenv binary, or None after printing why the test is skipped.
    fn grub_editenv() -> Option<PathBuf> {
        let dirs = std::env::var_os("PATH").unwrap_or_default();
        let found = std::env::split_paths(&dirs)
            .chain(["/usr/bin".into(), "/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join("grub-editenv"))
            .find(|p| p.is_file());
        if found.is_none() {
            eprintln!(
                "SKIPPED: grub-editenv not found in PATH (apt-get install grub2-common); \
                 not checking against the real tool"
            );
        }
        found
    }

    /// Runs `grub-editenv FILE ARGS...` and returns its stdout.
    fn run(tool: &Path, file: &Path, args: &[&str]) -> String {
        let out = Command::new(tool).arg(file).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "grub-editenv {} {args:?} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn reads_what_grub_editenv_writes() {
        let Some(tool) = grub_editenv() else { return };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        run(&tool, &path, &["create"]);
        run(
            &tool,
            &path,
            &[
                "set",
                "EDGE_ORDER=B A",
                "EDGE_A_STATE=good",
                "EDGE_A_TRIES=0",
                "EDGE_B_STATE=trying",
                "EDGE_B_TRIES=3",
                r"back=a\b\\c",
                "eq=x=y",
                "empty=",
                "nl=line1\nline2",
            ],
        );

        let raw = std::fs::read(&path).unwrap();
        let parsed = parse(&raw, &path).unwrap();
        let mut expected = vars(&[
            ("EDGE_ORDER", "B A"),
            ("EDGE_A_STATE", "good"),
            ("EDGE_A_TRIES", "0"),
            ("EDGE_B_STATE", "trying"),
            ("EDGE_B_TRIES", "3"),
            ("back", r"a\b\\c"),
            ("eq", "x=y"),
            ("empty", ""),
        ]);
        expected.insert("nl".into(), "line1\nline2".into());
        assert_eq!(parsed, expected);

        // And after grub-editenv unset, too.
        run(&tool, &path, &["unset", "nl"]);
        expected.remove("nl");
        assert_eq!(GrubEnvFile::new(&path).load().unwrap(), expected);
    }

    #[test]
    fn grub_editenv_reads_what_we_write() {
        let Some(tool) = grub_editenv() else { return };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let mut v = protocol_vars();
        v.insert("back".into(), r"a\b\\".into());
        v.insert("eq".into(), "x=y".into());
        v.insert("empty".into(), String::new());

        // Both through create (rename) and through store (in place, over grub-editenv's file).
        GrubEnvFile::create(&path, &v).unwrap();
        let expected: String = v.iter().map(|(k, val)| format!("{k}={val}\n")).collect();
        assert_eq!(run(&tool, &path, &["list"]), expected);

        let path2 = dir.path().join("grubenv2");
        run(&tool, &path2, &["create"]);
        GrubEnvFile::new(&path2).store(&v).unwrap();
        assert_eq!(run(&tool, &path2, &["list"]), expected);

        // grub-editenv can keep editing our block, and we read its edit back.
        run(&tool, &path2, &["set", "EDGE_B_TRIES=2"]);
        v.insert("EDGE_B_TRIES".into(), "2".into());
        assert_eq!(GrubEnvFile::new(&path2).load().unwrap(), v);
    }

    #[test]
    fn grub_editenv_accepts_a_full_block() {
        let Some(tool) = grub_editenv() else { return };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let value = "x".repeat(BLOCK_SIZE - HEADER.len() - 3);
        GrubEnvFile::create(&path, &vars(&[("A", &value)])).unwrap();
        assert_eq!(run(&tool, &path, &["list"]), format!("A={value}\n"));
    }
}
