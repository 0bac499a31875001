//! `OSUpdate.status`: each agent writes its own node's entry (a merge patch of
//! `status.nodes.<node>`, so agents never overwrite each other), then recomputes the summary
//! (kstatus conditions `Ready`, `Reconciling`, `Stalled`, `phase`, `readyNodes`) from every
//! entry, with the object's resourceVersion so a concurrent report makes it try again rather
//! than publish a stale summary.

use std::collections::BTreeMap;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::crd::{Condition, NodeStatus, OSUpdate};
use super::KubeError;

/// The summary of all node reports, pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub phase: &'static str,
    pub ready_nodes: String,
    /// (type, status, reason, message)
    pub conditions: Vec<(&'static str, &'static str, String, String)>,
}

/// Summarize `nodes` for `generation`; a node reporting an older generation is still at work.
pub fn summarize(nodes: &BTreeMap<String, NodeStatus>, generation: Option<i64>) -> Summary {
    let current = |n: &NodeStatus| generation.is_none() || n.observed_generation == generation;
    let ready = nodes
        .values()
        .filter(|n| current(n) && matches!(n.phase.as_str(), "succeeded" | "idle"))
        .count();
    let stalled: Vec<String> = nodes
        .iter()
        .filter(|(_, n)| current(n))
        .filter_map(|(name, n)| n.stalled.as_ref().map(|s| format!("{name}: {s}")))
        .collect();
    let total = nodes.len();
    let ready_nodes = format!("{ready}/{total}");
    let msg = format!("{ready} of {total} reporting nodes run the update");
    let (phase, conditions) = if !stalled.is_empty() {
        let m = stalled.join("; ");
        (
            "Stalled",
            vec![
                ("Ready", "False", "Stalled".into(), m.clone()),
                ("Reconciling", "False", "Stalled".into(), m.clone()),
                ("Stalled", "True", "NodeStalled".into(), m),
            ],
        )
    } else if total > 0 && ready == total {
        (
            "Ready",
            vec![
                ("Ready", "True", "Updated".into(), msg),
                ("Reconciling", "False", "Updated".into(), String::new()),
                ("Stalled", "False", "Updated".into(), String::new()),
            ],
        )
    } else {
        (
            if total == 0 { "Pending" } else { "Progressing" },
            vec![
                ("Ready", "False", "Progressing".into(), msg.clone()),
                ("Reconciling", "True", "Progressing".into(), msg),
                ("Stalled", "False", "Progressing".into(), String::new()),
            ],
        )
    };
    Summary {
        phase,
        ready_nodes,
        conditions,
    }
}

/// Conditions with `lastTransitionTime` kept when the status did not change.
pub fn conditions(
    s: &Summary,
    old: &[Condition],
    generation: Option<i64>,
    now_rfc3339: &str,
) -> Vec<Condition> {
    s.conditions
        .iter()
        .map(|(t, st, reason, message)| {
            let prev = old.iter().find(|c| c.type_ == *t);
            Condition {
                type_: t.to_string(),
                status: st.to_string(),
                reason: reason.clone(),
                message: message.clone(),
                last_transition_time: match prev {
                    Some(p) if p.status == *st => p.last_transition_time.clone(),
                    _ => now_rfc3339.to_string(),
                },
                observed_generation: generation,
            }
        })
        .collect()
}

/// Write this node's entry, then the summary.
pub async fn report(
    api: &Api<OSUpdate>,
    name: &str,
    node: &str,
    entry: &NodeStatus,
    now_rfc3339: &str,
) -> Result<(), KubeError> {
    let pp = PatchParams::default();
    // A merge patch keeps what it does not name: a field that became empty (an error gone,
    // a stall resolved) is sent as null to be removed.
    let mut e = serde_json::to_value(entry).expect("status serializes");
    for k in [
        "runningVersion",
        "stagedVersion",
        "lastError",
        "stalled",
        "observedGeneration",
        "updatedAt",
    ] {
        e.as_object_mut()
            .expect("object")
            .entry(k)
            .or_insert(serde_json::Value::Null);
    }
    api.patch_status(
        name,
        &pp,
        &Patch::Merge(json!({"status": {"nodes": {node: e}}})),
    )
    .await
    .map_err(KubeError::api("patching status of", name))?;
    for _ in 0..5 {
        let o = api
            .get_status(name)
            .await
            .map_err(KubeError::api("getting", name))?;
        let st = o.status.clone().unwrap_or_default();
        let g = o.metadata.generation;
        let s = summarize(&st.nodes, g);
        let conds = conditions(&s, &st.conditions, g, now_rfc3339);
        let patch = json!({
            "metadata": {"resourceVersion": o.metadata.resource_version},
            "status": {
                "observedGeneration": g,
                "phase": s.phase,
                "readyNodes": s.ready_nodes,
                "conditions": conds,
            }
        });
        match api.patch_status(name, &pp, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(KubeError::api("patching status of", name)(e)),
        }
    }
    Ok(())
}

/// What the agent tells the reporter after each change of its state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The desired state's origin; only `kubernetes:<name>` is reported (to that OSUpdate).
    pub origin: Option<String>,
    pub phase: String,
    pub running_version: Option<String>,
    pub staged_version: Option<String>,
    pub last_error: Option<String>,
    pub rollbacks: u64,
    pub at: u64,
}

/// Reports in the background, latest state only: a burst of changes is one patch, and a
/// report that fails (API down) is retried until a newer one replaces it.
pub struct Reporter {
    tx: tokio::sync::watch::Sender<Option<Report>>,
}

impl Reporter {
    pub fn spawn(
        k: &super::Kube,
        shared: std::sync::Arc<std::sync::Mutex<super::coordinator::Shared>>,
    ) -> Reporter {
        let (tx, mut rx) = tokio::sync::watch::channel::<Option<Report>>(None);
        let api: Api<OSUpdate> = Api::all(k.client.clone());
        let node = k.cfg.node_name.clone();
        let registry = k.registry.clone();
        let poll = std::time::Duration::from_secs(k.cfg.poll_secs);
        k.rt.spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(r) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let Some(name) = r
                    .origin
                    .as_deref()
                    .and_then(|o| o.strip_prefix(super::ORIGIN_PREFIX))
                else {
                    continue;
                };
                let generation = registry
                    .lock()
                    .expect("registry")
                    .get(name)
                    .and_then(|o| o.metadata.generation);
                let entry = NodeStatus {
                    phase: r.phase.clone(),
                    running_version: r.running_version.clone(),
                    staged_version: r.staged_version.clone(),
                    last_error: r.last_error.clone(),
                    stalled: shared.lock().expect("shared").stalled.clone(),
                    rollbacks: r.rollbacks,
                    observed_generation: generation,
                    updated_at: Some(super::rfc3339(r.at)),
                };
                if let Err(e) = report(&api, name, &node, &entry, &super::rfc3339(r.at)).await {
                    eprintln!("edge-ota agent: kubernetes status: {e}");
                    tokio::time::sleep(poll).await;
                    // Try again unless something newer came meanwhile.
                    rx.mark_changed();
                }
            }
        });
        Reporter { tx }
    }

    pub fn publish(&self, r: Report) {
        let _ = self.tx.send(Some(r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(phase: &str, stalled: Option<&str>, g: i64) -> NodeStatus {
        NodeStatus {
            phase: phase.into(),
            stalled: stalled.map(String::from),
            observed_generation: Some(g),
            ..Default::default()
        }
    }

    fn status_of(s: &Summary, t: &str) -> &'static str {
        s.conditions.iter().find(|c| c.0 == t).unwrap().1
    }

    #[test]
    fn all_nodes_succeeded_is_ready_for_kstatus() {
        let nodes = [
            ("a".into(), n("succeeded", None, 2)),
            ("b".into(), n("succeeded", None, 2)),
        ]
        .into();
        let s = summarize(&nodes, Some(2));
        assert_eq!(s.phase, "Ready");
        assert_eq!(s.ready_nodes, "2/2");
        assert_eq!(status_of(&s, "Ready"), "True");
        assert_eq!(status_of(&s, "Reconciling"), "False");
    }

    #[test]
    fn node_of_an_older_generation_keeps_the_update_reconciling() {
        let nodes = [
            ("a".into(), n("succeeded", None, 2)),
            ("b".into(), n("succeeded", None, 1)),
        ]
        .into();
        let s = summarize(&nodes, Some(2));
        assert_eq!(s.phase, "Progressing");
        assert_eq!(s.ready_nodes, "1/2");
        assert_eq!(status_of(&s, "Reconciling"), "True");
    }

    #[test]
    fn stalled_node_makes_the_update_stalled_with_its_reason() {
        let nodes = [
            ("a".into(), n("succeeded", None, 1)),
            (
                "b".into(),
                n(
                    "failed",
                    Some("drain timed out after 60s: default/web-0"),
                    1,
                ),
            ),
        ]
        .into();
        let s = summarize(&nodes, Some(1));
        assert_eq!(s.phase, "Stalled");
        assert_eq!(status_of(&s, "Stalled"), "True");
        assert!(s.conditions[2].3.contains("b: drain timed out"));
    }

    #[test]
    fn transition_time_is_kept_while_the_status_is_unchanged() {
        let nodes = [("a".into(), n("staging", None, 1))].into();
        let s = summarize(&nodes, Some(1));
        let first = conditions(&s, &[], Some(1), "T1");
        let again = conditions(&s, &first, Some(1), "T2");
        assert!(again.iter().all(|c| c.last_transition_time == "T1"));
        let done = summarize(&[("a".into(), n("succeeded", None, 1))].into(), Some(1));
        let later = conditions(&done, &again, Some(1), "T3");
        let ready = later.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.last_transition_time, "T3");
        let stalled = later.iter().find(|c| c.type_ == "Stalled").unwrap();
        assert_eq!(stalled.last_transition_time, "T1");
    }
}
