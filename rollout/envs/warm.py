"""A warm pool: environments for the trajectories that come next, started ahead of need so that a
trajectory's container start is off its critical path. The upcoming tasks are known (a GRPO step's jobs, an
evaluation's attempts, in order); at most `size` environments wait started at any time, filled by a few
threads in task order. take(task) hands over a waiting environment of that task, or waits for one being
started, or starts one cold when none is coming.

Nothing leaks: a waiting container carries the engine's owner labels like any other (close() removes them;
a process killed with -9 leaves them to the next start's sweep, rollout/envs/sweep.py)."""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class WarmPoolConfig:
    size: int = 4          # environments started and waiting at most; 0: no warm pool
    starters: int = 2      # threads starting them (a daemon serialises much of a start anyway)

    def __post_init__(self):
        for name in ("size", "starters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "size" else 1):
                raise ValueError(f"WarmPoolConfig.{name} = {value!r}: expected an int >= "
                                 f"{0 if name == 'size' else 1}")


class WarmPool:
    def __init__(self, open_env: Callable[[object], object], config: WarmPoolConfig = WarmPoolConfig(), log=print):
        self.open_env = open_env
        self.config = config
        self.log = log
        self._queue: collections.deque = collections.deque()   # tasks to start, in the order they come
        self._ready: dict[str, list] = collections.defaultdict(list)   # instance_id -> started environments
        self._starting: collections.Counter = collections.Counter()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._fill, name=f"warm-pool-{i}", daemon=True)
                         for i in range(config.starters if config.size else 0)]
        for thread in self._threads:
            thread.start()

    def schedule(self, tasks: list) -> None:
        """Tasks whose environments will be asked for, in order."""
        with self._cond:
            self._queue.extend(tasks)
            self._cond.notify_all()

    def _waiting(self) -> int:
        return sum(len(v) for v in self._ready.values()) + sum(self._starting.values())

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._queue and self._waiting() < self.config.size):
                    self._cond.wait()
                if self._closed:
                    return
                task = self._queue.popleft()
                self._starting[task.instance_id] += 1
            env = None
            try:
                env = self.open_env(task)
            except Exception as e:  # noqa: BLE001 -- take() starts it cold and meets the error itself
                self.log(f"warm pool: starting {task.instance_id} failed ({type(e).__name__}: {e})")
            with self._cond:
                self._starting[task.instance_id] -= 1
                if env is not None and not self._closed:
                    self._ready[task.instance_id].append(env)
                    env = None
                self._cond.notify_all()
            if env is not None:   # closed meanwhile
                env.close()

    def take(self, task):
        """A started environment of `task`: a waiting one, one being started, or a cold start."""
        with self._cond:
            while True:
                if self._ready[task.instance_id]:
                    env = self._ready[task.instance_id].pop(0)
                    self._cond.notify_all()
                    return env
                if not self._starting[task.instance_id]:
                    break
                self._cond.wait()
            try:
                self._queue.remove(task)   # asked for now: not started again later
            except ValueError:
                pass
        return self.open_env(task)

    def close(self) -> None:
        """Remove every waiting environment and stop starting new ones."""
        with self._cond:
            self._closed = True
            waiting = [env for envs in self._ready.values() for env in envs]
            self._ready.clear()
            self._queue.clear()
            self._cond.notify_all()
        for env in waiting:
            try:
                env.close()
            except Exception as e:  # noqa: BLE001 -- a host gone: its pool removes the container later
                self.log(f"warm pool: closing a waiting environment failed ({type(e).__name__}: {e})")
        for thread in self._threads:
            thread.join(timeout=60)

    def __enter__(self) -> "WarmPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
