"""The agent loop with scripted replies, teacher-forced through a real session.

Most tests run a tiny random model behind the real SmolLM2 tokenizer and chat template: the replies are
scripted (a tiny model's own text would be noise), but rendering, prefill, cache accounting, tool calls and
ingestion compaction all run for real. One test runs the same path on SmolLM2 itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agentloop import Agent, AgentloopError
from agentloop.cache import bytes_per_token
from agentloop.models import LoadedModel
from agentloop.task import IngestSpec

REPORT = Path(__file__).resolve().parent.parent / "examples" / "research" / "harbor.txt"  # ~2,300 SmolLM2 tokens


def call(name: str, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def script(*replies: str | None):
    """A reply_fn that plays `replies` in order (None: let the model decode that reply)."""
    queue = list(replies)
    return lambda transcript: queue.pop(0)


@pytest.fixture
def workspace(tmp_path) -> Path:
    (tmp_path / "notes.txt").write_text("Buy milk.\n")
    (tmp_path / "report.txt").write_text(REPORT.read_text())
    (tmp_path / "short.txt").write_text(REPORT.read_text()[:3500])  # ~800 tokens
    return tmp_path


def make_agent(loaded, workspace, *replies, **fields) -> Agent:
    fields.setdefault("task", "What do my notes say?")
    fields.setdefault("tools", ["read_file", "list_dir"])
    return Agent(loaded=loaded, workspace=str(workspace), reply_fn=script(*replies), **fields)


def full_render(agent: Agent) -> list[int]:
    """The whole transcript rendered at once, as a fresh run would prefill it."""
    return agent._chat.encode(agent._chat.render(agent.transcript))


def test_multi_step_run_feeds_each_token_once(tiny_chat, workspace):
    agent = make_agent(tiny_chat, workspace, call("list_dir"), call("read_file", path="notes.txt"),
                       call("read_file", path="notes.txt", start_line=1) + call("list_dir", path="."),
                       "Your notes say: buy milk.")
    events = list(agent.events())
    finish = events[-1]
    assert (finish.kind, finish.reason, finish.answer) == ("finish", "final_answer", "Your notes say: buy milk.")
    assert (finish.steps, finish.tool_calls) == (4, 4)
    roles = [m["role"] for m in agent.transcript]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
    assert agent.transcript[4]["content"] == "Buy milk.\n"
    assert agent.transcript[3]["tool_calls"][0]["function"] == {"name": "read_file", "arguments": {"path": "notes.txt"}}
    # the cache persists: every token was prefilled exactly once, and the cache holds the conversation as a full
    # render of the transcript would (up to the last reply's end-of-turn, which is only added with the next turn)
    prefilled = sum(e.tokens for e in events if e.kind == "prefill")
    assert prefilled == len(agent.session.token_ids) == agent.memory.logical_tokens
    rendered = full_render(agent)
    assert agent.session.token_ids == rendered[:len(agent.session.token_ids)]
    assert agent._chat.tokenizer.decode(rendered[len(agent.session.token_ids):]).startswith("<|im_end|>")


STRICT_TEMPLATE = (  # no tool role, and turns must alternate: as many templates of models without tool support
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
    "{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == m['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_without_a_tool_role_gets_results_as_user_turns(tiny_chat, workspace):
    import copy

    tokenizer = copy.deepcopy(tiny_chat.tokenizer)
    tokenizer.chat_template = STRICT_TEMPLATE
    strict = LoadedModel(model=tiny_chat.model, tokenizer=tokenizer, name="strict", source="config")
    agent = make_agent(strict, workspace, call("read_file", path="notes.txt") + call("list_dir"), "Buy milk.")
    finish = agent.run()
    assert (finish.reason, finish.tool_calls) == ("final_answer", 2)
    assert [m["role"] for m in agent.transcript] == ["user", "assistant", "tool", "tool", "assistant"]
    text = tokenizer.decode(agent.session.token_ids)
    # the two results of one reply arrive as one user turn, each under its tool's name
    assert "<|im_start|>user\n[read_file result]\nBuy milk.\n\n\n[list_dir result]\n" in text
    rendered = full_render(agent)  # still fed append-only: the cache equals a full render of the transcript
    assert agent.session.token_ids == rendered[:len(agent.session.token_ids)]
    # a refusal that is not about tool turns stops the run with the template's reason
    tokenizer.chat_template = STRICT_TEMPLATE.replace("'tool'", "'system'").replace("no tool role", "no system role")
    finish = make_agent(strict, workspace, "ok", system="Be brief.").run()
    assert finish.reason == "error" and "chat template refused the conversation (no system role)" in finish.message


def test_the_model_sees_tools_and_call_format_in_the_system_prompt(tiny_chat, workspace):
    agent = make_agent(tiny_chat, workspace, "Done.", system="You are careful.")
    agent.run()
    prompt = agent._chat.tokenizer.decode(agent.session.token_ids)
    assert prompt.startswith("<|im_start|>system\nYou are careful.\n\nYou can call these tools:\n- read_file(path: string")
    assert '<tool_call>{"name": "<tool name>"' in prompt


def test_bad_calls_and_bad_tools_are_answered_not_raised(tiny_chat, workspace):
    def explode(text: str) -> str:
        """Always fails."""
        raise RuntimeError("kaboom")

    def hang() -> str:
        """Never returns in time."""
        time.sleep(5)
        return "late"

    agent = make_agent(tiny_chat, workspace,
                       '<tool_call>{"name": "read_file", "arguments": {"path": </tool_call>',  # malformed JSON
                       call("teleport", to="mars"),  # unknown tool
                       call("explode", text="x"),  # raises
                       call("hang"),  # hangs past the timeout
                       call("read_file"),  # missing argument
                       "I could not do it.",
                       tools=["read_file", explode, hang], tool_timeout_s=0.5)
    finish = agent.run()
    assert (finish.reason, finish.steps) == ("final_answer", 6)
    answers = [m["content"] for m in agent.transcript if m["role"] == "tool"]
    assert answers[0].startswith("error: tool call 1 is not valid JSON")
    assert "unknown tool 'teleport'" in answers[1] and "read_file, explode, hang" in answers[1]
    assert answers[2] == "explode failed: RuntimeError: kaboom"
    assert answers[3] == "hang timed out after 0.5 s"
    assert "missing required argument 'path'" in answers[4]


def test_a_result_the_cap_cannot_hold_ends_the_run_with_one_line(tiny_chat, workspace):
    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory={"cap": "600tok"})
    finish = agent.run()
    assert (finish.reason, finish.error, finish.steps) == ("error", True, 1)
    assert "too small for the input" in finish.message and "\n" not in finish.message
    with pytest.raises(AgentloopError, match="in the middle of a step"):
        agent.run("again")


def test_max_steps_stop_on_and_stop_when(tiny_chat, workspace):
    finish = make_agent(tiny_chat, workspace, *[call("list_dir")] * 3, max_steps=3).run()
    assert (finish.reason, finish.steps, finish.answer) == ("max_steps", 3, "")
    finish = make_agent(tiny_chat, workspace, "All done. DONE", stop_on=["DONE"]).run()
    assert finish.reason == "stop_condition"
    agent = make_agent(tiny_chat, workspace, call("list_dir"), call("list_dir"))
    agent.stop_when = lambda a: a.tool_calls >= 2
    assert (agent.run().reason, agent.steps) == ("stop_condition", 2)


def test_a_new_task_continues_in_the_same_cache(tiny_chat, workspace):
    agent = make_agent(tiny_chat, workspace, call("read_file", path="notes.txt"), "Buy milk.", "Nothing else.")
    assert agent.run().answer == "Buy milk."
    held = len(agent.session.token_ids)
    assert agent.run("Anything else?").answer == "Nothing else."
    assert agent.session.token_ids[:held] == full_render(agent)[:held]
    assert agent.session.token_ids == full_render(agent)[:len(agent.session.token_ids)]
    with pytest.raises(AgentloopError, match="nothing to do"):
        agent.run()


def test_tools_register_as_functions_before_the_first_run(tiny_chat, workspace):
    agent = make_agent(tiny_chat, workspace, call("add", a=2, b=3), "5")

    @agent.add_tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    assert add(1, 1) == 2
    assert agent.run().answer == "5"
    assert agent.transcript[2]["content"] == "5"
    with pytest.raises(AgentloopError, match="before the first run"):
        agent.add_tool(add)


def _ingest_events(agent):
    events = list(agent.events())
    return events, [e for e in events if e.kind == "ingest"]


def test_long_tool_result_is_compacted_on_ingestion(tiny_chat, workspace):
    ingest = {"trigger_tokens": 500, "ratio": 0.25, "keep_first": 8, "keep_last": 8, "max_queries": 256}
    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), call("read_file", path="notes.txt"),
                       "Four incidents.", memory={"ingest": ingest})
    events, ingested = _ingest_events(agent)
    assert events[-1].reason == "final_answer" and len(ingested) == 1  # the short notes are not compacted
    event = ingested[0]
    assert event.tokens > 500 and event.skipped is None and event.tool == "read_file"
    middle = event.tokens - 16
    assert event.span[1] - event.span[0] == middle
    assert event.slots_after == 16 + round(0.25 * middle)
    assert agent.memory.physical_slots == agent.memory.logical_tokens - event.slots_before + event.slots_after
    per_slot = bytes_per_token(tiny_chat.model.config, tiny_chat.dtype, with_beta=True)
    assert event.bytes_after == (event.span[0] - 8 + event.slots_after) * per_slot  # the span's slots, now with β
    assert event.output_error is not None and event.details["method"] == "am-hak-fast"
    prefill = events[events.index(event) - 1]  # compacted right after the result itself was prefilled
    assert prefill.kind == "prefill" and prefill.tokens == event.tokens


def test_task_queries_add_the_pending_task_to_the_fit(tiny_chat, workspace):
    """With task_queries the pending user task (and a draft reply) joins the re-read: about a quarter more rows."""
    rows = {}
    for task_queries in (False, True):
        ingest = {"trigger_tokens": 500, "ratio": 0.25, "keep_first": 8, "keep_last": 8, "max_queries": 256,
                  "task_queries": task_queries}
        agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory={"ingest": ingest})
        events, ingested = _ingest_events(agent)
        assert events[-1].reason == "final_answer" and len(ingested) == 1
        rows[task_queries] = ingested[0].details["queries"]
    assert rows[False] == 256 and 256 * 1.2 < rows[True] < 256 * 1.5


def test_a_result_longer_than_piece_tokens_is_prefilled_and_compacted_piece_by_piece(tiny_chat, workspace):
    ingest = {"trigger_tokens": 200, "ratio": 0.25, "keep_first": 8, "keep_last": 8, "piece_tokens": 300,
              "max_queries": 256}
    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory={"ingest": ingest})
    events, ingested = _ingest_events(agent)
    assert events[-1].reason == "final_answer" and agent.memory.ingestions == 1
    tokens = ingested[0].tokens
    assert [e.piece for e in ingested] == [1, 2, 3] and 600 < tokens <= 900  # 3 near-equal pieces
    assert [(e.piece_start, e.piece_end) for e in ingested] == [(0, ingested[1].piece_start),
                                                                (ingested[1].piece_start, ingested[2].piece_start),
                                                                (ingested[2].piece_start, tokens)]
    prefills = [events[events.index(e) - 1] for e in ingested]  # each piece compacted right after its prefill
    assert all(p.kind == "prefill" for p in prefills) and sum(p.tokens for p in prefills) == tokens
    assert max(p.tokens for p in prefills) <= 300
    # the first piece keeps its first 8 tokens verbatim, the last its last 8, the middle one none
    assert [e.span[1] - e.span[0] for e in ingested] == [prefills[0].tokens - 8, prefills[1].tokens,
                                                          prefills[2].tokens - 8]
    assert [e.span[0] for e in ingested[1:]] == [ingested[0].span[0] - 8 + ingested[0].slots_after,
                                                 ingested[1].span[0] + ingested[1].slots_after]
    # the cache never held the whole result verbatim
    before_result = ingested[0].span[0] - 8
    per_slot = bytes_per_token(tiny_chat.model.config, tiny_chat.dtype, with_beta=False)
    assert agent.memory.peak_bytes < (before_result + tokens) * per_slot
    with pytest.raises(ValueError, match="piece_tokens"):
        IngestSpec(keep_first=48, keep_last=32, piece_tokens=100)


def test_joint_piece_budgets_recompact_the_earlier_pieces_with_each_new_one_in_the_same_slots(tiny_chat, workspace):
    held = {}
    for budgets in ("even", "joint"):
        ingest = {"trigger_tokens": 200, "ratio": 0.25, "keep_first": 8, "keep_last": 8, "piece_tokens": 300,
                  "max_queries": 256, "piece_budgets": budgets}
        agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory={"ingest": ingest})
        events, ingested = _ingest_events(agent)
        assert events[-1].reason == "final_answer" and agent.memory.ingestions == 1
        joined = [e.pieces_joined for e in ingested]
        assert joined == ([1, 1, 1] if budgets == "even" else [1, 2, 3])
        if budgets == "joint":  # each compaction covers every piece's middle so far, from the first one's
            assert [e.span[0] for e in ingested] == [ingested[0].span[0]] * 3
        held[budgets] = (agent.memory.physical_slots, [e.result_slots for e in ingested])
    assert held["joint"] == held["even"]


def test_ingestion_per_tool_overrides_and_exclude(tiny_chat, workspace):
    ingest = {"trigger_tokens": 500, "ratio": 0.5, "max_queries": 256, "per_tool": {"read_file": {"ratio": 0.1}}}
    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory={"ingest": ingest})
    _, ingested = _ingest_events(agent)
    assert ingested[0].slots_after == 32 + round(0.1 * (ingested[0].tokens - 32))
    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok",
                       memory={"ingest": {**ingest, "exclude": ["read_file"]}})
    assert _ingest_events(agent)[1] == []
    agent = make_agent(tiny_chat, workspace, "ok", memory={"ingest": {"exclude": ["grep"]}})
    with pytest.raises(AgentloopError, match="memory.ingest names tool 'grep'"):
        agent.run()


def test_pieces_fit_the_room_under_the_cap_so_ingestion_compacts_before_the_policy_must_act(tiny_chat, workspace):
    # the ~800-token result does not fit in the room left under the cap: it is fed in pieces that do, each
    # compacted on ingestion, and the online policy never has to act
    memory = {"cap": "600tok", "policy": "am", "ratio": 0.25, "protect_recent": 16, "options": {"max_queries": 256},
              "ingest": {"trigger_tokens": 200, "ratio": 0.25, "keep_first": 8, "keep_last": 8, "max_queries": 256}}
    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory=memory)
    events, ingested = _ingest_events(agent)
    assert events[-1].reason == "final_answer" and agent.memory.policy_actions == 0
    assert len(ingested) >= 2 and all(e.skipped is None for e in ingested)
    assert ingested[-1].piece_end == ingested[0].tokens > 600 - ingested[0].span[0]  # it would not have fit whole
    assert agent.memory.peak_bytes <= agent.memory.cap_bytes


def test_ingestion_takes_only_the_verbatim_tail_when_the_policy_acted_during_prefill(tiny_chat, workspace):
    # the room under the cap is shorter than a piece may be (2 x (keep_first + keep_last + 2) = 380), so the
    # ~800-token result is fed whole, in prefill chunks: the `am` policy compacts the cache while it goes in, so only
    # what came after its last action is still verbatim when the result is in, and that tail's head is not the
    # result's head (keep_first no longer applies; keep_last does)
    ingest = {"trigger_tokens": 300, "ratio": 0.25, "keep_first": 180, "keep_last": 8, "max_queries": 256}
    uncapped = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory={"ingest": ingest})
    before = _ingest_events(uncapped)[1][0].span[0] - 180  # tokens in the cache before the result
    memory = {"cap": f"{before + 300}tok", "policy": "am", "ratio": 0.25, "protect_recent": 16,
              "options": {"max_queries": 256}, "ingest": ingest}
    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), "ok", memory=memory)
    events, ingested = _ingest_events(agent)
    assert events[-1].reason == "final_answer" and agent.memory.policy_actions >= 2
    event = ingested[0]
    acted_at = [e.logical_len for e in events[:events.index(event)] if e.kind == "policy"][-1]
    tail = before + event.tokens - acted_at  # the result's tokens fed after the policy last acted
    assert event.skipped is None and (event.piece_start, event.piece_end) == (0, event.tokens)
    assert event.slots_before == tail < event.tokens


def test_trace_is_complete_and_an_interrupted_run_still_ends_it(tiny_chat, workspace, tmp_path):
    trace = tmp_path / "run.jsonl"
    agent = make_agent(tiny_chat, workspace, call("read_file", path="notes.txt"), "Buy milk.", trace=str(trace))
    agent.run()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "run" and kinds[-1] == "finish" and "token" not in kinds
    assert kinds.count("message") == 4 and kinds.count("tool_call") == kinds.count("tool_result") == 1
    assert records[0]["tools"][0]["function"]["name"] == "read_file"

    def interrupt(transcript):
        raise KeyboardInterrupt

    trace2 = tmp_path / "cancelled.jsonl"
    agent = Agent(loaded=tiny_chat, task="hi", tools=["list_dir"], workspace=str(workspace), reply_fn=interrupt,
                  trace=str(trace2))
    with pytest.raises(KeyboardInterrupt):
        agent.run()
    last = json.loads(trace2.read_text().splitlines()[-1])
    assert (last["kind"], last["reason"], last["message"]) == ("finish", "cancelled", "interrupted by the user (SIGINT)")
    with pytest.raises(AgentloopError, match="in the middle of a step"):
        agent.run("again")

    trace3 = tmp_path / "stopped.jsonl"
    agent = make_agent(tiny_chat, workspace, call("list_dir"), "ok", trace=str(trace3))
    events = agent.events()
    next(events)
    events.close()  # the caller stops iterating early
    assert json.loads(trace3.read_text().splitlines()[-1])["reason"] == "cancelled"


def test_smollm2_three_tool_calls_and_a_2000_token_result_compacted_on_ingestion(smollm2, workspace):
    ingest = {"trigger_tokens": 1000, "ratio": 0.1, "keep_first": 16, "keep_last": 16, "max_queries": 512,
              "piece_tokens": 4096}
    agent = make_agent(smollm2, workspace, call("list_dir"), call("read_file", path="report.txt"),
                       call("read_file", path="missing.txt"), None,  # the last reply is SmolLM2's own
                       max_steps=4, generation={"max_new_tokens": 16}, memory={"ingest": ingest})
    events = list(agent.events())
    finish = events[-1]
    assert finish.reason in ("final_answer", "max_steps") and finish.steps == 4 and finish.tool_calls >= 3
    assert [e.ok for e in events if e.kind == "tool_result"][:3] == [True, True, False]
    assert any(e.kind == "token" for e in events)  # the model decoded its reply on top of the compacted cache
    event = next(e for e in events if e.kind == "ingest")
    assert event.tokens >= 2000
    # bytes held afterwards <= ratio x span + the protected tokens (+ everything before the span), all with β
    per_slot = bytes_per_token(smollm2.model.config, smollm2.dtype, with_beta=True)
    before_span, middle = event.span[0] - 16, event.tokens - 32
    assert event.bytes_after <= (before_span + 0.1 * middle + 1 + 32) * per_slot
    assert event.bytes_after < 0.2 * event.bytes_before


def test_live_view_and_log_lines_render_every_event(tiny_chat, workspace):
    import io

    from rich.console import Console

    from agentloop.view import AgentView, describe_agent_event

    agent = make_agent(tiny_chat, workspace, call("read_file", path="short.txt"), '<tool_call>{"name": [</tool_call>',
                       "[bold]done[/]", memory={"ingest": {"trigger_tokens": 500, "max_queries": 256}})
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with AgentView(console, "test", 10**9, 5) as view:
        lines = []
        for event in agent.events():
            view.update(event)
            lines.append(describe_agent_event(event))
    panel = console.file.getvalue()
    assert "finished: final_answer" in panel and "1 on ingestion" in panel and "(malformed call)" in panel
    log = "\n".join(line for line in lines if line)
    assert "ingested read_file result" in log and "[bold]step 3[/] reply: \\[bold]done\\[/]" in log
