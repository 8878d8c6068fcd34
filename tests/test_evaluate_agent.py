"""The evaluation command (rollout.evaluate_agent) and its report (rollout.report): outputs, a side-by-side
report, resuming after kill -9, and refusing bad input before any work."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protege.rollout.evaluate_agent import main
from protege.rollout.report import main as report_main, pass_at_k, wilson_interval

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "data/tasks/instances.jsonl"
LIMIT = ["--limit", "2"]
PNGS = ("resolve_rate", "expert_calls", "expert_token_share", "cost", "steps", "loops", "termination")


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def gold_run(tmp_path_factory, sandbox_ready):
    out = tmp_path_factory.mktemp("eval") / "gold"
    assert main(["--tasks", str(TASKS), "--policy", "scripted", "--backend", "sandbox", "--out", str(out),
                 "--concurrency", "2", *LIMIT]) == 0
    return out


def test_outputs_of_a_scripted_run(gold_run):
    predictions = [json.loads(line) for line in (gold_run / "predictions.jsonl").read_text().splitlines()]
    assert [sorted(p) for p in predictions] == [["instance_id", "model_name_or_path", "model_patch"]] * 2
    assert all(p["model_patch"].startswith("diff --git") and p["model_name_or_path"] == "protege-scripted"
               for p in predictions)
    results = json.loads((gold_run / "results.json").read_text())
    assert results["run"]["max_steps"] == 75 and results["run"]["expert_budget_usd"] == 2.0
    assert results["run"]["expert_quota"] == 6 and results["run"]["expert_recent_messages"] == 5
    records = results["instances"]
    assert [r["instance_id"] for r in records] == [p["instance_id"] for p in predictions]
    for r in records:
        assert r["resolved"] is True and r["termination"] == "submitted" and r["expert_calls"] == 1
        assert r["steps"] >= 4 and r["longest_streak"] >= 1 and r["cost_usd"] == 0.0
        assert 0 < r["tokens"]["expert"] < r["tokens"]["total"]
    report = (gold_run / "report.md").read_text()
    assert "| protege-scripted | 2 | 2 | 100.0% [34.2, 100.0] |" in report
    for name in PNGS:
        assert f"({name}.png)" in report
        assert (gold_run / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_side_by_side_report_of_gold_and_empty(gold_run, tmp_path):
    empty = tmp_path / "empty"
    assert main(["--tasks", str(TASKS), "--policy", "empty", "--backend", "sandbox", "--out", str(empty),
                 *LIMIT]) == 0
    records = json.loads((empty / "results.json").read_text())["instances"]
    assert [(r["resolved"], r["steps"], r["patch"]) for r in records] == [(False, 1, "")] * 2
    assert report_main([str(gold_run), str(empty), "--names", "gold", "empty", "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp/report.md").read_text()
    assert "| gold | 2 | 2 | 100.0%" in report and "| empty | 2 | 2 | 0.0% [0.0, 65.8]" in report
    summary = json.loads((tmp_path / "cmp/report.json").read_text())
    assert summary["gold"]["expert_calls_per_task"] == 1.0 and summary["empty"]["expert_calls_per_task"] == 0.0
    assert all((tmp_path / f"cmp/{name}.png").is_file() for name in PNGS)


def test_kill_9_then_rerun_finishes_without_redoing_finished_attempts(gold_run, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--tasks", str(TASKS), "--policy", "scripted", "--backend", "sandbox", "--out", str(out),
            "--concurrency", "1", *LIMIT]
    proc = subprocess.Popen([sys.executable, "-m", "protege.rollout.evaluate_agent", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = results.read_text().splitlines()
    assert len(first) == 1 and not (out / "results.json").exists()
    finished = [json.loads(line)["instance_id"] for line in first]
    kept = {i: (out / f"trajectories/{i}.0.json").stat().st_mtime_ns for i in finished}

    assert main(args) == 0
    assert "1 attempt(s) done, 1 to run" in capsys.readouterr().err
    assert {i: (out / f"trajectories/{i}.0.json").stat().st_mtime_ns for i in finished} == kept
    assert len(results.read_text().splitlines()) == 2
    resumed = json.loads((out / "results.json").read_text())["instances"]
    uninterrupted = json.loads((gold_run / "results.json").read_text())["instances"]
    assert stable(resumed) == stable(uninterrupted)
    assert (out / "predictions.jsonl").read_text() == (gold_run / "predictions.jsonl").read_text()
    # Once finished, a rerun does nothing but rewrite the outputs.
    assert main(args) == 0
    assert "2 attempt(s) done, 0 to run" in capsys.readouterr().err


def test_a_rerun_runs_again_the_attempts_the_infrastructure_failed(gold_run, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(gold_run, out)
    lines = (out / "results.jsonl").read_text().splitlines()
    failed = dict(json.loads(lines[0]), resolved=False, termination="error",
                  infrastructure_error="environment start: the daemon did not answer")
    (out / "results.jsonl").write_text("\n".join([json.dumps(failed), *lines[1:]]) + "\n")
    args = ["--tasks", str(TASKS), "--policy", "scripted", "--backend", "sandbox", "--out", str(out),
            "--concurrency", "1", *LIMIT]
    assert main(args) == 0
    assert "1 attempt(s) done, 1 to run" in capsys.readouterr().err
    resumed = json.loads((out / "results.json").read_text())["instances"]
    assert stable(resumed) == stable(json.loads((gold_run / "results.json").read_text())["instances"])


# ---------------------------------------------------------------------------------------------- bad input

def test_a_task_file_with_a_missing_field_fails_before_any_work(tmp_path, capsys):
    row = json.loads(TASKS.read_text().splitlines()[0])
    del row["problem_statement"]
    row["source"] = str(TASKS.parent / row["source"])
    bad = tmp_path / "tasks.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    assert main(["--tasks", str(bad), "--policy", "scripted", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tasks.jsonl: row 1: instance 'protege__binary_search-1': field 'problem_statement': missing" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_policy_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tasks", str(TASKS), "--policy", "gpt", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "invalid choice: 'gpt'" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_load_fails_before_any_work(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "qwen2"}')
    from protege.engine.tokenizer import train_bpe_tokenizer
    train_bpe_tokenizer(["a few words"] * 4, 300, checkpoint)
    assert main(["--tasks", str(TASKS), "--policy", "sampler", "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "out"), "--backend", "sandbox"]) == 2
    err = capsys.readouterr().err
    assert f"error: --checkpoint {checkpoint}: does not load" in err
    assert not (tmp_path / "out").exists()


def test_no_docker_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such-docker.sock")
    assert main(["--tasks", str(TASKS), "--policy", "empty", "--backend", "docker",
                 "--out", str(tmp_path / "out")]) == 2
    assert "error: --backend docker: cannot reach a Docker engine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_other_settings_is_refused(gold_run, capsys):
    assert main(["--tasks", str(TASKS), "--policy", "empty", "--backend", "sandbox", "--out", str(gold_run),
                 *LIMIT]) == 2
    assert "holds a run with other settings (policy: 'scripted' there, 'empty' now" in capsys.readouterr().err


@pytest.mark.parametrize("change, key", [
    (["--anthropic-model", "claude-other"], "expert_model"), (["--max-turn-tokens", "64"], "max_turn_tokens"),
    (["--command-timeout", "30"], "command_timeout_s"), (["--no-judge"], "no_judge")])
def test_a_rerun_with_another_agent_setting_is_refused(tmp_path, capsys, change, key):
    """Every setting that changes what an attempt does is part of run.json: a rerun cannot mix two runs."""
    from protege.rollout.evaluate_agent import parse_args, run_settings
    out = tmp_path / "run"
    first = ["--tasks", str(TASKS), "--policy", "sampler", "--checkpoint", str(tmp_path / "ckpt"),
             "--expert", "anthropic", "--backend", "sandbox", "--out", str(out), *LIMIT]
    out.mkdir()
    (out / "run.json").write_text(json.dumps(run_settings(parse_args(first))))
    assert main(first + change) == 2
    assert f"holds a run with other settings ({key}: " in capsys.readouterr().err


def test_interval_and_pass_at_k():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_pass_at_1_interval_clusters_attempts_by_task():
    """Worked by hand: 4 tasks x 2 attempts resolved 2, 0, 1, 1 times. Pass@1 = 0.5; the task rates' deviations
    0.5, -0.5, 0, 0 give SE^2 = 0.5 / (4 * 3) = 1/24, n_eff = 0.25 / (1/24) = 6: the Wilson interval at n = 6,
    wider than the one that takes the 8 attempts as independent."""
    from protege.rollout.report import clustered_interval, summarize
    z = 1.96
    half = z * math.sqrt(0.25 / 6 + z * z / 144) / (1 + z * z / 6)   # centre (0.5 + z^2/12) / (1 + z^2/6) = 0.5
    records = [{"instance_id": task, "attempt": a, "resolved": a < wins, "tokens": {"total": 1, "expert": 0},
                "expert_calls": 0, "cost_usd": 0.0, "steps": 1, "termination": "submitted", "longest_streak": 0}
               for task, wins in (("A", 2), ("B", 0), ("C", 1), ("D", 1)) for a in range(2)]
    s = summarize(records)
    assert s["pass@1"] == 0.5 and s["pass@1_ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-12)
    assert 0.5 + half > wilson_interval(4, 8)[1] + 0.02
    # 2 tasks resolved 2/2 and 0/2: SE^2 = 0.25, n_eff = 1, held at one observation per task (n = 2).
    assert clustered_interval([1.0, 0.0], 4) == pytest.approx(wilson_interval(1, 2), abs=1e-12)
    # None resolved in 3 tasks x 4 attempts: SE = 0, n = the 3 tasks (upper z^2/3 / (1 + z^2/3)), not 12.
    assert clustered_interval([0.0] * 3, 12) == pytest.approx((0.0, (z * z / 3) / (1 + z * z / 3)), abs=1e-12)
    # Every task at 1/2: no spread between tasks, the attempts count as independent.
    assert clustered_interval([0.5, 0.5], 4) == pytest.approx(wilson_interval(2, 4), abs=1e-12)
    # One attempt per task: the Wilson interval over the tasks (SE^2 = 1.2 / 20, n_eff = 4, held at 5).
    assert clustered_interval([1.0, 0.0, 0.0, 1.0, 1.0], 5) == pytest.approx(wilson_interval(3, 5), abs=1e-12)


def test_sampler_policy_seeded_attempts_replay_and_differ(tmp_path, sandbox_ready):
    """A checkpoint through the sampler, two sampled attempts: each attempt's draws come from seed + attempt,
    so a second run replays the first token for token, and the two attempts differ."""
    import torch
    from protege.engine.config import ModelConfig
    from protege.engine.model import Qwen2ForCausalLM
    from protege.engine.tokenizer import train_bpe_tokenizer
    checkpoint = tmp_path / "model"
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, checkpoint)
    torch.manual_seed(0)
    Qwen2ForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=4096)).save_pretrained(checkpoint)

    def run(out):
        assert main(["--tasks", str(TASKS), "--policy", "sampler", "--checkpoint", str(checkpoint), "--limit", "1",
                     "--attempts", "2", "--temperature", "1", "--seed", "7", "--max-turn-tokens", "6",
                     "--kv-cache-gb", "0.002", "--max-steps", "2", "--backend", "sandbox", "--out", str(out)]) == 0
        return [json.loads(p.read_text()) for p in sorted((out / "trajectories").glob("*.json"))]

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    def generated(trajectories):   # the sampled tokens of every turn (loss mask 1)
        return [[[i for i, m in zip(msg["token_ids"], msg["loss_mask"]) if m] for msg in t["messages"]
                 if msg["role"] == "assistant"] for t in trajectories]
    tokens = generated(first)
    assert tokens == generated(second)
    assert tokens[0] != tokens[1] and all(1 <= len(turn) <= 6 for turns in tokens for turn in turns)
    report = json.loads((tmp_path / "a/report.json").read_text())["model"]
    # Random weights never write <|im_end|>: each run's first turn is cut at --max-turn-tokens 6.
    assert report["attempts"] == 2 and report["pass@2"] == 0.0 and report["termination"] == {"max_turn_tokens": 2}
    assert (tmp_path / "a/predictions.attempt1.jsonl").is_file()


@pytest.mark.docker
def test_swebench_harness_takes_our_predictions_and_grades_like_us(gold_run, tmp_path, monkeypatch, bundled_images):
    """swebench's own run_evaluation on our predictions.jsonl (one prediction swapped for the task's wrong
    fix), against the same task file and our locally built images: the same resolved set as rollout.evaluate."""
    from swebench.harness.run_evaluation import main as run_evaluation
    from protege.rollout.evaluate import evaluate_patch
    rows = {r["instance_id"]: r for r in map(json.loads, TASKS.read_text().splitlines())}
    predictions = [json.loads(line) for line in (gold_run / "predictions.jsonl").read_text().splitlines()][:2]
    predictions[1]["model_patch"] = rows[predictions[1]["instance_id"]]["wrong_patch"]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    ours = {p["instance_id"] for p in predictions
            if evaluate_patch(bundled_images[p["instance_id"]], p["model_patch"], backend="docker").resolved}
    monkeypatch.chdir(tmp_path)   # the harness writes logs/ under the working directory
    report = run_evaluation(str(TASKS), "test", [p["instance_id"] for p in predictions], str(path), 2, 4096,
                            "protege-test", 600, False, False, str(tmp_path))
    graded = json.loads(Path(report).read_text())
    assert graded["completed_instances"] == 2 and graded["error_instances"] == 0
    assert set(graded["resolved_ids"]) == ours == {predictions[0]["instance_id"]}


@pytest.mark.docker
def test_a_local_swebench_image_is_used_as_it_is(tmp_path, docker_client, bundled_images, capsys):
    """A row without an image or bundled source names swebench's image for its instance; present locally, it is
    used as it is (here: a bundled task's image tagged with that name)."""
    from protege.rollout.tasks import swebench_image_name
    row = json.loads(TASKS.read_text().splitlines()[0])
    name = swebench_image_name(row["instance_id"])
    for field in ("image", "source", "environment"):
        del row[field]
    (tmp_path / "tasks.jsonl").write_text(json.dumps(row) + "\n")
    args = ["--tasks", str(tmp_path / "tasks.jsonl"), "--policy", "scripted", "--backend", "docker"]
    assert main([*args, "--out", str(tmp_path / "missing")]) == 2   # not there yet: refused before any work
    err = capsys.readouterr().err
    assert "1 task image(s) missing on the Docker host(s)" in err and f"{name} (task {row['instance_id']})" in err, err
    docker_client.images.get(bundled_images[row["instance_id"]].image).tag(name)
    try:
        assert main([*args, "--out", str(tmp_path / "out")]) == 0
    finally:
        docker_client.images.remove(name)
    records = json.loads((tmp_path / "out/results.json").read_text())["instances"]
    assert [r["resolved"] for r in records] == [True]


def test_a_bad_environment_declaration_fails_before_any_work(tmp_path, capsys, sandbox_ready):
    row = json.loads(TASKS.read_text().splitlines()[0])
    row["source"] = str(TASKS.parent / row["source"])
    bad = tmp_path / "tasks.jsonl"
    for environment, message in (({"packages": "pytest", "install": 3}, "field 'environment.install': expected a "
                                   "string, got int"),
                                  ({"python": "3.99"}, "environment.python 3.99: no Python 3.99 on this machine")):
        row["environment"] = environment
        bad.write_text(json.dumps(row) + "\n")
        assert main(["--tasks", str(bad), "--policy", "scripted", "--backend", "sandbox",
                     "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_claude_as_the_agent_and_the_expert_costs_are_per_task(tmp_path, monkeypatch, sandbox_ready):
    from anthropic_server import AnthropicTestServer, Reply

    def respond(body):
        if "You review how" in body["system"]:                        # the hidden judge
            return Reply(text='{"warranted": 1, "followed": 1}')
        if "tools" not in body:                                       # the expert
            return Reply(text="Look at the loop bound.", input_tokens=1000, output_tokens=100)
        if len(body["messages"]) == 1:                                # the agent: ask, then submit
            return Reply(tool_uses=[("ask_expert", {"question": "Where is the bug?"})])
        return Reply(tool_uses=[("submit", {})])

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")
    with AnthropicTestServer(responder=respond) as server:
        assert main(["--tasks", str(TASKS), "--policy", "anthropic", "--expert", "anthropic", "--limit", "1",
                     "--anthropic-base-url", server.base_url, "--backend", "sandbox", "--out", str(tmp_path)]) == 0
    [r] = json.loads((tmp_path / "results.json").read_text())["instances"]
    assert r["termination"] == "submitted" and r["steps"] == 2 and r["expert_calls"] == 1 and not r["resolved"]
    assert 0 < r["policy_cost_usd"] < r["expert_cost_usd"]
    assert r["cost_usd"] == pytest.approx(r["policy_cost_usd"] + r["expert_cost_usd"])
    assert r["judge_cost_usd"] > 0
    assert "sk-ant-test-not-a-real-key" not in "".join(p.read_text() for p in tmp_path.rglob("*.json*"))


def test_sampler_policy_loads_a_checkpoint_in_the_compute_dtype(tmp_path):
    """A bf16 checkpoint (what training now writes for Qwen2.5) is sampled in the dtype the model computes in
    on this device: fp32 on the CPU, bf16 on CUDA."""
    import torch
    from protege.engine.config import ModelConfig
    from protege.engine.model import Qwen2ForCausalLM, compute_dtype
    from protege.engine.tokenizer import train_bpe_tokenizer
    from protege.rollout.evaluate_agent import load_policy, parse_args
    checkpoint = tmp_path / "model"
    tokenizer = train_bpe_tokenizer(["find the index of the target in the sorted list"] * 4, 400, checkpoint)
    Qwen2ForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=512)).to(torch.bfloat16).save_pretrained(checkpoint)
    assert json.loads((checkpoint / "config.json").read_text())["torch_dtype"] == "bfloat16"
    args = parse_args(["--tasks", str(TASKS), "--policy", "sampler", "--checkpoint", str(checkpoint),
                       "--out", str(tmp_path / "out")])
    policy = load_policy(args, tokenizer)
    try:
        assert {p.dtype for p in policy.server.sampler.model.parameters()} == {torch.float32}
    finally:
        policy.server.close()
    assert compute_dtype("cuda") == torch.bfloat16 and compute_dtype("cpu") == torch.float32


def test_infrastructure_failures_are_counted_apart_not_as_unresolved():
    """An attempt whose environment never started says nothing about the policy: 2 tasks x 2 attempts, task A
    resolved once and failed by the infrastructure once: Pass@1 is over the 3 attempts the policy ran."""
    from protege.rollout.report import summarize
    base = {"tokens": {"total": 1, "expert": 0}, "expert_calls": 0, "cost_usd": 0.0, "steps": 1,
            "termination": "submitted", "longest_streak": 0}
    records = [dict(base, instance_id="A", attempt=0, resolved=True),
               dict(base, instance_id="A", attempt=1, resolved=False, termination="error",
                    infrastructure_error="environment start: daemon gone"),
               dict(base, instance_id="B", attempt=0, resolved=True),
               dict(base, instance_id="B", attempt=1, resolved=False)]
    s = summarize(records)
    assert s["infrastructure_failures"] == 1 and s["trajectories"] == 3
    assert s["pass@1"] == pytest.approx((1.0 + 0.5) / 2) and s["termination"] == {"submitted": 3}
