"""Model loading: alias, directory, HF cache, errors."""

from __future__ import annotations

import time

import pytest
import torch

from agentloop.errors import AgentloopError
from agentloop.models import cache_dir, load_model


def test_default_alias_reloads_fast_from_safetensors(smollm2):
    start = time.perf_counter()
    again = load_model("smollm2-135m")
    assert time.perf_counter() - start < 2.0
    assert again.dtype == torch.float32 and again.model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in smollm2.model.parameters())


def test_local_directory_loads_the_same_weights(smollm2):
    loaded = load_model(str(cache_dir() / "models" / "smollm2-135m"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, smollm2.model(ids).logits)


def test_hf_id_not_in_local_cache():
    with pytest.raises(AgentloopError, match="not in the local Hugging Face cache"):
        load_model("nobody/no-such-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(AgentloopError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_dtype():
    with pytest.raises(AgentloopError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="float8")


def test_unknown_name():
    with pytest.raises(AgentloopError, match="not found"):
        load_model("definitely-not-a-model")


def test_a_gguf_split_over_several_wheels_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    import hashlib
    import zipfile

    from agentloop.models import PackagedGGUF, _packaged_gguf

    monkeypatch.setenv("AGENTLOOP_CACHE", str(tmp_path))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    pieces = [b"GGUF first piece|", b"second piece|", b"third"]
    for i, piece in enumerate(pieces, 1):  # wheels already in the download cache: nothing is fetched
        with zipfile.ZipFile(downloads / f"split_model_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"split_model_part{i}/data/part{i}.bin", piece)
    whole = b"".join(pieces)
    parts = tuple((f"split-model-part{i}==1.0", f"split_model_part{i}/data/part{i}.bin") for i in (1, 2, 3))
    good = PackagedGGUF(parts, "model.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    assert _packaged_gguf(good).read_bytes() == whole
    (downloads / "model.gguf").unlink()
    shuffled = PackagedGGUF((parts[1], parts[0], parts[2]), "model.gguf", good.size, good.sha256)
    with pytest.raises(AgentloopError, match="fails its size/sha256 check"):
        _packaged_gguf(shuffled)
    assert not (downloads / "model.gguf").exists() and not (downloads / "model.part").exists()
