"""A trajectory's start-to-first-command latency: a cold start (create, start, check out the base commit, then
the first command) against a warm pool's (the container was started ahead, while earlier work ran: take it,
then the first command). Alternating cold and warm runs on one Docker engine (DOCKER_HOST, else the local
one), on the bundled leap_year task's image (built here when absent, as the tests build it); medians of
--runs each. Every container is removed afterwards.

    python benchmarks/warm_pool.py [--runs 9] [--out benchmarks/results]   -> warm_pool.json, warm_pool.md
"""
import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from protege.rollout.envs.hosts import HostPool, HostPoolConfig
from protege.rollout.envs.images import build_images
from protege.rollout.envs.warm import WarmPool, WarmPoolConfig
from protege.rollout.tasks import bundled_tasks

TASK = "protege__leap_year-1"
FIRST_COMMAND = "git status --porcelain"   # what an agent's first look costs in the container


def _first_command_after(open_env) -> tuple[float, object]:
    t0 = time.perf_counter()
    env = open_env()
    result = env.run(FIRST_COMMAND)
    seconds = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    return seconds, env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    task = next(t for t in bundled_tasks() if t.instance_id == TASK)
    pool = HostPool(HostPoolConfig(max_per_host=8), log=lambda m: None)
    try:
        pool.hosts[0].client.images.get(task.image)   # present (built, or loaded with docker load): used as is
    except Exception:  # noqa: BLE001 -- absent: built as the tests build it
        build_images([task], client=pool.hosts[0].client, log=print)
    docker_version = pool.hosts[0].client.version().get("Version", "?")
    cold, warm = [], []
    try:
        with WarmPool(pool.open, WarmPoolConfig(size=1)) as warm_pool:
            _, env = _first_command_after(lambda: pool.open(task))   # one unmeasured start: caches, page cache
            env.close()
            for _ in range(args.runs):
                seconds, env = _first_command_after(lambda: pool.open(task))
                cold.append(seconds)
                env.close()
                warm_pool.schedule([task])
                deadline = time.monotonic() + 60
                while not warm_pool._ready[task.instance_id] and time.monotonic() < deadline:
                    time.sleep(0.05)   # stands for the earlier trajectory or training step it overlaps
                seconds, env = _first_command_after(lambda: warm_pool.take(task))
                warm.append(seconds)
                env.close()
    finally:
        pool.close()
    result = {
        "task": TASK, "image": task.image, "first_command": FIRST_COMMAND, "runs": args.runs,
        "cold_s": cold, "warm_s": warm,
        "cold_median_s": statistics.median(cold), "warm_median_s": statistics.median(warm),
        "speedup": statistics.median(cold) / statistics.median(warm),
        "machine": f"{platform.node()} {platform.machine()}, {_cpus()} CPUs", "docker": docker_version,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).parent).stdout.strip(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warm_pool.json").write_text(json.dumps(result, indent=2) + "\n")
    fmt = lambda xs: ", ".join(f"{x * 1000:.0f}" for x in xs)  # noqa: E731
    (out / "warm_pool.md").write_text(
        f"# Warm pool: start-to-first-command latency\n\n"
        f"`python benchmarks/warm_pool.py --runs {args.runs}` at commit {result['commit']}; {result['machine']}; "
        f"Docker {docker_version}; task {TASK} ({task.image}); first command `{FIRST_COMMAND}`. Cold and warm runs "
        f"alternate in one process.\n\n"
        f"| start | median ms | runs (ms) |\n|---|---|---|\n"
        f"| cold (create, start, checkout, command) | {result['cold_median_s'] * 1000:.0f} | {fmt(cold)} |\n"
        f"| warm pool (take, command) | {result['warm_median_s'] * 1000:.0f} | {fmt(warm)} |\n\n"
        f"Median cold / warm: {result['speedup']:.1f}x. The warm container's own start is not gone: it was paid "
        f"ahead, off the trajectory's critical path (while the previous step trains, in GRPO).\n")
    print(json.dumps({k: result[k] for k in ("cold_median_s", "warm_median_s", "speedup")}))


def _cpus() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
