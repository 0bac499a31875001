//! `edge-ota agent`: the updater as a service next to PID 1. Told *what* to run by a desired
//! state ([`desired`]) from its providers ([`providers`], [`media`]), it decides *when*:
//! staging at once while the link is up, applying in a maintenance window ([`crate::schedule`]),
//! rebooting in order, then reporting what the health gate decided. The phases are an explicit,
//! persisted state machine ([`machine`]) driven by [`reconcile`] against the device
//! ([`host`]). People and programs talk to it through a local API ([`api`]); Prometheus
//! scrapes [`metrics`].
//!
//! Threads: the agent's own (reconcile: all device changes, one at a time, under the
//! operation lock), one per provider, and the API's small tokio runtime.

pub mod api;
pub mod cli;
pub mod coordinate;
pub mod desired;
pub mod host;
pub mod machine;
pub mod media;
pub mod metrics;
pub mod providers;
pub mod reconcile;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{AgentConfig, Config};
use crate::error::{Error, Result};
use crate::progress::Event;
use desired::Desired;
use machine::{AgentState, AgentStore, Phase};
use reconcile::{Clock, Next, Reconciler, Running, SystemClock};

/// What reaches the agent's thread.
pub enum Input {
    /// A provider's new document (or why it could not be read), with the provider's name.
    Offer(String, std::result::Result<Box<Desired>, String>),
    /// A provider cannot reach its document.
    ProviderError(String, String),
    /// A request from the API.
    Api(api::ApiRequest),
    /// Something to tell people (removable media).
    Notice(String),
}

/// What the API and metrics show: the agent's state plus what runs and what is staged.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub agent: AgentState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_version: Option<String>,
    pub rollbacks_total: u64,
}

impl Serialize for Running {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Running", 3)?;
        st.serialize_field("slot", &self.slot)?;
        st.serialize_field("version", &self.version)?;
        st.serialize_field("bundle_id", &self.bundle_id)?;
        st.end()
    }
}

fn snapshot(cfg: &Config, state: &AgentState) -> Snapshot {
    let running = crate::slot::booted_slot(&cfg.cmdline)
        .ok()
        .flatten()
        .map(|slot| {
            let rec = crate::state::StateStore::new(&cfg.state_dir)
                .load()
                .map(|s| s.slot(&slot))
                .unwrap_or_default();
            Running {
                slot,
                version: rec.version,
                bundle_id: rec.bundle_id,
            }
        });
    let rollbacks_total = crate::state::StateStore::new(&cfg.state_dir)
        .load()
        .map_or(0, |s| s.rollbacks_total);
    let staged_version = crate::stage::list(&cfg.cache_dir())
        .into_iter()
        .find(|i| i.complete)
        .map(|i| i.version);
    Snapshot {
        agent: state.clone(),
        running,
        staged_version,
        rollbacks_total,
    }
}

/// Run the agent until the process is killed.
pub fn run(cfg: &Config) -> Result<()> {
    let agent: &AgentConfig = cfg.agent.as_ref().ok_or_else(|| Error::Config {
        path: "[agent]".into(),
        reason: "the configuration has no [agent] section".into(),
    })?;
    let clock = SystemClock;
    // Everyone sends to `tx`; a router passes inputs on to the agent's thread, and stops a
    // running stage (which keeps that thread busy) when an input needs it.
    let (tx, routed) = crossbeam_channel::unbounded::<Input>();
    let (forward, rx) = crossbeam_channel::unbounded::<Input>();
    let mut rec = Reconciler::load(AgentStore::new(&cfg.state_dir), agent, &clock as &dyn Clock)?;
    let shared = Arc::new(api::Shared::new(snapshot(cfg, &rec.state), tx.clone()));
    {
        let (shared, cancel) = (shared.clone(), rec.cancel.clone());
        std::thread::spawn(move || {
            for i in routed {
                if interrupts(&i, &shared) {
                    cancel.store(true, Ordering::Relaxed);
                }
                if forward.send(i).is_err() {
                    return;
                }
            }
        });
    }

    // The API first: a person can look even while the first step runs.
    let unix = api::bind_unix(&agent.socket, agent.socket_mode)?;
    let tcp = match &agent.metrics {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .map_err(|e| Error::io(format!("listening for metrics on {a}"), e))?,
        ),
        None => None,
    };
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = api::serve(shared, unix, tcp) {
                    eprintln!("edge-ota agent: API stopped: {e}");
                }
            })
            .map_err(|e| Error::io("starting the API thread", e))?;
    }
    if let Some(path) = agent.desired_file.clone() {
        let (a, tx) = (agent.clone(), tx.clone());
        std::thread::spawn(move || providers::watch_file(path, a, tx, providers::FILE_POLL));
    }
    if let Some(url) = agent.desired_url.clone() {
        let (a, tx, net) = (agent.clone(), tx.clone(), cfg.network.clone());
        std::thread::spawn(move || providers::poll_url(url, net, a, tx));
    }
    {
        let (c, tx) = (cfg.clone(), tx.clone());
        std::thread::spawn(move || media::watch(c, tx));
    }
    // In a cluster: OSUpdates are a provider, reboots wait for a Lease and a drain, and the
    // node reports in the OSUpdate's status. The kubeconfig is read now; the API server may
    // well be down (staging goes on without it).
    let mut reporter = None;
    if let Some(k) = &agent.kubernetes {
        let kube = crate::kubernetes::Kube::connect(k).map_err(|e| Error::Config {
            path: "[agent.kubernetes]".into(),
            reason: e.to_string(),
        })?;
        crate::kubernetes::provider::spawn(&kube, agent.clone(), tx.clone());
        let c = crate::kubernetes::coordinator::KubeCoordinator::new(&kube);
        reporter = Some(crate::kubernetes::status::Reporter::spawn(
            &kube,
            c.shared.clone(),
        ));
        // The coordinator keeps the runtime (an `Arc`) as long as the agent lives.
        rec.coordinator = Box::new(c);
    }

    // Progress events: to subscribers, and fetched bytes to the metrics.
    let sink: crate::progress::Sink = {
        let shared = shared.clone();
        let fetched = std::sync::Mutex::new((String::new(), 0u64));
        Arc::new(move |time, e: &Event| {
            match e {
                Event::Plan(p) => *fetched.lock().expect("lock") = (p.source.clone(), 0),
                Event::Bytes(b) => {
                    let mut f = fetched.lock().expect("lock");
                    if b.fetched > f.1 {
                        shared.metrics.fetched(&f.0, b.fetched - f.1);
                        f.1 = b.fetched;
                    }
                }
                _ => {}
            }
            shared.publish(
                crate::progress::Line {
                    version: crate::progress::EVENTS_VERSION,
                    time,
                    event: e,
                }
                .to_json(),
            );
        })
    };
    {
        let shared = shared.clone();
        let cfg2 = cfg.clone();
        let mut last_phase = rec.state.phase;
        rec.on_change = Box::new(move |st: &AgentState| {
            if st.phase != last_phase {
                last_phase = st.phase;
                let t = st.history.last();
                shared.publish(
                    serde_json::json!({
                        "version": crate::progress::EVENTS_VERSION,
                        "time": st.since,
                        "event": "agent-phase",
                        "phase": st.phase,
                        "reason": t.map(|t| t.reason.clone()).unwrap_or_default(),
                    })
                    .to_string(),
                );
            }
            let snap = snapshot(&cfg2, st);
            if let Some(r) = &reporter {
                r.publish(crate::kubernetes::status::Report {
                    origin: st.desired.as_ref().map(|d| d.origin.clone()),
                    phase: st.phase.as_str().to_string(),
                    running_version: snap.running.as_ref().and_then(|r| r.version.clone()),
                    staged_version: snap.staged_version.clone(),
                    last_error: st.last_error.clone(),
                    rollbacks: snap.rollbacks_total,
                    at: st.since,
                });
            }
            shared.set_snapshot(snap);
        });
    }
    {
        let shared = shared.clone();
        rec.on_notice = Box::new(move |m: &str| {
            eprintln!("edge-ota agent: {m}");
            shared.publish(
                serde_json::json!({
                    "version": crate::progress::EVENTS_VERSION,
                    "time": crate::verify::unix_now().unwrap_or(0),
                    "event": "note",
                    "message": m,
                })
                .to_string(),
            );
        });
    }
    eprintln!(
        "edge-ota agent: started in phase {} (API {})",
        rec.state.phase.as_str(),
        agent.socket.display()
    );
    let mut host = host::RealHost { cfg, agent, sink };
    shared.set_snapshot(snapshot(cfg, &rec.state));
    loop {
        // Everything that arrived, before the next step.
        while let Ok(i) = rx.try_recv() {
            handle(&mut rec, agent, i);
        }
        let next = match rec.step(&mut host) {
            Ok(n) => n,
            Err(e) => {
                // The step could not even fail properly (state unreadable, disk full):
                // say so and try again later, without spinning.
                let _ = rec.notice(format!(
                    "step in phase {} failed: {e}",
                    rec.state.phase.as_str()
                ));
                Next::WaitUntil(Some(clock.now() + 30))
            }
        };
        if let Next::WaitUntil(until) = next {
            // Wake for the next input, or at the time asked (at least every minute, so a
            // stepped clock or a window edge is never missed for long).
            let now = clock.now();
            let wait = until.map_or(60, |t| t.saturating_sub(now).clamp(1, 60));
            if let Ok(i) = rx.recv_timeout(Duration::from_secs(wait)) {
                handle(&mut rec, agent, i);
            }
        }
    }
}

/// Apply one input to the machine.
fn handle(rec: &mut Reconciler, agent: &AgentConfig, input: Input) {
    let r = match input {
        Input::Offer(_, Ok(d)) => rec.offer(*d),
        Input::Offer(origin, Err(e)) => rec.notice(format!("{e} (from {origin}; ignored)")),
        Input::ProviderError(origin, e) => rec.notice(format!("{origin}: {e}")),
        Input::Notice(m) => rec.notice(m),
        Input::Api((cmd, reply)) => {
            let answer = match cmd {
                api::Command::Pause => rec.set_paused(true).map(|_| "paused".to_string()),
                api::Command::Resume => rec.set_paused(false).map(|_| "resumed".to_string()),
                api::Command::Stage => rec.request(false).map(|_| "staging".to_string()),
                api::Command::Apply => rec
                    .request(true)
                    .map(|_| "applying when staged".to_string()),
                api::Command::SetDesired(bytes) => match desired::parse(&bytes, "api", agent) {
                    Ok(d) => {
                        let t = d.target();
                        rec.offer(d).map(|_| format!("desired state {t} accepted"))
                    }
                    Err(e) => Err(Error::Usage(e)),
                },
            };
            let _ = reply.send(answer.map_err(|e| e.to_string()));
            Ok(())
        }
    };
    if let Err(e) = r {
        eprintln!("edge-ota agent: {e}");
    }
}

/// Whether an input must stop a stage that is running: a pause, or a desired state that is
/// not the one being staged.
fn interrupts(i: &Input, shared: &api::Shared) -> bool {
    let snap = shared.snapshot.lock().expect("snapshot lock");
    if snap.agent.phase != Phase::Staging {
        return false;
    }
    match i {
        Input::Offer(_, Ok(d)) => snap
            .agent
            .desired
            .as_ref()
            .is_none_or(|c| c.generation != d.generation),
        Input::Api((api::Command::Pause | api::Command::SetDesired(_), _)) => true,
        _ => false,
    }
}
