"""Tool-output compaction on ingestion: can the agent still find a fact in a long tool result it compacted?

Each trial hides a five-digit pass key ("The pass key is NNNNN. Remember it. NNNNN is the pass key.") at a
random depth of a 2k-4k-token tool result (real prose: Paul Graham essays; `--source code`: Python files of
an installed package), plus a few trials at 8k. The conversation is the agent's own: the user asks to read a
file, the assistant calls read_file, the result arrives as a tool turn (rendered by agentloop.agent.ChatFormat)
and is ingested exactly as the agent does it (agentloop.ingest.ingest_result: pieces of at most 2,048 tokens,
each compacted right after its prefill; the first and last 16 tokens verbatim, the rest to 1/ratio with
am-hak-fast, queries from a repeat-prefill of the piece itself).
Then the user asks "What is the pass key? Answer with the number only.", the answer is prefilled with "The
pass key is" and 8 tokens are decoded greedily; correct when the key is among the numbers in the answer.

Conditions: the whole result; AM compaction on ingestion at 2x/5x/10x; truncation at the same ratios (the
result's head and tail kept verbatim in as many slots as the compacted result; no β, so slightly fewer
bytes). Memory held is the cache right after ingestion, before the question.

With --task-first the user asks the question up front ("Read notes.txt, then answer: ...") and a further
condition, `am-task`, ingests as the agent does with `memory.ingest.task_queries: true`: the pending request
and the model's draft reply to it hold a quarter of the fitting rows. Further conditions by name (`--conditions`):
`am-ss`, `am-task-ss` (self-study queries too), `am-task-pool` (max-pooled key selection), `am-task-values` (β = 0,
values fitted), `snapkv` and
`snapkv-task` (SnapKV-style eviction, without and with the pending request), see CONDITIONS.
With `--piece-budgets even joint` each AM condition also runs with joint piece budgets (`CONDITION+joint`: each
piece compacted together with the earlier pieces' slots, memory.ingest.piece_budgets), on the same trials.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"
READ_CALL = '<tool_call>{"name": "read_file", "arguments": {"path": "notes.txt"}}</tool_call>'


def haystack(tokenizer, rng: random.Random, n_tokens: int, source: str) -> str:
    """About `n_tokens` of prose or Python source, starting at a random essay or file."""
    if source == "prose":
        from agentloop.evals.text import prose_ids

        return tokenizer.decode(prose_ids(tokenizer, n_tokens, start_essay=rng.randrange(49)))
    import rich

    files = sorted(Path(rich.__file__).parent.rglob("*.py"))
    k, ids = rng.randrange(len(files)), []
    while len(ids) < n_tokens:
        ids += tokenizer(files[k % len(files)].read_text() + "\n\n", add_special_tokens=False)["input_ids"]
        k += 1
    return tokenizer.decode(ids[:n_tokens])


def request(task_first: bool) -> str:
    """The user's first message: read the file (and, with the task first, what to find in it)."""
    return f"Read notes.txt, then answer: {QUESTION}" if task_first else "Read notes.txt."


def make_trial(tokenizer, rng: random.Random, n_tokens: int, source: str, task_first: bool = False):
    """(ids before the result, the result's ids, ids of the question and answer prefix, key, depth)."""
    from agentloop.agent import ChatFormat
    from agentloop.tools import make_read_file

    key = str(rng.randint(10000, 99999))
    text = haystack(tokenizer, rng, n_tokens, source)
    depth = rng.random()
    boundary = text.rfind("\n" if source == "code" else ". ", 0, int(depth * len(text))) + 1
    needle = f"# {NEEDLE.format(key=key)}\n" if source == "code" else f" {NEEDLE.format(key=key)} "
    result = text[:boundary] + needle + text[boundary:].lstrip(" ")
    chat = ChatFormat(tokenizer, [make_read_file(Path(".")).schema()])
    rendered = chat.render([{"role": "user", "content": request(task_first)}, {"role": "assistant", "content": READ_CALL},
                            {"role": "tool", "content": "@@RESULT@@"}, {"role": "user", "content": QUESTION}])
    before, after = rendered.split("@@RESULT@@")
    return chat.encode(before), chat.encode(result), chat.encode(after + ANSWER_PREFIX), key, depth


def truncate_result(session, n_result: int, keep: int) -> None:
    """Keep the first keep//2 and the last keep - keep//2 slots of the newest `n_result` slots; drop the rest."""
    import torch

    cache = session.cache
    end = cache.physical_len
    start, head = end - n_result, keep // 2
    kept = torch.cat([torch.arange(0, start + head), torch.arange(end - (keep - head), end)])
    for layer in cache.compactable:
        cache.keep(layer, kept.to(cache.layers[layer].keys.device))


def answer(session, suffix: list[int], max_new_tokens: int) -> str:
    from agentloop import GenerationSettings

    for _ in session.feed(suffix):
        pass
    return list(session.generate(GenerationSettings(max_new_tokens=max_new_tokens)))[-1].text


def correct(text: str, key: str) -> bool:
    return key in re.findall(r"\d+", text)


def _measure(session, suffix: list[int], key: str, answer_tokens: int) -> dict:
    """The cache held after ingestion, then the answer to the question and whether it is right."""
    held = session.cache.held_bytes()
    text = answer(session, suffix, answer_tokens)
    return {"cache_bytes": held, "answer": text, "correct": correct(text, key)}


CONDITIONS = {  # name: (compaction method, reads the pending task), "truncate" is the baseline
    "am": ("am-hak-fast", False),  # queries: the re-read of the piece
    "am-ss": ("am-hak", False),  # the re-read + self-study (the model's answers to study prompts about the piece),
    # with --task-pin the tokens where the study questions look are kept as they are
    "am-task": ("am-hak-fast", True),  # the re-read + the pending request and the model's draft reply
    "am-task-ss": ("am-hak", True),  # all three
    "am-task-pool": ("am-hak-pool", True),  # am-task with selection scores max-pooled over 7 positions
    "am-task-values": ("am-values", True),  # am-task with β = 0 (only the values fitted)
    "snapkv": ("snapkv", False),  # eviction by attention from self-study queries (max-pooled), original values
    "snapkv-task": ("snapkv", True),  # ... and from the pending request with the model's draft reply
}


def main(argv: list[str] | None = None) -> int:
    from agentloop.compaction.span import TASK_SHARE
    from agentloop.evals import EvalParser, add_output_options, add_query_option, count, earlier_records, whole
    from agentloop.ingest import TASK_PIN

    parser = EvalParser(prog="agentloop eval ingestion", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--source", choices=["prose", "code"], default="prose")
    parser.add_argument("--trials", type=count, default=20, help="trials at min-tokens..max-tokens")
    parser.add_argument("--min-tokens", type=count, default=2000)
    parser.add_argument("--max-tokens", type=count, default=4000)
    parser.add_argument("--ratios", nargs="+", type=count, default=[2, 5, 10])
    parser.add_argument("--long-trials", type=whole, default=4, help="trials at --long-tokens (0 = none)")
    parser.add_argument("--long-tokens", type=count, default=8000)
    parser.add_argument("--long-ratios", nargs="+", type=count, default=[2, 5, 10])
    parser.add_argument("--keep", type=whole, default=16, help="keep_first = keep_last")
    parser.add_argument("--piece-tokens", type=count, default=2048)
    parser.add_argument("--chunk-tokens", type=whole, default=0, help="compact each piece in chunks of this many tokens "
                        "(0: each piece as one block, the default of memory.ingest.chunk_tokens)")
    add_query_option(parser)
    parser.add_argument("--task-first", action="store_true",
                        help="the user asks the question before the file is read (the pending task the agent knows "
                             "when the result arrives)")
    parser.add_argument("--conditions", nargs="+", choices=[*CONDITIONS, "truncate"],
                        help="compaction conditions next to `whole` (default: am, am-ss and truncate; with "
                             "--task-first also am-task)")
    parser.add_argument("--task-share", type=float, default=TASK_SHARE,
                        help=f"share of the fitting rows held by the task's queries (default {TASK_SHARE})")
    parser.add_argument("--task-pin", type=whole, default=TASK_PIN,
                        help="tokens of each piece where the task's queries look (with their neighbours) kept in "
                             f"every head with their original keys and values (default {TASK_PIN})")
    parser.add_argument("--pin-numbers", action="store_true",
                        help="keep every number of the result (with the tokens that lead to it) in every head with "
                             "its original keys and values, task or not (memory.ingest.pin_numbers)")
    parser.add_argument("--piece-budgets", nargs="+", choices=["even", "joint"], default=["even"],
                        help="how a result in several pieces shares its slots (memory.ingest.piece_budgets); with both, "
                        "every compacting condition runs both ways")
    parser.add_argument("--study-seconds", type=float, default=None, help="the most seconds the self-study of a piece "
                        "may take (memory.ingest.study_seconds; default: no limit)")
    parser.add_argument("--answer-tokens", type=count, default=8)
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the trials already in the results file "
                        "(same settings) and run the rest")
    add_output_options(parser, "ingestion")
    args = parser.parse_args(argv)
    if args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens ({args.min_tokens}) is larger than --max-tokens ({args.max_tokens})")
    if not 0 < args.task_share < 1:
        parser.error(f"--task-share must be between 0 and 1, got {args.task_share}")
    args.conditions = args.conditions or ["am", "am-ss", *["am-task"] * args.task_first, "truncate"]

    from agentloop import Session
    from agentloop.compaction.queries import turn_ids
    from agentloop.evals import load_eval_model
    from agentloop.ingest import ingest_result
    from agentloop.task import IngestSpec

    loaded = load_eval_model(args.model)
    # the agent's task_ids: the pending request as a new turn (agent._ingest); without --task-first it says only
    # "Read notes.txt.", as an agent's request would if the question came later
    pending = turn_ids(loaded.tokenizer, request(args.task_first))
    rng = random.Random(args.seed)
    short, long = f"{args.min_tokens}-{args.max_tokens} tok", f"{args.long_tokens} tok"
    plan = [(short, args.ratios)] * args.trials + [(long, args.long_ratios)] * args.long_trials
    same = ("model", "source", "min_tokens", "max_tokens", "long_tokens", "keep", "piece_tokens", "chunk_tokens",
            "max_queries", "task_first", "task_share", "task_pin", "pin_numbers", "answer_tokens", "seed",
            "conditions", "piece_budgets", "study_seconds")
    runs = sum(len(args.piece_budgets) if c != "truncate" else 1 for c in args.conditions)  # rows per ratio
    per_trial = {group: 1 + len(ratios) * runs for group, ratios in plan}
    records = earlier_records(args, same, lambda r: r["trial"], lambda r: per_trial[r["group"]],
                              older={"task_pin": 0, "pin_numbers": False, "piece_budgets": ["even"],
                                     "study_seconds": None}) if args.resume else []
    done = {r["trial"] for r in records}
    for trial, (group, ratios) in enumerate(plan):
        tic = time.perf_counter()
        n_tokens = rng.randint(args.min_tokens, args.max_tokens) if group == short else args.long_tokens
        prefix, result, suffix, key, depth = make_trial(loaded.tokenizer, rng, n_tokens, args.source, args.task_first)
        if trial in done:  # the trial's text is drawn all the same, so later trials are the ones a full run has
            continue
        base = Session(loaded)
        list(base.feed(prefix))
        whole = base.fork()
        clock = time.perf_counter()
        list(whole.feed(result))
        whole_s = time.perf_counter() - clock
        row = {"trial": trial, "group": group, "tokens": len(result), "depth": round(depth, 3), "key": key}
        measure = (suffix, key, args.answer_tokens)
        records.append({**row, "condition": "whole", "ratio": 1, "result_slots": len(result),
                        "ingest_s": round(whole_s, 2), **_measure(whole.fork(), *measure)})
        for ratio in ratios:
            slots = None
            for condition in args.conditions:
                if condition == "truncate":
                    continue
                method, reads_task = CONDITIONS[condition]
                for budgets in args.piece_budgets:
                    spec = IngestSpec(trigger_tokens=2 * args.keep + 2, ratio=1 / ratio, keep_first=args.keep,
                                      keep_last=args.keep, piece_tokens=args.piece_tokens, method=method,
                                      chunk_tokens=args.chunk_tokens or None, max_queries=args.max_queries,
                                      pin_numbers=args.pin_numbers, piece_budgets=budgets,
                                      study_seconds=args.study_seconds)
                    session = base.fork()
                    clock = time.perf_counter()
                    pieces = [item for item in ingest_result(session, result, spec, pending if reads_task else [],
                                                             seed=args.seed + trial, task_share=args.task_share,
                                                             task_pin=args.task_pin)
                              if isinstance(item, dict)]
                    ingest_s = time.perf_counter() - clock
                    slots = pieces[-1]["result_slots"]
                    records.append({**row, "condition": condition, "piece_budgets": budgets, "ratio": ratio,
                                    "result_slots": slots, "pieces": len(pieces),
                                    "compact_s": round(sum(p["seconds"] for p in pieces), 2),
                                    "ingest_s": round(ingest_s, 2),
                                    "output_error": sum(p["output_error"] for p in pieces) / len(pieces),
                                    **_measure(session, *measure)})
            if "truncate" in args.conditions:
                slots = slots or _compacted_slots(len(result), ratio, args)
                session = whole.fork()
                truncate_result(session, len(result), slots)
                records.append({**row, "condition": "truncate", "ratio": ratio, "result_slots": slots,
                                "ingest_s": round(whole_s, 2), **_measure(session, *measure)})
        mine = [r for r in records if r["trial"] == trial]
        marks = " ".join(f"{row_name(r)}{'' if r['condition'] == 'whole' else ' ' + str(r['ratio']) + 'x'} "
                         f"{'ok' if r['correct'] else 'miss'}" for r in mine)
        print(f"trial {trial} ({group}): {len(result):,} tokens, key at {depth:.0%}: {marks} "
              f"({time.perf_counter() - tic:.0f}s)", flush=True)
        if not args.no_write:
            _report(args, records, argv)
    print(_report(args, records, argv))
    return 0


def row_name(record: dict) -> str:
    """A record's row name: its condition, `+joint` when its pieces were compacted jointly."""
    return record["condition"] + ("+joint" if record.get("piece_budgets") == "joint" else "")


def _compacted_slots(n_result: int, ratio: int, args) -> int:
    """The slots a result compacted on ingestion holds (its verbatim ends plus each piece's middle / ratio), for a
    truncation run without an AM condition next to it."""
    pieces = -(-n_result // args.piece_tokens)
    middles = n_result - 2 * args.keep
    return 2 * args.keep + sum(max(1, round(middles / pieces / ratio)) for _ in range(pieces))


def _report(args, records: list[dict], argv: list[str] | None) -> str:
    """Accuracy and memory per condition; written to evals/results after every trial (unless --no-write)."""
    from agentloop.compaction.span import NUMBER_LEAD, TASK_WINDOW
    from agentloop.evals import results_dir, write_results
    from agentloop.evals.passkey import wilson
    from agentloop.memcap import format_bytes

    groups = list(dict.fromkeys(r["group"] for r in records))  # short results first, then long ones
    present = {(row_name(r), r["ratio"]) for r in records}
    names = [name for c in CONDITIONS for name in (c, c + "+joint")] + ["truncate"]
    conditions = [("whole", 1)] + [(c, r) for r in sorted({r["ratio"] for r in records} - {1})
                                   for c in names if (c, r) in present]
    summary = {}
    for condition, ratio in conditions:
        for group in groups:
            sel = [r for r in records if (row_name(r), r["ratio"], r["group"]) == (condition, ratio, group)]
            if sel:
                k = sum(r["correct"] for r in sel)
                summary.setdefault(f"{condition} {ratio}x", {})[group] = {
                    "accuracy": k / len(sel), "n": len(sel), "ci95": wilson(k, len(sel)),
                    "cache_bytes": sum(r["cache_bytes"] for r in sel) / len(sel),
                    "result_slots": sum(r["result_slots"] for r in sel) / len(sel),
                    **({"ms_per_token": 1000 * sum(r["ingest_s"] for r in sel) / sum(r["tokens"] for r in sel)}
                       if all("ingest_s" in r for r in sel) else {})}
    trials = len({r["trial"] for r in records})
    chunks = f" in chunks of {args.chunk_tokens} tokens" if args.chunk_tokens else ""
    first = getattr(args, "task_first", False)
    asked = ("The user asks the question before the file is read and again after it. " if first else
             "The user asks the question only after the file is read. ")
    share, pin = getattr(args, "task_share", None), getattr(args, "task_pin", 0)
    task = (f"the re-read and the pending request with the model's draft reply ({share:.0%} of the rows; "
            "memory.ingest.task_queries)" + (f"; the {pin} tokens where they look, with up to {TASK_WINDOW[0]} before "
                                             f"and {TASK_WINDOW[1]} after each, kept in every head with their original "
                                             "keys and values" if pin else "") if share else "")
    snapkv = ("eviction by attention (max-pooled over 7 positions) from self-study queries, the kept keys' original "
              "values (`snapkv`)")
    named = {"am": "the re-read of the piece (`am-hak-fast`)", "am-ss": "the re-read and self-study (`am-hak`)" + (
                 f", the {pin} tokens where the study questions look kept with their original keys and values"
                 if pin else ""),
             "am-task": task, "am-task-ss": "self-study, the re-read and the pending request",
             "am-task-pool": task + "; the key selection's scores max-pooled over 7 positions (`am-hak-pool`)",
             "am-task-values": task + "; β = 0, only the kept keys' values fitted (`am-values`)",
             "snapkv": snapkv, "snapkv-task": snapkv + (f", and the pending request with the model's draft reply "
                                                        f"({share:.0%} of the rows)" if share else "")}
    present_names = [c for c in CONDITIONS if any(r["condition"] == c for r in records)]
    asked += "Fitting queries: " + "; ".join(f"`{c}` {named[c]}" for c in present_names) + ". "
    if any(r.get("piece_budgets") == "joint" for r in records):
        asked += ("`+joint`: the same, each piece compacted together with the slots the earlier pieces hold, to the "
                  "slots all of them are due (memory.ingest.piece_budgets: joint); without it each piece is compacted "
                  "alone. ")
    if getattr(args, "study_seconds", None):
        asked += f"The self-study of a piece stops after {args.study_seconds:g} s (`study_seconds`). "
    if getattr(args, "pin_numbers", False):
        asked += (f"Every number of the result, with the {NUMBER_LEAD} tokens before it and the one after, is kept in "
                  "every head with its original keys and values (`pin_numbers`). ")
    lines = [f"# Passkey retrieval from a long tool result compacted on ingestion ({args.model}, {args.source})", "",
             (f"{trials} trials: a five-digit pass key at a random depth of a tool result of {' or '.join(groups)}ens "
              "(columns), read in an "
              f"agent conversation; the result is ingested in pieces of at most {args.piece_tokens} tokens, each "
              f"compacted right after its prefill{chunks} (first/last {args.keep} tokens of the result verbatim), "
              f"then the question is asked. {asked}`truncate` keeps the result's head and tail in as many slots as "
              "`am`. Accuracy (n) with its 95% Wilson interval, the cache held after ingestion, and the time to "
              "ingest the result (prefill and compaction) per token:"), "",
             "| condition | " + " | ".join(f"accuracy {g} | cache | ms/token" for g in groups) + " |",
             "|---|" + "---|---|---|" * len(groups)]

    def cell(c: dict) -> str:
        low, high = c["ci95"]
        speed = f"{c['ms_per_token']:.1f}" if "ms_per_token" in c else "-"
        return f"{c['accuracy']:.0%} ({c['n']}; {low:.0%}-{high:.0%}) | {format_bytes(c['cache_bytes'])} | {speed}"

    for name, by_group in summary.items():
        cells = [cell(by_group[g]) if g in by_group else "- | - | -" for g in groups]
        lines.append(f"| {name.replace(' 1x', '')} | " + " | ".join(cells) + " |")
    command = ("agentloop eval ingestion " + " ".join(argv or [])).strip()
    lines += ["", f"95% Wilson intervals and every answer are in {args.name}.json. Reproduce: `{command}`"]
    text = "\n".join(lines)
    if not args.no_write:
        write_results(args.name, {"benchmark": "ingestion", "config": vars(args), "trials": trials,
                                    "summary": summary, "records": records, "command": command}, text)
        _plot(summary, groups, results_dir() / f"{args.name}.png")
    return text


def _plot(summary: dict, groups: list[str], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for group, color in zip(groups, ("tab:blue", "tab:orange"), strict=False):
        whole = summary.get("whole 1x", {}).get(group)
        if whole:
            ax.axhline(whole["accuracy"], color=color, lw=1, ls=":", label=f"whole result ({group})")
        for condition, style in (("am", "-o"), ("am-ss", "-v"), ("am-task", "-^"), ("am-task-ss", "-D"),
                                 ("am-task-pool", "-P"), ("am-task-values", "-p"), ("snapkv", "-.x"),
                                 ("snapkv-task", "-.*"), ("truncate", "--s"), ("am+joint", ":o"), ("am-ss+joint", ":v"),
                                 ("am-task+joint", ":^"), ("am-task-ss+joint", ":D")):
            points = sorted((int(name.split()[1][:-1]), g[group]["accuracy"]) for name, g in summary.items()
                            if name.startswith(condition + " ") and group in g)
            if points:
                ax.plot(*zip(*points, strict=True), style, color=color, label=f"{condition} ({group})")
    ax.set_xscale("log")
    ticks = sorted({int(name.split()[1][:-1]) for name in summary if not name.startswith("whole")})
    ax.set_xticks(ticks, [f"{t}x" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("compaction ratio of the tool result")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # evals that plot after every trial would otherwise keep every figure open
