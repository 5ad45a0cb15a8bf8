"""Compaction speed: wall time per stage to compact a SmolLM2 cache of real text with `am-hak-fast`.

Stages: queries (repeat-prefill of the context on top of the cache), reference (original attention and
mass for the fitting queries), selection (highest-attention keys), beta (bounded mass fit), values (least
squares), stats (fit errors). Each stage's FLOPs are estimated from its matmuls so the distance to this
machine's fp32 matmul rate (~67 GFLOP/s measured) is visible.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def stage_flops(config, span: int, kept: int, queries: int, heads: int) -> dict[str, float]:
    """Dominant matmul FLOPs per stage (2 per multiply-add), summed over compacted (layer, KV head) pairs."""
    d = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // config.num_attention_heads
    n, T, t = queries, span, kept
    return {
        "reference": heads * (2 * n * T * d + 2 * n * T * d),  # logits QKᵀ, then E·V
        "selection": heads * 2 * n * T,  # softmax-weight scores (elementwise, ~linear)
        "beta": heads * (2 * n * t * t + 2 * n * t),  # Gram MᵀM and Mᵀy of the selected columns
        "values": heads * (2 * n * t * d + 2 * n * t * t + 2 * n * t * d),  # X = softmax(QCkᵀ+β), XᵀX, XᵀY
    }


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import add_query_option

    parser = argparse.ArgumentParser(prog="agentloop eval compaction-speed", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--ratios", nargs="+", type=int, default=[2, 10])
    add_query_option(parser)
    parser.add_argument("--max-kept", type=int, default=2048,
                        help="skip settings that keep more slots per head (the t x t float64 solves grow as t^3)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from agentloop import Session
    from agentloop.compaction.span import compact_span, reference_queries
    from agentloop.evals import describe_queries, load_eval_model, write_results
    from agentloop.evals.text import prose_ids

    loaded = load_eval_model(args.model)
    config = loaded.model.config
    rows, skipped = [], []
    for length in args.lengths:
        ids = prose_ids(loaded.tokenizer, length)
        session = Session(loaded, prefill_chunk=512)
        for _ in session.feed(ids):
            pass
        original = session.cache.copy()
        tic = time.perf_counter()
        queries = reference_queries(session, (("repeat", 1.0),), None, args.max_queries, 0)
        query_seconds = time.perf_counter() - tic
        heads = len(session.cache.compactable) * session.cache.kv_heads
        for ratio in args.ratios:
            if length // ratio > args.max_kept:
                print(f"skip {length} tokens at {ratio}x: {length // ratio} kept slots > --max-kept {args.max_kept}")
                skipped.append(f"{length} tokens at {ratio}x")
                continue
            session.cache = original.copy()
            stats = compact_span(session, 0, length, 1.0 / ratio, method="am-hak-fast", queries=queries)
            seconds = {k: v for k, v in stats.seconds.items() if k not in ("queries", "total")}
            seconds = {"queries": query_seconds, **seconds}
            flops = stage_flops(config, length, stats.kept, stats.queries, heads)
            # repeat-prefill: ~length tokens through the non-embedding weights (2 FLOPs per weight per token),
            # plus attention of each new token over the cache and the copy (4·d_model per key per layer)
            embedding = loaded.model.get_input_embeddings().weight.numel()
            params = sum(p.numel() for p in loaded.model.parameters()) - embedding
            attention = 4 * config.hidden_size * config.num_hidden_layers * length * (1.5 * length)
            flops["queries"] = 2 * params * length + attention
            row = {"tokens": length, "ratio": ratio, "kept": stats.kept, "queries_per_head": stats.queries,
                   "seconds": {k: round(v, 3) for k, v in seconds.items()},
                   "total_seconds": round(sum(seconds.values()), 3),
                   "gflop": {k: round(v / 1e9, 2) for k, v in flops.items()},
                   "gflop_per_s": {k: round(flops[k] / 1e9 / seconds[k], 1) for k in flops if seconds.get(k, 0) > 0},
                   "output_error_fit": round(float(stats.output_error.mean()), 4)}
            rows.append(row)
            print(row, flush=True)

    stages = ["queries", "reference", "selection", "beta", "values", "stats"]
    lines = [f"# Compaction speed: `am-hak-fast` on {args.model}, this CPU ({platform.machine()}, "
             f"{torch.get_num_threads()} threads, fp32)", "",
             "Whole cache of real prose compacted one-shot; fitting queries: repeat-prefill, "
             f"{describe_queries(args.max_queries)} "
             "per KV head; all 30 layers x 3 KV heads solved batched. Seconds per stage (GFLOP/s achieved in brackets; "
             "this machine's fp32 matmul peak is ~67 GFLOP/s, though the big reference matmuls reach ~75). `queries` is "
             "the repeat-prefill, done once per length and shared by both ratios; β and value solves run their "
             "t x t normal equations in float64, so they grow as t^3 and dominate at 2x.", "",
             "| tokens | ratio | kept | " + " | ".join(stages) + " | total s |",
             "|---|---|---|" + "---|" * len(stages) + "---|"]
    for r in rows:
        cells = []
        for s in stages:
            rate = r["gflop_per_s"].get(s)
            cells.append(f"{r['seconds'].get(s, 0):.2f}" + (f" ({rate:.0f})" if rate else ""))
        lines.append(f"| {r['tokens']} | {r['ratio']}x | {r['kept']} | " + " | ".join(cells) + f" | {r['total_seconds']:.1f} |")
    command = ("agentloop eval compaction-speed " + " ".join(argv or [])).strip()
    if skipped:
        lines += ["", f"Skipped (more than {args.max_kept} kept slots per head): {', '.join(skipped)}."]
    lines += ["", f"Reproduce: `{command}`"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results("compaction_speed", {"benchmark": "compaction-speed", "config": vars(args), "rows": rows,
                                           "skipped": skipped, "command": command}, text)
    return 0
