"""Docker images for tasks: one base image (Python 3, pytest, git, patch), one image per environment
declaration (rollout.tasks.EnvSpec: a virtual environment with the declared packages, installed offline
from wheels downloaded here), and one image per task with the repository at its base commit in /testbed
and the declaration's pre-install and install commands run. A task image that exists locally and is not
built here (a swebench/sweb.eval.* image) is used as it is.

The base comes either from a registry image where pulls work (e.g. python:3.11-slim) or, on machines that
reach only the Debian mirrors, from debootstrap (`tar | docker import`). Images are built with the plain
builder (`client.images.build`; buildx is not needed) and are skipped when they already exist."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import TYPE_CHECKING

from protege.rollout.envs import pyenv
from protege.rollout.tasks import EnvSpec, Task, materialize_repo
from protege.engine.optional import require

if TYPE_CHECKING:
    import docker


def _docker():
    """The Docker SDK, imported on use (the agent extra)."""
    return require("docker", "building task images")

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pytest", "git", "patch")
# Installed on top of a registry image (python:*-slim has Python but neither git nor pytest).
REGISTRY_SETUP = ("RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends git patch "
                  "&& rm -rf /var/lib/apt/lists/* && pip install -q pytest")
# Trimmed from the bootstrapped root file system: nothing a test run reads.
DEBOOTSTRAP_PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/locale", "usr/share/info")
BASE_LABEL = "protege.base"
ENV_DIR, ENV_WHEELS = "/opt/protege-env", "/opt/protege-wheels"   # the task's environment in its image


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def base_image_name(base: str = "debootstrap") -> str:
    """The tag of the base image for `base` ("debootstrap" or a registry image such as python:3.11-slim).
    The tag hashes the recipe, so changing the recipe builds a new image instead of reusing a stale one."""
    if base == "debootstrap":
        return f"protege/base:{DEBIAN_SUITE}-{_short_hash(DEBIAN_SUITE, *DEBIAN_PACKAGES, *DEBOOTSTRAP_PRUNE)}"
    return f"protege/base:{_short_hash(base, REGISTRY_SETUP)}"


def _exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except _docker().errors.ImageNotFound:
        return False


def ensure_base_image(client: docker.DockerClient, base: str = "debootstrap", log=print) -> str:
    """Build the base image unless it exists; returns its tag."""
    name = base_image_name(base)
    if _exists(client, name):
        return name
    if base == "debootstrap":
        _import_debootstrap(client, name, log)
    else:
        log(f"building {name} from {base}")
        dockerfile = f"FROM {base}\n{REGISTRY_SETUP}\n"
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=name, rm=True, forcerm=True,
                            labels={BASE_LABEL: base})
    return name


def _import_debootstrap(client: docker.DockerClient, name: str, log) -> None:
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap), and no registry base "
                           "image was given (--base python:3.11-slim)")
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root to build the base image; run as root or pass a registry "
                           "base image (--base python:3.11-slim)")
    root = tempfile.mkdtemp(prefix="protege-rootfs-")
    try:
        log(f"debootstrap {DEBIAN_SUITE} into {root} (about a minute)")
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                               DEBIAN_SUITE, root], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"debootstrap failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        for rel in DEBOOTSTRAP_PRUNE:
            shutil.rmtree(os.path.join(root, rel), ignore_errors=True)
        repository, tag = name.rsplit(":", 1)
        log(f"importing {name}")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        try:
            client.api.import_image_from_stream(tar.stdout, repository=repository, tag=tag,
                                                changes=[f"LABEL {BASE_LABEL}=debootstrap"])
        finally:
            tar.stdout.close()
            tar.wait()
        if tar.returncode != 0 or not _exists(client, name):
            raise RuntimeError(f"importing the root file system as {name} failed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _build(client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, str], labels: dict) -> None:
    """docker build of `dockerfile` with `files` (context name -> host path) in its context."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for arcname, path in files.items():
            tar.add(path, arcname=arcname)
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile.encode())
        tar.addfile(info, io.BytesIO(dockerfile.encode()))
    context.seek(0)
    try:
        client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True, labels=labels)
    except _docker().errors.BuildError as e:
        log = "".join(chunk.get("stream", "") or chunk.get("error", "") for chunk in e.build_log)
        raise RuntimeError(f"building {tag} failed: {e.msg}\n{log[-3000:]}") from None


def _run(command: str) -> str:
    """A Dockerfile RUN line for a bash command (exec form: no second round of shell quoting)."""
    return "RUN " + json.dumps(["bash", "-c", command])


def ensure_env_image(client: docker.DockerClient, spec: EnvSpec, base_image: str, log=print) -> str:
    """The base image plus the environment's virtual environment (/opt/protege-env, first on PATH) with its
    packages, installed offline from their wheelhouse (downloaded here); one image per declaration."""
    base_id = client.images.get(base_image).id
    name = f"protege/env:{spec.key}-{base_id.split(':')[-1][:12]}"
    if _exists(client, name):
        return name
    wheels = pyenv.wheelhouse(spec, log)
    log(f"building {name} (Python {spec.python}: {' '.join(spec.packages)})")
    check = (f"command -v python{spec.python} >/dev/null || {{ echo \"environment.python {spec.python}: the base "
             f"image {base_image} has no python{spec.python} (it has $(python3 --version 2>&1))\"; exit 1; }}")
    dockerfile = "\n".join([
        f"FROM {base_image}", f"COPY wheels {ENV_WHEELS}",
        _run(check + " && " + pyenv.venv_commands(spec, ENV_DIR, ENV_WHEELS, pyenv.pip_wheel(wheels).name)),
        f"ENV PATH={ENV_DIR}/bin:$PATH VIRTUAL_ENV={ENV_DIR} " + " ".join(
            f"{k}={v}" for k, v in pyenv.offline_pip_env(ENV_WHEELS).items()), ""])
    _build(client, name, dockerfile, {"wheels": str(wheels)}, {BASE_LABEL: base_id})
    return name


def ensure_task_image(client: docker.DockerClient, task: Task, base_image: str, log=print) -> str:
    """Build task.image on `base_image` unless it exists on it: the task's environment (ensure_env_image),
    the repository at its base commit in /testbed, then the environment's pre-install and install commands.

    Only bundled tasks (task.source set) are built here; any other task's image (a swebench image, say) is
    used as it is when present locally."""
    if task.source is None:
        if _exists(client, task.image):
            return task.image
        raise RuntimeError(f"{task.instance_id}: image {task.image!r} does not exist and the task has no "
                           "bundled source to build it from")
    spec = task.env_spec
    env_image = ensure_env_image(client, spec, base_image, log)
    env_id = client.images.get(env_image).id
    try:
        if client.images.get(task.image).labels.get(BASE_LABEL) == env_id:
            return task.image
    except _docker().errors.ImageNotFound:
        pass
    log(f"building {task.image}")
    lines = [f"FROM {env_image}", "COPY testbed /testbed", "WORKDIR /testbed", "ENV PYTHONDONTWRITEBYTECODE=1"]
    if spec.setup_commands:
        lines.append(_run(" && ".join(f"( {c} )" for c in spec.setup_commands) + " && " + pyenv.EXCLUDE_INSTALL_LITTER))
    with tempfile.TemporaryDirectory(prefix="protege-ctx-") as tmp:
        materialize_repo(task, os.path.join(tmp, "testbed"))
        _build(client, task.image, "\n".join(lines) + "\n", {"testbed": os.path.join(tmp, "testbed")},
               {BASE_LABEL: env_id})
    return task.image


def build_images(tasks: list[Task], base: str = "debootstrap", client: docker.DockerClient | None = None,
                 log=print) -> list[str]:
    """The base image and every task's image (existing ones are kept); returns the task image tags."""
    client = client or _docker().from_env()
    base_image = ensure_base_image(client, base, log)
    return [ensure_task_image(client, task, base_image, log) for task in tasks]


class ImagesMissing(ValueError):
    """Task images a run needs that are on none of its Docker hosts' disks (and were not pulled)."""

    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing   # host -> ["instance_id (image)", ...]
        lines = [f"{host}: {len(names)} missing: " + ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
                 for host, names in missing.items()]
        super().__init__("task images missing (python -m protege.rollout.envs.images prepare --tasks FILE "
                         "--pull makes them available):\n" + "\n".join(lines))


def pull(client: docker.DockerClient, image: str, retries: int = 3, log=print) -> None:
    """docker pull with a progress line per layer completed and retries with backoff (registries time out)."""
    if "@" in image:   # pinned by digest: the reference is the whole name
        repository, tag = image, None
    else:
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    for attempt in range(1, retries + 1):
        try:
            done = set()
            for event in client.api.pull(repository, tag=tag, stream=True, decode=True):
                if event.get("error"):
                    raise RuntimeError(event["error"])
                if event.get("status") in ("Pull complete", "Already exists") and event.get("id") not in done:
                    done.add(event.get("id"))
                    log(f"pull {image}: {len(done)} layer(s) ready")
            return
        except Exception as e:  # noqa: BLE001 -- the SDK and the registry fail in many ways; retried, then reported
            if attempt == retries:
                raise RuntimeError(f"pulling {image} failed after {retries} attempts: {e}") from None
            log(f"pull {image}: attempt {attempt} failed ({e}); retrying")
            time.sleep(2 ** attempt)


def prepare_images(client: docker.DockerClient, tasks: list[Task], base: str = "debootstrap", pull_missing=False,
                   log=print) -> dict[str, list[str]]:
    """Every task's image on this Docker host: built (tasks with a source), pulled (others, with pull_missing)
    or already present. Returns {"present": [...], "built": [...], "pulled": [...], "missing": [...]} of
    "instance_id (image)" names; nothing is done twice (present images are kept), so a rerun resumes."""
    out = {"present": [], "built": [], "pulled": [], "missing": []}
    base_image = None
    for task in tasks:
        name = f"{task.instance_id} ({task.image})"
        present = _exists(client, task.image)
        if task.source is not None:
            base_image = base_image or ensure_base_image(client, base, log)
            ensure_task_image(client, task, base_image, log)
            out["present" if present else "built"].append(name)
        elif present:
            out["present"].append(name)
        elif pull_missing:
            try:
                pull(client, task.image, log=log)
                out["pulled"].append(name)
            except RuntimeError as e:
                log(str(e))
                out["missing"].append(name)
        else:
            out["missing"].append(name)
    return out


def prepare_hosts(tasks: list[Task], hosts: list[str | None], base: str = "debootstrap", pull_missing=False,
                  log=print) -> dict[str, dict[str, list[str]]]:
    """prepare_images on each Docker host (None: the environment's, DOCKER_HOST or the local socket), the
    hosts in parallel. Raises ImagesMissing naming every image still missing on any host."""
    from concurrent.futures import ThreadPoolExecutor

    def one(host):
        client = _docker().DockerClient(base_url=host) if host else _docker().from_env()
        try:
            return prepare_images(client, tasks, base, pull_missing, lambda m: log(f"[{host or 'local'}] {m}"))
        finally:
            client.close()
    with ThreadPoolExecutor(max(1, len(hosts))) as pool:
        results = dict(zip([h or "local" for h in hosts], pool.map(one, hosts)))
    missing = {host: r["missing"] for host, r in results.items() if r["missing"]}
    if missing:
        raise ImagesMissing(missing)
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse
    from protege.rollout.tasks import BUNDLED_JSONL, TaskFormatError, load_tasks
    p = argparse.ArgumentParser(prog="python -m protege.rollout.envs.images",
                                description="Make every task's image available on every Docker host a run uses.")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build (bundled tasks) or pull (others) each task's image on each host")
    prep.add_argument("--tasks", default=str(BUNDLED_JSONL), help="task file (.json, .jsonl, .parquet)")
    prep.add_argument("--hosts", nargs="+", default=[None], metavar="URL",
                      help="Docker hosts (unix:///run/docker.sock, tcp://node2:2375, ...); default: DOCKER_HOST")
    prep.add_argument("--pull", action="store_true", help="pull images that are missing from their registry")
    prep.add_argument("--base", default="debootstrap",
                      help="'debootstrap' (needs root; Debian mirrors only) or a registry image to build on")
    args = p.parse_args(argv)
    try:
        tasks = load_tasks(args.tasks)
    except TaskFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        results = prepare_hosts(tasks, args.hosts, args.base, args.pull, log=lambda m: print(m, file=sys.stderr))
    except (ImagesMissing, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": round(time.monotonic() - started, 1),
                      "hosts": {h: {k: len(v) for k, v in r.items()} for h, r in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
