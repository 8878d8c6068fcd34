"""Host work of one sampler decode step, which must not grow with context length (the GPU would wait on Python):
SamplerStats.host_ms_per_step at batch 256 with 1K- and 8K-token contexts (tiny model on the CPU, so the model's
own time is excluded: the stats split host from device time), and the host reads of tensors per step
(Tensor.tolist / item / cpu calls, counted by wrapping them: each is a device sync on a GPU).

    python benchmarks/sampler_host.py [--out benchmarks/results]   -> sampler_host.json, sampler_host.md
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not benchmarks/
import torch  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.model import Qwen2ForCausalLM  # noqa: E402
from rollout import Sampler, SamplingParams  # noqa: E402

BATCH, DECODE_STEPS = 256, 8


class HostReads:
    """Counts calls of the tensor methods that bring device data to the host."""
    NAMES = ("tolist", "item", "cpu")

    def __enter__(self):
        self.count, self._saved = 0, {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, original in self._saved.items():
            def counted(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def measure(context: int, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=context + 64)).eval()
    per_seq_blocks = (context + DECODE_STEPS + 16) // 16 + 1
    sampler = Sampler(model, num_blocks=BATCH * 2 + per_seq_blocks, block_size=16, max_num_seqs=BATCH,
                      max_num_batched_tokens=max(4096, context))
    prompt = torch.randint(0, 512, (context,)).tolist()
    host_ms, reads = [], []
    for r in range(repeats):
        # One prompt, 256 samples sharing its KV blocks: prefill once, then pure decode steps at full context.
        generated = sampler.stats.generated_tokens
        sampler.add_request(prompt, SamplingParams(n=BATCH, max_tokens=DECODE_STEPS + 1, ignore_eos=True, seed=r))
        while sampler.stats.generated_tokens - generated < BATCH:
            sampler.step()   # prefill, then the first token of every sample
        before = (sampler.stats.host_seconds, sampler.stats.steps)
        with HostReads() as counter:
            steps = 0
            while sampler.has_unfinished():
                sampler.step()
                steps += 1
        host_ms.append(1e3 * (sampler.stats.host_seconds - before[0]) / (sampler.stats.steps - before[1]))
        reads.append(counter.count / steps)
    return {"context": context, "batch": BATCH, "host_ms_per_step": statistics.median(host_ms),
            "host_reads_per_step": statistics.median(reads)}


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
    lines = ["| context | batch | host ms / step (median of 3) | host reads / step |", "|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['batch']} | {r['host_ms_per_step']:.2f} | {r['host_reads_per_step']:.1f} |"
              for r in rows]
    lines.append(f"\n8K / 1K host time: {ratio:.2f} (goal <= 1.25; goal <= 2 ms per step, 1 sync per step).")
    (out / "sampler_host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
