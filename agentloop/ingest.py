"""Tool-output compaction on ingestion: a long tool result is compacted right after it is prefilled.

Its tokens are then the newest physical slots of the cache. The first `keep_first` and last `keep_last`
stay verbatim; the middle is compacted to `ratio` of its slots with an Attention Matching method whose
reference queries come from a repeat-prefill of the result itself (with `task_queries`, followed by the
pending task, so the fit also weighs what the task will ask of it).
"""

from __future__ import annotations

from typing import Any

from agentloop.compaction.span import compact_span
from agentloop.task import IngestSpec


def compact_result(session, result_ids: list[int], spec: IngestSpec, task_ids: list[int] = (),
                   seed: int = 0) -> dict[str, Any]:
    """Compact the newest len(result_ids) slots of `session`, which hold `result_ids` verbatim.

    Returns the fields of an IngestEvent: span, slots and bytes before/after, seconds, fit errors."""
    end = session.cache.physical_len
    start = end - len(result_ids)
    lo, hi = start + spec.keep_first, end - spec.keep_last
    middle = result_ids[spec.keep_first:len(result_ids) - spec.keep_last]
    kept = max(1, round(len(middle) * spec.ratio))
    stats = compact_span(session, lo, hi, kept, method=spec.method, context_ids=middle + list(task_ids),
                         max_queries=spec.max_queries, seed=seed)
    summary = stats.summary()
    return {"span": [lo, hi], "slots_before": end - start, "slots_after": end - start - (hi - lo) + stats.kept,
            "bytes_before": stats.bytes_before, "bytes_after": stats.bytes_after,
            "seconds": round(stats.seconds["total"], 3), "output_error": summary["output_error"],
            "mass_error": summary["mass_error"], "details": summary}
