"""Log-probabilities of chosen tokens and their most likely alternatives.

Used for generated tokens (the logits are the raw model logits, before any sampling processing, like vLLM) and for
prompt logprobs (the model runner passes the logits of prompt positions and the next prompt tokens as ``chosen``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one chosen token and the most likely alternatives at its position."""

    token_id: int
    """The chosen token."""
    logprob: float
    """Its log-probability under the raw logits."""
    rank: int
    """Its rank among all tokens, 1 = most likely; ties are broken by token id, lowest first."""
    top: tuple[tuple[int, float], ...]
    """The k most likely (token_id, logprob), most likely first, ties by token id."""


def compute_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: Sequence[int]) -> list[TokenLogprob]:
    """Computes the log-probability, rank and top-k alternatives of one chosen token per row.

    Args:
        logits: (N, V) logits; log_softmax is taken over V in float32.
        chosen: (N,) int64 token id chosen at each row.
        k: number of top alternatives to return for each row (>= 0; more than V returns all V).

    Returns:
        One TokenLogprob per row.

    Raises:
        ValueError: the shapes do not agree, or a k is negative.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    num_rows, vocab_size = logits.shape
    if chosen.shape != (num_rows,):
        raise ValueError(f"chosen must have shape ({num_rows},), got {tuple(chosen.shape)}")
    if len(k) != num_rows:
        raise ValueError(f"k must have one entry per row ({num_rows}), got {len(k)}")
    if any(row_k < 0 for row_k in k):
        raise ValueError(f"k must be >= 0 for every row, got {list(k)}")
    if num_rows == 0:
        return []

    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = chosen.to(device=logprobs.device, dtype=torch.long)
    chosen_logprobs = logprobs.gather(1, chosen[:, None])  # (N, 1)
    chosen_list = chosen.tolist()
    chosen_logprob_list = chosen_logprobs[:, 0].tolist()
    # Tokens ranked ahead of the chosen one: as likely or more with a lower id, strictly more likely with a higher
    # one. Two slices per row read each logprob once: ~4x less than masks over the whole (N, V) block.
    rank_list = [1 + int(torch.count_nonzero(logprobs[row, :token] >= value))
                 + int(torch.count_nonzero(logprobs[row, token + 1:] > value))
                 for row, (token, value) in enumerate(zip(chosen_list, chosen_logprob_list))]
    tops = _top_ks(logprobs, [min(row_k, vocab_size) for row_k in k])
    return [TokenLogprob(token_id=chosen_list[row], logprob=chosen_logprob_list[row], rank=rank_list[row],
                         top=tops[row]) for row in range(num_rows)]


def _top_ks(logprobs: torch.Tensor, k: Sequence[int]) -> list[tuple[tuple[int, float], ...]]:
    """``_top_k`` of every row of (N, V) ``logprobs``: one batched topk, and the exact tie rule only for the rows
    that have a tie among their k + 1 largest values (only there can the order or the set depend on it)."""
    k_max = max(k)
    if k_max == 0:
        return [() for _ in k]
    width = min(k_max + 1, logprobs.shape[1])
    values, ids = torch.topk(logprobs, width, dim=1)  # (N, width), largest first
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1).tolist() if width > 1 else [False] * len(k)
    value_rows, id_rows = values.tolist(), ids.tolist()
    tops = []
    for row, row_k in enumerate(k):
        if tied[row]:
            tops.append(_top_k(logprobs[row], row_k))
        else:
            tops.append(tuple(zip(id_rows[row][:row_k], value_rows[row][:row_k])))
    return tops


def _top_k(row: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The k largest entries of a (V,) row as (id, value), largest first, ties by lowest id."""
    if k == 0:
        return ()
    # NOTE: torch.topk does not order ties; take every entry tied with the k-th value, then sort those stably
    # (nonzero returns ids in increasing order) so equal values keep the lowest ids first.
    threshold = torch.topk(row, k).values[-1]
    candidates = torch.nonzero(row >= threshold)[:, 0]  # (C,), C >= k
    order = torch.sort(row[candidates], descending=True, stable=True).indices[:k]
    ids = candidates[order]
    return tuple(zip(ids.tolist(), row[ids].tolist()))
