"""One memory budget: how `--mem-cap` is split between the KV cache and the scratch the loop needs.

Everything the loop allocates beyond the weights comes out of the budget:
  cache      - the full-attention layers' buffers (keys, values, β) for `cache_slots` slots, and sliding windows;
  workspace  - one forward's transient tensors (activations of a prefill chunk, attention masks, logits);
  and, for policies that compact with the model's queries (am, h2o, snapkv), the compaction reserve:
  probe      - `probe_slots` more slots in every full layer, for the transient tokens of a re-read (rolled back);
  queries    - the reservoir of reference queries (`query_rows` per layer and KV head, model dtype), the rows kept
               between compactions, and the decode-time query window of the `recorded` source;
  fits       - the solver's matrices, streamed over heads and, for long spans, over key chunks (`fit_bytes`).
A byte cap holds all of it: the cache gets what the rest leaves, and compaction triggers when the cache is full.
A token cap (`2048tok`) fixes the cache at that many slots and adds the rest on top: the budget is their sum.
The split is shown by `agentloop info --mem-cap` and in the run header.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from agentloop.cache import bytes_per_token, kv_geometry, sliding_bytes
from agentloop.compaction.solver import head_bytes
from agentloop.errors import AgentloopError
from agentloop.memcap import MemCap, format_bytes

MIN_SLOTS = 32  # a cache smaller than this cannot run a conversation
PREFILL_CHUNK = 512  # tokens per forward while prefilling (fewer when the step workspace is small)
WORKSPACE_FRACTION = 0.05  # one forward's transients: a share of the cache's bytes, at least what FLOOR_CHUNK needs
FLOOR_CHUNK, MIN_CHUNK = 64, 16  # the workspace holds a chunk of at least FLOOR_CHUNK tokens; never fewer than MIN_CHUNK
FLOOR_SHARE = 5  # ... unless FLOOR_CHUNK tokens' activations (or MIN_PROBE slots) take more than 1/5 of SMALL_RESERVE:
# then the floor is what that fifth holds (a large model under a small cap re-reads and prefills in smaller steps)
FLOOR_MASK = 256 << 10
QUERY_BYTES = 2  # queries are kept in 16 bits (the model's dtype if it is a 16-bit one, else float16)
RESERVE_FRACTION = 0.10  # a compacting policy's reserve aims at this share of the cache's bytes ...
SMALL_RESERVE = 56 << 20  # ... or this, for small caches (64 MiB of slack, less 8 for the runtime's own allocations)
# reservoir rows per kept slot and KV head: wanted under a token cap (the reserve comes on top of the cache), wanted
# under a byte cap (rows and cache slots share the cap: the cache keeps the larger share), and at least
QUERY_ROWS_PER_SLOT, BYTE_CAP_ROWS_PER_SLOT, LEAST_ROWS_PER_SLOT = 16, 4, 1.25
LEAST_WINDOW = 32  # decode-time window (tokens) of the `recorded` query source, at least
PROBE_FRACTION = 32  # a re-read window holds up to 1/32 of the cache's slots (at least MIN_PROBE)
MIN_PROBE, MAX_PROBE = 128, 512  # (MIN_PROBE shrinks to what SMALL_RESERVE / FLOOR_SHARE holds, not below MIN_CHUNK)
ALIGN_SLOTS = 16
FIT_FRACTION = 0.02  # the solver's matrices may take this share of the cache's bytes (at least one head's need)
FIT_PART = 256  # ... for a key chunk of at most this many slots


@dataclass(frozen=True)
class MemoryBudget:
    """The split of one memory budget (bytes unless named otherwise)."""

    cap_bytes: int | None  # the whole budget; None: no cap (the cache grows)
    cache_slots: int | None  # slots per full-attention layer
    cache_bytes: int  # the cache's buffers at cache_slots (0 without a cap)
    workspace_bytes: int
    mask_bytes: int  # one block of attention mask in a multi-token forward (agentloop.attention)
    probe_slots: int
    probe_bytes: int
    query_rows: int  # reservoir rows per (layer, KV head)
    query_window: int  # decode-time tokens whose queries the `recorded` source keeps
    query_bytes: int  # the reservoir (which also holds the rows kept between compactions), its mixes, the window
    fit_bytes: int
    prefill_chunk: int

    @property
    def reserve_bytes(self) -> int:
        return self.workspace_bytes + self.probe_bytes + self.query_bytes + self.fit_bytes

    def describe(self) -> str:
        """One line: the split, as the run header and `agentloop info` show it."""
        if self.cap_bytes is None:
            return "no cap: the cache grows as needed"
        parts = [f"cache {format_bytes(self.cache_bytes)} ({self.cache_slots:,} slots)",
                 f"step workspace {format_bytes(self.workspace_bytes)} (prefill chunks of {self.prefill_chunk})"]
        if self.query_rows:
            window = f", a {self.query_window}-token decode window" if self.query_window else ""
            parts += [f"re-read {format_bytes(self.probe_bytes)} ({self.probe_slots} slots)",
                      f"queries {format_bytes(self.query_bytes)} ({self.query_rows} rows per KV head{window})",
                      f"fits {format_bytes(self.fit_bytes)}"]
        return f"budget {format_bytes(self.cap_bytes)} = " + " + ".join(parts)


def _model_sizes(config) -> dict[str, int]:
    text = config.get_text_config(decoder=True)
    full, sliding, kv_heads, head_dim, _ = kv_geometry(config)
    return dict(layers=full, kv_heads=kv_heads, head_dim=head_dim, q_heads=text.num_attention_heads,
                hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                vocab=text.vocab_size)


def workspace(config, dtype: torch.dtype, cache_bytes: int | None,
              prefill_chunk: int = PREFILL_CHUNK) -> tuple[int, int, int]:
    """(bytes, prefill chunk, mask bytes) of one forward's transients. The workspace is a share of the cache, and at
    least what a chunk of FLOOR_CHUNK tokens needs: a quarter for two attention-mask blocks (the mask and SDPA's
    scores), the logits of the last position (model dtype and an fp32 copy), and the activations of a prefill chunk
    (residual, attention projections, MLP; counted twice for the allocator's slack) in the rest, which sets the
    chunk. No cap: the requested chunk and 8 MiB masks."""
    m, element = _model_sizes(config), torch.empty((), dtype=dtype).element_size()
    per_token = 2 * element * (4 * m["hidden"] + 3 * m["intermediate"] + 2 * (m["q_heads"] + 2 * m["kv_heads"]) * m["head_dim"])
    logits = m["vocab"] * (element + 4)
    if cache_bytes is None:
        mask = 8 << 20
        return prefill_chunk * per_token + 2 * mask + logits, prefill_chunk, mask
    floor_chunk = _within_floor_share(FLOOR_CHUNK, per_token)
    floor = min(floor_chunk, prefill_chunk) * per_token + logits + 2 * FLOOR_MASK
    total = max(floor * 4 // 3, int(WORKSPACE_FRACTION * cache_bytes))
    mask = max(FLOOR_MASK, total // 8)
    chunk = max(MIN_CHUNK, min(prefill_chunk, (total - 2 * mask - logits) // per_token))
    return max(total, chunk * per_token + 2 * mask + logits), chunk, mask


def _within_floor_share(count: int, unit_bytes: int) -> int:
    """`count` (tokens or slots of `unit_bytes` each), or fewer if they take more than SMALL_RESERVE / FLOOR_SHARE:
    at least MIN_CHUNK."""
    return max(MIN_CHUNK, min(count, SMALL_RESERVE // FLOOR_SHARE // unit_bytes))


def plan(config, dtype: torch.dtype, cap: MemCap | None, policy=None, prefill_chunk: int = PREFILL_CHUNK) -> MemoryBudget:
    """Split `cap` for this model and policy. A byte cap too small for the minimal working set is refused."""
    if cap is None:
        work, chunk, mask = workspace(config, dtype, None, prefill_chunk)
        window = policy.query_window() if policy is not None else 0
        return MemoryBudget(None, None, 0, work, mask, 0, 0, 0, window, 0, 0, chunk)
    slot = bytes_per_token(config, dtype)

    def split(slots: int) -> MemoryBudget:
        cache = slots * slot + sliding_bytes(config, dtype)
        work, chunk, mask = workspace(config, dtype, cache, prefill_chunk)
        probe_slots, rows, window, queries, fits = _compaction_reserve(config, dtype, slots, policy, work, rows_per_slot)
        total = cache + work + probe_slots * slot + queries + fits
        return MemoryBudget(total, slots, cache, work, mask, probe_slots, probe_slots * slot, rows, window, queries,
                            fits, chunk)

    rows_per_slot = QUERY_ROWS_PER_SLOT if cap.unit == "tokens" else BYTE_CAP_ROWS_PER_SLOT
    if cap.unit == "tokens":
        return split(cap.value)
    cap_bytes = cap.value
    lo, hi = 0, max(0, (cap_bytes - sliding_bytes(config, dtype)) // slot)  # the most slots that fit, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if split(mid).cap_bytes <= cap_bytes else (lo, mid - 1)
    if lo < MIN_SLOTS:
        least = split(MIN_SLOTS).cap_bytes
        name = getattr(policy, "name", "none")
        raise AgentloopError(f"mem-cap {cap} ({format_bytes(cap_bytes)}) is too small for this model with policy "
                             f"{name!r}: its minimal working set ({MIN_SLOTS} cache slots plus scratch) needs "
                             f"{format_bytes(least)}; raise --mem-cap to at least that")
    return dataclasses.replace(split(lo), cap_bytes=cap_bytes)




def _compaction_reserve(config, dtype, slots: int, policy, workspace_bytes: int,
                        rows_per_slot: float = QUERY_ROWS_PER_SLOT) -> tuple[int, int, int, int, int]:
    """(probe slots, query rows per KV head, decode-time query window, query bytes, fit bytes) a policy needs at a
    cache of `slots` slots.

    The reserve aims at RESERVE_FRACTION of the cache's bytes, or SMALL_RESERVE for small caches. The probe slots
    come first, then at least LEAST_ROWS_PER_SLOT query rows per kept slot and a LEAST_WINDOW-token decode window.
    If the rest holds one head's fit of the whole region, the fits get that and the rows grow (up to
    `rows_per_slot` per kept slot and the policy's max_queries) as far as the fit still fits; otherwise the
    region is fitted in key chunks of FIT_PART slots and the rows take the rest. The decode window grows to the
    policy's before the rows do (after the least fit). A cache too small for the least of them gets them anyway:
    its budget then exceeds the aim."""
    m, element = _model_sizes(config), torch.empty((), dtype=dtype).element_size()
    if policy is None or not getattr(policy, "compacts_with_queries", False):
        # eviction keeps slots with one layer-sized temporary (index_select before the in-place write)
        return 0, 0, 0, 0, slots * m["kv_heads"] * (2 * m["head_dim"] + 1) * element
    slot = bytes_per_token(config, dtype)
    cache = slots * slot
    kept = max(1, round(slots * policy.ratio))
    per_row = m["layers"] * m["kv_heads"] * m["head_dim"] * QUERY_BYTES
    groups = m["q_heads"] // m["kv_heads"]
    probe = min(MAX_PROBE, max(_within_floor_share(MIN_PROBE, slot), slots // PROBE_FRACTION))
    probe += -(slots + probe) % ALIGN_SLOTS  # buffers of a multiple of 16 slots: aligned masks for fused kernels
    want_rows = min(policy.max_queries, math.ceil(rows_per_slot * kept))
    rows, window = min(want_rows, math.ceil(LEAST_ROWS_PER_SLOT * kept)), min(policy.query_window(), LEAST_WINDOW)
    room = max(int(RESERVE_FRACTION * cache), SMALL_RESERVE) - workspace_bytes - probe * slot
    room -= (rows + groups * window) * per_row
    floor = int(FIT_FRACTION * cache)

    def whole(n: int) -> int:  # the solver's scratch for one head fitting the whole region with n rows
        return max(floor, head_bytes(n, slots, kept, m["head_dim"]))

    # the decode-time window comes before more rows: the `recorded` source (`am`'s default mix) is what keeps local
    # fidelity, and a 32-token window in place of 256 cost it (online-fidelity top-1 after 6 halvings 0.93 -> 0.0)
    part = min(slots, FIT_PART)
    chunked = max(floor, head_bytes(rows, part, max(1, round(part * policy.ratio)), m["head_dim"]))
    least_fit = whole(rows) if whole(rows) <= room else chunked
    more_window = min(policy.query_window() - window, max(0, room - least_fit) // (groups * per_row))
    window, room = window + more_window, room - more_window * groups * per_row
    if whole(rows) <= room:  # the whole region in one fit: as many more rows as still leave room for it
        lo, hi = rows, want_rows
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if (mid - rows) * per_row + whole(mid) <= room else (lo, mid - 1)
        room -= (lo - rows) * per_row + whole(lo)
        rows, fits = lo, whole(lo)
    else:  # fitted in key chunks of at most FIT_PART slots (compact_span): the rows take the rest
        fits = chunked
        more = max(0, min(want_rows - rows, (room - fits) // per_row))
        rows, room = rows + more, room - fits - more * per_row
    window += min(policy.query_window() - window, max(0, room) // (groups * per_row))
    queries = (rows + groups * window) * per_row
    return probe, rows, window, queries, fits
