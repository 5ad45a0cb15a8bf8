"""Built-in agent tools (installed as agentloop.tools).

`make_tools(["read_file", "python"], workspace, {"python": {"timeout_s": 5}})` builds tools by name;
wrap them in a `ToolBox` to get schemas for the chat template and a `call(name, arguments)` that
always returns a `ToolResult`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from agentloop.errors import AgentloopError

from .base import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_TIMEOUT_S,
    Tool,
    ToolBox,
    ToolResult,
    function_tool,
    run_tool,
    tool,
    truncate,
)
from .files import Workspace, make_list_dir, make_read_file, make_search_files, make_write_file
from .process import netns_prefix
from .python import make_python_tool
from .shell import DEFAULT_ALLOW, make_shell_tool

# name -> factory(workspace, **settings) -> Tool
BUILTIN_TOOLS: dict[str, Callable[..., Tool]] = {
    "read_file": make_read_file,
    "write_file": make_write_file,
    "list_dir": make_list_dir,
    "search_files": make_search_files,
    "python": make_python_tool,
    "shell": make_shell_tool,
}


def _settings(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """`given` checked against the factory's keyword parameters (all but `workspace`)."""
    factory = BUILTIN_TOOLS[name]
    hints = typing.get_type_hints(factory)
    params = [p for p in inspect.signature(factory).parameters.values() if p.name != "workspace"]
    model = create_model(f"{name}_settings", __config__=ConfigDict(extra="forbid"),
                         **{p.name: (hints[p.name], p.default) for p in params})
    try:
        return dict(model.model_validate(given))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(p.name for p in params) or "none"
            raise AgentloopError(f"unknown setting {where!r} for tool {name}; valid settings: {valid}") from None
        raise AgentloopError(f"tool {name} setting {where!r}: {err['msg']}; fix it in the tool settings") from None


def make_tools(names: list[str], workspace: Path, settings: dict[str, dict] | None = None) -> list[Tool]:
    """The built-in tools `names`, confined to `workspace`, each built with `settings[name]` (keyword arguments)."""
    settings = settings or {}
    known = ", ".join(BUILTIN_TOOLS)
    for name in names:
        if name not in BUILTIN_TOOLS:
            raise AgentloopError(f"unknown tool {name!r}; built-in tools are: {known}")
    for name, given in settings.items():
        if not isinstance(given, dict):
            raise AgentloopError(f"settings for tool {name!r} must be a mapping of setting: value")
        if name not in names:
            raise AgentloopError(f"settings given for tool {name!r}, which is not in the tool list; add it or "
                                 "remove its settings")
    if len(set(names)) != len(names):
        raise AgentloopError("a tool is listed twice; list each tool once")
    if not Path(workspace).is_dir():
        raise AgentloopError(f"workspace {str(workspace)!r} is not a directory; create it or point to one")
    if "shell" in names and not settings.get("shell", {}).get("enabled"):
        raise AgentloopError("the shell tool is off; set `enabled: true` in its settings to turn it on")
    return [BUILTIN_TOOLS[name](Path(workspace), **_settings(name, settings.get(name, {}))) for name in names]


__all__ = [
    "BUILTIN_TOOLS", "DEFAULT_ALLOW", "DEFAULT_MAX_OUTPUT_CHARS", "DEFAULT_TIMEOUT_S", "Tool", "ToolBox", "ToolResult",
    "Workspace", "function_tool", "make_list_dir", "make_python_tool", "make_read_file", "make_search_files",
    "make_shell_tool", "make_tools", "make_write_file", "netns_prefix", "run_tool", "tool", "truncate",
]
