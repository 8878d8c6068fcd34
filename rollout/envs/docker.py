"""The Docker environment: one container per trajectory, from the task's image, with no network.

Commands run through `docker exec` under a deadline; on timeout every process in the container except its
init is killed (exit 124) and the container keeps serving. Containers are removed on close, on leaving a
`with` block, and -- as a safety net -- at interpreter exit."""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import posixpath
import shlex
import tarfile
import socket
import threading
import uuid
from typing import TYPE_CHECKING

from protege.rollout.envs.base import (DEFAULT_OUTPUT_CAP, DEFAULT_TIMEOUT, CommandResult, EnvironmentLost,
                                      collect_output, git_diff)
from protege.rollout.tasks import Task
from protege.engine.optional import require

if TYPE_CHECKING:
    import docker

LABEL = "protege.env"  # value: the pid of the process that owns the container
RUN_LABEL = "protege.run"          # value: RUN_ID, one per process (a warm pool's containers are a run's too)
MACHINE_LABEL = "protege.machine"  # value: the owner's host name: only there can its pid be checked
RUN_ID = uuid.uuid4().hex[:16]
# PID 1: a shell that reaps orphans and survives `kill -9 -1` (which spares init), so a timeout can clear
# out every other process without ending the container.
INIT = ["bash", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"]
CONTAINER_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", "PAGER": "cat", "GIT_PAGER": "cat",
                 "TERM": "dumb"}

_start_slots: dict[str, threading.BoundedSemaphore] = {}   # per daemon: hosts of a pool start in parallel
_live: dict[str, "DockerEnvironment"] = {}
_live_lock = threading.Lock()


class DockerEnvironment:
    repo_dir = "/testbed"

    def __init__(self, task: Task, client: docker.DockerClient | None = None, timeout: float = DEFAULT_TIMEOUT,
                 output_cap: int = DEFAULT_OUTPUT_CAP, mem_limit: str = "4g", pids_limit: int = 1024,
                 probe=None, on_close=None, on_lost=None):
        self.task = task
        # probe() -> bool: does the daemon still answer? Asked after an unexpected error, to tell a lost host
        # (EnvironmentLost) from a failure of the command itself.
        self._probe = probe
        self.timeout = timeout
        self.output_cap = output_cap
        self._own_client = client is None
        self._docker = require("docker", "the Docker environment backend")
        self.client = client or self._docker.from_env()
        self.container = None
        self.on_close = on_close   # on_close(container_id, removed): the host pool's bookkeeping
        self.on_lost = on_lost     # on_lost(EnvironmentLost): the host pool takes the host out of the rotation
        with self._host_guard(), _start_slots_of(self.client):  # container starts are the expensive, daemon-serialised part
            container = self.client.containers.create(
                task.image, INIT, labels=owner_labels(), network_mode="none",
                working_dir=self.repo_dir, environment=CONTAINER_ENV, mem_limit=mem_limit, pids_limit=pids_limit)
            with _live_lock:
                _live[container.id] = self
            self.container = container
            try:
                container.start()
                # Images built at the base commit pass the check; others (SWE-smith branches) are checked out.
                base = shlex.quote(task.base_commit)
                # (Both rev-parses must succeed: in an image without the repository both print nothing.)
                checkout = self._exec(f"head=$(git rev-parse HEAD) && want=$(git rev-parse {base}^{{commit}}) && "
                                      f"{{ test \"$head\" = \"$want\" || "
                                      f"git -c advice.detachedHead=false checkout -q -f {base}; }}", 120, None)
                if checkout.exit_code != 0:
                    raise RuntimeError(f"{task.instance_id}: cannot put {self.repo_dir} at {task.base_commit} "
                                       f"in {task.image}: {checkout.output.strip()}")
            except BaseException:
                self.close()
                raise

    def __enter__(self) -> "DockerEnvironment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        with self._host_guard():
            return self._exec(command, self.timeout if timeout is None else timeout, self.output_cap)

    @contextlib.contextmanager
    def _host_guard(self):
        """Errors of a daemon that no longer answers become EnvironmentLost; the command's own errors (a
        missing file, say) pass unchanged."""
        try:
            yield
        except (EnvironmentLost, FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
            raise
        except Exception as e:
            if self._probe is not None and not self._probe():
                lost = EnvironmentLost(f"{self.task.instance_id}: the Docker host stopped answering "
                                       f"({type(e).__name__}: {e})")
                if self.on_lost is not None:
                    self.on_lost(lost)
                raise lost from e
            raise

    def _exec(self, command: str, timeout: float, cap: int | None) -> CommandResult:
        if self.container is None:
            raise RuntimeError("the environment is closed")
        api = self.client.api
        exec_id = api.exec_create(self.container.id, ["bash", "-c", command], workdir=self.repo_dir)["Id"]
        chunks = api.exec_start(exec_id, stream=True)

        def kill_all():
            api.exec_start(api.exec_create(self.container.id, ["bash", "-c", "kill -9 -1"])["Id"])
        out, timed_out = collect_output(chunks, cap, timeout, kill_all)
        exit_code = 124 if timed_out else api.exec_inspect(exec_id)["ExitCode"]
        return CommandResult(out.text(), exit_code, timed_out, out.truncated)

    def _path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.repo_dir, path))

    def read_file(self, path: str) -> str:
        with self._host_guard():
            return self._read_file(path)

    def _read_file(self, path: str) -> str:
        path = self._path(path)
        # Only regular files: /dev/zero or /dev/urandom would stream into this process's memory without end,
        # and a FIFO would block the read forever.
        code, (stdout, stderr) = self.container.exec_run(
            ["sh", "-c", 'if [ -d "$1" ]; then exit 21; fi; if [ -e "$1" ] && [ ! -f "$1" ]; then exit 22; fi; '
             'exec cat -- "$1"', "sh", path], demux=True)
        if code == 21:
            raise IsADirectoryError(f"{path} is a directory")
        if code == 22:
            raise OSError(f"cannot read {path}: not a regular file")
        if code != 0:
            message = (stderr or b"").decode("utf-8", "replace").strip()
            if "No such file" in message:
                raise FileNotFoundError(f"{path}: no such file")
            raise OSError(f"cannot read {path}: {message}")
        return (stdout or b"").decode("utf-8")  # UnicodeDecodeError for binary files

    def write_file(self, path: str, content: str) -> None:
        with self._host_guard():
            self._write_file(path, content)

    def _write_file(self, path: str, content: str) -> None:
        path = self._path(path)
        directory, name = posixpath.split(path)
        # Create the parents; keep an existing file's mode (an executable script stays executable).
        code, out = self.container.exec_run(
            ["sh", "-c", 'if [ -d "$1/$2" ]; then exit 21; fi; mkdir -p -- "$1" && '
             '{ stat -c %a -- "$1/$2" 2>/dev/null || echo 644; }', "sh", directory, name])
        if code == 21:
            raise IsADirectoryError(f"{path} is a directory")
        if code != 0:
            raise OSError(f"cannot write {path}: {out.decode('utf-8', 'replace').strip()}")
        data = content.encode("utf-8")
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), int(out.decode().strip(), 8)
            tar.addfile(info, io.BytesIO(data))
        if not self.container.put_archive(directory, archive.getvalue()):
            raise OSError(f"cannot write {path}")

    def diff(self) -> str:
        with self._host_guard():
            return git_diff(self._exec, self.task)

    def close(self) -> None:
        container, self.container = self.container, None
        if container is None:
            return
        removed = False
        try:
            container.remove(force=True)  # SIGKILL and remove: no stop grace period
            removed = True
        except self._docker.errors.NotFound:
            removed = True
        except Exception:
            if self._probe is None or self._probe():
                raise
            # The host is gone: its container is removed when it answers again (on_close tells the pool).
        finally:
            with _live_lock:
                _live.pop(container.id, None)
            if self._own_client:
                self.client.close()
            if self.on_close is not None:
                self.on_close(container.id, removed)


def _start_slots_of(client) -> threading.BoundedSemaphore:
    with _live_lock:
        return _start_slots.setdefault(client.api.base_url, threading.BoundedSemaphore(
            int(os.environ.get("PROTEGE_MAX_CONTAINER_STARTS", "4"))))


def owner_labels() -> dict[str, str]:
    """The labels that make a container this process's: its pid, its run and its machine (sweep.py removes
    the containers of runs whose process is dead, and only those)."""
    return {LABEL: str(os.getpid()), RUN_LABEL: RUN_ID, MACHINE_LABEL: socket.gethostname()}


@atexit.register
def _remove_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live.values())
    for env in leftovers:
        try:
            env.close()
        except Exception:  # the daemon may already be gone at exit; nothing more can be done
            pass
