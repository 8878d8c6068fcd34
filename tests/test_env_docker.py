"""The Docker environment in real containers: commands, timeouts, files, diffs, isolation, no leaks."""
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from docker_fixtures import protege_containers, scripted_leap_year_fix

pytestmark = pytest.mark.docker


@pytest.fixture
def task(bundled_images):
    return bundled_images["protege__leap_year-1"]


@pytest.fixture
def env(task, docker_client):
    from protege.rollout.envs.docker import DockerEnvironment
    with DockerEnvironment(task, client=docker_client, timeout=30, output_cap=1000) as environment:
        yield environment


def test_hanging_command_is_killed_and_env_keeps_working(env):
    start = time.monotonic()
    result = env.run("echo started; sleep 100", timeout=1)
    assert (result.exit_code, result.timed_out) == (124, True)
    assert "started" in result.output
    # A background process holding the output open hangs the command just the same.
    assert env.run("sleep 100 & echo bg", timeout=1).timed_out
    assert time.monotonic() - start < 20
    sleeps = env.run("cat /proc/[0-9]*/comm | grep -cx sleep").output.strip()
    assert sleeps == "1"  # only init's own sleep is left
    assert env.run("echo alive").output == "alive\n"


def test_files_and_diff(env, task):
    with pytest.raises(FileNotFoundError):
        env.read_file("no/such/file.py")
    with pytest.raises(IsADirectoryError):
        env.read_file("calendarx")
    # Devices and FIFOs would stream without end into this process, or block it: refused.
    env.run("mkfifo pipe")
    for path in ("/dev/zero", "pipe"):
        with pytest.raises(OSError, match="not a regular file"):
            env.read_file(path)
    env.run("rm pipe")
    env.write_file("notes/deep/new file.txt", "héllo\n")
    assert env.read_file("/testbed/notes/deep/new file.txt") == "héllo\n"
    env.run("chmod +x calendarx/leap.py && rm tests/test_leap.py && python3 -c 'import calendarx.leap'")
    env.write_file("calendarx/leap.py", env.read_file("calendarx/leap.py") + "# edited\n")
    assert env.run("stat -c %a calendarx/leap.py").output.strip() == "755"  # the mode is kept
    env.run("mkdir -p calendarx/__pycache__ && touch calendarx/__pycache__/x.pyc && git add calendarx/__init__.py")
    index_before = env.run("git diff --cached --stat").output
    patch = env.diff()
    assert env.run("git diff --cached --stat").output == index_before  # the repository's index is untouched
    assert "diff --git a/notes/deep/new file.txt b/notes/deep/new file.txt" in patch
    assert "+héllo" in patch and "+# edited" in patch and "new mode 100755" in patch
    assert "deleted file mode 100644" in patch and "tests/test_leap.py" in patch
    assert "__pycache__" not in patch
    # The diff is a patch of the base commit: it applies there and reproduces the edits.
    env.run(f"git stash -u -q && git checkout -q {task.base_commit}")
    env.write_file(".git/p.patch", patch)
    assert env.run("git apply .git/p.patch").exit_code == 0
    assert env.diff() == patch


def test_no_network_and_host_untouched(env, tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = textwrap.dedent(f"""
            import socket
            for host in ("127.0.0.1", "1.1.1.1"):
                try:
                    socket.create_connection((host, {port}), timeout=2)
                    print("connected", host)
                except OSError as e:
                    print("refused", host, type(e).__name__)
        """)
        env.write_file("probe.py", probe)
        out = env.run("python3 probe.py").output
    assert "connected" not in out and out.count("refused") == 2
    interfaces = env.run("tail -n +3 /proc/net/dev | cut -d: -f1").output.split()
    assert interfaces == ["lo"]
    env.write_file(str(tmp_path / "escape.txt"), "x")  # a path of the host, inside the container
    assert not (tmp_path / "escape.txt").exists()


def test_scripted_fix_resolves_end_to_end(task, docker_client):
    from protege.rollout.envs.docker import DockerEnvironment
    from protege.rollout.evaluate import evaluate_patch
    with DockerEnvironment(task, client=docker_client) as env:
        patch = scripted_leap_year_fix(env, task)
    assert "tests/regression/test_2000.py" in patch
    result = evaluate_patch(task, patch, backend="docker", client=docker_client)
    assert result.resolved, result.log_tail


def test_containers_never_leak(task, docker_client):
    from protege.rollout.envs.docker import DockerEnvironment
    before = len(protege_containers(docker_client))
    with pytest.raises(ZeroDivisionError):
        with DockerEnvironment(task, client=docker_client) as env:
            assert len(protege_containers(docker_client)) == before + 1
            1 / 0
    assert len(protege_containers(docker_client)) == before
    env.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        env.run("true")
    # A process that exits without closing its environment still removes the container (atexit).
    script = ("from protege.rollout.envs.docker import DockerEnvironment\nfrom protege.rollout.tasks import bundled_tasks\n"
              f"env = DockerEnvironment([t for t in bundled_tasks() if t.instance_id == {task.instance_id!r}][0])\n"
              "print(env.run('echo up').output, end='')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout == "up\n", proc.stderr
    assert len(protege_containers(docker_client)) == before
    # A bad start (missing image) leaves nothing behind either.
    from dataclasses import replace
    with pytest.raises(Exception, match="no-such-image"):
        DockerEnvironment(replace(task, image="protege/no-such-image:0"), client=docker_client)
    assert len(protege_containers(docker_client)) == before
