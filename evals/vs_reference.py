"""agentloop's AM solver against the paper's own code on identical tensors: time and held-out error.

The reference is the authors' code (github.com/adamzweiger/compaction, MIT), three files loaded at run time from
`--reference` (default ../shared/reference, the folder holding `compaction_algorithms/`); nothing of it is copied
here. It runs the way the paper runs it: one (layer, KV head) at a time, `compute_compacted_cache(K, V, Q, t)`.
agentloop's `compact` solves every head of the problem batched. Both get the same fp32 tensors, the same threads,
alternating rounds; held-out error is the mean relative error of attention outputs on queries neither method fitted,
computed the same way for both (agentloop.compaction.solver.evaluate).

Tensors: `--source smollm2` = real SmolLM2 caches of prose (the first `--layers` layers x 3 KV heads; fitting queries
from the repeat-prefill, held-out queries from the text's own prefill); `--source random` = random tensors of
Qwen3-4B's head size (d = 128), for a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# the paper's named settings (../shared/reference/README.md)
REFERENCE_SETTINGS = {
    "hak": ("highest_attention_keys", "HighestAttentionKeysCompaction",
            dict(nnls_iters=2, nnls_lower_bound=math.exp(-3), nnls_upper_bound=math.exp(3), score_method="rms",
                 c2_method="lsq")),
    "omp-fast": ("omp", "OMPCompaction",
                 dict(nnls_iters=0, nnls_upper_bound=math.exp(7), drop_key_beta_cutoff=-7, c2_method="lsq", k_choice=4,
                      nnls_interval=2)),
}
NAMES = {"hak": "HighestAttnKeys", "omp-fast": "OMP-fast"}
DEFAULT_CASES = ["hak:10", "hak:2", "omp-fast:10"]


def reference_algorithm(folder: Path, method: str):
    """The reference class for `method`, imported from `folder`/compaction_algorithms."""
    from agentloop.errors import AgentloopError

    if not (folder / "compaction_algorithms").is_dir():
        raise AgentloopError(f"--reference {folder}: no compaction_algorithms/ folder there; point it at the folder "
                             "holding the paper's code (../shared/reference)")
    sys.path.insert(0, str(folder))
    try:
        module_name, cls_name, settings = REFERENCE_SETTINGS[method]
        module = importlib.import_module(f"compaction_algorithms.{module_name}")
        return getattr(module, cls_name)(**settings)
    finally:
        sys.path.remove(str(folder))


def smollm2_tensors(layers: int, tokens: int, seed: int = 0):
    """(Q fit [H, n, d], Q held-out [H, m, d], K, V [H, T, d], scale) from a real SmolLM2 cache of prose."""
    from agentloop import Session
    from agentloop.compaction.queries import repeat_queries
    from agentloop.evals import load_eval_model
    from agentloop.evals.text import prose_ids

    loaded = load_eval_model("smollm2-135m")
    ids = prose_ids(loaded.tokenizer, tokens, start_essay=seed)
    session = Session(loaded)
    for _ in session.feed(ids, record=True):
        pass
    cache = session.cache
    chosen = cache.compactable[:layers]
    fit = repeat_queries(session, ids)
    held_out = session.context_recorder.queries()
    K = torch.cat([cache.layers[i].keys[0] for i in chosen]).float()
    V = torch.cat([cache.layers[i].values[0] for i in chosen]).float()
    Q = torch.cat([fit[i] for i in chosen]).float()
    Q_held = torch.cat([held_out[i] for i in chosen]).float()
    scale = loaded.model.model.layers[0].self_attn.scaling
    return Q, Q_held, K, V, scale


def random_tensors(heads: int, tokens: int, queries: int, device: str, seed: int = 0):
    """Random fp32 tensors of Qwen3-4B's head size, keys and queries scaled so that attention is peaked."""
    generator = torch.Generator(device).manual_seed(seed)
    d = 128

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    K, V = draw(heads, tokens, d) * 2, draw(heads, tokens, d)
    Q, Q_held = draw(heads, queries, d) * 2, draw(heads, queries // 4, d) * 2
    return Q, Q_held, K, V, 1 / math.sqrt(d)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_ours(Q, K, V, t, scale, method):
    from agentloop.compaction.solver import compact

    result = compact(Q, K, V, t, scale, method=method)
    return result.keys, result.beta, result.values


def run_reference(algorithm, Q, K, V, t):
    keys, betas, values = [], [], []
    for h in range(K.shape[0]):
        C1, beta, C2, _ = algorithm.compute_compacted_cache(K[h], V[h], Q[h], t)
        keys.append(C1)
        betas.append(beta)
        values.append(C2)
    return torch.stack(keys), torch.stack(betas).float(), torch.stack(values)


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, count

    parser = EvalParser(prog="agentloop eval vs-reference", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["smollm2", "random"], default=None,
                        help="tensors (default: smollm2 on CPU, random on a GPU)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="method:ratio, method in hak, omp-fast")
    parser.add_argument("--layers", type=count, default=8, help="smollm2: layers whose KV heads are compacted")
    parser.add_argument("--tokens", type=count, default=1024)
    parser.add_argument("--heads", type=count, default=16, help="random: heads")
    parser.add_argument("--queries", type=count, default=16384, help="random: fitting queries per head")
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--reference", default=str(Path(__file__).resolve().parents[2] / "shared" / "reference"),
                        help="folder holding the paper's compaction_algorithms/ (default ../shared/reference)")
    parser.add_argument("--name", default=None, help="results name (default vs_reference or vs_reference_gpu)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from agentloop.compaction.solver import evaluate
    from agentloop.errors import AgentloopError
    from agentloop.evals import write_results

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = args.source or ("random" if device.startswith("cuda") else "smollm2")
    cases = []
    for case in args.cases:
        method, _, ratio = case.partition(":")
        if method not in REFERENCE_SETTINGS or not ratio.isdigit() or int(ratio) < 2:
            raise AgentloopError(f"--cases {case!r}: write method:ratio with method hak or omp-fast and ratio >= 2")
        cases.append((method, int(ratio)))
    if args.rounds < 1:
        raise AgentloopError(f"--rounds must be at least 1, got {args.rounds}")
    folder = Path(args.reference)
    algorithms = {m: reference_algorithm(folder, m) for m in {m for m, _ in cases}}
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 for both, as the reference was measured
    if source == "smollm2":
        Q, Q_held, K, V, scale = smollm2_tensors(args.layers, args.tokens)
    else:
        Q, Q_held, K, V, scale = random_tensors(args.heads, args.tokens, args.queries, device)
    Q, Q_held, K, V = (x.to(device) for x in (Q, Q_held, K, V))
    if abs(scale - 1 / math.sqrt(K.shape[-1])) > 1e-9:
        raise AgentloopError(f"the reference scales logits by 1/sqrt(d); these tensors use {scale}")

    rows = []
    for method, ratio in cases:
        t = K.shape[1] // ratio
        times = {"ours": [], "reference": []}
        errors = {}
        for r in range(args.rounds):
            for who in (("ours", "reference") if r % 2 == 0 else ("reference", "ours")):
                _sync(device)
                tic = time.perf_counter()
                out = run_ours(Q, K, V, t, scale, method) if who == "ours" else run_reference(algorithms[method], Q, K, V, t)
                _sync(device)
                times[who].append(time.perf_counter() - tic)
                errors[who] = float(evaluate(Q_held, K, V, None, *out, scale)[0].mean())
        ratios = [b / a for a, b in zip(times["ours"], times["reference"], strict=True)]
        row = {"method": NAMES[method], "ratio": ratio, "heads": K.shape[0], "tokens": K.shape[1], "kept": t,
               "queries": Q.shape[1], "held_out_queries": Q_held.shape[1],
               "ours_seconds": round(statistics.median(times["ours"]), 4),
               "reference_seconds": round(statistics.median(times["reference"]), 4),
               "speedup": round(statistics.median(ratios), 2),
               "ours_held_out_error": round(errors["ours"], 4), "reference_held_out_error": round(errors["reference"], 4),
               "error_ratio": round(errors["ours"] / errors["reference"], 4), "rounds": times}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "rounds"}, flush=True)

    name = args.name or ("vs_reference" if not device.startswith("cuda") else "vs_reference_gpu")
    command = ("agentloop eval vs-reference " + " ".join(argv or [])).strip()
    where = (f"{device}, {torch.get_num_threads()} threads" if not device.startswith("cuda")
             else torch.cuda.get_device_name())
    lines = [f"# agentloop's AM solver vs the paper's reference code, identical tensors ({source}, {where}, fp32)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| method | ratio | heads x tokens | fitting queries | kept | agentloop s | reference s | speedup "
             "(median of rounds) | held-out error agentloop / reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']}x | {r['heads']} x {r['tokens']} | {r['queries']} | {r['kept']} | "
                     f"{r['ours_seconds']:.3f} | {r['reference_seconds']:.3f} | **{r['speedup']:.1f}x** | "
                     f"{r['ours_held_out_error']:.4f} / {r['reference_held_out_error']:.4f} |")
    lines += ["", f"torch {torch.__version__}, {platform.machine()}; {args.rounds} alternating rounds.", "",
              f"Reproduce: `{command}`"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(name, {"benchmark": "vs-reference", "source": source, "device": device, "rows": rows,
                             "config": vars(args), "command": command}, text)
    return 0
