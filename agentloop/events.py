"""Events the decode loop yields; the CLI view, the JSONL trace and embedding code consume them."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, Field


class _Event(BaseModel):
    t: float = Field(description="seconds since the session started")


class PrefillEvent(_Event):
    kind: Literal["prefill"] = "prefill"
    tokens: int
    seconds: float
    logical_len: int
    physical_len: int
    cache_bytes: int


class TokenEvent(_Event):
    kind: Literal["token"] = "token"
    step: int
    token_id: int
    text: str
    logical_len: int
    physical_len: int
    cache_bytes: int


class PauseEvent(_Event):
    """Decoding paused: the next forward of `needed_tokens` would not fit under the cap."""

    kind: Literal["pause"] = "pause"
    needed_tokens: int
    cache_bytes: int
    projected_bytes: int
    cap_bytes: int


class PolicyEvent(_Event):
    """The memory policy changed the cache."""

    kind: Literal["policy"] = "policy"
    policy: str
    action: str
    bytes_before: int
    bytes_after: int
    physical_before: int
    physical_after: int
    logical_len: int
    seconds: float
    details: dict[str, Any] = Field(default_factory=dict)


class StopEvent(_Event):
    kind: Literal["stop"] = "stop"
    reason: Literal["eos", "stop_string", "max_new_tokens", "mem_cap", "cancelled"]
    error: bool = False
    message: str = ""
    text: str
    new_tokens: int
    decode_seconds: float
    tokens_per_second: float
    peak_bytes: int
    cap_bytes: int | None
    policy_actions: int


Event = Union[PrefillEvent, TokenEvent, PauseEvent, PolicyEvent, StopEvent]
