"""Tool-output compaction on ingestion: a long tool result is compacted right after it is prefilled.

Its tokens are then the newest physical slots of the cache. The first `keep_first` and last `keep_last`
stay verbatim; the middle is compacted to `ratio` of its slots with an Attention Matching method whose
reference queries come from a repeat-prefill of the result itself (with `task_queries`, the queries of the
pending task read after it, and of the model's short draft reply, also hold a quarter of the fitting rows,
so the fit weighs what the task will ask, and the TASK_PIN tokens where those queries look are kept in every head
with their original keys and values: a number the task will copy keeps all its digits; with `pin_numbers`, every
number of the result is kept so, task or not). A result longer than
`piece_tokens` is prefilled and compacted piece by piece, so the cache never holds more than one piece of it verbatim.
With `piece_budgets: joint`, each piece after the first is compacted together with the slots the earlier pieces
already hold, to the slots all of them are due (ratio of their middles): the result's slots go where its
attention goes, whichever piece that is; the earlier pieces' re-read queries are kept (RepeatMemory), so only the new
piece is read again, and their pinned slots stay pinned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from agentloop.compaction.queries import RepeatMemory
from agentloop.compaction.span import TASK_SHARE, compact_span
from agentloop.task import IngestSpec

TASK_PIN = 32  # tokens of a piece where the pending task looks, kept in every head as they are (compact_span task_pin)


@dataclass
class CompactedPieces:
    """The compacted middles of a result's pieces so far, contiguous in the cache (joint piece budgets)."""

    start: int  # first physical slot
    slots: int  # slots held
    due: int  # slots the pieces are due: the sum of round(middle * ratio)
    pinned: torch.Tensor | None = None  # [layers * kv_heads, slots] bool: slots kept as they were
    repeat: RepeatMemory | None = None  # their re-read queries (and, as its `ids`, the text they read)
    pieces: int = 1


def compact_result(session, result_ids: list[int], spec: IngestSpec, task_ids: list[int] = (),
                   seed: int = 0, task_share: float = TASK_SHARE, task_pin: int = TASK_PIN,
                   earlier: CompactedPieces | None = None) -> tuple[dict[str, Any], CompactedPieces]:
    """Compact the newest len(result_ids) slots of `session`, which hold `result_ids` verbatim; with `earlier`
    (the result's compacted pieces, just before them), those slots and these are compacted together to the slots
    all of them are due.

    Returns the fields of an IngestEvent (span, slots and bytes before/after, seconds, fit errors) and the
    compacted pieces, this one included."""
    tic = time.perf_counter()
    end = session.cache.physical_len
    start = end - len(result_ids)
    hi = end - spec.keep_last
    middle = result_ids[spec.keep_first:len(result_ids) - spec.keep_last]
    due = max(1, round(len(middle) * spec.ratio))
    if earlier is not None:
        if earlier.start + earlier.slots != start + spec.keep_first:
            raise ValueError("the earlier pieces' slots must end where this piece's middle starts")
        lo, due, text = earlier.start, earlier.due + due, earlier.repeat.ids + middle
        fresh = hi - (start + spec.keep_first)  # this piece's slots in the span
        pinned = torch.cat([earlier.pinned, torch.zeros(earlier.pinned.shape[0], fresh, dtype=torch.bool)], 1) \
            if earlier.pinned is not None else None
        repeat = earlier.repeat
    else:
        lo, text, pinned = start + spec.keep_first, middle, None
        repeat = RepeatMemory(spec.max_queries) if spec.piece_budgets == "joint" else None
    memo = {"repeat": repeat.queries(session, text, seed)} if repeat is not None else None
    stats = compact_span(session, lo, hi, due, method=spec.method, context_ids=text, task_ids=list(task_ids),
                         max_queries=spec.max_queries, seed=seed, chunk=spec.chunk_tokens, task_share=task_share,
                         task_pin=task_pin, span_ids=middle, pin_numbers=spec.pin_numbers, memo=memo, pinned=pinned,
                         study_seconds=spec.study_seconds)
    summary = stats.summary()
    before = end - (start if earlier is None else lo)  # slots of the result's pieces this compaction covers
    pieces = 1 + (earlier.pieces if earlier is not None else 0)
    event = {"span": [lo, hi], "slots_before": before, "slots_after": before - (hi - lo) + stats.kept,
             "pieces_joined": pieces,
             "bytes_before": stats.bytes_before, "bytes_after": stats.bytes_after,
             "seconds": round(time.perf_counter() - tic, 3), "output_error": summary["output_error"],
             "mass_error": summary["mass_error"], "details": summary}
    return event, CompactedPieces(lo, stats.kept, due, stats.pinned, repeat, pieces)


def ingest_result(session, ids: list[int], spec: IngestSpec, task_ids: list[int] = (),
                  seed: int = 0, task_share: float = TASK_SHARE, task_pin: int = TASK_PIN) -> Iterator[Any]:
    """Prefill a tool result's `ids` into `session` and compact it on ingestion if it is longer than the trigger.

    The result goes in pieces of at most `piece_tokens` (near-equal), each also no longer than the room left
    under the cap, so that it is compacted by ingestion before the memory policy has to act. Yields the
    session's own events and, after each piece, a dict of IngestEvent fields: `piece`, `piece_start`,
    `piece_end` (token offsets in the result), `result_slots` (the slots the result holds so far) and
    compact_result's fields, or `skipped` with the reason. With `spec.piece_budgets == "joint"`, a piece that follows
    compacted pieces of the result directly is compacted together with them (compact_result's `earlier`)."""
    if len(ids) <= spec.trigger_tokens:
        yield from session.feed(ids)
        return
    least = 2 * (spec.keep_first + spec.keep_last + 2)  # a piece this long always has a middle to compact
    pos, piece_no = 0, 0
    first_slot = session.cache.physical_len  # where the result starts while the memory policy leaves it in place
    earlier = None  # joint piece budgets: the result's compacted pieces just before the next piece
    while pos < len(ids):
        left = len(ids) - pos
        size = math.ceil(left / math.ceil(left / spec.piece_tokens))  # near-equal pieces of at most piece_tokens
        room = session.free_tokens()
        if room is not None and least <= room < size:
            size = room
        piece, piece_no = ids[pos:pos + size], piece_no + 1
        policy_marks = []  # tokens held when the memory policy acted during this prefill
        for event in session.feed(piece):
            if event.kind == "policy":
                policy_marks.append(len(session.token_ids))
            yield event
        verbatim = len(session.token_ids) - policy_marks[-1] if policy_marks else len(piece)
        if policy_marks:  # the policy moved what was before: the result's own slots start at the verbatim ones
            first_slot, earlier = session.cache.physical_len - verbatim, None
        about = {"piece": piece_no, "piece_start": pos, "piece_end": pos + size}
        # the piece's head is only still verbatim if the policy did not compact during its prefill
        edges = {"keep_first": spec.keep_first if pos == 0 and verbatim == len(piece) else 0,
                 "keep_last": spec.keep_last if pos + size == len(ids) else 0}
        pos += size
        if verbatim - edges["keep_first"] - edges["keep_last"] < 2:
            earlier = None
            yield {**about, "result_slots": session.cache.physical_len - first_slot, "skipped": (
                f"only {verbatim} tokens of this piece are verbatim (the memory policy compacted the cache while it "
                "was prefilled)" if verbatim < len(piece) else f"the piece is too short ({len(piece)} tokens)")}
            continue
        event, pieces = compact_result(session, piece[len(piece) - verbatim:], spec.model_copy(update=edges),
                                       task_ids, seed + piece_no, task_share, task_pin, earlier)
        earlier = pieces if spec.piece_budgets == "joint" else None
        yield {**about, **event, "result_slots": session.cache.physical_len - first_slot}
