"""`agentloop eval passkey` / `passkey-online` scoring."""

from __future__ import annotations

import pytest

from agentloop.evals.passkey import correct, digits_recalled


@pytest.mark.parametrize("answer,share", [(" 73691.", 1.0), (" 7369.", 0.8), (" 73961 or 7", 0.8),
                                          (" 42.", 0.0), (" a term used in computer science", 0.0)])
def test_digits_recalled_counts_the_key_digits_in_order(answer, share):
    assert digits_recalled(answer, "73691") == pytest.approx(share)


@pytest.mark.parametrize("answer,expected", [(" 73691.", True), (" 736910", False), (" 7369 1", False)])
def test_correct_needs_the_key_as_one_number(answer, expected):
    assert correct(answer, "73691") is expected


def test_report_tabulates_accuracy_and_digits_per_method_and_ratio():
    from argparse import Namespace

    from agentloop.evals.passkey import _report

    args = Namespace(model="m", min_tokens=10, max_tokens=20, methods=["am-hak-fast"], ratios=[2, 5], name="x",
                     max_queries=None, no_write=True)
    records = [{"trial": 0, "method": "full", "ratio": 1, "key": "73691", "answer": " 73691.", "correct": True},
               {"trial": 0, "method": "am-hak-fast", "ratio": 2, "key": "73691", "answer": " 73691.", "correct": True},
               {"trial": 0, "method": "am-hak-fast", "ratio": 5, "key": "73691", "answer": " 7369.", "correct": False},
               {"trial": 1, "method": "full", "ratio": 1, "key": "12345", "answer": " 12345.", "correct": True},
               {"trial": 1, "method": "am-hak-fast", "ratio": 2, "key": "12345", "answer": " 1.", "correct": False},
               {"trial": 1, "method": "am-hak-fast", "ratio": 5, "key": "12345", "answer": " 999.", "correct": False}]
    text = _report(args, records, [])
    assert "| am-hak-fast | 50% | 0% |" in text  # 1 of 2 at 2x, none at 5x
    assert "| am-hak-fast | 0.60 | 0.40 |" in text  # digits: (1 + 0.2) / 2 at 2x, (0.8 + 0) / 2 at 5x
    assert "uncompacted 1.00" in text
    assert "Reference queries per KV head: all." in text


@pytest.mark.parametrize("name", ["passkey", "fidelity", "ingestion", "compaction_speed"])
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_max_queries_rejects_what_is_not_a_count_or_all(name, value, capsys):
    import importlib

    main = importlib.import_module(f"agentloop.evals.{name}").main
    with pytest.raises(SystemExit):
        main(["--max-queries", value, "--no-write"])
    assert f"expected a positive number of queries or 'all', got {value!r}" in capsys.readouterr().err


def test_max_queries_all_means_every_query():
    from agentloop.evals import query_budget

    assert query_budget("all") is None
    assert query_budget("512") == 512


def _resume_args(**settings):
    from argparse import Namespace

    base = dict(model="m", min_tokens=10, max_tokens=20, methods=["am-hak-fast"], ratios=[2], max_queries=16384,
                answer_tokens=8, seed=0, question_aware=True, chunk=0, part_budgets=["attention"], name="run")
    return Namespace(**{**base, **settings})


def test_resume_keeps_complete_trials_and_refuses_a_run_with_other_task_queries(tmp_path, monkeypatch):
    import json

    from agentloop.errors import AgentloopError
    from agentloop.evals.passkey import _earlier_records, task_queries_setting

    monkeypatch.setattr("agentloop.evals.results_dir", lambda: tmp_path)
    args = _resume_args(task_queries=task_queries_setting())
    records = [{"trial": 0, "method": "full"}, {"trial": 0, "method": "am-hak-fast"}, {"trial": 1, "method": "full"}]
    config = {k: v for k, v in vars(args).items() if k != "task_queries"}  # a run from before the greedy draft
    (tmp_path / "run.json").write_text(json.dumps({"config": config, "records": records}))
    with pytest.raises(AgentloopError, match="task_queries"):
        _earlier_records(args)

    (tmp_path / "run.json").write_text(json.dumps({"config": vars(args), "records": records}))
    assert _earlier_records(args) == records[:2]  # trial 1 stopped after its uncompacted answer: run again

    agnostic = _resume_args(question_aware=False, task_queries=None)
    old = {k: v for k, v in vars(agnostic).items() if k not in ("question_aware", "task_queries")}
    (tmp_path / "run.json").write_text(json.dumps({"config": old, "records": records}))
    assert _earlier_records(agnostic) == records[:2]  # question-agnostic runs recorded neither setting


@pytest.mark.parametrize("task_first", [False, True])
def test_ingestion_trial_asks_the_question_first_only_when_told(smollm2, task_first):
    import random

    from agentloop.evals.ingestion import QUESTION, make_trial

    prefix, result, suffix, key, _ = make_trial(smollm2.tokenizer, random.Random(0), 300, "prose", task_first)
    decode = smollm2.tokenizer.decode
    assert (QUESTION in decode(prefix)) is task_first
    assert QUESTION in decode(suffix) and key in decode(result) and key not in decode(prefix + suffix)


def test_passkey_online_resume_keeps_complete_trials_of_the_same_settings(tmp_path, monkeypatch):
    import json
    from argparse import Namespace

    from agentloop.errors import AgentloopError
    from agentloop.evals.passkey_online import _earlier_records

    monkeypatch.setattr("agentloop.evals.results_dir", lambda: tmp_path)
    args = Namespace(model="m", mem_cap="256tok", max_k=2, policies=["am-repeat-prompt", "streaming"], chunk=32,
                     prose_tokens=2400, answer_tokens=8, seed=0, name="run")
    complete = [{"trial": 0, "policy": p, "k": k} for p in args.policies for k in (1, 2)]
    records = complete + [{"trial": 1, "policy": "am-repeat-prompt", "k": 1}]  # stopped inside trial 1
    (tmp_path / "run.json").write_text(json.dumps({"config": vars(args), "records": records}))
    assert _earlier_records(args) == complete
    with pytest.raises(AgentloopError, match="policies"):
        _earlier_records(Namespace(**{**vars(args), "policies": ["am-repeat", "streaming"]}))


def _stand_in_python(tmp_path, name: str, body: str):
    script = tmp_path / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_compaction_speed_reads_the_baseline_row_and_refuses_a_broken_baseline(tmp_path):
    from agentloop.errors import AgentloopError
    from agentloop.evals.compaction_speed import baseline_total

    # a baseline prints its progress, then its row as a Python dict (the format of every version of the eval)
    args_file = tmp_path / "args"
    good = _stand_in_python(tmp_path, "good", f"echo \"$@\" > {args_file}; echo loading; "
                                      "echo \"{'tokens': 256, 'ratio': 2, 'total_seconds': 3.25}\"")
    assert baseline_total(good, 256, 2, 512) == 3.25
    assert args_file.read_text().split() == ["-m", "agentloop.cli", "eval", "compaction-speed", "--lengths", "256",
                                             "--ratios", "2", "--max-queries", "512", "--online-caps", "--no-write"]
    broken = _stand_in_python(tmp_path, "broken", "echo 'no such eval' >&2; exit 2")
    with pytest.raises(AgentloopError, match="the baseline at .* failed: no such eval"):
        baseline_total(broken, 256, 2, None)
