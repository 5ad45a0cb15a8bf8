"""The python tool: run model-written code in a child interpreter confined to the workspace.

What confines it:
- `sys.executable -I -B` (isolated mode, no bytecode files), cwd = workspace, a minimal environment
  (PATH, LANG, HOME = TMPDIR = workspace; no proxies, no host secrets), the code passed on stdin.
- limits: wall timeout (the whole process group is SIGKILLed), RLIMIT_AS (memory), RLIMIT_FSIZE, no core
  files; set with prlimit before the code is sent (see `process._limit`).
- a fresh network namespace (`unshare --user --map-root-user --net`) where the machine allows it
  unprivileged; checked once, silently skipped where it does not work (see `process.netns_prefix`).
- an audit hook (`sys.addaudithook`), installed by a bootstrap before the user code, that raises
  PermissionError on every `socket.*` event; on starting processes, sending signals and changing resource
  limits (`subprocess.Popen`, `os.system`, `os.exec`, `os.fork`, `os.kill`, `resource.setrlimit` ...); on
  opening a file for writing outside the workspace; and on `os.remove/rename/mkdir/rmdir/symlink/link/
  chmod/...` and `shutil.rmtree/copy*/move` outside it. Paths go through realpath, so symlinks are caught.

What it does not stop: audit hooks see Python-level operations only. Native code (ctypes, C extensions)
can open sockets or write files unseen, and so can `os.open(..., dir_fd=...)` relative to a directory
opened elsewhere; the hook itself is ordinary Python state a determined program could tamper with. Reads
outside the workspace are allowed. Without the network namespace, the network guard is the hook alone.
This is a guard against a model's mistakes, not a boundary against hostile code; run that in a container
or VM.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .base import Tool, ToolResult, function_tool
from .process import describe, run_process

# Runs as `python -I -B -c _BOOTSTRAP <workspace>`; reads the user code from stdin.
_BOOTSTRAP = r'''
import os, sys

def _guard(root):
    import os.path as osp
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    path_args = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                 "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                 "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
                 "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
                 "shutil.copymode": (1,), "shutil.copystat": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1)}
    denied = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
              "os.kill", "os.killpg", "pty.spawn", "resource.setrlimit", "resource.prlimit"}

    def outside(path):
        if isinstance(path, int):
            return False  # an fd, checked when it was opened
        real = osp.realpath(os.fsdecode(path))
        return osp.commonpath([root, real]) != root

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writes and path is not None and outside(path):
                raise PermissionError(f"sandbox: writing outside the workspace is not allowed: {path}")
        elif event in path_args:
            for i in path_args[event]:
                if args[i] is not None and outside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the workspace is not allowed: {args[i]}")
        elif event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is not allowed ({event})")
        elif event in denied:
            raise PermissionError(f"sandbox: processes, signals and resource limits are off limits ({event})")

    sys.addaudithook(hook)

def _run(root):
    import linecache, traceback
    code = sys.stdin.read()
    _guard(root)
    sys.argv = [""]
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    main = sys.modules["__main__"].__dict__
    for name in ("_guard", "_run"):
        main.pop(name, None)
    try:
        exec(compile(code, "<code>", "exec"), main)
    except SystemExit:
        raise
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)

_run(sys.argv[1])
'''


def make_python_tool(workspace: Path, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_chars: int = 4000,
                     network_namespace: bool = True) -> Tool:
    """The `python` tool for `workspace`; `network_namespace` False skips unshare even where it works."""
    root = os.path.realpath(workspace)

    def python(code: str) -> ToolResult:
        """Run Python code in the workspace and return what it prints. No network.

        Args:
            code: a Python program; print the results you need
        """
        outcome = run_process([sys.executable, "-I", "-B", "-c", _BOOTSTRAP, root], cwd=root, timeout_s=timeout_s,
                              max_chars=max_output_chars, stdin_text=code, memory_mb=memory_mb,
                              isolate_network=network_namespace)
        content, error = describe(outcome, timeout_s)
        return ToolResult(ok=error is None, content=content, error=error)

    # the runner's own wait is only a backstop: the child is killed at timeout_s
    return function_tool(python, timeout_s=timeout_s + 10)
