"""The GPU suite's parts (benchmarks/gpu_suite.py is the command): report.py the report and a section's rows,
suite.py the sections' list and caps, the Suite and shared helpers, then one module per group of sections:
environment.py, warm_up.py, correctness.py, training.py, speed.py. Imported from gpu_suite.py, whose folder
(benchmarks/) is first on sys.path, as are the sibling scripts the sections use (kernel_timings, generation)."""
import os

import torch

if not torch.cuda.is_available():  # before any @triton.jit is defined (the kernels are imported after this)
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":  # bit-identity checks test the kernels, not the host's BLAS
    from protege.kernels.interpreter_dot import use_row_invariant_dot
    use_row_invariant_dot()
