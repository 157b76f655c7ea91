"""Schemathesis against a real ``fabrik serve``, with requests generated from OpenAI's own OpenAPI spec.

The spec is ``tests/assets/openai-openapi/openapi.json``: the operations fabrik implements, cut out of OpenAI's
published spec by ``tools/openai_spec_subset.py``. Every generated request is schema-valid (schemathesis' positive
mode), and for each one:

- the answer is never a 5xx;
- a 2xx matches the spec's response schema (schemathesis' ``response_schema_conformance`` and
  ``content_type_conformance``; a stream event by event);
- a 4xx is an error in OpenAI's shape (the spec's ``ErrorResponse``), and only for a reason ``docs/serving.md``
  lists as unsupported or as a limit: ``REFUSALS`` maps each one to the request that earns it, and any other 4xx
  fails the test.

Values that name things of OpenAI's world (a model id, token ids of OpenAI's tokenizers) are mapped onto the served
model's in most cases, as a client of fabrik would send them, so that the requests get past the first check
(likewise ``stream_options`` only with ``stream``, ``best_of`` equal to ``n``); one case in ``RAW_EVERY`` is sent as
generated and must then be refused for the documented reason. What costs time is capped the same way in every case
(``max_tokens``, ``n``): the spec allows a 128-choice request to generate to the end of the context, which would
test the engine's speed, not the server.

The server runs with one OpenMP thread (see ``server``), and the whole run takes ~2.5 minutes on a loaded 2-core
machine; ``-s`` prints how many cases ended how, per operation.
"""

from __future__ import annotations

import copy
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from checkpoints import QWEN3_VOCAB_SIZE
from server_utils import ServerProcess, shared_server

SPEC = Path(__file__).parent / "assets" / "openai-openapi" / "openapi.json"
MODEL = "tiny-qwen3"
MAX_MODEL_LEN = 512
MAX_TOKENS = 4
"""Largest max_tokens sent (a bigger one is brought down to 1..MAX_TOKENS unless it exceeds the context)."""
MAX_N = 3
"""Largest n sent (a bigger one is brought down to 1..MAX_N)."""
MAX_STREAM_EVENTS = 10_000
"""Events schemathesis reads from a stream (at most 64 prompts x MAX_TOKENS, and a usage chunk, are sent)."""
RAW_EVERY = 8
"""One case in this many keeps the generated model id, token ids and logit_bias as they are."""

CASES = {
    "POST /chat/completions": 1200,
    "POST /completions": 1400,
    "GET /models": 5,
    "GET /models/{model}": 300,
}
"""Cases per operation (GET /models has no parameters: a few cases are all there is)."""

SERVER_ARGS = ("--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "16MiB", "--served-model-name", MODEL)


# -- the spec ---------------------------------------------------------------------------------------------------
def _events_of(ref: str) -> dict[str, Any]:
    """An SSE media type whose events carry ``ref`` as JSON, then ``[DONE]``."""
    data = {"if": {"const": "[DONE]"}, "else": {"contentMediaType": "application/json", "contentSchema": {"$ref": ref}}}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def load_spec() -> dict[str, Any]:
    """The vendored subset of OpenAI's spec, with streams spelled out and corrected where OpenAI's API answers
    otherwise.

    NOTE: the spec gives a stream's chunk as the ``text/event-stream`` schema, which Open API 3.1 (and schemathesis)
    reads as the schema of each SSE event, not of its ``data``: the events are described here as JSON ``data`` of that
    schema, or ``[DONE]``. And /v1/completions gets two corrections, both what OpenAI's API does (and clients expect):
    - with ``echo`` and ``logprobs`` the prompt's first token has a null logprob and null top logprobs (nothing
      predicts it), where the spec's arrays allow numbers and objects only;
    - the answer streams as chunks shaped like the JSON answer, with ``finish_reason`` null until a choice ends and
      ``usage`` null but in the last chunk (as chat's chunks have), where the spec documents the JSON answer only.
    """
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    schemas = spec["components"]["schemas"]
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]
    logprobs = next(s for s in choice["properties"]["logprobs"]["anyOf"] if s.get("type") == "object")
    for name in ("token_logprobs", "top_logprobs"):
        logprobs["properties"][name]["items"] = {"anyOf": [logprobs["properties"][name]["items"], {"type": "null"}]}
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    chunk_choice = chunk["properties"]["choices"]["items"]["properties"]
    chunk_choice["finish_reason"] = {"anyOf": [chunk_choice["finish_reason"], {"type": "null"}]}
    chunk["properties"]["usage"] = {"anyOf": [chunk["properties"]["usage"], {"type": "null"}]}
    schemas["CreateCompletionStreamResponse"] = chunk
    streams = {"/chat/completions": "CreateChatCompletionStreamResponse",
               "/completions": "CreateCompletionStreamResponse"}
    for path, name in streams.items():
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = _events_of(f"#/components/schemas/{name}")
    return spec


def error_validator(spec: dict[str, Any]) -> jsonschema_rs.Validator:
    schemas = spec["components"]["schemas"]
    error_response = copy.deepcopy(schemas["ErrorResponse"])
    error_response["properties"]["error"] = schemas["Error"]
    return jsonschema_rs.validator_for(error_response)


# -- making generated requests realistic --------------------------------------------------------------------------
def _token_id(value: int) -> int:
    return value % QWEN3_VOCAB_SIZE


def _token_key(key: str) -> str:
    return str(zlib.crc32(key.encode("utf-8", "surrogatepass")) % QWEN3_VOCAB_SIZE)


def _capped(value: Any, cap: int) -> Any:
    """``value`` brought into 1..cap when it is a bigger integer that still fits the context (kept otherwise), of
    the same type (``88.0`` is an integer too)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and cap < value < MAX_MODEL_LEN \
            and float(value).is_integer():
        return type(value)(1 + int(value) % cap)
    return value


def is_raw(case: schemathesis.Case) -> bool:
    """Whether ``case`` is one of the one in ``RAW_EVERY`` sent as generated: a hash of the case, so the same case
    is treated the same way every time (hypothesis replays cases while shrinking)."""
    data = json.dumps([case.path_parameters, case.body], sort_keys=True, default=repr)
    return zlib.crc32(data.encode("utf-8", "surrogatepass")) % RAW_EVERY == 0


def realistic(operation: str, case: schemathesis.Case) -> None:
    """Edit ``case`` in place as described in the module docstring; the body stays schema-valid."""
    raw = is_raw(case)
    if operation == "GET /models/{model}":
        if not raw:
            case.path_parameters["model"] = MODEL
        return
    body = case.body
    if not isinstance(body, dict):
        return
    if "n" in body:
        body["n"] = _capped(body["n"], MAX_N)
    if not raw:
        body["model"] = MODEL
        if isinstance(body.get("logit_bias"), dict):
            body["logit_bias"] = {_token_key(k): max(-100, min(100, v)) for k, v in body["logit_bias"].items()}
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            body["prompt"] = [_token_id(t) for t in prompt]
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            body["prompt"] = [[_token_id(t) for t in p] for p in prompt]
        if body.get("stream_options") is not None and body.get("stream") is not True:
            del body["stream_options"]  # only allowed with stream: refused in raw cases
        if body.get("best_of") is not None:
            body["best_of"] = body.get("n") or 1  # fabrik samples n, not best_of: refused in raw cases
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body:
            body[name] = _capped(body[name], MAX_TOKENS)
    if operation == "POST /chat/completions" and body.get("max_completion_tokens") is None \
            and body.get("max_tokens") is None:
        body["max_completion_tokens"] = MAX_TOKENS
    if operation == "POST /completions" and body.get("max_tokens") is None:
        body["max_tokens"] = MAX_TOKENS


# -- documented refusals ------------------------------------------------------------------------------------------
# docs/serving.md's table of what fabrik refuses, as (request body, error) -> whether this request earns this error.
# Each returns False unless the body really holds what the error is about, so a refusal for any other reason fails.
Body = dict[str, Any]
Error = dict[str, Any]

_ACCEPTED_VALUES: dict[str, Callable[[Any], bool]] = {
    "store": lambda v: v is False,
    "service_tier": lambda v: v in ("auto", "default"),
    "modalities": lambda v: all(m == "text" for m in v),
    "verbosity": lambda v: v == "medium",
    "prompt_cache_retention": lambda v: v == "in_memory",
    "prompt_cache_options": lambda v: v.get("mode", "implicit") == "implicit" and v.get("ttl", "30m") == "30m",
    "tool_choice": lambda v: v in ("auto", "none"),
    "response_format": lambda v: v.get("type") == "text",
}
"""Chat fields fabrik honours only for some values (null always): the others are refused by name."""
_NEVER = ("reasoning_effort", "audio", "prediction", "web_search_options", "moderation", "functions", "function_call")
"""Chat fields fabrik refuses for any value but null."""
_TEXT_PARTS = {"text"}
_VOCAB = QWEN3_VOCAB_SIZE
_LIMITS = {"max_n": 16, "max_prompts": 64, "max_sequences": 64, "max_stop_length": 512}
"""fabrik serve's defaults (docs/serving.md, Server options)."""


def _refused_field(body: Body, error: Error) -> bool:
    name = error["param"]
    value = body.get(name)
    if value is None:
        return False
    if name in _NEVER:
        return True
    accepted = _ACCEPTED_VALUES.get(name)
    return accepted is not None and not accepted(value)


def unsupported_shapes(body: Body) -> list[str]:
    """Where ``body`` holds a shape fabrik's request models do not take: the deprecated ``function`` role, content
    parts other than text, custom tools and calls to them (as error paths: ``messages[2].content[0]``)."""
    found = []
    for i, message in enumerate(body.get("messages") or ()):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "function":
            found.append(f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):
            found += [f"messages[{i}].content[{j}]" for j, part in enumerate(content)
                      if not (isinstance(part, dict) and part.get("type") in _TEXT_PARTS)]
        for j, call in enumerate(message.get("tool_calls") or ()):
            if isinstance(call, dict) and call.get("type") != "function":
                found.append(f"messages[{i}].tool_calls[{j}]")
    found += [f"tools[{i}]" for i, tool in enumerate(body.get("tools") or ())
              if isinstance(tool, dict) and tool.get("type") != "function"]
    return found


def _within(path: str, shapes: list[str]) -> bool:
    return any(path == s or path.startswith((f"{s}.", f"{s}[")) or s.startswith((f"{path}.", f"{path}["))
               for s in shapes)


def _unsupported_shape(body: Body, error: Error) -> bool:
    """A validation error every one of whose locations (the message lists up to four) is an unsupported shape."""
    shapes = unsupported_shapes(body)
    paths = [item.split(": ", 1)[0] for item in error["message"].split("; ")]
    return bool(shapes) and all(_within(path, shapes) for path in paths)


def _max_tokens(body: Body) -> int | None:
    """The request's max_tokens as the server reads it (chat: max_completion_tokens wins; completions: 16)."""
    if "messages" in body:
        chosen = body.get("max_completion_tokens")
        return chosen if chosen is not None else body.get("max_tokens")
    return 16 if body.get("max_tokens") is None else body["max_tokens"]


_REQUESTED = re.compile(r"you requested (\d+) tokens \((\d+) in the \w+, (\d+) in the completion\)")
_RESULTED = re.compile(r"resulted in (?:at least )?(\d+) tokens")
_ENTRIES = re.compile(r"^(messages|prompt) has (\d+) entries")


def _context_length(body: Body, error: Error) -> bool:
    """context_length_exceeded, with numbers that do exceed the context (and the request's own max_tokens)."""
    if error["code"] != "context_length_exceeded":
        return False
    message = error["message"]
    if match := _REQUESTED.search(message):
        total, prompt, completion = map(int, match.groups())
        return total == prompt + completion > MAX_MODEL_LEN and completion == _max_tokens(body)
    if match := _RESULTED.search(message):
        return int(match.group(1)) >= MAX_MODEL_LEN
    if match := _ENTRIES.match(message):
        return int(match.group(2)) >= MAX_MODEL_LEN and len(body.get(match.group(1)) or ()) == int(match.group(2))
    return False


def _prompts(body: Body) -> list[Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and not isinstance(prompt[0], (str, list))):
        return [prompt]
    return list(prompt) if isinstance(prompt, list) else ["<|endoftext|>"]


def _token_ids(body: Body) -> list[Any]:
    return [t for p in _prompts(body) if isinstance(p, list) for t in p]


def _logit_bias_refused(body: Body, error: Error) -> bool:
    bias = body.get("logit_bias")
    if error["param"] != "logit_bias" or not isinstance(bias, dict):
        return False
    return any(not re.fullmatch(r"-?[0-9]{1,20}", k) or not 0 <= int(k) < _VOCAB or not -100 <= v <= 100
               for k, v in bias.items())


def _stop_strings(body: Body) -> list[str]:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or ())


def _over_limits(body: Body, error: Error) -> bool:
    """A server limit (``--max-n``, ``--max-prompts``, ``--max-sequences-per-request``, ``--max-stop-length``)."""
    n = body.get("n") or 1
    num_prompts = len(_prompts(body)) if "messages" not in body else 1
    return error["param"] in ("n", "prompt", "stop") and (
        n > _LIMITS["max_n"] or num_prompts > _LIMITS["max_prompts"] or n * num_prompts > _LIMITS["max_sequences"]
        or any(len(s) > _LIMITS["max_stop_length"] for s in _stop_strings(body)))


REFUSALS: dict[str, Callable[[Body, Error], bool]] = {
    "unknown model": lambda body, error: error["code"] == "model_not_found" and body.get("model") not in (None, MODEL),
    "context length": _context_length,
    "refused field": _refused_field,
    "unsupported shape (function role, non-text part, custom tool)": _unsupported_shape,
    "top_logprobs without logprobs": lambda body, error: (
        error["param"] == "top_logprobs" and body.get("top_logprobs") is not None and not body.get("logprobs")),
    "stream_options without stream": lambda body, error: (
        error["param"] == "stream_options" and body.get("stream_options") is not None
        and body.get("stream") is not True),
    "chat max_tokens below 1": lambda body, error: (
        error["param"] in ("max_tokens", "max_completion_tokens") and "messages" in body
        and body.get(error["param"]) is not None and body[error["param"]] < 1),
    "an empty stop string": lambda body, error: error["param"] == "stop" and "" in _stop_strings(body),
    "logit_bias not of this vocabulary or out of [-100, 100]": _logit_bias_refused,
    "best_of other than n": lambda body, error: (
        error["param"] == "best_of" and body.get("best_of") is not None and body["best_of"] != (body.get("n") or 1)),
    "suffix": lambda body, error: error["param"] == "suffix" and bool(body.get("suffix")),
    "an empty prompt": lambda body, error: error["param"] == "prompt" and (
        body.get("prompt") == [] or any(p in ("", []) for p in _prompts(body))),
    "token ids outside the vocabulary": lambda body, error: error["param"] == "prompt" and any(
        not 0 <= t < _VOCAB for t in _token_ids(body)),
    "server limits": _over_limits,
}


def refusal_reason(body: Body, error: Error) -> str | None:
    """The documented reason ``body`` was refused with ``error``, or None."""
    for reason, applies in REFUSALS.items():
        try:
            if applies(body, error):
                return reason
        except (TypeError, AttributeError, ValueError):  # a body shaped unlike what the rule reads
            continue
    return None


# -- the test -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, qwen3_tok_ckpt: Path) -> ServerProcess:
    # NOTE: one OpenMP thread: on a loaded 2-core machine a second one makes every engine step wait for a core
    # (measured: a 4-token chat took 0.75 s instead of 0.05 s while another test process ran).
    return shared_server(request, "schemathesis", qwen3_tok_ckpt, *SERVER_ARGS, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec()


def _header(response: schemathesis.Response, name: str) -> str:
    values = {k.lower(): v for k, v in response.headers.items()}.get(name, [""])
    return values[0]


def check_response(operation: str, case: schemathesis.Case, response: schemathesis.Response,
                   errors: jsonschema_rs.Validator) -> str:
    """The properties of the module docstring; returns what the case was: "ok" or the refusal's reason."""
    request = json.dumps(case.body if operation.startswith("POST") else case.path_parameters, default=repr)[:3000]
    where = f"{operation}\nrequest: {request}\nresponse {response.status_code}: {response.text[:3000]}"
    assert response.status_code < 500, f"a server error\n{where}"
    if response.status_code < 300:
        case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])
        if _header(response, "content-type").startswith("text/event-stream"):
            assert not response.stream_cut_short, f"more than {MAX_STREAM_EVENTS} events\n{where}"
            assert response.text.rstrip().endswith("data: [DONE]"), f"a stream without [DONE]\n{where}"
        return "ok"
    body = response.json()
    errors.validate(body)
    assert _header(response, "x-should-retry") == "false", where
    request_body = {"model": case.path_parameters["model"]} if operation == "GET /models/{model}" else case.body
    reason = refusal_reason(request_body, body["error"])
    assert reason is not None, f"a schema-valid request refused for a reason docs/serving.md does not list\n{where}"
    return reason


@pytest.mark.slow
@pytest.mark.parametrize("operation", list(CASES))
def test_openai_spec_requests_are_served_or_refused_as_documented(server, spec, operation):
    # NOTE: an explicit config: none discovered from the working directory, and whole streams read (default: 20 events).
    config = schemathesis.Config.from_dict({"max-stream-events": MAX_STREAM_EVENTS})
    schema = schemathesis.openapi.from_dict(spec, config=config)
    method, path = operation.split(" ")
    strategy = schema[path][method].as_strategy(schemathesis.GenerationMode.POSITIVE)
    errors = error_validator(spec)
    outcomes: Counter[str] = Counter()
    session = requests.Session()

    @settings(max_examples=CASES[operation], derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
              phases=[Phase.generate, Phase.shrink])
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        realistic(operation, case)
        response = case.call(base_url=server.base_url, session=session, headers=server.headers, timeout=60)
        outcomes[check_response(operation, case, response, errors)] += 1

    run()
    print(f"{operation}: {sum(outcomes.values())} cases: {dict(outcomes.most_common())}")
    assert outcomes["ok"] > 0
