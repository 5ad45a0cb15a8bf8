"""`agentloop serve` as a client sees it: the real server in a subprocess on localhost, driven by the official
`openai` client (raw HTTP only where the client cannot send the request: malformed JSON, a disconnect)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class Server:
    """A server process on a free port, with an OpenAI client pointed at it."""

    def __init__(self, *args: str, script: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = ([sys.executable, script, str(self.port)] if script else
                   [sys.executable, "-m", "agentloop.cli", "serve", "--port", str(self.port), *args])
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"agentloop-serve-{self.port}.log", "w+")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=ENV)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise AssertionError(f"the server did not come up: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def chat(self, messages: list[dict], **options):
        options.setdefault("temperature", 0)
        options.setdefault("max_tokens", 16)
        return self.client.chat.completions.create(model=options.pop("model", MODEL), messages=messages, **options)

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def roomy():
    """SmolLM2 with room for eight conversations running at once (160 slots each): it never parks."""
    server = Server("--model", MODEL, "--mem-cap", "1600tok", "--session-cap", "160tok")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """SmolLM2 whose cap holds one running conversation (and a little): others are parked, and nothing is ever
    compacted (policy none: a context larger than the session cap is refused)."""
    park = tmp_path_factory.mktemp("parked")
    server = Server("--model", MODEL, "--mem-cap", "200tok", "--session-cap", "160tok", "--policy", "none",
                    "--no-idle-compaction", "--park-dir", str(park), "--queue-timeout", "3")
    server.park_dir = park
    yield server
    server.stop()


def ext(response) -> dict:
    return response.model_extra["agentloop"]


# --- completions ------------------------------------------------------------------------------------------------
def test_a_completion_and_the_same_completion_streamed(roomy):
    messages = [{"role": "user", "content": "Name three planets."}]
    response = roomy.chat(messages, max_tokens=30)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and "Mars" in choice.message.content
    assert choice.finish_reason == "stop" and response.model == MODEL and response.object == "chat.completion"
    usage = response.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 3 and usage.prompt_tokens_details.cached_tokens == 0
    info = ext(response)
    assert info["session"] == "new" and info["prefill_tokens"] == usage.prompt_tokens
    assert 0 < info["cache_bytes"] <= info["cap_bytes"] and info["server_cache_bytes"] <= info["server_cap_bytes"]

    chunks = list(roomy.chat(messages, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the stream says what the completion said
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop" and ext(finish[0])["session"] == "new"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_stop_strings_are_cut_from_the_answer_streamed_or_not(roomy):
    messages = [{"role": "user", "content": "Name three planets."}]
    full = roomy.chat(messages, max_tokens=30).choices[0].message.content
    assert "Venus" in full
    cut = roomy.chat(messages, max_tokens=30, stop=["Venus"])
    assert cut.choices[0].message.content == full[:full.index("Venus")] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in roomy.chat(messages, max_tokens=30, stop=["Venus"],
                                                                            stream=True) if c.choices)
    assert streamed == full[:full.index("Venus")]


def test_a_ten_turn_conversation_prefills_only_its_new_turns_under_the_cap(roomy, smollm2):
    tokenizer = smollm2.tokenizer
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    questions = ["What is the capital of France?", "And of Italy?", "What is a river?", "Name a long river.",
                 "What is rain?", "Why is the sky blue?", "What do bees make?", "Name a fruit.", "What is snow?",
                 "Name a planet.", "What is a star?", "Thank you."]
    held, conversation = 0, None
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        response = roomy.chat(messages, max_tokens=24)
        info, usage = ext(response), response.usage
        assert info["cache_bytes"] <= info["cap_bytes"] and info["peak_bytes"] <= info["cap_bytes"]
        if turn:  # warm: everything the server held is reused, only the new user turn (and its template) is read
            assert info["session"] == "warm" and info["conversation"] == conversation
            assert usage.prompt_tokens_details.cached_tokens == held == info["reused_tokens"]
            assert info["prefill_tokens"] == usage.prompt_tokens - held
            # the question, the end of the previous reply's turn, the new turn's and the reply's headers
            assert info["prefill_tokens"] <= len(tokenizer(question)["input_ids"]) + 12 < usage.prompt_tokens / 3
        conversation = info["conversation"]
        held = usage.prompt_tokens + usage.completion_tokens
        messages.append(response.choices[0].message.model_dump(exclude_none=True))
    assert info["compactions"] >= 3 and info["logical_tokens"] > 160 >= info["slots"]
    metrics = roomy.metrics()
    assert metrics["agentloop_prefill_tokens_total"] < metrics["agentloop_prompt_tokens_total"] / 3


def test_eight_concurrent_clients_get_their_own_answers(roomy):
    prompts = [f"Repeat this word three times: {word}." for word in
               ["apple", "river", "candle", "mountain", "violin", "garden", "rocket", "pencil"]]
    alone = [roomy.chat([{"role": "user", "content": p}]).choices[0].message.content for p in prompts]
    answers, errors = [None] * 8, []

    def client(k: int) -> None:
        try:
            if k % 2:
                chunks = roomy.chat([{"role": "user", "content": prompts[k]}], stream=True)
                answers[k] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answers[k] = roomy.chat([{"role": "user", "content": prompts[k]}]).choices[0].message.content
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors
    assert answers == alone  # greedy: each one as if it had been alone on the server
    assert len(set(answers)) == 8
    assert roomy.metrics()["agentloop_running"] == 0


def test_a_client_that_disconnects_mid_stream_releases_its_turn(roomy):
    before = roomy.metrics()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", roomy.url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data:")
            if events == 4:
                break  # leave after a few tokens: the connection closes here
    deadline = time.monotonic() + 60
    while (metrics := roomy.metrics())["agentloop_turns_cancelled_total"] <= before["agentloop_turns_cancelled_total"]:
        assert time.monotonic() < deadline, "the turn was not cancelled"
        time.sleep(0.2)
    assert metrics["agentloop_running"] == 0
    generated = metrics["agentloop_completion_tokens_total"] - before["agentloop_completion_tokens_total"]
    assert generated == 0  # a cancelled turn counts no finished completion
    assert roomy.chat([{"role": "user", "content": "Say hi."}]).choices[0].message.content  # still serving


# --- tools ------------------------------------------------------------------------------------------------------
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def scripted():
    server = Server(script=str(HERE / "helpers" / "scripted_server.py"))
    yield server
    server.stop()


def _round_trip(server: Server, model: str, first_options: dict | None = None, **options) -> tuple:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = server.chat(messages, model=model, tools=WEATHER, **{**options, **(first_options or {})})
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.type == "function"
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "celsius": 21})}]
    second = server.chat(messages, model=model, tools=WEATHER, **options)
    return first, second


def test_tool_call_round_trip_with_a_scripted_model(scripted):
    first, second = _round_trip(scripted, "tiny-chat")
    message = first.choices[0].message
    assert message.content == "Let me check." and json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert second.choices[0].message.content == "The weather is sunny." and second.choices[0].finish_reason == "stop"
    assert ext(second)["session"] == "warm" and ext(second)["reused_tokens"] == ext(first)["logical_tokens"]
    # streamed: the call arrives as a tool_calls delta, the same as the completion's
    chunks = list(scripted.chat([{"role": "user", "content": "What is the weather in Rome?"}], model="tiny-chat",
                                tools=WEATHER, stream=True))
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_call_round_trip_on_smollm2(roomy):
    """The first reply is made to call get_weather (tool_choice names it); the model writes the arguments itself.
    The answer after the tool result is asked for with tool_choice none, as clients do to get the final text."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    first, second = _round_trip(roomy, MODEL, first_options={"tool_choice": choice}, tool_choice="none", max_tokens=30)
    assert "paris" in first.choices[0].message.tool_calls[0].function.arguments.lower()
    assert ext(second)["session"] == "warm" and ext(second)["reused_tokens"] == ext(first)["logical_tokens"]
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")


# --- one cap, parking -------------------------------------------------------------------------------------------
def test_a_parked_conversation_comes_back_and_goes_on_as_if_never_parked(tight, roomy):
    a = [{"role": "user", "content": "Tell me about the moon in two sentences."}]
    b = [{"role": "user", "content": "Tell me about the sea in two sentences."}]
    # the same turns on a server that never needs to park
    ref_a1, ref_b1 = roomy.chat(a), roomy.chat(b)
    ref_a2 = roomy.chat(a + [ref_a1.choices[0].message.model_dump(exclude_none=True),
                             {"role": "user", "content": "And the sun?"}])
    before = tight.metrics()
    a1 = tight.chat(a)
    b1 = tight.chat(b)  # needs room: the idle conversation a is parked to disk
    assert tight.metrics()["agentloop_parked_total"] == before["agentloop_parked_total"] + 1
    assert len(list(tight.park_dir.glob("*.ckpt"))) == 1
    a2 = tight.chat(a + [a1.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "And the sun?"}])
    assert ext(a2)["session"] == "restored" and ext(a2)["conversation"] == ext(a1)["conversation"]
    assert ext(a2)["reused_tokens"] == ext(a1)["logical_tokens"]
    assert a2.choices[0].message.content == ref_a2.choices[0].message.content  # as if it had never left memory
    assert (a1.choices[0].message.content, b1.choices[0].message.content) == (ref_a1.choices[0].message.content,
                                                                              ref_b1.choices[0].message.content)
    for response in (a1, b1, a2):
        assert ext(response)["server_peak_bytes"] <= ext(response)["server_cap_bytes"]
    # b was parked for a2; its file is lost: b's next turn answers as a new session and says so
    parked = list(tight.park_dir.glob("*.ckpt"))
    assert len(parked) == 1
    parked[0].write_bytes(b"damaged")
    b2 = tight.chat(b + [b1.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "And lakes?"}])
    assert ext(b2)["session"] == "new" and "could not be loaded back" in ext(b2)["notice"]
    assert ext(b2)["reused_tokens"] == 0 and b2.choices[0].message.content
    assert tight.metrics()["agentloop_lost_total"] == before["agentloop_lost_total"] + 1


def test_a_request_that_waits_past_the_timeout_gets_a_503(tight):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", tight.url + "/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()  # kept: a dropped iterator would close the stream
        assert next(lines).startswith("data:")  # running: it holds the cap's only room for a running turn
        with pytest.raises(openai.APIStatusError) as caught:
            tight.chat([{"role": "user", "content": "Hi."}])
    assert caught.value.status_code == 503
    error = caught.value.body
    assert error["type"] == "server_error" and "waited 3 s" in error["message"]
    assert tight.chat([{"role": "user", "content": "Hi."}]).choices[0].message.content  # and it goes on


def test_a_context_larger_than_the_cap_is_refused_without_a_compacting_policy(tight):
    with pytest.raises(openai.BadRequestError) as caught:
        tight.chat([{"role": "user", "content": "lorem ipsum " * 200}])
    error = caught.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages" and "--policy am" in error["message"]
    assert tight.chat([{"role": "user", "content": "Hi."}]).choices[0].message.content


def test_a_message_longer_than_the_session_cap_is_read_in_pieces_and_compacted_with_am(roomy):
    response = roomy.chat([{"role": "user", "content": "Summarize: " + "The tide rose over the old pier. " * 60}])
    info = ext(response)
    assert response.usage.prompt_tokens > 400 > 160 and info["turn_compactions"] >= 3
    assert info["peak_bytes"] <= info["cap_bytes"] and response.choices[0].message.content


# --- bad requests -----------------------------------------------------------------------------------------------
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}
BAD = [  # (body, status, param)
    ("not json", 400, None),
    ("[1, 2]", 400, None),
    ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "stream": "sometimes"}, 400, "stream"),
    ({**GOOD, "model": "gpt-9"}, 404, "model"),
    ({**GOOD, "n": 2}, 400, "n"),
    ({**GOOD, "frobnicate": True}, 400, "frobnicate"),
    ({**GOOD, "messages": []}, 400, "messages"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({**GOOD, "messages": [{"role": "user"}]}, 400, "messages.0"),
    ({**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0"),
    ({**GOOD, "tool_choice": "required"}, 400, "tool_choice"),
    ({**GOOD, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ({**GOOD, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


def test_bad_requests_get_openai_style_errors_and_the_server_goes_on(roomy):
    for body, status, param in BAD:
        content = body if isinstance(body, str) else json.dumps(body)
        response = httpx.post(roomy.url + "/v1/chat/completions", content=content, timeout=120,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param"} and error["message"] and "Traceback" not in response.text
        if param is not None:
            assert error["param"] == param, (body, error)
    for path, status in (("/v1/nothing", 404), ("/v1/models/gpt-9", 404)):
        response = httpx.get(roomy.url + path)
        assert response.status_code == status and response.json()["error"]["message"]
    assert httpx.get(roomy.url + "/v1/chat/completions").status_code == 405
    # and through the official client, which raises the matching error classes
    with pytest.raises(openai.NotFoundError):
        roomy.chat([{"role": "user", "content": "Hi."}], model="gpt-9")
    with pytest.raises(openai.BadRequestError):
        roomy.chat([{"role": "user", "content": "Hi."}], n=2)
    assert roomy.chat([{"role": "user", "content": "Hi."}]).choices[0].message.content
    assert httpx.get(roomy.url + "/health").json()["status"] == "ok"


def test_models_health_and_metrics(roomy):
    models = roomy.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(roomy.url + "/health").json()
    assert health["status"] == "ok" and health["cap_bytes"] > 0
    text = httpx.get(roomy.url + "/metrics").text
    assert "# TYPE agentloop_requests_total counter" in text and 'agentloop_requests_total{status="200"}' in text
    metrics = roomy.metrics()
    per_conversation = [v for k, v in metrics.items() if k.startswith("agentloop_cache_bytes{conversation=")]
    assert per_conversation and sum(per_conversation) == metrics["agentloop_cache_bytes_total"]
    assert metrics["agentloop_peak_cache_bytes"] <= metrics["agentloop_peak_counted_bytes"] <= metrics["agentloop_cap_bytes"]



# --- the pool in-process: what frees memory, in which order, and the cap --------------------------------------
def _held(pool, n_tokens: int, seed: int, last_used: float):
    """A conversation whose session has read `n_tokens` (a tiny model: no chat format needed)."""
    import torch

    from agentloop.server.conversations import Conversation

    conv = Conversation(id=f"c{seed}", tools_key="[]", chat=None, messages=[{"role": "user", "content": str(seed)}],
                        last_used=last_used)
    conv.session = pool.new_session()
    for _ in conv.session.feed(torch.randint(5, 500, (n_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()):
        pass
    pool.conversations[conv.id] = conv
    return conv


def _pool(loaded, tmp_path, cap: int, pool_class=None):
    from agentloop.server.conversations import Pool

    return (pool_class or Pool)(loaded, cap_bytes=cap, session_cap="64tok", policy="am",
                                policy_options={"max_queries": 128}, park_dir=tmp_path)


def test_with_caches_allocated_whole_the_pool_parks_the_least_recently_used_and_never_passes_the_cap(tiny_llama,
                                                                                                   tmp_path):
    from agentloop.server.conversations import footprint

    probe = _pool(tiny_llama, tmp_path, 10**9)
    assert not probe.compaction_frees  # the budget allocates a session's cache at its first token
    idle_bytes = _held(probe, 60, seed=9, last_used=0.0).session.cache.nbytes()
    session_cap = probe.session_cap_bytes
    pool = _pool(tiny_llama, tmp_path, session_cap + idle_bytes * 3 // 2)  # one running turn and one idle session
    old, newer = _held(pool, 60, seed=1, last_used=1.0), _held(pool, 60, seed=2, last_used=2.0)
    assert pool.counted_bytes() == footprint(old.session, False) + footprint(newer.session, False) == 2 * idle_bytes
    assert pool.make_room(pool.need(None))  # a new conversation's turn: the least recently used idle one goes
    assert (pool.stats.idle_compactions, pool.stats.parked) == (0, 1)
    assert old.session is None and (tmp_path / f"{old.id}.ckpt").is_file() and newer.session is not None
    assert pool.counted_bytes() + pool.session_cap_bytes <= pool.cap_bytes
    # when running turns hold the rest, nothing is parked for nothing: the request waits
    newer.running = True
    assert not pool.make_room(pool.need(old)) and pool.stats.parked == 1
    newer.running = False
    assert pool.make_room(pool.need(old)) and pool.stats.parked == 1  # once newer is idle, old fits beside it
    assert pool.restore(old) is None and len(old.session.token_ids) == 60 and pool.stats.restored == 1
    assert not (tmp_path / f"{old.id}.ckpt").exists()
    # a parked file that is damaged: the conversation leaves the pool, and the caller is told why
    pool.park(newer)
    (tmp_path / f"{newer.id}.ckpt").write_bytes(b"damaged")
    notice = pool.restore(newer)
    assert "could not be loaded back" in notice and newer.id not in pool.conversations and pool.stats.lost == 1


def test_where_compaction_frees_memory_idle_sessions_are_compacted_before_any_is_parked(tiny_llama, tmp_path):
    """A stand-in for a cache whose bytes follow its slots (as before the memory budget preallocated them)."""
    from agentloop.server.conversations import Pool

    class HeldBytesPool(Pool):
        def new_session(self):
            session = super().new_session()
            session.cache.nbytes = session.cache.held_bytes
            return session

    probe = _pool(tiny_llama, tmp_path, 10**9, HeldBytesPool)
    assert probe.compaction_frees
    held = _held(probe, 60, seed=9, last_used=0.0).session.cache.nbytes()
    pool = _pool(tiny_llama, tmp_path, probe.session_cap_bytes + 2 * held - held // 6, HeldBytesPool)
    old, newer = _held(pool, 60, seed=1, last_used=1.0), _held(pool, 60, seed=2, last_used=2.0)
    assert pool.make_room(pool.need(None))  # compacting the least recently used idle session is enough
    assert (pool.stats.idle_compactions, pool.stats.parked) == (1, 0)
    assert old.idle_compacted and old.session.cache.nbytes() < held and old.session.policy_actions == 1
    assert not newer.idle_compacted and newer.session.cache.nbytes() == held
    assert pool.counted_bytes() + pool.session_cap_bytes <= pool.cap_bytes
