"""Eviction baselines: drop the oldest slots after a protected prefix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentloop.policies.base import MemoryPolicy, Room


def evict_after(room: Room, protected: int, min_free: int) -> dict | None:
    """Drop the oldest slots after the first `protected` ones, at least enough to fit, at least `min_free`."""
    cache = room.cache
    physical = cache.physical_len
    evictable = physical - protected
    need = room.slots_to_free()
    if evictable <= 0 or need > evictable:
        return None
    drop = min(evictable, max(need, min_free))
    kept = torch.cat([torch.arange(protected), torch.arange(protected + drop, physical)])
    for layer_idx in cache.compactable:
        cache.keep(layer_idx, kept.to(cache.layers[layer_idx].keys.device))
    return {"evicted": drop, "protected": protected}


@dataclass
class TruncatePolicy(MemoryPolicy):
    """Keep a protected prefix (default: the whole first prompt) and drop the oldest tokens after it."""

    name = "truncate"
    keep_first: int | None = None  # None = the first prompt
    min_free: int = 32  # evict at least this many slots per action, so evictions are not per token

    def make_room(self, room: Room):
        protected = room.prompt_len if self.keep_first is None else self.keep_first
        return evict_after(room, min(protected, room.cache.physical_len), self.min_free)


@dataclass
class StreamingPolicy(MemoryPolicy):
    """StreamingLLM: a few attention-sink tokens plus the most recent window."""

    name = "streaming"
    sink: int = 4
    min_free: int = 32

    def make_room(self, room: Room):
        return evict_after(room, min(self.sink, room.cache.physical_len), self.min_free)
