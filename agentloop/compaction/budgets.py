"""Non-uniform compaction budgets: how many slots each (layer, KV head) keeps.

A budget file holds proportions, not slot counts, so one file serves every span length and ratio:

    {"format": "agentloop-head-budgets/1", "model": "smollm2-135m", "layers": 30, "kv_heads": 3,
     "proportions": [[p(0, 0), p(0, 1), p(0, 2)], ...],   # [layers][kv_heads], summing to 1
     "method": "...", "calibration": {...}}

`layers` counts the compactable (full-attention) layers, in order. `head_budgets` turns proportions into slots
for one span: the same total as uniform compaction (layers × kv_heads × t), each head in [1, span length].
The cache stores a layer at its largest head budget and pads the other heads (β = −inf), so a file that
varies budgets within a layer costs padding bytes (see compact_span's `padding_fraction`).

Calibration (`calibrate`, `python -m agentloop.compaction.budgets MODEL --out FILE`), a cheap stand-in for the
paper's influence curves: on a few texts of real prose the model prefills, every head is compacted with AM-HAK
(the am-hak-fast solver, repeat-prefill queries) to each budget of a grid around the target ratio (GRID × T/ratio
slots), and its attention-output error is measured on held-out queries (every 4th repeat-prefill query; the
others fit, as many as am-hak-fast fits to, so that large budgets do not overfit).
With the errors averaged over texts, a greedy exchange allocates the uniform total: every head starts at the
smallest grid budget, and the head whose next grid step removes the most error per added slot steps up, until
the total is spent. With `--padded` the total counts padding (every head of a layer held at the layer's largest
budget), so a head catches up with its layer's largest budget for free. Proportions are the resulting budgets,
normalised. The objective is the mean relative output error over heads, what AM fits; the calibration texts
(from essay CALIBRATION_ESSAY on) are disjoint from the fidelity eval's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

from agentloop.errors import AgentloopError

FORMAT = "agentloop-head-budgets/1"
CALIBRATION_ESSAY = 24  # first essay of the calibration texts (the fidelity eval uses essays 0 to 5)
GRID = (0.25, 0.5, 1.0, 2.0, 4.0)  # calibration budgets, as multiples of the uniform budget T/ratio
METHOD = ("greedy exchange on held-out AM-HAK output-error curves per head at budgets {grid} of {tokens} tokens "
          "(ratio {ratio:g}), repeat-prefill queries, {texts} prose texts")


# ----------------------------------------------------------------------------------------------------
# files

def load_budgets(path: str | Path, geometry: tuple[int, int]) -> Tensor:
    """Proportions [layers, kv_heads] (float64, summing to 1) from a budget file, checked against the model's
    geometry (compactable layers, KV heads), e.g. (len(cache.compactable), cache.kv_heads)."""
    path = Path(path)
    if not path.is_file():
        raise AgentloopError(f"budget file {path} not found; compute one with "
                             f"`python -m agentloop.compaction.budgets MODEL --out {path}`")
    try:
        data = json.loads(path.read_text())
        proportions = torch.tensor(data["proportions"], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise AgentloopError(f"budget file {path} is not a budget file ({exc}); expected JSON with "
                             "'proportions': [layers][kv_heads]") from None
    layers, heads = geometry
    if proportions.shape != (layers, heads):
        raise AgentloopError(f"budget file {path} (model {data.get('model', '?')}) has proportions of shape "
                             f"{list(proportions.shape)}, but this model has {layers} compactable layers × {heads} "
                             "KV heads; compute a file for this model")
    if not torch.isfinite(proportions).all() or proportions.min() < 0 or proportions.sum() <= 0:
        raise AgentloopError(f"budget file {path}: proportions must be finite, non-negative, with a positive sum")
    return proportions / proportions.sum()


def save_budgets(path: str | Path, proportions: Tensor, model: str, method: str, calibration: dict) -> None:
    layers, heads = proportions.shape
    data = {"format": FORMAT, "model": model, "layers": layers, "kv_heads": heads,
            "proportions": [[round(float(p), 8) for p in row] for row in proportions / proportions.sum()],
            "method": method, "calibration": calibration}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------
# proportions -> slots

def _bounded_shares(p: Tensor, total: int, lo: int, hi: int) -> Tensor:
    """x = clamp(c·p, lo, hi) with Σx = total (c found by bisection): real-valued shares [heads], float64.
    Heads pushed to a bound give their excess (or shortfall) to the others, in proportion to p."""
    p = p.clamp_min(1e-12)  # a zero proportion still grows once every other head is at hi
    c_lo, c_hi = 0.0, hi / float(p.min())  # at c_hi every head is at hi
    for _ in range(200):
        c = (c_lo + c_hi) / 2
        if float((c * p).clamp(lo, hi).sum()) < total:
            c_lo = c
        else:
            c_hi = c
    return (c_hi * p).clamp(lo, hi)


def head_budgets(proportions: Tensor, total_slots: int, span_len: int) -> Tensor:
    """Integer slots per head [layers, kv_heads] (long) summing to `total_slots`, each in [1, span_len]:
    shares ∝ proportions within the bounds, rounded by largest remainder. For the same bytes of real slots as
    uniform compaction to t slots per head, total_slots = layers × kv_heads × t."""
    heads = proportions.numel()
    if not heads <= total_slots <= heads * span_len:
        raise ValueError(f"total_slots must be in [{heads}, {heads * span_len}] ({heads} heads, span of "
                         f"{span_len}), got {total_slots}")
    shares = _bounded_shares(proportions.double().flatten(), total_slots, 1, span_len)  # [heads]
    slots = shares.floor()
    remainder = (shares - slots).masked_fill(slots >= span_len, -1.0)
    missing = total_slots - int(slots.sum())
    slots[remainder.topk(missing).indices] += 1
    return slots.long().view(proportions.shape)


def stored_slots(budgets: Tensor) -> int:
    """Slots the cache holds for budgets [layers, kv_heads]: every head of a layer at the layer's largest budget."""
    return budgets.shape[1] * int(budgets.amax(1).sum())


def head_budgets_within(proportions: Tensor, max_stored: int, span_len: int) -> Tensor:
    """The head_budgets with the most real slots whose padded layers hold at most `max_stored` slots (for the
    bytes of uniform compaction to t slots per head, max_stored = layers × kv_heads × t): [layers, kv_heads]."""
    lo, hi = proportions.numel(), min(max_stored, proportions.numel() * span_len)
    while lo < hi:  # bisection on the real total; padding grows with it
        mid = (lo + hi + 1) // 2
        if stored_slots(head_budgets(proportions, mid, span_len)) <= max_stored:
            lo = mid
        else:
            hi = mid - 1
    return head_budgets(proportions, lo, span_len)


# ----------------------------------------------------------------------------------------------------
# calibration

def head_errors(Q: Tensor, K: Tensor, V: Tensor, scale: float, grid: list[int]) -> Tensor:
    """Held-out AM-HAK output error of every head compacted to each grid budget: [H, len(grid)].
    Q [H, n, d] (every 4th row evaluates, the others fit), K [H, T, d], V [H, T, dv]."""
    from agentloop.compaction.solver import compact, evaluate

    evaluates = torch.arange(Q.shape[1], device=Q.device) % 4 == 3
    fit, held_out = Q[:, ~evaluates], Q[:, evaluates]
    errors = []
    for t in grid:
        result = compact(fit, K, V, t, scale, method="hak")
        errors.append(evaluate(held_out, K, V, None, result.keys, result.beta, result.values, scale)[0])
    return torch.stack(errors, dim=1)


def _spent_and_costs(now: Tensor, after: Tensor, kv_heads: int | None) -> tuple[float, Tensor]:
    """Slots held with budgets `now` [H], and what each head stepping to `after` [H] adds: real slots, or with
    `kv_heads` (rows ordered layer by layer) padded slots, every head of a layer held at its largest budget."""
    if kv_heads is None:
        return float(now.sum()), after - now
    layer_max = now.view(-1, kv_heads).amax(1).repeat_interleave(kv_heads)  # [H]: the largest budget in h's layer
    return float(layer_max.sum()), kv_heads * (after - layer_max).clamp_min(0)


def allocate(errors: Tensor, grid: list[int], total: int, kv_heads: int | None = None) -> Tensor:
    """Greedy exchange on error curves errors [H, G] measured at ascending budgets grid [G]: start every head at
    grid[0], step up the head with the largest error drop per added slot while it lowers the error and the slots
    held stay within `total`. With `kv_heads` the slots are counted padded (see _spent_and_costs): a head below
    its layer's largest budget steps up for free. Returns slots per head [H] (long)."""
    heads, levels = errors.shape
    budgets = torch.tensor(grid, dtype=torch.float64)
    level = torch.zeros(heads, dtype=torch.long)
    while True:
        step_up = (level + 1).clamp(max=levels - 1)
        spent, cost = _spent_and_costs(budgets[level], budgets[step_up], kv_heads)
        drop = errors.gather(1, level[:, None])[:, 0] - errors.gather(1, step_up[:, None])[:, 0]
        gain = (drop / cost.clamp_min(1e-9)).masked_fill((level == levels - 1) | (spent + cost > total), -math.inf)
        best = int(gain.argmax())
        if not gain[best] > 0:
            return budgets[level].long()
        level[best] += 1


def calibrate(loaded, texts: int = 3, tokens: int = 1600, ratio: float = 10.0, max_queries: int = 4096,
              seed: int = 0, padded: bool = False) -> tuple[Tensor, Tensor, list[int]]:
    """(proportions [layers, kv_heads], held-out errors [layers, kv_heads, G] averaged over texts, grid budgets).
    `padded`: allocate the bytes of uniform compaction, padding included, rather than its real slots."""
    from agentloop import Session
    from agentloop.compaction.queries import repeat_queries, subsample
    from agentloop.evals.text import prose_ids

    uniform = tokens / ratio
    grid = sorted({min(tokens, max(1, round(uniform * m))) for m in GRID})
    errors = []
    for k in range(texts):
        ids = prose_ids(loaded.tokenizer, tokens, start_essay=CALIBRATION_ESSAY + 3 * k)
        session = Session(loaded)
        for _ in session.feed(ids):
            pass
        cache, layers = session.cache, session.cache.compactable
        queries = subsample(repeat_queries(session, ids), max_queries, seed + k)  # {layer: [kv_heads, n, d]}
        scale = session.model.model.layers[layers[0]].self_attn.scaling
        # every compactable layer stacked: [layers * kv_heads, ...]
        Q = torch.cat([queries[i] for i in layers])
        K, V = (torch.cat([getattr(cache.layers[i], name)[0] for i in layers]).float() for name in ("keys", "values"))
        errors.append(head_errors(Q, K, V, scale, grid))
    mean_errors = torch.stack(errors).mean(0)  # [layers * kv_heads, G]
    shape = (len(layers), cache.kv_heads)
    slots = allocate(mean_errors, grid, round(uniform * mean_errors.shape[0]), cache.kv_heads if padded else None)
    slots = slots.double()
    return (slots / slots.sum()).view(shape), mean_errors.view(*shape, -1), grid


def describe(proportions: Tensor) -> str:
    """A few lines: spread of the proportions relative to uniform, and where the budget goes."""
    layers, heads = proportions.shape
    relative = (proportions * proportions.numel()).flatten().tolist()  # 1.0 = uniform
    per_layer = proportions.sum(1)
    top = per_layer.topk(min(3, layers)).indices.tolist()
    return "\n".join([
        f"{layers} layers × {heads} KV heads; proportion relative to uniform: min {min(relative):.2f}, "
        f"median {statistics.median(relative):.2f}, max {max(relative):.2f}",
        f"second half of the layers gets {float(per_layer[layers // 2:].sum()):.1%} of the budget",
        "layers with the most budget: " + ", ".join(f"{i} ({float(per_layer[i]):.1%})" for i in top)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentloop.compaction.budgets",
                                     description="Compute a per-(layer, KV head) budget file for a model.")
    parser.add_argument("model", help="model id, directory, .gguf, or alias (e.g. smollm2-135m)")
    parser.add_argument("--out", required=True, help="budget file to write (JSON)")
    parser.add_argument("--texts", type=int, default=3, help="calibration texts")
    parser.add_argument("--tokens", type=int, default=1600, help="tokens per calibration text")
    parser.add_argument("--ratio", type=float, default=10.0, help="compaction ratio the budgets are tuned for")
    parser.add_argument("--max-queries", type=int, default=4096, help="repeat-prefill queries per KV head "
                        "(3/4 fit, 1/4 evaluate)")
    parser.add_argument("--padded", action="store_true", help="count padding slots in the budget: a layer costs "
                        "its largest head budget for every head (favours equal budgets within a layer)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.ratio <= args.tokens:
        raise AgentloopError(f"--ratio must be in [1, --tokens], got {args.ratio}")

    from agentloop.models import load_model

    loaded = load_model(args.model)
    proportions, errors, grid = calibrate(loaded, args.texts, args.tokens, args.ratio, args.max_queries, args.seed,
                                          args.padded)
    calibration = {"texts": args.texts, "tokens": args.tokens, "ratio": args.ratio, "max_queries": args.max_queries,
                   "padded": args.padded, "seed": args.seed, "queries": "repeat-prefill",
                   "first_essay": CALIBRATION_ESSAY, "grid": grid,
                   "errors": [[[round(float(e), 5) for e in head] for head in layer] for layer in errors]}
    method = METHOD.format(grid=grid, tokens=args.tokens, ratio=args.ratio, texts=args.texts)
    save_budgets(args.out, proportions, loaded.name, method, calibration)
    print(f"wrote {args.out} for {loaded.name}\n{describe(proportions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
