import os

# The Triton interpreter must be on before any @triton.jit function is defined (CPU machines have no driver).
os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ["TRITON_INTERPRET"] == "1":
    # The interpreter's tl.dot is the host's BLAS, whose rounding of a row can depend on the row's position in
    # the tile (1-2 ulp on some CPUs): the bitwise batch/packing-invariance tests would then test the host, not
    # the kernels. Give tl.dot a fixed per-element K order, as a GPU's tensor cores have (see the module).
    from protege.kernels.interpreter_dot import use_row_invariant_dot
    use_row_invariant_dot()

# Session-wide Docker engine, task images and sandbox check, shared by every module that needs them.
from docker_fixtures import bundled_images, docker_client, sandbox_ready  # noqa: E402,F401
from docker_daemons import docker_pair, local_registry  # noqa: E402,F401
