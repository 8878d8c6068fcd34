"""Task images at a run's start: `python -m protege.rollout.envs.images prepare` builds bundled tasks' images and
pulls the others from their registry onto every Docker host (a real registry on the loopback address and a
second real Docker daemon, both started here), and names what is still missing."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from protege.rollout.envs.images import ImagesMissing, base_image_name, main, prepare_hosts

pytestmark = pytest.mark.docker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, log: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"{what} did not come up: {open(log).read()[-1000:]}")


@pytest.fixture(scope="module")
def registry(docker_client):
    """Debian's docker-registry on 127.0.0.1 (Docker pulls from the loopback address without TLS)."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry; scripts/setup.sh does as root)")
    root = tempfile.mkdtemp(prefix="protege-registry-")
    port = free_port()
    config = os.path.join(root, "config.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    log = os.path.join(root, "log")
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False
    wait_for(up, "docker-registry", log)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def second_host(docker_client):
    """A second Docker daemon on its own socket, data root, exec root and pidfile (the first one untouched)."""
    import docker
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("a second Docker daemon needs root and dockerd")
    root = tempfile.mkdtemp(prefix="protege-dockerd2-")
    socket_path = os.path.join(root, "docker.sock")
    log = os.path.join(root, "log")
    proc = subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false",
                             f"--host=unix://{socket_path}", f"--data-root={root}/data", f"--exec-root={root}/exec",
                             f"--pidfile={root}/docker.pid"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"unix://{socket_path}"

    def up():
        try:
            return docker.DockerClient(base_url=url).ping()
        except Exception:  # noqa: BLE001 -- not up yet
            return False
    wait_for(up, "the second dockerd", log)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)


def task_file(tmp_path, image: str):
    """One bundled task's row, not built here (no source): its image must come from a host or a registry."""
    from protege.rollout.tasks import BUNDLED_JSONL, load_tasks
    row = json.loads(BUNDLED_JSONL.read_text().splitlines()[0])
    del row["source"]
    row["image"] = image
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path, load_tasks(path)


def test_prepare_pulls_a_registry_image_onto_every_host(docker_client, registry, second_host, tmp_path, capsys):
    import docker
    image = f"{registry}/protege-test/task:1"
    base = base_image_name(os.environ.get("PROTEGE_BASE_IMAGE", "debootstrap"))
    if not any(base in i.tags for i in docker_client.images.list()):
        pytest.skip(f"no base image {base} to push (the bundled_images fixture builds it)")
    docker_client.images.get(base).tag(image)
    for line in docker_client.api.push(image, stream=True, decode=True):
        assert "error" not in line, line
    docker_client.images.remove(image)
    other = docker.DockerClient(base_url=second_host)
    path, tasks = task_file(tmp_path, image)
    try:
        with pytest.raises(ImagesMissing, match="protege-test/task:1"):   # absent everywhere, no --pull
            prepare_hosts(tasks, [None, second_host])
        assert main(["prepare", "--tasks", str(path), "--hosts", "unix:///var/run/docker.sock", second_host]) == 1
        assert "task images missing" in capsys.readouterr().err
        assert main(["prepare", "--tasks", str(path), "--hosts", "unix:///var/run/docker.sock", second_host,
                     "--pull"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert [h["pulled"] for h in summary["hosts"].values()] == [1, 1]
        for client in (docker_client, other):
            client.images.get(image)
        # A rerun finds them present: nothing pulled twice.
        assert main(["prepare", "--tasks", str(path), "--hosts", "unix:///var/run/docker.sock", second_host]) == 0
        assert [h["present"] for h in json.loads(capsys.readouterr().out)["hosts"].values()] == [1, 1]
    finally:
        for client in (docker_client, other):
            try:
                client.images.remove(image, force=True)
            except docker.errors.ImageNotFound:
                pass
