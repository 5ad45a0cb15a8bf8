"""agentloop: long-horizon generation and tool-calling agents under a hard KV-cache memory cap.

The names below are imported on first use (PEP 562), so that `import agentloop.cli` does not pull in torch and
transformers: the CLI reads the task file, claims the trace and reports bad input in well under a second.
"""

import importlib

_EXPORTS = {
    "agentloop.agent": ("Agent", "MemoryStats"),
    "agentloop.cache": ("CompactableCache",),
    "agentloop.errors": ("AgentloopError",),
    "agentloop.events": ("Event", "FinishEvent", "IngestEvent", "MessageEvent", "PauseEvent", "PolicyEvent",
                         "PrefillEvent", "StopEvent", "TokenEvent", "ToolCallEvent", "ToolResultEvent"),
    "agentloop.loop": ("GenerationSettings", "Session"),
    "agentloop.memcap": ("MemCap", "parse_mem_cap"),
    "agentloop.models": ("DEFAULT_MODEL", "LoadedModel", "load_model"),
    "agentloop.task": ("TaskSpec", "load_task"),
    "agentloop.tools": ("Tool", "ToolResult", "tool"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'agentloop' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_WHERE])
