"""A pool of Docker hosts for one rank: each environment goes to the least-loaded healthy host with a free
slot; a host that stops answering leaves the rotation, and a probe thread brings it back (removing the
containers it could not remove while the host was away) when it answers again.

A host is a Docker endpoint URL (unix:///var/run/docker.sock, tcp://envs-1:2376, ssh://runner@envs-1);
"" is the default engine (DOCKER_HOST, else the local socket)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from protege.engine.optional import require
from protege.rollout.envs.base import EnvironmentLost


@dataclass
class HostPoolConfig:
    hosts: list[str] = field(default_factory=list)   # empty: the default engine (DOCKER_HOST) alone
    max_per_host: int = 16         # environments at once on one host
    probe_interval_s: float = 2.0  # how often a host out of the rotation is asked whether it answers again
    probe_timeout_s: float = 5.0   # a ping slower than this counts as no answer
    api_timeout_s: float = 120.0   # any other Docker API call
    wait_s: float = 600.0          # how long open() waits for a healthy host with a free slot

    def __post_init__(self):
        if not isinstance(self.hosts, list) or not all(isinstance(h, str) for h in self.hosts):
            raise ValueError(f"HostPoolConfig.hosts = {self.hosts!r}: expected a list of Docker host URLs")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"HostPoolConfig.hosts = {self.hosts!r}: a host is listed twice")
        if isinstance(self.max_per_host, bool) or not isinstance(self.max_per_host, int) or self.max_per_host < 1:
            raise ValueError(f"HostPoolConfig.max_per_host = {self.max_per_host!r}: expected an int >= 1")


def docker_client(url: str, timeout: float):
    """A client of one Docker endpoint ("" = the default engine, as `docker` itself picks it)."""
    docker = require("docker", "Docker hosts")
    if not url:
        return docker.from_env(timeout=timeout)
    return docker.DockerClient(base_url=url, timeout=timeout, use_ssh_client=url.startswith("ssh://"))


def _once(action):
    """`action`, run on the first call only (a slot is released once, whichever path gets there first)."""
    lock, done = threading.Lock(), []

    def call() -> None:
        with lock:
            if done:
                return
            done.append(True)
        action()
    return call


class Host:
    def __init__(self, url: str, config: HostPoolConfig):
        self.url = url
        self.name = url or "default"
        self.client = docker_client(url, config.api_timeout_s)
        self._ping_client = docker_client(url, config.probe_timeout_s)
        self.active = 0
        self.healthy = True
        self.failures = 0                  # times it left the rotation
        self.orphans: set[str] = set()     # containers to remove when it answers again

    def answers(self) -> bool:
        try:
            return bool(self._ping_client.ping())
        except Exception:  # noqa: BLE001 -- every way of not answering is the same here
            return False


class HostPool:
    """Places environments on hosts. open(task) -> a started DockerEnvironment, released on its close."""

    def __init__(self, config: HostPoolConfig | None = None, log=print):
        self.config = config if config is not None else HostPoolConfig()   # never a default shared by pools
        self.log = log
        self.hosts = [Host(url, config) for url in (config.hosts or [""])]
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._prober = threading.Thread(target=self._probe_loop, name="docker-host-probe", daemon=True)
        self._prober.start()

    # ---------------------------------------------------------------------------------------- placement

    def acquire(self) -> Host:
        """The least-loaded healthy host with a free slot (waits for one); its slot is taken."""
        deadline = time.monotonic() + self.config.wait_s
        with self._cond:
            while True:
                free = [h for h in self.hosts if h.healthy and h.active < self.config.max_per_host]
                if free:
                    host = min(free, key=lambda h: h.active)
                    host.active += 1
                    return host
                left = deadline - time.monotonic()
                if left <= 0:
                    down = [h.name for h in self.hosts if not h.healthy]
                    raise EnvironmentLost(f"no Docker host with a free slot within {self.config.wait_s:.0f} s"
                                          + (f" (not answering: {', '.join(down)})" if down else ""))
                self._cond.wait(min(left, 1.0))

    def release(self, host: Host) -> None:
        with self._cond:
            host.active -= 1
            self._cond.notify_all()

    def mark_down(self, host: Host, reason: str) -> None:
        with self._cond:
            if host.healthy:
                host.healthy = False
                host.failures += 1
                self.log(f"docker host {host.name} left the rotation: {reason}")
            self._cond.notify_all()

    def open(self, task, **options):
        """A started DockerEnvironment for `task` on a healthy host; a host that fails while starting it
        leaves the rotation and the next one is tried. The host's slot is released when the environment
        closes (or fails to start)."""
        from protege.rollout.envs.docker import DockerEnvironment
        while True:
            host = self.acquire()
            release = _once(lambda host=host: self.release(host))

            def closed(container_id: str, removed: bool, host=host, release=release) -> None:
                if not removed:   # the host went away with it: removed when the host answers again
                    with self._cond:
                        host.orphans.add(container_id)
                    self.mark_down(host, "a container could not be removed")
                release()
            try:
                env = DockerEnvironment(task, client=host.client, probe=host.answers, on_close=closed,
                                        on_lost=lambda error, host=host: self.mark_down(host, str(error)), **options)
            except EnvironmentLost:
                release()
                continue   # on_lost took the host out of the rotation
            except BaseException:
                release()
                raise
            env.host = host
            return env

    # ---------------------------------------------------------------------------------------- health

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.config.probe_interval_s):
            for host in self.hosts:
                if not host.healthy and host.answers():
                    self._rejoin(host)

    def _rejoin(self, host: Host) -> None:
        for container_id in list(host.orphans):
            try:
                host.client.containers.get(container_id).remove(force=True)
            except require("docker", "Docker hosts").errors.NotFound:
                pass
            except Exception:  # noqa: BLE001 -- not answering after all: stay out, try again later
                return
            host.orphans.discard(container_id)
        with self._cond:
            host.healthy = True
            self._cond.notify_all()
        self.log(f"docker host {host.name} answers again and rejoined the rotation")

    def status(self) -> list[dict]:
        with self._cond:
            return [{"host": h.name, "healthy": h.healthy, "active": h.active, "failures": h.failures,
                     "orphans": len(h.orphans)} for h in self.hosts]

    def close(self) -> None:
        self._stop.set()
        self._prober.join(timeout=5)
        for host in self.hosts:
            host.client.close()
            host._ping_client.close()
