"""Tools the model can call, and a runner that turns every call into a `ToolResult`, never an exception.

`run_tool` validates the arguments against the tool's pydantic model, runs the function in a daemon
worker thread and waits at most `timeout_s`. Python cannot kill a thread: a function that hangs keeps
its thread (and whatever it holds) until it returns by itself; the runner just stops waiting. Tools
that must really stop at a deadline (python, shell) run a subprocess with their own timeout.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from agentloop.errors import AgentloopError

from .schema import build_arguments, doc_parts

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_OUTPUT_CHARS = 4000
RETRY_ATTEMPTS = 3
# OSErrors that retrying cannot fix; every other OSError (TimeoutError, ConnectionError, EIO ...) is transient
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class ToolResult(BaseModel):
    """The outcome of one tool call."""

    tool: str = ""
    ok: bool
    content: str  # what the model sees: the output, or the error message
    error: str | None = None  # set when ok is False
    seconds: float = 0.0
    truncated: bool = False  # content was cut to the output limit


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with the JSON schema the chat template shows it."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments, OpenAI function style
    fn: Callable[..., Any]  # returns str, JSON-able data, None, or a ToolResult
    args_model: type[BaseModel]  # validates the arguments before `fn` runs
    model_param: str | None = None  # `fn` takes the validated model under this name; None = fields as keywords
    retry_safe: bool = False  # idempotent: retried on transient OSErrors
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long the runner waits for `fn`

    def schema(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def invoke(self, args: BaseModel) -> Any:
        return self.fn(**({self.model_param: args} if self.model_param else dict(args)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def function_tool(fn: Callable[..., Any], name: str | None = None, description: str | None = None,
                  retry_safe: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tool:
    """A Tool from a function: schema from its type hints (or its one pydantic-model parameter) and docstring."""
    name = name or fn.__name__
    parameters, args_model, single = build_arguments(fn, name)
    return Tool(name=name, description=description or doc_parts(fn)[0], parameters=parameters, fn=fn,
                args_model=args_model, model_param=single, retry_safe=retry_safe, timeout_s=timeout_s)


def tool(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Decorator form of `function_tool`: `@tool` or `@tool(name=..., retry_safe=True)`."""
    if fn is None:
        return lambda f: function_tool(f, **options)
    return function_tool(fn, **options)


def checked_settings(tool_name: str) -> Callable[[Callable[..., Tool]], Callable[..., Tool]]:
    """Decorator for a tool factory `f(workspace, **settings)`: the settings are validated against its keyword
    parameters' annotations (types and `Field` bounds) first, and a bad one is one AgentloopError line naming
    the setting. The factory's `settings` attribute lists the setting names."""
    def wrap(factory: Callable[..., Tool]) -> Callable[..., Tool]:
        hints = typing.get_type_hints(factory, include_extras=True)
        params = [p for p in inspect.signature(factory).parameters.values() if p.name != "workspace"]
        model = create_model(f"{tool_name}_settings", __config__=ConfigDict(extra="forbid"),
                             **{p.name: (hints[p.name], p.default) for p in params})

        @functools.wraps(factory)
        def build(workspace, **given: Any) -> Tool:
            try:
                settings = model.model_validate(given)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    valid = ", ".join(p.name for p in params) or "none"
                    raise AgentloopError(f"unknown setting {where!r} for tool {tool_name}; valid settings: "
                                         f"{valid}") from None
                raise AgentloopError(f"tool {tool_name} setting {where!r}: {err['msg']}; fix it in the tool "
                                     "settings") from None
            return factory(workspace, **dict(settings))

        build.settings = [p.name for p in params]
        return build

    return wrap


def truncate(text: str, limit: int) -> tuple[str, int]:
    """(text cut to about `limit` characters, keeping head and tail, with a note; number of characters cut)."""
    if len(text) <= limit:
        return text, 0
    cut, head = len(text) - limit, limit * 2 // 3
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[len(text) - (limit - head):]}", cut


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "(no output)"
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, (dict, list, tuple, int, float, bool)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS)


def _invoke(tool: Tool, args: BaseModel) -> Any:
    if not tool.retry_safe:
        return tool.invoke(args)
    retrying = Retrying(stop=stop_after_attempt(RETRY_ATTEMPTS), wait=wait_exponential(multiplier=0.05, max=1.0),
                        retry=retry_if_exception(_transient), reraise=True)
    return retrying(tool.invoke, args)


def _argument_problems(tool: Tool, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            problems.append(f"missing required argument '{where}'")
        elif err["type"] == "extra_forbidden":
            problems.append(f"unexpected argument '{where}'")
        else:
            problems.append(f"argument '{where}': {err['msg']}" if where else err["msg"])
    takes = ", ".join(tool.parameters.get("properties", {})) or "no arguments"
    return f"bad arguments for {tool.name}: {'; '.join(problems)} (it takes: {takes})"


def run_tool(tool: Tool, arguments: Any, timeout_s: float | None = None,
             max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS) -> ToolResult:
    """Call `tool` with `arguments` (a dict) and report what happened; tool-side problems never raise.

    `timeout_s` None waits the tool's own `timeout_s`.
    """
    start = time.perf_counter()

    def result(ok: bool, content: str, error: str | None = None) -> ToolResult:
        content, cut = truncate(content, max_output_chars)
        return ToolResult(tool=tool.name, ok=ok, content=content, error=error,
                          seconds=round(time.perf_counter() - start, 4), truncated=cut > 0)

    def failed(message: str) -> ToolResult:
        return result(False, message, message)

    if not isinstance(arguments, dict):
        return failed(f"arguments for {tool.name} must be a JSON object, got {type(arguments).__name__}")
    try:
        args = tool.args_model.model_validate(arguments)
    except ValidationError as exc:
        return failed(_argument_problems(tool, exc))
    limit = tool.timeout_s if timeout_s is None else timeout_s
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = _invoke(tool, args)
        except BaseException as exc:  # noqa: BLE001 - whatever it is, it goes back to the model as an error
            box["error"] = exc

    thread = threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        return failed(f"{tool.name} timed out after {limit:g} s")
    if "error" in box:
        exc = box["error"]
        return failed(f"{tool.name} failed: {type(exc).__name__}: {exc}")
    value = box["value"]
    if isinstance(value, ToolResult):
        return result(value.ok, value.content, value.error)
    return result(True, _as_text(value))


class ToolBox:
    """Tools by name; `call` runs one and always returns a ToolResult."""

    def __init__(self, tools: Iterable[Tool], timeout_s: float | None = None,
                 max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            if t.name in self.tools:
                raise AgentloopError(f"two tools are named {t.name!r}; give each tool a unique name")
            self.tools[t.name] = t
        self.timeout_s = timeout_s  # None = each tool's own
        self.max_output_chars = max_output_chars

    def schemas(self) -> list[dict[str, Any]]:
        """The tools in the form chat templates take (`tools=` of apply_chat_template)."""
        return [t.schema() for t in self.tools.values()]

    def call(self, name: str, arguments: Any) -> ToolResult:
        found = self.tools.get(name)
        if found is None:
            message = f"unknown tool {name!r}; available tools: {', '.join(self.tools) or 'none'}"
            return ToolResult(tool=name, ok=False, content=message, error=message)
        return run_tool(found, arguments, self.timeout_s, self.max_output_chars)
