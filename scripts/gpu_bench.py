"""The issue-6 headline run on one GPU, in one process, within a time budget.

    python scripts/gpu_bench.py OUTDIR [--budget 520] [--part headline|online|sweep|all] [--scale 1.0]

Llama-2-7B shapes with dummy fp16 weights (`dummy:llama-2-7b`), adapters of ranks {8, 16, 32, 64}
on q/k/v/o, S-LoRA's synthetic workload (alpha 1, cv 1, lengths uniform in [8, 512]). Durations are
scaled down from the issue's (a command may run 10 minutes): offline points serve 300 requests
with a cap of 40 s each (a capped run counts its unfinished requests' generated share), online
n=1000 R=20 has 60 s of arrivals (the issue: 2 minutes) and a 20 s drain cap, the rate sweep
15 s of arrivals per rate, PEFT ~12 s per batch size (8, 16, 32). Phases run in priority
order; a phase that no longer fits the budget is recorded as skipped (with the reason), and the
outputs (result.json, results.md, plots, headline.json) are rewritten after every phase, so a
run that is cut still leaves every number it measured.

`--part sweep` runs the SLO-vs-rate sweep of slora and its ablations (split pool, bmm, padded) as a
second command; `--part online` runs online n=1000 R=20 alone, for the issue's full 2 minutes of
arrivals (its headline.json then holds the two online figures). `--part all` (with a budget of about
1,000 s, more than one 10-minute device command) runs everything into one folder, online R=20 for
the full 2 minutes too, so that its headline.json holds all six figures at the issue's durations.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from slora.bench import report  # noqa: E402
from slora.bench import workload as wl  # noqa: E402
from slora.bench.session import BenchOptions, BenchSession  # noqa: E402

SEED = 0
SLO_TTFT = 6.0
_LOG: list[Path] = []


def say(line: str) -> None:
    """Print a line and append it to OUTDIR/log.txt."""
    print(line, flush=True)
    for path in _LOG:
        with path.open("a") as f:
            f.write(line + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--budget", type=float, default=520.0, help="seconds for the whole script")
    parser.add_argument("--part", choices=["headline", "online", "sweep", "all"], default="headline")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies request counts and durations")
    parser.add_argument("--model", default="dummy:llama-2-7b")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    deadline = start + args.budget
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = BenchOptions(
        model=args.model, device=device, dtype="float16" if device == "cuda" else None,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=4096, seed=SEED, slo_ttft=SLO_TTFT,
        ranks=(8, 16, 32, 64), adapter_variants=2, adapter_dir=os.environ.get("SLORA_BENCH_ADAPTERS"),
        peft_batch_sizes=(8, 16, 32), peft_time_per_size=12.0 * args.scale,
        progress=sys.stderr.isatty() and not args.no_progress,
    )
    session = BenchSession(options)
    online_seconds = (60 if args.part == "headline" else 120) * args.scale  # "headline": fits 10 minutes
    notes = [f"scaled-down durations for a 10-minute command (--scale {args.scale:g}): offline points "
             f"{int(300 * args.scale)} requests; online {online_seconds:.0f} s of arrivals at R=20 "
             f"(issue: 120 s), sweep {15 * args.scale:.0f} s per rate",
             "n=2000 uses ranks {8,16,32,64} like the others: names share weight files, so host memory does not "
             "force smaller ranks"]
    meta = report.make_meta(session, args.commit, notes)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    _LOG.append(output / "log.txt")
    say(f"{meta['device']}: model loaded in {session.load_s:.0f} s, copy bandwidth "
        f"{session.copy_bandwidth / 1e12:.2f} TB/s; budget {args.budget:.0f} s")

    def left() -> float:
        return deadline - time.perf_counter()

    def write() -> None:
        report.write_outputs(output, meta, session.runs)

    offline_count = max(20, int(300 * args.scale))

    def offline(system: str, n: int, cap: float, need: float) -> None:
        if left() < need:
            _show(session.skip(system, "offline", n, None, f"time budget: {left():.0f} s left, {need:.0f} s needed"))
        else:
            requests = wl.synthetic(n, offline_count, 20.0, 1.0, 1.0, (8, 512), (8, 512), SEED)
            _show(session.run(system, requests, "offline", n, None, wl.adapter_names(n),
                              time_limit=min(cap, left() - 15)))
        write()

    def online(system: str, n: int, rate: float, seconds: float, drain: float) -> None:
        need = seconds + drain + 20
        if left() < need:
            _show(session.skip(system, "online", n, rate, f"time budget: {left():.0f} s left, {need:.0f} s needed"))
        else:
            requests = wl.synthetic(n, max(10, round(rate * seconds)), rate, 1.0, 1.0, (8, 512), (8, 512), SEED)
            _show(session.run(system, requests, "online", n, rate, wl.adapter_names(n),
                              time_limit=left() - 10, drain_timeout=drain))
        write()

    # One discarded pass first, so that kernel compilation for the usual batch shapes is not timed.
    warm = wl.synthetic(1000, 96, 20.0, 1.0, 1.0, (8, 512), (8, 24), SEED + 1)
    record = session.run("slora", warm, "offline", 1000, None, wl.adapter_names(1000), time_limit=60)
    session.runs.remove(record)
    say(f"warm-up pass: {record['status']} in {record['wall_s']:.0f} s")
    if args.part in ("headline", "all"):
        offline("slora", 1000, 40 * args.scale, 40)
        offline("base-only", 1000, 40 * args.scale, 40)
        online("slora", 1000, 20.0, online_seconds, 20 * args.scale)
        if left() > 40:
            _show(session.probe(wl.adapter_names(1000), 1000, prompt_len=128, decode_steps=20))
        else:
            _show(session.skip("slora", "decode-probe", 1000, None, "time budget"))
        write()
        offline("slora", 100, 40 * args.scale, 35)
        if left() > 70:
            requests = wl.synthetic(100, offline_count, 20.0, 1.0, 1.0, (8, 512), (8, 512), SEED)
            _show(session.run("peft", requests, "offline", 100, None))
        else:
            _show(session.skip("peft", "offline", 100, None, "time budget"))
        write()
        offline("slora", 2000, 40 * args.scale, 40)
        for rate in (10.0, 30.0):
            online("slora", 1000, rate, 15 * args.scale, 10 * args.scale)
    if args.part == "online":
        online("slora", 1000, 20.0, online_seconds, 20 * args.scale)
    if args.part in ("sweep", "all"):
        for system in ("slora", "slora-split-pool", "slora-bmm", "slora-padded"):
            for rate in (10.0, 20.0, 30.0):
                if system == "slora" and report.find_run(session.runs, "slora", "online", 1000, rate):
                    continue
                online(system, 1000, rate, 15 * args.scale, 10 * args.scale)
    write()
    head = report.headline(session.runs, meta, [p for p in (report.PLOT_THROUGHPUT, report.PLOT_SLO)
                                                 if (output / p).exists()])
    say(f"done in {time.perf_counter() - start:.0f} s -> {output}")
    for key in (*report.TARGETS, "slo_vs_rate_plot"):
        say(f"  {key}: {head.get(key)}" + (f"  ({head['reasons'][key]})" if key in head["reasons"] else ""))
    return 0


def _show(record: dict) -> None:
    m, roof = record.get("metrics", {}), record.get("roofline", {})
    what = f"{record['system']} {record['mode']} n={record['num_adapters']}" + (
        f" R={record['request_rate']:g}" if record.get("request_rate") else "")
    if record["status"] != "ok":
        say(f"{what}: {record['status']}: {record.get('reason')} [{record.get('wall_s', 0):.0f} s]")
        return
    parts = [f"{m['throughput_req_s']:.2f} req/s"] if "throughput_req_s" in m else []
    if m.get("slo_attainment") is not None:
        parts.append(f"SLO {m['slo_attainment']:.2f}, TTFT p99 {m.get('ttft_s_p99') or 0:.1f} s")
    if roof.get("bandwidth_fraction_at_largest_batch") is not None:
        parts.append(f"decode at batch {roof['largest_batch']}: {roof['step_ms_at_largest_batch']:.1f} ms "
                     f"(floor {roof['floor_ms_at_largest_batch']:.1f} ms, fraction "
                     f"{roof['bandwidth_fraction_at_largest_batch']:.2f})")
    steps = record.get("steps", {})
    if steps.get("step_time_share_decode") is not None:
        parts.append(f"decode steps {steps['step_time_share_decode']:.0%} of step time")
    if record.get("kernel_compiles"):
        parts.append(f"{record['kernel_compiles']} kernel compiles during the run")
    if m.get("truncated"):
        parts.append("time-capped")
    say(f"{what}: {', '.join(parts)} [{record.get('wall_s', 0):.0f} s]")


if __name__ == "__main__":
    sys.exit(main())
