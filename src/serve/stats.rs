//! Counters of a running `serve`, shown at `/stats.json`: what went to the LAN (in all and
//! per peer address), what came over the upstream link, and what the limits refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Peers remembered at most (a LAN); past that, new peers are only counted in the totals.
const MAX_PEERS: usize = 4096;

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    /// Connections answered `503` and closed: over `max_connections` or the per-peer limit.
    pub refused_connections: AtomicU64,
    /// Connections closed for moving no byte within the idle timeout.
    pub idle_closed: AtomicU64,
    pub requests: AtomicU64,
    /// Everything written to clients (heads and bodies).
    pub bytes_sent: AtomicU64,
    /// Upstream downloads started (a revalidation that found the same bundle is not one).
    pub upstream_fetches: AtomicU64,
    /// Body bytes received from the upstream.
    pub upstream_bytes: AtomicU64,
    /// Requests refused for their `Range` header (too many ranges, overlapping, malformed).
    pub refused_ranges: AtomicU64,
    peers: Mutex<HashMap<IpAddr, u64>>,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: u32,
    pub connections: u64,
    pub refused_connections: u64,
    pub idle_closed: u64,
    pub requests: u64,
    pub bytes_sent: u64,
    pub upstream_fetches: u64,
    pub upstream_bytes: u64,
    pub refused_ranges: u64,
    /// Bytes sent per peer address.
    pub peers: std::collections::BTreeMap<String, u64>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes went to `peer`.
    pub fn sent(&self, peer: IpAddr, n: u64) {
        Self::add(&self.bytes_sent, n);
        let mut p = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = p.get_mut(&peer) {
            *v += n;
        } else if p.len() < MAX_PEERS {
            p.insert(peer, n);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            version: crate::JSON_VERSION,
            connections: get(&self.connections),
            refused_connections: get(&self.refused_connections),
            idle_closed: get(&self.idle_closed),
            requests: get(&self.requests),
            bytes_sent: get(&self.bytes_sent),
            upstream_fetches: get(&self.upstream_fetches),
            upstream_bytes: get(&self.upstream_bytes),
            refused_ranges: get(&self.refused_ranges),
            peers: self
                .peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        }
    }
}
