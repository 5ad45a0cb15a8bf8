"""The python tool: run model-written code in a child interpreter, confined by the operating system.

The child is `sys.executable -I -B` (isolated mode, no bytecode files) with the code on stdin, run inside the
bubblewrap sandbox of sandbox.py: it sees a copy of the workspace (read-write, at most `disk_mb`) and a
read-only runtime, nothing else of the file system; no network; its own PID namespace (nothing it starts
outlives the call); limits on memory, CPU time, processes and files. That holds for everything it can do
from inside, ctypes, os.system, subprocesses and compiled code included: the kernel enforces it, not Python.
Where bubblewrap cannot make the sandbox the tool refuses to be built, unless `unsafe: true`, which runs the
code as this user with only resource limits and a timeout (and says so on stderr).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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

# Runs as `python -I -B -c _BOOTSTRAP`; reads the user code from stdin, shows tracebacks without its own frame.
_BOOTSTRAP = r'''
import sys

def _run():
    import linecache, traceback
    code = sys.stdin.read()
    sys.argv = [""]
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    main = sys.modules["__main__"].__dict__
    main.pop("_run", None)
    try:
        exec(compile(code, "<code>", "exec"), main)
    except SystemExit:
        raise
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)

_run()
'''


@checked_settings("python")
def make_python_tool(workspace: Path, timeout_s: TimeoutS = 10.0, memory_mb: MemoryMB = 1024, disk_mb: DiskMB = 128,
                     max_files: MaxFiles = 4096, max_processes: MaxProcesses = 64,
                     max_output_chars: OutputChars = 4000, unsafe: bool = False) -> Tool:
    """The `python` tool for `workspace`; `unsafe` runs the code unconfined (never the default)."""
    root = os.path.realpath(workspace)
    confinement("python", unsafe)
    limits = Limits(timeout_s, memory_mb, disk_mb, max_files, max_processes, max_output_chars)
    argv = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP]

    def python(code: str) -> ToolResult:
        """Run Python code in the workspace and return what it prints. No network.

        Args:
            code: a Python program; print the results you need
        """
        if unsafe:
            outcome = run_unconfined(argv, root, timeout_s, max_output_chars, code, memory_mb, disk_mb)
        else:
            outcome = run_sandboxed(argv, root, limits, code)
        content, error = describe(outcome, timeout_s)
        return ToolResult(ok=error is None, content=content, error=error)

    # the runner's own wait is only a backstop: the child is killed at timeout_s
    return function_tool(python, timeout_s=timeout_s + SETUP_GRACE_S + 10)
