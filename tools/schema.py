"""JSON schemas and argument validators built from a Python function's signature and docstring.

Supported parameter hints: str, int, float, bool, list / list[X], dict / dict[str, X], Optional[X] / X | None,
Literal[...], Any (or no hint). A parameter with a default is not required.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, create_model

from agentloop.errors import AgentloopError

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def type_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one type hint; `where` names the parameter in error messages."""
    if hint is Any:
        return {}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return type_schema(rest[0], where)
        return {"anyOf": [type_schema(a, where) for a in rest]}
    if origin is Literal:
        kinds = {_SCALARS.get(type(a)) for a in args}
        return ({"type": kinds.pop()} if len(kinds) == 1 and None not in kinds else {}) | {"enum": list(args)}
    if hint is list or origin is list:
        return {"type": "array"} | ({"items": type_schema(args[0], where)} if args else {})
    if hint is dict or origin is dict:
        return {"type": "object"}
    raise AgentloopError(f"{where} has unsupported type {hint!r}; use str, int, float, bool, list, dict, Optional "
                         "or Literal, or take one pydantic model")


def doc_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    """The docstring's first paragraph, and per-parameter text from a Google-style `Args:` section."""
    doc = inspect.getdoc(fn) or ""
    summary = " ".join(doc.split("\n\n")[0].split())
    params: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+\S.*\n?)+)", doc, re.MULTILINE)
    if section:
        current = None
        for line in section.group(1).splitlines():
            m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
            if m:
                current, params[m.group(1)] = m.group(1), m.group(2).strip()
            elif current:
                params[current] = f"{params[current]} {line.strip()}".strip()
    return summary, params


def hints_of(fn: Callable, name: str) -> dict[str, Any]:
    """`fn`'s resolved type hints."""
    try:
        return typing.get_type_hints(fn)
    except NameError as exc:
        raise AgentloopError(f"tool {name}: cannot resolve its type hints ({exc}); define the types it uses at "
                             "module level") from None


def model_param(fn: Callable, hints: dict[str, Any]) -> str | None:
    """The parameter's name when `fn` takes exactly one parameter, annotated with a pydantic model."""
    names = list(inspect.signature(fn).parameters)
    if len(names) == 1 and inspect.isclass(hints.get(names[0])) and issubclass(hints[names[0]], BaseModel):
        return names[0]
    return None


def _strip_titles(schema: Any) -> Any:
    """Drop pydantic's generated `title` strings (noise for a small model); keep properties named `title`."""
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def build_arguments(fn: Callable, name: str) -> tuple[dict[str, Any], type[BaseModel], str | None]:
    """(JSON schema of the arguments, pydantic model validating them, name of the model parameter or None)."""
    hints = hints_of(fn, name)
    single = model_param(fn, hints)
    if single:
        model = hints[single]
        return _strip_titles(model.model_json_schema()), model, single
    _, param_docs = doc_parts(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    fields: dict[str, Any] = {}
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise AgentloopError(f"tool {name}: parameter {pname} must be a plain named parameter (no *args, "
                                 "**kwargs or positional-only)")
        hint = hints.get(pname, Any)
        prop = type_schema(hint, f"tool {name}: parameter {pname}")
        if pname in param_docs:
            prop["description"] = param_docs[pname]
        if param.default is param.empty:
            required.append(pname)
        elif param.default is not None and isinstance(param.default, (str, int, float, bool)):
            prop["default"] = param.default
        properties[pname] = prop
        fields[pname] = (hint, ... if param.default is param.empty else param.default)
    schema = {"type": "object", "properties": properties, "required": required}
    model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    return schema, model, None
