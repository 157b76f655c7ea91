"""The official openai client against a real ``fabrik serve``: responses, stream chunks, usage and finish reasons.

Two servers: the tiny random Qwen3 (garbage text, so outputs are forced with logit_bias or compared between paths),
and the scripted model, which writes an exact reasoning block and tool call through the real engine and HTTP path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from checkpoints import QWEN3_EOS_IDS, make_scripted_checkpoint, tokenizer_dir
from server_utils import RANDOM_SERVER_ARGS, ServerProcess, random_server, shared_server

MODEL = "tiny-qwen3"
HELLO = 23811  # " hello" in the Qwen3 vocabulary
USER = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, qwen3_tok_ckpt: Path) -> ServerProcess:
    return random_server(request, qwen3_tok_ckpt)


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    return server.openai()


def prompt_len(server: ServerProcess, **body) -> int:
    with server.http() as http:
        return http.post("/tokenize", json=body).json()["count"]


# -- the random model ----------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_usage_equals_token_counts(client, server):
    resp = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, logprobs=True, **GREEDY)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert resp.usage.prompt_tokens == prompt_len(server, messages=USER)
    assert resp.usage.completion_tokens == 5 == len(choice.logprobs.content)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5


def test_chat_stream_matches_the_whole_response(client):
    whole = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, n=2, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # Role first, for each choice; then content; one finish chunk per choice; the usage chunk last.
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == index]
        text = "".join(ch.delta.content or "" for ch in mine)
        assert text == whole.choices[index].message.content
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == ["length"]
        assert mine[-1].finish_reason == "length"


def test_sse_wire_format(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 2, "ignore_eos": True, "stream": True}
    with server.http() as http:
        with http.stream("POST", "/v1/chat/completions",
                         json={**body, "stream_options": {"include_usage": True}}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = response.read().decode().split("\n\n")
        plain = http.post("/v1/chat/completions", json=body).text
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])  # present and null until the last chunk, as OpenAI sends
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    (finish,) = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    assert '"usage"' not in plain.split("data: [DONE]")[0]  # without include_usage no chunk mentions usage


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL, messages=USER, max_tokens=8, temperature=1.0, seed=1234, n=2,
                  extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # choice i uses seed + i


def test_logit_bias_and_stop_string(client):
    bias = {str(HELLO): 100}
    forced = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, logit_bias=bias, **GREEDY)
    assert forced.choices[0].message.content == " hello" * 4
    stopped = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, logit_bias=bias,
                                             stop=["lo h", "never"], **GREEDY)
    assert stopped.choices[0].message.content == " hel" and stopped.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, logit_bias=bias, stop="lo h",
                                            stream=True, **GREEDY)
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.delta.content or "" for c in chunks) == " hel"
    assert chunks[-1].finish_reason == "stop"


def test_max_completion_tokens_wins_over_max_tokens(client):
    resp = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=9, max_completion_tokens=3, **GREEDY)
    assert resp.usage.completion_tokens == 3


def test_chat_top_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, logprobs=True, top_logprobs=4,
                                          **GREEDY)
    for entry in resp.choices[0].logprobs.content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy: the chosen token is the top one
        assert entry.bytes == list(entry.token.encode())


def test_completions_prompt_forms_and_choice_indices(client, server):
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, **GREEDY)
    assert text.object == "text_completion" and text.usage.completion_tokens == 3
    ids = prompt_len(server, prompt="Once upon a time")
    assert text.usage.prompt_tokens == ids
    tokens = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], n=2, max_tokens=2, **GREEDY)
    assert [c.index for c in tokens.choices] == [0, 1, 2, 3]
    assert tokens.usage.prompt_tokens == 5 and tokens.usage.completion_tokens == 8
    single = client.completions.create(model=MODEL, prompt=[4, 5], max_tokens=2, **GREEDY)
    assert single.choices[0].text == tokens.choices[2].text  # prompt 1, sample 0


def test_quantized_server_matches_the_offline_engine(request, qwen3_tok_ckpt):
    """int8 weights over the int8 KV cache (native kernels where the CPU has them), served: the same greedy text as
    the offline engine with the same options, stream or not."""
    from fabrik import LLM, SamplingParams

    options = ("--dtype", "bfloat16", "--quantization", "int8", "--kv-cache-dtype", "int8")
    server = shared_server(request, "int8-kv", qwen3_tok_ckpt, *RANDOM_SERVER_ARGS, *options)
    client = server.openai()
    prompts = [[5, 9, 200, 7, 31] * 6, [1000, 20, 3]]
    served = [client.completions.create(model=MODEL, prompt=p, max_tokens=12, **GREEDY).choices[0].text
              for p in prompts]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=12, stream=True, **GREEDY))
    llm = LLM(str(qwen3_tok_ckpt), dtype="bfloat16", quantization="int8", kv_cache_dtype="int8",
              max_model_len=256, kv_cache_memory_bytes=8 * 2**20)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # One at a time, as the server ran them (a batch sums in another order: docs/kernels.md).
    offline = [llm.generate([{"prompt_token_ids": p}], params)[0].outputs[0].text for p in prompts]
    assert served == offline and streamed == served[0]


def test_completions_stream_with_usage(client):
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_echo_logprobs_score_the_prompt(client, server):
    """lm-eval style: echo + logprobs + max_tokens=0 gives the prompt's logprobs, consistent with generation."""
    prompt = [785, 3974, 13876, 38835]
    step = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=2, temperature=0.0)
    next_id = step.choices[0].logprobs  # the greedy next token and its logprob
    with server.http() as http:
        token_id = http.post("/tokenize", json={"prompt": step.choices[0].text,
                                                "add_special_tokens": False}).json()["tokens"][0]
    scored = client.completions.create(model=MODEL, prompt=prompt + [token_id], max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert scored.usage.prompt_tokens == 5 and len(choice.logprobs.tokens) == 5
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(next_id.token_logprobs[0], abs=1e-4)
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert choice.text == "".join(choice.logprobs.tokens)
    echoed = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=2, echo=True, **GREEDY)
    assert echoed.choices[0].text.startswith("Hi there") and echoed.usage.completion_tokens == 2


def test_tokenize_detokenize_round_trip(server):
    with server.http() as http:
        tok = http.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
        assert tok == {"count": 2, "max_model_len": 256, "tokens": [14990, 1879], "token_strs": ["hello", " world"]}
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "hello world"}


def test_prompts_and_outputs_are_not_logged_by_default(client, server):
    secret = "my passport number is X1234567"
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": secret}], max_tokens=3,
                                          logit_bias={str(HELLO): 100}, **GREEDY)
    assert resp.choices[0].message.content == " hello" * 3
    log = server.output()
    assert "POST /v1/chat/completions" in log  # the access log is there, without bodies
    assert "passport" not in log and "hello hello" not in log


def test_health_and_metrics(server):
    with server.http() as http:
        assert http.get("/health").status_code == 200
    metrics = server.metrics()
    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count", "num_requests_running", "num_requests_waiting",
                 "num_requests_swapped", "kv_cache_usage_perc", "prefix_cache_hit_rate", "prompt_tokens_total",
                 "generation_tokens_total", "requests_aborted_total", "requests_rejected_total"):
        assert f"fabrik_{name}" in metrics, name
    assert metrics["fabrik_generation_tokens_total"] > 0


# -- the scripted model: exact reasoning and tool calls ------------------------------------------------------------
THINK = "I should check the weather."
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
SCRIPT_TEXT = f"<think>\n{THINK}\n</think>\n\nLet me look.\n<tool_call>\n{json.dumps(CALL)}\n</tool_call>"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def scripted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    from tokenizers import Tokenizer

    script = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json")).encode(
        SCRIPT_TEXT, add_special_tokens=False).ids
    path = make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"), script, QWEN3_EOS_IDS[0])
    # NOTE: the KV cache (32 KiB = 512 tokens) is smaller than the context (1024): requests without max_tokens
    # must still run, up to what the cache holds.
    server = shared_server(request, "scripted", path, "--max-model-len", "1024", "--kv-cache-memory", "32KiB",
                           "--served-model-name", "scripted")
    server.script_len = len(script)
    return server


def test_reasoning_split_without_tools(scripted):
    client = scripted.openai()
    resp = client.chat.completions.create(model="scripted", messages=USER)
    message = resp.choices[0].message
    assert message.reasoning_content == THINK
    assert message.content == f"Let me look.\n<tool_call>\n{json.dumps(CALL)}\n</tool_call>"
    assert message.tool_calls is None and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == scripted.script_len + 1  # the script and its eos

    chunks = [c.choices[0] for c in client.chat.completions.create(model="scripted", messages=USER, stream=True)]
    assert "".join(getattr(c.delta, "reasoning_content", None) or "" for c in chunks) == THINK
    assert "".join(c.delta.content or "" for c in chunks) == message.content
    assert chunks[-1].finish_reason == "stop"


def test_tool_calls(scripted):
    client = scripted.openai()
    resp = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice="auto")
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == THINK and choice.message.content == "Let me look.\n"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL["arguments"]

    chunks = [c.choices[0] for c in client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS,
                                                                   stream=True)]
    deltas = [tc for c in chunks for tc in (c.delta.tool_calls or [])]
    assert {d.index for d in deltas} == {0}
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == CALL["arguments"]
    assert "".join(c.delta.content or "" for c in chunks) == "Let me look.\n"
    assert chunks[-1].finish_reason == "tool_calls"

    # tool_choice "none": the model does not see the tools and the text is left as content.
    none = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"

    # The tool's result goes back in a later message.
    follow_up = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    with scripted.http() as http:
        prompt = http.post("/tokenize", json={"messages": follow_up, "tools": TOOLS}).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": prompt}).json()["prompt"]
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    again = client.chat.completions.create(model="scripted", messages=follow_up, tools=TOOLS)
    assert again.usage.prompt_tokens == len(prompt)


def test_enable_thinking_false(scripted):
    client = scripted.openai()
    with scripted.http() as http:
        body = {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}}
        prompt = http.post("/tokenize", json=body).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": prompt}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    resp = client.chat.completions.create(model="scripted", messages=USER,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.choices[0].finish_reason == "stop"


def test_scripted_stop_string_and_logprobs(scripted):
    client = scripted.openai()
    resp = client.chat.completions.create(model="scripted", messages=USER, stop=["look"], logprobs=True,
                                          top_logprobs=1)
    choice = resp.choices[0]
    assert choice.message.reasoning_content == THINK and choice.message.content == "Let me "
    assert choice.finish_reason == "stop"
    assert len(choice.logprobs.content) == resp.usage.completion_tokens
    assert all(math.isclose(e.logprob, 0.0, abs_tol=1e-3) for e in choice.logprobs.content)
