"""Decode speed: agentloop's capped loop vs HF `generate`, same model, prompt and token count, side by side.

Rounds alternate which runs first; each reports wall time from prompt to the last new token (prefill
included for both). We report medians and the median of per-round ratios, since this machine is noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

PROMPT = ("You are a careful assistant. Explain, step by step, how a hash map handles collisions, "
          "compare chaining with open addressing, and give a short Python example of each.")


def _ours(loaded, prompt_ids, new_tokens, cap):
    from agentloop import GenerationSettings, Session

    session = Session(loaded, cap=cap)
    start = time.perf_counter()
    for _ in session.feed(prompt_ids):
        pass
    for _event in session.generate(GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)):
        pass
    seconds = time.perf_counter() - start
    return seconds, session.token_ids[len(prompt_ids):len(prompt_ids) + new_tokens]


def _hf(model, prompt_ids, new_tokens):
    input_ids = torch.tensor([prompt_ids], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
    seconds = time.perf_counter() - start
    return seconds, out[0, len(prompt_ids):].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentloop eval decode-speed", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mem-cap", default="64MB", help="cap for our loop (large enough not to trigger a policy)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write evals/results")
    args = parser.parse_args(argv)

    from agentloop.chat import encode_messages
    from agentloop.evals import load_eval_model, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    ours_model = load_eval_model(args.model)
    hf_model = load_eval_model(args.model).model  # a separate stock copy (SDPA, no agentloop attention)
    prompt_ids = encode_messages(ours_model.tokenizer, [{"role": "user", "content": PROMPT}])

    _ours(ours_model, prompt_ids, 16, args.mem_cap)  # warm-up both paths
    _hf(hf_model, prompt_ids, 16)
    rows = []
    for r in range(args.rounds):
        order = ["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]
        result = {}
        for who in order:
            seconds, tokens = (_ours(ours_model, prompt_ids, args.new_tokens, args.mem_cap) if who == "ours"
                               else _hf(hf_model, prompt_ids, args.new_tokens))
            result[who] = (seconds, tokens)
        same = sum(a == b for a, b in zip(result["ours"][1], result["hf"][1], strict=False))
        rows.append({"round": r, "ours_tok_s": args.new_tokens / result["ours"][0],
                     "hf_tok_s": args.new_tokens / result["hf"][0],
                     "ratio": result["hf"][0] / result["ours"][0], "same_tokens": same})
        print(f"round {r}: ours {rows[-1]['ours_tok_s']:.2f} tok/s, hf {rows[-1]['hf_tok_s']:.2f} tok/s, "
              f"ratio {rows[-1]['ratio']:.3f}, identical greedy tokens {same}/{args.new_tokens}")

    summary = {
        "ours_tok_s_median": statistics.median(r["ours_tok_s"] for r in rows),
        "hf_tok_s_median": statistics.median(r["hf_tok_s"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
    }
    data = {"benchmark": "decode-speed", "model": args.model, "prompt_tokens": len(prompt_ids),
            "new_tokens": args.new_tokens, "rounds": args.rounds, "mem_cap": args.mem_cap,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "summary": summary, "runs": rows,
            "command": "agentloop eval decode-speed " + " ".join(argv or [])}
    table = "\n".join([
        f"# Decode speed: agentloop loop vs HF generate ({args.model}, {args.new_tokens} new tokens, greedy)",
        "",
        f"Prompt {len(prompt_ids)} tokens; {args.rounds} alternating rounds; wall time from prompt to last token; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32. Our loop runs under a "
        f"{args.mem_cap} cap (checked every step, never reached).",
        "",
        "| | median tok/s |",
        "|---|---|",
        f"| agentloop `Session` | {summary['ours_tok_s_median']:.2f} |",
        f"| HF `generate` | {summary['hf_tok_s_median']:.2f} |",
        f"| **ratio (ours / HF), median of per-round ratios** | **{summary['ratio_median']:.3f}x** |",
        "",
        f"Reproduce: `{data['command'].strip()}`",
    ])
    print(table)
    if not args.no_write:
        print(f"wrote {write_results('decode_speed', data, table)}")
    return 0
