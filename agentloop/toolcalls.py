"""Tool calls parsed out of a model's reply.

Formats, tried in this order; the first one present in the reply is used:
1. Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number; a closing tag
   missing at the end of the generation is tolerated.
2. Llama 3: `<|python_tag|>` followed by one or more JSON objects `{"name": ..., "parameters": {...}}`.
3. fenced blocks (```json or unlabeled) holding a call or a list of calls.
4. bare JSON in the reply: an object (or list of objects) with a string "name" and "arguments" or
   "parameters" (or no other keys), so prose with braces or other JSON data is not taken for a call.

Inside tags (1, 2) every JSON object is meant as a call: a malformed one becomes an error message for the
model, and keys other than name/id/type are taken as the arguments when "arguments" is missing. Also
accepted: OpenAI's {"function": {"name", "arguments"}} wrapping, "arguments" given as a JSON string,
trailing commas, Python-style single quotes and True/False/None, raw newlines inside strings.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

from pydantic import BaseModel, Field

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_SPECIAL = re.compile(r"<\|(?:python_tag|eom_id|eot_id)\|>|</tool_call>")
_FENCE = re.compile(r"```[ \t]*([\w-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_LOOKS_LIKE_CALL = re.compile(r"""[\[{]\s*\{?\s*["']?name["']?\s*:""")  # used with .match()
_OPENER = re.compile(r"[{\[]")
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_HINT = 'reply with {"name": ..., "arguments": {...}}'
_DECODER = json.JSONDecoder(strict=False)  # allows raw newlines/tabs inside strings


class ToolCall(BaseModel):
    """One call the model asked for."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:9])  # 9 characters: what Mistral templates require


class ParsedCalls(BaseModel):
    """A reply split into tool calls, error messages for malformed calls, and the remaining text."""

    calls: list[ToolCall] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)  # one line each, phrased for the model
    content: str = ""  # the reply without the calls and call markup


def _decode(text: str) -> Any:
    """JSON, repaired for trailing commas and Python literals; raises the original JSONDecodeError."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        first = exc
    repaired = _TRAILING_COMMA.sub(r"\1", text)
    try:
        return _DECODER.decode(repaired)
    except json.JSONDecodeError:
        pass
    try:
        value = ast.literal_eval(repaired)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise first from None
    if isinstance(value, (dict, list)) and _json_like(value):
        return value
    raise first


def _json_like(value: Any) -> bool:
    """Whether a Python literal holds only what JSON can (no sets, tuples, bytes or non-string keys)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_like(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_like(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _match(text: str, start: int, end: int) -> tuple[int, bool]:
    """(index after the bracket closing the one at `start`, quotes respected, True), or (`end`, False)."""
    depth, quote, k = 0, None, start
    while k < end:
        c = text[k]
        if quote:
            if c == "\\":
                k += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return k + 1, True
        k += 1
    return end, False


def _unwrap(obj: dict) -> dict:
    return obj["function"] if isinstance(obj.get("function"), dict) else obj


def _is_call(value: Any) -> bool:
    """Whether bare JSON is a call: {"name": str, "arguments"/"parameters": ...} or a non-empty list of them."""
    if isinstance(value, list):
        return bool(value) and all(_is_call(v) for v in value)
    if not isinstance(value, dict):
        return False
    obj = _unwrap(value)
    return isinstance(obj.get("name"), str) and ("arguments" in obj or "parameters" in obj
                                                 or set(obj) <= {"name", "id", "type"})


class _Collector:
    """Calls, errors and consumed spans, numbered in the order the model wrote them."""

    def __init__(self) -> None:
        self.result = ParsedCalls()
        self.spans: list[tuple[int, int]] = []
        self.count = 0

    def error(self, message: str) -> None:
        self.count += 1
        self.result.errors.append(f"tool call {self.count} {message}")

    def value(self, value: Any) -> None:
        for obj in value if isinstance(value, list) else [value]:
            self.count += 1
            call = self._call(obj)
            if isinstance(call, ToolCall):
                self.result.calls.append(call)
            else:
                self.result.errors.append(f"tool call {self.count} {call} — {_HINT}")

    def text(self, body: str) -> None:
        """Decode `body` as one call (or list); report what is wrong with it otherwise."""
        try:
            self.value(_decode(body))
        except json.JSONDecodeError as exc:
            cut_off = "" if _match(body, 0, len(body))[1] else " (it is cut off)"
            self.error(f"is not valid JSON{cut_off}: {exc.msg} at char {exc.pos} — {_HINT}")

    def _call(self, obj: Any) -> ToolCall | str:
        if not isinstance(obj, dict):
            return f"is a JSON {type(obj).__name__}, not an object"
        obj = _unwrap(obj)
        name = obj.get("name")
        if not isinstance(name, str) or not name.strip():
            return 'has no "name"'
        if "arguments" in obj or "parameters" in obj:
            args = obj.get("arguments", obj.get("parameters"))
        else:
            args = {k: v for k, v in obj.items() if k not in ("name", "id", "type")}
        if isinstance(args, str):
            try:
                args = _decode(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                return f'has "arguments" as a string that is not valid JSON: {exc.msg} at char {exc.pos}'
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return f'has "arguments" that are a JSON {type(args).__name__}, not an object'
        return ToolCall(name=name.strip(), arguments=args)

    def objects(self, text: str, start: int, end: int) -> None:
        """Every bracketed JSON value in text[start:end] is meant as a call (inside tags)."""
        found = False
        k = start
        while k < end:
            if text[k] in "{[":
                close = _match(text, k, end)[0]
                self.text(text[k:close])
                found, k = True, close
            else:
                k += 1
        if not found:
            self.error(f"is not JSON: {text[start:end].strip()[:60]!r} — {_HINT}")


def _tagged(text: str, found: _Collector) -> None:
    pos = 0
    while (opened := text.find(OPEN_TAG, pos)) != -1:
        start = opened + len(OPEN_TAG)
        closed, reopened = text.find(CLOSE_TAG, start), text.find(OPEN_TAG, start)
        ends = [i for i in (closed, reopened) if i != -1]
        end = min(ends) if ends else len(text)
        body_start, body_end = start, end
        fence = _FENCE.search(text, start, end)
        if fence:
            body_start, body_end = fence.start(2), fence.end(2)
        found.objects(text, body_start, body_end)
        pos = end + len(CLOSE_TAG) if end == closed else end
        found.spans.append((opened, pos))


def _python_tag(text: str, found: _Collector) -> None:
    start = text.index(PYTHON_TAG)
    found.objects(text, start + len(PYTHON_TAG), len(text))
    found.spans.append((start, len(text)))


def _fenced(text: str, found: _Collector) -> list[tuple[int, int]]:
    """Parse ```json / unlabeled fences holding calls; returns every fence's span (bare JSON inside is skipped)."""
    fences = []
    for m in _FENCE.finditer(text):
        fences.append(m.span())
        body = m.group(2).strip()
        if m.group(1).lower() not in ("", "json", "tool_call", "tool_code") or body[:1] not in ("{", "["):
            continue
        try:
            value = _decode(body)
        except json.JSONDecodeError:
            if _LOOKS_LIKE_CALL.match(body):
                found.text(body)
                found.spans.append(m.span())
            continue
        if _is_call(value):
            found.value(value)
            found.spans.append(m.span())
    return fences


def _bare(text: str, found: _Collector, skip: list[tuple[int, int]]) -> None:
    k = 0
    while (m := _OPENER.search(text, k)) is not None:
        start = m.start()
        inside = next((e for s, e in skip if s <= start < e), None)
        if inside is not None:
            k = inside
            continue
        end = _match(text, start, len(text))[0]
        try:
            value = _decode(text[start:end])
        except json.JSONDecodeError:
            if _LOOKS_LIKE_CALL.match(text, start):
                found.text(text[start:end])
                found.spans.append((start, end))
                k = end
            else:
                k = start + 1
            continue
        if _is_call(value):
            found.value(value)
            found.spans.append((start, end))
        k = end  # JSON data that is not a call: skip it whole, calls are not nested in data


def parse_tool_calls(text: str) -> ParsedCalls:
    """The tool calls in a model reply; malformed calls become `errors`, never exceptions."""
    found = _Collector()
    if OPEN_TAG in text:
        _tagged(text, found)
    elif PYTHON_TAG in text:
        _python_tag(text, found)
    else:
        fences = _fenced(text, found)
        if not found.spans:
            _bare(text, found, fences)
    kept, pos = [], 0
    for start, end in sorted(found.spans):
        kept.append(text[pos:start])
        pos = max(pos, end)
    kept.append(text[pos:])
    found.result.content = _SPECIAL.sub("", "".join(kept)).strip()
    return found.result
