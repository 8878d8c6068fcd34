"""Task loading (SWE-bench 5.x, SWE-bench/SWE-Gym, SWE-smith rows; JSON, JSONL, parquet), the errors for
bad rows, patch reversal, and the bundled task set."""
import json
import os
import re
import subprocess
from dataclasses import replace

import pytest

from protege.rewards.patches import patch_files, reverse_patch
from protege.rollout.tasks import (BUNDLED_JSONL, TaskFormatError, bundled_rows, bundled_tasks, load_tasks,
                           materialize_repo, swebench_image_name)

ROWS = [json.loads(line) for line in BUNDLED_JSONL.read_text().splitlines()]
# The rows as they appear elsewhere: without the bundled source directory (relative to instances.jsonl).
PLAIN = [{k: v for k, v in row.items() if k != "source"} for row in ROWS]
SWEBENCH_KEYS = ("instance_id", "repo", "base_commit", "problem_statement", "hints_text", "patch", "test_patch",
                 "FAIL_TO_PASS", "PASS_TO_PASS", "version", "environment_setup_commit")


def swebench_row(row):
    """A classic SWE-bench row: test lists as JSON-encoded strings, no image or eval script."""
    out = {key: row[key] for key in SWEBENCH_KEYS}
    out["FAIL_TO_PASS"], out["PASS_TO_PASS"] = json.dumps(row["FAIL_TO_PASS"]), json.dumps(row["PASS_TO_PASS"])
    return out


def swesmith_row(row):
    """A SWE-smith row: its patch creates the bug, the instance's branch holds it."""
    return {"instance_id": row["instance_id"], "repo": row["repo"], "patch": reverse_patch(row["patch"]),
            "FAIL_TO_PASS": row["FAIL_TO_PASS"], "PASS_TO_PASS": row["PASS_TO_PASS"],
            "image_name": "jyangballin/swesmith.x86_64.demo", "problem_statement": row["problem_statement"]}


def test_bundled_set_is_up_to_date():
    """instances.jsonl is what the sources in data/tasks/ generate, base commits included (they are
    reproducible: fixed author, committer and dates); the same for the upstream set."""
    from protege.rollout.tasks import UPSTREAM_DIR, UPSTREAM_JSONL
    assert bundled_rows() == ROWS
    assert bundled_rows(UPSTREAM_DIR) == [json.loads(line) for line in UPSTREAM_JSONL.read_text().splitlines()]


def test_bundled_set_shape():
    tasks = bundled_tasks()
    assert len(tasks) >= 12 and len({t.instance_id for t in tasks}) == len(tasks)
    for task, row in zip(tasks, ROWS):
        test_files = patch_files(task.test_patch)
        assert task.fail_to_pass and task.pass_to_pass and task.problem_statement.strip()
        assert {t.split("::")[0] for t in task.fail_to_pass + task.pass_to_pass} <= set(test_files)
        assert all(f.startswith("tests/") for f in test_files)
        assert not any(f.startswith("tests/") for f in patch_files(task.patch + row["wrong_patch"]))
        assert task.image.endswith(f":{task.base_commit[:12]}-{task.env_spec.image_key[:12]}") and os.path.isdir(task.source)
    assert any(len(patch_files(t.patch)) > 1 for t in tasks)           # multi-file fixes
    assert any("new file mode" in t.patch for t in tasks)              # a fix that adds a module
    assert any("new file mode" in t.test_patch for t in tasks)         # a new test file


def test_loads_each_format_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [swebench_row(row) for row in ROWS[:3]]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    loaded = [load_tasks(tmp_path / f"t.{ext}") for ext in ("json", "jsonl", "parquet")]
    assert loaded[0] == loaded[1] == loaded[2]
    task, row = loaded[0][0], ROWS[0]
    assert task.fail_to_pass == tuple(row["FAIL_TO_PASS"]) and task.pass_to_pass == tuple(row["PASS_TO_PASS"])
    assert task.image == swebench_image_name(row["instance_id"])
    assert task.image == "swebench/sweb.eval.x86_64.protege_1776_binary_search-1:latest"
    assert task.eval_script == row["eval_script"]  # the default script, as the bundled rows carry it
    assert (task.patch, task.test_patch, task.base_commit) == (row["patch"], row["test_patch"], row["base_commit"])
    assert task.source is None


def test_swegym_and_swebench5_rows(tmp_path):
    gym = swebench_row(ROWS[1]) | {"FAIL_TO_PASS": ROWS[1]["FAIL_TO_PASS"], "version": 0.13}
    v5 = swebench_row(ROWS[2]) | {"image": "local/img:1", "eval_script": ROWS[2]["eval_script"],
                                  "log_parser": "parse_log_pytest_v2", "eval_type": "fail_only"}
    (tmp_path / "t.jsonl").write_text(json.dumps(gym) + "\n" + json.dumps(v5) + "\n")
    gym_task, v5_task = load_tasks(tmp_path / "t.jsonl", format="swebench")
    assert gym_task.version == "0.13" and gym_task.fail_to_pass == tuple(ROWS[1]["FAIL_TO_PASS"])
    assert (v5_task.image, v5_task.log_parser, v5_task.eval_type) == ("local/img:1", "parse_log_pytest_v2",
                                                                      "fail_only")
    assert v5_task.swebench_instance()["FAIL_TO_PASS"] == ROWS[2]["FAIL_TO_PASS"]


def test_swesmith_rows(tmp_path):
    rows = [swesmith_row(row) for row in ROWS]
    (tmp_path / "smith.json").write_text(json.dumps(rows))
    tasks = load_tasks(tmp_path / "smith.json")
    for task, row in zip(tasks, ROWS):
        assert task.patch == row["patch"]  # the fix is the bug patch reversed
        assert task.base_commit == task.instance_id and task.test_patch == ""
        assert task.image == "jyangballin/swesmith.x86_64.demo"
        files = sorted({t.split("::")[0] for t in row["FAIL_TO_PASS"] + row["PASS_TO_PASS"]})
        assert f"python3 -m pytest -rA -p no:cacheprovider {' '.join(repr(f) for f in files)}" in task.eval_script


@pytest.mark.parametrize("row", ROWS, ids=[row["instance_id"] for row in ROWS])
def test_reverse_patch_undoes_the_patch(row, tmp_path):
    """git applies the reversed gold patch to the fixed tree and gets the base tree back; git's own diff
    from the fixed tree to the base agrees line for line (hunk headers' function context aside)."""
    task = next(t for t in bundled_tasks() if t.instance_id == row["instance_id"])
    repo = str(tmp_path / "repo")
    materialize_repo(task, repo)
    git = lambda *args, **kw: subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                             check=True, **kw).stdout
    git("apply", "-", input=task.patch)
    git("add", "-A")
    reversed_patch = reverse_patch(task.patch)
    strip_context = lambda p: re.sub(r"^(@@ [^@]+ @@).*$", r"\1", p, flags=re.M)
    fixed_tree = git("write-tree").strip()
    assert strip_context(reversed_patch) == strip_context(git("diff", fixed_tree, task.base_commit))
    git("apply", "-", input=reversed_patch)
    git("add", "-A")
    assert git("diff", "--cached", task.base_commit) == ""
    assert reverse_patch(reversed_patch) == task.patch


def test_reverse_patch_without_final_newlines_and_without_git_headers(tmp_path):
    git = lambda *args, **kw: subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True,
                                             check=True, **kw).stdout
    git("init", "-q")
    (tmp_path / "f.txt").write_text("one\ntwo\nthree")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "base")
    (tmp_path / "f.txt").write_text("one\nTWO\nthree\nfour")
    patch = git("diff")
    assert "\\ No newline at end of file" in patch
    plain = "".join(line for line in patch.splitlines(keepends=True) if not line.startswith(("diff ", "index ")))
    for candidate in (patch, plain):
        git("apply", "-", input=reverse_patch(candidate))
        assert (tmp_path / "f.txt").read_text() == "one\ntwo\nthree"
        git("apply", "-", input=candidate)
        assert (tmp_path / "f.txt").read_text() == "one\nTWO\nthree\nfour"


def test_materialize_detects_drift(tmp_path):
    task = replace(bundled_tasks()[0], base_commit="0" * 40)
    with pytest.raises(RuntimeError, match="regenerate the task set"):
        materialize_repo(task, str(tmp_path / "repo"))
    with pytest.raises(ValueError, match="not a bundled task"):
        materialize_repo(replace(task, source=None), str(tmp_path / "other"))


def _without(row, key):
    return {k: v for k, v in row.items() if k != key}


BAD_ROWS = [
    ("missing field", lambda r: _without(r, "problem_statement"), "problem_statement", "missing"),
    ("empty text", lambda r: r | {"repo": "  "}, "repo", "empty"),
    ("wrong type", lambda r: r | {"base_commit": 123}, "base_commit", "expected a string, got int"),
    ("tests not JSON", lambda r: r | {"FAIL_TO_PASS": "[tests/x.py"}, "FAIL_TO_PASS", "not a JSON list"),
    ("tests not a list", lambda r: r | {"PASS_TO_PASS": 5}, "PASS_TO_PASS", "expected a list"),
    ("no failing test", lambda r: r | {"FAIL_TO_PASS": []}, "FAIL_TO_PASS", "empty"),
    ("patch not a diff", lambda r: r | {"patch": "fix the bug"}, "patch", "not a unified diff"),
    ("unknown parser", lambda r: r | {"log_parser": "parse_log_nope"}, "log_parser", "unknown parser"),
    ("unknown eval type", lambda r: r | {"eval_type": "sometimes"}, "eval_type", "unknown eval type"),
    ("script without markers", lambda r: r | {"eval_script": "pytest"}, "eval_script", "markers"),
    ("bad source", lambda r: r | {"source": "nowhere"}, "source", "not a directory"),
]


@pytest.mark.parametrize("name,mutate,field,problem", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_rows_name_file_instance_and_field(name, mutate, field, problem, tmp_path):
    rows = [PLAIN[0], mutate(dict(PLAIN[1]))]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskFormatError) as error:
        load_tasks(path)
    message = str(error.value)
    assert str(path) in message and f"instance {ROWS[1]['instance_id']!r}" in message
    assert f"field {field!r}" in message and problem in message


def test_bad_swesmith_and_anonymous_rows(tmp_path):
    smith = swesmith_row(ROWS[0])
    smith["patch"] = smith["patch"].rsplit("\n", 3)[0] + "\n"  # truncated hunk
    path = tmp_path / "smith.json"
    path.write_text(json.dumps([smith]))
    with pytest.raises(TaskFormatError, match=rf"instance '{ROWS[0]['instance_id']}': field 'patch': hunk ends early"):
        load_tasks(path)
    path.write_text(json.dumps([_without(PLAIN[0], "instance_id")]))
    with pytest.raises(TaskFormatError, match=r"smith.json: row 1: field 'instance_id': missing"):
        load_tasks(path)


def test_bad_files(tmp_path):
    cases = {
        "a.jsonl": (json.dumps(PLAIN[0]) + "\n{oops\n", r"a.jsonl: line 2: not valid JSON"),
        "b.json": ('{"instance_id": "x"}', r"b.json: expected a JSON list"),
        "c.csv": ("instance_id\n", r"unsupported task file type '.csv'"),
        "d.jsonl": (json.dumps(PLAIN[0]) + "\n" + json.dumps(PLAIN[0]) + "\n", r"d.jsonl: row 2: .*duplicate"),
        "e.json": ("[1]", r"e.json: row 1: expected an object, got int"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(TaskFormatError, match=message):
            load_tasks(tmp_path / name)
    with pytest.raises(TaskFormatError, match="no such task file"):
        load_tasks(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown task format"):
        load_tasks(tmp_path / "a.jsonl", format="swe-fancy")


def test_environment_declarations_as_swebench_spells_them():
    from protege.rollout.tasks import EnvSpec, TaskFormatError, parse_env_spec
    spec = parse_env_spec({"python": 3.9, "packages": "pytest==8.3.5 pytest-cov", "pip_packages": ["attrs"],
                           "pre_install": "apt-get -v", "install": "pip install -e .", "test_cmd": ["pytest -rA"]}, "t")
    assert spec == EnvSpec("3.9", ("pytest==8.3.5", "pytest-cov", "attrs"), ("apt-get -v",), "pip install -e .",
                           "pytest -rA")
    assert spec.setup_commands == ("apt-get -v", "pip install -e .") and spec.test_command == "pytest -rA"
    assert parse_env_spec("{}", "t") == EnvSpec() and EnvSpec().key == parse_env_spec({}, "t").key
    assert EnvSpec(packages=("a", "b")).key == EnvSpec(packages=("b", "a")).key != EnvSpec(packages=("a",)).key
    for value, message in (({"python": "three"}, "'environment.python': expected a version"),
                           ({"packages": [""]}, "'environment.packages': expected a list of non-empty strings"),
                           ({"packages": ["--index-url=x"]}, "'environment.packages': options are not packages"),
                           ({"conda": "x"}, "'environment.conda': unknown"), ([], "'environment': expected an object")):
        with pytest.raises(TaskFormatError, match=message):
            parse_env_spec(value, "tasks.jsonl: row 1")
