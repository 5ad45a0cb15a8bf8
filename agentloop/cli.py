"""`agentloop run | info | eval`. Bad input prints one line and exits 2; no tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
import time

from agentloop.errors import AgentloopError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(2, f"agentloop: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentloop", description="Long-horizon generation under a hard KV-cache memory cap.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a task file to the end")
    run.add_argument("task", nargs="?", help="path to a task.yaml")
    run.add_argument("--resume", metavar="TRACE_OR_CHECKPOINT",
                     help="continue a run that was killed or interrupted, from its trace (.jsonl) or checkpoint (.ckpt)")
    run.add_argument("--checkpoint-every", type=int, default=256, metavar="N",
                     help="save a checkpoint (next to the trace, .ckpt) after each compaction and every N tokens; "
                          "0 = no checkpoints (default 256)")
    run.add_argument("--mem-cap", help="KV-cache cap: 8GB, 512MiB, 1.5GB, 2e9 or 2048tok (overrides the task)")
    run.add_argument("--policy", help="memory policy at the cap (overrides the task)")
    run.add_argument("--model", help="model id, directory, .gguf file or alias (overrides the task)")
    run.add_argument("--dtype", help="auto, float32, bfloat16, float16 (overrides the task)")
    run.add_argument("--device", help="auto, cpu, cuda (overrides the task)")
    run.add_argument("--max-new-tokens", type=int, help="overrides generation.max_new_tokens")
    run.add_argument("--seed", type=int, help="overrides generation.seed")
    run.add_argument("--trace", help="JSONL trace path (overrides the task)")
    run.add_argument("--max-steps", type=int, help="agent tasks: model replies before the run stops (overrides the task)")
    run.add_argument("--workspace", help="agent tasks: folder the tools work in (overrides the task)")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the generated text")
    out.add_argument("--json", action="store_true", help="print events as JSON lines on stdout")

    info = sub.add_parser("info", help="show a model's KV geometry and bytes per token")
    info.add_argument("model", nargs="?", default=None, help="model id, directory, .gguf file or alias")
    info.add_argument("--dtype", default="auto")
    info.add_argument("--mem-cap", help="also show what this cap means in tokens")

    serve = sub.add_parser("serve", help="an OpenAI-compatible server whose conversations share one memory cap")
    serve.add_argument("--model", default=None, help="model id, directory, .gguf file or alias (default smollm2-135m)")
    serve.add_argument("--mem-cap", default="8GB", help="cap on the KV caches of all conversations together (default 8GB)")
    serve.add_argument("--session-cap", help="cap of one conversation's cache (default: a quarter of --mem-cap)")
    serve.add_argument("--policy", default="am", help="memory policy of each conversation at its cap (default am)")
    serve.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a policy option, e.g. ratio=0.5 (repeatable)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model name clients send (default: --model as given)")
    serve.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda")
    serve.add_argument("--queue-timeout", type=float, default=60.0,
                       help="seconds a request may wait for room before it is answered 503 (default 60)")
    serve.add_argument("--park-dir", help="folder for conversations parked to disk (default: a new temporary folder)")
    serve.add_argument("--no-idle-compaction", action="store_true",
                       help="make room by parking idle conversations only, never by compacting them")
    serve.add_argument("--no-reuse", action="store_true",
                       help="stateless: every request re-reads its whole conversation (for comparison)")
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")

    evals = sub.add_parser("eval", help="run a benchmark or eval from evals/", add_help=False)
    evals.add_argument("name", nargs="?", help="eval name (omit to list them)")
    evals.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_eval(args)
    except AgentloopError as exc:
        print(f"agentloop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("agentloop: interrupted", file=sys.stderr)
        return 130


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def describe_memory(config, dtype, cap) -> str:
    from agentloop.cache import bytes_per_token, kv_geometry
    from agentloop.memcap import format_bytes

    full, sliding, kv_heads, head_dim, window = kv_geometry(config)
    per_token = bytes_per_token(config, dtype, with_beta=False)
    with_beta = bytes_per_token(config, dtype, with_beta=True)
    line = (f"KV cache: {full} full-attention layers x {kv_heads} KV heads x {head_dim} dims x 2 (K,V) = "
            f"{per_token:,} B/token ({with_beta:,} B with β)")
    if sliding:
        line += f"; {sliding} sliding-window layers (window {window}) held at most at their window"
    if cap is not None:
        cap_bytes = cap.to_bytes(config, dtype)
        if cap.unit == "tokens":
            line += f"\ncap {cap}: {cap.value:,} cache slots = {format_bytes(cap_bytes)}"
        else:
            line += (f"\ncap {cap}: {format_bytes(cap_bytes)} = {cap_bytes // per_token:,} cache slots "
                     f"({cap_bytes // with_beta:,} once every slot carries β)")
    return line


def cmd_info(args) -> int:
    _quiet_transformers()
    from agentloop.memcap import parse_mem_cap
    from agentloop.models import DEFAULT_MODEL, load_model

    loaded = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype)
    config = loaded.model.config
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"model {loaded.name} ({config.model_type}, {params / 1e6:.1f}M params, {loaded.dtype}, {loaded.device})")
    print(f"source {loaded.source}")
    print(describe_memory(config, loaded.dtype, parse_mem_cap(args.mem_cap) if args.mem_cap else None))
    return 0


def _apply_overrides(args):
    """The task file with command-line flags applied on top (flags win), validated again."""
    from agentloop.task import load_task, validate_task

    task = load_task(args.task)
    data = task.model_dump(exclude_unset=True)
    for flag, key in (("model", "model"), ("dtype", "dtype"), ("device", "device"), ("trace", "trace"),
                      ("max_steps", "max_steps"), ("workspace", "workspace")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    memory, generation = data.setdefault("memory", {}), data.setdefault("generation", {})
    if args.mem_cap is not None:
        memory["cap"] = args.mem_cap
    if args.policy is not None:
        memory["policy"] = args.policy
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    if args.seed is not None:
        generation["seed"] = args.seed
    return validate_task(data, source="command line")


_RESUME_FIXED = ("task", "mem_cap", "policy", "model", "dtype", "device", "max_new_tokens", "seed", "trace",
                 "max_steps", "workspace")


def cmd_run(args) -> int:
    if args.checkpoint_every < 0:
        raise AgentloopError(f"--checkpoint-every must be >= 0 tokens (0 = no checkpoints), got {args.checkpoint_every}")
    if args.resume is not None:
        return cmd_resume(args)
    if args.task is None:
        raise AgentloopError("give a task file to run, or --resume TRACE_OR_CHECKPOINT to continue a run")
    task = _apply_overrides(args)
    if task.chat() is None and task.prompt is None:
        raise AgentloopError(f"{args.task}: nothing to run; give `task`, `messages` or `prompt`")
    _quiet_transformers()
    trace_path = task.trace or f".agentloop/traces/{task.name or 'task'}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    if task.tools:
        from agentloop.agent import Agent
        from agentloop.checkpoint import checkpoint_path

        agent = Agent(task.model_copy(update={"trace": trace_path}), checkpoint=checkpoint_path(trace_path),
                      checkpoint_every=args.checkpoint_every)
        return cmd_agent(agent, args)
    from agentloop.chat import encode_messages, encode_text
    from agentloop.loop import Session
    from agentloop.memcap import parse_mem_cap
    from agentloop.models import load_model
    from agentloop.policies import make_policy

    policy = make_policy(task.memory.policy, **task.memory.options)
    cap = parse_mem_cap(task.memory.cap) if task.memory.cap else None
    loaded = load_model(task.model, dtype=task.dtype, device=task.device)
    chat = task.chat()
    prompt = encode_messages(loaded.tokenizer, chat) if chat is not None else encode_text(loaded.tokenizer, task.prompt)
    session = Session(loaded, cap=cap, policy=policy)
    return run_session(task, session, prompt, trace_path, args)


def cmd_resume(args) -> int:
    """`run --resume`: the run saved in a checkpoint goes on, in the same trace, with the same settings."""
    fixed = [name for name in _RESUME_FIXED if getattr(args, name) is not None]
    if fixed:
        flag = "the task file" if fixed[0] == "task" else "--" + fixed[0].replace("_", "-")
        raise AgentloopError(f"--resume continues a run with the settings it was started with; drop {flag}")
    _quiet_transformers()
    from agentloop.checkpoint import read_checkpoint, resolve_resume
    from agentloop.task import validate_task

    path = resolve_resume(args.resume)
    extra = read_checkpoint(path)["extra"]
    if extra.get("kind") == "agent":
        from agentloop.agent import Agent

        return cmd_agent(Agent.resume(path, checkpoint_every=args.checkpoint_every), args)
    if extra.get("kind") != "run":
        raise AgentloopError(f"{path} is a session checkpoint without a run to continue (written by {extra.get('kind')!r})")
    from agentloop.checkpoint import load_session
    from agentloop.models import load_model

    task = validate_task(extra["task"], source=str(path))
    loaded = load_model(task.model, dtype=task.dtype, device=task.device)
    session, _ = load_session(loaded, path)
    return run_session(task, session, extra["prompt"], extra["trace"], args, resumed=(path, extra))


def run_session(task, session, prompt: list[int], trace_path: str, args, resumed: tuple | None = None) -> int:
    """Prefill what of `prompt` the session does not hold yet and generate to the end (a resumed session
    continues its generation), with the live view or log lines, the JSONL trace and checkpoints."""
    from rich.console import Console

    from agentloop.checkpoint import Checkpointer, checkpoint_path
    from agentloop.memcap import format_bytes, parse_mem_cap
    from agentloop.trace import JsonlTrace
    from agentloop.view import LiveView

    console = Console(stderr=True, soft_wrap=True)  # log lines are not cut at 80 columns when piped
    loaded, policy = session.loaded, session.policy
    cap = parse_mem_cap(task.memory.cap) if task.memory.cap else None
    chatty = not (args.json or args.quiet)
    checkpointer = Checkpointer(checkpoint_path(trace_path), args.checkpoint_every)
    done = len(session.token_ids)
    generated = max(0, done - len(prompt))
    # policy actions before generate() started: the stop record counts the generation's own, as a run never stopped
    actions_before = resumed[1]["actions_before_generate"] if resumed else 0
    in_prefill = done < len(prompt)

    def extra() -> dict:
        return {"kind": "run", "task": task.model_dump(mode="json"), "prompt": prompt, "trace": str(trace_path),
                "actions_before_generate": actions_before}

    with JsonlTrace(trace_path, append=resumed is not None) as trace:
        if resumed:
            trace.write({"kind": "resume", "checkpoint": str(resumed[0]), "tokens": done, "generated": generated,
                         "policy_actions": session.policy_actions})
            if chatty:
                console.print(describe_memory(loaded.model.config, loaded.dtype, cap))
                console.print(f"resumed from {resumed[0]}: {done} tokens held, {generated} generated, "
                              f"{session.policy_actions} policy actions; policy {policy.name}; trace {trace_path}")
        else:
            trace.write({"kind": "run", "task": task.model_dump(mode="json"), "model_source": loaded.source,
                         "prompt_tokens": len(prompt), "cap_bytes": session.cap_bytes, "cap_slots": session.cap_slots})
        view, stop = None, None
        try:
            for event in _events(session, prompt, task.generation):
                if event.kind == "stop":
                    event = event.model_copy(update={"policy_actions": session.policy_actions - actions_before})
                trace.write(event)
                if event.kind == "prefill":
                    in_prefill, actions_before = False, session.policy_actions
                # a policy event during a prefill comes before its chunk: the session is between steps
                if checkpointer.observe(event, between_steps=event.kind in ("token", "prefill") or in_prefill):
                    checkpointer.save(session, extra())
                if event.kind == "prefill" and chatty and not resumed:  # the prompt fits: describe the run
                    console.print(describe_memory(loaded.model.config, loaded.dtype, cap))
                    console.print(f"policy {policy.name}; prompt {len(prompt)} tokens; trace {trace_path}")
                if chatty and console.is_terminal and view is None and event.kind in ("prefill", "token"):
                    view = LiveView(console, f"{task.name} · {loaded.name} · {policy.name}",
                                    session.cap_bytes, task.generation.max_new_tokens).__enter__()
                if args.json:
                    print(event.model_dump_json(), flush=True)
                elif view:
                    view.update(event)
                elif chatty and event.kind == "policy":
                    console.print(f"[{event.t:7.1f}s] {event.policy}: {event.action}, "
                                  f"{event.physical_before} -> {event.physical_after} slots, "
                                  f"{format_bytes(event.bytes_before)} -> {format_bytes(event.bytes_after)}")
                if event.kind == "stop":
                    stop = event
        except AgentloopError as exc:
            trace.write({"kind": "error", "message": str(exc)})
            raise
        except KeyboardInterrupt:
            trace.write({"kind": "stop", "reason": "cancelled", "error": True, "message": "interrupted by the user",
                         "new_tokens": len(session.token_ids) - len(prompt)})
            if checkpointer.saves or resumed:
                console.print(f"agentloop: resume with `agentloop run --resume {trace_path}`")
            raise
        finally:
            if view:
                view.__exit__(None, None, None)
    checkpointer.remove()  # the run finished: nothing left to resume

    if not args.json:
        print(stop.text)
    if not args.json and not args.quiet:
        console.print(f"[bold]stop[/]: {stop.reason}{' - ' + stop.message if stop.message else ''}; "
                      f"{stop.new_tokens} tokens, {stop.tokens_per_second:.1f} tok/s; "
                      f"{_peak(stop.peak_bytes, stop.cap_bytes)}; {stop.policy_actions} policy actions; trace {trace_path}")
    return 3 if stop.error else 0


def cmd_agent(agent, args) -> int:
    """A task with tools: the agent loop, shown as a live panel (terminal), a log, the answer only, or JSON."""
    from rich.console import Console
    from rich.markup import escape

    from agentloop.memcap import parse_mem_cap
    from agentloop.view import AgentView, describe_agent_event

    console = Console(stderr=True, soft_wrap=True)  # log lines are not cut at 80 columns when piped
    task, trace_path = agent.spec, agent.spec.trace
    chatty = not (args.json or args.quiet)
    if chatty:
        cap = parse_mem_cap(task.memory.cap) if task.memory.cap else None
        console.print(describe_memory(agent.loaded.model.config, agent.loaded.dtype, cap))
        ingest = task.memory.ingest
        console.print(f"agent: tools {', '.join(t.name for t in agent.tools)}; workspace {agent.workspace}; policy "
                      f"{agent.session.policy.name}; ingestion "
                      + (f"over {ingest.trigger_tokens} tokens to {ingest.ratio:g}" if ingest else "off")
                      + f"; trace {trace_path}")
    view = AgentView(console, f"{task.name} · {agent.loaded.name} · {agent.session.policy.name}",
                     agent.session.cap_bytes, task.max_steps).__enter__() if chatty and console.is_terminal else None
    events, finish = agent.events(), None
    try:
        for event in events:
            if args.json:
                print(event.model_dump_json(), flush=True)
            elif view:
                view.update(event)
            elif chatty and (line := describe_agent_event(event)):
                console.print(line)
            finish = event if event.kind == "finish" else finish
    except KeyboardInterrupt:
        console.print(f"agentloop: resume with `agentloop run --resume {trace_path}`")
        raise
    finally:
        events.close()  # an interrupted run still ends its trace with a `cancelled` record
        if view:
            view.__exit__(None, None, None)
        agent.close()
    if not finish.error:
        agent.remove_checkpoint()  # the run finished: nothing left to resume

    if finish.reason == "error":
        print(f"agentloop: error: {finish.message}", file=sys.stderr)
        return 2
    if not args.json and finish.answer:
        print(finish.answer)
    if chatty:
        console.print(f"[bold]finish[/]: {finish.reason}{' - ' + escape(finish.message) if finish.message else ''}; "
                      f"{finish.steps} steps, {finish.tool_calls} tool calls, {finish.ingestions} ingestion and "
                      f"{finish.policy_actions} online compactions; {_peak(finish.peak_bytes, finish.cap_bytes)}; "
                      f"trace {trace_path}")
    return 3 if finish.error else 0


def _events(session, prompt, settings):
    """Feed the part of `prompt` the session does not hold, then generate (continuing a restored generation)."""
    done = len(session.token_ids)
    if done < len(prompt):
        yield from session.feed(prompt[done:])
    yield from session.generate(settings, start=max(0, done - len(prompt)))


def cmd_serve(args) -> int:
    """`agentloop serve`: load the model once, then answer OpenAI chat completion requests until interrupted."""
    import yaml

    from agentloop.memcap import format_bytes, parse_mem_cap
    from agentloop.policies import make_policy

    cap = parse_mem_cap(args.mem_cap)
    session_cap = args.session_cap or (f"{cap.value // 4}tok" if cap.unit == "tokens" else str(cap.value // 4))
    parse_mem_cap(session_cap)
    options = {}
    for item in args.policy_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AgentloopError(f"--policy-option {item!r}: write KEY=VALUE, e.g. ratio=0.5")
        options[key] = yaml.safe_load(value)
    make_policy(args.policy, **options)  # unknown policy or option: fail before the model loads
    if not 0 < args.port < 65536:
        raise AgentloopError(f"--port {args.port} is not a TCP port (1-65535)")
    if args.queue_timeout <= 0:
        raise AgentloopError(f"--queue-timeout must be positive seconds, got {args.queue_timeout:g}")
    _quiet_transformers()
    from agentloop.loop import Session
    from agentloop.models import DEFAULT_MODEL, load_model
    from agentloop.server import build_engine, serve

    loaded = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    # the server's cap read as a session's would be: bytes as given, or a cache of that many slots plus its scratch
    cap_bytes = Session(loaded, cap=cap, policy=make_policy(args.policy, **options)).cap_bytes
    engine = build_engine(loaded, cap_bytes, session_cap, args.policy, options,
                          model_name=args.served_model_name, park_dir=args.park_dir,
                          idle_compaction=not args.no_idle_compaction, reuse=not args.no_reuse,
                          queue_timeout=args.queue_timeout)
    pool = engine.pool
    idle = "off" if args.no_idle_compaction else "on" if pool.compaction_frees else "off (caches are allocated whole)"
    print(f"agentloop serve: {engine.model_name} on {loaded.device}; cap {format_bytes(pool.cap_bytes)} for all "
          f"conversations, {format_bytes(pool.session_cap_bytes)} each; policy {args.policy}; idle compaction {idle}"
          f"{'' if engine.reuse else '; session reuse off'}; parked to {pool.park_dir}; "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(engine, args.host, args.port, log_level=args.log_level)
    return 0


def cmd_eval(args) -> int:
    from agentloop.evals import run_eval

    return run_eval(args.name, args.rest)


if __name__ == "__main__":
    sys.exit(main())


def _peak(peak_bytes: int, cap_bytes: int | None) -> str:
    from agentloop.memcap import format_bytes

    return f"peak cache {format_bytes(peak_bytes)}" + (f" of {format_bytes(cap_bytes)} cap" if cap_bytes else "")
