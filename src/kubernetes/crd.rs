//! The `OSUpdate` custom resource (`edge-ota.io/v1alpha1`, cluster-scoped): the agent's
//! desired state ([`crate::agent::desired::Spec`], flattened, so `spec.version` means the same
//! in a file and in the cluster) plus what only a cluster needs: which nodes, how many at
//! once, how to drain. The CRD in `deploy/kubernetes/crd.yaml` is generated from these types.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::desired::Spec;

/// An OS release for the nodes it selects.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "edge-ota.io",
    version = "v1alpha1",
    kind = "OSUpdate",
    plural = "osupdates",
    singular = "osupdate",
    shortname = "osu",
    status = "OSUpdateStatus",
    // The JSON form: the structured one trips clippy's duplicated_attributes in the expansion.
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.readyNodes"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct OSUpdateSpec {
    /// What to run, from where, when: the agent's desired-state document.
    #[serde(flatten)]
    pub update: Spec,
    /// The nodes this update is for (by their labels); absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Most selected nodes draining or rebooting at the same time (1..=100).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub max_unavailable: u32,
    #[serde(default)]
    pub drain: DrainPolicy,
    /// A node that rolls back stops the rollout: no other node takes a slot until the
    /// OSUpdate changes.
    #[serde(default)]
    pub stop_on_failure: bool,
}

fn one() -> u32 {
    1
}

/// How a node is drained before its reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DrainPolicy {
    /// Most seconds to wait for evictions (PodDisruptionBudgets answer 429 meanwhile).
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 10, max = 86400))]
    pub timeout_secs: u64,
    /// What a drain that timed out does.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

fn default_drain_timeout() -> u64 {
    600
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy {
            timeout_secs: default_drain_timeout(),
            on_timeout: OnTimeout::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnTimeout {
    /// Uncordon, give the slot back, report `Stalled`; the update is not booted.
    #[default]
    Abort,
    /// Reboot anyway (the pods still there are stopped with the node).
    Proceed,
}

/// What the agents report. Each agent writes only its own entry of `nodes` and recomputes
/// the summary from all entries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OSUpdateStatus {
    /// The `metadata.generation` the summary is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `Ready`, `Progressing`, `Stalled` or `Pending` (no node reported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `ready/reporting`, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<String>,
    /// Per node, by node name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, NodeStatus>,
}

/// One node's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The agent's phase (`staging`, `draining`, `verifying`, `succeeded`, ...).
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why this node stopped (drain timed out, rolled back, gave up); the rollout is stalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
    /// Rollbacks of this node, all updates.
    #[serde(default)]
    pub rollbacks: u64,
    /// The `metadata.generation` this node works on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// A condition as kstatus (Flux) and Argo CD read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD as YAML, as committed in `deploy/kubernetes/crd.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = OSUpdate::crd();
    format!(
        "# Generated from src/kubernetes/crd.rs (UPDATE_CRD=1 cargo test --lib kubernetes::crd \
         rewrites it); do not edit.\n{}",
        serde_yaml_ng::to_string(&crd).expect("CRD serializes")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    const CRD_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/crd.yaml");

    /// The committed CRD is what the types generate; `UPDATE_CRD=1` rewrites it.
    #[test]
    fn committed_crd_matches_the_rust_types() {
        let fresh = crd_yaml();
        if std::env::var_os("UPDATE_CRD").is_some() {
            std::fs::write(CRD_PATH, &fresh).unwrap();
        }
        let committed = std::fs::read_to_string(CRD_PATH).unwrap_or_default();
        assert!(
            committed == fresh,
            "deploy/kubernetes/crd.yaml differs from OSUpdate::crd(); run \
             UPDATE_CRD=1 cargo test --lib kubernetes::crd and commit it"
        );
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_printer_columns() {
        let crd = OSUpdate::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Version", "Ready", "Phase", "Age"]);
    }

    /// The spec's flattened fields are in the schema (an API server prunes what is not).
    #[test]
    fn schema_keeps_the_desired_state_fields_and_window_time_zone() {
        let s = serde_json::to_value(OSUpdate::crd()).unwrap();
        let spec = &s["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        for f in [
            "version",
            "bundleId",
            "sources",
            "stage",
            "activation",
            "dataBudget",
            "health",
            "nodeSelector",
            "maxUnavailable",
            "drain",
            "stopOnFailure",
        ] {
            assert!(spec["properties"].get(f).is_some(), "spec.{f} missing");
        }
        let window = &spec["properties"]["activation"]["properties"]["windows"]["items"];
        assert!(window["properties"].get("timeZone").is_some(), "{window}");
    }

    const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

    fn docs(rel: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(format!("{DEPLOY}/{rel}")).unwrap();
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde_json::Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect()
    }

    /// Parsed into its k8s-openapi type and written back: a field the type does not know (a
    /// typo, a field of another API version) is dropped, and the comparison fails on it.
    fn round_trips<T: serde::de::DeserializeOwned + Serialize>(v: &serde_json::Value) {
        let typed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
        let back = serde_json::to_value(&typed).unwrap();
        assert_eq!(&back, v, "fields were dropped or changed");
    }

    fn check_typed(v: &serde_json::Value) {
        use k8s_openapi::api::{core::v1 as core, rbac::v1 as rbac};
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
        match v["kind"].as_str().unwrap() {
            "Namespace" => round_trips::<core::Namespace>(v),
            "ServiceAccount" => round_trips::<core::ServiceAccount>(v),
            "Secret" => round_trips::<core::Secret>(v),
            "ConfigMap" => round_trips::<core::ConfigMap>(v),
            "ClusterRole" => round_trips::<rbac::ClusterRole>(v),
            "ClusterRoleBinding" => round_trips::<rbac::ClusterRoleBinding>(v),
            "Role" => round_trips::<rbac::Role>(v),
            "RoleBinding" => round_trips::<rbac::RoleBinding>(v),
            "CustomResourceDefinition" => round_trips::<ext::CustomResourceDefinition>(v),
            // Serde normalizes it (`800MiB` becomes bytes), so no byte-for-byte round trip:
            // it must parse, and every field must be in the CRD's schema (else pruned).
            "OSUpdate" => {
                let _: OSUpdate = serde_json::from_value(v.clone()).unwrap();
                let crd = serde_json::to_value(OSUpdate::crd()).unwrap();
                let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
                conforms(&v["spec"], &schema["properties"]["spec"], "spec");
            }
            other => panic!("no check for kind {other}"),
        }
    }

    /// Every key of `v` is declared by `schema` (or under preserve-unknown-fields): what the
    /// API server would prune is an error here.
    fn conforms(v: &serde_json::Value, schema: &serde_json::Value, at: &str) {
        use serde_json::Value;
        if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
            || schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        {
            return;
        }
        match v {
            Value::Object(m) => {
                assert_eq!(
                    schema["type"], "object",
                    "{at}: not an object in the schema"
                );
                for (k, x) in m {
                    let sub = schema["properties"]
                        .get(k)
                        .or_else(|| schema.get("additionalProperties"))
                        .unwrap_or_else(|| panic!("{at}.{k}: not in the schema (pruned)"));
                    conforms(x, sub, &format!("{at}.{k}"));
                }
                for r in schema["required"].as_array().into_iter().flatten() {
                    assert!(m.contains_key(r.as_str().unwrap()), "{at}: {r} missing");
                }
            }
            Value::Array(a) => {
                assert_eq!(schema["type"], "array", "{at}");
                for (i, x) in a.iter().enumerate() {
                    conforms(x, &schema["items"], &format!("{at}[{i}]"));
                }
            }
            Value::String(_) => assert_eq!(schema["type"], "string", "{at}"),
            Value::Bool(_) => assert_eq!(schema["type"], "boolean", "{at}"),
            Value::Number(_) => assert!(
                schema["type"] == "integer" || schema["type"] == "number",
                "{at}"
            ),
            Value::Null => {}
        }
    }

    #[test]
    fn every_manifest_parses_into_its_type_without_dropping_fields() {
        for rel in [
            "crd.yaml",
            "rbac.yaml",
            "examples/osupdate.yaml",
            "gitops/argocd-cm.yaml",
        ] {
            for v in docs(rel) {
                check_typed(&v);
            }
        }
    }

    #[test]
    fn example_osupdate_validates_against_the_crd_schema_and_the_agent() {
        let crd = serde_json::to_value(OSUpdate::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let example = docs("examples/osupdate.yaml").remove(0);
        conforms(&example["spec"], &schema["properties"]["spec"], "spec");
        let o: OSUpdate = serde_json::from_value(example).unwrap();
        let doc = crate::agent::desired::Document {
            api_version: crate::agent::desired::API_VERSION.into(),
            kind: crate::agent::desired::KIND.into(),
            metadata: Default::default(),
            spec: o.spec.update.clone(),
        };
        let d = crate::agent::desired::from_document(
            doc,
            "test",
            &crate::agent::desired::tests::agent(),
        )
        .unwrap();
        assert_eq!(d.target(), "2.0.0");
        assert_eq!(d.extra_probes().len(), 1);
    }

    #[test]
    fn kustomization_lists_existing_files_and_gitops_objects_name_the_example() {
        let k = docs("kustomization.yaml").remove(0);
        for r in k["resources"].as_array().unwrap() {
            let p = format!("{DEPLOY}/{}", r.as_str().unwrap());
            assert!(std::path::Path::new(&p).exists(), "{p}");
        }
        let flux = docs("gitops/flux-kustomization.yaml").remove(0);
        assert_eq!(flux["kind"], "Kustomization");
        assert_eq!(flux["spec"]["healthChecks"][0]["kind"], "OSUpdate");
        assert_eq!(flux["spec"]["healthChecks"][0]["name"], "edge-2-0-0");
        let argo = docs("gitops/argocd-application.yaml").remove(0);
        assert_eq!(argo["kind"], "Application");
        assert!(argo["spec"]["source"]["path"].is_string());
        let cm = docs("gitops/argocd-cm.yaml").remove(0);
        let lua = cm["data"]["resource.customizations.health.edge-ota.io_OSUpdate"]
            .as_str()
            .unwrap();
        for s in ["Stalled", "Ready", "Degraded", "Healthy", "Progressing"] {
            assert!(lua.contains(s), "{s}");
        }
    }
}
