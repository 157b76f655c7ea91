"""Checks every request shares before any handler reads it: its strings must be text that UTF-8 can carry.

JSON escapes can spell a lone surrogate (``"\\ud800"``), which Python decodes into a ``str`` that cannot be encoded
again: tokenizing, logging or echoing it would fail deep inside the server. Such a string is refused up front with a
400 naming the field that holds it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fabrik.server.errors import bad_request

__all__ = ["check_unicode"]


def _bad_offset(text: str) -> int | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _find(value: Any, path: str) -> tuple[str, int, int] | None:
    """(path, offset, code point) of the first string in ``value`` that is not valid Unicode, or None."""
    if isinstance(value, str):
        offset = _bad_offset(value)
        return None if offset is None else (path, offset, ord(value[offset]))
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            found = _find(getattr(value, name), f"{path}.{name}" if path else name)
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find(key, path) or _find(item, f"{path}.{key}" if _bad_offset(str(key)) is None else path)
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _find(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def check_unicode(request: BaseModel) -> None:
    """Raise a 400 naming the field if any string of ``request`` (dict keys included) holds a lone surrogate."""
    found = _find(request, "")
    if found is not None:
        path, offset, code = found
        raise bad_request(f"{path} contains an unpaired surrogate (\\u{code:04x}) at character {offset}; strings "
                          f"must be valid Unicode", path.split(".")[0].split("[")[0] or None)
