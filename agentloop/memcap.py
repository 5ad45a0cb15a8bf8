"""Parse memory caps: byte sizes ("8GB", "512MiB", "1.5GB", "2e9") or slot counts ("2048tok")."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from agentloop.errors import AgentloopError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9,
}
_TOKEN_UNITS = ("tok", "tokens", "token", "slots")
_PATTERN = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
MAX_BYTES = 2**50  # 1 PiB: more KV cache than any machine holds
MAX_SLOTS = 2**32


@dataclass(frozen=True)
class MemCap:
    """A cap on KV-cache memory: either bytes, or a number of physical cache slots (tokens)."""

    value: int
    unit: str  # "bytes" or "tokens"
    text: str

    def to_bytes(self, config, dtype) -> int:
        """Bytes this cap allows; a token cap also limits slots, and is priced with β on every slot."""
        from agentloop.cache import slots_to_bytes

        return self.value if self.unit == "bytes" else slots_to_bytes(config, dtype, self.value)

    def __str__(self) -> str:
        return self.text


def parse_mem_cap(text: str | int | float) -> MemCap:
    """`8GB`, `512MiB`, `1.5GB`, `2e9` (bytes) or `2048tok` (slots) -> MemCap."""
    if isinstance(text, float) and not math.isfinite(text):
        raise AgentloopError(f"mem-cap {text!r} is not a finite number; write a size such as 8GB or 2048tok")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(text)
    if not isinstance(text, str):
        raise AgentloopError(f"mem-cap must be a string such as '8GB' or '2048tok', got {text!r}")
    match = _PATTERN.match(text)
    if not match:
        raise AgentloopError(
            f"cannot read mem-cap {text!r}: write a size such as 8GB, 512MiB, 1.5GB, 2e9 (bytes) or 2048tok (cache slots)"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number):
        raise AgentloopError(f"mem-cap {text!r} is too large to be a number; write a size such as 8GB or 2048tok")
    if number <= 0:
        raise AgentloopError(f"mem-cap {text!r} must be positive, e.g. 8GB or 2048tok")
    if unit in _TOKEN_UNITS:
        if number != int(number):
            raise AgentloopError(f"mem-cap {text!r}: a token cap must be a whole number of tokens, e.g. 2048tok")
        kind, value = "tokens", int(number)
    elif unit in _UNITS:
        kind, value = "bytes", int(number * _UNITS[unit])
    else:
        raise AgentloopError(
            f"mem-cap {text!r} has unknown unit {match.group(2)!r}: use B, KB, MB, GB, KiB, MiB, GiB or tok"
        )
    if value <= 0:
        raise AgentloopError(f"mem-cap {text!r} must be positive, e.g. 8GB or 2048tok")
    if value > (MAX_SLOTS if kind == "tokens" else MAX_BYTES):
        limit = f"{MAX_SLOTS:,} tokens" if kind == "tokens" else "1 PiB"
        raise AgentloopError(f"mem-cap {text!r} is larger than any machine's memory (at most {limit}); "
                             "give the cap you mean, or leave it out for no cap")
    return MemCap(value=value, unit=kind, text=text.strip())


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
