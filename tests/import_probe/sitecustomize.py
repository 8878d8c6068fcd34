"""Loaded at start-up by every Python process with this folder on PYTHONPATH (tests/test_packaging.py), however
it was launched (python -c, python -m, a script, torchrun's workers, pytest):
- PROTEGE_PROBE_BLOCK=a,b: those top-level packages cannot be imported (ModuleNotFoundError, as if uninstalled);
- PROTEGE_PROBE_OUT=DIR: at exit, with sys.path as the launch left it, the process imports transformers and
  Hugging Face's `kernels` (what transformers imports at start-up), runs transformers' Qwen2 forward and the
  engine's on one tiny checkpoint, and writes what it saw to DIR/<pid>.json."""
import json
import os
import sys
import threading

BLOCKED = {name for name in os.environ.get("PROTEGE_PROBE_BLOCK", "").split(",") if name}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


if BLOCKED:
    sys.meta_path.insert(0, _Blocked())


def _probe(out: str) -> None:
    report = {"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0] if sys.path else None}
    try:
        import tempfile

        import torch
        import transformers

        import kernels
        from kernels import CUDAProperties  # noqa: F401 -- transformers/integrations/hub_kernels.py needs it
        from protege.engine.model import Qwen2ForCausalLM
        from protege.kernels import dispatch

        config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False, attn_implementation="eager")
        torch.manual_seed(0)
        hf = transformers.Qwen2ForCausalLM(config).float().eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.3)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = Qwen2ForCausalLM.from_pretrained(d)
        ids = torch.randint(0, config.vocab_size, (11,))
        with torch.no_grad():
            want = hf(ids[None]).logits[0]
            got = ours(ids, cu_seqlens=torch.tensor([0, ids.numel()], dtype=torch.int32))
        report.update(kernels_file=kernels.__file__, dispatch_file=dispatch.__file__,
                      transformers=transformers.__version__, logits_scale=want.abs().max().item(),
                      max_abs_diff=(got - want).abs().max().item())
    except BaseException as e:  # noqa: BLE001 -- the report says what failed
        import traceback
        report["error"] = "".join(traceback.format_exception(e))[-3000:]
    with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)


if os.environ.get("PROTEGE_PROBE_OUT"):
    # At the interpreter's shutdown, before the atexit handlers (torch's tear down what an import needs).
    threading._register_atexit(_probe, os.environ["PROTEGE_PROBE_OUT"])
