//! The Kubernetes part of the health gate after the reboot: the node is `Ready` in the API
//! (kubelet registered and posting status) before it is uncordoned and its slot released.
//! kubelet's own healthz (`http://127.0.0.1:10248/healthz`) is an ordinary `http` probe in
//! `[[health.probe]]` or the OSUpdate's `health.probes`, so it can roll the slot back.

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use super::KubeError;

/// Pure: the node's `Ready` condition is `True`.
pub fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Ask the API whether `node` is Ready.
pub async fn node_ready(nodes: &Api<Node>, node: &str) -> Result<bool, KubeError> {
    let n = nodes
        .get(node)
        .await
        .map_err(KubeError::api("getting node", node))?;
    Ok(is_ready(&n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};

    fn node(ready: &str) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn node_is_ready_only_with_ready_true() {
        assert!(is_ready(&node("True")));
        assert!(!is_ready(&node("False")));
        assert!(!is_ready(&node("Unknown")));
        assert!(!is_ready(&Node::default()));
    }
}
