"""The agent loop: a model that calls tools, in one KV cache that persists across turns under the memory cap.

Each step the model writes a reply: decoded by the session, or supplied by `reply_fn` and teacher-forced
through it (tests, replays). Tool calls are parsed out of the reply (agentloop/toolcalls.py) and run
(agentloop/tools); a malformed call, an unknown tool, a tool that raises or hangs is answered with an error
message the model reads, never an exception. A reply without a tool call is the final answer. Long tool
results are compacted as soon as they are prefilled (agentloop/ingest.py).

How turns reach the cache. The cache is append-only: it holds the tokens the model actually read and wrote,
and nothing in it is rendered twice. To add messages after a reply, the whole conversation is rendered by
the chat template with that reply's content replaced by a marker, and only the text after the marker (the
end of the reply's turn, the new messages, the next generation prompt) is tokenized and fed. Where the
template renders earlier turns stably, this is exactly the suffix a full re-render adds. Where it does not
(templates that drop earlier reasoning, re-serialise tool calls, strip whitespace, or a reply whose text
re-tokenizes differently), a common-prefix diff against the cache would either re-feed earlier turns or
splice mid-token; the marker never does: the cache keeps what the model saw and only new turns are added.
Replies are rendered as their raw text, tool-call markup included, so the model sees its own words.

Templates that take no `tools` (SmolLM2's) get the tools and the call format in the system message, Hermes
style: <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Tools are listed as one-line signatures
(`- read_file(path: string, ...): Read a text file.`) rather than JSON schemas: fewer tokens, and small models
shown JSON schemas tend to write schemas back instead of calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agentloop.checkpoint import DEFAULT_EVERY, Checkpointer, load_session, read_checkpoint
from agentloop.compaction.queries import turn_ids
from agentloop.errors import AgentloopError
from agentloop.events import Event, FinishEvent, IngestEvent, MessageEvent, ToolCallEvent, ToolResultEvent
from agentloop.ingest import ingest_result
from agentloop.loop import Session
from agentloop.memcap import parse_mem_cap
from agentloop.models import LoadedModel, load_model
from agentloop.policies import make_policy
from agentloop.task import TaskSpec, load_task, validate_task
from agentloop.toolcalls import ParsedCalls, parse_tool_calls
from agentloop.tools import Tool, ToolBox, function_tool, make_tools
from agentloop.trace import JsonlTrace, interruption

# the transcript so far -> the assistant's next reply (raw text), teacher-forced; None lets the model decode it
ReplyFn = Callable[[list[dict]], str | None]
REPLY_MARKER = "@@agentloop-reply@@"
TOOL_PREAMBLE = """You can call these tools:
{signatures}
To call a tool, reply with <tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>
To give your final answer, reply without a tool call."""


class ChatFormat:
    """The model's chat template, with tools where the template expects them."""

    def __init__(self, tokenizer, tools: list[dict]):
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise AgentloopError("this model's tokenizer has no chat template; the agent loop needs a chat model")
        self.tokenizer, self.tools = tokenizer, tools
        self.native_tools = "tools" in template  # the template renders `tools=` itself
        self.plain_roles = False  # set once the template refuses tool turns: they become user turns from then on

    def render(self, messages: list[dict]) -> str:
        """The conversation as text, ending with the assistant's generation prompt."""
        messages = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]  # replies as raw text
        options = {"tools": self.tools} if self.tools and self.native_tools else {}
        if self.tools and not self.native_tools:
            messages = self._with_preamble(messages)
        if not self.plain_roles:
            try:
                return self._apply(messages, options)
            except AgentloopError:
                if not any(m["role"] == "tool" for m in messages):
                    raise
                self.plain_roles = True
        return self._apply(_plain_roles(messages), options)

    def _apply(self, messages: list[dict], options: dict) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
        except Exception as exc:  # a role or an order of turns the template refuses (jinja raise_exception)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AgentloopError(f"the chat template refused the conversation ({reason}); use a model whose "
                                 "template accepts system, user and assistant turns") from None

    def _with_preamble(self, messages: list[dict]) -> list[dict]:
        preamble = TOOL_PREAMBLE.format(signatures="\n".join(_signature(t["function"]) for t in self.tools))
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": messages[0]["content"] + "\n\n" + preamble}, *messages[1:]]
        return [{"role": "system", "content": preamble}, *messages]

    def pending_text(self, messages: list[dict], fed: int) -> str:
        """Text to feed for messages[fed:] after a cache that holds messages[:fed], the last one a reply."""
        if fed == 0:
            return self.render(messages)
        marked = [*messages[:fed - 1], {"role": "assistant", "content": REPLY_MARKER}, *messages[fed:]]
        text = self.render(marked)
        at = text.rfind(REPLY_MARKER)
        if at < 0:
            raise AgentloopError("the chat template does not show assistant replies verbatim, so new turns cannot "
                                 "be appended to the cache; use a model with a standard chat template")
        return text[at + len(REPLY_MARKER):]

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]


def _plain_roles(messages: list[dict]) -> list[dict]:
    """For templates without a tool role: tool results as user turns, and turns of one role in a row merged."""
    plain: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            m = {"role": "user", "content": f"[{m.get('name') or 'tool'} result]\n{m['content']}"}
        if plain and plain[-1]["role"] == m["role"]:
            plain[-1] = {"role": m["role"], "content": plain[-1]["content"] + "\n\n" + m["content"]}
        else:
            plain.append({"role": m["role"], "content": m["content"]})
    return plain


class MemoryStats(BaseModel):
    cap_bytes: int | None
    cache_bytes: int  # bytes of the slots the cache holds now
    allocated_bytes: int  # bytes of the cache's buffers (preallocated: all its slots, held or not)
    peak_bytes: int  # the most cache_bytes has been
    logical_tokens: int  # tokens the model has seen
    physical_slots: int  # slots the cache holds per full-attention layer
    policy_actions: int  # online compactions / evictions at the cap
    ingestions: int  # tool results compacted on ingestion


class Agent:
    """A tool-calling agent over one capped, compacting KV cache.

    Build it from a task spec (a TaskSpec, or the path of a task.yaml) and/or task.yaml fields as keywords
    (`Agent(task=..., tools=["python"], memory={"cap": "64MB", "policy": "am"})`; keywords replace the spec's
    fields). `tools` takes built-in tool names and Python functions or `Tool`s alike; `add_tool` registers
    more before the first run. `run(task)` runs to the end and returns the FinishEvent; `events(task)`
    yields every event on the way. A later `run(task)` continues the conversation in the same cache.

    With `checkpoint=path` the agent saves its session and transcript there (agentloop/checkpoint.py) at the
    start of every turn, at the next token after each compaction, every `checkpoint_every` tokens while a
    reply is decoded, and when it finishes; `Agent.resume(path)` continues a run whose process died.
    """

    def __init__(self, spec: TaskSpec | str | Path | None = None, *, tools: Iterable[Any] | dict = (),
                 loaded: LoadedModel | None = None, reply_fn: ReplyFn | None = None,
                 stop_when: Callable[[Agent], bool] | None = None, trace_file: JsonlTrace | None = None,
                 checkpoint: str | Path | None = None, checkpoint_every: int = DEFAULT_EVERY, **fields: Any):
        if isinstance(spec, (str, Path)):
            spec = load_task(spec)
        data = spec.model_dump(exclude_unset=True) if spec is not None else {}
        custom = []
        if isinstance(tools, dict):
            fields["tools"] = tools
        else:
            tools = list(tools)
            custom = [t for t in tools if not isinstance(t, str)]
            if len(custom) < len(tools):
                fields["tools"] = {**data.get("tools", {}), **{t: {} for t in tools if isinstance(t, str)}}
        self.spec = validate_task({**data, **fields}, source="Agent")
        self.workspace = Path(self.spec.workspace) if self.spec.workspace else None
        self.tools: list[Tool] = []
        if self.spec.tools:  # built before the model loads, so that a bad tool setting fails fast
            if self.workspace is None:
                self.workspace = Path(".agentloop/workspaces") / f"{self.spec.name or 'agent'}-{time.strftime('%Y%m%d-%H%M%S')}"
                self.workspace.mkdir(parents=True, exist_ok=True)
            self.tools = make_tools(list(self.spec.tools), self.workspace, self.spec.tools,
                                    allow_broad_workspace=self.spec.allow_broad_workspace)
        memory = self.spec.memory
        policy = make_policy(memory.policy, **memory.policy_options())
        self.loaded = loaded or load_model(self.spec.model, dtype=self.spec.dtype, device=self.spec.device)
        self.session = Session(self.loaded, cap=parse_mem_cap(memory.cap) if memory.cap else None, policy=policy)
        self._toolbox: ToolBox | None = None  # built at the first run, when the tool list is final
        self._chat: ChatFormat | None = None
        for t in custom:
            self.add_tool(t)
        self.reply_fn, self.stop_when = reply_fn, stop_when
        self.transcript: list[dict] = self._opening()
        self.steps = self.tool_calls = self.ingestions = 0
        self._fed = 0  # transcript messages whose tokens are in the cache
        self._announced = 0  # transcript messages already sent out as MessageEvents
        self._trace: JsonlTrace | None = trace_file  # given: already open (the CLI claims it before the model loads)
        self._own_trace = trace_file is None
        self._broken = False
        self._checkpointer = Checkpointer(checkpoint, checkpoint_every) if checkpoint else None
        self._steps_end = 0  # the step count at which the current run() stops (max_steps)
        self._resumed: dict | None = None  # the checkpoint this agent was restored from, until its run starts
        self._t0 = time.perf_counter()

    @classmethod
    def resume(cls, checkpoint: str | Path, *, tools: Iterable[Any] = (), loaded: LoadedModel | None = None,
               reply_fn: ReplyFn | None = None, stop_when: Callable[[Agent], bool] | None = None,
               checkpoint_every: int = DEFAULT_EVERY, trace_file: JsonlTrace | None = None) -> Agent:
        """The agent saved at `checkpoint`, ready to go on: `events()` / `run()` continue where it was saved (a
        reply being decoded continues at its next token). Pass the same custom tools (Python functions) and
        reply_fn as the first run; built-in tools and every setting come from the checkpoint. The run's trace is
        continued (appended to, after a `resume` record): `trace_file` if given (opened with append=True), else
        the saved spec's trace."""
        state = read_checkpoint(checkpoint)
        extra = state["extra"]
        if extra.get("kind") != "agent":
            raise AgentloopError(f"{checkpoint} is the checkpoint of a plain run, not of an agent; resume it with "
                                 "`agentloop run --resume`")
        agent = cls(validate_task(extra["spec"], source=str(checkpoint)), tools=tools, loaded=loaded,
                    reply_fn=reply_fn, stop_when=stop_when, trace_file=trace_file, checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every)
        names = sorted(t.name for t in agent.tools)
        if names != sorted(extra["tools"]):
            raise AgentloopError(f"the saved run had tools {', '.join(sorted(extra['tools']))}, this agent has "
                                 f"{', '.join(names) or 'none'}: pass the same custom tools to Agent.resume")
        agent.session, _ = load_session(agent.loaded, state)
        agent.transcript = extra["transcript"]
        agent._fed, agent._announced, agent.steps = extra["fed"], extra["announced"], extra["steps"]
        agent.tool_calls, agent.ingestions, agent._steps_end = extra["tool_calls"], extra["ingestions"], extra["steps_end"]
        agent._resumed = extra
        return agent

    # --- public -------------------------------------------------------------------------------
    def add_tool(self, fn: Tool | Callable[..., Any]) -> Tool:
        """Register a Python function (schema from its hints and docstring) or a Tool; usable as a decorator."""
        if self._chat is not None:
            raise AgentloopError("register tools before the first run: the model has already read the tool list")
        found = fn if isinstance(fn, Tool) else function_tool(fn)
        self.tools.append(found)
        return found

    def run(self, task: str | None = None) -> FinishEvent:
        """Run until a final answer, max_steps, a stop condition or the cap; returns how it ended."""
        finish = None
        for event in self.events(task):
            finish = event if event.kind == "finish" else finish
        return finish

    def events(self, task: str | None = None) -> Iterator[Event]:
        """Run like `run`, yielding every event. Each is written to the trace (tokens excepted) as it happens;
        an interrupted run (Ctrl-C, an exception, the caller stopping early) still ends with a finish record."""
        if self._broken:
            raise AgentloopError("this agent stopped in the middle of a step (interrupted, or an error); build a new Agent")
        if task is not None:
            self.transcript.append({"role": "user", "content": task})
        if not self.transcript or self.transcript[-1]["role"] not in ("user", "tool"):
            raise AgentloopError("nothing to do: give a task (`task:` in the spec, or run(task))")
        if self._chat is None:
            self._start()
        resumed, self._resumed = self._resumed if task is None else None, None
        if not resumed:
            self._steps_end = self.steps + self.spec.max_steps
        finished = False
        try:
            for event in self._loop(resumed["reply"] if resumed else None):
                self._record(event)
                finished = event.kind == "finish"
                if self._checkpointer and self._checkpointer.observe(event, between_steps=event.kind == "token"):
                    self._save_checkpoint(event.step + 1)  # tokens come only from the reply being decoded
                if finished and not event.error:
                    self._save_checkpoint(None)
                yield event
        except BaseException as exc:
            if not finished:
                self._broken = True
                reason, message = interruption(exc) or ("error", f"{type(exc).__name__}: {exc}")
                self._record(self._finish(reason, error=True, message=message))
            raise

    @property
    def memory(self) -> MemoryStats:
        session = self.session
        return MemoryStats(cap_bytes=session.cap_bytes, cache_bytes=session.cache.held_bytes(),
                           allocated_bytes=session.cache.nbytes(), peak_bytes=session.peak_bytes,
                           logical_tokens=session.cache.logical_len, physical_slots=session.cache.physical_len,
                           policy_actions=session.policy_actions, ingestions=self.ingestions)

    def remove_checkpoint(self) -> None:
        """Delete the checkpoint file (the CLI does when a run finished: nothing is left to resume)."""
        if self._checkpointer is not None:
            self._checkpointer.remove()

    def close(self) -> None:
        if self._trace is not None and self._own_trace:
            self._trace.close()

    # --- the loop -----------------------------------------------------------------------------
    def _opening(self) -> list[dict]:
        if self.spec.messages is not None:
            return [m.model_dump() for m in self.spec.messages]
        system = [{"role": "system", "content": self.spec.system}] if self.spec.system else []
        return system + ([{"role": "user", "content": self.spec.task}] if self.spec.task else [])

    def _start(self) -> None:
        self._toolbox = ToolBox(self.tools, timeout_s=self.spec.tool_timeout_s,
                                max_output_chars=self.spec.tool_output_chars)
        ingest = self.spec.memory.ingest
        for name in [*(ingest.exclude if ingest else []), *(ingest.per_tool if ingest else {})]:
            if name not in self._toolbox.tools:
                raise AgentloopError(f"memory.ingest names tool {name!r}, which the agent does not have (its tools: "
                                     f"{', '.join(self._toolbox.tools) or 'none'}); fix the name or add the tool")
        self._chat = ChatFormat(self.loaded.tokenizer, self._toolbox.schemas())
        if self._resumed:
            self._chat.plain_roles = self._resumed["plain_roles"]
            if self._trace is None and self.spec.trace:  # the resumed run goes on in the same trace
                self._trace = JsonlTrace(self.spec.trace, final_kind="finish", append=True)
            if self._trace is not None:
                self._trace.write({"kind": "resume", "checkpoint": str(self._checkpointer.path), "steps": self.steps,
                                   "reply_tokens": self._resumed["reply"], "tokens": len(self.session.token_ids),
                                   "policy_actions": self.session.policy_actions})
            return
        if self._trace is None and self.spec.trace:
            self._trace = JsonlTrace(self.spec.trace, final_kind="finish")
            if self._trace.renamed:  # a checkpoint records where the trace really is, for the resumed run
                self.spec = self.spec.model_copy(update={"trace": str(self._trace.path)})
        if self._trace is not None:
            self._trace.write({"kind": "run", "agent": True, "task": self.spec.model_dump(mode="json"),
                               "model_source": self.loaded.source, "workspace": str(self.workspace),
                               "tools": self._toolbox.schemas(), "cap_bytes": self.session.cap_bytes,
                               "cap_slots": self.session.cap_slots})

    def _loop(self, resume_reply: int | None = None) -> Iterator[Event]:
        """The turns; `resume_reply` (restored from a checkpoint): the pending turns are already fed and the
        reply has that many tokens decoded."""
        for message in self.transcript[self._announced:]:
            yield MessageEvent(t=self._now(), step=self.steps, message=message)
        self._announced = len(self.transcript)
        while self.steps < self._steps_end:
            try:
                if resume_reply is None:
                    self._save_checkpoint(None)  # a resumed run repeats at most this turn's tool calls
                    yield from self._feed_pending()
                text, stop = yield from self._reply(resume_reply or 0)
                resume_reply = None
            except AgentloopError as exc:  # e.g. a tool result the cap cannot hold and the policy cannot shrink
                self._broken = True  # the cache may hold part of a turn
                yield self._finish("error", error=True, message=str(exc))
                return
            self.steps += 1
            parsed = parse_tool_calls(text)
            yield self._append(_assistant_message(text, parsed))
            self._fed = len(self.transcript)  # the cache now ends with this reply
            if stop is not None and stop.reason == "mem_cap":
                yield self._finish("mem_cap", error=stop.error, message=stop.message)
                return
            if any(s in text for s in self.spec.stop_on):
                yield self._finish("stop_condition", message="the reply contains a stop_on string")
                return
            if not parsed.calls and not parsed.errors:
                yield self._finish("final_answer", answer=parsed.content)
                return
            yield from self._run_calls(parsed)
            if self.stop_when is not None and self.stop_when(self):
                yield self._finish("stop_condition", message="stop_when returned True")
                return
        yield self._finish("max_steps", message=f"{self.spec.max_steps} replies without a final answer")

    def _reply(self, start: int = 0):
        """Generator: the assistant's reply into the cache; returns (text, the decode's StopEvent or None).
        `start` > 0: a decoded reply restored from a checkpoint, continued at that token."""
        if self.reply_fn is None or start:
            return (yield from self._reply_decoded(start))
        text = self.reply_fn([dict(m) for m in self.transcript])
        if text is None:  # the script leaves this reply to the model
            return (yield from self._reply_decoded())
        yield from self.session.feed(self._chat.encode(text))
        return text, None

    def _reply_decoded(self, start: int = 0):
        stop = None
        for event in self.session.generate(self.spec.generation, start=start):
            stop = event if event.kind == "stop" else stop
            yield event
        return stop.text, stop

    def _run_calls(self, parsed: ParsedCalls) -> Iterator[Event]:
        for k, error in enumerate(parsed.errors, 1):
            content = f"error: {error}"
            yield ToolResultEvent(t=self._now(), step=self.steps, call_id=f"error-{k}", tool="error", ok=False,
                                  error=error, chars=len(content), seconds=0.0)
            yield self._append({"role": "tool", "tool_call_id": f"error-{k}", "name": "error", "content": content})
        for call in parsed.calls:
            self.tool_calls += 1
            yield ToolCallEvent(t=self._now(), step=self.steps, call_id=call.id, tool=call.name,
                                arguments=call.arguments)
            result = self._toolbox.call(call.name, call.arguments)
            yield ToolResultEvent(t=self._now(), step=self.steps, call_id=call.id, tool=call.name, ok=result.ok,
                                  error=result.error, chars=len(result.content), seconds=result.seconds,
                                  truncated=result.truncated)
            yield self._append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result.content})

    def _feed_pending(self) -> Iterator[Event]:
        """Prefill the messages not yet in the cache; compact long tool results as soon as each is in."""
        text = self._chat.pending_text(self.transcript, self._fed)
        for piece, message in self._split(text, self.transcript[self._fed:]):
            ids = self._chat.encode(piece)
            if message is None:
                yield from self.session.feed(ids)
            else:
                yield from self._ingest(ids, message)
        self._fed = len(self.transcript)

    def _split(self, text: str, pending: list[dict]) -> list[tuple[str, dict | None]]:
        """`text` cut around the contents of the pending tool results that may be compacted on ingestion."""
        ingest = self.spec.memory.ingest
        pieces, pos = [], 0
        for message in pending:
            if ingest is None or message["role"] != "tool" or ingest.for_tool(message.get("name")) is None:
                continue
            at = text.find(message["content"], pos)
            if at < 0 or not message["content"]:  # the template rewrote it: fed with the text around it
                continue
            pieces += [(text[pos:at], None), (message["content"], message)]
            pos = at + len(message["content"])
        return pieces + [(text[pos:], None)]

    def _ingest(self, ids: list[int], message: dict) -> Iterator[Event]:
        """Prefill a tool result and compact it on ingestion (agentloop/ingest.py), one IngestEvent per piece."""
        spec = self.spec.memory.ingest.for_tool(message.get("name"))
        # the pending task as a new user turn: the probe then reads it and drafts the assistant's reply to it
        task_ids = turn_ids(self._chat.tokenizer, self._pending_task()) if spec.task_queries else []
        about = dict(step=self.steps, call_id=message.get("tool_call_id", ""), tool=message.get("name", ""),
                     tokens=len(ids))
        compacted = False
        for item in ingest_result(self.session, ids, spec, task_ids, seed=self.spec.generation.seed + 1000 * self.ingestions):
            if isinstance(item, dict):
                compacted |= item.get("skipped") is None
                item = IngestEvent(t=self._now(), **about, **item)
            yield item
        self.ingestions += compacted

    # --- helpers ------------------------------------------------------------------------------
    def _pending_task(self) -> str:
        return next((m["content"] for m in reversed(self.transcript) if m["role"] == "user"), "")

    def _append(self, message: dict) -> MessageEvent:
        self.transcript.append(message)
        self._announced = len(self.transcript)
        return MessageEvent(t=self._now(), step=self.steps, message=message)

    def _finish(self, reason: str, error: bool = False, message: str = "", answer: str = "") -> FinishEvent:
        stats = self.memory
        return FinishEvent(t=self._now(), reason=reason, error=error, message=message, answer=answer,
                           steps=self.steps, tool_calls=self.tool_calls, ingestions=self.ingestions,
                           policy_actions=stats.policy_actions, cache_bytes=stats.cache_bytes,
                           peak_bytes=stats.peak_bytes, cap_bytes=stats.cap_bytes)

    def _save_checkpoint(self, reply: int | None) -> None:
        """Save the session and the run's state; `reply`: tokens of the reply being decoded (None: between turns)."""
        if self._checkpointer is None or not self._checkpointer.enabled:
            return
        spec = self.spec.model_dump(mode="json", exclude_unset=True)
        spec["workspace"] = str(self.workspace) if self.workspace else None
        self._checkpointer.save(self.session, {
            "kind": "agent", "spec": spec, "tools": [t.name for t in self.tools], "transcript": self.transcript,
            "fed": self._fed, "announced": self._announced, "steps": self.steps, "tool_calls": self.tool_calls,
            "ingestions": self.ingestions, "steps_end": self._steps_end, "plain_roles": self._chat.plain_roles,
            "reply": reply})

    def _record(self, event: Event) -> None:
        if self._trace is not None and event.kind != "token":
            self._trace.write(event)

    def _now(self) -> float:
        return round(time.perf_counter() - self._t0, 6)


def _assistant_message(text: str, parsed: ParsedCalls) -> dict:
    message = {"role": "assistant", "content": text}
    if parsed.calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in parsed.calls]
    return message


def _signature(function: dict) -> str:
    """`- name(arg: type, ...): description` for a tool's OpenAI-style function schema."""
    properties = function["parameters"].get("properties", {})
    arguments = ", ".join(f"{name}: {spec.get('type', 'any')}" for name, spec in properties.items())
    return f"- {function['name']}({arguments}): {function['description']}"
