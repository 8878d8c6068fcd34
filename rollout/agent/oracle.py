"""The offline expert: hints derived from the task's gold patch, and a deterministic judge."""
from __future__ import annotations

from protege.rewards.patches import hunks, patch_files
from protege.rollout.agent.expert import ExpertReply, failed_reply, wrap_guidance
from protege.rollout.agent.judge import JudgeCase, JudgeScores

EDITS = ("create", "str_replace", "insert")


class OracleExpert:
    """Offline expert: a hint derived from the gold patch -- the files and definitions to change and the
    current lines that are wrong -- never the lines of the fix itself. Judges by heuristic:
    warranted = 0 for a call right after another call (back to back), 0.5 for a call before any other
    action (asked without looking), else 1; followed = share of the hinted files the agent then changed
    with the editor (create, str_replace, insert) in its segment."""

    name = "oracle"

    def ask(self, task, recent: list[dict], question: str) -> ExpertReply:
        fix = hunks(task.patch)
        if not fix:
            return failed_reply("the oracle has no gold patch for this task")
        lines = [f"The fix touches {len(patch_files(task.patch))} file(s)."]
        for h in fix:
            if h.old_start == 0:
                lines.append(f"- a new file {h.path} is needed.")
                continue
            where = f"{h.path} around line {h.first_changed_line}" + (f", in `{h.context}`" if h.context else "")
            wrong = [r.strip() for r in h.removed if r.strip()][:2]
            if wrong:
                lines.append(f"- {where}: this code is wrong and must change: " + "; ".join(f"`{w}`" for w in wrong))
            else:
                lines.append(f"- {where}: {len(h.added)} line(s) are missing there and must be added.")
        return ExpertReply(wrap_guidance("\n".join(lines)), "\n".join(lines))

    def judge(self, task, case: JudgeCase) -> JudgeScores:
        warranted = 0.0 if case.previous_tool == "ask_expert" else 0.5 if case.previous_tool is None else 1.0
        hinted = set(patch_files(task.patch))
        root = case.repo_dir.rstrip("/") + "/"
        edited = {a.arguments.get("path", "").removeprefix(root).removeprefix("./") for a in case.segment_actions
                  if a.tool == "str_replace_editor" and a.arguments.get("command") in EDITS}
        followed = len(hinted & edited) / len(hinted) if hinted else 0.0
        return JudgeScores(warranted, followed)
