"""Compile every Triton kernel of slora for a GPU target, on a machine without a GPU.

    python scripts/compile_kernels.py [--arch 90] [--arch 80]

Triton's interpreter (how CI runs the kernels on the CPU) executes them as Python, so it cannot see
what only the compiler checks: types that do not unify, constexpr misuse, shapes `tl.dot` refuses,
register or shared-memory limits. This compiles each kernel, in the launch configurations the
code uses (fp16 and bf16, every constexpr branch) and with the alignment a real model's shapes give
(`_aligned`), down to a cubin for each `--arch` (default sm_90, the H100), with Triton's bundled
ptxas. Prints one line per compile, with the kernel's pipelined loads (what the interpreter cannot
show either); exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from slora.kernels import triton_attention, triton_fused, triton_lora  # noqa: E402

FLOAT_SCALARS = {"eps", "qk_scale"}


def _pointers(data: str, **extra: str) -> dict[str, str]:
    """Pointer types by argument name: `data` for the model's tensors, int32 tables, float32 buffers."""
    types = {name: data for name in ("x_ptr", "y_ptr", "rows_ptr", "q_ptr", "k_ptr", "v_ptr", "o_ptr", "kv_ptr",
                                     "out_ptr", "weight_ptr", "residual_ptr")}
    types.update({name: "*i32" for name in ("row_table_ptr", "a_offsets_ptr", "b_offsets_ptr", "ranks_ptr",
                                            "modules_ptr", "token_indices_ptr", "segment_starts_ptr",
                                            "token_adapters_ptr", "columns_ptr", "widths_ptr",
                                            "b_chunks_ptr", "slots_ptr", "context_lens_ptr", "query_starts_ptr",
                                            "query_lens_ptr", "items_ptr")})
    types.update({name: "*fp32" for name in ("scalings_ptr", "partial_o_ptr", "partial_lse_ptr", "cos_ptr",
                                             "sin_ptr")})
    types.update(extra)
    return types


def _grid(**options: tuple) -> list[dict]:
    return [dict(zip(options, values)) for values in itertools.product(*options.values())]


LORA_KERNELS = {("shrink", "segment"): triton_lora._shrink_segments,
                ("expand", "segment"): triton_lora._expand_segments,
                ("shrink", "token"): triton_lora._shrink_tokens, ("expand", "token"): triton_lora._expand_tokens}


def _lora_constexprs(op: str, form: str, config: triton_lora.LoRAKernelConfig) -> dict:
    out = {"BLOCK_R": config.block_r}
    out.update({"BLOCK_K": config.block_k} if op == "shrink" else {"BLOCK_N": config.block_n, "WIDTH_UNIT": 16})
    if form == "segment":
        out.update({"BLOCK_M": config.block_m, "DOT_MODE": "native"})
        if op == "expand":
            out["Y_IN_PIPELINE"] = triton_lora.expand_pipelines_y(form, config.block_m)
    return out


# Integer arguments that 16 divides at every real model's shapes (Triton specializes on that, and its
# proof of 16-byte aligned loads rests on it): strides and model dimensions.
ALIGNED_DIMENSIONS = frozenset({"in_features", "kv_dim", "head_dim", "hidden"})


def _aligned(kernel) -> frozenset[str]:
    """The arguments a launch at a real model's shapes specializes as divisible by 16: pointers but the
    views at a batch-dependent offset, strides and model dimensions but those left unspecialized."""
    views, unspecialized = set(kernel.do_not_specialize_on_alignment), set(kernel.do_not_specialize)
    return frozenset(n for n in kernel.arg_names
                     if (n.endswith("_ptr") and n not in views)
                     or ((n.startswith("stride_") or n in ALIGNED_DIMENSIONS) and n not in unspecialized))


def cases() -> list[tuple[object, dict[str, str], dict, dict]]:
    """(kernel, pointer types, constexprs, options): every constexpr branch the launchers can take (LoRA
    variants, GQA, residual or not), in fp16 and bf16, at the block sizes they use on a GPU."""
    out = []
    for data in ("*fp16", "*bf16"):
        lora = _pointers(data, v_ptr="*fp32")  # LoRA's v is the float32 shrink result
        for form in triton_lora.FORMS:  # exactly the variants a GPU launches (and compiles at start-up)
            for op, config in triton_lora.compile_variants(form):
                out.append((LORA_KERNELS[(op, form)], lora, _lora_constexprs(op, form, config),
                            triton_lora.launch_options(config)))
        fused = _pointers(data, positions_ptr="*i64", slots_ptr="*i64")
        for c in _grid(HAS_RESIDUAL=(False, True), BLOCK=(4096,)):
            out.append((triton_fused._add_rms_norm, fused, c, {}))
        out.append((triton_fused._rotate_and_write_kv, fused, {"BLOCK_H": 32, "BLOCK_KVH": 8, "BLOCK_D": 64}, {}))
        attention = _pointers(data)
        for c in _grid(GROUP=(1, 8)):
            out.append((triton_attention._decode, attention,
                        c | {"BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128, "DOT_MODE": "native"}, {}))
        out.append((triton_attention._prefill, attention,
                    {"GROUP": 4, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128, "DOT_MODE": "native"}, {}))
    out.append((triton_attention._merge_splits, _pointers("*fp16"),
                {"BLOCK_S": triton_attention.MAX_DECODE_SPLITS, "BLOCK_D": 128}, {}))
    return out


def compile_case(kernel, pointers: dict[str, str], constexprs: dict, options: dict,
                 arch: int) -> tuple[str | None, int]:
    """(None if the kernel compiles to a cubin, else the error; its pipelined loads: `cp.async` copies in
    its PTX, what Triton's software pipelining issues), compiled as a launch at a real model's shapes
    specializes it."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in FLOAT_SCALARS else "i32")
    fixed = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in _aligned(kernel)
             if name not in constexprs}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=fixed, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # noqa: BLE001 - reported, with the configuration
        return f"{type(error).__name__}: {error}", 0
    ptx = compiled.asm.get("ptx", "")
    pipelined = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
    return (None if compiled.asm.get("cubin") else "no cubin produced"), pipelined


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version(s), e.g. 90 (H100), 80 (A100)")
    args = parser.parse_args()
    failures = 0
    for arch in args.arch or [90]:
        for kernel, pointers, constexprs, options in cases():
            error, pipelined = compile_case(kernel, pointers, constexprs, options, arch)
            data = pointers["q_ptr"].removeprefix("*")
            print(f"{'FAIL' if error else 'ok  '} sm_{arch} {kernel.__name__:<22} {data:<5} {constexprs} "
                  f"pipelined loads {pipelined}" + (f"\n     {error[:2000]}" if error else ""), flush=True)
            failures += bool(error)
    print(f"{failures} failed" if failures else "all compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
