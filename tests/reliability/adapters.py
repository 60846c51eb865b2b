"""A catalogue of bad adapter folders for the reliability tests, each with the words its refusal must say
(good ones come from `slora.fixtures.write_adapter`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from slora.architecture import ArchitectureSpec
from slora.fixtures import adapter_tensors, write_adapter


# --- the bad ones: name -> (make(folder, model, outside), words the refusal must contain) ------------
def _truncated(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    weights = write_adapter(folder, model) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _corrupt_header(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    weights = write_adapter(folder, model) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))


def _empty_weights(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    (write_adapter(folder, model) / "adapter_model.safetensors").write_bytes(b"")


def _no_config(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    (write_adapter(folder, model) / "adapter_config.json").unlink()


def _config_text(text: str) -> Callable[[Path, ArchitectureSpec, Path], None]:
    def make(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
        (write_adapter(folder, model) / "adapter_config.json").write_text(text)

    return make


def _with_config(**changes) -> Callable[[Path, ArchitectureSpec, Path], None]:
    return lambda folder, model, outside: write_adapter(folder, model, config=changes)


def _rank_mismatch(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    write_adapter(folder, model, config={"r": 8}, tensors=adapter_tensors(model, 4, ("q_proj", "v_proj")))


def _other_base_model(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    wider = {m: (2 * model.shape(m)[0], 2 * model.shape(m)[1]) for m in model.module_names}
    write_adapter(folder, model, tensors=adapter_tensors(model, 4, ("q_proj", "v_proj"), shapes=wider))


def _bad_value(value: float) -> Callable[[Path, ArchitectureSpec, Path], None]:
    def make(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
        tensors = adapter_tensors(model, 4, ("q_proj", "v_proj"))
        name = sorted(tensors)[-1]  # the last tensor read: every other one is fine
        tensors[name][0, 0] = value
        write_adapter(folder, model, tensors=tensors)

    return make


def _dora_tensor(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    tensors = adapter_tensors(model, 4, ("q_proj", "v_proj"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight"] = \
        torch.ones(model.config.q_dim)
    write_adapter(folder, model, tensors=tensors)


def _linked_weights(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    write_adapter(outside / folder.name, model)
    write_adapter(folder, model)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(outside / folder.name / "adapter_model.safetensors")


def _linked_folder(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    write_adapter(outside / folder.name, model)
    folder.symlink_to(outside / folder.name, target_is_directory=True)


def _ten_thousand_files(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    write_adapter(folder, model)
    for i in range(10_000):
        (folder / f"f{i:05d}").touch()


def _fifo_weights(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    write_adapter(folder, model)
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")  # reading it would block forever


def _pickle_only(folder: Path, model: ArchitectureSpec, outside: Path) -> None:
    write_adapter(folder, model)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


BAD_ADAPTERS: dict[str, tuple[Callable[[Path, ArchitectureSpec, Path], None], str]] = {
    "truncated": (_truncated, "truncated"),
    "corrupt-header": (_corrupt_header, "corrupt"),
    "empty-weights": (_empty_weights, "unreadable safetensors"),
    "no-config": (_no_config, "missing adapter_config.json"),
    "malformed-config": (_config_text("{not json"), "malformed JSON"),
    "config-not-object": (_config_text("[1, 2]"), "expected a JSON object"),
    "rank-0": (_with_config(r=0), "rank 0"),
    "rank-mismatch": (_rank_mismatch, "adapter_config.json gives rank 8"),
    "other-base-model": (_other_base_model, "another base model"),
    "nan": (_bad_value(float("nan")), "non-finite"),
    "inf": (_bad_value(float("inf")), "non-finite"),
    "dora": (_with_config(use_dora=True), "DoRA"),
    "dora-tensor": (_dora_tensor, "DoRA"),
    "unknown-target": (_with_config(target_modules=["q_proj", "frobnicate_proj"]), "unknown target module"),
    "weights-link-outside": (_linked_weights, "outside"),
    "folder-link-outside": (_linked_folder, "outside"),
    "10000-files": (_ten_thousand_files, "more than 64 entries"),
    "fifo-weights": (_fifo_weights, "not a regular file"),
    "pickle-weights": (_pickle_only, "pickle"),
}
# Refusals only the run-time loader makes (a start-up --lora path is the operator's, not confined).
CONFINEMENT_ONLY = ("weights-link-outside", "folder-link-outside")


def make_bad_adapters(root: Path, model: ArchitectureSpec, outside: Path) -> dict[str, Path]:
    folders = {}
    for name, (make, _) in BAD_ADAPTERS.items():
        make(root / f"bad-{name}", model, outside)
        folders[name] = root / f"bad-{name}"
    return folders
