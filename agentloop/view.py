"""Terminal views of a run: live panels (generation, agent) and one-line descriptions of agent events."""

from __future__ import annotations

import json
import time

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from agentloop.events import Event
from agentloop.memcap import format_bytes


class _LivePanel:
    """A rich Live panel redrawn from `_render()`; used as a context manager around a run."""

    def __enter__(self):
        self._live.__enter__()
        return self

    def __exit__(self, *exc):
        self._live.update(self._render())
        self._live.__exit__(*exc)


class LiveView(_LivePanel):
    """Folds loop events into a rich panel; refreshed a few times a second."""

    def __init__(self, console: Console, title: str, cap_bytes: int | None, max_new_tokens: int):
        self.console, self.title = console, title
        self.cap_bytes, self.max_new_tokens = cap_bytes, max_new_tokens
        self.tokens = self.actions = self.pauses = 0
        self.cache_bytes = self.logical = self.physical = 0
        self.text = ""
        self.status = "prefilling"
        self._start = time.perf_counter()
        self._decode_start: float | None = None
        self._live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def update(self, event: Event) -> None:
        if event.kind in ("prefill", "token"):
            self.cache_bytes, self.logical, self.physical = event.cache_bytes, event.logical_len, event.physical_len
        if event.kind == "prefill":
            self.status, self._decode_start = "decoding", time.perf_counter()
        elif event.kind == "token":
            self.tokens += 1
            self.text += event.text
        elif event.kind == "pause":
            self.pauses += 1
            self.status = "paused: making room"
        elif event.kind == "policy":
            self.actions += 1
            self.cache_bytes, self.physical = event.bytes_after, event.physical_after
            self.status = "decoding"
        elif event.kind == "stop":
            self.status = f"stopped: {event.reason}"
        self._live.update(self._render())

    def _render(self) -> Panel:
        elapsed = time.perf_counter() - (self._decode_start or time.perf_counter())
        speed = self.tokens / elapsed if elapsed > 0 else 0.0
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("status", self.status)
        table.add_row("tokens", f"{self.tokens} / {self.max_new_tokens}   {speed:.1f} tok/s")
        table.add_row("cache", f"{format_bytes(self.cache_bytes)}"
                      + (f" / {format_bytes(self.cap_bytes)}" if self.cap_bytes else " (uncapped)")
                      + f"   logical {self.logical} / physical {self.physical} slots")
        if self.cap_bytes:
            table.add_row("", ProgressBar(total=self.cap_bytes, completed=min(self.cache_bytes, self.cap_bytes), width=48))
        table.add_row("policy", f"{self.actions} actions, {self.pauses} pauses")
        tail = "\n".join(self.text.splitlines()[-6:])[-600:]
        return Panel(Group(table, Text(tail, style="dim")), title=self.title, border_style="cyan")


class AgentView(_LivePanel):
    """The live panel of an agent run: step, tokens, cache bytes against the cap, compactions, tool calls."""

    def __init__(self, console: Console, title: str, cap_bytes: int | None, max_steps: int):
        self.console, self.title = console, title
        self.cap_bytes, self.max_steps = cap_bytes, max_steps
        self.step = self.tokens = self.prefilled = 0
        self.cache_bytes = self.logical = self.physical = 0
        self.online = self.ingested = self.saved_bytes = 0
        self.calls: list[list[str]] = []  # [step, call, status] of the newest calls
        self.text = ""
        self.status = "prefilling the task"
        self._live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def update(self, event: Event) -> None:
        kind = event.kind
        if kind in ("prefill", "token"):
            self.cache_bytes, self.logical, self.physical = event.cache_bytes, event.logical_len, event.physical_len
        if kind == "prefill":
            self.prefilled += event.tokens
        elif kind == "token":
            if self.status != "decoding":
                self.status, self.text = "decoding", ""
            self.tokens += 1
            self.text += event.text
        elif kind == "policy":
            self.online += 1
            self.cache_bytes, self.physical = event.bytes_after, event.physical_after
        elif kind == "message" and event.message["role"] == "assistant":
            self.step, self.text, self.status = event.step, event.message["content"], "running tools"
        elif kind == "tool_call":
            self.calls = (self.calls + [[str(event.step), _call_text(event.tool, event.arguments), "running"]])[-6:]
        elif kind == "tool_result" and event.tool == "error":
            self.calls = (self.calls + [[str(event.step), "(malformed call)", "[red]error[/]"]])[-6:]
        elif kind == "tool_result":
            status = f"[green]ok[/] {event.chars:,} chars" if event.ok else "[red]failed[/]"
            self.calls[-1][2] = f"{status} {event.seconds:.1f}s"
        elif kind == "ingest" and not event.skipped:
            self.ingested += 1
            self.saved_bytes += event.bytes_before - event.bytes_after
            self.cache_bytes = event.bytes_after
            self.status = "prefilling tool results"
        elif kind == "finish":
            self.status = f"finished: {event.reason}"
        self._live.update(self._render())

    def _render(self) -> Panel:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("status", self.status)
        table.add_row("step", f"{self.step} / {self.max_steps}")
        table.add_row("tokens", f"{self.tokens:,} generated, {self.prefilled:,} prefilled")
        table.add_row("cache", f"{format_bytes(self.cache_bytes)}"
                      + (f" / {format_bytes(self.cap_bytes)}" if self.cap_bytes else " (uncapped)")
                      + f"   logical {self.logical:,} / physical {self.physical:,} slots")
        if self.cap_bytes:
            table.add_row("", ProgressBar(total=self.cap_bytes, completed=min(self.cache_bytes, self.cap_bytes), width=48))
        table.add_row("compactions", f"{self.online} online, {self.ingested} on ingestion "
                                     f"({format_bytes(self.saved_bytes)} freed)")
        calls = Table(box=None, show_header=False, padding=(0, 1))
        for row in self.calls:
            calls.add_row(*row)
        tail = "\n".join(self.text.splitlines()[-4:])[-400:]
        return Panel(Group(table, Text("tool calls", style="bold"), calls, Text(tail, style="dim")),
                     title=self.title, border_style="cyan")


def describe_agent_event(event: Event) -> str | None:
    """One line for the log of an agent run (no live panel), or None for events it leaves out."""
    kind = event.kind
    if kind == "message" and event.message["role"] == "assistant" and event.step > 0:  # not the opening examples
        return f"[bold]step {event.step}[/] reply: {_short(event.message['content'], 160)}"
    if kind == "tool_call":
        return f"  -> {_call_text(event.tool, event.arguments)}"
    if kind == "tool_result":
        status = "[green]ok[/]" if event.ok else f"[red]{_short(event.error or 'failed', 120)}[/]"
        return f"  <- {event.tool}: {status}, {event.chars:,} chars, {event.seconds:.2f}s"
    if kind == "ingest":
        if event.skipped:
            return f"  ingestion of {event.tool} result tokens {event.piece_start:,}-{event.piece_end:,} skipped: {event.skipped}"
        whole = event.piece_start == 0 and event.piece_end == event.tokens
        what = f"{event.tool} result" + ("" if whole else f" (tokens {event.piece_start:,}-{event.piece_end:,} of "
                                                          f"{event.tokens:,})")
        earlier = event.pieces_joined - 1
        region = "tokens" if not earlier else f"slots (with the {'' if earlier == 1 else f'{earlier} '}earlier " \
                                              f"piece{'s' if earlier > 1 else ''})"
        return (f"  ingested {what}: {event.slots_before:,} {region} -> {event.slots_after:,} slots, cache "
                f"{format_bytes(event.bytes_before)} -> {format_bytes(event.bytes_after)} in {event.seconds:.1f}s "
                f"(fit error {event.output_error:.3f})")
    if kind == "policy":
        return (f"  {event.policy}: {event.action} at the cap, {event.physical_before:,} -> {event.physical_after:,} "
                f"slots, {format_bytes(event.bytes_before)} -> {format_bytes(event.bytes_after)}")
    return None


def _call_text(tool: str, arguments: dict) -> str:
    return _short(f"{tool}({json.dumps(arguments, ensure_ascii=False)})", 100)


def _short(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters, escaped for rich markup."""
    text = " ".join(text.split())
    return escape(text if len(text) <= limit else text[:limit - 3] + "...")
