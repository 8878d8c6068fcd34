#!/usr/bin/env bash
# The test suite (after scripts/setup.sh). Docker tests start a Docker engine themselves when one is installed
# but not running (tests/docker_fixtures.py), and skip with a reason when Docker is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TRITON_INTERPRET=1
python -m pytest -q tests "$@"
