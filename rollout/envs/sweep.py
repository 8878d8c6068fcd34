"""The start-up sweep: remove the containers of engine processes that are dead (a run killed with -9 leaves
its agents' and its warm pool's containers running). Only containers that carry the engine's labels
(rollout/envs/docker.py owner_labels) and were started on this machine by a process that no longer exists
are removed: another machine's containers, a live process's, and anything without the labels are left."""
from __future__ import annotations

import os
import socket

from protege.rollout.envs.docker import LABEL, MACHINE_LABEL


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def sweep_dead_runs(client, log=print) -> list[str]:
    """Remove this machine's leftover engine containers on `client`'s host; returns their ids."""
    removed = []
    machine = socket.gethostname()
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        labels = container.labels or {}
        pid = labels.get(LABEL, "")
        # Containers from before the machine label are never guessed at: they are left alone.
        if labels.get(MACHINE_LABEL) != machine or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            container.remove(force=True)
            removed.append(container.id)
        except Exception as e:  # noqa: BLE001 -- removed meanwhile, or the host is busy: next start tries again
            log(f"sweep: could not remove {container.short_id}: {e}")
    if removed:
        log(f"sweep: removed {len(removed)} container(s) of dead runs")
    return removed
