"""The headline claim's shape on a reasoning task: GSM8K runs capped at about a quarter of their length.

The paper's claim: a reasoning run capped at a quarter of its length and compacted up to six times scores like the
uncapped run. No reasoning model's weights reach this machine, so the same shape is measured on GSM8K with a small
instruct model: every problem is solved greedily, uncapped and under one KV cap (chosen so that the median problem
compacts at least 6 times; `--plan` computes it from the uncapped runs), by `am` (its best settings so far:
prompt_share 0.5), eviction at the same schedule (`snapkv`), `streaming`, `truncate`, and `none` (plain decoding:
it stops at the cap and is then forced to answer). Rows are paired on the same problems and seeds; accuracy comes
with Wilson intervals, each row against `am` with a paired bootstrap interval and an exact McNemar test, and the
verdict is computed from them. Each (problem, row) is a record: --resume runs only the missing ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from agentloop.errors import AgentloopError

DEFAULT_ROWS = ("uncapped", "am", "none", "snapkv", "streaming", "truncate")
# row name -> policy_for name (agentloop eval online-fidelity): `am` in its best settings so far
POLICY_OF = {"am": "am-both-prompt", "snapkv": "snapkv", "streaming": "streaming", "truncate": "truncate",
             "none": "none"}
AM_SETTINGS = ("Attention Matching (am-hak-fast), ratio 0.5, 20 newest tokens kept, repeat-prefill + recorded "
               "queries, prompt_share 0.5 (the problem re-read at each compaction)")
# appended when a run stopped before it answered, then ANSWER_TOKENS are decoded: the model's own closing form (a bare
# "The answer is" got "N." copied from the instruction)
FORCED = "\nThe final answer is \\boxed{"
ANSWER_TOKENS = 16
PREFILL_CHUNK = 32  # a policy may act between chunks, so a prompt longer than the cap is compacted as it is read
MIN_COMPACTIONS = 6
SETTINGS = ("model", "data", "mem_cap", "max_new_tokens", "seed")  # what a resumed run must share


def compactions_at(prompt: int, total: int, cap: int, ratio: float = 0.5, protect: int = 20,
                   chunk: int = PREFILL_CHUNK) -> int:
    """How many times `am` compacts a run of `total` tokens (the first `prompt` prefilled in chunks, the rest
    decoded one by one) under a cap of `cap` slots: each time the next forward would not fit, everything but the
    `protect` newest slots shrinks to `ratio` of its slots."""
    held, count, fed = 0, 0, 0
    while fed < total:
        step = min(chunk, prompt - fed) if fed < prompt else 1
        while held + step > cap:
            if held - protect < 2:
                raise AgentloopError(f"a cap of {cap} slots cannot hold {step} new tokens next to {protect} protected ones")
            held = round((held - protect) * ratio) + protect
            count += 1
        held, fed = held + step, fed + step
    return count


def plan_cap(runs: list[tuple[int, int]], target: int = MIN_COMPACTIONS, step: int = 8) -> int:
    """The largest cap (a multiple of `step` slots) at which the median of `runs` (prompt tokens, total tokens) of
    the uncapped model compacts at least `target` times."""
    if not runs:
        raise AgentloopError("no uncapped runs to plan from: run the uncapped row on some problems first")
    cap = max(total for _, total in runs) // step * step
    while cap > step and statistics.median(compactions_at(p, t, cap) for p, t in runs) < target:
        cap -= step
    return cap


# --- solving one problem -----------------------------------------------------------------------------------------
def solve(loaded, prompt_ids: list[int], forced_ids: list[int], cap_slots: int | None, policy,
          max_new_tokens: int) -> dict:
    """Greedy reasoning under the cap; a run that stopped before it finished is forced to answer. `none` stops at
    the cap less the forced answer's room (so that the answer fits under the full cap), even within the prompt: it then
    answers having read only the prompt's start (stop `prompt_cut`). The other policies make room as they go; one that
    cannot fit the prompt (`truncate` keeps all of it) fails the problem (stop `prompt_over_cap`)."""
    from agentloop import GenerationSettings, Session
    from agentloop.policies import NoPolicy

    plain = cap_slots is not None and isinstance(policy, NoPolicy)
    session = Session(loaded, None if cap_slots is None else f"{cap_slots}tok", policy, PREFILL_CHUNK)
    thinking = cap_slots - answer_room(forced_ids) if plain else None
    if plain:
        session.set_slot_limit(thinking)
    text, new_tokens, stop = "", 0, "prompt_cut"
    try:
        list(session.feed(prompt_ids[:thinking] if plain else prompt_ids))
    except AgentloopError:  # the prompt alone exceeds what this policy can hold under the cap
        return {"text": "", "stop": "prompt_over_cap", "forced": False, "new_tokens": 0, "compactions": 0,
                "logical_len": session.cache.logical_len, "peak_bytes": session.peak_bytes, "cap_bytes": session.cap_bytes}
    if session.cache.logical_len == len(prompt_ids):
        end = list(session.generate(GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)))[-1]
        text, new_tokens, stop = end.text, end.new_tokens, end.reason
    forced = stop in ("prompt_cut", "mem_cap", "max_new_tokens")
    if forced:
        if plain:  # give the answer the room kept free
            session.set_slot_limit(None)
        try:
            list(session.feed(forced_ids))
        except AgentloopError:  # a policy that could not make room for the forced text: the run ends unanswered
            forced = False
        else:
            end = list(session.generate(GenerationSettings(max_new_tokens=ANSWER_TOKENS, temperature=0.0)))[-1]
            text, new_tokens = text + FORCED + end.text, new_tokens + end.new_tokens
    return {"text": text, "stop": stop, "forced": forced, "new_tokens": new_tokens,
            "compactions": session.policy_actions, "logical_len": session.cache.logical_len,
            "peak_bytes": session.peak_bytes, "cap_bytes": session.cap_bytes}


def answer_room(forced_ids: list[int]) -> int:
    """Slots `none` keeps free for the forced answer."""
    return len(forced_ids) + ANSWER_TOKENS


# --- pairing and scoring -----------------------------------------------------------------------------------------
def paired(records: list[dict], a: str, b: str, ids: set | None = None) -> tuple[list[bool], list[bool]]:
    """Correctness of rows a and b on the problems both have run (within `ids` if given), in problem order."""
    by = {(r["id"], r["policy"]): r["correct"] for r in records}
    shared = {r["id"] for r in records if (r["id"], a) in by and (r["id"], b) in by and (ids is None or r["id"] in ids)}
    order = sorted(shared, key=str)
    return [by[(i, a)] for i in order], [by[(i, b)] for i in order]


def compare(records: list[dict], a: str, b: str, seed: int = 0, ids: set | None = None) -> dict | None:
    """Row a against row b on their shared problems (within `ids`): accuracies, the difference with its 95% paired
    bootstrap interval, the exact McNemar test, and a verdict for a (win / tie / loss at p < 0.05)."""
    from agentloop.evals.paired import mcnemar, paired_bootstrap

    x, y = paired(records, a, b, ids)
    if not x:
        return None
    test = mcnemar(x, y)
    significant = test["p"] < 0.05
    outcome = "tie" if not significant else "win" if test["only_a"] > test["only_b"] else "loss"
    return {"a": a, "b": b, "n": len(x), "accuracy_a": sum(x) / len(x), "accuracy_b": sum(y) / len(y),
            "difference": (sum(x) - sum(y)) / len(x), "ci95": paired_bootstrap(x, y, seed=seed), **test,
            "verdict": outcome}


def _names(rows: list[str]) -> str:
    return ", ".join(f"`{r}`" for r in rows)


def fitting(records: list[dict], room: int) -> set:
    """The problems whose prompt fits in `room` slots: where `none` and `truncate` can run as designed."""
    return {r["id"] for r in records if r["prompt_tokens"] <= room}


def summarize(records: list[dict]) -> dict:
    from agentloop.evals.passkey import wilson

    summary = {}
    for row in row_order(records):
        rs = [r for r in records if r["policy"] == row]
        k = sum(r["correct"] for r in rs)
        summary[row] = {"n": len(rs), "accuracy": k / len(rs), "ci95": wilson(k, len(rs)),
                        "compactions_median": statistics.median(r["compactions"] for r in rs),
                        "compactions_max": max(r["compactions"] for r in rs),
                        "forced": sum(r["forced"] for r in rs),
                        "prompt_cut": sum(r["stop"] == "prompt_cut" for r in rs),
                        "prompt_over_cap": sum(r["stop"] == "prompt_over_cap" for r in rs),
                        "length_median": statistics.median(r["logical_len"] for r in rs),
                        "seconds_median": statistics.median(r["seconds"] for r in rs),
                        "peak_over_cap": max((r["peak_bytes"] / r["cap_bytes"] for r in rs if r["cap_bytes"]), default=None)}
    return summary


def row_order(records: list[dict]) -> list[str]:
    present = list(dict.fromkeys(r["policy"] for r in records))
    return [r for r in DEFAULT_ROWS if r in present] + [r for r in present if r not in DEFAULT_ROWS]


def verdict(summary: dict, comparisons: dict[str, dict], fit: dict[str, dict] | None = None,
            min_compactions: int = MIN_COMPACTIONS) -> list[str]:
    """The plain-language verdict, sentence by sentence, from the summary and am's paired comparisons (`fit`: the
    same comparisons on the problems whose prompt fits under the cap less the answer's room)."""
    if "am" not in summary:
        return ["No `am` runs yet: no verdict."]
    lines = []
    am = summary["am"]
    if am["compactions_median"] < min_compactions:
        lines.append(f"The cap is not tight enough for the claim's shape: the median `am` run compacted "
                     f"{am['compactions_median']:g} times (the claim needs ≥ {min_compactions}).")
    else:
        lines.append(f"The median `am` run compacted {am['compactions_median']:g} times (at most {am['compactions_max']}).")
    match = comparisons.get("uncapped")
    if match:
        lo, hi = match["ci95"]
        holds = lo <= 0 <= hi
        lines.append(
            (f"**`am` at the cap {'matches' if holds else 'does not match'} uncapped within the interval**: "
             f"{match['accuracy_a']:.1%} vs {match['accuracy_b']:.1%} on {match['n']} problems, difference "
             f"{match['difference']:+.1%} (95% CI [{lo:+.1%}, {hi:+.1%}], McNemar p = {match['p']:.3g})")
            + (f"; the interval still allows a drop of up to {max(0.0, -lo):.1%}." if holds else "."))
    for other in [name for name in comparisons if name != "uncapped"]:
        c = comparisons[other]
        lo, hi = c["ci95"]
        word = {"win": "beats", "loss": "loses to", "tie": "does not separate from"}[c["verdict"]]
        lines.append(f"`am` {word} `{other}`: {c['accuracy_a']:.1%} vs {c['accuracy_b']:.1%} on {c['n']} problems "
                     f"({c['difference']:+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}], McNemar p = {c['p']:.3g}; "
                     f"{c['only_a']} problems only `am` solved, {c['only_b']} only `{other}`).")
        if other in ("none", "truncate") and fit and other in fit:
            f = fit[other]
            lo, hi = f["ci95"]
            lines.append(f"On the {f['n']} problems whose prompt fits under the cap less the answer's room (where "
                         f"`{other}` reads the whole problem): {f['accuracy_a']:.1%} vs {f['accuracy_b']:.1%} "
                         f"({f['difference']:+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}], McNemar p = {f['p']:.3g}).")
    rest = [name for name in comparisons if name != "uncapped"]
    beaten = [name for name in rest if comparisons[name]["verdict"] == "win"]
    if match and rest:
        lo, hi = match["ci95"]
        level = "matches" if lo <= 0 <= hi else "falls short of" if hi < 0 else "scores above"
        against = ("beats every baseline" if len(beaten) == len(rest) else
                   f"beats no baseline ({_names(rest)})" if not beaten else
                   f"beats {_names(beaten)} but not {_names([b for b in rest if b not in beaten])}")
        holds = level != "falls short of" and len(beaten) == len(rest)
        partly = level != "falls short of" or beaten
        verdict = "holds" if holds else "holds only in part" if partly else "does not hold"
        lines.append(f"In one line: the claim's shape {verdict} here: `am` under the cap {level} the uncapped run and "
                     f"{against}.")
    return lines


# --- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, slot_count, whole

    parser = EvalParser(prog="agentloop eval headline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--data", required=True, help="GSM8K test JSONL (question, answer ending in '#### N')")
    parser.add_argument("--problems", type=count, default=200, help="the first N problems")
    parser.add_argument("--mem-cap", type=slot_count, default=112,
                        help="KV slots of the capped rows (default 112: the median of the first 20 uncapped runs "
                             "compacts 7 times; see --plan)")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help=f"uncapped and policies ({', '.join(POLICY_OF)} or any online-fidelity policy name)")
    parser.add_argument("--max-new-tokens", type=count, default=400)
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--plan", action="store_true",
                        help=f"print the largest cap at which the median uncapped run recorded so far would compact "
                             f"≥ {MIN_COMPACTIONS} times, and exit")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in evals/results/<name>.json (same settings), run the rest")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="ROW", help="with --resume: drop these rows first")
    add_output_options(parser, "headline")
    args = parser.parse_args(argv)
    argv = list(argv or [])

    from agentloop.chat import encode_messages
    from agentloop.evals import load_eval_model
    from agentloop.evals.gsm8k import INSTRUCTION, load_gsm8k, parse_answer
    from agentloop.evals.online_fidelity import policy_for

    for row in args.rows:
        if row != "uncapped":
            policy_for(POLICY_OF.get(row, row), 0)  # unknown names fail before anything runs
    if args.rerun and not args.resume:
        raise AgentloopError("--rerun drops rows from earlier results: use it with --resume")
    problems = load_gsm8k(args.data, args.problems)
    if args.plan:  # the uncapped runs do not depend on the cap: any earlier results file will do
        from agentloop.evals import results_dir

        path = results_dir() / f"{args.name}.json"
        records = json.loads(path.read_text())["records"] if path.is_file() else []
        runs = [(r["prompt_tokens"], r["logical_len"]) for r in records if r["policy"] == "uncapped"]
        cap = plan_cap(runs)
        print(f"cap {cap} slots: the median of {len(runs)} uncapped runs would compact "
              f"{statistics.median(compactions_at(p, t, cap) for p, t in runs):g} times")
        return 0
    results = _earlier(args) if args.resume else {"config": _config(args), "records": []}
    results["records"] = [r for r in results["records"] if r["policy"] not in args.rerun]
    command = " ".join(["agentloop", "eval", "headline", *argv])
    results["commands"] = [c for c in results.get("commands", []) if c != command] + [command]
    done = {(r["id"], r["policy"]) for r in results["records"]}
    loaded = load_eval_model(args.model)
    forced_ids = [int(i) for i in loaded.tokenizer(FORCED, add_special_tokens=False)["input_ids"]]
    results["config"]["answer_room"] = answer_room(forced_ids)
    for index, problem in enumerate(problems):
        prompt_ids = encode_messages(loaded.tokenizer, [{"role": "user",
                                                         "content": f"{problem['question']}\n\n{INSTRUCTION}"}])
        for row in args.rows:
            if (problem["id"], row) in done:
                continue
            tic = time.perf_counter()
            policy = None if row == "uncapped" else policy_for(POLICY_OF.get(row, row), args.seed + index)
            result = solve(loaded, prompt_ids, forced_ids, None if row == "uncapped" else args.mem_cap, policy,
                           args.max_new_tokens)
            predicted = parse_answer(result["text"]) if result["text"] else None
            record = {"id": problem["id"], "policy": row, "answer": problem["answer"], "predicted": predicted,
                      "correct": predicted is not None and abs(predicted - problem["answer"]) < 1e-6,
                      "prompt_tokens": len(prompt_ids), "seconds": round(time.perf_counter() - tic, 1), **result}
            results["records"].append(record)
            print(f"problem {problem['id']} {row:10s} {'ok   ' if record['correct'] else 'wrong'} predicted {predicted} "
                  f"(answer {problem['answer']:g}); {record['stop']}{', forced' if record['forced'] else ''}, "
                  f"{record['new_tokens']} tokens, {record['compactions']} compactions, {record['seconds']:.0f}s",
                  flush=True)
            if not args.no_write:
                _write(args, results, loaded.name)
    print(report(args, results, loaded.name)[1])
    return 0


def _config(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS} | {"am": AM_SETTINGS, "forced": FORCED, "answer_tokens": ANSWER_TOKENS}


def _earlier(args) -> dict:
    from agentloop.evals import results_dir

    path = results_dir() / f"{args.name}.json"
    if not path.is_file():
        return {"config": _config(args), "records": []}
    earlier = json.loads(path.read_text())
    changed = [k for k in SETTINGS if earlier["config"].get(k) != getattr(args, k)]
    if changed:
        raise AgentloopError(f"--resume: {path} was run with other settings ({', '.join(changed)}); resume with the "
                             "same settings, or give another --name")
    return earlier


def _paired_table(comparisons: dict[str, dict]) -> list[str]:
    """Markdown rows of `am` against each named row (paired bootstrap and McNemar)."""
    lines = ["| against | problems | am | other | difference [95% paired bootstrap] | only am / only other | McNemar p "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for name, c in comparisons.items():
        lo, hi = c["ci95"]
        lines.append(f"| {name} | {c['n']} | {c['accuracy_a']:.1%} | {c['accuracy_b']:.1%} | {c['difference']:+.1%} "
                     f"[{lo:+.1%}, {hi:+.1%}] | {c['only_a']} / {c['only_b']} | {c['p']:.3g} | {c['verdict']} |")
    return lines


def report(args, results: dict, model: str) -> tuple[dict, str]:
    records = results["records"]
    summary = summarize(records) if records else {}
    comparisons = {b: c for b in summary if b != "am" and (c := compare(records, "am", b, args.seed)) is not None}
    room = args.mem_cap - results["config"]["answer_room"]
    fits = fitting(records, room)
    fit = {b: c for b in summary if b != "am" and (c := compare(records, "am", b, args.seed, fits)) is not None}
    lines = [f"# The headline on a reasoning task: GSM8K under a {args.mem_cap}-slot KV cap ({model})", "",
             (f"The first {len({r['id'] for r in records})} GSM8K test problems, greedy, up to {args.max_new_tokens} "
              f"new tokens, asked as in `agentloop eval gsm8k`. Every capped row holds at most {args.mem_cap} KV slots; "
              f"a run that stops before answering is forced to (\"{FORCED.strip()}\" + {ANSWER_TOKENS} tokens); `none` "
              f"thinks under the cap less that room. `am` = {AM_SETTINGS}."), "",
             "## Verdict", "", *verdict(summary, comparisons, fit), "",
             "## Rows", "",
             "| row | problems | accuracy [95% Wilson] | policy actions median / max | forced | prompt cut / over cap | "
             "median length (tokens) | median s / problem |",
             "|---|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        lo, hi = s["ci95"]
        lines.append(f"| {row} | {s['n']} | {s['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] | {s['compactions_median']:g} / "
                     f"{s['compactions_max']} | {s['forced']} | {s['prompt_cut']} / {s['prompt_over_cap']} | "
                     f"{s['length_median']:g} | {s['seconds_median']:g} |")
    if comparisons:
        lines += ["", "## `am` against each row, paired on the same problems", "", *_paired_table(comparisons),
                  "", (f"The same on the {len(fits)} problems whose prompt fits in {room} slots (the cap less the "
                       f"forced answer's room), where `none` and `truncate` read the whole problem:"), "",
                  *_paired_table(fit)]
    lines += ["", ("`none` stops at the cap less the forced answer's room and answers, within the prompt if it is "
                   "longer (\"prompt cut\": it answers having read only the prompt's start); `truncate` keeps the whole "
                   "prompt and drops the oldest tokens after it, and fails a problem whose prompt alone does not fit "
                   "(\"prompt over cap\"). `snapkv` = eviction at `am`'s schedule (scored by the newest 256 tokens' "
                   "queries); `streaming` = 4 sinks + recent window. The verdict is `win`/`loss` when McNemar's exact "
                   "p < 0.05. Every answer is in the JSON file."), "",
              "Written by " + "; ".join(f"`{c}`" for c in results.get("commands", [])) + " (resumable with `--resume`; "
              "`--resume --rerun am` after a change to `am`; `--plan` checks the cap against the uncapped runs)."]
    return {"summary": summary, "comparisons": comparisons, "comparisons_prompt_fits": fit}, "\n".join(lines)


def _write(args, results: dict, model: str) -> None:
    from agentloop.evals import results_dir, write_results

    computed, markdown = report(args, results, model)
    write_results(args.name, {"benchmark": "headline", **results, **computed}, markdown)
    _plot(computed["summary"], results["records"], results_dir() / f"{args.name}.png", args.mem_cap)


def _plot(summary: dict, records: list[dict], path, cap: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_comp) = plt.subplots(1, 2, figsize=(11, 4))
    rows = list(summary)
    values = [summary[r]["accuracy"] for r in rows]
    # rounding can put a value a hair outside its own interval
    errors = [[max(0.0, v - summary[r]["ci95"][0]) for r, v in zip(rows, values, strict=True)],
              [max(0.0, summary[r]["ci95"][1] - v) for r, v in zip(rows, values, strict=True)]]
    ax_acc.bar(rows, values, yerr=errors, capsize=4,
               color=["tab:green" if r == "uncapped" else "tab:blue" if r == "am" else "tab:gray" for r in rows])
    ax_acc.set(ylabel="accuracy (95% Wilson)", title=f"GSM8K, cap {cap} slots")
    capped = [r for r in rows if r not in ("uncapped", "none")]
    if capped:
        ax_comp.boxplot([[x["compactions"] for x in records if x["policy"] == r] for r in capped], tick_labels=capped)
    ax_comp.axhline(MIN_COMPACTIONS, color="black", lw=1, ls="--", label=f"{MIN_COMPACTIONS} compactions")
    ax_comp.set(ylabel="compactions / evictions per problem", title="policy actions per problem")
    ax_comp.legend(fontsize=8)
    for ax in (ax_acc, ax_comp):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
