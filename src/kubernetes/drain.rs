//! Cordon, evict, uncordon. Evictions go through the Eviction API, so PodDisruptionBudgets
//! are honoured (429: not now, asked again next pass); DaemonSet pods and static (mirror)
//! pods are left alone (they would come straight back, or cannot be evicted). Each call is
//! one pass, never a long block: the agent's `Draining` step asks again, and the timeout
//! and its outcome are decided by the caller with the time the drain started.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use serde_json::json;

use super::KubeError;

/// Set on a node this agent cordoned, so it never uncordons one a person cordoned.
pub const CORDONED_BY: &str = "edge-ota.io/cordoned";

/// What a drain does with a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodAction {
    Evict,
    /// Left on the node, with why.
    Skip(&'static str),
}

/// Pure: which pods a drain evicts.
pub fn classify(pod: &Pod) -> PodAction {
    let meta = &pod.metadata;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    {
        return PodAction::Skip("static pod");
    }
    if meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet" && o.controller == Some(true))
    {
        return PodAction::Skip("DaemonSet pod");
    }
    if meta.deletion_timestamp.is_some() {
        return PodAction::Skip("already terminating");
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return PodAction::Skip("finished");
    }
    PodAction::Evict
}

/// The node, and whether it carries this agent's cordon mark.
async fn get_marked(nodes: &Api<Node>, node: &str) -> Result<(Node, bool), KubeError> {
    let n = nodes
        .get(node)
        .await
        .map_err(KubeError::api("getting node", node))?;
    let ours = n
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CORDONED_BY));
    Ok((n, ours))
}

/// Cordon `node` (idempotent). Returns whether this agent cordoned it (now or before).
pub async fn cordon(nodes: &Api<Node>, node: &str) -> Result<bool, KubeError> {
    let (n, ours) = get_marked(nodes, node).await?;
    let unschedulable = n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    if unschedulable {
        // Cordoned by a person (or by us before a restart): never uncordoned by us unless
        // our mark is on it.
        return Ok(ours);
    }
    let patch = json!({
        "metadata": {"annotations": {CORDONED_BY: "true"}},
        "spec": {"unschedulable": true}
    });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(KubeError::api("cordoning node", node))?;
    Ok(true)
}

/// Uncordon `node` if this agent cordoned it (idempotent).
pub async fn uncordon(nodes: &Api<Node>, node: &str) -> Result<(), KubeError> {
    let (_, ours) = get_marked(nodes, node).await?;
    if !ours {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"annotations": {CORDONED_BY: null}},
        "spec": {"unschedulable": null}
    });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(KubeError::api("uncordoning node", node))?;
    Ok(())
}

/// One eviction pass over the pods on `node`: the pods still to go (namespace/name), with
/// the last answer for each (a PDB refusal, ...). Empty: drained.
pub async fn evict_pass(
    client: &kube::Client,
    node: &str,
) -> Result<Vec<(String, String)>, KubeError> {
    let all: Api<Pod> = Api::all(client.clone());
    let pods = all
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(KubeError::api("listing pods on node", node))?;
    let mut left = Vec::new();
    for pod in pods.items {
        if classify(&pod) != PodAction::Evict {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let who = format!("{ns}/{name}");
        match api.evict(&name, &EvictParams::default()).await {
            // Accepted: it terminates; listed until it is gone.
            Ok(_) => left.push((who, "evicted, terminating".into())),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s)) if s.code == 429 => left.push((
                who,
                format!("eviction refused (PodDisruptionBudget): {}", s.message),
            )),
            Err(e) => return Err(KubeError::api("evicting pod", &who)(e)),
        }
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod(f: impl FnOnce(&mut Pod)) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("p".into());
        f(&mut p);
        p
    }

    #[test]
    fn drain_skips_daemonset_and_mirror_pods_and_evicts_the_rest() {
        assert_eq!(classify(&pod(|_| {})), PodAction::Evict);
        let ds = pod(|p| {
            p.metadata.owner_references = Some(vec![OwnerReference {
                kind: "DaemonSet".into(),
                controller: Some(true),
                ..Default::default()
            }])
        });
        assert_eq!(classify(&ds), PodAction::Skip("DaemonSet pod"));
        let rs = pod(|p| {
            p.metadata.owner_references = Some(vec![OwnerReference {
                kind: "ReplicaSet".into(),
                controller: Some(true),
                ..Default::default()
            }])
        });
        assert_eq!(classify(&rs), PodAction::Evict);
        let mirror = pod(|p| {
            p.metadata.annotations =
                Some([("kubernetes.io/config.mirror".to_string(), "x".to_string())].into())
        });
        assert_eq!(classify(&mirror), PodAction::Skip("static pod"));
        let done = pod(|p| {
            p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some("Succeeded".into()),
                ..Default::default()
            })
        });
        assert_eq!(classify(&done), PodAction::Skip("finished"));
    }
}
