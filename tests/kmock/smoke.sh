#!/usr/bin/env bash
# Smoke test: the real kubectl against the emulated API server (tests/kmock/apiserver.py).
# Starts the server, writes a kubeconfig for it, runs the kubectl commands the operator's users
# run, and prints each command with its output.  Ends with "N passed, N failed"; exits 1 on a
# failure.  Needs: tests/kmock/install.sh (the venv) and kubectl on PATH.
#   usage: tests/kmock/smoke.sh [-v]        (-v: also print the server's request log)
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${KMOCK_PYTHON:-$ROOT/.venv-kmock/bin/python}
VERBOSE=${1:-}
for tool in kubectl curl; do
  command -v $tool >/dev/null || { echo "smoke.sh: $tool not found on PATH" >&2; exit 1; }
done
[[ -x $PY ]] || { echo "smoke.sh: $PY missing; run tests/kmock/install.sh" >&2; exit 1; }

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
  exec 3>&- 2>/dev/null || true                      # EOF on the server's stdin: it exits by itself
  [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# The server's stdin is a FIFO this script holds open on fd 3: if the script dies (even by
# SIGKILL) the FIFO closes and the server exits -- the same contract a Rust harness uses.
mkfifo "$WORK/stdin"
"$PY" "$HERE/apiserver.py" --port 0 --verbose <"$WORK/stdin" >"$WORK/stdout" 2>"$WORK/server.log" &
SERVER_PID=$!
exec 3>"$WORK/stdin"
for _ in $(seq 200); do
  grep -q '^READY ' "$WORK/stdout" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "apiserver died:"; cat "$WORK/server.log"; exit 1; }
  sleep 0.05
done
PORT=$(awk '/^READY /{print $2}' "$WORK/stdout")
[[ -n $PORT ]] || { echo "apiserver never printed READY"; cat "$WORK/server.log"; exit 1; }
BASE=http://127.0.0.1:$PORT

cat >"$WORK/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kmock
  cluster:
    server: $BASE
contexts:
- name: kmock
  context:
    cluster: kmock
    user: kmock
    namespace: default
current-context: kmock
users:
- name: kmock
  user: {}
EOF
export KUBECONFIG=$WORK/kubeconfig
export KUBECACHEDIR=$WORK/kube-cache   # discovery/openapi cache: not ~/.kube/cache
cd "$ROOT"

PASSED=0 FAILED=0
# run EXPECT CMD...: EXPECT is "ok" (exit 0) or "fail" (non-zero exit expected)
run() {
  local expect=$1; shift
  printf '\n$ %s\n' "$*"
  "$@" >"$WORK/out" 2>&1
  local rc=$?
  sed 's/^/  /' "$WORK/out"; [[ -s $WORK/out && $(tail -c1 "$WORK/out") != '' ]] && echo
  if [[ $expect == ok && $rc == 0 ]] || [[ $expect == fail && $rc != 0 ]]; then
    PASSED=$((PASSED + 1))
  else
    FAILED=$((FAILED + 1)); echo "  ^^^ FAILED (exit $rc, expected $expect)"
  fi
}
# expect_out PATTERN: the previous command's output matches the grep -E pattern
expect_out() {
  if grep -Eq -- "$1" "$WORK/out"; then PASSED=$((PASSED + 1))
  else FAILED=$((FAILED + 1)); echo "  ^^^ FAILED: output does not match /$1/"; fi
}

echo "apiserver on $BASE (kmock $("$PY" -c 'import kmock; print(kmock.__version__)'))"
run ok kubectl version
expect_out 'Server Version: v1\.32'
run ok kubectl api-resources --api-group=profilesync.dev
expect_out 'warehouseconnections +whc +profilesync.dev/v1alpha1 +true +WarehouseConnection'
expect_out 'selectivesyncs +ssync'
run ok kubectl apply -f crds/
expect_out 'customresourcedefinition.apiextensions.k8s.io/warehouseconnections.profilesync.dev (configured|unchanged)'
run ok kubectl get crd
run ok kubectl apply -f deploy/examples/postgres.yaml
expect_out 'warehouseconnection.profilesync.dev/postgres created'
run ok kubectl get whc
expect_out '^ *postgres +postgres +profiles_sync +false'
run ok kubectl get whc -o yaml
expect_out 'resourceVersion: "[0-9]+"'
expect_out 'uid: [0-9a-f-]{36}'
run ok kubectl get ssync
expect_out '^ *postgres +postgres'
run ok kubectl get profilesync
expect_out 'warehouseconnection.profilesync.dev/postgres'
expect_out 'selectivesync.profilesync.dev/postgres'
run ok kubectl get secret postgres-warehouse -o 'jsonpath={.data.password}'
expect_out '^Y2hhbmdlLW1l$'
run ok kubectl patch whc postgres --type merge -p '{"spec":{"suspend":true}}'
run ok kubectl get whc postgres -o 'jsonpath={.spec.suspend} generation={.metadata.generation}'
expect_out 'true generation=2'
run ok kubectl annotate whc postgres profilesync.dev/sync-now=now
run ok kubectl get whc postgres -o 'jsonpath={.metadata.annotations.profilesync\.dev/sync-now} generation={.metadata.generation}'
expect_out 'now generation=2'

WHC=$BASE/apis/profilesync.dev/v1alpha1/namespaces/default/warehouseconnections
run ok curl -sS --fail-with-body -X PATCH -H 'Content-Type: application/merge-patch+json' "$WHC/postgres/status" \
  -d '{"status":{"observedGeneration":2,"conditions":[{"type":"Ready","status":"True","reason":"Synced","message":"synced","lastTransitionTime":"2025-01-01T00:00:00Z"}]}}'
expect_out '"observedGeneration": 2'
RV=$(kubectl get whc postgres -o 'jsonpath={.metadata.resourceVersion}')
run ok curl -sS --fail-with-body -X PUT -H 'Content-Type: application/json' "$WHC/postgres/status" \
  -d '{"apiVersion":"profilesync.dev/v1alpha1","kind":"WarehouseConnection","metadata":{"name":"postgres","resourceVersion":"'"$RV"'"},"status":{"observedGeneration":2,"conditions":[{"type":"Ready","status":"True","reason":"Synced","message":"synced again","lastTransitionTime":"2025-01-01T00:00:00Z"}]}}'
expect_out '"message": "synced again"'
# the same PUT again, now with a stale resourceVersion: 409 Conflict
run fail curl -sS --fail-with-body -X PUT -H 'Content-Type: application/json' "$WHC/postgres/status" \
  -d '{"apiVersion":"profilesync.dev/v1alpha1","kind":"WarehouseConnection","metadata":{"name":"postgres","resourceVersion":"'"$RV"'"},"status":{}}'
expect_out '"code": 409'
run ok kubectl get whc postgres
expect_out 'postgres +postgres +profiles_sync +true +True'

run ok kubectl apply --dry-run=client -f deploy/examples/postgres.yaml
expect_out 'warehouseconnection.profilesync.dev/postgres (configured|unchanged) \(dry run\)'
run ok kubectl apply --dry-run=server -f deploy/examples/postgres.yaml
expect_out 'warehouseconnection.profilesync.dev/postgres (configured|unchanged) \(server dry run\)'
run ok kubectl get whc postgres -o 'jsonpath={.spec.suspend}'
expect_out '^true$'
run ok kubectl apply --server-side --force-conflicts -f deploy/examples/postgres.yaml
expect_out 'warehouseconnection.profilesync.dev/postgres serverside-applied'
sed 's/^  schedule: 1h$/  schedule: 1h\n  notAField: 1/' deploy/examples/postgres.yaml >"$WORK/typo.yaml"
run fail kubectl apply -f "$WORK/typo.yaml"
expect_out 'strict decoding error: unknown field "spec.notAField"'
run ok kubectl get whc -l 'app notin (x)' --field-selector metadata.name=postgres -o name
expect_out 'warehouseconnection.profilesync.dev/postgres'
run ok kubectl delete whc postgres
expect_out 'warehouseconnection.profilesync.dev "postgres" deleted'
run ok kubectl get whc
expect_out 'No resources found'
run ok kubectl delete -f deploy/examples/postgres.yaml --ignore-not-found

if [[ $VERBOSE == -v ]]; then
  echo; echo "--- server request log"; cat "$WORK/server.log"
fi
echo
echo "smoke: $PASSED passed, $FAILED failed"
[[ $FAILED == 0 ]]
