//! `--source auto`: where a device takes its update from when nobody tells it. In the
//! configured order (`[sources] order`, default: media, LAN, upstream):
//!
//! 1. **media**: a removable medium mounted on one of `[sources] media_dirs` holding a
//!    bundle (`*.eota`, `*.bin` at its top level) for this device: its head verified by the
//!    trusted keys, the right compatible, not expired, not below the anti-rollback floor;
//!    the newest such bundle;
//! 2. **lan**: a base-station cache found by mDNS ([`crate::discover`]): the bundle the
//!    configured upstream names, through the cache when it is a pull-through cache, or the
//!    newest bundle for this compatible its index lists;
//! 3. **upstream**: `[sources] upstream`, a URL.
//!
//! A candidate that offers nothing newer than the running version is skipped. One whose
//! bundle is refused (signatures, a chunk that does not check out, the link) is given up for
//! the next, with a note; a failure of the device itself (lock, slots, configuration) stops.
//! Every choice and its reason is a `note` in the progress. Nothing in the LAN answer is
//! trusted: a rogue cache can only offer bytes the verification refuses, and what was
//! written before the refusal is verified chunks only (the next candidate of the same
//! bundle continues from them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bootloader::Bootloader;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::install::BundleSource;
use crate::progress::Progress;
use crate::source::http::HttpOptions;

pub use crate::config::{SourceKind, SourcesConfig};

/// One place to take the bundle from.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub kind: SourceKind,
    /// A path or URL.
    pub spec: String,
    /// Why it was chosen (for the note).
    pub reason: String,
    /// Its answer "nothing newer" ends the search (the upstream itself, or a pull-through
    /// cache that checks it).
    pub authoritative: bool,
    /// Network options for it (LAN candidates give up sooner: there is a next source).
    pub net: HttpOptions,
}

/// What the device is and holds: what a candidate is judged against.
pub struct Device {
    pub compatible: String,
    pub floor: u64,
    /// The running slot's version, when recorded.
    pub running: Option<semver::Version>,
}

impl Device {
    pub fn read(cfg: &Config, bl: &dyn Bootloader) -> Result<Device> {
        let state = crate::state::StateStore::new(&cfg.state_dir).load()?;
        let floor = crate::control::Floor::read(&state, bl).effective;
        let running = crate::slot::booted_slot(&cfg.cmdline)?
            .and_then(|s| state.slot(&s).version)
            .and_then(|v| v.parse().ok());
        Ok(Device {
            compatible: cfg.compatible.clone(),
            floor,
            running,
        })
    }
}

/// Whether an error is the source's (try the next one) rather than the device's (stop).
pub fn falls_back(e: &Error) -> bool {
    !matches!(
        e,
        Error::Usage(_)
            | Error::Config { .. }
            | Error::State { .. }
            | Error::Boot(_)
            | Error::Slot(_)
            | Error::OnlyGoodSlot(_)
            | Error::Busy(_)
            | Error::Clock(_)
            | Error::HealthFailed(_)
            | Error::Unjudgeable { .. }
    )
}

/// How an automatic run ended.
pub enum Outcome<T> {
    /// A candidate's bundle was taken.
    Done(Box<Candidate>, T),
    /// Nothing newer than what runs, anywhere that answered.
    UpToDate(String),
}

/// The candidates of one kind, or why there are none.
fn of_kind(
    cfg: &Config,
    dev: &Device,
    net: &HttpOptions,
    progress: &Progress,
    kind: SourceKind,
) -> (Vec<Candidate>, String) {
    match kind {
        SourceKind::Media => media(cfg, dev, net, progress),
        SourceKind::Lan => lan(cfg, dev, net, progress),
        SourceKind::Upstream => match &cfg.sources.upstream {
            Some(u) => (
                vec![Candidate {
                    kind: SourceKind::Upstream,
                    spec: u.clone(),
                    reason: "the configured upstream".into(),
                    authoritative: true,
                    net: net.clone(),
                }],
                String::new(),
            ),
            None => (Vec::new(), "not configured ([sources] upstream)".into()),
        },
    }
}

/// Every candidate of every configured kind, in order (the agent tries them one by one with
/// its own fetch); the notes say why a kind offered none.
pub fn candidates(
    cfg: &Config,
    dev: &Device,
    net: &HttpOptions,
    progress: &Progress,
) -> (Vec<Candidate>, Vec<String>) {
    let mut all = Vec::new();
    let mut notes = Vec::new();
    for kind in &cfg.sources.order {
        let (cands, why_none) = of_kind(cfg, dev, net, progress, *kind);
        if cands.is_empty() {
            notes.push(format!("{}: {why_none}", kind.as_str()));
        }
        all.extend(cands);
    }
    (all, notes)
}

/// Try the sources in order; `attempt` applies (or stages) one opened source.
pub fn run<T>(
    cfg: &Config,
    dev: &Device,
    net: &HttpOptions,
    offline: bool,
    progress: &Progress,
    attempt: &mut dyn FnMut(BundleSource) -> Result<T>,
) -> Result<Outcome<T>> {
    let mut last_error: Option<Error> = None;
    let mut summary: Vec<String> = Vec::new();
    for kind in &cfg.sources.order {
        if offline && *kind != SourceKind::Media {
            summary.push(format!("{}: skipped (offline)", kind.as_str()));
            continue;
        }
        let (cands, why_none) = of_kind(cfg, dev, net, progress, *kind);
        if cands.is_empty() {
            progress.note(format!("source auto: {}: {why_none}", kind.as_str()));
            summary.push(format!("{}: {why_none}", kind.as_str()));
            continue;
        }
        for cand in cands {
            let mut src = match BundleSource::open(&cand.spec, &cand.net) {
                Ok(s) => s,
                Err(e) if falls_back(&e) => {
                    progress.note(format!(
                        "source auto: {} {} cannot be opened: {e}; trying the next source",
                        cand.kind.as_str(),
                        cand.spec
                    ));
                    summary.push(format!("{}: {e}", cand.kind.as_str()));
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            // What it offers, before anything else is asked of it (verified by the apply).
            let offered = src
                .read_head()
                .and_then(|h| h.parse_unverified().map_err(Error::from));
            let m = match offered {
                Ok(m) => m,
                Err(e) if falls_back(&e) => {
                    progress.note(format!(
                        "source auto: {} {} offers no readable bundle: {e}; trying the next source",
                        cand.kind.as_str(),
                        cand.spec
                    ));
                    summary.push(format!("{}: {e}", cand.kind.as_str()));
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(running) = &dev.running {
                if m.compatible == dev.compatible && m.version <= *running {
                    let msg = format!(
                        "{} {} offers {}, this device runs {running}: nothing newer",
                        cand.kind.as_str(),
                        cand.spec,
                        m.version
                    );
                    progress.note(format!("source auto: {msg}"));
                    summary.push(msg);
                    if cand.authoritative {
                        return Ok(Outcome::UpToDate(summary.join("; ")));
                    }
                    continue;
                }
            }
            progress.note(format!(
                "source auto: using {} {}: {} (offers {} {})",
                cand.kind.as_str(),
                cand.spec,
                cand.reason,
                m.compatible,
                m.version
            ));
            // The head is read again by the apply: from the bytes already fetched (HTTP keeps
            // the first 64 KiB) or the file.
            match attempt(src) {
                Ok(v) => return Ok(Outcome::Done(Box::new(cand), v)),
                Err(e) if falls_back(&e) => {
                    progress.note(format!(
                        "source auto: {} {} failed: {e}; trying the next source",
                        cand.kind.as_str(),
                        cand.spec
                    ));
                    summary.push(format!("{}: {e}", cand.kind.as_str()));
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
    }
    match last_error {
        Some(e) => Err(e),
        None => Ok(Outcome::UpToDate(summary.join("; "))),
    }
}

/// `apply --source auto`.
pub fn apply(
    cfg: &Config,
    bl: &mut dyn Bootloader,
    opts: &crate::install::ApplyOptions,
    limits: &crate::install::Limits,
    net: &HttpOptions,
    progress: &Progress,
) -> Result<Outcome<crate::install::ApplyReport>> {
    let dev = Device::read(cfg, &*bl)?;
    run(cfg, &dev, net, limits.offline, progress, &mut |src| {
        crate::install::apply(cfg, &mut *bl, src, opts, limits, progress)
    })
}

/// `fetch --source auto`.
pub fn fetch(
    cfg: &Config,
    bl: &dyn Bootloader,
    limits: &crate::install::Limits,
    net: &HttpOptions,
    progress: &Progress,
) -> Result<Outcome<crate::install::FetchReport>> {
    let dev = Device::read(cfg, bl)?;
    run(cfg, &dev, net, limits.offline, progress, &mut |src| {
        crate::install::fetch(cfg, bl, src, limits, progress)
    })
}

/// The newest bundle for this device on a mounted medium.
fn media(
    cfg: &Config,
    dev: &Device,
    net: &HttpOptions,
    progress: &Progress,
) -> (Vec<Candidate>, String) {
    let mut best: Option<(semver::Version, u64, PathBuf)> = None;
    let mut looked = Vec::new();
    for dir in &cfg.sources.media_dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            looked.push(format!("{} not there", dir.display()));
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_ascii_lowercase())
                    .unwrap_or_default();
                (n.ends_with(".eota") || n.ends_with(".bin")) && p.is_file()
            })
            .collect();
        files.sort();
        looked.push(format!("{} ({} file(s))", dir.display(), files.len()));
        for f in files {
            match judge_file(cfg, dev, &f) {
                Ok(m) => {
                    let better = best
                        .as_ref()
                        .is_none_or(|(v, sv, _)| (&m.version, m.security_version) > (v, *sv));
                    if better {
                        best = Some((m.version.clone(), m.security_version, f));
                    }
                }
                Err(e) => progress.note(format!(
                    "source auto: media: {} is not for this device: {e}",
                    f.display()
                )),
            }
        }
    }
    match best {
        Some((v, _, path)) => (
            vec![Candidate {
                kind: SourceKind::Media,
                spec: path.display().to_string(),
                reason: format!("the newest bundle for {} on a medium ({v})", dev.compatible),
                authoritative: false,
                net: net.clone(),
            }],
            String::new(),
        ),
        None => (
            Vec::new(),
            format!(
                "no bundle for {} (looked in {})",
                dev.compatible,
                if looked.is_empty() {
                    "no directory".to_string()
                } else {
                    looked.join(", ")
                }
            ),
        ),
    }
}

/// A file's head verified and judged by the device's policy.
fn judge_file(cfg: &Config, dev: &Device, path: &Path) -> Result<crate::bundle::Manifest> {
    let mut src = BundleSource::Ranges(Box::new(crate::source::FileSource::open(path)?));
    let state = crate::state::StateStore::new(&cfg.state_dir).load()?;
    let (_, verified) = crate::install::verify_head(cfg, &mut src, &state, dev.floor)?;
    Ok(verified.manifest)
}

/// LAN candidates: every cache that answers, the one holding something for us first.
fn lan(
    cfg: &Config,
    dev: &Device,
    net: &HttpOptions,
    progress: &Progress,
) -> (Vec<Candidate>, String) {
    let caches = match crate::discover::discover(cfg.sources.discover_timeout) {
        Ok(c) => c,
        Err(e) => return (Vec::new(), format!("discovery failed: {e}")),
    };
    if caches.is_empty() {
        return (
            Vec::new(),
            format!(
                "no cache answered within {:.1} s",
                cfg.sources.discover_timeout.as_secs_f64()
            ),
        );
    }
    // A LAN cache that stops answering is given up sooner than the upstream would be.
    let mut net = net.clone();
    net.max_attempts = net.max_attempts.min(4);
    net.backoff_cap = net.backoff_cap.min(Duration::from_secs(5));
    let mut ordered = caches.clone();
    ordered.sort_by_key(|c| !(c.holds(&dev.compatible) || c.upstream));
    let mut out: Vec<Candidate> = Vec::new();
    let mut notes = Vec::new();
    for c in &ordered {
        if c.api != crate::serve::API_VERSION {
            notes.push(format!("{} speaks API {}", c.instance, c.api));
            continue;
        }
        let Some(base) = c.base_url() else {
            notes.push(format!("{} has no usable address", c.instance));
            continue;
        };
        if let (Some(up), true) = (&cfg.sources.upstream, c.upstream) {
            if let Some(name) = up
                .rsplit('/')
                .next()
                .filter(|n| crate::serve::library::valid_name(n))
            {
                out.push(Candidate {
                    kind: SourceKind::Lan,
                    spec: format!("{base}/{name}"),
                    reason: format!(
                        "LAN cache {} ({base}) pulls {name} through from the upstream",
                        c.instance
                    ),
                    authoritative: true,
                    net: net.clone(),
                });
            }
        }
        match newest_in_index(&base, dev, &net) {
            Ok(Some((path, version))) => {
                let spec = format!("{base}{path}");
                if !out.iter().any(|o| o.spec == spec) {
                    out.push(Candidate {
                        kind: SourceKind::Lan,
                        spec,
                        reason: format!(
                            "LAN cache {} ({base}) holds {} {version}",
                            c.instance, dev.compatible
                        ),
                        authoritative: false,
                        net: net.clone(),
                    });
                }
            }
            Ok(None) => notes.push(format!(
                "{} holds nothing for {}",
                c.instance, dev.compatible
            )),
            Err(e) => notes.push(format!("{}: {e}", c.instance)),
        }
    }
    progress.note(format!(
        "source auto: lan: {} cache(s) answered: {}",
        caches.len(),
        caches
            .iter()
            .map(|c| format!(
                "{} {}",
                c.instance,
                c.base_url().unwrap_or_else(|| "(no address)".into())
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let why = if notes.is_empty() {
        "no cache holds a bundle for this device".to_string()
    } else {
        notes.join("; ")
    };
    (out, why)
}

/// The newest complete bundle for this device in a cache's index: `(path, version)`.
fn newest_in_index(
    base: &str,
    dev: &Device,
    net: &HttpOptions,
) -> Result<Option<(String, semver::Version)>> {
    let url = format!("{base}{}", crate::serve::INDEX_PATH);
    let mut src = crate::source::http::HttpSource::open(&url, net)?;
    use crate::source::RangeSource;
    let len = src.len();
    if len > 4 << 20 {
        return Err(Error::Limit(format!("{url}: an index of {len} bytes")));
    }
    let mut body = Vec::with_capacity(len as usize);
    src.fetch(std::slice::from_ref(&(0..len)), &mut |_, b| {
        body.extend_from_slice(b);
        Ok(())
    })?;
    let index: crate::serve::library::Index = serde_json::from_slice(&body)
        .map_err(|e| Error::Format(format!("{url}: not an index: {e}")))?;
    Ok(index
        .bundles
        .into_iter()
        .filter(|e| {
            e.complete
                && e.compatible == dev.compatible
                && e.security_version >= dev.floor
                && e.path
                    .strip_prefix('/')
                    .is_some_and(crate::serve::library::valid_name)
        })
        .filter_map(|e| Some((e.path, e.version.parse::<semver::Version>().ok()?)))
        .max_by(|a, b| a.1.cmp(&b.1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_from_toml() {
        let s: SourcesConfig = toml::from_str(
            "order = [\"lan\", \"upstream\"]\nmedia_dirs = [\"/mnt/usb\"]\nupstream = \"https://u.example/b.eota\"\ndiscover_timeout_secs = 1.5\n",
        )
        .unwrap();
        assert_eq!(s.order, [SourceKind::Lan, SourceKind::Upstream]);
        assert_eq!(s.discover_timeout, Duration::from_millis(1500));
        s.validate().unwrap();
        let twice = SourcesConfig {
            order: vec![SourceKind::Lan, SourceKind::Lan],
            ..Default::default()
        };
        assert!(twice.validate().is_err());
        assert!(toml::from_str::<SourcesConfig>("orders = []").is_err());
    }

    #[test]
    fn refusals_fall_back_and_device_failures_stop() {
        assert!(falls_back(&Error::Tampered {
            payload: "rootfs".into(),
            what: "hash".into()
        }));
        assert!(falls_back(&Error::BadSignature("k".into())));
        assert!(falls_back(&Error::Network {
            url: "u".into(),
            reason: "r".into()
        }));
        assert!(!falls_back(&Error::Busy("apply".into())));
        assert!(!falls_back(&Error::OnlyGoodSlot("x".into())));
    }
}
