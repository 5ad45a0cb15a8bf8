"""β-aware attention, registered with transformers' AttentionInterface (no forked modeling files).

The model runs with `attn_implementation="agentloop"`. No mask function is registered for it, so transformers builds
no attention mask at all: this function knows the layout (the queries are the newest q_len of the keys it is given)
and applies causality itself. The loop passes its cache as the `beta_cache` forward kwarg, which transformers hands
through to every attention call (and, when reference queries are being collected for compaction, a
`query_recorder` that sees each layer's post-RoPE queries).

Queries are grouped by the KV head they share, [batch, kv_heads, groups * q_len, d], so that keys and values are
never repeated per query head. Paths:
  one new token  - every held slot is visible: no mask, or the layer's β as a broadcast view [batch, kv_heads, 1, kv]
                   (nothing allocated per step); the static decode step attends over the whole buffer this way,
                   with β = −inf past the held slots;
  several tokens - a causal (and sliding-window) mask, plus β where the layer has it, built for blocks of query
                   rows whose mask stays under `MASK_BYTES`, each block over only the keys its rows can see.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

IMPLEMENTATION = "agentloop"
MASK_BYTES = 8 << 20  # default bound on one block's attention mask in a multi-token forward (the budget sets it)
CAUSAL_BLOCK = 256  # most query positions per block: smaller blocks skip more of the keys no row of theirs sees


def beta_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, sliding_window=None,
                   beta_cache=None, query_recorder=None, **kwargs):
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by agentloop's attention")
    if query_recorder is not None:
        query_recorder.record(module.layer_idx, query)
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    bias = beta_cache.attention_bias(module.layer_idx) if beta_cache is not None else None  # [batch, kv_heads, kv]
    if bias is not None and bias.shape[-1] != kv_len:
        raise RuntimeError(f"layer {module.layer_idx}: β covers {bias.shape[-1]} slots but attention sees {kv_len}")

    # [batch, q_heads, q_len, d] -> [batch, kv_heads, groups * q_len, d]: rows ordered (group, query)
    grouped = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    if q_len == 1:
        mask = bias[:, :, None, :].to(query.dtype) if bias is not None else None
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        limit = getattr(beta_cache, "mask_bytes", None) or MASK_BYTES
        out = _causal_blocks(grouped, key, value, bias, q_len, groups, scaling, sliding_window, dropout, limit)
    # [batch, kv_heads, groups * q_len, d] -> [batch, q_len, q_heads, d] (the layout modeling files expect)
    return out.reshape(batch, q_heads, q_len, value.shape[-1]).transpose(1, 2).contiguous(), None


def _causal_blocks(grouped, key, value, bias, q_len, groups, scaling, sliding_window, dropout, limit):
    """Attention of q_len new tokens (the newest slots) in blocks of query rows: [batch, kv_heads, groups * q_len, d].

    A block attends only to the keys some of its rows can see (up to its last row's slot, and from its first row's
    window start), so a causal prefill does about half the work of attending to every key in every block."""
    batch, kv_heads, _, head_dim = grouped.shape
    kv_len = key.shape[2]
    past = kv_len - q_len  # slots held before the new tokens
    element = 1 if bias is None else grouped.element_size()
    per_row = groups * kv_len * element * (kv_heads if bias is not None else 1)
    block = max(1, min(q_len, CAUSAL_BLOCK, limit // per_row))
    by_query = grouped.view(batch, kv_heads, groups, q_len, head_dim)
    out = []
    for lo in range(0, q_len, block):
        hi = min(lo + block, q_len)
        first = 0 if sliding_window is None else max(0, past + lo - sliding_window + 1)  # keys [first, past + hi)
        rows = torch.arange(past + lo, past + hi, device=grouped.device)[:, None]  # each query's own slot
        slots = torch.arange(first, past + hi, device=grouped.device)[None, :]
        visible = slots <= rows  # [rows, keys]
        if sliding_window is not None:
            visible &= rows - slots < sliding_window
        if bias is None:
            mask = visible.repeat(groups, 1)  # [groups * rows, keys], rows ordered (group, query)
        else:
            mask = torch.where(visible, bias[:, :, None, first:past + hi].to(grouped.dtype), -math.inf)
            mask = mask.repeat(1, 1, groups, 1)  # [batch, kv_heads, groups * rows, keys]
        queries = by_query[:, :, :, lo:hi].reshape(batch, kv_heads, groups * (hi - lo), head_dim)
        part = F.scaled_dot_product_attention(queries, key[:, :, first:past + hi], value[:, :, first:past + hi],
                                              attn_mask=mask, dropout_p=dropout, scale=scaling)
        out.append(part.view(batch, kv_heads, groups, hi - lo, -1))
    return torch.cat(out, dim=3).reshape(batch, kv_heads, groups * q_len, -1) if len(out) > 1 else out[0].reshape(
        batch, kv_heads, groups * q_len, -1)


def register() -> None:
    """Make `attn_implementation="agentloop"` available (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, beta_attention)


def enable(model) -> None:
    """Switch a loaded model to β-aware attention."""
    register()
    model.set_attn_implementation(IMPLEMENTATION)
