//! The fake Kubernetes API server on the wire: raw HTTP/1.1 requests, as any client sends them,
//! and the answers the Kubernetes API conventions prescribe.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edge_ota_testkit::kube_api::{FakeApiServer, Options};
use serde_json::{json, Value};

const MERGE: &str = "application/merge-patch+json";

/// One request on a fresh connection; the status code and the JSON body.
fn call(
    srv: &FakeApiServer,
    method: &str,
    path: &str,
    ct: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(srv.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\nAuthorization: Bearer t\r\n\
         Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let (code, chunked) = read_head(&mut r);
    let mut raw = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut r) {
            raw.extend(chunk);
        }
    } else {
        r.read_to_end(&mut raw).unwrap();
    }
    (code, serde_json::from_slice(&raw).unwrap_or(Value::Null))
}

fn get(srv: &FakeApiServer, path: &str) -> (u16, Value) {
    call(srv, "GET", path, "application/json", None)
}

fn post(srv: &FakeApiServer, path: &str, body: Value) -> (u16, Value) {
    call(srv, "POST", path, "application/json", Some(body))
}

fn read_head(r: &mut impl BufRead) -> (u16, bool) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let code = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            return (code, chunked);
        }
        let l = line.to_ascii_lowercase();
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
    }
}

/// The next chunk of a chunked body; None at its end (or when the connection is cut).
fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim(), 16).ok()?;
    let mut data = vec![0; size + 2];
    r.read_exact(&mut data).ok()?;
    data.truncate(size);
    (size > 0).then_some(data)
}

/// A watch stream read event by event.
struct Watch {
    r: BufReader<TcpStream>,
    pending: Vec<u8>,
}

impl Watch {
    fn open(srv: &FakeApiServer, path_and_query: &str) -> Watch {
        let mut s = TcpStream::connect(srv.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path_and_query} HTTP/1.1\r\nHost: fake\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let (code, chunked) = read_head(&mut r);
        assert_eq!(
            (code, chunked),
            (200, true),
            "a watch is a 200 chunked stream"
        );
        Watch {
            r,
            pending: Vec::new(),
        }
    }

    /// The next event, None when the stream ends (or is cut).
    fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).expect("one JSON event a line"));
            }
            let chunk = read_chunk(&mut self.r)?;
            self.pending.extend(chunk);
        }
    }

    /// The next event that is not a BOOKMARK.
    fn next_change(&mut self) -> Option<Value> {
        loop {
            let e = self.next()?;
            if e["type"] != "BOOKMARK" {
                return Some(e);
            }
        }
    }
}

fn rv(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

fn node(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {}})
}

fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
           "status": {"phase": "Running"}})
}

fn lease(name: &str, holder: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": name}, "spec": {"holderIdentity": holder}})
}

fn assert_status(body: &Value, code: u16, reason: &str) {
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["apiVersion"], "v1", "{body}");
    assert_eq!(body["status"], "Failure", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/edge/leases";

#[test]
fn lease_put_with_a_stale_resource_version_gets_409_conflict() {
    let srv = FakeApiServer::start().unwrap();
    let (code, created) = post(&srv, LEASES, lease("upgrade", ""));
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["metadata"]["namespace"], "edge");
    assert!(created["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty()));
    assert!(created["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // Two agents read the same version and both try to take the lease.
    let mut a = created.clone();
    a["spec"]["holderIdentity"] = json!("node-a");
    let mut b = created.clone();
    b["spec"]["holderIdentity"] = json!("node-b");
    let (code, won) = call(
        &srv,
        "PUT",
        &format!("{LEASES}/upgrade"),
        "application/json",
        Some(a),
    );
    assert_eq!(code, 200, "{won}");
    assert!(rv(&won).parse::<u64>().unwrap() > rv(&created).parse::<u64>().unwrap());
    let (code, lost) = call(
        &srv,
        "PUT",
        &format!("{LEASES}/upgrade"),
        "application/json",
        Some(b),
    );
    assert_eq!(code, 409, "{lost}");
    assert_status(&lost, 409, "Conflict");
    assert!(lost["message"]
        .as_str()
        .unwrap()
        .contains("the object has been modified"));
    assert_eq!(
        srv.get("coordination.k8s.io/v1", "Lease", Some("edge"), "upgrade")
            .unwrap()["spec"]["holderIdentity"],
        "node-a"
    );

    // A merge patch carrying the stale resourceVersion is refused the same way; the fresh one
    // goes through.
    let stale = json!({"metadata": {"resourceVersion": rv(&created)}, "spec": {"holderIdentity": "node-b"}});
    let (code, body) = call(
        &srv,
        "PATCH",
        &format!("{LEASES}/upgrade"),
        MERGE,
        Some(stale),
    );
    assert_eq!(code, 409, "{body}");
    let fresh =
        json!({"metadata": {"resourceVersion": rv(&won)}, "spec": {"holderIdentity": null}});
    let (code, body) = call(
        &srv,
        "PATCH",
        &format!("{LEASES}/upgrade"),
        MERGE,
        Some(fresh),
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body["spec"].get("holderIdentity").is_none(),
        "null removes: {body}"
    );

    // A delete with a stale precondition is refused too.
    let pre = json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": rv(&won)}});
    let (code, body) = call(
        &srv,
        "DELETE",
        &format!("{LEASES}/upgrade"),
        "application/json",
        Some(pre),
    );
    assert_eq!(code, 409, "{body}");
}

#[test]
fn create_conflicts_not_found_and_invalid_bodies_are_status_errors() {
    let srv = FakeApiServer::start().unwrap();
    assert_eq!(post(&srv, "/api/v1/nodes", node("n1", json!({}))).0, 201);
    let (code, body) = post(&srv, "/api/v1/nodes", node("n1", json!({})));
    assert_eq!(code, 409);
    assert_status(&body, 409, "AlreadyExists");
    let (code, body) = get(&srv, "/api/v1/nodes/ghost");
    assert_status(&body, 404, "NotFound");
    assert_eq!(
        (code, body["message"].as_str().unwrap()),
        (404, "nodes \"ghost\" not found")
    );
    let (code, body) = post(&srv, "/api/v1/nodes", json!([1, 2]));
    assert_eq!(code, 422);
    assert_status(&body, 422, "Invalid");
    // A fetched object posted again (resourceVersion set) is refused, as by the real storage.
    let mut again = srv.get("v1", "Node", None, "n1").unwrap();
    again["metadata"]["name"] = json!("n2");
    assert_eq!(post(&srv, "/api/v1/nodes", again).0, 500);
    // generateName
    let gen = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"generateName": "edge-"}});
    let (code, body) = post(&srv, "/api/v1/nodes", gen);
    assert_eq!(code, 201);
    let name = body["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("edge-") && name.len() == 10, "{name}");
    // Unknown resources and paths.
    assert_eq!(get(&srv, "/api/v1/namespaces/x/configmaps").0, 404);
    assert_eq!(
        get(&srv, "/apis/edge-ota.io/v1alpha1/namespaces/x/osupdates/u").0,
        404
    );
}

#[test]
fn list_is_a_typed_list_filtered_by_label_and_field_selectors() {
    let srv = FakeApiServer::start().unwrap();
    srv.create(pod(
        "edge",
        "web-1",
        "n1",
        json!({"app": "web", "tier": "front"}),
    ));
    srv.create(pod("edge", "web-2", "n2", json!({"app": "web"})));
    srv.create(pod("edge", "db-1", "n1", json!({"app": "db"})));
    srv.create(pod("other", "web-3", "n1", json!({"app": "web"})));

    let names = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (code, all) = get(&srv, "/api/v1/pods?limit=500");
    assert_eq!(code, 200);
    assert_eq!(
        (all["kind"].as_str(), all["apiVersion"].as_str()),
        (Some("PodList"), Some("v1"))
    );
    assert_eq!(rv(&all), srv.resource_version().to_string());
    assert_eq!(names(&all), ["db-1", "web-1", "web-2", "web-3"]);
    assert!(all["metadata"].get("continue").is_none());

    let (_, edge) = get(&srv, "/api/v1/namespaces/edge/pods");
    assert_eq!(names(&edge), ["db-1", "web-1", "web-2"]);
    let (_, web) = get(
        &srv,
        "/api/v1/namespaces/edge/pods?labelSelector=app%3Dweb%2Ctier%21%3Dfront",
    );
    assert_eq!(names(&web), ["web-2"]);
    let (_, on_n1) = get(&srv, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1");
    assert_eq!(names(&on_n1), ["db-1", "web-1", "web-3"]);
    let (_, both) = get(&srv, "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1%2Cmetadata.namespace%3Dedge&labelSelector=app+in+%28web%2Cdb%29");
    assert_eq!(names(&both), ["db-1", "web-1"]);
    let (_, by_name) = get(
        &srv,
        "/api/v1/namespaces/edge/pods?fieldSelector=metadata.name%3Dweb-2",
    );
    assert_eq!(names(&by_name), ["web-2"]);
}

#[test]
fn watch_from_a_resource_version_gets_exactly_the_later_events_in_order() {
    let srv = FakeApiServer::start().unwrap();
    srv.create(node("n1", json!({})));
    let from = srv.resource_version();
    srv.patch(
        "v1",
        "Node",
        None,
        "n1",
        json!({"spec": {"unschedulable": true}}),
    );
    srv.create(node("n2", json!({})));
    srv.delete("v1", "Node", None, "n1");
    let mut w = Watch::open(
        &srv,
        &format!("/api/v1/nodes?watch=true&resourceVersion={from}&timeoutSeconds=30"),
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = w.next_change().unwrap();
        seen.push((
            e["type"].as_str().unwrap().to_string(),
            e["object"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
            rv(&e["object"]).parse::<u64>().unwrap(),
        ));
    }
    let kinds: Vec<_> = seen.iter().map(|(t, n, _)| format!("{t} {n}")).collect();
    assert_eq!(kinds, ["MODIFIED n1", "ADDED n2", "DELETED n1"]);
    assert_eq!(
        seen.iter().map(|s| s.2).collect::<Vec<_>>(),
        [from + 1, from + 2, from + 3]
    );
    // And live: an event after the watch started.
    srv.patch(
        "v1",
        "Node",
        None,
        "n2",
        json!({"metadata": {"labels": {"x": "y"}}}),
    );
    let e = w.next_change().unwrap();
    assert_eq!(
        (e["type"].as_str(), rv(&e["object"])),
        (Some("MODIFIED"), (from + 4).to_string())
    );
    // A patch that changes nothing is no write: no event, no new resourceVersion.
    srv.patch(
        "v1",
        "Node",
        None,
        "n2",
        json!({"metadata": {"labels": {"x": "y"}}}),
    );
    assert_eq!(srv.resource_version(), from + 4);
}

#[test]
fn watch_without_resource_version_starts_with_the_current_objects_as_added() {
    let srv = FakeApiServer::start().unwrap();
    srv.create(node("a", json!({})));
    srv.create(node("b", json!({})));
    for rv_param in ["", "&resourceVersion=0"] {
        let mut w = Watch::open(&srv, &format!("/api/v1/nodes?watch=1{rv_param}"));
        for name in ["a", "b"] {
            let e = w.next_change().unwrap();
            assert_eq!(
                (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
                (Some("ADDED"), Some(name))
            );
        }
    }
    // The streaming list: initial objects, then a bookmark that marks their end.
    let mut w = Watch::open(&srv, "/api/v1/nodes?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true");
    assert_eq!(w.next().unwrap()["type"], "ADDED");
    assert_eq!(w.next().unwrap()["type"], "ADDED");
    let end = w.next().unwrap();
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[test]
fn watch_from_a_compacted_resource_version_gets_410_expired() {
    let srv = FakeApiServer::start_with(Options {
        event_history: 3,
        ..Options::default()
    })
    .unwrap();
    srv.create(node("n", json!({})));
    let old = srv.resource_version();
    for i in 0..5 {
        srv.patch(
            "v1",
            "Node",
            None,
            "n",
            json!({"metadata": {"labels": {"i": i.to_string()}}}),
        );
    }
    let mut w = Watch::open(
        &srv,
        &format!("/api/v1/nodes?watch=true&resourceVersion={old}"),
    );
    let e = w.next().unwrap();
    assert_eq!(e["type"], "ERROR");
    assert_status(&e["object"], 410, "Expired");
    assert!(w.next().is_none(), "the stream ends after the error");
    // Within the kept history it works.
    let recent = srv.resource_version() - 2;
    let mut w = Watch::open(
        &srv,
        &format!("/api/v1/nodes?watch=true&resourceVersion={recent}"),
    );
    assert_eq!(w.next().unwrap()["type"], "MODIFIED");
    // compact() forgets everything; an exact list of an old version is gone too.
    srv.compact();
    let mut w = Watch::open(
        &srv,
        &format!("/api/v1/nodes?watch=true&resourceVersion={recent}"),
    );
    assert_eq!(w.next().unwrap()["object"]["code"], 410);
    let (code, body) = get(
        &srv,
        &format!("/api/v1/nodes?resourceVersion={recent}&resourceVersionMatch=Exact"),
    );
    assert_eq!(code, 410);
    assert_status(&body, 410, "Expired");
}

#[test]
fn bookmarks_arrive_and_the_watch_ends_at_its_timeout() {
    let srv = FakeApiServer::start_with(Options {
        bookmark_every: Duration::from_millis(100),
        ..Options::default()
    })
    .unwrap();
    srv.create(pod("edge", "p", "n1", json!({})));
    let now = srv.resource_version();
    let started = Instant::now();
    let mut w = Watch::open(&srv, &format!("/api/v1/namespaces/edge/pods?watch=true&resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=1"));
    let mut bookmarks = 0;
    while let Some(e) = w.next() {
        assert_eq!(e["type"], "BOOKMARK", "{e}");
        assert_eq!(e["object"]["kind"], "Pod");
        assert_eq!(e["object"]["apiVersion"], "v1");
        assert_eq!(rv(&e["object"]), now.to_string());
        assert!(e["object"].get("spec").is_none());
        bookmarks += 1;
    }
    let took = started.elapsed();
    assert!(bookmarks >= 5, "{bookmarks} bookmarks in a second");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Without allowWatchBookmarks there are none.
    let mut w = Watch::open(
        &srv,
        &format!("/api/v1/namespaces/edge/pods?watch=true&resourceVersion={now}&timeoutSeconds=1"),
    );
    assert!(w.next().is_none());
}

#[test]
fn watches_filter_by_selectors_and_namespace() {
    let srv = FakeApiServer::start().unwrap();
    let now = srv.resource_version();
    let mut w = Watch::open(
        &srv,
        &format!(
            "/api/v1/namespaces/edge/pods?watch=true&resourceVersion={now}&labelSelector=app%3Dweb"
        ),
    );
    srv.create(pod("other", "w0", "n1", json!({"app": "web"})));
    srv.create(pod("edge", "db", "n1", json!({"app": "db"})));
    srv.create(pod("edge", "w1", "n1", json!({"app": "web"})));
    // Stops matching: the watch sees it go; starts matching: it comes.
    srv.patch(
        "v1",
        "Pod",
        Some("edge"),
        "w1",
        json!({"metadata": {"labels": {"app": "old"}}}),
    );
    srv.patch(
        "v1",
        "Pod",
        Some("edge"),
        "db",
        json!({"metadata": {"labels": {"app": "web"}}}),
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = w.next_change().unwrap();
        seen.push(format!(
            "{} {}",
            e["type"].as_str().unwrap(),
            e["object"]["metadata"]["name"].as_str().unwrap()
        ));
    }
    assert_eq!(seen, ["ADDED w1", "DELETED w1", "ADDED db"]);
}

#[test]
fn status_subresource_is_separate_from_the_object() {
    let srv = FakeApiServer::start().unwrap();
    let base = "/apis/edge-ota.io/v1alpha1/osupdates";
    let update = json!({"apiVersion": "edge-ota.io/v1alpha1", "kind": "OSUpdate",
        "metadata": {"name": "u1"}, "spec": {"version": "1.2.0"}, "status": {"phase": "Bogus"}});
    let (code, created) = post(&srv, base, update);
    assert_eq!(code, 201, "{created}");
    assert!(
        created.get("status").is_none(),
        "status is ignored on create: {created}"
    );
    assert_eq!(created["metadata"]["generation"], 1);

    // The object's endpoint changes spec (generation bumped), never status.
    let (code, body) = call(
        &srv,
        "PATCH",
        &format!("{base}/u1"),
        MERGE,
        Some(json!({"spec": {"version": "1.3.0"}, "status": {"phase": "Done"}})),
    );
    assert_eq!(code, 200);
    assert_eq!(
        (
            body["spec"]["version"].as_str(),
            body["metadata"]["generation"].as_i64()
        ),
        (Some("1.3.0"), Some(2))
    );
    assert!(body.get("status").is_none(), "{body}");

    // /status changes status only; generation stays.
    let (code, body) = call(
        &srv,
        "PATCH",
        &format!("{base}/u1/status"),
        "application/strategic-merge-patch+json",
        Some(
            json!({"spec": {"version": "9.9.9"}, "status": {"phase": "Installing", "nodes": {"n1": "Done"}}}),
        ),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"]["phase"], "Installing");
    assert_eq!(
        (
            body["spec"]["version"].as_str(),
            body["metadata"]["generation"].as_i64()
        ),
        (Some("1.3.0"), Some(2))
    );

    // PUT on the object keeps the stored status; PUT on /status keeps the stored spec.
    let mut obj = body.clone();
    obj["status"] = json!({"phase": "Failed"});
    obj["spec"]["version"] = json!("1.4.0");
    let (code, put) = call(
        &srv,
        "PUT",
        &format!("{base}/u1"),
        "application/json",
        Some(obj.clone()),
    );
    assert_eq!(code, 200, "{put}");
    assert_eq!(
        (
            put["status"]["phase"].as_str(),
            put["spec"]["version"].as_str()
        ),
        (Some("Installing"), Some("1.4.0"))
    );
    obj["metadata"]["resourceVersion"] = put["metadata"]["resourceVersion"].clone();
    obj["spec"]["version"] = json!("0.0.1");
    let (code, put) = call(
        &srv,
        "PUT",
        &format!("{base}/u1/status"),
        "application/json",
        Some(obj.clone()),
    );
    assert_eq!(code, 200, "{put}");
    assert_eq!(
        (
            put["status"]["phase"].as_str(),
            put["spec"]["version"].as_str()
        ),
        (Some("Failed"), Some("1.4.0"))
    );

    // Custom resources refuse an update without resourceVersion.
    let mut unconditional = put.clone();
    unconditional["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (code, body) = call(
        &srv,
        "PUT",
        &format!("{base}/u1"),
        "application/json",
        Some(unconditional),
    );
    assert_eq!(code, 422, "{body}");
    assert_status(&body, 422, "Invalid");

    // JSON patch works on /status too; leases have no status subresource.
    let (code, body) = call(
        &srv,
        "PATCH",
        &format!("{base}/u1/status"),
        "application/json-patch+json",
        Some(
            json!([{"op": "test", "path": "/status/phase", "value": "Failed"}, {"op": "replace", "path": "/status/phase", "value": "Retrying"}]),
        ),
    );
    assert_eq!(
        (code, body["status"]["phase"].as_str()),
        (200, Some("Retrying"))
    );
    srv.create(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l", "namespace": "edge"}}));
    assert_eq!(get(&srv, &format!("{LEASES}/l/status")).0, 404);
}

#[test]
fn eviction_is_refused_with_429_under_an_exhausted_pdb_and_deletes_otherwise() {
    let srv = FakeApiServer::start().unwrap();
    srv.create(pod("edge", "web-1", "n1", json!({"app": "web"})));
    srv.create(pod("edge", "web-2", "n1", json!({"app": "web"})));
    srv.create(pod("edge", "free", "n1", json!({"app": "batch"})));
    srv.create(json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web-pdb", "namespace": "edge"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
        "status": {"disruptionsAllowed": 1, "currentHealthy": 2, "desiredHealthy": 1, "expectedPods": 2}}));
    let now = srv.resource_version();
    let mut w = Watch::open(
        &srv,
        &format!("/api/v1/namespaces/edge/pods?watch=true&resourceVersion={now}"),
    );
    let eviction = |name: &str| json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": "edge"}});
    let evict = |name: &str| {
        post(
            &srv,
            &format!("/api/v1/namespaces/edge/pods/{name}/eviction"),
            eviction(name),
        )
    };

    let (code, body) = evict("web-1");
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["status"], "Success");
    let e = w.next_change().unwrap();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("web-1"))
    );
    let pdb = srv
        .get("policy/v1", "PodDisruptionBudget", Some("edge"), "web-pdb")
        .unwrap();
    assert_eq!(pdb["status"]["disruptionsAllowed"], 0);

    let (code, body) = evict("web-2");
    assert_eq!(code, 429, "{body}");
    assert_status(&body, 429, "TooManyRequests");
    assert_eq!(
        body["message"],
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    assert_eq!(body["details"]["causes"][0]["reason"], "DisruptionBudget");
    assert!(srv.get("v1", "Pod", Some("edge"), "web-2").is_some());

    // Not selected by the PDB: evicted; gone: 404.
    assert_eq!(evict("free").0, 201);
    let (code, body) = evict("free");
    assert_eq!(code, 404);
    assert_status(&body, 404, "NotFound");
    let e = w.next_change().unwrap();
    assert_eq!(e["object"]["metadata"]["name"], "free");
    let verbs: Vec<_> = srv
        .history()
        .iter()
        .filter(|h| !h.by_test)
        .map(|h| format!("{} {}", h.verb, h.name))
        .collect();
    assert_eq!(verbs, ["patch web-pdb", "evict web-1", "evict free"]);
}

#[test]
fn api_down_answers_503_and_cuts_open_watches() {
    let srv = FakeApiServer::start().unwrap();
    srv.create(node("n1", json!({})));
    let now = srv.resource_version();
    let mut w = Watch::open(
        &srv,
        &format!("/api/v1/nodes?watch=true&resourceVersion={now}"),
    );
    srv.set_unavailable(true);
    assert!(w.next().is_none(), "the watch is cut");
    let (code, body) = get(&srv, "/api/v1/nodes/n1");
    assert_eq!(code, 503);
    assert_status(&body, 503, "ServiceUnavailable");
    // The test's hand still works while the API is down.
    srv.patch(
        "v1",
        "Node",
        None,
        "n1",
        json!({"spec": {"unschedulable": true}}),
    );
    srv.set_unavailable(false);
    let (code, body) = get(&srv, "/api/v1/nodes/n1");
    assert_eq!(
        (code, body["spec"]["unschedulable"].as_bool()),
        (200, Some(true))
    );
    let reqs = srv.requests();
    assert_eq!(
        reqs[0],
        format!("GET /api/v1/nodes?watch=true&resourceVersion={now}")
    );
    assert_eq!(
        reqs[1..],
        [
            "GET /api/v1/nodes/n1".to_string(),
            "GET /api/v1/nodes/n1".to_string()
        ]
    );
}

#[test]
fn history_tells_how_many_nodes_were_cordoned_at_once() {
    let srv = FakeApiServer::start().unwrap();
    for n in ["n1", "n2", "n3"] {
        srv.create(node(n, json!({})));
    }
    let cordon = |n: &str, on: bool| {
        let (code, body) = call(
            &srv,
            "PATCH",
            &format!("/api/v1/nodes/{n}"),
            "application/strategic-merge-patch+json",
            Some(json!({"spec": {"unschedulable": on}})),
        );
        assert_eq!(code, 200, "{body}");
    };
    cordon("n1", true);
    cordon("n1", false);
    cordon("n2", true);
    assert_eq!(srv.max_cordoned_at_once(), 1);
    cordon("n3", true);
    assert_eq!(srv.max_cordoned_at_once(), 2);
    let h = srv.history();
    let last = h.last().unwrap();
    assert_eq!(
        (
            last.verb.as_str(),
            last.name.as_str(),
            last.unschedulable,
            last.by_test
        ),
        ("patch", "n3", Some(true), false)
    );
}

#[test]
fn kubeconfig_names_the_server_and_the_namespace() {
    let srv = FakeApiServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    srv.write_kubeconfig(&path, "edge-system").unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("server: {}", srv.url())), "{text}");
    assert!(text.contains("namespace: edge-system"), "{text}");
    assert!(text.contains("token: "), "{text}");
    // The version endpoint answers (clients probe it).
    assert_eq!(get(&srv, "/version").0, 200);
}
