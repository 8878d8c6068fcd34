"""The step's host buffer (rollout/sampler/staging.py): what is packed is what is uploaded, and a step's upload
stays intact while the next step is packed (two buffers take turns), growing when a step needs more."""
import torch

from protege.rollout.sampler.staging import Staging


def test_uploads_survive_the_next_step_and_buffers_grow():
    staging = Staging(torch.device("cpu"), size=4)
    first = staging.reserve(3)
    first[:3] = [1, 2, 3]
    a = staging.upload(3)
    second = staging.reserve(10)      # the other buffer, grown
    assert len(second) >= 10
    second[:10] = range(10, 20)
    b = staging.upload(10)
    assert a.tolist() == [1, 2, 3] and b.tolist() == list(range(10, 20))
    staging.reserve(3)[:3] = [7, 8, 9]   # the first buffer again: its step is two steps old
    assert staging.upload(3).tolist() == [7, 8, 9] and b.tolist() == list(range(10, 20))
