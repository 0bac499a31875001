//! Finding base-station caches on the LAN (`edge-ota discover`, `--source auto`): browse
//! mDNS/DNS-SD for `_edge-ota._tcp` for a few seconds and collect what answers, with the TXT
//! record `serve` announces ([`crate::serve::announce`]).
//!
//! Discovery is unauthenticated by nature: anyone on the LAN can announce. That is safe here
//! because a cache can only offer bytes, and every bundle is verified against the device's
//! trusted keys and every chunk against the signed manifest before it is written: a rogue
//! announcer costs at most a failed attempt and a fallback to the next source.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::serve::SERVICE_TYPE;

/// One cache that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cache {
    /// Instance name (the base station's host name unless configured).
    pub instance: String,
    pub host: String,
    pub port: u16,
    /// Its addresses, IPv4 first.
    pub addresses: Vec<IpAddr>,
    /// HTTP API version (TXT `api`).
    pub api: u32,
    pub tls: bool,
    /// A pull-through cache (TXT `up`).
    pub upstream: bool,
    /// `(compatible, version)` of the newest bundle it holds per compatible (TXT `b0`…).
    pub bundles: Vec<(String, String)>,
}

impl Cache {
    /// `http://ADDR:PORT` (`https` when it says so) on its first address; IPv6 link-local
    /// addresses are not used (a URL cannot carry their interface portably).
    pub fn base_url(&self) -> Option<String> {
        let scheme = if self.tls { "https" } else { "http" };
        let addr = self.addresses.iter().find(|a| match a {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })?;
        Some(match addr {
            IpAddr::V4(a) => format!("{scheme}://{a}:{}", self.port),
            IpAddr::V6(a) => format!("{scheme}://[{a}]:{}", self.port),
        })
    }

    /// Whether its TXT record says it holds a bundle for `compatible`.
    pub fn holds(&self, compatible: &str) -> bool {
        self.bundles.iter().any(|(c, _)| c == compatible)
    }
}

/// Browse for `timeout` and return the caches that answered (by instance name).
pub fn discover(timeout: Duration) -> Result<Vec<Cache>> {
    let mdns = |e: mdns_sd::Error| Error::Network {
        url: "mdns".into(),
        reason: e.to_string(),
    };
    let daemon = mdns_sd::ServiceDaemon::new().map_err(mdns)?;
    let rx = daemon.browse(SERVICE_TYPE).map_err(mdns)?;
    let deadline = Instant::now() + timeout;
    let mut found: Vec<Cache> = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(ev) = rx.recv_timeout(left) else { break };
        if let mdns_sd::ServiceEvent::ServiceResolved(s) = ev {
            if !s.is_valid() {
                continue;
            }
            let c = from_resolved(&s);
            match found.iter_mut().find(|f| f.instance == c.instance) {
                Some(f) => *f = c,
                None => found.push(c),
            }
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    if let Ok(done) = daemon.shutdown() {
        let _ = done.recv_timeout(Duration::from_secs(1));
    }
    found.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(found)
}

fn from_resolved(s: &mdns_sd::ResolvedService) -> Cache {
    let instance = s
        .fullname
        .strip_suffix(&format!(".{SERVICE_TYPE}"))
        .unwrap_or(&s.fullname)
        .to_string();
    let txt = |k: &str| s.txt_properties.get_property_val_str(k).map(str::to_string);
    let mut addresses: Vec<IpAddr> = s.addresses.iter().map(|a| a.to_ip_addr()).collect();
    addresses.sort_by_key(|a| (a.is_ipv6(), *a));
    let bundles = (0..16)
        .filter_map(|i| txt(&format!("b{i}")))
        .filter_map(|v| {
            v.split_once(' ')
                .map(|(c, ver)| (c.to_string(), ver.to_string()))
        })
        .collect();
    Cache {
        instance,
        host: s.host.clone(),
        port: s.port,
        addresses,
        api: txt("api").and_then(|v| v.parse().ok()).unwrap_or(0),
        tls: txt("tls").as_deref() == Some("1"),
        upstream: txt("up").as_deref() == Some("1"),
        bundles,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(addresses: Vec<IpAddr>, tls: bool) -> Cache {
        Cache {
            instance: "base".into(),
            host: "base.local.".into(),
            port: 8470,
            addresses,
            api: 1,
            tls,
            upstream: false,
            bundles: vec![("edge-test".into(), "2.0.0".into())],
        }
    }

    #[test]
    fn base_url_prefers_a_routable_address() {
        let c = cache(
            vec!["fe80::1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
            false,
        );
        assert_eq!(c.base_url().unwrap(), "http://10.0.0.1:8470");
        let c = cache(vec!["fe80::1".parse().unwrap()], true);
        assert_eq!(c.base_url(), None);
        let c = cache(vec!["fd00::1".parse().unwrap()], true);
        assert_eq!(c.base_url().unwrap(), "https://[fd00::1]:8470");
        assert!(c.holds("edge-test") && !c.holds("other"));
    }
}
