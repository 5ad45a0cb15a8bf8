"""Compact a span of a live session's cache with a named method: one call, statistics back.

Named methods mirror the paper (arXiv 2602.16284): `am-hak-fast` (repeat queries + highest-attention keys),
`am-hak` and `am-omp(-fast)` (repeat + self-study queries), and eviction baselines built on the same
machinery (β = 0 or the existing β, original values) so that comparisons are apples to apples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from agentloop.compaction.queries import combine, repeat_queries, self_study_queries, with_share
from agentloop.compaction.solver import compact, row_max_lse

QuerySources = tuple[tuple[str, float], ...]
RECENT_WINDOW = 32  # tokens whose queries the `recent` source keeps
STATS_QUERIES = 512  # keys used as queries for the fit statistics of query-free methods (streaming, random)
QUERIES_PER_SLOT = 2  # the query mix is topped up to at least this many rows per kept slot
MAX_QUERIES = 16384  # default reference queries per KV head of a one-shot compaction (a random subsample above)
TASK_SHARE = 0.25  # share of the fitting rows given to the queries of a known follow-up text (task_ids)
TASK_DRAFT = 16  # tokens the model drafts (greedily) after that text on the uncompacted cache; their queries join it
SS_PLUS_REPEAT: QuerySources = (("repeat", 1.0), ("selfstudy", 4.0))  # the paper's mix: repeat is 1 of 5 specs


@dataclass(frozen=True)
class NamedMethod:
    solver: str  # a key of solver.METHODS
    queries: QuerySources  # (source, weight): repeat | selfstudy | context | recent | recorded
    summary: str


NAMED_METHODS: dict[str, NamedMethod] = {
    "am-hak-fast": NamedMethod("hak", (("repeat", 1.0),),
                               "repeat-prefill queries, highest-attention keys, β and values fit"),
    "am-hak": NamedMethod("hak", SS_PLUS_REPEAT, "self-study + repeat queries, highest-attention keys"),
    "am-omp-fast": NamedMethod("omp-fast", SS_PLUS_REPEAT, "self-study + repeat queries, OMP keys 4 per step"),
    "am-omp": NamedMethod("omp", SS_PLUS_REPEAT, "self-study + repeat queries, OMP keys on the mass residual"),
    "h2o": NamedMethod("topk-evict", (("context", 1.0),), "eviction: top mean attention from the span's own queries"),
    "snapkv": NamedMethod("snapkv-evict", (("selfstudy", 1.0),),
                          "eviction: top attention (max-pooled over 7 positions) from self-study question queries"),
    "streaming": NamedMethod("streaming", (), "eviction: 4 sink slots and the newest slots"),
    "random": NamedMethod("random", (), "eviction: random slots (seeded)"),
}


@dataclass
class SpanStats:
    method: str
    start: int
    end: int
    kept: int  # slots the span now holds in the longest layer (every head, padding included)
    queries: int  # reference queries per KV head
    seconds: dict[str, float]
    output_error: torch.Tensor  # [layers, kv_heads] mean relative attention-output error on the fitting queries
    mass_error: torch.Tensor  # [layers, kv_heads] mean |mass ratio - 1| on the fitting queries
    bytes_before: int = 0
    bytes_after: int = 0
    layers: list[int] = field(default_factory=list)
    layer_slots: list[int] = field(default_factory=list)  # slots the span holds per layer (= its largest head budget)
    padding_fraction: float = 0.0  # padding slots / all slots written (non-uniform budgets)

    def summary(self) -> dict:
        return {"method": self.method, "span": [self.start, self.end], "kept": self.kept, "queries": self.queries,
                "layer_slots": self.layer_slots, "padding_fraction": round(self.padding_fraction, 4),
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "output_error": round(float(self.output_error.mean()), 6),
                "mass_error": round(float(self.mass_error.mean()), 6),
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}


def target_slots(span_len: int, target: int | float) -> int:
    """`target` as slots: an int is a slot count, a float in (0, 1] a fraction of the span."""
    if isinstance(target, float):
        if not 0 < target <= 1:
            raise ValueError(f"a fractional target must be in (0, 1], got {target}")
        return max(1, round(span_len * target))
    if not 0 < target <= span_len:
        raise ValueError(f"target must be between 1 and the span length {span_len}, got {target}")
    return target


def reference_queries(session, sources: QuerySources, context_ids: list[int] | None, max_queries: int | None,
                      seed: int, memo: dict[str, dict] | None = None, min_rows: int = 0) -> dict[int, torch.Tensor]:
    """Collect and mix the named query sources: {layer: [kv_heads, n, head_dim]}.

    `memo` maps a source name to queries already collected for this context (filled as sources are run)."""
    memo = {} if memo is None else memo
    collected = []
    for source, weight in sources:
        if source in memo:
            queries = memo[source]
        elif source == "repeat":
            queries = repeat_queries(session, context_ids if context_ids is not None else session.token_ids)
        elif source == "selfstudy":
            queries = self_study_queries(session, seed=seed)
        elif source == "recorded":
            if session.recent_recorder is None or not session.recent_recorder.tokens:
                raise ValueError("query source 'recorded' needs decode-time queries: give the session a policy "
                                 "whose query_window() is > 0")
            queries = session.recent_recorder.queries()
        elif source in ("context", "recent"):
            if session.context_recorder is None:
                raise ValueError(f"query source {source!r} needs the span's prefill queries: "
                                 "feed the span with Session.feed(..., record=True)")
            queries = session.context_recorder.queries(last=RECENT_WINDOW if source == "recent" else None)
        else:
            raise ValueError(f"unknown query source {source!r}")
        memo[source] = queries
        collected.append((queries, weight))
    return combine(collected, max_queries, seed, floor=min_rows)


@torch.inference_mode()
def compact_span(session, start: int, end: int, target: int | float, method: str = "am-hak-fast",
                 queries: dict[int, torch.Tensor] | None = None, sources: QuerySources | None = None,
                 context_ids: list[int] | None = None,
                 max_queries: int | None = MAX_QUERIES, seed: int = 0, chunk: int | None = None,
                 memo: dict[str, dict] | None = None, budgets: torch.Tensor | None = None,
                 task_ids: list[int] | None = None, task_share: float = TASK_SHARE, **knobs) -> SpanStats:
    """Replace physical slots [start, end) of every compactable layer by a compacted block.

    `queries` (ready-made) or `sources` ((name, weight) pairs) override the method's query sources; `memo`
    reuses sources already collected for this context (several compactions of one context); `context_ids` is the
    text repeat-prefill copies (default: every token the session has seen); `chunk` compacts contiguous chunks of
    that many slots independently (long spans); `knobs` override solver settings (e.g. lo/hi bounds of β).
    `task_ids` is a text known to follow the span (a question about it, the pending task): its queries and those
    of the model's greedy draft answer (up to TASK_DRAFT tokens, to the end of its turn), read on the live cache
    before it is compacted, are added to the method's queries as `task_share` of the rows, so that what it will
    ask of the span weighs in selection and fits (query-free methods ignore it).
    `budgets` [layers, kv_heads] (slots per compactable head, see compaction.budgets.head_budgets) replaces the
    uniform `target`: each layer then holds the span at its largest head budget, and its other heads are
    padded with slots of key 0, value 0 and β = −inf (no attention, but they count toward the bytes)."""
    if method not in NAMED_METHODS:
        raise ValueError(f"unknown compaction method {method!r}; choose one of {', '.join(NAMED_METHODS)}")
    named = NAMED_METHODS[method]
    cache, layers = session.cache, session.cache.compactable
    span_len = end - start
    if not 0 <= start < end <= cache.physical_len:
        raise ValueError(f"span [{start}, {end}) is outside the {cache.physical_len} slots held")
    heads = cache.kv_heads
    slots = _head_slots(budgets, target_slots(span_len, target), len(layers), heads, span_len)  # [layers * kv_heads]
    bytes_before = cache.nbytes()

    tic = time.perf_counter()
    sources = named.queries if sources is None else sources
    if queries is None and sources:
        memo = {} if memo is None else memo
        queries = reference_queries(session, sources, context_ids, max_queries, seed, memo,
                                    min_rows=QUERIES_PER_SLOT * int(slots.max()))
        if task_ids:
            if "task" not in memo:
                memo["task"] = session.probe(list(task_ids), generate=TASK_DRAFT, temperature=0.0)
            queries = with_share(queries, memo["task"], task_share)
    seconds = {"queries": time.perf_counter() - tic}

    # every compactable layer stacked: [layers * kv_heads, T, d]; scale is the model's own (same for all layers)
    keys = torch.cat([cache.layers[i].keys[0, :, start:end] for i in layers])
    values = torch.cat([cache.layers[i].values[0, :, start:end] for i in layers])
    beta = _stacked_beta(cache, layers, start, end)
    if queries is not None:
        Q = torch.cat([queries[i].to(keys.device) for i in layers])
    else:  # query-free methods: the solver ignores queries except for statistics; use some of the keys themselves
        rows = torch.randperm(span_len, generator=torch.Generator().manual_seed(seed))[:STATS_QUERIES].sort().values
        Q = keys[:, rows.to(keys.device)]
    scale = session.model.model.layers[layers[0]].self_attn.scaling

    bounds = _chunks(span_len, chunk)
    whole = row_max_lse(Q, keys, scale, beta) if len(bounds) > 1 else None  # chunks are fitted as parts of the span
    parts, real = [], []
    for lo, hi in bounds:
        share = slots.double() * (hi - lo) / span_len  # each head's budget, shared out in proportion to the chunks
        part_slots = slots if len(bounds) == 1 else share.round().long().clamp(1, hi - lo)
        t = int(part_slots.max())
        parts.append(compact(Q, keys[:, lo:hi], values[:, lo:hi], t, scale,
                             bias=beta[:, lo:hi] if beta is not None else None, method=named.solver, seed=seed,
                             budgets=part_slots, span=whole, **knobs))
        real.append(torch.arange(t) < part_slots[:, None])  # [layers * kv_heads, t]
    # each head's real slots first (chunk by chunk), its padding last: [layers * kv_heads, t_all, ...]
    order = (~torch.cat(real, dim=1)).int().argsort(dim=-1, stable=True).to(keys.device)
    new_keys = _gather_slots(torch.cat([p.keys for p in parts], dim=1), order)
    new_values = _gather_slots(torch.cat([p.values for p in parts], dim=1), order)
    new_beta = torch.cat([p.beta for p in parts], dim=1).gather(1, order)
    for stage in parts[0].seconds:
        seconds[stage] = sum(p.seconds[stage] for p in parts)

    real_slots = torch.cat(real, dim=1).sum(1).view(len(layers), heads)
    layer_slots = real_slots.amax(1).tolist()  # each layer keeps the span at its largest head budget
    for n, (layer_idx, length) in enumerate(zip(layers, layer_slots, strict=True)):
        rows = slice(n * heads, (n + 1) * heads)
        cache.replace(layer_idx, start, end, new_keys[None, rows, :length], new_values[None, rows, :length],
                      new_beta[None, rows, :length])
    output_error = torch.stack([p.output_error for p in parts]).mean(0).view(len(layers), heads)
    mass_error = torch.stack([p.mass_error for p in parts]).mean(0).view(len(layers), heads)
    seconds["total"] = time.perf_counter() - tic
    return SpanStats(method=method, start=start, end=end, kept=max(layer_slots), queries=Q.shape[1],
                     seconds=seconds, output_error=output_error, mass_error=mass_error,
                     bytes_before=bytes_before, bytes_after=cache.nbytes(), layers=list(layers),
                     layer_slots=layer_slots, padding_fraction=1 - int(real_slots.sum()) / (heads * sum(layer_slots)))


def _gather_slots(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x[h, order[h]]: [H, t, d], [H, t] -> [H, t, d]."""
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


def _head_slots(budgets: torch.Tensor | None, kept: int, layers: int, heads: int, span_len: int) -> torch.Tensor:
    """Slots per stacked head [layers * kv_heads]: the budgets, or `kept` for every head."""
    if budgets is None:
        return torch.full((layers * heads,), kept)
    if budgets.shape != (layers, heads) or budgets.min() < 1 or budgets.max() > span_len:
        raise ValueError(f"budgets must be [{layers}, {heads}] (compactable layers, KV heads) slot counts in "
                         f"[1, {span_len}], got shape {tuple(budgets.shape)}")
    return budgets.long().cpu().flatten()


def _stacked_beta(cache, layers: list[int], start: int, end: int) -> torch.Tensor | None:
    """The existing β of the span, [layers * kv_heads, T], or None if no layer has any."""
    if all(cache.beta(i) is None for i in layers):
        return None
    rows = []
    for i in layers:
        beta = cache.beta(i)
        rows.append(beta[0, :, start:end].float() if beta is not None
                    else torch.zeros(cache.kv_heads, end - start, device=cache.layers[i].keys.device))
    return torch.cat(rows)


def _chunks(length: int, chunk: int | None) -> list[tuple[int, int]]:
    """[lo, hi) of the fewest near-equal chunks of at most `chunk` slots (no tiny last chunk)."""
    n = -(-length // chunk) if chunk else 1
    bounds = [round(length * j / n) for j in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
