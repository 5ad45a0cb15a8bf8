"""Memory policies: what the loop does when the KV cache reaches its cap.

Registry: `POLICIES` maps a name to its dataclass; `make_policy(name, **options)` builds one with a
clear error for unknown names or options, options of the wrong type (checked strictly against the
dataclass's annotations: `sink: "four"` or `pin_prompt: 1` is an error, not a crash later) or out of range.
"""

from __future__ import annotations

import dataclasses
import typing

from pydantic import ConfigDict, Field, ValidationError, create_model

from agentloop.errors import AgentloopError
from agentloop.policies.attention_matching import AttentionMatchingPolicy, H2OPolicy, SnapKVPolicy
from agentloop.policies.base import MemoryPolicy, Room
from agentloop.policies.eviction import StreamingPolicy, TruncatePolicy
from agentloop.policies.none import NoPolicy

POLICIES: dict[str, type[MemoryPolicy]] = {
    cls.name: cls for cls in (NoPolicy, TruncatePolicy, StreamingPolicy, AttentionMatchingPolicy, H2OPolicy, SnapKVPolicy)
}


# bounds of options that several policies share (a policy's own __post_init__ checks the rest)
OPTION_BOUNDS: dict[str, dict[str, int]] = {
    "sink": {"ge": 0}, "min_free": {"ge": 1}, "keep_first": {"ge": 0}, "protect_recent": {"ge": 0},
    "record_window": {"ge": 0}, "max_queries": {"ge": 1}, "max_compactions": {"ge": 0}, "seed": {"ge": 0},
}


def _options_model(cls: type[MemoryPolicy]):
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if f.init:
            default = f.default if f.default is not dataclasses.MISSING else ...
            fields[f.name] = (hints[f.name], Field(default, **OPTION_BOUNDS.get(f.name, {})))
    return create_model(f"{cls.name}_options", __config__=ConfigDict(extra="forbid", strict=True), **fields)


def make_policy(name: str, **options) -> MemoryPolicy:
    if name not in POLICIES:
        raise AgentloopError(f"unknown memory policy {name!r}: choose one of {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    try:
        checked = _options_model(cls).model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        option = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(f.name for f in dataclasses.fields(cls) if f.init)) or "none"
            raise AgentloopError(f"policy {name!r} has no option {option!r} (its options: {allowed})") from None
        raise AgentloopError(f"policy {name!r} option {option!r}: {err['msg']} (got {err['input']!r})") from None
    try:
        return cls(**{key: getattr(checked, key) for key in options})
    except (TypeError, ValueError) as exc:
        raise AgentloopError(f"policy {name!r}: {exc}") from None


__all__ = ["POLICIES", "AttentionMatchingPolicy", "H2OPolicy", "MemoryPolicy", "NoPolicy", "Room", "SnapKVPolicy",
           "StreamingPolicy", "TruncatePolicy", "make_policy"]
