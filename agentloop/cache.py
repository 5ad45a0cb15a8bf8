"""A transformers v5 Cache whose full-attention layers live in preallocated buffers and can be compacted in place.

Each full-attention layer owns three buffers sized once (to the memory budget's slots, or grown geometrically when
there is no cap):
  key_buffer, value_buffer  [batch, kv_heads, capacity, head_dim]
  beta_buffer               [batch, kv_heads, capacity]  a per-slot logit bias: 0 for a plain slot, β for a slot of
                            a compacted block, −inf for every slot past the ones held (so attention over the whole
                            buffer, as the static decode step does, sees only the held slots).
Decoding writes the new token's keys and values in place; `replace`/`keep` compact in place; `keys`, `values` and
`beta` are views of the held slots. Two lengths are tracked:
  logical_len  - tokens the model has seen; drives RoPE positions of new tokens (passed as position_ids);
  physical_len - slots held; the attention sees exactly these.
Sliding-window layers (Gemma 3) keep their window, their own (logical) offsets, and are never compacted.
"""

from __future__ import annotations

import copy
import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

INITIAL_SLOTS = 256  # first allocation of a layer with no slot limit; it doubles when full


class CompactableLayer(CacheLayerMixin):
    """A full-attention layer in fixed buffers, whose slots can be evicted or replaced by a compacted block with β."""

    is_sliding = False

    def __init__(self, capacity: int | None = None):
        self.is_initialized = False
        self.fixed_capacity = capacity  # None: grow geometrically
        self.key_buffer = self.value_buffer = self.beta_buffer = None
        self.physical_len = 0
        self.logical_len = 0
        self.has_beta = False  # some held slot carries a nonzero bias: attention must add β
        self.static_slot: torch.Tensor | None = None  # [1] on the device: where the static decode step writes

    # --- views of what is held ---------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self.key_buffer[..., :self.physical_len, :]

    @property
    def values(self) -> torch.Tensor:
        return self.value_buffer[..., :self.physical_len, :]

    @property
    def beta(self) -> torch.Tensor | None:
        """[batch, kv_heads, physical_len], or None while no held slot has a bias."""
        return self.beta_buffer[..., :self.physical_len] if self.has_beta else None

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[-2] if self.is_initialized else 0

    # --- the transformers layer interface --------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, n, _ = key_states.shape
        slots = self.fixed_capacity if self.fixed_capacity is not None else max(INITIAL_SLOTS, n)
        with torch.inference_mode(False):  # plain tensors: edited in place inside and outside inference mode
            self.key_buffer = key_states.new_zeros(batch, heads, slots, key_states.shape[-1])
            self.value_buffer = value_states.new_zeros(batch, heads, slots, value_states.shape[-1])
            self.beta_buffer = key_states.new_full((batch, heads, slots), -math.inf)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static_slot is not None:  # the static decode step: one token at a device-side slot, whole buffers back
            self.key_buffer.index_copy_(2, self.static_slot, key_states)
            self.value_buffer.index_copy_(2, self.static_slot, value_states)
            self.beta_buffer.index_fill_(2, self.static_slot, 0.0)
            return self.key_buffer, self.value_buffer
        n, start = key_states.shape[-2], self.physical_len
        self._ensure_capacity(start + n)
        self.key_buffer[..., start:start + n, :] = key_states
        self.value_buffer[..., start:start + n, :] = value_states
        self.beta_buffer[..., start:start + n] = 0.0
        self.physical_len += n
        self.logical_len += n
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.physical_len

    def get_max_length(self) -> int:
        return -1 if self.fixed_capacity is None else self.fixed_capacity

    # --- edits, all in place ---------------------------------------------------------------------------
    def replace(self, start: int, end: int, keys: torch.Tensor, values: torch.Tensor,
                beta: torch.Tensor | None = None) -> None:
        """Swap slots [start, end) for `keys`/`values` [batch, kv_heads, t, head_dim] with bias `beta` [batch, kv_heads, t]."""
        n = self.physical_len
        if not (0 <= start <= end <= n):
            raise ValueError(f"replace span [{start}, {end}) is outside the {n} slots held")
        if keys.shape != values.shape[:-1] + keys.shape[-1:] or keys.shape[:2] != self.key_buffer.shape[:2]:
            raise ValueError(f"replacement keys {tuple(keys.shape)} / values {tuple(values.shape)} do not match the "
                             f"layer's [batch, kv_heads] = {tuple(self.key_buffer.shape[:2])}")
        t = keys.shape[-2]
        if beta is not None and beta.shape != keys.shape[:-1]:
            raise ValueError(f"beta must have shape {tuple(keys.shape[:-1])}, got {tuple(beta.shape)}")
        if t > end - start:  # the block is longer than the span: make room first
            self._ensure_capacity(n + t - (end - start))
            self.move_tail(end, start + t)
            self.write_block(start, keys[0], values[0], beta[0] if beta is not None else None)
        else:
            self.write_block(start, keys[0], values[0], beta[0] if beta is not None else None)
            self.move_tail(end, start + t)

    def write_block(self, start: int, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor | None,
                    heads: slice = slice(None)) -> None:
        """Write `keys`/`values` [h, t, d] and `beta` [h, t] (None: no bias) of KV heads `heads` at slots
        [start, start + t), without changing the lengths (a compaction writes its heads one chunk at a time)."""
        t = keys.shape[-2]
        self.key_buffer[0, heads, start:start + t] = keys
        self.value_buffer[0, heads, start:start + t] = values
        if beta is None:
            self.beta_buffer[0, heads, start:start + t] = 0.0
        else:
            self.beta_buffer[0, heads, start:start + t] = beta
            self.has_beta = True

    def move_tail(self, end: int, new_end: int) -> None:
        """Move slots [end, physical_len) to start at `new_end`; physical_len follows. Slots freed at the end get
        β = −inf. Overlapping moves go in pieces that never overlap their source."""
        n = self.physical_len
        length, shift = n - end, new_end - end
        if shift == 0:
            return
        step = abs(shift)
        pieces = range(0, length, step) if shift < 0 else reversed(range(0, length, step))
        for lo in pieces:  # left moves run front to back, right moves back to front
            hi = min(lo + step, length)
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[..., new_end + lo:new_end + hi, :] = buffer[..., end + lo:end + hi, :]
            self.beta_buffer[..., new_end + lo:new_end + hi] = self.beta_buffer[..., end + lo:end + hi]
        self.physical_len = new_end + length
        if self.physical_len < n:
            self.beta_buffer[..., self.physical_len:n] = -math.inf

    def keep(self, indices: torch.Tensor) -> None:
        """Keep only the slots at `indices` (sorted): [t] for all heads alike, or [kv_heads, t] per head."""
        t = indices.shape[-1]
        indices = indices.to(self.device)
        if indices.dim() == 1:
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[..., :t, :] = buffer.index_select(-2, indices)
            self.beta_buffer[..., :t] = self.beta_buffer.index_select(-1, indices)
        else:
            batch, heads = self.key_buffer.shape[:2]
            index = indices.expand(batch, heads, -1)  # [batch, kv_heads, t]
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[..., :t, :] = buffer.gather(-2, index[..., None].expand(-1, -1, -1, buffer.shape[-1]))
            self.beta_buffer[..., :t] = self.beta_buffer.gather(-1, index)
        self.beta_buffer[..., t:self.physical_len] = -math.inf
        self.physical_len = t

    def truncate(self, length: int) -> None:
        """Drop the slots from `length` on (a probe's transient tokens); the logical length is the caller's."""
        self.beta_buffer[..., length:self.physical_len] = -math.inf
        self.physical_len = length

    def _ensure_capacity(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        if self.fixed_capacity is not None:
            raise RuntimeError(f"the layer's buffers hold {self.capacity} slots; {slots} were asked for (the memory "
                               "budget is checked before every forward, so this is a bug)")
        grown = max(slots, 2 * self.capacity)
        with torch.inference_mode(False):
            self._grow(grown)

    def _grow(self, grown: int) -> None:
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], grown, old.shape[-1])
            new[..., :self.physical_len, :] = old[..., :self.physical_len, :]
            setattr(self, name, new)
        beta = self.beta_buffer.new_full((*self.beta_buffer.shape[:2], grown), -math.inf)
        beta[..., :self.physical_len] = self.beta_buffer[..., :self.physical_len]
        self.beta_buffer = beta

    def nbytes(self) -> int:
        """Bytes allocated: the whole buffers, whatever they hold."""
        if not self.is_initialized:
            return 0
        return sum(b.numel() * b.element_size() for b in (self.key_buffer, self.value_buffer, self.beta_buffer))

    def held_bytes(self) -> int:
        """Bytes of the held slots (keys, values, β)."""
        if not self.is_initialized:
            return 0
        return self.nbytes() * self.physical_len // self.capacity


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

    held_bytes = nbytes


class CompactableCache(Cache):
    """One layer per decoder layer: CompactableLayer for full attention, SlidingLayer for sliding windows.

    `max_slots` is what the memory budget gives each full layer (None: no cap); `probe_slots` more are allocated
    for the transient tokens of a probe (a compaction's re-read), which are always rolled back."""

    def __init__(self, config, max_slots: int | None = None, probe_slots: int = 0):
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        capacity = max_slots + probe_slots if max_slots is not None else None
        layers = []
        for layer_type in layer_types:
            if layer_type == "sliding_attention":
                layers.append(SlidingLayer(sliding_window=text_config.sliding_window))
            elif layer_type == "full_attention":
                layers.append(CompactableLayer(capacity))
            else:
                raise ValueError(f"layer type {layer_type!r} is not supported by agentloop's cache")
        super().__init__(layers=layers)
        self.max_slots, self.probe_slots = max_slots, probe_slots
        self.mask_bytes: int | None = None  # bound on one attention-mask block (agentloop.attention), from the budget
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

    def free_slots(self) -> int | None:
        """Slots every full layer can still take under the budget (None: no cap)."""
        return None if self.max_slots is None else self.max_slots - self.physical_len

    def nbytes(self) -> int:
        """Bytes allocated by every layer: buffers (keys, values, β) and sliding windows."""
        return sum(layer.nbytes() for layer in self.layers)

    def held_bytes(self) -> int:
        """Bytes of the slots held (keys, values, β)."""
        return sum(layer.held_bytes() for layer in self.layers)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], CompactableLayer):
            return self.layers[layer_idx].physical_len
        return super().get_query_offset(layer_idx)

    def beta(self, layer_idx: int) -> torch.Tensor | None:
        """The β of the held slots [batch, kv_heads, physical_len], None if the layer has none."""
        return getattr(self.layers[layer_idx], "beta", None)

    def attention_bias(self, layer_idx: int) -> torch.Tensor | None:
        """What attention adds to a layer's logits: the whole β buffer in the static decode step (−inf past the held
        slots), the held slots' β when some carry a bias, else None (plain attention)."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, CompactableLayer):
            return None
        if layer.static_slot is not None:
            return layer.beta_buffer
        return layer.beta

    def copy(self) -> CompactableCache:
        """An independent copy (buffers cloned), e.g. to try several compactions of one context."""
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
        """Restore what `state_dict` returned (tensors are copied into this cache's layers)."""
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"state holds {len(state['layers'])} layers, the model has {len(self.layers)}")
        for layer, saved in zip(self.layers, state["layers"], strict=True):
            kind = "sliding" if isinstance(layer, SlidingLayer) else "full"
            if saved["kind"] == "empty":
                continue
            if saved["kind"] != kind:
                raise ValueError(f"state layer of kind {saved['kind']!r} does not fit a {kind} layer")
            if kind == "sliding":
                layer.lazy_initialization(saved["keys"], saved["values"])
                layer.keys, layer.values = saved["keys"].clone(), saved["values"].clone()
                layer.cumulative_length = saved["cumulative_length"]
                continue
            keys, values = saved["keys"], saved["values"]
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.physical_len = 0
            layer._ensure_capacity(keys.shape[-2])
            layer.beta_buffer.fill_(-math.inf)
            layer.has_beta = False
            layer.physical_len = keys.shape[-2]
            layer.write_block(0, keys[0], values[0], saved["beta"][0] if saved["beta"] is not None else None)
            layer.logical_len = saved["logical_len"]

    # --- temporary extensions (reference-query probes) ------------------------------------------
    def snapshot(self) -> list:
        """What `restore` needs to undo later appends: lengths for full layers, copies of sliding windows."""
        return [(layer.keys.clone(), layer.values.clone(), layer.cumulative_length) if isinstance(layer, SlidingLayer)
                else (layer.physical_len, layer.logical_len, layer.has_beta) for layer in self.layers]

    def restore(self, snapshot: list) -> None:
        """Drop everything appended since `snapshot` (no replace/keep may have happened in between)."""
        for layer, saved in zip(self.layers, snapshot, strict=False):
            if isinstance(layer, SlidingLayer):
                layer.keys, layer.values, layer.cumulative_length = saved
                continue
            physical, logical, had_beta = saved
            if layer.is_initialized:
                layer.truncate(physical)
            layer.logical_len, layer.has_beta = logical, had_beta

    # --- edits --------------------------------------------------------------------------------
    def replace(self, layer_idx: int, start: int, end: int, keys: torch.Tensor, values: torch.Tensor,
                beta: torch.Tensor | None = None) -> None:
        self.compactable_layer(layer_idx).replace(start, end, keys, values, beta)

    def keep(self, layer_idx: int, indices: torch.Tensor) -> None:
        self.compactable_layer(layer_idx).keep(indices)

    def compactable_layer(self, layer_idx: int) -> CompactableLayer:
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


def sliding_bytes(config, dtype: torch.dtype) -> int:
    """Bytes the sliding-window layers hold at most (their whole windows)."""
    _, sliding, kv_heads, head_dim, window = kv_geometry(config)
    element = torch.empty((), dtype=dtype).element_size()
    return sliding * (window or 0) * kv_heads * 2 * head_dim * element


def slots_to_bytes(config, dtype: torch.dtype, slots: int) -> int:
    """Bytes of a cache allocated for `slots` slots per full layer (keys, values, β) and full sliding windows."""
    return slots * bytes_per_token(config, dtype) + sliding_bytes(config, dtype)
