"""Passkey retrieval after one-shot compaction of the context, per method and ratio, next to the full cache.

Each trial hides a five-digit pass key at a random depth of 1k-3k tokens of real prose (Paul Graham essays)
inside a user turn that ends with a question about it. The context span alone is compacted (the chat
template around it stays verbatim), then the question is prefilled and the model answers greedily.
A trial is correct when the answer contains the pass key.
"""

from __future__ import annotations

import math
import random
import re
import time

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"  # prefilled as the start of the answer, so the model states the key
DEFAULT_METHODS = ("am-hak-fast", "am-hak", "am-omp-fast", "am-omp", "h2o", "snapkv", "streaming", "random")
SAMPLED_DRAFT = "25% of rows; sampled draft of 16 tokens"  # how question-aware runs read the question before the greedy draft


def make_trial(tokenizer, rng: random.Random, min_tokens: int, max_tokens: int):
    """(prefix ids, context ids, suffix ids, key) for one trial."""
    from agentloop.evals.text import prose_ids

    key = str(rng.randint(10000, 99999))
    haystack = tokenizer.decode(prose_ids(tokenizer, rng.randint(min_tokens, max_tokens), start_essay=rng.randrange(49)))
    cut = int(rng.random() * len(haystack))
    boundary = haystack.rfind(". ", 0, cut)  # hide the needle between two sentences
    boundary = boundary + 1 if boundary >= 0 else 0
    context = haystack[:boundary] + NEEDLE.format(key=key) + haystack[boundary:].lstrip()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "@@CONTEXT@@\n\n" + QUESTION}],
                                             tokenize=False, add_generation_prompt=True)
    before, after = rendered.split("@@CONTEXT@@")
    def encode(text):
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return encode(before), encode(context), encode(after + ANSWER_PREFIX), key


def task_queries_setting() -> str:
    """How question-aware compaction reads the question, as recorded in a run's config (--resume compares it)."""
    from agentloop.compaction.span import TASK_DRAFT, TASK_SHARE

    return f"{TASK_SHARE:.0%} of rows; greedy draft of up to {TASK_DRAFT} tokens"


def correct(answer: str, key: str) -> bool:
    return key in re.findall(r"\d+", answer)


def digits_recalled(answer: str, key: str) -> float:
    """Share of the key's digits the best number in `answer` gets right in order (5 of 5 = the key itself;
    "7369" for 73691 is 4 of 5): shows a key that is partly kept when the exact answer fails."""
    from difflib import SequenceMatcher

    matched = [sum(b.size for b in SequenceMatcher(None, key, n, autojunk=False).get_matching_blocks())
               for n in re.findall(r"\d+", answer)]
    return max(matched, default=0) / len(key)


def answer(session, suffix: list[int], max_new_tokens: int) -> str:
    from agentloop import GenerationSettings

    for _ in session.feed(suffix):
        pass
    events = list(session.generate(GenerationSettings(max_new_tokens=max_new_tokens)))
    return events[-1].text


def answers_after_compaction(loaded, prefix: list[int], context: list[int], suffix: list[int], args, seed: int):
    """Yield (method, ratio, answer, compaction seconds) after prefilling prefix + context: the full cache's answer
    first ("full", 1, answer, None), then, for each of args.methods and args.ratios, the answer after compacting the
    context span of a fresh copy (`args`: methods, ratios, max_queries, question_aware, answer_tokens)."""
    from agentloop import Session
    from agentloop.compaction.span import compact_span

    base = Session(loaded)
    for _ in base.feed(prefix + context, record=True):
        pass
    yield "full", 1, answer(base.fork(), suffix, args.answer_tokens), None
    memo: dict[str, dict] = {}  # query sources collected once per context, shared by every method and ratio
    start, end = len(prefix), len(prefix) + len(context)
    for label, method, part_budgets in variants(args):
        for ratio in args.ratios:
            session = base.fork()
            stats = compact_span(session, start, end, 1.0 / ratio, method=method, context_ids=context, memo=memo,
                                 max_queries=args.max_queries, seed=seed, chunk=getattr(args, "chunk", 0) or None,
                                 part_budgets=part_budgets, task_ids=suffix if args.question_aware else None)
            yield label, ratio, answer(session, suffix, args.answer_tokens), round(sum(stats.seconds.values()), 2)


def variants(args) -> list[tuple[str, str, str]]:
    """(row label, method, part budgets) per compaction compared: a method per part-budget setting, labelled
    "method/setting" when several are compared."""
    settings = getattr(args, "part_budgets", ["attention"])
    return [(method if len(settings) == 1 else f"{method}/{setting}", method, setting)
            for method in args.methods for setting in settings]


def digits_heading(note: str = "") -> str:
    return (f"Digits of the key recalled in order (mean share; {note}a number unrelated to the key scores about "
            "0.1-0.2 by chance):")


def metric_table(summary: dict, rows: list[str], columns: list, labels: list[str], first: str, metric: str) -> list[str]:
    """Markdown rows of summary[row][str(column)][metric]: accuracy as a percentage, digits as a share, — if missing."""
    lines = [f"| {first} | " + " | ".join(labels) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [summary[row][str(c)][metric] for c in columns]
        lines.append(f"| {row} | " + " | ".join("—" if v is None else f"{v:.0%}" if metric == "accuracy" else f"{v:.2f}"
                                                 for v in cells) + " |")
    return lines


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main(argv: list[str] | None = None) -> int:
    from agentloop.compaction.span import PART_BUDGETS
    from agentloop.evals import EvalParser, add_output_options, add_query_option, count, whole

    parser = EvalParser(prog="agentloop eval passkey", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trials", type=count, default=50)
    parser.add_argument("--min-tokens", type=count, default=1000)
    parser.add_argument("--max-tokens", type=count, default=3000)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--ratios", nargs="+", type=count, default=[2, 5, 10, 20, 50])
    add_query_option(parser)
    parser.add_argument("--question-aware", action="store_true",
                        help="compact knowing the question: its queries and those of the model's draft answer "
                             "(on the full cache) hold a quarter of the fitting rows (compact_span(..., "
                             "task_ids=question)); default: the compaction does not see the question")
    parser.add_argument("--chunk", type=whole, default=0,
                        help="compact the context in chunks of about this many tokens (0: in one piece)")
    parser.add_argument("--part-budgets", nargs="+", choices=PART_BUDGETS, default=["attention"],
                        help="how a chunked compaction shares each head's slots over the chunks: by the queries' "
                             "attention or by length (several: each is a row, compared on the same trials)")
    parser.add_argument("--answer-tokens", type=count, default=8)
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="keep the trials already in evals/results/<name>.json (same settings) and run the rest")
    add_output_options(parser, "passkey")
    args = parser.parse_args(argv)
    if args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens ({args.min_tokens}) is larger than --max-tokens ({args.max_tokens})")
    argv = [a for a in argv or [] if a != "--resume"]
    args.task_queries = task_queries_setting() if args.question_aware else None

    from agentloop.evals import load_eval_model

    records = _earlier_records(args) if args.resume else []
    done = {r["trial"] for r in records}
    loaded = load_eval_model(args.model)
    rng = random.Random(args.seed)
    for trial in range(args.trials):
        tic = time.perf_counter()
        prefix, context, suffix, key = make_trial(loaded.tokenizer, rng, args.min_tokens, args.max_tokens)
        if trial in done:  # made anyway: the random stream of the later trials stays the same
            continue
        for method, ratio, text, seconds in answers_after_compaction(loaded, prefix, context, suffix, args,
                                                                     args.seed + trial):
            records.append({"trial": trial, "method": method, "ratio": ratio, "tokens": len(context), "key": key,
                            "answer": text, "correct": correct(text, key),
                            **({} if seconds is None else {"compact_s": seconds})})
        done = [r for r in records if r["trial"] == trial]
        print(f"trial {trial}: {len(context)} tokens, full {'ok' if done[0]['correct'] else 'miss'}, "
              f"compacted {sum(r['correct'] for r in done[1:])}/{len(done) - 1} ok ({time.perf_counter() - tic:.0f}s)",
              flush=True)
        if not args.no_write:
            _report(args, records, argv)

    print(_report(args, records, argv))
    return 0


def _earlier_records(args) -> list[dict]:
    """The records of an earlier run of the same settings (--resume), complete trials only."""
    from agentloop.evals import earlier_records

    same = ("model", "min_tokens", "max_tokens", "methods", "ratios", "max_queries", "answer_tokens", "seed",
            "question_aware", "task_queries", "chunk", "part_budgets")
    # settings that runs from before they were recorded did not name: what the code did then
    older = {"question_aware": False, "task_queries": SAMPLED_DRAFT if args.question_aware else None, "chunk": 0,
             "part_budgets": ["attention"]}
    return earlier_records(args, same, lambda r: r["trial"], 1 + len(variants(args)) * len(args.ratios), older)


def _report(args, records: list[dict], argv: list[str] | None) -> str:
    """Summary table of the trials so far; written to evals/results after every trial (unless --no-write)."""
    from agentloop.compaction.span import TASK_DRAFT, TASK_SHARE
    from agentloop.evals import describe_queries, results_dir, write_results

    trials = len({r["trial"] for r in records})
    summary = {}
    labels = [label for label, _, _ in variants(args)]
    for method in ["full", *labels]:
        for ratio in ([1] if method == "full" else args.ratios):
            sel = [r for r in records if r["method"] == method and r["ratio"] == ratio]
            k = sum(r["correct"] for r in sel)
            digits = sum(digits_recalled(r["answer"], r["key"]) for r in sel) / len(sel)
            summary.setdefault(method, {})[str(ratio)] = {"accuracy": k / len(sel), "n": len(sel),
                                                          "ci95": wilson(k, len(sel)), "digits": digits}
    full_acc = summary["full"]["1"]["accuracy"]
    aware = getattr(args, "question_aware", False)
    when = (f"the context span is compacted knowing the question (its queries and those of a greedy draft answer "
            f"of up to {TASK_DRAFT} tokens, read on the full cache, hold {TASK_SHARE:.0%} of the fitting rows), then "
            "the question is asked" if aware else
            "the context span is compacted, then the question is asked")
    if getattr(args, "chunk", 0):
        when += (f" (in chunks of about {args.chunk} tokens, each head's slots shared over them by "
                 + " or by ".join(args.part_budgets) + ")")
    lines = [f"# Passkey retrieval after one-shot compaction{', question-aware' if aware else ''} ({args.model})", "",
             (f"{trials} trials; a five-digit pass key at a random depth of {args.min_tokens}-{args.max_tokens} tokens "
              f"of prose; {when}. Uncompacted cache: **{full_acc:.0%}**. Reference queries per KV head: "
              f"{describe_queries(args.max_queries)}. "
              "Accuracy per method and ratio:")]
    for metric in ("accuracy", "digits"):
        if metric == "digits":
            lines += ["", digits_heading(f"uncompacted {summary['full']['1']['digits']:.2f}; ")]
        lines += [""] + metric_table(summary, labels, args.ratios, [f"{r}x" for r in args.ratios], "method", metric)
    command = ("agentloop eval passkey " + " ".join(argv or [])).strip()
    lines += ["", f"95% Wilson intervals and every answer are in {args.name}.json. Reproduce: `{command}`"]
    text = "\n".join(lines)
    if not args.no_write:
        write_results(args.name, {"benchmark": "passkey", "config": vars(args), "trials": trials, "summary": summary,
                                  "records": records, "command": command}, text)
        _plot(summary, labels, args.ratios, full_acc, results_dir() / f"{args.name}.png")
    return text


def _plot(summary, methods, ratios, full_acc, path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(full_acc, color="black", lw=1, label="uncompacted")
    for m in methods:
        style = "-o" if m.startswith("am-") else "--s"
        ax.plot(ratios, [summary[m][str(r)]["accuracy"] for r in ratios], style, label=m)
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r}x" for r in ratios])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("compaction ratio")
    ax.set_ylabel("passkey accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # evals that plot after every trial would otherwise keep every figure open
