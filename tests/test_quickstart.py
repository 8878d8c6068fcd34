"""The built-in default job's guard for the user's files (the job itself runs in the README's main command)."""
from protege.engine.training.quickstart import MARKER, main


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["--out", str(tmp_path)]) == 2
    assert "nothing was deleted" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_an_earlier_quickstart_output_is_recognised_by_its_marker(tmp_path, capsys, monkeypatch):
    (tmp_path / MARKER).write_text("")
    (tmp_path / "old-report.json").write_text("{}")
    monkeypatch.setattr("shutil.which", lambda name: None)   # stop right after the guard: no bwrap
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bwrap" in err and "nothing was deleted" not in err


def records(task_values: dict[str, list[float]]) -> list[dict]:
    return [{"task": t, "resolved": v, "loop": 1.0 - v, "steps": 10 * v, "reward": v}
            for t, values in task_values.items() for v in values]


def test_eval_figures_cluster_a_tasks_attempts():
    from protege.engine.training.quickstart import eval_figures
    # Two tasks, three attempts each: task a always resolved, task b never. Over 6 independent attempts the
    # interval would be narrow; clustered by task there are 2 observations, so it is wide.
    figures = eval_figures(records({"a": [1.0, 1.0, 1.0], "b": [0.0, 0.0, 0.0]}))
    assert figures["trajectories"] == 6 and figures["tasks"] == 2
    low, high = figures["resolved"]["ci95"]
    assert figures["resolved"]["mean"] == 0.5 and low < 0.1 and high > 0.9
    # The mean of per-task means with a normal interval over the 2 tasks: 5 +- 1.96 * 7.071 / sqrt(2).
    assert figures["steps"]["mean"] == 5.0
    assert figures["steps"]["ci95"] == [round(5 - 1.96 * 5, 4), round(5 + 1.96 * 5, 4)]


def test_paired_change_is_signal_only_when_every_task_moves():
    from protege.engine.training.quickstart import paired_change
    before = records({"a": [0.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 0.0], "d": [0.0, 0.0]})
    better = records({"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [1.0, 1.0], "d": [1.0, 0.0]})
    change = paired_change(before, better)["resolved"]
    assert change["mean"] == 0.5 and change["tasks_up"] == 4 and change["tasks_down"] == 0
    assert change["ci95"][0] > 0          # every task up by 0.5: the interval excludes 0
    mixed = records({"a": [1.0, 1.0], "b": [0.0, 0.0], "c": [1.0, 0.0], "d": [0.0, 0.0]})
    change = paired_change(before, mixed)["resolved"]
    assert change["tasks_up"] == 1 and change["tasks_down"] == 1 and change["ci95"][0] < 0 < change["ci95"][1]
