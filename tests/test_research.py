"""The research agent eval and the ingestion eval's conditions: questions built right, answers scored right, the
agent's own ingestion used under the cap at equal memory, resumed runs keeping only complete trials."""

from __future__ import annotations

import json
import random
from argparse import Namespace

import pytest


@pytest.mark.parametrize("kind", ["number", "name", "date"])
def test_a_fact_is_scored_by_what_it_asks_for(kind):
    from agentloop.evals.research import correct, make_fact

    fact = make_fact(kind, "harbor", random.Random(3))
    assert fact["question"].startswith(("What", "Who", "On what")) and "harbor" in fact["question"]
    assert correct(f"It is {fact['answer']}.", fact)
    assert not correct("I do not know.", fact)
    if kind == "number":  # a longer number that contains the key is not the key
        assert not correct(f"{fact['answer']}7", fact)
    if kind == "date":  # the month alone is not enough
        assert not correct(fact["answer"].split()[1], fact)


@pytest.mark.parametrize("facts", [1, 3])
def test_a_question_plants_every_fact_once_and_asks_one_of_them(smollm2, facts):
    from agentloop.evals.research import make_question

    question = make_question(smollm2.tokenizer, random.Random(0), files=3, file_tokens=200, facts_per_file=facts)
    assert list(question["files"]) == ["a.txt", "b.txt", "c.txt"]
    asked = question["asked"]
    text = question["files"][asked["file"]]
    assert text.count(asked["question"].split(" the ")[-1].split()[0]) >= 1
    assert question["task"] == f"Read a.txt, b.txt and c.txt, then answer: {asked['question']}"
    planted = [t for t in question["files"].values() for _ in range(t.count(" collection is ") + t.count(" led by ")
                                                                     + t.count(" first met on "))]
    assert len(planted) == 3 * facts
    assert 0 <= asked["depth"] <= 1 and asked["answer"] in text
    again = make_question(smollm2.tokenizer, random.Random(0), files=3, file_tokens=200, facts_per_file=facts)
    assert again == question  # drawn from the seed alone (resumed runs rebuild the same questions)


def test_the_plan_reads_each_file_then_lets_the_model_answer():
    from agentloop.evals.research import plan_replies

    reply = plan_replies(["a.txt", "b.txt"])
    transcript = [{"role": "user", "content": "task"}]
    first = reply(transcript)
    assert '"path": "a.txt"' in first
    transcript += [{"role": "assistant", "content": first}, {"role": "tool", "content": "..."}]
    assert '"path": "b.txt"' in reply(transcript)
    transcript += [{"role": "assistant", "content": "x"}, {"role": "tool", "content": "..."}]
    assert reply(transcript) is None


def test_capped_conditions_ingest_every_file_and_hold_less_than_whole(tiny_chat):
    from agentloop.evals.research import CONDITIONS, make_question, run_question

    question = make_question(tiny_chat.tokenizer, random.Random(1), files=2, file_tokens=300)
    args = Namespace(cap=1024, ratio=5, trigger=128, answer_tokens=4)
    whole = run_question(tiny_chat, question, "whole", args)
    capped = {c: run_question(tiny_chat, question, c, args) for c in CONDITIONS if c != "whole"}
    assert whole["ingestions"] == 0 and whole["finish"] == "final_answer"
    for condition, result in capped.items():
        assert result["ingestions"] == 2, condition  # both files compacted by the agent's own ingestion
        assert result["cache_bytes"] < 0.5 * whole["cache_bytes"], condition
    # equal memory: the same slots whatever the method
    assert len({r["cache_bytes"] for r in capped.values()}) == 1
    assert all(r["read_tokens"] == whole["read_tokens"] > 500 for r in capped.values())


def test_research_report_and_resume_keep_complete_questions(tmp_path, monkeypatch):
    from agentloop.evals import earlier_records
    from agentloop.evals.research import report

    monkeypatch.setattr("agentloop.evals.results_dir", lambda: tmp_path)
    args = Namespace(model="m", files=2, file_tokens=100, facts_per_file=1, ratio=5, cap=1024, trigger=128,
                     conditions=["whole", "am"], answer_tokens=8, seed=0, name="run", no_write=False)
    base = {"kind": "name", "cache_bytes": 10, "read_s": 1.0, "read_tokens": 100, "policy_actions": 0}
    records = [{**base, "question": 0, "condition": "whole", "correct": True},
               {**base, "question": 0, "condition": "am", "correct": False},
               {**base, "question": 1, "condition": "whole", "correct": True}]  # stopped inside question 1
    text = report(args, records, [])
    assert "| whole | 100% (2;" in text and "| am | 0% (1;" in text and "| - | 100% | - |" in text
    assert json.loads((tmp_path / "run.json").read_text())["questions"] == 2
    kept = earlier_records(args, ("model", "ratio", "conditions"), lambda r: r["question"], len(args.conditions))
    assert kept == records[:2]


def test_ingestion_resume_counts_each_group_by_its_own_ratios(tmp_path, monkeypatch):
    from agentloop.evals import earlier_records

    monkeypatch.setattr("agentloop.evals.results_dir", lambda: tmp_path)
    args = Namespace(model="m", conditions=["am-task", "truncate"], name="run")
    per_trial = {"short": 1 + 2 * 2, "long": 1 + 1 * 2}  # short trials at two ratios, long ones at one

    def trial(number, group, ratios):
        return [{"trial": number, "group": group, "condition": "whole"}] + [
            {"trial": number, "group": group, "condition": c, "ratio": r} for r in ratios for c in args.conditions]

    records = trial(0, "short", [2, 5]) + trial(1, "long", [2]) + trial(2, "short", [2])  # trial 2 unfinished
    (tmp_path / "run.json").write_text(json.dumps({"config": vars(args), "records": records}))
    kept = earlier_records(args, ("model", "conditions"), lambda r: r["trial"], lambda r: per_trial[r["group"]])
    assert {r["trial"] for r in kept} == {0, 1}


def test_truncation_alone_holds_the_slots_ingestion_would_keep():
    from agentloop.evals.ingestion import _compacted_slots

    args = Namespace(piece_tokens=2048, keep=16)
    assert _compacted_slots(1032, 2, args) == 32 + 500  # one piece: its middle halved
    assert _compacted_slots(4096, 4, args) == 32 + 2 * 508  # two pieces of 2048, each middle (2032) quartered
