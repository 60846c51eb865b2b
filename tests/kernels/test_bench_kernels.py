"""`slora bench kernels --tiny` runs end to end (on the CPU under the interpreter) and writes its report."""

from __future__ import annotations

import importlib.util
import json


def _bench_kernels(argv: list[str]) -> int:
    """Through the CLI (`slora bench kernels`) where its server dependencies are installed, else directly."""
    if importlib.util.find_spec("fastapi") is not None:
        from slora.cli import main

        return main(["bench", "kernels", *argv])
    from slora.bench.kernels import main

    return main(argv)


def test_bench_kernels_tiny_writes_json_and_markdown(tmp_path):
    assert _bench_kernels(["--tiny", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert {"device", "commit", "date", "copy_bandwidth_gbps", "matmul_peak_tflops"} <= report.keys()
    methods = {(r["case"].split("[")[0], r["method"]) for r in report["results"]}
    for method in ("torch_reference", "triton_segment", "triton_token", "triton_padded", "gather_bmm", "padded_bmm"):
        assert ("lora_decode", method) in methods and ("lora_prefill", method) in methods
    assert {("attention_decode", "triton"), ("attention_prefill", "triton")} <= methods
    for method in ("base_gemm[q+k+v]", "base_gemm_then_lora[q+k+v]", "base_gemm_beside_shrink[q+k+v]"):
        assert ("lora_decode", method) in methods
    by_method = {(r["case"], r["method"]): r for r in report["results"]}
    for case in {r["case"] for r in report["results"] if r["case"].startswith("lora_")}:
        # The bound's copies move exactly the op's bytes, one copy per launch (q/k/v and o: 2 launches each).
        bound = by_method[(case, "copy_per_launch_bound[4 launches]")]
        assert bound["bytes"] == by_method[(case, "triton_segment")]["bytes"], case
    for result in report["results"]:
        assert result["time_us"] > 0 and result["bytes"] > 0 and result["pct_same_size_copy"] > 0
        if result["max_error"] is not None:  # every method computes the reference's result
            assert result["max_error"] < 1e-4, result
    markdown = (tmp_path / "kernels.md").read_text()
    assert "| lora_decode" in markdown and "copy bandwidth" in markdown and "% same-size copy" in markdown
