"""`agentloop serve` on a 2-layer random Llama behind SmolLM2's tokenizer, with scripted replies, for the tool-call
tests: `python scripted_server.py PORT`. A reply to a user message calls get_weather for the city the message
names; a reply to a tool result states it. Rendering, prefill, warm sessions, tool-call parsing and the wire
format all run for real; only the reply text is scripted (a random model's own text would be noise)."""

from __future__ import annotations

import json
import re
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentloop.models import LoadedModel, load_model
from agentloop.server import build_engine, serve


def reply(transcript: list[dict]) -> str:
    last = transcript[-1]
    if last["role"] == "tool":
        return f"The weather is {json.loads(last['content'])['sky']}."
    city = re.search(r"in (\w+)", last["content"]).group(1)
    call = json.dumps({"name": "get_weather", "arguments": {"city": city}})
    return f"Let me check. <tool_call>{call}</tool_call>"


def main(port: int) -> None:
    tokenizer = load_model("smollm2-135m").tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    loaded = LoadedModel(model=LlamaForCausalLM(config).eval(), tokenizer=tokenizer, name="tiny-chat", source="config")
    serve(build_engine(loaded, cap_bytes=64_000_000, session_cap="512tok", reply_fn=reply), port=port)


if __name__ == "__main__":
    main(int(sys.argv[1]))
