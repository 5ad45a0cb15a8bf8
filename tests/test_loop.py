"""The loop against a plain transformers forward: logits, β, positions, and the cap."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import reference_copy
from transformers import DynamicCache

from agentloop import GenerationSettings, Session
from agentloop.chat import encode_messages
from agentloop.loop import sample
from agentloop.policies import make_policy


def _prompt(n: int, seed: int = 1, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _fed(model, prompt: list[int], record: bool = False) -> Session:
    """A fresh session that has prefilled `prompt`."""
    session = Session(model)
    list(session.feed(prompt, record=record))
    return session


def _run(session: Session, prompt: list[int], steps: int, settings: GenerationSettings | None = None):
    """Feed, decode, and return the fp32 logits seen before each sampled token, plus the events."""
    events = list(session.feed(prompt))
    logits = [session.last_logits.clone()]
    settings = settings or GenerationSettings(max_new_tokens=steps, ignore_eos=True)
    for event in session.generate(settings):
        events.append(event)
        if event.kind == "token":
            logits.append(session.last_logits.clone())
    return torch.stack(logits), events


@torch.no_grad()
def _reference_logits(model, token_ids: list[int], first: int) -> torch.Tensor:
    """Logits of a single plain forward over all tokens, at positions first-1 .. end-1."""
    out = model(torch.tensor([token_ids])).logits[0].float()
    return out[first - 1:]


def test_logits_match_plain_forward_for_100_steps(tiny):
    reference = reference_copy(tiny)
    prompt = _prompt(37)
    session = Session(tiny, prefill_chunk=8)
    logits, _ = _run(session, prompt, steps=110)
    assert session.cache.logical_len == len(prompt) + 110
    expected = _reference_logits(reference, session.token_ids, len(prompt))
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= 1e-4


def test_smollm2_logits_match_plain_forward(smollm2):
    reference = reference_copy(smollm2)
    prompt = encode_messages(smollm2.tokenizer, [{"role": "user", "content": "List three facts about the moon."}])
    session = Session(smollm2, prefill_chunk=16)
    logits, events = _run(session, list(prompt), steps=100)
    expected = _reference_logits(reference, session.token_ids, len(prompt))
    assert (logits - expected).abs().max() <= 1e-4
    assert events[-1].text.strip(), "decoded text should not be empty"


def _spans_of(session: Session, start: int, end: int):
    return {i: (session.cache.layers[i].keys[..., start:end, :].clone(),
                session.cache.layers[i].values[..., start:end, :].clone()) for i in session.cache.compactable}


def _continue(session: Session, steps: int = 20) -> torch.Tensor:
    logits = [session.last_logits.clone()]
    for event in session.generate(GenerationSettings(max_new_tokens=steps, ignore_eos=True)):
        if event.kind == "token":
            logits.append(session.last_logits.clone())
    return torch.stack(logits)


def test_replacing_a_span_with_itself_and_zero_beta_changes_nothing(tiny):
    prompt = _prompt(30)
    plain = _fed(tiny, prompt)
    replaced = _fed(tiny, prompt)
    for i, (keys, values) in _spans_of(replaced, 5, 25).items():
        replaced.cache.replace(i, 5, 25, keys, values, beta=torch.zeros(keys.shape[:-1]))
        assert replaced.cache.beta(i) is not None  # the β path really runs
    assert (_continue(plain) - _continue(replaced)).abs().max() <= 1e-5


@pytest.mark.parametrize("copies", [2, 5])
def test_k_duplicate_keys_equal_one_key_with_beta_log_k(tiny, copies):
    prompt = _prompt(30)
    duplicated = _fed(tiny, prompt)
    merged = _fed(tiny, prompt)
    for i, (keys, values) in _spans_of(duplicated, 10, 11).items():
        duplicated.cache.replace(i, 10, 11, keys.repeat(1, 1, copies, 1), values.repeat(1, 1, copies, 1))
        merged.cache.replace(i, 10, 11, keys, values, beta=torch.full(keys.shape[:-1], math.log(copies)))
    assert duplicated.cache.physical_len == merged.cache.physical_len + copies - 1
    a, b = _continue(duplicated), _continue(merged)
    assert (a - b).abs().max() <= 1e-5
    # control: without β the merged cache really differs, so the check above can fail
    control = _fed(tiny, prompt)
    for i, (keys, values) in _spans_of(control, 10, 11).items():
        control.cache.replace(i, 10, 11, keys.repeat(1, 1, copies, 1), values.repeat(1, 1, copies, 1))
        control.cache.replace(i, 10, 10 + copies, keys, values)
    assert (a - _continue(control)).abs().max() > 1e-3


def test_new_tokens_continue_from_the_logical_length(tiny_llama):
    prompt = _prompt(40)
    session = _fed(tiny_llama, prompt)
    kept = torch.cat([torch.arange(0, 8), torch.arange(24, 40)])
    for i in session.cache.compactable:
        session.cache.keep(i, kept)
    assert (session.cache.logical_len, session.cache.physical_len) == (40, 24)

    # reference by hand: a stock model over a stock cache holding exactly the kept slots
    reference = reference_copy(tiny_llama)
    stock = DynamicCache()
    for i, layer in enumerate(session.cache.layers):
        stock.update(layer.keys.clone(), layer.values.clone(), i)
    token = int(session.last_logits.argmax())

    def stock_logits(position: int) -> torch.Tensor:
        cache = DynamicCache()
        for i, layer in enumerate(stock.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), i)
        with torch.no_grad():
            out = reference(torch.tensor([[token]]), position_ids=torch.tensor([[position]]), past_key_values=cache)
        return out.logits[0, -1].float()

    ours = _continue(session, steps=1)[1]
    assert (ours - stock_logits(40)).abs().max() <= 1e-4
    assert (ours - stock_logits(24)).abs().max() > 1e-3  # physical positions would be wrong


def test_sliding_layers_are_never_compacted(tiny_gemma3):
    session = _fed(tiny_gemma3, _prompt(40))
    sliding = [i for i in range(len(session.cache.layers)) if i not in session.cache.compactable]
    assert sliding == [0, 2]
    layer = session.cache.layers[sliding[0]]
    assert layer.physical_len <= layer.sliding_window
    with pytest.raises(ValueError, match="sliding-window layer"):
        session.cache.keep(sliding[0], torch.arange(4))


def test_nbytes_counts_every_allocated_tensor(tiny_llama):
    session = Session(tiny_llama, cap="64tok")
    list(session.feed(_prompt(20)))
    layers = session.cache.layers
    allocated = sum(t.numel() * t.element_size() for layer in layers
                    for t in (layer.key_buffer, layer.value_buffer, layer.beta_buffer))
    assert session.cache.nbytes() == allocated
    capacity = session.budget.cache_slots + session.budget.probe_slots
    assert all(layer.capacity == capacity for layer in layers)  # sized once, by the budget
    slot = 3 * 2 * (2 * 16 + 1) * 4  # layers x kv_heads x (K, V, β) x fp32
    assert session.cache.held_bytes() == 20 * slot
    keys, values = layers[0].keys[..., :4, :].clone(), layers[0].values[..., :4, :].clone()
    session.cache.replace(0, 0, 8, keys, values, beta=torch.zeros(keys.shape[:-1]))
    assert layers[0].physical_len == 16 and session.cache.held_bytes() == 16 * slot // 3 + 2 * 20 * slot // 3
    assert session.cache.nbytes() == allocated  # compaction frees slots, not buffers


def test_uncapped_buffers_grow_geometrically(tiny_llama):
    session = _fed(tiny_llama, _prompt(200))
    assert session.cache.layers[0].capacity == 256
    list(session.feed(_prompt(100, seed=2)))
    assert session.cache.layers[0].capacity == 512 and session.cache.physical_len == 300
    assert session.cache.nbytes() == 3 * 512 * 2 * (2 * 16 + 1) * 4


@pytest.mark.parametrize("policy", ["truncate", "streaming"])
def test_physical_bytes_never_exceed_the_cap_over_1000_tokens(tiny_llama, policy):
    session = Session(tiny_llama, cap="120tok", policy=make_policy(policy))
    prompt = _prompt(24)
    list(session.feed(prompt))
    cap, steps, actions = session.cap_bytes, 0, 0
    for event in session.generate(GenerationSettings(max_new_tokens=1000, temperature=1.0, seed=3, ignore_eos=True)):
        held = session.cache.held_bytes()
        assert session.cache.nbytes() <= session.budget.cache_bytes <= cap
        assert held <= session.budget.cache_bytes, f"{held} bytes held over a cache budget of {session.budget.cache_bytes}"
        if event.kind == "token":
            steps += 1
            assert event.cache_bytes == held
        actions += event.kind == "policy"
    assert steps == 1000 and actions >= 10
    assert session.cache.logical_len == 1024 and session.cache.physical_len <= 120
    assert session.peak_bytes <= cap


def test_none_policy_stops_at_the_cap(tiny_llama):
    session = Session(tiny_llama, cap="64tok")
    list(session.feed(_prompt(24)))
    events = list(session.generate(GenerationSettings(max_new_tokens=500, ignore_eos=True)))
    stop = events[-1]
    assert stop.kind == "stop" and stop.reason == "mem_cap" and not stop.error
    assert stop.new_tokens == 40 and session.cache.physical_len == 64
    assert session.peak_bytes <= session.cap_bytes


def test_sampling_is_seeded(tiny_llama):
    def sample_run(seed):
        session = Session(tiny_llama)
        list(session.feed(_prompt(10)))
        list(session.generate(GenerationSettings(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=50,
                                                 seed=seed, ignore_eos=True)))
        return session.token_ids
    assert sample_run(1) == sample_run(1)
    assert sample_run(1) != sample_run(2)


def test_fork_is_an_independent_branch(tiny_llama):
    session = _fed(tiny_llama, _prompt(30))
    branch = session.fork()
    for i in branch.cache.compactable:
        branch.cache.keep(i, torch.arange(10))
    assert session.cache.physical_len == 30 and branch.cache.physical_len == 10
    same = session.fork()
    assert (_continue(session, 10) - _continue(same, 10)).abs().max() == 0


def test_teacher_forced_logits_match_a_plain_forward(tiny_llama):
    reference_model = reference_copy(tiny_llama)
    session = Session(tiny_llama, prefill_chunk=7)
    prompt = _prompt(40)
    chunks = []
    list(session.feed(prompt, on_logits=chunks.append))
    logits = torch.cat(chunks)  # [40, vocab]
    with torch.no_grad():
        reference = reference_model(torch.tensor([prompt])).logits[0].float()
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max() < 1e-4
    assert torch.equal(session.last_logits, logits[-1])


def test_repetition_penalty_steers_away_from_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0, -1.2])
    greedy = GenerationSettings(temperature=0.0)
    generator = torch.Generator()
    assert sample(logits, greedy, generator, context=[0]) == 0
    penalized = GenerationSettings(temperature=0.0, repetition_penalty=1.3)
    assert sample(logits, penalized, generator, context=[0]) == 1  # 2.0 / 1.3 < 1.9
    assert sample(torch.tensor([-1.0, -1.2]), penalized, generator, context=[0]) == 1  # -1.3 < -1.2
    assert torch.equal(logits, torch.tensor([2.0, 1.9, -1.0, -1.2]))  # the caller's logits are untouched


def test_cache_state_dict_round_trip(tiny):
    """A session rebuilt from the cache's state_dict continues with the same logits as the original."""
    prompt = _prompt(40)
    session = Session(tiny, cap="32tok", policy=make_policy("am", protect_recent=4), prefill_chunk=8)
    list(session.feed(prompt[:30]))
    list(session.generate(GenerationSettings(max_new_tokens=8, ignore_eos=True)))  # compacts: β on the cache
    state = session.cache.state_dict()
    other = Session(tiny, cap="32tok")
    other.cache.load_state_dict(state)
    assert other.cache.logical_len == session.cache.logical_len
    assert other.cache.physical_len == session.cache.physical_len
    step = prompt[30:33]
    assert torch.allclose(session._step(step), other._step(step), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_static_decode_step_matches_the_eager_loop_across_compactions(arch):
    """The static step (what a CUDA graph replays: attention over the whole buffer, β = −inf past the held slots,
    device-side write slots and query window) gives the eager loop's logits over 120 steps with compactions."""
    from conftest import _tiny

    from agentloop.models import LoadedModel

    loaded = LoadedModel(model=_tiny(arch), tokenizer=None, name=f"tiny-{arch}", source="config")
    prompt = _prompt(40)
    runs = {}
    for decode in ("eager", "static"):
        session = Session(loaded, cap="64tok", policy=make_policy("am", protect_recent=8), decode=decode)
        logits, events = _run(session, prompt, steps=120)
        runs[decode] = (logits, session)
        assert sum(e.kind == "policy" for e in events) >= 3
    (eager, a), (static, b) = runs["eager"], runs["static"]
    assert b._decoder is not None and b._decoder.graph is None  # the static step really ran (eagerly, on CPU)
    assert a._decoder is None
    assert a.token_ids == b.token_ids
    assert (eager - static).abs().max() <= 1e-4
    assert torch.equal(a.recent_recorder.queries()[0].float(), b.recent_recorder.queries()[0].float())


def test_static_decode_step_matches_a_plain_forward(tiny_llama):
    reference = reference_copy(tiny_llama)
    prompt = _prompt(37)
    session = Session(tiny_llama, cap="256tok", decode="static")
    logits, _ = _run(session, prompt, steps=100)
    expected = _reference_logits(reference, session.token_ids, len(prompt))
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_lean_forward_gives_the_modeling_code_logits_and_queries_across_compactions(arch, monkeypatch):
    """The written-out one-token forward (agentloop.lean) against the model's own forward on the same capped run:
    the same greedy tokens, logits to float32 round-off and the same recorded decode-time queries, through
    compactions (β on the cache); Gemma 3 (sliding windows, scaled embeddings) keeps the modeling code."""
    from conftest import _tiny

    from agentloop.lean import LeanForward
    from agentloop.models import LoadedModel

    calls, forward = [], LeanForward.forward
    monkeypatch.setattr(LeanForward, "forward", lambda self, *args: calls.append(1) or forward(self, *args))
    loaded = LoadedModel(model=_tiny(arch), tokenizer=None, name=f"tiny-{arch}", source="config")
    prompt = _prompt(40)
    runs = {}
    for lean in (True, False):
        session = Session(loaded, cap="64tok", policy=make_policy("am", protect_recent=8), decode="eager", lean=lean)
        logits, events = _run(session, prompt, steps=60)
        runs[lean] = (logits, session)
        assert sum(e.kind == "policy" for e in events) >= 2
    (lean_logits, a), (model_logits, b) = runs[True], runs[False]
    assert (a.lean is not None) == (arch != "gemma3") and b.lean is None
    assert len(calls) == (0 if arch == "gemma3" else 60)  # every decode step of the lean run, none of the other
    assert a.token_ids == b.token_ids
    assert (lean_logits - model_logits).abs().max() <= 1e-5
    first = a.cache.compactable[0]
    assert torch.equal(a.recent_recorder.queries()[first].float(), b.recent_recorder.queries()[first].float())


@pytest.mark.parametrize("window", [None, 200])
@pytest.mark.parametrize("with_beta", [False, True])
def test_multi_token_attention_in_blocks_matches_a_dense_softmax(with_beta, window):
    """A 600-token forward on top of 300 held slots, cut into blocks that each see only their keys, against one dense
    masked softmax in float64 (causal, sliding window, β)."""
    from agentloop.attention import _causal_blocks

    gen = torch.Generator().manual_seed(0)
    kv_heads, groups, d, past, q_len = 2, 3, 16, 300, 600
    kv_len = past + q_len
    queries = torch.randn(1, kv_heads, groups * q_len, d, generator=gen)
    keys, values = (torch.randn(1, kv_heads, kv_len, d, generator=gen) for _ in range(2))
    beta = torch.randn(1, kv_heads, kv_len, generator=gen) if with_beta else None
    out = _causal_blocks(queries, keys, values, beta, q_len, groups, 0.25, window, 0.0, limit=1 << 20)

    rows = torch.arange(past, kv_len)[:, None]
    slots = torch.arange(kv_len)[None, :]
    visible = (slots <= rows) & ((rows - slots < window) if window else True)  # [q_len, kv_len]
    logits = 0.25 * queries.double().view(1, kv_heads, groups, q_len, d) @ keys.double()[:, :, None].mT
    if beta is not None:
        logits = logits + beta.double()[:, :, None, None, :]
    probs = logits.masked_fill(~visible, -math.inf).softmax(-1)
    expected = (probs @ values.double()[:, :, None]).reshape(1, kv_heads, groups * q_len, d)
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max() < 1e-5
