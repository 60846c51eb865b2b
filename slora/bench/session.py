"""One benchmark session: the model loaded once, then any number of (system, workload) runs.

Every engine-based system gets a fresh `LLMEngine` over the same loaded weights (its own pool,
registry and scheduler), so runs do not share cached adapters or KV; the engine is dropped and the
device memory returned before the next run. Each run becomes one record (a plain dict) in
`session.runs`; `report.write_outputs` turns them into result.json, tables, plots and headline.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from contextlib import contextmanager
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slora.bench import SYSTEMS
from slora.bench import workload as wl
from slora.bench.adapters import ATTENTION_TARGETS, AdapterSet, SharedFileStore, prepare_adapter_set
from slora.bench.driver import EngineDriver, probe_decode, warm_up
from slora.bench.merged_swap import MergedSwap
from slora.bench.metrics import summarise, summarise_steps
from slora.bench.roofline import decode_roofline, measure_copy_bandwidth
from slora.bench.systems import NotAvailable, engine_config_overrides, split_engine_pool
from slora.config import EngineConfig, LoRAConfig, PoolConfig, SchedulerConfig
from slora.engine.engine import LLMEngine, resolve_dtype
from slora.models.loader import load_model

logger = logging.getLogger("slora.bench")


@dataclass
class BenchOptions:
    model: str = "dummy:tiny"
    device: str = "cpu"
    dtype: str | None = None
    backend: str | None = None  # kernels; None = the engine's default for the device
    num_slots: int | None = None
    pool_memory: int | float | str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    # S-LoRA's admission: the workloads' requests set max_tokens to what they generate, so it is exact
    # (no request is ever preempted and recomputed); "optimistic" is the engine's default.
    admission: str = "reserve"
    seed: int = 0
    slo_ttft: float = 6.0
    drain_timeout: float = 30.0
    time_limit: float | None = None  # seconds per run; past it the run stops and is marked truncated
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    targets: tuple[str, ...] = ATTENTION_TARGETS
    adapter_variants: int = 4
    adapter_dir: str | None = None
    adapter_store: str = "shared"  # "shared" (SharedFileStore) or "engine" (the engine's HostStore)
    max_cpu_adapters: int | None = None
    split_adapter_share: float = 0.25
    peft_batch_sizes: tuple[int, ...] = (1, 4, 16, 32)
    peft_time_per_size: float = 20.0
    progress: bool = True
    warmup: bool = True


@dataclass
class BenchSession:
    options: BenchOptions
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        o = self.options
        self.device = torch.device(o.device)
        self.dtype = resolve_dtype(o.dtype, self.device)
        start = time.perf_counter()
        self.loaded = load_model(o.model, self.device, self.dtype, o.max_model_len)
        self.load_s = time.perf_counter() - start
        self.config = self.loaded.config
        self.copy_bandwidth = measure_copy_bandwidth(self.device)
        self.roofline = decode_roofline(self.loaded.model, self.config.kv_dim, self.config.num_layers, self.dtype,
                                        self.copy_bandwidth)
        self.adapter_root = Path(o.adapter_dir or tempfile.mkdtemp(prefix="slora-bench-adapters-"))
        self._adapter_sets: dict[tuple[str, ...], AdapterSet] = {}

    # --- adapters --------------------------------------------------------------------------------
    def adapters_for(self, names: list[str]) -> AdapterSet:
        key = tuple(names)
        if key not in self._adapter_sets:
            o = self.options
            self._adapter_sets[key] = prepare_adapter_set(names, self.loaded.arch, self.adapter_root, o.ranks, o.targets,
                                                          o.adapter_variants, o.seed)
        return self._adapter_sets[key]

    # --- runs --------------------------------------------------------------------------------------
    def run(self, system: str, requests: list[wl.BenchRequest], mode: str, num_adapters: int,
            request_rate: float | None = None, adapter_names: list[str] | None = None, label: str = "",
            time_limit: float | None = None, drain_timeout: float | None = None) -> dict:
        """Serve `requests` on `system` (`mode` "offline" or "online"); `adapter_names` are the
        adapters registered (all `num_adapters` of the setting; default: those the requests name).
        `time_limit` and `drain_timeout` override the options' for this run."""
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
        if mode not in ("offline", "online"):
            raise ValueError(f"mode must be 'offline' or 'online', got {mode!r}")
        requests = wl.offline(requests) if mode == "offline" else requests
        names = adapter_names if adapter_names is not None else wl.distinct_adapters(requests)
        record = {"system": system, "mode": mode, "num_adapters": num_adapters, "request_rate": request_rate,
                  "label": label, "workload": wl.summary(requests), "status": "ok", "reason": None}
        with self._recorded(record, f"{system} {mode} n={num_adapters}"):
            if system == "peft":
                self._run_peft(record, requests, mode)
            else:
                limits = (self.options.time_limit if time_limit is None else time_limit,
                          self.options.drain_timeout if drain_timeout is None else drain_timeout)
                self._run_engine(record, system, requests, mode, names, *limits)
        return record

    @contextmanager
    def _recorded(self, record: dict, what: str):
        """Run one measurement into `record`: a failure marks it (one system failing must not lose the
        others' results), memory is freed, and the record joins the run's list either way."""
        started = time.perf_counter()
        try:
            yield
        except NotAvailable as error:
            record["status"], record["reason"] = "not available", str(error)
        except Exception as error:
            logger.error("%s failed:\n%s", what, traceback.format_exc())
            record["status"], record["reason"] = "failed", f"{type(error).__name__}: {error}"
        finally:
            self._free_memory()
            record["wall_s"] = time.perf_counter() - started
            self.runs.append(record)

    def skip(self, system: str, mode: str, num_adapters: int, request_rate: float | None, reason: str,
             label: str = "") -> dict:
        record = {"system": system, "mode": mode, "num_adapters": num_adapters, "request_rate": request_rate,
                  "label": label, "status": "skipped", "reason": reason}
        self.runs.append(record)
        return record

    def _run_engine(self, record: dict, system: str, requests: list[wl.BenchRequest], mode: str,
                    names: list[str], time_limit: float | None, drain_timeout: float) -> None:
        overrides = engine_config_overrides(system)
        uses_adapters = system not in ("base-only", "merged-swap")
        if system == "base-only":
            requests = wl.without_adapters(requests)
        engine = self._engine(overrides)
        adapters = self.adapters_for(names) if names else AdapterSet()
        if uses_adapters:
            self._register(engine, adapters)
        if system == "slora-split-pool":
            record["adapter_region_slots"] = split_engine_pool(engine, self.options.split_adapter_share)
        gate = MergedSwap(engine, adapters.folders) if system == "merged-swap" else None
        try:
            if self.options.warmup:
                warm_up(engine, self._warmup_adapters(adapters) if uses_adapters else [], self.options.seed)
            record["pool_slots"] = engine.pool.num_slots
            driver = EngineDriver(engine, self.options.seed, self.options.progress,
                                  desc=f"{system} {mode} n={record['num_adapters']}"
                                       + (f" R={record['request_rate']}" if mode == "online" else ""))
            compiled = compiled_kernels()
            outcome = driver.run(requests, mode == "online", time_limit, drain_timeout, gate)
            record["kernel_compiles"] = compiled_kernels() - compiled if compiled is not None else None
        finally:
            if gate is not None:
                gate.restore()
        record["metrics"] = summarise(outcome.records, outcome.elapsed, outcome.truncated, self.options.slo_ttft,
                                      mode == "online")
        record["steps"] = summarise_steps(outcome.steps)
        record["steps"]["preemptions"] = engine.scheduler.num_preemptions  # each one recomputes a sequence
        record["roofline"] = self.roofline.summarise(outcome.steps)
        if uses_adapters:
            record["adapters"] = adapters.describe() | {"store": self.options.adapter_store}
            record["lora"] = _lora_stats(engine)
        if gate is not None:
            record["swaps"] = gate.swaps
        del engine, driver, outcome

    def _run_peft(self, record: dict, requests: list[wl.BenchRequest], mode: str) -> None:
        from slora.bench.peft_baseline import run_peft

        if mode != "offline":
            raise NotAvailable("peft runs offline only (static batches through HF generate)")
        adapters = self.adapters_for(wl.distinct_adapters(requests))
        record["metrics"] = run_peft(self.config, adapters, requests, self.device, self.dtype,
                                     list(self.options.peft_batch_sizes), self.options.peft_time_per_size,
                                     self.options.seed, self.options.progress)
        record["adapters"] = adapters.describe()

    def probe(self, adapter_names: list[str], num_adapters: int, prompt_len: int = 128, decode_steps: int = 20,
              batch_size: int | None = None, system: str = "slora") -> dict:
        """Time pure decode steps at the largest batch the pool allows (or `batch_size`) against the
        roofline; adapters are assigned round-robin, so the batch's adapters are all distinct."""
        record = {"system": system, "mode": "decode-probe", "num_adapters": num_adapters, "request_rate": None,
                  "label": "", "status": "ok", "reason": None}
        with self._recorded(record, "decode probe"):
            engine = self._engine(engine_config_overrides(system))
            adapters = self.adapters_for(adapter_names) if adapter_names else AdapterSet()
            self._register(engine, adapters)
            if self.options.warmup:
                warm_up(engine, self._warmup_adapters(adapters), self.options.seed)
            size = batch_size or largest_batch(engine, adapters.names, prompt_len, decode_steps)
            steps, info = probe_decode(engine, adapters.names, size, prompt_len, decode_steps, self.options.seed,
                                       self.options.progress)
            record["probe"] = info
            record["roofline"] = self.roofline.summarise(steps)
            record["steps"] = summarise_steps(steps)
            if not steps:
                record["status"], record["reason"] = "failed", f"no pure decode step at batch {size}: {info}"
            del engine
        return record

    # --- helpers -----------------------------------------------------------------------------------
    def _engine(self, overrides: dict) -> LLMEngine:
        o = self.options
        config = EngineConfig(
            model=o.model, device=o.device, dtype=o.dtype, seed=o.seed,
            pool=PoolConfig(num_slots=o.num_slots, memory=o.pool_memory),
            scheduler=SchedulerConfig(max_num_seqs=o.max_num_seqs, max_num_batched_tokens=o.max_num_batched_tokens,
                                      max_model_len=o.max_model_len, admission=o.admission),
            lora=LoRAConfig(max_lora_rank=max(max(o.ranks), 1), max_cpu_adapters=o.max_cpu_adapters),
            backend=o.backend, **overrides,
        )
        engine = LLMEngine(config, loaded=self.loaded)
        if o.adapter_store == "shared":
            engine.residency.store = SharedFileStore.replacing(engine.residency.store)
        return engine

    def _register(self, engine: LLMEngine, adapters: AdapterSet) -> None:
        for name, folder in adapters.folders.items():
            engine.add_adapter(name, str(folder))

    def _warmup_adapters(self, adapters: AdapterSet) -> list[str]:
        """One adapter of each weight file (so of each rank): enough to run every kernel variant once
        and, with the shared store, to hold every file packed in host memory before the measured run,
        as S-LoRA's adapters all are (otherwise a run's first steps read files from disk: 0.7 s on an H100 host)."""
        by_file: dict[Path, str] = {}
        for name in adapters.names:
            by_file.setdefault(adapters.folders[name], name)
        return list(by_file.values())

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict:
        o = asdict(self.options)
        return {"options": o, "load_s": self.load_s, "copy_bandwidth_bytes_s": self.copy_bandwidth,
                "roofline": self.roofline.describe(), "adapter_root": str(self.adapter_root),
                "model_parameters": sum(p.numel() for p in self.loaded.model.parameters())}


def compiled_kernels() -> int | None:
    """Variants of slora's Triton kernels compiled so far in this process (None without CUDA): its
    change over a run says whether a step waited for a compile (a second or more each)."""
    if not torch.cuda.is_available():
        return None
    from triton.runtime.jit import JITFunction

    from slora.kernels import triton_attention, triton_fused, triton_lora

    return sum(len(caches[0]) for module in (triton_attention, triton_fused, triton_lora)
               for value in vars(module).values() if isinstance(value, JITFunction)
               for caches in value.device_caches.values())


def largest_batch(engine: LLMEngine, names: list[str], prompt_len: int, decode_steps: int) -> int:
    """The most sequences (up to max_num_seqs) whose K/V and distinct adapters fit in 95% of the pool."""
    budget = engine.config.scheduler.max_num_batched_tokens
    limit = int(engine.pool.num_free * 0.95)
    used, size = 0, 0
    while size < engine.config.scheduler.max_num_seqs:
        batch = size + 1
        context = prompt_len + decode_steps + 2 * (-(-batch * prompt_len // budget) + 2) + 8
        adapter = engine.residency.slots_needed(names[size % len(names)]) if names and size < len(names) else 0
        if (used + adapter) + batch * context > limit:
            break
        used += adapter
        size = batch
    return max(1, size)


def _lora_stats(engine: LLMEngine) -> dict:
    try:
        return dict(engine.lora_stats())
    except Exception as error:  # the stats' shape is the engine's business
        return {"error": str(error)}
