"""The OpenAI Agents SDK on `agentloop serve`: an agent with a Python tool, through the Chat Completions API.

    pip install openai-agents                                  # not a dependency of agentloop
    agentloop serve --mem-cap 256MB --session-cap 300tok &
    python examples/serve_agents_sdk.py [--base-url http://127.0.0.1:8000/v1]

SmolLM2-135M is too small to decide on its own when to call a tool, so the first turn names the tool
(tool_choice) and the SDK resets the choice after the call; a larger model needs neither setting."""

from __future__ import annotations

import argparse

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny, 21 C in {city}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    set_tracing_disabled(True)  # the SDK would upload traces to OpenAI
    client = AsyncOpenAI(base_url=args.base_url, api_key="unused")
    agent = Agent(name="assistant", instructions="You are a helpful assistant.", tools=[get_weather],
                  model=OpenAIChatCompletionsModel(model=args.model, openai_client=client),
                  model_settings=ModelSettings(temperature=0, max_tokens=48, tool_choice="get_weather"),
                  reset_tool_choice=True)
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    for item in result.new_items:
        print(type(item).__name__, getattr(item, "raw_item", ""))
    print(result.final_output)


if __name__ == "__main__":
    main()
