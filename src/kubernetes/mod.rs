//! Kubernetes coordination: an `OSUpdate` custom resource ([`crd`]) tells the agents of the
//! selected nodes what to run ([`provider`]); the agents decide together, without a
//! controller, which nodes may reboot: a `maxUnavailable` Lease semaphore ([`lease`]), then
//! cordon and evictions ([`drain`]); after the boot the node must be `Ready` ([`probe`])
//! before it is uncordoned and its Lease released ([`coordinator`]). Each agent reports its
//! node in the OSUpdate's status ([`status`]).
//!
//! The host agent keeps owning download, staging, apply, boot counting and commit, and works
//! with the API server down (staging goes on; the reboot waits): this module only gates the
//! reboot. Its calls run on a small tokio runtime of its own; the agent's reconcile thread
//! blocks on them, never the other way round.

pub mod coordinator;
pub mod crd;
pub mod drain;
pub mod lease;
pub mod probe;
pub mod provider;
pub mod status;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::KubernetesConfig;
use crd::OSUpdate;

/// Origin of desired states from OSUpdates: `kubernetes:<name>`.
pub const ORIGIN_PREFIX: &str = "kubernetes:";

/// What can go wrong talking to the cluster. Callers branch on the HTTP code inside
/// [`kube::Error::Api`] (409 lost race, 429 PDB); everything else is "try again later".
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("{what} {name}: {source}")]
    Api {
        what: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl KubeError {
    fn api(what: &'static str, name: &str) -> impl FnOnce(kube::Error) -> KubeError {
        let name = name.to_string();
        move |source| KubeError::Api { what, name, source }
    }
}

/// The OSUpdates seen by the watch, by name: the coordinator reads their `maxUnavailable`,
/// drain policy and status from here instead of asking the API again.
pub type Registry = Arc<Mutex<BTreeMap<String, OSUpdate>>>;

/// A connection to the cluster: clients, the runtime they run on, the node's settings.
pub struct Kube {
    pub rt: Arc<tokio::runtime::Runtime>,
    /// Requests (idle timeout: a half-dead link fails instead of hanging).
    pub client: kube::Client,
    /// The watch (no read timeout: the watcher has its own idle timeout and bookmarks).
    pub watch_client: kube::Client,
    pub cfg: KubernetesConfig,
    pub registry: Registry,
}

/// Idle limits, not total-request limits: a slow but moving answer is fine.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_IDLE: Duration = Duration::from_secs(30);

impl Kube {
    /// Read the kubeconfig and build the clients. Does not contact the API server: the agent
    /// starts with the link down.
    pub fn connect(cfg: &KubernetesConfig) -> Result<Kube, KubeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kubernetes")
            .enable_all()
            .build()
            .map_err(|e| KubeError::Config {
                path: cfg.kubeconfig.display().to_string(),
                reason: format!("starting the runtime: {e}"),
            })?;
        let (client, watch_client) = rt.block_on(clients(&cfg.kubeconfig))?;
        Ok(Kube {
            rt: Arc::new(rt),
            client,
            watch_client,
            cfg: cfg.clone(),
            registry: Default::default(),
        })
    }
}

async fn clients(path: &Path) -> Result<(kube::Client, kube::Client), KubeError> {
    let bad = |reason: String| KubeError::Config {
        path: path.display().to_string(),
        reason,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let mut conf =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| bad(e.to_string()))?;
    conf.connect_timeout = Some(CONNECT_TIMEOUT);
    // kube's built-in retry of 429/503 would hide a PodDisruptionBudget's refusal and hold
    // the reconcile thread for minutes: every caller here asks again on its own schedule
    // (the next drain pass, the watcher's backoff).
    conf.default_retry = false;
    let watch_conf = conf.clone();
    conf.read_timeout = Some(READ_IDLE);
    conf.reset_reader_on_write = true;
    let c = kube::Client::try_from(conf).map_err(|e| bad(e.to_string()))?;
    let w = kube::Client::try_from(watch_conf).map_err(|e| bad(e.to_string()))?;
    Ok((c, w))
}

/// Unix seconds as RFC 3339, for status times.
pub fn rfc3339(unix: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
