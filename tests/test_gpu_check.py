"""`agentloop eval gpu-check --quick` on CPU: the one-command device check starts, and every check and benchmark
in it runs (small shapes), so that a session lent a GPU does not find it broken."""

from __future__ import annotations

from pathlib import Path


def test_gpu_check_quick_runs_every_check_and_benchmark(tmp_path, monkeypatch, capsys):
    from agentloop.evals import gpu_check

    monkeypatch.chdir(tmp_path)
    assert gpu_check.main(["--quick", "--device", "cpu", "--no-write"]) == 0
    out = capsys.readouterr().out
    for name in ("logits fp32", "logits bf16", "β identity", "online am", "decode_speed", "compaction_speed", "memory"):
        assert f"[gpu-check] {name}: ok" in out, name
    reference = Path(gpu_check.__file__).resolve().parents[2] / "shared" / "reference" / "compaction_algorithms"
    if reference.is_dir():  # the paper's code is read from ../shared, never shipped: where it is, it must run too
        assert "[gpu-check] vs_reference: ok" in out
    assert not list(tmp_path.rglob("*.json"))  # --no-write: nothing written
