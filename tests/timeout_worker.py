"""One rank of tests/test_runtime.py's timeout check, under torchrun (2 ranks, gloo): the process group is made
with a 2 s timeout; rank 1 joins no collective for 8 s, so rank 0's all-reduce must give up after 2 s (with the
backend's default, 30 minutes for gloo, it would simply wait). Rank 0 writes what happened to OUT/rank_0.json."""
import json
import os
import sys
import time
from pathlib import Path

from protege.engine.training.runtime import all_reduce, init_runtime


def main(out: str) -> None:
    runtime = init_runtime("cpu", timeout_s=2.0)
    if runtime.rank == 1:
        time.sleep(8.0)
        return
    report = {}
    try:
        all_reduce([1.0], "sum", runtime)
        report["error"] = None
    except RuntimeError as e:
        report["error"] = str(e)
    Path(out, "rank_0.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)   # no shutdown: the group is broken on purpose
