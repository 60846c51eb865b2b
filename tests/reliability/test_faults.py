"""Faults: an exception inside one request's processing (injected for one poisoned prompt) fails that
request with a 500 OpenAI error body while the others are served correctly; a failed forward pass
fails its batch and the engine goes on; a storm of disconnecting clients and hundreds of adapter
loads and unloads leave nothing behind. (SIGTERM draining: tests/server/test_guard.py.)"""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import time

import httpx
import pytest

import slora.engine.engine as engine_module
from slora.engine.detokenizer import IncrementalDetokenizer
from slora.server import async_engine
from tests.reliability.conftest import assert_still_correct, rss_bytes, wait_idle

POISON = [4242, 4243, 4244]  # the prompt whose processing the injected fault breaks
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
MODELS = ["tiny", "r00", "r01", "r03"]


def good_bodies() -> list[dict]:
    return [{"model": m, "prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
            for m in MODELS for p in PROMPTS]


@pytest.fixture(scope="module")
def references(limited, greedy_reference) -> dict[str, str]:
    """Each good body's answer, before any fault was injected."""
    with httpx.Client(base_url=limited.url, timeout=60) as client:
        return {json.dumps(b): client.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in good_bodies()}


def poisoned(prompt_ids: list[int]) -> bool:
    return list(prompt_ids[:3]) == POISON


def inject(kind: str, monkeypatch) -> str:
    """Make one stage fail for the poisoned prompt only; returns the message the failure must carry."""
    if kind == "sampler":
        real = engine_module.launch

        def launch(logits, inputs, eos_token_ids=()):
            if any(poisoned(row.prompt_token_ids) for row in inputs):
                raise RuntimeError("injected sampler fault")
            return real(logits, inputs, eos_token_ids)

        monkeypatch.setattr(engine_module, "launch", launch)
    elif kind == "detokenizer":
        real_add = IncrementalDetokenizer.add

        def add(self, token_id):
            if poisoned(self._ids):
                raise ValueError("injected detokenizer fault")
            return real_add(self, token_id)

        monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    elif kind == "final-flush":
        real_flush = IncrementalDetokenizer.flush

        def flush(self):
            if poisoned(self._ids):
                raise KeyError("injected flush fault")
            return real_flush(self)

        monkeypatch.setattr(IncrementalDetokenizer, "flush", flush)
    elif kind == "stream-delta":
        real_delta = async_engine._Tracker.delta

        def delta(self, output, token_text):
            if poisoned(output.prompt_token_ids):
                raise RuntimeError("injected streaming fault")
            return real_delta(self, output, token_text)

        monkeypatch.setattr(async_engine._Tracker, "delta", delta)
    return f"injected {kind.split('-')[0].replace('final', 'flush').replace('stream', 'streaming')} fault"


@pytest.mark.parametrize("kind", ["sampler", "detokenizer", "final-flush", "stream-delta"])
def test_a_fault_in_one_request_fails_it_alone_with_a_500(limited, references, monkeypatch, kind):
    message = inject(kind, monkeypatch)
    bad = {"model": "r00", "prompt": POISON, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    bodies = good_bodies() + [bad, bad | {"stream": True}, bad | {"model": "tiny", "n": 2}]
    random.Random(0).shuffle(bodies)
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: httpx.post(limited.url + "/v1/completions", json=b, timeout=60), bodies))
    for body, response in zip(bodies, responses):
        if body["prompt"] != POISON:
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == references[json.dumps(body)]
        elif body.get("stream"):  # the stream had started: the error is its last event
            assert response.status_code == 200
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and message in json.loads(events[-2])["error"]["message"]
        else:
            error = response.json()["error"]
            assert response.status_code == 500 and message in error["message"], response.text
            assert error["type"] == "server_error" and error["code"] == "engine_error"
    monkeypatch.undo()
    wait_idle(limited)
    assert limited.app.state.server.engine.alive


def test_a_failed_forward_pass_fails_its_batch_and_the_engine_goes_on(limited, references, greedy_reference,
                                                                      monkeypatch):
    engine = limited.app.state.server.engine.engine
    real_model = engine.model

    def model(batch):
        if POISON[0] in batch.input_ids.tolist():
            raise RuntimeError("injected forward fault")
        return real_model(batch)

    monkeypatch.setattr(engine, "model", model)
    bad = {"model": "tiny", "prompt": POISON, "max_tokens": 4}
    response = httpx.post(limited.url + "/v1/completions", json=bad, timeout=60)
    assert response.status_code == 500 and "forward pass failed" in response.json()["error"]["message"]
    bodies = good_bodies() + [bad] * 3
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: httpx.post(limited.url + "/v1/completions", json=b, timeout=60), bodies))
    for body, response in zip(bodies, responses):  # batch mates of a poisoned request fail with it, no others
        if body["prompt"] == POISON or response.status_code == 500:
            assert response.status_code == 500 and "injected forward fault" in response.json()["error"]["message"]
        else:
            assert response.json()["choices"][0]["text"] == references[json.dumps(body)]
    monkeypatch.undo()
    wait_idle(limited)
    assert_still_correct(limited, greedy_reference)


def _raw(url: str, request: bytes) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)


def _disconnecting_client(url: str, i: int) -> None:
    rng = random.Random(i)
    body = {"model": MODELS[i % 4], "prompt": PROMPTS[i % 3], "max_tokens": 100, "temperature": 0.7,
            "ignore_eos": True, "n": 1 + i % 2}
    kind = i % 4
    if kind == 0:  # streaming, gone after a few events
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=30) as response:
            for _, _ in zip(range(rng.randint(1, 5)), response.iter_lines()):
                pass
    elif kind == 1:  # waiting for the whole answer, gone before it (mostly: the tiny model is quick)
        try:
            httpx.post(url + "/v1/completions", json=body | {"max_tokens": 120}, timeout=rng.uniform(0.01, 0.2))
        except httpx.TimeoutException:
            pass
    elif kind == 2:  # half a body, then gone
        payload = json.dumps(body).encode()
        _raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload[: len(payload) // 2]))
    else:  # a whole request, gone without reading a byte
        payload = json.dumps(body).encode()
        _raw(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))


def test_a_disconnect_storm_leaves_nothing_behind(limited, greedy_reference):
    before = wait_idle(limited)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(_disconnecting_client, limited.url, i) for i in range(64)]:
            future.result(timeout=60)
    after = wait_idle(limited)
    assert after["registered"] == before["registered"] and after["kv_slots"] == 0
    assert_still_correct(limited, greedy_reference)


def test_adapter_churn_does_not_grow_the_registry_pool_or_memory(limited, greedy_reference):
    server = limited.app.state.server
    engine = server.engine.engine

    def cycle(client: httpx.Client, name: str, request: bool) -> str | None:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "churn"})
        assert response.status_code == 200, response.text
        text = None
        if request:
            response = client.post("/v1/completions", json={"model": name, "prompt": "Once upon a time",
                                                            "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            text = response.json()["choices"][0]["text"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        return text

    # No keep-alive: httpx writes headers and body apart, and on a kept-alive loopback connection Nagle's
    # algorithm and delayed ACKs then cost ~40 ms a call (the server is not slower; the client waits).
    with httpx.Client(base_url=limited.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        want = [cycle(client, f"warm-{i}", True) for i in range(10)][0]
        before, memory = wait_idle(limited), rss_bytes()
        layouts = len(engine.residency._layouts)
        start = time.monotonic()
        for i in range(300):
            text = cycle(client, f"churn-{i}", i % 25 == 0)
            assert text in (None, want)
    after = wait_idle(limited)
    assert after == before, (before, after)  # registered, adapter slots, host copies: all as before
    assert len(engine.residency._layouts) == layouts and "churn-299" not in server.engine.snapshot.adapters
    assert rss_bytes() - memory < 32 << 20
    assert time.monotonic() - start < 60  # ~3 s when the machine is free
    assert_still_correct(limited, greedy_reference)
