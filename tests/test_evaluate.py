"""R_correct on every bundled and upstream task, in real containers and in the bubblewrap sandbox: the gold patch
resolves each task, while an empty patch and a plausible wrong fix resolve none; the grading of patches
that do not apply, rewrite the tests, or hang."""
import json

import pytest

from protege.rollout.evaluate import evaluate_patch, evaluate_patches
from protege.rollout.tasks import BUNDLED_JSONL, UPSTREAM_JSONL, bundled_tasks, upstream_tasks

# The upstream set: a released project's own code and tests, whose pytest configuration needs a plugin
# (pytest-cov) and whose package has an install step -- graded only through the task's declared environment.
ROWS = {row["instance_id"]: row for path in (BUNDLED_JSONL, UPSTREAM_JSONL)
        for row in map(json.loads, path.read_text().splitlines())}
TASKS = {task.instance_id: task for task in bundled_tasks() + upstream_tasks()}
STATUS: dict[tuple[str, str], list[dict]] = {}   # (backend, instance) -> test statuses of gold, empty, wrong


def check_gold_empty_wrong(task, **options):
    # One environment for the three (reset in between), then each result on its own.
    gold, empty, wrong = evaluate_patches(task, [task.patch, "", ROWS[task.instance_id]["wrong_patch"]], **options)
    STATUS[options["backend"], task.instance_id] = [r.tests_status for r in (gold, empty, wrong)]
    assert gold.resolved, gold.log_tail
    assert gold.fail_to_pass == {"success": list(task.fail_to_pass), "failure": []}
    assert gold.pass_to_pass == {"success": list(task.pass_to_pass), "failure": []}
    assert all(gold.tests_status[t] == "PASSED" for t in task.fail_to_pass + task.pass_to_pass)

    # Without a fix every FAIL_TO_PASS test fails and every PASS_TO_PASS test passes: the lists are right.
    assert not empty.resolved and empty.patch_applied and empty.tests_ran
    assert empty.fail_to_pass == {"success": [], "failure": list(task.fail_to_pass)}
    assert empty.pass_to_pass == {"success": list(task.pass_to_pass), "failure": []}

    assert not wrong.resolved and wrong.patch_applied and wrong.tests_ran
    assert wrong.fail_to_pass["failure"] or wrong.pass_to_pass["failure"]


@pytest.mark.docker
@pytest.mark.parametrize("instance_id", sorted(TASKS))
def test_docker_gold_resolves_empty_and_wrong_do_not(instance_id, bundled_images, docker_client):
    check_gold_empty_wrong(bundled_images[instance_id], backend="docker", client=docker_client)


@pytest.mark.parametrize("instance_id", sorted(TASKS))
def test_sandbox_gold_resolves_empty_and_wrong_do_not(instance_id, sandbox_ready):
    check_gold_empty_wrong(TASKS[instance_id], backend="sandbox")


def test_both_backends_give_the_same_test_results():
    """Both run the task's declared environment (the same Python and packages): every test of every bundled
    task ends the same way under the gold, the empty and the wrong patch (the tests above fill STATUS)."""
    both = [i for i in TASKS if ("docker", i) in STATUS and ("sandbox", i) in STATUS]
    if not both:
        pytest.skip("needs the Docker and the sandbox runs above (Docker unavailable or deselected)")
    for i in both:
        assert STATUS["docker", i] == STATUS["sandbox", i], i
        assert all(STATUS["docker", i][0].values())


def test_wrong_patches_fail_in_both_ways(sandbox_ready):
    """The wrong fixes include ones that fix the new tests but break old ones (PASS_TO_PASS matters)."""
    chunked = evaluate_patch(TASKS["protege__chunked-1"], ROWS["protege__chunked-1"]["wrong_patch"],
                             backend="sandbox")
    assert chunked.fail_to_pass["failure"] == [] and chunked.pass_to_pass["failure"] == [
        "tests/test_chunks.py::test_even_split"]
    assert not chunked.resolved


def test_patch_that_does_not_apply(sandbox_ready):
    task = TASKS["protege__leap_year-1"]
    stale = task.patch.replace("year % 100 != 0\n", "year % 100 != 1\n", 1)  # context no longer matches
    result = evaluate_patch(task, stale, backend="sandbox")
    assert not result.patch_applied and not result.resolved and not result.tests_ran
    assert "leap.py" in result.log_tail


def test_edits_to_the_tests_do_not_count(sandbox_ready):
    """A patch that rewrites the tests to pass is undone: the eval script resets the test files first."""
    task = TASKS["protege__leap_year-1"]
    cheat = ("diff --git a/tests/test_leap.py b/tests/test_leap.py\n--- a/tests/test_leap.py\n"
             "+++ b/tests/test_leap.py\n@@ -1,4 +1,8 @@\n from calendarx.leap import days_in_month, is_leap\n"
             "+\n+\n+def test_divisible_by_400():\n+    pass\n \n \n def test_common_years():\n")
    result = evaluate_patch(task, cheat, backend="sandbox")
    assert result.patch_applied and not result.resolved
    assert "tests/test_leap.py::test_divisible_by_400" in result.fail_to_pass["failure"]


def test_hanging_tests_time_out_unresolved(sandbox_ready):
    task = TASKS["protege__leap_year-1"]
    hang = task.patch.replace("+    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
                              "+    while True: pass")
    assert hang != task.patch
    result = evaluate_patch(task, hang, backend="sandbox", timeout=3)
    assert result.patch_applied and not result.tests_ran and not result.resolved
