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

from agentloop import attention, budget
from agentloop.cache import CompactableCache
from agentloop.compaction.queries import QueryRecorder
from agentloop.decode import StaticDecoder, sdpa_backends
from agentloop.errors import AgentloopError
from agentloop.events import Event, PauseEvent, PolicyEvent, PrefillEvent, StopEvent, TokenEvent
from agentloop.lean import LeanForward
from agentloop.memcap import MemCap, format_bytes, parse_mem_cap
from agentloop.models import LoadedModel
from agentloop.policies import MemoryPolicy, NoPolicy, Room

PROBE_TEMPERATURE = 0.7  # sampling temperature of probe answers (self-study); 0 = greedy
UNCAPPED_QUERY_ROWS = 16384  # reservoir rows per KV head of a probe or a recorded feed when there is no cap
RECENT_WINDOW = 32  # newest tokens' queries a recorded feed also keeps (the `recent` query source)


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
                 policy: MemoryPolicy | None = None, prefill_chunk: int = budget.PREFILL_CHUNK, decode: str = "auto",
                 lean: bool = True):
        """`decode`: the one-token step — `auto` (a CUDA graph on a GPU, eager on CPU), `graph`, `static` (static
        shapes without a graph: what the graph replays, runnable anywhere) or `eager`. `lean`: one-token forwards
        through agentloop.lean where the architecture allows (the same logits, less host work per token)."""
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        attention.enable(self.model)
        self.policy = policy or NoPolicy()
        self.element_size = torch.empty((), dtype=loaded.dtype).element_size()
        if isinstance(cap, (str, int)):
            cap = parse_mem_cap(cap)
        self.budget = budget.plan(self.model.config, loaded.dtype, cap, self.policy, prefill_chunk)
        self.cap_bytes = self.budget.cap_bytes
        self.cap_slots = self.budget.cache_slots
        self.cache = CompactableCache(self.model.config, self.budget.cache_slots, self.budget.probe_slots)
        self.cache.mask_bytes = self.budget.mask_bytes
        self.query_rows = self.budget.query_rows or UNCAPPED_QUERY_ROWS
        self.prefill_chunk = self.budget.prefill_chunk
        self.token_ids: list[int] = []
        self.prompt_len = 0
        self.last_logits: torch.Tensor | None = None  # fp32 logits of the newest position
        self.generator: torch.Generator | None = None  # the sampler's RNG of the current generate() (checkpointed)
        self.context_recorder: QueryRecorder | None = None  # queries of the last feed(record=True)
        window = self.budget.query_window
        # queries of the newest `window` tokens fed or decoded, for policies that compact with them
        self.recent_recorder = QueryRecorder(self.cache.compactable, self.cache.kv_heads, window=window) if window else None
        if decode not in ("auto", "graph", "static", "eager"):
            raise AgentloopError(f"unknown decode step {decode!r}: use auto, graph, static or eager")
        self.decode = decode
        self._decoder: StaticDecoder | None = None
        self.lean = LeanForward(self.model) if lean and LeanForward.applies(self.model, self.cache) else None
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
        recorder = QueryRecorder(self.cache.compactable, self.cache.kv_heads, rows=self.query_rows,
                                 window=RECENT_WINDOW) if record else None
        if record:
            self.context_recorder = recorder
        if not self.prompt_len:
            self.prompt_len = len(ids)
        start = time.perf_counter()
        # a chunk never takes more than half the cache, so that a policy that halves it can make room
        step = self.prefill_chunk if self.cache.max_slots is None else max(1, min(self.prefill_chunk,
                                                                                 self.cache.max_slots // 2))
        for i in range(0, len(ids), step):
            chunk = ids[i:i + step]
            fits = yield from self._make_room(len(chunk))
            if not fits:
                raise AgentloopError(
                    f"the memory cap ({format_bytes(self.cap_bytes)}, a cache of {self.cache.max_slots} slots) is too "
                    f"small for the input: {len(self.token_ids) + len(chunk)} tokens and policy {self.policy.name!r} "
                    "cannot free room; raise --mem-cap" + ("" if self.policy.name != "none" else
                                                           " or choose a compacting policy"))
            self._forward(chunk, recorder, on_logits)
        yield PrefillEvent(t=self._now(), tokens=len(ids), seconds=time.perf_counter() - start,
                           logical_len=self.cache.logical_len, physical_len=self.cache.physical_len,
                           cache_bytes=self.cache.held_bytes())

    def generate(self, settings: GenerationSettings | None = None, start: int = 0) -> Iterator[Event]:
        """Decode until EOS, a stop string, max_new_tokens, or a cap the policy cannot make room under.

        `start` > 0 continues a generation restored from a checkpoint: its first `start` steps are the newest
        tokens of `token_ids`, and sampling goes on with the session's `generator` as it was saved."""
        settings = settings or GenerationSettings()
        if self.last_logits is None:
            raise AgentloopError("nothing to continue from: feed a prompt before generating")
        if start == 0 or self.generator is None:
            self.generator = torch.Generator(self.loaded.device).manual_seed(settings.seed)
        eos = set() if settings.ignore_eos else _eos_ids(self.model, self.tokenizer)
        detok = IncrementalDetokenizer(self.tokenizer)
        for token in self.token_ids[len(self.token_ids) - start:]:
            detok.add(token)
        actions_before, start_time = self.policy_actions, time.perf_counter()
        reason, message, error = "max_new_tokens", "", False
        steps = range(start, settings.max_new_tokens)
        if settings.stop and any(s in detok.text for s in settings.stop):  # restored at the token that ended it
            reason, steps = "stop_string", range(0)
        for step in steps:
            token = sample(self.last_logits, settings, self.generator, self.token_ids)
            if token in eos:
                reason = "eos"
                break
            fits = yield from self._make_room(1)
            if not fits:
                reason, error = "mem_cap", not self.policy.at_limit()
                message = (f"memory cap {format_bytes(self.cap_bytes)} reached after {step} new tokens; "
                           f"policy {self.policy.name!r} " + ("stops at the cap" if not error else "could not free room"))
                break
            self._decode_one(token)
            piece = detok.add(token)
            yield TokenEvent(t=self._now(), step=step, token_id=token, text=piece,
                             logical_len=self.cache.logical_len, physical_len=self.cache.physical_len,
                             cache_bytes=self.cache.held_bytes())
            if settings.stop and any(s in detok.text[-(len(s) + len(piece) + 8):] for s in settings.stop):
                reason = "stop_string"
                break
        seconds = time.perf_counter() - start_time
        yield StopEvent(t=self._now(), reason=reason, error=error, message=message, text=detok.text,
                        new_tokens=detok.count, decode_seconds=seconds,
                        tokens_per_second=(detok.count - start) / seconds if seconds > 0 else 0.0,
                        peak_bytes=self.peak_bytes, cap_bytes=self.cap_bytes,
                        policy_actions=self.policy_actions - actions_before)

    # --- internals ----------------------------------------------------------------------------
    def _now(self) -> float:
        return round(time.perf_counter() - self._t0, 6)

    def _make_room(self, n_new: int):
        """Generator: pause and ask the policy until `n_new` tokens fit; returns whether they do."""
        if self.cache.max_slots is None:
            return True
        slot_bytes = self.cache.held_bytes() // max(1, self.cache.physical_len)
        for _ in range(16):
            if self.cache.physical_len + n_new <= self.cache.max_slots:
                return True
            before_bytes, before_slots = self.cache.held_bytes(), self.cache.physical_len
            yield PauseEvent(t=self._now(), needed_tokens=n_new, cache_bytes=before_bytes,
                             projected_bytes=before_bytes + n_new * slot_bytes, cap_bytes=self.cap_bytes)
            tic = time.perf_counter()
            room = Room(cache=self.cache, cap_bytes=self.cap_bytes, cap_slots=self.cache.max_slots, needed_tokens=n_new,
                        element_size=self.element_size, prompt_len=self.prompt_len, session=self)
            details = self.policy.make_room(room)
            if details is None:
                return False
            self.policy_actions += 1
            yield PolicyEvent(t=self._now(), policy=self.policy.name, action=details.pop("action", "evict"),
                              bytes_before=before_bytes, bytes_after=self.cache.held_bytes(),
                              physical_before=before_slots, physical_after=self.cache.physical_len,
                              logical_len=self.cache.logical_len, seconds=time.perf_counter() - tic,
                              details=details)
        return False

    def free_tokens(self) -> int | None:
        """How many more tokens fit under the cap before the memory policy must act (None: no cap)."""
        return self.cache.free_slots()

    def set_slot_limit(self, slots: int | None) -> None:
        """Hold the cache to fewer slots than the budget gives it (None: the budget's), e.g. to keep room for an
        answer; the buffers stay as allocated."""
        most = self.budget.cache_slots
        if most is None:
            raise AgentloopError("set_slot_limit needs a capped session")
        if slots is not None and not 0 < slots <= most:
            raise AgentloopError(f"slot limit {slots} must be in [1, {most}] (the budget's cache slots)")
        self.cache.max_slots = most if slots is None else slots

    def fork(self) -> Session:
        """A new session over a copy of this cache and history (same model, cap and policy): try a branch."""
        other = Session.__new__(Session)
        other.__dict__.update(self.__dict__)
        other.cache = self.cache.copy()
        other.token_ids = list(self.token_ids)
        other.policy = copy.deepcopy(self.policy)  # policies may count their actions
        other.recent_recorder = copy.deepcopy(self.recent_recorder)
        other._decoder = None  # a static step is bound to its cache's buffers
        if self.generator is not None:
            other.generator = torch.Generator(self.generator.device).set_state(self.generator.get_state())
        return other

    def probe(self, ids: list[int], generate: int = 0, seed: int = 0, temperature: float = PROBE_TEMPERATURE,
              prefix: int = 0, into: dict[int, torch.Tensor] | None = None,
              deadline: float | None = None) -> dict[int, torch.Tensor]:
        """Run `ids` (then up to `generate` tokens, sampled at `temperature`, 0 = greedy, until the end of the
        turn or the `deadline`, a time.monotonic() value) on top of the cache, recording the queries of every
        compactable layer into a reservoir of `query_rows` rows per KV head, then roll the cache back.
        Returns {layer: [kv_heads, n, head_dim]}.

        The transient tokens live in the slots the budget keeps free for them. When `ids` (and the draft) do not
        fit there, they are read in windows, each rolled back before the next: the first `prefix` ids (e.g. an
        instruction) and then the next piece of the rest, at the positions a single read would give them, so the
        pieces see the cache and the prefix (read once, before the first window) but not each other (the draft follows
        the last window). `into`: storage for the reservoir (QueryRecorder)."""
        recorder = QueryRecorder(self.cache.compactable, self.cache.kv_heads, rows=self.query_rows, seed=seed, into=into)
        settings = GenerationSettings(temperature=temperature, top_p=0.9, seed=seed)
        generator = torch.Generator(self.loaded.device).manual_seed(seed)
        eos = _eos_ids(self.model, self.tokenizer) if generate else set()
        room = self.cache.layers[self.cache.compactable[0]].capacity - self.cache.physical_len \
            if self.cache.max_slots is not None else None
        head, body = list(ids[:prefix]), list(ids[prefix:])
        windows = [(0, body)]
        if room is not None and len(ids) + generate > room:
            size = room - prefix - generate
            if size < 1:
                raise AgentloopError(f"a probe of {prefix} + {generate} tokens does not fit the {room} free slots")
            windows = [(lo, body[lo:lo + size]) for lo in range(0, len(body), size)]
        first, single = self.cache.logical_len, len(windows) == 1
        outer = self.cache.snapshot()
        try:
            # several windows: the prefix once, each window after it; one window: the prefix and the rest in one read
            logits = None if single else self._read(head, recorder, first)
            for k, (offset, piece) in enumerate(windows):
                snapshot = self.cache.snapshot()
                try:
                    # the piece sits where a single read would put it
                    logits = self._read(head + piece if single else piece, recorder,
                                        first if single else first + prefix + offset)
                    position = first + prefix + offset + len(piece)
                    for _ in range(generate if k == len(windows) - 1 else 0):
                        token = sample(logits, settings, generator, self.token_ids)
                        if token in eos:  # what follows the end of the turn is not an answer about the context
                            break
                        if deadline is not None and time.monotonic() >= deadline:
                            break
                        logits = self._step([token], recorder, positions=[position])
                        position += 1
                finally:
                    self.cache.restore(snapshot)
        finally:
            self.cache.restore(outer)
        return recorder.queries()

    def _read(self, ids: list[int], recorder: QueryRecorder, first: int) -> torch.Tensor | None:
        """Forwards of `ids` at positions first.. in prefill chunks, recording queries: the last logits (None: no ids)."""
        logits = None
        for i in range(0, len(ids), self.prefill_chunk):
            chunk = ids[i:i + self.prefill_chunk]
            logits = self._step(chunk, recorder, positions=list(range(first + i, first + i + len(chunk))))
        return logits

    @torch.inference_mode()
    def _step(self, ids: list[int], recorder: QueryRecorder | None = None, every_position: bool = False,
              positions: list[int] | None = None) -> torch.Tensor:
        """One forward of `ids` after the cache, at logical positions (`positions`, default the next ones after the
        logical length): fp32 logits of the last position [vocab], or of every position [len(ids), vocab]."""
        device = self.loaded.device
        input_ids = torch.tensor([ids], device=device)
        if positions is None:
            first = self.cache.logical_len
            positions = torch.arange(first, first + len(ids), device=device)[None]
        else:
            positions = torch.tensor([positions], device=device)
        with sdpa_backends(device):
            if self.lean is not None and len(ids) == 1 and not every_position:
                return self.lean.forward(self.cache, input_ids, positions, recorder)[0, -1].float()
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
        self.peak_bytes = max(self.peak_bytes, self.cache.held_bytes())

    def _decode_one(self, token: int) -> None:
        """Append one decoded token: through the static step (a CUDA graph) when it applies, else a plain forward."""
        if self._static_step():
            self.last_logits = self._decoder.step(token)
            self.token_ids.append(token)
            self.peak_bytes = max(self.peak_bytes, self.cache.held_bytes())
        else:
            self._forward([token])

    def _static_step(self) -> bool:
        """Whether decoding goes through the static step (built on first use)."""
        mode = self.decode
        if mode == "auto":
            mode = "graph" if self.loaded.device.type == "cuda" else "eager"
        if mode == "eager" or not StaticDecoder.applies(self):
            return False
        if self._decoder is None:
            self._decoder = StaticDecoder(self, graph=mode == "graph")
        return True


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
    then greedy when temperature is 0, else temperature, top-k and top-p sampling, on the generator's device."""
    scores = logits.float().to(generator.device).clone()
    if settings.repetition_penalty != 1.0 and context:
        seen = torch.tensor(sorted(set(context)), device=scores.device)
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
