"""Where a decode step's time goes: host phases, GPU kernels, and the gap between them.

    python scripts/gpu_profile.py OUTDIR [--model dummy:llama-2-7b] [--batch 256] [--adapters 1000]

For base-only and slora (adapters of ranks {8, 16, 32, 64} on q/k/v/o, one distinct adapter per
sequence), each with decode steps as CUDA graphs and without (eager), fills the engine with `--batch` sequences, then over pure decode steps at that batch:
- times each host phase (schedule, building the batch tensors, issuing the forward pass, sampling,
  which waits for the GPU) with `time.perf_counter`, and the step end to end;
- records three steps with `torch.profiler`: the GPU's busy time per step (the sum of its kernels'
  durations) against the step's wall time (the difference is the GPU waiting for the host), the
  kernels by GPU time, and the host ops by CPU time.
Writes profile.json and profile.md to OUTDIR.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import slora.engine.engine as engine_module  # noqa: E402
from slora.bench import workload as wl  # noqa: E402
from slora.bench.adapters import AdapterSet  # noqa: E402
from slora.bench.driver import probe_decode, warm_up  # noqa: E402
from slora.bench.kernels import commit_of_checkout  # noqa: E402
from slora.bench.session import BenchOptions, BenchSession  # noqa: E402

PROFILED_STEPS = 3


class PhaseTimer:
    """Wraps the engine's step phases to add up their host time, per step."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = defaultdict(list)
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, phase: str):
        """Time `owner.name` as `phase`; returns what undoes it."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - start

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)

    def end_step(self, wall: float) -> None:
        self.current["step (wall)"] = wall
        for phase, seconds in self.current.items():
            self.totals[phase].append(seconds)
        self.current = defaultdict(float)

    def summary_ms(self) -> dict[str, float]:
        return {phase: 1e3 * statistics.median(values) for phase, values in self.totals.items()}


def profile_system(session: BenchSession, system: str, num_adapters: int, batch: int, prompt_len: int,
                   steps: int, cuda_graphs: bool) -> dict:
    engine = session._engine({"cuda_graphs": cuda_graphs})
    adapters = session.adapters_for(wl.adapter_names(num_adapters)) if system != "base-only" else AdapterSet()
    session._register(engine, adapters)
    warm_up(engine, session._warmup_adapters(adapters), session.options.seed)
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    unwrap_build = timer.wrap(engine_module, "build_forward_batch", "build batch tensors")
    timer.wrap(engine.model, "forward", "issue forward pass")
    if engine.graphs is not None:  # a replayed step does not call forward
        timer.wrap(engine.graphs, "run", "issue forward pass")
    timer.wrap(engine, "_append_tokens", "sample + wait for GPU + append")
    original_step = engine.step
    state = {"decode_steps": 0, "profiler": None, "done": False}

    def step():
        full = len(engine.scheduler.running) == batch and not engine.scheduler.waiting
        profiling = full and steps - PROFILED_STEPS <= state["decode_steps"] < steps
        if profiling and state["profiler"] is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            state["profiler"] = profile(activities=activities)
            state["profiler"].start()
        start = time.perf_counter()
        outputs = original_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if full:
            timer.end_step(time.perf_counter() - start)
            state["decode_steps"] += 1
        else:
            timer.current.clear()
        if state["profiler"] is not None and state["decode_steps"] >= steps and not state["done"]:
            state["profiler"].stop()
            state["done"] = True
        return outputs

    engine.step = step
    measured, info = probe_decode(engine, adapters.names, batch, prompt_len, steps + 2, session.options.seed)
    prof = state["profiler"]
    if prof is None:
        raise RuntimeError(f"{system}: fewer than {steps} decode steps at batch {batch} ran ({info})")
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events) / PROFILED_STEPS
    wall_ms = statistics.median(s.duration for s in measured) * 1e3
    by_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:20]
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    launches = sum(e.count for e in events if e.self_device_time_total > 0)
    graphs_used = engine.graphs is not None and engine.graphs.enabled
    step_stats = engine.step_stats()  # how many steps were graph replays
    phases = timer.summary_ms()
    unwrap_build()  # the module-level wrapper would keep this engine (and its pool) alive
    del engine, timer, state, step, original_step, prof, events
    gc.collect()  # the wrapped methods hold the engine in cycles: free its pool before the next one is sized
    torch.cuda.empty_cache()
    return {
        "system": system, "cuda_graphs": graphs_used, "step_stats": step_stats, "num_adapters": num_adapters if system != "base-only" else 0,
        "batch": info["measured_batch"],
        "prompt_len": prompt_len, "decode_steps_timed": len(measured), "step_wall_ms_median": wall_ms,
        "gpu_busy_ms_per_step": kernel_us / 1e3, "gpu_busy_fraction": kernel_us / 1e3 / wall_ms,
        "kernel_launches_per_step": launches / PROFILED_STEPS, "host_phases_ms_median": phases,
        "top_gpu": [{"name": e.key, "ms_per_step": e.self_device_time_total / 1e3 / PROFILED_STEPS,
                     "calls_per_step": e.count / PROFILED_STEPS} for e in by_gpu],
        "top_cpu": [{"name": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / PROFILED_STEPS,
                     "calls_per_step": e.count / PROFILED_STEPS} for e in by_cpu],
    }


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Decode-step profile: {report['model']}, {report['device']}", "",
             f"commit {report['commit']}, {report['date']}; batch {report['batch']} sequences, prompts of "
             f"{report['prompt_len']} tokens, pure decode steps; three steps recorded by torch.profiler.", "",
             "| system | CUDA graphs | adapters | step wall ms | GPU busy ms | GPU busy | launches/step | " +
             " | ".join(report["systems"][0]["host_phases_ms_median"]) + " |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(report["systems"][0]["host_phases_ms_median"])]
    for r in report["systems"]:
        phases = " | ".join(f"{v:.1f}" for v in r["host_phases_ms_median"].values())
        lines.append(f"| {r['system']} | {'yes' if r['cuda_graphs'] else 'no'} | {r['num_adapters']} | {r['step_wall_ms_median']:.1f} | "
                     f"{r['gpu_busy_ms_per_step']:.1f} | {100 * r['gpu_busy_fraction']:.0f}% | "
                     f"{r['kernel_launches_per_step']:.0f} | {phases} |")
    lines += ["", "Host phases are medians per step of host (wall) time; the forward pass is issued "
              "asynchronously (a graph replay at once), so sampling includes waiting for the GPU to finish. "
              "Kernels replayed inside a CUDA graph may be missing from the profiler's tables.", ""]
    for r in report["systems"]:
        for key, title in (("top_gpu", "GPU time by kernel"), ("top_cpu", "host time by op")):
            mode = "graphs" if r["cuda_graphs"] else "eager"
            lines += [f"## {r['system']} ({mode}): {title} (per step)", "", "| op | ms | calls |", "|---|---:|---:|"]
            lines += [f"| `{e['name'][:90]}` | {e['ms_per_step']:.2f} | {e['calls_per_step']:.0f} |" for e in r[key]]
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--model", default="dummy:llama-2-7b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()  # without one: a smoke run of this script (--model dummy:tiny)
    session = BenchSession(BenchOptions(model=args.model, device="cuda" if cuda else "cpu",
                                        dtype="float16" if cuda else None, max_num_seqs=args.batch,
                                        max_num_batched_tokens=4096, ranks=(8, 16, 32, 64), adapter_variants=2,
                                        progress=False))
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "commit": args.commit or commit_of_checkout(),
              "date": time.strftime("%Y-%m-%d"), "model": args.model, "batch": args.batch,
              "prompt_len": args.prompt_len, "systems": []}
    for system, graphs in (("base-only", True), ("slora", True), ("base-only", False), ("slora", False)):
        result = profile_system(session, system, args.adapters, args.batch, args.prompt_len, args.steps,
                                graphs and cuda)
        report["systems"].append(result)
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("top")}), flush=True)
        (output / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(report, output / "profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
