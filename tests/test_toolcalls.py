"""Tool-call parsing: each format, several calls, cut-off replies, malformed JSON, prose that is not a call."""

from __future__ import annotations

import pytest

from agentloop.toolcalls import ParsedCalls, parse_tool_calls


def calls(parsed: ParsedCalls) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in parsed.calls]


def test_hermes_single_call_and_content():
    parsed = parse_tool_calls('Let me look.\n<tool_call>\n{"name": "read_file", "arguments": {"path": "a.txt"}}\n'
                              '</tool_call>')
    assert calls(parsed) == [("read_file", {"path": "a.txt"})]
    assert parsed.errors == [] and parsed.content == "Let me look."


def test_hermes_several_calls():
    parsed = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                              '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call> then more')
    assert calls(parsed) == [("a", {}), ("b", {"x": 1})]
    assert parsed.content == "then more"
    assert len({c.id for c in parsed.calls}) == 2 and all(len(c.id) == 9 for c in parsed.calls)


def test_hermes_missing_closing_tag():
    parsed = parse_tool_calls('<tool_call>\n{"name": "list_dir", "arguments": {"path": "src"}}')
    assert calls(parsed) == [("list_dir", {"path": "src"})] and parsed.errors == []
    two = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}\n<tool_call>{"name": "b", "arguments": {}}')
    assert calls(two) == [("a", {}), ("b", {})]


def test_hermes_cut_off_call_is_an_error():
    parsed = parse_tool_calls('<tool_call>\n{"name": "write_file", "arguments": {"path": "a.txt", "content": "he')
    assert parsed.calls == []
    assert len(parsed.errors) == 1 and "tool call 1 is not valid JSON (it is cut off)" in parsed.errors[0]


def test_llama_python_tag_and_parameters():
    parsed = parse_tool_calls('<|python_tag|>{"name": "search_files", "parameters": {"pattern": "def"}}<|eom_id|>')
    assert calls(parsed) == [("search_files", {"pattern": "def"})]
    assert parsed.errors == [] and parsed.content == ""
    two = parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": 2}}')
    assert calls(two) == [("a", {}), ("b", {"y": 2})]


def test_llama_bare_json_without_tag():
    parsed = parse_tool_calls('{"name": "python", "parameters": {"code": "print(1)"}}')
    assert calls(parsed) == [("python", {"code": "print(1)"})]


def test_fenced_json_block_and_list():
    parsed = parse_tool_calls('I will list it:\n```json\n{"name": "list_dir", "arguments": {"path": "."}}\n```\nok')
    assert calls(parsed) == [("list_dir", {"path": "."})]
    assert parsed.content == "I will list it:\n\nok"
    many = parse_tool_calls('```\n[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": "v"}}]\n```')
    assert calls(many) == [("a", {}), ("b", {"k": "v"})]


def test_bare_object_in_prose():
    parsed = parse_tool_calls('Calling {"name": "read_file", "arguments": {"path": "x"}} now.')
    assert calls(parsed) == [("read_file", {"path": "x"})] and parsed.content == "Calling  now."


def test_arguments_as_json_string_and_openai_wrapping():
    parsed = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert calls(parsed) == [("add", {"a": 1, "b": 2})]
    wrapped = parse_tool_calls('{"type": "function", "id": "x", "function": {"name": "add", "arguments": "{}"}}')
    assert calls(wrapped) == [("add", {})]
    bad = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{a: 1"}</tool_call>')
    assert bad.calls == [] and 'tool call 1 has "arguments" as a string that is not valid JSON' in bad.errors[0]


def test_tolerated_sloppiness():
    assert calls(parse_tool_calls('{"name": "a", "arguments": {"x": 1,},}')) == [("a", {"x": 1})]
    assert calls(parse_tool_calls("{'name': 'a', 'arguments': {'ok': True, 'n': None}}")) == [
        ("a", {"ok": True, "n": None})]
    code = parse_tool_calls('<tool_call>{"name": "python", "arguments": {"code": "x = 1\nprint(x)"}}</tool_call>')
    assert calls(code) == [("python", {"code": "x = 1\nprint(x)"})]


def test_unknown_fields_are_ignored_and_flat_arguments_accepted_in_tags():
    parsed = parse_tool_calls('<tool_call>{"name": "a", "arguments": {"x": 1}, "thought": "hm", "id": 7}</tool_call>')
    assert calls(parsed) == [("a", {"x": 1})]
    flat = parse_tool_calls('<tool_call>{"name": "read_file", "path": "a.txt"}</tool_call>')
    assert calls(flat) == [("read_file", {"path": "a.txt"})]
    bare = parse_tool_calls('{"name": "read_file", "arguments": {"path": "a"}, "confidence": 0.9}')
    assert calls(bare) == [("read_file", {"path": "a"})]


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "read_file", "arguments": {"path" "a.txt"}}</tool_call>',
    '{"name": "read_file", "arguments": {"path" "a.txt"}}',
    '```json\n{"name": "read_file" "arguments": {}}\n```',
])
def test_malformed_json_is_an_error_not_an_exception(text):
    parsed = parse_tool_calls(text)
    assert parsed.calls == []
    assert len(parsed.errors) == 1
    assert parsed.errors[0].startswith("tool call 1 is not valid JSON: Expecting")
    assert 'reply with {"name": ..., "arguments": {...}}' in parsed.errors[0]


@pytest.mark.parametrize(("text", "error"), [
    ('<tool_call>read_file(path="x")</tool_call>', "tool call 1 is not JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'tool call 1 has no "name"'),
    ('<tool_call>{"name": "a", "arguments": [1]}</tool_call>', '"arguments" that are a JSON list'),
    ('<tool_call>["a"]</tool_call>', "tool call 1 is a JSON str"),
    ('<tool_call></tool_call>', "tool call 1 is not JSON"),
])
def test_wrong_shapes_are_errors(text, error):
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and error in parsed.errors[0]


def test_errors_and_calls_are_numbered_together():
    parsed = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
                              '<tool_call>{"name": "b", "arguments": {</tool_call>'
                              '<tool_call>{"name": "c", "arguments": {}}</tool_call>')
    assert calls(parsed) == [("a", {}), ("c", {})]
    assert len(parsed.errors) == 1 and parsed.errors[0].startswith("tool call 2 ")


@pytest.mark.parametrize("text", [
    "",
    "The answer is 42.",
    "Use a set like {1, 2} or a dict {'a': 1}; in f-strings write {name}.",
    'The config is {"name": "bob", "age": 3} and [1, 2, 3].',
    "A brace { that never closes, and it's fine",
    'In Python: ```python\nd = {"name": "x", "arguments": {}}\n``` is a dict.',
    'JSON data: {"users": [{"name": "a", "arguments": {}}]}',
])
def test_no_call(text):
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and parsed.errors == []
    assert parsed.content == text.strip()
