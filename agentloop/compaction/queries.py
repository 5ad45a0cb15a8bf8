"""Reference queries for compaction: the model's own post-RoPE queries, pooled per KV head.

Sources (each returns {layer_idx: [kv_heads, n, head_dim]}):
  repeat   - on the live cache, prefill "Repeat the previous context verbatim." and then the context
             itself, capture the queries, roll the cache back;
  context  - the span's own queries, captured while it was prefilled (a recorder passed to `feed`);
  selfstudy- the model writes short answers about the context (summary, key facts, its own questions);
             the queries of those answers are captured, then the cache is rolled back;
  recorded - queries of recent decode steps (a recorder kept by the session);
  task     - the queries of a text known to follow the span (a question, the pending task) and of the model's
             short draft answer to it, read on the live cache and rolled back; `with_share` gives them a
             fixed share of the fitting rows.
"""

from __future__ import annotations

import time

import torch

REPEAT_INSTRUCTION = "Repeat the previous context verbatim."
SELF_STUDY_PROMPTS = (
    "Summarize the main points of the context.",
    "List all the key facts, names and numbers mentioned in the context.",
    "Ask and answer three questions about the details of the context.",
)


class QueryRecorder:
    """Collects each layer's post-RoPE queries [batch, q_heads, q_len, d] as rows of its KV heads, in fixed memory.

    A KV head's rows are the queries of the query heads that share it, one row per (query head, token). Two stores,
    allocated at the first record on the queries' device, in 16 bits (the queries' dtype if it is a 16-bit one, else
    float16), and never grown:
      reservoir - at most `rows` rows per (layer, KV head): a uniform random sample of all rows seen (reservoir
                  sampling; the same rows in every layer); while fewer have been seen, all of them, in order;
      window    - the rows of the newest `window` tokens (a ring).
    """

    def __init__(self, layers: list[int], kv_heads: int, rows: int | None = None, window: int | None = None,
                 seed: int = 0, into: dict[int, torch.Tensor] | None = None):
        """`into` {layer: [kv_heads, n, d]}: storage for the reservoir (views of a caller's buffer; `rows` is then n)."""
        if into:
            rows = min(q.shape[1] for q in into.values())
        self.layers, self.kv_heads, self.rows, self.window = set(layers), kv_heads, rows, window
        self.generator = torch.Generator().manual_seed(seed)
        self._reservoir: dict[int, torch.Tensor] = dict(into or {})  # layer -> [kv_heads, rows, d]
        self._ring: dict[int, torch.Tensor] = {}  # layer -> [kv_heads, groups, window, d]
        self._seen: dict[int, int] = dict.fromkeys(layers, 0)  # rows offered to the reservoir
        self._tokens: dict[int, int] = dict.fromkeys(layers, 0)  # tokens recorded
        self._choice: tuple[int, int, torch.Tensor, torch.Tensor] | None = None  # (seen, n, source rows, slots)
        self.static_slot: torch.Tensor | None = None  # [1] on the device: the ring slot the static decode step writes

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        if layer_idx not in self.layers:
            return
        _, q_heads, q_len, dim = query.shape
        groups = q_heads // self.kv_heads
        # [1, q_heads, q_len, d] -> [kv_heads, groups, q_len, d]: the query heads that share a KV head
        pooled = query[0].detach().reshape(self.kv_heads, groups, q_len, dim).to(query_dtype(query.dtype))
        if self.static_slot is not None:  # one token, at a slot set on the device; `advance` counts it
            self._ring[layer_idx].index_copy_(2, self.static_slot, pooled)
            return
        if self.rows:
            self._offer(layer_idx, pooled.reshape(self.kv_heads, groups * q_len, dim))
        if self.window:
            self._remember(layer_idx, pooled)
        self._tokens[layer_idx] += q_len

    def _offer(self, layer_idx: int, rows: torch.Tensor) -> None:
        """Reservoir sampling of `rows` [kv_heads, n, d]; the slot choice is drawn once per offer and reused by
        every layer (they are offered the same number of rows in the same order)."""
        store = self._reservoir.get(layer_idx)
        if store is None:
            store = self._reservoir[layer_idx] = rows.new_empty(self.kv_heads, self.rows, rows.shape[-1])
        seen, n = self._seen[layer_idx], rows.shape[1]
        if self._choice is None or self._choice[:2] != (seen, n):
            index = torch.arange(seen, seen + n)
            draw = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            slots = torch.where(index < self.rows, index, draw)  # the first `rows` rows fill the reservoir in order
            taken = slots < self.rows
            source, slots = torch.arange(n)[taken], slots[taken]
            last = {int(s): int(i) for i, s in zip(source, slots, strict=True)}  # a slot drawn twice keeps the later
            source, slots = torch.tensor(list(last.values()), dtype=torch.long), torch.tensor(list(last), dtype=torch.long)
            self._choice = (seen, n, source, slots)
        _, _, source, slots = self._choice
        if len(slots):
            store.index_copy_(1, slots.to(store.device), rows.index_select(1, source.to(rows.device)))
        self._seen[layer_idx] = seen + n

    def _remember(self, layer_idx: int, pooled: torch.Tensor) -> None:
        """The newest `window` tokens' rows, in a ring indexed by token count."""
        heads, groups, q_len, dim = pooled.shape
        ring = self._ring.get(layer_idx)
        if ring is None:
            ring = self._ring[layer_idx] = pooled.new_empty(heads, groups, self.window, dim)
        keep = min(q_len, self.window)
        position = (torch.arange(self._tokens[layer_idx] + q_len - keep, self._tokens[layer_idx] + q_len) % self.window)
        ring.index_copy_(2, position.to(ring.device), pooled[:, :, q_len - keep:])

    def advance(self, tokens: int) -> None:
        """Count tokens the static decode step wrote into the window."""
        for layer_idx in self._tokens:
            self._tokens[layer_idx] += tokens

    @property
    def tokens(self) -> int:
        return min(self._tokens.values(), default=0)

    def queries(self, last: int | None = None) -> dict[int, torch.Tensor]:
        """{layer: [kv_heads, n, d]}: the reservoir's rows, or with `last` (or without a reservoir) the rows of the
        newest `last` (at most `window`) tokens."""
        out = {}
        for layer_idx in sorted(self.layers):
            tokens = self._tokens[layer_idx]
            if not tokens:
                continue
            if self.rows is not None and last is None:
                out[layer_idx] = self._reservoir[layer_idx][:, :min(self._seen[layer_idx], self.rows)]
                continue
            ring = self._ring[layer_idx]
            n = min(tokens, self.window, last or self.window)
            order = torch.arange(tokens - n, tokens) % self.window  # oldest first
            out[layer_idx] = ring.index_select(2, order.to(ring.device)).reshape(self.kv_heads, -1, ring.shape[-1])
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self._reservoir.values(), *self._ring.values()])


def subsample(queries: dict[int, torch.Tensor], max_per_head: int | None, seed: int) -> dict[int, torch.Tensor]:
    """Keep at most `max_per_head` queries per KV head, the same random rows in every layer."""
    if not queries or max_per_head is None:
        return queries
    n = min(q.shape[1] for q in queries.values())
    if n <= max_per_head:
        return queries
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_per_head].sort().values
    return {i: q[:, rows.to(q.device)] for i, q in queries.items()}


class QueryMix:
    """Rows of several query sources, mixed without copying them: each part is a source {layer: [kv_heads, n, d]}
    with the rows taken from it (an index, None for all) and how many times each counts (`repeats`, a weight in key
    selection and in the fits). `rows(layer, head)` builds one head's rows [n_total, d] when the solver needs them."""

    def __init__(self, parts: list[tuple[dict[int, torch.Tensor], torch.Tensor | None, int]]):
        self.parts = [p for p in parts if p[0]]

    @classmethod
    def of(cls, queries: dict[int, torch.Tensor]) -> QueryMix:
        return cls([(queries, None, 1)])

    def __bool__(self) -> bool:
        return bool(self.parts)

    @property
    def layers(self) -> set[int]:
        return set.intersection(*(set(q) for q, _, _ in self.parts)) if self.parts else set()

    @property
    def count(self) -> int:
        """Rows per KV head."""
        return sum((len(index) if index is not None else min(x.shape[1] for x in q.values())) * repeats
                   for q, index, repeats in self.parts)

    def rows(self, layer: int, head: int) -> torch.Tensor:
        pieces = []
        for q, index, repeats in self.parts:
            x = q[layer][head] if index is None else q[layer][head].index_select(0, index.to(q[layer].device))
            pieces.append(x.repeat(repeats, 1) if repeats > 1 else x)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def materialize(self) -> dict[int, torch.Tensor]:
        """{layer: [kv_heads, n_total, d]}."""
        return {i: torch.stack([self.rows(i, h) for h in range(next(iter(self.parts))[0][i].shape[0])])
                for i in sorted(self.layers)}

    def with_share(self, extra: dict[int, torch.Tensor], share: float) -> QueryMix:
        """These rows plus the rows of `extra` repeated until they are about `share` of all rows (at least once).

        A few dozen rows of a question would otherwise be lost among thousands of re-read rows; repeating them is
        a weight, both in key selection (RMS attention) and in the least-squares fits."""
        if not 0 < share < 1:
            raise ValueError(f"share must be in (0, 1), got {share}")
        n, m = self.count, min(q.shape[1] for q in extra.values())
        repeats = max(1, round(share * n / ((1 - share) * m)))
        return QueryMix(self.parts + [(extra, None, repeats)])


def mix(sources: list[tuple[dict[int, torch.Tensor], float]], budget: int | None, seed: int,
        floor: int = 0) -> QueryMix:
    """Mix sources in proportion to their weights, at most `budget` rows per KV head in all (random rows of each
    source, the same in every layer).

    If a source has fewer rows than its share, every share shrinks by the same factor, so the mix keeps
    its proportions; if that leaves fewer than `floor` rows, the other sources' spare rows top it up
    (a least-squares fit of t slots needs comfortably more than t queries)."""
    sources = [(q, w) for q, w in sources if q]
    if not sources:
        return QueryMix([])
    total = sum(w for _, w in sources)
    available = [min(x.shape[1] for x in q.values()) for q, _ in sources]
    wanted = [(budget if budget is not None else sum(available)) * w / total for _, w in sources]
    factor = min(1.0, *(a / w for a, w in zip(available, wanted, strict=False)))
    take = [max(1, int(w * factor)) for w in wanted]
    short = min(floor, budget or floor, sum(available)) - sum(take)
    for k in range(len(take)):  # top up to the floor from the sources that have rows left
        extra = max(0, min(short, available[k] - take[k]))
        take[k] += extra
        short -= extra
    parts = []
    for k, ((q, _), n, have) in enumerate(zip(sources, take, available, strict=True)):
        index = None if n >= have else torch.randperm(have, generator=torch.Generator().manual_seed(seed + k))[:n].sort().values
        parts.append((q, index, 1))
    return QueryMix(parts)


def combine(sources: list[tuple[dict[int, torch.Tensor], float]], budget: int | None, seed: int,
            floor: int = 0) -> dict[int, torch.Tensor]:
    """`mix`, materialized: {layer: [kv_heads, n, d]}."""
    return mix(sources, budget, seed, floor).materialize()


def with_share(queries: dict[int, torch.Tensor], extra: dict[int, torch.Tensor],
               share: float) -> dict[int, torch.Tensor]:
    """QueryMix.with_share, materialized."""
    return QueryMix.of(queries).with_share(extra, share).materialize()


def repeat_queries(session, context_ids: list[int], into: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Repeat-prefill: '<instruction>' as a user turn, then the context as the assistant's answer (read in windows
    after the instruction when it is longer than the probe slots the budget keeps, see Session.probe). `into`: the
    reservoir's storage (see QueryRecorder)."""
    instruction = _repeat_instruction_ids(session.tokenizer)
    return session.probe(instruction + list(context_ids), prefix=len(instruction), into=into)


class RepeatMemory:
    """Repeat-prefill queries kept between online compactions, so that each compaction re-reads only the text
    added since the previous one (re-reading the whole context costs a prefill of the logical length each time).

    One buffer {layer: [kv_heads, rows, d]} (16-bit) holds them: at each compaction the kept rows, moved to the
    current length by a RoPE rotation (exact for the position part of a post-RoPE query; the rest of each query still
    reflects the cache it was read against) and subsampled to the share of the text they stand for, go to its front;
    the re-read of the new text fills the rest straight from the probe's reservoir. `rows` are views of what is held."""

    def __init__(self, max_rows: int | None):
        self.max_rows = max_rows
        self.buffer: dict[int, torch.Tensor] = {}
        self.rows: dict[int, torch.Tensor] = {}
        self.ids: list[int] = []
        self.at_len = 0

    def queries(self, session, context_ids: list[int], seed: int) -> dict[int, torch.Tensor]:
        inv_freq = rope_frequencies(session)
        known = len(self.ids) if inv_freq is not None and context_ids[:len(self.ids)] == self.ids else 0
        now = session.cache.logical_len
        most = min(self.max_rows, session.query_rows) if self.max_rows else session.query_rows
        held = min((q.shape[1] for q in self.rows.values()), default=0) if known else 0
        take_kept = min(held, round(most * known / max(1, len(context_ids))))
        if not self.buffer or min(b.shape[1] for b in self.buffer.values()) != most:
            self.buffer = {i: torch.empty(session.cache.kv_heads, most, session.cache.head_dim,
                                          dtype=query_dtype(session.loaded.dtype), device=session.loaded.device)
                           for i in session.cache.compactable}
        if take_kept:  # the kept rows the new mix keeps, rotated to the current length, at the front
            pick = torch.randperm(held, generator=torch.Generator().manual_seed(seed))[:take_kept].sort().values
            for i, buffer in self.buffer.items():
                chosen = self.rows[i].index_select(1, pick.to(buffer.device))
                buffer[:, :take_kept] = rotate({i: chosen}, now - self.at_len, inv_freq)[i]
        # the new text, read right after the instruction; a full re-read would put it `known` tokens later
        fresh = repeat_queries(session, context_ids[known:], into={i: b[:, take_kept:] for i, b in self.buffer.items()})
        filled = take_kept + min(q.shape[1] for q in fresh.values())
        for i, buffer in self.buffer.items():
            buffer[:, take_kept:filled] = rotate({i: buffer[:, take_kept:filled]}, known, inv_freq)[i]
        self.rows = {i: b[:, :filled] for i, b in self.buffer.items()}
        self.ids, self.at_len = list(context_ids), now
        return self.rows

    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() for q in self.buffer.values())


def query_dtype(dtype: torch.dtype) -> torch.dtype:
    """Queries are kept in 16 bits: the model's dtype if it is a 16-bit one, else float16."""
    return dtype if torch.empty((), dtype=dtype).element_size() == 2 else torch.float16


def rope_frequencies(session) -> torch.Tensor | None:
    """The model's RoPE inverse frequencies [head_dim / 2], or None if its rotary embedding is not the plain kind."""
    rotary = getattr(session.model.model, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    head_dim = session.cache.layers[session.cache.compactable[0]].keys.shape[-1]
    return inv_freq if inv_freq is not None and 2 * inv_freq.numel() == head_dim else None


def rotate(queries: dict[int, torch.Tensor], shift: int, inv_freq: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Post-RoPE queries moved `shift` positions later: each (i, i + d/2) pair rotated by shift * inv_freq[i]."""
    if not shift or inv_freq is None:
        return queries
    out = {}
    for layer_idx, q in queries.items():
        angle = shift * inv_freq.to(q.device, torch.float64)
        cos, sin = (torch.cat([f(angle), f(angle)]).float() for f in (torch.cos, torch.sin))  # [d]
        half = q.shape[-1] // 2
        q32 = q.float()
        rotated_half = torch.cat([-q32[..., half:], q32[..., :half]], dim=-1)
        out[layer_idx] = (q32 * cos + rotated_half * sin).to(q.dtype)
    return out


def self_study_queries(session, max_new_tokens: int = 48, seed: int = 0,
                       seconds: float | None = None) -> dict[int, torch.Tensor]:
    """The model answers short study prompts about the context; the queries of prompt + answer are kept.

    With `seconds`, the study stops when that time is spent: an answer is cut there and the prompts not yet
    begun are left out (the first prompt is always read)."""
    deadline = time.monotonic() + seconds if seconds is not None else None
    parts = []
    for k, prompt in enumerate(SELF_STUDY_PROMPTS):
        if k and deadline is not None and time.monotonic() >= deadline:
            break
        parts.append((session.probe(turn_ids(session.tokenizer, prompt), generate=max_new_tokens, seed=seed + k,
                                    deadline=deadline), 1.0))
    return combine(parts, budget=None, seed=seed)


def turn_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a new user turn (with the assistant's generation prompt) appended to a conversation.

    Found as the text the chat template adds for one more user message; without a template, plain text."""
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    try:
        before = tokenizer.apply_chat_template(history, tokenize=False)
        after = tokenizer.apply_chat_template(history + [{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True)
        suffix = after[len(before):] if after.startswith(before) else f"\n{text}\n"
    except Exception:  # no chat template, or one that rejects this history
        suffix = f"\n{text}\n"
    return [int(i) for i in tokenizer(suffix, add_special_tokens=False)["input_ids"]]


def _repeat_instruction_ids(tokenizer) -> list[int]:
    if tokenizer is None:  # bare models (tests): the context twice is the closest analogue
        return []
    return turn_ids(tokenizer, REPEAT_INSTRUCTION)
