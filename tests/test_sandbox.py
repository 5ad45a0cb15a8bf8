"""The python and shell tools' sandbox (bubblewrap): one test per escape route, each run twice: confined it is
refused, and the same probe run unconfined (`unsafe: true`) really escapes, so the test would catch it."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from agentloop.errors import AgentloopError

# isort: split
from agentloop.tools import make_python_tool, make_shell_tool, make_tools, run_tool, sandbox_problem
from agentloop.tools import sandbox as sandbox_module
from agentloop.tools.transfer import TransferError, apply_result, read_result


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace next to an `outside` folder holding secret.txt."""
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET\n")
    return workspace


def python(ws: Path, unsafe: bool = False, **settings):
    return make_python_tool(ws, timeout_s=settings.pop("timeout_s", 10), unsafe=unsafe, **settings)


def both(ws: Path, code: str, **settings):
    """The probe `code` run confined, then unconfined."""
    return run_tool(python(ws, **settings), {"code": code}), run_tool(python(ws, unsafe=True, **settings), {"code": code})


def test_the_sandbox_works_here():
    assert sandbox_problem() is None  # CI installs bubblewrap (.ci/run); without it every test below would fail


# ---- escape routes


def test_ctypes_system_cannot_write_outside(ws):
    target = ws.parent / "outside" / "pwned.txt"
    code = f"import ctypes\nrc = ctypes.CDLL(None).system(b'echo PWNED > {target}')\nprint('system returned', rc)"
    confined, unconfined = run_tool(python(ws), {"code": code}), None
    assert "system returned" in confined.content  # the probe ran, and its shell failed
    assert not target.exists()
    unconfined = run_tool(python(ws, unsafe=True), {"code": code})
    assert "system returned 0" in unconfined.content and target.read_text() == "PWNED\n"


def test_native_open_cannot_write_outside(ws):
    target = ws.parent / "outside" / "native.txt"
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"fd = libc.open(b'{target}', os.O_CREAT | os.O_WRONLY, 0o644)\nprint('fd', fd)")
    confined = run_tool(python(ws), {"code": code})
    assert "fd -1" in confined.content and not target.exists()
    unconfined = run_tool(python(ws, unsafe=True), {"code": code})
    assert "fd -1" not in unconfined.content and target.exists()


@pytest.mark.parametrize("path", ["{outside}/secret.txt", "/etc/hostname", "/etc/passwd"])
def test_reading_outside_the_workspace(ws, path):
    path = path.format(outside=ws.parent / "outside")
    if not os.path.isfile(path):
        pytest.skip(f"{path} does not exist on this machine")
    expected = Path(path).read_text()
    confined, unconfined = both(ws, f"print(open({path!r}).read(), end='')")
    assert not confined.ok and "FileNotFoundError" in confined.content
    assert unconfined.ok and unconfined.content == f"[stdout]\n{expected.rstrip()}\n[exit code 0]"


def test_listing_the_root(ws):
    code = "import os; print(sorted(os.listdir('/')))"
    confined, unconfined = both(ws, code)
    host = sorted(os.listdir("/"))
    assert unconfined.content.splitlines()[1] == str(host)
    seen = set(eval(confined.content.splitlines()[1]))
    runtime = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "usr"}
    above = {Path(p).parts[1] for p in (str(ws), sys.prefix, sys.base_prefix)}
    assert seen <= runtime | above
    assert set(host) - (runtime | above), "the host root holds nothing else: this test could not tell"
    etc = run_tool(python(ws), {"code": "import os; print(sorted(os.listdir('/etc')))"})
    assert set(eval(etc.content.splitlines()[1])) <= {"alternatives", "ld.so.cache", "localtime"}


def test_a_symlink_out_leads_nowhere(ws):
    secret, outside = ws.parent / "outside" / "secret.txt", ws.parent / "outside"
    read = f"import os\nos.symlink({str(secret)!r}, 'link.txt')\nprint(open('link.txt').read())"
    confined = run_tool(python(ws), {"code": read})
    assert "FileNotFoundError" in confined.content and "SECRET" not in confined.content
    assert os.readlink(ws / "link.txt") == str(secret)  # the link itself comes back, as a link
    assert not run_tool(make_tools(["read_file"], ws)[0], {"path": "link.txt"}).ok  # which the file tools refuse
    (ws / "link.txt").unlink()
    assert "SECRET" in run_tool(python(ws, unsafe=True), {"code": read}).content
    (ws / "link.txt").unlink()
    write = f"import os\nos.symlink({str(outside)!r}, 'linkdir')\nopen('linkdir/new.txt', 'w').write('x')"
    confined = run_tool(python(ws), {"code": write})
    assert not confined.ok and "FileNotFoundError" in confined.content and not (outside / "new.txt").exists()
    (ws / "linkdir").unlink()
    unconfined = run_tool(python(ws, unsafe=True), {"code": write})
    assert unconfined.ok and (outside / "new.txt").read_text() == "x"


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("how", ["subprocess.Popen(['setsid', 'sleep', SECONDS])",
                                 "ctypes.CDLL(None).system(('setsid sleep ' + SECONDS + ' &').encode())",
                                 "os.fork() or (os.setsid(), os.execvp('sleep', ['sleep', SECONDS]))"])
def test_nothing_outlives_the_call(ws, how):
    seconds = f"{1000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6}"
    code = f"import ctypes, os, subprocess\nSECONDS = {seconds!r}\n{how}\nimport time; time.sleep(0.3)\nprint('started')"
    confined = run_tool(python(ws, timeout_s=2), {"code": code})
    assert "started" in confined.content
    time.sleep(0.2)
    assert _processes_with(f"sleep\0{seconds}") == []
    unconfined = run_tool(python(ws, unsafe=True, timeout_s=2), {"code": code})  # the survivor holds its stdout
    assert "started" in unconfined.content
    survivors = _processes_with(f"sleep\0{seconds}")
    for pid in survivors:
        os.kill(pid, 9)
    assert survivors, "the unconfined probe left nothing running: this test could not tell"


def test_the_disk_quota_holds_across_files(ws):
    code = ("written = 0\nfor i in range(4):\n    with open(f'part{i}', 'wb') as f:\n        f.write(b'x' * 4 * 2**20)\n"
            "    written += 4\n    print(written, flush=True)")
    confined = run_tool(python(ws, disk_mb=8), {"code": code})
    assert not confined.ok and "No space left on device" in confined.content
    assert sum(f.stat().st_size for f in ws.iterdir()) <= 8 * 2**20
    for f in ws.iterdir():
        f.unlink()
    unconfined = run_tool(python(ws, unsafe=True, disk_mb=8), {"code": code})
    assert unconfined.ok and sum(f.stat().st_size for f in ws.iterdir()) == 16 * 2**20


def test_a_workspace_over_the_quota_is_refused_before_running(ws):
    (ws / "big").write_bytes(b"x" * 3 * 2**20)
    result = run_tool(python(ws, disk_mb=2), {"code": "print('ran')"})
    assert not result.ok and "more than disk_mb (2)" in result.error and "ran" not in result.content
    (ws / "big").unlink()
    for i in range(6):
        (ws / f"f{i}").touch()
    result = run_tool(python(ws, max_files=5), {"code": "print('ran')"})
    assert not result.ok and "more than max_files (5)" in result.error


def test_too_many_files_are_not_copied_back(ws):
    result = run_tool(python(ws, max_files=50), {"code": "for i in range(80): open(f'f{i}', 'w')"})
    assert not result.ok and "more than 50 files" in result.error
    assert list(ws.iterdir()) == []


def test_no_network(ws):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')"
        confined = run_tool(python(ws), {"code": code})
        assert not confined.ok and "ConnectionRefusedError" in confined.content  # its own loopback, empty
        with pytest.raises(socket.timeout):
            listener.accept()
        unconfined = run_tool(python(ws, unsafe=True), {"code": code})
        assert "connected" in unconfined.content
        listener.accept()[0].close()
    outside = run_tool(python(ws), {"code": "import socket; socket.create_connection(('192.0.2.1', 80), timeout=3)"})
    assert "Network is unreachable" in outside.content


def test_proc_shows_only_the_sandbox(ws):
    me = os.getpid()
    code = f"import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))\n" \
           f"print(os.path.exists('/proc/{me}/cmdline') and b'pytest' in open('/proc/{me}/cmdline', 'rb').read())"
    confined, unconfined = both(ws, code)
    count, sees_me = confined.content.splitlines()[1:3]
    assert int(count) <= 4 and sees_me == "False"  # bwrap's init, the supervisor, the interpreter
    assert unconfined.content.splitlines()[2] == "True"


def test_runs_unprivileged_and_cannot_write_kernel_settings(ws):
    code = "import os\nprint(os.getuid(), os.access('/proc/sys/vm/swappiness', os.W_OK))"
    confined = run_tool(python(ws), {"code": code})
    uid, writable = confined.content.splitlines()[1].split()
    assert uid != "0" and writable == "False"
    if os.geteuid() == 0:  # what bwrap alone does as root: host root in the sandbox, global sysctls writable
        plain = subprocess.run(["bwrap", "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "--proc", "/proc",
                                "--", "sh", "-c", "test -w /proc/sys/vm/swappiness && echo writable"],
                               capture_output=True, text=True)
        assert plain.stdout.strip() == "writable"


def test_no_new_user_namespaces_and_no_capabilities(ws):
    code = ("import subprocess\nprint(subprocess.run(['unshare', '--user', 'true']).returncode)\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))])")
    confined = run_tool(python(ws), {"code": code})
    lines = confined.content.splitlines()
    assert lines[1] != "0" and lines[2] == "['0000000000000000', '0000000000000000', '1']"


# ---- behaviour inside


def test_python_runs_code_and_the_workspace_keeps_its_changes(ws):
    (ws / "old.txt").write_text("old")
    (ws / "gone.txt").write_text("bye")
    (ws / "keep").mkdir()
    (ws / "keep" / "same.txt").write_text("same")
    before = (ws / "keep" / "same.txt").stat().st_mtime_ns
    py = python(ws)
    result = run_tool(py, {"code": "import sys\nprint('hi')\nprint('warn', file=sys.stderr)"})
    assert result.ok and result.content == "[stdout]\nhi\n[stderr]\nwarn\n[exit code 0]"
    code = ("import os\nopen('old.txt', 'a').write('+new')\nos.remove('gone.txt')\nos.makedirs('a/b')\n"
            "open('a/b/c.txt', 'w').write('deep')\nos.symlink('a/b/c.txt', 'rel-link')\nprint(os.getcwd())")
    result = run_tool(py, {"code": code})
    assert result.ok and result.content.splitlines()[1] == os.path.realpath(ws)
    assert (ws / "old.txt").read_text() == "old+new" and not (ws / "gone.txt").exists()
    assert (ws / "a/b/c.txt").read_text() == "deep" and os.readlink(ws / "rel-link") == "a/b/c.txt"
    assert (ws / "keep" / "same.txt").stat().st_mtime_ns == before  # unchanged files are not rewritten
    failed = run_tool(py, {"code": "print('before')\nraise SystemExit(3)"})
    assert not failed.ok and failed.error == "exit code 3" and "before" in failed.content
    crash = run_tool(py, {"code": "x = 1\n1 / x - 1 / 0"})
    assert "ZeroDivisionError" in crash.content and 'File "<code>", line 2' in crash.content
    assert run_tool(py, {"code": "import subprocess; print(subprocess.run(['ls'], capture_output=True, text=True)"
                                 ".stdout)"}).content.count("old.txt") == 1  # processes are allowed, confined


def test_python_is_killed_at_timeout_and_keeps_what_it_wrote(ws):
    py = python(ws, timeout_s=1)
    start = time.perf_counter()
    result = run_tool(py, {"code": "open('partial.txt', 'w').write('so far')\nprint('working', flush=True)\n"
                                   "while True:\n    pass"})
    assert time.perf_counter() - start < 8
    assert not result.ok and result.error == "timed out after 1 s" and "working" in result.content
    assert (ws / "partial.txt").read_text() == "so far"


def test_killing_the_supervisor_discards_the_call(ws):
    code = "open('new.txt', 'w').write('x')\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)"
    result = run_tool(python(ws), {"code": code})
    assert not result.ok and "discarded" in result.error
    assert not (ws / "new.txt").exists()


def test_python_memory_limit(ws):
    result = run_tool(python(ws, memory_mb=256), {"code": "b = bytearray(2 * 1024**3)\nprint('allocated')"})
    assert not result.ok and "MemoryError" in result.content and "allocated" not in result.content


def test_process_limit(ws):
    code = ("import subprocess\nprocs = []\ntry:\n    for i in range(40):\n"
            "        procs.append(subprocess.Popen(['sleep', '5']))\n"
            "except OSError as exc:\n    print('stopped at', len(procs), exc)")
    result = run_tool(python(ws, max_processes=8), {"code": code})
    assert "stopped at" in result.content
    assert int(result.content.split("stopped at ")[1].split()[0]) <= 8


def test_python_huge_output_is_cut(ws):
    result = run_tool(python(ws, max_output_chars=1000), {"code": "print('x' * 100_000)\nprint('tail')"})
    assert result.ok and "bytes cut" in result.content and "tail" in result.content
    assert len(result.content) < 1200


# ---- refusing to run unconfined, settings


def test_without_bubblewrap_the_tools_refuse_unless_unsafe(ws, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(ws))  # no bwrap on it
    sandbox_module.sandbox_problem.cache_clear()
    try:
        with pytest.raises(AgentloopError) as info:
            python(ws)
        message = str(info.value)
        assert "\n" not in message and "bubblewrap (bwrap) is not installed" in message and "unsafe: true" in message
        with pytest.raises(AgentloopError, match="bubblewrap"):
            make_shell_tool(ws, enabled=True)
        py = python(ws, unsafe=True)
        assert "UNCONFINED" in capsys.readouterr().err
        assert run_tool(py, {"code": "print(6 * 7)"}).content.startswith("[stdout]\n42")
    finally:
        monkeypatch.undo()
        sandbox_module.sandbox_problem.cache_clear()


# ---- shell tool


def test_shell_is_off_unless_enabled(ws):
    with pytest.raises(AgentloopError, match="enabled: true"):
        make_tools(["shell"], ws)
    with pytest.raises(AgentloopError, match="enabled: true"):
        make_shell_tool(ws)


def test_shell_runs_allowlisted_programs_only(ws):
    (ws / "keep.txt").write_text("alpha\nbeta|gamma\n")
    shell = make_tools(["shell"], ws, {"shell": {"enabled": True}})[0]
    listing = run_tool(shell, {"command": "ls"})
    assert listing.ok and "keep.txt" in listing.content
    assert run_tool(shell, {"command": "grep -n 'beta|gamma' keep.txt"}).content.startswith("[stdout]\n2:beta|gamma")
    for command, why in [("rm keep.txt", "not allowed"), ("/bin/rm keep.txt", "not allowed"),
                         ("ls; rm keep.txt", "one command at a time"), ("cat keep.txt | rm", "one command at a time"),
                         ("ls && rm keep.txt", "one command at a time"), ("echo hi > made.txt", "one command"),
                         ("echo $(rm keep.txt)", "$(...)"), ("echo `rm keep.txt`", "backticks"), ("", "empty"),
                         ("echo 'unclosed", "cannot split")]:
        result = run_tool(shell, {"command": command})
        assert not result.ok and why in result.error, command
    assert (ws / "keep.txt").exists() and not (ws / "made.txt").exists()
    failed = run_tool(shell, {"command": "cat missing.txt"})
    assert not failed.ok and failed.error == "exit code 1" and "No such file" in failed.content


@pytest.mark.parametrize("command", ["ls /", "wc ../outside/secret.txt", "cat /etc/hostname", "ls linkdir",
                                     "cat linkdir/secret.txt", "grep --file=/etc/passwd keep.txt", "ls ~",
                                     "cat sub/../../outside/secret.txt"])
def test_shell_arguments_outside_the_workspace_are_refused(ws, command):
    (ws / "linkdir").symlink_to(ws.parent / "outside", target_is_directory=True)
    (ws / "keep.txt").write_text("x\n")
    result = run_tool(make_shell_tool(ws, enabled=True), {"command": command})
    assert not result.ok and "outside the workspace" in result.error and "SECRET" not in result.content


def test_shell_sandbox_holds_where_the_argument_check_cannot_see(ws):
    (ws / "linkdir").symlink_to(ws.parent / "outside", target_is_directory=True)
    command = {"command": "grep -R SECRET ."}  # -R follows the link; no argument names it
    confined = run_tool(make_shell_tool(ws, enabled=True), command)
    assert "SECRET" not in confined.content
    unconfined = run_tool(make_shell_tool(ws, enabled=True, unsafe=True), command)
    assert "linkdir/secret.txt:SECRET" in unconfined.content
    probe = {"command": "cat -v/etc/passwd"}  # an option glued to a path: not seen by the check either
    assert "root:" not in run_tool(make_shell_tool(ws, enabled=True, allow=["cat"]), probe).content


def test_shell_allowlist_is_configurable(ws):
    shell = make_shell_tool(ws, enabled=True, allow=["echo"])
    assert run_tool(shell, {"command": "echo hello"}).content == "[stdout]\nhello\n[exit code 0]"
    assert "allowed: echo" in run_tool(shell, {"command": "ls"}).error
    assert "echo" in shell.description


# ---- the result stream from the sandbox is untrusted


def _tar(*members: tuple[str, str, bytes | str]) -> tarfile.TarFile:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            else:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if kind == "file" else None)
    data.seek(0)
    return tarfile.open(fileobj=data, mode="r:")


@pytest.mark.parametrize("members,why", [
    ([("../escape.txt", "file", b"x")], "outside the workspace"),
    ([("/tmp/escape.txt", "file", b"x")], "outside the workspace"),
    ([("a/../../escape.txt", "file", b"x")], "outside the workspace"),
    ([("link", "sym", "/"), ("link/escape.txt", "file", b"x")], "without its folder"),
    ([("nofolder/x.txt", "file", b"x")], "without its folder"),
    ([("h", "hard", "/etc/passwd")], "outside the workspace"),
    ([("d", "dir", b""), ("h", "hard", "d")], "hard link"),
])
def test_a_crafted_result_is_refused(ws, members, why):
    with pytest.raises(TransferError, match=why):
        read_result(_tar(*members), max_files=100)


def test_a_result_is_never_written_through_a_symlink_of_the_workspace(ws):
    outside = ws.parent / "outside"
    (ws / "sub").symlink_to(outside, target_is_directory=True)  # appeared after the sandbox was filled
    tar = _tar(("sub", "dir", b""), ("sub/new.txt", "file", b"x"))
    final = read_result(tar, max_files=100)
    apply_result(str(ws), tar, final, sent=set())
    assert not (outside / "new.txt").exists() and (ws / "sub" / "new.txt").read_bytes() == b"x"
    assert not (ws / "sub").is_symlink()
