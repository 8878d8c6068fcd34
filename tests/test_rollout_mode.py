"""Rollout mode: the sampler runs on the trainer's own FSDP2-sharded model (torchrun, 2 ranks, gloo), with
no weight copy, the same tokens and log-probs as the same weights unsharded, and never a stale KV after an
update; the sampler's weight-version, device and dtype rules; bad use."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from protege.kernels import dispatch as kernels
from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM
from protege.engine.training.parallelize import RolloutMode
from protege.engine.training.sft import TokenNLL
from protege.rollout.sampler import Sampler, SamplingParams
from protege.rollout.sampler.server import SamplerServer
from rollout_mode_case import GREEDY_TOKENS, LR, PROMPTS, VOCAB, train_batch

REPO = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(dtype)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("rollout_ckpt")
    tiny_model().save_pretrained(path)
    return path


def unsharded_reference(checkpoint):
    """The same weights in one process without FSDP: greedy outputs before and after the same AdamW step."""
    model = Qwen2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    first = Sampler(model, num_blocks=64, block_size=4).generate(PROMPTS, GREEDY)
    root = TokenNLL(model)
    optimizer = torch.optim.AdamW(root.parameters(), lr=LR)
    ids, cu, targets, weights = train_batch()
    (root(ids, cu, targets, weights) / weights.sum()).backward()
    optimizer.step()
    second = Sampler(model, num_blocks=64, block_size=4).generate(PROMPTS, GREEDY)
    return first, second


def test_fsdp2_rollout_mode_on_two_ranks_matches_unsharded(checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "rollout_mode_worker.py"), str(checkpoint), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    first, second = unsharded_reference(checkpoint)
    for report in ranks:
        r = report["rank"]
        assert "sharded" in report["sharded_error"] and "rollout mode" in report["sharded_error"]
        assert report["plain_full_params"] and report["same_storage_after_sampling"]
        assert report["switch_1"]["copied_bytes"] == 0 and report["switch_1"]["gathered_bytes"] > 0
        assert report["switch_1"]["seconds"] > 0
        assert report["repeat_equal"] and report["cached_within_rollout"] > 0   # the prefix cache works...
        assert report["cached_after_step"] == 0                                 # ...but not across an update
        for got, want in ((report["first"], first[r::2]), (report["second"], second[r::2])):
            for (tokens, logprobs), ref in zip(got, want, strict=True):
                assert tokens == ref.token_ids
                assert max(abs(a - b) for a, b in zip(logprobs, ref.logprobs)) <= 1e-6
    # The update changed what the model generates (else "uses the new weights" would be vacuous).
    assert [c.token_ids for c in first] != [c.token_ids for c in second]


@pytest.fixture(scope="module")
def switch_report(checkpoint, tmp_path_factory):
    """tests/rollout_switch_worker.py on 2 ranks: what each saw."""
    out = tmp_path_factory.mktemp("switch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "rollout_switch_worker.py"), str(checkpoint), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]


def test_sampler_steps_run_no_checkpoint_and_no_fsdp_hook(switch_report):
    """bf16 compute, fp32 masters, activation checkpointing on: a sampler step calls the plain layer forwards
    (no checkpoint wrapper: on CUDA it reads the RNG state, which graph capture refuses; no FSDP2 hook: the
    weights are gathered and fixed), and samples exactly what a plain bf16 copy of the weights samples."""
    for report in switch_report:
        # The counters see what training runs (else the zeros below would prove nothing)...
        assert report["training_calls"]["checkpoint"] == 3
        assert report["training_calls"]["_pre_forward"] == report["training_calls"]["_post_forward"] == 4
        # ...and nothing of it in rollout mode, at the first switch and the next.
        assert report["sampling_calls"] == [{}, {}]
        assert report["sampler_dtype"] == "torch.bfloat16" and report["same_as_plain_bf16"] == [True, True]


def test_training_after_rollout_mode_is_unchanged(switch_report):
    """After leaving rollout mode the model trains bit for bit as one that never switched (same loss, same
    gradient shards), through the same checkpointed and FSDP-hooked layers."""
    for report in switch_report:
        assert report["sharded_again"] and report["same_training"] == [True, True]
        assert report["training_calls_after"] == report["training_calls"]


def test_reference_model_holds_nothing_gathered_after_its_forward(switch_report):
    for report in switch_report:
        assert report["policy_gathered"] > 0   # the measure sees what training keeps (root, last layer)...
        assert report["reference_gathered"] == 0 and report["reference_repeat_equal"]   # ...the reference: none


def test_rollout_mode_without_fsdp_bumps_the_version_and_frees_the_pool():
    model = tiny_model()
    sampler = Sampler(model, num_blocks=32, block_size=4)
    rollout = RolloutMode(TokenNLL(model), model, sampler)
    with rollout:
        sampler.generate(PROMPTS[:2], GREEDY)
        version = model.weight_version
        assert sampler.kv_cache is not None
    assert sampler.kv_cache is None and model.weight_version == version + 1
    assert rollout.last_switch.copied_bytes == 0


def test_leaving_with_requests_running_is_refused():
    model = tiny_model()
    sampler = Sampler(model, num_blocks=32, block_size=4)
    rollout = RolloutMode(TokenNLL(model), model, sampler).enter()
    sampler.add_request(PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="still runs 1 request"):
        rollout.leave()
    sampler.abort_all()
    rollout.leave()


def test_sampler_notices_changed_weights_by_itself():
    """A caller who forgets new_weight_version() after an in-place update still never gets stale KV."""
    model = tiny_model()
    sampler = Sampler(model, num_blocks=32, block_size=4)
    sampler.generate([PROMPTS[2]], GREEDY)
    cached = sampler.stats.cached_tokens
    sampler.generate([PROMPTS[2]], GREEDY)
    assert sampler.stats.cached_tokens > cached          # same weights: the prefix is served from the cache
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.5)   # no version bump, no call to the sampler
    cached = sampler.stats.cached_tokens
    out = sampler.generate([PROMPTS[2]], GREEDY)[0]
    assert sampler.stats.cached_tokens == cached
    fresh = Sampler(model, num_blocks=32, block_size=4).generate([PROMPTS[2]], GREEDY)[0]
    assert out.token_ids == fresh.token_ids and out.logprobs == fresh.logprobs
    sampler.add_request(PROMPTS[0], GREEDY)
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)
    with pytest.raises(RuntimeError, match="weights changed while 1 request"):
        sampler.add_request(PROMPTS[1], GREEDY)


def test_kv_dtype_is_the_compute_dtype_and_checked():
    bf16 = tiny_model(dtype=torch.bfloat16)
    sampler = Sampler(bf16, num_blocks=8, block_size=4)
    sampler.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2))
    assert sampler.kv_cache.pool.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_dtype=torch.int8.*float16, bfloat16 or float32"):
        Sampler(bf16, num_blocks=8, kv_dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_frequencies_match_the_reported_logprobs(dtype):
    """4096 temperature-1 draws from one prompt: each drawn token's frequency is within 5 sigma of
    exp(its reported log-prob), and the tokens never drawn carry almost no reported mass."""
    model = tiny_model(seed=3, dtype=dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)   # entropy ~3.1 nats over the 96 tokens
    sampler = Sampler(model, num_blocks=64, block_size=4, max_num_seqs=256)
    counts, reported = torch.zeros(VOCAB, dtype=torch.float64), {}
    for seed in range(16):
        for c in sampler.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=1, n=256, seed=seed))[0]:
            counts[c.token_ids[0]] += 1
            # The same row in another batch position: equal up to the host BLAS (not a bitwise claim here).
            assert reported.setdefault(c.token_ids[0], c.logprobs[0]) == pytest.approx(c.logprobs[0], abs=1e-5)
    draws = counts.sum()
    p = torch.zeros(VOCAB, dtype=torch.float64)
    for token, logprob in reported.items():
        p[token] = float(torch.tensor(logprob, dtype=torch.float64).exp())
    drawn = counts > 0
    sigma = (p * (1 - p) / draws).sqrt()
    assert torch.all(((counts / draws - p).abs() <= 5 * sigma)[drawn]), (counts / draws - p)[drawn]
    assert 1.0 - 1e-5 - 0.01 <= p.sum() <= 1.0 + 1e-5   # never-drawn tokens: < 1% of the reported mass


def test_engine_thread_samples_on_the_models_device(monkeypatch):
    """rank r must sample on GPU r: the server thread sets the sampler's device before stepping (checked
    here with CUDA's device calls recorded, as the CPU has none)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append((threading.current_thread().name,
                                                                               torch.device(device))))

    class OnGpu1:
        device = torch.device("cuda", 1)

        def add_request(self, prompt, params):
            return 0

        def step(self):
            from protege.rollout.sampler.sequence import Completion, RequestOutput
            return [RequestOutput(0, [1], [Completion([2], [0.0], "stop")])]

        def abort_all(self):
            return []

    server = SamplerServer(OnGpu1())
    assert server.generate([1], GREEDY).token_ids == [2]
    server.close()
    assert calls == [("sampler-server", torch.device("cuda", 1))]


def test_ops_launch_on_their_tensors_device(monkeypatch):
    """kernels.on_device(t): the current CUDA device is switched to t's for the launch when they differ."""
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    with kernels.on_device(FakeCudaTensor()):
        pass
    assert entered == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with kernels.on_device(FakeCudaTensor()):
        pass
    with kernels.on_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]   # same device, or a CPU tensor: no switch
