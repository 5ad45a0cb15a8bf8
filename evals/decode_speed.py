"""Decode speed: agentloop's capped loop vs HF `generate`, same model, context and token count, side by side.

For each context length the prompt (real prose) is prefilled once, outside the timing; each round then times
`--new-tokens` greedy decode steps from a copy of that state, for our `Session` (under a cap the run never reaches, so the
cache is preallocated and checked every step) and for HF `generate` on a stock copy of the model (SDPA, DynamicCache,
its weights as transformers loads them: row-major). Rounds alternate which runs first; we report medians and the
median of per-round ratios, since these machines are noisy. `with β` forces the β path on every layer of our cache (β
= 0, so the tokens stay comparable): what decoding costs after a compaction. On a GPU each row is also run with the
static step captured in a CUDA graph (`graph`) and without (`eager`). On a CPU our model holds its linear weights
column-major (agentloop.models.stream_layout, what `load_model` does there); `--stock-layout` runs ours row-major too,
to show what the layout alone is worth.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefilled(loaded, ids: list[int], new_tokens: int, decode: str, lean: bool = True):
    """A session that has read `ids`, under a cap with room for the decode."""
    from agentloop import Session

    session = Session(loaded, cap=f"{len(ids) + new_tokens + 64}tok", decode=decode, lean=lean)
    for _ in session.feed(ids):
        pass
    return session


def time_ours(session, start, new_tokens: int, beta: bool) -> tuple[float, list[int]]:
    """Decode from the prefilled state `start` (rolled back to it first, so a captured graph is reused)."""
    from agentloop import GenerationSettings

    snapshot, length, logits = start
    session.cache.restore(snapshot)
    del session.token_ids[length:]
    session.last_logits = logits
    for i in session.cache.compactable:
        session.cache.layers[i].has_beta = beta  # β = 0 on every held slot: the β attention path, same tokens
    _sync(session.loaded.device)
    tic = time.perf_counter()
    for _ in session.generate(GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)):
        pass
    _sync(session.loaded.device)
    return time.perf_counter() - tic, session.token_ids[-new_tokens:]


def hf_prefilled(model, ids: list[int]):
    """A stock DynamicCache holding all but the last prompt token (generate reads that one)."""
    with torch.inference_mode():
        out = model(torch.tensor([ids[:-1]], device=model.device), use_cache=True)
    return out.past_key_values


def time_hf(model, ids: list[int], cache, new_tokens: int) -> tuple[float, list[int]]:
    input_ids = torch.tensor([ids], device=model.device)
    cache = copy.deepcopy(cache)
    _sync(model.device)
    tic = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None)
    _sync(model.device)
    return time.perf_counter() - tic, out[0, len(ids):].tolist()


def row_major(model) -> None:
    """Every parameter in the row-major layout transformers loads (undoing agentloop's stream_layout)."""
    for parameter in model.parameters():
        parameter.data = parameter.data.contiguous()


def measure(ours_model, hf_model, ids, new_tokens: int, rounds: int, beta: bool, decode: str,
            lean: bool = True) -> dict:
    session = prefilled(ours_model, ids, new_tokens, decode, lean)
    start = (session.cache.snapshot(), len(session.token_ids), session.last_logits.clone())
    cache = hf_prefilled(hf_model, ids)
    time_ours(session, start, min(4, new_tokens), beta)  # warm-up (and graph capture) outside the timing
    time_hf(hf_model, ids, cache, min(4, new_tokens))
    rounds_out = []
    for r in range(rounds):
        result = {}
        for who in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            result[who] = (time_ours(session, start, new_tokens, beta) if who == "ours"
                           else time_hf(hf_model, ids, cache, new_tokens))
        same = sum(a == b for a, b in zip(result["ours"][1], result["hf"][1], strict=False))
        rounds_out.append({"ours_tok_s": new_tokens / result["ours"][0], "hf_tok_s": new_tokens / result["hf"][0],
                           "ratio": result["hf"][0] / result["ours"][0], "same_tokens": same})
    fallback = session._decoder.fallback if session._decoder is not None else None
    return {"context": len(ids), "beta": beta, "decode": decode, "lean": session.lean is not None,
            "rounds": rounds_out, "graph_fallback": fallback,
            "ours_tok_s": statistics.median(r["ours_tok_s"] for r in rounds_out),
            "hf_tok_s": statistics.median(r["hf_tok_s"] for r in rounds_out),
            "ratio": statistics.median(r["ratio"] for r in rounds_out),
            "same_tokens": min(r["same_tokens"] for r in rounds_out)}


def beta_cost(rows: list[dict]) -> list[str]:
    """Our loop with β against without, each row's speed taken relative to HF generate in its own alternating rounds
    (the ratio of the two rows' ratios), so that the machine's drift between the two rows cancels; the plain ratio of
    their tok/s next to it."""
    by_key = {(r["context"], r["decode"], r["beta"]): r for r in rows}
    parts = [f"{c:,} tokens {d}: {by_key[c, d, True]['ratio'] / r['ratio']:.2f}x "
             f"(tok/s {by_key[c, d, True]['ours_tok_s'] / r['ours_tok_s']:.2f}x)"
             for (c, d, beta), r in by_key.items() if not beta and (c, d, True) in by_key]
    if not parts:
        return []
    return ["", "With β / without β (our loop; each against HF generate in its own rounds, plain tok/s ratio in "
                "brackets): " + ", ".join(parts)]


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, count, whole

    parser = EvalParser(prog="agentloop eval decode-speed", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model, or a shape-only one such as random:qwen3-4b")
    parser.add_argument("--contexts", nargs="+", type=count, default=None,
                        help="context lengths (default 64 1024 4096 on CPU, 64 1024 8192 32768 on a GPU)")
    parser.add_argument("--new-tokens", type=count, default=128)
    parser.add_argument("--rounds", type=count, default=5)
    parser.add_argument("--beta", choices=["both", "off", "on"], default="both", help="rows without and/or with β")
    parser.add_argument("--decodes", nargs="+", choices=["auto", "eager", "static", "graph"], default=None,
                        help="decode steps to run (default: auto on CPU, eager and graph on a GPU)")
    parser.add_argument("--stock-layout", action="store_true",
                        help="our model's weights row-major too, as transformers loads them (default on a CPU: "
                             "column-major, see agentloop.models.stream_layout)")
    parser.add_argument("--no-lean", action="store_true",
                        help="our one-token forwards through the modeling code, not agentloop.lean")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=whole, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--name", default="decode_speed", help="results file name under evals/results")
    parser.add_argument("--no-write", action="store_true", help="print, do not write evals/results")
    args = parser.parse_args(argv)

    from agentloop.errors import AgentloopError
    from agentloop.evals import write_results
    from agentloop.evals.text import prose_ids
    from agentloop.models import load_model

    if args.new_tokens < 1 or args.rounds < 1:
        raise AgentloopError("--new-tokens and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from agentloop.cli import _quiet_transformers

    _quiet_transformers()
    ours_model = load_model(args.model, dtype=args.dtype, device=args.device)
    cuda = ours_model.device.type == "cuda"
    if args.model.startswith("random:"):  # the same random weights: a stock copy, not a second draw
        hf_model = copy.deepcopy(ours_model.model)
    else:
        hf_model = load_model(args.model, dtype=args.dtype, device=args.device).model
    hf_model.set_attn_implementation("sdpa")
    row_major(hf_model)
    if args.stock_layout:
        row_major(ours_model.model)
    contexts = args.contexts or ([64, 1024, 8192, 32768] if cuda else [64, 1024, 4096])
    decodes = args.decodes or (["eager", "graph"] if cuda else ["auto"])
    betas = {"both": [False, True], "off": [False], "on": [True]}[args.beta]
    rows = []
    for context in contexts:
        ids = prose_ids(ours_model.tokenizer, context)
        for decode in decodes:
            for beta in betas:
                row = measure(ours_model, hf_model, ids, args.new_tokens, args.rounds, beta, decode, not args.no_lean)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "rounds"}, flush=True)

    command = ("agentloop eval decode-speed " + " ".join(argv or [])).strip()
    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    layout = ("ours and HF's row-major, as transformers loads them" + (" (--stock-layout)" if args.stock_layout else "")
              if args.stock_layout or cuda
              else "our linear weights column-major (stream_layout), HF's row-major as transformers loads them")
    lines = [f"# Decode speed: agentloop loop vs HF generate ({args.model}, {ours_model.dtype}, {where})", "",
             f"{args.new_tokens} greedy tokens after a prefilled context of real prose; {args.rounds} alternating rounds; "
             "decode time only (the prefill is done once, untimed). Ratio = median of per-round (HF time / ours). "
             f"`with β`: the β attention path forced on every layer. Weights: {layout}. One-token forwards: "
             f"{'the modeling code (--no-lean)' if args.no_lean else 'agentloop.lean where it applies'}.", "",
             "| context | decode step | β | agentloop tok/s | HF generate tok/s | **ratio** | same greedy tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']:,} | {r['decode']} | {'yes' if r['beta'] else 'no'} | {r['ours_tok_s']:.2f} | "
                     f"{r['hf_tok_s']:.2f} | **{r['ratio']:.2f}x** | {r['same_tokens']}/{args.new_tokens} |")
    lines += beta_cost(rows)
    fallbacks = {r["graph_fallback"] for r in rows if r["graph_fallback"]}
    if fallbacks:
        lines += ["", "CUDA graph fallbacks: " + "; ".join(sorted(fallbacks))]
    lines += ["", f"torch {torch.__version__}. Reproduce: `{command}`"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        data = {"benchmark": "decode-speed", "model": args.model, "dtype": str(ours_model.dtype), "device": where,
                "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows, "command": command,
                "layout": layout,
                "torch": torch.__version__}
        print(f"wrote {write_results(args.name, data, text)}")
    return 0
