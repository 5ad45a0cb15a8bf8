"""Online fidelity: a long continuation replayed teacher-forced under a cap that forces repeated compactions.

The uncapped model writes a long continuation once (sampled, seeded). The prompt and continuation are then
replayed teacher-forced, in chunks, by the capped loop with each memory policy: the policy acts whenever the
next chunk would not fit, exactly as in a live run. At every position of the continuation the capped model's
next-token distribution is compared with the uncapped one: KL(uncapped || capped), top-1 agreement, and the
NLL of the token the uncapped model actually wrote. Metrics are reported over the whole continuation and over
the part after the 6th compaction (the issue's "after 6 halvings").
"""

from __future__ import annotations

import statistics
import time

import torch

PROMPT = ("Write a long, detailed essay about how a small town changed over one hundred years: its people, "
          "its work, its buildings and its stories. Use many names, dates and numbers.")
DEFAULT_POLICIES = ("am-repeat", "am-both", "am-recorded", "h2o", "snapkv", "streaming", "truncate")
REPETITION_PENALTY = 1.1  # a tiny model's sampled text otherwise falls into loops that any policy predicts
AFTER = 6  # report the continuation after this many compactions separately
PROMPT_SHARE = 0.5  # `-prompt` policies: share of the fitting rows given to the first prompt and its draft reply
PROMPT_LEGEND = (f"`-prompt` = with `prompt_share: {PROMPT_SHARE}` (at each compaction the first prompt is read again "
                 "with the model's greedy draft reply, and those queries are that share of the fitting rows; the "
                 "prompt is compacted all the same)")


def policy_for(name: str, seed: int, protect_recent: int = 20):
    """The named policy of this benchmark: `am-repeat`, `am-recorded` and `am-both` are `am` with repeat-prefill
    queries, decode-time queries, or both (`am`'s default); with `-all` appended (`am-both-all`) each compaction
    re-reads the whole context (the paper's protocol) instead of only the text added since the previous one; with
    `-prompt` appended (`am-repeat-prompt`, `snapkv-prompt`) the first prompt is read again at each compaction and
    its queries get PROMPT_SHARE of the rows (the policies' `prompt_share`)."""
    from agentloop.policies import make_policy

    name, prompt = (name[:-7], {"prompt_share": PROMPT_SHARE}) if name.endswith("-prompt") else (name, {})
    base, reread = (name[:-4], "all") if name.endswith("-all") else (name, "new")
    if base in ("am-repeat", "am-recorded", "am-both"):
        queries = {"am-repeat": "repeat", "am-recorded": "recorded", "am-both": "repeat+recorded"}[base]
        return make_policy("am", queries=queries, reread=reread, seed=seed, protect_recent=protect_recent, **prompt)
    if name in ("am", "h2o", "snapkv"):
        return make_policy(name, seed=seed, protect_recent=protect_recent, **prompt)
    return make_policy(name, **prompt)


def generate_continuation(loaded, prompt_ids: list[int], tokens: int, seed: int,
                          repetition_penalty: float = REPETITION_PENALTY) -> list[int]:
    from agentloop import GenerationSettings, Session

    session = Session(loaded)
    list(session.feed(prompt_ids))
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.8, top_p=0.95, repetition_penalty=repetition_penalty,
                                  seed=seed, ignore_eos=True)
    return [e.token_id for e in session.generate(settings) if e.kind == "token"]


def replay(loaded, prompt_ids: list[int], continuation: list[int], cap: str | None, policy, chunk: int):
    """Teacher-forced logits at every continuation position [n, vocab], the compaction events, and seconds."""
    from agentloop import Session

    session = Session(loaded, cap=cap, policy=policy, prefill_chunk=chunk)
    list(session.feed(prompt_ids))
    first = session.last_logits.clone()  # predicts continuation[0]
    chunks, events = [first[None]], []
    tic = time.perf_counter()
    for event in session.feed(continuation[:-1], on_logits=chunks.append):
        if event.kind == "policy":
            events.append({"position": session.cache.logical_len - len(prompt_ids), "physical_before": event.physical_before,
                           "physical_after": event.physical_after, "seconds": round(event.seconds, 3),
                           **{k: event.details[k] for k in ("output_error", "mass_error") if k in event.details}})
    return torch.cat(chunks), events, time.perf_counter() - tic, session


def compare(reference: torch.Tensor, capped: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position KL(reference || capped), top-1 agreement and NLL of the targets: each [n]."""
    ref_logp, cap_logp = reference.log_softmax(-1), capped.log_softmax(-1)
    return {"kl": (ref_logp.exp() * (ref_logp - cap_logp)).sum(-1),
            "top1": (reference.argmax(-1) == capped.argmax(-1)).float(),
            "nll": -cap_logp.gather(1, targets[:, None])[:, 0]}


def main(argv: list[str] | None = None) -> int:
    from agentloop.evals import EvalParser, add_output_options, count, positive, whole

    parser = EvalParser(prog="agentloop eval online-fidelity", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=count, default=2048, help="length of the continuation")
    parser.add_argument("--mem-cap", default="512tok", help="cap of the replays (must force >= 6 compactions)")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    parser.add_argument("--chunk", type=count, default=16, help="teacher-forcing chunk (the policy acts between chunks)")
    parser.add_argument("--protect-recent", type=whole, default=20, help="newest tokens am/h2o/snapkv keep verbatim")
    parser.add_argument("--repetition-penalty", type=positive, default=REPETITION_PENALTY,
                        help="of the uncapped sampled continuation (higher keeps a small model out of loops)")
    parser.add_argument("--seed", type=whole, default=0)
    add_output_options(parser, "online_fidelity")
    args = parser.parse_args(argv)

    from agentloop.chat import encode_messages
    from agentloop.evals import load_eval_model

    loaded = load_eval_model(args.model)
    prompt_ids = encode_messages(loaded.tokenizer, [{"role": "user", "content": PROMPT}])
    tic = time.perf_counter()
    continuation = generate_continuation(loaded, prompt_ids, args.tokens, args.seed, args.repetition_penalty)
    print(f"continuation: {len(continuation)} tokens in {time.perf_counter() - tic:.0f}s", flush=True)
    reference, _, uncapped_s, _ = replay(loaded, prompt_ids, continuation, None, None, args.chunk)
    targets = torch.tensor(continuation)
    ref_nll = float(-reference.log_softmax(-1).gather(1, targets[:, None]).mean())

    rows, curves = {}, {}
    for name in args.policies:
        capped, events, seconds, session = replay(loaded, prompt_ids, continuation, args.mem_cap,
                                                  policy_for(name, args.seed, args.protect_recent), args.chunk)
        metrics = compare(reference, capped, targets)
        after = events[AFTER - 1]["position"] if len(events) >= AFTER else None
        row = {"events": len(events), "peak_bytes": session.peak_bytes, "cap_bytes": session.cap_bytes,
               "final_logical": session.cache.logical_len, "final_physical": session.cache.physical_len,
               "seconds": round(seconds, 1), "compaction_seconds": round(sum(e["seconds"] for e in events), 1),
               "compactions": events}
        for key, values in metrics.items():
            row[key] = float(values.mean())
            row[f"{key}_after_{AFTER}"] = float(values[after:].mean()) if after is not None else None
        rows[name], curves[name] = row, metrics["top1"].tolist()
        print(f"{name:12s} {len(events)} events, top-1 {row['top1']:.3f} (after {AFTER}: "
              f"{_fmt(row[f'top1_after_{AFTER}'])}), KL {row['kl']:.3f}, NLL {row['nll']:.3f} (uncapped {ref_nll:.3f}), "
              f"{seconds:.0f}s", flush=True)

    text = _markdown(args, argv, rows, ref_nll, len(continuation), len(prompt_ids))
    print(text)
    if not args.no_write:
        from agentloop.evals import results_dir, write_results

        write_results(args.name, {"benchmark": "online-fidelity", "config": vars(args),
                                          "prompt_tokens": len(prompt_ids), "continuation": continuation,
                                          "uncapped_nll": ref_nll, "uncapped_seconds": round(uncapped_s, 1),
                                          "policies": rows, "top1_per_position": curves}, text)
        _plot(curves, rows, results_dir() / f"{args.name}.png", args.mem_cap)
    return 0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _markdown(args, argv, rows: dict, ref_nll: float, n: int, prompt_tokens: int) -> str:
    command = ("agentloop eval online-fidelity " + " ".join(argv or [])).strip()
    lines = [f"# Online fidelity on {args.model}: teacher-forced replay under a {args.mem_cap} cap", "",
             (f"The uncapped model wrote {n} tokens (sampled: T=0.8, top-p 0.95, repetition penalty "
              f"{getattr(args, 'repetition_penalty', REPETITION_PENALTY)}, "
              f"seed {args.seed}) after a {prompt_tokens}-token "
              f"prompt. Each policy replays them in {args.chunk}-token chunks under the cap and compacts or evicts "
              f"whenever the next chunk would not fit. Metrics per continuation position against the uncapped run; "
              f"'after {AFTER}' = positions after the {AFTER}th compaction. Uncapped NLL of its own text: "
              f"{ref_nll:.3f}."), "",
             (f"| policy | events | top-1 agree | top-1 after {AFTER} | KL | KL after {AFTER} | NLL | NLL after {AFTER} "
             "| peak / cap | replay s (compaction s) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['events']} | {r['top1']:.3f} | {_fmt(r[f'top1_after_{AFTER}'])} | {r['kl']:.3f} | "
                     f"{_fmt(r[f'kl_after_{AFTER}'])} | {r['nll']:.3f} | {_fmt(r[f'nll_after_{AFTER}'])} | "
                     f"{r['peak_bytes'] / r['cap_bytes']:.3f} | {r['seconds']} ({r['compaction_seconds']}) |")
    medians = {name: statistics.median(e["output_error"] for e in r["compactions"])
               for name, r in rows.items() if r["compactions"] and "output_error" in r["compactions"][0]}
    if medians:
        lines += ["", "Median fit error per compaction (relative attention-output error on the fitting queries): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()) + "."]
    lines += ["", (f"`am-repeat` = Attention Matching (am-hak-fast, ratio 0.5, {args.protect_recent} newest tokens "
                   "protected) with repeat-prefill queries, re-reading at each compaction only the text added since "
                   "the previous one (`-all`: the whole context, the paper's protocol); `am-recorded` = "
                   "the same with the queries of the newest 256 tokens; `am-both` = both sources (policy `am`'s default); "
              "`h2o`/`snapkv` = eviction at the same schedule scored by the newest 256 tokens' queries; `streaming` = "
              "4 sinks + recent window; `truncate` = keeps the prompt, drops the oldest tokens after it; "
              f"{PROMPT_LEGEND}."),
              "", f"Reproduce: `{command}`"]
    return "\n".join(lines)


def _plot(curves: dict[str, list[float]], rows: dict, path, cap: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    window = 128
    for name, top1 in curves.items():
        values = torch.tensor(top1)
        rolling = values.unfold(0, window, 1).mean(-1) if len(values) >= window else values
        style = "-" if name.startswith("am") else "--"
        ax.plot(range(window - 1, window - 1 + len(rolling)), rolling.tolist(), style, lw=1.2, label=name)
    for event in next(iter(rows.values()), {}).get("compactions", []):
        ax.axvline(event["position"], color="grey", lw=0.5, alpha=0.5)
    ax.set_xlabel(f"continuation position (grey: {next(iter(rows), '')} actions)")
    ax.set_ylabel(f"top-1 agreement with uncapped ({window}-token mean)")
    ax.set_title(f"Teacher-forced replay under a {cap} cap")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
