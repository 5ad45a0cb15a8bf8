"""Conversations the server holds, and the one memory cap they share.

A conversation is a live Session (its cache, compacted as often as its own cap requires) plus the messages the
client will send back to continue it. A request whose messages start with a held conversation's messages, under
the same tools, continues that session: only its new messages are rendered (after the cache's last reply, as the
agent loop does) and prefilled.

The server's cap bounds every held session together. `footprint` is the one place that says what a session
counts: while a turn runs, its whole cap (the cap bounds its cache and the scratch of its compactions); while it
is idle, its cache's bytes. Before a turn starts, `make_room` frees what it needs: first it compacts idle
sessions with their own memory policy (once per idle period, and only where the compaction's scratch fits; only
where compaction frees memory at all: not with caches allocated whole, see `compaction_frees_memory`), then
parks the least recently used ones to disk (agentloop.checkpoint, atomic) and drops them from memory. A parked
conversation is loaded back when its next request comes; one that cannot be loaded back answers as a new
session, and the response says so. Nothing here runs concurrently: the engine's one worker thread calls it.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from agentloop.agent import ChatFormat
from agentloop.checkpoint import load_session, save_session
from agentloop.errors import AgentloopError
from agentloop.loop import Session
from agentloop.memcap import format_bytes
from agentloop.models import LoadedModel
from agentloop.policies import Room, make_policy


def footprint(session: Session, running: bool) -> int:
    """Bytes a held session counts against the server's cap: its cap while a turn runs, its cache while idle."""
    return session.cap_bytes if running else session.cache.nbytes()


@dataclass
class Conversation:
    id: str
    tools_key: str  # the tools its system prompt lists (a conversation continues only under the same tools)
    chat: ChatFormat
    messages: list[dict]  # as the client sends them back (key form): what a request must start with to continue it
    rendered: list[dict] = field(default_factory=list)  # as the model read them (replies as their raw text)
    session: Session | None = None  # None while parked
    parked_at: Path | None = None
    running: bool = False
    last_used: float = field(default_factory=time.monotonic)
    idle_compacted: bool = False  # compacted since its last turn: not again until it runs
    turns: int = 0


@dataclass
class PoolStats:
    idle_compactions: int = 0
    parked: int = 0
    restored: int = 0
    lost: int = 0  # parked conversations that could not be loaded back
    peak_bytes: int = 0  # the most cache bytes held by all sessions together
    peak_counted_bytes: int = 0  # the most bytes counted against the cap (running sessions at their budget)


class Pool:
    def __init__(self, loaded: LoadedModel, cap_bytes: int, session_cap: str, policy: str, policy_options: dict,
                 park_dir: Path, idle_compaction: bool = True):
        self.loaded, self.cap_bytes, self.session_cap = loaded, cap_bytes, session_cap
        self.policy, self.policy_options = policy, policy_options
        self.park_dir, self.idle_compaction = Path(park_dir), idle_compaction
        self.remove_park_dir = False  # remove the folder itself at shutdown (it was made for this server)
        self.conversations: dict[str, Conversation] = {}
        self.stats = PoolStats()
        self.session_cap_bytes = self.new_session().cap_bytes  # what a new session's cap comes to, in bytes
        if self.session_cap_bytes > cap_bytes:
            raise AgentloopError(f"the session cap ({format_bytes(self.session_cap_bytes)} with its scratch) is larger "
                                 f"than the server's cap ({format_bytes(cap_bytes)}): lower --session-cap or raise "
                                 "--mem-cap")
        self.compaction_frees = compaction_frees_memory(self.new_session())

    # --- accounting -----------------------------------------------------------------------------------------
    def resident(self) -> list[Conversation]:
        return [c for c in self.conversations.values() if c.session is not None]

    def counted_bytes(self) -> int:
        total = sum(footprint(c.session, c.running) for c in self.resident())
        self.stats.peak_counted_bytes = max(self.stats.peak_counted_bytes, total)
        return total

    def available(self) -> int:
        return self.cap_bytes - self.counted_bytes()

    def cache_bytes(self) -> int:
        """Bytes the caches of all held sessions hold now."""
        total = sum(c.session.cache.nbytes() for c in self.resident())
        self.stats.peak_bytes = max(self.stats.peak_bytes, total)
        return total

    # --- conversations --------------------------------------------------------------------------------------
    def new_session(self) -> Session:
        return Session(self.loaded, cap=self.session_cap, policy=make_policy(self.policy, **self.policy_options))

    def match(self, messages: list[dict], tools_key: str) -> Conversation | None:
        """The held conversation (not running) with the most messages that `messages` extends."""
        best = None
        for conv in self.conversations.values():
            n = len(conv.messages)
            if (not conv.running and conv.tools_key == tools_key and 0 < n < len(messages) and messages[:n] == conv.messages
                    and (best is None or n > len(best.messages))):
                best = conv
        return best

    def open(self, tools: list[dict], tools_key: str) -> Conversation:
        conv = Conversation(id="conv-" + uuid.uuid4().hex[:12], tools_key=tools_key,
                            chat=ChatFormat(self.loaded.tokenizer, tools), messages=[])
        self.conversations[conv.id] = conv
        return conv

    def shutdown(self) -> None:
        """The server stops: conversations end, and their parked files with them."""
        for conv in list(self.conversations.values()):
            self.close(conv)
        if self.remove_park_dir:
            shutil.rmtree(self.park_dir, ignore_errors=True)

    def close(self, conv: Conversation) -> None:
        self.conversations.pop(conv.id, None)
        if conv.parked_at is not None:
            conv.parked_at.unlink(missing_ok=True)

    def need(self, conv: Conversation | None) -> int:
        """Bytes that must be free before a turn of `conv` (None: a new conversation) can start."""
        if conv is None or conv.session is None:
            return self.session_cap_bytes
        return footprint(conv.session, True) - footprint(conv.session, False)

    def make_room(self, need: int, keep: Conversation | None = None) -> bool:
        """Free `need` bytes under the cap from idle sessions: compact them, then park the least recently used."""
        if self.available() >= need:
            return True
        idle = sorted((c for c in self.resident() if not c.running and c is not keep), key=lambda c: c.last_used)
        if self.available() + sum(footprint(c.session, False) for c in idle) < need:
            return False  # running turns hold the rest: wait for one to end rather than park for nothing
        if self.idle_compaction and self.compaction_frees:
            for conv in idle:
                scratch = footprint(conv.session, True) - footprint(conv.session, False)
                if not conv.idle_compacted and self.available() >= scratch:
                    self._compact(conv)
                    if self.available() >= need:
                        return True
        for conv in idle:
            self.park(conv)
            if self.available() >= need:
                return True
        return False

    def _compact(self, conv: Conversation) -> None:
        """One action of the session's own memory policy, as at its cap: `am` compacts all but its newest tokens."""
        session = conv.session
        conv.idle_compacted = True
        room = Room(cache=session.cache, cap_bytes=session.cap_bytes, cap_slots=session.cap_slots, needed_tokens=0,
                    element_size=session.element_size, prompt_len=session.prompt_len, session=session)
        conv.running = True  # its compaction may use scratch up to its cap
        try:
            if session.policy.make_room(room) is not None:
                session.policy_actions += 1
                self.stats.idle_compactions += 1
        finally:
            conv.running = False

    def park(self, conv: Conversation) -> None:
        """Write the session to disk (atomically) and drop it from memory."""
        path = self.park_dir / f"{conv.id}.ckpt"
        save_session(conv.session, path, {"kind": "conversation", "id": conv.id, "turns": conv.turns})
        conv.session, conv.parked_at = None, path
        self.stats.parked += 1

    def restore(self, conv: Conversation) -> str | None:
        """Load a parked conversation back; None when it is back, else why it could not be (it then starts anew)."""
        path, conv.parked_at = conv.parked_at, None
        try:
            conv.session, _ = load_session(self.loaded, path)
        except (AgentloopError, OSError) as exc:
            self.stats.lost += 1
            self.conversations.pop(conv.id, None)
            return f"the parked conversation {conv.id} could not be loaded back ({exc}); its messages were read again"
        finally:
            path.unlink(missing_ok=True)
        self.stats.restored += 1
        return None


def compaction_frees_memory(session: Session) -> bool:
    """Whether a session's bytes follow the slots its cache holds, so that compacting an idle one frees memory.
    A cache allocated whole at its first token (the memory budget's preallocated buffers) holds the same bytes
    however few slots it keeps: only parking frees it. Told apart by feeding two tokens to a new session."""
    list(session.feed([0]))
    one = session.cache.nbytes()
    list(session.feed([0]))
    return session.cache.nbytes() > one


def tools_key(tools: list[dict]) -> str:
    return json.dumps(tools, sort_keys=True)
