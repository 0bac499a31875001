//! Device configuration (`/etc/edge-ota/config.toml`): trust, compatible string, slots, state
//! directory, bootloader backend, health probes.
//!
//! Every host path the updater touches comes from here, so the same code runs on a device,
//! on loop devices and in tests.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};

pub const DEFAULT_PATH: &str = "/etc/edge-ota/config.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Product/hardware string a bundle must carry to be installed here.
    pub compatible: String,
    /// Where persistent state lives (on the data partition, not in a slot).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Kernel command line to read the booted slot from (`edgeota.slot=NAME`).
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// Mount table: a target slot mounted anywhere is refused.
    #[serde(default = "default_mountinfo")]
    pub mountinfo: PathBuf,
    /// Boot attempts a new slot gets before the bootloader falls back.
    #[serde(default = "default_tries")]
    pub tries: u32,
    pub trust: TrustConfig,
    /// Disk holding the slots, when slots are given by GPT partition name.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    #[serde(rename = "slot")]
    pub slots: Vec<SlotConfig>,
    pub bootloader: BootloaderConfig,
    #[serde(default)]
    pub health: crate::health::HealthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// PEM public keys (SubjectPublicKeyInfo).
    pub keys: Vec<PathBuf>,
    #[serde(default = "one")]
    pub threshold: usize,
}

/// One A/B slot. Its root filesystem is either a device path (block device or, in tests, a
/// regular file) or a GPT partition name on `disk`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    pub name: String,
    #[serde(default)]
    pub device: Option<PathBuf>,
    #[serde(default)]
    pub partlabel: Option<String>,
    /// Directory for this slot's non-image payloads (kernel files, container image archives,
    /// plain files). Optional: bundles with such payloads are refused without it.
    #[serde(default)]
    pub files_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BootloaderConfig {
    pub backend: BackendKind,
    /// grub: the grubenv file; uboot: the fw_env.config; file: the state file;
    /// systemd-boot: the ESP (holding loader/loader.conf and loader/entries/).
    pub path: PathBuf,
    /// systemd-boot: entry file name prefix (`<prefix>-<slot>.conf`).
    #[serde(default = "default_entry_prefix")]
    pub entry_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Grub,
    Uboot,
    SystemdBoot,
    File,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/edge-ota".into()
}
fn default_cmdline() -> PathBuf {
    "/proc/cmdline".into()
}
fn default_mountinfo() -> PathBuf {
    "/proc/self/mountinfo".into()
}
fn default_tries() -> u32 {
    3
}
fn one() -> usize {
    1
}
fn default_entry_prefix() -> String {
    "edge".into()
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .ctx(|| format!("reading configuration {}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let err = |reason: String| Error::Config {
            path: path.into(),
            reason,
        };
        let c: Config = toml::from_str(text).map_err(|e| err(e.message().to_string()))?;
        if c.slots.len() < 2 {
            return Err(err("at least two slots are needed".into()));
        }
        for (i, s) in c.slots.iter().enumerate() {
            // Slot names become bootloader variable names and kernel arguments.
            if s.name.is_empty()
                || s.name.len() > 16
                || !s
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            {
                return Err(err(format!(
                    "slot name {:?}: use letters, digits, _",
                    s.name
                )));
            }
            if c.slots[..i].iter().any(|o| o.name == s.name) {
                return Err(err(format!("slot {:?} listed twice", s.name)));
            }
            match (&s.device, &s.partlabel) {
                (Some(_), None) => {}
                (None, Some(_)) if c.disk.is_some() => {}
                (None, Some(_)) => {
                    return Err(err(format!("slot {:?}: partlabel needs `disk`", s.name)))
                }
                _ => {
                    return Err(err(format!(
                        "slot {:?}: give exactly one of device, partlabel",
                        s.name
                    )))
                }
            }
        }
        if c.trust.keys.is_empty() {
            return Err(err(
                "trust.keys is empty: no bundle could ever be accepted".into()
            ));
        }
        if c.trust.threshold == 0 || c.trust.threshold > c.trust.keys.len() {
            return Err(err(format!(
                "trust.threshold {} must be between 1 and the number of keys ({})",
                c.trust.threshold,
                c.trust.keys.len()
            )));
        }
        if c.tries == 0 || c.tries > 9 {
            return Err(err(format!("tries {} must be 1..9", c.tries)));
        }
        Ok(c)
    }

    /// The trusted keys, loaded.
    pub fn trusted_keys(&self) -> Result<crate::verify::TrustedKeys> {
        let keys = self
            .trust
            .keys
            .iter()
            .map(|p| crate::verify::read_public_key(p))
            .collect::<Result<Vec<_>>>()?;
        crate::verify::TrustedKeys::new(keys, self.trust.threshold)
    }

    pub fn slot(&self, name: &str) -> Result<&SlotConfig> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::Slot(format!("no slot named {name:?} in the configuration")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
compatible = "edge-x86_64"
[trust]
keys = ["/k.pub"]
[[slot]]
name = "A"
device = "/dev/vda3"
[[slot]]
name = "B"
device = "/dev/vda4"
[bootloader]
backend = "grub"
path = "/boot/grub/grubenv"
"#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(OK, Path::new("c.toml")).unwrap();
        assert_eq!(c.tries, 3);
        assert_eq!(c.trust.threshold, 1);
        assert_eq!(c.state_dir, Path::new("/var/lib/edge-ota"));
        assert_eq!(c.bootloader.backend, BackendKind::Grub);
    }

    #[test]
    fn threshold_above_key_count_is_refused() {
        let bad = OK.replace("keys = [\"/k.pub\"]", "keys = [\"/k.pub\"]\nthreshold = 2");
        let e = Config::parse(&bad, Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("threshold"), "{e}");
    }

    #[test]
    fn unsafe_slot_name_is_refused() {
        let bad = OK.replace("name = \"A\"", "name = \"A B\"");
        assert!(Config::parse(&bad, Path::new("c.toml")).is_err());
    }

    #[test]
    fn unknown_key_is_refused() {
        let bad = format!("{OK}\nfoo = 1\n");
        assert!(Config::parse(&bad, Path::new("c.toml")).is_err());
    }
}
