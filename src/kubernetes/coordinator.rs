//! The agent's [`Coordinator`] in a cluster. Before the reboot: a Lease of the OSUpdate's
//! `maxUnavailable` semaphore, then (unless single-node) cordon and evictions until the node
//! is empty or the drain timeout decides (`abort`: uncordon, release, report `Stalled`, the
//! slot is taken back; `proceed`: reboot anyway). After the update: the node `Ready` in the
//! API, uncordon, release. The API server unreachable: "wait" (the update stays staged and
//! applied, the reboot waits for the link), never "go".

use std::sync::{Arc, Mutex};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use super::crd::{DrainPolicy, OSUpdate, OnTimeout};
use super::lease::{Semaphore, Taken};
use super::{drain, probe, Kube, KubeError, Registry, ORIGIN_PREFIX};
use crate::agent::coordinate::{Coordinator, Ended, Gate};
use crate::agent::desired::Desired;

/// Semaphore of desired states that come from elsewhere (a file, a stick) on a node of a
/// cluster: one such reboot at a time, drained as usual.
pub const LOCAL_GROUP: &str = "edge-ota-local";

/// What the coordinator shares with the status reporter.
#[derive(Debug, Default, Clone)]
pub struct Shared {
    /// Why this node stopped the rollout (drain timed out, rolled back); `None`: it did not.
    pub stalled: Option<String>,
}

pub struct KubeCoordinator {
    rt: Arc<tokio::runtime::Runtime>,
    client: kube::Client,
    registry: Registry,
    node: String,
    lease_ns: String,
    lease_secs: i64,
    poll: u64,
    single_node: bool,
    drain_started: Option<u64>,
    pub shared: Arc<Mutex<Shared>>,
}

/// The coordination settings of one desired state.
struct Params {
    group: String,
    max: u32,
    drain: DrainPolicy,
    stop_on_failure: bool,
    update: Option<OSUpdate>,
}

impl KubeCoordinator {
    pub fn new(k: &Kube) -> Self {
        KubeCoordinator {
            rt: k.rt.clone(),
            client: k.client.clone(),
            registry: k.registry.clone(),
            node: k.cfg.node_name.clone(),
            lease_ns: k.cfg.lease_namespace.clone(),
            lease_secs: k.cfg.lease_secs as i64,
            poll: k.cfg.poll_secs,
            single_node: k.cfg.single_node,
            drain_started: None,
            shared: Default::default(),
        }
    }

    fn params(&self, d: &Desired) -> Params {
        let name = d.origin.strip_prefix(ORIGIN_PREFIX);
        let o = name.and_then(|n| self.registry.lock().expect("registry").get(n).cloned());
        match o {
            Some(o) => Params {
                group: o.metadata.name.clone().unwrap_or_default(),
                max: o.spec.max_unavailable.max(1),
                drain: o.spec.drain.clone(),
                stop_on_failure: o.spec.stop_on_failure,
                update: Some(o),
            },
            None => Params {
                group: LOCAL_GROUP.into(),
                max: 1,
                drain: DrainPolicy::default(),
                stop_on_failure: false,
                update: None,
            },
        }
    }

    fn semaphore(&self, p: &Params) -> Semaphore {
        Semaphore {
            api: Api::<Lease>::namespaced(self.client.clone(), &self.lease_ns),
            group: p.group.clone(),
            max: p.max,
            me: self.node.clone(),
            duration_secs: self.lease_secs,
        }
    }

    fn later(&self, now: u64, why: String) -> Gate {
        Gate::Wait {
            until: now + self.poll,
            why,
        }
    }

    /// Another node stopped this rollout (`stopOnFailure`), in the current generation.
    fn stopped_by_other(&self, p: &Params) -> Option<String> {
        let o = p.update.as_ref().filter(|_| p.stop_on_failure)?;
        let g = o.metadata.generation;
        o.status.as_ref()?.nodes.iter().find_map(|(n, s)| {
            (n != &self.node && s.observed_generation == g)
                .then_some(())
                .and(s.stalled.as_ref())
                .map(|why| format!("rollout stopped by node {n}: {why}"))
        })
    }

    async fn acquire_async(&mut self, p: &Params, now: u64) -> Result<Gate, KubeError> {
        if let Some(why) = self.stopped_by_other(p) {
            return Ok(self.later(now, why));
        }
        match self.semaphore(p).acquire(now as i64).await? {
            Taken::No { until, why } => {
                return Ok(Gate::Wait {
                    until: (until.max(0) as u64).clamp(now + 1, now + self.poll),
                    why,
                })
            }
            Taken::Yes(_) => {}
        }
        if self.single_node {
            // Nowhere to move pods: the reboot's `before` commands stop kubelet, containerd.
            return Ok(Gate::Go);
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        drain::cordon(&nodes, &self.node).await?;
        let started = *self.drain_started.get_or_insert(now);
        let left = drain::evict_pass(&self.client, &self.node).await?;
        if left.is_empty() {
            return Ok(Gate::Go);
        }
        let list = left
            .iter()
            .map(|(p, why)| format!("{p} ({why})"))
            .collect::<Vec<_>>()
            .join(", ");
        if now.saturating_sub(started) < p.drain.timeout_secs {
            return Ok(self.later(now, format!("draining: waiting for {list}")));
        }
        let why = format!("drain timed out after {}s: {list}", p.drain.timeout_secs);
        match p.drain.on_timeout {
            OnTimeout::Proceed => Ok(Gate::Go),
            OnTimeout::Abort => {
                self.shared.lock().expect("shared").stalled = Some(why.clone());
                Ok(Gate::Abort(why))
            }
        }
    }

    async fn release_async(
        &mut self,
        p: &Params,
        ended: Ended,
        now: u64,
    ) -> Result<Gate, KubeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let sem = self.semaphore(p);
        if ended != Ended::NotRebooted && !probe::node_ready(&nodes, &self.node).await? {
            // Keep the slot while the node comes back: renew, do not release.
            if sem.held().await? {
                sem.acquire(now as i64).await?;
            }
            return Ok(self.later(now, format!("waiting for node {} to be Ready", self.node)));
        }
        drain::uncordon(&nodes, &self.node).await?;
        sem.release().await?;
        self.drain_started = None;
        let mut sh = self.shared.lock().expect("shared");
        match ended {
            Ended::Confirmed => sh.stalled = None,
            Ended::RolledBack if p.stop_on_failure => {
                sh.stalled = Some("rolled back to the previous slot (health gate)".into())
            }
            _ => {}
        }
        Ok(Gate::Go)
    }
}

impl Coordinator for KubeCoordinator {
    fn acquire(&mut self, d: &Desired, now: u64) -> Gate {
        let p = self.params(d);
        let rt = self.rt.clone();
        match rt.block_on(self.acquire_async(&p, now)) {
            Ok(g) => g,
            // Offline: the update stays applied and waits; nothing is lost.
            Err(e) => self.later(now, format!("kubernetes: {e}")),
        }
    }

    fn release(&mut self, d: &Desired, ended: Ended, now: u64) -> Gate {
        let p = self.params(d);
        let rt = self.rt.clone();
        match rt.block_on(self.release_async(&p, ended, now)) {
            Ok(g) => g,
            Err(e) => self.later(now, format!("kubernetes: {e}")),
        }
    }
}
