"""A task's Python environment from its declaration (rollout.tasks.EnvSpec), the same for both backends:
the declared packages' wheels come from the package index once (`pip download` here, where the index is
reachable) into a wheelhouse cached by the declaration's key; a virtual environment is made from the
declared Python and the packages are installed into it from that wheelhouse, offline. Docker bakes the
virtual environment into the task image (/opt/protege-env); the sandbox builds it once per key under the
cache directory and mounts it at /tmp/protege-env (as the sandbox sees it: the interpreter and the
packages are the environment's own, wherever the engine itself is installed).

The cache directory is $PROTEGE_CACHE, else ~/.cache/protege."""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from protege.rollout.tasks import EnvSpec

# Always fetched besides the declared packages: pip runs the install commands, setuptools and wheel build
# the repository where its install step needs them (build isolation finds them in the wheelhouse).
BOOTSTRAP = ("pip", "setuptools", "wheel")

# Untracked files an install step leaves in the repository (build/, *.egg-info) are no change of the agent's:
# excluded from its diff (.git/info/exclude, which git add -A honours).
EXCLUDE_INSTALL_LITTER = ("git ls-files --others --exclude-standard -z | "
                          "while IFS= read -r -d '' f; do printf '/%s\\n' \"$f\"; done >> .git/info/exclude")
COMPLETE = ".complete"   # written last: a directory without it is a build that died, built again


def cache_dir() -> Path:
    return Path(os.environ.get("PROTEGE_CACHE") or Path.home() / ".cache" / "protege")


@contextmanager
def _locked(name: str):
    """An exclusive lock across threads and processes (flock on a file of its own per open)."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def offline_pip_env(wheels: str) -> dict[str, str]:
    """pip inside an environment: only the wheelhouse, no index, no host configuration."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": wheels, "PIP_CONFIG_FILE": os.devnull,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}


def wheelhouse(spec: EnvSpec, log=print) -> Path:
    """The wheels of the declaration's packages (and pip, setuptools, wheel) for its Python, downloaded
    from the package index unless already cached."""
    target = cache_dir() / "wheels" / spec.key
    with _locked(f"wheels-{spec.key}"):
        if (target / COMPLETE).is_file():
            return target
        shutil.rmtree(target, ignore_errors=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        log(f"downloading wheels for Python {spec.python}: {' '.join(spec.packages)}")
        proc = subprocess.run([*_host_pip(), "download", "--quiet", "--disable-pip-version-check",
                               "--dest", str(partial), "--only-binary=:all:", "--python-version", spec.python,
                               *BOOTSTRAP, *spec.packages], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"environment packages {list(spec.packages)} for Python {spec.python}: pip download "
                               f"failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
        (partial / COMPLETE).write_text(" ".join(spec.packages) + "\n")
        partial.rename(target)
    return target


def _host_pip() -> list[str]:
    """pip on this machine, to download with: the engine's own, else one on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        if shutil.which(name):
            return [shutil.which(name)]
    raise RuntimeError("no pip here to download the environment's packages with (pip install pip)")


def pip_wheel(wheels: Path) -> Path:
    """pip's own wheel in the wheelhouse (pip runs from it: python pip.whl/pip install ...)."""
    found = sorted(wheels.glob("pip-*.whl"))
    if not found:
        raise RuntimeError(f"{wheels}: no pip wheel")
    return found[-1]


def venv_commands(spec: EnvSpec, env_dir: str, wheels_dir: str, pip_whl_name: str) -> str:
    """Shell that makes the virtual environment at env_dir and installs pip and the packages into it from
    wheels_dir (as the building machine or container sees them)."""
    import shlex
    packages = " ".join(shlex.quote(p) for p in ("pip", *spec.packages))
    return (f"python{spec.python} -m venv --without-pip {env_dir} && "
            f"{env_dir}/bin/python {wheels_dir}/{pip_whl_name}/pip install --quiet --no-index "
            f"--find-links {wheels_dir} {packages}")


def host_python(version: str) -> str:
    """An interpreter of `version` on this machine, preferring the system's (outside home directories and
    /tmp, so that the sandbox sees it at the same path)."""
    candidates = [f"/usr/bin/python{version}", f"/usr/local/bin/python{version}", shutil.which(f"python{version}")]
    base = getattr(sys, "_base_executable", sys.executable)
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        candidates.append(base)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK) and not os.path.realpath(c).startswith("/tmp/"):
            return os.path.realpath(c)
    raise RuntimeError(f"environment.python {version}: no Python {version} on this machine outside /tmp "
                       f"(looked for /usr/bin/python{version}, /usr/local/bin/python{version}, python{version} "
                       "on PATH); install it or use the Docker backend")


def sandbox_venv(spec: EnvSpec, run_sandboxed, log=print) -> Path:
    """The cached virtual environment of `spec` for the sandbox, built unless present. run_sandboxed(binds,
    command, tool_paths) runs `command` under bubblewrap with `binds` ((host path, sandbox path, writable)); the
    environment is built at the path the sandbox mounts it on, so its scripts' #! lines hold there."""
    from protege.rollout.envs.sandbox import SANDBOX_ENV_DIR, SANDBOX_WHEELS_DIR
    target = cache_dir() / "venvs" / spec.key
    if (target / COMPLETE).is_file():
        return target
    python = host_python(spec.python)   # before any download: no such Python, no work
    wheels = wheelhouse(spec, log)
    with _locked(f"venv-{spec.key}"):
        if (target / COMPLETE).is_file():
            return target
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        log(f"building the environment {spec.key} (Python {spec.python}: {python})")
        script = venv_commands(spec, SANDBOX_ENV_DIR, SANDBOX_WHEELS_DIR, pip_wheel(wheels).name)
        # python<version> on PATH inside the sandbox is the chosen interpreter
        script = script.replace(f"python{spec.python} -m venv", f"{python} -m venv", 1)
        code, output = run_sandboxed([(str(target), SANDBOX_ENV_DIR, True), (str(wheels), SANDBOX_WHEELS_DIR, False)],
                                     script, [os.path.dirname(python)])
        if code != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise RuntimeError(f"building the environment {spec.to_dict()} failed (exit {code}): {output[-2000:]}")
        (target / COMPLETE).write_text(f"{python}\n")
    return target
