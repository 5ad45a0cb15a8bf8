"""Attention Matching solver (agentloop.compaction.solver) on synthetic keys, values and queries."""

from __future__ import annotations

import math

import pytest
import torch

from agentloop.compaction import compact, evaluate, fit_beta, fit_values, select_highest_attention, select_omp
from agentloop.compaction.solver import attend, shifted_exp

D = 32
SCALE = D ** -0.5
AM_METHODS = ["hak", "omp", "omp-fast"]


def gaussian(H: int, n: int, T: int, seed: int, query_scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    Q = query_scale * torch.randn(H, n, D, generator=g)
    return Q, torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)


def structured(H: int, n: int, T: int, seed: int, rank: int = 6, logit_std: float = 2.0) -> tuple[torch.Tensor, ...]:
    """Keys and queries mostly in a few shared directions of decaying strength; logits with std `logit_std`."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, D, rank, generator=g)).Q.mT * math.sqrt(D)  # [H, rank, D]
    strength = 0.5 ** torch.arange(rank)
    K = (torch.randn(H, T, rank, generator=g) * strength) @ basis + 0.1 * torch.randn(H, T, D, generator=g)
    Q = torch.randn(H, n, rank, generator=g) @ basis + 0.1 * torch.randn(H, n, D, generator=g)
    Q = Q * (logit_std / (SCALE * Q @ K.mT).std())
    return Q, K, torch.randn(H, T, D, generator=g)


def split(Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitting queries and held-out queries: every other row."""
    return Q[:, ::2], Q[:, 1::2]


@pytest.mark.parametrize("method", AM_METHODS)
def test_full_budget_reproduces_attention(method):
    Q, K, V = gaussian(H=3, n=256, T=48, seed=0)
    fit_queries, held_out = split(Q)
    result = compact(fit_queries, K, V, t=48, scale=SCALE, method=method)
    assert result.idx.tolist() == [list(range(48))] * 3
    assert result.output_error.max() < 1e-4 and result.mass_error.max() < 1e-4
    output_error, mass_error = evaluate(held_out, K, V, None, result.keys, result.beta, result.values, SCALE)
    assert output_error.max() < 1e-4 and mass_error.max() < 1e-4


def test_beta_respects_bounds():
    # near-uniform attention over many keys: a few keys must carry a weight far above the upper bounds
    Q, K, V = gaussian(H=2, n=64, T=2048, seed=1, query_scale=0.05)
    hak = compact(Q, K, V, t=4, scale=SCALE, method="hak")
    omp = compact(Q, K, V, t=1, scale=SCALE, method="omp")
    assert hak.beta.max() == pytest.approx(3.0) and omp.beta.max() == pytest.approx(7.0)
    Q, K, V = structured(H=4, n=256, T=256, seed=2, logit_std=4.0)  # peaked attention: some weights want to vanish
    for method, lo, hi in [("hak", -3.0, 3.0), ("omp", math.log(1e-12), 7.0), ("omp-fast", math.log(1e-12), 7.0)]:
        beta = compact(Q, K, V, t=32, scale=SCALE, method=method).beta
        assert beta.min() >= lo - 1e-5 and beta.max() <= hi + 1e-5, method
    assert compact(Q, K, V, t=32, scale=SCALE, method="hak").beta.min() == pytest.approx(-3.0)


def test_fit_beta_is_a_bounded_least_squares_optimum():
    """KKT conditions of min ||Mw − y||² on lo ≤ w ≤ hi: zero gradient inside, pointing outward at a bound."""
    Q, K, _ = structured(H=4, n=256, T=256, seed=3, rank=3, logit_std=1.0)
    idx = select_highest_attention(Q, K, 32, SCALE)
    beta = fit_beta(Q, K, idx, SCALE, lo=-3.0, hi=3.0)
    E, _ = shifted_exp(Q, K, SCALE)
    M, y = E.gather(2, idx[:, None, :].expand(-1, E.shape[1], -1)).double(), E.sum(-1).double()
    w = beta.double().exp()
    grad = (M.mT @ (M @ w[..., None] - y[..., None]))[..., 0] / (y * y).sum(-1, keepdim=True)
    at_lo, at_hi = beta <= -3.0 + 1e-5, beta >= 3.0 - 1e-5
    assert at_lo.any() and at_hi.any() and (~at_lo & ~at_hi).any()
    assert grad[~at_lo & ~at_hi].abs().max() < 1e-4
    assert grad[at_lo].min() > -1e-4 and grad[at_hi].max() < 1e-4


def duplicated(seed: int) -> tuple[torch.Tensor, ...]:
    """12 distinct keys (with their values), key g repeated 1 + g % 4 times, positions shuffled."""
    Q, K, V = gaussian(H=2, n=128, T=12, seed=seed)
    copies = 1 + torch.arange(12) % 4
    group = torch.repeat_interleave(torch.arange(12), copies)
    group = group[torch.randperm(len(group), generator=torch.Generator().manual_seed(seed))]  # [T] -> distinct key
    return Q, K[:, group], V[:, group], group, copies


def test_duplicate_keys_omp_collapses_each_group_to_log_count():
    Q, K, V, group, copies = duplicated(seed=4)
    fit_queries, held_out = split(Q)
    result = compact(fit_queries, K, V, t=12, scale=SCALE, method="omp")
    chosen = group[result.idx]  # [H, 12] distinct key behind each slot
    assert all(sorted(row) == list(range(12)) for row in chosen.tolist())
    torch.testing.assert_close(result.beta, copies[chosen].float().log(), atol=1e-4, rtol=0)
    output_error, mass_error = evaluate(held_out, K, V, None, result.keys, result.beta, result.values, SCALE)
    assert output_error.max() < 1e-4 and mass_error.max() < 1e-4


def test_duplicate_keys_hak_fit_gives_log_count():
    # top-t by attention ties between copies of a key, so hak's selection cannot separate exact duplicates;
    # its fits (β in [-3, 3] with 2 gradient steps, then values) are checked on one copy of each key.
    Q, K, V, group, copies = duplicated(seed=5)
    fit_queries, held_out = split(Q)
    first_copy = torch.stack([(group == g).nonzero()[0, 0] for g in range(12)]).expand(2, 12)
    beta = fit_beta(fit_queries, K, first_copy, SCALE, lo=-3.0, hi=3.0, pgd_iters=2)
    torch.testing.assert_close(beta, copies.float().log().expand(2, 12), atol=1e-4, rtol=0)
    values = fit_values(fit_queries, K, V, first_copy, beta, SCALE)
    keys = K.gather(1, first_copy[..., None].expand(-1, -1, D))
    output_error, mass_error = evaluate(held_out, K, V, None, keys, beta, values, SCALE)
    assert output_error.max() < 1e-4 and mass_error.max() < 1e-4


@pytest.mark.parametrize("method", ["hak", "omp-fast", "topk-evict", "random", "streaming"])
def test_same_seed_same_result(method):
    Q, K, V = structured(H=3, n=128, T=128, seed=6)
    first, second = (compact(Q, K, V, t=16, scale=SCALE, method=method, seed=7) for _ in range(2))
    for name in ("keys", "beta", "values", "idx", "output_error", "mass_error"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_random_depends_on_seed_and_keeps_keys():
    Q, K, V = structured(H=3, n=64, T=128, seed=8)
    a, b = (compact(Q, K, V, t=16, scale=SCALE, method="random", seed=seed) for seed in (0, 1))
    assert not torch.equal(a.idx, b.idx)
    assert torch.equal(a.keys, K.gather(1, a.idx[..., None].expand(-1, -1, D)))
    assert torch.equal(a.values, V.gather(1, a.idx[..., None].expand(-1, -1, D)))
    assert torch.equal(a.beta, torch.zeros(3, 16))


def test_fixed_position_baselines():
    Q, K, V = structured(H=2, n=64, T=100, seed=9)
    assert compact(Q, K, V, t=10, scale=SCALE, method="first").idx.tolist() == [list(range(10))] * 2
    streaming = compact(Q, K, V, t=10, scale=SCALE, method="streaming").idx.tolist()
    assert streaming == [[0, 1, 2, 3, 94, 95, 96, 97, 98, 99]] * 2


@pytest.mark.parametrize("method", ["hak", "omp", "omp-fast"])
def test_am_beats_topk_eviction_on_held_out_queries(method):
    Q, K, V = structured(H=4, n=512, T=256, seed=10)
    fit_queries, held_out = split(Q)
    errors = {}
    for name in (method, "topk-evict"):
        result = compact(fit_queries, K, V, t=32, scale=SCALE, method=name)  # 8x
        errors[name] = evaluate(held_out, K, V, None, result.keys, result.beta, result.values, SCALE)
    am_output, am_mass = errors[method]
    evict_output, evict_mass = errors["topk-evict"]
    assert (am_output < 0.5 * evict_output).all()
    if method != "hak":  # OMP picks keys for the mass fit; top-RMS keys leave some queries' mass uncovered
        assert (am_mass < 0.2 * evict_mass).all()


@pytest.mark.parametrize("method", ["hak", "omp"])
def test_existing_bias_is_reproduced_at_full_budget(method):
    Q, K, V = gaussian(H=2, n=256, T=40, seed=11)
    bias = torch.zeros(2, 40)
    bias[:, 5:15] = math.log(2.0)  # slots of an earlier compaction
    bias[1, 30:33] = -math.inf  # padding slots of a shorter head
    fit_queries, held_out = split(Q)
    result = compact(fit_queries, K, V, t=40, scale=SCALE, bias=bias, method=method)
    assert torch.equal(result.beta.isinf(), bias.isinf())
    finite = bias.isfinite()
    torch.testing.assert_close(result.beta[finite], bias[finite], atol=1e-4, rtol=0)
    output_error, mass_error = evaluate(held_out, K, V, bias, result.keys, result.beta, result.values, SCALE)
    assert output_error.max() < 1e-4 and mass_error.max() < 1e-4
    unbiased_error, _ = evaluate(held_out, K, V, None, result.keys, result.beta, result.values, SCALE)
    assert unbiased_error.min() > 1e-2  # the bias matters, so the check above is not vacuous


def test_padding_keys_are_picked_last():
    Q, K, V = structured(H=2, n=128, T=64, seed=12)
    bias = torch.zeros(2, 64)
    bias[:, :16] = -math.inf
    for idx in (select_omp(Q, K, 48, SCALE, bias=bias), select_highest_attention(Q, K, 48, SCALE, bias=bias)):
        assert idx.min() >= 16


@pytest.mark.parametrize("method", ["hak", "omp-fast"])
def test_heads_are_independent_of_batching(method):
    Q, K, V = structured(H=4, n=128, T=128, seed=13)
    together = compact(Q, K, V, t=16, scale=SCALE, method=method)
    one_by_one = compact(Q, K, V, t=16, scale=SCALE, method=method, chunk_bytes=1)  # one head per chunk
    assert torch.equal(together.idx, one_by_one.idx)
    for name in ("beta", "output_error"):
        torch.testing.assert_close(getattr(together, name), getattr(one_by_one, name), atol=1e-4, rtol=1e-4)
    # the value system of these low-rank keys is ill-conditioned: float32 Gram matrices formed in batches of 4 or 1
    # differ in rounding, and the values by up to ~0.5% (their output error above agrees to 1e-4); a head that
    # leaked into another would differ by O(1)
    torch.testing.assert_close(together.values, one_by_one.values, atol=1e-2, rtol=1e-2)
    alone = compact(Q[2:3], K[2:3], V[2:3], t=16, scale=SCALE, method=method)
    assert torch.equal(together.idx[2:3], alone.idx)


def test_selection_scores_and_unknown_names():
    Q, K, V = structured(H=2, n=64, T=64, seed=14)
    for score in ("rms", "mean", "max"):
        idx = select_highest_attention(Q, K, 8, SCALE, score=score)
        assert (idx.diff(dim=-1) > 0).all()
    with pytest.raises(ValueError):
        select_highest_attention(Q, K, 8, SCALE, score="median")
    with pytest.raises(ValueError):
        compact(Q, K, V, t=8, scale=SCALE, method="nope")
    with pytest.raises(ValueError):
        compact(Q, K, V, t=65, scale=SCALE)
    with pytest.raises(TypeError):
        compact(Q, K, V, t=8, scale=SCALE, method="hak", no_such_knob=1)


def test_parts_of_a_span_fitted_with_its_attention_statistics_keep_the_span_mass():
    # two halves of a span read by two groups of queries (80% mostly read the first half, 20% the second):
    # fitted alone, each half gives every query equal weight; told the span's row max and log-sum-exp, it weighs
    # each query by its share of attention to that half, as one fit of the whole span would
    from agentloop.compaction.solver import row_max_lse

    g = torch.Generator().manual_seed(0)
    H, n, T = 2, 512, 64
    first, second = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    first[..., D // 2:], second[..., :D // 2] = 0, 0
    Q = torch.randn(H, n, D, generator=g)
    reads_first = torch.rand(n, generator=g) < 0.8
    Q[:, reads_first, D // 2:] *= 0.3 / 4
    Q[:, ~reads_first, :D // 2] *= 0.3 / 4
    Q *= 4
    K, V = torch.cat([first, second], 1), torch.randn(H, 2 * T, D, generator=g)
    fit, held_out = split(Q)
    errors = {}
    for span in (None, row_max_lse(fit, K, SCALE)):
        parts = [compact(fit, K[:, lo:lo + T], V[:, lo:lo + T], t=16, scale=SCALE, method="hak", span=span)
                 for lo in (0, T)]
        block = [torch.cat([getattr(p, name) for p in parts], 1) for name in ("keys", "beta", "values")]
        output_error, mass_error = evaluate(held_out, K, V, None, *block, SCALE)
        errors["alone" if span is None else "span"] = (output_error.mean(), mass_error.mean())
    assert errors["span"][1] < 0.7 * errors["alone"][1]
    assert errors["span"][0] < 1.03 * errors["alone"][0]
    same = compact(fit, K, V, t=16, scale=SCALE, method="hak")  # one part that is the whole span: no change
    with_stats = compact(fit, K, V, t=16, scale=SCALE, method="hak", span=row_max_lse(fit, K, SCALE))
    assert torch.allclose(same.beta, with_stats.beta, atol=1e-4) and torch.allclose(same.values, with_stats.values,
                                                                                     atol=1e-3)


def test_span_statistics_streamed_over_key_blocks_equal_one_pass_and_stay_in_the_scratch(monkeypatch):
    # a long span's row max and log-sum-exp are read in key blocks within chunk_bytes (a running max and
    # log-sum-exp), exact, also where a block holds only keys that are off (β = -inf)
    from agentloop.compaction import solver
    from agentloop.compaction.solver import row_max_lse

    g = torch.Generator().manual_seed(1)
    H, n, T = 3, 40, 90
    Q, K, bias = torch.randn(H, n, D, generator=g), torch.randn(H, T, D, generator=g), torch.randn(H, T, generator=g)
    bias[1, :50] = -math.inf
    logits = torch.baddbmm(bias[:, None, :], Q, K.mT, alpha=SCALE)
    largest = []
    real_logits = solver.attention_logits
    monkeypatch.setattr(solver, "attention_logits",
                        lambda *a, **k: largest.append(real_logits(*a, **k).numel() * 4) or real_logits(*a, **k))
    chunk_bytes = 8 * n * 16  # blocks of 16 keys
    row_max, lse = row_max_lse(Q, K, SCALE, bias, chunk_bytes=chunk_bytes)
    assert torch.allclose(row_max, logits.amax(-1)) and torch.allclose(lse, logits.logsumexp(-1), atol=1e-5)
    assert max(largest) <= chunk_bytes // 2 and len(largest) >= T // 16


@pytest.mark.parametrize("structure", ["gaussian", "structured"])
def test_one_gram_values_are_the_mass_weighted_least_squares(structure):
    # the one-Gram path (t² ≥ T·d) solves the value system through the β fit's factorization of G = RᵀR;
    # its values must be the least squares of the outputs with each query weighted by its compact mass ratio D/m,
    # solved here independently in float64 from the compact block's own attention
    Q, K, V = (gaussian(H=2, n=160, T=40, seed=3) if structure == "gaussian"
               else structured(H=2, n=160, T=40, seed=3, rank=12, logit_std=1.0))
    result = compact(Q, K, V, t=12, scale=SCALE, method="hak", one_gram=True)
    Q64, keys, beta = Q.double(), result.keys.double(), result.beta.double()
    ref_logits = SCALE * Q64 @ K.double().mT  # [H, n, T]
    target = ref_logits.softmax(-1) @ V.double()  # [H, n, D]
    logits = SCALE * Q64 @ keys.mT + beta[:, None, :]  # [H, n, t]
    ratio = (logits.logsumexp(-1) - ref_logits.logsumexp(-1)).exp()[..., None]  # D/m per query
    expected = torch.linalg.lstsq(ratio * logits.softmax(-1), ratio * target).solution  # [H, t, D]
    torch.testing.assert_close(result.values.double(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("k", [255, 256, 300, 512])
def test_blocked_gram_equals_the_full_product(k):
    from agentloop.compaction.solver import _gram

    M = torch.randn(2, 96, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    torch.testing.assert_close(_gram(M), M.mT @ M, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("score", ["rms", "mean", "max"])
def test_reference_statistics_in_row_blocks_equal_the_whole_attention(monkeypatch, score):
    from agentloop.compaction import solver

    Q, K, V = gaussian(H=2, n=100, T=40, seed=11)
    bias = torch.randn(2, 40, generator=torch.Generator().manual_seed(1))
    bias[:, :3] = -math.inf  # keys that were padding in an earlier compaction
    monkeypatch.setattr(solver, "ROW_BLOCK_BYTES", (4 * 2 * 40 * 7, 4 * 2 * 40 * 7))  # blocks of 7 query rows
    rowmax, mass, out, scores = solver._reference(Q, K, V, SCALE, bias, score)
    logits = SCALE * Q @ K.mT + bias[:, None, :]
    torch.testing.assert_close(rowmax, logits.amax(-1))
    torch.testing.assert_close(rowmax + mass.log(), logits.logsumexp(-1))
    torch.testing.assert_close(out, logits.softmax(-1) @ V)
    A = logits.softmax(-1)
    expected = {"rms": A.square().mean(1).sqrt(), "mean": A.mean(1), "max": A.amax(1)}[score]
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("one_gram", [True, False])
def test_protected_keys_keep_their_original_values_and_the_rest_is_fitted_around_them(one_gram):
    # 4 protected keys per head: kept with their values V exactly; the other values are the least squares with those
    # fixed, solved here independently in float64 (free columns only, the protected ones' contribution moved to the
    # target); without protection the same slots' values are blended
    Q, K, V = gaussian(H=2, n=200, T=60, seed=5, query_scale=0.5)
    targets = torch.tensor([[7, 19, 33, 50], [3, 28, 41, 55]])
    protect = torch.zeros(2, 60, dtype=torch.bool).scatter_(1, targets, True)
    t = 16
    plain = compact(Q, K, V, t=t, scale=SCALE, method="hak", one_gram=one_gram)
    pinned = compact(Q, K, V, t=t, scale=SCALE, method="hak", one_gram=one_gram, protect=protect)
    blends = []
    for h in range(2):
        kept = pinned.idx[h].tolist()
        assert set(targets[h].tolist()) <= set(kept)
        slots = [kept.index(i) for i in targets[h].tolist()]
        assert torch.equal(pinned.values[h, slots], V[h, targets[h]])
        both = [i for i in targets[h].tolist() if i in plain.idx[h].tolist()]  # also kept without protection
        blends += ((plain.values[h, [plain.idx[h].tolist().index(i) for i in both]] - V[h, both]).norm(dim=-1)
                   / V[h, both].norm(dim=-1)).tolist()
        Q64, keys, beta = Q[h].double(), pinned.keys[h].double(), pinned.beta[h].double()
        ref_logits = SCALE * Q64 @ K[h].double().mT
        target = ref_logits.softmax(-1) @ V[h].double()
        logits = SCALE * Q64 @ keys.mT + beta
        # the one-Gram fit weighs each query by its compact mass ratio (see the one-Gram test above)
        weight = (logits.logsumexp(-1) - ref_logits.logsumexp(-1)).exp()[:, None] if one_gram else torch.ones(len(Q64), 1)
        A, y = weight * logits.softmax(-1), weight * target
        free = [j for j in range(t) if j not in slots]
        expected = torch.linalg.lstsq(A[:, free], y - A[:, slots] @ V[h, targets[h]].double()).solution
        torch.testing.assert_close(pinned.values[h, free].double(), expected, atol=2e-3, rtol=2e-3)
    assert blends and min(blends) > 0.05, blends


def test_protected_keys_are_selected_even_when_their_attention_is_low():
    # the two keys the queries attend to least are not among the 16 attention-ranked ones, unless protected
    Q, K, V = gaussian(H=1, n=200, T=60, seed=6, query_scale=0.5)
    targets = (SCALE * Q @ K.mT).softmax(-1).square().mean(1).sqrt()[0].topk(2, largest=False).indices.tolist()
    protect = torch.zeros(1, 60, dtype=torch.bool)
    protect[0, targets] = True
    plain = compact(Q, K, V, t=16, scale=SCALE, method="hak")
    pinned = compact(Q, K, V, t=16, scale=SCALE, method="hak", protect=protect)
    assert set(targets).isdisjoint(plain.idx[0].tolist()) and set(targets) <= set(pinned.idx[0].tolist())


def test_pooled_selection_brings_a_strong_keys_neighbours_and_still_keeps_every_protected_key():
    # hak-pool max-pools the selection scores over 7 positions: the 3 keys either side of the best-attended one are
    # kept too; 8 spread-out protected keys (whose pooled neighbourhoods alone would cover 56 of the 60 keys) are
    # all kept among the 16, because protection is applied after pooling
    Q, K, V = gaussian(H=1, n=200, T=60, seed=7, query_scale=0.5)
    scores = (SCALE * Q @ K.mT).softmax(-1).square().mean(1).sqrt()[0]
    best = int(scores[3:57].argmax()) + 3
    pooled = compact(Q, K, V, t=16, scale=SCALE, method="hak-pool")
    assert set(range(best - 3, best + 4)) <= set(pooled.idx[0].tolist())
    targets = list(range(3, 60, 8))[:8]
    protect = torch.zeros(1, 60, dtype=torch.bool)
    protect[0, targets] = True
    pinned = compact(Q, K, V, t=16, scale=SCALE, method="hak-pool", protect=protect)
    assert set(targets) <= set(pinned.idx[0].tolist())


def test_values_only_method_keeps_beta_zero_and_its_values_beat_the_kept_keys_own():
    # hak-values: β = 0 on every kept key, values by least squares, so that on the fitting queries the compact
    # block's outputs are closer (in summed squared error) to the full attention than with the same keys' values
    Q, K, V = structured(2, 96, 64, seed=3)
    result = compact(Q, K, V, t=12, scale=SCALE, method="hak-values")
    assert torch.equal(result.beta, torch.zeros_like(result.beta))
    reference, _ = attend(Q, K, V, SCALE)
    rows = result.idx[..., None].expand(-1, -1, D)  # [H, t, D]
    keys = K.gather(1, rows)
    fitted, _ = attend(Q, keys, result.values, SCALE)
    kept, _ = attend(Q, keys, V.gather(1, rows), SCALE)
    assert ((fitted - reference) ** 2).sum() < 0.9 * ((kept - reference) ** 2).sum()
