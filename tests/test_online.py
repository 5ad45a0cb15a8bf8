"""Online compaction: pause -> compact -> resume under a hard cap, repeated, with β carried through."""

from __future__ import annotations

import pytest
import torch

from agentloop import GenerationSettings, Session
from agentloop.errors import AgentloopError
from agentloop.policies import make_policy


def _prompt(n: int, seed: int = 1, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("queries", ["repeat", "recorded", "repeat+recorded"])
def test_am_policy_compacts_many_times_under_the_cap(tiny_llama, queries):
    cap_slots = 64
    session = Session(tiny_llama, cap=f"{cap_slots}tok", policy=make_policy("am", queries=queries, record_window=32))
    list(session.feed(_prompt(24)))
    cap, compactions, tokens = session.cap_bytes, [], 0
    for event in session.generate(GenerationSettings(max_new_tokens=4 * cap_slots, temperature=1.0, seed=5,
                                                     ignore_eos=True)):
        held = session.cache.nbytes()
        assert held <= cap, f"{held} bytes held over a cap of {cap}"
        assert session.cache.physical_len <= cap_slots
        if event.kind == "policy":
            compactions.append(event)
            assert event.action == "compact" and event.bytes_after < event.bytes_before
            assert event.details["output_error"] >= 0 and "queries" in event.details["stage_seconds"]
        tokens += event.kind == "token"
    assert tokens == 4 * cap_slots, "the run must not stop at the cap"
    assert len(compactions) >= 6
    assert session.cache.logical_len >= 4 * cap_slots
    # every compacted slot carries β; the protected tail and the newest tokens are verbatim (β = 0)
    beta = session.cache.beta(0)
    assert beta is not None and beta.shape[-1] == session.cache.physical_len
    assert torch.all(beta[..., -20:] == 0)
    assert session.peak_bytes <= cap


def test_region_keeps_half_and_the_tail_verbatim(tiny_llama):
    session = Session(tiny_llama, cap="64tok", policy=make_policy("am", protect_recent=10))
    list(session.feed(_prompt(64)))
    tail_keys = session.cache.layers[0].keys[..., -10:, :].clone()
    events = list(session.generate(GenerationSettings(max_new_tokens=1, ignore_eos=True)))
    policy = [e for e in events if e.kind == "policy"]
    assert len(policy) == 1
    assert policy[0].physical_before == 64 and policy[0].physical_after == 27 + 10  # round(54 * 0.5) + tail
    # the tail moved to the front of the free space unchanged; the new token sits after it
    assert torch.equal(session.cache.layers[0].keys[..., 27:37, :], tail_keys)
    assert session.cache.logical_len == 65


def test_pinned_prompt_is_not_compacted(tiny_llama):
    session = Session(tiny_llama, cap="64tok", policy=make_policy("am", pin_prompt=True))
    list(session.feed(_prompt(16)))
    head = session.cache.layers[1].keys[..., :16, :].clone()
    list(session.generate(GenerationSettings(max_new_tokens=150, temperature=1.0, ignore_eos=True)))
    assert session.policy.compactions >= 3
    assert torch.equal(session.cache.layers[1].keys[..., :16, :], head)
    assert torch.all(session.cache.beta(1)[..., :16] == 0)


def test_max_compactions_stops_at_the_cap_without_error(tiny_llama):
    session = Session(tiny_llama, cap="64tok", policy=make_policy("am", max_compactions=2))
    list(session.feed(_prompt(24)))
    events = list(session.generate(GenerationSettings(max_new_tokens=1000, ignore_eos=True)))
    stop = events[-1]
    assert sum(e.kind == "policy" for e in events) == 2
    assert stop.reason == "mem_cap" and not stop.error and session.cache.physical_len == 64


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_eviction_baselines_keep_original_slots(tiny_llama, name):
    session = Session(tiny_llama, cap="64tok", policy=make_policy(name, record_window=16))
    list(session.feed(_prompt(24)))
    full = None
    for event in session.generate(GenerationSettings(max_new_tokens=41, temperature=1.0, ignore_eos=True)):
        if event.kind == "pause":  # the loop pauses before the policy acts: the cache is still whole
            full = session.cache.layers[2].values[0].clone()  # [kv_heads, 64, d]
    assert session.policy.compactions == 1 and full is not None
    kept = session.cache.layers[2].values[0, :, :22]  # round(44 * 0.5) slots of the compacted region
    # every kept slot is one of the original slots of its head (no refitted values), and no β was fitted
    same = (kept[:, :, None, :] == full[:, None, :44, :]).all(-1)  # [kv_heads, 22 kept, 44 original]
    assert same.any(-1).all()
    assert torch.all(session.cache.beta(2)[..., :22] == 0)


@pytest.mark.parametrize("options, message", [({"ratio": 1.5}, "ratio"), ({"method": "zip"}, "unknown compaction"),
                                              ({"queries": "dreams"}, "option 'queries'.*'repeat'"), ({"nope": 1}, "no option"),
                                              ({"prompt_share": 1.0}, "prompt_share")])
def test_bad_policy_options_are_clear_errors(options, message):
    with pytest.raises(AgentloopError, match=message):
        make_policy("am", **options)


def test_rotated_queries_match_a_later_read(tiny_llama):
    """Layer 0's queries depend on the token and its position only, so a re-read `shift` tokens later must give
    the earlier read's queries rotated by `shift` positions."""
    from agentloop.compaction.queries import rope_frequencies, rotate

    session, ids, shift = Session(tiny_llama), _prompt(12, seed=3), 37
    list(session.feed(_prompt(20)))
    early = session.probe(ids)[0]
    list(session.feed(_prompt(shift, seed=2)))
    later = session.probe(ids)[0]
    moved = rotate({0: early}, shift, rope_frequencies(session))[0]
    assert early.dtype == torch.float16  # queries are kept in 16 bits: agreement to float16 rounding
    assert not torch.allclose(early, later, atol=0.1)
    torch.testing.assert_close(moved.float(), later.float(), atol=4e-3, rtol=4e-3)


def _spy_on_probes(session) -> list[list[int]]:
    """The ids of every probe the session runs from now on (each call appended to the returned list)."""
    probed, probe = [], session.probe
    session.probe = lambda ids, **kw: probed.append(list(ids)) or probe(ids, **kw)
    return probed


@pytest.mark.parametrize("reread", ["new", "all"])
def test_reread_new_reads_only_the_text_added_since_the_last_compaction(tiny_llama, reread):
    policy = make_policy("am", queries="repeat", reread=reread, max_queries=256)
    session = Session(tiny_llama, cap="64tok", policy=policy)
    probes = _spy_on_probes(session)
    list(session.feed(_prompt(24)))
    events = list(session.generate(GenerationSettings(max_new_tokens=300, temperature=1.0, seed=1, ignore_eos=True)))
    logical = [e.details["logical_tokens"] for e in events if e.kind == "policy"]
    probed = [len(ids) for ids in probes]
    assert len(logical) >= 6 and session.peak_bytes <= session.cap_bytes
    if reread == "all":  # bare model: the repeat prompt is the text itself
        assert probed == logical
    else:
        assert probed == [logical[0]] + [b - a for a, b in zip(logical, logical[1:], strict=False)]
        assert max(probed[1:]) < 64 < logical[-1]
        assert all(q.shape[1] <= 256 for q in policy.repeat_memory.rows.values())


def test_prompt_share_reads_the_prompt_again_at_every_compaction_and_still_compacts_it(tiny_llama):
    prompt, filler = _prompt(16, seed=4), _prompt(160, seed=9)
    rows = {}
    for share in (0.0, 0.5):
        session = Session(tiny_llama, cap="64tok", policy=make_policy("am", queries="repeat", prompt_share=share),
                          prefill_chunk=16)
        probed = _spy_on_probes(session)
        list(session.feed(prompt))
        events = [e for e in session.feed(filler) if e.kind == "policy"]
        assert len(events) >= 4 and session.peak_bytes <= session.cap_bytes
        assert torch.all(session.cache.beta(0)[..., :16] != 0)  # the prompt's slots were compacted too
        assert probed.count(prompt) == (len(events) if share else 0)  # one read of the prompt per compaction
        rows[share] = [e.details["queries"] for e in events]
    # the same schedule; the prompt's rows (and its draft's) are repeated to about half of all the fitting rows
    assert len(rows[0.0]) == len(rows[0.5])
    assert all(1.6 < with_prompt / without < 2.4 for without, with_prompt in zip(rows[0.0], rows[0.5], strict=True))


def test_prompt_share_carries_a_pass_key_through_six_halvings(smollm2):
    """SmolLM2 under a 256-token cap, fed prose after a pass key given in the first prompt: after six compactions
    the key is still recalled when the prompt is read again at each one, and lost without it (trial 0 of
    `agentloop eval passkey-online`; over 20 trials see evals/results/passkey_online.md)."""
    import random
    from types import SimpleNamespace

    from agentloop.evals.passkey_online import make_trial, run_trial

    prompt, prose, question, key = make_trial(smollm2.tokenizer, random.Random(0), 2400)
    args = SimpleNamespace(chunk=32, answer_tokens=8, max_k=6)
    answers = {}
    for share in (0.5, 0.0):
        policy = make_policy("am", queries="repeat", prompt_share=share)
        asked, peak, cap = run_trial(smollm2, policy, "256tok", prompt, prose, question, key, args, ask_at=None)
        assert policy.compactions == 6 and peak <= cap
        answers[share] = asked[-1][1]["answer"]
    assert key in answers[0.5] and key not in answers[0.0], answers


def test_a_windowed_reread_reads_its_prefix_once_and_each_window_after_it(tiny_llama):
    """A re-read longer than the probe slots goes in windows: the prefix (the instruction) is read once, each window
    after it at the positions a single read gives it. The prefix and the first window see what a single read sees,
    so their queries equal an uncapped session's; the second window does not see the first, so its queries differ."""
    capped = Session(tiny_llama, cap="64tok", policy=make_policy("am", queries="repeat"))
    uncapped = Session(tiny_llama)
    for session in (capped, uncapped):
        list(session.feed(_prompt(20)))
    head, body = _prompt(6, seed=4), _prompt(240, seed=5)
    room = capped.cache.layers[capped.cache.compactable[0]].capacity - capped.cache.physical_len
    size, chunk = room - len(head), capped.prefill_chunk
    assert size < len(body) <= 2 * size and len(head) <= chunk  # two windows; the prefix in one forward
    assert uncapped.prefill_chunk >= len(head) + len(body)  # the single read in one forward
    windowed = capped.probe(head + body, prefix=len(head))
    single = uncapped.probe(head + body, prefix=len(head))
    kv_heads, groups = capped.cache.kv_heads, tiny_llama.model.config.num_attention_heads // capped.cache.kv_heads
    # offers to the recorder, in order: the prefix, then each window in forwards of at most `chunk` tokens
    forwards = [(0, len(head))] + [(len(head) + lo + i, len(head) + lo + min(i + chunk, len(body[lo:lo + size])))
                                   for lo in (0, size) for i in range(0, len(body[lo:lo + size]), chunk)]
    for layer, rows in windowed.items():
        assert rows.shape[1] == groups * (len(head) + len(body))  # every token once, the prefix too
        by_token = single[layer].view(kv_heads, groups, -1, rows.shape[-1])  # rows ordered (group, token)
        at = 0
        for lo, hi in forwards:
            got = rows[:, at:at + groups * (hi - lo)].view(kv_heads, groups, hi - lo, -1)
            at += groups * (hi - lo)
            if hi <= len(head) + size:
                torch.testing.assert_close(got.float(), by_token[:, :, lo:hi].float(), atol=4e-3, rtol=4e-3)
            elif layer > 0:  # layer 0's queries depend on the token and its position only
                assert not torch.allclose(got.float(), by_token[:, :, lo:hi].float(), atol=0.05)
