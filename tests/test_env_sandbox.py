"""The bubblewrap sandbox: commands, timeouts, files, diffs, and the escapes that must fail."""
import os
import socket
import textwrap
import time

import pytest

from protege.rollout.tasks import bundled_tasks
from docker_fixtures import scripted_leap_year_fix


@pytest.fixture(scope="module")
def task():
    return next(t for t in bundled_tasks() if t.instance_id == "protege__leap_year-1")


@pytest.fixture
def env(task, sandbox_ready, tmp_path):
    from protege.rollout.envs.sandbox import SandboxEnvironment
    with SandboxEnvironment(task, workdir=str(tmp_path), timeout=30, output_cap=1000) as environment:
        yield environment


def _processes_with(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_hanging_command_is_killed_and_env_keeps_working(env):
    marker = f"protege-hang-{os.getpid()}-{time.monotonic_ns()}"
    start = time.monotonic()
    result = env.run(f"echo started; sleep 100 & setsid sleep 101 & bash -c 'exec -a {marker} sleep 102'",
                     timeout=1)
    assert (result.exit_code, result.timed_out) == (124, True)
    assert "started" in result.output
    assert time.monotonic() - start < 20
    # Everything the command started is gone, even what left its session.
    time.sleep(0.2)
    assert _processes_with(marker) == []
    assert env.run("echo alive").output == "alive\n"


def test_files_and_diff(env):
    with pytest.raises(FileNotFoundError):
        env.read_file("no/such/file.py")
    with pytest.raises(IsADirectoryError):
        env.read_file("calendarx")
    env.write_file("notes/deep/new file.txt", "héllo\n")
    assert env.read_file(os.path.join(env.repo_dir, "notes/deep/new file.txt")) == "héllo\n"
    env.run("rm tests/test_leap.py && python3 -c 'import calendarx.leap' && mkdir -p calendarx/__pycache__ "
            "&& touch calendarx/__pycache__/x.pyc")
    env.write_file("calendarx/leap.py", env.read_file("calendarx/leap.py") + "# edited\n")
    patch = env.diff()
    assert env.run("git status --porcelain").output.split() == ["M", "calendarx/leap.py", "D", "tests/test_leap.py",
                                                                "??", "notes/"]  # index untouched
    assert "+héllo" in patch and "+# edited" in patch
    assert "deleted file mode 100644" in patch and "__pycache__" not in patch
    env.run("git stash -u -q")
    env.write_file(".git/p.patch", patch)
    assert env.run("git apply .git/p.patch").exit_code == 0
    assert env.diff() == patch


def test_fifo_in_the_workspace_is_refused_not_waited_on(env):
    """A FIFO the model made: opening it from this (host) process would block forever."""
    import threading
    from protege.rollout.agent import tools
    assert env.run("mkfifo pipe").exit_code == 0
    errors = []

    def touch_the_fifo():
        for operation in (lambda: env.read_file("pipe"), lambda: env.write_file("pipe", "x"),
                          lambda: tools.run_editor(env, {"command": "view", "path": "pipe"})):
            try:
                operation()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
    worker = threading.Thread(target=touch_the_fifo, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "opening the FIFO blocked"
    assert [type(e) for e in errors] == [OSError, OSError, tools.ToolError], errors
    assert "Cannot read pipe" in str(errors[2])
    env.write_file("regular.txt", "a longer first version\n")
    env.write_file("regular.txt", "short\n")  # overwritten, not left with the old tail
    assert env.read_file("regular.txt") == "short\n"


def test_writes_outside_the_workspace_fail(env, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("host\n")
    for path in (str(outside), "../outside.txt", "/etc/protege-escape", "../../x"):
        with pytest.raises(PermissionError):
            env.write_file(path, "escaped")
    env.run(f"ln -s {tmp_path} link")
    with pytest.raises(PermissionError):
        env.write_file("link/outside.txt", "escaped")
    with pytest.raises(PermissionError):
        env.read_file("link/outside.txt")
    # Commands see a read-only system and a private /tmp (what they write there vanishes with them).
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = env.run("echo escaped > /etc/protege-escape; touch /usr/protege-escape; touch /root/protege-escape")
    assert result.output.count("Read-only file system") == 2, result.output  # /root is a private tmpfs
    # Host paths under /tmp (pytest's tmp_path; the checkout itself may be there too) are hidden by the
    # private /tmp, others are read-only: either way nothing reaches the host.
    result = env.run(f"echo escaped > {outside}; touch {project}/protege-escape")
    assert result.exit_code != 0 and "escaped" not in result.output, result.output
    assert outside.read_text() == "host\n"
    for path in ("/etc/protege-escape", "/usr/protege-escape", "/root/protege-escape", f"{project}/protege-escape"):
        assert not os.path.exists(path)


def test_no_network(env):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # The listener is reachable from this (unsandboxed) process...
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        env.write_file("probe.py", textwrap.dedent(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("connected")
            except OSError as e:
                print("refused", type(e).__name__)
        """))
        out = env.run("python3 probe.py").output  # ...but not from the sandbox
    assert out.startswith("refused"), out


def test_host_daemon_sockets_are_out_of_reach(env):
    """A Unix socket ignores both the read-only mount and the network namespace: a command that reached the
    host's Docker socket would be root on the host. /run (where daemons put them) is hidden."""
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run to plant a host socket")
    path = f"/run/protege-test-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        try:
            listener.listen()
            probe = (f"import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect({path!r}); "
                     "print('connected')")
            result = env.run(f'python3 -c "{probe}"')
        finally:
            os.unlink(path)
    assert "connected" not in result.output and result.exit_code != 0, result.output
    assert env.run("test -e /var/run/docker.sock || test -e /run/docker.sock").exit_code != 0


def test_refuses_without_bwrap(task, monkeypatch):
    from protege.rollout.envs import sandbox as env_sandbox
    monkeypatch.setattr(env_sandbox.shutil, "which", lambda name: None)
    env_sandbox._check_bwrap.cache_clear()
    try:
        with pytest.raises(env_sandbox.SandboxUnavailable, match="refusing to run model-written commands"):
            env_sandbox.SandboxEnvironment(task)
    finally:
        env_sandbox._check_bwrap.cache_clear()


def test_scripted_fix_resolves_end_to_end(task, sandbox_ready):
    from protege.rollout.envs.sandbox import SandboxEnvironment
    from protege.rollout.evaluate import evaluate_patch
    with SandboxEnvironment(task) as env:
        patch = scripted_leap_year_fix(env, task)
        workspace = env.host_repo_dir
        assert env.repo_dir == "/tmp/testbed"  # a fixed path: prompts do not depend on the host's temp dir
    assert not os.path.exists(workspace)  # closed on leaving the block
    assert "tests/regression/test_2000.py" in patch
    result = evaluate_patch(task, patch, backend="sandbox")
    assert result.resolved, result.log_tail


def test_home_directories_are_hidden_but_tools_still_run(env):
    if not os.path.isdir("/root") or not os.access("/root", os.W_OK):
        pytest.skip("needs a writable /root to plant a secret")
    secret = f"/root/.protege-secret-{os.getpid()}"
    with open(secret, "w") as f:
        f.write("do-not-leak\n")
    try:
        result = env.run(f"cat {secret}")
        assert result.exit_code != 0 and "do-not-leak" not in result.output
        assert os.path.basename(secret) not in env.run("ls -a /root").output
        assert env.run("python3 -c 'print(6 * 7)'").output.strip() == "42"  # the interpreter is still there
    finally:
        os.remove(secret)


def test_engine_in_a_venv_under_tmp_with_a_bare_path_still_grades(tmp_path, sandbox_ready):
    """The sandbox's /tmp is empty, so an engine installed under /tmp is out of its sight: the tests must run
    with the task's own environment, whatever PATH and interpreter the engine has."""
    import json
    import site
    import subprocess
    import sys
    engine = tmp_path / "engine-venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(engine)],
                   check=True)
    # The engine's site-packages as a site dir (its .pth files too: the editable install's import hook).
    (next(engine.glob("lib/python*/site-packages")) / "engine_deps.pth").write_text(
        f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    script = textwrap.dedent("""
        import json, shutil, sys
        from protege.rollout.evaluate import evaluate_patch
        from protege.rollout.tasks import bundled_tasks
        out = {"python": sys.executable, "python3_on_path": shutil.which("python3")}
        for task in bundled_tasks()[:2]:
            out[task.instance_id] = [evaluate_patch(task, p, backend="sandbox").resolved for p in (task.patch, "")]
        print(json.dumps(out))
    """)
    env = {"PATH": f"{engine}/bin:/usr/bin", "HOME": os.environ.get("HOME", "/root")}
    if "PROTEGE_CACHE" in os.environ:
        env["PROTEGE_CACHE"] = os.environ["PROTEGE_CACHE"]
    done = subprocess.run([str(engine / "bin/python"), "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out.pop("python").startswith(str(tmp_path)) and out.pop("python3_on_path").startswith(str(tmp_path))
    assert out == {t.instance_id: [True, False] for t in bundled_tasks()[:2]}
