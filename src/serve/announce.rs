//! The mDNS/DNS-SD announcement of a running `serve` (`_edge-ota._tcp`), by `mdns-sd`: pure
//! Rust, no avahi or D-Bus on a minimal OS. Its own thread answers queries; this task only
//! (re-)registers the service when the index changes and withdraws it on shutdown.
//!
//! TXT record (RFC 6763 §6: short keys, each pair under 255 bytes):
//! - `api`: the HTTP API version ([`super::API_VERSION`]);
//! - `tls`: `1` when the server speaks HTTPS;
//! - `up`: `1` for a pull-through cache (bundles not listed may be asked for by name);
//! - `b0`, `b1`, …: `<compatible> <version>` of the newest bundle held per compatible (at
//!   most 16). Leaves use them to skip caches that hold nothing for them; the index
//!   (`/index.json`) is the full list.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};
use tokio_util::sync::CancellationToken;

use super::{App, ServeConfig, API_VERSION, SERVICE_TYPE};
use crate::error::{Error, Result};

/// Compatibles listed in TXT at most.
const MAX_TXT_BUNDLES: usize = 16;

/// The machine's host name (`/proc/sys/kernel/hostname`), for the instance and host names.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edge-ota".into())
}

/// The announced instance name.
pub fn instance_name(cfg: &ServeConfig) -> String {
    cfg.instance.clone().unwrap_or_else(host_name)
}

/// The TXT pairs for what `app` holds now.
pub fn txt(app: &App) -> Vec<(String, String)> {
    let mut out = vec![
        ("api".to_string(), API_VERSION.to_string()),
        (
            "tls".to_string(),
            if app.tls { "1" } else { "0" }.to_string(),
        ),
        (
            "up".to_string(),
            if app.cache.is_some() { "1" } else { "0" }.to_string(),
        ),
    ];
    let mut newest: BTreeMap<String, semver::Version> = BTreeMap::new();
    for e in app.index().bundles.iter().filter(|e| e.complete) {
        let Ok(v) = e.version.parse::<semver::Version>() else {
            continue;
        };
        match newest.get(&e.compatible) {
            Some(have) if *have >= v => {}
            _ => {
                newest.insert(e.compatible.clone(), v);
            }
        }
    }
    for (i, (c, v)) in newest.into_iter().take(MAX_TXT_BUNDLES).enumerate() {
        let val = format!("{c} {v}");
        if val.len() + 4 <= 255 {
            out.push((format!("b{i}"), val));
        }
    }
    out
}

fn mdns_err(e: mdns_sd::Error) -> Error {
    Error::Network {
        url: "mdns".into(),
        reason: e.to_string(),
    }
}

/// Announce until `cancel` fires; re-announce (debounced) when the index changes.
pub async fn run(app: Arc<App>, cancel: CancellationToken) -> Result<()> {
    let daemon = ServiceDaemon::new().map_err(mdns_err)?;
    if !app.cfg.announce_interfaces.is_empty() {
        daemon.disable_interface(IfKind::All).map_err(mdns_err)?;
        let names: Vec<IfKind> = app
            .cfg
            .announce_interfaces
            .iter()
            .map(|n| IfKind::Name(n.clone()))
            .collect();
        daemon.enable_interface(names).map_err(mdns_err)?;
    }
    let instance = instance_name(&app.cfg);
    let host = format!("{}.local.", host_name());
    let port = app.local_addr.port();
    let mut changes = app.index_changed.subscribe();
    let mut fullname: Option<String>;
    loop {
        let props = txt(&app);
        let info = ServiceInfo::new(SERVICE_TYPE, &instance, &host, (), port, &props[..])
            .map_err(mdns_err)?
            .enable_addr_auto();
        fullname = Some(info.get_fullname().to_string());
        daemon.register(info).map_err(mdns_err)?;
        super::log(format!(
            "announcing {instance} ({SERVICE_TYPE} port {port}): {}",
            props
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = changes.changed() => {
                if r.is_err() {
                    break;
                }
                // Many changes in a row (a download completing frame by frame): one update.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                changes.mark_unchanged();
            }
        }
    }
    // Withdraw (a goodbye packet), then stop the daemon's thread; neither may hang shutdown.
    let stop = tokio::task::spawn_blocking(move || {
        if let Some(f) = fullname {
            if let Ok(rx) = daemon.unregister(&f) {
                let _ = rx.recv_timeout(Duration::from_secs(1));
            }
        }
        if let Ok(rx) = daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(3), stop).await;
    Ok(())
}
