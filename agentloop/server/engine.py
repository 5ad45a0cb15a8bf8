"""One model, many conversations: the worker thread that runs every turn.

Requests wait in one FIFO queue. The worker admits the oldest as soon as the pool can make room for it under the
server's cap (a later request never overtakes it), and runs the admitted turns round-robin, one step each in
turn: a prefill chunk or one decoded token. So every conversation progresses, a long answer does not hold up a
short one, and one forward runs at a time on the model. A request not admitted within `queue_timeout` seconds
is answered 503; a cancelled one (its client went away) stops at its next step and releases its turn, its
session keeping what it had read and written.

Each turn's output goes to a `sink` the request handler gave (thread-safe): {"kind": "started"} once its new
messages are prefilled, {"kind": "delta", "text"} per decoded piece, then {"kind": "done", ...} or
{"kind": "error", "error": ApiError}.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from agentloop.errors import AgentloopError
from agentloop.loop import GenerationSettings
from agentloop.memcap import format_bytes
from agentloop.policies import NoPolicy
from agentloop.server.conversations import Conversation, Pool, tools_key
from agentloop.server.protocol import ApiError, ChatMessage, ChatRequest, NamedToolChoice, usage
from agentloop.toolcalls import parse_tool_calls

# the transcript (render form: replies as raw text) -> the reply, teacher-forced; None lets the model decode it
ReplyFn = Callable[[list[dict]], str | None]
FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "mem_cap": "length"}


@dataclass
class Turn:
    request: ChatRequest
    sink: Callable[[dict], None]
    key: list[dict]  # the request's messages as compared with held conversations
    render: list[dict]  # the request's messages as the model reads them
    tools: list[dict]
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    conv: Conversation | None = None
    held: int = 0  # messages of the request the conversation already held (warm)
    mode: str = "new"  # new | warm | restored
    notice: str | None = None
    steps: Iterator[None] | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    discard: bool = False  # cancelled with part of a turn in the cache: the conversation cannot go on


@dataclass
class Counters:
    requests: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    decode_seconds: float = 0.0
    compactions: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    last_tokens_per_second: float = 0.0


class Engine:
    def __init__(self, pool: Pool, model_name: str, reuse: bool = True, queue_timeout: float = 60.0,
                 reply_fn: ReplyFn | None = None):
        self.pool, self.model_name, self.reuse = pool, model_name, reuse
        self.queue_timeout, self.reply_fn = queue_timeout, reply_fn
        self.waiting: deque[Turn] = deque()
        self.running: list[Turn] = []
        self.counters = Counters()
        self.snapshot: dict = {}  # the pool's state after the latest step, for /metrics and /health
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="agentloop-engine", daemon=True)

    # --- from the request handlers (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # else a step still runs: leave its files rather than pull them away
            self.pool.shutdown()

    def submit(self, request: ChatRequest, sink: Callable[[dict], None]) -> Turn:
        key, render = conversation_forms(request.messages)
        tools = [t.model_dump(include={"type", "function"}) for t in request.tools or []]
        turn = Turn(request=request, sink=sink, key=key, render=render, tools=tools)
        with self._cond:
            self.waiting.append(turn)
            self._cond.notify()
        return turn

    def cancel(self, turn: Turn) -> None:
        with self._cond:
            turn.cancelled = True
            self._cond.notify()

    # --- the worker -------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.running:
                    self._cond.wait()
                if self._stopping:
                    return
            self._expire()
            self._admit()
            for turn in list(self.running):
                self._advance(turn)
            self._publish()
            if self.waiting and not self.running:
                time.sleep(0.05)  # nothing runs and the head cannot start (parking failed): retry shortly

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            expired = [t for t in self.waiting if t.cancelled or now - t.enqueued > self.queue_timeout]
            for turn in expired:
                self.waiting.remove(turn)
        for turn in expired:
            if not turn.cancelled:
                self.counters.timed_out += 1
                turn.sink({"kind": "error", "error": ApiError(
                    503, f"the server is busy: the request waited {self.queue_timeout:g} s for room under the memory "
                    f"cap ({len(self.running)} turns running, {len(self.waiting)} waiting); retry later",
                    type="server_error", code="overloaded")})

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self.waiting:
                    return
                turn = self.waiting[0]
            try:
                if not self._start(turn):
                    return  # the oldest request waits for a running turn to end; later ones wait behind it
            except Exception as exc:  # making room failed (a disk that cannot take a parked session, say)
                with self._cond:
                    self.waiting.popleft()
                self.counters.failed += 1
                turn.sink({"kind": "error", "error": ApiError(500, f"could not make room for the request: "
                                                                   f"{_one_line(exc)}", type="server_error")})
                continue
            with self._cond:
                self.waiting.popleft()
            self.running.append(turn)

    def _start(self, turn: Turn) -> bool:
        pool, tkey = self.pool, tools_key(turn.tools)
        conv = pool.match(turn.key, tkey) if self.reuse else None
        if not pool.make_room(pool.need(conv), keep=conv):
            return False
        if conv is not None and conv.session is None:
            turn.notice = pool.restore(conv)
            if turn.notice is None:
                turn.mode = "restored"
            else:
                conv = None
        elif conv is not None:
            turn.mode = "warm"
        if conv is None:
            conv = pool.open(turn.tools, tkey)
            conv.session = pool.new_session()
        else:
            turn.held = len(conv.messages)
        conv.running, conv.idle_compacted, turn.conv = True, False, conv
        turn.steps, turn.admitted_at = self._steps(turn), time.monotonic()
        return True

    def _advance(self, turn: Turn) -> None:
        """One step of a running turn; ends it when it is done, cancelled or failed."""
        try:
            next(turn.steps)
            return
        except StopIteration:
            pass
        except _Cancelled:
            self.counters.cancelled += 1
            if turn.discard:
                self.pool.close(turn.conv)
            else:
                self._end(turn)
        except ApiError as error:
            self._fail(turn, error)
        except AgentloopError:  # the one the loop raises: a prefill chunk that no compaction makes room for
            session = turn.conv.session
            self._fail(turn, ApiError(
                400, f"the messages do not fit under the session cap ({format_bytes(session.cap_bytes)}) even with "
                f"policy {session.policy.name!r}: send shorter messages, or start the server with a larger "
                "--session-cap" + ("; the conversation was closed" if turn.held else ""),
                param="messages", code="context_length_exceeded"))
        except Exception as exc:  # a bug: the request fails with a one-line error, the server goes on
            print(f"agentloop serve: internal error in a turn: {_one_line(exc)}", file=sys.stderr)
            self._fail(turn, ApiError(500, f"internal error: {_one_line(exc)}", type="server_error"))
        self.running.remove(turn)

    def _fail(self, turn: Turn, error: ApiError) -> None:
        self.counters.failed += 1
        if turn.discard:  # its cache holds part of this turn: the conversation cannot go on
            self.pool.close(turn.conv)
        else:
            self._end(turn)
        turn.sink({"kind": "error", "error": error})

    def _end(self, turn: Turn) -> None:
        conv = turn.conv
        conv.running, conv.last_used = False, time.monotonic()
        if not self.reuse or not conv.messages:  # stateless, or a new conversation that never got a reply
            self.pool.close(conv)

    # --- one turn ---------------------------------------------------------------------------------------------
    def _steps(self, turn: Turn) -> Iterator[None]:
        conv, request, session = turn.conv, turn.request, turn.conv.session
        if turn.cancelled:
            raise _Cancelled
        new = turn.render[turn.held:]
        try:
            text = (conv.chat.pending_text(conv.rendered + new, len(conv.rendered)) if turn.held
                    else conv.chat.render(turn.render)) + forced_call(request)
        except AgentloopError as exc:  # the chat template refused these messages (an order of roles, say)
            raise ApiError(400, str(exc), param="messages") from None
        ids = conv.chat.encode(text)
        cached = len(session.token_ids)
        free = session.free_tokens()
        if isinstance(session.policy, NoPolicy) and free is not None and len(ids) > free:
            raise ApiError(400, f"this conversation needs {cached + len(ids)} tokens of context, more than its cache "
                           f"holds under the session cap ({cached + free} tokens) with policy 'none'; shorten the "
                           "messages or start the server with a compacting policy (--policy am)", param="messages",
                           code="context_length_exceeded")
        if not session.prompt_len:
            session.prompt_len = len(ids)  # the first turn is the session's prompt (policies may pin or re-read it)
        actions_before = session.policy_actions
        turn.discard = True  # from here on the cache holds part of this turn until its reply is stored
        for i in range(0, len(ids), session.prefill_chunk):
            for _ in session.feed(ids[i:i + session.prefill_chunk]):
                pass
            yield
            if turn.cancelled:
                raise _Cancelled
        turn.sink({"kind": "started"})
        reply, stop = forced_call(request), None
        scripted = self.reply_fn(conv.rendered + new) if self.reply_fn else None
        if scripted is not None:  # teacher-forced (tests, replays)
            for _ in session.feed(conv.chat.encode(scripted)):
                pass
            turn.first_token_at = time.monotonic()
            turn.sink({"kind": "delta", "text": scripted})
            reply += scripted
            new_tokens, seconds, reason = len(conv.chat.encode(scripted)), 0.0, "eos"
        else:
            named = isinstance(request.tool_choice, NamedToolChoice)  # exactly one call: end the reply with it
            settings = GenerationSettings(max_new_tokens=request.max_new_tokens,
                                          stop=request.stop + (["</tool_call>"] if named else []),
                                          temperature=1.0 if request.temperature is None else request.temperature,
                                          top_p=request.top_p or 1.0,
                                          seed=request.seed if request.seed is not None else secrets.randbits(31))
            for event in session.generate(settings):
                if event.kind == "token":
                    turn.first_token_at = turn.first_token_at or time.monotonic()
                    if event.text:
                        turn.sink({"kind": "delta", "text": event.text})
                    yield
                    if turn.cancelled:  # what was decoded stays in the cache and in the stored reply
                        self._store(turn, reply + _text_so_far(session, event.step + 1, conv), new, "cancelled")
                        raise _Cancelled
                elif event.kind == "stop":
                    stop = event
            reply += stop.text
            new_tokens, seconds, reason = stop.new_tokens, stop.decode_seconds, stop.reason
        message, finish_reason = self._store(turn, reply, new, reason)
        counters = self.counters
        counters.requests += 1
        counters.prompt_tokens += cached + len(ids)
        counters.prefill_tokens += len(ids)
        counters.cached_tokens += cached
        counters.completion_tokens += new_tokens
        counters.decode_seconds += seconds
        counters.compactions += session.policy_actions - actions_before
        counters.last_tokens_per_second = new_tokens / seconds if seconds > 0 else 0.0
        extension = {
            "conversation": conv.id, "session": turn.mode, "notice": turn.notice,
            "prefill_tokens": len(ids), "reused_tokens": cached, "stop_reason": reason,
            "cache_bytes": session.cache.nbytes(), "cap_bytes": session.cap_bytes, "peak_bytes": session.peak_bytes,
            "logical_tokens": session.cache.logical_len, "slots": session.cache.physical_len,
            "compactions": session.policy_actions, "turn_compactions": session.policy_actions - actions_before,
            "server_cache_bytes": self.pool.cache_bytes(), "server_cap_bytes": self.pool.cap_bytes,
            "server_peak_bytes": self.pool.stats.peak_bytes,
            "queue_seconds": turn.admitted_at - turn.enqueued,
            "time_to_first_token": (turn.first_token_at or time.monotonic()) - turn.enqueued,
            "tokens_per_second": counters.last_tokens_per_second,
        }
        self._end(turn)
        turn.sink({"kind": "done", "message": message, "finish_reason": finish_reason, "extension": extension,
                   "usage": usage(cached + len(ids), new_tokens, cached)})

    def _store(self, turn: Turn, reply: str, new: list[dict], reason: str) -> tuple[dict, str]:
        """The response message for `reply` (raw text); the conversation now holds the request plus this reply."""
        conv, request = turn.conv, turn.request
        message, finish_reason = response_message(reply, request, turn.tools, reason)
        turn.discard = False
        conv.messages = turn.key + [key_form(ChatMessage.model_validate(message))]
        conv.rendered = conv.rendered + new if turn.held else list(turn.render)
        conv.rendered.append({"role": "assistant", "content": reply})
        conv.turns += 1
        return message, finish_reason

    def _publish(self) -> None:
        pool = self.pool
        conversations = {c.id: (c.session.cache.nbytes() if c.session is not None else None, c.running)
                         for c in list(pool.conversations.values())}
        self.snapshot = {
            "conversations": conversations, "cache_bytes": pool.cache_bytes(), "counted_bytes": pool.counted_bytes(),
            "cap_bytes": pool.cap_bytes, "peak_bytes": pool.stats.peak_bytes, "pool": dict(vars(pool.stats)),
            "waiting": len(self.waiting), "running": len(self.running),
        }


class _Cancelled(Exception):
    pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _text_so_far(session, steps: int, conv: Conversation) -> str:
    return conv.chat.tokenizer.decode(session.token_ids[len(session.token_ids) - steps:], skip_special_tokens=True)


# --- messages: what is compared, what the model reads, what is answered ---------------------------------------
def conversation_forms(messages: list[ChatMessage]) -> tuple[list[dict], list[dict]]:
    """(key form, render form) of a request's messages."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or [] if c.id}
    return [key_form(m) for m in messages], [render_form(m, names) for m in messages]


def key_form(message: ChatMessage) -> dict:
    """What must be equal for a request to continue a held conversation (tool-call ids aside: clients may renumber)."""
    key = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        key["tool_calls"] = [[c.function.name, _arguments(c.function.arguments)] for c in message.tool_calls]
    return key


def render_form(message: ChatMessage, call_names: dict[str, str]) -> dict:
    """The message as the chat template gets it: tool calls of replies written out in the model's call syntax."""
    text = message.text()
    for call in message.tool_calls or []:
        text += "<tool_call>" + json.dumps({"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                                           ensure_ascii=False) + "</tool_call>"
    rendered = {"role": "system" if message.role == "developer" else message.role, "content": text}
    if message.role == "tool":
        rendered["name"] = message.name or call_names.get(message.tool_call_id or "", "tool")
    return rendered


def _arguments(arguments: str | dict) -> dict | str:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def forced_call(request: ChatRequest) -> str:
    """The start of a tool call the reply is made to begin with, for tool_choice `required` or a named function."""
    if isinstance(request.tool_choice, NamedToolChoice):  # small models copy placeholders: open the arguments too
        return '<tool_call>{"name": ' + json.dumps(request.tool_choice.function.name) + ', "arguments": {"'
    return '<tool_call>{"name": "' if request.tool_choice == "required" else ""


def response_message(reply: str, request: ChatRequest, tools: list[dict], reason: str) -> tuple[dict, str]:
    """The assistant message for a raw reply and the finish reason: stop strings cut, tool calls parsed (not
    with tool_choice none)."""
    cut = min((reply.find(s) for s in request.stop if s in reply), default=-1)
    text = reply[:cut] if cut >= 0 else reply
    if tools and request.tool_choice != "none":
        names = {t["function"]["name"] for t in tools}
        parsed = parse_tool_calls(text)
        if parsed.calls and all(c.name in names for c in parsed.calls):
            calls = [{"id": "call_" + c.id, "type": "function",
                      "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                     for c in parsed.calls]
            return {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, FINISH.get(reason, "stop")
