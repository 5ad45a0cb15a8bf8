"""Ingestion in pieces: joint piece budgets hold the same slots as even ones, move them where the queries look,
and keep the earlier pieces' pins; self-study within a time budget."""

from __future__ import annotations

import pytest
import torch
from test_span import _held_exactly

from agentloop import Session
from agentloop.compaction import span as span_module
from agentloop.compaction.queries import RepeatMemory
from agentloop.ingest import ingest_result
from agentloop.task import IngestSpec

PROSE = ("The mill stood by the river, and the miller's sons carried grain up the hill every morning before the "
         "bells rang in the town below. ")


def _result_ids(tokenizer, n: int, needle: str = "") -> list[int]:
    ids = tokenizer(needle + PROSE * (n // 20 + 1), add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def _ingest(loaded, ids: list[int], spec: IngestSpec) -> tuple[Session, list[dict]]:
    session = Session(loaded)
    list(session.feed(ids[:8]))
    events = [e for e in ingest_result(session, ids[8:], spec) if isinstance(e, dict)]
    return session, events


def _spec(**fields) -> IngestSpec:
    return IngestSpec(**{"trigger_tokens": 32, "ratio": 0.25, "keep_first": 4, "keep_last": 4, "piece_tokens": 96,
                         "max_queries": 256, **fields})


def test_joint_piece_budgets_hold_exactly_the_slots_and_bytes_of_even_ones(tiny_chat):
    ids = _result_ids(tiny_chat.tokenizer, 8 + 300)
    (even, even_events), (joint, joint_events) = (_ingest(tiny_chat, ids, _spec(piece_budgets=b))
                                                  for b in ("even", "joint"))
    middles = [e["piece_end"] - e["piece_start"] - (4 if e["piece_start"] == 0 else 0)
               - (4 if e["piece_end"] == 300 else 0) for e in even_events]
    due = 4 + sum(round(m * 0.25) for m in middles) + 4
    assert len(even_events) == 4
    assert [e["pieces_joined"] for e in even_events] == [1, 1, 1, 1]
    assert [e["pieces_joined"] for e in joint_events] == [1, 2, 3, 4]
    assert [e["result_slots"] for e in joint_events] == [e["result_slots"] for e in even_events]
    assert joint_events[-1]["result_slots"] == due == even.cache.physical_len - 8 == joint.cache.physical_len - 8
    assert joint.cache.held_bytes() == even.cache.held_bytes()
    assert joint_events[-1]["span"][0] == 8 + 4  # the last compaction covers every piece's middle
    assert joint_events[-1]["slots_before"] == joint_events[-2]["result_slots"] - 4 + (300 - joint_events[-1]["piece_start"])


def _newest_piece_queries(session, n: int) -> dict[int, torch.Tensor]:
    """Queries that look at the newest n slots only: their own keys, scaled up."""
    cache = session.cache
    return {layer: 8 * cache.layers[layer].keys[0, :, -n:].float().clone() for layer in cache.compactable}


@pytest.mark.parametrize("budgets", ["even", "joint"])
def test_joint_budgets_move_the_slots_to_the_piece_the_queries_look_at(tiny_chat, monkeypatch, budgets):
    # the queries look only at the newest piece; jointly, the last piece then takes slots from the earlier ones (am-hak
    # keeps original keys, so each kept key is traced to its piece); evenly, every piece keeps what it is due
    piece = 100
    ids = _result_ids(tiny_chat.tokenizer, 8 + 2 * piece)
    monkeypatch.setattr(span_module, "repeat_queries", lambda session, context_ids: _newest_piece_queries(session, piece))
    monkeypatch.setattr(RepeatMemory, "queries", lambda self, session, context_ids, seed: _newest_piece_queries(session, piece))
    full = Session(tiny_chat)
    list(full.feed(ids))
    session, events = _ingest(tiny_chat, ids, _spec(piece_budgets=budgets, piece_tokens=piece))
    assert len(events) == 2
    layer = session.cache.compactable[0]
    kept = session.cache.layers[layer].keys[0, :, 8 + 4:8 + 4 + events[-1]["result_slots"] - 8]  # the middles' slots
    original = full.cache.layers[layer].keys[0]  # [kv_heads, 208, d]
    for head in range(session.cache.kv_heads):
        matches = (kept[head][:, None] == original[head][None]).all(-1)  # [slots, tokens]
        found = matches.any(1)
        position = matches.float().argmax(1)[found]
        in_last = int((position >= 8 + piece).sum())
        due_last = round((piece - 4) * 0.25)
        if budgets == "even":
            assert in_last == due_last
        else:
            assert in_last > due_last


@pytest.mark.parametrize("where", ["first piece", "last piece"])
def test_joint_budgets_keep_every_piece_s_pinned_numbers(tiny_chat, where):
    # in the first piece the digits are pinned alone, then carried through the later joint compactions; in the last
    # one they are found in the joint span's verbatim tail (span_ids) next to the earlier pieces' slots. A later
    # piece is prefilled over the compacted earlier ones, so its keys and values match the whole prefill's only in
    # the first layer (which sees no context): the last piece's digits are checked there
    tokenizer = tiny_chat.tokenizer
    needle = "Mill ledger. The pass key is 60494. "
    if where == "first piece":
        ids = _result_ids(tokenizer, 8 + 300, needle=needle)
    else:
        ids = _result_ids(tokenizer, 8 + 290) + tokenizer(" " + needle, add_special_tokens=False)["input_ids"]
    last = next(i for i in range(4, len(ids)) if tokenizer.decode(ids[i - 4:i + 1]) == "60494")
    digits = [i for i in range(last - 4, last + 1) if tokenizer.decode([ids[i]]).strip().isdigit()]
    full = Session(tiny_chat)
    list(full.feed(ids))
    original = {(layer, i): (full.cache.layers[layer].keys[0, :, i], full.cache.layers[layer].values[0, :, i])
                for layer in full.cache.compactable[:None if where == "first piece" else 1] for i in digits}
    for pin in (True, False):
        session, events = _ingest(tiny_chat, ids, _spec(piece_budgets="joint", pin_numbers=pin, keep_last=0))
        assert events[-1]["pieces_joined"] == len(events) >= 3
        held = all(_held_exactly(session.cache, layer, key, value) for (layer, _), (key, value) in original.items())
        assert digits and held == pin


def test_piece_budgets_must_be_a_known_split():
    with pytest.raises(ValueError, match="piece_budgets"):
        IngestSpec(piece_budgets="by-length")


def _rows(queries: dict[int, torch.Tensor]) -> int:
    return min(q.shape[1] for q in queries.values())


def test_a_probe_stops_drafting_at_its_deadline(tiny_chat):
    import time

    session = Session(tiny_chat)
    list(session.feed(_result_ids(tiny_chat.tokenizer, 40)))
    ids = _result_ids(tiny_chat.tokenizer, 12)
    read_only = _rows(session.probe(ids))
    drafted = _rows(session.probe(ids, generate=10, temperature=0.0))
    cut = _rows(session.probe(ids, generate=10, temperature=0.0, deadline=time.monotonic() - 1))
    assert cut == read_only < drafted


def test_self_study_within_its_seconds_reads_the_first_prompt_only(tiny_chat):
    from agentloop.compaction.queries import SELF_STUDY_PROMPTS, self_study_queries, turn_ids

    session = Session(tiny_chat)
    list(session.feed(_result_ids(tiny_chat.tokenizer, 40)))
    first_prompt = _rows(session.probe(turn_ids(tiny_chat.tokenizer, SELF_STUDY_PROMPTS[0])))
    assert _rows(self_study_queries(session, seconds=1e-9)) == first_prompt
    assert _rows(self_study_queries(session)) > first_prompt


def test_study_seconds_must_be_positive():
    with pytest.raises(ValueError, match="study_seconds"):
        IngestSpec(study_seconds=0)
