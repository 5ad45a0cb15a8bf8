"""Workspace file tools: read_file, write_file, list_dir, search_files.

Every path is resolved with `os.path.realpath` (all symlinks, in any component) and refused unless the
result lies inside the workspace, so `../x`, absolute paths elsewhere and symlinks (to files or
directories) pointing out are all refused. The check and the use are not atomic: a process racing to
swap a directory for a symlink between the two could still escape.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field

from .base import Tool, checked_settings, function_tool

MAX_MATCHES = 50
MAX_SEARCH_FILE_BYTES = 2_000_000  # larger files are skipped by search_files
_SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules"}


class Workspace:
    """A directory the file tools are confined to."""

    def __init__(self, root: Path | str):
        self.root = os.path.realpath(root)  # resolved once; every path is checked against it

    def resolve(self, path: str) -> str:
        """The real absolute path of `path` (relative to the root), or PermissionError if it is outside."""
        real = os.path.realpath(os.path.join(self.root, path))
        if os.path.commonpath([self.root, real]) != self.root:
            raise PermissionError(f"{path!r} is outside the workspace; use a path inside it")
        return real

    def relative(self, real: str) -> str:
        return os.path.relpath(real, self.root)


@checked_settings("read_file")
def make_read_file(workspace: Path) -> Tool:
    ws = Workspace(workspace)

    def read_file(path: str, start_line: int | None = None, end_line: int | None = None) -> str:
        """Read a text file, optionally only lines start_line..end_line (1-based, inclusive).

        Args:
            path: file path inside the workspace
            start_line: first line to return
            end_line: last line to return
        """
        with open(ws.resolve(path), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines(keepends=True)
        if start_line is None and end_line is None:
            return "".join(lines) or "(empty file)"
        first, last = max(start_line or 1, 1), min(end_line or len(lines), len(lines))
        if first > last:
            return f"(no lines in range; the file has {len(lines)} lines)"
        return "".join(lines[first - 1:last])

    return function_tool(read_file, retry_safe=True)


@checked_settings("write_file")
def make_write_file(workspace: Path) -> Tool:
    ws = Workspace(workspace)

    def write_file(path: str, content: str) -> str:
        """Write content to a file, replacing it; creates parent folders.

        Args:
            path: file path inside the workspace
            content: the full new text of the file
        """
        real = ws.resolve(path)
        os.makedirs(os.path.dirname(real), exist_ok=True)
        with open(real, "w", encoding="utf-8") as f:
            f.write(content)
        return f"wrote {len(content)} characters to {ws.relative(real)}"

    return function_tool(write_file, retry_safe=True)


@checked_settings("list_dir")
def make_list_dir(workspace: Path) -> Tool:
    ws = Workspace(workspace)

    def list_dir(path: str = ".") -> str:
        """List a folder; folders end with /.

        Args:
            path: folder inside the workspace
        """
        real = ws.resolve(path)
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(real))
        return "\n".join(names) or "(empty folder)"

    return function_tool(list_dir, retry_safe=True)


@checked_settings("search_files")
def make_search_files(workspace: Path, max_matches: Annotated[int, Field(ge=1, le=10_000)] = MAX_MATCHES) -> Tool:
    ws = Workspace(workspace)

    def files_under(real: str, glob: str | None):
        if os.path.isfile(real):
            yield real
            return
        for folder, dirs, files in os.walk(real):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            for name in sorted(files):
                full = os.path.join(folder, name)
                if glob and not (fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(ws.relative(full), glob)):
                    continue
                try:
                    yield ws.resolve(full)
                except PermissionError:  # a symlink pointing out of the workspace
                    continue

    def search_files(pattern: str, path: str = ".", glob: str | None = None) -> str:
        """Find lines matching a regex; returns file:line: text.

        Args:
            pattern: regular expression
            path: folder or file to search
            glob: only files whose name matches, like *.py
        """
        regex = re.compile(pattern)
        found: list[str] = []
        for real in files_under(ws.resolve(path), glob):
            if os.path.getsize(real) > MAX_SEARCH_FILE_BYTES:
                continue
            with open(real, "rb") as f:
                data = f.read()
            if b"\0" in data[:1024]:
                continue  # binary
            for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                if regex.search(line):
                    found.append(f"{ws.relative(real)}:{number}: {line.strip()[:200]}")
                    if len(found) >= max_matches:
                        return "\n".join(found) + f"\n(stopped at {max_matches} matches; narrow the search)"
        return "\n".join(found) or "no matches"

    return function_tool(search_files, retry_safe=True)
