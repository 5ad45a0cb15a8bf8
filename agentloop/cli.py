"""`agentloop run | info | serve | eval`. Bad input prints one line and exits 2; no tracebacks."""

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
        if args.command == "serve":
            return cmd_serve(args)
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
    from agentloop.models import DEFAULT_MODEL, load_model, resolve_device, resolve_dtype

    spec = args.model or DEFAULT_MODEL
    if spec.startswith("random:"):  # shapes only: no weights are drawn to describe them
        loaded = load_model(spec, dtype=str(resolve_dtype(args.dtype, resolve_device(None))).removeprefix("torch."),
                            device="meta")
    else:
        loaded = load_model(spec, dtype=args.dtype)
    config = loaded.model.config
    params = sum(p.numel() for p in loaded.model.parameters())
    where = "shapes only" if loaded.device.type == "meta" else str(loaded.device)
    print(f"model {loaded.name} ({config.model_type}, {params / 1e6:.1f}M params, {loaded.dtype}, {where})")
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


_RESUME_FIXED = ("task", "mem_cap", "policy", "model", "dtype", "device", "max_new_tokens", "seed", "trace",
                 "max_steps", "workspace")


def cmd_run(args) -> int:
    """Read the task file (quick), claim the trace, then validate, load and run; the trace ends with a final record
    however the run ends (bad input found before it started removes the trace instead)."""
    if args.checkpoint_every < 0:
        raise AgentloopError(f"--checkpoint-every must be >= 0 tokens (0 = no checkpoints), got {args.checkpoint_every}")
    if args.resume is not None:
        return cmd_resume(args)
    if args.task is None:
        raise AgentloopError("give a task file to run, or --resume TRACE_OR_CHECKPOINT to continue a run")
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


def cmd_resume(args) -> int:
    """`run --resume`: the run saved in a checkpoint goes on with the settings it was started with, appending to its
    own trace (a `resume` record, then the run's records and its final one)."""
    fixed = [name for name in _RESUME_FIXED if getattr(args, name) is not None]
    if fixed:
        flag = "the task file" if fixed[0] == "task" else "--" + fixed[0].replace("_", "-")
        raise AgentloopError(f"--resume continues a run with the settings it was started with; drop {flag}")
    from pathlib import Path

    from agentloop.checkpoint import read_checkpoint, resolve_resume
    from agentloop.trace import open_trace

    path = resolve_resume(args.resume)
    state = read_checkpoint(path)
    extra = state["extra"]
    kind = extra.get("kind")
    if kind == "agent":
        saved = extra["spec"].get("trace")
    elif kind == "run":
        saved = extra["trace"]
    else:
        raise AgentloopError(f"{path} is a session checkpoint without a run to continue (written by {kind!r})")
    if Path(args.resume).suffix == ".jsonl":
        saved = args.resume  # the trace named on the command line is the one next to its checkpoint
    # the run's own trace, continued; an agent saved without one gets a new trace next to its checkpoint
    trace_path = saved or str(Path(path).with_suffix(".jsonl"))
    with open_trace(trace_path, final_kind="finish" if kind == "agent" else "stop", append=saved is not None) as trace:
        _quiet_transformers()
        if kind == "agent":
            return cmd_agent(None, args, trace, resume_from=path)
        from agentloop.checkpoint import load_session
        from agentloop.models import load_model
        from agentloop.task import validate_task

        task = validate_task(extra["task"], source=str(path))
        loaded = load_model(task.model, dtype=task.dtype, device=task.device)
        session, _ = load_session(loaded, state, decode="eager" if args.no_cuda_graph else "auto")
        return cmd_generate(task, args, trace, resumed=(path, extra, session))


def cmd_generate(task, args, trace, resumed: tuple | None = None) -> int:
    """Prefill what of the prompt the session does not hold yet and generate to the end, with the live view or log
    lines, the JSONL trace and checkpoints. `resumed` (checkpoint, its extra, the restored session): continue it."""
    from rich.console import Console

    from agentloop.checkpoint import Checkpointer, checkpoint_path
    from agentloop.memcap import format_bytes, parse_mem_cap
    from agentloop.view import LiveView

    console = Console(stderr=True, soft_wrap=True)  # log lines are not cut at 80 columns when piped
    cap = parse_mem_cap(task.memory.cap) if task.memory.cap else None
    if resumed:
        ckpt, saved, session = resumed
        prompt, loaded, policy = saved["prompt"], session.loaded, session.policy
    else:
        from agentloop.chat import encode_messages, encode_text
        from agentloop.loop import Session
        from agentloop.models import load_model
        from agentloop.policies import make_policy

        policy = make_policy(task.memory.policy, **task.memory.options)
        loaded = load_model(task.model, dtype=task.dtype, device=task.device)
        chat = task.chat()
        prompt = encode_messages(loaded.tokenizer, chat) if chat is not None else encode_text(loaded.tokenizer, task.prompt)
        session = Session(loaded, cap=cap, policy=policy, decode="eager" if args.no_cuda_graph else "auto")
        ckpt = checkpoint_path(trace.path)
    trace_path = trace.path
    chatty = not (args.json or args.quiet)
    checkpointer = Checkpointer(ckpt, args.checkpoint_every)
    done = len(session.token_ids)
    generated = max(0, done - len(prompt))
    # policy actions before generate() started: the stop record counts the generation's own, as a run never stopped
    actions_before = resumed[1]["actions_before_generate"] if resumed else 0
    in_prefill = done < len(prompt)

    def extra() -> dict:
        return {"kind": "run", "task": task.model_dump(mode="json"), "prompt": prompt, "trace": str(trace_path),
                "actions_before_generate": actions_before}

    if resumed:
        trace.write({"kind": "resume", "checkpoint": str(ckpt), "tokens": done, "generated": generated,
                     "policy_actions": session.policy_actions})
        if chatty:
            console.print(describe_memory(loaded.model.config, loaded.dtype, cap, policy))
            console.print(f"resumed from {ckpt}: {done} tokens held, {generated} generated, "
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
                console.print(describe_memory(loaded.model.config, loaded.dtype, cap, policy))
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
    except (KeyboardInterrupt, Terminated):  # the trace's final record says so; the checkpoint stays
        if chatty:
            _resume_hint(console, checkpointer.path, trace_path)
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


def cmd_agent(task, args, trace, resume_from=None) -> int:
    """A task with tools: the agent loop, shown as a live panel (terminal), a log, the answer only, or JSON.
    `resume_from`: the checkpoint of an agent run to continue (`task` is then None: it comes from there)."""
    from rich.console import Console
    from rich.markup import escape

    from agentloop.agent import Agent
    from agentloop.checkpoint import checkpoint_path
    from agentloop.memcap import parse_mem_cap
    from agentloop.view import AgentView, describe_agent_event

    console = Console(stderr=True, soft_wrap=True)  # log lines are not cut at 80 columns when piped
    trace_path = trace.path
    if resume_from is None:
        ckpt = checkpoint_path(trace_path)
        agent = Agent(task, trace_file=trace, checkpoint=ckpt, checkpoint_every=args.checkpoint_every)
    else:
        ckpt = resume_from
        agent = Agent.resume(resume_from, trace_file=trace, checkpoint_every=args.checkpoint_every)
        task = agent.spec
    chatty = not (args.json or args.quiet)
    if chatty:
        cap = parse_mem_cap(task.memory.cap) if task.memory.cap else None
        console.print(describe_memory(agent.loaded.model.config, agent.loaded.dtype, cap, agent.session.policy))
        ingest = task.memory.ingest
        console.print(("" if resume_from is None else f"resumed from {ckpt} at step {agent.steps}; ")
                      + f"agent: tools {', '.join(t.name for t in agent.tools)}; workspace {agent.workspace}; policy "
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
    except (KeyboardInterrupt, Terminated):  # the trace's final record says so; the checkpoint stays
        if chatty:
            _resume_hint(console, ckpt, trace_path)
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


def _resume_hint(console, ckpt, trace_path) -> None:
    """After Ctrl-C or SIGTERM: how to go on, when a checkpoint was saved (not with --quiet or --json, whose stderr
    is the one line `agentloop: interrupted`)."""
    from pathlib import Path

    if Path(ckpt).is_file():
        console.print(f"agentloop: resume with `agentloop run --resume {trace_path}`")


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
    if not 0 < args.queue_timeout < float("inf"):  # NaN too
        raise AgentloopError(f"--queue-timeout must be positive, finite seconds, got {args.queue_timeout:g}")
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


def cmd_eval(argv: list[str]) -> int:
    from agentloop.evals import run_eval

    return run_eval(argv[0] if argv else None, argv[1:])


if __name__ == "__main__":
    sys.exit(main())


def _peak(peak_bytes: int, cap_bytes: int | None) -> str:
    from agentloop.memcap import format_bytes

    return f"peak cache {format_bytes(peak_bytes)}" + (f" of {format_bytes(cap_bytes)} cap" if cap_bytes else "")
