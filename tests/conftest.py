"""Shared fixtures: tiny random-weight models built from configs, and the real default model."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from agentloop.assets import cache_dir
from agentloop.models import LoadedModel, load_model

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def _tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=16))
    elif arch == "gemma3":
        config = Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=16,
                                  sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(arch)
    # random init is tiny; scale weights up so attention is far from uniform and errors would show
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    return model.eval()


ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(params=ARCHS)
def tiny(request) -> LoadedModel:
    return LoadedModel(model=_tiny(request.param), tokenizer=None, name=f"tiny-{request.param}", source="config")


@pytest.fixture
def tiny_llama() -> LoadedModel:
    return LoadedModel(model=_tiny("llama"), tokenizer=None, name="tiny-llama", source="config")


@pytest.fixture
def tiny_gemma3() -> LoadedModel:
    return LoadedModel(model=_tiny("gemma3"), tokenizer=None, name="tiny-gemma3", source="config")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_chat(smollm2) -> LoadedModel:
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer and chat template (agent loops on it are fast)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return LoadedModel(model=LlamaForCausalLM(config).eval(), tokenizer=smollm2.tokenizer, name="tiny-chat",
                       source="config")


def reference_copy(loaded: LoadedModel) -> torch.nn.Module:
    """A stock copy of the model (plain SDPA attention), to compare the loop against."""
    model = copy.deepcopy(loaded.model)
    model.set_attn_implementation("sdpa")
    return model


# Runs `agentloop.cli.main` once per argv in ONE process (a process per command would pay the torch import each
# time), stdout and stderr captured per call; an exception escaping main is reported as such, with its traceback.
_HARNESS = r'''
import contextlib, io, json, sys, traceback
from agentloop.cli import main

results = []
for argv in json.loads(sys.stdin.read()):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "escaped"
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
'''


@pytest.fixture
def cli_batch():
    """run(argvs, cwd, env=None) -> [{argv, code, stdout, stderr}]: the CLI called in one subprocess."""
    def run(argvs: list[list[str]], cwd: Path, env: dict | None = None) -> list[dict]:
        env = {**os.environ, "AGENTLOOP_CACHE": str(cache_dir()), **(env or {})}
        done = subprocess.run([sys.executable, "-c", _HARNESS], input=json.dumps(argvs), capture_output=True,
                              text=True, cwd=cwd, env=env, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    return run
