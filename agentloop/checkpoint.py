"""Session checkpoints: everything a run needs to go on after its process died, written atomically.

A checkpoint holds the cache (`cache.state_dict()`: K, V, β, logical lengths), the token ids, the prompt length,
the newest logits, the memory policy (its dataclass fields, counters included, and the state of objects it keeps,
such as the repeat-prefill queries of `am`), the session's recent-query recorder, the sampler's RNG state, peak
bytes and policy actions, plus a caller's `extra` dict (a run's task and prompt, an agent's transcript, a server's
conversation). It is one `torch.save` file written to a temporary name, fsynced and renamed over the old one, so
a kill at any moment leaves either the previous checkpoint or the new one, never a torn file. It is read back
with `weights_only=True`: a checkpoint holds tensors and plain values only, and loading one runs no code.

`Checkpointer` decides when a run saves: at the first point between steps after each policy action (compaction
or eviction) or compaction on ingestion, and every `every` tokens fed or decoded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from agentloop.errors import AgentloopError

FORMAT = 1
DEFAULT_EVERY = 256  # tokens between checkpoints (besides one after each policy action)
_PLAIN = (torch.Tensor, str, int, float, bool, list, dict, tuple, set, type(None))
GENERATOR = "__torch_generator_state__"  # how an RNG inside a saved object is written
_TRANSIENT = {"static_slot"}  # attributes bound to a live static decode step


def session_state(session, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The session as plain tensors and values (tensors still on their device)."""
    config = session.model.config.get_text_config(decoder=True)
    recorder = session.recent_recorder
    return {
        "format": FORMAT,
        "model": {"name": session.loaded.name, "source": session.loaded.source, "dtype": str(session.loaded.dtype),
                  "model_type": config.model_type, "vocab_size": config.vocab_size},
        "cap_bytes": session.cap_bytes, "cap_slots": session.cap_slots, "prefill_chunk": session.prefill_chunk,
        "cache": session.cache.state_dict(),
        "token_ids": list(session.token_ids), "prompt_len": session.prompt_len,
        "last_logits": session.last_logits,
        "policy": policy_state(session.policy),
        "recent_recorder": object_state(recorder) if recorder is not None else None,
        "generator": session.generator.get_state() if session.generator is not None else None,
        "peak_bytes": session.peak_bytes, "policy_actions": session.policy_actions,
        "extra": extra or {},
    }


def save_session(session, path: str | Path, extra: dict[str, Any] | None = None) -> int:
    """Write `session` (and `extra`) to `path` atomically; returns the bytes written."""
    return atomic_save(session_state(session, extra), path)


def atomic_save(state: dict[str, Any], path: str | Path) -> int:
    """torch.save to a temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return size


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, tensors on `device`; a missing or foreign file is a one-line AgentloopError."""
    path = Path(path)
    if not path.is_file():
        raise AgentloopError(f"checkpoint {path} does not exist: give the trace or checkpoint of an unfinished run")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises many types for files that are not its own
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AgentloopError(f"{path} is not a readable agentloop checkpoint ({reason[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise AgentloopError(f"{path} is not an agentloop checkpoint (format {FORMAT}); give a run's .ckpt file or trace")
    return state


def load_session(loaded, source: str | Path | dict[str, Any], decode: str = "auto"):
    """A Session on `loaded` restored from a checkpoint path (or its contents); returns (session, extra). `decode`:
    the restored session's one-token step (Session's `decode`; not saved, a run may resume on other hardware)."""
    from agentloop.loop import Session
    from agentloop.policies import make_policy

    state = read_checkpoint(source, loaded.device) if not isinstance(source, dict) else _on_device(source, loaded.device)
    config = loaded.model.config.get_text_config(decoder=True)
    saved = state["model"]
    if (saved["model_type"], saved["vocab_size"], saved["dtype"]) != (config.model_type, config.vocab_size,
                                                                         str(loaded.dtype)):
        raise AgentloopError(f"the checkpoint was written by model {saved['name']} ({saved['model_type']}, "
                             f"{saved['dtype']}); load that model to resume it")
    policy_saved = state["policy"]
    policy = make_policy(policy_saved["name"], **policy_saved["options"])
    restore_policy(policy, policy_saved)
    saved_cap = (state["cap_bytes"], state["cap_slots"])
    for cap in (state["cap_bytes"], f"{state['cap_slots']}tok" if state["cap_slots"] else None):  # a byte or slot cap
        session = Session(loaded, cap=cap, policy=policy, prefill_chunk=state["prefill_chunk"], decode=decode)
        if (session.cap_bytes, session.cap_slots) == saved_cap:
            break
    else:
        raise AgentloopError(f"the checkpoint's cap ({saved_cap[0]:,} B, {saved_cap[1]} cache slots) is split "
                             "differently by this version of agentloop; resume it with the version that wrote it")
    try:
        session.cache.load_state_dict(state["cache"])
    except (ValueError, RuntimeError) as exc:
        raise AgentloopError(f"the checkpoint's cache does not fit model {loaded.name}: {exc}") from None
    session.token_ids, session.prompt_len = list(state["token_ids"]), state["prompt_len"]
    session.last_logits = state["last_logits"]
    if state["recent_recorder"] is not None and session.recent_recorder is not None:
        restore_object(session.recent_recorder, state["recent_recorder"])
    if state["generator"] is not None:
        session.generator = torch.Generator(loaded.device).set_state(state["generator"].cpu())
    session.peak_bytes, session.policy_actions = state["peak_bytes"], state["policy_actions"]
    return session, state["extra"]


def _on_device(value, device):
    """`value` with every tensor inside it moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(v, device) for v in value)
    return value


def object_state(obj) -> dict[str, Any]:
    """An object's attributes as plain values: RNGs as their state; what binds it to a live decode step (a static
    step's slot index) is left out, the restored session builds its own."""
    return {name: {GENERATOR: value.get_state()} if isinstance(value, torch.Generator) else value
            for name, value in vars(obj).items() if name not in _TRANSIENT}


def restore_object(obj, state: dict[str, Any]) -> None:
    """Put `object_state`'s values back on a freshly built object of the same kind."""
    for name, value in state.items():
        if isinstance(value, dict) and set(value) == {GENERATOR}:
            value = torch.Generator(getattr(obj, name).device).set_state(value[GENERATOR].cpu())
        setattr(obj, name, value)


def policy_state(policy) -> dict[str, Any]:
    """A policy dataclass as {name, options (its init fields), fields (the rest), objects (kept objects' state)}."""
    options, fields, objects = {}, {}, {}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if not isinstance(value, _PLAIN):
            objects[f.name] = object_state(value)  # e.g. RepeatMemory: its tensors and counters
        elif f.init:
            options[f.name] = value
        else:
            fields[f.name] = value
    return {"name": policy.name, "options": options, "fields": fields, "objects": objects}


def restore_policy(policy, saved: dict[str, Any]) -> None:
    """Put counters and kept objects' state back on a policy built from the saved options."""
    for name, value in saved["fields"].items():
        setattr(policy, name, value)
    for name, attributes in saved["objects"].items():
        restore_object(getattr(policy, name), attributes)


class Checkpointer:
    """When a run saves its session: at the first point between steps after a policy action, and every `every`
    tokens fed or decoded (0: never). The caller says whether an event leaves the session between steps (a
    token was decoded, a prefill ended, or the loop paused before a prefill chunk); a policy action in the
    middle of a decode step (its token sampled but not yet in the cache) is saved with the next token."""

    def __init__(self, path: str | Path, every: int = DEFAULT_EVERY):
        if every < 0:
            raise AgentloopError(f"checkpoint interval must be >= 0 tokens (0 = off), got {every}")
        self.path, self.every = Path(path), every
        self.pending = False  # a policy action not saved yet
        self.tokens = 0  # tokens since the last save
        self.saves = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def observe(self, event, between_steps: bool) -> bool:
        """Note `event`; True when the session should be saved now."""
        if not self.enabled:
            return False
        if event.kind in ("policy", "ingest"):
            self.pending = True
        elif event.kind == "token":
            self.tokens += 1
        elif event.kind == "prefill":
            self.tokens += event.tokens
        return between_steps and (self.pending or self.tokens >= self.every)

    def save(self, session, extra: dict[str, Any]) -> None:
        save_session(session, self.path, extra)
        self.pending, self.tokens = False, 0
        self.saves += 1

    def remove(self) -> None:
        """The run finished: nothing left to resume."""
        self.path.unlink(missing_ok=True)


def checkpoint_path(trace: str | Path) -> Path:
    """Where a run with this trace keeps its checkpoint: the trace's path with the suffix .ckpt."""
    return Path(trace).with_suffix(".ckpt")


def resolve_resume(target: str | Path) -> Path:
    """`--resume TRACE_OR_CHECKPOINT`: the checkpoint of a trace (.jsonl), or the checkpoint itself."""
    target = Path(target)
    if target.suffix == ".jsonl":
        ckpt = checkpoint_path(target)
        if not ckpt.is_file():
            why = "it finished (its checkpoint is removed then)" if target.is_file() else "the trace does not exist either"
            raise AgentloopError(f"no checkpoint {ckpt} for trace {target}: {why}; only an unfinished run resumes")
        return ckpt
    return target
