"""Resume after a kill: runs killed with SIGKILL at random moments continue from their checkpoint to exactly the
tokens (and, for agents, the transcript) an uninterrupted run produces. Plus the checkpoint's own guarantees:
a sampled run with compactions restored in-process continues identically, a failed save leaves the previous
checkpoint intact, and bad --resume input is one line with exit code 2."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentloop.checkpoint import Checkpointer, load_session, read_checkpoint, save_session
from agentloop.cli import main
from agentloop.loop import GenerationSettings, Session
from agentloop.policies import make_policy

HERE = Path(__file__).resolve().parent
REPORT = HERE.parent / "examples" / "research" / "harbor.txt"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def cli(*args: str) -> list[str]:
    return ["-m", "agentloop.cli", *args]


def finish(process: subprocess.Popen) -> list[dict]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def kill_when(process: subprocess.Popen, reached, delay: float = 0.0) -> list[dict]:
    """Read the JSON events the process prints; once `reached(event)`, wait `delay` s and SIGKILL it."""
    seen = []
    for line in process.stdout:
        seen.append(json.loads(line))
        if reached(seen[-1]):
            time.sleep(delay)
            assert process.poll() is None, "the run finished within the delay: kill earlier or with a shorter delay"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            return seen
    raise AssertionError(f"the run ended before the kill point (exit {process.wait()}): {process.stderr.read()[-2000:]}")


def final_tokens(trace: Path, prompt_tokens: int) -> list[int]:
    """The generation a trace describes: token records, cut back at each `resume` record to what it continued from."""
    tokens = []
    for line in trace.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "resume":
            del tokens[max(0, record["tokens"] - prompt_tokens):]
        elif record["kind"] == "token":
            tokens.append(record["token_id"])
    return tokens


# --- a tiny model run, killed five times ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(smollm2, tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a model directory the CLI loads."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    directory = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(directory)
    smollm2.tokenizer.save_pretrained(directory)
    return directory


def test_a_tiny_run_killed_at_five_random_moments_resumes_to_the_same_tokens(tiny_dir, tmp_path, capsys):
    task = tmp_path / "task.yaml"
    task.write_text(textwrap.dedent(f"""
        model: {tiny_dir}
        prompt: "The harbor authority met on Tuesday to discuss the dredging of the northern channel."
        generation: {{max_new_tokens: 400, ignore_eos: true}}
        memory: {{cap: 64tok, policy: am, options: {{record_window: 32, max_queries: 256}}}}
    """))
    reference = finish(start(*cli("run", str(task), "--json", "--trace", str(tmp_path / "ref.jsonl"))))
    ref_stop = reference[-1]
    assert ref_stop["kind"] == "stop" and ref_stop["new_tokens"] == 400 and ref_stop["policy_actions"] >= 10

    trace = tmp_path / "run.jsonl"
    rng = random.Random(19)
    points = sorted(rng.sample(range(5, 330), 5))  # with a delay of <= 50 ms the run is still going (~400 tok/s)
    process = start(*cli("run", str(task), "--json", "--trace", str(trace), "--checkpoint-every", "16"))
    for point in points:  # kill at a random token (plus a random fraction of a second), resume, and again
        kill_when(process, lambda e, p=point: e.get("kind") == "token" and e["step"] >= p, delay=rng.uniform(0, 0.05))
        assert trace.with_suffix(".ckpt").is_file()
        process = start(*cli("run", "--resume", str(trace), "--json", "--checkpoint-every", "16"))
    events = finish(process)
    stop = events[-1]
    assert stop["kind"] == "stop"
    assert (stop["text"], stop["new_tokens"], stop["reason"]) == (ref_stop["text"], 400, "max_new_tokens")
    assert stop["policy_actions"] == ref_stop["policy_actions"]
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    resumes = [r for r in records if r["kind"] == "resume"]
    assert len(resumes) == 5 and all(r["generated"] > 0 for r in resumes)
    prompt_tokens = records[0]["prompt_tokens"]
    assert final_tokens(trace, prompt_tokens) == [e["token_id"] for e in reference if e["kind"] == "token"]
    assert not trace.with_suffix(".ckpt").exists()  # a finished run leaves nothing to resume
    assert main(["run", "--resume", str(trace)]) == 2  # a finished run is not resumed again
    assert "it finished" in capsys.readouterr().err


def test_an_agent_task_run_from_the_cli_resumes_from_its_trace(tiny_dir, tmp_path):
    """`agentloop run --resume` on an agent task: the tiny model decodes its (final) reply itself; killed mid-reply,
    the resumed run ends with the same answer."""
    (tmp_path / "ws").mkdir()
    task = tmp_path / "agent.yaml"
    task.write_text(textwrap.dedent(f"""
        model: {tiny_dir}
        task: List the files.
        tools: [list_dir]
        workspace: ws
        generation: {{max_new_tokens: 120, ignore_eos: true}}
        memory: {{cap: 96tok, policy: am, options: {{record_window: 32, max_queries: 256}}}}
    """))
    reference = finish(start(*cli("run", str(task), "--json", "--trace", str(tmp_path / "ref.jsonl"))))[-1]
    assert reference["kind"] == "finish" and reference["policy_actions"] >= 1
    trace = tmp_path / "run.jsonl"
    kill_when(start(*cli("run", str(task), "--json", "--trace", str(trace), "--checkpoint-every", "8")),
              lambda e: e.get("kind") == "token" and e["step"] >= 60)
    resumed = finish(start(*cli("run", "--resume", str(trace), "--json")))[-1]
    assert (resumed["reason"], resumed["answer"], resumed["policy_actions"]) == (
        reference["reason"], reference["answer"], reference["policy_actions"])
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["kind"] for r in records].count("resume") == 1 and records[-1]["kind"] == "finish"
    assert not trace.with_suffix(".ckpt").exists()


# --- an agent run, killed mid tool loop and mid reply ------------------------------------------------------
def test_an_agent_run_killed_mid_tool_loop_and_mid_reply_finishes_with_the_same_transcript(smollm2, tmp_path):
    def workdir(name: str) -> Path:
        path = tmp_path / name
        (path / "ws").mkdir(parents=True)
        (path / "ws" / "notes.txt").write_text("Buy milk.\n")
        (path / "ws" / "report.txt").write_text(REPORT.read_text())
        return path

    script = str(HERE / "helpers" / "agent_run.py")
    reference = finish(start(script, str(workdir("ref"))))[-1]
    assert reference["ingestions"] == 1 and reference["policy_actions"] >= 1

    run = workdir("run")
    seen = kill_when(start(script, str(run)), lambda e: e.get("kind") == "tool_result" and e["step"] == 2)
    assert [e["kind"] for e in seen].count("tool_result") == 2
    seen = kill_when(start(script, str(run), "--resume"), lambda e: e.get("kind") == "token" and e["step"] >= 20)
    assert not any(e["kind"] == "tool_result" and e["step"] < 2 for e in seen)  # the first two calls ran once
    resumed = finish(start(script, str(run), "--resume"))
    events, final = resumed[:-1], resumed[-1]
    assert events[0]["kind"] == "token" and events[0]["step"] > 0  # it went on mid-reply
    assert _without_ids(final["transcript"]) == _without_ids(reference["transcript"])
    assert (final["tokens"], final["policy_actions"], final["ingestions"]) == (
        reference["tokens"], reference["policy_actions"], reference["ingestions"])
    records = [json.loads(line) for line in (run / "agent.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("resume") == 2 and records[-1]["kind"] == "finish"


def _without_ids(transcript: list[dict]) -> list[dict]:
    """Tool-call ids are random per parse (two uninterrupted runs differ in them too); everything else must match."""
    out = []
    for message in transcript:
        message = {k: v for k, v in message.items() if k != "tool_call_id"}
        if "tool_calls" in message:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in message["tool_calls"]]
        out.append(message)
    return out


# --- SmolLM2: killed after its second compaction -----------------------------------------------------------
def test_a_smollm2_run_killed_after_its_second_compaction_resumes_identically(smollm2, tmp_path):
    task = tmp_path / "story.yaml"
    task.write_text(textwrap.dedent("""
        model: smollm2-135m
        task: Write a long story about a lighthouse keeper and a storm.
        generation: {max_new_tokens: 260, ignore_eos: true}
        memory: {cap: 128tok, policy: am}
    """))
    reference = finish(start(*cli("run", str(task), "--json", "--trace", str(tmp_path / "ref.jsonl"))))
    assert sum(e["kind"] == "policy" for e in reference) >= 3

    trace = tmp_path / "run.jsonl"
    compactions, after = 0, 0

    def after_the_second(event: dict) -> bool:  # three tokens after the second compaction
        nonlocal compactions, after
        compactions += event.get("kind") == "policy"
        after += compactions == 2 and event.get("kind") == "token"
        return after == 3

    kill_when(start(*cli("run", str(task), "--json", "--trace", str(trace))), after_the_second)
    resumed = finish(start(*cli("run", "--resume", str(trace), "--json")))
    resume = next(json.loads(line) for line in trace.read_text().splitlines() if '"resume"' in line)
    assert resume["policy_actions"] == 2  # the checkpoint saved right after the second compaction
    assert sum(e["kind"] == "policy" for e in resumed) >= 1  # the third (and later) ran after the resume
    assert resumed[-1]["text"] == reference[-1]["text"] and resumed[-1]["new_tokens"] == 260
    assert resumed[-1]["policy_actions"] == reference[-1]["policy_actions"]
    prompt_tokens = json.loads(trace.read_text().splitlines()[0])["prompt_tokens"]
    assert final_tokens(trace, prompt_tokens) == [e["token_id"] for e in reference if e["kind"] == "token"]


# --- the checkpoint itself --------------------------------------------------------------------------------
def test_a_sampled_run_with_compactions_restored_in_process_continues_identically(tiny_llama, tmp_path):
    """Sampling (the RNG state), the am policy's counters and kept queries, the recent-query recorder: all restored."""
    settings = GenerationSettings(max_new_tokens=150, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    path = tmp_path / "run.ckpt"

    def run(save_at: int | None = None) -> tuple[Session, list[int]]:
        session = Session(tiny_llama, cap="64tok", policy=make_policy("am", record_window=32, max_queries=256))
        list(session.feed(list(range(5, 45))))
        tokens = []
        for event in session.generate(settings):
            if event.kind == "token":
                tokens.append(event.token_id)
                if event.step + 1 == save_at:
                    save_session(session, path, {"note": "mid-run"})
                    return session, tokens
        return session, tokens

    reference, ref_tokens = run()
    saved, tokens = run(save_at=77)
    assert saved.policy_actions >= 2 and saved.policy.repeat_memory.rows  # compacted, with queries kept
    restored, extra = load_session(tiny_llama, path)
    assert extra == {"note": "mid-run"}
    assert restored.token_ids == saved.token_ids and restored.cache.nbytes() == saved.cache.nbytes()
    assert restored.policy.compactions == saved.policy.compactions
    for layer, rows in saved.policy.repeat_memory.rows.items():
        assert torch.equal(restored.policy.repeat_memory.rows[layer], rows)
    tokens += [e.token_id for e in restored.generate(settings, start=77) if e.kind == "token"]
    assert tokens == ref_tokens
    assert restored.policy_actions == reference.policy_actions and restored.peak_bytes == reference.peak_bytes


def test_a_save_that_fails_leaves_the_previous_checkpoint(tiny_llama, tmp_path, monkeypatch):
    session = Session(tiny_llama, cap="64tok", policy=make_policy("streaming"))
    list(session.feed(list(range(5, 25))))
    path = tmp_path / "run.ckpt"
    save_session(session, path, {"n": 1})
    list(session.feed([7, 8, 9]))

    def torn(state, f):  # the process dies half-way through writing
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        save_session(session, path, {"n": 2})
    monkeypatch.undo()
    assert read_checkpoint(path)["extra"] == {"n": 1} and len(read_checkpoint(path)["token_ids"]) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left behind


def test_checkpointer_saves_after_a_compaction_only_between_steps(tmp_path):
    class Event:
        def __init__(self, kind, tokens=0):
            self.kind, self.tokens = kind, tokens

    checkpointer = Checkpointer(tmp_path / "x.ckpt", every=4)
    assert not checkpointer.observe(Event("policy"), between_steps=False)  # mid decode step: wait
    assert checkpointer.observe(Event("token"), between_steps=True)  # the next token saves it
    checkpointer.pending, checkpointer.tokens = False, 0
    assert [checkpointer.observe(Event("token"), between_steps=True) for _ in range(4)] == [False] * 3 + [True]
    assert not Checkpointer(tmp_path / "y.ckpt", every=0).observe(Event("policy"), between_steps=True)  # off


@pytest.mark.parametrize("args,needle", [
    (["--resume", "nowhere.jsonl"], "no checkpoint"),
    (["--resume", "nowhere.ckpt"], "does not exist"),
    (["--resume", "{junk}"], "not a readable agentloop checkpoint"),
    (["--resume", "{ckpt}", "--mem-cap", "1MB"], "drop --mem-cap"),
    (["{task}", "--resume", "{ckpt}"], "drop the task file"),
    (["--checkpoint-every", "-1", "{task}"], "--checkpoint-every must be >= 0"),
    ([], "give a task file to run, or --resume"),
])
def test_bad_resume_input_is_one_line(args, needle, tmp_path, tiny_llama, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    ckpt = tmp_path / "run.ckpt"
    session = Session(tiny_llama)
    list(session.feed([1, 2, 3]))
    save_session(session, ckpt, {"kind": "run"})
    task = tmp_path / "task.yaml"
    task.write_text("prompt: hi\n")
    argv = ["run", *(a.format(junk=junk, ckpt=ckpt, task=task) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
