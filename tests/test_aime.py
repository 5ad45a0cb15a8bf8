"""`agentloop eval aime`: the answer parser, bad input, and one capped run end to end on the default model."""

from __future__ import annotations

import json

import pytest

from agentloop.assets import cache_dir
from agentloop.errors import AgentloopError
from agentloop.evals import aime
from agentloop.evals.aime import FORCED_PREFIX, parse_answer

PROBLEMS = [  # the first rambles past the cap (compactions, then a forced answer); the second ends itself
    {"problem": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$", "answer": "70"},
    {"problem": "Compute 2 + 2.", "answer": "4"},
]


@pytest.mark.parametrize("text,expected", [
    ("so x = 12, hence \\boxed{204}. Checking 17 and 31 again", 204),  # boxed beats later integers
    ("\\boxed{5} then \\boxed{ 042 } and 7", 42),  # the last boxed integer
    ("\\boxed{12} thinking 33" + FORCED_PREFIX + "It is 071.", 71),  # the forced answer beats boxed
    ("\\boxed{12} thinking" + FORCED_PREFIX + "I do not know", 12),  # forced but no integer: boxed
    ("x = 5</think>The answer is 1,000 or 2.5 or 314.", 314),  # only integers 0-999 after </think>
    ("Let me think about 4 and 9</think>I cannot say.", None),
    ("no numbers here", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(AgentloopError, match="cannot read --data .*missing.jsonl"):
        aime.main(["--data", str(tmp_path / "missing.jsonl"), "--no-write"])


@pytest.mark.parametrize("line,match", [("{not json", "line 2 is not valid JSON"),
                                        ('{"problem": "p"}', "line 2 lacks .* integer 'answer'"),
                                        ('{"problem": "p", "answer": "x12"}', "line 2 lacks")])
def test_bad_jsonl_line_is_a_clear_error(tmp_path, line, match):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(PROBLEMS[0]) + "\n" + line + "\n")
    with pytest.raises(AgentloopError, match=match):
        aime.main(["--data", str(data), "--no-write"])


def test_cap_without_room_to_think_is_a_clear_error():
    with pytest.raises(AgentloopError, match="leaves no room to think"):
        aime.thinking_slots(30, 33)


def test_capped_run_compacts_forces_answers_and_writes_results(tmp_path, smollm2, capsys):
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = tmp_path / "results"
    model_dir = cache_dir() / "models" / "smollm2-135m"  # the converted model, given by path as a user would
    assert aime.main(["--model", str(model_dir), "--data", str(data), "--mem-cap", "160tok", "--max-compactions", "6",
                      "--max-new-tokens", "400", "--greedy", "--name", "run", "--out", str(out)]) == 0

    records = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1]
    assert all(r["physical_peak"] <= 160 for r in records), "the physical cap is hard, answer phase included"
    assert all(r["compactions"] <= 6 for r in records) and max(r["compactions"] for r in records) > 0
    assert max(r["logical_len"] for r in records) > 160, "compaction must let the run go past the physical cap"
    assert all(r["forced"] or r["predicted"] is not None for r in records)
    reserve = len(smollm2.tokenizer(FORCED_PREFIX, add_special_tokens=False)["input_ids"]) + aime.ANSWER_TOKENS
    for r in records:
        assert r["forced"] == (FORCED_PREFIX in r["tail"])
        if r["stop"] == "mem_cap":  # thinking stopped short of the cap by the reserve; the answer used it
            assert r["forced"] and r["physical_peak"] > 160 - reserve
    assert records[1]["stop"] == "eos" and not records[1]["forced"] and records[1]["correct"]  # "2 + 2 = 4"

    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["problems"] == 2 and summary["score"] == sum(r["correct"] for r in records)
    markdown = (out / "run.md").read_text()
    assert "| physical KV length | effective length (max / median) | score | compactions (max) |" in markdown
    assert f"| 160tok (peak {max(r['physical_peak'] for r in records)}) |" in markdown
    assert (out / "run.png").stat().st_size > 0
    assert "problem 0 sample 0" in capsys.readouterr().out
