"""Tools: schema generation, the runner's error handling, workspace confinement, the python sandbox, shell."""

from __future__ import annotations

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
    make_read_file,
    make_search_files,
    make_tools,
    make_write_file,
    run_tool,
    tool,
)

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


# ---- built-in registry


def test_make_tools_builds_by_name(ws):
    tools = make_tools(["read_file", "python"], ws, {"python": {"timeout_s": 2, "memory_mb": 300}})
    assert [t.name for t in tools] == ["read_file", "python"]
    assert tools[1].timeout_s == 42  # the runner's backstop: child timeout + the sandbox's setup grace + 10 s
    assert set(BUILTIN_TOOLS) >= {"read_file", "write_file", "list_dir", "search_files", "python", "shell"}
    for t in make_tools(["read_file", "write_file", "list_dir", "search_files", "python"], ws):
        assert len(t.description) < 100


@pytest.mark.parametrize(("names", "settings", "message"), [
    (["read_fil"], None, "unknown tool 'read_fil'; built-in tools are: read_file"),
    (["python"], {"python": {"timeout": 3}}, "unknown setting 'timeout' for tool python; valid settings: timeout_s"),
    (["python"], {"python": {"memory_mb": "lots"}}, "setting 'memory_mb'"),
    (["python"], {"python": {"timeout_s": -1}}, "setting 'timeout_s': Input should be greater than 0"),
    (["python"], {"python": {"timeout_s": 0}}, "setting 'timeout_s': Input should be greater than 0"),
    (["python"], {"python": {"timeout_s": float("inf")}}, "setting 'timeout_s'"),
    (["python"], {"python": {"memory_mb": -1}}, "setting 'memory_mb': Input should be greater than or equal to 32"),
    (["python"], {"python": {"max_output_chars": -1}}, "setting 'max_output_chars'"),
    (["python"], {"python": {"disk_mb": 0}}, "setting 'disk_mb'"),
    (["python"], {"python": {"max_files": 0}}, "setting 'max_files'"),
    (["python"], {"python": {"max_processes": -3}}, "setting 'max_processes'"),
    (["python"], {"python": {"unsafe": "sometimes"}}, "setting 'unsafe'"),
    (["shell"], {"shell": {"enabled": True, "timeout_s": 0}}, "tool shell setting 'timeout_s'"),
    (["shell"], {"shell": {"enabled": True, "allow": ["/bin/rm"]}}, "bare name"),
    (["search_files"], {"search_files": {"max_matches": 0}}, "setting 'max_matches'"),
    (["read_file"], {"read_file": {"encoding": "latin-1"}}, "unknown setting 'encoding' for tool read_file"),
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


def test_a_workspace_holding_home_the_current_folder_or_agentloop_is_refused(tmp_path, monkeypatch):
    home, project = tmp_path / "home", tmp_path / "home" / "project"
    project.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    import agentloop

    for workspace, what in [("/", "the whole file system"), (home, "your home folder"), (tmp_path, "your home folder"),
                            (project.parent, "your home folder"), (Path(agentloop.__file__).parent.parent, "agentloop")]:
        with pytest.raises(AgentloopError, match="too broad") as info:
            make_tools(["read_file"], workspace)
        assert what in str(info.value) and "allow_broad_workspace: true" in str(info.value)
        assert make_tools(["read_file"], workspace, allow_broad_workspace=True)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    with pytest.raises(AgentloopError, match="the current folder"):
        make_tools(["read_file"], project.parent)
    assert make_tools(["read_file"], project)  # the current folder itself is fine
    assert make_tools(["read_file"], project / ".")
