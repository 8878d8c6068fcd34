"""The built-in default job: both phases end to end on a CPU in minutes.

    python -m protege.engine.training.quickstart [--out runs/quickstart]

1. trains a small byte-level BPE tokenizer on the bundled tasks' text (offline, milliseconds);
2. collects expert-augmented SFT trajectories: the scripted policy replays each gold fix, asks the offline
   OracleExpert, runs the tests and submits, in the bubblewrap sandbox; resolved ones are kept;
3. fine-tunes a small random Qwen2 on them (engine/train.py's SFT loop), briefly: room is left to learn;
4. runs a few GRPO steps on the SFT model's own rollouts (engine/train.py's phase 2, shaped rewards);
5. measures resolve rate, loop rate, Stage I reward and steps on held-out seeds: of the random base model (one
   per task), after SFT and after GRPO (several per task), with 95% intervals clustered by task, and GRPO's paired change per task. The tasks are the
   ones it trains on: this shows the loop learns, not that a 0.7M-parameter model generalises. At scale: a real Qwen2.5 directory + `torchrun engine/train.py` (README)."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from protege.engine.tokenizer import train_bpe_tokenizer
from protege.engine.training.config import load_config
from protege.engine.training.rl import run_grpo
from protege.engine.training.runtime import init_runtime
from protege.engine.training.sft import run_sft
from protege.engine.training.tiny import make_tiny_base, tokenizer_corpus


MARKER = ".protege-quickstart"   # in --out: this directory is the quickstart's own, safe to replace


def collect(out: Path, tokenizer_dir: Path, policy: list[str]) -> dict:
    from protege.rollout.collect import main as collect_main
    from protege.rollout.tasks import BUNDLED_JSONL
    argv = ["--tasks", str(BUNDLED_JSONL), "--expert", "oracle", "--backend", "sandbox", "--out", str(out),
            "--tokenizer", str(tokenizer_dir / "tokenizer.json"), *policy]
    if collect_main(argv) != 0:
        raise RuntimeError(f"rollout.collect {' '.join(argv)} failed")
    return json.loads((out / "summary.json").read_text())


# More steps than the loop penalty's first threshold (k1 = 15): a repeated action then costs reward.
MAX_STEPS = 20


def sampler_policy(checkpoint: Path, *extra: str) -> list[str]:
    return ["--policy", "sampler", "--checkpoint", str(checkpoint), "--max-steps", str(MAX_STEPS),
            "--max-context-tokens", "8192", "--max-turn-tokens", "320", "--kv-cache-gb", "0.25", "--no-judge", *extra]


def held_out(out: Path, checkpoint: Path, attempts: int) -> list[dict]:
    """Sampled (temperature 1) on every bundled task, `attempts` seeds each that no training step used: per
    trajectory its task, resolved, loop (a streak of > 10 identical actions), steps and Stage I reward."""
    from protege.rewards.curriculum import Curriculum
    from protege.rewards.shaping import action_streaks, score
    from protege.rewards.stats import loops
    from protege.rollout.agent.trajectory import load_trajectories
    collect(out, checkpoint, sampler_policy(checkpoint, "--attempts", str(attempts), "--seed", str(EVAL_SEED)))
    stage_one = Curriculum.default().stage_at(1).reward
    return [{"task": t.task_id, "resolved": float(bool(t.resolved)), "loop": float(loops(action_streaks(t.actions))),
             "steps": float(t.steps), "reward": score(t.reward_input(), stage_one).R_total}
            for t in load_trajectories(out / "trajectories.jsonl")]


EVAL_SEED = 10_007   # held-out: GRPO samples with seeds derived from the run seed (0)
METRICS = ("resolved", "loop", "reward", "steps")


def by_task(records: list[dict], metric: str) -> dict[str, float]:
    """Each task's mean of `metric` over its attempts (a task's attempts share its difficulty: one cluster)."""
    tasks: dict[str, list[float]] = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r[metric])
    return {task: statistics.fmean(v) for task, v in tasks.items()}


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-task values with a normal 95% interval over the tasks (the
    cluster-robust standard error: a task's attempts are not independent)."""
    m = statistics.fmean(values)
    half = z * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return m, m - half, m + half


def eval_figures(records: list[dict]) -> dict:
    """Resolve rate and loop rate with rollout.report's clustered Wilson interval, mean reward and steps with
    mean_interval; every figure over all attempts of all tasks."""
    from protege.rollout.report import clustered_interval
    out = {"trajectories": len(records), "tasks": len(by_task(records, "resolved"))}
    for metric in METRICS:
        rates = list(by_task(records, metric).values())
        m = statistics.fmean(r[metric] for r in records)
        low, high = clustered_interval(rates, len(records)) if metric in ("resolved", "loop") else mean_interval(rates)[1:]
        out[metric] = {"mean": round(m, 4), "ci95": [round(low, 4), round(high, 4)]}
    return out


def paired_change(before: list[dict], after: list[dict]) -> dict:
    """after - before per task (same tasks, same seeds), averaged over tasks with mean_interval: the change
    is signal when its interval excludes 0."""
    out = {}
    for metric in METRICS:
        b, a = by_task(before, metric), by_task(after, metric)
        diffs = [a[t] - b[t] for t in b if t in a]
        m, low, high = mean_interval(diffs)
        out[metric] = {"mean": round(m, 4), "ci95": [round(low, 4), round(high, 4)],
                       "tasks_up": sum(d > 0 for d in diffs), "tasks_down": sum(d < 0 for d in diffs)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m protege.engine.training.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=150, help="SFT optimizer steps (each over every SFT trajectory)")
    p.add_argument("--rl-steps", type=int, default=5, help="GRPO steps after SFT (0: phase 1 only)")
    p.add_argument("--lr", type=float, default=1e-2, help="SFT peak learning rate")
    p.add_argument("--rl-lr", type=float, default=1e-4, help="GRPO learning rate")
    p.add_argument("--eval-attempts", type=int, default=3, help="held-out seeds per task in each evaluation")
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
    (out / MARKER).write_text("written by python -m protege.engine.training.quickstart; it replaces this directory\n")
    base = out / "base-model"
    started = time.perf_counter()

    print("[1/5] tokenizer: byte-level BPE on the bundled tasks' text", flush=True)
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(), vocab_size=2048, out_dir=base)

    print("[2/5] SFT data: scripted policy + oracle expert on the bundled tasks (sandbox)", flush=True)
    data = collect(out / "sft-data", base, ["--policy", "scripted", "--keep-resolved", "--attempts", "1"])
    lengths = [sum(len(m["token_ids"]) for m in json.loads(line)["messages"])
               for line in (out / "sft-data" / "trajectories.jsonl").read_text().splitlines()]

    print("[3/5] SFT of a small Qwen2 model", flush=True)
    make_tiny_base(base, tokenizer=tokenizer)
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
    sft_model = Path(summary["checkpoint"])
    if args.rl_steps:
        print("[4/5] GRPO: the SFT model's own rollouts on the bundled tasks (oracle expert, sandbox), shaped "
              "rewards, in-process sampler", flush=True)
        rl_cfg = load_config(None, [
            'phase="grpo"', f"output_dir={json.dumps(str(out / 'grpo'))}", f"model.path={json.dumps(str(sft_model))}",
            f"train.steps={args.rl_steps}", f"train.lr={args.rl_lr}", "train.micro_batch_tokens=16384", "train.min_lr_ratio=1.0",
            "checkpoint.every=0", "checkpoint.keep_last=1", "log.progress=false", "rl.prompts_per_step=4",
            "rl.group_size=4", 'rl.backend="sandbox"', f"rl.max_steps={MAX_STEPS}", "rl.max_context_tokens=8192",
            "rl.max_turn_tokens=320", "rl.max_envs=8", "rl.command_timeout_s=30"])
        rl_summary = run_grpo(rl_cfg, init_runtime("cpu"), resume=False)
        report.update(grpo_checkpoint=rl_summary["checkpoint"], grpo_metrics=rl_summary["metrics"],
                      grpo_plot=rl_summary["plot"])
    if not args.skip_eval:
        print("[5/5] held-out seeds on the bundled tasks, through the engine's sampler: before and after", flush=True)
        # The random base model: one seed per task is enough to see where SFT starts from.
        report["before_sft"] = eval_figures(held_out(out / "eval-base", base, 1))
        before = held_out(out / "eval-sft", sft_model, args.eval_attempts)
        report["after_sft"] = eval_figures(before)
        if args.rl_steps:
            after = held_out(out / "eval-grpo", Path(report["grpo_checkpoint"]), args.eval_attempts)
            report["after_grpo"] = eval_figures(after)
            report["grpo_change"] = paired_change(before, after)
    report["minutes"] = round((time.perf_counter() - started) / 60, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nQuickstart report (also in " + str(out / "report.json") + "):")
    for key, value in report.items():
        print(f"  {key:24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
