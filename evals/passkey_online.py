"""Memory through compactions: does a pass key given in the prompt survive k online compactions?

Each trial puts a five-digit pass key in the first user turn, then ingests real prose (Paul Graham essays) as
further turns under a small cap, so the memory policy must act again and again. Right after the policy's k-th
action (k = 1..K) the run is forked, the question is asked and the model answers greedily. One run per trial
and policy gives the whole curve of accuracy against k.
"""

from __future__ import annotations

import random
import time

from agentloop.evals.passkey import (
    ANSWER_PREFIX,
    QUESTION,
    answer,
    correct,
    digits_heading,
    digits_recalled,
    metric_table,
    wilson,
)

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# the first sets the schedule
DEFAULT_POLICIES = ("am-repeat-prompt", "full", "am-repeat", "am-both-prompt", "snapkv-prompt", "snapkv", "streaming")


def make_trial(tokenizer, rng: random.Random, prose_tokens: int):
    """(prompt ids, prose ids, question ids, key): one user turn holding the key, then the prose, then the
    question; the prose is fed in chunks and the question (with the rest of the turn) is asked on forks."""
    from agentloop.evals.text import prose_ids

    key = str(rng.randint(10000, 99999))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "@@CONTEXT@@\n\n" + QUESTION}],
                                             tokenize=False, add_generation_prompt=True)
    before, after = rendered.split("@@CONTEXT@@")
    prose = prose_ids(tokenizer, prose_tokens, start_essay=rng.randrange(49))
    return _encode(tokenizer, before + NEEDLE.format(key=key) + "\n\n"), prose, _encode(tokenizer, after + ANSWER_PREFIX), key


def _encode(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def run_trial(loaded, policy, cap: str, prompt, prose, question, key, args, ask_at: list[int] | None = None):
    """Ingest the prose chunk by chunk and ask the question on a fork of the run: after each of the policy's first
    `max_k` actions (ask_at None), or after the given chunk indices (the first policy's schedule, so that every
    policy is asked after the same amount of text). Returns ([(chunk index, record)], peak bytes, cap bytes); each
    record holds `peak_slots`, the most slots the run held so far (after a chunk's forward, before any compaction)."""
    from agentloop import Session

    session = Session(loaded, cap=cap, policy=policy, prefill_chunk=args.chunk)
    list(session.feed(prompt))
    asked, peak_slots = [], session.cache.physical_len
    for index, start in enumerate(range(0, len(prose), args.chunk)):
        actions_before = session.policy_actions
        list(session.feed(prose[start:start + args.chunk]))
        peak_slots = max(peak_slots, session.cache.physical_len)
        if (index in ask_at) if ask_at is not None else session.policy_actions > actions_before:
            text = answer(session.fork(), question, args.answer_tokens)
            asked.append((index, {"correct": correct(text, key), "answer": text, "actions": session.policy_actions,
                                  "logical": session.cache.logical_len, "physical": session.cache.physical_len,
                                  "peak_slots": peak_slots}))
            if len(asked) == (len(ask_at) if ask_at is not None else args.max_k):
                break
    return asked, session.peak_bytes, session.cap_bytes


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, whole

    parser = EvalParser(prog="agentloop eval passkey-online", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trials", type=count, default=20)
    parser.add_argument("--mem-cap", default="256tok")
    parser.add_argument("--max-k", type=count, default=8, help="compactions to go through")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    parser.add_argument("--chunk", type=count, default=32, help="prose ingested per forward")
    parser.add_argument("--prose-tokens", type=count, default=2400, help="prose available after the key")
    parser.add_argument("--answer-tokens", type=count, default=8)
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="keep the trials already in evals/results/<name>.json (same settings) and run the rest")
    add_output_options(parser, "passkey_online")
    args = parser.parse_args(argv)
    argv = [a for a in argv or [] if a != "--resume"]

    from agentloop.evals import load_eval_model
    from agentloop.evals.online_fidelity import policy_for

    loaded = load_eval_model(args.model)
    rng = random.Random(args.seed)
    records = _earlier_records(args) if args.resume else []
    done = {r["trial"] for r in records}
    for trial in range(args.trials):
        prompt, prose, question, key = make_trial(loaded.tokenizer, rng, args.prose_tokens)
        if trial in done:  # made anyway: the random stream of the later trials stays the same
            continue
        ask_at = None  # the first policy's action points, then reused for the others
        for name in args.policies:
            tic = time.perf_counter()
            uncapped = name == "full"  # the same text and questions without a cap: what the model can do at all
            asked, peak, cap_bytes = run_trial(loaded, None if uncapped else policy_for(name, args.seed + trial),
                                               None if uncapped else args.mem_cap, prompt, prose, question, key, args,
                                               ask_at)
            ask_at = ask_at or [index for index, _ in asked]
            records += [{"trial": trial, "policy": name, "k": k, "key": key, "peak_bytes": peak, "cap_bytes": cap_bytes,
                         **r} for k, (_, r) in enumerate(asked, 1)]
            print(f"trial {trial} {name:12s} " + "".join("+" if r["correct"] else "." for _, r in asked)
                  + f" ({time.perf_counter() - tic:.0f}s)", flush=True)
        if not args.no_write:
            _report(args, records, argv)
    print(_report(args, records, argv))
    return 0


def _earlier_records(args) -> list[dict]:
    """The records of an earlier run of the same settings (--resume), complete trials only."""
    from agentloop.evals import earlier_records

    same = ("model", "mem_cap", "max_k", "policies", "chunk", "prose_tokens", "answer_tokens", "seed")
    return earlier_records(args, same, lambda r: r["trial"], len(args.policies) * args.max_k)


def _report(args, records: list[dict], argv: list[str] | None) -> str:
    from agentloop.evals import results_dir, write_results
    from agentloop.evals.online_fidelity import PROMPT_LEGEND

    trials = len({r["trial"] for r in records})
    ks = list(range(1, args.max_k + 1))
    summary = {}
    for name in args.policies:
        for k in ks:
            sel = [r for r in records if r["policy"] == name and r["k"] == k]
            hits = sum(r["correct"] for r in sel)
            digits = [digits_recalled(r["answer"], r["key"]) for r in sel]
            summary.setdefault(name, {})[str(k)] = {"accuracy": hits / len(sel) if sel else None, "n": len(sel),
                                                    "ci95": wilson(hits, len(sel)),
                                                    "digits": sum(digits) / len(sel) if sel else None}
    over_cap = [r for r in records if r["cap_bytes"] is not None and r["peak_bytes"] > r["cap_bytes"]]
    lines = [f"# Pass key through k online compactions ({args.model}, cap {args.mem_cap})", "",
             (f"{trials} trials; a five-digit pass key in the first user turn, then prose ingested in "
              f"{args.chunk}-token chunks; the question is asked (on a fork of the run) right after the k-th "
              f"compaction of `{args.policies[0]}`, and every other policy is asked after the same amount of text. "
              f"Runs whose peak cache bytes exceeded the cap: {len(over_cap)}.")]
    for metric in ("accuracy", "digits"):
        if metric == "digits":
            lines += ["", digits_heading()]
        lines += [""] + metric_table(summary, args.policies, ks, [f"k={k}" for k in ks], "policy", metric)
    command = ("agentloop eval passkey-online " + " ".join(argv or [])).strip()
    lines += ["", ("`full` = no cap (same text, same questions); `am-repeat` = Attention Matching at ratio 0.5 with "
                   "repeat-prefill queries, re-reading at each compaction only the text added since the previous one "
                   "(`-all`: re-reading the whole context, the paper's protocol); `am-both` = with repeat and "
                   "recorded queries (the `am` default); "
                   "`am-recorded` = with the newest 256 tokens' queries; `h2o`/`snapkv` = eviction at the same "
                   f"schedule; {PROMPT_LEGEND}; `streaming` = 4 sinks + recent window (evicts 32 slots at a time; "
                   "the key leaves its window at the first eviction)."), "",
              f"95% Wilson intervals and every answer are in {args.name}.json. Reproduce: `{command}`"]
    text = "\n".join(lines)
    if not args.no_write:
        write_results(args.name, {"benchmark": "passkey-online", "config": vars(args), "trials": trials,
                                         "summary": summary, "records": records, "command": command}, text)
        _plot(summary, args.policies, ks, results_dir() / f"{args.name}.png", args.mem_cap)
    return text


def _plot(summary, policies, ks, path, cap) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in policies:
        points = [(k, summary[name][str(k)]["accuracy"]) for k in ks if summary[name][str(k)]["accuracy"] is not None]
        ax.plot([k for k, _ in points], [a for _, a in points], "-o" if name.startswith("am") else "--s", label=name)
    ax.set_xlabel(f"compactions of {policies[0]} so far (k)")
    ax.set_ylabel("pass key accuracy")
    ax.set_title(f"Pass key through compactions, cap {cap}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # evals that plot after every trial would otherwise keep every figure open
