//! An in-process fake Kubernetes API server that speaks the real wire format, for testing the
//! Kubernetes provider with kube-rs's real client and watcher (no API server can be installed
//! on the development machines, and a mock of the client would test nothing).
//!
//! [`FakeApiServer`] listens on `127.0.0.1:<random port>` (plain HTTP/1.1, hyper on a tokio
//! runtime of its own thread) and serves `nodes` and `pods` (core v1), `poddisruptionbudgets`
//! (policy/v1), `leases` (coordination.k8s.io/v1) and `osupdates` (edge-ota.io/v1alpha1, a
//! cluster-scoped custom resource with a status subresource) at the paths of the real API.
//!
//! # Faithful (as the Kubernetes API reference and API conventions describe it)
//! - One global, monotonically increasing `metadata.resourceVersion` (an integer as a string)
//!   stamped on every write; `uid`, `creationTimestamp` and `generation` set on create,
//!   `generation` bumped when `spec` changes. A write that changes nothing is not a write: no
//!   new resourceVersion, no watch event (as the real storage layer short-circuits it).
//! - LIST returns `{kind: XList, apiVersion, metadata: {resourceVersion}, items}` ordered by
//!   namespace/name; `labelSelector` (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
//!   `a notin (x)`) and `fieldSelector` (`path=v`, `path!=v`).
//! - WATCH (`watch=true|1`) is a chunked stream of newline-delimited `{"type","object"}` events
//!   after the given resourceVersion; unset or `"0"` (or `sendInitialEvents=true`) first sends
//!   the current objects as synthetic ADDED events, `sendInitialEvents` then a BOOKMARK
//!   annotated `k8s.io/initial-events-end: "true"`. With selectors an object that stops (starts)
//!   matching arrives as DELETED (ADDED), as the apiserver's watch filtering does. BOOKMARKs
//!   (object with only kind, apiVersion and metadata.resourceVersion) every
//!   [`Options::bookmark_every`] when `allowWatchBookmarks=true`, and one before the stream ends
//!   at `timeoutSeconds`. A resourceVersion older than the bounded event history gets HTTP 200
//!   and one `ERROR` event carrying a 410 `Expired` Status, as the real server answers watches.
//! - Errors are `metav1.Status` bodies with the matching HTTP code: 404 NotFound, 409
//!   AlreadyExists / Conflict (optimistic concurrency: a PUT, a patch or a delete precondition
//!   naming another resourceVersion), 410 Expired, 422 Invalid, 429 TooManyRequests, 503.
//! - Status subresource (nodes, pods, poddisruptionbudgets, osupdates): PUT and PATCH on the
//!   object keep the stored `status`, PUT and PATCH on `/status` change only `status`; create of
//!   the custom resource drops `status`. A PUT of an `OSUpdate` without resourceVersion is 422,
//!   as for every custom resource (they do not allow unconditional updates).
//! - Eviction (`POST .../pods/{name}/eviction`): 429 TooManyRequests with the real message and a
//!   `DisruptionBudget` cause when a PDB selecting the pod has `status.disruptionsAllowed` 0,
//!   500 when several PDBs select it; otherwise the pod is deleted and the PDB's
//!   `disruptionsAllowed` decremented. Pods in a terminal phase are evicted without a check.
//! - Create with `metadata.resourceVersion` set fails with 500 (as the real storage does),
//!   `generateName` is honoured, `dryRun` makes no change.
//!
//! # Simplified
//! - No authentication or authorization (any bearer token is accepted), no admission, no
//!   schema validation, no defaulting, no namespaces objects (any namespace exists), no
//!   finalizers or graceful deletion (DELETE removes at once), no managedFields.
//! - `application/strategic-merge-patch+json` is applied as a JSON merge patch (RFC 7386):
//!   lists are replaced, not merged by key; `$`-directives are refused with 400.
//!   `application/apply-patch+yaml` (server-side apply) accepts JSON only and is a merge patch
//!   that creates the object if missing: no field ownership, no conflicts.
//!   `application/json-patch+json` (RFC 6902) is implemented in full.
//! - `fieldSelector` accepts any dotted path into the object (the real API accepts only a few
//!   per kind, e.g. `metadata.name`, `metadata.namespace`, `spec.nodeName`).
//! - LIST ignores `limit` and `continue` (everything in one page, no continue token) and serves
//!   the current state for any resourceVersion, except `resourceVersionMatch=Exact` on another
//!   version (410 Expired: no snapshots are kept).
//! - A watch from a future resourceVersion waits for it instead of failing after a while.
//! - When [`FakeApiServer::set_unavailable`] is on, every request gets 503 and open watches are
//!   cut (connection aborted mid-stream); a real outage usually refuses connections instead.
//! - No discovery (`/api`, `/apis`); `/version` answers.
//!
//! Note for clients: kube-rs (5.x) retries 429, 503 and 504 answers by default (up to 15 times,
//! exponential backoff from 5 ms), so a refused eviction or [`FakeApiServer::set_unavailable`]
//! reaches the caller only after minutes unless `Config::default_retry` is off.
//! `FAKE_KUBE_DEBUG=1` in the environment prints every request to stderr.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, watch};

/// Settings of a [`FakeApiServer`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Interval of BOOKMARK events on watches that allow them (the real server: about a
    /// minute); tests set it short.
    pub bookmark_every: Duration,
    /// Number of watch events kept: a watch from a resourceVersion older than these gets 410.
    pub event_history: usize,
    /// Length of a watch without `timeoutSeconds` (the real server: 30 to 60 minutes).
    pub default_watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_every: Duration::from_secs(3),
            event_history: 1000,
            default_watch_timeout: Duration::from_secs(1800),
        }
    }
}

/// One write to the store, for assertions on the order of what a client did.
#[derive(Debug, Clone)]
pub struct Write {
    pub at: SystemTime,
    /// `create`, `update`, `patch`, `delete` or `evict`.
    pub verb: String,
    /// Plural resource name (`nodes`, `pods`, `leases`, ...).
    pub resource: String,
    pub namespace: Option<String>,
    pub name: String,
    /// The resourceVersion the write produced.
    pub resource_version: u64,
    /// For nodes: `spec.unschedulable` after the write (absent counts as `false`).
    pub unschedulable: Option<bool>,
    /// Made by a test hook ([`FakeApiServer::create`], [`FakeApiServer::patch`], ...), not by
    /// a client through the API.
    pub by_test: bool,
}

/// A resource the server knows.
#[derive(Debug)]
struct Resource {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status_subresource: bool,
    /// Custom resources refuse a PUT without resourceVersion; built-in kinds mostly accept it.
    unconditional_update: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status_subresource: true,
        unconditional_update: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        status_subresource: true,
        unconditional_update: true,
    },
    Resource {
        group: "policy",
        version: "v1",
        plural: "poddisruptionbudgets",
        kind: "PodDisruptionBudget",
        namespaced: true,
        status_subresource: true,
        unconditional_update: true,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
        unconditional_update: true,
    },
    Resource {
        group: "edge-ota.io",
        version: "v1alpha1",
        plural: "osupdates",
        kind: "OSUpdate",
        namespaced: false,
        status_subresource: true,
        unconditional_update: false,
    },
];

const PODS: usize = 1;
const PDBS: usize = 2;

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `leases.coordination.k8s.io`: how the server names the resource in messages.
    fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
        RESOURCES
            .iter()
            .position(|r| r.group == group && r.version == version && r.plural == plural)
    }

    fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
        RESOURCES
            .iter()
            .position(|r| r.api_version() == api_version && r.kind == kind)
    }
}

/// An API error, answered as a `metav1.Status`.
#[derive(Debug, Clone)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    fn not_found(res: &Resource, name: &str) -> Self {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.group_resource()),
        )
        .details(json!({"name": name, "group": res.group, "kind": res.plural}))
    }

    fn conflict(res: &Resource, name: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                res.group_resource()
            ),
        )
        .details(json!({"name": name, "group": res.group, "kind": res.plural}))
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(res: &Resource, name: &str, cause: impl Into<String>) -> Self {
        let kind = if res.group.is_empty() {
            res.kind.to_string()
        } else {
            format!("{}.{}", res.kind, res.group)
        };
        ApiError::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {}", cause.into()),
        )
    }

    fn expired(message: String) -> Self {
        ApiError::new(410, "Expired", message)
    }

    fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// A watch event kept in the history; `old` lets selector-filtered watches turn a MODIFIED into
/// ADDED or DELETED when the object starts or stops matching.
struct Event {
    rv: u64,
    res: usize,
    namespace: String,
    kind: EventType,
    object: Value,
    old: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    res: usize,
    namespace: String,
    name: String,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    events: VecDeque<Event>,
    /// Every event with a resourceVersion above this one is still in `events`.
    compacted: u64,
    unavailable: bool,
    requests: Vec<String>,
    history: Vec<Write>,
    seq: u64,
    /// [`Options::event_history`]
    event_limit: usize,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped after every write and availability change: wakes the open watches.
    tick: watch::Sender<u64>,
    opts: Options,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panicking test hook must not take the server down with it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.tick.send_modify(|t| *t += 1);
    }
}

/// The fake API server; stopped on drop. See the module documentation.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server with the default [`Options`].
    pub fn start() -> io::Result<Self> {
        Self::start_with(Options::default())
    }

    /// Starts a server on 127.0.0.1 and a free port, on a thread of its own.
    pub fn start_with(opts: Options) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 0,
                objects: BTreeMap::new(),
                events: VecDeque::new(),
                compacted: 0,
                unavailable: false,
                requests: Vec::new(),
                history: Vec::new(),
                seq: 0,
                event_limit: opts.event_history,
            }),
            tick: watch::channel(0).0,
            opts,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || {
                runtime.block_on(serve(listener, served, stopped));
                // Dropping the runtime here cancels the open connections and watches.
                drop(runtime);
            })?;
        Ok(FakeApiServer {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig with one cluster at [`url`](Self::url), a user with a bearer token and a
    /// current context with that namespace.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user:\n    token: fake-token\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             current-context: fake\n\
             preferences: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig_yaml`](Self::kubeconfig_yaml) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(namespace))
    }

    /// Creates an object as a client would (resource from `apiVersion` and `kind`, namespace
    /// from `metadata.namespace`), except that `status` is kept for every kind. Panics if the
    /// kind is not served or the object exists.
    pub fn create(&self, obj: Value) -> Value {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let res = resource(&api_version, &kind);
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
        self.write(|st| st.create(res, ns.as_deref(), obj, false, true))
            .unwrap_or_else(|e| panic!("fake API server: create {kind}: {}", e.message))
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = Key {
            res: resource(api_version, kind),
            namespace: namespace.unwrap_or_default().to_string(),
            name: name.to_string(),
        };
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Every stored object of a kind, in all namespaces, ordered by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let res = resource(api_version, kind);
        let st = self.shared.lock();
        st.objects
            .iter()
            .filter(|(k, _)| k.res == res)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Applies a JSON merge patch to a stored object, `status` included (test hooks are not
    /// bound by the status subresource). Panics if the object does not exist.
    pub fn patch(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        merge_patch: Value,
    ) -> Value {
        self.update_with(api_version, kind, namespace, name, |obj| {
            merge_patch_into(obj, &merge_patch)
        })
    }

    /// Changes a stored object with `f`, `status` included; one write (one resourceVersion,
    /// one MODIFIED event) unless `f` changes nothing. Panics if the object does not exist.
    pub fn update_with(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Value {
        let res = resource(api_version, kind);
        let key = Key {
            res,
            namespace: namespace.unwrap_or_default().to_string(),
            name: name.to_string(),
        };
        self.write(|st| {
            let old = st
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(&RESOURCES[res], name))?;
            let mut new = old.clone();
            f(&mut new);
            Ok(st.commit_update(&key, old, new, "update", true))
        })
        .unwrap_or_else(|e| panic!("fake API server: update {kind}: {}", e.message))
    }

    /// Deletes a stored object (DELETED watch event); the last state, if it existed.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = Key {
            res: resource(api_version, kind),
            namespace: namespace.unwrap_or_default().to_string(),
            name: name.to_string(),
        };
        self.write(|st| Ok(st.remove(&key, "delete", true)))
            .ok()
            .flatten()
    }

    /// Takes the API down (every request gets 503, open watches are cut) or up again.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.lock().unavailable = unavailable;
        self.shared.wake();
    }

    /// Forgets the event history: a watch from any resourceVersion older than the current one
    /// then gets 410 Expired, as after an etcd compaction.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.events.clear();
        st.compacted = st.rv;
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Requests received so far, as `METHOD /path?query` (query as sent).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Writes so far, oldest first.
    pub fn history(&self) -> Vec<Write> {
        self.shared.lock().history.clone()
    }

    /// The largest number of nodes that were unschedulable at the same time, replaying the
    /// write history from an empty store (nodes created unschedulable count).
    pub fn max_cordoned_at_once(&self) -> usize {
        let mut cordoned = std::collections::BTreeSet::new();
        let mut max = 0;
        for w in self.history() {
            if w.resource != "nodes" {
                continue;
            }
            if w.verb != "delete" && w.unschedulable == Some(true) {
                cordoned.insert(w.name);
            } else {
                cordoned.remove(&w.name);
            }
            max = max.max(cordoned.len());
        }
        max
    }

    fn write<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let out = f(&mut self.shared.lock());
        self.shared.wake();
        out
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn resource(api_version: &str, kind: &str) -> usize {
    Resource::by_kind(api_version, kind)
        .unwrap_or_else(|| panic!("fake API server: {api_version} {kind} is not served"))
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

impl Store {
    /// Stores `object` (or removes it for DELETED) under a new resourceVersion, with its event
    /// and its history entry.
    fn commit(
        &mut self,
        key: &Key,
        kind: EventType,
        mut object: Value,
        old: Option<Value>,
        verb: &str,
        by_test: bool,
    ) -> Value {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind == EventType::Deleted {
            self.objects.remove(key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        let res = &RESOURCES[key.res];
        self.history.push(Write {
            at: SystemTime::now(),
            verb: verb.to_string(),
            resource: res.plural.to_string(),
            namespace: res.namespaced.then(|| key.namespace.clone()),
            name: key.name.clone(),
            resource_version: rv,
            unschedulable: (res.plural == "nodes")
                .then(|| object["spec"]["unschedulable"].as_bool().unwrap_or(false)),
            by_test,
        });
        self.events.push_back(Event {
            rv,
            res: key.res,
            namespace: key.namespace.clone(),
            kind,
            object: object.clone(),
            old,
        });
        while self.events.len() > self.event_limit {
            if let Some(e) = self.events.pop_front() {
                self.compacted = e.rv;
            }
        }
        object
    }

    /// Stores `new` in place of `old` unless nothing changed; bumps `generation` on a change of
    /// `spec` and keeps the fields a client cannot change.
    fn commit_update(
        &mut self,
        key: &Key,
        old: Value,
        mut new: Value,
        verb: &str,
        by_test: bool,
    ) -> Value {
        let res = &RESOURCES[key.res];
        if !new.is_object() {
            new = json!({});
        }
        new["apiVersion"] = json!(res.api_version());
        new["kind"] = json!(res.kind);
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for field in [
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
            "resourceVersion",
        ] {
            match old["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let spec_changed = old.get("spec") != new.get("spec");
        new["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
        if new == old {
            return old;
        }
        self.commit(key, EventType::Modified, new, Some(old), verb, by_test)
    }

    fn remove(&mut self, key: &Key, verb: &str, by_test: bool) -> Option<Value> {
        let old = self.objects.get(key)?.clone();
        Some(self.commit(key, EventType::Deleted, old, None, verb, by_test))
    }

    fn create(
        &mut self,
        res_idx: usize,
        namespace: Option<&str>,
        mut obj: Value,
        dry_run: bool,
        by_test: bool,
    ) -> Result<Value, ApiError> {
        let res = &RESOURCES[res_idx];
        check_kind(res, &obj)?;
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let meta = &mut obj["metadata"];
        let namespace = if res.namespaced {
            let ns = namespace.unwrap_or("default");
            if let Some(body_ns) = meta["namespace"].as_str() {
                if !body_ns.is_empty() && body_ns != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace \
                         sent on the request",
                    ));
                }
            }
            meta["namespace"] = json!(ns);
            ns.to_string()
        } else {
            if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        };
        let mut name = meta["name"].as_str().unwrap_or_default().to_string();
        if name.is_empty() {
            let prefix = meta["generateName"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    res,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            self.seq += 1;
            name = format!("{prefix}{}", random_suffix(self.seq));
            meta["name"] = json!(name);
        }
        let rv = meta["resourceVersion"].as_str().unwrap_or_default();
        if !rv.is_empty() && !by_test {
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let key = Key {
            res: res_idx,
            namespace,
            name: name.clone(),
        };
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", res.group_resource()),
            )
            .details(json!({"name": name, "group": res.group, "kind": res.plural})));
        }
        self.seq += 1;
        let seq = self.seq;
        meta["uid"] = json!(format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            seq
        ));
        meta["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
        meta["generation"] = json!(1);
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
        // The status of a custom resource with a status subresource is ignored on create.
        if res.group == "edge-ota.io" && !by_test {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        if dry_run {
            return Ok(obj);
        }
        Ok(self.commit(&key, EventType::Added, obj, None, "create", by_test))
    }

    /// PUT (`status`: on the `/status` subresource).
    fn replace(
        &mut self,
        key: &Key,
        body: Value,
        status: bool,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let res = &RESOURCES[key.res];
        check_kind(res, &body)?;
        if let Some(name) = body["metadata"]["name"].as_str() {
            if name != key.name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({name}) does not match the name on the URL ({})",
                    key.name
                )));
            }
        }
        let old = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, &key.name))?;
        let stored = old["metadata"]["resourceVersion"].as_str();
        match body["metadata"]["resourceVersion"].as_str() {
            // Optimistic concurrency: the update was made from another version.
            Some(rv) if !rv.is_empty() && Some(rv) != stored => {
                return Err(ApiError::conflict(res, &key.name));
            }
            Some(rv) if !rv.is_empty() => {}
            _ if !res.unconditional_update => {
                return Err(ApiError::invalid(
                    res,
                    &key.name,
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an \
                     update",
                ))
            }
            _ => {}
        }
        let new = with_subresource_rule(res, &old, body, status);
        if dry_run {
            return Ok(new);
        }
        Ok(self.commit_update(key, old, new, "update", false))
    }

    fn patch(
        &mut self,
        key: &Key,
        content_type: &str,
        body: &[u8],
        status: bool,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let res = &RESOURCES[key.res];
        let patch: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("error decoding patch: {e} (only JSON is accepted)"))
        })?;
        let media = content_type.split(';').next().unwrap_or_default().trim();
        let apply = media == "application/apply-patch+yaml";
        let old = match self.objects.get(key) {
            Some(o) => o.clone(),
            None if apply && !status => {
                // Server-side apply creates what does not exist.
                let mut obj = patch;
                obj["metadata"]["name"] = json!(key.name);
                let ns = RESOURCES[key.res]
                    .namespaced
                    .then_some(key.namespace.as_str());
                return self.create(key.res, ns, obj, dry_run, false);
            }
            None => return Err(ApiError::not_found(res, &key.name)),
        };
        let mut patched = old.clone();
        match media {
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                if media == "application/strategic-merge-patch+json" {
                    if let Some(d) = find_directive(&patch) {
                        return Err(ApiError::bad_request(format!(
                            "fake API server: strategic merge patch directive {d} is not \
                             supported"
                        )));
                    }
                }
                merge_patch_into(&mut patched, &patch);
            }
            "application/json-patch+json" => json_patch(&mut patched, &patch)
                .map_err(|e| ApiError::invalid(res, &key.name, e))?,
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
                ))
            }
        }
        if patched["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"]
            && !patched["metadata"]["resourceVersion"].is_null()
        {
            return Err(ApiError::conflict(res, &key.name));
        }
        let new = with_subresource_rule(res, &old, patched, status);
        if dry_run {
            return Ok(new);
        }
        Ok(self.commit_update(key, old, new, "patch", false))
    }

    fn delete(&mut self, key: &Key, body: &[u8], dry_run: bool) -> Result<Value, ApiError> {
        let res = &RESOURCES[key.res];
        let old = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, &key.name))?;
        let opts: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let pre = &opts["preconditions"];
        for (field, label) in [("resourceVersion", "ResourceVersion"), ("uid", "UID")] {
            if let Some(want) = pre[field].as_str() {
                let have = old["metadata"][field].as_str().unwrap_or_default();
                if want != have {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{}\": Precondition failed: \
                             {label} in precondition: {want}, {label} in object meta: {have}",
                            res.group_resource(),
                            key.name
                        ),
                    ));
                }
            }
        }
        if dry_run {
            return Ok(old);
        }
        Ok(self.remove(key, "delete", false).unwrap_or(old))
    }

    fn evict(&mut self, key: &Key) -> Result<Value, ApiError> {
        let pod = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&RESOURCES[PODS], &key.name))?;
        let phase = pod["status"]["phase"].as_str().unwrap_or_default();
        // A pod that has terminated disrupts nothing: the real server deletes it unchecked.
        let terminal = phase == "Succeeded" || phase == "Failed";
        let labels = &pod["metadata"]["labels"];
        let pdbs: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, pdb)| {
                k.res == PDBS
                    && k.namespace == key.namespace
                    && selector_matches(&pdb["spec"]["selector"], labels)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !terminal && pdbs.len() > 1 {
            return Err(ApiError::new(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource \
                 does not support.",
            ));
        }
        if let (false, Some(pdb_key)) = (terminal, pdbs.first()) {
            let pdb = self.objects[pdb_key].clone();
            let allowed = pdb["status"]["disruptionsAllowed"].as_i64().unwrap_or(0);
            if allowed <= 0 {
                let desired = pdb["status"]["desiredHealthy"].as_i64().unwrap_or(0);
                let current = pdb["status"]["currentHealthy"].as_i64().unwrap_or(0);
                return Err(ApiError::new(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                )
                .details(json!({"causes": [{
                    "reason": "DisruptionBudget",
                    "message": format!(
                        "The disruption budget {} needs {desired} healthy pods and has \
                         {current} currently",
                        pdb_key.name
                    ),
                }]})));
            }
            let mut new = pdb.clone();
            new["status"]["disruptionsAllowed"] = json!(allowed - 1);
            self.commit_update(pdb_key, pdb, new, "patch", false);
        }
        self.remove(key, "evict", false);
        Ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "code": 201,
        }))
    }

    fn list<'a>(
        &'a self,
        res: usize,
        namespace: Option<&'a str>,
        sel: &'a Selectors,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |(k, v)| {
                k.res == res && namespace.is_none_or(|ns| ns == k.namespace) && sel.matches(v)
            })
            .map(|(_, v)| v)
    }
}

fn check_kind(res: &Resource, body: &Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid(
            res,
            "",
            "the body of the request is not a JSON object",
        ));
    }
    if let Some(kind) = body["kind"].as_str() {
        if kind != res.kind {
            return Err(ApiError::bad_request(format!(
                "kind {kind} does not match the resource {} ({})",
                res.group_resource(),
                res.kind
            )));
        }
    }
    Ok(())
}

/// The status subresource rule: the object's endpoint keeps the stored status, `/status`
/// changes only the status.
fn with_subresource_rule(res: &Resource, old: &Value, candidate: Value, status: bool) -> Value {
    if !res.status_subresource {
        return candidate;
    }
    let (mut base, status_from) = if status {
        (old.clone(), &candidate)
    } else {
        (candidate.clone(), old)
    };
    match (base.as_object_mut(), status_from.get("status")) {
        (Some(m), Some(s)) => {
            m.insert("status".into(), s.clone());
        }
        (Some(m), None) => {
            m.remove("status");
        }
        _ => {}
    }
    base
}

fn find_directive(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            if k.starts_with('$') {
                Some(k.clone())
            } else {
                find_directive(v)
            }
        }),
        Value::Array(a) => a.iter().find_map(find_directive),
        _ => None,
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch_into(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch_into(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// RFC 6902 JSON patch.
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or("JSON patch operation without path")?;
        match op["op"].as_str().unwrap_or_default() {
            "add" => ptr_add(
                doc,
                path,
                op.get("value").ok_or("add without value")?.clone(),
            )?,
            "remove" => {
                ptr_remove(doc, path)?;
            }
            "replace" => {
                let value = op.get("value").ok_or("replace without value")?.clone();
                *doc.pointer_mut(path)
                    .ok_or(format!("replace: missing path {path}"))? = value;
            }
            "test" => {
                if doc.pointer(path) != op.get("value") {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            "move" => {
                let from = op["from"].as_str().ok_or("move without from")?;
                let v = ptr_remove(doc, from)?;
                ptr_add(doc, path, v)?;
            }
            "copy" => {
                let from = op["from"].as_str().ok_or("copy without from")?;
                let v = doc
                    .pointer(from)
                    .ok_or(format!("copy: missing {from}"))?
                    .clone();
                ptr_add(doc, path, v)?;
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let i = path
        .rfind('/')
        .ok_or(format!("bad JSON pointer {path:?}"))?;
    let last = path[i + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&path[..i], last))
}

fn ptr_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
        }
        Some(Value::Array(a)) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("bad index in {path}"))?
            };
            if i > a.len() {
                return Err(format!("index out of range in {path}"));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("add: missing parent of {path}")),
    }
    Ok(())
}

fn ptr_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last),
        Some(Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => Some(a.remove(i)),
            _ => None,
        },
        _ => None,
    }
    .ok_or(format!("remove: missing path {path}"))
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Selectors {
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selectors {
    fn parse(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let mut sel = Selectors::default();
        if let Some(s) = query.get("labelSelector") {
            for term in split_top_level(s) {
                sel.labels.push(parse_label_term(&term)?);
            }
        }
        if let Some(s) = query.get("fieldSelector") {
            for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                    (p, false, v)
                } else if let Some((p, v)) = term.split_once("==") {
                    (p, true, v)
                } else if let Some((p, v)) = term.split_once('=') {
                    (p, true, v)
                } else {
                    return Err(ApiError::bad_request(format!(
                        "invalid field selector term {term:?}"
                    )));
                };
                sel.fields
                    .push((path.trim().to_string(), eq, value.trim().to_string()));
            }
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, want)| {
                let mut v = obj;
                for part in path.split('.') {
                    v = &v[part];
                }
                let have = match v {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (have == *want) == *eq
            })
    }
}

/// Splits a label selector on the commas that are not inside `in (...)` sets.
fn split_top_level(s: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_term(term: &str) -> Result<LabelReq, ApiError> {
    let set = |rest: &str| -> Result<Vec<String>, ApiError> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| ApiError::bad_request(format!("invalid label selector {term:?}")))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    if let Some(k) = term.strip_prefix('!') {
        return Ok(LabelReq::NotExists(k.trim().to_string()));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(LabelReq::Ne(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelReq::Eq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, rest)) = term.split_once(" notin ") {
        return Ok(LabelReq::NotIn(k.trim().into(), set(rest)?));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return Ok(LabelReq::In(k.trim().into(), set(rest)?));
    }
    if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
        return Err(ApiError::bad_request(format!(
            "unsupported label selector {term:?}"
        )));
    }
    Ok(LabelReq::Exists(term.to_string()))
}

/// A `metav1.LabelSelector` (as in a PDB): an empty one selects everything, a missing one
/// nothing (policy/v1 semantics).
fn selector_matches(selector: &Value, labels: &Value) -> bool {
    if !selector.is_object() {
        return false;
    }
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let match_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let values = |e: &Value| -> Vec<String> {
        e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let match_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            match e["operator"].as_str().unwrap_or_default() {
                "In" => label(key).is_some_and(|l| values(e).iter().any(|v| v == l)),
                "NotIn" => label(key).is_none_or(|l| values(e).iter().all(|v| v != l)),
                "Exists" => label(key).is_some(),
                "DoesNotExist" => label(key).is_none(),
                _ => false,
            }
        });
    match_labels && match_expressions
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A watch stream cut on purpose (API down): hyper aborts the connection mid-body.
#[derive(Debug)]
struct Cut;

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake API server: watch cut")
    }
}

impl std::error::Error for Cut {}

/// A whole body (with Content-Length) or a streamed one (chunked).
enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, Cut>>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut bytes = serde_json::to_vec(body).expect("JSON values serialize");
    bytes.push(b'\n');
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Body::Full(Some(bytes.into())))
        .expect("static response parts are valid")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake API server: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = &mut stop => break,
        }
    }
}

/// Where a request goes: resource, namespace, name and subresource.
struct Route {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    let res = Resource::by_path(group, version, plural)?;
    let r = &RESOURCES[res];
    if (!r.namespaced && namespace.is_some())
        || (r.namespaced && namespace.is_none() && name.is_some())
    {
        return None;
    }
    Some(Route {
        res,
        namespace,
        name,
        sub,
    })
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    {
        let mut st = shared.lock();
        st.requests.push(format!("{method} {path_and_query}"));
        if std::env::var_os("FAKE_KUBE_DEBUG").is_some() {
            eprintln!("fake-kube-api: {method} {path_and_query}");
        }
        if st.unavailable {
            return error_response(&ApiError::new(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ));
        }
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let query = parse_query(uri.query());
    if uri.path() == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}),
        );
    }
    let Some(route) = route(uri.path()) else {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if method == Method::GET && route.name.is_none() && watching {
        return match start_watch(shared, &route, &query) {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
    }
    let result = dispatch(&shared, &method, &route, &query, &content_type, &body);
    shared.wake();
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

fn dispatch(
    shared: &Shared,
    method: &Method,
    route: &Route,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Value), ApiError> {
    let res = &RESOURCES[route.res];
    let dry_run = query.contains_key("dryRun");
    let mut st = shared.lock();
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding the body: {e}")))
    };
    match (method, &route.name, route.sub.as_deref()) {
        (&Method::GET, None, None) => {
            let sel = Selectors::parse(query)?;
            if query.get("resourceVersionMatch").map(String::as_str) == Some("Exact") {
                let want = query.get("resourceVersion").cloned().unwrap_or_default();
                if want != st.rv.to_string() {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {want} ({})",
                        st.rv
                    )));
                }
            }
            let items: Vec<Value> = st
                .list(route.res, route.namespace.as_deref(), &sel)
                .cloned()
                .collect();
            Ok((
                200,
                json!({
                    "kind": format!("{}List", res.kind),
                    "apiVersion": res.api_version(),
                    "metadata": {"resourceVersion": st.rv.to_string()},
                    "items": items,
                }),
            ))
        }
        (&Method::POST, None, None) => {
            if res.namespaced && route.namespace.is_none() {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "create needs a namespace",
                ));
            }
            let obj = parse_body()?;
            st.create(route.res, route.namespace.as_deref(), obj, dry_run, false)
                .map(|v| (201, v))
        }
        (_, Some(name), sub) => {
            let key = Key {
                res: route.res,
                namespace: route.namespace.clone().unwrap_or_default(),
                name: name.clone(),
            };
            let status = match sub {
                None => false,
                Some("status") if res.status_subresource && method != Method::POST => true,
                Some("eviction") if route.res == PODS && method == Method::POST => {
                    return st.evict(&key).map(|v| (201, v));
                }
                Some(_) => {
                    return Err(ApiError::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ))
                }
            };
            match *method {
                Method::GET => st
                    .objects
                    .get(&key)
                    .cloned()
                    .map(|v| (200, v))
                    .ok_or_else(|| ApiError::not_found(res, name)),
                Method::PUT => st
                    .replace(&key, parse_body()?, status, dry_run)
                    .map(|v| (200, v)),
                Method::PATCH => st
                    .patch(&key, content_type, body, status, dry_run)
                    .map(|v| (200, v)),
                Method::DELETE if !status => st.delete(&key, body, dry_run).map(|v| (200, v)),
                _ => Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    format!("{method} is not supported here"),
                )),
            }
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------------------------

struct WatchSpec {
    res: usize,
    namespace: Option<String>,
    sel: Selectors,
    bookmarks: bool,
    timeout: Duration,
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("JSON values serialize");
    line.push(b'\n');
    line.into()
}

fn bookmark_line(res: &Resource, rv: u64, initial_events_end: bool) -> Bytes {
    let mut object = json!({
        "kind": res.kind,
        "apiVersion": res.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
    });
    if initial_events_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &object)
}

fn expired_line(want: u64, oldest: u64) -> Bytes {
    let e = ApiError::expired(format!("too old resource version: {want} ({oldest})"));
    event_line("ERROR", &e.status())
}

fn start_watch(
    shared: Arc<Shared>,
    route: &Route,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let res = &RESOURCES[route.res];
    let sel = Selectors::parse(query)?;
    let truthy = |k: &str| matches!(query.get(k).map(String::as_str), Some("true" | "1"));
    let timeout = match query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
    {
        Some(t) if t > 0 => Duration::from_secs(t),
        _ => shared.opts.default_watch_timeout,
    };
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = truthy("sendInitialEvents");
    let spec = WatchSpec {
        res: route.res,
        namespace: route.namespace.clone(),
        sel,
        bookmarks: truthy("allowWatchBookmarks"),
        timeout,
    };
    let (tx, rx) = mpsc::channel(64);
    // Subscribe before reading the store: a write after this point wakes the watch.
    let tick = shared.tick.subscribe();
    let mut first = Vec::new();
    let pos = {
        let st = shared.lock();
        if rv_param.is_empty() || rv_param == "0" || send_initial {
            for obj in st.list(spec.res, spec.namespace.as_deref(), &spec.sel) {
                first.push(Ok(event_line("ADDED", obj)));
            }
            if send_initial {
                first.push(Ok(bookmark_line(res, st.rv, true)));
            }
            Some(st.rv)
        } else {
            let want: u64 = rv_param.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: {rv_param:?}: must be a numeric string"
                ))
            })?;
            if want < st.compacted {
                first.push(Ok(expired_line(want, st.compacted + 1)));
                None
            } else {
                Some(want)
            }
        }
    };
    tokio::spawn(async move {
        for line in first {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if let Some(pos) = pos {
            run_watch(shared, spec, pos, tick, tx).await;
        }
    });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::Stream(rx))
        .expect("static response parts are valid"))
}

/// Sends the events after `pos` as they come, bookmarks when due, until the timeout, the
/// client going away or the API going down.
async fn run_watch(
    shared: Arc<Shared>,
    spec: WatchSpec,
    mut pos: u64,
    mut tick: watch::Receiver<u64>,
    tx: mpsc::Sender<Result<Bytes, Cut>>,
) {
    let res = &RESOURCES[spec.res];
    let start = tokio::time::Instant::now();
    let deadline = start + spec.timeout;
    let every = shared.opts.bookmark_every;
    let mut next_bookmark = start + every;
    let mut ending = false;
    let mut bookmark_due = false;
    loop {
        let mut lines = Vec::new();
        {
            let st = shared.lock();
            if st.unavailable {
                // Cut, not ended: the client must see a broken connection.
                lines.push(Err(Cut));
                ending = true;
            } else if pos < st.compacted {
                // Fell behind the kept history: the real server ends such a watch with 410.
                lines.push(Ok(expired_line(pos, st.compacted + 1)));
                ending = true;
            } else {
                let from = st.events.partition_point(|e| e.rv <= pos);
                for e in st.events.range(from..) {
                    if let Some(line) = filter_event(&spec, e) {
                        lines.push(Ok(line));
                    }
                }
                pos = pos.max(st.rv);
                if spec.bookmarks && (bookmark_due || ending) {
                    lines.push(Ok(bookmark_line(res, pos, false)));
                    bookmark_due = false;
                    next_bookmark = tokio::time::Instant::now() + every;
                }
            }
        }
        for line in lines {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if ending {
            return;
        }
        tokio::select! {
            changed = tick.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(next_bookmark), if spec.bookmarks => bookmark_due = true,
            _ = tokio::time::sleep_until(deadline) => ending = true,
            _ = tx.closed() => return,
        }
    }
}

/// The line a watch with these filters sends for an event, if any.
fn filter_event(spec: &WatchSpec, e: &Event) -> Option<Bytes> {
    if e.res != spec.res || spec.namespace.as_ref().is_some_and(|ns| *ns != e.namespace) {
        return None;
    }
    let now = spec.sel.matches(&e.object);
    let before = e.old.as_ref().is_some_and(|o| spec.sel.matches(o));
    let kind = match (e.kind, before, now) {
        (EventType::Added, _, true) => EventType::Added,
        (EventType::Deleted, _, true) => EventType::Deleted,
        (EventType::Modified, true, true) => EventType::Modified,
        (EventType::Modified, false, true) => EventType::Added,
        (EventType::Modified, true, false) => EventType::Deleted,
        _ => return None,
    };
    Some(event_line(kind.as_str(), &e.object))
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Five lowercase alphanumerics, as the API server appends to a `generateName`.
fn random_suffix(seq: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ nanos;
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// `2026-12-06T04:31:39Z` (metav1.Time has second precision).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch_into(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_follows_rfc6902() {
        let mut doc = json!({"spec": {"taints": [{"key": "a"}]}, "x": 1});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/x", "value": 1},
                {"op": "add", "path": "/spec/taints/-", "value": {"key": "b"}},
                {"op": "remove", "path": "/spec/taints/0"},
                {"op": "move", "from": "/x", "path": "/y"},
                {"op": "copy", "from": "/y", "path": "/z"},
                {"op": "replace", "path": "/z", "value": 2},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"spec": {"taints": [{"key": "b"}]}, "y": 1, "z": 2})
        );
        let err = json_patch(&mut doc, &json!([{"op": "test", "path": "/y", "value": 7}]));
        assert!(err.is_err());
    }

    #[test]
    fn label_selectors_parse_and_match() {
        let q = HashMap::from([(
            "labelSelector".to_string(),
            "app=web,tier!=db,env in (prod, staging),!legacy,zone".to_string(),
        )]);
        let sel = Selectors::parse(&q).unwrap();
        let obj = |labels: Value| json!({"metadata": {"labels": labels}});
        assert!(sel.matches(&obj(json!({"app": "web", "env": "prod", "zone": "a"}))));
        assert!(!sel.matches(&obj(json!({"app": "web", "env": "dev", "zone": "a"}))));
        assert!(!sel.matches(&obj(
            json!({"app": "web", "env": "prod", "zone": "a", "tier": "db"})
        )));
        assert!(!sel.matches(&obj(
            json!({"app": "web", "env": "prod", "zone": "a", "legacy": "1"})
        )));
        assert!(!sel.matches(&obj(json!({"app": "web", "env": "prod"}))));
    }

    #[test]
    fn percent_decoding_of_selectors() {
        assert_eq!(
            percent_decode("app%3Dweb%2Ctier%21%3Ddb"),
            "app=web,tier!=db"
        );
        assert_eq!(percent_decode("a+in+%28x%29"), "a in (x)");
        assert_eq!(percent_decode("50%"), "50%");
    }
}
