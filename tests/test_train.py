"""Phase 1 training: engine/train.py run for real (one process and torchrun with gloo), resume, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protege.engine.training.data import DataError, SFTDataset
from protege.rollout.agent.trajectory import Trajectory
from protege.engine.training.config import ConfigError, load_config
from sft_fixture import make_sft_setup, write_config

REPO = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(REPO / "engine" / "train.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "engine" / "train.py")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_sft_setup(tmp_path_factory.mktemp("sft"))


def run(cmd, check=True, env=None, timeout=240):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    last = max((run_dir / "checkpoints").glob("step_*"))
    return load_file(last / "model" / "model.safetensors")


def test_two_ranks_equal_one_process(setup, tmp_path):
    config = write_config(tmp_path / "c.toml", setup, tmp_path / "unused")
    one, two = tmp_path / "one", tmp_path / "two"
    run(TRAIN + ["--config", str(config), f"output_dir={json.dumps(str(one))}"])
    run(TORCHRUN + ["--config", str(config), f"output_dir={json.dumps(str(two))}"])
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    assert a[-1] < a[0]  # it learns
    wa, wb = final_weights(one), final_weights(two)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5, msg=name)


def test_sigkill_then_resume_continues_exactly(setup, tmp_path):
    config = write_config(tmp_path / "c.toml", setup, tmp_path / "unused", train={"steps": 7},
                          checkpoint={"every": 3})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(TRAIN + ["--config", str(config), f"output_dir={json.dumps(str(straight))}"])
    reference = losses(straight)

    # SIGKILL between checkpoints: after step 4 is logged (checkpoint at 3, next at 6).
    proc = subprocess.Popen(TRAIN + ["--config", str(config), f"output_dir={json.dumps(str(killed))}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(losses(killed))
    assert 4 <= done < 7, f"the run was killed after {done} steps; the test needs it killed between checkpoints"
    assert (killed / "checkpoints" / "step_00000003" / "trainer.json").is_file()

    run(TRAIN + ["--config", str(config), f"output_dir={json.dumps(str(killed))}", "--resume"])
    resumed = losses(killed)
    assert [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()] == list(range(1, 8))
    assert resumed == reference  # steps 4-7 were redone from the step-3 checkpoint: bit for bit the same
    for name, w in final_weights(straight).items():
        assert torch.equal(w, final_weights(killed)[name]), name


def test_death_while_writing_a_checkpoint_keeps_the_last_good_one(setup, tmp_path):
    config = write_config(tmp_path / "c.toml", setup, tmp_path / "run", train={"steps": 4},
                          checkpoint={"every": 2})
    # Dies inside the step-2 checkpoint write, after its files and before the rename: nothing final exists.
    died = run(TRAIN + ["--config", str(config)], check=False, env={"PROTEGE_FAULT": "die-before-checkpoint-rename"})
    assert died.returncode == 137
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000002.tmp"]
    # A resumed run ignores the partial directory, starts over, and replaces it.
    run(TRAIN + ["--config", str(config), "--resume"])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    # Now die while writing step 4 again from a resumed run at step 2: step 2 must stay intact and loadable.
    import shutil
    shutil.rmtree(checkpoints / "step_00000004")
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer.json").read_text()
    died = run(TRAIN + ["--config", str(config), "--resume"], check=False,
               env={"PROTEGE_FAULT": "die-before-checkpoint-rename"})
    assert died.returncode == 137
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004.tmp"]
    run(TRAIN + ["--config", str(config), "--resume"])
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]


def test_overfits_a_handful_and_checkpoint_loads_in_transformers(tmp_path):
    small = make_sft_setup(tmp_path / "small", n_samples=3)
    config = write_config(tmp_path / "c.toml", small, tmp_path / "run",
                          train={"steps": 60, "global_batch_size": 3, "lr": 1e-2, "warmup_steps": 5,
                                 "min_lr_ratio": 0.1, "grad_clip": 1.0},
                          checkpoint={"every": 0})
    out = run(TRAIN + ["--config", str(config)])
    curve = losses(tmp_path / "run")
    # 3 short conversations, 60 full-batch steps: the agent's ~20 tokens per sample are memorised.
    assert curve[-1] < 0.1, curve[-5:]
    assert "checkpoint:" in out.stdout and "metrics:" in out.stdout and "loss plot:" in out.stdout
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("grad_norm", "lr", "tokens_per_s_per_device", "mfu", "peak_memory_gb", "packing_efficiency"):
        assert key in record

    from transformers import Qwen2ForCausalLM as HF

    from protege.engine.model import Qwen2ForCausalLM
    saved = next((tmp_path / "run" / "checkpoints").glob("step_*")) / "model"
    assert (saved / "tokenizer.json").is_file()
    ours = Qwen2ForCausalLM.from_pretrained(saved)
    theirs = HF.from_pretrained(saved, dtype=torch.float32).eval()
    ids = torch.tensor(small["tokenizer"].encode("fix the bug in parser"))
    with torch.no_grad():
        a = ours(ids, cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32))
        b = theirs(ids[None]).logits[0]
    assert (a - b).abs().max().item() <= 1e-4


def test_resumed_metrics_drop_redone_steps_and_a_torn_line(tmp_path):
    from protege.engine.training.metrics import MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    log = MetricsLog(path, resume_step=2)  # resumed from the step-2 checkpoint: steps 3-4 will be redone
    assert [r["step"] for r in log.records()] == [1, 2]


# ---------------------------------------------------------------- loss masks and data errors

def test_only_assistant_tokens_train(setup):
    ds = SFTDataset([str(setup["data"])], setup["tokenizer"], max_seq_len=256)
    tok = setup["tokenizer"]
    record = json.loads(setup["data"].read_text().splitlines()[0])
    sample = ds.sample(0)
    trained = tok.decode([t for t, m in zip(sample.ids, sample.mask) if m])
    assistant = record["messages"][2]["content"] + record["messages"][4]["content"]
    for message in record["messages"]:
        if message["role"] in ("system", "user", "tool"):
            assert message["content"] not in trained
    assert record["messages"][4]["content"] in trained and record["messages"][2]["content"] in trained
    assert "grep -n" in trained  # the tool call is the agent's own output
    assert trained.count("<|im_end|>") == 2  # each assistant turn's closing token, nothing else
    assert len(assistant) < len(trained)


def test_data_errors_and_policies(setup, tmp_path):
    good = setup["data"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good[0] + "\n" + "{not json\n" + good[1] + "\n" + '{"messages": []}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        SFTDataset([str(bad)], setup["tokenizer"], 256)
    skipped = SFTDataset([str(bad)], setup["tokenizer"], 256, bad_line_policy="skip")
    assert len(skipped) == 2 and skipped.counts["skipped_bad_lines"] == 2
    with pytest.raises(DataError, match="does not exist"):
        SFTDataset([str(tmp_path / "missing.jsonl")], setup["tokenizer"], 256)

    n = len(SFTDataset([str(setup["data"])], setup["tokenizer"], 256).sample(0).ids)
    drop = SFTDataset([str(setup["data"])], setup["tokenizer"], n - 1, long_policy="drop")
    assert drop.sample(0) is None and drop.counts["dropped_long"] == 1
    cut = SFTDataset([str(setup["data"])], setup["tokenizer"], n - 1, long_policy="truncate")
    assert len(cut.sample(0).ids) == n - 1 and cut.counts["truncated"] == 1

    untrained = tmp_path / "untrained.jsonl"
    untrained.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    ds = SFTDataset([str(untrained)], setup["tokenizer"], 256)
    assert ds.sample(0) is None and ds.counts["no_trainable_tokens"] == 1


@pytest.mark.parametrize("ids,mask,problem", [
    ([1, -1, 3], [0, 1, 1], "token id -1 is not a non-negative integer"),
    ([1, 2.7, 3], [0, 1, 1], "token id 2.7 is not"),        # torch.tensor would truncate it to 2
    ([1, True, 3], [0, 1, 1], "token id True is not"),
    (["a", 2, 3], [0, 1, 1], "token id 'a' is not"),
    ([1, 2, 3], [0, 2, 1], "loss mask value 2 is not 0 or 1"),  # would double the token's loss
])
def test_trajectory_ids_and_masks_are_checked(setup, tmp_path, ids, mask, problem):
    path = tmp_path / "traj.jsonl"
    record = Trajectory("t", 0, "p", "e", termination="submitted").to_dict()
    record["messages"] = [{"role": "assistant", "content": "x", "token_ids": ids, "loss_mask": mask}]
    path.write_text(json.dumps(record) + "\n")
    ds = SFTDataset([str(path)], setup["tokenizer"], 256, vocab_size=setup["tokenizer"].vocab_size)
    with pytest.raises(DataError, match=rf"traj\.jsonl:1: {problem}"):
        ds.sample(0)


def test_config_errors(setup, tmp_path):
    config = write_config(tmp_path / "c.toml", setup, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'; did you mean 'train.lr'\?"):
        load_config(config, ["train.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.rate'; known: \[.*'lr'"):
        load_config(config, ["train.rate=1"])  # nothing close: the known keys instead
    with pytest.raises(ConfigError, match=r"did you mean 'train.lr'"):
        load_config(config, ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"train.steps must be an integer, got 'many'"):
        load_config(config, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train.lr must be a finite number, got nan"):
        load_config(config, ["train.lr=nan"])  # nan passes every range check (nan < 0 is False)
    with pytest.raises(ConfigError, match=r"train.weight_decay must be a finite number, got inf"):
        load_config(config, ["train.weight_decay=inf"])
    with pytest.raises(ConfigError, match=r"checkpoint.max_shard_size='5 gigs': expected"):
        load_config(config, ["checkpoint.max_shard_size=5 gigs"])  # else it fails at the first checkpoint
    with pytest.raises(ConfigError, match=r"data.long_policy = 'chop'"):
        load_config(config, ["data.long_policy=chop"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")

    proc = run(TRAIN + ["--config", str(config), "train.stepz=3"], check=False)
    assert proc.returncode == 2 and "did you mean 'train.steps'" in proc.stderr and "Traceback" not in proc.stderr
    if not torch.cuda.is_available():
        proc = run(TRAIN + ["--config", str(config), "device=cuda"], check=False)
        assert proc.returncode == 2 and "no usable CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(TRAIN + ["--config", str(config), f"data.train_files={json.dumps([str(tmp_path / 'x.jsonl')])}"],
               check=False)
    assert proc.returncode == 1 and "x.jsonl does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_model_folder_in_the_models_dtype_and_resume_exact(tmp_path):
    """A bf16 model (its config.json says so, as Qwen2.5's does) trained with fp32 masters: model/ holds the
    masters rounded to bf16, which transformers loads; train_state/ keeps the fp32 masters, so a resume from
    there continues bit for bit."""
    import shutil

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import Qwen2ForCausalLM as HF

    from protege.engine.model import Qwen2ForCausalLM
    setup = make_sft_setup(tmp_path / "bf16", n_samples=8)
    Qwen2ForCausalLM.from_pretrained(setup["model"]).to(torch.bfloat16).save_pretrained(setup["model"])
    config = write_config(tmp_path / "c.toml", setup, tmp_path / "straight", train={"steps": 4},
                          checkpoint={"every": 2})
    run(TRAIN + ["--config", str(config)])
    straight = tmp_path / "straight"
    saved = straight / "checkpoints" / "step_00000004"
    assert json.loads((saved / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weights = load_file(saved / "model" / "model.safetensors")
    dcp_to_torch_save(saved / "train_state", tmp_path / "state.pt")
    masters = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "state.pt")["model"].items()}
    assert weights.keys() == masters.keys()
    for name, w in weights.items():
        assert masters[name].dtype == torch.float32 and torch.equal(w, masters[name].to(torch.bfloat16)), name
    theirs = HF.from_pretrained(saved / "model", dtype=torch.bfloat16)
    for name, p in theirs.state_dict().items():
        assert torch.equal(p, weights[name]), name

    # Resume from step 2: steps 3-4 again from the fp32 masters, the same losses and weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    run(TRAIN + ["--config", str(config), f"output_dir={json.dumps(str(resumed))}", "--resume"])
    assert losses(resumed) == losses(straight)
    again = load_file(resumed / "checkpoints" / "step_00000004" / "model" / "model.safetensors")
    assert all(torch.equal(again[name], w) for name, w in weights.items())
