"""A tiny coding agent built on agentloop's embeddable loop: a capped, compacting KV cache in ~50 lines.

    python examples/embed_agent.py "Write a program that prints the odd numbers from 1 to 9, and run it."

It runs SmolLM2-135M (tiny, so a worked example shows it the tool-call format), the sandboxed `python` tool
plus one tool of its own, and prints each call, each compaction and the memory held at the end.
"""

import sys
import tempfile
from pathlib import Path

from agentloop import Agent
from agentloop.memcap import format_bytes

WORKED_EXAMPLE = [
    {"role": "system", "content": "You are a coding assistant. Run Python programs with the python tool."},
    {"role": "user", "content": "Write a program that prints the even numbers from 2 to 6, and run it."},
    {"role": "assistant", "content": '<tool_call>{"name": "python", "arguments": {"code": '
                                     '"for n in range(2, 7, 2):\\n    print(n)\\n"}}</tool_call>'},
    {"role": "tool", "content": "[stdout]\n2\n4\n6\n[exit code 0]"},
    {"role": "assistant", "content": "The program printed 2, 4 and 6."},
]


def main(task: str) -> int:
    workspace = Path(tempfile.mkdtemp(prefix="tiny-coder-"))
    agent = Agent(model="smollm2-135m", messages=WORKED_EXAMPLE, tools=["python"], workspace=str(workspace),
                  max_steps=4, generation={"max_new_tokens": 120},
                  memory={"cap": "96MB", "policy": "am", "pin_prompt": True,  # online compaction at the cap
                          "ingest": {"trigger_tokens": 400, "ratio": 0.2}})  # long tool outputs shrink 5x at once

    @agent.add_tool
    def list_files() -> str:
        """List the files in the workspace."""
        return "\n".join(sorted(p.name for p in workspace.iterdir())) or "(no files)"

    finish = None
    for event in agent.events(task):
        if event.kind == "tool_call":
            print(f"-> {event.tool}({event.arguments})")
        elif event.kind == "tool_result":
            print(f"<- {event.tool}: {'ok' if event.ok else event.error}")
        elif event.kind in ("ingest", "policy"):
            print(f"   compacted: {format_bytes(event.bytes_before)} -> {format_bytes(event.bytes_after)}")
        elif event.kind == "finish":
            finish = event
            print(f"{event.reason}: {event.answer or event.message}")
    memory = agent.memory
    print(f"memory: {format_bytes(memory.cache_bytes)} held for {memory.logical_tokens} tokens "
          f"(peak {format_bytes(memory.peak_bytes)}, buffers {format_bytes(memory.allocated_bytes)}, budget "
          f"{format_bytes(memory.cap_bytes)}); workspace {workspace}")
    return 0 if finish.reason == "final_answer" else 1


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:]) or "Write a program that prints the odd numbers from 1 to 9, and run it."))
