"""The memory-policy interface.

A policy is a small dataclass. When the next forward would push the KV cache over its cap, the loop
pauses and calls `make_room(room)`; the policy edits `room.cache` (evict, compact, ...) and returns a
short description of what it did, or None if it cannot (or will not) free anything. The loop then
re-checks the cap and resumes, or stops cleanly. Policies never see the cap exceeded: they are asked
before the forward that would exceed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from agentloop.cache import CompactableCache


@dataclass
class Room:
    """What a policy needs to know when asked to free memory."""

    cache: CompactableCache
    cap_bytes: int  # the whole memory budget (agentloop.budget)
    cap_slots: int  # the slots the budget gives each full-attention layer
    needed_tokens: int  # tokens the next forward appends
    element_size: int  # bytes per cached element
    prompt_len: int  # tokens of the first prompt fed to the session
    session: Any = None  # the live Session, for policies that run the model (attention matching)

    def slots_to_free(self) -> int:
        """Slots to drop from every full-attention layer so that the next forward fits."""
        return max(0, self.cache.physical_len + self.needed_tokens - self.cap_slots)


@dataclass
class MemoryPolicy:
    name: ClassVar[str] = "base"
    compacts_with_queries: ClassVar[bool] = False  # needs the compaction reserve of the budget (agentloop.budget)

    def make_room(self, room: Room) -> dict[str, Any] | None:
        raise NotImplementedError

    def at_limit(self) -> bool:
        """True when declining to free room is by design (plain decoding, a compaction budget spent): the loop
        then stops with reason `mem_cap` and no error."""
        return False

    def query_window(self) -> int:
        """Decode-time queries the loop should keep for this policy (the newest N tokens); 0 = none."""
        return 0
