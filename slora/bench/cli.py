"""`slora bench run ...` (workloads against systems) and `slora bench trace ...` (write a trace).

Wiring: `slora/cli.py` makes the `bench` parser and its sub-command group, then calls
`register(bench_commands)`, which adds `run` and `trace` (`slora bench kernels` lives beside them);
each sets `run=` to the function `main` calls. `python -m slora.bench.cli run ...` works alone.

A run: for each mode, each adapter count and (online) each request rate, one workload is made
(same seed: same requests for every system) and every system serves it; results, tables, plots
and `headline.json` go to `--output`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from slora.bench import SYSTEMS
from slora.config import ADMISSIONS


def register(bench_commands) -> None:
    """Add `run` and `trace` to the `bench` parser's sub-command group (an argparse subparsers action)."""
    run_parser = bench_commands.add_parser("run", help="benchmark systems on a workload",
                                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(run_parser)
    run_parser.set_defaults(run=run, bench_command="run")
    trace_parser = bench_commands.add_parser("trace", help="write a chat-arena-like JSONL trace")
    add_trace_options(trace_parser)
    trace_parser.set_defaults(run=run, bench_command="trace")


def add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="dummy:NAME, HF folder or .gguf (default: dummy:llama-2-7b on "
                                                 "CUDA, dummy:tiny on CPU)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--backend", default=None, choices=["torch", "triton"], help="kernels (default: the device's)")
    g.add_argument("--num-slots", type=int, default=None)
    g.add_argument("--pool-memory", default=None, help="bytes ('40GiB') or a fraction of free memory (0.9)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=4096)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--admission", choices=ADMISSIONS, default="reserve",  # BenchOptions.admission
                   help="the engine's admission policy (reserve: S-LoRA's, no preemption; requests here set "
                        "max_tokens to their output length)")
    g = p.add_argument_group("workload")
    g.add_argument("--num-adapters", type=int, nargs="+", default=[100], metavar="N")
    g.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    g.add_argument("--popularity", choices=["slora", "zipf"], default="slora",
                   help="slora: S-LoRA's generator (alpha=1 uniform); zipf: weight (i+1)^-alpha")
    g.add_argument("--request-rate", type=float, nargs="+", default=[10.0], metavar="R", help="req/s (online)")
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma arrivals (1: Poisson)")
    g.add_argument("--input-range", type=int, nargs=2, default=[8, 512], metavar=("MIN", "MAX"))
    g.add_argument("--output-range", type=int, nargs=2, default=[8, 512], metavar=("MIN", "MAX"))
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (requests = rate x duration)")
    g.add_argument("--num-requests", type=int, default=None, help="overrides rate x duration")
    g.add_argument("--trace", default=None, help="replay a JSONL trace (timestamp, adapter, input_len, output_len)")
    g.add_argument("--trace-time-scale", type=float, default=1.0, help="replay speed-up of the trace")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("adapters")
    g.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    g.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    g.add_argument("--adapter-variants", type=int, default=4, help="distinct weight files per rank")
    g.add_argument("--adapter-dir", default=None, help="where the PEFT folders are written (default: a temp dir)")
    g.add_argument("--adapter-store", choices=["shared", "engine"], default="shared",
                   help="shared: pack each weight file once in host memory; engine: the engine's own store")
    g.add_argument("--max-cpu-adapters", type=int, default=None, help="with --adapter-store engine")
    g = p.add_argument_group("systems and modes")
    g.add_argument("--systems", nargs="+", default=["slora"], choices=SYSTEMS, metavar="SYSTEM",
                   help=f"one or more of: {', '.join(SYSTEMS)}")
    g.add_argument("--modes", nargs="+", default=["offline"], choices=["offline", "online"])
    g.add_argument("--slo-ttft", type=float, default=6.0, help="first-token SLO in seconds")
    g.add_argument("--drain-timeout", type=float, default=30.0, help="online: seconds after the last arrival")
    g.add_argument("--time-limit", type=float, default=None, help="seconds per run; past it the run is cut")
    g.add_argument("--split-adapter-share", type=float, default=0.25, help="slora-split-pool's adapter region")
    g.add_argument("--peft-batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    g.add_argument("--peft-time", type=float, default=20.0, help="seconds per PEFT batch size")
    g.add_argument("--probe-decode", action="store_true",
                   help="also time pure decode steps at the largest batch the pool allows (roofline)")
    g.add_argument("--probe-prompt-len", type=int, default=128)
    g.add_argument("--probe-steps", type=int, default=20)
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="default: bench/results/<date>-<device>-<commit>/")
    g.add_argument("--commit", default=None, help="commit to record (default: $SLORA_COMMIT or .git)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-warmup", action="store_true")


def add_trace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="JSONL file to write")
    p.add_argument("--num-adapters", type=int, default=100)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--request-rate", type=float, default=5.0, help="mean req/s (the rate drifts per minute)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", "run") == "trace":
        return _write_trace(args)
    return _run_bench(args)


def _write_trace(args: argparse.Namespace) -> int:
    from slora.bench.workload import arena_like_trace, write_trace

    requests = arena_like_trace(args.num_adapters, args.duration, args.request_rate, args.seed)
    write_trace(args.output, requests)
    print(f"wrote {len(requests)} requests over {args.duration:g} s to {args.output}")
    return 0


def options_from_args(args: argparse.Namespace):
    import torch

    from slora.bench.session import BenchOptions

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("dummy:llama-2-7b" if device.startswith("cuda") else "dummy:tiny")
    memory = args.pool_memory
    if isinstance(memory, str) and memory.replace(".", "", 1).isdigit():
        memory = float(memory) if "." in memory else int(memory)
    return BenchOptions(
        model=model, device=device, dtype=args.dtype, backend=args.backend, num_slots=args.num_slots,
        pool_memory=memory, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, admission=args.admission, seed=args.seed, slo_ttft=args.slo_ttft, drain_timeout=args.drain_timeout,
        time_limit=args.time_limit, ranks=tuple(args.ranks), targets=tuple(args.targets),
        adapter_variants=args.adapter_variants, adapter_dir=args.adapter_dir, adapter_store=args.adapter_store,
        max_cpu_adapters=args.max_cpu_adapters, split_adapter_share=args.split_adapter_share,
        peft_batch_sizes=tuple(args.peft_batch_sizes), peft_time_per_size=args.peft_time,
        progress=not args.no_progress, warmup=not args.no_warmup,
    )


def _run_bench(args: argparse.Namespace) -> int:
    from slora.bench import report
    from slora.bench import workload as wl
    from slora.bench.session import BenchSession

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = options_from_args(args)
        session = BenchSession(options)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = report.make_meta(session, args.commit)
    output = Path(args.output) if args.output else report.default_output_dir(meta["device"], meta["commit"])
    print(f"slora bench: {options.model} on {meta['device']}; results in {output}", flush=True)
    started = time.perf_counter()
    for mode, n, rate, requests, names in _points(args, wl):
        for system in args.systems:
            record = session.run(system, requests, mode, n, rate if mode == "online" else None, names)
            _print_record(record)
    if args.probe_decode:
        n = max(args.num_adapters)
        _print_record(session.probe(wl.adapter_names(n), n, args.probe_prompt_len, args.probe_steps))
    head = report.write_outputs(output, meta, session.runs, plots=not args.no_plots)
    print(f"done in {time.perf_counter() - started:.0f} s; headline: "
          + ", ".join(f"{k}={head[k]}" for k in report.TARGETS), flush=True)
    return 1 if any(r["status"] == "failed" for r in session.runs) else 0


def _points(args: argparse.Namespace, wl):
    """(mode, num_adapters, rate, requests, adapter names to register) for every point of the run."""
    if args.trace:
        requests = wl.read_trace(args.trace, args.trace_time_scale, args.num_requests)
        names = wl.distinct_adapters(requests)
        span = max(r.arrival for r in requests) or 1.0
        for mode in args.modes:
            yield mode, len(names), round(len(requests) / span, 3), requests, names
        return
    for mode in args.modes:
        rates = args.request_rate if mode == "online" else [max(args.request_rate)]
        for n in args.num_adapters:
            for rate in rates:
                count = args.num_requests or max(1, round(rate * args.duration))
                requests = wl.synthetic(n, count, rate, args.alpha, args.cv, tuple(args.input_range),
                                        tuple(args.output_range), args.seed, args.popularity)
                yield mode, n, rate, requests, wl.adapter_names(n)


def _print_record(record: dict) -> None:
    m = record.get("metrics", {})
    what = f"{record['system']:>17} {record['mode']:>12} n={record['num_adapters']}"
    if record.get("request_rate") is not None:
        what += f" R={record['request_rate']:g}"
    if record["status"] != "ok":
        print(f"{what}: {record['status']}: {record.get('reason')}", flush=True)
        return
    if record["mode"] == "decode-probe":
        r = record["roofline"]
        print(f"{what}: batch {r.get('largest_batch')}, step {r.get('step_ms_at_largest_batch', 0):.2f} ms, "
              f"bandwidth fraction {r.get('bandwidth_fraction_at_largest_batch', 0):.3f}", flush=True)
        return
    line = f"{what}: {m.get('throughput_req_s', 0):.2f} req/s, {m.get('output_tok_s', 0):.0f} tok/s"
    if m.get("slo_attainment") is not None:
        line += f", SLO {m['slo_attainment']:.2f}, TTFT p99 {m.get('ttft_s_p99') or 0:.2f} s"
    if m.get("truncated"):
        line += " (time-capped)"
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora bench")
    register(parser.add_subparsers(dest="bench_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
