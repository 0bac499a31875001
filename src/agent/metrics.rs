//! Prometheus metrics of the agent (`GET /metrics`, text exposition by `prometheus-client`):
//! what runs, what is staged and desired, the phase, bytes fetched per source, the last result
//! and when, rollbacks, the last apply's duration. Gauges are set from the agent's snapshot
//! after every change; byte counters grow as progress events arrive.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::machine::Phase;
use super::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotVersion {
    slot: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
    target: String,
}

pub struct Metrics {
    registry: Registry,
    running: Family<SlotVersion, Gauge>,
    staged: Family<VersionLabel, Gauge>,
    desired: Family<VersionLabel, Gauge>,
    phase: Family<PhaseLabel, Gauge>,
    fetched: Family<SourceLabel, Counter>,
    last_result: Family<ResultLabel, Gauge>,
    last_result_time: Gauge,
    rollbacks: Counter,
    failures: Gauge,
    apply_secs: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edge_ota");
        let m = Metrics {
            running: Family::default(),
            staged: Family::default(),
            desired: Family::default(),
            phase: Family::default(),
            fetched: Family::default(),
            last_result: Family::default(),
            last_result_time: Gauge::default(),
            rollbacks: Counter::default(),
            failures: Gauge::default(),
            apply_secs: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "running_info",
            "The slot that runs and its release (value 1)",
            m.running.clone(),
        );
        registry.register(
            "staged_info",
            "The release staged in the cache, if any (value 1)",
            m.staged.clone(),
        );
        registry.register(
            "desired_info",
            "The release the desired state asks for (value 1)",
            m.desired.clone(),
        );
        registry.register(
            "agent_phase",
            "1 for the agent's current phase, 0 for the others",
            m.phase.clone(),
        );
        registry.register(
            "fetched_bytes",
            "Compressed bundle bytes fetched, by source",
            m.fetched.clone(),
        );
        registry.register(
            "last_result",
            "How the last update ended (value 1)",
            m.last_result.clone(),
        );
        registry.register(
            "last_result_timestamp_seconds",
            "When the last update ended (unix seconds)",
            m.last_result_time.clone(),
        );
        registry.register(
            "rollbacks",
            "Rollbacks recorded on this device",
            m.rollbacks.clone(),
        );
        registry.register(
            "agent_failures",
            "Failures in a row of the current desired state",
            m.failures.clone(),
        );
        registry.register(
            "apply_duration_seconds",
            "Duration of the last apply (writing and verifying the slot)",
            m.apply_secs.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count fetched bytes from one source.
    pub fn fetched(&self, source: &str, bytes: u64) {
        self.fetched
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .inc_by(bytes);
    }

    /// Set every gauge from a snapshot.
    pub fn update(&self, s: &Snapshot) {
        self.running.clear();
        if let Some(r) = &s.running {
            self.running
                .get_or_create(&SlotVersion {
                    slot: r.slot.clone(),
                    version: r.version.clone().unwrap_or_default(),
                })
                .set(1);
        }
        self.staged.clear();
        if let Some(v) = &s.staged_version {
            self.staged
                .get_or_create(&VersionLabel { version: v.clone() })
                .set(1);
        }
        self.desired.clear();
        if let Some(d) = &s.agent.desired {
            self.desired
                .get_or_create(&VersionLabel {
                    version: d.target(),
                })
                .set(1);
        }
        for p in Phase::ALL {
            self.phase
                .get_or_create(&PhaseLabel {
                    phase: p.as_str().into(),
                })
                .set(i64::from(p == s.agent.phase));
        }
        self.last_result.clear();
        if let Some(o) = &s.agent.last_result {
            let result = serde_json::to_value(o.result)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            self.last_result
                .get_or_create(&ResultLabel {
                    result,
                    target: o.target.clone(),
                })
                .set(1);
            self.last_result_time.set(o.at as i64);
        }
        let seen = self.rollbacks.get();
        if s.rollbacks_total > seen {
            self.rollbacks.inc_by(s.rollbacks_total - seen);
        }
        self.failures.set(i64::from(s.agent.failures));
        if let Some(secs) = s.agent.work.as_ref().and_then(|w| w.apply_secs) {
            self.apply_secs.set(secs);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::machine::{AgentState, Outcome, OutcomeKind};
    use crate::agent::reconcile::Running;

    #[test]
    fn metrics_show_version_phase_result_and_bytes() {
        let m = Metrics::new();
        let agent = AgentState {
            phase: Phase::Succeeded,
            last_result: Some(Outcome {
                result: OutcomeKind::Succeeded,
                target: "2.0.0".into(),
                reason: None,
                at: 1_795_262_400,
            }),
            ..Default::default()
        };
        m.update(&Snapshot {
            agent,
            running: Some(Running {
                slot: "B".into(),
                version: Some("2.0.0".into()),
                bundle_id: None,
            }),
            staged_version: None,
            rollbacks_total: 2,
        });
        m.fetched("http://10.0.2.2/b.eota", 1000);
        m.fetched("http://10.0.2.2/b.eota", 24);
        let t = m.render();
        for want in [
            "edge_ota_running_info{slot=\"B\",version=\"2.0.0\"} 1",
            "edge_ota_agent_phase{phase=\"succeeded\"} 1",
            "edge_ota_agent_phase{phase=\"staging\"} 0",
            "edge_ota_last_result{result=\"succeeded\",target=\"2.0.0\"} 1",
            "edge_ota_last_result_timestamp_seconds 1795262400",
            "edge_ota_rollbacks_total 2",
            "edge_ota_fetched_bytes_total{source=\"http://10.0.2.2/b.eota\"} 1024",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }
}
