"""The operating-system sandbox of the python and shell tools: bubblewrap (`bwrap`, Debian package bubblewrap).

Each call runs in a fresh bwrap sandbox whose whole file system is:
- a read-only runtime: /usr (with /bin, /lib ... as on the host), the Python installation and virtual
  environment running agentloop, and three files of /etc (the loader cache, the time zone, alternatives);
- the workspace, as a copy on a tmpfs of `disk_mb` (the kernel refuses writes past it), at the workspace's
  own path; the copy's final state is written back to the real workspace when the call ends (transfer.py);
- a fresh /proc of its own PID namespace, a minimal /dev, and a /dev/shm of SHM_MB.
The root is read-only. It has its own PID namespace (when the call ends, everything it started is killed),
network namespace (only a loopback: no network), IPC and UTS namespaces; no capabilities, no_new_privs, no
nested user namespaces. Its processes run as an unprivileged user: this user, or `nobody` (65534) when
agentloop runs as root, because bwrap alone would map root in the sandbox to root outside (which may still
write global sysctls under /proc/sys, for one). Limits (setrlimit, inherited by everything started inside):
address space `memory_mb` per process, CPU seconds = the timeout per process, file size `disk_mb`, at most
`max_processes` processes, 1,024 open files, no core files. After the timeout the supervisor kills every
process, copies the workspace back (at most `max_files` files and folders), and the call ends.

Not confined: CPU and memory are limited per process, not as a total (no cgroups); the kernel's whole
system-call surface is reachable (no seccomp filter), so a kernel bug is a way out; the number of files
is checked only when the call ends (tmpfs has no inode limit here), so within the call a flood of empty
files costs kernel memory until the timeout; /proc shows the host's kernel, CPU and memory information.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field

from agentloop.errors import AgentloopError

from .process import CappedBuffer, ProcessOutcome, collect, feed_stdin, kill_group
from .transfer import TAR_ENTRY_BYTES, TransferError, apply_result, list_workspace, read_result, write_workspace

NOBODY = 65534
SHM_MB = 16
OPEN_FILES = 1024
SETUP_GRACE_S = 30.0  # beyond the timeout: starting the sandbox, copying the workspace in and out
INSTALL_HINT = "install bubblewrap (`apt-get install bubblewrap` on Debian and Ubuntu)"


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_mb: int
    disk_mb: int
    max_files: int
    max_processes: int
    max_output_chars: int


# Runs inside the sandbox as `python -I -S -B -c SUPERVISOR RESULT_FD`, the first process there (bwrap's init
# is pid 1). Reads a JSON header line and then the workspace as a tar stream on stdin; runs the program with
# the limits; kills whatever is left; writes a JSON status line and the workspace as a tar stream to RESULT_FD.
SUPERVISOR = r'''
import errno, json, os, resource, signal, subprocess, sys, tarfile, time

def own_everything(path):
    """Owner read/write (and search) on every entry, so that all of the workspace can be sent back."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        st = os.lstat(full)
        if os.path.isdir(full) and not os.path.islink(full):
            os.chmod(full, st.st_mode | 0o700)
            own_everything(full)
        elif not os.path.islink(full):
            os.chmod(full, st.st_mode | 0o600)

def kill_the_rest():
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(-1, signal.SIGKILL)  # every process of this user here but this one
        except ProcessLookupError:
            return
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.01)

def main():
    result = os.fdopen(int(sys.argv[1]), "wb")
    header = json.loads(sys.stdin.buffer.readline())
    if header["user"] is not None:
        uid, gid = header["user"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)  # from here on no capabilities, and no way back
    status = {"returncode": None, "problem": None}
    workspace = header["workspace"]
    try:
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:  # from agentloop: trusted
            tar.extractall(workspace, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            status["problem"] = "the workspace does not fit in the disk limit (disk_mb); remove files or raise it"
        else:
            status["problem"] = f"copying the workspace into the sandbox failed: {exc}"
        result.write(json.dumps(status).encode() + b"\n")
        return

    def limit():
        for which, value in header["limits"]:
            resource.setrlimit(which, (value, value))

    try:
        child = subprocess.Popen(header["argv"], cwd=workspace, stdin=subprocess.PIPE, preexec_fn=limit)
    except OSError as exc:
        status["problem"] = f"cannot start {header['argv'][0]}: {exc.strerror}"
    else:
        try:
            child.communicate(header["input"].encode(), timeout=header["timeout_s"])
            status["returncode"] = child.returncode
        except subprocess.TimeoutExpired:
            pass
    kill_the_rest()
    own_everything(workspace)
    result.write(json.dumps(status).encode() + b"\n")
    with tarfile.open(fileobj=result, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for folder, dirs, files in os.walk(workspace):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                full = os.path.join(folder, name)
                tar.add(full, arcname=os.path.relpath(full, workspace), recursive=False)
    result.close()

main()
'''

# As root only: creates a user namespace for the sandbox and stops it from creating more (bwrap's
# --disable-userns, which cannot be combined with --userns); the parent writes its uid and gid maps.
USERNS_HELPER = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.exit(f"unshare(CLONE_NEWUSER) failed: {os.strerror(ctypes.get_errno())}")
print("ready", flush=True)
sys.stdin.readline()
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
print("done", flush=True)
sys.stdin.readline()
'''


class SandboxError(Exception):
    """bubblewrap cannot make a sandbox on this machine."""


@functools.cache
def _root_userns() -> int:
    """An fd of a user namespace mapping root to root (so that bwrap, run as root, can build the sandbox) and
    `nobody` to `nobody` (the user the supervisor switches to before anything of the model's runs)."""
    helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", USERNS_HELPER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if helper.stdout.readline() != "ready\n":
            raise SandboxError(helper.stderr.read().strip() or "cannot create a user namespace")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(f"0 0 1\n{NOBODY} {NOBODY} 1\n")
        helper.stdin.write("\n")
        helper.stdin.flush()
        if helper.stdout.readline() != "done\n":
            raise SandboxError(helper.stderr.read().strip() or "cannot limit user namespaces")
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()


@functools.cache
def _runtime_mounts() -> tuple[str, ...]:
    """bwrap arguments for the read-only runtime: /usr and the host's layout of /bin, /lib ..., a few /etc
    files, and the Python installation (and virtual environment) running agentloop."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives"):
        args += ["--ro-bind-try", name, name]
    prefixes = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    for prefix in sorted(p for p in prefixes if not (p == "/usr" or p.startswith("/usr/"))):
        args += [*_parents(prefix), "--ro-bind", prefix, prefix]
    return tuple(args)


def _parents(path: str) -> list[str]:
    """bwrap arguments making the folders above `path` searchable by everyone (bwrap would make them 0700)."""
    args: list[str] = []
    for parent in reversed(Path(path).parents[:-1]):
        args += ["--perms", "0755", "--dir", str(parent)]
    return args


def _bwrap_argv(workspace: str, limits: Limits, result_fd: int, userns_fd: int | None) -> list[str]:
    venv_bin = os.path.join(sys.prefix, "bin")
    path = f"{venv_bin}:/usr/local/bin:/usr/bin:/bin"
    args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if userns_fd is None:
        args += ["--unshare-user", "--disable-userns"]
    else:  # the supervisor needs these two only to switch to nobody, which drops them
        args += ["--userns", str(userns_fd), "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    args += [*_runtime_mounts(), "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(SHM_MB * 2**20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             *_parents(workspace), "--perms", "0777", "--size", str(limits.disk_mb * 2**20), "--tmpfs", workspace,
             "--remount-ro", "/", "--chdir", workspace, "--clearenv"]
    for name, value in (("PATH", path), ("LANG", "C.UTF-8"), ("HOME", workspace), ("TMPDIR", workspace)):
        args += ["--setenv", name, value]
    return [*args, "--", sys.executable, "-I", "-S", "-B", "-c", SUPERVISOR, str(result_fd)]


def _rlimits(limits: Limits) -> list[tuple[int, int]]:
    import resource

    return [(resource.RLIMIT_AS, limits.memory_mb * 2**20), (resource.RLIMIT_CPU, int(limits.timeout_s) + 1),
            (resource.RLIMIT_FSIZE, limits.disk_mb * 2**20), (resource.RLIMIT_NOFILE, OPEN_FILES),
            (resource.RLIMIT_CORE, 0),
            # the supervisor and (as this user) bwrap's init count too
            (resource.RLIMIT_NPROC, limits.max_processes + 2)]


class _FileSink:
    """The sandbox's result stream, spooled to a temporary file up to `limit` bytes."""

    def __init__(self, limit: int):
        self.file, self.limit, self.total = tempfile.TemporaryFile(), limit, 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if self.total <= self.limit:
            self.file.write(data)


def run_sandboxed(argv: list[str], workspace: str, limits: Limits, stdin_text: str = "") -> ProcessOutcome:
    """Run `argv` confined to a copy of `workspace` (an absolute, real path); write its changes back."""
    if shutil.which("bwrap") is None:
        raise SandboxError(f"bubblewrap (bwrap) is not installed; {INSTALL_HINT}")
    listing = list_workspace(workspace)
    if len(listing.paths) > limits.max_files:
        return ProcessOutcome(None, "", "", f"the workspace holds {len(listing.paths)} files and folders, more "
                              f"than max_files ({limits.max_files}); remove some or raise the limit")
    if listing.nbytes > limits.disk_mb * 2**20:
        return ProcessOutcome(None, "", "", f"the workspace holds {listing.nbytes / 2**20:.1f} MB, more than "
                              f"disk_mb ({limits.disk_mb}); remove files or raise the limit")
    root = os.geteuid() == 0
    userns_fd = _root_userns() if root else None
    result_r, result_w = os.pipe()
    header = {"workspace": workspace, "argv": argv, "input": stdin_text, "timeout_s": limits.timeout_s,
              "limits": _rlimits(limits), "user": [NOBODY, NOBODY] if root else None}
    try:
        proc = subprocess.Popen(_bwrap_argv(workspace, limits, result_w, userns_fd), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                pass_fds=(result_w,) if userns_fd is None else (result_w, userns_fd))
    finally:
        os.close(result_w)
    sent: set[str] = set()

    def send(pipe) -> None:
        pipe.write(json.dumps(header).encode() + b"\n")
        sent.update(write_workspace(workspace, listing, pipe))

    writer = feed_stdin(proc.stdin, send)
    out, err = CappedBuffer(limits.max_output_chars), CappedBuffer(limits.max_output_chars)
    result = _FileSink(limits.disk_mb * 2**20 + (limits.max_files + 16) * TAR_ENTRY_BYTES + 4096)
    with result.file, os.fdopen(result_r, "rb"):  # closes the read end when done
        finished = collect(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err, result_r: result},
                           time.monotonic() + limits.timeout_s + SETUP_GRACE_S)
        kill_group(proc)
        writer.join()
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
        returncode, problem = _finish(workspace, result, finished, sent, limits, err)
    return ProcessOutcome(returncode, out.text(), err.text(), problem)


def _finish(workspace: str, result: _FileSink, finished: bool, sent: set[str], limits: Limits,
            err: CappedBuffer) -> tuple[int | None, str | None]:
    """(the program's return code, a problem) from the result stream; its workspace changes applied."""
    if not finished:
        return None, "the sandbox did not finish in time; the call's changes to the workspace were discarded"
    if result.total > result.limit:
        return None, "the sandbox sent back more than the disk limit; the call's changes were discarded"
    result.file.seek(0)
    line = result.file.readline()
    try:
        status = json.loads(line)
        returncode, problem = status["returncode"], status["problem"]
    except (ValueError, KeyError, TypeError):
        why = err.text().strip().splitlines()
        setup = next((w for w in why if w.startswith("bwrap:")), None)
        if setup:
            return None, f"the sandbox failed to start ({setup})"
        return None, ("the sandbox's supervisor stopped without reporting (killed, or see stderr); the call's "
                      "changes to the workspace were discarded")
    if problem is not None:
        return returncode, problem
    try:
        with tarfile.open(fileobj=result.file, mode="r:") as tar:
            apply_result(workspace, tar, read_result(tar, limits.max_files), sent)
    except (TransferError, tarfile.TarError) as exc:
        return returncode, f"the call's changes to the workspace were discarded: {exc}"
    return returncode, None


# --- tool settings shared by the python and shell tools -------------------------------------------------
TimeoutS = Annotated[float, Field(gt=0, le=24 * 3600, description="seconds before the call is killed")]
MemoryMB = Annotated[int, Field(ge=32, le=2**20, description="address space per process, MiB")]
DiskMB = Annotated[int, Field(ge=1, le=2**20, description="size of the workspace copy, MiB")]
MaxFiles = Annotated[int, Field(ge=1, le=10**7, description="files and folders the workspace may hold")]
MaxProcesses = Annotated[int, Field(ge=1, le=10**5, description="processes at once")]
OutputChars = Annotated[int, Field(ge=100, le=10**8, description="characters of stdout and of stderr kept")]


@functools.cache
def sandbox_problem() -> str | None:
    """None when bubblewrap can make the sandbox here (tried once per process), else why not, in a few words."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    with tempfile.TemporaryDirectory() as workspace:
        limits = Limits(timeout_s=10, memory_mb=256, disk_mb=1, max_files=10, max_processes=4, max_output_chars=400)
        try:
            outcome = run_sandboxed(["true"], os.path.realpath(workspace), limits)
        except (SandboxError, OSError) as exc:
            return f"bubblewrap cannot make a sandbox here ({exc})"
    if outcome.problem or outcome.returncode != 0:
        lines = outcome.stderr.strip().splitlines()
        why = outcome.problem or (lines[-1] if lines else f"exit code {outcome.returncode}")
        return f"bubblewrap cannot make a sandbox here ({why})"
    return None


def confinement(tool_name: str, unsafe: bool) -> None:
    """Refuse to build a tool that runs code when the sandbox does not work here, unless `unsafe`; say it loudly."""
    if unsafe:
        print(f"agentloop: WARNING: the {tool_name} tool runs model-written code UNCONFINED (unsafe: true): it can "
              "read, change and delete whatever this user can, and reach the network", file=sys.stderr)
        return
    problem = sandbox_problem()
    if problem is not None:
        raise AgentloopError(f"the {tool_name} tool runs model-written code only in a sandbox, and {problem}: "
                             f"{INSTALL_HINT}, or set `unsafe: true` in its settings to run it unconfined")
