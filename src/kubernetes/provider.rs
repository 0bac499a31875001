//! The OSUpdate provider: kube-rs's `watcher` (list, watch, bookmarks, a re-list after
//! `410 Gone`, backoff while the API server is away) on the OSUpdates; each one selecting this
//! node becomes a desired state for the agent ([`crate::agent::Input::Offer`]), checked like
//! any other document.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;

use super::crd::OSUpdate;
use super::{Kube, ORIGIN_PREFIX};
use crate::agent::desired::{self, Document, Metadata};
use crate::agent::Input;
use crate::config::AgentConfig;

/// Pure: whether `selector` selects a node with `labels` (absent selector: every node).
pub fn selects(
    selector: Option<&LabelSelector>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let Some(s) = selector else { return true };
    let ml = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let me = s.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.clone().unwrap_or_default();
        let has = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => has.is_some_and(|v| vals.contains(v)),
            "NotIn" => has.is_none_or(|v| !vals.contains(v)),
            "Exists" => has.is_some(),
            "DoesNotExist" => has.is_none(),
            _ => false,
        }
    });
    ml && me
}

/// Name of the probe [`desired_of`] adds for the kubelet.
pub const KUBELET_PROBE: &str = "kubelet";

/// The agent's desired state from an OSUpdate (checked as any document is). The first boot
/// of the update must also pass the kubelet's health endpoint (`kubelet_healthz`), unless
/// the OSUpdate already has a probe of that name.
pub fn desired_of(o: &OSUpdate, agent: &AgentConfig) -> Result<desired::Desired, String> {
    let name = o.metadata.name.clone().unwrap_or_default();
    let mut spec = o.spec.update.clone();
    let healthz = agent
        .kubernetes
        .as_ref()
        .map(|k| k.kubelet_healthz.clone())
        .unwrap_or_default();
    if !healthz.is_empty() {
        let h = spec.health.get_or_insert_with(Default::default);
        if !h.probes.iter().any(|p| p["name"] == KUBELET_PROBE) {
            h.probes.push(serde_json::json!({
                "name": KUBELET_PROBE,
                "kind": "http",
                "url": healthz,
                "required": true,
            }));
        }
    }
    let doc = Document {
        api_version: desired::API_VERSION.into(),
        kind: desired::KIND.into(),
        metadata: Metadata {
            name: Some(name.clone()),
            other: Default::default(),
        },
        spec,
    };
    desired::from_document(doc, &format!("{ORIGIN_PREFIX}{name}"), agent)
}

/// Watch the OSUpdates on the module's runtime; hand the agent those selecting this node.
pub fn spawn(kube: &Kube, agent: AgentConfig, tx: crossbeam_channel::Sender<Input>) {
    let api: Api<OSUpdate> = Api::all(kube.watch_client.clone());
    let nodes: Api<Node> = Api::all(kube.client.clone());
    let node = kube.cfg.node_name.clone();
    let registry = kube.registry.clone();
    kube.rt.spawn(async move {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures_util::pin_mut!(stream);
        let mut last_error: Option<String> = None;
        while let Some(ev) = stream.next().await {
            let o = match ev {
                Ok(Event::Apply(o)) | Ok(Event::InitApply(o)) => o,
                Ok(Event::Delete(o)) => {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    registry.lock().expect("registry").remove(&name);
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    let msg = format!("watching OSUpdates: {e}");
                    if last_error.as_ref() != Some(&msg) {
                        let _ = tx.send(Input::ProviderError("kubernetes".into(), msg.clone()));
                        last_error = Some(msg);
                    }
                    continue;
                }
            };
            last_error = None;
            let name = o.metadata.name.clone().unwrap_or_default();
            registry
                .lock()
                .expect("registry")
                .insert(name.clone(), o.clone());
            let labels = match nodes.get(&node).await {
                Ok(n) => n.metadata.labels.unwrap_or_default(),
                Err(e) => {
                    let _ = tx.send(Input::ProviderError(
                        "kubernetes".into(),
                        format!("getting node {node}: {e}"),
                    ));
                    continue;
                }
            };
            if !selects(o.spec.node_selector.as_ref(), &labels) {
                continue;
            }
            let d = desired_of(&o, &agent).map(Box::new);
            if tx
                .send(Input::Offer(format!("{ORIGIN_PREFIX}{name}"), d))
                .is_err()
            {
                return;
            }
        }
    });
}

use kube::runtime::watcher::watcher;

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_matches_labels_and_expressions() {
        let l = labels(&[("pool", "stores"), ("zone", "north")]);
        assert!(selects(None, &l));
        let s = LabelSelector {
            match_labels: Some([("pool".to_string(), "stores".to_string())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "zone".into(),
                    operator: "In".into(),
                    values: Some(vec!["north".into(), "south".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert!(selects(Some(&s), &l));
        assert!(!selects(
            Some(&s),
            &labels(&[("pool", "stores"), ("zone", "west")])
        ));
        assert!(!selects(
            Some(&s),
            &labels(&[("pool", "depots"), ("zone", "north")])
        ));
        let mut canary = l.clone();
        canary.insert("canary".into(), "1".into());
        assert!(!selects(Some(&s), &canary));
    }

    #[test]
    fn osupdate_becomes_a_checked_desired_state_named_after_it() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/kubernetes/examples/osupdate.yaml"
        ))
        .unwrap();
        let o: OSUpdate = serde_yaml_ng::from_str(&text).unwrap();
        let d = desired_of(&o, &crate::agent::desired::tests::agent()).unwrap();
        assert_eq!(d.origin, "kubernetes:edge-2-0-0");
        assert_eq!(d.target(), "2.0.0");
        // Without [agent.kubernetes], nothing is added; with it, the kubelet's healthz is a
        // required probe of the first boot, once.
        let probes = |d: &desired::Desired| {
            d.spec()
                .health
                .as_ref()
                .map(|h| h.probes.clone())
                .unwrap_or_default()
        };
        assert!(!probes(&d).iter().any(|p| p["name"] == KUBELET_PROBE));
        let mut agent = crate::agent::desired::tests::agent();
        agent.kubernetes =
            Some(toml::from_str("kubeconfig = \"/k\"\nnode_name = \"n1\"\n").unwrap());
        let d = desired_of(&o, &agent).unwrap();
        let kubelet: Vec<_> = probes(&d)
            .into_iter()
            .filter(|p| p["name"] == KUBELET_PROBE)
            .collect();
        assert_eq!(kubelet.len(), 1, "{kubelet:?}");
        assert_eq!(kubelet[0]["url"], "http://127.0.0.1:10248/healthz");
        assert_eq!(kubelet[0]["required"], true);
        let mut twice = o.clone();
        twice.spec.update.health = d.spec().health.clone();
        let d = desired_of(&twice, &agent).unwrap();
        assert_eq!(
            probes(&d)
                .iter()
                .filter(|p| p["name"] == KUBELET_PROBE)
                .count(),
            1
        );
        let mut bad = o.clone();
        bad.spec.update.sources.clear();
        assert!(desired_of(&bad, &crate::agent::desired::tests::agent())
            .unwrap_err()
            .contains("sources"));
    }
}
