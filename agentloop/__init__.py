"""agentloop: long-horizon generation and tool-calling agents under a hard KV-cache memory cap."""

from agentloop.agent import Agent, MemoryStats
from agentloop.cache import CompactableCache
from agentloop.errors import AgentloopError
from agentloop.events import (
    Event,
    FinishEvent,
    IngestEvent,
    MessageEvent,
    PauseEvent,
    PolicyEvent,
    PrefillEvent,
    StopEvent,
    TokenEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from agentloop.loop import GenerationSettings, Session
from agentloop.memcap import MemCap, parse_mem_cap
from agentloop.models import DEFAULT_MODEL, LoadedModel, load_model
from agentloop.task import TaskSpec, load_task
from agentloop.tools import Tool, ToolResult, tool

__version__ = "0.1.0"

__all__ = [
    "Agent", "AgentloopError", "CompactableCache", "DEFAULT_MODEL", "Event", "FinishEvent", "GenerationSettings",
    "IngestEvent", "LoadedModel", "MemCap", "MemoryStats", "MessageEvent", "PauseEvent", "PolicyEvent", "PrefillEvent",
    "Session", "StopEvent", "TaskSpec", "TokenEvent", "Tool", "ToolCallEvent", "ToolResult", "ToolResultEvent",
    "load_model", "load_task", "parse_mem_cap", "tool",
]
