"""agentloop: long-horizon generation under a hard KV-cache memory cap."""

from agentloop.cache import CompactableCache
from agentloop.errors import AgentloopError
from agentloop.events import Event, PauseEvent, PolicyEvent, PrefillEvent, StopEvent, TokenEvent
from agentloop.loop import GenerationSettings, Session
from agentloop.memcap import MemCap, parse_mem_cap
from agentloop.models import DEFAULT_MODEL, LoadedModel, load_model

__version__ = "0.1.0"

__all__ = [
    "AgentloopError", "CompactableCache", "DEFAULT_MODEL", "Event", "GenerationSettings", "LoadedModel", "MemCap",
    "PauseEvent", "PolicyEvent", "PrefillEvent", "Session", "StopEvent", "TokenEvent", "load_model", "parse_mem_cap",
]
