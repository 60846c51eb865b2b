"""The benchmark on the CPU: workloads, the split pool, the shared store, and a small end-to-end run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from slora.bench import workload as wl
from slora.bench.adapters import SharedFileStore, prepare_adapter_set
from slora.bench.cli import main, register
from slora.bench.report import TARGETS
from slora.bench.systems import SplitPool, split_engine_pool
from slora.config import EngineConfig, ModelConfig, PoolConfig
from slora.engine.engine import LLMEngine
from slora.models.loader import DUMMY_SHAPES, architecture_spec

TINY = architecture_spec(ModelConfig.from_hf({"model_type": "llama", **DUMMY_SHAPES["tiny"]}))


def test_synthetic_is_reproducible_and_follows_its_parameters():
    a = wl.synthetic(50, 2000, request_rate=10.0, alpha=1.0, cv=2.0, input_range=(8, 64), seed=3)
    assert a == wl.synthetic(50, 2000, request_rate=10.0, alpha=1.0, cv=2.0, input_range=(8, 64), seed=3)
    assert a != wl.synthetic(50, 2000, request_rate=10.0, alpha=1.0, cv=2.0, input_range=(8, 64), seed=4)
    gaps = np.diff([0.0] + [r.arrival for r in a])
    assert gaps.mean() == pytest.approx(0.1, rel=0.15)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.2)
    assert all(8 <= r.input_len <= 64 and 8 <= r.output_len <= 512 for r in a)
    assert len(wl.distinct_adapters(a)) == 50  # alpha = 1 in S-LoRA's generator: uniform
    zipf = wl.synthetic(50, 2000, alpha=1.0, popularity="zipf", seed=3)
    counts = np.bincount([int(r.adapter.split("-")[1]) for r in zipf], minlength=50)
    assert counts[0] > 5 * counts[-1]
    # The same seed gives the same lengths whatever the number of adapters: n=100 and n=2000 compare.
    assert [r.output_len for r in wl.synthetic(100, 50, seed=1)] == [r.output_len for r in wl.synthetic(2000, 50, seed=1)]
    assert wl.prompt_tokens(a[5], 512, 0) == wl.prompt_tokens(a[5], 512, 0)


def test_trace_round_trip_and_arena_generator(tmp_path):
    trace = wl.arena_like_trace(20, duration=120.0, request_rate=3.0, seed=1)
    assert 150 < len(trace) < 600
    path = wl.write_trace(tmp_path / "t.jsonl", trace)
    back = wl.read_trace(path)
    assert [(r.adapter, r.input_len, r.output_len) for r in back] == [(r.adapter, r.input_len, r.output_len) for r in trace]
    assert back[-1].arrival == pytest.approx(trace[-1].arrival - trace[0].arrival, abs=1e-5)
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        wl.read_trace(tmp_path / "bad.jsonl")


def test_adapter_set_shares_few_files_and_the_store_packs_each_once(tmp_path):
    names = wl.adapter_names(50)
    adapters = prepare_adapter_set(names, TINY, tmp_path, ranks=(8, 16), variants=2)
    assert adapters.distinct_files == 4 and len(adapters.names) == 50
    assert {adapters.ranks[n] for n in names} == {8, 16}
    subset = prepare_adapter_set(names[3:9], TINY, tmp_path, ranks=(8, 16), variants=2)
    assert all(subset.folders[n] == adapters.folders[n] for n in names[3:9])  # by name, not by position
    engine = LLMEngine(EngineConfig(model="dummy:tiny", pool=PoolConfig(num_slots=4096)))
    engine.residency.store = SharedFileStore.replacing(engine.residency.store)
    for name in names[:10]:
        engine.add_adapter(name, str(adapters.folders[name]))
    store = engine.residency.store
    rows = [store.get(engine.registry.get(n)).rows for n in names[:10]]
    assert store.stats.disk_loads == 4 and len(store) == 10
    assert rows[0] is rows[4] and rows[0] is not rows[1]


def test_split_pool_keeps_kv_and_adapters_apart(tmp_path):
    adapters = prepare_adapter_set(wl.adapter_names(6), TINY, tmp_path, ranks=(8,), variants=1)
    engine = LLMEngine(EngineConfig(model="dummy:tiny", pool=PoolConfig(num_slots=400)))
    for name, folder in adapters.folders.items():
        engine.add_adapter(name, str(folder))
    per_adapter = engine.residency.slots_needed("lora-00000")
    region = split_engine_pool(engine, 0.25)
    pool = engine.pool
    assert isinstance(pool, SplitPool) and region == 100 and pool.num_free == 300
    assert region // per_adapter < 6  # the region cannot hold every adapter at once
    kv = pool.allocate(300, "kv")
    assert pool.num_free == 0 and max(kv) < 300
    pool.free(kv, "kv")
    for name in adapters.names:  # loading all of them evicts idle ones inside the region
        engine.residency.acquire(name)
        engine.residency.release(name)
        assert pool.region_free >= 0 and pool.num_free == 300
    assert engine.residency.stats.evictions > 0
    assert all(s >= 300 for a in engine.residency.resident_names() for s in engine.residency.get(a).slot_ids)


def test_register_lives_beside_other_bench_commands():
    parser = argparse.ArgumentParser(prog="slora")
    bench = parser.add_subparsers(dest="command").add_parser("bench")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    register(commands)
    commands.add_parser("kernels")  # another agent's sub-command
    args = parser.parse_args(["bench", "run", "--num-adapters", "5", "10", "--systems", "slora", "peft"])
    assert args.num_adapters == [5, 10] and args.systems == ["slora", "peft"] and callable(args.run)
    assert parser.parse_args(["bench", "kernels"]).bench_command == "kernels"


def test_small_cpu_run_writes_every_output(tmp_path):
    out = tmp_path / "out"
    code = main([
        "run", "--model", "dummy:tiny", "--device", "cpu", "--num-adapters", "50", "--num-requests", "10",
        "--input-range", "8", "24", "--output-range", "2", "10", "--request-rate", "20", "40",
        "--systems", "slora", "base-only", "slora-split-pool", "slora-bmm", "slora-padded", "merged-swap", "peft",
        "--modes", "offline", "online", "--max-num-seqs", "16", "--num-slots", "4096", "--peft-batch-sizes", "2", "4", "--peft-time", "1",
        "--probe-decode", "--probe-prompt-len", "16", "--probe-steps", "3", "--adapter-dir", str(tmp_path / "ad"),
        "--output", str(out), "--no-progress", "--commit", "abc123",
    ])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    head = json.loads((out / "headline.json").read_text())
    assert {"device", "commit", "date", "model", *TARGETS, "slo_vs_rate_plot"} <= head.keys()
    assert head["commit"] == "abc123" and head["model"] == "dummy:tiny"
    assert head["throughput_ratio_vs_base_n1000"] is None and head["reasons"]["throughput_ratio_vs_base_n1000"]
    assert head["decode_bandwidth_fraction"] is not None and head["slo_vs_rate_plot"] == "slo_vs_rate.png"
    runs = {(r["system"], r["mode"], r["request_rate"]): r for r in result["runs"]}
    assert runs[("peft", "online", 20.0)]["status"] == "not available"
    for system in ("slora", "base-only", "slora-split-pool", "slora-bmm", "slora-padded", "merged-swap"):
        for key in (("offline", None), ("online", 20.0), ("online", 40.0)):
            run = runs[(system, *key)]
            assert run["status"] == "ok", run
            assert run["metrics"]["finished"] == 10 and run["metrics"]["failed"] == 0
            assert run["metrics"]["throughput_req_s"] > 0
    assert runs[("slora", "offline", None)]["lora"]["loads"] > 0
    assert runs[("merged-swap", "offline", None)]["swaps"] >= 2
    assert 0.0 <= runs[("slora", "online", 20.0)]["metrics"]["slo_attainment"] <= 1.0
    assert runs[("peft", "offline", None)]["status"] == "ok"
    assert runs[("peft", "offline", None)]["metrics"]["best_batch_size"] in (2, 4)
    for name in ("results.md", "throughput_vs_adapters.png", "slo_vs_rate.png"):
        assert (out / name).stat().st_size > 0


def test_trace_command_and_replay(tmp_path):
    trace = tmp_path / "arena.jsonl"
    assert main(["trace", str(trace), "--num-adapters", "8", "--duration", "4", "--request-rate", "3"]) == 0
    out = tmp_path / "out"
    assert main(["run", "--model", "dummy:tiny", "--device", "cpu", "--trace", str(trace), "--trace-time-scale", "4", "--num-slots", "8192",
                 "--modes", "online", "--output", str(out), "--no-progress",
                 "--no-plots", "--adapter-dir", str(tmp_path / "ad")]) == 0
    run = json.loads((out / "result.json").read_text())["runs"][0]
    assert run["status"] == "ok" and run["metrics"]["finished"] == run["metrics"]["num_requests"] > 0


def test_merged_swap_restores_the_base_weights(tmp_path):
    from slora.bench.merged_swap import MergedSwap

    adapters = prepare_adapter_set(wl.adapter_names(2), TINY, tmp_path, ranks=(8,), variants=1)
    engine = LLMEngine(EngineConfig(model="dummy:tiny", pool=PoolConfig(num_slots=256)))
    weight = engine.model.model.layers[0].self_attn.q_proj.weight
    before = weight.detach().clone()
    gate = MergedSwap(engine, adapters.folders)
    gate._swap("lora-00000")
    assert not torch.equal(weight, before)
    gate._swap("lora-00001")
    gate.restore()
    assert torch.allclose(weight, before, atol=1e-5)


def test_step_profile_script_runs_on_the_cpu(tmp_path):
    """`scripts/gpu_profile.py` (what the next GPU run records) stays working: a tiny run on the CPU."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_profile.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "--model", "dummy:tiny", "--batch", "4",
                             "--adapters", "8", "--prompt-len", "8", "--steps", "4", "--workload-requests", "6",
                             "--profiled-mixed", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert [(r["system"], r["batch"]) for r in report["systems"]] == [("base-only", 4), ("slora", 4)] * 2
    for run in report["systems"]:
        assert run["decode_steps_timed"] >= 4 and run["step_wall_ms_median"] > 0
        assert run["top_cpu"] and set(run["host_phases_ms_median"]) >= {"schedule", "build batch tensors"}
    assert [r["system"] for r in report["workload"]] == ["base-only", "slora"]
    for run in report["workload"]:
        kinds = run["by_kind"]
        assert kinds["prefill"]["steps"] >= 1 and kinds["decode"]["steps"] >= 1
        assert abs(sum(k["share_of_step_time"] for k in kinds.values()) - 1) < 1e-6
    assert (tmp_path / "profile.md").read_text().startswith("# Step profile")
