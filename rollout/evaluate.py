"""R_correct: does a patch resolve its task? Apply it in a fresh environment, run the task's eval script
(which applies the test patch and runs the tests), and grade the log with swebench's log parser and
grading: resolved iff every FAIL_TO_PASS test passes and every PASS_TO_PASS test still passes."""
from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import asdict, dataclass, field

from protege.engine.optional import require
from protege.rollout.envs.base import Environment, EnvironmentLost, open_environment
from protege.rollout.tasks import Task

MAX_RESTARTS = 3   # fresh environments for one grading whose host went away

# Inside .git: never part of the repository's diff, writable in both backends.
PATCH_FILE = ".git/protege_model.patch"
SCRIPT_FILE = ".git/protege_eval.sh"
LOG_FILE = ".git/protege_eval.log"
LOG_TAIL = 4000


@dataclass
class EvalResult:
    instance_id: str
    resolved: bool
    patch_applied: bool             # the model patch applied (git apply, or patch with fuzz as swebench does)
    tests_ran: bool                 # the eval script produced a gradable log
    tests_status: dict[str, str] = field(default_factory=dict)  # test id -> PASSED / FAILED / ERROR / SKIPPED
    fail_to_pass: dict[str, list[str]] = field(default_factory=dict)  # {"success": [...], "failure": [...]}
    pass_to_pass: dict[str, list[str]] = field(default_factory=dict)
    log_tail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_patch(task: Task, patch: str, backend: str = "docker", env: Environment | None = None,
                   timeout: float = 1800.0, **env_options) -> EvalResult:
    """Grade `patch` on `task` in a fresh environment of `backend` ("docker" or "sandbox"), or in `env`
    (which must be fresh: at the base commit, unchanged); an environment opened here is closed here."""
    if env is not None:
        return _evaluate(env, task, patch, timeout)
    for restart in range(MAX_RESTARTS + 1):
        env = open_environment(task, backend, **env_options)
        try:
            return _evaluate(env, task, patch, timeout)
        except EnvironmentLost:   # its host went away (a host pool places the next try elsewhere)
            if restart == MAX_RESTARTS:
                raise
        finally:
            env.close()


def evaluate_patches(task: Task, patches: list[str], backend: str = "docker", timeout: float = 1800.0,
                     **env_options) -> list[EvalResult]:
    """Grade several patches of one task (say, a GRPO group) in one environment, restoring the repository
    to the base commit between them (git reset --hard, git clean -ffdx): one container start instead of
    one per patch. Files outside the repository are shared between the runs; where one patch's test run
    must not see another's leftovers there, use evaluate_patch."""
    env = open_environment(task, backend, **env_options)
    try:
        results = []
        for i, patch in enumerate(patches):
            if i:
                base = shlex.quote(task.base_commit)
                reset = env.run(f"git reset -q --hard {base} && git clean -ffdxq && "
                                'test -z "$(git status --porcelain)"', timeout=300)
                if reset.exit_code != 0:
                    raise RuntimeError(f"{task.instance_id}: cannot restore the repository between evaluations: "
                                       f"{reset.output[-2000:]}")
            results.append(_evaluate(env, task, patch, timeout))
        return results
    finally:
        env.close()


def _evaluate(env: Environment, task: Task, patch: str, timeout: float) -> EvalResult:
    if patch.strip():
        env.write_file(PATCH_FILE, patch if patch.endswith("\n") else patch + "\n")
        applied = env.run(f"git apply -v {PATCH_FILE} || patch --batch --fuzz=5 -p1 -i {PATCH_FILE}", timeout=300)
        if applied.exit_code != 0:
            return EvalResult(task.instance_id, resolved=False, patch_applied=False, tests_ran=False,
                              log_tail=applied.output[-LOG_TAIL:])
    constants = require("swebench.harness.constants", "grading a patch (R_correct)")
    grading = require("swebench.harness.grading", "grading a patch (R_correct)")
    test_spec = require("swebench.harness.utils", "grading a patch (R_correct)").make_test_spec(task.swebench_instance())
    env.write_file(SCRIPT_FILE, test_spec.eval_script)
    ran = env.run(f"bash {SCRIPT_FILE} > {LOG_FILE} 2>&1", timeout=timeout)
    try:
        log = env.read_file(LOG_FILE)
    except FileNotFoundError:
        log = ran.output
    if ran.timed_out:
        log += f"\n{constants.TESTS_TIMEOUT} after {timeout} s\n"  # swebench's marker: the run is not gradable

    with tempfile.TemporaryDirectory(prefix="protege-eval-") as tmp:
        log_path = os.path.join(tmp, "test_output.txt")
        with open(log_path, "w") as f:
            f.write(log)
        status_map, found = grading.get_logs_eval(test_spec, log_path)
        prediction = {"instance_id": task.instance_id, "model_patch": patch, "model_name_or_path": "protege"}
        report = grading.get_eval_report(test_spec, prediction, log_path, include_tests_status=True)[task.instance_id]
    tests = report.get("tests_status", {})
    return EvalResult(task.instance_id, resolved=bool(report["resolved"]), patch_applied=True, tests_ran=found,
                      tests_status=status_map, fail_to_pass=tests.get(constants.FAIL_TO_PASS, {}),
                      pass_to_pass=tests.get(constants.PASS_TO_PASS, {}), log_tail=log[-LOG_TAIL:])
