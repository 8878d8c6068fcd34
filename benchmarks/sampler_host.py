"""Host work of one sampler decode step, which must not grow with context length (the GPU would wait on Python):
SamplerStats.host_ms_per_step at batch 256 with 1K- and 8K-token contexts (tiny model on the CPU, so the model's
own time is excluded: the stats split host from device time), and the device syncs per step. Steady-state
decode steps: the step that first meets a sequence uploads its whole block table once, and Python's garbage
collector first walks the 256 new token lists (8K entries each at 8K context) until they reach its oldest
generation; both are admission costs, so each measured window starts after the admission steps, a
gc.collect() and one more step (the collection walks those lists too, evicting the caches: that step pays).

Device syncs are counted by wrapping, during the measured steps, the calls that make the host wait for the GPU:
- device-to-host reads: Tensor.tolist / item / cpu;
- blocking host-to-device copies of host data: torch.tensor / torch.as_tensor given a device= (Python data
  sent to the device: on CUDA a pageable copy, which waits for the stream), and Tensor.to / Tensor.cuda of a
  CPU tensor to a device without non_blocking=True (the runner's one upload per step is non_blocking, from
  a buffer pinned on CUDA, and is not counted).
Calls made from kernels/reference.py are left out: those are the CPU-only PyTorch reference ops (CUDA runs the
Triton kernels, which read their metadata on the device). Not seen by the count: __setitem__ / copy_ from host
data (the step path has none) and the Triton ops' own host code (not run on the CPU). Each counted call is
attributed to the function that made it (the JSON's sync_sites).

    python benchmarks/sampler_host.py [--out benchmarks/results]   -> sampler_host.json, sampler_host.md
"""
import argparse
import collections
import gc
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM
from protege.rollout.sampler import Sampler, SamplingParams

BATCH, DECODE_STEPS, REPEATS = 256, 8, 5


class DeviceSyncs:
    """Counts the calls that would make the host wait for the device (the module docstring), by caller."""
    READS = ("tolist", "item", "cpu")

    def __enter__(self):
        self.sites = collections.Counter()
        self._saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in (*self.READS, "to", "cuda")]
        self._saved += [(torch, n, getattr(torch, n)) for n in ("tensor", "as_tensor")]
        for owner, name, original in self._saved:
            def counted(*a, _name=name, _original=original, **k):
                if self._syncs(_name, a, k):
                    caller = sys._getframe(1).f_code
                    if not caller.co_filename.endswith(os.path.join("kernels", "reference.py")):
                        self.sites[f"{Path(caller.co_filename).name}:{caller.co_name} {_name}"] += 1
                return _original(*a, **k)
            setattr(owner, name, counted)
        return self

    def _syncs(self, name, args, kwargs) -> bool:
        if name in self.READS:
            return True
        if name in ("tensor", "as_tensor"):
            return kwargs.get("device") is not None
        source = args[0]
        if source.device.type != "cpu" or kwargs.get("non_blocking"):
            return False
        target = kwargs.get("device", args[1] if len(args) > 1 else None)
        return name == "cuda" or isinstance(target, (torch.device, str, torch.Tensor))

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __exit__(self, *exc):
        for owner, name, original in self._saved:
            setattr(owner, name, original)


def measure(context: int, repeats: int = REPEATS) -> dict:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=context + 64)).eval()
    per_seq_blocks = (context + DECODE_STEPS + 16) // 16 + 1
    sampler = Sampler(model, num_blocks=BATCH * 2 + per_seq_blocks, block_size=16, max_num_seqs=BATCH,
                      max_num_batched_tokens=max(4096, context))
    prompt = torch.randint(0, 512, (context,)).tolist()
    host_ms, serial_ms, syncs, sites = [], [], [], collections.Counter()
    for r in range(repeats):
        # One prompt, 256 samples sharing its KV blocks: prefill once, then pure decode steps at full context.
        generated = sampler.stats.generated_tokens
        sampler.add_request(prompt, SamplingParams(n=BATCH, max_tokens=DECODE_STEPS + 1, ignore_eos=True, seed=r))
        while sampler.stats.generated_tokens - generated < 2 * BATCH:
            sampler.step()   # prefill, the first token of every sample, then the step that meets the 256 new ones
        gc.collect()
        sampler.step()
        before = (sampler.stats.host_seconds, sampler.stats.steps, sampler.stats.serial_host_seconds)
        with DeviceSyncs() as counter:
            steps = 0
            while sampler.has_unfinished():
                sampler.step()
                steps += 1
        host_ms.append(1e3 * (sampler.stats.host_seconds - before[0]) / (sampler.stats.steps - before[1]))
        serial_ms.append(1e3 * (sampler.stats.serial_host_seconds - before[2]) / (sampler.stats.steps - before[1]))
        syncs.append(counter.count / steps)
        sites.update({site: n / steps / repeats for site, n in counter.sites.items()})
    return {"context": context, "batch": BATCH, "host_ms_per_step": statistics.median(host_ms),
            "host_ms_per_step_repeats": host_ms, "serial_host_ms_per_step": statistics.median(serial_ms),
            "device_syncs_per_step": statistics.median(syncs),
            "sync_sites": dict(sorted(sites.items()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rows = [measure(1024), measure(8192)]
    ratio = rows[1]["host_ms_per_step"] / rows[0]["host_ms_per_step"]
    result = {"device": "cpu", "rows": rows, "ratio_8k_over_1k": ratio,
              "goal": {"host_ms_per_step": "<= 2 at both", "ratio": "<= 1.25", "syncs_per_step": 1}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler_host.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"| context | batch | host ms / step (median of {REPEATS}) | of which serial | device syncs / step |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['batch']} | {r['host_ms_per_step']:.2f} | {r['serial_host_ms_per_step']:.2f} | "
              f"{r['device_syncs_per_step']:.1f} |" for r in rows]
    lines.append(f"\n8K / 1K host time: {ratio:.2f} (goal <= 1.25; goal <= 2 ms per step, 1 sync per step).")
    lines.append("\nSerial: the host work the device waits for (scheduling and packing before the step's launch, "
                 "bookkeeping after its tokens are read back); the rest runs while the device computes. It bounds "
                 "what async scheduling (vLLM's overlap of step n+1's scheduling with step n) could win: the GPU "
                 "idles serial / (serial + D) of the time, D the device step time, UNMEASURED here (no GPU).")
    lines.append("\nDevice syncs per step by call site (8K; see the script's docstring for what is counted):\n")
    lines += [f"- `{site}`: {n:.1f}" for site, n in rows[1]["sync_sites"].items()]
    (out / "sampler_host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
