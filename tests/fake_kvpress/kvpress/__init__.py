"""A stand-in for NVIDIA kvpress in tests (the real one pins another transformers): the same decode-time
schedule as its DecodingPress (one step per forward after the prefill; in the forward hook of every
`compression_interval`-th step each layer is cut to its `target_size` best-scored slots), with a key-norm scorer."""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class KnormPress:
    compression_ratio: float = 0.0

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        return -keys.norm(dim=-1)  # [batch, kv_heads, slots]


@dataclass
class DecodingPress:
    base_press: KnormPress
    compression_interval: int = 512
    target_size: int = 2048
    steps: dict = field(default_factory=dict)

    def forward_hook(self, module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        if layer.keys.shape[-2] == kwargs["hidden_states"].shape[1]:  # the prefill filled an empty cache
            return output
        self.steps[module.layer_idx] = self.steps.get(module.layer_idx, 0) + 1
        if self.steps[module.layer_idx] >= self.compression_interval and layer.keys.shape[-2] > self.target_size:
            kept = self.base_press.score(layer.keys).topk(self.target_size, dim=-1).indices.sort(-1).values
            index = kept[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
            self.steps[module.layer_idx] = 0
        return output

    @contextmanager
    def __call__(self, model):
        hooks = [layer.self_attn.register_forward_hook(self.forward_hook, with_kwargs=True) for layer in model.model.layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self.steps = {}
