"""Where a step's time goes: host phases, GPU kernels, and the gap between them.

    python scripts/gpu_profile.py OUTDIR [--model dummy:llama-2-7b] [--batch 256] [--adapters 1000]
                                  [--workload-requests 300]

For base-only and slora (adapters of ranks {8, 16, 32, 64} on q/k/v/o, one distinct adapter per
sequence), each with decode steps as CUDA graphs and without (eager), fills the engine with `--batch` sequences, then over pure decode steps at that batch:
- times each host phase (schedule, building the batch tensors, issuing the forward pass, waiting
  for the last step's tokens and appending them, issuing this step's sampling) with
  `time.perf_counter`, and the step end to end (steps overlap: the host issues a step while the GPU
  computes the one before, so the wait is where the host idles);
- records three steps with `torch.profiler`: the GPU's busy time per step (the sum of its kernels'
  durations) against the step's wall time (the difference is the GPU waiting for the host), the
  kernels by GPU time, and the host ops by CPU time.
Then (`--workload-requests` > 0) it serves the headline's offline workload (S-LoRA's synthetic
one, n = `--adapters`) on base-only and slora as served (graphs on), and splits its steps by kind
(prefill only, mixed prefill + decode, decode only): their count, median wall time and share of the
run, and for a few mixed steps the same profile as above.
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
from slora.bench.driver import EngineDriver, NoBar, probe_decode, warm_up  # noqa: E402
from slora.bench.kernels import commit_of_checkout  # noqa: E402
from slora.bench.metrics import RequestRecord  # noqa: E402
from slora.bench.session import BenchOptions, BenchSession  # noqa: E402

PROFILED_STEPS = 3
ACTIVITIES = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


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
    timer.wrap(engine, "_append_sampled", "wait for last step's tokens + append")
    timer.wrap(engine, "_launch_sampling", "issue sampling")
    original_step = engine.step
    state = {"decode_steps": 0, "profiler": None, "done": False}

    def step():
        full = len(engine.scheduler.running) == batch and not engine.scheduler.waiting
        profiling = full and steps - PROFILED_STEPS <= state["decode_steps"] < steps
        if profiling and state["profiler"] is None:
            state["profiler"] = profile(activities=ACTIVITIES)
            state["profiler"].start()
        start = time.perf_counter()
        outputs = original_step()  # steps overlap: a step's wall time is the period at which they complete
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
    wall_ms = statistics.median(s.duration for s in measured) * 1e3
    tables = kernel_tables(prof.key_averages(), PROFILED_STEPS)
    graphs_used = engine.graphs is not None and engine.graphs.enabled
    step_stats = engine.step_stats()  # how many steps were graph replays
    phases = timer.summary_ms()
    unwrap_build()  # the module-level wrapper would keep this engine (and its pool) alive
    return {
        "system": system, "cuda_graphs": graphs_used, "step_stats": step_stats, "num_adapters": num_adapters if system != "base-only" else 0,
        "batch": info["measured_batch"],
        "prompt_len": prompt_len, "decode_steps_timed": len(measured), "step_wall_ms_median": wall_ms,
        "gpu_busy_fraction": tables["gpu_busy_ms_per_step"] / wall_ms, "host_phases_ms_median": phases, **tables,
    }


def kernel_tables(events, steps: int) -> dict:
    """GPU busy time, launches, and the top kernels and host ops, per step, from a profiler's key averages.
    Kernels are the events without host time: an op such as aten::mm also reports its kernels' device time."""
    kernels = [e for e in events if e.self_device_time_total > 0 and e.self_cpu_time_total == 0]
    by_gpu = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:20]
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    return {
        "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
        "kernel_launches_per_step": sum(e.count for e in kernels) / steps,
        "top_gpu": [{"name": e.key, "ms_per_step": e.self_device_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps} for e in by_gpu],
        "top_cpu": [{"name": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps} for e in by_cpu],
    }


def step_kind(record) -> str:
    if record.prefill_tokens and record.decode_tokens:
        return "mixed"
    return "prefill" if record.prefill_tokens else "decode"


def profile_workload(session: BenchSession, system: str, num_adapters: int, num_requests: int,
                     profiled_steps: int) -> dict:
    """Serve the offline synthetic workload as the headline does; time every step by kind and profile
    the first `profiled_steps` mixed steps after the first decode step (the run's steady part)."""
    engine = session._engine({})
    adapters = session.adapters_for(wl.adapter_names(num_adapters)) if system != "base-only" else AdapterSet()
    session._register(engine, adapters)
    warm_up(engine, session._warmup_adapters(adapters), session.options.seed)
    requests = wl.synthetic(num_adapters, num_requests, seed=session.options.seed)
    requests = wl.offline(wl.without_adapters(requests) if system == "base-only" else requests)
    driver = EngineDriver(engine, session.options.seed, progress=False)
    timers = {kind: PhaseTimer() for kind in ("prefill", "mixed", "decode")}
    current = PhaseTimer()  # phases of the step in flight, filed under its kind once it is known
    current.wrap(engine.scheduler, "schedule", "schedule")
    unwrap_build = current.wrap(engine_module, "build_forward_batch", "build batch tensors")
    current.wrap(engine.model, "forward", "issue forward pass")
    if engine.graphs is not None:
        current.wrap(engine.graphs, "run", "issue forward pass")
    current.wrap(engine, "_append_sampled", "wait for last step's tokens + append")
    current.wrap(engine, "_launch_sampling", "issue sampling")
    original_step = engine.step
    kinds: list[tuple[str, float, int]] = []  # (kind, wall s, sequences) of every step
    profiles: list = []
    state = {"seen_decode": False}

    def step():
        prefill_pending = bool(engine.scheduler.waiting) or any(
            r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running)
        profiler = None
        if state["seen_decode"] and prefill_pending and len(profiles) < profiled_steps:
            profiler = profile(activities=ACTIVITIES)
            profiler.start()
        start = time.perf_counter()
        outputs = original_step()  # steps overlap: a step's wall time is the period at which they complete
        wall = time.perf_counter() - start
        record = driver_steps[-1]
        kind = step_kind(record)
        state["seen_decode"] |= kind == "decode"
        for phase, seconds in current.current.items():
            timers[kind].current[phase] += seconds
        current.current = defaultdict(float)
        timers[kind].end_step(wall)
        kinds.append((kind, wall, record.num_seqs))
        if profiler is not None:
            profiler.stop()
            if kind == "mixed":
                profiles.append((profiler.key_averages(), wall, record))
        return outputs

    engine.step = step
    driver_steps: list = []
    restore = driver._instrument(driver_steps)
    records = {r.index: RequestRecord(r) for r in requests}
    in_engine: set[int] = set()
    for r in requests:
        driver._add(r, r.adapter, wl.prompt_tokens(r, driver.vocab_size, session.options.seed), records, in_engine,
                    0.0, NoBar())
    started = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - started
    restore()
    unwrap_build()
    total = sum(wall for _, wall, _ in kinds)
    by_kind = {}
    for kind, timer in timers.items():
        walls = [wall for k, wall, _ in kinds if k == kind]
        if walls:
            by_kind[kind] = {"steps": len(walls), "wall_ms_median": 1e3 * statistics.median(walls),
                             "share_of_step_time": sum(walls) / total,
                             "mean_seqs": statistics.mean(n for k, _, n in kinds if k == kind),
                             "host_phases_ms_median": timer.summary_ms()}
    mixed = {}
    if profiles:
        merged = defaultdict(lambda: [0.0, 0.0])
        tables = [kernel_tables(events, 1) for events, _, _ in profiles]
        mixed = {"profiled_steps": len(profiles),
                 "wall_ms_profiled": [1e3 * wall for _, wall, _ in profiles],
                 "tokens": [[r.prefill_tokens, r.decode_tokens, r.distinct_adapters] for _, _, r in profiles],
                 "gpu_busy_ms": [t["gpu_busy_ms_per_step"] for t in tables],
                 "kernel_launches": [t["kernel_launches_per_step"] for t in tables]}
        for t in tables:
            for e in t["top_gpu"]:
                merged[e["name"]][0] += e["ms_per_step"] / len(tables)
                merged[e["name"]][1] += e["calls_per_step"] / len(tables)
        mixed["top_gpu"] = [{"name": name, "ms_per_step": v[0], "calls_per_step": v[1]}
                            for name, v in sorted(merged.items(), key=lambda kv: -kv[1][0])[:20]]
    return {"system": system, "num_adapters": num_adapters if system != "base-only" else 0,
            "requests": num_requests, "elapsed_s": elapsed, "preemptions": engine.scheduler.num_preemptions,
            "by_kind": by_kind, "mixed_profile": mixed}


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# Step profile: {report['model']}, {report['device']}", ""]
    if report["systems"]:
        lines += decode_markdown(report)
    if report["workload"]:
        lines += workload_markdown(report)
    path.write_text("\n".join(lines) + "\n")


def workload_markdown(report: dict) -> list[str]:
    lines = ["## Steps of the offline workload, by kind", "",
             f"S-LoRA's synthetic workload, {report['workload'][0]['requests']} requests at once, graphs on (as served).",
             "", "| system | kind | steps | median wall ms | share of step time | mean sequences | host phases (ms) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in report["workload"]:
        for kind, k in r["by_kind"].items():
            phases = ", ".join(f"{name} {ms:.1f}" for name, ms in k["host_phases_ms_median"].items())
            lines.append(f"| {r['system']} ({r['elapsed_s']:.1f} s, {r['preemptions']} preemptions) | {kind} | {k['steps']} | {k['wall_ms_median']:.1f} | "
                         f"{100 * k['share_of_step_time']:.0f}% | {k['mean_seqs']:.0f} | {phases} |")
    lines.append("")
    for r in report["workload"]:
        m = r["mixed_profile"]
        if not m:
            continue
        lines += [f"### {r['system']}: profiled mixed steps", "",
                  "wall ms " + ", ".join(f"{w:.1f}" for w in m["wall_ms_profiled"]) + "; GPU busy ms "
                  + ", ".join(f"{g:.1f}" for g in m["gpu_busy_ms"]) + "; launches "
                  + ", ".join(f"{n:.0f}" for n in m["kernel_launches"]) + "; (prefill tokens, decode tokens, adapters) "
                  + ", ".join(str(tuple(t)) for t in m["tokens"]), "", "| kernel | ms per step | calls |", "|---|---:|---:|"]
        lines += [f"| `{e['name'][:90]}` | {e['ms_per_step']:.2f} | {e['calls_per_step']:.0f} |" for e in m["top_gpu"]]
        lines.append("")
    return lines


def decode_markdown(report: dict) -> list[str]:
    lines = ["## Pure decode steps", "",
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
              "asynchronously (a graph replay at once) and steps overlap, so the host waits for the GPU in "
              "reading the last step's tokens back. "
              "Kernels replayed inside a CUDA graph may be missing from the profiler's tables.", ""]
    for r in report["systems"]:
        for key, title in (("top_gpu", "GPU time by kernel"), ("top_cpu", "host time by op")):
            mode = "graphs" if r["cuda_graphs"] else "eager"
            lines += [f"### {r['system']} ({mode}): {title} (per step)", "", "| op | ms | calls |", "|---|---:|---:|"]
            lines += [f"| `{e['name'][:90]}` | {e['ms_per_step']:.2f} | {e['calls_per_step']:.0f} |" for e in r[key]]
            lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--model", default="dummy:llama-2-7b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--skip-decode", action="store_true", help="only the workload's steps")
    parser.add_argument("--workload-requests", type=int, default=300, help="0: no workload run")
    parser.add_argument("--profiled-mixed", type=int, default=4)
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
    report["workload"] = []
    for system, graphs in () if args.skip_decode else DECODE_RUNS:
        result = profile_system(session, system, args.adapters, args.batch, args.prompt_len, args.steps,
                                graphs and cuda)
        report["systems"].append(result)
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("top")}), flush=True)
        save(report, output)
    for system in ("base-only", "slora") if args.workload_requests else ():
        result = profile_workload(session, system, args.adapters, args.workload_requests, args.profiled_mixed)
        report["workload"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "mixed_profile"}), flush=True)
        save(report, output)
    return 0


DECODE_RUNS = (("base-only", True), ("slora", True), ("base-only", False), ("slora", False))


def save(report: dict, output: Path) -> None:
    gc.collect()  # the wrapped methods held the last engine in cycles: free its pool before the next one is sized
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    (output / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, output / "profile.md")


if __name__ == "__main__":
    sys.exit(main())
