"""Workloads: which requests arrive when, for which adapter, with how many tokens in and out.

A workload is a list of `BenchRequest`s, reproducible from its parameters and `seed`:
- `synthetic(...)`: S-LoRA's generator (REFERENCE.md): `n` adapters, power-law popularity with
  exponent `alpha`, total rate `R`, gamma inter-arrival times with coefficient of variation `cv`
  (cv = 1 is Poisson), input and output lengths uniform in inclusive ranges. Popularity "slora"
  draws an adapter as `floor(n * u)` with `u ~ numpy.random.power(alpha)`, as S-LoRA's own
  benchmark code does (alpha = 1 is uniform: the hardest case for caching); "zipf" gives adapter
  i the weight `(i + 1) ** -alpha` (alpha = 1: a few hot adapters).
- `read_trace(path)` / `write_trace(path, requests)`: JSONL, one request per line:
  `{"timestamp": seconds, "adapter": name or null, "input_len": int, "output_len": int}`.
- `arena_like_trace(...)`: a synthetic trace shaped like LMSYS Chatbot Arena traffic (Zipf model
  popularity, bursty arrivals whose rate drifts minute to minute, short prompts and longer answers
  with log-normal lengths). It is generated, not real data; it exists so that trace replay has a
  bundled, realistic-looking input.

Prompt tokens are random ids drawn from `(seed, request index)`, so every system sees the same
tokens for the same request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival: float  # seconds after the start of the run (0 for every request offline)
    adapter: str | None  # adapter name; None = the base model
    input_len: int
    output_len: int


def adapter_names(num_adapters: int) -> list[str]:
    return [f"lora-{i:05d}" for i in range(num_adapters)]


def synthetic(
    num_adapters: int,
    num_requests: int,
    request_rate: float = 1.0,
    alpha: float = 1.0,
    cv: float = 1.0,
    input_range: tuple[int, int] = (8, 512),
    output_range: tuple[int, int] = (8, 512),
    seed: int = 0,
    popularity: str = "slora",
) -> list[BenchRequest]:
    """S-LoRA's synthetic workload (see the module docstring); `num_adapters == 0` is base-only."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if request_rate <= 0 or cv <= 0:
        raise ValueError(f"request_rate and cv must be > 0, got {request_rate} and {cv}")
    for name, (low, high) in (("input", input_range), ("output", output_range)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} length range must satisfy 1 <= low <= high, got [{low}, {high}]")
    rng = np.random.default_rng(seed)
    chosen = _choose_adapters(rng, num_adapters, num_requests, alpha, popularity)
    input_lens = rng.integers(input_range[0], input_range[1] + 1, num_requests)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, num_requests)
    shape, scale = 1.0 / (cv * cv), cv * cv / request_rate
    arrivals = np.cumsum(rng.gamma(shape, scale, num_requests))
    names = adapter_names(num_adapters)
    return [
        BenchRequest(i, float(arrivals[i]), names[chosen[i]] if num_adapters else None,
                     int(input_lens[i]), int(output_lens[i]))
        for i in range(num_requests)
    ]


def _choose_adapters(rng: np.random.Generator, n: int, count: int, alpha: float, popularity: str) -> np.ndarray:
    if n == 0:
        return np.zeros(count, dtype=np.int64)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if popularity == "slora":
        return np.minimum((rng.power(alpha, count) * n).astype(np.int64), n - 1)
    if popularity == "zipf":
        weights = np.arange(1, n + 1, dtype=np.float64) ** -alpha
        return rng.choice(n, size=count, p=weights / weights.sum())
    raise ValueError(f"popularity must be 'slora' or 'zipf', got {popularity!r}")


def offline(requests: list[BenchRequest]) -> list[BenchRequest]:
    """The same requests, all arriving at time 0 (maximum-throughput mode)."""
    return [BenchRequest(r.index, 0.0, r.adapter, r.input_len, r.output_len) for r in requests]


def without_adapters(requests: list[BenchRequest]) -> list[BenchRequest]:
    """The same requests on the base model (the `base-only` system)."""
    return [BenchRequest(r.index, r.arrival, None, r.input_len, r.output_len) for r in requests]


def distinct_adapters(requests: list[BenchRequest]) -> list[str]:
    return sorted({r.adapter for r in requests if r.adapter is not None})


def prompt_tokens(request: BenchRequest, vocab_size: int, seed: int) -> list[int]:
    """The request's prompt: random ids in [3, vocab) (avoiding the usual special ids 0-2)."""
    rng = np.random.default_rng([seed, request.index])
    low = 3 if vocab_size > 16 else 0
    return rng.integers(low, vocab_size, request.input_len).tolist()


# --- traces ----------------------------------------------------------------------------------------

def write_trace(path: str | Path, requests: list[BenchRequest]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in requests:
            f.write(json.dumps({"timestamp": round(r.arrival, 6), "adapter": r.adapter,
                                "input_len": r.input_len, "output_len": r.output_len}) + "\n")
    return path


def read_trace(path: str | Path, time_scale: float = 1.0, limit: int | None = None) -> list[BenchRequest]:
    """Read a JSONL trace; timestamps become seconds after the first request, divided by `time_scale`
    (2.0 replays twice as fast)."""
    path = Path(path)
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((float(row["timestamp"]), row.get("adapter"), int(row["input_len"]),
                             int(row["output_len"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{number}: not a trace row "
                                 f"(timestamp, adapter, input_len, output_len): {error}") from error
            if rows[-1][2] < 1 or rows[-1][3] < 1:
                raise ValueError(f"{path}:{number}: input_len and output_len must be >= 1")
    if not rows:
        raise ValueError(f"{path}: the trace is empty")
    rows.sort(key=lambda row: row[0])
    rows = rows[:limit] if limit else rows
    start = rows[0][0]
    return [BenchRequest(i, (t - start) / time_scale, None if a is None else str(a), n_in, n_out)
            for i, (t, a, n_in, n_out) in enumerate(rows)]


def arena_like_trace(num_adapters: int, duration: float, request_rate: float, seed: int = 0,
                     max_len: int = 1024) -> list[BenchRequest]:
    """A generated Chatbot-Arena-shaped trace (see the module docstring); not real data."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -1.2
    weights /= weights.sum()
    names = adapter_names(num_adapters)
    requests: list[BenchRequest] = []
    t, window = 0.0, 60.0
    while t < duration:
        rate = request_rate * float(rng.lognormal(0.0, 0.35))  # the rate drifts from window to window
        end = min(t + window, duration)
        shape = 1.0 / 2.0**2  # cv = 2: bursty
        while True:
            t += float(rng.gamma(shape, 1.0 / (shape * rate)))
            if t >= end:
                t = end
                break
            n_in = int(np.clip(rng.lognormal(np.log(70), 1.0), 4, max_len // 2))
            n_out = int(np.clip(rng.lognormal(np.log(200), 0.8), 4, max_len // 2))
            adapter = names[int(rng.choice(num_adapters, p=weights))] if num_adapters else None
            requests.append(BenchRequest(len(requests), t, adapter, n_in, n_out))
    return requests


def summary(requests: list[BenchRequest]) -> dict:
    """A few numbers that describe a workload, for the result file."""
    span = max(r.arrival for r in requests) - min(r.arrival for r in requests)
    return {
        "num_requests": len(requests),
        "distinct_adapters": len(distinct_adapters(requests)),
        "span_s": round(span, 3),
        "mean_input_len": float(np.mean([r.input_len for r in requests])),
        "mean_output_len": float(np.mean([r.output_len for r in requests])),
    }
