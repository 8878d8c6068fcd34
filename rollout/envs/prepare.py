"""Every task's image on every Docker host a run will use, before the run: pulled from its registry (with
progress and retries) or, for bundled tasks, built once and copied to the other hosts (`docker save | docker
load`). Resumable: what a host already holds is kept (and a pull that died resumes from the layers it got);
parallel across hosts; a disk budget is checked before each pull. GRPO and evaluation call
`require_images` at start: a missing image stops them there, named, or is pulled first when asked.

    python -m protege.rollout.envs.prepare --tasks FILE [--hosts URL ...] [--disk-budget 200G] [--retries 3]
    python -m protege.rollout.envs.prepare --tasks FILE --hosts ... --check     # report only, change nothing
"""
from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from protege.engine.optional import require
from protege.rollout.envs.hosts import docker_client
from protege.rollout.envs.registry import download_size, parse_ref
from protege.rollout.tasks import Task, TaskFormatError, load_tasks


class MissingImages(RuntimeError):
    """Task images absent from a host that a run needs; the message names every one."""


@dataclass
class PrepareConfig:
    hosts: list[str] = field(default_factory=list)   # Docker endpoints; empty: the default engine
    disk_budget: int | None = None   # bytes the images on one host may take after pulling; None: no limit
    retries: int = 3                 # further tries of a failed pull (backoff 5, 10, 20 s ...)
    base: str = "debootstrap"        # the base image of bundled tasks' images (images.ensure_base_image)
    pull: bool = True                # False: report what is missing, pull nothing (--check)
    build: bool = True               # False: bundled tasks' images are neither built nor copied (--check)
    api_timeout_s: float = 600.0     # one Docker API call (a build step, a save/load of a large image)


@dataclass
class HostReport:
    host: str
    present: list[str] = field(default_factory=list)
    pulled: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)   # image -> why

    def line(self) -> str:
        return (f"{self.host}: {len(self.present)} present, {len(self.pulled)} pulled, {len(self.built)} built, "
                f"{len(self.copied)} copied, {len(self.missing)} missing")


def parse_size(text: str) -> int:
    """'200G', '1.5T', '500M', '1048576' -> bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"disk budget {text!r}: expected a size such as 200G, 500M or a number of bytes")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB"


def _image_id(client, name: str) -> str | None:
    try:
        return client.images.get(name).id
    except require("docker", "preparing task images").errors.ImageNotFound:
        return None


# ---------------------------------------------------------------------------------------------- pulling

def pull(client, image: str, retries: int, log, label: str = "") -> None:
    """docker pull with progress lines (every ~5 s: bytes of the layers seen so far) and `retries` more tries
    after a failure; a retry resumes from the layers already on the host."""
    repository, tag = parse_ref(image).pull_args
    for attempt in range(retries + 1):
        try:
            done: dict[str, tuple[int, int]] = {}
            last = 0.0
            for event in client.api.pull(repository, tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise RuntimeError(event["error"])
                detail = event.get("progressDetail") or {}
                if event.get("id") and detail.get("total"):
                    done[event["id"]] = (detail.get("current", 0), detail["total"])
                if time.monotonic() - last > 5 and done:
                    last = time.monotonic()
                    current, total = sum(c for c, _ in done.values()), sum(t for _, t in done.values())
                    log(f"{label}pulling {image}: {current / 1e6:.0f}/{total / 1e6:.0f} MB of {len(done)} layer(s)")
            if _image_id(client, image) is None:
                raise RuntimeError("the pull ended without the image")
            return
        except Exception as e:  # noqa: BLE001 -- network, registry and daemon errors all get the retries
            if attempt == retries:
                raise RuntimeError(f"pulling {image} failed after {retries + 1} tries: {e}") from None
            wait = 5 * 2 ** attempt
            log(f"{label}pulling {image} failed ({e}); retry {attempt + 1}/{retries} in {wait} s")
            time.sleep(wait)


def _used_bytes(client) -> int:
    return int(client.df().get("LayersSize") or 0)


def _architecture(client) -> str:
    machine = client.info().get("Architecture", "x86_64")
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# ---------------------------------------------------------------------------------------------- one host

def _copy(source, target, image: str) -> None:
    """docker save | docker load between two daemons, streamed (no file on disk)."""
    target.api.load_image(source.images.get(image).save(chunk_size=1 << 20))


def _prepare_host(url: str, client, tasks: list[Task], config: PrepareConfig, builder,
                  built_ids: dict[str, str | None], fresh: set[str], log) -> HostReport:
    report = HostReport(url or "default")
    label = f"[{report.host}] "
    to_pull: list[str] = []
    for image in dict.fromkeys(t.image for t in tasks):
        have = _image_id(client, image)
        if image in built_ids:   # bundled: the builder's very image (None: any, when nothing was built)
            wanted = built_ids[image]
            if have is not None and (wanted is None or have == wanted):
                (report.built if client is builder and image in fresh else report.present).append(image)
            elif wanted is not None:
                log(f"{label}copying {image} from the build host")
                _copy(builder, client, image)
                report.copied.append(image)
            else:
                report.missing[image] = "bundled task image not on the host (not built: --check)"
        elif have is not None:
            report.present.append(image)
        elif not config.pull:
            report.missing[image] = "not on the host"
        else:
            to_pull.append(image)
    if not to_pull:
        return report
    arch = _architecture(client) if config.disk_budget is not None else "amd64"
    for image in to_pull:
        if config.disk_budget is not None:
            need, used = download_size(image, arch), _used_bytes(client)
            if used + (need or 0) > config.disk_budget:
                report.missing[image] = (f"over the disk budget: {_gb(used)} used + {_gb(need)} to download > "
                                         f"{_gb(config.disk_budget)}")
                log(f"{label}{image}: {report.missing[image]}")
                continue
        try:
            pull(client, image, config.retries, log, label)
            report.pulled.append(image)
            log(f"{label}pulled {image}")
        except RuntimeError as e:
            report.missing[image] = str(e)
            log(f"{label}{e}")
    return report


# ---------------------------------------------------------------------------------------------- every host

def prepare_images(tasks: list[Task], config: PrepareConfig = PrepareConfig(), log=print) -> list[HostReport]:
    """Make every task's image present on every host of `config.hosts`; one report per host."""
    urls = config.hosts or [""]
    clients = []
    try:
        for url in urls:
            try:
                clients.append(docker_client(url, config.api_timeout_s))
                clients[-1].ping()
            except Exception as e:  # noqa: BLE001 -- the SDK raises several kinds for "no daemon"
                raise MissingImages(f"cannot reach a Docker engine at {url or 'DOCKER_HOST / the default socket'} "
                                    f"({type(e).__name__}: {e}); start dockerd or use --backend sandbox") from None
        # Bundled tasks: built once, on the first host (which needs the base image or debootstrap), then copied.
        bundled = [t for t in tasks if t.source is not None]
        built_ids: dict[str, str | None] = {t.image: None for t in bundled}
        fresh: set[str] = set()
        if bundled and config.build:
            from protege.rollout.envs.images import build_images
            before = {t.image: _image_id(clients[0], t.image) for t in bundled}
            for image in build_images(bundled, base=config.base, client=clients[0], log=log):
                built_ids[image] = _image_id(clients[0], image)
                if built_ids[image] != before[image]:
                    fresh.add(image)
        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            futures = [pool.submit(_prepare_host, url, client, tasks, config, clients[0], built_ids, fresh, log)
                       for url, client in zip(urls, clients)]
            return [f.result() for f in futures]
    finally:
        for client in clients:
            client.close()


def missing_by_host(reports: list[HostReport]) -> dict[str, dict[str, str]]:
    return {r.host: r.missing for r in reports if r.missing}


def require_images(tasks: list[Task], hosts: list[str], pull: bool, base: str = "debootstrap", log=print) -> None:
    """A run's start: bundled tasks' images built (as before) and copied to every host, every other image
    present on every host -- pulled first when `pull`, else the run is refused with the list of missing
    images (MissingImages), before any trajectory."""
    reports = prepare_images(tasks, PrepareConfig(hosts=list(hosts), pull=pull, base=base), log)
    missing = missing_by_host(reports)
    if missing:
        users = {}
        for task in tasks:
            users.setdefault(task.image, []).append(task.instance_id)
        lines = [f"  {host}: {image} (task {', '.join(users.get(image, ['?']))}): {why}"
                 for host, images in missing.items() for image, why in images.items()]
        count = sum(len(images) for images in missing.values())
        hint = "" if pull else ("; prepare them first (python -m protege.rollout.envs.prepare --tasks FILE "
                                "--hosts ...) or let the run pull them")
        raise MissingImages(f"{count} task image(s) missing on the Docker host(s){hint}:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------- command

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m protege.rollout.envs.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True, help="task file (.json, .jsonl, .parquet)")
    p.add_argument("--hosts", nargs="*", default=[],
                   help="Docker endpoints (unix://..., tcp://..., ssh://...); default: DOCKER_HOST / the local engine")
    p.add_argument("--disk-budget", default=None, help="most disk the images of one host may take, e.g. 200G")
    p.add_argument("--retries", type=int, default=3, help="further tries of a failed pull")
    p.add_argument("--base", default="debootstrap", help="base of bundled tasks' images (or e.g. python:3.11-slim)")
    p.add_argument("--check", action="store_true", help="only report what is missing; pull, copy and build nothing")
    args = p.parse_args(argv)
    try:
        tasks = load_tasks(args.tasks)
        budget = parse_size(args.disk_budget) if args.disk_budget is not None else None
    except (TaskFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            print(message, file=sys.stderr, flush=True)
    config = PrepareConfig(hosts=args.hosts, disk_budget=budget, retries=args.retries, base=args.base,
                           pull=not args.check, build=not args.check)
    try:
        reports = prepare_images(tasks, config, log)
    except (MissingImages, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(tasks)} task(s), {len({t.image for t in tasks})} image(s), {len(reports)} host(s)")
    for report in reports:
        print(report.line())
        for image, why in report.missing.items():
            print(f"  missing {image}: {why}")
    return 1 if missing_by_host(reports) else 0


if __name__ == "__main__":
    sys.exit(main())
