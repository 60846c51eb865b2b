"""LoRA adapters in PEFT's format: reading and validating them against the base model.

Owns the boundary between files on disk and the engine: everything that an adapter folder written
by `PeftModel.save_pretrained` may hold that slora cannot serve exactly is refused here, with an
`AdapterError` naming the file and the problem, so that nothing downstream has to check again.

Two steps, because registration must stay cheap when thousands of adapters are registered:
- `read_adapter` reads `adapter_config.json` and the safetensors header only (names, shapes,
  dtypes), resolves which (layer, module) pairs the adapter targets with which rank and scaling,
  and checks every tensor's shape against the base model.
- `load_adapter_weights` reads the tensors themselves (as float32) and checks their values.

PEFT's matching rules are followed for `target_modules` (a list of names or suffixes, a regex
string, or "all-linear"), `layers_to_transform` / `layers_pattern`, `exclude_modules`, and
`rank_pattern` / `alpha_pattern` (first key `k` in file order with `(.*\\.)?k$` matching the module's
full name, e.g. `model.layers.3.self_attn.q_proj`), so ranks and scalings may differ per layer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes

from slora.architecture import ArchitectureSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

EMBEDDING_MODULES = ("embed_tokens", "lm_head")
# Config keys of LoRA variants whose math is not `s * B @ A @ x` on the base weights: refused when set.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA bias (lora_bias) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) is not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}
# Initialisations that also change the base weights: only usable once PEFT converted them to LoRA.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga")

# `...layers.3.self_attn.q_proj.lora_A.weight`, with any prefix and optionally the adapter's name
# before `weight` (`lora_A.default.weight`).
TENSOR_NAME = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]\w*)\.(?P<module>[A-Za-z_]\w*)"
    r"\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$"
)
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AdapterError(ValueError):
    """An adapter that slora refuses; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter: what it targets, with which ranks and scalings. No weights held.

    `ranks[m]` is the largest rank of module `m` over its layers and `scalings[m]` its scaling in its
    first layer; both are exact unless `rank_pattern` / `alpha_pattern` differ per layer. The exact
    per-(layer, module) values are `rank(layer, m)` and `scaling(layer, m)`, over `pairs`.
    """

    name: str
    path: Path
    weights_file: Path
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    ranks: dict[str, int]
    scalings: dict[str, float]
    max_rank: int
    use_rslora: bool
    layer_ranks: dict[tuple[int, str], int] = field(repr=False)
    layer_scalings: dict[tuple[int, str], float] = field(repr=False)
    tensor_names: dict[tuple[int, str], tuple[str, str]] = field(repr=False)

    @property
    def pairs(self) -> tuple[tuple[int, str], ...]:
        """Targeted (layer, module) pairs in canonical order: by layer, then module order."""
        return tuple(self.layer_ranks)

    def rank(self, layer: int, module: str) -> int:
        return self.layer_ranks[(layer, module)]

    def scaling(self, layer: int, module: str) -> float:
        return self.layer_scalings[(layer, module)]

    def num_parameters(self, arch: ArchitectureSpec) -> int:
        return sum(r * sum(arch.shape(m)) for (_, m), r in self.layer_ranks.items())


@dataclass
class LoRAWeights:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float


def read_adapter(name: str, path: str | Path, arch: ArchitectureSpec, max_rank: int = 256) -> AdapterSpec:
    """Validate an adapter folder from its config and safetensors header; reads no weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterError(folder, "adapter folder not found")
    folder = folder.resolve()
    config = _read_config(folder / CONFIG_FILE)
    weights_file = _weights_file(folder)
    pairs = _target_pairs(config, folder / CONFIG_FILE, arch)
    layer_ranks, layer_scalings = _ranks_and_scalings(config, folder / CONFIG_FILE, pairs, arch, max_rank)
    tensor_names = _check_header(weights_file, arch, layer_ranks)
    modules = tuple(m for m in arch.module_names if any(pm == m for _, pm in pairs))
    ranks = {m: max(r for (_, pm), r in layer_ranks.items() if pm == m) for m in modules}
    scalings = {m: next(s for (_, pm), s in layer_scalings.items() if pm == m) for m in modules}
    return AdapterSpec(
        name=name, path=folder, weights_file=weights_file, target_modules=modules,
        layers=tuple(sorted({layer for layer, _ in pairs})), ranks=ranks, scalings=scalings,
        max_rank=max(layer_ranks.values()), use_rslora=bool(config.get("use_rslora", False)),
        layer_ranks=layer_ranks, layer_scalings=layer_scalings, tensor_names=tensor_names,
    )


def load_adapter_weights(spec: AdapterSpec, arch: ArchitectureSpec) -> dict[tuple[int, str], LoRAWeights]:
    """Read every (layer, module)'s A and B as float32; check shapes again and that values are finite."""
    weights: dict[tuple[int, str], LoRAWeights] = {}
    # One read of the whole file: safetensors 0.8's per-tensor reads (get_tensor, slices, load_file)
    # leak a little memory per tensor, which adds up when adapters are loaded and evicted all day.
    try:
        tensors = load_safetensors_bytes(spec.weights_file.read_bytes())
    except Exception as err:  # noqa: BLE001 - the file changed, vanished or is corrupt
        raise AdapterError(spec.weights_file, f"cannot read the tensors: {err}") from err
    for (layer, module), (name_a, name_b) in spec.tensor_names.items():
        r = spec.rank(layer, module)
        (in_features, out_features) = arch.shape(module)
        factors = []
        for tensor_name, expected in ((name_a, (r, in_features)), (name_b, (out_features, r))):
            if tensor_name not in tensors:
                raise AdapterError(spec.weights_file, f"tensor {tensor_name} is missing (the file changed)")
            tensor = tensors[tensor_name].to(torch.float32).contiguous()
            if tuple(tensor.shape) != expected:
                raise AdapterError(spec.weights_file, f"tensor {tensor_name} has shape "
                                   f"{list(tensor.shape)}, expected {list(expected)}")
            if not torch.isfinite(tensor).all():
                raise AdapterError(spec.weights_file, f"tensor {tensor_name} has non-finite values (NaN/Inf)")
            factors.append(tensor)
        weights[(layer, module)] = LoRAWeights(A=factors[0], B=factors[1], scaling=spec.scaling(layer, module))
    return weights


# --- adapter_config.json ---------------------------------------------------------------------------

def _read_config(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        raise AdapterError(config_file, "missing adapter_config.json: not a PEFT adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(config_file, f"malformed JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterError(config_file, f"malformed config: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterError(config_file, f"peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for key, problem in UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise AdapterError(config_file, problem)
    if config.get("modules_to_save"):
        raise AdapterError(config_file, f"modules_to_save={config['modules_to_save']!r} is not supported: "
                           "an adapter may only add LoRA deltas, not replace whole modules")
    if config.get("bias", "none") != "none":
        raise AdapterError(config_file, f"bias={config['bias']!r} is not supported (only 'none'): "
                           "the adapter would change the base model's biases")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise AdapterError(config_file, f"init_lora_weights={init!r} changes the base weights; save it with "
                           "PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter")
    return config


def _weights_file(folder: Path) -> Path:
    weights_file = folder / WEIGHTS_FILE
    if weights_file.is_file():
        return weights_file
    if (folder / PICKLE_WEIGHTS_FILE).is_file():
        raise AdapterError(folder / PICKLE_WEIGHTS_FILE, "pickle weights (adapter_model.bin) are not loaded "
                           "(unsafe); convert the adapter to adapter_model.safetensors")
    raise AdapterError(weights_file, "missing weights file adapter_model.safetensors")


def _target_pairs(config: dict[str, Any], config_file: Path, arch: ArchitectureSpec) -> list[tuple[int, str]]:
    """The (layer, module) pairs the config targets, in canonical order, with PEFT's matching rules."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.strip().lower() == "all-linear":
        targets = list(arch.module_names)
    if isinstance(targets, str):
        _check_target_regex(targets, config_file)
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        _check_target_names(targets, config_file, arch)
    else:
        raise AdapterError(config_file, f"target_modules must be a non-empty list of names or a regex string, "
                           f"got {targets!r}")
    _check_layers(config, config_file, arch)
    pairs = [(layer, module) for layer in range(arch.num_layers) for module in arch.module_names
             if _is_targeted(config, targets, arch.module_path(layer, module), config_file)]
    if not pairs:
        raise AdapterError(config_file, f"target_modules={targets!r} with layers_to_transform="
                           f"{config.get('layers_to_transform')!r} targets no linear layer of the base model")
    return pairs


def _check_target_regex(pattern: str, config_file: Path) -> None:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise AdapterError(config_file, f"target_modules regex {pattern!r} is invalid: {err}") from err
    for embedding in ("model.embed_tokens", "lm_head"):
        if regex.fullmatch(embedding):
            raise AdapterError(config_file, f"target_modules regex {pattern!r} targets {embedding}: "
                               "LoRA on embeddings/lm_head is not supported")


def _check_target_names(targets: list[str], config_file: Path, arch: ArchitectureSpec) -> None:
    known = [arch.module_path(layer, module) for layer in range(arch.num_layers) for module in arch.module_names]
    for target in targets:
        if target.split(".")[-1] in EMBEDDING_MODULES:
            raise AdapterError(config_file, f"target module {target!r}: LoRA on embeddings/lm_head is not supported")
        if any(key == target or key.endswith("." + target) for key in known):
            continue
        layer = LAYER_INDEX.search(target)
        if layer and int(layer.group(1)) >= arch.num_layers:
            raise AdapterError(config_file, f"target module {target!r} is in layer {layer.group(1)}, outside the "
                               f"base model ({arch.num_layers} layers)")
        raise AdapterError(config_file, f"unknown target module {target!r}; supported: "
                           f"{', '.join(arch.module_names)}")


def _check_layers(config: dict[str, Any], config_file: Path, arch: ArchitectureSpec) -> None:
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else (layers or [])
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < arch.num_layers:
            raise AdapterError(config_file, f"layers_to_transform has layer {layer!r}, outside the base model "
                               f"({arch.num_layers} layers)")


def _is_targeted(config: dict[str, Any], targets: str | list[str], key: str, config_file: Path) -> bool:
    """PEFT's `check_target_module_exists` for one module name."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith("." + e) for e in exclude):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    layer_indexes = config.get("layers_to_transform")
    if layer_indexes is None or layer_indexes == []:
        return True
    layer_patterns = config.get("layers_pattern") or []
    layer_patterns = [layer_patterns] if isinstance(layer_patterns, str) else layer_patterns
    match = None
    try:
        if not layer_patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        for pattern in layer_patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    except re.error as err:
        raise AdapterError(config_file, f"layers_pattern {layer_patterns!r} is invalid: {err}") from err
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes


def _ranks_and_scalings(config: dict[str, Any], config_file: Path, pairs: list[tuple[int, str]],
                        arch: ArchitectureSpec,
                        max_rank: int) -> tuple[dict[tuple[int, str], int], dict[tuple[int, str], float]]:
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    default_r = config.get("r", 8)
    default_alpha = config.get("lora_alpha", 8)
    use_rslora = bool(config.get("use_rslora", False))
    ranks, scalings = {}, {}
    for layer, module in pairs:
        key = arch.module_path(layer, module)
        r = _pattern_value(rank_pattern, key, default_r, "rank_pattern", config_file)
        alpha = _pattern_value(alpha_pattern, key, default_alpha, "alpha_pattern", config_file)
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= max_rank:
            raise AdapterError(config_file, f"rank {r!r} of {key} is outside 1..{max_rank} (the engine's max_rank)")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise AdapterError(config_file, f"lora_alpha {alpha!r} of {key} is not a finite number")
        ranks[(layer, module)] = r
        scalings[(layer, module)] = alpha / math.sqrt(r) if use_rslora else alpha / r
    return ranks, scalings


def _pattern_value(pattern: dict[str, Any], key: str, default: Any, field_name: str, config_file: Path) -> Any:
    """PEFT's `get_pattern_key`: the first pattern key `k` with `(.*\\.)?(k)$` matching `key`."""
    if not isinstance(pattern, dict):
        raise AdapterError(config_file, f"{field_name} must be an object, got {pattern!r}")
    for pattern_key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({pattern_key})$", key):
                return value
        except re.error as err:
            raise AdapterError(config_file, f"{field_name} key {pattern_key!r} is invalid: {err}") from err
    return default


# --- adapter_model.safetensors header --------------------------------------------------------------

def _open_safetensors(weights_file: Path):
    try:
        return safe_open(str(weights_file), framework="pt")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError
        raise AdapterError(weights_file, f"unreadable safetensors file (corrupt or truncated): {err}") from err


def _check_header(weights_file: Path, arch: ArchitectureSpec,
                  ranks: dict[tuple[int, str], int]) -> dict[tuple[int, str], tuple[str, str]]:
    """Match every tensor of the file to a targeted (layer, module) and check its shape."""
    found: dict[tuple[int, str, str], str] = {}
    with _open_safetensors(weights_file) as f:
        for tensor_name in f.keys():
            layer, module, factor = _parse_tensor_name(tensor_name, weights_file, arch)
            if (layer, module) not in ranks:
                raise AdapterError(weights_file, f"tensor {tensor_name}: layer {layer} {module} is not targeted "
                                   "by adapter_config.json (config and weights disagree)")
            if (layer, module, factor) in found:
                raise AdapterError(weights_file, f"tensors {found[(layer, module, factor)]} and {tensor_name} both "
                                   f"hold lora_{factor} of layer {layer} {module}")
            found[(layer, module, factor)] = tensor_name
            tensor = f.get_slice(tensor_name)
            _check_tensor_shape(weights_file, tensor_name, tensor.get_shape(), tensor.get_dtype(), factor,
                                arch.shape(module), ranks[(layer, module)])
    names = {}
    for layer, module in ranks:
        for factor in "AB":
            if (layer, module, factor) not in found:
                raise AdapterError(weights_file, f"missing lora_{factor} tensor for layer {layer} {module}")
        names[(layer, module)] = (found[(layer, module, "A")], found[(layer, module, "B")])
    return names


def _parse_tensor_name(tensor_name: str, weights_file: Path, arch: ArchitectureSpec) -> tuple[int, str, str]:
    if tensor_name.endswith(".bias"):
        raise AdapterError(weights_file, f"bias tensor {tensor_name} is not supported (only LoRA A/B weights)")
    if "lora_magnitude_vector" in tensor_name:
        raise AdapterError(weights_file, f"tensor {tensor_name} is a DoRA magnitude: DoRA is not supported")
    if any(e in tensor_name.split(".") for e in EMBEDDING_MODULES) or "lora_embedding" in tensor_name:
        raise AdapterError(weights_file, f"tensor {tensor_name}: LoRA on embeddings/lm_head is not supported")
    match = TENSOR_NAME.match(tensor_name)
    if match is None:
        raise AdapterError(weights_file, f"unrecognised tensor {tensor_name}: expected "
                           "...layers.<i>.<block>.<module>.lora_<A|B>.weight")
    layer, block, module = int(match["layer"]), match["block"], match["module"]
    if module not in arch.index or arch.target(module).block != block:
        raise AdapterError(weights_file, f"tensor {tensor_name}: unknown target module {block}.{module}")
    if layer >= arch.num_layers:
        raise AdapterError(weights_file, f"tensor {tensor_name} is for layer {layer}, outside the base model "
                           f"({arch.num_layers} layers)")
    return layer, module, match["factor"]


def _check_tensor_shape(weights_file: Path, tensor_name: str, shape: list[int], dtype: str, factor: str,
                        features: tuple[int, int], rank: int) -> None:
    if dtype not in ("F64", "F32", "F16", "BF16"):
        raise AdapterError(weights_file, f"tensor {tensor_name} has dtype {dtype}; expected a float type")
    if len(shape) != 2:
        raise AdapterError(weights_file, f"tensor {tensor_name} has shape {shape}; expected a matrix")
    in_features, out_features = features
    tensor_rank, width = (shape[0], shape[1]) if factor == "A" else (shape[1], shape[0])
    expected_width = in_features if factor == "A" else out_features
    if width != expected_width:
        side = "in_features" if factor == "A" else "out_features"
        raise AdapterError(weights_file, f"tensor {tensor_name} has shape {shape} but the base model's module has "
                           f"{side}={expected_width}: adapter trained for another base model?")
    if tensor_rank != rank:
        raise AdapterError(weights_file, f"tensor {tensor_name} has rank {tensor_rank} (shape {shape}) but "
                           f"adapter_config.json gives rank {rank}")
