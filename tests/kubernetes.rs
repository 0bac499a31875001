//! The Kubernetes coordination against an in-process fake API server
//! (`edge_ota_testkit::kube_api::FakeApiServer`, the real wire format: kube-rs's own client
//! and watcher talk to it). Each node runs the real agent machine (`Reconciler`), the real
//! OSUpdate provider, coordinator (Leases, cordon, evictions, node Ready) and status
//! reporter; only the device is simulated (a host whose reboot switches slots). Scenarios are
//! named after the fault they cover; `scripts/k8s-e2e.sh` runs them against a real cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_ota::agent::coordinate::Coordinator;
use edge_ota::agent::desired::Desired;
use edge_ota::agent::machine::{AgentStore, Phase, Work};
use edge_ota::agent::reconcile::{
    BootVerdict, Clock, Host, Next, Reconciler, Running, StageDone, SystemClock,
};
use edge_ota::agent::Input;
use edge_ota::config::{AgentConfig, KubernetesConfig};
use edge_ota::kubernetes::coordinator::KubeCoordinator;
use edge_ota::kubernetes::status::{Report, Reporter};
use edge_ota::kubernetes::{provider, Kube};
use edge_ota::Result;
use edge_ota_testkit::kube_api::FakeApiServer;
use serde_json::{json, Value};

const NS: &str = "edge-ota-system";
const OSU: (&str, &str) = ("edge-ota.io/v1alpha1", "OSUpdate");

/// A device in memory: slot A runs 1.0.0; a reboot boots the other slot, whose health gate
/// confirms it (or rolls back, when told to).
struct SimHost {
    booted: String,
    versions: BTreeMap<String, String>,
    installed: Option<String>,
    staged: bool,
    boot_id: u32,
    roll_back: bool,
    rebooted: bool,
    abandoned: usize,
    reboots: usize,
}

impl SimHost {
    fn new(roll_back: bool) -> Self {
        SimHost {
            booted: "A".into(),
            versions: [("A".to_string(), "1.0.0".to_string())].into(),
            installed: None,
            staged: false,
            boot_id: 1,
            roll_back,
            rebooted: false,
            abandoned: 0,
            reboots: 0,
        }
    }
    fn boot(&mut self) {
        self.boot_id += 1;
        self.rebooted = false;
        if let Some(slot) = self.installed.take() {
            if !self.roll_back {
                self.booted = slot;
            }
        }
    }
}

impl Host for SimHost {
    fn running(&self) -> Result<Running> {
        Ok(Running {
            slot: self.booted.clone(),
            version: self.versions.get(&self.booted).cloned(),
            bundle_id: None,
        })
    }
    fn boot_id(&self) -> Result<String> {
        Ok(format!("boot-{}", self.boot_id))
    }
    fn stage(&mut self, d: &Desired, _: Option<u64>, _: Arc<AtomicBool>) -> Result<StageDone> {
        self.staged = true;
        Ok(StageDone {
            source: d.spec().sources[0].clone(),
            bundle_id: "id2".into(),
            version: d.target(),
            fetched: 1,
        })
    }
    fn is_staged(&self, _: &str) -> bool {
        self.staged
    }
    fn is_installed(&self, slot: &str, _: &str) -> bool {
        self.installed.as_deref() == Some(slot)
    }
    fn target_slot(&self) -> Result<String> {
        Ok(if self.booted == "A" { "B" } else { "A" }.into())
    }
    fn apply(&mut self, w: &Work) -> Result<String> {
        let slot = self.target_slot()?;
        self.installed = Some(slot.clone());
        self.versions
            .insert(slot.clone(), w.version.clone().unwrap());
        Ok(slot)
    }
    fn import_images(&mut self, _: &str) -> Result<()> {
        Ok(())
    }
    fn add_health(&mut self, _: &str, _: &Desired) -> Result<()> {
        Ok(())
    }
    fn abandon(&mut self, _: &str, _: &str) -> Result<()> {
        self.installed = None;
        self.abandoned += 1;
        Ok(())
    }
    fn reboot(&mut self) -> Result<()> {
        self.rebooted = true;
        self.reboots += 1;
        Ok(())
    }
    fn verdict(&self, target: &str) -> Result<BootVerdict> {
        Ok(if self.booted == target {
            BootVerdict::Confirmed
        } else {
            BootVerdict::RolledBack("health probe app failed".into())
        })
    }
}

fn node(name: &str, pool: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"edge-ota.io/pool": pool}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn osupdate(activation: Value, drain: Value, stop_on_failure: bool) -> Value {
    json!({
        "apiVersion": OSU.0, "kind": OSU.1,
        "metadata": {"name": "edge-2"},
        "spec": {
            "version": "2.0.0",
            "sources": ["http://updates.invalid/edge-2.eota"],
            "activation": activation,
            "nodeSelector": {"matchLabels": {"edge-ota.io/pool": "stores"}},
            "maxUnavailable": 1,
            "drain": drain,
            "stopOnFailure": stop_on_failure,
        }
    })
}

fn now_policy() -> Value {
    json!({"policy": "Now"})
}

/// What the test watches across agents: nodes between their reboot and their release.
#[derive(Default)]
struct Track {
    away: BTreeSet<String>,
    max_away: usize,
}

struct Agent {
    name: String,
    dir: tempfile::TempDir,
    kube: Kube,
    agent: AgentConfig,
    rx: crossbeam_channel::Receiver<Input>,
}

fn agent(server: &FakeApiServer, kubeconfig: &Path, name: &str, lease_secs: u64) -> Agent {
    let k = KubernetesConfig {
        kubeconfig: kubeconfig.to_path_buf(),
        node_name: name.into(),
        lease_namespace: NS.into(),
        single_node: false,
        lease_secs,
        poll_secs: 1,
        kubelet_healthz: String::new(),
    };
    let _ = server;
    let mut a: AgentConfig = toml::from_str("retry_secs = 1\nretry_max_secs = 2\n").unwrap();
    a.kubernetes = Some(k.clone());
    let kube = Kube::connect(&k).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    provider::spawn(&kube, a.clone(), tx);
    Agent {
        name: name.into(),
        dir: tempfile::tempdir().unwrap(),
        kube,
        agent: a,
        rx,
    }
}

/// Run one node's agent until `done` says so or `limit` passes; a reboot the agent asks for
/// happens (the process starts again from its state file).
fn run(
    a: &Agent,
    host: &mut SimHost,
    track: &Mutex<Track>,
    limit: Duration,
    done: impl Fn(&Reconciler) -> bool,
) -> (Phase, Option<String>) {
    let clock = SystemClock;
    let coordinator = KubeCoordinator::new(&a.kube);
    let reporter = Arc::new(Reporter::spawn(&a.kube, coordinator.shared.clone()));
    let shared_coord = Arc::new(Mutex::new(coordinator));
    let t0 = Instant::now();
    loop {
        let mut rec = Reconciler::load(
            AgentStore::new(a.dir.path()),
            &a.agent,
            &clock as &dyn Clock,
        )
        .unwrap();
        rec.coordinator = Box::new(Shared(shared_coord.clone()));
        let r = reporter.clone();
        rec.on_change = Box::new(move |st| {
            r.publish(Report {
                origin: st.desired.as_ref().map(|d| d.origin.clone()),
                phase: st.phase.as_str().into(),
                last_error: st.last_error.clone(),
                at: st.since,
                ..Default::default()
            })
        });
        loop {
            while let Ok(i) = a.rx.try_recv() {
                if let Input::Offer(_, Ok(d)) = i {
                    rec.offer(*d).unwrap();
                }
            }
            let next = rec.step(host).unwrap();
            if host.rebooted {
                let mut t = track.lock().unwrap();
                t.away.insert(a.name.clone());
                t.max_away = t.max_away.max(t.away.len());
                break;
            }
            if rec.state.release_owed.is_none() {
                track.lock().unwrap().away.remove(&a.name);
            }
            if done(&rec) || t0.elapsed() > limit {
                return (rec.state.phase, rec.state.last_error.clone());
            }
            if let Next::WaitUntil(until) = next {
                let wait = until.map_or(1, |u| u.saturating_sub(clock.now())).min(1);
                std::thread::sleep(Duration::from_millis(100 + 200 * wait));
            }
        }
        // The reboot: the node is away for a moment, then boots (the other slot, unless
        // its health gate rolls back) and the agent starts again.
        std::thread::sleep(Duration::from_millis(300));
        host.boot();
    }
}

/// The agent owns its coordinator; the test keeps it across simulated restarts, as the
/// cluster keeps the Leases and cordons.
struct Shared(Arc<Mutex<KubeCoordinator>>);

impl Coordinator for Shared {
    fn acquire(&mut self, d: &Desired, now: u64) -> edge_ota::agent::coordinate::Gate {
        self.0.lock().unwrap().acquire(d, now)
    }
    fn release(
        &mut self,
        d: &Desired,
        e: edge_ota::agent::coordinate::Ended,
        now: u64,
    ) -> edge_ota::agent::coordinate::Gate {
        self.0.lock().unwrap().release(d, e, now)
    }
}

fn settled(r: &Reconciler) -> bool {
    matches!(
        r.state.phase,
        Phase::Succeeded | Phase::Failed | Phase::GaveUp
    ) && r.state.release_owed.is_none()
}

struct Cluster {
    server: FakeApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

fn cluster(nodes: &[&str], update: Value) -> Cluster {
    let server = FakeApiServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, NS).unwrap();
    for n in nodes {
        server.create(node(n, "stores"));
    }
    server.create(update);
    Cluster {
        server,
        _dir: dir,
        kubeconfig,
    }
}

fn status(c: &Cluster) -> Value {
    c.server.get(OSU.0, OSU.1, None, "edge-2").unwrap()["status"].clone()
}

fn condition(st: &Value, t: &str) -> (String, String) {
    let c = st["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == t)
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().into(),
        c["message"].as_str().unwrap_or_default().into(),
    )
}

fn wait_for(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn leases_held(c: &Cluster) -> Vec<String> {
    c.server
        .list("coordination.k8s.io/v1", "Lease")
        .iter()
        .filter_map(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
        .collect()
}

#[test]
fn three_nodes_max_unavailable_one_never_reboot_two_at_once_and_all_update() {
    let names = ["node-a", "node-b", "node-c"];
    let c = cluster(
        &names,
        osupdate(now_policy(), json!({"timeoutSecs": 30}), false),
    );
    let track = Mutex::new(Track::default());
    // The agents (their runtimes, their status reporters) live on after their update, as
    // the real agent does: their last report must not be cut off.
    let done: Vec<(SimHost, Agent)> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                let a = agent(&c.server, &c.kubeconfig, n, 30);
                let track = &track;
                s.spawn(move || {
                    let mut h = SimHost::new(false);
                    let (phase, err) = run(&a, &mut h, track, Duration::from_secs(60), settled);
                    assert_eq!(phase, Phase::Succeeded, "{}: {err:?}", a.name);
                    (h, a)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (h, _) in &done {
        assert_eq!(h.booted, "B");
        assert_eq!(h.versions["B"], "2.0.0");
        assert_eq!(h.reboots, 1);
    }
    assert_eq!(
        track.lock().unwrap().max_away,
        1,
        "two nodes were away at once"
    );
    assert_eq!(
        c.server.max_cordoned_at_once(),
        1,
        "two nodes cordoned at once"
    );
    assert!(leases_held(&c).is_empty(), "a lease is still held");
    for n in names {
        let node = c.server.get("v1", "Node", None, n).unwrap();
        assert_ne!(node["spec"]["unschedulable"], true, "{n} left cordoned");
    }
    wait_for("status Ready 3/3", Duration::from_secs(10), || {
        let st = status(&c);
        st["readyNodes"] == "3/3" && condition(&st, "Ready").0 == "True"
    });
}

#[test]
fn pdb_that_never_allows_eviction_times_out_uncordons_and_stalls_without_reboot() {
    let c = cluster(
        &["node-a"],
        osupdate(
            now_policy(),
            json!({"timeoutSecs": 2, "onTimeout": "abort"}),
            false,
        ),
    );
    c.server.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "db-0", "namespace": "shop", "labels": {"app": "db"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "db", "image": "db"}]},
        "status": {"phase": "Running"}
    }));
    c.server.create(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}},
        "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1,
                   "expectedPods": 1, "observedGeneration": 1}
    }));
    let a = agent(&c.server, &c.kubeconfig, "node-a", 30);
    let mut h = SimHost::new(false);
    let track = Mutex::new(Track::default());
    let (phase, err) = run(&a, &mut h, &track, Duration::from_secs(30), settled);
    assert_eq!(phase, Phase::Failed, "{err:?}");
    assert!(err.unwrap().contains("drain timed out"));
    assert_eq!(h.reboots, 0, "rebooted an undrained node");
    assert_eq!(h.abandoned, 1, "the applied slot was left next to boot");
    let node = c.server.get("v1", "Node", None, "node-a").unwrap();
    assert_ne!(node["spec"]["unschedulable"], true, "left cordoned");
    assert!(c.server.get("v1", "Pod", Some("shop"), "db-0").is_some());
    assert!(leases_held(&c).is_empty());
    wait_for("status Stalled", Duration::from_secs(10), || {
        let (s, m) = condition(&status(&c), "Stalled");
        s == "True" && m.contains("drain timed out") && m.contains("shop/db-0")
    });
}

#[test]
fn lease_of_a_killed_holder_expires_and_another_node_proceeds() {
    let c = cluster(
        &["node-a", "node-b"],
        osupdate(now_policy(), json!({"timeoutSecs": 30}), false),
    );
    // node-a took the only slot and was killed: its Lease is never renewed.
    let now = SystemClock.now() as i64;
    let micro = |t: i64| {
        k8s_openapi::jiff::Timestamp::from_second(t)
            .unwrap()
            .strftime("%Y-%m-%dT%H:%M:%S.000000Z")
            .to_string()
    };
    c.server.create(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "edge-2-0", "namespace": NS},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 3,
                 "acquireTime": micro(now), "renewTime": micro(now)}
    }));
    let a = agent(&c.server, &c.kubeconfig, "node-b", 30);
    let mut h = SimHost::new(false);
    let track = Mutex::new(Track::default());
    let t0 = Instant::now();
    let (phase, err) = run(&a, &mut h, &track, Duration::from_secs(30), settled);
    assert_eq!(phase, Phase::Succeeded, "{err:?}");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "took the lease before it expired"
    );
    let first_cordon = c
        .server
        .history()
        .into_iter()
        .find(|w| w.resource == "nodes" && w.unschedulable == Some(true))
        .unwrap();
    let lease_expiry = std::time::UNIX_EPOCH + Duration::from_secs(now as u64 + 3);
    assert!(first_cordon.at >= lease_expiry - Duration::from_secs(1));
    assert_eq!(h.reboots, 1);
}

#[test]
fn closed_window_stages_but_never_applies_or_takes_a_slot() {
    // A window one hour from now: closed for the whole test.
    let hour = (chrono_hour() + 1) % 24;
    let c = cluster(
        &["node-a"],
        osupdate(
            json!({"policy": "Window", "windows": [
                {"schedule": format!("0 {hour} * * *"), "duration": "30m", "timeZone": "UTC"}
            ]}),
            json!({"timeoutSecs": 30}),
            false,
        ),
    );
    let a = agent(&c.server, &c.kubeconfig, "node-a", 30);
    let mut h = SimHost::new(false);
    let track = Mutex::new(Track::default());
    let (phase, _) = run(&a, &mut h, &track, Duration::from_secs(3), |r| {
        r.state.phase == Phase::Staged
    });
    assert_eq!(phase, Phase::Staged);
    assert!(h.staged);
    assert_eq!(h.installed, None);
    assert_eq!(h.reboots, 0);
    assert!(leases_held(&c).is_empty());
    assert!(c
        .server
        .history()
        .iter()
        .all(|w| w.by_test || w.resource != "nodes"));
}

fn chrono_hour() -> u64 {
    (SystemClock.now() / 3600) % 24
}

#[test]
fn node_failing_its_health_check_rolls_back_releases_and_stops_the_rollout() {
    let c = cluster(
        &["node-a", "node-b"],
        osupdate(now_policy(), json!({"timeoutSecs": 30}), true),
    );
    let track = Mutex::new(Track::default());
    let a = agent(&c.server, &c.kubeconfig, "node-a", 30);
    let mut ha = SimHost::new(true);
    let (phase, err) = run(&a, &mut ha, &track, Duration::from_secs(30), settled);
    assert_eq!(phase, Phase::Failed);
    assert!(err.unwrap().contains("rolled back"));
    assert_eq!(ha.booted, "A");
    assert!(leases_held(&c).is_empty(), "lease kept after the rollback");
    let node = c.server.get("v1", "Node", None, "node-a").unwrap();
    assert_ne!(node["spec"]["unschedulable"], true);
    wait_for("status Stalled", Duration::from_secs(10), || {
        let (s, m) = condition(&status(&c), "Stalled");
        s == "True" && m.contains("node-a: rolled back")
    });
    // node-b stages and applies, but the rollout is stopped: it never takes a slot.
    let b = agent(&c.server, &c.kubeconfig, "node-b", 30);
    let mut hb = SimHost::new(false);
    let (phase, err) = run(&b, &mut hb, &track, Duration::from_secs(4), |_| false);
    assert_eq!(phase, Phase::Draining);
    assert!(err.unwrap().contains("rollout stopped by node node-a"));
    assert_eq!(hb.reboots, 0);
    let node = c.server.get("v1", "Node", None, "node-b").unwrap();
    assert_ne!(node["spec"]["unschedulable"], true);
}

/// The API server goes away mid-rollout: staging and apply go on, the reboot waits, and
/// when the link returns the node is drained, rebooted and handed back.
#[test]
fn api_server_down_staging_goes_on_reboot_waits_for_the_link() {
    let c = cluster(
        &["node-a"],
        osupdate(now_policy(), json!({"timeoutSecs": 30}), false),
    );
    let a = agent(&c.server, &c.kubeconfig, "node-a", 30);
    // The offer arrives while the link is up; then it goes down.
    wait_for("the offer", Duration::from_secs(10), || !a.rx.is_empty());
    c.server.set_unavailable(true);
    let mut h = SimHost::new(false);
    let track = Mutex::new(Track::default());
    let (phase, err) = run(&a, &mut h, &track, Duration::from_secs(3), |_| false);
    assert_eq!(phase, Phase::Draining);
    assert!(err.unwrap().contains("kubernetes"));
    assert_eq!(h.reboots, 0);
    c.server.set_unavailable(false);
    let (phase, err) = run(&a, &mut h, &track, Duration::from_secs(30), settled);
    assert_eq!(phase, Phase::Succeeded, "{err:?}");
    assert_eq!(h.reboots, 1);
}

/// The agent is killed while its node drains (a PDB holds a pod): the new process finds its
/// Lease and its cordon and goes on, it does not take a second slot or forget the node.
#[test]
fn agent_restarted_mid_drain_keeps_its_lease_and_finishes() {
    let c = cluster(
        &["node-a", "node-b"],
        osupdate(now_policy(), json!({"timeoutSecs": 60}), false),
    );
    c.server.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "db-0", "namespace": "shop", "labels": {"app": "db"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "db", "image": "db"}]},
        "status": {"phase": "Running"}
    }));
    c.server.create(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}},
        "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1,
                   "expectedPods": 1, "observedGeneration": 1}
    }));
    let track = Mutex::new(Track::default());
    let a = agent(&c.server, &c.kubeconfig, "node-a", 30);
    let mut h = SimHost::new(false);
    let (phase, err) = run(&a, &mut h, &track, Duration::from_secs(3), |_| false);
    assert_eq!(phase, Phase::Draining);
    assert!(err.unwrap().contains("shop/db-0"));
    assert_eq!(leases_held(&c), ["node-a"]);
    // Killed here; the PDB's owner scales it up meanwhile.
    c.server.patch(
        "policy/v1",
        "PodDisruptionBudget",
        Some("shop"),
        "db",
        json!({"status": {"disruptionsAllowed": 1}}),
    );
    let (phase, err) = run(&a, &mut h, &track, Duration::from_secs(30), settled);
    assert_eq!(phase, Phase::Succeeded, "{err:?}");
    assert_eq!(h.reboots, 1);
    assert!(c.server.get("v1", "Pod", Some("shop"), "db-0").is_none());
    let lease = c
        .server
        .get("coordination.k8s.io/v1", "Lease", Some(NS), "edge-2-0")
        .unwrap();
    assert_eq!(
        lease["spec"]["leaseTransitions"], 1,
        "the Lease changed hands"
    );
    assert!(leases_held(&c).is_empty());
    let node = c.server.get("v1", "Node", None, "node-a").unwrap();
    assert_ne!(node["spec"]["unschedulable"], true);
}
