"""A run's environments (GRPO, evaluation): with Docker, the task images checked on every host before any
trajectory (pulled first when asked), the leftovers of dead runs swept, a host pool placing each
environment, and a warm pool starting the next ones ahead of need; with the sandbox, plain environments."""
from __future__ import annotations

from dataclasses import dataclass, field

from protege.rollout.envs.base import open_environment
from protege.rollout.envs.hosts import HostPool, HostPoolConfig
from protege.rollout.envs.prepare import require_images
from protege.rollout.envs.sweep import sweep_dead_runs
from protege.rollout.envs.warm import WarmPool, WarmPoolConfig


@dataclass
class FleetConfig:
    backend: str = "docker"                              # docker | sandbox
    docker_hosts: list[str] = field(default_factory=list)  # empty: the default engine (DOCKER_HOST)
    max_envs_per_host: int = 16
    warm_envs: int = 4
    pull_images: bool = False    # missing images pulled at start; else MissingImages names them
    base_image: str = "debootstrap"


class Fleet:
    def __init__(self, config: FleetConfig, tasks: list, log=print):
        self.config = config
        self.pool = None
        self.options = {}
        if config.backend == "docker":
            require_images(tasks, config.docker_hosts, pull=config.pull_images, base=config.base_image, log=log)
            self.pool = HostPool(HostPoolConfig(hosts=list(config.docker_hosts),
                                                max_per_host=config.max_envs_per_host), log=log)
            for host in self.pool.hosts:
                sweep_dead_runs(host.client, log)
            self.options = {"pool": self.pool}
        size = config.warm_envs if config.backend == "docker" else 0
        self.warm = WarmPool(self._open_cold, WarmPoolConfig(size=size), log=log)

    def _open_cold(self, task):
        return open_environment(task, self.config.backend, **self.options)

    def schedule(self, tasks: list) -> None:
        """The tasks whose environments come next, in order (the warm pool starts them ahead)."""
        if self.warm.config.size:
            self.warm.schedule(tasks)

    def open(self, task):
        return self.warm.take(task)

    def evaluate(self, task, patch: str):
        from protege.rollout.evaluate import evaluate_patch
        return evaluate_patch(task, patch, backend=self.config.backend, **self.options)

    def close(self) -> None:
        self.warm.close()
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
