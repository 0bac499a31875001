//! Device configuration (`/etc/edge-ota/config.toml`): trust, compatible string, slots, state
//! directory, bootloader backend, health probes.
//!
//! Every host path the updater touches comes from here, so the same code runs on a device,
//! on loop devices and in tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// sysfs: a target slot held by device-mapper or md (`holders/`) is refused.
    #[serde(default = "default_sysfs")]
    pub sysfs: PathBuf,
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
    pub health: HealthConfig,
    /// HTTP(S) sources: timeouts, retries, rate, extra CA, client certificate.
    #[serde(default)]
    pub network: crate::source::http::HttpOptions,
    /// Refuse an update that would download more than this many bytes (`--max-download`).
    #[serde(default)]
    pub max_download: Option<u64>,
    /// Where `fetch` stages bundles (default: `<state_dir>/cache`, on the data partition).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Where `--source auto` looks, in which order: media, LAN caches, the upstream.
    #[serde(default)]
    pub sources: SourcesConfig,
    /// `edge-ota serve` on this device (a base station).
    #[serde(default)]
    pub serve: Option<ServeConfig>,
    /// containerd, into which the agent loads a slot's container images (`[containerd]`);
    /// absent: a bundle carrying container images is not loaded anywhere, and the agent
    /// refuses it.
    #[serde(default)]
    pub containerd: Option<ContainerdConfig>,
    /// `edge-ota agent`: desired-state providers, policy, local API, metrics, reboots.
    #[serde(default)]
    pub agent: Option<AgentConfig>,
}

/// containerd (`[containerd]`): reached with its own `ctr` client, so what is imported is
/// exactly what containerd's own tooling does and shows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerdConfig {
    #[serde(default = "default_ctr")]
    pub ctr: PathBuf,
    /// containerd's API socket.
    #[serde(default = "default_containerd_address")]
    pub address: PathBuf,
    /// The namespace kubelet's CRI plugin uses.
    #[serde(default = "default_containerd_namespace")]
    pub namespace: String,
    /// An import making no progress for this long fails (idle, not total: a large archive on
    /// a slow disk may take minutes).
    #[serde(default = "default_containerd_timeout")]
    pub timeout_secs: u64,
    /// Snapshotter to unpack imported images into (`native` where the kernel has no
    /// overlayfs); default: containerd's.
    #[serde(default)]
    pub snapshotter: Option<String>,
}

fn default_ctr() -> PathBuf {
    PathBuf::from("/usr/bin/ctr")
}
fn default_containerd_address() -> PathBuf {
    PathBuf::from("/run/containerd/containerd.sock")
}
fn default_containerd_namespace() -> String {
    "k8s.io".into()
}
fn default_containerd_timeout() -> u64 {
    600
}

/// The agent (`[agent]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The local API: HTTP on this Unix socket, mode 0600 (root only) unless `socket_mode`.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    /// Prometheus `/metrics` on this TCP address (e.g. `127.0.0.1:9100`); off when absent.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Desired-state provider: a local file (YAML or JSON), watched; a GitOps tool or a
    /// person writes it.
    #[serde(default)]
    pub desired_file: Option<PathBuf>,
    /// Desired-state provider: an http(s) URL, polled every `poll_secs` with `ETag`.
    #[serde(default)]
    pub desired_url: Option<String>,
    #[serde(default = "default_poll")]
    pub poll_secs: u64,
    /// A desired state that failed this many times is given up (until it changes).
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// First pause after a failure; doubled after each, up to `retry_max_secs`.
    #[serde(default = "default_retry")]
    pub retry_secs: u64,
    #[serde(default = "default_retry_max")]
    pub retry_max_secs: u64,
    /// Changes on every boot: tells "the reboot has not happened yet" from "we rebooted".
    #[serde(default = "default_boot_id")]
    pub boot_id: PathBuf,
    /// Desired states may add health probes of kinds http, tcp and file; `command` probes
    /// run as root, and the desired state is not signed, so they need this.
    #[serde(default)]
    pub allow_command_probes: bool,
    /// Maintenance windows for desired states that name none (and for removable media).
    #[serde(default, rename = "window")]
    pub windows: Vec<crate::schedule::WindowSpec>,
    #[serde(default)]
    pub reboot: RebootConfig,
    #[serde(default)]
    pub media: MediaConfig,
    /// Coordinated reboots in a Kubernetes cluster (`[agent.kubernetes]`); off when absent.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

/// The agent as a member of a Kubernetes cluster (`[agent.kubernetes]`): it watches the
/// `OSUpdate`s selecting its node and reboots only with a `maxUnavailable` Lease, drained.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Kubeconfig of the agent's own least-privilege identity (deploy/kubernetes/rbac.yaml).
    pub kubeconfig: PathBuf,
    /// This node's name in the cluster.
    pub node_name: String,
    /// Namespace of the Leases that count the nodes rebooting at once.
    #[serde(default = "default_lease_namespace")]
    pub lease_namespace: String,
    /// A cluster of one: nothing is evicted (there is nowhere to go); `[agent.reboot] before`
    /// stops kubelet and containerd in order before the reboot.
    #[serde(default)]
    pub single_node: bool,
    /// How long a Lease outlives its holder's last renewal: must cover a reboot and the
    /// health gate, else a second node could start while the first is still down.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// Seconds between looks while waiting for a Lease, evictions or the node's `Ready`.
    #[serde(default = "default_kube_poll")]
    pub poll_secs: u64,
    /// The kubelet's health endpoint, a required probe of the first boot of every update
    /// from an OSUpdate (a new OS whose kubelet does not come up is rolled back by the health
    /// gate, not uncordoned); empty: not added.
    #[serde(default = "default_kubelet_healthz")]
    pub kubelet_healthz: String,
}

fn default_lease_namespace() -> String {
    "edge-ota-system".into()
}
fn default_lease_secs() -> u64 {
    900
}
fn default_kube_poll() -> u64 {
    5
}
/// The kubelet's default `healthzBindAddress` and `healthzPort`.
pub fn default_kubelet_healthz() -> String {
    "http://127.0.0.1:10248/healthz".into()
}

/// How the agent reboots into a new slot (`[agent.reboot]`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RebootConfig {
    /// Commands (argv, no shell) run in order first, e.g. stopping kubelet and containerd;
    /// a failing one is logged and the reboot goes on.
    #[serde(default)]
    pub before: Vec<Vec<String>>,
    /// The reboot itself (e.g. `["systemctl", "reboot"]`); default: sync and reboot(2).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Limit for each `before` command, seconds (default 120).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// What a plugged-in stick carrying a bundle for this device does (`[agent.media]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaConfig {
    #[serde(default)]
    pub mode: MediaMode,
    /// Where sticks are mounted (read-only, nosuid, nodev, noexec).
    #[serde(default = "default_media_dir")]
    pub mount_dir: PathBuf,
    /// Device nodes (`/dev`).
    #[serde(default = "default_dev")]
    pub dev: PathBuf,
    /// Seconds between looks for new block devices.
    #[serde(default = "default_media_poll")]
    pub poll_secs: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            mode: MediaMode::Off,
            mount_dir: default_media_dir(),
            dev: default_dev(),
            poll_secs: default_media_poll(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediaMode {
    /// Sticks are ignored.
    #[default]
    Off,
    /// Stage the bundle; apply only when asked (API or a desired state).
    Stage,
    /// Stage, then apply in the next maintenance window.
    Window,
    /// Stage and apply at once.
    Now,
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

/// The per-boot health gate (`[health]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// All required probes must pass together before this deadline.
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    /// Pause between rounds of probes.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Watchdog device to pet until the verdict (e.g. /dev/watchdog).
    #[serde(default)]
    pub watchdog: Option<PathBuf>,
    /// Confirm a slot although no required probe checks anything. Off by default: with
    /// nothing checked, "healthy" would mean "booted", which the bootloader already knows.
    #[serde(default)]
    pub allow_no_probes: bool,
    #[serde(default, rename = "probe")]
    pub probes: Vec<ProbeConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            deadline_secs: default_deadline(),
            interval_ms: default_interval(),
            watchdog: None,
            allow_no_probes: false,
            probes: Vec::new(),
        }
    }
}

impl HealthConfig {
    /// Required probes: the ones that decide the verdict.
    pub fn required(&self) -> usize {
        self.probes.iter().filter(|p| p.required).count()
    }
}

/// One health probe (`[[health.probe]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawProbe")]
pub struct ProbeConfig {
    pub name: String,
    /// Required probes decide the verdict; optional ones are only logged.
    pub required: bool,
    pub timeout_secs: u64,
    pub check: Check,
}

/// What a probe checks.
#[derive(Debug, Clone)]
pub enum Check {
    /// Exit status 0 passes. `command` is argv (no shell).
    Command { command: Vec<String> },
    /// A 2xx answer passes. `ca_file` is a PEM CA for https (e.g. the cluster CA).
    Http {
        url: String,
        ca_file: Option<PathBuf>,
    },
    /// A completed TCP connect passes.
    Tcp { address: String },
    /// The path existing passes.
    File { path: PathBuf },
}

/// A probe as written: every field of every kind, unknown ones refused (serde cannot refuse
/// unknown fields through a flattened tagged enum), then checked for its kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    name: String,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default = "default_probe_timeout")]
    timeout_secs: u64,
    kind: String,
    command: Option<Vec<String>>,
    url: Option<String>,
    ca_file: Option<PathBuf>,
    address: Option<String>,
    path: Option<PathBuf>,
}

impl TryFrom<RawProbe> for ProbeConfig {
    type Error = String;
    fn try_from(r: RawProbe) -> std::result::Result<Self, String> {
        let stray = |allowed: &[&str]| -> std::result::Result<(), String> {
            let given = [
                ("command", r.command.is_some()),
                ("url", r.url.is_some()),
                ("ca_file", r.ca_file.is_some()),
                ("address", r.address.is_some()),
                ("path", r.path.is_some()),
            ];
            match given.iter().find(|(f, set)| *set && !allowed.contains(f)) {
                Some((f, _)) => Err(format!(
                    "health probe {:?}: `{f}` does not apply to kind {:?}",
                    r.name, r.kind
                )),
                None => Ok(()),
            }
        };
        let missing = |f: &str| format!("health probe {:?}: kind {:?} needs `{f}`", r.name, r.kind);
        let check = match r.kind.as_str() {
            "command" => {
                stray(&["command"])?;
                Check::Command {
                    command: r.command.clone().ok_or_else(|| missing("command"))?,
                }
            }
            "http" => {
                stray(&["url", "ca_file"])?;
                Check::Http {
                    url: r.url.clone().ok_or_else(|| missing("url"))?,
                    ca_file: r.ca_file.clone(),
                }
            }
            "tcp" => {
                stray(&["address"])?;
                Check::Tcp {
                    address: r.address.clone().ok_or_else(|| missing("address"))?,
                }
            }
            "file" => {
                stray(&["path"])?;
                Check::File {
                    path: r.path.clone().ok_or_else(|| missing("path"))?,
                }
            }
            other => {
                return Err(format!(
                    "health probe {:?}: unknown kind {other:?} (command, http, tcp, file)",
                    r.name
                ))
            }
        };
        Ok(ProbeConfig {
            name: r.name,
            required: r.required,
            timeout_secs: r.timeout_secs,
            check,
        })
    }
}

/// Bounds of every duration and count in the configuration: a typo must be a configuration
/// error, not an overflow or a gate that never ends.
pub mod bounds {
    pub const DEADLINE_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;
    pub const INTERVAL_MS: std::ops::RangeInclusive<u64> = 10..=600_000;
    pub const PROBE_TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=3_600;
    pub const TRIES: std::ops::RangeInclusive<u32> = 1..=9;
    pub const PROBES: usize = 64;
    pub const KEYS: usize = 32;
}

fn yes() -> bool {
    true
}
fn default_probe_timeout() -> u64 {
    5
}
fn default_deadline() -> u64 {
    300
}
fn default_interval() -> u64 {
    2000
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
fn default_sysfs() -> PathBuf {
    "/sys".into()
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
fn default_socket() -> PathBuf {
    "/run/edge-ota/agent.sock".into()
}
fn default_socket_mode() -> u32 {
    0o600
}
fn default_poll() -> u64 {
    300
}
fn default_max_failures() -> u32 {
    5
}
fn default_retry() -> u64 {
    60
}
fn default_retry_max() -> u64 {
    3600
}
fn default_boot_id() -> PathBuf {
    "/proc/sys/kernel/random/boot_id".into()
}
fn default_media_dir() -> PathBuf {
    "/run/edge-ota/media".into()
}
fn default_dev() -> PathBuf {
    "/dev".into()
}
fn default_media_poll() -> u64 {
    2
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
        check_slots_distinct(&c.slots).map_err(err)?;
        if c.trust.keys.is_empty() {
            return Err(err(
                "trust.keys is empty: no bundle could ever be accepted".into()
            ));
        }
        if c.trust.keys.len() > bounds::KEYS {
            return Err(err(format!("more than {} trust.keys", bounds::KEYS)));
        }
        for (i, k) in c.trust.keys.iter().enumerate() {
            if c.trust.keys[..i].contains(k) {
                return Err(err(format!(
                    "trust.keys lists {} twice: a threshold counts distinct keys",
                    k.display()
                )));
            }
        }
        if c.trust.threshold == 0 || c.trust.threshold > c.trust.keys.len() {
            return Err(err(format!(
                "trust.threshold {} must be between 1 and the number of keys ({})",
                c.trust.threshold,
                c.trust.keys.len()
            )));
        }
        if !bounds::TRIES.contains(&c.tries) {
            return Err(err(format!("tries {} must be 1..9", c.tries)));
        }
        check_health(&c.health).map_err(err)?;
        c.network
            .validate()
            .map_err(|e| err(format!("[network]: {e}")))?;
        c.sources.validate().map_err(err)?;
        if let Some(s) = &c.serve {
            s.validate().map_err(|e| err(format!("[serve]: {e}")))?;
        }
        if let Some(a) = &c.agent {
            check_agent(a).map_err(|e| err(format!("[agent]: {e}")))?;
        }
        Ok(c)
    }

    /// The trusted keys, loaded. Two files holding the same key are refused: the threshold
    /// counts distinct keys.
    pub fn trusted_keys(&self) -> Result<crate::bundle::signature::TrustedKeys> {
        use crate::bundle::signature::{read_public_key, TrustedKeys};
        let keys = self
            .trust
            .keys
            .iter()
            .map(|p| read_public_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedKeys::new(keys, self.trust.threshold)?)
    }

    /// The staging cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("cache"))
    }

    pub fn slot(&self, name: &str) -> Result<&SlotConfig> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::Slot(format!("no slot named {name:?} in the configuration")))
    }
}

/// Two slots must never name the same device, partition or file directory, nor one file
/// directory inside another: an apply to one would overwrite the other. (The devices are
/// compared again by identity, after resolving links, when an apply opens them.)
fn check_slots_distinct(slots: &[SlotConfig]) -> std::result::Result<(), String> {
    for (i, s) in slots.iter().enumerate() {
        for o in &slots[..i] {
            let same = |a: &Option<PathBuf>, b: &Option<PathBuf>| matches!((a, b), (Some(a), Some(b)) if normalize(a) == normalize(b));
            if same(&s.device, &o.device) {
                return Err(format!(
                    "slots {:?} and {:?} name the same device",
                    o.name, s.name
                ));
            }
            if s.partlabel.is_some() && s.partlabel == o.partlabel {
                return Err(format!(
                    "slots {:?} and {:?} name the same partition",
                    o.name, s.name
                ));
            }
            if let (Some(a), Some(b)) = (&s.files_dir, &o.files_dir) {
                let (a, b) = (normalize(a), normalize(b));
                if a.starts_with(&b) || b.starts_with(&a) {
                    return Err(format!(
                        "slots {:?} and {:?} share a files_dir ({} and {})",
                        o.name,
                        s.name,
                        b.display(),
                        a.display()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A path without `.` components, repeated or trailing slashes (lexically: no link is followed).
fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// A DNS-1123 name as Kubernetes wants node names and namespaces.
fn dns_name(what: &str, s: &str, max: usize) -> std::result::Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "kubernetes.{what} {s:?} is not a DNS name (lowercase, digits, '-', '.', at most {max})"
        ))
    }
}

fn check_kubernetes(k: &KubernetesConfig, a: &AgentConfig) -> std::result::Result<(), String> {
    dns_name("node_name", &k.node_name, 253)?;
    dns_name("lease_namespace", &k.lease_namespace, 63)?;
    if !(30..=86_400).contains(&k.lease_secs) {
        return Err(format!(
            "kubernetes.lease_secs {} must be 30..=86400",
            k.lease_secs
        ));
    }
    if !(1..=600).contains(&k.poll_secs) {
        return Err(format!(
            "kubernetes.poll_secs {} must be 1..=600",
            k.poll_secs
        ));
    }
    if k.poll_secs * 3 > k.lease_secs {
        return Err("kubernetes.lease_secs must be at least 3 × poll_secs (renewals)".into());
    }
    let h = &k.kubelet_healthz;
    if !h.is_empty() && !h.starts_with("http://") && !h.starts_with("https://") {
        return Err(format!(
            "kubernetes.kubelet_healthz {:?} must be an http(s) URL, or empty for none",
            k.kubelet_healthz
        ));
    }
    if k.single_node && a.reboot.before.is_empty() {
        return Err(
            "kubernetes.single_node needs [agent.reboot] before = [...] stopping kubelet and \
             containerd in order (nothing is evicted on a single node)"
                .into(),
        );
    }
    Ok(())
}

fn check_agent(a: &AgentConfig) -> std::result::Result<(), String> {
    let within = |name: &str, v: u64, r: std::ops::RangeInclusive<u64>| {
        if r.contains(&v) {
            Ok(())
        } else {
            Err(format!("{name} {v} must be {}..={}", r.start(), r.end()))
        }
    };
    within("poll_secs", a.poll_secs, 1..=86_400)?;
    within("retry_secs", a.retry_secs, 1..=86_400)?;
    within(
        "retry_max_secs",
        a.retry_max_secs,
        a.retry_secs..=7 * 86_400,
    )?;
    within("max_failures", u64::from(a.max_failures), 1..=1000)?;
    within("media.poll_secs", a.media.poll_secs, 1..=3_600)?;
    if let Some(t) = a.reboot.timeout_secs {
        within("reboot.timeout_secs", t, 1..=3_600)?;
    }
    if a.socket_mode & !0o777 != 0 {
        return Err(format!(
            "socket_mode {:o} is not a permission mode",
            a.socket_mode
        ));
    }
    for c in a.reboot.before.iter().chain(a.reboot.command.iter()) {
        if c.is_empty() {
            return Err("an empty command in [agent.reboot]".into());
        }
    }
    if let Some(u) = &a.desired_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(format!("desired_url {u:?} is not an http(s) URL"));
        }
    }
    if let Some(m) = &a.metrics {
        m.parse::<std::net::SocketAddr>()
            .map_err(|e| format!("metrics address {m:?}: {e}"))?;
    }
    crate::schedule::Windows::compile(&a.windows)?;
    if let Some(k) = &a.kubernetes {
        check_kubernetes(k, a)?;
    }
    if a.media.mode == MediaMode::Window && a.windows.is_empty() {
        return Err("media.mode = \"window\" needs at least one [[agent.window]]".into());
    }
    Ok(())
}

fn check_health(h: &HealthConfig) -> std::result::Result<(), String> {
    if !bounds::DEADLINE_SECS.contains(&h.deadline_secs) {
        return Err(format!(
            "health.deadline_secs {} must be {}..={}",
            h.deadline_secs,
            bounds::DEADLINE_SECS.start(),
            bounds::DEADLINE_SECS.end()
        ));
    }
    if !bounds::INTERVAL_MS.contains(&h.interval_ms) {
        return Err(format!(
            "health.interval_ms {} must be {}..={}",
            h.interval_ms,
            bounds::INTERVAL_MS.start(),
            bounds::INTERVAL_MS.end()
        ));
    }
    if h.probes.len() > bounds::PROBES {
        return Err(format!("more than {} health probes", bounds::PROBES));
    }
    for (i, p) in h.probes.iter().enumerate() {
        if p.name.is_empty() || h.probes[..i].iter().any(|o| o.name == p.name) {
            return Err(format!(
                "health probe name {:?} is empty or repeated",
                p.name
            ));
        }
        if !bounds::PROBE_TIMEOUT_SECS.contains(&p.timeout_secs) {
            return Err(format!(
                "health probe {:?}: timeout_secs {} must be {}..={}",
                p.name,
                p.timeout_secs,
                bounds::PROBE_TIMEOUT_SECS.start(),
                bounds::PROBE_TIMEOUT_SECS.end()
            ));
        }
        if let Check::Command { command } = &p.check {
            if command.is_empty() {
                return Err(format!("health probe {:?}: empty command", p.name));
            }
        }
    }
    if h.required() == 0 && !h.allow_no_probes {
        return Err(
            "no required health probe: a slot would be confirmed without anything being checked \
             (add a [[health.probe]], or set health.allow_no_probes = true to accept that)"
                .into(),
        );
    }
    Ok(())
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
[[health.probe]]
name = "kubelet"
kind = "http"
url = "http://127.0.0.1:10248/healthz"
"#;

    fn refused(text: &str) -> String {
        Config::parse(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string()
    }

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

    #[test]
    fn config_without_required_probe_is_refused_unless_allowed() {
        let none = OK.replace("[[health.probe]]\nname = \"kubelet\"\nkind = \"http\"\nurl = \"http://127.0.0.1:10248/healthz\"\n", "");
        assert!(refused(&none).contains("no required health probe"));
        let optional = OK.replace("kind = \"http\"", "required = false\nkind = \"http\"");
        assert!(refused(&optional).contains("no required health probe"));
        let allowed = none.replace(
            "[bootloader]",
            "[health]\nallow_no_probes = true\n[bootloader]",
        );
        assert!(
            Config::parse(&allowed, Path::new("c.toml"))
                .unwrap()
                .health
                .allow_no_probes
        );
    }

    #[test]
    fn huge_health_deadline_is_a_configuration_error_not_a_panic() {
        let bad = OK.replace(
            "[bootloader]",
            "[health]\ndeadline_secs = 9223372036854775807\n[bootloader]",
        );
        assert!(refused(&bad).contains("health.deadline_secs"));
        let bad = OK.replace("[bootloader]", "[health]\ninterval_ms = 0\n[bootloader]");
        assert!(refused(&bad).contains("health.interval_ms"));
        let bad = OK.replace("url = ", "timeout_secs = 99999999\nurl = ");
        assert!(refused(&bad).contains("timeout_secs"));
    }

    #[test]
    fn two_slots_on_the_same_device_are_refused() {
        let bad = OK.replace("/dev/vda4", "/dev/./vda3");
        assert!(refused(&bad).contains("name the same device"));
    }

    #[test]
    fn two_slots_sharing_a_files_dir_are_refused() {
        let bad = OK
            .replace(
                "device = \"/dev/vda3\"",
                "device = \"/dev/vda3\"\nfiles_dir = \"/var/s\"",
            )
            .replace(
                "device = \"/dev/vda4\"",
                "device = \"/dev/vda4\"\nfiles_dir = \"/var/s/B\"",
            );
        assert!(refused(&bad).contains("share a files_dir"));
    }

    #[test]
    fn unknown_probe_field_is_refused() {
        let bad = OK.replace("url = ", "urll = \"x\"\nurl = ");
        assert!(refused(&bad).contains("unknown field `urll`"));
        let bad = OK.replace("url = ", "path = \"/x\"\nurl = ");
        assert!(refused(&bad).contains("`path` does not apply to kind \"http\""));
    }

    const KUBE: &str = "\n[agent]\n[agent.reboot]\nbefore = [[\"systemctl\", \"stop\", \"kubelet\"]]\n[agent.kubernetes]\nkubeconfig = \"/etc/edge-ota/kubeconfig\"\nnode_name = \"node-a\"\n";

    #[test]
    fn kubernetes_section_parses_with_defaults() {
        let c = Config::parse(&format!("{OK}{KUBE}"), Path::new("c.toml")).unwrap();
        let k = c.agent.unwrap().kubernetes.unwrap();
        assert_eq!(k.lease_namespace, "edge-ota-system");
        assert_eq!(k.lease_secs, 900);
        assert!(!k.single_node);
    }

    #[test]
    fn kubernetes_section_out_of_bounds_or_misnamed_is_refused() {
        let with = |extra: &str| format!("{OK}{KUBE}{extra}\n");
        assert!(refused(&with("lease_secs = 5")).contains("lease_secs"));
        assert!(refused(&with("poll_secs = 0")).contains("poll_secs"));
        assert!(
            refused(&format!("{OK}{}", KUBE.replace("node-a", "Node_A")))
                .contains("not a DNS name")
        );
        let alone = format!(
            "{OK}{}single_node = true\n",
            KUBE.replace(
                "[agent.reboot]\nbefore = [[\"systemctl\", \"stop\", \"kubelet\"]]\n",
                "",
            )
        );
        assert!(refused(&alone).contains("stopping kubelet"));
        assert!(refused(&with("leas_secs = 60")).contains("unknown field"));
        assert!(refused(&with("kubelet_healthz = \"127.0.0.1:10248\"")).contains("http(s) URL"));
    }

    #[test]
    fn same_key_listed_twice_is_refused() {
        let bad = OK.replace(
            "keys = [\"/k.pub\"]",
            "keys = [\"/k.pub\", \"/k.pub\"]\nthreshold = 2",
        );
        assert!(refused(&bad).contains("twice"));
    }
}

/// One kind of source, in `[sources] order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Media,
    Lan,
    Upstream,
}

impl SourceKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SourceKind::Media => "media",
            SourceKind::Lan => "lan",
            SourceKind::Upstream => "upstream",
        }
    }
}

/// `[sources]` in the configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// The order `--source auto` tries.
    pub order: Vec<SourceKind>,
    /// Where removable media are mounted.
    pub media_dirs: Vec<PathBuf>,
    /// The bundle's URL on the update server (a fixed name such as
    /// `https://updates.example/edge-os-x86_64.eota`). A pull-through LAN cache is asked for
    /// the same name.
    pub upstream: Option<String>,
    /// How long to listen for LAN caches.
    #[serde(rename = "discover_timeout_secs", deserialize_with = "de_secs")]
    pub discover_timeout: Duration,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            order: vec![SourceKind::Media, SourceKind::Lan, SourceKind::Upstream],
            media_dirs: vec!["/media/usb".into()],
            upstream: None,
            discover_timeout: Duration::from_secs(3),
        }
    }
}

fn de_secs<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| serde::de::Error::custom(format!("{secs}: not a number of seconds")))
}

impl SourcesConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (i, k) in self.order.iter().enumerate() {
            if self.order[..i].contains(k) {
                return Err(format!("sources.order lists {} twice", k.as_str()));
            }
        }
        if let Some(u) = &self.upstream {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!("sources.upstream {u}: an http:// or https:// URL"));
            }
        }
        if self.discover_timeout.is_zero() || self.discover_timeout > Duration::from_secs(60) {
            return Err("sources.discover_timeout_secs must be above 0 and at most 60".into());
        }
        Ok(())
    }
}

/// Port `serve` listens on unless told otherwise.
pub const DEFAULT_SERVE_PORT: u16 = 8470;

/// `[serve]` in the configuration; every field also has a command-line option.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// The directory of bundles (`*.eota`, `*.bin`): served, never written.
    pub dir: PathBuf,
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Pull-through: a bundle asked for by name and not in `dir` is fetched from this URL
    /// (a directory: the name is appended) and cached.
    pub upstream: Option<String>,
    /// Where the cache keeps what it fetched (default: `<dir>/.edge-ota-cache`, never served
    /// as a file).
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache may hold; the oldest versions not being served are evicted.
    pub max_cache_bytes: u64,
    /// HTTPS: certificate chain and key (PEM).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Announce by mDNS.
    pub announce: bool,
    /// Instance name in the announcement (default: the host name).
    pub instance: Option<String>,
    /// Announce only on these interfaces (default: all).
    pub announce_interfaces: Vec<String>,
    /// Open connections at most; more are answered `503` and closed.
    pub max_connections: usize,
    /// Open connections from one address at most.
    pub max_connections_per_peer: usize,
    /// Largest request head (request line and headers), bytes; larger is refused (`431`).
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Most ranges in one request; more, or overlapping ones, are refused (`416`).
    pub max_ranges: usize,
    /// A connection that moves no byte for this long is closed, and a request head must
    /// arrive within it (slow clients, slow-loris).
    #[serde(rename = "idle_timeout_secs", deserialize_with = "de_secs")]
    pub idle_timeout: Duration,
    /// A cached bundle is checked against the upstream again after this long (in the
    /// background: the cached copy is served meanwhile).
    #[serde(rename = "revalidate_secs", deserialize_with = "de_secs")]
    pub revalidate: Duration,
    /// Upstream downloads at once.
    pub max_upstream_downloads: usize,
    /// How often the directory is looked at for new or removed bundles.
    #[serde(rename = "rescan_secs", deserialize_with = "de_secs")]
    pub rescan: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            dir: "/var/lib/edge-ota/serve".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_SERVE_PORT)),
            upstream: None,
            cache_dir: None,
            max_cache_bytes: 16 << 30,
            tls_cert: None,
            tls_key: None,
            announce: true,
            instance: None,
            announce_interfaces: Vec::new(),
            max_connections: 256,
            max_connections_per_peer: 32,
            max_header_bytes: 16 << 10,
            max_headers: 64,
            // Leaves ask for up to 64 per request (HttpOptions::max_ranges_per_request).
            max_ranges: 128,
            idle_timeout: Duration::from_secs(30),
            revalidate: Duration::from_secs(600),
            max_upstream_downloads: 2,
            rescan: Duration::from_secs(5),
        }
    }
}

impl ServeConfig {
    /// Refuse values that would make the server useless or unbounded.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Usage(format!("serve: {what}")));
        if self.max_connections == 0 || self.max_connections_per_peer == 0 {
            return bad("max_connections and max_connections_per_peer must be at least 1".into());
        }
        if self.max_ranges == 0 || self.max_headers == 0 || self.max_upstream_downloads == 0 {
            return bad(
                "max_ranges, max_headers and max_upstream_downloads must be at least 1".into(),
            );
        }
        if self.max_header_bytes < 8192 {
            return bad(format!(
                "max_header_bytes {} is below 8192 (hyper's minimum buffer)",
                self.max_header_bytes
            ));
        }
        if self.idle_timeout.is_zero() || self.rescan.is_zero() {
            return bad("idle_timeout_secs and rescan_secs must be above zero".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert and tls_key go together".into());
        }
        if let Some(u) = &self.upstream {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return bad(format!("upstream {u}: only http:// and https:// URLs"));
            }
        }
        Ok(())
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.dir.join(".edge-ota-cache"))
    }
}
