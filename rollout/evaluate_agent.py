"""Evaluate a policy on a SWE-bench-format task file the way the paper reports it, resumably.

    python -m protege.rollout.evaluate_agent --tasks tasks.jsonl --policy sampler --checkpoint DIR --out runs/rl \\
        [--attempts N --temperature 0.7 --seed 0] [--expert oracle|anthropic|none] [--backend docker|sandbox]

Defaults are the paper's evaluation limits: 75 steps, $2 of expert cost and 6 expert calls per task, the
expert shown the task and the last 5 messages; greedy decoding (--temperature 0) unless asked otherwise.
Policies: sampler (a checkpoint through the in-process sampler: every running trajectory's turn decodes in
one batch, so --concurrency is sized for a GPU batch), anthropic (Claude), scripted (replays the gold
patch), empty (submits at once: the floor of every figure).

OUT/ holds run.json (the settings), results.jsonl (one line per finished attempt, appended and fsynced),
trajectories/<instance>.<attempt>.json, and, once every attempt is done, results.json, predictions.jsonl
(attempt 0, the official harness's input: instance_id, model_name_or_path, model_patch;
predictions.attempt<k>.jsonl for the others) and report.md with PNG plots (rollout.report). Rerunning the
same command after an interruption runs only the attempts without a results line (an attempt cut short is
run again from its start). Inputs are checked before any work starts."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from protege.engine.optional import require
from protege.rewards.shaping import action_streaks
from protege.rollout.agent.loop import AgentConfig, Job, run_batch
from protege.rollout.agent.trajectory import Trajectory
from protege.rollout.envs.fleet import Fleet, FleetConfig
from protege.rollout.envs.prepare import MissingImages
from protege.rollout.report import _atomic_write, write_report
from protege.rollout.tasks import Task, TaskFormatError, load_tasks

POLICIES = ("sampler", "anthropic", "scripted", "empty")
EXPERTS = ("oracle", "anthropic", "none")
# What must match for a rerun to continue a run instead of mixing two different ones.
RUN_KEYS = ("tasks_file", "policy", "checkpoint", "expert", "expert_model", "policy_model", "attempts", "temperature",
            "seed", "max_steps", "max_turn_tokens", "expert_budget_usd", "expert_quota", "expert_recent_messages",
            "max_context_tokens", "command_timeout_s", "no_judge", "backend", "limit")


class InputError(Exception):
    """Bad input, found before any work starts."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m protege.rollout.evaluate_agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True, help="SWE-bench-format task file (.json, .jsonl, .parquet)")
    p.add_argument("--policy", choices=POLICIES, required=True)
    p.add_argument("--checkpoint", default=None, help="sampler policy: the model directory (Hugging Face format)")
    p.add_argument("--expert", choices=EXPERTS, default="oracle",
                   help="oracle: hints from the gold patch, offline; anthropic: Claude; none: no expert")
    p.add_argument("--out", required=True, help="run directory (created; an existing run there is continued)")
    p.add_argument("--name", default=None, help="model_name_or_path in predictions.jsonl (default: derived)")
    p.add_argument("--attempts", type=int, default=1, help="attempts per task (n, for Pass@k)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampler policy: 0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampler policy: attempt a of a task draws from seed + a")
    p.add_argument("--backend", choices=("docker", "sandbox"), default="docker")
    p.add_argument("--concurrency", type=int, default=None,
                   help="trajectories in flight (default: 64 for the sampler, whose turns decode together; 8 else)")
    p.add_argument("--eval-concurrency", type=int, default=4, help="test runs (evaluations) at once")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--base-image", default="debootstrap", help="Docker: base for images built here")
    p.add_argument("--docker-hosts", nargs="*", default=[],
                   help="Docker: the hosts to spread containers over (URLs; default: DOCKER_HOST / the local engine)")
    p.add_argument("--max-envs-per-host", type=int, default=16, help="Docker: containers at once on one host")
    p.add_argument("--warm-envs", type=int, default=4, help="Docker: containers started ahead of need (0: none)")
    p.add_argument("--pull-images", action="store_true",
                   help="Docker: pull missing task images first (default: refuse the run, naming them)")
    d = AgentConfig()
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--expert-budget", type=float, default=d.expert_budget_usd, help="US dollars per task")
    p.add_argument("--expert-quota", type=int, default=d.expert_quota)
    p.add_argument("--expert-recent-messages", type=int, default=d.expert_recent_messages)
    p.add_argument("--max-context-tokens", type=int, default=d.max_context_tokens)
    p.add_argument("--command-timeout", type=float, default=d.command_timeout_s)
    p.add_argument("--no-judge", action="store_true", help="skip the hidden judge (it does not change the score)")
    p.add_argument("--anthropic-model", default="claude-sonnet-4-5")
    p.add_argument("--anthropic-base-url", default=None)
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's, else the real Qwen2.5 one")
    p.add_argument("--max-turn-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gb", type=float, default=4.0)
    args = p.parse_args(argv)
    if args.attempts < 1 or args.eval_concurrency < 1 or (args.concurrency is not None and args.concurrency < 1):
        p.error("--attempts, --concurrency and --eval-concurrency must be >= 1")
    if args.policy == "sampler" and not args.checkpoint:
        p.error("--policy sampler needs --checkpoint")
    if args.policy != "sampler" and args.checkpoint:
        p.error(f"--checkpoint is for --policy sampler, not {args.policy}")
    if args.concurrency is None:
        args.concurrency = 64 if args.policy == "sampler" else 8
    return args


def run_settings(args) -> dict:
    return {"tasks_file": str(Path(args.tasks).resolve()), "policy": args.policy,
            "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
            "expert": args.expert, "expert_model": args.anthropic_model if args.expert == "anthropic" else None,
            "policy_model": args.anthropic_model if args.policy == "anthropic" else None, "attempts": args.attempts,
            "temperature": args.temperature if args.policy == "sampler" else None,
            "seed": args.seed if args.policy == "sampler" else None, "max_steps": args.max_steps,
            "max_turn_tokens": args.max_turn_tokens if args.policy == "sampler" else None,
            "expert_budget_usd": args.expert_budget, "expert_quota": 0 if args.expert == "none" else args.expert_quota,
            "expert_recent_messages": args.expert_recent_messages, "max_context_tokens": args.max_context_tokens,
            "command_timeout_s": args.command_timeout, "no_judge": args.no_judge,
            "backend": args.backend, "limit": args.limit, "name": model_name(args)}


def model_name(args) -> str:
    if args.name:
        return args.name
    if args.policy == "sampler":
        return Path(args.checkpoint).resolve().name
    return f"anthropic:{args.anthropic_model}" if args.policy == "anthropic" else f"protege-{args.policy}"


# ---------------------------------------------------------------------------------------------- checks

def check_backend(args, tasks: list[Task]) -> Fleet:
    """The backend works and every task has its environment (before any attempt runs): with Docker, an image
    on every host (a swebench image is used as is; pulled first with --pull-images) or buildable here
    (bundled tasks); returns the run's environments."""
    if args.backend == "sandbox":
        from protege.rollout.envs.sandbox import SandboxUnavailable, _check_bwrap
        try:
            _check_bwrap()
        except SandboxUnavailable as e:
            raise InputError(f"--backend sandbox: {e}") from None
        from protege.rollout.envs.sandbox import prepare_environment
        for spec in {t.env_spec for t in tasks}:
            try:
                prepare_environment(spec, log=lambda m: print(m, file=sys.stderr, flush=True))
            except RuntimeError as e:
                raise InputError(f"task environment: {e}") from None
        return Fleet(FleetConfig(backend="sandbox"), tasks)
    config = FleetConfig(backend="docker", docker_hosts=list(args.docker_hosts),
                         max_envs_per_host=args.max_envs_per_host, warm_envs=args.warm_envs,
                         pull_images=args.pull_images, base_image=args.base_image)
    try:
        return Fleet(config, tasks, log=lambda m: print(m, file=sys.stderr, flush=True))
    except MissingImages as e:
        raise InputError(f"--backend docker: {e}") from None
    except (RuntimeError, ValueError) as e:
        raise InputError(f"--backend docker: {e}") from None


def load_policy(args, tokenizer):
    """The shared policy object (sampler, Anthropic client) -- loaded before any work, so a checkpoint that
    does not load fails here."""
    if (args.policy == "anthropic" or args.expert == "anthropic") and not os.environ.get("ANTHROPIC_API_KEY"):
        raise InputError("the Anthropic policy/expert needs ANTHROPIC_API_KEY in the environment")
    if args.policy == "sampler":
        import torch
        from protege.engine.model import Qwen2ForCausalLM, compute_dtype
        from protege.rollout.agent.policies import SamplerPolicy
        from protege.rollout.sampler.sampler import Sampler
        from protege.rollout.sampler.sampling import SamplingParams
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            # In the dtype the model computes in here (bf16 on CUDA, fp32 on the CPU), whatever it was saved in.
            model = Qwen2ForCausalLM.from_pretrained(args.checkpoint, dtype=compute_dtype(device), device=device)
        except Exception as e:  # noqa: BLE001 -- any reason a checkpoint does not load is reported the same way
            raise InputError(f"--checkpoint {args.checkpoint}: does not load ({type(e).__name__}: {e})") from None
        sampler = Sampler(model, kv_cache_bytes=int(args.kv_cache_gb * 2 ** 30), eos_token_ids=tokenizer.eos_ids)
        return SamplerPolicy(sampler, SamplingParams(temperature=args.temperature, max_tokens=args.max_turn_tokens),
                             name=model_name(args))
    return None


def load_tokenizer(args):
    from protege.rollout.collect import load_tokenizer as load
    source = args.tokenizer or args.checkpoint
    try:
        return load(args)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"tokenizer {source or '(Qwen2.5)'}: cannot load ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------- records

def record(traj: Trajectory, seconds: float, policy_cost: float) -> dict:
    """One attempt's line in results.jsonl."""
    streaks = action_streaks(traj.actions)
    return {"instance_id": traj.task_id, "attempt": traj.attempt, "resolved": bool(traj.resolved),
            "steps": traj.steps, "termination": traj.termination,
            "expert_calls": sum(not c.refused for c in traj.expert_calls),
            "expert_calls_refused": sum(c.refused for c in traj.expert_calls),
            "tokens": {"total": traj.total_tokens, "policy": traj.policy_tokens, "expert": traj.expert_tokens},
            "cost_usd": traj.expert_cost_usd + policy_cost, "expert_cost_usd": traj.expert_cost_usd,
            "policy_cost_usd": policy_cost,
            "judge_cost_usd": sum(c.judge_cost_usd for c in traj.expert_calls),
            "longest_streak": max(streaks, default=0), "patch": traj.final_patch,
            "patch_applied": (traj.evaluation or {}).get("patch_applied"), "error": traj.error,
            "infrastructure_error": traj.infrastructure_error,
            "infrastructure_restarts": len(traj.infrastructure_restarts),   # runs lost with their host, rerun
            "eval_error": (traj.evaluation or {}).get("error"), "seconds": round(seconds, 2)}


def read_results(path: Path) -> dict[tuple[str, int], dict]:
    """Finished attempts in results.jsonl; a torn last line (the process died mid-write) is ignored."""
    done = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut
                break
            raise InputError(f"{path}:{number}: not valid JSON (a corrupted results file; move it away to "
                             "start over)") from None
        done[(r["instance_id"], r["attempt"])] = r
    return done


class Progress:
    """A line per finished attempt: done / total, resolved so far, cost so far, ETA."""

    def __init__(self, total: int, done: list[dict]):
        self.total, self.resumed = total, len(done)
        self.done = len(done)
        self.resolved = sum(r["resolved"] for r in done)
        self.cost = sum(r["cost_usd"] for r in done)
        self.start = time.monotonic()

    def update(self, r: dict) -> str:
        self.done += 1
        self.resolved += r["resolved"]
        self.cost += r["cost_usd"]
        ran = self.done - self.resumed
        left = self.total - self.done
        eta = (time.monotonic() - self.start) / ran * left
        return (f"[{self.done}/{self.total}] resolved {self.resolved} ({100 * self.resolved / self.done:.1f}%) "
                f"| cost ${self.cost:.2f} | ETA {int(eta // 60)}m{int(eta % 60):02d}s "
                f"| {r['instance_id']}#{r['attempt']}: {r['termination']}, {r['steps']} steps, "
                f"{'resolved' if r['resolved'] else 'unresolved'}")


def finish(out: Path, settings: dict, tasks: list[Task], done: dict[tuple[str, int], dict]) -> None:
    """results.json, predictions*.jsonl and the report, from every attempt's record (rewritten atomically)."""
    records = [done[(t.instance_id, a)] for t in tasks for a in range(settings["attempts"])]
    _atomic_write(out / "results.json", json.dumps({"run": settings, "instances": records}, indent=2) + "\n")
    for a in range(settings["attempts"]):
        lines = "".join(json.dumps({"instance_id": t.instance_id, "model_name_or_path": settings["name"],
                                    "model_patch": done[(t.instance_id, a)]["patch"]}) + "\n" for t in tasks)
        _atomic_write(out / ("predictions.jsonl" if a == 0 else f"predictions.attempt{a}.jsonl"), lines)
    write_report([(settings["name"], records)], out, [settings])


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    try:
        tasks = load_tasks(args.tasks)[:args.limit]
    except TaskFormatError as e:
        raise InputError(str(e)) from None
    if not tasks:
        raise InputError(f"{args.tasks}: no tasks")
    settings = run_settings(args)
    out = Path(args.out)
    previous = out / "run.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        changed = [k for k in RUN_KEYS if old.get(k) != settings.get(k)]
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
            raise InputError(f"{out} holds a run with other settings ({diffs}); use another --out")
    tokenizer = load_tokenizer(args)
    shared = load_policy(args, tokenizer)
    fleet = check_backend(args, tasks)

    from protege.rollout.agent.client import AnthropicClient
    from protege.rollout.agent.expert import AnthropicExpert
    from protege.rollout.agent.oracle import OracleExpert
    from protege.rollout.agent.policies import AnthropicPolicy, ScriptedPolicy, gold_patch_steps
    from protege.rollout.collect import SCRIPTED_TEST_COMMAND
    from protege.rollout.evaluate import evaluate_patch

    (out / "trajectories").mkdir(parents=True, exist_ok=True)
    _atomic_write(previous, json.dumps(settings, indent=2) + "\n")
    results_path = out / "results.jsonl"
    done = read_results(results_path)
    wanted = {(t.instance_id, a) for t in tasks for a in range(args.attempts)}
    # An attempt the infrastructure failed is run again (its new line replaces the old one).
    done = {k: v for k, v in done.items() if k in wanted and not v.get("infrastructure_error")}
    todo = [(t, a) for t in tasks for a in range(args.attempts) if (t.instance_id, a) not in done]
    if done:
        print(f"resuming {out}: {len(done)} attempt(s) done, {len(todo)} to run", file=sys.stderr, flush=True)

    def client() -> AnthropicClient:
        return AnthropicClient(args.anthropic_model, base_url=args.anthropic_base_url)

    if args.expert == "anthropic":
        expert = AnthropicExpert(client())
    else:
        expert = OracleExpert()
        if args.expert == "none":
            expert.name = "none"   # quota 0: every call is refused, none reaches it
    config = AgentConfig(max_steps=args.max_steps, max_context_tokens=args.max_context_tokens,
                         command_timeout_s=args.command_timeout, expert_quota=settings["expert_quota"],
                         expert_budget_usd=args.expert_budget, expert_recent_messages=args.expert_recent_messages,
                         judge=not args.no_judge)
    policy_client = client() if args.policy == "anthropic" else None

    def policy_for(task: Task, attempt: int):
        if args.policy == "sampler":
            return shared.with_seed(args.seed + attempt)
        if args.policy == "anthropic":
            return AnthropicPolicy(policy_client)   # one per attempt: its cost is the attempt's
        if args.policy == "scripted":
            return ScriptedPolicy(gold_patch_steps(task, SCRIPTED_TEST_COMMAND), name="scripted")
        return ScriptedPolicy([], name="empty")

    jobs = [Job(task, policy_for(task, a), a) for task, a in todo]
    eval_slots = threading.BoundedSemaphore(args.eval_concurrency)

    def evaluate(task: Task, patch: str) -> dict:
        with eval_slots:   # test runs are the CPU-heavy part: bounded apart from the trajectories in flight
            return fleet.evaluate(task, patch).to_dict()

    progress = Progress(len(wanted), list(done.values()))
    started = threading.local()   # run_batch opens a job's environment and reports it on the same thread
    results_file = open(results_path, "a", encoding="utf-8")

    def make_env(task: Task):
        started.at = time.monotonic()
        return fleet.open(task)

    def on_done(job: Job, traj: Trajectory) -> None:
        policy = job.policy
        cost = policy.cost_usd if isinstance(policy, AnthropicPolicy) else 0.0
        r = record(traj, time.monotonic() - getattr(started, "at", time.monotonic()), cost)
        name = f"{traj.task_id}.{traj.attempt}.json".replace("/", "_")
        _atomic_write(out / "trajectories" / name, json.dumps(traj.to_dict(), ensure_ascii=False))
        # The trajectory first, the results line last: a line means the attempt is complete.
        results_file.write(json.dumps(r) + "\n")
        results_file.flush()
        os.fsync(results_file.fileno())
        done[(r["instance_id"], r["attempt"])] = r
        print(progress.update(r), file=sys.stderr, flush=True)

    fleet.schedule([job.task for job in jobs])
    try:
        run_batch(jobs, make_env, expert, tokenizer, config, concurrency=args.concurrency,
                  evaluate=evaluate, on_done=on_done)
    finally:
        fleet.close()
        results_file.close()
        if shared is not None:
            shared.close()
    finish(out, settings, tasks, done)
    summary = json.loads((out / "report.json").read_text())[settings["name"]]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
