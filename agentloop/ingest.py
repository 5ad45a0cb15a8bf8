"""Tool-output compaction on ingestion: a long tool result is compacted right after it is prefilled.

Its tokens are then the newest physical slots of the cache. The first `keep_first` and last `keep_last`
stay verbatim; the middle is compacted to `ratio` of its slots with an Attention Matching method whose
reference queries come from a repeat-prefill of the result itself (with `task_queries`, followed by the
pending task, so the fit also weighs what the task will ask of it). A result longer than `piece_tokens` is
prefilled and compacted piece by piece, so the cache never holds more than one piece of it verbatim.
"""

from __future__ import annotations

from collections.abc import Iterator
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
                         max_queries=spec.max_queries, seed=seed, chunk=spec.chunk_tokens)
    summary = stats.summary()
    return {"span": [lo, hi], "slots_before": end - start, "slots_after": end - start - (hi - lo) + stats.kept,
            "bytes_before": stats.bytes_before, "bytes_after": stats.bytes_after,
            "seconds": round(stats.seconds["total"], 3), "output_error": summary["output_error"],
            "mass_error": summary["mass_error"], "details": summary}


def ingest_result(session, ids: list[int], spec: IngestSpec, task_ids: list[int] = (),
                  seed: int = 0) -> Iterator[Any]:
    """Prefill a tool result's `ids` into `session` and compact it on ingestion if it is longer than the trigger.

    Yields the session's own events, and after each piece a dict of IngestEvent fields: `piece`, `pieces` and
    either compact_result's fields or `skipped` (the memory policy acted during the piece's prefill and too
    little of it is still verbatim)."""
    if len(ids) <= spec.trigger_tokens:
        yield from session.feed(ids)
        return
    n = -(-len(ids) // spec.piece_tokens)
    bounds = [round(len(ids) * j / n) for j in range(n + 1)]  # n pieces of near-equal length
    for j in range(n):
        piece = ids[bounds[j]:bounds[j + 1]]
        policy_marks = []  # tokens held when the memory policy acted during this prefill
        for event in session.feed(piece):
            if event.kind == "policy":
                policy_marks.append(len(session.token_ids))
            yield event
        verbatim = len(session.token_ids) - policy_marks[-1] if policy_marks else len(piece)
        if verbatim < len(piece) and verbatim <= spec.trigger_tokens:
            yield {"piece": j + 1, "pieces": n, "skipped": (
                f"the memory policy compacted the cache while this result was prefilled; only its last {verbatim} "
                f"tokens are still verbatim (trigger_tokens {spec.trigger_tokens})")}
            continue
        edges = {"keep_first": spec.keep_first if j == 0 else 0, "keep_last": spec.keep_last if j == n - 1 else 0}
        yield {"piece": j + 1, "pieces": n, **compact_result(session, piece[len(piece) - verbatim:],
                                                             spec.model_copy(update=edges), task_ids, seed + j)}
