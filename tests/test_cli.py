"""The CLI as a user runs it: a subprocess, a complete trace (the one-line errors: test_bad_input.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from agentloop.errors import AgentloopError
from agentloop.memcap import parse_mem_cap


def agentloop(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentloop.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def write_task(tmp_path, body: str, name: str = "task.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


GOOD = """
    model: smollm2-135m
    task: Say hello.
    generation: {max_new_tokens: 8}
    memory: {cap: 64MB, policy: truncate}
"""


@pytest.mark.parametrize("text,value,unit", [
    ("8GB", 8 * 10**9, "bytes"), ("512MiB", 512 * 2**20, "bytes"), ("1.5GB", 1_500_000_000, "bytes"),
    ("2e9", 2_000_000_000, "bytes"), ("2048tok", 2048, "tokens"), ("64 MB", 64 * 10**6, "bytes"), ("100", 100, "bytes"),
])
def test_mem_cap_parsing(text, value, unit):
    cap = parse_mem_cap(text)
    assert (cap.value, cap.unit) == (value, unit)


@pytest.mark.parametrize("text", ["", "8XB", "GB", "-5GB", "1.5tok", "0MB", "8 G B", "1e400", "1e400tok", "1e30",
                                  "5e9tok", "nan", "inf", float("inf"), float("nan"), True])
def test_mem_cap_rejects_garbage(text):
    with pytest.raises(AgentloopError):
        parse_mem_cap(text)


def test_run_writes_a_complete_trace(tmp_path, smollm2):
    trace = tmp_path / "trace.jsonl"
    task = write_task(tmp_path, GOOD.replace("max_new_tokens: 8", "max_new_tokens: 60, ignore_eos: true"))
    result = agentloop("run", task, "--mem-cap", "40tok", "--policy", "streaming", "--trace", str(trace), "--quiet")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "run" and kinds[-1] == "stop" and "policy" in kinds
    assert kinds.count("token") == 60
    cap = records[0]["cap_bytes"]
    assert all(r["cache_bytes"] <= cap for r in records if r["kind"] == "token")
    assert records[-1]["text"] == result.stdout.rstrip("\n")


def test_info_reports_bytes_per_token(smollm2):
    result = agentloop("info", "smollm2-135m", "--mem-cap", "2048tok")
    assert result.returncode == 0, result.stderr
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x 2 x 4 bytes = 46,080 B/token in fp32, + 30 x 3 x 4 B of β;
    # 2,048 slots x 46,440 B = 90.7 MiB
    assert "46,080 B/token" in result.stdout and "cache 90.7 MiB (2,048 slots)" in result.stdout


def test_info_describes_a_shape_only_model_without_drawing_its_weights():
    # 8B parameters in fp32 are 30 GiB, more than this machine has: info must not materialize them
    result = agentloop("info", "random:llama-3.1-8b", "--mem-cap", "256tok", "--policy", "am")
    assert result.returncode == 0, result.stderr
    assert "8030.3M params" in result.stdout and "shapes only" in result.stdout
    # 32 layers x 8 KV heads x 128 dims x 2 x 4 bytes
    assert "262,144 B/token" in result.stdout and "cache 64.2 MiB (256 slots)" in result.stdout


def test_a_shape_only_model_larger_than_the_memory_left_is_refused_before_its_weights_are_drawn(monkeypatch):
    from agentloop import models

    monkeypatch.setattr(models, "_available_bytes", lambda device: 1 << 30)
    with pytest.raises(AgentloopError, match=r"random:qwen3-4b needs 15\.0 GiB of weights in float32 but cpu has "
                                             r"1\.0 GiB available: use a smaller shape or a 16-bit --dtype"):
        models.load_model("random:qwen3-4b", device="cpu")


# ---- agent tasks (a task with `tools`)

AGENT = """
    model: smollm2-135m
    task: List the files in the workspace.
    tools: [list_dir]
    max_steps: 2
    generation: {max_new_tokens: 8}
"""


def test_agent_run_json_events_and_a_complete_trace(tmp_path, smollm2):
    trace = tmp_path / "agent.jsonl"
    task = write_task(tmp_path, AGENT)
    result = agentloop("run", task, "--json", "--trace", str(trace), "--workspace", str(tmp_path), "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "message" and kinds[-1] == "finish" and "token" in kinds
    assert events[-1]["reason"] in ("final_answer", "max_steps") and events[-1]["steps"] == 1
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert records[0]["kind"] == "run" and records[0]["agent"] is True
    assert [r["kind"] for r in records[1:]] == [k for k in kinds if k != "token"]


def test_agent_ctrl_c_ends_the_trace_and_exits_130(tmp_path, smollm2):
    import signal
    import time

    trace = tmp_path / "agent.jsonl"
    task = write_task(tmp_path, AGENT.replace("max_new_tokens: 8", "max_new_tokens: 4000, ignore_eos: true"))
    process = subprocess.Popen([sys.executable, "-m", "agentloop.cli", "run", task, "--quiet", "--trace", str(trace),
                                "--workspace", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a test runner started in the background ignores SIGINT, and children inherit that
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not (trace.exists() and len(trace.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    last = json.loads(trace.read_text().splitlines()[-1])
    assert (last["kind"], last["reason"]) == ("finish", "cancelled")
