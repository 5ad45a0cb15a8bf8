"""Memory policies: what the loop does when the KV cache reaches its cap.

Registry: `POLICIES` maps a name to its dataclass; `make_policy(name, **options)` builds one with a
clear error for unknown names or options.
"""

from __future__ import annotations

import dataclasses

from agentloop.errors import AgentloopError
from agentloop.policies.attention_matching import AttentionMatchingPolicy, H2OPolicy, SnapKVPolicy
from agentloop.policies.base import MemoryPolicy, Room
from agentloop.policies.eviction import StreamingPolicy, TruncatePolicy
from agentloop.policies.none import NoPolicy

POLICIES: dict[str, type[MemoryPolicy]] = {
    cls.name: cls for cls in (NoPolicy, TruncatePolicy, StreamingPolicy, AttentionMatchingPolicy, H2OPolicy, SnapKVPolicy)
}


def make_policy(name: str, **options) -> MemoryPolicy:
    if name not in POLICIES:
        raise AgentloopError(f"unknown memory policy {name!r}: choose one of {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise AgentloopError(f"policy {name!r} has no option {unknown[0]!r} (its options: {allowed})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise AgentloopError(f"policy {name!r}: {exc}") from None


__all__ = ["POLICIES", "AttentionMatchingPolicy", "H2OPolicy", "MemoryPolicy", "NoPolicy", "Room", "SnapKVPolicy",
           "StreamingPolicy", "TruncatePolicy", "make_policy"]
