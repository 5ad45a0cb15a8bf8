"""Moving a workspace into the sandbox and the sandbox's changes back (tar streams, see sandbox.py).

The sandbox works on a size-limited copy of the workspace; when the call ends its supervisor sends the
copy's final state back as a tar stream, and `apply_result` makes the real workspace match it. The stream
comes from inside the sandbox, so it is untrusted: names must be plain relative paths whose parents are
folders of the same stream, only folders, regular files and symlinks (stored as links, never followed)
are taken, the count is bounded, and nothing is written through a symlink of the real workspace. Entries
the sandbox never saw (the parent could not read them, sockets, devices) are left alone.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import uuid
from dataclasses import dataclass, field
from typing import IO

TAR_ENTRY_BYTES = 2048  # tar bytes per entry beyond its data, at most (header, PAX record, padding)


class TransferError(Exception):
    """The sandbox's result cannot be applied; the workspace is left as it was before the call."""


@dataclass
class Listing:
    """What a workspace holds: relative paths (parents first) of its folders, regular files and symlinks."""

    paths: list[str] = field(default_factory=list)
    nbytes: int = 0  # bytes of the regular files


def list_workspace(root: str) -> Listing:
    listing = Listing()

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = prefix + entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    listing.paths.append(rel)
                    walk(entry.path, rel + "/")
                elif stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    listing.paths.append(rel)
                    listing.nbytes += entry.stat(follow_symlinks=False).st_size if stat.S_ISREG(mode) else 0

    walk(root, "")
    return listing


def write_workspace(root: str, listing: Listing, out: IO[bytes]) -> set[str]:
    """Stream `listing` as a tar archive into `out`; returns the paths actually sent (unreadable ones are not)."""
    sent: set[str] = set()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel in listing.paths:
            if posixpath.dirname(rel) and posixpath.dirname(rel) not in sent:
                continue  # inside a folder that could not be sent
            try:
                tar.add(os.path.join(root, rel), arcname=rel, recursive=False)
            except (PermissionError, FileNotFoundError):
                continue
            sent.add(rel)
    return sent


def _clean(name: str) -> str:
    path = posixpath.normpath(name)
    if "\0" in name or path.startswith(("/", "../")) or path == "..":
        raise TransferError(f"the sandbox sent back a path outside the workspace: {name!r}")
    return path


def read_result(tar: tarfile.TarFile, max_files: int) -> dict[str, tarfile.TarInfo]:
    """The entries of the sandbox's result by clean relative path, checked; raises TransferError."""
    final: dict[str, tarfile.TarInfo] = {}
    for member in tar:
        path = _clean(member.name)
        if path == ".":
            continue
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
            continue  # fifos, devices: nothing a workspace needs
        parent = posixpath.dirname(path)
        if parent and not (parent in final and final[parent].isdir()):
            raise TransferError(f"the sandbox sent back {path!r} without its folder")
        if member.islnk() and not (_clean(member.linkname) in final and final[_clean(member.linkname)].isreg()):
            raise TransferError(f"the sandbox sent back a hard link to something else than a file: {path!r}")
        final[path] = member
        if len(final) > max_files:
            raise TransferError(f"the call left more than {max_files} files and folders in the workspace (max_files)")
    return final


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"


def _member_kind(member: tarfile.TarInfo) -> str:
    return "dir" if member.isdir() else "link" if member.issym() else "file"


def _remove(path: str) -> None:
    if _kind(os.lstat(path).st_mode) == "dir":
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _same_content(path: str, data: IO[bytes]) -> bool:
    with open(path, "rb") as f:
        while True:
            mine, theirs = f.read(1 << 20), data.read(1 << 20)
            if mine != theirs:
                return False
            if not mine:
                return True


def apply_result(root: str, tar: tarfile.TarFile, final: dict[str, tarfile.TarInfo], sent: set[str]) -> None:
    """Make the workspace `root` hold `final` (`sent`: the paths the sandbox was given; only those may go)."""
    for rel in sorted(sent, key=lambda p: p.count("/"), reverse=True):  # gone, or now of another kind
        st = _lstat(os.path.join(root, rel))
        if st is not None and (rel not in final or _member_kind(final[rel]) != _kind(st.st_mode)):
            _remove(os.path.join(root, rel))
    for rel, member in sorted(final.items(), key=lambda item: item[0].count("/")):
        path = os.path.join(root, rel)
        if os.path.realpath(os.path.dirname(path)) != os.path.normpath(os.path.join(root, posixpath.dirname(rel))):
            raise TransferError(f"{rel!r} would be written through a symlink; nothing after it was applied")
        st = _lstat(path)
        kind = _member_kind(member)
        if st is not None and _kind(st.st_mode) != kind:
            _remove(path)  # an entry the sandbox never saw, in the way
            st = None
        if kind == "dir":
            if st is None:
                os.mkdir(path, 0o700)
        elif kind == "link":
            if st is None or os.readlink(path) != member.linkname:
                if st is not None:
                    os.unlink(path)
                os.symlink(member.linkname, path)
        else:
            if member.islnk():  # a hard link: a copy of the file it links to
                member = final[_clean(member.linkname)]
            mode = (member.mode & 0o755) | 0o600
            if st is not None and st.st_size == member.size and _same_content(path, tar.extractfile(member)):
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(path, mode)
                continue
            temporary = os.path.join(os.path.dirname(path), f".agentloop-{uuid.uuid4().hex}.tmp")
            with open(temporary, "wb") as f:
                shutil.copyfileobj(tar.extractfile(member), f, 1 << 20)
            os.chmod(temporary, mode)
            os.utime(temporary, (member.mtime, member.mtime))
            os.replace(temporary, path)
    for rel, member in final.items():  # folder modes last, so that a read-only folder was still writable above
        if member.isdir():
            os.chmod(os.path.join(root, rel), (member.mode & 0o755) | 0o700)
