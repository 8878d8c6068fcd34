"""Collect trajectories: N tasks x G attempts of a policy with an expert, evaluated, written as JSONL.

    python -m protege.rollout.collect --tasks data/tasks/instances.jsonl --policy scripted --expert oracle \\
        --attempts 2 --out runs/collect [--keep-resolved] [--backend sandbox|docker] [--concurrency 8]

Writes OUT/trajectories.jsonl (resolved ones only with --keep-resolved, e.g. for SFT data) and
OUT/summary.json: resolve rate, expert calls per task, expert token share (tokens of expert guidance
in the agent's context / all context tokens), steps, loop rate (a streak of identical normalised
actions longer than 10; needs the rewards package), termination reasons and costs. The Anthropic key
comes only from ANTHROPIC_API_KEY and is never written."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from protege.engine.tokenizer import Tokenizer, qwen25_tokenizer
from protege.rewards.shaping import action_streaks
from protege.rewards.stats import loops
from protege.rollout.agent.loop import AgentConfig, Job, run_batch
from protege.rollout.envs.base import open_environment
from protege.rollout.agent.client import AnthropicClient, Prices
from protege.rollout.agent.expert import AnthropicExpert
from protege.rollout.agent.oracle import OracleExpert
from protege.rollout.agent.policies import AnthropicPolicy, SamplerPolicy, ScriptedPolicy, derive_seed, gold_patch_steps
from protege.rollout.sampler.sampling import SamplingParams
from protege.rollout.tasks import load_tasks
from protege.rollout.agent.trajectory import Trajectory, TrajectoryWriter

SCRIPTED_TEST_COMMAND = "python3 -m pytest -q -p no:cacheprovider"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m protege.rollout.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True, help="task file (.json, .jsonl, .parquet)")
    p.add_argument("--policy", choices=("scripted", "anthropic", "sampler"), required=True,
                   help="scripted: replays each task's gold patch (tests, seed data); anthropic: Claude as the "
                        "agent; sampler: a checkpoint through the engine's sampler")
    p.add_argument("--expert", choices=("oracle", "anthropic"), default="oracle")
    p.add_argument("--attempts", type=int, default=1, help="trajectories per task (G)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--keep-resolved", action="store_true", help="write only resolved trajectories")
    p.add_argument("--backend", choices=("sandbox", "docker"), default="sandbox")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="use only the first N tasks")
    p.add_argument("--no-evaluate", action="store_true", help="skip running the tests on the final patches")
    p.add_argument("--no-judge", action="store_true", help="skip the hidden judge")
    # agent limits
    d = AgentConfig()
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--max-context-tokens", type=int, default=d.max_context_tokens)
    p.add_argument("--command-timeout", type=float, default=d.command_timeout_s)
    p.add_argument("--max-observation-chars", type=int, default=d.max_observation_chars)
    p.add_argument("--expert-quota", type=int, default=d.expert_quota)
    p.add_argument("--expert-budget", type=float, default=d.expert_budget_usd, help="US dollars per trajectory")
    # Anthropic (policy and/or expert)
    p.add_argument("--anthropic-model", default="claude-sonnet-4-5")
    p.add_argument("--anthropic-base-url", default=None, help="default: the SDK's (or ANTHROPIC_BASE_URL)")
    p.add_argument("--price-input", type=float, default=Prices().input_per_mtok, help="USD per million tokens")
    p.add_argument("--price-output", type=float, default=Prices().output_per_mtok, help="USD per million tokens")
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--expert-sees-gold", action="store_true",
                   help="show the Anthropic expert the gold patch (told not to reveal it), as for SFT data")
    # tokenizer and sampler policy
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or a checkpoint directory "
                                                     "(default: the checkpoint's, else the real Qwen2.5 one)")
    p.add_argument("--checkpoint", default=None, help="sampler policy: the model directory")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-turn-tokens", type=int, default=2048, help="sampler policy: tokens per assistant turn "
                                                                   "at most (a longer turn ends the run as cut)")
    p.add_argument("--kv-cache-gb", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=None, help="sampler policy: trajectory i of task t samples with seeds "
                                                            "derived from (seed, t, i) (reproducible, batch-order free)")
    args = p.parse_args(argv)
    if args.attempts < 1 or args.concurrency < 1:
        p.error("--attempts and --concurrency must be >= 1")
    if args.policy == "sampler" and not args.checkpoint:
        p.error("--policy sampler needs --checkpoint")
    if args.keep_resolved and args.no_evaluate:
        p.error("--keep-resolved needs the evaluation (drop --no-evaluate)")
    return args


def load_tokenizer(args) -> Tokenizer:
    source = args.tokenizer or args.checkpoint
    if source is None:
        return qwen25_tokenizer()
    path = Path(source)
    return Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_file(path)


def make_backend(name: str):
    """A function task -> a fresh Environment of the chosen backend."""
    return lambda task: open_environment(task, name)


def make_evaluator(name: str):
    from protege.rollout.evaluate import evaluate_patch

    def evaluate(task, patch: str) -> dict:
        return evaluate_patch(task, patch, backend=name).to_dict()
    return evaluate


def summarize(trajectories: list[Trajectory], n_tasks: int, seconds: float, policy_cost: float) -> dict:
    n = len(trajectories)
    evaluated = [t for t in trajectories if t.resolved is not None]
    answered = [sum(not c.refused for c in t.expert_calls) for t in trajectories]
    total_tokens = sum(t.total_tokens for t in trajectories)
    return {
        "tasks": n_tasks, "trajectories": n,
        "resolve_rate": sum(t.resolved for t in evaluated) / len(evaluated) if evaluated else None,
        "tasks_resolved_at_least_once": len({t.task_id for t in evaluated if t.resolved}),
        "expert_calls_per_task": sum(answered) / n if n else 0.0,
        "expert_token_share": sum(t.expert_tokens for t in trajectories) / total_tokens if total_tokens else 0.0,
        "steps_mean": statistics.fmean(t.steps for t in trajectories) if n else 0.0,
        "steps_median": statistics.median(t.steps for t in trajectories) if n else 0.0,
        "termination": dict(Counter(t.termination for t in trajectories)),
        "expert_cost_usd": sum(t.expert_cost_usd for t in trajectories),
        "judge_cost_usd": sum(c.judge_cost_usd for t in trajectories for c in t.expert_calls),
        "policy_cost_usd": policy_cost,
        "errors": sum(t.termination == "error" for t in trajectories),
        "wall_seconds": round(seconds, 2),
        "loop_rate": sum(loops(action_streaks(t.actions)) for t in trajectories) / n
        if n else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = load_tasks(args.tasks)[:args.limit]
    tokenizer = load_tokenizer(args)
    config = AgentConfig(max_steps=args.max_steps, max_context_tokens=args.max_context_tokens,
                         command_timeout_s=args.command_timeout, max_observation_chars=args.max_observation_chars,
                         expert_quota=args.expert_quota, expert_budget_usd=args.expert_budget, judge=not args.no_judge)

    def anthropic_client() -> AnthropicClient:
        return AnthropicClient(args.anthropic_model, base_url=args.anthropic_base_url, max_retries=args.max_retries,
                               prices=Prices(args.price_input, args.price_output))

    expert = OracleExpert() if args.expert == "oracle" else AnthropicExpert(anthropic_client(), args.expert_sees_gold)
    shared_policy = None
    if args.policy == "anthropic":
        shared_policy = AnthropicPolicy(anthropic_client())
    elif args.policy == "sampler":
        from protege.engine.model import Qwen2ForCausalLM, compute_dtype
        from protege.rollout.sampler.sampler import Sampler
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # In the dtype the model computes in here (bf16 on CUDA, fp32 on the CPU), whatever it was saved in.
        model = Qwen2ForCausalLM.from_pretrained(args.checkpoint, dtype=compute_dtype(device), device=device)
        sampler = Sampler(model, kv_cache_bytes=int(args.kv_cache_gb * 2 ** 30), eos_token_ids=tokenizer.eos_ids)
        shared_policy = SamplerPolicy(sampler, SamplingParams(temperature=args.temperature,
                                                                   max_tokens=args.max_turn_tokens))

    def policy_for(index: int, task, attempt: int):
        if isinstance(shared_policy, SamplerPolicy) and args.seed is not None:
            return shared_policy.with_seed(derive_seed(args.seed, index, attempt))
        return shared_policy or ScriptedPolicy(gold_patch_steps(task, SCRIPTED_TEST_COMMAND))

    jobs = [Job(task, policy_for(i, task, attempt), attempt) for i, task in enumerate(tasks)
            for attempt in range(args.attempts)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trajectories.jsonl").unlink(missing_ok=True)
    evaluate = None if args.no_evaluate else make_evaluator(args.backend)
    done = []
    start = time.perf_counter()
    with TrajectoryWriter(out / "trajectories.jsonl") as writer:
        def on_done(job: Job, t: Trajectory) -> None:
            done.append(t)
            resolved = {None: "not evaluated", True: "resolved", False: "unresolved"}[t.resolved]
            print(f"[{len(done)}/{len(jobs)}] {t.task_id} #{t.attempt}: {t.termination} after {t.steps} steps, "
                  f"{resolved}, {len(t.expert_calls)} expert calls" + (f" ({t.error})" if t.error else ""),
                  file=sys.stderr, flush=True)
            if t.resolved or not args.keep_resolved:
                writer.write(t)

        trajectories = run_batch(jobs, make_backend(args.backend), expert, tokenizer, config,
                                 concurrency=args.concurrency, evaluate=evaluate, on_done=on_done)
    if isinstance(shared_policy, SamplerPolicy):
        shared_policy.close()
    policy_cost = shared_policy.cost_usd if isinstance(shared_policy, AnthropicPolicy) else 0.0
    summary = summarize(trajectories, len(tasks), time.perf_counter() - start, policy_cost)
    summary["written"] = sum(1 for t in trajectories if t.resolved or not args.keep_resolved)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
