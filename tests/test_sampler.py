"""The sampler and logprobs: exact processing against hand-computed values, seeded reproducibility across batches,
and sampling statistics on a tiny known distribution."""

from __future__ import annotations

import math

import pytest
import torch

from fabrik.sampling import Sampler, SamplingParams, SamplingRow, TokenLogprob, compute_logprobs

EOS = 0


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> SamplingRow:
    return SamplingRow(
        params=params or SamplingParams(),
        generator=generator,
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


GREEDY = SamplingParams(temperature=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Greedy, logit_bias, min_tokens


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 101)
    out = Sampler([EOS])(logits, [row(GREEDY)] * 6)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_ties_take_the_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0]])
    assert Sampler([EOS])(logits, [row(GREEDY)]).token_ids == [1]


def test_a_known_argmax_needs_no_logits_and_applies_only_where_the_argmax_is_the_token():
    """An LM head that found the argmax in passing hands it over without the logits: greedy rows take it as is (a NaN
    row, -1, is refused as from the logits); a row that needs its logits (penalties, logprobs, sampling) cannot go
    without them, and with them it ignores the argmax."""
    greedy = [row(GREEDY), row(GREEDY, output=[3])]
    assert Sampler([EOS])(None, greedy, argmax=[7, 2]).token_ids == [7, 2]
    with pytest.raises(ValueError, match=r"NaN in rows \[1\]"):
        Sampler([EOS])(None, greedy, argmax=[7, -1])
    with pytest.raises(ValueError, match="2 argmax ids for 1 rows"):
        Sampler([EOS])(None, greedy[:1], argmax=[7, 2])
    penalized = row(SamplingParams(temperature=0.0, repetition_penalty=2.0), output=[1])
    with pytest.raises(ValueError, match="logits"):
        Sampler([EOS])(None, [penalized], argmax=[1])
    logits = torch.tensor([[0.0, 1.0, 0.9]])
    assert Sampler([EOS])(logits, [penalized], argmax=[1]).token_ids == [2]  # 1.0 / 2 < 0.9


def test_tiny_temperature_is_greedy_even_with_filters():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=1e-6, top_k=5, top_p=0.5, min_p=0.2)
    assert Sampler([EOS])(logits, [row(params)]).token_ids == [int(torch.argmax(logits))]


def test_input_logits_are_not_modified():
    torch.manual_seed(0)
    logits = torch.randn(2, 20)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7, top_k=3, logit_bias={1: 5.0}, repetition_penalty=1.3, frequency_penalty=1.0, min_tokens=3
    )
    Sampler([EOS])(logits, [row(params, prompt=[2, 3], output=[4]), row(GREEDY)])
    assert torch.equal(logits, before)


def test_logit_bias_forces_and_forbids_tokens():
    torch.manual_seed(0)
    logits = torch.randn(200, 10)
    forced = SamplingParams(temperature=1.0, logit_bias={7: 100.0})
    out = Sampler([EOS])(logits, [row(forced)] * 200)
    assert set(out.token_ids) == {7}

    greedy_forced = GREEDY.replace(logit_bias={3: 100.0})
    assert Sampler([EOS])(logits[:1], [row(greedy_forced)]).token_ids == [3]

    forbidden_best = int(torch.argmax(logits[0]))
    greedy_forbidden = GREEDY.replace(logit_bias={forbidden_best: -100.0})
    assert Sampler([EOS])(logits[:1], [row(greedy_forbidden)]).token_ids != [forbidden_best]


def test_logit_bias_is_added_exactly():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    params = SamplingParams(logit_bias={0: 0.5, 3: -2.25})
    processed = Sampler([EOS]).process_logits(logits, [row(params)])
    torch.testing.assert_close(processed, torch.tensor([[1.5, 2.0, 3.0, 1.75]]), rtol=0, atol=0)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_token_ids_then_lifts(ignore_eos):
    # EOS (0) is the most likely token, stop token 4 the second, 2 the third.
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0, 4.0]])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4], ignore_eos=ignore_eos)
    sampler = Sampler([EOS])
    for generated in range(3):
        out = sampler(logits, [row(params, output=[1] * generated)])
        assert out.token_ids == [2], f"EOS or stop token sampled after {generated} of min_tokens=3"
        processed = sampler.process_logits(logits, [row(params, output=[1] * generated)])
        assert processed[0, 0] == -math.inf and processed[0, 4] == -math.inf
    assert sampler(logits, [row(params, output=[1, 1, 1])]).token_ids == [EOS]


def test_min_tokens_masks_every_eos_id():
    logits = torch.tensor([[5.0, 4.5, 3.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=1)
    assert Sampler([0, 1]).process_logits(logits, [row(params)])[0, :2].tolist() == [-math.inf, -math.inf]
    assert Sampler([0, 1])(logits, [row(params)]).token_ids == [2]


def test_min_tokens_masked_tokens_are_never_sampled():
    torch.manual_seed(0)
    logits = torch.zeros(500, 4)  # uniform
    params = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[3])
    out = Sampler([EOS])(logits, [row(params, output=[1])] * 500)
    assert set(out.token_ids) == {1, 2}


# ----------------------------------------------------------------------------------------------------------------
# Penalties


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0, 0.0]])
    params = SamplingParams(repetition_penalty=2.0)
    # Token 0 (prompt), 1 and 5 (output) are penalised once each, however often they occur; 2, 3, 4 are untouched.
    processed = Sampler([EOS]).process_logits(logits, [row(params, prompt=[0, 0], output=[1, 5, 1])])
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0, -4.0, 0.0]])
    torch.testing.assert_close(processed, expected, rtol=0, atol=0)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    vocab_size = 64
    logits = torch.randn(3, vocab_size) * 3
    prompts = [[1, 2, 3, 2], [10, 11], [5]]
    outputs = [[4, 4, 9], [], [5, 63, 0]]
    params = SamplingParams(repetition_penalty=penalty)
    processed = Sampler([EOS]).process_logits(logits, [row(params, p, o) for p, o in zip(prompts, outputs)])

    hf = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        expected = hf(torch.tensor([prompt + output]), logits[i : i + 1].clone())
        diff = (processed[i] - expected[0]).abs().max().item()
        assert diff == 0, f"row {i}: largest difference from HF {diff}"


def test_frequency_and_presence_penalties_hand_computed():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    # Prompt tokens (3) are not penalised; output has token 1 three times, token 2 once.
    processed = Sampler([EOS]).process_logits(logits, [row(params, prompt=[3, 3], output=[1, 2, 1, 1])])
    expected = torch.tensor([[1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0]])
    torch.testing.assert_close(processed, expected)


def test_negative_frequency_and_presence_penalties_encourage_repeats():
    logits = torch.tensor([[0.0, 0.0, 0.0]])
    params = SamplingParams(frequency_penalty=-1.0, presence_penalty=-2.0)
    processed = Sampler([EOS]).process_logits(logits, [row(params, output=[2, 2])])
    torch.testing.assert_close(processed, torch.tensor([[0.0, 0.0, 4.0]]))


def test_penalties_are_per_row():
    logits = torch.ones(3, 4)
    rows = [
        row(SamplingParams(frequency_penalty=1.0), output=[0]),
        row(SamplingParams(), output=[0]),
        row(SamplingParams(repetition_penalty=2.0), prompt=[1]),
    ]
    processed = Sampler([EOS]).process_logits(logits, rows)
    expected = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(processed, expected)


# ----------------------------------------------------------------------------------------------------------------
# Seeded reproducibility


@pytest.mark.parametrize("vocab_size", [97, 3000])
@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(temperature=0.9, top_p=0.95, seed=1234),
        SamplingParams(temperature=1.2, top_k=40, top_p=0.9, min_p=0.02, seed=1234),
        SamplingParams(temperature=0.8, seed=1234),
    ],
    ids=["top_p", "top_k+top_p+min_p", "plain"],
)
def test_same_seed_gives_same_tokens_alone_and_in_any_batch_position(vocab_size, target):
    steps, seed = 20, 1234
    torch.manual_seed(0)
    target_logits = torch.randn(steps, vocab_size) * 3  # the target row's logits at each step
    sampler = Sampler([EOS])

    def run(position: int, batch_size: int) -> list[int]:
        generators = {j: seeded(1000 + j) for j in range(batch_size)}
        target_generator = seeded(seed)
        filler_params = [
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=0.7, top_k=5, seed=7),
            GREEDY,
            SamplingParams(temperature=1.5, min_p=0.05, seed=8),
        ]
        tokens: list[int] = []
        for step in range(steps):
            logits = torch.randn(batch_size, vocab_size) * 3
            logits[position] = target_logits[step]
            rows = []
            for j in range(batch_size):
                if j == position:
                    rows.append(row(target, output=tokens, generator=target_generator))
                else:
                    params = filler_params[j % len(filler_params)]
                    rows.append(row(params, generator=generators[j] if params.seed is not None else None))
            tokens.append(sampler(logits, rows).token_ids[position])
        return tokens

    alone = run(position=0, batch_size=1)
    assert len(set(alone)) > 5, "the test distribution should make the draws vary"
    for position, batch_size in [(0, 4), (2, 5), (6, 7)]:
        assert run(position, batch_size) == alone, f"row at {position} of {batch_size} drew different tokens"

    other = target.replace(seed=seed + 1)
    other_generator = seeded(seed + 1)
    other_tokens = [
        sampler(target_logits[step : step + 1], [row(other, generator=other_generator)]).token_ids[0]
        for step in range(steps)
    ]
    assert other_tokens != alone


def test_seeded_and_greedy_rows_do_not_touch_the_global_rng():
    torch.manual_seed(5)
    logits = torch.randn(3, 30)
    state = torch.get_rng_state()
    rows = [
        row(SamplingParams(seed=1), generator=seeded(1)),
        row(GREEDY),
        row(SamplingParams(seed=2), generator=seeded(2)),
    ]
    Sampler([EOS])(logits, rows)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------------------------
# Statistics on a tiny known distribution

PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]
DRAWS = 20_000
# Largest binomial standard deviation at 20k draws is sqrt(0.25 / 20000) = 0.0035; 0.015 is over 4 of them.
TOLERANCE = 0.015


CASES = [
    # (temperature, top_k, top_p, min_p, tokens kept)
    # No filter: the distribution itself, sharpened or flattened by the temperature.
    (1.0, 0, 1.0, 0.0, {0, 1, 2, 3, 4}),
    (0.5, 0, 1.0, 0.0, {0, 1, 2, 3, 4}),
    (2.0, -1, 1.0, 0.0, {0, 1, 2, 3, 4}),
    (1.0, 2, 1.0, 0.0, {0, 1}),
    (0.5, 2, 1.0, 0.0, {0, 1}),
    (2.0, 2, 1.0, 0.0, {0, 1}),
    # T=0.5: probs ~ [.561, .316, .079, .035, .009], mass before token 2 is .877 >= .7.
    (0.5, 0, 0.7, 0.0, {0, 1}),
    # T=2: probs ~ [.300, .260, .184, .150, .106], mass before token 2 is .560 < .7, before token 3 .744.
    (2.0, 0, 0.7, 0.0, {0, 1, 2}),
    # T=1: mass before token 1 is .4 < .65, before token 2 .7.
    (1.0, 0, 0.65, 0.0, {0, 1}),
    # Tiny top_p keeps only the top token.
    (1.0, 0, 1e-6, 0.0, {0}),
    # min_p=0.3: T=1 drops p < .12; T=0.5 drops p < .168; T=2 drops p < .090 (none).
    (1.0, 0, 1.0, 0.3, {0, 1, 2}),
    (0.5, 0, 1.0, 0.3, {0, 1}),
    (2.0, 0, 1.0, 0.3, {0, 1, 2, 3, 4}),
    # All three at T=2: top_k=3 -> [.403, .350, .247]; top_p=0.7 -> {0, 1}; min_p=0.3 keeps both.
    (2.0, 3, 0.7, 0.3, {0, 1}),
]


def assert_frequencies(token_ids: list[int], probs: list[float], temperature: float, kept: set[int]) -> None:
    """Empirical frequencies match probs ** (1 / T) renormalised over kept; tokens outside kept never appear."""
    counts = torch.bincount(torch.tensor(token_ids), minlength=len(probs)).tolist()
    weights = [p ** (1 / temperature) if i in kept else 0.0 for i, p in enumerate(probs)]
    for token, count in enumerate(counts):
        if token not in kept:
            assert count == 0, f"token {token} was filtered out but drawn {count} times"
        got, want = count / len(token_ids), weights[token] / sum(weights)
        assert abs(got - want) <= TOLERANCE, f"token {token}: frequency {got:.4f}, expected {want:.4f}"


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p", "kept"), CASES)
def test_empirical_frequencies_match_the_filtered_distribution(temperature, top_k, top_p, min_p, kept):
    torch.manual_seed(0)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = torch.log(torch.tensor(PROBS)).expand(DRAWS, -1)  # (DRAWS, 5)
    out = Sampler([EOS])(logits, [row(params)] * DRAWS)
    assert_frequencies(out.token_ids, PROBS, temperature, kept)


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p", "kept"), [CASES[5], CASES[7], CASES[13]])
def test_empirical_frequencies_with_one_generator_per_row(temperature, top_k, top_p, min_p, kept):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=0)
    logits = torch.log(torch.tensor(PROBS)).expand(DRAWS, -1)  # (DRAWS, 5)
    out = Sampler([EOS])(logits, [row(params, generator=seeded(i)) for i in range(DRAWS)])
    assert_frequencies(out.token_ids, PROBS, temperature, kept)


def test_top_p_in_a_large_vocabulary_uses_the_prefix_exactly():
    # 10 head tokens scattered over a 2000-token vocabulary hold 0.9 of the mass: the nucleus fits in the prefix.
    vocab_size, draws = 2000, 10_000
    head_ids = [1500, 17, 1100, 3, 1999, 1234, 800, 2, 1333, 60]
    head_probs = [0.3, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.02, 0.005, 0.005]
    probs = torch.full((vocab_size,), 0.1 / (vocab_size - len(head_ids)))
    probs[head_ids] = torch.tensor(head_probs)
    logits = torch.log(probs).expand(draws, -1)
    torch.manual_seed(0)
    # Mass before the 2nd head token is .3 < .45, before the 3rd .5 >= .45.
    out = Sampler([EOS])(logits, [row(SamplingParams(top_p=0.45))] * draws)
    assert set(out.token_ids) == {1500, 17}
    share = out.token_ids.count(1500) / draws
    assert abs(share - 0.6) <= TOLERANCE, f"token 1500: frequency {share:.4f}, expected 0.6"


def test_top_p_falls_back_to_a_full_sort_when_the_prefix_is_too_small():
    # Uniform over 2000 tokens: the top 1024 hold 0.512 < top_p; the nucleus is the lowest ~1200 ids (ties by id).
    vocab_size, draws = 2000, 4000
    logits = torch.zeros(draws, vocab_size)
    torch.manual_seed(0)
    out = Sampler([EOS])(logits, [row(SamplingParams(top_p=0.6))] * draws)
    assert max(out.token_ids) <= 1201
    assert max(out.token_ids) > 1100, "draws should cover the whole nucleus, beyond the 1024-token prefix"


def test_top_k_ties_keep_the_lowest_ids():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]]).expand(2000, -1)
    out = Sampler([EOS])(logits, [row(SamplingParams(top_k=2))] * 2000)
    assert set(out.token_ids) == {1, 2}


def test_padded_vocabulary_rows_are_handled_like_any_other():
    torch.manual_seed(0)
    logits = torch.full((1000, 8), -math.inf)
    logits[:, :3] = 0.0  # a model vocab of 8 whose last 5 rows are masked padding
    out = Sampler([EOS])(logits, [row(SamplingParams(top_p=0.9, min_p=0.01))] * 1000)
    assert set(out.token_ids) == {0, 1, 2}


# ----------------------------------------------------------------------------------------------------------------
# Logprobs


def test_sampler_logprobs_come_from_the_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=5, repetition_penalty=1.5, logit_bias={7: 3.0}),
        SamplingParams(temperature=0.0, logprobs=0, logit_bias={int(torch.argmax(logits[1])): -100.0}),
        SamplingParams(temperature=1.0),
    ]
    rows = [row(params[0], prompt=[1, 2]), row(params[1]), row(params[2])]
    out = Sampler([EOS])(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)

    assert out.logprobs[2] is None
    for i in (0, 1):
        entry = out.logprobs[i]
        assert isinstance(entry, TokenLogprob)
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(raw[i, entry.token_id].item(), abs=1e-6)
        assert entry.rank == int((raw[i] > raw[i, entry.token_id]).sum()) + 1
        assert len(entry.top) == params[i].logprobs
        expected_top = torch.topk(raw[i], params[i].logprobs)
        assert [token for token, _ in entry.top] == expected_top.indices.tolist()
        for (_, got), want in zip(entry.top, expected_top.values.tolist()):
            assert got == pytest.approx(want, abs=1e-6)
    # The greedy row's logit_bias moved the argmax away: its rank under the raw logits is not 1.
    assert out.logprobs[1].rank > 1
    assert out.logprobs[1].top == ()


def test_compute_logprobs_values_ranks_and_top():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    result = compute_logprobs(logits, torch.tensor([2, 3]), [2, 3])
    raw = torch.log_softmax(logits, dim=-1)

    assert result[0].token_id == 2
    assert result[0].logprob == pytest.approx(raw[0, 2].item())
    assert result[0].rank == 3
    assert [token for token, _ in result[0].top] == [1, 3]
    assert [lp for _, lp in result[0].top] == pytest.approx([raw[0, 1].item(), raw[0, 3].item()])
    # All tied: ranks and top break ties by token id.
    assert result[1].rank == 4
    assert [token for token, _ in result[1].top] == [0, 1, 2]
    assert result[1].logprob == pytest.approx(math.log(0.25))


def test_compute_logprobs_tie_at_the_cut_is_deterministic():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0]])
    result = compute_logprobs(logits, torch.tensor([5]), [2])[0]
    assert [token for token, _ in result.top] == [1, 2]
    assert result.rank == 4


def test_compute_logprobs_k_zero_and_k_above_vocab():
    logits = torch.tensor([[0.5, 0.1, 0.9]])
    assert compute_logprobs(logits, torch.tensor([0]), [0])[0].top == ()
    everything = compute_logprobs(logits, torch.tensor([0]), [10])[0].top
    assert [token for token, _ in everything] == [2, 0, 1]


def test_compute_logprobs_for_prompt_positions():
    # The runner passes the logits of prompt positions 0..M-2 and the next prompt tokens as chosen.
    torch.manual_seed(0)
    logits = torch.randn(4, 16)
    next_tokens = torch.tensor([3, 9, 0, 15])
    result = compute_logprobs(logits, next_tokens, [1] * 4)
    raw = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(result):
        assert entry.token_id == next_tokens[i].item()
        assert entry.logprob == pytest.approx(raw[i, next_tokens[i]].item(), abs=1e-6)
        assert entry.top[0][0] == int(torch.argmax(raw[i]))


def test_compute_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="chosen"):
        compute_logprobs(torch.zeros(2, 3), torch.tensor([0]), [0, 0])
    with pytest.raises(ValueError, match="k"):
        compute_logprobs(torch.zeros(2, 3), torch.tensor([0, 1]), [0])
    with pytest.raises(ValueError, match="k"):
        compute_logprobs(torch.zeros(1, 3), torch.tensor([0]), [-1])


def test_sampler_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="logits"):
        Sampler([EOS])(torch.zeros(2, 5), [row()])
    assert Sampler([EOS])(torch.zeros(0, 5), []).token_ids == []


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0)], ids=["random", "greedy"])
def test_sampler_rejects_nan_logits(params):
    logits = torch.zeros(3, 5)
    logits[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN in rows \[1\]"):
        Sampler([EOS])(logits, [row(params)] * 3)


def test_batched_top_k_equals_the_row_by_row_rule():
    # Rows with and without ties (values rounded to few levels make many), several k per batch.
    from fabrik.sampling.logprobs import _top_k

    gen = torch.Generator().manual_seed(0)
    for levels in (None, 4, 2):
        logits = torch.randn(24, 50, generator=gen)
        if levels is not None:
            logits = (logits * levels).round() / levels
        ks = [int(k) for k in torch.randint(0, 8, (24,), generator=gen)]
        result = compute_logprobs(logits, torch.zeros(24, dtype=torch.int64), ks)
        logprobs = torch.log_softmax(logits, dim=-1)
        assert [r.top for r in result] == [_top_k(logprobs[i], k) for i, k in enumerate(ks)]
