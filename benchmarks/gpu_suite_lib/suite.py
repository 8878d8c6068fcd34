"""The suite: sections and their caps, shapes, the Suite (mode, device, process group, watchdog, the run) and
the helpers the sections share (random models, prompts)."""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

import kernel_timings  # a benchmarks/ sibling: benchmarks/ is first on sys.path (the script's folder)

from .report import FAILING, Report, Section

REPO = Path(__file__).resolve().parents[2]

# Qwen2.5 shapes (config.json of the released checkpoints); the weights here are always random.
QWEN_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
TINY_TIED = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
TINY_UNTIED = dict(TINY_TIED, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=1)
COMMON = dict(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)

# Section name -> (title, cap in seconds: full, quick). Caps sum to <= 525 s (full) and <= 285 s (quick).
SECTIONS = {
    "environment": ("Environment", 10, 10),
    "warm_up": ("Kernel warm-up (compiled ahead, in parallel)", 45, 45),
    "ceilings": ("Measured ceilings", 10, 5),
    "ops_correctness": ("Op correctness (Triton vs fp64 reference)", 50, 25),
    "model_vs_hf": ("Model vs transformers Qwen2", 35, 20),
    "sampler_checks": ("Sampler correctness", 35, 20),
    "rollout_fsdp": ("Rollout mode on FSDP2", 20, 10),
    "grpo": ("GRPO step", 20, 10),
    "grpo_7b_flags": ("GRPO step with the 7B config's flags", 30, 25),
    "ops_speed": ("Op speed", 90, 30),
    "logprobs_memory": ("token_logprobs time and memory", 15, 10),
    "sampler_speed": ("Sampler speed", 110, 45),
    "sft_speed": ("SFT step speed and rollout switch", 55, 30),
}


class Suite:
    def __init__(self, args, report: bool = True):
        """report=False: shapes, device and kernels only (a warm-up worker: no versions, git or report folder)."""
        self.dry, self.quick = args.dry_run, args.quick
        self.device = torch.device("cpu" if self.dry else "cuda")
        if not self.dry and not torch.cuda.is_available():
            sys.exit("gpu_suite: no CUDA device (torch.cuda.is_available() is False); use --dry-run on the CPU")
        # The dry run exists to run every check's code: its caps are ten times the GPU's (a loaded CPU is slow).
        self.cap_scale = 10 if self.dry else 1
        self.budget = args.budget or (285 if self.quick else 525) * self.cap_scale
        self.started = time.perf_counter()
        self.tmp = tempfile.TemporaryDirectory()
        self.runtime = None
        name = torch.cuda.get_device_name() if not self.dry else "cpu"
        self.limits = kernel_timings.device_limits(name)
        self.measured = {}
        if not report:
            return
        mode = "dry-run" if self.dry else "quick" if self.quick else "full"
        self.report = Report(Path(args.out), dict(
            command="python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:]), dry_run=self.dry, mode=mode,
            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            git=git_state(), versions=versions(), device=device_info(name, self.limits),
            budget_s=self.budget), {name: title for name, (title, _, _) in SECTIONS.items()})
        self.report.write()

    # shapes and scales by mode ------------------------------------------------------------------------------
    def pick(self, full, quick=None, dry=None):
        return dry if self.dry else quick if self.quick and quick is not None else full

    def dtype16(self):
        return (torch.bfloat16, torch.float16)

    @contextlib.contextmanager
    def triton_kernels(self):
        """On the CPU the dispatch picks PyTorch; the correctness checks force the Triton path (interpreter)."""
        old = os.environ.get("PROTEGE_KERNELS")
        os.environ["PROTEGE_KERNELS"] = "triton"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("PROTEGE_KERNELS")
            else:
                os.environ["PROTEGE_KERNELS"] = old

    def process_group(self):
        """One-rank process group: NCCL on CUDA (init_runtime), gloo on the CPU (a sharded Runtime)."""
        if self.runtime is None:
            from protege.engine.training.runtime import Runtime, init_runtime
            if self.device.type == "cuda":
                self.runtime = init_runtime("cuda")
            else:
                import torch.distributed as dist
                from protege.engine.training.runtime import _free_port
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
                dist.init_process_group("gloo", rank=0, world_size=1)
                self.runtime = Runtime(0, 1, torch.device("cpu"), sharded=True)
        return self.runtime

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def watchdog(self, seconds: float):
        """Past `seconds` (a check that overran every cap), mark the running section, write, and exit 2."""
        def fire():
            for sec in self.report.sections.values():
                if sec["status"] == "running":
                    sec["status"] = "KILLED"
                    sec["notes"].append(f"killed: the suite's hard limit ({seconds:.0f} s) was reached inside it")
            self.report.meta["total_seconds"] = round(time.perf_counter() - self.started, 1)
            self.report.write()
            print(f"gpu_suite: hard limit of {seconds:.0f} s reached; report written", flush=True)
            os._exit(2)
        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        return timer

    def run(self, functions: dict, only: list[str] | None):
        """Every section of SECTIONS (or those in `only`), in order: functions[name](suite, section)."""
        timer = self.watchdog(self.budget + 90)
        for name, (title, cap_full, cap_quick) in SECTIONS.items():
            if only and name not in only:
                continue
            left = self.budget - (time.perf_counter() - self.started)
            cap = min((cap_quick if self.quick else cap_full) * self.cap_scale, max(0.0, left))
            print(f"== {title} (cap {cap:.0f} s)", flush=True)
            section = Section(self, name, cap)
            if cap <= 0:
                section.skip(name, f"suite budget ({self.budget} s) used up")
            else:
                try:
                    functions[name](self, section)
                except Exception as e:  # a section's own set-up failed: record it, go on
                    traceback.print_exc()
                    section.add(dict(check=f"{name} (set-up)", status="ERROR",
                                     detail=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
            rows = section.data["rows"]
            section.data["status"] = "FAIL" if any(r.get("status") in FAILING for r in rows) else "done"
            section.data["seconds"] = section.elapsed()
            self.report.write()
            gc.collect()  # the section's models, before the next one sizes itself from the free memory
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        timer.cancel()
        total = time.perf_counter() - self.started
        self.report.meta["total_seconds"] = round(total, 1)
        self.report.write()
        return total


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return dict(commit=git("rev-parse", "HEAD") or "unknown", dirty=bool(git("status", "--porcelain", "-uno")))


def versions() -> dict:
    import triton
    import transformers
    v = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
             transformers=transformers.__version__, cuda=torch.version.cuda or "none")
    for name in ("flash_attn", "xformers", "liger_kernel", "vllm"):
        v[name] = optional_version(name)
    return v


def optional_version(name: str) -> str:
    try:
        module = __import__(name)
    except Exception as e:  # ImportError, or a broken install (a CUDA library mismatch)
        return "not installed" if isinstance(e, ImportError) else f"broken ({type(e).__name__})"
    return getattr(module, "__version__", "installed")


def device_info(name: str, limits: dict | None) -> dict:
    info = dict(name=name)
    if torch.cuda.is_available() and name != "cpu":
        p = torch.cuda.get_device_properties(0)
        info.update(memory_gib=round(p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info.update(driver="none (CPU)", threads=torch.get_num_threads())
    if limits:
        info.update(peak_hbm_tb_s=limits["bytes_per_s"] / 1e12, peak_bf16_tflop_s=limits["flop_per_s"] / 1e12,
                    peaks_from=limits["source"])
    else:
        info["peaks_from"] = "unknown device: no datasheet peaks, shares of the limit not reported"
    return info


# -- shared helpers ---------------------------------------------------------------------------------------------
def hf_config(shape: dict, layers: int | None = None, **extra):
    from transformers import Qwen2Config
    cfg = dict(shape, **COMMON)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return Qwen2Config(**cfg, eos_token_id=None, bos_token_id=None, **extra)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_pair(suite: Suite, shape: dict, layers: int | None, dtype=torch.float32, init_std=0.02):
    """(transformers Qwen2ForCausalLM, our model) with the same random weights (norms and biases randomised
    too), both on the suite's device in `dtype`. No checkpoint file: our model loads the HF state dict."""
    from transformers import Qwen2ForCausalLM as HFQwen2
    from protege.engine.config import ModelConfig
    from protege.engine.model import Qwen2ForCausalLM
    config = hf_config(shape, layers, initializer_range=init_std)
    torch.manual_seed(0)
    with torch.device(suite.device), default_dtype(dtype):
        hf = HFQwen2(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path = Path(suite.tmp.name) / f"config_{id(hf)}"
    config.save_pretrained(path)
    with torch.device("meta"):
        ours = Qwen2ForCausalLM(ModelConfig.from_json(path))
    ours.to_empty(device=suite.device)
    missing, _ = ours.load_state_dict(hf.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"our model has weights transformers' lacks: {missing[:5]}")
    return hf, ours.to(dtype).eval()


def random_checkpoint(suite: Suite, shape: dict, layers: int | None, name: str) -> Path:
    """random_pair's weights as a Hugging Face checkpoint (fp32) in the suite's temporary folder, for the
    sections that build a model the way training does (from a path)."""
    hf, _ = random_pair(suite, shape, layers, torch.float32)
    path = Path(suite.tmp.name) / name
    hf.save_pretrained(path)
    return path


def random_model(suite: Suite, shape: dict, layers: int | None, dtype):
    """Our model alone, random weights, made directly in `dtype` on the device."""
    from protege.engine.config import ModelConfig
    from protege.engine.model import Qwen2ForCausalLM
    cfg = dict(shape, **COMMON)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(suite.device), default_dtype(dtype):
        return Qwen2ForCausalLM(ModelConfig(**cfg)).eval()


def packed_ids(lengths, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g).to(device)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return ids, cu


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def max_rel(x, ref) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
