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
//!
//! edge-ota keeps two copies, `grubenv` and `grubenv2` ([`GrubEnvPair`]): each carries a
//! sequence number twice, `EDGE_SEQ` at the start of the block and `EDGE_END` in its second
//! 512-byte sector, so a copy whose write was cut between its sectors does not validate.
//! `grub.cfg` boots from the valid copy with the higher sequence (the first on a tie); userspace
//! writes the other copy first, then the current one, with an fsync after each, so one valid
//! copy always holds either the old or the new state.

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

impl GrubEnvFile {
    /// The file's bytes (at most one byte more than a block, so an oversized file is seen
    /// without reading all of it).
    pub fn read_block(&self) -> Result<Vec<u8>, BootError> {
        let file = File::open(&self.path).map_err(|e| BootError::io(&self.path, e))?;
        let mut block = Vec::with_capacity(BLOCK_SIZE + 1);
        file.take(BLOCK_SIZE as u64 + 1)
            .read_to_end(&mut block)
            .map_err(|e| BootError::io(&self.path, e))?;
        Ok(block)
    }

    /// Rewrite the existing block in place and fsync it.
    pub fn write_block(&self, block: &[u8]) -> Result<(), BootError> {
        debug_assert_eq!(block.len(), BLOCK_SIZE);
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
            .write_at(block, 0)
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
}

impl EnvStore for GrubEnvFile {
    fn load(&self) -> Result<BTreeMap<String, String>, BootError> {
        parse(&self.read_block()?, &self.path)
    }

    fn store(&self, vars: &BTreeMap<String, String>) -> Result<(), BootError> {
        // Serialize first: a refused variable must leave the file untouched.
        self.write_block(&serialize(vars)?)
    }

    fn describe(&self) -> String {
        format!("grubenv {}", self.path.display())
    }
}

/// Sequence number of a copy, first line after the header.
pub const SEQ: &str = "EDGE_SEQ";
/// The same number again, at [`END_AT`]: a write cut between the sectors leaves them unequal.
pub const END: &str = "EDGE_END";
/// Where the `EDGE_END` line starts: inside the block's second 512-byte sector.
pub const END_AT: usize = 960;
/// File name of the second copy, beside the first.
pub const SECOND_COPY: &str = "grubenv2";
/// Sequence numbers stay below this, so GRUB's 32-bit `-gt` on i386-pc compares them right.
pub const MAX_SEQ: u64 = 1_000_000_000;

/// One copy of a [`GrubEnvPair`] as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    Valid {
        seq: u64,
        vars: BTreeMap<String, String>,
    },
    Invalid(String),
    Missing,
}

/// Decode one copy: a well-formed block whose `EDGE_SEQ` is a decimal number equal, as text,
/// to its `EDGE_END` (exactly the test `grub.cfg` makes).
pub fn parse_copy(block: &[u8], path: &Path) -> Copy {
    let mut vars = match parse(block, path) {
        Ok(v) => v,
        Err(BootError::Corrupt { reason, .. }) => return Copy::Invalid(reason),
        Err(e) => return Copy::Invalid(e.to_string()),
    };
    let (seq, end) = (vars.remove(SEQ), vars.remove(END));
    match (seq, end) {
        // Plain decimal, no leading zero: GRUB's `-gt` reads "010" as octal.
        (Some(s), Some(e))
            if s == e
                && !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s == "0" || !s.starts_with('0')) =>
        {
            match s.parse() {
                Ok(seq) => Copy::Valid { seq, vars },
                Err(_) => Copy::Invalid(format!("{SEQ}={s:?} is out of range")),
            }
        }
        (s, e) => Copy::Invalid(format!(
            "{SEQ}={s:?} and {END}={e:?} differ or are not a number (a torn or foreign write)"
        )),
    }
}

/// Serialize one copy: header, `EDGE_SEQ`, the variables sorted, a comment line filling up to
/// [`END_AT`], `EDGE_END`, `#` padding.
pub fn serialize_copy(vars: &BTreeMap<String, String>, seq: u64) -> Result<Vec<u8>, BootError> {
    if vars.contains_key(SEQ) || vars.contains_key(END) {
        return Err(BootError::Invalid(format!(
            "grubenv: {SEQ} and {END} are the store's own"
        )));
    }
    let mut first = BTreeMap::new();
    first.insert(SEQ.to_string(), seq.to_string());
    let head = serialize(&first)?;
    let head_len = head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let body = serialize(vars)?;
    let body_len = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut out = head[..head_len].to_vec();
    out.extend_from_slice(&body[HEADER.len()..body_len]);
    // A comment line of at least "#\n" up to END_AT.
    if out.len() + 2 > END_AT {
        return Err(BootError::Invalid(format!(
            "grubenv: the variables need {} bytes, {} fit before {END}",
            out.len(),
            END_AT - 2
        )));
    }
    out.resize(END_AT - 1, b'#');
    out.push(b'\n');
    out.extend_from_slice(format!("{END}={seq}\n").as_bytes());
    out.resize(BLOCK_SIZE, b'#');
    Ok(out)
}

/// The two copies of the boot state GRUB reads (see the module doc).
#[derive(Debug, Clone)]
pub struct GrubEnvPair {
    copies: [GrubEnvFile; 2],
}

impl GrubEnvPair {
    /// `first` is the configured grubenv; the second copy is [`SECOND_COPY`] beside it.
    pub fn new(first: impl Into<PathBuf>) -> Self {
        let first = first.into();
        let second = super::file_beside(&first, SECOND_COPY);
        GrubEnvPair {
            copies: [GrubEnvFile::new(first), GrubEnvFile::new(second)],
        }
    }

    /// Provisioning: write both copies afresh (sequence 1).
    pub fn create(
        first: impl Into<PathBuf>,
        vars: &BTreeMap<String, String>,
    ) -> Result<Self, BootError> {
        let pair = Self::new(first);
        let block = serialize_copy(vars, 1)?;
        for c in &pair.copies {
            super::write_atomic(c.path(), &block)?;
        }
        Ok(pair)
    }

    pub fn paths(&self) -> [&Path; 2] {
        [self.copies[0].path(), self.copies[1].path()]
    }

    /// Both copies as they are on disk.
    pub fn read_copies(&self) -> [Copy; 2] {
        self.copies.each_ref().map(|c| match c.read_block() {
            Ok(b) => parse_copy(&b, c.path()),
            Err(BootError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Copy::Missing
            }
            Err(e) => Copy::Invalid(e.to_string()),
        })
    }

    /// Index of the copy GRUB boots from: the valid one with the higher sequence, the first
    /// on a tie. `None` when neither is valid.
    pub fn current(copies: &[Copy; 2]) -> Option<usize> {
        match (&copies[0], &copies[1]) {
            (Copy::Valid { seq: a, .. }, Copy::Valid { seq: b, .. }) => {
                Some(if b > a { 1 } else { 0 })
            }
            (Copy::Valid { .. }, _) => Some(0),
            (_, Copy::Valid { .. }) => Some(1),
            _ => None,
        }
    }

    /// Write `block` into copy `i`: in place when the file is a whole block (GRUB writes it
    /// through the sectors it found at boot), else as a new file (GRUB finds it at next boot).
    fn write_copy(&self, i: usize, block: &[u8]) -> Result<(), BootError> {
        let c = &self.copies[i];
        match std::fs::metadata(c.path()) {
            Ok(m) if m.len() == BLOCK_SIZE as u64 => c.write_block(block),
            _ => super::write_atomic(c.path(), block),
        }
    }
}

impl EnvStore for GrubEnvPair {
    fn load(&self) -> Result<BTreeMap<String, String>, BootError> {
        let copies = self.read_copies();
        match Self::current(&copies) {
            Some(i) => match &copies[i] {
                Copy::Valid { vars, .. } => Ok(vars.clone()),
                _ => unreachable!("current() returns a valid copy"),
            },
            None => Err(BootError::Corrupt {
                path: self.copies[0].path().to_path_buf(),
                reason: format!(
                    "neither copy is valid ({}: {}; {}: {})",
                    self.copies[0].path().display(),
                    describe_copy(&copies[0]),
                    self.copies[1].path().display(),
                    describe_copy(&copies[1])
                ),
            }),
        }
    }

    fn store(&self, vars: &BTreeMap<String, String>) -> Result<(), BootError> {
        let copies = self.read_copies();
        let current = Self::current(&copies);
        let seq = copies
            .iter()
            .filter_map(|c| match c {
                Copy::Valid { seq, .. } => Some(*seq),
                _ => None,
            })
            .max()
            .unwrap_or(0)
            + 1;
        if seq >= MAX_SEQ {
            return Err(BootError::Invalid(format!(
                "grubenv sequence exhausted ({seq}): provision again with init-boot-env"
            )));
        }
        let block = serialize_copy(vars, seq)?;
        // The copy GRUB would not boot from first: until the second write completes, the
        // current copy still holds the whole old state.
        let first = match current {
            Some(0) => 1,
            _ => 0,
        };
        self.write_copy(first, &block)?;
        self.write_copy(1 - first, &block)
    }

    fn describe(&self) -> String {
        format!(
            "grubenv {} (+ {})",
            self.copies[0].path().display(),
            SECOND_COPY
        )
    }

    fn check(&self) -> Vec<String> {
        let copies = self.read_copies();
        let Some(cur) = Self::current(&copies) else {
            return vec!["neither grubenv copy is valid".into()];
        };
        let other = 1 - cur;
        if copies[other] == copies[cur] {
            return Vec::new();
        }
        vec![format!(
            "grubenv copy {} ({}) {}; copy {} is current",
            other + 1,
            self.copies[other].path().display(),
            match &copies[other] {
                Copy::Valid { seq, .. } => format!("is stale (sequence {seq})"),
                c => describe_copy(c),
            },
            cur + 1
        )]
    }

    fn repair(&self) -> Result<Vec<String>, BootError> {
        let problems = self.check();
        let copies = self.read_copies();
        let Some(cur) = Self::current(&copies) else {
            return Err(BootError::Corrupt {
                path: self.copies[0].path().to_path_buf(),
                reason: "neither grubenv copy is valid: nothing to repair from".into(),
            });
        };
        if problems.is_empty() {
            return Ok(problems);
        }
        let Copy::Valid { seq, vars } = &copies[cur] else {
            unreachable!("current() returns a valid copy")
        };
        // Same sequence, same content: the pair agrees again without a newer state.
        self.write_copy(1 - cur, &serialize_copy(vars, *seq)?)?;
        Ok(problems)
    }
}

fn describe_copy(c: &Copy) -> String {
    match c {
        Copy::Valid { seq, .. } => format!("valid, sequence {seq}"),
        Copy::Invalid(why) => format!("is invalid: {why}"),
        Copy::Missing => "is missing".into(),
    }
}

/// What the real `grub.cfg` does at power-on, given the two copies (`None`: file missing):
/// the slot it boots, whether as the last resort, and the copies afterwards. Only for the
/// agreement test with `grub-emu` (tests/grub_cfg.rs) and host-side crash checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubBoot {
    pub slot: String,
    pub last_resort: bool,
    pub copies: [Option<Vec<u8>>; 2],
}

pub fn grub_boot_model(copies: [Option<Vec<u8>>; 2]) -> GrubBoot {
    let p = Path::new("model");
    let parsed = copies
        .each_ref()
        .map(|c| c.as_ref().map_or(Copy::Missing, |b| parse_copy(b, p)));
    let cur = GrubEnvPair::current(&parsed);
    let vars = match cur.map(|i| &parsed[i]) {
        Some(Copy::Valid { vars, .. }) => vars.clone(),
        _ => BTreeMap::new(),
    };
    let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
    let mut order = get("EDGE_ORDER");
    if order.is_empty() {
        order = "A B".into();
    }
    let mut out = copies.clone();
    for slot in order.split(' ').filter(|s| !s.is_empty()) {
        if slot != "A" && slot != "B" {
            continue;
        }
        let state = get(&format!("EDGE_{slot}_STATE"));
        let tries = get(&format!("EDGE_{slot}_TRIES"));
        if state == "good" {
            return GrubBoot {
                slot: slot.into(),
                last_resort: false,
                copies: out,
            };
        }
        let next = match tries.as_str() {
            "9" => "8",
            "8" => "7",
            "7" => "6",
            "6" => "5",
            "5" => "4",
            "4" => "3",
            "3" => "2",
            "2" => "1",
            "1" => "0",
            _ => continue,
        };
        if state != "trying" {
            continue;
        }
        let cur = cur.expect("a trying slot comes from a valid copy");
        let key = format!("EDGE_{slot}_TRIES");
        let mut write = |i: usize| {
            if let Copy::Valid { seq, vars } = &parsed[i] {
                let mut v = vars.clone();
                v.insert(key.clone(), next.into());
                out[i] = Some(serialize_copy(&v, *seq).expect("same layout"));
            }
        };
        write(cur);
        // grub.cfg saves the other copy too when it carries the same sequence.
        let same_seq = matches!(
            (&parsed[0], &parsed[1]),
            (Copy::Valid { seq: a, .. }, Copy::Valid { seq: b, .. }) if a == b
        );
        if same_seq {
            write(1 - cur);
        }
        return GrubBoot {
            slot: slot.into(),
            last_resort: false,
            copies: out,
        };
    }
    let first = order.split(' ').find(|s| !s.is_empty()).unwrap_or("A");
    GrubBoot {
        slot: if first == "B" { "B" } else { "A" }.into(),
        last_resort: true,
        copies: out,
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

    // ---- The redundant pair ----

    fn pair(dir: &Path) -> GrubEnvPair {
        GrubEnvPair::create(dir.join("grubenv"), &protocol_vars()).unwrap()
    }

    fn with_tries(n: &str) -> BTreeMap<String, String> {
        let mut v = protocol_vars();
        v.insert("EDGE_B_TRIES".into(), n.into());
        v
    }

    #[test]
    fn copy_layout_puts_the_end_marker_in_the_second_sector() {
        let b = serialize_copy(&protocol_vars(), 42).unwrap();
        assert_eq!(b.len(), BLOCK_SIZE);
        assert!(b[HEADER.len()..].starts_with(b"EDGE_SEQ=42\n"));
        assert_eq!(&b[END_AT..END_AT + 12], b"EDGE_END=42\n");
        assert_eq!(
            parse_copy(&b, Path::new(P)),
            Copy::Valid {
                seq: 42,
                vars: protocol_vars()
            }
        );
        // Real GRUB tools still read it.
        assert_eq!(parse(&b, Path::new(P)).unwrap()["EDGE_ORDER"], "A B");
    }

    #[test]
    fn torn_write_of_either_copy_leaves_a_valid_state() {
        let dir = tempfile::tempdir().unwrap();
        let p = pair(dir.path());
        p.store(&with_tries("2")).unwrap();
        let [first, second] = p.paths().map(Path::to_path_buf);
        // The next store (seq 3) is cut after the first sector of the copy it writes first.
        let old = std::fs::read(&second).unwrap();
        let new = serialize_copy(&with_tries("1"), 3).unwrap();
        let mut torn = new[..512].to_vec();
        torn.extend_from_slice(&old[512..]);
        std::fs::write(&second, &torn).unwrap();
        assert!(matches!(p.read_copies()[1], Copy::Invalid(_)));
        assert_eq!(p.load().unwrap(), with_tries("2"), "old state, whole");
        // Or after the first copy was written whole and the second one torn.
        std::fs::write(&second, &new).unwrap();
        let mut torn = new[..512].to_vec();
        torn.extend_from_slice(&std::fs::read(&first).unwrap()[512..]);
        std::fs::write(&first, &torn).unwrap();
        assert_eq!(p.load().unwrap(), with_tries("1"), "new state, whole");
        assert_eq!(p.check().len(), 1);
    }

    #[test]
    fn sequence_with_a_leading_zero_is_invalid_as_grub_would_misread_it() {
        let mut b = serialize_copy(&protocol_vars(), 10).unwrap();
        let at = HEADER.len() + "EDGE_SEQ=".len();
        b.splice(at..at + 2, *b"010");
        b.truncate(END_AT - 1);
        b.resize(END_AT - 1, b'#');
        b.extend_from_slice(b"\nEDGE_END=010\n");
        b.resize(BLOCK_SIZE, b'#');
        // A well-formed block, only its sequence is refused.
        assert_eq!(parse(&b, Path::new(P)).unwrap()[SEQ], "010");
        assert!(matches!(parse_copy(&b, Path::new(P)), Copy::Invalid(_)));
    }

    #[test]
    fn store_writes_the_copy_grub_would_not_boot_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = pair(dir.path());
        let [first, second] = p.paths().map(Path::to_path_buf);
        // The second copy cannot be written: the store fails before touching the first.
        std::fs::remove_file(&second).unwrap();
        std::fs::create_dir(&second).unwrap();
        assert!(p.store(&with_tries("2")).is_err());
        assert_eq!(
            parse_copy(&std::fs::read(&first).unwrap(), &first),
            Copy::Valid {
                seq: 1,
                vars: protocol_vars()
            }
        );
    }

    #[test]
    fn zeroed_first_copy_loads_from_the_second_and_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let p = pair(dir.path());
        p.store(&with_tries("2")).unwrap();
        std::fs::write(p.paths()[0], [0u8; BLOCK_SIZE]).unwrap();
        assert_eq!(p.load().unwrap(), with_tries("2"));
        let problems = p.check();
        assert!(problems[0].contains("copy 1"), "{problems:?}");
        assert_eq!(p.repair().unwrap(), problems);
        assert!(p.check().is_empty());
        let copies = p.read_copies();
        assert_eq!(copies[0], copies[1]);
    }

    #[test]
    fn missing_second_copy_is_recreated_by_the_next_store() {
        let dir = tempfile::tempdir().unwrap();
        let p = pair(dir.path());
        std::fs::remove_file(p.paths()[1]).unwrap();
        assert_eq!(p.load().unwrap(), protocol_vars());
        p.store(&with_tries("2")).unwrap();
        let copies = p.read_copies();
        assert_eq!(
            copies[1],
            Copy::Valid {
                seq: 2,
                vars: with_tries("2")
            }
        );
        assert_eq!(copies[0], copies[1]);
    }

    #[test]
    fn neither_copy_valid_is_corrupt_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let p = pair(dir.path());
        std::fs::write(p.paths()[0], [0u8; BLOCK_SIZE]).unwrap();
        std::fs::remove_file(p.paths()[1]).unwrap();
        let e = p.load().unwrap_err().to_string();
        assert!(
            e.contains("neither copy is valid") && e.contains("is missing"),
            "{e}"
        );
        assert!(p.repair().is_err());
    }

    // ---- Against Debian's real grub-editenv (grub2-common) ----

    /// The grub-editenv binary, or None after saying why the test is skipped (a failure
    /// under EDGE_OTA_REQUIRE_ALL).
    fn grub_editenv() -> Option<PathBuf> {
        let found = crate::testing::find_tool("grub-editenv");
        if found.is_none() {
            crate::testing::skip(
                "grubenv round trips",
                "grub-editenv not found in PATH (apt-get install grub2-common)",
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
