"""The local sandbox environment, for machines without Docker: a copy of the repository in a temporary
workspace, every command run under bubblewrap (read-only system, writable workspace, private /tmp and /run,
home directories hidden, no capabilities, no network, own PID namespace). Without a working bwrap it refuses
to run anything: model-written commands never run unsandboxed. Python is the task's environment (its
declaration, rollout.tasks.EnvSpec): a virtual environment built from it once (rollout.envs.pyenv), mounted
at /tmp/protege-env and first on PATH, then /usr/local/bin, /usr/bin, /bin for the system's tools -- never
the engine's own interpreter or the host's PATH. Its pre-install and install commands run in each fresh
workspace, on a copy of the environment."""
from __future__ import annotations

import errno
import functools
import os
import posixpath
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

from protege.rollout.envs.pyenv import EXCLUDE_INSTALL_LITTER
from protege.rollout.envs.base import DEFAULT_OUTPUT_CAP, DEFAULT_TIMEOUT, CommandResult, collect_output, git_diff
from protege.rollout.tasks import Task, materialize_repo


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here."""


@functools.cache
def _check_bwrap() -> str:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed; refusing to run model-written commands "
                                 "unsandboxed (apt-get install bubblewrap, or use the Docker backend)")
    probe = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--dev", "/dev",
                            "--proc", "/proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SandboxUnavailable(f"bubblewrap cannot create a sandbox here: {probe.stderr.strip()}")
    return bwrap


# Hidden behind empty tmpfs: the host's daemon sockets live there (/run/docker.sock is root on the host), and a
# Unix socket is reachable through a read-only mount and from another network namespace.
_RUNTIME_DIRS = tuple(path for path in ("/run", "/var/run") if os.path.isdir(path) and not os.path.islink(path))

# Home directories hold the host's secrets (keys, shell history, tokens): hidden behind empty tmpfs, except
# the tool installations commands need that live there (the environment's base interpreter from pyenv...):
# the top-level directory under the home of each such path is mounted back read-only.
_HOMES = tuple(path for path in ("/root", "/home") if os.path.isdir(path) and not os.path.islink(path))


def _tool_dirs(path_variable: str) -> list[str]:
    keep = set()
    for entry in path_variable.split(os.pathsep):
        real = os.path.realpath(entry) if entry else ""
        for home in _HOMES:
            if real.startswith(home + os.sep):
                depth = 3 if home == "/home" else 2  # /home/<user>/<dir>, /root/<dir>
                top = os.sep.join(real.split(os.sep)[:depth + 1])
                if os.path.isdir(top):
                    keep.add(top)
    return sorted(keep)


SANDBOX_ENV_DIR = "/tmp/protege-env"          # the task's virtual environment, as commands see it
SANDBOX_WHEELS_DIR = "/tmp/protege-wheels"    # its wheelhouse (read-only), for offline install steps
SANDBOX_PATH = f"{SANDBOX_ENV_DIR}/bin:/usr/local/bin:/usr/bin:/bin"
SANDBOX_ENV = {"HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PAGER": "cat",
               "GIT_PAGER": "cat", "TERM": "dumb", "PATH": SANDBOX_PATH, "VIRTUAL_ENV": SANDBOX_ENV_DIR}


def bwrap_argv(bwrap: str, binds: list[tuple[str, str, bool]], env: dict[str, str], chdir: str,
               command: str, tool_paths: list[str] = ()) -> list[str]:
    """bubblewrap around `bash -c command`: the system read-only, empty /tmp, /run and home directories,
    `binds` ((host path, sandbox path, writable)) on top, the tool directories under homes mounted back."""
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            *(arg for path in _RUNTIME_DIRS + _HOMES for arg in ("--tmpfs", path)),
            *(arg for path in _tool_dirs(os.pathsep.join(tool_paths)) for arg in ("--ro-bind", path, path)),
            "--cap-drop", "ALL",
            *(arg for host, inside, writable in binds for arg in ("--bind" if writable else "--ro-bind", host, inside)),
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session", "--chdir", chdir, "--clearenv",
            *(arg for name, value in env.items() for arg in ("--setenv", name, value)),
            "bash", "-c", command]


def run_with_binds(binds: list[tuple[str, str, bool]], command: str, tool_paths: list[str]) -> tuple[int, str]:
    """`command` under bubblewrap with only `binds` (to build an environment, before any workspace)."""
    argv = bwrap_argv(_check_bwrap(), binds, {**SANDBOX_ENV, "PIP_CONFIG_FILE": os.devnull}, "/tmp", command,
                      tool_paths)
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def prepare_environment(spec, log=lambda message: None) -> tuple[Path, Path]:
    """The (virtual environment, wheelhouse) of a declaration, built unless cached: a bad declaration fails
    here, before any work."""
    from protege.rollout.envs import pyenv
    return pyenv.sandbox_venv(spec, run_with_binds, log), pyenv.wheelhouse(spec, log)



def _open_regular(path: str, flags: int):
    """The file at `path`, opened by this (unsandboxed) process only if it is a regular file: a FIFO the
    model made would block the open forever, so it is opened non-blocking and refused."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb" if flags == os.O_RDONLY else "wb")
    except BaseException:
        os.close(fd)
        raise


class SandboxEnvironment:
    # Where commands see the repository: a fixed path (inside the sandbox's private /tmp), so that prompts and
    # trajectories do not depend on the host's random workspace name -- as Docker's /testbed.
    repo_dir = "/tmp/testbed"

    def __init__(self, task: Task, repos_dir: str | None = None, workdir: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, output_cap: int = DEFAULT_OUTPUT_CAP,
                 env: dict[str, str] | None = None):
        """repos_dir: where git clones of non-bundled tasks' repositories live, as owner__name.
        env: the commands' environment variables (default SANDBOX_ENV and offline pip)."""
        from protege.rollout.envs import pyenv
        self.bwrap = _check_bwrap()
        self.task = task
        self.timeout = timeout
        self.output_cap = output_cap
        spec = task.env_spec
        self.env = {**SANDBOX_ENV, **pyenv.offline_pip_env(SANDBOX_WHEELS_DIR)} if env is None else dict(env)
        venv, wheels = prepare_environment(spec)
        self.root = tempfile.mkdtemp(prefix="protege-ws-", dir=workdir)
        self.host_repo_dir = os.path.join(os.path.realpath(self.root), "repo")  # the same files, seen from here
        # The base interpreter the environment's python links to (a pyenv one lives under /root).
        self.tool_paths = [os.path.dirname(os.path.realpath(venv / "bin" / "python"))]
        try:
            if spec.setup_commands:   # the install step writes into the environment: a copy of its own
                shutil.copytree(venv, os.path.join(self.root, "env"), symlinks=True)
                venv = os.path.join(self.root, "env")
            self.binds = [(str(venv), SANDBOX_ENV_DIR, bool(spec.setup_commands)),
                          (str(wheels), SANDBOX_WHEELS_DIR, False), (self.host_repo_dir, self.repo_dir, True)]
            if task.source is not None:
                materialize_repo(task, self.host_repo_dir)
            else:
                self._clone(repos_dir)
            for command in spec.setup_commands:
                done = self._run(command, 1800, 20_000)
                if done.exit_code != 0:
                    raise RuntimeError(f"{task.instance_id}: environment command {command!r} failed "
                                       f"(exit {done.exit_code}): {done.output[-2000:]}")
            if spec.setup_commands:
                done = self._run(EXCLUDE_INSTALL_LITTER, 60, 20_000)
                if done.exit_code != 0:
                    raise RuntimeError(f"{task.instance_id}: cannot exclude install files: {done.output[-2000:]}")
        except BaseException:
            self.close()
            raise


    def _clone(self, repos_dir: str | None) -> None:
        source = os.path.join(repos_dir or "", self.task.repo.replace("/", "__"))
        if repos_dir is None or not os.path.isdir(source):
            raise FileNotFoundError(f"{self.task.instance_id}: no local clone of {self.task.repo} "
                                    f"(looked for {source!r}; pass repos_dir)")
        for args in (["clone", "-q", "--no-checkout", "--no-hardlinks", source, self.host_repo_dir],
                     ["-C", self.host_repo_dir, "-c", "advice.detachedHead=false", "checkout", "-q",
                      self.task.base_commit]):
            proc = subprocess.run(["git", *args], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{self.task.instance_id}: git {args[0]} failed: {proc.stderr.strip()}")

    def __enter__(self) -> "SandboxEnvironment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _argv(self, command: str) -> list[str]:
        return bwrap_argv(self.bwrap, self.binds, self.env, self.repo_dir, command, self.tool_paths)

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        return self._run(command, self.timeout if timeout is None else timeout, self.output_cap)

    def _run(self, command: str, timeout: float, cap: int | None) -> CommandResult:
        if not os.path.isdir(self.host_repo_dir):
            raise RuntimeError("the environment is closed")
        # Own session: on timeout the whole group (bwrap and the sandbox's init) is killed, and the kernel
        # then kills everything left in the sandbox's PID namespace.
        proc = subprocess.Popen(self._argv(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        chunks = iter(lambda: proc.stdout.read1(65536), b"")
        try:
            out, timed_out = collect_output(chunks, cap, timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        finally:
            proc.stdout.close()
            proc.wait()
        return CommandResult(out.text(), 124 if timed_out else proc.returncode, timed_out, out.truncated)

    def _path(self, path: str) -> str:
        """The host path of `path` (relative to the repository, or absolute as commands see it), which must
        lie inside the workspace."""
        inside = posixpath.normpath(posixpath.join(self.repo_dir, path))
        if posixpath.commonpath([inside, self.repo_dir]) != self.repo_dir:
            raise PermissionError(f"{path}: outside the workspace {self.repo_dir}")
        full = os.path.realpath(os.path.join(self.host_repo_dir, posixpath.relpath(inside, self.repo_dir)))
        if os.path.commonpath([full, self.host_repo_dir]) != self.host_repo_dir:  # a symlink pointing out
            raise PermissionError(f"{path}: outside the workspace {self.repo_dir}")
        return full

    def read_file(self, path: str) -> str:
        with _open_regular(self._path(path), os.O_RDONLY) as f:
            return f.read().decode("utf-8")  # UnicodeDecodeError for binary files

    def write_file(self, path: str, content: str) -> None:
        full = self._path(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with _open_regular(full, os.O_WRONLY | os.O_CREAT) as f:
            f.truncate()
            f.write(content.encode("utf-8"))

    def diff(self) -> str:
        return git_diff(self._run, self.task)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
