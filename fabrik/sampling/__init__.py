"""Sampling: the per-request SamplingParams, the batched torch sampler, and token logprobs."""

from fabrik.sampling.logprobs import TokenLogprob, compute_logprobs
from fabrik.sampling.params import GREEDY_TEMPERATURE, SamplingParams
from fabrik.sampling.sampler import Sampler, SamplerOutput, SamplingRow

__all__ = [
    "GREEDY_TEMPERATURE",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingRow",
    "TokenLogprob",
    "compute_logprobs",
]
