"""Reading a task.yaml into a plain mapping, with a one-line error for every way the file can be wrong.

Kept free of torch and the model code, so that the CLI can read the task (and learn its trace path) at
once; task.py validates the mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agentloop.errors import AgentloopError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key `{key}` appears twice (first at line {first}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_task_file(path: str | Path) -> dict[str, Any]:
    """The task file's fields as a mapping (`name` defaults to the file's stem); AgentloopError if unreadable."""
    if not str(path).strip():
        raise AgentloopError("the task file name is empty; give the path of a task.yaml")
    path = Path(path)
    if path.is_dir():
        raise AgentloopError(f"task file {path} is a directory; give the path of a task.yaml file in it")
    if not path.is_file():
        raise AgentloopError(f"task file {path} does not exist" if not path.exists() else
                             f"task file {path} is not a regular file; give the path of a task.yaml")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentloopError(f"cannot read task file {path} ({exc.strerror}); check its permissions") from None
    if b"\0" in data:
        raise AgentloopError(f"task file {path} is a binary file, not a task.yaml (YAML text)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise AgentloopError(f"task file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                             "save it as UTF-8") from None
    try:
        fields = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise AgentloopError(f"{path}: bad YAML{where}: {problem}") from None
    if fields is None:
        raise AgentloopError(f"task file {path} is empty; see the README for the task.yaml fields")
    if not isinstance(fields, dict):
        raise AgentloopError(f"{path}: expected a mapping of fields (model, task, memory, ...), got "
                             f"{type(fields).__name__}")
    fields.setdefault("name", path.stem)
    if isinstance(fields.get("workspace"), str) and fields["workspace"].strip():  # relative to the task file
        fields["workspace"] = str(path.parent / fields["workspace"])
    return fields
