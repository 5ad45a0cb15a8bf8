"""The shell tool: off unless enabled; runs one allowlisted program, never through a shell.

The command is split with shlex and run directly (no `shell=True`), so pipes, `;`, `&&`, redirection,
`$VAR`/`$(...)` and backticks are refused with a message instead of silently meaning something else;
there is no globbing. The program (first word) must be in the allowlist, by bare name. The default list
holds read-only programs; they can still read files outside the workspace. Adding a program that runs
code (python, sh, find -exec ...) gives the model that program's full power: the python tool's sandbox
does not apply to it. Children get the same timeout, group kill, minimal environment and network
namespace (where available) as the python tool.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

from agentloop.errors import AgentloopError

from .base import Tool, ToolResult, function_tool
from .process import describe, run_process

DEFAULT_ALLOW = ("cat", "diff", "echo", "grep", "head", "ls", "pwd", "tail", "wc")
_OPERATOR = re.compile(r"[|&;<>()]+")
_EXPANSION = re.compile(r"`|\$[({\w]")


def split_command(command: str, allow: tuple[str, ...] | list[str]) -> list[str]:
    """The argv for `command`, or ValueError saying why it is refused."""
    if _EXPANSION.search(command):
        raise ValueError("variables, $(...) and backticks are not supported; write the values out")
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    argv = list(lexer)
    if not argv:
        raise ValueError("empty command")
    if any(_OPERATOR.fullmatch(word) for word in argv):
        raise ValueError("pipes, ;, &&, & and redirection are not supported; run one command at a time")
    if argv[0] not in allow:
        raise ValueError(f"program {argv[0]!r} is not allowed; allowed: {', '.join(allow)}")
    return argv


def make_shell_tool(workspace: Path, enabled: bool = False, allow: list[str] | None = None, timeout_s: float = 10.0,
                    max_output_chars: int = 4000) -> Tool:
    """The `shell` tool; raises AgentloopError unless `enabled`. `allow` None = DEFAULT_ALLOW."""
    if not enabled:
        raise AgentloopError("the shell tool is off; set `enabled: true` in its settings to turn it on")
    root = os.path.realpath(workspace)
    programs = tuple(allow) if allow is not None else DEFAULT_ALLOW

    def shell(command: str) -> ToolResult:
        """Run one command in the workspace (the description lists the allowed programs).

        Args:
            command: program and arguments
        """
        try:
            argv = split_command(command, programs)
        except ValueError as exc:
            return ToolResult(ok=False, content=f"refused: {exc}", error=str(exc))
        if shutil.which(argv[0]) is None:
            message = f"program {argv[0]!r} is not installed here"
            return ToolResult(ok=False, content=message, error=message)
        outcome = run_process(argv, cwd=root, timeout_s=timeout_s, max_chars=max_output_chars)
        content, error = describe(outcome, timeout_s)
        return ToolResult(ok=error is None, content=content, error=error)

    return function_tool(shell, description=f"Run one command in the workspace. Programs: {', '.join(programs)}.",
                         timeout_s=timeout_s + 10)
