"""Compaction speed: what a compaction costs next to a prefill of the same tokens.

One-shot: a cache of real prose is compacted whole with `am-hak-fast`; stages: queries (repeat-prefill of the
context on top of the cache), reference (original attention and mass for the fitting queries), selection
(highest-attention keys), beta (bounded mass fit), values (least squares), stats (fit errors). Next to it, the wall
time of prefilling the same tokens into an empty cache, and the ratio compaction / prefill.

Online: a capped session with the `am` policy (its defaults) reads prose; for each compaction event, its wall time
and the wall time of prefilling as many tokens as the region it compacted, measured right after it (ratio per
event, median reported).
"""

from __future__ import annotations

import argparse
import ast
import platform
import statistics
import subprocess
import tempfile
import time

import torch


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill_seconds(loaded, ids: list[int], chunk: int | None = None) -> float:
    """Wall time to prefill `ids` into a fresh, uncapped session (in forwards of `chunk` tokens, default the
    session's own)."""
    from agentloop import Session

    session = Session(loaded) if chunk is None else Session(loaded, prefill_chunk=chunk)
    _sync(loaded.device)
    tic = time.perf_counter()
    for _ in session.feed(ids):
        pass
    _sync(loaded.device)
    return time.perf_counter() - tic


def one_shot(loaded, length: int, ratio: int, max_queries: int | None) -> dict:
    from agentloop import Session
    from agentloop.compaction.span import compact_span, reference_queries
    from agentloop.evals.text import prose_ids

    ids = prose_ids(loaded.tokenizer, length)
    session = Session(loaded)
    for _ in session.feed(ids):
        pass
    _sync(loaded.device)
    tic = time.perf_counter()
    queries = reference_queries(session, (("repeat", 1.0),), None, max_queries, 0)
    _sync(loaded.device)
    query_seconds = time.perf_counter() - tic
    stats = compact_span(session, 0, length, 1.0 / ratio, method="am-hak-fast", queries=queries)
    _sync(loaded.device)
    seconds = {"queries": query_seconds, **{k: v for k, v in stats.seconds.items() if k not in ("queries", "total")}}
    total = query_seconds + stats.seconds["total"]
    prefill = prefill_seconds(loaded, ids)
    return {"tokens": length, "ratio": ratio, "kept": stats.kept, "queries_per_head": stats.queries,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}, "total_seconds": round(total, 3),
            "prefill_seconds": round(prefill, 3), "compaction_over_prefill": round(total / prefill, 2),
            "output_error_fit": round(float(stats.output_error.nanmean()), 4)}


def online(loaded, cap_tokens: int, events: int) -> dict:
    from agentloop import Session
    from agentloop.evals.text import prose_ids
    from agentloop.policies import make_policy

    ids = prose_ids(loaded.tokenizer, cap_tokens * (events + 2))
    session = Session(loaded, cap=f"{cap_tokens}tok", policy=make_policy("am"))
    measured, fed, piece = [], 0, max(16, cap_tokens // 8)
    while len(measured) < events and fed < len(ids):
        for event in session.feed(ids[fed:fed + piece]):
            if event.kind == "policy":
                start, end = event.details["region"]
                region = ids[:end - start]
                measured.append({"compaction": event.details["compaction"], "region_slots": end - start,
                                 "logical_tokens": event.details["logical_tokens"],
                                 "seconds": round(event.seconds, 3),
                                 "prefill_seconds": round(prefill_seconds(loaded, region), 3),
                                 # the same text read in the forwards this capped run prefills in (its workspace)
                                 "run_chunk": session.prefill_chunk,
                                 "prefill_run_chunk_seconds": round(
                                     prefill_seconds(loaded, region, session.prefill_chunk), 3),
                                 "stage_seconds": event.details["stage_seconds"]})
                measured[-1]["ratio"] = round(measured[-1]["seconds"] / measured[-1]["prefill_seconds"], 2)
                measured[-1]["ratio_run_chunk"] = round(
                    measured[-1]["seconds"] / measured[-1]["prefill_run_chunk_seconds"], 2)
        fed += piece
    return {"cap_tokens": cap_tokens, "events": measured,
            "median_ratio": statistics.median(e["ratio"] for e in measured) if measured else None,
            "median_ratio_run_chunk": statistics.median(e["ratio_run_chunk"] for e in measured) if measured else None}


def baseline_total(python: str, length: int, ratio: int, max_queries: int | None) -> float:
    """Seconds of the same one-shot compaction by another installation's `agentloop eval compaction-speed`
    (`python` = its interpreter), run in a fresh process in a scratch folder; read from the row it prints."""
    command = [python, "-m", "agentloop.cli", "eval", "compaction-speed", "--lengths", str(length), "--ratios",
               str(ratio), "--max-queries", str(max_queries or "all"), "--online-caps", "--no-write"]
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True)
    rows = [ast.literal_eval(line) for line in done.stdout.splitlines() if line.startswith("{'tokens'")]
    if done.returncode != 0 or not rows:
        from agentloop.errors import AgentloopError
        raise AgentloopError(f"the baseline at {python} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return rows[0]["total_seconds"]


def versus_baseline(loaded, python: str, length: int, ratio: int, max_queries: int | None, rounds: int) -> dict:
    """Ours vs the baseline installation on the same one-shot compaction, alternating which runs first."""
    ours, theirs = [], []
    for r in range(rounds):
        for side in (("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")):
            if side == "ours":
                ours.append(one_shot(loaded, length, ratio, max_queries)["total_seconds"])
            else:
                theirs.append(baseline_total(python, length, ratio, max_queries))
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    return {"tokens": length, "ratio": ratio, "ours_seconds": ours, "baseline_seconds": theirs,
            "speedup_per_round": [round(x, 3) for x in ratios], "median_speedup": round(statistics.median(ratios), 3)}


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_query_option, count

    parser = EvalParser(prog="agentloop eval compaction-speed", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model, or a shape-only one such as random:qwen3-4b")
    parser.add_argument("--lengths", nargs="+", type=count, default=[1024, 2048, 4096])
    parser.add_argument("--ratios", nargs="+", type=count, default=[2, 10])
    parser.add_argument("--online-caps", nargs="*", type=count, default=[512, 2048],
                        help="token caps of the online measurement (none: skip it)")
    parser.add_argument("--online-events", type=count, default=3, help="compaction events measured per cap")
    add_query_option(parser)
    parser.add_argument("--baseline", metavar="PYTHON",
                        help="also time the one-shot rows with another installation of agentloop (its interpreter, "
                             "e.g. an older commit's venv), alternating with ours; reports the per-round speedup")
    parser.add_argument("--rounds", type=count, default=3, help="rounds of the --baseline comparison")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--name", default="compaction_speed", help="results file name under evals/results")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from agentloop.cli import _quiet_transformers
    from agentloop.errors import AgentloopError
    from agentloop.evals import describe_queries, write_results
    from agentloop.models import load_model

    if min(args.lengths) < 16 or min(args.ratios) < 2 or args.online_events < 1:
        raise AgentloopError("--lengths must be >= 16 tokens, --ratios >= 2 and --online-events >= 1")
    _quiet_transformers()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    prefill_seconds(loaded, list(range(100, 164)))  # warm-up
    rows = []
    for length in args.lengths:
        for ratio in args.ratios:
            rows.append(one_shot(loaded, length, ratio, args.max_queries))
            print(rows[-1], flush=True)
    baseline_rows = []
    if args.baseline:
        for length in args.lengths:
            for ratio in args.ratios:
                baseline_rows.append(versus_baseline(loaded, args.baseline, length, ratio, args.max_queries,
                                                     args.rounds))
                print(baseline_rows[-1], flush=True)
    online_rows = []
    for cap in args.online_caps:
        online_rows.append(online(loaded, cap, args.online_events))
        print(online_rows[-1], flush=True)

    where = (torch.cuda.get_device_name() if loaded.device.type == "cuda"
             else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    stages = ["queries", "reference", "selection", "beta", "values", "stats"]
    lines = [f"# Compaction speed: {args.model} ({loaded.dtype}, {where})", "",
             "## One-shot: the whole cache compacted with `am-hak-fast`", "",
             f"Fitting queries: repeat-prefill, {describe_queries(args.max_queries)} per KV head; all layers and KV "
             "heads. Seconds per stage; `prefill` = one prefill of the same tokens into an empty cache.", "",
             "| tokens | ratio | kept | " + " | ".join(stages) + " | total s | prefill s | compaction / prefill |",
             "|---|---|---|" + "---|" * len(stages) + "---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r['seconds'].get(s, 0):.2f}" for s in stages)
        lines.append(f"| {r['tokens']:,} | {r['ratio']}x | {r['kept']} | {cells} | {r['total_seconds']:.2f} | "
                     f"{r['prefill_seconds']:.2f} | **{r['compaction_over_prefill']:.2f}** |")
    if online_rows:
        lines += ["", "## Online: `am` compaction events vs a prefill of the region they compact", "",
                  "Two prefills of the region's text into a fresh uncapped session: in forwards of the default chunk "
                  "(512 tokens), and in forwards of the chunk the capped run itself prefills in (its workspace under the "
                  "cap; the run's re-reads use it too).", "",
                  "| cap | compaction | region slots | event s | prefill s | event / prefill | run's chunk | "
                  "prefill in it s | event / that prefill |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for o in online_rows:
            for e in o["events"]:
                lines.append(f"| {o['cap_tokens']}tok | {e['compaction']} | {e['region_slots']} | {e['seconds']:.2f} | "
                             f"{e['prefill_seconds']:.2f} | {e['ratio']:.2f} | {e['run_chunk']} | "
                             f"{e['prefill_run_chunk_seconds']:.2f} | {e['ratio_run_chunk']:.2f} |")
            if o["median_ratio"] is not None:
                lines.append(f"| {o['cap_tokens']}tok | **median** | | | | **{o['median_ratio']:.2f}** | | | "
                             f"**{o['median_ratio_run_chunk']:.2f}** |")
    if baseline_rows:
        lines += ["", f"## Against another installation (`{args.baseline}`), same settings, alternating rounds", "",
                  "Each side compacts in its own process state: ours in this process, the baseline in a fresh process "
                  "per round (its own `agentloop eval compaction-speed --no-write`); total seconds of the one-shot "
                  "compaction, queries included.", "",
                  "| tokens | ratio | ours s (median) | baseline s (median) | speedup per round | median speedup |",
                  "|---|---|---|---|---|---|"]
        for b in baseline_rows:
            lines.append(f"| {b['tokens']:,} | {b['ratio']}x | {statistics.median(b['ours_seconds']):.2f} | "
                         f"{statistics.median(b['baseline_seconds']):.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in b['speedup_per_round'])} | **{b['median_speedup']:.2f}x** |")
    command = ("agentloop eval compaction-speed " + " ".join(argv or [])).strip()
    lines += ["", f"torch {torch.__version__}. Reproduce: `{command}`"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(args.name, {"benchmark": "compaction-speed", "model": args.model, "device": where,
                                  "config": vars(args), "rows": rows, "online": online_rows,
                                  "baseline": baseline_rows, "command": command}, text)
    return 0
