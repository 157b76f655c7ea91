"""The tokenizer: a Hugging Face `tokenizers` backend plus the model's special tokens and chat template.

Loads a Hugging Face model folder without transformers, and gives the same ids, text and prompts as transformers'
fast tokenizer (`TokenizersBackend` in 5.x) for the same folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from fabrik.tokenizer.bounded import TokenLimitExceeded, check_within
from fabrik.tokenizer.chat_template import ChatTemplate, ChatTemplateError
from fabrik.tokenizer.content import AddedTokenPattern, ContentGuard

__all__ = ["ChatPrompt", "Tokenizer", "TokenLimitExceeded"]

# The named special tokens that transformers passes to chat templates, in its order.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or an `AddedToken` dict with `content`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}: expected a string or a dict with 'content'")


def _load_chat_template(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """Find the chat template the way transformers 5 does: files saved beside the config win over the config.

    Sources, later ones overriding earlier: `tokenizer_config.json["chat_template"]` (a string, or a list of
    `{"name", "template"}`), `chat_template.json` (`{"chat_template": ...}`, the processor format),
    `chat_template.jinja` (the default template) and `additional_chat_templates/*.jinja` (named ones).
    """
    templates: dict[str, str] = {}
    sources: list[Any] = [config.get("chat_template")]
    if (folder / "chat_template.json").is_file():
        sources.append(_read_json(folder / "chat_template.json").get("chat_template"))
    for source in sources:
        if isinstance(source, str):
            templates = {"default": source}
        elif isinstance(source, list):
            templates = {t["name"]: t["template"] for t in source}
    file_templates: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        file_templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            file_templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if file_templates:
        templates = file_templates
    if not templates:
        return None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


# AddedToken flags that change how text is split into tokens.
_MATCHING_FLAGS = ("content", "single_word", "lstrip", "rstrip", "normalized")


def _load_backend(
    tokenizer_file: Path, config: Mapping[str, Any], special_tokens: Mapping[str, str]
) -> tuple[BackendTokenizer, frozenset[int]]:
    """Load tokenizer.json with the added tokens that tokenizer_config.json declares, as transformers does.

    The config's `added_tokens_decoder` wins over tokenizer.json's `added_tokens` (e.g. the Qwen3 files here mark
    `<think>` and `<tool_call>` special in tokenizer.json only, and transformers keeps them in
    `decode(skip_special_tokens=True)`), and the named and additional special tokens are always special. Special
    tokens missing from the vocabulary get new ids.

    Returns:
        The backend, and the ids that `skip_special_tokens` drops.
    """
    backend = BackendTokenizer.from_file(str(tokenizer_file))
    current = backend.get_added_tokens_decoder()
    declared: dict[int, dict[str, Any]] = {}
    for key, token in config.get("added_tokens_decoder", {}).items():
        special = bool(token.get("special", False))
        defaults = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": not special}
        declared[int(key)] = {**defaults, **{k: token[k] for k in _MATCHING_FLAGS if k in token}, "special": special}
    stale = [
        i
        for i, fields in declared.items()
        if i not in current or any(getattr(current[i], k) != fields[k] for k in _MATCHING_FLAGS)
    ]
    if stale:
        # Rare (hand-edited folders): patch the JSON and load it again, since the backend cannot re-flag a token.
        data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        by_id = {t["id"]: t for t in data["added_tokens"]}
        for token_id in stale:
            by_id.setdefault(token_id, {"id": token_id}).update(declared[token_id])
        data["added_tokens"] = sorted(by_id.values(), key=lambda t: t["id"])
        backend = BackendTokenizer.from_str(json.dumps(data))
    # NOTE: the special flag only matters to decode, so it is applied there (by filtering ids) instead of by
    # rebuilding the backend; re-adding a token updates its flag but not the set the backend's decode skips.
    special = {i for i, token in current.items() if token.special}
    special.difference_update(i for i, fields in declared.items() if not fields["special"])
    special.update(i for i, fields in declared.items() if fields["special"])
    always_special = set(special_tokens.values())
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, list):
            always_special.update(c for t in extra if (c := _token_content(t)) is not None)
    missing = [c for c in sorted(always_special) if backend.token_to_id(c) is None]
    if missing:
        backend.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in missing])
    special.update(backend.token_to_id(c) for c in always_special)
    return backend, frozenset(special)


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered by the chat template, and its token ids."""

    text: str
    """The prompt text (as the template wrote it, the client's strings included)."""
    token_ids: list[int]
    """Its ids, control tokens only where the template wrote them (unless the caller allowed them in content)."""


def _without_added_tokens(backend: BackendTokenizer) -> BackendTokenizer:
    """A copy of ``backend`` that matches no added tokens: text in, the ids of its characters out."""
    data = json.loads(backend.to_str())
    data["added_tokens"] = []
    plain = BackendTokenizer.from_str(json.dumps(data))
    plain.no_truncation()
    plain.no_padding()
    return plain


class Tokenizer:
    """Text <-> token ids, and conversations -> prompt text, for one model.

    Attributes:
        vocab_size: Number of ids the tokenizer knows, added tokens included (may be less than the model's
            embedding rows, which are often padded).
        eos_token_id: Id of `eos_token` from tokenizer_config.json, or None.
        bos_token_id: Id of `bos_token`, or None (Qwen has none).
        pad_token_id: Id of `pad_token`, or None.
        all_special_ids: Ids that `decode(..., skip_special_tokens=True)` drops: the added tokens marked special,
            plus the named special tokens.
        special_tokens: The named special tokens that are set, e.g. `{"eos_token": "<|im_end|>", ...}`.
        chat_template: The model's chat template, or None if it has none.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str],
        special_ids: Iterable[int] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`; most callers want `from_pretrained` instead.

        Args:
            backend: The tokenizer, already configured (post-processor, special-token splitting).
            special_tokens: Named special tokens (`bos_token`, `eos_token`, ...) that are set.
            special_ids: Ids that `skip_special_tokens` drops; by default the backend's special added tokens.
            chat_template: Jinja source, or named templates, or None.
        """
        self._backend = backend
        self._backend.no_truncation()
        self._backend.no_padding()
        self.special_tokens = dict(special_tokens)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._named_token_id("eos_token")
        self.bos_token_id = self._named_token_id("bos_token")
        self.pad_token_id = self._named_token_id("pad_token")
        if special_ids is None:
            special_ids = (i for i, token in backend.get_added_tokens_decoder().items() if token.special)
        named_ids = (self._named_token_id(name) for name in self.special_tokens)
        self.all_special_ids: frozenset[int] = frozenset(special_ids).union(named_ids)
        self.chat_template = None if chat_template is None else ChatTemplate(chat_template, self.special_tokens)
        added = backend.get_added_tokens_decoder()
        self.content_guard = ContentGuard(
            AddedTokenPattern(t.content, i, t.lstrip, t.rstrip, t.single_word) for i, t in added.items())
        self._plain_backend = _without_added_tokens(backend) if self.chat_template is not None else None

    def _named_token_id(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        if content is None:
            return None
        token_id = self._backend.token_to_id(content)
        if token_id is None:
            raise ValueError(f"{name} {content!r} from tokenizer_config.json is not in the vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face model folder: `tokenizer.json`, `tokenizer_config.json` and chat template files.

        Args:
            path: The folder (a local path; nothing is downloaded).

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: `tokenizer.json` is missing (slow-tokenizer-only folders are not supported).
            ValueError: a special token in the config is not in the vocabulary.
        """
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(folder)!r}")
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        legacy_map = folder / "special_tokens_map.json"
        named = dict(_read_json(legacy_map)) if legacy_map.is_file() else {}
        named.update({k: config[k] for k in _SPECIAL_TOKEN_NAMES if k in config})
        special_tokens = {
            name: content
            for name in _SPECIAL_TOKEN_NAMES
            if (content := _token_content(named.get(name))) is not None
        }
        backend, special_ids = _load_backend(tokenizer_file, config, special_tokens)
        # NOTE: tokenizer.json's post-processor decides BOS/EOS; transformers also ignores the config's
        # add_bos_token/add_eos_token when tokenizer.json exists.
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        return cls(
            backend,
            special_tokens=special_tokens,
            special_ids=special_ids,
            chat_template=_load_chat_template(folder, config),
        )

    def encode(self, text: str, add_special_tokens: bool = True, *, limit: int | None = None) -> list[int]:
        """Token ids of `text`, as transformers' `tokenizer(text)["input_ids"]`.

        Args:
            text: The text; special tokens written in it (e.g. `<|im_start|>`) become their ids.
            add_special_tokens: Add the model's BOS/EOS if its post-processor does.
            limit: Most tokens allowed; a longer text raises as soon as that is certain (see `bounded.py`).

        Raises:
            TokenLimitExceeded: (a `ValueError`) the text has more than `limit` tokens.
        """
        if limit is not None:
            check_within(self._backend, [text], limit)
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        if limit is not None and len(encoding) > limit:
            raise TokenLimitExceeded(len(encoding), limit, exact=True)
        return encoding.ids

    def encode_chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        limit: int | None = None,
        special_tokens_in_content: bool = False,
    ) -> ChatPrompt:
        """Render a conversation with the chat template and encode it.

        Args:
            messages, tools, add_generation_prompt, chat_template_kwargs: As for `apply_chat_template`.
            limit: Most tokens allowed (see `encode`).
            special_tokens_in_content: Let special-token strings in the messages and tools become control tokens (for
                trusted callers); by default they are text (`content.py`), as OpenAI does.

        Raises:
            ValueError: the template refused the conversation, or it has more than `limit` tokens.
        """
        if special_tokens_in_content or self._plain_backend is None:
            text = self.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                            chat_template_kwargs=chat_template_kwargs)
            return ChatPrompt(text, self.encode(text, add_special_tokens=False, limit=limit))
        guarded = self.content_guard.protect({"messages": messages, "tools": tools})
        rendered = self.apply_chat_template(
            guarded.value["messages"], tools=guarded.value["tools"], add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs)
        pieces = self.content_guard.split(rendered, guarded.originals)
        texts = [p for p in pieces if isinstance(p, str)]
        if limit is not None:
            check_within(self._plain_backend, texts, limit, counted=len(pieces) - len(texts))
        encoded = iter(self._plain_backend.encode_batch(texts, add_special_tokens=False))
        ids: list[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(next(encoded).ids)
        if limit is not None and len(ids) > limit:
            raise TokenLimitExceeded(len(ids), limit, exact=True)
        return ChatPrompt(self.content_guard.restore(rendered, guarded.originals), ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`, as transformers' `decode`; invalid or incomplete UTF-8 becomes U+FFFD.

        Args:
            token_ids: The ids.
            skip_special_tokens: Leave out the tokens in `all_special_ids`.
        """
        if skip_special_tokens:
            special = self.all_special_ids
            token_ids = [i for i in token_ids if i not in special]
        return self._backend.decode(list(token_ids), skip_special_tokens=False)

    def token_to_text(self, token_id: int) -> str:
        """Display text of one token (for logprobs): `decode([token_id])`, special tokens kept.

        A token holding only part of a multi-byte character shows as U+FFFD.
        """
        return self._backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> str:
        """Render a conversation to prompt text with the model's chat template.

        Same text as transformers' `tokenizer.apply_chat_template(messages, tools=tools,
        add_generation_prompt=add_generation_prompt, tokenize=False, **chat_template_kwargs)`.

        Args:
            messages: OpenAI-style messages.
            tools: JSON-schema tool definitions, or None.
            add_generation_prompt: Append the header that starts the assistant's reply.
            chat_template_kwargs: Extra template variables, e.g. `{"enable_thinking": False}`.

        Raises:
            ValueError: the model has no chat template, or the template rejected the conversation (see
                `ChatTemplate.render`).
        """
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template (none in tokenizer_config.json, chat_template.jinja or "
                "chat_template.json); use the completions API with a raw prompt instead"
            )
        return self.chat_template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
        )

