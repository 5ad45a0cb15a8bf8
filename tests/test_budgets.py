"""Non-uniform (layer, KV head) compaction budgets: files, slot rounding, padded compaction, decoding after it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_am_solver import SCALE, structured
from test_loop import _continue, _fed, _prompt

from agentloop import AgentloopError
from agentloop.compaction import compact
from agentloop.compaction.budgets import (
    allocate,
    head_budgets,
    head_budgets_within,
    head_errors,
    load_budgets,
    save_budgets,
    stored_slots,
)
from agentloop.compaction.span import compact_span

START, END, LENGTH = 4, 44, 48  # the span compacted in a 48-token session
BUDGETS = torch.tensor([[6, 2], [4, 4], [1, 7]])  # tiny llama: 3 layers × 2 KV heads, 24 slots = uniform 4


# ----------------------------------------------------------------------------------------------------
# proportions -> slots

def test_head_budgets_sum_bounds_and_rounding():
    uniform = torch.full((3, 4), 1 / 12)
    assert torch.equal(head_budgets(uniform, 12 * 7, 50), torch.full((3, 4), 7))
    # largest remainder: shares 3.33.. each -> one head gets the extra slot
    assert sorted(head_budgets(torch.ones(1, 3), 10, 50).flatten().tolist()) == [3, 3, 4]
    assert head_budgets(torch.tensor([[0.5, 0.3, 0.2]]), 10, 50).tolist() == [[5, 3, 2]]
    # bounds: a dominant head is capped at the span, a zero head still gets one slot, the rest is shared out
    slots = head_budgets(torch.tensor([[0.9, 0.0], [0.06, 0.04]]), 40, 20)
    assert slots.tolist() == [[20, 1], [11, 8]]
    proportions = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    for total in (15, 16, 100, 300, 749, 750):
        slots = head_budgets(proportions, total, 50)
        assert slots.dtype == torch.long and int(slots.sum()) == total
        assert slots.min() >= 1 and slots.max() <= 50
        unbounded = proportions / proportions.sum() * total
        inside = (unbounded > 1) & (unbounded < 49)
        if total == 300:  # away from the bounds every head is within one slot of its share
            assert inside.all() and ((slots - unbounded).abs() < 1).all()
    with pytest.raises(ValueError, match="total_slots"):
        head_budgets(proportions, 14, 50)


def test_budgets_within_bytes_fill_the_padded_size():
    proportions = torch.tensor([[0.5, 0.1], [0.2, 0.2], [0.05, 0.3]])
    uniform = 6 * 8  # the bytes of 8 slots per head
    within = head_budgets_within(proportions, uniform, 50)
    assert stored_slots(within) <= uniform < stored_slots(head_budgets(proportions, int(within.sum()) + 1, 50))
    assert stored_slots(head_budgets_within(torch.ones(3, 2), uniform, 50)) == uniform  # no padding: as uniform


def test_greedy_allocation_follows_the_error_drop_per_slot():
    errors = torch.tensor([[0.9, 0.3, 0.1],  # steep: 0.3 per slot to 4, then 0.05 per slot to 8
                           [0.5, 0.45, 0.44],  # flat: 0.025, then 0.0025
                           [0.2, 0.2, 0.2]])  # more slots do not help
    assert allocate(errors, [2, 4, 8], 12).tolist() == [8, 2, 2]
    assert allocate(errors, [2, 4, 8], 14).tolist() == [8, 4, 2]
    assert allocate(errors, [2, 4, 8], 100).tolist() == [8, 8, 2]
    # padded: heads 0 and 1 share a layer, so once head 0 holds 8 slots head 1 steps up for free
    padded = allocate(torch.cat([errors, errors[2:]]), [2, 4, 8], 20, kv_heads=2)
    assert padded.tolist() == [8, 8, 2, 2] and stored_slots(padded.view(2, 2)) == 20
    assert allocate(torch.cat([errors, errors[2:]]), [2, 4, 8], 19, kv_heads=2).tolist() == [4, 4, 2, 2]


def test_calibration_errors_fall_with_the_budget():
    Q, K, V = structured(H=2, n=256, T=32, seed=7)
    errors = head_errors(Q, K, V, SCALE, [4, 16, 32])  # held-out error of each head at each budget
    assert errors.shape == (2, 3) and (errors[:, 0] > errors[:, 1]).all() and errors[:, 2].max() < 1e-3


def test_budget_files_round_trip_and_errors(tmp_path):
    proportions = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "budgets.json"
    save_budgets(path, proportions, "tiny", "test", {})
    loaded = load_budgets(path, (3, 2))
    assert loaded.shape == (3, 2) and math.isclose(float(loaded.sum()), 1.0)
    assert torch.allclose(loaded, proportions.double() / proportions.sum(), atol=1e-7)
    with pytest.raises(AgentloopError, match="3 compactable layers × 4 KV heads"):
        load_budgets(path, (3, 4))
    with pytest.raises(AgentloopError, match="not found.*--out"):
        load_budgets(tmp_path / "missing.json", (3, 2))
    for bad, message in [({"proportions": [[1, -1], [1, 1], [1, 1]]}, "non-negative"),
                         ({"proportions": [[0, 0], [0, 0], [0, 0]]}, "positive sum"),
                         ({"model": "tiny"}, "not a budget file")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(AgentloopError, match=message):
            load_budgets(path, (3, 2))
    path.write_text("{not json")
    with pytest.raises(AgentloopError, match="not a budget file"):
        load_budgets(path, (3, 2))


# ----------------------------------------------------------------------------------------------------
# the solver: a padded head is that head compacted alone

@pytest.mark.parametrize("method", ["hak", "omp-fast", "topk-evict", "streaming"])
def test_padded_head_equals_the_head_compacted_alone(method):
    Q, K, V = structured(H=4, n=128, T=64, seed=5)
    budgets = torch.tensor([12, 3, 7, 1])
    padded = compact(Q, K, V, t=12, scale=SCALE, method=method, budgets=budgets)
    for h, b in enumerate(budgets.tolist()):
        alone = compact(Q[h:h + 1], K[h:h + 1], V[h:h + 1], t=b, scale=SCALE, method=method)
        assert torch.equal(padded.idx[h, :b], alone.idx[0])
        assert torch.equal(padded.keys[h, :b], alone.keys[0])
        assert torch.allclose(padded.beta[h, :b], alone.beta[0], atol=1e-5)
        assert torch.allclose(padded.values[h, :b], alone.values[0], rtol=1e-4, atol=1e-4)
        assert torch.allclose(padded.output_error[h], alone.output_error[0], rtol=1e-4, atol=1e-6)
        assert torch.all(padded.beta[h, b:] == -math.inf)
        assert torch.all(padded.keys[h, b:] == 0) and torch.all(padded.values[h, b:] == 0)


def test_equal_budgets_reproduce_uniform_compaction_exactly():
    Q, K, V = structured(H=3, n=128, T=64, seed=6)
    for method in ("hak", "omp-fast", "random"):
        uniform = compact(Q, K, V, t=9, scale=SCALE, method=method)
        budgeted = compact(Q, K, V, t=9, scale=SCALE, method=method, budgets=torch.full((3,), 9))
        for name in ("idx", "keys", "beta", "values"):
            assert torch.equal(getattr(uniform, name), getattr(budgeted, name)), (method, name)


# ----------------------------------------------------------------------------------------------------
# a live session: storage, bytes, decoding

def _compacted(model, budgets=None, target=4, **kwargs):
    session = _fed(model, _prompt(LENGTH), record=True)
    stats = compact_span(session, START, END, target, method="am-hak-fast", budgets=budgets, **kwargs)
    return session, stats


@pytest.mark.parametrize("chunk, part_budgets", [(None, "attention"), (16, "attention"), (16, "length")])
def test_layers_are_stored_at_their_largest_head_budget(tiny_llama, chunk, part_budgets):
    session, stats = _compacted(tiny_llama, BUDGETS, chunk=chunk, part_budgets=part_budgets)
    cache = session.cache
    real = torch.stack([torch.isfinite(cache.layers[i].beta[0, :, START:START + n]).sum(-1)
                        for i, n in zip(cache.compactable, stats.layer_slots, strict=True)])  # [layers, kv_heads]
    if part_budgets == "attention":  # each head holds its budget exactly, however its chunks share it (one at least)
        least = 1 if chunk is None else 3  # 40 slots, 3 chunks
        assert torch.equal(real, BUDGETS.clamp(min=least)) and stats.layer_slots == [6, 4, 7] and stats.kept == 7
    else:  # each chunk keeps its rounded share of a head's budget, at least one slot
        shares = [(BUDGETS * n / (END - START)).round().clamp(min=1) for n in (13, 14, 13)]  # 40 slots, 3 chunks
        assert torch.equal(real, sum(shares).long()) and not torch.equal(real, BUDGETS)
    assert stats.layer_slots == real.amax(1).tolist()
    assert stats.padding_fraction == pytest.approx(1 - int(real.sum()) / (2 * sum(stats.layer_slots)))
    element = cache.layers[0].keys.element_size()
    expected_bytes = 0
    for i, budgets, length in zip(cache.compactable, real.tolist(), stats.layer_slots, strict=True):
        layer = cache.layers[i]
        assert layer.physical_len == LENGTH - (END - START) + length
        beta = layer.beta[0, :, START:START + length]  # [kv_heads, length]
        for h, b in enumerate(budgets):  # padding: the last length - b slots of each head, zero with β = −inf
            assert torch.all(beta[h, b:] == -math.inf)
            assert torch.all(layer.keys[0, h, START + b:START + length] == 0)
            assert torch.all(layer.values[0, h, START + b:START + length] == 0)
        expected_bytes += layer.physical_len * cache.kv_heads * (2 * cache.head_dim + 1) * element
    assert stats.bytes_after == cache.held_bytes() == expected_bytes


def test_real_slots_equal_each_head_compacted_alone(tiny_llama):
    session = _fed(tiny_llama, _prompt(LENGTH))
    cache, layers = session.cache, session.cache.compactable
    queries = {i: cache.layers[i].keys[0].clone() for i in layers}  # the keys as queries: [kv_heads, 48, d]
    scale = tiny_llama.model.model.layers[0].self_attn.scaling
    spans = {i: (cache.layers[i].keys[0, :, START:END].clone(), cache.layers[i].values[0, :, START:END].clone())
             for i in layers}
    compact_span(session, START, END, 4, method="am-hak-fast", queries=queries, budgets=BUDGETS)
    for i, budgets in zip(layers, BUDGETS.tolist(), strict=True):
        for h, b in enumerate(budgets):
            K, V = (x[h:h + 1] for x in spans[i])
            alone = compact(queries[i][h:h + 1], K, V, t=b, scale=scale, method="hak")
            layer = cache.layers[i]
            assert torch.allclose(layer.keys[0, h, START:START + b], alone.keys[0])
            assert torch.allclose(layer.beta[0, h, START:START + b], alone.beta[0], atol=1e-5)
            assert torch.allclose(layer.values[0, h, START:START + b], alone.values[0], rtol=1e-4, atol=1e-4)


def test_equal_budgets_match_the_uniform_session_exactly(tiny_llama):
    uniform, _ = _compacted(tiny_llama)
    budgeted, stats = _compacted(tiny_llama, torch.full((3, 2), 4))
    assert stats.padding_fraction == 0 and stats.layer_slots == [4, 4, 4]
    for i in uniform.cache.compactable:
        a, b = uniform.cache.layers[i], budgeted.cache.layers[i]
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.beta, b.beta)
    assert torch.equal(_continue(uniform, 5), _continue(budgeted, 5))


def test_padding_slots_get_no_attention_while_decoding(tiny_llama):
    """Padding holds zero keys/values; filling it with large random keys and values changes nothing while its
    β is −inf (prefill chunks and decode steps, over layers of different lengths), and does once β is 0."""
    padded, _ = _compacted(tiny_llama, BUDGETS)
    garbage, _ = _compacted(tiny_llama, BUDGETS)
    generator = torch.Generator().manual_seed(0)
    for i in garbage.cache.compactable:
        layer = garbage.cache.layers[i]
        padding = (layer.beta == -math.inf)[..., None]  # [1, kv_heads, physical_len, 1]
        layer.keys.copy_(torch.where(padding, 10 * torch.randn(layer.keys.shape, generator=generator), layer.keys))
        layer.values.copy_(torch.where(padding, 10 * torch.randn(layer.values.shape, generator=generator), layer.values))
    assert any(bool((layer.beta == -math.inf).any()) for layer in garbage.cache.layers)
    more = _prompt(6, seed=7)
    for session in (padded, garbage):
        list(session.feed(more))
    assert torch.equal(padded.last_logits, garbage.last_logits)
    assert torch.allclose(_continue(padded, 8), _continue(garbage, 8), atol=1e-5)
    for i in garbage.cache.compactable:  # control: the same garbage with β = 0 is attended to
        layer = garbage.cache.layers[i]
        layer.beta.copy_(layer.beta.nan_to_num(neginf=0.0))
    list(garbage.feed(more)), list(padded.feed(more))
    assert (padded.last_logits - garbage.last_logits).abs().max() > 1e-2


def test_bad_budgets_are_rejected(tiny_llama):
    session = _fed(tiny_llama, _prompt(LENGTH), record=True)
    with pytest.raises(ValueError, match=r"budgets must be \[3, 2\]"):
        compact_span(session, START, END, 4, budgets=torch.full((2, 3), 4))
    with pytest.raises(ValueError, match="budgets must be"):
        compact_span(session, START, END, 4, budgets=torch.tensor([[0, 8], [4, 4], [4, 4]]))
