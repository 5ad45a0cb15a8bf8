"""task.yaml: what to run (model, prompt, generation settings, memory policy, agent tools), validated by pydantic.

A task with `tools` runs the agent loop (agentloop/agent.py); one without runs a single generation."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentloop.compaction.span import MAX_QUERIES, NAMED_METHODS, NUMBER_LEAD
from agentloop.errors import AgentloopError
from agentloop.loop import GenerationSettings
from agentloop.memcap import parse_mem_cap
from agentloop.models import DEFAULT_MODEL
from agentloop.policies import POLICIES, make_policy
from agentloop.taskfile import read_task_file
from agentloop.tools import BUILTIN_TOOLS

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


def _check_method(value: str | None) -> str | None:
    if value is not None and value not in NAMED_METHODS:
        raise ValueError(f"unknown compaction method {value!r}; choose one of {', '.join(NAMED_METHODS)}")
    return value


class IngestOverride(BaseModel):
    """Per-tool changes to the ingestion settings (fields left out keep the general value)."""

    model_config = ConfigDict(extra="forbid")

    trigger_tokens: int | None = Field(None, ge=1)
    ratio: float | None = Field(None, gt=0, lt=1)
    keep_first: int | None = Field(None, ge=0)
    keep_last: int | None = Field(None, ge=0)
    method: str | None = None

    _method = field_validator("method")(_check_method)


class IngestSpec(BaseModel):
    """Tool-output compaction on ingestion: a long tool result is compacted as soon as it is prefilled."""

    model_config = ConfigDict(extra="forbid")

    trigger_tokens: int = Field(1024, ge=1, description="compact a tool result longer than this many tokens")
    ratio: float = Field(0.2, gt=0, lt=1, description="fraction of the result's slots kept (0.2 = 5x smaller)")
    keep_first: int = Field(16, ge=0, description="first tokens of the result kept verbatim")
    keep_last: int = Field(16, ge=0, description="last tokens of the result kept verbatim")
    piece_tokens: int = Field(2048, ge=64, description="a longer result is prefilled and compacted in pieces of at "
                              "most this many tokens, so the cache never holds more than one piece of it verbatim")
    piece_budgets: Literal["even", "joint"] = Field("even", description="how a result ingested in several pieces "
                                                    "shares its slots: `even`, each piece compacted alone at `ratio`; "
                                                    "`joint`, each piece compacted together with the earlier pieces' "
                                                    "slots, so the slots go to the pieces the attention goes to")
    method: str = Field("am-hak-fast", description="a method of agentloop.compaction.span.NAMED_METHODS")
    chunk_tokens: int | None = Field(None, ge=16, description="compact each piece in chunks of about this many "
                                     "tokens: faster; each chunk keeps the share of the slots its attention earns")
    task_queries: bool = Field(True, description="also fit the compaction to queries of the pending task text "
                               "and of a short draft reply (a quarter of the fitting rows), and keep the 32 tokens "
                               "where they look (with the few after each) with their original keys and values: "
                               "keeps what the task will ask for (the default: it wins `agentloop eval ingestion "
                               "--task-first`)")
    pin_numbers: bool = Field(False, description=f"keep every number of the result, with the {NUMBER_LEAD} tokens "
                              "before it and the one after, with its original keys and values (up to half the kept "
                              "slots)")
    study_seconds: float | None = Field(None, gt=0, description="with a method that reads self-study queries "
                                        "(am-hak, am-omp...): the most seconds its study of a piece may take (answers "
                                        "cut there, later study prompts left out; null: no limit)")
    max_queries: int | None = Field(MAX_QUERIES, ge=16, description="reference queries per KV head (a random "
                                    "subsample of the re-read's queries above this; null: every query)")
    exclude: list[str] = Field(default_factory=list, description="tools whose results are never compacted")
    per_tool: dict[str, IngestOverride] = Field(default_factory=dict, description="tool name: overrides")

    _method = field_validator("method")(_check_method)

    @model_validator(mode="after")
    def _room_to_compact(self):
        for name in [None, *self.per_tool]:
            resolved = self.for_tool(name) if name is None or name not in self.exclude else None
            if resolved and resolved.trigger_tokens < resolved.keep_first + resolved.keep_last + 2:
                where = f"per_tool.{name}." if name and name in self.per_tool else ""
                raise ValueError(f"{where}trigger_tokens ({resolved.trigger_tokens}) must exceed keep_first + "
                                 f"keep_last ({resolved.keep_first} + {resolved.keep_last}) by at least 2")
            if resolved and self.piece_tokens < 2 * (resolved.keep_first + resolved.keep_last + 2):
                raise ValueError(f"piece_tokens ({self.piece_tokens}) must be at least twice keep_first + keep_last + 2 "
                                 f"({2 * (resolved.keep_first + resolved.keep_last + 2)}), so every piece has a middle")
        return self

    def for_tool(self, name: str | None) -> IngestSpec | None:
        """The settings for results of tool `name`, per-tool overrides applied; None if it is excluded."""
        if name in self.exclude:
            return None
        override = self.per_tool.get(name) if name else None
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


_POLICY_SHORTCUTS = ("ratio", "protect_recent", "pin_prompt", "prompt_share")


def _option_names(policy_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(policy_cls) if f.init}


class MemorySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cap: str | None = Field(None, description="KV-cache cap: 8GB, 512MiB, 1.5GB, 2e9 or 2048tok; none = uncapped")
    policy: str = Field("none", description="what to do at the cap: " + ", ".join(sorted(POLICIES)))
    options: dict[str, Any] = Field(default_factory=dict, description="the policy's own settings")
    ratio: float | None = Field(None, gt=0, lt=1, description="am, h2o, snapkv: fraction of the compacted region kept")
    protect_recent: int | None = Field(None, ge=0, description="am, h2o, snapkv: newest tokens never compacted")
    pin_prompt: bool | None = Field(None, description="am, h2o, snapkv: keep the first prompt verbatim")
    prompt_share: float | None = Field(None, ge=0, lt=1, description="am, h2o, snapkv: share of the fitting rows given "
                                       "to the first prompt, read again at each compaction (0 = off)")
    ingest: IngestSpec | None = Field(None, description="compact long tool results on ingestion; none = off")

    @field_validator("cap", mode="before")
    @classmethod
    def _cap(cls, value):
        if value is None:
            return None
        try:
            parse_mem_cap(value)
        except AgentloopError as exc:
            raise ValueError(str(exc)) from None
        return str(value)

    @field_validator("policy")
    @classmethod
    def _policy(cls, value):
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(sorted(POLICIES))}")
        return value

    @field_validator(*_POLICY_SHORTCUTS)
    @classmethod
    def _shortcut_fits_the_policy(cls, value, info):
        policy = info.data.get("policy")
        if value is not None and policy in POLICIES and info.field_name not in _option_names(POLICIES[policy]):
            takes = sorted(name for name, policy_cls in POLICIES.items() if info.field_name in _option_names(policy_cls))
            raise ValueError(f"applies to policies {', '.join(takes)}, not {policy!r}")
        return value

    @model_validator(mode="after")
    def _options_fit_the_policy(self):
        """Names, types and ranges of the policy's options, checked when the task is read, not when it first acts."""
        try:
            make_policy(self.policy, **self.policy_options())
        except AgentloopError as exc:
            raise ValueError(str(exc)) from None
        return self

    def policy_options(self) -> dict[str, Any]:
        """`options` with the ratio / protect_recent / pin_prompt / prompt_share shortcuts folded in."""
        given = {key: getattr(self, key) for key in _POLICY_SHORTCUTS if getattr(self, key) is not None}
        return {**self.options, **given}


class TaskSpec(BaseModel):
    """One run: give `task` (a user message, optionally with `system`), `messages`, or a raw `prompt`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    system: str | None = None
    task: str | None = None
    messages: list[Message] | None = None
    prompt: str | None = Field(None, description="raw text, fed without a chat template")
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    trace: str | None = Field(None, description="JSONL trace path; default .agentloop/traces/<name>-<time>.jsonl")
    # --- the agent loop: a task with tools -------------------------------------------------------
    tools: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                             description="built-in tools: a list of names, or a mapping name: settings")
    workspace: str | None = Field(None, description="folder the tools work in (relative to the task file); "
                                                    "default a new .agentloop/workspaces/<name>-<time>")
    allow_broad_workspace: bool = Field(False, description="let the workspace be /, hold the home folder, the current "
                                        "folder or agentloop's own files (refused by default)")
    max_steps: int = Field(10, ge=1, description="model replies per task before the run stops")
    stop_on: list[str] = Field(default_factory=list, description="stop the run when a reply contains one of these")
    tool_timeout_s: float | None = Field(None, gt=0, description="wait at most this long for a tool; default: its own")
    tool_output_chars: int = Field(16000, ge=100, description="longer tool results are cut (head and tail kept)")

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value):
        if value is None:
            return {}
        if isinstance(value, list):
            if not all(isinstance(name, str) for name in value):
                raise ValueError("list tool names (strings), or map each name to its settings")
            if len(set(value)) != len(value):
                raise ValueError("a tool is listed twice; list each tool once")
            value = {name: {} for name in value}
        if not isinstance(value, dict):
            raise ValueError("give a list of tool names, or a mapping name: settings")
        for name in value:
            if name not in BUILTIN_TOOLS:
                raise ValueError(f"unknown tool {name!r}; built-in tools are: {', '.join(BUILTIN_TOOLS)}")
        return {name: settings or {} for name, settings in value.items()}

    @field_validator("model", "trace", "workspace")
    @classmethod
    def _not_empty(cls, value, info):
        if value is not None and not value.strip():
            raise ValueError(f"`{info.field_name}` is empty; give a value or leave the field out")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        if value is not None and (not value.strip() or "/" in value or "\0" in value):
            raise ValueError(f"name {value!r} must be a non-empty word without '/' (it names the trace file)")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value):
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use auto, float32, bfloat16 or float16")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if not _DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _one_input(self):
        given = [k for k in ("task", "messages", "prompt") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one of `task`, `messages` or `prompt` (got {', '.join(given)})")
        if self.system is not None and (self.messages is not None or self.prompt is not None):
            raise ValueError("`system` goes with `task`; put a system message inside `messages` instead")
        if self.tools and self.prompt is not None:
            raise ValueError("an agent task (with `tools`) talks in the chat template: give `task` or `messages`, "
                             "not a raw `prompt`")
        return self

    def chat(self) -> list[dict] | None:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        if self.task is not None:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return system + [{"role": "user", "content": self.task}]
        return None


def load_task(path: str | Path) -> TaskSpec:
    return validate_task(read_task_file(path), source=str(path))


def validate_task(data: dict, source: str = "task") -> TaskSpec:
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        raise AgentloopError(f"{source}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem, naming the field: `memory.policy: unknown policy 'foo'; choose one of ...`."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown field `{field}` (check the spelling; see the README for the task.yaml fields)"
    message = error["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"field `{field}`: {message}{more}"
