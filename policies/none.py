from dataclasses import dataclass

from agentloop.policies.base import MemoryPolicy, Room


@dataclass
class NoPolicy(MemoryPolicy):
    """Plain decoding: stop when the cap is reached."""

    name = "none"

    def make_room(self, room: Room) -> None:
        return None

    def at_limit(self) -> bool:
        return True
