"""Protégé engine: the Python packages under one import name, `protege`, and the C++ extension
protege.engine._C (pybind11).

The repository keeps its folders at the top (engine/, kernels/, rollout/, rewards/) with no __init__.py, so
none of them is a package named `kernels`, `rollout`, ... to anything that imports from the repository root:
those names belong to other distributions (transformers imports Hugging Face's `kernels`)."""
import os
from glob import glob

from setuptools import Extension, find_packages, setup

FOLDERS = ("engine", "kernels", "rollout", "rewards")


def pybind11_include() -> str:
    try:
        import pybind11
        return pybind11.get_include()
    except ImportError:  # an offline --no-build-isolation install beside torch, which ships pybind11's headers
        from torch.utils.cpp_extension import include_paths
        return next(p for p in include_paths() if os.path.isdir(os.path.join(p, "pybind11")))


native = Extension(
    "protege.engine._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc", pybind11_include()],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
)

packages = [f"protege.{folder}" for folder in FOLDERS]
packages += [f"protege.{folder}.{sub}" for folder in FOLDERS for sub in find_packages(where=folder)]

AGENT = ["anthropic>=0.40", "docker>=7", "swebench>=4"]
PLOTS = ["matplotlib>=3.7"]

setup(
    name="protege-engine",
    version="0.1.0",
    description="Post-train small Qwen2.5 models into software-engineering agents (SFT + GRPO with an expert).",
    python_requires=">=3.10",
    packages=packages,
    package_dir={f"protege.{folder}": folder for folder in FOLDERS},
    ext_modules=[native],
    # The model, kernels, sampler, SFT and the GRPO step: what a GPU machine with torch + transformers already
    # has, so `pip install --no-index --no-build-isolation -e .` works offline there.
    install_requires=[
        "torch>=2.6,<2.15",
        "triton>=3.2; platform_system=='Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "pyyaml>=6",
        "tomli>=2; python_version<'3.11'",
        "tqdm>=4.60",
    ],
    extras_require={
        "agent": AGENT,   # Claude as expert or policy, Docker environments, SWE-bench grading
        "plots": PLOTS,   # the loss, GRPO and evaluation plots (skipped with a note without it)
        "test": ["pytest>=8", "hypothesis>=6.100", "transformers>=4.45", *AGENT, *PLOTS],
    },
)
