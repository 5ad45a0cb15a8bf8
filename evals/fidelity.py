"""Compaction fidelity on real text: attention-output and mass error on held-out queries, per method and ratio.

For each context (consecutive essays, `--tokens` long) the cache is prefilled once; every method then compacts
a fresh copy of it. Fitting queries come from each method's own sources (repeat-prefill, self-study, the
span's prefill, ...). Errors are measured on held-out queries: those of questions about the text, which
no method saw. Errors are averaged over layers, KV heads and queries, then over contexts.

With `--budgets FILE...` (see agentloop.compaction.budgets) every method also runs with the non-uniform head
budgets of each file: "METHOD + FILE" keeps as many real slots as uniform (padding makes it hold more bytes),
and "METHOD + FILE @bytes" keeps fewer real slots, so that padded it holds at most the bytes of uniform.
With `--chunk N` every method also compacts the span in chunks of about N tokens, each head's slots shared over
the chunks by its fitting queries' attention ("by attention", compact_span's default) or by the chunks' lengths.
With `--pieces N` every method also ingests the text as a tool result in pieces of N tokens (agentloop.ingest:
each piece prefilled, then compacted; no verbatim edges), its slots shared over the pieces evenly (each piece
compacted alone) or jointly (each piece compacted together with the earlier pieces' slots); the held-out queries
are those of the text prefilled whole.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

QUESTIONS = (
    "What is the main argument of the text above?",
    "Which people, companies, places or numbers does the text mention?",
    "What advice does the author give, and why?",
)
DEFAULT_METHODS = ("am-hak-fast", "am-hak", "am-omp-fast", "am-omp", "h2o", "snapkv", "streaming", "random")


def held_out_queries(session, tokenizer, answer_tokens: int = 32) -> dict[int, torch.Tensor]:
    """Queries of three questions about the text and of the model's answers to them (uncompacted cache)."""
    from agentloop.compaction.queries import combine, turn_ids

    probes = [session.probe(turn_ids(tokenizer, q), generate=answer_tokens, seed=1000 + k)
              for k, q in enumerate(QUESTIONS)]
    return combine([(p, 1.0) for p in probes], budget=None, seed=0)


def stacked(cache, layers, name):
    return torch.cat([getattr(cache.layers[i], name)[0] for i in layers])


def stacked_padded(cache, layers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values [layers * kv_heads, T_max, d] and β [layers * kv_heads, T_max] of layers of different lengths,
    the shorter ones padded with zero slots of β = −inf (which get no attention)."""
    length = max(cache.layers[i].physical_len for i in layers)
    pad = [length - cache.layers[i].physical_len for i in layers]
    keys = torch.cat([F.pad(cache.layers[i].keys[0], (0, 0, 0, n)) for i, n in zip(layers, pad, strict=True)])
    values = torch.cat([F.pad(cache.layers[i].values[0], (0, 0, 0, n)) for i, n in zip(layers, pad, strict=True)])
    beta = torch.cat([F.pad(cache.beta(i)[0], (0, n), value=-math.inf) for i, n in zip(layers, pad, strict=True)])
    return keys, values, beta


def variants(methods, budget_files: list[str], chunk: int = 0) -> list[tuple[str, str, str | None, str | None, int, str]]:
    """(label, method, budget file, mode, chunk, part budgets): every method uniform, then with each file at equal
    slots and bytes, then (with `chunk`) compacted in chunks with its slots shared by attention and by length."""
    out = []
    for method in methods:
        out.append((method, method, None, None, 0, "attention"))
        for path in budget_files:
            out.append((f"{method} + {Path(path).stem}", method, path, "slots", 0, "attention"))
            out.append((f"{method} + {Path(path).stem} @bytes", method, path, "bytes", 0, "attention"))
        if chunk:
            out += [(f"{method} in {chunk}-token chunks, by {how}", method, None, None, chunk, how)
                    for how in ("attention", "length")]
    return out


def span_budgets(proportions, mode, layers: int, kv_heads: int, span_len: int, ratio: int) -> torch.Tensor | None:
    """Slots per (layer, head) for a span: as many real slots as uniform ("slots"), or at most its bytes ("bytes")."""
    from agentloop.compaction.budgets import head_budgets, head_budgets_within
    from agentloop.compaction.span import target_slots

    uniform = layers * kv_heads * target_slots(span_len, 1.0 / ratio)
    if mode == "slots":
        return head_budgets(proportions, uniform, span_len)
    if mode == "bytes":
        return head_budgets_within(proportions, uniform, span_len)
    return None


def run(args) -> dict:
    from agentloop import Session
    from agentloop.compaction.budgets import load_budgets
    from agentloop.compaction.solver import evaluate
    from agentloop.compaction.span import compact_span
    from agentloop.evals import load_eval_model
    from agentloop.evals.text import prose_ids

    loaded = load_eval_model(args.model)
    rows = []
    for c in range(args.contexts):
        ids = prose_ids(loaded.tokenizer, args.tokens, start_essay=3 * c)
        session = Session(loaded)
        for _ in session.feed(ids, record=True):
            pass
        layers = session.cache.compactable
        scale = session.model.model.layers[layers[0]].self_attn.scaling
        original = session.cache.copy()
        K, V = stacked(original, layers, "keys"), stacked(original, layers, "values")
        held = held_out_queries(session, loaded.tokenizer)
        Qh = torch.cat([held[i] for i in layers])
        proportions = {path: load_budgets(path, (len(layers), original.kv_heads)) for path in args.budgets}
        memo: dict[str, dict] = {}
        for label, method, path, mode, chunk, part_budgets in variants(args.methods, args.budgets, args.chunk):
            for ratio in args.ratios:
                if _omp_too_big(method, len(ids), ratio, args.omp_max_kept):
                    continue
                session.cache = original.copy()
                budgets = span_budgets(proportions.get(path), mode, len(layers), original.kv_heads, len(ids), ratio)
                stats = compact_span(session, 0, len(ids), 1.0 / ratio, method=method, memo=memo,
                                     max_queries=args.max_queries, seed=args.seed, budgets=budgets,
                                     chunk=chunk or None, part_budgets=part_budgets)
                Kc, Vc, Bc = stacked_padded(session.cache, layers)
                output_error, mass_error = evaluate(Qh, K, V, None, Kc, Bc, Vc, scale)
                real_slots = int(budgets.sum()) if budgets is not None else len(layers) * original.kv_heads * stats.kept
                row = {"context": c, "method": label, "ratio": ratio, "kept": stats.kept,
                       "held_out_output_error": float(output_error.mean()),
                       "held_out_mass_error": float(mass_error.mean()),
                       "fit_output_error": float(stats.output_error.mean()), "bytes_after": stats.bytes_after,
                       "padding_fraction": round(stats.padding_fraction, 4), "real_slots": real_slots,
                       "queries": stats.queries, "seconds": {k: round(v, 3) for k, v in stats.seconds.items()}}
                rows.append(row)
                print(f"context {c} {label:28s} {ratio:3d}x  held-out output error {row['held_out_output_error']:.4f}"
                      f"  mass error {row['held_out_mass_error']:.4f}  padding {stats.padding_fraction:.0%}"
                      f"  ({stats.seconds['total']:.1f}s)", flush=True)
        for label, method, how in piece_variants(args.methods, args.pieces):
            for ratio in args.ratios:
                rows.append(_ingested(loaded, ids, label, method, how, ratio, args, (Qh, K, V, scale), c))
    return {"rows": rows}


def piece_variants(methods, pieces: int) -> list[tuple[str, str, str]]:
    """(label, method, piece budgets) of the ingestion-in-pieces rows (none without `pieces`)."""
    return [(f"{method} in {pieces}-token pieces, {how}", method, how) for method in methods
            for how in ("even", "joint")] if pieces else []


def _ingested(loaded, ids, label, method, how, ratio, args, reference, context) -> dict:
    """One row: the text ingested in pieces (agentloop.ingest) and held-out errors against the whole prefill."""
    import time

    from agentloop import Session
    from agentloop.compaction.solver import evaluate
    from agentloop.ingest import ingest_result
    from agentloop.task import IngestSpec

    Qh, K, V, scale = reference
    spec = IngestSpec(trigger_tokens=2, ratio=1.0 / ratio, keep_first=0, keep_last=0, piece_tokens=args.pieces,
                      method=method, max_queries=args.max_queries, piece_budgets=how)
    session = Session(loaded)
    tic = time.perf_counter()
    events = [e for e in ingest_result(session, ids, spec, seed=args.seed) if isinstance(e, dict)]
    seconds = time.perf_counter() - tic
    layers = session.cache.compactable
    Kc, Vc, Bc = stacked_padded(session.cache, layers)
    output_error, mass_error = evaluate(Qh, K, V, None, Kc, Bc, Vc, scale)
    slots = session.cache.physical_len
    row = {"context": context, "method": label, "ratio": ratio, "kept": slots,
           "held_out_output_error": float(output_error.mean()), "held_out_mass_error": float(mass_error.mean()),
           "bytes_after": session.cache.held_bytes(), "padding_fraction": 0.0,
           "real_slots": len(layers) * session.cache.kv_heads * slots, "pieces": len(events),
           "seconds": {"compaction": round(sum(e.get("seconds", 0.0) for e in events), 3),
                       "ingestion": round(seconds, 3)}}
    print(f"context {context} {label:28s} {ratio:3d}x  held-out output error {row['held_out_output_error']:.4f}"
          f"  mass error {row['held_out_mass_error']:.4f}  {slots} slots  ({seconds:.1f}s)", flush=True)
    return row


def _omp_too_big(method: str, span_len: int, ratio: int, omp_max_kept: int) -> bool:
    """OMP's greedy refits grow as t^4 in the kept slots t: skip it above `omp_max_kept` slots per head."""
    from agentloop.compaction.span import NAMED_METHODS, target_slots

    return NAMED_METHODS[method].solver.startswith("omp") and target_slots(span_len, 1.0 / ratio) > omp_max_kept


def summarize(rows, methods, ratios) -> dict:
    table = {}
    for m in methods:
        for r in ratios:
            sel = [x for x in rows if x["method"] == m and x["ratio"] == r]
            if sel:
                table.setdefault(m, {})[str(r)] = {
                    "output_error": statistics.mean(x["held_out_output_error"] for x in sel),
                    "mass_error": statistics.mean(x["held_out_mass_error"] for x in sel),
                    "bytes_after": statistics.mean(x["bytes_after"] for x in sel),
                    "real_slots": statistics.mean(x["real_slots"] for x in sel),
                    "padding_fraction": statistics.mean(x["padding_fraction"] for x in sel),
                    "seconds": statistics.mean(x["seconds"].get("ingestion", x["seconds"].get("total", 0.0))
                                               for x in sel)}
    return table


def markdown(summary, args, command) -> str:
    from agentloop.evals import describe_queries

    lines = [f"# Compaction fidelity on {args.model}: held-out attention error vs compaction ratio", "",
             f"{args.contexts} contexts of {args.tokens} tokens of real prose (Paul Graham essays); the whole span is "
             "compacted one-shot" + (f" (\"in {args.pieces}-token pieces\": ingested as a tool result in pieces, "
                                     "each compacted after its prefill, alone (even) or with the earlier pieces' "
                                     "slots (joint))" if getattr(args, "pieces", 0) else "") + ". "
             "Fitting queries: each method's own sources, "
             f"{describe_queries(args.max_queries)} per KV head. "
             "Errors on held-out queries (three questions about the text and the model's 32-token answers to them, "
             "never used for fitting), mean over layers, KV heads, queries and contexts. "
             "Output error = ||o_c − o|| / ||o||; mass error = |m_c / m − 1|.", "",
             "## Relative attention-output error (lower is better)", "",
             "| method | " + " | ".join(f"{r}x" for r in args.ratios) + " |",
             "|---|" + "---|" * len(args.ratios)]
    for m, per in summary.items():
        lines.append(f"| {m} | " + " | ".join(f"{per[str(r)]['output_error']:.4f}" if str(r) in per else "–"
                                              for r in args.ratios) + " |")
    lines += ["", "## Mass error", "", "| method | " + " | ".join(f"{r}x" for r in args.ratios) + " |",
              "|---|" + "---|" * len(args.ratios)]
    for m, per in summary.items():
        lines.append(f"| {m} | " + " | ".join(f"{per[str(r)]['mass_error']:.4f}" if str(r) in per else "–"
                                              for r in args.ratios) + " |")
    evictions = [m for m in summary if not m.startswith("am-") and "10" in summary[m]]
    if evictions:
        best = min(evictions, key=lambda m: summary[m]["10"]["output_error"])
        lines.append("")
        for m in (m for m in summary if m.startswith("am-") and "10" in summary[m]):
            ratio = summary[m]["10"]["output_error"] / summary[best]["10"]["output_error"]
            lines.append(f"At 10x, {m}'s output error is {ratio:.2f}x that of the best eviction baseline ({best}).")
    from agentloop.compaction.span import NAMED_METHODS

    if any(NAMED_METHODS[m].solver.startswith("omp") for m in args.methods):
        lines.append(f"\n– = not run: OMP methods are skipped where they would keep more than {args.omp_max_kept} "
                     "slots per head (greedy refits grow as t^4 in the kept slots t).")
    if args.budgets:
        lines += budget_lines(summary, args)
    if getattr(args, "pieces", 0):
        lines += ["", "## Seconds to ingest a context in pieces (prefill, re-reads and compactions)", "",
                  "| method | " + " | ".join(f"{r}x" for r in args.ratios) + " |", "|---|" + "---|" * len(args.ratios)]
        lines += [f"| {m} | " + " | ".join(f"{per[str(r)]['seconds']:.1f}" if str(r) in per else "–"
                                           for r in args.ratios) + " |" for m, per in summary.items() if " pieces, " in m]
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines)


def budget_lines(summary, args) -> list[str]:
    """Real slots, padding and bytes of each variant relative to uniform compaction with the same method."""
    files = ", ".join(f"`{path}`" for path in args.budgets)
    lines = ["", f"## Budgets: real slots, padding and bytes vs uniform (budget files {files})", "",
             "| method | ratio | real slots | padding | bytes vs uniform | output error vs uniform |",
             "|---|---|---|---|---|---|"]
    for m, per in summary.items():
        base = summary[m.split(" + ")[0]]
        for r in (str(r) for r in args.ratios if str(r) in per and " + " in m):
            lines.append(f"| {m} | {r}x | {per[r]['real_slots']:.0f} | {per[r]['padding_fraction']:.1%} | "
                         f"{per[r]['bytes_after'] / base[r]['bytes_after']:.3f} | "
                         f"{per[r]['output_error'] / base[r]['output_error']:.3f} |")
    return lines


def plot(summary, ratios, path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, per in summary.items():
        xs = [r for r in ratios if str(r) in per]
        style = "-o" if m.startswith("am-") else "--s"
        axes[0].plot(xs, [per[str(r)]["output_error"] for r in xs], style, label=m)
        axes[1].plot(xs, [per[str(r)]["mass_error"] for r in xs], style, label=m)
    for ax, title in zip(axes, ("held-out attention-output error", "held-out mass error"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ratios, [f"{r}x" for r in ratios])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("compaction ratio")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_query_option, count, whole

    parser = EvalParser(prog="agentloop eval fidelity", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=count, default=1600)
    parser.add_argument("--contexts", type=count, default=2)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--ratios", nargs="+", type=count, default=[2, 5, 10, 20, 50])
    add_query_option(parser)
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--budgets", nargs="+", default=[], metavar="FILE", help="budget files: also run every "
                        "method with each file's non-uniform head budgets (results go to fidelity_budgets)")
    parser.add_argument("--omp-max-kept", type=count, default=400, help="skip OMP methods where they would keep more "
                        "slots per head (their cost grows as t^4: at 2x of 1600 tokens, >10 min per context here)")
    parser.add_argument("--chunk", type=whole, default=0, help="also run every method compacting in chunks of this "
                        "many tokens, its slots shared over them by attention and by length (results go to "
                        "fidelity_chunked)")
    parser.add_argument("--pieces", type=whole, default=0, help="also run every method ingesting the text in pieces "
                        "of this many tokens, its slots shared over them evenly and jointly (results go to "
                        "fidelity_pieces)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from agentloop.evals import results_dir, write_results

    torch.manual_seed(args.seed)
    data = run(args)
    labels = [label for label, *_ in variants(args.methods, args.budgets, args.chunk)]
    summary = summarize(data["rows"], labels + [label for label, *_ in piece_variants(args.methods, args.pieces)],
                        args.ratios)
    command = "agentloop eval fidelity " + " ".join(argv or [])
    text = markdown(summary, args, command.strip())
    print(text)
    if not args.no_write:
        data.update({"benchmark": "fidelity", "config": vars(args), "summary": summary, "command": command.strip()})
        name = ("fidelity_budgets" if args.budgets else "fidelity_chunked" if args.chunk else
                "fidelity_pieces" if args.pieces else "fidelity")
        write_results(name, data, text)
        plot(summary, args.ratios, results_dir() / f"{name}.png")
    return 0
