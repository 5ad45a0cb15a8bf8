"""Child processes of the python and shell tools: output read through pipes with a size cap, a wall-clock
deadline, and the unconfined runner that `unsafe: true` falls back to (the sandbox is in sandbox.py).

Output never goes to a file a child could grow without bound: stdout and stderr are pipes, read as they
fill, keeping the first and the last `max_chars` bytes of each.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO


@dataclass(frozen=True)
class ProcessOutcome:
    """What a child process did."""

    returncode: int | None  # None when it was killed at the timeout
    stdout: str  # head and tail kept, with a note when longer than the cap
    stderr: str
    problem: str | None = None  # set when the tool itself failed around the program (the sandbox, the workspace)


class CappedBuffer:
    """The first and the last `limit` bytes of a stream, and how many bytes it had."""

    def __init__(self, limit: int):
        self.limit, self.head, self.tail, self.total = limit, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail = (self.tail + data)[-self.limit:]

    def text(self) -> str:
        """Head and tail, about `limit` characters, with a note saying how much was left out."""
        if self.total <= self.limit:
            return self.head.decode("utf-8", errors="replace")
        keep = self.limit * 2 // 3
        first, last = bytes(self.head[:keep]), bytes((self.head + self.tail)[-(self.limit - keep):])
        return (f"{first.decode('utf-8', errors='replace')}\n[... {self.total - self.limit} bytes cut ...]\n"
                f"{last.decode('utf-8', errors='replace')}")


def feed_stdin(pipe: IO[bytes], write: Callable[[IO[bytes]], None]) -> threading.Thread:
    """Write a child's stdin from a thread (`write(pipe)`), then close it; a child that exits early is fine."""
    def work() -> None:
        try:
            write(pipe)
        except (BrokenPipeError, ValueError, OSError):
            pass  # the child stopped reading: it exited or was killed
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    thread = threading.Thread(target=work, name="tool-stdin", daemon=True)
    thread.start()
    return thread


def collect(proc: subprocess.Popen, streams: dict[int, CappedBuffer], deadline: float) -> bool:
    """Read the file descriptors in `streams` until all close or `deadline` (time.monotonic) passes; then wait for
    `proc`. False when the deadline passed (the caller kills it)."""
    selector = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    try:
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for key, _ in selector.select(min(left, 1.0)):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if data:
                    streams[key.fd].add(data)
                else:
                    selector.unregister(key.fd)
        try:
            proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            return False
        return True
    finally:
        selector.close()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it was started in a new session) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def minimal_env(workspace: str, path: str | None = None) -> dict[str, str]:
    """PATH and a UTF-8 locale; HOME and TMPDIR point at the workspace. No proxies, no host secrets."""
    return {"PATH": path or os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": workspace,
            "TMPDIR": workspace}


def run_unconfined(argv: list[str], cwd: str, timeout_s: float, max_chars: int, stdin_text: str | None = None,
                   memory_mb: int | None = None, file_mb: int | None = None) -> ProcessOutcome:
    """`unsafe: true`: run `argv` in `cwd` as this user, with nothing confining it but resource limits (set from
    outside with prlimit before any input is sent) and a group kill at `timeout_s`."""
    proc = subprocess.Popen(argv, cwd=cwd, env=minimal_env(cwd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    limits = [(resource.RLIMIT_CORE, 0)]
    if memory_mb is not None:
        limits.append((resource.RLIMIT_AS, memory_mb * 2**20))
    if file_mb is not None:
        limits.append((resource.RLIMIT_FSIZE, file_mb * 2**20))
    try:
        for which, value in limits:
            resource.prlimit(proc.pid, which, (value, value))
    except ProcessLookupError:
        pass
    data = (stdin_text or "").encode()
    feed_stdin(proc.stdin, lambda pipe: pipe.write(data))
    out, err = CappedBuffer(max_chars), CappedBuffer(max_chars)
    finished = collect(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err}, time.monotonic() + timeout_s)
    kill_group(proc)  # whatever it left behind in its group
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    return ProcessOutcome(proc.returncode if finished else None, out.text(), err.text())


def describe(outcome: ProcessOutcome, timeout_s: float) -> tuple[str, str | None]:
    """(text for the model: stdout, stderr and exit status in labelled sections; error or None when exit 0)."""
    parts = [f"[{name}]\n{text.rstrip()}" for name, text in (("stdout", outcome.stdout), ("stderr", outcome.stderr))
             if text.strip()]
    if outcome.problem is not None:
        error = outcome.problem
        parts.append(f"[{error}]")
    elif outcome.returncode is None:
        error = f"timed out after {timeout_s:g} s"
        parts.append(f"[{error}; process killed]")
    elif outcome.returncode < 0:
        error = f"killed by signal {-outcome.returncode}"
        parts.append(f"[{error}]")
    else:
        error = f"exit code {outcome.returncode}" if outcome.returncode else None
        parts.append(f"[exit code {outcome.returncode}]")
    return "\n".join(parts), error
