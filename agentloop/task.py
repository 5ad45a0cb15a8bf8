"""task.yaml: what to run (model, prompt, generation settings, memory policy), validated by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentloop.errors import AgentloopError
from agentloop.loop import GenerationSettings
from agentloop.memcap import parse_mem_cap
from agentloop.models import DEFAULT_MODEL
from agentloop.policies import POLICIES


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class MemorySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cap: str | None = Field(None, description="KV-cache cap: 8GB, 512MiB, 1.5GB, 2e9 or 2048tok; none = uncapped")
    policy: str = Field("none", description="what to do at the cap: " + ", ".join(sorted(POLICIES)))
    options: dict[str, Any] = Field(default_factory=dict, description="the policy's own settings")

    @field_validator("cap", mode="before")
    @classmethod
    def _cap(cls, value):
        if value is None:
            return None
        value = str(value)
        try:
            parse_mem_cap(value)
        except AgentloopError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("policy")
    @classmethod
    def _policy(cls, value):
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(sorted(POLICIES))}")
        return value


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

    @model_validator(mode="after")
    def _one_input(self):
        given = [k for k in ("task", "messages", "prompt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `task`, `messages` or `prompt`" + (f" (got {', '.join(given)})" if given else ""))
        if self.system is not None and self.task is None:
            raise ValueError("`system` goes with `task`; put a system message inside `messages` instead")
        return self

    def chat(self) -> list[dict] | None:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        if self.task is not None:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return system + [{"role": "user", "content": self.task}]
        return None


def load_task(path: str | Path) -> TaskSpec:
    path = Path(path)
    if not path.is_file():
        raise AgentloopError(f"task file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise AgentloopError(f"{path}: bad YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise AgentloopError(f"{path}: expected a mapping of fields (model, task, memory, ...), got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return validate_task(data, source=str(path))


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
