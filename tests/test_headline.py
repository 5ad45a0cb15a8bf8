"""`agentloop eval headline`: the compaction arithmetic behind the cap, the pairing of rows on shared problems, the
paired statistics and the verdict they give, and a forced answer that stays under the cap on the real model."""

from __future__ import annotations

import math

import pytest

from agentloop.evals.headline import FORCED, compactions_at, compare, paired, plan_cap, solve, verdict
from agentloop.evals.paired import mcnemar, paired_bootstrap


def test_compactions_follow_am_halving_at_the_cap():
    # prompt 40 (prefilled 32 + 8), 60 decoded, cap 64: full at 64 tokens -> (64-20)/2+20 = 42 slots; full again
    # after 22 more tokens (86) -> 42; 14 more to 100: two compactions
    assert compactions_at(40, 100, 64) == 2
    assert compactions_at(40, 100, 80) == 1  # full at 80 -> 50, then 20 more tokens never refill 80
    assert compactions_at(40, 100, 100) == 0
    assert plan_cap([(40, 100)], target=2) == 72  # 72: full at 72 -> 46, full again at 98; 80 gives one


def test_plan_needs_uncapped_runs():
    from agentloop.errors import AgentloopError

    with pytest.raises(AgentloopError, match="no uncapped runs"):
        plan_cap([])


def _records(rows: dict[str, list[bool]], missing: dict[str, set[int]] | None = None) -> list[dict]:
    missing = missing or {}
    return [{"id": i, "policy": row, "correct": right, "compactions": 7 if row == "am" else 0, "forced": False,
             "prompt_tokens": 80 + i,
             "stop": "eos", "logical_len": 300, "seconds": 1.0, "peak_bytes": 1, "cap_bytes": 1}
            for row, values in rows.items() for i, right in enumerate(values) if i not in missing.get(row, set())]


def test_pairing_uses_only_problems_both_rows_ran():
    records = _records({"am": [True, False, True, True], "none": [False, False, True, False]}, {"none": {0}})
    assert paired(records, "am", "none") == ([False, True, True], [False, True, False])


def test_mcnemar_exact_p_from_the_discordant_pairs():
    # 10 problems only a solved, 2 only b: p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    b = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    assert mcnemar(a, b) == {"only_a": 10, "only_b": 2, "p": pytest.approx(158 / 4096)}
    assert mcnemar(a, a)["p"] == 1.0


def test_paired_bootstrap_interval():
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)
    assert paired_bootstrap([1.0] * 5, [0.0] * 5) == (1.0, 1.0)
    # 400 independent pairs, differences -1/0/+1 with mean 0.1: the interval is about mean +- 1.96 sd/sqrt(n)
    diffs = [1] * 100 + [-1] * 60 + [0] * 240
    a, b = [max(d, 0) for d in diffs], [max(-d, 0) for d in diffs]
    mean = sum(diffs) / 400
    half = 1.96 * math.sqrt((sum(d * d for d in diffs) / 400 - mean ** 2) / 400)
    low, high = paired_bootstrap(a, b)
    assert low == pytest.approx(mean - half, abs=0.01) and high == pytest.approx(mean + half, abs=0.01)
    with pytest.raises(ValueError, match="same units"):
        paired_bootstrap([1, 0], [1])


def test_verdict_from_known_rows():
    solved = [True] * 12 + [False] * 28  # 40 problems; am solves the first 12
    records = _records({"am": solved, "uncapped": solved,  # the same problems: matches
                        "none": [True] * 2 + [False] * 38,  # a subset: 10 discordant pairs, all am's
                        "snapkv": [True] * 11 + [False] + [True] + [False] * 27})  # one each way
    comparisons = {b: compare(records, "am", b) for b in ("uncapped", "none", "snapkv")}
    assert comparisons["uncapped"]["ci95"] == (0.0, 0.0) and comparisons["uncapped"]["verdict"] == "tie"
    assert comparisons["none"]["verdict"] == "win" and comparisons["none"]["p"] == pytest.approx(2 / 2 ** 10)
    assert comparisons["none"]["difference"] == pytest.approx(10 / 40)
    assert comparisons["snapkv"]["verdict"] == "tie" and comparisons["snapkv"]["p"] == 1.0
    summary = {"am": {"compactions_median": 7, "compactions_max": 7}}
    text = " ".join(verdict(summary, comparisons))
    assert "`am` at the cap matches uncapped within the interval" in text
    assert "`am` beats `none`" in text and "`am` does not separate from `snapkv`" in text
    assert "holds only in part here: `am` under the cap matches the uncapped run and beats `none` but not `snapkv`" in text
    loose = " ".join(verdict({"am": {"compactions_median": 3, "compactions_max": 4}}, comparisons))
    assert "not tight enough" in loose


def test_verdict_when_am_falls_short_of_uncapped():
    records = _records({"am": [False] * 20 + [True] * 5, "uncapped": [True] * 25})
    comparisons = {"uncapped": compare(records, "am", "uncapped")}
    assert comparisons["uncapped"]["verdict"] == "loss" and comparisons["uncapped"]["ci95"][1] < 0
    text = " ".join(verdict({"am": {"compactions_median": 6, "compactions_max": 9}}, comparisons))
    assert "does not match uncapped" in text


def test_none_is_forced_to_answer_under_the_cap(smollm2):
    from agentloop.chat import encode_messages
    from agentloop.policies import make_policy

    prompt = encode_messages(smollm2.tokenizer, [{"role": "user", "content": "What is 12 + 30? Think step by step."}])
    forced = [int(i) for i in smollm2.tokenizer(FORCED, add_special_tokens=False)["input_ids"]]
    cap = len(prompt) + len(forced) + 16 + 12  # room to think for 12 tokens, then the forced answer
    result = solve(smollm2, prompt, forced, cap, make_policy("none"), max_new_tokens=200)
    assert result["stop"] == "mem_cap" and result["forced"] and FORCED in result["text"]
    assert result["logical_len"] <= cap and result["peak_bytes"] <= result["cap_bytes"]
    over = solve(smollm2, prompt, forced, len(prompt) - 1, make_policy("truncate"), max_new_tokens=20)
    assert over["stop"] == "prompt_over_cap" and over["text"] == ""
    cut = solve(smollm2, prompt, forced, len(prompt) - 1, make_policy("none"), max_new_tokens=20)
    assert cut["stop"] == "prompt_cut" and cut["forced"] and cut["text"].startswith(FORCED)
    assert cut["logical_len"] <= len(prompt) - 1 and cut["peak_bytes"] <= cut["cap_bytes"]


def test_baselines_are_also_compared_where_the_prompt_fits():
    from agentloop.evals.headline import fitting

    # prompts of 80 + i tokens; in 90 slots, problems 0..10 fit
    records = _records({"am": [True] * 11 + [False] * 29, "none": [False] * 11 + [True] * 29})
    fits = fitting(records, 90)
    assert fits == set(range(11))
    on_fits = compare(records, "am", "none", ids=fits)
    assert (on_fits["n"], on_fits["only_a"], on_fits["only_b"], on_fits["verdict"]) == (11, 11, 0, "win")
    assert compare(records, "am", "none")["verdict"] == "loss"  # 11 vs 29 over all 40
    text = " ".join(verdict({"am": {"compactions_median": 6, "compactions_max": 8}},
                            {"none": compare(records, "am", "none")}, {"none": on_fits}))
    assert "`am` loses to `none`" in text and "On the 11 problems whose prompt fits" in text


def test_report_and_plot_of_a_partial_run(tmp_path, monkeypatch):
    import argparse

    from agentloop.evals import headline

    monkeypatch.setattr("agentloop.evals.results_dir", lambda: tmp_path)
    args = argparse.Namespace(name="partial", mem_cap=112, max_new_tokens=400, seed=0)
    results = {"config": {"answer_room": 20}, "records": _records({"uncapped": [True, False], "none": [False] * 11})}
    headline._write(args, results, "m")  # only the uncapped row so far: no verdict yet, the files are still written
    assert "No `am` runs yet" in (tmp_path / "partial.md").read_text() and (tmp_path / "partial.png").is_file()


def test_verdict_when_the_claim_holds():
    solved = [True] * 12 + [False] * 28
    below = [True] * 2 + [False] * 38  # 10 problems only am solves: McNemar p = 2 / 2^10
    records = _records({"am": solved, "uncapped": solved, "none": below, "snapkv": below})
    comparisons = {b: compare(records, "am", b) for b in ("uncapped", "none", "snapkv")}
    text = " ".join(verdict({"am": {"compactions_median": 7, "compactions_max": 9}}, comparisons))
    assert ("In one line: the claim's shape holds here: `am` under the cap matches the uncapped run and beats every "
            "baseline.") in text
