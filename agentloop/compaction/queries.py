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

import torch

REPEAT_INSTRUCTION = "Repeat the previous context verbatim."
SELF_STUDY_PROMPTS = (
    "Summarize the main points of the context.",
    "List all the key facts, names and numbers mentioned in the context.",
    "Ask and answer three questions about the details of the context.",
)


class QueryRecorder:
    """Collects each layer's post-RoPE queries [batch, q_heads, q_len, d] as [kv_heads, groups * q_len, d].

    `window` keeps only the newest tokens' queries (a ring for decode-time recording)."""

    def __init__(self, layers: list[int], kv_heads: int, window: int | None = None):
        self.layers, self.kv_heads, self.window = set(layers), kv_heads, window
        self._chunks: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self._tokens: dict[int, int] = {i: 0 for i in layers}

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        if layer_idx not in self.layers:
            return
        _, q_heads, q_len, dim = query.shape
        groups = q_heads // self.kv_heads
        # [1, q_heads, q_len, d] -> [kv_heads, groups, q_len, d]: the query heads that share a KV head
        pooled = query[0].detach().reshape(self.kv_heads, groups, q_len, dim).float()
        self._chunks[layer_idx].append(pooled)
        self._tokens[layer_idx] += q_len
        if self.window is not None and self._tokens[layer_idx] > 2 * self.window:
            self._chunks[layer_idx] = [self._stacked(layer_idx)[:, :, -self.window:]]
            self._tokens[layer_idx] = self.window

    def _stacked(self, layer_idx: int) -> torch.Tensor:
        return torch.cat(self._chunks[layer_idx], dim=2)  # [kv_heads, groups, tokens, d]

    @property
    def tokens(self) -> int:
        return min(self._tokens.values(), default=0)

    def queries(self, last: int | None = None) -> dict[int, torch.Tensor]:
        """{layer: [kv_heads, groups * tokens, d]} of the newest `last` (or `window`) tokens."""
        last = last or self.window
        out = {}
        for layer_idx in self.layers:
            if not self._chunks[layer_idx]:
                continue
            q = self._stacked(layer_idx)
            if last is not None:
                q = q[:, :, -last:]
            out[layer_idx] = q.reshape(self.kv_heads, -1, q.shape[-1])
        return out


def subsample(queries: dict[int, torch.Tensor], max_per_head: int | None, seed: int) -> dict[int, torch.Tensor]:
    """Keep at most `max_per_head` queries per KV head, the same random rows in every layer."""
    if not queries or max_per_head is None:
        return queries
    n = min(q.shape[1] for q in queries.values())
    if n <= max_per_head:
        return queries
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_per_head].sort().values
    return {i: q[:, rows.to(q.device)] for i, q in queries.items()}


def combine(sources: list[tuple[dict[int, torch.Tensor], float]], budget: int | None, seed: int,
            floor: int = 0) -> dict[int, torch.Tensor]:
    """Mix sources in proportion to their weights, at most `budget` rows per KV head in all.

    If a source has fewer rows than its share, every share shrinks by the same factor, so the mix keeps
    its proportions; if that leaves fewer than `floor` rows, the other sources' spare rows top it up
    (a least-squares fit of t slots needs comfortably more than t queries)."""
    sources = [(q, w) for q, w in sources if q]
    if not sources:
        return {}
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
    parts = [subsample(q, n, seed + k) for k, ((q, _), n) in enumerate(zip(sources, take, strict=False))]
    layers = set.intersection(*(set(p) for p in parts))
    return {i: torch.cat([p[i] for p in parts], dim=1) for i in sorted(layers)}


def with_share(queries: dict[int, torch.Tensor], extra: dict[int, torch.Tensor],
               share: float) -> dict[int, torch.Tensor]:
    """`queries` plus the rows of `extra` repeated until they are about `share` of all rows (at least once).

    A few dozen rows of a question would otherwise be lost among thousands of re-read rows; repeating them is
    a weight, both in key selection (RMS attention) and in the least-squares fits."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    n = min(q.shape[1] for q in queries.values())
    m = min(q.shape[1] for q in extra.values())
    repeats = max(1, round(share * n / ((1 - share) * m)))
    return {i: torch.cat([q, extra[i].repeat(1, repeats, 1)], dim=1) for i, q in queries.items() if i in extra}


def repeat_queries(session, context_ids: list[int]) -> dict[int, torch.Tensor]:
    """Repeat-prefill: '<instruction>' as a user turn, then the context as the assistant's answer."""
    ids = _repeat_prompt_ids(session.tokenizer, context_ids)
    return session.probe(ids)


class RepeatMemory:
    """Repeat-prefill queries kept between online compactions, so that each compaction re-reads only the text
    added since the previous one (re-reading the whole context costs a prefill of the logical length each time).

    `rows` {layer: [kv_heads, n, d]} (float16) are what a re-read of all of `ids` at logical length `at_len` gives,
    subsampled to `max_rows` per KV head in proportion to the text each part stands for. Before reuse they are
    moved to the current length by a RoPE rotation (exact for the position part of a post-RoPE query; the rest of
    each query still reflects the cache it was read against)."""

    def __init__(self, max_rows: int | None):
        self.max_rows = max_rows
        self.rows: dict[int, torch.Tensor] = {}
        self.ids: list[int] = []
        self.at_len = 0

    def queries(self, session, context_ids: list[int], seed: int) -> dict[int, torch.Tensor]:
        inv_freq = rope_frequencies(session)
        known = len(self.ids) if inv_freq is not None and context_ids[:len(self.ids)] == self.ids else 0
        now = session.cache.logical_len
        # the new text is read right after the instruction; a full re-read would put it `known` tokens later
        fresh = rotate(repeat_queries(session, context_ids[known:]), known, inv_freq)
        parts = [(fresh, max(1, len(context_ids) - known))]
        if known:
            kept = {i: q.float() for i, q in self.rows.items()}
            parts.append((rotate(kept, now - self.at_len, inv_freq), known))
        mixed = combine(parts, self.max_rows, seed)
        self.rows = {i: q.to(torch.float16) for i, q in mixed.items()}  # kept between compactions: half the bytes
        self.ids, self.at_len = list(context_ids), now
        return mixed

    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() for q in self.rows.values())


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
        cos, sin = (torch.cat([f(angle), f(angle)]).to(q.dtype) for f in (torch.cos, torch.sin))  # [d]
        half = q.shape[-1] // 2
        rotated_half = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        out[layer_idx] = q * cos + rotated_half * sin
    return out


def self_study_queries(session, max_new_tokens: int = 48, seed: int = 0) -> dict[int, torch.Tensor]:
    """The model answers short study prompts about the context; the queries of prompt + answer are kept."""
    parts = [(session.probe(turn_ids(session.tokenizer, prompt), generate=max_new_tokens, seed=seed + k), 1.0)
             for k, prompt in enumerate(SELF_STUDY_PROMPTS)]
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


def _repeat_prompt_ids(tokenizer, context_ids: list[int]) -> list[int]:
    if tokenizer is None:  # bare models (tests): the context twice is the closest analogue
        return list(context_ids)
    return turn_ids(tokenizer, REPEAT_INSTRUCTION) + list(context_ids)
