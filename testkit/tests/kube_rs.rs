//! kube-rs's real client and watcher, unchanged, against the fake API server: what the
//! Kubernetes provider will do, done by the library it uses.

use std::pin::pin;
use std::time::Duration;

use edge_ota_testkit::kube_api::{FakeApiServer, Options};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DynamicObject, EvictParams, Patch, PatchParams, PostParams, ResourceExt,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use serde_json::json;

/// A client configured as the agent will be: from a kubeconfig file. `retry`: kube's default
/// retry of 429, 503 and 504 answers (up to 15 times, exponential backoff from 5 ms), with
/// which a refused eviction takes minutes to come back as an error.
async fn client(srv: &FakeApiServer, retry: bool) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    srv.write_kubeconfig(&path, "edge").unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.default_retry = retry;
    assert_eq!(config.default_namespace, "edge");
    Client::try_from(config).unwrap()
}

fn node(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {}})
}

/// The next watcher event, skipping the errors the watcher recovers from (it yields them).
async fn next<K>(
    stream: &mut (impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin),
) -> watcher::Event<K> {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("a watcher event within 15 s")
            .expect("the watcher stream does not end");
        if let Ok(event) = item {
            return event;
        }
    }
}

/// A short description of a watcher event, for comparisons.
fn describe(event: &watcher::Event<Node>) -> String {
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(n) => format!("InitApply {}", n.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(n) => format!("Apply {}", n.name_any()),
        watcher::Event::Delete(n) => format!("Delete {}", n.name_any()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watcher_sees_changes_and_relists_after_410_expired() {
    let srv = FakeApiServer::start_with(Options {
        bookmark_every: Duration::from_millis(200),
        ..Options::default()
    })
    .unwrap();
    srv.create(node("n1"));
    let nodes: Api<Node> = Api::all(client(&srv, true).await);
    let stream = watcher(nodes, watcher::Config::default().timeout(10)).default_backoff();
    let mut stream = pin!(stream);

    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(describe(&next(&mut stream).await));
    }
    assert_eq!(seen, ["Init", "InitApply n1", "InitDone"]);

    srv.create(node("n2"));
    assert_eq!(describe(&next(&mut stream).await), "Apply n2");
    srv.patch(
        "v1",
        "Node",
        None,
        "n1",
        json!({"spec": {"unschedulable": true}}),
    );
    match next(&mut stream).await {
        watcher::Event::Apply(n) => {
            assert_eq!(n.name_any(), "n1");
            assert_eq!(n.spec.unwrap().unschedulable, Some(true));
        }
        other => panic!("expected Apply n1, got {}", describe(&other)),
    }
    srv.delete("v1", "Node", None, "n2");
    assert_eq!(describe(&next(&mut stream).await), "Delete n2");

    // The API goes down (the watch is cut), a node appears meanwhile and the history is
    // compacted: the watcher's resourceVersion has expired when it comes back, so it must
    // re-list (410 Expired) and find n3 in the new list.
    srv.set_unavailable(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.create(node("n3"));
    srv.compact();
    srv.set_unavailable(false);
    let mut seen = Vec::new();
    loop {
        let e = describe(&next(&mut stream).await);
        let done = e == "InitDone";
        seen.push(e);
        if done {
            break;
        }
    }
    assert_eq!(seen, ["Init", "InitApply n1", "InitApply n3", "InitDone"]);

    let requests = srv.requests();
    let lists = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/nodes?") && !r.contains("watch="))
        .count();
    assert_eq!(lists, 2, "one list, one re-list: {requests:#?}");
    assert!(
        requests
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn kube_lease_replace_with_a_stale_version_is_a_conflict() {
    let srv = FakeApiServer::start().unwrap();
    let leases: Api<Lease> = Api::default_namespaced(client(&srv, true).await);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("edge-ota-upgrade".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec::default()),
    };
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("edge"));

    let take = |holder: &str| {
        let mut l = created.clone();
        l.spec.as_mut().unwrap().holder_identity = Some(holder.into());
        l
    };
    let pp = PostParams::default();
    let won = leases
        .replace("edge-ota-upgrade", &pp, &take("node-a"))
        .await
        .unwrap();
    assert_eq!(won.spec.unwrap().holder_identity.as_deref(), Some("node-a"));
    match leases
        .replace("edge-ota-upgrade", &pp, &take("node-b"))
        .await
    {
        Err(kube::Error::Api(s)) => assert!(s.code == 409 && s.is_conflict(), "{s:?}"),
        other => panic!("expected a 409 Conflict, got {other:?}"),
    }
    match leases.create(&pp, &lease).await {
        Err(kube::Error::Api(s)) => assert!(s.is_already_exists(), "{s:?}"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_eviction_is_refused_under_an_exhausted_pdb() {
    let srv = FakeApiServer::start().unwrap();
    srv.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "edge", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running"}}));
    srv.create(
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web", "namespace": "edge"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "web"}}},
        "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1}}),
    );
    let pods: Api<Pod> = Api::default_namespaced(client(&srv, false).await);
    match pods.evict("web", &EvictParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(
                (s.code, s.reason.as_str()),
                (429, "TooManyRequests"),
                "{s:?}"
            )
        }
        other => panic!("expected 429, got {other:?}"),
    }
    srv.patch(
        "policy/v1",
        "PodDisruptionBudget",
        Some("edge"),
        "web",
        json!({"status": {"disruptionsAllowed": 1}}),
    );
    let status = pods.evict("web", &EvictParams::default()).await.unwrap();
    assert!(status.is_success(), "{status:?}");
    assert!(pods.get_opt("web").await.unwrap().is_none());
    // Listing the pods of a node, as a drain does.
    let on_node = pods
        .list(&kube::api::ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert!(on_node.items.is_empty());
}

#[tokio::test]
async fn kube_osupdate_status_subresource_and_api_down() {
    let srv = FakeApiServer::start().unwrap();
    let plain = client(&srv, false).await;
    let ar = ApiResource {
        group: "edge-ota.io".into(),
        version: "v1alpha1".into(),
        api_version: "edge-ota.io/v1alpha1".into(),
        kind: "OSUpdate".into(),
        plural: "osupdates".into(),
    };
    let updates: Api<DynamicObject> = Api::all_with(plain, &ar);
    // Server-side apply creates it (the fake treats apply as a merge patch).
    let applied = updates
        .patch(
            "fleet",
            &PatchParams::apply("edge-ota").force(),
            &Patch::Apply(
                json!({"apiVersion": "edge-ota.io/v1alpha1", "kind": "OSUpdate",
                "metadata": {"name": "fleet"}, "spec": {"version": "2.0.0"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(applied.data["spec"]["version"], "2.0.0");
    let patched = updates
        .patch_status(
            "fleet",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Rolling"}, "spec": {"version": "6.6.6"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["phase"], "Rolling");
    assert_eq!(patched.data["spec"]["version"], "2.0.0");
    assert_eq!(patched.metadata.generation, Some(1));

    srv.set_unavailable(true);
    match updates.get("fleet").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 503, "{s:?}"),
        other => panic!("expected 503, got {other:?}"),
    }
    // kube's default retry rides out a short outage: the same GET succeeds once the API is
    // back, after a few 503s.
    let retrying: Api<DynamicObject> = Api::all_with(client(&srv, true).await, &ar);
    let srv = std::sync::Arc::new(srv);
    let back = srv.clone();
    let up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        back.set_unavailable(false);
    });
    let before = srv.requests().len();
    let got = retrying.get("fleet").await.unwrap();
    assert_eq!(got.data["status"]["phase"], "Rolling");
    up.await.unwrap();
    assert!(srv.requests().len() - before > 2, "{:#?}", srv.requests());
}
