"""Build the Docker images of a task set: the base image (debootstrap, or on a registry image where pulls
work) and one image per bundled task. Existing images are kept.

    python scripts/build_images.py                                  # the bundled tasks, debootstrap base
    python scripts/build_images.py data/tasks/instances.jsonl --base python:3.11-slim
"""
import argparse
import sys
import time

from protege.rollout.envs.images import build_images
from protege.rollout.tasks import BUNDLED_JSONL, TaskFormatError, load_tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="?", default=str(BUNDLED_JSONL), help="task file (.json, .jsonl, .parquet)")
    parser.add_argument("--base", default="debootstrap",
                        help="'debootstrap' (needs root; Debian mirrors only) or a registry image to build on")
    args = parser.parse_args()
    try:
        tasks = load_tasks(args.tasks)
    except TaskFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        images = build_images(tasks, base=args.base)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(images)} task images ready in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
