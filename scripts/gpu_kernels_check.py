"""The GPU check of the Triton kernels: correctness at real shapes, the kernel tests, then the benchmark.

    python3 scripts/gpu_kernels_check.py OUT_DIR [--skip-checks] [--skip-pytest] [--skip-bench] [--no-sweep]
                                                 [--shapes llama-2-7b,llama-3-8b]

Run on a CUDA machine (torch + triton; pytest optional; no fastapi/gguf needed). Writes to OUT_DIR:
- checks.md / checks.json: every Triton kernel against the torch reference at Llama-2-7B and
  Llama-3-8B (GQA) shapes: the fused small ops; LoRA on the model's fused projections (q/k/v,
  gate/up) and single ones, mixed ranks 8..128 in one batch, segments of 1 to 700 tokens, shuffled
  pool rows and slots, fp16/bf16/fp32, GQA 1/4/8, decode contexts up to 16k with and without splits;
- pytest.txt: `pytest tests/kernels` run compiled on the GPU (TRITON_INTERPRET unset);
- bench-<shape>/kernels.json and kernels.md: `slora bench kernels --sweep` for each shape (the
  commit is $SLORA_COMMIT when set, else `git rev-parse`).
Prints a compact pass/fail table; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from slora.bench import kernels as bench  # noqa: E402
from slora.kernels import attention, triton_attention  # noqa: E402
from slora.kernels.lora import TorchLoRA, apply_lora  # noqa: E402
from slora.kernels.triton_lora import TritonLoRA  # noqa: E402
from slora.models.loader import architecture_spec  # noqa: E402

DEVICE = torch.device("cuda")
LORA_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # relative to the delta
ATTENTION_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative to max |out|
RESULTS: list[dict] = []


def record(name: str, dtype: torch.dtype, error: float, tolerance: float, seconds: float) -> None:
    passed = bool(error <= tolerance)  # NaN fails
    RESULTS.append({"check": name, "dtype": str(dtype).removeprefix("torch."), "max_rel_error": error,
                    "tolerance": tolerance, "passed": passed, "seconds": round(seconds, 2)})
    print(f"{'PASS' if passed else 'FAIL'}  {name:<78} {RESULTS[-1]['dtype']:<9} err {error:.2e} "
          f"(tol {tolerance:.0e})  {seconds:.1f}s", flush=True)


def lora_check(name: str, shape: str, modules: tuple[str, ...], segments: list[int], ranks: list[int],
               dtype: torch.dtype, form: str, seed: int = 0) -> None:
    """Adapter j has `segments[j]` tokens (scattered through the batch) and rank `ranks[j]`."""
    start = time.time()
    generator = torch.Generator().manual_seed(seed)
    config = bench.model_shape(shape)
    arch = architecture_spec(config)
    rows_needed = bench.adapter_rows_needed(ranks, arch, modules)
    num_slots = rows_needed // 2 + 64
    pool = torch.randn(num_slots, 2, config.num_kv_heads, config.head_dim, generator=generator).to(DEVICE, dtype)
    rows = pool.view(-1, config.kv_dim)
    free_rows = torch.randperm(2 * num_slots, generator=generator).to(DEVICE)
    adapters = bench.synthetic_adapters(ranks, arch, modules, rows, free_rows, generator)
    token_adapters = [j for j, n in enumerate(segments) for _ in range(n)]
    token_adapters += [None] * 5  # tokens without an adapter
    order = torch.randperm(len(token_adapters), generator=generator).tolist()
    token_adapters = [token_adapters[i] for i in order]
    batch = bench.batch_of(token_adapters, adapters, arch, DEVICE)
    # The oracle is the torch reference in float32 on the same (rounded) inputs: in bf16/fp16 the
    # reference itself rounds its intermediate `x @ A^T`, which the kernels keep in float32.
    exact_lora = TorchLoRA([pool.float()], batch)
    torch_lora = TorchLoRA([pool], batch)
    triton_lora = TritonLoRA([pool], batch, form=form)
    shapes, error, reference_error = bench.module_shapes(arch), 0.0, 0.0
    for projection in bench.projections_of(arch, modules):  # fused as the model runs them
        x = torch.randn(len(token_adapters), shapes[projection.modules[0]][0], generator=generator).to(DEVICE, dtype)
        before = torch.randn(len(token_adapters), sum(projection.widths), generator=generator).to(DEVICE, dtype)
        exact, expected, y = before.to(torch.float32, copy=True), before.clone(), before.clone()
        apply_lora(exact_lora, exact, x.float(), 0, projection)
        apply_lora(torch_lora, expected, x, 0, projection)
        apply_lora(triton_lora, y, x, 0, projection)
        delta = (exact - before.float()).abs().max().item()
        error = max(error, (y.float() - exact).abs().max().item() / delta)
        reference_error = max(reference_error, (expected.float() - exact).abs().max().item() / delta)
        untouched = [t for t, a in enumerate(token_adapters) if a is None]
        if not torch.equal(y[untouched], before[untouched]):
            error = float("inf")
    torch.cuda.synchronize()
    # Pass: within the tolerance, or no less exact than the torch reference in the same dtype (in bf16
    # both are dominated by rounding the output y, which the tolerance alone does not allow for).
    record(f"lora {form:<7} {name} [torch {reference_error:.1e}]", dtype, error,
           max(LORA_TOLERANCE[dtype], 1.1 * reference_error), time.time() - start)


def attention_check(name: str, shape: tuple[int, int, int], query_lens: list[int], context_lens: list[int],
                    dtype: torch.dtype, num_splits: int | None = None, seed: int = 0) -> None:
    start = time.time()
    heads, kv_heads, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    pool, meta, q, k, v = bench.random_attention_batch(query_lens, context_lens, heads, kv_heads, head_dim, dtype,
                                                       DEVICE, generator, spare_slots=100)
    reference_pool, triton_pool = pool.clone(), pool.clone()
    expected = attention.paged_attention(q, k, v, reference_pool, meta)
    out = triton_attention.paged_attention(q, k, v, triton_pool, meta, num_splits=num_splits)
    error = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    if not torch.equal(reference_pool, triton_pool):
        error = float("inf")
    torch.cuda.synchronize()
    splits = f", splits {num_splits}" if num_splits else ""
    record(f"attention {name}{splits}", dtype, error, ATTENTION_TOLERANCE[dtype], time.time() - start)


def fused_ops_check(shape: str, tokens: int, dtype: torch.dtype, seed: int = 0) -> None:
    """RMSNorm with residual, rotary + K/V write at a model's shapes, against the torch model's ops."""
    start = time.time()
    results = bench.fused_ops_cases(tokens, bench.model_shape(shape), dtype, DEVICE, lambda fn: 0.0,
                                    torch.Generator().manual_seed(seed))
    torch.cuda.synchronize()
    error = max(r.max_error for r in results if r.max_error is not None)
    record(f"fused ops {shape}: norm+residual, rotary+kv write ({tokens} tokens)", dtype, error,
           ATTENTION_TOLERANCE[dtype], time.time() - start)


def run_checks() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        for shape in ("llama-2-7b", "llama-3-8b"):
            fused_ops_check(shape, 300, dtype)
    qkvo = ("q_proj", "k_proj", "v_proj", "o_proj")
    mixed = [8, 16, 32, 64, 128, 8, 24, 40]
    decode_ranks = [mixed[j % len(mixed)] for j in range(64)]
    for dtype in (torch.float16, torch.bfloat16):
        for form in ("segment", "token"):
            lora_check("7B q/k/v/o decode: 256 tokens, 64 adapters, ranks 8..128", "llama-2-7b", qkvo,
                       [4] * 64, decode_ranks, dtype, form)
            lora_check("7B q/k/v/o decode: 64 tokens, 64 adapters (segments of 1)", "llama-2-7b", qkvo,
                       [1] * 64, decode_ranks, dtype, form)
        lora_check("7B gate/up/down prefill: segments 1, 7, 300, 700, ranks 128..8", "llama-2-7b",
                   ("gate_proj", "up_proj", "down_proj"), [1, 7, 300, 700], [128, 64, 8, 16], dtype, "segment")
        lora_check("8B (kv_dim 1024: 4-14 chunks a row) all modules, mixed", "llama-3-8b",
                   qkvo + ("gate_proj", "up_proj", "down_proj"), [1, 3, 130, 2, 260], [8, 128, 16, 64, 32], dtype, "segment")
    lora_check("7B gate/up/down prefill: segments 1, 7, 300, 700", "llama-2-7b",
               ("gate_proj", "up_proj", "down_proj"), [1, 7, 300, 700], [128, 64, 8, 16], torch.bfloat16, "token")
    lora_check("7B q/k/v/o mixed", "llama-2-7b", qkvo, [1, 5, 200], [8, 128, 33], torch.float32, "segment")
    lora_check("7B q/k/v/o mixed", "llama-2-7b", qkvo, [1, 5, 200], [8, 128, 33], torch.float32, "token")

    for shape_name, shape in (("GQA 1 (32/32/128)", (32, 32, 128)), ("GQA 4 (32/8/128)", (32, 8, 128)),
                              ("GQA 8 (32/4/128)", (32, 4, 128))):
        for dtype in (torch.float16, torch.bfloat16):
            attention_check(f"prefill {shape_name}: q 1/100/1000 after prefixes 0/50/500", shape,
                            [1, 100, 1000], [1, 150, 1500], dtype)
            attention_check(f"decode {shape_name}: contexts 1, 1000, 4096, 16384", shape,
                            [1, 1, 1, 1], [1, 1000, 4096, 16384], dtype)
            for splits in (1, 8):
                attention_check(f"decode {shape_name}: contexts 7, 1000, 4096", shape, [1, 1, 1], [7, 1000, 4096],
                                dtype, num_splits=splits)
    for dtype in (torch.float16, torch.bfloat16):  # a mixed step: decoding rows between prompt chunks
        attention_check("mixed GQA 1 (32/32/128): 200 decode (contexts 2..1500) + chunks 300, 700", (32, 32, 128),
                        [1] * 100 + [300] + [1] * 100 + [700], [2 + 15 * i for i in range(100)] + [500]
                        + [1500 - 7 * i for i in range(100)] + [700], dtype)
    attention_check("prefill GQA 4 (32/8/128)", (32, 8, 128), [64, 300], [64, 400], torch.float32)
    attention_check("decode GQA 4 (32/8/128)", (32, 8, 128), [1, 1], [64, 3000], torch.float32, num_splits=4)


def write_checks(output: Path) -> bool:
    (output / "checks.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                    "commit": bench.commit_of_checkout(),
                                                    "torch": torch.__version__, "checks": RESULTS}, indent=2) + "\n")
    lines = [f"# Kernel checks on {torch.cuda.get_device_name()} (commit {bench.commit_of_checkout()})", "",
             "| check | dtype | max rel. error | tolerance | result |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['check']} | {r['dtype']} | {r['max_rel_error']:.2e} | {r['tolerance']:.0e} | "
              f"{'pass' if r['passed'] else '**FAIL**'} |" for r in RESULTS]
    (output / "checks.md").write_text("\n".join(lines) + "\n")
    return all(r["passed"] for r in RESULTS)


def run_pytest(output: Path) -> int | None:
    if importlib.util.find_spec("pytest") is None:
        print("pytest is not installed: skipping tests/kernels")
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    started = time.time()
    process = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider",
                              "-o", "addopts="], cwd=ROOT, env=env, capture_output=True, text=True)
    (output / "pytest.txt").write_text(process.stdout + process.stderr)
    tail = (process.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"pytest tests/kernels on CUDA: exit {process.returncode}: {tail} ({time.time() - started:.0f}s)")
    return process.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="folder for the outputs")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--shapes", default="llama-2-7b", help="model shapes to benchmark, comma-separated")
    parser.add_argument("--no-sweep", action="store_true", help="skip the LoRA block-size sweep of the benchmark")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    import triton

    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
    passed = True
    if not args.skip_checks:
        run_checks()
        passed = write_checks(output)
        print(f"checks: {sum(r['passed'] for r in RESULTS)}/{len(RESULTS)} passed", flush=True)
    if not args.skip_pytest:
        passed = run_pytest(output) in (0, None) and passed
    if not args.skip_bench:
        for shape in args.shapes.split(","):
            settings = bench.Settings(model_shape=shape, sweep=not args.no_sweep)
            report = bench.run(settings, DEVICE)
            bench.write_report(report, output / f"bench-{shape}")
            print(f"wrote {output / f'bench-{shape}'}/kernels.md", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
