"""Events the decode loop and the agent loop yield; the CLI view, the JSONL trace and embedding code consume them."""

from __future__ import annotations

from typing import Any, Literal

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
    # the loop's own reasons; a trace's last `stop` may also say `terminated` (SIGTERM) or `error` (agentloop/trace.py)
    reason: Literal["eos", "stop_string", "max_new_tokens", "mem_cap", "cancelled", "terminated", "error"]
    error: bool = False
    message: str = ""
    text: str
    new_tokens: int
    decode_seconds: float
    tokens_per_second: float
    peak_bytes: int
    cap_bytes: int | None
    policy_actions: int


# --- the agent loop (agentloop/agent.py) ---------------------------------------------------------
class MessageEvent(_Event):
    """A message joined the transcript (system, user, the assistant's reply, a tool result)."""

    kind: Literal["message"] = "message"
    step: int = Field(description="the agent step (model reply) it belongs to; 0 = before the first reply")
    message: dict[str, Any] = Field(description="OpenAI style: role, content, and tool_calls / tool_call_id, name")


class ToolCallEvent(_Event):
    kind: Literal["tool_call"] = "tool_call"
    step: int
    call_id: str
    tool: str
    arguments: dict[str, Any]


class ToolResultEvent(_Event):
    """A tool call finished, or a malformed call was answered with an error (tool `error`)."""

    kind: Literal["tool_result"] = "tool_result"
    step: int
    call_id: str
    tool: str
    ok: bool
    error: str | None = None
    chars: int
    seconds: float
    truncated: bool = False


class IngestEvent(_Event):
    """A long tool result was compacted right after it was prefilled (or why it was not)."""

    kind: Literal["ingest"] = "ingest"
    step: int
    call_id: str
    tool: str
    tokens: int = Field(description="tokens of the tool result")
    piece: int = Field(1, description="which piece of the result (long results are prefilled and compacted in pieces)")
    piece_start: int = Field(0, description="the piece's first token in the result")
    piece_end: int = Field(0, description="the piece's end (exclusive) in the result")
    span: list[int] = Field(default_factory=list, description="physical slots [start, end) compacted")
    slots_before: int = Field(0, description="slots of the region compacted: the piece's tokens, and with joint "
                              "piece budgets the earlier pieces' slots")
    slots_after: int = 0
    pieces_joined: int = Field(1, description="pieces of the result this compaction covers (joint piece budgets)")
    result_slots: int = Field(0, description="slots the result holds after this piece (from its first slot, or from "
                              "this piece's verbatim part if the memory policy compacted the cache during its prefill)")
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    output_error: float | None = None
    mass_error: float | None = None
    skipped: str | None = Field(None, description="why the result was not compacted")
    details: dict[str, Any] = Field(default_factory=dict, description="SpanStats.summary() of the compaction")


class FinishEvent(_Event):
    """The agent run ended."""

    kind: Literal["finish"] = "finish"
    reason: Literal["final_answer", "max_steps", "stop_condition", "mem_cap", "error", "cancelled", "terminated"]
    error: bool = False
    message: str = ""
    answer: str = Field(description="the final reply without tool-call markup ('' unless reason is final_answer)")
    steps: int
    tool_calls: int
    ingestions: int
    policy_actions: int
    cache_bytes: int
    peak_bytes: int
    cap_bytes: int | None


Event = (PrefillEvent | TokenEvent | PauseEvent | PolicyEvent | StopEvent | MessageEvent | ToolCallEvent
         | ToolResultEvent | IngestEvent | FinishEvent)
