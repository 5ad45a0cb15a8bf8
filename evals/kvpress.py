"""agentloop next to NVIDIA kvpress: its decode-time presses and agentloop's policies at equal KV slots.

Two tasks on each model: the pass key through k compactions (the settings of `agentloop eval passkey-online`: the
key in the first user turn, prose fed in 32-token chunks under a 256-slot cap, the question asked on a fork right
after each of a row's first 8 compactions) and the online-fidelity replay (those of `agentloop eval
online-fidelity`: a 2,048-token continuation replayed teacher-forced in 16-token chunks under a 512-slot cap, KL and
top-1 against the uncapped run). kvpress pins transformers < 5.3, so it runs in its own virtual environment, created
once under agentloop's cache dir; evals/kvpress_runner.py runs there on the same converted model directory and the
same token ids and streams its results back as JSON lines. Each (model, task, row) is a cell of the results file:
--resume runs only the cells that are missing, --rerun ROW drops a row's cells first, --only runs one side.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agentloop.errors import AgentloopError

KVPRESS_VERSION = "0.5.5"
RUNNER = Path(__file__).resolve().parent / "kvpress_runner.py"
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
TASKS = {"passkey": {"cap": 256, "chunk": 32}, "fidelity": {"cap": 512, "chunk": 16}}  # as in those two evals
# the row names of agentloop's policies (policy_for names of `agentloop eval online-fidelity`); any other
# policy_for name may be given as a row too
AGENTLOOP_ROWS = {"am": "am-both", "am-prompt": "am-both-prompt"}
# kvpress rows: (wrapper press, scorer press it wraps)
KVPRESS_ROWS = {
    "kvpress-snapkv": ("DecodingPress", "SnapKVPress"),
    "kvpress-knorm": ("DecodingPress", "KnormPress"),
    "kvpress-streaming": ("DecodingPress", "StreamingLLMPress"),
    "kvpress-expected": ("DecodingPress", "ExpectedAttentionPress"),  # the press of kvpress's AIME decoding notebook
    "kvpress-tova": ("DecodingPress", "TOVAPress"),
    "kvpress-cam": ("CAMPress", "KnormPress"),  # merges evicted values into kept neighbours (base as in its tests)
}
# agentloop's own eviction policies (`snapkv`, `streaming`) run too, for reference at the same cap
DEFAULT_ROWS = ("uncapped", *AGENTLOOP_ROWS, "snapkv", "streaming", "kvpress-snapkv", "kvpress-knorm", "kvpress-streaming",
                "kvpress-expected")
REPETITION_PENALTY = {"qwen2.5-coder-0.5b": 1.25}  # of the continuation, as online_fidelity_qwen; others 1.1
AFTER = 6  # fidelity metrics are also reported after a row's 6th compaction


def kvpress_budget(cap_slots: int, chunk: int) -> dict:
    """DecodingPress settings that hold at most `cap_slots` KV slots per layer, as agentloop's token cap does,
    when each forward feeds `chunk` tokens.

    DecodingPress counts one step per forward and, in the forward hook of the `compression_interval`-th step after
    its previous compression, cuts every layer to `target_size` slots. During that forward a layer holds
    target_size + compression_interval x chunk slots (the first time: the prompt + compression_interval x chunk,
    fewer as long as the prompt is at most target_size): its peak, set equal to the cap. The interval is half the
    cap, so kvpress compresses at the cap to half of it, as `am` halves its compactable region."""
    interval = cap_slots // 2 // chunk
    if interval < 1:
        raise AgentloopError(f"a cap of {cap_slots} slots is less than two {chunk}-token chunks: raise the cap")
    target = cap_slots - interval * chunk
    return {"target_size": target, "compression_interval": interval, "chunk": chunk,
            "max_slots": target + interval * chunk}


def press_spec(row: str, chunk: int) -> dict:
    """What the runner builds for a kvpress row. In decoding, SnapKV scores with the queries of the newest
    `window_size` buffered tokens but rotates them with the RoPE angles of the current forward's positions, so with
    multi-token forwards its window must not exceed the tokens per forward: its default of 64 fails on 16- and
    32-token chunks, and the window is set to the chunk (exactly the current forward's queries)."""
    wrapper, base = KVPRESS_ROWS[row]
    options = {"window_size": min(64, chunk)} if base == "SnapKVPress" and chunk > 1 else {}
    return {"name": row, "wrapper": wrapper, "base": base, "options": options}


# --- the kvpress environment and runner ------------------------------------------------------------------------
def kvpress_python(version: str) -> Path:
    """The interpreter of a virtual environment with kvpress `version`, created once under the agentloop cache dir,
    with the torch build agentloop runs on (so that a CPU machine keeps its CPU wheel)."""
    import torch

    from agentloop.assets import cache_dir

    env = cache_dir() / "envs" / f"kvpress-{version}"
    python = env / "bin" / "python"
    if (env / "complete").is_file():
        return python
    print(f"agentloop: creating a virtual environment with kvpress {version} in {env} (once) ...", file=sys.stderr)
    shutil.rmtree(env, ignore_errors=True)
    torch_version = torch.__version__.split("+")[0]
    for step in ([sys.executable, "-m", "venv", str(env)],
                 [str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}"],
                 [str(python), "-m", "pip", "install", "-q", f"kvpress=={version}"]):
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise AgentloopError(f"could not create the kvpress environment in {env} ({reason}); check that pip can "
                                 "reach PyPI, or pass --python with an interpreter that has kvpress")
    (env / "complete").write_text(f"kvpress=={version} torch=={torch_version}\n")
    return python


def run_runner(python: str | Path, request: dict, runner: Path = RUNNER, threads: int = 1) -> Iterator[dict]:
    """Start the runner on `request` and yield its JSON lines as they come; its stderr is echoed. A runner that
    fails is a clear error with the last line it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(request))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        try:
            process = subprocess.Popen([str(python), str(runner), str(path)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env)
        except OSError as exc:
            raise AgentloopError(f"cannot start the kvpress runner with {python} ({exc.strerror}): pass --python with "
                                 "an interpreter that has kvpress, or leave it out to create one") from None
        tail: collections.deque[str] = collections.deque(maxlen=20)
        echo = threading.Thread(target=_echo, args=(process.stderr, tail), daemon=True)
        echo.start()
        try:
            for line in process.stdout:
                if line.strip():
                    yield json.loads(line)
        finally:
            process.stdout.close()
            code = process.wait()
            echo.join()
        if code:
            raise AgentloopError(f"the kvpress runner failed (exit code {code}): {tail[-1] if tail else 'no output'}")


def _echo(stream, tail: collections.deque) -> None:
    for line in stream:
        tail.append(line.rstrip())
        print(f"  [kvpress] {line.rstrip()}", file=sys.stderr, flush=True)


def model_directory(spec: str) -> Path:
    """The converted Hugging Face directory kvpress loads: an alias's cached conversion, or a local directory."""
    from agentloop.assets import cache_dir
    from agentloop.models import ALIASES

    path = cache_dir() / "models" / spec if spec in ALIASES else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise AgentloopError(f"model {spec!r} has no converted directory at {path}: give a built-in alias or a local "
                             "Hugging Face model directory")
    return path


def source_commit() -> str | None:
    """The git commit of the agentloop checkout that ran a cell (None outside a git checkout)."""
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True)
    return result.stdout.strip() or None if result.returncode == 0 else None


def eos_ids(loaded) -> list[int]:
    from agentloop.loop import _eos_ids

    return sorted(_eos_ids(loaded.model, loaded.tokenizer))


# --- the pass key through k compactions --------------------------------------------------------------------------
def passkey_trials(tokenizer, args) -> list[dict]:
    """The trials of `agentloop eval passkey-online` for the same seed: {trial, prompt, prose, question, key}."""
    from agentloop.evals.passkey_online import make_trial

    rng = random.Random(args.seed)
    trials = []
    for trial in range(args.trials):
        prompt, prose, question, key = make_trial(tokenizer, rng, args.prose_tokens)
        trials.append({"trial": trial, "prompt": prompt, "prose": prose, "question": question, "key": key})
    return trials


def passkey_request(model_dir: Path, trials: list[dict], rows: list[str], args, eos: list[int]) -> dict:
    chunk = TASKS["passkey"]["chunk"]
    return {"task": "passkey", "model_dir": str(model_dir), "dtype": "float32", "threads": args.threads,
            "seed": args.seed, "budget": kvpress_budget(args.passkey_cap, chunk), "chunk": chunk, "max_k": args.max_k,
            "answer_tokens": args.answer_tokens, "eos_ids": eos, "presses": [press_spec(r, chunk) for r in rows],
            "trials": [{k: t[k] for k in ("trial", "prompt", "prose", "question")} for t in trials]}


def kvpress_passkey_cell(model: str, record: dict, trial: dict, tokenizer) -> dict:
    """A runner's passkey record, scored: the answers decoded and checked against the key."""
    from agentloop.evals.passkey import correct

    cell = {"model": model, "task": "passkey", "row": record["row"], "trial": record["trial"], "key": trial["key"]}
    if "error" in record:
        return {**cell, "error": record["error"]}
    asked = []
    for ask in record["asked"]:
        text = tokenizer.decode(ask["answer_ids"], skip_special_tokens=True)
        asked.append({"k": ask["k"], "prose_tokens": ask["prose_tokens"], "answer": text,
                      "correct": correct(text, trial["key"]), "logical": ask["logical"], "physical": ask["physical"]})
    return {**cell, "asked": asked, "peak_slots": record["peak_slots"], "events": record["events"],
            "seconds": record["seconds"]}


def agentloop_passkey_cell(loaded, model: str, row: str, trial: dict, args) -> dict:
    """The same trial run by agentloop: asked after each of the policy's first max_k compactions; `uncapped` is
    asked where kvpress compresses (every compression_interval chunks), after the same amount of text."""
    from agentloop.evals.online_fidelity import policy_for
    from agentloop.evals.passkey_online import run_trial

    chunk = TASKS["passkey"]["chunk"]
    settings = argparse.Namespace(chunk=chunk, answer_tokens=args.answer_tokens, max_k=args.max_k)
    uncapped = row == "uncapped"
    interval = kvpress_budget(args.passkey_cap, chunk)["compression_interval"]
    tic = time.perf_counter()
    asked, peak, cap_bytes = run_trial(
        loaded, None if uncapped else policy_for(AGENTLOOP_ROWS.get(row, row), args.seed + trial["trial"]),
        None if uncapped else f"{args.passkey_cap}tok", trial["prompt"], trial["prose"], trial["question"],
        trial["key"], settings, [k * interval - 1 for k in range(1, args.max_k + 1)] if uncapped else None)
    return {"model": model, "task": "passkey", "row": row, "trial": trial["trial"], "key": trial["key"],
            "asked": [{"k": k, "prose_tokens": min((index + 1) * chunk, len(trial["prose"])), "answer": r["answer"],
                       "correct": r["correct"], "logical": r["logical"], "physical": r["physical"],
                       "actions": r["actions"]} for k, (index, r) in enumerate(asked, 1)],
            "peak_slots": asked[-1][1]["peak_slots"] if asked else None, "peak_bytes": peak, "cap_bytes": cap_bytes,
            "seconds": round(time.perf_counter() - tic, 1), "commit": source_commit()}


# --- the online-fidelity replay ----------------------------------------------------------------------------------
def fidelity_summary(top1: list[float], kl: list[float], nll: list[float], event_positions: list[int]) -> dict:
    """Means over the continuation and over the part after the AFTER-th compaction (None if fewer)."""
    after = event_positions[AFTER - 1] if len(event_positions) >= AFTER else None
    summary = {"events": len(event_positions), "event_positions": event_positions}
    for name, values in (("top1", top1), ("kl", kl), ("nll", nll)):
        summary[name] = sum(values) / len(values)
        tail = values[after:] if after is not None else []
        summary[f"{name}_after_{AFTER}"] = sum(tail) / len(tail) if tail else None
    return summary


def fidelity_request(model_dir: Path, prompt: list[int], continuation: list[int], rows: list[str], args) -> dict:
    chunk = TASKS["fidelity"]["chunk"]
    return {"task": "fidelity", "model_dir": str(model_dir), "dtype": "float32", "threads": args.threads,
            "seed": args.seed, "budget": kvpress_budget(args.fidelity_cap, chunk), "chunk": chunk,
            "prompt": prompt, "continuation": continuation, "presses": [press_spec(r, chunk) for r in rows]}


def kvpress_fidelity_cell(model: str, record: dict) -> dict:
    cell = {"model": model, "task": "fidelity", "row": record["row"]}
    if "error" in record:
        return {**cell, "error": record["error"]}
    return {**cell, **fidelity_summary(record["top1"], record["kl"], record["nll"], record["event_positions"]),
            "top1_per_position": record["top1"], "peak_slots": record["peak_slots"], "seconds": record["seconds"]}


def crosscheck(agentloop_ref: dict, kvpress_ref: dict) -> dict:
    """How closely the kvpress environment's uncapped replay reproduces agentloop's (same weights, same tokens)."""
    same = [a == b for a, b in zip(agentloop_ref["top1_ids"], kvpress_ref["top1_ids"], strict=False)]
    diffs = [abs(a - b) for a, b in zip(agentloop_ref["nll"], kvpress_ref["nll"], strict=False)]
    return {"top1_agreement": sum(same) / len(same), "mean_abs_nll_diff": sum(diffs) / len(diffs),
            "max_abs_nll_diff": max(diffs)}


def agentloop_fidelity_cells(loaded, model: str, rows: list[str], prompt: list[int], continuation: list[int], args):
    """Yield agentloop's cells: `uncapped` (the reference, with its per-position top-1 ids and NLL for the
    cross-check), then each policy row replayed under the cap."""
    import torch

    from agentloop.evals.online_fidelity import compare, policy_for, replay

    chunk = TASKS["fidelity"]["chunk"]
    targets = torch.tensor(continuation)
    reference, _, seconds, _ = replay(loaded, prompt, continuation, None, None, chunk)
    ref_logp = reference.log_softmax(-1)
    if "uncapped" in rows:
        nll = -ref_logp.gather(1, targets[:, None])[:, 0]
        yield {"model": model, "task": "fidelity", "row": "uncapped", "top1_ids": reference.argmax(-1).tolist(),
               "nll": [round(float(x), 5) for x in nll], "mean_nll": float(nll.mean()), "seconds": round(seconds, 1),
               "commit": source_commit()}
    for row in rows:
        if row == "uncapped":
            continue
        capped, events, seconds, session = replay(loaded, prompt, continuation, f"{args.fidelity_cap}tok",
                                                  policy_for(AGENTLOOP_ROWS.get(row, row), args.seed), chunk)
        metrics = {k: v.tolist() for k, v in compare(reference, capped, targets).items()}
        yield {"model": model, "task": "fidelity", "row": row,
               **fidelity_summary(metrics["top1"], metrics["kl"], metrics["nll"], [e["position"] for e in events]),
               "top1_per_position": [int(x) for x in metrics["top1"]],
               # the cache only grows between compactions: its peak is where a compaction began, or the end
               "peak_slots": max([e["physical_before"] for e in events] + [session.cache.physical_len]),
               "peak_bytes": session.peak_bytes,
               "cap_bytes": session.cap_bytes, "seconds": round(seconds, 1),
               "compaction_seconds": round(sum(e["seconds"] for e in events), 1), "commit": source_commit()}


# --- main --------------------------------------------------------------------------------------------------------
SETTINGS = ("trials", "passkey_cap", "fidelity_cap", "fidelity_tokens", "max_k", "prose_tokens", "answer_tokens", "seed",
            "kvpress_version")  # what a resumed run must share with the results it adds to


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, slot_count, whole

    parser = EvalParser(prog="agentloop eval kvpress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help=f"uncapped, agentloop policies ({', '.join(AGENTLOOP_ROWS)} or any online-fidelity policy "
                             f"name) and kvpress presses ({', '.join(KVPRESS_ROWS)})")
    parser.add_argument("--only", choices=["agentloop", "kvpress"], help="run only one side's rows")
    parser.add_argument("--trials", type=count, default=20, help="pass-key trials per model")
    parser.add_argument("--passkey-cap", type=slot_count, default=TASKS["passkey"]["cap"], help="KV slots, pass-key task")
    parser.add_argument("--fidelity-cap", type=slot_count, default=TASKS["fidelity"]["cap"], help="KV slots, fidelity task")
    parser.add_argument("--fidelity-tokens", type=count, default=2048, help="length of the replayed continuation")
    parser.add_argument("--max-k", type=count, default=8, help="compactions the pass key goes through")
    parser.add_argument("--prose-tokens", type=count, default=2400)
    parser.add_argument("--answer-tokens", type=count, default=8)
    parser.add_argument("--seed", type=whole, default=0)
    parser.add_argument("--kvpress-version", default=KVPRESS_VERSION)
    parser.add_argument("--python", help="an interpreter that has kvpress (default: a virtual environment created "
                                         "once under the agentloop cache dir)")
    parser.add_argument("--threads", type=count, default=1, help="torch threads of both sides")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in evals/results/<name>.json (same settings), run the rest")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="ROW",
                        help="with --resume: drop these rows' cells (of --models and --tasks) first, e.g. after "
                             "agentloop changed")
    add_output_options(parser, "kvpress")
    args = parser.parse_args(argv)
    argv = list(argv or [])

    from agentloop.evals.online_fidelity import policy_for

    unknown = [r for r in args.rows if r != "uncapped" and r not in KVPRESS_ROWS and r not in AGENTLOOP_ROWS]
    for row in unknown:
        policy_for(row, 0)  # an unknown policy name fails here, before anything runs
    if args.rerun and not args.resume:
        raise AgentloopError("--rerun drops rows from earlier results: use it with --resume")
    rows = [r for r in args.rows if args.only is None or (r in KVPRESS_ROWS) == (args.only == "kvpress")]
    results = _earlier(args) if args.resume else _fresh(args)
    results["cells"] = [c for c in results["cells"]  # --rerun drops the rows' cells of the models and tasks run now
                        if not (c["row"] in args.rerun and c["model"] in args.models and c["task"] in args.tasks)]
    command = " ".join(["agentloop", "eval", "kvpress", *argv])
    results["commands"] = [c for c in results.pop("commands", [results.pop("command", None)]) if c] + [command]
    torch_threads(args.threads)

    python = None
    for model in args.models:
        loaded = None
        for task in args.tasks:
            done = {(c["row"], c.get("trial")) for c in results["cells"] if c["model"] == model and c["task"] == task}
            if task == "passkey":
                todo = [(r, t) for r in rows for t in range(args.trials) if (r, t) not in done]
            else:
                todo = [(r, None) for r in rows if (r, None) not in done]
            if not todo:
                continue
            loaded = loaded or _load(model)
            if any(r in KVPRESS_ROWS for r, _ in todo) and python is None:
                python = args.python or kvpress_python(args.kvpress_version)
            run = _run_passkey if task == "passkey" else _run_fidelity
            for cell in run(loaded, model, todo, python, args, results):
                results["cells"].append(cell)
                _print_cell(cell)
                if not args.no_write:
                    _write(args, results)
    print(_markdown(args, results))
    return 0


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _load(model: str):
    from agentloop.evals import load_eval_model

    return load_eval_model(model)


def _fresh(args) -> dict:
    return {"benchmark": "kvpress", "config": {k: getattr(args, k) for k in SETTINGS}, "versions": {},
            "budgets": {task: kvpress_budget(getattr(args, f"{task}_cap"), spec["chunk"]) for task, spec in TASKS.items()},
            "continuations": {}, "cells": []}


def _earlier(args) -> dict:
    from agentloop.evals import results_dir

    path = results_dir() / f"{args.name}.json"
    if not path.is_file():
        return _fresh(args)
    earlier = json.loads(path.read_text())
    changed = [k for k in SETTINGS if k != "trials" and earlier["config"].get(k) != getattr(args, k)]
    if changed:
        raise AgentloopError(f"--resume: {path} was run with other settings ({', '.join(changed)}); resume with the "
                             "same settings, or give another --name")
    earlier["config"]["trials"] = max(earlier["config"]["trials"], args.trials)
    return earlier


def _run_passkey(loaded, model: str, todo: list[tuple[str, int]], python, args, results: dict) -> Iterator[dict]:
    trials = passkey_trials(loaded.tokenizer, args)
    pending_kvpress = sorted({t for r, t in todo if r in KVPRESS_ROWS})
    if pending_kvpress:
        press_rows = [r for r in dict.fromkeys(r for r, _ in todo) if r in KVPRESS_ROWS]
        chosen = [trials[t] for t in pending_kvpress]
        request = passkey_request(model_directory(model), chosen, press_rows, args, eos_ids(loaded))
        for record in run_runner(python, request, threads=args.threads):
            if "versions" in record:
                results["versions"] = record["versions"]
            elif (record["row"], record["trial"]) in todo:  # a trial pending for other presses only
                yield kvpress_passkey_cell(model, record, trials[record["trial"]], loaded.tokenizer)
    for trial in trials:
        for row in dict.fromkeys(r for r, _ in todo):
            if row not in KVPRESS_ROWS and (row, trial["trial"]) in todo:
                yield agentloop_passkey_cell(loaded, model, row, trial, args)


def _run_fidelity(loaded, model: str, todo: list[tuple[str, None]], python, args, results: dict) -> Iterator[dict]:
    from agentloop.chat import encode_messages
    from agentloop.evals.online_fidelity import PROMPT, generate_continuation

    prompt = encode_messages(loaded.tokenizer, [{"role": "user", "content": PROMPT}])
    if model not in results["continuations"]:
        tic = time.perf_counter()
        results["continuations"][model] = generate_continuation(loaded, prompt, args.fidelity_tokens, args.seed,
                                                                REPETITION_PENALTY.get(model, 1.1))
        print(f"{model}: continuation of {args.fidelity_tokens} tokens in {time.perf_counter() - tic:.0f}s", flush=True)
    continuation = results["continuations"][model]
    rows = [r for r, _ in todo]
    press_rows = [r for r in rows if r in KVPRESS_ROWS]
    if press_rows:
        request = fidelity_request(model_directory(model), prompt, continuation, press_rows, args)
        for record in run_runner(python, request, threads=args.threads):
            if "versions" in record:
                results["versions"] = record["versions"]
            elif record["row"] == "uncapped":
                results.setdefault("kvpress_uncapped", {})[model] = {k: record[k] for k in ("top1_ids", "nll")}
            else:
                yield kvpress_fidelity_cell(model, record)
    agentloop_rows = [r for r in rows if r not in KVPRESS_ROWS]
    if agentloop_rows:
        yield from agentloop_fidelity_cells(loaded, model, agentloop_rows, prompt, continuation, args)


def _print_cell(cell: dict) -> None:
    head = f"{cell['model']} {cell['task']} {cell['row']}" + (f" trial {cell['trial']}" if "trial" in cell else "")
    if "error" in cell:
        print(f"{head}: failed: {cell['error']}", flush=True)
    elif cell["task"] == "passkey":
        print(f"{head}: " + "".join("+" if a["correct"] else "." for a in cell["asked"]) + f" ({cell['seconds']:.0f}s)",
              flush=True)
    elif "top1" in cell:
        print(f"{head}: {cell['events']} events, top-1 {cell['top1']:.3f}, after {AFTER}: "
              f"{_fmt(cell[f'top1_after_{AFTER}'])}, KL {cell['kl']:.3f} ({cell['seconds']:.0f}s)", flush=True)


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# --- report ------------------------------------------------------------------------------------------------------
def row_order(cells: list[dict]) -> list[str]:
    present = list(dict.fromkeys(c["row"] for c in cells))
    return [r for r in DEFAULT_ROWS if r in present] + [r for r in present if r not in DEFAULT_ROWS]


def passkey_table(cells: list[dict], max_k: int) -> dict:
    """{row: {k: {accuracy, n}, prose_tokens_k1, prose_tokens_kmax, peak}} over the scored cells of one model."""
    table = {}
    for row in row_order(cells):
        mine = [c for c in cells if c["row"] == row and "asked" in c]
        entry = {"trials": len(mine), "errors": sorted({c["error"] for c in cells if c["row"] == row and "error" in c})}
        for k in range(1, max_k + 1):
            asks = [a for c in mine for a in c["asked"] if a["k"] == k]
            entry[str(k)] = {"accuracy": sum(a["correct"] for a in asks) / len(asks) if asks else None, "n": len(asks)}
            entry[f"prose_tokens_k{k}"] = statistics.mean(a["prose_tokens"] for a in asks) if asks else None
        entry["peak"] = _peak(mine)
        table[row] = entry
    return table


def _peak(cells: list[dict]) -> str:
    """Most KV slots a layer held, over the cells (measured on both sides), or 'no cap'."""
    slots = [c["peak_slots"] for c in cells if c.get("peak_slots") is not None]
    if cells and cells[0].get("cap_bytes", 0) is None:
        return "no cap"
    return f"{max(slots)} slots" if slots else "—"


def trial_means(cells: list[dict], row: str, max_k: int) -> dict[int, float]:
    """Per trial: the share of its k = 1..max_k questions answered correctly (the unit of the paired comparison)."""
    out = {}
    for c in cells:
        if c["row"] == row and "asked" in c and c["asked"]:
            out[c["trial"]] = sum(a["correct"] for a in c["asked"] if a["k"] <= max_k) / len(c["asked"])
    return out


def comparisons(results: dict, model: str, max_k: int) -> list[dict]:
    """Each of agentloop's `am` rows against every kvpress row of a model: on the pass key, the difference of per-trial
    accuracy over k = 1..max_k (paired bootstrap over trials); on the fidelity replay, the difference of top-1
    agreement on the positions after both rows' AFTER-th compaction (moving-block bootstrap over positions, 64-token
    blocks). A win needs the whole 95% interval above 0."""
    from agentloop.evals.paired import paired_bootstrap, verdict

    out = []
    cells = [c for c in results["cells"] if c["model"] == model]
    ours = [r for r in row_order(cells) if r in AGENTLOOP_ROWS]
    theirs = [r for r in row_order(cells) if r in KVPRESS_ROWS]
    passkey = [c for c in cells if c["task"] == "passkey"]
    fidelity = {c["row"]: c for c in cells if c["task"] == "fidelity" and "top1_per_position" in c}
    for a in ours:
        for b in theirs:
            mine, other = trial_means(passkey, a, max_k), trial_means(passkey, b, max_k)
            shared = sorted(set(mine) & set(other))
            if shared:
                x, y = [mine[t] for t in shared], [other[t] for t in shared]
                interval = paired_bootstrap(x, y)
                out.append({"task": "passkey", "ours": a, "theirs": b, "units": len(shared), "ours_value": statistics.mean(x),
                            "theirs_value": statistics.mean(y), "ci95": interval, "verdict": verdict(interval)})
            if a in fidelity and b in fidelity:
                start = after_both(fidelity[a], fidelity[b])
                if start is not None:
                    x, y = fidelity[a]["top1_per_position"][start:], fidelity[b]["top1_per_position"][start:]
                    interval = paired_bootstrap(x, y, block=64)
                    out.append({"task": "fidelity", "ours": a, "theirs": b, "units": len(x), "ours_value": statistics.mean(x),
                                "theirs_value": statistics.mean(y), "ci95": interval, "verdict": verdict(interval)})
    return out


def after_both(a: dict, b: dict) -> int | None:
    """The first continuation position at which both fidelity cells have passed their AFTER-th compaction."""
    if len(a["event_positions"]) < AFTER or len(b["event_positions"]) < AFTER:
        return None
    return max(a["event_positions"][AFTER - 1], b["event_positions"][AFTER - 1])


def _markdown(args, results: dict) -> str:
    config, budgets = results["config"], results["budgets"]
    versions = results.get("versions") or {}
    lines = ["# agentloop next to kvpress at equal KV slots", "",
             (f"kvpress {versions.get('kvpress', config['kvpress_version'])} (transformers "
              f"{versions.get('transformers', '?')}, torch {versions.get('torch', '?')}) in its own virtual environment, "
              "on the same converted model directories and token ids as agentloop; fp32 on CPU. Each kvpress row is "
              "its `DecodingPress` (or `CAMPress`) over the named scorer press, with kvpress's defaults except "
              "`target_size`, `compression_interval` and SnapKV's window (below)."), "",
             "## Equal memory: the budget mapping", "",
             ("agentloop holds a token cap N: before every forward the loop checks that the physical slots plus the "
              "forward's tokens stay within N, and `am` then compacts everything but the 20 newest tokens to half "
              "(N → about N/2 + 10). kvpress's `DecodingPress` counts one step per forward and, in the forward hook of "
              "every `compression_interval`-th step, cuts each layer to `target_size` slots, so during that forward a "
              "layer holds `target_size + compression_interval × chunk` slots (chunk = tokens per forward; the very "
              "first time the prompt stands in for `target_size`). Both are held to the same maximum: "
              "`target_size + compression_interval × chunk = N`, with the interval half the cap:"), "",
             "| task | cap N (slots) | tokens per forward | `target_size` | `compression_interval` (forwards) | max slots |",
             "|---|---|---|---|---|---|"]
    for task, b in budgets.items():
        lines.append(f"| {task} | {config[f'{task}_cap']} | {b['chunk']} | {b['target_size']} | "
                     f"{b['compression_interval']} | {b['max_slots']} |")
    lines += ["", ("The tables give each row's measured peak: the most slots a layer held during any forward (kvpress: "
                   "forks included; agentloop: the main run, whose forks stay under the same limit). kvpress's "
                   "hidden-state buffer (at most one interval of "
                   "hidden states per layer) and agentloop's kept queries for `am` are memory outside the KV cache on "
                   "both sides. SnapKV's window is the chunk (32 / 16 queries instead of 64): kvpress rotates the window's "
                   "queries with the current forward's RoPE angles, which fails for a 64-query window on shorter "
                   "chunks. The pass-key question and answer on a fork are read without further compression on both "
                   "sides (right after a compaction they fit under the cap; kvpress's interval counts forwards, so it "
                   "would otherwise compress again within the answer's 1-token steps, with a 4-token buffer).")]
    models = list(dict.fromkeys(c["model"] for c in results["cells"]))
    for model in models:
        cells = [c for c in results["cells"] if c["model"] == model]
        lines += ["", f"## {model}"]
        passkey = [c for c in cells if c["task"] == "passkey"]
        if passkey:
            table = passkey_table(passkey, config["max_k"])
            ks = range(1, config["max_k"] + 1)
            lines += ["", (f"**Pass key through k compactions** (cap {config['passkey_cap']} slots, 32-token chunks; "
                           "each row asked right after its own k-th compaction; `uncapped` after the same text as kvpress). "
                           "Accuracy, trials, prose tokens read when asked at k = 1 and at the last k, peak:"), "",
                      "| row | " + " | ".join(f"k={k}" for k in ks) + f" | trials | prose at k=1 / {config['max_k']} | peak |",
                      "|---|" + "---|" * (len(ks) + 3)]
            for row, entry in table.items():
                if entry["errors"] and not entry["trials"]:
                    lines.append(f"| {row} | failed: {entry['errors'][0]} |")
                    continue
                cells_k = [_pct(entry[str(k)]["accuracy"]) for k in ks]
                last = entry[f"prose_tokens_k{config['max_k']}"]
                lines.append(f"| {row} | " + " | ".join(cells_k) + f" | {entry['trials']} | "
                             f"{_fmt(entry['prose_tokens_k1'], 0)} / {_fmt(last, 0)} | {entry['peak']} |")
        fidelity = {c["row"]: c for c in cells if c["task"] == "fidelity"}
        if fidelity:
            lines += ["", (f"**Online fidelity** (a {config['fidelity_tokens']}-token continuation replayed in 16-token "
                           f"chunks under {config['fidelity_cap']} slots; per position against the uncapped run; "
                           f"'after {AFTER}' = after the row's {AFTER}th compaction):"), "",
                      f"| row | compactions | top-1 | top-1 after {AFTER} | KL | KL after {AFTER} | NLL | peak | seconds |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for row in row_order(list(fidelity.values())):
                c = fidelity[row]
                if "error" in c:
                    lines.append(f"| {row} | failed: {c['error']} |")
                elif row == "uncapped":
                    lines.append(f"| uncapped | 0 | 1 | 1 | 0 | 0 | {c['mean_nll']:.3f} | no cap | {c['seconds']} |")
                else:
                    peak = _peak([c])
                    lines.append(f"| {row} | {c['events']} | {c['top1']:.3f} | {_fmt(c[f'top1_after_{AFTER}'])} | "
                                 f"{c['kl']:.3f} | {_fmt(c[f'kl_after_{AFTER}'])} | {c['nll']:.3f} | {peak} | {c['seconds']} |")
            check = results.get("kvpress_uncapped", {}).get(model)
            if check and "uncapped" in fidelity and "top1_ids" in fidelity["uncapped"]:
                x = crosscheck(fidelity["uncapped"], check)
                lines += ["", (f"Same model on both sides: kvpress's environment replays the uncapped run with top-1 "
                               f"agreement {x['top1_agreement']:.4f} to agentloop's, NLL per position within "
                               f"{x['max_abs_nll_diff']:.1e} (mean {x['mean_abs_nll_diff']:.1e}).")]
        verdicts = comparisons(results, model, config["max_k"])
        if verdicts:
            lines += ["", "Where agentloop wins, ties and loses (95% paired bootstrap interval of ours − theirs; a win or "
                          "loss needs the whole interval on one side of 0):", "",
                      "| task | agentloop | kvpress | units | ours | theirs | difference [95% CI] | verdict |",
                      "|---|---|---|---|---|---|---|---|"]
            for v in verdicts:
                lo, hi = v["ci95"]
                unit = "trials" if v["task"] == "passkey" else "positions"
                lines.append(f"| {v['task']} | {v['ours']} | {v['theirs']} | {v['units']} {unit} | {v['ours_value']:.3f} | "
                             f"{v['theirs_value']:.3f} | {v['ours_value'] - v['theirs_value']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"| {v['verdict']} |")
    lines += ["", ("Rows: `uncapped` = no cap; `am` = agentloop's `am` policy with its defaults (Attention Matching, "
                   "am-hak-fast, ratio 0.5, 20 newest tokens kept, repeat-prefill + recorded queries); `am-prompt` = the "
                   "same with `prompt_share: 0.5` (the first prompt read again at each compaction); `kvpress-snapkv`, "
                   "`-knorm`, `-streaming`, `-expected`, `-tova` = `DecodingPress` over `SnapKVPress`, `KnormPress`, "
                   "`StreamingLLMPress` (4 sinks), `ExpectedAttentionPress` (the press of kvpress's AIME decoding "
                   "notebook) and `TOVAPress`; `kvpress-cam` = `CAMPress` (merges evicted values into kept neighbours) "
                   "over `KnormPress`; `snapkv`, `streaming` = agentloop's own eviction policies at the same cap "
                   "(SnapKV-style eviction at `am`'s halving schedule, scored by the newest 256 tokens' queries; "
                   "StreamingLLM with 4 sinks, evicting 32 slots at a time). kvpress's scorer presses keep their top-k "
                   "slots in score order, not in time order (NVIDIA/kvpress#173); `StreamingLLMPress` takes the cache's "
                   "first 4 slots as its sinks and the slots after them as the oldest, so after its first decode-time "
                   "compression (all kept slots tie) it protects arbitrary slots and prunes a mix of old and recent "
                   "ones: measured as shipped. Pass-key comparison unit: a trial's accuracy over its k = 1..8 questions; "
                   "fidelity: top-1 agreement per position after the 6th compaction, in 64-token blocks. Everything per "
                   "trial and position is in kvpress.json."),
              "", ("Reproduce: `agentloop eval kvpress` (every row, both models and tasks; resumable with `--resume`; "
                   "after a change to agentloop: `agentloop eval kvpress --resume --only agentloop --rerun am am-prompt`). "
                   "This file was written by: " + "; ".join(f"`{c}`" for c in results.get("commands", [])) + ".")]
    return "\n".join(lines)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.0%}"


def _write(args, results: dict) -> None:
    from agentloop.evals import results_dir, write_results

    write_results(args.name, results, _markdown(args, results))
    _plot(results, results_dir() / f"{args.name}.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in results["cells"]))
    if not models:
        return
    max_k = results["config"]["max_k"]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
    for (ax_key, ax_fid), model in zip(axes, models, strict=True):
        cells = [c for c in results["cells"] if c["model"] == model]
        table = passkey_table([c for c in cells if c["task"] == "passkey"], max_k)
        for row, entry in table.items():
            points = [(k, entry[str(k)]["accuracy"]) for k in range(1, max_k + 1) if entry[str(k)]["accuracy"] is not None]
            if points:
                ax_key.plot(*zip(*points, strict=True), "--s" if row in KVPRESS_ROWS else "-o", label=row)
        ax_key.set(title=f"{model}: pass key, cap {results['config']['passkey_cap']} slots", xlabel="compactions (k)",
                   ylabel="accuracy", ylim=(-0.02, 1.02))
        fidelity = [c for c in cells if c["task"] == "fidelity" and "top1" in c]
        names = [c["row"] for c in fidelity]
        values = [c[f"top1_after_{AFTER}"] or 0 for c in fidelity]
        colours = ["tab:gray" if n in KVPRESS_ROWS else "tab:blue" for n in names]
        ax_fid.barh(names, values, color=colours)
        ax_fid.set(title=f"{model}: top-1 agreement after {AFTER} compactions, cap {results['config']['fidelity_cap']}",
                   xlim=(min(values + [1]) - 0.05, 1))
        for ax in (ax_key, ax_fid):
            ax.grid(alpha=0.3)
        if ax_key.lines:
            ax_key.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
