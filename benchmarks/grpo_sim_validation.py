"""Does the GRPO step simulator (grpo_step_sim.py) predict a real run? A real GRPO run of the engine on this
CPU (engine/train.py, configs/grpo-tiny.toml: the tiny model, the bubblewrap sandbox, the in-process
sampler, with log.sampler_trace on) against the simulator fed the engine's CPU costs measured apart from
that run: the sampler's step time (fitted on steps of the same model alone), the sandbox's start, command
and close times, the update's time per token. The simulator replays the run's own trajectories (their turns
and tokens, from rollouts/step_N.jsonl); what it predicts is the schedule: each step's rollout, update and
total time and the running batch over time.

    python benchmarks/grpo_sim_validation.py [--out benchmarks/results]   # about a minute on 2 cores

writes grpo_sim_validation.json (with the markdown grpo_step_sim.py includes) and grpo_sim_validation.png.
The model is first taught (a few seconds of SFT) to answer each turn with one bash call that sleeps
(`sleep 0.3; ls`), and to end the run with <|endoftext|> now and then: a random tiny model writes no tool
call, and its trajectories would have no environment time at all.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import grpo_step_sim as sim

REPO = Path(__file__).resolve().parent.parent
COMMAND = "sleep 0.3; ls"
# 3 steps of 2 x 4 trajectories of up to 10 turns; sampled at 0.6, where most turns of the taught model are the
# bash call (at 1.0 about half are); no reference model (kl_coef 0), so the update is one forward + backward.
RUN = {"rl.max_steps": 10, "rl.group_size": 4, "rl.prompts_per_step": 2, "rl.max_turn_tokens": 64,
       "rl.max_envs": 8, "rl.temperature": 0.6, "train.steps": 3, "checkpoint.every": 0, "rl.kl_coef": 0.0}


# ---------------------------------------------------------------------------------------------- the policy

def teach_tool_calls(model_dir: Path, stay: float = 0.9, turns: int = 8, steps: int = 150, lr: float = 3e-3) -> None:
    """A brief SFT in place: every assistant turn is one bash call of COMMAND; at a turn's first token the
    target is that call with probability `stay`, else <|endoftext|> (the run ends)."""
    from protege.engine.chat import Conversation, ToolCall, format_assistant_body
    from protege.engine.model import Qwen2ForCausalLM
    from protege.engine.tokenizer import Tokenizer
    from protege.rollout.agent.loop import SYSTEM_PROMPT, TASK_PROMPT
    from protege.rollout.agent.tools import TOOLS
    from protege.rollout.envs.sandbox import SandboxEnvironment
    from protege.rollout.tasks import bundled_tasks
    tokenizer = Tokenizer.from_dir(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    chat = Conversation(tokenizer, TOOLS)
    chat.append({"role": "system", "content": SYSTEM_PROMPT})
    chat.append({"role": "user", "content": TASK_PROMPT.format(problem=bundled_tasks()[0].problem_statement,
                                                               repo_dir=SandboxEnvironment.repo_dir)})
    body = format_assistant_body("", [ToolCall("bash", {"command": COMMAND})])
    rows, targets, firsts = [], [], []
    for _ in range(turns):
        start = len(chat.ids) + len(chat.generation_prompt)
        chat.append({"role": "assistant", "content": body})
        end = chat.ids.index(tokenizer.im_end_id, start) + 1   # the turn's tokens, <|im_end|> included
        firsts.append(len(rows))
        rows += range(start - 1, end - 1)
        targets += chat.ids[start:end]
        chat.append({"role": "tool", "content": "calendarx\nsetup.py\ntests"})
    ids = torch.tensor(chat.ids)
    cu_seqlens = torch.tensor([0, len(ids)], dtype=torch.int32)
    target = torch.tensor(targets)
    first = torch.zeros(len(rows), dtype=torch.bool)
    first[firsts] = True
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logp = torch.log_softmax(model(ids, cu_seqlens, return_hidden=True)[rows] @ model.lm_head_weight.T, -1)
        picked = logp.gather(1, target[:, None])[:, 0]
        soft = stay * picked + (1 - stay) * logp[:, tokenizer.endoftext_id]
        loss = -torch.where(first, soft, picked).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------- the real run

def real_run(out: Path, model_dir: Path) -> dict:
    """engine/train.py on configs/grpo-tiny.toml with the sampler trace on: per step its metrics, its phases
    and its sampler steps, and its trajectories."""
    overrides = [f"{k}={v}" for k, v in RUN.items()]
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), "--config", str(REPO / "configs" / "grpo-tiny.toml"),
           f"output_dir={out}", f"model.path={model_dir}", "log.sampler_trace=true", "log.progress=false",
           *overrides]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"the real run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trace = [json.loads(line) for line in (out / "sampler_trace" / "rank_0.jsonl").read_text().splitlines()]
    rollouts = {}
    for step in range(1, RUN["train.steps"] + 1):
        lines = (out / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
        rollouts[step] = sorted(map(json.loads, lines), key=lambda r: (r["slot"], r["sample"]))
    shown = " ".join(cmd[1:]).replace(str(REPO) + "/", "").replace(str(out), "OUT").replace(str(model_dir), "MODEL")
    return {"command": shown, "process_seconds": time.perf_counter() - started,
            "metrics": metrics, "trace": trace, "rollouts": rollouts}


# ---------------------------------------------------------------------------------------------- measured costs

def fit(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares, coefficients clipped at 0 (a cost is never negative)."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)[:, None]
    return [max(0.0, float(c)) for c in torch.linalg.lstsq(a, b).solution[:, 0]]


def measure_sampler(model_dir: Path) -> dict:
    """Steps of the Sampler alone on the taught model (exact mode, as the run): batches of 1-8 prompts of
    300-1500 tokens, 48 tokens each; step time fitted as host + per row + per token + per context token."""
    from protege.engine.model import Qwen2ForCausalLM
    from protege.rollout.sampler import Sampler, SamplingParams
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    model.exact = True
    records = []
    sampler = Sampler(model, max_model_len=4096)
    sampler.on_step = records.append
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2, 4, 8):
        for length in (300, 800, 1500):
            prompts = [torch.randint(10, 1000, (length,), generator=g).tolist() for _ in range(batch)]
            sampler.generate(prompts, SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True))
    records = records[3:]   # the first steps warm up the allocator
    coef = fit([[1, r.sequences, r.tokens, r.context] for r in records], [r.seconds for r in records])
    return {"step_host_s": coef[0], "row_host_s": coef[1], "token_s": coef[2], "kv_s_per_token": coef[3],
            "steps": len(records)}


def measure_environment(task, concurrency: int, commands: list[str], repeats: int = 3) -> dict:
    """The sandbox: `concurrency` environments started at once (as a step starts them), each command the run's
    trajectories ran (median of `repeats`), diff + close. An invalid turn runs nothing: no cost."""
    from protege.rollout.envs.base import open_environment

    def one(_):
        t0 = time.perf_counter()
        env = open_environment(task, "sandbox")
        t1 = time.perf_counter()
        env.diff()
        env.close()
        return t1 - t0, time.perf_counter() - t1

    with ThreadPoolExecutor(concurrency) as pool:
        opened = list(pool.map(one, range(concurrency)))
    env = open_environment(task, "sandbox")
    latency = {}
    for command in commands:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            env.run(command, timeout=30)
            times.append(time.perf_counter() - t0)
        latency[command] = sorted(times)[len(times) // 2]
    env.close()
    return {"start_s": [o[0] for o in opened], "end_s": [o[1] for o in opened], "command_s": latency}


def commands_run(rollouts: dict) -> list[str]:
    return sorted({a["arguments"]["command"] for records in rollouts.values() for r in records
                   for a in r["trajectory"]["actions"] if a["tool"] == "bash" and a.get("error") is None})


def measure_training(model_dir: Path) -> dict:
    """The update's cost on the taught model (as rl._update in one CPU process: TokenLogprobs forward +
    backward over a pack, AdamW), fitted as fixed + per token + per causal attention pair over packs of
    documents of 500-3000 tokens."""
    from protege.engine.model import Qwen2ForCausalLM
    from protege.engine.training.rl import TokenLogprobs
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    model.exact = True
    root = TokenLogprobs(model)
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-4)
    xs, ys = [], []
    for docs in ([1000], [500] * 4, [1500] * 4, [3000] * 2, [1000] * 8, [3000] * 3, [500] * 12, [1500] * 6):
        tokens = sum(docs)
        ids = torch.randint(10, 1000, (tokens,))
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
        rows = torch.arange(0, tokens - 1, 4)   # about the share of policy tokens in the run's trajectories
        t0 = time.perf_counter()
        logp, _ = root(ids, cu, rows, ids[rows + 1], temperature=1.0)
        logp.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        xs.append([1, tokens, sum(n * (n + 1) / 2 for n in docs)])
        ys.append(time.perf_counter() - t0)
    fixed, per_token, per_pair = fit(xs[1:], ys[1:])   # the first one warms up
    return {"update_fixed_s": fixed, "train_token_s": per_token, "train_pair_s": per_pair}


def cpu_device(sampler: dict, training: dict) -> sim.Device:
    return sim.Device("this CPU (fitted)", weights_s=0.0, kv_s_per_token=sampler["kv_s_per_token"],
                      token_s=sampler["token_s"], attention_s_per_pair=0.0, step_host_s=sampler["step_host_s"],
                      row_host_s=sampler["row_host_s"], train_token_s=training["train_token_s"],
                      train_pair_s=training["train_pair_s"],
                      forward_token_s=0.0, update_fixed_s=training["update_fixed_s"], additive=True,
                      sources={"sampler": "Sampler steps of the taught model alone, least squares",
                               "training": "TokenLogprobs forward + backward + AdamW alone, least squares"})


# ---------------------------------------------------------------------------------------------- the replay

def turns_of(record: dict) -> list[tuple[int, int, str | None]]:
    """(prefill, decode, the command it ran or None) per model turn of a stored trajectory."""
    traj = record["trajectory"]
    out, position, consumed = [], 0, 0
    actions = {a["step"]: a for a in traj["actions"]}
    turn = 0
    for m in traj["messages"]:
        generated = sum(m["loss_mask"])
        if m["role"] == "assistant" and generated:
            start = position + m["loss_mask"].index(1)
            action = actions.get(turn)
            ran = action is not None and action["tool"] == "bash" and action.get("error") is None
            out.append((start - consumed, generated, action["arguments"]["command"] if ran else None))
            consumed = start + generated
            turn += 1
        position += len(m["token_ids"])
    return out


def replay_plans(rollouts: dict, env: dict, cfg: sim.StepConfig):
    """The run's own trajectories, each with the measured environment costs (means, so that the replay's
    only randomness is the run's)."""
    mean = lambda xs: sum(xs) / len(xs)
    start, end = mean(env["start_s"]), mean(env["end_s"])

    def plans(step: int, group: int) -> list[sim.Plan]:
        records = rollouts[step + 1]
        slot = sorted({r["slot"] for r in records})[group - step * cfg.prompts_per_step]
        out = []
        for r in (r for r in records if r["slot"] == slot):
            turns = turns_of(r)
            seconds = [env["command_s"][c] if c is not None else 0.0 for _, _, c in turns]
            # a run that reached max_steps ran its last turn's command too: it delays the end
            out.append(sim.Plan(start, [sim.Turn(p, d, a) for (p, d, _), a in zip(turns, seconds)],
                                end + seconds[-1]))
        return out
    return plans


def simulate_run(real: dict, device: sim.Device, env: dict) -> sim.Simulation:
    cfg = sim.StepConfig(ranks=1, prompts_per_step=RUN["rl.prompts_per_step"], group_size=RUN["rl.group_size"],
                         max_steps=RUN["rl.max_steps"], max_context=4096, max_turn_tokens=RUN["rl.max_turn_tokens"],
                         max_envs=RUN["rl.max_envs"], extra_forwards=0)
    run = sim.Simulation(cfg, None, device, sim.Policy("sync (today)", "sync"), plans=replay_plans(
        real["rollouts"], env, cfg))
    run.run(RUN["train.steps"])
    return run


# ---------------------------------------------------------------------------------------------- comparison

def real_steps(real: dict) -> list[dict]:
    """Per step: rollout and update seconds, and the running batch's time-weighted mean over the rollout
    (sequences x seconds of each sampler step, over the rollout's length)."""
    out = []
    for m in real["metrics"]:
        steps = [t for t in real["trace"] if t["step"] == m["step"] and "t" in t]
        rollout = next(t for t in real["trace"] if t["step"] == m["step"] and t.get("phase") == "rollout")
        area = sum(t["seconds"] * t["sequences"] for t in steps)
        out.append({"rollout_s": m["rollout_seconds"], "update_s": m["training_seconds"],
                    "mean_batch": area / (rollout["end"] - rollout["start"])})
    return out


def simulated_steps(run: sim.Simulation) -> list[dict]:
    """The same figures from the simulation's rank (an update ends each step), and its running batch."""
    out, t0 = [], 0.0
    rank = run.ranks[0]
    for u in run.updates:
        train_start = min((a for a, _, phase in rank.intervals if phase == "training" and t0 <= a < u), default=u)
        trace = sorted((t - t0, n) for t, n in rank.trace if t0 <= t < train_start) or [(0.0, 0)]
        out.append({"rollout_s": train_start - t0, "update_s": u - train_start,
                    "mean_batch": sim.time_weighted_mean([(0.0, 0)] + trace, train_start - t0), "trace": trace})
        t0 = u
    return out


def table(real: list[dict], simulated: list[dict]) -> tuple[list[dict], dict]:
    rows, errors = [], {"rollout_s": [], "update_s": [], "step_s": [], "mean_batch": []}
    for i, (r, s) in enumerate(zip(real, simulated), 1):
        pairs = {"rollout_s": (r["rollout_s"], s["rollout_s"]), "update_s": (r["update_s"], s["update_s"]),
                 "step_s": (r["rollout_s"] + r["update_s"], s["rollout_s"] + s["update_s"]),
                 "mean_batch": (r["mean_batch"], s["mean_batch"])}
        row = {"step": i}
        for k, (a, b) in pairs.items():
            row[f"{k} real"] = round(a, 2)
            row[f"{k} SIMULATED"] = round(b, 2)
            errors[k].append(abs(b - a) / a)
        rows.append(row)
    total_real = sum(r["rollout_s"] + r["update_s"] for r in real)
    total_sim = sum(s["rollout_s"] + s["update_s"] for s in simulated)
    summary = {f"max_error_{k}": max(v) for k, v in errors.items()}
    summary["total_real_s"], summary["total_simulated_s"] = total_real, total_sim
    summary["total_error"] = abs(total_sim - total_real) / total_real
    return rows, summary


def plot(real: list[dict], simulated: list[dict], real_trace: list, out: Path):
    from protege.engine.optional import pyplot
    plt = pyplot("the validation plot")
    if plt is None:
        return None
    fig, axes = plt.subplots(len(real), 1, figsize=(10, 2.2 * len(real)), dpi=100, squeeze=False)
    axes = axes[:, 0]
    for i, ax in enumerate(axes):
        steps = [t for t in real_trace if t.get("step") == i + 1 and "t" in t]
        start = next(t["start"] for t in real_trace if t.get("step") == i + 1 and t.get("phase") == "rollout")
        ax.step([t["t"] - start for t in steps], [t["sequences"] for t in steps], where="pre", lw=0.8,
                label="real (CPU run, sampler trace)")
        ax.step(*zip(*simulated[i]["trace"]), where="post", lw=0.8, label="SIMULATED (measured CPU costs)")
        ax.axvline(real[i]["rollout_s"], color="C0", ls="--", lw=0.8)
        ax.axvline(simulated[i]["rollout_s"], color="C1", ls="--", lw=0.8)
        ax.set_title(f"step {i + 1}: sequences per sampler step (dashed: rollout ends)", fontsize=8)
        ax.set_ylabel("batch", fontsize=7)
        ax.legend(fontsize=6)
    axes[-1].set_xlabel("seconds since the rollout started")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def measure_and_run() -> tuple:
    """The CPU costs, measured with nothing else running, and the real run."""
    from protege.engine.training.tiny import make_tiny_base
    from protege.rollout.tasks import bundled_tasks
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_tiny_base(model_dir, seed=0)
        teach_tool_calls(model_dir)
        t0 = time.perf_counter()
        sampler = measure_sampler(model_dir)
        training = measure_training(model_dir)
        measuring_s = time.perf_counter() - t0
        real = real_run(Path(tmp) / "run", model_dir)
        t0 = time.perf_counter()   # after the run (its commands are measured), with nothing else running
        env = measure_environment(bundled_tasks()[0], RUN["rl.max_envs"], commands_run(real["rollouts"]))
        measuring_s += time.perf_counter() - t0
    return sampler, training, env, measuring_s, real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=sim.RESULTS)
    ap.add_argument("--measured", type=Path, help="a file to keep the measurements and the real run in; when it "
                    "exists, they are read from it instead (re-simulate without re-running)")
    args = ap.parse_args(argv)
    if args.measured and args.measured.is_file():
        sampler, training, env, measuring_s, real = json.loads(args.measured.read_text())
        real["rollouts"] = {int(k): v for k, v in real["rollouts"].items()}
    else:
        sampler, training, env, measuring_s, real = measure_and_run()
        if args.measured:
            args.measured.parent.mkdir(parents=True, exist_ok=True)
            args.measured.write_text(json.dumps([sampler, training, env, measuring_s, real]))
    device = cpu_device(sampler, training)
    run = simulate_run(real, device, env)
    measured, predicted = real_steps(real), simulated_steps(run)
    rows, summary = table(measured, predicted)
    png = plot(measured, predicted, real["trace"], args.out / "grpo_sim_validation.png")
    mean = lambda xs: sum(xs) / len(xs)
    inputs = {"sampler step (fitted)": {k: f"{v:.3g}" for k, v in sampler.items()},
              "update (fitted)": {k: f"{v:.3g}" for k, v in training.items()},
              "sandbox": {"start_s mean": f"{mean(env['start_s']):.3g}",
                          "end_s mean": f"{mean(env['end_s']):.3g}",
                          **{f"command {c!r} s": f"{v:.3g}" for c, v in env["command_s"].items()}}}
    md = [f"Real: `{real['command']}` (OMP_NUM_THREADS=1, 2 cores), {RUN['train.steps']} steps of "
          f"{RUN['rl.prompts_per_step']} x {RUN['rl.group_size']} trajectories; the policy is the tiny model taught "
          f"to call `{COMMAND}` each turn. SIMULATED: grpo_step_sim.Simulation, one rank, policy sync, replaying "
          f"the run's own trajectories (turns, tokens) with costs measured apart from the run on this CPU "
          f"({measuring_s:.0f} s of measuring): " + "; ".join(f"{k}: {v}" for k, v in inputs.items()) + ".", "",
          "step_s = rollout_s + update_s (the real step's metrics and plot writing are in neither); mean_batch: "
          "sequences per sampler step, time-weighted over the rollout (0 while the sampler waits).", "",
          sim.markdown_table(rows), "",
          f"Over the {RUN['train.steps']} steps: real {summary['total_real_s']:.1f} s, SIMULATED "
          f"{summary['total_simulated_s']:.1f} s, error {100 * summary['total_error']:.0f}%. Largest error per "
          f"step: rollout {100 * summary['max_error_rollout_s']:.0f}%, update {100 * summary['max_error_update_s']:.0f}%, "
          f"step {100 * summary['max_error_step_s']:.0f}%, mean running batch {100 * summary['max_error_mean_batch']:.0f}%.",
          "", f"![real vs simulated running batch]({png.name})" if png else ""]
    report = {"label": "real CPU run vs SIMULATED", "run": RUN, "inputs": inputs, "rows": rows, "summary": summary,
              "markdown": "\n".join(md)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpo_sim_validation.json").write_text(json.dumps(report, indent=1) + "\n")
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
