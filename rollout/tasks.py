"""SWE tasks: loading SWE-bench-format instances (SWE-bench 5.x, SWE-Gym, SWE-smith rows) from local
JSON / JSONL / parquet files, and the bundled task set in data/tasks/.

A bundled task is a directory: repo/ (the files at the base commit), gold/ and tests/ (files the fix and
the new tests overwrite or add), wrong/ (a plausible fix that is wrong, a negative for tests), task.json
(instance_id, FAIL_TO_PASS, PASS_TO_PASS, optionally environment: see EnvSpec) and issue.md. `python -m protege.rollout.tasks` turns them into
data/tasks/instances.jsonl: the repo is committed with fixed author, committer and dates, so the base
commit hash is reproducible, and the patches are `git diff`s against it."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from protege.engine.optional import require
from protege.rewards.patches import new_files, patch_files, reverse_patch

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
BUNDLED_JSONL = BUNDLED_DIR / "instances.jsonl"
# Real upstream bug fixes (released projects' own code and tests), in the same layout: a set of their own,
# apart from the built-in default.
UPSTREAM_DIR = BUNDLED_DIR / "upstream"
UPSTREAM_JSONL = UPSTREAM_DIR / "instances.jsonl"
TEST_COMMAND = "python3 -m pytest -rA -p no:cacheprovider"

# Fixed identity and dates: the same files always give the same base commit hash.
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Protege Tasks", "GIT_AUTHOR_EMAIL": "tasks@protege.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00+0000",
    "GIT_COMMITTER_NAME": "Protege Tasks", "GIT_COMMITTER_EMAIL": "tasks@protege.invalid",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+0000",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
}


class TaskFormatError(ValueError):
    """A task file or row that cannot be used; the message names the file, the instance and the field."""


DEFAULT_PYTHON = "3.11"
DEFAULT_TEST_PACKAGES = ("pytest==8.3.5",)


@dataclass(frozen=True)
class EnvSpec:
    """A task's environment, declared as SWE-bench's specs do: the Python version, the packages its tests
    need (pip requirements, from the package index), commands before and for installing the repository
    (run in its root, offline, with pip finding only the declared packages' wheels) and the test command.
    Docker bakes it into the task image; the sandbox builds a virtual environment from it (cached by
    `key`). Both put the environment's interpreter first on PATH."""
    python: str = DEFAULT_PYTHON
    packages: tuple[str, ...] = DEFAULT_TEST_PACKAGES
    pre_install: tuple[str, ...] = ()
    install: str = ""
    test_cmd: str = ""

    @property
    def test_command(self) -> str:
        return self.test_cmd or TEST_COMMAND

    @property
    def key(self) -> str:
        """What the virtual environment holds (interpreter and packages): the cache key of a built one."""
        return hashlib.sha256(json.dumps([self.python, sorted(self.packages)]).encode()).hexdigest()[:16]

    @property
    def image_key(self) -> str:
        """Everything of the declaration that goes into a task image or decides its grade (interpreter,
        packages, pre-install and install commands, test command): a changed environment gets a new image
        tag, never an image built for the old one."""
        return hashlib.sha256(json.dumps(["image", self.python, sorted(self.packages), list(self.pre_install),
                                          self.install, self.test_cmd]).encode()).hexdigest()[:16]

    @property
    def setup_commands(self) -> tuple[str, ...]:
        return self.pre_install + ((self.install,) if self.install else ())

    def to_dict(self) -> dict:
        return {"python": self.python, "packages": list(self.packages), "pre_install": list(self.pre_install),
                "install": self.install, "test_cmd": self.test_cmd}


_FIELDS = ("python", "packages", "pip_packages", "pre_install", "install", "test_cmd")


def parse_env_spec(value, where: str) -> EnvSpec:
    """An EnvSpec from a row's or task.json's `environment` (an object, or its JSON text); SWE-bench's
    spelling is accepted: `pip_packages` (a list) and `packages` (a list, or a space-separated string)."""
    def error(field: str, problem: str) -> TaskFormatError:
        return TaskFormatError(f"{where}: field 'environment.{field}': {problem}" if field
                               else f"{where}: field 'environment': {problem}")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise error("", f"not a JSON object: {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise error("", f"expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise error(unknown[0], f"unknown (known: {', '.join(_FIELDS)})")

    def strings(field: str) -> tuple[str, ...]:
        v = value.get(field, [])
        if isinstance(v, str) and field == "packages":
            v = v.split()
        if isinstance(v, str) and field == "pre_install":
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise error(field, "expected a list of non-empty strings")
        return tuple(v)

    python = value.get("python", DEFAULT_PYTHON)
    if isinstance(python, (int, float)) and not isinstance(python, bool):
        python = str(python)
    if not isinstance(python, str) or not re.fullmatch(r"3\.\d+", python):
        raise error("python", f"expected a version like \"3.11\", got {python!r}")
    packages = strings("packages") + strings("pip_packages")
    if any(p.startswith("-") for p in packages):
        raise error("packages", "options are not packages (one requirement per entry)")
    test_cmd = value.get("test_cmd", "")
    if isinstance(test_cmd, list) and len(test_cmd) == 1:
        test_cmd = test_cmd[0]
    for field, v in (("install", value.get("install", "")), ("test_cmd", test_cmd)):
        if not isinstance(v, str):
            raise error(field, f"expected a string, got {type(v).__name__}")
    return EnvSpec(python=python, packages=packages or DEFAULT_TEST_PACKAGES, pre_install=strings("pre_install"),
                   install=value.get("install", ""), test_cmd=test_cmd)


@dataclass(frozen=True)
class Task:
    instance_id: str
    repo: str
    base_commit: str              # commit (or ref) the agent starts from and the final diff is taken against
    problem_statement: str
    patch: str                    # the gold fix
    test_patch: str               # new/changed tests applied at evaluation ("" when the tests already exist)
    fail_to_pass: tuple[str, ...]
    pass_to_pass: tuple[str, ...]
    image: str                    # Docker image with the repository at /testbed
    eval_script: str              # bash: applies test_patch, runs the tests between swebench's output markers
    log_parser: str = "parse_log_pytest"
    eval_type: str = "pass_and_fail"   # swebench's EvalType.PASS_AND_FAIL
    version: str = ""
    hints_text: str = ""
    source: str | None = None     # bundled tasks: directory holding the repository's files at base_commit
    environment: EnvSpec | None = None  # None: the image is used as it is (Docker), the default spec (sandbox)

    @property
    def env_spec(self) -> EnvSpec:
        return self.environment or EnvSpec()

    def swebench_instance(self) -> dict:
        """The row as swebench's make_test_spec wants it."""
        return {"instance_id": self.instance_id, "repo": self.repo, "version": self.version,
                "image": self.image, "eval_script": self.eval_script, "log_parser": self.log_parser,
                "eval_type": self.eval_type, "FAIL_TO_PASS": list(self.fail_to_pass),
                "PASS_TO_PASS": list(self.pass_to_pass)}


# ---------------------------------------------------------------------------------------------- loading

def load_tasks(path: str | os.PathLike, format: str = "auto", image_namespace: str = "swebench") -> list[Task]:
    """Tasks from a .json (list of rows), .jsonl or .parquet file.

    format: "swebench" (SWE-bench and SWE-Gym rows), "swesmith", or "auto" (per row: a row with image_name
    and no test_patch is SWE-smith). Rows without an image get swebench's derived image name."""
    path = Path(path)
    if format not in ("auto", "swebench", "swesmith"):
        raise ValueError(f"unknown task format {format!r} (auto, swebench, swesmith)")
    rows = _read_rows(path)
    tasks, seen = [], set()
    for index, row in enumerate(rows):
        where = f"{path}: row {index + 1}"
        if not isinstance(row, dict):
            raise TaskFormatError(f"{where}: expected an object, got {type(row).__name__}")
        row_format = format
        if format == "auto":
            row_format = "swesmith" if "image_name" in row and "test_patch" not in row else "swebench"
        task = _task_from_row(row, row_format, where, path.parent, image_namespace)
        if task.instance_id in seen:
            raise TaskFormatError(f"{where}: instance {task.instance_id!r}: duplicate instance_id")
        seen.add(task.instance_id)
        tasks.append(task)
    return tasks


def bundled_tasks() -> list[Task]:
    return load_tasks(BUNDLED_JSONL)


def upstream_tasks() -> list[Task]:
    return load_tasks(UPSTREAM_JSONL)


def _read_rows(path: Path) -> list:
    if not path.is_file():
        raise TaskFormatError(f"{path}: no such task file")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskFormatError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise TaskFormatError(f"{path}: expected a JSON list of task rows, got {type(rows).__name__}")
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise TaskFormatError(f"{path}: unsupported task file type {path.suffix!r} (.json, .jsonl, .parquet)")


class _Row:
    """Field access that names the file, the instance and the field on every error."""

    def __init__(self, row: dict, where: str):
        self.row = row
        iid = row.get("instance_id")
        self.where = f"{where}: instance {iid!r}" if isinstance(iid, str) and iid else where

    def error(self, field: str, problem: str) -> TaskFormatError:
        return TaskFormatError(f"{self.where}: field {field!r}: {problem}")

    def text(self, field: str, required: bool = True, allow_empty: bool = False) -> str:
        value = self.row.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing")
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and field == "version":
            return str(value)
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        if required and not allow_empty and not value.strip():
            raise self.error(field, "empty")
        return value

    def tests(self, field: str, non_empty: bool) -> tuple[str, ...]:
        value = self.row.get(field)
        if value is None:
            raise self.error(field, "missing")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise self.error(field, f"not a JSON list of test ids: {value[:80]!r}") from None
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t for t in value):
            raise self.error(field, "expected a list of non-empty test id strings")
        if non_empty and not value:
            raise self.error(field, "empty: a task needs at least one test that the fix makes pass")
        return tuple(value)

    def diff(self, field: str, required: bool = True) -> str:
        value = self.text(field, required=required, allow_empty=not required)
        if value.strip() and "\n@@ " not in "\n" + value and "Binary files" not in value:
            raise self.error(field, "not a unified diff (no @@ hunk)")
        return value


def _task_from_row(row: dict, row_format: str, where: str, base_dir: Path, image_namespace: str) -> Task:
    r = _Row(row, where)
    instance_id = r.text("instance_id")
    fail_to_pass = r.tests("FAIL_TO_PASS", non_empty=True)
    pass_to_pass = r.tests("PASS_TO_PASS", non_empty=False)
    if row_format == "swesmith":
        # SWE-smith's patch creates the bug; the instance's branch (named by instance_id) holds it.
        base_commit = instance_id
        try:
            patch = reverse_patch(r.diff("patch"))
        except ValueError as e:
            raise r.error("patch", str(e)) from None
        test_patch = ""
        image = r.text("image_name")
    else:
        base_commit = r.text("base_commit")
        patch = r.diff("patch")
        test_patch = r.diff("test_patch", required=False)
        image = r.text("image", required=False) or swebench_image_name(instance_id, image_namespace)
    log_parser = r.text("log_parser", required=False) or "parse_log_pytest"
    constants = _harness("constants")
    if log_parser not in _harness("log_parsers").PARSER_REGISTRY:
        raise r.error("log_parser", f"unknown parser {log_parser!r} (not in swebench's PARSER_REGISTRY)")
    eval_type = r.text("eval_type", required=False) or constants.EvalType.PASS_AND_FAIL.value
    if eval_type not in {t.value for t in constants.EvalType}:
        raise r.error("eval_type", f"unknown eval type {eval_type!r}")
    environment = parse_env_spec(row["environment"], r.where) if row.get("environment") is not None else None
    eval_script = r.text("eval_script", required=False)
    if not eval_script:
        test_files = patch_files(test_patch) or sorted({t.split("::")[0] for t in fail_to_pass + pass_to_pass})
        eval_script = default_eval_script(base_commit, test_patch, test_files,
                                          (environment or EnvSpec()).test_command)
    elif constants.START_TEST_OUTPUT not in eval_script or constants.END_TEST_OUTPUT not in eval_script:
        raise r.error("eval_script", f"does not echo the markers {constants.START_TEST_OUTPUT!r} and "
                                     f"{constants.END_TEST_OUTPUT!r}")
    source = r.text("source", required=False)
    if source:
        source = str((base_dir / source).resolve())
        if not os.path.isdir(source):
            raise r.error("source", f"{source} is not a directory")
    return Task(instance_id=instance_id, repo=r.text("repo"), base_commit=base_commit,
                problem_statement=r.text("problem_statement"), patch=patch, test_patch=test_patch,
                fail_to_pass=fail_to_pass, pass_to_pass=pass_to_pass, image=image, eval_script=eval_script,
                log_parser=log_parser, eval_type=eval_type, version=r.text("version", required=False),
                hints_text=r.text("hints_text", required=False), source=source or None, environment=environment)


def _harness(module: str):
    """A module of swebench's harness (its markers, log parsers, eval types), imported on use."""
    return require(f"swebench.harness.{module}", "SWE-bench task files (markers, log parsers)")


def swebench_image_name(instance_id: str, namespace: str = "swebench") -> str:
    """The image name swebench derives for an instance (its Docker Hub convention)."""
    return f"{namespace}/sweb.eval.x86_64.{instance_id}:latest".lower().replace("__", "_1776_")


# ---------------------------------------------------------------------------------------------- eval script

def default_eval_script(base_commit: str, test_patch: str, test_files: list[str],
                        test_command: str = TEST_COMMAND) -> str:
    """A swebench-style eval script (run in the repository root): reset the test files, apply the test
    patch, run the tests between the output markers, reset the test files again."""
    new = new_files(test_patch)
    existing = [f for f in test_files if f not in new]
    quoted = " ".join(_quote(f) for f in test_files)
    reset = []
    if existing:
        reset.append(f"git checkout {base_commit} -- {' '.join(_quote(f) for f in existing)}")
    if new:
        reset.append(f"rm -f -- {' '.join(_quote(f) for f in sorted(new))}")
    lines = ["#!/bin/bash", "set -uxo pipefail", *reset]
    if test_patch.strip():
        delimiter = "EOF_PROTEGE_TEST_PATCH"
        lines += [f"git apply -v - <<'{delimiter}'", test_patch.rstrip("\n"), delimiter]
    # `:` lines, as swebench writes them: under `set -x` each marker appears in the log exactly once.
    constants = _harness("constants")
    lines += [f": '{constants.START_TEST_OUTPUT}'", f"{test_command} {quoted}", f": '{constants.END_TEST_OUTPUT}'",
              *reset]
    return "\n".join(lines) + "\n"


def _quote(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------------------- bundled repos

def _git(cwd: str, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **_GIT_ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


def _copy_files(src: str, dest: str) -> None:
    for root, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), src)
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(dest, rel))
            os.chmod(os.path.join(dest, rel), 0o644)


def materialize_repo(task: Task, dest: str) -> None:
    """Write a bundled task's repository as a git repo at its base commit into `dest` (new or empty)."""
    if task.source is None:
        raise ValueError(f"{task.instance_id}: not a bundled task (no source directory)")
    _commit_base(task.source, dest)
    head = _git(dest, "rev-parse", "HEAD").strip()
    if head != task.base_commit:
        raise RuntimeError(f"{task.instance_id}: {task.source} commits as {head}, but the task records "
                           f"{task.base_commit}; regenerate the task set with `python -m protege.rollout.tasks`")


def _commit_base(source: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise ValueError(f"{dest} is not empty")
    _copy_files(source, dest)
    _git(dest, "init", "-q", "-b", "main")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "--no-verify", "-m", "Base commit")
    return _git(dest, "rev-parse", "HEAD").strip()


def _overlay_diff(repo: str, base: str, overlay: Path) -> str:
    _copy_files(str(overlay), repo)
    _git(repo, "add", "-A")
    patch = _git(repo, "diff", "--cached", base)
    _git(repo, "reset", "-q", "--hard", base)
    return patch


def bundled_instance(task_dir: Path) -> dict:
    """The instance row of one bundled task directory."""
    meta = json.loads((task_dir / "task.json").read_text())
    spec = parse_env_spec(meta.get("environment", {}), str(task_dir / "task.json"))
    with tempfile.TemporaryDirectory(prefix="protege-task-") as tmp:
        repo = os.path.join(tmp, "repo")
        base = _commit_base(str(task_dir / "repo"), repo)
        patch = _overlay_diff(repo, base, task_dir / "gold")
        test_patch = _overlay_diff(repo, base, task_dir / "tests")
        wrong_patch = _overlay_diff(repo, base, task_dir / "wrong")
    return {
        "instance_id": meta["instance_id"], "repo": f"protege/{task_dir.name}", "base_commit": base,
        "problem_statement": (task_dir / "issue.md").read_text(), "hints_text": "",
        "patch": patch, "test_patch": test_patch,
        "FAIL_TO_PASS": meta["FAIL_TO_PASS"], "PASS_TO_PASS": meta["PASS_TO_PASS"],
        "version": "1.0", "environment_setup_commit": base,
        "image": bundled_image_tag(task_dir.name, base, spec),
        "eval_script": default_eval_script(base, test_patch, patch_files(test_patch), spec.test_command),
        "environment": spec.to_dict(),
        "log_parser": "parse_log_pytest", "eval_type": _harness("constants").EvalType.PASS_AND_FAIL.value,
        "source": f"{task_dir.name}/repo", "wrong_patch": wrong_patch,
    }


def bundled_image_tag(name: str, base_commit: str, spec: EnvSpec) -> str:
    """A bundled task's image tag: its repository's commit and its whole environment (EnvSpec.image_key), so
    that editing any part of the environment names a new image."""
    return f"protege/task.{name}:{base_commit[:12]}-{spec.image_key[:12]}"


def bundled_rows(directory: Path = BUNDLED_DIR) -> list[dict]:
    return [bundled_instance(d) for d in sorted(directory.iterdir()) if (d / "task.json").is_file()]


if __name__ == "__main__":
    for directory, path in ((BUNDLED_DIR, BUNDLED_JSONL), (UPSTREAM_DIR, UPSTREAM_JSONL)):
        rows = bundled_rows(directory)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} tasks to {path}", file=sys.stderr)
