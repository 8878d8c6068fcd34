"""The report (report.json + report.md, rewritten after every row) and a section's rows, notes and cap."""
from __future__ import annotations

import gc
import json
import os
import threading
import time
import traceback
from pathlib import Path

import torch

FAILING = ("FAIL", "ERROR")


# -- the report ------------------------------------------------------------------------------------------------
class Report:
    """report.json + report.md under `out`, rewritten after every row."""

    def __init__(self, out: Path, meta: dict, titles: dict[str, str] | None = None):
        self.out, self.meta, self.sections, self.titles = out, meta, {}, titles or {}
        self.lock = threading.Lock()  # the watchdog thread writes too
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str) -> dict:
        return self.sections.setdefault(name, dict(title=self.titles.get(name, name), status="running", rows=[], notes=[]))

    def write(self):
        data = dict(self.meta, sections=self.sections,
                    summary={k: sum(r.get("status") == k for s in self.sections.values() for r in s["rows"])
                             for k in ("PASS", "FAIL", "ERROR", "SKIP")})
        with self.lock:
            for name, text in (("report.json", json.dumps(data, indent=2, default=str) + "\n"),
                               ("report.md", self.markdown(data))):
                tmp = self.out / f".{name}.tmp"
                tmp.write_text(text)
                os.replace(tmp, self.out / name)  # a reader (or a kill) never sees half a report

    def markdown(self, data: dict) -> str:
        m = self.meta
        lines = [f"# GPU suite: {m['device']['name']}{' (DRY RUN on the CPU: numbers mean nothing)' if m['dry_run'] else ''}",
                 "", f"`{m['command']}` at {m['started']}, git {m['git']['commit']}"
                 f"{' (uncommitted changes)' if m['git']['dirty'] else ''}; mode {m['mode']}.", "",
                 "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in m["versions"].items()]
        lines += [f"| {k} | {v} |" for k, v in m["device"].items()]
        s = data["summary"]
        lines += ["", f"Checks: {s['PASS']} PASS, {s['FAIL']} FAIL, {s['ERROR']} ERROR, {s['SKIP']} SKIP. "
                  "UNMEASURED marks a figure that was not measured in this run.", ""]
        for sec in self.sections.values():
            lines += [f"## {sec['title']} ({sec['status']}, {sec.get('seconds', 0):.0f} s of a "
                      f"{sec.get('cap_s', 0):.0f} s cap)", ""]
            lines += [f"- {n}" for n in sec["notes"]] + ([""] if sec["notes"] else [])
            lines += table(sec["rows"]) + [""]
        return "\n".join(lines)


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return out


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


class Section:
    """One section's rows, notes and time cap. check() runs one check: a dict of fields (with "status") comes
    back as a row; an exception becomes an ERROR row; after the cap the check is not run (SKIP)."""

    def __init__(self, suite, name: str, cap: float):   # suite: suite.Suite
        self.suite, self.name, self.cap = suite, name, cap
        self.data = suite.report.section(name)
        self.data["cap_s"] = cap
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.elapsed() > self.cap

    def note(self, text: str):
        self.data["notes"].append(text)
        self.suite.report.write()

    def add(self, row: dict):
        self.data["rows"].append(row)
        self.data["seconds"] = self.elapsed()
        self.suite.report.write()
        print(f"  [{self.name}] " + ", ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)

    def check(self, name: str, fn, **fields):
        if self.out_of_time():
            self.add(dict(check=name, **fields, status="SKIP", detail=f"section time cap ({self.cap:.0f} s) reached"))
            return None
        start = time.perf_counter()
        try:
            result = fn() or {}
        except Exception as e:  # a failing check is a finding: report it, go on with the next
            traceback.print_exc()
            result = dict(status="ERROR", detail=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                          if str(e).strip() else type(e).__name__)
        if result.get("status") == "ERROR" and torch.cuda.is_available():  # after the traceback's frames are gone
            gc.collect()
            torch.cuda.empty_cache()
        row = dict(check=name, **fields)
        row.update({k: v for k, v in result.items() if not k.startswith("_")})
        row.setdefault("status", "PASS")
        row["seconds"] = round(time.perf_counter() - start, 2)
        self.add(row)
        return result

    def skip(self, name: str, why: str):
        self.add(dict(check=name, status="SKIP", detail=why))
