"""The agent loop: a policy acts in an environment through the tools until it submits or hits a limit.

One step is one assistant turn holding exactly one tool call. A turn that cannot be parsed, has no call,
or has several gets an error observation and still counts as a step. The run ends with one of:
submitted, max_steps, context (the conversation reached max_context_tokens, also within a generation),
max_turn_tokens (a generation reached the policy's per-turn cap, max_turn_tokens, with room left in the
context), eos (the model ended the conversation with an end-of-text token instead of <|im_end|>), time (the
run's wall-clock limit), budget (the expert's cost reached the budget), error (the environment, policy or expert raised).
A failure of the infrastructure (the environment does not start, a sampler step, the evaluator, the
expert's or the judge's transport) is also recorded as the trajectory's infrastructure_error: the policy did not cause it.
Whatever the ending, the final patch is the repository's diff at that point. Afterwards the hidden judge
scores every answered expert call. run_batch runs many (task, policy) jobs on threads, so a slow command
holds up only its own trajectory."""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from protege.engine.chat import Conversation, ToolCallParseError, parse_tool_calls
from protege.engine.tokenizer import Tokenizer
from protege.rollout.agent import tools
from protege.rollout.envs.base import Environment, EnvironmentLost
from protege.rollout.agent.judge import JudgeCase
from protege.rollout.agent.policies import ContextFull
from protege.rollout.agent.trajectory import Action, ExpertCall, Message, Trajectory
from protege.rollout.sampler.server import SamplerStepError

SYSTEM_PROMPT = """You are an expert software engineer working in a code repository to resolve an issue. \
Each turn, call exactly one tool. Explore the code, reproduce the problem, make a minimal fix to the \
source (not the tests), check it, then call submit. If you are stuck, ask_expert for guidance, say what \
you tried, and follow the guidance you get."""
TASK_PROMPT = """<issue>
{problem}
</issue>

The repository is checked out at {repo_dir}, which is your working directory. Resolve the issue."""


@dataclass
class AgentConfig:
    max_steps: int = 75
    max_context_tokens: int = 32768
    command_timeout_s: float = 120.0
    max_observation_chars: int = 10000   # longer observations keep their head and tail
    expert_quota: int = 6                # calls beyond it are refused (recorded, not answered)
    expert_budget_usd: float = 2.0       # reaching it ends the run ("budget")
    expert_recent_messages: int = 5      # what the expert sees besides the issue and the question
    judge: bool = True                   # score each answered call with the expert's hidden judge
    max_seconds: float = 3600.0          # wall-clock limit of one trajectory (checked between turns)

    def __post_init__(self):
        for name in ("max_steps", "max_context_tokens", "max_observation_chars", "expert_recent_messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AgentConfig.{name}={value!r}: expected an int >= 1")
        if isinstance(self.expert_quota, bool) or not isinstance(self.expert_quota, int) or self.expert_quota < 0:
            raise ValueError(f"AgentConfig.expert_quota={self.expert_quota!r}: expected an int >= 0")
        for name in ("command_timeout_s", "expert_budget_usd", "max_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"AgentConfig.{name}={value!r}: expected a number > 0")


class _Run:
    """The state of one trajectory while it runs."""

    def __init__(self, task, env: Environment, policy, expert, tokenizer: Tokenizer, config: AgentConfig,
                 attempt: int):
        self.task, self.env, self.policy, self.expert, self.config = task, env, policy, expert, config
        self.conversation = Conversation(tokenizer, tools.TOOLS)
        self.traj = Trajectory(task_id=task.instance_id, attempt=attempt, policy=policy.name, expert=expert.name,
                               gold_patch=task.patch)
        self.expert_cost = 0.0
        self.call_messages: list[int] = []   # per expert call: index of its observation among the messages
        self.context_for_call: list[list[dict]] = []

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.traj.messages]

    def add(self, message: dict, logprobs: list[float] | None = None) -> None:
        ids, mask = self.conversation.append(message)
        self.traj.messages.append(Message(message["role"], message["content"], ids, mask, logprobs))

    def act(self, step: int, text: str) -> Action:
        """Parse and run the turn's tool call (submit only records it: the loop ends the run)."""
        try:
            _, calls = parse_tool_calls(text)
        except ToolCallParseError as e:
            return self._invalid(step, f"Your tool call could not be parsed: {e}")
        if len(calls) != 1:
            problem = "no tool call" if not calls else f"{len(calls)} tool calls (none was run)"
            return self._invalid(step, f"Call exactly one tool per turn; your message had {problem}.")
        name, arguments = calls[0].name, calls[0].arguments
        action = Action(step=step, tool=name, arguments=arguments, observation="")
        try:
            tools.validate_call(name, arguments)
            if name == tools.ASK_EXPERT:
                action.observation = self.ask_expert(step, arguments["question"])
            elif name == tools.BASH:
                action.observation, action.exit_code = tools.run_bash(
                    self.env, arguments["command"], self.config.command_timeout_s)
            elif name == tools.EDITOR:
                action.observation = tools.run_editor(self.env, arguments)
        except tools.ToolError as e:
            action.observation, action.error = str(e), str(e)
        return action

    @staticmethod
    def _invalid(step: int, message: str) -> Action:
        return Action(step=step, tool="invalid", arguments={}, observation=message, error=message)

    def ask_expert(self, step: int, question: str) -> str:
        answered = [c for c in self.traj.expert_calls if not c.refused]
        call = ExpertCall(step=step, action_index=len(self.traj.actions), question=question, answer=None)
        self.traj.expert_calls.append(call)
        self.call_messages.append(len(self.traj.messages))  # the observation will be the next message
        recent = self.chat()[-self.config.expert_recent_messages:]
        self.context_for_call.append(recent)
        if len(answered) >= self.config.expert_quota:
            call.refused = True
            return (f"ask_expert refused: the quota of {self.config.expert_quota} calls is used up. "
                    "Continue on your own.")
        reply = self.expert.ask(self.task, recent, question)
        call.answer, call.error, call.retries = reply.guidance, reply.error, reply.retries
        call.input_tokens, call.output_tokens, call.cost_usd = reply.input_tokens, reply.output_tokens, reply.cost_usd
        self.expert_cost += reply.cost_usd
        if reply.unavailable and self.traj.infrastructure_error is None:
            self.traj.infrastructure_error = f"expert: {reply.error}"
        return reply.observation

    def judge(self) -> None:
        """The hidden judge over each answered call's segment: the agent's messages and actions from its
        guidance to the next call or the end."""
        calls = self.traj.expert_calls
        for i, call in enumerate(calls):
            if call.answer is None:
                continue
            following = calls[i + 1] if i + 1 < len(calls) else None
            last_message = self.call_messages[i + 1] - 1 if following else len(self.traj.messages)
            last_action = following.action_index if following else len(self.traj.actions)
            segment = [{"role": m.role, "content": m.content}
                       for m in self.traj.messages[self.call_messages[i] + 1:last_message]]
            previous = self.traj.actions[call.action_index - 1].tool if call.action_index > 0 else None
            case = JudgeCase(call.question, call.answer, self.context_for_call[i], segment,
                             self.traj.actions[call.action_index + 1:last_action], previous, self.env.repo_dir)
            scores = self.expert.judge(self.task, case)
            call.warranted, call.followed, call.judge_fallback = scores.warranted, scores.followed, scores.fallback
            call.judge_note, call.judge_cost_usd = scores.note, scores.cost_usd
            if scores.unavailable and self.traj.infrastructure_error is None:
                self.traj.infrastructure_error = f"judge: {scores.note}"


def run_agent(task, env: Environment, policy, expert, tokenizer: Tokenizer, config: AgentConfig = AgentConfig(),
              attempt: int = 0) -> Trajectory:
    """One trajectory of `policy` on `task` in `env` (which the caller opens and closes)."""
    run = _Run(task, env, policy, expert, tokenizer, config, attempt)
    traj = run.traj
    deadline = time.monotonic() + config.max_seconds
    try:
        run.add({"role": "system", "content": SYSTEM_PROMPT})
        run.add({"role": "user",
                 "content": TASK_PROMPT.format(problem=task.problem_statement, repo_dir=env.repo_dir)})
        while traj.termination == "":
            if traj.steps >= config.max_steps:
                traj.termination = "max_steps"
                break
            if time.monotonic() >= deadline:
                traj.termination = "time"
                break
            room = config.max_context_tokens - len(run.conversation.ids) - len(run.conversation.generation_prompt)
            try:
                if room <= 0:
                    raise ContextFull(f"{len(run.conversation.ids)} tokens of {config.max_context_tokens} used")
                turn = policy.act(run.chat(), run.conversation, room)
            except ContextFull:
                traj.termination = "context"
                break
            message = {"role": "assistant", "content": turn.text}
            if turn.token_ids is not None:
                message["token_ids"] = turn.token_ids
            run.add(message, turn.logprobs)
            traj.steps += 1
            if turn.token_ids is not None and turn.token_ids[-1] != tokenizer.im_end_id:
                # No turn can follow one that does not end with <|im_end|>: the model stopped on an EOS token
                # of its own, or the generation was cut, by the per-turn cap (with room left) or the context.
                turn_cap = turn.finish_reason == "length" and len(turn.token_ids) < room
                traj.termination = ("eos" if turn.token_ids[-1] in tokenizer.eos_ids
                                    else "max_turn_tokens" if turn_cap else "context")
                break
            action = run.act(traj.steps - 1, turn.text)
            traj.actions.append(action)
            if action.tool == tools.SUBMIT and action.error is None:
                traj.termination = "submitted"
                break
            action.observation = tools.truncate(action.observation, config.max_observation_chars)  # as shown
            run.add({"role": "tool", "content": action.observation})
            asked = action.tool == tools.ASK_EXPERT and action.error is None
            if asked and traj.expert_calls[-1].answer is not None:  # a refusal or failure note is not the expert's
                traj.expert_calls[-1].observation_tokens = len(traj.messages[-1].token_ids)
            if asked and run.expert_cost >= config.expert_budget_usd:
                traj.termination = "budget"
            elif len(run.conversation.ids) >= config.max_context_tokens:
                traj.termination = "context"
    except Exception as e:  # noqa: BLE001 -- any failure ends this trajectory, never the batch
        traj.termination, traj.error = "error", f"{type(e).__name__}: {e}"
        if isinstance(e, SamplerStepError):   # the engine failed every turn in flight, not this policy
            traj.infrastructure_error = f"sampler: {e}"
        if isinstance(e, EnvironmentLost):    # its host went away: run_batch runs it again elsewhere
            traj.infrastructure_error = f"{LOST}: {e}"
            return traj
    try:
        traj.final_patch = env.diff()
        if config.judge:
            run.judge()
    except Exception as e:  # noqa: BLE001
        traj.termination, traj.error = "error", f"{type(e).__name__}: {e}"
    return traj


LOST = "environment lost"   # the infrastructure_error prefix of a trajectory whose host went away
MAX_RESTARTS = 3           # reruns of one trajectory whose host went away, before it stays an infrastructure failure


@dataclass
class Job:
    task: object
    policy: object
    attempt: int = 0


def run_batch(jobs: list[Job], make_env: Callable[[object], Environment], expert, tokenizer: Tokenizer,
              config: AgentConfig = AgentConfig(), concurrency: int = 8,
              evaluate: Callable[[object, str], dict] | None = None,
              on_done: Callable[[Job, Trajectory], None] | None = None) -> list[Trajectory]:
    """Run every job (at most `concurrency` at once), each in its own environment, closed afterwards;
    `evaluate(task, patch)` fills resolved/evaluation. Trajectories come back in job order; `on_done(job, traj)`
    sees each as it finishes (progress, writing)."""
    lock = threading.Lock()

    def attempt(job: Job) -> Trajectory:
        env = None
        try:
            env = make_env(job.task)
            traj = run_agent(job.task, env, job.policy, expert, tokenizer, config, job.attempt)
        except Exception as e:  # noqa: BLE001 -- the environment could not start
            error = f"{type(e).__name__}: {e}"
            kind = LOST if isinstance(e, EnvironmentLost) else "environment start"
            traj = Trajectory(job.task.instance_id, job.attempt, job.policy.name, expert.name,
                              gold_patch=job.task.patch, termination="error", error=error,
                              infrastructure_error=f"{kind}: {error}" if env is None else None)
        finally:
            if env is not None:
                env.close()
        return traj

    def one(job: Job) -> Trajectory:
        # A trajectory whose host went away is run again from the start (a fresh copy of its policy: the same
        # seed, turn 0) on another host; the lost runs are counted, never kept as the policy's own.
        pristine = copy.copy(job.policy)
        lost: list[str] = []
        traj = attempt(job)
        while (traj.infrastructure_error or "").startswith(LOST) and len(lost) < MAX_RESTARTS:
            lost.append(traj.infrastructure_error)
            job.policy = copy.copy(pristine)
            traj = attempt(job)
        traj.infrastructure_restarts = lost
        if evaluate is not None and traj.final_patch and not (traj.infrastructure_error or "").startswith(LOST):
            try:
                traj.evaluation = evaluate(job.task, traj.final_patch)
                traj.resolved = bool(traj.evaluation["resolved"])
            except Exception as e:  # noqa: BLE001 -- the evaluator failed: no verdict on the patch
                traj.evaluation = {"error": f"{type(e).__name__}: {e}"}
                traj.resolved = False
                traj.infrastructure_error = traj.infrastructure_error or f"evaluator: {type(e).__name__}: {e}"
        elif evaluate is not None:
            traj.resolved = False   # an empty patch resolves nothing
        if on_done is not None:
            with lock:
                on_done(job, traj)
        return traj

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(one, job): i for i, job in enumerate(jobs)}
        results: list[Trajectory | None] = [None] * len(jobs)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
    return results
