//! systemd-boot backend: slot state is the boot-counting suffix of each slot's Boot Loader Specification entry file name.
//!
//! Each slot has exactly one entry `<prefix>-<slot>[+LEFT[-DONE]].conf` in the entries
//! directory. systemd-boot renames `+LEFT-DONE` to `+(LEFT-1)-(DONE+1)` every time it boots
//! the entry, and `systemd-bless-boot` (or [`Bootloader::mark_good`]) drops the suffix once
//! the boot is confirmed:
//!
//! | file name                   | state                              |
//! |-----------------------------|------------------------------------|
//! | `edge-A.conf`               | `Good`                             |
//! | `edge-A+3.conf`, `+2-1`     | `Trying { tries_left: 3 }`, `2`    |
//! | `edge-A+0-3.conf`           | `Trying { tries_left: 0 }` (used up by the loader) |
//! | `edge-A+0.conf`             | `Bad` (only we write this)         |
//!
//! The boot order is the `default` line of `loader.conf` (`default <prefix>-<slot>*`), then the
//! other slots. systemd-boot picks the first entry matching `default` *whatever its tries*, so
//! [`Bootloader::mark_bad`] also moves `default` away from a bad slot (see its doc).
//! Every change is a `rename(2)` or an atomic file replacement, followed by an fsync of the
//! directory.

use std::io;
use std::path::{Path, PathBuf};

use super::{BootError, Bootloader, SlotBootState};

/// systemd-boot with one BLS entry per slot.
#[derive(Debug, Clone)]
pub struct SystemdBoot {
    entries_dir: PathBuf,
    loader_conf: PathBuf,
    prefix: String,
    slots: Vec<String>,
}

impl SystemdBoot {
    fn floor_path(&self) -> PathBuf {
        super::file_beside(&self.loader_conf, "edge-ota-floor")
    }

    /// `entries_dir` is usually `<ESP>/loader/entries`, `loader_conf` `<ESP>/loader/loader.conf`;
    /// slot `S`'s entry is `<prefix>-S[+counter].conf`. Names must be non-empty and free of
    /// `+`, `/`, `*`, `?`, `[`, whitespace and control characters, and no slot's entry name may
    /// be a prefix of another's (the `default <prefix>-<slot>*` glob would match both).
    pub fn new(
        entries_dir: impl Into<PathBuf>,
        loader_conf: impl Into<PathBuf>,
        prefix: impl Into<String>,
        slots: Vec<String>,
    ) -> Result<Self, BootError> {
        let prefix = prefix.into();
        let bad_name = |s: &str| {
            s.is_empty()
                || s.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '+' | '/' | '*' | '?' | '[')
                })
        };
        if bad_name(&prefix) {
            return Err(BootError::Invalid(format!(
                "systemd-boot: entry prefix {prefix:?} is empty or has a reserved character"
            )));
        }
        if slots.is_empty() {
            return Err(BootError::Invalid("systemd-boot: no slots".into()));
        }
        for (i, slot) in slots.iter().enumerate() {
            if bad_name(slot) {
                return Err(BootError::Invalid(format!(
                    "systemd-boot: slot name {slot:?} is empty or has a reserved character"
                )));
            }
            for other in &slots[i + 1..] {
                let (a, b) = (slot.to_ascii_lowercase(), other.to_ascii_lowercase());
                if a.starts_with(&b) || b.starts_with(&a) {
                    return Err(BootError::Invalid(format!(
                        "systemd-boot: slots {slot:?} and {other:?} would share a default glob"
                    )));
                }
            }
        }
        Ok(SystemdBoot {
            entries_dir: entries_dir.into(),
            loader_conf: loader_conf.into(),
            prefix,
            slots,
        })
    }

    /// The path of `slot`'s entry file as it is now.
    pub fn entry_file(&self, slot: &str) -> Result<PathBuf, BootError> {
        Ok(self.entries_dir.join(self.find_entry(slot)?.0))
    }

    /// `<prefix>-<slot>`: the entry file name without counter and `.conf`.
    fn base(&self, slot: &str) -> String {
        format!("{}-{}", self.prefix, slot)
    }

    fn check_slot(&self, slot: &str) -> Result<(), BootError> {
        if self.slots.iter().any(|s| s == slot) {
            Ok(())
        } else {
            Err(BootError::UnknownSlot(slot.to_string()))
        }
    }

    fn corrupt(&self, path: &Path, reason: String) -> BootError {
        BootError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }
    }

    /// The one entry file of `slot` and the state its name encodes.
    fn find_entry(&self, slot: &str) -> Result<(String, SlotBootState), BootError> {
        self.check_slot(slot)?;
        let base = self.base(slot);
        let counted = format!("{base}+");
        let dir_err = |e| BootError::io(&self.entries_dir, e);
        let mut found = Vec::new();
        for dirent in std::fs::read_dir(&self.entries_dir).map_err(dir_err)? {
            let dirent = dirent.map_err(dir_err)?;
            let Ok(name) = dirent.file_name().into_string() else {
                continue; // Not ours: ours are ASCII-compatible names.
            };
            let Some(stem) = name.strip_suffix(".conf") else {
                continue;
            };
            let counter = if stem == base {
                None
            } else if let Some(c) = stem.strip_prefix(&counted) {
                Some(c.to_string())
            } else {
                continue;
            };
            found.push((name, counter));
        }
        found.sort();
        match found.as_slice() {
            [] => Err(self.corrupt(
                &self.entries_dir,
                format!("no boot entry {base}[+counter].conf for slot {slot:?}"),
            )),
            [(name, counter)] => {
                let state = match counter {
                    None => SlotBootState::Good,
                    Some(c) => parse_counter(c)
                        .map_err(|reason| self.corrupt(&self.entries_dir.join(name), reason))?,
                };
                Ok((name.clone(), state))
            }
            many => Err(self.corrupt(
                &self.entries_dir,
                format!(
                    "slot {slot:?} has {} entries ({}), expected exactly one",
                    many.len(),
                    many.iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Renames `slot`'s entry to the name encoding `state`, durably.
    fn set_state(&self, slot: &str, state: SlotBootState) -> Result<(), BootError> {
        let (current, _) = self.find_entry(slot)?;
        let base = self.base(slot);
        let wanted = match state {
            SlotBootState::Good => format!("{base}.conf"),
            SlotBootState::Trying { tries_left } => format!("{base}+{tries_left}.conf"),
            SlotBootState::Bad => format!("{base}+0.conf"),
        };
        if current == wanted {
            return Ok(());
        }
        let from = self.entries_dir.join(&current);
        let to = self.entries_dir.join(&wanted);
        std::fs::rename(&from, &to).map_err(|e| BootError::io(&from, e))?;
        Ok(crate::fsutil::sync_dir(&self.entries_dir)?)
    }

    fn read_loader_conf(&self) -> Result<String, BootError> {
        std::fs::read_to_string(&self.loader_conf).map_err(|e| BootError::io(&self.loader_conf, e))
    }

    /// The slot the `default` line of loader.conf names.
    fn default_slot(&self) -> Result<String, BootError> {
        let text = self.read_loader_conf()?;
        let defaults: Vec<&str> = text
            .lines()
            .filter_map(|l| loader_conf_key_value(l).filter(|(k, _)| *k == "default"))
            .map(|(_, v)| v)
            .collect();
        let value = match defaults.as_slice() {
            [v] => *v,
            [] => {
                return Err(self.corrupt(&self.loader_conf, "no `default` line".into()));
            }
            _ => {
                return Err(self.corrupt(
                    &self.loader_conf,
                    format!("{} `default` lines, expected one", defaults.len()),
                ))
            }
        };
        // systemd-boot compares entry IDs case-insensitively, and an entry's ID is its file
        // name without the counter, so both `edge-A.conf` and `edge-A*` select slot A.
        let v = value.to_ascii_lowercase();
        self.slots
            .iter()
            .find(|slot| {
                let base = self.base(slot).to_ascii_lowercase();
                v == format!("{base}.conf") || v == format!("{base}*")
            })
            .cloned()
            .ok_or_else(|| {
                self.corrupt(
                    &self.loader_conf,
                    format!(
                        "`default {value}` names no slot (expected `default {}-<slot>*` or \
                         `default {}-<slot>.conf` with a slot of {:?})",
                        self.prefix, self.prefix, self.slots
                    ),
                )
            })
    }

    /// Rewrites loader.conf with `default <prefix>-<slot>*`, keeping every other line; creates
    /// it if missing. Atomic: temp file, fsync, rename, fsync of the directory.
    fn write_default(&self, slot: &str) -> Result<(), BootError> {
        let text = match std::fs::read_to_string(&self.loader_conf) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(BootError::io(&self.loader_conf, e)),
        };
        let new_line = format!("default {}*\n", self.base(slot));
        let mut out = String::with_capacity(text.len() + new_line.len());
        let mut replaced = false;
        for line in text.split_inclusive('\n') {
            if loader_conf_key_value(line).is_some_and(|(k, _)| k == "default") {
                if !replaced {
                    out.push_str(&new_line);
                    replaced = true;
                }
                // Later `default` lines would override ours in systemd-boot: drop them.
                continue;
            }
            out.push_str(line);
        }
        if !replaced {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&new_line);
        }
        super::write_atomic(&self.loader_conf, out.as_bytes())
    }
}

/// Parses a boot counter (`LEFT` or `LEFT-DONE`, decimal).
fn parse_counter(counter: &str) -> Result<SlotBootState, String> {
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let bad = || format!("unparseable boot counter \"+{counter}\" (expected +LEFT or +LEFT-DONE)");
    let (left, done) = match counter.split_once('-') {
        Some((l, d)) => (number(l).ok_or_else(bad)?, Some(number(d).ok_or_else(bad)?)),
        None => (number(counter).ok_or_else(bad)?, None),
    };
    match (left, done) {
        (0, None) => Ok(SlotBootState::Bad),
        (0, Some(0)) => Err(format!(
            "boot counter \"+{counter}\" is neither bad (+0) nor used up by the loader (+0-N, N > 0)"
        )),
        (tries_left, _) => Ok(SlotBootState::Trying { tries_left }),
    }
}

/// A loader.conf line as systemd-boot splits it: key, whitespace, value (optionally quoted).
/// `None` for blank lines and comments.
fn loader_conf_key_value(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (key, value) = match line.split_once([' ', '\t']) {
        Some((k, v)) => (k, v.trim()),
        None => (line, ""),
    };
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    Some((key, value))
}

impl Bootloader for SystemdBoot {
    /// The slot named by loader.conf's `default` line, then the other slots in configured order.
    fn order(&self) -> Result<Vec<String>, BootError> {
        let first = self.default_slot()?;
        let mut order = vec![first.clone()];
        order.extend(self.slots.iter().filter(|s| **s != first).cloned());
        Ok(order)
    }

    /// Renames the entry to `+tries` first, then points `default` at it: a crash in between
    /// leaves the old default, never a default on an entry without boot counting.
    fn set_primary(&mut self, slot: &str, tries: u32) -> Result<(), BootError> {
        self.check_slot(slot)?;
        if tries == 0 {
            return Err(BootError::Invalid(
                "systemd-boot: set_primary needs at least one try (+0 means bad)".into(),
            ));
        }
        self.set_state(slot, SlotBootState::Trying { tries_left: tries })?;
        self.write_default(slot)
    }

    /// Drops the counter: `<prefix>-<slot>.conf`.
    fn mark_good(&mut self, slot: &str) -> Result<(), BootError> {
        self.set_state(slot, SlotBootState::Good)
    }

    /// Renames the entry to `+0`. If `default` names this slot, it is moved to the first other
    /// slot that is good or has tries left: systemd-boot boots whatever `default` matches, even
    /// an entry with no tries left (and would then rename `+0` to `+0-1`). With no such slot
    /// `default` is left alone.
    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError> {
        self.set_state(slot, SlotBootState::Bad)?;
        if self.default_slot()? != slot {
            return Ok(());
        }
        for other in self.slots.iter().filter(|s| *s != slot) {
            match self.find_entry(other)?.1 {
                SlotBootState::Good => return self.write_default(other),
                SlotBootState::Trying { tries_left } if tries_left > 0 => {
                    return self.write_default(other)
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn slot_state(&self, slot: &str) -> Result<SlotBootState, BootError> {
        Ok(self.find_entry(slot)?.1)
    }

    /// The floor's bootloader-side copy: a small file beside loader.conf on the ESP.
    fn floor(&self) -> Result<Option<u64>, BootError> {
        let path = self.floor_path();
        match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().parse().map(Some).map_err(|_| BootError::Corrupt {
                path,
                reason: format!("anti-rollback floor {:?} is not a number", t.trim()),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BootError::io(path, e)),
        }
    }

    fn set_floor(&mut self, floor: u64) -> Result<(), BootError> {
        super::write_atomic(&self.floor_path(), format!("{floor}\n").as_bytes())
    }

    fn describe(&self) -> String {
        format!(
            "systemd-boot entries {}/{}-*.conf, {}",
            self.entries_dir.display(),
            self.prefix,
            self.loader_conf.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = "title Edge OS\nlinux /vmlinuz\noptions root=PARTLABEL=rootfs-A\n";

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        /// Entries with the given file names, and loader.conf with `loader` (if any).
        fn new(entries: &[&str], loader: Option<&str>) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("loader/entries")).unwrap();
            for e in entries {
                std::fs::write(dir.path().join("loader/entries").join(e), ENTRY).unwrap();
            }
            if let Some(text) = loader {
                std::fs::write(dir.path().join("loader/loader.conf"), text).unwrap();
            }
            Fixture { dir }
        }
        fn boot(&self) -> SystemdBoot {
            SystemdBoot::new(
                self.dir.path().join("loader/entries"),
                self.dir.path().join("loader/loader.conf"),
                "edge",
                vec!["A".into(), "B".into()],
            )
            .unwrap()
        }
        fn entries(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("loader/entries"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        }
        fn loader_conf(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("loader/loader.conf")).unwrap()
        }
        /// What systemd-boot does when it boots an entry with a counter.
        fn loader_boots(&self, slot: &str) {
            let b = self.boot();
            let path = b.entry_file(slot).unwrap();
            let name = path.file_name().unwrap().to_str().unwrap();
            let (stem, counter) = name
                .strip_suffix(".conf")
                .unwrap()
                .rsplit_once('+')
                .unwrap();
            let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
            let (left, done): (u32, u32) = (left.parse().unwrap(), done.parse().unwrap());
            let next = format!("{stem}+{}-{}.conf", left.saturating_sub(1), done + 1);
            std::fs::rename(&path, path.with_file_name(next)).unwrap();
        }
    }

    const CONF: &str = "# edge loader\ntimeout 0\ndefault edge-A*\neditor no\n";

    fn trying(n: u32) -> SlotBootState {
        SlotBootState::Trying { tries_left: n }
    }

    fn corrupt_reason<T: std::fmt::Debug>(r: Result<T, BootError>) -> String {
        match r {
            Err(BootError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn states_from_file_names() {
        for (name, state) in [
            ("edge-A.conf", SlotBootState::Good),
            ("edge-A+3.conf", trying(3)),
            ("edge-A+2-1.conf", trying(2)),
            ("edge-A+1-0.conf", trying(1)),
            ("edge-A+0-3.conf", trying(0)),
            ("edge-A+0.conf", SlotBootState::Bad),
        ] {
            let fx = Fixture::new(&[name, "edge-B.conf"], Some(CONF));
            assert_eq!(fx.boot().slot_state("A").unwrap(), state, "{name}");
        }
    }

    #[test]
    fn unparseable_suffix_is_corrupt() {
        for name in [
            "edge-A+x.conf",
            "edge-A+.conf",
            "edge-A+3-.conf",
            "edge-A+-1.conf",
            "edge-A+3-1-2.conf",
            "edge-A+0-0.conf",
            "edge-A+ 3.conf",
            "edge-A+99999999999.conf",
        ] {
            let fx = Fixture::new(&[name, "edge-B.conf"], Some(CONF));
            let err = fx.boot().slot_state("A").unwrap_err();
            match &err {
                BootError::Corrupt { path, reason } => {
                    assert!(path.ends_with(name), "{name}: {err}");
                    assert!(reason.contains("counter"), "{name}: {reason}");
                }
                other => panic!("{name}: expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_entry_is_corrupt() {
        let fx = Fixture::new(&["edge-B.conf", "other-os.conf"], Some(CONF));
        let reason = corrupt_reason(fx.boot().slot_state("A"));
        assert!(reason.contains("no boot entry edge-A"), "{reason}");
    }

    #[test]
    fn two_entries_for_one_slot_is_corrupt() {
        let fx = Fixture::new(
            &["edge-A.conf", "edge-A+2-1.conf", "edge-B.conf"],
            Some(CONF),
        );
        let reason = corrupt_reason(fx.boot().slot_state("A"));
        assert!(reason.contains("2 entries"), "{reason}");
        assert!(reason.contains("edge-A+2-1.conf"), "{reason}");
        // The rename operations refuse too, touching nothing.
        assert!(fx.boot().mark_good("A").is_err());
        assert_eq!(fx.entries().len(), 3);
    }

    #[test]
    fn unrelated_files_are_ignored() {
        let fx = Fixture::new(
            &[
                "edge-A.conf",
                "edge-B+1.conf",
                "edge-A.conf.bak",
                "edge-AB.conf",
                "other-edge-A.conf",
                "debian.conf",
            ],
            Some(CONF),
        );
        let b = fx.boot();
        assert_eq!(b.slot_state("A").unwrap(), SlotBootState::Good);
        assert_eq!(b.slot_state("B").unwrap(), trying(1));
    }

    #[test]
    fn unknown_slot_is_refused() {
        let fx = Fixture::new(&["edge-A.conf", "edge-B.conf", "edge-C.conf"], Some(CONF));
        let mut b = fx.boot();
        assert!(matches!(b.slot_state("C"), Err(BootError::UnknownSlot(s)) if s == "C"));
        assert!(matches!(
            b.set_primary("C", 3),
            Err(BootError::UnknownSlot(_))
        ));
        assert!(matches!(b.mark_good("C"), Err(BootError::UnknownSlot(_))));
        assert!(matches!(b.mark_bad("C"), Err(BootError::UnknownSlot(_))));
        assert_eq!(fx.loader_conf(), CONF);
    }

    #[test]
    fn set_primary_renames_and_rewrites_default() {
        let fx = Fixture::new(&["edge-A.conf", "edge-B+0.conf"], Some(CONF));
        let mut b = fx.boot();
        assert_eq!(b.order().unwrap(), ["A", "B"]);
        b.set_primary("B", 3).unwrap();
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B+3.conf"]);
        assert_eq!(
            fx.loader_conf(),
            "# edge loader\ntimeout 0\ndefault edge-B*\neditor no\n"
        );
        assert_eq!(b.order().unwrap(), ["B", "A"]);
        assert_eq!(b.slot_state("B").unwrap(), trying(3));
        assert_eq!(b.next_boot().unwrap().as_deref(), Some("B"));
        // Entry content is untouched by renames.
        assert_eq!(
            std::fs::read_to_string(b.entry_file("B").unwrap()).unwrap(),
            ENTRY
        );
        // No temp files left.
        let loader_dir: Vec<_> = std::fs::read_dir(fx.dir.path().join("loader"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(loader_dir.len(), 2, "{loader_dir:?}");
    }

    #[test]
    fn set_primary_from_every_state() {
        for name in [
            "edge-A.conf",
            "edge-A+0.conf",
            "edge-A+0-3.conf",
            "edge-A+1-2.conf",
            "edge-A+5.conf",
        ] {
            let fx = Fixture::new(&[name, "edge-B.conf"], Some("default edge-B.conf\n"));
            fx.boot().set_primary("A", 5).unwrap();
            assert_eq!(fx.entries(), ["edge-A+5.conf", "edge-B.conf"], "{name}");
            assert_eq!(fx.loader_conf(), "default edge-A*\n");
        }
    }

    #[test]
    fn set_primary_zero_tries_is_refused() {
        let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], Some(CONF));
        assert!(matches!(
            fx.boot().set_primary("B", 0),
            Err(BootError::Invalid(_))
        ));
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B.conf"]);
    }

    #[test]
    fn set_primary_with_missing_entry_changes_nothing() {
        let fx = Fixture::new(&["edge-A.conf"], Some(CONF));
        assert!(corrupt_reason(fx.boot().set_primary("B", 3)).contains("no boot entry"));
        assert_eq!(fx.loader_conf(), CONF);
    }

    #[test]
    fn set_primary_adds_or_creates_default() {
        let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], Some("timeout 3"));
        fx.boot().set_primary("B", 2).unwrap();
        assert_eq!(fx.loader_conf(), "timeout 3\ndefault edge-B*\n");

        let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], None);
        fx.boot().set_primary("A", 2).unwrap();
        assert_eq!(fx.loader_conf(), "default edge-A*\n");

        // Duplicate default lines are collapsed into one.
        let fx = Fixture::new(
            &["edge-A.conf", "edge-B.conf"],
            Some("default edge-A*\ntimeout 1\n  default   edge-B.conf\n"),
        );
        fx.boot().set_primary("B", 2).unwrap();
        assert_eq!(fx.loader_conf(), "default edge-B*\ntimeout 1\n");
    }

    #[test]
    fn mark_good_drops_the_counter() {
        for name in [
            "edge-B+3.conf",
            "edge-B+2-1.conf",
            "edge-B+0-3.conf",
            "edge-B+0.conf",
        ] {
            let fx = Fixture::new(&["edge-A.conf", name], Some(CONF));
            fx.boot().mark_good("B").unwrap();
            assert_eq!(fx.entries(), ["edge-A.conf", "edge-B.conf"], "{name}");
            assert_eq!(fx.boot().slot_state("B").unwrap(), SlotBootState::Good);
        }
        // Already good: nothing to do.
        let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], Some(CONF));
        fx.boot().mark_good("A").unwrap();
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B.conf"]);
    }

    #[test]
    fn mark_bad_renames_to_plus_zero() {
        let fx = Fixture::new(&["edge-A.conf", "edge-B+2-1.conf"], Some(CONF));
        let mut b = fx.boot();
        b.mark_bad("B").unwrap();
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B+0.conf"]);
        assert_eq!(b.slot_state("B").unwrap(), SlotBootState::Bad);
        // B was not the default: loader.conf untouched.
        assert_eq!(fx.loader_conf(), CONF);
    }

    #[test]
    fn mark_bad_moves_default_off_the_bad_slot() {
        let fx = Fixture::new(&["edge-A+2-1.conf", "edge-B.conf"], Some(CONF));
        let mut b = fx.boot();
        b.mark_bad("A").unwrap();
        assert_eq!(fx.entries(), ["edge-A+0.conf", "edge-B.conf"]);
        assert_eq!(
            fx.loader_conf(),
            "# edge loader\ntimeout 0\ndefault edge-B*\neditor no\n"
        );
        assert_eq!(b.order().unwrap(), ["B", "A"]);
        assert_eq!(b.next_boot().unwrap().as_deref(), Some("B"));
    }

    #[test]
    fn mark_bad_keeps_default_when_nothing_else_boots() {
        let fx = Fixture::new(&["edge-A.conf", "edge-B+0.conf"], Some(CONF));
        let mut b = fx.boot();
        b.mark_bad("A").unwrap();
        assert_eq!(fx.entries(), ["edge-A+0.conf", "edge-B+0.conf"]);
        assert_eq!(fx.loader_conf(), CONF);
        assert_eq!(b.next_boot().unwrap(), None);
    }

    #[test]
    fn update_cycle_with_loader_counting() {
        // A good and default; B gets an update and is tried 3 times by the loader.
        let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], Some(CONF));
        let mut b = fx.boot();
        b.set_primary("B", 3).unwrap();
        for left in [2, 1, 0] {
            fx.loader_boots("B");
            assert_eq!(b.slot_state("B").unwrap(), trying(left));
        }
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B+0-3.conf"]);
        // Used up: order still names B first, but the next bootable slot is A.
        assert_eq!(b.order().unwrap(), ["B", "A"]);
        assert_eq!(b.next_boot().unwrap().as_deref(), Some("A"));
        b.mark_bad("B").unwrap();
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B+0.conf"]);
        assert_eq!(b.order().unwrap(), ["A", "B"]);

        // Reinstall B, try it once, confirm it.
        b.set_primary("B", 3).unwrap();
        fx.loader_boots("B");
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B+2-1.conf"]);
        b.mark_good("B").unwrap();
        assert_eq!(fx.entries(), ["edge-A.conf", "edge-B.conf"]);
        assert_eq!(b.next_boot().unwrap().as_deref(), Some("B"));
    }

    #[test]
    fn order_accepts_the_default_forms() {
        for line in [
            "default edge-B*",
            "default edge-B.conf",
            "default\tedge-b.CONF",
            "  default   \"edge-B*\"  ",
        ] {
            let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], Some(&format!("{line}\n")));
            assert_eq!(fx.boot().order().unwrap(), ["B", "A"], "{line}");
        }
    }

    #[test]
    fn bad_default_is_corrupt() {
        for (text, want) in [
            ("timeout 3\n", "no `default`"),
            ("#default edge-A*\n", "no `default`"),
            ("default edge-A\n", "names no slot"),
            ("default edge-*\n", "names no slot"),
            ("default edge-C*\n", "names no slot"),
            ("default @saved\n", "names no slot"),
            ("default edge-A*\ndefault edge-B*\n", "2 `default` lines"),
        ] {
            let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], Some(text));
            let err = fx.boot().order().unwrap_err();
            match &err {
                BootError::Corrupt { path, reason } => {
                    assert!(path.ends_with("loader.conf"), "{text:?}: {err}");
                    assert!(reason.contains(want), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_loader_conf_is_an_io_error() {
        let fx = Fixture::new(&["edge-A.conf", "edge-B.conf"], None);
        assert!(matches!(fx.boot().order(), Err(BootError::Io { .. })));
    }

    #[test]
    fn missing_entries_dir_is_an_io_error() {
        let fx = Fixture::new(&[], Some(CONF));
        std::fs::remove_dir(fx.dir.path().join("loader/entries")).unwrap();
        assert!(matches!(
            fx.boot().slot_state("A"),
            Err(BootError::Io { .. })
        ));
    }

    #[test]
    fn invalid_names_are_refused() {
        let new = |prefix: &str, slots: &[&str]| {
            SystemdBoot::new(
                "/e",
                "/l",
                prefix,
                slots.iter().map(|s| s.to_string()).collect(),
            )
        };
        assert!(new("edge", &["A", "B"]).is_ok());
        for (prefix, slots) in [
            ("", &["A", "B"][..]),
            ("ed+ge", &["A", "B"]),
            ("edge", &[]),
            ("edge", &["A", ""]),
            ("edge", &["A+1", "B"]),
            ("edge", &["A", "B/C"]),
            ("edge", &["A B", "C"]),
            ("edge", &["A*", "B"]),
            ("edge", &["A", "AB"]),
            ("edge", &["A", "a"]),
        ] {
            assert!(
                matches!(new(prefix, slots), Err(BootError::Invalid(_))),
                "{prefix:?} {slots:?}"
            );
        }
    }

    #[test]
    fn describe_names_the_paths() {
        let fx = Fixture::new(&[], Some(CONF));
        let d = fx.boot().describe();
        assert!(
            d.contains("loader/entries/edge-*.conf") && d.contains("loader.conf"),
            "{d}"
        );
    }
}
