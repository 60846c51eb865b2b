"""What keeps Triton's CPU interpreter (`TRITON_INTERPRET=1`, how CI runs the kernels) exact.

Three gaps of Triton 3.6's interpreter, each bridged here so the kernels stay the ones the GPU runs:
- it only takes effect for functions defined while TRITON_INTERPRET is set, Triton's own library
  (`tl.zeros`, `tl.sum`, ...) included: when Triton was imported before that (transformers imports
  it), `patch()` turns the library's compiled-mode functions into interpreted ones;
- it turns a scalar tensor into a Python int with `int(array)`, which numpy >= 2.4 refuses for
  1-element arrays of ndim 1 (triton-lang/triton#9171, fixed upstream by squeezing first), so every
  loop bound loaded from memory fails: `patch()` applies the upstream fix;
- its `tl.dot` misreads bfloat16 operands: `dot` upcasts them to float32 there (mode "fp32").
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import triton
import triton.language as tl
from triton import knobs


def interpreting() -> bool:
    return bool(knobs.runtime.interpret)


def patch() -> None:
    from triton.runtime import interpreter

    if not interpreting() or getattr(interpreter, "_slora_patched", False):
        return
    interpreter._slora_patched = True
    _interpret_library()
    if not hasattr(interpreter, "_patch_lang_tensor") or tuple(map(int, np.__version__.split(".")[:2])) < (2, 4):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def _interpret_library() -> None:
    """Replace every compiled-mode `@triton.jit` function of `triton.language` by an interpreted one."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    converted: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attribute, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                if id(value) not in converted:
                    converted[id(value)] = InterpretedFunction(value.fn)
                setattr(module, attribute, converted[id(value)])


def dot_mode(dtype: torch.dtype) -> str:
    """How `dot` multiplies operands of `dtype`: "ieee" (exact float32), "fp32" (upcast), "native"."""
    if dtype == torch.float32:
        return "ieee"
    return "fp32" if dtype == torch.bfloat16 and interpreting() else "native"


@triton.jit
def dot(a, b, MODE: tl.constexpr):
    if MODE == "fp32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MODE == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
