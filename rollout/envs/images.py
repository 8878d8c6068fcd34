"""Docker images for tasks: one base image (Python 3, pytest, git, patch) and one image per task with the
repository at its base commit in /testbed.

The base comes either from a registry image where pulls work (e.g. python:3.11-slim) or, on machines that
reach only the Debian mirrors, from debootstrap (`tar | docker import`). Images are built with the plain
builder (`client.images.build`; buildx is not needed) and are skipped when they already exist."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile

import docker
import docker.errors

from rollout.tasks import Task, materialize_repo

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pytest", "git", "patch")
# Installed on top of a registry image (python:*-slim has Python but neither git nor pytest).
REGISTRY_SETUP = ("RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends git patch "
                  "&& rm -rf /var/lib/apt/lists/* && pip install -q pytest")
# Trimmed from the bootstrapped root file system: nothing a test run reads.
DEBOOTSTRAP_PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/locale", "usr/share/info")
BASE_LABEL = "protege.base"


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
    except docker.errors.ImageNotFound:
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


def ensure_task_image(client: docker.DockerClient, task: Task, base_image: str, log=print) -> str:
    """Build task.image (repo at its base commit in /testbed) on `base_image` unless it exists on that base.

    Only bundled tasks (task.source set) can be built here; other tasks name prebuilt images."""
    base_id = client.images.get(base_image).id
    try:
        if client.images.get(task.image).labels.get(BASE_LABEL) == base_id:
            return task.image
    except docker.errors.ImageNotFound:
        pass
    if task.source is None:
        raise RuntimeError(f"{task.instance_id}: image {task.image!r} does not exist and the task has no "
                           "bundled source to build it from")
    log(f"building {task.image}")
    context = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="protege-ctx-") as tmp:
        materialize_repo(task, os.path.join(tmp, "testbed"))
        dockerfile = (f"FROM {base_image}\nCOPY testbed /testbed\nWORKDIR /testbed\n"
                      "ENV PYTHONDONTWRITEBYTECODE=1\n")
        with tarfile.open(fileobj=context, mode="w") as tar:
            tar.add(os.path.join(tmp, "testbed"), arcname="testbed")
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile.encode()))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=task.image, rm=True, forcerm=True,
                        labels={BASE_LABEL: base_id})
    return task.image


def build_images(tasks: list[Task], base: str = "debootstrap", client: docker.DockerClient | None = None,
                 log=print) -> list[str]:
    """The base image and every task's image (existing ones are kept); returns the task image tags."""
    client = client or docker.from_env()
    base_image = ensure_base_image(client, base, log)
    return [ensure_task_image(client, task, base_image, log) for task in tasks]
