"""The one-token decode step with static shapes, captured once in a CUDA graph and replayed for every token.

Shapes never change because the step attends over the whole preallocated buffer of every layer: slots past the
held ones carry β = −inf, so they get no attention (agentloop.cache). Everything that changes from token to token
lives in device tensors written before each replay — the token id, its RoPE position, each layer's write slot, the
ring slot of the decode-time query window — so a compaction, which edits the buffers in place, never invalidates the
graph. `graph=False` runs the same static step eagerly (what the graph replays; runs on any device, for tests).
"""

from __future__ import annotations

import contextlib

import torch

from agentloop.cache import CompactableLayer


def sdpa_backends(device: torch.device):
    """On CUDA, SDPA's kernels chosen on purpose: flash and memory-efficient (math as the last resort), never cuDNN,
    which plans anew for every key length."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class StaticDecoder:
    """One token per call: `step(token) -> fp32 logits [vocab]`, the cache's lengths advanced as a forward would."""

    @staticmethod
    def applies(session) -> bool:
        """A capped cache (fixed buffers) whose layers are all full-attention ones."""
        cache = session.cache
        return cache.max_slots is not None and all(isinstance(layer, CompactableLayer) for layer in cache.layers)

    def __init__(self, session, graph: bool):
        self.session, self.graph_wanted = session, graph
        device = session.loaded.device
        self.layers = [session.cache.layers[i] for i in session.cache.compactable]
        self.input_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.slots = torch.zeros(len(self.layers), dtype=torch.long, device=device)  # each layer's write slot
        self.ring_slot = torch.zeros(1, dtype=torch.long, device=device)  # the query window's slot
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer
        self.fallback: str | None = None  # why the graph was given up, if it was

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        session = self.session
        self.input_ids.fill_(token)
        self.position_ids.fill_(session.cache.logical_len)
        self.slots.copy_(torch.tensor([layer.physical_len for layer in self.layers]))
        recorder = session.recent_recorder
        if recorder is not None:
            self.ring_slot.fill_(recorder.tokens % recorder.window)
        if self.graph_wanted and self.graph is None and self.fallback is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._run()
        for layer in self.layers:
            layer.physical_len += 1
            layer.logical_len += 1
        if recorder is not None:
            recorder.advance(1)
        return logits.float()

    def _run(self) -> torch.Tensor:
        """The static forward: every layer writes at its slot and attends over its whole buffer."""
        session, recorder = self.session, self.session.recent_recorder
        for n, layer in enumerate(self.layers):
            layer.static_slot = self.slots[n:n + 1]
        if recorder is not None:
            recorder.static_slot = self.ring_slot
        try:
            with sdpa_backends(self.input_ids.device):
                if session.lean is not None:
                    return session.lean.forward(session.cache, self.input_ids, self.position_ids, recorder)[0, -1]
                out = session.model(input_ids=self.input_ids, position_ids=self.position_ids,
                                    past_key_values=session.cache, use_cache=True, beta_cache=session.cache,
                                    query_recorder=recorder, logits_to_keep=1)
        finally:
            for layer in self.layers:
                layer.static_slot = None
            if recorder is not None:
                recorder.static_slot = None
        return out.logits[0, -1]

    def _capture(self) -> None:
        """Warm up on a side stream, then capture the step. Warm-up and capture write the same slots the replay
        that follows writes again with the same values, so they change nothing. On failure, eager from then on."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._run()
            self.graph = graph
        except RuntimeError as exc:  # capture refused (a host sync inside the model, an unsupported op ...)
            self.graph, self.logits = None, None
            self.fallback = f"CUDA graph capture failed, decoding eagerly: {str(exc).splitlines()[0]}"
