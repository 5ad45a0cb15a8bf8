"""The shell tool: off unless enabled; runs one allowlisted program, never through a shell, in the sandbox.

The command is split with shlex and run directly (no `shell=True`), so pipes, `;`, `&&`, redirection,
`$VAR`/`$(...)` and backticks are refused with a message instead of silently meaning something else;
there is no globbing. The program (first word) must be in the allowlist, by bare name, and an argument
naming a path outside the workspace (`/etc`, `../x`, `~`, a symlink pointing out) is refused with a message.
Those checks only make refusals clear: the boundary is the bubblewrap sandbox of sandbox.py, the same as
the python tool's (a copy of the workspace, a read-only runtime, no network, limits), so a program added to
the allowlist that runs code (python, sh, find -exec ...) runs it confined too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

from agentloop.errors import AgentloopError

from .base import Tool, ToolResult, checked_settings, function_tool
from .process import describe, run_unconfined
from .sandbox import (
    SETUP_GRACE_S,
    DiskMB,
    Limits,
    MaxFiles,
    MaxProcesses,
    MemoryMB,
    OutputChars,
    TimeoutS,
    confinement,
    run_sandboxed,
)

DEFAULT_ALLOW = ("cat", "diff", "echo", "grep", "head", "ls", "pwd", "tail", "wc")
_OPERATOR = re.compile(r"[|&;<>()]+")
_EXPANSION = re.compile(r"`|\$[({\w]")


def _outside(word: str, root: str) -> bool:
    """`word` (or the value of `--option=value`) names a path outside `root`."""
    value = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
    if value.startswith("~"):
        return True
    real = os.path.realpath(os.path.join(root, value))
    return os.path.commonpath([root, real]) != root


def split_command(command: str, allow: tuple[str, ...] | list[str], root: str) -> list[str]:
    """The argv for `command`, or ValueError saying why it is refused."""
    if _EXPANSION.search(command):
        raise ValueError("variables, $(...) and backticks are not supported; write the values out")
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        argv = list(lexer)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"cannot split the command: {exc}") from None
    if not argv:
        raise ValueError("empty command")
    if any(_OPERATOR.fullmatch(word) for word in argv):
        raise ValueError("pipes, ;, &&, & and redirection are not supported; run one command at a time")
    if argv[0] not in allow:
        raise ValueError(f"program {argv[0]!r} is not allowed; allowed: {', '.join(allow)}")
    for word in argv[1:]:
        if _outside(word, root):
            raise ValueError(f"argument {word!r} names a path outside the workspace; use paths inside it")
    return argv


@checked_settings("shell")
def make_shell_tool(workspace: Path, enabled: bool = False, allow: list[str] | None = None, timeout_s: TimeoutS = 10.0,
                    memory_mb: MemoryMB = 1024, disk_mb: DiskMB = 128, max_files: MaxFiles = 4096,
                    max_processes: MaxProcesses = 64, max_output_chars: OutputChars = 4000,
                    unsafe: bool = False) -> Tool:
    """The `shell` tool; raises AgentloopError unless `enabled`. `allow` None = DEFAULT_ALLOW."""
    if not enabled:
        raise AgentloopError("the shell tool is off; set `enabled: true` in its settings to turn it on")
    if allow is not None and not all(name and "/" not in name for name in allow):
        raise AgentloopError("tool shell setting 'allow': list programs by bare name (ls, grep), not paths")
    root = os.path.realpath(workspace)
    programs = tuple(allow) if allow is not None else DEFAULT_ALLOW
    confinement("shell", unsafe)
    limits = Limits(timeout_s, memory_mb, disk_mb, max_files, max_processes, max_output_chars)

    def shell(command: str) -> ToolResult:
        """Run one command in the workspace (the description lists the allowed programs).

        Args:
            command: program and arguments
        """
        try:
            argv = split_command(command, programs, root)
        except ValueError as exc:
            return ToolResult(ok=False, content=f"refused: {exc}", error=str(exc))
        if shutil.which(argv[0]) is None:
            message = f"program {argv[0]!r} is not installed here"
            return ToolResult(ok=False, content=message, error=message)
        if unsafe:
            outcome = run_unconfined(argv, root, timeout_s, max_output_chars, None, memory_mb, disk_mb)
        else:
            outcome = run_sandboxed(argv, root, limits)
        content, error = describe(outcome, timeout_s)
        return ToolResult(ok=error is None, content=content, error=error)

    return function_tool(shell, description=f"Run one command in the workspace. Programs: {', '.join(programs)}.",
                         timeout_s=timeout_s + SETUP_GRACE_S + 10)
