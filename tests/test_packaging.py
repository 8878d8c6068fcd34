"""Import names and optional dependencies. The engine's packages are importable as `protege.*` only, so that
Hugging Face's `kernels` (which transformers imports at start-up) stays theirs however the engine is launched;
the training side imports and runs without the agent's dependencies, and a feature that needs one says which."""
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "tests" / "import_probe"   # its sitecustomize.py: the probe and the import blocker
AGENT_PACKAGES = ("anthropic", "docker", "swebench")


def probed(cmd: list[str], cwd: Path, out: Path, block=(), timeout=300) -> tuple[subprocess.CompletedProcess, list]:
    """Run cmd with the probe: each of its Python processes reports, at exit, what `kernels` was and how the two
    Qwen2 forwards compared."""
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROBE), "PROTEGE_PROBE_OUT": str(out),
           "PROTEGE_PROBE_BLOCK": ",".join(block)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
LAUNCHES = {
    "outside the repository": ([sys.executable, "-c", "import protege.engine.model"], None),
    "python -m from the root": ([sys.executable, "-m", "protege.rollout.report", "--help"], REPO),
    "python engine/train.py": ([sys.executable, "engine/train.py", "--help"], REPO),
    "torchrun engine/train.py": ([*TORCHRUN, "engine/train.py", "--help"], REPO),
    "pytest from the root": ([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_grpo.py"],
                             REPO),
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_hub_kernels_and_transformers_work_beside_the_engine(launch, tmp_path):
    cmd, cwd = LAUNCHES[launch]
    proc, reports = probed(cmd, cwd or tmp_path, tmp_path / "probe")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(reports) == (2 if launch.startswith("torchrun") else 1), reports   # torchrun: agent + worker
    site_dirs = [Path(p).resolve() for p in site.getsitepackages()]
    for report in reports:
        assert "error" not in report, report.get("error")
        kernels = Path(report["kernels_file"]).resolve()
        assert any(kernels.is_relative_to(d) for d in site_dirs) and not kernels.is_relative_to(REPO / "kernels"), report
        assert Path(report["dispatch_file"]).resolve() == REPO / "kernels" / "dispatch.py"
        assert report["max_abs_diff"] <= 1e-4 and report["logits_scale"] > 0.5, report   # fp32, same weights


def test_no_top_level_folder_is_a_package_of_a_generic_name():
    """A folder with an __init__.py at the root would be `import kernels` (or rollout, ...) to any process
    whose sys.path starts at the root (python -m, pytest): each is a portion of `protege` only."""
    for folder in ("engine", "kernels", "rollout", "rewards"):
        assert not (REPO / folder / "__init__.py").exists(), folder
    import protege.kernels
    assert [Path(p).resolve() for p in protege.kernels.__path__][:1] == [REPO / "kernels"]


BLOCKED_CHECK = textwrap.dedent("""
    import importlib, json
    out = {}
    for name in ("anthropic", "docker", "swebench"):
        try:
            importlib.import_module(name)
            out[name] = "importable"
        except ModuleNotFoundError:
            out[name] = "blocked"
    # The training side imports without them.
    import protege.engine.training.sft, protege.engine.training.rl, protege.engine.training.quickstart
    from protege.engine.training.parallelize import RolloutMode
    from protege.rollout.sampler import Sampler
    import protege.rollout.collect, protege.rollout.evaluate_agent
    from protege.engine.optional import MissingDependency
    from protege.rollout.agent.client import AnthropicClient
    from protege.rollout.envs.docker import DockerEnvironment
    from protege.rollout.tasks import BUNDLED_JSONL, load_tasks
    from protege.rollout.envs.images import build_images
    errors = {}
    for feature, use in (("anthropic", lambda: AnthropicClient("claude")), ("docker", lambda: DockerEnvironment(None)),
                         ("swebench", lambda: load_tasks(BUNDLED_JSONL)), ("images", lambda: build_images([]))):
        try:
            use()
            errors[feature] = None
        except MissingDependency as e:
            errors[feature] = str(e)
    print(json.dumps({"imports": out, "errors": errors}))
""")


def test_training_side_imports_and_runs_without_the_agent_packages(tmp_path):
    proc, _ = probed([sys.executable, "-c", BLOCKED_CHECK], tmp_path, tmp_path / "probe", block=AGENT_PACKAGES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["imports"] == {name: "blocked" for name in AGENT_PACKAGES}
    for feature, package in (("anthropic", "anthropic"), ("docker", "docker"), ("swebench", "swebench"),
                             ("images", "docker")):
        error = seen["errors"][feature]
        assert error and f"Python package {package!r}" in error and "protege-engine[agent]" in error, (feature, error)
    # Run for real with them blocked: SFT (engine/train.py), rollout mode on FSDP2 (torchrun), the GRPO step.
    tests = ["tests/test_grpo.py", "tests/test_rollout_mode.py",
             "tests/test_rl.py::test_exact_mode_first_ratio_is_exactly_one_on_the_triton_path",
             "tests/test_train.py::test_overfits_a_handful_and_checkpoint_loads_in_transformers"]
    proc, _ = probed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], REPO,
                     tmp_path / "probe_run", block=AGENT_PACKAGES, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


def test_offline_wheel_builds_without_pybind11_and_maps_every_folder(tmp_path):
    """What a GPU machine without an index and without pybind11 does (pip --no-index --no-build-isolation): the
    build takes pybind11's headers from torch, and the wheel holds protege/<folder>/... only, the extension
    included, which loads from the wheel's files."""
    source = tmp_path / "src"
    for name in ("csrc", "engine", "kernels", "rollout", "rewards"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, source / name)
    proc, _ = probed([sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-build-isolation", "--no-deps",
                      "-w", str(tmp_path / "dist"), str(source)], tmp_path, tmp_path / "probe", block=("pybind11",),
                     timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("protege_engine-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "unpacked")
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"protege"}, tops
    for path in ("protege/kernels/dispatch.py", "protege/engine/model.py", "protege/rollout/sampler/sampler.py",
                 "protege/rewards/shaping.py", "protege/engine/training/rl.py"):
        assert path in names, path
    # -S: no site-packages, so nothing but the unpacked wheel can provide protege (the extension needs no torch).
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import protege.engine._C as c; "
            "print(c.__file__)")
    loaded = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "unpacked")], capture_output=True,
                            text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert Path(loaded.stdout.strip()).is_relative_to(tmp_path / "unpacked")


def test_a_missing_matplotlib_skips_the_plot_with_a_note(tmp_path):
    code = ("import sys; from pathlib import Path; from protege.engine.training.metrics import plot_loss; "
            "print(plot_loss([{'step': 1, 'loss': 2.0}], Path(sys.argv[1])))")
    proc, _ = probed([sys.executable, "-c", code, str(tmp_path / "loss.png")], tmp_path, tmp_path / "probe",
                     block=("matplotlib",))
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr
    assert "skipped the loss plot" in proc.stderr and "protege-engine[plots]" in proc.stderr
    assert not (tmp_path / "loss.png").exists()
