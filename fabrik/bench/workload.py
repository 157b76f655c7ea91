"""Seeded random prompts: the same seed gives the same prompts on every machine and for every engine."""

from __future__ import annotations

import random

# NOTE: ids below 10,000 are ordinary tokens in the Qwen, Llama and Mistral vocabularies (their special tokens sit
# at the top or the very bottom), so random ids there never start a chat turn or an end-of-text by accident.
DEFAULT_TOKEN_ID_RANGE = (100, 10_000)

_WORDS = ("time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work government number night point "
          "home water room mother area money story fact month lot right study book eye job word business issue "
          "side kind head house service friend father power hour game line end member law car city community name "
          "president team minute idea kid body information back parent face others level office door health person "
          "art war history party result change morning reason research girl guy moment air teacher force "
          "education").split()


def random_token_prompts(num_prompts: int, input_len: int, seed: int = 0,
                         id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE) -> list[list[int]]:
    """``num_prompts`` prompts of exactly ``input_len`` token ids drawn uniformly from ``[low, high)``."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts ({num_prompts}) must be >= 1")
    if input_len < 1:
        raise ValueError(f"input_len ({input_len}) must be >= 1")
    low, high = id_range
    if not 0 <= low < high:
        raise ValueError(f"token id range [{low}, {high}) is empty or negative")
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(input_len)] for _ in range(num_prompts)]


def random_text_prompts(num_prompts: int, input_len: int, seed: int = 0) -> list[str]:
    """``num_prompts`` prompts of ``input_len`` random common English words (about one token each)."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts ({num_prompts}) must be >= 1")
    if input_len < 1:
        raise ValueError(f"input_len ({input_len}) must be >= 1")
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(num_prompts)]
