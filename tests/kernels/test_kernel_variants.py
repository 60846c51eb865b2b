"""No serving step compiles a Triton kernel: every launch is a variant compiled before serving.

Triton compiles a kernel once per distinct key: its constexprs, launch options, argument dtypes,
pointer alignment, and, for each integer argument not in `do_not_specialize`, whether it equals 1
and whether 16 divides it. On a GPU a compile costs a second or more, so a step that meets a new
key stalls. This records the key of every launch through the interpreter, with the GPU's launch
choices (`multiprocessors` patched to report SMs), and checks that the LoRA kernels' keys in steps
of every kind (prefill, mixed, decode, graphs' static batches; ranks 2..16, one adapter or three)
are all among those `precompile` launched, and that each other kernel has a single key per model
(mixed steps' attention included, which launches on views of the step's slot table).
"""

from __future__ import annotations

import pytest
import torch

from slora import LLM, SamplingParams
from slora.kernels import triton_lora

LORA_KERNELS = {"_shrink_segments", "_expand_segments", "_shrink_tokens", "_expand_tokens"}


def _key(function, args: tuple, kwargs: dict) -> tuple:
    dns = set(function.kwargs.get("do_not_specialize") or ())
    any_alignment = set(function.kwargs.get("do_not_specialize_on_alignment") or ())
    parts = []
    for name, value in zip(function.arg_names, args):
        if isinstance(value, torch.Tensor):
            parts.append((name, value.dtype, name in any_alignment or value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or not isinstance(value, int):
            parts.append((name, type(value).__name__))
        elif name in dns:
            parts.append((name, "int"))
        else:
            parts.append((name, value == 1, value % 16 == 0))
    return (function.fn.__name__, tuple(parts), tuple(sorted(kwargs.items())))


@pytest.mark.skipif(torch.cuda.is_available(), reason="records launches through Triton's interpreter")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_steps_launch_only_precompiled_variants(model_and_adapters, monkeypatch, cuda_graphs):
    from triton.runtime.interpreter import InterpretedFunction

    keys: list[tuple] = []
    original = InterpretedFunction.run

    def launch(self, *args, grid, warmup, **kwargs):
        keys.append(_key(self, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", launch)
    monkeypatch.setattr(triton_lora, "multiprocessors", lambda device: 2)  # a GPU's choices, few programs
    folder, adapters = model_and_adapters
    llm = LLM(model=str(folder), dtype="float32", backend="triton", adapters=adapters, num_slots=1024,
              max_num_seqs=8, max_num_batched_tokens=48, max_lora_rank=16, cuda_graphs=cuda_graphs)
    arch = llm.engine.arch
    launches = triton_lora.precompile(llm.engine.pool.layers[0], arch.projections.values(), len(arch.targets))
    assert launches == 4 * len(arch.projections)
    precompiled = set(keys)
    keys.clear()
    # A long prompt (segments over 16 tokens, split over two steps), short ones, one adapter alone,
    # then three adapters of ranks 2, 8 and 16 mixed with requests without one.
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([list(range(5, 65))], params, ["r8"])
    llm.generate([[5, 6, 7], list(range(9, 30)), [4, 5], [7, 8, 9, 10]], params, ["r2", "r16", None, "r8"])
    if not cuda_graphs:  # (a graph's mixed step launches on its static table: test_cuda_graphs.py)
        # Two prompts and the start of a third fill the first step; the third's rest then runs with two
        # decoding sequences (a mixed step: its attention launches on row views of the step's slot table).
        llm.generate([list(range(5, 25)), list(range(6, 26)), list(range(7, 37))], params, ["r2", None, "r16"])
    launched = set(keys)
    lora = {k for k in launched if k[0] in LORA_KERNELS}
    assert lora and lora <= precompiled, sorted(lora - precompiled)
    by_kernel: dict[str, set] = {}
    for name, arguments, options in launched - lora:
        if name == "_prefill":  # its BLOCK_M follows the queries under the interpreter only (64 on a GPU)
            options = tuple(o for o in options if o[0] != "BLOCK_M")
        by_kernel.setdefault(name, set()).add((arguments, options))
    expected = {"_add_rms_norm": 2}  # with and without a residual to add
    assert {name: len(k) for name, k in by_kernel.items()} == {name: expected.get(name, 1) for name in by_kernel}
