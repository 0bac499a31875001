//! The U-Boot environment (what `saveenv`, `fw_printenv` and `fw_setenv` use), read and written
//! natively on regular files and block devices.
//!
//! Layout of one copy of `size` bytes at `offset` of a device:
//!
//! ```text
//! single:     crc32 (4 bytes, little endian) | data
//! redundant:  crc32 (4 bytes, little endian) | flag (1 byte) | data
//! data:       key=value\0 key=value\0 ... \0  then padding up to the end of the copy
//! ```
//!
//! The CRC (zlib CRC-32) covers the whole data area, padding included. U-Boot and the tools
//! stop reading at the empty entry, so the padding's content does not matter: we write 0x00,
//! libubootenv's `fw_setenv` 0.3.2 leaves whatever its buffer held (seen non-zero).
//!
//! Redundant layout: two copies (two lines in `fw_env.config`), each with a flag byte. This
//! module implements the *incremental* flag scheme, the one U-Boot and libubootenv use for
//! files, block devices (eMMC/SD), NAND and UBI: each save writes the copy that is *not*
//! current, with flag = current flag + 1 (wrapping 255 → 0). When both CRCs are good the
//! current copy is the one with the larger flag, except that 0 is newer than 255 (wraparound),
//! and copy 0 wins a tie. A power cut during a save therefore leaves the previous copy valid
//! and current. (The *boolean* scheme of NOR flash, 1 = active and 0 = obsolete, needs
//! erase-before-write on MTD devices; MTD and UBI are refused here.)
//!
//! `fw_env.config` numbers follow the tools' `sscanf("%lli %lx %lx %lx")`: the offset is a C
//! integer (`0x` hex, leading `0` octal, otherwise decimal, may be negative = from the end of
//! the device), while size, sector size and sector count are always hexadecimal, with or
//! without `0x` (so `4000` means 0x4000 bytes, as for `fw_printenv`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BootError, EnvStore};

/// Bytes before the data area in a single-copy environment (the CRC).
pub const SINGLE_HEADER: usize = 4;
/// Bytes before the data area in a redundant environment (the CRC and the flag).
pub const REDUNDANT_HEADER: usize = 5;
/// Largest environment accepted, so a typo in a config cannot make us allocate gigabytes.
pub const MAX_ENV_SIZE: u64 = 16 << 20;
/// The lock file libubootenv's `fw_printenv`/`fw_setenv` take (flock) by default.
pub const DEFAULT_LOCK_FILE: &str = "/var/lock/fw_printenv.lock";

/// Where one copy of the environment lives: one line of `fw_env.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvLocation {
    /// A regular file or a block device.
    pub device: PathBuf,
    /// Byte offset of the copy in `device`; negative counts from the end of the device.
    pub offset: i64,
    /// Size of the copy in bytes, header included.
    pub size: u64,
    /// Erase block size (MTD only; kept for round trips, unused for files and block devices).
    pub sector_size: Option<u64>,
    /// Number of erase blocks (MTD only; unused here).
    pub sectors: Option<u64>,
}

/// One decoded copy of the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvImage {
    pub vars: BTreeMap<String, String>,
    /// The redundancy flag, `None` for the single layout.
    pub flag: Option<u8>,
}

/// Parses `fw_env.config` text: `device offset size [sector_size [sectors]]` per line, `#`
/// starts a comment, blank lines are skipped. One line is a single copy, two lines a
/// redundant pair. See the module doc for how numbers are read.
pub fn parse_fw_env_config(text: &str) -> Result<Vec<EnvLocation>, BootError> {
    parse_config_from(text, "fw_env.config")
}

fn parse_config_from(text: &str, source: &str) -> Result<Vec<EnvLocation>, BootError> {
    let mut locations = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let n = n + 1;
        let line = raw.split('#').next().unwrap_or("");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let err = |what: String| BootError::Invalid(format!("{source}: line {n}: {what}"));
        if fields.len() < 3 || fields.len() > 5 {
            return Err(err(format!(
                "expected `device offset size [sector_size [sectors]]`, got {} fields",
                fields.len()
            )));
        }
        let offset =
            parse_c_offset(fields[1]).ok_or_else(|| err(format!("bad offset {:?}", fields[1])))?;
        let hex = |i: usize, what: &str| -> Result<Option<u64>, BootError> {
            match fields.get(i) {
                None => Ok(None),
                Some(f) => parse_hex(f)
                    .map(Some)
                    .ok_or_else(|| err(format!("bad {what} {f:?} (read as hexadecimal)"))),
            }
        };
        let size = hex(2, "size")?.unwrap_or(0);
        if size == 0 {
            return Err(err("environment size is 0".into()));
        }
        locations.push(EnvLocation {
            device: PathBuf::from(fields[0]),
            offset,
            size,
            sector_size: hex(3, "sector size")?,
            sectors: hex(4, "sector count")?,
        });
    }
    match locations.len() {
        0 => Err(BootError::Invalid(format!(
            "{source}: no environment location"
        ))),
        1 | 2 => Ok(locations),
        n => Err(BootError::Invalid(format!(
            "{source}: {n} environment locations, at most two (a redundant pair)"
        ))),
    }
}

/// A C integer as `strtoll(s, NULL, 0)` reads it, but refusing trailing garbage.
fn parse_c_offset(s: &str) -> Option<i64> {
    let (neg, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (digits, radix) = if let Some(h) = unsigned
        .strip_prefix("0x")
        .or_else(|| unsigned.strip_prefix("0X"))
    {
        (h, 16)
    } else if unsigned.len() > 1 && unsigned.starts_with('0') {
        (&unsigned[1..], 8)
    } else {
        (unsigned, 10)
    };
    // from_str_radix alone would accept a sign after the prefix ("0x+5").
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::try_from(u64::from_str_radix(digits, radix).ok()?).ok()?;
    Some(if neg { -v } else { v })
}

/// A hexadecimal number with an optional `0x`, as `%lx` reads it.
fn parse_hex(s: &str) -> Option<u64> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(h, 16).ok()
}

fn header_len(redundant: bool) -> usize {
    if redundant {
        REDUNDANT_HEADER
    } else {
        SINGLE_HEADER
    }
}

/// Decodes one copy (exactly the `size` bytes of its location). A CRC mismatch, a missing
/// terminator, an entry without `=`, an empty or repeated name or non-UTF-8 text is
/// [`BootError::Corrupt`] naming `path`.
pub fn parse(image: &[u8], redundant: bool, path: &Path) -> Result<EnvImage, BootError> {
    let corrupt = |reason: String| BootError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let hdr = header_len(redundant);
    if image.len() < hdr + 1 {
        return Err(corrupt(format!(
            "environment is {} bytes, too short for a {hdr}-byte header and data",
            image.len()
        )));
    }
    let stored = u32::from_le_bytes(image[..4].try_into().expect("4 bytes"));
    let data = &image[hdr..];
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(corrupt(format!(
            "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    let flag = redundant.then(|| image[4]);

    let mut vars = BTreeMap::new();
    let mut pos = 0;
    loop {
        let Some(len) = data[pos..].iter().position(|&b| b == 0) else {
            return Err(corrupt(format!(
                "no terminating NUL after data offset {pos}"
            )));
        };
        if len == 0 {
            break; // The empty entry ends the environment; the rest is padding.
        }
        let entry = &data[pos..pos + len];
        let at = hdr + pos;
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            return Err(corrupt(format!("entry at offset {at} has no '='")));
        };
        if eq == 0 {
            return Err(corrupt(format!(
                "entry at offset {at} has an empty variable name"
            )));
        }
        let key = std::str::from_utf8(&entry[..eq])
            .map_err(|_| corrupt(format!("variable name at offset {at} is not UTF-8")))?;
        let value = std::str::from_utf8(&entry[eq + 1..])
            .map_err(|_| corrupt(format!("value of {key:?} is not UTF-8")))?;
        if vars.insert(key.to_string(), value.to_string()).is_some() {
            return Err(corrupt(format!("variable {key:?} appears twice")));
        }
        pos += len + 1;
    }
    Ok(EnvImage { vars, flag })
}

/// Encodes a copy of `size` bytes: sorted `key=value\0` entries, the terminating `\0`, 0x00
/// padding, the CRC, and `flag` (whose presence selects the redundant layout). Refuses, with
/// [`BootError::Invalid`], empty names, `=` in names, NUL anywhere, and what does not fit.
pub fn serialize(
    vars: &BTreeMap<String, String>,
    size: usize,
    flag: Option<u8>,
) -> Result<Vec<u8>, BootError> {
    let hdr = header_len(flag.is_some());
    if size < hdr + 1 {
        return Err(BootError::Invalid(format!(
            "U-Boot environment size {size} is too small"
        )));
    }
    let mut image = vec![0u8; hdr];
    for (key, value) in vars {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(BootError::Invalid(format!(
                "U-Boot env: variable name {key:?} is empty or contains '=' or NUL"
            )));
        }
        if value.contains('\0') {
            return Err(BootError::Invalid(format!(
                "U-Boot env: value of {key:?} contains NUL"
            )));
        }
        image.extend_from_slice(key.as_bytes());
        image.push(b'=');
        image.extend_from_slice(value.as_bytes());
        image.push(0);
    }
    image.push(0);
    if image.len() > size {
        return Err(BootError::Invalid(format!(
            "U-Boot env: the variables need {} bytes, the environment holds {size}",
            image.len()
        )));
    }
    image.resize(size, 0);
    let crc = crc32fast::hash(&image[hdr..]);
    image[..4].copy_from_slice(&crc.to_le_bytes());
    if let Some(f) = flag {
        image[4] = f;
    }
    Ok(image)
}

/// Which of two valid copies is current under the incremental scheme (0 or 1), from their
/// flags: the larger flag wins, 0 beats 255 (the counter wrapped), copy 0 wins a tie.
pub fn current_copy(flag0: u8, flag1: u8) -> usize {
    match (flag0, flag1) {
        (0xff, 0) => 1,
        (0, 0xff) => 0,
        (a, b) if b > a => 1,
        _ => 0,
    }
}

/// A U-Boot environment in one copy or a redundant pair, used as an [`EnvStore`].
#[derive(Debug, Clone)]
pub struct UBootEnv {
    copies: Vec<EnvLocation>,
    lock_file: Option<PathBuf>,
}

/// What reading one copy found.
enum CopyRead {
    Valid(EnvImage),
    /// Unusable; `flag` is the raw flag byte when it could be read (for the next save's flag).
    Invalid {
        error: BootError,
        flag: Option<u8>,
    },
}

impl UBootEnv {
    /// One location (single layout) or two (redundant). Both copies must have the same size.
    /// MTD and UBI devices are refused: they need erase-before-write.
    pub fn new(copies: Vec<EnvLocation>) -> Result<Self, BootError> {
        if copies.is_empty() || copies.len() > 2 {
            return Err(BootError::Invalid(format!(
                "U-Boot env: {} locations given, need one or two",
                copies.len()
            )));
        }
        let redundant = copies.len() == 2;
        for loc in &copies {
            let dev = loc.device.to_string_lossy();
            if dev.starts_with("/dev/mtd") || dev.starts_with("/dev/ubi") {
                return Err(BootError::Invalid(format!(
                    "U-Boot env on {dev}: MTD/UBI devices are not supported (they need \
                     erase-before-write); use a block device or file"
                )));
            }
            if loc.size < header_len(redundant) as u64 + 2 || loc.size > MAX_ENV_SIZE {
                return Err(BootError::Invalid(format!(
                    "U-Boot env on {dev}: size {:#x} out of range ({:#x}..={MAX_ENV_SIZE:#x})",
                    loc.size,
                    header_len(redundant) + 2
                )));
            }
        }
        if redundant && copies[0].size != copies[1].size {
            return Err(BootError::Invalid(format!(
                "U-Boot env: redundant copies differ in size ({:#x} and {:#x})",
                copies[0].size, copies[1].size
            )));
        }
        Ok(UBootEnv {
            copies,
            lock_file: Some(PathBuf::from(DEFAULT_LOCK_FILE)),
        })
    }

    /// Reads the locations from an `fw_env.config` file (see [`parse_fw_env_config`]).
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self, BootError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| BootError::io(path, e))?;
        UBootEnv::new(parse_config_from(&text, &path.display().to_string())?)
    }

    /// The file to `flock` while reading and writing, shared with `fw_setenv` so that neither
    /// loses the other's update (default [`DEFAULT_LOCK_FILE`]; `None`: no locking). Like the
    /// tools, a lock file that cannot be opened (no `/var/lock`) is skipped.
    pub fn with_lock_file(mut self, lock_file: Option<PathBuf>) -> Self {
        self.lock_file = lock_file;
        self
    }

    pub fn copies(&self) -> &[EnvLocation] {
        &self.copies
    }

    pub fn is_redundant(&self) -> bool {
        self.copies.len() == 2
    }

    fn lock(&self) -> Result<Option<nix::fcntl::Flock<File>>, BootError> {
        let Some(path) = &self.lock_file else {
            return Ok(None);
        };
        let file = match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
        {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, errno)| BootError::io(path, errno.into()))
    }

    /// Opens a copy's device and returns it with the absolute offset of the copy, checking
    /// that the whole copy lies inside the device.
    fn open_copy(&self, loc: &EnvLocation, write: bool) -> Result<(File, u64), BootError> {
        let io_err = |e| BootError::io(&loc.device, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&loc.device)
            .map_err(io_err)?;
        // Seeking to the end gives the size of block devices too, unlike metadata().
        let dev_len = file.seek(SeekFrom::End(0)).map_err(io_err)?;
        let start = if loc.offset < 0 {
            dev_len.checked_sub(loc.offset.unsigned_abs())
        } else {
            Some(loc.offset as u64)
        };
        match start {
            Some(start) if start.saturating_add(loc.size) <= dev_len => Ok((file, start)),
            _ => Err(BootError::Corrupt {
                path: loc.device.clone(),
                reason: format!(
                    "device is {dev_len} bytes, too short for an environment of {:#x} bytes \
                     at offset {:#x}",
                    loc.size, loc.offset
                ),
            }),
        }
    }

    fn read_copy(&self, loc: &EnvLocation) -> Result<CopyRead, BootError> {
        let (file, start) = match self.open_copy(loc, false) {
            Ok(x) => x,
            Err(e @ BootError::Corrupt { .. }) => {
                return Ok(CopyRead::Invalid {
                    error: e,
                    flag: None,
                })
            }
            Err(e) => return Err(e),
        };
        let mut image = vec![0u8; loc.size as usize];
        file.read_exact_at(&mut image, start)
            .map_err(|e| BootError::io(&loc.device, e))?;
        let redundant = self.is_redundant();
        Ok(match parse(&image, redundant, &loc.device) {
            Ok(env) => CopyRead::Valid(env),
            Err(error) => CopyRead::Invalid {
                error,
                flag: redundant.then(|| image[4]),
            },
        })
    }

    /// Reads every copy and picks the current one.
    fn read_all(&self) -> Result<Selection, BootError> {
        let reads = self
            .copies
            .iter()
            .map(|loc| self.read_copy(loc))
            .collect::<Result<Vec<_>, _>>()?;
        let current = match reads.as_slice() {
            [CopyRead::Valid(a), CopyRead::Valid(b)] => {
                current_copy(a.flag.unwrap_or(0), b.flag.unwrap_or(0))
            }
            [CopyRead::Invalid { .. }, CopyRead::Valid(_)] => 1,
            _ => 0,
        };
        Ok(Selection {
            current,
            reads,
            first_device: self.copies[0].device.clone(),
        })
    }
}

/// Every copy as read, and which one is current.
struct Selection {
    current: usize,
    reads: Vec<CopyRead>,
    first_device: PathBuf,
}

impl Selection {
    /// The current copy's contents, or why no copy is usable.
    fn current_env(&self) -> Result<EnvImage, BootError> {
        match &self.reads[self.current] {
            CopyRead::Valid(env) => Ok(env.clone()),
            CopyRead::Invalid { error, .. } if self.reads.len() == 1 => Err(clone_error(error)),
            CopyRead::Invalid { .. } => {
                let reasons: Vec<String> = self
                    .reads
                    .iter()
                    .map(|r| match r {
                        CopyRead::Invalid { error, .. } => error.to_string(),
                        CopyRead::Valid(_) => unreachable!("a valid copy would be current"),
                    })
                    .collect();
                Err(BootError::Corrupt {
                    path: self.first_device.clone(),
                    reason: format!("both redundant copies are bad: {}", reasons.join("; ")),
                })
            }
        }
    }

    /// The flag of the current copy, which the next save increments.
    fn current_flag(&self) -> u8 {
        match &self.reads[self.current] {
            CopyRead::Valid(env) => env.flag.unwrap_or(0),
            // Neither copy is valid: as the tools do, count on from copy 0's raw flag.
            CopyRead::Invalid { flag, .. } => flag.unwrap_or(0),
        }
    }
}

/// BootError holds an io::Error, so it is not Clone; the copies we clone are always Corrupt.
fn clone_error(e: &BootError) -> BootError {
    match e {
        BootError::Corrupt { path, reason } => BootError::Corrupt {
            path: path.clone(),
            reason: reason.clone(),
        },
        other => BootError::Invalid(other.to_string()),
    }
}

impl EnvStore for UBootEnv {
    fn load(&self) -> Result<BTreeMap<String, String>, BootError> {
        let _lock = self.lock()?;
        self.read_all()?.current_env().map(|env| env.vars)
    }

    /// Single layout: rewrites the copy in place (a power cut mid-write leaves a CRC error).
    /// Redundant layout: writes the copy that is not current, with the next flag, so the
    /// current copy stays intact until the new one is complete and fsynced. Never creates or
    /// extends a device: the locations must already exist with room for the environment.
    fn store(&self, vars: &BTreeMap<String, String>) -> Result<(), BootError> {
        let _lock = self.lock()?;
        let size = self.copies[0].size as usize;
        let (target, flag) = if self.is_redundant() {
            let sel = self.read_all()?;
            (1 - sel.current, Some(sel.current_flag().wrapping_add(1)))
        } else {
            (0, None)
        };
        let image = serialize(vars, size, flag)?;
        let loc = &self.copies[target];
        let (file, start) = self.open_copy(loc, true)?;
        file.write_all_at(&image, start)
            .map_err(|e| BootError::io(&loc.device, e))?;
        file.sync_all().map_err(|e| BootError::io(&loc.device, e))
    }

    fn describe(&self) -> String {
        let locs: Vec<String> = self
            .copies
            .iter()
            .map(|l| format!("{}@{:#x}+{:#x}", l.device.display(), l.offset, l.size))
            .collect();
        format!("U-Boot env {}", locs.join(" / "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const SIZE: u64 = 0x2000;

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
            ("bootcmd", "run edge_boot; echo failed"),
        ])
    }

    /// A tempdir with zeroed env files and a config for them.
    struct Fixture {
        dir: tempfile::TempDir,
        config: PathBuf,
    }

    impl Fixture {
        /// `layout`: one (file name, offset, file length) per copy.
        fn new(layout: &[(&str, u64, u64)]) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let mut text = String::from("# device offset size\n");
            for (name, offset, len) in layout {
                let p = dir.path().join(name);
                if !p.exists() {
                    std::fs::write(&p, vec![0u8; *len as usize]).unwrap();
                }
                text.push_str(&format!("{} {offset:#x} {SIZE:#x}\n", p.display()));
            }
            let config = dir.path().join("fw_env.config");
            std::fs::write(&config, text).unwrap();
            Fixture { dir, config }
        }
        fn single() -> Fixture {
            Fixture::new(&[("env", 0, SIZE)])
        }
        fn redundant() -> Fixture {
            Fixture::new(&[("env0", 0, SIZE), ("env1", 0, SIZE)])
        }
        fn env(&self) -> UBootEnv {
            UBootEnv::from_config_file(&self.config)
                .unwrap()
                .with_lock_file(Some(self.dir.path().join("lock")))
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn read(&self, name: &str) -> Vec<u8> {
            std::fs::read(self.path(name)).unwrap()
        }
        fn write(&self, name: &str, bytes: &[u8]) {
            std::fs::write(self.path(name), bytes).unwrap()
        }
    }

    fn corrupt_reason<T: std::fmt::Debug>(r: Result<T, BootError>) -> String {
        match r {
            Err(BootError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn serialize_layout() {
        let img = serialize(&vars(&[("b", "2"), ("a", "x y")]), 32, None).unwrap();
        assert_eq!(&img[4..16], b"a=x y\0b=2\0\0\0");
        assert!(img[16..].iter().all(|&b| b == 0));
        assert_eq!(
            u32::from_le_bytes(img[..4].try_into().unwrap()),
            crc32fast::hash(&img[4..])
        );
        let img = serialize(&vars(&[("a", "1")]), 32, Some(7)).unwrap();
        assert_eq!(img[4], 7);
        assert_eq!(&img[5..10], b"a=1\0\0");
        assert_eq!(
            u32::from_le_bytes(img[..4].try_into().unwrap()),
            crc32fast::hash(&img[5..])
        );
    }

    #[test]
    fn parse_round_trip() {
        let v = protocol_vars();
        for flag in [None, Some(0), Some(200)] {
            let img = serialize(&v, SIZE as usize, flag).unwrap();
            let env = parse(&img, flag.is_some(), Path::new("/x")).unwrap();
            assert_eq!(env.vars, v);
            assert_eq!(env.flag, flag);
        }
        let img = serialize(&BTreeMap::new(), 16, None).unwrap();
        assert!(parse(&img, false, Path::new("/x")).unwrap().vars.is_empty());
    }

    #[test]
    fn padding_content_is_ignored() {
        // fw_setenv leaves stale bytes after the terminator; they are CRC-covered but unread.
        let mut img = serialize(&vars(&[("a", "1")]), 64, None).unwrap();
        img[40..50].copy_from_slice(b"garbage=1\0");
        let crc = crc32fast::hash(&img[4..]);
        img[..4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            parse(&img, false, Path::new("/x")).unwrap().vars,
            vars(&[("a", "1")])
        );
    }

    #[test]
    fn env_crc_mismatch_is_refused() {
        let mut img = serialize(&protocol_vars(), SIZE as usize, None).unwrap();
        img[10] ^= 1;
        assert!(corrupt_reason(parse(&img, false, Path::new("/x"))).contains("CRC mismatch"));

        let fx = Fixture::single();
        let env = fx.env();
        env.store(&protocol_vars()).unwrap();
        let mut raw = fx.read("env");
        raw[100] ^= 0x40;
        fx.write("env", &raw);
        let err = env.load().unwrap_err();
        assert!(err.to_string().contains("CRC mismatch"), "{err}");
        assert!(err
            .to_string()
            .contains(&fx.path("env").display().to_string()));
    }

    #[test]
    fn zeroed_env_is_refused() {
        // A blank partition: CRC 0 != crc32 of zeros.
        let fx = Fixture::single();
        assert!(corrupt_reason(fx.env().load()).contains("CRC mismatch"));
    }

    #[test]
    fn env_too_short_is_refused() {
        // The device (a file here) ends before offset + size.
        let fx = Fixture::new(&[("env", 0, SIZE - 1)]);
        let reason = corrupt_reason(fx.env().load());
        assert!(reason.contains("too short"), "{reason}");
        // And store refuses to extend it.
        assert!(fx.env().store(&protocol_vars()).is_err());
        assert_eq!(fx.read("env").len(), SIZE as usize - 1);
        // A buffer shorter than a header.
        assert!(corrupt_reason(parse(&[0, 0, 0], false, Path::new("/x"))).contains("too short"));
    }

    #[test]
    fn missing_terminator_is_refused() {
        let mut img = vec![b'a'; 32];
        img[5] = b'=';
        let crc = crc32fast::hash(&img[4..]);
        img[..4].copy_from_slice(&crc.to_le_bytes());
        assert!(corrupt_reason(parse(&img, false, Path::new("/x"))).contains("terminating NUL"));
    }

    fn image_with_data(data: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 4];
        img.extend_from_slice(data);
        img.resize(64, 0);
        let crc = crc32fast::hash(&img[4..]);
        img[..4].copy_from_slice(&crc.to_le_bytes());
        img
    }

    #[test]
    fn bad_entries_are_refused() {
        let p = Path::new("/x");
        assert!(
            corrupt_reason(parse(&image_with_data(b"a=1\0junk\0\0"), false, p)).contains("no '='")
        );
        assert!(corrupt_reason(parse(&image_with_data(b"=1\0\0"), false, p)).contains("empty"));
        assert!(
            corrupt_reason(parse(&image_with_data(b"a=1\0a=2\0\0"), false, p)).contains("twice")
        );
        assert!(corrupt_reason(parse(&image_with_data(b"a=\xff\0\0"), false, p)).contains("UTF-8"));
        // '=' in a value is fine.
        assert_eq!(
            parse(&image_with_data(b"a=b=c\0\0"), false, p)
                .unwrap()
                .vars,
            vars(&[("a", "b=c")])
        );
    }

    #[test]
    fn unstorable_vars_are_refused() {
        for (k, v) in [("", "1"), ("a=b", "1"), ("a\0", "1"), ("a", "1\0")] {
            assert!(
                matches!(
                    serialize(&vars(&[(k, v)]), 64, None),
                    Err(BootError::Invalid(_))
                ),
                "{k:?}={v:?}"
            );
        }
        // Newlines are legal in U-Boot values.
        assert!(serialize(&vars(&[("a", "x\ny")]), 64, None).is_ok());
    }

    #[test]
    fn value_too_large_is_refused() {
        // 4 header + "a=" + 57 + NUL + final NUL = 65 > 64.
        let v = vars(&[("a", &"x".repeat(57))]);
        match serialize(&v, 64, None) {
            Err(BootError::Invalid(m)) => assert!(m.contains("65 bytes"), "{m}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert!(serialize(&vars(&[("a", &"x".repeat(56))]), 64, None).is_ok());
    }

    #[test]
    fn round_trip_single() {
        let fx = Fixture::single();
        let env = fx.env();
        assert!(!env.is_redundant());
        env.store(&protocol_vars()).unwrap();
        assert_eq!(env.load().unwrap(), protocol_vars());
        let mut v = protocol_vars();
        v.insert("EDGE_B_TRIES".into(), "2".into());
        env.store(&v).unwrap();
        assert_eq!(env.load().unwrap(), v);
        assert!(
            env.describe().contains("env@0x0+0x2000"),
            "{}",
            env.describe()
        );
    }

    #[test]
    fn round_trip_redundant() {
        let fx = Fixture::redundant();
        let env = fx.env();
        assert!(env.is_redundant());
        for tries in 0..5 {
            let mut v = protocol_vars();
            v.insert("EDGE_B_TRIES".into(), tries.to_string());
            env.store(&v).unwrap();
            assert_eq!(env.load().unwrap(), v);
        }
    }

    #[test]
    fn write_goes_to_inactive_copy() {
        let fx = Fixture::redundant();
        let env = fx.env();
        // Both copies blank: the first save goes to copy 1 (copy 0 counts as current).
        env.store(&vars(&[("n", "1")])).unwrap();
        assert!(fx.read("env0").iter().all(|&b| b == 0), "copy 0 untouched");
        let c1 = fx.read("env1");
        assert_eq!(c1[4], 1, "flag = copy 0's flag + 1");

        env.store(&vars(&[("n", "2")])).unwrap();
        assert_eq!(fx.read("env1"), c1, "the current copy is never rewritten");
        let c0 = fx.read("env0");
        assert_eq!(c0[4], 2);
        assert_eq!(
            parse(&c0, true, Path::new("/x")).unwrap().vars,
            vars(&[("n", "2")])
        );

        env.store(&vars(&[("n", "3")])).unwrap();
        assert_eq!(fx.read("env0"), c0);
        assert_eq!(fx.read("env1")[4], 3);
        assert_eq!(env.load().unwrap(), vars(&[("n", "3")]));
    }

    #[test]
    fn redundant_copy_survives_corrupt_primary() {
        let fx = Fixture::redundant();
        let env = fx.env();
        env.store(&vars(&[("n", "1")])).unwrap(); // copy 1, flag 1
        env.store(&vars(&[("n", "2")])).unwrap(); // copy 0, flag 2: current
                                                  // A torn write of copy 0 (the newer one): the older copy 1 is used.
        let mut raw = fx.read("env0");
        raw[7] ^= 0xff;
        fx.write("env0", &raw);
        assert_eq!(env.load().unwrap(), vars(&[("n", "1")]));
        // The next save overwrites the bad copy 0 and keeps copy 1.
        let c1 = fx.read("env1");
        env.store(&vars(&[("n", "3")])).unwrap();
        assert_eq!(fx.read("env1"), c1);
        assert_eq!(fx.read("env0")[4], 2, "flag = copy 1's flag + 1");
        assert_eq!(env.load().unwrap(), vars(&[("n", "3")]));
    }

    #[test]
    fn both_copies_bad_is_refused() {
        let fx = Fixture::redundant();
        let reason = corrupt_reason(fx.env().load());
        assert!(reason.contains("both redundant copies are bad"), "{reason}");
        assert!(reason.contains("CRC mismatch"), "{reason}");
    }

    #[test]
    fn flag_selection_and_wraparound() {
        assert_eq!(current_copy(1, 2), 1);
        assert_eq!(current_copy(2, 1), 0);
        assert_eq!(current_copy(5, 5), 0);
        assert_eq!(current_copy(0xff, 0), 1);
        assert_eq!(current_copy(0, 0xff), 0);
        assert_eq!(current_copy(0xfe, 0xff), 1);

        let fx = Fixture::redundant();
        fx.write(
            "env0",
            &serialize(&vars(&[("n", "old")]), SIZE as usize, Some(0xff)).unwrap(),
        );
        fx.write(
            "env1",
            &serialize(&vars(&[("n", "new")]), SIZE as usize, Some(0)).unwrap(),
        );
        let env = fx.env();
        assert_eq!(env.load().unwrap(), vars(&[("n", "new")]));
        env.store(&vars(&[("n", "newer")])).unwrap();
        assert_eq!(
            fx.read("env0")[4],
            1,
            "written over the 0xff copy with flag 0 + 1"
        );
        assert_eq!(env.load().unwrap(), vars(&[("n", "newer")]));
    }

    #[test]
    fn offsets_inside_one_file_and_from_the_end() {
        // Two copies in one 64 KiB file: at 0x4000 and at 0x8000 counted from the end.
        let fx = Fixture::new(&[("disk", 0x4000, 0x10000)]);
        let disk = fx.path("disk");
        let text = format!(
            "{d} 0x4000 0x2000\n{d} -0x8000 2000 0x1000 2\n",
            d = disk.display()
        );
        let locs = parse_fw_env_config(&text).unwrap();
        assert_eq!(locs[1].offset, -0x8000);
        assert_eq!(locs[1].sector_size, Some(0x1000));
        let env = UBootEnv::new(locs).unwrap().with_lock_file(None);
        env.store(&vars(&[("n", "1")])).unwrap();
        env.store(&vars(&[("n", "2")])).unwrap();
        let raw = fx.read("disk");
        assert_eq!(raw.len(), 0x10000);
        assert_eq!(
            parse(&raw[0x4000..0x6000], true, &disk).unwrap().vars,
            vars(&[("n", "2")])
        );
        assert_eq!(
            parse(&raw[0x8000..0xa000], true, &disk).unwrap().vars,
            vars(&[("n", "1")])
        );
        assert!(
            raw[..0x4000].iter().all(|&b| b == 0),
            "nothing written outside the copies"
        );
        assert_eq!(env.load().unwrap(), vars(&[("n", "2")]));
    }

    #[test]
    fn config_parsing() {
        let text = "\
# comment line
   # indented comment

/dev/mmcblk0 0x3f0000 0x10000   # trailing comment
/dev/mmcblk0\t4161536\t10000\t0x200 0X10
";
        let locs = parse_fw_env_config(text).unwrap();
        assert_eq!(
            locs,
            vec![
                EnvLocation {
                    device: "/dev/mmcblk0".into(),
                    offset: 0x3f0000,
                    size: 0x10000,
                    sector_size: None,
                    sectors: None,
                },
                EnvLocation {
                    device: "/dev/mmcblk0".into(),
                    offset: 4161536,
                    size: 0x10000, // sizes are hex, as in the tools
                    sector_size: Some(0x200),
                    sectors: Some(0x10),
                },
            ]
        );
        // Offsets as C integers: octal with a leading 0.
        assert_eq!(parse_fw_env_config("f 010 0x100").unwrap()[0].offset, 8);
        assert_eq!(parse_fw_env_config("f 0 100").unwrap()[0].size, 0x100);
    }

    #[test]
    fn shipped_example_config_parses() {
        let text = include_str!("../../bootloader/u-boot/fw_env.config.example");
        let locs = parse_fw_env_config(text).unwrap();
        assert_eq!(locs.len(), 2);
        assert_eq!((locs[0].offset, locs[0].size), (0x400000, 0x10000));
        assert_eq!((locs[1].offset, locs[1].size), (0x410000, 0x10000));
        assert!(UBootEnv::new(locs).is_ok());
    }

    #[test]
    fn config_errors() {
        for (text, want) in [
            ("", "no environment location"),
            ("# only a comment\n", "no environment location"),
            ("/dev/x 0\n", "2 fields"),
            ("/dev/x 0 1 2 3 4\n", "6 fields"),
            ("/dev/x zero 0x100\n", "bad offset"),
            ("/dev/x 0x 0x100\n", "bad offset"),
            ("/dev/x 09 0x100\n", "bad offset"),
            ("/dev/x 0x+5 0x100\n", "bad offset"),
            ("/dev/x 1k 0x100\n", "bad offset"),
            ("/dev/x 0 +100\n", "bad size"),
            ("/dev/x 0 0x10g\n", "bad size"),
            ("/dev/x 0 0\n", "size is 0"),
            ("/dev/x 0 0x100 zz\n", "bad sector size"),
            ("a 0 1\nb 0 1\nc 0 1\n", "at most two"),
        ] {
            match parse_fw_env_config(text) {
                Err(BootError::Invalid(m)) => assert!(m.contains(want), "{text:?}: {m}"),
                other => panic!("{text:?}: expected Invalid, got {other:?}"),
            }
        }
        let err = parse_fw_env_config("a 0\n").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn unsupported_locations_are_refused() {
        let loc = |dev: &str, size| EnvLocation {
            device: dev.into(),
            offset: 0,
            size,
            sector_size: None,
            sectors: None,
        };
        assert!(UBootEnv::new(vec![loc("/dev/mtd1", 0x2000)]).is_err());
        assert!(UBootEnv::new(vec![loc("/dev/ubi0:env", 0x2000)]).is_err());
        assert!(UBootEnv::new(vec![]).is_err());
        assert!(UBootEnv::new(vec![loc("a", 0x2000), loc("b", 0x4000)]).is_err());
        assert!(UBootEnv::new(vec![loc("a", MAX_ENV_SIZE + 1)]).is_err());
        assert!(UBootEnv::new(vec![loc("a", 5)]).is_err());
        assert!(UBootEnv::new(vec![loc("a", 6)]).is_ok());
        let missing = UBootEnv::from_config_file("/nonexistent/fw_env.config");
        assert!(matches!(missing, Err(BootError::Io { .. })));
    }

    #[test]
    fn missing_device_is_an_io_error() {
        let fx = Fixture::single();
        std::fs::remove_file(fx.path("env")).unwrap();
        assert!(matches!(fx.env().load(), Err(BootError::Io { .. })));
        assert!(matches!(
            fx.env().store(&protocol_vars()),
            Err(BootError::Io { .. })
        ));
        assert!(!fx.path("env").exists(), "store must not create the device");
    }

    // ---- Against the real tools: fw_printenv / fw_setenv (Debian: libubootenv-tool) ----

    /// fw_printenv and fw_setenv, or None after saying why the test is skipped (a failure under
    /// EDGE_OTA_REQUIRE_ALL).
    fn tools() -> Option<(PathBuf, PathBuf)> {
        let find = crate::testing::find_tool;
        match (find("fw_printenv"), find("fw_setenv")) {
            (Some(p), Some(s)) => Some((p, s)),
            _ => {
                crate::testing::skip(
                    "U-Boot env round trips",
                    "fw_printenv/fw_setenv not found in PATH (Debian 12: apt-get install libubootenv-tool)",
                );
                None
            }
        }
    }

    /// Runs a tool with `-c CONFIG` and returns stdout; an empty defaults file is passed with
    /// `-f` so a blank (CRC-less) environment starts empty instead of failing.
    fn run_tool(tool: &Path, fx: &Fixture, args: &[&str]) -> String {
        let defenv = fx.path("defenv");
        if !defenv.exists() {
            std::fs::write(&defenv, "").unwrap();
        }
        let out = Command::new(tool)
            .arg("-c")
            .arg(&fx.config)
            .arg("-f")
            .arg(&defenv)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} {args:?} failed ({}): {}",
            tool.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Sets variables with `fw_setenv -s SCRIPT` (one `key=value` per line).
    fn fw_set(setenv: &Path, fx: &Fixture, v: &BTreeMap<String, String>) {
        let script = fx.path("script");
        let text: String = v.iter().map(|(k, val)| format!("{k}={val}\n")).collect();
        std::fs::write(&script, text).unwrap();
        run_tool(setenv, fx, &["-s", script.to_str().unwrap()]);
    }

    fn listing(v: &BTreeMap<String, String>) -> String {
        v.iter().map(|(k, val)| format!("{k}={val}\n")).collect()
    }

    fn real_tool_round_trips(fx: &Fixture) {
        let Some((printenv, setenv)) = tools() else {
            return;
        };
        // Our env uses the tools' default lock file, as in production.
        let env = UBootEnv::from_config_file(&fx.config).unwrap();

        // fw_setenv writes (on blank storage), we read.
        fw_set(&setenv, fx, &protocol_vars());
        assert_eq!(env.load().unwrap(), protocol_vars());

        // We write, fw_printenv reads.
        let mut v = protocol_vars();
        v.insert("EDGE_B_TRIES".into(), "2".into());
        v.insert("EDGE_ORDER".into(), "B A".into());
        env.store(&v).unwrap();
        assert_eq!(run_tool(&printenv, fx, &[]), listing(&v));
        assert_eq!(run_tool(&printenv, fx, &["-n", "EDGE_ORDER"]), "B A\n");

        // Alternate writers a few times, so the redundant flag passes back and forth.
        for round in 0..4 {
            let mut w = v.clone();
            w.insert("round".into(), format!("tool {round}"));
            fw_set(&setenv, fx, &vars(&[("round", &format!("tool {round}"))]));
            assert_eq!(env.load().unwrap(), w);
            w.insert("round".into(), format!("ours {round}"));
            env.store(&w).unwrap();
            assert_eq!(run_tool(&printenv, fx, &[]), listing(&w));
        }
    }

    #[test]
    fn real_tools_single_layout() {
        real_tool_round_trips(&Fixture::single());
    }

    #[test]
    fn real_tools_redundant_layout() {
        let fx = Fixture::redundant();
        real_tool_round_trips(&fx);
        if tools().is_none() {
            return;
        }
        // After all those saves both copies are valid and one flag is the other + 1.
        let f0 = parse(&fx.read("env0"), true, Path::new("/x"))
            .unwrap()
            .flag
            .unwrap();
        let f1 = parse(&fx.read("env1"), true, Path::new("/x"))
            .unwrap()
            .flag
            .unwrap();
        assert_eq!(f0.abs_diff(f1), 1, "flags {f0} {f1}");
    }

    #[test]
    fn real_tools_agree_on_wraparound() {
        let Some((printenv, setenv)) = tools() else {
            return;
        };
        let fx = Fixture::redundant();
        fx.write(
            "env0",
            &serialize(&vars(&[("n", "old")]), SIZE as usize, Some(0xff)).unwrap(),
        );
        fx.write(
            "env1",
            &serialize(&vars(&[("n", "new")]), SIZE as usize, Some(0)).unwrap(),
        );
        assert_eq!(run_tool(&printenv, &fx, &[]), "n=new\n");
        // fw_setenv writes over the 0xff copy with flag 1, and we follow.
        fw_set(&setenv, &fx, &vars(&[("n", "tool")]));
        assert_eq!(fx.read("env0")[4], 1);
        assert_eq!(fx.env().load().unwrap(), vars(&[("n", "tool")]));
    }

    #[test]
    fn real_tools_use_the_surviving_copy() {
        let Some((printenv, _)) = tools() else { return };
        let fx = Fixture::redundant();
        let env = fx.env();
        env.store(&vars(&[("n", "1")])).unwrap();
        env.store(&vars(&[("n", "2")])).unwrap();
        let mut raw = fx.read("env0");
        raw[7] ^= 0xff;
        fx.write("env0", &raw);
        assert_eq!(run_tool(&printenv, &fx, &[]), "n=1\n");
        assert_eq!(env.load().unwrap(), vars(&[("n", "1")]));
    }
}
