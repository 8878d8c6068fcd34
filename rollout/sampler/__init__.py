"""The in-process inference engine: paged-KV sampling on the training model itself."""
from rollout.sampler.sampler import Sampler
from rollout.sampler.sampling import SamplingParams

__all__ = ["Sampler", "SamplingParams"]
