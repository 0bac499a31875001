//! Command-line interface of `edge-ota`. Doc comments are the help text. Human output is for
//! people; `--json` output is versioned and is what programs should read.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::bootloader;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::health::Verdict;
use crate::install::{self, ApplyOptions};
use crate::lock::OpLock;
use crate::progress::Progress;

/// Schema version of every `--json` document.
pub use crate::JSON_VERSION;

/// A/B over-the-air updater for immutable edge Linux.
#[derive(Debug, Parser)]
#[command(name = "edge-ota", version)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Print machine-readable JSON (with a "version" field) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// When another edge-ota command holds the lock, wait for it (up to SECS seconds,
    /// default 600) instead of failing at once.
    #[arg(long, global = true, value_name = "SECS", num_args = 0..=1, default_missing_value = "600")]
    pub wait: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

/// Boot attempts the bootloader scripts can count (a single digit).
fn tries_arg() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=9)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify a bundle and install it into the inactive slot, then boot it next.
    Apply {
        /// Bundle: a path, an http:// or https:// URL, - for standard input, or `auto`
        /// (removable media, then a LAN cache found by mDNS, then `[sources] upstream`).
        source: Option<String>,
        /// The same as SOURCE (`--source auto`).
        #[arg(long = "source", value_name = "SOURCE", conflicts_with = "source")]
        source_flag: Option<String>,
        /// Install into this slot (never the booted one).
        #[arg(long)]
        slot: Option<String>,
        /// Boot attempts for the new slot, 1..9 (default: from the configuration).
        #[arg(long, value_parser = tries_arg())]
        tries: Option<u32>,
        /// Do not reboot when done; the caller reboots.
        #[arg(long)]
        no_reboot: bool,
        /// No progress bar (same as --progress none).
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Download now, apply later: stage what an apply of SOURCE would fetch (only what this
    /// device lacks) in the cache on the data partition; resumable; `apply` then uses it
    /// (`apply --offline` only it).
    Fetch {
        /// Bundle: an http:// or https:// URL, a path, or `auto` (as for apply).
        source: Option<String>,
        /// The same as SOURCE (`--source auto`).
        #[arg(long = "source", value_name = "SOURCE", conflicts_with = "source")]
        source_flag: Option<String>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Every check apply makes (signatures, policy, the target slot, sizes, every chunk),
    /// writing nothing.
    Verify {
        /// Bundle: a path, an http:// or https:// URL, or - for standard input.
        source: String,
        /// Check for this target slot instead of the inactive one.
        #[arg(long)]
        slot: Option<String>,
    },
    /// Show what a bundle contains, and who signed it when the configuration's keys verify it.
    Info {
        /// Bundle: a path, an http:// or https:// URL, or - for standard input.
        source: String,
    },
    /// Show slots, boot state, installed versions, rollbacks and anything that needs repair.
    Status,
    /// Confirm a slot (default: the booted one). Only the booted slot can be confirmed.
    MarkGood { slot: Option<String> },
    /// Mark a slot bad (default: the booted one): it is not booted again until reinstalled.
    /// Refused for the only known-good slot.
    MarkBad { slot: Option<String> },
    /// Boot SLOT next, with a limited number of tries (manual switch).
    MarkActive {
        slot: String,
        #[arg(long, value_parser = tries_arg())]
        tries: Option<u32>,
    },
    /// Health check of the booted slot: confirm it, or mark it bad and reboot.
    Health {
        /// On failure, do not reboot (exit 7 instead).
        #[arg(long)]
        no_reboot: bool,
    },
    /// Write a fresh boot environment (provisioning): GOOD boots, the other slots are bad.
    InitBootEnv {
        #[arg(long)]
        good: String,
        /// The version the GOOD slot runs, recorded in state (shown by status).
        #[arg(long)]
        version: Option<semver::Version>,
        /// Its security version: the anti-rollback floor starts there.
        #[arg(long, default_value_t = 0)]
        security_version: u64,
        /// Record the GOOD slot's whole device as its image (size and blake3), so a delta
        /// built against that image can rebuild from it. Reads the whole slot.
        #[arg(long)]
        record_image: bool,
    },
    /// Repair the boot environment and the state file from what can be proven (the booted
    /// slot, recorded slot images, the floor's two copies).
    Repair,
    /// The updater as a service: takes a desired state (file, URL, removable media, API),
    /// stages it, applies it in a maintenance window, reboots, reports. Without an action it
    /// runs; with one it talks to the running agent.
    Agent(crate::agent::cli::AgentArgs),
    /// Serve bundles to the LAN (a base station): a directory over HTTP(S) with ranges, an
    /// index, optionally a pull-through cache of an upstream URL, announced by mDNS.
    /// Settings: `[serve]` (and `[trust]`, `[network]`) in the configuration, or these options.
    Serve(ServeArgs),
    /// Load the Kubernetes container images a slot carries (default: the booted one) into
    /// containerd (`[containerd]`), check their digests against the signed manifest, and
    /// pin them so kubelet's garbage collection keeps them. Importing twice is harmless.
    ImportImages {
        #[arg(long)]
        slot: Option<String>,
    },
    /// List the base-station caches on the LAN (mDNS `_edge-ota._tcp`).
    Discover {
        /// How long to listen, in seconds.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
}

/// Options of `serve` (each overrides `[serve]`).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Directory of bundles to serve.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Address and port (default 0.0.0.0:8470).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Pull-through cache of this URL (a directory: the bundle's name is appended).
    #[arg(long)]
    upstream: Option<String>,
    /// Where the cache keeps what it fetched (default: DIR/.edge-ota-cache).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Most bytes the cache may hold.
    #[arg(long, value_name = "BYTES")]
    max_cache: Option<u64>,
    /// HTTPS certificate chain (PEM), with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// HTTPS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Do not announce by mDNS.
    #[arg(long)]
    no_announce: bool,
    /// Instance name to announce (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Announce only on this interface (repeatable).
    #[arg(long = "announce-interface", value_name = "IFACE")]
    announce_interfaces: Vec<String>,
    /// Trusted public key (PEM) for what the cache fetches (repeatable; instead of `[trust]`).
    #[arg(long = "trust-key", value_name = "PEM")]
    trust_keys: Vec<PathBuf>,
    /// How many of the trusted keys must have signed (with --trust-key).
    #[arg(long, default_value_t = 1)]
    threshold: usize,
}

impl ServeArgs {
    fn run(self, config: &std::path::Path) -> Result<u8> {
        let file = crate::serve::ServeFile::load(config)?;
        let mut s = file.serve;
        s.dir = self.dir.unwrap_or(s.dir);
        s.listen = self.listen.unwrap_or(s.listen);
        s.upstream = self.upstream.or(s.upstream);
        s.cache_dir = self.cache_dir.or(s.cache_dir);
        s.max_cache_bytes = self.max_cache.unwrap_or(s.max_cache_bytes);
        if self.tls_cert.is_some() {
            s.tls_cert = self.tls_cert;
            s.tls_key = self.tls_key;
        }
        s.announce &= !self.no_announce;
        s.instance = self.name.or(s.instance);
        if !self.announce_interfaces.is_empty() {
            s.announce_interfaces = self.announce_interfaces;
        }
        let trust = if self.trust_keys.is_empty() {
            file.trust
        } else {
            Some(crate::config::TrustConfig {
                keys: self.trust_keys,
                threshold: self.threshold,
            })
        };
        let trust = trust.as_ref().map(crate::serve::trusted_keys).transpose()?;
        crate::serve::run_blocking(s, trust, file.network)?;
        Ok(0)
    }
}

/// SOURCE or `--source SOURCE`, one of them.
fn one_source(positional: Option<String>, flag: Option<String>) -> Result<String> {
    positional
        .or(flag)
        .ok_or_else(|| Error::Usage("give a SOURCE (a path, a URL, -) or --source auto".into()))
}

/// Network and progress options of the commands that fetch.
#[derive(Debug, clap::Args)]
pub struct NetArgs {
    /// Refuse the update if it would fetch more than this many bytes from the source
    /// (default: `max_download` in the configuration).
    #[arg(long, value_name = "BYTES")]
    max_download: Option<u64>,
    /// Never touch the network: every chunk must be on the device or staged by `fetch`.
    #[arg(long)]
    offline: bool,
    /// Limit the download rate, bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    max_rate: Option<u64>,
    /// Progress: a bar on a terminal (auto), JSON Lines on standard output (jsonl), or none.
    #[arg(long, value_enum, default_value = "auto")]
    progress: crate::progress::ProgressMode,
}

impl NetArgs {
    fn limits(&self, cfg: &Config) -> install::Limits {
        install::Limits {
            max_download: self.max_download.or(cfg.max_download),
            offline: self.offline,
            ..Default::default()
        }
    }

    fn http(&self, cfg: &Config) -> crate::source::http::HttpOptions {
        let mut o = cfg.network.clone();
        if self.max_rate.is_some() {
            o.max_rate = self.max_rate;
        }
        o
    }

    fn progress(&self, quiet: bool, json: bool) -> Progress {
        use crate::progress::ProgressMode;
        match self.progress {
            ProgressMode::Auto if quiet || json => Progress::hidden(),
            mode => Progress::new(mode),
        }
    }

    /// Open the source, refusing the network when offline.
    fn open(&self, cfg: &Config, spec: &str) -> Result<install::BundleSource> {
        if self.offline && (spec.starts_with("http://") || spec.starts_with("https://")) {
            return Err(Error::Offline(format!("{spec} is on the network")));
        }
        install::BundleSource::open(spec, &self.http(cfg))
    }
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        #[derive(Serialize)]
        struct Versioned<'a, T> {
            version: u32,
            #[serde(flatten)]
            inner: &'a T,
        }
        let v = Versioned {
            version: JSON_VERSION,
            inner: value,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
    } else {
        print!("{}", text());
    }
}

/// A person at the console and the agent never fight over the slots: while the agent runs
/// (and is not paused) it owns updates, and a manual `apply` or `fetch` is refused with what
/// to do instead.
fn agent_allows_manual_update(cfg: &Config) -> Result<()> {
    let Some(agent) = &cfg.agent else {
        return Ok(());
    };
    let client = crate::agent::api::Client::new(&agent.socket);
    if !client.is_running() {
        return Ok(());
    }
    let (_, body) = client.request(hyper::Method::GET, "/v1/status", Vec::new())?;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if v["agent"]["paused"].as_bool() == Some(true) {
        return Ok(());
    }
    Err(Error::Busy(format!(
        "the agent is running (phase {}) and owns updates: give it a desired state with          `edge-ota agent set FILE`, or `edge-ota agent pause` first",
        v["agent"]["phase"].as_str().unwrap_or("unknown")
    )))
}

/// Run a command; returns the exit code for success paths that are not 0.
pub fn run(cli: Cli) -> Result<u8> {
    let json = cli.json;
    let wait = cli.wait.map(Duration::from_secs);
    let config_path = cli.config.clone();
    let load = || Config::load(&config_path);
    // Every command that changes the device holds the lock for its whole run.
    let lock = |cfg: &Config, name: &str| OpLock::acquire(&cfg.state_dir, name, wait);
    match cli.command {
        Command::Apply {
            source,
            source_flag,
            slot,
            tries,
            no_reboot,
            quiet,
            net,
        } => {
            let source = one_source(source, source_flag)?;
            let cfg = load()?;
            agent_allows_manual_update(&cfg)?;
            let _lock = lock(&cfg, "apply")?;
            let mut bl = bootloader::open(&cfg)?;
            let opts = ApplyOptions { slot, tries };
            let progress = net.progress(quiet, json);
            let report = if source == "auto" {
                use crate::install::auto::{self, Outcome};
                let limits = net.limits(&cfg);
                match auto::apply(
                    &cfg,
                    bl.as_mut(),
                    &opts,
                    &limits,
                    &net.http(&cfg),
                    &progress,
                )? {
                    Outcome::Done(_, report) => report,
                    Outcome::UpToDate(detail) => {
                        print(
                            json,
                            &serde_json::json!({"installed": false, "detail": detail}),
                            || format!("nothing newer to install: {detail}\n"),
                        );
                        return Ok(0);
                    }
                }
            } else {
                let src = if net.offline {
                    match install::BundleSource::staged(&cfg, &source) {
                        Ok(s) => s,
                        // A local file needs no staging.
                        Err(_) if std::path::Path::new(&source).is_file() => {
                            net.open(&cfg, &source)?
                        }
                        Err(e) => return Err(e),
                    }
                } else {
                    net.open(&cfg, &source)?
                };
                install::apply(&cfg, bl.as_mut(), src, &opts, &net.limits(&cfg), &progress)?
            };
            if progress.is_jsonl() {
                progress.event(crate::progress::Event::Phase {
                    phase: "done".into(),
                    detail: serde_json::to_string(&report).expect("serializable"),
                });
            } else {
                print(json, &report, || {
                    format!(
                        "installed {} (security version {}) into slot {}; it boots next ({} tries); fetched {} bytes, reused {}\n",
                        report.bundle_version,
                        report.security_version,
                        report.slot,
                        report.tries,
                        report.bytes_fetched,
                        report.bytes_reused
                    )
                });
            }
            if !no_reboot {
                reboot()?;
            }
            Ok(0)
        }
        Command::Fetch {
            source,
            source_flag,
            net,
        } => {
            let source = one_source(source, source_flag)?;
            let cfg = load()?;
            agent_allows_manual_update(&cfg)?;
            let _lock = lock(&cfg, "fetch")?;
            let bl = bootloader::open(&cfg)?;
            let progress = net.progress(false, json);
            let r = if source == "auto" {
                use crate::install::auto::{self, Outcome};
                let limits = net.limits(&cfg);
                match auto::fetch(&cfg, bl.as_ref(), &limits, &net.http(&cfg), &progress)? {
                    Outcome::Done(_, r) => r,
                    Outcome::UpToDate(detail) => {
                        print(
                            json,
                            &serde_json::json!({"staged": false, "detail": detail}),
                            || format!("nothing newer to stage: {detail}\n"),
                        );
                        return Ok(0);
                    }
                }
            } else {
                let src = net.open(&cfg, &source)?;
                install::fetch(&cfg, bl.as_ref(), src, &net.limits(&cfg), &progress)?
            };
            print(json, &r, || {
                format!(
                    "staged {} in {}: {} bytes fetched now, {} staged, all checked\n",
                    r.bundle_version, r.cache, r.fetched, r.staged
                )
            });
            Ok(0)
        }
        Command::Verify { source, slot } => {
            let cfg = load()?;
            let bl = bootloader::open(&cfg)?;
            let src = install::BundleSource::open(&source, &cfg.network)?;
            let opts = ApplyOptions { slot, tries: None };
            let v = install::verify_all(&cfg, bl.as_ref(), src, &opts)?;
            print(json, &v, || {
                format!(
                    "OK: {} version {} (security version {}), {} payload(s), signed by {}; it would go to slot {}\n",
                    v.compatible,
                    v.bundle_version,
                    v.security_version,
                    v.payloads,
                    v.signers.join(", "),
                    v.target
                )
            });
            Ok(0)
        }
        Command::Info { source } => {
            let net = match Config::load(&config_path) {
                Ok(c) => c.network,
                Err(_) => Default::default(),
            };
            let head = install::BundleSource::open(&source, &net)?.read_head()?;
            let manifest = head.parse_unverified()?;
            // Only keys the configuration trusts can say who signed; without a configuration
            // nothing is verified, and a broken configuration is an error, not "no config".
            let verified = if config_path.exists() {
                let cfg = load()?;
                Some(head.verify(&cfg.trusted_keys()?).map(|v| v.signers))
            } else {
                None
            };
            let info = BundleInfo {
                bundle_id: crate::bundle::Manifest::id(&head.manifest_bytes).to_hex(),
                verified_signers: match &verified {
                    Some(Ok(s)) => s.clone(),
                    _ => Vec::new(),
                },
                verification: match &verified {
                    Some(Ok(_)) => "verified".into(),
                    Some(Err(e)) => format!("FAILED: {e}"),
                    None => format!(
                        "not verified: no configuration at {} (nothing below is trusted)",
                        config_path.display()
                    ),
                },
                manifest: &manifest,
            };
            print(json, &info, || info.render());
            if let Some(Err(e)) = verified {
                return Err(e.into());
            }
            Ok(0)
        }
        Command::Status => {
            let cfg = load()?;
            let bl = bootloader::open(&cfg)?;
            let st = crate::control::status(&cfg, bl.as_ref())?;
            print(json, &st, || st.render());
            Ok(0)
        }
        Command::MarkGood { slot } => {
            let cfg = load()?;
            let _lock = lock(&cfg, "mark-good")?;
            let mut bl = bootloader::open(&cfg)?;
            let s = crate::control::mark_good(&cfg, bl.as_mut(), slot.as_deref())?;
            print(
                json,
                &serde_json::json!({"slot": s, "marked": "good"}),
                || format!("slot {s} marked good\n"),
            );
            Ok(0)
        }
        Command::MarkBad { slot } => {
            let cfg = load()?;
            let _lock = lock(&cfg, "mark-bad")?;
            let mut bl = bootloader::open(&cfg)?;
            let s = crate::control::mark_bad(&cfg, bl.as_mut(), slot.as_deref())?;
            print(
                json,
                &serde_json::json!({"slot": s, "marked": "bad"}),
                || format!("slot {s} marked bad\n"),
            );
            Ok(0)
        }
        Command::MarkActive { slot, tries } => {
            let cfg = load()?;
            let _lock = lock(&cfg, "mark-active")?;
            let mut bl = bootloader::open(&cfg)?;
            let tries = tries.unwrap_or(cfg.tries);
            crate::control::mark_active(&cfg, bl.as_mut(), &slot, tries)?;
            print(
                json,
                &serde_json::json!({"slot": slot, "marked": "active", "tries": tries}),
                || format!("slot {slot} boots next ({tries} tries)\n"),
            );
            Ok(0)
        }
        Command::Health { no_reboot } => {
            let cfg = load()?;
            let _lock = lock(&cfg, "health")?;
            let mut bl = bootloader::open(&cfg)?;
            let verdict = crate::health::run(&cfg, bl.as_mut())?;
            print(json, &verdict, || match &verdict {
                Verdict::AlreadyGood { slot } => {
                    format!("slot {slot}: already good; boot recorded healthy\n")
                }
                Verdict::Confirmed { slot } => format!("slot {slot}: healthy, marked good\n"),
                Verdict::Failed { slot, reason } => {
                    format!("slot {slot}: UNHEALTHY ({reason}); marked bad\n")
                }
                Verdict::Unjudged { slot, reason } => {
                    format!("slot {slot}: NOT CONFIRMED ({reason}); it keeps running\n")
                }
            });
            match verdict {
                Verdict::Failed { reason, .. } => {
                    if !no_reboot {
                        drop(_lock);
                        reboot()?;
                    }
                    Err(Error::HealthFailed(reason))
                }
                Verdict::Unjudged { slot, reason } => Err(Error::Unjudgeable { slot, reason }),
                _ => Ok(0),
            }
        }
        Command::InitBootEnv {
            good,
            version,
            security_version,
            record_image,
        } => {
            let cfg = load()?;
            let _lock = lock(&cfg, "init-boot-env")?;
            cfg.slot(&good)?;
            bootloader::init(&cfg, &good)?;
            let store = crate::state::StateStore::new(&cfg.state_dir);
            let mut state = store.load().unwrap_or_default();
            let rec = state.slot_mut(&good);
            rec.status = crate::state::SlotStatus::Installed;
            rec.version = version.map(|v| v.to_string());
            rec.security_version = Some(security_version);
            rec.confirmed_at = Some(crate::verify::unix_now()?);
            if record_image {
                let dev = crate::slot::resolve(&cfg, cfg.slot(&good)?)?;
                let hash = install::blockdev::hash_region(&dev.path, dev.offset, dev.size)?;
                rec.image = Some(crate::state::ImageRecord {
                    size: dev.size,
                    blake3: hash.into(),
                });
            }
            let mut bl = bootloader::open(&cfg)?;
            crate::control::raise_floor(&mut state, bl.as_mut(), security_version)?;
            store.save(&state)?;
            print(json, &serde_json::json!({"good": good}), || {
                format!("boot environment written; slot {good} boots\n")
            });
            Ok(0)
        }
        Command::Serve(args) => args.run(&config_path),
        Command::Discover { timeout } => {
            let timeout = Duration::try_from_secs_f64(timeout)
                .ok()
                .filter(|t| !t.is_zero() && *t <= Duration::from_secs(600))
                .ok_or_else(|| Error::Usage("--timeout: 0 < SECS <= 600".into()))?;
            let caches = crate::discover::discover(timeout)?;
            print(json, &serde_json::json!({"caches": caches}), || {
                if caches.is_empty() {
                    return format!("no cache answered within {:.1} s\n", timeout.as_secs_f64());
                }
                caches
                    .iter()
                    .map(|c| {
                        let held: Vec<String> = c
                            .bundles
                            .iter()
                            .map(|(comp, v)| format!("{comp} {v}"))
                            .collect();
                        format!(
                            "{}\t{}\t{}{}\n",
                            c.instance,
                            c.base_url().unwrap_or_else(|| "(no usable address)".into()),
                            if held.is_empty() {
                                "no bundles".to_string()
                            } else {
                                held.join(", ")
                            },
                            if c.upstream {
                                "; pull-through cache"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect()
            });
            Ok(0)
        }
        Command::ImportImages { slot } => {
            let cfg = load()?;
            let slot = match slot {
                Some(s) => s,
                None => crate::slot::booted_slot(&cfg.cmdline)?.ok_or_else(|| {
                    Error::Usage(
                        "cannot tell the booted slot (no edgeota.slot= on the kernel command line): give --slot".into(),
                    )
                })?,
            };
            let _lock = lock(&cfg, "import-images")?;
            let images = crate::containerd::import_slot(&cfg, &slot)?;
            print(
                json,
                &serde_json::json!({"slot": slot, "images": images}),
                || {
                    if images.is_empty() {
                        return format!("slot {slot} carries no container images\n");
                    }
                    images
                        .iter()
                        .map(|i| {
                            format!(
                                "{} {}{}\n",
                                i.name,
                                i.digest,
                                if i.pinned { " pinned" } else { "" }
                            )
                        })
                        .collect()
                },
            );
            Ok(0)
        }
        Command::Agent(args) => crate::agent::cli::run(&config_path, json, args),
        Command::Repair => {
            let cfg = load()?;
            let _lock = lock(&cfg, "repair")?;
            let report = crate::repair::repair(&cfg)?;
            print(json, &report, || {
                if report.actions.is_empty() {
                    "nothing to repair\n".to_string()
                } else {
                    report
                        .actions
                        .iter()
                        .map(|a| format!("repaired: {a}\n"))
                        .collect()
                }
            });
            Ok(0)
        }
    }
}

#[derive(Serialize)]
struct BundleInfo<'a> {
    bundle_id: String,
    /// Trusted keys whose signatures verified (empty unless verification passed).
    verified_signers: Vec<String>,
    verification: String,
    manifest: &'a crate::bundle::Manifest,
}

impl BundleInfo<'_> {
    fn render(&self) -> String {
        let m = self.manifest;
        let mut s = format!(
            "bundle {}\ncompatible: {}\nversion: {}\nsecurity version: {}\ncreated: {}\nexpires: {}\nsignatures: {}\nsigned by (verified): {}\n",
            self.bundle_id,
            m.compatible,
            m.version,
            m.security_version,
            m.created,
            m.expires.map_or("never".into(), |e| e.to_string()),
            self.verification,
            if self.verified_signers.is_empty() {
                "nobody".to_string()
            } else {
                self.verified_signers.join(", ")
            },
        );
        for p in &m.payloads {
            s += &format!(
                "payload {}: {} -> {}, {} bytes in {} chunks, blake3 {}\n",
                p.name,
                p.kind.as_str(),
                p.target,
                p.size,
                p.chunks.len(),
                p.blake3
            );
        }
        s
    }
}

/// Flush everything and reboot now.
fn reboot() -> Result<()> {
    nix::unistd::sync();
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
        .map_err(|e| Error::io("rebooting", e.into()))?;
    Ok(())
}
