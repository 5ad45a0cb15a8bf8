"""Built-in agent tools (installed as agentloop.tools).

`make_tools(["read_file", "python"], workspace, {"python": {"timeout_s": 5}})` builds tools by name;
wrap them in a `ToolBox` to get schemas for the chat template and a `call(name, arguments)` that
always returns a `ToolResult`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import agentloop
from agentloop.errors import AgentloopError

from .base import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_TIMEOUT_S,
    Tool,
    ToolBox,
    ToolResult,
    checked_settings,
    function_tool,
    run_tool,
    tool,
    truncate,
)
from .files import Workspace, make_list_dir, make_read_file, make_search_files, make_write_file
from .python import make_python_tool
from .sandbox import sandbox_problem
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


def check_workspace(workspace: Path, allow_broad: bool = False) -> None:
    """AgentloopError unless `workspace` is a folder; unless `allow_broad`, also if it is /, holds the home
    folder, the current folder (strictly: the current folder itself is fine) or agentloop's own files."""
    if not Path(workspace).is_dir():
        raise AgentloopError(f"workspace {str(workspace)!r} is not a directory; create it or point to one")
    if allow_broad:
        return
    real = os.path.realpath(workspace)
    guarded = [(os.path.realpath(Path.home()), "your home folder", True),
               (os.path.realpath(os.getcwd()), "the current folder", False),
               (os.path.dirname(os.path.realpath(agentloop.__file__)), "agentloop's own files", True)]
    for path, what, self_too in guarded:
        if os.path.commonpath([real, path]) == real and (self_too or real != path):
            shown = "/ (the whole file system)" if real == "/" else real
            raise AgentloopError(f"workspace {shown} is too broad: it holds {what}; give the tools a folder of their "
                                 "own, or set `allow_broad_workspace: true` to use it anyway")


def make_tools(names: list[str], workspace: Path, settings: dict[str, dict] | None = None,
               allow_broad_workspace: bool = False) -> list[Tool]:
    """The built-in tools `names`, confined to `workspace` (checked by `check_workspace`), each built with
    `settings[name]` (keyword arguments, validated by the factory)."""
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
    check_workspace(workspace, allow_broad_workspace)
    if "shell" in names and not settings.get("shell", {}).get("enabled"):
        raise AgentloopError("the shell tool is off; set `enabled: true` in its settings to turn it on")
    return [BUILTIN_TOOLS[name](Path(workspace), **settings.get(name, {})) for name in names]


__all__ = [
    "BUILTIN_TOOLS", "DEFAULT_ALLOW", "DEFAULT_MAX_OUTPUT_CHARS", "DEFAULT_TIMEOUT_S", "Tool", "ToolBox", "ToolResult",
    "Workspace", "check_workspace", "checked_settings", "function_tool", "make_list_dir", "make_python_tool",
    "make_read_file", "make_search_files", "make_shell_tool", "make_tools", "make_write_file", "run_tool",
    "sandbox_problem", "tool", "truncate",
]
