//! `edge-ota serve`: the base station of a LAN (a ship, a shop, a factory floor). It serves a
//! directory of bundles over HTTP/1.1 or HTTPS with everything a leaf's range client uses
//! (single and multiple ranges, strong `ETag` = the bundle id, `If-Range`, `HEAD`, `416`),
//! an index of what it holds, and optionally a **pull-through cache** of an upstream URL: a
//! bundle it lacks is fetched once over the expensive link, however many leaves ask at once,
//! verified, and kept (chunks shared across versions stored once, the disk bounded). It
//! announces itself by mDNS/DNS-SD (`_edge-ota._tcp`) so leaves find it without any address
//! typed in.
//!
//! By concern: [`library`] (the bundles an operator put in the directory), [`cache`] (the
//! pull-through cache), [`ranges`] (the `Range` header's limits), [`http`] (connections,
//! limits, routing, streaming bodies from disk), [`announce`] (mDNS), [`stats`] (counters).
//! One tokio runtime; blocking work (disk reads, the upstream download with the blocking
//! [`HttpSource`](crate::source::http::HttpSource)) runs on its blocking pool; a
//! cancellation token stops everything in order.

pub mod announce;
pub mod cache;
pub mod http;
pub mod library;
pub mod ranges;
pub mod stats;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bundle::signature::TrustedKeys;
use crate::error::{Error, Result};
use crate::source::http::HttpOptions;

/// The DNS-SD service type caches announce and leaves browse.
pub const SERVICE_TYPE: &str = "_edge-ota._tcp.local.";
/// Version of the HTTP API (paths, index schema), announced in TXT as `api`.
pub const API_VERSION: u32 = 1;
/// Port `serve` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = crate::config::DEFAULT_SERVE_PORT;
/// Path of the index of bundles.
pub const INDEX_PATH: &str = "/index.json";
/// Path of the counters.
pub const STATS_PATH: &str = "/stats.json";

pub use crate::config::ServeConfig;

/// What `serve` reads from a configuration file: `[serve]`, `[trust]` (the keys a pulled
/// bundle must be signed by) and `[network]` (how the upstream is reached). Other sections
/// are ignored, so a base station that is no edge-ota device needs only these.
#[derive(Debug, Default, Deserialize)]
pub struct ServeFile {
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default)]
    pub trust: Option<crate::config::TrustConfig>,
    #[serde(default)]
    pub network: HttpOptions,
}

impl ServeFile {
    /// Read `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<ServeFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ServeFile::default()),
            Err(e) => {
                return Err(Error::io(
                    format!("reading configuration {}", path.display()),
                    e,
                ))
            }
        };
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            reason: e.message().to_string(),
        })
    }
}

/// Trusted keys from a `[trust]` section.
pub fn trusted_keys(t: &crate::config::TrustConfig) -> Result<TrustedKeys> {
    use crate::bundle::signature::read_public_key;
    let keys = t
        .keys
        .iter()
        .map(|p| read_public_key(p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(TrustedKeys::new(keys, t.threshold)?)
}

/// Everything a running server shares.
pub struct App {
    pub cfg: ServeConfig,
    pub library: library::Library,
    pub cache: Option<Arc<cache::Cache>>,
    pub stats: Arc<stats::Stats>,
    /// Bumped whenever the index changes (the announcer re-announces).
    pub index_changed: tokio::sync::watch::Sender<u64>,
    /// The bound address (the port when 0 was asked for).
    pub local_addr: SocketAddr,
    pub tls: bool,
}

impl App {
    /// The index: every bundle in the directory, then every cached one not shadowed by a
    /// file of the same name.
    pub fn index(&self) -> library::Index {
        let mut bundles: Vec<library::IndexEntry> = self
            .library
            .list()
            .iter()
            .map(|b| b.index_entry())
            .collect();
        if let Some(c) = &self.cache {
            for e in c.index_entries() {
                if !bundles.iter().any(|b| b.name == e.name) {
                    bundles.push(e);
                }
            }
        }
        bundles.sort_by(|a, b| a.name.cmp(&b.name));
        library::Index {
            version: crate::JSON_VERSION,
            api: API_VERSION,
            instance: announce::instance_name(&self.cfg),
            upstream: self.cache.is_some(),
            bundles,
        }
    }

    /// Tell the announcer the index changed.
    pub fn bump_index(&self) {
        self.index_changed.send_modify(|g| *g += 1);
    }
}

/// Log one line on standard error (a service manager's journal).
pub fn log(msg: impl std::fmt::Display) {
    eprintln!("edge-ota serve: {msg}");
}

/// Run the server until `cancel` fires: listen, announce, serve, rescan; then stop accepting,
/// finish or close the open connections (a few seconds at most), withdraw the announcement.
pub async fn run(
    cfg: ServeConfig,
    trust: Option<TrustedKeys>,
    net: HttpOptions,
    cancel: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    let trust = trust.map(Arc::new);
    if cfg.upstream.is_some() && trust.is_none() {
        return Err(Error::Usage(
            "serve: a pull-through cache (upstream) needs trusted keys ([trust] in the configuration, or --trust-key) to verify what it fetches".into(),
        ));
    }
    let meta = std::fs::metadata(&cfg.dir)
        .map_err(|e| Error::io(format!("opening directory {}", cfg.dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::Usage(format!(
            "serve: {} is not a directory",
            cfg.dir.display()
        )));
    }
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(http::tls_acceptor(c, k)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::io(format!("listening on {}", cfg.listen), e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listening address", e))?;
    let stats = Arc::new(stats::Stats::default());
    let (index_changed, _) = tokio::sync::watch::channel(0u64);
    let cache = match &cfg.upstream {
        Some(up) => {
            let c = cfg.clone();
            let up = up.clone();
            let trust = trust.clone().expect("checked above");
            let stats = stats.clone();
            let cache = tokio::task::spawn_blocking(move || {
                cache::Cache::open(cache::CacheOptions {
                    dir: c.cache_dir(),
                    upstream: up,
                    trust,
                    net,
                    max_bytes: c.max_cache_bytes,
                    revalidate: c.revalidate,
                    max_downloads: c.max_upstream_downloads,
                    stats,
                })
            })
            .await
            .map_err(|e| Error::io("opening the cache", std::io::Error::other(e)))??;
            Some(Arc::new(cache))
        }
        None => None,
    };
    let library = library::Library::new(&cfg.dir, trust.clone());
    let app = Arc::new(App {
        library,
        cache,
        stats,
        index_changed,
        local_addr,
        tls: tls.is_some(),
        cfg,
    });
    {
        let app = app.clone();
        tokio::task::spawn_blocking(move || app.library.scan())
            .await
            .map_err(|e| Error::io("scanning", std::io::Error::other(e)))?;
    }
    if let Some(c) = &app.cache {
        let app2 = app.clone();
        c.on_change(move || app2.bump_index());
    }
    log(format!(
        "listening on {local_addr} ({}), serving {}{}",
        if app.tls { "https" } else { "http" },
        app.cfg.dir.display(),
        match &app.cfg.upstream {
            Some(_) => format!(", pull-through cache in {}", app.cfg.cache_dir().display()),
            None => String::new(),
        }
    ));

    let tasks = TaskTracker::new();
    spawn_named(&tasks, "rescan", rescan_loop(app.clone(), cancel.clone()));
    if app.cfg.announce {
        spawn_named(
            &tasks,
            "announce",
            announce::run(app.clone(), cancel.clone()),
        );
    }
    let conns = TaskTracker::new();
    http::accept_loop(listener, tls, app.clone(), cancel.clone(), &conns).await;
    // Stopping: no new connections; open ones get a few seconds to finish their response.
    conns.close();
    if tokio::time::timeout(Duration::from_secs(5), conns.wait())
        .await
        .is_err()
    {
        log("closing connections that did not finish within 5 s");
    }
    tasks.close();
    tasks.wait().await;
    log("stopped");
    Ok(())
}

/// Spawn a task with a name: its failure or panic is logged with that name.
pub fn spawn_named<F>(tasks: &TaskTracker, name: &'static str, fut: F)
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let handle = tasks.spawn(fut);
    tasks.spawn(async move {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log(format!("task {name} failed: {e}")),
            Err(e) => log(format!("task {name} panicked: {e}")),
        }
    });
}

/// Look at the directory again every `rescan` (bundles copied in or removed by the operator).
async fn rescan_loop(app: Arc<App>, cancel: CancellationToken) -> Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(app.cfg.rescan) => {}
        }
        let a = app.clone();
        let changed = tokio::task::spawn_blocking(move || a.library.scan())
            .await
            .unwrap_or(false);
        if changed {
            app.bump_index();
        }
    }
}

/// The `serve` command: a multi-threaded runtime (two workers: the base station is a small
/// machine too), SIGINT/SIGTERM start the orderly stop.
pub fn run_blocking(cfg: ServeConfig, trust: Option<TrustedKeys>, net: HttpOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .thread_name("edge-ota-serve")
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            log("stopping");
            c.cancel();
        });
        run(cfg, trust, net, cancel).await
    })
}
