"""The engine's entry point for every phase:

    torchrun --nproc_per_node=8 engine/train.py --config configs/sft.toml [--resume] [section.key=value ...]
    python engine/train.py --config ...        (one process)
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    from protege.engine.training.runtime import init_runtime, launched_world_size, shutdown
    from protege.engine.training.config import ConfigError, load_config, process_group_timeout
except ModuleNotFoundError as e:
    if e.name != "protege":
        raise
    sys.exit("error: the engine is not installed in this Python (" + sys.executable + "): run `bash scripts/setup.sh`, "
             "or `pip install -e .` in the repository")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Protégé engine: train (phase sft or grpo)")
    parser.add_argument("--config", required=True, help="TOML or YAML file of the run's configuration")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings that override the file")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        runtime = init_runtime(cfg.device, process_group_timeout(cfg, launched_world_size()))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.phase == "grpo":
        from protege.engine.training.rl import run_grpo as run
    else:
        from protege.engine.training.sft import run_sft as run
    try:
        run(cfg, runtime, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        # Bad configuration, data or checkpoint files (ConfigError and DataError are ValueErrors): their
        # messages name the file, field and value; a traceback from deep inside would only hide that.
        print(f"error (rank {runtime.rank}): {e}", file=sys.stderr)
        return 1
    shutdown(runtime)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo workers occasionally abort in it after a clean shutdown.
    os._exit(code)
