"""The memory budget: split, scratch measured against its reserve, and compactions that fail part-way."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.autograd import DeviceType
from transformers import LlamaConfig, LlamaForCausalLM

from agentloop import GenerationSettings, Session
from agentloop.budget import plan
from agentloop.errors import AgentloopError
from agentloop.memcap import parse_mem_cap
from agentloop.models import LoadedModel
from agentloop.policies import Room, make_policy


def _prompt(n: int, seed: int = 1, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def peak_allocated(fn) -> int:
    """Peak bytes of CPU tensor memory allocated (net of frees) while `fn` runs, from the torch profiler's
    memory events: what the allocator really handed out, not an estimate."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def test_peak_measurement_sees_real_allocations():
    def work():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB, both alive
        del a, b
        torch.empty(1 << 18)
    assert (6 << 20) <= peak_allocated(work) < (7 << 20)


def _wide() -> LoadedModel:
    """A tiny model whose queries are wide (64 query heads x 64 dims) next to its small hidden size: a re-read's
    queries then weigh far more than its activations, as in a large model at a small cap."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=64, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096)
    return LoadedModel(model=LlamaForCausalLM(config).eval(), tokenizer=None, name="tiny-wide", source="config")


def _full_session(loaded, prompt):
    policy = make_policy("am", queries="repeat", reread="all", max_queries=64, protect_recent=8)
    session = Session(loaded, cap="512tok", policy=policy, prefill_chunk=16)
    list(session.feed(prompt))
    assert session.policy_actions == 0 and session.cache.free_slots() < 16
    return session


def _compaction_peak(session) -> int:
    room = Room(cache=session.cache, cap_bytes=session.cap_bytes, cap_slots=session.cache.max_slots, needed_tokens=16,
                element_size=session.element_size, prompt_len=session.prompt_len, session=session)
    return peak_allocated(lambda: session.policy.make_room(room))


def test_compaction_scratch_stays_within_its_reserve():
    """A compaction's real allocations (the re-read's forwards, its query reservoir, the fits) stay inside the
    budget's reserve; with the reservoir disabled (every re-read query kept) the same measurement breaks it."""
    loaded, prompt = _wide(), _prompt(500)
    session = _full_session(loaded, prompt)
    budget = session.budget
    reserve = budget.workspace_bytes + budget.query_bytes + budget.fit_bytes  # the probe slots are preallocated
    peak = _compaction_peak(session)
    print(f"compaction peak {peak:,} B, reserve {reserve:,} B")
    assert session.policy.compactions == 1 and session.cache.physical_len < 400  # it compacted, no fallback
    assert 0 < peak <= reserve, f"compaction allocated {peak:,} B over its {reserve:,} B reserve"

    unbounded = _full_session(loaded, prompt)
    rows = 8 * len(prompt)  # every row a re-read offers (8 query heads per KV head): the reservoir, disabled
    unbounded.query_rows = unbounded.policy.max_queries = rows
    assert _compaction_peak(unbounded) > reserve
    assert unbounded.policy.compactions == 1


def test_budget_split_and_refusal(smollm2):
    config, dtype = smollm2.model.config, smollm2.dtype
    for cap in ("256tok", "1024tok", "4096tok"):
        for name in ("am", "streaming"):
            budget = plan(config, dtype, parse_mem_cap(cap), make_policy(name))
            assert budget.cache_slots == int(cap[:-3])
            assert budget.cap_bytes == budget.cache_bytes + budget.reserve_bytes
            assert (budget.query_rows > 0) == (name == "am")
            assert budget.query_rows == 0 or budget.query_rows >= 1.25 * budget.cache_slots * 0.5
    byte_cap = plan(config, dtype, parse_mem_cap("64MB"), make_policy("am"))
    assert byte_cap.cap_bytes == 64_000_000 and byte_cap.cache_bytes + byte_cap.reserve_bytes <= 64_000_000
    with pytest.raises(AgentloopError, match=r"too small .* raise --mem-cap to at least"):
        plan(config, dtype, parse_mem_cap("12MB"), make_policy("am"))


@pytest.mark.parametrize("shape", ["qwen3-4b", "llama-3.1-8b"])
def test_a_large_model_under_a_small_token_cap_keeps_its_reserve_within_the_slack(shape):
    # 256 slots of a 4-8B model: the re-read window and the prefill chunk shrink so that the reserve on top of the
    # cache stays inside the 64 MiB a cap under 640 MiB is allowed (the memory eval's limit), while compacting still
    # has a re-read window and a chunk of at least 16 tokens
    from transformers import AutoConfig

    from agentloop.models import RANDOM_SHAPES

    model_type, sizes = RANDOM_SHAPES[shape]
    config = AutoConfig.for_model(model_type, **sizes)
    for dtype in (torch.float32, torch.bfloat16):
        budget = plan(config, dtype, parse_mem_cap("256tok"), make_policy("am"))
        # within the 56 MiB small-cache reserve: the 8 MiB left of the slack are the runtime's own (a run of the
        # memory eval peaked 3.7 MiB above its budget)
        assert budget.reserve_bytes <= 56 << 20, (dtype, budget.describe())
        assert budget.probe_slots >= 16 and budget.prefill_chunk >= 16
        assert budget.query_rows >= 1.25 * 128

def test_token_caps_get_the_fit_rows_fidelity_needs_byte_caps_keep_the_cache(smollm2):
    # 256 slots: the reservoir wants 16 rows per kept slot (2,048 of 128 kept) and the 56 MiB reserve holds them
    config, dtype, am = smollm2.model.config, smollm2.dtype, make_policy("am")
    tokens = plan(config, dtype, parse_mem_cap("256tok"), am)
    assert tokens.query_rows == 16 * 128
    # the same bytes as a byte cap: the cache gets more slots, and the rows at most 4 per kept slot
    same_bytes = plan(config, dtype, parse_mem_cap(f"{tokens.cap_bytes}B"), am)
    assert same_bytes.cache_slots > 256 and same_bytes.query_rows <= 4 * round(same_bytes.cache_slots * am.ratio) + 1
    assert same_bytes.cache_bytes + same_bytes.reserve_bytes <= tokens.cap_bytes
    # the decode-time window `am`'s default mix reads comes before extra rows (at 32 tokens online fidelity collapsed)
    for cap in ("256tok", "512tok", "1024tok", "2048tok"):
        assert plan(config, dtype, parse_mem_cap(cap), am).query_window == am.query_window() == 256


def test_a_byte_cap_holds_everything_the_session_allocates(tiny_llama):
    session = Session(tiny_llama, cap="8MB", policy=make_policy("am", protect_recent=8))
    list(session.feed(_prompt(2 * session.budget.cache_slots)))
    assert session.policy_actions >= 1
    assert session.cache.nbytes() == session.budget.cache_bytes + session.budget.probe_bytes
    assert session.budget.cap_bytes == 8_000_000 >= session.budget.cache_bytes + session.budget.reserve_bytes


# --------------------------------------------------------------------------------------------------------
# faults inside a compaction: the heads not yet compacted are evicted, the run goes on, the cap holds

def _failing_compact(monkeypatch, fail_on: int, error: BaseException | None = None, nan: bool = False):
    """Make the solver fail on its `fail_on`-th call (raise `error`, or return NaN values)."""
    import agentloop.compaction.span as span

    real, calls = span.compact, {"n": 0}

    def compact(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == fail_on:
            if error is not None:
                raise error
            if nan:
                result.values[0, 0, 0] = math.nan
        return result

    monkeypatch.setattr(span, "compact", compact)
    return calls


def _run_through_compactions(loaded, steps=120, **policy):
    session = Session(loaded, cap="64tok", policy=make_policy("am", protect_recent=8, **policy))
    list(session.feed(_prompt(40)))
    events, most = [], 0
    for event in session.generate(GenerationSettings(max_new_tokens=steps, ignore_eos=True)):
        events.append(event)
        most = max(most, session.cache.physical_len)
        assert torch.isfinite(session.last_logits).all()
    return session, events, most


@pytest.mark.parametrize("fault", ["oom", "nan"])
def test_a_fit_that_fails_falls_back_to_eviction(tiny_llama, monkeypatch, fault):
    calls = _failing_compact(monkeypatch, fail_on=2, error=torch.OutOfMemoryError("injected out of memory")
                             if fault == "oom" else None, nan=fault == "nan")
    session, events, most = _run_through_compactions(tiny_llama)
    policy_events = [e for e in events if e.kind == "policy"]
    assert calls["n"] >= 2 and len(policy_events) >= 3
    first = policy_events[0].details
    assert "OutOfMemoryError" in first["fallback"] if fault == "oom" else "non-finite" in first["fallback"]
    assert 0 < first["evicted_heads"] <= 6
    assert all("fallback" not in e.details for e in policy_events[1:])  # later compactions run normally
    assert events[-1].kind == "stop" and events[-1].new_tokens == 120
    assert most <= session.cache.max_slots


def test_heads_compacted_before_a_failure_keep_their_fit(tiny_llama, monkeypatch):
    """One head per chunk (a tight scratch): the solver fails on the third chunk; the first two heads keep their
    fitted blocks (β set), the other four are evicted (sinks and newest slots, no β)."""
    import agentloop.compaction.span as span

    session = Session(tiny_llama)
    list(session.feed(_prompt(48)))
    keys = [session.cache.layers[i].keys.clone() for i in session.cache.compactable]
    _failing_compact(monkeypatch, fail_on=3, error=torch.OutOfMemoryError("injected out of memory"))
    rows = 2 * (48 + 0)  # the repeat re-read of a bare model reads the context: 2 query heads per KV head
    stats = span.compact_span(session, 0, 48, 0.5, scratch_bytes=span.head_bytes(rows, 48, 24, 16))
    assert "OutOfMemoryError" in stats.fallback and stats.evicted_heads == 4
    kept = torch.cat([torch.arange(4), torch.arange(28, 48)])  # the fallback: 4 sinks and the 20 newest slots
    for n, i in enumerate(session.cache.compactable):
        layer = session.cache.layers[i]
        beta = layer.beta_buffer[0, :, :layer.physical_len]  # [kv_heads, 24]; zero where no slot has a bias
        for h in range(2):
            if 2 * n + h < 2:
                assert torch.isfinite(beta[h]).all() and (beta[h] != 0).any()
            else:
                assert torch.equal(layer.keys[0, h], keys[n][0, h, kept]) and (beta[h] == 0).all()


def test_a_failed_query_read_evicts_the_region(tiny_llama, monkeypatch):
    session, events, most = None, None, None
    original = Session.probe

    def probe(self, *args, **kwargs):
        raise RuntimeError("probe failed (injected)")

    monkeypatch.setattr(Session, "probe", probe)
    session, events, most = _run_through_compactions(tiny_llama, steps=60)
    monkeypatch.setattr(Session, "probe", original)
    details = [e.details for e in events if e.kind == "policy"]
    assert details and all("reading the queries failed" in d["fallback"] and d["evicted_heads"] == 6 for d in details)
    assert events[-1].kind == "stop" and events[-1].new_tokens == 60 and most <= session.cache.max_slots


def test_a_singular_system_still_gives_finite_fits(tiny_llama):
    """Every key of the span identical: the normal equations are singular; the float64 fallback still fits."""
    from agentloop.compaction.span import compact_span

    session = Session(tiny_llama)
    list(session.feed(_prompt(48)))
    for i in session.cache.compactable:
        layer = session.cache.layers[i]
        layer.keys[..., 8:40, :] = layer.keys[..., 8:9, :]
        layer.values[..., 8:40, :] = layer.values[..., 8:9, :]
    stats = compact_span(session, 8, 40, 0.5)
    assert stats.fallback is None
    for i in session.cache.compactable:
        layer = session.cache.layers[i]
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all() and not layer.beta.isnan().any()
    list(session.feed(_prompt(4, seed=9)))
    assert torch.isfinite(session.last_logits).all()


def test_ctrl_c_inside_a_compaction_leaves_the_cache_whole(tiny_llama, monkeypatch):
    _failing_compact(monkeypatch, fail_on=2, error=KeyboardInterrupt())
    session = Session(tiny_llama, cap="64tok", policy=make_policy("am", protect_recent=8))
    list(session.feed(_prompt(40)))
    with pytest.raises(KeyboardInterrupt):
        list(session.generate(GenerationSettings(max_new_tokens=120, ignore_eos=True)))
    lengths = {session.cache.layers[i].physical_len for i in session.cache.compactable}
    assert lengths == {session.cache.physical_len} and session.cache.physical_len < 64  # compacted, consistently
    monkeypatch.undo()
    events = list(session.generate(GenerationSettings(max_new_tokens=40, ignore_eos=True)))
    assert events[-1].kind == "stop" and events[-1].new_tokens == 40 and torch.isfinite(session.last_logits).all()


def test_an_injected_oom_in_a_cli_run_leaves_a_complete_trace(tmp_path, monkeypatch):
    from agentloop.cli import main

    _failing_compact(monkeypatch, fail_on=1, error=torch.OutOfMemoryError("injected out of memory"))
    task = tmp_path / "task.yaml"
    task.write_text("name: oom\nmodel: random:tiny-qwen3\nprompt: The sea was calm and the sky was grey.\n"
                    "generation: {max_new_tokens: 150, ignore_eos: true}\nmemory: {cap: 64tok, policy: am}\n")
    trace = tmp_path / "trace.jsonl"
    assert main(["run", str(task), "--trace", str(trace), "--quiet"]) == 0
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    policies = [r for r in records if r["kind"] == "policy"]
    assert records[-1]["kind"] == "stop" and records[-1]["new_tokens"] == 150
    assert "OutOfMemoryError" in policies[0]["details"]["fallback"]
    assert all(r["physical_len"] <= 64 for r in records if r["kind"] == "token")


def test_memory_eval_keep_reruns_some_rows_and_keeps_the_others(tmp_path, monkeypatch):
    from agentloop.errors import AgentloopError
    from agentloop.evals import memory

    monkeypatch.chdir(tmp_path)
    spawned = []

    def fake_spawn(args, cap, policy):  # a row as run_one returns it, without running a model
        spawned.append((cap, policy))
        return {"model": args.model, "policy": policy, "cap": cap, "cap_bytes": 1 << 20, "budget_bytes": 2 << 20,
                "cache_slots": 16, "peak_above_weights": len(spawned) << 20, "peak_over_cap": 1.0,
                "limit_bytes": 3 << 20, "within_limit": True, "policy_actions": 6, "seconds_per_action": 0.1}

    monkeypatch.setattr(memory, "_spawn", fake_spawn)
    assert memory.main(["--caps", "64tok", "128tok", "--policies", "am", "streaming"]) == 0
    first = json.loads((tmp_path / "evals/results/memory.json").read_text())["rows"]
    assert memory.main(["--caps", "64tok", "--policies", "am", "--keep"]) == 0
    rows = json.loads((tmp_path / "evals/results/memory.json").read_text())["rows"]
    assert spawned[-1] == ("64tok", "am") and len(rows) == 4
    assert [r for r in rows if (r["cap"], r["policy"]) != ("64tok", "am")] == first[1:]  # the others untouched
    assert [r["peak_above_weights"] for r in rows if (r["cap"], r["policy"]) == ("64tok", "am")] == [5 << 20]
    with pytest.raises(AgentloopError, match="other settings"):  # rows of another run are never mixed in
        memory.main(["--caps", "64tok", "--policies", "am", "--keep", "--compactions", "3"])
