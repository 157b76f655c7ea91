"""The sampler: one row of logits per request in, one token per request out.

Order of operations (as in vLLM):

    raw logits (N, V) ──> logprobs of the sampled token and top-k (log_softmax of the raw logits)
        │
        ├─ + logit_bias
        ├─ min_tokens: EOS and stop_token_ids -> -inf while fewer than min_tokens were generated
        ├─ repetition penalty (HF: prompt + output tokens; positive / p, negative * p)
        ├─ frequency and presence penalties (OpenAI: output tokens; - freq * count - presence * (count > 0))
        │
        ├─ greedy rows ─────────────────────────────────────────────> argmax (ties -> lowest id)
        └─ other rows: / temperature -> top_k -> top_p -> min_p -> softmax -> one draw

Each seeded row draws from its own ``torch.Generator`` and nothing else does, so a seed gives the same tokens
whatever else is in the batch and wherever the row sits in it. For that, every step after the shared processing is a
function of the row alone: rows are batched only with rows that take the same path and the same candidate count, and
every kernel used works row by row.

Filtering never sorts more of the vocabulary than it must (a full sort of 150k logits costs ~15 ms per row on a CPU):

    top_k = k             candidates: the exact top-k set (ties -> lowest ids), sorted; probabilities over those k
    top_p only            candidates: the top 1024 when they hold >= top_p of the mass, else the whole sorted row
    neither               candidates: the whole row in id order (only min_p and the draw)

The draw is an inverse-CDF lookup with one uniform number per row over the candidates (probability 0 for filtered
ones), in a canonical order that depends only on the row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fabrik.sampling.logprobs import TokenLogprob, compute_logprobs
from fabrik.sampling.params import SamplingParams

# A top_p-only row first tries the nucleus among its this many most likely tokens; see _sample.
TOP_P_PREFIX = 1024


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    """The request's sampling parameters."""
    generator: torch.Generator | None
    """The request's own generator when it has a seed (kept across steps by the caller), else None (global RNG)."""
    prompt_token_ids: Sequence[int]
    """The prompt tokens (repetition penalty)."""
    output_token_ids: Sequence[int]
    """The tokens generated so far (penalties, min_tokens)."""


@dataclass(frozen=True)
class SamplerOutput:
    """The tokens sampled for one batch of rows."""

    token_ids: list[int]
    """One sampled token per row."""
    logprobs: list[TokenLogprob | None]
    """Per row: the sampled token's logprob and top alternatives when params.logprobs is set, else None."""


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """(N,) index of each row's largest logit (the lowest on ties), -1 for a row holding NaN."""
    best, index = logits.max(dim=-1)  # NaN wins max, so a NaN row shows in best
    return index.masked_fill(torch.isnan(best), -1)


class Sampler:
    """Turns a batch of logits into one token per row, following each row's SamplingParams.

    Args:
        eos_token_ids: the model's end-of-sequence ids, masked while a row has fewer than min_tokens outputs.

    Greedy rows take the argmax an LM head kernel found while writing the logits when the caller has it (``argmax``
    of ``__call__``), else torch's over the logits.
    """

    def __init__(self, eos_token_ids: Sequence[int]):
        self.eos_token_ids = tuple(int(token_id) for token_id in eos_token_ids)

    def __call__(self, logits: torch.Tensor | None, rows: Sequence[SamplingRow],
                 argmax: Sequence[int] | None = None) -> SamplerOutput:
        """Samples one token per row.

        Args:
            logits: (N, V) float32 logits, one row per entry of rows; not modified. May be None when ``argmax`` is
                given and ``takes_argmax(rows)``.
            rows: what to do with each row.
            argmax: each row's argmax of the logits (-1 for a NaN row) when already known (an LM head kernel's,
                found while writing them); used when ``takes_argmax(rows)``.

        Returns:
            The sampled token ids and, for rows that asked, their logprobs.

        Raises:
            ValueError: logits is not (len(rows), V) (or missing where needed), or contains NaN.
        """
        if argmax is not None and self.takes_argmax(rows):
            # The common decode step, with no torch call: each costs ~10-40 us on the caches a forward left cold.
            if len(argmax) != len(rows):
                raise ValueError(f"{len(argmax)} argmax ids for {len(rows)} rows")
            return self._greedy(list(argmax), rows)
        if logits is None or logits.dim() != 2 or logits.shape[0] != len(rows):
            shape = None if logits is None else tuple(logits.shape)
            raise ValueError(f"logits must have shape ({len(rows)}, V), got {shape}")
        if not rows:
            return SamplerOutput(token_ids=[], logprobs=[])
        if logits.dtype != torch.float32:  # the check is cheaper than a no-op float() call on each step
            logits = logits.float()
        if self.takes_argmax(rows):
            # One pass over (N, V) (a separate NaN scan costs as much as the argmax).
            return self._greedy(_argmax(logits).tolist(), rows)
        if torch.isnan(logits).any():
            bad_rows = torch.isnan(logits).any(dim=-1).nonzero()[:, 0].tolist()
            raise ValueError(f"logits contain NaN in rows {bad_rows}")

        # NOTE: logprobs are taken from the raw logits, before penalties and temperature (vLLM's default), so they
        # describe the model, not the sampling settings.
        logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        raw_logprob_logits = logits[logprob_rows] if logprob_rows else None  # (L, V), a copy

        # Nothing to apply: skip the (N, V) copy (logits is only read from here on).
        x = self.process_logits(logits, rows) if any(self._modifies(row) for row in rows) else logits  # (N, V)
        token_ids = torch.empty(len(rows), dtype=torch.long)  # (N,)
        greedy = [i for i, row in enumerate(rows) if row.params.is_greedy]
        if greedy:
            token_ids[greedy] = torch.argmax(x[greedy], dim=-1)
        sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if sampled:
            token_ids[sampled] = _sample(
                x[sampled], [rows[i].params for i in sampled], [rows[i].generator for i in sampled]
            )

        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if raw_logprob_logits is not None:
            computed = compute_logprobs(
                raw_logprob_logits,
                token_ids[logprob_rows],
                [rows[i].params.logprobs for i in logprob_rows],  # type: ignore[misc]
            )
            for i, entry in zip(logprob_rows, computed):
                logprobs[i] = entry
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    @staticmethod
    def _greedy(token_ids: list[int], rows: Sequence[SamplingRow]) -> SamplerOutput:
        if -1 in token_ids:
            raise ValueError(f"logits contain NaN in rows {[i for i, t in enumerate(token_ids) if t == -1]}")
        return SamplerOutput(token_ids=token_ids, logprobs=[None] * len(rows))

    def takes_argmax(self, rows: Sequence[SamplingRow]) -> bool:
        """Whether every row's token is the argmax of its raw logits (greedy, no logprobs, nothing applied)."""
        return all(row.params.is_greedy and row.params.logprobs is None and not self._modifies(row) for row in rows)

    def _modifies(self, row: SamplingRow) -> bool:
        """Whether process_logits changes this row's logits."""
        p = row.params
        return bool(p.logit_bias) or len(row.output_token_ids) < p.min_tokens or p.repetition_penalty != 1.0 \
            or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Applies logit_bias, the min_tokens mask and the penalties: the logits greedy rows take the argmax of.

        Args:
            logits: (N, V) logits, one row per entry of rows; not modified.
            rows: what to do with each row.

        Returns:
            A new (N, V) float32 tensor; temperature, top_k, top_p and min_p are not applied.
        """
        x = logits.float().clone()  # (N, V)
        self._apply_logit_bias(x, rows)
        self._apply_min_tokens(x, rows)
        _apply_repetition_penalty(x, rows)
        _apply_frequency_presence_penalties(x, rows)
        return x

    def _apply_logit_bias(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        row_index: list[int] = []
        token_index: list[int] = []
        values: list[float] = []
        for i, row in enumerate(rows):
            for token_id, bias in (row.params.logit_bias or {}).items():
                row_index.append(i)
                token_index.append(token_id)
                values.append(bias)
        if values:
            x.index_put_(
                (torch.tensor(row_index), torch.tensor(token_index)),
                torch.tensor(values, dtype=x.dtype),
                accumulate=True,
            )

    def _apply_min_tokens(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        row_index: list[int] = []
        token_index: list[int] = []
        for i, row in enumerate(rows):
            # NOTE: ignore_eos does not lift this: with min_tokens the request asked not to see EOS that early.
            if len(row.output_token_ids) < row.params.min_tokens:
                stop_ids = set(self.eos_token_ids) | set(row.params.stop_token_ids or ())
                row_index.extend([i] * len(stop_ids))
                token_index.extend(stop_ids)
        if row_index:
            x[torch.tensor(row_index), torch.tensor(token_index)] = float("-inf")


def _apply_repetition_penalty(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """HF semantics: every token seen in the prompt or output has its logit divided (> 0) or multiplied (< 0)."""
    row_index: list[int] = []
    token_index: list[int] = []
    penalties: list[float] = []
    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty != 1.0:
            seen = set(row.prompt_token_ids)
            seen.update(row.output_token_ids)
            row_index.extend([i] * len(seen))
            token_index.extend(seen)
            penalties.extend([penalty] * len(seen))
    if not row_index:
        return
    index = (torch.tensor(row_index), torch.tensor(token_index, dtype=torch.long))
    values = x[index]  # (T,)
    penalty_t = torch.tensor(penalties, dtype=x.dtype)  # (T,)
    x[index] = torch.where(values < 0, values * penalty_t, values / penalty_t)


def _apply_frequency_presence_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """OpenAI semantics over the output tokens: logit -= frequency * count + presence * (count > 0)."""
    row_index: list[int] = []
    token_index: list[int] = []
    amounts: list[float] = []
    for i, row in enumerate(rows):
        frequency, presence = row.params.frequency_penalty, row.params.presence_penalty
        if frequency == 0.0 and presence == 0.0:
            continue
        for token_id, count in Counter(row.output_token_ids).items():
            row_index.append(i)
            token_index.append(token_id)
            amounts.append(frequency * count + presence)
    if row_index:
        index = (torch.tensor(row_index), torch.tensor(token_index, dtype=torch.long))
        x.index_put_(index, -torch.tensor(amounts, dtype=x.dtype), accumulate=True)


def _sample(
    x: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Draws one token per row of (S, V) processed logits after temperature, top_k, top_p and min_p."""
    num_rows, vocab_size = x.shape
    temperature = torch.tensor([p.temperature for p in params], dtype=x.dtype)[:, None]  # (S, 1)
    x = x / temperature
    token_ids = torch.empty(num_rows, dtype=torch.long)  # (S,)

    by_top_k: dict[int, list[int]] = {}
    top_p_only: list[int] = []
    unfiltered: list[int] = []
    for j, p in enumerate(params):
        if 0 < p.top_k < vocab_size:
            by_top_k.setdefault(p.top_k, []).append(j)
        elif p.top_p < 1.0:
            top_p_only.append(j)
        else:
            unfiltered.append(j)

    def finish(group: list[int], candidates: torch.Tensor, probs: torch.Tensor) -> None:
        sub_params = [params[j] for j in group]
        chosen = _draw(_top_p_min_p(probs, sub_params), [generators[j] for j in group])  # (G,)
        token_ids[group] = candidates.gather(1, chosen[:, None])[:, 0]

    for k, group in by_top_k.items():
        x_group = x[group]  # (G, V)
        candidates = _sorted_top(x_group, k)  # (G, k)
        # Probabilities renormalised over the top-k set: top_p and min_p act on what top_k left.
        finish(group, candidates, torch.softmax(x_group.gather(1, candidates), dim=-1))

    if top_p_only:
        x_group = x[top_p_only]  # (G, V)
        probs_all = torch.softmax(x_group, dim=-1)  # (G, V)
        needs_full_sort = list(range(len(top_p_only)))
        if vocab_size > TOP_P_PREFIX:
            # NOTE: the nucleus is a prefix of the sorted row; when the top TOP_P_PREFIX tokens already hold top_p
            # of the mass, sorting them alone gives the same nucleus as sorting all V. Whether a row takes this
            # path depends only on the row, so seeded rows stay batch-invariant.
            candidates = _sorted_top(x_group, TOP_P_PREFIX)  # (G, P)
            probs = probs_all.gather(1, candidates)  # (G, P)
            top_p = torch.tensor([params[j].top_p for j in top_p_only], dtype=probs.dtype)
            fits = (probs.sum(dim=-1) >= top_p).tolist()
            in_prefix = [g for g, ok in enumerate(fits) if ok]
            needs_full_sort = [g for g, ok in enumerate(fits) if not ok]
            if in_prefix:
                finish([top_p_only[g] for g in in_prefix], candidates[in_prefix], probs[in_prefix])
        if needs_full_sort:
            candidates = torch.sort(x_group[needs_full_sort], dim=-1, descending=True, stable=True).indices
            probs = probs_all[needs_full_sort].gather(1, candidates)  # (G, V)
            finish([top_p_only[g] for g in needs_full_sort], candidates, probs)

    if unfiltered:
        candidates = torch.arange(vocab_size).expand(len(unfiltered), vocab_size)  # (G, V) id order
        finish(unfiltered, candidates, torch.softmax(x[unfiltered], dim=-1))
    return token_ids


def _sorted_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest logits of each (V,) row, largest first, ties by lowest id: (S, V) -> (S, k)."""
    num_rows, vocab_size = x.shape
    if k >= vocab_size:
        return torch.sort(x, dim=-1, descending=True, stable=True).indices
    # NOTE: torch.topk picks among tied values arbitrarily; take its k-th value as a threshold instead and fill the
    # remaining places with the lowest tied ids, so the set is the first k of a stable sort.
    kth = torch.topk(x, k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values  # (S, 1)
    above = x > kth  # (S, V)
    tied = x == kth  # (S, V)
    room = k - above.sum(dim=-1, keepdim=True)  # (S, 1)
    keep = above | (tied & (tied.cumsum(dim=-1) <= room))  # (S, V), exactly k per row
    ids = keep.nonzero()[:, 1].view(num_rows, k)  # (S, k), increasing ids
    order = torch.sort(x.gather(1, ids), dim=-1, descending=True, stable=True).indices  # (S, k)
    return ids.gather(1, order)


def _top_p_min_p(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Zeroes candidates outside the nucleus (top_p) and below min_p * max; probs (G, C), most likely first for
    rows with top_p < 1. Returns unnormalised (G, C) weights."""
    if any(p.top_p < 1.0 for p in params):
        # A row with top_p == 1 gets an unreachable threshold, so float error in the cumsum cannot cut its tail.
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], dtype=probs.dtype)
        cumulative = torch.cumsum(probs, dim=-1)  # (G, C)
        mass_before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)  # (G, C)
        # Keep a token while the more likely ones have not reached top_p; the first is always kept.
        probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype)[:, None]  # (G, 1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p  # (G, 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _draw(weights: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of (G, C) non-negative weights; each row uses one uniform number from
    its own generator, or from the global RNG when it has none."""
    num_rows, num_candidates = weights.shape
    uniform = torch.empty(num_rows, dtype=torch.float64)  # (G,)
    unseeded = [g for g, generator in enumerate(generators) if generator is None]
    if unseeded:
        uniform[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
    for g, generator in enumerate(generators):
        if generator is not None:
            uniform[g] = torch.rand((), generator=generator, dtype=torch.float64)
    cdf = torch.cumsum(weights.double(), dim=-1)  # (G, C)
    # right=True: the first index whose cdf exceeds the target, which always has a positive weight.
    index = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]  # (G,)
    # Rounding can put the target on the total; fall back to the last candidate with positive weight.
    last_positive = num_candidates - 1 - torch.flip(weights > 0, dims=[-1]).to(torch.uint8).argmax(dim=-1)  # (G,)
    return torch.minimum(index, last_positive)
