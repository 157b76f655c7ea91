"""Bad requests get the right status and an OpenAI error body naming the parameter, never a 5xx; the server keeps
serving: a normal request right after each one succeeds."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from server_utils import ServerProcess, random_server

MODEL = "tiny-qwen3"
USER = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, qwen3_tok_ckpt: Path) -> ServerProcess:
    return random_server(request, qwen3_tok_ckpt)


@pytest.fixture(scope="module")
def http(server: ServerProcess):
    with server.http() as client:
        yield client


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert response.headers["x-should-retry"] == "false"
    return body["error"]


def assert_still_serving(http: httpx.Client) -> None:
    ok = http.post(CHAT, json=chat(max_tokens=1))
    assert ok.status_code == 200, ok.text


BAD_JSON_BODIES = {
    "malformed json": b'{"model": "tiny-qwen3", "messages": [',
    "invalid utf-8": b'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
    "temperature NaN": b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
    "not an object": b'[1, 2, 3]',
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "nested too deeply": b'{"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", '
                         b'"function": {"name": "f", "parameters": ' + b'{"a": ' * 900 + b'{}' + b'}' * 900
                         + b'}}]}',
}
BAD_JSON_PARAMS = {"malformed json": None, "invalid utf-8": None, "temperature NaN": "temperature",
                   "not an object": None, "lone surrogate": "messages", "nested too deeply": None}


@pytest.mark.parametrize("case", list(BAD_JSON_BODIES))
def test_unparseable_bodies(http, case):
    response = http.post(CHAT, content=BAD_JSON_BODIES[case], headers={"content-type": "application/json"})
    assert_error(response, 400, BAD_JSON_PARAMS[case])
    assert_still_serving(http)


CHAT_CASES = [
    ("wrong type: messages", {"messages": "hello"}, "messages"),
    ("wrong type: temperature", {"temperature": "hot"}, "temperature"),
    ("negative temperature", {"temperature": -0.5}, "temperature"),
    ("top_p above 1", {"top_p": 1.5}, "top_p"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"max_tokens": -3}, "max_tokens"),
    ("max_tokens a string", {"max_tokens": "5"}, "max_tokens"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("n a million", {"n": 10**6}, "n"),
    ("10,000 stop strings", {"stop": [f"s{i}" for i in range(10_000)]}, "stop"),
    ("a huge stop string", {"stop": "x" * 100_000}, "stop"),
    ("top_logprobs 1000", {"logprobs": True, "top_logprobs": 1000}, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("logit_bias out of vocabulary", {"logit_bias": {"151936": 5}}, "logit_bias"),
    ("logit_bias negative id", {"logit_bias": {"-1": 5}}, "logit_bias"),
    ("logit_bias not an id", {"logit_bias": {"hello": 5}}, "logit_bias"),
    ("logit_bias too strong", {"logit_bias": {"5": 1000}}, "logit_bias"),
    ("too many logit_bias entries", {"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"),
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ("chat_template in chat_template_kwargs", {"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}},
     "chat_template_kwargs"),
    ("chat_template at the top level", {"chat_template": "{{ 7 * 7 }}"}, "chat_template"),
    ("enable_thinking not a bool", {"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs"),
    ("tool_choice required", {"tool_choice": "required"}, "tool_choice"),
    ("response_format json_schema", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("presence_penalty out of range", {"presence_penalty": 5}, "presence_penalty"),
    ("seed a float", {"seed": 1.5}, "seed"),
    ("stop_token_ids out of vocabulary", {"stop_token_ids": [10**9]}, "stop_token_ids"),
    ("min_tokens above max_tokens", {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
]


@pytest.mark.parametrize("name,fields,param", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_requests(http, name, fields, param):
    assert_error(http.post(CHAT, json=chat(**fields)), 400, param)
    assert_still_serving(http)


COMPLETION_CASES = [
    ("max_tokens negative", {"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ("empty prompt list", {"prompt": []}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("token id out of range", {"prompt": [1, 151936]}, "prompt"),
    ("mixed prompt list", {"prompt": ["a", 1]}, "prompt"),
    ("logprobs 1000", {"prompt": "Hi", "logprobs": 1000}, "logprobs"),
    ("suffix", {"prompt": "Hi", "suffix": "end"}, "suffix"),
    ("too many prompts", {"prompt": ["Hi"] * 1000}, "prompt"),
    ("more prompts than may wait", {"prompt": ["Hi"] * 5}, "prompt"),
]


@pytest.mark.parametrize("name,fields,param", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_bad_completion_requests(http, name, fields, param):
    assert_error(http.post(COMPLETIONS, json={"model": MODEL, **fields}), 400, param)
    assert_still_serving(http)


def test_huge_max_tokens_is_context_length_exceeded(http):
    error = assert_error(http.post(CHAT, json=chat(max_tokens=2**63)), 400, "messages", "context_length_exceeded")
    assert "256" in error["message"] and str(2**63) in error["message"]
    assert_still_serving(http)


def test_context_overflow_reports_the_real_numbers(http):
    messages = [{"role": "user", "content": "hello " * 300}]
    num_prompt = http.post("/tokenize", json={"messages": messages}).json()["count"]
    error = assert_error(http.post(CHAT, json=chat(messages=messages, max_tokens=None)), 400, "messages",
                         "context_length_exceeded")
    assert "256" in error["message"] and str(num_prompt) in error["message"]
    error = assert_error(http.post(COMPLETIONS, json={"model": MODEL, "prompt": "hi " * 250, "max_tokens": 10}),
                         400, "prompt", "context_length_exceeded")
    assert "256" in error["message"] and "10 in the completion" in error["message"]
    assert_still_serving(http)


def test_unknown_model_is_404(http):
    for path, body in ((CHAT, chat(model="gpt-5")), (COMPLETIONS, {"model": "gpt-5", "prompt": "Hi"})):
        assert_error(http.post(path, json=body), 404, "model", "model_not_found")
    assert_error(http.get("/v1/models/gpt-5"), 404, "model", "model_not_found")
    assert_still_serving(http)


def test_body_over_the_limit_is_413(http):
    body = b'{"messages": "' + b"x" * (50 * 2**20) + b'"}'
    assert_error(http.post(CHAT, content=body, headers={"content-type": "application/json"}), 413)
    assert_still_serving(http)


ROUTES = [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("GET", "/metrics"), ("POST", CHAT),
          ("POST", COMPLETIONS), ("POST", "/tokenize"), ("POST", "/detokenize")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_api_key_required_on_every_route_but_health(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {server.api_key}"}):
        response = httpx.request(method, server.url + path, headers=headers, json={"prompt": "Hi"}, timeout=30)
        assert_error(response, 401, None, "invalid_api_key")
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_openai_client_raises_without_retrying(server):
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=USER)
