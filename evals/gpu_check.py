"""One GPU check in one command: correctness on the device, then the speed and memory benchmarks, one results file.

Checks (each a pass/fail with its figure):
  logits    - the loop (static step in a CUDA graph on a GPU) vs one stock forward over 100 decode steps, fp32 and bf16;
  beta      - k duplicate keys give the same logits as one key with β = log k;
  online    - `am` under a token cap: >= 6 compactions, the cache never past its slots, peak memory within the limit
              of `agentloop eval memory`.
Benchmarks (shape-only model, default random:qwen3-4b): decode speed vs HF generate with and without graphs, one-shot
compaction speed vs prefill, peak memory per cap, the solver vs the paper's reference code on random tensors.
`--quick` shrinks everything to small shapes: how the test suite checks on CPU that the command starts and runs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import traceback

import torch


def _check(name: str, fn) -> dict:
    tic = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a check that crashes is a failed check; the others still run
        result = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
    result["seconds"] = round(time.perf_counter() - tic, 1)
    print(f"[gpu-check] {name}: {'ok' if result.get('passed') else 'FAILED'} {json.dumps(result)[:300]}", flush=True)
    return result


def check_logits(shape: str, device: str, dtype: str, steps: int) -> dict:
    """Our loop's logits vs a stock forward of the whole sequence, at every decode step."""
    import copy

    from agentloop import GenerationSettings, Session
    from agentloop.models import load_model

    loaded = load_model(shape, dtype=dtype, device=device)
    reference = copy.deepcopy(loaded.model)
    reference.set_attn_implementation("sdpa")
    prompt = list(range(1000, 1037))
    session = Session(loaded, cap=f"{len(prompt) + steps + 16}tok")
    for _ in session.feed(prompt):
        pass
    logits = [session.last_logits.clone()]
    for event in session.generate(GenerationSettings(max_new_tokens=steps, ignore_eos=True)):
        if event.kind == "token":
            logits.append(session.last_logits.clone())
    ours = torch.stack(logits)[:-1]  # the logits each decoded token was sampled from, and the last prompt position
    with torch.inference_mode():
        expected = reference(torch.tensor([session.token_ids], device=loaded.device)).logits[0, len(prompt) - 1:-1].float()
    error = float((ours - expected).abs().max())
    agree = float((ours.argmax(-1) == expected.argmax(-1)).float().mean())
    tolerance = 1e-3 if dtype == "float32" else 0.25 * float(expected.abs().max())
    decoder = session._decoder
    return {"passed": error <= tolerance, "max_abs_error": error, "top1_agreement": agree, "tolerance": tolerance,
            "dtype": dtype, "steps": steps, "graph": decoder is not None and decoder.graph is not None,
            "graph_fallback": decoder.fallback if decoder is not None else None}


def check_beta(shape: str, device: str, copies: int = 4) -> dict:
    """A key stored `copies` times attends like one copy with β = log(copies)."""
    from agentloop import GenerationSettings, Session
    from agentloop.models import load_model

    loaded = load_model(shape, dtype="float32", device=device)
    prompt = list(range(2000, 2030))

    def run(merge: bool) -> torch.Tensor:
        session = Session(loaded, cap="128tok")
        for _ in session.feed(prompt):
            pass
        for i in session.cache.compactable:
            layer = session.cache.layers[i]
            keys, values = layer.keys[..., 10:11, :].clone(), layer.values[..., 10:11, :].clone()
            if merge:
                beta = torch.full(keys.shape[:-1], math.log(copies), device=keys.device)
                session.cache.replace(i, 10, 11, keys, values, beta=beta)
            else:
                session.cache.replace(i, 10, 11, keys.repeat(1, 1, copies, 1), values.repeat(1, 1, copies, 1))
        logits = [session.last_logits.clone()]
        for event in session.generate(GenerationSettings(max_new_tokens=20, ignore_eos=True)):
            if event.kind == "token":
                logits.append(session.last_logits.clone())
        return torch.stack(logits)

    error = float((run(True) - run(False)).abs().max())
    return {"passed": error <= 1e-3, "max_abs_error": error, "copies": copies}


def check_online(shape: str, device: str, cap: int, compactions: int) -> dict:
    """`am` online under a token cap: enough compactions, slots never past the cap, peak within the memory limit."""
    from agentloop import GenerationSettings, Session
    from agentloop.evals.memory import limit_bytes
    from agentloop.evals.text import prose_ids
    from agentloop.memcap import parse_mem_cap
    from agentloop.models import load_model
    from agentloop.policies import make_policy

    loaded = load_model(shape, device=device)
    ids = prose_ids(loaded.tokenizer, cap * (compactions + 2))
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    session = Session(loaded, cap=f"{cap}tok", policy=make_policy("am"))
    fed, piece, most_slots = 0, max(16, cap // 8), 0
    while session.policy_actions < compactions and fed < len(ids):
        for _ in session.feed(ids[fed:fed + piece]):
            most_slots = max(most_slots, session.cache.physical_len)
        fed += piece
    for _ in session.generate(GenerationSettings(max_new_tokens=16, ignore_eos=True)):
        most_slots = max(most_slots, session.cache.physical_len)
    cap_bytes = parse_mem_cap(f"{cap}tok").to_bytes(loaded.model.config, loaded.dtype)
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
    within = peak is None or peak <= limit_bytes(cap_bytes)
    return {"passed": session.policy_actions >= compactions and most_slots <= cap and within,
            "compactions": session.policy_actions, "most_slots": most_slots, "cap_slots": cap,
            "peak_above_weights": peak, "limit_bytes": limit_bytes(cap_bytes), "budget": session.budget.describe()}


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser

    parser = EvalParser(prog="agentloop eval gpu-check", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:qwen3-4b", help="shape-only model of the benchmarks")
    parser.add_argument("--quick", action="store_true", help="small shapes and short runs (the test suite, on CPU)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip-benchmarks", action="store_true")
    parser.add_argument("--name", default="gpu_check", help="results file name under evals/results")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from agentloop.cli import _quiet_transformers
    from agentloop.evals import write_results

    _quiet_transformers()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    small = "random:tiny-qwen3"
    model = small if args.quick else args.model
    steps = 20 if args.quick else 100
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.machine()})",
               "torch": torch.__version__, "model": model, "quick": args.quick, "checks": {}, "benchmarks": {}}
    checks = results["checks"]
    checks["logits_fp32"] = _check("logits fp32", lambda: check_logits(small, device, "float32", steps))
    checks["logits_bf16"] = _check("logits bf16", lambda: check_logits(small, device, "bfloat16", steps))
    checks["beta_duplicates"] = _check("β identity", lambda: check_beta(small, device))
    checks["online_am"] = _check("online am", lambda: check_online(small if args.quick else model, device,
                                                                    64 if args.quick else 1024, 6))
    if not args.skip_benchmarks:
        from agentloop.evals import compaction_speed, decode_speed, memory, vs_reference

        bench = results["benchmarks"]
        common = ["--model", model, "--device", device]
        if args.quick:
            common.append("--no-write")
            plan = {
                "decode_speed": (decode_speed, common + ["--contexts", "64", "--new-tokens", "8", "--rounds", "1"]),
                "compaction_speed": (compaction_speed, common + ["--lengths", "256", "--ratios", "2", "--online-caps",
                                                                  "128", "--online-events", "1"]),
                "memory": (memory, common + ["--caps", "64tok", "--policies", "am", "--compactions", "2"]),
                "vs_reference": (vs_reference, ["--source", "random", "--device", device, "--heads", "2", "--tokens",
                                                "256", "--queries", "512", "--rounds", "1", "--cases", "hak:2",
                                                "--no-write"]),
            }
        else:
            plan = {  # each writes evals/results/<name>_gpu.{json,md}
                "decode_speed": (decode_speed, common + ["--contexts", "1024", "8192", "--new-tokens", "64",
                                                          "--rounds", "3", "--name", "decode_speed_gpu"]),
                # what the written-out one-token forward is worth without a graph (agentloop.lean)
                "decode_speed_no_lean": (decode_speed, common + ["--contexts", "1024", "--decodes", "eager", "--beta",
                                                                  "off", "--new-tokens", "64", "--rounds", "3",
                                                                  "--no-lean", "--name", "decode_speed_gpu_no_lean"]),
                "compaction_speed": (compaction_speed, common + ["--lengths", "8192", "32768", "--ratios", "2", "10",
                                                                  "--online-caps", "2048", "8192", "--online-events", "2",
                                                                  "--name", "compaction_speed_gpu"]),
                "memory": (memory, common + ["--caps", "1024tok", "4096tok", "32768tok", "--policies", "am",
                                             "streaming", "--name", "memory_gpu"]),
                "vs_reference": (vs_reference, ["--source", "random", "--device", device, "--rounds", "2"]),
            }
        for key, (module, argv_) in plan.items():
            bench[key] = _check(key, lambda module=module, argv_=argv_: {"passed": module.main(argv_) == 0})
    passed = all(c.get("passed") for c in checks.values())
    lines = [f"# GPU check: {results['device']}, torch {results['torch']}", "",
             "| check | ok | figures |", "|---|---|---|"]
    for name, c in {**checks, **results["benchmarks"]}.items():
        figures = {k: v for k, v in c.items() if k not in ("passed", "traceback")}
        lines.append(f"| {name} | {'yes' if c.get('passed') else '**no**'} | `{json.dumps(figures)[:400]}` |")
    lines += ["", "Benchmark tables: evals/results/{decode_speed,compaction_speed,memory}_gpu.md and vs_reference_gpu.md.",
              "", f"Reproduce: `agentloop eval gpu-check {' '.join(argv or [])}`".strip()]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(args.name, results, text)
    return 0 if passed else 1
