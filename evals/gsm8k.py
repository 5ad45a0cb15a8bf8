"""GSM8K under a KV-cache cap: accuracy of capped runs (online compaction) next to the uncapped run.

Each problem is asked in the model's chat template with a request to reason step by step and end with
"The answer is N."; the model decodes greedily, uncapped and under the cap with each policy, side by side.
The cap is meant to be small enough that the reasoning itself forces compactions (the question is part of
the compactable region, as in the paper's protocol). A run is correct when the last number it states equals
the reference answer (the number after "####" in the dataset).
"""

from __future__ import annotations

import re
import statistics
import time

from agentloop.errors import AgentloopError

INSTRUCTION = "Solve the problem step by step, then end with \"The answer is N.\" where N is a number."


def load_gsm8k(path: str, limit: int | None) -> list[dict]:
    """Rows of a GSM8K JSONL file as {id, question, answer (a number)}."""
    from agentloop.evals import read_jsonl

    problems = []
    for number, row in read_jsonl(path, "a 'question' and an 'answer' ending in '#### N'"):
        try:
            answer = _number(row["answer"].rpartition("####")[2])
            question = str(row["question"])
        except (KeyError, TypeError, AttributeError):
            answer = None
        if answer is None:
            raise AgentloopError(f"{path} line {number} is not a GSM8K row: each line must be a JSON object with a "
                                 "'question' and an 'answer' that ends in '#### N'")
        problems.append({"id": row.get("idx", len(problems)), "question": question, "answer": answer})
        if limit is not None and len(problems) == limit:
            break
    return problems


def _number(text: str, first: bool = False) -> float | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(found[0 if first else -1]) if found else None


def parse_answer(text: str) -> float | None:
    """The first number after the last "answer is", else the last number of the text."""
    stated = _number(text.lower().rpartition("answer is")[2], first=True) if "answer is" in text.lower() else None
    return stated if stated is not None else _number(text)


def solve(loaded, prompt_ids: list[int], cap: str | None, policy, max_new_tokens: int) -> dict:
    from agentloop import GenerationSettings, Session

    session = Session(loaded, cap=cap, policy=policy, prefill_chunk=32)
    list(session.feed(prompt_ids))
    events = list(session.generate(GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)))
    stop = events[-1]
    return {"text": stop.text, "stop": stop.reason, "new_tokens": stop.new_tokens,
            "compactions": sum(e.kind == "policy" for e in events), "logical_len": session.cache.logical_len,
            "peak_bytes": session.peak_bytes, "cap_bytes": session.cap_bytes}


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count

    parser = EvalParser(prog="agentloop eval gsm8k", description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--data", required=True, help="GSM8K test JSONL (question, answer ending in '#### N')")
    parser.add_argument("--limit", type=count, default=20, help="first N problems")
    parser.add_argument("--mem-cap", default="160tok", help="physical KV cap of the capped runs")
    parser.add_argument("--policies", nargs="+", default=["am-both", "snapkv", "streaming"],
                        help="policies under the cap (names of agentloop eval online-fidelity)")
    parser.add_argument("--max-new-tokens", type=count, default=400)
    add_output_options(parser, "gsm8k")
    args = parser.parse_args(argv)

    from agentloop.chat import encode_messages
    from agentloop.evals import load_eval_model
    from agentloop.evals.online_fidelity import policy_for

    problems = load_gsm8k(args.data, args.limit)
    for name in args.policies:
        policy_for(name, 0)  # unknown names fail before the model loads
    loaded = load_eval_model(args.model)
    records = []
    for problem in problems:
        prompt_ids = encode_messages(loaded.tokenizer, [{"role": "user",
                                                         "content": f"{problem['question']}\n\n{INSTRUCTION}"}])
        for name in ["uncapped", *args.policies]:
            tic = time.perf_counter()
            capped = name != "uncapped"
            result = solve(loaded, prompt_ids, args.mem_cap if capped else None,
                           policy_for(name, 0) if capped else None, args.max_new_tokens)
            predicted = parse_answer(result["text"])
            records.append({"id": problem["id"], "policy": name, "answer": problem["answer"], "predicted": predicted,
                            "correct": predicted is not None and abs(predicted - problem["answer"]) < 1e-6,
                            "prompt_tokens": len(prompt_ids), "seconds": round(time.perf_counter() - tic, 1),
                            **result})
            r = records[-1]
            print(f"problem {problem['id']} {name:10s} {'ok   ' if r['correct'] else 'wrong'} predicted {predicted} "
                  f"(answer {problem['answer']:g}), {r['new_tokens']} tokens, {r['compactions']} compactions, "
                  f"{r['seconds']:.0f}s", flush=True)
        if not args.no_write:
            _report(args, records, argv, loaded.name)
    print(_report(args, records, argv, loaded.name))
    return 0


def _report(args, records: list[dict], argv: list[str] | None, model: str) -> str:
    from agentloop.evals import write_results
    from agentloop.evals.online_fidelity import PROMPT_LEGEND
    from agentloop.evals.passkey import wilson

    names = list(dict.fromkeys(r["policy"] for r in records))
    problems = len({r["id"] for r in records})
    summary = {}
    for name in names:
        rs = [r for r in records if r["policy"] == name]
        k = sum(r["correct"] for r in rs)
        summary[name] = {"accuracy": k / len(rs), "n": len(rs), "ci95": wilson(k, len(rs)),
                         "compactions_median": statistics.median(r["compactions"] for r in rs),
                         "compactions_max": max(r["compactions"] for r in rs),
                         "runs_with_2_or_more": sum(r["compactions"] >= 2 for r in rs),
                         "logical_max": max(r["logical_len"] for r in rs),
                         "peak_over_cap": max(r["peak_bytes"] / r["cap_bytes"] if r["cap_bytes"] else 0 for r in rs)}
    command = ("agentloop eval gsm8k " + " ".join(argv or [])).strip()
    lines = [f"# GSM8K under a KV-cache cap ({model}, cap {args.mem_cap})", "",
             (f"First {problems} GSM8K test problems, greedy, up to {args.max_new_tokens} new tokens; each policy "
              "runs under the cap, `uncapped` without one. Accuracy with its 95% Wilson interval:"), "",
             "| run | accuracy | compactions (median / max) | runs with ≥ 2 compactions | longest run (tokens) |",
             "|---|---|---|---|---|"]
    for name, s in summary.items():
        lo, hi = s["ci95"]
        lines.append(f"| {name} | {s['accuracy']:.0%} [{lo:.0%}, {hi:.0%}] | {s['compactions_median']:g} / "
                     f"{s['compactions_max']} | {s['runs_with_2_or_more']} / {s['n']} | {s['logical_max']} |")
    lines += ["", ("`am-both` = policy `am` as configured by default (Attention Matching at ratio 0.5, 20 newest tokens "
                   "kept, repeat-prefill + recorded queries); `am-repeat` = repeat-prefill queries only; `snapkv` = "
                   "eviction at the same schedule; `streaming` = sink slots and a recent window; "
                   f"{PROMPT_LEGEND}. Every answer is in the JSON file."), "", f"Reproduce: `{command}`"]
    text = "\n".join(lines)
    if not args.no_write:
        write_results(args.name, {"benchmark": "gsm8k", "config": vars(args), "summary": summary, "records": records,
                                  "command": command}, text)
    return text
