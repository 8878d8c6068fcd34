"""Optional dependencies (setup.py's extras: agent, plots), imported where used, so that the model, kernels,
sampler, SFT, rollout mode and the GRPO step import and run without them. A missing one fails at first use
with an error naming the package and the feature that needs it."""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

EXTRA = {"anthropic": "agent", "docker": "agent", "swebench": "agent", "matplotlib": "plots"}


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed."""


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or MissingDependency naming its distribution, the extra that brings it, and `feature`."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != package:
            raise   # the package is there but something it imports is not: not ours to rename
        extra = EXTRA.get(package)
        hint = f"pip install 'protege-engine[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
        raise MissingDependency(f"{feature} needs the Python package {package!r}, which is not installed: {hint}",
                                name=package) from None


def pyplot(feature: str) -> ModuleType | None:
    """matplotlib.pyplot on the file-only Agg backend, or None with a note on stderr when matplotlib is missing:
    no run fails for want of a plot."""
    try:
        matplotlib = require("matplotlib", feature)
    except MissingDependency as e:
        print(f"note: skipped {feature}: {e}", file=sys.stderr, flush=True)
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
