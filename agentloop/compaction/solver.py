"""Attention Matching (AM) solver: compact T cached keys/values of each KV head into t slots.

For reference queries Q and original logits S = scale·QKᵀ + bias, the compact block (Ck, β, Cv) keeps
  mass:    Σ_j exp(S_j)  ≈  Σ_i exp(scale·q·Ck_i + β_i)
  output:  softmax(S) V  ≈  softmax(scale·QCkᵀ + β) Cv
Ck is always a subset of the rows of K. β = log w, where w ≥ 0 solves a bounded least-squares fit of the
row-max-shifted mass E = exp(S − rowmax(S)); Cv solves a least-squares fit of the outputs.

Every function is batched over a leading head axis H (layers × KV heads may be flattened into it).
Shapes: Q [H, n, d], K [H, T, d], V [H, T, dv], bias [H, T] (may hold −inf for padding slots), all float32.
The bias is the existing β of already-compacted slots; a fitted β replaces it (it is the key's whole bias).
Heads may keep different numbers of keys (`budgets`): every head gets t slots, of which its first budgets[h] are
real and the rest padding (key 0, value 0, β = −inf). Padding slots enter the fits as zero design columns; the
normal equations stay block-diagonal between real and padding slots, the Cholesky jitter keeps the padding
block positive definite, and its zero right-hand side solves to weight 0, so the real slots are fitted exactly
as if the head had been compacted alone to its budget.
Big [H, n, T] tensors are float32; the t×t normal equations are formed and solved in float32 by Cholesky, and the
heads whose factorization fails or whose system is numerically singular in float32 are solved again in float64 (which
tolerates duplicate keys). The per-stage functions process all
heads they are given at once; `compact` and `evaluate` split the heads into memory-bounded chunks.

Protected keys (`protect` [H, T] bool, e.g. where a known task looks): attention-ranked selection keeps them
whatever their score (OMP only keeps their values if it picks them), with their original values V[idx]; the
other values are fitted around them (the least squares with those unknowns fixed) and β is fitted as usual. The
fit matches the outputs a little less well on average, but a token the task will copy from (a number, a name) is
not blended with its evicted neighbours.

Deviation from the paper's recipe (on by default, `active_set_iters=0` turns it off): after lstsq + clamp,
full β fits run an active-set method to the exact bounded-LS optimum. Clamping an unconstrained solution
with large negative entries can leave a mass fit far worse than w = 0 on collinear keys.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_BYTES = 1 << 30  # budget for one [heads, n, T] float32 tensor inside compact/evaluate on a GPU
CPU_CHUNK_BYTES = 16 << 20  # on a CPU: heads in chunks whose [heads, n, T] tensors stay near the last-level cache
JITTER = 1e-12  # float64 Cholesky jitter, relative to the mean diagonal of the Gram matrix; grows ×1e4 on failure
JITTER32 = 1e-8  # float32 Cholesky jitter (relative): makes padding columns definite, moves no fit
COND_TOL = 1.0  # a float32 solve whose condition estimate x float32 eps exceeds this (numerically singular in
# float32) is redone in float64. Not stricter: the fits need a small residual, which a float32 Cholesky solve gives
# at any condition it factors (backward stable); at 1e-4 (solution accurate to ~1e-4) nearly every head of a real
# cache fell back to float64 for the same held-out error (SmolLM2, 24 heads x 1,024 tokens: 22 of 24 heads at 2x)
MIN_WEIGHT = 1e-12  # lower bound on w = exp(β) when no lower β bound is given ("key off", β ≈ −27.6)
ROW_BLOCK_BYTES = (4 << 20, 256 << 20)  # one block of query rows of E in _reference (CPU, CUDA)
GRAM_BLOCK = 128  # columns per block row of a wide Gram matrix (see _gram)
ACTIVE_SET_ITERS = 100  # cap on active-set steps after lstsq + clamp in every full β fit (0: as in the paper)
SINKS = 4  # leading slots kept by the streaming baseline


# ----------------------------------------------------------------------------------------------------
# attention pieces

def attention_logits(Q: Tensor, K: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """S = scale·QKᵀ + bias: [H, n, T]."""
    if bias is None:
        return torch.bmm(Q, K.mT).mul_(scale)
    return torch.baddbmm(bias[:, None, :], Q, K.mT, alpha=scale)


def shifted_exp(Q: Tensor, K: Tensor, scale: float, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """E = exp(S − rowmax(S)) [H, n, T] and rowmax(S) [H, n]. Each row needs at least one finite logit."""
    E = attention_logits(Q, K, scale, bias)
    rowmax = E.amax(-1)
    return E.sub_(rowmax[..., None]).exp_(), rowmax


def attend(Q: Tensor, K: Tensor, V: Tensor, scale: float, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention output [H, n, dv] and log-sum-exp of the logits [H, n]."""
    probs = attention_logits(Q, K, scale, bias)
    lse = probs.logsumexp(-1)
    probs.sub_(lse[..., None]).exp_()
    return torch.bmm(probs, V), lse


def _reference(Q: Tensor, K: Tensor, V: Tensor, scale: float, bias: Tensor | None,
               score: str | None, span_lse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The original attention on the queries, a block of query rows at a time (E is never held whole): row max and
    mass of the logits ([H, n], mass = Σ exp(S − rowmax)), outputs [H, n, dv], and with `score` ("rms", "mean",
    "max") each key's score over the queries of its softmax weights [H, T]: their root mean square, mean or
    maximum. With `span_lse` [H, n] (K is one part of a longer span) the weights are those of a softmax over the
    whole span, so that a query that hardly looks at this part hardly weighs in its scores."""
    H, n, _ = Q.shape
    T = K.shape[1]
    rows = max(1, ROW_BLOCK_BYTES[Q.device.type == "cuda"] // (4 * H * T))
    rowmax, mass = Q.new_empty(H, n), Q.new_empty(H, n)
    out = Q.new_empty(H, n, V.shape[-1])
    scores = None if score is None else Q.new_zeros(H, T)
    if score not in (None, "rms", "mean", "max"):
        raise ValueError(f"unknown score {score!r} (rms, mean, max)")
    for lo in range(0, n, rows):
        E, block_max = shifted_exp(Q[:, lo:lo + rows], K, scale, bias)  # [H, rows, T]
        block_mass = E.sum(-1)
        rowmax[:, lo:lo + rows], mass[:, lo:lo + rows] = block_max, block_mass
        out[:, lo:lo + rows] = torch.bmm(E, V).div_(block_mass[..., None])
        if score is not None:  # softmax weights, over this part or (span_lse) over the whole span
            if span_lse is None:
                A = E.div_(block_mass[..., None])
            else:
                A = E.mul_((block_max - span_lse[:, lo:lo + rows]).exp_()[..., None])
            if score == "max":
                torch.maximum(scores, A.amax(1), out=scores)
            else:
                scores.add_((A.square_() if score == "rms" else A).sum(1))
    if score == "rms":
        scores.div_(n).sqrt_()
    elif score == "mean":
        scores.div_(n)
    return rowmax, mass, out, scores


def _bare_design(Q: Tensor, K: Tensor, idx: Tensor, scale: float, shift: Tensor, keep: Tensor) -> Tensor:
    """exp(scale·Q K[idx]ᵀ − shift) [H, n, t]: the kept keys' columns of exp(S − shift) without their bias (the
    fitted β replaces it), 0 where `keep` [H, t] is False (padding slots, keys that were padding)."""
    logits = torch.bmm(Q, _rows(K, idx).mT).mul_(scale).sub_(shift[..., None])
    return logits.exp_().mul_(keep[:, None, :])


def _columns(E: Tensor, idx: Tensor) -> Tensor:
    """E[h, :, idx[h]]: [H, n, T], [H, k] -> [H, n, k]."""
    return E.gather(2, idx[:, None, :].expand(-1, E.shape[1], -1))


def _rows(K: Tensor, idx: Tensor) -> Tensor:
    """K[h, idx[h], :]: [H, T, d], [H, k] -> [H, k, d]."""
    return K.gather(1, idx[..., None].expand(-1, -1, K.shape[-1]))


def _unbiasing(K: Tensor, bias: Tensor | None) -> Tensor:
    """exp(−bias) per key, 0 for padding keys (bias −inf): [H, T] float32. A column of E times this factor is
    the column of the bare key, since the fitted β is the key's whole logit bias, not an increment."""
    if bias is None:
        return torch.ones(K.shape[:2], device=K.device)
    return torch.where(bias > -math.inf, (-bias.float()).exp(), 0.0)


def _design(E: Tensor, idx: Tensor, unbiasing: Tensor) -> Tensor:
    """Mass design matrix of the bare keys idx: E[h, :, idx[h]] · exp(−bias), [H, n, t] float32."""
    return _columns(E, idx) * unbiasing.gather(1, idx)[:, None, :]


# ----------------------------------------------------------------------------------------------------
# least-squares cores: normal equations [H, k, k] formed and solved in float32; heads whose factorization fails or
# whose system is ill-conditioned are solved again in float64

def _normal_equations(M: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """MᵀM [H, k, k] and MᵀY [H, k, m] for M [H, n, k], Y [H, n, m], in float32."""
    return _gram(M), M.mT @ Y.float()


def _gram(M: Tensor) -> Tensor:
    """MᵀM [H, k, k] for M [H, n, k]. Wide M: only the blocks on and above the diagonal are multiplied (block rows of
    GRAM_BLOCK columns), those below are copied from them, which saves up to half the n·k² multiply-adds."""
    k = M.shape[-1]
    if k < 2 * GRAM_BLOCK:
        return M.mT @ M
    gram = M.new_empty(M.shape[0], k, k)
    for lo in range(0, k, GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, k)
        gram[:, lo:hi, lo:] = M[..., lo:hi].mT @ M[..., lo:]  # [H, b, k - lo]: this block row from the diagonal on
        gram[:, hi:, lo:hi] = gram[:, lo:hi, hi:].mT
    return gram


@dataclass
class _Factor:
    """Cholesky factors of SPD systems [H, k, k]: float32 for the heads it suits, float64 for the `bad` others."""
    chol: Tensor  # [H, k, k] in the gram's dtype (rows of bad heads unused)
    bad: Tensor  # [H] bool: heads factored again in float64
    chol64: Tensor | None  # [bad heads, k, k] float64


def _factor(gram: Tensor, ridge: float = 0.0) -> _Factor:
    """Factor (gram + ridge·I) per head, in float32 with a jitter at float32 round-off (it only makes all-zero padding
    columns definite); a head is factored again in float64 when its float32 factorization fails or its system is
    numerically singular in float32 (condition, estimated from the factor's diagonal over its non-padding columns,
    beyond COND_TOL / eps). A float64 gram is factored in float64 only."""
    if gram.dtype == torch.float64:
        return _Factor(_cholesky64(gram, ridge), torch.zeros(gram.shape[0], dtype=torch.bool, device=gram.device), None)
    diag = gram.diagonal(dim1=1, dim2=2)  # [H, k]
    real = diag > 0
    mean_diag = (diag * real).sum(1) / real.sum(1).clamp_min(1)
    jitter = JITTER32 * mean_diag.clamp_min(torch.finfo(gram.dtype).tiny) + ridge  # [H]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + jitter[:, None, None] * eye)
    pivots = chol.diagonal(dim1=1, dim2=2)
    spread = pivots.where(real, 0.0).amax(1) / pivots.where(real, math.inf).amin(1)  # sqrt of the condition estimate
    bad = (info > 0) | ~(spread.square() * torch.finfo(gram.dtype).eps <= COND_TOL)
    return _Factor(chol, bad, _cholesky64(gram[bad].double(), ridge) if bad.any() else None)


def _factor_solve(factor: _Factor, rhs: Tensor) -> Tensor:
    """x with (gram + ridge·I) x = rhs per head ([H, k, m]), in the factored gram's dtype."""
    x = torch.cholesky_solve(rhs.to(factor.chol.dtype), factor.chol)
    if factor.chol64 is not None:
        x[factor.bad] = torch.cholesky_solve(rhs[factor.bad].double(), factor.chol64).to(x.dtype)
    return x


def _solve_spd(gram: Tensor, rhs: Tensor, ridge: float = 0.0) -> Tensor:
    """Solve (gram + ridge·I) x = rhs per head ([H, k, k], [H, k, m]); the result has the dtype of `gram`
    (float32 unless numerically singular there, else float64, see _factor)."""
    return _factor_solve(_factor(gram, ridge), rhs)


def _cholesky64(gram: Tensor, ridge: float) -> Tensor:
    """Cholesky factor of a float64 gram + jitter·I, the jitter grown ×1e4 for the heads whose factorization fails."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    jitter = JITTER * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(torch.finfo(gram.dtype).tiny) + ridge  # [H]
    for _ in range(3):
        chol, info = torch.linalg.cholesky_ex(gram + jitter[:, None, None] * eye)
        failed = info > 0
        if not failed.any():
            break
        jitter = torch.where(failed, jitter * 1e4, jitter)
    return chol


def _top_eigenvalue(gram: Tensor, iters: int = 3) -> Tensor:
    """Largest eigenvalue of each PSD gram [H, k, k] by power iteration (Rayleigh quotient): [H]."""
    v = torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device)
    for _ in range(iters):
        v = torch.nn.functional.normalize((gram @ v[..., None])[..., 0], dim=-1)
    return (v * (gram @ v[..., None])[..., 0]).sum(-1).clamp_min(torch.finfo(gram.dtype).tiny)


def _face_solve(gram: Tensor, rhs: Tensor, w: Tensor, free: Tensor) -> Tensor:
    """Minimiser of the LS loss over the free variables, the others held at their values in w: [H, k]."""
    held = ~free
    scale = gram.diagonal(dim1=1, dim2=2).mean(1, keepdim=True)  # [H, 1]
    face_gram = gram.masked_fill(held[:, :, None] | held[:, None, :], 0.0) + torch.diag_embed(held * scale)
    face_rhs = torch.where(held, w * scale, rhs - (gram @ (w * held)[..., None])[..., 0])
    return _solve_spd(face_gram, face_rhs[..., None])[..., 0]


def _active_set(gram: Tensor, rhs: Tensor, w: Tensor, w_lo: float, w_hi: float, iters: int) -> Tensor:
    """Box-constrained LS from a feasible w by an active-set method (BVLS-like, releasing every KKT violator
    at once). Each step lowers the loss; it stops at the exact optimum or after `iters` face solves."""
    free = (w > w_lo) & (w < w_hi)
    tol = 1e-10 * rhs.abs().amax(-1, keepdim=True)
    for _ in range(iters):
        z = _face_solve(gram, rhs, w, free)
        below, above = free & (z < w_lo), free & (z > w_hi)
        # longest step towards z that stays feasible; the variables that reach a bound are held there
        ratio = torch.where(below, (w - w_lo) / (w - z), torch.where(above, (w_hi - w) / (z - w), math.inf))
        alpha = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        blocked = (below | above) & (ratio <= alpha)
        w = torch.where(free, w + alpha * (z - w), w)
        w = torch.where(blocked & below, w_lo, torch.where(blocked & above, w_hi, w)).clamp(w_lo, w_hi)
        free &= ~blocked
        # at the optimum of a face, release the held variables whose gradient points into the box
        grad = (gram @ w[..., None])[..., 0] - rhs
        at_face_optimum = ~(below | above).any(-1, keepdim=True)
        release = at_face_optimum & ~free & (((w <= w_lo) & (grad < -tol)) | ((w >= w_hi) & (grad > tol)))
        if not (release.any() or (below | above).any()):
            break
        free |= release
    return w


def _bounded_solve(gram: Tensor, rhs: Tensor, w_lo: float, w_hi: float, pgd_iters: int = 0,
                   active_set_iters: int = 0, factor: _Factor | None = None) -> Tensor:
    """min ||Mw − y||² s.t. w_lo ≤ w ≤ w_hi from gram = MᵀM [H, k, k], rhs = Mᵀy [H, k]: unconstrained solve
    (with `factor`, gram's factorization, when given), clamp, active-set refinement, then projected-gradient steps of
    size 1/σ_max². Returns w [H, k] in gram's dtype."""
    factor = factor or _factor(gram)
    w = _factor_solve(factor, rhs[..., None])[..., 0].to(gram.dtype).clamp(w_lo, w_hi)
    w = _active_set(gram, rhs, w, w_lo, w_hi, active_set_iters)
    if pgd_iters:
        step = 1.0 / _top_eigenvalue(gram)  # [H]
        for _ in range(pgd_iters):
            grad = (gram @ w[..., None])[..., 0] - rhs
            w = (w - step[:, None] * grad).clamp(w_lo, w_hi)
    return w


def _weight_bounds(lo: float | None, hi: float | None) -> tuple[float, float]:
    """β bounds (log space, None = open) -> bounds on w = exp(β)."""
    return (MIN_WEIGHT if lo is None else math.exp(lo)), (math.inf if hi is None else math.exp(hi))


def _fit_weights(M: Tensor, mass: Tensor, w_lo: float, w_hi: float, pgd_iters: int, active_set_iters: int) -> Tensor:
    """Bounded LS weights of the bare-key design M [H, n, t] (zero columns for padding slots) against the mass [H, n]
    of all keys: w [H, t]."""
    gram, rhs = _normal_equations(M, mass[..., None])  # [H, t, t], [H, t, 1]
    return _bounded_solve(gram, rhs[..., 0], w_lo, w_hi, pgd_iters, active_set_iters)


def _to_beta(w: Tensor, slot_unbiasing: Tensor) -> Tensor:
    """β = log w, −inf for padding slots and for keys that were padding in the original block (unbiasing 0): [H, t]."""
    return w.log().masked_fill(slot_unbiasing == 0, -math.inf)


def _fit_values(Q: Tensor, keys: Tensor, beta: Tensor, scale: float, target: Tensor, ridge: float,
                row_weight: Tensor | None = None, pin: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Cv = argmin Σ_q row_weight_q ||X_q Cv − target_q||² + ridge·||Cv||², X = softmax(scale·Q keysᵀ + β);
    `pin` (mask [H, t], original values [H, t, dv]): those slots' values are fixed to the originals.
    Returns (Cv [H, t, dv], X [H, n, t], log-sum-exp of the compact logits [H, n]): X and the lse give the compact
    block's attention on the fitting queries without computing it again."""
    X = attention_logits(Q, keys, scale, beta)  # [H, n, t]
    lse = X.logsumexp(-1)
    X.sub_(lse[..., None]).exp_()
    weighted, target = (X * row_weight.sqrt()[..., None], target * row_weight.sqrt()[..., None]) if row_weight is not None \
        else (X, target)
    gram, rhs = _normal_equations(weighted, target)
    if pin is not None:
        gram, rhs = _pinned_system(gram, rhs, *pin)
    return _solve_spd(gram, rhs, ridge), X, lse


def _pinned_system(gram: Tensor, rhs: Tensor, pinned: Tensor, original: Tensor, scale: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """The normal equations (gram [H, t, t], rhs [H, t, dv]) with the pinned slots' unknowns fixed to `original`
    (0 elsewhere): their columns move to the right-hand side, their rows become c·x_j = c·original_j (c: the mean
    diagonal, so the system keeps its scale). With `scale` (w [H, t]) the unknowns are u = w·v (the one-Gram fit's
    system G u = Rᵀ(…)), fixed to w·original."""
    fixed = original if scale is None else original * scale[..., None]  # [H, t, dv], 0 on free slots
    free = (~pinned).to(gram.dtype)  # [H, t]
    diag = gram.diagonal(dim1=1, dim2=2)
    c = diag.sum(1, keepdim=True) / (diag > 0).sum(1, keepdim=True).clamp_min(1)  # [H, 1]
    system = gram * free[:, :, None] * free[:, None, :] + torch.diag_embed(c * pinned)
    return system, free[..., None] * (rhs - gram @ fixed) + (c * pinned)[..., None] * fixed


def _with_pinned(values: Tensor, pin: tuple[Tensor, Tensor] | None) -> Tensor:
    """The pinned slots' original values, bit for bit (the solve gives them up to round-off)."""
    return values if pin is None else torch.where(pin[0][..., None], pin[1], values)


# ----------------------------------------------------------------------------------------------------
# key selection

def _top_keys(scores: Tensor, t: int) -> Tensor:
    return scores.topk(t, dim=-1).indices.sort(-1).values


def _real_slots(budgets: Tensor, t: int) -> Tensor:
    """True for the first budgets[h] of each head's t slots, the real ones; the rest are padding: [H, t]."""
    return torch.arange(t, device=budgets.device) < budgets[:, None]


def _real_first(idx: Tensor, real: Tensor) -> Tensor:
    """The slot order that puts each head's real keys first, by position, and its padding slots last: [H, t]."""
    return torch.where(real, idx, torch.iinfo(idx.dtype).max).argsort(dim=-1, stable=True)


class _MassPursuit:
    """Greedy orthogonal matching pursuit on the mass residual y − M w, for all heads at once.

    Candidates are ranked by their raw correlation Eᵀ(y − Mw) (E holds each key's current, biased mass).
    Each head owns t slots, of which the first budgets[h] are real; a real slot holds one key as its bare-key
    design column, or is vacant (zero column, w = 0); padding slots stay empty (zero column, w = 0) for good.
    The normal equations G = MᵀM, b = Mᵀy (float32) are updated slot by slot: a refit costs O(t³).
    """

    def __init__(self, E: Tensor, mass: Tensor, budgets: Tensor, t: int, unbiasing: Tensor):
        heads, n, T = E.shape
        self.E, self.mass, self.unbiasing = E, mass, unbiasing  # [H, n, T], [H, n], [H, T]
        on = dict(device=E.device)
        self.idx = torch.zeros(heads, t, dtype=torch.long, **on)
        self.real = _real_slots(budgets, t)  # [H, t]
        self.vacant = self.real.clone()
        self.in_slot = torch.zeros(heads, T, dtype=torch.bool, **on)
        self.demoted = unbiasing == 0  # padding and dropped keys: picked only when nothing else is left
        self.M = torch.zeros(heads, n, t, **on)
        self.G = torch.zeros(heads, t, t, **on)
        self.b = torch.zeros(heads, t, **on)
        self.w = torch.zeros(heads, t, **on)

    def correlations(self) -> Tensor:
        """Eᵀ(y − Mw) per candidate key, lowest for demoted keys, −inf for keys already in a slot: [H, T]."""
        residual = self.mass - (self.M @ self.w[..., None])[..., 0]  # [H, n]
        corr = torch.bmm(residual[:, None, :], self.E)[:, 0]
        corr = corr.masked_fill(self.demoted, torch.finfo(corr.dtype).min)
        return corr.masked_fill(self.in_slot, -math.inf)

    def add(self, k: int, w_new: float) -> None:
        """Put the k best-correlated keys of each head into its first vacant slots."""
        top = self.correlations().topk(k, dim=-1)  # [H, k]
        position = torch.arange(self.idx.shape[1], 0, -1, device=self.idx.device)  # earlier slots rank higher
        slots = (self.vacant * position).topk(k, dim=-1).indices  # [H, k]
        take = self.vacant.gather(1, slots) & (top.values > -math.inf)
        self.idx.scatter_(1, slots, torch.where(take, top.indices, self.idx.gather(1, slots)))
        self.vacant.scatter_(1, slots, self.vacant.gather(1, slots) & ~take)
        self.in_slot.scatter_(1, top.indices, self.in_slot.gather(1, top.indices) | take)
        self.w.scatter_(1, slots, torch.where(take, w_new, self.w.gather(1, slots)))
        new_columns = _design(self.E, top.indices, self.unbiasing)
        columns = torch.where(take[:, None, :], new_columns, _columns(self.M, slots))
        self._set_columns(slots, columns)

    def _set_columns(self, slots: Tensor, columns: Tensor) -> None:
        """M[:, :, slots] = columns ([H, k], [H, n, k]) and the matching rows/columns of G and entries of b."""
        heads, n, t = self.M.shape
        k = slots.shape[1]
        self.M.scatter_(2, slots[:, None, :].expand(heads, n, k), columns)
        cross = columns.mT @ self.M  # [H, k, t]
        self.G.scatter_(1, slots[..., None].expand(heads, k, t), cross)
        self.G.scatter_(2, slots[:, None, :].expand(heads, t, k), cross.mT)
        self.b.scatter_(1, slots, (columns.mT @ self.mass[..., None])[..., 0])

    def refit(self, w_lo: float, w_hi: float, active_set_iters: int) -> None:
        w = _bounded_solve(self.G, self.b, w_lo, w_hi, active_set_iters=active_set_iters)
        self.w = w.masked_fill(self.vacant | ~self.real, 0.0)

    def fill(self, k_choice: int, refit_every: int, w_lo: float, w_hi: float, active_set_iters: int) -> None:
        """Greedily fill every vacant slot. Refit (lstsq + clamp) every `refit_every` steps; the last refit
        also runs up to `active_set_iters` active-set steps."""
        step = 0
        while self.vacant.any():
            self.add(min(k_choice, int(self.vacant.sum(1).max())), w_lo)
            step += 1
            if not self.vacant.any():
                self.refit(w_lo, w_hi, active_set_iters)
            elif step % refit_every == 0:
                self.refit(w_lo, w_hi, 0)

    def drop(self, w_min: float) -> bool:
        """Vacate slots whose weight fell below w_min and demote their keys for good. Returns whether any did."""
        dropped = self.real & ~self.vacant & (self.w < w_min)  # [H, t]
        if not dropped.any():
            return False
        keys = self.idx.masked_select(dropped)
        heads = dropped.nonzero()[:, 0]
        self.in_slot[heads, keys] = False
        self.demoted[heads, keys] = True
        self.vacant |= dropped
        self.w.masked_fill_(dropped, 0.0)
        self.M.masked_fill_(dropped[:, None, :], 0.0)
        self.G.masked_fill_(dropped[:, None, :] | dropped[:, :, None], 0.0)
        self.b.masked_fill_(dropped, 0.0)
        return True


def _pursue(E: Tensor, mass: Tensor, budgets: Tensor, t: int, unbiasing: Tensor, k_choice: int, refit_every: int,
            beta_max: float, drop_below: float | None, max_rounds: int,
            active_set_iters: int) -> tuple[Tensor, Tensor]:
    """OMP selection of budgets[h] keys per head on E [H, n, T]: (idx [H, t] with the real keys first, ascending,
    weights [H, t] from the final bounded fit, 0 on padding slots)."""
    w_lo, w_hi = _weight_bounds(None, beta_max)
    pursuit = _MassPursuit(E, mass, budgets, t, unbiasing)
    pursuit.fill(k_choice, refit_every, w_lo, w_hi, active_set_iters)
    for _ in range(max_rounds if drop_below is not None else 0):
        if not pursuit.drop(math.exp(drop_below)):
            break
        pursuit.fill(k_choice, refit_every, w_lo, w_hi, active_set_iters)
    order = _real_first(pursuit.idx, pursuit.real)
    return pursuit.idx.gather(1, order), pursuit.w.gather(1, order).float()


# ----------------------------------------------------------------------------------------------------
# public per-stage functions (each recomputes E for the heads it is given)

def key_scores(Q: Tensor, K: Tensor, scale: float, bias: Tensor | None = None, score: str = "rms") -> Tensor:
    """Each key's RMS (or mean, max) softmax weight over the queries: [H, T]."""
    no_values = K.new_empty(*K.shape[:2], 0)  # only the scores are wanted: outputs of width 0
    return _reference(Q.float(), K.float(), no_values.float(), scale, bias.float() if bias is not None else None,
                      score)[3]


def select_highest_attention(Q: Tensor, K: Tensor, t: int, scale: float, bias: Tensor | None = None,
                             score: str = "rms") -> Tensor:
    """The t keys with the highest RMS (or mean, max) softmax weight over the queries: idx [H, t], ascending."""
    return _top_keys(key_scores(Q, K, scale, bias, score), t)


def select_omp(Q: Tensor, K: Tensor, t: int, scale: float, bias: Tensor | None = None, k_choice: int = 1,
               refit_every: int = 1, beta_max: float = 7.0, drop_below: float | None = -7.0,
               max_rounds: int = 3, active_set_iters: int = ACTIVE_SET_ITERS) -> Tensor:
    """Greedy OMP on the exp-space mass residual (see `_MassPursuit`): idx [H, t], ascending."""
    E, _ = shifted_exp(Q, K, scale, bias)
    budgets = torch.full(K.shape[:1], t, device=K.device)
    return _pursue(E, E.sum(-1), budgets, t, _unbiasing(K, bias), k_choice, refit_every, beta_max, drop_below,
                   max_rounds, active_set_iters)[0]


def fit_beta(Q: Tensor, K: Tensor, idx: Tensor, scale: float, bias: Tensor | None = None, lo: float | None = -3.0,
             hi: float | None = 3.0, pgd_iters: int = 2, active_set_iters: int = ACTIVE_SET_ITERS) -> Tensor:
    """β [H, t] for the keys K[idx]: bounded LS fit of the shifted mass with lo ≤ β ≤ hi
    (lo None: w = exp(β) ≥ 1e-12; hi None: no upper bound)."""
    E, _ = shifted_exp(Q, K, scale, bias)
    slot_unbiasing = _unbiasing(K, bias).gather(1, idx)
    w = _fit_weights(_columns(E, idx) * slot_unbiasing[:, None, :], E.sum(-1), *_weight_bounds(lo, hi), pgd_iters,
                     active_set_iters)
    return _to_beta(w, slot_unbiasing)


def fit_values(Q: Tensor, K: Tensor, V: Tensor, idx: Tensor, beta: Tensor, scale: float, bias: Tensor | None = None,
               ridge: float = 0.0) -> Tensor:
    """Cv [H, t, dv] so that softmax(scale·Q K[idx]ᵀ + β) Cv matches softmax(S) V in least squares."""
    out, _ = attend(Q, K, V, scale, bias)
    return _fit_values(Q, _rows(K, idx), beta, scale, out, ridge)[0]


# ----------------------------------------------------------------------------------------------------
# methods and the end-to-end entry point

@dataclass(frozen=True)
class Method:
    """A compaction method: how keys are selected and whether β and Cv are fitted (AM) or kept (eviction)."""
    selector: str  # "attention" | "omp" | "random" | "first" | "streaming"
    fit: bool  # True: AM (fit β and Cv); False: eviction (β = original bias, Cv = V[idx])
    score: str = "rms"  # attention selector
    pool: int = 0  # attention selector: max-pool scores over this many neighbouring positions (SnapKV uses 7)
    lo: float | None = -3.0  # β bounds of the attention selector's fit
    hi: float | None = 3.0
    pgd_iters: int = 2
    active_set_iters: int = ACTIVE_SET_ITERS  # exact bounded LS in full β fits (0: lstsq + clamp, as the paper)
    k_choice: int = 1  # OMP knobs
    refit_every: int = 1
    beta_max: float = 7.0
    drop_below: float | None = -7.0
    max_rounds: int = 3
    ridge: float = 0.0  # value fit
    # one Gram for both fits (see _fit_one_gram): True, False, or None = when the t×t Gram dominates the work
    # (t² ≥ T·d) and the span is fitted whole
    one_gram: bool | None = None


METHODS: dict[str, Method] = {
    "hak": Method("attention", fit=True, active_set_iters=0),  # lstsq + clamp + 2 PGD steps, as the paper
    "hak-pool": Method("attention", fit=True, active_set_iters=0, pool=7),  # ... a strong key brings its neighbours
    "hak-values": Method("attention", fit=True, active_set_iters=0, lo=0.0, hi=0.0),  # ... β = 0, values fitted
    "omp": Method("omp", fit=True),
    "omp-fast": Method("omp", fit=True, k_choice=4, refit_every=2),
    "topk-evict": Method("attention", fit=False, score="mean"),
    "snapkv-evict": Method("attention", fit=False, score="mean", pool=7),
    "random": Method("random", fit=False),
    "first": Method("first", fit=False),
    "streaming": Method("streaming", fit=False),
}

STAGES = ("reference", "selection", "beta", "values", "stats")


@dataclass
class CompactResult:
    keys: Tensor  # [H, t, d], rows of K; padding slots (past a head's budget, always last) hold 0
    beta: Tensor  # [H, t], −inf on padding slots
    values: Tensor  # [H, t, dv], 0 on padding slots
    idx: Tensor  # [H, t], positions in K, ascending over each head's real slots
    output_error: Tensor  # [H], mean relative output error on the fitting queries
    mass_error: Tensor  # [H], mean |mass ratio − 1| on the fitting queries
    seconds: dict[str, float]  # wall time per stage (STAGES), summed over head chunks


def _fixed_indices(selector: str, H: int, T: int, t: int, seed: int) -> Tensor | None:
    """Indices of the selectors that never look at the data, most wanted first (a head with budget b keeps the
    first b): [H, t], on the CPU (None for the other selectors)."""
    if selector == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(H, T, generator=generator).topk(t, dim=-1).indices
    if selector == "first":
        return torch.arange(t).expand(H, t)
    if selector == "streaming":  # the sinks, then the newest slots, newest first
        sinks = min(SINKS, t)
        return torch.cat([torch.arange(sinks), torch.arange(T - 1, T - 1 - t + sinks, -1)]).expand(H, t)
    return None


def head_bytes(rows: int, span: int, kept: int, head_dim: int) -> int:
    """Scratch of one head's compaction (fp32): its keys, values and queries, the shifted exponentials [rows, span]
    and a block of attention scores, the design and softmax matrices [rows, kept], and the kept x kept systems (the
    Gram matrices, a Cholesky factor, their float64 fallback)."""
    return 4 * ((2 * span + rows) * head_dim + rows * span + 256 * span + 2 * rows * kept + 8 * kept * kept)


def default_chunk_bytes(device: torch.device) -> int:
    return CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES


def _head_chunks(H: int, n: int, T: int, chunk_bytes: int) -> list[slice]:
    size = max(1, chunk_bytes // (4 * n * T))
    return [slice(start, min(start + size, H)) for start in range(0, H, size)]


def _errors(out: Tensor, lse: Tensor, ref_out: Tensor, ref_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Mean relative output error and mean |exp(lse − ref_lse) − 1| per head: ([H], [H])."""
    tiny = torch.finfo(out.dtype).tiny
    relative = (out - ref_out).norm(dim=-1) / ref_out.norm(dim=-1).clamp_min(tiny)  # [H, n]
    return relative.mean(-1), (lse - ref_lse).exp().sub(1).abs().mean(-1)


def _compact_chunk(Q: Tensor, K: Tensor, V: Tensor, budgets: Tensor, t: int, scale: float, bias: Tensor | None,
                   method: Method, fixed_idx: Tensor | None, span: tuple[Tensor, Tensor] | None,
                   seconds: dict[str, float], protect: Tensor | None = None) -> tuple[Tensor, ...]:
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] += now - clock
        clock = now

    ranks = method.selector == "attention" and fixed_idx is None
    rowmax, mass, ref_out, scores = _reference(Q, K, V, scale, bias, method.score if ranks else None,
                                               span[1] if span is not None else None)  # [h, n], ...
    ref_lse, shift, share = rowmax + mass.log(), rowmax, None
    if span is not None:  # one part of a longer span: E shifted by the span's row max, so that each query weighs in
        span_max, span_lse = span  # the fits by its attention to this part, as it would in one fit of the span
        mass, shift = mass * (rowmax - span_max).exp(), span_max
        share = (ref_lse - span_lse).exp()  # [h, n]: this part's share of each query's attention to the span
    unbiasing = _unbiasing(K, bias)
    lap("reference")

    real = _real_slots(budgets, t)  # [h, t]
    weights = None
    if method.selector == "omp":
        E = attention_logits(Q, K, scale, bias).sub_(shift[..., None]).exp_()  # [h, n, T]
        idx, weights = _pursue(E, mass, budgets, t, unbiasing, method.k_choice, method.refit_every, method.beta_max,
                               method.drop_below, method.max_rounds, method.active_set_iters)
        del E
    else:
        ranked = _ranked_keys(scores, t, method, protect) if ranks else fixed_idx.to(K.device)  # [h, t]
        idx = ranked.gather(1, _real_first(ranked, real))  # each head keeps its first budgets[h] ranked keys
    keys = _rows(K, idx).masked_fill(~real[..., None], 0.0)
    slot_unbiasing = unbiasing.gather(1, idx) * real  # [h, t], 0 on padding slots
    pin = None
    if method.fit and protect is not None:
        pinned = protect.gather(1, idx) & real  # [h, t]
        pin = (pinned, _rows(V, idx).masked_fill(~pinned[..., None], 0.0)) if pinned.any() else None
    lap("selection")

    one_gram = method.one_gram if method.one_gram is not None else t * t >= K.shape[1] * K.shape[2]
    if method.fit and method.selector != "omp" and one_gram and span is None and not method.ridge:
        design = _bare_design(Q, K, idx, scale, shift, slot_unbiasing > 0)
        beta, values, compact_out = _fit_one_gram(design, mass, slot_unbiasing, ref_out, rowmax, method, lap, pin)
        values = _with_pinned(values.masked_fill(~real[..., None], 0.0), pin)
        output_error, mass_error = _errors(*compact_out, ref_out, ref_lse)
        lap("stats")
        return keys, beta, values, idx, output_error, mass_error

    if not method.fit:
        beta = bias.gather(1, idx) if bias is not None else torch.zeros(idx.shape, device=K.device)
        beta = beta.masked_fill(~real, -math.inf)
    else:
        if weights is None:
            weights = _fit_weights(_bare_design(Q, K, idx, scale, shift, slot_unbiasing > 0), mass,
                                   *_weight_bounds(method.lo, method.hi), method.pgd_iters, method.active_set_iters)
        beta = _to_beta(weights, slot_unbiasing)
    lap("beta")

    # fitted values of padding slots solve to 0 (their softmax column is 0); evicted ones are zeroed here
    if method.fit:
        values, X, lse = _fit_values(Q, keys, beta, scale, ref_out, method.ridge, share, pin)
        values = _with_pinned(values.masked_fill(~real[..., None], 0.0), pin)
        lap("values")
        compact_out = torch.bmm(X, values), lse
    else:
        values = _rows(V, idx).masked_fill(~real[..., None], 0.0)
        lap("values")
        compact_out = attend(Q, keys, values, scale, beta)
    output_error, mass_error = _errors(*compact_out, ref_out, ref_lse)
    lap("stats")
    return keys, beta, values, idx, output_error, mass_error


def _fit_one_gram(design: Tensor, mass: Tensor, slot_unbiasing: Tensor, ref_out: Tensor, rowmax: Tensor,
                  method: Method, lap, pin: tuple[Tensor, Tensor] | None = None
                  ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """β and values from one Gram matrix G = Rᵀ R of the relative design R = design / mass (design: the kept bare
    keys' columns of E, see _bare_design; it is overwritten).

    β: the bounded LS fit of each query's mass *ratio* (Σ_j R_qj w_j ≈ 1: every query weighs alike, instead of in
    proportion to its mass). Values: the least squares of the outputs with each query weighted by (D_q / mass_q)²,
    D_q = Σ_j M_qj w_j its compact mass (≈ 1 once β fits). Then the value system is W G W, W = diag(w) > 0, with
    right-hand side W Rᵀ (D/mass ⊙ Y), so the values are W⁻¹ G⁻¹ Rᵀ (D/mass ⊙ Y): the second t×t Gram, the dominant
    cost at low ratios, is never formed, and G's factorization from the β fit is used again (with pinned slots, G
    reduced to the free ones is factored once more).
    Returns (β [h, t], values [h, t, dv], the compact block's (outputs, lse) on the fitting queries)."""
    R = design.div_(mass[..., None])  # [h, n, t]
    gram = _gram(R)  # [h, t, t]
    factor = _factor(gram)
    w = _bounded_solve(gram, R.sum(1), *_weight_bounds(method.lo, method.hi), method.pgd_iters, method.active_set_iters,
                       factor=factor)
    beta = _to_beta(w, slot_unbiasing)
    lap("beta")
    ratio = (R @ w[..., None])[..., 0].clamp_min(torch.finfo(R.dtype).tiny)  # D / mass: [h, n]
    rhs = R.mT @ (ref_out * ratio[..., None])  # [h, t, dv]
    if pin is None:
        values = _factor_solve(factor, rhs).to(R.dtype) / w[..., None]
    else:
        values = _solve_spd(*_pinned_system(gram, rhs, *pin, scale=w)).to(R.dtype) / w[..., None]
    lap("values")
    out = torch.bmm(R.mul_(w[:, None, :]), values) / ratio[..., None]  # softmax over the compact block, times values
    return beta, values, (out, rowmax + (ratio * mass).log())


def _ranked_keys(scores: Tensor, t: int, method: Method, protect: Tensor | None = None) -> Tensor:
    """The t keys with the highest attention score (scores [h, T], see _reference), best first: [h, t];
    protected keys ([h, T] bool) first of all (after pooling, so that only they, not their neighbours, come first)."""
    if method.pool > 1:  # neighbours of a strong key count as strong: [h, 1, T] -> [h, T]
        scores = torch.nn.functional.max_pool1d(scores[:, None], method.pool, stride=1, padding=method.pool // 2)[:, 0]
    if protect is not None:
        scores = scores.masked_fill(protect, math.inf)
    return scores.topk(t, dim=-1).indices


def compact(Q: Tensor, K: Tensor, V: Tensor, t: int, scale: float, bias: Tensor | None = None,
            method: str = "hak", seed: int = 0, chunk_bytes: int | None = None, budgets: Tensor | None = None,
            span: tuple[Tensor, Tensor] | None = None, protect: Tensor | None = None, **knobs) -> CompactResult:
    """Compact K, V ([H, T, d], [H, T, dv]) to t slots per head with a named method (see METHODS);
    `knobs` override the method's fields. Works in float32; heads are solved in memory-bounded chunks.
    `budgets` [H] (integers in [1, t]) gives head h only budgets[h] real slots, the rest of its t slots padding:
    a head's block equals that of compacting it alone to its budget, padded (see the module docstring).
    `span` (row max, log-sum-exp [H, n], see `row_max_lse`) says K, V are one part of a longer span: keys are then
    ranked by their weight in a softmax over the whole span, and the fits weigh each query by this part's share of
    its attention to the whole span. `protect` [H, T] bool: keys kept
    with their original values (see the module docstring)."""
    H, T, _ = K.shape
    if not 0 < t <= T:
        raise ValueError(f"t must be in [1, {T}], got {t}")
    budgets = torch.full((H,), t) if budgets is None else budgets.long()
    if budgets.shape != (H,) or budgets.min() < 1 or budgets.max() > t:
        raise ValueError(f"budgets must be {H} integers in [1, {t}], got shape {tuple(budgets.shape)}")
    budgets = budgets.to(K.device)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    config = dataclasses.replace(METHODS[method], **knobs)
    Q, K, V = Q.float(), K.float(), V.float()
    bias = bias.float() if bias is not None else None
    fixed_idx = _fixed_indices(config.selector, H, T, t, seed)
    seconds = dict.fromkeys(STAGES, 0.0)
    parts = []
    for heads in _head_chunks(H, Q.shape[1], T, chunk_bytes or default_chunk_bytes(K.device)):
        parts.append(_compact_chunk(Q[heads], K[heads], V[heads], budgets[heads], t, scale,
                                    bias[heads] if bias is not None else None, config,
                                    fixed_idx[heads] if fixed_idx is not None else None,
                                    (span[0][heads], span[1][heads]) if span is not None else None, seconds,
                                    protect[heads].to(K.device) if protect is not None else None))
    keys, beta, values, idx, output_error, mass_error = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
    return CompactResult(keys, beta, values, idx, output_error, mass_error, seconds)


def row_max_lse(Q: Tensor, K: Tensor, scale: float, bias: Tensor | None = None,
                chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Row max and log-sum-exp of the logits of Q [H, n, d] against all keys K [H, T, d]: ([H, n], [H, n]).

    Streamed over heads and, when one head's [n, T] logits exceed `chunk_bytes`, over blocks of keys (a running max
    and log-sum-exp; exact), so that a span of any length fits the scratch budget."""
    chunk_bytes = chunk_bytes or default_chunk_bytes(K.device)
    n, T = Q.shape[1], K.shape[1]
    block = max(1, min(T, chunk_bytes // (8 * n)))  # keys per block: its logits and their exp within chunk_bytes
    parts = []
    for heads in _head_chunks(K.shape[0], n, block, chunk_bytes // 2):
        q = Q[heads].float()
        row_max = lse = None
        for lo in range(0, T, block):
            S = attention_logits(q, K[heads, lo:lo + block].float(), scale,
                                 bias[heads, lo:lo + block].float() if bias is not None else None)
            block_max, block_lse = S.amax(-1), S.logsumexp(-1)
            del S
            row_max = block_max if row_max is None else torch.maximum(row_max, block_max)
            lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
        parts.append((row_max, lse))
    row_max, lse = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
    return row_max, lse


def evaluate(Q: Tensor, K: Tensor, V: Tensor, bias: Tensor | None, keys: Tensor, beta: Tensor, values: Tensor,
             scale: float, chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Errors of the compact block on (held-out) queries: (mean relative output error [H], mean mass error [H])."""
    Q, K, V = Q.float(), K.float(), V.float()
    parts = []
    for heads in _head_chunks(K.shape[0], Q.shape[1], K.shape[1], chunk_bytes or default_chunk_bytes(K.device)):
        reference = attend(Q[heads], K[heads], V[heads], scale, bias[heads].float() if bias is not None else None)
        compacted = attend(Q[heads], keys[heads].float(), values[heads].float(), scale, beta[heads].float())
        parts.append(_errors(*compacted, *reference))
    output_error, mass_error = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
    return output_error, mass_error
