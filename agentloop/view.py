"""The live terminal view of a run: tokens, speed, cache bytes against the cap, policy actions."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from agentloop.events import Event
from agentloop.memcap import format_bytes


class LiveView:
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

    def __enter__(self):
        self._live.__enter__()
        return self

    def __exit__(self, *exc):
        self._live.update(self._render())
        self._live.__exit__(*exc)

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
