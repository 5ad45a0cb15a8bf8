"""task.yaml: the agent fields, their validation, and errors that name the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agentloop.errors import AgentloopError
from agentloop.task import load_task, validate_task

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def error(data: dict) -> str:
    with pytest.raises(AgentloopError) as info:
        validate_task(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tools_as_a_list_or_a_mapping_of_settings():
    assert validate_task({"task": "x", "tools": ["read_file", "python"]}).tools == {"read_file": {}, "python": {}}
    spec = validate_task({"task": "x", "tools": {"python": {"timeout_s": 5}, "read_file": None}})
    assert spec.tools == {"python": {"timeout_s": 5}, "read_file": {}}


@pytest.mark.parametrize("data,needles", [
    ({"task": "x", "tools": ["read_file", "browser"]}, ["field `tools`", "'browser'", "read_file, write_file"]),
    ({"task": "x", "tools": ["python", "python"]}, ["listed twice"]),
    ({"task": "x", "tools": "python"}, ["list of tool names"]),
    ({"prompt": "x", "tools": ["python"]}, ["raw `prompt`"]),
    ({"task": "x", "messages": [{"role": "user", "content": "y"}]}, ["exactly one of"]),
    ({"system": "s", "prompt": "y"}, ["`system` goes with `task`"]),
    ({"task": "x", "max_steps": 0}, ["field `max_steps`"]),
    ({"task": "x", "memory": {"policy": "streaming", "ratio": 0.5}}, ["field `memory.ratio`", "am, h2o, snapkv"]),
    ({"task": "x", "memory": {"policy": "am", "ratio": 1.5}}, ["field `memory.ratio`"]),
    ({"task": "x", "memory": {"policy": "am", "prompt_share": 1}}, ["field `memory.prompt_share`"]),
    ({"task": "x", "memory": {"policy": "truncate", "prompt_share": 0.5}}, ["memory.prompt_share", "am, h2o, snapkv"]),
    ({"task": "x", "memory": {"ingest": {"ratio": 0}}}, ["field `memory.ingest.ratio`"]),
    ({"task": "x", "memory": {"ingest": {"method": "magic"}}}, ["memory.ingest.method", "am-hak-fast"]),
    ({"task": "x", "memory": {"ingest": {"trigger": 10}}}, ["unknown field `memory.ingest.trigger`"]),
    ({"task": "x", "memory": {"ingest": {"per_tool": {"read_file": {"keep": 3}}}}},
     ["memory.ingest.per_tool.read_file.keep"]),
    ({"task": "x", "memory": {"ingest": {"trigger_tokens": 20, "keep_first": 16}}}, ["trigger_tokens (20)"]),
    ({"task": "x", "memory": {"ingest": {"per_tool": {"read_file": {"trigger_tokens": 8}}}}},
     ["per_tool.read_file.trigger_tokens (8)"]),
])
def test_bad_agent_fields_name_the_field(data, needles):
    message = error(data)
    for needle in needles:
        assert needle in message, message


def test_policy_shortcuts_fold_into_the_policy_options():
    memory = validate_task({"task": "x", "memory": {"policy": "am", "ratio": 0.3, "pin_prompt": True, "prompt_share": 0.5,
                                                    "options": {"ratio": 0.9, "method": "am-hak"}}}).memory
    assert memory.policy_options() == {"ratio": 0.3, "pin_prompt": True, "prompt_share": 0.5, "method": "am-hak"}


def test_ingestion_settings_per_tool():
    ingest = validate_task({"task": "x", "memory": {"ingest": {
        "ratio": 0.2, "exclude": ["write_file"], "per_tool": {"read_file": {"ratio": 0.05, "keep_last": 4}}}}}).memory.ingest
    assert ingest.for_tool("write_file") is None
    assert ingest.for_tool("python").ratio == 0.2
    read = ingest.for_tool("read_file")
    assert (read.ratio, read.keep_last, read.keep_first, read.trigger_tokens) == (0.05, 4, 16, 1024)
    assert validate_task({"task": "x"}).memory.ingest is None  # off unless configured


def test_workspace_is_relative_to_the_task_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "task.yaml"
    path.write_text(textwrap.dedent("""
        task: Read the files.
        tools: [read_file]
        workspace: data
    """))
    spec = load_task(path)
    assert Path(spec.workspace) == tmp_path / "sub" / "data" and spec.name == "task"


@pytest.mark.parametrize("name", ["story", "research", "coding"])
def test_examples_are_valid(name):
    spec = load_task(EXAMPLES / f"{name}.yaml")
    assert bool(spec.tools) == (name != "story")
    if spec.workspace:
        assert Path(spec.workspace).is_dir()
