"""SamplingParams: every validation rule rejects bad values with a message that names the field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fabrik.sampling import SamplingParams

NAN = float("nan")
INF = float("inf")


def test_defaults_match_vllm():
    params = SamplingParams()
    assert params.n == 1
    assert params.temperature == 1.0
    assert params.top_p == 1.0
    assert params.top_k == 0
    assert params.min_p == 0.0
    assert params.presence_penalty == 0.0
    assert params.frequency_penalty == 0.0
    assert params.repetition_penalty == 1.0
    assert params.seed is None
    assert params.stop == ()
    assert params.stop_token_ids == ()
    assert params.max_tokens == 16
    assert params.min_tokens == 0
    assert params.ignore_eos is False
    assert params.logprobs is None
    assert params.prompt_logprobs is None
    assert params.logit_bias is None
    assert params.skip_special_tokens is True
    assert params.include_stop_str_in_output is False
    assert not params.is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", -1),
        ("n", 1.0),
        ("n", True),
        ("n", "2"),
        ("temperature", -0.1),
        ("temperature", NAN),
        ("temperature", INF),
        ("temperature", "1.0"),
        ("temperature", None),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("top_p", NAN),
        ("top_p", INF),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_k", True),
        ("top_k", None),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("min_p", NAN),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.01),
        ("presence_penalty", NAN),
        ("presence_penalty", -INF),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", INF),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", NAN),
        ("repetition_penalty", INF),
        ("seed", 1.5),
        ("seed", True),
        ("seed", "42"),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", ["ok", 3]),
        ("stop", 3),
        ("stop", {"a": 1}),
        ("stop_token_ids", [1, -1]),
        ("stop_token_ids", [1, 2.0]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", 5),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 10.0),
        ("max_tokens", True),
        ("min_tokens", -1),
        ("min_tokens", 1.0),
        ("min_tokens", None),
        ("ignore_eos", 1),
        ("ignore_eos", None),
        ("logprobs", -1),
        ("logprobs", 1.0),
        ("logprobs", True),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", False),
        ("logit_bias", {5: NAN}),
        ("logit_bias", {5: INF}),
        ("logit_bias", {5: 100.5}),
        ("logit_bias", {5: -101}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"5": 1.0}),
        ("logit_bias", {True: 1.0}),
        ("logit_bias", {5: "1"}),
        ("logit_bias", [(5, 1.0)]),
        ("skip_special_tokens", "yes"),
        ("include_stop_str_in_output", 0),
    ],
)
def test_bad_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=17, max_tokens=16)
    assert SamplingParams(min_tokens=16, max_tokens=16).min_tokens == 16
    assert SamplingParams(min_tokens=1000, max_tokens=None).min_tokens == 1000


def test_message_names_the_bad_value():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be finite, got nan"):
        SamplingParams(temperature=NAN)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.0),
        ("temperature", 0),
        ("temperature", 100.0),
        ("top_p", 1.0),
        ("top_p", 1e-9),
        ("top_k", -1),
        ("top_k", 0),
        ("top_k", 1),
        ("min_p", 0.0),
        ("min_p", 1.0),
        ("presence_penalty", -2.0),
        ("presence_penalty", 2),
        ("frequency_penalty", -2),
        ("frequency_penalty", 2.0),
        ("repetition_penalty", 1e-3),
        ("seed", 0),
        ("seed", -1),
        ("seed", 2**64 - 1),
        ("max_tokens", None),
        ("max_tokens", 1),
        ("logprobs", 0),
        ("prompt_logprobs", 0),
        ("logit_bias", {0: -100, 7: 100.0}),
        ("logit_bias", {}),
    ],
)
def test_boundary_values_are_accepted(field, value):
    SamplingParams(**{field: value})


def test_ints_accepted_as_floats_are_stored_as_floats():
    params = SamplingParams(temperature=0, top_p=1, presence_penalty=1)
    assert isinstance(params.temperature, float)
    assert isinstance(params.top_p, float)
    assert isinstance(params.presence_penalty, float)


def test_stop_is_normalised_to_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop=[]).stop == ()
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def test_logit_bias_is_copied_and_normalised():
    bias = {5: 1}
    params = SamplingParams(logit_bias=bias)
    bias[6] = 2.0
    assert params.logit_bias == {5: 1.0}
    assert isinstance(params.logit_bias[5], float)


@pytest.mark.parametrize(("temperature", "greedy"), [(0.0, True), (9.9e-6, True), (1e-5, False), (0.7, False)])
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_replace_revalidates_and_keeps_normalised_fields():
    params = SamplingParams(stop="x", stop_token_ids=[1], seed=3)
    copy = params.replace(max_tokens=5)
    assert copy.max_tokens == 5
    assert copy.stop == ("x",) and copy.stop_token_ids == (1,) and copy.seed == 3
    assert params.max_tokens == 16
    assert dataclasses.replace(params, n=2).n == 2
    with pytest.raises(ValueError, match="top_p"):
        params.replace(top_p=math.nan)


def test_check_token_ids_against_the_vocabulary():
    params = SamplingParams(stop_token_ids=[9], logit_bias={3: 1.0})
    params.check_token_ids(vocab_size=10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        params.check_token_ids(vocab_size=9)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).check_token_ids(vocab_size=10)
