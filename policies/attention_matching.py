"""Online compaction: when the cache is full, compact everything but the newest tokens, then resume.

`am` is the paper's online protocol (arXiv 2602.16284, App. F.3): the compactable region is the whole cache
except a protected tail of recent tokens (and, optionally, the first prompt), it is compacted to `ratio` of
its slots with an Attention Matching method, and slots compacted earlier are compacted again with their β.
`h2o` and `snapkv` run the same pause-and-shrink schedule with eviction (β = 0, original values), scoring
keys with the queries of the most recent decode steps, as those methods do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from agentloop.compaction.queries import RepeatMemory
from agentloop.compaction.span import compact_span
from agentloop.policies.base import MemoryPolicy, Room

QUERY_SOURCES = {
    "repeat": (("repeat", 1.0),),
    "recorded": (("recorded", 1.0),),
    "repeat+recorded": (("repeat", 1.0), ("recorded", 1.0)),
}
QuerySource = Literal["repeat", "recorded", "repeat+recorded"]


@dataclass
class AttentionMatchingPolicy(MemoryPolicy):
    """Pause, compact the cache (all but `protect_recent` newest tokens) to `ratio` with AM, resume."""

    name = "am"
    compacts_with_queries = True
    ratio: float = 0.5  # the compactable region keeps this fraction of its slots
    protect_recent: int = 20  # newest tokens kept verbatim
    pin_prompt: bool = False  # also keep the first prompt verbatim (e.g. a system prompt)
    method: str = "am-hak-fast"  # a compaction method of agentloop.compaction.span.NAMED_METHODS
    # reference queries; both sources by default: in the online-fidelity replay (evals/results/online_fidelity.md)
    # repeat-prefill alone or recorded alone fell behind eviction, the two together matched the best of it. For
    # long-range memory `repeat` alone is better: it kept a pass key through 5-8 halvings where the mix kept it
    # through 2-3 (evals/results/passkey_online_qwen.md)
    queries: QuerySource = "repeat+recorded"
    # share of the fitting rows given to the first prompt (the run's task): at each compaction it is read again on
    # top of the cache, with the model's greedy draft reply (compact_span's `task_ids`), so that what the task says
    # keeps its weight through many halvings while the prompt is still compacted (0 = off). A pass key in the prompt
    # then survived 8 halvings (evals/results/passkey_online.md)
    prompt_share: float = 0.0
    # `new`: each compaction re-reads only the text added since the previous one and reuses the queries kept
    # from earlier re-reads (compaction time bounded by the cap); `all`: the paper's protocol, re-read everything
    reread: Literal["new", "all"] = "new"
    record_window: int = 256  # decode-time tokens whose queries `recorded` keeps
    max_queries: int = 4096  # reference queries per KV head
    max_compactions: int | None = None  # after this many, decline: the run stops at the cap (then answers)
    seed: int = 0
    compactions: int = field(default=0, init=False)
    repeat_memory: RepeatMemory = field(init=False, repr=False)

    def __post_init__(self):
        from agentloop.compaction.span import NAMED_METHODS

        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.method not in NAMED_METHODS:
            raise ValueError(f"unknown compaction method {self.method!r}; choose one of {', '.join(NAMED_METHODS)}")
        if self.queries not in QUERY_SOURCES:
            raise ValueError(f"unknown query source {self.queries!r}; choose one of {', '.join(QUERY_SOURCES)}")
        if self.protect_recent < 0:
            raise ValueError(f"protect_recent must be >= 0, got {self.protect_recent}")
        if not 0 <= self.prompt_share < 1:
            raise ValueError(f"prompt_share must be in [0, 1), got {self.prompt_share}")
        if self.reread not in ("new", "all"):
            raise ValueError(f"reread must be 'new' or 'all', got {self.reread!r}")
        self.repeat_memory = RepeatMemory(self.max_queries)

    def at_limit(self) -> bool:
        return self.max_compactions is not None and self.compactions >= self.max_compactions

    def query_window(self) -> int:
        return self.record_window if "recorded" in self.queries else 0

    def make_room(self, room: Room) -> dict | None:
        if self.at_limit():
            return None
        session, cache = room.session, room.cache
        start = min(room.prompt_len, cache.physical_len) if self.pin_prompt else 0
        end = cache.physical_len - self.protect_recent
        if end - start < 2:
            return None
        kept = max(1, round((end - start) * self.ratio))
        # the text behind the region: the pinned head is verbatim, so the region starts at logical position
        # `start`; the protected tail is verbatim too, so the region ends `protect_recent` tokens before the end
        context_ids = session.token_ids[start:len(session.token_ids) - self.protect_recent]
        seed = self.seed + self.compactions
        memo, tic, failed = {}, time.perf_counter(), None
        try:
            if "repeat" in self.queries and self.reread == "new":
                memo["repeat"] = self.repeat_memory.queries(session, context_ids, seed)
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # the re-read is rolled back: evict the region instead
            failed = f"reading the queries failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
        probe_seconds = time.perf_counter() - tic
        task_ids = session.token_ids[:room.prompt_len] if self.prompt_share else None
        stats = compact_span(session, start, end, kept, method=self.method, sources=QUERY_SOURCES[self.queries],
                             context_ids=context_ids, max_queries=min(self.max_queries, session.query_rows), seed=seed,
                             memo=memo, task_ids=task_ids, task_share=self.prompt_share, fallback=failed)
        for stage in ("queries", "total"):  # the re-read ran before compact_span: count it where it belongs
            stats.seconds[stage] += probe_seconds
        self.compactions += 1
        return {"action": "compact", "compaction": self.compactions, "region": [start, end], "kept": stats.kept,
                "logical_tokens": len(context_ids), "queries": stats.queries,
                "kept_query_bytes": self.repeat_memory.nbytes(),
                "output_error": round(float(stats.output_error.nanmean()), 5),
                "mass_error": round(float(stats.mass_error.nanmean()), 5),
                "stage_seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
                **({"fallback": stats.fallback, "evicted_heads": stats.evicted_heads} if stats.fallback else {})}


@dataclass
class H2OPolicy(AttentionMatchingPolicy):
    """Decode-time eviction at the same schedule: keep the slots with the highest attention from recent queries."""

    name = "h2o"
    method: str = "h2o"
    queries: QuerySource = "recorded"


@dataclass
class SnapKVPolicy(AttentionMatchingPolicy):
    """SnapKV-style eviction at the same schedule: recent queries' attention, max-pooled over 7 positions."""

    name = "snapkv"
    method: str = "snapkv"
    queries: QuerySource = "recorded"
