"""A JSONL trace: one JSON object per line, each written whole and flushed to the OS at once.

- Exclusive: a trace never writes over a file that exists (an earlier run's trace, or one being written right
  now by a run on the same path). It goes to the first free name `<stem>-2<suffix>`, `-3`, ... (created with
  O_EXCL, so two runs racing for one name get different files); `renamed` tells the caller to say so. The one
  exception is explicit: `append=True` (`agentloop run --resume`) reopens the trace of the run being resumed and
  continues it, after a `resume` record the caller writes.
- Whole lines: each record is one write() of the complete line on an O_APPEND descriptor, with SIGINT and
  SIGTERM held back meanwhile, so no record is ever cut or interleaved with another. No fsync: a killed
  process loses nothing written; a machine that loses power may.
- A final record: the run's own last record (`stop` for a generation, `finish` for an agent) says how it
  ended; when the run dies instead (an exception, Ctrl-C, SIGTERM), leaving the `with` block writes one
  saying so: reason `error` (with the message), `cancelled` or `terminated`. If it dies before writing
  anything, the `opening` record goes first; if that death is an AgentloopError (bad input found before the
  run started) the file is removed instead (an appended trace is left as it was): nothing ran. `open_trace`
  holds SIGINT and SIGTERM back from before the file is created until its `with` block has begun, so there is
  no moment at which a Ctrl-C could leave a trace file without its final record.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agentloop.errors import AgentloopError, Terminated

MAX_RENAMES = 1000
_HELD = {signal.SIGINT, signal.SIGTERM}


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as null (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _open_exclusive(path: Path) -> tuple[int, Path]:
    """(fd, path) of a new file at `path` or, if that exists, at the first free `<stem>-N<suffix>`."""
    if path.is_dir():
        raise AgentloopError(f"trace path {path} is a directory; give a file name, e.g. {path / 'trace.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, MAX_RENAMES + 1):
            candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
                return fd, candidate
            except FileExistsError:
                continue
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            why = "a part of the path is a file, not a folder"
        raise AgentloopError(f"cannot write the trace at {path} ({why}); give another --trace") from None
    raise AgentloopError(f"{path} and {MAX_RENAMES - 1} numbered variants exist; give another --trace")


def _open_append(path: Path) -> int:
    """An O_APPEND descriptor on the existing trace at `path` (created if it went missing), its last line dropped if
    a kill cut it (a trace written whole-line never has one; older traces may)."""
    if path.is_dir():
        raise AgentloopError(f"trace path {path} is a directory; resume from the run's .jsonl trace or .ckpt checkpoint")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise AgentloopError(f"cannot append to the trace at {path} ({exc.strerror or exc})") from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            tail_start = max(0, size - (1 << 20))
            while True:  # find the last newline, reading back 1 MiB at a time
                tail = os.pread(fd, size - tail_start, tail_start)
                cut = tail.rfind(b"\n")
                if cut >= 0 or tail_start == 0:
                    os.ftruncate(fd, tail_start + cut + 1)
                    break
                tail_start = max(0, tail_start - (1 << 20))
    except BaseException:
        os.close(fd)
        raise
    return fd


def interruption(exc: BaseException | None) -> tuple[str, str] | None:
    """(reason, message) of the final record when `exc` stopped a run from outside (Ctrl-C, SIGTERM, the caller
    closing the event generator); None for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled", "interrupted by the user (SIGINT)"
    if isinstance(exc, Terminated):
        return "terminated", "terminated (SIGTERM)"
    if isinstance(exc, GeneratorExit):
        return "cancelled", "the caller stopped the run"
    return None


class JsonlTrace:
    """`append=True` continues the existing trace of a resumed run (`agentloop run --resume`) instead of claiming a
    new file: the one deliberate exception to "never write over a file", and only for the run that wrote it. A
    last line cut by the kill is dropped first; the resumed run's records follow, and its final record is
    written as for any run. A resumed run that fails with bad input before writing anything leaves the trace
    as it was (it is not removed: it holds the earlier run)."""

    def __init__(self, path: str | Path, final_kind: str = "stop", opening: dict[str, Any] | None = None,
                 append: bool = False):
        if not str(path).strip():
            raise AgentloopError("the trace path is empty; give a file name such as runs/trace.jsonl")
        self.requested = Path(path)
        self.append = append
        if append:
            self._fd, self.path = _open_append(self.requested), self.requested
        else:
            self._fd, self.path = _open_exclusive(self.requested)
        self.renamed = self.path != self.requested
        self.final_kind, self.opening = final_kind, opening
        self.records = 0
        self.ended = False  # the final record is written

    def write(self, record: BaseModel | dict[str, Any]) -> None:
        data = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
        try:
            text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
        except ValueError:
            text = json.dumps(_finite(data), ensure_ascii=False, default=str)
        line = (text + "\n").encode()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            while line:
                line = line[os.write(self._fd, line):]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self.records += 1
        self.ended = self.ended or data.get("kind") == self.final_kind

    def end(self, exc: BaseException | None) -> None:
        """Write the final record for a run that stopped without one (`exc`: what stopped it, None = nothing said)."""
        if self.ended or self._fd is None:
            return
        if not self.records and self.opening is not None and not self.append:
            self.write(self.opening)
        if interruption(exc) is not None:
            reason, message = interruption(exc)
        elif exc is None:
            reason, message = "error", "the run ended without saying why"
        else:
            reason, message = "error", str(exc) if isinstance(exc, AgentloopError) else f"{type(exc).__name__}: {exc}"
        self.write({"kind": self.final_kind, "reason": reason, "error": True, "message": message})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)  # a second Ctrl-C cannot cut the ending short
        try:
            if isinstance(exc, AgentloopError) and not self.records:
                self.close()  # bad input, found before the run started: nothing to keep
                if not self.append:  # an appended trace holds the earlier run: left as it was
                    self.path.unlink(missing_ok=True)
                return
            self.end(exc)
            self.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def open_trace(path: str | Path, final_kind: str = "stop", opening: dict[str, Any] | None = None,
               append: bool = False):
    """`with open_trace(...) as trace:` like `with JsonlTrace(...)`, with no gap for a signal between creating (or,
    with `append`, reopening) the file and entering the block that writes its final record."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        trace = JsonlTrace(path, final_kind=final_kind, opening=opening, append=append)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    with trace:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile is raised here, inside
        yield trace
