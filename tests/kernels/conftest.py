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
