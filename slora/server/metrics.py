"""Prometheus metrics of one server: what the HTTP side counts, plus the engine's latest snapshot.

Counters and histograms are updated by the event loop as requests arrive and tokens stream out;
gauges of the engine (running/waiting requests, pool slots by owner, adapter residency counters)
are read from the snapshot that the engine thread publishes, at scrape time. Each server has its
own registry, so that several servers in one process (tests) do not share metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slora.server.async_engine import EngineSnapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield _gauge("slora_requests_running", "sequences in the running batch", s.running)
        yield _gauge("slora_requests_waiting", "sequences waiting for a place in the batch", s.waiting)
        yield _gauge("slora_pool_slots_total", "slots of the unified pool", s.num_slots)
        used = GaugeMetricFamily("slora_pool_slots_used", "pool slots in use, by owner", labels=["owner"])
        used.add_metric(["kv"], s.kv_slots)
        used.add_metric(["adapter"], s.adapter_slots)
        yield used
        yield _gauge("slora_pool_slots_free", "free pool slots", s.free_slots)
        adapters = GaugeMetricFamily("slora_adapters", "adapters by where they are", labels=["state"])
        for state, key in (("registered", "registered"), ("resident", "resident"), ("host_cached", "host_cached")):
            adapters.add_metric([state], s.lora.get(key, 0))
        yield adapters
        for key, doc in (("loads", "adapter copies into the pool"), ("evictions", "adapters evicted from the pool"),
                         ("hits", "requests whose adapter was already resident"),
                         ("prefetches", "adapters loaded into the pool while their requests waited"),
                         ("disk_loads", "adapters read from disk into host memory")):
            counter = CounterMetricFamily(f"slora_adapter_{key}", doc)
            counter.add_metric([], s.lora.get(key, 0))
            yield counter
        steps = CounterMetricFamily("slora_engine_steps", "forward passes, by how they ran", labels=["mode"])
        graph_steps = s.steps.get("graph_steps", 0)
        steps.add_metric(["cuda_graph"], graph_steps)
        steps.add_metric(["eager"], s.steps.get("steps", 0) - graph_steps)
        yield steps
        yield _gauge("slora_cuda_graphs_captured", "decode graphs captured (per batch bucket, with or without LoRA)",
                     s.steps.get("graphs_captured", 0))
        back_offs = CounterMetricFamily("slora_out_of_memory_back_offs",
                                        "forward passes out of device memory, undone and retried with fewer sequences")
        back_offs.add_metric([], s.steps.get("out_of_memory_back_offs", 0))
        yield back_offs


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("slora_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=r)
        self.finished = Counter("slora_requests_finished", "generation requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("slora_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("slora_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("slora_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("slora_inter_token_latency_seconds", "time between a request's updates, per token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("slora_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
