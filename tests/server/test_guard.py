"""What guards the server: the API key, the queue limit (503 + Retry-After), and SIGTERM draining
(through `slora serve` itself), on the dummy tiny model (token-id prompts, no tokenizer)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from slora.config import EngineConfig, PoolConfig, SchedulerConfig
from slora.server.app import ServerOptions, build_app
from tests.server.conftest import RunningServer

KEY = "s3cret-key"
LONG = {"model": "dummy:tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True,
        "logprobs": 0}  # with no tokenizer the text is empty: logprobs make every token a chunk


@pytest.fixture(scope="module")
def guarded():
    config = EngineConfig(model="dummy:tiny", pool=PoolConfig(num_slots=8192),
                          scheduler=SchedulerConfig(max_num_seqs=1))
    running = RunningServer(build_app(config, ServerOptions(api_key=KEY, max_queue=1)))
    yield running
    running.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_missing_or_wrong_key_gets_401_and_the_right_key_is_served(guarded):
    for headers in ({}, auth("wrong"), auth(KEY + "x"), {"Authorization": KEY}):
        response = httpx.get(guarded.url + "/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    got = client.completions.create(model="dummy:tiny", prompt=[1, 2, 3], max_tokens=3, temperature=0)
    assert got.usage.completion_tokens == 3 and got.choices[0].logprobs is None
    assert httpx.get(guarded.url + "/health").status_code == 200  # probes need no key


def test_text_prompts_and_chat_need_a_tokenizer(guarded):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for endpoint, body in (("completions", {"prompt": "hi"}), ("chat/completions", chat)):
        response = httpx.post(f"{guarded.url}/v1/{endpoint}", json={"model": "dummy:tiny"} | body, headers=auth())
        assert response.status_code == 400 and ("tokenizer" in response.text or "chat template" in response.text)


def test_a_full_queue_answers_503_with_retry_after_and_recovers(guarded):
    with httpx.Client(base_url=guarded.url, headers=auth(), timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as running, \
                http.stream("POST", "/v1/completions", json=LONG) as waiting:
            lines = running.iter_lines()  # kept: dropping the iterator closes the response
            assert next(lines).startswith("data: ")
            response = http.post("/v1/completions", json={"model": "dummy:tiny", "prompt": [1], "max_tokens": 1})
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
            assert waiting.status_code == 200
        time.sleep(0.3)  # both streams were dropped: their room is given back
        response = http.post("/v1/completions", json={"model": "dummy:tiny", "prompt": [1], "max_tokens": 1})
        assert response.status_code == 200
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
        assert response.status_code == 403  # no --adapter-root: run-time loading is off


def test_a_non_streaming_client_that_gives_up_frees_its_slots(guarded):
    body = LONG | {"stream": False, "max_tokens": 2000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(guarded.url + "/v1/completions", json=body, headers=auth(), timeout=0.3)
    deadline = time.monotonic() + 10
    while "slora_requests_running 1.0" in (text := httpx.get(guarded.url + "/metrics").text):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert 'slora_pool_slots_used{owner="kv"} 0.0' in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_running_requests_then_exits(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "slora.cli", "serve", "--model", "dummy:tiny", "--port", str(port),
               "--num-slots", "4096", "--log-level", "warning"]
    process = subprocess.Popen(command,
                               cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"SLORA_API_KEY": ""})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        texts = []
        with httpx.stream("POST", url + "/v1/completions", json=LONG | {"max_tokens": 1500}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and not texts:
                    process.send_signal(signal.SIGTERM)
                if line:
                    texts.append(line)
                if len(texts) == 100:  # draining: the listening socket is closed, the stream goes on
                    with pytest.raises(httpx.ConnectError):
                        httpx.get(url + "/health")
        chunks = [json.loads(line[6:]) for line in texts if line.startswith("data: {")]
        assert texts[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks) == 1500
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        output = process.stdout.read()
        assert f"{url}/v1" in output and "curl" in output and "OpenAI(" in output
    finally:
        if process.poll() is None:
            process.kill()
