"""A transformers v5 Cache whose full-attention layers can be compacted.

Each full-attention layer holds keys and values [batch, kv_heads, physical_len, head_dim] and, once a
span has been replaced by a compacted block, a per-slot logit bias `beta` [batch, kv_heads, physical_len].
Two lengths are tracked:
  logical_len  - tokens the model has seen; drives RoPE positions of new tokens (passed as position_ids);
  physical_len - slots held; drives the causal mask (transformers builds masks from get_seq_length()).
Sliding-window layers (Gemma 3) keep their window, their own (logical) offsets, and are never compacted.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


class CompactableLayer(DynamicLayer):
    """A full-attention layer whose slots can be evicted or replaced by a compacted block with β."""

    def __init__(self, **kwargs):
        super().__init__()
        self.beta: torch.Tensor | None = None  # [batch, kv_heads, physical_len], None while no slot has a bias
        self.logical_len = 0

    @property
    def physical_len(self) -> int:
        return self.get_seq_length()

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        self.logical_len += key_states.shape[-2]
        if self.beta is not None:
            zeros = self.beta.new_zeros(*self.beta.shape[:2], key_states.shape[-2])
            self.beta = torch.cat([self.beta, zeros], dim=-1)
        return keys, values

    def replace(self, start: int, end: int, keys: torch.Tensor, values: torch.Tensor,
                beta: torch.Tensor | None = None) -> None:
        """Swap slots [start, end) for `keys`/`values` [batch, kv_heads, t, head_dim] with bias `beta` [batch, kv_heads, t]."""
        n = self.physical_len
        if not (0 <= start <= end <= n):
            raise ValueError(f"replace span [{start}, {end}) is outside the {n} slots held")
        if keys.shape != values.shape[:-1] + keys.shape[-1:] or keys.shape[:2] != self.keys.shape[:2]:
            raise ValueError(f"replacement keys {tuple(keys.shape)} / values {tuple(values.shape)} do not match the "
                             f"layer's [batch, kv_heads] = {tuple(self.keys.shape[:2])}")
        t = keys.shape[-2]
        if beta is not None and beta.shape != keys.shape[:-1]:
            raise ValueError(f"beta must have shape {tuple(keys.shape[:-1])}, got {tuple(beta.shape)}")
        keys, values = keys.to(self.keys), values.to(self.values)
        self.keys = torch.cat([self.keys[..., :start, :], keys, self.keys[..., end:, :]], dim=-2)
        self.values = torch.cat([self.values[..., :start, :], values, self.values[..., end:, :]], dim=-2)
        if beta is None and self.beta is None:
            return
        old = self.beta if self.beta is not None else self.keys.new_zeros(*self.keys.shape[:2], n)
        new = beta.to(old) if beta is not None else old.new_zeros(*old.shape[:2], t)
        self.beta = torch.cat([old[..., :start], new, old[..., end:]], dim=-1)

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the slots at `indices` (sorted): [t] for all heads alike, or [kv_heads, t] per head."""
        if indices.dim() == 1:
            self.keys = self.keys.index_select(-2, indices)
            self.values = self.values.index_select(-2, indices)
            if self.beta is not None:
                self.beta = self.beta.index_select(-1, indices)
            return
        batch, heads, _, dim = self.keys.shape
        index = indices.to(self.keys.device).expand(batch, heads, -1)  # [batch, kv_heads, t]
        self.keys = self.keys.gather(-2, index[..., None].expand(-1, -1, -1, dim))
        self.values = self.values.gather(-2, index[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        if self.beta is not None:
            self.beta = self.beta.gather(-1, index)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        tensors = [self.keys, self.values] + ([self.beta] if self.beta is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer: bounded by its window, never compacted. Its offsets are logical."""

    @property
    def logical_len(self) -> int:
        return self.cumulative_length

    @property
    def physical_len(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class CompactableCache(Cache):
    """One layer per decoder layer: CompactableLayer for full attention, SlidingLayer for sliding windows."""

    def __init__(self, config):
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        layers = []
        for layer_type in layer_types:
            if layer_type == "sliding_attention":
                layers.append(SlidingLayer(sliding_window=text_config.sliding_window))
            elif layer_type == "full_attention":
                layers.append(CompactableLayer())
            else:
                raise ValueError(f"layer type {layer_type!r} is not supported by agentloop's cache")
        super().__init__(layers=layers)
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.kv_heads = text_config.num_key_value_heads
        self.sliding_window = getattr(text_config, "sliding_window", None)

    # --- what the loop and the policies read -------------------------------------------------
    @property
    def compactable(self) -> list[int]:
        """Indices of the layers that may be compacted (the full-attention ones)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompactableLayer)]

    @property
    def logical_len(self) -> int:
        return max((layer.logical_len for layer in self.layers), default=0)

    @property
    def physical_len(self) -> int:
        """Slots held by the longest full-attention layer."""
        return max((self.layers[i].physical_len for i in self.compactable), default=0)

    def nbytes(self) -> int:
        """Exact bytes of every tensor held: keys, values and β."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_after(self, n_new: int, element_size: int) -> int:
        """Bytes held after appending `n_new` tokens to every layer (sliding layers stay within their window)."""
        total = 0
        per_slot = 2 * self.kv_heads * self.head_dim * element_size
        for layer in self.layers:
            if isinstance(layer, SlidingLayer):
                total += min(layer.physical_len + n_new, layer.sliding_window - 1) * per_slot
            else:
                beta = self.kv_heads * element_size if layer.beta is not None else 0
                total += (layer.physical_len + n_new) * (per_slot + beta)
        return total

    def full_slot_bytes(self, element_size: int) -> int:
        """Bytes one slot costs across all full-attention layers, β included where a layer holds β."""
        per_slot = 2 * self.kv_heads * self.head_dim * element_size
        beta = self.kv_heads * element_size
        return sum(per_slot + (beta if self.layers[i].beta is not None else 0) for i in self.compactable)

    # --- mask sizes: full layers may hold different numbers of slots (non-uniform compaction budgets) ------
    def get_query_offset(self, layer_idx: int = 0) -> int:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], CompactableLayer):
            return self.physical_len
        return super().get_query_offset(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """The full-attention causal mask spans the longest full layer; each layer's β attention keeps the last
        kv_len columns (agentloop.attention), so a shorter layer stays aligned with the newest slots."""
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], CompactableLayer):
            return self.physical_len + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def beta(self, layer_idx: int) -> torch.Tensor | None:
        layer = self.layers[layer_idx]
        return getattr(layer, "beta", None)

    def copy(self) -> CompactableCache:
        """An independent copy (tensors cloned), e.g. to try several compactions of one context."""
        return copy.deepcopy(self)

    # --- persistence (checkpoints, parked sessions) -------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the cache holds, as plain tensors (on their device) and ints: what `load_state_dict` restores.

        {"layers": [{"kind": "full", "keys", "values": [batch, kv_heads, physical_len, d], "beta": [batch, kv_heads,
        physical_len] or None, "logical_len"} | {"kind": "sliding", "keys", "values", "cumulative_length"}]}"""
        layers = []
        for layer in self.layers:
            if not layer.is_initialized:
                layers.append({"kind": "empty"})
            elif isinstance(layer, SlidingLayer):
                layers.append({"kind": "sliding", "keys": layer.keys, "values": layer.values,
                               "cumulative_length": layer.cumulative_length})
            else:
                layers.append({"kind": "full", "keys": layer.keys, "values": layer.values, "beta": layer.beta,
                               "logical_len": layer.logical_len})
        return {"layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (tensors are copied onto this cache's layers)."""
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"state holds {len(state['layers'])} layers, the model has {len(self.layers)}")
        for layer, saved in zip(self.layers, state["layers"], strict=True):
            kind = "sliding" if isinstance(layer, SlidingLayer) else "full"
            if saved["kind"] == "empty":
                continue
            if saved["kind"] != kind:
                raise ValueError(f"state layer of kind {saved['kind']!r} does not fit a {kind} layer")
            keys, values = saved["keys"].clone(), saved["values"].clone()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            if kind == "sliding":
                layer.cumulative_length = saved["cumulative_length"]
            else:
                layer.beta = saved["beta"].clone() if saved["beta"] is not None else None
                layer.logical_len = saved["logical_len"]

    # --- temporary extensions (reference-query probes) ------------------------------------------
    def snapshot(self) -> list:
        """What `restore` needs to undo later appends: lengths for full layers, copies of sliding windows."""
        return [(layer.keys.clone(), layer.values.clone(), layer.cumulative_length) if isinstance(layer, SlidingLayer)
                else (layer.physical_len, layer.logical_len, layer.beta is not None) for layer in self.layers]

    def restore(self, snapshot: list) -> None:
        """Drop everything appended since `snapshot` (no replace/keep may have happened in between)."""
        for layer, saved in zip(self.layers, snapshot, strict=False):
            if isinstance(layer, SlidingLayer):
                layer.keys, layer.values, layer.cumulative_length = saved
                continue
            physical, logical, had_beta = saved
            layer.keys = layer.keys[..., :physical, :].clone()
            layer.values = layer.values[..., :physical, :].clone()
            layer.beta = layer.beta[..., :physical].clone() if had_beta else None
            layer.logical_len = logical

    # --- edits --------------------------------------------------------------------------------
    def replace(self, layer_idx: int, start: int, end: int, keys: torch.Tensor, values: torch.Tensor,
                beta: torch.Tensor | None = None) -> None:
        self._compactable_layer(layer_idx).replace(start, end, keys, values, beta)

    def keep(self, layer_idx: int, indices: torch.Tensor) -> None:
        self._compactable_layer(layer_idx).keep(indices)

    def _compactable_layer(self, layer_idx: int) -> CompactableLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, CompactableLayer):
            raise ValueError(f"layer {layer_idx} is a sliding-window layer; it keeps its window and is never compacted")
        return layer


def kv_geometry(config) -> tuple[int, int, int, int, int | None]:
    """(full layers, sliding layers, kv_heads, head_dim, sliding_window) of a decoder config."""
    text_config = config.get_text_config(decoder=True)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    sliding = sum(t == "sliding_attention" for t in layer_types)
    window = getattr(text_config, "sliding_window", None) if sliding else None
    return len(layer_types) - sliding, sliding, text_config.num_key_value_heads, head_dim, window


def bytes_per_token(config, dtype: torch.dtype, with_beta: bool = True) -> int:
    """Bytes one more slot costs in every full-attention layer (β included when `with_beta`)."""
    full, _, kv_heads, head_dim, _ = kv_geometry(config)
    element = torch.empty((), dtype=dtype).element_size()
    return full * kv_heads * (2 * head_dim + (1 if with_beta else 0)) * element


def slots_to_bytes(config, dtype: torch.dtype, slots: int) -> int:
    """Bytes of a cache holding `slots` slots per full layer, all with β, and full sliding windows."""
    _, sliding, kv_heads, head_dim, window = kv_geometry(config)
    element = torch.empty((), dtype=dtype).element_size()
    sliding_bytes = sliding * min(slots, (window or 1) - 1) * kv_heads * 2 * head_dim * element
    return slots * bytes_per_token(config, dtype) + sliding_bytes
