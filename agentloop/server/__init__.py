"""`agentloop serve`: an OpenAI-compatible chat completions server whose conversations keep their compacted KV
caches between requests, all under one memory cap (protocol.py: the wire format; conversations.py: warm
sessions, the shared cap, parking; engine.py: the queue and the worker; app.py: the HTTP routes)."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from agentloop.errors import AgentloopError
from agentloop.models import LoadedModel
from agentloop.server.app import create_app
from agentloop.server.conversations import Pool
from agentloop.server.engine import Engine, ReplyFn


def build_engine(loaded: LoadedModel, cap_bytes: int, session_cap: str, policy: str = "am",
                 policy_options: dict | None = None, model_name: str | None = None, park_dir: str | Path | None = None,
                 idle_compaction: bool = True, reuse: bool = True, queue_timeout: float = 60.0,
                 reply_fn: ReplyFn | None = None) -> Engine:
    """The engine behind the server: one pool of conversations under `cap_bytes`, each session under `session_cap`."""
    park = Path(park_dir) if park_dir else Path(tempfile.mkdtemp(prefix="agentloop-parked-"))
    park.mkdir(parents=True, exist_ok=True)
    pool = Pool(loaded, cap_bytes, session_cap, policy, policy_options or {}, park, idle_compaction=idle_compaction)
    pool.remove_park_dir = park_dir is None  # a folder of our own: removed when the server stops
    return Engine(pool, model_name or loaded.name, reuse=reuse, queue_timeout=queue_timeout, reply_fn=reply_fn)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    try:  # a port in use is a one-line error before anything starts
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise AgentloopError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["Engine", "build_engine", "create_app", "serve"]
