#!/usr/bin/env bash
# edge-ota on a real Kubernetes cluster (kind, k3s): what the fake API server cannot prove.
#
#   scripts/k8s-e2e.sh KUBECONFIG
#
# 1. installs deploy/kubernetes (CRD + RBAC) and waits for the CRD to be established;
# 2. the API server validates the example OSUpdate against the generated schema
#    (server-side dry run) and refuses a bad one (maxUnavailable: 0, an unknown onTimeout);
# 3. the agents' identity may do exactly what docs/kubernetes.md says (kubectl auth can-i as
#    the edge-ota-agent ServiceAccount), and no more;
# 4. the Lease semaphore, cordon, PDB-refused eviction and uncordon, as the agent does them,
#    on a throwaway Node object (no kubelet: nothing is scheduled or rebooted) with kubectl.
#
# The multi-agent scenarios (tests/kubernetes.rs) run against the in-process fake API server
# only; this script does not reboot real nodes. It leaves the CRD and RBAC installed and
# removes what it created for the checks.
set -euo pipefail

kc=${1:?usage: $0 KUBECONFIG}
here=$(cd "$(dirname "$0")/.." && pwd)
k() { kubectl --kubeconfig "$kc" "$@"; }
sa=system:serviceaccount:edge-ota-system:edge-ota-agent
node=edge-ota-e2e-node
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

cleanup() {
    k delete osupdate edge-ota-e2e --ignore-not-found >/dev/null 2>&1 || true
    k -n edge-ota-e2e delete pdb db --ignore-not-found >/dev/null 2>&1 || true
    k delete namespace edge-ota-e2e --ignore-not-found --wait=false >/dev/null 2>&1 || true
    k -n edge-ota-system delete lease edge-ota-e2e-0 --ignore-not-found >/dev/null 2>&1 || true
    k delete node "$node" --ignore-not-found >/dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. install
k apply -k "$here/deploy/kubernetes" >/dev/null
k wait --for condition=established --timeout=60s crd/osupdates.edge-ota.io >/dev/null
ok "CRD and RBAC installed"

# 2. schema
k apply --dry-run=server -f "$here/deploy/kubernetes/examples/osupdate.yaml" >/dev/null
ok "example OSUpdate accepted by the API server's schema validation"
bad() {
    sed -e "$1" "$here/deploy/kubernetes/examples/osupdate.yaml" |
        k apply --dry-run=server -f - >/dev/null 2>&1 && fail "accepted: $1"
    ok "refused: $1"
}
bad 's/maxUnavailable: 1/maxUnavailable: 0/'
bad 's/onTimeout: abort/onTimeout: later/'
bad 's/timeoutSecs: 900/timeoutSecs: 1/'

# 3. RBAC: what the agent may and may not do
can() { k auth can-i --as "$sa" "$@" >/dev/null 2>&1; }
for v in "get osupdates" "watch osupdates" "patch osupdates/status" "get nodes" \
    "patch nodes" "list pods" "create pods/eviction" \
    "create leases -n edge-ota-system" "update leases -n edge-ota-system"; do
    # shellcheck disable=SC2086
    can $v || fail "the agent cannot: $v"
done
ok "the agent may do what it needs"
for v in "delete nodes" "delete pods" "patch osupdates" "create leases -n default" \
    "get secrets -n edge-ota-system" "create pods"; do
    # shellcheck disable=SC2086
    can $v && fail "the agent may: $v"
done
ok "and nothing more"

# 4. the calls the coordinator makes, as the agent's identity
as() { k --as "$sa" "$@"; }
k create -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata: {name: $node, labels: {edge-ota.io/pool: e2e}}
YAML
k create namespace edge-ota-e2e >/dev/null
now=$(date -u +%Y-%m-%dT%H:%M:%S.000000Z)
as -n edge-ota-system create -f - >/dev/null <<YAML
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: edge-ota-e2e-0}
spec: {holderIdentity: $node, leaseDurationSeconds: 30, acquireTime: "$now", renewTime: "$now"}
YAML
rv=$(k -n edge-ota-system get lease edge-ota-e2e-0 -o jsonpath='{.metadata.resourceVersion}')
as -n edge-ota-system create -f - >/dev/null 2>&1 <<YAML && fail "a second create of a held Lease succeeded"
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: edge-ota-e2e-0}
spec: {holderIdentity: other, leaseDurationSeconds: 30}
YAML
as -n edge-ota-system replace -f - >/dev/null 2>&1 <<YAML && fail "a replace with a stale resourceVersion succeeded"
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: edge-ota-e2e-0, resourceVersion: "1"}
spec: {holderIdentity: other, leaseDurationSeconds: 30}
YAML
[ "$rv" != 1 ] || fail "unexpected resourceVersion"
ok "Lease: one holder, resourceVersion-checked"
as patch node "$node" --type merge \
    -p '{"metadata":{"annotations":{"edge-ota.io/cordoned":"true"}},"spec":{"unschedulable":true}}' >/dev/null
[ "$(k get node "$node" -o jsonpath='{.spec.unschedulable}')" = true ] || fail "not cordoned"
k -n edge-ota-e2e create -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec: {nodeName: $node, containers: [{name: db, image: registry.invalid/db}]}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: db}
spec: {minAvailable: 1, selector: {matchLabels: {app: db}}}
YAML
sleep 5 # the disruption controller computes the PDB's status
code=$(as create --raw "/api/v1/namespaces/edge-ota-e2e/pods/db-0/eviction" -f - 2>&1 <<JSON || true
{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"db-0","namespace":"edge-ota-e2e"}}
JSON
)
case $code in
    *"disruption budget"* | *TooManyRequests* | *429*) ok "eviction refused by the PDB (429)" ;;
    *) fail "eviction not refused by the PDB: $code" ;;
esac
as patch node "$node" --type merge \
    -p '{"metadata":{"annotations":{"edge-ota.io/cordoned":null}},"spec":{"unschedulable":null}}' >/dev/null
[ -z "$(k get node "$node" -o jsonpath='{.spec.unschedulable}')" ] || fail "not uncordoned"
ok "cordon and uncordon as the agent"
echo "all checks passed"
