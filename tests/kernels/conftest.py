"""Kernel tests: Triton kernels against the torch references on fresh random inputs.

Without a GPU the Triton kernels run in Triton's interpreter, which reads TRITON_INTERPRET when a
kernel is defined: it is set here, at import, before any test module imports `slora.kernels.triton_*`
(nothing outside this folder imports them). With CUDA the same tests run compiled, on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def model_and_adapters(tmp_path_factory):
    """A tiny random Llama folder and three PEFT adapters of ranks 2, 8, 16 on different modules."""
    from slora.fixtures import tiny_model, write_adapter
    from slora.models.loader import read_architecture

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", folder)
    arch = read_architecture(folder)
    root = tmp_path_factory.mktemp("adapters")
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]]
    adapters = {f"r{rank}": str(write_adapter(root / f"r{rank}", arch, rank, targets[i], seed=i, alpha=16))
                for i, rank in enumerate((2, 8, 16))}
    return folder, adapters
