"""Fixtures of the reliability tests: the tiny chat model of tests/server (a real tokenizer), a few
good adapters and the catalogue of bad ones under one adapter root, and a server with small limits
so that every request generated at random stays cheap."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slora.architecture import ArchitectureSpec
from slora.config import EngineConfig, LoRAConfig, PoolConfig, SchedulerConfig
from slora.fixtures import write_adapter
from slora.models.loader import read_architecture
from slora.server.app import ServerOptions, build_app
from tests.reliability.adapters import make_bad_adapters
from tests.server.conftest import RunningServer, chat_model  # noqa: F401 - the shared tiny model

NUM_GOOD = 4
MAX_NUM_SEQS = 8
MAX_QUEUE = 16
MAX_TOTAL_TOKENS = 128
MAX_BODY = 64 * 1024
GREEDY = {"model": "r01", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
          "ignore_eos": True}


def good_adapters(root: Path) -> dict[str, str]:
    return {f"r{i:02d}": str(root / f"r{i:02d}") for i in range(NUM_GOOD)}


@pytest.fixture(scope="session")
def chat_arch(chat_model) -> ArchitectureSpec:  # noqa: F811
    return read_architecture(chat_model[1])


@pytest.fixture(scope="session")
def reliability_root(chat_arch, tmp_path_factory) -> Path:
    """root/: r00..r03 (served), churn (loaded at run time), bad-* (every bad kind); outside/: what
    the links of the bad ones lead to."""
    base = tmp_path_factory.mktemp("reliability")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    for i in range(NUM_GOOD):
        write_adapter(root / f"r{i:02d}", chat_arch, rank=(4, 8)[i % 2], seed=i + 1,
                      targets=(("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"))[i % 2])
    write_adapter(root / "churn", chat_arch, rank=8, seed=99, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    make_bad_adapters(root, chat_arch, outside)
    return root


def engine_config(chat_model, root: Path, **lora) -> EngineConfig:  # noqa: F811
    return EngineConfig(model=str(chat_model[1]), pool=PoolConfig(num_slots=8192),
                        scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS),
                        lora=LoRAConfig(**({"adapters": good_adapters(root)} | lora)))


def limited_options(root: Path, **changes) -> ServerOptions:
    return ServerOptions(**{"served_model_name": "tiny", "adapter_root": str(root), "max_queue": MAX_QUEUE,
                            "max_total_tokens": MAX_TOTAL_TOKENS, "max_n": 4, "max_body_size": MAX_BODY} | changes)


@pytest.fixture(scope="session")
def limited(chat_model, reliability_root) -> Iterator[RunningServer]:  # noqa: F811
    """A server with small limits: max_num_seqs 8, max_queue 16, 128 tokens per request, n <= 4, 64 KiB bodies."""
    running = RunningServer(build_app(engine_config(chat_model, reliability_root), limited_options(reliability_root)))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def greedy_reference(limited) -> str:
    """The known greedy answer, taken before any test disturbed the server."""
    response = httpx.post(limited.url + "/v1/completions", json=GREEDY, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def state(running: RunningServer) -> dict[str, int]:
    """What must return to idle: engine requests, pool slots, admitted sequences, registered adapters."""
    server = running.app.state.server
    engine = server.engine.engine
    snapshot = server.engine.snapshot
    return {"running": snapshot.running, "waiting": snapshot.waiting, "kv_slots": snapshot.kv_slots,
            "in_flight": server.in_flight, "trackers": len(server.engine._trackers), "groups": len(engine._groups),
            "registered": len(engine.registry), "adapter_slots": snapshot.adapter_slots,
            "host_cached": len(engine.residency.store)}


def wait_idle(running: RunningServer, timeout: float = 30) -> dict[str, int]:
    """The state once nothing runs, waits or holds KV slots; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = state(running)
        if not any(now[k] for k in ("running", "waiting", "kv_slots", "in_flight", "trackers", "groups")):
            return now
        assert time.monotonic() < deadline, f"the server did not return to idle: {now}"
        time.sleep(0.05)


def rss_bytes() -> int:
    """Resident memory of this process (the in-process servers live here)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def assert_still_correct(running: RunningServer, reference: str) -> None:
    response = httpx.post(running.url + "/v1/completions", json=GREEDY, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reference
    assert httpx.get(running.url + "/health").status_code == 200


@contextlib.contextmanager
def serving(config: EngineConfig, options: ServerOptions) -> Iterator[RunningServer]:
    running = RunningServer(build_app(config, options))
    try:
        yield running
    finally:
        running.stop()
