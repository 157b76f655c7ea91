"""Chat templates: render a conversation to the prompt text, exactly as Hugging Face transformers does.

A Hugging Face chat template is a Jinja2 program shipped with the model. Its output is only correct if we render it
the way the model's authors did, which is transformers' `apply_chat_template(..., tokenize=False)`. So this module
copies transformers' rendering contract (5.x, `utils/chat_template_utils.py`):

- a sandboxed, immutable Jinja environment with `trim_blocks` and `lstrip_blocks`, and the `loopcontrols` extension;
- a `tojson` filter that is plain `json.dumps` (non-ASCII kept, no HTML escaping, `indent`/`separators` supported);
- the globals `raise_exception`, `strftime_now`, `namespace` and `dict`;
- the inputs: messages without their `None`-valued keys, reasoning aliased to `reasoning_content` and `thinking`,
  the special tokens (`bos_token`, `eos_token`, ...) as variables, then the caller's extra keyword arguments.

Templates are untrusted code from the model hub; the sandbox is what keeps them from reaching Python internals.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError"]

# Names under which a message's reasoning may arrive; templates read the first one (gpt-oss templates read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# Variables that the renderer itself sets; `chat_template_kwargs` may not replace them.
_RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (its `raise_exception`) or failed while rendering it.

    A `ValueError` so that callers (the server) can report it as a client error.
    """


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # NOTE: Jinja's built-in `tojson` HTML-escapes `<`, `>`, `&` and `'`; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """The `dict` global: builds dicts, but exposes no attributes of the `dict` type itself to the template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """The `namespace` global, refusing underscore-prefixed attributes (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes, got {name!r}"
            )


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` and renders its body unchanged.

    transformers uses the tag to mark assistant tokens for training masks; for inference it is a no-op, but templates
    that contain it must still parse.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"invalid chat template (line {e.lineno}): {e.message}") from e


def _plain(value: Any) -> Any:
    """A copy of `value` made only of JSON types, so the template can neither mutate nor escape through the inputs.

    Pydantic models and dataclasses become dicts; other objects become an inert `<TypeName>` placeholder, as in
    transformers.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_message(message: Any, index: int) -> dict[str, Any]:
    if callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
    # NOTE: OpenAI clients send `content: null` / `tool_calls: null`; templates handle a missing key but would
    # render "None" for a null one, so transformers drops them, and so do we.
    plain = _plain({k: v for k, v in message.items() if v is not None})
    reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


class ChatTemplate:
    """A model's chat template(s), compiled once and rendered per request.

    Args:
        template: The Jinja source, or a dict of named templates (`"default"`, `"tool_use"`, ...) as some models
            ship. With a dict, `"tool_use"` is used when tools are given and it exists, else `"default"`.
        special_tokens: The named special tokens (`{"eos_token": "<|im_end|>", ...}`) passed to the template.
    """

    def __init__(self, template: str | Mapping[str, str], special_tokens: Mapping[str, str]) -> None:
        if isinstance(template, str):
            self.templates = {"default": template}
        else:
            self.templates = dict(template)
        if not self.templates:
            raise ChatTemplateError("the chat template dict is empty")
        self.special_tokens = dict(special_tokens)

    def _select(self, has_tools: bool) -> str:
        if has_tools and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ChatTemplateError(
            f"the model has several chat templates ({sorted(self.templates)}) and none is named 'default'"
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render a conversation to prompt text.

        Args:
            messages: OpenAI-style messages (`role`, `content`, and optionally `reasoning_content`, `tool_calls`,
                `tool_call_id`, `name`, ...).
            tools: JSON-schema tool definitions (`{"type": "function", "function": {...}}`), or None.
            add_generation_prompt: Append the header that starts the assistant's reply.
            chat_template_kwargs: Extra template variables (e.g. `{"enable_thinking": False}`); they override the
                special tokens of the same name.

        Returns:
            The prompt text, identical to transformers' `apply_chat_template(..., tokenize=False)`.

        Raises:
            ChatTemplateError: (a `ValueError`) the conversation is empty or malformed, a tool is not a dict, a
                reserved variable is in `chat_template_kwargs`, or the template failed (`raise_exception` included).
        """
        if len(messages) == 0:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation (messages=[])")
        kwargs = dict(chat_template_kwargs or {})
        reserved = _RESERVED_VARIABLES.intersection(kwargs)
        if reserved:
            raise ChatTemplateError(f"chat_template_kwargs may not set {sorted(reserved)}")
        if tools is not None:
            for i, tool in enumerate(tools):
                if not isinstance(tool, Mapping):
                    raise ChatTemplateError(f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}")
        template = _compile(self._select(has_tools=tools is not None))
        try:
            return template.render(
                messages=[_prepare_message(m, i) for i, m in enumerate(messages)],
                tools=_plain(list(tools)) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **_plain(kwargs)},
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e.message or type(e).__name__}") from e
