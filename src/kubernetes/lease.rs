//! The `maxUnavailable` semaphore, FleetLock-style without a server: Leases
//! `<osupdate>-<i>` (i in 0..maxUnavailable) in one namespace; a node holds at most one.
//! Taken with a create (absent) or a resourceVersion-checked replace (free or expired), so
//! two agents racing for the same Lease cannot both win; renewed while the node is away;
//! released once it is back and healthy. A dead holder's Lease expires after its
//! `leaseDurationSeconds` and is taken over.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use super::KubeError;

/// One Lease as the decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub holder: Option<String>,
    /// Unix seconds of the last renewal (or acquisition).
    pub renewed: Option<i64>,
    pub duration: Option<i64>,
}

impl Slot {
    /// When the holder's claim runs out; `None`: free (no holder).
    pub fn expires(&self) -> Option<i64> {
        self.holder.as_ref()?;
        Some(self.renewed.unwrap_or(0) + self.duration.unwrap_or(0))
    }
}

/// What to do about the semaphore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This node already holds this Lease (a restart, a renewal).
    Held(String),
    /// Create this Lease (it does not exist).
    Create(String),
    /// Replace this Lease, free or expired (resourceVersion-checked).
    Take(String),
    /// Every Lease is held; the first frees (expires) at this time, held by these nodes.
    Full { until: i64, holders: Vec<String> },
}

/// Decide from the Leases `<group>-0..max` (`None`: absent). Pure, with the time given.
pub fn decide(slots: &[(String, Option<Slot>)], me: &str, now: i64) -> Decision {
    for (name, s) in slots {
        if s.as_ref().and_then(|s| s.holder.as_deref()) == Some(me) {
            return Decision::Held(name.clone());
        }
    }
    for (name, s) in slots {
        match s {
            None => return Decision::Create(name.clone()),
            Some(s) if s.expires().is_none_or(|t| t <= now) => return Decision::Take(name.clone()),
            _ => {}
        }
    }
    let held = slots.iter().filter_map(|(_, s)| s.as_ref());
    Decision::Full {
        until: held.clone().filter_map(Slot::expires).min().unwrap_or(now),
        holders: held.filter_map(|s| s.holder.clone()).collect(),
    }
}

/// Lease names of an OSUpdate's semaphore.
pub fn names(group: &str, max: u32) -> Vec<String> {
    (0..max.max(1)).map(|i| format!("{group}-{i}")).collect()
}

fn view(l: &Lease) -> Slot {
    let spec = l.spec.clone().unwrap_or_default();
    let t = |m: &Option<MicroTime>| m.as_ref().map(|m| m.0.as_second());
    Slot {
        name: l.metadata.name.clone().unwrap_or_default(),
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        renewed: t(&spec.renew_time).or(t(&spec.acquire_time)),
        duration: spec.lease_duration_seconds.map(i64::from),
    }
}

fn micro(t: i64) -> MicroTime {
    MicroTime(Timestamp::from_second(t).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The semaphore of one OSUpdate, for one node.
pub struct Semaphore {
    pub api: Api<Lease>,
    pub group: String,
    pub max: u32,
    pub me: String,
    pub duration_secs: i64,
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    Yes(String),
    /// Not now: retry at `until` (unix seconds); `why` names the holders.
    No {
        until: i64,
        why: String,
    },
}

impl Semaphore {
    async fn slots(&self) -> Result<Vec<(String, Option<Lease>)>, KubeError> {
        let mut out = Vec::new();
        for n in names(&self.group, self.max) {
            let l = self
                .api
                .get_opt(&n)
                .await
                .map_err(KubeError::api("getting lease", &n))?;
            out.push((n, l));
        }
        Ok(out)
    }

    fn claim(&self, name: &str, old: Option<&Lease>, now: i64) -> Lease {
        let prev = old.and_then(|l| l.spec.clone()).unwrap_or_default();
        let ours = prev.holder_identity.as_deref() == Some(self.me.as_str());
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: old.and_then(|l| l.metadata.resource_version.clone()),
                labels: Some([("app.kubernetes.io/managed-by".into(), "edge-ota".into())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.me.clone()),
                lease_duration_seconds: Some(self.duration_secs as i32),
                acquire_time: if ours {
                    prev.acquire_time
                } else {
                    Some(micro(now))
                },
                renew_time: Some(micro(now)),
                lease_transitions: Some(
                    prev.lease_transitions.unwrap_or(0) + if ours { 0 } else { 1 },
                ),
                ..Default::default()
            }),
        }
    }

    /// Take (or keep) one Lease. A lost race (409) is "not now", never an error.
    pub async fn acquire(&self, now: i64) -> Result<Taken, KubeError> {
        let slots = self.slots().await?;
        let views: Vec<(String, Option<Slot>)> = slots
            .iter()
            .map(|(n, l)| (n.clone(), l.as_ref().map(view)))
            .collect();
        let pp = PostParams::default();
        let result = match decide(&views, &self.me, now) {
            Decision::Full { until, holders } => {
                return Ok(Taken::No {
                    until,
                    why: format!(
                        "waiting for a reboot slot: {} of {} held by {}",
                        holders.len(),
                        self.max,
                        holders.join(", ")
                    ),
                })
            }
            Decision::Create(n) => self.api.create(&pp, &self.claim(&n, None, now)).await,
            Decision::Held(n) | Decision::Take(n) => {
                let old = slots
                    .iter()
                    .find(|(m, _)| *m == n)
                    .and_then(|(_, l)| l.as_ref());
                self.api.replace(&n, &pp, &self.claim(&n, old, now)).await
            }
        };
        match result {
            Ok(l) => Ok(Taken::Yes(l.metadata.name.unwrap_or_default())),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Taken::No {
                until: now + 1,
                why: "another node took the reboot slot first".into(),
            }),
            Err(e) => Err(KubeError::api("taking lease", &self.group)(e)),
        }
    }

    /// Give back whatever this node holds (idempotent).
    pub async fn release(&self) -> Result<(), KubeError> {
        for (n, l) in self.slots().await? {
            let Some(l) = l else { continue };
            if view(&l).holder.as_deref() != Some(self.me.as_str()) {
                continue;
            }
            let mut freed = l.clone();
            if let Some(s) = freed.spec.as_mut() {
                s.holder_identity = None;
                s.renew_time = None;
            }
            match self.api.replace(&n, &PostParams::default(), &freed).await {
                Ok(_) => {}
                // Changed meanwhile (expired and taken over): not ours any more.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(KubeError::api("releasing lease", &n)(e)),
            }
        }
        Ok(())
    }

    /// Whether this node holds a Lease now.
    pub async fn held(&self) -> Result<bool, KubeError> {
        Ok(self.slots().await?.iter().any(|(_, l)| {
            l.as_ref()
                .is_some_and(|l| view(l).holder.as_deref() == Some(&self.me))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(holder: Option<&str>, renewed: i64, duration: i64) -> Option<Slot> {
        Some(Slot {
            name: String::new(),
            holder: holder.map(String::from),
            renewed: Some(renewed),
            duration: Some(duration),
        })
    }

    fn slots(v: Vec<Option<Slot>>) -> Vec<(String, Option<Slot>)> {
        v.into_iter()
            .enumerate()
            .map(|(i, s)| (format!("u-{i}"), s))
            .collect()
    }

    #[test]
    fn absent_lease_is_created_first_free_one_taken() {
        assert_eq!(
            decide(&slots(vec![None]), "a", 100),
            Decision::Create("u-0".into())
        );
        let s = slots(vec![slot(Some("b"), 90, 60), slot(None, 0, 60)]);
        assert_eq!(decide(&s, "a", 100), Decision::Take("u-1".into()));
    }

    #[test]
    fn own_lease_is_kept_after_a_restart_even_when_another_is_free() {
        let s = slots(vec![None, slot(Some("a"), 90, 60)]);
        assert_eq!(decide(&s, "a", 100), Decision::Held("u-1".into()));
    }

    #[test]
    fn all_held_waits_until_the_first_expiry_then_a_dead_holder_is_taken_over() {
        let s = slots(vec![slot(Some("b"), 90, 60), slot(Some("c"), 80, 60)]);
        assert_eq!(
            decide(&s, "a", 100),
            Decision::Full {
                until: 140,
                holders: vec!["b".into(), "c".into()]
            }
        );
        assert_eq!(decide(&s, "a", 139), decide(&s, "a", 100));
        assert_eq!(decide(&s, "a", 140), Decision::Take("u-1".into()));
    }

    #[test]
    fn renewed_lease_is_not_taken_over() {
        let s = slots(vec![slot(Some("b"), 130, 60)]);
        assert!(matches!(
            decide(&s, "a", 150),
            Decision::Full { until: 190, .. }
        ));
    }

    #[test]
    fn names_count_max_unavailable_and_never_zero() {
        assert_eq!(names("osu", 2), ["osu-0", "osu-1"]);
        assert_eq!(names("osu", 0), ["osu-0"]);
    }
}
