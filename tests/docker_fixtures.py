"""Session fixtures for real environments (imported by conftest.py, so that every test module shares one
Docker engine and one set of images), and a scripted end-to-end scenario both backends run.

docker_client starts dockerd when it is installed but not running (root only) and stops it at the end;
tests that need Docker skip with the reason otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from docker_daemons import stop_process

PROTEGE_LABEL = "protege.env"


def _ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def docker_client():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
    except docker.errors.DockerException:
        client = None
    if client is not None and _ping(client):
        yield client
        return
    if shutil.which("dockerd") is None:
        pytest.skip("Docker is not installed (apt-get install docker.io) and no engine is running")
    if os.geteuid() != 0:
        pytest.skip("dockerd is installed but not running, and starting it needs root")
    log = tempfile.NamedTemporaryFile(prefix="dockerd-", suffix=".log", delete=False)
    daemon = subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and daemon.poll() is None:
        try:
            client = docker.from_env()
            if _ping(client):
                break
        except docker.errors.DockerException:
            pass
        time.sleep(0.5)
    else:
        daemon.kill()
        with open(log.name) as f:
            pytest.skip(f"dockerd did not come up: {f.read()[-500:]}")
    try:
        yield client
    finally:
        stop_process(daemon, 30)


@pytest.fixture(scope="session")
def bundled_images(docker_client):
    """The bundled and the upstream tasks, with their images built (cached: existing images are kept). The base image is
    bootstrapped with debootstrap (root) unless PROTEGE_BASE_IMAGE names a registry image to build on."""
    from protege.rollout.envs.images import build_images
    from protege.rollout.tasks import bundled_tasks, upstream_tasks
    base = os.environ.get("PROTEGE_BASE_IMAGE", "debootstrap")
    if base == "debootstrap" and (shutil.which("debootstrap") is None or os.geteuid() != 0):
        from protege.rollout.envs.images import base_image_name
        try:
            docker_client.images.get(base_image_name())
        except Exception:
            pytest.skip("no base image: debootstrap needs root and apt-get install debootstrap "
                        "(or set PROTEGE_BASE_IMAGE to a registry image such as python:3.11-slim)")
    tasks = bundled_tasks() + upstream_tasks()
    build_images(tasks, base=base, client=docker_client, log=lambda message: None)
    return {task.instance_id: task for task in tasks}


def protege_containers(client) -> list:
    return client.containers.list(all=True, filters={"label": PROTEGE_LABEL})


@pytest.fixture(scope="session")
def sandbox_ready():
    from protege.rollout.envs.sandbox import SandboxUnavailable, _check_bwrap
    try:
        _check_bwrap()
    except SandboxUnavailable as e:
        pytest.skip(str(e))


def scripted_leap_year_fix(env, task) -> str:
    """Fix the leap_year task through the Environment API alone, as an agent would: look around, read the
    module, edit it, add a regression test, run the tests, and return the final diff."""
    assert env.run("ls calendarx").output.split() == ["__init__.py", "leap.py"]
    source = env.read_file("calendarx/leap.py")
    bug = "return year % 4 == 0 and year % 100 != 0"
    assert bug in source
    env.write_file("calendarx/leap.py",
                   source.replace(bug, "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)"))
    env.write_file("tests/regression/test_2000.py",
                   "from calendarx.leap import is_leap\n\n\ndef test_2000():\n    assert is_leap(2000)\n")
    result = env.run("python3 -m pytest -q -p no:cacheprovider tests")
    assert result.exit_code == 0, result.output
    assert "4 passed" in result.output
    return env.diff()
