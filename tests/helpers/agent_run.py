"""A scripted agent run in its own process, for the resume tests: `python agent_run.py WORKDIR [--resume]`.

A 2-layer random Llama behind SmolLM2's tokenizer and chat template plays three scripted tool calls (the third
reads a long file that is compacted on ingestion) and then decodes its final reply itself. Every event is
printed as a JSON line (kind, step) as it happens, so a test can kill the process at a chosen moment; at the end
the transcript and a digest of the cache's token ids are printed."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentloop import Agent
from agentloop.models import LoadedModel, load_model


def call(name: str, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


SCRIPT = [call("list_dir"), call("read_file", path="notes.txt"), call("read_file", path="report.txt"), None]


def reply(transcript: list[dict]) -> str | None:
    """The reply for this point of the conversation (None: the model decodes it)."""
    return SCRIPT[sum(m["role"] == "assistant" for m in transcript)]


def main(workdir: Path, resume: bool) -> None:
    tokenizer = load_model("smollm2-135m").tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    loaded = LoadedModel(model=LlamaForCausalLM(config).eval(), tokenizer=tokenizer, name="tiny-chat", source="config")
    checkpoint = workdir / "agent.ckpt"
    if resume:
        agent = Agent.resume(checkpoint, loaded=loaded, reply_fn=reply, checkpoint_every=8)
    else:
        ingest = {"trigger_tokens": 500, "ratio": 0.25, "keep_first": 8, "keep_last": 8, "max_queries": 256}
        agent = Agent(loaded=loaded, task="What do my files say?", tools=["read_file", "list_dir"],
                      workspace=str(workdir / "ws"), reply_fn=reply, checkpoint=checkpoint, checkpoint_every=8,
                      trace=str(workdir / "agent.jsonl"), generation={"max_new_tokens": 40, "ignore_eos": True},
                      memory={"cap": "700tok", "policy": "am", "ingest": ingest})
    for event in agent.events():
        print(json.dumps({"kind": event.kind, "step": getattr(event, "step", None)}), flush=True)
    digest = hashlib.sha256(json.dumps(agent.session.token_ids).encode()).hexdigest()
    print(json.dumps({"transcript": agent.transcript, "tokens": digest, "policy_actions": agent.session.policy_actions,
                      "ingestions": agent.ingestions}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--resume" in sys.argv[2:])
