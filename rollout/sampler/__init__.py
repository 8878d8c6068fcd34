"""The in-process inference engine: paged-KV sampling on the training model itself."""
from protege.rollout.sampler.sampler import Sampler
from protege.rollout.sampler.sampling import SamplingParams

__all__ = ["Sampler", "SamplingParams"]
