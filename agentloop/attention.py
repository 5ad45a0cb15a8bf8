"""β-aware attention, registered with transformers' AttentionInterface (no forked modeling files).

The model runs with `attn_implementation="agentloop"`. The loop passes its cache as the `beta_cache`
forward kwarg, which transformers hands through to every attention call (and, when reference queries
are being collected for compaction, a `query_recorder` that sees each layer's post-RoPE queries). A layer whose cache slots
carry no β runs the stock SDPA path unchanged; a layer with β adds it to the logits of its cached slots
through an additive float mask (physical causal alignment: the queries are the last q_len slots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "agentloop"


def beta_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        beta_cache=None, query_recorder=None, **kwargs):
    if query_recorder is not None:
        query_recorder.record(module.layer_idx, query)
    beta = beta_cache.beta(module.layer_idx) if beta_cache is not None else None
    if beta is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported together with β")
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    if beta.shape[-1] != kv_len:
        raise RuntimeError(f"layer {module.layer_idx}: β covers {beta.shape[-1]} slots but attention sees {kv_len}")

    # Visibility [batch or 1, 1, q_len, kv_len]: the queries are the newest q_len slots.
    if attention_mask is None:
        rows = torch.arange(q_len, device=key.device)[:, None] + (kv_len - q_len)
        visible = (torch.arange(kv_len, device=key.device)[None, :] <= rows)[None, None]
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., -kv_len:]
    else:
        visible = attention_mask[..., -kv_len:] > torch.finfo(attention_mask.dtype).min / 2
    # Bias [batch, kv_heads, groups * q_len, kv_len]: β per kv head, shared by its query group.
    bias = torch.where(visible, beta[:, :, None, :].to(query.dtype), float("-inf"))  # [batch, kv_heads, q_len, kv_len]
    bias = bias.repeat(1, 1, groups, 1)  # rows ordered (group, query), matching the query reshape below

    # Queries grouped by their kv head: [batch, q_heads, q_len, d] -> [batch, kv_heads, groups * q_len, d]
    grouped = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    # [batch, kv_heads, groups * q_len, d] -> [batch, q_len, q_heads, d] (the layout modeling files expect)
    out = out.reshape(batch, q_heads, q_len, value.shape[-1]).transpose(1, 2).contiguous()
    return out, None


def register() -> None:
    """Make `attn_implementation="agentloop"` available (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, beta_sdpa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def enable(model) -> None:
    """Switch a loaded model to β-aware attention."""
    register()
    model.set_attn_implementation(IMPLEMENTATION)
