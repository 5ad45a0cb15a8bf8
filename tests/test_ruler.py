"""`agentloop eval ruler`: RULER samples from the package's own generators, cut into prefix / context / question."""

from __future__ import annotations

import pytest

from agentloop.evals.ruler import ANSWER, CONTEXT, score, split_sample


@pytest.mark.parametrize("kind,answer,expected", [("niah", " 1499914 and 22", 0.5), ("niah", " 22 and 1499914", 0.5),
                                                  ("qa", " france.", 1.0), ("qa", " Paris", 0.0)])
def test_score_is_rulers_metric(kind, answer, expected):
    golds = ["1499914", "2345678"] if kind == "niah" else ["France", "the French Republic"]
    assert score(kind, answer, golds) == expected


def test_split_sample_cuts_the_context_out_of_the_turn(smollm2):
    text = f"Read this.\n{CONTEXT}The magic number is 4242.{CONTEXT}\nWhat is it?{ANSWER} The number is"
    prefix, context, suffix = split_sample(smollm2.tokenizer, text)
    decode = smollm2.tokenizer.decode
    assert decode(context) == "The magic number is 4242."
    assert decode(prefix).endswith("Read this.\n") and "<|im_start|>user" in decode(prefix)
    assert decode(suffix).startswith("\nWhat is it?<|im_end|>") and decode(suffix).endswith("assistant\nThe number is")


def test_rulers_niah_generator_runs_offline_and_hides_the_value_in_the_context(smollm2):
    from agentloop.evals.ruler import generate

    samples = generate("niah_single_2", smollm2, 1200, 2, 42)
    assert len(samples) == 2
    for sample in samples:
        prefix, context, suffix = split_sample(smollm2.tokenizer, sample["input"])
        value = sample["outputs"][0]
        assert value.isdigit() and len(value) == 7
        assert value in smollm2.tokenizer.decode(context) and value not in smollm2.tokenizer.decode(prefix + suffix)
        assert 500 < len(context) and len(prefix) + len(context) + len(suffix) <= 1200


def test_eval_runs_end_to_end_on_a_short_sample(smollm2, capsys):
    from agentloop.evals.ruler import main

    assert main(["--tasks", "niah_single_2", "--samples", "1", "--max-seq-length", "1200", "--methods", "am-hak-fast",
                 "random", "--ratios", "4", "--answer-tokens", "12", "--no-write"]) == 0
    report = capsys.readouterr().out
    assert "**niah_single_2** (1 samples; uncompacted" in report
    assert "| am-hak-fast |" in report and "| random |" in report


def test_unknown_task_names_the_choices():
    from agentloop.errors import AgentloopError
    from agentloop.evals.ruler import ruler_package, task_config

    with pytest.raises(AgentloopError, match="niah_single_2"):
        task_config(ruler_package(), "niah_single_9")


def test_resume_keeps_complete_samples_and_refuses_other_settings(tmp_path, monkeypatch):
    import json
    from argparse import Namespace

    from agentloop.errors import AgentloopError
    from agentloop.evals.ruler import _earlier_records

    monkeypatch.setattr("agentloop.evals.results_dir", lambda: tmp_path)
    args = Namespace(model="m", max_seq_length=2048, methods=["random"], ratios=[2], max_queries=16384,
                     question_aware=False, answer_tokens=24, seed=42, name="run")
    records = [{"task": "qa_1", "sample": 0, "method": "full"}, {"task": "qa_1", "sample": 0, "method": "random"},
               {"task": "qa_1", "sample": 1, "method": "full"}]
    (tmp_path / "run.json").write_text(json.dumps({"config": vars(args), "records": records}))
    assert _earlier_records(args) == records[:2]  # sample 1 stopped before its compactions: run again
    with pytest.raises(AgentloopError, match="ratios"):
        _earlier_records(Namespace(**{**vars(args), "ratios": [2, 5]}))
