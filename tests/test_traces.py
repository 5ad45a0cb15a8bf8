"""Traces that cannot be corrupted or lost: exclusive files, whole lines, and a final record however a run ends
(Ctrl-C at start-up, during the prefill, the decode or a compaction; SIGTERM; an exception)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agentloop.errors import AgentloopError, Terminated
from agentloop.trace import JsonlTrace


def read_trace(path: Path) -> list[dict]:
    """Every line a whole JSON object (strict JSON: no NaN), each ending with a newline."""
    data = path.read_text()
    assert data.endswith("\n"), "the last record is cut"
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) for line in data.splitlines()]


# ---- the trace file itself


def test_an_existing_trace_is_never_written_over(tmp_path):
    path = tmp_path / "runs" / "t.jsonl"
    path.parent.mkdir()
    path.write_text('{"kind": "run", "earlier": true}\n')
    with JsonlTrace(path) as trace:
        trace.write({"kind": "stop", "reason": "eos"})
    assert trace.renamed and trace.path == tmp_path / "runs" / "t-2.jsonl"
    assert path.read_text() == '{"kind": "run", "earlier": true}\n'
    assert read_trace(trace.path) == [{"kind": "stop", "reason": "eos"}]


def test_concurrent_writers_on_one_path_get_their_own_files(tmp_path):
    path, traces = tmp_path / "t.jsonl", []
    start = threading.Barrier(4)

    def run(k: int) -> None:
        start.wait()
        with JsonlTrace(path) as trace:
            traces.append(trace)
            for i in range(300):
                trace.write({"kind": "token", "writer": k, "i": i, "text": "x" * (i % 50)})
            trace.write({"kind": "stop", "reason": "max_new_tokens", "writer": k})

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(t.path.name for t in traces) == ["t-2.jsonl", "t-3.jsonl", "t-4.jsonl", "t.jsonl"]
    for trace in traces:
        records = read_trace(trace.path)
        assert len({r["writer"] for r in records}) == 1 and [r["i"] for r in records[:-1]] == list(range(300))
        assert records[-1]["kind"] == "stop"


@pytest.mark.parametrize("exc,reason", [(KeyboardInterrupt(), "cancelled"), (Terminated(), "terminated"),
                                        (ValueError("boom"), "error"), (AgentloopError("the cap is full"), "error")])
def test_a_run_that_dies_ends_with_a_final_record(tmp_path, exc, reason):
    path = tmp_path / "t.jsonl"
    with pytest.raises(type(exc)), JsonlTrace(path, final_kind="finish") as trace:
        trace.write({"kind": "run"})
        trace.write({"kind": "step", "value": float("nan")})  # JSON has no NaN: written as null
        raise exc
    records = read_trace(path)
    assert records[1] == {"kind": "step", "value": None}
    assert records[-1]["kind"] == "finish" and records[-1]["reason"] == reason and records[-1]["error"] is True
    assert trace.records == 3


def test_death_before_the_run_starts(tmp_path):
    with pytest.raises(KeyboardInterrupt), JsonlTrace(tmp_path / "a.jsonl", opening={"kind": "run", "task": "x"}):
        raise KeyboardInterrupt
    assert [r["kind"] for r in read_trace(tmp_path / "a.jsonl")] == ["run", "stop"]
    with pytest.raises(AgentloopError), JsonlTrace(tmp_path / "b.jsonl", opening={"kind": "run"}):
        raise AgentloopError("bad input")  # found before anything ran: no trace is left
    assert not (tmp_path / "b.jsonl").exists()


def test_a_resumed_run_appends_to_its_own_trace_and_still_ends_with_a_final_record(tmp_path):
    """append=True (run --resume) is the one explicit way into an existing file: no `-2` name, a line cut by a
    kill dropped, the earlier records kept, and the resumed run's death still written as its final record."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"kind": "run", "prompt_tokens": 3}\n{"kind": "token", "step": 0}\n{"kind": "tok')
    with pytest.raises(KeyboardInterrupt), JsonlTrace(path, append=True, opening={"kind": "run"}) as trace:
        trace.write({"kind": "resume", "tokens": 4})
        raise KeyboardInterrupt
    assert not trace.renamed and trace.path == path and not (tmp_path / "t-2.jsonl").exists()
    records = read_trace(path)
    assert [r["kind"] for r in records] == ["run", "token", "resume", "stop"]  # no second opening record
    assert (records[-1]["reason"], records[-1]["error"]) == ("cancelled", True)
    with JsonlTrace(path, append=True) as again:  # resumed again, to the end
        again.write({"kind": "resume", "tokens": 5})
        again.write({"kind": "stop", "reason": "eos"})
    assert [r["kind"] for r in read_trace(path)][-3:] == ["stop", "resume", "stop"]
    assert read_trace(path)[-1] == {"kind": "stop", "reason": "eos"}  # ended by the run: nothing added
    with JsonlTrace(path) as fresh:  # without append the rule holds: the trace is not written over
        fresh.write({"kind": "run"})
    assert fresh.path == tmp_path / "t-2.jsonl" and len(read_trace(path)) == 6


def test_a_resume_refused_before_it_starts_leaves_the_trace_as_it_was(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"kind": "run"}\n{"kind": "token", "step": 0}\n')
    with pytest.raises(AgentloopError), JsonlTrace(path, append=True):
        raise AgentloopError("the checkpoint was written by another model")
    assert path.read_text() == '{"kind": "run"}\n{"kind": "token", "step": 0}\n'  # neither removed nor added to


# ---- the CLI, killed at every stage

TASK = """
    model: smollm2-135m
    task: {task}
    generation: {{max_new_tokens: {tokens}, ignore_eos: true}}
    memory: {{cap: {cap}, policy: {policy}}}
"""


def start(tmp_path: Path, trace: Path, task: str = "Write a long story about the sea.", tokens: int = 2000,
          cap: str = "64MB", policy: str = "streaming") -> subprocess.Popen:
    path = tmp_path / f"task-{trace.stem}.yaml"
    path.write_text(textwrap.dedent(TASK.format(task=json.dumps(task), tokens=tokens, cap=cap, policy=policy)))
    return subprocess.Popen([sys.executable, "-m", "agentloop.cli", "run", str(path), "--quiet", "--trace", str(trace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            # a test runner started in the background ignores SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(trace: Path, done, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = trace.read_text().splitlines() if trace.exists() else None
        if lines is not None and done([json.loads(line) for line in lines if line.endswith("}")]):
            return
        time.sleep(0.02)
    pytest.fail(f"{trace} never reached the awaited state")


def stopped(process: subprocess.Popen, code: int, word: str) -> None:
    _, stderr = process.communicate(timeout=300)
    # after a Ctrl-C, CPython may end the process by SIGINT itself rather than exit 130 (a shell sees 130 either way)
    assert process.returncode in ((code, -signal.SIGINT) if code == 130 else (code,)), stderr
    assert "Traceback" not in stderr and stderr.strip() == f"agentloop: {word}", stderr


def test_ctrl_c_at_start_up(tmp_path):
    trace = tmp_path / "t.jsonl"
    process = start(tmp_path, trace)
    wait_for(trace, lambda records: True)  # the file exists: the model is not loaded yet
    process.send_signal(signal.SIGINT)
    stopped(process, 130, "interrupted")
    records = read_trace(trace)
    assert records[0]["kind"] == "run" and "prefill" not in [r["kind"] for r in records]
    assert (records[-1]["kind"], records[-1]["reason"]) == ("stop", "cancelled")


def test_ctrl_c_during_the_prefill(tmp_path):
    trace = tmp_path / "t.jsonl"
    process = start(tmp_path, trace, task="Summarize: " + "the tide came in and went out again, " * 500)
    wait_for(trace, lambda records: any(r["kind"] == "run" and "model_source" in r for r in records))
    process.send_signal(signal.SIGINT)
    stopped(process, 130, "interrupted")
    kinds = [r["kind"] for r in read_trace(trace)]
    assert kinds == ["run", "stop"], kinds  # the prefill had not finished
    assert read_trace(trace)[-1]["reason"] == "cancelled"


def test_ctrl_c_during_the_decode(tmp_path):
    trace = tmp_path / "t.jsonl"
    process = start(tmp_path, trace)
    wait_for(trace, lambda records: sum(r["kind"] == "token" for r in records) >= 5)
    process.send_signal(signal.SIGINT)
    stopped(process, 130, "interrupted")
    records = read_trace(trace)
    assert [r["kind"] for r in records[:2]] == ["run", "prefill"] and records[-2]["kind"] == "token"
    assert (records[-1]["kind"], records[-1]["reason"]) == ("stop", "cancelled")


def test_ctrl_c_during_a_compaction(tmp_path, smollm2):
    from agentloop.chat import encode_messages

    task = "Tell me about the sea. " * 40
    prompt = len(encode_messages(smollm2.tokenizer, [{"role": "user", "content": task}]))
    trace = tmp_path / "t.jsonl"  # the cap is reached at the third token: am compacts the prompt
    process = start(tmp_path, trace, task=task, cap=f"{prompt + 3}tok", policy="am")
    wait_for(trace, lambda records: any(r["kind"] == "pause" for r in records))  # am is compacting now
    process.send_signal(signal.SIGINT)
    stopped(process, 130, "interrupted")
    records = read_trace(trace)
    assert records[-2]["kind"] == "pause" and "policy" not in [r["kind"] for r in records], "it was not compacting"
    assert (records[-1]["kind"], records[-1]["reason"]) == ("stop", "cancelled")


def test_sigterm(tmp_path):
    trace = tmp_path / "t.jsonl"
    process = start(tmp_path, trace)
    wait_for(trace, lambda records: any(r["kind"] == "token" for r in records))
    process.terminate()
    stopped(process, 143, "terminated")
    records = read_trace(trace)
    assert (records[-1]["kind"], records[-1]["reason"], records[-1]["message"]) == ("stop", "terminated",
                                                                                    "terminated (SIGTERM)")


def test_concurrent_runs_on_one_path(tmp_path):
    trace = tmp_path / "same.jsonl"
    processes = [start(tmp_path, trace, tokens=4) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    files = sorted(tmp_path.glob("same*.jsonl"))
    assert [f.name for f in files] == ["same-2.jsonl", "same.jsonl"]
    for f in files:
        records = read_trace(f)
        assert [r["kind"] for r in records].count("run") == 1 and records[0]["kind"] == "run"
        assert records[-1]["kind"] == "stop" and records[-1]["reason"] == "max_new_tokens"
        assert sum(r["kind"] == "token" for r in records) == 4
    notes = [err for _, err in outputs if "exists; writing this run's trace to" in err]
    assert len(notes) == 1 and str(trace) in notes[0]
