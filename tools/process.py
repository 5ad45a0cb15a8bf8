"""Running a tool's child process: own session (killed as a group at the timeout), resource limits, a minimal
environment, a fresh network namespace where the machine allows it, output captured with a size cap.

Network namespace: `unshare --user --map-root-user --net` is tried once per process; if it works
unprivileged here, children run in a namespace whose only interface is a downed loopback (no route
anywhere). If not, children run without it and only the tool's own guards apply.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO

MAX_FILE_BYTES = 256 * 2**20  # RLIMIT_FSIZE: no single file (captured output included) grows past this


@functools.cache
def netns_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program in a fresh network namespace, or () where that does not work."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    prefix = (exe, "--user", "--map-root-user", "--net", "--")
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=10,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def minimal_env(workspace: str) -> dict[str, str]:
    """PATH and a UTF-8 locale; HOME and TMPDIR point at the workspace. No proxies, no host secrets."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": workspace, "TMPDIR": workspace}


@dataclass(frozen=True)
class ProcessOutcome:
    """What a child process did."""

    returncode: int | None  # None when it was killed at the timeout
    stdout: str  # head and tail kept, with a note when longer than the cap
    stderr: str


def _limit(pid: int, memory_bytes: int | None) -> None:
    """Set the child's resource limits from outside (prlimit). Not preexec_fn: that is unsafe in a process with
    threads, and tools run in worker threads. The python tool's code arrives on stdin only after this, so it
    always runs limited; a shell command runs unlimited for the microseconds before."""
    limits = [(resource.RLIMIT_FSIZE, MAX_FILE_BYTES), (resource.RLIMIT_CORE, 0)]
    if memory_bytes is not None:
        limits.append((resource.RLIMIT_AS, memory_bytes))
    try:
        for which, value in limits:
            resource.prlimit(pid, which, (value, value))
    except ProcessLookupError:
        pass  # already gone


def _read_capped(f: IO[bytes], max_chars: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= max_chars:
        return f.read().decode("utf-8", errors="replace")
    head = max_chars * 2 // 3
    first = f.read(head)
    f.seek(size - (max_chars - head))
    last = f.read()
    cut = size - max_chars
    return (f"{first.decode('utf-8', errors='replace')}\n[... {cut} bytes cut ...]\n"
            f"{last.decode('utf-8', errors='replace')}")


def run_process(argv: list[str], cwd: str, timeout_s: float, max_chars: int, stdin_text: str | None = None,
                memory_mb: int | None = None, isolate_network: bool = True) -> ProcessOutcome:
    """Run `argv` in `cwd`; kill its whole process group at `timeout_s`."""
    prefix = netns_prefix() if isolate_network else ()
    memory = memory_mb * 2**20 if memory_mb is not None else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*prefix, *argv], cwd=cwd, env=minimal_env(cwd), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
                                start_new_session=True)
        try:
            _limit(proc.pid, memory)
            proc.communicate(None if stdin_text is None else stdin_text.encode(), timeout=timeout_s)
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:  # the whole group: the child and anything it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        return ProcessOutcome(returncode, _read_capped(out, max_chars), _read_capped(err, max_chars))


def describe(outcome: ProcessOutcome, timeout_s: float) -> tuple[str, str | None]:
    """(text for the model: stdout, stderr and exit status in labelled sections; error or None when exit 0)."""
    parts = [f"[{name}]\n{text.rstrip()}" for name, text in (("stdout", outcome.stdout), ("stderr", outcome.stderr))
             if text.strip()]
    if outcome.returncode is None:
        error = f"timed out after {timeout_s:g} s"
        parts.append(f"[{error}; process killed]")
    elif outcome.returncode < 0:
        error = f"killed by signal {-outcome.returncode}"
        parts.append(f"[{error}]")
    else:
        error = f"exit code {outcome.returncode}" if outcome.returncode else None
        parts.append(f"[exit code {outcome.returncode}]")
    return "\n".join(parts), error
