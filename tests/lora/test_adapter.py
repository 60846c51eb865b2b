"""Reading PEFT LoRA adapters: values equal PEFT's own modules; every unsupported case is refused."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slora.lora.adapter import AdapterError, load_adapter_weights, read_adapter
from slora.models.llama import llama_spec
from tests.reference.peft import make_peft_adapter, make_peft_model, make_tiny_llama

PEFT_MODULE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_lora_modules(peft_model) -> dict[tuple[int, str], torch.nn.Module]:
    found = {}
    for name, module in peft_model.named_modules():
        match = PEFT_MODULE.search(name)
        if match and hasattr(module, "lora_A"):
            found[(int(match[1]), match[2])] = module
    return found


GOOD_CASES = {
    "rank1": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "rank48_all_linear": dict(r=48, lora_alpha=16, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules="all-linear",
                     rank_pattern={"layers.1.self_attn.q_proj": 8, "down_proj": 2},
                     alpha_pattern={"mlp.up_proj": 32, "model.layers.0.self_attn.k_proj": 3}),
    "layers_to_transform": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "mlp_only": dict(r=6, lora_alpha=12, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.(k|o)_proj"),
    "exclude": dict(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"],
                    exclude_modules=["model.layers.0.mlp.down_proj"]),
}


@pytest.mark.parametrize("case", GOOD_CASES)
def test_weights_equal_peft_modules(case, tmp_path, tiny_llama, tiny_arch):
    peft_model = make_peft_model(tiny_llama, seed=1, **GOOD_CASES[case])
    peft_model.save_pretrained(tmp_path / case)
    spec = read_adapter(case, tmp_path / case, tiny_arch)
    weights = load_adapter_weights(spec, tiny_arch)
    expected = peft_lora_modules(peft_model)

    assert set(weights) == set(expected) == set(spec.pairs)
    for (layer, module), peft_module in expected.items():
        w = weights[(layer, module)]
        assert w.A.dtype == torch.float32 and w.B.dtype == torch.float32
        torch.testing.assert_close(w.A, peft_module.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(w.B, peft_module.lora_B["default"].weight, rtol=0, atol=0)
        assert w.scaling == pytest.approx(peft_module.scaling["default"])
        assert spec.rank(layer, module) == peft_module.r["default"]
        assert spec.scaling(layer, module) == pytest.approx(peft_module.scaling["default"])
    assert spec.max_rank == max(m.r["default"] for m in expected.values())
    assert spec.layers == tuple(sorted({layer for layer, _ in expected}))
    assert spec.target_modules == tuple(m for m in ALL if any(pm == m for _, pm in expected))
    assert spec.path == (tmp_path / case).resolve()


def test_spec_summaries(tmp_path, tiny_llama, tiny_arch):
    spec = read_adapter("p", make_peft_adapter(tmp_path, "p", tiny_llama, **GOOD_CASES["patterns"]), tiny_arch)
    assert spec.ranks == {"q_proj": 8, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 4, "up_proj": 4,
                          "down_proj": 2}
    assert (spec.rank(0, "q_proj"), spec.rank(1, "q_proj")) == (4, 8)
    assert spec.scaling(0, "k_proj") == pytest.approx(3 / 4) and spec.scaling(1, "k_proj") == pytest.approx(2.0)
    assert spec.scaling(1, "up_proj") == pytest.approx(8.0) and spec.max_rank == 8
    rs = read_adapter("rs", make_peft_adapter(tmp_path, "rs", tiny_llama, **GOOD_CASES["rslora"]), tiny_arch)
    assert rs.use_rslora and rs.scalings["q_proj"] == pytest.approx(16 / 8 ** 0.5)


# --- refused adapters: each made by editing a good one ------------------------------------------------

@pytest.fixture(scope="session")
def saved_good(tmp_path_factory, tiny_llama) -> Path:
    return make_peft_adapter(tmp_path_factory.mktemp("good"), "good", tiny_llama, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture
def good(saved_good, tmp_path) -> Path:
    return Path(shutil.copytree(saved_good, tmp_path / "adapter"))


def edit_config(folder: Path, **changes) -> None:
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    weights_file = folder / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    edit(tensors)
    save_file(tensors, weights_file, metadata={"format": "pt"})


def refused(fn, names: Path, *words: str) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        fn()
    message = str(info.value)
    assert str(names) in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return info.value


def test_missing_folder(tmp_path, tiny_arch):
    refused(lambda: read_adapter("x", tmp_path / "nope", tiny_arch), tmp_path / "nope", "not found")


def test_missing_config(good, tiny_arch):
    (good / "adapter_config.json").unlink()
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_config.json", "missing")


def test_malformed_json(good, tiny_arch):
    (good / "adapter_config.json").write_text("{ not json")
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_config.json", "malformed JSON")


CONFIG_REFUSALS = {
    "peft_type": (dict(peft_type="LOHA"), "only 'LORA'"),
    "dora": (dict(use_dora=True), "DoRA"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    "embed_tokens": (dict(target_modules=["q_proj", "embed_tokens"]), "embeddings/lm_head"),
    "lm_head": (dict(target_modules=["lm_head"]), "embeddings/lm_head"),
    "lm_head_regex": (dict(target_modules=r".*(q_proj|lm_head)"), "embeddings/lm_head"),
    "bias": (dict(bias="all"), "bias"),
    "lora_bias": (dict(lora_bias=True), "bias"),
    "unknown_target": (dict(target_modules=["q_proj", "fc1"]), "unknown target module 'fc1'"),
    "regex_matches_nothing": (dict(target_modules=r".*\.fc\d"), "targets no linear layer"),
    "rank0": (dict(r=0), "rank 0"),
    "rank_pattern_too_big": (dict(rank_pattern={"v_proj": 1000}), "rank 1000"),
    "layers_outside": (dict(layers_to_transform=[5]), "layer 5"),
    "target_layer_outside": (dict(target_modules=["model.layers.7.self_attn.q_proj"]), "layer 7"),
    "pissa": (dict(init_lora_weights="pissa"), "changes the base weights"),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_config_refused(case, good, tiny_arch):
    changes, words = CONFIG_REFUSALS[case]
    edit_config(good, **changes)
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_config.json", words)


def test_rank_above_engine_max(good, tiny_arch):
    refused(lambda: read_adapter("x", good, tiny_arch, max_rank=2), good / "adapter_config.json",
            "outside 1..2")


def test_missing_weights(good, tiny_arch):
    (good / "adapter_model.safetensors").unlink()
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_model.safetensors", "missing")


def test_pickle_weights_refused(good, tiny_arch):
    weights = load_file(good / "adapter_model.safetensors")
    (good / "adapter_model.safetensors").unlink()
    torch.save(weights, good / "adapter_model.bin")
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_model.bin", "pickle", "safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(damage, good, tiny_arch):
    weights_file = good / "adapter_model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x07" * 64)
    refused(lambda: read_adapter("x", good, tiny_arch), weights_file, "corrupt or truncated")


def test_adapter_of_another_base_model(tmp_path, tiny_arch):
    other = make_tiny_llama(hidden_size=96)
    folder = make_peft_adapter(tmp_path, "other", other, r=4, target_modules=["q_proj"])
    refused(lambda: read_adapter("x", folder, tiny_arch), folder / "adapter_model.safetensors",
            "another base model", "in_features=64")


def test_adapter_with_more_layers_than_model(good, tiny_arch):
    one_layer = llama_spec(dataclasses.replace(tiny_arch.config, num_layers=1))
    edit_config(good, target_modules=["q_proj", "v_proj", "down_proj"])  # short names: only tensors disagree
    refused(lambda: read_adapter("x", good, one_layer), good / "adapter_model.safetensors", "layer 1", "1 layers")


def test_tensor_rank_differs_from_config(good, tiny_arch):
    edit_config(good, r=8)
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_model.safetensors",
            "rank 4", "gives rank 8")


def test_lora_a_without_lora_b(good, tiny_arch):
    edit_tensors(good, lambda t: t.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"))
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_model.safetensors",
            "missing lora_B", "layer 1 down_proj")


def test_bias_tensor_in_file(good, tiny_arch):
    edit_tensors(good, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias":
                                           torch.zeros(64)}))
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_model.safetensors", "bias tensor")


def test_tensor_for_untargeted_or_outside_layer(good, tiny_arch):
    def move(t):
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    edit_tensors(good, move)
    refused(lambda: read_adapter("x", good, tiny_arch), good / "adapter_model.safetensors",
            "layer 9", "outside")


def test_nan_values_refused_at_load(good, tiny_arch):
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"

    def poison(t):
        t[name][3, 1] = float("nan")
    edit_tensors(good, poison)
    spec = read_adapter("x", good, tiny_arch)  # header only: still fine
    refused(lambda: load_adapter_weights(spec, tiny_arch), good / "adapter_model.safetensors", name, "NaN")


@pytest.mark.parametrize("rename", [
    lambda k: k.replace(".weight", ".default.weight"),  # adapter name inside the key
    lambda k: k.removeprefix("base_model.model."),  # no PEFT prefix
    lambda k: k.removeprefix("base_model.model.model."),  # bare `layers.N...`
])
def test_tensor_name_variants(rename, good, saved_good, tiny_arch):
    def renamed(t):
        items = list(t.items())
        t.clear()
        t.update({rename(k): v for k, v in items})
    edit_tensors(good, renamed)
    expected = load_adapter_weights(read_adapter("a", saved_good, tiny_arch), tiny_arch)
    weights = load_adapter_weights(read_adapter("b", good, tiny_arch), tiny_arch)
    assert weights.keys() == expected.keys()
    for key, w in weights.items():
        assert torch.equal(w.A, expected[key].A) and torch.equal(w.B, expected[key].B)
        assert w.scaling == expected[key].scaling


def test_reads_bf16_as_float32(good, tiny_arch):
    edit_tensors(good, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    weights = load_adapter_weights(read_adapter("x", good, tiny_arch), tiny_arch)
    assert all(w.A.dtype == torch.float32 and w.B.dtype == torch.float32 for w in weights.values())


def test_reading_weights_again_and_again_leaves_nothing_behind(good, tiny_arch):
    """Evicted adapters are re-read from disk all day: 300 reads must not grow Python's heap. (safetensors
    0.8's per-tensor reads leak two ints per tensor: ~100 KB here, 35 MB in a 30-minute soak.)"""
    spec = read_adapter("good", good, tiny_arch)
    for _ in range(10):  # first reads fill caches of their own
        load_adapter_weights(spec, tiny_arch)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(300):
            load_adapter_weights(spec, tiny_arch)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 16 * 1024, f"{after - before} bytes left behind by 300 reads"
