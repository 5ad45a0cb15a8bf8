"""Peak memory under the cap: per policy and cap, a run with at least six compactions, measured for real.

Each configuration runs in a fresh subprocess. It loads the model, runs one forward (so the weights are touched),
then feeds real prose into a capped session until the policy has acted `--compactions` times, and decodes a few
tokens. What it measures, above the weights:
  CPU  - the process's peak resident memory (VmHWM) minus its resident memory before the run; the peak counter is
         reset first (/proc/self/clear_refs), and glibc's mmap threshold is pinned at 64 KiB so that a freed tensor's
         pages go back to the system at once and RSS follows the live tensors (not the allocator's free lists);
  CUDA - torch.cuda.max_memory_allocated() minus the allocation before the run (peak stats reset first).
The limit each row is held to: at most 1.10 x the cap, or the cap + 64 MiB for caps under 640 MiB. For a byte cap
the cap is what was given (everything must fit inside); for a token cap it is the bytes of that many cache slots
(the budget adds its scratch reserve on top, `budget` column).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

SMALL_CAP, SLACK = 640 * 2**20, 64 * 2**20
DEFAULT_POLICIES = ["am", "snapkv", "h2o", "streaming"]


def limit_bytes(cap_bytes: int) -> int:
    """What the peak above the weights may reach under a cap of `cap_bytes`."""
    return cap_bytes + SLACK if cap_bytes < SMALL_CAP else int(1.10 * cap_bytes)


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(model: str, cap: str, policy: str, compactions: int, decode_tokens: int, device: str | None,
            dtype: str | None) -> dict:
    """One configuration in this process: the measurement described in the module docstring."""
    from agentloop import GenerationSettings, Session
    from agentloop.evals import load_eval_model
    from agentloop.evals.text import prose_ids
    from agentloop.memcap import parse_mem_cap
    from agentloop.models import load_model
    from agentloop.policies import make_policy

    loaded = load_eval_model(model) if device is None and dtype is None else load_model(model, dtype=dtype, device=device)
    cuda = loaded.device.type == "cuda"
    ids = prose_ids(loaded.tokenizer, 1 << 16)
    with torch.inference_mode():  # touch the weights (and the allocator) once, outside the measurement
        loaded.model(torch.tensor([ids[:8]], device=loaded.device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _rss()[0]

    session = Session(loaded, cap=cap, policy=make_policy(policy))
    slots = session.budget.cache_slots
    piece, fed, actions, seconds, fallbacks = max(16, slots // 8), 0, 0, [], 0
    tic = time.perf_counter()
    while actions < compactions and fed < len(ids) - piece:
        for event in session.feed(ids[fed:fed + piece]):
            if event.kind == "policy":
                actions += 1
                seconds.append(event.seconds)
                fallbacks += "fallback" in event.details
        fed += piece
    for event in session.generate(GenerationSettings(max_new_tokens=decode_tokens, ignore_eos=True)):
        if event.kind == "policy":
            actions += 1
            seconds.append(event.seconds)
    wall = time.perf_counter() - tic
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss()[1] - base
    cap_bytes = parse_mem_cap(cap).to_bytes(loaded.model.config, loaded.dtype)
    return {"model": model, "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
            "policy": policy, "cap": cap, "cap_bytes": cap_bytes, "budget_bytes": session.budget.cap_bytes,
            "cache_slots": slots, "cache_bytes": session.budget.cache_bytes,
            "reserve_bytes": session.budget.reserve_bytes, "split": session.budget.describe(),
            "peak_above_weights": peak, "peak_over_cap": round(peak / cap_bytes, 3),
            "limit_bytes": limit_bytes(cap_bytes), "within_limit": peak <= limit_bytes(cap_bytes),
            "fed_tokens": fed, "decoded_tokens": decode_tokens, "policy_actions": actions, "fallbacks": fallbacks,
            "seconds_per_action": round(sum(seconds) / len(seconds), 3) if seconds else None, "wall_seconds": round(wall, 1)}


def _spawn(args, cap: str, policy: str) -> dict:
    """run_one in a fresh interpreter, its allocator set up for an honest RSS reading; its last line is the JSON."""
    config = {"model": args.model, "cap": cap, "policy": policy, "compactions": args.compactions,
              "decode_tokens": args.decode_tokens, "device": args.device, "dtype": args.dtype}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run([sys.executable, "-m", "agentloop.evals.memory", "--worker", json.dumps(config)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**config, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def report(rows: list[dict], command: str) -> str:
    model = rows[0]["model"] if rows else "?"
    lines = [f"# Peak memory under the cap: {model}", "",
             __doc__.split("\n\n", 1)[1].strip(), "",
             "| policy | cap | cap MiB | budget MiB | cache slots | peak above weights MiB | peak / cap | limit MiB | ok | "
             "actions | s per action |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['policy']} | {r['cap']} | | | | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['policy']} | {r['cap']} | {_mib(r['cap_bytes'])} | {_mib(r['budget_bytes'])} | "
                     f"{r['cache_slots']:,} | {_mib(r['peak_above_weights'])} | {r['peak_over_cap']:.2f} | "
                     f"{_mib(r['limit_bytes'])} | {'yes' if r['within_limit'] else '**no**'} | {r['policy_actions']} | "
                     f"{r['seconds_per_action']} |")
    if rows and "device" in rows[0]:
        lines += ["", f"Device {rows[0]['device']}, {rows[0]['dtype']}; torch {torch.__version__}; {platform.machine()}."]
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines)


def _kept_rows(args) -> list[dict]:
    """--keep: the earlier file's rows for the (cap, policy) pairs not run now; refused if its model or settings differ."""
    from agentloop.errors import AgentloopError
    from agentloop.evals import results_dir

    path = results_dir() / f"{args.name}.json"
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    changed = [k for k in ("model", "compactions", "decode_tokens", "device", "dtype")
               if earlier["config"].get(k) != getattr(args, k)]
    if changed:
        raise AgentloopError(f"--keep: {path} was run with other settings ({', '.join(changed)}); run it with the same "
                             "settings, or give another --name")
    now = {(cap, policy) for cap in args.caps for policy in args.policies}
    return [r for r in earlier["rows"] if (r["cap"], r["policy"]) not in now]


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, count

    parser = EvalParser(prog="agentloop eval memory", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model, or a shape-only one such as random:qwen3-4b")
    parser.add_argument("--caps", nargs="+", default=["256tok", "1024tok", "4096tok"])
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    parser.add_argument("--compactions", type=count, default=6, help="policy actions each run reaches (default 6)")
    parser.add_argument("--decode-tokens", type=count, default=32)
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (default: the model's default)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--name", default="memory", help="results file name under evals/results")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows of evals/results/<name>.json for the configurations not run now (same model "
                             "and settings): rerun some rows after a change without running them all")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        config = json.loads(args.worker)
        print(json.dumps(run_one(**config)), flush=True)
        return 0
    from agentloop.errors import AgentloopError
    from agentloop.evals import write_results
    from agentloop.memcap import parse_mem_cap
    from agentloop.policies import POLICIES

    for cap in args.caps:
        parse_mem_cap(cap)
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        raise AgentloopError(f"unknown policy {unknown[0]!r}: choose from {', '.join(sorted(POLICIES))}")
    if args.compactions < 1:
        raise AgentloopError(f"--compactions must be at least 1, got {args.compactions}")
    command = ("agentloop eval memory " + " ".join(argv or [])).strip()
    kept, rows = _kept_rows(args) if args.keep else [], []
    for cap in args.caps:
        for policy in args.policies:
            row = _spawn(args, cap, policy)
            rows.append(row)
            print(json.dumps(row), flush=True)
            text = report(kept + rows, command)
            if not args.no_write:  # after every row: a long run keeps what it measured
                write_results(args.name, {"benchmark": "memory", "config": {k: v for k, v in vars(args).items()
                                                                            if k != "worker"},
                                          "rows": kept + rows, "command": command}, text)
    print(report(kept + rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
