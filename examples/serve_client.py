"""A client of `agentloop serve`, written with the official `openai` package: a conversation that stays warm on
the server, a streamed answer, and a tool-call round trip.

    agentloop serve --mem-cap 256MB --session-cap 300tok &          # SmolLM2-135M, conversations compacted with AM
    python examples/serve_client.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")  # the server checks no key
    model = client.models.list().data[0].id

    # 1. a conversation: each request sends the whole history, the server only reads the new turn
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    for question in ["Name three planets.", "Which of them is the largest?", "How many moons does it have?"]:
        messages.append({"role": "user", "content": question})
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
        reply, info = response.choices[0].message, response.model_extra["agentloop"]
        print(f"> {question}\n{reply.content}")
        print(f"  [{info['session']} session: prefilled {info['prefill_tokens']} tokens, reused {info['reused_tokens']}; "
              f"cache {info['cache_bytes'] / 2**20:.1f} MiB of {info['cap_bytes'] / 2**20:.1f} MiB, "
              f"{info['compactions']} compactions]")
        messages.append({"role": "assistant", "content": reply.content})

    # 2. streamed: server-sent events, the `agentloop` object on the chunk that finishes
    print("> Write a haiku about the sea.")
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Write a haiku "
                                                "about the sea."}], max_tokens=40, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # 3. a tool call: the model's own call syntax comes back as OpenAI tool_calls; the result goes in a tool message
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    print(f"-> {call.function.name}({call.function.arguments})")
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "celsius": 21})}]
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=40, temperature=0)
    print(final.choices[0].message.content)


if __name__ == "__main__":
    main()
