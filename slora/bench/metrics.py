"""What a run measured: per-request timings, per-step records, and their summaries.

Times are seconds since the start of the run. TTFT is measured from a request's *scheduled*
arrival (not from when the driver got round to adding it), so a driver that falls behind shows up
as latency. Inter-token latency is the gap between consecutive tokens of one request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slora.bench.workload import BenchRequest


@dataclass
class RequestRecord:
    request: BenchRequest
    first_token: float | None = None
    finish: float | None = None
    num_tokens: int = 0
    last_token: float | None = None
    gaps: list[float] = field(default_factory=list)  # inter-token latencies
    error: str | None = None

    def add_tokens(self, count: int, now: float) -> None:
        if count <= 0:
            return
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.gaps.extend([(now - self.last_token) / count] * count)
        self.last_token = now
        self.num_tokens += count

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.request.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.request.arrival

    @property
    def done(self) -> bool:
        return self.finish is not None and self.error is None

    @property
    def progress(self) -> float:
        """Share of the request's output generated (1 when done): request-equivalents of work."""
        return 1.0 if self.done else min(1.0, self.num_tokens / max(1, self.request.output_len))


@dataclass
class StepRecord:
    start: float
    duration: float
    num_seqs: int
    prefill_tokens: int  # tokens of prompts (or recomputation) in this step
    decode_tokens: int
    context_tokens: int  # K/V the step's attention reads: every sequence's context, new tokens included
    distinct_adapters: int
    adapter_rows: int  # pool rows of the step's distinct adapters

    @property
    def is_decode(self) -> bool:
        return self.prefill_tokens == 0 and self.decode_tokens > 0


def percentiles(values: list[float], prefix: str) -> dict[str, float | None]:
    if not values:
        return {f"{prefix}_mean": None, f"{prefix}_p50": None, f"{prefix}_p90": None, f"{prefix}_p99": None}
    array = np.asarray(values, dtype=np.float64)
    return {f"{prefix}_mean": float(array.mean()), f"{prefix}_p50": float(np.percentile(array, 50)),
            f"{prefix}_p90": float(np.percentile(array, 90)), f"{prefix}_p99": float(np.percentile(array, 99))}


def summarise(records: list[RequestRecord], elapsed: float, truncated: bool, slo_ttft: float | None,
              online: bool) -> dict:
    """Throughput, latency percentiles and SLO attainment of one run.

    `throughput_req_s` counts finished requests; when the run was cut short (`truncated`), the
    unfinished requests' generated share is counted too (request-equivalents), so that a capped
    run still estimates the rate of work. An unfinished request misses the SLO unless its first
    token came in time.
    """
    done = [r for r in records if r.done]
    elapsed = max(elapsed, 1e-9)
    work = sum(r.progress for r in records) if truncated else len(done)
    generated = sum(r.num_tokens for r in records)
    prompt = sum(r.request.input_len for r in records if r.first_token is not None)
    result = {
        "num_requests": len(records),
        "finished": len(done),
        "failed": sum(1 for r in records if r.error is not None),
        "truncated": truncated,
        "elapsed_s": elapsed,
        "throughput_req_s": work / elapsed,
        "output_tok_s": generated / elapsed,
        "total_tok_s": (generated + prompt) / elapsed,
    }
    result |= percentiles([r.ttft for r in records if r.ttft is not None], "ttft_s")
    result |= percentiles([g for r in records for g in r.gaps], "itl_s")
    result |= percentiles([r.latency for r in done], "latency_s")
    if online:
        result["steady_throughput_req_s"] = steady_throughput(records)
    if online and slo_ttft is not None:
        met = sum(1 for r in records if r.ttft is not None and r.ttft <= slo_ttft)
        result["slo_ttft_s"] = slo_ttft
        result["slo_attainment"] = met / len(records) if records else None
    errors = sorted({r.error for r in records if r.error})
    if errors:
        result["errors"] = errors[:5]
    return result


def steady_throughput(records: list[RequestRecord], skip: float = 0.25) -> float | None:
    """Completions per second while requests still arrive, after the first `skip` of the arrival
    span: the service rate when the system falls behind, the arrival rate when it keeps up. Unlike
    finished / (last finish - first arrival), it does not charge the last requests' latency (the
    drain tail) to throughput, which a short run would feel."""
    if len(records) < 2:
        return None
    arrivals = [r.request.arrival for r in records]
    begin = min(arrivals) + skip * (max(arrivals) - min(arrivals))
    end = max(arrivals)
    if end - begin <= 0:
        return None
    return sum(1 for r in records if r.done and begin <= r.finish <= end) / (end - begin)


def summarise_steps(steps: list[StepRecord]) -> dict:
    if not steps:
        return {"num_steps": 0}
    decode = [s for s in steps if s.is_decode]
    return {
        "num_steps": len(steps),
        "decode_steps": len(decode),
        "mean_batch_seqs": float(np.mean([s.num_seqs for s in steps])),
        "max_batch_seqs": max(s.num_seqs for s in steps),
        "mean_distinct_adapters": float(np.mean([s.distinct_adapters for s in steps])),
        "decode_step_ms_p50": float(np.median([s.duration for s in decode]) * 1e3) if decode else None,
        "step_time_share_decode": sum(s.duration for s in decode) / max(1e-9, sum(s.duration for s in steps)),
    }
