"""The paper's evaluation figures from one or more evaluation runs (rollout.evaluate_agent), as report.md
with PNG plots; several runs (say the SFT and the RL checkpoint, or with and without the expert) share one
table and the same plots.

    python -m protege.rollout.report runs/sft runs/rl --out runs/compare [--names SFT RL]

Figures: Pass@1 (mean over attempts, with a 95% interval that clusters a task's attempts), Pass@k when a run made
k > 1 attempts, expert calls per task, expert token share (expert guidance tokens / all context tokens),
cost per task, steps per trajectory, the share of trajectories whose longest streak of identical
normalised actions is longer than 10, 20 and 40 (the paper's loop figure), termination reasons."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter
from math import comb
from pathlib import Path

from protege.engine.checkpoint import write_atomically
from protege.engine.optional import pyplot
from protege.rollout.agent.trajectory import TERMINATIONS

LOOP_THRESHOLDS = (10, 20, 40)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and n successes, unlike the normal one)."""
    return _wilson(successes / n, n, z) if n else (0.0, 0.0)


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_interval(rates: list[float], n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of Pass@1, the mean of T tasks' resolve rates, with a task's attempts clustered (they share
    the task's difficulty, so they are not independent): the Wilson interval at the effective sample size
    n_eff = p (1 - p) / SE^2, SE the cluster-robust standard error of the mean of the rates (their sample
    standard deviation / sqrt(T)), kept within [T, n] (n attempts in all): at most every attempt independent,
    at least one observation per task (also n_eff at p = 0 or 1, where SE is 0). One attempt per task: the
    Wilson interval over the T tasks."""
    tasks = len(rates)
    if tasks == 0:
        return 0.0, 0.0
    p = statistics.fmean(rates)
    variance = sum((r - p) ** 2 for r in rates) / (tasks * (tasks - 1)) if tasks > 1 else 0.0
    n_eff = p * (1 - p) / variance if variance > 0 else n if 0 < p < 1 else tasks
    return _wilson(p, min(max(n_eff, tasks), n), z)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased Pass@k estimate of one task from n attempts of which c resolved (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(records: list[dict]) -> dict:
    """The figures of one run's per-attempt records (results.json's "instances"). An attempt the
    infrastructure failed (environment start, sampler, evaluator, judge transport) says nothing about the
    policy: it is counted in "infrastructure_failures" and left out of every other figure."""
    failed = [r for r in records if r.get("infrastructure_error")]
    records = [r for r in records if not r.get("infrastructure_error")]
    n = len(records)
    if n == 0:
        return {"tasks": 0, "trajectories": 0, "infrastructure_failures": len(failed)}
    resolved = sum(bool(r["resolved"]) for r in records)
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["instance_id"], []).append(r)
    rates = [sum(bool(r["resolved"]) for r in v) / len(v) for v in by_task.values()]
    low, high = clustered_interval(rates, n)
    attempts = min(len(v) for v in by_task.values())
    total_tokens = sum(r["tokens"]["total"] for r in records)
    out = {
        "tasks": len(by_task), "trajectories": n, "infrastructure_failures": len(failed), "attempts": attempts,
        "resolved": resolved,
        "pass@1": statistics.fmean(rates),
        "pass@1_ci95": [low, high],
        "expert_calls_per_task": statistics.fmean(r["expert_calls"] for r in records),
        "expert_token_share": sum(r["tokens"]["expert"] for r in records) / total_tokens if total_tokens else 0.0,
        "cost_per_task_usd": statistics.fmean(r["cost_usd"] for r in records),
        "cost_total_usd": sum(r["cost_usd"] for r in records),
        "steps_mean": statistics.fmean(r["steps"] for r in records),
        "steps_median": statistics.median(r["steps"] for r in records),
        "termination": dict(Counter(r["termination"] for r in records)),
    }
    for t in LOOP_THRESHOLDS:
        out[f"streak>{t}"] = sum(r["longest_streak"] > t for r in records) / n
    if attempts > 1:
        out[f"pass@{attempts}"] = statistics.fmean(
            pass_at_k(len(v), sum(bool(r["resolved"]) for r in v), attempts) for v in by_task.values())
    return out


def load_run(directory: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(run settings, per-attempt records) from a run directory's results.json."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {directory} a finished rollout.evaluate_agent run?)")
    data = json.loads(path.read_text())
    for field in ("run", "instances"):
        if field not in data:
            raise ValueError(f"{path}: field {field!r} missing")
    return data["run"], data["instances"]


def _atomic_write(path: Path, data: bytes | str) -> None:
    write_atomically(str(path), lambda tmp: Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data))


# ---------------------------------------------------------------------------------------------- plots

def _plots(runs: list[tuple[str, list[dict], dict]], out: Path) -> list[tuple[str, str]]:
    plt = pyplot("the report's plots")
    if plt is None:
        return []
    from matplotlib.ticker import MaxNLocator

    names = [name for name, _, _ in runs]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def save(fig, filename: str, title: str) -> None:
        for ax in fig.axes:   # counts and shares start at 0; an all-zero plot still gets a readable axis
            low, high = ax.get_ylim()
            ax.set_ylim(0, high * 1.15 if high > 0 else 1)  # room for the labels and legend
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        written.append((title, filename))

    def bars(ax, values, labels, fmt, errors=None):
        xs = range(len(values))
        ax.bar(xs, values, color=colours[:len(values)], yerr=errors, capsize=6 if errors is not None else 0)
        ax.set_xticks(list(xs), labels)
        tops = [v + e for v, e in zip(values, errors[1])] if errors is not None else values  # above the bar
        for x, v, top in zip(xs, values, tops):
            ax.annotate(fmt(v), (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=9)

    # Pass@1 with its interval
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs) + 2), 3.6))
    rates = [s["pass@1"] for _, _, s in runs]
    errors = [[r - s["pass@1_ci95"][0] for r, (_, _, s) in zip(rates, runs)],
              [s["pass@1_ci95"][1] - r for r, (_, _, s) in zip(rates, runs)]]
    bars(ax, [100 * r for r in rates], names, lambda v: f"{v:.1f}%", errors=[[100 * e for e in row] for row in errors])
    ax.set_ylabel("resolved (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Pass@1 (95% interval, clustered by task)")
    save(fig, "resolve_rate.png", "Resolve rate")

    def histogram(key: str, filename: str, title: str, xlabel: str, bins) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.hist([[r[key] for r in records] for _, records, _ in runs], bins=bins, label=names,
                color=colours[:len(runs)])
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("trajectories")
        ax.set_title(title)
        ax.legend()
        save(fig, filename, title)

    top = max([r["expert_calls"] for _, records, _ in runs for r in records] + [1])
    histogram("expert_calls", "expert_calls.png", "Expert calls per task", "answered ask_expert calls",
              [b - 0.5 for b in range(top + 2)])
    longest = max([r["steps"] for _, records, _ in runs for r in records] + [1])
    width = max(1, math.ceil((longest + 1) / 30))   # at most 30 bins of whole steps
    histogram("steps", "steps.png", "Steps per trajectory", "steps (assistant turns)",
              [b - 0.5 for b in range(0, longest + width + 1, width)])

    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs) + 2), 3.6))
    bars(ax, [100 * s["expert_token_share"] for _, _, s in runs], names, lambda v: f"{v:.1f}%")
    ax.set_ylabel("expert tokens / all tokens (%)")
    ax.set_title("Expert token share")
    save(fig, "expert_token_share.png", "Expert token share")

    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs) + 2), 3.6))
    bars(ax, [s["cost_per_task_usd"] for _, _, s in runs], names, lambda v: f"${v:.3f}")
    ax.set_ylabel("US dollars per task (mean)")
    ax.set_title("Cost per task (expert + policy API)")
    save(fig, "cost.png", "Cost per task")

    def grouped(categories, values_of, filename, title, ylabel, fmt):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories) * len(runs) / 2 + 3), 3.8))
        width = 0.8 / len(runs)
        for i, (name, _, s) in enumerate(runs):
            xs = [c + i * width - 0.4 + width / 2 for c in range(len(categories))]
            values = values_of(s)
            ax.bar(xs, values, width, label=name, color=colours[i % len(colours)])
            for x, v in zip(xs, values):
                ax.annotate(fmt(v), (x, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
        ax.set_xticks(range(len(categories)), categories)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        save(fig, filename, title)

    grouped([f"> {t}" for t in LOOP_THRESHOLDS], lambda s: [100 * s[f"streak>{t}"] for t in LOOP_THRESHOLDS],
            "loops.png", "Trajectories with a repeated-action streak longer than N", "trajectories (%)",
            lambda v: f"{v:.1f}%")
    seen = [t for t in TERMINATIONS if any(t in s["termination"] for _, _, s in runs)]
    grouped(seen, lambda s: [s["termination"].get(t, 0) for t in seen], "termination.png", "Termination reasons",
            "trajectories", lambda v: str(int(v)))
    plt.close("all")
    return written


# ---------------------------------------------------------------------------------------------- report

def _row(name: str, s: dict) -> list[str]:
    low, high = s["pass@1_ci95"]
    passk = next((f"{100 * v:.1f}% (k={k[5:]})" for k, v in s.items() if k.startswith("pass@") and k[5:].isdigit()
                  and k != "pass@1"), "-")
    return [name, str(s["tasks"]), str(s["trajectories"]), f"{100 * s['pass@1']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]",
            passk, f"{s['expert_calls_per_task']:.2f}", f"{100 * s['expert_token_share']:.1f}%",
            f"${s['cost_per_task_usd']:.3f}", f"{s['steps_mean']:.1f} / {s['steps_median']:g}",
            *(f"{100 * s[f'streak>{t}']:.1f}%" for t in LOOP_THRESHOLDS),
            ", ".join(f"{k} {v}" for k, v in sorted(s["termination"].items())), str(s["infrastructure_failures"])]


def write_report(runs: list[tuple[str, list[dict]]], out: str | os.PathLike, settings: list[dict] | None = None) -> dict:
    """report.md, report.json and the PNGs for `runs` ((name, records) pairs) in `out`; returns the summaries."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = [(name, records, summarize(records)) for name, records in runs]
    full = [r for r in full if r[2]["trajectories"]]
    header = ["run", "tasks", "trajectories", "Pass@1 [95% CI]", "Pass@k", "expert calls / task",
              "expert token share", "cost / task", "steps mean / median",
              *(f"streak > {t}" for t in LOOP_THRESHOLDS), "termination", "infrastructure failures"]
    lines = ["# Evaluation report", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(_row(name, s)) + " |" for name, _, s in full), ""]
    lines += ["Pass@1 is the mean resolve rate over attempts; its interval is the 95% Wilson score interval at the "
              "effective sample size of the cluster-robust standard error (a task's attempts are not independent; "
              "between one observation per task and one per attempt). Expert token share: tokens of expert "
              "guidance in the agent's context / all context tokens. Cost: expert and policy API spend (the "
              "hidden judge's is not charged to the task). A streak is a run of identical normalised actions. "
              "Infrastructure failures (environment start, sampler, evaluator, judge transport) are counted apart "
              "and left out of every other column; a resumed run runs them again.", ""]
    if settings:
        lines += ["## Settings", ""]
        for (name, _, _), s in zip(full, settings):
            shown = {k: s[k] for k in ("tasks_file", "policy", "checkpoint", "expert", "attempts", "temperature",
                                       "seed", "max_steps", "expert_budget_usd", "expert_quota",
                                       "expert_recent_messages", "backend") if k in s}
            lines.append(f"- **{name}**: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        lines.append("")
    if full:
        for title, filename in _plots(full, out):
            lines += [f"## {title}", "", f"![{title}]({filename})", ""]
    _atomic_write(out / "report.md", "\n".join(lines))
    summaries = {name: s for name, _, s in full}
    _atomic_write(out / "report.json", json.dumps(summaries, indent=2) + "\n")
    return summaries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m protege.rollout.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories of python -m protege.rollout.evaluate_agent")
    p.add_argument("--out", required=True, help="where report.md and the plots go")
    p.add_argument("--names", nargs="+", default=None, help="one label per run (default: the directory names)")
    args = p.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        p.error(f"--names: {len(args.names)} names for {len(args.runs)} runs")
    try:
        loaded = [load_run(d) for d in args.runs]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = args.names or [Path(d).resolve().name for d in args.runs]
    summaries = write_report([(n, records) for n, (_, records) in zip(names, loaded)], args.out,
                             [run for run, _ in loaded])
    print(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
