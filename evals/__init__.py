"""Benchmarks and evals, each runnable as `agentloop eval <name>` and writing evals/results/<name>.{json,md}."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import tempfile
from pathlib import Path

EVALS: dict[str, tuple[str, str]] = {
    "decode-speed": ("agentloop.evals.decode_speed", "tok/s of the capped loop vs HF generate, by context, with/without β"),
    "fidelity": ("agentloop.evals.fidelity", "held-out attention error of every compaction method vs ratio"),
    "passkey": ("agentloop.evals.passkey", "passkey retrieval after one-shot compaction, per method and ratio"),
    "aime": ("agentloop.evals.aime", "AIME under a KV cap with online compaction and a forced answer (paper App. F.3)"),
    "online-fidelity": ("agentloop.evals.online_fidelity", "teacher-forced replay under a cap: KL/top-1 vs uncapped, per policy"),
    "passkey-online": ("agentloop.evals.passkey_online", "pass key in the prompt, asked after k online compactions"),
    "online-speed": ("agentloop.evals.online_speed", "tok/s of a run with online compactions vs uncapped"),
    "compaction-speed": ("agentloop.evals.compaction_speed", "seconds per stage of a compaction, and its ratio to a prefill"),
    "gsm8k": ("agentloop.evals.gsm8k", "GSM8K accuracy under a KV cap (online compaction) vs uncapped"),
    "ingestion": ("agentloop.evals.ingestion", "pass key in a long tool result compacted on ingestion vs whole vs truncated"),
    "research": ("agentloop.evals.research", "an agent answers questions about long files it reads, under a cap"),
    "ruler": ("agentloop.evals.ruler", "RULER needle and QA tasks after one-shot compaction, per method and ratio"),
    "vs-reference": ("agentloop.evals.vs_reference", "AM solver vs the paper's reference code on identical tensors"),
    "gpu-check": ("agentloop.evals.gpu_check", "correctness on the device, then decode, compaction and memory benchmarks"),
    "memory": ("agentloop.evals.memory", "peak memory above the weights vs the cap, per policy and cap (measured)"),
    "serve": ("agentloop.evals.serve", "agentloop serve under load: TTFT, tok/s, prefill saved by warm sessions, peak vs cap"),
    "kvpress": ("agentloop.evals.kvpress", "agentloop's policies next to kvpress's decoding presses at equal KV slots"),
    "headline": ("agentloop.evals.headline", "GSM8K capped at ~1/4 of its length: am vs uncapped, none and eviction"),
}


_OUT: Path | None = None  # --out of the eval being run


def results_dir() -> Path:
    """Where results go: --out, else ./evals/results under the working directory (never the installed package's
    folder, unless that is where you run it from: from a checkout's root this is the committed evals/results)."""
    return _OUT if _OUT is not None else Path.cwd() / "evals" / "results"


def count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _number(text, int, lambda v: v >= 1, "a whole number >= 1")


def whole(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _number(text, int, lambda v: v >= 0, "a whole number >= 0")


def positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a number > 0")


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    return _number(text, float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


def _number(text: str, kind, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


class EvalParser(argparse.ArgumentParser):
    """An eval's argument parser: errors are one line (exit 2), and every eval takes --out DIR (its results
    folder, checked to be writable before any work)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?[0-9]")  # `--trials -1` is a bad value, not an option
        self.add_argument("--out", metavar="DIR", help="results folder (default: ./evals/results)")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        from agentloop.errors import AgentloopError

        global _OUT
        parsed = super().parse_args(args, namespace)
        _OUT = Path(parsed.out) if parsed.out is not None else None
        if not getattr(parsed, "no_write", False):
            folder = results_dir()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as exc:
                raise AgentloopError(f"cannot write results to {folder} ({exc.strerror or exc}); give another "
                                     "--out") from None
        return parsed


def load_eval_model(spec: str):
    """The model an eval runs on, loaded with transformers' progress bars and warnings silenced."""
    from agentloop.cli import _quiet_transformers
    from agentloop.models import load_model

    _quiet_transformers()
    return load_model(spec)


def add_output_options(parser, name: str) -> None:
    """--name (results file name, default `name`) and --no-write, for evals whose results are written per trial."""
    parser.add_argument("--name", default=name, type=_file_name, help="results file name in the results folder")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")


def _file_name(text: str) -> str:
    if not text.strip() or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected a file name without '/', got {text!r}")
    return text


def query_budget(text: str) -> int | None:
    """--max-queries: a positive number of reference queries per KV head, or 'all' (None: fit with every query)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of queries or 'all', got {text!r}")
    return value


def slot_count(text: str) -> int:
    """A cap in KV slots: a positive whole number, with or without 'tok' ('112' or '112tok')."""
    try:
        value = int(text.removesuffix("tok"))
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of KV slots such as 256 or 256tok, got {text!r}")
    return value


def add_query_option(parser) -> None:
    """--max-queries for evals that fit compactions (default: the one-shot default of compact_span)."""
    from agentloop.compaction.span import MAX_QUERIES

    parser.add_argument("--max-queries", type=query_budget, default=MAX_QUERIES,
                        help=f"reference queries per KV head, a random subsample above this (default {MAX_QUERIES}), "
                             "or 'all' to fit with every query")


def describe_queries(max_queries: int | None) -> str:
    """How a report states the query budget it used."""
    return "all" if max_queries is None else f"at most {max_queries} (a random subsample)"


def read_jsonl(path: str, expected: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL data file; a file that cannot be read, or a
    line that is not JSON, is a clear error saying each line should hold `expected`."""
    from agentloop.errors import AgentloopError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise AgentloopError(f"cannot read --data {path} ({reason}): give a JSONL file with {expected} on each "
                             "line") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise AgentloopError(f"{path} line {number} is not valid JSON ({exc.msg}): each line must be one JSON "
                                 f"object with {expected}") from None
    return rows


def earlier_records(args, same: tuple[str, ...], unit, per_unit, older: dict | None = None) -> list[dict]:
    """--resume: the records of evals/results/<args.name>.json if it was run with the same settings `same` (a
    setting an older file did not record counts as `older[setting]`), complete units only: `unit(record)` names
    the trial or sample a record belongs to, and a complete one has `per_unit` records (a number, or a function of
    one of its records)."""
    from agentloop.errors import AgentloopError

    path = results_dir() / f"{args.name}.json"
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    older = older or {}
    changed = [k for k in same if earlier["config"].get(k, older.get(k)) != getattr(args, k)]
    if changed:
        raise AgentloopError(f"--resume: {path} was run with other settings ({', '.join(changed)}); "
                             "resume with the same settings, or give another --name")
    count: dict = {}
    for record in earlier["records"]:
        count[unit(record)] = count.get(unit(record), 0) + 1
    wanted = per_unit if callable(per_unit) else lambda record: per_unit
    return [r for r in earlier["records"] if count[unit(r)] == wanted(r)]


def write_results(name: str, data: dict, markdown: str) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return out / f"{name}.md"


def run_eval(name: str | None, argv: list[str]) -> int:
    if name in (None, "-h", "--help", "list"):
        print("usage: agentloop eval NAME [options]   (agentloop eval NAME --help for its options)\n\n"
              "Results go to ./evals/results (or --out DIR).\n\nevals:")
        for key, (_, summary) in EVALS.items():
            print(f"  {key:18s} {summary}")
        return 0
    if name not in EVALS:
        from agentloop.errors import AgentloopError

        raise AgentloopError(f"unknown eval {name!r}: choose one of {', '.join(EVALS)} (see `agentloop eval --help`)")
    module = importlib.import_module(EVALS[name][0])
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(run_eval(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
