"""The capped generation loop.

A `Session` owns one KV cache and the token history behind it. `feed` prefills tokens in chunks,
`generate` decodes step by step; both yield events. Before every forward the loop checks that the
cache, grown by that forward, stays under the cap; if not it pauses, asks the memory policy to make
room, and resumes, or stops cleanly. New tokens always get RoPE positions from the logical length.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from agentloop import attention
from agentloop.cache import CompactableCache
from agentloop.compaction.queries import QueryRecorder
from agentloop.errors import AgentloopError
from agentloop.events import Event, PauseEvent, PolicyEvent, PrefillEvent, StopEvent, TokenEvent
from agentloop.memcap import MemCap, format_bytes, parse_mem_cap
from agentloop.models import LoadedModel
from agentloop.policies import MemoryPolicy, NoPolicy, Room

PROBE_CHUNK = 512  # tokens per forward when probing for reference queries
PROBE_TEMPERATURE = 0.7  # sampling temperature of probe answers (self-study); 0 = greedy


class GenerationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filter")
    repetition_penalty: float = Field(1.0, gt=0.0, description="> 1 discourages tokens already in the context")
    seed: int = 0
    stop: list[str] = Field(default_factory=list, description="stop strings")
    ignore_eos: bool = False


class Session:
    """One KV cache under a memory cap, fed and decoded by the loop."""

    def __init__(self, loaded: LoadedModel, cap: MemCap | str | int | None = None,
                 policy: MemoryPolicy | None = None, prefill_chunk: int = 512):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        attention.enable(self.model)
        self.cache = CompactableCache(self.model.config)
        self.policy = policy or NoPolicy()
        self.element_size = torch.empty((), dtype=loaded.dtype).element_size()
        if isinstance(cap, (str, int)):
            cap = parse_mem_cap(cap)
        self.cap_bytes = cap.to_bytes(self.model.config, loaded.dtype) if cap is not None else None
        self.cap_slots = cap.value if cap is not None and cap.unit == "tokens" else None
        self.prefill_chunk = prefill_chunk
        self.token_ids: list[int] = []
        self.prompt_len = 0
        self.last_logits: torch.Tensor | None = None  # fp32 logits of the newest position
        self.context_recorder: QueryRecorder | None = None  # queries of the last feed(record=True)
        window = self.policy.query_window()
        # queries of the newest `window` tokens fed or decoded, for policies that compact with them
        self.recent_recorder = QueryRecorder(self.cache.compactable, self.cache.kv_heads, window) if window else None
        self.peak_bytes = 0
        self.policy_actions = 0
        self._t0 = time.perf_counter()

    # --- public -------------------------------------------------------------------------------
    def feed(self, ids: list[int], record: bool = False,
             on_logits: Callable[[torch.Tensor], None] | None = None) -> Iterator[Event]:
        """Prefill `ids` after what the cache holds, in chunks, under the cap.

        With `record`, the queries of these tokens are kept in `context_recorder` (context-prefill queries).
        `on_logits` receives each chunk's fp32 logits at every position, [chunk, vocab] (teacher forcing)."""
        if not ids:
            return
        recorder = QueryRecorder(self.cache.compactable, self.cache.kv_heads) if record else None
        if record:
            self.context_recorder = recorder
        if not self.prompt_len:
            self.prompt_len = len(ids)
        start = time.perf_counter()
        for i in range(0, len(ids), self.prefill_chunk):
            chunk = ids[i:i + self.prefill_chunk]
            fits = yield from self._make_room(len(chunk))
            if not fits:
                need = self.cache.bytes_after(len(chunk), self.element_size)
                raise AgentloopError(
                    f"the memory cap ({format_bytes(self.cap_bytes)}) is too small for the input: "
                    f"{len(self.token_ids) + len(chunk)} tokens need {format_bytes(need)} and policy "
                    f"{self.policy.name!r} cannot free room; raise --mem-cap or choose a compacting policy"
                )
            self._forward(chunk, recorder, on_logits)
        yield PrefillEvent(t=self._now(), tokens=len(ids), seconds=time.perf_counter() - start,
                           logical_len=self.cache.logical_len, physical_len=self.cache.physical_len,
                           cache_bytes=self.cache.nbytes())

    def generate(self, settings: GenerationSettings | None = None) -> Iterator[Event]:
        """Decode until EOS, a stop string, max_new_tokens, or a cap the policy cannot make room under."""
        settings = settings or GenerationSettings()
        if self.last_logits is None:
            raise AgentloopError("nothing to continue from: feed a prompt before generating")
        generator = torch.Generator().manual_seed(settings.seed)
        eos = set() if settings.ignore_eos else _eos_ids(self.model, self.tokenizer)
        detok = IncrementalDetokenizer(self.tokenizer)
        actions_before, start = self.policy_actions, time.perf_counter()
        reason, message, error = "max_new_tokens", "", False
        for step in range(settings.max_new_tokens):
            token = sample(self.last_logits, settings, generator, self.token_ids)
            if token in eos:
                reason = "eos"
                break
            fits = yield from self._make_room(1)
            if not fits:
                reason, error = "mem_cap", not self.policy.at_limit()
                message = (f"memory cap {format_bytes(self.cap_bytes)} reached after {step} new tokens; "
                           f"policy {self.policy.name!r} " + ("stops at the cap" if not error else "could not free room"))
                break
            self._forward([token])
            piece = detok.add(token)
            yield TokenEvent(t=self._now(), step=step, token_id=token, text=piece,
                             logical_len=self.cache.logical_len, physical_len=self.cache.physical_len,
                             cache_bytes=self.cache.nbytes())
            if settings.stop and any(s in detok.text[-(len(s) + len(piece) + 8):] for s in settings.stop):
                reason = "stop_string"
                break
        seconds = time.perf_counter() - start
        yield StopEvent(t=self._now(), reason=reason, error=error, message=message, text=detok.text,
                        new_tokens=detok.count, decode_seconds=seconds,
                        tokens_per_second=detok.count / seconds if seconds > 0 else 0.0,
                        peak_bytes=self.peak_bytes, cap_bytes=self.cap_bytes,
                        policy_actions=self.policy_actions - actions_before)

    # --- internals ----------------------------------------------------------------------------
    def _now(self) -> float:
        return round(time.perf_counter() - self._t0, 6)

    def _make_room(self, n_new: int):
        """Generator: pause and ask the policy until `n_new` tokens fit; returns whether they do."""
        if self.cap_bytes is None:
            return True
        for _ in range(16):
            projected = self.cache.bytes_after(n_new, self.element_size)
            slots_fit = self.cap_slots is None or self.cache.physical_len + n_new <= self.cap_slots
            if projected <= self.cap_bytes and slots_fit:
                return True
            before_bytes, before_slots = self.cache.nbytes(), self.cache.physical_len
            yield PauseEvent(t=self._now(), needed_tokens=n_new, cache_bytes=before_bytes,
                             projected_bytes=projected, cap_bytes=self.cap_bytes)
            tic = time.perf_counter()
            room = Room(cache=self.cache, cap_bytes=self.cap_bytes, cap_slots=self.cap_slots, needed_tokens=n_new,
                        element_size=self.element_size, prompt_len=self.prompt_len, session=self)
            details = self.policy.make_room(room)
            if details is None:
                return False
            self.policy_actions += 1
            yield PolicyEvent(t=self._now(), policy=self.policy.name, action=details.pop("action", "evict"),
                              bytes_before=before_bytes, bytes_after=self.cache.nbytes(),
                              physical_before=before_slots, physical_after=self.cache.physical_len,
                              logical_len=self.cache.logical_len, seconds=time.perf_counter() - tic,
                              details=details)
        return False

    def free_tokens(self) -> int | None:
        """How many more tokens fit under the cap before the memory policy must act (None: no cap)."""
        if self.cap_bytes is None:
            return None
        most = self.cap_bytes // (2 * self.cache.kv_heads * self.cache.head_dim * self.element_size)  # one layer's slot
        if self.cap_slots is not None:
            most = min(most, self.cap_slots - self.cache.physical_len)
        lo, hi = 0, max(0, most)  # bytes_after grows with n: the largest n that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.cache.bytes_after(mid, self.element_size) <= self.cap_bytes else (lo, mid - 1)
        return lo

    def fork(self) -> Session:
        """A new session over a copy of this cache and history (same model, cap and policy): try a branch."""
        other = Session.__new__(Session)
        other.__dict__.update(self.__dict__)
        other.cache = self.cache.copy()
        other.token_ids = list(self.token_ids)
        other.policy = copy.deepcopy(self.policy)  # policies may count their actions
        other.recent_recorder = copy.deepcopy(self.recent_recorder)
        return other

    def probe(self, ids: list[int], generate: int = 0, seed: int = 0,
              temperature: float = PROBE_TEMPERATURE) -> dict[int, torch.Tensor]:
        """Run `ids` (then up to `generate` tokens, sampled at `temperature`, 0 = greedy, until the end of the
        turn) on top of the cache, recording the queries of every compactable layer, then roll the cache back.
        Returns {layer: [kv_heads, n, head_dim]}."""
        recorder = QueryRecorder(self.cache.compactable, self.cache.kv_heads)
        snapshot = self.cache.snapshot()
        settings = GenerationSettings(temperature=temperature, top_p=0.9, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        eos = _eos_ids(self.model, self.tokenizer) if generate else set()
        try:
            chunk = max(self.prefill_chunk, PROBE_CHUNK)  # the probe is rolled back: chunk size only bounds memory
            for i in range(0, len(ids), chunk):
                logits = self._step(ids[i:i + chunk], recorder)
            for _ in range(generate):
                token = sample(logits, settings, generator, self.token_ids)
                if token in eos:  # what follows the end of the turn is not an answer about the context
                    break
                logits = self._step([token], recorder)
        finally:
            self.cache.restore(snapshot)
        return recorder.queries()

    @torch.inference_mode()
    def _step(self, ids: list[int], recorder: QueryRecorder | None = None, every_position: bool = False) -> torch.Tensor:
        """One forward of `ids` after the cache, at logical positions: fp32 logits of the last position [vocab],
        or of every position [len(ids), vocab]."""
        first = self.cache.logical_len
        device = self.loaded.device
        input_ids = torch.tensor([ids], device=device)
        positions = torch.arange(first, first + len(ids), device=device)[None]
        out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, beta_cache=self.cache, query_recorder=recorder,
                         logits_to_keep=0 if every_position else 1)
        return out.logits[0].float() if every_position else out.logits[0, -1].float()

    def _forward(self, ids: list[int], recorder: QueryRecorder | None = None,
                 on_logits: Callable[[torch.Tensor], None] | None = None) -> None:
        logits = self._step(ids, _Tee.of(recorder, self.recent_recorder), every_position=on_logits is not None)
        if on_logits is not None:
            on_logits(logits)
            logits = logits[-1]
        self.last_logits = logits
        self.token_ids.extend(ids)
        self.peak_bytes = max(self.peak_bytes, self.cache.nbytes())


class _Tee:
    """Hands each layer's queries to several recorders."""

    def __init__(self, recorders: list[QueryRecorder]):
        self.recorders = recorders

    @classmethod
    def of(cls, *recorders: QueryRecorder | None) -> QueryRecorder | _Tee | None:
        present = [r for r in recorders if r is not None]
        return present[0] if len(present) == 1 else cls(present) if present else None

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        for recorder in self.recorders:
            recorder.record(layer_idx, query)


def sample(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator,
           context: list[int] = ()) -> int:
    """Repetition penalty over the `context` tokens (CTRL-style: positive logits divided, negative multiplied),
    then greedy when temperature is 0, else temperature, top-k and top-p sampling."""
    scores = logits.float().cpu().clone()
    if settings.repetition_penalty != 1.0 and context:
        seen = torch.tensor(sorted(set(context)))
        penalized = scores[seen]
        scores[seen] = torch.where(penalized > 0, penalized / settings.repetition_penalty,
                                   penalized * settings.repetition_penalty)
    if settings.temperature == 0:
        return int(scores.argmax())
    scores = scores / settings.temperature
    if settings.top_k:
        kth = torch.topk(scores, min(settings.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) > settings.top_p  # keep the smallest set reaching top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids


class IncrementalDetokenizer:
    """Decode a growing token stream piece by piece without splitting multi-byte characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.count = 0
        self._prefix = 0  # tokens before this index are already reflected in `text`
        self._prefix_text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.count += 1
        if self.tokenizer is None:  # a bare model (tests, custom pipelines): token ids only
            return ""
        window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if window.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        piece = window[len(self._prefix_text):]
        self.text += piece
        # keep a few tokens of context so merges at the boundary decode the same way
        self._prefix = max(0, len(self.ids) - 4)
        self._prefix_text = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        return piece
