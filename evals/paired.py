"""Paired comparisons: two rows measured on the same units (problems, trials, positions of one text).

`paired_bootstrap` gives a percentile interval for the difference of the two means (units resampled together,
in blocks when neighbouring units are correlated, as positions of one text are); `mcnemar` is the exact test on
the discordant pairs of two right/wrong rows; `verdict` reads an interval as a win, a tie or a loss.
"""

from __future__ import annotations

import math

import torch


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0, block: int = 1,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(a) - mean(b), resampling the units (pairs) with replacement, `block`
    consecutive units at a time (a moving-block bootstrap; 1 = independent units)."""
    if len(a) != len(b):
        raise ValueError(f"paired rows need the same units: {len(a)} vs {len(b)} values")
    if not a:
        raise ValueError("no paired units to compare")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    n, block = len(diff), max(1, min(block, len(diff)))
    generator = torch.Generator().manual_seed(seed)
    blocks = math.ceil(n / block)
    starts = torch.randint(0, n - block + 1, (resamples, blocks), generator=generator)
    index = (starts[..., None] + torch.arange(block)).reshape(resamples, -1)[:, :n]  # [resamples, n]
    means = diff[index].mean(-1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test: `only_a` units right in a and wrong in b, `only_b` the reverse; `p` is the two-sided
    probability of a split at least this uneven if either row were equally likely to win a discordant unit."""
    if len(a) != len(b):
        raise ValueError(f"paired rows need the same units: {len(a)} vs {len(b)} values")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * tail)}


def verdict(interval: tuple[float, float]) -> str:
    """'win' when the whole interval of a - b lies above 0, 'loss' when below, else 'tie'."""
    low, high = interval
    return "win" if low > 0 else "loss" if high < 0 else "tie"
