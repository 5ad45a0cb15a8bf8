"""The memory-policy interface.

A policy is a small dataclass. When the next forward would push the KV cache over its cap, the loop
pauses and calls `make_room(room)`; the policy edits `room.cache` (evict, compact, ...) and returns a
short description of what it did, or None if it cannot (or will not) free anything. The loop then
re-checks the cap and resumes, or stops cleanly. Policies never see the cap exceeded: they are asked
before the forward that would exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from agentloop.cache import CompactableCache


@dataclass
class Room:
    """What a policy needs to know when asked to free memory."""

    cache: CompactableCache
    cap_bytes: int
    cap_slots: int | None  # set when the cap was given in tokens: physical slots per full layer
    needed_tokens: int  # tokens the next forward appends
    element_size: int  # bytes per cached element
    prompt_len: int  # tokens of the first prompt fed to the session
    session: Any = None  # the live Session, for policies that run the model (attention matching)

    def excess_bytes(self) -> int:
        return self.cache.bytes_after(self.needed_tokens, self.element_size) - self.cap_bytes

    def slots_to_free(self) -> int:
        """Slots to drop from every full-attention layer so that the next forward fits."""
        per_slot = self.cache.full_slot_bytes(self.element_size)
        by_bytes = math.ceil(self.excess_bytes() / per_slot) if per_slot else 0
        by_slots = self.cache.physical_len + self.needed_tokens - self.cap_slots if self.cap_slots is not None else 0
        return max(0, by_bytes, by_slots)


@dataclass
class MemoryPolicy:
    name: ClassVar[str] = "base"

    def make_room(self, room: Room) -> dict[str, Any] | None:
        raise NotImplementedError

    def at_limit(self) -> bool:
        """True when declining to free room is by design (plain decoding, a compaction budget spent): the loop
        then stops with reason `mem_cap` and no error."""
        return False

    def query_window(self) -> int:
        """Decode-time queries the loop should keep for this policy (the newest N tokens); 0 = none."""
        return 0
