"""Real components for the multi-host tests, started by the tests: Docker daemons of their own (each with its
socket, data root, exec root and pid file under a temporary folder, never the default daemon's) and a local
registry on the loopback address (Debian's docker-registry). Each skips with the reason when it cannot run."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

REGISTRY = "/usr/bin/docker-registry"


def _wait(ready, seconds: float, what: str, log_path: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if ready():
            return
        time.sleep(0.2)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-1500:]
    process.kill()
    pytest.skip(f"{what} did not come up: {tail}")


def stop_process(process: subprocess.Popen, seconds: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `seconds`."""
    process.terminate()
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Daemon:
    """One dockerd on its own socket and directories; kill() is the -9 of a host failure, start() again
    brings the same host back (its data root, its stopped containers)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.url = f"unix://{folder}/docker.sock"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import docker
        os.makedirs(self.folder, exist_ok=True)
        log = open(os.path.join(self.folder, "dockerd.log"), "a")
        self.process = subprocess.Popen(
            ["dockerd", "--host", self.url, "--data-root", f"{self.folder}/root", "--exec-root",
             f"{self.folder}/exec", "--pidfile", f"{self.folder}/docker.pid", "--bridge=none", "--iptables=false",
             "--ip-masq=false"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def ready() -> bool:
            try:
                return bool(docker.DockerClient(base_url=self.url, timeout=5).ping())
            except Exception:  # noqa: BLE001 -- not up yet
                return False
        _wait(ready, 60, f"dockerd at {self.url}", f"{self.folder}/dockerd.log", self.process)

    def client(self, timeout: float = 120):
        import docker
        return docker.DockerClient(base_url=self.url, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL of the daemon alone: it is gone at once (its containerd and shims live on, as after a real
        crash)."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process, 30)
        # The managed containerd and shims of this daemon only (they run under its exec root).
        for pid in _pids_mentioning(f"{self.folder}/exec"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(name))
            except OSError:
                pass
    return pids


def _unmount_under(folder: str) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(folder)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture(scope="session")
def docker_pair():
    """Two Docker daemons of the test session's own (sockets and data roots under a temporary folder)."""
    pytest.importorskip("docker")
    if shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        pytest.skip("starting Docker daemons needs root")
    folder = tempfile.mkdtemp(prefix="protege-dockerd-")
    daemons = [Daemon(os.path.join(folder, name)) for name in ("a", "b")]
    try:
        for daemon in daemons:
            daemon.start()
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()
        _unmount_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def local_registry():
    """A registry on 127.0.0.1 (Docker pulls from loopback registries over plain HTTP); yields host:port."""
    if not os.path.exists(REGISTRY):
        pytest.skip(f"no local registry: {REGISTRY} is absent (apt-get install docker-registry)")
    folder = tempfile.mkdtemp(prefix="protege-registry-")
    port = free_port()
    config = os.path.join(folder, "config.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {folder}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    log_path = os.path.join(folder, "registry.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([REGISTRY, "serve", config], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False
    _wait(ready, 30, "docker-registry", log_path, process)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process, 10)
        shutil.rmtree(folder, ignore_errors=True)
