"""Fixtures of the server tests: a tiny random Llama that has a real tokenizer and chat template
(SmolLM2's), 16 PEFT adapters of it under one adapter root, a real uvicorn server on a free
loopback port, and the offline `LLM` on the same model as the oracle."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from slora import LLM
from slora.config import EngineConfig, LoRAConfig, PoolConfig, SchedulerConfig
from slora.fixtures import tiny_chat_model
from slora.server.app import ServerOptions, build_app
from tests.reference.peft import make_peft_adapter

NUM_ADAPTERS = 16
NUM_SLOTS = 16384
TARGETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear",
           ["gate_proj", "up_proj", "down_proj"])


class RunningServer:
    """A uvicorn server for `app` on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """(HF model, folder): a tiny random Llama with SmolLM2's tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    model = tiny_chat_model(folder)
    return model, folder


@pytest.fixture(scope="session")
def adapter_root(chat_model, tmp_path_factory) -> Path:
    """16 served adapters a00..a15 (mixed ranks and targets), one more ('late') for run-time
    loading, all under one root; and an adapter outside it."""
    base = tmp_path_factory.mktemp("adapters")
    root = base / "root"
    root.mkdir()
    model = chat_model[0]
    for i in range(NUM_ADAPTERS):
        rank = (2, 4, 8, 16)[i % 4]
        make_peft_adapter(root, f"a{i:02d}", model, seed=i + 1, r=rank, lora_alpha=2 * rank,
                          target_modules=TARGETS[(i // 4) % 4])
    make_peft_adapter(root, "late", model, seed=100, r=8, lora_alpha=8, target_modules="all-linear")
    outside = base / "outside"
    outside.mkdir()
    shutil.copytree(root / "a00", outside / "escape")
    return root


def served_adapters(root: Path) -> dict[str, str]:
    return {f"a{i:02d}": str(root / f"a{i:02d}") for i in range(NUM_ADAPTERS)}


@pytest.fixture(scope="session")
def offline(chat_model, adapter_root) -> LLM:
    llm = LLM(model=str(chat_model[1]), num_slots=NUM_SLOTS, adapters=served_adapters(adapter_root))
    llm.add_adapter("late", str(adapter_root / "late"))
    return llm


@pytest.fixture(scope="session")
def server(chat_model, adapter_root):
    config = EngineConfig(model=str(chat_model[1]), pool=PoolConfig(num_slots=NUM_SLOTS),
                          scheduler=SchedulerConfig(max_num_seqs=64),
                          lora=LoRAConfig(adapters=served_adapters(adapter_root)))
    running = RunningServer(build_app(config, ServerOptions(served_model_name="tiny", adapter_root=str(adapter_root))))
    yield running
    running.stop()
