"""Turn messages or a raw prompt into token ids with the model's own chat template."""

from __future__ import annotations

from agentloop.errors import AgentloopError


def encode_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise AgentloopError("this model's tokenizer has no chat template: give a raw `prompt` instead of messages")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def encode_text(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
