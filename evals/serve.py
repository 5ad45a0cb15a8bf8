"""`agentloop serve` under load: N conversations x M turns against the live server, with warm sessions and without.

The same conversations run twice, each time against a fresh server process: once as served (a request that
extends a held conversation continues its session, so only the new turn is prefilled) and once with session reuse
off (`--no-reuse`: every request re-reads its whole history, as a stateless server does). The conversations run
concurrently, one client thread each, turns in order within a conversation; every request streams, greedy, with
the official `openai` client. Reported per mode: time to first token and tok/s per turn (client side), tokens
prefilled vs the context the requests carried, compactions, idle compactions, parks, and the peak of the cache
bytes all sessions held together against the server's cap (from /metrics).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

QUESTIONS = [
    "Tell me about lighthouses.", "How are they powered today?", "Who kept them in the past?",
    "What was a keeper's day like?", "Which is the oldest one still working?", "How tall can they be?",
    "How far can their light be seen?", "What replaced keepers?", "Why are some painted in stripes?",
    "Name a famous lighthouse in a story.", "What is a foghorn?", "Summarize what we discussed.",
]
TOPICS = ["lighthouses", "glaciers", "honeybees", "volcanoes", "harbors", "comets", "forests", "bridges"]


def start_server(args, reuse: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "agentloop.cli", "serve", "--model", args.model, "--mem-cap", args.mem_cap,
               "--session-cap", args.session_cap, "--port", str(port), "--queue-timeout", "600"]
    process = subprocess.Popen(command + ([] if reuse else ["--no-reuse"]), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"agentloop eval serve: the server exited: {process.stderr.read()[-500:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("agentloop eval serve: the server did not come up in 600 s")


def conversation(client, args, k: int, records: list[dict]) -> None:
    """One client: M turns in order, each streamed; a record per turn."""
    topic = TOPICS[k % len(TOPICS)]
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in two or three sentences."}]
    for turn in range(args.turns):
        question = QUESTIONS[turn % len(QUESTIONS)].replace("lighthouses", topic)
        messages.append({"role": "user", "content": question})
        tic = time.perf_counter()
        first, text, final, usage = None, "", None, None
        for chunk in client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                                    temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            if chunk.choices and chunk.choices[0].finish_reason:
                final = chunk.model_extra["agentloop"]
            if chunk.usage:
                usage = chunk.usage
        done = time.perf_counter()
        first = first or done
        records.append({"conversation": k, "turn": turn, "ttft": first - tic, "seconds": done - tic,
                        "completion_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens,
                        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                        "prefill_tokens": final["prefill_tokens"], "session": final["session"],
                        "tok_s": (usage.completion_tokens - 1) / (done - first) if done > first else 0.0,
                        "turn_compactions": final["turn_compactions"], "cache_bytes": final["cache_bytes"],
                        "server_cache_bytes": final["server_cache_bytes"]})
        messages.append({"role": "assistant", "content": text})


def run_mode(args, reuse: bool) -> dict:
    import httpx
    from openai import OpenAI

    process, url = start_server(args, reuse)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
        records: list[dict] = []
        threads = [threading.Thread(target=conversation, args=(client, args, k, records))
                   for k in range(args.conversations)]
        tic = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - tic
        metrics = {}
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split(" ")
                metrics[name.removeprefix("agentloop_")] = float(value)
    finally:
        process.terminate()
        process.wait(timeout=60)
    if len(records) != args.conversations * args.turns:
        raise SystemExit(f"agentloop eval serve: {len(records)} of {args.conversations * args.turns} turns finished")
    records.sort(key=lambda r: (r["conversation"], r["turn"]))
    return {"reuse": reuse, "wall_seconds": wall, "records": records, "metrics": metrics}


def summarize(mode: dict) -> dict:
    records, metrics = mode["records"], mode["metrics"]
    later = [r for r in records if r["turn"] > 0]
    return {"turns": len(records), "wall_seconds": round(mode["wall_seconds"], 1),
            "ttft_median": statistics.median(r["ttft"] for r in records),
            "ttft_later_median": statistics.median(r["ttft"] for r in later) if later else None,
            "ttft_p90": sorted(r["ttft"] for r in records)[int(0.9 * (len(records) - 1))],
            "tok_s_median": statistics.median(r["tok_s"] for r in records),
            "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "prefill_tokens": sum(r["prefill_tokens"] for r in records),
            "completion_tokens": sum(r["completion_tokens"] for r in records),
            "warm_turns": sum(r["session"] == "warm" for r in records),
            "restored_turns": sum(r["session"] == "restored" for r in records),
            "compactions": int(metrics["compactions_total"]), "idle_compactions": int(metrics["idle_compactions_total"]),
            "parked": int(metrics["parked_total"]), "restored": int(metrics["restored_total"]),
            "peak_cache_bytes": int(metrics["peak_cache_bytes"]), "peak_counted_bytes": int(metrics["peak_counted_bytes"]),
            "cap_bytes": int(metrics["cap_bytes"])}


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, write_results

    parser = EvalParser(prog="agentloop eval serve", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--conversations", type=count, default=4, help="concurrent conversations (N)")
    parser.add_argument("--turns", type=count, default=6, help="turns per conversation (M)")
    parser.add_argument("--max-tokens", type=count, default=32, help="max_tokens of each request")
    parser.add_argument("--mem-cap", default="96MB", help="the server's cap on all sessions together")
    parser.add_argument("--session-cap", default="192tok", help="each conversation's cap")
    parser.add_argument("--threads", type=count, default=2, help="torch threads of the server process")
    add_output_options(parser, "serve")
    args = parser.parse_args(argv)

    modes, load_before = {}, os.getloadavg()
    for reuse in (True, False):
        label = "warm sessions" if reuse else "no reuse (stateless)"
        print(f"{label}: {args.conversations} conversations x {args.turns} turns ...", flush=True)
        modes[label] = run_mode(args, reuse)
        s = summarize(modes[label])
        print(f"  prefilled {s['prefill_tokens']} of {s['prompt_tokens']} context tokens; TTFT median "
              f"{s['ttft_median']:.2f}s; {s['tok_s_median']:.1f} tok/s; peak {s['peak_cache_bytes']:,} B of "
              f"{s['cap_bytes']:,} B cap", flush=True)
    summary = {label: summarize(mode) for label, mode in modes.items()}
    warm, cold = summary["warm sessions"], summary["no reuse (stateless)"]
    saved = cold["prefill_tokens"] - warm["prefill_tokens"]
    command = ("agentloop eval serve " + " ".join(argv or [])).strip()
    lines = [f"# `agentloop serve` under load ({args.model})", "",
             f"{args.conversations} conversations x {args.turns} turns, run concurrently (one streaming client each, "
             f"greedy, max_tokens {args.max_tokens}); server cap {args.mem_cap} for all sessions, {args.session_cap} "
             "per conversation (its cache; a running turn counts the session's whole budget, scratch included), "
             "policy am. Each mode on a fresh server process; times on the client.", "",
             "| mode | TTFT median (all / turns 2+) | TTFT p90 | tok/s median | tokens prefilled / context carried | "
             "compactions (in turns / idle) | parked / restored | peak cache / counted / cap | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        later = f"{s['ttft_later_median']:.2f}" if s["ttft_later_median"] is not None else "-"
        lines.append(f"| {label} | {s['ttft_median']:.2f} s / {later} s | {s['ttft_p90']:.2f} s | "
                     f"{s['tok_s_median']:.1f} | {s['prefill_tokens']:,} / {s['prompt_tokens']:,} | "
                     f"{s['compactions']} / {s['idle_compactions']} | {s['parked']} / {s['restored']} | "
                     f"{s['peak_cache_bytes'] / 2**20:.1f} / {s['peak_counted_bytes'] / 2**20:.1f} / "
                     f"{s['cap_bytes'] / 2**20:.1f} MiB | {s['wall_seconds']} s |")
    lines += ["", "Peak cache: the most bytes the caches of all sessions held at once; counted: the most bytes counted "
              "against the cap at once (a running turn at its session's whole budget, scratch included; an idle "
              "session at its cache's bytes).", "",
              f"Warm sessions prefilled {saved:,} fewer tokens ({saved / max(1, cold['prefill_tokens']):.0%} of the "
              "stateless server's prefill). The two modes answer differently after the first turn: a warm session "
              "reads its history from the compacted cache, the stateless one re-reads (and compacts) the whole text.",
              "", "Per turn (TTFT in seconds, warm / stateless, median over conversations):", "",
              "| turn | " + " | ".join(str(t + 1) for t in range(args.turns)) + " |",
              "|---|" + "---|" * args.turns]
    for label, mode in modes.items():
        medians = [statistics.median(r["ttft"] for r in mode["records"] if r["turn"] == t) for t in range(args.turns)]
        lines.append(f"| {label} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    load_after = os.getloadavg()
    lines += ["", f"Load average of this shared {os.cpu_count()}-core machine before / after: "
              f"{load_before[0]:.1f} / {load_after[0]:.1f} (absolute times and tok/s depend on it; the prefill counts "
              "do not).", "", f"Command: `{command}`"]
    data = {"config": vars(args), "summary": summary, "load_average": [load_before, load_after],
            "modes": {label: {k: v for k, v in mode.items()} for label, mode in modes.items()}}
    if args.no_write:
        print("\n".join(lines))
        return 0
    print(f"wrote {write_results(args.name, data, chr(10).join(lines))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
