"""Drives an in-process `LLMEngine` through a workload and times every step and every token.

Offline, every request is added at once and the engine runs until all are done (throughput).
Online, the driver owns the clock: it adds each request when its arrival time has passed, steps
the engine while it has work, and sleeps until the next arrival when it has none. Each step is
timed: the wall time of the engine call that issues it, which waits for the step before it (the
engine overlaps steps, so that is the period at which steps complete). Its composition (sequences,
prefill and decode tokens, K/V read, distinct adapters) is read from the scheduler's batch, by
wrapping the engine's `scheduler.schedule` for the run, for the roofline.

A `Gate` decides which arrived requests enter the engine and under which adapter name; the
default admits all of them as they are (merged-swap uses its own, see `merged_swap.py`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tqdm import tqdm

from slora.bench.metrics import RequestRecord, StepRecord
from slora.bench.workload import BenchRequest, prompt_tokens
from slora.engine.sampling_params import SamplingParams


class Gate:
    """Admit every arrived request with its own adapter."""

    def admit(self, arrived: deque[BenchRequest], engine_busy: bool) -> list[tuple[BenchRequest, str | None]]:
        admitted = [(r, r.adapter) for r in arrived]
        arrived.clear()
        return admitted


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    steps: list[StepRecord]
    elapsed: float
    truncated: bool
    extra: dict = field(default_factory=dict)


class EngineDriver:
    def __init__(self, engine, seed: int, progress: bool = True, desc: str = ""):
        self.engine = engine
        self.seed = seed
        self.progress = progress
        self.desc = desc
        self.vocab_size = engine.model_config.vocab_size

    # --- one run ---------------------------------------------------------------------------------
    def run(self, requests: list[BenchRequest], online: bool, time_limit: float | None = None,
            drain_timeout: float = 30.0, gate: Gate | None = None) -> RunOutcome:
        """Serve `requests`; stop early (`truncated`) past `time_limit` s, or online past the last
        arrival plus `drain_timeout` s. Unfinished requests are aborted when the run stops."""
        gate = gate or Gate()
        ordered = sorted(requests, key=lambda r: (r.arrival, r.index))
        records = {r.index: RequestRecord(r) for r in ordered}
        prompts = {r.index: prompt_tokens(r, self.vocab_size, self.seed) for r in ordered}
        deadline = time_limit if time_limit is not None else float("inf")
        if online and ordered:
            deadline = min(deadline, ordered[-1].arrival + drain_timeout)
        steps: list[StepRecord] = []
        pending = deque(ordered)
        arrived: deque[BenchRequest] = deque()
        in_engine: set[int] = set()
        truncated = False
        restore = self._instrument(steps)
        bar = tqdm(total=len(ordered), desc=self.desc, disable=not self.progress, leave=False, unit="req")
        start = time.perf_counter()
        try:
            while pending or arrived or in_engine:
                now = time.perf_counter() - start
                while pending and (not online or pending[0].arrival <= now):
                    arrived.append(pending.popleft())
                busy = self.engine.has_unfinished()
                for request, adapter in gate.admit(arrived, busy):
                    self._add(request, adapter, prompts.pop(request.index), records, in_engine, now, bar)
                if now > deadline:
                    truncated = True
                    break
                if not self.engine.has_unfinished():
                    if not pending and not arrived:
                        break
                    if pending and not arrived:
                        time.sleep(max(0.0, min(pending[0].arrival - now, 0.05)))
                    continue
                self._step(start, steps, records, in_engine, bar)
        finally:
            restore()
            bar.close()
        elapsed = time.perf_counter() - start
        if online:  # the span of the run: from the first arrival to the last finish (or the cut)
            finishes = [r.finish for r in records.values() if r.finish is not None]
            end = elapsed if truncated or not finishes else max(finishes)
            elapsed = end - (ordered[0].arrival if ordered else 0.0)
        for index in list(in_engine):
            self.engine.abort(f"bench-{index}")
        return RunOutcome(list(records.values()), steps, elapsed, truncated or bool(pending) or bool(arrived))

    def _add(self, request: BenchRequest, adapter: str | None, prompt: list[int], records: dict,
             in_engine: set[int], now: float, bar) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
        residency = self.engine.residency
        validating = hasattr(residency, "validating")
        try:
            if validating:
                residency.validating = True
            self.engine.add_request(prompt, params, adapter, f"bench-{request.index}")
            in_engine.add(request.index)
        except (ValueError, KeyError) as error:  # RequestError, UnknownAdapterError
            record = records[request.index]
            record.error, record.finish = str(error), now
            bar.update()
        finally:
            if validating:
                residency.validating = False

    def _step(self, start: float, steps: list[StepRecord], records: dict, in_engine: set[int], bar) -> None:
        begin = time.perf_counter()
        outputs = self.engine.step()  # no device synchronisation: the engine overlaps steps
        end = time.perf_counter()
        if steps and steps[-1].duration < 0:  # the composition recorded by the wrapped scheduler
            steps[-1].start, steps[-1].duration = begin - start, end - begin
            if steps[-1].num_seqs == 0:  # it only read the last step's tokens back: no step of its own
                steps.pop()
        now = end - start
        for output in outputs:
            index = int(output.request_id.removeprefix("bench-"))
            record = records[index]
            completion = output.outputs[0]
            record.add_tokens(len(completion.token_ids) - record.num_tokens, now)
            if output.finished:
                record.finish = now
                record.error = completion.error
                in_engine.discard(index)
                bar.update()

    # --- step composition --------------------------------------------------------------------------
    def _instrument(self, steps: list[StepRecord]):
        """Wrap the engine's scheduler so that each scheduled batch is recorded before it runs."""
        scheduler = self.engine.scheduler
        original = scheduler.schedule
        residency = self.engine.residency

        def schedule():
            batch = original()
            steps.append(_composition(batch, residency))
            return batch

        scheduler.schedule = schedule
        return lambda: delattr(scheduler, "schedule")


def _composition(batch, residency) -> StepRecord:
    prefill = decode = context = 0
    adapters: set[str] = set()
    for request, num_new in zip(batch.requests, batch.num_new_tokens):
        if num_new == 1 and request.num_computed_tokens == request.num_tokens - 1:
            decode += 1
        else:
            prefill += num_new
        context += request.num_computed_tokens + num_new
        if request.adapter is not None:
            adapters.add(request.adapter)
    rows = 0
    for name in adapters:
        try:
            rows += residency.get(name).layout.num_rows
        except KeyError:
            pass
    return StepRecord(0.0, -1.0, len(batch.requests), prefill, decode, context, len(adapters), rows)


def warm_up(engine, adapters: list[str], seed: int) -> None:
    """A few short requests (one per adapter given, and one without) through the engine, so that
    one-time costs (kernel compilation, allocator growth) stay out of the measurements."""
    driver = EngineDriver(engine, seed, progress=False)
    requests = [BenchRequest(100_000 + i, 0.0, name, 24 + 8 * i, 6) for i, name in enumerate([None, *adapters])]
    driver.run(requests, online=False)
    driver.run([BenchRequest(100_100 + i, 0.0, r.adapter, 40, 3) for i, r in enumerate(requests * 4)], online=False)


def probe_decode(engine, adapters: list[str], batch_size: int, prompt_len: int, decode_steps: int, seed: int,
                 progress: bool = False) -> tuple[list[StepRecord], dict]:
    """Fill the engine with `batch_size` sequences (adapter i % n each: every one distinct when
    there are enough) and time `decode_steps` pure decode steps once all of them are decoding."""
    driver = EngineDriver(engine, seed, progress=False)
    steps: list[StepRecord] = []
    records: dict[int, RequestRecord] = {}
    in_engine: set[int] = set()
    budget = engine.config.scheduler.max_num_batched_tokens
    prefill_steps = -(-batch_size * prompt_len // budget) + 2  # while these run, the early ones decode
    output_len = decode_steps + 2 * prefill_steps + 8
    requests = [BenchRequest(200_000 + i, 0.0, adapters[i % len(adapters)] if adapters else None, prompt_len, output_len)
                for i in range(batch_size)]
    for r in requests:
        records[r.index] = RequestRecord(r)
        driver._add(r, r.adapter, prompt_tokens(r, driver.vocab_size, seed), records, in_engine, 0.0, NoBar())
    restore = driver._instrument(steps)
    measured: list[StepRecord] = []
    bar = tqdm(total=decode_steps, desc="decode probe", disable=not progress, leave=False)
    start = time.perf_counter()
    try:
        for _ in range(decode_steps + 10 * batch_size + 100):
            if not engine.has_unfinished():
                break
            driver._step(start, steps, records, in_engine, NoBar())
            last = steps[-1] if steps else None
            all_running = not getattr(engine.scheduler, "waiting", ()) and last is not None \
                and last.num_seqs == len(in_engine)
            if last is not None and last.is_decode and all_running:
                measured.append(last)
                bar.update()
                if len(measured) >= decode_steps:
                    break
    finally:
        restore()
        bar.close()
    for index in list(in_engine):
        engine.abort(f"bench-{index}")
    largest = max((s.num_seqs for s in measured), default=0)
    return measured, {"requested_batch": batch_size, "measured_batch": largest, "prompt_len": prompt_len,
                      "errors": sorted({r.error for r in records.values() if r.error})[:3]}


class NoBar:
    def update(self, n: int = 1) -> None:
        pass
