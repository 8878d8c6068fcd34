import os

# The Triton interpreter must be on before any @triton.jit function is defined (CPU machines have no driver).
os.environ.setdefault("TRITON_INTERPRET", "1")

# Session-wide Docker engine, task images and sandbox check, shared by every module that needs them.
from tests.docker_fixtures import bundled_images, docker_client, sandbox_ready  # noqa: E402,F401
