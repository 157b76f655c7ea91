"""Chat templates render exactly as transformers' apply_chat_template(..., tokenize=False)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabrik.tokenizer import ChatTemplateError, Tokenizer

ASSETS = Path(__file__).parent / "assets" / "qwen3-tokenizer"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — «°C» <units> & more",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {}}}

USER = {"role": "user", "content": "What's the weather in Zürich?"}
SYSTEM = {"role": "system", "content": "You are terse."}

CONVERSATIONS = {
    "plain_user": [USER],
    "system_multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
    "reasoning_content_in_history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "\nAdd them.\n"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Add again."},
    ],
    "think_tags_in_history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>Again.</think>6"},
    ],
    "reasoning_alias_and_null_fields": [
        {"role": "user", "content": "2+2?", "name": None},
        {"role": "assistant", "content": "4", "reasoning": "Add them.", "tool_calls": None},
    ],
    "tool_calls_dict_then_results": [
        SYSTEM,
        USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
                {"id": "c2", "type": "function", "function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
        {"role": "assistant", "content": "It is 21 °C at noon."},
        {"role": "user", "content": "Thanks"},
    ],
    "tool_calls_string_arguments": [
        USER,
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need the weather.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(ASSETS)


@pytest.fixture(scope="module")
def ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(ASSETS)


def _check(tok, ref, messages, *, tools=None, add_generation_prompt=True, **kwargs):
    expected = ref.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    got = tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, chat_template_kwargs=kwargs or None
    )
    assert got == expected, f"fabrik:\n{got!r}\ntransformers:\n{expected!r}"
    return got


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_qwen3_template_matches_transformers(tok, ref, name, add_generation_prompt, thinking, with_tools):
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    tools = [WEATHER_TOOL, TIME_TOOL] if with_tools else None
    _check(tok, ref, CONVERSATIONS[name], tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)


def test_qwen3_template_spot_checks(tok, ref):
    text = _check(tok, ref, [USER], enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    text = _check(tok, ref, [USER], tools=[WEATHER_TOOL])
    # tojson keeps non-ASCII and does not HTML-escape.
    assert '"description": "城市"' in text and "«°C» <units> & more" in text
    text = _check(tok, ref, CONVERSATIONS["tool_calls_dict_then_results"])
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in text


def test_messages_are_not_modified(tok):
    messages = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "x", "reasoning": "r"},
    ]
    before = json.dumps(messages)
    tok.apply_chat_template(messages)
    assert json.dumps(messages) == before


def _folder(tmp_path: Path, template: str | None, *, file: str | None = None) -> Path:
    """A tokenizer folder with the given template, in tokenizer_config.json or in `file`."""
    (tmp_path / "tokenizer.json").symlink_to((ASSETS / "tokenizer.json").resolve())
    config = json.loads((ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    if template is not None and file is None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if file == "chat_template.jinja":
        (tmp_path / file).write_text(template, encoding="utf-8")
    elif file == "chat_template.json":
        (tmp_path / file).write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    return tmp_path


FEATURES_TEMPLATE = (
    "{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token }}|"
    "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
    "{{ m | tojson }}{{ m | tojson(indent=2) }}{{ m.content | tojson(separators=(',', ':')) }}"
    "{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    "{% generation %}{{ dict(a=1) | tojson }}{% endgeneration %}"
    "{{ strftime_now('%Y') | length }}{{ extra }}"
    "{% if add_generation_prompt %}<gen>{% endif %}\n"
    "  {%- if true %}\n    lstrip+trim\n  {% endif %}\n"
)


def test_template_features_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _folder(tmp_path, FEATURES_TEMPLATE)
    ours, theirs = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [
        {"role": "user", "content": 'Grüße <b> & "quotes"'},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "ok", "reasoning_content": "r"},
        {"role": "user", "content": "last"},
    ]
    for add in (True, False):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=add, tokenize=False, extra="E")
        assert ours.apply_chat_template(messages, add_generation_prompt=add, chat_template_kwargs={"extra": "E"}) == (
            expected
        )


@pytest.mark.parametrize("file", ["chat_template.jinja", "chat_template.json"])
def test_template_files_override_config(tmp_path, file):
    folder = _folder(tmp_path, "FROM FILE {{ messages[0].content }}", file=file)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "FROM CONFIG"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_pretrained(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "FROM FILE x"


def test_missing_template_is_a_value_error(tmp_path):
    tok = Tokenizer.from_pretrained(_folder(tmp_path, None))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_raise_exception_becomes_value_error(tmp_path):
    template = (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('Conversation roles must be user/assistant, got ' + m.role) }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    tok = Tokenizer.from_pretrained(_folder(tmp_path, template))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(ValueError, match="^Conversation roles must be user/assistant, got system$"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_bad_inputs_are_value_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template_kwargs={"messages": []})
    with pytest.raises(ValueError, match="invalid chat template"):
        Tokenizer.from_pretrained(_folder(tmp_path, "{% if %}")).apply_chat_template([USER])


def test_template_runtime_error_is_value_error(tok):
    # Qwen3's template reads an assistant's content unconditionally; a null content is dropped, like transformers
    # does, and the template then fails on the missing key.
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
    with pytest.raises(ValueError, match="chat template failed.*content"):
        tok.apply_chat_template(messages)


def test_sandbox_blocks_python_internals(tmp_path):
    tok = Tokenizer.from_pretrained(_folder(tmp_path, "{{ messages.__class__.__mro__ }}{% set ns = namespace(_x=1) %}"))
    with pytest.raises(ValueError):
        tok.apply_chat_template([USER])
