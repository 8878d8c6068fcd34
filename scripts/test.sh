#!/usr/bin/env bash
# The test suite (after scripts/setup.sh; PROTEGE_DEPS=latest: in .venv-latest). Docker tests start a Docker
# engine themselves when one is installed but not running (tests/docker_fixtures.py), and skip with a reason when
# Docker is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${PROTEGE_DEPS:-lock}" = latest ]; then . .venv-latest/bin/activate; else . .venv/bin/activate; fi
export TRITON_INTERPRET=1
python -m pytest -q tests "$@"
