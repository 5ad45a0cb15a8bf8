"""`agentloop run | info | eval`. Bad input prints one line and exits 2; no tracebacks."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time

from agentloop.errors import AgentloopError, Terminated

POLICY_FIELDS = ("options", "ratio", "protect_recent", "pin_prompt", "prompt_share")  # memory fields of one policy


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a value such as `-5MB` or `-1` is a value (then refused by name), not an unknown option
        self._negative_number_matcher = re.compile(r"^-\.?[0-9]")

    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(2, f"agentloop: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentloop", description="Long-horizon generation under a hard KV-cache memory cap.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a task file to the end")
    run.add_argument("task", help="path to a task.yaml")
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
    run.add_argument("--no-cuda-graph", action="store_true",
                     help="decode eagerly on a GPU (default: the one-token step is captured in a CUDA graph)")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the generated text")
    out.add_argument("--json", action="store_true", help="print events as JSON lines on stdout")

    info = sub.add_parser("info", help="show a model's KV geometry and bytes per token")
    info.add_argument("model", nargs="?", default=None, help="model id, directory, .gguf file or alias")
    info.add_argument("--dtype", default="auto")
    info.add_argument("--mem-cap", help="also show how this cap is split between the cache and the scratch")
    info.add_argument("--policy", default="am", help="memory policy the split is for (default am)")

    evals = sub.add_parser("eval", help="run a benchmark or eval from evals/", add_help=False)
    evals.add_argument("name", nargs="?", help="eval name (omit to list them)")
    evals.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if argv[:1] == ["eval"]:  # the eval's own parser reads the rest (and answers --help)
            return cmd_eval(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return cmd_run(args)
        return cmd_info(args)
    except AgentloopError as exc:
        print(f"agentloop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("agentloop: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("agentloop: terminated", file=sys.stderr)
        return 143


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def describe_memory(config, dtype, cap, policy=None) -> str:
    """The KV geometry, and with a cap how the budget splits (agentloop.budget) for `policy`."""
    from agentloop.budget import plan
    from agentloop.cache import bytes_per_token, kv_geometry

    full, sliding, kv_heads, head_dim, window = kv_geometry(config)
    per_token = bytes_per_token(config, dtype, with_beta=False)
    with_beta = bytes_per_token(config, dtype, with_beta=True)
    line = (f"KV cache: {full} full-attention layers x {kv_heads} KV heads x {head_dim} dims x 2 (K,V) = "
            f"{per_token:,} B/token ({with_beta:,} B with β)")
    if sliding:
        line += f"; {sliding} sliding-window layers (window {window}) held at most at their window"
    if cap is not None:
        line += f"\ncap {cap}: {plan(config, dtype, cap, policy).describe()}"
    return line


def cmd_info(args) -> int:
    from agentloop.memcap import parse_mem_cap

    if args.model is not None and not args.model.strip():
        raise AgentloopError("the model name is empty; give an alias, a .gguf file or a model directory")
    cap = parse_mem_cap(args.mem_cap) if args.mem_cap is not None else None  # before the model loads
    from agentloop.policies import make_policy

    policy = make_policy(args.policy)
    _quiet_transformers()
    from agentloop.models import DEFAULT_MODEL, load_model

    loaded = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype)
    config = loaded.model.config
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"model {loaded.name} ({config.model_type}, {params / 1e6:.1f}M params, {loaded.dtype}, {loaded.device})")
    print(f"source {loaded.source}")
    print(describe_memory(config, loaded.dtype, cap, policy))
    return 0


def _apply_overrides(fields: dict, args) -> dict:
    """The task file's fields with command-line flags applied on top (flags win). A --policy other than the
    file's replaces the policy with its options: the file's options were written for its own policy."""
    data = dict(fields)
    for flag, key in (("model", "model"), ("dtype", "dtype"), ("device", "device"), ("trace", "trace"),
                      ("max_steps", "max_steps"), ("workspace", "workspace")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    memory, generation = data.get("memory") or {}, data.get("generation") or {}
    if isinstance(memory, dict):
        memory = dict(memory)
        if args.mem_cap is not None:
            memory["cap"] = args.mem_cap
        if args.policy is not None:
            if args.policy != memory.get("policy", "none"):
                memory = {k: v for k, v in memory.items() if k not in POLICY_FIELDS}
            memory["policy"] = args.policy
        data["memory"] = memory
    if isinstance(generation, dict):
        generation = dict(generation)
        if args.max_new_tokens is not None:
            generation["max_new_tokens"] = args.max_new_tokens
        if args.seed is not None:
            generation["seed"] = args.seed
        data["generation"] = generation
    return data


def cmd_run(args) -> int:
    """Read the task file (quick), claim the trace, then validate, load and run; the trace ends with a final record
    however the run ends (bad input found before it started removes the trace instead)."""
    from agentloop.taskfile import read_task_file
    from agentloop.trace import open_trace

    fields = _apply_overrides(read_task_file(args.task), args)
    name = fields["name"] if isinstance(fields.get("name"), str) and fields["name"].strip() else "task"
    trace_path = fields.get("trace")
    if not isinstance(trace_path, str):
        trace_path = f".agentloop/traces/{name.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    agent = bool(fields.get("tools"))
    with open_trace(trace_path, final_kind="finish" if agent else "stop",
                    opening={"kind": "run", "agent": agent, "task": fields}) as trace:
        from agentloop.task import validate_task

        task = validate_task({**fields, "trace": str(trace.path)}, source=args.task)
        if task.chat() is None and task.prompt is None:
            raise AgentloopError(f"{args.task}: nothing to run; give `task`, `messages` or `prompt`")
        if trace.renamed:
            print(f"agentloop: {trace.requested} exists; writing this run's trace to {trace.path}", file=sys.stderr)
        _quiet_transformers()
        return cmd_agent(task, args, trace) if task.tools else cmd_generate(task, args, trace)


def cmd_generate(task, args, trace) -> int:
    from rich.console import Console

    from agentloop.chat import encode_messages, encode_text
    from agentloop.loop import Session
    from agentloop.memcap import format_bytes, parse_mem_cap
    from agentloop.models import load_model
    from agentloop.policies import make_policy
    from agentloop.view import LiveView

    console = Console(stderr=True, soft_wrap=True)  # log lines are not cut at 80 columns when piped
    policy = make_policy(task.memory.policy, **task.memory.options)
    cap = parse_mem_cap(task.memory.cap) if task.memory.cap else None
    loaded = load_model(task.model, dtype=task.dtype, device=task.device)
    chat = task.chat()
    prompt = encode_messages(loaded.tokenizer, chat) if chat is not None else encode_text(loaded.tokenizer, task.prompt)
    session = Session(loaded, cap=cap, policy=policy, decode="eager" if args.no_cuda_graph else "auto")
    trace_path = trace.path
    chatty = not (args.json or args.quiet)

    trace.write({"kind": "run", "task": task.model_dump(mode="json"), "model_source": loaded.source,
                 "prompt_tokens": len(prompt), "cap_bytes": session.cap_bytes, "cap_slots": session.cap_slots})
    view, stop = None, None
    try:
        for event in _events(session, prompt, task.generation):
            trace.write(event)
            if event.kind == "prefill" and chatty:  # the prompt fits: describe the run, start the view
                console.print(describe_memory(loaded.model.config, loaded.dtype, cap, policy))
                console.print(f"policy {policy.name}; prompt {len(prompt)} tokens; trace {trace_path}")
                if console.is_terminal:
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
    finally:
        if view:
            view.__exit__(None, None, None)

    if not args.json:
        print(stop.text)
    if not args.json and not args.quiet:
        console.print(f"[bold]stop[/]: {stop.reason}{' - ' + stop.message if stop.message else ''}; "
                      f"{stop.new_tokens} tokens, {stop.tokens_per_second:.1f} tok/s; "
                      f"{_peak(stop.peak_bytes, stop.cap_bytes)}; {stop.policy_actions} policy actions; trace {trace_path}")
    return 3 if stop.error else 0


def cmd_agent(task, args, trace) -> int:
    """A task with tools: the agent loop, shown as a live panel (terminal), a log, the answer only, or JSON."""
    from rich.console import Console
    from rich.markup import escape

    from agentloop.agent import Agent
    from agentloop.memcap import parse_mem_cap
    from agentloop.view import AgentView, describe_agent_event

    console = Console(stderr=True, soft_wrap=True)  # log lines are not cut at 80 columns when piped
    trace_path = trace.path
    agent = Agent(task, trace_file=trace)
    chatty = not (args.json or args.quiet)
    if chatty:
        cap = parse_mem_cap(task.memory.cap) if task.memory.cap else None
        console.print(describe_memory(agent.loaded.model.config, agent.loaded.dtype, cap, agent.session.policy))
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
    finally:
        events.close()  # an interrupted run still ends its trace with a `cancelled` record
        if view:
            view.__exit__(None, None, None)

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
    yield from session.feed(prompt)
    yield from session.generate(settings)


def cmd_eval(argv: list[str]) -> int:
    from agentloop.evals import run_eval

    return run_eval(argv[0] if argv else None, argv[1:])


if __name__ == "__main__":
    sys.exit(main())


def _peak(peak_bytes: int, cap_bytes: int | None) -> str:
    from agentloop.memcap import format_bytes

    return f"peak cache {format_bytes(peak_bytes)}" + (f" of {format_bytes(cap_bytes)} cap" if cap_bytes else "")
