#!/usr/bin/env bash
# The test suite (after scripts/setup.sh). Starts a Docker engine when one is installed but not running,
# so the Docker tests run; they skip with a reason when Docker is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TRITON_INTERPRET=1

# Docker engine: start one (root only) for the whole run if it is installed and not answering, stop it after.
dockerd_pid=""
if command -v dockerd >/dev/null && [ "$(id -u)" = 0 ] && ! docker info >/dev/null 2>&1; then
  dockerd --bridge=none --iptables=false --ip-masq=false >/tmp/protege-dockerd.log 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || echo "warning: dockerd did not start (see /tmp/protege-dockerd.log)" >&2
fi

python -m pytest -q tests "$@"
rc=$?
if [ -n "$dockerd_pid" ]; then kill "$dockerd_pid"; wait "$dockerd_pid" 2>/dev/null; fi
exit $rc
