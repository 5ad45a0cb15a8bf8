"""kvpress's side of `agentloop eval kvpress`; runs inside kvpress's own virtual environment.

    python kvpress_runner.py REQUEST.json

The request (written by evals/kvpress.py) names a model directory, a task, token ids and the presses to run with
their budget. The runner prints one JSON line on stdout per finished (trial, press), after a first line with the
library versions; progress goes to stderr. It imports only torch, transformers and kvpress: agentloop cannot be
installed next to kvpress's transformers pin, so tokenizing, scoring and reporting stay on agentloop's side.

Tokens are fed at their true (logical) RoPE positions while the cache holds fewer slots, as kvpress's own pipeline
does: `position_ids` counts every token seen, the cache position (and so the causal mask) counts slots held.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

# run as a script, this file's folder leads sys.path, and evals/kvpress.py there would shadow the kvpress package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def versions() -> dict:
    return {name: metadata.version(name) for name in ("kvpress", "transformers", "torch")}


def load_model(request: dict):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=getattr(torch, request["dtype"]))
    return model.eval()


def make_press(spec: dict, budget: dict):
    """spec: {wrapper, base, options}, e.g. DecodingPress over SnapKVPress(window_size=16)."""
    import kvpress

    base = getattr(kvpress, spec["base"])(**spec.get("options", {}))
    return getattr(kvpress, spec["wrapper"])(base_press=base, target_size=budget["target_size"],
                                             compression_interval=budget["compression_interval"])


class Replay:
    """One KV cache fed token ids; the press, if any, compresses it in place from its forward hooks."""

    def __init__(self, model, press=None):
        from transformers import DynamicCache

        self.model, self.press = model, press
        self.cache = DynamicCache()
        self.logical = 0  # tokens seen: the RoPE position of the next one
        self.peak = 0  # most slots a layer held during a forward (before the press compressed it)
        self.event_positions: list[int] = []  # logical length after each forward that ended in a compression

    def slots(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, ids: list[int], every_position: bool = False) -> torch.Tensor:
        """fp32 logits of the last position [vocab], or of every position [len(ids), vocab]."""
        held = self.slots() + len(ids)
        positions = torch.arange(self.logical, self.logical + len(ids))[None]
        out = self.model(input_ids=torch.tensor([ids]), position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=0 if every_position else 1)
        self.logical += len(ids)
        self.peak = max(self.peak, held)
        if self.slots() < held:
            self.event_positions.append(self.logical)
        return out.logits[0].float() if every_position else out.logits[0, -1].float()

    def snapshot(self):
        """What a fork changes: the cache's tensors (replaced, never written in place), the press's buffers and
        step counts, and the counters."""
        press_state = copy.deepcopy({k: v for k, v in vars(self.press).items() if k != "base_press"}) if self.press else None
        layers = [(layer.keys, layer.values) for layer in self.cache.layers]
        return layers, press_state, self.logical, list(self.event_positions)

    def restore(self, snapshot) -> None:
        layers, press_state, self.logical, self.event_positions = snapshot
        for layer, (keys, values) in zip(self.cache.layers, layers, strict=False):
            layer.keys, layer.values = keys, values
        if press_state is not None:
            vars(self.press).update(press_state)


def greedy_answer(run: Replay, question: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """Ask on a fork: feed the question and decode greedily, then roll back. The press does not compress on the
    fork (right after a compression the question and answer fit under the cap, as on agentloop's forks); its
    interval counts forwards, so it would otherwise compress again within the answer's single-token steps."""
    snapshot = run.snapshot()
    run.press.compression_interval = sys.maxsize  # restored with the rest of the press's state
    logits, answer = run.forward(question), []
    for _ in range(max_tokens):
        token = int(logits.argmax())
        if token in eos:
            break
        answer.append(token)
        logits = run.forward([token])
    run.restore(snapshot)
    return answer


def passkey(model, request: dict, emit) -> None:
    """Per trial and press: the prompt (holding the key), then the prose in chunks; right after each of the
    first max_k compressions the question is asked on a fork."""
    chunk, eos = request["chunk"], set(request["eos_ids"])
    for trial in request["trials"]:
        for spec in request["presses"]:
            torch.manual_seed(request["seed"] + trial["trial"])  # presses that sample (CAMPress's merges)
            tic, asked = time.perf_counter(), []
            try:
                press = make_press(spec, request["budget"])
                run = Replay(model, press)
                with press(model):
                    run.forward(trial["prompt"])  # the prefill: decoding presses leave it alone
                    prose = trial["prose"]
                    for start in range(0, len(prose), chunk):
                        events = len(run.event_positions)
                        run.forward(prose[start:start + chunk])
                        if len(run.event_positions) > events:
                            asked.append({"k": len(asked) + 1, "prose_tokens": min(start + chunk, len(prose)),
                                          "answer_ids": greedy_answer(run, trial["question"], request["answer_tokens"], eos),
                                          "logical": run.logical, "physical": run.slots()})
                            if len(asked) == request["max_k"]:
                                break
            except Exception as exc:  # one failing press is a result (reported as such), not the end of the run
                emit({"trial": trial["trial"], "row": spec["name"], "error": f"{type(exc).__name__}: {exc}"})
                continue
            emit({"trial": trial["trial"], "row": spec["name"], "asked": asked, "peak_slots": run.peak,
                  "events": len(run.event_positions), "seconds": round(time.perf_counter() - tic, 2)})
            print(f"trial {trial['trial']} {spec['name']}: {len(asked)} asks, {time.perf_counter() - tic:.0f}s",
                  file=sys.stderr, flush=True)


def fidelity(model, request: dict, emit) -> None:
    """Teacher-forced replay of prompt + continuation, uncapped first, then under each press; per position of the
    continuation: KL(uncapped || press), top-1 agreement, NLL of the continuation's token."""
    prompt, continuation, chunk = request["prompt"], request["continuation"], request["chunk"]
    targets = torch.tensor(continuation)

    fed = len(continuation) - 1  # the last token is only predicted
    starts = [0, *range(fed % chunk or chunk, fed, chunk)]  # an odd-sized forward first: the ones a press may
    # compress on all have `chunk` tokens (SnapKV's window cannot exceed the forward it compresses on)

    def replay(run: Replay):
        """Yield (first continuation index, log-probs [n, vocab]) forward by forward."""
        yield 0, run.forward(prompt)[None].log_softmax(-1)  # predicts continuation[0]
        for start, end in zip(starts, [*starts[1:], fed], strict=True):
            yield start + 1, run.forward(continuation[start:end], every_position=True).log_softmax(-1)

    tic = time.perf_counter()
    reference = torch.cat([logp for _, logp in replay(Replay(model))])  # [n, vocab]
    emit({"row": "uncapped", "top1_ids": reference.argmax(-1).tolist(),
          "nll": _rounded(-reference.gather(1, targets[:, None])[:, 0], 5), "seconds": round(time.perf_counter() - tic, 2)})
    for spec in request["presses"]:
        torch.manual_seed(request["seed"])
        tic, kl, top1, nll = time.perf_counter(), [], [], []
        try:
            press = make_press(spec, request["budget"])
            run = Replay(model, press)
            with press(model):
                for first, capped in replay(run):
                    ref = reference[first:first + len(capped)]
                    kl.append((ref.exp() * (ref - capped)).sum(-1))
                    top1.append(ref.argmax(-1) == capped.argmax(-1))
                    nll.append(-capped.gather(1, targets[first:first + len(capped), None])[:, 0])
        except Exception as exc:
            emit({"row": spec["name"], "error": f"{type(exc).__name__}: {exc}"})
            continue
        emit({"row": spec["name"], "kl": _rounded(torch.cat(kl), 6), "top1": torch.cat(top1).int().tolist(),
              "nll": _rounded(torch.cat(nll), 5), "event_positions": [p - len(prompt) for p in run.event_positions],
              "peak_slots": run.peak, "seconds": round(time.perf_counter() - tic, 2)})
        print(f"fidelity {spec['name']}: {len(run.event_positions)} compressions, {time.perf_counter() - tic:.0f}s",
              file=sys.stderr, flush=True)


def _rounded(values: torch.Tensor, digits: int) -> list[float]:
    return [round(float(x), digits) for x in values]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python kvpress_runner.py REQUEST.json", file=sys.stderr)
        return 2
    with open(argv[0]) as file:
        request = json.load(file)
    torch.set_num_threads(request.get("threads", 1))

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    emit({"versions": versions()})
    model = load_model(request)
    {"passkey": passkey, "fidelity": fidelity}[request["task"]](model, request, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
