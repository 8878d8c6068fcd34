"""Section warm_up: op_correctness's kernels compiled ahead, in parallel worker processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .report import Section
from .correctness import ops_correctness_cases
from .suite import REPO, SECTIONS, Suite

SCRIPT = REPO / "benchmarks" / "gpu_suite.py"   # the workers run the entry script


# -- warm-up: the correctness section's kernels compiled ahead, in parallel -----------------------------------
# ESTIMATES (not measured on the GPU machine): a cold Triton compile of one kernel variant takes ~1 s there, and
# an op check compiles ~3 variants (its forward and one or two backward kernels).
COMPILE_SECONDS_PER_VARIANT = 1.0
VARIANTS_PER_CHECK = 3


def triton_cache_dir() -> Path:
    """Triton's on-disk kernel cache, shared by every process of the machine (TRITON_CACHE_DIR)."""
    try:
        from triton import knobs
        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):   # older Triton
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def cache_entries() -> int:
    d = triton_cache_dir()
    return len(os.listdir(d)) if d.is_dir() else 0


def section_warm_up(suite: Suite, sec: Section):
    """op_correctness's checks run ahead in worker processes, for their side effect: each kernel variant is
    compiled once, in parallel, into Triton's disk cache, which the section then reads (a cold compile each,
    in one process, would overrun its cap). Under the Triton interpreter nothing compiles: the workers only
    plan (list their checks) and exit."""
    checks = [c for c in ops_correctness_cases(suite) if c[2] is not None]
    workers = max(1, min(len(checks), suite.pick(min(8, (os.cpu_count() or 2) // 2), dry=2)))
    variants = len(checks) * VARIANTS_PER_CHECK
    serial = variants * COMPILE_SECONDS_PER_VARIANT
    quick = {name: cap for name, (_, _, cap) in SECTIONS.items()}
    names = list(SECTIONS)
    correctness = sum(quick[n] for n in names[:names.index("grpo_7b_flags") + 1])   # the checks, before the timings
    build = 90   # ESTIMATE: `pip install --no-index --no-build-isolation -e .` took 38 s on 2 loaded CPU cores
    plan = (f"Cold-compile plan (ESTIMATE, UNMEASURED): {len(checks)} op_correctness checks x ~{VARIANTS_PER_CHECK} "
             f"kernel variants = ~{variants} cold compiles x ~{COMPILE_SECONDS_PER_VARIANT:.0f} s = ~{serial:.0f} s in "
             f"one process, vs the section's cap of {SECTIONS['ops_correctness'][1]} s ({quick['ops_correctness']} s "
             f"quick). Here {workers} worker processes run those checks first (~{serial / workers:.0f} s + their "
             f"start-up), sharing Triton's disk cache ({triton_cache_dir()}); the section then loads compiled "
             f"kernels. One --quick run with the build: ~{build} s build + {correctness} s of correctness caps "
             f"(environment .. grpo_7b_flags) = ~{(build + correctness) / 60:.1f} min to the last correctness check, "
             f"~{(build + sum(quick.values())) / 60:.1f} min in all ({sum(quick.values())} s budget; a check that "
             f"overruns is stopped at budget + 90 s): inside 7 min on one H100/H200 (ESTIMATE, UNMEASURED).")
    print(plan, flush=True)
    sec.note(plan)

    def run():
        before = cache_entries()
        flags = [f for f, on in (("--quick", suite.quick), ("--dry-run", suite.dry)) if on]
        logs = [Path(suite.tmp.name) / f"warm_up_{k}.out" for k in range(workers)]
        procs = []
        for k, log in enumerate(logs):
            with open(log, "w") as out:   # the child keeps its own descriptor
                procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "--warm-up-worker", f"{k}/{workers}",
                                               *flags], stdout=out, stderr=subprocess.STDOUT))
        started, late = time.perf_counter(), []
        for p in procs:
            try:
                p.wait(timeout=max(1.0, sec.cap - sec.elapsed()))
            except subprocess.TimeoutExpired:   # past the cap: the section compiles what is left itself
                p.kill()
                p.wait()
                late.append(p.pid)
        wall = time.perf_counter() - started
        last_lines = [(log.read_text().splitlines() or [""])[-1] for log in logs]
        reports = [json.loads(line) for line in last_lines if line.startswith("{")]
        planned = sum(r["checks"] for r in reports)
        compiled = any(r["compiled"] for r in reports)
        ok = not late and all(p.returncode == 0 for p in procs) and planned == len(checks)
        return dict(status="PASS" if ok else "FAIL", checks=len(checks), workers=workers, planned=planned,
                    variants_estimate=variants, cold_serial_estimate_s=f"{serial:.0f} (ESTIMATE)", wall_s=wall,
                    cache_entries_added=cache_entries() - before if compiled
                    else "UNMEASURED (interpreter: nothing compiled)",
                    detail=f"exit codes {[p.returncode for p in procs]}"
                    + (f"; killed at the cap: {late}" if late else "")
                    + "".join(f"; worker {k}: {log.read_text()[-300:]}" for k, (p, log) in enumerate(zip(procs, logs))
                              if p.returncode != 0 and p.pid not in late))
    sec.check(f"op_correctness kernels compiled ahead ({workers} workers)", run)


def warm_up_worker(args) -> int:
    """--warm-up-worker K/N: run every N-th op_correctness check from the K-th, results discarded (the section
    runs them for real); print {"checks", "compiled", "seconds"} as the last line."""
    k, n = map(int, args.warm_up_worker.split("/"))
    suite = Suite(args, report=False)
    mine = [c for c in ops_correctness_cases(suite) if c[2] is not None][k::n]
    compile_kernels = os.environ.get("TRITON_INTERPRET") != "1"
    started = time.perf_counter()
    if compile_kernels:
        with suite.triton_kernels():
            for name, _, run in mine:
                try:
                    run()
                except Exception as e:  # the section reports it; here only the compile matters
                    print(f"warm-up {name}: {type(e).__name__}: {e}", flush=True)
    print(json.dumps(dict(checks=len(mine), compiled=compile_kernels, seconds=time.perf_counter() - started)))
    return 0
