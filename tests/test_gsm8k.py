"""`agentloop eval gsm8k`: the answer parser, the dataset reader's errors, and a capped run on a tiny model."""

from __future__ import annotations

import json

import pytest

from agentloop.errors import AgentloopError
from agentloop.evals import gsm8k


@pytest.mark.parametrize("text,expected", [
    ("She sells 9 eggs at $2, so 18 dollars. The answer is 18.", 18),
    ("3 + 4 = 7, then 7 * 2 = 14. The answer is $1,250.50 in total.", 1250.5),  # commas and decimals
    ("The answer is 12. Wait, 5 more: 17.", 12),  # the stated answer beats later numbers
    ("It makes 42 in all", 42),  # no "answer is": the last number
    ("no idea", None),
])
def test_parse_answer(text, expected):
    assert gsm8k.parse_answer(text) == expected


def test_reads_rows_and_rejects_rows_without_a_final_number(tmp_path):
    good = {"question": "Q?", "answer": "2 + 2 = 4\n#### 1,004"}
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert gsm8k.load_gsm8k(str(path), limit=None) == [{"id": 0, "question": "Q?", "answer": 1004.0},
                                                         {"id": 1, "question": "Q?", "answer": 1004.0}]
    assert len(gsm8k.load_gsm8k(str(path), limit=1)) == 1
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": "Q?", "answer": "no number"}) + "\n")
    with pytest.raises(AgentloopError, match="line 2 is not a GSM8K row"):
        gsm8k.load_gsm8k(str(path), limit=None)
    with pytest.raises(AgentloopError, match="cannot read --data"):
        gsm8k.load_gsm8k(str(tmp_path / "missing.jsonl"), limit=None)


def test_capped_run_compacts_under_the_cap(tiny_llama):
    from agentloop.evals.online_fidelity import policy_for

    result = gsm8k.solve(tiny_llama, list(range(3, 40)), "48tok", policy_for("am-both", 0), max_new_tokens=60)
    assert result["compactions"] >= 2 and result["new_tokens"] == 60
    assert result["peak_bytes"] <= result["cap_bytes"] and result["logical_len"] == 97

