"""Cut OpenAI's OpenAPI spec down to the operations fabrik serves, for tests/test_server_schemathesis.py.

The whole spec is 3 MB of YAML and describes ~200 operations; the test needs four. This keeps those operations and
every component schema they reach through ``$ref`` (nothing else), so the subset is the same spec for them, not an
edited one. Dates that YAML reads as ``datetime.date`` (in examples) are written back as ISO strings, so the output is
plain JSON.

    python tools/openai_spec_subset.py ../shared/openai-openapi/openapi.yaml tests/assets/openai-openapi/openapi.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import yaml

OPERATIONS = {
    "/chat/completions": ("post",),
    "/completions": ("post",),
    "/models": ("get",),
    "/models/{model}": ("get",),
}
"""The paths (under the spec's server, ``https://api.openai.com/v1``) and methods fabrik implements."""
EXTRA_SCHEMAS = ("ErrorResponse",)
"""Kept though no operation names them: the shape of every error body (the spec leaves error responses empty)."""

_REF_PREFIX = "#/components/"


def _refs(node: Any) -> set[str]:
    """Every ``$ref`` target under ``node``, e.g. ``"#/components/schemas/Model"``."""
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*map(_refs, node)) if node else set()
    return set()


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, (datetime.date, datetime.datetime)):
        return node.isoformat()
    return node


def subset(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with only ``OPERATIONS`` and the components they refer to (transitively)."""
    paths = {path: {method: spec["paths"][path][method] for method in methods}
             for path, methods in OPERATIONS.items()}
    components: dict[str, dict[str, Any]] = {}
    pending = _refs(paths) | {f"{_REF_PREFIX}schemas/{name}" for name in EXTRA_SCHEMAS}
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        if not ref.startswith(_REF_PREFIX):
            raise ValueError(f"unexpected $ref {ref!r}: only local component references are followed")
        kind, name = ref[len(_REF_PREFIX):].split("/", 1)
        target = spec["components"][kind][name]
        components.setdefault(kind, {})[name] = target
        pending |= _refs(target)
    # The security schemes are named by the top-level `security`, not by $ref.
    components["securitySchemes"] = spec["components"]["securitySchemes"]
    out = {key: spec[key] for key in ("openapi", "info", "servers", "security") if key in spec}
    out["paths"] = paths
    out["components"] = {kind: dict(sorted(items.items())) for kind, items in sorted(components.items())}
    return _plain(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="OpenAI's openapi.yaml")
    parser.add_argument("out", type=Path, help="where to write the subset (JSON)")
    args = parser.parse_args()
    spec = yaml.load(args.spec.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(subset(spec), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
