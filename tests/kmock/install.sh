#!/usr/bin/env bash
# Installs the emulated API server's Python environment: <repo>/.venv-kmock with
# tests/kmock/requirements.txt. Idempotent and quick when already installed.
#   usage: tests/kmock/install.sh            (VENV=/other/path to put the venv elsewhere)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${VENV:-$ROOT/.venv-kmock}
REQ=$HERE/requirements.txt
STAMP=$VENV/.requirements.sha256

want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [[ -x $VENV/bin/python && -f $STAMP && $(cat "$STAMP") == "$want" ]] \
   && "$VENV/bin/python" -c 'import kmock, yaml, jsonpatch' 2>/dev/null; then
  echo "kmock venv up to date: $VENV"
  exit 0
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: $PY is older than 3.11 (kmock needs >= 3.11)" >&2
  exit 1
fi
if [[ ! -x $VENV/bin/python ]]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    # Debian splits venv/ensurepip into python3-venv (or python3.X-venv).
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      apt-get install -y -q "python${ver}-venv" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "python${ver}-venv" >/dev/null; }
      "$PY" -m venv "$VENV"
    else
      echo "install.sh: '$PY -m venv' failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
"$VENV/bin/python" -c 'import kmock, yaml, jsonpatch; print("kmock", kmock.__version__, "installed in '"$VENV"'")'
echo "$want" > "$STAMP"
