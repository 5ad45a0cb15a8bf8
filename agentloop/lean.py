"""The one-token forward of a Llama-family decoder, written out from the model's own modules.

A decode step through the modeling code pays, per layer, for its general machinery: the decoder layer and attention
wrappers, keyword plumbing, the attention-interface lookup, output capturing. This forward calls the same
submodules (embedding, RMSNorms, projections, MLP, rotary embedding, head) in the same order on the same tensors, and
agentloop's attention, so its logits are those of the modeling code bit for bit, with less host work per token (on
the CPU ~4% of a SmolLM2 token at a 1k context; on a GPU without a CUDA graph the host work is most of a step).

It applies to the architectures whose decoder layer is exactly: x + o_proj(attention(RoPE(q, k), v)) over
input_layernorm(x), then x + mlp(post_attention_layernorm(x)), with q_norm / k_norm on the heads where the model has
them (Qwen3). Others (Gemma 3's scaled embeddings and extra norms, sliding windows) use the modeling code.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the same in Qwen2 and Qwen3

from agentloop.attention import beta_attention
from agentloop.cache import CompactableLayer

MODEL_TYPES = ("llama", "qwen2", "qwen3")


class LeanForward:
    """`forward(cache, input_ids [1, 1], position_ids [1, 1], recorder) -> logits [1, 1, vocab]`."""

    @staticmethod
    def applies(model, cache) -> bool:
        config = model.config
        return (config.model_type in MODEL_TYPES and all(isinstance(layer, CompactableLayer) for layer in cache.layers)
                and all(getattr(layer.self_attn, "sliding_window", None) is None for layer in model.model.layers))

    def __init__(self, model):
        self.model, self.inner = model, model.model
        self.head_dim = self.inner.layers[0].self_attn.head_dim

    def forward(self, cache, input_ids: torch.Tensor, position_ids: torch.Tensor, recorder=None) -> torch.Tensor:
        inner, head_dim = self.inner, self.head_dim
        x = inner.embed_tokens(input_ids)  # [1, 1, hidden]
        cos, sin = inner.rotary_emb(x, position_ids)  # [1, 1, head_dim]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            # [1, 1, heads * head_dim] -> [1, 1, heads, head_dim] (q_norm/k_norm per head) -> [1, heads, 1, head_dim]
            q = attn.q_proj(h).view(1, 1, -1, head_dim)
            k = attn.k_proj(h).view(1, 1, -1, head_dim)
            v = attn.v_proj(h).view(1, 1, -1, head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = cache.layers[i].update(k, v)
            out, _ = beta_attention(attn, q, keys, values, scaling=attn.scaling, beta_cache=cache,
                                    query_recorder=recorder)  # [1, 1, heads, head_dim]
            x = x + attn.o_proj(out.reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(inner.norm(x))
