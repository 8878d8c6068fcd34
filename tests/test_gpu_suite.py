"""The GPU suite's dry run (benchmarks/gpu_suite.py --dry-run): every section's code runs on the CPU at tiny
shapes in the Triton interpreter and the report is complete, so the script cannot rot before a GPU sees it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_suite.py"


def suite_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Python code run where gpu_suite.py's imports resolve as when it runs as a script (its folder first)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sections():
    proc = suite_python("import json, gpu_suite; print(json.dumps(gpu_suite.SECTIONS))", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "OUT" / "gpu_suite"   # as on a device run: --out "$OUT/gpu_suite"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PROTEGE_KERNELS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_passes_and_every_section_is_reported(dry_run, sections):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["sections"]) == list(sections)
    for name, section in report["sections"].items():
        assert section["status"] == "done", (name, section)
        assert section["rows"], name
        for row in section["rows"]:
            assert row.get("status") in ("PASS", "SKIP", "ok"), (name, row)
    assert report["summary"]["FAIL"] == report["summary"]["ERROR"] == 0
    assert report["summary"]["PASS"] > 0
    for key in ("torch", "triton", "transformers"):
        assert report["versions"][key]
    assert report["git"]["commit"] and report["device"]["name"] == "cpu" and report["dry_run"]


def test_every_check_ran_in_the_dry_run(dry_run):
    """Skips only for what the CPU or this commit lacks, never for a time cap: every check's code ran."""
    _, out = dry_run
    report = json.loads((out / "report.json").read_text())
    for name, section in report["sections"].items():
        for row in section["rows"]:
            assert "time cap" not in str(row.get("detail", "")) + str(row.get("status")), (name, row)
    rows = {r.get("check") or f"{r.get('op')} {r.get('impl')} {r.get('mode')}": r
            for s in report["sections"].values() for r in s["rows"]}
    for check in ("greedy sampler == transformers generate (fp32)", "CUDA-graph decode == eager decode (exact mode)",
                  "CUDA-graph decode + prefill chunk == eager (exact mode)",
                  "token_logprobs fused (Triton)", "single-stream decode", "extrapolated to 2 layers",
                  "linear triton forward+backward", "varlen_attention 8K triton forward",
                  "rollout mode on FSDP2 (one rank) == unsharded", "GRPO step on a tiny config (rollout mode, exact mode)",
                  "GRPO step, the 7B config's flags (one rank)", "op_correctness kernels compiled ahead (2 workers)",
                  "rollout-mode switch"):
        assert rows[check]["status"] in ("PASS", "ok"), rows[check]


def test_markdown_report_has_a_table_per_section(dry_run, sections):
    _, out = dry_run
    md = (out / "report.md").read_text()
    assert md.startswith("# GPU suite: cpu (DRY RUN")
    for title, _, _ in sections.values():
        head, _, rest = md.partition(f"## {title} (")
        assert rest, title
        body = rest.split("\n## ")[0]
        assert "\n| check |" in body or "\n| op |" in body, title
        assert "|---|" in body, title


def test_hard_limit_keeps_the_report_and_marks_the_running_section(tmp_path):
    """A check that overruns every cap: the watchdog writes what is finished, marks the section, exits 2."""
    code = (f"import argparse, time, sys; sys.argv = ['gpu_suite.py', '--dry-run'];"
            f"from gpu_suite import Suite;"
            f"s = Suite(argparse.Namespace(dry_run=True, quick=False, budget=None, out={str(tmp_path)!r}));"
            f"s.report.section('environment')['rows'].append(dict(check='done before', status='PASS'));"
            f"s.watchdog(0.5); time.sleep(60)")
    proc = suite_python(code, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["sections"]["environment"]
    assert section["status"] == "KILLED" and section["rows"][0]["check"] == "done before"
    assert "hard limit" in (tmp_path / "report.md").read_text()
