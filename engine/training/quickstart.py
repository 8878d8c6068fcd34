"""The built-in default job: phase 1 end to end on a CPU in minutes.

    python -m engine.training.quickstart [--out runs/quickstart]

1. trains a small byte-level BPE tokenizer on the bundled tasks' text (offline, milliseconds);
2. collects expert-augmented SFT trajectories on the bundled tasks: the scripted policy replays each
   gold fix, asks the offline OracleExpert, runs the tests and submits, in the bubblewrap sandbox; only
   resolved trajectories are kept (the method's SFT recipe);
3. makes a small random Qwen2-architecture model and fine-tunes it on them with engine/train.py's SFT loop;
4. measures: the loss before and after, and the resolve rate of the trained model on the bundled tasks
   (greedy decoding through the engine's own sampler, local sandbox), against the untrained model's.
   The tasks are the ones it was trained on: this shows the whole loop learns (data, loss masks, training,
   checkpoint, sampler, agent, evaluation), not that a 0.66M-parameter model generalises.
The same pipeline at scale is a real Qwen2.5 directory + `torchrun engine/train.py` (README)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.training.runtime import init_runtime
from engine.model import Qwen2ForCausalLM
from engine.training.sft import run_sft
from engine.tokenizer import Tokenizer, train_bpe_tokenizer
from engine.training.config import load_config


MARKER = ".protege-quickstart"   # in --out: this directory is the quickstart's own, safe to replace


def tokenizer_corpus() -> list[str]:
    from rollout.agent.loop import SYSTEM_PROMPT, TASK_PROMPT
    from rollout.tasks import BUNDLED_DIR, UPSTREAM_DIR, bundled_tasks
    from rollout.agent.tools import TOOLS
    texts = [SYSTEM_PROMPT, TASK_PROMPT, json.dumps(TOOLS)]
    for task in bundled_tasks():
        texts += [task.problem_statement, task.patch, task.test_patch]
    texts += [p.read_text(errors="replace") for p in sorted(BUNDLED_DIR.rglob("*.py"))
              if UPSTREAM_DIR not in p.parents]   # the default set's own files only
    return texts


def collect(out: Path, tokenizer_dir: Path, policy: list[str]) -> dict:
    from rollout.collect import main as collect_main
    from rollout.tasks import BUNDLED_JSONL
    argv = ["--tasks", str(BUNDLED_JSONL), "--expert", "oracle", "--backend", "sandbox", "--out", str(out),
            "--tokenizer", str(tokenizer_dir / "tokenizer.json"), *policy]
    if collect_main(argv) != 0:
        raise RuntimeError(f"rollout.collect {' '.join(argv)} failed")
    return json.loads((out / "summary.json").read_text())


def sampler_policy(checkpoint: Path) -> list[str]:
    return ["--policy", "sampler", "--checkpoint", str(checkpoint), "--temperature", "0", "--max-steps", "12",
            "--max-context-tokens", "6144", "--max-turn-tokens", "320", "--kv-cache-gb", "0.25", "--no-judge"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.training.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=100, help="SFT optimizer steps")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    p.add_argument("--skip-eval", action="store_true", help="do not measure resolve rates with the sampler")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        print(f"error: --out {out} is a non-empty directory that no quickstart wrote (no {MARKER} in it); "
              f"nothing was deleted: choose a new or empty directory", file=sys.stderr)
        return 2
    if shutil.which("bwrap") is None:
        print("error: the quickstart runs agent commands in a bubblewrap sandbox, and `bwrap` is not installed "
              "(scripts/setup.sh installs it as root: apt-get install bubblewrap)", file=sys.stderr)
        return 2
    if out.exists():
        shutil.rmtree(out)   # a previous quickstart's output (checked above)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by python -m engine.training.quickstart; it replaces this directory\n")
    base = out / "base-model"
    started = time.perf_counter()

    print("[1/4] tokenizer: byte-level BPE on the bundled tasks' text", flush=True)
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), vocab_size=2048, out_dir=base)

    print("[2/4] SFT data: scripted policy + oracle expert on the bundled tasks (sandbox)", flush=True)
    data = collect(out / "sft-data", base, ["--policy", "scripted", "--keep-resolved", "--attempts", "1"])
    lengths = [sum(len(m["token_ids"]) for m in json.loads(line)["messages"])
               for line in (out / "sft-data" / "trajectories.jsonl").read_text().splitlines()]

    print("[3/4] SFT of a small Qwen2 model", flush=True)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True,
                         eos_token_id=list(Tokenizer.from_dir(base).eos_ids))
    Qwen2ForCausalLM(config).save_pretrained(base)
    run_dir = out / "sft"
    cfg = load_config(None, [
        f"output_dir={json.dumps(str(run_dir))}", f"model.path={json.dumps(str(base))}",
        f"data.train_files={json.dumps([str(out / 'sft-data' / 'trajectories.jsonl')])}",
        f"data.max_seq_len={max(lengths)}", f"train.micro_batch_tokens={max(8192, max(lengths))}",
        f"train.steps={args.steps}", f"train.global_batch_size={len(lengths)}", f"train.lr={args.lr}",
        "train.warmup_steps=10", "train.min_lr_ratio=0.05", "train.weight_decay=0.0", "checkpoint.every=0",
        "checkpoint.keep_last=1"])
    summary = run_sft(cfg, init_runtime("cpu"), resume=False)

    report = {"tasks": data["tasks"], "sft_trajectories": len(lengths), "sft_tokens": sum(lengths),
              "loss_first_step": summary["first_loss"], "loss_last_step": summary["final_loss"],
              "checkpoint": summary["checkpoint"], "metrics": summary["metrics"], "plot": summary["plot"]}
    if not args.skip_eval:
        print("[4/4] resolve rate on the bundled tasks, greedy, through the engine's sampler", flush=True)
        before = collect(out / "eval-untrained", base, sampler_policy(base))
        after = collect(out / "eval-trained", Path(summary["checkpoint"]), sampler_policy(Path(summary["checkpoint"])))
        report.update(resolve_rate_untrained=before["resolve_rate"], resolve_rate_trained=after["resolve_rate"],
                      eval_trajectories=str(out / "eval-trained" / "trajectories.jsonl"))
    report["minutes"] = round((time.perf_counter() - started) / 60, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nQuickstart report (also in " + str(out / "report.json") + "):")
    for key, value in report.items():
        print(f"  {key:24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
