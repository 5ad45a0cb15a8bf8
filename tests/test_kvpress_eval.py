"""`agentloop eval kvpress`: the budget mapping and the runner's protocol, run on a tiny model against a stand-in
kvpress (tests/fake_kvpress, the same decode-time schedule as its DecodingPress) since the real one needs its own
environment; and the harness's scoring of what comes back."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, _tiny

from agentloop.errors import AgentloopError
from agentloop.evals.kvpress import (
    KVPRESS_ROWS,
    comparisons,
    crosscheck,
    fidelity_request,
    kvpress_budget,
    kvpress_fidelity_cell,
    kvpress_passkey_cell,
    passkey_request,
    press_spec,
    run_runner,
)

FAKE_KVPRESS = Path(__file__).parent / "fake_kvpress"


@pytest.mark.parametrize("cap, chunk", [(256, 32), (512, 16), (160, 1), (100, 16), (33, 16)])
def test_budget_holds_the_cap_at_its_peak(cap, chunk):
    budget = kvpress_budget(cap, chunk)
    assert budget["target_size"] + budget["compression_interval"] * chunk == budget["max_slots"]
    assert cap - chunk < budget["max_slots"] <= cap  # the cap, up to the chunk's rounding
    assert budget["compression_interval"] >= 1 and budget["target_size"] >= cap / 2  # compress at the cap to ~half


def test_budget_too_small_for_two_chunks_is_a_clear_error():
    with pytest.raises(AgentloopError, match="less than two 32-token chunks"):
        kvpress_budget(40, 32)


def test_snapkv_window_never_exceeds_the_tokens_of_a_forward():
    assert press_spec("kvpress-snapkv", 16)["options"] == {"window_size": 16}
    assert press_spec("kvpress-snapkv", 1)["options"] == {}  # token-by-token decoding keeps kvpress's default
    assert press_spec("kvpress-knorm", 32) == {"name": "kvpress-knorm", "wrapper": "DecodingPress", "base": "KnormPress",
                                               "options": {}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    _tiny("llama").save_pretrained(path)
    return path


@pytest.fixture
def fake_kvpress(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(FAKE_KVPRESS))


def _args(**overrides):
    values = dict(passkey_cap=128, fidelity_cap=128, threads=1, seed=0, max_k=3, answer_tokens=4)
    return argparse.Namespace(**{**values, **overrides})


def _ids(generator, n):
    return torch.randint(10, VOCAB, (n,), generator=generator).tolist()


def test_passkey_protocol_holds_the_budget_and_asks_after_each_compression(tiny_dir, fake_kvpress):
    generator = torch.Generator().manual_seed(0)
    trials = [{"trial": t, "prompt": _ids(generator, 20), "prose": _ids(generator, 400), "question": _ids(generator, 6)}
              for t in range(2)]
    request = passkey_request(tiny_dir, trials, ["kvpress-knorm"], _args(), eos=[0])
    budget = request["budget"]  # cap 128 in 32-token forwards: every 2 forwards, cut to 64 slots
    assert (budget["target_size"], budget["compression_interval"]) == (64, 2)
    records = list(run_runner(sys.executable, request))
    assert records[0] == {"versions": {"kvpress": "0.0.0", "transformers": records[0]["versions"]["transformers"],
                                       "torch": records[0]["versions"]["torch"]}}
    assert [(r["trial"], r["row"]) for r in records[1:]] == [(0, "kvpress-knorm"), (1, "kvpress-knorm")]
    for record in records[1:]:
        assert record["peak_slots"] == 128  # the cap, reached and never passed (forks included)
        asked = record["asked"]
        assert [a["k"] for a in asked] == [1, 2, 3]
        assert [a["prose_tokens"] for a in asked] == [64, 128, 192]  # every compression_interval x chunk tokens
        assert all(a["physical"] == 64 and a["logical"] == 20 + a["prose_tokens"] for a in asked)
        assert all(len(a["answer_ids"]) <= 4 for a in asked)


def test_passkey_cells_score_decoded_answers_against_the_key():
    class Digits:  # token i decodes to the digit i % 10
        def decode(self, ids, skip_special_tokens=True):
            return "".join(str(i % 10) for i in ids)

    record = {"trial": 3, "row": "kvpress-knorm", "peak_slots": 256, "events": 8, "seconds": 1.0,
              "asked": [{"k": 1, "prose_tokens": 128, "answer_ids": [1, 2, 3, 4, 5], "logical": 160, "physical": 128},
                        {"k": 2, "prose_tokens": 256, "answer_ids": [1, 2, 3, 4], "logical": 288, "physical": 128}]}
    cell = kvpress_passkey_cell("m", record, {"key": "12345"}, Digits())
    assert [a["correct"] for a in cell["asked"]] == [True, False]
    assert [a["answer"] for a in cell["asked"]] == ["12345", "1234"]
    failed = kvpress_passkey_cell("m", {"trial": 0, "row": "kvpress-snapkv", "error": "AssertionError: x"}, {"key": "1"},
                                  Digits())
    assert failed["error"] == "AssertionError: x" and "asked" not in failed


def test_a_fork_leaves_the_run_as_it_was(tiny_dir, fake_kvpress, monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_KVPRESS))
    from agentloop.evals import kvpress_runner as runner

    model = runner.load_model({"model_dir": str(tiny_dir), "dtype": "float32"})
    press = runner.make_press({"wrapper": "DecodingPress", "base": "KnormPress"},
                              {"target_size": 32, "compression_interval": 2})
    generator = torch.Generator().manual_seed(1)
    run = runner.Replay(model, press)
    with press(model):
        run.forward(_ids(generator, 10))
        for _ in range(3):
            run.forward(_ids(generator, 16))
        assert run.event_positions == [42]  # the 2nd forward after the prefill: 10 + 32 slots, cut to 32
        before = ([layer.keys.clone() for layer in run.cache.layers], copy.deepcopy(press.steps), run.logical)
        copied, question = copy.deepcopy(run.cache), _ids(generator, 5)
        answer = runner.greedy_answer(run, question, 4, eos=set())
        assert all(torch.equal(a, layer.keys) for a, layer in zip(before[0], run.cache.layers, strict=False))
        assert (press.steps, run.logical, press.compression_interval) == (before[1], before[2], 2)
    expected, position = [], before[2]  # the same greedy answer, without the press's hooks, on a copy of the cache
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([question]), past_key_values=copied,
                       position_ids=torch.arange(position, position + 5)[None]).logits[0, -1]
        for step in range(4):
            expected.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[expected[-1]]]), past_key_values=copied,
                           position_ids=torch.tensor([[position + 5 + step]])).logits[0, -1]
    assert answer == expected


def test_fidelity_protocol_matches_uncapped_until_the_first_compression(tiny_dir, fake_kvpress):
    generator = torch.Generator().manual_seed(2)
    prompt, continuation = _ids(generator, 10), _ids(generator, 200)
    request = fidelity_request(tiny_dir, prompt, continuation, ["kvpress-knorm"], _args())
    request["presses"].append({"name": "kvpress-nosuch", "wrapper": "DecodingPress", "base": "NoSuchPress"})
    records = list(run_runner(sys.executable, request))
    uncapped, capped, failed = records[1:]
    assert uncapped["row"] == "uncapped" and len(uncapped["top1_ids"]) == len(uncapped["nll"]) == 200
    # 199 tokens fed: a 7-token forward, then 16-token ones; every 4th forward cuts the cache to 64 slots
    assert capped["event_positions"] == [55, 119, 183]
    assert capped["peak_slots"] == 128
    kl = torch.tensor(capped["kl"])
    assert kl[:56].abs().max() < 1e-5 and kl[56:].max() > 1e-4  # same logits until the cache was first cut
    assert failed["row"] == "kvpress-nosuch" and "NoSuchPress" in failed["error"]  # one press failing is a result
    cell = kvpress_fidelity_cell("m", capped)
    assert cell["events"] == 3 and cell["top1_after_6"] is None  # fewer than 6 compressions: no 'after 6' metric
    assert cell["top1"] == pytest.approx(sum(capped["top1"]) / 200)


def test_runner_failure_is_a_clear_error(tmp_path, fake_kvpress):
    request = {"task": "fidelity", "model_dir": str(tmp_path / "missing"), "dtype": "float32", "presses": []}
    with pytest.raises(AgentloopError, match="kvpress runner failed"):
        list(run_runner(sys.executable, request))
    with pytest.raises(AgentloopError, match="cannot start the kvpress runner"):
        list(run_runner(tmp_path / "no-python", request))


def test_crosscheck_and_comparisons_from_known_cells():
    assert crosscheck({"top1_ids": [1, 2, 3, 4], "nll": [1.0, 2.0, 3.0, 4.0]},
                      {"top1_ids": [1, 2, 0, 4], "nll": [1.0, 2.5, 3.0, 4.0]}) == {
        "top1_agreement": 0.75, "mean_abs_nll_diff": 0.125, "max_abs_nll_diff": 0.5}

    def passkey_cell(row, trial, right):
        return {"model": "m", "task": "passkey", "row": row, "trial": trial,
                "asked": [{"k": k, "correct": right} for k in (1, 2)]}

    def fidelity_cell(row, top1):
        return {"model": "m", "task": "fidelity", "row": row, "top1_per_position": top1,
                "event_positions": [10, 20, 30, 40, 50, 60]}

    theirs = next(iter(KVPRESS_ROWS))
    cells = [passkey_cell("am-prompt", t, True) for t in range(10)] + [passkey_cell(theirs, t, False) for t in range(10)]
    cells += [fidelity_cell("am-prompt", [1] * 200), fidelity_cell(theirs, [1] * 60 + [1, 0] * 70)]
    found = {v["task"]: v for v in comparisons({"cells": cells}, "m", 2)}
    assert found["passkey"]["verdict"] == "win" and found["passkey"]["ci95"] == (1.0, 1.0)
    assert found["fidelity"]["units"] == 140 and found["fidelity"]["theirs_value"] == 0.5  # after both 6th events
    assert found["fidelity"]["verdict"] == "win"


def test_real_kvpress_holds_the_same_budget_on_smollm2(smollm2):
    """With the real kvpress (when its environment has been built by `agentloop eval kvpress`): the mapped budget
    is its peak, its compressions fall where the mapping says, and its uncapped replay is agentloop's."""
    from agentloop.assets import cache_dir
    from agentloop.evals.kvpress import KVPRESS_VERSION, model_directory
    from agentloop.evals.online_fidelity import replay

    python = cache_dir() / "envs" / f"kvpress-{KVPRESS_VERSION}" / "bin" / "python"
    if not (python.parent.parent / "complete").is_file():
        pytest.skip("the kvpress environment is not built (agentloop eval kvpress builds it once)")
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(100, 5000, (20,), generator=generator).tolist()
    continuation = torch.randint(100, 5000, (150,), generator=generator).tolist()
    request = fidelity_request(model_directory("smollm2-135m"), prompt, continuation, ["kvpress-snapkv"],
                               _args(fidelity_cap=64))
    versions, uncapped, snapkv = list(run_runner(python, request))
    assert versions["versions"]["kvpress"] == KVPRESS_VERSION
    # 149 tokens fed: a 5-token forward, then 16-token ones, every 2nd cut to 32 slots (SnapKV's window: 16)
    assert snapkv["peak_slots"] == 64 and snapkv["event_positions"] == [21, 53, 85, 117, 149]
    reference, _, _, _ = replay(smollm2, prompt, continuation, None, None, 16)
    ours = {"top1_ids": reference.argmax(-1).tolist(),
            "nll": (-reference.log_softmax(-1).gather(1, torch.tensor(continuation)[:, None])[:, 0]).tolist()}
    check = crosscheck(ours, uncapped)
    assert check["top1_agreement"] == 1.0 and check["max_abs_nll_diff"] < 1e-3
