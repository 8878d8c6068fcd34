"""Docker images for tasks: one base image (Python 3, pytest, git, patch), one image per environment
declaration (rollout.tasks.EnvSpec: a virtual environment with the declared packages, installed offline
from wheels downloaded here), and one image per task with the repository at its base commit in /testbed
and the declaration's pre-install and install commands run. A task image that exists locally and is not
built here (a swebench/sweb.eval.* image) is used as it is.

The base comes either from a registry image where pulls work (e.g. python:3.11-slim) or, on machines that
reach only the Debian mirrors, from debootstrap (`tar | docker import`). Images are built with the plain
builder (`client.images.build`; buildx is not needed) and are skipped when they already exist -- a task image
only when its recipe label (task_recipe: environment image, commit, the whole environment declaration) is
the task's, so that an edited environment is never graded with a stale image. Getting images onto several
hosts, pulled or copied, is prepare.py's."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
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
RECIPE_LABEL = "protege.recipe"   # a task image's recipe (task_recipe): a different one is rebuilt
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
    recipe = task_recipe(task, env_id)
    try:
        # The whole recipe, not only the environment image: an image whose install step differs from the
        # task's would grade with the old install (and disagree with the sandbox, which installs every time).
        if client.images.get(task.image).labels.get(RECIPE_LABEL) == recipe:
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
               {BASE_LABEL: env_id, RECIPE_LABEL: recipe})
    return task.image


def task_recipe(task: Task, env_id: str) -> str:
    """What a bundled task's image is made of: the environment image, the repository's commit and the whole
    environment declaration (EnvSpec.image_key covers pre-install, install and the test command)."""
    return _short_hash(env_id, task.base_commit, task.env_spec.image_key)


def build_images(tasks: list[Task], base: str = "debootstrap", client: docker.DockerClient | None = None,
                 log=print) -> list[str]:
    """The base image and every task's image (existing ones are kept); returns the task image tags."""
    client = client or _docker().from_env()
    base_image = ensure_base_image(client, base, log)
    return [ensure_task_image(client, task, base_image, log) for task in tasks]
