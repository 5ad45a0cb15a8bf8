"""AIME under a hard KV-cache cap: the paper's online-compaction protocol (arXiv 2602.16284, App. F.3).

Each problem is asked in the model's chat template (thinking enabled where the template supports it) and
decoded under the cap with the chosen memory policy until `</think>` or EOS, or until the run must stop: the
cap is reached and the policy declines (`none`, or `am` after --max-compactions), or --max-new-tokens.
Without a final answer by then, the forced-answer text is appended and 16 answer tokens are decoded greedily.
The cap is physical and hard, so the thinking phase runs under the cap less the room the answer phase needs
(forced text + 16 tokens), and the answer phase gets the full cap back.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from agentloop import Event, GenerationSettings, LoadedModel, MemCap, Session, parse_mem_cap
from agentloop.budget import plan
from agentloop.chat import encode_messages
from agentloop.errors import AgentloopError
from agentloop.policies import MemoryPolicy, make_policy

INSTRUCTION = ("Please think step by step. When you are ready to give your final answer, end your thinking "
               "and respond with only the numeric answer (an integer from 0 to 999).")
END_THINKING = "</think>"
FORCED_PREFIX = "\nI need to respond with the answer.\n</think>Final Answer: "
ANSWER_TOKENS = 16
PREFILL_CHUNK = 64  # small, so that a policy can compact a prompt longer than a tiny cap between chunks
PAPER_ROWS = [  # Qwen3-4B, AIME 2025 (/30), App. F.3: physical KV length, effective length, score, compactions
    ("2048", "2048", "1.25", "none"), ("4096", "4096", "7.75", "none"), ("8192", "8192", "13", "none"),
    ("2048", "4096", "8", "≤ 2"), ("2048", "8192", "13", "≤ 6"),
]


def load_problems(path: str, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file as {id, problem, answer}; the id is the row's `id`, else its index."""
    from agentloop.evals import read_jsonl

    problems = []
    for number, row in read_jsonl(path, "a 'problem' and an 'answer'"):
        if not isinstance(row, dict) or "problem" not in row or not str(row.get("answer", "")).strip().isdigit():
            raise AgentloopError(f"{path} line {number} lacks a 'problem' or an integer 'answer': each line must be "
                                 f"one JSON object with both")
        problems.append({"id": row.get("id", len(problems)), "problem": str(row["problem"]),
                         "answer": int(str(row["answer"]).strip())})
    if not problems:
        raise AgentloopError(f"{path} holds no problems: give a JSONL file with one problem a line")
    return problems[:limit]


def _last_integer(text: str) -> int | None:
    """The last whole number 0-999 in `text` (decimals and larger numbers are skipped)."""
    numbers = [n for n in re.findall(r"\d+(?:\.\d+)?", text.replace(",", "")) if "." not in n and int(n) <= 999]
    return int(numbers[-1]) if numbers else None


def parse_answer(text: str) -> int | None:
    """The last integer after the forced prefix; else the last integer \\boxed{}; else the last integer of the
    final answer (the text after `</think>`, or all of it when the model never thought aloud)."""
    if FORCED_PREFIX in text:
        forced = _last_integer(text.rpartition(FORCED_PREFIX)[2])
        if forced is not None:
            return forced
    boxed = [n for n in map(_last_integer, re.findall(r"\\boxed\{([^{}]*)\}", text)) if n is not None]
    if boxed:
        return boxed[-1]
    return _last_integer(text.rpartition(END_THINKING)[2])


def sampling(model: torch.nn.Module, greedy: bool) -> dict:
    """temperature/top_p/top_k from the model's generation_config when it samples; greedy otherwise."""
    config = getattr(model, "generation_config", None)
    if greedy or not getattr(config, "do_sample", False) or not getattr(config, "temperature", None):
        return {"temperature": 0.0}
    return {"temperature": config.temperature, "top_p": config.top_p or 1.0, "top_k": config.top_k or 0}


def thinking_slots(cache_slots: int, reserve: int) -> int:
    """The budget's cache slots less `reserve`: room kept free while the model thinks, so that the answer phase
    fits under the full cap."""
    if cache_slots <= reserve:
        raise AgentloopError(f"--mem-cap leaves no room to think: the answer phase alone needs {reserve} slots and the "
                             f"cap gives the cache {cache_slots}; raise --mem-cap")
    return cache_slots - reserve


def _drain(events: Iterable[Event], peak: int) -> tuple[Event | None, int]:
    """Run a feed/generate to its end; returns (its last event, the peak physical length seen)."""
    last = None
    for last in events:
        peak = max(peak, getattr(last, "physical_len", 0))
    return last, peak


def solve(loaded: LoadedModel, prompt_ids: list[int], forced_ids: list[int], cap: MemCap | None,
          policy: MemoryPolicy, settings: GenerationSettings) -> dict:
    """Think under the cap less the answer's room, then answer (forced if need be) under the full cap."""
    reserve = len(forced_ids) + ANSWER_TOKENS
    session = Session(loaded, cap, policy, PREFILL_CHUNK)
    if cap is not None:
        session.set_slot_limit(thinking_slots(session.budget.cache_slots, reserve))
    _, peak = _drain(session.feed(prompt_ids), 0)
    stop, peak = _drain(session.generate(settings), peak)
    if cap is not None:  # give the answer phase the room kept free
        session.set_slot_limit(None)
    text, new_tokens = stop.text, stop.new_tokens
    answered = stop.reason == "eos" and parse_answer(text) is not None
    forced = stop.reason != "stop_string" and not answered
    if forced:
        _, peak = _drain(session.feed(forced_ids), peak)
        text += FORCED_PREFIX
    if not answered:  # forced, or the model closed </think> itself: let it give its answer
        end, peak = _drain(session.generate(GenerationSettings(max_new_tokens=ANSWER_TOKENS)), peak)
        text, new_tokens = text + end.text, new_tokens + end.new_tokens
    return {"stop": stop.reason, "forced": forced, "predicted": parse_answer(text), "new_tokens": new_tokens,
            "logical_len": session.cache.logical_len, "physical_peak": peak, "peak_bytes": session.peak_bytes,
            "compactions": session.policy_actions, "tail": text[-300:]}


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, fraction, whole

    parser = EvalParser(prog="agentloop eval aime", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True, help="JSONL with 'problem' and 'answer' (e.g. aime25.test.jsonl)")
    parser.add_argument("--limit", type=count, help="first N problems")
    parser.add_argument("--mem-cap", help="physical KV cap, e.g. 2048tok or 8GB (default: uncapped)")
    parser.add_argument("--policy", default="am", help="memory policy at the cap (am, h2o, snapkv, none, ...)")
    parser.add_argument("--ratio", type=fraction, help="policy option: fraction of the region kept per compaction")
    parser.add_argument("--protect-recent", type=whole, help="policy option: newest tokens kept verbatim")
    parser.add_argument("--queries", default="repeat",
                        help="policy option: repeat (the paper's protocol, default), recorded or repeat+recorded")
    parser.add_argument("--max-compactions", type=whole, help="policy option: then stop at the cap and answer")
    parser.add_argument("--max-new-tokens", type=count, default=32768, help="thinking tokens at most")
    parser.add_argument("--samples", type=count, default=1, help="samples per problem (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of the model's sampling")
    add_output_options(parser, "aime")  # results <name>.jsonl, .json, .md, .png
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from agentloop.evals import load_eval_model, results_dir

    problems = load_problems(args.data, args.limit)
    cap = None if args.mem_cap in (None, "none") else parse_mem_cap(args.mem_cap)
    options = {key: value for key, value in (("ratio", args.ratio), ("protect_recent", args.protect_recent),
                                             ("queries", args.queries), ("max_compactions", args.max_compactions))
               if value is not None}
    make_policy(args.policy, **options)  # bad names or options fail before the model loads
    out_dir = results_dir()
    command = shlex.join(["agentloop", "eval", "aime", *argv])
    jsonl = out_dir / f"{args.name}.jsonl"

    loaded = load_eval_model(args.model)
    forced_ids = [int(i) for i in loaded.tokenizer(FORCED_PREFIX, add_special_tokens=False)["input_ids"]]
    if cap is not None:  # a cap too small fails before files are written
        budget = plan(loaded.model.config, loaded.dtype, cap, make_policy(args.policy, **options))
        thinking_slots(budget.cache_slots, len(forced_ids) + ANSWER_TOKENS)
    sample_options = sampling(loaded.model, args.greedy)
    print(f"aime: {len(problems)} problems x {args.samples} samples, {loaded.name}, cap {cap or 'none'}, "
          f"policy {' '.join([args.policy, *(f'{k}={v}' for k, v in options.items())])}, sampling {sample_options}",
          flush=True)
    if not args.no_write:
        out_dir.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("")
    records = []
    for problem in problems:
        messages = [{"role": "user", "content": f"{problem['problem']}\n\n{INSTRUCTION}"}]
        prompt_ids = encode_messages(loaded.tokenizer, messages, enable_thinking=True)
        for sample in range(args.samples):
            tic = time.perf_counter()
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, stop=[END_THINKING],
                                          seed=args.seed + sample, **sample_options)
            result = solve(loaded, prompt_ids, forced_ids, cap, make_policy(args.policy, **options), settings)
            record = {"id": problem["id"], "sample": sample, "answer": problem["answer"], **result,
                      "correct": result["predicted"] == problem["answer"],
                      "seconds": round(time.perf_counter() - tic, 1)}
            records.append(record)
            print(f"problem {record['id']} sample {sample}: predicted {record['predicted']} (answer "
                  f"{record['answer']}) {'ok' if record['correct'] else 'wrong'}; {record['stop']}"
                  f"{', forced' if record['forced'] else ''}, {record['new_tokens']} new tokens, logical "
                  f"{record['logical_len']}, physical peak {record['physical_peak']}, {record['compactions']} "
                  f"compactions, {record['seconds']:.0f}s", flush=True)
            if not args.no_write:
                with open(jsonl, "a") as file:
                    file.write(json.dumps(record) + "\n")
        if not args.no_write:
            _write(out_dir, args, records, command, loaded.name, sample_options)
    print(report(args, records, command, loaded.name, sample_options)[1])
    return 0


def report(args, records: list[dict], command: str, model: str, sample_options: dict) -> tuple[dict, str]:
    """(summary, markdown) of the records so far, in the paper's table layout with its numbers below."""
    problems = len({r["id"] for r in records})
    logical = [r["logical_len"] for r in records]
    summary = {"problems": problems, "samples": args.samples, "mem_cap": args.mem_cap or "none",
               "physical_peak": max(r["physical_peak"] for r in records),
               "logical_max": max(logical), "logical_median": statistics.median(logical),
               "score": sum(r["correct"] for r in records) / args.samples,
               "compactions_max": max(r["compactions"] for r in records), "forced": sum(r["forced"] for r in records)}
    lines = [f"# AIME under a KV-cache cap ({model}, {Path(args.data).name})", "",
             (f"{problems} problems x {args.samples} samples; policy `{args.policy}`, thinking up to "
              f"{args.max_new_tokens} new tokens, then a forced answer if none was given ({summary['forced']} forced); "
              f"sampling {sample_options}. Score is correct answers per sample, averaged over samples."), "",
             "| physical KV length | effective length (max / median) | score | compactions (max) |",
             "|---|---|---|---|",
             (f"| {summary['mem_cap']} (peak {summary['physical_peak']}) | {summary['logical_max']} / "
              f"{summary['logical_median']:g} | {summary['score']:g} / {problems} | {summary['compactions_max']} |"),
             "", f"Reproduce: `{command}`", "",
             "Paper, for reference (Qwen3-4B, AIME 2025, App. F.3; compaction to 50% when the cap is hit):", "",
             "| physical KV length | effective length | score (/30) | compactions |", "|---|---|---|---|",
             *(f"| {' | '.join(row)} |" for row in PAPER_ROWS)]
    return summary, "\n".join(lines)


def _write(out_dir: Path, args, records: list[dict], command: str, model: str, sample_options: dict) -> None:
    """<out>.json (config, summary, command) and <out>.md next to <out>.jsonl, and the plot <out>.png."""
    summary, markdown = report(args, records, command, model, sample_options)
    data = {"eval": "aime", "model": model, "config": vars(args), "sampling": sample_options, "summary": summary,
            "command": command, "records": f"{args.name}.jsonl"}
    (out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{args.name}.md").write_text(markdown + "\n")
    _plot(records, summary, out_dir / f"{args.name}.png")


def _plot(records: list[dict], summary: dict, path: Path) -> None:
    """Effective (logical) length reached vs compactions used, one point per sample, green when correct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for correct, colour, label in ((False, "tab:red", "wrong"), (True, "tab:green", "correct")):
        chosen = [r for r in records if r["correct"] == correct]
        ax.scatter([r["compactions"] for r in chosen], [r["logical_len"] for r in chosen], c=colour, label=label,
                   alpha=0.7)
    ax.axhline(summary["physical_peak"], color="black", lw=1, ls="--", label="physical peak")
    ax.set_xlabel("compactions used")
    ax.set_ylabel("effective (logical) length reached")
    ax.set_title(f"AIME: score {summary['score']:g} / {summary['problems']}, cap {summary['mem_cap']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
