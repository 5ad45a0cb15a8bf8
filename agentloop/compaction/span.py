"""Compact a span of a live session's cache with a named method: one call, statistics back.

Named methods mirror the paper (arXiv 2602.16284): `am-hak-fast` (repeat queries + highest-attention keys),
`am-hak` and `am-omp(-fast)` (repeat + self-study queries), and eviction baselines built on the same
machinery (β = 0 or the existing β, original values) so that comparisons are apples to apples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from agentloop.compaction.queries import QueryMix, mix, repeat_queries, self_study_queries
from agentloop.compaction.solver import (
    CHUNK_BYTES,
    METHODS,
    SINKS,
    STAGES,
    compact,
    default_chunk_bytes,
    head_bytes,
    key_scores,
    row_max_lse,
)

QuerySources = tuple[tuple[str, float], ...]
RECENT_WINDOW = 32  # tokens whose queries the `recent` source keeps
STATS_QUERIES = 512  # keys used as queries for the fit statistics of query-free methods (streaming, random)
QUERIES_PER_SLOT = 2  # the query mix is topped up to at least this many rows per kept slot
MAX_QUERIES = 16384  # default reference queries per KV head of a one-shot compaction (a random subsample above)
TASK_SHARE = 0.25  # share of the fitting rows given to the queries of a known follow-up text (task_ids)
TASK_DRAFT = 16  # tokens the model drafts (greedily) after that text on the uncompacted cache; their queries join it
TASK_WINDOW = (2, 8)  # ... each with the tokens up to this far before and after it: an answer follows its cue
# ("the pass key is" -> the digits, read one token at a time), so the window reaches further forward (task_pin)
NUMBER_LEAD = 3  # tokens before a number pinned with it (and the one after) when every number is pinned (pin_numbers)
PART_BUDGETS = ("attention", "length")  # how a span compacted in parts shares each head's budget over them
SELECTION_ROWS = 1024  # query rows (evenly strided) that score the whole span's keys when its parts' budgets are set
SS_PLUS_REPEAT: QuerySources = (("repeat", 1.0), ("selfstudy", 4.0))  # the paper's mix: repeat is 1 of 5 specs


@dataclass(frozen=True)
class NamedMethod:
    solver: str  # a key of solver.METHODS
    queries: QuerySources  # (source, weight): repeat | selfstudy | context | recent | recorded
    summary: str


NAMED_METHODS: dict[str, NamedMethod] = {
    "am-hak-fast": NamedMethod("hak", (("repeat", 1.0),),
                               "repeat-prefill queries, highest-attention keys, β and values fit"),
    "am-hak-pool": NamedMethod("hak-pool", (("repeat", 1.0),),
                               "am-hak-fast with its selection scores max-pooled over 7 positions (as SnapKV's)"),
    "am-values": NamedMethod("hak-values", (("repeat", 1.0),),
                             "am-hak-fast without β (β = 0): only the values fitted to the kept keys"),
    "am-hak": NamedMethod("hak", SS_PLUS_REPEAT, "self-study + repeat queries, highest-attention keys"),
    "am-omp-fast": NamedMethod("omp-fast", SS_PLUS_REPEAT, "self-study + repeat queries, OMP keys 4 per step"),
    "am-omp": NamedMethod("omp", SS_PLUS_REPEAT, "self-study + repeat queries, OMP keys on the mass residual"),
    "h2o": NamedMethod("topk-evict", (("context", 1.0),), "eviction: top mean attention from the span's own queries"),
    "snapkv": NamedMethod("snapkv-evict", (("selfstudy", 1.0),),
                          "eviction: top attention (max-pooled over 7 positions) from self-study question queries"),
    "snapkv-reread": NamedMethod("snapkv-evict", (("repeat", 1.0),),
                                 "snapkv's eviction scored by am-hak-fast's queries (the repeat-prefill)"),
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
    fallback: str | None = None  # why some heads were evicted instead of compacted (see compact_span)
    evicted_heads: int = 0
    pinned: torch.Tensor | None = None  # [layers * kv_heads, kept] bool: the new block's slots kept as they were

    def summary(self) -> dict:
        return {"method": self.method, "span": [self.start, self.end], "kept": self.kept, "queries": self.queries,
                "layer_slots": self.layer_slots, "padding_fraction": round(self.padding_fraction, 4),
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "output_error": round(float(self.output_error.nanmean()), 6),
                "mass_error": round(float(self.mass_error.nanmean()), 6),
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                **({"fallback": self.fallback, "evicted_heads": self.evicted_heads} if self.fallback else {})}


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
                      seed: int, memo: dict[str, dict] | None = None, min_rows: int = 0,
                      study_seconds: float | None = None) -> dict[int, torch.Tensor]:
    """Collect and mix the named query sources: {layer: [kv_heads, n, head_dim]}.

    `memo` maps a source name to queries already collected for this context (filled as sources are run);
    `study_seconds` bounds the time self-study takes (see self_study_queries)."""
    return query_mix(session, sources, context_ids, max_queries, seed, memo, min_rows, study_seconds).materialize()


def query_mix(session, sources: QuerySources, context_ids: list[int] | None, max_queries: int | None,
              seed: int, memo: dict[str, dict] | None = None, min_rows: int = 0,
              study_seconds: float | None = None) -> QueryMix:
    """reference_queries, unmaterialized (the rows are read per head when the solver needs them)."""
    memo = {} if memo is None else memo
    collected = []
    for source, weight in sources:
        if source in memo:
            queries = memo[source]
        elif source == "repeat":
            queries = repeat_queries(session, context_ids if context_ids is not None else session.token_ids)
        elif source == "selfstudy":
            queries = self_study_queries(session, seed=seed, seconds=study_seconds)
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
    return mix(collected, max_queries, seed, floor=min_rows)


@torch.inference_mode()
def compact_span(session, start: int, end: int, target: int | float, method: str = "am-hak-fast",
                 queries: dict[int, torch.Tensor] | None = None, sources: QuerySources | None = None,
                 context_ids: list[int] | None = None,
                 max_queries: int | None = MAX_QUERIES, seed: int = 0, chunk: int | None = None,
                 memo: dict[str, dict] | None = None, budgets: torch.Tensor | None = None,
                 task_ids: list[int] | None = None, task_share: float = TASK_SHARE, task_pin: int = 0,
                 span_ids: list[int] | None = None, pin_numbers: bool = False, scratch_bytes: int | None = None,
                 fallback: str | None = None, part_budgets: str = "attention", pinned: torch.Tensor | None = None,
                 study_seconds: float | None = None, **knobs) -> SpanStats:
    """Replace physical slots [start, end) of every compactable layer by a compacted block, in place.

    `queries` (ready-made) or `sources` ((name, weight) pairs) override the method's query sources; `memo`
    reuses sources already collected for this context (several compactions of one context); `context_ids` is the
    text repeat-prefill copies (default: every token the session has seen); `chunk` compacts contiguous chunks of
    that many slots independently (long spans); `knobs` override solver settings (e.g. lo/hi bounds of β);
    `study_seconds` bounds the time self-study queries take (answers cut there, prompts not yet begun left out).
    `task_ids` is a text known to follow the span (a question about it, the pending task): its queries and those
    of the model's greedy draft answer (up to TASK_DRAFT tokens, to the end of its turn), read on the live cache
    before it is compacted, are added to the method's queries as `task_share` of the rows, so that what it will
    ask of the span weighs in selection and fits (query-free methods ignore it); with `task_pin`, that many tokens
    of the span where those queries look (see `task_positions`) are kept in every head with their original keys and
    values (solver `protect`; at most half of the kept slots); without `task_ids`, a method that reads self-study
    queries pins where those look (what its study questions about the span found worth asking). `span_ids`, the
    tokens of the span's last len(span_ids) slots when those are verbatim (as on ingestion), lets a pinned number be
    pinned whole (`whole_numbers`), and with `pin_numbers` every number there is pinned, with the tokens that lead
    to it, task or not. `pinned` [layers * kv_heads, end - start] bool marks slots each head keeps as they are
    besides those (e.g. the pins of an earlier compaction of part of the span: SpanStats.pinned says which slots of
    the new block are pinned, per head).
    `budgets` [layers, kv_heads] (slots per compactable head, see compaction.budgets.head_budgets) replaces the
    uniform `target`: each layer then holds the span at its largest head budget, and its other heads are
    padded with slots of key 0, value 0 and β = −inf (no attention, but they count toward the bytes).
    A span compacted in parts (`chunk`, or key chunks for the scratch) shares each head's budget out over the parts
    by `part_budgets`: "attention" gives each part as many as it holds of the keys one selection over the whole span
    would keep (and at least its pinned tokens), "length" shares them in proportion to the parts' lengths.

    Scratch stays within `scratch_bytes` (default: the session budget's fit bytes): heads are compacted a chunk at a
    time from the cache's own buffers, each chunk written back in place before the next is read, and a span too
    long for one head's matrices is fitted in key chunks (as `chunk` does). If the queries cannot be read, or a
    chunk of heads fails (out of memory, a non-finite fit), those heads fall back to eviction of the same region
    (the sink slots and the newest ones, their β and values kept) and `fallback` says why; on Ctrl-C the remaining
    heads are evicted so that the cache stays whole, then the interrupt goes on."""
    if method not in NAMED_METHODS:
        raise ValueError(f"unknown compaction method {method!r}; choose one of {', '.join(NAMED_METHODS)}")
    if part_budgets not in PART_BUDGETS:
        raise ValueError(f"unknown part_budgets {part_budgets!r}; choose one of {', '.join(PART_BUDGETS)}")
    named = NAMED_METHODS[method]
    cache, layers = session.cache, session.cache.compactable
    span_len = end - start
    if not 0 <= start < end <= cache.physical_len:
        raise ValueError(f"span [{start}, {end}) is outside the {cache.physical_len} slots held")
    heads = cache.kv_heads
    slots = _head_slots(budgets, target_slots(span_len, target), len(layers), heads, span_len)  # [layers * kv_heads]
    bytes_before = cache.held_bytes()

    tic = time.perf_counter()
    sources = named.queries if sources is None else sources
    protect = None  # [span_len] bool: tokens kept in every head with their original keys and values (per head,
    # [layers * kv_heads, span_len], once `pinned` joins it)
    if pinned is not None and pinned.shape != (len(layers) * heads, span_len):
        raise ValueError(f"pinned must be [{len(layers) * heads}, {span_len}] (compactable layers x KV heads, span "
                         f"slots), got shape {tuple(pinned.shape)}")
    if span_ids is not None and len(span_ids) > span_len:
        raise ValueError(f"span_ids has {len(span_ids)} tokens, more than the span's {span_len} slots")
    try:
        if queries is not None:
            queries = QueryMix.of(queries)
        elif sources and fallback is None:
            memo = {} if memo is None else memo
            queries = query_mix(session, sources, context_ids, max_queries, seed, memo,
                                min_rows=QUERIES_PER_SLOT * int(slots.max()), study_seconds=study_seconds)
            if task_ids:
                if "task" not in memo:
                    memo["task"] = session.probe(list(task_ids), generate=TASK_DRAFT, temperature=0.0)
                queries = queries.with_share(memo["task"], task_share)
            # the queries whose looked-at tokens are pinned: the task's, else (no task) the study questions'
            pin_by = "task" if task_ids else "selfstudy" if "selfstudy" in dict(sources) else None
            fits = METHODS[named.solver].fit
            held = int(pinned.sum(1).max()) if pinned is not None else 0  # pins a head already has
            limit = max(0, int(slots.min()) // 2 - held)
            if task_pin and fits and pin_by and limit:
                protect = task_positions(session, memo[pin_by], start, end, min(task_pin, limit))
            readable = span_ids is not None and session.tokenizer is not None  # its numbers can be found
            if fits and readable and (protect is not None or pin_numbers):
                tail = span_len - len(span_ids)  # the verbatim slots whose tokens are span_ids
                protect = torch.zeros(span_len, dtype=torch.bool) if protect is None else protect
                protect[tail:] = whole_numbers(protect[tail:], *number_tokens(session.tokenizer, span_ids),
                                               limit - int(protect[:tail].sum()), every=pin_numbers)
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # a probe that failed: nothing of the cache changed
        fallback, queries = f"reading the queries failed ({_first_line(exc)})", None
    seconds = {"queries": time.perf_counter() - tic}
    if pinned is not None:  # per head: [layers * kv_heads, span_len]
        protect = pinned.cpu() | protect if protect is not None else pinned.cpu()

    scale = session.model.model.layers[layers[0]].self_attn.scaling
    rows = queries.count if queries else STATS_QUERIES
    scratch = scratch_bytes or session.budget.fit_bytes or CHUNK_BYTES
    if chunk is None and fallback is None:  # a span too long for one head's matrices is fitted in key chunks
        chunk = _part_length(rows, span_len, int(slots.max()), scratch, cache.head_dim)
    bounds = _chunks(span_len, chunk)
    part_slots = _part_slots(session, slots, bounds, start, queries, protect, part_budgets)
    real_slots = torch.stack(part_slots).sum(0)  # [layers * kv_heads]
    layer_slots = real_slots.view(len(layers), heads).amax(1).tolist()  # each layer keeps its largest head budget
    per_head = head_bytes(rows, max(hi - lo for lo, hi in bounds), int(max(p.max() for p in part_slots)),
                           cache.head_dim)
    group = max(1, scratch // per_head)

    errors, all_seconds = [], []
    kept_pins = torch.zeros(len(layers) * heads, max(layer_slots), dtype=torch.bool) if protect is not None else None
    evicted = 0
    for first in range(0, len(layers) * heads, group):
        rows_ = range(first, min(first + group, len(layers) * heads))
        try:
            if fallback is not None:
                raise _Evict
            result = _compact_heads(session, rows_, start, end, bounds, part_slots, queries, named, scale, seed,
                                    knobs, scratch, protect)
            _write_heads(cache, layers, heads, rows_, start, layer_slots, result)
            errors.append(result[3:5])
            all_seconds.append(result[5])
            if kept_pins is not None:
                width = min(kept_pins.shape[1], result[6].shape[1])
                kept_pins[rows_.start:rows_.stop, :width] = result[6][:, :width].cpu()
        except _Evict:
            evicted += _evict_heads(cache, layers, heads, rows_, start, end, layer_slots)
        except (RuntimeError, torch.OutOfMemoryError, FloatingPointError) as exc:
            fallback = f"compacting failed ({_first_line(exc)}); the rest of the heads were evicted instead"
            _free_scratch(cache)
            evicted += _evict_heads(cache, layers, heads, rows_, start, end, layer_slots)
        except KeyboardInterrupt:
            _free_scratch(cache)
            for rest in range(first, len(layers) * heads, group):  # keep the cache whole, then stop
                _evict_heads(cache, layers, heads, range(rest, min(rest + group, len(layers) * heads)), start, end,
                             layer_slots)
            for layer_idx, length in zip(layers, layer_slots, strict=True):
                cache.layers[layer_idx].move_tail(end, start + length)
            raise
    for layer_idx, length in zip(layers, layer_slots, strict=True):
        cache.layers[layer_idx].move_tail(end, start + length)

    for stage in STAGES:
        seconds[stage] = sum(s[stage] for s in all_seconds)
    n_rows = len(layers) * heads
    output_error = torch.full((n_rows,), float("nan"))
    mass_error = torch.full((n_rows,), float("nan"))
    position = 0
    for out_err, mass_err in errors:
        output_error[position:position + len(out_err)] = out_err.cpu()
        mass_error[position:position + len(mass_err)] = mass_err.cpu()
        position += len(out_err)
    seconds["total"] = time.perf_counter() - tic
    total_slots = heads * sum(layer_slots)
    return SpanStats(method=method, start=start, end=end, kept=max(layer_slots), queries=rows if queries else 0,
                     seconds=seconds, output_error=output_error.view(len(layers), heads),
                     mass_error=mass_error.view(len(layers), heads), bytes_before=bytes_before,
                     bytes_after=cache.held_bytes(), layers=list(layers), layer_slots=layer_slots,
                     padding_fraction=1 - int(real_slots.sum()) / total_slots, fallback=fallback, evicted_heads=evicted,
                     pinned=kept_pins)


def task_positions(session, task: dict[int, torch.Tensor], start: int, end: int, count: int,
                   window: tuple[int, int] = TASK_WINDOW) -> torch.Tensor:
    """The `count` tokens of slots [start, end) where a task's queries look, as a mask [end - start] bool.

    A token's score is its highest attention probability from any of the task's query rows (softmax over the span),
    summed over the compactable layers and KV heads, then the highest score from `window[0]` tokens after to
    `window[1]` tokens before it (so that the tokens around a looked-at one, mostly those after it, come with it: a
    number the answer copies, read digit by digit)."""
    cache = session.cache
    scale = session.model.model.layers[cache.compactable[0]].self_attn.scaling
    score = torch.zeros(end - start)
    for layer in cache.compactable:
        keys, beta = cache.layers[layer].keys[0, :, start:end], cache.beta(layer)
        for head in range(cache.kv_heads):  # [m, T] at a time
            logits = task[layer][head].to(keys.device).float() @ keys[head].float().mT * scale
            if beta is not None:
                logits += beta[0, head, start:end].float()
            score += logits.softmax(-1).amax(0).cpu()
    before, after = window
    padded = torch.nn.functional.pad(score, (after, before), value=-1.0)  # token i sees scores i - after .. i + before
    pooled = padded.unfold(0, before + after + 1, 1).amax(-1)  # [end - start]
    mask = torch.zeros(end - start, dtype=torch.bool)
    mask[pooled.topk(min(count, end - start)).indices] = True
    return mask


def number_tokens(tokenizer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([len(ids)] bool, [len(ids)] bool): the tokens that are digits only (a number's pieces, as the tokenizer
    splits it) and those that are whitespace only (the " " that these tokenizers put before a number)."""
    texts = [tokenizer.decode([i]) for i in ids]
    return (torch.tensor([t.strip().isdigit() for t in texts], dtype=torch.bool),
            torch.tensor([t != "" and t.isspace() for t in texts], dtype=torch.bool))


def whole_numbers(mask: torch.Tensor, digits: torch.Tensor, blanks: torch.Tensor, limit: int,
                  every: bool = False) -> torch.Tensor:
    """`mask` with every number it touches pinned whole, while it holds at most `limit` tokens.

    A number is a run of digit tokens with the blank tokens just before it; it is touched when one of its tokens,
    or the token just before it (the cue: "is" of "is 60494"), is pinned. The fixed window of task_positions can
    end a digit short of a number the answer copies ("is 6049" of "is 60494"). With `every`, each number is
    pinned, with the NUMBER_LEAD tokens before it (what says which number it is: "key is" of "key is 60494") and
    the token after it (without it, a copy of the number did not stop: "6049494").
    Numbers are added in order until one would pass the limit."""
    mask = mask.clone()
    # runs of digits [first, end), from the edges of `digits`
    edges = torch.diff(digits.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    firsts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    for first, end in zip(firsts, ends, strict=True):
        while first > 0 and blanks[first - 1]:
            first -= 1
        if every:  # with the tokens that lead to it, and the one after it (where a copy of the number stops)
            first, end = max(0, first - NUMBER_LEAD), min(len(mask), end + 1)
        touched = every or bool(mask[first:end].any()) or (first > 0 and bool(mask[first - 1]))
        missing = int((~mask[first:end]).sum())
        if touched and missing and int(mask.sum()) + missing <= limit:
            mask[first:end] = True
    return mask


class _Evict(Exception):
    """These heads go to the eviction fallback."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _free_scratch(cache) -> None:
    device = cache.layers[cache.compactable[0]].key_buffer.device
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _part_length(rows: int, span: int, kept: int, scratch: int, head_dim: int) -> int | None:
    """The longest key chunk whose one-head scratch fits `scratch` (None: the whole span fits)."""
    if head_bytes(rows, span, kept, head_dim) <= scratch:
        return None
    ratio = kept / span
    lo, hi = min(16, span), span
    while lo < hi:  # the longest chunk that fits, by bisection
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if head_bytes(rows, mid, max(1, round(mid * ratio)), head_dim) <= scratch else (lo, mid - 1)
    return lo


def _stacked(cache, layers: list[int], heads: int, rows_: range, start: int, end: int):
    """fp32 copies of the span's keys, values and β [h, T, d], [h, T] of the stacked heads `rows_`
    (stacked index = layer position * kv_heads + head), read from the cache's buffers."""
    keys, values, beta = [], [], []
    for r in rows_:
        layer = cache.layers[layers[r // heads]]
        h = r % heads
        keys.append(layer.key_buffer[0, h, start:end])
        values.append(layer.value_buffer[0, h, start:end])
        beta.append(layer.beta_buffer[0, h, start:end] if layer.has_beta else None)
    K, V = torch.stack(keys).float(), torch.stack(values).float()
    if all(b is None for b in beta):
        return K, V, None
    return K, V, torch.stack([b.float() if b is not None else K.new_zeros(end - start) for b in beta])


def _compact_heads(session, rows_, start, end, bounds, part_slots, queries, named, scale, seed, knobs, scratch,
                   protect=None):
    """Compact the stacked heads `rows_`: (keys, values, β [h, t_all, ...] with each head's real slots first, output
    error, mass error [h], stage seconds, pinned [h, t_all] bool: the slots kept as they were)."""
    cache, layers, heads = session.cache, session.cache.compactable, session.cache.kv_heads
    K, V, beta = _stacked(cache, layers, heads, rows_, start, end)
    if queries:
        Q = torch.stack([queries.rows(layers[r // heads], r % heads) for r in rows_]).to(K.device).float()
    else:  # query-free methods: the solver ignores queries except for statistics; use some of the keys themselves
        picked = torch.randperm(end - start, generator=torch.Generator().manual_seed(seed))[:STATS_QUERIES].sort().values
        Q = K[:, picked.to(K.device)]
    index = torch.tensor(list(rows_))
    chunk_bytes = min(scratch, default_chunk_bytes(K.device))
    whole = None
    if len(bounds) > 1:  # parts are fitted as parts of the span: its attention statistics, in what the copies leave
        copies = sum(x.numel() * x.element_size() for x in (K, V, Q, beta) if x is not None)
        whole = row_max_lse(Q, K, scale, beta, max(chunk_bytes - copies, 8 * 16 * Q.shape[1]))
    parts, real, pins = [], [], []
    protect = _head_protect(protect, index)  # [h, T] or None
    for (lo, hi), per_part in zip(bounds, part_slots, strict=True):
        budget = per_part[index]
        t = int(budget.max())
        part_protect = protect[:, lo:hi] if protect is not None else None
        parts.append(compact(Q, K[:, lo:hi], V[:, lo:hi], t, scale, bias=beta[:, lo:hi] if beta is not None else None,
                             method=named.solver, seed=seed, budgets=budget, span=whole, chunk_bytes=chunk_bytes,
                             protect=part_protect, **knobs))
        real.append(torch.arange(t) < budget[:, None])  # [h, t]
        pins.append(part_protect.to(parts[-1].idx.device).gather(1, parts[-1].idx) & real[-1].to(parts[-1].idx.device)
                    if part_protect is not None else torch.zeros(len(rows_), t, dtype=torch.bool))
    del K, V, beta, Q
    # each head's real slots first (part by part), its padding last: [h, t_all, ...]
    order = (~torch.cat(real, dim=1)).int().argsort(dim=-1, stable=True).to(parts[0].keys.device)
    new_keys = _gather_slots(torch.cat([p.keys for p in parts], dim=1), order)
    new_values = _gather_slots(torch.cat([p.values for p in parts], dim=1), order)
    new_beta = torch.cat([p.beta for p in parts], dim=1).gather(1, order)
    new_pins = torch.cat([p.to(order.device) for p in pins], dim=1).gather(1, order)
    if not (torch.isfinite(new_keys).all() and torch.isfinite(new_values).all() and not torch.isnan(new_beta).any()
            and not (new_beta == math.inf).any()):
        raise FloatingPointError("a fit gave a non-finite key, value or β")
    seconds = {stage: sum(p.seconds[stage] for p in parts) for stage in parts[0].seconds}
    output_error = torch.stack([p.output_error for p in parts]).mean(0)
    mass_error = torch.stack([p.mass_error for p in parts]).mean(0)
    return new_keys, new_values, new_beta, output_error, mass_error, seconds, new_pins


def _head_protect(protect: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The protect mask of the stacked heads `index` [h, T]: a [T] mask is every head's, a 2-D one is per head."""
    if protect is None:
        return None
    return protect.expand(len(index), -1) if protect.dim() == 1 else protect[index]


def _write_heads(cache, layers, heads, rows_, start, layer_slots, result) -> None:
    """Write each head's block, cut or padded to its layer's length, into slots [start, start + length)."""
    new_keys, new_values, new_beta = result[:3]
    for n, r in enumerate(rows_):
        length = layer_slots[r // heads]
        keys, values, beta = new_keys[n, :length], new_values[n, :length], new_beta[n, :length]
        if keys.shape[0] < length:  # parts rounded below the layer's length: pad
            pad = length - keys.shape[0]
            keys = torch.cat([keys, keys.new_zeros(pad, keys.shape[-1])])
            values = torch.cat([values, values.new_zeros(pad, values.shape[-1])])
            beta = torch.cat([beta, beta.new_full((pad,), -math.inf)])
        cache.layers[layers[r // heads]].write_block(start, keys[None], values[None], beta[None],
                                                     heads=slice(r % heads, r % heads + 1))


def _evict_heads(cache, layers, heads, rows_, start, end, layer_slots) -> int:
    """The fallback: each head keeps the span's SINKS first slots and its newest ones (β and values as they are),
    written in place. Returns the number of heads evicted."""
    span_len = end - start
    for r in rows_:
        layer, h, length = cache.layers[layers[r // heads]], r % heads, layer_slots[r // heads]
        sinks = min(SINKS, length)
        kept = torch.cat([torch.arange(sinks), torch.arange(span_len - (length - sinks), span_len)]) + start
        kept = kept.to(layer.key_buffer.device)
        keys = layer.key_buffer[0, h].index_select(0, kept)
        values = layer.value_buffer[0, h].index_select(0, kept)
        beta = layer.beta_buffer[0, h].index_select(0, kept)
        layer.write_block(start, keys[None], values[None], beta[None] if layer.has_beta else None,
                          heads=slice(h, h + 1))
    return len(rows_)


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


def _part_slots(session, slots: torch.Tensor, bounds: list[tuple[int, int]], start: int, queries,
                protect: torch.Tensor | None, part_budgets: str) -> list[torch.Tensor]:
    """Slots of each part per stacked head: [layers * kv_heads] per part. "length" (or no queries): in proportion to
    the parts' lengths, at least 1 each; "attention": as many as the part holds of the keys that one selection over
    the whole span would keep (`span_selection`), at least 1 and its pinned tokens, at most its length, summing to
    `slots` per head where those bounds allow."""
    if len(bounds) == 1:
        return [slots]
    lengths = torch.tensor([hi - lo for lo, hi in bounds])
    if part_budgets == "length" or not queries:
        span_len = int(lengths.sum())
        return [(slots.double() * (hi - lo) / span_len).round().long().clamp(1, hi - lo) for lo, hi in bounds]
    kept = span_selection(session, slots, start, start + int(lengths.sum()), queries, protect)
    held = torch.stack([kept[:, lo:hi].sum(1) for lo, hi in bounds]).double()  # [parts, layers * kv_heads]
    pinned = torch.tensor([int(protect[..., lo:hi].sum(-1).max()) if protect is not None else 0 for lo, hi in bounds])
    floors = pinned.clamp(min=1).minimum(lengths)
    return list(split_budget(slots, held + 1e-3, floors, lengths).unbind(0))


def span_selection(session, slots: torch.Tensor, start: int, end: int, queries,
                   protect: torch.Tensor | None = None) -> torch.Tensor:
    """[layers * kv_heads, end - start] bool: in each head, the `slots[head]` keys of slots [start, end) with the
    highest root-mean-square softmax weight over the query rows (a softmax over the whole span, β included; at most
    SELECTION_ROWS rows, evenly strided), the `protect`ed ones first: what am-hak-fast's selection would keep from
    the span in one piece."""
    cache = session.cache
    scale = session.model.model.layers[cache.compactable[0]].self_attn.scaling
    kept = torch.zeros(len(cache.compactable) * cache.kv_heads, end - start, dtype=torch.bool)
    for layer_pos, layer_idx in enumerate(cache.compactable):
        layer = cache.layers[layer_idx]
        rows = torch.stack([queries.rows(layer_idx, head) for head in range(cache.kv_heads)])  # [kv_heads, n, d]
        Q = rows[:, ::max(1, -(-rows.shape[1] // SELECTION_ROWS))]
        beta = layer.beta_buffer[0, :, start:end] if layer.has_beta else None
        score = key_scores(Q, layer.key_buffer[0, :, start:end].to(Q.device), scale, beta).cpu()  # [kv_heads, T]
        if protect is not None:  # [T] or [layers * kv_heads, T]
            rows_ = torch.arange(layer_pos * cache.kv_heads, (layer_pos + 1) * cache.kv_heads)
            score = score.masked_fill(_head_protect(protect, rows_), math.inf)
        for head in range(cache.kv_heads):
            stacked = layer_pos * cache.kv_heads + head
            kept[stacked, score[head].topk(int(slots[stacked])).indices] = True
    return kept


def split_budget(totals: torch.Tensor, shares: torch.Tensor, floors: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Integer slots [parts, heads]: each head's total (`totals` [heads]) shared out in proportion to `shares`
    [parts, heads], each part within [floors, caps] ([parts]); a head's parts sum to its total unless the floors
    already pass it (then they get their floors) or the caps fall short of it (then their caps).

    Water-filling: x = clamp(λ · share, floor, cap) with λ per head found by bisection, then the parts' whole slots
    and the rest, one each, to the parts with the largest fractions."""
    floors, caps = floors.double()[:, None], caps.double()[:, None]
    goal = totals.double().clamp(float(floors.sum()), float(caps.sum()))  # [heads]
    lo, hi = torch.zeros_like(goal), torch.full_like(goal, float(caps.max()) / max(float(shares.min()), 1e-12))
    for _ in range(100):
        mid = (lo + hi) / 2
        under = (mid * shares).clamp(floors, caps).sum(0) < goal
        lo, hi = torch.where(under, mid, lo), torch.where(under, hi, mid)
    x = (hi * shares).clamp(floors, caps)  # [parts, heads]
    whole = x.floor().minimum(caps)
    rest = (goal - whole.sum(0)).round().long()  # [heads]: slots still to give, one each
    fraction = (x - whole).masked_fill(whole >= caps, -1.0)
    for head in range(whole.shape[1]):
        if rest[head] > 0:
            whole[fraction[:, head].topk(int(rest[head])).indices, head] += 1
    return whole.long()


def _chunks(length: int, chunk: int | None) -> list[tuple[int, int]]:
    """[lo, hi) of the fewest near-equal chunks of at most `chunk` slots (no tiny last chunk)."""
    n = -(-length // chunk) if chunk else 1
    bounds = [round(length * j / n) for j in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
