"""Tools: schema generation, the runner's error handling, workspace confinement, the python sandbox, shell."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from agentloop.errors import AgentloopError

# isort: split
# (ruff files agentloop.tools, which lives in tools/, under third-party; this keeps it with agentloop.)
from agentloop.tools import (
    BUILTIN_TOOLS,
    ToolBox,
    function_tool,
    make_list_dir,
    make_python_tool,
    make_read_file,
    make_search_files,
    make_shell_tool,
    make_tools,
    make_write_file,
    netns_prefix,
    run_tool,
    tool,
)
from agentloop.tools.process import run_process

# ---- schema and runner


def test_schema_from_type_hints_and_docstring():
    def find(query: str, limit: int = 5, scale: float | None = None, exact: bool = False,
             tags: list[str] | None = None, extra: dict | None = None, mode: Literal["fast", "slow"] = "fast") -> str:
        """Find things.

        Args:
            query: what to look for
            limit: most results
        """
        return query

    schema = function_tool(find).schema()
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "find" and fn["description"] == "Find things."
    props = fn["parameters"]["properties"]
    assert fn["parameters"]["required"] == ["query"]
    assert props["query"] == {"type": "string", "description": "what to look for"}
    assert props["limit"] == {"type": "integer", "description": "most results", "default": 5}
    assert props["scale"] == {"type": "number"}
    assert props["exact"]["type"] == "boolean"
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["extra"] == {"type": "object"}
    assert props["mode"]["enum"] == ["fast", "slow"] and props["mode"]["type"] == "string"


class RepeatArgs(BaseModel):
    path: str
    count: int = 1


def test_schema_from_pydantic_model_parameter():
    @tool(name="repeat", description="Repeat a path.")
    def repeat(args: RepeatArgs) -> str:
        return args.path * args.count

    params = repeat.schema()["function"]["parameters"]
    assert params["required"] == ["path"] and set(params["properties"]) == {"path", "count"}
    assert "title" not in params
    assert run_tool(repeat, {"path": "ab", "count": 2}).content == "abab"
    assert repeat(RepeatArgs(path="x")) == "x"  # a Tool stays callable


def test_unsupported_hint_is_a_clear_error():
    def bad(items: set[int]) -> None:
        """Bad."""

    with pytest.raises(AgentloopError, match="items"):
        function_tool(bad)


@tool
def add(a: int, b: int = 0) -> int:
    """Add two numbers."""
    return a + b


@pytest.mark.parametrize(("arguments", "expected"), [
    ({}, "missing required argument 'a'"),
    ({"a": 1, "c": 2}, "unexpected argument 'c'"),
    ({"a": "one"}, "argument 'a': Input should be a valid integer"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_arguments_become_errors(arguments, expected):
    result = run_tool(add, arguments)
    assert not result.ok and expected in result.error and result.content == result.error
    assert result.tool == "add"


def test_good_call_and_json_output():
    assert run_tool(add, {"a": 2, "b": "3"}).content == "5"  # lax: "3" -> 3
    data = function_tool(lambda: {"k": [1, 2]}, name="data", description="d")
    assert run_tool(data, {}).content == '{"k": [1, 2]}'


def test_raising_tool_reports_type_and_message_without_traceback():
    def explode(x: str) -> str:
        """Explode."""
        raise ValueError(f"bad {x}")

    result = run_tool(function_tool(explode), {"x": "input"})
    assert not result.ok
    assert result.error == "explode failed: ValueError: bad input"
    assert "Traceback" not in result.content


def test_hanging_tool_times_out():
    release = threading.Event()

    def hang() -> str:
        """Hang."""
        release.wait(30)
        return "late"

    start = time.perf_counter()
    result = run_tool(function_tool(hang), {}, timeout_s=0.5)
    elapsed = time.perf_counter() - start
    release.set()
    assert not result.ok and result.error == "hang timed out after 0.5 s"
    assert elapsed < 1.5


def _flaky(failures: int, retry_safe: bool, exc: type[BaseException] = OSError):
    calls = []

    def flaky() -> str:
        """Flaky."""
        calls.append(1)
        if len(calls) <= failures:
            raise exc("transient")
        return "fine"

    return function_tool(flaky, retry_safe=retry_safe), calls


def test_retry_safe_tool_is_retried_on_transient_errors():
    flaky, calls = _flaky(2, retry_safe=True)
    result = run_tool(flaky, {})
    assert result.ok and result.content == "fine" and len(calls) == 3


def test_other_tools_and_permanent_errors_are_not_retried():
    flaky, calls = _flaky(2, retry_safe=False)
    result = run_tool(flaky, {})
    assert not result.ok and result.error == "flaky failed: OSError: transient" and len(calls) == 1
    flaky, calls = _flaky(2, retry_safe=True, exc=FileNotFoundError)
    assert not run_tool(flaky, {}).ok and len(calls) == 1
    flaky, calls = _flaky(5, retry_safe=True, exc=ConnectionError)
    assert not run_tool(flaky, {}).ok and len(calls) == 3


def test_long_output_is_truncated_with_a_note():
    big = function_tool(lambda: "a" * 6000 + "END", name="big", description="b")
    result = run_tool(big, {}, max_output_chars=1000)
    assert result.ok and result.truncated
    assert "[... 5003 characters cut ...]" in result.content
    assert result.content.endswith("END") and len(result.content) < 1100
    assert not run_tool(big, {}, max_output_chars=10_000).truncated


def test_toolbox_unknown_name_lists_tools_and_rejects_duplicates():
    box = ToolBox([add])
    result = box.call("subtract", {})
    assert not result.ok and "unknown tool 'subtract'" in result.error and "add" in result.error
    assert box.call("add", {"a": 1}).content == "1"
    assert box.schemas() == [add.schema()]
    with pytest.raises(AgentloopError, match="unique"):
        ToolBox([add, add])


# ---- workspace file tools


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace next to an `outside` folder holding secret.txt; links inside point out."""
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET\n")
    (workspace / "link.txt").symlink_to(outside / "secret.txt")
    (workspace / "linkdir").symlink_to(outside, target_is_directory=True)
    return workspace


def _box(ws: Path) -> ToolBox:
    return ToolBox([make_read_file(ws), make_write_file(ws), make_list_dir(ws), make_search_files(ws, max_matches=3)])


@pytest.mark.parametrize("path", ["../outside/secret.txt", "/etc/passwd", "link.txt", "linkdir/secret.txt",
                                  "sub/../../outside/secret.txt"])
def test_read_outside_workspace_is_refused(ws, path):
    result = _box(ws).call("read_file", {"path": path})
    assert not result.ok and "outside the workspace" in result.error and "SECRET" not in result.content


@pytest.mark.parametrize("path", ["../outside/new.txt", "link.txt", "linkdir/new.txt", "linkdir/deeper/new.txt",
                                  "{outside}/new.txt"])
def test_write_outside_workspace_is_refused(ws, path):
    outside = ws.parent / "outside"
    result = _box(ws).call("write_file", {"path": path.format(outside=outside), "content": "pwned"})
    assert not result.ok and "outside the workspace" in result.error
    assert (outside / "secret.txt").read_text() == "SECRET\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_list_dir_refuses_symlinked_folder_and_lists_own(ws):
    box = _box(ws)
    assert not box.call("list_dir", {"path": "linkdir"}).ok
    assert box.call("write_file", {"path": "a/b/c.txt", "content": "x"}).ok
    listing = box.call("list_dir", {}).content.splitlines()
    assert "a/" in listing and "link.txt" in listing
    assert box.call("list_dir", {"path": "a/b"}).content == "c.txt"


def test_nested_write_and_read_ranges(ws):
    box = _box(ws)
    text = "".join(f"line {i}\n" for i in range(1, 6))
    assert box.call("write_file", {"path": "src/pkg/mod.py", "content": text}).ok
    assert (ws / "src/pkg/mod.py").read_text() == text
    assert box.call("read_file", {"path": "src/pkg/mod.py"}).content == text
    assert box.call("read_file", {"path": "src/pkg/mod.py", "start_line": 2, "end_line": 3}).content == "line 2\nline 3\n"
    assert box.call("read_file", {"path": "./src/pkg/mod.py", "start_line": 5}).content == "line 5\n"
    assert "no lines" in box.call("read_file", {"path": "src/pkg/mod.py", "start_line": 9}).content
    missing = box.call("read_file", {"path": "nope.txt"})
    assert not missing.ok and "FileNotFoundError" in missing.error


def test_search_files(ws):
    box = _box(ws)
    (ws / "a.py").write_text("def alpha():\n    return 1\n")
    (ws / "b.txt").write_text("alphabet\nbeta\n")
    found = box.call("search_files", {"pattern": r"alph\w+"}).content.splitlines()
    assert found == ["a.py:1: def alpha():", "b.txt:1: alphabet"]
    assert box.call("search_files", {"pattern": "alpha", "glob": "*.py"}).content == "a.py:1: def alpha():"
    assert box.call("search_files", {"pattern": "SECRET"}).content == "no matches"  # links out are skipped
    (ws / "many.txt").write_text("hit\n" * 10)
    capped = box.call("search_files", {"pattern": "hit"}).content
    assert capped.count("many.txt:") == 3 and "stopped at 3 matches" in capped
    bad = box.call("search_files", {"pattern": "("})
    assert not bad.ok and "error" in bad.error
    assert not box.call("search_files", {"pattern": "x", "path": "../outside"}).ok


# ---- python tool


@pytest.fixture
def py(ws):
    return make_python_tool(ws, timeout_s=5, memory_mb=512, network_namespace=False)


def test_python_runs_code(ws, py):
    result = run_tool(py, {"code": "import sys\nprint('hi')\nprint('warn', file=sys.stderr)"})
    assert result.ok and result.content == "[stdout]\nhi\n[stderr]\nwarn\n[exit code 0]"
    failed = run_tool(py, {"code": "print('before')\nraise SystemExit(3)"})
    assert not failed.ok and failed.error == "exit code 3" and "before" in failed.content
    crash = run_tool(py, {"code": "x = 1\n1 / x - 1 / 0"})
    assert "ZeroDivisionError" in crash.content and 'File "<code>", line 2' in crash.content
    assert run_tool(py, {"code": "open('made.txt', 'w').write('ok')"}).ok
    assert (ws / "made.txt").read_text() == "ok"
    assert run_tool(py, {"code": "import os; print(os.getcwd())"}).content.splitlines()[1] == os.path.realpath(ws)


@pytest.mark.parametrize("snippet", [
    "open(TARGET, 'w').write('x')",
    "open(TARGET, 'a').write('x')",
    "import pathlib; pathlib.Path(TARGET).write_text('x')",
    "import os; os.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
    "import os; os.mkdir(TARGET)",
    "import shutil; shutil.copy('inside.txt', TARGET)",
    "import os; os.rename('inside.txt', TARGET)",
    "import os; os.chdir(os.path.dirname(TARGET)); open(os.path.basename(TARGET), 'w')",
    "open('linkdir/' + os.path.basename(TARGET), 'w')",
    "os.system('touch ' + TARGET)",
    "import subprocess; subprocess.run(['touch', TARGET])",
])
def test_python_cannot_write_outside_workspace(ws, py, snippet):
    target = ws.parent / "outside" / "pwned.txt"
    (ws / "inside.txt").write_text("x")
    result = run_tool(py, {"code": f"import os\nTARGET = {str(target)!r}\n{snippet}"})
    assert not result.ok and "PermissionError: sandbox" in result.content
    assert not target.exists()
    assert (ws / "inside.txt").exists()


def test_python_cannot_delete_outside_workspace(ws, py):
    outside = ws.parent / "outside"
    for code in ("import shutil; shutil.rmtree(TARGET)", "import os; os.remove(TARGET + '/secret.txt')"):
        result = run_tool(py, {"code": f"TARGET = {str(outside)!r}\n{code}"})
        assert not result.ok and "PermissionError" in result.content
    assert (outside / "secret.txt").read_text() == "SECRET\n"


@pytest.mark.parametrize("namespace", [False, True])
def test_python_cannot_open_a_socket(ws, namespace):
    py = make_python_tool(ws, timeout_s=5, network_namespace=namespace)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
        result = run_tool(py, {"code": code})
        assert not result.ok and "network access is not allowed" in result.content
        assert "connected" not in result.content
        with pytest.raises(socket.timeout):
            listener.accept()
    lookup = run_tool(py, {"code": "import socket; socket.getaddrinfo('localhost', 80)"})
    assert not lookup.ok and "PermissionError" in lookup.content


def test_network_namespace_blocks_even_without_the_hook(ws):
    if not netns_prefix():
        pytest.skip("unshare --user --net does not work here")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        code = f"import socket; socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2)"
        outcome = run_process([sys.executable, "-I", "-c", code], cwd=str(ws), timeout_s=10, max_chars=2000)
        assert outcome.returncode != 0 and "Error" in outcome.stderr
        with pytest.raises(socket.timeout):
            listener.accept()


def test_python_is_killed_at_timeout(ws):
    py = make_python_tool(ws, timeout_s=1, network_namespace=True)
    start = time.perf_counter()
    result = run_tool(py, {"code": "import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass"})
    assert time.perf_counter() - start < 5
    assert not result.ok and result.error == "timed out after 1 s"
    pid = int(result.content.splitlines()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_python_memory_limit(ws):
    py = make_python_tool(ws, memory_mb=256, network_namespace=False)
    result = run_tool(py, {"code": "b = bytearray(2 * 1024**3)\nprint('allocated')"})
    assert not result.ok and "MemoryError" in result.content and "allocated" not in result.content


def test_python_huge_output_is_cut(ws):
    py = make_python_tool(ws, max_output_chars=1000, network_namespace=False)
    result = run_tool(py, {"code": "print('x' * 100_000)\nprint('tail')"})
    assert result.ok and "bytes cut" in result.content and "tail" in result.content
    assert len(result.content) < 1200


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
                         ("echo $(rm keep.txt)", "$(...)"), ("echo `rm keep.txt`", "backticks"), ("", "empty")]:
        result = run_tool(shell, {"command": command})
        assert not result.ok and why in result.error, command
    assert (ws / "keep.txt").exists() and not (ws / "made.txt").exists()
    failed = run_tool(shell, {"command": "cat missing.txt"})
    assert not failed.ok and failed.error == "exit code 1" and "No such file" in failed.content


def test_shell_allowlist_is_configurable(ws):
    shell = make_shell_tool(ws, enabled=True, allow=["echo"])
    assert run_tool(shell, {"command": "echo hello"}).content == "[stdout]\nhello\n[exit code 0]"
    assert "allowed: echo" in run_tool(shell, {"command": "ls"}).error
    assert "echo" in shell.description


# ---- built-in registry


def test_make_tools_builds_by_name(ws):
    tools = make_tools(["read_file", "python"], ws, {"python": {"timeout_s": 2, "memory_mb": 300}})
    assert [t.name for t in tools] == ["read_file", "python"]
    assert tools[1].timeout_s == 12  # the runner's backstop: child timeout + 10 s
    assert set(BUILTIN_TOOLS) >= {"read_file", "write_file", "list_dir", "search_files", "python", "shell"}
    for t in make_tools(["read_file", "write_file", "list_dir", "search_files", "python"], ws):
        assert len(t.description) < 100


@pytest.mark.parametrize(("names", "settings", "message"), [
    (["read_fil"], None, "unknown tool 'read_fil'; built-in tools are: read_file"),
    (["python"], {"python": {"timeout": 3}}, "unknown setting 'timeout' for tool python; valid settings: timeout_s"),
    (["python"], {"python": {"memory_mb": "lots"}}, "setting 'memory_mb'"),
    (["python"], {"shell": {"enabled": True}}, "not in the tool list"),
    (["python", "python"], None, "listed twice"),
    (["python"], {"python": 5}, "must be a mapping"),
])
def test_make_tools_errors(ws, names, settings, message):
    with pytest.raises(AgentloopError, match=message.replace("(", r"\(").replace("$", r"\$")):
        make_tools(names, ws, settings)


def test_make_tools_needs_a_workspace(tmp_path):
    with pytest.raises(AgentloopError, match="not a directory"):
        make_tools(["read_file"], tmp_path / "missing")
