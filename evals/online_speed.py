"""Amortized speed of online compaction: tok/s of a capped run (compactions included) vs the same run uncapped.

The same sampled decode (same prompt, seed and length) runs uncapped and under a cap that forces repeated
compactions, alternating configurations over several rounds on this noisy machine. Reported per
configuration: median tok/s over the whole run, its ratio to the uncapped run of the same round, the number
of compactions and the fraction of wall time spent compacting.
"""

from __future__ import annotations

import statistics
import time

PROMPT = "Tell me a long story about a lighthouse keeper and the ships she saw over forty years."


def timed_run(loaded, prompt_ids: list[int], tokens: int, cap: str | None, policy, seed: int) -> dict:
    from agentloop import GenerationSettings, Session

    session = Session(loaded, cap=cap, policy=policy)
    list(session.feed(prompt_ids))
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)
    tic = time.perf_counter()
    events = list(session.generate(settings))
    seconds = time.perf_counter() - tic
    compaction_s = sum(e.seconds for e in events if e.kind == "policy")
    stop = events[-1]
    return {"tokens": stop.new_tokens, "seconds": seconds, "tok_s": stop.new_tokens / seconds,
            "compactions": sum(e.kind == "policy" for e in events), "compaction_s": compaction_s,
            "peak_bytes": session.peak_bytes, "cap_bytes": session.cap_bytes, "logical": session.cache.logical_len,
            "physical": session.cache.physical_len}


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, whole

    parser = EvalParser(prog="agentloop eval online-speed", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=count, default=1200)
    parser.add_argument("--mem-cap", default="256tok")
    parser.add_argument("--configs", nargs="+", default=["am-repeat", "am-both", "am-recorded"],
                        help="policies run under the cap")
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--seed", type=whole, default=0)
    add_output_options(parser, "online_speed")
    args = parser.parse_args(argv)

    from agentloop.chat import encode_messages
    from agentloop.evals import load_eval_model
    from agentloop.evals.online_fidelity import PROMPT_LEGEND, policy_for

    loaded = load_eval_model(args.model)
    prompt_ids = encode_messages(loaded.tokenizer, [{"role": "user", "content": PROMPT}])
    runs: dict[str, list[dict]] = {"uncapped": [], **{name: [] for name in args.configs}}
    for round_ in range(args.rounds):
        for name in runs:
            cap, policy = (None, None) if name == "uncapped" else (args.mem_cap, policy_for(name, args.seed))
            run = timed_run(loaded, prompt_ids, args.tokens, cap, policy, args.seed)
            runs[name].append(run)
            print(f"round {round_} {name:12s} {run['tok_s']:.2f} tok/s, {run['compactions']} compactions "
                  f"({run['compaction_s']:.1f}s)", flush=True)

    summary = {}
    for name, rs in runs.items():
        ratios = [r["tok_s"] / u["tok_s"] for r, u in zip(rs, runs["uncapped"], strict=False)]
        summary[name] = {"tok_s_median": statistics.median(r["tok_s"] for r in rs),
                         "ratio_median": statistics.median(ratios), "ratios": ratios,
                         "compactions": max(r["compactions"] for r in rs),
                         "compaction_fraction": statistics.median(r["compaction_s"] / r["seconds"] for r in rs),
                         "peak_over_cap": max((r["peak_bytes"] / r["cap_bytes"]) if r["cap_bytes"] else 0 for r in rs),
                         "logical": rs[-1]["logical"], "physical": rs[-1]["physical"]}
    command = ("agentloop eval online-speed " + " ".join(argv or [])).strip()
    lines = [f"# Amortized decode speed with online compaction ({args.model}, cap {args.mem_cap})", "",
             (f"{args.tokens} sampled tokens after a {len(prompt_ids)}-token prompt; {args.rounds} rounds, "
              "configurations alternating; medians. The ratio is tok/s against the uncapped run of the same round, "
              "compaction time included."), "",
             "| run | tok/s | ratio vs uncapped | compactions | time compacting | final logical / physical |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['tok_s_median']:.2f} | {s['ratio_median']:.3f}x | {s['compactions']} | "
                     f"{s['compaction_fraction']:.1%} | {s['logical']} / {s['physical']} |")
    lines += ["", ("`am-both` = policy `am` as configured by default (repeat-prefill + recorded queries; each compaction "
                   "re-reads only the text added since the previous one); `-all` = re-reading the whole context at "
                   "every compaction (the paper's protocol); `am-repeat` / `am-recorded` = one query source; "
                   f"{PROMPT_LEGEND}."),
              "", f"Reproduce: `{command}`"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from agentloop.evals import write_results

        write_results(args.name, {"benchmark": "online-speed", "config": vars(args), "summary": summary,
                                       "runs": runs, "command": command}, text)
    return 0
