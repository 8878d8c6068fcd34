#!/usr/bin/env bash
# The test suite (after scripts/setup.sh). Starts a Docker engine when one is installed but not running,
# so the Docker tests run; they skip with a reason when Docker is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TRITON_INTERPRET=1
python -m pytest -q tests "$@"
