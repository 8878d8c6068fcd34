"""Protégé engine: builds the Python packages and the C++ extension engine._C (pybind11)."""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

native = Pybind11Extension(
    "engine._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    # Not "engine" or "kernels": PyPI has packages of those names, and transformers probes the
    # distribution "kernels" (it must keep finding none beside us).
    name="protege-engine",
    version="0.1.0",
    description="Post-train small Qwen2.5 models into software-engineering agents (SFT + GRPO with an expert).",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "rollout", "rollout.*",
                                    "rewards", "rewards.*"]),
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
    # Ranges a user's CUDA machine satisfies (GPU machines here: torch 2.11 + triton 3.6); the CPU set-up
    # (scripts/setup.sh) pins torch==2.13.0 and triton==3.7.1.
    install_requires=[
        "torch>=2.6,<2.15",
        "triton>=3.2; platform_system=='Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "pyyaml>=6",
        "tomli>=2; python_version<'3.11'",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "anthropic>=0.40",
        "docker>=7",
        "swebench>=4",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "transformers>=4.45"],
    },
)
