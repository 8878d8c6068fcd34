"""The shared inputs of the rollout-mode test and its torchrun worker."""
import torch

VOCAB = 96
# At least two full 4-token KV blocks each, so that a repeated prompt is served from the prefix cache.
PROMPTS = [[5, 9, 2, 31, 7, 1, 1, 3, 4], [8, 8, 1, 77, 12, 6, 50, 2, 2, 9], [40, 3, 22, 17, 9, 11, 4, 30, 31],
           [2, 90, 91, 3, 3, 3, 3, 14, 15], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
GREEDY_TOKENS = 6
LR = 5e-2


def train_batch():
    """One packed micro-batch: (input_ids, cu_seqlens, targets, weights), the same on every rank."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (24,), generator=g)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    targets = torch.cat([ids[1:10], ids[:1] * 0, ids[11:24], ids[:1] * 0])
    weights = torch.ones(24)
    weights[9] = weights[23] = 0.0
    return ids, cu, targets, weights
